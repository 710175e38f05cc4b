"""benchmarks/unit_targets_bench.py: assigning the units against reading them back."""
from __future__ import annotations

import json
import sys

import torch
from test_pretrain import tiny_cfg

from ofactl.audio import read_corpus
from ofactl.config import save_resolved
from ofactl.progress import NullProgress
from ofactl.units import FeatureSource, fit_units


def test_unit_targets_bench_reads_back_what_it_assigned(load_benchmark, monkeypatch, capsys, tmp_path, synth_corpus):
    cfg = tiny_cfg(kmeans_utts=6)
    run = tmp_path / "run"
    save_resolved(cfg, "pretrain", run / "config.yaml")
    fit_units(cfg, list(read_corpus(synth_corpus)), FeatureSource(cfg, torch.device("cpu")),
              NullProgress()).save(run / "kmeans.safetensors")
    bench = load_benchmark("unit_targets_bench")
    # the thread count it sets is the process's: this one's, so later tests run as before
    monkeypatch.setattr(sys, "argv", ["unit_targets_bench.py", "--run", str(run), "--corpus", str(synth_corpus),
                                      "--every", "3", "--threads", str(torch.get_num_threads()), "--workers", "2"])
    bench.main()
    doc = json.loads(capsys.readouterr().out)
    assert doc["utterances"] == len(range(0, len(read_corpus(synth_corpus)), 3)) and doc["audio_s"] > 0
    assert doc["assign_and_write_s"] > 0 and 0 < doc["read_over_assign"] < 1 and doc["file_bytes"] > 0
    assert doc["workers"] == 2 and doc["assign_with_workers_s"] > 0 and doc["same_units"] is True
