"""The student's front end: 16 kHz audio (B, N) -> frames (B, T, C) on the CNN's 20 ms grid.

- ``cnn``: the teacher's waveform CNN (copied from it at initialisation), the paper's choice.
- ``cnn-thin``: the same kernels and strides with ``frontend_channels`` channels in every layer,
  trained by distillation only.
- ``fbank``: log-mel filterbanks (``fbank_bins`` bins, 25 ms windows every 10 ms), a per-frame
  LayerNorm, then two 1-D convolutions (kernel 3; the first with stride 2) to the 20 ms grid.

Every front end gives the CNN's frame count, T = (N - 400) // 320 + 1, and its grid: fbank
output t is centred on sample 320 t + 200, like CNN frame t. The store, distillation and the
compressor are therefore the same for all three. Each is padding-invariant: a padded batch gives
every utterance its own frames (fbank frames past an utterance's end are zeroed before each
convolution, so they never leak into its last frames).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch import Tensor

from ofactl.model.blocks import HubertArch, build_cnn, cnn_forward, cnn_lengths
from ofactl.model.compress import length_mask
from ofactl.model.fbank import WIN, log_mel_frames, mel_filters
from ofactl.runtime import SAMPLE_RATE

if TYPE_CHECKING:
    from ofactl.model.student import StudentConfig

FBANK_WIN, FBANK_HOP = WIN, 160  # 25 ms windows (the spectral target's) every 10 ms


def frontend_channels(cfg: StudentConfig) -> int:
    """Channels of the front end's output: the CNN's for ``cnn``; ``frontend_channels`` (0: a
    quarter of the CNN's for ``cnn-thin``, the CNN's for ``fbank``) otherwise."""
    if cfg.frontend == "cnn":
        return cfg.arch.cnn_dim
    if cfg.frontend_channels > 0:
        return cfg.frontend_channels
    return max(8, cfg.arch.cnn_dim // 4) if cfg.frontend == "cnn-thin" else cfg.arch.cnn_dim


def frontend_arch(cfg: StudentConfig) -> HubertArch:
    """``cfg.arch`` with the front end's channels in every conv layer: kernels and strides (the
    frame grid) are the CNN's, and ``cnn_dim`` is what the projection and compressor see."""
    if cfg.frontend == "cnn":
        return cfg.arch
    c = frontend_channels(cfg)
    return replace(cfg.arch, conv_layers=tuple((c, k, s) for _, k, s in cfg.arch.conv_layers))


def build_frontend(cfg: StudentConfig) -> nn.Module:
    """The front end module of ``cfg`` (run it with :func:`frontend_forward`)."""
    if cfg.frontend == "fbank":
        return FbankFrontend(cfg.fbank_bins, frontend_channels(cfg), cfg.arch)
    return build_cnn(frontend_arch(cfg))


def frontend_forward(frontend: nn.Module, wav: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N) samples with lengths (B,) -> frames (B, T, C) and frame lengths (B,)."""
    if isinstance(frontend, FbankFrontend):
        return frontend(wav, lengths)
    return cnn_forward(frontend, wav, lengths)


class FbankFrontend(nn.Module):
    """Log-mel (10 ms) -> LayerNorm -> Conv1d(stride 2) -> GELU -> Conv1d -> GELU: (B, T, C)."""

    window: Tensor  # buffers (not saved: they follow from the settings)
    mel: Tensor

    def __init__(self, bins: int, channels: int, arch: HubertArch) -> None:
        super().__init__()
        self.bins, self.channels, self.arch = bins, channels, arch
        self.register_buffer("window", torch.hann_window(FBANK_WIN), persistent=False)
        self.register_buffer("mel", mel_filters(bins).clone(), persistent=False)
        self.norm = nn.LayerNorm(bins)
        self.conv1 = nn.Conv1d(bins, channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=1, padding=1)

    def log_mel(self, wav: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N) -> log-mel (B, F, bins) every 10 ms (zero past each end) and frame counts (B,)."""
        nf = torch.where(lengths >= FBANK_WIN, torch.div(lengths - FBANK_WIN, FBANK_HOP, rounding_mode="floor") + 1,
                         torch.zeros_like(lengths))
        if wav.shape[1] < FBANK_WIN:
            return wav.new_zeros(wav.shape[0], 0, self.bins, dtype=torch.float32), nf
        with torch.autocast(wav.device.type, enabled=False):  # FFT and log in float32
            return log_mel_frames(wav, FBANK_HOP, self.window, self.mel), nf

    def forward(self, wav: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N) samples with lengths -> (B, T, C) frames on the CNN grid, frame lengths (B,)."""
        x, nf = self.log_mel(wav, lengths)
        n = cnn_lengths(self.arch, lengths)
        x = self.norm(x) * length_mask(nf, x.shape[1])[..., None].to(x.dtype)
        x = nn.functional.gelu(self.conv1(x.transpose(1, 2)))  # (B, C, ceil(F / 2)): the 20 ms grid
        x = x * length_mask(n, x.shape[2])[:, None].to(x.dtype)
        x = nn.functional.gelu(self.conv2(x))
        T = int(n.max()) if n.numel() else 0
        x = nn.functional.pad(x, (0, max(0, T - x.shape[2])))[..., :T]
        return (x * length_mask(n, T)[:, None].to(x.dtype)).transpose(1, 2), n


def frontend_macs_per_second(cfg: StudentConfig) -> float:
    """Multiply-accumulates of the front end per audio second. fbank: the mel projection and
    both convolutions (the FFT, about 2.3k real multiplies per 10 ms frame, is not counted)."""
    from ofactl.model.macs import cnn_macs_per_second

    if cfg.frontend != "fbank":
        return cnn_macs_per_second(frontend_arch(cfg))
    c, bins = frontend_channels(cfg), cfg.fbank_bins
    fps_10, fps_20 = SAMPLE_RATE / FBANK_HOP, SAMPLE_RATE / cfg.arch.hop
    mel = fps_10 * (FBANK_WIN // 2 + 1) * bins
    return mel + fps_20 * (bins * c * 3 + c * c * 3)


def describe_frontend(cfg: StudentConfig) -> dict[str, Any]:
    """Kind, channels and GMAC per audio second of the front end (``ofactl info``)."""
    return {"kind": cfg.frontend, "channels": frontend_channels(cfg),
            "gmacs_per_s": round(frontend_macs_per_second(cfg) / 1e9, 4)}
