"""A tiny progress protocol so that library code reports without printing.

The CLI passes a rich-backed implementation; library callers get :class:`NullProgress`.
"""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
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
        pass

    def advance(self, n: int = 1, **metrics: Any) -> None:
        pass

    def log(self, message: str) -> None:
        self.messages.append(message)

    def finish(self) -> None:
        pass


def ignore_sigint_in_worker(_: int = 0) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C is handled by the main process alone (it saves the
    work done), so workers ignore SIGINT instead of printing their own tracebacks."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
