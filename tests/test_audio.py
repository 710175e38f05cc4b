from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from ofactl.audio import SAMPLE_RATE, audio_info, load_audio, read_corpus, resampled_length, write_manifest
from ofactl.errors import AudioError, CorpusError


@pytest.mark.parametrize("name,subtype", [("a.wav", None), ("a.flac", None), ("a.ogg", "VORBIS"),
                                          ("a.opus", "OPUS")])
def test_decode_formats(write_wav, name, subtype):
    p = write_wav(name, seconds=0.5, sr=16000, subtype=subtype)
    wav = load_audio(p)
    assert wav.dtype.__str__() == "torch.float32"
    assert wav.ndim == 1 and abs(len(wav) - 8000) <= 1
    assert float(wav.abs().max()) == pytest.approx(0.3, abs=0.05)


def test_stereo_is_mixed_down(tmp_path):
    x = np.stack([np.full(1600, 0.5, np.float32), np.full(1600, -0.1, np.float32)], axis=1)
    p = tmp_path / "st.wav"
    sf.write(p, x, 16000, subtype="FLOAT")
    assert audio_info(p).channels == 2
    wav = load_audio(p)
    assert wav.shape == (1600,)
    assert float(wav.mean()) == pytest.approx(0.2, abs=1e-6)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resampled_length(write_wav, sr):
    p = write_wav(f"r{sr}.wav", seconds=1.2345, sr=sr)
    n = audio_info(p).n_samples
    wav = load_audio(p)
    expected = n * SAMPLE_RATE / sr
    assert abs(len(wav) - expected) <= 1
    assert len(wav) == resampled_length(n, sr)


def test_bad_files_named(tmp_path, write_wav):
    empty = tmp_path / "zero.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    nan = tmp_path / "nan.wav"
    x = np.zeros(800, np.float32)
    x[100] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    flac = write_wav("long.flac", seconds=3.0, sr=16000)
    data = flac.read_bytes()
    trunc = tmp_path / "trunc.flac"
    trunc.write_bytes(data[: len(data) // 2])

    with pytest.raises(AudioError, match=r"zero\.wav: empty file"):
        load_audio(empty)
    with pytest.raises(AudioError, match=r"notes\.wav: not a readable audio file"):
        load_audio(text)
    with pytest.raises(AudioError, match=r"nan\.wav: contains NaN or Inf"):
        load_audio(nan)
    with pytest.raises(AudioError, match=r"trunc\.flac: .*(truncated|decode)"):
        load_audio(trunc)
    with pytest.raises(AudioError, match=r"missing\.wav: file not found"):
        load_audio(tmp_path / "missing.wav")


def test_a_wav_cut_short_is_named_with_what_its_header_declares(tmp_path, write_wav):
    full = write_wav("full.wav", seconds=1.0, sr=8000)  # 8,000 frames of 16-bit samples
    data = full.read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) - 4000])  # 2,000 frames lost
    with pytest.raises(AudioError, match=r"cut\.wav: truncated or corrupt: header says 8000 samples, the file "
                       r"holds 6000"):
        audio_info(tmp_path / "cut.wav")
    assert audio_info(full).n_samples == 8000  # whole: read as before
    stream = bytearray(data)  # a header written before the length was known: read to the end
    at = data.index(b"data") + 4
    stream[at : at + 4] = (0xFFFFFFFF).to_bytes(4, "little")
    (tmp_path / "stream.wav").write_bytes(bytes(stream[: len(data) - 4000]))
    assert audio_info(tmp_path / "stream.wav").n_samples == 6000
    stereo = write_wav("stereo.wav", seconds=1.0, sr=8000, channels=2, subtype="PCM_24")  # 6 bytes a frame
    (tmp_path / "cut2.wav").write_bytes(stereo.read_bytes()[:-600])
    with pytest.raises(AudioError, match=r"cut2\.wav: .* header says 8000 samples, the file holds 7900"):
        audio_info(tmp_path / "cut2.wav")
    with pytest.raises(CorpusError, match=r"cut\.wav: truncated"):  # a corpus names it before any work
        read_corpus(tmp_path)


def test_directory_corpus_and_pattern(write_wav, tmp_path):
    write_wav("d/3_anna_0.wav")
    write_wav("d/sub/5_bob_1.flac", sr=8000)
    write_wav("d/sub/7_cleo_2.opus", sr=16000, subtype="OPUS")
    c = read_corpus(tmp_path / "d")
    assert sorted(u.id for u in c) == ["3_anna_0", "5_bob_1", "7_cleo_2"]
    u = {u.id: u for u in c}["5_bob_1"]
    assert u.sample_rate == 8000 and u.n_samples == 4000 and u.n_samples_16k == 8000
    c2 = read_corpus(f"{tmp_path / 'd'}::{{label}}_{{speaker}}_{{take}}")
    assert {u.id: (u.labels["label"], u.labels["speaker"]) for u in c2} == {
        "3_anna_0": ("3", "anna"), "5_bob_1": ("5", "bob"), "7_cleo_2": ("7", "cleo")}
    with pytest.raises(CorpusError, match="does not match pattern"):
        read_corpus(f"{tmp_path / 'd'}::{{label}}-{{speaker}}")


def test_a_folder_corpus_leaves_out_hidden_files_and_folders(write_wav, tmp_path):
    write_wav(".data/d/3_anna_0.wav")  # a hidden folder above the corpus root does not count
    write_wav(".data/d/sub/5_bob_1.wav")
    (tmp_path / ".data/d/._3_anna_0.wav").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork
    write_wav(".data/d/.Trash/7_cleo_2.wav")
    c = read_corpus(tmp_path / ".data" / "d")
    assert sorted(u.id for u in c) == ["3_anna_0", "5_bob_1"]


def test_a_manifest_saved_with_a_byte_order_mark_and_crlf_reads_as_plain(write_wav, tmp_path):
    write_wav("a.wav")
    (tmp_path / "m.tsv").write_bytes(b"\xef\xbb\xbfid\tpath\tlabel\r\nu1\ta.wav\tyes\r\n")
    (tmp_path / "m.txt").write_bytes(b"\xef\xbb\xbfid\tpath\r\nu1\ta.wav\r\n")
    assert [(u.id, u.labels) for u in read_corpus(tmp_path / "m.tsv")] == [("u1", {"label": "yes"})]
    assert [u.id for u in read_corpus(tmp_path / "m.txt")] == ["u1"]
    assert [u.id for u in read_corpus("-", stdin=io.StringIO(f"\ufeff{tmp_path / 'a.wav'}\n"))] == ["a"]


def test_directory_with_a_manifest_is_read_through_it(write_wav, tmp_path):
    write_wav("m/wav/a.wav")
    write_wav("m/wav/b.wav")
    write_wav("m/stray.wav")  # not in the manifest: a folder ofactl made lists what belongs to it
    (tmp_path / "m/manifest.tsv").write_text("id\tpath\tspeaker\nu1\twav/a.wav\tanna\nu2\twav/b.wav\tbob\n")
    c = read_corpus(tmp_path / "m")
    assert [(u.id, u.labels["speaker"]) for u in c] == [("u1", "anna"), ("u2", "bob")]
    assert c.fingerprint() == read_corpus(tmp_path / "m/manifest.tsv").fingerprint()
    (tmp_path / "m/manifest.tsv").write_text("id\tpath\nu1\twav/missing.wav\n")
    with pytest.raises(CorpusError, match=r"missing\.wav"):  # its errors are the manifest's
        read_corpus(tmp_path / "m")


def test_stem_clash_falls_back_to_paths(write_wav, tmp_path):
    write_wav("c/a/x.wav")
    write_wav("c/b/x.wav")
    ids = sorted(u.id for u in read_corpus(tmp_path / "c"))
    assert len(ids) == 2 and ids[0] != ids[1] and all(i.endswith("x") for i in ids)


def test_librispeech_layout(write_wav, tmp_path):
    root = tmp_path / "LibriSpeech"
    for uid in ("84-121123-0000", "84-121123-0001"):
        write_wav(f"LibriSpeech/dev-clean/84/121123/{uid}.flac", seconds=0.3)
    (root / "dev-clean/84/121123/84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n")
    c = read_corpus(root)
    assert [u.id for u in c] == ["84-121123-0000", "84-121123-0001"]
    assert c[1].labels == {"speaker": "84", "text": "BUT IN LESS THAN FIVE MINUTES", "split": "dev"}


def test_a_fairseq_manifest_reads_its_root_and_relative_paths(write_wav, tmp_path):
    write_wav("fs/audio/84/a.flac", seconds=0.3)
    write_wav("fs/audio/85/b.flac", seconds=0.5)
    man = tmp_path / "fs/train.tsv"
    man.write_text(f"{tmp_path / 'fs/audio'}\n84/a.flac\t4800\n85/b.flac\t8000\n")  # absolute root
    c = read_corpus(man)
    assert [u.id for u in c] == ["a", "b"] and c[1].path == tmp_path / "fs/audio/85/b.flac"
    assert [u.n_samples for u in c] == [4800, 8000] and c[0].labels == {}
    man.write_text("audio\n84/a.flac\t4800\n85/gone.flac\t8000\n")  # a relative root: from the manifest's folder
    with pytest.raises(CorpusError, match=r"(?s)1 problem.*fs/audio/85/gone.flac: file not found"):
        read_corpus(man)
    man.write_text("audio\n")  # a root alone is no fairseq manifest: the header error says what is expected
    with pytest.raises(CorpusError, match="header lacks column"):
        read_corpus(man)


def test_manifest_and_errors_reported_together(write_wav, tmp_path):
    write_wav("m/a.wav")
    (tmp_path / "m/bad.wav").write_text("nope")
    man = tmp_path / "m/manifest.tsv"
    man.write_text("id\tpath\tspeaker\tlabel\na\ta.wav\ts1\tyes\nb\tgone.wav\ts2\tno\nc\tbad.wav\ts1\tno\n")
    with pytest.raises(CorpusError) as e:
        read_corpus(man)
    msg = str(e.value)
    assert "2 problem(s)" in msg and "gone.wav: file not found" in msg and "bad.wav" in msg
    c = read_corpus(man, on_error="skip")
    assert [u.id for u in c] == ["a"] and set(c.problems) == {"b", "c"}
    assert c[0].labels == {"speaker": "s1", "label": "yes"}


def test_manifest_header_and_duplicates(write_wav, tmp_path):
    write_wav("n/a.wav")
    p = tmp_path / "n/no_id.tsv"
    p.write_text("name\tpath\na\ta.wav\n")
    with pytest.raises(CorpusError, match="header lacks column"):
        read_corpus(p)
    d = tmp_path / "n/dup.tsv"
    d.write_text("id\tpath\na\ta.wav\na\ta.wav\n")
    with pytest.raises(CorpusError, match="duplicate id a"):
        read_corpus(d)


def test_list_file_and_stdin(write_wav, tmp_path):
    a = write_wav("l/a.wav")
    b = write_wav("l/b.flac")
    lst = tmp_path / "l/files.txt"
    lst.write_text(f"# inputs\n{a}\n\nb.flac\n")
    assert [u.id for u in read_corpus(lst)] == ["a", "b"]
    c = read_corpus("-", stdin=io.StringIO(f"{a}\n{b}\n"))
    assert [u.path for u in c] == [a, b]
    c2 = read_corpus("-", stdin=io.StringIO(f"id\tpath\tlabel\nx\t{a}\tyes\n"))
    assert c2[0].id == "x" and c2[0].labels == {"label": "yes"}


def test_missing_corpus_is_clear(tmp_path):
    with pytest.raises(CorpusError, match="corpus not found"):
        read_corpus(tmp_path / "nothing")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CorpusError, match="no audio files"):
        read_corpus(tmp_path / "emptydir")


def test_write_manifest_round_trip(write_wav, tmp_path):
    write_wav("w/a.wav")
    rows = [{"id": "a", "path": "a.wav", "label": "yes", "text": "hello world"}]
    write_manifest(tmp_path / "w/m.tsv", rows, ["label", "text"])
    c = read_corpus(tmp_path / "w/m.tsv")
    assert c[0].labels == {"label": "yes", "text": "hello world"}
    assert c.fingerprint() == read_corpus(tmp_path / "w/m.tsv").fingerprint()


def test_fsdd_as_directory_corpus(fsdd_dir):
    c = read_corpus(f"{fsdd_dir}::{{label}}_{{speaker}}_{{take}}")
    assert len(c) == 3000
    assert {u.sample_rate for u in c} == {8000}
    assert len({u.labels["speaker"] for u in c}) == 6
    assert sorted({u.labels["label"] for u in c}) == [str(d) for d in range(10)]
    wav = load_audio(c[0].path)
    assert len(wav) == c[0].n_samples_16k


def test_write_manifest_of_utterances_elsewhere_reads_back_the_same_files(write_wav, tmp_path, monkeypatch):
    write_wav("audio/a.wav")
    write_wav("audio/sub/b.wav", seconds=0.7)
    monkeypatch.chdir(tmp_path)
    src = read_corpus("audio")  # paths relative to the working directory
    assert not src[0].path.is_absolute()
    out = tmp_path / "lists/deep/m.tsv"
    out.parent.mkdir(parents=True)
    write_manifest(out, list(src), [])
    text = out.read_text()
    assert "../../audio/sub/b.wav" in text  # relative to the manifest's folder, as promised
    back = read_corpus(out)
    assert [u.path.resolve() for u in back] == [u.path.resolve() for u in src]
    assert [u.n_samples for u in back] == [u.n_samples for u in src]
    # an absolute record path is made relative too
    write_manifest(out, [{"id": "a", "path": str((tmp_path / "audio/a.wav").resolve())}], [])
    assert read_corpus(out)[0].path.resolve() == (tmp_path / "audio/a.wav").resolve()


def test_set_level_reaches_the_level_and_keeps_silence():
    import torch

    from ofactl.audio import level_dbfs, set_level

    w = torch.sin(torch.arange(16000) * 0.05) * 0.5  # a sine of amplitude 0.5: -9.03 dBFS
    assert level_dbfs(w) == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=0.01)  # not whole periods
    for db in (-60.0, -25.0, 0.0):
        out = set_level(w, db)
        assert level_dbfs(out) == pytest.approx(db, abs=1e-4)
        assert torch.allclose(out / out.abs().max(), w / w.abs().max(), atol=1e-6)  # a gain, nothing else
        assert torch.equal(set_level(w, db, level_dbfs(w)), out)  # a level measured before is the same level
    silence = torch.zeros(800)
    assert level_dbfs(silence) == -160 and torch.equal(set_level(silence, -25.0), silence)


def test_median_level_is_the_middle_of_the_recordings_levels(tmp_path):
    from ofactl.audio import median_level_db

    x = np.sin(2 * np.pi * 200 * np.arange(16000) / 16000).astype(np.float32)  # RMS 1/sqrt(2): -3.01 dBFS
    for i, db in enumerate((-50, -30, -20, -10, -40, -60)):
        sf.write(tmp_path / f"u{i}.wav", x * np.float32(10 ** ((db + 3.0103) / 20)), 16000, subtype="FLOAT")
    sf.write(tmp_path / "u6.wav", np.zeros(8000, np.float32), 16000, subtype="FLOAT")
    utts = list(read_corpus(tmp_path))
    (tmp_path / "u5.wav").write_bytes(b"RIFF no longer audio")  # damaged after the corpus was read
    assert median_level_db(utts) == -30.0  # digital silence and a file that does not decode are not levels
    few = median_level_db(utts, sample=3, seed=1)
    assert -50 <= few <= -10 and few == median_level_db(utts, sample=3, seed=1)  # a median of three drawn
    assert {median_level_db(utts, sample=1, seed=s) for s in range(20)} > {-30.0}  # the seed draws the sample
    assert median_level_db([]) is None
