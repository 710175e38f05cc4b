"""ofactl.atomic: a file is replaced whole or left as it was; a failed write is one clear error."""
from __future__ import annotations

import pytest

from ofactl.atomic import atomic_path, make_dir, removed_if_left_empty, write_text
from ofactl.config import save_resolved
from ofactl.errors import CheckpointError, WriteError
from ofactl.synth import SynthConfig


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    p = write_text(tmp_path / "sub" / "a.json", "new\n")
    assert p.read_text() == "new\n" and [f.name for f in p.parent.iterdir()] == ["a.json"]


def _no_space(*_args, **_kwargs):
    raise OSError(28, "No space left on device")


def test_a_full_disk_keeps_the_old_file_and_names_the_new_one(tmp_path, monkeypatch):
    p = tmp_path / "config.yaml"
    p.write_text("old\n")
    monkeypatch.setattr("ofactl.atomic.os.fsync", _no_space)
    with pytest.raises(WriteError, match=r"cannot write .*config\.yaml: No space left on device"):
        save_resolved(SynthConfig(), "synth", p)
    assert p.read_text() == "old\n" and [f.name for f in tmp_path.iterdir()] == ["config.yaml"]


def test_hdf5s_long_error_text_is_told_in_the_os_words(tmp_path):
    hdf5 = ("Can't close file (file write failed: time = Sun Dec  6 06:21:57 2026\n, filename = '/x/.s.h5.tmp-1', "
            "file descriptor = 6, errno = 28, error message = 'No space left on device', buf = 0x5)")
    with pytest.raises(WriteError) as e, atomic_path(tmp_path / "s.h5"):
        raise OSError(hdf5)
    assert str(e.value) == f"cannot write {tmp_path / 's.h5'}: No space left on device"
    with pytest.raises(WriteError, match=r"s.h5: Can't close file \(unknown\)$"), atomic_path(tmp_path / "s.h5"):
        raise OSError("Can't close file (unknown)\nmore")


def test_a_writers_own_error_for_a_full_disk_is_told_in_the_os_words(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    with pytest.raises(WriteError, match=r"x.safetensors: No space left on device$"), \
            atomic_path(tmp_path / "x.safetensors") as tmp:  # safetensors quotes the errno
        tmp.write_bytes(b"part")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 10 << 20, 4096))
    with pytest.raises(WriteError, match=r"step-3.pt: No space left on device$"), \
            atomic_path(tmp_path / "step-3.pt") as tmp:  # torch.save says only this, with the disk full
        tmp.write_bytes(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(ValueError, match="a bug"), atomic_path(tmp_path / "step-4.pt") as tmp:
        tmp.write_bytes(b"part")
        raise ValueError("a bug")  # no write failure: its own traceback
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 10 << 20, 4096))
    with pytest.raises(CheckpointError, match="the caller's own"), atomic_path(tmp_path / "step-5.pt") as tmp:
        tmp.write_bytes(b"part")
        raise CheckpointError("the caller's own refusal")  # not taken for a full disk, however full
    assert list(tmp_path.iterdir()) == []  # no temporary is left behind


def test_the_callers_error_class_is_raised(tmp_path):
    with pytest.raises(CheckpointError, match="student.pt"), atomic_path(tmp_path / "student.pt", CheckpointError) as tmp:
        raise OSError(13, "Permission denied", str(tmp))


def test_an_interrupted_write_removes_its_temporary_and_keeps_the_old_file(tmp_path):
    p = tmp_path / "rows.json"
    p.write_text("whole\n")
    with pytest.raises(KeyboardInterrupt), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert p.read_text() == "whole\n" and [f.name for f in tmp_path.iterdir()] == ["rows.json"]


def test_a_temporary_left_by_a_kill_is_not_taken_for_a_checkpoint(tmp_path):
    with atomic_path(tmp_path / "step-00000003.pt") as tmp:
        assert tmp.name.startswith(".") and tmp.suffix != ".pt"
        assert not list(tmp_path.glob("step-*.pt")) and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert [p.name for p in tmp_path.glob("*.pt")] == ["step-00000003.pt"]


def test_a_written_file_gets_the_usual_mode_even_from_an_owner_only_writer(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file

    mask = os.umask(0o022)
    os.umask(mask)
    out = tmp_path / "t.safetensors"
    with atomic_path(out) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors creates its files 0600
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_make_dir_creates_parents_and_accepts_an_existing_folder(tmp_path):
    p = make_dir(tmp_path / "a" / "b")
    assert p.is_dir() and make_dir(p) == p


@pytest.mark.parametrize("sub", ["", "x", "x/y"])
def test_a_folder_that_cannot_be_made_names_the_file_in_its_way(tmp_path, sub):
    (tmp_path / "f").write_text("data\n")
    with pytest.raises(WriteError, match=r"cannot create the folder .*: .*f is a file, not a folder"):
        make_dir(tmp_path / "f" / sub)
    assert (tmp_path / "f").read_text() == "data\n"


def test_a_write_under_a_file_is_the_callers_error_naming_the_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(CheckpointError, match=r"f is a file, not a folder"):
        write_text(tmp_path / "f" / "run" / "a.json", "{}", CheckpointError)


def test_a_failed_block_removes_the_empty_folders_it_made_and_nothing_else(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(WriteError), removed_if_left_empty(tmp_path / "a" / "b"), removed_if_left_empty(tmp_path / "kept"):
        make_dir(tmp_path / "a" / "b")
        raise WriteError("refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # a/b and a gone; kept was there before


def test_a_failed_block_keeps_a_folder_that_holds_a_file_and_a_successful_one_keeps_all(tmp_path):
    with pytest.raises(KeyboardInterrupt), removed_if_left_empty(tmp_path / "a" / "run"):
        write_text(tmp_path / "a" / "run" / "kmeans.json", "{}")
        raise KeyboardInterrupt
    assert (tmp_path / "a" / "run" / "kmeans.json").read_text() == "{}"
    with removed_if_left_empty(tmp_path / "b"):
        make_dir(tmp_path / "b")
    assert (tmp_path / "b").is_dir()
