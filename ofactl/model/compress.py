"""Once-for-all sequence compression: batched CIF, lambda mixing, rate control, upsampling.

Vocabulary (see docs/method.md):

- ``alpha`` (B, S): per-frame integration weights in [0, 1]; an output frame "fires" each time
  their running sum crosses an integer, so an utterance gives about ``sum(alpha)`` frames.
- ``lambda`` in [0, 2): mixes the predicted alpha with all-ones (lambda=0: no compression,
  lambda=1: the predicted segmentation, lambda>1: fewer frames than that).
- ``rate`` in (0, 1]: output frames per input frame. Exact mode rescales the mixed alpha so an
  utterance of T frames gives ``max(1, round(rate * T))`` frames, where round is half-up
  (``floor(x + 0.5)``: T = 49 at 0.5 gives 25); adaptive mode keeps the
  content-dependent count that lambda alone gives.

A :class:`CifPlan` holds where each input frame's weight goes; it is computed once from alpha and
applied to any features of the same length (student features, teacher targets), and its
transpose upsamples compressed sequences back to the input grid.

Tail rule (one pure function, used in training and extraction alike): an utterance emits
``round(sum(alpha))`` frames (at least one); a final partial frame is kept when its weight is at
least 0.5 and rescaled to a weighted average, and dropped otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from ofactl.errors import ModelError

# Slack for floor() on cumulative sums that should land on integers (fp32 ulp at 1e3 is 6e-5).
_EPS = 1e-4
LAMBDA_MAX = 2.0 - 1e-5


# ----------------------------------------------------------------------------- masks
def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


# ----------------------------------------------------------------------------- lambda / rate
def mix_alpha(alpha_pred: Tensor, lam: Tensor) -> Tensor:
    """OFA mixing of predicted alpha (B, S) with ones, lambda (B,) in [0, 2).

    lambda <= 1: ``(1 - lambda) + lambda * alpha``; lambda > 1: ``(2 - lambda) * alpha``.
    Written with relu so it is differentiable in lambda everywhere.
    """
    lam = lam.to(alpha_pred.dtype).reshape(-1, 1)
    w_ones = torch.relu(1.0 - lam)
    w_alpha = torch.relu(lam) - 2.0 * torch.relu(lam - 1.0)
    return w_ones + w_alpha * alpha_pred


def expected_ratio(lam: Tensor | float, alpha_mean: float) -> Tensor:
    """Mean output/input frame ratio for lambda given the mean predicted alpha."""
    lam_t = torch.as_tensor(lam, dtype=torch.float32)
    low = (1.0 - lam_t) + lam_t * alpha_mean
    high = (2.0 - lam_t) * alpha_mean
    return torch.where(lam_t <= 1.0, low, high)


def rate_to_lambda(rate: Tensor | float, alpha_mean: float) -> Tensor:
    """Invert :func:`expected_ratio`: the lambda whose mean ratio is ``rate``.

    rate >= alpha_mean interpolates towards the predicted segmentation (lambda in [0, 1]);
    lower rates scale the predicted alpha down (lambda in (1, 2)).
    """
    r = torch.as_tensor(rate, dtype=torch.float32)
    if not 0.0 < alpha_mean < 1.0:
        raise ModelError(f"mean alpha must be in (0, 1), got {alpha_mean}")
    if bool(((r <= 0) | (r > 1)).any()):
        raise ModelError(f"rate must be in (0, 1], got {r.tolist()}")
    lam = torch.where(r >= alpha_mean, (1.0 - r) / (1.0 - alpha_mean), 2.0 - r / alpha_mean)
    return lam.clamp(0.0, LAMBDA_MAX)


def target_lengths(lengths: Tensor, rate: Tensor | float) -> Tensor:
    """Exact-mode output lengths: ``max(1, floor(rate * T + 0.5))``, at most T (0 for empty
    inputs). Halves round up, unlike Python's ``round``: T = 49 at rate 0.5 gives 25."""
    r = torch.as_tensor(rate, dtype=torch.float64, device=lengths.device)
    n = torch.floor(lengths.to(torch.float64) * r + 0.5).long().clamp(min=1)
    return torch.where(lengths > 0, torch.minimum(n, lengths), torch.zeros_like(n))


def rescale_alpha(alpha: Tensor, lengths: Tensor, targets: Tensor, iters: int = 20) -> Tensor:
    """Rescale alpha (B, S) so each row sums to ``targets`` while every weight stays <= 1.

    Water-filling: scale, clip at 1, rescale the unclipped weights; a few iterations reach the
    target to float precision since targets never exceed the number of valid frames.
    """
    a = alpha.float() * length_mask(lengths, alpha.shape[1])
    tgt = targets.to(a.dtype)[:, None]
    for _ in range(iters):
        capped = a >= 1.0
        fixed = capped.to(a.dtype).sum(1, keepdim=True)
        free_sum = (a * ~capped).sum(1, keepdim=True)
        scale = ((tgt - fixed) / free_sum.clamp(min=1e-12)).clamp(min=0.0)
        a = torch.where(capped, torch.ones_like(a), a * scale).clamp(max=1.0)
    return a


# ----------------------------------------------------------------------------- CIF
@dataclass
class CifPlan:
    """Where each input frame's weight goes. Shapes: B utterances, S input frames, T output frames.

    left/right: (B, S) long output slots (T means "dropped"); w_left/w_right: (B, S) weights;
    norm: (B, T) total weight per output slot (1 for whole frames, >= 0.5 for a kept tail);
    alpha: (B, S) the weights used (masked); lengths: (B,) output lengths.
    """

    left: Tensor
    right: Tensor
    w_left: Tensor
    w_right: Tensor
    norm: Tensor
    alpha: Tensor
    lengths: Tensor
    in_lengths: Tensor

    @property
    def max_len(self) -> int:
        """Longest output length T of the batch."""
        return self.norm.shape[1]

    def apply(self, x: Tensor) -> Tensor:
        """Compress x (B, S, C) -> (B, T, C): each output is a weighted average of consecutive inputs.

        Computed in float32 (cast back to x's dtype); padded outputs are zero.
        """
        return cif_apply(self, x)

    def upsample(self, y: Tensor) -> Tensor:
        """Transpose: (B, T, C) -> (B, S, C) on the input grid with the same weights."""
        return cif_upsample(self, y)

    def detach(self) -> CifPlan:
        """The same plan with its weights detached (no gradient through alpha)."""
        return CifPlan(self.left, self.right, self.w_left.detach(), self.w_right.detach(),
                       self.norm.detach(), self.alpha.detach(), self.lengths, self.in_lengths)

    def durations(self) -> Tensor:
        """(B, T) input frames per output frame (fractional), i.e. the frame period / 20 ms."""
        a = self.alpha.clamp(min=1e-12)
        d = torch.zeros(self.norm.shape[0], self.max_len + 1, device=a.device, dtype=a.dtype)
        d.scatter_add_(1, self.left, self.w_left / a)
        d.scatter_add_(1, self.right, self.w_right / a)
        return d[:, :-1]


def cif_plan(alpha: Tensor, lengths: Tensor, max_out: int | None = None,
             out_lengths: Tensor | None = None) -> CifPlan:
    """Integrate-and-fire plan for alpha (B, S) in [0, 1] with input lengths (B,).

    Fully batched: cumulative sums in float32 (even under autocast), padding carries zero weight,
    and the only host sync is reading the longest output length (skipped when ``max_out`` is
    given, e.g. a static bound). ``out_lengths`` fixes the output lengths (exact mode) instead
    of the tail rule ``max(1, round(sum(alpha)))``.
    """
    if alpha.ndim != 2:
        raise ModelError(f"alpha must be (batch, frames), got shape {list(alpha.shape)}")
    B, S = alpha.shape
    with torch.autocast(alpha.device.type, enabled=False):
        valid = length_mask(lengths, S)
        a = (alpha.float().clamp(0.0, 1.0) * valid)
        c = a.cumsum(1)
        total = c[:, -1] if S > 0 else a.new_zeros(B)
        out_len = torch.floor(total + 0.5).long().clamp(min=1)
        out_len = torch.where(lengths > 0, out_len, torch.zeros_like(out_len))
        if out_lengths is not None:
            out_len = out_lengths.to(out_len)
        T = int(out_len.max()) if max_out is None else int(max_out)
        right = torch.floor(c + _EPS).long()
        left = torch.cat([right.new_zeros(B, 1), right[:, :-1]], dim=1)
        w_right = torch.where(right > left, (c - right.to(c.dtype)).clamp(min=0.0), torch.zeros_like(c))
        w_right = torch.minimum(w_right, a)
        w_left = a - w_right
        # Slots at or past an utterance's length (the dropped tail, padding) go to slot T.
        left = torch.where(left < out_len[:, None], left, torch.full_like(left, T))
        right = torch.where(right < out_len[:, None], right, torch.full_like(right, T))
        left, right = left.clamp(max=T), right.clamp(max=T)
        norm = a.new_zeros(B, T + 1)
        norm.scatter_add_(1, left, w_left)
        norm.scatter_add_(1, right, w_right)
    return CifPlan(left, right, w_left, w_right, norm[:, :T], a, out_len, lengths)


def cif_apply(plan: CifPlan, x: Tensor) -> Tensor:
    """Apply a CIF plan: x (B, S, C) -> (B, T, C), each output a weighted mean of the inputs it
    integrated; computed in float32, padded outputs zero.
    """
    B, S, C = x.shape
    if plan.left.shape != (B, S):
        raise ModelError(f"features {list(x.shape)} do not match the CIF plan {list(plan.left.shape)}")
    T = plan.max_len
    with torch.autocast(x.device.type, enabled=False):
        xf = x.float()
        out = xf.new_zeros(B, T + 1, C)
        out.scatter_add_(1, plan.left[..., None].expand(-1, -1, C), plan.w_left[..., None] * xf)
        out.scatter_add_(1, plan.right[..., None].expand(-1, -1, C), plan.w_right[..., None] * xf)
        out = out[:, :T] / plan.norm.clamp(min=1e-6)[..., None]
    return out.to(x.dtype)


def cif_upsample(plan: CifPlan, y: Tensor) -> Tensor:
    """x̂_s = (w_l[s] y[left[s]] + w_r[s] y[right[s]]) / kept weight, on the input grid.

    The alpha-weighted sum over input frames equals the norm-weighted sum over outputs, so the
    (weighted) mean is preserved. Inputs whose weight was all dropped copy the last output.
    """
    B, T, C = y.shape
    if plan.max_len != T:
        raise ModelError(f"compressed features have {T} frames, the CIF plan {plan.max_len}")
    with torch.autocast(y.device.type, enabled=False):
        yf = torch.cat([y.float(), y.new_zeros(B, 1, C, dtype=torch.float32)], dim=1)
        kl = (plan.left < T).float() * plan.w_left
        kr = (plan.right < T).float() * plan.w_right
        kept = kl + kr
        last = (plan.lengths - 1).clamp(min=0)[:, None].expand_as(plan.left)
        none_kept = kept <= 1e-12
        li = torch.where(none_kept, last, plan.left)
        kl = torch.where(none_kept, torch.ones_like(kl), kl)
        denom = torch.where(none_kept, torch.ones_like(kept), kept)
        gl = yf.gather(1, li[..., None].expand(-1, -1, C))
        gr = yf.gather(1, plan.right[..., None].expand(-1, -1, C))
        xh = (kl[..., None] * gl + kr[..., None] * gr) / denom[..., None]
        valid = length_mask(plan.in_lengths, plan.left.shape[1])
        xh = xh * valid[..., None]
    return xh.to(y.dtype)


def uniform_alpha(lengths: Tensor, max_len: int, rate: Tensor | float) -> Tensor:
    """Fixed-rate baseline weights: each utterance gets constant alpha = round(r*T)/T.

    CIF with constant alpha is average pooling by a possibly fractional ratio (rate 0.5 equals
    AvgPool1d(2, 2); rate 0.4 averages 2.5 frames per output with fractional edge weights).
    """
    n = target_lengths(lengths, rate).float()
    a = (n / lengths.clamp(min=1).float())[:, None].expand(-1, max_len)
    return a * length_mask(lengths, max_len)


# ----------------------------------------------------------------------------- modules
class AlphaPredictor(nn.Module):
    """conv(k) -> LayerNorm -> ReLU -> Linear -> sigmoid: alpha (B, S) in (0, 1) from (B, S, C)."""

    def __init__(self, dim: int, kernel: int = 5) -> None:
        super().__init__()
        if kernel % 2 != 1:
            raise ModelError(f"alpha predictor kernel must be odd, got {kernel}")
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """(B, S, C) features with lengths -> alpha (B, S) in float32, zero on padded frames.

        Runs in float32 even under autocast: a content-adaptive frame count is a sum of alphas,
        and bf16 alphas would make that count depend on the precision (CUDA's bf16 against the
        CPU's fp32)."""
        valid = length_mask(lengths, x.shape[1])
        with torch.autocast(x.device.type, enabled=False):
            # zero padding before the conv, so a padded batch equals per-utterance runs
            xf = x.float() * valid[..., None]
            h = self.conv(xf.transpose(1, 2)).transpose(1, 2)
            h = torch.relu(self.norm(h))
            a = torch.sigmoid(self.out(h).squeeze(-1))
        return a * valid


@dataclass
class Compressed:
    """Result of :meth:`Compressor.forward`: features (B, T, C) with lengths and the plan."""

    x: Tensor
    lengths: Tensor
    plan: CifPlan
    alpha_pred: Tensor | None  # (B, S) unmixed predictor output (for guidance losses)


class Compressor(nn.Module):
    """Rate-controlled compression of (B, S, C) features.

    kind="cif": predicted alpha mixed by lambda (once-for-all); kind="avgpool": fixed-rate
    fractional average pooling (no parameters); kind="none": identity (a plain student).
    ``alpha_mean`` (a buffer, measured during distillation) maps rates to lambda.
    """


    alpha_mean: Tensor  # a buffer: the running mean of alpha (the rate -> lambda map)
    def __init__(self, dim: int, kind: str = "cif", kernel: int = 5, alpha_mean: float = 0.5,
                 duration_embed: bool = False) -> None:
        super().__init__()
        if kind not in ("cif", "avgpool", "none"):
            raise ModelError(f"unknown compressor '{kind}' (expected cif, avgpool or none)")
        self.kind = kind
        self.predictor = AlphaPredictor(dim, kernel) if kind == "cif" else None
        # A CIF frame may stand for 20 ms or 300 ms; the average alone does not say which. This
        # adds a learned vector times log(duration in 20 ms frames): zero for an uncompressed frame.
        self.duration = nn.Linear(1, dim, bias=False) if duration_embed else None
        self.register_buffer("alpha_mean", torch.tensor(float(alpha_mean)))

    def lambdas_for(self, rates: Tensor) -> Tensor:
        """The lambda that gives each rate in ``rates``, by the running mean of alpha."""
        return rate_to_lambda(rates, float(self.alpha_mean))

    def forward(
        self,
        x: Tensor,
        lengths: Tensor,
        rate: Tensor | float | None = None,
        lam: Tensor | None = None,
        exact: bool = True,
    ) -> Compressed:
        """Compress x (B, S, C) with lengths (B,).

        Give ``rate`` (float or (B,)) or ``lam`` ((B,), e.g. a learnable lambda). ``exact``
        hits ``max(1, round(rate*T))`` frames per utterance (needs ``rate``); otherwise the
        content-adaptive length that lambda gives is kept.
        """
        B, S, _ = x.shape
        if rate is not None:
            # float64: round(rate * T) must not flip at .5 boundaries through float32 rounding
            rates = torch.as_tensor(rate, dtype=torch.float64, device=x.device).expand(B).contiguous()
            if bool(((rates <= 0) | (rates > 1)).any()):
                raise ModelError(f"rate must be in (0, 1], got {sorted(set(rates.tolist()))}")
        else:
            rates = None
        if self.kind == "none":
            if rates is not None and bool((rates != 1).any()):
                raise ModelError("this student has no compressor (compressor=none); only rate 1 is available")
            alpha = length_mask(lengths, S).float()
            plan = cif_plan(alpha, lengths)
            return Compressed(x, lengths, plan, None)
        if self.kind == "avgpool":
            if rates is None:
                raise ModelError("the avgpool compressor needs a rate")
            plan = cif_plan(uniform_alpha(lengths, S, rates), lengths,
                            out_lengths=target_lengths(lengths, rates))
            return Compressed(self._with_duration(plan.apply(x), plan), plan.lengths, plan, None)
        assert self.predictor is not None
        alpha_pred = self.predictor(x, lengths)
        if lam is None:
            if rates is None:
                raise ModelError("give a rate or a lambda")
            lam = self.lambdas_for(rates.float().cpu()).to(x.device)
        alpha = mix_alpha(alpha_pred, lam)
        if exact:
            if rates is None:
                raise ModelError("exact-length mode needs a rate; use exact=False with lambda")
            targets = target_lengths(lengths, rates)
            alpha = rescale_alpha(alpha, lengths, targets)
            plan = cif_plan(alpha, lengths, out_lengths=targets)
        else:
            plan = cif_plan(alpha, lengths)
        return Compressed(self._with_duration(plan.apply(x), plan), plan.lengths, plan, alpha_pred)

    def _with_duration(self, y: Tensor, plan: CifPlan) -> Tensor:
        """y (B, T, C) plus the duration embedding of each frame (when the compressor has one).
        Durations are detached: alpha learns where to fire from the loss, not from this input."""
        if self.duration is None:
            return y
        dur = plan.detach().durations().clamp(min=1.0).log()
        emb = self.duration(dur.unsqueeze(-1).to(self.duration.weight.dtype)).to(y.dtype)
        return y + emb * length_mask(plan.lengths, y.shape[1]).unsqueeze(-1).to(y.dtype)


def rate_from_frame_ms(ms: float) -> float:
    """``--frame-ms P`` -> rate 20 / P (P >= 20)."""
    if not (ms >= 20.0 and math.isfinite(ms)):
        raise ModelError(f"--frame-ms must be >= 20 (the uncompressed frame period), got {ms}")
    return 20.0 / ms

