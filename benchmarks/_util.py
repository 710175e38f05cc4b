"""Timing helpers and paths shared by the benchmark scripts (each prints one JSON document)."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# FSDD's recordings in the shared data folder beside the checkout (real speech, 8 kHz)
FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd" / "recordings"


def timeit(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def default_teacher() -> str:
    """The built-in default's teacher (the ``distill-tiny`` preset's): the benchmarks' ``--teacher``
    default, so a new default teacher is one preset line."""
    from ofactl.config import load_config
    from ofactl.distill import DistillConfig

    return load_config(DistillConfig, "distill", "distill-tiny").teacher


def emit(doc: dict[str, Any]) -> None:
    doc.setdefault("machine", machine())
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
