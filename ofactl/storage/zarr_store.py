"""Zarr v3 feature stores: one group per rate (the only module that imports zarr).

Layout of ``feats.zarr/rate=0.500/`` (format v1, see docs/store-format.md):

- ``feats``   float16|float32 [frames, layers, dim], chunks (chunk_frames, layers, dim)
- ``offsets`` int64 [utts], ``lengths`` int32 [utts], ``utt_id`` str [utts]
- ``done``    bool [utts], ``error`` str [utts] ("" unless the input was skipped)
- attrs: format, rates, frame period, layers, checkpoint sha256, corpus fingerprint, ...

Utterances are stored in processing order (sorted by length) in *blocks* of ``block_utts``;
each block's frames start on a chunk boundary. A block is written by exactly one process, so
``--shard i/N`` writers never touch the same chunk, and the per-utterance arrays are chunked
by block for the same reason. Frames are preallocated from audio lengths (exact mode); in
content-adaptive mode a block reserves the rate-1 length and packs its utterances at its start.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ofactl import __version__
from ofactl.errors import StoreError

try:
    import zarr
except ImportError:  # pragma: no cover - a declared dependency
    raise StoreError("zarr is not installed: pip install 'zarr>=3.1,<4'") from None

FORMAT = "ofactl-features"
FORMAT_VERSION = 1


def rate_key(rate: float) -> str:
    return f"rate={rate:.3f}"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Layout:
    """Where every utterance lives. Arrays are in store order (index = position in the store)."""

    utt_ids: list[str]
    reserve: np.ndarray  # int64 [n]: frames reserved per utterance
    offsets: np.ndarray  # int64 [n]: first frame of each utterance
    block_utts: int
    chunk_frames: int

    @property
    def n_utts(self) -> int:
        return len(self.utt_ids)

    @property
    def n_blocks(self) -> int:
        return (self.n_utts + self.block_utts - 1) // self.block_utts

    def block_range(self, b: int) -> tuple[int, int]:
        return b * self.block_utts, min(self.n_utts, (b + 1) * self.block_utts)

    @property
    def total_frames(self) -> int:
        if not self.n_utts:
            return 0
        last = self.n_utts - 1
        return int(self.offsets[last] + self.reserve[last])


def make_layout(utt_ids: Sequence[str], reserve: Sequence[int], block_utts: int = 256,
                chunk_frames: int = 1024) -> Layout:
    """Offsets with every block starting on a chunk boundary."""
    res = np.asarray(reserve, dtype=np.int64)
    offsets = np.zeros(len(res), dtype=np.int64)
    pos = 0
    for start in range(0, len(res), block_utts):
        pos = -(-pos // chunk_frames) * chunk_frames  # round up to a chunk boundary
        block = res[start : start + block_utts]
        offsets[start : start + len(block)] = pos + np.cumsum(block) - block
        pos += int(block.sum())
    return Layout(list(utt_ids), res, offsets, block_utts, chunk_frames)


class FeatureGroup:
    """Reader (and, for ``extract``, writer) of one rate group."""

    def __init__(self, group: Any, path: Path) -> None:
        self._g = group
        self.path = path
        self._index: dict[str, int] | None = None
        self._cache: dict[str, np.ndarray] = {}

    # ---------------------------------------------------------------- metadata
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._g.attrs.asdict())

    @property
    def rate(self) -> float:
        return float(self.attrs["rate"])

    @property
    def name(self) -> str:
        return str(self._g.basename)

    def _arr(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.asarray(self._g[name][:])
        return self._cache[name]

    def refresh(self) -> None:
        self._cache.clear()

    @property
    def utt_ids(self) -> list[str]:
        return [str(x) for x in self._arr("utt_id")]

    @property
    def offsets(self) -> np.ndarray:
        return self._arr("offsets")

    @property
    def lengths(self) -> np.ndarray:
        return self._arr("lengths")

    @property
    def done(self) -> np.ndarray:
        return self._arr("done")

    @property
    def errors(self) -> dict[str, str]:
        err = self._arr("error")
        return {u: str(e) for u, e in zip(self.utt_ids, err) if e}

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    def __len__(self) -> int:
        return int(self._g["utt_id"].shape[0])

    def index_of(self, utt_id: str) -> int:
        if self._index is None:
            self._index = {u: i for i, u in enumerate(self.utt_ids)}
        try:
            return self._index[utt_id]
        except KeyError:
            raise StoreError(f"{self.path}: no utterance '{utt_id}' in {self.name}") from None

    # ---------------------------------------------------------------- reading
    def __getitem__(self, key: str | int) -> np.ndarray:
        """Features of one utterance: (frames, layers, dim)."""
        i = self.index_of(key) if isinstance(key, str) else int(key)
        if not self.done[i]:
            raise StoreError(f"{self.path}: utterance {self.utt_ids[i]} in {self.name} is not extracted yet")
        o, n = int(self.offsets[i]), int(self.lengths[i])
        return np.asarray(self._g["feats"][o : o + n])

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """(utt_id, features) for every extracted utterance, in store order, read chunk-wise."""
        feats = self._g["feats"]
        ids, offs, lens, done = self.utt_ids, self.offsets, self.lengths, self.done
        step = 4096 * 16
        lo = 0
        buf = np.zeros((0,) + feats.shape[1:], dtype=feats.dtype)
        for i in range(len(ids)):
            if not done[i] or lens[i] == 0:
                continue
            o, n = int(offs[i]), int(lens[i])
            if not (lo <= o and o + n <= lo + len(buf)):
                lo = o
                buf = np.asarray(feats[o : o + max(n, step)])
            yield ids[i], buf[o - lo : o - lo + n]

    def load_all(self) -> dict[str, np.ndarray]:
        return dict(iter(self))

    @property
    def frames(self) -> int:
        return int(self.lengths[self.done].sum())

    # ---------------------------------------------------------------- writing
    def write_frames(self, start: int, data: np.ndarray) -> None:
        self._g["feats"][start : start + len(data)] = data

    def write_utt_arrays(self, lo: int, hi: int, *, done: np.ndarray | None = None,
                         lengths: np.ndarray | None = None, offsets: np.ndarray | None = None,
                         error: Sequence[str] | None = None) -> None:
        """Write per-utterance entries [lo, hi) (one block's range: a single owner)."""
        if offsets is not None:
            self._g["offsets"][lo:hi] = offsets
        if lengths is not None:
            self._g["lengths"][lo:hi] = lengths
        if error is not None:
            self._g["error"][lo:hi] = np.asarray(list(error), dtype=object)
        if done is not None:  # last: an utterance is done only after its data is written
            self._g["done"][lo:hi] = done
        self._cache.clear()

    def update_attrs(self, **kw: Any) -> None:
        self._g.attrs.update({**kw, "updated": now()})


class FeatureStore:
    """A Zarr v3 store holding one group per rate."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        self.path = Path(path)
        if mode == "r" and not (self.path / "zarr.json").is_file():
            raise StoreError(f"{self.path}: not a feature store (no zarr.json); create one with 'ofactl extract'")
        try:
            self._root = zarr.open_group(str(self.path), mode="r" if mode == "r" else "a")
        except Exception as e:
            raise StoreError(f"{self.path}: cannot open store ({e})") from None
        if mode != "r" and "format" not in self._root.attrs:
            self._root.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION})
        fmt = self._root.attrs.get("format")
        if fmt not in (None, FORMAT) or self._root.attrs.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format {fmt} v{self._root.attrs.get('format_version')}, "
                             f"this ofactl reads {FORMAT} v{FORMAT_VERSION}")

    def group_names(self) -> list[str]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sorted(k for k in self._root.group_keys() if k.startswith("rate="))

    @property
    def rates(self) -> list[float]:
        return sorted((float(n.split("=", 1)[1]) for n in self.group_names()), reverse=True)

    def has(self, rate: float) -> bool:
        return rate_key(rate) in self.group_names()

    def group(self, rate: float | str) -> FeatureGroup:
        name = rate if isinstance(rate, str) else rate_key(rate)
        if name not in self.group_names():
            have = ", ".join(self.group_names()) or "none"
            raise StoreError(f"{self.path}: no group {name} (groups: {have})")
        return FeatureGroup(self._root[name], self.path)

    def delete_group(self, rate: float) -> None:
        name = rate_key(rate)
        if name in self.group_names():
            shutil.rmtree(self.path / name)

    def create_group(self, rate: float, layout: Layout, n_layers: int, dim: int, dtype: str,
                     attrs: dict[str, Any], compress: str = "none") -> FeatureGroup:
        """Create a rate group with preallocated arrays (the creating process only)."""
        name = rate_key(rate)
        if name in self.group_names():
            raise StoreError(f"{self.path}: group {name} exists")
        compressors: Any = None
        if compress == "zstd":
            from zarr.codecs import ZstdCodec

            compressors = ZstdCodec(level=1)
        g = self._root.create_group(name)
        n, bu = layout.n_utts, layout.block_utts
        g.create_array("feats", shape=(max(layout.total_frames, 1), n_layers, dim),
                       chunks=(layout.chunk_frames, n_layers, dim), dtype=dtype, fill_value=0,
                       compressors=compressors, dimension_names=("frame", "layer", "dim"))
        for arr, dt, fill in (("offsets", "int64", 0), ("lengths", "int32", 0), ("done", "bool", False)):
            g.create_array(arr, shape=(n,), chunks=(bu,), dtype=dt, fill_value=fill, dimension_names=("utt",))
        for arr in ("utt_id", "error"):
            g.create_array(arr, shape=(n,), chunks=(bu,), dtype=str, fill_value="", dimension_names=("utt",))
        g["utt_id"][:] = np.asarray(layout.utt_ids, dtype=object)
        g["offsets"][:] = layout.offsets
        g.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "ofactl_version": __version__,
            "rate": float(rate), "block_utts": bu, "chunk_frames": layout.chunk_frames,
            "reserved": [int(x) for x in layout.reserve], "created": now(), "updated": now(),
            "complete": False, **attrs,
        })
        return FeatureGroup(g, self.path)

    def size_bytes(self, rate: float | None = None) -> int:
        root = self.path if rate is None else self.path / rate_key(rate)
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def open_store(path: str | Path) -> FeatureStore:
    """Open a feature store for reading: ``open_store(p).group(0.5)["utt-id"]``."""
    return FeatureStore(path, "r")


def disk_free(path: Path) -> int:
    p = Path(path)
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free
