"""Probe metrics: accuracy, CTC greedy decoding, PER / CER / WER (edit distance via editdistance)."""

from __future__ import annotations

from collections.abc import Sequence

import editdistance
import torch
from torch import Tensor


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Fraction of positions where ``pred`` equals ``gold``."""
    if not gold:
        return 0.0
    return sum(int(p == g) for p, g in zip(pred, gold)) / len(gold)


def error_rate(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[str]]) -> float:
    """Total edit distance / total reference length (PER for phones, CER for chars, WER for words)."""
    errors = sum(editdistance.eval(list(h), list(r)) for h, r in zip(hyps, refs))
    total = sum(len(r) for r in refs)
    return errors / total if total else 0.0


def words(chars: Sequence[str]) -> list[str]:
    """Character tokens with '|' as the word separator -> words."""
    return [w for w in "".join(chars).split("|") if w]


def ctc_greedy(logits: Tensor, lengths: Tensor, blank: int = 0) -> list[list[int]]:
    """(B, T, V) logits -> token ids per utterance: argmax, merge repeats, drop blanks."""
    best = logits.argmax(-1).cpu()
    out = []
    for b in range(best.shape[0]):
        seq = torch.unique_consecutive(best[b, : int(lengths[b])]).tolist()
        out.append([t for t in seq if t != blank])
    return out
