"""The training scaffold shared by ``distill`` and ``pretrain``.

A job (distillation, masked prediction) brings its model, its loss on one batch, what a
checkpoint holds, and an evaluation; the scaffold owns everything around them:

- the run folder (``--resume`` / ``--overwrite``), devices, autocast and torchrun DDP;
- length-bucketed batches of random crops on the 20 ms frame grid, with per-utterance frame
  arrays (segment ids, unit targets) cropped alongside, decoded in DataLoader workers;
- AdamW with linear warm-up and decay, gradient accumulation and clipping, fp16 scaling;
- ``metrics.jsonl`` (cut back to the checkpoint's step on resume), evaluation every
  ``eval_every`` steps, atomic checkpoints every ``ckpt_every`` steps (the last
  ``keep_checkpoints`` kept), and Ctrl-C, SIGTERM or SIGHUP: saved at the next step boundary,
  exit code 130, 143 or 129;
- the audio read (all ranks) and wall time, per invocation and, carried by checkpoints, per run.

Runs are reproducible: every random draw of a step comes from a generator seeded by
(seed, step), and checkpoints hold optimizer, scheduler, scaler and global RNG state, so a
resumed run continues exactly as an uninterrupted one (CPU).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ofactl.atomic import make_dir, write_text
from ofactl.audio import Corpus, Utterance, load_audio
from ofactl.choices import Precision
from ofactl.errors import AudioError, CheckpointError, CorpusError, HungUpRun, InterruptedRun, OfactlError, TerminatedRun
from ofactl.progress import Progress, Terminated, deferred_stop, how_stopped, worker_init
from ofactl.runtime import SAMPLE_RATE as SR
from ofactl.runtime import rng_state, set_rng_state


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and linear decay, gradient clipping and accumulation."""

    lr: float = 2e-4  # peak learning rate (AdamW)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    eps: float = 1e-6  # AdamW epsilon
    weight_decay: float = 1e-6  # AdamW weight decay
    warmup: float = 0.07  # fraction of steps
    final_lr_ratio: float = 0.0  # linear decay to lr * this
    grad_clip: float = 5.0  # clip the gradient norm to this (0: no clipping)
    accum: int = 1  # micro-batches per optimizer step


class TrainConfig(Protocol):
    """The settings the scaffold reads (``DistillConfig`` and ``PretrainConfig`` have them)."""

    steps: int
    batch_seconds: float
    crop_seconds: float
    optim: OptimConfig
    device: str
    precision: Precision
    num_workers: int
    seed: int
    ckpt_every: int
    keep_checkpoints: int
    log_every: int
    eval_every: int


# ----------------------------------------------------------------------------- setup
@dataclass
class Setup:
    """Where a run executes: its folder, device, autocast dtype and place among DDP ranks."""

    run_dir: Path
    device: torch.device
    amp: torch.dtype | None
    world: int
    rank: int
    local: int
    resume: bool = False  # a checkpoint to continue from: --resume, and the folder has one

    @property
    def main(self) -> bool:
        """True on the process that writes (rank 0)."""
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        """The run's checkpoint folder."""
        return self.run_dir / "checkpoints"


def setup_run(cfg: TrainConfig, run_dir: Path, resume: bool, overwrite: bool) -> Setup:
    """Resolve the device (before touching the folder: a bad --device changes nothing), prepare
    the run folder on rank 0 and join the torchrun process group."""
    from ofactl.runtime import autocast_dtype, resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device)
    run_dir = Path(run_dir)
    if rank == 0:
        prepare_run_dir(run_dir, resume, overwrite)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            if device.type != "cuda":  # a stopped run leaves the group before the interpreter's teardown
                atexit.register(_leave_group)
    # each rank looks for itself: prepare_run_dir touches no checkpoint under --resume, so all agree
    return Setup(run_dir, device, autocast_dtype(cfg.precision, device), world, rank, local,
                 resume=resume and has_checkpoint(run_dir))


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Make ``run_dir`` ready: keep it for --resume, clear it for --overwrite, refuse a non-empty
    one otherwise.

    --resume on a folder without a checkpoint yet (missing, empty, or a job killed before its
    first save) starts at step 0, as a requeued job expects. Its files stay (a fitted k-means is
    reused; :func:`train` starts a new metrics.jsonl), and :func:`check_resume` still refuses
    other settings or another corpus.
    """
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if resume:
            return
        if not overwrite:
            raise OfactlError(f"{run_dir} is not empty; pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(run_dir)
    make_dir(run_dir)


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir/checkpoints`` holds a checkpoint file (readable or not)."""
    return any((Path(run_dir) / "checkpoints").glob("step-*.pt"))


def fresh_start_note(run_dir: Path) -> str:
    """What --resume says when there is nothing to continue."""
    return f"--resume: no checkpoint in {Path(run_dir) / 'checkpoints'} yet; starting at step 0"


# Settings a resumed run may change: where and how fast it runs, how often it logs and saves, and
# how long it goes on. Every other setting shapes the weights, so continuing under another value
# would leave a run that neither config.yaml describes.
RESUME_FREE = frozenset({"steps", "device", "precision", "num_workers", "ckpt_every", "keep_checkpoints",
                         "log_every", "eval_every"})
# Settings that name a file: the same file written another way (relative, absolute, via a link) is no change.
PATH_SETTINGS = frozenset({"teacher", "from_ckpt"})


def record_run(cfg: Any, section: str, run_dir: Path, corpus: Corpus) -> None:
    """Write what a run is made of beside it: its resolved settings (``config.yaml``) and which
    corpus it learns from (``corpus.json``), so ``--resume`` can refuse another of either."""
    from ofactl.config import save_resolved

    save_resolved(cfg, section, Path(run_dir) / "config.yaml")
    write_text(Path(run_dir) / "corpus.json", json.dumps(corpus_record(corpus), indent=1) + "\n")


def corpus_record(corpus: Corpus) -> dict[str, Any]:
    """Which utterances a corpus holds: source, count, hours and a digest of ids and lengths (not
    paths, which may be written another way the next time)."""
    h = hashlib.sha256()
    for u in corpus:
        h.update(f"{u.id}\t{u.n_samples}\t{u.sample_rate}\n".encode())
    return {"source": str(corpus.source), "utterances": len(corpus),
            "hours": round(sum(u.seconds for u in corpus) / 3600, 4), "sha256": h.hexdigest()}


def check_resume(cfg: Any, section: str, run_dir: Path, corpus: Corpus) -> None:
    """Refuse ``--resume`` under other settings or on another corpus than the run started with."""
    check_resume_settings(cfg, section, run_dir)
    path = Path(run_dir) / "corpus.json"
    if not path.is_file():  # a run written before corpora were recorded
        return
    now = corpus_record(corpus)
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        before = f"{old['source']} ({old['utterances']} utterances, {old['hours']} h)"
        same = old["sha256"] == now["sha256"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"--resume: cannot read {path} ({e}); start over with --overwrite") from None
    if not same:
        raise CheckpointError(f"--resume: {run_dir} learns from {before}, not from --corpus {now['source']} "
                              f"({now['utterances']} utterances, {now['hours']} h); pass that corpus or start "
                              "over with --overwrite")


def check_resume_settings(cfg: Any, section: str, run_dir: Path) -> None:
    """Refuse ``--resume`` under settings other than those the run started with (its
    ``config.yaml``), naming each one with both values. Keys only one side has (a run written
    by an older ofactl) are not compared."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = saved_settings(run_dir, section)
    except CheckpointError as e:
        raise CheckpointError(f"--resume: {e}; start over with --overwrite") from None
    diff = changed_settings(saved, cfg)
    if diff:
        raise CheckpointError(f"--resume: {run_dir} was started with other settings ({diff}); continue it with "
                              f"its own (-c {path}) or start over with --overwrite")


def saved_settings(run_dir: Path, section: str) -> dict[str, Any]:
    """The ``section`` settings a run recorded in its ``config.yaml``; one clear error when that
    file is missing, damaged or of another command."""
    import yaml

    from ofactl.config import safe_load

    path = Path(run_dir) / "config.yaml"
    try:
        saved = (safe_load(path.read_text(encoding="utf-8")) or {}).get(section)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as e:  # a damaged record vouches for nothing
        raise CheckpointError(f"cannot read {path} ({e})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} holds no '{section}' settings; is {run_dir} a {section} run?")
    return saved


def changed_settings(saved: dict[str, Any], cfg: Any) -> str:
    """The settings that shape the weights on which ``cfg`` differs from a run's saved ones, as
    ``key: old -> new`` (empty when none; keys only one side has are not compared)."""
    from ofactl.config import to_dict

    old, new = _flat(saved), _flat(to_dict(cfg))
    changed = [k for k in old.keys() & new.keys()
               if old[k] != new[k] and k.split(".")[0] not in RESUME_FREE
               and not (k in PATH_SETTINGS and _same_file(old[k], new[k]))]
    return ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(changed))


def _same_file(a: Any, b: Any) -> bool:
    """Whether two path settings name one existing file (relative ones from the working folder)."""
    try:
        return isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(a).samefile(b)
    except OSError:
        return False


def _flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _leave_group() -> None:
    """At exit: the gloo process group a run that stopped with an error did not leave (a finished
    run leaves it in :func:`finish_distributed`; then this does nothing)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def finish_distributed(world: int) -> None:
    """Leave the process group (after the last collective) when running distributed."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- data
def perturb_speed(wav: Tensor, factor: float) -> Tensor:
    """(S,) 16 kHz audio played ``factor`` times as fast: resampled, so about S / factor samples,
    with tempo, pitch and formants all scaled by ``factor`` (speed perturbation)."""
    import torchaudio.functional as AF

    return AF.resample(wav, orig_freq=round(SR * factor), new_freq=SR)


def stretch_frames(a: np.ndarray, factor: float) -> np.ndarray:
    """A per-frame array of the original audio on the frame grid of the audio ``factor`` times as
    fast: frame j of the perturbed audio takes the original frame nearest to time j * factor."""
    n = int(len(a) / factor) + 1
    src = np.minimum(np.floor(np.arange(n) * factor + 0.5).astype(np.int64), len(a) - 1)
    return a[src]


class CropBatches(torch.utils.data.Dataset):
    """Item k = the k-th batch of a planned schedule: cropped, padded audio, and each
    per-utterance frame array of ``aligned`` (segment ids, unit targets) cropped to the same
    frames and padded with -1 (key ``aligned``). With ``speeds``, each utterance is first played
    at a speed drawn from them (seeded by step) and its frame arrays stretched to match."""

    def __init__(self, schedule: list[tuple[int, list[int]]], utts: list[Utterance], crop: int, seed: int,
                 aligned: dict[str, np.ndarray] | None, hop: int, speeds: tuple[float, ...] = ()) -> None:
        self.schedule, self.utts, self.crop, self.seed, self.aligned, self.hop = schedule, utts, crop, seed, aligned, hop
        self.speeds = tuple(speeds)

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, k: int) -> dict[str, Any]:
        step, idx = self.schedule[k]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        wavs, arrs = [], []
        for i in idx:
            u = self.utts[i]
            try:
                w = load_audio(u.path)
            except AudioError as e:  # gone bad since the run started: said by the main process, as it is
                return {"step": step, "error": e}
            a = self.aligned[u.id] if self.aligned is not None else None
            if self.speeds:  # drawn only when asked, so runs without it see the same crops as before
                factor = self.speeds[int(torch.randint(len(self.speeds), (1,), generator=g))]
                if factor != 1.0:
                    w = perturb_speed(w, factor)
                    a = stretch_frames(a, factor) if a is not None else None
            start = 0
            if len(w) > self.crop:
                # crop on the frame grid so frame-level arrays shift by whole frames
                n_starts = (len(w) - self.crop) // self.hop + 1
                start = int(torch.randint(n_starts, (1,), generator=g)) * self.hop
                w = w[start : start + self.crop]
            wavs.append(w)
            if a is not None:
                f0 = start // self.hop
                arrs.append(torch.from_numpy(a[f0 : f0 + len(w) // self.hop + 1].astype(np.int64)))
        out = {"step": step, "idx": idx, "wav": torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True),
               "lengths": torch.tensor([len(w) for w in wavs])}
        if arrs:
            out["aligned"] = torch.nn.utils.rnn.pad_sequence(arrs, batch_first=True, padding_value=-1)
        return out


def make_epoch(utts: list[Utterance], budget: int, crop: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches under the audio budget, in a seeded random order."""
    from ofactl.extract import plan_batches

    lens = [min(u.n_samples_16k, crop) for u in utts]
    order = sorted(range(len(utts)), key=lambda i: (lens[i], utts[i].id))
    batches = plan_batches(order, lens, budget)
    perm = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    return [batches[p] for p in perm]


def schedule_from(utts: list[Utterance], cfg: TrainConfig, start_step: int, world: int,
                  rank: int) -> list[tuple[int, list[int]]]:
    """(micro-step, utterance indices) for this rank from ``start_step`` to the end of training.

    Each optimizer step consumes ``accum * world`` batches; rank r takes every world-th.
    """
    budget = int(cfg.batch_seconds * SR)
    crop = int(cfg.crop_seconds * SR)
    per_step = cfg.optim.accum * world
    out: list[tuple[int, list[int]]] = []
    need = cfg.steps * per_step
    if not utts:  # make_epoch would give no batches, and this loop would never end
        raise CorpusError("no training utterances")
    pos, epoch = 0, 0
    while pos < need:
        for b in make_epoch(utts, budget, crop, cfg.seed, epoch):
            if pos >= need:
                break
            micro_step = pos // world  # one per (step, accum slot)
            if pos % world == rank and micro_step // cfg.optim.accum >= start_step:
                out.append((micro_step, b))
            pos += 1
        epoch += 1
    return out


def held_batches(held: list[Utterance], crop: int, budget: int = 60 * SR) -> list[tuple[Tensor, Tensor]]:
    """Held-out utterances (cropped to ``crop`` samples) in padded batches of about ``budget``."""
    out, cur = [], []
    for u in held:
        cur.append(load_audio(u.path)[:crop])
        if sum(len(w) for w in cur) >= budget:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return [(torch.nn.utils.rnn.pad_sequence(b, batch_first=True), torch.tensor([len(w) for w in b])) for b in out]


def read_train_corpus(corpus: str | Path | Corpus, conv_layers: Any, speeds: Sequence[float] = (),
                      progress: Progress | None = None) -> Corpus:
    """The training corpus, every bad file reported in one CorpusError before any work; a Corpus
    passes as it is. Too short counts: below one frame of the CNN ``conv_layers`` once sped up by
    the fastest of ``speeds`` (speed perturbation shortens audio by its factor). Recordings
    sampled below 8 kHz are noted on ``progress``."""
    from ofactl.audio import read_corpus
    from ofactl.model.windowed import min_input_samples

    if not isinstance(corpus, Corpus):
        corpus = read_corpus(corpus, min_samples_16k=min_input_samples(conv_layers, max((1.0, *speeds))))
    if progress is not None and (note := corpus.narrowband_note()):
        progress.log(f"note: {note}")
    return corpus


def split_held_out(utts: list[Utterance], n_eval: int, seed: int) -> tuple[list[Utterance], list[Utterance]]:
    """(train, held-out): the manifest's dev split when it has one, else a seeded sample.

    Fewer than two utterances is a CorpusError: one is held out, and training needs the rest.
    """
    if len(utts) < 2:
        raise CorpusError(f"the corpus has {len(utts)} usable utterance(s); training needs at least 2 "
                          "(one is held out for evaluation)")
    dev = [u for u in utts if u.labels.get("split") == "dev"]
    rest = [u for u in utts if u.labels.get("split") in ("train", None, "")]
    if dev and rest:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(dev), generator=g)[:n_eval].tolist()
        return rest, [dev[i] for i in sorted(pick)]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(utts), generator=g).tolist()
    n = min(n_eval, max(1, len(utts) // 10))
    held = set(perm[:n])
    return [u for i, u in enumerate(utts) if i not in held], [utts[i] for i in sorted(held)]


# ----------------------------------------------------------------------------- optimisation
def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` of the steps, then linear decay to ``final_lr_ratio``."""
    warm = max(1, int(cfg.optim.warmup * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, cfg.steps - warm)
    return 1.0 - (1.0 - cfg.optim.final_lr_ratio) * min(1.0, frac)


@dataclass
class RunTotals:
    """A run's audio read (seconds, every rank's) and wall time (seconds), summed over all its
    invocations: checkpoints carry them, so a resumed run adds to what came before."""

    audio_seconds: float = 0.0
    wall_seconds: float = 0.0

    def plus(self, audio_seconds: float, wall_seconds: float) -> RunTotals:
        """These totals with one more stretch of training added."""
        return RunTotals(self.audio_seconds + audio_seconds, self.wall_seconds + wall_seconds)


def result_json(result: Any) -> dict[str, Any]:
    """A training result (``distill``'s, ``pretrain``'s) as JSON-safe data: paths as text, this
    invocation's ``audio_s_per_s``, and the run's ``total_audio_seconds`` and
    ``total_wall_seconds`` from its ``totals`` (null when unknown)."""
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items() if k != "totals"}
    d["audio_s_per_s"] = round(result.audio_seconds / result.wall_seconds, 2) if result.wall_seconds else None
    t = result.totals
    return d | {"total_audio_seconds": None if t is None else round(t.audio_seconds, 3),
                "total_wall_seconds": None if t is None else round(t.wall_seconds, 3)}


@dataclass
class Optimisation:
    """The optimiser, its schedule and the fp16 gradient scaler, saved and restored together
    with the run's totals (``None`` after resuming a checkpoint that predates them: unknown)."""

    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    totals: RunTotals | None = field(default_factory=RunTotals)

    def state(self, seed: int) -> dict[str, Any]:
        """What a checkpoint needs to continue exactly: optimizer, schedule, scaler, RNG, totals."""
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), **rng_state(), "seed": seed,
                "totals": None if self.totals is None else asdict(self.totals)}

    def load(self, ts: dict[str, Any]) -> None:
        """Restore what :meth:`state` saved (optimiser, schedule, scaler, RNG and totals)."""
        self.opt.load_state_dict(ts["optimizer"])
        self.sched.load_state_dict(ts["scheduler"])
        self.scaler.load_state_dict(ts["scaler"])
        set_rng_state(ts)
        t = ts.get("totals")
        self.totals = RunTotals(float(t["audio_seconds"]), float(t["wall_seconds"])) if isinstance(t, dict) else None


def make_optimisation(params: Any, cfg: TrainConfig, amp: torch.dtype | None) -> Optimisation:
    """AdamW over ``params`` with the warm-up/decay schedule of ``cfg``, and a gradient scaler
    that is active for fp16 only.
    """
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    return Optimisation(opt, sched, scaler)


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records of ``path`` (metrics.jsonl) logged after ``step``, the step a resumed
    run continues from, so its log has each step once. Returns the number of records dropped.
    A torn last line (a kill mid-write) is dropped too."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(rec.get("step", 0)) <= step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        write_text(path, "".join(ln + "\n" for ln in keep))
    return dropped


# ----------------------------------------------------------------------------- the loop
@dataclass
class Job:
    """What a training job brings to :func:`train`.

    ``step_loss(batch, generator)`` returns (loss tensor, float metrics) for one micro-batch;
    ``after_step(metrics of the step's micro-batches)`` runs after each optimizer step (e.g. an
    EMA); ``save(path, step, train_state)`` writes a checkpoint atomically; ``load(payload)``
    restores the model from one and returns its train state; ``read(path)`` reads a checkpoint
    file; ``evaluate()`` returns held-out figures, logged as ``eval``.
    """

    name: str
    model: torch.nn.Module  # the module whose parameters train (:func:`train` wraps it in DDP under torchrun)
    params: Any
    step_loss: Callable[[dict[str, Any], torch.Generator], tuple[Tensor, dict[str, float]]]
    save: Callable[[Path, int, dict[str, Any]], None]
    read: Callable[[Path], dict[str, Any]]
    load: Callable[[dict[str, Any]], dict[str, Any]]
    evaluate: Callable[[], dict[str, Any]] | None = None
    after_step: Callable[[list[dict[str, float]]], dict[str, float]] | None = None
    progress_keys: tuple[str, ...] = ("loss",)


@dataclass
class LoopResult:
    """Where the loop stopped: last step, first step, the audio seconds read (every rank's) and
    wall time of this invocation (a resumed run counts from its checkpoint), and the run's
    totals over all its invocations (``None`` when an earlier one did not record them)."""

    step: int
    start: int
    audio_seconds: float
    wall_seconds: float
    totals: RunTotals | None = None


def resume_from(ckpt_dir: Path, job: Job, optim: Optimisation) -> int:
    """Load the newest readable checkpoint (a corrupt newest one falls back to the previous);
    returns its step."""
    errors = []
    for p in sorted(ckpt_dir.glob("step-*.pt"), reverse=True):
        try:
            obj = job.read(p)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        try:
            ts = job.load(obj)
        except RuntimeError as e:
            raise CheckpointError(f"{p}: does not match this run's model ({str(e).splitlines()[0]})") from None
        optim.load(ts)
        return int(obj["step"])
    raise CheckpointError("--resume: no readable checkpoint (" + "; ".join(errors) + ")")


def starting_step(job: Job, optim: Optimisation, setup: Setup, resume: bool, progress: Progress) -> int:
    """The step training starts from: under ``--resume``, the newest readable checkpoint's (its
    model, optimiser and totals restored), else 0; ``--resume`` says which."""
    start = resume_from(setup.ckpt_dir, job, optim) if setup.resume else 0
    if resume:
        progress.log(f"resuming from step {start}" if setup.resume else fresh_start_note(setup.run_dir))
    return start


def train(job: Job, cfg: TrainConfig, setup: Setup, optim: Optimisation, loader: Any, start: int,
          progress: Progress) -> LoopResult:
    """The optimisation loop: micro-batches, accumulation, clipping, logging, evaluation,
    checkpoints, and Ctrl-C, SIGTERM or SIGHUP saved at the next step boundary (raised as
    InterruptedRun, TerminatedRun for SIGTERM, HungUpRun for SIGHUP)."""
    metrics = _open_metrics(setup, start)
    meter = _Meter(optim.totals)
    step, step_audio = start, 0.0  # step_audio: this rank's audio in the step under way
    acc: list[dict[str, float]] = []
    boundary_rng = rng_state() if cfg.optim.accum > 1 else None  # a step of several micro-batches
    with data_parallel(job, setup), deferred_stop() as stop:
        progress.start(job.name, cfg.steps)  # after DDP's start, which can fail, so no bar is left open
        if start:
            progress.advance(start)
        job.model.train()
        try:
            for batch in loader:
                _check_readable(batch, setup)
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + batch["step"] + 17)
                loss, m = job.step_loss(batch, gen)
                optim.scaler.scale(loss / cfg.optim.accum).backward()
                acc.append({"loss": float(loss.detach()), **m})
                step_audio += float(batch["lengths"].sum()) / SR
                if len(acc) < cfg.optim.accum:
                    continue
                gnorm = _optimizer_step(job, cfg, optim)
                step += 1
                stop_now, all_audio = _step_agreed(stop.requested, step_audio, setup)
                step_audio = 0.0
                optim.totals = meter.add(all_audio)
                extra = job.after_step(acc) if job.after_step else {}
                mean = _mean_metrics(acc)
                if setup.main and (step % cfg.log_every == 0 or step == cfg.steps):
                    _write(metrics, {"step": step, **mean, **extra, "lr": optim.sched.get_last_lr()[0],
                                     "grad_norm": gnorm, **meter.record()})
                shown = {k: v for k, v in mean.items() if k in job.progress_keys}
                progress.advance(1, **shown, h_per_s=round(meter.audio / 3600 / max(meter.wall, 1e-9), 4))
                acc = []
                boundary_rng = rng_state() if boundary_rng is not None else None
                _evaluate_and_save_when_due(job, cfg, setup, optim, metrics, step)
                if stop_now:
                    raise KeyboardInterrupt
        except (KeyboardInterrupt, _UnreadableBatch) as e:
            progress.finish()
            if setup.main and step > start:  # the steps finished, with the RNG as it stood after the last
                _save_checkpoint(job, cfg, setup, optim, step, boundary_rng if acc else None)
            raise _stop_error(e, stop.signum, step, _what_was_saved(setup, step > start)) from None
        finally:
            progress.finish()
            if metrics is not None:
                metrics.close()
    optim.totals = meter.add(0.0)
    _save_checkpoint(job, cfg, setup, optim, step)
    return LoopResult(step, start, meter.audio, meter.wall, optim.totals)


@contextmanager
def data_parallel(job: Job, setup: Setup) -> Iterator[None]:
    """``job.model`` wrapped in DDP for the loop under torchrun, and itself again after the loop,
    however the loop ends. The wrapper goes with the loop: its reducer holds the process group, so
    a wrapper left in the job kept the group alive past :func:`finish_distributed` into the
    interpreter's teardown, where gloo's threads can abort a rank that did everything right."""
    if setup.world == 1:
        yield
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    plain = job.model
    job.model = DDP(plain, device_ids=[setup.device.index] if setup.device.type == "cuda" else None)
    try:
        yield
    finally:
        job.model = plain  # the job held the only reference: the wrapper goes now, not at exit


def _open_metrics(setup: Setup, start: int) -> Any:
    """Rank 0's metrics.jsonl, open for appending: cut back to ``start`` on resume, so each step
    is logged once; new at step 0, since a log left by a job killed before its first checkpoint
    is not this run's. Other ranks: None."""
    if not setup.main:
        return None
    path = setup.run_dir / "metrics.jsonl"
    if start:
        truncate_metrics(path, start)
    else:
        path.unlink(missing_ok=True)
    return open(path, "a")  # train closes it


class _Meter:
    """Audio read by every rank (s) and wall time (s) of this invocation, on top of the run's
    earlier invocations (``before``; None when unknown)."""

    def __init__(self, before: RunTotals | None) -> None:
        self.before, self.t0 = before, time.perf_counter()
        self.audio = self.wall = 0.0
        self.marked = (0.0, 0.0)  # (audio, wall) at the last metrics record

    def add(self, audio_seconds: float) -> RunTotals | None:
        """Count one step's audio (all ranks); the run's totals up to now."""
        self.audio, self.wall = self.audio + audio_seconds, time.perf_counter() - self.t0
        return None if self.before is None else self.before.plus(self.audio, self.wall)

    def record(self) -> dict[str, float]:
        """A metrics record's speed (since the previous record, so a pause shows only in its own
        gap) and this invocation's elapsed time."""
        speed = (self.audio - self.marked[0]) / max(self.wall - self.marked[1], 1e-9)
        self.marked = (self.audio, self.wall)
        return {"audio_s_per_s": round(speed, 2), "elapsed_s": round(self.wall, 2)}


def _evaluate_and_save_when_due(job: Job, cfg: TrainConfig, setup: Setup, optim: Optimisation, metrics: Any,
                                step: int) -> None:
    """After ``step``: the held-out evaluation (rank 0) and the checkpoint, each when its interval
    says so; the last step's are the caller's."""
    if job.evaluate and cfg.eval_every and step % cfg.eval_every == 0 and setup.main and step < cfg.steps:
        ev = job.evaluate()
        job.model.train()
        _write(metrics, {"step": step, "eval": ev})
    if step % cfg.ckpt_every == 0 and step < cfg.steps:
        _save_checkpoint(job, cfg, setup, optim, step)


class _UnreadableBatch(Exception):
    """A recording of the batch could not be read (``error``: the AudioError saying why)."""

    def __init__(self, error: AudioError) -> None:
        super().__init__(str(error))
        self.error = error


def _check_readable(batch: dict[str, Any], setup: Setup) -> None:
    """Raise :class:`_UnreadableBatch` when a recording of this micro-batch could not be read: on
    this rank or, under DDP, on any (one all-reduce of a flag per rank, before any rank starts the
    backward whose gradient all-reduce the others would wait in), so every rank stops at the same
    micro-batch and rank 0 saves the steps finished."""
    error: AudioError | None = batch.get("error")
    if setup.world > 1:
        import torch.distributed as dist

        flags = torch.zeros(setup.world, device=setup.device)
        flags[setup.rank] = float(error is not None)
        dist.all_reduce(flags)
        if error is None and bool(flags.any()):
            error = AudioError(f"rank {int(flags.nonzero()[0, 0])} could not read a recording of its batch "
                               "(its own error names it)")
    if error is not None:
        raise _UnreadableBatch(error)


def _what_was_saved(setup: Setup, took_steps: bool) -> str:
    """How a stopped rank's message ends: rank 0 saves the steps taken, the others say so."""
    if not took_steps:
        return "nothing new to save (no step since the start)"
    return "checkpoint saved" if setup.main else "rank 0 saves the checkpoint"


def _stop_error(e: BaseException, signum: int | None, step: int, saved: str) -> OfactlError:
    """What a loop stopped at ``step`` raises: by Ctrl-C, SIGTERM, SIGHUP (``signum``: the signal
    that asked for the stop, None for none) or an unreadable recording; ``saved``: what happened
    to the steps taken (:func:`_what_was_saved`)."""
    if isinstance(e, _UnreadableBatch):
        return type(e.error)(f"{e.error}; at step {step}: {saved}, continue with --resume once it reads again")
    how, code = how_stopped(e.signum if isinstance(e, Terminated) else signum)
    error = {TerminatedRun.exit_code: TerminatedRun, HungUpRun.exit_code: HungUpRun}.get(code, InterruptedRun)
    return error(f"{how} at step {step}; {saved}, continue with --resume")


def _save_checkpoint(job: Job, cfg: TrainConfig, setup: Setup, optim: Optimisation, at: int,
                     rng: dict[str, Any] | None = None) -> None:
    """Rank 0: ``checkpoints/step-N.pt``, keeping the newest ``keep_checkpoints``; ``rng``: the
    RNG state to record instead of the current one (a step's, saved after part of the next)."""
    if not setup.main:
        return
    job.save(setup.ckpt_dir / f"step-{at:08d}.pt", at, {**optim.state(cfg.seed), **(rng or {})})
    for p in sorted(setup.ckpt_dir.glob("step-*.pt"))[: -max(1, cfg.keep_checkpoints)]:
        p.unlink(missing_ok=True)


def _optimizer_step(job: Job, cfg: TrainConfig, optim: Optimisation) -> float:
    """Unscale, clip, step optimizer, scaler and schedule; returns the gradient norm."""
    optim.scaler.unscale_(optim.opt)
    gnorm = torch.nn.utils.clip_grad_norm_(job.params, cfg.optim.grad_clip)
    optim.scaler.step(optim.opt)
    optim.scaler.update()
    optim.opt.zero_grad(set_to_none=True)
    optim.sched.step()
    return float(gnorm)


def _mean_metrics(acc: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in acc[0]:
        vals = [a[k] for a in acc]
        if isinstance(vals[0], list):
            out[k] = [round(float(x), 5) for x in np.mean(np.asarray(vals, dtype=np.float64), axis=0)]
        else:
            out[k] = round(sum(float(v) for v in vals) / len(vals), 6)
    return out


def _write(metrics: Any, rec: dict[str, Any]) -> None:
    if metrics is not None:
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()


def _step_agreed(requested: bool, audio_seconds: float, setup: Setup) -> tuple[bool, float]:
    """After a step, one all-reduce over the ranks: whether any was asked to stop (Ctrl-C), so
    every rank stops after the same step, and the audio seconds the step read on all ranks."""
    if setup.world == 1:
        return requested, audio_seconds
    import torch.distributed as dist

    both = torch.tensor([1.0 if requested else 0.0, audio_seconds], dtype=torch.float64, device=setup.device)
    dist.all_reduce(both)
    return bool(both[0].item() > 0), float(both[1].item())


def ranks_in_sync(model: torch.nn.Module) -> bool:
    """Whether every DDP rank holds the same parameters (a checksum gathered from each)."""
    import torch.distributed as dist

    vec = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    s = torch.stack([vec.sum(), (vec * torch.arange(len(vec), dtype=vec.dtype, device=vec.device) % 1000).sum()])
    gathered = [torch.zeros_like(s) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, s)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def make_loader(schedule: list[tuple[int, list[int]]], utts: list[Utterance], cfg: TrainConfig, setup: Setup,
                aligned: dict[str, np.ndarray] | None, hop: int, start: int, speeds: tuple[float, ...] = ()) -> Any:
    """The DataLoader over :class:`CropBatches` from step ``start`` on (seeded, so a resumed run
    sees the same batches); ``speeds``: speed perturbation factors (none by default).
    """
    return torch.utils.data.DataLoader(
        CropBatches(schedule, utts, int(cfg.crop_seconds * SR), cfg.seed, aligned, hop, speeds), batch_size=None,
        num_workers=cfg.num_workers, pin_memory=setup.device.type == "cuda",
        prefetch_factor=2 if cfg.num_workers else None,
        # its own generator: creating the iterator must not draw from the global RNG, or a
        # resumed run's dropout would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(cfg.seed + start),
        worker_init_fn=worker_init() if cfg.num_workers else None)
