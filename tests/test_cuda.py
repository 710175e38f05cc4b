"""The CUDA paths against the CPU: extraction (fp32 and bf16), a bf16 distillation run and the
features of iteration-2 pretraining targets.

Marked ``gpu`` and skipped without a CUDA device (CI has none); run on a GPU machine with
``pytest -m gpu``.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_distill import tiny_cfg
from test_extract import CFG

from ofactl.checkpoint import load_student
from ofactl.distill import run_distill
from ofactl.extract import run_extract
from ofactl.storage import open_store

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def stores(tmp_path, corpus, ckpt, cfg_cuda, rate):
    """Extract on the CPU (fp32) and with ``cfg_cuda``: {id: (cpu, cuda)} features at ``rate``."""
    run_extract(replace(cfg_cuda, device="cpu", precision="fp32"), ckpt, corpus, tmp_path / "cpu.zarr")
    run_extract(cfg_cuda, ckpt, corpus, tmp_path / "cuda.zarr")
    a, b = (open_store(tmp_path / n).group(rate).load_all() for n in ("cpu.zarr", "cuda.zarr"))
    assert a.keys() == b.keys()
    return {k: (a[k], b[k]) for k in a}


def test_cuda_fp32_extraction_equals_the_cpu(tmp_path, synth_corpus, student_ckpt):
    cfg = replace(CFG, device="cuda", precision="fp32")
    for cpu, gpu in stores(tmp_path, synth_corpus, student_ckpt[0], cfg, 0.5).values():
        assert cpu.shape == gpu.shape
        assert np.allclose(cpu, gpu, atol=1e-3)


@pytest.mark.parametrize("adaptive", [False, True])
def test_cuda_bf16_extraction_keeps_lengths_and_stays_close(tmp_path, synth_corpus, student_ckpt, adaptive):
    cfg = replace(CFG, device="cuda", precision="bf16", rates=(0.5,), adaptive_length=adaptive)
    pairs = stores(tmp_path, synth_corpus, student_ckpt[0], cfg, 0.5)
    assert all(cpu.shape == gpu.shape for cpu, gpu in pairs.values())  # alpha runs in fp32 under autocast
    rel = max(np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu) for cpu, gpu in pairs.values())
    assert rel < 0.05, rel


def test_bf16_distillation_on_cuda_trains_and_loads_on_the_cpu(tmp_path, synth_corpus):
    cfg = replace(tiny_cfg(steps=6), device="cuda", precision="bf16")
    res = run_distill(cfg, synth_corpus, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert res.steps == 6 and len(losses) == 6 and all(np.isfinite(losses))
    student, _ = load_student(res.student)  # saved from CUDA, read on the CPU
    out = student(torch.randn(1, 16000), torch.tensor([16000]), rate=0.5)
    assert out.hidden.lengths.tolist() == [25]


def test_iteration_2_features_run_on_the_gpu_and_match_the_cpu(tmp_path, synth_corpus):
    from test_pretrain import ARCH, tiny_cfg

    from ofactl.audio import read_corpus
    from ofactl.pretrain import PretrainModel, export_teacher
    from ofactl.units import FeatureSource

    torch.manual_seed(0)
    export_teacher(PretrainModel(ARCH, 12, 16), tmp_path / "it1.safetensors")
    cfg = tiny_cfg(targets="layer:1", from_ckpt=str(tmp_path / "it1.safetensors"))
    utt = next(iter(read_corpus(synth_corpus)))
    on_cpu = FeatureSource(cfg, torch.device("cpu"))(utt)
    source = FeatureSource(cfg, torch.device("cpu")).to(torch.device("cuda"))
    on_gpu = source(utt)
    assert next(source.model.parameters()).is_cuda and on_gpu.device.type == "cpu"
    assert on_gpu.shape == on_cpu.shape and torch.allclose(on_gpu, on_cpu, atol=1e-3)
