from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ofactl.errors import ModelError
from ofactl.model.student import Student, student_config
from ofactl.model.teacher import load_teacher


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return Student(student_config("tiny")).eval()


def batch():
    g = torch.Generator().manual_seed(0)
    wav = torch.randn(3, 12000, generator=g)
    return wav, torch.tensor([12000, 9000, 2000])


def test_shapes_and_lengths(student):
    wav, L = batch()
    out = student(wav, L, rate=0.5)
    T = (L - 400) // 320 + 1  # CNN frames
    assert out.cnn_lengths.tolist() == T.tolist()
    assert out.hidden.lengths.tolist() == [max(1, int(0.5 * int(t) + 0.5)) for t in T]
    B, Tp, Lh, D = out.hidden.states.shape
    assert (B, Lh, D) == (3, 3, 64) and Tp == int(out.hidden.lengths.max())
    assert out.pred.shape == (3, Tp, 2, 64)


def test_batched_equals_single(student):
    wav, L = batch()
    out = student(wav, L, rate=0.5)
    for b in range(3):
        n = int(L[b])
        single = student(wav[b : b + 1, :n], L[b : b + 1], rate=0.5)
        m = int(single.hidden.lengths[0])
        assert int(out.hidden.lengths[b]) == m
        assert torch.allclose(single.hidden.states[0], out.hidden.states[b, :m], atol=2e-5)


def test_several_rates_in_one_batch(student):
    wav, L = batch()
    wav, L = wav[:2], torch.tensor([12000, 12000])
    out = student(wav, L, rate=torch.tensor([1.0, 0.25]))
    assert out.hidden.lengths.tolist() == [37, 9]


def test_shared_cnn_multi_rate_equals_separate(student):
    wav, L = batch()
    multi = student.features(wav, L, [1.0, 0.5, 0.25])
    for r, h in multi.items():
        sep = student(wav, L, rate=r, with_heads=False).hidden
        assert torch.equal(h.lengths, sep.lengths)
        assert torch.allclose(h.states, sep.states, atol=1e-6)
    sub = student.features(wav, L, [0.5], layers=[0, 2])[0.5]
    assert torch.allclose(sub.states, multi[0.5].states[:, :, [0, 2]])


def test_avgpool_and_plain_students():
    wav, L = batch()
    cfg = student_config("tiny")
    cfg.compressor = "avgpool"
    out = Student(cfg).eval()(wav, L, rate=0.4)
    assert out.hidden.lengths.tolist() == [max(1, int(0.4 * int(t) + 0.5)) for t in (L - 400) // 320 + 1]
    cfg.compressor = "none"
    assert Student(cfg).eval()(wav, L, rate=1.0).hidden.lengths.tolist() == ((L - 400) // 320 + 1).tolist()


def test_init_from_teacher_copies_weights():
    t = load_teacher("random:tiny")
    s = Student(student_config("tiny"))
    names = s.init_from_teacher(t)
    assert "transformer.layers.1.attention.q_proj.weight" in names
    assert torch.equal(s.cnn.conv_layers[0].conv.weight, t.model.feature_extractor.conv_layers[0].conv.weight)
    base_teacher = load_teacher("random:base")
    with pytest.raises(Exception, match="cannot initialise"):
        Student(student_config("tiny")).init_from_teacher(base_teacher)


def test_gradients_flow_to_alpha_predictor():
    s = Student(student_config("tiny")).train()
    wav, L = batch()
    out = s(wav, L, rate=0.5)
    out.pred.pow(2).mean().backward()
    g = s.compressor.predictor.out.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_partial_init_copies_the_parts_that_match():
    from ofactl.model.blocks import HubertArch
    from ofactl.model.student import TINY_CONV
    from ofactl.model.teacher import Teacher

    wide = Teacher(HubertArch(conv_layers=TINY_CONV, embed_dim=96, num_layers=3, num_heads=3, ffn_dim=128,
                              pos_conv_kernel=16, pos_conv_groups=4))
    s = Student(student_config("tiny"))
    names = s.init_from_teacher(wide, partial=True)
    assert names and all(n.startswith("cnn.") for n in names)  # the 64-channel CNN only
    assert torch.equal(s.cnn.conv_layers[1].conv.weight, wide.model.feature_extractor.conv_layers[1].conv.weight)
    with pytest.raises(Exception, match="cannot initialise"):
        Student(student_config("tiny")).init_from_teacher(wide)


def test_teacher_dim_zero_is_left_to_distill_and_negative_is_refused():
    with pytest.raises(ModelError, match="teacher_dim is 0 .*distill sets it from the teacher"):
        Student(replace(student_config("tiny"), teacher_dim=0))
    with pytest.raises(ValueError, match="teacher_dim must be >= 0"):
        replace(student_config("tiny"), teacher_dim=-1).validate()


def test_a_normalising_student_hears_a_quiet_recording_as_a_loud_one():
    """arch.normalize_waveform: the same features at any gain (a quiet speaker is no other input);
    without it the CNN's GroupNorm epsilon makes a -40 dB copy look different."""
    cfg = student_config("tiny")
    torch.manual_seed(0)
    wav, n = torch.randn(1, 16000) * 0.1, torch.tensor([16000])
    for normalise, same in ((True, True), (False, False)):
        torch.manual_seed(1)
        s = Student(replace(cfg, arch=replace(cfg.arch, normalize_waveform=normalise))).eval()
        with torch.no_grad():
            loud, quiet = s(wav, n).hidden.states, s(wav * 0.01, n).hidden.states
        assert torch.allclose(loud, quiet, atol=1e-3) is same


@pytest.mark.parametrize("n_heads", [1, 3])
def test_prediction_heads_gradients_are_laid_out_as_their_weights(n_heads):
    # DDP's reducer compares every stride, a size-1 dimension's too: a mismatch was reported as a
    # warning on every rank for the one-head log-mel predictor
    from ofactl.model.student import PredictionHeads

    heads = PredictionHeads(8, 5, n_heads)
    heads(torch.randn(2, 7, 8)).pow(2).sum().backward()
    for p in heads.parameters():
        assert p.grad is not None and p.grad.stride() == p.stride()
