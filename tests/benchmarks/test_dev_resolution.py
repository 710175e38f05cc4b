"""benchmarks/dev_resolution.py: a kept adapt run's dev split against its cost, as recorded or from
its sweep's dev metric."""
from __future__ import annotations

import json

import pytest

from ofactl.probe.tasks import TaskData


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("dev_resolution")


def _task(n_dev: int) -> TaskData:
    ids = [f"u{i}" for i in range(n_dev)]
    return TaskData("sid", "cls", "accuracy", True, {"train": [], "dev": ids, "test": []}, {u: [0] for u in ids}, ["a"])


def test_an_older_run_is_read_with_its_sweeps_dev_metric_at_the_learned_rate(bench):
    comp = {"sweep_rates": [0.25, 0.5, 1.0], "sweep_dev_metric": [0.6, 0.8, 0.8]}
    doc = {"learned_rate": 0.375, "cost": 0.05, "cost_form": "linear", "comparison": comp}
    res = bench.run_resolution(doc, _task(120))
    p = (0.7 * 120 + 2) / 124  # 0.7: halfway from 0.6 to 0.8
    assert res["dev_metric"] == pytest.approx(0.7) and res["dev_metric_from"] == "sweep"
    assert res["standard_error"] == pytest.approx((p * (1 - p) / 124) ** 0.5, abs=1e-5)
    assert not res["resolves_cost"]  # 2 x 4.1 points against 5
    assert bench.run_resolution(doc, _task(2000))["resolves_cost"]
    assert bench.run_resolution({**doc, "comparison": None}, _task(120)) is None  # nothing to read it from


def test_a_run_that_recorded_its_resolution_is_read_as_it_is(bench, tmp_path):
    recorded = {"dev_count": 40, "unit": "utterances", "dev_metric": 0.5, "standard_error": 0.07, "cost": 0.05,
                "resolves_cost": False, "note": "..."}
    doc = {"learned_rate": 0.3, "cost": 0.05, "comparison": None, "dev_resolution": recorded}
    assert bench.run_resolution(json.loads(json.dumps(doc)), _task(120)) == recorded | {"dev_metric_from": "adapt"}
