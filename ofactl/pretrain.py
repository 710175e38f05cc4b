"""``ofactl pretrain``: HuBERT masked-prediction pretraining of a HuBERT-architecture model from
scratch (Hsu et al. 2021), on the training scaffold that ``distill`` uses.

Targets are discrete units on the 20 ms grid, from k-means fitted on a sample of the corpus:

- iteration 1 (``targets: mfcc``): 13 MFCCs (25 ms window, 10 ms shift, no dither) with deltas
  and delta-deltas, every second frame (frame t starts at sample 320 t, like the CNN's);
- iteration 2 (``targets: layer:N``, ``--from CKPT``): hidden state N of an earlier model.

Each step masks spans of the CNN features (every frame starts a span of ``mask_length``
frames with probability ``mask_prob``; spans may overlap) with a learned embedding, runs the
transformer, projects the last layer to ``final_dim`` and scores every unit by cosine similarity
with a learned unit embedding over ``logit_temp``. The loss is cross-entropy on masked frames
(plus ``unmasked_weight`` times the loss on the others); unit accuracy on masked and unmasked
frames is logged for training batches and held-out audio.

Outputs in the run folder: ``kmeans.safetensors`` (centroids and feature statistics: the
targets are reproducible), ``checkpoints/`` (resumable), and ``teacher.safetensors``, the
encoder in torchaudio's layout with its architecture in the metadata, which ``--teacher``
accepts everywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ofactl.atomic import atomic_path, write_text
from ofactl.audio import Corpus, Utterance, median_level_db
from ofactl.choices import Precision
from ofactl.config import to_dict
from ofactl.errors import CheckpointError
from ofactl.model.blocks import (
    HubertArch,
    cnn_forward,
    cnn_lengths,
    normalize_waveform,
    transformer_states,
)
from ofactl.model.compress import length_mask
from ofactl.progress import NullProgress, Progress
from ofactl.runtime import SAMPLE_RATE, autocast, seed_all
from ofactl.training import OptimConfig, RunTotals, held_batches, result_json, split_held_out
from ofactl.units import (
    TARGETS_FILE,
    FeatureSource,
    Shard,
    Units,
    cached_unit_targets,
    fit_units,
    parse_targets,
    targets_key,
)

FORMAT = "ofactl-pretrain"
TEACHER_META = "ofactl_teacher_arch"  # safetensors metadata key holding the architecture (JSON)


def tiny_arch() -> HubertArch:
    """The default: a small HuBERT (7-layer CNN of 128 channels, 4 layers of 128-d)."""
    return HubertArch(conv_layers=((128, 10, 5),) + ((128, 3, 2),) * 4 + ((128, 2, 2),) * 2, embed_dim=128,
                      num_layers=4, num_heads=4, ffn_dim=512, pos_conv_kernel=32, pos_conv_groups=8)


@dataclass
class PretrainConfig:
    """Settings of ``ofactl pretrain``: architecture, unit targets, masking, logits and training."""

    arch: HubertArch = field(default_factory=tiny_arch)
    targets: str = "mfcc"  # mfcc | layer:N (with from_ckpt)
    from_ckpt: str = ""  # the earlier model whose layer N gives the units (--from)
    n_units: int = 100  # k-means units (the classes predicted)
    kmeans_utts: int = 300  # utterances sampled to fit k-means
    kmeans_frames: int = 100_000  # at most this many of their frames
    kmeans_iters: int = 30  # k-means iterations
    mask_prob: float = 0.08  # probability that a frame starts a masked span
    mask_length: int = 10  # frames per masked span
    logit_temp: float = 0.1  # temperature of the cosine-similarity logits
    final_dim: int = 64  # width of the projection compared with unit embeddings
    unmasked_weight: float = 0.0  # weight of the loss on unmasked frames (HuBERT: 0)
    final_norm: bool = True  # pre-LN encoders (arch.layer_norm_first) only: the objective reads the last layer
    # after the encoder's final layer norm, as fairseq's HuBERT does; false reads it before and
    # freezes that norm (pretrain-tiny: the recipe of the teachers shipped so far)
    feature_grad_mult: float = 0.1  # scale of the gradient reaching the CNN (HuBERT: 0.1 over 400k steps)
    steps: int = 2000  # optimizer steps
    batch_seconds: float = 60.0  # audio seconds per batch (before padding)
    crop_seconds: float = 6.0  # longest crop of one utterance (s)
    speed_perturb: tuple[float, ...] = ()  # speed factors, one drawn per utterance and batch (e.g. [0.9, 1.0, 1.1]):
    # the audio is resampled, so tempo, pitch and formants move together, and the unit targets are
    # stretched to match, so the model learns the same units from other voices; none by default
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, warmup=0.08, grad_clip=10.0))
    device: str = "auto"  # auto, cpu, cuda or cuda:N (auto under torchrun: this rank's GPU)
    precision: Precision = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (CUDA)
    num_workers: int = 1  # audio decoding worker processes (they also make mfcc targets' k-means features and units)
    seed: int = 0  # seeds k-means, initialisation, masks, data order and crops
    ckpt_every: int = 200  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept
    log_every: int = 10  # steps between metrics.jsonl records
    eval_every: int = 200  # steps between held-out evaluations (unit accuracy)
    eval_utts: int = 64  # held-out utterances for the evaluation

    def validate(self) -> None:
        """Raise ValueError for a bad target spec, mask settings or sizes."""
        from ofactl.runtime import check_device_name

        check_device_name(self.device)
        self.arch.validate()
        parse_targets(self.targets)
        if not 0 < self.mask_prob < 1 or self.mask_length < 1:
            raise ValueError("mask_prob must be in (0, 1) and mask_length >= 1")
        if self.n_units < 2 or self.kmeans_utts < 1 or self.kmeans_frames < 1 or self.kmeans_iters < 1:
            raise ValueError("n_units >= 2, kmeans_utts, kmeans_frames and kmeans_iters >= 1 are required")
        if self.logit_temp <= 0 or self.final_dim < 1 or self.unmasked_weight < 0:
            raise ValueError("logit_temp > 0, final_dim >= 1 and unmasked_weight >= 0 are required")
        if self.steps < 1 or self.batch_seconds <= 0 or self.crop_seconds <= 0.1 or self.optim.accum < 1:
            raise ValueError("steps >= 1, batch_seconds > 0, crop_seconds > 0.1 and optim.accum >= 1 are required")
        bad = [f for f in self.speed_perturb if not 0.5 <= f <= 2.0]
        if bad:
            raise ValueError(f"speed_perturb: factors must lie in [0.5, 2] (got {', '.join(map(str, bad))})")


# ----------------------------------------------------------------------------- the model
class PretrainModel(nn.Module):
    """A HuBERT encoder (torchaudio modules, the layout teachers load) plus what pretraining
    alone needs: the mask embedding, the final projection and the unit embeddings."""

    def __init__(self, arch: HubertArch, n_units: int, final_dim: int, logit_temp: float = 0.1,
                 final_norm: bool = True) -> None:
        super().__init__()
        from ofactl.model.teacher import Teacher

        self.arch = arch
        self.temp = logit_temp
        self.encoder = Teacher(arch).model  # Wav2Vec2Model: feature_extractor + encoder
        transformer = self.encoder.encoder.transformer
        # torchaudio's flag is the encoder's negated: False here is a pre-LN encoder, whose final
        # layer norm follows the last layer
        self.final_norm = final_norm and not transformer.layer_norm_first
        if not transformer.layer_norm_first and not final_norm:
            # the objective does not read the final norm: frozen, so that DDP does not wait for
            # its gradient (AdamW never moved it anyway, and the optimiser still lists it)
            transformer.layer_norm.requires_grad_(False)
        self.mask_emb = nn.Parameter(torch.empty(arch.embed_dim).uniform_())
        self.final_proj = nn.Linear(arch.embed_dim, final_dim)
        self.label_embs = nn.Parameter(torch.empty(n_units, final_dim).uniform_(-1, 1))

    def frames(self, wav: Tensor, lengths: Tensor, grad_mult: float = 1.0) -> tuple[Tensor, Tensor]:
        """(B, N) samples -> projected CNN features (B, T, D) and frame lengths (B,)."""
        from ofactl.model.blocks import GradMultiply

        if self.arch.normalize_waveform:
            wav = normalize_waveform(wav, lengths)
        x, n = cnn_forward(self.encoder.feature_extractor, wav, lengths)
        if self.training and grad_mult != 1.0:
            x = GradMultiply.apply(x, grad_mult)
        return self.encoder.encoder.feature_projection(x), n

    def forward(self, wav: Tensor, lengths: Tensor, mask: Tensor | None, grad_mult: float = 1.0
                ) -> tuple[Tensor, Tensor]:
        """Unit logits (B, T, K) with the masked frames replaced, and frame lengths (B,)."""
        x, n = self.frames(wav, lengths, grad_mult)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        transformer = self.encoder.encoder.transformer
        h = transformer_states(transformer, x, n)[-1]
        if self.final_norm:
            h = transformer.layer_norm(h)
        z = F.normalize(self.final_proj(h).float(), dim=-1)
        e = F.normalize(self.label_embs.float(), dim=-1)
        return z @ e.T / self.temp, n


def span_mask(lengths: Tensor, p: float, span: int, gen: torch.Generator) -> Tensor:
    """(B, T) bool mask: in each utterance int(p * T + u) distinct start frames (u ~ U[0, 1)),
    drawn among those where a whole span fits, each masking ``span`` frames (spans may overlap)."""
    B, T = len(lengths), int(lengths.max()) if len(lengths) else 0
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        n = int(lengths[b])
        n_starts = n - span + 1
        if n_starts <= 0:
            continue
        k = min(n_starts, int(p * n + float(torch.rand((), generator=gen))))
        starts = torch.randperm(n_starts, generator=gen)[:k]
        idx = (starts[:, None] + torch.arange(span)[None]).flatten()
        mask[b, idx] = True
    return mask


def unit_loss(logits: Tensor, units: Tensor, mask: Tensor, lengths: Tensor, unmasked_weight: float
              ) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on masked frames (+ weighted on unmasked), and unit accuracies.

    logits (B, T, K); units (B, T') with -1 padding; mask (B, T)."""
    T = min(logits.shape[1], units.shape[1])
    logits, units, mask = logits[:, :T], units[:, :T].to(logits.device), mask[:, :T].to(logits.device)
    valid = length_mask(lengths, T).to(logits.device) & (units >= 0)
    m, u = valid & mask, valid & ~mask
    ce = F.cross_entropy(logits.transpose(1, 2), units.clamp(min=0), reduction="none")
    hit = logits.argmax(-1) == units
    loss = ce[m].mean() if m.any() else logits.sum() * 0
    if unmasked_weight > 0 and u.any():
        loss = loss + unmasked_weight * ce[u].mean()
    stats = {"acc_masked": float(hit[m].float().mean()) if m.any() else 0.0,
             "acc_unmasked": float(hit[u].float().mean()) if u.any() else 0.0,
             "masked_fraction": float(m.sum() / valid.sum().clamp(min=1))}
    return loss, stats


# ----------------------------------------------------------------------------- targets
# ----------------------------------------------------------------------------- run
@dataclass
class PretrainResult:
    """What ``pretrain`` made: the teacher file, its steps, held-out unit accuracy and speed."""

    run_dir: Path
    teacher: Path
    steps: int
    resumed_from: int
    eval: dict[str, float]
    audio_seconds: float  # audio read by this invocation (every rank's), from step resumed_from on:
    wall_seconds: float  # a resumed run reports its last stretch, so audio_s_per_s is that stretch's speed
    totals: RunTotals | None = None  # the whole run's, over every invocation; None: unknown
    ranks_in_sync: bool | None = None  # under DDP: every rank ended with the same weights; None: one process

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-safe data (``summary.json``, ``--json``)."""
        return result_json(self)


def run_pretrain(cfg: PretrainConfig, corpus: str | Path | Corpus, run_dir: Path, *, resume: bool = False,
                 overwrite: bool = False, trust_checkpoint: bool = False,
                 progress: Progress | None = None) -> PretrainResult:
    """Pretrain: set up, targets (k-means fitted once, reused on resume), train on the shared
    scaffold, then export ``teacher.safetensors``."""
    from ofactl.pidlock import run_folder_lock

    with run_folder_lock(run_dir, "pretrain", progress or NullProgress()):
        return _run_pretrain(cfg, corpus, run_dir, resume, overwrite, trust_checkpoint, progress)


def _run_pretrain(cfg: PretrainConfig, corpus: str | Path | Corpus, run_dir: Path, resume: bool, overwrite: bool,
                  trust_checkpoint: bool, progress: Progress | None) -> PretrainResult:
    """:func:`run_pretrain` under its run folder's lock."""
    from ofactl import training as tr

    progress = progress or NullProgress()
    cps = tr.read_train_corpus(corpus, cfg.arch.conv_layers, cfg.speed_perturb, progress)
    source = FeatureSource(cfg, torch.device("cpu"), trust_checkpoint)  # checks --from before any folder
    su = tr.setup_run(cfg, Path(run_dir), resume, overwrite)
    if resume:  # before k-means and unit targets, the slow part of a start
        tr.check_resume(cfg, "pretrain", su.run_dir, cps)
        _check_earlier_objective(cfg, su.run_dir)
    utts = list(cps)
    trn, held = split_held_out(utts, cfg.eval_utts, cfg.seed)
    source.to(su.device)
    shard = Shard(su.rank, su.world)
    units = _units(cfg, su.run_dir, trn, source, shard, progress)
    targets = cached_unit_targets(utts, units, source, su.run_dir / TARGETS_FILE,
                                  targets_key(units, utts, cfg.from_ckpt), su.main, progress, shard, cfg.num_workers)
    del source  # the earlier model, if any, is not needed for training
    seed_all(cfg.seed)
    model = PretrainModel(cfg.arch, cfg.n_units, cfg.final_dim, cfg.logit_temp, cfg.final_norm).to(su.device)
    if su.main:
        tr.record_run(cfg, "pretrain", su.run_dir, cps)
    optim = tr.make_optimisation(model.parameters(), cfg, su.amp)
    job = _pretrain_job(cfg, model, held, targets, su)
    start = tr.starting_step(job, optim, su, resume, progress)
    loader = tr.make_loader(tr.schedule_from(trn, cfg, start, su.world, su.rank), trn, cfg, su, targets,
                         cfg.arch.hop, start, speeds=cfg.speed_perturb)
    loop = tr.train(job, cfg, su, optim, loader, start, progress)
    return _finish(cfg, su, model, trn, held, targets, loop)


def _units(cfg: PretrainConfig, run_dir: Path, utts: list[Utterance], source: FeatureSource, shard: Shard,
           progress: Progress) -> Units:
    """The run's k-means (``kmeans.safetensors``): fitted once, read back on resume. Under
    torchrun rank 0 fits and sends its units to every rank, and alone writes the file (ranks on
    several machines may share a process id, and with it a temporary file's name)."""
    path = run_dir / "kmeans.safetensors"
    if path.is_file():
        units = Units.load(path)
        if units.targets == cfg.targets and units.centroids.shape[0] == cfg.n_units:
            progress.log(f"using the k-means units in {path}")
            return units
    units = fit_units(cfg, utts, source, progress, shard)
    if shard.rank == 0:
        units.save(path)
    return units


def _pretrain_job(cfg: PretrainConfig, model: PretrainModel, held: list[Utterance], targets: dict[str, np.ndarray],
                  su: Any) -> Any:
    from ofactl.checkpoint import atomic_torch_save
    from ofactl.training import Job

    job: Job

    def step_loss(batch: dict[str, Any], gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        wav, lengths = batch["wav"].to(su.device, non_blocking=True), batch["lengths"].to(su.device)
        n = cnn_lengths(cfg.arch, batch["lengths"])
        mask = span_mask(n, cfg.mask_prob, cfg.mask_length, gen).to(su.device)
        with autocast(su.device, su.amp):
            logits, n_dev = job.model(wav, lengths, mask, cfg.feature_grad_mult)
        return unit_loss(logits, batch["aligned"], mask, n_dev, cfg.unmasked_weight)

    def save(path: Path, step: int, train_state: dict[str, Any]) -> None:
        atomic_torch_save({"format": FORMAT, "step": step, "arch": asdict(cfg.arch), "config": to_dict(cfg),
                           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                           "train_state": train_state}, path)

    def load(obj: dict[str, Any]) -> dict[str, Any]:
        model.load_state_dict(obj["state_dict"])
        return dict(obj["train_state"])

    job = Job("pretraining", model, list(model.parameters()), step_loss, save, _read_checkpoint, load,
              evaluate=lambda: evaluate(model, held, targets, cfg, su.device, su.amp),
              progress_keys=("loss", "acc_masked"))
    return job


def _check_earlier_objective(cfg: PretrainConfig, run_dir: Path) -> None:
    """Refuse ``--resume`` of a pre-LN run recorded before ``final_norm`` existed (its objective
    read the last layer before the final norm) unless this run sets ``final_norm: false``;
    checked before the settings are recorded again, which would name the new value."""
    from ofactl.training import saved_settings

    if not (run_dir / "config.yaml").is_file() or not cfg.arch.layer_norm_first or not cfg.final_norm:
        return
    if "final_norm" not in saved_settings(run_dir, "pretrain"):
        raise CheckpointError(f"--resume: {run_dir} was trained with final_norm=false (recorded before the "
                              "setting existed: its objective read the last layer before the final norm), this "
                              "run sets final_norm=true; continue it with --set final_norm=false or start over "
                              "with --overwrite")


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an ofactl pretraining checkpoint")
    return obj


@torch.no_grad()
def evaluate(model: PretrainModel, held: list[Utterance], targets: dict[str, np.ndarray], cfg: PretrainConfig,
             device: torch.device, amp: torch.dtype | None) -> dict[str, float]:
    """Loss and unit accuracy on masked and unmasked held-out frames (a fixed seeded mask)."""
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 99)
    sums = {"loss": 0.0, "acc_masked": 0.0, "acc_unmasked": 0.0}
    count = 0
    crop = int(cfg.crop_seconds * SAMPLE_RATE) * 2
    ids = [u.id for u in held]
    k = 0
    for wav, lengths in held_batches(held, crop):
        b_ids = ids[k : k + len(lengths)]
        k += len(lengths)
        n = cnn_lengths(cfg.arch, lengths)
        units = torch.nn.utils.rnn.pad_sequence(
            [torch.from_numpy(targets[u][: int(t)].astype(np.int64)) for u, t in zip(b_ids, n)],
            batch_first=True, padding_value=-1)
        mask = span_mask(n, cfg.mask_prob, cfg.mask_length, gen).to(device)
        with autocast(device, amp):
            logits, n_dev = model(wav.to(device), lengths.to(device), mask)
        loss, st = unit_loss(logits, units, mask, n_dev, 0.0)
        w = len(lengths)
        sums["loss"] += float(loss) * w
        sums["acc_masked"] += st["acc_masked"] * w
        sums["acc_unmasked"] += st["acc_unmasked"] * w
        count += w
    model.train(was)
    return {k: round(v / max(1, count), 5) for k, v in sums.items()}


def export_teacher(model: PretrainModel, path: Path, extra: dict[str, str] | None = None) -> Path:
    """The encoder as a teacher: torchaudio-layout weights in safetensors, the architecture in
    the metadata (``--teacher PATH`` reads it), written atomically."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
    meta = {TEACHER_META: json.dumps(asdict(model.arch)), "format": "ofactl-teacher", **(extra or {})}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)
    return path


def _finish(cfg: PretrainConfig, su: Any, model: PretrainModel, trn: list[Utterance], held: list[Utterance],
            targets: dict[str, np.ndarray], loop: Any) -> PretrainResult:
    """teacher.safetensors (with the median level of the training audio, as distill records in
    student.pt), held-out unit accuracy, summary.json (rank 0)."""
    from ofactl.training import finish_distributed, ranks_in_sync

    in_sync = ranks_in_sync(model) if su.world > 1 else None
    teacher = su.run_dir / "teacher.safetensors"
    ev: dict[str, float] = {}
    if su.main:
        ev = evaluate(model, held, targets, cfg, su.device, su.amp)
        level = median_level_db(trn, seed=cfg.seed)
        export_teacher(model, teacher, {"targets": cfg.targets, "steps": str(loop.step)}
                       | ({} if level is None else {"input_level_db": str(level)}))
    res = PretrainResult(su.run_dir, teacher, loop.step, loop.start, ev, loop.audio_seconds, loop.wall_seconds,
                         loop.totals, in_sync)
    if su.main:
        write_text(su.run_dir / "summary.json", json.dumps(res.to_json(), indent=2))
    finish_distributed(su.world)
    return res


def expected_masked_fraction(p: float, span: int) -> float:
    """Share of frames a span mask covers on long utterances: 1 - (1 - p)^span (overlaps)."""
    return 1.0 - math.pow(1.0 - p, span)
