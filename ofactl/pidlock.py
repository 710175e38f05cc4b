"""Lock files that name their holder: a store group's writer (:mod:`ofactl.storage.lock`), or
the command writing a run folder (:func:`run_folder_lock`).

A lock is a small JSON file (pid, host, and what holds it) created exclusively (``O_EXCL``).
One left by a dead process on this host is taken over, by renaming it aside first so that two
takers cannot both remove a fresh lock; one still empty or unreadable a minute after it was
made was left by a process killed between creating and writing it, and is taken over too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def read_lock(path: Path) -> dict[str, Any] | None:
    """A lock's record; None when there is none, UNREADABLE while it is being written (or garbage)."""
    try:
        info = dict(json.loads(path.read_text()))
        int(info.get("pid", -1))  # a pid that is no number is garbage too
        return info
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return dict(UNREADABLE)


def _stale(path: Path, info: dict[str, Any]) -> bool:
    """Left by a dead process on this host, or by one killed as it made the lock."""
    dead = info.get("host") == socket.gethostname() and int(info.get("pid", -1)) > 0 and not _alive(int(info["pid"]))
    return dead or _unreadable_and_old(path, info)


def live_holder(path: Path) -> dict[str, Any] | None:
    """The record of a live holder of the lock ``path``; None when there is none or it is stale
    (left as it is: a reader takes nothing over)."""
    info = read_lock(path)
    return None if info is None or _stale(path, info) else info


def run_writer(run_dir: Path) -> str | None:
    """Who is writing a run folder now ("ofactl pretrain, process 123 on host"), from its lock."""
    info = live_holder(_run_lock_path(run_dir))
    if info is None:
        return None
    return f"{info.get('what') or 'an ofactl command'}, process {info.get('pid')} on {info.get('host')}"


def _run_lock_path(run_dir: Path) -> Path:
    """A run folder's lock: ``RUN.lock`` beside it (an --overwrite clears the folder itself)."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f"{run_dir.name}.lock"


def _unreadable_and_old(path: Path, info: dict[str, Any]) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    return info == UNREADABLE and age > UNREADABLE_STALE_S


class PidLock:
    """One lock file, ``path``, that this process may hold; ``what`` is recorded in it (the
    command or writer), for the message of whoever finds it held."""

    def __init__(self, path: Path, progress: Progress, what: str = "") -> None:
        self.path, self.progress, self.what = Path(path), progress, what
        self.held = False

    def live(self, path: Path) -> dict[str, Any] | None:
        """The live holder of the lock ``path`` (this one's or another's), or None: no lock, or a
        stale one, which is taken over."""
        info = read_lock(path)
        if info is None:
            return None
        if _stale(path, info):
            self._take_over(path, info)
            return None
        return info

    def _take_over(self, path: Path, info: dict[str, Any]) -> None:
        aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
        try:
            os.rename(path, aside)  # atomic: one taker gets the file
        except FileNotFoundError:
            return
        if read_lock(aside) == info:
            who = "a writer killed as it made it" if info == UNREADABLE else f"dead process {info.get('pid')}"
            self.progress.log(f"warning: taking over a stale lock {path} left by {who}")
            aside.unlink(missing_ok=True)
        else:  # a live writer's fresh lock slipped in between: put it back
            os.replace(aside, path)

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock: None when taken, else the live holder's record."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.live(self.path)
                if info is not None:
                    return info
                continue
            except OSError as e:  # no permission, a read-only or full disk: one error naming the lock
                from ofactl.errors import WriteError

                raise WriteError(f"cannot create the lock {self.path}: {e.strerror or e}") from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what}, f)
            self.held = True
            return None
        return dict(UNREADABLE)  # taken over and re-taken by others three times: call it held

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


@contextmanager
def run_folder_lock(run_dir: Path, command: str, progress: Progress) -> Iterator[None]:
    """Hold ``RUN.lock`` beside a run folder while ``ofactl COMMAND`` writes it, so that a second
    command given the same folder (the same command started twice, a --resume or --overwrite
    while the first still runs) is refused instead of writing over it. Beside, not inside: an
    --overwrite clears the folder. Only rank 0 of a torchrun job takes it; the others write nothing."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    from ofactl.atomic import make_dir
    from ofactl.errors import FolderBusy

    run_dir = Path(run_dir).resolve()
    made = [d for d in (run_dir.parent, *run_dir.parent.parents) if not d.exists()]  # deepest first
    make_dir(run_dir.parent)
    lock = PidLock(_run_lock_path(run_dir), progress, f"ofactl {command}")
    try:
        holder = lock.acquire()
        if holder is not None:
            raise FolderBusy(f"{run_dir} is being written by {holder.get('what') or 'another ofactl command'} "
                             f"(process {holder.get('pid')} on {holder.get('host')}; lock {lock.path}): wait for it "
                             "to finish or choose another --out; remove the lock if that process is gone")
        yield
    finally:
        lock.release()
        for d in made:  # a run refused before writing leaves no folder behind, not even its parents
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty
