"""``ofactl quickstart``: the whole pipeline on the built-in default, with no data and no weights.

synth (espeak-ng corpus) -> distill (OFA tiny student from an UNTRAINED random:tiny teacher) ->
extract (several rates, one pass) -> sweep (keyword spotting, speaker ID) -> adapt (one task)
-> summary. Every stage reuses its finished output, so a rerun is quick.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ofactl.config import load_config, save_resolved
from ofactl.progress import NullProgress, Progress

UNTRAINED_NOTE = ("the teacher is random:tiny, an UNTRAINED HuBERT-shaped model; the student also learns "
                  "log-mel frames, so its features carry acoustic structure, not HuBERT's. For real "
                  "features distill from a HuBERT checkpoint, e.g. "
                  "'ofactl distill -c distilhubert-ofa --teacher /path/hubert_base_ls960.pt --trust-checkpoint ...'")


@dataclass
class QuickstartConfig:
    synth_preset: str = "synth-tiny"
    distill_preset: str = "distill-tiny"
    rates: tuple[float, ...] = (1.0, 0.5, 0.33, 0.25)
    tasks: tuple[str, ...] = ("ks", "sid")
    adapt_task: str = "pr"
    adapt_epochs: int = 6
    probe_epochs: int = 60  # utterance heads train in seconds; the sid probe still improves past 40
    device: str = "auto"


@dataclass
class QuickstartResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    adapt: dict[str, Any]
    paths: dict[str, str]
    stage_seconds: dict[str, float]
    note: str

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "rows": self.rows, "adapt": self.adapt, "paths": self.paths,
                "stage_seconds": self.stage_seconds, "note": self.note}


def run_quickstart(cfg: QuickstartConfig, out_dir: Path, progress: Progress | None = None) -> QuickstartResult:
    from ofactl.adapt import AdaptConfig, run_adapt
    from ofactl.distill import DistillConfig, run_distill
    from ofactl.extract import ExtractConfig, run_extract
    from ofactl.sweep import SweepConfig, run_sweep
    from ofactl.synth import SynthConfig, run_synth

    progress = progress or NullProgress()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, "quickstart", out / "quickstart.yaml")
    secs: dict[str, float] = {}

    def stage(name: str) -> float:
        progress.log(f"== {name}")
        return time.perf_counter()

    t = stage("1/5 synth: a labelled speech corpus from espeak-ng")
    scfg = load_config(SynthConfig, "synth", cfg.synth_preset)
    corpus = run_synth(scfg, out / "corpus", progress=progress).manifest
    secs["synth"] = time.perf_counter() - t

    t = stage("2/5 distill: once-for-all tiny student")
    progress.log("note: " + UNTRAINED_NOTE)
    dcfg = load_config(DistillConfig, "distill", cfg.distill_preset, [f"device={cfg.device}"])
    run_dir = out / "distill"
    student = run_dir / "student.pt"
    if not (student.is_file() and (run_dir / "summary.json").is_file()):
        resume = any((run_dir / "checkpoints").glob("step-*.pt")) if run_dir.exists() else False
        run_distill(dcfg, corpus, run_dir, resume=resume, overwrite=not resume, progress=progress)
    else:
        progress.log(f"reusing {student}")
    secs["distill"] = time.perf_counter() - t

    t = stage(f"3/5 extract: rates {', '.join(f'{r:g}' for r in cfg.rates)} in one pass")
    store = out / "feats.zarr"
    ecfg = ExtractConfig(rates=tuple(cfg.rates), device=cfg.device, num_workers=1)
    run_extract(ecfg, student, corpus, store, progress=progress)
    secs["extract"] = time.perf_counter() - t

    t = stage(f"4/5 sweep: {', '.join(cfg.tasks)} over the rates")
    rows: list[dict[str, Any]] = []
    sweeps = {}
    for task in cfg.tasks:
        sw = SweepConfig(task=task, rates=tuple(cfg.rates))
        sw.probe = replace(sw.probe, epochs=cfg.probe_epochs, cls_epochs=cfg.probe_epochs)
        sw.extract = replace(sw.extract, device=cfg.device, num_workers=1)
        res = run_sweep(sw, [("ofa-tiny", student)], corpus, out / f"sweep-{task}", store, progress=progress)
        sweeps[task] = res
        rows += [r.to_json() for r in res.rows]
    secs["sweep"] = time.perf_counter() - t

    t = stage(f"5/5 adapt: {cfg.adapt_task} learns its own rate")
    acfg = AdaptConfig(task=cfg.adapt_task, epochs=cfg.adapt_epochs)
    ad_dir = out / f"adapt-{cfg.adapt_task}"
    summary = ad_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("cost") == acfg.cost:
        adapt = json.loads(summary.read_text())
        progress.log(f"reusing {summary}")
    else:
        adapt = run_adapt(acfg, student, corpus, ad_dir, progress=progress).to_json()
    secs["adapt"] = time.perf_counter() - t

    from ofactl.sweep import plot_tradeoff

    png = plot_tradeoff([r for res in sweeps.values() for r in res.rows], out / "tradeoff.png",
                        "quickstart: tiny OFA student (untrained teacher + log-mel head), synthetic speech")
    paths = {"corpus": str(corpus), "student": str(student), "store": str(store), "tradeoff_plot": str(png),
             "adapt_rate_config": str(ad_dir / "rate.yaml")}
    for task, res in sweeps.items():
        paths[f"{task}_plot"] = str(res.png)
        paths[f"{task}_csv"] = str(res.csv)
    result = QuickstartResult(out, rows, adapt, paths, {k: round(v, 1) for k, v in secs.items()}, UNTRAINED_NOTE)
    (out / "summary.json").write_text(json.dumps(result.to_json(), indent=2))
    return result
