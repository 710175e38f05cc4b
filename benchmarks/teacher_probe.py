"""How much speech a teacher knows: linear probes on each of its layers against log-mel frames
and the untrained ``random:tiny``.

    python benchmarks/teacher_probe.py [--teacher TEACHER] [--synth DIR] [--fsdd DIR]
                                      [--periods [--period-heads linear,conv]] [--ks-seen-speakers]
                                      [--input-level-db -25] [--group-norm-eps 1e-9] [--probe-seed 1]

- ``pr``: phoneme recognition (PER, a linear CTC head) on synth-tiny, trained on its train
  split and tested on its test split, whose voices the bundled teacher never heard
  (``synth-pretrain`` leaves them out);
- ``ks``: keyword spotting on FSDD (accuracy, statistics pooling and a linear layer) with a
  speaker-independent split (test speaker theo, dev lucas: left out of pretraining too); with
  ``--ks-seen-speakers`` also on a random split, every speaker in training.

With ``--input-level-db``, every recording is scaled to that RMS level (dBFS) before any features
are taken (log-mel and both models alike, from one decode): how much of a result is the recordings' loudness.
``auto`` takes the level the teacher heard in pretraining, which ``ofactl pretrain`` records in the
teacher's file (the bundled teachers predate the record).
With ``--group-norm-eps``, both models' GroupNorm epsilon is replaced at load (no retraining):
whether that epsilon is what makes a quiet recording reach a model differently.
``--probe-seed`` changes only the probes' initialisation and batch order (splits stay): how much
of a difference between two teachers the probe itself makes.

Prints one JSON document with every layer's figure, the best layer, and the ratios the model
card reports. Every probe is seeded; features are computed once per model.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import FSDD, default_teacher, emit

from ofactl.audio import Corpus, level_dbfs, load_audio, read_corpus, set_level
from ofactl.errors import ConfigError
from ofactl.extract import parse_level, recorded_level
from ofactl.model.fbank import log_mel
from ofactl.model.teacher import load_teacher
from ofactl.probe import ProbeConfig, build_task, train_probe
from ofactl.probe.tasks import TaskData

Waves = dict[str, torch.Tensor]


def decode(corpus: Corpus, ids: set[str] | None = None) -> Waves:
    """Each recording (of ``ids``, else all) at 16 kHz, (S,), decoded once for every model."""
    return {u.id: load_audio(u.path) for u in corpus if ids is None or u.id in ids}


def at_level(waves: Waves, level_db: float | None) -> Waves:
    """``waves``, each scaled to ``level_db`` (RMS, dBFS); as they are without one."""
    return waves if level_db is None else {k: set_level(w, level_db) for k, w in waves.items()}


@torch.no_grad()
def teacher_features(spec: str, waves: Waves, norm_eps: float | None = None) -> dict[str, np.ndarray]:
    """Every hidden state of a teacher: (T, L, D) float16 per utterance; with ``norm_eps``, its
    GroupNorms use that epsilon instead of the one it was trained with."""
    t = load_teacher(spec, seed=0)
    if norm_eps is not None:
        for m in t.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.eps = norm_eps
    out = {}
    for uid, w in waves.items():
        h = t(w[None], torch.tensor([len(w)]))
        out[uid] = h.states[0, : int(h.lengths[0])].half().numpy()
    return out


@torch.no_grad()
def mel_features(waves: Waves, bins: int = 64) -> dict[str, np.ndarray]:
    """Log-mel frames on the same 20 ms grid: (T, 1, bins)."""
    out = {}
    for uid, w in waves.items():
        m, n = log_mel(w[None], torch.tensor([len(w)]), bins)
        out[uid] = m[0, : int(n[0]), None].half().numpy()
    return out


def speaker_levels(corpus: Corpus, waves: Waves) -> dict[str, float]:
    """Mean RMS level (dBFS) of each speaker's recordings as decoded: how loud each voice reaches
    a model."""
    levels: dict[str, list[float]] = {}
    for u in corpus:
        levels.setdefault(u.labels["speaker"], []).append(level_dbfs(waves[u.id]))
    return {k: round(float(np.mean(v)), 1) for k, v in sorted(levels.items())}


def per_layer(task, feats: dict[str, np.ndarray], cfg: ProbeConfig) -> list[float]:
    n_layers = next(iter(feats.values())).shape[1]
    scores = []
    for layer in range(n_layers):
        one = {u: x[:, layer : layer + 1] for u, x in feats.items()}
        scores.append(round(train_probe(task, one, cfg).test[task.metric], 4))
    return scores


def pooled(x: np.ndarray, k: int) -> np.ndarray:
    """Mean of every ``k`` consecutive frames of (T, L, D) (a 20k ms grid; the tail is dropped)."""
    t = x.shape[0] // k * k
    return x[:t].astype(np.float32).reshape(t // k, k, *x.shape[1:]).mean(1).astype(np.float16)


Features = dict[str, np.ndarray]


def sources(task: TaskData, waves: Waves, teacher: str, norm_eps: float | None = None) -> dict[str, Features]:
    """The features each probe compares, computed once from the same decoded ``waves``: log-mel,
    ``random:tiny`` and the teacher."""
    mine = {u: waves[u] for u in task.ids}
    return {"log_mel": mel_features(mine),
            "random_tiny": teacher_features("random:tiny", mine, norm_eps),
            "teacher": teacher_features(teacher, mine, norm_eps)}


def pr_by_period(task: TaskData, feats: dict[str, Features], layer: int, cfg: ProbeConfig) -> dict:
    """PER of ``cfg``'s CTC head on the teacher's ``layer`` and on log-mel frames averaged over
    1, 2 and 4 frames (20, 40, 80 ms): how much a head gains from wider frames."""
    picked = {"teacher": {u: x[:, layer : layer + 1] for u, x in feats["teacher"].items()}, "log_mel": feats["log_mel"]}
    out: dict = {"layer": layer}
    for name, fs in picked.items():
        out[name] = {f"{20 * k}ms": round(train_probe(task, {u: pooled(x, k) for u, x in fs.items()}, cfg).test["per"], 4)
                     for k in (1, 2, 4)}
    return out


def probe_task(task: TaskData, feats: dict[str, Features], cfg: ProbeConfig) -> dict:
    """Every layer of each source probed on ``task``; the best layers of the teacher and random:tiny."""
    t0 = time.perf_counter()
    res: dict[str, Any] = {"metric": task.metric, "splits": {k: len(v) for k, v in task.splits.items()}}
    res["log_mel"] = per_layer(task, feats["log_mel"], cfg)[0]
    for label in ("random_tiny", "teacher"):
        res[label] = per_layer(task, feats[label], cfg)
    pick = min if task.metric == "per" else max
    res["teacher_best"] = pick(res["teacher"])
    res["teacher_best_layer"] = res["teacher"].index(res["teacher_best"])
    res["random_tiny_best"] = pick(res["random_tiny"])
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def seen_speaker_split(task: TaskData, seed: int = 0) -> TaskData:
    """``task`` with its utterances split at random 70/15/15, so every speaker is in training: the
    speaker-independent split's gap to this one is what the features lose to an unseen voice."""
    ids = sorted(task.ids)
    random.Random(seed).shuffle(ids)
    a, b = int(0.7 * len(ids)), int(0.85 * len(ids))
    return replace(task, splits={"train": ids[:a], "dev": ids[a:b], "test": ids[b:]})


def input_level(value: str | None, teacher: str) -> float | None:
    """``--input-level-db`` as a level in dBFS: a number, ``auto`` (the level the teacher's file
    records; teachers from ``ofactl pretrain`` do), or none. Anything else exits naming the flag."""
    flag = "--input-level-db"
    try:
        level = parse_level(value, flag)
        if level != "auto":
            return level
        return recorded_level(level, load_teacher(teacher).input_level_db, teacher, flag, maker="ofactl pretrain")
    except ConfigError as e:
        sys.exit(f"teacher_probe: {e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=default_teacher(), help="default: the distill-tiny preset's teacher (%(default)s)")
    ap.add_argument("--synth", default=None, help="a synth-tiny folder (made in a temporary folder if absent)")
    ap.add_argument("--fsdd", default=str(FSDD))
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--periods", action="store_true",
                    help="also probe pr on the best layer and log-mel averaged to 40 and 80 ms frames")
    ap.add_argument("--period-heads", default="linear,conv",
                    help="the CTC heads of --periods: linear (one frame at a time) and conv (five frames)")
    ap.add_argument("--ks-seen-speakers", action="store_true",
                    help="also probe ks on a random 70/15/15 split of FSDD, every speaker in training")
    ap.add_argument("--input-level-db", default=None,
                    help="scale every recording to this RMS level (dBFS, e.g. -25) before taking any features; "
                         "auto: the level of the teacher's pretraining audio, which its file records")
    ap.add_argument("--probe-seed", type=int, default=0,
                    help="seed of the probes' initialisation and batches (the splits stay fixed)")
    ap.add_argument("--group-norm-eps", type=float, default=None,
                    help="replace both models' GroupNorm epsilon (trained with 1e-5) at load, e.g. 1e-9")
    args = ap.parse_args()
    args.input_level_db = input_level(args.input_level_db, args.teacher)
    torch.manual_seed(0)
    synth = Path(args.synth) if args.synth else None
    if synth is None or not (synth / "manifest.tsv").is_file():
        from ofactl.config import load_config
        from ofactl.synth import SynthConfig, run_synth

        synth = synth or Path(tempfile.mkdtemp(prefix="ofactl-probe-")) / "synth-tiny"
        run_synth(load_config(SynthConfig, "synth", "synth-tiny"), synth)
    out: dict = {"benchmark": "teacher_probe", "teacher": args.teacher, "input_level_db": args.input_level_db,
                 "group_norm_eps": args.group_norm_eps, "probe_seed": args.probe_seed}
    # plain random batches (sort_pool 1), as every table of the model card was measured
    pr_cfg = ProbeConfig(ctc_head="linear", epochs=args.epochs, device="cpu", seed=args.probe_seed, sort_pool=1)
    synth_corpus = read_corpus(synth / "manifest.tsv")
    pr_task = build_task("pr", synth_corpus, seed=0)
    pr_waves = at_level(decode(synth_corpus, set(pr_task.ids)), args.input_level_db)
    pr_feats = sources(pr_task, pr_waves, args.teacher, args.group_norm_eps)
    out["pr_synth_unseen_voices"] = pr = probe_task(pr_task, pr_feats, pr_cfg)
    if Path(args.fsdd).is_dir():
        ks_cfg = ProbeConfig(cls_epochs=args.epochs, device="cpu", seed=args.probe_seed)
        fsdd = read_corpus(f"{args.fsdd}::{{label}}_{{speaker}}_{{take}}")
        ks_task = build_task("ks", fsdd, seed=0)
        recorded = decode(fsdd)
        out["fsdd_speaker_level_db"] = speaker_levels(fsdd, recorded)
        ks_feats = sources(ks_task, at_level(recorded, args.input_level_db), args.teacher, args.group_norm_eps)
        out["ks_fsdd_speaker_independent"] = probe_task(ks_task, ks_feats, ks_cfg)
        if args.ks_seen_speakers:
            out["ks_fsdd_seen_speakers"] = probe_task(seen_speaker_split(ks_task), ks_feats, ks_cfg)
    if args.periods:
        out["pr_by_frame_period"] = {
            head: pr_by_period(pr_task, pr_feats, pr["teacher_best_layer"], replace(pr_cfg, ctc_head=head))
            for head in args.period_heads.split(",")}
    out["pr_best_over_log_mel"] = round(pr["teacher_best"] / pr["log_mel"], 3)
    if "ks_fsdd_speaker_independent" in out:
        ks = out["ks_fsdd_speaker_independent"]
        out["ks_best_minus_log_mel_points"] = round(100 * (ks["teacher_best"] - ks["log_mel"]), 1)
    emit(out)


if __name__ == "__main__":
    main()
