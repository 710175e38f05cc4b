"""The block writer of ``extract``: buffers one rate group's utterances and writes them in large
contiguous runs, in an order that survives a kill at any moment.

Exact mode writes each utterance at its preallocated offset; adaptive mode packs a block's
utterances from the block's start. Order of writes per flush: frames, then the per-utterance
entries (id, offset, length, error, checksum), then the done flags, so a kill leaves only undone
utterances, which the next run recomputes. A writer thread overlaps disk I/O with compute.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ofactl.errors import StoreError
from ofactl.storage.zarr_store import FeatureGroup, utt_checksum

Item = tuple[float, int, "np.ndarray | None", str]  # (rate, store index, features or None, error)


@dataclass
class GroupState:
    """One rate group being filled: its layout and what this run needs and did."""

    rate: float
    group: FeatureGroup
    utt_ids: list[str]  # store order
    reserve: np.ndarray
    offsets: np.ndarray
    adaptive: bool
    block_utts: int
    needed: set[int] = field(default_factory=set)
    written: int = 0
    skipped: int = 0
    reused: int = 0
    frames: int = 0


class BlockWriter:
    """Buffers one group's utterances; :meth:`flush` writes them (see the module docstring)."""

    def __init__(self, st: GroupState, flush_frames: int) -> None:
        self.st = st
        self.flush_frames = flush_frames
        self.pending: dict[int, tuple[np.ndarray | None, str]] = {}
        self.pending_frames = 0
        self.block = -1
        self.cursor = 0  # adaptive: next free frame in the current block

    def add(self, i: int, feats: np.ndarray | None, error: str) -> None:
        """Queue utterance ``i`` (its frames, or None with an error); flush when enough is buffered."""
        b = i // self.st.block_utts
        if b != self.block:
            self.flush()
            self.block = b
            self.cursor = int(self.st.offsets[b * self.st.block_utts])
        self.pending[i] = (feats, error)
        self.pending_frames += 0 if feats is None else len(feats)
        if self.pending_frames >= self.flush_frames:
            self.flush()

    def flush(self) -> None:
        """Write the buffered utterances: frames by whole chunks, then lengths, checksums and done flags."""
        if not self.pending:
            return
        idx = sorted(self.pending)
        offs = self._place(idx)
        self._write_frames(idx, offs)
        self._write_entries(idx, offs)
        self.pending.clear()
        self.pending_frames = 0

    def _place(self, idx: list[int]) -> dict[int, int]:
        st, offs = self.st, {}
        for i in idx:
            feats, _ = self.pending[i]
            n = 0 if feats is None else len(feats)
            if st.adaptive:
                offs[i] = self.cursor
                self.cursor += n
            else:
                offs[i] = int(st.offsets[i])
                if n > st.reserve[i]:
                    raise StoreError(f"internal: utterance {i} gave {n} frames, {st.reserve[i]} reserved")
        return offs

    def _write_frames(self, idx: list[int], offs: dict[int, int]) -> None:
        """Utterances adjacent on disk are merged into one write."""
        run: list[np.ndarray] = []
        run_start = run_end = 0
        for i in idx:
            feats = self.pending[i][0]
            if feats is None or not len(feats):
                continue
            if run and offs[i] == run_end:
                run.append(feats)
            else:
                if run:
                    self.st.group.write_frames(run_start, np.concatenate(run) if len(run) > 1 else run[0])
                run, run_start = [feats], offs[i]
            run_end = offs[i] + len(feats)
        if run:
            self.st.group.write_frames(run_start, np.concatenate(run) if len(run) > 1 else run[0])

    def _write_entries(self, idx: list[int], offs: dict[int, int]) -> None:
        """Per-utterance entries of the block range [lo, hi), done flags last (one owner each)."""
        st, g = self.st, self.st.group
        lo, hi = idx[0], idx[-1] + 1
        cur = g.read_utt_arrays(lo, hi)
        err = [str(x) for x in cur["error"]]
        for i in idx:
            feats, e = self.pending[i]
            n = 0 if feats is None else len(feats)
            cur["lengths"][i - lo] = n
            cur["offsets"][i - lo] = offs[i]
            cur["checksum"][i - lo] = utt_checksum(st.utt_ids[i], e, feats)
            cur["done"][i - lo] = True
            err[i - lo] = e
            if e:
                st.skipped += 1
            else:
                st.written += 1
                st.frames += n
        g.write_utt_arrays(lo, hi, utt_id=st.utt_ids[lo:hi], lengths=cur["lengths"], offsets=cur["offsets"],
                           error=err, checksum=cur["checksum"], done=cur["done"])


class WriterThread(threading.Thread):
    """Consumes lists of :data:`Item`; disk I/O overlaps compute. Errors reach the caller on
    the next :meth:`put` or on :meth:`close`."""

    def __init__(self, states: dict[float, GroupState], flush_frames: int) -> None:
        super().__init__(daemon=True, name="ofactl-writer")
        self.q: queue.Queue[Any] = queue.Queue(maxsize=8)
        self.writers = {r: BlockWriter(st, flush_frames) for r, st in states.items()}
        self.error: BaseException | None = None

    def run(self) -> None:
        """Thread body: write every item put, until the end marker; keep the first error for close()."""
        while True:
            item = self.q.get()
            try:
                if item is None:
                    if self.error is None:
                        for w in self.writers.values():
                            w.flush()
                elif self.error is None:
                    for rate, i, feats, err in item:
                        self.writers[rate].add(i, feats, err)
            except BaseException as e:
                self.error = e
            finally:
                self.q.task_done()
            if item is None:
                return

    def put(self, items: list[Item]) -> None:
        """Hand a list of items to the thread (raises the thread's error, if it failed)."""
        if self.error is not None:
            raise self.error
        self.q.put(items)

    def close(self) -> None:
        """Flush every group, stop the thread and raise any error it met."""
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error
