"""Kaldi data folders as corpora: ``wav.scp`` (ids and audio), with ``utt2spk`` and ``text`` as
the ``speaker`` and ``text`` labels when they are there.

ofactl runs no commands: a ``wav.scp`` line that pipes audio through a program (``... |``) is
refused, as is a place in an archive (``x.ark:123``), except the plain FLAC decode of Kaldi's
LibriSpeech recipe (``flac -c -d -s FILE |``), whose file is read directly, since decoding it is
all that command does. Relative paths are taken from the current folder, as Kaldi's tools take
them (recipes run from their top folder).
"""

from __future__ import annotations

import re
from pathlib import Path

from ofactl.errors import CorpusError

SCP = "wav.scp"
_FLAC_DECODE_FLAGS = {"-c", "-d", "-s", "--decode", "--stdout", "--silent"}  # decode to stdout, quietly


def is_kaldi_folder(folder: Path) -> bool:
    """A Kaldi data folder: one holding ``wav.scp``."""
    return (folder / SCP).is_file()


def read_kaldi(spec: Path) -> list[tuple[str, Path, dict[str, str]]]:
    """(id, audio path, labels) per ``wav.scp`` line of the folder ``spec`` (or of ``spec`` itself,
    a ``wav.scp``), in file order; one error naming every line ofactl cannot read."""
    scp = spec / SCP if spec.is_dir() else spec
    folder = scp.parent
    if (folder / "segments").is_file():
        raise CorpusError(f"{folder / 'segments'}: utterances cut from longer recordings are not read; "
                          "write each segment to its own file and list those")
    entries: list[tuple[str, Path, dict[str, str]]] = []
    problems: list[str] = []
    for lineno, line in _lines(scp):
        uid, _, rest = line.partition(" ")
        path = _audio_path(rest.strip())
        if not rest.strip():
            problems.append(f"line {lineno}: an id without audio")
        elif re.search(r"\.ark:\d+$", rest.strip()):
            problems.append(f"line {lineno}: '{rest.strip()[:80]}' is a place in a Kaldi archive; ofactl reads "
                            "audio files: list those")
        elif path is None:
            problems.append(f"line {lineno}: '{rest.strip()[:80]}' runs a command; ofactl runs none: write "
                            "the audio to files and list those")
        else:
            entries.append((uid, path, {}))
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise CorpusError(f"{scp}: {len(problems)} line(s) ofactl cannot read:\n  {shown}")
    for name, column in (("utt2spk", "speaker"), ("text", "text")):
        labels = dict(_pairs(folder / name)) if (folder / name).is_file() else {}
        for uid, _, row in entries:
            if uid in labels:
                row[column] = labels[uid]
    return entries


def _lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines with their numbers, or one error naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read {path}: {e}") from None
    return [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()]


def _pairs(path: Path) -> list[tuple[str, str]]:
    """``id value`` lines of ``utt2spk`` or ``text`` (the value may hold spaces)."""
    return [(uid, value.strip()) for _, ln in _lines(path) for uid, _, value in [ln.partition(" ")]]


def _audio_path(rest: str) -> Path | None:
    """The file a ``wav.scp`` entry names: the path itself, or the one file of a plain FLAC decode;
    None for any other command."""
    if not rest.endswith("|"):
        return Path(rest).expanduser()
    words = rest[:-1].split()
    if words[:1] != ["flac"]:
        return None
    flags = {w for w in words[1:] if w.startswith("-")}
    files = [w for w in words[1:] if not w.startswith("-")]
    plain_decode = flags <= _FLAC_DECODE_FLAGS and bool(flags & {"-d", "--decode"}) and len(files) == 1
    return Path(files[0]).expanduser() if plain_decode else None
