"""Probe training speed. CTC: the BiLSTM head over padded batches against a packed-sequence
``nn.LSTM`` (the head ofactl used before), with plain random batches and with length buckets
(``probe.sort_pool``). Utterance heads: statistics pooling of frames in every batch (as before)
against frame moments computed once (``ProbeInputs``), their one-off cost included.

    python benchmarks/probe_bench.py [--utts 400] [--epochs 2] [--min-frames 13] [--max-frames 134]

Features are random (B, T, L, D) arrays with frame counts drawn uniformly between the bounds
(synth-tiny's 5th and 95th percentiles at rate 1 are 13 and 134); labels are a fifth as long.
Figures are valid frames trained per second (forward, CTC loss, backward, Adam), seconds of
utterance-head training (ten times the CTC epochs), and ratios measured within this one run
(the machine may be noisy).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import emit

from ofactl.probe import ProbeConfig
from ofactl.probe.tasks import TaskData
from ofactl.probe.train import Probe, ProbeInputs, _batches, _collate, bucketed_batches, output_loss


class PackedBiLSTM(nn.Module):
    """The reference: ``nn.LSTM(bidirectional=True)`` over a packed sequence."""

    def __init__(self, dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, num_layers=layers, bidirectional=True, batch_first=True)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=x.shape[1])
        return h


Outputs = Callable[[list[str]], tuple[Tensor, Tensor]]


def on_frames(probe: Probe, feats: dict[str, np.ndarray]) -> Outputs:
    """A probe's outputs over padded frames, collated in every batch."""
    def outputs(ids: list[str]) -> tuple[Tensor, Tensor]:
        x, lengths = _collate(ids, feats, None)
        return probe(x, lengths), lengths
    return outputs


def train_seconds(probe: Probe, task: TaskData, batches: list[list[str]], outputs: Outputs) -> float:
    """Wall seconds of training passes over ``batches`` (forward, loss, backward, Adam)."""
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    t0 = time.perf_counter()
    for ids in batches:
        out, lengths = outputs(ids)
        loss = output_loss(out, task, ids, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def cls_seconds(feats: dict[str, np.ndarray], ids: list[str], epochs: int, moments: bool) -> float:
    """Wall seconds of ``epochs`` training passes of an utterance head (batches of 128), pooling
    frames in every batch or reading moments computed once (their cost included)."""
    torch.manual_seed(0)
    n_layers, dim = feats[ids[0]].shape[1:]
    task = TaskData("sid", "cls", "accuracy", True, {"train": ids, "dev": [], "test": []},
                    {u: [i % 10] for i, u in enumerate(ids)}, [str(k) for k in range(10)])
    probe = Probe(n_layers, dim, 10, "cls", ProbeConfig())
    gen = torch.Generator().manual_seed(0)
    batches = [b for _ in range(epochs) for b in _batches(ids, 128, gen)]
    if not moments:
        return train_seconds(probe, task, batches, on_frames(probe, feats))
    t0 = time.perf_counter()
    inputs = ProbeInputs(feats, ids, "cls", True, None, torch.device("cpu"))
    setup = time.perf_counter() - t0
    return setup + train_seconds(probe, task, batches, lambda b: inputs.outputs(probe, b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--utts", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--min-frames", type=int, default=13)
    ap.add_argument("--max-frames", type=int, default=134)
    ap.add_argument("--layers", type=int, default=3, help="stored hidden states per frame")
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ids = [f"u{i}" for i in range(args.utts)]
    frames = {u: int(rng.integers(args.min_frames, args.max_frames + 1)) for u in ids}
    feats = {u: rng.normal(size=(n, args.layers, args.dim)).astype(np.float32) for u, n in frames.items()}
    labels = {u: [int(t) for t in rng.integers(1, 40, size=max(1, n // 5))] for u, n in frames.items()}
    task = TaskData("pr", "ctc", "per", False, {"train": ids, "dev": [], "test": []}, labels,
                    [f"p{i}" for i in range(39)])
    cfg = ProbeConfig()
    valid = sum(frames.values()) * args.epochs

    def run(packed: bool, pool: int) -> dict[str, float]:
        torch.manual_seed(0)
        probe = Probe(args.layers, args.dim, 40, "ctc", cfg)
        if packed:
            probe.lstm = PackedBiLSTM(args.dim, cfg.lstm_hidden, cfg.lstm_layers)  # type: ignore[assignment]
        gen = torch.Generator().manual_seed(0)
        secs, padded = 0.0, 0
        for _ in range(args.epochs):
            batches = _batches(ids, cfg.batch_size, gen) if pool == 1 else bucketed_batches(
                ids, frames, cfg.batch_size, pool, gen)
            padded += sum(max(frames[u] for u in b) * len(b) for b in batches)
            secs += train_seconds(probe, task, batches, on_frames(probe, feats))
        return {"seconds": round(secs, 3), "frames_per_s": round(valid / secs), "padding": round(1 - valid / padded, 3)}

    cls_frames = cls_seconds(feats, ids, 10 * args.epochs, moments=False)
    cls_moments = cls_seconds(feats, ids, 10 * args.epochs, moments=True)
    packed = run(True, 1)
    padded = run(False, 1)
    bucketed = run(False, cfg.sort_pool)
    emit({
        "utterances": args.utts, "epochs": args.epochs, "frames": [args.min_frames, args.max_frames],
        "lstm_hidden": cfg.lstm_hidden, "batch_size": cfg.batch_size, "sort_pool": cfg.sort_pool,
        "packed_lstm_random_batches": packed,
        "bilstm_random_batches": padded,
        "bilstm_bucketed": bucketed,
        "speedup_bilstm_vs_packed": round(packed["seconds"] / padded["seconds"], 2),
        "speedup_bucketed_vs_packed": round(packed["seconds"] / bucketed["seconds"], 2),
        "utterance_head": {"epochs": 10 * args.epochs, "frames_s": round(cls_frames, 3),
                           "moments_s": round(cls_moments, 3), "speedup": round(cls_frames / cls_moments, 2)},
    })


if __name__ == "__main__":
    main()
