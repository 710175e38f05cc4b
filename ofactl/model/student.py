"""DistilHuBERT-shaped once-for-all student.

    wav (B, N) -> HuBERT CNN -> LayerNorm -> compressor(rate) -> projection
        -> conv positional embedding -> N transformer layers -> prediction heads

The compressor sits on the 512-d CNN output, before the projection, so every transformer
layer (and every downstream model) runs at the compressed rate. Hidden states are the
projection output plus each transformer layer: L = N + 1 states of width D.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ofactl.choices import CompressorKind, Frontend
from ofactl.errors import ModelError
from ofactl.model.blocks import (
    GradMultiply,
    Hidden,
    HubertArch,
    build_encoder,
    normalize_waveform,
    transformer_states,
)
from ofactl.model.compress import Compressed, Compressor, length_mask
from ofactl.model.frontend import build_frontend, frontend_arch, frontend_forward

TINY_CONV: tuple[tuple[int, int, int], ...] = ((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2


@dataclass
class StudentConfig:
    """Student architecture. ``arch.num_layers`` transformer layers (2 for DistilHuBERT).

    pred_layers: teacher hidden-state indices the heads predict (0 = teacher input to layer 1);
    teacher_dim: width of those targets; compressor: cif (once-for-all), avgpool (fixed-rate
    baseline) or none; spectral_bins: when > 0, one more head predicts that many log-mel bins
    (``ofactl.model.fbank``), an acoustic target beside the teacher's.
    """

    arch: HubertArch = field(default_factory=lambda: HubertArch(num_layers=2))
    frontend: Frontend = "cnn"  # cnn: the teacher's CNN; cnn-thin: its strides, fewer channels; fbank: log-mel + 2 convs
    frontend_channels: int = 0  # cnn-thin / fbank output channels (0: a quarter of the CNN's / the CNN's)
    fbank_bins: int = 80  # mel bins of the fbank front end (25 ms windows every 10 ms)
    compressor: CompressorKind = "cif"  # cif (once-for-all), avgpool (fixed-rate baseline) or none
    alpha_kernel: int = 5  # kernel of the alpha predictor's convolution (frames)
    duration_embed: bool = False  # add a learned embedding of each compressed frame's log duration
    pred_layers: tuple[int, ...] = (4, 8, 12)  # teacher hidden states the heads predict (0: the input to layer 1)
    teacher_dim: int = 768  # width of those teacher states (0: the teacher's, read by distill when it loads it)
    feature_grad_mult: float = 0.1  # scale of the gradient reaching the CNN (HuBERT's feature_grad_mult)
    spectral_bins: int = 0  # > 0: one more head predicts this many log-mel bins (acoustic target beside the teacher's)

    @property
    def hears_level(self) -> bool:
        """Whether the input's loudness reaches the features: a waveform front end without
        waveform normalisation does (its first GroupNorm's epsilon is fixed while a quiet signal's
        variance is not); the fbank front end normalises each utterance's log-mel frames."""
        return self.frontend != "fbank" and not self.arch.normalize_waveform

    def validate(self) -> None:
        """Raise ValueError for sizes that do not fit together (heads, layers, prediction layers)."""
        self.arch.validate()
        if self.frontend_channels < 0 or self.fbank_bins < 1:
            raise ValueError("frontend_channels must be >= 0 and fbank_bins >= 1")
        if self.spectral_bins < 0:
            raise ValueError(f"spectral_bins must be >= 0, got {self.spectral_bins}")
        if self.teacher_dim < 0:
            raise ValueError(f"teacher_dim must be >= 0 (0: the teacher's width), got {self.teacher_dim}")
        if self.compressor not in ("cif", "avgpool", "none"):
            raise ValueError(f"compressor must be cif, avgpool or none, got {self.compressor!r}")
        if not self.pred_layers:
            raise ValueError("pred_layers is empty")
        if self.arch.num_layers < 1:
            raise ValueError("the student needs at least one transformer layer")


def student_config(size: str) -> StudentConfig:
    """Named sizes: ``base`` (DistilHuBERT: 768-d, 12 heads, FFN 3072, 2 layers, heads for teacher
    layers 4/8/12) and ``tiny`` (64-d, CPU tests in seconds, predicting a random:tiny teacher)."""
    if size == "base":
        return StudentConfig()
    if size == "tiny":
        arch = HubertArch(conv_layers=TINY_CONV, embed_dim=64, num_layers=2, num_heads=2, ffn_dim=128,
                          pos_conv_kernel=16, pos_conv_groups=4)
        return StudentConfig(arch=arch, pred_layers=(2, 4), teacher_dim=64, alpha_kernel=5)
    raise ModelError(f"unknown student size '{size}' (expected base or tiny)")


class PredictionHeads(nn.Module):
    """Linear(D, D*H) -> GELU -> H separate Linear(D, Dt): (B, T, D) -> (B, T, H, Dt)."""

    def __init__(self, dim: int, out_dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.expand = nn.Linear(dim, dim * n_heads)
        self.weight = nn.Parameter(torch.empty(n_heads, dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, out_dim))
        for h in range(n_heads):
            nn.init.kaiming_uniform_(self.weight.data[h].T, a=5**0.5)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, H, Dt): one linear head per predicted teacher layer."""
        B, T, D = x.shape
        h = nn.functional.gelu(self.expand(x)).view(B, T, self.n_heads, D)
        # one head: the einsum's gradient for a (1, D, Dt) weight has stride Dt, not D * Dt, in
        # its size-1 dimension, which DDP reports as a layout mismatch on every rank; through
        # the (D, Dt) view the gradient comes back laid out as the weight (the same numbers)
        weight = self.weight[0].unsqueeze(0) if self.n_heads == 1 else self.weight
        return torch.einsum("bthd,hdo->btho", h, weight) + self.bias


@dataclass
class StudentOutput:
    """hidden: (B, T', L, D) with lengths; pred: (B, T', H, Dt) head outputs or None;
    compressed: the compressor's result (plan, alpha) for losses; cnn_lengths: (B,) frames S;
    spectral: (B, T', 1, spectral_bins) log-mel predictions, or None."""

    hidden: Hidden
    pred: Tensor | None
    compressed: Compressed
    cnn_lengths: Tensor
    spectral: Tensor | None = None


class Student(nn.Module):
    """The once-for-all student: teacher-style CNN, a rate-controlled compressor, a short
    transformer and prediction heads. ``features`` gives hidden states at any rate in (0, 1].
    """

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.teacher_dim == 0:
            raise ModelError("student.teacher_dim is 0 (the teacher's width): distill sets it from the teacher; "
                             "a student built on its own needs the width")
        self.cfg = cfg
        farch = frontend_arch(cfg)
        self.cnn = build_frontend(cfg)  # the front end (named cnn: checkpoints keep their keys)
        enc = build_encoder(farch)
        self.feature_projection = enc.feature_projection  # layer_norm -> projection -> dropout
        self.transformer = enc.transformer
        self.compressor = Compressor(farch.cnn_dim, cfg.compressor, cfg.alpha_kernel,
                                     duration_embed=cfg.duration_embed)
        self.heads = PredictionHeads(cfg.arch.embed_dim, cfg.teacher_dim, len(cfg.pred_layers))
        self.spectral_head = (PredictionHeads(cfg.arch.embed_dim, cfg.spectral_bins, 1)
                              if cfg.spectral_bins > 0 else None)
        # the median RMS level (dBFS) of the audio it was distilled on, where known: `extract
        # --level-db auto` scales recordings to it (a checkpoint field, not a weight)
        self.input_level_db: float | None = None

    @property
    def num_hidden(self) -> int:
        """Hidden states per frame: the projected input and one per transformer layer."""
        return self.cfg.arch.num_layers + 1

    @property
    def alpha_mean(self) -> float:
        """The running mean of alpha the compressor maps rates to lambdas with."""
        return float(self.compressor.alpha_mean)

    # ------------------------------------------------------------------ stages
    def cnn_features(self, wav: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N) samples -> layer-normed front-end features (B, S, C) and frame lengths (B,)."""
        if self.cfg.arch.normalize_waveform:  # as its teacher does: the student hears what the targets came from
            wav = normalize_waveform(wav, lengths)
        x, n = frontend_forward(self.cnn, wav, lengths)
        if self.training and self.cfg.feature_grad_mult != 1.0:
            x = GradMultiply.apply(x, self.cfg.feature_grad_mult)
        return self.feature_projection.layer_norm(x), n

    def encode(
        self,
        feats: Tensor,
        lengths: Tensor,
        rate: Tensor | float | None = 1.0,
        lam: Tensor | None = None,
        exact: bool = True,
    ) -> tuple[Hidden, Compressed]:
        """Compress CNN features and run the transformer: hidden states (B, T', L, D)."""
        comp = self.compressor(feats, lengths, rate=rate, lam=lam, exact=exact)
        return self.transform(comp.x, comp.lengths), comp

    def transform(self, x: Tensor, lengths: Tensor) -> Hidden:
        """Compressed CNN features (B, T', C) -> hidden states (B, T', L, D): the projection,
        then every transformer layer."""
        x = self.feature_projection.dropout(self.feature_projection.projection(x))
        x = x * length_mask(lengths, x.shape[1])[..., None].to(x.dtype)
        states = [x] + transformer_states(self.transformer, x, lengths)[1:]
        return Hidden(torch.stack(states, dim=2), lengths)

    def forward(
        self,
        wav: Tensor,
        lengths: Tensor,
        rate: Tensor | float | None = 1.0,
        lam: Tensor | None = None,
        exact: bool = True,
        with_heads: bool = True,
    ) -> StudentOutput:
        """wav (B, N) float at 16 kHz with sample lengths (B,); ``rate`` float or (B,) per utterance."""
        feats, n = self.cnn_features(wav, lengths)
        hidden, comp = self.encode(feats, n, rate=rate, lam=lam, exact=exact)
        last = hidden.states[:, :, -1]
        pred = self.heads(last) if with_heads else None
        spectral = self.spectral_head(last) if (with_heads and self.spectral_head is not None) else None
        return StudentOutput(hidden, pred, comp, n, spectral)

    @torch.no_grad()
    def features(
        self,
        wav: Tensor,
        lengths: Tensor,
        rates: Sequence[float],
        exact: bool = True,
        layers: Sequence[int] | None = None,
    ) -> dict[float, Hidden]:
        """Hidden states at several rates; the CNN (most of the compute) runs once."""
        feats, n = self.cnn_features(wav, lengths)
        out: dict[float, Hidden] = {}
        for r in rates:
            hidden, _ = self.encode(feats, n, rate=float(r), exact=exact)
            states = hidden.states if layers is None else hidden.states[:, :, list(layers)]
            out[float(r)] = Hidden(states, hidden.lengths)
        return out

    # ------------------------------------------------------------------ init
    def init_from_teacher(self, teacher: Any, partial: bool = False) -> list[str]:
        """Copy the teacher's CNN, projection, positional conv and first layers (DistilHuBERT
        init). Returns the copied parameter names. Shapes must match, or with ``partial`` only
        the parts whose every tensor matches are copied (a teacher with the student's CNN but
        a wider transformer gives its CNN)."""
        src = teacher.model.state_dict()  # torchaudio Wav2Vec2Model keys
        if self.cfg.frontend != "cnn" and not partial:
            raise ModelError(f"student.frontend {self.cfg.frontend}: the teacher's CNN cannot initialise it; "
                             "initialise the transformer only (partial) or use frontend: cnn")
        mapping = {}
        if self.cfg.frontend == "cnn":  # another front end's projection reads other features: not copied
            for k in self.cnn.state_dict():
                mapping[f"cnn.{k}"] = f"feature_extractor.{k}"
            for k in self.feature_projection.state_dict():
                mapping[f"feature_projection.{k}"] = f"encoder.feature_projection.{k}"
        for k in self.transformer.state_dict():
            mapping[f"transformer.{k}"] = f"encoder.transformer.{k}"
        own = self.state_dict()
        parts: dict[str, list[str]] = {}
        for dst in mapping:
            parts.setdefault(_part(dst), []).append(dst)
        copied = []
        for names in parts.values():
            bad = [d for d in names if mapping[d] not in src or src[mapping[d]].shape != own[d].shape]
            if bad and not partial:
                d = bad[0]
                if mapping[d] not in src:
                    raise ModelError(f"teacher has no parameter {mapping[d]} to initialise {d}")
                raise ModelError(
                    f"cannot initialise the student from this teacher: {d} is {list(own[d].shape)}, "
                    f"the teacher's {mapping[d]} is {list(src[mapping[d]].shape)}")
            if bad:
                continue
            for d in names:
                own[d] = src[mapping[d]].detach().clone()
                copied.append(d)
        self.load_state_dict(own)
        return copied


def _part(name: str) -> str:
    """The unit copied whole by ``init_from_teacher``: the CNN, the projection, the positional
    convolution, the transformer's input norm, or one transformer layer."""
    bits = name.split(".")
    if bits[0] == "transformer" and bits[1] == "layers":
        return ".".join(bits[:3])
    return ".".join(bits[:2]) if bits[0] == "transformer" else bits[0]
