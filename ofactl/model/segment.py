"""Pseudo-phone boundaries for alpha guidance, and the guidance losses.

Boundaries are stored per utterance as *segment ids* on the 20 ms grid (frame t belongs to
segment seg[t]); segment ends are the frames where the id changes.

- ``auto``: k-means units on one teacher layer (fitted on a sample of the corpus), then a
  length-penalised dynamic-programming segmentation of the unit sequence: a segment costs the
  number of its frames whose unit differs from its majority unit, plus a constant penalty, so
  short unit flickers merge into their neighbours and long uniform stretches stay whole.
- a TSV file: ``id`` and either ``frames`` (segment end frames at 20 ms, 1-based) or ``ms``
  (segment end times in ms), space-separated;
- ``phone_times``: the corpus manifest's phone start times (oracle boundaries, e.g. ``synth``);
- ``none``: no boundaries; a quantity loss pulls sum(alpha) towards a target ratio instead.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ofactl.atomic import write_text
from ofactl.errors import ConfigError, CorpusError
from ofactl.model.compress import length_mask

FRAME_MS = 20.0


# ----------------------------------------------------------------------------- k-means
def kmeans(x: Tensor, k: int, iters: int = 25, seed: int = 0) -> Tensor:
    """k-means++ then Lloyd iterations on (N, D) float features; returns (k, D) centroids."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    n = x.shape[0]
    if n < k:
        raise ConfigError(f"k-means needs at least k={k} frames, got {n}; use fewer units or more audio")
    cent = x[torch.randint(n, (1,), generator=g)]
    d2 = torch.cdist(x, cent).squeeze(1) ** 2
    for _ in range(1, k):
        probs = d2 / d2.sum().clamp(min=1e-12)
        nxt = x[torch.multinomial(probs, 1, generator=g)]
        cent = torch.cat([cent, nxt])
        d2 = torch.minimum(d2, (torch.cdist(x, nxt).squeeze(1)) ** 2)
    for _ in range(iters):
        assign = torch.cdist(x, cent).argmin(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()[:, None]
        cent = torch.where(counts > 0, sums / counts.clamp(min=1), cent)
    return cent


def assign_units(x: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid of each row of x (N, D) -> unit ids (N,)."""
    return torch.cdist(x.float(), centroids.float()).argmin(-1)


def segment_units(units: np.ndarray, penalty: float = 2.0, max_len: int = 25, k: int | None = None) -> np.ndarray:
    """Length-penalised DP segmentation of a unit sequence (T,) -> segment ids (T,).

    cost(segment) = frames not of its majority unit + ``penalty``; segments are at most
    ``max_len`` frames. Vectorised over segment starts with prefix counts of each unit.
    """
    T = len(units)
    if T == 0:
        return np.zeros(0, dtype=np.int64)
    k = int(units.max()) + 1 if k is None else k
    onehot = np.zeros((T + 1, k), dtype=np.int32)
    onehot[np.arange(1, T + 1), units] = 1
    prefix = np.cumsum(onehot, axis=0)  # (T+1, k)
    best = np.full(T + 1, np.inf)
    best[0] = 0.0
    back = np.zeros(T + 1, dtype=np.int64)
    for j in range(1, T + 1):
        i = np.arange(max(0, j - max_len), j)
        counts = prefix[j][None, :] - prefix[i]  # (n_starts, k)
        cost = best[i] + (j - i) - counts.max(axis=1) + penalty
        m = int(np.argmin(cost))
        best[j], back[j] = cost[m], i[m]
    ends = []
    j = T
    while j > 0:
        ends.append(j)
        j = int(back[j])
    return ends_to_segids(sorted(ends), T)


def ends_to_segids(ends: Sequence[int], n_frames: int) -> np.ndarray:
    """1-based segment end frames -> segment id per frame (frames after the last end join it)."""
    seg = np.zeros(n_frames, dtype=np.int64)
    prev = 0
    for s, e in enumerate(sorted(int(x) for x in ends)):
        e = min(max(e, prev), n_frames)
        seg[prev:e] = s
        prev = e
    if prev < n_frames:
        seg[prev:] = seg[prev - 1] + 1 if prev > 0 else 0
    return seg


def segids_to_ends(seg: np.ndarray) -> list[int]:
    """Segment ids per frame -> the exclusive end frame of each segment."""
    if len(seg) == 0:
        return []
    change = np.flatnonzero(np.diff(seg) != 0) + 1
    return [int(x) for x in change] + [len(seg)]


def boundary_scores(found: Sequence[Sequence[int]], truth: Sequence[Sequence[int]], tol: int = 1) -> dict[str, float]:
    """Segment ends (frames, one list per utterance) scored against reference ends.

    Each reference end is matched at most once, by a found end within ``tol`` frames. Returns
    precision, recall, F1 and the R-value (Rasanen et al. 2009), which, unlike F1, falls when a
    segmenter over-segments to raise its recall.
    """
    hits = n_found = n_true = 0
    for f, t in zip(found, truth, strict=True):
        free = sorted(t)
        n_found, n_true = n_found + len(f), n_true + len(t)
        for b in sorted(f):
            j = next((i for i, x in enumerate(free) if abs(x - b) <= tol), None)
            if j is not None:
                hits += 1
                free.pop(j)
    p, r = hits / max(1, n_found), hits / max(1, n_true)
    over = r / p - 1 if p > 0 else float(n_found > 0)
    r1 = float(np.hypot(1 - r, over))
    r2 = (-over + r - 1) / np.sqrt(2)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0,
            "r_value": 1 - (abs(r1) + abs(float(r2))) / 2}


# ----------------------------------------------------------------------------- sources
def read_boundary_file(path: Path, n_frames: dict[str, int]) -> dict[str, np.ndarray]:
    """TSV with ``id`` and ``frames`` (1-based end frames) or ``ms`` (end times) columns."""
    try:
        rows = list(csv.DictReader(Path(path).read_text().splitlines(), delimiter="\t"))
    except OSError as e:
        raise ConfigError(f"--boundaries {path}: cannot read ({e.strerror})") from None
    if not rows or "id" not in rows[0] or not ({"frames", "ms"} & set(rows[0])):
        raise ConfigError(f"--boundaries {path}: expected a TSV header with id and frames (20 ms end frames) or ms")
    unit = "frames" if "frames" in rows[0] else "ms"
    out = {}
    for r in rows:
        uid = r["id"]
        if uid not in n_frames:
            continue
        try:
            vals = [float(v) for v in (r[unit] or "").split()]
        except ValueError:
            raise ConfigError(f"--boundaries {path}: bad {unit} for {uid}") from None
        ends = [int(round(v)) if unit == "frames" else int(round(v / FRAME_MS)) for v in vals]
        out[uid] = ends_to_segids(ends, n_frames[uid])
    missing = [u for u in n_frames if u not in out]
    if missing:
        raise ConfigError(f"--boundaries {path}: no boundaries for {len(missing)} utterance(s), e.g. {missing[0]}")
    return out


def boundaries_from_phone_times(utts: Sequence, n_frames: dict[str, int]) -> dict[str, np.ndarray]:
    """Oracle boundaries from a manifest's ``phone_times`` (phone start times in ms)."""
    out = {}
    for u in utts:
        if "phone_times" not in u.labels:
            raise CorpusError(f"--boundaries phone_times: utterance {u.id} has no phone_times column")
        starts = [float(t) for t in u.labels["phone_times"].split()]
        ends = [int(round(t / FRAME_MS)) for t in starts[1:]] + [n_frames[u.id]]
        ends = [e for e in ends if e > 0]
        out[u.id] = ends_to_segids(ends, n_frames[u.id])
    return out


def score_against_phone_times(segids: dict[str, np.ndarray], utts: Sequence, n_frames: dict[str, int],
                              tol: int = 1) -> dict[str, float] | None:
    """:func:`boundary_scores` of segment ids (20 ms frames) against the ``phone_times`` of the
    utterances that have them (None when none has), plus both mean segment periods in ms."""
    timed = [u for u in utts if u.labels.get("phone_times") and u.id in segids]
    if not timed:
        return None
    truth = boundaries_from_phone_times(timed, n_frames)
    found_ends = [segids_to_ends(segids[u.id]) for u in timed]
    true_ends = [segids_to_ends(truth[u.id]) for u in timed]
    frames = sum(n_frames[u.id] for u in timed)
    scores = boundary_scores([e[:-1] for e in found_ends], [e[:-1] for e in true_ends], tol)
    return {**scores, "period_ms": FRAME_MS * frames / max(1, sum(map(len, found_ends))),
            "phone_period_ms": FRAME_MS * frames / max(1, sum(map(len, true_ends))), "utterances": len(timed)}


def write_boundary_file(path: Path, segids: dict[str, np.ndarray]) -> None:
    """Write a boundaries TSV (id, segment end frames) atomically, for ``--boundaries FILE``."""
    rows = (uid + "\t" + " ".join(str(e) for e in segids_to_ends(seg)) + "\n" for uid, seg in segids.items())
    write_text(path, "id\tframes\n" + "".join(rows))


def auto_boundaries(
    features: Callable[[list[int]], list[Tensor]],
    n_utts: int,
    ids: Sequence[str],
    k: int = 50,
    fit_utts: int = 200,
    penalty: float = 2.0,
    seed: int = 0,
    batch: int = 16,
) -> tuple[dict[str, np.ndarray], Tensor]:
    """k-means on the features of a sample of utterances, then DP segmentation of all of them.

    ``features(indices)`` returns one (T, D) tensor per utterance (a teacher layer).
    """
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(n_utts, size=min(fit_utts, n_utts), replace=False).tolist())
    fit = []
    for i in range(0, len(sample), batch):
        fit.extend(features(sample[i : i + batch]))
    x = torch.cat(fit)
    cent = kmeans(x, min(k, x.shape[0]), seed=seed)
    out = {}
    for i in range(0, n_utts, batch):
        idx = list(range(i, min(n_utts, i + batch)))
        for j, f in zip(idx, features(idx)):
            out[ids[j]] = segment_units(assign_units(f, cent).numpy(), penalty, k=cent.shape[0])
    return out, cent


# ----------------------------------------------------------------------------- losses
def guidance_targets(segids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """(B, S) segment ids (padding arbitrary) -> (seg_end (B,S) bool, alpha_pseudo (B,S) float).

    alpha_pseudo = 1 / segment length on each frame, so every segment sums to one fire.
    """
    B, S = segids.shape
    valid = length_mask(lengths, S)
    nxt = torch.cat([segids[:, 1:], segids[:, -1:] + 1], 1)
    last = torch.arange(S, device=segids.device)[None] == (lengths[:, None] - 1)
    seg_end = ((nxt != segids) | last) & valid
    # segment index counted from the crop start, then its length via scatter
    idx = torch.cumsum(seg_end.long(), 1) - seg_end.long()
    seglen = torch.zeros(B, S + 1, device=segids.device).scatter_add_(1, idx.clamp(max=S), valid.float())
    alpha = torch.where(valid, 1.0 / seglen.gather(1, idx.clamp(max=S)).clamp(min=1), torch.zeros(()))
    return seg_end, alpha


def guidance_losses(alpha_pred: Tensor, lengths: Tensor, seg_end: Tensor, alpha_pseudo: Tensor) -> tuple[Tensor, Tensor]:
    """Segment-count and frame-alpha L1 losses, each normalised per valid 20 ms frame.

    seg: |cumsum(alpha)| at each segment end vs the number of segments so far;
    frame: |alpha - alpha_pseudo| per frame. Computed on the unmixed predictor output.
    """
    valid = length_mask(lengths, alpha_pred.shape[1]).float()
    n = valid.sum().clamp(min=1)
    c = torch.cumsum(alpha_pred.float() * valid, 1)
    count = torch.cumsum(seg_end.float(), 1)
    seg = ((c - count).abs() * seg_end.float()).sum() / n
    frame = ((alpha_pred.float() - alpha_pseudo).abs() * valid).sum() / n
    return seg, frame


def quantity_loss(alpha_pred: Tensor, lengths: Tensor, ratio: float) -> Tensor:
    """|sum(alpha) - ratio * T| per utterance, normalised per valid frame (no boundaries)."""
    valid = length_mask(lengths, alpha_pred.shape[1]).float()
    total = (alpha_pred.float() * valid).sum(1)
    return (total - ratio * lengths.float()).abs().sum() / lengths.float().sum().clamp(min=1)
