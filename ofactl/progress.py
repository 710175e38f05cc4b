"""A tiny progress protocol so that library code reports without printing.

The CLI passes a rich-backed implementation; library callers get :class:`NullProgress`.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
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


# None where the platform has no SIGHUP (Windows)
SIGHUP: int | None = getattr(signal, "SIGHUP", None)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a cluster scheduler's preemption) or SIGHUP (the terminal
    closed) in the main thread: a command stops as on Ctrl-C, keeping the work done, and exits
    with 128 + the signal's number (143, 129) instead of 130."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = int(signum)


def stop_signals() -> tuple[int, ...]:
    """The signals besides Ctrl-C that a command stops on as on Ctrl-C: SIGTERM, and SIGHUP where
    the platform has it."""
    return (signal.SIGTERM, *((SIGHUP,) if SIGHUP is not None else ()))


def how_stopped(signum: int | None) -> tuple[str, int]:
    """A stop's words and exit code: ``interrupted`` and 130 for Ctrl-C (``None`` or SIGINT),
    ``terminated (SIGTERM)`` and 143, ``hung up (SIGHUP)`` and 129."""
    if signum is None or signum == signal.SIGINT:
        return "interrupted", 130
    words = "hung up" if signum == SIGHUP else "terminated"
    return f"{words} ({signal.Signals(signum).name})", 128 + signum


def _quiet_lost_outputs() -> None:
    """After SIGHUP: stdout and stderr that lead to a terminal that hung up, or into a pipe or
    socket (whose reader, ``tee`` say, got the same SIGHUP), go to /dev/null from here on, so
    that no write error (EIO, EPIPE) stops the checkpoint and the cleanup that follow. Files and
    a terminal still there are kept."""
    import os
    import stat

    for fd in (1, 2):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not _hung_up(fd)):
            continue
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)


def _hung_up(fd: int) -> bool:
    """Whether writing to ``fd`` (a character device) can only fail: a terminal that hung up
    polls as an error."""
    import select

    if not hasattr(select, "poll"):
        return True
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))


def _raise_terminated(signum: int, frame: Any) -> None:
    if signum == SIGHUP:
        _quiet_lost_outputs()
        # a hangup comes twice (the kernel's and the shell's): the second must not cut the cleanup
        signal.signal(signum, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """The console script's SIGTERM and SIGHUP handler: raise :class:`Terminated`, so that what
    runs on Ctrl-C (checkpoints saved, locks released, partial files removed) runs on these too.
    Python would otherwise die at once. A signal ignored or handled by whoever started us
    (``nohup`` ignores SIGHUP) is left alone, and so are the handlers after the block (tests call
    the console script in-process)."""
    taken = [s for s in stop_signals() if signal.getsignal(s) is signal.SIG_DFL]
    for s in taken:
        signal.signal(s, _raise_terminated)
    try:
        yield
    finally:
        for s in taken:
            signal.signal(s, signal.SIG_DFL)


def worker_init() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` that leaves stop signals to this (the main) process."""
    import functools
    import os

    return functools.partial(_worker_signals, os.getpid())


def _worker_signals(main_pid: int, worker_id: int = 0) -> None:
    """In a DataLoader worker: stop signals are the main process's to handle (it saves the work
    done first).

    Ctrl-C reaches the whole foreground group; workers ignore it. SIGTERM is left to the main
    process when someone else sends it (a scheduler signals every process of a job), but still
    kills the worker when the main process sends it: that is how it shuts down workers it could
    not stop otherwise, at exit included, so ignoring it outright could leave it waiting forever.
    Where the sender cannot be known (no ``sigwaitinfo``: macOS), SIGTERM kills a worker as before.
    SIGHUP (a terminal that closed signals its whole job) does not stop a worker, which the main
    process stops in turn; it only sends the worker's lost outputs to /dev/null, as it does the
    main process's, so that a warning printed later does not fail the batch.
    """
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if SIGHUP is not None:
        signal.signal(SIGHUP, _quiet_on_hangup)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, inherited by fork
    if not hasattr(signal, "sigwaitinfo"):
        return
    # blocked here, so in every thread started from here: SIGTERM waits for the thread below
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_sigterm_from, args=(main_pid,), name="ofactl-sigterm", daemon=True).start()


def _quiet_on_hangup(signum: int, frame: Any) -> None:
    """A worker's SIGHUP handler: outputs to /dev/null (:func:`_quiet_lost_outputs`), no stop."""
    _quiet_lost_outputs()


def _sigterm_from(main_pid: int) -> None:
    """A worker's SIGTERM sender check: the main process's kills the worker (the default action,
    delivered to this thread alone once it unblocks it); anyone else's is dropped."""
    import os

    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_pid:
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.kill(os.getpid(), signal.SIGTERM)


class StopRequest:
    """Set by Ctrl-C, SIGTERM or SIGHUP inside :func:`deferred_stop`; long loops check it between
    steps."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the signal that asked (None: none did)


@contextlib.contextmanager
def deferred_stop() -> Iterator[StopRequest]:
    """Turn the first Ctrl-C, SIGTERM or SIGHUP into a request that the loop honours at its next step
    boundary.

    A KeyboardInterrupt raised at an arbitrary bytecode can land while the main process is
    receiving a batch from a DataLoader worker, and multiprocessing's helper threads then print
    their own tracebacks. With the handler below the signal only sets a flag; a second one stops
    at once (a repeated SIGHUP does not). A signal that was ignored when the process started (SIGINT in a background job of a
    non-interactive shell) stays ignored, and off the main thread nothing changes.
    """
    import threading

    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if signum == SIGHUP:
            _quiet_lost_outputs()
            if stop.requested:  # a hangup comes twice (the kernel's and the shell's): not a second request
                return
        if stop.requested:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)
        stop.requested, stop.signum = True, signum

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, *stop_signals())}
    taken = [s for s, h in previous.items() if h is not signal.SIG_IGN]
    for s in taken:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s in taken:
            # None: a handler not set from Python, which cannot be put back; the default is closest
            signal.signal(s, previous[s] if previous[s] is not None else signal.SIG_DFL)
