from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import pytest

from ofactl.errors import StoreError
from ofactl.progress import NullProgress
from ofactl.storage.lock import GroupLock


def _jitter(monkeypatch_target, name):
    """Random sleeps before a file-system call, so the writers' steps interleave in every order."""
    import random

    real = getattr(monkeypatch_target, name)

    def slow(*a, **kw):
        time.sleep(random.random() * 0.004)
        return real(*a, **kw)

    setattr(monkeypatch_target, name, slow)


def _writer(store, shard, barrier, results, k):
    import pathlib
    import random

    random.seed(k * 2 + (shard is None))
    _jitter(os, "open")
    _jitter(pathlib.Path, "read_text")
    _jitter(pathlib.Path, "glob")
    barrier.wait()
    try:
        with GroupLock(store, "rate=0.500", shard, NullProgress()):
            results.put((k, "in", time.monotonic()))
            time.sleep(0.02)
            results.put((k, "out", time.monotonic()))
    except StoreError:
        results.put((k, "refused", time.monotonic()))


@pytest.mark.slow
def test_plain_and_shard_writers_never_both_get_through(tmp_path):
    ctx = mp.get_context("fork")
    through_both = 0
    for k in range(50):
        store = tmp_path / f"s{k}.zarr"
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_writer, args=(store, shard, barrier, results, k)) for shard in (None, (1, 4))]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        got = [results.get(timeout=5) for _ in range(4) if not results.empty()]
        through_both += _overlap(got)
    assert through_both == 0


def _overlap(events: list[tuple[int, str, float]]) -> bool:
    """Whether two writers held the lock at the same time: both went in, and the second went in
    before the first came out (on a busy machine one may well go in after the other has left).
    A writer whose "out" never came counts as holding it to the end."""
    ins = sorted(t for _, what, t in events if what == "in")
    outs = sorted(t for _, what, t in events if what == "out")
    return len(ins) == 2 and ins[1] < (outs[0] if outs else float("inf"))


def test_shards_share_and_plain_writers_exclude(tmp_path):
    store = tmp_path / "f.zarr"
    with (GroupLock(store, "rate=0.500", (0, 2), NullProgress()), GroupLock(store, "rate=0.500", (1, 2), NullProgress()),
          pytest.raises(StoreError, match="being written by process")):
        GroupLock(store, "rate=0.500", None, NullProgress()).__enter__()
    with GroupLock(store, "rate=0.500", None, NullProgress()):
        with pytest.raises(StoreError, match="being written by process"):
            GroupLock(store, "rate=0.500", None, NullProgress()).__enter__()
        with pytest.raises(StoreError, match="use --shard"):
            GroupLock(store, "rate=0.500", (0, 2), NullProgress()).__enter__()
    assert not (tmp_path / "f.zarr.locks").exists()  # released and tidied


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    store = tmp_path / "f.zarr"
    locks = tmp_path / "f.zarr.locks"
    locks.mkdir()
    p = mp.get_context("fork").Process(target=os._exit, args=(0,))
    p.start()
    p.join()
    import socket

    (locks / "rate=0.500.lock").write_text(json.dumps({"pid": p.pid, "host": socket.gethostname()}))
    prog = NullProgress()
    with GroupLock(store, "rate=0.500", None, prog):
        assert json.loads((locks / "rate=0.500.lock").read_text())["pid"] == os.getpid()
    assert any("stale lock" in m for m in prog.messages)


def test_an_empty_lock_left_by_a_writer_killed_as_it_made_it_is_taken_over_once_old(tmp_path):
    store = tmp_path / "f.zarr"
    locks = tmp_path / "f.zarr.locks"
    locks.mkdir()
    lock = locks / "rate=0.500.lock"
    lock.write_text("")  # killed between creating the file and writing its pid
    with pytest.raises(StoreError, match="being written by process -1"):  # a writer may be writing it now
        GroupLock(store, "rate=0.500", None, NullProgress()).__enter__()
    old = time.time() - 120
    os.utime(lock, (old, old))
    prog = NullProgress()
    with GroupLock(store, "rate=0.500", None, prog):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert any("left by a writer killed as it made it" in m for m in prog.messages)


def test_info_names_a_groups_live_writers(tmp_path, synth_corpus, student_ckpt):
    import os
    import socket

    from ofactl.extract import ExtractConfig, run_extract
    from ofactl.storage import describe_store

    store = tmp_path / "f.zarr"
    run_extract(ExtractConfig(rates=(0.5,), num_workers=0, device="cpu"), student_ckpt[0], synth_corpus, store)
    assert "writing" not in describe_store(store)["groups"][0]
    with GroupLock(store, "rate=0.500", (1, 4), NullProgress()):
        g = describe_store(store)["groups"][0]
        assert g["writing"] == f"shard 1/4, process {os.getpid()} on {socket.gethostname()}"
    with GroupLock(store, "rate=0.500", None, NullProgress()):
        assert describe_store(store)["groups"][0]["writing"] == f"process {os.getpid()} on {socket.gethostname()}"
    assert "writing" not in describe_store(store)["groups"][0]
