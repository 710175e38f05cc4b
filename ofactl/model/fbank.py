"""Log-mel filterbank frames on the 20 ms CNN grid: an acoustic distillation target.

An untrained teacher (``random:tiny``) carries no phonetic information, so a student that only
mimics it learns features no downstream probe can use. Predicting log-mel frames as well
(``student.spectral_bins``) gives the student real acoustic structure; the tiny presets do this.

Frame t covers samples [320 t, 320 t + 400) (25 ms Hann window, 20 ms hop, no centre padding),
the receptive-field grid of the HuBERT CNN, so T = (N - 400) // 320 + 1 frames, the CNN's count.
Each utterance is normalised by one scalar mean and standard deviation over all its valid
frames and bins: that removes loudness but keeps the spectral shape (per-bin CMVN would also
remove the speaker's timbre, which speaker ID needs).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from ofactl.model.compress import length_mask
from ofactl.runtime import SAMPLE_RATE as SR

WIN, HOP = 400, 320  # 25 ms windows every 20 ms at SR


@lru_cache(maxsize=8)
def mel_filters(n_mels: int) -> Tensor:
    """(WIN / 2 + 1, n_mels) Slaney mel filters, 20 Hz to SR / 2, for 25 ms windows (CPU)."""
    import torchaudio.functional as AF

    return AF.melscale_fbanks(WIN // 2 + 1, 20.0, SR / 2, n_mels, SR, norm="slaney", mel_scale="slaney")


@lru_cache(maxsize=8)
def _filters(n_mels: int, device: str) -> tuple[Tensor, Tensor]:
    return torch.hann_window(WIN, device=device), mel_filters(n_mels).to(device)


def log_mel_frames(wav: Tensor, hop: int, window: Tensor, fb: Tensor) -> Tensor:
    """(B, N) samples -> (B, T, n_mels) float32 log mel power of Hann windows of WIN samples every
    ``hop`` samples (no centre padding, no normalisation); N must be at least WIN."""
    frames = wav.float().unfold(1, WIN, hop) * window  # (B, T, WIN)
    power = torch.fft.rfft(frames, dim=-1).abs().pow(2)  # (B, T, WIN/2+1)
    return (power @ fb).clamp(min=1e-10).log()


def frame_count(lengths: Tensor) -> Tensor:
    """(B,) samples -> (B,) frames on the 20 ms grid (0 for clips shorter than one window)."""
    return torch.where(lengths >= WIN, torch.div(lengths - WIN, HOP, rounding_mode="floor") + 1,
                       torch.zeros_like(lengths))


@torch.no_grad()
def log_mel(wav: Tensor, lengths: Tensor, n_mels: int) -> tuple[Tensor, Tensor]:
    """(B, N) 16 kHz samples with lengths -> normalised log-mel (B, T, n_mels) fp32, frame lengths (B,).

    Padding frames are zero; a padded batch gives each utterance's own frames.
    """
    window, fb = _filters(n_mels, str(wav.device))
    n = frame_count(lengths)
    if wav.shape[1] < WIN:
        return wav.new_zeros(wav.shape[0], 0, n_mels, dtype=torch.float32), n
    x = log_mel_frames(wav, HOP, window, fb)  # (B, T, n_mels)
    mask = length_mask(n, x.shape[1])[..., None].to(x.dtype)
    cnt = (mask.sum((1, 2), keepdim=True) * n_mels).clamp(min=1)
    mean = (x * mask).sum((1, 2), keepdim=True) / cnt
    var = (((x - mean) * mask) ** 2).sum((1, 2), keepdim=True) / cnt
    return (x - mean) / torch.sqrt(var + 1e-5) * mask, n
