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
CHECKSUM = "crc32(id, error, length, feature bytes)"  # group attr "checksum"; absent in older groups
UTT_ARRAYS = ("offsets", "lengths", "done", "utt_id", "error", "checksum")
_STAGING = ".creating-"  # prefix of a group being created; renamed into place when complete


def utt_checksum(utt_id: str, error: str, feats: np.ndarray | None) -> int:
    """CRC-32 of one utterance's record: its id, error message, frame count and the feature
    bytes as stored. A lost or altered chunk of any of them changes it."""
    import struct
    import zlib

    n = 0 if feats is None else len(feats)
    crc = zlib.crc32(utt_id.encode() + b"\0" + error.encode() + b"\0" + struct.pack("<q", n))
    if feats is not None and n:
        crc = zlib.crc32(np.ascontiguousarray(feats).view(np.uint8), crc)  # type: ignore[arg-type]  # an ndarray is a buffer
    return crc


@dataclass(frozen=True)
class Damage:
    """One utterance whose stored record does not match its checksum."""

    index: int
    utt_id: str
    reason: str


def rate_key(rate: float) -> str:
    """Store group name for a rate: 0.5 -> ``rate=0.500``."""
    return f"rate={rate:.3f}"


def now() -> str:
    """The current UTC time, ISO 8601 (group attributes)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


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
        """Number of utterances."""
        return len(self.utt_ids)

    @property
    def n_blocks(self) -> int:
        """Number of write blocks."""
        return (self.n_utts + self.block_utts - 1) // self.block_utts

    def block_range(self, b: int) -> tuple[int, int]:
        """Utterance index range [lo, hi) of block ``b``."""
        return b * self.block_utts, min(self.n_utts, (b + 1) * self.block_utts)

    def chunks_holding(self, which: np.ndarray) -> int:
        """How many ``feats`` chunks hold frames of the utterances ``which`` (bool [n]) selects:
        what writing them takes on disk when chunks are stored whole, a part-filled one included."""
        sel = np.asarray(which, dtype=bool) & (self.reserve > 0)
        if not sel.any():
            return 0
        first = self.offsets[sel] // self.chunk_frames
        last = (self.offsets[sel] + self.reserve[sel] - 1) // self.chunk_frames
        edges = np.zeros(int(last.max()) + 2, dtype=np.int64)  # +1 where a span starts, -1 after it ends
        np.add.at(edges, first, 1)
        np.add.at(edges, last + 1, -1)
        return int((np.cumsum(edges)[:-1] > 0).sum())

    @property
    def total_frames(self) -> int:
        """Frames reserved for the whole group."""
        if not self.n_utts:
            return 0
        last = self.n_utts - 1
        return int(self.offsets[last] + self.reserve[last])


def make_layout(utt_ids: Sequence[str], reserve: Sequence[int] | np.ndarray, block_utts: int = 256,
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
        """The group's attributes (rate, checkpoint, corpus fingerprint, layers ...)."""
        return dict(self._g.attrs.asdict())

    @property
    def rate(self) -> float:
        """The group's rate."""
        return float(self.attrs["rate"])

    @property
    def name(self) -> str:
        """The group's name, e.g. ``rate=0.500``."""
        return str(self._g.basename)

    def _arr(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.asarray(self._g[name][:])
        return self._cache[name]

    def refresh(self) -> None:
        """Forget cached index arrays (after another process wrote)."""
        self._cache.clear()

    @property
    def utt_ids(self) -> list[str]:
        """Utterance ids in store order."""
        if "_ids" not in self._cache:
            self._cache["_ids"] = [str(x) for x in self._arr("utt_id")]  # type: ignore[assignment]
        return self._cache["_ids"]  # type: ignore[return-value]

    @property
    def offsets(self) -> np.ndarray:
        """Start frame of each utterance in ``feats``."""
        return self._arr("offsets")

    @property
    def lengths(self) -> np.ndarray:
        """Frames written for each utterance (0 until done)."""
        return self._arr("lengths")

    @property
    def done(self) -> np.ndarray:
        """Per utterance: 1 once its frames (or its error) are written."""
        return self._arr("done")

    @property
    def errors(self) -> dict[str, str]:
        """Skipped utterances and why, by id."""
        err = self._arr("error")
        return {u: str(e) for u, e in zip(self.utt_ids, err) if e}

    @property
    def complete(self) -> bool:
        """True when every utterance is done."""
        return bool(self.attrs.get("complete", False))

    def __len__(self) -> int:
        return int(self._g["utt_id"].shape[0])

    def index_of(self, utt_id: str) -> int:
        """Store index of ``utt_id``; KeyError naming the group when absent."""
        if self._index is None:
            self._index = {u: i for i, u in enumerate(self.utt_ids)}
        try:
            return self._index[utt_id]
        except KeyError:
            raise StoreError(f"{self.path}: no utterance '{utt_id}' in {self.name}") from None

    # ---------------------------------------------------------------- reading
    @property
    def has_checksums(self) -> bool:
        """True for groups written with per-utterance checksums."""
        return "checksum" in self.attrs

    def _damaged(self, i: int, reason: str) -> StoreError:
        uid = self.utt_ids[i] if self.utt_ids[i] else f"#{i}"
        return StoreError(f"{self.path}/{self.name}: utterance {uid} is damaged ({reason}); run "
                          f"'ofactl info {self.path} --verify', then rerun extract to restore it")

    def _check(self, i: int, x: np.ndarray) -> np.ndarray:
        if self.has_checksums:
            err = str(self._arr("error")[i])
            if utt_checksum(self.utt_ids[i], err, x) != int(self._arr("checksum")[i]):
                raise self._damaged(i, "checksum mismatch")
        return x

    def _read_frames(self, i: int, o: int, n: int) -> np.ndarray:
        try:
            return np.asarray(self._g["feats"][o : o + n])
        except Exception as e:  # a chunk the codec cannot decode (truncated, overwritten)
            raise self._damaged(i, f"unreadable chunk: {type(e).__name__}") from None

    def _utt_arrays_or_damage(self) -> None:
        try:
            for name in ("utt_id", "offsets", "lengths", "done") + (("error", "checksum") if self.has_checksums else ()):
                self._arr(name)
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"{self.path}/{self.name}: per-utterance arrays are damaged ({type(e).__name__}); "
                             f"run 'ofactl info {self.path} --verify', then rerun extract") from None

    def __getitem__(self, key: str | int) -> np.ndarray:
        """Features of one utterance: (frames, layers, dim), checked against its checksum."""
        self._utt_arrays_or_damage()
        i = self.index_of(key) if isinstance(key, str) else int(key)
        if not self.done[i]:
            raise StoreError(f"{self.path}: utterance {self.utt_ids[i]} in {self.name} is not extracted yet")
        o, n = int(self.offsets[i]), int(self.lengths[i])
        return self._check(i, self._read_frames(i, o, n))

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """(utt_id, features) for every extracted utterance, in store order, read chunk-wise and
        checked against the checksums; a damaged utterance raises :class:`StoreError`."""
        self._utt_arrays_or_damage()
        feats = self._g["feats"]
        ids, offs, lens, done = self.utt_ids, self.offsets, self.lengths, self.done
        step = 4096 * 16
        lo = 0
        buf = np.zeros((0,) + feats.shape[1:], dtype=feats.dtype)
        for i in range(len(ids)):
            if not done[i]:
                continue
            if lens[i] == 0:  # a skipped input, or a lost length: the checksum tells them apart
                self._check(i, np.zeros((0,) + feats.shape[1:], dtype=feats.dtype))
                continue
            o, n = int(offs[i]), int(lens[i])
            if not (lo <= o and o + n <= lo + len(buf)):
                lo = o
                try:
                    buf = np.asarray(feats[o : o + max(n, step)])
                except Exception:  # one bad chunk: read this utterance alone to name it
                    buf = np.zeros((0,) + feats.shape[1:], dtype=feats.dtype)
                    yield ids[i], self._check(i, self._read_frames(i, o, n))
                    continue
            yield ids[i], self._check(i, buf[o - lo : o - lo + n])

    def load_all(self) -> dict[str, np.ndarray]:
        """Every extracted utterance's features by id (checked), in memory."""
        return dict(iter(self))

    @property
    def frames(self) -> int:
        """Frames actually written (sum of lengths)."""
        return int(self.lengths[self.done].sum())

    # ---------------------------------------------------------------- writing
    def feats_layout(self) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...]]:
        """Shape, dtype and chunk shape of the ``feats`` array (frames, layers, dim)."""
        a = self._g["feats"]
        return tuple(a.shape), np.dtype(a.dtype), tuple(a.chunks)

    def frame_blocks(self, frames_per_block: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first frame, frames) of the whole ``feats`` array in blocks of ``frames_per_block``
        (a copy without holding it all in memory; padding frames included)."""
        a = self._g["feats"]
        for lo in range(0, a.shape[0], frames_per_block):
            yield lo, np.asarray(a[lo : lo + frames_per_block])

    def error_strings(self) -> list[str]:
        """Per utterance in store order: its error message, or "" (not skipped)."""
        return [str(x) for x in self._arr("error")]

    def write_frames(self, start: int, data: np.ndarray) -> None:
        """Write (n, L, D) frames at frame offset ``start``."""
        self._g["feats"][start : start + len(data)] = data

    def read_utt_arrays(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Per-utterance entries [lo, hi) as stored (the writer updates a block's range)."""
        names = UTT_ARRAYS if "checksum" in self._g.array_keys() else UTT_ARRAYS[:-1]
        return {k: np.asarray(self._g[k][lo:hi]) for k in names}

    def write_utt_arrays(self, lo: int, hi: int, *, done: np.ndarray | None = None,
                         lengths: np.ndarray | None = None, offsets: np.ndarray | None = None,
                         error: Sequence[str] | None = None, utt_id: Sequence[str] | None = None,
                         checksum: np.ndarray | None = None) -> None:
        """Write per-utterance entries [lo, hi) (one block's range: a single owner)."""
        if utt_id is not None:
            self._g["utt_id"][lo:hi] = np.asarray(list(utt_id), dtype=object)
        if offsets is not None:
            self._g["offsets"][lo:hi] = offsets
        if lengths is not None:
            self._g["lengths"][lo:hi] = lengths
        if error is not None:
            self._g["error"][lo:hi] = np.asarray(list(error), dtype=object)
        if checksum is not None:
            self._g["checksum"][lo:hi] = checksum
        if done is not None:  # last: an utterance is done only after its data is written
            self._g["done"][lo:hi] = done
        self._cache.clear()
        self._index = None

    # ---------------------------------------------------------------- verification
    def verify(self) -> list[Damage]:
        """Check every done utterance against its checksum, reading the whole group once.

        Returns the damaged utterances. Use :meth:`repair` to mark them not done so that the
        next extract rewrites exactly those.
        """
        if not self.has_checksums:
            raise StoreError(f"{self.path}/{self.name} has no checksums (made by an older ofactl); "
                             "re-extract it with --overwrite to get them")
        bu = int(self.attrs["block_utts"])
        n = len(self)
        damaged: list[Damage] = []
        for lo in range(0, n, bu):
            hi = min(n, lo + bu)
            try:
                arr = self.read_utt_arrays(lo, hi)
            except Exception as e:
                damaged += [Damage(i, f"#{i}", f"per-utterance arrays unreadable ({type(e).__name__})")
                            for i in range(lo, hi)]
                continue
            damaged += self._verify_block(lo, hi, arr)
        return damaged

    def _verify_block(self, lo: int, hi: int, arr: dict[str, np.ndarray]) -> list[Damage]:
        """One block: its frames read in one go (a block is contiguous on disk), each utterance
        checked; a read that fails falls back to one read per utterance to name the damaged."""
        feats = self._g["feats"]
        done = [j for j in range(hi - lo) if arr["done"][j]]
        spans = [(int(arr["offsets"][j]), int(arr["lengths"][j])) for j in done if arr["lengths"][j] > 0]
        start = min((o for o, _ in spans), default=0)
        end = min(feats.shape[0], max((o + n for o, n in spans), default=0))
        try:
            buf: np.ndarray | None = np.asarray(feats[start:end]) if end > start else None
        except Exception:
            buf = None
        out = []
        for j in done:
            i, uid, err = lo + j, str(arr["utt_id"][j]), str(arr["error"][j])
            o, m = int(arr["offsets"][j]), int(arr["lengths"][j])
            if not m:
                x = None
            elif buf is not None and start <= o and o + m <= end:
                x = buf[o - start : o - start + m]
            else:
                try:
                    x = np.asarray(feats[o : o + m])
                except Exception as e:
                    out.append(Damage(i, uid or f"#{i}", f"unreadable chunk ({type(e).__name__})"))
                    continue
            if utt_checksum(uid, err, x) != int(arr["checksum"][j]):
                out.append(Damage(i, uid or f"#{i}", "checksum mismatch"))
        return out

    def repair(self, damaged: Sequence[Damage]) -> None:
        """Mark ``damaged`` utterances not done (and the group incomplete); chunks that no longer
        decode are reset so they can be rewritten. Intact utterances are left as they are."""
        if not damaged:
            return
        bu, cf = int(self.attrs["block_utts"]), int(self.attrs["chunk_frames"])
        bad = {d.index for d in damaged}
        feats = self._g["feats"]
        # reset undecodable frame chunks (a partial write would have to decode them first)
        for c in range(0, feats.shape[0], cf):
            try:
                feats[c : c + 1]  # decodes the whole chunk
            except Exception:
                feats[c : min(c + cf, feats.shape[0])] = 0
        for lo in range(0, len(self), bu):
            hi = min(len(self), lo + bu)
            idx = [i for i in range(lo, hi) if i in bad]
            if not idx:
                continue
            try:
                done = np.asarray(self._g["done"][lo:hi])
            except Exception:
                done = np.zeros(hi - lo, dtype=bool)
            done[[i - lo for i in idx]] = False
            for name in ("utt_id", "offsets", "lengths", "error", "checksum"):
                try:
                    self._g[name][lo:hi]
                except Exception:  # undecodable: reset the block's chunk; extract rewrites it
                    self._g[name][lo:hi] = self._g[name].fill_value
            self._g["done"][lo:hi] = done
        self.update_attrs(complete=False)
        self._cache.clear()
        self._index = None

    def update_attrs(self, **kw: Any) -> None:
        """Merge ``kw`` into the group's attributes."""
        self._g.attrs.update({**kw, "updated": now()})


def export_store(out: Path) -> Path:
    """The Zarr store an HDF5 export ``out`` is extracted into and kept beside: ``out.zarr``."""
    return Path(str(out) + ".zarr")


def _check_new_store_path(path: Path) -> None:
    """A store is made only in a new or empty folder: never over a file, never among other files."""
    if path.exists() and not path.is_dir():
        beside = export_store(path)  # where `extract --out x.h5` keeps the store it exports
        hint = f"the store beside it is {beside}" if (beside / "zarr.json").is_file() else "choose another path for the store"
        raise StoreError(f"{path} is a file, not a feature store folder; {hint}")
    if path.is_dir() and not (path / "zarr.json").is_file() and any(path.iterdir()):
        raise StoreError(f"{path} is a folder of other files, not a feature store (no zarr.json); "
                         "choose a new or empty folder for the store")


class FeatureStore:
    """A Zarr v3 store holding one group per rate."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        self.path = Path(path)
        if mode == "r" and not (self.path / "zarr.json").is_file():
            raise StoreError(f"{self.path}: not a feature store (no zarr.json); create one with 'ofactl extract'")
        if mode != "r":
            _check_new_store_path(self.path)
        self._root = self._open(mode)
        if mode != "r" and "format" not in self._root.attrs:
            self._root.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION})
        fmt = self._root.attrs.get("format")
        if fmt not in (None, FORMAT) or self._root.attrs.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format {fmt} v{self._root.attrs.get('format_version')}, "
                             f"this ofactl reads {FORMAT} v{FORMAT_VERSION}")

    def _open(self, mode: str) -> Any:
        import time

        for attempt in range(20):
            try:
                return zarr.open_group(str(self.path), mode="r" if mode == "r" else "a")
            except Exception as e:
                # two writers creating a new store at once: the loser finds the root just made
                if mode != "r" and "exists" in str(e) and attempt < 19:
                    time.sleep(0.05)
                    continue
                raise StoreError(f"{self.path}: cannot open store ({e})") from None
        raise AssertionError("unreachable")

    def group_names(self) -> list[str]:
        """Names of the complete-looking rate groups, sorted."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sorted(k for k in self._root.group_keys() if k.startswith("rate="))

    @property
    def rates(self) -> list[float]:
        """The rates of the store's groups."""
        return sorted((float(n.split("=", 1)[1]) for n in self.group_names()), reverse=True)

    def has(self, rate: float) -> bool:
        """True when a group for ``rate`` exists."""
        return rate_key(rate) in self.group_names()

    @property
    def attrs(self) -> dict[str, Any]:
        """The store's root attributes."""
        return dict(self._root.attrs.asdict())

    def group(self, rate: float | str) -> FeatureGroup:
        """The group of ``rate`` (a number, or a name like ``rate=0.500``); KeyError listing the rates."""
        name = rate if isinstance(rate, str) else rate_key(rate)
        if name not in self.group_names():
            have = ", ".join(self.group_names()) or "none"
            raise StoreError(f"{self.path}: no group {name} (groups: {have})")
        if not self.is_complete_group(name):
            raise StoreError(f"{self.path}/{name} was never fully created (its process died while creating "
                             "it; it holds no features); the next 'ofactl extract' rebuilds it")
        return FeatureGroup(self._root[name], self.path)

    def is_complete_group(self, name: str) -> bool:
        """False for a group whose creation never finished (attributes or arrays missing), as
        an ofactl before atomic creation could leave behind."""
        try:
            g = self._root[name]
            keys = set(g.array_keys())
            return "student_sha256" in g.attrs and {"feats", "offsets", "lengths", "done", "utt_id", "error"} <= keys
        except Exception:
            return False

    def delete_group(self, rate: float) -> None:
        """Remove a group: renamed aside first, so a kill midway leaves no half-deleted group."""
        name = rate_key(rate)
        if name in self.group_names():
            trash = self.path / f"{_STAGING}{name}-deleting-{os.getpid()}"
            os.rename(self.path / name, trash)
            shutil.rmtree(trash)

    def create_group(self, rate: float, layout: Layout, n_layers: int, dim: int, dtype: str,
                     attrs: dict[str, Any], compress: str = "none") -> FeatureGroup:
        """Create a rate group with preallocated arrays (the creating process only).

        The group is built under a hidden staging name and renamed into place once its arrays
        and attributes are complete, so a reader (a rerun, a ``--shard`` peer, ``info``) never
        sees a half-created group; a staging folder left by a killed process is removed here.
        """
        name = rate_key(rate)
        if name in self.group_names():
            raise StoreError(f"{self.path}: group {name} exists")
        for old in self.path.glob(f"{_STAGING}{name}-*"):
            shutil.rmtree(old, ignore_errors=True)
        staging = f"{_STAGING}{name}-{os.getpid()}"
        compressors: Any = None
        if compress == "zstd":
            from zarr.codecs import ZstdCodec

            compressors = ZstdCodec(level=1)
        g = self._root.create_group(staging)
        n, bu = layout.n_utts, layout.block_utts
        g.create_array("feats", shape=(max(layout.total_frames, 1), n_layers, dim),
                       chunks=(layout.chunk_frames, n_layers, dim), dtype=dtype, fill_value=0,
                       compressors=compressors, dimension_names=("frame", "layer", "dim"))
        for arr, dt, fill in (("offsets", "int64", 0), ("lengths", "int32", 0), ("done", "bool", False),
                              ("checksum", "uint32", 0)):
            g.create_array(arr, shape=(n,), chunks=(bu,), dtype=dt, fill_value=fill, dimension_names=("utt",))
        for arr in ("utt_id", "error"):
            g.create_array(arr, shape=(n,), chunks=(bu,), dtype=str, fill_value="", dimension_names=("utt",))
        g["utt_id"][:] = np.asarray(layout.utt_ids, dtype=object)
        g["offsets"][:] = layout.offsets
        g.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "ofactl_version": __version__,
            "rate": float(rate), "block_utts": bu, "chunk_frames": layout.chunk_frames,
            "reserved": [int(x) for x in layout.reserve], "created": now(), "updated": now(),
            "complete": False, "checksum": CHECKSUM, **attrs,
        })
        os.rename(self.path / staging, self.path / name)  # atomic: the group appears whole
        return FeatureGroup(self._root[name], self.path)

    def size_bytes(self, rate: float | None = None) -> int:
        """Bytes on disk of one rate's group, or of the whole store."""
        root = self.path if rate is None else self.path / rate_key(rate)
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def open_store(path: str | Path) -> FeatureStore:
    """Open a feature store for reading: ``open_store(p).group(0.5)["utt-id"]``."""
    return FeatureStore(path, "r")


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    p = Path(path)
    while not p.exists():
        p = p.parent
    return p


def disk_free(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing(path)).free


def same_disk(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` (or their nearest existing parents) are on one file system."""
    return _existing(a).stat().st_dev == _existing(b).stat().st_dev
