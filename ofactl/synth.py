"""Built-in labelled speech corpus synthesised with espeak-ng (``ofactl synth``).

espeak-ng is loaded through ctypes from the ``espeakng-loader`` wheel, so no system package is
needed. Speakers are accent x voice variant x pitch x speed; content is a keyword list (keyword
spotting) and generated sentences (phoneme recognition, ASR). Phone labels and their start
times come from espeak's own phoneme events, so they are exact ("oracle") alignments.

The output folder holds ``manifest.tsv`` (columns: id, path, speaker, label, kind, text,
phones, phone_times, accent, split), ``wavs/SPEAKER/ID.wav`` (16 kHz, 16-bit PCM) and the
resolved ``synth.yaml``. The same config gives byte-identical files.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import itertools
import os
import random
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ofactl.atomic import atomic_path, make_dir
from ofactl.config import load_yaml, save_resolved, to_dict
from ofactl.errors import ConfigError, OfactlError
from ofactl.progress import NullProgress, Progress
from ofactl.runtime import SAMPLE_RATE

MANIFEST_COLUMNS = ("speaker", "label", "kind", "text", "phones", "phone_times", "accent", "split")

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")

# Small grammar for sentences: enough lexical and phonetic variety for PR/ASR probes.
_ADJ = ("red", "quiet", "little", "heavy", "bright", "cold", "young", "happy", "broken", "golden",
        "silver", "tired", "clever", "empty", "windy", "sharp")
_NOUN = ("dog", "garden", "river", "teacher", "window", "bottle", "train", "morning", "village",
         "doctor", "pencil", "basket", "mountain", "kitchen", "letter", "farmer", "island", "lamp")
_VERB = ("found", "carried", "painted", "watched", "opened", "followed", "cleaned", "moved",
         "visited", "remembered", "pushed", "kept", "washed", "answered", "needed")
_NAME = ("anna", "peter", "maria", "john", "lucy", "david", "sarah", "thomas")
_PREP = ("near", "behind", "under", "beside", "after", "before")
_ADV = ("slowly", "today", "again", "quickly", "carefully", "at night")
_TEMPLATES = (
    "the {adj} {noun} {verb} the {noun2}",
    "{name} {verb} a {adj} {noun} {prep} the {noun2}",
    "the {noun} {verb} {name} {adv}",
    "a {adj} {noun} was {prep} the {adj2} {noun2}",
    "{name} and {name2} {verb} the {noun} {adv}",
)


@dataclass
class SynthConfig:
    """How the synthetic corpus is made. Speakers are drawn from the product of the axes.

    ``variants`` are espeak-ng voice variants; avoid the breathy f2/f3/f5, whose noise makes
    output differ between runs.
    """

    seed: int = 0  # seeds speakers, sentences, splits and take jitter (same seed, same corpus)
    n_speakers: int = 24  # speakers, dealt accent x variant x pitch x speed combinations
    accents: tuple[str, ...] = ("en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-rp")  # espeak-ng accents
    variants: tuple[str, ...] = ("m1", "m3", "f1", "f4", "m7", "m2")  # espeak-ng voice variants (m* male, f* female)
    pitches: tuple[int, ...] = (35, 55, 75)  # espeak-ng pitch levels (0-99)
    speeds: tuple[int, ...] = (145, 175)  # speaking rates in words per minute
    keywords: tuple[str, ...] = KEYWORDS  # words every speaker says keyword_takes times (the ks labels)
    keyword_takes: int = 3  # takes of each keyword per speaker
    n_sentences: int = 120  # distinct sentences generated (the pr/asr material)
    sentences_per_speaker: int = 20  # sentences each speaker reads, drawn from its split's pool
    dev_fraction: float = 0.15  # share of speakers in the dev split
    test_fraction: float = 0.15  # share of speakers in the test split (voices unseen in training)
    take_jitter: float = 0.08  # relative speed change between takes of one speaker (+-)
    sample_rate: int = SAMPLE_RATE  # Hz of the written WAVs
    exclude_test_voices_of: str = ""  # a synth preset whose test-split voices this corpus leaves out
    # (pretraining data that keeps a probe's test speakers unseen)

    def validate(self) -> None:
        """Raise ValueError for counts, splits or voices that cannot make a corpus."""
        if self.n_speakers < 3:
            raise ValueError("n_speakers must be >= 3 (train, dev and test need one each)")
        combos = len(self.accents) * len(self.variants) * len(self.pitches) * len(self.speeds)
        if self.n_speakers > combos:
            raise ValueError(f"n_speakers={self.n_speakers} exceeds the {combos} accent/variant/pitch/speed combinations")
        if not 0 <= self.dev_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("dev_fraction and test_fraction must be in [0, 1)")
        if self.dev_fraction + self.test_fraction >= 1:
            raise ValueError("dev_fraction + test_fraction must be < 1")
        if self.keyword_takes < 0 or self.sentences_per_speaker < 0 or self.n_sentences < 0:
            raise ValueError("counts must be >= 0")
        if self.sentences_per_speaker and self.n_sentences < 3:
            raise ValueError("n_sentences must be >= 3 when sentences are spoken")
        if not 0 <= self.take_jitter < 0.5:
            raise ValueError("take_jitter must be in [0, 0.5)")
        if self.sample_rate < 8000:
            raise ValueError("sample_rate must be >= 8000")


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: espeak-ng accent and voice variant, pitch, speed and split."""

    id: str
    accent: str
    variant: str
    pitch: int
    speed: int
    split: str


@dataclass(frozen=True)
class Synthesis:
    """One synthesised utterance: float32 samples at espeak's rate plus phone events."""

    samples: np.ndarray
    sample_rate: int
    phones: list[str]
    phone_starts_s: list[float]


# --------------------------------------------------------------------------- espeak binding
class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_EVENT_LIST_TERMINATED, _EVENT_PHONEME = 0, 7
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS, _INIT_DONT_EXIT = 0x0001, 0x8000
_PARAM_RATE, _PARAM_PITCH = 1, 3


class Espeak:
    """Process-wide espeak-ng engine (the C library keeps global state; one per process)."""

    _instance: Espeak | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError:  # pragma: no cover - a declared dependency
            raise OfactlError("espeak-ng is not available: pip install espeakng-loader") from None
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        data = espeakng_loader.get_data_path().encode()
        self.sample_rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INIT_PHONEME_EVENTS | _INIT_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise OfactlError("espeak-ng failed to initialise (its data folder may be missing)")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[str, int]] = []
        # Seed libc rand() per utterance for any randomness inside espeak. The breathy variants
        # (f2, f3, f5) still differ between processes, so the default variants avoid them.
        self._libc = ctypes.CDLL(None)
        self._cb = _CALLBACK(self._on_audio)  # keep a reference: C holds only the pointer
        self.lib.espeak_SetSynthCallback(self._cb)

    @classmethod
    def get(cls) -> Espeak:
        """The process's one espeak-ng engine (loaded on first use)."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = Espeak()
            return cls._instance

    def _on_audio(self, wav: Any, n: int, events: Any) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_PHONEME:
                self._events.append((ev.id.string.decode("ascii", "replace"), int(ev.sample)))
            i += 1
        return 0

    def check_voice(self, voice: str) -> None:
        """ConfigError when espeak-ng lacks ``voice`` (accent+variant)."""
        with self._lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ConfigError(f"espeak-ng has no voice '{voice}' (accent+variant)")

    def synth(self, text: str, voice: str, pitch: int, speed: int, seed: int = 0) -> Synthesis:
        """Speak ``text``: samples at the engine's rate, with phonemes and their start times."""
        with self._lock:
            self._libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ConfigError(f"espeak-ng has no voice '{voice}'")
            self.lib.espeak_SetParameter(_PARAM_RATE, int(speed), 0)
            self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            self._chunks, self._events = [], []
            raw = text.encode("utf-8")
            rc = self.lib.espeak_Synth(raw, len(raw) + 1, 0, 0, 0, 0, None, None)
            if rc != 0 or not self._chunks:
                raise OfactlError(f"espeak-ng failed to synthesise {text!r} (code {rc})")
            pcm = np.concatenate(self._chunks).astype(np.float32) / 32768.0
            phones, starts = _clean_phones(self._events, self.sample_rate)
            return Synthesis(pcm, self.sample_rate, phones, starts)


def _clean_phones(events: list[tuple[str, int]], sr: int) -> tuple[list[str], list[float]]:
    """Drop pauses, strip stress marks and variant digits; keep strictly increasing starts."""
    phones: list[str] = []
    starts: list[float] = []
    for name, sample in events:
        p = name.lstrip("',").strip()
        if not p or p.startswith("_"):
            continue
        if len(p) > 1 and p[-1].isdigit():
            p = p[:-1]
        t = sample / sr
        if starts and t <= starts[-1]:
            # Zero-length phone events share a start; merge them into the previous symbol's
            # slot rather than emit a label with no audio.
            continue
        phones.append(p)
        starts.append(t)
    return phones, starts


# --------------------------------------------------------------------------- corpus plan
def make_speakers(cfg: SynthConfig) -> list[Speaker]:
    """The speakers of ``cfg``: accents and variants dealt out deterministically, each with its split."""
    rng = random.Random(cfg.seed)
    combos = list(itertools.product(cfg.accents, cfg.variants, cfg.pitches, cfg.speeds))
    rng.shuffle(combos)
    if cfg.exclude_test_voices_of:
        held = excluded_voices(cfg.exclude_test_voices_of)
        combos = [c for c in combos if c not in held]
        if len(combos) < cfg.n_speakers:
            raise ConfigError(f"n_speakers={cfg.n_speakers}: only {len(combos)} voices remain once the test voices "
                              f"of {cfg.exclude_test_voices_of} are left out")
    chosen = combos[: cfg.n_speakers]
    n_test = max(1, round(cfg.n_speakers * cfg.test_fraction)) if cfg.test_fraction > 0 else 0
    n_dev = max(1, round(cfg.n_speakers * cfg.dev_fraction)) if cfg.dev_fraction > 0 else 0
    out = []
    for i, (acc, var, pitch, speed) in enumerate(chosen):
        split = "test" if i < n_test else "dev" if i < n_test + n_dev else "train"
        out.append(Speaker(f"spk{i:03d}", acc, var, pitch, speed, split))
    return out


def excluded_voices(preset: str) -> set[tuple[str, str, int, int]]:
    """(accent, variant, pitch, speed) of every test-split speaker of a synth preset."""
    from ofactl.config import load_config

    other = load_config(SynthConfig, "synth", preset)
    return {(s.accent, s.variant, s.pitch, s.speed) for s in make_speakers(other) if s.split == "test"}


def make_sentences(n: int, seed: int) -> list[str]:
    """``n`` distinct sentences from the grammar, deterministic in ``seed``."""
    rng = random.Random(seed * 7919 + 17)
    seen: dict[str, None] = {}
    tries = 0
    while len(seen) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ConfigError(f"cannot generate {n} distinct sentences; use fewer")
        tpl = rng.choice(_TEMPLATES)
        nouns = rng.sample(_NOUN, 2)
        adjs = rng.sample(_ADJ, 2)
        names = rng.sample(_NAME, 2)
        s = tpl.format(
            adj=adjs[0], adj2=adjs[1], noun=nouns[0], noun2=nouns[1], verb=rng.choice(_VERB),
            name=names[0], name2=names[1], prep=rng.choice(_PREP), adv=rng.choice(_ADV),
        )
        seen[s] = None
    return list(seen)


def _split_sentences(sentences: list[str], cfg: SynthConfig) -> dict[str, list[tuple[int, str]]]:
    n = len(sentences)
    n_test = max(1, round(n * cfg.test_fraction)) if cfg.test_fraction > 0 else 0
    n_dev = max(1, round(n * cfg.dev_fraction)) if cfg.dev_fraction > 0 else 0
    idx = list(enumerate(sentences))
    return {"test": idx[:n_test], "dev": idx[n_test : n_test + n_dev], "train": idx[n_test + n_dev :]}


@dataclass(frozen=True)
class _Item:
    id: str
    speaker: Speaker
    kind: str
    label: str
    text: str
    speed: int
    pitch: int


def plan(cfg: SynthConfig) -> list[_Item]:
    """Every utterance to synthesise, in a deterministic order."""
    speakers = make_speakers(cfg)
    pools = _split_sentences(make_sentences(cfg.n_sentences, cfg.seed), cfg) if cfg.sentences_per_speaker else {}
    items: list[_Item] = []
    for spk in speakers:
        rng = random.Random(f"{cfg.seed}:{spk.id}")

        def jitter(take: int, spk: Speaker = spk, rng: random.Random = rng) -> tuple[int, int]:
            if take == 0 or cfg.take_jitter == 0:
                return spk.speed, spk.pitch
            f = 1.0 + rng.uniform(-cfg.take_jitter, cfg.take_jitter)
            return int(round(spk.speed * f)), int(min(99, max(0, spk.pitch + rng.randint(-6, 6))))

        for kw in cfg.keywords:
            for take in range(cfg.keyword_takes):
                speed, pitch = jitter(take)
                items.append(_Item(f"{spk.id}_kw_{kw}_{take}", spk, "keyword", kw, kw, speed, pitch))
        pool = pools.get(spk.split, [])
        if pool:
            k = min(cfg.sentences_per_speaker, len(pool))
            for sid, text in rng.sample(pool, k):
                speed, pitch = jitter(1)
                items.append(_Item(f"{spk.id}_s{sid:04d}", spk, "sentence", f"s{sid:04d}", text, speed, pitch))
    return items


# --------------------------------------------------------------------------- run
@dataclass(frozen=True)
class SynthResult:
    """What ``synth`` made: the manifest, utterance and speaker counts, seconds, reused or not."""

    out_dir: Path
    manifest: Path
    n_utterances: int
    n_speakers: int
    seconds: float
    reused: bool

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-safe data (``--json``)."""
        return {
            "out_dir": str(self.out_dir), "manifest": str(self.manifest),
            "utterances": self.n_utterances, "speakers": self.n_speakers,
            "audio_seconds": round(self.seconds, 3), "reused": self.reused,
        }


def _job(cfg: SynthConfig, it: _Item) -> tuple[str, str, int, int, int]:
    seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}:{it.id}".encode()).digest()[:4], "little")
    return (it.text, f"{it.speaker.accent}+{it.speaker.variant}", it.pitch, it.speed, seed)


def _worker_main() -> None:
    """Subprocess entry: read one speaker's jobs (pickle on stdin), write results on stdout."""
    import pickle

    jobs = pickle.load(sys.stdin.buffer)
    engine = Espeak.get()
    out = [engine.synth(*job) for job in jobs]
    pickle.dump(out, sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)
    sys.stdout.buffer.flush()


def _map_fresh(groups: list[list[tuple[str, str, int, int, int]]], workers: int) -> Iterator[list[Synthesis]]:
    """Synthesise each group in a fresh process, ``workers`` at a time; yield results in order.

    espeak-ng keeps waveform state across calls (the same text synthesised twice in one process
    differs slightly), so a group is only reproducible on a fresh engine. Plain subprocesses
    (not multiprocessing) keep this independent of the caller's ``__main__`` module.
    """
    import pickle
    import subprocess
    import tempfile

    cmd = [sys.executable, "-c", "from ofactl.synth import _worker_main; _worker_main()"]
    running: list[tuple[subprocess.Popen[bytes], Any, Any]] = []
    next_group = 0

    def launch(group: list[tuple[str, str, int, int, int]]) -> None:
        # Files, not pipes: large outputs never block the child.
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115 - closed when the child is reaped
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err)
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(group))
        proc.stdin.close()
        running.append((proc, out, err))

    while next_group < len(groups) and len(running) < workers:
        launch(groups[next_group])
        next_group += 1
    while running:
        proc, out, err = running.pop(0)
        proc.wait()
        if proc.returncode != 0:
            for p, *_files in running:
                p.kill()
            err.seek(0)
            msg = err.read().decode(errors="replace").strip().splitlines()
            raise OfactlError(f"espeak-ng worker failed: {msg[-1] if msg else proc.returncode}")
        out.seek(0)
        result = pickle.load(out)  # our own child's output, not user data
        out.close()
        err.close()
        if next_group < len(groups):
            launch(groups[next_group])
            next_group += 1
        yield result


def run_synth(cfg: SynthConfig, out_dir: Path, *, overwrite: bool = False,
              progress: Progress | None = None, workers: int | None = None) -> SynthResult:
    """Synthesise the corpus into ``out_dir`` (reused as is when its config matches).

    ``synth.yaml`` is written first and ``manifest.tsv`` last, so a folder with the first and not
    the second is an unfinished run: a rerun with the same config goes on unasked, keeping each
    speaker finished before (``wavs/SPEAKER/rows.json``, removed once the manifest is written).
    ``workers`` processes synthesise speakers in parallel (default: CPU count, at most 4); the
    output does not depend on it.
    """
    from ofactl.pidlock import run_folder_lock

    with run_folder_lock(out_dir, "synth", progress or NullProgress()):
        return _run_synth(cfg, out_dir, overwrite, progress, workers)


def _run_synth(cfg: SynthConfig, out_dir: Path, overwrite: bool, progress: Progress | None,
               workers: int | None) -> SynthResult:
    """:func:`run_synth` under its run folder's lock."""
    from ofactl.audio import MANIFEST_NAME, write_manifest

    progress = progress or NullProgress()
    out_dir = Path(out_dir)
    manifest, cfg_path = out_dir / MANIFEST_NAME, out_dir / "synth.yaml"
    same = _made_with(cfg, cfg_path)
    if same and manifest.is_file() and not overwrite:
        return _reuse_corpus(out_dir, manifest, progress)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (overwrite or same):
        raise OfactlError(f"{out_dir} is not empty and holds another corpus; pass --overwrite or choose another --out")
    resume = same and not overwrite
    items = plan(cfg)
    engine = Espeak.get()  # voices are checked here; synthesis runs in fresh worker processes
    for voice in sorted({f"{it.speaker.accent}+{it.speaker.variant}" for it in items}):
        engine.check_voice(voice)
    make_dir(out_dir)  # a bad --out fails now, not after the first speaker is synthesised
    manifest.unlink(missing_ok=True)  # an older corpus's manifest must not vouch for this run's files
    save_resolved(cfg, "synth", cfg_path)
    rows, total_s = _synthesise(cfg, items, out_dir, workers or min(4, os.cpu_count() or 1), progress, resume)
    write_manifest(manifest, rows, MANIFEST_COLUMNS)
    for done in (out_dir / "wavs").glob(f"*/{_DONE}"):  # the manifest holds every row now
        done.unlink()
    n_spk = len({r["speaker"] for r in rows})
    return SynthResult(out_dir, manifest, len(rows), n_spk, total_s, False)


def _made_with(cfg: SynthConfig, cfg_path: Path) -> bool:
    """True when ``cfg_path`` (a folder's synth.yaml) records ``cfg``."""
    if not cfg_path.is_file():
        return False
    try:
        return bool(load_yaml(cfg_path).get("synth") == to_dict(cfg))
    except ConfigError:
        return False


def _reuse_corpus(out_dir: Path, manifest: Path, progress: Progress) -> SynthResult:
    """The finished corpus in ``out_dir``, made with the same config."""
    from ofactl.audio import read_corpus

    corpus = read_corpus(manifest)
    progress.log(f"reusing the corpus in {out_dir} (same config)")
    return SynthResult(out_dir, manifest, len(corpus), len({u.labels["speaker"] for u in corpus}), corpus.seconds, True)


def _synthesise(cfg: SynthConfig, items: list[_Item], out_dir: Path, workers: int,
                progress: Progress, resume: bool) -> tuple[list[dict[str, str]], float]:
    """Every item as a 16-bit WAV under ``out_dir/wavs/SPEAKER/``; manifest rows and seconds.
    Each speaker's rows are kept beside its WAVs once all are written; with ``resume`` a speaker
    whose rows are there is not synthesised again (each speaker is made by a fresh engine, so
    the corpus equals an uninterrupted run's)."""
    by_speaker: dict[str, list[_Item]] = {}
    for it in items:
        by_speaker.setdefault(it.speaker.id, []).append(it)
    key = hashlib.sha256(repr(to_dict(cfg)).encode()).hexdigest()
    done = {spk: _finished_rows(out_dir, spk, group, key) if resume else None for spk, group in by_speaker.items()}
    to_make = [spk for spk in by_speaker if done[spk] is None]
    progress.start("synthesising speech", len(items))
    if resume:
        progress.log(f"{out_dir}: an unfinished synth with the same config; going on ({len(by_speaker) - len(to_make)} "
                     f"of {len(by_speaker)} speakers were finished)")
        progress.advance(sum(len(by_speaker[spk]) for spk in by_speaker if spk not in to_make))
    jobs = [[_job(cfg, it) for it in by_speaker[spk]] for spk in to_make]
    for spk, results in zip(to_make, _map_fresh(jobs, workers)):
        done[spk] = _write_speaker(cfg, by_speaker[spk], results, out_dir, key, progress)
    progress.finish()
    rows = [row for spk in by_speaker for row in done[spk] or []]
    total_s = sum(float(r["seconds"]) for r in rows)
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows], total_s


_DONE = "rows.json"  # a speaker's manifest rows, written after its last WAV


def _finished_rows(out_dir: Path, speaker: str, group: list[_Item], key: str) -> list[dict[str, str]] | None:
    """The rows of a speaker an earlier run of this config finished (every WAV on disk), or None."""
    import json

    path = out_dir / "wavs" / speaker / _DONE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("config_sha256") != key:
        return None
    rows = doc.get("rows")
    if (not isinstance(rows, list) or not all(_whole_row(r, out_dir) for r in rows)
            or [r["id"] for r in rows] != [it.id for it in group]):
        return None
    return rows


def _whole_row(row: Any, out_dir: Path) -> bool:
    """A kept row with every field as text, its seconds a number, and its WAV on disk."""
    need = ("id", "path", "seconds", *MANIFEST_COLUMNS)
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in need):
        return False
    try:
        float(row["seconds"])
    except ValueError:
        return False
    return (out_dir / row["path"]).is_file()


def _write_speaker(cfg: SynthConfig, group: list[_Item], results: list[Synthesis], out_dir: Path, key: str,
                   progress: Progress) -> list[dict[str, str]]:
    """One speaker's WAVs, then its rows (with each utterance's seconds) beside them."""
    import json

    import soundfile as sf
    import torch

    from ofactl.atomic import write_text
    from ofactl.audio import resample

    rows: list[dict[str, str]] = []
    for it, s in zip(group, results):
        wav = resample(torch.from_numpy(s.samples), s.sample_rate, cfg.sample_rate).numpy()
        peak = float(np.abs(wav).max())
        if peak > 0.99:  # resampling can overshoot full scale; keep 16-bit PCM unclipped
            wav = wav * (0.99 / peak)
        rel = Path("wavs") / it.speaker.id / f"{it.id}.wav"
        buf = io.BytesIO()  # encoded in memory, written atomically: a full disk is one error naming the file
        sf.write(buf, wav, cfg.sample_rate, subtype="PCM_16", format="WAV")
        with atomic_path(out_dir / rel) as tmp:
            tmp.write_bytes(buf.getvalue())
        rows.append({
            "id": it.id, "path": str(rel), "speaker": it.speaker.id, "label": it.label,
            "kind": it.kind, "text": it.text, "phones": " ".join(s.phones),
            "phone_times": " ".join(f"{1000 * t:.1f}" for t in s.phone_starts_s),
            "accent": it.speaker.accent, "split": it.speaker.split, "seconds": repr(len(wav) / cfg.sample_rate),
        })
        progress.advance()
    write_text(out_dir / "wavs" / group[0].speaker.id / _DONE, json.dumps({"config_sha256": key, "rows": rows}))
    return rows
