"""What a `pretrain --resume` saves by reading its unit targets back instead of assigning them
again: the assignment (features and nearest unit of every utterance) against reading
``unit-targets.npz``, on the same utterances, with the ratio measured within this one run.

    python benchmarks/unit_targets_bench.py --run runs/pretrain-tiny-norm-32k-s1 \\
        [--corpus data/pretrain.txt] [--every 10] [--threads 1] [--workers 2]

``--run`` is a pretrain run folder (its ``config.yaml`` and ``kmeans.safetensors``); ``--every N``
takes every N-th utterance of the corpus (default: the run's own corpus list is not kept, so
``--corpus`` names it). Prints one JSON document: utterances, audio seconds, assignment and read
seconds, assignment speed in audio seconds per second, and read / assign. With ``--workers N``
the assignment runs twice, in this process and with N worker processes (``num_workers``), and
the document adds the second's time, its speed-up over the first and that both gave the same
units.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import emit, machine

from ofactl.audio import read_corpus
from ofactl.config import load_config
from ofactl.pretrain import PretrainConfig
from ofactl.progress import NullProgress
from ofactl.units import TARGETS_FILE, FeatureSource, Units, cached_unit_targets, targets_key, unit_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(PretrainConfig, "pretrain", args.run / "config.yaml")
    units = Units.load(args.run / "kmeans.safetensors")
    utts = list(read_corpus(args.corpus))[:: args.every]
    source = FeatureSource(cfg, torch.device("cpu"))
    key = targets_key(units, utts, cfg.from_ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TARGETS_FILE
        t0 = time.perf_counter()
        made = cached_unit_targets(utts, units, source, path, key, True, NullProgress())
        t1 = time.perf_counter()
        again = cached_unit_targets(utts, units, source, path, key, True, NullProgress())
        t2 = time.perf_counter()
        assert all((made[k] == again[k]).all() for k in made)
        size = path.stat().st_size
    audio = sum(u.seconds for u in utts)
    assign, read = t1 - t0, t2 - t1  # assign includes the one write of the file
    doc = {"benchmark": "unit_targets", "run": str(args.run), "utterances": len(utts), "audio_s": round(audio, 1),
           "targets": cfg.targets, "threads": args.threads, "assign_and_write_s": round(assign, 2),
           "read_s": round(read, 3), "assign_x_real_time": round(audio / assign, 1),
           "read_over_assign": round(read / assign, 4), "file_bytes": size}
    if args.workers:
        t3 = time.perf_counter()
        spread = unit_targets(utts, units, source, NullProgress(), workers=args.workers)
        t4 = time.perf_counter()
        doc |= {"workers": args.workers, "assign_with_workers_s": round(t4 - t3, 2),
                "workers_speedup": round(assign / (t4 - t3), 2),
                "same_units": all((made[k] == spread[k]).all() for k in made)}
    emit(doc | {"machine": machine()})


if __name__ == "__main__":
    main()
