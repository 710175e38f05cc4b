"""Probe heads and their training: a learnable softmax-weighted sum over stored layers, then
a small head (SUPERB-style). Deterministic on CPU for a given seed; dev-set early stopping.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ofactl.choices import CtcHead
from ofactl.errors import ConfigError
from ofactl.model.compress import length_mask
from ofactl.probe.metrics import accuracy, ctc_greedy, error_rate, words
from ofactl.probe.tasks import TaskData
from ofactl.runtime import check_device_name, resolve_device, seed_all


@dataclass
class ProbeConfig:
    """Probe settings: layer weighting, head, epochs and learning rates, budget and device."""

    epochs: int = 40  # CTC heads
    cls_epochs: int = 100  # utterance heads: they train in seconds and keep improving past 40
    patience: int = 10  # epochs without a better dev score before stopping
    min_epochs: int = 25  # no early stop before this: CTC spends its first epochs emitting blanks,
    # and a dev split of one or two speakers makes early epochs noisy
    batch_size: int = 32  # CTC heads
    cls_batch_size: int = 128  # utterance heads: larger batches steady the pooled-vector BatchNorm
    lr: float = 1e-2  # utterance-level heads
    ctc_lr: float = 1e-2  # CTC heads (SUPERB trains its linear phoneme probe at 1e-2)
    seed: int = 0  # seeds the probe's initialisation and batches
    ctc_head: CtcHead = "lstm"  # lstm (one BiLSTM layer, the default) | conv (one convolution: cheap
    # context) | linear (SUPERB PR; one frame at a time, so it favours coarser frames: docs/models.md)
    lstm_hidden: int = 128  # BiLSTM width per direction (ctc_head: lstm)
    lstm_layers: int = 1  # BiLSTM layers (ctc_head: lstm)
    conv_hidden: int = 256  # channels of the convolution (ctc_head: conv)
    conv_kernel: int = 5  # its kernel in frames, odd: 5 frames see 100 ms at rate 1 (ctc_head: conv)
    layer_norm: bool = True  # layer-normalise each hidden state before the weighted sum
    upsample_ctc: bool = False  # repeat frames back to the 20 ms grid before the CTC head
    sort_pool: int = 4  # CTC heads (sweep, and adapt's joint phase too): each epoch's shuffled utterances
    # are sorted by length in runs of this many batches, cut into batches, and the batches shuffled, so a
    # batch pads little (on synth-tiny padding falls from 61% of the frames a BiLSTM runs to 27%, about
    # twice as fast); 1: plain random batches
    max_frames: int = 2_000_000  # CTC heads: training stops once the head has seen this many frames
    # (epochs x training frames; its cost is about proportional). 0: no budget. 2M frames is 40 epochs
    # of 14 minutes of speech at rate 1: a 4-rate sweep of 25 minutes stays within minutes on a CPU
    device: str = "auto"  # auto: the command's device (sweep, adapt), else cuda when available

    def validate(self) -> None:
        """Raise ValueError for non-positive sizes or rates."""
        check_device_name(self.device, "probe.device")
        if self.lstm_layers < 1 or self.lstm_hidden < 1 or self.conv_hidden < 1:
            raise ValueError("lstm_layers, lstm_hidden and conv_hidden must be >= 1")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd and >= 1 (got {self.conv_kernel}): an odd kernel keeps frames centred")
        if min(self.epochs, self.cls_epochs, self.batch_size, self.cls_batch_size) < 1 or self.lr <= 0 or self.ctc_lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.sort_pool < 1:
            raise ValueError(f"sort_pool must be >= 1 (1: plain random batches), got {self.sort_pool}")
        if self.max_frames < 0:
            raise ValueError("max_frames must be >= 0 (0: no budget)")

    def settings_for(self, kind: str) -> dict[str, Any]:
        """The settings that shape a ``kind`` ("ctc" or "cls") probe's result: every field but the
        device and the other kind's own settings, so a cache keyed on them survives changes to a head
        this task does not train. A field in neither ``CTC_ONLY`` nor ``CLS_ONLY`` counts for both."""
        other = CLS_ONLY if kind == "ctc" else CTC_ONLY
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "device" and f.name not in other}


# Settings only one kind of probe reads (``Probe``, ``train_probe``). ``batch_size`` also batches
# evaluation, which does not change an utterance probe's predictions (padding is masked out).
CTC_ONLY = frozenset({"epochs", "batch_size", "ctc_lr", "ctc_head", "lstm_hidden", "lstm_layers", "conv_hidden",
                      "conv_kernel", "upsample_ctc", "sort_pool", "max_frames"})
CLS_ONLY = frozenset({"cls_epochs", "cls_batch_size", "lr"})


class WeightedSum(nn.Module):
    """Softmax-weighted sum over layers of (B, T, L, D), each layer optionally layer-normed."""

    def __init__(self, n_layers: int, layer_norm: bool = True) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(n_layers))
        self.layer_norm = layer_norm

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, L, D) -> (B, T, D), the softmax-weighted sum over layers."""
        if self.layer_norm:
            x = F.layer_norm(x, x.shape[-1:])
        return torch.einsum("btld,l->btd", x, torch.softmax(self.weights, 0))


def reverse_valid(x: Tensor, lengths: Tensor) -> Tensor:
    """(B, T, ...) -> the same with each row's first ``lengths[b]`` frames in reverse order; the
    padding after them stays where it is."""
    t = torch.arange(x.shape[1], device=x.device)[None]
    n = lengths.to(x.device)[:, None]
    idx = torch.where(t < n, n - 1 - t, t)
    return x.gather(1, idx.view(*idx.shape, *[1] * (x.dim() - 2)).expand_as(x))


class BiLSTM(nn.Module):
    """A bidirectional LSTM over a padded batch (B, T, D) with lengths -> (B, T, 2H).

    Each direction is a unidirectional LSTM over the whole padded batch, the backward one over
    every utterance reversed within its length, so padding only ever follows the valid frames
    and never reaches them. Same function as ``nn.LSTM(bidirectional=True)`` over a packed
    sequence, but it runs the fused padded kernel: about 4x faster on a CPU (forward and backward).
    Frames past an utterance's length hold values that mean nothing.
    """

    def __init__(self, dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        sizes = [dim] + [2 * hidden] * (layers - 1)
        self.fwd = nn.ModuleList(nn.LSTM(d, hidden, batch_first=True) for d in sizes)
        self.bwd = nn.ModuleList(nn.LSTM(d, hidden, batch_first=True) for d in sizes)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """(B, T, D) with (B,) lengths -> (B, T, 2H): forward then backward states per frame."""
        for fwd, bwd in zip(self.fwd, self.bwd, strict=True):
            back = reverse_valid(bwd(reverse_valid(x, lengths))[0], lengths)
            x = torch.cat([fwd(x)[0], back], dim=-1)
        return x


class Probe(nn.Module):
    """A downstream head over frozen features: weighted layer sum, then statistics pooling and a
    linear layer (classification) or a linear, convolutional or BiLSTM CTC head (sequences).
    """

    def __init__(self, n_layers: int, dim: int, n_out: int, kind: str, cfg: ProbeConfig) -> None:
        super().__init__()
        self.kind = kind
        self.featurizer = WeightedSum(n_layers, cfg.layer_norm)
        if kind == "cls":
            # statistics pooling (mean and std over frames, as in x-vectors): speaker and word
            # identity live in both. Pooled vectors of different utterances differ far less than
            # frames do; without standardising them the linear classifier barely moves.
            self.pool_norm = nn.BatchNorm1d(2 * dim)
            self.out = nn.Linear(2 * dim, n_out)
        elif cfg.ctc_head == "lstm":
            self.lstm = BiLSTM(dim, cfg.lstm_hidden, cfg.lstm_layers)
            self.out = nn.Linear(2 * cfg.lstm_hidden, n_out)
        elif cfg.ctc_head == "conv":
            self.conv = nn.Conv1d(dim, cfg.conv_hidden, cfg.conv_kernel, padding=cfg.conv_kernel // 2)
            self.out = nn.Linear(cfg.conv_hidden, n_out)
        else:
            self.out = nn.Linear(dim, n_out)
        self.ctc_head = cfg.ctc_head

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """(B, T, L, D) features with lengths -> class logits (B, K) or CTC log-probs (B, T, K)."""
        h = self.featurizer(x)
        mask = length_mask(lengths, h.shape[1])[..., None].to(h.dtype)
        if self.kind == "cls":
            count = mask.sum(1).clamp(min=1)
            mean = (h * mask).sum(1) / count
            var = ((h - mean[:, None]) ** 2 * mask).sum(1) / count
            return self.classify(mean, var)
        if self.ctc_head == "lstm":
            h = self.lstm(h, lengths)
        elif self.ctc_head == "conv":
            # padding frames are zeroed so a short utterance in a batch sees the same zeros as alone
            h = F.gelu(self.conv((h * mask).transpose(1, 2))).transpose(1, 2)
        return self.out(h)

    def classify(self, mean: Tensor, var: Tensor) -> Tensor:
        """Class logits (B, K) from the weighted layer sum's mean and variance over frames (B, D) each."""
        pooled = torch.cat([mean, var.clamp(min=1e-6).sqrt()], dim=-1).float()
        if self.training and pooled.shape[0] == 1:  # batch statistics need two rows
            n = self.pool_norm
            return self.out(F.batch_norm(pooled, n.running_mean, n.running_var, n.weight, n.bias, False))
        return self.out(self.pool_norm(pooled))

    def classify_moments(self, m1: Tensor, m2: Tensor) -> Tensor:
        """Class logits (B, K) from frame moments (``frame_moments``): the same as ``forward`` on
        the frames they came from, since the weighted sum's mean is the weighted sum of the layers'
        means and its variance follows from their cross moments."""
        a = torch.softmax(self.featurizer.weights, 0).to(m1.dtype)
        mean = torch.einsum("bld,l->bd", m1, a)
        return self.classify(mean, torch.einsum("blmd,l,m->bd", m2, a, a) - mean * mean)


def frame_moments(x: Tensor, layer_norm: bool) -> tuple[Tensor, Tensor]:
    """One utterance's frames (T, L, D), each layer normalised if ``layer_norm``, as their means
    over frames (L, D) and cross-layer second moments (L, L, D), in float64 (the variance is a
    difference of moments). What statistics pooling of any weighted layer sum needs."""
    z = F.layer_norm(x.float(), x.shape[-1:]) if layer_norm else x.float()
    z = z.double()
    return z.mean(0), torch.einsum("tld,tmd->lmd", z, z) / z.shape[0]


@dataclass
class ProbeResult:
    """A trained probe's dev and test metrics, its layer weights, size and training time."""

    test: dict[str, float]
    dev: dict[str, float]
    metric: str
    layer_weights: list[float]
    epochs: int
    train_seconds: float
    params: int
    infeasible: dict[str, int] = field(default_factory=dict)
    epochs_run: int = 0  # epochs trained (early stop or the frame budget may end before cfg.epochs)
    test_runs: list[float] = field(default_factory=list)  # each probe's test metric (train_probes, runs > 1)


def _batches(ids: list[str], bs: int, gen: torch.Generator | None) -> list[list[str]]:
    order = ids if gen is None else [ids[i] for i in torch.randperm(len(ids), generator=gen).tolist()]
    return [order[i : i + bs] for i in range(0, len(order), bs)]


def bucketed_batches(ids: list[str], frames: dict[str, int], bs: int, pool: int, gen: torch.Generator) -> list[list[str]]:
    """One epoch's batches of like lengths: the utterances shuffled, each run of ``pool`` batches'
    worth sorted by frame count (ties keep the shuffled order) and cut into batches, then the
    batches shuffled. ``pool`` 1 gives plain random batches (``_batches``)."""
    if pool == 1:
        return _batches(ids, bs, gen)
    order = [ids[i] for i in torch.randperm(len(ids), generator=gen).tolist()]
    batches = []
    for j in range(0, len(order), bs * pool):
        run = sorted(order[j : j + bs * pool], key=frames.__getitem__)
        batches += [run[i : i + bs] for i in range(0, len(run), bs)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def head_length(stored: int, upsampled: int) -> int:
    """Frames a CTC head reads for an utterance of ``stored`` frames whose 20 ms grid had
    ``upsampled`` (0: not upsampled): the grid's count where it is longer, else the stored one."""
    return upsampled if upsampled > stored > 0 else stored


def _collate(ids: list[str], feats: dict[str, np.ndarray], upsample: dict[str, int] | None) -> tuple[Tensor, Tensor]:
    xs = []
    for u in ids:
        x = torch.from_numpy(np.asarray(feats[u], dtype=np.float32))
        n = head_length(len(x), upsample.get(u, 0) if upsample is not None else 0)
        if n > len(x):
            idx = torch.div(torch.arange(n) * len(x), n, rounding_mode="floor")
            x = x[idx]  # nearest-frame repetition back to the 20 ms grid
        xs.append(x)
    lengths = torch.tensor([len(x) for x in xs])
    return nn.utils.rnn.pad_sequence(xs, batch_first=True), lengths


class ProbeInputs:
    """What a probe reads, per batch of utterance ids. CTC heads read padded frames (B, T, L, D)
    with lengths. An utterance head reads each utterance's frame moments, computed once
    (``frame_moments``): exact, and an epoch no longer pools every frame again. Frames are used
    instead when the moments would take more memory than the frames held in float32 (many
    layers, few frames per utterance: (L + 1) x 2 > mean frames)."""

    def __init__(self, feats: dict[str, np.ndarray], ids: list[str], kind: str, layer_norm: bool,
                 up: dict[str, int] | None, device: torch.device) -> None:
        self.feats, self.up, self.device = feats, up, device
        self.frames = {u: head_length(len(feats[u]), up.get(u, 0) if up is not None else 0) for u in ids}  # what a CTC head reads
        self.row: dict[str, int] = {}
        self.moments: tuple[Tensor, Tensor] | None = None
        n_layers = feats[ids[0]].shape[1] if ids else 0
        if kind == "cls" and ids and 2 * (n_layers + 1) <= sum(len(feats[u]) for u in ids) / len(ids):
            pairs = [frame_moments(torch.from_numpy(np.asarray(feats[u], dtype=np.float32)), layer_norm) for u in ids]
            self.row = {u: i for i, u in enumerate(ids)}
            self.moments = (torch.stack([m1 for m1, _ in pairs]).to(device),
                            torch.stack([m2 for _, m2 in pairs]).to(device))

    def outputs(self, model: Probe, ids: list[str]) -> tuple[Tensor, Tensor]:
        """The model's outputs for ``ids`` (logits (B, K) or (B, T, V)) and their frame lengths (B,)."""
        if self.moments is not None:
            idx = torch.tensor([self.row[u] for u in ids], device=self.device)
            lengths = torch.tensor([len(self.feats[u]) for u in ids])
            return model.classify_moments(self.moments[0][idx], self.moments[1][idx]), lengths
        x, lengths = _collate(ids, self.feats, self.up)
        return model(x.to(self.device), lengths.to(self.device)), lengths


def ctc_min_frames(label: list[int]) -> int:
    """Fewest frames CTC needs for ``label``: its length plus one blank between repeated tokens."""
    return len(label) + sum(1 for a, b in itertools.pairwise(label) if a == b)


def infeasible_count(ids: list[str], labels: dict[str, list[int]], frames: dict[str, int]) -> int:
    """Utterances whose CTC label needs more frames than available (label + repeats)."""
    return sum(int(frames[u] < ctc_min_frames(labels[u])) for u in ids)


def train_probe(task: TaskData, feats: dict[str, np.ndarray], cfg: ProbeConfig,
                input_frames: dict[str, int] | None = None) -> ProbeResult:
    """Train on train, early-stop on dev, report dev and test metrics."""
    seed_all(cfg.seed)
    dev = resolve_device(cfg.device, "probe.device")
    splits = {s: [u for u in task.splits[s] if u in feats and len(feats[u])] for s in ("train", "dev", "test")}
    if not splits["train"] or not splits["test"]:
        raise ConfigError(f"task {task.task}: no features for the train or test split "
                          f"({len(splits['train'])} train, {len(splits['test'])} test utterances with frames)")
    sample = feats[splits["train"][0]]
    n_layers, dim = sample.shape[1], sample.shape[2]
    model = Probe(n_layers, dim, task.n_outputs, task.kind, cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.ctc_lr if task.kind == "ctc" else cfg.lr)
    up = input_frames if (cfg.upsample_ctc and task.kind == "ctc") else None
    all_ids = list(dict.fromkeys(u for ids in splits.values() for u in ids))
    inputs = ProbeInputs(feats, all_ids, task.kind, cfg.layer_norm, up, dev)
    eval_ids = splits["dev"] or splits["train"]
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, best_epoch, waited = None, None, 0, 0
    t0 = time.perf_counter()
    epoch = 0
    epochs, batch_size = (cfg.cls_epochs, cfg.cls_batch_size) if task.kind == "cls" else (cfg.epochs, cfg.batch_size)
    if task.kind == "ctc" and cfg.max_frames:
        epochs = max(1, min(epochs, cfg.max_frames // max(1, sum(inputs.frames[u] for u in splits["train"]))))
    for epoch in range(1, epochs + 1):
        model.train()
        pool = cfg.sort_pool if task.kind == "ctc" else 1  # utterance heads read moments: nothing to pad
        for ids in bucketed_batches(splits["train"], inputs.frames, batch_size, pool, gen):
            out, lengths = inputs.outputs(model, ids)
            loss = output_loss(out, task, ids, lengths.to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
        score = evaluate_probe(model, task, eval_ids, inputs, batch_size)[task.metric]
        better = best is None or (score > best if task.higher_better else score < best)
        if better:
            best, best_epoch, waited = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= cfg.patience and epoch >= cfg.min_epochs:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    res_test = evaluate_probe(model, task, splits["test"], inputs, batch_size)
    res_dev = evaluate_probe(model, task, eval_ids, inputs, batch_size)
    infeasible = {}
    if task.kind == "ctc":
        infeasible = {s: infeasible_count(splits[s], task.labels, inputs.frames) for s in ("train", "test")}
    weights = torch.softmax(model.featurizer.weights.detach(), 0).tolist()
    return ProbeResult(res_test, res_dev, task.metric, [round(w, 4) for w in weights], best_epoch,
                       time.perf_counter() - t0, sum(p.numel() for p in model.parameters()), infeasible, epoch)


def train_probes(task: TaskData, feats: dict[str, np.ndarray], cfg: ProbeConfig, runs: int = 1,
                 input_frames: dict[str, int] | None = None) -> ProbeResult:
    """``runs`` probes on the same features, seeded ``cfg.seed``, ``cfg.seed + 1``, ...: one
    result with their mean test and dev metrics and layer weights, their summed training seconds,
    the first probe's epochs and counts, and each probe's test metric in ``test_runs``. The first
    probe is ``train_probe``'s with ``cfg`` as given, so one run is exactly its result."""
    results = [train_probe(task, feats, replace(cfg, seed=cfg.seed + k), input_frames) for k in range(runs)]
    first = results[0]
    if runs == 1:
        return first

    def mean(split: str) -> dict[str, float]:
        return {k: float(np.mean([getattr(r, split)[k] for r in results])) for k in getattr(first, split)}

    weights = np.mean([r.layer_weights for r in results], axis=0)
    return replace(first, test=mean("test"), dev=mean("dev"), layer_weights=[round(float(w), 4) for w in weights],
                   train_seconds=sum(r.train_seconds for r in results),
                   test_runs=[r.test[first.metric] for r in results])


def task_loss(model: Probe, task: TaskData, ids: list[str], x: Tensor, lengths: Tensor, *,
              charge_infeasible: bool = False, soft_error: bool = False) -> Tensor:
    """Mean loss of a batch: cross-entropy, or CTC per label token.

    A CTC utterance with fewer frames than its label needs (``ctc_min_frames``) costs 0 (dropped
    by ``zero_infinity``: nothing to learn from it) unless ``charge_infeasible``, which charges it
    the per-token loss of a uniform guess, log(V) (adapt: dropping it would make very low rates
    look free). ``soft_error``: the expected error instead, 1 - p(label) (CTC: 1 - the per-token
    geometric mean of p(label)), a fraction like accuracy or PER, flat where the metric is flat.
    """
    return output_loss(model(x, lengths), task, ids, lengths, charge_infeasible=charge_infeasible,
                       soft_error=soft_error)


def output_loss(out: Tensor, task: TaskData, ids: list[str], lengths: Tensor, *,
                charge_infeasible: bool = False, soft_error: bool = False) -> Tensor:
    """``task_loss`` of a probe's outputs: class logits (B, K), or CTC logits (B, T, V) with
    frame lengths (B,) on the outputs' device."""
    if task.kind == "cls":
        y = torch.tensor([task.labels[u][0] for u in ids], device=out.device)
        if soft_error:
            return 1.0 - out.softmax(-1).gather(1, y[:, None]).mean()
        return F.cross_entropy(out, y)
    targets = [torch.tensor(task.labels[u]) for u in ids]
    tl = torch.tensor([len(t) for t in targets])
    logp = out.log_softmax(-1).transpose(0, 1)  # (T, B, V)
    # per token, as reduction="mean" does (bit for bit), so each utterance can be charged apart
    per = F.ctc_loss(logp, torch.cat(targets).to(out.device), lengths, tl, blank=0, reduction="none",
                     zero_infinity=True) / tl.clamp(min=1).to(out.device)
    if charge_infeasible:
        feasible = lengths.cpu() >= torch.tensor([ctc_min_frames(task.labels[u]) for u in ids])
        per = torch.where(feasible.to(out.device), per, per.new_tensor(float(np.log(out.shape[-1]))))
    return (1.0 - torch.exp(-per)).mean() if soft_error else per.mean()


@torch.no_grad()
def evaluate_probe(model: Probe, task: TaskData, ids: list[str], inputs: ProbeInputs, batch_size: int) -> dict[str, float]:
    """Run ``model`` over ``ids`` and score it with the task's metric."""
    model.eval()
    preds: list[Any] = []
    ids = sorted(ids, key=lambda u: len(inputs.feats[u]))  # batches of like lengths pad little; the score ignores order
    for batch in _batches(ids, batch_size, None):
        out, lengths = inputs.outputs(model, batch)
        preds += decode(task, out, lengths)
    model.train()
    return score(task, ids, preds)


def decode(task: TaskData, out: Tensor, lengths: Tensor) -> list[Any]:
    """A probe's outputs as the predictions :func:`score` reads: (B, C) logits -> class indices,
    (B, T, V) CTC logits with frame lengths -> token ids per utterance (greedy)."""
    return out.argmax(-1).tolist() if task.kind == "cls" else ctc_greedy(out, lengths)


def score(task: TaskData, ids: list[str], preds: list[Any]) -> dict[str, float]:
    """The task's metrics for ``preds`` of ``ids``: class indices (accuracy), or CTC token ids
    (PER; WER and CER for asr)."""
    if task.kind == "cls":
        return {"accuracy": accuracy(preds, [task.labels[u][0] for u in ids])}
    hyp = [[task.vocab[t - 1] for t in p] for p in preds]
    ref = [[task.vocab[t - 1] for t in task.labels[u]] for u in ids]
    if task.task == "asr":
        return {"wer": error_rate([words(h) for h in hyp], [words(r) for r in ref]),
                "cer": error_rate([[c for c in h if c != "|"] for h in hyp], [[c for c in r if c != "|"] for r in ref])}
    return {"per": error_rate(hyp, ref)}
