"""Atomic file writes: every file ofactl leaves behind is either whole or absent.

A write goes to a hidden temporary file in the target's folder, is fsynced, then renamed over
the target, so a kill or a full disk at any moment leaves the previous file (or none), never a
truncated one that a rerun would read as data. A failed write removes its temporary file and is
one :class:`~ofactl.errors.WriteError` (or the caller's error class) naming the file.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ofactl.errors import OfactlError, WriteError


@contextmanager
def atomic_path(path: Path, error: type[OfactlError] = WriteError) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to (by any library: ``torch.save``,
    safetensors, h5py, matplotlib); when the block ends, it is fsynced and replaces ``path``.

    The temporary name is hidden and does not end in ``path``'s suffix, so a file left by a
    SIGKILL is not taken for a checkpoint or a record by a glob; a writer that picks its format
    by suffix must be told the format (figures: :func:`save_figure`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    make_dir(path.parent, error)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            # the mode any new file gets: some writers (safetensors) create theirs owner-only
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise error(f"cannot write {path}: {_write_reason(e)}") from None
    except OfactlError:  # the caller's own refusal, said as it is
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # writers that wrap the OS's error in their own: torch.save, safetensors
        reason = _wrapped_write_reason(e, tmp.parent)  # read before the temporary frees its space
        tmp.unlink(missing_ok=True)
        if reason is None:
            raise  # no write failure: a bug, whose traceback is the honest report
        raise error(f"cannot write {path}: {reason}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _os_error_number(text: str) -> int | None:
    """The errno a library's error text quotes: HDF5's ``errno = 28``, Rust's ``os error 28``."""
    found = re.search(r"(?:errno =|os error) (\d+)", text)
    return int(found.group(1)) if found else None


def _write_reason(e: OSError) -> str:
    """The OS's words for a failed write. HDF5 reports its errors as one long text holding
    ``errno = N`` and no strerror: that number's words, not the text."""
    text = str(e.strerror or e).strip()
    number = _os_error_number(text)
    if number is not None:
        return os.strerror(number)
    return text.splitlines()[0] if text else type(e).__name__


def _wrapped_write_reason(e: Exception, folder: Path) -> str | None:
    """Why a writer's own error (not an OSError) failed the write: the errno its text quotes
    (safetensors), or a full disk, seen as less than 1 MiB left where it wrote (torch.save says
    only "unexpected pos"); None for an error that is no write failure."""
    number = _os_error_number(str(e))
    if number is not None:
        return os.strerror(number)
    try:
        full = shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return None
    return os.strerror(errno.ENOSPC) if full else None


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (macOS): read it by setting it back at once
    os.umask(mask)
    return mask


def make_dir(path: Path, error: type[OfactlError] = WriteError) -> Path:
    """Create the folder ``path`` and its parents (nothing when it exists); returns ``path``.

    A folder that cannot be made (a file in its place or on its way, no permission, a read-only
    or full disk) is one ``error`` naming it, not a traceback from deep in a run.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create the folder {path}: {_mkdir_reason(path, e)}") from None
    return path


@contextmanager
def removed_if_left_empty(path: Path | None) -> Iterator[None]:
    """Run the block; when it fails, remove the folders it made for ``path`` (``path`` and its
    parents that did not exist before) that are still empty.

    A command refused after making its ``--out`` (a bad corpus, a mismatched teacher, Ctrl-C
    before the first file) then leaves nothing behind; a folder that holds anything, or that
    was there before, stays.
    """
    made = [] if path is None else _missing_folders(Path(path))
    try:
        yield
    except BaseException:
        for d in made:  # the deepest first: a parent empties only once its child is gone
            try:
                d.rmdir()
            except OSError:  # not empty, not a folder, or gone: leave it and what holds it
                break
        raise


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, the deepest first."""
    path = path.absolute()
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _mkdir_reason(path: Path, e: OSError) -> str:
    """Name the file in the way when there is one: "Not a directory" alone does not say which."""
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            return f"{p} is a file, not a folder"
    return str(e.strerror or e)


def write_text(path: Path, text: str, error: type[OfactlError] = WriteError) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path, error) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(path)


def save_figure(fig: Any, path: Path, dpi: int) -> Path:
    """Save a matplotlib figure to ``path`` atomically, in the format its suffix names (PNG when
    it has none): the temporary name has no suffix for matplotlib to read it from."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path
