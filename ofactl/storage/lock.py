"""Writer locks for store groups: one exclusive writer, or one process per ``--shard i/N``.

Lock files live beside the store (``feats.zarr.locks/rate=0.500.lock`` for a plain writer,
``rate=0.500.shard-1-of-4.lock`` for a shard) so that the Zarr hierarchy holds nothing but Zarr.

The protocol, the same for both kinds: create your own lock file exclusively (``O_EXCL``), then
look for locks of the other kind, and back off (removing your own) if a live one is there. Two
writers that start together both create before they look, so at least one of them sees the
other: never do two get through (both may back off, and the user reruns). A lock records pid
and host; one left by a dead process on this host is taken over, by renaming it aside first so
that two takers cannot both remove a fresh lock (:class:`ofactl.pidlock.PidLock`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ofactl.atomic import make_dir
from ofactl.errors import StoreError
from ofactl.pidlock import PidLock, live_holder
from ofactl.progress import Progress


class GroupLock:
    """Context manager holding one group's lock for the duration of a write."""

    def __init__(self, store: Path, group: str, shard: tuple[int, int] | None, progress: Progress) -> None:
        self.dir = Path(str(store) + ".locks")
        self.group = group
        self.shard = shard
        name = f"{group}.lock" if shard is None else f"{group}.shard-{shard[0]}-of-{shard[1]}.lock"
        self.lock = PidLock(self.dir / name, progress, f"extract {group}")

    @property
    def path(self) -> Path:
        """This writer's lock file."""
        return self.lock.path

    def _others(self) -> list[Path]:
        if self.shard is not None:
            return [self.dir / f"{self.group}.lock"]
        return sorted(self.dir.glob(f"{self.group}.shard-*.lock"))

    def _refuse(self, path: Path, info: dict[str, Any]) -> StoreError:
        return StoreError(
            f"{self.group} is being written by process {info.get('pid')} on {info.get('host')} "
            f"(lock {path}); use --shard i/N for parallel writers, or remove the lock if that process is gone")

    def __enter__(self) -> GroupLock:
        make_dir(self.dir, StoreError)
        holder = self.lock.acquire()  # first our own lock ...
        if holder is not None:
            raise self._refuse(self.path, holder)
        for other in self._others():  # ... then theirs: of two simultaneous writers one sees the other
            info = self.lock.live(other)
            if info is not None:
                self.release()
                raise self._refuse(other, info)
        return self

    def release(self) -> None:
        """Remove our lock file (and the lock folder when it is empty)."""
        if self.lock.held:
            self.lock.release()
            with contextlib.suppress(OSError):
                self.dir.rmdir()  # only when empty

    def __exit__(self, *exc: object) -> None:
        self.release()


def group_writers(store: Path, group: str) -> list[str]:
    """Who is writing ``group`` of ``store`` now, from the live locks ("process 12 on host", or
    "shard 1/4, process 12 on host"); empty when nothing holds it (a stale lock counts for nothing)."""
    locks = Path(str(store) + ".locks")
    plain = locks / f"{group}.lock"
    found = []
    for lock in [plain, *sorted(locks.glob(f"{group}.shard-*.lock"))]:
        if (info := live_holder(lock)) is not None:
            shard = "" if lock == plain else lock.name[len(f"{group}.shard-"):-len(".lock")].replace("-of-", "/")
            found.append(f"{'shard ' + shard + ', ' if shard else ''}process {info.get('pid')} on {info.get('host')}")
    return found
