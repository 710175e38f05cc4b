"""benchmarks/_util.py: what the benchmark scripts share."""
from __future__ import annotations

from pathlib import Path

import yaml

PRESET = Path(__file__).resolve().parents[2] / "presets" / "distill-tiny.yaml"


def test_the_benchmarks_default_teacher_is_the_distill_tiny_preset_s(load_benchmark):
    util = load_benchmark("_util")
    teacher = util.default_teacher()
    assert teacher == yaml.safe_load(PRESET.read_text())["distill"]["teacher"]
    assert teacher.startswith("builtin:")  # the built-in default needs no data or weights
