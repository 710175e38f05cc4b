"""The discrete units ``pretrain`` predicts: the frame features they cluster (MFCC, or a layer of
an earlier model), the k-means fit on a sample, the assignment of every utterance, and its cache
(``unit-targets.npz``).

Reading and featurising the audio is the slow part at scale (LibriSpeech's 960 h at about 500x
real time on one core, ``benchmarks/unit_targets_bench.py``, is some 2 hours), so it is spread two
ways, with the same result as one process reading every file in turn:

- over ``num_workers`` DataLoader processes of each rank: MFCC features are computed, and their
  units assigned, in the workers; for ``layer:N`` targets the workers read the audio and the
  earlier model runs in the main process, on the rank's device;
- under torchrun, over the ranks: rank r takes every world-th utterance from the r-th, and the
  ranks gather what they made (every rank needs every utterance's units to train). The
  assignment gathers in rounds of :data:`ROUND` utterances per rank, so a stop keeps the rounds
  gathered, and a recording that cannot be read stops every rank in the same round, with that
  recording's own message.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ofactl.atomic import atomic_path
from ofactl.audio import Utterance, load_audio
from ofactl.errors import ConfigError, OfactlError
from ofactl.model.blocks import HubertArch, cnn_lengths
from ofactl.progress import Progress, worker_init
from ofactl.runtime import SAMPLE_RATE

if TYPE_CHECKING:
    from ofactl.pretrain import PretrainConfig

TARGETS_FILE = "unit-targets.npz"
TARGETS_VERSION = 1  # raised when the features or the assignment change, so older files are not read
ROUND = 256  # utterances each rank assigns between two gathers (what a stop can lose per rank)


@dataclass(frozen=True)
class Shard:
    """This process's part of the work: rank ``rank`` of ``world`` (torchrun), every world-th
    utterance from the rank-th."""

    rank: int = 0
    world: int = 1

    def of(self, items: list[Any]) -> list[Any]:
        """This rank's items: ``items[rank::world]``."""
        return items[self.rank :: self.world]


ONE = Shard()


def parse_targets(spec: str) -> int | None:
    """``mfcc`` -> None; ``layer:N`` -> N."""
    if spec == "mfcc":
        return None
    if spec.startswith("layer:"):
        try:
            return int(spec.split(":", 1)[1])
        except ValueError:
            pass
    raise ConfigError(f"--targets {spec!r}: expected mfcc or layer:N (with --from CKPT)")


# ----------------------------------------------------------------------------- features
def mfcc_features(wav: Tensor, n_frames: int) -> Tensor:
    """(N,) 16 kHz samples -> (n_frames, 39) MFCC + deltas + delta-deltas on the 20 ms grid."""
    import torchaudio

    if len(wav) < 400:
        return torch.zeros(n_frames, 39)
    m = torchaudio.compliance.kaldi.mfcc(wav[None] * 32768.0, num_ceps=13, frame_length=25.0, frame_shift=10.0,
                                         sample_frequency=float(SAMPLE_RATE), dither=0.0)  # (F, 13), F at 100 Hz
    d1 = torchaudio.functional.compute_deltas(m.T)
    d2 = torchaudio.functional.compute_deltas(d1)
    x = torch.cat([m.T, d1, d2]).T[::2]  # frame 2t starts at sample 320 t, like CNN frame t
    if len(x) < n_frames:
        x = torch.cat([x, x[-1:].expand(n_frames - len(x), -1)])
    return x[:n_frames]


def _frames(arch: HubertArch, n_samples: int) -> int:
    """The model's frame count for ``n_samples`` of 16 kHz audio."""
    return int(cnn_lengths(arch, torch.tensor([n_samples]))[0])


class FeatureSource:
    """Frame features on the 20 ms grid for units: MFCC, or a layer of an earlier model."""

    def __init__(self, cfg: PretrainConfig, device: torch.device, trust: bool = False) -> None:
        self.layer = parse_targets(cfg.targets)
        self.arch = cfg.arch
        self.device = device
        self.model: Any = None
        if self.layer is not None:
            self.model = _load_earlier(cfg, device, trust)
            if not 0 <= self.layer < self.model.num_hidden:
                raise ConfigError(f"--targets {cfg.targets}: {cfg.from_ckpt} has hidden states "
                                  f"0..{self.model.num_hidden - 1}")

    def to(self, device: torch.device) -> FeatureSource:
        """Run the earlier model of ``layer:N`` targets on ``device`` (the run's, once known: on a
        GPU, iteration 2's features for a large corpus take minutes instead of CPU days)."""
        if self.model is not None:
            self.model = self.model.to(device)
        self.device = device
        return self

    @torch.no_grad()
    def from_wav(self, wav: Tensor) -> Tensor:
        """(N,) 16 kHz samples -> the features to cluster, (T, D) on the model's 20 ms grid."""
        n = _frames(self.arch, len(wav))
        if self.layer is None:
            return mfcc_features(wav, n)
        h = self.model(wav[None].to(self.device), torch.tensor([len(wav)], device=self.device))
        return h.states[0, :n, self.layer].float().cpu()

    def __call__(self, utt: Utterance) -> Tensor:
        """The features of one utterance: (T, D) on the model's 20 ms frame grid."""
        return self.from_wav(load_audio(utt.path))


def _load_earlier(cfg: PretrainConfig, device: torch.device, trust: bool) -> Any:
    from ofactl.model.teacher import load_teacher

    if not cfg.from_ckpt:
        raise ConfigError(f"--targets {cfg.targets} needs --from CKPT (the earlier model, e.g. "
                          "RUN/teacher.safetensors of the mfcc iteration)")
    src = Path(cfg.from_ckpt)
    spec = src / "teacher.safetensors" if src.is_dir() else src
    model = load_teacher(spec, trust=trust)
    if asdict(model.arch) != asdict(cfg.arch):
        theirs, ours = model.arch, cfg.arch
        raise ConfigError(f"--from {cfg.from_ckpt}: another architecture ({theirs.num_layers} layers of "
                          f"{theirs.embed_dim}-d, CNN {theirs.conv_layers[0][0]} channels) than this run's "
                          f"({ours.num_layers} x {ours.embed_dim}-d, CNN {ours.conv_layers[0][0]}); "
                          "iteration 2 keeps the architecture: set arch to match")
    return model.to(device)


class _Reads(torch.utils.data.Dataset):
    """Utterance i -> (i, what a worker makes of it): its MFCC features, or their units given
    ``units``; for ``layer:N`` targets the waveform, for the model in the main process; for a
    recording that cannot be read, its error (raised by the main process, with its own message)."""

    def __init__(self, utts: list[Utterance], arch: HubertArch, mfcc: bool, units: Units | None) -> None:
        self.utts, self.arch, self.mfcc, self.units = utts, arch, mfcc, units

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        try:
            wav = load_audio(self.utts[i].path)
        except OfactlError as e:
            return i, e
        if not self.mfcc:
            return i, wav
        x = mfcc_features(wav, _frames(self.arch, len(wav)))
        return i, x if self.units is None else self.units.assign(x)


def _as_is(item: Any) -> Any:
    """The DataLoader's collate for single items: leave numpy arrays as they are."""
    return item


def computed(utts: list[Utterance], source: FeatureSource, units: Units | None, workers: int
             ) -> Iterator[tuple[Utterance, Any]]:
    """``(utterance, result)`` in order: features (T, D), or units (T,) int16 given ``units``,
    made by ``workers`` processes (0: this one); an unreadable recording's result is its error."""
    reads = _Reads(utts, source.arch, source.layer is None, units)
    loader = torch.utils.data.DataLoader(reads, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                         worker_init_fn=worker_init() if workers else None)
    for i, got in loader:
        if source.layer is not None and isinstance(got, Tensor):  # the waveform: the model runs here
            got = source.from_wav(got)
            got = got if units is None else units.assign(got)
        yield utts[i], got


# ----------------------------------------------------------------------------- ranks
def _all_gather(obj: Any, shard: Shard) -> list[Any]:
    """Every rank's ``obj``, in rank order (this one's alone outside torchrun)."""
    if shard.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * shard.world
    dist.all_gather_object(out, obj)
    return out


def _raise_first(errors: list[OfactlError | None]) -> None:
    """Raise the first rank's error, if any rank had one: every rank raises the same, which
    names the recording."""
    for e in errors:
        if e is not None:
            raise e


def _interleaved(parts: list[list[Any]]) -> list[Any]:
    """Undo :meth:`Shard.of`: rank r's j-th item was item ``j * world + r``."""
    world = len(parts)
    out: list[Any] = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


# ----------------------------------------------------------------------------- k-means
@dataclass
class Units:
    """k-means on a feature sample: centroids (K, D) over standardised features."""

    centroids: Tensor
    mean: Tensor
    std: Tensor
    targets: str

    def assign(self, x: Tensor) -> np.ndarray:
        """Standardise x (N, D) and return each row's nearest unit (N,) as int16."""
        from ofactl.model.segment import assign_units

        return assign_units((x - self.mean) / self.std, self.centroids).numpy().astype(np.int16)

    def save(self, path: Path) -> None:
        """Write centroids, standardisation and the target spec to a safetensors file."""
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({"centroids": self.centroids.contiguous(), "mean": self.mean, "std": self.std}, str(tmp),
                      metadata={"targets": self.targets})

    @classmethod
    def load(cls, path: Path) -> Units:
        """Read units written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors file, not a dict
            meta = f.metadata() or {}
        return cls(t["centroids"], t["mean"], t["std"], meta.get("targets", ""))


def fit_units(cfg: PretrainConfig, utts: list[Utterance], source: FeatureSource, progress: Progress,
              shard: Shard = ONE) -> Units:
    """k-means++ and Lloyd iterations on up to ``kmeans_frames`` frames of ``kmeans_utts``
    utterances drawn with the run's seed (deterministic; the same for any number of workers and
    ranks). Under torchrun the ranks featurise their shares, rank 0 alone fits (k-means on
    every rank at once would share one machine's cores N ways) and sends its units to all."""
    rng = np.random.default_rng(cfg.seed)
    pick = sorted(rng.choice(len(utts), size=min(cfg.kmeans_utts, len(utts)), replace=False).tolist())
    mine = _features(shard.of([utts[i] for i in pick]), source, cfg.num_workers, progress,
                     f"k-means units of {cfg.targets}")
    x = _sampled_frames(mine, cfg, shard)
    fitted: Units | OfactlError | None = None
    if shard.rank == 0:
        try:
            fitted = _fit(x, cfg)
        except OfactlError as e:  # said by every rank, which all wait for rank 0's units
            fitted = e
    fitted = _from_rank_0(fitted, shard)
    _raise_first([fitted if isinstance(fitted, OfactlError) else None])
    assert isinstance(fitted, Units)
    return fitted


def _fit(x: Tensor | None, cfg: PretrainConfig) -> Units:
    """k-means of the standardised frames x (N, D)."""
    from ofactl.model.segment import kmeans

    assert x is not None
    if len(x) < cfg.n_units:
        raise ConfigError(f"n_units={cfg.n_units} is more than the {len(x)} frames sampled for k-means "
                          f"(kmeans_utts={cfg.kmeans_utts}); use fewer units or more audio")
    mean, std = x.mean(0), x.std(0).clamp(min=1e-5)
    cent = kmeans((x - mean) / std, cfg.n_units, iters=cfg.kmeans_iters, seed=cfg.seed)
    return Units(cent, mean, std, cfg.targets)


def _from_rank_0(obj: Any, shard: Shard) -> Any:
    """Rank 0's ``obj`` on every rank (this one's outside torchrun)."""
    if shard.world == 1:
        return obj
    import torch.distributed as dist

    sent = [obj]
    dist.broadcast_object_list(sent, src=0)
    return sent[0]


def _features(utts: list[Utterance], source: FeatureSource, workers: int, progress: Progress, title: str
              ) -> list[Tensor] | OfactlError:
    """This rank's features for k-means (its progress counts its share), or the error of the
    first recording it could not read (raised once the ranks have gathered, so that none waits
    for another that has stopped)."""
    progress.start(title, len(utts))
    feats: list[Tensor] = []
    for _, got in computed(utts, source, None, workers):
        if isinstance(got, OfactlError):
            progress.finish()
            return got
        feats.append(got)
        progress.advance(1)
    progress.finish()
    return feats


def _sampled_frames(mine: list[Tensor] | OfactlError, cfg: PretrainConfig, shard: Shard) -> Tensor | None:
    """On rank 0, the frames k-means fits, (N, D): every frame of the picked utterances, or
    ``kmeans_frames`` of them drawn with the seed, in utterance order (each rank sends only its
    kept rows); None on the other ranks."""
    told = _all_gather(mine if isinstance(mine, OfactlError) else [len(f) for f in mine], shard)
    _raise_first([t if isinstance(t, OfactlError) else None for t in told])
    assert not isinstance(mine, OfactlError)
    lengths = _interleaved(told)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    keep = None
    if total > cfg.kmeans_frames:
        keep = torch.randperm(total, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.kmeans_frames].sort().values
    kept = []
    for j, f in zip(range(shard.rank, len(lengths), shard.world), mine, strict=True):
        if keep is None:
            kept.append(f)
        else:
            lo, hi = int(ends[j]) - len(f), int(ends[j])
            rows = keep[torch.searchsorted(keep, lo):torch.searchsorted(keep, hi)] - lo
            kept.append(f[rows])
    parts = _to_rank_0(kept, shard)
    if parts is None:
        return None
    rows_all = _interleaved(parts)
    return torch.cat(rows_all) if rows_all else torch.zeros(0, 39)


def _to_rank_0(obj: Any, shard: Shard) -> list[Any] | None:
    """Every rank's ``obj`` in rank order, on rank 0; None on the others."""
    if shard.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * shard.world if shard.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# ----------------------------------------------------------------------------- assignment
def unit_targets(utts: list[Utterance], units: Units, source: FeatureSource, progress: Progress,
                 into: dict[str, np.ndarray] | None = None, shard: Shard = ONE,
                 workers: int = 0) -> dict[str, np.ndarray]:
    """Units of every utterance (T frames each, int16), added to ``into`` (or a new dict) round
    by round (outside torchrun: one utterance at a time), so that a stop part way keeps those
    assigned. Under torchrun each rank assigns its share and every rank ends with all of them."""
    out = {} if into is None else into
    mine = shard.of(utts)
    rounds = math.ceil(math.ceil(len(utts) / shard.world) / ROUND)  # the same on every rank
    made = computed(mine, source, units, workers)
    progress.start("assigning units", len(utts))
    for r in range(rounds):
        n = len(mine[r * ROUND:(r + 1) * ROUND])
        part = out if shard.world == 1 else {}
        error = _assign_round(made, n, part)
        told = [(part, error)] if shard.world == 1 else _all_gather((part, error), shard)
        for p, _ in told:
            if p is not out:
                out.update(p)
        progress.advance(sum(len(p) for p, _ in told) if shard.world > 1 else n)
        _raise_first([e for _, e in told])
    progress.finish()
    return out


def _assign_round(made: Iterator[tuple[Utterance, Any]], n: int, into: dict[str, np.ndarray]
                  ) -> OfactlError | None:
    """Take ``n`` results of ``made`` into ``into``; the error of the first unreadable one stops it."""
    for _ in range(n):
        utt, got = next(made)
        if isinstance(got, OfactlError):
            return got
        into[utt.id] = got
    return None


def targets_key(units: Units, utts: list[Utterance], from_ckpt: str | None) -> str:
    """What a run's unit targets depend on: the units, the utterances (id, path, length) and the
    model a ``layer:N`` target reads."""
    from ofactl.config import doc_sha

    h = hashlib.sha256()
    for t in (units.centroids, units.mean, units.std):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return doc_sha({"version": TARGETS_VERSION, "units": h.hexdigest(), "targets": units.targets,
                    "from": from_ckpt, "utts": [(u.id, str(u.path), u.n_samples) for u in utts]})


def cached_unit_targets(utts: list[Utterance], units: Units, source: FeatureSource, path: Path, key: str,
                        write: bool, progress: Progress, shard: Shard = ONE,
                        workers: int = 0) -> dict[str, np.ndarray]:
    """:func:`unit_targets`, kept in ``path`` (``unit-targets.npz``, with ``write``: rank 0) and
    read back for the same ``key``: a resume assigns nothing (at paper scale the assignment takes
    hours), and a start stopped while assigning goes on with the utterances it had not reached."""
    done = _read_targets(path, key, progress) or {}
    left = [u for u in utts if u.id not in done]
    if not left:
        progress.log(f"using the unit targets in {path}")
        return {u.id: done[u.id] for u in utts}
    if done:
        progress.log(f"using the units of {len(done)} utterance(s) kept in {path}; assigning the other {len(left)}")
    kept = len(done)
    try:
        unit_targets(left, units, source, progress, into=done, shard=shard, workers=workers)
    except BaseException:  # Ctrl-C, SIGTERM, a bad recording: what was assigned is kept for the next start
        if write and len(done) > kept:
            try:
                _write_targets(path, key, done)
                progress.log(f"kept the units of {len(done)} of {len(utts)} utterance(s) in {path}")
            except OfactlError as e:  # a full disk: said, and the stop's own cause goes on
                progress.log(f"warning: {e}")
        raise
    if write:
        _write_targets(path, key, done)
    return {u.id: done[u.id] for u in utts}


def _write_targets(path: Path, key: str, targets: dict[str, np.ndarray]) -> None:
    """``targets`` as one npz: the key, the utterance ids, their lengths and every unit in a row."""
    ids = list(targets)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, key=np.array(key), ids=np.array(ids), lengths=np.array([len(targets[i]) for i in ids]),
                 units=np.concatenate([targets[i] for i in ids]) if ids else np.zeros(0, np.int16))


class TargetsUnreadable(Exception):
    """A unit-targets file cut short or of another format; its message is the error's kind."""


def read_targets_file(path: Path, *names: str) -> list[np.ndarray]:
    """The named arrays of the unit-targets file ``path`` (``key``, ``ids``, ``lengths``, ``units``).
    Raises ``TargetsUnreadable`` when the file is cut short or not such a file."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            return [z[name] for name in names]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # cut short, or not such a file
        raise TargetsUnreadable(type(e).__name__) from e


def _read_targets(path: Path, key: str, progress: Progress) -> dict[str, np.ndarray] | None:
    """The targets kept in ``path`` if it holds ``key``; None when absent, made for other units or
    utterances, or unreadable (said, then computed again)."""
    if not path.is_file():
        return None
    try:
        (kept,) = read_targets_file(path, "key")
        if str(kept) != key:
            return None  # made for other units: its arrays are not read (an npz reads each on access)
        ids, lengths, flat = read_targets_file(path, "ids", "lengths", "units")
    except TargetsUnreadable as e:
        progress.log(f"warning: {path}: unreadable ({e}); assigning the units again")
        return None
    ends = np.cumsum(lengths)
    return {i: flat[e - n:e] for i, n, e in zip(ids.tolist(), lengths.tolist(), ends.tolist(), strict=True)}
