"""Writer locks for store groups: one exclusive writer, or one process per ``--shard i/N``.

Lock files live beside the store (``feats.zarr.locks/rate=0.500.lock`` for a plain writer,
``rate=0.500.shard-1-of-4.lock`` for a shard) so that the Zarr hierarchy holds nothing but Zarr.

The protocol, the same for both kinds: create your own lock file exclusively (``O_EXCL``), then
look for locks of the other kind, and back off (removing your own) if a live one is there. Two
writers that start together both create before they look, so at least one of them sees the
other: never do two get through (both may back off, and the user reruns). A lock records pid
and host; one left by a dead process on this host is taken over, by renaming it aside first so
that two takers cannot both remove a fresh lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ofactl.atomic import make_dir
from ofactl.errors import StoreError
from ofactl.progress import Progress


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A lock is written within microseconds of its creation; one still empty or unreadable after
# this long was left by a writer killed in between, and is stale.
UNREADABLE_STALE_S = 60.0
UNREADABLE = {"pid": -1, "host": "?"}  # what a lock being written, or garbage, reads as: held


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return dict(UNREADABLE)


def _unreadable_and_old(path: Path, info: dict[str, Any]) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    return info == UNREADABLE and age > UNREADABLE_STALE_S


class GroupLock:
    """Context manager holding one group's lock for the duration of a write."""

    def __init__(self, store: Path, group: str, shard: tuple[int, int] | None, progress: Progress) -> None:
        self.dir = Path(str(store) + ".locks")
        self.group = group
        self.shard = shard
        self.progress = progress
        name = f"{group}.lock" if shard is None else f"{group}.shard-{shard[0]}-of-{shard[1]}.lock"
        self.path = self.dir / name
        self.held = False

    # ------------------------------------------------------------------ helpers
    def _live(self, path: Path) -> dict[str, Any] | None:
        """The live holder of ``path``, or None (taking over a dead local holder's lock)."""
        info = _read(path)
        if info is None:
            return None
        dead = info.get("host") == socket.gethostname() and int(info.get("pid", -1)) > 0 \
            and not _alive(int(info["pid"]))
        if dead or _unreadable_and_old(path, info):
            self._take_over(path, info)
            return None
        return info

    def _take_over(self, path: Path, info: dict[str, Any]) -> None:
        aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
        try:
            os.rename(path, aside)  # atomic: one taker gets the file
        except FileNotFoundError:
            return
        if _read(aside) == info:
            who = "a writer killed as it made it" if info == UNREADABLE else f"dead process {info.get('pid')}"
            self.progress.log(f"warning: taking over a stale lock {path} left by {who}")
            aside.unlink(missing_ok=True)
        else:  # a live writer's fresh lock slipped in between: put it back
            os.replace(aside, path)

    def _others(self) -> list[Path]:
        if self.shard is not None:
            return [self.dir / f"{self.group}.lock"]
        return sorted(self.dir.glob(f"{self.group}.shard-*.lock"))

    def _refuse(self, path: Path, info: dict[str, Any]) -> StoreError:
        return StoreError(
            f"{self.group} is being written by process {info.get('pid')} on {info.get('host')} "
            f"(lock {path}); use --shard i/N for parallel writers, or remove the lock if that process is gone")

    def _create(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self._live(self.path)
                if info is not None:
                    raise self._refuse(self.path, info) from None
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
            self.held = True
            return
        raise StoreError(f"cannot take lock {self.path}")

    # ------------------------------------------------------------------ protocol
    def __enter__(self) -> GroupLock:
        make_dir(self.dir, StoreError)
        self._create()  # first our own lock ...
        for other in self._others():  # ... then theirs: of two simultaneous writers one sees the other
            info = self._live(other)
            if info is not None:
                self.release()
                raise self._refuse(other, info)
        return self

    def release(self) -> None:
        """Remove our lock file (and the lock folder when it is empty)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            with contextlib.suppress(OSError):
                self.dir.rmdir()  # only when empty

    def __exit__(self, *exc: object) -> None:
        self.release()
