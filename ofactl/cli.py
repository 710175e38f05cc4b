"""The ``ofactl`` command line: thin typer commands over ``run_*`` library functions.

This is the only module that prints: progress, logs and errors go to stderr (rich), and
``--json`` prints one JSON document on stdout. torch is imported inside commands only, so
``ofactl --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ofactl import __version__
from ofactl.choices import CompressorKind, CostForm, FeatureDtype, OnError, Precision, StoreFormat, Task
from ofactl.errors import OfactlError
from ofactl.progress import duration_text

if TYPE_CHECKING:
    from ofactl.config import Flag

T = TypeVar("T")

app = typer.Typer(
    name="ofactl",
    help="Once-for-all sequence compression for self-supervised speech models: one distilled "
    "student, features at any frame rate.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# soft_wrap: error lines stay one line, whatever the terminal width (grep-able logs).
err_console = Console(stderr=True, soft_wrap=True)

# ----------------------------------------------------------------------------- shared options
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="Preset name (see presets/) or path to a YAML file.",
                 rich_help_panel="Config"),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one config key, e.g. --set optim.lr=2e-4 (repeatable).",
                 rich_help_panel="Config"),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document with the result on stdout.",
                       rich_help_panel="Output"),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress display or notes on stderr.",
                       rich_help_panel="Output"),
]
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Show the full traceback on errors.", rich_help_panel="Output"),
]


TrainCorpusOpt = Annotated[str, typer.Option(
    "--corpus", help="Training audio: folder (through its manifest.tsv if it has one), LibriSpeech tree, Kaldi data folder, .tsv manifest (ofactl's or fairseq's) or list.")]
LabelledCorpusOpt = Annotated[str, typer.Option(
    "--corpus", help="Labelled corpus: a .tsv manifest, a folder holding manifest.tsv, a Kaldi data folder, or folder::pattern.")]
TaskOpt = Annotated[Task | None, typer.Option("--task", help="The downstream task.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out (step 0 if it has none yet, as for a requeued job).")]
OverwriteRunOpt = Annotated[bool, typer.Option("--overwrite", help="Start over in a non-empty --out.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda[:N].", rich_help_panel="Compute")]
PrecisionOpt = Annotated[Precision | None, typer.Option(
    "--precision", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (CUDA).", rich_help_panel="Compute")]


class RichProgress:
    """:class:`ofactl.progress.Progress` on a rich progress bar (stderr). Off a terminal (a log
    file, a pipe, CI) there is no bar: a stage prints its name, then one plain line every
    ``every_s`` seconds with its count, speed, time left and latest metrics, as a job's log needs."""

    def __init__(self, enabled: bool, quiet: bool, every_s: float = 60.0) -> None:
        self.enabled = enabled
        self.quiet = quiet
        self._bar: Any = None
        self._task: Any = None
        self._metrics = ""
        self._plain: _PlainLines | None = None
        self.every_s = every_s

    def start(self, stage: str, total: int | None = None) -> None:
        """Begin a stage: a bar when ``total`` is known, a spinner otherwise."""
        self.finish()
        if not self.enabled:
            if not self.quiet:
                err_console.print(f"[bold]{stage}[/bold]" + (f" ({total})" if total else ""))
                self._plain = _PlainLines(stage, total, self.every_s)
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"), console=err_console, transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(stage, total=total, metrics="")

    def advance(self, n: int = 1, **metrics: Any) -> None:
        """Move the bar by ``n`` and show the latest metrics."""
        if metrics:
            self._metrics = "  ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        if self._plain is not None:
            self._plain.advance(n, self._metrics)
        if self._bar is None:
            return
        self._bar.update(self._task, advance=n, metrics=self._metrics)

    def log(self, message: str) -> None:
        """A note on stderr above the bar."""
        if not self.quiet:
            err_console.print(message, markup=False, highlight=False)

    def finish(self) -> None:
        """End the current stage's display."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self._plain = None
        self._metrics = ""


class _PlainLines:
    """A stage's progress as a plain line every ``every_s`` seconds: done/total, units per second
    and time left, both from this run's own progress (a resumed job jumps to its step first) over
    the last ``SPEED_LINES`` lines, so a pause or a busy spell stops counting once it is that old."""

    SPEED_LINES = 10  # about ten minutes at one line a minute

    def __init__(self, stage: str, total: int | None, every_s: float) -> None:
        self.stage, self.total, self.every_s = stage, total, every_s
        self.done = 0
        self.marks: deque[tuple[float, int]] = deque(maxlen=self.SPEED_LINES)  # (time, done) of recent lines
        self.last = time.monotonic()

    def advance(self, n: int, metrics: str) -> None:
        now = time.monotonic()
        self.done += n
        if not self.marks:  # the first report sets the origin: a resumed run's jump does not count as speed
            self.marks.append((now, self.done))
            return
        if now - self.last < self.every_s:
            return
        self.last = now
        t0, n0 = self.marks[0]
        self.marks.append((now, self.done))
        rate = (self.done - n0) / max(now - t0, 1e-9)
        count = f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else f"{self.done}"
        left = f", {duration_text((self.total - self.done) / rate)} left" if self.total and rate > 0 else ""
        err_console.print(f"{self.stage}: {count}, {rate:.3g}/s{left}" + (f"  {metrics}" if metrics else ""),
                          markup=False, highlight=False)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _speed(audio_s: float, wall_s: float) -> str:
    """Audio seconds per wall second as "N.Nx real time"; below 1x two significant digits, so a
    slow or tiny run does not read 0.0x."""
    x = audio_s / wall_s
    return f"{x:.1f}x real time" if x >= 1 else f"{x:.2g}x real time"


def _table(columns: list[str], title: str | None = None) -> Any:
    """A compact table of right-aligned, unwrapped columns: no outer edge or column rules, so it
    fits a narrow terminal better (:func:`_show` prints it)."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
              collapse_padding=True)
    for col in columns:
        t.add_column(col, justify="right", no_wrap=True)
    return t


def _show(console: Console, table: Any) -> None:
    """Print a table; off a terminal (a pipe, a log file) at its natural width, however wide, so
    no cell is cut short; on a terminal, at the terminal's width."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.measure import Measurement

    natural = Measurement.get(console, console.options.update(width=100_000), table).maximum
    # print(width=...) cannot exceed the console's own width, so a console as wide as the table
    Console(file=console.file, width=max(console.width, natural), soft_wrap=True).print(table)


def _progress(quiet: bool, as_json: bool) -> RichProgress:
    interactive = err_console.is_terminal and not os.environ.get("CI")
    return RichProgress(enabled=interactive and not quiet and not as_json, quiet=quiet)


def _call(debug: bool, fn: Callable[[], T], as_json: bool = False, out: Path | None = None) -> T:
    """Run library code: an OfactlError becomes one line on stderr and its exit code (1; 130 after
    Ctrl-C, 143 after SIGTERM, 129 after SIGHUP); under ``--json`` stdout also gets one JSON error
    document, so a pipeline (``... --json | jq``) sees the failure. A failed command leaves no
    empty ``out`` folder behind."""
    from ofactl.atomic import removed_if_left_empty

    try:
        with removed_if_left_empty(out):
            return fn()
    except OfactlError as e:
        if debug:
            err_console.print_exception()
        _fail(str(e), e.exit_code, type(e).__name__, as_json)
    except KeyboardInterrupt as e:
        _fail(*_stopped(e), as_json, stopped=True)
    except Exception as e:  # a bug: the traceback is the honest report, the JSON says it failed
        if as_json:
            _emit_json({"error": f"internal error: {type(e).__name__}: {e}", "exit_code": 1, "kind": "internal"})
        raise


def _stopped(e: KeyboardInterrupt) -> tuple[str, int, str]:
    """A stop by signal outside a training loop: its message, exit code and JSON kind."""
    from ofactl.progress import Terminated, how_stopped

    how, code = how_stopped(e.signum if isinstance(e, Terminated) else None)
    message = how.split(" (")[0]  # the signal's name is said by the exit code
    return message, code, {130: "KeyboardInterrupt", 129: "HungUp"}.get(code, "Terminated")


def _fail(message: str, code: int, kind: str, as_json: bool, stopped: bool = False) -> NoReturn:
    """Print the error (a stop by signal in yellow), under ``--json`` its document too, and exit."""
    if stopped:
        err_console.print(f"[yellow]{escape(message)}[/yellow]")
    else:
        err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
    if as_json:
        _emit_json({"error": message, "exit_code": code, "kind": kind})
    raise typer.Exit(code)


def _rates_flag(rate: list[str] | None, frame_ms: list[str] | None, name: str) -> Flag:
    """The rates that ``name`` (``--rate``, ``--rates``) and ``--frame-ms`` ask for, each a comma
    list or repeated, as one flag for the ``rates`` key (its value None when neither was given)."""
    from ofactl.config import Flag, parse_numbers
    from ofactl.extract import requested_rates

    typed = " ".join([*(f"{name} {r}" for r in rate or ()), *(f"--frame-ms {m}" for m in frame_ms or ())])
    asked = requested_rates(parse_numbers(rate or (), name), parse_numbers(frame_ms or (), "--frame-ms"))
    return Flag("rates", name, asked, typed)


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- commands
@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"ofactl {__version__}")
        raise typer.Exit(0)


def _metric_cell(test: float, sd: float | None, digits: int) -> str:
    """A table cell for a sweep row's test metric: the mean and, over several probes, its SD."""
    return f"{test:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for every stage's output.")] = Path("ofactl-quickstart"),
    teacher: Annotated[str | None, typer.Option("--teacher", help="Distill from this teacher instead of the built-in one: builtin:NAME, a teacher file, or an 'ofactl pretrain' run folder.")] = None,
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Allow a pickle-based (fairseq) --teacher.")] = False,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run the whole pipeline on the built-in default; no data or weights needed.

    Synth, distill, extract at several rates, sweep keyword spotting, speaker ID and phonemes,
    adapt, summary. Reruns reuse finished stages.
    """
    from ofactl.config import Flag, load_config
    from ofactl.quickstart import QuickstartConfig, run_quickstart

    def go() -> Any:
        cfg = load_config(QuickstartConfig, "quickstart", config, set_ or [],
                          [Flag("device", "--device", device), Flag("teacher", "--teacher", teacher)])
        return run_quickstart(cfg, out, progress=_progress(quiet, as_json), trust_checkpoint=trust_checkpoint)

    res = _call(debug, go, as_json, out)
    if as_json:
        _emit_json(res.to_json())
        return
    if not quiet:
        _show_quickstart(err_console, res.to_json())


def _show_quickstart(console: Console, doc: dict[str, Any]) -> None:
    """The quickstart's summary (its summary.json): the trade-off table, each task's learned rate,
    the paths, the stage seconds and the teacher note; ``info QUICKSTART_FOLDER`` prints it again."""
    rows = doc["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    t = _table(["rate", "frame ms", "GMAC/s", *[f"{k} {next(r['metric'] for r in rows if r['task'] == k)}" for k in tasks]],
               "once-for-all trade-off (test metrics per rate)")
    for rate in sorted({r["requested_rate"] for r in rows}, reverse=True):
        by = {r["task"]: r for r in rows if r["requested_rate"] == rate}
        first = next(iter(by.values()))
        t.add_row(f"{rate:g}", f"{first['frame_period_ms']:.1f}", f"{first['upstream_gmacs_per_s']:.3f}",
                  *[_metric_cell(by[k]["test"], by[k]["test_sd"], 3) if k in by else "-" for k in tasks])
    _show(console, t)
    for a in doc["adapt"].values():
        there = (f"the sweep there: {a['metric']} {a['comparison']['sweep_at_learned_rate']:.3f}" if a.get("comparison")
                 else f"test {a['metric']} {a['test']:.3f} ({a.get('final_probe', 'joint')} probe)")
        console.print(f"adapt --task {a['task']}: learned rate {a['learned_rate']:.3f} ({a['frame_period_ms']:.1f} ms), "
                      f"{there}", markup=False, highlight=False)
        if note := (a.get("dev_resolution") or {}).get("note"):  # runs from before the field have none
            console.print(f"  [yellow]note:[/yellow] {escape(note)}", highlight=False)
    for k, v in doc["paths"].items():
        console.print(f"  {k}: {v}", markup=False, highlight=False)
    console.print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in doc["stage_seconds"].items()), highlight=False)
    console.print(f"[yellow]note:[/yellow] {escape(str(doc['note']))}", highlight=False)


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for WAVs and manifest.tsv.")] = Path("ofactl-data/synth"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Synthesise the built-in labelled speech corpus with espeak-ng.

    Writes 16 kHz WAVs and a TSV manifest (id, path, speaker, label, kind, text, phones,
    phone_times, accent, split) usable as --corpus by every other command. A rerun with the
    same settings reuses a finished corpus and goes on with an interrupted one, keeping the
    speakers it finished.
    """
    from ofactl.config import load_config
    from ofactl.synth import SynthConfig, run_synth

    def go() -> Any:
        cfg = load_config(SynthConfig, "synth", config, set_ or [])
        return run_synth(cfg, out, overwrite=overwrite, progress=_progress(quiet, as_json))

    res = _call(debug, go, as_json, out)
    if as_json:
        _emit_json(res.to_json())
    elif not quiet:
        verb = "reused" if res.reused else "wrote"
        err_console.print(
            f"{verb} {res.n_utterances} utterances from {res.n_speakers} speakers "
            f"({res.seconds / 60:.1f} min of audio) -> {res.manifest}", markup=False, highlight=False)


@app.command()
def distill(
    corpus: TrainCorpusOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: config, metrics.jsonl, checkpoints/, student.pt.")] = Path("runs/distill"),
    teacher: Annotated[str | None, typer.Option("--teacher", help="builtin:hubert-tiny, builtin:hubert-small, builtin:hubert-tiny-v2 or builtin:hubert-tiny-v3, a HuBERT file/folder, or random:tiny|random:base (untrained).")] = None,
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Allow pickle-based (fairseq) teacher checkpoints.")] = False,
    boundaries: Annotated[str | None, typer.Option("--boundaries", help="Alpha guidance: auto, none, phone_times, or a TSV file.")] = None,
    compressor: Annotated[CompressorKind | None, typer.Option("--compressor", help="cif (once-for-all), avgpool (fixed-rate baseline) or none.")] = None,
    rate: Annotated[float | None, typer.Option("--rate", help="Train at this one rate only (fixed-rate baseline).")] = None,
    steps: StepsOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteRunOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Distill a once-for-all student from a HuBERT teacher, sampling rates while training.

    Multi-GPU/multi-process: launch with torchrun; rank 0 writes checkpoints and logs.
    """
    from ofactl.config import Flag, load_config
    from ofactl.distill import DistillConfig, rate_flags, run_distill

    def go() -> Any:
        flags = [Flag("teacher", "--teacher", teacher), Flag("guidance.boundaries", "--boundaries", boundaries),
                 Flag("steps", "--steps", steps), Flag("device", "--device", device),
                 Flag("precision", "--precision", precision), Flag("student.compressor", "--compressor", compressor)]
        # what --rate sets depends on the compressor the preset, --set and --compressor resolve to
        cfg = load_config(DistillConfig, "distill", config, set_ or [], flags,
                          rate_flags(rate) if rate is not None else None)
        return run_distill(cfg, corpus, out, resume=resume, overwrite=overwrite,
                           trust_checkpoint=trust_checkpoint, progress=_progress(quiet, as_json))

    res = _call(debug, go, as_json, out)
    if as_json:
        _emit_json(res.to_json())
    elif not quiet:
        err_console.print(f"student: {res.student} ({res.steps} steps)", markup=False, highlight=False)
        for r, after in res.eval_after.items():
            before = res.eval_before.get(r)
            b = f"{before:.4f} -> " if before is not None else ""
            err_console.print(f"  held-out loss at rate {r}: {b}{after:.4f}", markup=False, highlight=False)


@app.command()
def pretrain(
    corpus: TrainCorpusOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: kmeans.safetensors, unit-targets.npz, checkpoints/, metrics.jsonl, teacher.safetensors.")] = Path("runs/pretrain"),
    targets: Annotated[str | None, typer.Option("--targets", help="Unit targets: mfcc (iteration 1) or layer:N of --from (iteration 2).")] = None,
    from_ckpt: Annotated[str | None, typer.Option("--from", help="The earlier model for --targets layer:N (a teacher file or a pretrain run folder).")] = None,
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Allow a pickle-based --from checkpoint.")] = False,
    steps: StepsOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteRunOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Pretrain a HuBERT-architecture teacher from scratch by masked unit prediction.

    Writes teacher.safetensors, which --teacher accepts (distill, info). Several GPUs or
    processes: launch with torchrun.
    """
    from ofactl.config import Flag, load_config
    from ofactl.pretrain import PretrainConfig, run_pretrain

    def go() -> Any:
        flags = [Flag("targets", "--targets", targets), Flag("from_ckpt", "--from", from_ckpt),
                 Flag("steps", "--steps", steps), Flag("device", "--device", device),
                 Flag("precision", "--precision", precision)]
        cfg = load_config(PretrainConfig, "pretrain", config, set_ or [], flags)
        return run_pretrain(cfg, corpus, out, resume=resume, overwrite=overwrite, trust_checkpoint=trust_checkpoint,
                            progress=_progress(quiet, as_json))

    res = _call(debug, go, as_json, out)
    if as_json:
        _emit_json(res.to_json())
    elif not quiet:
        ev = ", ".join(f"{k} {v:.4f}" for k, v in res.eval.items())
        err_console.print(f"teacher: {res.teacher} ({res.steps} steps); held-out {ev}", markup=False, highlight=False)


@app.command()
def extract(
    ckpt: Annotated[Path, typer.Option("--ckpt", help="Student checkpoint (student.pt from 'ofactl distill', or its run folder).")],
    corpus: Annotated[str, typer.Option("--corpus", help="Folder (through its manifest.tsv if it has one), LibriSpeech tree, Kaldi data folder, .tsv manifest (ofactl's or fairseq's), list file, or - for stdin.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Zarr store to create or complete (one group per rate).")] = Path("feats.zarr"),
    rate: Annotated[list[str] | None, typer.Option("--rate", "-r", help="Rate in (0, 1]: output frames per 20 ms frame; a comma list (1,0.5) or repeated.")] = None,
    frame_ms: Annotated[list[str] | None, typer.Option("--frame-ms", help="Average frame period in ms (>= 20), instead of --rate; a comma list (40,60) or repeated.")] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="'all' or hidden-state indices, e.g. 0,2.")] = None,
    dtype: Annotated[FeatureDtype | None, typer.Option("--dtype", help="float16 (default) or float32.")] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    batch_seconds: Annotated[float | None, typer.Option("--batch-seconds", help="Padded audio seconds per batch.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Audio decoding worker processes.")] = None,
    shard: Annotated[str | None, typer.Option("--shard", help="i/N: this process fills every N-th block, from i; auto (the default under torchrun or a SLURM array): from the launcher's RANK/WORLD_SIZE or SLURM_ARRAY_TASK_ID/COUNT.")] = None,
    on_error: Annotated[OnError | None, typer.Option("--on-error", help="fail (stop at the first bad file) or skip (record it and go on).")] = None,
    adaptive_length: Annotated[bool, typer.Option("--adaptive-length", help="Content-dependent lengths instead of round(rate*T).")] = False,
    level_db: Annotated[str | None, typer.Option("--level-db", help="Scale each recording to this RMS level in dBFS (e.g. -25), or auto: to the level the student was distilled at (recorded in its checkpoint); default: as recorded.")] = None,
    fmt: Annotated[StoreFormat | None, typer.Option("--format", help="zarr, or hdf5 (kept in OUT.zarr while running, exported to OUT); default: hdf5 when OUT ends in .h5 or .hdf5, else zarr.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace groups made by another checkpoint, layer set or corpus.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Extract features at one or more rates into a Zarr store (CNN once per batch for all rates).

    Reruns skip utterances already extracted; a killed run resumes where it stopped.
    """
    from ofactl.checkpoint import student_file
    from ofactl.config import Flag, load_config
    from ofactl.extract import ExtractConfig, parse_level, parse_shard, run_extract

    def go() -> Any:
        flags = [_rates_flag(rate, frame_ms, "--rate"),
                 Flag("layers", "--layers", layers), Flag("dtype", "--dtype", dtype), Flag("device", "--device", device),
                 Flag("precision", "--precision", precision), Flag("batch_seconds", "--batch-seconds", batch_seconds),
                 Flag("num_workers", "--workers", workers), Flag("on_error", "--on-error", on_error),
                 Flag("adaptive_length", "--adaptive-length", adaptive_length or None),
                 Flag("level_db", "--level-db", parse_level(level_db))]
        cfg = load_config(ExtractConfig, "extract", config, set_ or [], flags)
        return run_extract(cfg, student_file(ckpt), corpus, out, shard=parse_shard(shard), overwrite=overwrite, format=fmt,
                           progress=_progress(quiet, as_json))

    res = _call(debug, go, as_json, out)
    if as_json:
        _emit_json(res.to_json())
    elif not quiet:
        _print_extract(res)
    if res.warnings and not quiet:
        err_console.print(f"[yellow]warning:[/yellow] {res.warnings} input(s) skipped; see 'ofactl info {escape(str(out))}'")
    level_warning = res.quiet_warning()
    if level_warning and not quiet:
        err_console.print(f"[yellow]warning:[/yellow] {escape(level_warning)}", highlight=False)


def _print_extract(res: Any) -> None:
    t = _table(["group", "utts", "new", "reused", "skipped", "frames", "rate", "ms", "complete"], f"{res.store}")
    for g in res.groups:
        t.add_row(g.group, str(g.utterances), str(g.written), str(g.reused), str(g.skipped), str(g.frames),
                  f"{g.achieved_rate:.4f}" if g.achieved_rate else "-",
                  f"{g.frame_period_ms:.1f}" if g.frame_period_ms else "-", "yes" if g.complete else "no")
    _show(err_console, t)
    if res.wall_seconds and res.audio_seconds:  # nothing new extracted: no speed to report
        err_console.print(f"{res.audio_seconds:.1f} s of audio in {res.wall_seconds:.1f} s "
                          f"({_speed(res.audio_seconds, res.wall_seconds)})", highlight=False)


@app.command()
def sweep(
    ckpt: Annotated[list[str], typer.Option("--ckpt", help="Student checkpoint (or its distill run folder), or LABEL=PATH; repeat to compare checkpoints.")],
    corpus: LabelledCorpusOpt,
    task: TaskOpt = None,
    rates: Annotated[list[str] | None, typer.Option("--rates", "--rate", "-r", help="Rates in (0, 1]: a comma list (1,0.5,0.33,0.25) or the flag repeated, as extract's --rate.")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Feature store to reuse/extend (one checkpoint).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder: sweep.csv, sweep.json, tradeoff.png, rows/.")] = Path("sweep"),
    label_column: Annotated[str | None, typer.Option("--label-column", help="Label column for --task cls.")] = None,
    probe_runs: Annotated[int | None, typer.Option("--probe-runs", help="Probes per rate with successive seeds; the row reports their mean and standard deviation.")] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="Probes trained at once in CPU processes, every checkpoint's rates in one pool, the slowest first, with the cores shared out (1: in turn). The rows match --jobs 1, up to the last digits a thread count can move.")] = None,
    level_db: Annotated[str | None, typer.Option("--level-db", help="Scale each recording to this RMS level in dBFS (e.g. -25), or auto (the level each student was distilled at), as extract does.")] = None,
    frame_ms: Annotated[list[str] | None, typer.Option("--frame-ms", help="Average frame periods in ms (>= 20), instead of or beside --rates; a comma list (40,60,80) or repeated.")] = None,
    adaptive_length: Annotated[bool, typer.Option("--adaptive-length", help="Content-dependent lengths instead of round(rate*T), as extract's.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recompute finished rows (and replace mismatched groups).")] = False,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Probe a downstream task over a grid of rates: the performance/efficiency trade-off.

    Extracts missing rates (reusing cached groups), trains the probe per rate, and writes a
    table, sweep.csv, sweep.json and tradeoff.png.
    """
    from ofactl.config import Flag, load_config
    from ofactl.extract import parse_level
    from ofactl.sweep import SweepConfig, parse_ckpts, run_sweep

    def go() -> Any:
        flags = [Flag("task", "--task", task), _rates_flag(rates, frame_ms, "--rates"),
                 Flag("label_column", "--label-column", label_column), Flag("probe_runs", "--probe-runs", probe_runs),
                 Flag("jobs", "--jobs", jobs), Flag("extract.level_db", "--level-db", parse_level(level_db)),
                 Flag("extract.adaptive_length", "--adaptive-length", adaptive_length or None),
                 Flag("device", "--device", device)]
        cfg = load_config(SweepConfig, "sweep", config, set_ or [], flags)
        return run_sweep(cfg, parse_ckpts(ckpt), corpus, out, store, overwrite=overwrite,
                         progress=_progress(quiet, as_json))

    res = _call(debug, go, as_json, out)
    if as_json:
        _emit_json(res.to_json())
        return
    if quiet:
        return
    _show_sweep_rows(err_console, res.rows, res.not_scored, f"({res.reused} row(s) reused)")
    err_console.print(f"wrote {res.csv}, {res.json}" + (f", {res.png}" if res.png else ""), markup=False, highlight=False)


def _show_sweep_rows(console: Console, rows: list[Any], not_scored: list[dict[str, Any]], note: str) -> None:
    """A sweep's table (one row per checkpoint and rate), then what was not scored and why: what
    ``sweep`` prints when it finishes and ``info SWEEP_FOLDER`` prints again."""
    t = _table(["label", "rate", "achieved", "ms", rows[0].metric if rows else "metric", "GMAC/s", "s/audio-s",
                "probe s", "MB", "infeasible"], f"{rows[0].task if rows else ''} sweep {note}".strip())
    for r in rows:
        t.add_row(r.label, f"{r.requested_rate:g}" + ("*" if r.outside_training_range else ""),
                  f"{r.achieved_rate:.3f}", f"{r.frame_period_ms:.1f}",
                  _metric_cell(r.test, r.test_sd, 4),
                  f"{r.upstream_gmacs_per_s:.2f}", f"{r.extract_s_per_audio_s:.4f}", f"{r.probe_train_s:.1f}",
                  f"{r.store_mb:.1f}", "-" if r.infeasible_test is None else str(r.infeasible_test))
    _show(console, t)
    for n in not_scored:
        console.print(f"{n['label']} at rate {n['rate']:g}: not scored ({n['reason']})", markup=False, highlight=False)
    for label, trained in dict.fromkeys((r.label, r.trained_rates) for r in rows if r.outside_training_range):
        console.print(f"* outside the rates {label} was {trained}", markup=False, highlight=False)


@app.command()
def adapt(
    ckpt: Annotated[Path, typer.Option("--ckpt", help="Once-for-all (cif) student checkpoint (or its distill run folder).")],
    corpus: LabelledCorpusOpt,
    task: TaskOpt = None,
    cost: Annotated[float | None, typer.Option("--cost", help="gamma: expected error (0.05 = 5 points) accepted for all of the compute after the CNN (--cost-form linear) or per halving of the frame rate (log2).")] = None,
    cost_form: Annotated[CostForm | None, typer.Option("--cost-form", help="linear: gamma * (rate - 1); log2: gamma * log2(rate).")] = None,
    target_rate: Annotated[float | None, typer.Option("--target-rate", help="Penalise the distance to this rate instead.")] = None,
    init_rate: Annotated[float | None, typer.Option("--init-rate", help="Starting rate.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: summary.json, trajectory.jsonl/.png, rate.yaml.")] = Path("adapt"),
    compare_sweep: Annotated[Path | None, typer.Option("--compare-sweep", help="A sweep folder of the same task to compare with.")] = None,
    level_db: Annotated[str | None, typer.Option("--level-db", help="Scale each recording to this RMS level in dBFS (e.g. -25), or auto (the level the student was distilled at), as extract does; rate.yaml keeps it.")] = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Let a downstream task learn its own compression rate (lambda trained with the probe).

    Writes rate.yaml, so 'ofactl extract -c OUT/rate.yaml' extracts at the learned rate.
    """
    from ofactl.adapt import AdaptConfig, run_adapt
    from ofactl.checkpoint import student_file
    from ofactl.config import Flag, load_config
    from ofactl.extract import parse_level

    def go() -> Any:
        flags = [Flag("task", "--task", task), Flag("cost", "--cost", cost), Flag("cost_form", "--cost-form", cost_form),
                 Flag("target_rate", "--target-rate", target_rate),
                 Flag("init_rate", "--init-rate", init_rate), Flag("device", "--device", device),
                 Flag("level_db", "--level-db", parse_level(level_db))]
        cfg = load_config(AdaptConfig, "adapt", config, set_ or [], flags)
        return run_adapt(cfg, student_file(ckpt), corpus, out, compare_sweep, progress=_progress(quiet, as_json))

    res = _call(debug, go, as_json, out)
    if as_json:
        _emit_json(res.to_json())
    elif not quiet:
        err_console.print(f"{res.task}: learned rate {res.learned_rate:.3f} ({res.frame_period_ms:.1f} ms frames, "
                          f"lambda {res.learned_lambda:.3f}); test {res.metric} {res.test:.4f} "
                          f"({res.final_probe} probe; the joint probe {res.joint_test:.4f})", markup=False, highlight=False)
        if res.comparison:
            c = res.comparison
            err_console.print(f"sweep at that rate: {c['sweep_at_learned_rate']:.4f}; near-flat region "
                              f"{c['near_flat_region']}; adapt {c['adapt_seconds']:.0f} s vs "
                              f"{c['sweep_probe_trainings']} sweep probe trainings", markup=False, highlight=False)
            err_console.print(f"a grid search on the sweep's dev split picks rate {c['dev_choice_rate']:.3f} "
                              f"(test {c['dev_choice_test']:.4f})", markup=False, highlight=False)
        if note := (res.dev_resolution or {}).get("note"):
            err_console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
        err_console.print(f"extract at this rate: ofactl extract -c {res.out_dir / 'rate.yaml'} ...", markup=False, highlight=False)


@app.command()
def info(
    path: Annotated[Path | None, typer.Argument(help="What to describe: a student checkpoint, a teacher file, an audio file, a corpus (any --corpus but '-'), a feature store, a sweep, adapt or quickstart folder, or a distill, pretrain or synth run folder.")] = None,
    teacher: Annotated[str | None, typer.Option("--teacher", help="Describe a teacher instead: any --teacher value (builtin:NAME, random:tiny|base, a HuBERT file or folder, a pretrain run folder).")] = None,
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Allow loading pickle-based (fairseq) checkpoints.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Check every extracted utterance of a store against its checksum; damaged ones are listed and marked for the next extract (exit code 1).")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show the version and the compute available, or describe a checkpoint, teacher, recording, corpus, store or run.

    The compute: torch, CUDA and bf16. A store's description lists the inputs it skipped, and
    --verify checks every extracted utterance against its checksum. A recording's description says
    what the models get from it: 16 kHz mono, its level, its 20 ms frames. A corpus's, what every
    command reads from it: utterances, hours, speakers and splits, sample rates, durations, and the
    files a command would refuse or that are listed twice. A sweep folder shows its
    table again (the rows finished so far, while it runs; and how many rows a later sweep in the
    folder has measured since); an adapt folder, what it learned; a quickstart folder, its summary.
    """
    from ofactl.about import describe_path, describe_teacher, environment

    def go() -> dict[str, Any]:
        if teacher is not None:
            return describe_teacher(teacher, trust_checkpoint)
        return describe_path(path, verify) if path is not None else environment()

    doc = _call(debug, go, as_json)
    damaged = sum(len(g.get("damaged", [])) for g in doc.get("groups", []) or [])
    if as_json:
        _emit_json(doc)
        if damaged:
            raise typer.Exit(1)
        return
    _show_description(Console(soft_wrap=True), doc, path or Path())


def _show_description(out: Console, doc: dict[str, Any], path: Path) -> None:
    """What ``info`` found, for a person: a quickstart's summary or a sweep's table as those
    commands print them, a store's groups as a table, then every other field on a line."""
    if doc.get("kind") == "quickstart":
        _show_quickstart(out, doc)
        return
    if str(doc.get("kind", "")).startswith("sweep"):
        from ofactl.sweep import rows_from_json

        _show_sweep_rows(out, rows_from_json(doc.pop("rows"), path), doc.pop("not_scored", []),
                         "" if doc["kind"] == "sweep" else "(unfinished)")
    for k, v in doc.items():
        if k == "groups" and isinstance(v, list) and v:
            _show_store_groups(out, v)
            continue
        if k == "notes" and isinstance(v, list):  # one line each, as every other note
            for note in v:
                out.print(f"[bold]note[/bold]: {escape(str(note))}", highlight=False)
            continue
        if isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        out.print(f"[bold]{k}[/bold]: {escape(str(v))}", highlight=False)


def _show_store_groups(out: Console, groups: list[dict[str, Any]]) -> None:
    """A store's rate groups as a table, the settings they share, then each group's notes."""
    short = {"group": "group", "utterances": "utts", "done": "done", "frames": "frames",
             "achieved_rate": "rate", "frame_period_ms": "ms", "size_mb": "MB",
             "skipped_inputs": "skipped", "complete": "complete"}
    cols = [c for c in short if any(c in g for g in groups)]
    t = _table([short[c] for c in cols])
    for g in groups:
        t.add_row(*[f"{g[c]:.4g}" if isinstance(g.get(c), float) else str(g.get(c, "-")) for c in cols])
    _show(out, t)
    first = next((g for g in groups if "dim" in g), groups[0])
    extra = {c: first[c] for c in ("mode", "level_db", "layers", "dim", "dtype", "student_sha256") if c in first}
    for c, val in extra.items():
        out.print(f"[bold]{c}[/bold]: {escape(str(val))}", highlight=False)
    _print_group_notes(out, groups)


def _print_group_notes(out: Console, groups: list[dict[str, Any]]) -> None:
    """Per group: its state when not intact, the inputs it skipped and, after --verify, the
    damaged utterances."""
    for g in groups:
        if "state" in g:
            out.print(f"[yellow]{g['group']}[/yellow]: {escape(str(g['state']))}", highlight=False)
        if "writing" in g:  # an unfinished group is still being extracted, or was stopped (no live writer)
            out.print(f"{g['group']}: being written now by {g['writing']}", markup=False, highlight=False)
        for uid, why in (g.get("skipped") or {}).items():
            out.print(f"{g['group']}: skipped {uid}: {why}", markup=False, highlight=False)
        if "damaged" in g:
            if g["damaged"]:
                for d in g["damaged"]:
                    out.print(f"[red]{g['group']}: damaged {escape(str(d['id']))}[/red] ({escape(str(d['reason']))})", highlight=False)
            else:
                out.print(f"{g['group']}: verified, every extracted utterance matches its checksum", highlight=False)
    n = sum(len(g.get("damaged", [])) for g in groups)
    if n:
        err_console.print(f"[bold red]error:[/bold red] {n} damaged utterance(s), now marked not done; rerun "
                          "the same 'ofactl extract' to rewrite exactly those", highlight=False)
        raise typer.Exit(1)


def cli_markdown() -> str:
    """Markdown reference of every command and option, generated from this app (docs/cli.md)."""
    from typer.cli import get_docs_for_click
    from typer.main import get_command

    cmd = get_command(app)
    ctx = typer.Context(cmd)
    ctx.ensure_object(dict)
    docs = get_docs_for_click(obj=cmd, ctx=ctx, name="ofactl", title="ofactl command-line reference")
    note = ("<!-- generated by `python -m ofactl.cli_docs`; tests/test_cli.py checks it is current -->\n\n")
    return note + docs.strip() + "\n"


def _one_line_warnings() -> None:
    """Library warnings (torch's included) as one line on stderr, like every other note, instead
    of a multi-line block with a source line in front of an error message."""
    import warnings

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        first = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        err_console.print(f"[yellow]warning:[/yellow] {escape(first)}", highlight=False, markup=True)

    warnings.showwarning = show


def _run_app(args: list[str]) -> Any:
    """The command's return value; a stop by signal and click's usage errors exit here."""
    try:
        return typer.main.get_command(app).main(args=args, prog_name="ofactl", standalone_mode=False)
    except KeyboardInterrupt as e:
        message, stop_code, _ = _stopped(e)
        err_console.print(f"[yellow]{message}[/yellow]")
        sys.exit(stop_code)
    except Exception as e:
        # click's usage errors (typer may ship its own copy of click, so matched by interface)
        code = getattr(e, "exit_code", None)
        if not (hasattr(e, "show") and isinstance(code, int)):
            raise
        if "--json" in args:
            msg = e.format_message() if hasattr(e, "format_message") else str(e)
            _emit_json({"error": msg or "usage error", "exit_code": code, "kind": "usage"})
        e.show()
        sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """The console script. Usage errors (a missing or unknown option) are click's; under
    ``--json`` they also print a JSON error document on stdout, like every other failure."""
    from ofactl.progress import stop_signals_as_interrupt

    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" not in args:
        _one_line_warnings()
    with stop_signals_as_interrupt():
        rv = _run_app(args)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
