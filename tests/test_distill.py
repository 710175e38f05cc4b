from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import kill_when_exists

from ofactl.audio import Corpus, median_level_db, read_corpus
from ofactl.checkpoint import load_student, read_checkpoint
from ofactl.config import load_config
from ofactl.distill import DistillConfig, distill_loss, run_distill, sample_rates, train_step_loss
from ofactl.errors import AudioError, CheckpointError, ConfigError, OfactlError
from ofactl.model.student import Student
from ofactl.model.teacher import load_teacher
from ofactl.progress import NullProgress
from ofactl.training import split_held_out


def tiny_cfg(**kw) -> DistillConfig:
    cfg = load_config(DistillConfig, "distill", "distill-tiny")
    cfg = replace(cfg, steps=4, batch_seconds=6.0, crop_seconds=2.0, num_workers=0, eval_utts=4,
                  ckpt_every=2, log_every=1, eval_rates=(1.0, 0.5))
    cfg.guidance = replace(cfg.guidance, boundaries="none", kmeans_utts=12, kmeans_k=6)
    # builtin:hubert-tiny-v3's width, for tests that build the student without distill (the preset's 0
    # is filled in by distill from the teacher)
    cfg.student = replace(cfg.student, teacher_dim=128)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_masked_loss_ignores_padding():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(2, 10, 2, 8, generator=g), torch.randn(2, 10, 2, 8, generator=g)
    L = torch.tensor([10, 6])
    a, _ = distill_loss(p, t, L)
    p2 = torch.cat([p, 100 * torch.randn(2, 5, 2, 8, generator=g)], 1)
    t2 = torch.cat([t, torch.randn(2, 5, 2, 8, generator=g)], 1)
    p2[1, 6:] = 99.0
    b, _ = distill_loss(p2, t2, L)
    assert torch.allclose(a, b)


def test_rate_sampling_covers_range():
    cfg = tiny_cfg()
    g = torch.Generator().manual_seed(0)
    rates = torch.cat([sample_rates(cfg, 64, g, 0.3)[0] for _ in range(20)])
    periods = 20 / rates
    assert periods.min() < 22 and periods.max() > 88 and periods.min() >= 20 and periods.max() <= 90
    cfg.rates = replace(cfg.rates, kind="lambda", lambda_min=0.2, lambda_max=0.8, exact_fraction=0.0)
    lam = torch.cat([sample_rates(cfg, 64, g, 0.3)[1] for _ in range(10)])
    assert 0.2 <= float(lam.min()) < 0.25 and 0.75 < float(lam.max()) <= 0.8
    cfg.rates = replace(cfg.rates, kind="fixed", rate=0.4)
    assert set(sample_rates(cfg, 8, g, 0.3)[0].tolist()) == {0.4}


def test_full_fraction_draws_rate_one_that_often_and_leaves_the_rest_to_the_kind():
    cfg = tiny_cfg()
    g = torch.Generator().manual_seed(0)
    plain = torch.cat([sample_rates(cfg, 64, g, 0.3)[0] for _ in range(50)])
    cfg.rates = replace(cfg.rates, full_fraction=0.25)
    g = torch.Generator().manual_seed(0)
    rates = torch.cat([sample_rates(cfg, 64, g, 0.3)[0] for _ in range(50)])
    share = float((rates == 1.0).double().mean())
    assert 0.22 < share < 0.28 and float((plain == 1.0).double().mean()) == 0.0  # 3200 draws: sd 0.008
    rest = 20 / rates[rates < 1.0]
    assert rest.min() >= 20 and rest.max() <= 90 and rest.mean() == pytest.approx(55, abs=1.5)
    # lambda mode at rate 1 runs with lambda 0 (all frames kept), per batch as well
    cfg.rates = replace(cfg.rates, kind="lambda", draw="batch", exact_fraction=0.0, full_fraction=0.5)
    draws = [sample_rates(cfg, 4, g, 0.3) for _ in range(400)]
    full = [(r, lam) for r, lam, _ in draws if bool((r == 1.0).all())]
    assert 160 < len(full) < 240 and all(lam is not None and bool((lam == 0).all()) for _, lam in full)
    with pytest.raises(ConfigError, match="full_fraction"):
        load_config(DistillConfig, "distill", "distill-tiny", ["rates.full_fraction=1.5"])


def test_lambda_per_batch_is_uniform_and_shared_by_the_batch():
    """The reference recipe: one lambda ~ U(0, 1) per batch, lambda mode on every step."""
    cfg = tiny_cfg()
    cfg.rates = replace(cfg.rates, kind="lambda", draw="batch", lambda_min=0.0, lambda_max=1.0, exact_fraction=0.0)
    g = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(2000):
        rates, lam, exact = sample_rates(cfg, 8, g, 2 / 9)
        assert not exact and lam is not None and torch.all(lam == lam[0])
        # the rate reported for the batch is what that lambda gives on average: 1 - lambda * (1 - alpha_mean)
        assert torch.allclose(rates.float(), 1 - lam * (1 - 2 / 9), atol=1e-6)
        draws.append(float(lam[0]))
    x = torch.tensor(draws)
    assert 0.0 <= float(x.min()) < 0.01 and 0.99 < float(x.max()) <= 1.0
    # uniform: each decile holds about a tenth of the draws (binomial sd about 0.0067)
    counts = torch.histc(x, bins=10, min=0.0, max=1.0) / len(x)
    assert torch.all((counts - 0.1).abs() < 0.03), counts
    assert abs(float(x.mean()) - 0.5) < 0.02
    again = torch.Generator().manual_seed(0)
    assert float(sample_rates(cfg, 8, again, 2 / 9)[1][0]) == draws[0]  # seeded


def test_exact_share_applies_to_every_kind():
    cfg = tiny_cfg()
    g = torch.Generator().manual_seed(1)
    for kind in ("period", "lambda", "fixed"):
        cfg.rates = replace(cfg.rates, kind=kind, exact_fraction=0.25, rate=0.5)
        exact = [sample_rates(cfg, 4, g, 0.3)[2] for _ in range(800)]
        assert abs(sum(exact) / len(exact) - 0.25) < 0.05, kind
    cfg.rates = replace(cfg.rates, kind="period", draw="utterance", exact_fraction=1.0)
    rates = sample_rates(cfg, 64, g, 0.3)[0]
    assert len(set(rates.tolist())) == 64  # one draw per utterance


@pytest.mark.slow
def test_one_step_decreases_loss_on_fixed_batch(synth_corpus):
    from ofactl.audio import load_audio, read_corpus

    cfg = tiny_cfg()
    torch.manual_seed(0)
    teacher = load_teacher(cfg.teacher)
    student = Student(cfg.student).train()
    wavs = [load_audio(u.path)[:24000] for u in list(read_corpus(synth_corpus))[:4]]
    batch = {"wav": torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), "lengths": torch.tensor([len(w) for w in wavs])}
    cfg.rates = replace(cfg.rates, kind="fixed", rate=0.5)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        torch.manual_seed(1)  # the same dropout masks each time
        o = train_step_loss(student, teacher, batch, cfg, torch.device("cpu"), None, torch.Generator().manual_seed(0))
        losses.append(o.loss.item())
        opt.zero_grad()
        o.loss.backward()
        opt.step()
    assert losses[1] < losses[0] and losses[2] < losses[1]


class RecordingProgress(NullProgress):
    """Keeps every logged line."""

    def __init__(self) -> None:
        self.logs: list[str] = []

    def log(self, message: str) -> None:
        self.logs.append(message)


@pytest.mark.slow
@pytest.mark.parametrize("boundaries", ["none", "phone_times", "auto", "file"])
def test_boundary_modes_run(tmp_path, synth_corpus, boundaries):
    spec = boundaries
    if boundaries == "file":
        spec = str(tmp_path / "b.tsv")
        from ofactl.audio import read_corpus

        lines = ["id\tms"] + [f"{u.id}\t" + " ".join(str(100 * k) for k in range(1, int(u.seconds * 10))) for u in read_corpus(synth_corpus)]
        Path(spec).write_text("\n".join(lines) + "\n")
    cfg = tiny_cfg(steps=2)
    cfg.guidance = replace(cfg.guidance, boundaries=spec)
    progress = RecordingProgress()
    res = run_distill(cfg, synth_corpus, tmp_path / "run", progress=progress)
    recs = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert res.steps == 2 and len(recs) == 2
    if boundaries != "none":
        assert recs[-1]["alpha_seg"] > 0 and recs[-1]["alpha_frame"] > 0
    if boundaries == "auto":
        assert (tmp_path / "run/boundaries.tsv").is_file() and (tmp_path / "run/kmeans.safetensors").is_file()
        # synth corpora have phone times: the pseudo-phones are scored against them
        assert any(m.startswith("pseudo-phones against the corpus's phone times") and "R-value" in m for m in progress.logs)


@pytest.mark.slow
def test_run_dir_outputs_checkpoints_and_refusals(tmp_path, synth_corpus):
    cfg = tiny_cfg()
    res = run_distill(cfg, synth_corpus, tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["step-00000002.pt", "step-00000004.pt"]
    student, meta = load_student(run / "student.pt")
    assert meta["step"] == 4 and 0 < student.alpha_mean < 1
    trn, _ = split_held_out(list(read_corpus(synth_corpus)), cfg.eval_utts, cfg.seed)
    assert student.input_level_db == median_level_db(trn, seed=cfg.seed)  # what extract --level-db auto reads
    assert -40 < student.input_level_db < -5
    ck = read_checkpoint(run / "checkpoints/step-00000004.pt")
    assert {"optimizer", "scheduler", "rng"} <= set(ck["train_state"])
    assert set(res.eval_after) == {"1", "0.5"} and set(res.achieved_rates) >= {"1", "0.5", "0.25"}
    assert abs(res.achieved_rates["0.5"]["exact"] - 0.5) < 0.02
    with pytest.raises(OfactlError, match="not empty; pass --resume"):
        run_distill(cfg, synth_corpus, run)


@pytest.mark.slow
def test_resume_with_nothing_to_continue_starts_at_step_0(tmp_path, synth_corpus):
    """A requeued job always passes --resume: a folder that is missing, or was left by a job
    killed before its first checkpoint, gives the run an uninterrupted start gives."""
    cfg = tiny_cfg()
    plain = run_distill(cfg, synth_corpus, tmp_path / "plain")
    progress = RecordingProgress()
    missing = run_distill(cfg, synth_corpus, tmp_path / "missing", resume=True, progress=progress)
    assert missing.resumed_from == 0 and missing.steps == 4
    assert any("no checkpoint in" in m and "starting at step 0" in m for m in progress.logs)
    killed = tmp_path / "killed"  # what a job killed at step 1 leaves: its settings, corpus and log
    shutil.copytree(tmp_path / "plain", killed, ignore=shutil.ignore_patterns("checkpoints", "*.pt", "summary.json"))
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # and a torn line
    with pytest.raises(CheckpointError, match="alignment: 'compress' -> 'upsample'"):
        run_distill(replace(cfg, alignment="upsample"), synth_corpus, killed, resume=True)
    again = run_distill(cfg, synth_corpus, killed, resume=True)
    assert again.resumed_from == 0
    logged = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged == [json.loads(x)["step"] for x in (tmp_path / "plain/metrics.jsonl").read_text().splitlines()]
    weights = [load_student(r.student)[0].state_dict() for r in (plain, missing, again)]
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_then_fails_clearly(tmp_path, synth_corpus):
    cfg = tiny_cfg()
    run = tmp_path / "run"
    run_distill(cfg, synth_corpus, run)
    newest = run / "checkpoints/step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    res = run_distill(replace(cfg, steps=5), synth_corpus, run, resume=True)
    assert res.resumed_from == 2 and res.steps == 5
    for p in (run / "checkpoints").glob("*.pt"):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint.*corrupt or truncated"):
        run_distill(replace(cfg, steps=8), synth_corpus, run, resume=True)


@pytest.mark.slow
def test_resume_under_other_settings_is_refused_and_keeps_the_run(tmp_path, synth_corpus):
    cfg = tiny_cfg()
    run = tmp_path / "run"
    run_distill(cfg, synth_corpus, run)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.pt")}
    with pytest.raises(CheckpointError, match="alignment: 'compress' -> 'upsample'"):
        run_distill(replace(cfg, steps=6, alignment="upsample"), synth_corpus, run, resume=True)
    cps = read_corpus(synth_corpus)
    fewer = Corpus("fewer.tsv", cps.utterances[:-1])  # the same files but one (the shared corpus stays as it is)
    with pytest.raises(CheckpointError, match=r"learns from .*utterances.*not from --corpus fewer.tsv"):
        run_distill(replace(cfg, steps=6), fewer, run, resume=True)
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.pt")} == before
    assert "alignment: compress" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_avgpool_baseline(tmp_path, synth_corpus):
    cfg = tiny_cfg(steps=2, compressor_rate=0.4)
    cfg.student = replace(cfg.student, compressor="avgpool")
    res = run_distill(cfg, synth_corpus, tmp_path / "run")
    s, _ = load_student(res.student)
    assert s.cfg.compressor == "avgpool" and res.achieved_rates == {}


@pytest.mark.slow
def test_presets_take_the_teachers_width_and_the_larger_builtin_teacher_gives_its_cnn(tmp_path, synth_corpus):
    assert load_config(DistillConfig, "distill", "distill-tiny").student.teacher_dim == 0  # the teacher's width
    cfg = tiny_cfg(steps=2, teacher="builtin:hubert-small")
    cfg.student = replace(cfg.student, teacher_dim=0)
    res = run_distill(cfg, synth_corpus, tmp_path / "run")
    assert cfg.student.teacher_dim == 0  # the caller's config is left as given
    s, meta = load_student(res.student)
    assert res.steps == 2 and s.cfg.teacher_dim == 192 and "hubert-small" in str(meta)
    assert load_config(DistillConfig, "distill", tmp_path / "run" / "config.yaml").student.teacher_dim == 192
    copied = Student(s.cfg).init_from_teacher(load_teacher("builtin:hubert-small"), partial=True)
    assert any(k.startswith("cnn.") for k in copied) and not any(k.startswith("transformer.") for k in copied)
    cfg.student = replace(cfg.student, teacher_dim=128)  # a width given by hand must match
    with pytest.raises(ConfigError, match="student.teacher_dim=128 but the teacher is 192-d"):
        run_distill(cfg, synth_corpus, tmp_path / "bad")


@pytest.mark.slow
def test_light_student_preset_trains_from_the_teacher_without_its_cnn(tmp_path, synth_corpus):
    base = load_config(DistillConfig, "distill", "distill-tiny-fbank")
    assert base.student.frontend == "fbank" and base.teacher == "builtin:hubert-tiny-v3"
    cfg = tiny_cfg(steps=2, student=base.student)
    res = run_distill(cfg, synth_corpus, tmp_path / "run")
    s, _ = load_student(res.student)
    assert s.cfg.frontend == "fbank" and s.cfg.fbank_bins == 80
    assert all(math.isfinite(v) for v in [*res.eval_before.values(), *res.eval_after.values()])
    x = torch.randn(1, 16000)
    assert s.features(x, torch.tensor([16000]), [0.5])[0.5].states.shape[1] == 25  # 50 frames at rate 0.5


_SCRIPT = """
import sys
from collections.abc import Callable
from dataclasses import replace
from ofactl.config import load_config
from ofactl.distill import DistillConfig, run_distill
cfg = load_config(DistillConfig, "distill", "distill-tiny")
cfg = replace(cfg, steps=int(sys.argv[3]), batch_seconds=6.0, crop_seconds=2.0, num_workers=0, eval_utts=4,
              ckpt_every=3, log_every=1, eval_rates=(1.0,))
cfg.guidance = replace(cfg.guidance, boundaries="phone_times")
run_distill(cfg, sys.argv[1], sys.argv[2], resume=sys.argv[4] == "1")
"""


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path, synth_corpus):
    full = tmp_path / "full"
    subprocess.run([sys.executable, "-c", _SCRIPT, str(synth_corpus), str(full), "12", "0"], check=True)
    killed = tmp_path / "killed"
    kill_when_exists([sys.executable, "-c", _SCRIPT, str(synth_corpus), str(killed), "12", "0"], killed / "checkpoints/step-*.pt")
    assert not (killed / "student.pt").exists()
    subprocess.run([sys.executable, "-c", _SCRIPT, str(synth_corpus), str(killed), "12", "1"], check=True)
    a = read_checkpoint(full / "student.pt")["state_dict"]
    b = read_checkpoint(killed / "student.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the log of the resumed run holds each step once, as the uninterrupted run's does
    steps = [json.loads(ln)["step"] for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_a_recording_gone_bad_mid_run_keeps_the_steps_done_and_resumes_exactly(tmp_path, synth_corpus, monkeypatch):
    import ofactl.training as training

    cfg = tiny_cfg(ckpt_every=100)
    cfg.optim = replace(cfg.optim, accum=2)
    plain = run_distill(cfg, synth_corpus, tmp_path / "plain")
    bad = {"on": False}
    real_item, real_load = training.CropBatches.__getitem__, training.load_audio

    def item(self, k):
        bad["on"] = k == 5  # the sixth micro-batch, the second of step 3: step 3 is under way
        return real_item(self, k)

    def load(path):
        if bad["on"]:
            raise AudioError(f"{path}: truncated or corrupt")
        return real_load(path)

    monkeypatch.setattr(training.CropBatches, "__getitem__", item)
    monkeypatch.setattr(training, "load_audio", load)
    with pytest.raises(AudioError, match="truncated or corrupt; at step 2: checkpoint saved, continue with --resume "
                                         "once it reads again$"):
        run_distill(cfg, synth_corpus, tmp_path / "bad")
    assert [p.name for p in (tmp_path / "bad/checkpoints").glob("*.pt")] == ["step-00000002.pt"]
    monkeypatch.undo()
    again = run_distill(cfg, synth_corpus, tmp_path / "bad", resume=True)
    assert again.resumed_from == 2
    a, b = (load_student(r.student)[0].state_dict() for r in (plain, again))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the RNG saved is step 2's, not step 3's half


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_in_sync(tmp_path, synth_corpus):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ofactl", "distill", "-c", "distill-tiny", "--corpus", str(synth_corpus), "--out",
           str(tmp_path / "ddp"), "--steps", "3", "--boundaries", "none", "--device", "cpu", "--quiet",
           "--set", "batch_seconds=6", "--set", "crop_seconds=2", "--set", "num_workers=0",
           "--set", "eval_utts=4", "--set", "eval_rates=[1.0]"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["steps"] == 3
    assert "warning" not in r.stderr, r.stderr[-2000:]  # DDP's layout warning for the log-mel head was one
    # the audio figures count both ranks' batches: one process that takes both, two per step, reads as much
    args = [str(tmp_path / "one") if a == str(tmp_path / "ddp") else a for a in cmd[cmd.index("ofactl") + 1:]]
    r = subprocess.run([sys.executable, "-m", "ofactl", *args, "--set", "optim.accum=2"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    one = json.loads((tmp_path / "one/summary.json").read_text())
    assert summary["audio_seconds"] == pytest.approx(one["audio_seconds"], abs=1e-2) and one["audio_seconds"] > 0
    assert summary["total_audio_seconds"] == pytest.approx(summary["audio_seconds"], abs=1e-2)


_RANK_1_READS_BADLY = """
import os, sys
from ofactl import training
from ofactl.cli import main
from ofactl.errors import AudioError

real_item, real_load, bad = training.CropBatches.__getitem__, training.load_audio, {"on": False}

def item(self, k):
    bad["on"] = os.environ["RANK"] == "1" and k == 2  # rank 1's third batch: step 3
    return real_item(self, k)

def load(path):
    if bad["on"]:
        raise AudioError(f"{path}: truncated or corrupt")
    return real_load(path)

training.CropBatches.__getitem__, training.load_audio = item, load
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_ddp_a_recording_gone_bad_on_one_rank_stops_every_rank_with_the_steps_saved(tmp_path, synth_corpus):
    # without the ranks agreeing on it, rank 0 waited in its gradient all-reduce for a rank that
    # had stopped, until torchrun killed it, and the steps since the last checkpoint were lost
    entry = tmp_path / "entry.py"
    entry.write_text(_RANK_1_READS_BADLY)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(entry),
           "distill", "-c", "distill-tiny", "--corpus", str(synth_corpus), "--out", str(out), "--steps", "6",
           "--boundaries", "none", "--device", "cpu", "--quiet", "--set", "batch_seconds=6", "--set", "crop_seconds=2",
           "--set", "num_workers=0", "--set", "eval_utts=4", "--set", "eval_rates=[1.0]", "--set", "ckpt_every=100"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert ("rank 1 could not read a recording of its batch (its own error names it); at step 2: checkpoint saved, "
            "continue with --resume once it reads again") in r.stderr, r.stderr[-3000:]
    assert "truncated or corrupt; at step 2: rank 0 saves the checkpoint, continue with --resume" in r.stderr
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["step-00000002.pt"]


def _long_distill(out: Path, corpus: Path) -> list[str]:
    """A distill with a DataLoader worker that logs every step and would run for long."""
    return [sys.executable, "-m", "ofactl", "distill", "-c", "distill-tiny", "--corpus", str(corpus),
            "--out", str(out), "--steps", "5000", "--boundaries", "none", "--set", "batch_seconds=6",
            "--set", "crop_seconds=2", "--set", "num_workers=1", "--set", "eval_utts=4", "--set", "eval_rates=[1.0]",
            "--set", "ckpt_every=100000", "--set", "log_every=1"]


def _wait_for_steps(p: subprocess.Popen, out: Path, output: Callable[[], str]) -> None:
    """Wait until the run ``p`` writing ``out`` has logged three steps; fail with ``output()`` if
    it ends or takes too long."""
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while p.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        if time.monotonic() > deadline:
            p.kill()
            pytest.fail("distill logged no steps within 180 s: " + output())
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before the signal: " + output()


def _stop_once(out: Path, corpus: Path, sig: int = signal.SIGINT, group: bool = False) -> tuple[int, str]:
    """Start a distill with a DataLoader worker, wait until it logs steps, send ``sig`` (to the
    whole process group, worker included, with ``group``: as a cluster scheduler does); its exit
    code and stderr."""
    cmd = _long_distill(out, corpus)
    # SIGINT reaches it with its default disposition even when the test run was started in the
    # background (conftest.pytest_configure); faulthandler: a crash in native code (seen once,
    # exit -11 under heavy load) shows its stack
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                         start_new_session=group)
    _wait_for_steps(p, out, lambda: p.communicate()[1][-2000:])
    if group:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    err = p.communicate(timeout=120)[1]
    return p.returncode, err


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, synth_corpus):
    out = tmp_path / "int"
    code, err = _stop_once(out, synth_corpus)
    assert code == 130, err[-2000:]
    assert "checkpoint saved, continue with --resume" in err and "Traceback" not in err, err[-2000:]
    assert list((out / "checkpoints").glob("step-*.pt"))


@pytest.mark.slow
def test_sigterm_to_every_process_saves_a_checkpoint_and_exits_143(tmp_path, synth_corpus):
    # a scheduler's preemption (SLURM, Kubernetes) signals the job's processes, DataLoader workers too
    out = tmp_path / "term"
    code, err = _stop_once(out, synth_corpus, signal.SIGTERM, group=True)
    assert code == 143, err[-2000:]
    assert "terminated (SIGTERM) at step" in err and "checkpoint saved, continue with --resume" in err, err[-2000:]
    assert "Traceback" not in err and "exited unexpectedly" not in err, err[-2000:]
    assert list((out / "checkpoints").glob("step-*.pt"))
    assert not Path(f"{out}.lock").exists()  # released on the way out, as after Ctrl-C


@pytest.mark.slow
def test_a_terminal_that_closes_saves_a_checkpoint_and_exits_129(tmp_path, synth_corpus):
    # an ssh session that drops: the terminal hangs up, SIGHUP reaches the whole job, the `tee`
    # its output goes through dies of it too, and what the run prints from then on goes nowhere
    import pty
    import select
    import threading

    out = tmp_path / "hup"
    terminal, tty = pty.openpty()
    tee, stdout = os.pipe()
    p = subprocess.Popen(_long_distill(out, synth_corpus), stdout=stdout, stderr=tty, start_new_session=True,
                         env={**os.environ, "PYTHONFAULTHANDLER": "1", "COLUMNS": "100"})
    os.close(tty)
    os.close(stdout)
    shown: list[bytes] = []
    closing = threading.Event()

    def show() -> None:  # a terminal reads what it is sent, or the run blocks on a full buffer
        while not closing.is_set():
            if select.select([terminal], [], [], 0.05)[0]:
                with contextlib.suppress(OSError):
                    shown.append(os.read(terminal, 65536))

    reader = threading.Thread(target=show, daemon=True)
    reader.start()
    _wait_for_steps(p, out, lambda: b"".join(shown).decode(errors="replace")[-2000:])
    closing.set()
    reader.join()  # a read still waiting on it would hold the terminal open past close()
    os.close(terminal)  # the terminal hangs up: writes to it fail with EIO from now on
    os.close(tee)  # and so does the pipe's reader: writes to it fail with EPIPE
    os.killpg(p.pid, signal.SIGHUP)
    os.killpg(p.pid, signal.SIGHUP)  # a hangup comes twice, from the kernel and from the shell
    assert p.wait(timeout=120) == 129, b"".join(shown).decode(errors="replace")[-2000:]
    assert list((out / "checkpoints").glob("step-*.pt"))
    assert not Path(f"{out}.lock").exists()


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    from ofactl.training import truncate_metrics

    p = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": 1.0 / s} for s in range(1, 8)] + [{"step": 4, "eval_loss": {"1": 0.5}}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 8, "lo')  # torn last line
    assert truncate_metrics(p, 5) == 3  # steps 6, 7 and the torn line go; the eval record at 4 stays
    kept = [json.loads(ln) for ln in p.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5, 4]
    assert truncate_metrics(p, 5) == 0 and truncate_metrics(tmp_path / "none.jsonl", 3) == 0


def test_rate_flag_follows_the_resolved_compressor(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import ofactl.distill as distill_mod
    from ofactl.cli import app
    from ofactl.distill import with_fixed_rate

    seen = {}

    def fake_run(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        raise OfactlError("stopped before training")

    monkeypatch.setattr(distill_mod, "run_distill", fake_run)
    preset = tmp_path / "pool.yaml"
    preset.write_text("distill:\n  student:\n    compressor: avgpool\n")
    # the compressor comes from the preset, not from a --compressor flag
    CliRunner().invoke(app, ["distill", "-c", str(preset), "--corpus", "x", "--rate", "0.4"])
    assert seen["cfg"].student.compressor == "avgpool" and seen["cfg"].compressor_rate == 0.4
    seen.clear()
    CliRunner().invoke(app, ["distill", "-c", "distill-tiny", "--corpus", "x", "--rate", "0.4"])
    assert seen["cfg"].rates.kind == "fixed" and seen["cfg"].rates.rate == 0.4
    with pytest.raises(ConfigError, match=r"--rate 1.5: expected a rate in \(0, 1\]"):
        with_fixed_rate(seen["cfg"], 1.5)
    # a student without compressor (DistilHuBERT's 20 ms baseline) needs the fixed rate 1 that
    # --rate 1 gives it, whether --compressor or --set asks for it
    for ask in (["--compressor", "none"], ["--set", "student.compressor=none"]):
        seen.clear()
        r = CliRunner().invoke(app, ["distill", "-c", "distill-tiny", "--corpus", "x", *ask, "--rate", "1"])
        assert "stopped before training" in r.output, r.output
        assert seen["cfg"].student.compressor == "none" and (seen["cfg"].rates.kind, seen["cfg"].rates.rate) == ("fixed", 1)
    r = CliRunner().invoke(app, ["distill", "-c", "distill-tiny", "--corpus", "x", "--compressor", "none", "--rate", "0.5"])
    assert r.exit_code == 1 and "--rate 0.5: a student without compressor runs at rate 1 only" in r.output
    r = CliRunner().invoke(app, ["distill", "-c", "distill-tiny", "--corpus", "x", "--compressor", "none"])
    assert r.exit_code == 1 and "--compressor none: a student without compressor trains at rate 1" in r.output


def test_spectral_head_adds_a_weighted_loss(synth_corpus):
    from ofactl.audio import load_audio, read_corpus

    cfg = tiny_cfg()
    assert cfg.student.spectral_bins == 0  # off in distill-tiny since its teacher is v3 (docs/models.md)
    cfg.student = replace(cfg.student, spectral_bins=64)
    cfg.rates = replace(cfg.rates, kind="fixed", rate=0.5)
    torch.manual_seed(0)
    teacher = load_teacher(cfg.teacher)
    student = Student(cfg.student).eval()
    wavs = [load_audio(u.path)[:24000] for u in list(read_corpus(synth_corpus))[:3]]
    batch = {"wav": torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), "lengths": torch.tensor([len(w) for w in wavs])}

    def step(weight: float):
        c = replace(cfg, spectral_weight=weight)
        return train_step_loss(student, teacher, batch, c, torch.device("cpu"), None, torch.Generator().manual_seed(0))

    a, b = step(0.0), step(2.0)
    assert a.per_head.shape == (3,)  # two teacher layers, then the spectral head
    assert torch.allclose(a.per_head, b.per_head)
    assert math.isclose(b.loss.item() - a.loss.item(), 2.0 * a.per_head[2].item(), rel_tol=1e-4)


def test_audio_weighting_counts_every_second_alike_at_every_rate(synth_corpus):
    from ofactl.audio import load_audio, read_corpus
    from ofactl.distill import head_losses, prediction_targets

    cfg = tiny_cfg()
    torch.manual_seed(0)
    teacher = load_teacher(cfg.teacher)
    student = Student(cfg.student).eval()
    wavs = [load_audio(u.path)[:24000] for u in list(read_corpus(synth_corpus))[:2]]
    rates = torch.tensor([1.0, 0.25], dtype=torch.float64)

    def loss(idx: list[int], weight: str) -> tuple[float, int, int]:
        """The batch of utterances ``idx`` at their rates: (loss, 20 ms frames, compressed frames)."""
        ws = [wavs[i] for i in idx]
        wav, lengths = torch.nn.utils.rnn.pad_sequence(ws, batch_first=True), torch.tensor([len(w) for w in ws])
        with torch.no_grad():
            targets, t_len = prediction_targets(student, teacher, wav, lengths)
            out = student(wav, lengths, rate=rates[idx], exact=True)
            total, _ = head_losses(out, targets, t_len, "compress", 1.0, weight)
        return total.item(), int(t_len.sum()), int(out.hidden.lengths.sum())

    (la, ta, ca), (lb, tb, cb) = loss([0], "frame"), loss([1], "frame")
    assert cb < tb / 3  # the second utterance is compressed four times
    # frame: each compressed frame counts once; audio: each 20 ms frame of the input does
    assert math.isclose(loss([0, 1], "frame")[0], (ca * la + cb * lb) / (ca + cb), rel_tol=1e-4)
    assert math.isclose(loss([0, 1], "audio")[0], (ta * la + tb * lb) / (ta + tb), rel_tol=1e-4)
    assert math.isclose(loss([1], "audio")[0], lb, rel_tol=1e-5)  # one utterance: only the weighting differs


def test_compress_weight_without_compress_alignment_is_refused_naming_both():
    cfg = load_config(DistillConfig, "distill", "distill-tiny", ["compress_weight=audio"])
    assert cfg.compress_weight == "audio" and cfg.alignment == "compress"
    with pytest.raises(ConfigError, match="compress_weight=audio .* needs alignment=compress"):
        load_config(DistillConfig, "distill", "distill-tiny", ["compress_weight=audio", "alignment=upsample"])
    with pytest.raises(ConfigError, match=r"needs alignment=compress \(alignment=both weighs its compress half by frame\)"):
        load_config(DistillConfig, "distill", "distill-tiny", ["compress_weight=audio", "alignment=both"])


def one_utterance_targets(corpus: Path) -> tuple[Student, torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """A fresh tiny student (seed 0), 1.5 s of the corpus's first utterance as a batch of one,
    and the teacher's targets for it: (student, wav (1, S), lengths (1,), targets, target lengths)."""
    from ofactl.audio import load_audio, read_corpus
    from ofactl.distill import prediction_targets

    cfg = tiny_cfg()
    cfg.student = replace(cfg.student, spectral_bins=64)  # a log-mel head beside the teacher's states
    torch.manual_seed(0)
    teacher = load_teacher(cfg.teacher)
    student = Student(cfg.student)
    w = load_audio(read_corpus(corpus)[0].path)[:24000]
    wav, lengths = w[None], torch.tensor([len(w)])
    targets, t_len = prediction_targets(student, teacher, wav, lengths)
    return student, wav, lengths, targets, t_len


def test_upsample_alpha_grad_decides_whether_the_upsampling_passes_the_loss_to_alpha(synth_corpus):
    from ofactl.distill import head_losses

    student, wav, lengths, targets, t_len = one_utterance_targets(synth_corpus)
    grads = []
    for alpha_grad in (True, False):
        student.zero_grad()
        out = student(wav, lengths, rate=0.25, exact=True)
        loss, _ = head_losses(out, targets, t_len, "upsample", 1.0, alpha_grad=alpha_grad)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.compressor.predictor.parameters()]))
    # both reach alpha through the averaging of the student's own frames; only True also through the upsampling
    assert grads[1].abs().sum() > 0 and not torch.allclose(grads[0], grads[1])
    with pytest.raises(ConfigError, match="upsample_alpha_grad=false .* needs alignment=upsample or both"):
        load_config(DistillConfig, "distill", "distill-tiny", ["upsample_alpha_grad=false"])
    assert not load_config(DistillConfig, "distill", "distill-tiny",
                           ["upsample_alpha_grad=false", "alignment=upsample"]).upsample_alpha_grad


def test_alignment_both_mixes_the_compress_and_upsample_losses_by_upsample_share(synth_corpus):
    from ofactl.distill import head_losses

    student, wav, lengths, targets, t_len = one_utterance_targets(synth_corpus)
    with torch.no_grad():
        out = student(wav, lengths, rate=0.25, exact=True)
    (lc, pc), (lu, pu) = (head_losses(out, targets, t_len, a, 1.0) for a in ("compress", "upsample"))
    assert not math.isclose(float(lc), float(lu), rel_tol=1e-3)  # the mix below can tell them apart
    for share in (0.5, 0.2):
        lb, pb = head_losses(out, targets, t_len, "both", 1.0, upsample_share=share)
        assert math.isclose(float(lb), (1 - share) * float(lc) + share * float(lu), rel_tol=1e-5)
        assert torch.allclose(pb, (1 - share) * pc + share * pu, rtol=1e-5)
    cfg = load_config(DistillConfig, "distill", "distill-tiny",
                      ["alignment=both", "upsample_share=0.3", "upsample_alpha_grad=false"])
    assert (cfg.alignment, cfg.upsample_share, cfg.upsample_alpha_grad) == ("both", 0.3, False)
    with pytest.raises(ConfigError, match="upsample_share=0.3 mixes two losses: it needs alignment=both"):
        load_config(DistillConfig, "distill", "distill-tiny", ["upsample_share=0.3"])
    with pytest.raises(ConfigError, match="upsample_share=1.0: expected a share strictly between 0 and 1"):
        load_config(DistillConfig, "distill", "distill-tiny", ["alignment=both", "upsample_share=1"])


def test_spectral_alignment_aligns_the_log_mel_head_on_its_own(synth_corpus):
    from ofactl.distill import head_losses

    student, wav, lengths, targets, t_len = one_utterance_targets(synth_corpus)
    assert len(targets) == 2  # teacher states, then log-mel frames
    with torch.no_grad():
        out = student(wav, lengths, rate=0.25, exact=True)
    (_, pc), (_, pu) = (head_losses(out, targets, t_len, a, 1.0) for a in ("compress", "upsample"))
    for heads, mel in (("upsample", "compress"), ("compress", "upsample")):
        total, ph = head_losses(out, targets, t_len, (heads, mel), 1.0)
        want = torch.cat([(pu if heads == "upsample" else pc)[:-1], (pu if mel == "upsample" else pc)[-1:]])
        assert torch.allclose(ph, want, rtol=1e-5) and math.isclose(float(total), float(want.sum()), rel_tol=1e-5)
    cfg = load_config(DistillConfig, "distill", "distill-tiny",
                      ["alignment=upsample", "upsample_alpha_grad=false", "spectral_alignment=compress",
                       "student.spectral_bins=64"])
    assert cfg.alignments == ("upsample", "compress")
    assert load_config(DistillConfig, "distill", "distill-tiny", ["alignment=both"]).alignments == ("both", "both")
    # the log-mel head alone may upsample, and then the detached upsampling has something to act on
    assert not load_config(DistillConfig, "distill", "distill-tiny",
                           ["spectral_alignment=upsample", "upsample_alpha_grad=false",
                            "student.spectral_bins=64"]).upsample_alpha_grad
    with pytest.raises(ConfigError, match="spectral_alignment=compress aligns the log-mel head: it needs "
                                          r"student.spectral_bins > 0"):
        load_config(DistillConfig, "distill", "distill-tiny", ["spectral_alignment=compress", "student.spectral_bins=0"])
    with pytest.raises(ConfigError, match="spectral_alignment"):
        load_config(DistillConfig, "distill", "distill-tiny", ["spectral_alignment=both"])


@pytest.mark.slow
def test_a_student_of_a_normalising_teacher_normalises_too(tmp_path, synth_corpus):
    """A teacher that normalises each waveform computes its targets on normalised audio: the
    student follows it (recorded in its config and checkpoint), so both hear the same signal."""
    from ofactl.model.blocks import HubertArch
    from ofactl.pretrain import PretrainModel, export_teacher

    arch = HubertArch(conv_layers=((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2, embed_dim=32,
                      num_layers=2, num_heads=2, ffn_dim=64, pos_conv_kernel=16, pos_conv_groups=4,
                      normalize_waveform=True)
    teacher = export_teacher(PretrainModel(arch, 8, 16, 0.1), tmp_path / "t.safetensors")
    cfg = tiny_cfg(steps=2, teacher=str(teacher))
    cfg.student = replace(cfg.student, teacher_dim=0, pred_layers=(1, 2), spectral_bins=0)
    assert not cfg.student.arch.normalize_waveform
    res = run_distill(cfg, synth_corpus, tmp_path / "run")
    s, _ = load_student(res.student)
    assert s.cfg.arch.normalize_waveform and "normalize_waveform: true" in (tmp_path / "run/config.yaml").read_text()
    assert not cfg.student.arch.normalize_waveform  # the caller's config stays as given


def test_teacher_derived_fills_the_width_and_turns_normalisation_on_only():
    from ofactl.distill import teacher_derived

    base = load_config(DistillConfig, "distill", "distill-tiny").student
    assert base.teacher_dim == 0 and not base.arch.normalize_waveform
    got = teacher_derived(base, 128, True)
    assert got.teacher_dim == 128 and got.arch.normalize_waveform
    assert base.teacher_dim == 0 and not base.arch.normalize_waveform  # the given config is left as it was
    assert teacher_derived(replace(base, teacher_dim=64), 128, False).teacher_dim == 64  # a width given by hand stays
    on = replace(base, arch=replace(base.arch, normalize_waveform=True))
    assert teacher_derived(on, 128, False).arch.normalize_waveform  # a student may normalise for a teacher that does not
