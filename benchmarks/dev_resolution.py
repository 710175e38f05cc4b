"""How finely each ablation task's dev split resolves adapt's cost, read off the kept adapt runs of
an ablation folder: per task and seed, two Agresti-Coull standard errors of the dev metric at the
learned rate (``ofactl.adapt.dev_resolution``) against the run's cost. A run that recorded its
``dev_resolution`` is read as it is; an older one is read with the sweep's dev metric
interpolated at its learned rate in place of adapt's probe (``"dev_metric_from": "sweep"``).

    python benchmarks/dev_resolution.py --out runs/ablation-band-inside --corpus data/synth-tiny \\
        --seeds 0,1,2,3,4,5,6,7 --tasks pr,ks,sid,ks-fsdd,sid-large,sid-fsdd --adapt difference \\
        --adapt-set band_edges=inside

Takes ``benchmarks/ablation.py``'s flags and folders; trains nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation
from _util import emit

from ofactl.adapt import RateCost, dev_resolution
from ofactl.audio import read_corpus
from ofactl.probe import build_task


def run_resolution(doc: dict[str, Any], data: Any) -> dict[str, Any] | None:
    """One adapt run's ``dev_resolution``: as recorded, or from its sweep's dev metric (None without either)."""
    if doc.get("dev_resolution"):
        return doc["dev_resolution"] | {"dev_metric_from": "adapt"}
    comp = doc.get("comparison")
    if not comp or not comp.get("sweep_dev_metric"):
        return None
    dev = float(np.interp(doc["learned_rate"], comp["sweep_rates"], comp["sweep_dev_metric"]))
    res = dev_resolution(data, dev, RateCost(doc["cost"], doc.get("cost_form", "log2")))
    return None if res is None else res | {"dev_metric_from": "sweep"}


def task_resolution(task: str, seeds: list[int], grads: list[str], args: argparse.Namespace,
                    corpus: Path) -> dict[str, Any]:
    """Every kept run of one ablation task: two standard errors in points and whether they resolve the cost."""
    ofactl_task, corpus_of_task = ablation.task_corpus(task, args, corpus)
    utts = read_corpus(corpus_of_task)
    runs: dict[str, Any] = {}
    for s in seeds:
        data = build_task(ofactl_task, utts, None, s)  # adapt splits by its seed
        for grad in grads:
            path = ablation.adapt_dir(task, grad, s, args) / "summary.json"
            res = run_resolution(json.loads(path.read_text()), data) if path.is_file() else None
            if res is not None:
                runs[f"{grad}-s{s}"] = {"dev_count": res["dev_count"], "unit": res["unit"],
                                        "dev_metric": res["dev_metric"], "dev_metric_from": res["dev_metric_from"],
                                        "two_se_points": round(200 * res["standard_error"], 1),
                                        "cost_points": round(100 * res["cost"], 3), "resolves_cost": res["resolves_cost"]}
    two = [r["two_se_points"] for r in runs.values()]
    return {"runs": runs, "two_se_points": [min(two), max(two)] if two else None,
            "resolves_cost": sum(r["resolves_cost"] for r in runs.values())}


def main() -> None:
    args = ablation.parser().parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    grads = [g for g in args.adapt.split(",") if g]
    corpus = ablation._corpus(args)
    tasks = {t: task_resolution(t, seeds, grads, args, corpus) for t in args.tasks.split(",")}
    emit({"benchmark": "dev_resolution", "out": args.out, "adapt_set": args.adapt_set, "seeds": seeds, "tasks": tasks})


if __name__ == "__main__":
    main()
