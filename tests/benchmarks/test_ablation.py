"""benchmarks/ablation.py: a kept student is scored under a variant's name only if it was
distilled with that variant's settings."""
from __future__ import annotations

from dataclasses import replace

import pytest

from ofactl.config import load_config, save_resolved
from ofactl.distill import DistillConfig


@pytest.fixture(scope="module")
def ablation(load_benchmark):
    return load_benchmark("ablation")


def test_a_kept_student_of_the_same_recipe_is_reused(ablation, tmp_path):
    cfg = load_config(DistillConfig, "distill", "distill-tiny-fbank")
    saved = replace(cfg, student=replace(cfg.student, teacher_dim=128))  # distill records the teacher's width
    save_resolved(saved, "distill", tmp_path / "config.yaml")
    assert cfg.student.teacher_dim == 0
    assert ablation.same_recipe(tmp_path, cfg) == tmp_path
    # a normalising teacher (builtin:hubert-tiny-v2, -v3) turns the student's normalisation on
    arch = replace(saved.student.arch, normalize_waveform=True)
    save_resolved(replace(saved, student=replace(saved.student, arch=arch)), "distill", tmp_path / "config.yaml")
    assert not cfg.student.arch.normalize_waveform and ablation.same_recipe(tmp_path, cfg) == tmp_path
    # which a student of a teacher without it has off: the record of such a student is not mistaken
    save_resolved(saved, "distill", tmp_path / "config.yaml")
    with pytest.raises(SystemExit, match="normalize_waveform: False -> True"):
        ablation.same_recipe(tmp_path, replace(cfg, student=replace(cfg.student, arch=arch)))


def test_a_kept_student_of_another_recipe_is_refused_naming_the_setting(ablation, tmp_path):
    cfg = load_config(DistillConfig, "distill", "distill-tiny-fbank")
    save_resolved(cfg, "distill", tmp_path / "config.yaml")
    with pytest.raises(SystemExit, match="alignment: 'compress' -> 'upsample'"):
        ablation.same_recipe(tmp_path, replace(cfg, alignment="upsample"))


def test_a_damaged_record_is_one_clear_exit(ablation, tmp_path):
    cfg = load_config(DistillConfig, "distill", "distill-tiny-fbank")
    (tmp_path / "config.yaml").write_text("distill: [unclosed\n")
    with pytest.raises(SystemExit, match=r"cannot be checked \(cannot read .*config.yaml"):
        ablation.same_recipe(tmp_path, cfg)
    (tmp_path / "config.yaml").write_text("adapt:\n  task: pr\n")
    with pytest.raises(SystemExit, match="holds no 'distill' settings"):
        ablation.same_recipe(tmp_path, cfg)


def test_sweeps_and_figures_with_several_probes_are_kept_beside_the_one_probe_ones(ablation, tmp_path):
    import argparse

    args = argparse.Namespace(out=str(tmp_path), pr_head="conv", probe_runs=5, adapt_set=[])
    assert ablation.sweep_dir(args, "ofactl", 3, "pr").name == "ofactl-s3-pr-conv-probes5"
    assert ablation.sweep_dir(args, "ofactl", 3, "sid", probe_runs=1).name == "ofactl-s3-sid"
    assert ablation.report_stem(args) == "ablation-probes5"
    assert ablation.report_stem(argparse.Namespace(pr_head="conv", probe_runs=1, adapt_set=[])) == "ablation"
    assert ablation.figure_path(args, "ofa-vs-fixed", "sid").name == "ofa-vs-fixed-sid-probes5.png"
    args.probe_runs = 1
    assert ablation.figure_path(args, "ofa-vs-fixed", "pr").name == "ofa-vs-fixed-pr-conv.png"


def test_a_student_gone_with_its_sweeps_kept_is_read_not_distilled_again(ablation, tmp_path):
    import argparse

    args = argparse.Namespace(out=str(tmp_path), pr_head="conv", probe_runs=1, adapt_set=[], no_adaptive_sweeps=False)
    units = ablation.sweep_units("ofactl", ["pr", "ks"], args)
    assert units == [("pr", "ofactl", False), ("pr", "ofactl-adaptive-length", True),
                     ("ks", "ofactl", False), ("ks", "ofactl-adaptive-length", True)]
    assert ablation.sweep_units("upsample", ["pr"], args) == [("pr", "upsample", False)]
    for task, _, adaptive in units:
        assert not ablation.swept_without_student("ofactl", 0, units, args)  # a sweep still to run
        done = ablation.sweep_dir(args, "ofactl", 0, task, adaptive)
        done.mkdir(parents=True)
        (done / "sweep.json").write_text("{}")
    assert ablation.swept_without_student("ofactl", 0, units, args)
    kept = tmp_path / "students" / "ofactl-s0" / "student.pt"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"")
    assert not ablation.swept_without_student("ofactl", 0, units, args)  # kept: its recipe is checked first


def test_sid_large_is_speaker_id_on_synth_tinys_voices_with_more_sentences(ablation, tmp_path, monkeypatch):
    import argparse
    from types import SimpleNamespace

    import ofactl.synth

    made = []

    def fake_synth(cfg, out_dir, **_):
        made.append(cfg)
        return SimpleNamespace(manifest=out_dir / "manifest.tsv")

    monkeypatch.setattr(ofactl.synth, "run_synth", fake_synth)
    args = argparse.Namespace(out=str(tmp_path))
    task, corpus = ablation.task_corpus("sid-large", args, tmp_path / "synth-tiny")
    assert (task, corpus) == ("sid", tmp_path / "synth-sid-large" / "manifest.tsv")
    cfg = made[0]
    # synth-tiny's voices and keywords (the same seed and speakers), 200 sentences each: 24 x 230 utterances
    assert (cfg.seed, cfg.n_speakers, cfg.keyword_takes, cfg.sentences_per_speaker) == (0, 24, 3, 200)
    assert ablation.task_corpus("sid", args, tmp_path / "synth-tiny") == ("sid", tmp_path / "synth-tiny")


def test_a_figure_needs_two_variants_so_a_run_of_one_leaves_the_full_figure(ablation, tmp_path):
    import argparse

    from conftest import sweep_row

    args = argparse.Namespace(out=str(tmp_path), pr_head="conv", probe_runs=1)
    rows = {s: [sweep_row(1.0, 0.8), sweep_row(0.5, 0.7)] for s in (0, 1)}
    full = tmp_path / "ofa-vs-fixed-sid.png"
    full.write_bytes(b"the figure of every variant")
    assert ablation.figures({"ofactl": {"sid": rows}}, ["sid"], [0, 1], args) == []
    assert full.read_bytes() == b"the figure of every variant"
    fixed = {s: [sweep_row(0.5, 0.6)] for s in (0, 1)}
    written = ablation.figures({"ofactl": {"sid": rows}, "avgpool-0.5": {"sid": fixed}}, ["sid"], [0, 1], args)
    assert written == [str(full)] and full.read_bytes().startswith(b"\x89PNG")
