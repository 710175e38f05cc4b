from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import kill_when_exists

from ofactl.errors import CheckpointError, ConfigError
from ofactl.model.blocks import HubertArch
from ofactl.model.student import TINY_CONV
from ofactl.pretrain import (
    PretrainConfig,
    expected_masked_fraction,
    run_pretrain,
    span_mask,
)

ARCH = HubertArch(conv_layers=TINY_CONV, embed_dim=32, num_layers=2, num_heads=2, ffn_dim=64, pos_conv_kernel=16,
                  pos_conv_groups=4)


def tiny_cfg(**kw):
    base = PretrainConfig(arch=ARCH, n_units=12, kmeans_utts=20, final_dim=16, steps=30, batch_seconds=8.0,
                          crop_seconds=2.0, num_workers=0, eval_utts=4, ckpt_every=10, log_every=1, eval_every=0,
                          device="cpu")
    base.optim = replace(base.optim, lr=3e-3, warmup=0.1)
    return replace(base, **kw)


def test_span_mask_matches_its_settings():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([2000] * 16)
    m = span_mask(lengths, 0.08, 10, gen)
    frac = float(m.float().mean())
    assert abs(frac - expected_masked_fraction(0.08, 10)) < 0.03  # 1 - 0.92^10 = 0.566
    sparse = span_mask(torch.tensor([5000]), 0.002, 7, gen)[0].int().tolist()
    runs, cur = [], 0
    for v in sparse + [0]:
        if v:
            cur += 1
        elif cur:
            runs.append(cur)
            cur = 0
    assert runs and all(r % 7 == 0 for r in runs) and runs.count(7) >= len(runs) - 1  # spans of exactly 7
    assert not span_mask(torch.tensor([5]), 0.5, 10, gen).any()  # too short for one span


@pytest.mark.slow
def test_loss_falls_and_the_teacher_serves_distill(tmp_path, synth_corpus):
    res = run_pretrain(tiny_cfg(), synth_corpus, tmp_path / "pt")
    recs = [json.loads(x) for x in (tmp_path / "pt/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert {"acc_masked", "acc_unmasked", "masked_fraction"} <= set(recs[-1])
    assert set(res.eval) == {"loss", "acc_masked", "acc_unmasked"}
    assert (tmp_path / "pt/kmeans.safetensors").is_file()
    from ofactl.model.teacher import load_teacher

    t = load_teacher(res.teacher)
    assert t.arch.embed_dim == 32 and t.arch.num_layers == 2 and t.arch.num_heads == 2
    from ofactl.audio import median_level_db, read_corpus
    from ofactl.training import split_held_out

    cfg = tiny_cfg()  # the teacher records the level it heard in training, as distill's students do
    trn, _ = split_held_out(list(read_corpus(synth_corpus)), cfg.eval_utts, cfg.seed)
    assert t.input_level_db is not None and t.input_level_db == median_level_db(trn, seed=cfg.seed) < -3
    from ofactl.config import load_config
    from ofactl.distill import DistillConfig, run_distill

    d = load_config(DistillConfig, "distill", "distill-tiny")
    d = replace(d, teacher=str(res.teacher), steps=2, batch_seconds=6.0, crop_seconds=2.0, num_workers=0, eval_utts=4,
                eval_rates=(1.0,), init_from_teacher=False)
    d.student = replace(d.student, teacher_dim=32, pred_layers=(1, 2), spectral_bins=0)
    d.guidance = replace(d.guidance, boundaries="none")
    out = run_distill(d, synth_corpus, tmp_path / "d")
    assert out.steps == 2 and (tmp_path / "d/student.pt").is_file()
    from typer.testing import CliRunner

    from ofactl.cli import app

    r = CliRunner().invoke(app, ["info", "--teacher", str(res.teacher), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["hidden_states"] == 3
    assert json.loads(r.stdout)["input_level_db"] == t.input_level_db


@pytest.mark.slow
def test_speed_perturbed_pretraining_learns_and_is_seeded(tmp_path, synth_corpus):
    cfg = tiny_cfg(steps=20, speed_perturb=(0.9, 1.0, 1.1))
    a = run_pretrain(cfg, synth_corpus, tmp_path / "a")
    recs = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
    b = run_pretrain(cfg, synth_corpus, tmp_path / "b")
    plain = run_pretrain(replace(cfg, speed_perturb=()), synth_corpus, tmp_path / "plain")
    from safetensors.torch import load_file

    wa, wb, wp = (load_file(str(r.teacher)) for r in (a, b, plain))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # seeded: the same factors and crops again
    assert not all(torch.equal(wa[k], wp[k]) for k in wa)
    with pytest.raises(ConfigError, match=r"speed_perturb: factors must lie in \[0.5, 2\] \(got 3.0\)"):
        from ofactl.config import load_config

        load_config(PretrainConfig, "pretrain", "pretrain-tiny", ["speed_perturb=[0.9,3]"])


_SCRIPT = """
import sys
from dataclasses import replace
sys.path.insert(0, sys.argv[4])
from test_pretrain import tiny_cfg
from ofactl.pretrain import run_pretrain
run_pretrain(tiny_cfg(steps=12, ckpt_every=3), sys.argv[1], sys.argv[2], resume=sys.argv[3] == "1")
"""


@pytest.mark.slow
def test_resume_after_kill_is_bitwise_equal(tmp_path, synth_corpus):
    here = os.path.dirname(__file__)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([sys.executable, "-c", _SCRIPT, str(synth_corpus), str(full), "0", here], check=True)
    kill_when_exists([sys.executable, "-c", _SCRIPT, str(synth_corpus), str(killed), "0", here], killed / "checkpoints/step-*.pt")
    subprocess.run([sys.executable, "-c", _SCRIPT, str(synth_corpus), str(killed), "1", here], check=True)
    from safetensors.torch import load_file

    a, b = load_file(str(full / "teacher.safetensors")), load_file(str(killed / "teacher.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (killed / "unit-targets.npz").is_file()  # the resume read its targets back: the same run still
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    # the summary's totals cover the whole run: the killed one read the same audio over two invocations
    a_sum, b_sum = (json.loads((d / "summary.json").read_text()) for d in (full, killed))
    assert b_sum["total_audio_seconds"] == pytest.approx(a_sum["total_audio_seconds"], abs=1e-2)
    assert b_sum["audio_seconds"] < b_sum["total_audio_seconds"]  # the last invocation read only its part
    assert b_sum["total_wall_seconds"] > b_sum["wall_seconds"]
    assert a_sum["audio_seconds"] == pytest.approx(a_sum["total_audio_seconds"], abs=1e-2)


@pytest.mark.slow
def test_a_pre_ln_run_of_the_earlier_objective_resumes_only_with_final_norm_false(tmp_path, synth_corpus):
    import yaml

    pre = replace(ARCH, layer_norm_first=True)
    run = tmp_path / "run"
    run_pretrain(tiny_cfg(steps=2, arch=pre, final_norm=False), synth_corpus, run)
    # as an ofactl that knew no final_norm recorded it
    cfg_doc = yaml.safe_load((run / "config.yaml").read_text())
    del cfg_doc["pretrain"]["final_norm"]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg_doc))
    with pytest.raises(CheckpointError, match=r"run was trained with final_norm=false \(recorded before the setting "
                                              r"existed.*this run sets final_norm=true; continue it with --set "
                                              "final_norm=false"):
        run_pretrain(tiny_cfg(steps=4, arch=pre), synth_corpus, run, resume=True)
    assert "final_norm" not in (run / "config.yaml").read_text()  # refused before the settings are recorded
    assert run_pretrain(tiny_cfg(steps=4, arch=pre, final_norm=False), synth_corpus, run, resume=True).steps == 4


@pytest.mark.slow
def test_bad_settings_are_one_clear_error(tmp_path, synth_corpus):
    with pytest.raises(ConfigError, match=r"n_units=5000 is more than the \d+ frames sampled"):
        run_pretrain(tiny_cfg(n_units=5000, kmeans_utts=2), synth_corpus, tmp_path / "a")
    with pytest.raises(ConfigError, match="--targets layer:1 needs --from"):
        run_pretrain(tiny_cfg(targets="layer:1"), synth_corpus, tmp_path / "b")
    with pytest.raises(ConfigError, match="--targets 'frames': expected mfcc or layer:N"):
        tiny_cfg(targets="frames").validate()
    first = run_pretrain(tiny_cfg(steps=2), synth_corpus, tmp_path / "it1")
    with pytest.raises(ConfigError, match=r"--targets layer:7: .* has hidden states 0..2"):
        run_pretrain(tiny_cfg(targets="layer:7", from_ckpt=str(first.teacher)), synth_corpus, tmp_path / "c")
    other = replace(ARCH, embed_dim=48, num_heads=3, pos_conv_groups=4)
    with pytest.raises(ConfigError, match="--from .*another architecture"):
        run_pretrain(tiny_cfg(arch=other, targets="layer:1", from_ckpt=str(tmp_path / "it1")), synth_corpus,
                     tmp_path / "d")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()  # refused before any folder
    with pytest.raises(CheckpointError, match=r"n_units: 12 -> 10"):  # before k-means: nothing is redone
        run_pretrain(tiny_cfg(steps=4, n_units=10), synth_corpus, tmp_path / "it1", resume=True)
    second = run_pretrain(tiny_cfg(steps=2, targets="layer:1", from_ckpt=str(tmp_path / "it1")), synth_corpus,
                          tmp_path / "it2")
    assert second.steps == 2


@pytest.mark.parametrize(("pre_ln", "final_norm"), [(False, True), (True, True), (True, False)])
def test_every_trained_parameter_gets_a_gradient_and_the_objective_reads_the_final_norm_as_set(pre_ln, final_norm):
    # DDP waits for a gradient of every parameter that requires one: a pre-LN encoder's final
    # layer norm, when the objective does not read it, stopped torchrun at its second step
    from ofactl.model.blocks import transformer_states
    from ofactl.pretrain import PretrainModel, unit_loss

    torch.manual_seed(0)
    model = PretrainModel(replace(ARCH, layer_norm_first=pre_ln), 12, 16, final_norm=final_norm).train()
    wav, lengths = torch.randn(2, 16000), torch.tensor([16000, 12000])
    mask = span_mask(torch.tensor([49, 37]), 0.2, 3, torch.Generator().manual_seed(0))
    logits, n = model(wav, lengths, mask)
    loss, _ = unit_loss(logits, torch.randint(0, 12, logits.shape[:2]), mask, n, 0.0)
    loss.backward()
    missing = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
    reads_norm = pre_ln and final_norm  # HuBERT's objective (fairseq's encoder output); a post-LN
    # encoder's "final" norm is applied to its input instead
    assert frozen == ([] if reads_norm or not pre_ln else
                      ["encoder.encoder.transformer.layer_norm.weight", "encoder.encoder.transformer.layer_norm.bias"])
    model.eval()
    with torch.no_grad():  # the logits against the last hidden state, through the final norm when read
        x, n = model.frames(wav, lengths)
        transformer = model.encoder.encoder.transformer
        h = transformer_states(transformer, x, n)[-1]
        h = transformer.layer_norm(h) if reads_norm else h
        z = torch.nn.functional.normalize(model.final_proj(h), dim=-1)
        want = z @ torch.nn.functional.normalize(model.label_embs, dim=-1).T / model.temp
        assert torch.allclose(model(wav, lengths, None)[0], want, atol=1e-5)


@pytest.mark.slow
def test_ddp_pretraining_of_a_pre_ln_model_runs_on_two_cpu_processes(tmp_path, synth_corpus):
    import yaml

    from ofactl.config import to_dict

    preset = tmp_path / "pt.yaml"
    preset.write_text(yaml.safe_dump({"pretrain": to_dict(tiny_cfg(steps=3, arch=replace(ARCH, layer_norm_first=True)))}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ofactl",
           "pretrain", "-c", str(preset), "--corpus", str(synth_corpus), "--out", str(tmp_path / "ddp"), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert summary["steps"] == 3 and summary["ranks_in_sync"] is True
    assert (tmp_path / "ddp/teacher.safetensors").is_file() and "warning" not in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "ddp/kmeans.safetensors").is_file() and (tmp_path / "ddp/unit-targets.npz").is_file()
