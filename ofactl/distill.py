"""``ofactl distill``: once-for-all distillation of a student from a HuBERT teacher.

Each step: length-bucketed batch (random crops) -> frozen teacher hidden states -> a rate drawn
per utterance -> student at those rates -> L1 + (-log sigmoid(cosine)) per prediction head on
valid frames, plus alpha guidance. Targets are compressed with the student's detached CIF
weights (alignment "compress", the default), the student's outputs are upsampled back to
20 ms ("upsample"), or both losses are mixed ("both").

Runs are resumable and reproducible: every random draw of a step (crops, rates, lambda mode)
comes from a generator seeded by (seed, step), and checkpoints hold optimizer, scheduler,
scaler and global RNG state, so ``--resume`` continues exactly as an uninterrupted run (CPU).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ofactl.atomic import atomic_path, write_text
from ofactl.audio import Corpus, Utterance, load_audio, median_level_db
from ofactl.choices import Alignment, CompressWeight, Precision, RateDraw, RateKind, SpectralAlignment
from ofactl.config import Flag, to_dict
from ofactl.errors import ConfigError
from ofactl.model.compress import expected_ratio, length_mask, rate_to_lambda
from ofactl.model.student import Student, StudentConfig, student_config
from ofactl.progress import NullProgress, Progress
from ofactl.runtime import SAMPLE_RATE as SR
from ofactl.runtime import autocast, seed_all
from ofactl.training import OptimConfig, RunTotals, held_batches, result_json, split_held_out


@dataclass
class RateConfig:
    """Rate sampling while distilling. period: frame period ~ U[min_ms, max_ms]; lambda: lambda ~
    U[lambda_min, lambda_max]; fixed: always ``rate``. ``draw``: one value per utterance or one
    per batch; a ``full_fraction`` share of draws is rate 1 instead. On an ``exact_fraction``
    share of steps the student runs in exact-length mode (round(rate * T) frames); on the others
    in lambda mode (content-dependent lengths)."""

    # period: frame period ~ U[min_ms, max_ms]; lambda: lambda ~ U[lambda_min, lambda_max]; fixed: rate
    kind: RateKind = "period"
    draw: RateDraw = "utterance"  # utterance: one draw per utterance; batch: one per batch (the reference code's)
    min_ms: float = 20.0  # shortest frame period drawn (ms, >= 20)
    max_ms: float = 90.0  # longest frame period drawn (ms)
    lambda_min: float = 0.0  # smallest lambda drawn (kind: lambda)
    lambda_max: float = 1.0  # largest lambda drawn (kind: lambda)
    rate: float = 1.0  # the one rate of kind: fixed
    exact_fraction: float = 0.5  # share of steps in exact-length mode at the drawn rate (others: lambda mode)
    full_fraction: float = 0.0  # share of draws at rate 1, the 20 ms model (period 20-90 ms gives rate >= 0.8 on 7%)

    def validate(self) -> None:
        """Raise ValueError for a range or rate outside (0, 1] / [20 ms, ...)."""
        if not 20.0 <= self.min_ms <= self.max_ms:
            raise ValueError("rates: need 20 <= min_ms <= max_ms")
        if not 0.0 <= self.lambda_min <= self.lambda_max < 2.0:
            raise ValueError("rates: need 0 <= lambda_min <= lambda_max < 2")
        if not 0 < self.rate <= 1:
            raise ValueError("rates.rate must be in (0, 1]")
        if not 0.0 <= self.full_fraction <= 1.0:
            raise ValueError("rates.full_fraction must be in [0, 1]")


@dataclass
class GuidanceConfig:
    """Alpha guidance. boundaries: auto | none | phone_times | PATH.tsv."""

    # auto (k-means units of a teacher layer, DP-segmented), none, phone_times (a manifest's oracle
    # phone starts, e.g. ofactl synth's), or a TSV of segment ends
    boundaries: str = "auto"
    seg_weight: float = 0.05  # weight of the segment-count loss on alpha
    frame_weight: float = 0.5  # weight of the frame-level boundary loss on alpha
    quantity_weight: float = 0.5  # weight of the quantity loss (sum of alpha against the target count)
    quantity_ratio: float = 0.25  # with boundaries=none: target sum(alpha)/T
    kmeans_k: int = 50  # teacher-unit clusters for boundaries: auto
    kmeans_layer: int = -1  # teacher hidden state; -1: the middle one
    kmeans_utts: int = 200  # utterances sampled to fit those clusters
    seg_penalty: float = 2.0  # penalty per segment when smoothing unit runs into segments


@dataclass
class DistillConfig:
    """Settings of ``ofactl distill``: teacher, student, rate sampling, alignment, guidance and training."""

    student: StudentConfig = field(default_factory=lambda: student_config("base"))
    teacher: str = ""  # builtin:NAME (hubert-tiny-v3, ...), random:tiny|base, or a HuBERT file/folder; none by
    # default: distill refuses to start without one rather than learn from an untrained model unasked
    init_from_teacher: bool = True  # copy the teacher's CNN, projection and first layers where shapes match
    compressor_rate: float = 0.5  # the rate of a fixed-rate avgpool student
    steps: int = 1000  # optimizer steps
    batch_seconds: float = 120.0  # audio seconds per batch (before padding)
    crop_seconds: float = 15.6  # longest crop of one utterance (s)
    alignment: Alignment = "compress"  # compress: loss on compressed frames (teacher alike); upsample: on the 20 ms grid;
    # both: (1 - upsample_share) x compress + upsample_share x upsample
    upsample_share: float = 0.5  # both only: the upsample loss's share of the mix, in (0, 1)
    spectral_alignment: SpectralAlignment = "same"  # the log-mel head's own alignment (student.spectral_bins > 0):
    # same: as alignment; compress or upsample: that one for the log-mel head, alignment for the teacher heads
    compress_weight: CompressWeight = "frame"  # compress only. frame: every compressed frame counts once, so in a
    # batch of mixed rates a rate-0.25 utterance counts a quarter of a rate-1 one; audio: a frame counts by the
    # 20 ms frames it stands for, so every second of audio counts alike at every rate (as upsample's loss does)
    upsample_alpha_grad: bool = True  # upsample and both only. false: the upsampling weights are detached, so the loss
    # reaches the CIF weights only through the averaging of the student's own frames (as with compress)
    spectral_weight: float = 1.0  # weight of the log-mel head (student.spectral_bins > 0)
    rates: RateConfig = field(default_factory=RateConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    device: str = "auto"  # auto, cpu, cuda or cuda:N (auto under torchrun: this rank's GPU)
    precision: Precision = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (CUDA)
    num_workers: int = 2  # audio decoding worker processes
    seed: int = 0  # seeds initialisation, data order, crops and rate draws
    ckpt_every: int = 200  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept
    log_every: int = 10  # steps between metrics.jsonl records
    eval_every: int = 0  # 0: only before and after training
    eval_utts: int = 32  # held-out utterances for the evaluation
    eval_rates: tuple[float, ...] = (1.0, 0.5, 0.25)  # rates the held-out loss is reported at
    alpha_momentum: float = 0.98  # momentum of the running mean of alpha (maps rates to lambdas)

    @property
    def alignments(self) -> tuple[str, str]:
        """The alignment of the teacher heads and of the log-mel head."""
        return self.alignment, self.alignment if self.spectral_alignment == "same" else self.spectral_alignment

    def validate(self) -> None:
        """Raise ValueError for settings that cannot work together (checks the nested sections too)."""
        from ofactl.runtime import check_device_name

        check_device_name(self.device)
        self.student.validate()
        self.rates.validate()
        if self.steps < 1 or self.batch_seconds <= 0 or self.crop_seconds <= 0.1:
            raise ValueError("steps >= 1, batch_seconds > 0 and crop_seconds > 0.1 are required")
        if self.optim.accum < 1:
            raise ValueError("optim.accum must be >= 1")
        if self.student.compressor == "none" and (self.rates.kind != "fixed" or self.rates.rate != 1.0):
            raise ValueError("a student without compressor trains at rate 1: add --rate 1, or set rates.kind=fixed, "
                             "rates.rate=1")
        if self.compress_weight != "frame" and self.alignment != "compress":
            why = ("scores every 20 ms frame alike already" if self.alignment == "upsample"
                   else "weighs its compress half by frame")
            raise ValueError(f"compress_weight={self.compress_weight} weighs compressed frames: it needs "
                             f"alignment=compress (alignment={self.alignment} {why})")
        if self.spectral_alignment != "same" and self.student.spectral_bins <= 0:
            raise ValueError(f"spectral_alignment={self.spectral_alignment} aligns the log-mel head: it needs "
                             "student.spectral_bins > 0 (this student has no log-mel head)")
        if not self.upsample_alpha_grad and not {"upsample", "both"} & set(self.alignments):
            raise ValueError("upsample_alpha_grad=false detaches the upsampling weights: it needs alignment=upsample "
                             "or both, or spectral_alignment=upsample (alignment=compress has no upsampling)")
        if not 0.0 < self.upsample_share < 1.0:
            raise ValueError(f"upsample_share={self.upsample_share}: expected a share strictly between 0 and 1 "
                             "(alignment=compress or upsample is the whole of one loss)")
        if self.upsample_share != 0.5 and self.alignment != "both":
            raise ValueError(f"upsample_share={self.upsample_share} mixes two losses: it needs alignment=both "
                             f"(alignment={self.alignment} has one)")


# ----------------------------------------------------------------------------- losses
def distill_loss(pred: Tensor, target: Tensor, lengths: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-head L1 + (-log sigmoid(cosine)) averaged over valid frames (and dims for L1).

    pred, target: (B, T, H, D); ``weights`` (B,): each utterance's frames count that much in the
    average (default 1). Returns (total, per-head (H,)). Padding never counts.
    """
    valid = length_mask(lengths, pred.shape[1]).float()[..., None]  # (B, T, 1)
    if weights is not None:
        valid = valid * weights.to(valid)[:, None, None]
    n = valid.sum().clamp(min=1)
    p, t = pred.float(), target.float()
    l1 = ((p - t).abs().mean(-1) * valid).sum((0, 1)) / n
    cos = F.cosine_similarity(p, t, dim=-1)
    cosl = (-F.logsigmoid(cos) * valid).sum((0, 1)) / n
    per_head = l1 + cosl
    return per_head.sum(), per_head.detach()


@torch.no_grad()
def prediction_targets(student: Student, teacher: Any, wav: Tensor, lengths: Tensor) -> tuple[list[Tensor], Tensor]:
    """What the heads predict, on the 20 ms grid: teacher states (B, T, H, D) at ``pred_layers``,
    then log-mel frames (B, T, 1, bins) when the student has a spectral head. Returns them with
    the frame lengths (B,)."""
    th = teacher(wav, lengths)
    out = [th.states[:, :, list(student.cfg.pred_layers)]]
    if student.spectral_head is not None:
        from ofactl.model.fbank import log_mel

        mel, n = log_mel(wav, lengths, student.cfg.spectral_bins)
        if not torch.equal(n, th.lengths):
            raise ConfigError("the spectral target needs the standard 400-sample/320-hop CNN grid")
        out.append(F.pad(mel, (0, 0, 0, th.states.shape[1] - mel.shape[1]))[:, :, None])
    return out, th.lengths


def head_losses(out: Any, targets: list[Tensor], t_lengths: Tensor, alignment: str | tuple[str, str],
                spectral_weight: float, compress_weight: str = "frame",
                alpha_grad: bool = True, upsample_share: float = 0.5) -> tuple[Tensor, Tensor]:
    """Loss of every head against its aligned target: (total, per-head (H [+ 1],)).

    ``alignment`` is one for every head, or (teacher heads, log-mel head). ``compress``
    compresses the 20 ms targets with the student's detached CIF plan (with ``compress_weight:
    audio`` each utterance's frames count by its 20 ms frames per compressed frame);
    ``upsample`` upsamples the student's outputs back to 20 ms, through the CIF weights unless
    ``alpha_grad`` is False; ``both`` adds the two, the upsample one weighted ``upsample_share``
    and the compress one the rest. The spectral head (last) is weighted.
    """
    plan = out.compressed.plan
    preds = [out.pred] + ([out.spectral] if out.spectral is not None else [])
    total, per = torch.zeros((), device=out.pred.device), []
    lengths = out.hidden.lengths
    weights = t_lengths / lengths.clamp(min=1) if compress_weight == "audio" else None
    per_head = (alignment, alignment) if isinstance(alignment, str) else alignment
    for i, (pred, tgt) in enumerate(zip(preds, targets)):
        shares = {"compress": {"compress": 1.0}, "upsample": {"upsample": 1.0},
                  "both": {"compress": 1.0 - upsample_share, "upsample": upsample_share}}[per_head[min(i, 1)]]
        loss = ph = torch.zeros((), device=out.pred.device)
        if "compress" in shares:  # the teacher's frames averaged with the student's own (detached) weights
            Bt, T, H, D = tgt.shape
            small = plan.detach().apply(tgt.reshape(Bt, T, H * D)).reshape(Bt, -1, H, D)
            lc, phc = distill_loss(pred, small, lengths, weights)
            loss, ph = loss + shares["compress"] * lc, ph + shares["compress"] * phc
        if "upsample" in shares:  # every 20 ms teacher frame against the student frame that covers it
            Bp, Tp, H, D = pred.shape
            up = (plan if alpha_grad else plan.detach()).upsample(pred.float().reshape(Bp, Tp, H * D))
            lu, phu = distill_loss(up.reshape(Bp, -1, H, D), tgt, t_lengths)
            loss, ph = loss + shares["upsample"] * lu, ph + shares["upsample"] * phu
        w = spectral_weight if i == 1 else 1.0
        total = total + w * loss
        per.append(ph)
    return total, torch.cat(per)


@dataclass
class StepOut:
    """One distillation step's loss and what is logged about it."""

    loss: Tensor
    per_head: Tensor
    seg: Tensor
    frame: Tensor
    achieved: float
    alpha_mean: float


def train_step_loss(student: Any, teacher: Any, batch: dict[str, Any], cfg: DistillConfig,
                    device: torch.device, amp: torch.dtype | None, gen: torch.Generator) -> StepOut:
    """The distillation loss of one batch: sample rates, run teacher and student, align the
    teacher's targets with the student's frames, add the guidance losses.
    """
    from ofactl.model.segment import guidance_losses, guidance_targets, quantity_loss

    core = student.module if hasattr(student, "module") else student
    wav, lengths = batch["wav"].to(device, non_blocking=True), batch["lengths"].to(device)
    B = wav.shape[0]
    targets, t_lengths = prediction_targets(core, teacher, wav, lengths)
    rates, lam, exact = sample_rates(cfg, B, gen, core.alpha_mean)
    with autocast(device, amp):
        out = student(wav, lengths, rate=rates.to(device), lam=None if lam is None else lam.to(device), exact=exact)
    if not torch.equal(out.cnn_lengths, t_lengths):
        raise ConfigError("teacher and student CNNs give different frame counts; they need the same conv layers")
    loss, per_head = head_losses(out, targets, t_lengths, cfg.alignments, cfg.spectral_weight, cfg.compress_weight,
                                 cfg.upsample_alpha_grad, cfg.upsample_share)
    seg = frame = torch.zeros((), device=device)
    a_pred = out.compressed.alpha_pred
    g = cfg.guidance
    if a_pred is not None:
        if "aligned" in batch:  # segment ids on the 20 ms grid (ofactl.training.CropBatches)
            segids = batch["aligned"].to(device)
            S = a_pred.shape[1]
            segids = F.pad(segids, (0, max(0, S - segids.shape[1])), value=-1)[:, :S]
            seg_end, a_pseudo = guidance_targets(segids, out.cnn_lengths)
            seg, frame = guidance_losses(a_pred, out.cnn_lengths, seg_end, a_pseudo)
            loss = loss + g.seg_weight * seg + g.frame_weight * frame
        elif g.boundaries == "none":
            seg = quantity_loss(a_pred, out.cnn_lengths, g.quantity_ratio)
            loss = loss + g.quantity_weight * seg
    valid = length_mask(out.cnn_lengths, out.cnn_lengths.max().item() if B else 0)
    a_mean = float(a_pred.detach()[valid].mean()) if a_pred is not None and valid.any() else core.alpha_mean
    achieved = float(out.hidden.lengths.sum() / out.cnn_lengths.sum().clamp(min=1))
    return StepOut(loss, per_head, seg.detach(), frame.detach(), achieved, a_mean)


def sample_rates(cfg: DistillConfig, B: int, gen: torch.Generator, alpha_mean: float) -> tuple[Tensor, Tensor | None, bool]:
    """Rates (B,) for one step, and lambdas (B,) when the step runs in lambda mode (lengths
    follow the content); (rates, None, True) for an exact-length step.

    ``kind: lambda`` draws lambda and, on exact steps, uses the rate that lambda gives on
    average (by the running mean of alpha); ``period`` and ``fixed`` draw the rate and, on
    lambda steps, use the lambda that gives it on average.
    """
    rc = cfg.rates
    if cfg.student.compressor == "avgpool":
        return torch.full((B,), cfg.compressor_rate, dtype=torch.float64), None, True
    n = B if rc.draw == "utterance" else 1
    am = min(max(alpha_mean, 1e-3), 1 - 1e-3)
    lam: Tensor | None = None
    if rc.kind == "fixed":
        rates = torch.full((n,), rc.rate, dtype=torch.float64)
    elif rc.kind == "period":
        rates = 20.0 / (rc.min_ms + (rc.max_ms - rc.min_ms) * torch.rand(n, generator=gen, dtype=torch.float64))
    else:
        lam = rc.lambda_min + (rc.lambda_max - rc.lambda_min) * torch.rand(n, generator=gen)
        rates = expected_ratio(lam, am).double().clamp(1e-3, 1.0)
    if rc.full_fraction > 0 and rc.kind != "fixed":  # no draw otherwise: the default's stream stays as it was
        full = torch.rand(n, generator=gen) < rc.full_fraction
        rates = torch.where(full, torch.ones_like(rates), rates)
        if lam is not None:
            lam = torch.where(full, rate_to_lambda(1.0, am), lam)
    rates = rates.expand(B).clone()
    exact = bool(torch.rand((), generator=gen) < rc.exact_fraction)
    if exact or cfg.student.compressor != "cif":
        return rates, None, True
    if lam is None:
        lam = rate_to_lambda(rates.float(), am)
    return rates, lam.expand(B).clone(), False


# ----------------------------------------------------------------------------- run
@dataclass
class DistillResult:
    """What ``distill`` made: the student checkpoint, its steps, and held-out loss before and after."""

    run_dir: Path
    student: Path
    steps: int
    resumed_from: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    achieved_rates: dict[str, dict[str, float]]
    audio_seconds: float  # audio read by this invocation (every rank's), from step resumed_from on:
    wall_seconds: float  # a resumed run reports its last stretch, so audio_s_per_s is that stretch's speed
    ranks_in_sync: bool | None
    totals: RunTotals | None = None  # the whole run's, over every invocation; None: unknown

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-safe data (``--json``)."""
        return result_json(self)


def run_distill(
    cfg: DistillConfig,
    corpus: str | Path | Corpus,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    progress: Progress | None = None,
) -> DistillResult:
    """Distill a once-for-all student: set up, build teacher and student, train on the shared
    scaffold (:mod:`ofactl.training`), then save, evaluate and summarise."""
    from ofactl.pidlock import run_folder_lock

    check_teacher_named(cfg)
    with run_folder_lock(run_dir, "distill", progress or NullProgress()):
        return _run_distill(cfg, corpus, run_dir, resume, overwrite, trust_checkpoint, progress)


def check_teacher_named(cfg: DistillConfig) -> None:
    """ConfigError when neither ``--teacher`` nor the preset names a teacher. A preset may leave
    it to the command line (``distilhubert-ofa``: a HuBERT Base checkpoint the user has)."""
    if not cfg.teacher.strip():
        raise ConfigError("distill needs a teacher: --teacher builtin:hubert-tiny-v3 (the bundled one), a HuBERT "
                          "checkpoint file or folder (fairseq .pt with --trust-checkpoint), or random:tiny / "
                          "random:base for an untrained model of that shape; or a preset that names one "
                          "(-c distill-tiny)")


def _run_distill(cfg: DistillConfig, corpus: str | Path | Corpus, run_dir: Path, resume: bool, overwrite: bool,
                 trust_checkpoint: bool, progress: Progress | None) -> DistillResult:
    """:func:`run_distill` under its run folder's lock."""
    from ofactl import training as tr

    progress = progress or NullProgress()
    cfg = replace(cfg)  # _build may fill in student.teacher_dim: the caller's config stays as given
    su = tr.setup_run(cfg, Path(run_dir), resume, overwrite)
    cps = tr.read_train_corpus(corpus, cfg.student.arch.conv_layers, progress=progress)
    trn, held = split_held_out(list(cps), cfg.eval_utts, cfg.seed)
    seed_all(cfg.seed)
    teacher, student = _build(cfg, trust_checkpoint, su.device, progress)
    if resume:  # after _build, which fills in the teacher's width as config.yaml records it
        tr.check_resume(cfg, "distill", su.run_dir, cps)
    optim = tr.make_optimisation(student.parameters(), cfg, su.amp)
    job = _distill_job(cfg, student, teacher, held, su)
    start = tr.starting_step(job, optim, su, resume, progress)
    segids = _boundaries(cfg, cps, teacher, su.device, su.run_dir, su.main, progress) \
        if cfg.student.compressor == "cif" else None
    if su.main:
        tr.record_run(cfg, "distill", su.run_dir, cps)
    eval_before = evaluate(student, teacher, held, cfg, su.device, su.amp) if start == 0 and su.main else {}
    loader = tr.make_loader(tr.schedule_from(trn, cfg, start, su.world, su.rank), trn, cfg, su, segids,
                         cfg.student.arch.hop, start)
    loop = tr.train(job, cfg, su, optim, loader, start, progress)
    return _finish(cfg, su, student, teacher, trn, held, loop, eval_before)


def teacher_derived(student: StudentConfig, teacher_dim: int, normalize_waveform: bool) -> StudentConfig:
    """``student`` with the settings distill derives from its teacher (of width ``teacher_dim``,
    normalising each waveform or not): the width that ``teacher_dim: 0`` stands for, so presets
    fit any teacher, and waveform normalisation, which a normalising teacher turns on (its targets
    come from normalised audio, and a copied CNN learned on it)."""
    if student.teacher_dim == 0:
        student = replace(student, teacher_dim=teacher_dim)
    if normalize_waveform and not student.arch.normalize_waveform:
        student = replace(student, arch=replace(student.arch, normalize_waveform=True))
    return student


def _build(cfg: DistillConfig, trust: bool, device: torch.device, progress: Progress) -> tuple[Any, Student]:
    """The frozen teacher and the student (initialised from the teacher where shapes allow)."""
    from ofactl.model.teacher import load_teacher

    teacher = load_teacher(cfg.teacher, trust=trust, seed=cfg.seed).to(device)
    derived = teacher_derived(cfg.student, teacher.arch.embed_dim, teacher.arch.normalize_waveform)
    if derived.arch.normalize_waveform != cfg.student.arch.normalize_waveform:
        progress.log("note: the teacher normalises each waveform (arch.normalize_waveform), so the student does too")
    cfg.student = derived
    student = Student(cfg.student)
    if cfg.init_from_teacher:
        copied = student.init_from_teacher(teacher, partial=True)
        total = len(student.cnn.state_dict()) + len(student.feature_projection.state_dict()) + \
            len(student.transformer.state_dict())
        if len(copied) < total:
            parts = sorted({name.split(".")[0] for name in copied}) or ["nothing"]
            progress.log(f"note: the teacher's shapes match only part of the student; copied {', '.join(parts)} "
                         f"({len(copied)} of {total} tensors)")
    student.to(device)
    n_hidden = teacher.num_hidden
    bad = [layer for layer in cfg.student.pred_layers if not 0 <= layer < n_hidden]
    if bad:
        raise ConfigError(f"student.pred_layers {list(cfg.student.pred_layers)}: the teacher has hidden states "
                          f"0..{n_hidden - 1}")
    if cfg.student.teacher_dim != teacher.arch.embed_dim:
        raise ConfigError(f"student.teacher_dim={cfg.student.teacher_dim} but the teacher is {teacher.arch.embed_dim}-d")
    return teacher, student


def _distill_job(cfg: DistillConfig, student: Student, teacher: Any, held: list[Utterance], su: Any) -> Any:
    """The distillation job for the training scaffold: loss, EMA of alpha, checkpoints, eval."""
    from ofactl.checkpoint import read_checkpoint, save_student
    from ofactl.training import Job

    teacher_desc = teacher.describe()
    job: Job

    def step_loss(batch: dict[str, Any], gen: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        o = train_step_loss(job.model, teacher, batch, cfg, su.device, su.amp, gen)
        return o.loss, {"per_head": [float(x) for x in o.per_head], "alpha_seg": float(o.seg),
                        "alpha_frame": float(o.frame), "achieved_rate": o.achieved, "alpha_mean_step": o.alpha_mean}

    def after_step(acc: list[dict[str, Any]]) -> dict[str, float]:
        with torch.no_grad():
            m = cfg.alpha_momentum
            am = sum(a["alpha_mean_step"] for a in acc) / len(acc)
            student.compressor.alpha_mean.mul_(m).add_((1 - m) * am)
        return {"alpha_mean": round(student.alpha_mean, 5)}

    def save(path: Path, step: int, train_state: dict[str, Any]) -> None:
        save_student(path, student, step=step, teacher=teacher_desc, train_state=train_state,
                     extra={"config": to_dict(cfg)}, trained_rates=trained_rates(cfg, student.alpha_mean))

    def load(obj: dict[str, Any]) -> dict[str, Any]:
        student.load_state_dict(obj["state_dict"])
        return dict(obj["train_state"])

    job = Job("distilling", student, list(student.parameters()), step_loss, save, read_checkpoint, load,
              evaluate=lambda: evaluate(student, teacher, held, cfg, su.device, su.amp), after_step=after_step,
              progress_keys=("loss", "achieved_rate"))
    return job


def _finish(cfg: DistillConfig, su: Any, student: Student, teacher: Any, trn: list[Utterance],
            held: list[Utterance], loop: Any, eval_before: dict[str, float]) -> DistillResult:
    """student.pt (with the median level of the training audio), held-out losses and achieved
    rates, summary.json (rank 0)."""
    from ofactl.checkpoint import save_student
    from ofactl.training import finish_distributed, ranks_in_sync

    in_sync = ranks_in_sync(student) if su.world > 1 else None
    student.eval()
    result_path = su.run_dir / "student.pt"
    ev_after: dict[str, float] = {}
    achieved: dict[str, dict[str, float]] = {}
    if su.main:
        student.input_level_db = median_level_db(trn, seed=cfg.seed)
        save_student(result_path, student, step=loop.step, teacher=teacher.describe(), extra={"config": to_dict(cfg)},
                     trained_rates=trained_rates(cfg, student.alpha_mean))
        ev_after = evaluate(student, teacher, held, cfg, su.device, su.amp)
        achieved = achieved_rates(student, held, su.device)
    res = DistillResult(su.run_dir, result_path, loop.step, loop.start, eval_before, ev_after, achieved,
                        loop.audio_seconds, loop.wall_seconds, in_sync, loop.totals)
    if su.main:
        write_text(su.run_dir / "summary.json", json.dumps(res.to_json(), indent=2))
    finish_distributed(su.world)
    return res


def trained_rates(cfg: DistillConfig, alpha_mean: float) -> dict[str, Any]:
    """The rates this config trains a student for, as the checkpoint records them: one rate for
    avgpool, ``kind: fixed`` and no compressor; else the range the sampling covers (for lambda
    sampling, the mean rates its lambdas give at the current mean alpha)."""
    rc = cfg.rates
    if cfg.student.compressor == "avgpool":
        return {"kind": "fixed", "rates": [cfg.compressor_rate]}
    if cfg.student.compressor == "none":
        return {"kind": "fixed", "rates": [1.0]}
    if rc.kind == "fixed":
        return {"kind": "fixed", "rates": [rc.rate]}
    if rc.kind == "period":
        return {"kind": "range", "min": round(20.0 / rc.max_ms, 4), "max": round(20.0 / rc.min_ms, 4)}
    am = min(max(alpha_mean, 1e-3), 1 - 1e-3)
    lo, hi = (float(expected_ratio(x, am)) for x in (rc.lambda_max, rc.lambda_min))
    return {"kind": "range", "min": round(lo, 4), "max": round(hi, 4)}


def fixed_rate_settings(compressor: str, rate: float) -> dict[str, Any]:
    """What training at one rate sets, by the student's compressor: an avgpool student's pooling
    rate (``compressor_rate``), another's fixed rate (``rates.kind``, ``rates.rate``); a student
    without compressor runs at rate 1 only."""
    if not 0 < rate <= 1:
        raise ConfigError(f"--rate {rate}: expected a rate in (0, 1]")
    if compressor == "avgpool":
        return {"compressor_rate": rate}
    if compressor == "none" and rate != 1.0:
        raise ConfigError(f"--rate {rate}: a student without compressor runs at rate 1 only")
    return {"rates.kind": "fixed", "rates.rate": rate}


def rate_flags(rate: float) -> Callable[[dict[str, Any]], list[Flag]]:
    """``distill --rate R`` as flags for :func:`~ofactl.config.load_config`'s ``derived``: their
    keys follow the compressor the other settings resolve to (:func:`fixed_rate_settings`)."""
    def flags(data: dict[str, Any]) -> list[Flag]:
        compressor = (data.get("student") or {}).get("compressor", StudentConfig().compressor)
        return [Flag(key, "--rate", value, typed=f"--rate {rate:g}")
                for key, value in fixed_rate_settings(str(compressor), rate).items()]

    return flags


def with_fixed_rate(cfg: DistillConfig, rate: float) -> DistillConfig:
    """``cfg`` trained at one rate, whatever its student's compressor (:func:`fixed_rate_settings`)."""
    settings = fixed_rate_settings(cfg.student.compressor, rate)
    if "compressor_rate" in settings:
        return replace(cfg, compressor_rate=rate)
    out = replace(cfg, rates=replace(cfg.rates, kind="fixed", rate=rate))
    out.validate()
    return out


@torch.no_grad()
def evaluate(student: Student, teacher: Any, held: list[Utterance], cfg: DistillConfig,
             device: torch.device, amp: torch.dtype | None) -> dict[str, float]:
    """Distillation loss (compress alignment) on held-out utterances at ``eval_rates`` (exact)."""
    was = student.training
    student.eval()
    res: dict[str, list[float]] = {}
    batches = held_batches(held, int(cfg.crop_seconds * SR))
    for wav, lengths in batches:
        wav, lengths = wav.to(device), lengths.to(device)
        targets, t_lengths = prediction_targets(student, teacher, wav, lengths)
        for r in cfg.eval_rates:
            if student.cfg.compressor == "none" and r != 1.0:
                continue
            rr = cfg.compressor_rate if student.cfg.compressor == "avgpool" else r
            with autocast(device, amp):
                out = student(wav, lengths, rate=rr)
            loss, _ = head_losses(out, targets, t_lengths, "compress", cfg.spectral_weight)
            res.setdefault(f"{r:g}", []).append(float(loss))
    student.train(was)
    return {k: round(sum(v) / len(v), 5) for k, v in res.items()}


@torch.no_grad()
def achieved_rates(student: Student, held: list[Utterance], device: torch.device,
                   rates: tuple[float, ...] = (1.0, 0.75, 0.5, 0.33, 0.25)) -> dict[str, dict[str, float]]:
    """Mean achieved rate on held-out audio, exact and content-adaptive modes."""
    if student.cfg.compressor != "cif":
        return {}
    out: dict[str, dict[str, float]] = {}
    for wav, lengths in held_batches(held, 30 * SR):
        wav, lengths = wav.to(device), lengths.to(device)
        feats, n = student.cnn_features(wav, lengths)
        for r in rates:
            for mode, exact in (("exact", True), ("adaptive", False)):
                c = student.compressor(feats, n, rate=r, exact=exact)
                d = out.setdefault(f"{r:g}", {})
                d.setdefault(mode + "_frames", 0.0)
                d[mode + "_frames"] += float(c.lengths.sum())
                d.setdefault("input_frames", 0.0)
                if mode == "exact":
                    d["input_frames"] += float(n.sum())
    return {r: {"exact": round(d["exact_frames"] / d["input_frames"], 4),
                "adaptive": round(d["adaptive_frames"] / d["input_frames"], 4)} for r, d in out.items()}


def _boundaries(cfg: DistillConfig, cps: Corpus, teacher: Any, device: torch.device, run_dir: Path,
                main_rank: bool, progress: Progress) -> dict[str, np.ndarray] | None:
    """Segment ids per utterance (20 ms frames) for alpha guidance, or None (boundaries=none)."""
    from ofactl.model import segment as seg
    from ofactl.model.blocks import cnn_lengths

    spec = cfg.guidance.boundaries
    if spec == "none":
        return None
    utts = list(cps)
    n16 = torch.tensor([u.n_samples_16k for u in utts])
    nf = {u.id: int(t) for u, t in zip(utts, cnn_lengths(cfg.student.arch, n16))}
    if spec == "phone_times":
        return seg.boundaries_from_phone_times(utts, nf)
    if spec != "auto":
        return seg.read_boundary_file(Path(spec), nf)
    cache = run_dir / "boundaries.tsv"
    if cache.is_file():
        try:
            return seg.read_boundary_file(cache, nf)
        except ConfigError:
            pass
    layer = cfg.guidance.kmeans_layer if cfg.guidance.kmeans_layer >= 0 else teacher.num_hidden // 2

    def feats(idx: list[int]) -> list[Tensor]:
        wavs = [load_audio(utts[i].path) for i in idx]
        lengths = torch.tensor([len(w) for w in wavs])
        h = teacher(torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True).to(device), lengths.to(device))
        return [h.states[j, : int(h.lengths[j]), layer].float().cpu() for j in range(len(idx))]

    progress.start("pseudo-phone boundaries (k-means + DP)", None)
    segids, cent = seg.auto_boundaries(feats, len(utts), [u.id for u in utts], cfg.guidance.kmeans_k,
                                       cfg.guidance.kmeans_utts, cfg.guidance.seg_penalty, cfg.seed)
    progress.finish()
    if main_rank:
        seg.write_boundary_file(cache, segids)
        from safetensors.torch import save_file

        with atomic_path(run_dir / "kmeans.safetensors") as tmp:
            save_file({"centroids": cent.contiguous()}, str(tmp))
    n_seg = sum(int(s.max()) + 1 for s in segids.values() if len(s))
    n_fr = sum(len(s) for s in segids.values())
    progress.log(f"pseudo-phones: {n_seg} segments over {n_fr} frames "
                 f"(mean period {20.0 * n_fr / max(1, n_seg):.0f} ms, alpha target {n_seg / max(1, n_fr):.3f})")
    # A corpus with phone times (ofactl synth's) tells how good the pseudo-phones are; the
    # segment length sets the predicted alpha, and with it what lambda = 1 means.
    sc = seg.score_against_phone_times(segids, utts, nf)
    if sc is not None:
        progress.log(f"pseudo-phones against the corpus's phone times ({sc['phone_period_ms']:.0f} ms): precision "
                     f"{sc['precision']:.2f}, recall {sc['recall']:.2f}, R-value {sc['r_value']:.2f} (20 ms tolerance)")
    return segids
