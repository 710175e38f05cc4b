"""Self-descriptions for ``ofactl info``: the environment, a checkpoint, or a feature store."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from ofactl import __version__
from ofactl.errors import OfactlError


def environment() -> dict[str, Any]:
    """Version, torch build, CUDA devices and bf16 support."""
    import torch

    doc: dict[str, Any] = {
        "ofactl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        doc["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        doc["cuda_bf16"] = bool(torch.cuda.is_bf16_supported())
    # CPU bf16 autocast always runs; it is only fast with native bf16 (AVX512-BF16 / AMX).
    doc["cpu_bf16_native"] = _cpu_has_native_bf16()
    return doc


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def describe_path(path: Path, verify: bool = False) -> dict[str, Any]:
    """Describe what ``path`` holds: a feature store, a student checkpoint, a teacher file, an audio
    file, or the run folder of ``distill`` (its student.pt) or ``pretrain`` (its teacher); ``verify`` checks a
    store's checksums (see :func:`ofactl.storage.describe_store`)."""
    from ofactl.model.teacher import PRETRAIN_TEACHER

    p = Path(path)
    if not p.exists():
        raise OfactlError(f"{p}: no such file or folder")
    is_store = (p / "zarr.json").is_file() or p.suffix in (".zarr", ".h5", ".hdf5")
    if p.is_dir() and not is_store:  # a run folder: what it made
        for made in ("student.pt", PRETRAIN_TEACHER):
            if (p / made).is_file():
                return describe_path(p / made, verify)
        raise OfactlError(f"{p}: not a feature store (no zarr.json), nor the run folder of distill "
                          f"(student.pt) or pretrain ({PRETRAIN_TEACHER})")
    if is_store:
        from ofactl.storage import describe_store

        return describe_store(p, verify)
    if verify:
        from ofactl.errors import ConfigError

        raise ConfigError(f"--verify checks a feature store; {p} is not one")
    from ofactl.audio import AUDIO_SUFFIXES

    if p.suffix.lower() in AUDIO_SUFFIXES:
        return describe_audio(p)
    if p.suffix == ".safetensors":  # students are .pt; a .safetensors file is a teacher's weights
        return describe_teacher(str(p))
    from ofactl.checkpoint import describe_checkpoint

    return describe_checkpoint(p)


def describe_audio(path: Path) -> dict[str, Any]:
    """What every command makes of one recording: its header, what the models get (16 kHz mono),
    its level, and whether a HuBERT CNN (400 samples per frame) can take it. Decoding it whole
    checks it as ``extract`` would (truncation, NaN)."""
    from ofactl.audio import audio_info, level_dbfs, load_audio
    from ofactl.extract import QUIET_DBFS
    from ofactl.model.blocks import BASE_CONV
    from ofactl.model.windowed import min_input_samples
    from ofactl.runtime import SAMPLE_RATE

    info = audio_info(path)
    wav = load_audio(path)
    level = level_dbfs(wav)
    need = min_input_samples(BASE_CONV)
    notes = [f"resampled from {info.sample_rate} Hz to {SAMPLE_RATE} Hz"] if info.sample_rate != SAMPLE_RATE else []
    notes += [f"{info.channels} channels mixed down to mono"] if info.channels > 1 else []
    if level < QUIET_DBFS:
        notes.append(f"quieter than {QUIET_DBFS:g} dBFS: --level-db levels it (docs/models.md, 'Loudness')")
    if wav.numel() < need:
        notes.append(f"too short: the models need at least {need} samples at {SAMPLE_RATE // 1000} kHz")
    return {"kind": "audio", "seconds": round(info.n_samples / info.sample_rate, 3),
            "sample_rate": info.sample_rate, "channels": info.channels, "samples_16k": int(wav.numel()),
            "frames_20ms": max(0, (int(wav.numel()) - need) // 320 + 1), "level_dbfs": round(level, 1),
            "notes": notes}


def describe_teacher(spec: str, trust: bool = False) -> dict[str, Any]:
    """Load a teacher the way ``distill`` would and report its format and architecture."""
    from ofactl.model.teacher import load_teacher

    t = load_teacher(spec, trust=trust)
    doc = {"kind": "teacher", **t.describe()}
    doc["hidden_states"] = t.num_hidden
    doc["parameters"] = sum(p.numel() for p in t.parameters())
    if spec.startswith("builtin:"):
        doc["model_card"] = "docs/models.md"
    return doc
