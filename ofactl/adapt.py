"""``ofactl adapt``: a downstream task learns its own compression rate.

The student is frozen. lambda = top * sigmoid(theta), with top the lambda of ``min_rate``, is a
learnable parameter trained alongside the probe on

    task term + gamma * (expected frame ratio - 1)     (cost_form: linear, the default)
    task term + gamma * log2(expected frame ratio)      (cost_form: log2)

where the expected frame ratio is mean(sum(alpha_mix) / T), differentiable in lambda through the
CIF weights. The task term is the probe's expected error on dev batches (``lambda_loss: error``:
1 - p(label), for CTC 1 - the per-token geometric mean of p(label)), a fraction like accuracy or
PER, so gamma reads in metric points: with linear, 0.05 accepts 5 points of error for the whole
of the compute after the CNN (the transformer and the downstream model), so the learned rate can
lose at most gamma against any higher rate; with log2, 5 points per halving of the frame rate
(2 gamma down to rate 0.25). gamma = 0: only the task decides.

How the gradient reaches lambda. lambda moves the mixed alpha; alpha moves the CIF weights of
every frame that straddles a boundary, the normalisation of every output frame, and the number of
output frames. The count is piecewise constant in lambda, so autograd (``lambda_grad: pathwise``)
sees only the weights. On short utterances the frames that appear and vanish dominate, and the
pathwise slope was measured to disagree in sign with the loss curve. The default
(``difference``) evaluates the task term at lambda +- h and uses the central difference as the
slope, which covers the weights and the count; the cost term is always differentiated through
the CIF weights. The probe trains at per-utterance lambdas within ``probe_band`` of the current
one, so its error does not favour the exact rate it sits at (a probe trained at one rate is
worst just below it, which pulls lambda back towards less compression); near an end of lambda's
range the draws stay uniform over the band's part inside it (``band_edges``). The last ``refine``
share of the epochs freezes lambda and trains the probe at the learned rate. The reported test
metric comes from a fresh probe trained as ``sweep`` trains one, on the exact-length features at
the learned rate that ``rate.yaml`` extracts (``final_probe: fresh``), or from the joint probe.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ofactl.atomic import make_dir, save_figure, write_text
from ofactl.audio import Corpus, load_audio, set_level
from ofactl.choices import BandEdges, CostForm, FinalProbe, LambdaData, LambdaGrad, LambdaLoss, Task
from ofactl.config import save_resolved
from ofactl.errors import ConfigError
from ofactl.extract import check_level, level_for
from ofactl.model.compress import LAMBDA_MAX, length_mask, mix_alpha, rate_to_lambda
from ofactl.probe import ProbeConfig, build_task
from ofactl.probe.tasks import TaskData
from ofactl.probe.train import Probe, ProbeResult, bucketed_batches, decode, score, task_loss, train_probe
from ofactl.progress import NullProgress, Progress
from ofactl.runtime import check_device_name, resolve_device, rng_state, seed_all, set_rng_state

if TYPE_CHECKING:
    from ofactl.sweep import SweepRow


@dataclass
class AdaptConfig:
    """Settings of ``ofactl adapt``: the task, the cost of frames, lambda's optimiser and phases."""

    task: Task = "pr"  # the downstream task whose rate is learned
    label_column: str = ""  # label column of task cls
    init_rate: float = 0.5  # rate lambda starts from
    restarts: tuple[float, ...] = ()  # more rates to start from: adapt runs once from init_rate and once from
    # each, and keeps the run whose fresh probe has the lowest dev objective (dev error plus the cost at its
    # learned rate). adapt follows a local slope, and on a flat curve it can stay near its start
    # (docs/method.md, "Where adapt starts matters on a flat curve"); empty: one run
    cost: float = 0.05  # gamma: expected error (a fraction: 0.05 = 5 points of accuracy or error rate)
    # accepted for all of the compute after the CNN (cost_form linear) or per halving of it (log2)
    cost_form: CostForm = "linear"  # linear: gamma * (ratio - 1); log2: gamma * log2(ratio)
    # (linear won the ablation in docs/method.md, "Which compute term")
    target_rate: float = 0.0  # > 0: penalise |ratio - target| * cost instead (cost_form then unused)
    epochs: int = 15  # epochs over the training split
    batch_size: int = 16  # utterances per batch
    lambda_lr: float = 0.05  # learning rate of lambda (Adam)
    lambda_warmup: float = 0.3  # share of the steps training the probe alone: a random probe's
    # loss says nothing about the rate, so lambda starts learning once the probe does

    # dev: lambda follows the dev-split loss (first-order DARTS); train: the same loss as the probe;
    # crossfit: train and dev pooled and cut into `folds`, one probe per fold trained on the others, and
    # lambda follows each probe's loss on its own held-out fold, so every pooled utterance is held out once
    # (for a dev split too small to resolve the cost; each step costs `folds` probe steps)
    lambda_data: LambdaData = "dev"
    folds: int = 5  # folds of lambda_data crossfit (unused otherwise)
    lambda_batch_size: int = 0  # dev utterances behind each lambda step (0: batch_size; at most the dev split)
    lambda_grad: LambdaGrad = "difference"  # difference: central difference of the task loss over +-difference_step
    # (sees the frame count change); pathwise: autograd through the CIF weights only
    lambda_loss: LambdaLoss = "error"  # error: lambda weighs the expected error rate (metric units); loss: the training loss;
    # metric: the task's own metric on the dev batch (error rate or PER of the decoded outputs; difference only)
    difference_step: float = 0.1  # lambda half-step of the central difference (0.1 ~ 0.09 of rate)
    probe_band: float = 0.3  # the probe trains at per-utterance lambdas within +-band of the current one,
    # so its loss does not favour the rate it happens to sit at
    band_edges: BandEdges = "inside"  # near an end of lambda's range [0, top]: inside, draws are uniform over
    # the part of the band inside the range; clamp (every run before the ablation chose inside), draws past
    # an end land on it, a point mass there that the probe comes to favour (docs/ablation.md, "The probe's
    # band at the ends of lambda's range")
    refine: float = 0.2  # share of the epochs at the end: lambda frozen, the probe trains at the learned rate
    min_rate: float = 0.25  # lowest rate lambda may reach (80 ms; OFA students are distilled on 20-90 ms,
    # and the edge of that range is the least trained)
    final_probe: FinalProbe = "fresh"  # the reported test metric: fresh, a new probe trained as a sweep
    # trains one (best dev epoch) on exact-length features at the learned rate, i.e. what rate.yaml
    # extracts, so it reads like a sweep's row; joint, the probe trained beside lambda (no extra
    # training; on speaker ID it read 4-13 points below the sweep at the same rate)
    seed: int = 0  # seeds splits, the probe, batches and the probe band
    level_db: float | Literal["auto"] | None = None  # scale each recording to this RMS level (dBFS)
    # before the student, as extract --level-db does (auto: the level it was distilled at);
    # rate.yaml then extracts at the same level
    device: str = "auto"  # the student, lambda and the probe (unless probe.device says otherwise)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> None:
        """Raise ValueError for settings that cannot work together."""
        check_device_name(self.device)
        if not 0 < self.init_rate <= 1:
            raise ValueError("init_rate must be in (0, 1]")
        if self.cost < 0:
            raise ValueError("cost (gamma) must be >= 0")
        if not 0 <= self.target_rate <= 1:
            raise ValueError("target_rate must be in [0, 1] (0: off)")
        if not 0 < self.difference_step <= 0.5 or not 0 <= self.probe_band <= 1:
            raise ValueError("difference_step must be in (0, 0.5] and probe_band in [0, 1]")
        if not 0 <= self.refine < 1 or self.lambda_warmup + self.refine >= 1:
            raise ValueError("refine must be in [0, 1) and lambda_warmup + refine below 1")
        if not 0 < self.min_rate < 1 or self.min_rate > self.init_rate:
            raise ValueError("min_rate must be in (0, 1) and at most init_rate")
        if any(not self.min_rate <= r <= 1 for r in self.restarts):
            raise ValueError(f"restarts must be rates from min_rate ({self.min_rate}) to 1, got "
                             f"{', '.join(f'{r:g}' for r in self.restarts)}")
        if self.restarts and self.final_probe != "fresh":
            raise ValueError("restarts picks a run by its fresh probe's dev metric: it needs final_probe fresh")
        if not 0 <= self.lambda_warmup < 1:
            raise ValueError("lambda_warmup must be in [0, 1)")
        if self.epochs < 1 or self.batch_size < 1 or self.lambda_lr <= 0:
            raise ValueError("epochs, batch_size and lambda_lr must be positive")
        if self.lambda_batch_size < 0:
            raise ValueError("lambda_batch_size must be >= 0 (0: batch_size)")
        if self.folds < 2:
            raise ValueError("folds must be at least 2 (lambda_data crossfit holds out one fold of them)")
        if self.lambda_loss == "metric" and self.lambda_grad != "difference":
            raise ValueError("lambda_loss metric has no gradient: it needs lambda_grad difference")
        check_level(self.level_db)

    @property
    def rate_cost(self) -> RateCost:
        """The compute term these settings add to the task term."""
        return RateCost(self.cost, self.cost_form, self.target_rate)


@dataclass(frozen=True)
class RateCost:
    """The compute term adapt adds to the expected error at frame ratio r (output frames per 20 ms
    input frame): ``gamma * log2(r)`` (gamma per halving), ``gamma * (r - 1)`` (gamma for the
    whole compute after the CNN), or ``gamma * |r - target_rate|`` when a target is set. Each is 0
    at rate 1 (or at the target), so objectives of either form read alike."""

    gamma: float
    form: CostForm  # AdaptConfig.cost_form holds the default
    target_rate: float = 0.0

    def __call__(self, ratio: Tensor) -> Tensor:
        """The term at ``ratio`` (any shape, differentiable)."""
        if self.target_rate > 0:
            return self.gamma * (ratio - self.target_rate).abs()
        if self.form == "linear":
            return self.gamma * (ratio - 1.0)
        return self.gamma * torch.log2(ratio.clamp(min=1e-4))


def band_draws(lam: Tensor, u: Tensor, band: float, top: float, edges: BandEdges) -> Tensor:
    """(B,) per-utterance lambdas for the probe around ``lam`` (B,) from uniform draws ``u`` in
    [0, 1): within +-``band`` of it and inside [0, top]. ``clamp`` moves the draws past an end onto
    it; ``inside`` spreads them uniformly over the part of the band inside the range."""
    if edges == "clamp":
        return (lam + (u * 2 - 1) * band).clamp(0.0, top)
    lo, hi = (lam - band).clamp(min=0.0), (lam + band).clamp(max=top)
    return lo + u * (hi - lo)


class LearnableLambda(torch.nn.Module):
    """lambda = top * sigmoid(theta), top <= LAMBDA_MAX: stays in [0, top) whatever the optimiser does."""

    def __init__(self, init: float, top: float = LAMBDA_MAX) -> None:
        super().__init__()
        self.top = min(float(top), LAMBDA_MAX)
        # off the sigmoid's flat ends: Adam moves theta by about lr per step, so a start at
        # rate 1 (lambda 0) would otherwise need hundreds of steps before lambda moves
        p = min(max(init / self.top, 0.02), 0.98)
        self.theta = torch.nn.Parameter(torch.tensor(float(np.log(p / (1 - p)))))

    def forward(self) -> Tensor:
        """The current lambda, a scalar tensor in [0, top)."""
        return self.top * torch.sigmoid(self.theta)


@dataclass
class AdaptResult:
    """What ``adapt`` learned: the rate and lambda, the test metric there, and the time it took."""

    out_dir: Path
    task: str
    metric: str
    test: float
    learned_lambda: float
    learned_rate: float
    frame_period_ms: float
    init_rate: float
    cost: float
    cost_form: str
    wall_seconds: float
    comparison: dict[str, Any] | None
    final_probe: str  # which probe ``test`` comes from (AdaptConfig.final_probe)
    joint_test: float  # the metric of the probe trained beside lambda (crossfit: the folds' mean), at the learned lambda
    final_probe_seconds: float  # features and training of the fresh probe (0 for joint)
    starts: list[dict[str, Any]] = field(default_factory=list)  # with restarts: each run's start, learned rate,
    # fresh probe dev metric and dev objective; the kept one is marked
    dev_resolution: dict[str, Any] | None = None  # the dev split's size and noise against the cost (dev_resolution)

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-safe data (``summary.json``, ``--json``)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _cnn_cache(student: Any, utts: list, device: torch.device, level_db: float | None = None) -> dict[str, Tensor]:
    """Layer-normed CNN features per utterance (the frozen part that does not depend on lambda),
    each recording scaled to ``level_db`` (dBFS) first when one is given."""
    out = {}
    with torch.no_grad():
        for u in utts:
            w = load_audio(u.path)
            w = (w if level_db is None else set_level(w, level_db))[None].to(device)
            f, n = student.cnn_features(w, torch.tensor([w.shape[1]], device=device))
            out[u.id] = f[0, : int(n[0])].half().cpu()
    return out


def _batch(ids: list[str], cache: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    xs = [cache[u].float() for u in ids]
    lengths = torch.tensor([len(x) for x in xs], device=device)
    return torch.nn.utils.rnn.pad_sequence(xs, batch_first=True).to(device), lengths


def run_adapt(cfg: AdaptConfig, ckpt: Path, corpus: str | Path | Corpus, out_dir: Path,
              compare_sweep: Path | None = None, progress: Progress | None = None) -> AdaptResult:
    """Train a probe and lambda together on a frozen once-for-all student, then test at the
    learned rate. Writes config.yaml, trajectory.jsonl/.png, rate.yaml and summary.json to
    ``out_dir``; ``compare_sweep`` adds where a sweep of the same task puts that rate."""
    from ofactl.pidlock import run_folder_lock

    with run_folder_lock(out_dir, "adapt", progress or NullProgress()):
        return _run_adapt(cfg, ckpt, corpus, out_dir, compare_sweep, progress)


def _run_adapt(cfg: AdaptConfig, ckpt: Path, corpus: str | Path | Corpus, out_dir: Path,
               compare_sweep: Path | None, progress: Progress | None) -> AdaptResult:
    """:func:`run_adapt` under its run folder's lock."""
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device if cfg.probe.device == "auto" else cfg.probe.device)  # before any folder
    compare: tuple[Path, str | None] | None = None
    if compare_sweep is not None:  # a bad --compare-sweep fails now, not after the training
        from ofactl.checkpoint import file_sha256

        sha = file_sha256(Path(ckpt)) if Path(ckpt).is_file() else None  # a missing one is load_student's error
        compare = (Path(compare_sweep), sha)
        sweep_rows_for(*compare, task=cfg.task)
    out_dir = make_dir(Path(out_dir))  # a bad --out fails now; config.yaml once the inputs are known good
    seed_all(cfg.seed)
    job = _setup_adapt(cfg, ckpt, corpus, device, progress)
    save_resolved(cfg, "adapt", out_dir / "config.yaml")
    job.train(progress)
    if not cfg.restarts:
        return _finish_adapt(job, _outcome(job), out_dir, compare, t0)
    runs = [(job, _outcome(job))]
    for rate in cfg.restarts:
        again = _restart(job, rate)
        again.train(progress)
        runs.append((again, _outcome(again)))
    best = min(range(len(runs)), key=lambda i: runs[i][1].dev_objective)
    starts = [{"init_rate": j.cfg.init_rate, "learned_rate": o.learned_rate, "dev": round(o.dev_metric, 5),
               "dev_objective": round(o.dev_objective, 5), "kept": i == best} for i, (j, o) in enumerate(runs)]
    return _finish_adapt(*runs[best], out_dir, compare, t0, starts)


def _restart(job: _AdaptJob, init_rate: float) -> _AdaptJob:
    """A new probe and lambda starting from ``init_rate``, on ``job``'s student, task and features:
    with the generators where the first run drew its probe, it is the run ``init_rate`` alone gives."""
    assert job.rng is not None  # set by _setup_adapt
    set_rng_state(job.rng)
    cfg = replace(job.cfg, init_rate=init_rate)
    lam, probes = _lambda_and_probes(cfg, job.student, job.task, job.device, len(job.splits))
    return _AdaptJob(cfg, job.student, job.task, job.cache, job.device, probes, lam, job.splits, job.level_db,
                     rng=job.rng)


def _setup_adapt(cfg: AdaptConfig, ckpt: Path, corpus: str | Path | Corpus, device: torch.device,
                 progress: Progress) -> _AdaptJob:
    """The frozen cif student, the task, its CNN features (computed once), probe and lambda."""
    from ofactl.checkpoint import load_student

    student, _ = load_student(Path(ckpt), device)
    if student.cfg.compressor != "cif":
        raise ConfigError(f"{ckpt}: adapt needs a once-for-all (cif) student, this one is {student.cfg.compressor}")
    level = level_for(cfg.level_db, student, str(ckpt))
    for p in student.parameters():
        p.requires_grad_(False)
    from ofactl.training import read_train_corpus

    cps = read_train_corpus(corpus, student.cfg.arch.conv_layers, progress=progress)  # too short for the CNN: a bad file
    task = build_task(cfg.task, cps, cfg.label_column or None, cfg.seed)
    if task.note():
        progress.log(str(task.note()))
    utts = [u for u in cps if u.id in set(task.ids)]
    splits = fold_ids(cfg, task)  # crossfit folds the corpus cannot fill fail before the features are computed
    progress.start("front-end features (computed once)", None)
    cache = _cnn_cache(student, utts, device, level)
    progress.finish()
    rng = rng_state()  # restarts draw their probe from here, so each is the run its init_rate alone gives
    lam, probes = _lambda_and_probes(cfg, student, task, device, len(splits))
    return _AdaptJob(cfg, student, task, cache, device, probes, lam, splits, level, rng=rng)


def _lambda_and_probes(cfg: AdaptConfig, student: Any, task: TaskData, device: torch.device,
                       count: int) -> tuple[LearnableLambda, list[Probe]]:
    """lambda at ``cfg.init_rate`` (bounded by ``cfg.min_rate``) and ``count`` new probes for
    ``task``, one per fold of :func:`fold_ids`."""
    alpha_mean = student.alpha_mean
    lam = LearnableLambda(float(rate_to_lambda(cfg.init_rate, alpha_mean)),
                          float(rate_to_lambda(cfg.min_rate, alpha_mean))).to(device)
    probes = [Probe(student.num_hidden, student.cfg.arch.embed_dim, task.n_outputs, task.kind, cfg.probe).to(device)
              for _ in range(count)]
    return lam, probes


def fold_ids(cfg: AdaptConfig, task: TaskData) -> list[tuple[list[str], list[str]]]:
    """The utterances each probe of the joint phase trains on and those lambda reads through it.

    lambda_data dev: one probe, (train, dev); train, or no dev split: (train, []), lambda reads
    the probe's own batch. crossfit: train and dev pooled, shuffled (seeded) and dealt into
    ``cfg.folds`` folds; probe k trains on the other folds and lambda reads fold k through it.
    The folds keep the dev split's kind of independence: where dev holds only speakers train
    lacks (``pr``, keywords), whole speakers are dealt; otherwise utterances, by label for
    utterance tasks so every class spreads over all of the folds."""
    train, dev = task.splits["train"], task.splits["dev"]
    if cfg.lambda_data != "crossfit":
        return [(train, dev if cfg.lambda_data == "dev" else [])]
    pool = train + dev
    if len(pool) < 2 * cfg.folds:
        raise ConfigError(f"adapt --task {task.task}: lambda_data crossfit needs at least two train and dev "
                          f"utterances per fold ({cfg.folds} folds), the corpus has {len(pool)}")
    order = [pool[i] for i in np.random.default_rng(cfg.seed).permutation(len(pool))]
    if task.dev_speakers_unseen:
        held = _deal_speakers(order, task, cfg.folds)
    else:
        if task.kind == "cls":
            order.sort(key=lambda u: task.labels[u])  # stable: shuffled within each label
        held = [order[k :: cfg.folds] for k in range(cfg.folds)]
    return [([u for j, h in enumerate(held) if j != k for u in h], held[k]) for k in range(cfg.folds)]


def _deal_speakers(order: list[str], task: TaskData, folds: int) -> list[list[str]]:
    """``order`` (shuffled utterance ids) cut into ``folds`` folds of whole speakers, each speaker
    (the largest first, ties in shuffled order) to the fold with the fewest utterances so far;
    each fold keeps the shuffled order, so lambda's batches mix its speakers."""
    by_speaker: dict[str, list[str]] = {}
    for u in order:
        by_speaker.setdefault(task.speakers[u], []).append(u)
    if len(by_speaker) < folds:
        raise ConfigError(f"adapt --task {task.task}: its dev split holds speakers that train lacks, so lambda_data "
                          f"crossfit deals whole speakers into folds and needs at least {folds} speakers in train "
                          f"and dev; the corpus has {len(by_speaker)}: set folds to {len(by_speaker)} or fewer")
    held: list[list[str]] = [[] for _ in range(folds)]
    for utts in sorted(by_speaker.values(), key=len, reverse=True):  # stable: shuffled order among equals
        min(held, key=len).extend(utts)
    rank = {u: i for i, u in enumerate(order)}
    return [sorted(h, key=rank.__getitem__) for h in held]


@dataclass
class _Fold:
    """One probe of the joint phase: what it trains on, what lambda reads through it (empty: the
    probe's own batch), its optimiser and the next held-out utterance."""

    train: list[str]
    held: list[str]
    probe: Probe
    opt: torch.optim.Optimizer
    pos: int = 0


@dataclass
class _AdaptJob:
    """The adapt loop's state: the probes (one per fold) and lambda with their optimisers, data
    order, trajectory."""

    cfg: AdaptConfig
    student: Any
    task: TaskData
    cache: dict[str, Tensor]
    device: torch.device
    probes: list[Probe]
    lam: LearnableLambda
    splits: list[tuple[list[str], list[str]]]  # fold_ids: what each probe trains on and what lambda reads through it
    level_db: float | None = None  # the level every recording was scaled to (dBFS); none: as recorded
    traj: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, Any] | None = None  # torch's generator states just before the probe was drawn (restarts start from them)

    def __post_init__(self) -> None:
        cfg, kind = self.cfg, self.task.kind
        lr = cfg.probe.ctc_lr if kind == "ctc" else cfg.probe.lr
        self.folds = [_Fold(train, held, p, torch.optim.Adam(p.parameters(), lr=lr))
                      for (train, held), p in zip(self.splits, self.probes, strict=True)]
        self.opt_lam = torch.optim.Adam(self.lam.parameters(), lr=cfg.lambda_lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    @property
    def held_out(self) -> list[str]:
        """Every utterance lambda reads through a probe that did not train on it (none: lambda
        reads the probe's own batches)."""
        return [u for f in self.folds for u in f.held]

    def train(self, progress: Progress) -> None:
        """Warm-up (probe only), joint (probe and lambda), refine (probe at the final lambda)."""
        cfg = self.cfg
        steps_per_epoch = min((len(f.train) + cfg.batch_size - 1) // cfg.batch_size for f in self.folds)
        warm = int(cfg.lambda_warmup * cfg.epochs * steps_per_epoch)
        refine_from = cfg.epochs - int(round(cfg.refine * cfg.epochs))
        progress.start("adapting the rate", cfg.epochs * steps_per_epoch)
        # CTC batches of like lengths, as a sweep's probe trains (pool 1: plain random batches);
        # utterance heads keep plain ones, as train_probe does
        pool = cfg.probe.sort_pool if self.task.kind == "ctc" else 1
        frames = {u: len(self.cache[u]) for f in self.folds for u in f.train}
        step = 0
        for epoch in range(cfg.epochs):
            refining = epoch >= refine_from
            per_fold = [bucketed_batches(f.train, frames, cfg.batch_size, pool, self.gen) for f in self.folds]
            for batches in zip(*per_fold):  # folds a batch apart in size: the shortest sets the epoch
                phase = "refine" if refining else ("joint" if step >= warm else "warmup")
                rec = self.step(list(batches), phase)
                step += 1
                self.traj.append({"step": step, "epoch": epoch + 1, **rec})
                progress.advance(1, lam=rec["lambda"], rate=rec["achieved_rate"], loss=rec["task_loss"])
        progress.finish()

    def step(self, batches: list[list[str]], phase: str) -> dict[str, Any]:
        """One step of each fold's probe on its batch and, in the joint phase, one lambda step on
        the mean of the folds' objectives; the log record."""
        cfg, lam = self.cfg, self.lam
        learn_lam, refining = phase == "joint", phase == "refine"
        lm = lam()
        joint = learn_lam and not self.held_out and cfg.lambda_grad == "pathwise"  # one loss trains both
        self.opt_lam.zero_grad()
        done = [self._probe_step(f, ids, lm, joint, refining) for f, ids in zip(self.folds, batches, strict=True)]
        mean_ratio, cost = _mean([d.mean_ratio for d in done]), _mean([d.cost for d in done])
        extra: dict[str, float] = {}
        if learn_lam and not joint:
            parts = [self._lambda_loss(f, d.ids, d.x, d.n, lm) for f, d in zip(self.folds, done, strict=True)]
            lam_loss, mean_ratio, cost = (_mean([p[i] for p in parts]) for i in range(3))
            self.opt_lam.zero_grad()
            (lam_loss + cost).backward()
            extra["lambda_loss"] = round(float(lam_loss.detach()), 5)
        if learn_lam:
            self.opt_lam.step()
        achieved = float(sum(d.out_frames for d in done) / sum(d.n.sum() for d in done))  # (a tensor quotient)
        return {"lambda": round(float(lm.detach()), 5), "expected_ratio": round(float(mean_ratio.detach()), 5),
                "achieved_rate": round(achieved, 5), "frame_period_ms": round(20.0 / max(achieved, 1e-6), 2),
                "task_loss": round(sum(d.loss for d in done) / len(done), 5), "cost": round(float(cost.detach()), 5),
                "phase": phase, **extra}

    def _probe_step(self, fold: _Fold, ids: list[str], lm: Tensor, joint: bool, refining: bool) -> _ProbeStep:
        """One step of ``fold``'s probe on ``ids`` at lambdas drawn within the band around ``lm``
        (at ``lm`` while refining); with ``joint`` the cost joins its loss and reaches lambda."""
        cfg = self.cfg
        x, n = _batch(ids, self.cache, self.device)
        lam_b = (lm if joint else lm.detach()).expand(len(ids))
        if cfg.probe_band > 0 and not refining:
            lam_b = band_draws(lam_b, torch.rand(len(ids), generator=self.gen).to(self.device), cfg.probe_band,
                               self.lam.top, cfg.band_edges)
        hidden, comp = self.student.encode(x, n, rate=None, lam=lam_b, exact=False)
        loss = task_loss(fold.probe, self.task, ids, hidden.states, hidden.lengths, charge_infeasible=True)
        fold.opt.zero_grad()
        if joint:
            mean_ratio, cost = _cost(cfg, comp.alpha_pred, lam_b, n)
            (loss + cost).backward()
        else:
            loss.backward()
            with torch.no_grad():  # for the log: the cost at the current lambda, not the probe's band
                mean_ratio, cost = _cost(cfg, comp.alpha_pred, lm.detach().expand(len(ids)), n)
        fold.opt.step()
        return _ProbeStep(ids, x, n, float(loss.detach()), hidden.lengths.sum(), mean_ratio, cost)

    def _lambda_loss(self, fold: _Fold, ids: list[str], x: Tensor, n: Tensor,
                     lm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The objective lambda follows through ``fold``'s probe: on its next held-out batch, or on
        ``ids`` (its own batch) when it holds none out."""
        cfg = self.cfg
        if fold.held:
            size = min(cfg.lambda_batch_size or cfg.batch_size, len(fold.held))
            ids = [fold.held[(fold.pos + i) % len(fold.held)] for i in range(size)]
            fold.pos += size
            x, n = _batch(ids, self.cache, self.device)
        return _lambda_objective(cfg, self.student, fold.probe, self.task, ids, x, n, lm, self.lam.top)


def _mean(values: list[Tensor]) -> Tensor:
    """The mean of scalar tensors, differentiable (one value: itself, to the last bit)."""
    return torch.stack(values).mean()


class _ProbeStep(NamedTuple):
    """What one probe step saw: its batch, the task loss, output frames, and the expected frame
    ratio and cost (at the current lambda; at the band's draws when they train lambda too)."""

    ids: list[str]
    x: Tensor
    n: Tensor
    loss: float
    out_frames: Tensor  # () integer count
    mean_ratio: Tensor
    cost: Tensor


@dataclass
class _Outcome:
    """Where one adapt run ended: lambda, the rate it gives on the test split, the joint probe's
    test metrics, and the fresh probe's result there (``final_probe: fresh``)."""

    final_lam: float
    learned_rate: float
    joint: dict[str, float]
    fresh: ProbeResult | None
    probe_seconds: float
    dev_metric: float = 0.0  # the fresh probe's dev metric (restarts compare runs by it)
    dev_objective: float = 0.0  # dev error plus the cost at the learned rate


def _outcome(job: _AdaptJob) -> _Outcome:
    """Evaluate ``job`` at its learned lambda, with a fresh probe when the settings ask for one."""
    cfg, task = job.cfg, job.task
    final_lam = float(job.lam().detach())
    joint, test_rate = _joint_test(job, final_lam)
    learned_rate = round(test_rate, 4)
    if cfg.final_probe != "fresh":
        return _Outcome(final_lam, learned_rate, joint, None, 0.0)
    t_probe = time.perf_counter()
    fresh = _fresh_probe(job, learned_rate)
    dev = fresh.dev[task.metric]
    objective = float(_objective(np.array(dev), task.higher_better, np.array(learned_rate), cfg.rate_cost))
    return _Outcome(final_lam, learned_rate, joint, fresh, time.perf_counter() - t_probe, dev, objective)


def _finish_adapt(job: _AdaptJob, out: _Outcome, out_dir: Path, compare: tuple[Path, str | None] | None, t0: float,
                  starts: list[dict[str, Any]] | None = None) -> AdaptResult:
    """Write the kept run's trajectory.jsonl/.png, rate.yaml and summary.json."""
    cfg, task = job.cfg, job.task
    test_metric = out.joint if out.fresh is None else out.fresh.test
    write_text(out_dir / "trajectory.jsonl", "".join(json.dumps(rec) + "\n" for rec in job.traj))
    _plot(job.traj, out_dir / "trajectory.png", task.task)
    write_text(out_dir / "rate.yaml",
        f"description: rate learned by 'ofactl adapt --task {task.task}' (lambda {out.final_lam:.4f}, "
        f"cost {cfg.cost} {cfg.cost_form}); use with 'ofactl extract -c {out_dir / 'rate.yaml'}'\n"
        f"extract:\n  rates: [{out.learned_rate}]\n" + ("" if job.level_db is None else f"  level_db: {job.level_db}\n"))
    comparison = compare_with_sweep(compare[0], task, out.learned_rate, test_metric[task.metric],
                                    time.perf_counter() - t0, cfg.rate_cost, ckpt_sha=compare[1]) if compare else None
    # lambda read held-out batches (dev, or crossfit's folds); read on train batches, no split set the rate
    resolution = (dev_resolution(task, _held_out_metric(job, out), cfg.rate_cost, job.held_out, cfg.lambda_data)
                  if job.held_out else None)
    res = AdaptResult(out_dir, task.task, task.metric, round(test_metric[task.metric], 5), round(out.final_lam, 5),
                      out.learned_rate, round(20.0 / out.learned_rate, 2), cfg.init_rate, cfg.cost, cfg.cost_form,
                      time.perf_counter() - t0, comparison, cfg.final_probe,
                      round(out.joint[task.metric], 5), round(out.probe_seconds, 2), starts or [], resolution)
    write_text(out_dir / "summary.json", json.dumps(res.to_json(), indent=2))
    return res


def _held_out_metric(job: _AdaptJob, out: _Outcome) -> float:
    """The metric at the learned rate on the utterances lambda read: with lambda_data dev, the dev
    metric of the probe ``test`` comes from (the fresh probe's, or the joint probe's at the learned
    lambda); with crossfit, each fold's probe on its own held-out fold, scored as one set."""
    if out.fresh is not None and job.cfg.lambda_data == "dev":
        return out.dev_metric
    preds: list[Any] = []
    for f in job.folds:
        preds += _predict(job.student, [f.probe], job.task, f.held, job.cache, out.final_lam, job.device, job.cfg)[0][0]
    return score(job.task, job.held_out, preds)[job.task.metric]


def _joint_test(job: _AdaptJob, lam: float) -> tuple[dict[str, float], float]:
    """The test metrics of the probes trained beside lambda, at ``lam`` (crossfit: the mean over
    the folds' probes, each trained on all but one fold), and the rate achieved there (lambda
    alone sets the frames, so every probe sees the same rate)."""
    each, rate = _evaluate(job.student, [f.probe for f in job.folds], job.task, job.task.splits["test"], job.cache,
                           lam, job.device, job.cfg)
    return {k: float(np.mean([m[k] for m in each])) for k in each[0]}, rate


def _fresh_probe(job: _AdaptJob, rate: float) -> ProbeResult:
    """A new probe trained as ``sweep`` trains one (``train_probe``: best dev epoch) on
    exact-length features at ``rate``, the features ``rate.yaml`` extracts: its dev and test metrics."""
    feats: dict[str, np.ndarray] = {}
    ids = [u for s in ("train", "dev", "test") for u in job.task.splits[s]]
    with torch.no_grad():
        for k in range(0, len(ids), job.cfg.batch_size):
            b = ids[k : k + job.cfg.batch_size]
            x, n = _batch(b, job.cache, job.device)
            hidden, _ = job.student.encode(x, n, rate=rate, exact=True)
            for u, h, m in zip(b, hidden.states, hidden.lengths.tolist(), strict=True):
                feats[u] = h[:m].float().cpu().numpy()
    frames = {u: len(job.cache[u]) for u in ids}
    return train_probe(job.task, feats, job.cfg.probe, frames)


def _lambda_objective(cfg: AdaptConfig, student: Any, probe: Probe, task: TaskData, ids: list[str], x: Tensor,
                      n: Tensor, lm: Tensor, top: float) -> tuple[Tensor, Tensor, Tensor]:
    """The task-loss term whose gradient moves lambda, the mean expected ratio and the cost.

    difference: the task loss at lambda +- h (no autograd), turned into a surrogate whose
    gradient in lambda is the central-difference slope. It sees the frames that appear and vanish
    between the two points, which the pathwise gradient cannot. pathwise: autograd through the
    CIF weights at lambda. The cost term is always differentiated through the CIF weights.
    """
    soft = cfg.lambda_loss == "error"
    norm = getattr(probe, "pool_norm", None)
    if norm is not None:
        norm.eval()  # these batches' statistics stay out of the probe (an RNN must stay in train mode)
    try:
        if cfg.lambda_grad == "pathwise":
            hidden, comp = student.encode(x, n, rate=None, lam=lm.expand(len(ids)), exact=False)
            mean_ratio, cost = _cost(cfg, comp.alpha_pred, lm.expand(len(ids)), n)
            return task_loss(probe, task, ids, hidden.states, hidden.lengths, charge_infeasible=True,
                             soft_error=soft), mean_ratio, cost
        with torch.no_grad():
            hi = (lm.detach() + cfg.difference_step).clamp(max=top)
            lo = (lm.detach() - cfg.difference_step).clamp(min=0.0)
            losses = []
            for point in (hi, lo):
                hidden, comp = student.encode(x, n, rate=None, lam=point.expand(len(ids)), exact=False)
                losses.append(_metric_error(probe, task, ids, hidden) if cfg.lambda_loss == "metric" else
                              task_loss(probe, task, ids, hidden.states, hidden.lengths, charge_infeasible=True,
                                        soft_error=soft))
            slope = (losses[0] - losses[1]) / (hi - lo).clamp(min=1e-6)
        mean_ratio, cost = _cost(cfg, comp.alpha_pred, lm.expand(len(ids)), n)
        return (losses[0] + losses[1]) / 2 + slope * (lm - lm.detach()), mean_ratio, cost
    finally:
        if norm is not None:
            norm.train()


def _metric_error(probe: Probe, task: TaskData, ids: list[str], hidden: Any) -> Tensor:
    """The task's metric on a batch as an error (1 - accuracy, or PER / WER as it is), a scalar
    tensor: what a sweep reports, by greedy decoding; an utterance with too few frames for its
    label loses the tokens it cannot emit."""
    out = probe(hidden.states, hidden.lengths)
    m = score(task, ids, decode(task, out, hidden.lengths))[task.metric]
    return out.new_tensor(1.0 - m if task.higher_better else m)


def _cost(cfg: AdaptConfig, alpha_pred: Tensor, lam: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Mean expected frame ratio (differentiable in lambda) and the compute cost term.

    ``alpha_pred`` (B, S) is the predictor's unmixed alpha, which does not depend on lambda, so
    any encode of the batch provides it; mixed with ``lam`` (B,) it is the CIF plan's alpha.
    """
    valid = length_mask(n, alpha_pred.shape[1]).float()
    alpha = mix_alpha(alpha_pred, lam)
    mean_ratio = ((alpha * valid).sum(1) / n.float()).mean()  # expected frames / input frames
    return mean_ratio, cfg.rate_cost(mean_ratio)


def _evaluate(student: Any, probes: list[Probe], task: TaskData, ids: list[str], cache: dict[str, Tensor], lam: float,
              device: torch.device, cfg: AdaptConfig) -> tuple[list[dict[str, float]], float]:
    """Each of ``probes``' metrics on ``ids`` at ``lam`` (content-adaptive lengths) and the rate
    achieved there."""
    preds, rate = _predict(student, probes, task, ids, cache, lam, device, cfg)
    return [score(task, ids, p) for p in preds], rate


@torch.no_grad()
def _predict(student: Any, probes: list[Probe], task: TaskData, ids: list[str], cache: dict[str, Tensor], lam: float,
             device: torch.device, cfg: AdaptConfig) -> tuple[list[list[Any]], float]:
    """Each of ``probes``' decoded outputs for ``ids`` at ``lam`` (the student runs once per batch
    for all of them) and the rate achieved there (output frames per input frame)."""
    for probe in probes:
        probe.eval()
    preds: list[list[Any]] = [[] for _ in probes]
    frames = inputs = 0
    for k in range(0, len(ids), cfg.batch_size):
        b = ids[k : k + cfg.batch_size]
        x, n = _batch(b, cache, device)
        hidden, _ = student.encode(x, n, rate=None, lam=torch.full((len(b),), lam, device=device), exact=False)
        frames += int(hidden.lengths.sum())
        inputs += int(n.sum())
        for probe, out in zip(probes, preds, strict=True):
            out += decode(task, probe(hidden.states, hidden.lengths), hidden.lengths)
    for probe in probes:
        probe.train()
    return preds, frames / max(inputs, 1)


def sweep_rows_for(path: Path, ckpt_sha: str | None = None, *, task: str) -> list[SweepRow]:
    """The rows of task ``task`` in a sweep folder (its sweep.json) or a sweep.json, by achieved
    rate; with ``ckpt_sha``, only that checkpoint's (a sweep may compare several students)."""
    from ofactl.sweep import load_rows

    p = Path(path)
    doc = p / "sweep.json" if p.is_dir() else p
    try:
        rows = load_rows(doc)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, ConfigError) as e:
        why = "not found" if isinstance(e, FileNotFoundError) else f"unreadable ({type(e).__name__}: {e})"
        raise ConfigError(f"--compare-sweep {path}: {doc} {why}; expected a sweep folder or its sweep.json") from None
    rows = sorted((r for r in rows if r.task == task), key=lambda r: r.achieved_rate)
    if not rows:
        raise ConfigError(f"--compare-sweep {path}: no rows for task {task}")
    mine = [r for r in rows if ckpt_sha is None or r.checkpoint_sha256 == ckpt_sha]
    if not mine:
        labels = ", ".join(sorted({r.label for r in rows}))
        raise ConfigError(f"--compare-sweep {path}: its {task} rows are of other checkpoints ({labels}), "
                          f"not of this one (sha256 {str(ckpt_sha)[:12]}...); sweep this checkpoint to compare")
    return mine


def item_count(task: TaskData, ids: list[str]) -> int:
    """What the metric on ``ids`` counts: utterances (accuracy) or reference tokens (error rates)."""
    return len(ids) if task.kind == "cls" else sum(len(task.labels[u]) for u in ids)


def binomial_se(p: float, n: int) -> float:
    """The binomial standard error of a proportion ``p`` measured on ``n`` items (accuracy or error rate)."""
    return float(np.sqrt(max(p * (1 - p), 0.0) / max(n, 1)))


def dev_resolution(task: TaskData, dev_metric: float, cost: RateCost, held: list[str] | None = None,
                   source: LambdaData = "dev") -> dict[str, Any] | None:
    """How finely the held-out utterances adapt reads its rate from resolve the cost: their count
    (utterances or reference tokens), the metric there at the learned rate and its binomial
    standard error (Agresti-Coull), whether two of those stay within the cost (gamma), and a note
    when they do not: then a flat stretch of the curve is level within the split's noise and the
    learned rate can follow it (docs/method.md, "How finely the dev split resolves the cost").
    ``held``: the dev split (None) or, with ``source`` crossfit, every fold's held-out utterances.
    None without any or with a target rate."""
    n = item_count(task, task.splits["dev"] if held is None else held)
    if n == 0 or cost.target_rate > 0:
        return None
    # Agresti-Coull (two more right and two more wrong): a small split scored all right or all wrong
    # has no error of zero
    se = binomial_se((dev_metric * n + 2) / (n + 4), n + 4)
    unit = "utterances" if task.kind == "cls" else "reference tokens"
    resolves = bool(2 * se <= cost.gamma)
    where = "held-out (crossfit)" if source == "crossfit" else "dev"
    crossfit = "--set lambda_data=crossfit holds out every train and dev utterance once, which can"
    remedy = ("more labelled utterances would" if source == "crossfit" else
              # sid splits each speaker's utterances 80/10/10 whatever the manifest's split column says
              f"speaker ID keeps a tenth of each speaker's utterances for dev, and {crossfit}" if task.task == "sid"
              else f"a split column in the manifest can give dev more, or {crossfit}")
    note = None if resolves else (
        f"adapt --task {task.task} read its rate from {n} {where} {unit}: two standard errors of the {where} "
        f"{task.metric} there ({200 * se:.1f} points) exceed the cost ({100 * cost.gamma:g} points), so where "
        f"the curve is flat the learned rate can follow the split's noise; {remedy} resolve it (docs/method.md)")
    return {"dev_count": n, "unit": unit, "held_out": source, "dev_metric": round(dev_metric, 5),
            "standard_error": round(se, 5), "cost": cost.gamma, "resolves_cost": resolves, "note": note}


def compare_with_sweep(path: Path, task: TaskData, rate: float, metric: float, adapt_s: float,
                       cost: RateCost | None = None, ckpt_sha: str | None = None) -> dict[str, Any]:
    """Where the learned rate falls on a sweep of the same task, and what each cost.

    The near-flat region is where the sweep curve (linearly interpolated between its rates) is
    within ``tolerance`` of its best value: 2 points, or two binomial standard errors of the best
    value on this test set (utterances for accuracy, reference tokens for error rates), whichever
    is larger, so that test-set noise alone does not shrink the region to one point.

    With ``cost``, also what adapt minimises, on the same curve: the error (1 - accuracy) plus
    the rate cost; ``objective_gap`` is its value at the learned rate minus its lowest. With
    ``ckpt_sha``, only that checkpoint's rows form the curve.

    ``dev_choice_*``: the swept rate a grid search picks without seeing the test split (the lowest
    dev objective, or the best dev metric without a cost), its test metric and whether that lies
    in the near-flat region: what adapt is up against, since both choose on dev.
    """
    rows = sweep_rows_for(path, ckpt_sha, task=task.task)
    xs = [r.achieved_rate for r in rows]
    ys = [r.test for r in rows]
    best = max(ys) if task.higher_better else min(ys)
    tol = max(0.02, 2.0 * binomial_se(best, item_count(task, task.splits["test"])))

    def near(y: float) -> bool:
        return (best - y if task.higher_better else y - best) <= tol + 1e-12

    # the flat region on a fine grid of the interpolated curve, within the swept range
    grid = np.linspace(xs[0], xs[-1], 401)
    flat = [float(g) for g in grid if near(float(np.interp(g, xs, ys)))]
    at_rate = float(np.interp(rate, xs, ys))
    in_range = xs[0] - 0.01 <= rate <= xs[-1] + 0.01  # the sweep's achieved rates round a little
    objective = {} if cost is None else _objective_on_curve(grid, xs, ys, task.higher_better, rate, cost)
    pick = _dev_choice(rows, task.higher_better, cost)
    return objective | {
        "sweep_rates": xs, "sweep_metric": ys, "sweep_at_learned_rate": round(at_rate, 5),
        "adapt_metric": metric, "best_sweep_metric": best, "tolerance": round(tol, 4),
        "near_flat_region": [round(min(flat), 4), round(max(flat), 4)] if flat else None,
        "learned_rate_in_flat_region": bool(in_range and near(at_rate)),
        "sweep_dev_metric": [r.dev for r in rows], "dev_choice_rate": pick.achieved_rate,
        "dev_choice_test": pick.test, "dev_choice_in_flat_region": near(pick.test),
        "sweep_probe_trainings": len(rows), "adapt_probe_trainings": 1,
        "sweep_probe_seconds": round(sum(r.probe_train_s for r in rows), 2),
        "adapt_seconds": round(adapt_s, 2),
    }


def _dev_choice(rows: list[SweepRow], higher_better: bool, cost: RateCost | None) -> SweepRow:
    """The row of ``rows`` (by rate, ascending) a grid search on the dev split picks: the lowest
    dev error plus ``cost`` at its rate (the best dev metric without a cost); a tie goes to the
    higher rate."""
    dev = np.array([r.dev for r in rows])
    rates = np.array([r.achieved_rate for r in rows])
    score = _objective(dev, higher_better, rates, cost or RateCost(0.0, "linear"))  # no cost: the dev error alone
    return rows[len(rows) - 1 - int(np.argmin(score[::-1]))]


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
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def _objective(metric: np.ndarray, higher_better: bool, rate: np.ndarray, cost: RateCost) -> np.ndarray:
    """What adapt minimises, for metric values at rates: the error (1 - accuracy, or the error
    rate itself) plus the rate cost."""
    err = 1.0 - metric if higher_better else metric
    return err + cost(torch.as_tensor(rate, dtype=torch.float64)).numpy()


def _objective_on_curve(grid: np.ndarray, xs: list[float], ys: list[float], higher_better: bool, rate: float,
                        cost: RateCost) -> dict[str, Any]:
    """adapt's objective (error + rate cost) along an interpolated sweep curve: its lowest value
    and rate, its value at ``rate`` and the gap between the two (0 when adapt found the best)."""
    def objective(r: np.ndarray) -> np.ndarray:
        return _objective(np.interp(r, xs, ys), higher_better, r, cost)

    along = objective(grid)
    at = float(objective(np.array([min(max(rate, xs[0]), xs[-1])]))[0])
    best = int(np.argmin(along))
    return {"objective_at_learned_rate": round(at, 5), "best_objective": round(float(along[best]), 5),
            "best_objective_rate": round(float(grid[best]), 4), "objective_gap": round(at - float(along[best]), 5)}
