"""The open choices of the method side by side, and OFA against fixed-rate students, in miniature.

    python benchmarks/ablation.py [--teacher TEACHER] [--seeds 0,1] [--out runs/ablation]
                                  [--variants all] [--tasks pr,ks,sid,ks-fsdd] [--rates 1,0.5,0.33,0.25]

Every student is distill-tiny-sized and distilled from ``--teacher`` on synth-tiny (made if
absent). ``pr``, ``ks`` and ``sid`` run on synth-tiny; ``ks-fsdd`` is keyword spotting on real
recorded digits (FSDD; one speaker-independent split for every seed, test speaker theo), since
synth-tiny's keywords are too easy to tell variants apart; ``sid-large`` (not in the default
tasks) is speaker ID on synth-tiny's 24 voices reading 200 sentences each, 552 test utterances
instead of 120 (made under ``--out`` once); ``sid-fsdd`` (not in the default tasks either) is
speaker ID on FSDD's six recorded speakers. Each variant changes one setting of
the default recipe (see VARIANTS); every variant is distilled once per seed and swept on every
task at every rate (exact lengths), and the default recipe also with content-adaptive lengths.
``adapt`` then learns each task's rate with the pathwise and the finite-difference lambda
gradient. Every unit of work (a student, a sweep, an adapt run) is kept under ``--out`` and
reused, so a killed run continues where it stopped; a run of some variants, seeds or tasks adds
them to the report already in ``--out``; ``--report`` trains nothing and writes the report of what
it names from what has finished.

Prints one JSON document: per variant, task and rate the metric of each seed, their mean and
spread; OFA against the fixed-rate students at their own rates; the smoothness of each curve;
and adapt's learned rates against the sweep's best rate. Written to ``OUT/ablation.json`` too,
with the tables as markdown (``OUT/ablation.md``) and metric-vs-compute figures per task
(``OUT/ofa-vs-fixed-TASK.png``: the paper's comparison; ``OUT/frontends-TASK.png``). ``pr``'s
probe is a convolutional CTC head (``--pr-head``); with ``--pr-head linear`` or ``lstm`` the pr
units and the report (``OUT/ablation-pr-HEAD.*``) carry the head's name. ``--probe-runs N``
trains N probes per rate and reports their mean (sweeps and report named ``*-probesN``; adapt
runs are reused and compared with those sweeps).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import FSDD, default_teacher, emit, machine

from ofactl.adapt import AdaptConfig, RateCost, compare_with_sweep, run_adapt
from ofactl.atomic import write_text
from ofactl.choices import CtcHead, Task
from ofactl.config import Flag, load_config, parse_numbers, to_dict
from ofactl.distill import DistillConfig, run_distill, teacher_derived, with_fixed_rate
from ofactl.errors import CheckpointError, FolderBusy
from ofactl.probe import ProbeConfig
from ofactl.sweep import SweepConfig, SweepRow, load_rows, plot_tradeoff, run_sweep
from ofactl.training import changed_settings, saved_settings

# name -> (--set overrides on distill-tiny, fixed rate or None). "ofactl" is the default recipe.
VARIANTS: dict[str, tuple[list[str], float | None]] = {
    "ofactl": ([], None),
    "period-utt-noexact": (["rates.exact_fraction=0"], None),
    "lambda-batch": (["rates.kind=lambda", "rates.draw=batch", "rates.exact_fraction=0"], None),  # the reference's
    "lambda-batch-exact": (["rates.kind=lambda", "rates.draw=batch", "rates.exact_fraction=0.5"], None),
    "upsample": (["alignment=upsample"], None),
    "upsample-detached": (["alignment=upsample", "upsample_alpha_grad=false"], None),  # the loss reaches alpha only as with compress
    "compress-audio": (["compress_weight=audio"], None),  # compressed targets, every second of audio alike
    "full-0.25": (["rates.full_fraction=0.25"], None),  # a quarter of the utterances at rate 1 (the 20 ms model)
    # The two recipes that met the fixed-rate target, together (docs/ablation.md, "Both together")
    "upsample-detached-full": (["alignment=upsample", "upsample_alpha_grad=false", "rates.full_fraction=0.25"], None),
    # Half of each: compress's loss (which keeps real keywords) plus upsample-detached's (which keeps
    # phonemes at 60-80 ms); docs/ablation.md, "Half of each"
    "both-detached": (["alignment=both", "upsample_alpha_grad=false"], None),
    # Periods up to 120 ms (rates down to 0.167): 80 ms (rate 0.25) inside the drawn range rather than
    # near its 90 ms edge; docs/ablation.md, "A wider range"
    "period-120": (["rates.max_ms=120"], None),
    # upsample-detached for the teacher heads, compress for the log-mel head: averaged log-mel frames keep
    # an utterance's spectral statistics; docs/ablation.md, "Each head its own alignment"
    "upsample-detached-mel-compress": (["alignment=upsample", "upsample_alpha_grad=false",
                                        "spectral_alignment=compress"], None),
    # Pseudo-phone length: penalty 1 gives 110 ms segments on synth-tiny against the default's 256 ms
    # (benchmarks/boundaries.py; the phones' mean is 91 ms); phone-times is the oracle's upper bound.
    "seg-penalty-1": (["guidance.seg_penalty=1"], None),
    "phone-times": (["guidance.boundaries=phone_times"], None),
    "duration-embed": (["student.duration_embed=true"], None),  # each CIF frame also says how long it lasts
    "fixed-1": (["student.compressor=none", "rates.kind=fixed", "rates.rate=1"], 1.0),  # no compressor: a 20 ms student, as DistilHuBERT's
    "avgpool-0.5": (["student.compressor=avgpool"], 0.5),
    "avgpool-0.25": (["student.compressor=avgpool"], 0.25),
    "cif-fixed-0.5": ([], 0.5),
    "cif-fixed-0.25": ([], 0.25),
    "no-mel": (["student.spectral_bins=0"], None),  # no log-mel head: the teacher's states alone (docs/models.md)
    # The light front ends: trained from scratch (no part of the tiny teacher fits them).
    "cnn-thin": (["student.frontend=cnn-thin"], None),
    "fbank": (["student.frontend=fbank"], None),
}
FRONT_ENDS = ("cnn-thin", "fbank")
PR_HEAD = "conv"  # the CTC head of pr: a linear head reads one frame at a time and favours coarser frames


def fixed_rate(name: str) -> float | None:
    """The one rate a variant's students are trained at (None: once-for-all)."""
    return VARIANTS[name][1] if name in VARIANTS else None


def distill_student(name: str, seed: int, args: argparse.Namespace, corpus: Path) -> Path:
    """The student of one variant and seed (reused when its run finished)."""
    run = student_dir(args, name, seed)
    overrides, fixed = VARIANTS[name]
    flags = [Flag("teacher", "--teacher", args.teacher), Flag("seed", "--seed", seed),
             Flag("steps", "--steps", args.steps), Flag("device", "--device", args.device)]
    cfg = load_config(DistillConfig, "distill", args.preset, [*args.set_, *overrides], flags)
    if fixed is not None:
        cfg = with_fixed_rate(cfg, fixed)
    if (run / "student.pt").is_file():
        return same_recipe(run, cfg) / "student.pt"
    resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step-*.pt"))
    return run_distill(cfg, corpus, run, resume=resume, overwrite=not resume).student


def student_dir(args: argparse.Namespace, name: str, seed: int) -> Path:
    """The distill run folder of one variant's student and seed."""
    return Path(args.out) / "students" / f"{name}-s{seed}"


def kept_settings(run: Path, section: str) -> dict[str, Any]:
    """The settings a kept run recorded; exit naming the file when they cannot be read."""
    try:
        return saved_settings(run, section)
    except CheckpointError as e:
        sys.exit(f"ablation: {run} was kept, but its settings cannot be checked ({e}); move it away or use another --out")


def with_teacher_derived(cfg: DistillConfig, saved_student: dict[str, Any]) -> DistillConfig:
    """``cfg`` as distill resolved it for a kept run: the settings distill derives from its
    teacher (:func:`ofactl.distill.teacher_derived`), with the teacher's width and waveform
    normalisation read from the run's record (a changed teacher shows in ``teacher``)."""
    normalised = bool(saved_student.get("arch", {}).get("normalize_waveform"))
    return replace(cfg, student=teacher_derived(cfg.student, saved_student.get("teacher_dim", 0), normalised))


def same_recipe(run: Path, cfg: DistillConfig) -> Path:
    """``run`` when its finished student was distilled with ``cfg``'s settings; otherwise exit
    naming what differs (a variant's meaning or a preset changed since): a student of another
    recipe is never scored under this one's name."""
    saved = kept_settings(run, "distill")
    diff = changed_settings(saved, with_teacher_derived(cfg, saved.get("student", {})))
    if diff:
        sys.exit(f"{run} holds a student of other settings than this variant's ({diff}); "
                 "move it away or use another --out")
    return run


# Tasks of the ablation beyond ofactl's own, each an ofactl task on another corpus (task_corpus).
EXTRA_TASKS = ("ks-fsdd", "sid-large", "sid-fsdd")
# The extra tasks on FSDD's recordings, left out (and said so) where --fsdd is not a folder.
FSDD_TASKS = ("ks-fsdd", "sid-fsdd")

# synth-tiny's voices with more to say: speaker ID's test split on synth-tiny has 120 utterances,
# a binomial standard error of about 4 points (docs/ablation.md, "Speaker ID on more utterances")
SID_LARGE = ("sentences_per_speaker=200", "n_sentences=1500")


def task_corpus(task: str, args: argparse.Namespace, corpus: Path) -> tuple[Task, str | Path]:
    """The ofactl task and corpus of an ablation task: ``ks-fsdd`` is keyword spotting on real
    recorded digits (FSDD, whole speakers held out), ``sid-fsdd`` speaker ID on the same
    recordings, ``sid-large`` speaker ID on the larger corpus of synth-tiny's voices
    (``sid_large_manifest``); the rest run on synth-tiny."""
    if task in FSDD_TASKS:
        return cast(Task, task.removesuffix("-fsdd")), fsdd_manifest(args, task)
    if task == "sid-large":
        return "sid", sid_large_manifest(args)
    return cast(Task, task), corpus  # the other ablation tasks are ofactl's own (--tasks is checked)


def sid_large_manifest(args: argparse.Namespace) -> Path:
    """synth-tiny's settings (seed, 24 voices, keywords) with 200 sentences per speaker from a
    pool of 1,500: 5,520 utterances, so speaker ID's per-speaker 80/10/10 split tests on 552.
    Made under ``--out`` once."""
    return synth_manifest(Path(args.out) / "synth-sid-large", SID_LARGE)


# How often a run waits on a corpus that another ablation run is making or checking (seconds)
BUSY_POLL_S = 5.0


@functools.cache
def synth_manifest(folder: Path, overrides: tuple[str, ...] = ()) -> Path:
    """The manifest of synth-tiny (with ``overrides``) in ``folder``: made if absent, and checked
    by ``run_synth`` once per run (its reuse reads every recording's header), not per student.
    Runs side by side share the folder: one that finds it locked by another waits its turn."""
    from ofactl.synth import SynthConfig, run_synth

    cfg = load_config(SynthConfig, "synth", "synth-tiny", list(overrides))
    said = False
    while True:
        try:
            return run_synth(cfg, folder).manifest
        except FolderBusy as e:
            if not said:
                print(f"waiting: {e}", file=sys.stderr)
                said = True
            time.sleep(BUSY_POLL_S)


def fsdd_manifest(args: argparse.Namespace, task: str = "ks-fsdd") -> Path:
    """FSDD as a manifest for ``ks-fsdd`` or ``sid-fsdd``. For keywords, one fixed
    speaker-independent split, the probe's seed-0 split (test speaker theo, dev lucas: both held
    out of the bundled teacher's pretraining), so that every seed and variant is tested on the same
    speaker; the seeds vary the student and the probe. Speaker ID has no split column: ofactl's sid
    splits each speaker's recordings 80/10/10 by the probe's seed (300 test utterances)."""
    from ofactl.audio import read_corpus
    from ofactl.probe import build_task

    path = Path(args.out) / f"fsdd-{task.removesuffix('-fsdd')}.tsv"
    if path.is_file():
        return path
    corpus = read_corpus(f"{args.fsdd}::{{label}}_{{speaker}}_{{take}}")
    header = ["id", "path", "label", "speaker"]
    rows = [[u.id, str(Path(u.path).resolve()), u.labels["label"], u.labels["speaker"]] for u in corpus]
    if task == "ks-fsdd":
        split_of = {u: s for s, ids in build_task("ks", corpus, seed=0).splits.items() for u in ids}
        header, rows = [*header, "split"], [[*r, split_of[r[0]]] for r in rows if r[0] in split_of]
    return write_text(path, "".join("\t".join(r) + "\n" for r in (header, *rows)))


def unit(task: str, args: argparse.Namespace) -> str:
    """How a task's sweeps, adapt runs and figures are named: ``pr`` carries its CTC head unless
    it is linear (the head of the first measurements), so each head's results are kept."""
    return f"{task}-{args.pr_head}" if task == "pr" and args.pr_head != "linear" else task


def report_stem(args: argparse.Namespace) -> str:
    """``ablation`` for the default ``--pr-head`` and adapt settings; otherwise the head and the
    ``--adapt-set`` are in the report's name."""
    probes = f"-probes{args.probe_runs}" if args.probe_runs > 1 else ""
    return ("ablation" if args.pr_head == PR_HEAD else f"ablation-pr-{args.pr_head}") + adapt_suffix(args) + probes


# Every table in docs/ablation.md was measured with CTC probes on plain random batches, before
# length buckets became the probe default: new seeds and variants stay comparable with them.
ABLATION_SORT_POOL = 1


def sweep_dir(args: argparse.Namespace, name: str, seed: int, task: str, adaptive: bool = False,
              probe_runs: int | None = None) -> Path:
    """The folder of one student's sweep of one ablation task (``ks-fsdd`` included); sweeps with
    several probes per rate (``--probe-runs``) are kept beside the one-probe sweeps."""
    runs = args.probe_runs if probe_runs is None else probe_runs
    more = f"-probes{runs}" if runs > 1 else ""
    return Path(args.out) / "sweeps" / f"{name}-s{seed}{'-adaptive' if adaptive else ''}-{unit(task, args)}{more}"


def sweep_student(name: str, seed: int, ckpt: Path, task: str, args: argparse.Namespace, corpus: Path,
                  adaptive: bool = False) -> list[SweepRow]:
    """One student's rows for ``task`` (rows are cached by ``run_sweep`` itself)."""
    ofactl_task, corpus_of_task = task_corpus(task, args, corpus)
    cfg = SweepConfig(task=ofactl_task, rates=tuple(args.rates), seed=seed, device=args.device,
                      probe_runs=args.probe_runs, probe=ProbeConfig(ctc_head=args.pr_head, epochs=args.probe_epochs, cls_epochs=args.probe_epochs,
                                        sort_pool=ABLATION_SORT_POOL))
    cfg.extract = replace(cfg.extract, num_workers=0, adaptive_length=adaptive)
    label = f"{name}-s{seed}" + ("-adaptive" if adaptive else "")
    # more probes read the features the one-probe sweep extracted (its store is only read when it covers them)
    store = sweep_dir(args, name, seed, task, adaptive, probe_runs=1) / f"feats-{label}.zarr"
    return run_sweep(cfg, [(label, ckpt)], corpus_of_task, sweep_dir(args, name, seed, task, adaptive),
                     store if args.probe_runs > 1 and store.is_dir() else None).rows


def adapt_student(ckpt: Path, task: str, grad: str, seed: int, args: argparse.Namespace, corpus: Path,
                  sweep: Path) -> dict[str, Any] | None:
    """Learned rate and test metric of one adapt run, compared with ``sweep`` (reused when done;
    None with ``--report`` when it has not run). Runs on another variant than the default carry
    its name."""
    out = adapt_dir(task, grad, seed, args)
    done = (out / "summary.json").is_file()
    if args.report:
        return json.loads((out / "summary.json").read_text()) if done else None
    ofactl_task, corpus_of_task = task_corpus(task, args, corpus)
    cfg = load_config(AdaptConfig, "adapt", None, args.adapt_set, [
        Flag("task", "--tasks", ofactl_task), Flag("lambda_grad", "--adapt", grad), Flag("seed", "--seeds", seed),
        Flag("device", "--device", args.device)])
    cfg.probe = replace(cfg.probe, ctc_head=args.pr_head, sort_pool=ABLATION_SORT_POOL)
    if done:  # reused only when it ran with these settings (a default may have changed since)
        differ = adapt_differences(out, cfg)
        if differ:
            sys.exit(f"ablation: {out} ran with other adapt settings ({', '.join(differ)}); move it away or "
                     "name the settings it ran with in --adapt-set")
        return json.loads((out / "summary.json").read_text())
    return run_adapt(cfg, ckpt, corpus_of_task, out, sweep if sweep.is_dir() else None).to_json()


# adapt settings added after runs had been kept, with the value those runs ran with (which a
# later default need not keep)
ADAPT_SETTINGS_BEFORE: dict[str, Any] = {"band_edges": "clamp"}


def adapt_differences(run: Path, cfg: AdaptConfig) -> list[str]:
    """The settings in which the kept adapt ``run`` differs from ``cfg``. A setting added since
    the run was kept reads as the value runs had before it (``ADAPT_SETTINGS_BEFORE``), else as
    its default."""
    saved = {**to_dict(AdaptConfig()), **ADAPT_SETTINGS_BEFORE, **kept_settings(run, "adapt")}
    asked = to_dict(cfg)
    return sorted(k for k in saved.keys() | asked.keys() if saved.get(k) != asked.get(k))


def adapt_dir(task: str, grad: str, seed: int, args: argparse.Namespace) -> Path:
    """The folder of one adapt run; runs on another variant than the default carry its name."""
    variant = "" if args.adapt_variant == "ofactl" else f"{args.adapt_variant}-"
    return Path(args.out) / "adapt" / f"{variant}{unit(task, args)}-{grad}{adapt_suffix(args)}-s{seed}"


def adapt_suffix(args: argparse.Namespace) -> str:
    """``--adapt-set`` in an adapt run's folder name (``-cost_form-linear``), so each setting's runs are kept."""
    return "".join("-" + kv.replace("=", "-") for kv in args.adapt_set)


def _compare_again(doc: dict[str, Any], task: str, sweep: Path, args: argparse.Namespace, corpus: Path) -> dict[str, Any]:
    """An adapt run's comparison with its sweep, recomputed by ``compare_with_sweep`` with the run's cost."""
    from ofactl.audio import read_corpus
    from ofactl.probe import build_task

    ofactl_task, corpus_of_task = task_corpus(task, args, corpus)
    # the comparison reads only the metric's direction and the test split's size, alike for every seed
    data = build_task(ofactl_task, read_corpus(corpus_of_task), None, 0)
    return compare_with_sweep(sweep, data, doc["learned_rate"], doc["test"], doc["wall_seconds"],
                              RateCost(doc["cost"], doc.get("cost_form", "log2")))


LOWER_IS_BETTER = ("per", "wer", "cer")


Curves = dict[str, dict[str, dict[int, list[SweepRow]]]]  # variant -> task -> seed -> rows


def summarise(curves: Curves, seeds: list[int]) -> dict[str, Any]:
    """Mean and spread per variant, task and rate; OFA against fixed students; smoothness."""
    table: dict[str, Any] = {}
    for name, by_task in curves.items():
        for task, by_seed in by_task.items():
            rows = [row for s in seeds for row in by_seed.get(s, [])]
            seed_of = {id(row): s for s in seeds for row in by_seed.get(s, [])}
            cells = {}
            for r, same in _by_rate(rows).items():
                vals = [row.test for row in same]
                cells[f"{r:g}"] = {"mean": round(statistics.fmean(vals), 4), "spread": round(max(vals) - min(vals), 4),
                                   "seeds": vals, "by_seed": {str(seed_of[id(row)]): row.test for row in same},
                                   "achieved": round(statistics.fmean(x.achieved_rate for x in same), 4),
                                   "gmacs": round(statistics.fmean(x.upstream_gmacs_per_s for x in same), 5)}
            table.setdefault(name, {})[task] = {"metric": rows[0].metric if rows else "", "rates": cells}
    verdicts = _against_default(table)
    # the default, the recipes of the OFA-vs-fixed figure, and every recipe that beats the default
    # (a front end is not a recipe: the fixed students share the default's front end)
    drawn = [n for n in FIGURES["ofa-vs-fixed"] if fixed_rate(n) is None]
    ofas = list(dict.fromkeys(drawn + [n for n, v in verdicts.items() if v["wins"] and n not in FRONT_ENDS]))
    return {"table": table, "ofa_vs_fixed": {n: _ofa_vs_fixed(table, n) for n in ofas}, "not_smooth": _bumps(table),
            "against_default": verdicts}


def _against_default(table: dict[str, Any], default: str = "ofactl") -> dict[str, Any]:
    """Per once-for-all variant and task, the rates where it beats the default recipe (or loses
    to it) by more than either one's seed spread. A variant *wins* when it beats the default at
    two or more rates on two or more tasks and loses at none: the rule the defaults follow."""
    out: dict[str, Any] = {}
    base = table.get(default, {})
    for name, by_task in table.items():
        if name == default or fixed_rate(name) is not None:
            continue
        tasks: dict[str, Any] = {}
        for task, cur in by_task.items():
            ref, sign = base.get(task, {}).get("rates", {}), (1 if cur["metric"] in LOWER_IS_BETTER else -1)
            better: list[str] = []
            worse: list[str] = []
            for r, cell in cur["rates"].items():
                if r in ref:
                    gain, noise = sign * (ref[r]["mean"] - cell["mean"]), max(cell["spread"], ref[r]["spread"])
                    (better if gain > noise else worse if -gain > noise else []).append(r)
            tasks[task] = {"better_at": better, "worse_at": worse}
        wins = sum(len(t["better_at"]) >= 2 for t in tasks.values()) >= 2 and not any(t["worse_at"] for t in tasks.values())
        paired = _paired(by_task, base)
        wins_paired = (sum(len(t["better_at"]) >= 2 for t in paired.values()) >= 2
                       and not any(t["worse_at"] for t in paired.values()))
        out[name] = {"tasks": tasks, "wins": wins, "paired": paired, "wins_paired": wins_paired}
    return out


# The paired rule needs this many seeds shared with the default: all of them on one side is then a
# one-sided sign test at p = 1/32 or below.
PAIRED_MIN_SEEDS = 5


def _paired(by_task: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Per task, seed by seed against the default (same seed, same probe seed): the rates where the
    variant is better on every one of at least PAIRED_MIN_SEEDS shared seeds, or worse on every one,
    and the count of better / worse seeds at each rate. Added after the spread rule: the range of
    seeds widens as seeds are added, so five seeds can hide a difference every seed agrees on."""
    out: dict[str, Any] = {}
    for task, cur in by_task.items():
        ref, sign = base.get(task, {}).get("rates", {}), (1 if cur["metric"] in LOWER_IS_BETTER else -1)
        better: list[str] = []
        worse: list[str] = []
        counts: dict[str, dict[str, int]] = {}
        for r, cell in cur["rates"].items():
            mine, theirs = cell.get("by_seed", {}), ref.get(r, {}).get("by_seed", {})
            shared = sorted(set(mine) & set(theirs))
            gains = [sign * (theirs[s] - mine[s]) for s in shared]
            up, down = sum(g > 0 for g in gains), sum(g < 0 for g in gains)
            counts[r] = {"seeds": len(shared), "better": up, "worse": down}
            if len(shared) >= PAIRED_MIN_SEEDS:
                (better if up == len(shared) else worse if down == len(shared) else []).append(r)
        out[task] = {"better_at": better, "worse_at": worse, "counts": counts}
    return out


def _by_rate(rows: list[SweepRow]) -> dict[float, list[SweepRow]]:
    """The rows of each requested rate, highest rate first."""
    return {r: [row for row in rows if row.requested_rate == r]
            for r in sorted({row.requested_rate for row in rows}, reverse=True)}


def mean_rows(curves: Curves, name: str, task: str, seeds: list[int]) -> list[SweepRow]:
    """One row per rate for ``name`` on ``task``: the seeds' mean metric, compute and period."""
    rows = [row for s in seeds for row in curves.get(name, {}).get(task, {}).get(s, [])]
    out = []
    for same in _by_rate(rows).values():
        out.append(replace(same[0], label=name, test=statistics.fmean(x.test for x in same),
                           frame_period_ms=statistics.fmean(x.frame_period_ms for x in same),
                           upstream_gmacs_per_s=statistics.fmean(x.upstream_gmacs_per_s for x in same)))
    return out


# The figures: OFA against the fixed-rate students (the paper's comparison), and the front ends.
FIGURES = {"ofa-vs-fixed": ["ofactl", "upsample", "upsample-detached", "full-0.25", "upsample-detached-full",
                            "both-detached", "period-120", "upsample-detached-mel-compress", "compress-audio", "fixed-1", "avgpool-0.5", "avgpool-0.25", "cif-fixed-0.5", "cif-fixed-0.25"],
           "frontends": ["ofactl", "cnn-thin", "fbank"]}


def figures(curves: Curves, tasks: list[str], seeds: list[int], args: argparse.Namespace) -> list[str]:
    """Metric vs compute per task for each group of FIGURES (seed means); the files written."""
    written = []
    for fig, names in FIGURES.items():
        for task in tasks:
            rows = [row for n in names for row in mean_rows(curves, n, task, seeds)]
            if len({r.label for r in rows}) < 2:
                continue  # nothing to compare; a run of one variant leaves the full figure as it is
            path = plot_tradeoff(rows, figure_path(args, fig, task), f"{unit(task, args)}: {fig} (mean of seeds {seeds})")
            if path is not None:
                written.append(str(path))
    return written


def figure_path(args: argparse.Namespace, fig: str, task: str) -> Path:
    """Where one figure goes; those of several probes per rate are kept beside the one-probe ones."""
    more = f"-probes{args.probe_runs}" if args.probe_runs > 1 else ""
    return Path(args.out) / f"{fig}-{unit(task, args)}{more}.png"


def markdown(doc: dict[str, Any]) -> str:
    """The table of ``doc`` (summarise's output) per task: variants by rate, mean (seed spread)."""
    lines = [f"`pr`'s probe: a {doc.get('pr_head', 'linear')} CTC head over the weighted layer sum.", ""]
    tasks = list(dict.fromkeys(t for by_task in doc["table"].values() for t in by_task))
    rates = [f"{r:g}" for r in doc["rates"]]
    for task in tasks:
        metric = next(v[task]["metric"] for v in doc["table"].values() if task in v)
        lines += [f"**{task}** (test {metric}: the mean over seeds, the spread max - min in brackets)", "",
                  "| variant | seeds | " + " | ".join(f"rate {r}" for r in rates) + " |",
                  "|---|---|" + "---|" * len(rates)]
        for name, by_task in doc["table"].items():
            cells = by_task.get(task, {}).get("rates", {})
            if not cells:
                continue  # not measured on this task
            seeds = max(len(c["seeds"]) for c in cells.values())
            lines.append(f"| {name} | {seeds} | " + " | ".join(
                f"{cells[r]['mean']:.3f} ({cells[r]['spread']:.3f})" if r in cells else "-" for r in rates) + " |")
        lines.append("")
    lines.pop()  # each section below opens with its own blank line
    lines += _against_default_markdown(doc, tasks, rates) + _ofa_vs_fixed_markdown(doc)
    adapt_lines = _adapt_markdown(doc.get("adapt", {}), doc.get("adapt_variant", "ofactl"), doc.get("adapt_set"))
    return "\n".join(lines + adapt_lines + _target_markdown(doc.get("second_target", {}))) + "\n"


def _against_default_markdown(doc: dict[str, Any], tasks: list[str], rates: list[str]) -> list[str]:
    """Each variant against the default recipe, by the spread and seed by seed; nothing for a
    report of the default alone."""
    if not doc["against_default"]:
        return []
    lines = ["", "**Against the default recipe** (rates where a variant is better or worse than `ofactl` by more "
             "than either one's seed spread; it wins with two or more better rates on two or more tasks and "
             "no worse rate)", "", "| variant | " + " | ".join(tasks) + " | wins |", "|---|" + "---|" * (len(tasks) + 1)]
    for name, v in doc["against_default"].items():
        cells = [v["tasks"].get(t) for t in tasks]
        lines.append(f"| {name} | " + " | ".join(
            "-" if c is None else f"better {','.join(c['better_at']) or '-'}; worse {','.join(c['worse_at']) or '-'}"
            for c in cells) + f" | {'yes' if v['wins'] else 'no'} |")
    lines += ["", f"**Seed by seed against the default** (at each rate: seeds where the variant is better / worse "
              f"than `ofactl` with the same seed; a rate counts when all of at least {PAIRED_MIN_SEEDS} seeds agree; "
              "it wins, as by the spread rule, with two or more counted better rates on two or more tasks and no counted "
              "worse rate)", "",
              "| variant | " + " | ".join(tasks) + " | wins |", "|---|" + "---|" * (len(tasks) + 1)]
    for name, v in doc["against_default"].items():
        cells = [v.get("paired", {}).get(t) for t in tasks]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else _paired_cell(c, rates) for c in cells)
                     + f" | {'yes' if v.get('wins_paired') else 'no'} |")
    return lines


def _ofa_vs_fixed_markdown(doc: dict[str, Any]) -> list[str]:
    """Each once-for-all recipe against the fixed-rate students at their own rates; nothing for a
    report without fixed-rate students."""
    if not any(rows for by_task in doc["ofa_vs_fixed"].values() for rows in by_task.values()):
        return []
    lines = ["", "**Once-for-all against the fixed-rate students at their own rates** (OFA minus fixed)", "",
             "| OFA recipe | task | fixed student | rate | fixed | OFA | OFA - fixed |", "|---|---|---|---|---|---|---|"]
    for ofa, by_task in doc["ofa_vs_fixed"].items():
        for task, rows in by_task.items():
            for name, r in rows.items():
                lines.append(f"| {ofa} | {task} ({r['metric']}) | {name} | {r['rate']:g} | {r['fixed']:.3f} | "
                             f"{r['ofa']:.3f} | {r['ofa_minus_fixed']:+.3f} |")
    return lines


def _paired_cell(c: dict[str, Any], rates: list[str]) -> str:
    """``1: 3/1 of 5, 0.5: ...`` with the counted rates in bold."""
    parts = []
    for r in rates:
        n = c["counts"].get(r)
        if n:
            text = f"{r}: {n['better']}/{n['worse']} of {n['seeds']}"
            parts.append(f"**{text}**" if r in c["better_at"] + c["worse_at"] else text)
    return ", ".join(parts) or "-"


def _adapt_markdown(adapt: dict[str, Any], variant: str = "ofactl", adapt_set: list[str] | None = None) -> list[str]:
    """adapt's learned rates per task, gradient and seed, against each seed's sweep."""
    settings = ", ".join(f"`{kv}`" for kv in adapt_set or []) or "default settings"
    lines = ["", f"**adapt** on the `{variant}` students ({settings}; per seed: learned "
             "rate, and the sweep's metric there minus its best, interpolated)", "",
             "| task | lambda gradient | learned rate | test metric | sweep at learned - best | in near-flat region "
             "| objective at learned - lowest (its rate) | grid search on dev: rate (in region) | adapt s | sweep probe s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for task, by_grad in adapt.items():
        for grad, runs in by_grad.items():
            if not runs:
                continue
            comp = [r.get("comparison") or {} for r in runs]
            gap = ["-" if not c else f"{abs(c['sweep_at_learned_rate'] - c['best_sweep_metric']):.3f}" for c in comp]
            cols = [[f"{r['learned_rate']:.3f}" for r in runs], [f"{r['test']:.3f}" for r in runs], gap,
                    [str(c.get("learned_rate_in_flat_region", "-")).lower() for c in comp],
                    [f"{c['objective_gap']:.3f} ({c['best_objective_rate']:.2f})" if "objective_gap" in c else "-"
                     for c in comp],
                    [f"{c['dev_choice_rate']:.2f} ({str(c['dev_choice_in_flat_region']).lower()})" if "dev_choice_rate" in c
                     else "-" for c in comp],
                    [f"{r['wall_seconds']:.0f}" for r in runs], [str(c.get("sweep_probe_seconds", "-")) for c in comp]]
            lines.append(f"| {task} | {grad} | " + " | ".join(" / ".join(c) for c in cols) + " |")
    return lines


def _target_markdown(target: dict[str, Any]) -> list[str]:
    """The second target per lambda gradient: a row per task and seed, then the tasks it holds for."""
    lines: list[str] = []
    for grad, t in target.items():
        below = ", ".join(f"`{name}`" for name in t["tasks"] if name in BELOW_PR) or "the tasks it orders (none here)"
        lines += ["", f"**adapt against the second target** (`{grad}`: `pr` settles at a higher rate than each "
                  f"of {below}, and each learned rate lies where its sweep is within "
                  "the cost of its best; the test window: the swept rates where it would hold; the dev choice: a grid "
                  "search on dev with the same cost)", "", "| task | seed | learned rate | below the best (points) | below `pr` | met "
                  "| test window | dev choice |", "|---|---|---|---|---|---|---|---|"]
        for task, by_seed in t["tasks"].items():
            for seed, r in by_seed.items():
                window = ", ".join(f"{a:.2f}-{b:.2f}" for a, b in r["test_window"]) or "none"
                dev = "-" if r["dev_choice_rate"] is None else f"{r['dev_choice_rate']:.2f}"
                lines.append(f"| {task} | {seed} | {r['learned_rate']:.3f} | {100 * r['below_best']:.1f} | "
                             f"{str(r['below_pr']).lower() if task in BELOW_PR else '-'} | {'yes' if r['met'] else '**no**'} "
                             f"| {window} | {dev} |")
        held = [f"{task} {'yes' if ok else 'no'}" for task, ok in t["met_every_seed"].items()]
        lines += ["", "Met with every seed: " + ", ".join(held) + "."]
    return lines


def _ofa_vs_fixed(table: dict[str, Any], ofa: str = "ofactl") -> dict[str, Any]:
    """Per task and fixed student: the OFA variant's metric at the fixed student's rate minus its own."""
    out: dict[str, Any] = {}
    for name, by_task in table.items():
        fixed_at = fixed_rate(name)
        if fixed_at is None or ofa not in table:
            continue
        rate = f"{fixed_at:g}"
        for task, cur in by_task.items():
            cell = table[ofa].get(task, {}).get("rates", {}).get(rate)
            if cell and rate in cur["rates"]:
                fixed = cur["rates"][rate]["mean"]
                out.setdefault(task, {})[name] = {"rate": float(rate), "metric": cur["metric"], "fixed": fixed,
                                                  "ofa": cell["mean"], "ofa_minus_fixed": round(cell["mean"] - fixed, 4)}
    return out


def _bumps(table: dict[str, Any]) -> dict[str, Any]:
    """Per curve, the rates whose mean is worse than both neighbours' by more than its seed spread."""
    out: dict[str, Any] = {}
    for name, by_task in table.items():
        for task, cur in by_task.items():
            cells, sign = cur["rates"], (1 if cur["metric"] in LOWER_IS_BETTER else -1)
            keys = list(cells)
            bumps = [b for a, b, c in zip(keys, keys[1:], keys[2:])
                     if sign * (cells[b]["mean"] - cells[a]["mean"]) > cells[b]["spread"]
                     and sign * (cells[b]["mean"] - cells[c]["mean"]) > cells[b]["spread"]]
            out.setdefault(name, {})[task] = bumps
    return out


def adapt_results(tasks: list[str], grads: list[str], seeds: list[int], args: argparse.Namespace,
                  corpus: Path) -> dict[str, Any]:
    """adapt with each lambda gradient on the students of ``--adapt-variant``, beside each sweep's
    best rate."""
    out: dict[str, Any] = {}
    name = args.adapt_variant
    for task in tasks:
        for grad in grads:
            runs = []
            for s in seeds:
                ckpt = student_dir(args, name, s) / "student.pt"
                if not (ckpt.is_file() or args.report or (adapt_dir(task, grad, s, args) / "summary.json").is_file()):
                    ckpt = distill_student(name, s, args, corpus)  # gone while its sweeps were kept: see collect
                sweep = sweep_dir(args, name, s, task)
                doc = adapt_student(ckpt, task, grad, s, args, corpus, sweep)
                if doc is None:
                    continue
                comp = doc.get("comparison")
                if comp and sweep.is_dir() and ("dev_choice_rate" not in comp or args.probe_runs > 1):
                    # a run from before the fields, or one compared with the one-probe sweep: the learned
                    # rate stands, the yardstick is the sweep of this report
                    doc["comparison"] = _compare_again(doc, task, sweep, args, corpus)
                runs.append({"seed": s} | {k: doc.get(k) for k in ("learned_rate", "test", "metric", "cost",
                                                                     "wall_seconds", "comparison")})
            out.setdefault(task, {})[grad] = runs
    return out


# The tasks the second target (docs/ablation.md) orders below pr (ks and sid; sid-large is sid on
# more utterances, sid-fsdd on recorded speech); on the others (ks-fsdd) it asks for the cost alone.
BELOW_PR = ("ks", "sid", "sid-large", "sid-fsdd")


def second_target(adapt: dict[str, Any], pr: str = "pr") -> dict[str, Any]:
    """adapt against the ablation's second target, per lambda gradient: with every seed, ``pr``
    settles at a higher rate than each task of BELOW_PR, and each learned rate lies where its
    sweep (interpolated) is within the run's cost of its best. Per task and seed: the learned
    rate, the points below the best, whether the target holds, and the test window: the swept
    rates where it would hold, as ``[low, high]`` segments."""
    out: dict[str, Any] = {}
    for grad in sorted({g for by_grad in adapt.values() for g in by_grad}):
        pr_rate = {r["seed"]: r["learned_rate"] for r in adapt.get(pr, {}).get(grad, [])}
        tasks: dict[str, Any] = {}
        for task, by_grad in adapt.items():  # runs without a sweep to compare with cannot be read
            runs = [r for r in by_grad.get(grad, []) if r["comparison"] and (task not in BELOW_PR or r["seed"] in pr_rate)]
            if runs:
                tasks[task] = {str(r["seed"]): _target_run(r, pr_rate.get(r["seed"]) if task in BELOW_PR else None)
                               for r in runs}
        out[grad] = {"tasks": tasks, "met_every_seed": {t: all(v["met"] for v in by.values()) for t, by in tasks.items()}}
    return out


def _target_run(run: dict[str, Any], pr_rate: float | None) -> dict[str, Any]:
    """One adapt run against the second target; ``pr_rate`` None where the cost alone counts."""
    comp, cost = run["comparison"], run["cost"]
    xs, ys, best = comp["sweep_rates"], comp["sweep_metric"], comp["best_sweep_metric"]

    def within(y: Any) -> Any:  # the sweep's metric (a value or an array) within the cost of its best
        return np.abs(y - best) <= cost + 1e-9

    under_pr = pr_rate is None or run["learned_rate"] < pr_rate
    grid = np.linspace(xs[0], xs[-1], 401)
    ok = within(np.interp(grid, xs, ys)) & (grid < (pr_rate if pr_rate is not None else np.inf))
    return {"learned_rate": run["learned_rate"], "below_best": round(abs(comp["sweep_at_learned_rate"] - best), 4),
            "below_pr": under_pr, "met": bool(under_pr and within(comp["sweep_at_learned_rate"])),
            "test_window": _segments(grid, ok),
            "dev_choice_rate": comp.get("dev_choice_rate")}


def _segments(grid: np.ndarray, ok: np.ndarray) -> list[list[float]]:
    """The runs of True in ``ok`` as ``[first, last]`` values of ``grid``."""
    out: list[list[float]] = []
    for i in np.flatnonzero(ok):
        if out and i > 0 and ok[i - 1]:
            out[-1][1] = round(float(grid[i]), 3)
        else:
            out.append([round(float(grid[i]), 3)] * 2)
    return out


def parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=default_teacher(), help="default: the distill-tiny preset's teacher (%(default)s)")
    ap.add_argument("--preset", default="distill-tiny")
    ap.add_argument("--set", dest="set_", action="append", default=[], help="distill --set for every variant")
    ap.add_argument("--corpus", default=None, help="a synth-tiny folder (made under --out if absent)")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--tasks", default="pr,ks,sid,ks-fsdd", help="ks-fsdd, sid-fsdd: ks and speaker ID on FSDD (skipped without --fsdd); sid-large: "
                         "speaker ID on 552 test utterances of synth-tiny's voices")
    ap.add_argument("--fsdd", default=str(FSDD), help="the FSDD recordings folder")
    ap.add_argument("--rates", default="1,0.5,0.33,0.25")
    ap.add_argument("--steps", type=int, default=None, help="distill steps (default: the preset's)")
    ap.add_argument("--probe-epochs", type=int, default=40)
    ap.add_argument("--probe-runs", type=int, default=1,
                    help="probes per rate with successive seeds (sweep.probe_runs): rows report their mean; adapt "
                         "runs are compared with these sweeps (kept apart as *-probesN)")
    ap.add_argument("--pr-head", default=PR_HEAD, choices=get_args(CtcHead),
                    help="the CTC head of pr sweeps and adapt runs (conv: context for about twice a linear "
                         "head's time; linear favours 40 ms frames, docs/models.md)")
    ap.add_argument("--adapt", default="pathwise,difference", help="adapt gradients to compare ('' for none)")
    ap.add_argument("--adapt-set", action="append", default=[], metavar="KEY=VALUE",
                    help="an adapt setting for every adapt run (as adapt's --set); runs are kept apart by it")
    ap.add_argument("--adapt-variant", default="ofactl",
                    help="the once-for-all variant whose students adapt (one of --variants)")
    ap.add_argument("--no-adaptive-sweeps", action="store_true",
                    help="skip the default recipe's sweeps with content-adaptive lengths")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: write the report from the finished students, sweeps and adapt runs")
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    args.rates = list(parse_numbers([args.rates], "--rates"))
    names, seeds, tasks, skipped = asked(ap, args)
    if fixed_rate(args.adapt_variant) is not None or args.adapt_variant not in VARIANTS:
        ap.error(f"--adapt-variant: {args.adapt_variant!r} is not a once-for-all variant")
    grads = [g for g in args.adapt.split(",") if g] if args.adapt_variant in names else []
    t0 = time.perf_counter()
    corpus = _corpus(args)
    if not args.report:  # train what is asked, then report on it and on what the folder's report kept
        collect(names, seeds, tasks, args, corpus)
        adapt_results(tasks, grads, seeds, args, corpus)
        names, seeds, tasks, grads = kept_coverage(args, names, seeds, tasks, grads)
        args = argparse.Namespace(**{**vars(args), "report": True})
    out = report(args, names, seeds, tasks, grads, skipped, corpus)
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    # atomic: a run beside this one in the same --out reads the report to keep what it covers
    write_text(Path(args.out) / f"{report_stem(args)}.json", json.dumps(out, indent=2))
    write_text(Path(args.out) / f"{report_stem(args)}.md", markdown(out))
    emit(out)


def asked(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[int], list[str], list[str]]:
    """The variants, seeds and tasks a run asks for, and the tasks it cannot run (and why)."""
    seeds = [int(s) for s in args.seeds.split(",")]
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in EXTRA_TASKS and t not in get_args(Task)]
    if unknown:
        ap.error(f"--tasks: unknown {', '.join(unknown)}; expected one of {', '.join(EXTRA_TASKS + get_args(Task))}")
    skipped = []
    for task in [t for t in tasks if t in FSDD_TASKS and not Path(args.fsdd).is_dir()]:
        tasks.remove(task)
        skipped.append(f"{task}: no FSDD recordings at {args.fsdd}")
        print(f"ablation: skipping {task}, no FSDD recordings at {args.fsdd}", file=sys.stderr)
    return names, seeds, tasks, skipped


def kept_coverage(args: argparse.Namespace, names: list[str], seeds: list[int], tasks: list[str],
                  grads: list[str]) -> tuple[list[str], list[int], list[str], list[str]]:
    """This run's variants, seeds, tasks and adapt gradients with those the report in ``--out``
    (of the same name) already covers: a run of some of them adds to the folder's report instead
    of narrowing it. ``--report`` writes exactly what it names."""
    path = Path(args.out) / f"{report_stem(args)}.json"
    if not path.is_file():
        return names, seeds, tasks, grads
    try:
        doc = json.loads(path.read_text())
        old_names = [n for n in doc["variants"] if n in VARIANTS]
        old_seeds = [int(s) for s in doc["seeds"]]
        old_tasks = [t for t in doc.get("tasks") or dict.fromkeys(t for by in doc["table"].values() for t in by)
                     if (t in EXTRA_TASKS or t in get_args(Task)) and (t not in FSDD_TASKS or Path(args.fsdd).is_dir())]
        same_students = doc.get("adapt_variant", "ofactl") == args.adapt_variant
        old_grads = [g for by in doc.get("adapt", {}).values() for g in by] if same_students else []
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"ablation: {path} is unreadable ({type(e).__name__}: {e}); the new report covers this run only",
              file=sys.stderr)
        return names, seeds, tasks, grads
    wide = (list(dict.fromkeys([*old_names, *names])), sorted({*old_seeds, *seeds}),
            list(dict.fromkeys([*old_tasks, *tasks])), list(dict.fromkeys([*old_grads, *grads])))
    if wide != (names, seeds, tasks, grads):
        print(f"ablation: {path} also covered variants {','.join(wide[0])}, seeds {','.join(map(str, wide[1]))}, "
              f"tasks {','.join(wide[2])}: the new report keeps them (--report names a narrower one)", file=sys.stderr)
    return wide


def report(args: argparse.Namespace, names: list[str], seeds: list[int], tasks: list[str], grads: list[str],
           skipped: list[str], corpus: Path) -> dict[str, Any]:
    """The report's document from the finished students, sweeps and adapt runs (``args.report``)."""
    curves, missing = collect(names, seeds, tasks, args, corpus)
    out: dict[str, Any] = {"benchmark": "ablation", "teacher": args.teacher, "preset": args.preset, "set": args.set_,
                           "seeds": seeds, "tasks": tasks, "rates": args.rates, "pr_head": args.pr_head,
                           "variants": {n: VARIANTS[n][0] for n in names}, "adapt_variant": args.adapt_variant,
                           "adapt_set": args.adapt_set, "skipped": skipped, "missing": missing, "machine": machine()}
    out.update(summarise(curves, seeds))
    out["adapt"] = adapt_results(tasks, grads, seeds, args, corpus)
    out["second_target"] = second_target(out["adapt"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out["figures"] = figures(curves, tasks, seeds, args)
    return out


def collect(names: list[str], seeds: list[int], tasks: list[str], args: argparse.Namespace,
            corpus: Path) -> tuple[Curves, list[str]]:
    """Every variant's rows per task and seed, distilled and swept where not finished; with
    ``--report`` only finished sweeps are read and the missing ones listed."""
    curves: Curves = {}
    missing: list[str] = []
    for name in names:
        for seed in seeds:
            units = sweep_units(name, tasks, args)
            ckpt = None if args.report or swept_without_student(name, seed, units, args) \
                else distill_student(name, seed, args, corpus)
            for task, label, adaptive in units:
                done = sweep_dir(args, name, seed, task, adaptive) / "sweep.json"
                if ckpt is not None:
                    rows = sweep_student(name, seed, ckpt, task, args, corpus, adaptive=adaptive)
                elif done.is_file():
                    rows = load_rows(done)
                else:
                    missing.append(str(done.parent))
                    continue
                curves.setdefault(label, {}).setdefault(task, {})[seed] = rows
    return curves, missing


def sweep_units(name: str, tasks: list[str], args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(task, label in the tables, adaptive lengths) of every sweep of one variant's students: the
    default's students are also swept with content-adaptive lengths."""
    both = name == "ofactl" and not args.no_adaptive_sweeps
    return [(task, label, adaptive) for task in tasks
            for label, adaptive in ((name, False), ("ofactl-adaptive-length", True)) if both or not adaptive]


def swept_without_student(name: str, seed: int, units: list[tuple[str, str, bool]], args: argparse.Namespace) -> bool:
    """Every sweep of this student has finished but its checkpoint is gone (a new checkout that
    kept only the small result files: sweep.json, adapt's summary.json): its rows are read as
    they are, not distilled and swept again."""
    if (student_dir(args, name, seed) / "student.pt").is_file():
        return False  # kept: distill_student checks it is still this variant's recipe
    return all((sweep_dir(args, name, seed, task, adaptive) / "sweep.json").is_file() for task, _, adaptive in units)


def _corpus(args: argparse.Namespace) -> Path:
    """The manifest of ``--corpus``, or of a synth-tiny made under ``--out``."""
    if args.corpus:
        return Path(args.corpus) / "manifest.tsv" if Path(args.corpus).is_dir() else Path(args.corpus)
    return synth_manifest(Path(args.out) / "synth-tiny" if args.out else Path(tempfile.mkdtemp()) / "synth-tiny")


if __name__ == "__main__":
    main()
