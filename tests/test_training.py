from __future__ import annotations

from dataclasses import replace

import pytest

from ofactl.config import load_config, save_resolved
from ofactl.distill import DistillConfig
from ofactl.errors import CheckpointError
from ofactl.training import check_resume_settings


def _run_with_config(tmp_path):
    cfg = load_config(DistillConfig, "distill", "distill-tiny")
    save_resolved(cfg, "distill", tmp_path / "config.yaml")
    return cfg


def test_resume_under_the_same_settings_or_only_free_ones_passes(tmp_path):
    cfg = _run_with_config(tmp_path)
    check_resume_settings(cfg, "distill", tmp_path)
    check_resume_settings(replace(cfg, steps=cfg.steps * 2, device="cpu", num_workers=0, log_every=1), "distill",
                          tmp_path)


def test_resume_under_other_settings_names_each_with_both_values(tmp_path):
    cfg = _run_with_config(tmp_path)
    other = replace(cfg, alignment="upsample", seed=3)
    other.optim = replace(cfg.optim, lr=cfg.optim.lr / 2)
    with pytest.raises(CheckpointError) as e:
        check_resume_settings(other, "distill", tmp_path)
    msg = str(e.value)
    assert "alignment: 'compress' -> 'upsample'" in msg and "seed: 0 -> 3" in msg
    assert f"optim.lr: {cfg.optim.lr!r} -> {cfg.optim.lr / 2!r}" in msg
    assert f"-c {tmp_path / 'config.yaml'}" in msg and "--overwrite" in msg


def test_keys_only_one_side_has_are_not_compared(tmp_path):
    """A run written before a setting existed still resumes (its config.yaml lacks the key)."""
    cfg = _run_with_config(tmp_path)
    text = (tmp_path / "config.yaml").read_text().replace("  compress_weight: frame\n", "")
    (tmp_path / "config.yaml").write_text(text)
    check_resume_settings(cfg, "distill", tmp_path)


def test_a_damaged_or_foreign_record_is_one_clear_error(tmp_path):
    cfg = _run_with_config(tmp_path)
    (tmp_path / "config.yaml").write_text("distill: [unclosed\n")
    with pytest.raises(CheckpointError, match="cannot read .*config.yaml"):
        check_resume_settings(cfg, "distill", tmp_path)
    (tmp_path / "config.yaml").write_text("pretrain:\n  steps: 3\n")
    with pytest.raises(CheckpointError, match="holds no 'distill' settings"):
        check_resume_settings(cfg, "distill", tmp_path)
