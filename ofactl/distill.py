"""``ofactl distill``: once-for-all distillation of a student from a HuBERT teacher.

Each step: length-bucketed batch (random crops) -> frozen teacher hidden states -> a rate drawn
per utterance -> student at those rates -> L1 + (-log sigmoid(cosine)) per prediction head on
valid frames, plus alpha guidance. Targets are compressed with the student's detached CIF
weights (alignment "compress", the default) or the student's outputs are upsampled back to
20 ms ("upsample").

Runs are resumable and reproducible: every random draw of a step (crops, rates, lambda mode)
comes from a generator seeded by (seed, step), and checkpoints hold optimizer, scheduler,
scaler and global RNG state, so ``--resume`` continues exactly as an uninterrupted run (CPU).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ofactl import __version__
from ofactl.audio import Corpus, Utterance, load_audio, read_corpus
from ofactl.config import save_resolved, to_dict
from ofactl.errors import CheckpointError, ConfigError, InterruptedRun, OfactlError
from ofactl.model.compress import length_mask, rate_to_lambda
from ofactl.model.student import Student, StudentConfig, student_config
from ofactl.progress import NullProgress, Progress, deferred_sigint, ignore_sigint_in_worker
from ofactl.runtime import autocast

SR = 16000


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 1e-6
    warmup: float = 0.07  # fraction of steps
    final_lr_ratio: float = 0.0  # linear decay to lr * this
    grad_clip: float = 5.0
    accum: int = 1


@dataclass
class RateConfig:
    """Per-utterance rate sampling. period: frame period ~ U[min_ms, max_ms]; lambda: lambda ~
    U[lambda_min, lambda_max] (content-adaptive lengths); fixed: always ``rate``."""

    kind: str = "period"
    min_ms: float = 20.0
    max_ms: float = 90.0
    lambda_min: float = 0.0
    lambda_max: float = 1.0
    rate: float = 1.0
    exact_fraction: float = 0.5  # share of steps in exact-length mode (others: lambda mode)

    def validate(self) -> None:
        if self.kind not in ("period", "lambda", "fixed"):
            raise ValueError(f"rates.kind must be period, lambda or fixed, got {self.kind!r}")
        if not 20.0 <= self.min_ms <= self.max_ms:
            raise ValueError("rates: need 20 <= min_ms <= max_ms")
        if not 0.0 <= self.lambda_min <= self.lambda_max < 2.0:
            raise ValueError("rates: need 0 <= lambda_min <= lambda_max < 2")
        if not 0 < self.rate <= 1:
            raise ValueError("rates.rate must be in (0, 1]")


@dataclass
class GuidanceConfig:
    """Alpha guidance. boundaries: auto | none | phone_times | PATH.tsv."""

    boundaries: str = "auto"
    seg_weight: float = 0.05
    frame_weight: float = 0.5
    quantity_weight: float = 0.5
    quantity_ratio: float = 0.25  # with boundaries=none: target sum(alpha)/T
    kmeans_k: int = 50
    kmeans_layer: int = -1  # teacher hidden state; -1: the middle one
    kmeans_utts: int = 200
    seg_penalty: float = 2.0


@dataclass
class DistillConfig:
    student: StudentConfig = field(default_factory=lambda: student_config("base"))
    teacher: str = "random:base"
    init_from_teacher: bool = True
    compressor_rate: float = 0.5  # the rate of a fixed-rate avgpool student
    steps: int = 1000
    batch_seconds: float = 120.0
    crop_seconds: float = 15.6
    alignment: str = "compress"
    spectral_weight: float = 1.0  # weight of the log-mel head (student.spectral_bins > 0)
    rates: RateConfig = field(default_factory=RateConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 2
    seed: int = 0
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: only before and after training
    eval_utts: int = 32
    eval_rates: tuple[float, ...] = (1.0, 0.5, 0.25)
    alpha_momentum: float = 0.98

    def validate(self) -> None:
        from ofactl.runtime import check_device_name

        check_device_name(self.device)
        self.student.validate()
        self.rates.validate()
        if self.alignment not in ("compress", "upsample"):
            raise ValueError(f"alignment must be compress or upsample, got {self.alignment!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.steps < 1 or self.batch_seconds <= 0 or self.crop_seconds <= 0.1:
            raise ValueError("steps >= 1, batch_seconds > 0 and crop_seconds > 0.1 are required")
        if self.optim.accum < 1:
            raise ValueError("optim.accum must be >= 1")
        if self.student.compressor == "none" and (self.rates.kind != "fixed" or self.rates.rate != 1.0):
            raise ValueError("a student without compressor trains at rate 1: set rates.kind=fixed, rates.rate=1")


# ----------------------------------------------------------------------------- data
class _Batches(torch.utils.data.Dataset):
    """Item k = the k-th batch of a planned schedule: cropped, padded audio + segment ids."""

    def __init__(self, schedule: list[tuple[int, list[int]]], utts: list[Utterance], crop: int,
                 seed: int, segids: dict[str, np.ndarray] | None, hop: int) -> None:
        self.schedule, self.utts, self.crop, self.seed, self.segids, self.hop = schedule, utts, crop, seed, segids, hop

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, k: int) -> dict[str, Any]:
        step, idx = self.schedule[k]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        wavs, segs = [], []
        for i in idx:
            u = self.utts[i]
            w = load_audio(u.path)
            start = 0
            if len(w) > self.crop:
                # crop on the frame grid so boundaries shift by whole frames
                n_starts = (len(w) - self.crop) // self.hop + 1
                start = int(torch.randint(n_starts, (1,), generator=g)) * self.hop
                w = w[start : start + self.crop]
            wavs.append(w)
            if self.segids is not None:
                s = self.segids[u.id]
                f0 = start // self.hop
                segs.append(torch.from_numpy(s[f0 : f0 + len(w) // self.hop + 1].copy()))
        lengths = torch.tensor([len(w) for w in wavs])
        out = {"step": step, "idx": idx, "wav": torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True),
               "lengths": lengths}
        if segs:
            out["segids"] = torch.nn.utils.rnn.pad_sequence(segs, batch_first=True, padding_value=-1)
        return out


def make_epoch(utts: list[Utterance], budget: int, crop: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches under the audio budget, in a seeded random order."""
    lens = [min(u.n_samples_16k, crop) for u in utts]
    order = sorted(range(len(utts)), key=lambda i: (lens[i], utts[i].id))
    batches, cur, longest = [], [], 0
    for i in order:
        if cur and max(longest, lens[i]) * (len(cur) + 1) > budget:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, lens[i])
    if cur:
        batches.append(cur)
    perm = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    return [batches[p] for p in perm]


def schedule_from(utts: list[Utterance], cfg: DistillConfig, start_step: int, world: int, rank: int) -> list[tuple[int, list[int]]]:
    """(step, utterance indices) for this rank from ``start_step`` to the end of training.

    Each optimizer step consumes ``accum * world`` batches; rank r takes every world-th.
    """
    budget = int(cfg.batch_seconds * SR)
    crop = int(cfg.crop_seconds * SR)
    per_step = cfg.optim.accum * world
    out: list[tuple[int, list[int]]] = []
    need = cfg.steps * per_step
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


# ----------------------------------------------------------------------------- losses
def distill_loss(pred: Tensor, target: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head L1 + (-log sigmoid(cosine)) averaged over valid frames (and dims for L1).

    pred, target: (B, T, H, D). Returns (total, per-head (H,)). Padding never counts.
    """
    valid = length_mask(lengths, pred.shape[1]).float()[..., None]  # (B, T, 1)
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


def head_losses(out: Any, targets: list[Tensor], t_lengths: Tensor, alignment: str,
                spectral_weight: float) -> tuple[Tensor, Tensor]:
    """Loss of every head against its aligned target: (total, per-head (H [+ 1],)).

    ``compress`` compresses the 20 ms targets with the student's detached CIF plan; ``upsample``
    upsamples the student's outputs back to 20 ms. The spectral head (last) is weighted.
    """
    plan = out.compressed.plan
    preds = [out.pred] + ([out.spectral] if out.spectral is not None else [])
    total, per = torch.zeros((), device=out.pred.device), []
    for i, (pred, tgt) in enumerate(zip(preds, targets)):
        if alignment == "compress":
            Bt, T, H, D = tgt.shape
            tgt = plan.detach().apply(tgt.reshape(Bt, T, H * D)).reshape(Bt, -1, H, D)
            loss, ph = distill_loss(pred, tgt, out.hidden.lengths)
        else:
            Bp, Tp, H, D = pred.shape
            up = plan.upsample(pred.float().reshape(Bp, Tp, H * D)).reshape(Bp, -1, H, D)
            loss, ph = distill_loss(up, tgt, t_lengths)
        w = spectral_weight if i == 1 else 1.0
        total = total + w * loss
        per.append(ph)
    return total, torch.cat(per)


@dataclass
class StepOut:
    loss: Tensor
    per_head: Tensor
    seg: Tensor
    frame: Tensor
    achieved: float
    alpha_mean: float


def train_step_loss(student: Any, teacher: Any, batch: dict[str, Any], cfg: DistillConfig,
                    device: torch.device, amp: torch.dtype | None, gen: torch.Generator) -> StepOut:
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
    loss, per_head = head_losses(out, targets, t_lengths, cfg.alignment, cfg.spectral_weight)
    seg = frame = torch.zeros((), device=device)
    a_pred = out.compressed.alpha_pred
    g = cfg.guidance
    if a_pred is not None:
        if "segids" in batch:
            segids = batch["segids"].to(device)
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
    """Per-utterance rates for one step; lambda (content-adaptive lengths) on some steps."""
    rc = cfg.rates
    if cfg.student.compressor == "avgpool":
        return torch.full((B,), cfg.compressor_rate, dtype=torch.float64), None, True
    if rc.kind == "fixed":
        rates = torch.full((B,), rc.rate, dtype=torch.float64)
    elif rc.kind == "period":
        ms = rc.min_ms + (rc.max_ms - rc.min_ms) * torch.rand(B, generator=gen, dtype=torch.float64)
        rates = 20.0 / ms
    else:
        lam = rc.lambda_min + (rc.lambda_max - rc.lambda_min) * torch.rand(B, generator=gen)
        return torch.ones(B, dtype=torch.float64), lam, False
    exact = bool(torch.rand((), generator=gen) < rc.exact_fraction)
    if exact or cfg.student.compressor != "cif":
        return rates, None, True
    return rates, rate_to_lambda(rates.float(), min(max(alpha_mean, 1e-3), 1 - 1e-3)), False


# ----------------------------------------------------------------------------- run
@dataclass
class DistillResult:
    run_dir: Path
    student: Path
    steps: int
    resumed_from: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    achieved_rates: dict[str, dict[str, float]]
    audio_seconds: float
    wall_seconds: float
    ranks_in_sync: bool | None

    def to_json(self) -> dict[str, Any]:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        d["audio_s_per_s"] = round(self.audio_seconds / self.wall_seconds, 2) if self.wall_seconds else None
        return d


def _dist() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


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
    from ofactl.checkpoint import atomic_torch_save, save_student
    from ofactl.runtime import autocast_dtype, resolve_device
    from ofactl.model.teacher import load_teacher

    progress = progress or NullProgress()
    world, rank, local = _dist()
    run_dir = Path(run_dir)
    main_rank = rank == 0
    ckpt_dir = run_dir / "checkpoints"
    device = resolve_device(cfg.device)  # before touching the run folder: a bad --device changes nothing
    if main_rank:
        _prepare_run_dir(run_dir, resume, overwrite)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp = autocast_dtype(cfg.precision, device)

    cps = corpus if isinstance(corpus, Corpus) else read_corpus(corpus)
    train, held = _split(cps, cfg)
    torch.manual_seed(cfg.seed)
    teacher = load_teacher(cfg.teacher, trust=trust_checkpoint, seed=cfg.seed).to(device)
    scfg = cfg.student
    student = Student(scfg)
    if cfg.init_from_teacher:
        try:
            student.init_from_teacher(teacher)
        except OfactlError as e:
            progress.log(f"note: not initialising from the teacher ({e})")
    student.to(device)
    n_hidden = teacher.num_hidden
    bad = [l for l in scfg.pred_layers if not 0 <= l < n_hidden]
    if bad:
        raise ConfigError(f"student.pred_layers {list(scfg.pred_layers)}: the teacher has hidden states 0..{n_hidden - 1}")
    if scfg.teacher_dim != teacher.arch.embed_dim:
        raise ConfigError(f"student.teacher_dim={scfg.teacher_dim} but the teacher is {teacher.arch.embed_dim}-d")

    opt = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

    start = 0
    if resume:
        start = _load_latest(ckpt_dir, student, opt, sched, scaler)
        progress.log(f"resuming from step {start}")
    segids = _boundaries(cfg, cps, teacher, device, run_dir, main_rank, progress) if scfg.compressor == "cif" else None
    if main_rank:
        save_resolved(cfg, "distill", run_dir / "config.yaml")
    model: Any = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)

    eval_before = {}
    if start == 0 and main_rank:
        eval_before = evaluate(student, teacher, held, cfg, device, amp)
    schedule = schedule_from(train, cfg, start, world, rank)
    hop = scfg.arch.hop
    loader = torch.utils.data.DataLoader(
        _Batches(schedule, train, int(cfg.crop_seconds * SR), cfg.seed, segids, hop), batch_size=None,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=2 if cfg.num_workers else None,
        # its own generator: creating the iterator must not draw from the global RNG, or a
        # resumed run's dropout would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(cfg.seed + start),
        worker_init_fn=ignore_sigint_in_worker if cfg.num_workers else None)
    if main_rank and start:
        truncate_metrics(run_dir / "metrics.jsonl", start)
    metrics = open(run_dir / "metrics.jsonl", "a") if main_rank else None
    teacher_desc = {k: v for k, v in teacher.describe().items()}
    t0 = time.perf_counter()
    audio_s = 0.0
    step = start
    acc: list[StepOut] = []
    progress.start("distilling", cfg.steps)
    if start:
        progress.advance(start)
    student.train()

    def save(at: int, final: bool = False) -> None:
        if not main_rank:
            return
        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                 "rng": torch.get_rng_state(), "seed": cfg.seed}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        extra = {"config": to_dict(cfg)}
        save_student(ckpt_dir / f"step-{at:08d}.pt", student, step=at, teacher=teacher_desc, train_state=state, extra=extra)
        old = sorted(ckpt_dir.glob("step-*.pt"))[: -max(1, cfg.keep_checkpoints)]
        for p in old:
            p.unlink(missing_ok=True)

    with deferred_sigint() as stop:
        try:
            for batch in loader:
                micro = batch["step"]
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + micro + 17)
                o = train_step_loss(model, teacher, batch, cfg, device, amp, gen)
                scaler.scale(o.loss / cfg.optim.accum).backward()
                acc.append(o)
                audio_s += float(batch["lengths"].sum()) / SR
                if len(acc) < cfg.optim.accum:
                    continue
                scaler.unscale_(opt)
                gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                with torch.no_grad():
                    m = cfg.alpha_momentum
                    am = sum(a.alpha_mean for a in acc) / len(acc)
                    student.compressor.alpha_mean.mul_(m).add_((1 - m) * am)
                if main_rank and (step % cfg.log_every == 0 or step == cfg.steps):
                    rec = {"step": step, "loss": _mean(a.loss.item() for a in acc),
                           "per_head": [round(float(x), 5) for x in torch.stack([a.per_head for a in acc]).mean(0)],
                           "alpha_seg": _mean(float(a.seg) for a in acc), "alpha_frame": _mean(float(a.frame) for a in acc),
                           "achieved_rate": _mean(a.achieved for a in acc), "alpha_mean": round(student.alpha_mean, 5),
                           "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
                           "audio_s_per_s": round(audio_s / (time.perf_counter() - t0), 2),
                           "elapsed_s": round(time.perf_counter() - t0, 2)}
                    assert metrics is not None
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                progress.advance(1, loss=o.loss.item(), rate=round(o.achieved, 3),
                                 h_per_s=round(audio_s / 3600 / max(time.perf_counter() - t0, 1e-9), 4))
                acc = []
                if cfg.eval_every and step % cfg.eval_every == 0 and main_rank and step < cfg.steps:
                    ev = evaluate(student, teacher, held, cfg, device, amp)
                    student.train()
                    _log_eval(metrics, step, ev)
                if step % cfg.ckpt_every == 0 and step < cfg.steps:
                    save(step)
                if _stop_agreed(stop.requested, world, device):
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            progress.finish()
            if main_rank and step > start:
                save(step)
                raise InterruptedRun(f"interrupted at step {step}; checkpoint saved, continue with --resume") from None
            raise InterruptedRun(f"interrupted at step {step}, before any new step; nothing new to save") from None
        finally:
            progress.finish()
            if metrics is not None:
                metrics.close()

    in_sync = _ranks_in_sync(student) if world > 1 else None
    student.eval()
    result_path = run_dir / "student.pt"
    ev_after, achieved = {}, {}
    if main_rank:
        save(step)
        save_student(result_path, student, step=step, teacher=teacher_desc, extra={"config": to_dict(cfg)})
        ev_after = evaluate(student, teacher, held, cfg, device, amp)
        achieved = achieved_rates(student, held, device)
        summary = DistillResult(run_dir, result_path, step, start, eval_before, ev_after, achieved, audio_s,
                                time.perf_counter() - t0, in_sync)
        (run_dir / "summary.json").write_text(json.dumps(summary.to_json(), indent=2))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return DistillResult(run_dir, result_path, step, start, eval_before, ev_after, achieved, audio_s,
                         time.perf_counter() - t0, in_sync)


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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)
    return dropped


def with_fixed_rate(cfg: DistillConfig, rate: float) -> DistillConfig:
    """``distill --rate R``: train at one rate, whatever the resolved student's compressor is
    (avgpool: its pooling rate; cif: rates.kind=fixed; none: rate 1 only)."""
    from dataclasses import replace

    if not 0 < rate <= 1:
        raise ConfigError(f"--rate {rate}: expected a rate in (0, 1]")
    kind = cfg.student.compressor
    if kind == "avgpool":
        return replace(cfg, compressor_rate=rate)
    if kind == "none" and rate != 1.0:
        raise ConfigError(f"--rate {rate}: a student without compressor runs at rate 1 only")
    out = replace(cfg, rates=replace(cfg.rates, kind="fixed", rate=rate))
    out.validate()
    return out


def _mean(xs: Any) -> float:
    xs = list(xs)
    return round(sum(xs) / max(1, len(xs)), 6)


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up over ``warmup`` of the steps, then linear decay to ``final_lr_ratio``."""
    warm = max(1, int(cfg.optim.warmup * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, cfg.steps - warm)
    return 1.0 - (1.0 - cfg.optim.final_lr_ratio) * min(1.0, frac)


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if resume:
            if not any((run_dir / "checkpoints").glob("step-*.pt")):
                raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
            return
        if not overwrite:
            raise OfactlError(f"{run_dir} is not empty; pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(run_dir)
    elif resume:
        raise CheckpointError(f"--resume: {run_dir} holds no run")
    run_dir.mkdir(parents=True, exist_ok=True)


def _load_latest(ckpt_dir: Path, student: Student, opt: Any, sched: Any, scaler: Any) -> int:
    from ofactl.checkpoint import read_checkpoint

    errors = []
    for p in sorted(ckpt_dir.glob("step-*.pt"), reverse=True):
        try:
            obj = read_checkpoint(p)
        except CheckpointError as e:
            errors.append(str(e))
            continue  # a corrupt newest checkpoint: fall back to the previous one
        try:
            student.load_state_dict(obj["state_dict"])
        except RuntimeError as e:
            raise CheckpointError(f"{p}: does not match this run's student ({str(e).splitlines()[0]})") from None
        ts = obj["train_state"]
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        scaler.load_state_dict(ts["scaler"])
        torch.set_rng_state(ts["rng"])
        if "cuda_rng" in ts and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ts["cuda_rng"])
        return int(obj["step"])
    raise CheckpointError("--resume: no readable checkpoint (" + "; ".join(errors) + ")")


def _split(cps: Corpus, cfg: DistillConfig) -> tuple[list[Utterance], list[Utterance]]:
    """Held-out utterances for evaluation: the manifest's dev split, else a seeded sample."""
    utts = list(cps)
    dev = [u for u in utts if u.labels.get("split") == "dev"]
    rest = [u for u in utts if u.labels.get("split") in ("train", None, "")]
    if dev and rest:
        g = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(len(dev), generator=g)[: cfg.eval_utts].tolist()
        return rest, [dev[i] for i in sorted(pick)]
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(utts), generator=g).tolist()
    n = min(cfg.eval_utts, max(1, len(utts) // 10))
    held = set(perm[:n])
    return [u for i, u in enumerate(utts) if i not in held], [utts[i] for i in sorted(held)]


def _held_batches(held: list[Utterance], crop: int, budget: int = 60 * SR) -> list[tuple[Tensor, Tensor]]:
    out, cur = [], []
    for u in held:
        cur.append(load_audio(u.path)[:crop])
        if sum(len(w) for w in cur) >= budget:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return [(torch.nn.utils.rnn.pad_sequence(b, batch_first=True), torch.tensor([len(w) for w in b])) for b in out]


@torch.no_grad()
def evaluate(student: Student, teacher: Any, held: list[Utterance], cfg: DistillConfig,
             device: torch.device, amp: torch.dtype | None) -> dict[str, float]:
    """Distillation loss (compress alignment) on held-out utterances at ``eval_rates`` (exact)."""
    was = student.training
    student.eval()
    res: dict[str, list[float]] = {}
    batches = _held_batches(held, int(cfg.crop_seconds * SR))
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
    for wav, lengths in _held_batches(held, 30 * SR):
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


def _log_eval(metrics: Any, step: int, ev: dict[str, float]) -> None:
    if metrics is not None:
        metrics.write(json.dumps({"step": step, "eval_loss": ev}) + "\n")
        metrics.flush()


def _stop_agreed(requested: bool, world: int, device: torch.device) -> bool:
    """True when any rank was asked to stop (Ctrl-C), so every rank stops after the same step."""
    if world == 1:
        return requested
    import torch.distributed as dist

    flag = torch.tensor([1.0 if requested else 0.0], device=device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


def _ranks_in_sync(student: Student) -> bool:
    import torch.distributed as dist

    vec = torch.cat([p.detach().float().flatten() for p in student.parameters()])
    s = torch.stack([vec.sum(), (vec * torch.arange(len(vec), dtype=vec.dtype, device=vec.device) % 1000).sum()])
    gathered = [torch.zeros_like(s) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, s)
    return all(torch.equal(g, gathered[0]) for g in gathered)


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

        save_file({"centroids": cent.contiguous()}, str(run_dir / "kmeans.safetensors"))
    n_seg = sum(int(s.max()) + 1 for s in segids.values() if len(s))
    n_fr = sum(len(s) for s in segids.values())
    progress.log(f"pseudo-phones: {n_seg} segments over {n_fr} frames "
                 f"(mean period {20.0 * n_fr / max(1, n_seg):.0f} ms, alpha target {n_seg / max(1, n_fr):.3f})")
    return segids
