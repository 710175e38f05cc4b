"""ofactl.corpus_kaldi: a Kaldi data folder reads as a corpus; commands are never run."""

from __future__ import annotations

import pytest

from ofactl.audio import read_corpus
from ofactl.errors import CorpusError


def test_a_kaldi_folder_reads_ids_audio_speakers_and_text(write_wav, tmp_path, monkeypatch):
    a, b = write_wav("audio/a.wav"), write_wav("audio/b.flac", seconds=0.3)
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    (data / "wav.scp").write_text(f"utt-1 {a}\nutt-2 flac -c -d -s {b} |\n\nutt-3 audio/a.wav\n")
    (data / "utt2spk").write_text("utt-1 spk-a\nutt-2 spk-b\nutt-3 spk-a\n")
    (data / "text").write_text("utt-1 GO DO YOU HEAR\nutt-3 YES\n")
    monkeypatch.chdir(tmp_path)  # a relative path is from the current folder, as in a Kaldi recipe
    for spec in (data, data / "wav.scp"):
        c = read_corpus(spec)
        assert [u.id for u in c] == ["utt-1", "utt-2", "utt-3"]
        assert [u.path for u in c] == [a, b, a.relative_to(tmp_path)]  # the FLAC decode: its file, read directly
        assert [u.labels for u in c] == [{"speaker": "spk-a", "text": "GO DO YOU HEAR"}, {"speaker": "spk-b"},
                                         {"speaker": "spk-a", "text": "YES"}]
        assert c[1].n_samples_16k == 4800


def test_commands_segments_and_bare_ids_are_refused_naming_the_lines(tmp_path):
    scp = tmp_path / "wav.scp"
    scp.write_text("u1 sox a.wav -t wav - speed 0.9 |\nu2\nu3 flac -c -d -s a.flac b.flac |\nu4 dump/wav.ark:1234\n")
    with pytest.raises(CorpusError) as e:
        read_corpus(scp)
    msg = str(e.value)
    assert msg.startswith(f"{scp}: 4 line(s) ofactl cannot read")
    assert "line 4: 'dump/wav.ark:1234' is a place in a Kaldi archive" in msg
    assert "line 1: 'sox a.wav -t wav - speed 0.9 |' runs a command; ofactl runs none" in msg  # an effect, not a decode
    assert "line 2: an id without audio" in msg and "line 3: 'flac -c -d -s a.flac b.flac |'" in msg
    (tmp_path / "segments").write_text("u1 rec1 0.0 1.5\n")
    with pytest.raises(CorpusError, match="segments: utterances cut from longer recordings are not read"):
        read_corpus(tmp_path)
