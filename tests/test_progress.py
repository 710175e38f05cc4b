import multiprocessing
import os
import shutil
import signal
import subprocess
import time

import pytest

from ofactl.progress import Terminated, deferred_stop, duration_text, sigterm_as_interrupt, worker_init


def test_duration_text():
    assert [duration_text(s) for s in (42, 185, 3725)] == ["42s", "3m05s", "1h02m"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_first_stop_signal_is_a_request_and_a_second_stops_at_once(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt) as e, deferred_stop() as stop:
        os.kill(os.getpid(), sig)
        assert stop.requested and stop.terminated == (sig == signal.SIGTERM)
        os.kill(os.getpid(), sig)
        pytest.fail("a second signal should have stopped the block")
    assert isinstance(e.value, Terminated) == (sig == signal.SIGTERM)
    assert {s: signal.getsignal(s) for s in before} == before  # both handlers put back


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with deferred_stop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        assert not stop.requested and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_raises_terminated_inside_the_console_script_only():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(Terminated), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode; this never returns
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _worker(init, ready) -> None:
    init(0)
    ready.set()
    time.sleep(60)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="the sender of a signal is known only with sigwaitinfo")
def test_a_worker_leaves_others_sigterm_to_the_main_process_and_dies_of_the_main_process_s():
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    w = ctx.Process(target=_worker, args=(worker_init(), ready), daemon=True)
    w.start()
    try:
        assert ready.wait(60)  # its init has run
        subprocess.run([shutil.which("kill") or "kill", "-TERM", str(w.pid)], check=True)  # a scheduler's
        w.join(1)
        assert w.is_alive()
        os.kill(w.pid, signal.SIGTERM)  # the main process shutting its workers down (at exit, too)
        w.join(60)
        assert w.exitcode == -signal.SIGTERM
    finally:
        if w.is_alive():
            w.kill()
