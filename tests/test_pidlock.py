from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from ofactl.errors import OfactlError
from ofactl.pidlock import run_folder_lock
from ofactl.progress import NullProgress


class Logged(NullProgress):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, msg: str) -> None:
        self.lines.append(msg)


@pytest.fixture
def other_process():
    """A live process that is not this one: its pid holds a lock in these tests."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _lock_of(pid: int, path, what: str = "ofactl distill") -> None:
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "what": what}))


def test_a_run_folder_has_one_writer(tmp_path, other_process):
    run = tmp_path / "run"
    with run_folder_lock(run, "sweep", NullProgress()):
        assert json.loads((tmp_path / "run.lock").read_text())["what"] == "ofactl sweep"
        with (pytest.raises(OfactlError, match=r"run is being written by ofactl sweep \(process \d+ on .*run.lock\): "
                            "wait for it to finish or choose another --out"),
              run_folder_lock(run, "sweep", NullProgress())):
            pass
    assert not (tmp_path / "run.lock").exists()  # released, and the folder itself never made
    assert not run.exists()
    _lock_of(other_process, tmp_path / "run.lock")
    with (pytest.raises(OfactlError, match=rf"being written by ofactl distill \(process {other_process} "),
          run_folder_lock(run, "distill", NullProgress())):
        pass
    with pytest.raises(ValueError), run_folder_lock(tmp_path / "b", "adapt", NullProgress()):
        raise ValueError  # an error inside releases the lock
    assert not (tmp_path / "b.lock").exists()


def test_a_dead_writers_lock_is_taken_over(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _lock_of(int(proc.stdout), tmp_path / "run.lock")  # that process has exited
    log = Logged()
    with run_folder_lock(tmp_path / "run", "distill", log):
        pass
    assert any("taking over a stale lock" in line and "dead process" in line for line in log.lines), log.lines


def test_only_rank_0_of_a_torchrun_job_takes_it(tmp_path, monkeypatch, other_process):
    _lock_of(other_process, tmp_path / "run.lock")
    monkeypatch.setenv("RANK", "1")
    with run_folder_lock(tmp_path / "run", "distill", NullProgress()):
        pass  # rank 1 writes nothing, so it neither takes nor checks the lock


def test_a_second_distill_into_a_running_ones_folder_is_refused_and_changes_nothing(tmp_path, other_process):
    from typer.testing import CliRunner

    from ofactl.cli import app

    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("the running job's")
    _lock_of(other_process, tmp_path / "run.lock")
    r = CliRunner().invoke(app, ["distill", "-c", "distill-tiny", "--corpus", str(tmp_path), "--out", str(run),
                                 "--overwrite"])
    assert r.exit_code == 1 and "is being written by ofactl distill" in r.stderr, r.output
    assert (run / "keep.txt").read_text() == "the running job's"  # --overwrite did not clear it


def test_info_names_the_command_writing_a_run_folder_now(tmp_path):
    from ofactl.about import describe_path

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("pretrain:\n  steps: 100\n")
    assert "writing" not in describe_path(run)
    with run_folder_lock(run, "pretrain", NullProgress()):
        assert describe_path(run)["writing"] == f"ofactl pretrain, process {os.getpid()} on {socket.gethostname()} " \
            "(running now)"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _lock_of(int(proc.stdout), tmp_path / "run.lock", "ofactl pretrain")  # left by a process that is gone
    assert "writing" not in describe_path(run) and (tmp_path / "run.lock").exists()  # info takes nothing over
