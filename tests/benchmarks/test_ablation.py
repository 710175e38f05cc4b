"""benchmarks/ablation.py: a kept student is scored under a variant's name only if it was
distilled with that variant's settings."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
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


def test_a_kept_adapt_run_from_before_a_setting_reads_as_the_value_it_ran_with(ablation, tmp_path):
    """A run kept from before ``band_edges`` existed drew its probe's lambdas with ``clamp``: it
    is reused for ``clamp`` and not for ``inside``, whatever the default is."""
    from ofactl.adapt import AdaptConfig

    cfg = load_config(AdaptConfig, "adapt", None, ["task=sid", "seed=3", "band_edges=clamp"])
    save_resolved(cfg, "adapt", tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "band_edges: clamp" in text
    (tmp_path / "config.yaml").write_text(text.replace("  band_edges: clamp\n", ""))  # as such runs recorded it
    assert ablation.adapt_differences(tmp_path, replace(cfg, band_edges="clamp")) == []
    assert ablation.adapt_differences(tmp_path, replace(cfg, band_edges="inside")) == ["band_edges"]
    assert ablation.adapt_differences(tmp_path, replace(cfg, band_edges="clamp", seed=4)) == ["seed"]


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


def test_runs_side_by_side_wait_for_the_corpus_another_one_is_checking(ablation, tmp_path, monkeypatch, capsys):
    import threading
    from types import SimpleNamespace

    import ofactl.synth
    from ofactl.pidlock import run_folder_lock
    from ofactl.progress import NullProgress

    def locking_synth(cfg, out_dir, **_):  # as run_synth: the folder's lock held while it is checked
        with run_folder_lock(out_dir, "synth", NullProgress()):
            return SimpleNamespace(manifest=out_dir / "manifest.tsv")

    monkeypatch.setattr(ofactl.synth, "run_synth", locking_synth)
    monkeypatch.setattr(ablation, "BUSY_POLL_S", 0.05)
    folder, held, release = tmp_path / "synth-sid-large", threading.Event(), threading.Event()

    def other_run() -> None:  # another ablation run checking the same corpus
        with run_folder_lock(folder, "synth", NullProgress()):
            held.set()
            release.wait(5)

    t = threading.Thread(target=other_run)
    t.start()
    held.wait(5)
    threading.Timer(0.3, release.set).start()
    assert ablation.synth_manifest(folder, ("n_sentences=9",)) == folder / "manifest.tsv"
    t.join()
    assert release.is_set()  # it returned only after the other run let go
    assert capsys.readouterr().err.count("waiting: ") == 1  # said once, not at every poll


def test_sid_fsdd_is_speaker_id_on_fsdds_speakers_split_by_the_probes_seed(ablation, tmp_path):
    import argparse

    import soundfile as sf

    from ofactl.audio import read_corpus
    from ofactl.probe import build_task

    rec = tmp_path / "recordings"
    rec.mkdir()
    for speaker in ("jackson", "theo", "lucas"):
        for take in range(10):
            sf.write(rec / f"{take % 3}_{speaker}_{take}.wav", np.zeros(800, dtype=np.float32), 8000)
    args = argparse.Namespace(out=str(tmp_path / "out"), fsdd=str(rec))

    task, manifest = ablation.task_corpus("sid-fsdd", args, tmp_path / "synth-tiny")

    assert (task, manifest) == ("sid", tmp_path / "out" / "fsdd-sid.tsv")
    assert manifest.read_text().splitlines()[0] == "id\tpath\tlabel\tspeaker"  # no split: sid draws its own
    corpus = read_corpus(str(manifest))
    assert len(corpus) == 30
    for seed in (0, 1):  # every speaker in every split, 80/10/10 of its ten recordings
        splits = build_task("sid", corpus, seed=seed).splits
        for split, n in (("train", 8), ("dev", 1), ("test", 1)):
            speakers = [i.split("_")[1] for i in splits[split]]
            assert sorted(speakers) == sorted(["jackson", "lucas", "theo"] * n)
    assert build_task("sid", corpus, seed=0).splits["test"] != build_task("sid", corpus, seed=1).splits["test"]
    ks, ks_manifest = ablation.task_corpus("ks-fsdd", args, tmp_path / "synth-tiny")
    assert ks == "ks" and ks_manifest.read_text().splitlines()[0].endswith("\tsplit")


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


def _run_main(ablation, monkeypatch, tmp_path, argv):
    """main() with the work replaced by records: the (report mode, variants, seeds, tasks) of each pass."""
    import sys

    passes = []

    def fake_collect(names, seeds, tasks, args, corpus):
        passes.append((args.report, list(names), list(seeds), list(tasks)))
        return {}, []

    monkeypatch.setattr(ablation, "collect", fake_collect)
    monkeypatch.setattr(ablation, "adapt_results", lambda *a: {})
    monkeypatch.setattr(ablation, "_corpus", lambda args: tmp_path / "manifest.tsv")
    monkeypatch.setattr(ablation, "emit", lambda doc: None)
    monkeypatch.setattr(sys, "argv", ["ablation.py", "--out", str(tmp_path), "--adapt", "", "--fsdd", str(tmp_path), *argv])
    ablation.main()
    return passes


def test_a_run_of_some_seeds_adds_to_the_folders_report_and_report_names_a_narrower_one(ablation, tmp_path,
                                                                                     monkeypatch, capsys):
    import json

    passes = _run_main(ablation, monkeypatch, tmp_path, ["--seeds", "0,1", "--variants", "ofactl,avgpool-0.5",
                                                         "--tasks", "pr,sid"])
    assert passes == [(False, ["ofactl", "avgpool-0.5"], [0, 1], ["pr", "sid"]),
                      (True, ["ofactl", "avgpool-0.5"], [0, 1], ["pr", "sid"])]
    doc = json.loads((tmp_path / "ablation.json").read_text())
    assert (doc["seeds"], list(doc["variants"]), doc["tasks"]) == ([0, 1], ["ofactl", "avgpool-0.5"], ["pr", "sid"])
    # a later run of one seed, variant and task trains only those and keeps the rest in the report
    passes = _run_main(ablation, monkeypatch, tmp_path, ["--seeds", "2", "--variants", "ofactl", "--tasks", "ks"])
    assert passes == [(False, ["ofactl"], [2], ["ks"]), (True, ["ofactl", "avgpool-0.5"], [0, 1, 2], ["pr", "sid", "ks"])]
    assert "also covered variants ofactl,avgpool-0.5, seeds 0,1,2, tasks pr,sid,ks" in capsys.readouterr().err
    doc = json.loads((tmp_path / "ablation.json").read_text())
    assert (doc["seeds"], list(doc["variants"]), doc["tasks"]) == ([0, 1, 2], ["ofactl", "avgpool-0.5"], ["pr", "sid", "ks"])
    # --report writes what it names
    assert _run_main(ablation, monkeypatch, tmp_path, ["--seeds", "2", "--variants", "ofactl", "--tasks", "ks",
                                                       "--report"]) == [(True, ["ofactl"], [2], ["ks"])]
    # another report name (another adapt setting) is a report of its own
    assert _run_main(ablation, monkeypatch, tmp_path, ["--seeds", "3", "--variants", "ofactl", "--tasks", "ks",
                                                       "--adapt-set", "cost=0.1"])[-1] == (True, ["ofactl"], [3], ["ks"])
    # an unreadable report is replaced by one of this run, saying so
    (tmp_path / "ablation.json").write_text("{not json")
    assert _run_main(ablation, monkeypatch, tmp_path, ["--seeds", "4", "--variants", "ofactl", "--tasks", "ks"])[-1] == (
        True, ["ofactl"], [4], ["ks"])
    assert "ablation.json is unreadable (JSONDecodeError" in capsys.readouterr().err


def _adapt_run(seed: int, rate: float, curve: list[float]) -> dict:
    """An adapt run's kept fields, compared with a sweep at rates 0.25 / 0.33 / 0.5 / 1."""
    xs = [0.25, 0.33, 0.5, 1.0]
    return {"seed": seed, "learned_rate": rate, "cost": 0.05, "comparison": {
        "sweep_rates": xs, "sweep_metric": curve, "best_sweep_metric": max(curve),
        "sweep_at_learned_rate": float(np.interp(rate, xs, curve)), "dev_choice_rate": 0.25}}


def test_the_second_target_orders_ks_and_sid_below_pr_and_holds_each_run_to_its_cost(ablation):
    pr = [_adapt_run(s, 0.48, [0.74, 0.89, 0.92, 0.9]) for s in (0, 1)]  # 1 - PER: its best at 0.5
    sid = [_adapt_run(0, 0.25, [0.66, 0.71, 0.79, 0.69]),  # 13 points below the best: missed
           _adapt_run(1, 0.36, [0.66, 0.69, 0.68, 0.66])]
    ks = [_adapt_run(0, 0.27, [1.0] * 4), _adapt_run(1, 0.6, [1.0] * 4)]  # seed 1 above pr: missed
    fsdd = [_adapt_run(s, 0.8, [0.85, 0.87, 0.88, 0.88]) for s in (0, 1)]  # the cost alone counts
    sid_fsdd = [_adapt_run(s, 0.8, [0.97, 0.98, 0.98, 0.98]) for s in (0, 1)]  # flat, but above pr
    adapt = {"pr": {"difference": pr}, "sid": {"difference": sid}, "ks": {"difference": ks},
             "ks-fsdd": {"difference": fsdd}, "sid-fsdd": {"difference": sid_fsdd}}

    got = ablation.second_target(adapt)["difference"]

    assert got["met_every_seed"] == {"pr": True, "sid": False, "ks": False, "ks-fsdd": True, "sid-fsdd": False}
    assert not got["tasks"]["sid-fsdd"]["0"]["below_pr"]
    miss = got["tasks"]["sid"]["0"]
    assert not miss["met"] and miss["below_pr"] and miss["below_best"] == pytest.approx(0.13)
    lo, hi = miss["test_window"][0]  # where sid is within 5 points of 0.79 and below pr's 0.48
    assert len(miss["test_window"]) == 1 and 0.39 < lo < 0.42 and 0.47 < hi < 0.48
    assert got["tasks"]["sid"]["1"]["met"] and got["tasks"]["ks"]["0"]["met"]
    assert not got["tasks"]["ks"]["1"]["below_pr"] and not got["tasks"]["ks"]["1"]["met"]
    assert got["tasks"]["ks-fsdd"]["0"]["test_window"] == [[0.25, 1.0]]  # not bounded by pr's rate
    table = "\n".join(ablation._target_markdown(ablation.second_target(adapt)))
    assert "| sid | 0 | 0.250 | 13.0 | true | **no** | 0.39-0.48 | 0.25 |" in table
    assert "`pr` settles at a higher rate than each of `sid`, `ks`, `sid-fsdd`," in table  # those it holds
    assert "Met with every seed: pr yes, sid no, ks no, ks-fsdd yes, sid-fsdd no." in table


def test_a_report_of_the_default_alone_has_no_empty_comparison_tables(ablation):
    cells = {"rates": {"1": {"mean": 0.9, "spread": 0.01, "seeds": [0.9, 0.89]}}, "metric": "accuracy"}
    alone = {"rates": [1.0], "table": {"ofactl": {"ks": cells}}, "against_default": {},
             "ofa_vs_fixed": {"ofactl": {"ks": {}}}}
    fixed_row = {"metric": "accuracy", "rate": 0.5, "fixed": 0.91, "ofa": 0.9, "ofa_minus_fixed": -0.01}
    both = alone | {"table": {"ofactl": {"ks": cells}, "avgpool-0.5": {"ks": cells}},
                    "ofa_vs_fixed": {"ofactl": {"ks": {"avgpool-0.5": fixed_row}}}}

    text, with_fixed = ablation.markdown(alone), ablation.markdown(both)

    assert "Against the default" not in text and "Once-for-all against" not in text and "\n\n\n" not in text
    assert "| ofactl | 2 | 0.900 (0.010) |" in text
    assert "\n\n**Once-for-all against" in with_fixed and "| ofactl | ks (accuracy) | avgpool-0.5 | 0.5 | 0.910 | 0.900 | -0.010 |" in with_fixed
    assert "\n\n\n" not in with_fixed
