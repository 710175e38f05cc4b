"""What the probe beside lambda says about the rate during one adapt run: the joint probe's dev
expected error (what lambda follows) and dev error at lambdas across lambda's range, read at the
start of each phase, every ``--every`` joint steps and at the end, and the mean central-difference
slope per eighth of the joint phase (``lambda_grad: difference``; the cost's own slope is not in it).
The run itself is an ordinary ``run_adapt``: its summary.json and learned rate are the same as
without this script.

    python benchmarks/adapt_probe_curve.py --ckpt STUDENT.pt --corpus SYNTH --task sid \\
        [--set seed=6 --set band_edges=inside ...] [--every 150] [--fractions 0,0.5,1] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import emit, machine

import ofactl.adapt as adapt_mod
from ofactl.adapt import AdaptConfig, run_adapt
from ofactl.config import load_config

LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)  # fractions of lambda's top (1.0: min_rate)


def dev_curve(job: Any, fractions: tuple[float, ...] = LAMBDAS) -> list[dict[str, float]]:
    """The joint probe (eval mode) on the whole dev split at ``fractions`` of lambda's top: the
    rate it gives, the expected error and the error (1 - accuracy, or the error rate), in one pass
    of the student per batch. Both errors are means over batches weighted by their utterances: for
    accuracy that is the split's figure, for a CTC task's error rate not quite the corpus-level one
    a sweep reports (``adapt._evaluate`` scores that, at a second pass of the student)."""
    task, dev = job.task, job.task.splits["dev"]
    (fold,) = job.folds  # lambda_data dev or train: the one probe beside lambda (main refuses crossfit)
    probe = fold.probe
    was = probe.training
    probe.eval()
    rows = []
    with torch.no_grad():
        for f in fractions:
            lam = f * job.lam.top
            soft = hard = frames = total = 0.0
            for k in range(0, len(dev), job.cfg.batch_size):
                ids = dev[k : k + job.cfg.batch_size]
                x, n = adapt_mod._batch(ids, job.cache, job.device)
                hidden, _ = job.student.encode(x, n, rate=None, lam=torch.tensor(lam).expand(len(ids)), exact=False)
                soft += float(adapt_mod.task_loss(probe, task, ids, hidden.states, hidden.lengths,
                                                  charge_infeasible=True, soft_error=True)) * len(ids)
                hard += float(adapt_mod._metric_error(probe, task, ids, hidden)) * len(ids)
                frames, total = frames + float(hidden.lengths.sum()), total + float(n.sum())
            rows.append({"lambda": round(lam, 4), "rate": round(frames / total, 4),
                         "expected_error": round(soft / len(dev), 4), "error": round(hard / len(dev), 4)})
    probe.train(was)
    return rows


@contextmanager
def watching(every: int, fractions: tuple[float, ...] = LAMBDAS) -> Iterator[dict[str, list[Any]]]:
    """Record, while adapt runs inside the block, the probe's dev curves and lambda's slopes."""
    seen: dict[str, list[Any]] = {"curves": [], "slopes": []}
    real_step, real_objective, real_outcome = adapt_mod._AdaptJob.step, adapt_mod._lambda_objective, adapt_mod._outcome
    state: dict[str, Any] = {"phase": None, "joint_steps": 0}

    def step(job: Any, batches: list[list[str]], phase: str) -> dict[str, Any]:
        if phase != state["phase"] or (phase == "joint" and state["joint_steps"] and state["joint_steps"] % every == 0):
            seen["curves"].append({"at": f"start of {phase}" if phase != state["phase"] else
                                   f"joint step {state['joint_steps']}",
                                   "lambda": round(float(job.lam().detach()), 4), "rows": dev_curve(job, fractions)})
            state["phase"] = phase
        state["joint_steps"] += phase == "joint"
        return real_step(job, batches, phase)

    def objective(cfg: AdaptConfig, student: Any, probe: Any, task: Any, ids: list[str], *rest: Any) -> Any:
        out = real_objective(cfg, student, probe, task, ids, *rest)
        lm = rest[2]  # x, n, lm, top
        (slope,) = torch.autograd.grad(out[0], lm, retain_graph=True)
        seen["slopes"].append((float(lm.detach()), float(slope)))
        return out

    def outcome(job: Any) -> Any:
        seen["curves"].append({"at": "end", "lambda": round(float(job.lam().detach()), 4),
                               "rows": dev_curve(job, fractions)})
        return real_outcome(job)

    with mock.patch.object(adapt_mod._AdaptJob, "step", step), \
            mock.patch.object(adapt_mod, "_lambda_objective", objective), mock.patch.object(adapt_mod, "_outcome", outcome):
        yield seen


def slope_eighths(slopes: list[tuple[float, float]]) -> list[dict[str, float]]:
    """Mean lambda, mean slope and the share of positive slopes in each eighth of the steps."""
    k = max(len(slopes) // 8, 1)
    parts = [slopes[i * k : (i + 1) * k] for i in range(min(8, len(slopes)))]
    return [{"lambda": round(statistics.mean(p[0] for p in part), 4),
             "slope": round(statistics.mean(p[1] for p in part), 4),
             "positive_share": round(sum(p[1] > 0 for p in part) / len(part), 3)} for part in parts if part]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--task", default="sid")
    ap.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE", help="adapt settings")
    ap.add_argument("--every", type=int, default=150, help="read the curve every this many joint steps")
    ap.add_argument("--fractions", default=",".join(f"{f:g}" for f in LAMBDAS),
                    help="where to read the curve: fractions of lambda's top (1: min_rate), comma-separated")
    ap.add_argument("--out", type=Path, default=None, help="adapt's run folder (default: a temporary one)")
    args = ap.parse_args()
    cfg = load_config(AdaptConfig, "adapt", None, [*args.set_, f"task={args.task}"])
    if cfg.lambda_data == "crossfit":  # one probe per fold, none of them the probe beside lambda on dev
        sys.exit("adapt_probe_curve: --set lambda_data=crossfit has no single joint probe to read on dev; "
                 "use dev (the default) or train")
    fractions = tuple(float(f) for f in args.fractions.split(","))
    with tempfile.TemporaryDirectory() as tmp, watching(args.every, fractions) as seen:
        res = run_adapt(cfg, args.ckpt, args.corpus, args.out or Path(tmp) / "adapt")
    emit({"benchmark": "adapt_probe_curve", "task": args.task, "settings": args.set_,
          "learned_rate": res.learned_rate, "test": res.test, "curves": seen["curves"],
          "slopes": slope_eighths(seen["slopes"]), "machine": machine()})


if __name__ == "__main__":
    main()
