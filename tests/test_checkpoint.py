from __future__ import annotations

import pytest
import torch

from ofactl.about import describe_path
from ofactl.checkpoint import describe_checkpoint, load_student, read_checkpoint, save_student
from ofactl.errors import CheckpointError
from ofactl.model.student import Student, student_config


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    s = Student(student_config("tiny"))
    s.compressor.alpha_mean.fill_(0.31)
    return save_student(tmp_path / "student.pt", s, step=7, teacher={"source": "random:tiny"}), s


def test_round_trip(ckpt):
    path, s = ckpt
    loaded, payload = load_student(path)
    assert payload["step"] == 7 and loaded.alpha_mean == pytest.approx(0.31)
    for k, v in s.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    wav = torch.randn(1, 8000)
    L = torch.tensor([8000])
    s.eval()
    assert torch.equal(s(wav, L, rate=0.5).hidden.states, loaded(wav, L, rate=0.5).hidden.states)
    assert not list(path.parent.glob(".*tmp*"))  # the atomic write left no temp file


def test_duration_embedding_survives_save_and_load_and_older_students_load_without_it(tmp_path):
    from dataclasses import replace

    torch.manual_seed(0)
    s = Student(replace(student_config("tiny"), duration_embed=True)).eval()
    loaded, _ = load_student(save_student(tmp_path / "d.pt", s))
    assert loaded.cfg.duration_embed and loaded.compressor.duration is not None
    wav, L = torch.randn(1, 8000), torch.tensor([8000])
    assert torch.equal(s(wav, L, rate=0.25).hidden.states, loaded(wav, L, rate=0.25).hidden.states)
    obj = read_checkpoint(save_student(tmp_path / "old.pt", Student(student_config("tiny"))))
    del obj["student"]["duration_embed"]  # written before the setting existed
    assert load_student(tmp_path / "old.pt", payload=obj)[0].compressor.duration is None


def test_describe(ckpt):
    path, _ = ckpt
    d = describe_checkpoint(path)
    assert d["step"] == 7 and d["hidden_states"] == 3 and d["compressor"] == "cif"
    assert len(d["sha256"]) == 64 and describe_path(path)["kind"] == "student checkpoint"


def test_corrupt_truncated_and_foreign(ckpt, tmp_path):
    path, _ = ckpt
    data = path.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="trunc.pt: corrupt or truncated"):
        read_checkpoint(trunc)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        read_checkpoint(empty)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not an ofactl student checkpoint"):
        read_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    from safetensors.torch import save_file

    weights = tmp_path / "teacher.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    with pytest.raises(CheckpointError, match="safetensors weights .*, not an ofactl student checkpoint; teachers go"):
        read_checkpoint(weights)


def test_mismatched_weights(ckpt, tmp_path):
    path, _ = ckpt
    obj = read_checkpoint(path)
    obj["student"]["arch"]["embed_dim"] = 32
    obj["student"]["arch"]["pos_conv_groups"] = 4
    bad = tmp_path / "bad.pt"
    torch.save(obj, bad)
    with pytest.raises(CheckpointError, match="do not match the stored architecture"):
        load_student(bad)
    obj["format_version"] = 99
    torch.save(obj, bad)
    with pytest.raises(CheckpointError, match="format version 99"):
        read_checkpoint(bad)


def test_trained_rates_survive_save_and_load(tmp_path):
    from dataclasses import replace

    from ofactl.checkpoint import covers, describe_checkpoint, rates_trained, read_checkpoint, save_student
    from ofactl.config import load_config
    from ofactl.distill import DistillConfig, trained_rates, with_fixed_rate
    from ofactl.model.student import Student, student_config

    cfg = load_config(DistillConfig, "distill", "distill-tiny")
    ofa = trained_rates(cfg, 0.3)
    assert ofa == {"kind": "range", "min": round(20 / cfg.rates.max_ms, 4), "max": round(20 / cfg.rates.min_ms, 4)}
    assert trained_rates(with_fixed_rate(cfg, 0.25), 0.3) == {"kind": "fixed", "rates": [0.25]}
    avg = replace(cfg, student=replace(cfg.student, compressor="avgpool"))
    assert trained_rates(with_fixed_rate(avg, 0.5), 0.3) == {"kind": "fixed", "rates": [0.5]}
    lam = replace(cfg, rates=replace(cfg.rates, kind="lambda", lambda_min=0.0, lambda_max=1.0))
    assert trained_rates(lam, 0.25) == {"kind": "range", "min": 0.25, "max": 1.0}
    p = save_student(tmp_path / "s.pt", Student(student_config("tiny")), trained_rates=ofa)
    assert rates_trained(read_checkpoint(p)) == ofa
    assert describe_checkpoint(p)["trained_rates"] == ofa
    assert covers(ofa, 0.5) and not covers(ofa, 0.2) and covers(None, 0.1)
    assert covers({"kind": "fixed", "rates": [0.333]}, 0.3333) and not covers({"kind": "fixed", "rates": [0.5]}, 0.25)


def test_the_training_level_survives_save_and_load_and_older_files_have_none(tmp_path):
    s = Student(student_config("tiny"))
    s.input_level_db = -23.4
    p = save_student(tmp_path / "s.pt", s)
    loaded, payload = load_student(p)
    assert loaded.input_level_db == -23.4 and describe_checkpoint(p)["input_level_db"] == -23.4
    del payload["input_level_db"]  # a file written before the level was recorded
    torch.save(payload, tmp_path / "old.pt")
    assert load_student(tmp_path / "old.pt")[0].input_level_db is None
    assert describe_checkpoint(tmp_path / "old.pt")["input_level_db"] is None


def test_a_distill_run_folder_stands_for_its_student(tmp_path):
    from ofactl.checkpoint import file_sha256, student_file
    from ofactl.sweep import parse_ckpts

    torch.manual_seed(0)
    run = tmp_path / "tiny"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("distill:\n  steps: 10\n")
    for step in (4, 8):
        save_student(run / "checkpoints" / f"step-{step:08d}.pt", Student(student_config("tiny")), step=step)
    with pytest.raises(CheckpointError, match=r"tiny: an 'ofactl distill' run that has not finished \(student.pt is "
                       r"written when it ends\); its newest checkpoint, .*step-00000008.pt, is a student too"):
        load_student(run)
    assert read_checkpoint(run / "checkpoints" / "step-00000008.pt")["step"] == 8  # which loads as one
    save_student(run / "student.pt", Student(student_config("tiny")), step=10)
    assert student_file(run) == run / "student.pt" and load_student(run)[1]["step"] == 10
    assert parse_ckpts([str(run), f"b={run}"]) == [("tiny", run / "student.pt"), ("b", run / "student.pt")]
    assert file_sha256(student_file(run)) == file_sha256(run / "student.pt")
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "config.yaml").write_text("pretrain:\n  steps: 10\n")
    with pytest.raises(CheckpointError, match=r"pre: an 'ofactl pretrain' run folder; it makes a teacher"):
        load_student(pre)
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file \(nor a distill run folder"):
        load_student(tmp_path)
