"""``ofactl extract``: features at one or more rates into a Zarr store, resumable and shardable.

Pipeline: corpus -> length-sorted batches under a seconds budget -> audio decoded in DataLoader
workers -> student CNN once per batch -> the rest of the student once per requested rate ->
a writer thread that fills each rate's group in chunk-aligned blocks, marking an utterance done
only after its frames are written.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import numpy as np
import torch

from ofactl.audio import Corpus, Utterance, level_dbfs, load_audio, read_corpus, set_level
from ofactl.choices import FeatureDtype, OnError, Precision, StoreCompression
from ofactl.config import to_dict
from ofactl.errors import AudioError, ConfigError, OfactlError, StoreError
from ofactl.progress import NullProgress, Progress, worker_init
from ofactl.runtime import SAMPLE_RATE as SR
from ofactl.runtime import autocast, autocast_dtype, check_device_name, resolve_device

if TYPE_CHECKING:
    from ofactl.model.student import Student
    from ofactl.storage.writer import GroupState, WriterThread


@dataclass
class ExtractConfig:
    """What to extract and how. ``rates`` are output frames per 20 ms frame (frame period
    20/rate ms); ``layers`` is "all" or comma-separated hidden-state indices."""

    rates: tuple[float, ...] = (1.0,)  # output frames per 20 ms frame, each in (0, 1]: one store group per rate
    layers: str = "all"  # all, or comma-separated hidden-state indices
    dtype: FeatureDtype = "float16"  # stored feature type
    device: str = "auto"  # auto, cpu, cuda or cuda:N (auto under torchrun: this rank's GPU)
    precision: Precision = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (CUDA)
    batch_seconds: float = 64.0  # padded audio seconds per batch
    num_workers: int = 2  # audio decoding worker processes
    adaptive_length: bool = False  # content-dependent frame counts instead of round(rate * T)
    on_error: OnError = "fail"  # fail: stop at the first bad file (what was written is kept); skip: record it and go on
    block_utts: int = 256  # utterances per write block (the unit of sharding and resuming)
    chunk_frames: int = 1024  # frames per Zarr chunk
    compress: StoreCompression = "none"  # chunk compression of the features
    long_window_s: float = 60.0  # longer utterances run in windows of this much audio (bounded memory)
    long_context_s: float = 8.0  # attention context on each side of a window
    level_db: float | Literal["auto"] | None = None  # scale each recording to this RMS level (dBFS, e.g. -25)
    # before the model; auto: the median level of the audio the student was distilled on (its
    # checkpoint records it); none: as recorded

    def validate(self) -> None:
        """Raise ValueError for rates outside (0, 1], colliding group names or bad sizes."""
        if not self.rates:
            raise ValueError("give at least one rate")
        check_group_rates(self.rates, " (use --frame-ms >= 20 for frame periods)")
        check_device_name(self.device)
        if self.batch_seconds <= 0:
            raise ValueError("batch_seconds must be > 0")
        if self.block_utts < 1 or self.chunk_frames < 1 or self.num_workers < 0:
            raise ValueError("block_utts and chunk_frames must be >= 1, num_workers >= 0")
        if self.long_window_s < 1 or self.long_context_s < 0:
            raise ValueError("long_window_s must be >= 1 and long_context_s >= 0 (seconds)")
        check_level(self.level_db)


@dataclass(frozen=True)
class CallerFlags:
    """How the command that extracts names the settings its messages point to: ``extract``'s own
    flags by default; ``sweep`` sets its own (``--set extract.on_error=skip``, ``--store``)."""

    skip: str = "--on-error skip"  # records a bad file and goes on
    out: str = "--out"  # the store
    level: str = "--level-db"


@dataclass(frozen=True)
class _Target:
    """Where extraction writes: the store, this process's shard, whether to replace groups made
    another way, the HDF5 file it is copied to afterwards, and the caller's flag names."""

    out: Path
    shard: tuple[int, int] | None
    overwrite: bool
    export: Path | None
    flags: CallerFlags


def skip_hint(flag: str) -> str:
    """The last line of a corpus failure that ``flag`` (on_error: skip) would have passed."""
    return f"{flag} leaves these files out, records why in the store, and goes on"


def check_level(level: float | str | None) -> None:
    """Raise ValueError for a ``level_db`` outside -80..0 dBFS (``auto`` and none pass)."""
    if isinstance(level, (int, float)) and not -80 <= level <= 0:
        raise ValueError(f"level_db {level}: expected an RMS level in dBFS from -80 to 0 (e.g. -25), or auto")


def parse_level(text: str | None, flag: str = "--level-db") -> float | Literal["auto"] | None:
    """A level flag's value (``--level-db``): a level in dBFS, or ``auto``; None when not given."""
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag} {text}: expected an RMS level in dBFS (e.g. -25) or auto") from None


def recorded_level(level: float | Literal["auto"] | None, recorded: float | None, source: str,
                   flag: str = "--level-db", maker: str = "distill") -> float | None:
    """The level (dBFS) a level setting scales recordings to: ``auto`` is ``recorded``, the level
    the model in ``source`` was trained at (``maker`` records it), with one clear error naming
    ``flag`` when the file records none; none: as recorded."""
    if level != "auto":
        return level
    if recorded is None:
        raise ConfigError(f"{flag} auto: {source} does not record the level of its training audio (made before "
                          f"ofactl recorded it, or not by {maker}); give a level in dBFS, e.g. {flag} -25")
    return recorded


def level_for(level: float | Literal["auto"] | None, student: Student, ckpt: str) -> float | None:
    """:func:`recorded_level` for ``student``: ``auto`` is the level it was distilled at (its
    checkpoint's ``input_level_db``)."""
    return recorded_level(level, student.input_level_db, ckpt or "this student")


def resolve_level(cfg: ExtractConfig, student: Student, ckpt: str) -> ExtractConfig:
    """``cfg`` with ``level_db: auto`` replaced by its number for ``student`` (:func:`level_for`),
    so stores and rows record the number."""
    return cfg if cfg.level_db != "auto" else replace(cfg, level_db=level_for(cfg.level_db, student, ckpt))


def parse_layers(spec: str, n_hidden: int) -> list[int]:
    """``all`` or comma-separated hidden-state indices (negative from the end) -> sorted indices."""
    if spec.strip() == "all":
        return list(range(n_hidden))
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--layers {spec!r}: expected 'all' or comma-separated integers like 0,2") from None
    bad = [x for x in layers if not 0 <= x < n_hidden]
    if bad or not layers or len(set(layers)) != len(layers):
        raise ConfigError(f"--layers {spec!r}: the student has hidden states 0..{n_hidden - 1} (no repeats)")
    return layers


def parse_shard(spec: str | None, env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """``--shard i/N``; ``auto`` (the default when a launcher set its variables): this process's
    place among torchrun ranks or SLURM array tasks; None (unset, no launcher): one process."""
    from ofactl.runtime import launcher_shard

    if spec is None or spec == "auto":
        found = launcher_shard(env)
        if found is None and spec == "auto":
            raise ConfigError("--shard auto: no launcher found (RANK/WORLD_SIZE from torchrun, or "
                              "SLURM_ARRAY_TASK_ID/COUNT from a SLURM array); give --shard i/N")
        return None if found is None else found[:2]
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {spec!r}: expected i/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {spec!r}: need 0 <= i < N")
    return i, n


# ----------------------------------------------------------------------------- data loading
@dataclass
class Batch:
    """One decoded batch: store indices, padded audio (B, N) with lengths, decoding errors."""

    idx: list[int]  # store indices
    wav: torch.Tensor  # (B, N) float32
    lengths: torch.Tensor  # (B,)
    errors: list[str]  # "" or the decoding error of each utterance
    levels: list[float]  # each recording's RMS level as decoded, dBFS (nan where it failed)


class _BatchSource(torch.utils.data.Dataset):
    """Decodes one planned batch per item (runs in DataLoader workers); with ``level_db``, scales
    each recording to that RMS level."""

    def __init__(self, plan: list[list[int]], utts: list[Utterance], level_db: float | None = None) -> None:
        self.plan, self.utts, self.level_db = plan, utts, level_db

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> Batch:
        idx = self.plan[k]
        wavs, errors, levels = [], [], []
        for i in idx:
            u = self.utts[i]
            try:
                w = load_audio(u.path)
                n = u.n_samples_16k  # the length planned from the header: keep them equal
                w = w[:n] if len(w) >= n else torch.nn.functional.pad(w, (0, n - len(w)))
                levels.append(level_dbfs(w))
                w = w if self.level_db is None else set_level(w, self.level_db, levels[-1])
                errors.append("")
            except AudioError as e:
                w = torch.zeros(0)
                levels.append(float("nan"))
                errors.append(str(e))
            wavs.append(w)
        lengths = torch.tensor([len(w) for w in wavs])
        wav = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True) if wavs else torch.zeros(0, 0)
        return Batch(idx, wav, lengths, errors, levels)


def _pin(b: Batch) -> Batch:
    b.wav = b.wav.pin_memory()
    return b


def plan_batches(order: Sequence[int], n_samples: Sequence[int] | np.ndarray, budget_samples: int) -> list[list[int]]:
    """Consecutive utterances whose padded size (count x longest) fits the budget (>= 1 each)."""
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = int(n_samples[i])
        if cur and max(longest, n) * (len(cur) + 1) > budget_samples:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


# ----------------------------------------------------------------------------- result
@dataclass
class GroupResult:
    """What one rate group holds after a run: utterances written and reused by this run, the inputs
    it records as skipped (by this run or an earlier one, as ``ofactl info`` lists them); the rate
    achieved."""

    rate: float
    group: str
    utterances: int
    written: int
    reused: int
    skipped: int
    frames: int
    complete: bool
    achieved_rate: float | None
    frame_period_ms: float | None

    def to_json(self) -> dict[str, Any]:
        """The group's result as JSON-safe data."""
        return dict(self.__dict__)


QUIET_DBFS = -35.0  # where the bundled models' first GroupNorm epsilon starts to mask a voice (docs/models.md, "Loudness")


@dataclass
class Loudness:
    """The levels of the recordings a run decoded: how many lie below ``QUIET_DBFS``, the quietest."""

    measured: int = 0
    quiet: int = 0
    quietest_db: float | None = None
    quietest: str = ""

    def add(self, batch: Batch, utts: list[Utterance]) -> None:
        """Count one decoded batch (failed decodes have no level and are not counted)."""
        for i, db in zip(batch.idx, batch.levels):
            if db != db:  # nan: the decode failed
                continue
            self.measured += 1
            self.quiet += db < QUIET_DBFS
            if self.quietest_db is None or db < self.quietest_db:
                self.quietest_db, self.quietest = round(db, 1), str(utts[i].path)

    def to_json(self) -> dict[str, Any]:
        """The counts as JSON-safe data."""
        return {"measured": self.measured, "quiet": self.quiet, "quiet_below_dbfs": QUIET_DBFS,
                "quietest_dbfs": self.quietest_db, "quietest": self.quietest}


@dataclass
class ExtractResult:
    """What ``extract`` did: the store, each group's result, timings and the inputs it skipped."""

    store: Path
    groups: list[GroupResult]
    audio_seconds: float
    wall_seconds: float
    model_seconds: float
    corpus_problems: dict[str, str]
    shard: tuple[int, int] | None
    loudness: Loudness = field(default_factory=Loudness)
    levelled: bool = False  # level_db scaled every recording, or the model does not hear the level
    trained_level_db: float | None = None  # the level the student was distilled at, where recorded

    @property
    def warnings(self) -> int:
        """How many inputs the store lacks (bad audio, too short), for the one-line warning: every
        group records the same ones, since the audio is decoded once for all rates."""
        return max((g.skipped for g in self.groups), default=len(self.corpus_problems))

    def quiet_warning(self, setting: str = "--level-db ") -> str | None:
        """One line when recordings this run decoded were quiet and nothing levelled them;
        ``setting`` is the level's flag as the calling command takes it, before its value (auto
        where the student records its training level, else -25)."""
        ld = self.loudness
        if self.levelled or not ld.quiet:
            return None
        known = self.trained_level_db
        remedy = setting + ("-25" if known is None else f"auto (the {known:g} dBFS this student was distilled at)")
        return (f"{ld.quiet} of {ld.measured} recording(s) are quieter than {QUIET_DBFS:g} dBFS (quietest "
                f"{ld.quietest_db} dBFS: {ld.quietest}); this model's features depend on the input level, so quiet "
                f"voices reach it weaker than loud ones (docs/models.md, 'Loudness'): {remedy} levels every "
                "recording (into a new --out, or with --overwrite)")

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-safe data (``--json``)."""
        return {
            "store": str(self.store), "shard": f"{self.shard[0]}/{self.shard[1]}" if self.shard else None,
            "groups": [g.to_json() for g in self.groups], "audio_seconds": round(self.audio_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3), "model_seconds": round(self.model_seconds, 3),
            "realtime_factor": round(self.audio_seconds / self.wall_seconds, 2) if self.wall_seconds else None,
            "skipped_inputs": self.warnings,
            "loudness": {**self.loudness.to_json(), "levelled": self.levelled},
        }


# ----------------------------------------------------------------------------- main
def run_extract(
    cfg: ExtractConfig,
    ckpt: Path,
    corpus: str | Path | Corpus,
    out: Path,
    *,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
    format: Literal["zarr", "hdf5"] | None = None,
    stdin: TextIO | None = None,
    progress: Progress | None = None,
) -> ExtractResult:
    """Extract features from a student checkpoint (see :func:`extract_with_student`).

    ``format="hdf5"`` fills the Zarr store ``OUT.zarr`` (resumable) and, once every group is
    complete, exports it to the HDF5 file ``out``. None: hdf5 when ``out`` ends in .h5 or
    .hdf5 (a Zarr folder of that name would be read as HDF5 by every other tool), else zarr.
    """
    from ofactl.checkpoint import covers, describe_rates, file_sha256, load_student, rates_phrase, rates_trained

    if format is None:
        format = "hdf5" if Path(out).suffix.lower() in (".h5", ".hdf5") else "zarr"
    if format not in ("zarr", "hdf5"):
        raise ConfigError(f"--format {format}: expected zarr or hdf5")
    from ofactl.storage.zarr_store import export_store

    store = Path(out) if format == "zarr" else export_store(Path(out))
    student, payload = load_student(Path(ckpt))
    trained = rates_trained(payload)
    outside = [r for r in cfg.rates if not covers(trained, r)]
    if outside and progress is not None:  # extracted all the same: a user may want to look past the range
        progress.log(f"note: {ckpt} was {describe_rates(trained)}; {rates_phrase(outside)} outside that range")
    res = extract_with_student(cfg, student, file_sha256(Path(ckpt)), corpus, store, shard=shard,
                               overwrite=overwrite, stdin=stdin, progress=progress, ckpt_path=str(ckpt),
                               export=Path(out) if format == "hdf5" else None)
    if format == "hdf5" and all(g.complete for g in res.groups):
        from ofactl.storage.hdf5_export import export_hdf5

        export_hdf5(store, Path(out), [g.rate for g in res.groups])
    return res


def check_group_rates(rates: Sequence[float], hint: str = "") -> None:
    """Raise ValueError for a rate outside (0, 1], one a store's group name (3 decimals) would
    show as rate=0.000, or two that share a group name."""
    for r in rates:
        if not 0 < r <= 1:
            raise ValueError(f"rate {r} is outside (0, 1]{hint}")
        if r < 0.0005:
            raise ValueError(f"rate {r:g} would be stored as rate=0.000: group names keep 3 decimals, so "
                             "the lowest rate is 0.001 (a 20 s frame period)")
    if len({f"{r:.3f}" for r in rates}) != len(rates):
        raise ValueError(f"rates {list(rates)} collide at 3 decimals (groups are named rate=0.500)")


def requested_rates(rates: Sequence[float] = (), frame_ms: Sequence[float] = ()) -> tuple[float, ...] | None:
    """The rates ``--rate`` and ``--frame-ms`` ask for (a period of P ms is rate 20/P), in that
    order; None when neither was given (the config's rates stand)."""
    from ofactl.model.compress import rate_from_frame_ms

    out = tuple(float(r) for r in rates) + tuple(rate_from_frame_ms(ms) for ms in frame_ms)
    return out or None


def extract_with_student(
    cfg: ExtractConfig,
    student: Student,
    student_id: str,
    corpus: str | Path | Corpus,
    out: Path | None,
    *,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
    stdin: TextIO | None = None,
    progress: Progress | None = None,
    ckpt_path: str = "",
    export: Path | None = None,
    flags: CallerFlags = CallerFlags(),
) -> ExtractResult:
    """Extract with a student in memory; ``out=None`` runs the model and discards the features
    (used to measure store overhead); ``export``: the HDF5 file the store is copied to afterwards,
    counted in the disk check; ``flags``: the caller's names for the settings its errors point
    to. Steps: read and check the inputs, lock and plan every
    rate group (nothing is created before the disk check passes), run the batches, finalise."""
    progress = progress or NullProgress()
    t_start = time.perf_counter()
    cfg = resolve_level(cfg, student, ckpt_path)
    if shard is not None and overwrite:
        raise ConfigError("--overwrite cannot be combined with --shard: reset the store once without --shard")
    if shard is not None and out is None:
        raise ConfigError("--shard needs a store")
    from ofactl.runtime import local_device

    device = resolve_device(local_device(cfg.device))  # torchrun: each rank its own GPU
    amp = autocast_dtype(cfg.precision, device)
    arch = student.cfg.arch
    cps, utts, n16, t_in = _inputs(corpus, stdin, cfg, arch, flags.skip)
    if note := cps.narrowband_note():
        progress.log(f"note: {note}")
    student = student.to(device).eval()
    layers = parse_layers(cfg.layers, student.num_hidden)
    with contextlib.ExitStack() as stack:
        states = {} if out is None else _open_groups(
            stack, _Target(Path(out), shard, overwrite, export, flags), cfg, utts, t_in, layers, student, student_id,
            ckpt_path, cps, progress)
        plan = _plan(utts, n16, states, cfg, shard, discard=out is None, progress=progress)
        pending = [i for batch in plan for i in batch]
        audio_s = float(n16[pending].sum()) / SR if pending else 0.0
        loudness = Loudness()
        try:
            model_s = _run_batches(plan, utts, t_in, states, cfg, student, device, amp, layers, progress,
                                   discard=out is None, loudness=loudness)
        except AudioError as e:  # on_error fail: a file undecodable past its header stopped the run
            raise AudioError(f"{e}; the features written so far are kept ({flags.skip} records such a file in the "
                             "store and goes on)") from None
    results = [_finalize(st, utts, t_in, cps.problems) for st in states.values()]
    levelled = cfg.level_db is not None or not student.cfg.hears_level
    return ExtractResult(Path(out) if out else Path(), results, audio_s, time.perf_counter() - t_start,
                         model_s, dict(cps.problems), shard, loudness, levelled, student.input_level_db)


def _too_short(u: Utterance) -> str:
    return f"{u.path}: too short ({u.n_samples_16k} samples at 16 kHz; the CNN needs at least 400)"


def _inputs(corpus: str | Path | Corpus, stdin: TextIO | None, cfg: ExtractConfig,
            arch: Any, skip_flag: str) -> tuple[Corpus, list[Utterance], np.ndarray, np.ndarray]:
    """The corpus in store order (sorted by length, ties by id), sample and frame counts.

    Every bad input knowable from the headers (missing, empty, unreadable, too short for one
    frame) is reported in one error with ``on_error=fail``; with ``skip`` they are recorded.
    """
    from ofactl.model.blocks import cnn_lengths
    from ofactl.model.windowed import min_input_samples

    if isinstance(corpus, Corpus):
        cps = corpus
    else:
        # header checks, the CNN's minimum length included, all reported in one error
        cps = read_corpus(corpus, stdin=stdin, on_error=cfg.on_error, min_samples_16k=min_input_samples(arch.conv_layers),
                          skip_hint=skip_hint(skip_flag))
    utts = sorted(cps.utterances, key=lambda u: (u.n_samples_16k, u.id))
    n16 = np.array([u.n_samples_16k for u in utts], dtype=np.int64)
    t_in = cnn_lengths(arch, torch.from_numpy(n16)).numpy()
    short = [u for u, t in zip(utts, t_in) if t <= 0]
    if short and cfg.on_error == "fail":  # a Corpus built by the caller
        raise AudioError(f"{_too_short(short[0])}\n{skip_hint(skip_flag)}")
    return cps, utts, n16, t_in


@dataclass
class _GroupPlan:
    """What happens to one rate group: ``reuse`` it, ``create`` it, ``replace`` it (another
    checkpoint, with --overwrite), ``rebuild`` it (half-created), or ``wait`` for shard 0."""

    rate: float
    layout: Any
    attrs: dict[str, Any]
    action: str
    group: Any = None


def _open_groups(stack: contextlib.ExitStack, to: _Target, cfg: ExtractConfig, utts: list[Utterance],
                 t_in: np.ndarray, layers: list[int], student: Any, student_id: str, ckpt_path: str,
                 cps: Corpus, progress: Progress) -> dict[float, GroupState]:
    """Lock every group first (two writers of a new store meet at the lock), decide what each
    group needs, check the disk, and only then create or replace groups."""
    from ofactl.storage.lock import GroupLock
    from ofactl.storage.writer import GroupState
    from ofactl.storage.zarr_store import FeatureStore, make_layout, rate_key

    for rate in cfg.rates:
        stack.enter_context(GroupLock(to.out, rate_key(rate), to.shard, progress))
    existing = FeatureStore(to.out, mode="r") if (to.out / "zarr.json").is_file() else None
    plans = []
    for rate in cfg.rates:
        reserve = t_in if cfg.adaptive_length else _exact_lengths(t_in, rate)
        layout = make_layout([u.id for u in utts], reserve, cfg.block_utts, cfg.chunk_frames)
        attrs = _group_attrs(cfg, rate, layers, student, student_id, ckpt_path, cps, student.cfg.arch.hop, t_in)
        plans.append(_plan_group(existing, rate, layout, attrs, cfg, to))
    _check_disk(to, plans, cfg, len(layers), int(student.cfg.arch.embed_dim))
    store = FeatureStore(to.out, mode="a")
    states = {}
    for p in plans:
        grp = _apply(store, p, cfg, len(layers), int(student.cfg.arch.embed_dim), progress)
        states[p.rate] = GroupState(p.rate, grp, list(p.layout.utt_ids), np.asarray(p.layout.reserve),
                                    np.asarray(p.layout.offsets), cfg.adaptive_length, cfg.block_utts)
    return states


def _plan(utts: list[Utterance], n16: np.ndarray, states: dict[float, GroupState], cfg: ExtractConfig,
          shard: tuple[int, int] | None, discard: bool, progress: Progress) -> list[list[int]]:
    """Batches to run: owned blocks with utterances not done in some group.

    Batches are planned over each whole block, done or not, so a resumed or sharded run forms
    exactly the batches of a clean run (bitwise-identical features); fully done batches are
    skipped.
    """
    from ofactl.storage.zarr_store import rate_key

    n_blocks = (len(utts) + cfg.block_utts - 1) // cfg.block_utts
    owned = [b for b in range(n_blocks) if shard is None or b % shard[1] == shard[0]]
    budget = int(cfg.batch_seconds * SR)
    plan: list[list[int]] = []
    for b in owned:
        lo, hi = b * cfg.block_utts, min(len(utts), (b + 1) * cfg.block_utts)
        for st in states.values():
            done = st.group.done[lo:hi]
            if st.adaptive and not done.all() and done.any():
                # Adaptive blocks are packed from their start: redo a partial block, clearing
                # its done flags first so a kill during the redo leaves nothing stale.
                done = np.zeros_like(done)
                st.group.write_utt_arrays(lo, hi, done=done)
            st.needed.update(int(x) for x in lo + np.flatnonzero(~done))
            st.reused += int(done.sum())
        for batch in plan_batches(range(lo, hi), n16, budget):
            if discard or any(i in st.needed for st in states.values() for i in batch):
                plan.append(batch)
    for st in states.values():
        if st.reused:
            progress.log(f"{rate_key(st.rate)}: reusing {st.reused} utterance(s) already in the store")
    return plan


def _exact_lengths(t_in: np.ndarray, rate: float) -> np.ndarray:
    """The frames each utterance gets in exact mode: the model's own rule (halves round up)."""
    from ofactl.model.compress import target_lengths

    return target_lengths(torch.from_numpy(t_in.astype(np.int64)), rate).numpy()


def _group_attrs(cfg: ExtractConfig, rate: float, layers: list[int], student: Any, student_id: str,
                 ckpt_path: str, cps: Corpus, hop: int, t_in: np.ndarray) -> dict[str, Any]:
    return {
        "requested_rate": float(rate), "frame_period_ms": round(1000 * hop / SR / rate, 4),
        "stride_samples": hop / rate, "sample_rate": SR, "input_frame_ms": 1000 * hop / SR,
        "layers": layers, "n_layers": len(layers), "dim": int(student.cfg.arch.embed_dim), **feature_settings(cfg),
        "student_sha256": student_id, "student_path": ckpt_path, "alpha_mean": student.alpha_mean,
        "corpus_fingerprint": cps.fingerprint(), "corpus": cps.source, "n_utts": len(cps),
        "input_frames": int(t_in.sum()), "corpus_errors": dict(cps.problems),
        "extract_config": to_dict(cfg),  # the resolved config of the run that created the group
    }


_MUST_MATCH = ("student_sha256", "layers", "dtype", "mode", "corpus_fingerprint", "block_utts", "chunk_frames",
               "long_window_s", "long_context_s", "level_db")
_NEWER = ("long_window_s", "long_context_s")  # absent in groups made before these settings existed
_BEFORE = {"level_db": None}  # what groups made before a setting existed were made with


def feature_settings(cfg: ExtractConfig) -> dict[str, Any]:
    """The extraction settings that change the features themselves, as a group records them."""
    return {"dtype": cfg.dtype, "mode": "adaptive" if cfg.adaptive_length else "exact", "level_db": cfg.level_db,
            "long_window_s": cfg.long_window_s, "long_context_s": cfg.long_context_s}


def _recorded(attrs: Any, key: str, wanted: Any) -> Any:
    """A group's recorded ``key``; where a group made before that setting existed lacks it, the
    value it was made with (``_BEFORE``), or for ``_NEWER`` keys the one wanted."""
    return attrs.get(key, wanted if key in _NEWER else _BEFORE.get(key))


def settings_differ(attrs: Any, cfg: ExtractConfig) -> list[str]:
    """The :func:`feature_settings` in which a group's ``attrs`` differ from ``cfg``'s."""
    return [k for k, v in feature_settings(cfg).items() if _recorded(attrs, k, v) != v]


def _plan_group(existing: Any, rate: float, layout: Any, attrs: dict[str, Any], cfg: ExtractConfig,
                to: _Target) -> _GroupPlan:
    from ofactl.storage.zarr_store import rate_key

    name = rate_key(rate)
    creator = to.shard is None or to.shard[0] == 0
    if existing is None or name not in existing.group_names():
        return _GroupPlan(rate, layout, attrs, "create" if creator else "wait")
    if not existing.is_complete_group(name):
        return _GroupPlan(rate, layout, attrs, "rebuild" if creator else "wait")
    grp = existing.group(rate)
    a = grp.attrs
    want = {**attrs, "block_utts": cfg.block_utts, "chunk_frames": cfg.chunk_frames}
    diff = [k for k in _MUST_MATCH if _recorded(a, k, want.get(k)) != want.get(k)]
    if not diff:
        return _GroupPlan(rate, layout, attrs, "reuse", grp)
    if not to.overwrite:
        what = {"student_sha256": "another checkpoint", "layers": "another layer set", "corpus_fingerprint":
                "another corpus", "level_db": f"another {to.flags.level}"}.get(diff[0], f"another {diff[0]}")
        raise StoreError(f"{existing.path}/{name} was made with {what} ({diff[0]}: {a.get(diff[0])!r} vs "
                         f"{want.get(diff[0])!r}); pass --overwrite to replace it or use another {to.flags.out}")
    return _GroupPlan(rate, layout, attrs, "replace")


def _apply(store: Any, p: _GroupPlan, cfg: ExtractConfig, n_layers: int, dim: int, progress: Progress) -> Any:
    """Carry out one group's plan on the store opened for writing; returns the group."""
    from ofactl.storage.zarr_store import rate_key

    name = rate_key(p.rate)
    if p.action == "reuse":
        return store.group(p.rate)
    if p.action == "wait":
        return _wait_for_group(store, p.rate, progress)
    if p.action == "replace":
        progress.log(f"replacing {name} in {store.path} (--overwrite)")
        store.delete_group(p.rate)
    if p.action == "rebuild":
        progress.log(f"note: {store.path}/{name} was left half-created by a killed run (no features yet); "
                     "rebuilding it")
        store.delete_group(p.rate)
    return store.create_group(p.rate, p.layout, n_layers, dim, cfg.dtype, p.attrs, cfg.compress)


def _wait_for_group(store: Any, rate: float, progress: Progress, timeout: float = 600.0) -> Any:
    """Shards other than 0 wait for shard 0 to create the group (it appears whole, see
    ``FeatureStore.create_group``)."""
    from ofactl.storage.zarr_store import rate_key

    progress.log(f"waiting for shard 0 to create {rate_key(rate)}")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if store.has(rate) and store.is_complete_group(rate_key(rate)):
            return store.group(rate)
        time.sleep(0.5)
    raise StoreError(f"{store.path}: shard 0 did not create {rate_key(rate)} within {timeout:.0f} s; start shard 0")


def _check_disk(to: _Target, plans: list[_GroupPlan], cfg: ExtractConfig, n_layers: int, dim: int) -> None:
    """Refuse, before anything is created, when the features still to write (this process's
    blocks of every group), and the HDF5 copy of every group when ``export`` is asked for, do not
    fit on their disks. Uncompressed chunks are stored whole, so a block's last, part-filled chunk
    costs a full one (a small store needs more than its frames)."""
    from ofactl.storage.zarr_store import disk_free, same_disk

    per_frame = n_layers * dim * (2 if cfg.dtype == "float16" else 4)
    need = sum(_store_bytes(p, cfg, to.shard, per_frame) for p in plans)
    h5 = 0
    if to.export is not None:
        from ofactl.storage.hdf5_export import hdf5_bytes

        h5 = sum(hdf5_bytes(p.layout.total_frames, p.layout.chunk_frames, per_frame, p.layout.n_utts) for p in plans)
        if not same_disk(to.out, to.export):
            _refuse_if_short(to.export, h5, disk_free(to.export), "the HDF5 copy", to.flags.out)
            h5 = 0
    _refuse_if_short(to.out, need + h5, disk_free(to.out), f"{h5 / 1e6:,.2f} MB of them for the HDF5 copy {to.export}"
                     if h5 else "", to.flags.out)


def _store_bytes(p: _GroupPlan, cfg: ExtractConfig, shard: tuple[int, int] | None, per_frame: int) -> int:
    """Bytes one group's blocks still to write take in the store, chunks whole when uncompressed."""
    from ofactl.storage.zarr_store import UTT_ARRAYS

    to_write = ~p.group.done if p.action == "reuse" else np.ones(p.layout.n_utts, dtype=bool)
    if shard is not None:
        block = np.arange(p.layout.n_utts) // cfg.block_utts
        to_write &= block % shard[1] == shard[0]
    frames = (p.layout.chunks_holding(to_write) * p.layout.chunk_frames if cfg.compress == "none"
              else int(p.layout.reserve[to_write].sum()))  # compressed: the padding takes next to nothing
    # each small file (metadata, the per-utterance arrays' chunk of each block) takes a whole disk
    # block; 4 KiB is the common size
    return frames * per_frame + (8 + len(UTT_ARRAYS) * p.layout.n_blocks) * 4096


def _refuse_if_short(path: Path, need: int, free: int, part: str, out_flag: str) -> None:
    """One error naming ``path`` when ``need`` bytes exceed the ``free`` bytes of its disk."""
    if need > free:
        of_which = f" ({part})" if part else ""
        raise StoreError(f"{path}: these features need about {need / 1e6:,.2f} MB{of_which}, but only "
                         f"{free / 1e6:,.2f} MB are free on that disk; nothing was written (free space or "
                         f"choose another {out_flag})")


def _run_batches(plan: list[list[int]], utts: list[Utterance], t_in: np.ndarray,
                 states: dict[float, GroupState], cfg: ExtractConfig, student: Any, device: torch.device,
                 amp: torch.dtype | None, layers: list[int], progress: Progress, discard: bool,
                 loudness: Loudness | None = None) -> float:
    """Decode, forward and hand every planned batch to the writer; returns the model seconds.
    ``loudness`` counts the levels of the recordings decoded.

    ``discard``: forward only (timing), nothing is written. With ``on_error: fail`` the good
    utterances of the failing batch are still written before the error is raised.
    """
    if not plan:
        return 0.0
    step = _BatchStep(utts, t_in, states, cfg, student, device, amp, layers, discard)
    progress.start("extracting features", sum(len(b) for b in plan))
    fail: OfactlError | None = None
    try:
        with _writer(states, cfg, discard) as writer:
            for batch in _loader(plan, utts, cfg):
                if loudness is not None:
                    loudness.add(batch, utts)
                bad = [k for k, e in enumerate(batch.errors) if e]
                if bad and cfg.on_error == "fail":
                    fail = AudioError(batch.errors[bad[0]])
                items = step.feature_items(batch) + step.error_items(batch)
                if writer and items:
                    writer.put(items)
                progress.advance(len(batch.idx))
                if fail is not None:
                    break
    finally:
        progress.finish()
    if fail is not None:
        raise fail
    return step.model_s


def _loader(plan: list[list[int]], utts: list[Utterance], cfg: ExtractConfig) -> torch.utils.data.DataLoader:
    """Planned batches decoded in ``cfg.num_workers`` worker processes (Ctrl-C goes to the parent)."""
    if cfg.level_db == "auto":  # resolve_level runs first: a level reaches the workers as a number
        raise ValueError("level_db auto was not resolved against the student")
    return torch.utils.data.DataLoader(
        _BatchSource(plan, utts, cfg.level_db), batch_size=None, shuffle=False, num_workers=cfg.num_workers,
        pin_memory=False, prefetch_factor=4 if cfg.num_workers else None,
        persistent_workers=False, worker_init_fn=worker_init() if cfg.num_workers else None,
    )


@contextlib.contextmanager
def _writer(states: dict[float, GroupState], cfg: ExtractConfig, discard: bool) -> Iterator[WriterThread | None]:
    """The store's writer thread for the duration of a run (None when discarding).

    It is drained and closed on the way out, also after Ctrl-C; a write error (a full disk) is
    one ``StoreError`` that says what was kept.
    """
    from ofactl.storage.writer import WriterThread

    if discard:
        yield None
        return
    writer = WriterThread(states, 16 * cfg.chunk_frames)
    writer.start()
    try:
        yield writer
    finally:
        try:
            writer.close()
        except OSError as e:
            raise StoreError(f"writing the store failed ({e.strerror or e}); what was written is kept: "
                             "free space and rerun the same command to resume") from None


@dataclass
class _BatchStep:
    """Turns one decoded batch into writer items: features per needed rate, or recorded errors."""

    utts: list[Utterance]
    t_in: np.ndarray  # CNN frames per utterance (0: too short)
    states: dict[float, GroupState]
    cfg: ExtractConfig
    student: Any
    device: torch.device
    amp: torch.dtype | None
    layers: list[int]
    discard: bool
    model_s: float = 0.0

    def feature_items(self, batch: Batch) -> list[tuple[float, int, np.ndarray | None, str]]:
        """Run the student on the batch's good utterances, for the rates that still need them."""
        good = [k for k in range(len(batch.idx)) if not batch.errors[k] and self.t_in[batch.idx[k]] > 0]
        if not good:
            return []
        rates = [r for r in self.cfg.rates if self.discard or any(batch.idx[k] in self.states[r].needed for k in good)]
        wav = batch.wav[good]
        if self.device.type == "cuda":
            wav = wav.pin_memory().to(self.device, non_blocking=True)
        t0 = time.perf_counter()
        torch_dtype = torch.float16 if self.cfg.dtype == "float16" else torch.float32
        with torch.inference_mode(), autocast(self.device, self.amp):
            host = _forward(self.student, wav, batch.lengths[good].to(self.device), rates, self.cfg, self.layers, torch_dtype)
        self.model_s += time.perf_counter() - t0
        if self.discard:
            return []
        store_dtype = np.float16 if self.cfg.dtype == "float16" else np.float32
        return [(r, batch.idx[k], np.ascontiguousarray(per_utt[j], dtype=store_dtype), "")
                for r, per_utt in host.items() for j, k in enumerate(good) if batch.idx[k] in self.states[r].needed]

    def error_items(self, batch: Batch) -> list[tuple[float, int, np.ndarray | None, str]]:
        """With ``on_error: skip``: the undecodable or too-short utterances, recorded with why."""
        if self.cfg.on_error != "skip" or self.discard:
            return []
        items: list[tuple[float, int, np.ndarray | None, str]] = []
        for k, i in enumerate(batch.idx):
            u = self.utts[i]
            too_short = f"{u.path}: too short ({u.n_samples_16k} samples at 16 kHz; the CNN needs at least 400)"
            msg = batch.errors[k] or ("" if self.t_in[i] > 0 else too_short)
            if msg:
                items.extend((r, i, None, msg) for r in self.cfg.rates if i in self.states[r].needed)
        return items


def _forward(student: Any, wav: torch.Tensor, lengths: torch.Tensor, rates: list[float], cfg: ExtractConfig,
             layers: list[int], dtype: torch.dtype) -> dict[float, list[np.ndarray]]:
    """Features per rate, one (frames, layers, dim) host array per utterance of the batch.
    Utterances longer than ``long_window_s`` run alone in windows (bounded memory); the rest
    run as one padded batch."""
    from ofactl.model.windowed import features_windowed

    hop = student.cfg.arch.hop
    n = lengths.tolist()  # one host copy (a device sync on CUDA), not one per utterance
    long = [j for j in range(len(n)) if n[j] > cfg.long_window_s * SR]
    short = [j for j in range(len(n)) if n[j] <= cfg.long_window_s * SR]
    out: dict[float, list[Any]] = {r: [None] * len(n) for r in rates}
    exact = not cfg.adaptive_length
    if short:
        if long:  # only then does the batch need narrowing to its short utterances
            sel = torch.tensor(short, device=wav.device)
            wav_s, len_s = wav[sel, : max(n[j] for j in short)], lengths[sel]
        else:
            wav_s, len_s = wav, lengths
        feats = student.features(wav_s, len_s, rates, exact=exact, layers=layers)
        for r, h in feats.items():
            arr, lens = h.states.to(dtype).cpu().numpy(), h.lengths.cpu().numpy()
            for k, j in enumerate(short):
                out[r][j] = arr[k, : lens[k]]
    win, ctx = int(cfg.long_window_s * SR / hop), int(cfg.long_context_s * SR / hop)
    for j in long:
        feats = features_windowed(student, wav[j, : n[j]], rates, exact=exact, layers=layers,
                                  window=win, context=ctx)
        for r, h in feats.items():
            out[r][j] = h.states[0, : int(h.lengths[0])].to(dtype).cpu().numpy()
    return out


def _finalize(st: GroupState, utts: list[Utterance], t_in: np.ndarray, problems: dict[str, str]) -> GroupResult:
    g = st.group
    g.refresh()
    done = g.done
    lengths = g.lengths
    errors = g.errors
    complete = bool(done.all())
    ok = done & (lengths > 0)
    frames = int(lengths[ok].sum())
    inp = int(t_in[ok].sum())
    achieved = frames / inp if inp else None
    if complete and not g.complete:
        g.update_attrs(complete=True, achieved_rate=achieved, frames=frames,
                       achieved_frame_period_ms=(g.attrs["input_frame_ms"] / achieved) if achieved else None,
                       errors={**g.attrs.get("corpus_errors", {}), **errors})
    skipped = {**g.attrs.get("corpus_errors", {}), **errors}  # what `ofactl info` lists for the group
    return GroupResult(st.rate, g.name, len(done), st.written, st.reused, len(skipped), frames, complete,
                       round(achieved, 5) if achieved else None,
                       round(g.attrs["input_frame_ms"] / achieved, 3) if achieved else None)
