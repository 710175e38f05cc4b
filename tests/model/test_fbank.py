from __future__ import annotations

import math

import torch

from ofactl.model.blocks import cnn_lengths
from ofactl.model.fbank import frame_count, log_mel
from ofactl.model.student import student_config


def test_frame_grid_matches_the_cnn():
    L = torch.tensor([399, 400, 719, 720, 16000, 12345])
    assert frame_count(L).tolist() == [0, 1, 1, 2, 49, 38]
    assert frame_count(L).tolist() == cnn_lengths(student_config("tiny").arch, L).tolist()


def test_padded_batch_equals_single_and_is_normalised():
    g = torch.Generator().manual_seed(0)
    wav = torch.randn(2, 16000, generator=g)
    L = torch.tensor([16000, 9000])
    x, n = log_mel(wav, L, 40)
    assert x.shape == (2, 49, 40) and n.tolist() == [49, 27]
    one, _ = log_mel(wav[1:, :9000], L[1:], 40)
    assert torch.allclose(x[1, :27], one[0], atol=1e-5)
    assert x[1, 27:].abs().max() == 0  # padding stays zero
    # one scalar per utterance: zero mean, unit variance overall, the spectral shape kept
    assert abs(float(x[0].mean())) < 1e-4 and abs(float(x[0].std(unbiased=False)) - 1) < 1e-2
    loud, _ = log_mel(3 * wav[:1], L[:1], 40)
    assert torch.allclose(loud, x[:1], atol=1e-4)  # loudness removed


def test_a_tone_lights_the_right_band():
    t = torch.arange(16000) / 16000
    lo, hi = torch.sin(2 * math.pi * 300 * t), torch.sin(2 * math.pi * 3000 * t)
    x, _ = log_mel(torch.cat([lo, hi])[None], torch.tensor([32000]), 40)
    first, second = x[0, 5:45].mean(0), x[0, 55:95].mean(0)
    assert int((second - first).argmax()) > 20 > int((first - second).argmax())
