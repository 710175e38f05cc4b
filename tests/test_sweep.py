from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ofactl.checkpoint import save_student
from ofactl.cli import app
from ofactl.model.student import Student, student_config
from ofactl.storage import open_store


@pytest.mark.slow
def test_sweep_outputs_and_resume(tmp_path, synth_corpus):
    torch.manual_seed(0)
    ckpt = save_student(tmp_path / "s.pt", Student(student_config("tiny")))
    args = ["sweep", "--ckpt", f"ofa={ckpt}", "--corpus", str(synth_corpus), "--task", "ks", "--rates", "1,0.5",
            "--out", str(tmp_path / "sw"), "--set", "probe.cls_epochs=3", "--set", "extract.num_workers=0", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict) and doc["csv"].endswith("sweep.csv")  # an object, like every command's
    rows = doc["rows"]
    assert [x["requested_rate"] for x in rows] == [1.0, 0.5]
    assert all(x["probe_train_s"] > 0 for x in rows)
    assert rows[1]["upstream_gmacs_per_s"] < rows[0]["upstream_gmacs_per_s"]
    assert abs(rows[1]["frame_period_ms"] - 40) < 4 and rows[0]["metric"] == "accuracy"
    out = tmp_path / "sw"
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    assert plt.imread(out / "tradeoff.png").shape[2] in (3, 4)
    # rerun: finished rows are reused, no probe is trained
    r2 = CliRunner().invoke(app, args[:-1])
    assert r2.exit_code == 0 and "2 row(s) reused" in r2.stderr and "probe" in r2.stderr  # the probe-seconds column
    # a CTC head's settings do not shape a keyword probe: its rows stay
    r2b = CliRunner().invoke(app, args[:-1] + ["--set", "probe.ctc_head=linear", "--set", "probe.conv_hidden=8"])
    assert r2b.exit_code == 0 and "2 row(s) reused" in r2b.stderr, r2b.output
    # a row record cut short (a kill or a full disk before writes were atomic) is measured again
    cut = sorted((out / "rows").glob("*.json"))[0]
    cut.write_text(cut.read_text()[:40])
    r2c = CliRunner().invoke(app, args[:-1])
    assert r2c.exit_code == 0 and "(1 row(s) reused)" in r2c.stderr and "unreadable" in r2c.stderr, r2c.output
    assert json.loads(cut.read_text())["requested_rate"] in (1.0, 0.5)  # written whole again
    # other probe settings are another experiment: the rows are trained again
    r3 = CliRunner().invoke(app, args[:-1] + ["--set", "probe.lr=0.003"])
    assert r3.exit_code == 0 and "(0 row(s) reused)" in r3.stderr
    # the same utterances split otherwise are another task: no row of the first corpus is reused
    lines = synth_corpus.read_text().splitlines()
    col, path_col = lines[0].split("\t").index("split"), lines[0].split("\t").index("path")
    swapped = {"train": "test", "test": "train", "dev": "dev"}

    def moved(i: int, v: str) -> str:  # the split swapped; the paths absolute, the manifest elsewhere
        return swapped.get(v, v) if i == col else str(synth_corpus.parent / v) if i == path_col else v

    other = tmp_path / "resplit.tsv"  # not beside the shared corpus: its folder must stay as made
    other.write_text("\n".join([lines[0]] + ["\t".join(moved(i, v) for i, v in enumerate(ln.split("\t")))
                                             for ln in lines[1:]]) + "\n")
    r4 = CliRunner().invoke(app, [a if a != str(synth_corpus) else str(other) for a in args[:-1]])
    assert r4.exit_code == 0 and "(0 row(s) reused)" in r4.stderr, r4.output
    assert CliRunner().invoke(app, args[:-1]).stderr.count("reusing the finished row") == 0  # r4 replaced them
    # features taken otherwise (here: levelled) are another experiment: neither the store's
    # groups nor the rows are taken for them
    levelled = args[:-1] + ["--level-db", "-25"]
    r5 = CliRunner().invoke(app, levelled)
    assert r5.exit_code == 1 and "another --level-db" in r5.stderr and "--overwrite" in r5.stderr, r5.output
    r6 = CliRunner().invoke(app, levelled + ["--overwrite"])
    assert r6.exit_code == 0 and "(0 row(s) reused)" in r6.stderr, r6.output
    assert CliRunner().invoke(app, levelled).stderr.count("reusing the finished row") == 2
    # a folder carried with its result files alone (no rows/): sweep.json's rows are reused
    import shutil

    before = json.loads((out / "sweep.json").read_text())["rows"]
    shutil.rmtree(out / "rows")
    r7 = CliRunner().invoke(app, levelled + ["--json"])
    assert r7.exit_code == 0 and r7.stderr.count("reusing the finished row") == 2, r7.output
    assert json.loads(r7.stdout)["rows"] == before and json.loads(r7.stdout)["reused"] == 2
    # ... unless that file is cut short: then it vouches for nothing and the rows are measured again
    (out / "sweep.json").write_text((out / "sweep.json").read_text()[:100])
    r8 = CliRunner().invoke(app, levelled)
    assert r8.exit_code == 0 and "(0 row(s) reused)" in r8.stderr, r8.output


@pytest.mark.slow
def test_sweep_compares_checkpoints_and_pr_counts_infeasible(tmp_path, synth_corpus):
    from ofactl.probe import ProbeConfig
    from ofactl.sweep import SweepConfig, run_sweep

    torch.manual_seed(0)
    a = save_student(tmp_path / "a.pt", Student(student_config("tiny")))
    cfg_b = student_config("tiny")
    cfg_b.compressor = "avgpool"
    b = save_student(tmp_path / "b.pt", Student(cfg_b))
    cfg = SweepConfig(task="pr", rates=(1.0, 0.1), probe=ProbeConfig(epochs=2))
    cfg.extract.num_workers = 0
    res = run_sweep(cfg, [("ofa", a), ("avg", b)], synth_corpus, tmp_path / "sw")
    assert {r.label for r in res.rows} == {"ofa", "avg"} and len(res.rows) == 4
    low = [r for r in res.rows if r.requested_rate == 0.1]
    assert all(r.infeasible_test is not None and r.infeasible_test > 0 for r in low)


class _DeviceStrictStudent(torch.nn.Module):
    """Stands in for a student on another device than the caller's tensors: every input must
    already be on the device of its parameters (as on a GPU, where a mismatch is an error)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, device=device))
        self.calls = 0

    def features(self, wav, lengths, rates, **kw):
        assert wav.device == self.w.device and lengths.device == self.w.device, (wav.device, lengths.device)
        self.calls += 1
        return {}


def test_timing_runs_on_the_students_device(synth_corpus):
    from ofactl.audio import read_corpus
    from ofactl.sweep import _time_extract

    student = _DeviceStrictStudent("meta")  # CPU tensors would trip the assertion
    s = _time_extract(student, read_corpus(synth_corpus), 0.5, 3)
    assert student.calls == 2 and s >= 0  # warm-up + timed pass, both on the student's device


def test_probe_and_extract_follow_the_commands_device():
    from dataclasses import replace

    from ofactl.sweep import SweepConfig

    cfg = SweepConfig(device="cpu").on_device()
    assert cfg.extract.device == "cpu" and cfg.probe.device == "cpu"
    explicit = SweepConfig(device="cpu")
    explicit.probe = replace(explicit.probe, device="cpu")
    explicit.extract = replace(explicit.extract, device="auto")
    assert explicit.on_device().probe.device == "cpu"
    assert SweepConfig().on_device().probe.device == ("cuda" if torch.cuda.is_available() else "cpu")


def _fixed_student(tmp_path, rate: float = 0.5):
    cfg = student_config("tiny")
    cfg.compressor = "avgpool"
    return save_student(tmp_path / f"fixed{rate}.pt", Student(cfg), trained_rates={"kind": "fixed", "rates": [rate]})


def test_a_fixed_rate_checkpoint_refuses_other_rates(tmp_path, synth_corpus):
    torch.manual_seed(0)
    ckpt = _fixed_student(tmp_path)
    r = CliRunner().invoke(app, ["sweep", "--ckpt", f"fixed0.5={ckpt}", "--corpus", str(synth_corpus),
                                 "--rates", "1,0.25", "--out", str(tmp_path / "sw")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert ("--ckpt fixed0.5: a fixed-rate student trained at rate 0.5 only; --rates asks for 1, 0.25: "
            "add 0.5 to score it") in r.stderr
    assert not (tmp_path / "sw").exists()  # refused before any work


def test_a_bad_file_names_sweeps_own_setting_that_goes_on(tmp_path, synth_corpus):
    torch.manual_seed(0)
    ckpt = save_student(tmp_path / "s.pt", Student(student_config("tiny")))
    lst = tmp_path / "list.txt"
    (tmp_path / "zero.wav").write_bytes(b"")
    lst.write_text(f"{tmp_path / 'zero.wav'}\n{next(synth_corpus.parent.rglob('*.wav'))}\n")
    r = CliRunner().invoke(app, ["sweep", "--ckpt", str(ckpt), "--corpus", str(lst), "--task", "sid",
                                 "--rates", "1", "--out", str(tmp_path / "sw")])
    assert r.exit_code == 1 and "zero.wav: empty file" in r.stderr, r.stderr
    assert "--set extract.on_error=skip leaves these files out" in r.stderr


def test_a_store_of_another_checkpoint_names_sweeps_own_flags(tmp_path, synth_corpus):
    from ofactl.extract import ExtractConfig, run_extract

    torch.manual_seed(0)
    a = save_student(tmp_path / "a.pt", Student(student_config("tiny")))
    b = save_student(tmp_path / "b.pt", Student(student_config("tiny")))
    run_extract(ExtractConfig(rates=(1.0,), num_workers=0, device="cpu"), a, synth_corpus, tmp_path / "f.zarr")
    r = CliRunner().invoke(app, ["sweep", "--ckpt", str(b), "--corpus", str(synth_corpus), "--task", "sid",
                                 "--rates", "1", "--store", str(tmp_path / "f.zarr"), "--out", str(tmp_path / "sw")])
    assert r.exit_code == 1 and "f.zarr/rate=1.000 was made with another checkpoint" in r.stderr, r.stderr
    assert "pass --overwrite to replace it or use another --store" in r.stderr


@pytest.mark.slow
def test_fixed_rate_checkpoints_are_scored_at_their_own_rate_only(tmp_path, synth_corpus):
    from ofactl.probe import ProbeConfig
    from ofactl.sweep import SweepConfig, run_sweep

    torch.manual_seed(0)
    ofa = save_student(tmp_path / "ofa.pt", Student(student_config("tiny")),
                       trained_rates={"kind": "range", "min": 0.4, "max": 1.0})
    fixed = _fixed_student(tmp_path)
    cfg = SweepConfig(task="ks", rates=(1.0, 0.5, 0.25), probe=ProbeConfig(cls_epochs=2))
    cfg.extract.num_workers = 0
    res = run_sweep(cfg, [("ofa", ofa), ("fixed0.5", fixed)], synth_corpus, tmp_path / "sw")
    got = {(r.label, r.requested_rate): r for r in res.rows}
    assert sorted(got) == [("fixed0.5", 0.5), ("ofa", 0.25), ("ofa", 0.5), ("ofa", 1.0)]
    assert res.not_scored == [{"label": "fixed0.5", "rate": 1.0, "reason": "trained at rate 0.5 only"},
                              {"label": "fixed0.5", "rate": 0.25, "reason": "trained at rate 0.5 only"}]
    assert got[("ofa", 0.25)].outside_training_range and not got[("ofa", 0.5)].outside_training_range
    assert got[("fixed0.5", 0.5)].fixed_rate and not got[("ofa", 0.5)].fixed_rate
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["not_scored"] == res.not_scored


def test_rates_outside_a_students_training_range_are_marked_in_the_table(tmp_path, synth_corpus):
    torch.manual_seed(0)
    ofa = save_student(tmp_path / "ofa.pt", Student(student_config("tiny")),
                       trained_rates={"kind": "range", "min": 0.4, "max": 1.0})
    r = CliRunner().invoke(app, ["sweep", "--ckpt", f"ofa={ofa}", "--corpus", str(synth_corpus), "--task", "ks",
                                 "--rates", "1,0.25", "--set", "probe.cls_epochs=2", "--set", "extract.num_workers=0",
                                 "--out", str(tmp_path / "sw")])
    assert r.exit_code == 0, r.output
    assert "ofa: trained on rates 0.4-1; rate 0.25 lies outside that range" in r.stderr
    table = [line.split() for line in r.stderr.splitlines() if line.split()[:1] == ["ofa"] and "rate=" not in line]
    assert [cells[1] for cells in table] == ["1", "0.25*"]  # the rate cell carries the mark, rate 1 none
    assert "* outside the rates ofa was trained on rates 0.4-1" in r.stderr


def test_quiet_recordings_are_reported_once_per_checkpoint_with_the_sweeps_own_setting(tmp_path):
    import numpy as np
    import soundfile as sf

    from ofactl.progress import NullProgress
    from ofactl.sweep import SweepConfig, run_sweep

    rng = np.random.default_rng(0)
    rows = ["id\tpath\tlabel\tsplit"]
    for i, split in enumerate(["train"] * 4 + ["dev"] * 2 + ["test"] * 2):
        x = 0.3 * np.sin(2 * np.pi * (150 + 100 * (i % 2)) * np.arange(8000) / 16000) + 0.05 * rng.standard_normal(8000)
        sf.write(str(tmp_path / f"u{i}.wav"), (x / (100 if i < 2 else 1)).astype(np.float32), 16000, subtype="FLOAT")
        rows.append(f"u{i}\t{tmp_path / f'u{i}.wav'}\t{'ab'[i % 2]}\t{split}")
    (tmp_path / "m.tsv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    ckpt = save_student(tmp_path / "s.pt", Student(student_config("tiny")))
    cfg = SweepConfig(task="ks", rates=(1.0, 0.5), timing_utts=1, device="cpu")
    cfg.probe.cls_epochs = 2
    cfg.extract.num_workers = 0
    progress = NullProgress()
    run_sweep(cfg, [("ofa", ckpt)], tmp_path / "m.tsv", tmp_path / "sw", progress=progress)
    warnings = [m for m in progress.messages if m.startswith("warning:")]
    assert len(warnings) == 1, warnings  # two rates extracted, one report
    assert "2 of 8 recording(s) are quieter than -35 dBFS" in warnings[0]
    assert "--level-db -25 levels every recording" in warnings[0]
    # a student that records its training level: the warning offers auto, and auto levels each
    # checkpoint's recordings to its own level
    s = Student(student_config("tiny"))
    s.input_level_db = -20.0
    known = save_student(tmp_path / "known.pt", s)
    progress = NullProgress()
    run_sweep(cfg, [("known", known)], tmp_path / "m.tsv", tmp_path / "sw2", progress=progress)
    warnings = [m for m in progress.messages if m.startswith("warning:")]
    assert len(warnings) == 1 and "--level-db auto (the -20 dBFS" in warnings[0]
    cfg.extract.level_db = "auto"
    progress = NullProgress()
    res = run_sweep(cfg, [("known", known)], tmp_path / "m.tsv", tmp_path / "sw3", progress=progress)
    assert not [m for m in progress.messages if m.startswith("warning:")]
    assert {open_store(Path(r.store_group).parent).group(r.requested_rate).attrs["level_db"] for r in res.rows} == {-20.0}


def test_probe_runs_report_the_mean_of_successive_probe_seeds(tmp_path, synth_corpus):
    torch.manual_seed(0)
    ckpt = save_student(tmp_path / "s.pt", Student(student_config("tiny")))
    base = ["sweep", "--ckpt", f"ofa={ckpt}", "--corpus", str(synth_corpus), "--task", "sid", "--rates", "0.5",
            "--set", "probe.cls_epochs=3", "--set", "probe.min_epochs=1", "--set", "extract.num_workers=0",
            "--store", str(tmp_path / "feats.zarr")]
    one = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "one"), "--json"])
    assert one.exit_code == 0, one.output
    row1 = json.loads(one.stdout)["rows"][0]
    assert row1["test_runs"] == [] and row1["test_sd"] is None
    three = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "three"), "--probe-runs", "3", "--json"])
    assert three.exit_code == 0, three.output
    row3 = json.loads(three.stdout)["rows"][0]
    runs = row3["test_runs"]
    assert len(runs) == 3 and runs[0] == row1["test"]  # the first probe is the one-probe row's
    assert row3["test"] == pytest.approx(sum(runs) / 3, abs=1e-5)
    assert row3["test_sd"] == pytest.approx(float(torch.tensor(runs).std()), abs=1e-5)
    with open(tmp_path / "three" / "sweep.csv") as f:
        assert float(next(csv.DictReader(f))["test_sd"]) == row3["test_sd"]
    # the number of probes keys the rows: one probe's rows are not taken for three
    again = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "one"), "--probe-runs", "3"])
    assert again.exit_code == 0 and "(0 row(s) reused)" in again.stderr and "±" in again.stderr, again.output
    bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--probe-runs", "0"])
    assert bad.exit_code == 1 and "--probe-runs 0" in bad.stderr and "probe_runs must be >= 1" in bad.stderr, bad.output


@pytest.mark.slow
def test_probes_trained_at_once_give_the_rows_of_probes_in_turn(tmp_path, synth_corpus):
    from ofactl.probe import ProbeConfig
    from ofactl.sweep import SweepConfig, run_sweep

    torch.manual_seed(0)
    ckpt = save_student(tmp_path / "s.pt", Student(student_config("tiny")))
    cfg = SweepConfig(task="pr", rates=(1.0, 0.5, 0.25), probe=ProbeConfig(epochs=2, min_epochs=1))
    cfg.extract.num_workers = 0
    store = tmp_path / "feats.zarr"  # one store: the second sweep trains on the groups the first extracted
    one = run_sweep(cfg, [("s", ckpt)], synth_corpus, tmp_path / "one", store)
    cfg.jobs = 2
    two = run_sweep(cfg, [("s", ckpt)], synth_corpus, tmp_path / "two", store)
    assert [r.requested_rate for r in two.rows] == [1.0, 0.5, 0.25]  # in rate order, whichever finished first
    for a, b in zip(one.rows, two.rows):
        assert (a.test, a.dev, a.probe_params) == pytest.approx((b.test, b.dev, b.probe_params), abs=2e-3)
    assert len(list((tmp_path / "two" / "rows").glob("*.json"))) == 3  # each row saved


@pytest.mark.slow
def test_sweeps_of_several_tasks_share_one_pool_slowest_probes_first(tmp_path, synth_corpus):
    from ofactl.probe import ProbeConfig
    from ofactl.progress import NullProgress
    from ofactl.sweep import SweepConfig, SweepSpec, run_sweep, run_sweeps

    torch.manual_seed(0)
    ckpt = save_student(tmp_path / "s.pt", Student(student_config("tiny")))
    store = tmp_path / "feats.zarr"  # one store for every sweep, as in the quickstart
    probe = ProbeConfig(epochs=2, min_epochs=1, cls_epochs=3)
    cfgs = [SweepConfig(task=t, rates=(1.0, 0.5), probe=probe, timing_utts=2) for t in ("ks", "pr")]
    for c in cfgs:
        c.extract.num_workers = 0
    alone = [run_sweep(c, [("s", ckpt)], synth_corpus, tmp_path / f"alone-{c.task}", store) for c in cfgs]
    for jobs in (1, 2):
        progress = NullProgress()
        specs = [SweepSpec(c, [("s", ckpt)], synth_corpus, tmp_path / f"pool{jobs}-{c.task}", store) for c in cfgs]
        pooled = run_sweeps(specs, jobs, progress)
        assert [r.rows[0].task for r in pooled] == ["ks", "pr"]  # one result per sweep, in the order given
        for a, b in zip(alone, pooled):
            assert [r.requested_rate for r in b.rows] == [1.0, 0.5]
            assert json.loads((b.out_dir / "sweep.json").read_text())["task"] == b.rows[0].task
            for x, y in zip(a.rows, b.rows):
                assert (x.test, x.dev) == pytest.approx((y.test, y.dev), abs=2e-3)
        finished = [m.split(":")[0] + " " + m.split()[2] for m in progress.messages if " test " in m]
        assert len(finished) == 4  # a line per finished probe
        if jobs == 1:  # in turn: the CTC probes first, the higher rate first
            assert finished == ["s rate=1.000 pr", "s rate=0.500 pr", "s rate=1.000 ks", "s rate=0.500 ks"]


def test_sweeps_run_together_need_a_folder_each(tmp_path):
    from ofactl.errors import ConfigError
    from ofactl.sweep import SweepConfig, SweepSpec, run_sweeps

    specs = [SweepSpec(SweepConfig(task=t), [("s", tmp_path / "s.pt")], tmp_path / "m.tsv", tmp_path / "sw")
             for t in ("ks", "sid")]
    with pytest.raises(ConfigError, match=r"need a folder each; .*sw is given to more than one"):
        run_sweeps(specs)
    assert not (tmp_path / "sw").exists()  # refused before any folder or lock


def test_sweep_jobs_must_be_positive():
    from ofactl.config import load_config
    from ofactl.errors import ConfigError
    from ofactl.sweep import SweepConfig

    with pytest.raises(ConfigError, match="jobs must be >= 1"):
        load_config(SweepConfig, "sweep", None, ["jobs=0"])
