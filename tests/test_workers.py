from __future__ import annotations

import os

import pytest
import torch

from ofactl.workers import run_in_processes


def _where(x: int) -> tuple[int, int, int]:
    """The job's square, the process and the threads it ran with (module level: it pickles)."""
    return x * x, os.getpid(), torch.get_num_threads()


def _fails(x: int) -> int:
    if x == 2:
        raise ValueError(f"job {x} went wrong")
    return x


def test_jobs_run_in_processes_that_share_the_threads_out():
    got = dict(run_in_processes(_where, [1, 2, 3], workers=2))
    assert sorted(got) == [0, 1, 2] and [got[i][0] for i in range(3)] == [1, 4, 9]
    pids = {pid for _, pid, _ in got.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {t for _, _, t in got.values()} == {max(1, torch.get_num_threads() // 2)}


def test_one_worker_runs_the_jobs_here_in_turn():
    got = list(run_in_processes(_where, [3, 1], workers=1))
    assert [i for i, _ in got] == [0, 1] and [r[0] for _, r in got] == [9, 1]
    assert {r[1] for _, r in got} == {os.getpid()}


def test_an_error_in_a_job_is_raised_in_the_caller():
    with pytest.raises(ValueError, match="job 2 went wrong"):
        list(run_in_processes(_fails, [1, 2, 3], workers=2))
