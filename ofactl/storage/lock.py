"""Writer locks for store groups: one exclusive writer, or one process per ``--shard i/N``.

Lock files live beside the store (``feats.zarr.locks/rate=0.500.lock``) so that the Zarr
hierarchy holds nothing but Zarr. Each records pid, host and start time; a lock left by a dead
process on this host is taken over with a warning.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

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


class GroupLock:
    def __init__(self, store: Path, group: str, shard: tuple[int, int] | None, progress: Progress) -> None:
        self.dir = Path(str(store) + ".locks")
        self.group = group
        self.shard = shard
        self.progress = progress
        name = f"{group}.lock" if shard is None else f"{group}.shard-{shard[0]}-of-{shard[1]}.lock"
        self.path = self.dir / name
        self.held = False

    def _holder(self, path: Path) -> dict | None:
        """The live holder of ``path``, or None (removing a stale lock of a dead local process)."""
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            info = {"pid": -1, "host": "?"}
        if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1))):
            self.progress.log(f"warning: taking over a stale lock {path} left by dead process {info.get('pid')}")
            path.unlink(missing_ok=True)
            return None
        return info

    def _refuse(self, path: Path, info: dict) -> StoreError:
        return StoreError(
            f"{self.group} is being written by process {info.get('pid')} on {info.get('host')} "
            f"(lock {path}); use --shard i/N for parallel writers, or remove the lock if that process is gone")

    def __enter__(self) -> "GroupLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        exclusive = self.dir / f"{self.group}.lock"
        others = [exclusive] if self.shard is not None else sorted(self.dir.glob(f"{self.group}.shard-*.lock"))
        for other in others:
            info = self._holder(other)
            if info is not None:
                raise self._refuse(other, info)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self._holder(self.path)
                if info is not None:
                    raise self._refuse(self.path, info) from None
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
            self.held = True
            return self
        raise StoreError(f"cannot take lock {self.path}")

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            try:
                self.dir.rmdir()  # only when empty
            except OSError:
                pass
