"""Training throughput of the `base` student (audio seconds per wall second).

    python benchmarks/distill_bench.py [--device cpu|cuda] [--precision fp32|bf16] [--steps 6]

Distils from an untrained random:base teacher (speed does not depend on the weights) on FSDD
(../shared/data/fsdd) or --corpus, with boundaries=none. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import FSDD, emit

from ofactl.distill import DistillConfig, run_distill


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(FSDD))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-seconds", type=float, default=24.0)
    args = ap.parse_args()
    cfg = DistillConfig(teacher="random:base", steps=args.steps, batch_seconds=args.batch_seconds,
                        crop_seconds=8.0, device=args.device, precision=args.precision, num_workers=1,
                        eval_utts=2, eval_rates=(1.0,), ckpt_every=10**9, log_every=1)
    cfg.guidance = replace(cfg.guidance, boundaries="none")
    with tempfile.TemporaryDirectory() as d:
        res = run_distill(cfg, args.corpus, Path(d) / "run")
        recs = [json.loads(x) for x in (Path(d) / "run/metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    # the first step includes start-up (worker spawn, allocator warm-up): report the steady rate too.
    # With log_every=1 each record's audio_s_per_s is its own step's speed.
    first, last = recs[0], recs[-1]
    steady = None
    if len(recs) > 1:
        audio_after_first = res.audio_seconds - first["audio_s_per_s"] * first["elapsed_s"]
        steady = round(audio_after_first / (last["elapsed_s"] - first["elapsed_s"]), 2)
    emit({"student": "base", "teacher": "random:base", "device": args.device, "precision": args.precision,
          "steps": len(recs), "batch_seconds": args.batch_seconds,
          "audio_s_per_s_overall": round(res.audio_seconds / res.wall_seconds, 2), "audio_s_per_s_steady": steady})


if __name__ == "__main__":
    main()
