"""``ofactl quickstart``: the whole pipeline on the built-in default, with no data and no weights.

synth (espeak-ng corpus) -> distill (OFA tiny student from an UNTRAINED random:tiny teacher) ->
extract (several rates, one pass) -> sweep (keyword spotting, speaker ID) -> adapt (one task)
-> summary. Every stage reuses its finished output, so a rerun is quick.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ofactl.config import load_config, save_resolved, to_dict
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

    def validate(self) -> None:
        from ofactl.runtime import check_device_name

        check_device_name(self.device)


@dataclass
class QuickstartResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    adapt: dict[str, Any]
    paths: dict[str, str]
    stage_seconds: dict[str, float]
    note: str
    reused: list[str] = field(default_factory=list)  # stages taken from an earlier run with the same settings

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "rows": self.rows, "adapt": self.adapt, "paths": self.paths,
                "stage_seconds": self.stage_seconds, "reused": self.reused, "note": self.note}


# Settings that change where or how fast a stage runs, not what it produces.
_NOT_RESULTS = ("device", "num_workers")


def settings_sha(cfg: Any, **inputs: str) -> str:
    """A short hash of a stage's resolved settings and the identity of its inputs (corpus
    fingerprint, student checkpoint hash): a finished stage is reused only when it matches."""
    doc = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_RESULTS}
    blob = json.dumps({"settings": doc, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageStamps:
    """``stages.json`` in the quickstart folder: the settings hash each finished (or started)
    stage was made with."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            self.data = {}  # unreadable stamps: nothing is reused, every stage runs again

    def matches(self, stage: str, sha: str) -> bool:
        return self.data.get(stage) == sha

    def known(self, stage: str) -> bool:
        return stage in self.data

    def set(self, stage: str, sha: str) -> None:
        self.data[stage] = sha
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def run_quickstart(cfg: QuickstartConfig, out_dir: Path, progress: Progress | None = None) -> QuickstartResult:
    from ofactl.adapt import AdaptConfig, run_adapt
    from ofactl.distill import DistillConfig, run_distill
    from ofactl.extract import ExtractConfig, run_extract
    from ofactl.sweep import SweepConfig, run_sweep
    from ofactl.synth import SynthConfig, run_synth

    from ofactl.runtime import resolve_device

    progress = progress or NullProgress()
    resolve_device(cfg.device)  # a device this machine lacks fails now, not after the corpus is made
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, "quickstart", out / "quickstart.yaml")
    secs: dict[str, float] = {}
    stamps = StageStamps(out / "stages.json")
    reused: list[str] = []

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
    from ofactl.audio import read_corpus

    sha = settings_sha(dcfg, corpus=read_corpus(corpus).fingerprint())
    if stamps.matches("distill", sha) and student.is_file() and (run_dir / "summary.json").is_file():
        progress.log(f"reusing {student} (made with the same distill settings and corpus)")
        reused.append("distill")
    else:
        same = stamps.matches("distill", sha)
        resume = same and run_dir.exists() and any((run_dir / "checkpoints").glob("step-*.pt"))
        if run_dir.exists() and not same:
            progress.log(f"{run_dir}: made with other distill settings; distilling again")
        stamps.set("distill", sha)
        run_distill(dcfg, corpus, run_dir, resume=resume, overwrite=not resume, progress=progress)
    secs["distill"] = time.perf_counter() - t

    t = stage(f"3/5 extract: rates {', '.join(f'{r:g}' for r in cfg.rates)} in one pass")
    store = out / "feats.zarr"
    ecfg = ExtractConfig(rates=tuple(cfg.rates), device=cfg.device, num_workers=1)
    # groups of the current student are completed or reused; groups of an earlier student replaced
    ext = run_extract(ecfg, student, corpus, store, overwrite=True, progress=progress)
    if all(g.written == 0 and g.reused for g in ext.groups):
        reused.append("extract")
    secs["extract"] = time.perf_counter() - t

    t = stage(f"4/5 sweep: {', '.join(cfg.tasks)} over the rates")
    rows: list[dict[str, Any]] = []
    sweeps = {}
    for task in cfg.tasks:
        sw = SweepConfig(task=task, rates=tuple(cfg.rates), device=cfg.device)
        sw.probe = replace(sw.probe, epochs=cfg.probe_epochs, cls_epochs=cfg.probe_epochs)
        sw.extract = replace(sw.extract, num_workers=1)
        res = run_sweep(sw, [("ofa-tiny", student)], corpus, out / f"sweep-{task}", store, progress=progress)
        sweeps[task] = res
        rows += [r.to_json() for r in res.rows]
    secs["sweep"] = time.perf_counter() - t

    t = stage(f"5/5 adapt: {cfg.adapt_task} learns its own rate")
    acfg = AdaptConfig(task=cfg.adapt_task, epochs=cfg.adapt_epochs, device=cfg.device)
    ad_dir = out / f"adapt-{cfg.adapt_task}"
    summary = ad_dir / "summary.json"
    from ofactl.checkpoint import file_sha256

    sha = settings_sha(acfg, student=file_sha256(student))
    if stamps.matches("adapt", sha) and summary.is_file():
        adapt = json.loads(summary.read_text())
        progress.log(f"reusing {summary} (made with the same adapt settings and student)")
        reused.append("adapt")
    else:
        if summary.is_file():
            progress.log(f"{ad_dir}: made with other adapt settings or another student; adapting again")
        stamps.set("adapt", sha)
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
    reused += [f"sweep-{task}" for task, res in sweeps.items() if res.reused == len(res.rows) and res.rows]
    result = QuickstartResult(out, rows, adapt, paths, {k: round(v, 1) for k, v in secs.items()}, UNTRAINED_NOTE,
                              reused)
    (out / "summary.json").write_text(json.dumps(result.to_json(), indent=2))
    return result
