"""Per adapt run: learned rate, the sweep at it minus the sweep's best (points), within the cost (5)."""
import json, sys
from pathlib import Path
for folder in sys.argv[1:]:
    for f in sorted(Path(folder, "adapt").glob("*/summary.json")):
        d = json.loads(f.read_text()); c = d.get("comparison") or {}
        hb = d.get("higher_better", c.get("best_sweep_metric", 0) >= c.get("sweep_at_learned_rate", 0))
        gap = abs(c["best_sweep_metric"] - c["sweep_at_learned_rate"]) * 100
        print(f"{f.parent.name:48s} rate {d['learned_rate']:.3f}  gap {gap:5.1f}  {'ok' if gap <= 5 else 'MISS'}  {round(d.get('wall_seconds', 0))} s")
