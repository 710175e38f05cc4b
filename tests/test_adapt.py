from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ofactl.adapt import AdaptConfig, LearnableLambda, run_adapt
from ofactl.cli import app
from ofactl.config import load_config
from ofactl.extract import ExtractConfig
from ofactl.model.compress import LAMBDA_MAX, rate_to_lambda


@pytest.fixture(scope="module")
def medium_corpus(tmp_path_factory):
    from ofactl.synth import SynthConfig, run_synth

    cfg = SynthConfig(seed=4, n_speakers=12, keyword_takes=2, keywords=("yes", "no", "stop", "go"),
                      n_sentences=30, sentences_per_speaker=6)
    return run_synth(cfg, tmp_path_factory.mktemp("medium") / "c").manifest


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, medium_corpus):
    """A tiny OFA student briefly distilled on a ~150-utterance synthetic corpus."""
    from dataclasses import replace

    from ofactl.distill import DistillConfig, run_distill

    synth_corpus = medium_corpus
    cfg = load_config(DistillConfig, "distill", "distill-tiny")
    cfg = replace(cfg, steps=60, batch_seconds=12.0, crop_seconds=2.0, num_workers=0, eval_utts=4, ckpt_every=1000,
                  eval_rates=(1.0,))
    cfg.guidance = replace(cfg.guidance, boundaries="phone_times")
    return run_distill(cfg, synth_corpus, tmp_path_factory.mktemp("d") / "run").student


def test_lambda_stays_in_range():
    lam = LearnableLambda(1.0)
    for v in (-1e4, 0.0, 1e4):
        lam.theta.data.fill_(v)
        assert 0.0 <= float(lam().detach()) <= LAMBDA_MAX
    floor = LearnableLambda(0.5, top=1.2)  # the lambda of min_rate
    floor.theta.data.fill_(1e4)
    assert float(floor().detach()) == pytest.approx(1.2)


def test_dev_mode_learns_lambda_on_dev_and_respects_the_rate_floor(tmp_path, distilled, medium_corpus):
    cfg = AdaptConfig(task="sid", cost=1.0, init_rate=0.5, min_rate=0.3, epochs=6, batch_size=8)
    res = run_adapt(cfg, distilled, medium_corpus, tmp_path / "dev")
    traj = [json.loads(x) for x in (tmp_path / "dev" / "trajectory.jsonl").read_text().splitlines()]
    assert any("dev_loss" in r for r in traj) and "dev_loss" not in traj[0]  # not during warm-up
    assert traj[-1]["lambda"] > traj[0]["lambda"]  # a large cost compresses
    from ofactl.checkpoint import load_student

    top = float(rate_to_lambda(0.3, load_student(distilled)[0].alpha_mean))
    assert max(r["lambda"] for r in traj) <= top + 1e-5  # never past the lambda of min_rate


def test_pr_and_sid_move_lambda_in_opposite_directions(tmp_path, distilled, medium_corpus):
    synth_corpus = medium_corpus
    start = {}
    ends = {}
    for task in ("pr", "sid"):
        cfg = AdaptConfig(task=task, cost=0.1, init_rate=0.5, epochs=12, batch_size=8)
        assert cfg.lambda_data == "dev"
        res = run_adapt(cfg, distilled, synth_corpus, tmp_path / task)
        traj = [json.loads(x) for x in (tmp_path / task / "trajectory.jsonl").read_text().splitlines()]
        start[task], ends[task] = traj[0]["lambda"], res.learned_lambda
        assert all(0 <= r["lambda"] < 2 for r in traj)
    assert start["pr"] == pytest.approx(start["sid"])
    assert ends["pr"] < start["pr"] and ends["sid"] > start["sid"]


def test_zero_cost_never_compresses_a_task_that_needs_frames(tmp_path, distilled, medium_corpus):
    synth_corpus = medium_corpus
    cfg = AdaptConfig(task="pr", cost=0.0, init_rate=0.3, epochs=12, batch_size=8)  # labels barely fit at 0.3
    res = run_adapt(cfg, distilled, synth_corpus, tmp_path / "pr0")
    traj = [json.loads(x) for x in (tmp_path / "pr0" / "trajectory.jsonl").read_text().splitlines()]
    assert res.learned_lambda <= traj[0]["lambda"] + 1e-6


def test_cli_outputs_and_rate_config_loads(tmp_path, distilled, synth_corpus):
    out = tmp_path / "ad"
    r = CliRunner().invoke(app, ["adapt", "--ckpt", str(distilled), "--corpus", str(synth_corpus), "--task", "sid",
                                 "--out", str(out), "--set", "epochs=1", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert 0 < doc["learned_rate"] <= 1 and doc["frame_period_ms"] >= 20
    assert (out / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    cfg = load_config(ExtractConfig, "extract", out / "rate.yaml")
    assert cfg.rates == (doc["learned_rate"],)
    r = CliRunner().invoke(app, ["adapt", "--ckpt", str(distilled), "--corpus", str(synth_corpus), "--task", "sid",
                                 "--cost", "-1", "--out", str(out)])
    assert r.exit_code == 1 and "cost (gamma) must be >= 0" in r.stderr
