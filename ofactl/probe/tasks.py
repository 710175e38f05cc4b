"""Downstream tasks: labels and train/dev/test splits from a corpus manifest.

| task | labels | head | metric |
|---|---|---|---|
| ks  | ``label`` (keyword rows only when a ``kind`` column exists) | utterance | accuracy |
| cls | any label column (``--label-column``, default ``label``) | utterance | accuracy |
| sid | ``speaker`` | utterance | accuracy |
| pr  | ``phones`` (space-separated) | CTC | PER |
| asr | ``text`` (characters A-Z ' and word separator \\|) | CTC | WER (and CER) |

Splits: the manifest's ``split`` column when it has train, dev and test; otherwise a seeded
80/10/10 split that keeps each speaker in one split (speaker-independent tasks). ``sid`` always
splits each speaker's utterances 80/10/10, since it must see every speaker in training.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from ofactl.audio import Corpus
from ofactl.errors import ConfigError

TASKS = ("ks", "cls", "sid", "pr", "asr")


@dataclass
class TaskData:
    """A downstream task over a corpus: its splits, labels per utterance and label vocabulary."""

    task: str
    kind: str  # "cls" or "ctc"
    metric: str  # accuracy | per | wer
    higher_better: bool
    splits: dict[str, list[str]]
    labels: dict[str, list[int]]  # cls: [class]; ctc: token ids (1-based, 0 = blank)
    vocab: list[str]
    extra: dict[str, str] = field(default_factory=dict)
    unlabelled: int = 0  # utterances left out for an empty label in the task's column
    speakers: dict[str, str] = field(default_factory=dict)  # utterance id -> speaker ("" unknown)

    def note(self) -> str | None:
        """What a run should say about utterances the task left out; None when it kept them all."""
        if not self.unlabelled:
            return None
        col = self.extra.get("label_column", "label")
        return f"task {self.task}: {self.unlabelled} utterance(s) with an empty '{col}' left out"

    @property
    def n_outputs(self) -> int:
        """Classes (cls tasks) or tokens plus the CTC blank (ctc tasks)."""
        return len(self.vocab) + (1 if self.kind == "ctc" else 0)

    @property
    def dev_speakers_unseen(self) -> bool:
        """Whether the dev split holds only speakers train lacks (every speaker known): a
        speaker-independent task, whose held-out error is on voices the probe never heard."""
        train, dev = self.splits["train"], self.splits["dev"]
        known = bool(dev) and all(self.speakers.get(u) for u in train + dev)
        return known and not {self.speakers[u] for u in dev} & {self.speakers[u] for u in train}

    @property
    def ids(self) -> list[str]:
        """Every utterance id in any split."""
        return [u for s in ("train", "dev", "test") for u in self.splits[s]]


def _asr_tokens(text: str) -> list[str]:
    t = re.sub(r"[^A-Z' ]", "", text.upper())
    return list("|".join(t.split()))


def build_task(task: str, corpus: Corpus, label_column: str | None = None, seed: int = 0) -> TaskData:
    """Build ``task`` (ks, cls, sid, pr, asr) from a labelled corpus: labels from its columns,
    splits from its ``split`` column or seeded by speaker; errors name the missing column.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}' (expected one of {', '.join(TASKS)})")
    utts = list(corpus)
    if task == "ks" and "kind" in corpus.columns:
        utts = [u for u in utts if u.labels.get("kind") == "keyword"]
    col = {"ks": "label", "cls": label_column or "label", "sid": "speaker", "pr": "phones", "asr": "text"}[task]
    missing = [u.id for u in utts if not u.labels.get(col, "").strip()]
    if missing:
        if len(missing) == len(utts):
            raise ConfigError(f"task {task} needs a '{col}' column; corpus {corpus.source} has: "
                              f"{', '.join(corpus.columns) or 'no label columns'}")
        utts = [u for u in utts if u.labels.get(col, "").strip()]
    unlabelled = len(missing)
    kind = task_kind(task)
    if kind == "ctc":
        seqs = {u.id: (u.labels[col].split() if task == "pr" else _asr_tokens(u.labels[col])) for u in utts}
        vocab = sorted({t for s in seqs.values() for t in s})
        index = {t: i + 1 for i, t in enumerate(vocab)}
        labels = {u: [index[t] for t in s] for u, s in seqs.items()}
        metric, higher = "per" if task == "pr" else "wer", False
    else:
        vals = {u.id: u.labels[col] for u in utts}
        vocab = sorted(set(vals.values()))
        if len(vocab) == 1:  # every prediction right by construction: a score that measures nothing
            raise ConfigError(f"task {task} on {corpus.source}: every labelled utterance has the same "
                              f"'{col}' ({vocab[0]}); a classifier needs at least two classes")
        index = {v: i for i, v in enumerate(vocab)}
        labels = {u: [index[v]] for u, v in vals.items()}
        metric, higher = "accuracy", True
    splits = _splits(task, utts, seed)
    _check_splits(task, splits, utts, corpus.source)
    speakers = {u.id: u.labels.get("speaker", "") for u in utts}
    return TaskData(task, kind, metric, higher, splits, labels, vocab, {"label_column": col}, unlabelled, speakers)


def task_kind(task: str) -> str:
    """The kind of probe a task trains: "ctc" (a label sequence per utterance: ``pr``, ``asr``) or
    "cls" (one label per utterance)."""
    return "ctc" if task in ("pr", "asr") else "cls"


def _check_splits(task: str, splits: dict[str, list[str]], utts: list, source: str) -> None:
    """Train and test must hold utterances, or the probe has nothing to learn or score (an empty
    dev split falls back to train for early stopping)."""
    empty = [s for s in ("train", "test") if not splits[s]]
    if not empty:
        return
    if task == "sid":
        counts: dict[str, int] = {}
        for u in utts:
            counts[u.labels.get("speaker", "")] = counts.get(u.labels.get("speaker", ""), 0) + 1
        few = sorted(s for s, n in counts.items() if n < 3)
        raise ConfigError(f"task sid on {source}: the {'/'.join(empty)} split is empty; sid splits each "
                          f"speaker's utterances 80/10/10 and needs at least 3 per speaker "
                          f"({len(few)} of {len(counts)} speakers have fewer, e.g. {', '.join(few[:5])})")
    raise ConfigError(f"task {task} on {source}: the {'/'.join(empty)} split is empty ({len(utts)} labelled "
                      f"utterances); give the manifest a split column with train, dev and test rows, "
                      f"or more speakers")


def _splits(task: str, utts: list, seed: int) -> dict[str, list[str]]:
    given = {u.labels.get("split", "") for u in utts}
    if task != "sid" and {"train", "dev", "test"} <= given:
        return {s: [u.id for u in utts if u.labels.get("split") == s] for s in ("train", "dev", "test")}
    rng = random.Random(seed)
    out: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    speakers = sorted({u.labels.get("speaker", "") for u in utts})
    if task != "sid" and len(speakers) >= 3 and speakers != [""]:
        # speaker-independent: whole speakers go to one split
        rng.shuffle(speakers)
        n = len(speakers)
        n_test, n_dev = max(1, round(0.1 * n)), max(1, round(0.1 * n))
        where = {s: "test" if i < n_test else "dev" if i < n_test + n_dev else "train" for i, s in enumerate(speakers)}
        for u in utts:
            out[where[u.labels.get("speaker", "")]].append(u.id)
        return out
    groups: dict[str, list[str]] = {}
    for u in utts:
        groups.setdefault(u.labels.get("speaker", ""), []).append(u.id)
    for spk in sorted(groups):
        ids = sorted(groups[spk])
        rng.shuffle(ids)
        n = len(ids)
        n_test = max(1, round(0.1 * n)) if n >= 3 else 0
        n_dev = max(1, round(0.1 * n)) if n >= 3 else 0
        out["test"] += ids[:n_test]
        out["dev"] += ids[n_test : n_test + n_dev]
        out["train"] += ids[n_test + n_dev :]
    return out
