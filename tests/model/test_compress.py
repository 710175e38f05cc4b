from __future__ import annotations

import pytest
import torch

from ofactl.errors import ModelError
from ofactl.model.compress import (
    Compressor,
    cif_plan,
    expected_ratio,
    length_mask,
    mix_alpha,
    rate_from_frame_ms,
    rate_to_lambda,
    rescale_alpha,
    target_lengths,
    uniform_alpha,
)

torch.manual_seed(0)


def rand_batch(B=4, S=37, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, C, generator=g)
    lengths = torch.tensor([S, S - 5, 9, 1][:B])
    alpha = torch.rand(B, S, generator=g) * 0.9 + 0.05
    return x, lengths, alpha


def test_lambda_zero_is_identity():
    x, L, a = rand_batch()
    mixed = mix_alpha(a, torch.zeros(4))
    plan = cif_plan(mixed, L)
    y = plan.apply(x)
    assert plan.lengths.tolist() == L.tolist()
    assert torch.equal(y, x * length_mask(L, x.shape[1])[..., None])
    c = Compressor(6)
    out = c(x, L, rate=1.0)
    assert torch.equal(out.x, y) and out.lengths.tolist() == L.tolist()


def test_batched_equals_per_utterance_and_padding_does_not_leak():
    x, L, a = rand_batch()
    plan = cif_plan(a, L)
    y = plan.apply(x)
    x_noisy = x.clone()
    x_noisy[~length_mask(L, x.shape[1])] = 1e6  # garbage in padding must not reach outputs
    a_noisy = a.clone()
    a_noisy[~length_mask(L, x.shape[1])] = 1.0
    assert torch.allclose(cif_plan(a_noisy, L).apply(x_noisy), y)
    for b in range(4):
        n = int(L[b])
        pb = cif_plan(a[b : b + 1, :n], L[b : b + 1])
        yb = pb.apply(x[b : b + 1, :n])
        m = int(plan.lengths[b])
        assert int(pb.lengths) == m
        assert torch.allclose(yb[0], y[b, :m], atol=1e-6)
        assert torch.all(y[b, m:] == 0)


def test_outputs_are_convex_combinations():
    x, L, a = rand_batch()
    plan = cif_plan(a, L)
    # Weights into each kept slot sum to 1 after normalisation: a constant input stays constant.
    ones = torch.ones_like(x) * 3.5
    y = plan.apply(ones)
    valid = length_mask(plan.lengths, plan.max_len)
    assert torch.allclose(y[valid], torch.full_like(y[valid], 3.5), atol=1e-5)
    full = plan.norm[valid]
    assert torch.all(full >= 0.5 - 1e-6) and torch.all(full <= 1 + 1e-5)
    # Each output lies within the range of the inputs.
    assert y.max() <= x.max() + 1e-5 and y.min() >= x.min() - 1e-5


@pytest.mark.parametrize("rate", [1.0, 0.9, 0.75, 0.5, 0.4, 0.33, 0.25, 0.1, 0.02])
def test_exact_lengths_for_grid_of_rates(rate):
    c = Compressor(5)
    for S in (1, 2, 3, 7, 50, 333):
        L = torch.tensor([S, max(1, S // 2), 1])
        x = torch.randn(3, S, 5)
        out = c(x, L, rate=rate)
        expected = [max(1, int(rate * int(n) + 0.5)) for n in L]
        assert out.lengths.tolist() == expected
        assert out.x.shape[1] == max(expected)
        assert torch.isfinite(out.x).all()


def test_mixed_rates_in_one_batch():
    c = Compressor(5)
    x = torch.randn(3, 40, 5)
    L = torch.tensor([40, 40, 40])
    out = c(x, L, rate=torch.tensor([1.0, 0.5, 0.25]))
    assert out.lengths.tolist() == [40, 20, 10]


def test_adaptive_length_follows_lambda():
    c = Compressor(5)
    x = torch.randn(2, 200, 5)
    L = torch.tensor([200, 200])
    lens = [c(x, L, lam=torch.full((2,), lam), exact=False).lengths.float().mean().item()
            for lam in (0.0, 0.5, 1.0, 1.5)]
    assert lens[0] == 200 and lens[0] > lens[1] > lens[2] > lens[3] >= 1
    # the achieved ratio matches the expected one from the measured mean alpha
    alpha_pred = c.predictor(x, L)
    mean = float(alpha_pred.detach().mean())
    got = c(x, L, lam=torch.full((2,), 0.5), exact=False).lengths.float().mean() / 200
    assert abs(float(got) - float(expected_ratio(0.5, mean))) < 0.02


def test_gradients_reach_alpha_and_lambda():
    x, L, a = rand_batch()
    a = a.clone().requires_grad_(True)
    lam = torch.full((4,), 0.6, requires_grad=True)
    plan = cif_plan(mix_alpha(a, lam), L)
    w = torch.randn(plan.max_len, 6)
    loss = (plan.apply(x) * w).sum()
    loss.backward()
    for g in (a.grad, lam.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_rate_lambda_round_trip():
    for am in (2 / 9, 0.3, 0.5):
        for r in (1.0, 0.8, 0.5, am, 0.2, 0.1):
            lam = rate_to_lambda(r, am)
            assert 0 <= float(lam) < 2
            assert float(expected_ratio(lam, am)) == pytest.approx(r, rel=1e-5)
    # the reference mapping: alpha 2/9 -> lambda 0.5 gives a 32.7 ms period
    assert 20 / float(expected_ratio(0.5, 2 / 9)) == pytest.approx(32.7, abs=0.05)
    with pytest.raises(ModelError, match="rate must be in"):
        rate_to_lambda(0.0, 0.3)


def test_rescale_alpha_caps_at_one():
    a = torch.tensor([[0.9, 0.05, 0.05, 0.9, 0.1, 0.0]])
    L = torch.tensor([5])
    r = rescale_alpha(a, L, torch.tensor([4]))
    assert float(r.sum()) == pytest.approx(4.0, abs=1e-5)
    assert float(r.max()) <= 1.0 and float(r[0, 5]) == 0.0


def test_upsample_round_trip_preserves_mean():
    x, L, a = rand_batch()
    plan = cif_plan(a, L)
    y = torch.randn(4, plan.max_len, 6) * length_mask(plan.lengths, plan.max_len)[..., None]
    up = plan.upsample(y)
    assert up.shape == x.shape
    # kept-weight sum on the input grid == norm-weighted sum on the output grid
    T = plan.max_len
    kept = plan.w_left * (plan.left < T) + plan.w_right * (plan.right < T)
    lhs = (kept[..., None] * up).sum(1)
    rhs = (plan.norm[..., None] * y).sum(1)
    assert torch.allclose(lhs, rhs, atol=1e-4)
    # a constant sequence comes back constant on every valid input frame
    const = torch.full_like(y, 2.0) * length_mask(plan.lengths, plan.max_len)[..., None]
    back = plan.upsample(const)
    valid = length_mask(L, x.shape[1])
    assert torch.allclose(back[valid], torch.full_like(back[valid], 2.0), atol=1e-5)
    assert torch.all(back[~valid] == 0)


def test_durations_sum_to_input_length():
    x, L, a = rand_batch()
    plan = cif_plan(a, L)
    d = plan.durations()
    # durations count whole input frames: they add up to the frames that were kept
    kept = (plan.alpha * 0 + 1) * length_mask(L, x.shape[1])
    assert torch.all(d.sum(1) <= kept.sum(1) + 1e-3)
    assert torch.all(d[length_mask(plan.lengths, plan.max_len)] > 0)


@pytest.mark.parametrize("rate", [0.5, 0.4, 1 / 3, 0.25])
def test_avgpool_fractional(rate):
    S = 40
    x = torch.randn(2, S, 3)
    L = torch.tensor([S, 23])
    out = Compressor(3, kind="avgpool")(x, L, rate=rate)
    assert out.lengths.tolist() == target_lengths(L, rate).tolist()
    if rate in (0.5, 0.25):
        k = int(1 / rate)
        ref = torch.nn.functional.avg_pool1d(x[:1].transpose(1, 2), k, k).transpose(1, 2)
        assert torch.allclose(out.x[:1, : ref.shape[1]], ref, atol=1e-6)
    if rate == 0.4:  # 2.5 frames per output: x0 + x1 + 0.5 x2
        assert torch.allclose(out.x[0, 0], (x[0, 0] + x[0, 1] + 0.5 * x[0, 2]) / 2.5, atol=1e-6)
    n = int(L[1])
    single = Compressor(3, kind="avgpool")(x[1:, :n], L[1:], rate=rate)
    assert torch.allclose(single.x[0], out.x[1, : int(out.lengths[1])], atol=1e-6)
    a = uniform_alpha(L, S, rate)
    assert torch.all(a[1, n:] == 0)


def test_cumsum_in_fp32_under_autocast():
    c = Compressor(8)
    x = torch.randn(2, 600, 8)
    L = torch.tensor([600, 450])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = c(x.bfloat16(), L, rate=0.37)
    assert out.plan.alpha.dtype == torch.float32
    assert out.lengths.tolist() == [int(0.37 * 600 + 0.5), int(0.37 * 450 + 0.5)]


def test_alpha_is_computed_in_fp32_under_autocast_so_adaptive_lengths_do_not_depend_on_precision():
    torch.manual_seed(0)
    c = Compressor(8).eval()
    x = torch.randn(3, 400, 8).bfloat16().float()  # representable in bf16: the same input both ways
    L = torch.tensor([400, 333, 57])
    ref = c(x, L, rate=0.4, exact=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = c(x, L, rate=0.4, exact=False)
    assert out.plan.alpha.dtype == torch.float32
    assert torch.equal(out.plan.alpha, ref.plan.alpha)
    assert out.lengths.tolist() == ref.lengths.tolist()


def test_zero_length_and_errors():
    c = Compressor(4)
    x = torch.randn(2, 5, 4)
    out = c(x, torch.tensor([5, 0]), rate=0.5)
    assert out.lengths.tolist() == [3, 0]  # round half up: 2.5 -> 3
    assert torch.all(out.x[1] == 0)
    with pytest.raises(ModelError, match="rate must be in"):
        c(x, torch.tensor([5, 5]), rate=1.5)
    with pytest.raises(ModelError, match="only rate 1"):
        Compressor(4, kind="none")(x, torch.tensor([5, 5]), rate=0.5)


def test_frame_ms_and_keys():
    assert rate_from_frame_ms(40) == 0.5
    from ofactl.storage.zarr_store import rate_key

    assert rate_key(0.5) == "rate=0.500" and rate_key(1 / 3) == "rate=0.333"
    with pytest.raises(ModelError, match="frame-ms"):
        rate_from_frame_ms(10)


def test_exact_lengths_round_halves_up_in_the_model_and_the_store():
    import numpy as np

    from ofactl.extract import _exact_lengths
    from ofactl.model.compress import target_lengths

    t = torch.tensor([49, 3, 1, 0, 5])
    want = [25, 2, 1, 0, 3]  # 24.5 -> 25 and 1.5 -> 2 and 2.5 -> 3 (Python's round gives 24, 2, 2)
    assert target_lengths(t, 0.5).tolist() == want
    assert _exact_lengths(t.numpy(), 0.5).tolist() == want
    assert round(24.5) == 24  # why the docs say "halves round up", not round()
    assert _exact_lengths(np.array([10]), 1.0).tolist() == [10]


def test_upsample_by_duration_repeats_each_output_over_the_frames_it_fired_from():
    # alphas that fire on whole frames: outputs span frames [0,1], [2,3,4,5], [6], [7,8]
    a = torch.tensor([[0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 1.0, 0.5, 0.5]])
    L = torch.tensor([9])
    plan = cif_plan(a, L)
    assert plan.lengths.tolist() == [4]
    y = torch.arange(4.0).reshape(1, 4, 1) + 10  # outputs 10, 11, 12, 13
    up = plan.upsample(y)
    assert up.shape == (1, 9, 1)  # the input length
    assert up[0, :, 0].tolist() == [10, 10, 11, 11, 11, 11, 12, 13, 13]
    assert plan.durations()[0].tolist() == pytest.approx([2, 4, 1, 2])


def test_upsample_splits_a_frame_shared_by_two_outputs_by_its_weights():
    # frame 1 gives 0.4 of its 0.6 to output 0 and 0.2 to output 1
    a = torch.tensor([[0.6, 0.6, 0.8]])
    plan = cif_plan(a, torch.tensor([3]))
    assert plan.lengths.tolist() == [2]
    up = plan.upsample(torch.tensor([[[0.0], [1.0]]]))
    assert up[0, :, 0].tolist() == pytest.approx([0.0, 1 / 3, 1.0])
    assert plan.durations()[0].tolist() == pytest.approx([1 + 2 / 3, 1 + 1 / 3])


def test_duration_embedding_adds_log_duration_and_is_a_no_op_at_rate_one():
    torch.manual_seed(0)
    x, L = torch.randn(2, 40, 3), torch.tensor([40, 23])
    plain, timed = Compressor(3, kind="cif"), Compressor(3, kind="cif", duration_embed=True)
    timed.load_state_dict(plain.state_dict(), strict=False)  # the same predictor; only the embedding is new
    assert timed.duration is not None
    assert torch.allclose(timed(x, L, rate=1.0).x, plain(x, L, rate=1.0).x)  # every frame lasts 20 ms: log 1 = 0
    a, b = plain(x, L, rate=0.25), timed(x, L, rate=0.25)
    assert a.lengths.tolist() == b.lengths.tolist()
    dur = a.plan.durations().clamp(min=1).log()
    want = a.x + dur.unsqueeze(-1) * timed.duration.weight[:, 0] * length_mask(a.lengths, a.x.shape[1]).unsqueeze(-1)
    assert torch.allclose(b.x, want, atol=1e-6)
    assert torch.all(b.x[1, int(b.lengths[1]):] == 0)  # padding stays zero
    # avgpool at 0.25: four frames each (log 4), but no gradient reaches alpha through durations
    pool = Compressor(3, kind="avgpool", duration_embed=True)
    out = pool(x, L, rate=0.25).x - Compressor(3, kind="avgpool")(x, L, rate=0.25).x
    assert torch.allclose(out[0, :5], (torch.log(torch.tensor(4.0)) * pool.duration.weight[:, 0]).expand(5, 3), atol=1e-6)
