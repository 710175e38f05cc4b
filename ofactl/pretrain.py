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

import hashlib
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
from ofactl.audio import Corpus, Utterance, load_audio, median_level_db
from ofactl.choices import Precision
from ofactl.config import to_dict
from ofactl.errors import CheckpointError, ConfigError, OfactlError
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
    num_workers: int = 1  # audio decoding worker processes
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


def parse_targets(spec: str) -> int | None:
    """``mfcc`` -> None; ``layer:N`` -> N."""
    if spec == "mfcc":
        return None
    if spec.startswith("layer:"):
        try:
            return int(spec.split(":", 1)[1])
        except ValueError:
            pass
    raise ConfigError(f"--targets {spec!r}: expected mfcc or layer:N (with --from CKPT)")


# ----------------------------------------------------------------------------- the model
class PretrainModel(nn.Module):
    """A HuBERT encoder (torchaudio modules, the layout teachers load) plus what pretraining
    alone needs: the mask embedding, the final projection and the unit embeddings."""

    def __init__(self, arch: HubertArch, n_units: int, final_dim: int, logit_temp: float = 0.1) -> None:
        super().__init__()
        from ofactl.model.teacher import Teacher

        self.arch = arch
        self.temp = logit_temp
        self.encoder = Teacher(arch).model  # Wav2Vec2Model: feature_extractor + encoder
        transformer = self.encoder.encoder.transformer
        if not transformer.layer_norm_first:  # torchaudio's flag, negated: a pre-LN encoder
            # the objective reads the last layer's output as the hidden states give it, before
            # the final layer norm: frozen, so that DDP does not wait for its gradient (AdamW
            # never moved it anyway, and the optimiser still lists it: checkpoints stay as they were)
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
        h = transformer_states(self.encoder.encoder.transformer, x, n)[-1]
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
def mfcc_features(wav: Tensor, n_frames: int) -> Tensor:
    """(N,) 16 kHz samples -> (n_frames, 39) MFCC + deltas + delta-deltas on the 20 ms grid."""
    import torchaudio

    if len(wav) < 400:
        return torch.zeros(n_frames, 39)
    m = torchaudio.compliance.kaldi.mfcc(wav[None] * 32768.0, num_ceps=13, frame_length=25.0, frame_shift=10.0,
                                         sample_frequency=float(SAMPLE_RATE), dither=0.0)  # (F, 13), F at 100 Hz
    d1 = torchaudio.functional.compute_deltas(m.T)
    d2 = torchaudio.functional.compute_deltas(d1)
    x = torch.cat([m.T, d1, d2]).T[::2]  # frame 2t starts at sample 320 t, like CNN frame t
    if len(x) < n_frames:
        x = torch.cat([x, x[-1:].expand(n_frames - len(x), -1)])
    return x[:n_frames]


class FeatureSource:
    """Frame features on the 20 ms grid for units: MFCC, or a layer of an earlier model."""

    def __init__(self, cfg: PretrainConfig, device: torch.device, trust: bool = False) -> None:
        self.layer = parse_targets(cfg.targets)
        self.arch = cfg.arch
        self.device = device
        self.model: Any = None
        if self.layer is not None:
            self.model = _load_earlier(cfg, device, trust)
            if not 0 <= self.layer < self.model.num_hidden:
                raise ConfigError(f"--targets {cfg.targets}: {cfg.from_ckpt} has hidden states "
                                  f"0..{self.model.num_hidden - 1}")

    def to(self, device: torch.device) -> FeatureSource:
        """Run the earlier model of ``layer:N`` targets on ``device`` (the run's, once known: on a
        GPU, iteration 2's features for a large corpus take minutes instead of CPU days)."""
        if self.model is not None:
            self.model = self.model.to(device)
        self.device = device
        return self

    @torch.no_grad()
    def __call__(self, utt: Utterance) -> Tensor:
        """The features to cluster for one utterance: (T, D) on the model's 20 ms frame grid."""
        wav = load_audio(utt.path)
        n = int(cnn_lengths(self.arch, torch.tensor([len(wav)]))[0])
        if self.layer is None:
            return mfcc_features(wav, n)
        h = self.model(wav[None].to(self.device), torch.tensor([len(wav)], device=self.device))
        return h.states[0, :n, self.layer].float().cpu()


def _load_earlier(cfg: PretrainConfig, device: torch.device, trust: bool) -> Any:
    from ofactl.model.teacher import load_teacher

    if not cfg.from_ckpt:
        raise ConfigError(f"--targets {cfg.targets} needs --from CKPT (the earlier model, e.g. "
                          "RUN/teacher.safetensors of the mfcc iteration)")
    src = Path(cfg.from_ckpt)
    spec = src / "teacher.safetensors" if src.is_dir() else src
    model = load_teacher(spec, trust=trust)
    if asdict(model.arch) != asdict(cfg.arch):
        theirs, ours = model.arch, cfg.arch
        raise ConfigError(f"--from {cfg.from_ckpt}: another architecture ({theirs.num_layers} layers of "
                          f"{theirs.embed_dim}-d, CNN {theirs.conv_layers[0][0]} channels) than this run's "
                          f"({ours.num_layers} x {ours.embed_dim}-d, CNN {ours.conv_layers[0][0]}); "
                          "iteration 2 keeps the architecture: set arch to match")
    return model.to(device)


@dataclass
class Units:
    """k-means on a feature sample: centroids (K, D) over standardised features."""

    centroids: Tensor
    mean: Tensor
    std: Tensor
    targets: str

    def assign(self, x: Tensor) -> np.ndarray:
        """Standardise x (N, D) and return each row's nearest unit (N,) as int16."""
        from ofactl.model.segment import assign_units

        return assign_units((x - self.mean) / self.std, self.centroids).numpy().astype(np.int16)

    def save(self, path: Path) -> None:
        """Write centroids, standardisation and the target spec to a safetensors file."""
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({"centroids": self.centroids.contiguous(), "mean": self.mean, "std": self.std}, str(tmp),
                      metadata={"targets": self.targets})

    @classmethod
    def load(cls, path: Path) -> Units:
        """Read units written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors file, not a dict
            meta = f.metadata() or {}
        return cls(t["centroids"], t["mean"], t["std"], meta.get("targets", ""))


def fit_units(cfg: PretrainConfig, utts: list[Utterance], source: FeatureSource, progress: Progress) -> Units:
    """k-means++ and Lloyd iterations on up to ``kmeans_frames`` frames of ``kmeans_utts``
    utterances drawn with the run's seed (deterministic)."""
    from ofactl.model.segment import kmeans

    rng = np.random.default_rng(cfg.seed)
    pick = sorted(rng.choice(len(utts), size=min(cfg.kmeans_utts, len(utts)), replace=False).tolist())
    progress.start(f"k-means units of {cfg.targets}", len(pick))
    feats = []
    for i in pick:
        feats.append(source(utts[i]))
        progress.advance(1)
    progress.finish()
    x = torch.cat(feats)
    if len(x) > cfg.kmeans_frames:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.kmeans_frames]
        x = x[keep.sort().values]
    if len(x) < cfg.n_units:
        raise ConfigError(f"n_units={cfg.n_units} is more than the {len(x)} frames sampled for k-means "
                          f"(kmeans_utts={cfg.kmeans_utts}); use fewer units or more audio")
    mean, std = x.mean(0), x.std(0).clamp(min=1e-5)
    cent = kmeans((x - mean) / std, cfg.n_units, iters=cfg.kmeans_iters, seed=cfg.seed)
    return Units(cent, mean, std, cfg.targets)


def unit_targets(utts: list[Utterance], units: Units, source: FeatureSource, progress: Progress,
                 into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Units of every utterance (T frames each, int16), added to ``into`` (or a new dict) one
    utterance at a time, so that a stop part way keeps those assigned."""
    progress.start("assigning units", len(utts))
    out = {} if into is None else into
    for u in utts:
        out[u.id] = units.assign(source(u))
        progress.advance(1)
    progress.finish()
    return out


TARGETS_FILE = "unit-targets.npz"
TARGETS_VERSION = 1  # raised when the features or the assignment change, so older files are not read


def targets_key(units: Units, utts: list[Utterance], from_ckpt: str | None) -> str:
    """What a run's unit targets depend on: the units, the utterances (id, path, length) and the
    model a ``layer:N`` target reads."""
    from ofactl.config import doc_sha

    h = hashlib.sha256()
    for t in (units.centroids, units.mean, units.std):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return doc_sha({"version": TARGETS_VERSION, "units": h.hexdigest(), "targets": units.targets,
                    "from": from_ckpt, "utts": [(u.id, str(u.path), u.n_samples) for u in utts]})


def cached_unit_targets(utts: list[Utterance], units: Units, source: FeatureSource, path: Path, key: str,
                        write: bool, progress: Progress) -> dict[str, np.ndarray]:
    """:func:`unit_targets`, kept in ``path`` (``unit-targets.npz``, with ``write``: rank 0) and
    read back for the same ``key``: a resume assigns nothing (at paper scale the assignment takes
    hours), and a start stopped while assigning goes on with the utterances it had not reached."""
    done = _read_targets(path, key, progress) or {}
    left = [u for u in utts if u.id not in done]
    if not left:
        progress.log(f"using the unit targets in {path}")
        return {u.id: done[u.id] for u in utts}
    if done:
        progress.log(f"using the units of {len(done)} utterance(s) kept in {path}; assigning the other {len(left)}")
    kept = len(done)
    try:
        unit_targets(left, units, source, progress, into=done)
    except BaseException:  # Ctrl-C, SIGTERM, a bad recording: what was assigned is kept for the next start
        if write and len(done) > kept:
            try:
                _write_targets(path, key, done)
                progress.log(f"kept the units of {len(done)} of {len(utts)} utterance(s) in {path}")
            except OfactlError as e:  # a full disk: said, and the stop's own cause goes on
                progress.log(f"warning: {e}")
        raise
    if write:
        _write_targets(path, key, done)
    return {u.id: done[u.id] for u in utts}


def _write_targets(path: Path, key: str, targets: dict[str, np.ndarray]) -> None:
    """``targets`` as one npz: the key, the utterance ids, their lengths and every unit in a row."""
    ids = list(targets)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, key=np.array(key), ids=np.array(ids), lengths=np.array([len(targets[i]) for i in ids]),
                 units=np.concatenate([targets[i] for i in ids]) if ids else np.zeros(0, np.int16))


def _read_targets(path: Path, key: str, progress: Progress) -> dict[str, np.ndarray] | None:
    """The targets kept in ``path`` if it holds ``key``; None when absent, made for other units or
    utterances, or unreadable (said, then computed again)."""
    import zipfile

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            ids, lengths, flat = z["ids"].tolist(), z["lengths"], z["units"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # cut short, or not such a file
        progress.log(f"warning: {path}: unreadable ({type(e).__name__}); assigning the units again")
        return None
    ends = np.cumsum(lengths)
    return {i: flat[e - n:e] for i, n, e in zip(ids, lengths.tolist(), ends.tolist(), strict=True)}


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
    utts = list(cps)
    trn, held = split_held_out(utts, cfg.eval_utts, cfg.seed)
    source.to(su.device)
    units = _units(cfg, su.run_dir, trn, source, su.main, progress)
    targets = cached_unit_targets(utts, units, source, su.run_dir / TARGETS_FILE,
                                  targets_key(units, utts, cfg.from_ckpt), su.main, progress)
    del source  # the earlier model, if any, is not needed for training
    seed_all(cfg.seed)
    model = PretrainModel(cfg.arch, cfg.n_units, cfg.final_dim, cfg.logit_temp).to(su.device)
    if su.main:
        tr.record_run(cfg, "pretrain", su.run_dir, cps)
    optim = tr.make_optimisation(model.parameters(), cfg, su.amp)
    job = _pretrain_job(cfg, model, held, targets, su)
    start = tr.starting_step(job, optim, su, resume, progress)
    if su.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        job.model = DDP(model, device_ids=[su.device.index] if su.device.type == "cuda" else None)
    loader = tr.make_loader(tr.schedule_from(trn, cfg, start, su.world, su.rank), trn, cfg, su, targets,
                         cfg.arch.hop, start, speeds=cfg.speed_perturb)
    loop = tr.train(job, cfg, su, optim, loader, start, progress)
    return _finish(cfg, su, model, trn, held, targets, loop)


def _units(cfg: PretrainConfig, run_dir: Path, utts: list[Utterance], source: FeatureSource, write: bool,
           progress: Progress) -> Units:
    """The run's k-means (``kmeans.safetensors``, written by rank 0 alone, ``write``: ranks on
    several machines may share a process id, and with it a temporary file's name): fitted once,
    read back on resume."""
    path = run_dir / "kmeans.safetensors"
    if path.is_file():
        units = Units.load(path)
        if units.targets == cfg.targets and units.centroids.shape[0] == cfg.n_units:
            progress.log(f"using the k-means units in {path}")
            return units
    units = fit_units(cfg, utts, source, progress)
    if write:
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
