"""``ofactl adapt``: a downstream task learns its own compression rate.

The student is frozen. lambda = 2 * sigmoid(theta) (always in [0, 2)) is a learnable parameter
trained jointly with the probe on

    task loss + gamma * log2(expected frame ratio)

where the expected frame ratio is mean(sum(alpha_mix) / T), differentiable in lambda. gamma is
the task loss one accepts to pay for halving the frame rate (and so the transformer and
downstream compute): with gamma = 0 only the task decides; larger gamma compresses more.

How the gradient reaches lambda: the number of output frames and the fire positions are
piecewise constant, so they give no gradient. lambda moves the mixed alpha, which moves the
interpolation weights of every frame that straddles a boundary and the normalisation of every
output frame; the task loss sees those changes through the transformer and the probe.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ofactl.audio import Corpus, load_audio, read_corpus
from ofactl.config import save_resolved
from ofactl.errors import ConfigError
from ofactl.model.compress import LAMBDA_MAX, length_mask, rate_to_lambda
from ofactl.probe import ProbeConfig, build_task
from ofactl.probe.metrics import accuracy, ctc_greedy, error_rate, words
from ofactl.probe.tasks import TaskData
from ofactl.probe.train import Probe
from ofactl.progress import NullProgress, Progress


@dataclass
class AdaptConfig:
    task: str = "pr"
    label_column: str = ""
    init_rate: float = 0.5
    cost: float = 0.1  # gamma: task loss traded per halving of the frame rate
    target_rate: float = 0.0  # > 0: penalise |ratio - target| * cost instead
    epochs: int = 15
    batch_size: int = 16
    lambda_lr: float = 0.05
    lambda_warmup: float = 0.3  # share of the steps training the probe alone: a random probe's
    # loss says nothing about the rate, so lambda starts learning once the probe does
    lambda_data: str = "dev"  # dev: lambda follows the dev-split loss (first-order DARTS); train: the same loss as the probe
    min_rate: float = 0.2  # lowest rate lambda may reach (100 ms; OFA students are distilled on 20-90 ms)
    seed: int = 0
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> None:
        if not 0 < self.init_rate <= 1:
            raise ValueError("init_rate must be in (0, 1]")
        if self.cost < 0:
            raise ValueError("cost (gamma) must be >= 0")
        if not 0 <= self.target_rate <= 1:
            raise ValueError("target_rate must be in [0, 1] (0: off)")
        if self.lambda_data not in ("dev", "train"):
            raise ValueError(f"lambda_data must be dev or train, got {self.lambda_data!r}")
        if not 0 < self.min_rate < 1 or self.min_rate > self.init_rate:
            raise ValueError("min_rate must be in (0, 1) and at most init_rate")
        if not 0 <= self.lambda_warmup < 1:
            raise ValueError("lambda_warmup must be in [0, 1)")
        if self.epochs < 1 or self.batch_size < 1 or self.lambda_lr <= 0:
            raise ValueError("epochs, batch_size and lambda_lr must be positive")


class LearnableLambda(torch.nn.Module):
    """lambda = top * sigmoid(theta), top <= LAMBDA_MAX: stays in [0, top) whatever the optimiser does."""

    def __init__(self, init: float, top: float = LAMBDA_MAX) -> None:
        super().__init__()
        self.top = min(float(top), LAMBDA_MAX)
        p = min(max(init / self.top, 1e-4), 1 - 1e-4)
        self.theta = torch.nn.Parameter(torch.tensor(float(np.log(p / (1 - p)))))

    def forward(self) -> Tensor:
        return self.top * torch.sigmoid(self.theta)


@dataclass
class AdaptResult:
    out_dir: Path
    task: str
    metric: str
    test: float
    learned_lambda: float
    learned_rate: float
    frame_period_ms: float
    init_rate: float
    cost: float
    wall_seconds: float
    comparison: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _cnn_cache(student: Any, utts: list, device: torch.device) -> dict[str, Tensor]:
    """Layer-normed CNN features per utterance (the frozen part that does not depend on lambda)."""
    out = {}
    with torch.no_grad():
        for u in utts:
            w = load_audio(u.path)[None].to(device)
            f, n = student.cnn_features(w, torch.tensor([w.shape[1]], device=device))
            out[u.id] = f[0, : int(n[0])].half().cpu()
    return out


def _batch(ids: list[str], cache: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    xs = [cache[u].float() for u in ids]
    lengths = torch.tensor([len(x) for x in xs], device=device)
    return torch.nn.utils.rnn.pad_sequence(xs, batch_first=True).to(device), lengths


def _task_loss(probe: Probe, task: TaskData, ids: list[str], h: Tensor, lengths: Tensor) -> Tensor:
    out = probe(h, lengths)
    if task.kind == "cls":
        return F.cross_entropy(out, torch.tensor([task.labels[u][0] for u in ids], device=h.device))
    targets = [torch.tensor(task.labels[u]) for u in ids]
    logp = out.log_softmax(-1).transpose(0, 1)
    return F.ctc_loss(logp, torch.cat(targets).to(h.device), lengths, torch.tensor([len(t) for t in targets]),
                      blank=0, zero_infinity=True)


def run_adapt(cfg: AdaptConfig, ckpt: Path, corpus: str | Path | Corpus, out_dir: Path,
              compare_sweep: Path | None = None, progress: Progress | None = None) -> AdaptResult:
    from ofactl.checkpoint import load_student
    from ofactl.extract import resolve_device

    progress = progress or NullProgress()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, "adapt", out_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.probe.device if cfg.probe.device != "cpu" else "cpu")
    student, _ = load_student(Path(ckpt), device)
    if student.cfg.compressor != "cif":
        raise ConfigError(f"{ckpt}: adapt needs a once-for-all (cif) student, this one is {student.cfg.compressor}")
    for p in student.parameters():
        p.requires_grad_(False)
    cps = corpus if isinstance(corpus, Corpus) else read_corpus(corpus)
    task = build_task(cfg.task, cps, cfg.label_column or None, cfg.seed)
    utts = [u for u in cps if u.id in set(task.ids)]
    progress.start("CNN features (computed once)", None)
    cache = _cnn_cache(student, utts, device)
    progress.finish()
    alpha_mean = student.alpha_mean
    lam = LearnableLambda(float(rate_to_lambda(cfg.init_rate, alpha_mean)),
                          float(rate_to_lambda(cfg.min_rate, alpha_mean))).to(device)
    probe = Probe(student.num_hidden, student.cfg.arch.embed_dim, task.n_outputs, task.kind, cfg.probe).to(device)
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.probe.ctc_lr if task.kind == "ctc" else cfg.probe.lr)
    opt_lam = torch.optim.Adam(lam.parameters(), lr=cfg.lambda_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    train = task.splits["train"]
    dev = task.splits["dev"] if (cfg.lambda_data == "dev" and task.splits["dev"]) else []
    dev_pos = 0
    traj = []
    steps_per_epoch = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    warm = int(cfg.lambda_warmup * cfg.epochs * steps_per_epoch)
    progress.start("adapting the rate", cfg.epochs * steps_per_epoch)
    step = 0
    for epoch in range(cfg.epochs):
        order = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
        for k in range(0, len(order), cfg.batch_size):
            ids = order[k : k + cfg.batch_size]
            x, n = _batch(ids, cache, device)
            learn_lam = step >= warm
            lm = lam()
            # dev mode: the probe learns on train at the current lambda, lambda on a dev batch
            hidden, comp = student.encode(x, n, rate=None, lam=(lm.detach() if dev else lm).expand(len(ids)), exact=False)
            loss = _task_loss(probe, task, ids, hidden.states, hidden.lengths)
            mean_ratio, cost = _cost(cfg, comp, n, x.shape[1])
            opt.zero_grad()
            opt_lam.zero_grad()
            (loss if dev else loss + cost).backward()
            opt.step()
            dev_loss = None
            if learn_lam and dev:
                d_ids = [dev[(dev_pos + i) % len(dev)] for i in range(cfg.batch_size)]
                dev_pos += cfg.batch_size
                xd, nd = _batch(d_ids, cache, device)
                hd, cd = student.encode(xd, nd, rate=None, lam=lm.expand(len(d_ids)), exact=False)
                norm = getattr(probe, "pool_norm", None)
                if norm is not None:
                    norm.eval()  # dev batch statistics stay out of the probe (an RNN must stay in train mode)
                dev_loss = _task_loss(probe, task, d_ids, hd.states, hd.lengths)
                if norm is not None:
                    norm.train()
                mean_ratio, cost = _cost(cfg, cd, nd, xd.shape[1])
                opt.zero_grad()
                (dev_loss + cost).backward()
            if learn_lam:
                opt_lam.step()
            step += 1
            achieved = float(hidden.lengths.sum() / n.sum())
            rec = {"step": step, "epoch": epoch + 1, "lambda": round(float(lm.detach()), 5),
                   "expected_ratio": round(float(mean_ratio.detach()), 5), "achieved_rate": round(achieved, 5),
                   "frame_period_ms": round(20.0 / max(achieved, 1e-6), 2), "task_loss": round(float(loss.detach()), 5),
                   "cost": round(float(cost.detach()), 5)}
            if dev_loss is not None:
                rec["dev_loss"] = round(float(dev_loss.detach()), 5)
            traj.append(rec)
            progress.advance(1, lam=rec["lambda"], rate=rec["achieved_rate"], loss=rec["task_loss"])
    progress.finish()
    final_lam = float(lam().detach())
    test_metric, test_rate = _evaluate(student, probe, task, task.splits["test"], cache, final_lam, device, cfg)
    with open(out_dir / "trajectory.jsonl", "w") as f:
        for rec in traj:
            f.write(json.dumps(rec) + "\n")
    _plot(traj, out_dir / "trajectory.png", task.task)
    learned_rate = round(test_rate, 4)
    (out_dir / "rate.yaml").write_text(
        f"description: rate learned by 'ofactl adapt --task {task.task}' (lambda {final_lam:.4f}, "
        f"cost {cfg.cost}); use with 'ofactl extract -c {out_dir / 'rate.yaml'}'\n"
        f"extract:\n  rates: [{learned_rate}]\n")
    comparison = compare_with_sweep(compare_sweep, task, learned_rate, test_metric[task.metric],
                                    time.perf_counter() - t0) if compare_sweep else None
    res = AdaptResult(out_dir, task.task, task.metric, round(test_metric[task.metric], 5), round(final_lam, 5),
                      learned_rate, round(20.0 / learned_rate, 2), cfg.init_rate, cfg.cost,
                      time.perf_counter() - t0, comparison)
    (out_dir / "summary.json").write_text(json.dumps(res.to_json(), indent=2))
    return res


def _cost(cfg: AdaptConfig, comp: Any, n: Tensor, S: int) -> tuple[Tensor, Tensor]:
    """Mean expected frame ratio (differentiable in lambda) and the compute cost term."""
    valid = length_mask(n, S).float()
    mean_ratio = ((comp.plan.alpha * valid).sum(1) / n.float()).mean()  # expected frames / input frames
    if cfg.target_rate > 0:
        return mean_ratio, cfg.cost * (mean_ratio - cfg.target_rate).abs()
    return mean_ratio, cfg.cost * torch.log2(mean_ratio.clamp(min=1e-4))


@torch.no_grad()
def _evaluate(student: Any, probe: Probe, task: TaskData, ids: list[str], cache: dict[str, Tensor], lam: float,
              device: torch.device, cfg: AdaptConfig) -> tuple[dict[str, float], float]:
    probe.eval()
    preds: list[Any] = []
    frames = inputs = 0
    for k in range(0, len(ids), cfg.batch_size):
        b = ids[k : k + cfg.batch_size]
        x, n = _batch(b, cache, device)
        hidden, _ = student.encode(x, n, rate=None, lam=torch.full((len(b),), lam, device=device), exact=False)
        out = probe(hidden.states, hidden.lengths)
        frames += int(hidden.lengths.sum())
        inputs += int(n.sum())
        preds += out.argmax(-1).tolist() if task.kind == "cls" else ctc_greedy(out, hidden.lengths)
    probe.train()
    if task.kind == "cls":
        return {"accuracy": accuracy(preds, [task.labels[u][0] for u in ids])}, frames / inputs
    hyp = [[task.vocab[t - 1] for t in p] for p in preds]
    ref = [[task.vocab[t - 1] for t in task.labels[u]] for u in ids]
    if task.task == "asr":
        return {"wer": error_rate([words(h) for h in hyp], [words(r) for r in ref])}, frames / inputs
    return {"per": error_rate(hyp, ref)}, frames / inputs


def compare_with_sweep(path: Path, task: TaskData, rate: float, metric: float, adapt_s: float) -> dict[str, Any]:
    """Where the learned rate falls on a sweep of the same task, and what each cost."""
    from ofactl.sweep import load_rows

    p = Path(path)
    rows = load_rows(p / "sweep.json" if p.is_dir() else p)
    rows = [r for r in rows if r.task == task.task]
    if not rows:
        raise ConfigError(f"--compare-sweep {path}: no rows for task {task.task}")
    rows.sort(key=lambda r: r.achieved_rate)
    xs = [r.achieved_rate for r in rows]
    ys = [r.test for r in rows]
    best = max(ys) if task.higher_better else min(ys)
    tol = 0.02 if task.higher_better else 0.02  # 2 points of accuracy / error rate
    flat = [r.achieved_rate for r in rows if abs(r.test - best) <= tol]
    return {
        "sweep_rates": xs, "sweep_metric": ys, "sweep_at_learned_rate": round(float(np.interp(rate, xs, ys)), 5),
        "adapt_metric": metric, "best_sweep_metric": best,
        "near_flat_region": [min(flat), max(flat)] if flat else None,
        "learned_rate_in_flat_region": bool(flat) and min(flat) - 1e-9 <= rate <= max(flat) + 1e-9,
        "sweep_probe_trainings": len(rows), "adapt_probe_trainings": 1,
        "sweep_probe_seconds": round(sum(r.probe_train_s for r in rows), 2),
        "adapt_seconds": round(adapt_s, 2),
    }


def _plot(traj: list[dict[str, Any]], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in traj]
    ax[0].plot(steps, [r["lambda"] for r in traj])
    ax[0].set_ylabel("lambda")
    ax[1].plot(steps, [r["frame_period_ms"] for r in traj])
    ax[1].set_ylabel("frame period (ms)")
    for a in ax:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.suptitle(f"adapt --task {task}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
