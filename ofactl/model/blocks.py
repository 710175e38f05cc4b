"""HuBERT building blocks shared by teacher and student (torchaudio components underneath).

:class:`HubertArch` is the whole architecture as flat keyword fields (named after the fairseq
fields they mirror). The CNN forward normalises over valid frames only, and the transformer
returns every hidden state, so a padded batch gives the same valid frames as per-utterance runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor
from torchaudio.models import Wav2Vec2Model
from torchaudio.models.wav2vec2 import components as C

from ofactl.choices import ConvNorm
from ofactl.errors import ModelError
from ofactl.model.compress import length_mask
from ofactl.runtime import SAMPLE_RATE

# HuBERT / wav2vec 2.0 CNN: 7 layers, total stride 320 samples = 20 ms at 16 kHz.
BASE_CONV: tuple[tuple[int, int, int], ...] = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


@dataclass
class HubertArch:
    """Architecture of a HuBERT-family encoder.

    conv_layers: (channels, kernel, stride) per CNN layer (fairseq ``conv_feature_layers``);
    conv_norm: "group_norm" (first layer, base models) or "layer_norm" (every layer, large);
    layer_norm_first: pre-LN transformer (large models, HF ``do_stable_layer_norm``).
    """

    # (channels, kernel, stride) per CNN layer (fairseq conv_feature_layers)
    conv_layers: tuple[tuple[int, int, int], ...] = BASE_CONV
    # group_norm: first CNN layer only (base models); layer_norm: every layer (large)
    conv_norm: ConvNorm = "group_norm"
    conv_bias: bool = False  # biases in the CNN's convolutions
    embed_dim: int = 768  # transformer width
    num_layers: int = 12  # transformer layers
    num_heads: int = 12  # attention heads
    ffn_dim: int = 3072  # feed-forward width
    pos_conv_kernel: int = 128  # kernel of the convolutional positional embedding (frames)
    pos_conv_groups: int = 16  # groups of the convolutional positional embedding
    layer_norm_first: bool = False  # pre-LN transformer (large models, HF do_stable_layer_norm)
    dropout: float = 0.1  # dropout after attention and feed-forward blocks
    attention_dropout: float = 0.1  # dropout on attention weights
    activation_dropout: float = 0.0  # dropout inside the feed-forward block
    feature_dropout: float = 0.0  # dropout on the projected CNN features
    normalize_waveform: bool = False  # fairseq task.normalize (True for large checkpoints)

    def validate(self) -> None:
        """Raise ValueError for an architecture torchaudio cannot build."""
        if self.conv_norm not in ("group_norm", "layer_norm"):
            raise ValueError(f"conv_norm must be group_norm or layer_norm, got {self.conv_norm!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % self.pos_conv_groups:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by pos_conv_groups {self.pos_conv_groups}")
        if not self.conv_layers:
            raise ValueError("conv_layers is empty")

    @property
    def cnn_dim(self) -> int:
        """Channels of the CNN's last layer (the feature projection's input)."""
        return self.conv_layers[-1][0]

    @property
    def hop(self) -> int:
        """Samples per CNN frame (320 for HuBERT)."""
        h = 1
        for _, _, s in self.conv_layers:
            h *= s
        return h


def cnn_lengths(arch: HubertArch, n_samples: Tensor) -> Tensor:
    """Frames the CNN gives for (B,) sample counts: floor((L - k) / s) + 1 per layer, >= 0."""
    n = n_samples.clone()
    for _, k, s in arch.conv_layers:
        n = torch.div(n - k, s, rounding_mode="floor") + 1
        n = n.clamp(min=0)
    return n


# HuBERT's feature_grad_mult: scales the gradient reaching the CNN. Re-exported so that
# torchaudio's model internals are reached from this module only.
GradMultiply = C.GradMultiply


def build_cnn(arch: HubertArch) -> C.FeatureExtractor:
    """The waveform CNN for ``arch`` (torchaudio's FeatureExtractor): (B, N) samples -> (B, T, C)."""
    arch.validate()
    return C._get_feature_extractor(arch.conv_norm, [tuple(x) for x in arch.conv_layers], arch.conv_bias)


# Samples per CNN micro-batch. The first conv layers make ~1.6 GB of activations for 80 s of
# audio; chunks of ~20 s keep them cache- and allocator-friendly (about 1.5x faster on CPU).
CNN_CHUNK_SAMPLES = 20 * SAMPLE_RATE


def cnn_forward(cnn: C.FeatureExtractor, wav: Tensor, lengths: Tensor,
                chunk_samples: int = CNN_CHUNK_SAMPLES) -> tuple[Tensor, Tensor]:
    """(B, N) waveform -> ((B, T, C) features, (B,) frame lengths).

    Same as torchaudio's FeatureExtractor except that (a) a GroupNorm (a per-channel norm over
    time) uses only valid frames, so padding never changes the features of shorter utterances,
    and (b) the batch runs in micro-batches of about ``chunk_samples`` samples, each trimmed to
    its own longest utterance. Both leave the valid frames unchanged.
    """
    if wav.ndim != 2:
        raise ModelError(f"expected a (batch, samples) waveform, got shape {list(wav.shape)}")
    B, N = wav.shape
    per = max(1, chunk_samples // max(1, N))
    if per >= B:
        return _cnn_chunk(cnn, wav, lengths)
    outs, lens = [], []
    for i in range(0, B, per):
        n_max = int(lengths[i : i + per].max()) if lengths.numel() else N
        x, n = _cnn_chunk(cnn, wav[i : i + per, : max(n_max, 1)], lengths[i : i + per])
        outs.append(x)
        lens.append(n)
    T = max(x.shape[1] for x in outs)
    outs = [nn.functional.pad(x, (0, 0, 0, T - x.shape[1])) for x in outs]
    return torch.cat(outs, 0), torch.cat(lens, 0)


def _cnn_chunk(cnn: C.FeatureExtractor, wav: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    x = wav.unsqueeze(1)
    n = lengths
    for layer in cnn.conv_layers:
        x = layer.conv(x)
        n = (torch.div(n - layer.kernel_size, layer.stride, rounding_mode="floor") + 1).clamp(min=0)
        if isinstance(layer.layer_norm, nn.GroupNorm):
            x = _masked_group_norm(layer.layer_norm, x, n)
        elif layer.layer_norm is not None:
            x = layer.layer_norm(x)
        x = nn.functional.gelu(x)
    return x.transpose(1, 2), n


def _masked_group_norm(gn: nn.GroupNorm, x: Tensor, lengths: Tensor) -> Tensor:
    """GroupNorm of x (B, C, T) with statistics over valid frames only."""
    B, Ch, T = x.shape
    if bool((lengths >= T).all()):
        return gn(x)  # no padding: the fused kernel
    G = gn.num_groups
    mask = length_mask(lengths, T)[:, None, :].to(x.dtype)  # (B, 1, T)
    xm = x * mask
    n = (mask.sum(-1) * (Ch // G)).clamp(min=1)  # (B, 1) valid elements per group
    s1 = xm.sum(-1).reshape(B, G, Ch // G).sum(-1)  # (B, G)
    s2 = (xm * xm).sum(-1).reshape(B, G, Ch // G).sum(-1)
    scale, shift = group_norm_affine(gn, s1, s2, n)  # (B, C) each
    return torch.addcmul(shift[..., None], x, scale[..., None])


def group_norm_affine(gn: nn.GroupNorm, s1: Tensor, s2: Tensor, n: Tensor | float) -> tuple[Tensor, Tensor]:
    """A GroupNorm as per-channel (scale, shift) from per-group sums of x and x^2 over ``n``
    elements: (..., G) -> (..., C) each, so that the norm is ``x * scale + shift``."""
    per = gn.num_channels // gn.num_groups
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp(min=0.0)
    inv = torch.rsqrt(var + gn.eps).repeat_interleave(per, dim=-1)
    mean_c = mean.repeat_interleave(per, dim=-1)
    scale = inv * gn.weight if gn.affine else inv
    shift = (gn.bias if gn.affine else 0.0) - mean_c * scale
    return scale, shift


def build_encoder(arch: HubertArch, num_layers: int | None = None) -> C.Encoder:
    """Feature projection + conv positional embedding + transformer layers (torchaudio)."""
    arch.validate()
    return C._get_encoder(
        in_features=arch.cnn_dim, embed_dim=arch.embed_dim, dropout_input=arch.feature_dropout,
        pos_conv_kernel=arch.pos_conv_kernel, pos_conv_groups=arch.pos_conv_groups,
        num_layers=arch.num_layers if num_layers is None else num_layers,
        num_heads=arch.num_heads, attention_dropout=arch.attention_dropout,
        ff_interm_features=arch.ffn_dim, ff_interm_dropout=arch.activation_dropout,
        dropout=arch.dropout, layer_norm_first=arch.layer_norm_first, layer_drop=0.0,
    )


def build_wav2vec2(arch: HubertArch) -> Wav2Vec2Model:
    """torchaudio's ``Wav2Vec2Model`` (CNN and encoder, no head) for ``arch``: the teacher's layout."""
    return Wav2Vec2Model(build_cnn(arch), build_encoder(arch), aux=None)


def transformer_states(transformer: C.Transformer, x: Tensor, lengths: Tensor) -> list[Tensor]:
    """Every hidden state of the transformer for projected features x (B, T, D).

    Returns num_layers + 1 tensors (B, T, D): the input after the positional convolution (and
    the layer norm of post-LN models), then each layer's output. A pre-LN model's final layer
    norm is not applied to its last state, as in torchaudio, fairseq's layer results and
    HuggingFace ``output_hidden_states`` (transformers 5). Padded frames are zeroed before the
    positional convolution and masked out of attention.
    """
    B, T, _ = x.shape
    valid = length_mask(lengths, T)
    x = x * valid[..., None].to(x.dtype)
    mask = None
    if not bool(valid.all()):
        # additive mask; SDPA broadcasts (B, 1, 1, T) over heads and queries
        mask = torch.zeros(B, 1, 1, T, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~valid[:, None, None, :], torch.finfo(x.dtype).min)
        mask = mask.expand(B, 1, T, T)
    x = x + transformer.pos_conv_embed(x)
    # torchaudio's Transformer.layer_norm_first means "normalise the input", i.e. it is True
    # for post-LN models (the encoder flag negated).
    if transformer.layer_norm_first:
        x = transformer.layer_norm(x)
    x = transformer.dropout(x)
    states = [x]
    for layer in transformer.layers:
        x, _ = layer(x, mask)
        states.append(x)
    return states


def normalize_waveform(wav: Tensor, lengths: Tensor) -> Tensor:
    """Zero-mean, unit-variance per utterance over valid samples (fairseq ``normalize``)."""
    m = length_mask(lengths, wav.shape[1]).to(wav.dtype)
    n = m.sum(1, keepdim=True).clamp(min=1)
    mean = (wav * m).sum(1, keepdim=True) / n
    var = (((wav - mean) * m) ** 2).sum(1, keepdim=True) / n
    return (wav - mean) / torch.sqrt(var + 1e-5) * m


@dataclass
class Hidden:
    """Hidden states (B, T, L, D) with lengths (B,): one tensor for all layers."""

    states: Tensor
    lengths: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        """Number of transformer layers (hidden states are one more)."""
        return self.states.shape[2]
