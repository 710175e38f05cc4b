"""adapt with plain random batches against batches of like lengths (``probe.sort_pool``), on
the same student, task and seeds: the learned rate, where the task's sweep puts it, the test
metric and the wall time of each run, and the time ratio measured within this one run (the
machine may be noisy).

    python benchmarks/adapt_batches.py --ckpt STUDENT.pt --corpus SYNTH --task pr \\
        --compare-sweep SWEEP_DIR [--seeds 0,1,2] [--pools 1,4] [--set probe.ctc_head=conv] [--out DIR]

``--ckpt`` and ``--compare-sweep`` take one path, or a pattern with ``{seed}`` for one per seed. Pool 1
draws the batches adapt drew before the setting reached its joint phase. Utterance tasks (ks,
sid) keep plain batches whatever the pool, so the comparison is for CTC tasks (pr, asr).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import emit, machine

from ofactl.adapt import AdaptConfig, run_adapt
from ofactl.config import load_config


def one_run(args: argparse.Namespace, seed: int, pool: int, out: Path) -> dict[str, Any]:
    """One adapt run with ``probe.sort_pool=pool``: its learned rate, metric and seconds."""
    cfg = load_config(AdaptConfig, "adapt", None, [*args.set_, f"task={args.task}", f"seed={seed}",
                                                   f"probe.sort_pool={pool}"])
    sweep = Path(args.compare_sweep.format(seed=seed)) if args.compare_sweep else None
    res = run_adapt(cfg, Path(args.ckpt.format(seed=seed)), args.corpus, out / f"pool{pool}-s{seed}", sweep).to_json()
    cmp = res.get("comparison") or {}
    # the interpolated sweep never passes its best point, so the distance is how much worse it is
    below = round(abs(cmp["sweep_at_learned_rate"] - cmp["best_sweep_metric"]), 5) if cmp else None
    return {"seed": seed, "sort_pool": pool, "learned_rate": res["learned_rate"], "test": res["test"],
            "metric": res["metric"], "sweep_worse_than_best": below, "wall_seconds": round(res["wall_seconds"], 2)}


def summarise(runs: list[dict[str, Any]], pools: list[int]) -> dict[str, Any]:
    """Mean wall seconds per pool, and each pool's mean time over the first pool's."""
    mean_s = {p: statistics.mean(r["wall_seconds"] for r in runs if r["sort_pool"] == p) for p in pools}
    base = mean_s[pools[0]]
    return {"mean_wall_seconds": {str(p): round(s, 2) for p, s in mean_s.items()},
            "time_ratio": {str(p): round(s / base, 3) for p, s in mean_s.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a once-for-all (cif) student; {seed} for one per seed")
    ap.add_argument("--corpus", required=True, help="a labelled corpus (a synth folder or manifest)")
    ap.add_argument("--task", default="pr")
    ap.add_argument("--compare-sweep", default=None, help="a sweep folder of the task; {seed} for one per seed")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pools", default="1,4", help="probe.sort_pool values; the first is the ratios' base")
    ap.add_argument("--set", dest="set_", action="append", default=[], help="an adapt setting (as adapt's --set)")
    ap.add_argument("--out", default=None, help="keep the adapt runs here (default: a temporary folder)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    pools = [int(p) for p in args.pools.split(",")]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp())
    runs = [one_run(args, s, p, out) for s in seeds for p in pools]  # pools side by side per seed
    emit({"benchmark": "adapt_batches", "ckpt": args.ckpt, "task": args.task, "settings": args.set_,
          "runs": runs, **summarise(runs, pools), "machine": machine()})


if __name__ == "__main__":
    main()
