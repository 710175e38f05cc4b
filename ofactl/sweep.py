"""``ofactl sweep``: one task probed over a grid of rates -> the performance/efficiency trade-off.

For each checkpoint and rate: extract the group if the store lacks it (cached groups are
reused), train and evaluate the probe, and measure compute. Rows are cached in
``OUT/rows/`` (and, where that folder is gone, read from ``OUT/sweep.json``) so a rerun reuses
finished rows; outputs are ``sweep.csv``, ``sweep.json`` and
``tradeoff.png``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ofactl import __version__
from ofactl.atomic import make_dir, save_figure, write_text
from ofactl.audio import Corpus, load_audio, read_corpus
from ofactl.checkpoint import rates_phrase
from ofactl.choices import Task
from ofactl.config import doc_sha, save_resolved, to_dict
from ofactl.errors import ConfigError
from ofactl.extract import (
    CallerFlags,
    ExtractConfig,
    check_group_rates,
    extract_with_student,
    feature_settings,
    parse_layers,
    resolve_level,
    settings_differ,
    skip_hint,
)
from ofactl.pidlock import run_folder_lock
from ofactl.probe import ProbeConfig, ProbeResult, build_task, train_probes
from ofactl.progress import NullProgress, Progress
from ofactl.runtime import (
    SAMPLE_RATE,
    autocast,
    autocast_dtype,
    check_device_name,
    module_device,
    resolve_device,
    synchronize,
)
from ofactl.workers import run_in_processes

# how sweep names the extraction settings its errors point to
SWEEP_FLAGS = CallerFlags(skip="--set extract.on_error=skip", out="--out", level="--level-db")


@dataclass
class SweepConfig:
    """Settings of ``ofactl sweep``: task, rates, layers, and the extract and probe sections."""

    task: Task = "ks"  # the downstream task probed
    rates: tuple[float, ...] = (1.0, 0.75, 0.5, 0.33, 0.25)  # rates probed, each in (0, 1]
    label_column: str = ""  # label column of task cls
    layers: str = "all"  # hidden states given to the probe: all, or comma-separated indices
    seed: int = 0  # seeds splits and probes
    probe_runs: int = 1  # probes trained per rate, seeded probe.seed, probe.seed + 1, ...: a row's test and dev
    # are their mean, test_runs and test_sd each one's and their spread (the first is the one-probe row)
    timing_utts: int = 16  # utterances timed per rate (student forward seconds per audio second)
    jobs: int = 1  # probes trained at once in CPU processes, every checkpoint's rates in one pool with the cores
    # shared out (threads = cores / jobs): small heads use many threads poorly. 1: in turn, in this process
    device: str = "auto"  # extraction, timing and probes (unless probe.device / extract.device say otherwise)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    extract: ExtractConfig = field(default_factory=lambda: ExtractConfig(dtype="float16"))

    def validate(self) -> None:
        """Raise ValueError for empty or out-of-range rates, or a bad device."""
        check_group_rates(self.rates)
        if self.probe_runs < 1:
            raise ValueError(f"probe_runs must be >= 1 (probes trained per rate), got {self.probe_runs}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1 (probes trained at once), got {self.jobs}")
        check_device_name(self.device)
        self.probe.validate()

    def on_device(self) -> SweepConfig:
        """The extract and probe settings with ``auto`` devices following ``device``."""
        ext = self.extract if self.extract.device != "auto" else replace(self.extract, device=self.device)
        dev = str(resolve_device(ext.device))
        probe = self.probe if self.probe.device != "auto" else replace(self.probe, device=dev)
        return replace(self, extract=ext, probe=probe)


@dataclass
class SweepRow:
    """One (checkpoint, rate) measurement: metric, achieved rate and frame period, compute, time and
    store size; kept in ``rows/`` and reused by reruns.
    """

    label: str
    checkpoint_sha256: str
    store_group: str
    task: str
    requested_rate: float
    achieved_rate: float
    frame_period_ms: float
    metric: str
    test: float
    dev: float
    extra_metrics: dict[str, float]
    upstream_gmacs_per_s: float
    upstream_cnn_gmacs_per_s: float
    extract_s_per_audio_s: float
    probe_train_s: float
    probe_params: int
    probe_mmacs_per_s: float
    store_mb: float
    infeasible_test: int | None
    layer_weights: list[float]
    seed: int
    ofactl_version: str = __version__
    probe_config_sha: str = ""  # the probe settings the row was trained with (reuse needs a match)
    task_sha: str = ""  # the task's splits and labels the probe saw (reuse needs a match: another corpus is another row)
    trained_rates: str = ""  # what the checkpoint was trained for, e.g. "trained at rate 0.5 only"
    fixed_rate: bool = False  # the checkpoint was trained at one rate (scored there only)
    outside_training_range: bool = False  # a once-for-all student asked for a rate it never trained at
    test_runs: list[float] = field(default_factory=list)  # each probe's test metric (sweep.probe_runs > 1)
    test_sd: float | None = None  # their sample standard deviation (None with one probe)

    def to_json(self) -> dict[str, Any]:
        """The row as JSON-safe data."""
        return asdict(self)


@dataclass
class SweepResult:
    """A whole sweep: its rows, how many were reused, and the files written."""

    out_dir: Path
    rows: list[SweepRow]
    reused: int
    csv: Path
    json: Path
    png: Path | None
    wall_seconds: float
    not_scored: list[dict[str, Any]] = field(default_factory=list)  # fixed-rate students at other rates

    def to_json(self) -> dict[str, Any]:
        """What ``sweep --json`` prints: an object, like every other command."""
        return {"out_dir": str(self.out_dir), "rows": [r.to_json() for r in self.rows], "reused": self.reused,
                "not_scored": self.not_scored, "csv": str(self.csv), "json": str(self.json),
                "png": None if self.png is None else str(self.png), "wall_seconds": round(self.wall_seconds, 3)}


@dataclass
class SweepSpec:
    """One sweep of :func:`run_sweeps`: a task's settings, its (label, checkpoint) pairs, the corpus,
    the output folder and ``store`` (the feature store of a single checkpoint)."""

    cfg: SweepConfig
    ckpts: list[tuple[str, Path]]
    corpus: str | Path | Corpus
    out_dir: Path
    store: Path | None = None
    overwrite: bool = False


def run_sweep(cfg: SweepConfig, ckpts: list[tuple[str, Path]], corpus: str | Path | Corpus, out_dir: Path,
              store: Path | None = None, *, overwrite: bool = False,
              progress: Progress | None = None) -> SweepResult:
    """Probe ``cfg.task`` at every rate for each (label, checkpoint) pair: extract what is not
    cached (one store per checkpoint, ``store`` for a single one), train the probe, time the
    student, and write sweep.csv, sweep.json and tradeoff.png. Finished rows are reused."""
    spec = SweepSpec(cfg, ckpts, corpus, Path(out_dir), store, overwrite)
    return run_sweeps([spec], cfg.jobs, progress)[0]


def run_sweeps(specs: Sequence[SweepSpec], jobs: int = 1, progress: Progress | None = None) -> list[SweepResult]:
    """Several sweeps (tasks, checkpoints) whose probes share one pool of ``jobs`` CPU processes
    (1: in turn, here): every group of every sweep is extracted and timed first, while the cores
    are free, then the probes train, the slowest first (CTC heads, higher rates), and each sweep's
    files are written as its last row comes in. Each result's ``wall_seconds`` counts from the start."""
    progress = progress or NullProgress()
    dirs = [Path(spec.out_dir).resolve() for spec in specs]
    if len(set(dirs)) != len(dirs):
        twice = sorted({str(d) for d in dirs if dirs.count(d) > 1})
        raise ConfigError(f"sweeps run together need a folder each; {', '.join(twice)} is given to more than one")
    with ExitStack() as locks:
        for spec in specs:
            locks.enter_context(run_folder_lock(Path(spec.out_dir), "sweep", progress))
        return _run_sweeps(specs, jobs, progress)


def _run_sweeps(specs: Sequence[SweepSpec], jobs: int, progress: Progress) -> list[SweepResult]:
    """:func:`run_sweeps` under the run folders' locks."""
    t0 = time.perf_counter()
    checked = [_check_spec(spec, jobs) for spec in specs]  # every refusal before any work
    sweeps = [_setup_sweep(cfg, spec, progress, plans) for spec, (cfg, plans) in zip(specs, checked)]
    for sw in sweeps:
        sw.prepare()
    work = sorted(((k, prep, job) for k, sw in enumerate(sweeps) for prep, job in sw.pending),
                  key=lambda w: w[2].weight(), reverse=True)
    results = {k: sw.write(time.perf_counter() - t0) for k, sw in enumerate(sweeps) if not sw.pending}
    left = [len(sw.pending) for sw in sweeps]
    for n, res in run_in_processes(_train_rate, [job for _, _, job in work], jobs):
        k, prep, _ = work[n]
        sweeps[k].finish_job(prep, res)  # saved as each finishes
        left[k] -= 1
        if left[k] == 0:
            results[k] = sweeps[k].write(time.perf_counter() - t0)
    return [results[k] for k in range(len(sweeps))]


def _check_spec(spec: SweepSpec, jobs: int) -> tuple[SweepConfig, list[RatePlan]]:
    """The sweep's settings on their devices and each checkpoint's rate plan, or one clear error."""
    labels = [lab for lab, _ in spec.ckpts]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"checkpoint labels must differ, got {labels}")
    cfg = spec.cfg.on_device()
    resolve_device(cfg.extract.device)  # a bad --device is refused first
    if jobs > 1 and resolve_device(cfg.probe.device).type != "cpu":
        raise ConfigError(f"sweep.jobs={jobs} trains probes in CPU processes, but the probes run on "
                          f"{cfg.probe.device}: use jobs 1 there (a GPU trains one probe at a time quickly)")
    return cfg, [rate_plan(label, Path(ckpt), cfg.rates) for label, ckpt in spec.ckpts]


@dataclass
class RatePlan:
    """Which requested rates one checkpoint is scored at: all of them for a once-for-all student
    (those outside its training range flagged), only its own for a fixed-rate one."""

    label: str
    ckpt: Path
    scored: list[float]
    not_scored: list[float]
    outside: list[float]
    trained_text: str
    fixed: bool
    payload: dict[str, Any] | None = field(default=None, repr=False)  # the file, read once for the sweep


def rate_plan(label: str, ckpt: Path, rates: Sequence[float]) -> RatePlan:
    """The :class:`RatePlan` of ``ckpt`` from the rates its file records; a fixed-rate student
    none of whose rates is requested is refused, naming the rate it was trained for."""
    from ofactl.checkpoint import covers, describe_rates, rates_trained, read_checkpoint

    payload = read_checkpoint(ckpt)
    trained = rates_trained(payload)
    text = describe_rates(trained)
    if trained is not None and trained["kind"] == "fixed":
        scored = [r for r in rates if covers(trained, r)]
        if not scored:
            own = ", ".join(f"{r:g}" for r in trained["rates"])
            raise ConfigError(f"--ckpt {label}: a fixed-rate student {text}; --rates asks for "
                              f"{', '.join(f'{r:g}' for r in rates)}: add {own} to score it")
        return RatePlan(label, ckpt, scored, [r for r in rates if r not in scored], [], text, True, payload)
    return RatePlan(label, ckpt, list(rates), [], [r for r in rates if not covers(trained, r)], text, False, payload)


def _setup_sweep(cfg: SweepConfig, spec: SweepSpec, progress: Progress, plans: list[RatePlan]) -> _Sweep:
    """Read the corpus and build the task's splits, then write config.yaml: a refused corpus or
    task leaves no record of a sweep that never ran (a bad --out still fails first)."""
    out_dir = Path(spec.out_dir)
    make_dir(out_dir)
    corpus = spec.corpus
    cps = corpus if isinstance(corpus, Corpus) else read_corpus(corpus, on_error=cfg.extract.on_error,
                                                                skip_hint=skip_hint(SWEEP_FLAGS.skip))
    task = build_task(cfg.task, cps, cfg.label_column or None, cfg.seed)
    if task.note():
        progress.log(str(task.note()))
    make_dir(out_dir / "rows")
    save_resolved(cfg, "sweep", out_dir / "config.yaml")
    device = resolve_device(cfg.extract.device)
    users_store = Path(spec.store) if spec.store is not None and len(spec.ckpts) == 1 else None  # --store, one checkpoint
    sw = _Sweep(cfg, cps, task, out_dir, spec.overwrite, progress, device, plans, users_store)
    if users_store is not None:
        sw.flags = replace(SWEEP_FLAGS, out="--store")
    return sw


@dataclass
class _Sweep:
    """One sweep's settings and inputs: extracts and times its checkpoints' rates (``prepare``),
    holds the probe jobs they leave (``pending``), and makes the rows as the jobs finish."""

    cfg: SweepConfig
    corpus: Corpus
    task: Any
    out_dir: Path
    overwrite: bool
    progress: Progress
    device: torch.device
    plans: list[RatePlan]
    users_store: Path | None = None  # --store: the store of the sweep's one checkpoint
    reused: int = 0
    warned: set[str] = field(default_factory=set)  # labels whose quiet recordings were reported
    flags: CallerFlags = SWEEP_FLAGS  # --store, not --out, names the store the user gave
    pending: list[tuple[_RatePrep, _ProbeJob]] = field(default_factory=list)  # each prepared rate, its probe to train
    done: dict[tuple[str, float], SweepRow] = field(default_factory=dict)  # (label, rate) -> finished row

    def __post_init__(self) -> None:
        self.task_ids = set(self.task.ids)
        self.sub = self.corpus.subset(self.task_ids)
        self.probe_sha = _probe_sha(self.cfg, self.task.kind)
        self.task_sha = _task_sha(self.task)

    def prepare(self) -> None:
        """Every checkpoint's rates: finished rows reused, the others extracted (if the store lacks
        them) and timed, their probes left in ``pending``."""
        for plan in self.plans:
            if plan.not_scored:
                self.progress.log(f"{plan.label}: {plan.trained_text}; rates "
                                  f"{', '.join(f'{r:g}' for r in plan.not_scored)} are not scored for it")
            if plan.outside:
                self.progress.log(f"{plan.label}: {plan.trained_text}; {rates_phrase(plan.outside)} outside that "
                                  "range (scored, and marked as such)")
            st_path = self.users_store or self.out_dir / f"feats-{plan.label}.zarr"
            self.prepare_checkpoint(plan, st_path)

    def prepare_checkpoint(self, plan: RatePlan, st_path: Path) -> None:
        """One checkpoint's rates: reused rows into ``done``, the rest prepared into ``pending``."""
        from ofactl.checkpoint import file_sha256, load_student
        from ofactl.model.blocks import cnn_lengths

        label, ckpt = plan.label, plan.ckpt
        sha = file_sha256(ckpt)
        # on the extraction device from the start: timing runs there too, cached group or not
        student, _ = load_student(ckpt, self.device, payload=plan.payload)
        plan.payload = None  # the student holds the weights now
        n16 = torch.tensor([u.n_samples_16k for u in self.sub])
        in_frames = dict(zip([u.id for u in self.sub], cnn_lengths(student.cfg.arch, n16).tolist()))
        for r in plan.scored:
            if (row := self.cached_row(label, r, sha)) is not None:
                self.done[label, r] = row
        preps = [self.prepare_rate(label, ckpt, student, sha, st_path, r) for r in plan.scored
                 if (label, r) not in self.done]
        probes = "probe" if self.cfg.probe_runs == 1 else f"probe {self.cfg.probe_runs} times"
        for p in preps:
            self.progress.log(f"{label} rate={p.rate:.3f}: training the {self.cfg.task} {probes} on "
                              f"{len(self.task.splits['train'])} utterances")
            self.pending.append((p, _ProbeJob(self.task, str(p.store), p.rate, self.task_ids, self.cfg.probe,
                                              self.cfg.probe_runs, in_frames)))

    def finish_job(self, p: _RatePrep, res: ProbeResult) -> None:
        """The row of the rate ``p`` from its probe's result, saved in ``rows/`` and reported."""
        row = self.finish_row(p, res)
        self.done[row.label, row.requested_rate] = row
        self.progress.log(f"{row.label} rate={row.requested_rate:.3f}: {row.task} test {row.metric} "
                          f"{row.test:.4f} (dev {row.dev:.4f})")

    def write(self, seconds: float) -> SweepResult:
        """sweep.csv, sweep.json and tradeoff.png from every checkpoint's rows."""
        rows = [replace(self.done[p.label, r], trained_rates=p.trained_text, fixed_rate=p.fixed,
                        outside_training_range=r in p.outside)
                for p in self.plans for r in sorted(p.scored, reverse=True)]  # checkpoints as given, rates falling
        not_scored = [{"label": p.label, "rate": r, "reason": p.trained_text} for p in self.plans for r in p.not_scored]
        return _write_sweep(self, rows, seconds, not_scored)

    def row_file(self, label: str, r: float) -> Path:
        """Where a finished row is kept (reused by a rerun with the same checkpoint and probe)."""
        from ofactl.storage.zarr_store import rate_key

        return self.out_dir / "rows" / f"{label}__{rate_key(r)}__{self.cfg.task}.json"

    def cached_row(self, label: str, r: float, sha: str) -> SweepRow | None:
        """The finished row of this checkpoint, seed and probe settings, unless --overwrite: its
        file in ``rows/``, or else its row in the folder's ``sweep.json`` (a sweep folder carried
        with its result files alone)."""
        cache = self.row_file(label, r)
        if self.overwrite:
            return None
        if cache.is_file():
            if (row := read_row(cache)) is None:
                self.progress.log(f"{label} rate={r:.3f}: {cache} is unreadable; measuring the row again")
                return None
        elif (row := self.written_rows.get(cache.name)) is None:
            return None
        if (row.checkpoint_sha256, row.seed, row.probe_config_sha, row.task_sha) != (
                sha, self.cfg.seed, self.probe_sha, self.task_sha):
            return None  # another student, seed, probe or corpus: measured again
        self.reused += 1
        self.progress.log(f"{label} rate={r:.3f}: reusing the finished row")
        return row

    @cached_property
    def written_rows(self) -> dict[str, SweepRow]:
        """The rows of the folder's ``sweep.json`` by the name of their file in ``rows/``; none when
        it is absent or unreadable (it then vouches for nothing)."""
        try:
            rows = load_rows(self.out_dir / "sweep.json")
        except (OSError, ValueError, KeyError, TypeError, ConfigError):
            rows = []
        return {self.row_file(x.label, x.requested_rate).name: x for x in rows}

    def prepare_rate(self, label: str, ckpt: Path, student: Any, sha: str, st_path: Path, r: float) -> _RatePrep:
        """Extract the rate if the store lacks it and time the student there: all of a row but
        the probe's results."""
        from ofactl.model.macs import student_gmacs_per_second
        from ofactl.storage import open_store

        cfg = self.cfg
        features = resolve_level(cfg.extract, student, str(ckpt))  # level_db auto: this student's level
        if not _group_covers(st_path, r, sha, parse_layers(cfg.layers, student.num_hidden), self.task_ids,
                              features):
            # the whole corpus, so one store serves every task
            ecfg = replace(features, rates=(r,), layers=cfg.layers)
            ext = extract_with_student(ecfg, student, sha, self.corpus, st_path, progress=self.progress,
                                       ckpt_path=str(ckpt), overwrite=self.overwrite, flags=self.flags)
            warning = ext.quiet_warning("--level-db ")
            if warning and label not in self.warned:  # once per checkpoint, not per rate
                self.warned.add(label)
                self.progress.log(f"warning: {warning}")
        else:
            self.progress.log(f"{label} rate={r:.3f}: using the cached group in {st_path}")
        g = open_store(st_path).group(r)
        achieved = float(g.attrs.get("achieved_rate") or r)
        return _RatePrep(label=label, sha=sha, store=st_path, rate=r, achieved=achieved,
                         frame_ms=g.attrs["input_frame_ms"] / achieved, hop=student.cfg.arch.hop,
                         gmacs=student_gmacs_per_second(student.cfg, r),
                         extract_s=_time_extract(student, self.sub, r, cfg.timing_utts, cfg.extract.precision),
                         store_mb=open_store(st_path).size_bytes(r) / 1e6)

    def finish_row(self, p: _RatePrep, res: ProbeResult) -> SweepRow:
        """The row of one rate from its preparation and its probe's result; saved in ``rows/``."""
        from ofactl.storage.zarr_store import rate_key

        cfg = self.cfg
        row = SweepRow(
            label=p.label, checkpoint_sha256=p.sha, store_group=f"{p.store}/{rate_key(p.rate)}", task=cfg.task,
            requested_rate=p.rate, achieved_rate=round(p.achieved, 5),
            frame_period_ms=round(p.frame_ms, 3), metric=res.metric,
            test=round(res.test[res.metric], 5), dev=round(res.dev[res.metric], 5),
            extra_metrics={k: round(v, 5) for k, v in res.test.items() if k != res.metric},
            upstream_gmacs_per_s=round(p.gmacs["total"], 4), upstream_cnn_gmacs_per_s=round(p.gmacs["cnn"], 4),
            extract_s_per_audio_s=round(p.extract_s, 5),
            probe_train_s=round(res.train_seconds, 4), probe_params=res.params,
            probe_mmacs_per_s=round(_probe_macs(res.params, p.achieved, p.hop) / 1e6, 3),
            store_mb=round(p.store_mb, 2),
            infeasible_test=res.infeasible.get("test") if res.infeasible else None,
            layer_weights=res.layer_weights, seed=cfg.seed, probe_config_sha=self.probe_sha,
            task_sha=self.task_sha, test_runs=[round(v, 5) for v in res.test_runs],
            test_sd=round(float(np.std(res.test_runs, ddof=1)), 5) if len(res.test_runs) > 1 else None)
        write_text(self.row_file(p.label, p.rate), json.dumps(row.to_json(), indent=2))
        return row


@dataclass
class _RatePrep:
    """One rate of one checkpoint, extracted and timed: everything of its row but the probe."""

    label: str
    sha: str
    store: Path
    rate: float
    achieved: float
    frame_ms: float
    hop: int
    gmacs: dict[str, float]
    extract_s: float
    store_mb: float


@dataclass
class _ProbeJob:
    """One rate's probe training, whole: it runs here or in a worker process (``sweep.jobs``)."""

    task: Any
    store: str
    rate: float
    ids: set[str]
    probe: ProbeConfig
    runs: int
    in_frames: dict[str, int]

    def weight(self) -> tuple[bool, float]:
        """Orders a pool's jobs, the slowest first: CTC heads (a BiLSTM over every frame) before
        utterance heads (seconds), higher rates (more frames) first."""
        return self.task.kind == "ctc", self.rate


def _train_rate(job: _ProbeJob) -> ProbeResult:
    """Train one rate's probe(s) on the task's utterances of its store group."""
    from ofactl.storage import open_store

    feats = {u: x for u, x in open_store(job.store).group(job.rate) if u in job.ids}
    return train_probes(job.task, feats, job.probe, job.runs, job.in_frames)


def _write_sweep(sw: _Sweep, rows: list[SweepRow], seconds: float, not_scored: list[dict[str, Any]]) -> SweepResult:
    """sweep.csv, sweep.json (task, resolved config, rows, what was not scored) and tradeoff.png."""
    csv_path, json_path = sw.out_dir / "sweep.csv", sw.out_dir / "sweep.json"
    _write_csv(csv_path, rows)
    doc = {"task": sw.cfg.task, "config": to_dict(sw.cfg), "rows": [r.to_json() for r in rows],
           "not_scored": not_scored}
    write_text(json_path, json.dumps(doc, indent=2))
    png = plot_tradeoff(rows, sw.out_dir / "tradeoff.png")
    return SweepResult(sw.out_dir, rows, sw.reused, csv_path, json_path, png, seconds, not_scored)


def _probe_sha(cfg: SweepConfig, kind: str) -> str:
    """Hash of everything that shapes a ``kind`` probe's result besides the checkpoint and the seed
    (a CTC head's settings do not key an utterance task's rows, nor the other way round)."""
    probe = to_dict(cfg.probe.settings_for(kind))
    doc: dict[str, Any] = {"probe": probe, "task": cfg.task, "label_column": cfg.label_column, "layers": cfg.layers}
    if cfg.probe_runs != 1:  # keyed only when set, so rows recorded before the setting keep their hash
        doc["probe_runs"] = cfg.probe_runs
    # the features' own settings key the row too; those at their defaults are left out, so rows
    # recorded before they were keyed (all made with the defaults) keep their hash
    default = feature_settings(ExtractConfig())
    changed = {k: v for k, v in feature_settings(cfg.extract).items() if v != default[k]}
    if changed:
        doc["features"] = changed
    return doc_sha(doc)


def _task_sha(task: Any) -> str:
    """Hash of a task's splits, labels and label vocabulary: what the probe trains and is tested on."""
    return doc_sha({"splits": task.splits, "labels": task.labels, "vocab": task.vocab})


def _group_covers(store: Path, rate: float, sha: str, layers: list[int], ids: set[str],
                  ecfg: ExtractConfig) -> bool:
    """True when ``store`` already holds every utterance in ``ids`` at ``rate`` from this student,
    extracted with ``ecfg``'s feature settings."""
    from ofactl.errors import StoreError
    from ofactl.storage import open_store

    if not (Path(store) / "zarr.json").is_file():
        return False
    try:
        g = open_store(store).group(rate)
    except StoreError:
        return False
    a = g.attrs
    if a.get("student_sha256") != sha or a.get("layers") != layers or settings_differ(a, ecfg):
        return False
    done = {u for u, d in zip(g.utt_ids, g.done) if d}
    return ids <= done


def _probe_macs(params: int, rate: float, hop: int) -> float:
    """Rough probe MACs per audio second: one multiply per parameter per output frame."""
    return params * rate * SAMPLE_RATE / hop


@torch.no_grad()
def _time_extract(student: Any, corpus: Corpus, rate: float, n: int, precision: str = "auto") -> float:
    """Measured student forward seconds per audio second on the first ``n`` utterances, on the
    student's own device and with the autocast precision extraction uses there."""
    device = module_device(student)
    amp = autocast_dtype(precision, device)
    utts = list(corpus)[:n]
    wavs = [load_audio(u.path) for u in utts]
    audio_s = sum(len(w) for w in wavs) / SAMPLE_RATE
    wav = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True).to(device)
    lengths = torch.tensor([len(w) for w in wavs], device=device)

    def forward() -> None:
        with autocast(device, amp):
            student.features(wav, lengths, [rate])

    forward()  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    forward()
    synchronize(device)
    return (time.perf_counter() - t0) / max(1e-9, audio_s)


COLUMNS = ("label", "task", "requested_rate", "achieved_rate", "frame_period_ms", "metric", "test", "dev",
           "upstream_gmacs_per_s", "upstream_cnn_gmacs_per_s", "extract_s_per_audio_s", "probe_train_s",
           "probe_params", "probe_mmacs_per_s", "store_mb", "infeasible_test", "store_group", "checkpoint_sha256", "seed",
           "test_sd")


def _write_csv(path: Path, rows: list[SweepRow]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        d = r.to_json()
        w.writerow(["" if d[c] is None else d[c] for c in COLUMNS])
    write_text(path, buf.getvalue())


def plot_tradeoff(rows: list[SweepRow], path: Path, title: str | None = None) -> Path | None:
    """Metric vs upstream GMAC/s and vs frame period, one line per once-for-all checkpoint (and
    per task when the rows hold several tasks); a fixed-rate checkpoint is a square at its rate."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    tasks = list(dict.fromkeys(r.task for r in rows))

    def line(r: SweepRow) -> str:
        return r.label if len(tasks) == 1 else f"{r.label}: {r.task} {r.metric}"

    for name in dict.fromkeys(line(r) for r in rows):
        rs = sorted((r for r in rows if line(r) == name), key=lambda r: r.frame_period_ms)
        fixed = rs[0].fixed_rate
        style: dict[str, Any] = {"marker": "s" if fixed else "o", "markersize": 9 if fixed else 6,
                                 "linestyle": "none" if fixed else "-"}
        ys = [r.test for r in rs]
        sds = [r.test_sd or 0.0 for r in rs]
        for ax, xs in ((axes[0], [r.upstream_gmacs_per_s for r in rs]), (axes[1], [r.frame_period_ms for r in rs])):
            if any(sds):  # several probes per rate: their standard deviation as error bars
                ax.errorbar(xs, ys, yerr=sds, capsize=3, label=name, **style)
            else:
                ax.plot(xs, ys, label=name, **style)
            out = [i for i, r in enumerate(rs) if r.outside_training_range]
            if out:  # rates the student never trained at: hollow, so the curve is not read past its range
                ax.plot([xs[i] for i in out], [ys[i] for i in out], "o", mfc="white", zorder=3,
                        color=ax.get_lines()[-1].get_color(), label=f"{name}: outside its trained rates")
    axes[0].set_xlabel("upstream GMAC per audio second")
    axes[1].set_xlabel("frame period (ms)")
    for ax in axes:
        ax.set_ylabel(f"{tasks[0]} test {rows[0].metric}" if len(tasks) == 1 else "test metric")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or f"{', '.join(tasks)}: performance vs compression")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def parse_ckpts(values: list[str]) -> list[tuple[str, Path]]:
    """``--ckpt PATH`` or ``--ckpt LABEL=PATH`` (repeatable) -> (label, path) pairs; a distill run
    folder stands for its student.pt, and names the row by default.

    A label has no ``/``; an existing file whose name holds ``=`` is taken as a path.
    """
    from ofactl.checkpoint import student_file

    out = []
    for v in values:
        label, sep, path = v.partition("=")
        if not sep or not label or "/" in label or Path(v).exists():
            label, path = "", v
        p = student_file(Path(path))
        out.append((label or p.parent.name or p.stem, p))
    return out


def load_rows(path: Path) -> list[SweepRow]:
    """The rows of a ``sweep.json``."""
    doc = json.loads(Path(path).read_text())
    return rows_from_json(doc["rows"], Path(path))


def read_row(path: Path) -> SweepRow | None:
    """A finished row's file (``rows/*.json``); None for one cut short, edited, or written by
    another version: such a record vouches for nothing, and a sweep measures its row again."""
    try:
        return SweepRow(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return None


def rows_from_json(rows: list[dict[str, Any]], source: Path) -> list[SweepRow]:
    """Rows as ``SweepRow.to_json`` wrote them; a row missing a field, or with one this version
    does not know, fails naming ``source`` and the field (ConfigError)."""
    try:
        return [SweepRow(**r) for r in rows]
    except TypeError as e:
        raise ConfigError(f"{source}: a sweep row this version cannot read ({e}); "
                          "rerun the sweep with this version") from None
