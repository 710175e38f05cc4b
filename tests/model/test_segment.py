from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ofactl.model.segment import (
    boundary_scores,
    ends_to_segids,
    guidance_losses,
    guidance_targets,
    kmeans,
    quantity_loss,
    read_boundary_file,
    score_against_phone_times,
    segids_to_ends,
    segment_units,
)


def test_dp_segmentation_merges_flicker_and_keeps_runs():
    units = np.array([3] * 6 + [7] + [3] * 2 + [5] * 8 + [1] * 5)
    seg = segment_units(units, penalty=2.0)
    assert segids_to_ends(seg) == [9, 17, 22]  # the single-frame 7 is merged into the 3s
    assert len(segids_to_ends(segment_units(units, penalty=0.0))) > 3  # no penalty: every change
    long = segment_units(np.zeros(60, dtype=int), penalty=1.0, max_len=25)
    assert max(np.bincount(long)) <= 25


def test_ends_segids_round_trip():
    seg = ends_to_segids([3, 5, 9], 9)
    assert seg.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert segids_to_ends(seg) == [3, 5, 9]


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centers])
    cent = kmeans(x, 3, seed=0)
    d = torch.cdist(centers, cent).min(1).values
    assert torch.all(d < 0.2)


def test_boundary_scores_against_hand_computed_values():
    s = boundary_scores([[3, 6, 10]], [[4, 9]], tol=1)  # 3 hits 4, 10 hits 9, 6 is a false alarm
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == 1.0 and s["f1"] == pytest.approx(0.8)
    # over-segmentation 0.5: r1 = 0.5, r2 = -0.5 / sqrt(2)
    assert s["r_value"] == pytest.approx(1 - (0.5 + 0.5 / np.sqrt(2)) / 2)
    assert boundary_scores([[4, 9], [2]], [[4, 9], [2]]) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "r_value": 1.0}
    once = boundary_scores([[4, 4, 5]], [[4]])  # one reference end is matched once
    assert once["precision"] == pytest.approx(1 / 3) and once["recall"] == 1.0
    assert boundary_scores([[]], [[5]])["recall"] == 0.0
    with pytest.raises(ValueError):
        boundary_scores([[1]], [[1], [2]])


def test_score_against_phone_times_uses_timed_utterances_only():
    from ofactl.audio import Utterance

    timed = Utterance("a", Path("a.wav"), 16000, 16000, {"phone_times": "0 100 200"})  # ends 5, 10, 50
    untimed = Utterance("b", Path("b.wav"), 16000, 16000, {})
    n_frames = {"a": 50, "b": 50}
    found = {"a": ends_to_segids([5, 20, 50], 50), "b": ends_to_segids([25, 50], 50)}
    s = score_against_phone_times(found, [timed, untimed], n_frames)
    assert s is not None and s["utterances"] == 1
    assert s["precision"] == 0.5 and s["recall"] == 0.5  # inner ends 5, 20 against 5, 10
    assert s["period_ms"] == pytest.approx(20 * 50 / 3) and s["phone_period_ms"] == pytest.approx(20 * 50 / 3)
    assert score_against_phone_times(found, [untimed], n_frames) is None


def test_guidance_targets_and_losses():
    segids = torch.tensor([[0, 0, 1, 1, 1, 2, -1, -1], [0, 0, 0, 0, 1, 1, 1, 1]])
    lengths = torch.tensor([6, 8])
    seg_end, a = guidance_targets(segids, lengths)
    assert seg_end[0].tolist() == [False, True, False, False, True, True, False, False]
    assert torch.allclose(a[0], torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3, 1.0, 0, 0]))
    # perfect alpha gives zero loss; padding does not matter
    seg, frame = guidance_losses(a, lengths, seg_end, a)
    assert float(seg) == pytest.approx(0, abs=1e-6) and float(frame) == pytest.approx(0, abs=1e-6)
    noisy = a.clone()
    noisy[0, 6:] = 5.0
    assert float(guidance_losses(noisy, lengths, seg_end, a)[1]) == pytest.approx(0, abs=1e-6)
    wrong = torch.full_like(a, 0.5)
    assert float(guidance_losses(wrong, lengths, seg_end, a)[0]) > 0.1
    assert float(quantity_loss(torch.full((1, 10), 0.25), torch.tensor([10]), 0.25)) == pytest.approx(0, abs=1e-6)


def test_boundary_file_frames_and_ms(tmp_path):
    p = tmp_path / "b.tsv"
    p.write_text("id\tframes\nu1\t2 5\n")
    assert read_boundary_file(p, {"u1": 5})["u1"].tolist() == [0, 0, 1, 1, 1]
    q = tmp_path / "m.tsv"
    q.write_text("id\tms\nu1\t40 100\n")
    assert read_boundary_file(q, {"u1": 5})["u1"].tolist() == [0, 0, 1, 1, 1]
    from ofactl.errors import ConfigError

    with pytest.raises(ConfigError, match="no boundaries for 1"):
        read_boundary_file(p, {"u1": 5, "u2": 3})
