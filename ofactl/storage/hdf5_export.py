"""Export a Zarr feature store to one HDF5 file with the same layout (the only h5py import).

``/rate=0.500/{feats, offsets, lengths, utt_id, done, error}`` with the group attributes;
attribute values that HDF5 cannot hold natively (dicts, lists of strings) are stored as JSON
strings and listed in the ``json_attrs`` attribute.
"""

from __future__ import annotations

import gc
import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ofactl.atomic import atomic_path
from ofactl.errors import StoreError
from ofactl.storage.zarr_store import open_store

try:
    import h5py
except ImportError:  # pragma: no cover - a declared dependency
    raise StoreError("h5py is not installed: pip install h5py") from None


def _put_attrs(obj: Any, attrs: dict[str, Any]) -> None:
    as_json = []
    for k, v in attrs.items():
        numbers = isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v)
        if isinstance(v, (dict, list, tuple)) and not numbers:
            obj.attrs[k] = json.dumps(v)
            as_json.append(k)
        elif v is None:
            obj.attrs[k] = json.dumps(None)
            as_json.append(k)
        else:
            obj.attrs[k] = v
    obj.attrs["json_attrs"] = json.dumps(as_json)


def _get_attrs(obj: Any) -> dict[str, Any]:
    as_json = set(json.loads(obj.attrs.get("json_attrs", "[]")))
    out = {}
    for k, v in obj.attrs.items():
        if k == "json_attrs":
            continue
        out[k] = json.loads(v) if k in as_json else (v.tolist() if isinstance(v, np.ndarray) else v)
    return out


def export_hdf5(store_path: Path, h5_path: Path, rates: list[float] | None = None) -> Path:
    """Copy complete rate groups of a Zarr store into ``h5_path`` (written to a temp name first),
    once the disk is known to hold it."""
    store = open_store(store_path)
    names = store.group_names() if rates is None else [f"rate={r:.3f}" for r in rates]
    groups = [store.group(name) for name in names]
    for name, g in zip(names, groups):
        if not g.complete:
            raise StoreError(f"{store_path}/{name} is not complete; finish the extraction before exporting")
    _check_disk(store_path, h5_path, groups)
    with _quiet_h5py_cleanup(), atomic_path(h5_path, StoreError) as tmp, h5py.File(tmp, "w") as f:
        _put_attrs(f, store.attrs)
        for name, g in zip(names, groups):
            _copy_group(f.create_group(name), g)
    return Path(h5_path)


def _check_disk(store_path: Path, h5_path: Path, groups: list[Any]) -> None:
    """Refuse before writing when the HDF5 file cannot fit: its feature chunks are stored whole,
    as the Zarr store's are, plus the per-utterance arrays."""
    from ofactl.storage.zarr_store import disk_free

    need = 0
    for g in groups:
        shape, dtype, chunks = g.feats_layout()
        need += hdf5_bytes(shape[0], chunks[0], shape[1] * shape[2] * dtype.itemsize, len(g.utt_ids))
    free = disk_free(h5_path.parent)
    if need > free:
        raise StoreError(f"{h5_path}: the HDF5 export needs about {need / 1e6:,.2f} MB, but only {free / 1e6:,.2f} MB "
                         f"are free on that disk; {store_path} is kept: free space and rerun the same command to "
                         "export it (nothing is extracted again)")


def hdf5_bytes(frames: int, chunk_frames: int, frame_bytes: int, n_utts: int) -> int:
    """Bytes the HDF5 copy of one rate group takes: ``frames`` reserved frames of ``frame_bytes``
    each in whole chunks of ``chunk_frames``, the per-utterance arrays, and the headers."""
    chunk = max(1, min(chunk_frames, frames))
    return -(-frames // chunk) * chunk * frame_bytes + 64 * n_utts + 65536


@contextmanager
def _quiet_h5py_cleanup() -> Iterator[None]:
    """After a failed write, h5py's handles report the same failure again as they are freed, as
    tracebacks (through both hooks: "Exception ignored in ObjectID.__dealloc__"); the write's own
    error says it once."""
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def from_h5py(tb: Any) -> bool:
        return any("h5py" in Path(frame.filename).parts for frame in traceback.extract_tb(tb))

    def quiet_unraisable(u: Any) -> None:
        if not (from_h5py(u.exc_traceback) or "h5py" in repr(u.object)):
            unraisable(u)

    def quiet_excepthook(kind: Any, value: Any, tb: Any) -> None:
        if not from_h5py(tb):
            excepthook(kind, value, tb)

    sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
    try:
        yield
    finally:
        gc.collect()  # free the handles while the hooks still listen
        sys.unraisablehook, sys.excepthook = unraisable, excepthook


def _copy_group(hg: Any, g: Any) -> None:
    """One rate group's arrays and attributes into the HDF5 group ``hg``, frames block by block."""
    shape, dtype, chunks = g.feats_layout()
    d = hg.create_dataset("feats", shape=shape, dtype=dtype, chunks=tuple(min(c, s) for c, s in zip(chunks, shape)))
    for lo, block in g.frame_blocks(chunks[0] * 16):
        d[lo : lo + len(block)] = block
    d.attrs["dimension_names"] = json.dumps(["frame", "layer", "dim"])
    for arr, values in (("offsets", g.offsets), ("lengths", g.lengths), ("done", g.done)):
        hg.create_dataset(arr, data=np.asarray(values))
    str_dt = h5py.string_dtype("utf-8")
    for arr, strings in (("utt_id", g.utt_ids), ("error", g.error_strings())):
        hg.create_dataset(arr, data=np.asarray(strings, dtype=object), dtype=str_dt)
    _put_attrs(hg, g.attrs)


def read_hdf5_group(h5_path: Path, rate: float) -> dict[str, Any]:
    """Arrays and attributes of one group of an exported file (for tests and quick looks)."""
    with h5py.File(h5_path, "r") as f:
        g = f[f"rate={rate:.3f}"]
        out = {k: g[k][()] for k in ("feats", "offsets", "lengths", "done")}
        out["utt_id"] = [x.decode() if isinstance(x, bytes) else str(x) for x in g["utt_id"][()]]
        out["attrs"] = _get_attrs(g)
        return out


def describe_hdf5(path: Path) -> dict[str, Any]:
    """What ``ofactl info out.h5`` prints: each rate group's utterances, frames, shape and attributes."""
    if not h5py.is_hdf5(path):
        from ofactl.errors import StoreError

        raise StoreError(f"{path}: not an HDF5 file, nor a feature store folder")
    with h5py.File(path, "r") as f:
        groups = []
        for name in sorted(k for k in f if k.startswith("rate=")):
            a = _get_attrs(f[name])
            groups.append({"group": name, "utterances": int(f[name]["utt_id"].shape[0]),
                           "frames": int(np.asarray(f[name]["lengths"]).sum()),
                           "achieved_rate": a.get("achieved_rate"), "layers": a.get("layers")})
    return {"path": str(path), "kind": "hdf5 feature export", "size_mb": round(Path(path).stat().st_size / 1e6, 2),
            "groups": groups}
