"""benchmarks/adapt_batches.py: adapt runs side by side with plain and like-length batches."""
from __future__ import annotations

import json
import sys


def test_each_pool_runs_each_seed_and_the_ratio_is_against_the_first_pool(load_benchmark, monkeypatch, capsys,
                                                                           student_ckpt, synth_corpus, tmp_path):
    bench = load_benchmark("adapt_batches")
    monkeypatch.setattr(sys, "argv", ["adapt_batches.py", "--ckpt", str(student_ckpt[0]), "--corpus", str(synth_corpus),
                                      "--task", "pr", "--seeds", "0", "--pools", "1,4", "--out", str(tmp_path),
                                      "--set", "epochs=1", "--set", "final_probe=joint"])
    bench.main()
    doc = json.loads(capsys.readouterr().out)
    assert [(r["seed"], r["sort_pool"]) for r in doc["runs"]] == [(0, 1), (0, 4)]
    assert all(0 < r["learned_rate"] <= 1 and r["wall_seconds"] > 0 and r["metric"] == "per" for r in doc["runs"])
    assert all(r["sweep_worse_than_best"] is None for r in doc["runs"])  # no --compare-sweep
    assert doc["time_ratio"]["1"] == 1.0 and (tmp_path / "pool4-s0" / "summary.json").is_file()


def test_summary_means_each_pool_over_its_seeds(load_benchmark):
    bench = load_benchmark("adapt_batches")
    runs = [{"sort_pool": p, "wall_seconds": s} for p, s in ((1, 30.0), (4, 24.0), (1, 40.0), (4, 25.0))]
    assert bench.summarise(runs, [1, 4]) == {"mean_wall_seconds": {"1": 35.0, "4": 24.5},
                                              "time_ratio": {"1": 1.0, "4": 0.7}}
