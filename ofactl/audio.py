"""Audio decoding, resampling to 16 kHz, and corpus readers.

Every corpus reader yields :class:`Utterance` records whose lengths are known before any
decoding (``soundfile.info``), so stores can preallocate offsets and batches can be sorted.

Corpus specifications accepted by :func:`read_corpus`:

- ``DIR``: every audio file below DIR (recursive); ``DIR::{label}_{speaker}_{take}`` also
  parses label columns from each file's stem. A DIR with a ``manifest.tsv`` at its top (what
  ``ofactl synth`` writes) is read through that manifest instead, so its labels come along;
- a LibriSpeech-style tree (``*.trans.txt`` next to ``*.flac``), with ``text``, ``speaker``
  and ``split`` columns;
- ``FILE.tsv``: a manifest with a header row; ``id`` and ``path`` required, any other column
  becomes a label (``speaker``, ``label``, ``text``, ``phones``, ``split`` ...). A fairseq
  wav2vec/HuBERT manifest (a root folder on the first line, then ``relative/path<TAB>samples``)
  is read too: each file's id is its stem, and a relative root is taken from the manifest's folder;
- a Kaldi data folder (``wav.scp``, and ``utt2spk`` and ``text`` as labels) or its ``wav.scp``
  (:mod:`ofactl.corpus_kaldi`);
- ``FILE`` (any other suffix) or ``-`` (stdin): one audio path per line (``#`` comments and
  blank lines skipped); stdin may also carry a TSV manifest with an ``id``/``path`` header.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

import numpy as np
import soundfile as sf

from ofactl.atomic import write_text
from ofactl.corpus_kaldi import is_kaldi_folder, read_kaldi
from ofactl.errors import AudioError, CorpusError
from ofactl.runtime import SAMPLE_RATE

if TYPE_CHECKING:
    import torch

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")
_MAX_LISTED = 20
MANIFEST_NAME = "manifest.tsv"  # a folder holding one is read through it (``ofactl synth`` writes it)


# --------------------------------------------------------------------------- single files
@dataclass(frozen=True)
class AudioInfo:
    """A file's header: sample count, sample rate (Hz) and channels."""

    n_samples: int
    sample_rate: int
    channels: int


def audio_info(path: str | Path) -> AudioInfo:
    """Length, rate and channels of an audio file from its header only (no decoding)."""
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: file not found")
    if p.is_dir():
        raise AudioError(f"{p}: is a directory, expected an audio file")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise AudioError(f"{p}: cannot read ({e.strerror})") from None
    if size == 0:
        raise AudioError(f"{p}: empty file (0 bytes), expected WAV/FLAC/OGG audio")
    try:
        info = sf.info(str(p))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError subclasses
        raise AudioError(f"{p}: not a readable audio file ({_sf_reason(e)})") from None
    declared = _wav_declared_frames(p, size)
    if declared is not None and declared > info.frames:  # libsndfile reads what is there, silently
        raise AudioError(f"{p}: truncated or corrupt: header says {declared} samples, the file holds {info.frames}")
    if info.frames <= 0:
        raise AudioError(f"{p}: holds no audio samples")
    return AudioInfo(int(info.frames), int(info.samplerate), int(info.channels))


def _wav_declared_frames(p: Path, size: int) -> int | None:
    """The frames a RIFF WAV's header declares when its data chunk runs past the end of the file
    (a copy or download cut short); None when it fits, for a header written before its length was
    known (0 or 0xFFFFFFFF), and for any other format."""
    block, pos = 0, 12
    with open(p, "rb") as f:
        head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        for _ in range(64):  # a few chunks (fmt, fact, LIST ...) come before the samples
            f.seek(pos)
            chunk = f.read(24)
            if len(chunk) < 8:
                return None
            n = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"fmt " and len(chunk) >= 22:
                block = int.from_bytes(chunk[20:22], "little")  # bytes per frame, all channels
            if chunk[:4] == b"data":
                held = size - pos - 8
                if n in (0, 0xFFFFFFFF) or n <= held or block <= 0:
                    return None
                return n // block
            pos += 8 + n + (n & 1)  # chunks are padded to an even length
    return None


def _sf_reason(e: Exception) -> str:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return msg.split(": ", 1)[-1] if msg.startswith("Error opening") else msg


def resampled_length(n_samples: int, orig_rate: int, new_rate: int = SAMPLE_RATE) -> int:
    """Number of samples after resampling (matches ``torchaudio.functional.resample``)."""
    if orig_rate == new_rate:
        return int(n_samples)
    g = math.gcd(int(orig_rate), int(new_rate))
    return int(math.ceil(new_rate // g * n_samples / (orig_rate // g)))


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Band-limited resampling of (..., time) float audio."""
    if orig_rate == new_rate:
        return wav
    import torchaudio.functional as AF

    return AF.resample(wav, int(orig_rate), int(new_rate))


def read_samples(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode a file to float32 (time, channels) at its own rate; checks length and values."""
    p = Path(path)
    info = audio_info(p)
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{p}: cannot decode audio ({_sf_reason(e)})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{p}: holds no audio samples")
    # A truncated FLAC/OGG decodes short of what its header promises.
    if data.shape[0] < info.n_samples:
        raise AudioError(
            f"{p}: truncated or corrupt: header says {info.n_samples} samples, decoded {data.shape[0]}"
        )
    if not np.isfinite(data).all():
        raise AudioError(f"{p}: contains NaN or Inf samples")
    return data, int(sr)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode, mix down to mono and resample: returns float32 (samples,) at ``sample_rate``."""
    import torch

    data, sr = read_samples(path)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    wav = torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))
    return resample(wav, sr, sample_rate)


def level_dbfs(wav: torch.Tensor) -> float:
    """RMS level of (S,) audio in dBFS (full scale 1); digital silence reads -160."""
    return 20 * math.log10(max(float(wav.double().pow(2).mean().sqrt()) if wav.numel() else 0.0, 1e-8))


def set_level(wav: torch.Tensor, level_db: float, now: float | None = None) -> torch.Tensor:
    """(S,) audio scaled to an RMS level of ``level_db`` dBFS. ``now``: its level_dbfs where the
    caller has measured it already (it is not measured twice). Digital silence is returned as it
    is; samples may exceed full scale, which a model reading floats takes as they are."""
    now = level_dbfs(wav) if now is None else now
    return wav if now <= -160 else wav * float(10 ** ((level_db - now) / 20))


def median_level_db(utts: Sequence[Utterance], sample: int = 256, seed: int = 0) -> float | None:
    """Median RMS level (dBFS, 0.1 dB) of up to ``sample`` of ``utts`` drawn with ``seed`` (all
    when fewer), each whole recording as decoded: the level a model trained on them heard. Digital
    silence and files that do not decode are left out; None when nothing is left."""
    picked = list(utts)
    if len(picked) > sample:
        picked = [picked[i] for i in sorted(np.random.default_rng(seed).choice(len(picked), sample, replace=False))]
    levels = []
    for u in picked:
        try:
            level = level_dbfs(load_audio(u.path))
        except AudioError:
            continue
        if level > -160:
            levels.append(level)
    return round(float(np.median(levels)), 1) if levels else None


# --------------------------------------------------------------------------- corpora
NARROWBAND_HZ = 8000  # telephone speech, the lowest rate in the bundled teachers' data (FSDD)


@dataclass(frozen=True)
class Utterance:
    """One input file. ``n_samples`` and ``sample_rate`` are the file's own (before resampling)."""

    id: str
    path: Path
    n_samples: int
    sample_rate: int
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def n_samples_16k(self) -> int:
        """Samples after resampling to 16 kHz (what the models see)."""
        return resampled_length(self.n_samples, self.sample_rate, SAMPLE_RATE)

    @property
    def seconds(self) -> float:
        """Duration in seconds."""
        return self.n_samples / self.sample_rate

    def label(self, column: str) -> str:
        """The manifest value of ``column`` (speaker, label, phones ...); a clear error when absent."""
        try:
            return self.labels[column]
        except KeyError:
            raise CorpusError(f"utterance {self.id} has no '{column}' column") from None


@dataclass
class Corpus:
    """A validated list of utterances plus the inputs that were rejected (id -> reason)."""

    source: str
    utterances: list[Utterance]
    problems: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.utterances)

    def __iter__(self) -> Iterator[Utterance]:
        return iter(self.utterances)

    def __getitem__(self, i: int) -> Utterance:
        return self.utterances[i]

    @property
    def columns(self) -> list[str]:
        """The manifest columns every utterance has, besides id and path."""
        cols: dict[str, None] = {}
        for u in self.utterances:
            cols.update(dict.fromkeys(u.labels))
        return list(cols)

    @property
    def seconds(self) -> float:
        """Total duration in seconds."""
        return sum(u.seconds for u in self.utterances)

    def narrowband_note(self) -> str | None:
        """One line when recordings are sampled below ``NARROWBAND_HZ``: resampled to 16 kHz they
        still hold nothing above half their own rate, where speech has most of its consonants."""
        low = [u for u in self.utterances if u.sample_rate < NARROWBAND_HZ]
        if not low:
            return None
        worst = min(low, key=lambda u: (u.sample_rate, str(u.path)))
        return (f"{len(low)} of {len(self.utterances)} recording(s) are sampled below {NARROWBAND_HZ} Hz (lowest "
                f"{worst.sample_rate} Hz: {worst.path}); resampled to {SAMPLE_RATE} Hz they still hold nothing above "
                f"{worst.sample_rate // 2} Hz, less than the telephone band the models were trained on")

    def fingerprint(self) -> str:
        """sha256 over (id, n_samples, sample_rate) of every utterance, in order."""
        h = hashlib.sha256()
        for u in self.utterances:
            h.update(f"{u.id}\t{u.n_samples}\t{u.sample_rate}\n".encode())
        return h.hexdigest()

    def subset(self, keep: Iterable[str]) -> Corpus:
        """The utterances whose ids are in ``keep``, in corpus order."""
        ids = set(keep)
        return Corpus(self.source, [u for u in self.utterances if u.id in ids], dict(self.problems))


@dataclass
class _Entry:
    id: str | None
    path: Path
    labels: dict[str, str]


def read_corpus(
    spec: str | Path,
    *,
    stdin: TextIO | None = None,
    on_error: Literal["fail", "skip"] = "fail",
    min_samples_16k: int = 0,
    skip_hint: str = "",
) -> Corpus:
    """Read and validate a corpus (see module docstring for the forms of ``spec``).

    Duplicate ids, missing, empty and unreadable files, and files shorter than
    ``min_samples_16k`` samples at 16 kHz are all reported in one :class:`CorpusError` before
    any long work; with ``on_error="skip"`` the files are left out and listed in
    ``Corpus.problems`` instead (duplicates always fail). ``skip_hint``: a last line for a failure
    that skipping would have passed (the caller's flag that does so).
    """
    spec_s = str(spec)
    pattern = None
    if "::" in spec_s:
        spec_s, pattern = spec_s.split("::", 1)
    if spec_s == "-":
        entries = _read_stream(stdin if stdin is not None else sys.stdin, Path.cwd(), "<stdin>")
    else:
        p = Path(spec_s)
        if not p.exists():
            raise CorpusError(f"corpus not found: {p} (expected a directory, a .tsv manifest, a Kaldi wav.scp, "
                              "a list file or '-')")
        if p.is_dir() and (p / MANIFEST_NAME).is_file():
            entries = _read_manifest(p / MANIFEST_NAME)  # a folder ofactl made: its labels too
        elif (p.is_dir() and is_kaldi_folder(p)) or p.suffix.lower() == ".scp":
            entries = [_Entry(uid, path, labels) for uid, path, labels in read_kaldi(p)]
        elif p.is_dir():
            entries = _read_librispeech(p) if _is_librispeech(p) else _read_dir(p)
        elif p.suffix.lower() == ".tsv":
            entries = _read_manifest(p)
        elif p.suffix.lower() in AUDIO_SUFFIXES:
            entries = [_Entry(None, p, {})]
        else:
            try:
                text = p.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as e:
                raise CorpusError(f"cannot read corpus list {p}: {e}") from None
            entries = _read_stream(io.StringIO(text), p.parent, str(p))
    if pattern:
        _apply_pattern(entries, pattern)
    _assign_ids(entries)
    return _validate(spec_s, entries, on_error, min_samples_16k, skip_hint)


def _read_stream(stream: TextIO, base: Path, name: str) -> list[_Entry]:
    lines = [ln.rstrip("\r\n") for ln in stream]
    if lines:
        lines[0] = lines[0].removeprefix("\ufeff")  # a byte-order mark, as spreadsheets write them
    body = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if body and "\t" in body[0] and {"id", "path"} <= set(body[0].split("\t")):
        return _parse_tsv(body, base, name)
    return [_Entry(None, _resolve(base, ln.strip()), {}) for ln in body]


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def _read_manifest(path: Path) -> list[_Entry]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: spreadsheets save TSV with a byte-order mark
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read manifest {path}: {e}") from None
    body = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    if not body:
        raise CorpusError(f"manifest {path} is empty (expected a header row with id and path)")
    if _is_fairseq_manifest(body):
        root = _resolve(path.parent, body[0].strip())
        return [_Entry(None, _resolve(root, ln.split("\t")[0]), {}) for ln in body[1:]]
    return _parse_tsv(body, path.parent, str(path))


def _is_fairseq_manifest(lines: Sequence[str]) -> bool:
    """fairseq's audio manifest: a root folder alone on the first line, then ``path<TAB>samples``."""
    if "\t" in lines[0] or len(lines) < 2:
        return False
    fields = lines[1].split("\t")
    return len(fields) == 2 and fields[1].strip().isdigit()


def _parse_tsv(lines: Sequence[str], base: Path, name: str) -> list[_Entry]:
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader)
    missing = [c for c in ("id", "path") if c not in header]
    if missing:
        raise CorpusError(
            f"manifest {name}: header lacks column(s) {', '.join(missing)} (found: {', '.join(header)})"
        )
    if len(set(header)) != len(header):
        raise CorpusError(f"manifest {name}: duplicate column names in header")
    out = []
    for lineno, row in enumerate(reader, start=2):
        if len(row) > len(header):
            raise CorpusError(f"manifest {name} line {lineno}: {len(row)} fields, header has {len(header)}")
        rec = dict(zip(header, row + [""] * (len(header) - len(row))))
        uid, path = rec.pop("id").strip(), rec.pop("path").strip()
        if not uid or not path:
            raise CorpusError(f"manifest {name} line {lineno}: empty id or path")
        out.append(_Entry(uid, _resolve(base, path), rec))
    return out


def _audio_files(root: Path) -> list[Path]:
    """Audio files under ``root``, sorted; hidden files and folders are left out (macOS's ``._x.wav``
    resource forks, ``.Trash``, ``.git``): they are not recordings, and ``._`` files would fail to decode."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _read_dir(root: Path) -> list[_Entry]:
    files = _audio_files(root)
    if not files:
        raise CorpusError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) found under {root}")
    return [_Entry(None, f, {}) for f in files]


def _is_librispeech(root: Path) -> bool:
    return next(root.rglob("*.trans.txt"), None) is not None


def _read_librispeech(root: Path) -> list[_Entry]:
    out = []
    for trans in sorted(root.rglob("*.trans.txt")):
        rel = trans.relative_to(root).parts
        split = _split_name(rel[0]) if len(rel) > 3 else ""
        for ln in trans.read_text(encoding="utf-8").splitlines():
            if not ln.strip():
                continue
            uid, _, text = ln.partition(" ")
            path = trans.parent / f"{uid}.flac"
            labels = {"speaker": uid.split("-")[0], "text": text.strip()}
            if split:
                labels["split"] = split
            out.append(_Entry(uid, path, labels))
    return out


def _split_name(folder: str) -> str:
    for s in ("train", "dev", "test"):
        if folder.startswith(s):
            return s
    return folder


def _apply_pattern(entries: list[_Entry], pattern: str) -> None:
    """``{label}_{speaker}_{take}`` -> a regex with named groups, matched on each file stem."""
    names = re.findall(r"{(\w+)}", pattern)
    if not names:
        raise CorpusError(f"corpus pattern {pattern!r} has no {{field}} (e.g. '{{label}}_{{speaker}}_{{take}}')")
    regex = ""
    for lit, name in re.findall(r"([^{]*)(?:{(\w+)})?", pattern):
        regex += re.escape(lit) + (f"(?P<{name}>.+?)" if name else "")
    rx = re.compile("^" + regex + "$")
    for e in entries:
        m = rx.match(e.path.stem)
        if not m:
            raise CorpusError(f"{e.path.name}: file name does not match pattern {pattern!r}")
        e.labels.update(m.groupdict())


def _assign_ids(entries: list[_Entry]) -> None:
    """Files without an explicit id get their stem, or their path without suffix if stems clash."""
    unnamed = [e for e in entries if e.id is None]
    if not unnamed:
        return
    stems = [e.path.stem for e in unnamed]
    unique = len(set(stems)) == len(stems)
    for e in unnamed:
        e.id = e.path.stem if unique else str(e.path.with_suffix("")).lstrip("/")


def _validate(spec: str, entries: list[_Entry], on_error: str, min_samples_16k: int = 0,
              skip_hint: str = "") -> Corpus:
    if not entries:
        raise CorpusError(f"corpus {spec} lists no utterances")
    seen: dict[str, Path] = {}
    dups: list[str] = []
    for e in entries:
        assert e.id is not None
        if e.id in seen:
            dups.append(f"duplicate id {e.id}: {seen[e.id]} and {e.path}")
        else:
            seen[e.id] = e.path
    utts: list[Utterance] = []
    problems: dict[str, str] = {}
    for e in entries:
        assert e.id is not None
        if e.id in problems:
            continue
        try:
            info = audio_info(e.path)
        except AudioError as err:
            problems[e.id] = str(err)
            continue
        u = Utterance(e.id, e.path, info.n_samples, info.sample_rate, e.labels)
        if u.n_samples_16k < min_samples_16k:
            problems[e.id] = (f"{e.path}: too short ({u.n_samples_16k} samples at 16 kHz; the model needs "
                              f"at least {min_samples_16k})")
            continue
        utts.append(u)
    if dups:  # never skippable, but named together with every other problem
        raise CorpusError(_listing(f"corpus {spec}", dups + list(problems.values())))
    if problems and on_error == "fail":
        raise CorpusError(_listing(f"corpus {spec}", list(problems.values())) + (f"\n{skip_hint}" if skip_hint else ""))
    if not utts:
        raise CorpusError(_listing(f"corpus {spec}: no readable audio", list(problems.values())))
    return Corpus(spec, utts, problems)


def _relative_to(p: Path, base: Path) -> str:
    """``p`` relative to ``base`` (with ``..`` where needed), POSIX separators."""
    import os

    return Path(os.path.relpath(p, base)).as_posix()


def _listing(head: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n  ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"{head}: {len(items)} problem(s):\n  " + "\n  ".join(shown) + more


def write_manifest(path: Path, utterances: Sequence[Utterance] | Sequence[dict[str, str]], columns: Sequence[str]) -> None:
    """Write a TSV manifest (``id``, ``path`` and ``columns``) with paths relative to its folder,
    which is how :func:`read_corpus` reads them back.

    An :class:`Utterance`'s path (absolute, or relative to the working directory) is rewritten
    relative to the manifest's folder; a record's ``path`` is taken as already relative to it
    unless it is absolute.
    """
    path = Path(path)
    base = path.parent.resolve()
    rows = []
    for u in utterances:
        if isinstance(u, Utterance):
            rec = {"id": u.id, "path": _relative_to(u.path.resolve(), base), **u.labels}
        else:
            rec = dict(u)
            if "path" in rec and Path(rec["path"]).is_absolute():
                rec["path"] = _relative_to(Path(rec["path"]), base)
        rows.append(rec)
    header = ["id", "path", *[c for c in columns if c not in ("id", "path")]]
    lines = ["\t".join(header) + "\n"]
    for rec in rows:
        vals = [str(rec.get(c, "")) for c in header]
        if any("\t" in v or "\n" in v for v in vals):
            raise CorpusError(f"manifest {path}: a value of {rec['id']} contains a tab or newline")
        lines.append("\t".join(vals) + "\n")
    write_text(path, "".join(lines))
