"""Self-describing, atomic student checkpoints.

A checkpoint is a ``torch.save`` of tensors and plain containers only, so it loads with
``weights_only=True``::

    {"format": "ofactl-student", "format_version": 1, "ofactl_version": "0.1.0",
     "student": {...StudentConfig...}, "state_dict": {...}, "alpha_mean": 0.31,
     "step": 1200, "teacher": {...}, "train_state": {...optimizer, scheduler, RNG...}}

Writes go to a temporary file in the same folder, are fsynced, then renamed over the target,
so a crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ofactl import __version__
from ofactl.atomic import atomic_path
from ofactl.config import build_config, to_dict
from ofactl.errors import CheckpointError, ConfigError

FORMAT = "ofactl-student"
FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """torch.save to ``path`` atomically (:func:`ofactl.atomic.atomic_path`)."""
    with atomic_path(path, CheckpointError) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_student(path: Path, student: Any, *, step: int = 0, teacher: dict[str, Any] | None = None,
                 train_state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                 trained_rates: dict[str, Any] | None = None) -> Path:
    """Write ``student.pt`` atomically: weights, student config, training step, teacher identity,
    the rates it was trained for (see :func:`rates_trained`), the level of the audio it learned
    from (``student.input_level_db``) and ofactl version (loadable without ``--trust-checkpoint``).
    """
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ofactl_version": __version__,
        "student": to_dict(student.cfg),
        "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()},
        "alpha_mean": student.alpha_mean,
        "step": int(step),
        "teacher": teacher or {},
        "train_state": train_state or {},
        "extra": extra or {},
        "trained_rates": trained_rates or {},
        "input_level_db": getattr(student, "input_level_db", None),
    }
    return atomic_torch_save(payload, path)


def rates_trained(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The rates a checkpoint's student was trained for: ``{"kind": "fixed", "rates": [r]}``
    (one rate: avgpool, cif at a fixed rate, no compressor) or ``{"kind": "range", "min": a,
    "max": b}`` (once-for-all). None when the checkpoint does not say (older files); a student
    without compressor is at rate 1 whatever the file says."""
    if obj.get("student", {}).get("compressor") == "none":
        return {"kind": "fixed", "rates": [1.0]}
    return dict(obj["trained_rates"]) if obj.get("trained_rates") else None


def covers(trained: dict[str, Any] | None, rate: float) -> bool:
    """True when ``rate`` is one the student was trained for (to 3 decimals, the store's names)."""
    if trained is None:
        return True
    if trained["kind"] == "fixed":
        return any(abs(rate - r) < 5e-4 for r in trained["rates"])
    return trained["min"] - 5e-4 <= rate <= trained["max"] + 5e-4


def describe_rates(trained: dict[str, Any] | None) -> str:
    """``trained at rate 0.5 only`` / ``trained on rates 0.222-1`` / ``trained rates not recorded``."""
    if trained is None:
        return "trained rates not recorded"
    if trained["kind"] == "fixed":
        return "trained at rate " + ", ".join(f"{r:g}" for r in trained["rates"]) + " only"
    return f"trained on rates {trained['min']:.3g}-{trained['max']:.3g}"


def rates_phrase(rates: list[float]) -> str:
    """``rate 0.1 lies`` / ``rates 0.1, 0.15 lie``: the subject and verb of a note about rates."""
    listed = ", ".join(f"{r:g}" for r in rates)
    return f"rate {listed} lies" if len(rates) == 1 else f"rates {listed} lie"


def student_file(path: Path) -> Path:
    """The student a ``distill`` run folder made (its student.pt); any other path as given. The
    folder of a run that has not finished is refused, naming its newest checkpoint (a student too)."""
    p = Path(path)
    if not p.is_dir():
        return p
    if (p / "student.pt").is_file():
        return p / "student.pt"
    from ofactl.config import run_settings

    section = run_settings(p)[0]
    steps = sorted((p / "checkpoints").glob("step-*.pt"))
    if steps and section == "distill":
        raise CheckpointError(f"{p}: an 'ofactl distill' run that has not finished (student.pt is written when it "
                              f"ends); its newest checkpoint, {steps[-1]}, is a student too")
    if section == "pretrain":
        raise CheckpointError(f"{p}: an 'ofactl pretrain' run folder; it makes a teacher (--teacher), not a student")
    return p


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and check a student checkpoint's payload (weights_only=True); a ``distill`` run
    folder stands for its student.pt (:func:`student_file`)."""
    p = student_file(Path(path))
    if not p.exists() and str(path).startswith(("builtin:", "random:")):
        raise CheckpointError(f"{path} is a teacher, not a student checkpoint; students come from "
                              f"'ofactl distill --teacher {path}'")
    if not p.is_file():
        what = "is a folder, not a checkpoint file (nor a distill run folder holding student.pt)" if p.is_dir() \
            else "not found"
        raise CheckpointError(f"checkpoint {p} {what}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file, not a checkpoint")
    if not zipfile.is_zipfile(p):
        from ofactl.audio import AUDIO_SUFFIXES

        with open(p, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{":  # a safetensors header: weights, not a student
            raise CheckpointError(f"{p}: safetensors weights (a teacher's?), not an ofactl student checkpoint; "
                                  "teachers go to --teacher, students come from 'ofactl distill'")
        if head[:4] in (b"RIFF", b"fLaC", b"OggS") or p.suffix.lower() in AUDIO_SUFFIXES:
            raise CheckpointError(f"{p}: an audio file, not a student checkpoint; students come from 'ofactl distill'")
        if p.suffix.lower() in (".pt", ".pth", ".ckpt"):
            raise CheckpointError(f"{p}: corrupt or truncated checkpoint (not a torch archive)")
        raise CheckpointError(f"{p}: not a student checkpoint (not a torch archive); students come from 'ofactl distill'")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{p}: not an ofactl student checkpoint (it holds pickled objects)") from None
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: corrupt or truncated checkpoint ({msg})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        keys = ", ".join(sorted(map(str, obj))[:6]) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{p}: not an ofactl student checkpoint (found: {keys}); "
                              "teachers go to --teacher, students come from 'ofactl distill'")
    ver = obj.get("format_version")
    if ver != FORMAT_VERSION:
        raise CheckpointError(f"{p}: checkpoint format version {ver}, this ofactl reads {FORMAT_VERSION}")
    return obj


def load_student(path: Path, device: str | torch.device = "cpu",
                 payload: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Rebuild the student from a checkpoint alone; returns (student in eval mode, payload).
    ``payload``: the file's payload when the caller already read it (``read_checkpoint``)."""
    from ofactl.model.student import Student, StudentConfig

    obj = read_checkpoint(path) if payload is None else payload
    try:
        cfg = build_config(StudentConfig, obj["student"], source=f"{path} (student config)")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    student = Student(cfg)
    try:
        student.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the stored architecture ({str(e).splitlines()[0]})") from None
    level = obj.get("input_level_db")  # absent from files written before it was recorded
    student.input_level_db = float(level) if isinstance(level, (int, float)) else None
    return student.to(device).eval(), obj


def file_sha256(*paths: Path) -> str:
    """SHA-256 (hex) of the files' bytes, read in 1 MiB blocks, one after the other: the
    identity of a checkpoint (one file) or of a teacher folder (config and weights)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _compute(student_cfg: dict[str, Any]) -> dict[str, Any]:
    """The front end, and GMAC per audio second with the front end's share at rates 1, 0.5, 0.25."""
    from ofactl.model.frontend import describe_frontend
    from ofactl.model.macs import student_gmacs_per_second
    from ofactl.model.student import StudentConfig

    cfg = build_config(StudentConfig, student_cfg, "the checkpoint's student config")
    per_rate = {}
    for r in (1.0, 0.5, 0.25):
        m = student_gmacs_per_second(cfg, r)
        per_rate[f"{r:g}"] = {"gmacs_per_s": round(m["total"], 4), "frontend_share": round(m["cnn"] / m["total"], 3)}
    return {"frontend": describe_frontend(cfg), "compute": per_rate}


def describe_checkpoint(path: Path) -> dict[str, Any]:
    """What ``ofactl info student.pt`` prints."""
    obj = read_checkpoint(path)
    cfg = obj["student"]
    arch = cfg.get("arch", {})
    n_params = sum(v.numel() for v in obj["state_dict"].values())
    return {
        "path": str(path),
        "kind": "student checkpoint",
        "ofactl_version": obj.get("ofactl_version"),
        "format_version": obj.get("format_version"),
        "sha256": file_sha256(Path(path)),
        "step": obj.get("step"),
        "compressor": cfg.get("compressor"),
        "alpha_mean": round(float(obj.get("alpha_mean", float("nan"))), 4),
        "layers": arch.get("num_layers"),
        "dim": arch.get("embed_dim"),
        "hidden_states": (arch.get("num_layers") or 0) + 1,
        "parameters": n_params,
        "pred_layers": cfg.get("pred_layers"),
        "trained_rates": rates_trained(obj),
        "input_level_db": obj.get("input_level_db"),
        **_compute(cfg),
        "teacher": {k: v for k, v in obj.get("teacher", {}).items() if k != "arch"},
    }
