"""Self-descriptions for ``ofactl info``: the environment, a checkpoint, a corpus, a feature store or a run."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from ofactl import __version__
from ofactl.config import run_settings
from ofactl.errors import OfactlError


def environment() -> dict[str, Any]:
    """Version, torch build, CUDA devices and bf16 support."""
    import torch

    doc: dict[str, Any] = {
        "ofactl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        doc["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        doc["cuda_bf16"] = bool(torch.cuda.is_bf16_supported())
    # CPU bf16 autocast always runs; it is only fast with native bf16 (AVX512-BF16 / AMX).
    doc["cpu_bf16_native"] = _cpu_has_native_bf16()
    return doc


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def describe_path(path: Path, verify: bool = False) -> dict[str, Any]:
    """Describe what ``path`` holds: a feature store, a student checkpoint, a teacher file, an audio
    file, a corpus (:func:`describe_corpus`), the folder of ``sweep``, ``adapt`` or ``quickstart``
    (what it measured), or the run folder of ``distill`` (its student.pt), ``pretrain`` (its
    teacher) or ``synth`` (while unfinished); ``verify`` checks a store's checksums (see
    :func:`ofactl.storage.describe_store`)."""
    from ofactl.model.teacher import PRETRAIN_TEACHER

    p = Path(path)
    if not p.exists():
        if str(path).startswith(("builtin:", "random:")):
            raise OfactlError(f"{path} is a teacher name, not a path: 'ofactl info --teacher {path}' describes it")
        raise OfactlError(f"{p}: no such file or folder")
    is_store = (p / "zarr.json").is_file() or p.suffix in (".zarr", ".h5", ".hdf5")
    if p.is_dir() and not is_store:  # a run folder: what it made, or how far it has got
        for made in ("student.pt", PRETRAIN_TEACHER):
            if (p / made).is_file():
                return describe_path(p / made, verify)
        found = (describe_result_folder(p) or describe_unfinished_run(p) or describe_unfinished_synth(p)
                 or _unfinished_quickstart(p))
        if found is not None:
            return found
        if _holds_audio(p):
            return describe_corpus(p)
        raise OfactlError(f"{p}: not a feature store (no zarr.json), nor the folder of sweep (sweep.json), "
                          f"adapt (summary.json), distill (student.pt) or pretrain ({PRETRAIN_TEACHER}), "
                          "nor a corpus (no audio files below it)")
    if is_store:
        from ofactl.storage import describe_store

        return describe_store(p, verify)
    if verify:
        from ofactl.errors import ConfigError

        raise ConfigError(f"--verify checks a feature store; {p} is not one")
    from ofactl.audio import AUDIO_SUFFIXES

    if p.suffix.lower() in AUDIO_SUFFIXES:
        return describe_audio(p)
    if p.suffix == ".safetensors":  # students are .pt; a .safetensors file is a teacher's weights
        return describe_teacher(str(p))
    if p.suffix.lower() in CORPUS_SUFFIXES:
        return describe_corpus(p)
    from ofactl.checkpoint import describe_checkpoint

    return describe_checkpoint(p)


def describe_result_folder(folder: Path) -> dict[str, Any] | None:
    """What a ``sweep`` folder measured (its sweep.json; the rows finished so far while it has not
    finished), what an ``adapt`` folder learned, or a ``quickstart`` folder's summary (their
    summary.json); None for any other folder."""
    if not any((folder / f).exists() for f in ("sweep.json", "summary.json", "rows")):
        return None
    from ofactl.sweep import read_row, rows_from_json  # torch and the probes: only for a folder that may be a sweep

    if (folder / "sweep.json").is_file():
        doc = _read_result(folder / "sweep.json", "sweep")
        rows_from_json(doc.get("rows", []), folder / "sweep.json")  # readable rows, or one error naming the file
        found = {"kind": "sweep", "task": doc.get("task"), "rows": doc.get("rows", []),
                 "not_scored": doc.get("not_scored", [])}
        later = _rows_measured_after(folder, found["rows"])
        if later:
            found["later_rows"] = (f"{later} row(s) in {folder / 'rows'} were measured after sweep.json was written: "
                                   "a sweep is running or was stopped in this folder; it rewrites sweep.json "
                                   "when it finishes")
        return _with_writer(found, folder)
    if (folder / "summary.json").is_file() and (folder / "quickstart.yaml").is_file():
        doc = _read_result(folder / "summary.json", "quickstart")
        missing = [k for k in ("rows", "adapt", "paths", "stage_seconds", "note") if k not in doc]
        if missing:
            raise OfactlError(f"{folder / 'summary.json'}: no {', '.join(missing)}; expected the summary that "
                              "'quickstart' writes: rerun it to write it whole")
        return {"kind": "quickstart", **doc}
    if (folder / "summary.json").is_file() and (folder / "rate.yaml").is_file():
        return {"kind": "adapt", **_read_result(folder / "summary.json", "adapt")}
    if (folder / "rows").is_dir() and run_settings(folder)[0] == "sweep":
        # a row cut short is measured again by the next run, as sweep itself does: left out
        rows = [row.to_json() for f in sorted((folder / "rows").glob("*.json")) if (row := read_row(f))]
        return _with_writer({"kind": "sweep, unfinished", "rows": rows,
                             "resume": "the same 'ofactl sweep' command goes on, reusing the rows finished"}, folder)
    return None


def _rows_measured_after(folder: Path, finished: list[Any]) -> int:
    """How many rows in ``folder/rows`` a later sweep measured: written after sweep.json and not
    among its rows (both, so a folder copied file by file does not look busy)."""
    import json

    from ofactl.sweep import read_row

    since = (folder / "sweep.json").stat().st_mtime_ns
    known = {json.dumps(r, sort_keys=True) for r in finished}
    later = 0
    for f in (folder / "rows").glob("*.json"):
        try:
            if f.stat().st_mtime_ns <= since:
                continue
        except OSError:  # gone: the running sweep is rewriting it
            continue
        row = read_row(f)  # None when cut short: the running sweep measures it again
        later += row is not None and json.dumps(row.to_json(), sort_keys=True) not in known
    return later


def _read_result(path: Path, command: str) -> dict[str, Any]:
    """A result file as a JSON object, or one error naming it."""
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OfactlError(f"{path}: unreadable ({type(e).__name__}); expected the JSON that '{command}' "
                          "writes: run it again to write it whole") from None
    if not isinstance(doc, dict):
        raise OfactlError(f"{path}: expected a JSON object as '{command}' writes, got {type(doc).__name__}")
    return doc


CORPUS_SUFFIXES = (".tsv", ".scp", ".txt", ".lst", ".list")  # manifests, Kaldi wav.scp, lists of paths


def _holds_audio(folder: Path) -> bool:
    """Whether a folder is one ``--corpus`` reads: a manifest, a Kaldi data folder or audio below it."""
    from ofactl.audio import AUDIO_SUFFIXES, MANIFEST_NAME

    if (folder / MANIFEST_NAME).is_file() or (folder / "wav.scp").is_file():
        return True
    return any(f.suffix.lower() in AUDIO_SUFFIXES for f in folder.rglob("*"))


def describe_corpus(spec: Path) -> dict[str, Any]:
    """What every command reads from ``--corpus spec``: utterances, hours, speakers and splits when
    labelled, sample rates, durations, and the files a command would refuse (named, a few)."""
    import numpy as np

    from ofactl.audio import read_corpus
    from ofactl.model.blocks import BASE_CONV
    from ofactl.model.windowed import min_input_samples

    cps = read_corpus(spec, on_error="skip")
    secs = np.array([u.seconds for u in cps])
    doc: dict[str, Any] = {"kind": "corpus", "utterances": len(cps), "seconds": round(float(secs.sum()), 1),
                           "hours": round(float(secs.sum()) / 3600, 3),
                           "seconds_min_median_max": [round(float(f(secs)), 2) for f in (np.min, np.median, np.max)],
                           "columns": cps.columns}
    for column in ("speaker", "split"):
        values = [u.labels[column] for u in cps if column in u.labels]
        if values:
            doc[f"{column}s"] = len(set(values)) if column == "speaker" else _counts(values)
    doc["sample_rates"] = _counts([str(u.sample_rate) for u in cps])
    need = min_input_samples(BASE_CONV)
    short = sum(u.n_samples_16k < need for u in cps)
    notes = [f"{short} recording(s) shorter than the {need} samples at 16 kHz a HuBERT CNN needs"] if short else []
    notes += [n] if (n := cps.narrowband_note()) else []
    notes += _same_files_note(cps)
    if cps.problems:
        listed = list(cps.problems.values())
        notes.append(f"{len(listed)} file(s) unreadable (refused by every command, left out with extract's "
                     f"--on-error skip): " + "; ".join(listed[:5]) + ("; ..." if len(listed) > 5 else ""))
    doc["notes"] = notes
    doc["fingerprint"] = cps.fingerprint()
    return doc


def _same_files_note(cps: Any) -> list[str]:
    """One note when utterances read the same file (a link, or a path listed twice under two ids):
    the same audio in a probe's train and test splits would flatter it."""
    first: dict[Path, str] = {}
    pairs = []
    for u in cps:
        real = Path(u.path).resolve()
        if real in first:
            pairs.append(f"{first[real]} and {u.id}")
        else:
            first[real] = u.id
    if not pairs:
        return []
    return [f"{len(pairs)} utterance(s) read a file another one reads too (through a link or a second listing), "
            f"e.g. {pairs[0]}"]


def _unfinished_quickstart(folder: Path) -> dict[str, Any] | None:
    """A quickstart folder without its summary yet (running, or stopped); None for any other."""
    if not (folder / "quickstart.yaml").is_file():
        return None
    return _with_writer({"kind": "quickstart, unfinished",
                         "resume": "the same 'ofactl quickstart' command goes on, reusing the stages finished"}, folder)


def _counts(values: list[str]) -> dict[str, int]:
    """How often each value occurs, most common first."""
    from collections import Counter

    return dict(Counter(values).most_common())


def describe_unfinished_synth(folder: Path) -> dict[str, Any] | None:
    """How far an interrupted ``synth`` has got (speakers finished, from their row files); None
    for a folder that is no unfinished synth."""
    from ofactl.audio import MANIFEST_NAME
    from ofactl.config import build_config, load_yaml
    from ofactl.errors import ConfigError

    if not (folder / "synth.yaml").is_file() or (folder / MANIFEST_NAME).is_file():
        return None
    from ofactl.synth import SynthConfig, plan

    try:
        cfg = build_config(SynthConfig, load_yaml(folder / "synth.yaml").get("synth", {}), str(folder / "synth.yaml"))
    except (ConfigError, AttributeError):
        return None  # not one this version can go on with: described as a folder of audio
    speakers = {it.speaker.id for it in plan(cfg)}
    finished = sum((folder / "wavs" / spk / "rows.json").is_file() for spk in speakers)
    return _with_writer({"kind": "synth, unfinished", "speakers": len(speakers), "speakers_finished": finished,
                         "resume": "the same 'ofactl synth' command goes on, keeping the speakers finished"}, folder)


def describe_unfinished_run(run: Path) -> dict[str, Any] | None:
    """How far a ``distill`` or ``pretrain`` run that has not finished has got: its steps, the
    newest checkpoint (where ``--resume`` goes on from), the last held-out evaluation, and its
    speed and time left from ``metrics.jsonl``; None for a folder that is no such run."""
    import re

    from ofactl.units import TARGETS_FILE

    section, settings = run_settings(run)
    if not section and ((run / "kmeans.safetensors").is_file() or (run / TARGETS_FILE).is_file()):
        # a first start stopped before its settings were recorded: k-means and unit targets
        return _with_writer({"kind": "pretrain run, unfinished (first start: units)", **_units_state(run),
                             "resume": "the same 'ofactl pretrain' command with --resume goes on, reusing the "
                                       "k-means and the unit targets kept"}, run)
    if section not in ("distill", "pretrain"):
        return None
    steps = settings.get("steps")
    saved_steps = sorted(int(m.group(1)) for f in (run / "checkpoints").glob("step-*.pt")
                         if (m := re.fullmatch(r"step-(\d+)\.pt", f.name)))
    newest = saved_steps[-1] if saved_steps else 0
    doc: dict[str, Any] = {"kind": f"{section} run, unfinished", "steps": steps, "newest_checkpoint_step": newest}
    doc.update(_progress_from_metrics(run / "metrics.jsonl", steps, newest))
    if section == "pretrain":
        doc.update(_units_state(run))
    doc["resume"] = (f"the same 'ofactl {section}' command with --resume goes on from step {newest}" if newest
                     else f"no checkpoint yet: the same 'ofactl {section}' command with --resume starts at step 0")
    return _with_writer(doc, run)


def _units_state(run: Path) -> dict[str, Any]:
    """A pretrain run's k-means and unit targets as far as its first start got (a start stopped
    while assigning keeps what it assigned): ``kmeans`` and ``unit_targets``, for the files there."""
    import json

    from ofactl.units import TARGETS_FILE, TargetsUnreadable, Units, read_targets_file

    out: dict[str, Any] = {}
    if (run / "kmeans.safetensors").is_file():
        try:
            units = Units.load(run / "kmeans.safetensors")
            out["kmeans"] = f"fitted: {units.centroids.shape[0]} units of {units.targets}"
        except Exception as e:  # safetensors raises its own errors for a damaged file
            out["kmeans"] = f"unreadable ({type(e).__name__}): fitted again at the next start"
    if (run / TARGETS_FILE).is_file():
        try:
            done = len(read_targets_file(run / TARGETS_FILE, "lengths")[0])
        except TargetsUnreadable as e:
            out["unit_targets"] = f"unreadable ({e}): assigned again at the next start"
            return out
        try:
            total = int(json.loads((run / "corpus.json").read_text(encoding="utf-8"))["utterances"])
            out["unit_targets"] = f"{done} of {total} utterances assigned"
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            out["unit_targets"] = f"{done} utterances assigned"
    return out


def _with_writer(doc: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``doc`` with ``writing``: the command writing ``folder`` now, when its lock says so."""
    from ofactl.pidlock import run_writer

    writer = run_writer(folder)
    return {**doc, "writing": f"{writer} (running now)"} if writer else doc


RECENT = 50  # metrics records the speed is read from: the current speed, not the run's average


def _progress_from_metrics(path: Path, steps: Any, newest: int) -> dict[str, Any]:
    """The last logged step, the last held-out evaluation, and the seconds per step over the last
    ``RECENT`` records of the current stretch of training, with the time left at that speed."""
    import json

    from ofactl.progress import duration_text

    try:
        recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    train = [r for r in recs if isinstance(r, dict) and "elapsed_s" in r and "step" in r]
    evals = [r for r in recs if isinstance(r, dict) and isinstance(r.get("eval"), dict)]
    out: dict[str, Any] = {}
    if evals:
        out["held_out"] = {"step": evals[-1]["step"], **evals[-1]["eval"]}
    if not train:
        return out
    out["logged_step"] = train[-1]["step"]
    first = len(train) - 1
    while first > max(0, len(train) - RECENT) and train[first - 1]["elapsed_s"] < train[first]["elapsed_s"]:
        first -= 1  # back over the recent records of this stretch of training (elapsed_s restarts with each)
    a, b = train[first], train[-1]
    if b["step"] > a["step"]:
        per = (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
        out["s_per_step"] = round(per, 3)
        if isinstance(steps, int) and steps > newest:
            out["time_left"] = duration_text(per * (steps - newest))
    return out


def describe_audio(path: Path) -> dict[str, Any]:
    """What every command makes of one recording: its header, what the models get (16 kHz mono),
    its level, and whether a HuBERT CNN (400 samples per frame) can take it. Decoding it whole
    checks it as ``extract`` would (truncation, NaN)."""
    from ofactl.audio import audio_info, level_dbfs, load_audio
    from ofactl.extract import QUIET_DBFS
    from ofactl.model.blocks import BASE_CONV
    from ofactl.model.windowed import min_input_samples
    from ofactl.runtime import SAMPLE_RATE

    info = audio_info(path)
    wav = load_audio(path)
    level = level_dbfs(wav)
    need = min_input_samples(BASE_CONV)
    notes = [f"resampled from {info.sample_rate} Hz to {SAMPLE_RATE} Hz"] if info.sample_rate != SAMPLE_RATE else []
    notes += [f"{info.channels} channels mixed down to mono"] if info.channels > 1 else []
    if level < QUIET_DBFS:
        notes.append(f"quieter than {QUIET_DBFS:g} dBFS: --level-db levels it (docs/models.md, 'Loudness')")
    notes += _full_scale_notes(wav)
    if wav.numel() < need:
        notes.append(f"too short: the models need at least {need} samples at {SAMPLE_RATE // 1000} kHz")
    return {"kind": "audio", "seconds": round(info.n_samples / info.sample_rate, 3),
            "sample_rate": info.sample_rate, "channels": info.channels, "samples_16k": int(wav.numel()),
            "frames_20ms": max(0, (int(wav.numel()) - need) // 320 + 1), "level_dbfs": round(level, 1),
            "notes": notes}


def _full_scale_notes(wav: Any) -> list[str]:
    """Samples past full scale (a float file outside [-1, 1]) or clipped at it (at least 0.1% of
    them within 0.1% of full scale): the models take them as they are, distortion and all."""
    if not wav.numel():
        return []
    peak = float(wav.abs().max())
    if peak > 1.0:
        return [f"samples reach {peak:.2f}, past full scale (a float file outside [-1, 1]); the models take them "
                "as they are"]
    clipped = float((wav.abs() >= 0.999).float().mean())
    return [f"clipped: {clipped:.1%} of the samples are at full scale"] if clipped >= 0.001 else []


def describe_teacher(spec: str, trust: bool = False) -> dict[str, Any]:
    """Load a teacher the way ``distill`` would and report its format and architecture."""
    from ofactl.model.teacher import load_teacher

    t = load_teacher(spec, trust=trust)
    doc = {"kind": "teacher", **t.describe()}
    doc["hidden_states"] = t.num_hidden
    doc["parameters"] = sum(p.numel() for p in t.parameters())
    if spec.startswith("builtin:"):
        doc["model_card"] = "docs/models.md"
    return doc
