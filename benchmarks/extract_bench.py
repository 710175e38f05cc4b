"""Extraction figures: store write overhead, multi-rate single pass, throughput (fp32/bf16).

    python benchmarks/extract_bench.py [--corpus DIR_OR_TSV] [--n 200] [--device cpu|cuda]

Uses the `base` student (random weights: speed does not depend on training) on the first N
utterances of FSDD (../shared/data/fsdd) or the given corpus. Prints one JSON document; every
figure is a ratio or a rate measured within this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import FSDD, emit

from ofactl.audio import read_corpus
from ofactl.extract import ExtractConfig, extract_with_student
from ofactl.model.student import Student, student_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(FSDD))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-seconds", type=float, default=32.0)
    args = ap.parse_args()
    corpus = read_corpus(args.corpus)
    corpus = corpus.subset([u.id for u in list(corpus)[: args.n]])
    torch.manual_seed(0)
    student = Student(student_config("base")).eval()
    base = ExtractConfig(rates=(1.0,), device=args.device, num_workers=args.workers,
                         batch_seconds=args.batch_seconds)

    def run(cfg: ExtractConfig, store: bool) -> float:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            extract_with_student(cfg, student, "bench", corpus, Path(d) / "f.zarr" if store else None)
            return time.perf_counter() - t0

    audio_s = corpus.seconds
    run(base, False)  # warm-up
    # alternate the two runs and take medians: single runs on a shared CPU vary by ~10%
    pairs = [(run(base, False), run(base, True)) for _ in range(3)]
    t_discard = statistics.median(p[0] for p in pairs)
    t_store = statistics.median(p[1] for p in pairs)
    t_multi = run(replace(base, rates=(1.0, 0.5, 0.33, 0.25)), True)
    through = {}
    for prec in ("fp32", "bf16"):
        for r in (1.0, 0.5, 0.25):
            t = run(replace(base, rates=(r,), precision=prec), True)
            through[f"{prec}@{r}"] = round(audio_s / t, 1)
    emit({
        "corpus": args.corpus, "utterances": len(corpus), "audio_seconds": round(audio_s, 1),
        "device": args.device, "student": "base",
        "store_overhead": {"discard_s": round(t_discard, 3), "store_s": round(t_store, 3),
                           "extra": round(t_store / t_discard - 1, 4), "target": "<= 0.10"},
        "multi_rate": {"rate1_s": round(t_store, 3), "rates_1_0.5_0.33_0.25_s": round(t_multi, 3),
                       "ratio": round(t_multi / t_store, 3), "target": "<= 1.8"},
        "throughput_audio_s_per_s": through,
    })


if __name__ == "__main__":
    main()
