"""Shared fixtures: small synthetic corpora, audio file writers, the FSDD path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf


def pytest_configure(config: pytest.Config) -> None:
    """Start from the stop signals' default dispositions. A test run launched under ``nohup`` or
    as a background job of a script inherits SIGHUP or SIGINT ignored, and ofactl, by design,
    leaves an ignored signal alone; the tests of its stop handling (in this process and in the
    commands they start, which inherit the dispositions) are about the default case."""
    import signal

    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGHUP, signal.SIG_DFL),
                         (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(sig) is signal.SIG_IGN:
            signal.signal(sig, default)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # the suite runs one worker per core (pyproject's addopts): a second torch thread per worker
        # would only contend for the cores; the commands the tests start inherit the setting
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory):
    """A tiny untrained student, seeded: (student.pt path, the student in eval mode)."""
    import torch

    from ofactl.checkpoint import save_student
    from ofactl.model.student import Student, student_config

    torch.manual_seed(0)
    s = Student(student_config("tiny")).eval()
    p = save_student(tmp_path_factory.mktemp("ckpt") / "student.pt", s)
    return p, s


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    if not (FSDD / "recordings").is_dir():
        pytest.skip("../shared/data/fsdd is not present")
    return FSDD / "recordings"


def tone(seconds: float, sr: int, freq: float = 220.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def sweep_row(rate: float, test: float, task: str = "sid") -> Any:
    """A ``SweepRow`` of ``task`` at ``rate`` with test (and dev) metric ``test``; the rest placeholders."""
    from ofactl.sweep import SweepRow

    return SweepRow(label="s", checkpoint_sha256="x", store_group="g", task=task, requested_rate=rate,
                    achieved_rate=rate, frame_period_ms=20 / rate, metric="accuracy", test=test, dev=test,
                    extra_metrics={}, upstream_gmacs_per_s=0.0, upstream_cnn_gmacs_per_s=0.0,
                    extract_s_per_audio_s=0.0, probe_train_s=1.0, probe_params=1, probe_mmacs_per_s=0.0,
                    store_mb=0.0, infeasible_test=None, layer_weights=[1.0], seed=0, ofactl_version="0",
                    probe_config_sha="0")


@pytest.fixture
def write_wav(tmp_path: Path):
    """write_wav(name, seconds=0.5, sr=16000, channels=1, fmt=None) -> Path."""

    def _write(name: str, seconds: float = 0.5, sr: int = 16000, channels: int = 1,
               freq: float = 220.0, subtype: str | None = None) -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        fmt = "OGG" if p.suffix == ".opus" else None  # soundfile does not infer Ogg from .opus
        sf.write(str(p), tone(seconds, sr, freq, channels), sr, subtype=subtype, format=fmt)
        return p

    return _write


@pytest.fixture(scope="session")
def small_synth_cfg():
    from ofactl.synth import SynthConfig

    return SynthConfig(seed=1, n_speakers=6, keyword_takes=1, keywords=("yes", "no", "stop"),
                       n_sentences=6, sentences_per_speaker=2)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory, small_synth_cfg) -> Path:
    """A ~30-utterance synthetic corpus; returns its manifest path."""
    from ofactl.synth import run_synth

    out = tmp_path_factory.mktemp("synth")
    return run_synth(small_synth_cfg, out / "corpus").manifest


def kill_when_exists(cmd: list[str], marker: Path, timeout: float = 120.0) -> None:
    """Start ``cmd``, SIGKILL it as soon as a file matching ``marker`` exists (a glob in its
    name: ``checkpoints/step-*.pt``, since a run may delete its older checkpoints before a busy
    machine lets this poll again), and check that it really was killed rather than finished first."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(marker.parent.glob(marker.name)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.fixture(scope="session")
def load_benchmark():
    """load_benchmark(name) -> the script ``benchmarks/<name>.py`` as a module (its ``_util``
    import resolved from ``benchmarks/`` while it loads)."""
    import importlib.util
    import sys

    def _load(name: str) -> Any:
        sys.path.insert(0, str(BENCH))
        try:
            spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH / f"{name}.py")
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        finally:
            sys.path.remove(str(BENCH))

    return _load
