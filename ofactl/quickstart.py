"""``ofactl quickstart``: the whole pipeline on the built-in default, with no data and no weights.

synth (espeak-ng corpus) -> distill (OFA tiny student from the bundled teacher builtin:hubert-tiny-v3)
-> extract (several rates, one pass) -> sweep (keyword spotting, speaker ID, phonemes) -> adapt
(each task learns its rate) -> summary. Every stage reuses its finished output, so a rerun is quick.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ofactl.atomic import make_dir, write_text
from ofactl.choices import CtcHead, Task
from ofactl.config import Flag, doc_sha, load_config, save_resolved, to_dict
from ofactl.progress import NullProgress, Progress

if TYPE_CHECKING:
    from ofactl.adapt import AdaptConfig
    from ofactl.probe import ProbeConfig
    from ofactl.sweep import SweepConfig

UNTRAINED_NOTE = ("the teacher is random:tiny, an UNTRAINED HuBERT-shaped model: its student learns no "
                  "speech unless a log-mel head gives it an acoustic target (a distill preset with "
                  "student.spectral_bins: 64; the tiny presets have none). For real "
                  "features distill from a HuBERT checkpoint, e.g. "
                  "'ofactl distill -c distilhubert-ofa --teacher /path/hubert_base_ls960.pt --trust-checkpoint ...'")
BUILTIN_NOTE = ("the teacher is builtin:{name}, a small HuBERT that ofactl pretrained on about 3 hours of "
                "speech (docs/models.md); it knows far less than HuBERT Base. For research-grade features "
                "distill from a HuBERT checkpoint, e.g. 'ofactl distill -c distilhubert-ofa --teacher "
                "/path/hubert_base_ls960.pt --trust-checkpoint ...'")


def teacher_note(teacher: str) -> str:
    """What the summary says about where the student's knowledge comes from."""
    if teacher.startswith("random:"):
        return UNTRAINED_NOTE
    if teacher.startswith("builtin:"):
        return BUILTIN_NOTE.format(name=teacher.split(":", 1)[1])
    return f"the teacher is {teacher}"


@dataclass
class QuickstartConfig:
    """Settings of ``ofactl quickstart``: which presets, rates and tasks, and how long to train probes."""

    synth_preset: str = "synth-tiny"  # synth preset of the corpus
    distill_preset: str = "distill-tiny-fbank"  # distill preset of the student (the light one: best in docs/ablation.md)
    teacher: str | None = None  # distill from this teacher instead of the preset's (builtin:NAME, a teacher
    # file, an 'ofactl pretrain' run folder): the trade-off of a teacher of one's own
    rates: tuple[float, ...] = (1.0, 0.5, 0.33, 0.25)  # rates extracted and swept
    tasks: tuple[Task, ...] = ("ks", "sid", "pr")  # the tasks swept over the rates
    pr_head: CtcHead = "lstm"  # the CTC head of pr sweeps and adapt: lstm (sees the whole utterance at
    # every rate), conv (five frames: 100 ms at rate 1, 200 ms at 0.5, so it favours 40 ms frames;
    # docs/ablation.md), linear (one frame at a time: favours 40 ms frames more, docs/models.md)
    pr_conv_hidden: int = 128  # channels of the conv pr head: half the probe default, a third less probe time
    pr_max_frames: int = 1_000_000  # the pr head's training budget in frames: half the probe default, which
    # trims the rate-1 row on synth-tiny (13 epochs instead of 26) and keeps the quickstart within its time
    jobs: int = 0  # CPU processes for the sweep's probes (one pool for every task's rates: sweep.jobs) and for
    # the adapt runs (one task each): 0, one per core up to the work (small models use a second thread
    # poorly), 1 on a GPU
    probe_runs: int = 3  # probes per rate for utterance tasks (ks, sid), their mean the row (seeds probe.seed,
    # +1, ...): one sid probe's accuracy moves by points with its seed on 120 test utterances; CTC tasks
    # (pr, asr) keep one (slow heads)
    adapt_tasks: tuple[Task, ...] = ("pr", "ks", "sid")  # tasks that learn their rate: one that needs frames, two flat
    adapt_epochs: int = 6  # epochs of each adapt run
    probe_epochs: int = 60  # utterance heads: they train in seconds; the sid probe still improves past 40
    device: str = "auto"  # auto, cpu, cuda or cuda:N: every stage

    def validate(self) -> None:
        """Raise ValueError for empty rates or tasks, or tasks the synthetic corpus cannot label."""
        from ofactl.runtime import check_device_name

        check_device_name(self.device)
        if self.pr_max_frames < 0:
            raise ValueError(f"pr_max_frames must be >= 0 (0: no budget), got {self.pr_max_frames}")
        if self.probe_runs < 1:
            raise ValueError(f"probe_runs must be >= 1 (probes per rate for utterance tasks), got {self.probe_runs}")
        if self.jobs < 0:
            raise ValueError(f"jobs must be >= 0 (0: one per core on a CPU), got {self.jobs}")


@dataclass
class QuickstartResult:
    """What the quickstart produced: the folder, each stage's outputs and the stages reused."""

    out_dir: Path
    rows: list[dict[str, Any]]
    adapt: dict[str, dict[str, Any]]  # task -> adapt summary
    paths: dict[str, str]
    stage_seconds: dict[str, float]
    note: str
    reused: list[str] = field(default_factory=list)  # stages taken from an earlier run with the same settings

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-safe data (``summary.json``, ``--json``)."""
        return {"out_dir": str(self.out_dir), "rows": self.rows, "adapt": self.adapt, "paths": self.paths,
                "stage_seconds": self.stage_seconds, "reused": self.reused, "note": self.note}


# Settings that change where or how fast a stage runs, not what it produces.
_NOT_RESULTS = ("device", "num_workers")


def settings_sha(cfg: Any, **inputs: str) -> str:
    """A short hash of a stage's resolved settings (a config or its dict) and the identity of its
    inputs (corpus fingerprint, student checkpoint hash): a finished stage is reused only when it
    matches."""
    doc = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_RESULTS}
    return doc_sha({"settings": doc, "inputs": inputs})


def teacher_identity(spec: str) -> str:
    """What identifies a teacher for reuse: its name, the sha256 of the file a path names, or of
    the config and weights a HuggingFace folder's teacher is loaded from (a teacher retrained at
    the same path distills again; the folder's other files are not read)."""
    from ofactl.checkpoint import file_sha256
    from ofactl.errors import CheckpointError
    from ofactl.model.teacher import hf_fingerprint, teacher_file

    if spec.startswith(("builtin:", "random:")):
        return spec
    p = teacher_file(Path(spec))
    if p.is_dir():
        try:
            return hf_fingerprint(p)  # as 'info --teacher' shows it
        except CheckpointError:
            return spec  # not a teacher folder: distill says so
    return file_sha256(p) if p.is_file() else spec  # a missing one: distill says so


def adapt_sha(acfg: AdaptConfig, student_sha: str, sweep_sha: str = "none") -> str:
    """The settings hash of one adapt stage: its probe settings narrowed to its task's kind of
    probe, so a new CTC head re-adapts ``pr`` but not ``ks`` or ``sid`` (and the other way round),
    and the rows of the sweep it is compared with (``sweep_rows_sha``)."""
    from ofactl.probe.tasks import task_kind

    own = to_dict(acfg) | {"probe": acfg.probe.settings_for(task_kind(acfg.task))}
    return settings_sha(own, student=student_sha, sweep=sweep_sha)


def sweep_rows_sha(sweep_json: Path) -> str:
    """A short hash of a ``sweep.json``'s rows ("none" without one): an adapt summary compares
    itself with these rows, so it is stale once they change. Rows a sweep reuses are read back
    unchanged, so a rerun that reuses every row keeps the hash."""
    from ofactl.sweep import load_rows

    if not sweep_json.is_file():
        return "none"
    return doc_sha([asdict(r) for r in load_rows(sweep_json)])


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
        """True when ``stage`` last ran with settings hash ``sha``."""
        return self.data.get(stage) == sha

    def known(self, stage: str) -> bool:
        """True when ``stage`` has run before (with any settings)."""
        return stage in self.data

    def set(self, stage: str, sha: str) -> None:
        """Record that ``stage`` runs with settings hash ``sha`` (written before it starts)."""
        self.data[stage] = sha
        write_text(self.path, json.dumps(self.data, indent=2))


def run_quickstart(cfg: QuickstartConfig, out_dir: Path, progress: Progress | None = None, *,
                   trust_checkpoint: bool = False) -> QuickstartResult:
    """synth -> distill -> extract -> sweep -> adapt -> summary; each stage reused when its
    settings and inputs match an earlier run's (``stages.json``). ``trust_checkpoint`` allows a
    pickle-based ``cfg.teacher``."""
    from ofactl.pidlock import run_folder_lock

    with run_folder_lock(out_dir, "quickstart", progress or NullProgress()):
        return _run_quickstart(cfg, out_dir, progress, trust_checkpoint)


def _run_quickstart(cfg: QuickstartConfig, out_dir: Path, progress: Progress | None,
                    trust_checkpoint: bool) -> QuickstartResult:
    """:func:`run_quickstart` under its run folder's lock."""
    from ofactl.runtime import resolve_device

    progress = progress or NullProgress()
    resolve_device(cfg.device)  # a device this machine lacks fails now, not after the corpus is made
    if cfg.teacher is not None:  # and so does a --teacher that cannot be loaded
        from ofactl.model.teacher import load_teacher

        load_teacher(cfg.teacher, trust_checkpoint)
    out = make_dir(Path(out_dir))
    save_resolved(cfg, "quickstart", out / "quickstart.yaml")
    q = _Quickstart(cfg, out, progress, trust_checkpoint)
    corpus = q.stage("synth", "1/5 synth: a labelled speech corpus from espeak-ng", q.synth)
    student, teacher = q.stage("distill", "2/5 distill: once-for-all tiny student", lambda: q.distill(corpus))
    store = q.stage("extract", f"3/5 extract: rates {', '.join(f'{r:g}' for r in cfg.rates)} in one pass",
                    lambda: q.extract(corpus, student))
    sweeps = q.stage("sweep", f"4/5 sweep: {', '.join(cfg.tasks)} over the rates", lambda: q.sweep(corpus, student, store))
    adapts = q.stage("adapt", f"5/5 adapt: {', '.join(cfg.adapt_tasks)} learn their own rates",
                     lambda: q.adapt(corpus, student))
    return q.summary(corpus, student, store, sweeps, adapts, teacher)


@dataclass
class _AdaptJob:
    """One task's adapt run, whole: it runs here or in a worker process."""

    cfg: AdaptConfig
    student: Path
    corpus: Path
    out_dir: Path
    sweep: Path  # the quickstart's sweep.json of the task, to compare the learned rate with (if made)
    progress: Progress | None = None  # live progress where it runs here


def _run_adapt_job(job: _AdaptJob) -> dict[str, Any]:
    """Run one adapt job; its summary as JSON-safe data."""
    from ofactl.adapt import run_adapt

    swept = job.sweep if job.sweep.is_file() else None
    return run_adapt(job.cfg, job.student, job.corpus, job.out_dir, swept, progress=job.progress).to_json()


class _Quickstart:
    """The stages of :func:`run_quickstart`, sharing the output folder, timings and stamps."""

    def __init__(self, cfg: QuickstartConfig, out: Path, progress: Progress, trust: bool = False) -> None:
        self.cfg, self.out, self.progress, self.trust = cfg, out, progress, trust
        self.secs: dict[str, float] = {}
        self.stamps = StageStamps(out / "stages.json")
        self.reused: list[str] = []

    def stage(self, name: str, title: str, fn: Any) -> Any:
        self.progress.log(f"== {title}")
        t = time.perf_counter()
        res = fn()
        self.secs[name] = time.perf_counter() - t
        return res

    def pr_probe(self, probe: ProbeConfig) -> ProbeConfig:
        """``probe`` with the quickstart's CTC head and frame budget (CTC epochs stay at the probe's
        default: its dev-set early stopping or the budget ends them sooner)."""
        return replace(probe, ctc_head=self.cfg.pr_head, conv_hidden=self.cfg.pr_conv_hidden,
                       max_frames=self.cfg.pr_max_frames)

    def synth(self) -> Path:
        from ofactl.synth import SynthConfig, run_synth

        scfg = load_config(SynthConfig, "synth", self.cfg.synth_preset)
        return run_synth(scfg, self.out / "corpus", progress=self.progress).manifest

    def distill(self, corpus: Path) -> tuple[Path, str]:
        """The student checkpoint and the teacher it learnt from (``--teacher`` spec)."""
        from ofactl.audio import read_corpus
        from ofactl.distill import DistillConfig, run_distill
        from ofactl.training import has_checkpoint

        dcfg = load_config(DistillConfig, "distill", self.cfg.distill_preset, [f"device={self.cfg.device}"],
                           [Flag("teacher", "--teacher", self.cfg.teacher)])
        if self.small_cpu():
            # a loader process takes a core from the two training threads: 0.87x the time without it
            # on the 2-core CPU, the same student (the worker count keys nothing)
            dcfg.num_workers = 0
        self.progress.log("note: " + teacher_note(dcfg.teacher))
        run_dir = self.out / "distill"
        student = run_dir / "student.pt"
        sha = settings_sha(dcfg, corpus=read_corpus(corpus).fingerprint(), teacher=teacher_identity(dcfg.teacher))
        if self.stamps.matches("distill", sha) and student.is_file() and (run_dir / "summary.json").is_file():
            self.progress.log(f"reusing {student} (made with the same distill settings and corpus)")
            self.reused.append("distill")
            return student, dcfg.teacher
        same = self.stamps.matches("distill", sha)
        resume = same and has_checkpoint(run_dir)
        if run_dir.exists() and not same:
            self.progress.log(f"{run_dir}: made with other distill settings; distilling again")
        self.stamps.set("distill", sha)
        run_distill(dcfg, corpus, run_dir, resume=resume, overwrite=not resume, trust_checkpoint=self.trust,
                    progress=self.progress)
        return student, dcfg.teacher

    def extract(self, corpus: Path, student: Path) -> Path:
        from ofactl.extract import ExtractConfig, run_extract

        store = self.out / "feats.zarr"
        ecfg = ExtractConfig(rates=tuple(self.cfg.rates), device=self.cfg.device, num_workers=1)
        # groups of the current student are completed or reused; groups of an earlier student replaced
        ext = run_extract(ecfg, student, corpus, store, overwrite=True, progress=self.progress)
        if all(g.written == 0 and g.reused for g in ext.groups):
            self.reused.append("extract")
        return store

    def sweep_config(self, task: Task) -> SweepConfig:
        """The sweep of one task: the quickstart's rates, probe epochs and heads; utterance tasks
        average ``probe_runs`` probes per rate, CTC tasks train one (their heads take most of the
        sweep's time). Every task's probes share one pool of ``sweep_jobs`` processes."""
        from ofactl.probe.tasks import task_kind
        from ofactl.sweep import SweepConfig

        ctc = task_kind(task) == "ctc"
        sw = SweepConfig(task=task, rates=tuple(self.cfg.rates), device=self.cfg.device,
                         probe_runs=1 if ctc else self.cfg.probe_runs, jobs=self.sweep_jobs())
        sw.probe = replace(self.pr_probe(sw.probe), cls_epochs=self.cfg.probe_epochs)
        sw.extract = replace(sw.extract, num_workers=1)
        return sw

    def sweep_jobs(self) -> int:
        """Processes for the sweep stage's probes, every task's rates in one pool: the slow CTC
        probes start first and the utterance probes (seconds each) fill the gaps beside them."""
        return self.jobs(len(self.cfg.rates) * len(self.cfg.tasks))

    def cpu_threads(self) -> int:
        """The torch threads (cores) the quickstart has on a CPU; 0 on a GPU."""
        import torch

        from ofactl.runtime import resolve_device

        return torch.get_num_threads() if resolve_device(self.cfg.device).type == "cpu" else 0

    def small_cpu(self) -> bool:
        """Whether the quickstart runs on a CPU of two cores or fewer."""
        return 0 < self.cpu_threads() <= 2

    def jobs(self, work: int) -> int:
        """How many processes share ``work`` independent pieces (the sweep's probes, the adapt runs),
        never more than the pieces: ``jobs``, or on a CPU one per core, or 1 on a GPU."""
        return max(1, min(work, self.cfg.jobs or self.cpu_threads() or 1))

    def sweep(self, corpus: Path, student: Path, store: Path) -> dict[str, Any]:
        from ofactl.sweep import SweepSpec, run_sweeps

        specs = [SweepSpec(self.sweep_config(task), [("ofa-tiny", student)], corpus, self.out / f"sweep-{task}", store)
                 for task in self.cfg.tasks]
        results = run_sweeps(specs, self.sweep_jobs(), self.progress)
        for task, res in zip(self.cfg.tasks, results):
            if res.rows and res.reused == len(res.rows):
                self.reused.append(f"sweep-{task}")
        return dict(zip(self.cfg.tasks, results))

    def adapt(self, corpus: Path, student: Path) -> dict[str, dict[str, Any]]:
        """Each adapt task's summary: reused when its settings, student and sweep match, otherwise
        run, the tasks at once in CPU processes (``jobs``) or in turn with live progress."""
        from ofactl.checkpoint import file_sha256
        from ofactl.workers import run_in_processes

        out: dict[str, dict[str, Any]] = {}
        pending: list[_AdaptJob] = []
        for task in self.cfg.adapt_tasks:
            job = self.adapt_job(task, corpus, student)
            summary = job.out_dir / "summary.json"
            sha = adapt_sha(job.cfg, file_sha256(student), sweep_rows_sha(job.sweep))
            if self.stamps.matches(f"adapt-{task}", sha) and summary.is_file():
                out[task] = json.loads(summary.read_text())
                self.progress.log(f"reusing {summary} (made with the same adapt settings, student and sweep)")
                self.reused.append(f"adapt-{task}")
                continue
            if summary.is_file():
                self.progress.log(f"{job.out_dir}: made with other adapt settings, another student or another "
                                  "sweep to compare with; adapting again")
            self.stamps.set(f"adapt-{task}", sha)
            pending.append(job)
        workers = self.jobs(len(pending))
        if workers > 1:
            self.progress.log(f"adapting {', '.join(j.cfg.task for j in pending)} at once, in {workers} processes")
        else:
            pending = [replace(j, progress=self.progress) for j in pending]  # in turn, here: live progress
        for i, res in run_in_processes(_run_adapt_job, pending, workers):
            out[pending[i].cfg.task] = res
        return {t: out[t] for t in self.cfg.adapt_tasks}

    def adapt_job(self, task: Task, corpus: Path, student: Path) -> _AdaptJob:
        """One task's adapt run as the quickstart makes it."""
        from ofactl.adapt import AdaptConfig

        # the joint probe's figure: a fresh probe would add ~50 s for pr on a CPU; the summary
        # reads the quickstart's own sweep at the learned rate instead (compare_sweep)
        acfg = AdaptConfig(task=task, epochs=self.cfg.adapt_epochs, device=self.cfg.device, final_probe="joint")
        acfg.probe = self.pr_probe(acfg.probe)
        return _AdaptJob(acfg, student, corpus, self.out / f"adapt-{task}", self.out / f"sweep-{task}" / "sweep.json")

    def summary(self, corpus: Path, student: Path, store: Path, sweeps: dict[str, Any],
                adapts: dict[str, dict[str, Any]], teacher: str) -> QuickstartResult:
        from ofactl.sweep import plot_tradeoff

        rows = [r.to_json() for res in sweeps.values() for r in res.rows]
        note = teacher_note(teacher)
        label = "untrained teacher" if note == UNTRAINED_NOTE else teacher
        png = plot_tradeoff([r for res in sweeps.values() for r in res.rows], self.out / "tradeoff.png",
                            f"quickstart: tiny OFA student ({label}), synthetic speech")
        paths = {"corpus": str(corpus), "student": str(student), "store": str(store), "tradeoff_plot": str(png)}
        for task in adapts:
            paths[f"adapt_{task}_rate_config"] = str(self.out / f"adapt-{task}" / "rate.yaml")
        for task, res in sweeps.items():
            paths[f"{task}_plot"] = str(res.png)
            paths[f"{task}_csv"] = str(res.csv)
        result = QuickstartResult(self.out, rows, adapts, paths, {k: round(v, 1) for k, v in self.secs.items()},
                                  note, self.reused)
        write_text(self.out / "summary.json", json.dumps(result.to_json(), indent=2))
        return result
