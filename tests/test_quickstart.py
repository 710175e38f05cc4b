from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import sweep_row
from typer.testing import CliRunner

from ofactl.cli import app
from ofactl.config import find_preset, load_yaml


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_reuses_them(tmp_path):
    synth = tmp_path / "synth.yaml"
    synth.write_text(yaml.safe_dump({"synth": {"seed": 1, "n_speakers": 6, "keyword_takes": 2,
                                               "keywords": ["yes", "no", "stop"], "n_sentences": 6,
                                               "sentences_per_speaker": 2}}))
    d = load_yaml(find_preset("distill-tiny"))
    d["distill"].update({"steps": 3, "batch_seconds": 6.0, "crop_seconds": 2.0, "num_workers": 0, "eval_utts": 4,
                         "eval_rates": [1.0], "guidance": {"boundaries": "phone_times"}})
    distill = tmp_path / "distill.yaml"
    distill.write_text(yaml.safe_dump(d))
    qs = tmp_path / "qs.yaml"
    qs.write_text(yaml.safe_dump({"quickstart": {"synth_preset": str(synth), "distill_preset": str(distill),
                                                 "rates": [1.0, 0.5], "tasks": ["ks", "sid"], "adapt_tasks": ["sid"],
                                                 "adapt_epochs": 1, "probe_epochs": 2, "probe_runs": 2}}))
    args = ["quickstart", "--out", str(tmp_path / "qs"), "-c", str(qs), "--device", "cpu", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {(x["task"], x["requested_rate"]) for x in doc["rows"]} == {("ks", 1.0), ("ks", 0.5), ("sid", 1.0), ("sid", 0.5)}
    assert 0 < doc["adapt"]["sid"]["learned_rate"] <= 1
    assert all(len(x["test_runs"]) == 2 for x in doc["rows"])  # ks and sid average probe_runs probes
    # the joint probe's figure, placed on the quickstart's own sid sweep
    assert doc["adapt"]["sid"]["final_probe"] == "joint" and doc["adapt"]["sid"]["final_probe_seconds"] == 0
    assert doc["adapt"]["sid"]["comparison"]["sweep_rates"] == sorted(
        r["achieved_rate"] for r in doc["rows"] if r["task"] == "sid")
    for key in ("student", "store", "ks_plot", "sid_csv", "adapt_sid_rate_config", "tradeoff_plot"):
        assert Path(doc["paths"][key]).exists()
    assert Path(doc["paths"]["tradeoff_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    t0 = time.perf_counter()
    r2 = CliRunner().invoke(app, args)
    assert r2.exit_code == 0
    assert json.loads(r2.stdout)["rows"] == doc["rows"]
    assert time.perf_counter() - t0 < 30  # every stage reused
    assert set(json.loads(r2.stdout)["reused"]) == {"distill", "extract", "sweep-ks", "sweep-sid", "adapt-sid"}
    table = CliRunner().invoke(app, args[:-1])  # the summary table: each utterance task's mean and SD
    assert table.exit_code == 0 and table.stderr.count(" ± ") == 4, table.output
    assert "note: adapt --task sid read its rate from" in " ".join(table.stderr.split())  # a few dev utterances
    # another adapt setting: adapt runs again, everything before it is reused
    r3 = CliRunner().invoke(app, args + ["--set", "adapt_epochs=2"])
    assert r3.exit_code == 0, r3.output
    assert "made with other adapt settings" in r3.stderr
    assert set(json.loads(r3.stdout)["reused"]) == {"distill", "extract", "sweep-ks", "sweep-sid"}
    # another sweep (more probe epochs), same adapt settings: adapt runs again to compare with it
    r3b = CliRunner().invoke(app, args + ["--set", "adapt_epochs=2", "--set", "probe_epochs=3"])
    assert r3b.exit_code == 0, r3b.output
    assert "another sweep to compare with" in r3b.stderr
    doc3b = json.loads(r3b.stdout)
    assert set(doc3b["reused"]) == {"distill", "extract"}
    sid3b = doc3b["adapt"]["sid"]
    assert sid3b["comparison"]["sweep_metric"] == [t for _, t in _curve(doc3b["rows"], "sid")]
    # another distill preset: the student is trained again and the store's groups are replaced
    d["distill"]["steps"] = 4
    distill.write_text(yaml.safe_dump(d))
    r4 = CliRunner().invoke(app, args + ["--set", "adapt_epochs=2"])
    assert r4.exit_code == 0, r4.output
    assert "made with other distill settings; distilling again" in r4.stderr
    doc4 = json.loads(r4.stdout)
    assert doc4["reused"] == [] and json.loads((tmp_path / "qs/distill/summary.json").read_text())["steps"] == 4
    # another teacher (--teacher over the preset's): distilled again from it
    r5 = CliRunner().invoke(app, args + ["--set", "adapt_epochs=2", "--teacher", "builtin:hubert-small"])
    assert r5.exit_code == 0, r5.output
    assert "made with other distill settings; distilling again" in r5.stderr
    assert yaml.safe_load((tmp_path / "qs/distill/config.yaml").read_text())["distill"]["teacher"] == "builtin:hubert-small"
    assert json.loads(r5.stdout)["reused"] == []


def test_adapt_stamp_hashes_only_its_own_kind_of_probe():
    from dataclasses import replace

    from ofactl.adapt import AdaptConfig
    from ofactl.quickstart import adapt_sha

    for task, own, other in (("ks", {"cls_epochs": 9}, {"ctc_head": "conv"}),
                             ("pr", {"ctc_head": "conv"}, {"cls_epochs": 9})):
        a = AdaptConfig(task=task)
        base = adapt_sha(a, "s1")
        assert adapt_sha(replace(a, probe=replace(a.probe, **other)), "s1") == base
        assert adapt_sha(replace(a, probe=replace(a.probe, **own)), "s1") != base
        assert adapt_sha(replace(a, probe=replace(a.probe, device="cuda")), "s1") == base
        assert adapt_sha(replace(a, epochs=a.epochs + 1), "s1") != base
        assert adapt_sha(a, "s2") != base


def _curve(rows: list[dict], task: str) -> list[tuple[float, float]]:
    """A sweep's (achieved rate, test metric) points for ``task``, by rate."""
    return sorted((r["achieved_rate"], r["test"]) for r in rows if r["task"] == task)


def test_adapt_stamp_changes_with_the_rows_of_the_compared_sweep(tmp_path):
    from dataclasses import asdict

    from ofactl.adapt import AdaptConfig
    from ofactl.quickstart import adapt_sha, sweep_rows_sha

    row = sweep_row(0.5, 0.7)
    path = tmp_path / "sweep.json"
    assert sweep_rows_sha(path) == "none"
    path.write_text(json.dumps({"rows": [asdict(row)], "written_at": 1}))
    first = sweep_rows_sha(path)
    path.write_text(json.dumps({"rows": [asdict(row)], "written_at": 2}))  # same rows, rewritten
    assert sweep_rows_sha(path) == first
    path.write_text(json.dumps({"rows": [asdict(row) | {"test": 0.72}]}))
    assert sweep_rows_sha(path) != first
    a = AdaptConfig(task="sid")
    assert adapt_sha(a, "s1", first) != adapt_sha(a, "s1", sweep_rows_sha(path)) != adapt_sha(a, "s1")


def test_pr_probe_carries_the_quickstart_head_and_budget(tmp_path):
    from ofactl.probe.train import ProbeConfig
    from ofactl.progress import NullProgress
    from ofactl.quickstart import QuickstartConfig, _Quickstart

    cfg = QuickstartConfig()
    probe = _Quickstart(cfg, tmp_path, NullProgress()).pr_probe(ProbeConfig(epochs=7))
    assert (probe.ctc_head, probe.max_frames, probe.epochs) == ("lstm", 1_000_000, 7)
    cfg = QuickstartConfig(pr_head="conv", pr_max_frames=0)
    probe = _Quickstart(cfg, tmp_path, NullProgress()).pr_probe(ProbeConfig())
    assert (probe.ctc_head, probe.conv_hidden, probe.max_frames) == ("conv", 128, 0)
    with pytest.raises(ValueError, match="pr_max_frames must be >= 0"):
        QuickstartConfig(pr_max_frames=-1).validate()


def test_utterance_tasks_average_probe_runs_and_pr_trains_one(tmp_path):
    from ofactl.progress import NullProgress
    from ofactl.quickstart import QuickstartConfig, _Quickstart

    q = _Quickstart(QuickstartConfig(probe_epochs=9), tmp_path, NullProgress())
    assert {t: q.sweep_config(t).probe_runs for t in ("ks", "sid", "pr", "asr")} == {"ks": 3, "sid": 3, "pr": 1,
                                                                                  "asr": 1}
    assert q.sweep_config("sid").probe.cls_epochs == 9 and q.sweep_config("pr").probe.ctc_head == "lstm"
    q = _Quickstart(QuickstartConfig(probe_runs=1), tmp_path, NullProgress())
    assert q.sweep_config("sid").probe_runs == 1
    with pytest.raises(ValueError, match="probe_runs must be >= 1"):
        QuickstartConfig(probe_runs=0).validate()


def test_sweep_probes_and_adapt_runs_take_one_process_per_core_on_a_cpu(tmp_path, monkeypatch):
    from ofactl.progress import NullProgress
    from ofactl.quickstart import QuickstartConfig, _Quickstart

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    q = _Quickstart(QuickstartConfig(device="cpu"), tmp_path, NullProgress())
    assert q.sweep_jobs() == 2  # one pool for every task's probes
    assert {t: q.sweep_config(t).jobs for t in ("ks", "sid", "pr")} == {"ks": 2, "sid": 2, "pr": 2}
    assert q.small_cpu()  # distill without a loader process there
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert q.sweep_jobs() == 12  # no more than the probes (4 rates, 3 tasks)
    assert _Quickstart(QuickstartConfig(device="cpu", jobs=1), tmp_path, NullProgress()).sweep_jobs() == 1
    assert q.jobs(3) == 3 and not q.small_cpu()  # the adapt runs: one per core up to the tasks
    with pytest.raises(ValueError, match="jobs must be >= 0"):
        QuickstartConfig(jobs=-1).validate()


def test_the_note_names_the_teacher_the_student_learnt_from():
    from ofactl.quickstart import UNTRAINED_NOTE, teacher_note

    assert teacher_note("random:tiny") == UNTRAINED_NOTE
    for name in ("hubert-tiny", "hubert-small", "hubert-tiny-v2", "hubert-tiny-v3"):
        assert teacher_note(f"builtin:{name}").startswith(f"the teacher is builtin:{name}, a small HuBERT")
    assert teacher_note("/m/hubert.pt") == "the teacher is /m/hubert.pt"


def test_teacher_identity_is_the_name_or_the_bytes_of_the_file(tmp_path):
    from ofactl.quickstart import teacher_identity

    assert teacher_identity("builtin:hubert-tiny") == "builtin:hubert-tiny"
    run = tmp_path / "pretrain-run"
    run.mkdir()
    (run / "teacher.safetensors").write_bytes(b"first")
    first = teacher_identity(str(run))
    assert first == teacher_identity(str(run / "teacher.safetensors")) and len(first) == 64
    (run / "teacher.safetensors").write_bytes(b"retrained")  # the same path, another teacher: distilled again
    assert teacher_identity(str(run)) != first
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"first")
    first = teacher_identity(str(hf))
    (hf / "tf_model.h5").write_bytes(b"other weights")  # files the loader does not read: the same teacher
    assert teacher_identity(str(hf)) == first
    (hf / "model.safetensors").write_bytes(b"retrained")  # a HuggingFace folder: by its files' bytes too
    assert teacher_identity(str(hf)) != first != str(hf)
    (hf / "config.json").write_text('{"num_hidden_layers": 2}')
    assert teacher_identity(str(hf)) not in (first, str(hf))


def test_a_teacher_that_cannot_be_loaded_fails_before_any_stage(tmp_path):
    r = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "qs"), "--teacher", str(tmp_path / "nope.pt"),
                                 "--device", "cpu"])
    assert r.exit_code == 1 and f"teacher not found: {tmp_path / 'nope.pt'}" in r.stderr, r.output
    assert not (tmp_path / "qs").exists()
