"""benchmarks/probe_bench.py: the three ways of training a CTC head it times."""
from __future__ import annotations

import json
import sys


def test_probe_bench_reports_each_head_and_less_padding_with_buckets(load_benchmark, monkeypatch, capsys):
    bench = load_benchmark("probe_bench")
    monkeypatch.setattr(sys, "argv", ["probe_bench.py", "--utts", "40", "--epochs", "1"])
    bench.main()
    doc = json.loads(capsys.readouterr().out)
    for key in ("packed_lstm_random_batches", "bilstm_random_batches", "bilstm_bucketed"):
        assert doc[key]["seconds"] > 0 and doc[key]["frames_per_s"] > 0
    assert doc["bilstm_bucketed"]["padding"] < doc["bilstm_random_batches"]["padding"]
    assert doc["packed_lstm_random_batches"]["padding"] == doc["bilstm_random_batches"]["padding"]  # same batches
    assert doc["utterance_head"]["frames_s"] > 0 and doc["utterance_head"]["moments_s"] > 0
