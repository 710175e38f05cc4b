"""Bounded-memory features for long recordings: the student run in overlapping windows.

A whole 20-minute clip would need gigabytes for the first CNN layer's activations and for the
attention over tens of thousands of frames. Here:

1. the CNN runs over windows of frames whose sample ranges overlap by its receptive field, so
   every output frame sees exactly the samples it sees in a whole run; the first layer's
   GroupNorm (a per-channel norm over the whole utterance) takes its statistics from a first
   pass over the same windows, so the CNN output equals the whole-utterance one;
2. the compressor runs on the stitched sequence, so lengths stay round(r * T) in exact mode;
3. the projection and transformer run on windows of the compressed sequence with ``context``
   frames on both sides, and only each window's centre is kept. Attention then sees at most
   window + 2 x context frames, the one approximation, measured in the tests and recorded
   in the store (``long_window_s``, ``long_context_s``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch import Tensor

from ofactl.model.blocks import Hidden, group_norm_affine
from ofactl.model.frontend import FbankFrontend, frontend_arch

if TYPE_CHECKING:
    from ofactl.model.student import Student

CNN_WINDOW_FRAMES = 1000  # 20 s of 20 ms frames per CNN window (exact, so only a speed knob)


def receptive_field(conv_layers: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
    """(hop, receptive field) in samples of a stack of (channels, kernel, stride) convs."""
    hop, rf = 1, 1
    for _, k, s in conv_layers:
        rf += (k - 1) * hop
        hop *= s
    return hop, rf


def min_input_samples(conv_layers: Sequence[tuple[int, int, int]], fastest: float = 1.0) -> int:
    """The fewest 16 kHz samples that give one frame of the CNN ``conv_layers``, once audio played
    ``fastest`` times as fast (speed perturbation) has shortened them."""
    return math.ceil(receptive_field(conv_layers)[1] * fastest - 1e-6)


def _frames(n: int, conv_layers: Sequence[tuple[int, int, int]]) -> int:
    for _, k, s in conv_layers:
        n = max(0, (n - k) // s + 1)
    return n


@torch.no_grad()
def cnn_windowed(cnn: Any, conv_layers: Sequence[tuple[int, int, int]], wav: Tensor,
                 window: int = CNN_WINDOW_FRAMES) -> Tensor:
    """(N,) samples -> (T, C) CNN output, computed ``window`` output frames at a time."""
    hop, rf = receptive_field(conv_layers)
    T = _frames(wav.shape[0], conv_layers)
    layers = list(cnn.conv_layers)
    first = layers[0]
    stats = _first_layer_stats(first, wav, window * hop) if isinstance(first.layer_norm, nn.GroupNorm) else None
    outs = []
    for t0 in range(0, T, window):
        t1 = min(T, t0 + window)
        x = wav[t0 * hop : (t1 - 1) * hop + rf][None, None]
        x = first.conv(x)
        if stats is not None:
            x = torch.addcmul(stats[1][..., None], x, stats[0][..., None])
        elif first.layer_norm is not None:
            x = first.layer_norm(x)
        x = nn.functional.gelu(x)
        for layer in layers[1:]:
            x = layer.conv(x)
            if layer.layer_norm is not None:
                x = layer.layer_norm(x)
            x = nn.functional.gelu(x)
        outs.append(x[0].transpose(0, 1)[: t1 - t0])
    return torch.cat(outs, 0) if outs else wav.new_zeros(0, conv_layers[-1][0])


def _first_layer_stats(layer: Any, wav: Tensor, span: int) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) of the first layer's GroupNorm over the whole utterance,
    accumulated in float64 over windows of the first conv's output."""
    conv, gn = layer.conv, layer.layer_norm
    k, s = conv.kernel_size[0], conv.stride[0]
    n0 = max(0, (wav.shape[0] - k) // s + 1)
    step = max(1, span // s)
    C, G = conv.out_channels, gn.num_groups
    s1 = torch.zeros(C, dtype=torch.float64, device=wav.device)
    s2 = torch.zeros(C, dtype=torch.float64, device=wav.device)
    for a in range(0, n0, step):
        b = min(n0, a + step)
        y = conv(wav[a * s : (b - 1) * s + k][None, None])[0].double()
        s1 += y.sum(-1)
        s2 += (y * y).sum(-1)
    sums = (s1.reshape(G, C // G).sum(-1), s2.reshape(G, C // G).sum(-1))
    scale, shift = group_norm_affine(gn, *sums, max(1, n0) * (C // G))  # float64 statistics
    return scale.to(wav.dtype), shift.to(wav.dtype)


@torch.no_grad()
def features_windowed(student: Student, wav: Tensor, rates: Sequence[float], *, exact: bool = True,
                      layers: Sequence[int] | None = None, window: int, context: int) -> dict[float, Hidden]:
    """One long utterance (N,) -> hidden states (1, T', L, D) per rate, like
    ``student.features`` on it alone, with bounded memory. ``window`` and ``context`` are in
    input (20 ms) frames; the transformer's are scaled by each rate's output/input ratio."""
    cfg = student.cfg
    if isinstance(student.cnn, FbankFrontend):  # a few MB per minute of audio: run it whole
        feats = student.cnn(wav[None], torch.tensor([len(wav)], device=wav.device))[0][0]
    else:
        feats = cnn_windowed(student.cnn, frontend_arch(cfg).conv_layers, wav)
    feats = student.feature_projection.layer_norm(feats)[None]  # (1, T, C)
    n = torch.tensor([feats.shape[1]], device=wav.device)
    out: dict[float, Hidden] = {}
    for r in rates:
        comp = student.compressor(feats, n, rate=float(r), exact=exact)
        Tc, ratio = comp.x.shape[1], comp.x.shape[1] / max(1, feats.shape[1])
        w = max(1, math.ceil(window * ratio))
        c = max(0, math.ceil(context * ratio))
        pieces = []
        for a in range(0, Tc, w):
            b = min(Tc, a + w)
            lo, hi = max(0, a - c), min(Tc, b + c)
            h = student.transform(comp.x[:, lo:hi], torch.tensor([hi - lo], device=wav.device))
            pieces.append(h.states[:, a - lo : b - lo])
        states = torch.cat(pieces, 1) if pieces else comp.x.new_zeros(1, 0, student.num_hidden, cfg.arch.embed_dim)
        if layers is not None:
            states = states[:, :, list(layers)]
        out[float(r)] = Hidden(states, comp.lengths)
    return out
