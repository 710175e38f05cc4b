"""A tiny progress protocol so that library code reports without printing.

The CLI passes a rich-backed implementation; library callers get :class:`NullProgress`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol


def duration_text(seconds: float) -> str:
    """A time left or taken as every command prints it: ``1h02m``, ``3m05s`` or ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress(Protocol):
    """What library code reports progress through; the CLI draws it, tests ignore it."""

    def start(self, stage: str, total: int | None = None) -> None:
        """Begin a stage of ``total`` units (None: unknown)."""

    def advance(self, n: int = 1, **metrics: Any) -> None:
        """Advance the current stage; ``metrics`` (e.g. loss=0.3) are shown beside the bar."""

    def log(self, message: str) -> None:
        """A one-line note (warnings, reused caches)."""

    def finish(self) -> None:
        """End the current stage."""


class NullProgress:
    """Reports nothing; collects log lines so callers and tests can inspect them."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def start(self, stage: str, total: int | None = None) -> None:
        """Begin a stage (nothing shown)."""
        pass

    def advance(self, n: int = 1, **metrics: Any) -> None:
        """Advance the stage (nothing shown)."""
        pass

    def log(self, message: str) -> None:
        """A note (dropped)."""
        self.messages.append(message)

    def finish(self) -> None:
        """End the stage (nothing shown)."""
        pass


def ignore_sigint_in_worker(_: int = 0) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C is handled by the main process alone (it saves the
    work done), so workers ignore SIGINT instead of printing their own tracebacks."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """Set by Ctrl-C inside :func:`deferred_sigint`; long loops check it between steps."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def deferred_sigint() -> Iterator[StopRequest]:
    """Turn the first Ctrl-C into a request that the loop honours at its next step boundary.

    A KeyboardInterrupt raised at an arbitrary bytecode can land while the main process is
    receiving a batch from a DataLoader worker, and multiprocessing's helper threads then print
    their own tracebacks. With the handler below the signal only sets a flag; a second Ctrl-C
    stops at once. A SIGINT that was ignored when the process started (a background job of a
    non-interactive shell) stays ignored, and off the main thread nothing changes.
    """
    import signal
    import threading

    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
