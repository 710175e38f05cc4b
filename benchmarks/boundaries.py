"""How good are distill's pseudo-phone boundaries (``guidance.boundaries: auto``)?

    python benchmarks/boundaries.py [--teacher TEACHER] [--corpus runs/ablation/synth-tiny]
                                    [--k 30] [--fit-utts 150] [--layer -1] [--penalties 0.25,0.5,1,2]

On a corpus with oracle phone start times (an ``ofactl synth`` corpus), fits k-means on one
teacher layer exactly as distill does (same sample, same seed), then segments every utterance
with each DP penalty and scores the segment ends against the phone boundaries on the 20 ms grid:
precision, recall, F1 and R-value with a tolerance of one frame (20 ms), and the mean segment
period, which sets the predicted alpha (1 / period in frames) and with it the rate at
``lambda = 1``. With ``--ckpt NAME=student.pt`` (repeatable) it also scores what each student
learned: the frames where its predicted alpha's running sum crosses an integer (its own
segmentation, lambda = 1), on the corpus's test split. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import default_teacher, emit, machine

from ofactl.audio import load_audio, read_corpus
from ofactl.model import segment as seg
from ofactl.model.teacher import load_teacher


@torch.no_grad()
def predicted_boundaries(ckpt: Path, utts: list) -> dict[str, np.ndarray]:
    """Segment ids (20 ms frames) where a student's predicted alpha fires: frame t ends a segment
    when the running sum of alpha crosses an integer there."""
    from ofactl.checkpoint import load_student

    student, _ = load_student(ckpt)
    out = {}
    for u in utts:
        w = load_audio(u.path)
        feats, n = student.cnn_features(w[None], torch.tensor([len(w)]))
        alpha = student.encode(feats, n, rate=1.0)[1].alpha_pred
        if alpha is None:
            raise SystemExit(f"--ckpt {ckpt}: not a CIF student (no predicted alpha)")
        c = torch.floor(torch.cumsum(alpha[0, : int(n[0])].double(), 0) + 1e-6)
        fired = (torch.diff(c, prepend=torch.zeros(1, dtype=c.dtype)) > 0).nonzero().squeeze(1) + 1
        out[u.id] = seg.ends_to_segids([*fired.tolist(), int(n[0])], int(n[0]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=default_teacher(), help="default: the distill-tiny preset's teacher (%(default)s)")
    ap.add_argument("--corpus", default="runs/ablation/synth-tiny")
    ap.add_argument("--k", type=int, default=30, help="k-means units (distill-tiny's guidance.kmeans_k)")
    ap.add_argument("--fit-utts", type=int, default=150, help="utterances k-means is fitted on")
    ap.add_argument("--layer", type=int, default=-1, help="teacher hidden state; -1: the middle one")
    ap.add_argument("--penalties", default="0.25,0.5,1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt", action="append", default=[], metavar="NAME=PATH",
                    help="also score a student's own predicted boundaries (repeatable)")
    args = ap.parse_args()

    corpus = read_corpus(args.corpus)  # a synth folder is read through its manifest.tsv
    utts = list(corpus)
    teacher = load_teacher(args.teacher)
    layer = args.layer if args.layer >= 0 else teacher.num_hidden // 2
    feats: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def features(idx: list[int]) -> list[torch.Tensor]:
        for i in idx:
            if i not in feats:
                w = load_audio(utts[i].path)
                h = teacher(w[None], torch.tensor([len(w)]))
                feats[i] = h.states[0, : int(h.lengths[0]), layer].float()
        return [feats[i] for i in idx]

    n_frames = {u.id: len(f) for u, f in zip(utts, features(list(range(len(utts)))))}
    rows = []
    for pen in (float(p) for p in args.penalties.split(",")):
        segids, _ = seg.auto_boundaries(features, len(utts), [u.id for u in utts], args.k, args.fit_utts, pen, args.seed)
        scores = seg.score_against_phone_times(segids, utts, n_frames)
        if scores is None:
            raise SystemExit(f"--corpus {args.corpus}: no utterance has phone_times; use an `ofactl synth` corpus")
        rows.append({"penalty": pen, **{k: round(v, 4) for k, v in scores.items()}})
    test = [u for u in utts if u.labels.get("split") == "test"] or utts
    students = {}
    for spec in args.ckpt:
        name, _, path = spec.rpartition("=")
        sc = seg.score_against_phone_times(predicted_boundaries(Path(path), test), test, n_frames)
        students[name or path] = {k: round(v, 4) for k, v in (sc or {}).items()}
    emit({"benchmark": "boundaries", "teacher": args.teacher, "corpus": args.corpus, "k": args.k,
          "layer": layer, "fit_utts": args.fit_utts, "utterances": len(utts), "tolerance_ms": 20,
          "rows": rows, "students": students,
          "machine": machine()})


if __name__ == "__main__":
    main()
