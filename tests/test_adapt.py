from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import sweep_row
from typer.testing import CliRunner

from ofactl.adapt import AdaptConfig, LearnableLambda, RateCost, band_draws, dev_resolution, fold_ids, run_adapt
from ofactl.audio import read_corpus
from ofactl.cli import app
from ofactl.config import load_config
from ofactl.errors import ConfigError
from ofactl.extract import ExtractConfig
from ofactl.model.compress import LAMBDA_MAX, rate_to_lambda
from ofactl.probe import build_task


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
    # pinned to the untrained teacher and the log-mel head these adapt tests were written against
    # (deterministic and cheap; the head is what such a student learns phones from); from
    # builtin:hubert-tiny (the preset's teacher before v3), a 60-step student leaves pr's lambda rising as well
    cfg = load_config(DistillConfig, "distill", "distill-tiny", ["teacher=random:tiny", "student.teacher_dim=64",
                                                                 "student.spectral_bins=64"])
    cfg = replace(cfg, steps=60, batch_seconds=12.0, crop_seconds=2.0, num_workers=0, eval_utts=4, ckpt_every=1000,
                  eval_rates=(1.0,))
    cfg.guidance = replace(cfg.guidance, boundaries="phone_times")
    return run_distill(cfg, synth_corpus, tmp_path_factory.mktemp("d") / "run").student


def test_lambda_starts_off_the_flat_ends_of_the_sigmoid():
    lam = LearnableLambda(0.0, top=1.0)  # init rate 1
    assert float(lam().detach()) == pytest.approx(0.02)
    lam().backward()
    assert float(lam.theta.grad) > 0.01  # a start at rate 1 can still move


def test_lambda_stays_in_range():
    lam = LearnableLambda(1.0)
    for v in (-1e4, 0.0, 1e4):
        lam.theta.data.fill_(v)
        assert 0.0 <= float(lam().detach()) <= LAMBDA_MAX
    floor = LearnableLambda(0.5, top=1.2)  # the lambda of min_rate
    floor.theta.data.fill_(1e4)
    assert float(floor().detach()) == pytest.approx(1.2)


@pytest.mark.slow
def test_dev_mode_learns_lambda_on_dev_and_respects_the_rate_floor(tmp_path, distilled, medium_corpus):
    cfg = AdaptConfig(task="sid", cost=1.0, init_rate=0.5, min_rate=0.3, epochs=6, batch_size=8)
    run_adapt(cfg, distilled, medium_corpus, tmp_path / "dev")
    traj = [json.loads(x) for x in (tmp_path / "dev" / "trajectory.jsonl").read_text().splitlines()]
    assert any("lambda_loss" in r for r in traj) and "lambda_loss" not in traj[0]  # not during warm-up
    assert traj[-1]["phase"] == "refine" and "lambda_loss" not in traj[-1]  # lambda frozen at the end
    assert traj[-1]["lambda"] > traj[0]["lambda"]  # a large cost compresses
    from ofactl.checkpoint import load_student

    top = float(rate_to_lambda(0.3, load_student(distilled)[0].alpha_mean))
    assert max(r["lambda"] for r in traj) <= top + 1e-5  # never past the lambda of min_rate


@pytest.mark.slow
def test_pr_and_sid_move_lambda_in_opposite_directions(tmp_path, distilled, medium_corpus):
    synth_corpus = medium_corpus
    start = {}
    ends = {}
    # log2 pays gamma for every halving, enough at rate 0.3 for speaker ID to compress further;
    # linear pays gamma for all of the compute, so there it saves little and compresses less
    for task, form in (("pr", "log2"), ("sid", "log2"), ("sid", "linear")):
        cfg = AdaptConfig(task=task, init_rate=0.3, epochs=12, batch_size=8, cost_form=form)  # pr labels barely fit at 0.3
        assert cfg.lambda_data == "dev" and cfg.lambda_grad == "difference" and cfg.lambda_loss == "error"
        res = run_adapt(cfg, distilled, synth_corpus, tmp_path / f"{task}-{form}")
        traj = [json.loads(x) for x in (tmp_path / f"{task}-{form}" / "trajectory.jsonl").read_text().splitlines()]
        start[task, form], ends[task, form] = traj[0]["lambda"], res.learned_lambda
        assert all(0 <= r["lambda"] < 2 for r in traj)
    assert start["pr", "log2"] == pytest.approx(start["sid", "log2"]) == pytest.approx(start["sid", "linear"])
    assert ends["pr", "log2"] < start["pr", "log2"] and ends["sid", "log2"] > start["sid", "log2"]
    assert ends["sid", "linear"] < ends["sid", "log2"]


@pytest.mark.slow
@pytest.mark.parametrize("lambda_batch_size, expected", [(0, 8), (5, 5), (10_000, None)])
def test_each_lambda_step_reads_lambda_batch_size_dev_utterances(tmp_path, distilled, medium_corpus, monkeypatch,
                                                                 lambda_batch_size, expected):
    import ofactl.adapt as adapt_mod

    seen: list[list[str]] = []
    real = adapt_mod._lambda_objective

    def spy(cfg, student, probe, task, ids, *rest):
        seen.append(list(ids))
        assert set(ids) <= set(task.splits["dev"])
        return real(cfg, student, probe, task, ids, *rest)

    monkeypatch.setattr(adapt_mod, "_lambda_objective", spy)
    cfg = AdaptConfig(task="sid", epochs=2, batch_size=8, lambda_warmup=0.0, refine=0.0,
                      lambda_batch_size=lambda_batch_size)
    res = run_adapt(cfg, distilled, medium_corpus, tmp_path / "a")
    n_dev = len(build_task("sid", read_corpus(medium_corpus), None, 0).splits["dev"])
    assert seen and {len(b) for b in seen} == {expected or n_dev}  # 0: the probe's batch; capped at the dev split
    assert 0 < res.learned_rate <= 1


def test_band_draws_inside_the_range_put_no_mass_on_its_ends():
    """Near the top of lambda's range, clamped draws pile up on it; ``inside`` draws spread
    uniformly over the part of the band inside [0, top], and both keep to the band."""
    top, band = 0.818, 0.3
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    for lam, end in ((0.69, top), (0.1, 0.0)):
        at = torch.full_like(u, lam)
        clamp, inside = band_draws(at, u, band, top, "clamp"), band_draws(at, u, band, top, "inside")
        lo, hi = max(lam - band, 0.0), min(lam + band, top)
        for d in (clamp, inside):
            assert float(d.min()) >= lo - 1e-6 and float(d.max()) <= hi + 1e-6
        share_past_end = (lam + band - top) / (2 * band) if end == top else (band - lam) / (2 * band)
        assert float((clamp == end).float().mean()) == pytest.approx(share_past_end, abs=0.01)  # 28% / 33%
        assert float((inside == end).float().mean()) < 1e-4
        assert float(inside.mean()) == pytest.approx((lo + hi) / 2, abs=0.002)  # uniform over [lo, hi]
        hist = torch.histc(inside, bins=10, min=lo, max=hi) / len(u)
        assert torch.allclose(hist, torch.full_like(hist, 0.1), atol=0.01)
    mid = torch.full_like(u, 0.4)  # away from both ends the two are the same draws
    assert torch.allclose(band_draws(mid, u, band, top, "clamp"), band_draws(mid, u, band, top, "inside"), atol=1e-6)


def test_band_edges_reach_the_probes_draws(tmp_path, distilled, medium_corpus, monkeypatch):
    """A run started at the floor (lambda near top): with ``clamp`` a share of the probe's lambdas
    sit exactly on top, with ``inside`` none do."""
    import ofactl.adapt as adapt_mod

    drawn: dict[str, list[torch.Tensor]] = {"clamp": [], "inside": []}
    real = adapt_mod.band_draws

    def spy(lam, u, band, top, edges):
        out = real(lam, u, band, top, edges)
        drawn[edges].append(out / top)
        return out

    monkeypatch.setattr(adapt_mod, "band_draws", spy)
    for edges in ("clamp", "inside"):
        cfg = load_config(AdaptConfig, "adapt", None, ["task=sid", "epochs=1", "batch_size=8", "final_probe=joint",
                                                        "init_rate=0.25", f"band_edges={edges}"])
        run_adapt(cfg, distilled, medium_corpus, tmp_path / edges)
    at_top = {k: float((torch.cat(v) > 1 - 1e-6).float().mean()) for k, v in drawn.items()}
    assert at_top["clamp"] > 0.3 and at_top["inside"] == 0.0


@pytest.mark.parametrize("task, pool", [("pr", 4), ("pr", 1), ("sid", 4)])
def test_joint_batches_follow_probe_sort_pool_for_ctc_heads(tmp_path, distilled, medium_corpus, monkeypatch, task, pool):
    """CTC batches of like lengths (sorted runs of ``pool`` batches), as a sweep's probe trains;
    pool 1 and utterance heads draw plain random batches, the same ones as before the setting
    reached adapt."""
    import ofactl.adapt as adapt_mod

    seen: list[list[str]] = []
    real = adapt_mod._AdaptJob.step

    def spy(job, batches, phase):
        (ids,) = batches  # one probe without crossfit
        seen.append(list(ids))
        return real(job, batches, phase)

    monkeypatch.setattr(adapt_mod._AdaptJob, "step", spy)
    cfg = load_config(AdaptConfig, "adapt", None, [f"task={task}", "epochs=1", "batch_size=4", "final_probe=joint",
                                                    f"probe.sort_pool={pool}"])
    run_adapt(cfg, distilled, medium_corpus, tmp_path / "a")
    train = build_task(task, read_corpus(medium_corpus), None, 0).splits["train"]
    assert sorted(u for b in seen for u in b) == sorted(train)  # every utterance once per epoch
    assert [len(b) for b in seen].count(4) >= len(train) // 4 - pool  # full batches, a short one per run at most
    gen = torch.Generator().manual_seed(0)
    plain = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
    same_as_plain = [u for b in seen for u in b] == plain
    assert same_as_plain == (pool == 1 or task == "sid")
    if not same_as_plain:  # a batch's lengths lie within one sorted run: less padding than plain batches
        from ofactl.audio import load_audio

        secs = {u.id: load_audio(u.path).shape[-1] for u in read_corpus(medium_corpus) if u.id in set(train)}

        def padding(batches: list[list[str]]) -> int:
            return sum(max(secs[u] for u in b) * len(b) - sum(secs[u] for u in b) for b in batches)

        assert padding(seen) < padding([plain[k : k + 4] for k in range(0, len(plain), 4)])


@pytest.mark.slow
def test_zero_cost_never_compresses_a_task_that_needs_frames(tmp_path, distilled, medium_corpus):
    synth_corpus = medium_corpus
    cfg = AdaptConfig(task="pr", cost=0.0, init_rate=0.3, epochs=12, batch_size=8)  # labels barely fit at 0.3
    res = run_adapt(cfg, distilled, synth_corpus, tmp_path / "pr0")
    traj = [json.loads(x) for x in (tmp_path / "pr0" / "trajectory.jsonl").read_text().splitlines()]
    assert res.learned_lambda <= traj[0]["lambda"] + 1e-6


@pytest.mark.slow
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
    assert cfg.level_db is None  # as recorded, as adapt heard them
    # the test corpus's few dev utterances cannot resolve a 5-point cost: said in summary.json and on the terminal
    assert doc["dev_resolution"]["resolves_cost"] is False and doc["dev_resolution"]["dev_count"] < 50
    shown = CliRunner().invoke(app, ["adapt", "--ckpt", str(distilled), "--corpus", str(synth_corpus), "--task", "sid",
                                     "--out", str(tmp_path / "ad2"), "--set", "epochs=1"])
    assert shown.exit_code == 0 and "note: adapt --task sid read its rate from" in " ".join(shown.stderr.split())
    r = CliRunner().invoke(app, ["adapt", "--ckpt", str(distilled), "--corpus", str(synth_corpus), "--task", "sid",
                                 "--cost", "-1", "--out", str(out)])
    assert r.exit_code == 1 and "cost (gamma) must be >= 0" in r.stderr
    r = CliRunner().invoke(app, ["adapt", "--ckpt", str(distilled), "--corpus", str(synth_corpus), "--task", "sid",
                                 "--level-db", "loud", "--out", str(out)])
    assert r.exit_code == 1 and "--level-db loud: expected an RMS level in dBFS (e.g. -25) or auto" in r.stderr


def test_level_db_levels_what_adapt_hears_and_rate_yaml_extracts_at_that_level(tmp_path, distilled, synth_corpus):
    import numpy as np
    import soundfile as sf

    from ofactl.adapt import _cnn_cache
    from ofactl.checkpoint import load_student

    student, _ = load_student(distilled)
    assert student.input_level_db is not None  # distill records it
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    sf.write(tmp_path / "loud.wav", x, 16000, subtype="FLOAT")
    sf.write(tmp_path / "quiet.wav", x / 300, 16000, subtype="FLOAT")
    (tmp_path / "l.txt").write_text(f"{tmp_path / 'loud.wav'}\n{tmp_path / 'quiet.wav'}\n")
    utts = list(read_corpus(tmp_path / "l.txt"))
    raw = _cnn_cache(student, utts, torch.device("cpu"))
    levelled = _cnn_cache(student, utts, torch.device("cpu"), student.input_level_db)
    gap = {k: float((c["loud"].float() - c["quiet"].float()).abs().max()) for k, c in (("raw", raw), ("lev", levelled))}
    assert gap["lev"] < 0.01 < gap["raw"]
    out = tmp_path / "ad"
    r = CliRunner().invoke(app, ["adapt", "--ckpt", str(distilled), "--corpus", str(synth_corpus), "--task", "sid",
                                 "--out", str(out), "--set", "epochs=1", "--level-db", "auto"])
    assert r.exit_code == 0, r.output
    assert load_config(ExtractConfig, "extract", out / "rate.yaml").level_db == student.input_level_db


@pytest.mark.slow
def test_fresh_final_probe_reports_what_a_sweep_probe_scores_at_the_learned_rate(tmp_path, distilled, medium_corpus):
    from ofactl.adapt import _batch, _cnn_cache
    from ofactl.checkpoint import load_student
    from ofactl.probe.train import train_probe

    cfg = AdaptConfig(task="sid", cost=0.5, epochs=2, batch_size=8)
    fresh = run_adapt(cfg, distilled, medium_corpus, tmp_path / "fresh")
    joint = run_adapt(AdaptConfig(**{**cfg.__dict__, "final_probe": "joint"}), distilled, medium_corpus,
                      tmp_path / "joint")
    assert fresh.learned_rate == joint.learned_rate and fresh.joint_test == joint.joint_test == joint.test
    assert joint.final_probe_seconds == 0 and fresh.final_probe_seconds > 0
    # the reference: the sweep's probe trainer on exact-length features at the learned rate
    student, _ = load_student(distilled)
    corpus = read_corpus(medium_corpus)
    task = build_task("sid", corpus, None, 0)
    cache = _cnn_cache(student, [u for u in corpus if u.id in set(task.ids)], torch.device("cpu"))
    feats = {}
    for u in task.ids:
        x, n = _batch([u], cache, torch.device("cpu"))
        with torch.no_grad():
            hidden, _ = student.encode(x, n, rate=fresh.learned_rate, exact=True)
        feats[u] = hidden.states[0].numpy()
        assert len(feats[u]) == max(1, round(fresh.learned_rate * len(cache[u])))
    ref = train_probe(task, feats, cfg.probe, {u: len(cache[u]) for u in task.ids})
    assert fresh.test == pytest.approx(ref.test["accuracy"], abs=1e-4)
    # the dev split's resolution is read on the probe test comes from: the fresh one's dev metric ...
    assert fresh.dev_resolution["dev_metric"] == pytest.approx(ref.dev["accuracy"], abs=1e-4)
    assert fresh.dev_resolution["dev_count"] == joint.dev_resolution["dev_count"] == len(task.splits["dev"])
    assert 0 <= joint.dev_resolution["dev_metric"] <= 1  # ... or the joint probe's at the learned lambda
    assert json.loads((tmp_path / "fresh" / "summary.json").read_text())["final_probe"] == "fresh"


def _tiny_probe_setup(kind):
    from ofactl.probe import ProbeConfig
    from ofactl.probe.tasks import TaskData
    from ofactl.probe.train import Probe

    torch.manual_seed(0)
    probe = Probe(2, 8, 5, kind, ProbeConfig(lstm_hidden=4))
    labels = {"a": [1, 2, 2, 3], "b": [4]}
    task = TaskData("pr" if kind == "ctc" else "ks", kind, "per" if kind == "ctc" else "accuracy", kind == "cls",
                    {"train": ["a", "b"], "dev": [], "test": []}, labels, ["p", "q", "r", "s"])
    return probe, task


def test_soft_error_charges_ctc_utterances_too_short_for_their_labels():
    import numpy as np

    from ofactl.probe.train import ctc_min_frames, task_loss

    assert [ctc_min_frames([1, 2, 2, 3]), ctc_min_frames([4])] == [5, 1]
    probe, task = _tiny_probe_setup("ctc")
    h = torch.randn(2, 6, 2, 8)
    charged = dict(charge_infeasible=True)  # as adapt scores it
    with torch.no_grad():
        ok = task_loss(probe, task, ["a", "b"], h, torch.tensor([6, 6]), **charged)
        short = task_loss(probe, task, ["a", "b"], h, torch.tensor([4, 6]), **charged)  # "a" needs 5 frames
        alone_b = task_loss(probe, task, ["b"], h[1:], torch.tensor([6]), **charged)
        err = task_loss(probe, task, ["a", "b"], h, torch.tensor([4, 6]), soft_error=True, **charged)
        alone_err = task_loss(probe, task, ["b"], h[1:], torch.tensor([6]), soft_error=True, **charged)
        dropped = task_loss(probe, task, ["a", "b"], h, torch.tensor([4, 6]))  # as the probe trains
    assert float(short) == pytest.approx((np.log(5) + float(alone_b)) / 2, rel=1e-5)  # log(V) per token, not 0
    assert float(err) == pytest.approx((1 - 1 / 5 + float(alone_err)) / 2, rel=1e-5)  # 1 - exp(-log V)
    assert float(ok) > 0 and 0 <= float(err) <= 1
    assert float(dropped) == pytest.approx(float(alone_b) / 2, rel=1e-5)  # zero_infinity: "a" costs 0


def test_soft_error_of_a_classifier_is_one_minus_the_label_probability():
    from ofactl.probe.train import task_loss

    probe, task = _tiny_probe_setup("cls")
    probe.eval()
    task.labels.update({"a": [1], "b": [3]})
    h = torch.randn(2, 7, 2, 8)
    n = torch.tensor([7, 5])
    with torch.no_grad():
        p = probe(h, n).softmax(-1)
        got = task_loss(probe, task, ["a", "b"], h, n, soft_error=True, charge_infeasible=True)
    want = 1 - (p[0, 1] + p[1, 3]) / 2
    assert float(got) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.slow
def test_difference_gradient_is_the_central_difference_of_the_loss(distilled, medium_corpus):
    from ofactl.adapt import _batch, _cnn_cache, _lambda_objective
    from ofactl.audio import read_corpus
    from ofactl.checkpoint import load_student
    from ofactl.probe import build_task
    from ofactl.probe.train import Probe, task_loss

    student, _ = load_student(distilled)
    corpus = read_corpus(medium_corpus)
    task = build_task("sid", corpus)
    ids = task.splits["train"][:6]
    cache = _cnn_cache(student, [u for u in corpus if u.id in set(ids)], torch.device("cpu"))
    x, n = _batch(ids, cache, torch.device("cpu"))
    cfg = AdaptConfig(task="sid", difference_step=0.1)
    probe = Probe(student.num_hidden, student.cfg.arch.embed_dim, task.n_outputs, "cls", cfg.probe)
    lam = torch.tensor(0.4, requires_grad=True)
    student.eval()
    obj, _, cost = _lambda_objective(cfg, student, probe, task, ids, x, n, lam, 1.0)
    obj.backward()

    def at(v):
        probe.eval()
        with torch.no_grad():
            h, _ = student.encode(x, n, rate=None, lam=torch.full((len(ids),), v), exact=False)
            out = task_loss(probe, task, ids, h.states, h.lengths, soft_error=True, charge_infeasible=True)
        probe.train()
        return float(out)

    assert float(lam.grad) == pytest.approx((at(0.5) - at(0.3)) / 0.2, rel=1e-4, abs=1e-6)
    assert float(cost.detach()) < 0  # gamma * log2(ratio) with ratio < 1


def test_metric_error_is_what_a_sweep_scores_and_needs_the_difference():
    from types import SimpleNamespace

    from ofactl.adapt import _metric_error
    from ofactl.probe.metrics import ctc_greedy, error_rate

    probe, task = _tiny_probe_setup("cls")
    probe.eval()
    hidden = SimpleNamespace(states=torch.randn(2, 7, 2, 8), lengths=torch.tensor([7, 5]))
    with torch.no_grad():
        preds = probe(hidden.states, hidden.lengths).argmax(-1).tolist()
        for labels in ([preds[0]], [preds[1]]), ([preds[0]], [(preds[1] + 1) % 5]), ([(preds[0] + 1) % 5], [(preds[1] + 1) % 5]):
            task.labels.update({"a": labels[0], "b": labels[1]})
            right = sum(p == task.labels[u][0] for p, u in zip(preds, ["a", "b"]))
            assert float(_metric_error(probe, task, ["a", "b"], hidden)) == pytest.approx(1.0 - right / 2)
    ctc, ctask = _tiny_probe_setup("ctc")  # PER of the greedy decoding, as the sweep scores it
    ctc.eval()
    with torch.no_grad():
        hyp = ctc_greedy(ctc(hidden.states, hidden.lengths), hidden.lengths)
        ref = [[ctask.vocab[t - 1] for t in ctask.labels[u]] for u in ("a", "b")]
        want = error_rate([[ctask.vocab[t - 1] for t in h] for h in hyp], ref)
        assert float(_metric_error(ctc, ctask, ["a", "b"], hidden)) == pytest.approx(want)
    with pytest.raises(ValueError, match="lambda_loss metric has no gradient"):
        AdaptConfig(lambda_loss="metric", lambda_grad="pathwise").validate()


def test_rate_cost_forms_are_zero_at_rate_one_and_read_in_metric_points():
    r = torch.tensor([1.0, 0.5, 0.25])
    assert torch.allclose(RateCost(0.05, "log2")(r), torch.tensor([0.0, -0.05, -0.10]))  # gamma per halving
    assert torch.allclose(RateCost(0.05, "linear")(r), torch.tensor([0.0, -0.025, -0.0375]))  # gamma for all of it
    assert AdaptConfig().cost_form == "linear"
    assert torch.allclose(RateCost(0.05, "linear", target_rate=0.5)(r), torch.tensor([0.025, 0.0, 0.0125]))
    assert AdaptConfig(cost=0.1, cost_form="linear").rate_cost == RateCost(0.1, "linear")
    # linear bounds what the learned rate may lose: a saving below 0.05 cannot pay for 5 points
    ratio = torch.tensor(0.25, requires_grad=True)
    RateCost(0.05, "linear")(ratio).backward()
    assert float(ratio.grad) == pytest.approx(0.05)


def test_compare_with_sweep_uses_the_interpolated_curve_and_test_set_noise(tmp_path):
    from ofactl.adapt import compare_with_sweep
    from ofactl.probe.tasks import TaskData

    rows = [sweep_row(1.0, 0.40), sweep_row(0.5, 0.36), sweep_row(0.25, 0.20)]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": [r.to_json() for r in rows]}))
    ids = [f"u{i}" for i in range(100)]
    task = TaskData("sid", "cls", "accuracy", True, {"train": [], "dev": [], "test": ids}, {u: [0] for u in ids}, ["a"])
    c = compare_with_sweep(tmp_path, task, 0.45, 0.3, 5.0)
    assert c["tolerance"] == pytest.approx(2 * (0.4 * 0.6 / 100) ** 0.5, abs=1e-4)  # ~0.098 > 2 points
    lo, hi = c["near_flat_region"]
    assert hi == 1.0 and 0.40 < lo < 0.42  # 0.302 is reached at 0.409 on the line from 0.5 to 0.25
    assert c["learned_rate_in_flat_region"] and c["sweep_at_learned_rate"] == pytest.approx(0.328, abs=1e-3)
    assert not compare_with_sweep(tmp_path, task, 0.3, 0.3, 5.0)["learned_rate_in_flat_region"]
    assert not compare_with_sweep(tmp_path, task, 0.2, 0.3, 5.0)["learned_rate_in_flat_region"]  # below the sweep
    # adapt's own objective on the curve: error + 0.05 * log2(rate) is 0.60 at rate 1, 0.59 at 0.5
    # (the lowest: the curve is concave between them) and 0.672 - 0.058 at the learned 0.45
    o = compare_with_sweep(tmp_path, task, 0.45, 0.3, 5.0, cost=RateCost(0.05, "log2"))
    assert o["best_objective_rate"] == pytest.approx(0.5, abs=2e-3) and o["best_objective"] == pytest.approx(0.59, abs=1e-3)
    assert o["objective_gap"] == pytest.approx(0.672 + 0.05 * math.log2(0.45) - 0.59, abs=1e-3)
    assert "objective_gap" not in c  # only with a cost
    # a grid search on dev (here dev = test): the best dev metric without a cost, rate 1 ...
    assert (c["dev_choice_rate"], c["dev_choice_test"], c["dev_choice_in_flat_region"]) == (1.0, 0.40, True)
    # ... and with log2's cost 0.64 - 0.05 at 0.5 beats 0.60 at 1; the test there is what counts
    assert (o["dev_choice_rate"], o["dev_choice_test"]) == (0.5, 0.36)
    near_one = compare_with_sweep(tmp_path, task, 1.0, 0.4, 5.0, cost=RateCost(0.05, "linear", target_rate=1.0))
    assert near_one["best_objective_rate"] == 1.0 and near_one["objective_gap"] == pytest.approx(0.0, abs=1e-9)
    # linear: error + 0.05 * (rate - 1) is 0.60 at 1, 0.615 at 0.5: the lowest is at rate 1, where
    # log2's is at 0.5; the learned 0.45 is 0.672 - 0.0275 - 0.60 above it
    lin = compare_with_sweep(tmp_path, task, 0.45, 0.3, 5.0, cost=RateCost(0.05, "linear"))
    assert lin["best_objective_rate"] == 1.0 and lin["best_objective"] == pytest.approx(0.60, abs=1e-9)
    assert lin["objective_gap"] == pytest.approx(0.672 + 0.05 * (0.45 - 1) - 0.60, abs=1e-3)


def test_dev_resolution_weighs_two_standard_errors_of_the_dev_split_against_the_cost():
    from ofactl.probe.tasks import TaskData

    def task(kind, n_dev, tokens=1):
        ids = [f"u{i}" for i in range(n_dev)]
        metric = "accuracy" if kind == "cls" else "per"
        return TaskData("sid" if kind == "cls" else "pr", kind, metric, kind == "cls",
                        {"train": [], "dev": ids, "test": []}, {u: [0] * tokens for u in ids}, ["a"])

    small = dev_resolution(task("cls", 120), 0.75, RateCost(0.05, "linear"))
    p = (0.75 * 120 + 2) / 124  # Agresti-Coull: two more right and two more wrong
    assert small["standard_error"] == pytest.approx((p * (1 - p) / 124) ** 0.5, abs=1e-5)  # 0.0393
    assert (small["dev_count"], small["unit"], small["resolves_cost"]) == (120, "utterances", False)
    assert small["note"].startswith("adapt --task sid read its rate from 120 dev utterances")
    assert "(7.9 points) exceed the cost (5 points)" in small["note"]
    large = dev_resolution(task("cls", 552), 0.75, RateCost(0.05, "linear"))
    assert large["resolves_cost"] and large["note"] is None  # 2 x 1.8 points
    assert not dev_resolution(task("cls", 6), 1.0, RateCost(0.05, "linear"))["resolves_cost"]  # all right, yet 6
    assert not dev_resolution(task("cls", 552), 0.75, RateCost(0.02, "linear"))["resolves_cost"]  # a finer cost
    ctc = dev_resolution(task("ctc", 120, tokens=20), 0.1, RateCost(0.05, "linear"))  # error rates count tokens
    assert (ctc["dev_count"], ctc["unit"], ctc["resolves_cost"]) == (2400, "reference tokens", True)
    assert dev_resolution(task("cls", 0), 0.75, RateCost(0.05, "linear")) is None  # no dev split
    assert dev_resolution(task("cls", 120), 0.75, RateCost(0.05, "linear", target_rate=0.5)) is None
    assert small["note"].endswith("speaker ID keeps a tenth of each speaker's utterances for dev, and --set "
                                  "lambda_data=crossfit holds out every train and dev utterance once, which can "
                                  "resolve it (docs/method.md)")  # sid ignores a manifest's split column
    ks = dev_resolution(replace(task("cls", 120), task="ks"), 0.75, RateCost(0.05, "linear"))
    assert "a split column in the manifest can give dev more, or --set lambda_data=crossfit" in ks["note"]
    pooled = task("cls", 1080)  # crossfit: every train and dev utterance, each read through a probe that did not train on it
    folds = dev_resolution(pooled, 0.75, RateCost(0.05, "linear"), pooled.splits["dev"], "crossfit")
    assert (folds["dev_count"], folds["held_out"], folds["resolves_cost"]) == (1080, "crossfit", True)
    few = dev_resolution(pooled, 0.75, RateCost(0.05, "linear"), pooled.splits["dev"][:100], "crossfit")
    assert few["note"].startswith("adapt --task sid read its rate from 100 held-out (crossfit) utterances")
    assert "more labelled utterances would resolve it" in few["note"]


def _labelled(n_train, n_dev, n_labels, kind="cls"):
    from ofactl.probe.tasks import TaskData

    splits = {s: [f"{s}{i}" for i in range(n)] for s, n in (("train", n_train), ("dev", n_dev), ("test", 10))}
    labels = {u: [i % n_labels] for ids in splits.values() for i, u in enumerate(ids)}
    return TaskData("sid" if kind == "cls" else "pr", kind, "accuracy" if kind == "cls" else "per", kind == "cls",
                    splits, labels, [str(i) for i in range(n_labels)])


def test_crossfit_folds_hold_out_every_train_and_dev_utterance_once():
    task = _labelled(96, 12, 6)
    folds = fold_ids(AdaptConfig(task="sid", lambda_data="crossfit", folds=4, seed=3), task)
    pool = set(task.splits["train"]) | set(task.splits["dev"])
    assert len(folds) == 4
    held = [u for _, h in folds for u in h]
    assert sorted(held) == sorted(pool)  # each pooled utterance held out once, no test utterance
    for train, h in folds:
        assert set(train) | set(h) == pool and not set(train) & set(h)  # a probe never reads what it trained on
        assert {task.labels[u][0] for u in h} == set(range(6))  # every speaker in every fold (18 each, dealt by label)
        assert len(h) == 27
    assert folds == fold_ids(AdaptConfig(task="sid", lambda_data="crossfit", folds=4, seed=3), task)  # seeded
    assert folds != fold_ids(AdaptConfig(task="sid", lambda_data="crossfit", folds=4, seed=4), task)
    assert fold_ids(AdaptConfig(task="sid"), task) == [(task.splits["train"], task.splits["dev"])]
    assert fold_ids(AdaptConfig(task="sid", lambda_data="train"), task) == [(task.splits["train"], [])]
    with pytest.raises(ConfigError, match="crossfit needs at least two train and dev utterances per fold "
                                          r"\(5 folds\), the corpus has 9"):
        fold_ids(AdaptConfig(task="sid", lambda_data="crossfit"), _labelled(6, 3, 2))


def test_crossfit_deals_whole_speakers_where_dev_holds_speakers_train_lacks():
    task = _labelled(96, 24, 4, kind="ctc")  # pr-like: train speakers t0-t7, dev speakers d0-d1, 12 utterances each
    task.speakers = {u: f"{s[0]}{i % (8 if s == 'train' else 2)}" for s, ids in task.splits.items() for i, u in enumerate(ids)}
    assert task.dev_speakers_unseen
    folds = fold_ids(AdaptConfig(task="pr", lambda_data="crossfit", folds=4, seed=3), task)
    pool = task.splits["train"] + task.splits["dev"]
    assert sorted(u for _, h in folds for u in h) == sorted(pool)  # each pooled utterance held out once
    for train, h in folds:
        assert set(train) | set(h) == set(pool)
        assert not {task.speakers[u] for u in train} & {task.speakers[u] for u in h}  # no held-out voice was trained on
        assert sum(task.speakers[a] != task.speakers[b] for a, b in itertools.pairwise(h)) > len({task.speakers[u] for u in h})
    assert sorted(len(h) for _, h in folds) == [24, 24, 36, 36]  # ten speakers of 12: the lightest fold gets the next
    assert folds == fold_ids(AdaptConfig(task="pr", lambda_data="crossfit", folds=4, seed=3), task)  # seeded
    with pytest.raises(ConfigError, match="deals whole speakers into folds and needs at least 12 speakers in train and "
                                          "dev; the corpus has 10: set folds to 10 or fewer"):
        fold_ids(AdaptConfig(task="pr", lambda_data="crossfit", folds=12), task)
    shared = _labelled(96, 24, 4)  # speaker ID: dev's voices are train's, so utterances are dealt (by label)
    shared.speakers = {u: f"s{i % 4}" for ids in shared.splits.values() for i, u in enumerate(ids)}
    assert not shared.dev_speakers_unseen
    for _, h in fold_ids(AdaptConfig(task="sid", lambda_data="crossfit", folds=4), shared):
        assert len(h) == 30 and {shared.speakers[u] for u in h} == {"s0", "s1", "s2", "s3"}


def test_crossfit_folds_the_corpus_cannot_fill_fail_before_the_features(tmp_path, distilled, medium_corpus,
                                                                         monkeypatch):
    import ofactl.adapt as adapt_mod

    monkeypatch.setattr(adapt_mod, "_cnn_cache", lambda *a, **k: pytest.fail("features computed"))
    with pytest.raises(ConfigError, match=r"crossfit needs at least two train and dev utterances per fold \(100 folds\)"):
        run_adapt(AdaptConfig(task="sid", lambda_data="crossfit", folds=100), distilled, medium_corpus, tmp_path / "a")
    assert not (tmp_path / "a" / "trajectory.jsonl").exists()


def test_crossfit_moves_lambda_through_probes_that_did_not_train_on_what_it_reads(tmp_path, distilled, medium_corpus,
                                                                                 monkeypatch):
    import ofactl.adapt as adapt_mod

    trained: dict[int, set[str]] = {}
    read: dict[int, set[str]] = {}
    real_step, real_objective = adapt_mod._AdaptJob._probe_step, adapt_mod._lambda_objective

    def probe_step(job, fold, ids, *rest):
        trained.setdefault(id(fold.probe), set()).update(ids)
        return real_step(job, fold, ids, *rest)

    def objective(cfg, student, probe, task, ids, *rest):
        read.setdefault(id(probe), set()).update(ids)
        return real_objective(cfg, student, probe, task, ids, *rest)

    tested: dict[int, float] = {}
    real_evaluate = adapt_mod._evaluate

    def evaluate(student, probes, task, ids, *rest):
        each, rate = real_evaluate(student, probes, task, ids, *rest)
        tested.update({id(p): m["accuracy"] for p, m in zip(probes, each, strict=True)})
        return each, rate

    monkeypatch.setattr(adapt_mod._AdaptJob, "_probe_step", probe_step)
    monkeypatch.setattr(adapt_mod, "_lambda_objective", objective)
    monkeypatch.setattr(adapt_mod, "_evaluate", evaluate)
    cfg = AdaptConfig(task="sid", epochs=1, batch_size=8, lambda_warmup=0.0, refine=0.0, final_probe="joint",
                      lambda_data="crossfit", folds=3)
    res = run_adapt(cfg, distilled, medium_corpus, tmp_path / "a")
    task = build_task("sid", read_corpus(medium_corpus), None, 0)
    pool = set(task.splits["train"]) | set(task.splits["dev"])
    assert len(trained) == 3 and set(read) == set(trained)  # three probes, lambda read through each
    for probe, ids in read.items():
        assert ids and ids <= pool and not ids & trained[probe]  # held out from the probe lambda read it through
    assert res.dev_resolution["dev_count"] == len(pool) and res.dev_resolution["held_out"] == "crossfit"
    assert 0 <= res.dev_resolution["dev_metric"] <= 1 and 0 < res.learned_rate <= 1
    # the joint test figure is every fold's probe on the test split, averaged, not one fold's
    assert set(tested) == set(trained)
    assert res.joint_test == res.test == pytest.approx(sum(tested.values()) / 3, abs=1e-5)


def test_lambda_read_on_train_batches_leaves_the_dev_split_out_of_it(tmp_path, distilled, medium_corpus):
    # (with lambda_data dev, the default, test_fresh_final_probe_... reads it for both final probes)
    cfg = AdaptConfig(task="sid", epochs=1, batch_size=8, final_probe="joint", lambda_data="train")
    train = run_adapt(cfg, distilled, medium_corpus, tmp_path / "train")
    assert train.dev_resolution is None  # lambda never read the dev split, so its size says nothing of the rate
    assert json.loads((tmp_path / "train" / "summary.json").read_text())["dev_resolution"] is None


def test_a_grid_search_on_dev_can_pick_a_rate_the_test_curve_rules_out(tmp_path):
    from dataclasses import replace

    from ofactl.adapt import compare_with_sweep
    from ofactl.probe.tasks import TaskData

    # speaker ID as one ablation student measured it: level on dev, best at 0.25 there; a test
    # peak at 0.5 that dev does not show
    test = {1.0: 0.692, 0.5: 0.792, 0.33: 0.708, 0.25: 0.658}
    dev = {1.0: 0.650, 0.5: 0.658, 0.33: 0.650, 0.25: 0.700}
    rows = [replace(sweep_row(r, test[r]), dev=dev[r]) for r in test]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": [r.to_json() for r in rows]}))
    ids = [f"u{i}" for i in range(120)]
    task = TaskData("sid", "cls", "accuracy", True, {"train": [], "dev": [], "test": ids}, {u: [0] for u in ids}, ["a"])
    c = compare_with_sweep(tmp_path, task, 0.253, 0.65, 5.0, cost=RateCost(0.05, "linear"))
    assert c["sweep_dev_metric"] == [0.700, 0.650, 0.658, 0.650]  # by rate, ascending
    assert (c["dev_choice_rate"], c["dev_choice_test"]) == (0.25, 0.658)
    assert not c["dev_choice_in_flat_region"] and not c["learned_rate_in_flat_region"]


@pytest.mark.parametrize("key, value, message", [
    ("lambda_grad", "exact", "lambda_grad in defaults with --set lambda_grad=exact: expected 'difference' | 'pathwise'"),
    ("lambda_loss", "ce", "expected 'error' | 'loss' | 'metric', got str 'ce'"),
    ("refine", "0.8", "lambda_warmup + refine below 1"),
    ("probe_band", "2", "probe_band in [0, 1]"),
    ("cost_form", "log", "expected 'log2' | 'linear', got str 'log'"),
    ("band_edges", "reflect", "expected 'clamp' | 'inside', got str 'reflect'"),
    ("lambda_batch_size", "-1", "lambda_batch_size must be >= 0"),
    ("restarts", "[0.1]", "restarts must be rates from min_rate (0.25) to 1, got 0.1"),
    ("folds", "1", "folds must be at least 2"),
    ("lambda_data", "cv", "expected 'dev' | 'train' | 'crossfit', got str 'cv'"),
])
def test_bad_adapt_settings_name_the_key(tmp_path, synth_corpus, key, value, message):
    r = CliRunner().invoke(app, ["adapt", "--ckpt", str(tmp_path / "missing.pt"), "--corpus", str(synth_corpus),
                                 "--set", f"{key}={value}", "--out", str(tmp_path / "ad")])
    assert r.exit_code == 1 and f"--set {key}={value}" in r.stderr and message in r.stderr
    assert not (tmp_path / "ad").exists()  # rejected before any work


@pytest.mark.slow
def test_restarts_keep_the_run_with_the_lowest_dev_objective(tmp_path, distilled, medium_corpus):
    cfg = AdaptConfig(task="sid", cost=0.05, epochs=2, batch_size=8)
    one = run_adapt(cfg, distilled, medium_corpus, tmp_path / "one")
    many = run_adapt(replace(cfg, restarts=(0.9,)), distilled, medium_corpus, tmp_path / "many")
    assert one.starts == [] and [s["init_rate"] for s in many.starts] == [0.5, 0.9]
    first, second = many.starts
    assert first["learned_rate"] == one.learned_rate  # the first run is the single run, step for step
    assert second["learned_rate"] > first["learned_rate"]  # a start near rate 1 stays higher on this short run
    alone = run_adapt(replace(cfg, init_rate=0.9), distilled, medium_corpus, tmp_path / "alone")
    assert second["learned_rate"] == alone.learned_rate  # each start is the run its init_rate alone gives
    for s in many.starts:  # the objective: dev error plus the linear cost at the learned rate
        assert s["dev_objective"] == pytest.approx(1 - s["dev"] + 0.05 * (s["learned_rate"] - 1), abs=1e-4)
    kept = min(many.starts, key=lambda s: s["dev_objective"])
    assert kept["kept"] and sum(s["kept"] for s in many.starts) == 1
    assert many.learned_rate == kept["learned_rate"] and many.init_rate == kept["init_rate"]
    summary = json.loads((tmp_path / "many" / "summary.json").read_text())
    assert summary["starts"] == many.starts
    rate_yaml = load_config(ExtractConfig, "extract", tmp_path / "many" / "rate.yaml")
    assert rate_yaml.rates == (many.learned_rate,)
    with pytest.raises(ValueError, match="restarts picks a run by its fresh probe's dev metric"):
        replace(cfg, restarts=(0.9,), final_probe="joint").validate()


@pytest.mark.parametrize("what", ["missing", "not json", "another task"])
def test_a_bad_compare_sweep_fails_before_any_training(tmp_path, what):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    if what == "not json":
        (sweep / "sweep.json").write_text("{")
    elif what == "another task":
        (sweep / "sweep.json").write_text(json.dumps({"rows": [sweep_row(1.0, 0.4, task="sid").to_json()]}))
    match = {"missing": r"sweep\.json not found", "not json": "unreadable", "another task": "no rows for task pr"}[what]
    with pytest.raises(ConfigError, match=rf"--compare-sweep .*sweep: .*{match}"):
        # the checkpoint and corpus do not exist: the check comes before either is read
        run_adapt(AdaptConfig(task="pr"), tmp_path / "no.pt", tmp_path / "no.tsv", tmp_path / "out", compare_sweep=sweep)
    assert not (tmp_path / "out").exists()


def test_a_file_too_short_for_the_cnn_is_reported_with_the_corpus_not_as_a_crash(tmp_path, student_ckpt, write_wav):
    from ofactl.errors import CorpusError

    rows = ["id\tpath\tlabel"] + [f"u{i}\t{write_wav(f'u{i}.wav', seconds=0.5).name}\t{i % 2}" for i in range(6)]
    rows.append(f"tiny\t{write_wav('tiny.wav', seconds=100 / 16000).name}\t1")
    (tmp_path / "m.tsv").write_text("\n".join(rows) + "\n")
    with pytest.raises(CorpusError, match=r"tiny\.wav: too short \(100 samples"):
        run_adapt(AdaptConfig(task="ks"), student_ckpt[0], tmp_path / "m.tsv", tmp_path / "out")


def test_a_sweep_of_several_students_is_read_for_the_adapted_one_only(tmp_path):
    from ofactl.adapt import compare_with_sweep
    from ofactl.probe.tasks import TaskData

    ofa = [replace(sweep_row(r, t), label="ofa", checkpoint_sha256="aaa") for r, t in ((1.0, 0.40), (0.5, 0.38))]
    fixed = [replace(sweep_row(0.5, 0.10), label="fixed0.5", checkpoint_sha256="bbb")]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": [r.to_json() for r in ofa + fixed]}))
    ids = [f"u{i}" for i in range(100)]
    task = TaskData("sid", "cls", "accuracy", True, {"train": [], "dev": [], "test": ids}, {u: [0] for u in ids}, ["a"])
    c = compare_with_sweep(tmp_path, task, 0.5, 0.38, 5.0, ckpt_sha="aaa")
    assert c["sweep_metric"] == [0.38, 0.40] and c["best_sweep_metric"] == 0.40  # the fixed student's 0.10 is not on it
    with pytest.raises(ConfigError, match=r"its sid rows are of other checkpoints \(fixed0.5, ofa\), not of this one"):
        compare_with_sweep(tmp_path, task, 0.5, 0.38, 5.0, ckpt_sha="ccc")
