"""Where and how models run: the sample rate every model sees, the device a command names, its
autocast precision, seeding, and the helpers that keep a model and its inputs on the same device.

Every command that runs a model resolves ``--device`` here, so ``auto``, ``cpu``, ``cuda`` and
``cuda:N`` mean the same everywhere and a bad value is one clear error naming the flag.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, get_args

from ofactl.choices import Precision
from ofactl.errors import ConfigError

if TYPE_CHECKING:
    import torch

SAMPLE_RATE = 16000  # Hz: every model input; other rates are resampled on load (ofactl.audio)
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS: tuple[str, ...] = get_args(Precision)
_DEVICE_RX = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def check_device_name(name: str, flag: str = "--device") -> None:
    """Syntax only (no torch import): raises :class:`ConfigError` for anything but
    auto, cpu, cuda or cuda:N."""
    if not isinstance(name, str) or not _DEVICE_RX.match(name):
        raise ConfigError(f"{flag} {name!r}: expected {DEVICE_CHOICES}")


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda[:N]`` must exist on this machine."""
    import torch

    check_device_name(name, flag)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {name}: no CUDA device is available on this machine "
                              "(torch.cuda.is_available() is False); use --device cpu or auto")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{flag} {name}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32). ``auto`` is bf16 on
    CUDA and fp32 on the CPU; fp16 needs CUDA."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs CUDA (use bf16 or fp32 on the CPU)")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def module_device(module: Any) -> torch.device:
    """The device of a module's first parameter or buffer (cpu for a module without any)."""
    import torch

    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on the CPU), so wall-clock timings count them."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``, or no context at all for plain fp32 (so a
    device type without autocast support still runs)."""
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def launcher_shard(env: dict[str, str] | None = None) -> tuple[int, int, str] | None:
    """(index, count, launcher) of this process among its peers, from the launcher's
    environment: torchrun (RANK, WORLD_SIZE) or a SLURM job array (SLURM_ARRAY_TASK_ID, with
    SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT). None when started alone."""
    import os

    e = os.environ if env is None else env
    try:
        if int(e.get("WORLD_SIZE", "1")) > 1:
            return int(e["RANK"]), int(e["WORLD_SIZE"]), "torchrun"
        if "SLURM_ARRAY_TASK_ID" in e and int(e.get("SLURM_ARRAY_TASK_COUNT", "1")) > 1:
            first = int(e.get("SLURM_ARRAY_TASK_MIN", "0"))
            return int(e["SLURM_ARRAY_TASK_ID"]) - first, int(e["SLURM_ARRAY_TASK_COUNT"]), "SLURM array"
    except (KeyError, ValueError) as err:
        raise ConfigError(f"launcher environment is inconsistent ({err}): set RANK/WORLD_SIZE or "
                          "SLURM_ARRAY_TASK_ID/COUNT, or give --shard i/N") from None
    return None


def local_device(name: str, env: dict[str, str] | None = None) -> str:
    """``auto`` on a multi-process node: the GPU of this process's LOCAL_RANK (torchrun), so
    ranks do not share one card. Other names pass through."""
    import os

    e = os.environ if env is None else env
    if name != "auto" or "LOCAL_RANK" not in e:
        return name
    import torch

    if not torch.cuda.is_available():
        return name
    return f"cuda:{int(e['LOCAL_RANK']) % max(1, torch.cuda.device_count())}"


def seed_all(seed: int) -> None:
    """Seed torch's global generator (CPU and every GPU), for initialisations and dropout;
    data order and crops use their own seeded generators."""
    import torch

    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """torch's global generator states: ``rng`` (CPU) and, where CUDA is available, ``cuda_rng``
    (every GPU); what :func:`set_rng_state` puts back (checkpoints keep these two keys)."""
    import torch

    st: dict[str, Any] = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda_rng"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the GPU states only where CUDA is available)."""
    import torch

    torch.set_rng_state(st["rng"])
    if "cuda_rng" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda_rng"])
