import multiprocessing
import os
import shutil
import signal
import subprocess
import time

import pytest

import ofactl.progress
from ofactl.progress import Terminated, deferred_stop, duration_text, how_stopped, stop_signals_as_interrupt, worker_init


def test_duration_text():
    assert [duration_text(s) for s in (42, 185, 3725)] == ["42s", "3m05s", "1h02m"]


@pytest.fixture
def quieted(monkeypatch) -> list[bool]:
    """Records the SIGHUP handler's call to send lost outputs to /dev/null, instead of doing it to
    the test process's own stdout and stderr."""
    calls: list[bool] = []
    monkeypatch.setattr(ofactl.progress, "_quiet_lost_outputs", lambda: calls.append(True))
    return calls


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_first_stop_signal_is_a_request_and_a_second_stops_at_once(sig, quieted):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with pytest.raises(KeyboardInterrupt) as e, deferred_stop() as stop:
        os.kill(os.getpid(), sig)
        assert stop.requested and stop.signum == sig
        if sig == signal.SIGHUP:  # a hangup comes twice, from the kernel and from the shell
            os.kill(os.getpid(), sig)
            assert stop.requested and stop.signum == sig
            sig = signal.SIGTERM
        os.kill(os.getpid(), sig)
        pytest.fail("a second signal should have stopped the block")
    assert isinstance(e.value, Terminated) == (sig != signal.SIGINT)
    assert getattr(e.value, "signum", signal.SIGINT) == sig
    assert {s: signal.getsignal(s) for s in before} == before  # every handler put back
    assert quieted == ([True, True] if stop.signum == signal.SIGHUP else [])


def test_how_a_stop_reads():
    assert how_stopped(None) == how_stopped(signal.SIGINT) == ("interrupted", 130)
    assert how_stopped(signal.SIGTERM) == ("terminated (SIGTERM)", 143)
    assert how_stopped(signal.SIGHUP) == ("hung up (SIGHUP)", 129)


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with deferred_stop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        assert not stop.requested and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_raises_terminated_inside_the_console_script_only(sig, quieted):
    assert signal.getsignal(sig) is signal.SIG_DFL
    with pytest.raises(Terminated) as e, stop_signals_as_interrupt():
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises at the next bytecode; this never returns
        finally:  # the cleanup a stop runs: a hangup's second signal does not cut it short
            if sig == signal.SIGHUP:
                os.kill(os.getpid(), sig)
                time.sleep(0.1)
    assert e.value.signum == sig and signal.getsignal(sig) is signal.SIG_DFL
    assert quieted == ([True] if sig == signal.SIGHUP else [])


def test_a_sighup_ignored_by_nohup_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_signals_as_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_terminal_that_hung_up_is_told_from_one_still_there():
    import pty

    from ofactl.progress import _hung_up

    master, slave = pty.openpty()
    try:
        assert not _hung_up(slave)
        os.close(master)
        master = -1
        assert _hung_up(slave)  # writes to it fail with EIO from now on
    finally:
        os.close(slave)
        if master >= 0:
            os.close(master)


def _worker(init, ready) -> None:
    init(0)
    ready.set()
    time.sleep(60)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="the sender of a signal is known only with sigwaitinfo")
def test_a_worker_leaves_others_stop_signals_to_the_main_process_and_dies_of_the_main_process_s():
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    w = ctx.Process(target=_worker, args=(worker_init(), ready), daemon=True)
    w.start()
    try:
        assert ready.wait(60)  # its init has run
        subprocess.run([shutil.which("kill") or "kill", "-TERM", str(w.pid)], check=True)  # a scheduler's
        os.kill(w.pid, signal.SIGHUP)  # a closed terminal's, which reaches the whole job
        w.join(1)
        assert w.is_alive()
        os.kill(w.pid, signal.SIGTERM)  # the main process shutting its workers down (at exit, too)
        w.join(60)
        assert w.exitcode == -signal.SIGTERM
    finally:
        if w.is_alive():
            w.kill()


def _writes_after_hangup(init, master: int, slave: int, ready, go, wrote) -> None:
    os.close(master)  # the terminal's side stays with the test alone
    os.dup2(slave, 2)  # the worker's stderr is the terminal
    init(0)
    ready.set()
    go.wait(60)
    for _ in range(500):  # the handler runs in this thread, at its next bytecode once signalled
        if os.path.samestat(os.fstat(2), os.stat(os.devnull)):
            break
        time.sleep(0.01)
    try:
        os.write(2, b"a warning printed after the terminal closed\n")
        wrote.set()
    except OSError:
        pass


def test_a_worker_survives_sighup_and_its_later_output_does_not_fail():
    import pty

    ctx = multiprocessing.get_context("fork")
    ready, go, wrote = ctx.Event(), ctx.Event(), ctx.Event()
    master, slave = pty.openpty()
    w = ctx.Process(target=_writes_after_hangup, args=(worker_init(), master, slave, ready, go, wrote), daemon=True)
    w.start()
    os.close(slave)
    try:
        assert ready.wait(60)
        os.close(master)  # the terminal closes: writes to it fail with EIO
        os.kill(w.pid, signal.SIGHUP)
        go.set()
        w.join(60)
        assert w.exitcode == 0 and wrote.is_set()  # alive, and its write went to /dev/null
    finally:
        if w.is_alive():
            w.kill()
