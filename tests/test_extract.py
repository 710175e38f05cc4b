from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ofactl.audio import load_audio, read_corpus
from ofactl.checkpoint import save_student
from ofactl.cli import app
from ofactl.config import load_config
from ofactl.errors import AudioError, ConfigError, StoreError
from ofactl.extract import ExtractConfig, run_extract
from ofactl.model.student import Student, student_config
from ofactl.storage import open_store

# device cpu: these tests compare stores with fp32 CPU forwards (on a GPU machine "auto" would
# extract on CUDA in bf16); tests/test_cuda.py covers the CUDA path
CFG = ExtractConfig(rates=(1.0, 0.5), num_workers=0, block_utts=4, chunk_frames=16, batch_seconds=3.0,
                    dtype="float32", device="cpu")


def extract(tmp, corpus, cfg=CFG, name="f.zarr", ckpt=None, **kw):
    return run_extract(cfg, ckpt, corpus, tmp / name, **kw)


def all_feats(path, rate):
    return open_store(path).group(rate).load_all()


@pytest.mark.slow
def test_round_trip_equals_student_output(tmp_path, synth_corpus, student_ckpt):
    ckpt, s = student_ckpt
    res = extract(tmp_path, synth_corpus, ckpt=ckpt)
    assert all(g.complete and g.written == g.utterances for g in res.groups)
    g = open_store(tmp_path / "f.zarr").group(0.5)
    corpus = read_corpus(synth_corpus)
    for u in list(corpus)[:5]:
        wav = load_audio(u.path)[None]
        ref = s(wav, torch.tensor([wav.shape[1]]), rate=0.5, with_heads=False).hidden.states[0].detach()
        got = g[u.id]
        assert got.shape == tuple(ref.shape)
        assert np.allclose(got, ref.numpy(), atol=1e-4)
    a = g.attrs
    assert a["mode"] == "exact" and a["layers"] == [0, 1, 2] and a["complete"]
    assert abs(a["achieved_rate"] - 0.5) < 0.05 and a["frame_period_ms"] == 40.0


@pytest.mark.slow
def test_multi_rate_pass_equals_single_rate_runs(tmp_path, synth_corpus, student_ckpt):
    ckpt, _ = student_ckpt
    extract(tmp_path, synth_corpus, ckpt=ckpt, name="multi.zarr")
    extract(tmp_path, synth_corpus, cfg=replace(CFG, rates=(0.5,)), ckpt=ckpt, name="single.zarr")
    a, b = all_feats(tmp_path / "multi.zarr", 0.5), all_feats(tmp_path / "single.zarr", 0.5)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_cache_hit_does_no_model_work(tmp_path, synth_corpus, student_ckpt, monkeypatch):
    ckpt, _ = student_ckpt
    extract(tmp_path, synth_corpus, ckpt=ckpt)
    calls = []
    orig = Student.features
    monkeypatch.setattr(Student, "features", lambda *a, **k: calls.append(1) or orig(*a, **k))
    res = extract(tmp_path, synth_corpus, ckpt=ckpt)
    assert calls == [] and all(g.reused == g.utterances and g.written == 0 for g in res.groups)


@pytest.mark.parametrize("place", ["a file", "a folder of other files"])
def test_a_store_is_never_made_over_a_file_or_among_other_files(tmp_path, synth_corpus, student_ckpt, place):
    target = tmp_path / "f.zarr"
    if place == "a file":
        target.write_text("notes\n")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("notes\n")
    with pytest.raises(StoreError, match="f.zarr is a (file|folder of other files), not a feature store"):
        extract(tmp_path, synth_corpus, ckpt=student_ckpt[0])
    kept = target if place == "a file" else target / "notes.txt"
    assert kept.read_text() == "notes\n" and not (target.is_dir() and (target / "zarr.json").exists())


@pytest.mark.slow
def test_mismatch_is_refused_unless_overwrite(tmp_path, synth_corpus, student_ckpt):
    ckpt, _ = student_ckpt
    extract(tmp_path, synth_corpus, ckpt=ckpt)
    torch.manual_seed(5)
    other = save_student(tmp_path / "other.pt", Student(student_config("tiny")))
    with pytest.raises(StoreError, match="another checkpoint.*--overwrite"):
        extract(tmp_path, synth_corpus, ckpt=other)
    with pytest.raises(StoreError, match="another layer set"):
        extract(tmp_path, synth_corpus, cfg=replace(CFG, layers="0,2"), ckpt=ckpt)
    res = extract(tmp_path, synth_corpus, cfg=replace(CFG, layers="0,2"), ckpt=ckpt, overwrite=True)
    assert open_store(tmp_path / "f.zarr").group(0.5).attrs["layers"] == [0, 2]
    assert all(g.written == g.utterances for g in res.groups)


def test_lock_refusal_and_stale_takeover(tmp_path, synth_corpus, student_ckpt):
    ckpt, _ = student_ckpt
    locks = Path(str(tmp_path / "f.zarr") + ".locks")
    locks.mkdir()
    live = locks / "rate=1.000.lock"
    live.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(StoreError, match=f"being written by process {os.getpid()}"):
        extract(tmp_path, synth_corpus, ckpt=ckpt)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    from ofactl.progress import NullProgress

    p = NullProgress()
    res = extract(tmp_path, synth_corpus, ckpt=ckpt, progress=p)
    assert all(g.complete for g in res.groups)
    assert any("stale lock" in m for m in p.messages)
    assert not live.exists()


@pytest.mark.slow
def test_shards_equal_one_process(tmp_path, synth_corpus, student_ckpt):
    ckpt, _ = student_ckpt
    extract(tmp_path, synth_corpus, ckpt=ckpt, name="one.zarr")
    r0 = extract(tmp_path, synth_corpus, ckpt=ckpt, name="sh.zarr", shard=(0, 2))
    assert not any(g.complete for g in r0.groups)
    r1 = extract(tmp_path, synth_corpus, ckpt=ckpt, name="sh.zarr", shard=(1, 2))
    assert all(g.complete for g in r1.groups)
    for rate in (1.0, 0.5):
        a, b = all_feats(tmp_path / "one.zarr", rate), all_feats(tmp_path / "sh.zarr", rate)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert open_store(tmp_path / "sh.zarr").group(rate).attrs["complete"]


@pytest.mark.slow
def test_adaptive_length_mode(tmp_path, synth_corpus, student_ckpt):
    ckpt, s = student_ckpt
    res = extract(tmp_path, synth_corpus, cfg=replace(CFG, rates=(0.5,), adaptive_length=True), ckpt=ckpt)
    g = open_store(tmp_path / "f.zarr").group(0.5)
    assert g.attrs["mode"] == "adaptive" and res.groups[0].complete
    u = read_corpus(synth_corpus)[3]
    wav = load_audio(u.path)[None]
    ref = s(wav, torch.tensor([wav.shape[1]]), rate=0.5, exact=False, with_heads=False).hidden.states[0].detach()
    assert np.allclose(g[u.id], ref.numpy(), atol=1e-4)
    # packed: each block's utterances are contiguous from the block start
    offs, lens = g.offsets, g.lengths
    assert all(offs[i + 1] == offs[i] + lens[i] for i in range(3))


@pytest.fixture
def bad_corpus(tmp_path, synth_corpus):
    rows = synth_corpus.read_text().splitlines()
    base = synth_corpus.parent
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.wav").write_bytes(b"")
    (bad / "text.wav").write_text("not audio " * 100)
    good = [r.split("\t") for r in rows[1:8]]
    lines = ["id\tpath"] + [f"{g[0]}\t{base / g[1]}" for g in good]
    lines.insert(4, f"zero\t{bad / 'zero.wav'}")
    lines.insert(6, f"text\t{bad / 'text.wav'}")
    man = tmp_path / "bad.tsv"
    man.write_text("\n".join(lines) + "\n")
    return man


def test_skip_records_errors_and_completes(tmp_path, bad_corpus, student_ckpt):
    ckpt, _ = student_ckpt
    res = extract(tmp_path, bad_corpus, cfg=replace(CFG, on_error="skip"), ckpt=ckpt)
    assert set(res.corpus_problems) == {"zero", "text"} and res.warnings == 2
    g = open_store(tmp_path / "f.zarr").group(0.5)
    assert len(g) == 7 and g.attrs["complete"]
    assert set(g.attrs["errors"]) == {"zero", "text"} and "empty file" in g.attrs["errors"]["zero"]
    # each group counts what it lacks, as `ofactl info` lists it, on a rerun that reuses everything too
    again = extract(tmp_path, bad_corpus, cfg=replace(CFG, on_error="skip"), ckpt=ckpt)
    info = json.loads(CliRunner().invoke(app, ["info", str(tmp_path / "f.zarr"), "--json"]).stdout)
    for r in (res, again):
        assert [x.skipped for x in r.groups] == [x["skipped_inputs"] for x in info["groups"]] == [2, 2]
        assert r.warnings == r.to_json()["skipped_inputs"] == 2


def test_fail_stops_naming_the_file(tmp_path, bad_corpus, student_ckpt):
    from ofactl.errors import CorpusError

    ckpt, _ = student_ckpt
    with pytest.raises(CorpusError, match="zero.wav: empty file") as e:
        extract(tmp_path, bad_corpus, ckpt=ckpt)
    assert str(e.value).endswith("\n--on-error skip leaves these files out, records why in the store, and goes on")


@pytest.mark.slow
def test_decode_failure_mid_run_keeps_written_work(tmp_path, synth_corpus, student_ckpt, monkeypatch):
    """A file that breaks only at decode time: fail stops there, written work survives, rerun resumes."""
    ckpt, _ = student_ckpt
    corpus = read_corpus(synth_corpus)
    victim = sorted(corpus, key=lambda u: (u.n_samples_16k, u.id))[9].id
    import ofactl.extract as ex

    real = ex.load_audio

    def flaky(path):
        if Path(path).stem == victim:
            raise AudioError(f"{path}: truncated or corrupt")
        return real(path)

    monkeypatch.setattr(ex, "load_audio", flaky)
    with pytest.raises(AudioError, match=f"{victim}.wav: truncated or corrupt; the features written so far are kept "
                       r"\(--on-error skip records such a file"):
        extract(tmp_path, synth_corpus, cfg=replace(CFG, rates=(0.5,)), ckpt=ckpt)
    g = open_store(tmp_path / "f.zarr").group(0.5)
    assert 0 < int(g.done.sum()) < len(g)
    monkeypatch.setattr(ex, "load_audio", real)
    res = extract(tmp_path, synth_corpus, cfg=replace(CFG, rates=(0.5,)), ckpt=ckpt)
    assert res.groups[0].complete and res.groups[0].reused > 0


def test_disk_full_is_refused_up_front(tmp_path, synth_corpus, student_ckpt, monkeypatch):
    ckpt, _ = student_ckpt
    import ofactl.storage.zarr_store as zs

    monkeypatch.setattr(zs, "disk_free", lambda p: 1000)
    with pytest.raises(StoreError, match=r"f.zarr: these features need about [\d.]+ MB, but only 0.00 MB are free"):
        extract(tmp_path, synth_corpus, ckpt=ckpt)
    assert not (tmp_path / "f.zarr").exists() and not (tmp_path / "f.zarr.locks").exists()  # nothing created


def test_the_disk_check_counts_the_whole_chunks_a_store_writes(tmp_path, synth_corpus, student_ckpt, monkeypatch):
    ckpt, _ = student_ckpt
    import ofactl.storage.zarr_store as zs

    cfg = replace(CFG, rates=(0.5,), chunk_frames=64)  # blocks of 4 utterances end in part-filled chunks
    extract(tmp_path, synth_corpus, cfg=cfg, name="a.zarr", ckpt=ckpt)
    chunks = [f for f in (tmp_path / "a.zarr").rglob("*") if f.is_file() and "/feats/c/" in f.as_posix()]
    written = sum(f.stat().st_size for f in chunks)
    g = open_store(tmp_path / "a.zarr").group(0.5)
    (_, layers, dim), _, _ = g.feats_layout()
    assert written > g.frames * layers * dim * 4  # float32 frames, and the padding of part-filled chunks
    monkeypatch.setattr(zs, "disk_free", lambda p: written - 1)
    with pytest.raises(StoreError, match=r"b.zarr: these features need about [\d.]+ MB") as e:
        extract(tmp_path, synth_corpus, cfg=cfg, name="b.zarr", ckpt=ckpt)
    assert float(str(e.value).split("need about ")[1].split(" MB")[0]) >= round(written / 1e6, 2)


def test_layout_counts_the_chunks_that_hold_an_utterance():
    from ofactl.storage.zarr_store import make_layout

    lay = make_layout(["a", "b", "c", "d"], [10, 10, 2000, 0], block_utts=2, chunk_frames=1024)
    assert lay.offsets.tolist() == [0, 10, 1024, 3024]  # the second block starts on a chunk boundary
    assert lay.chunks_holding(np.ones(4, dtype=bool)) == 3
    assert lay.chunks_holding(np.array([True, True, False, False])) == 1  # both in chunk 0
    assert lay.chunks_holding(np.array([False, False, True, True])) == 2  # 1024..3023: chunks 1 and 2
    assert lay.chunks_holding(np.zeros(4, dtype=bool)) == 0


def test_an_hdf5_export_that_cannot_fit_is_refused_before_writing(tmp_path, synth_corpus, student_ckpt, monkeypatch):
    ckpt, _ = student_ckpt
    import ofactl.storage.zarr_store as zs
    from ofactl.storage.hdf5_export import export_hdf5

    extract(tmp_path, synth_corpus, ckpt=ckpt)
    real = zs.disk_free
    monkeypatch.setattr(zs, "disk_free", lambda p: 1000)
    with pytest.raises(StoreError, match=r"f.h5: the HDF5 export needs about [\d.]+ MB, but only 0.00 MB") as e:
        export_hdf5(tmp_path / "f.zarr", tmp_path / "f.h5")
    assert "f.zarr is kept" in str(e.value) and not (tmp_path / "f.h5").exists()
    monkeypatch.setattr(zs, "disk_free", real)
    size = export_hdf5(tmp_path / "f.zarr", tmp_path / "f.h5").stat().st_size
    assert float(str(e.value).split("needs about ")[1].split(" MB")[0]) >= round(size / 1e6, 2)  # it fits


def test_an_hdf5_extraction_counts_the_copy_before_anything_is_computed(tmp_path, synth_corpus, student_ckpt,
                                                                         monkeypatch):
    ckpt, _ = student_ckpt
    import ofactl.storage.zarr_store as zs

    cfg = replace(CFG, rates=(0.5,))
    extract(tmp_path, synth_corpus, cfg=cfg, name="a.h5", ckpt=ckpt)
    store = sum(f.stat().st_size for f in (tmp_path / "a.h5.zarr").rglob("*") if f.is_file())
    h5 = (tmp_path / "a.h5").stat().st_size
    monkeypatch.setattr(zs, "disk_free", lambda p: store + h5 // 2)  # room for the store, not for both
    with pytest.raises(StoreError, match=r"b.h5.zarr: these features need about [\d.]+ MB \(([\d.]+) MB of them for "
                       r"the HDF5 copy .*b.h5\)") as e:
        extract(tmp_path, synth_corpus, cfg=cfg, name="b.h5", ckpt=ckpt)
    assert float(e.value.args[0].split("(")[1].split(" MB")[0]) >= round(h5 / 1e6, 2)
    assert not (tmp_path / "b.h5.zarr").exists() and not (tmp_path / "b.h5").exists()  # nothing computed
    monkeypatch.setattr(zs, "same_disk", lambda a, b: False)  # the copy's own disk is checked on its own
    monkeypatch.setattr(zs, "disk_free", lambda p: 0 if p.name == "b.h5" else 10**12)
    with pytest.raises(StoreError, match=r"b.h5: these features need about [\d.]+ MB \(the HDF5 copy\), but only "
                       r"0.00 MB"):
        extract(tmp_path, synth_corpus, cfg=cfg, name="b.h5", ckpt=ckpt)
    monkeypatch.setattr(zs, "disk_free", lambda p: store + h5 + 10**6)
    extract(tmp_path, synth_corpus, cfg=cfg, name="b.h5", ckpt=ckpt)  # both fit: written
    assert (tmp_path / "b.h5").is_file()


def test_h5pys_tracebacks_after_a_failed_write_are_left_to_the_one_error(tmp_path, capsys):
    import importlib.util
    import sys

    from ofactl.storage.hdf5_export import _quiet_h5py_cleanup

    def raised_in(path: Path):  # an error whose traceback runs through ``path``
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("def free():\n    raise RuntimeError('freed')\n")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        try:
            mod.free()
        except RuntimeError as e:
            return e

    h5py_error, own_error = raised_in(tmp_path / "h5py" / "_objects.py"), raised_in(tmp_path / "ofactl" / "own.py")
    with _quiet_h5py_cleanup():
        sys.excepthook(RuntimeError, h5py_error, h5py_error.__traceback__)
        sys.excepthook(RuntimeError, own_error, own_error.__traceback__)
    err = capsys.readouterr().err
    assert err.count("RuntimeError: freed") == 1 and "ofactl/own.py" in err and "_objects.py" not in err
    assert sys.excepthook is sys.__excepthook__ or "quiet" not in sys.excepthook.__name__  # put back


@pytest.mark.slow
def test_write_error_stops_cleanly_and_resumes(tmp_path, synth_corpus, student_ckpt, monkeypatch):
    ckpt, _ = student_ckpt
    from ofactl.storage.zarr_store import FeatureGroup

    real = FeatureGroup.write_frames
    n = {"calls": 0}

    def full(self, start, data):
        n["calls"] += 1
        if n["calls"] > 2:
            raise OSError(28, "No space left on device")
        return real(self, start, data)

    monkeypatch.setattr(FeatureGroup, "write_frames", full)
    with pytest.raises(StoreError, match="No space left on device.*rerun"):
        extract(tmp_path, synth_corpus, cfg=replace(CFG, rates=(0.5,)), ckpt=ckpt)
    monkeypatch.setattr(FeatureGroup, "write_frames", real)
    res = extract(tmp_path, synth_corpus, cfg=replace(CFG, rates=(0.5,)), ckpt=ckpt)
    assert res.groups[0].complete and res.groups[0].reused > 0
    extract(tmp_path, synth_corpus, cfg=replace(CFG, rates=(0.5,)), ckpt=ckpt, name="clean.zarr")
    a, b = all_feats(tmp_path / "f.zarr", 0.5), all_feats(tmp_path / "clean.zarr", 0.5)
    assert all(np.array_equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_hdf5_export_equals_zarr(tmp_path, synth_corpus, student_ckpt):
    ckpt, _ = student_ckpt
    from ofactl.storage.hdf5_export import export_hdf5, read_hdf5_group

    extract(tmp_path, synth_corpus, ckpt=ckpt)
    h5 = export_hdf5(tmp_path / "f.zarr", tmp_path / "f.h5")
    g = open_store(tmp_path / "f.zarr").group(0.5)
    h = read_hdf5_group(h5, 0.5)
    assert h["utt_id"] == g.utt_ids
    assert np.array_equal(h["offsets"], g.offsets) and np.array_equal(h["lengths"], g.lengths)
    assert np.array_equal(h["feats"], np.asarray(g._g["feats"][:]))
    assert h["attrs"]["layers"] == g.attrs["layers"] and h["attrs"]["errors"] == g.attrs["errors"]


@pytest.mark.slow
def test_xarray_and_zarr_read_the_store(tmp_path, synth_corpus, student_ckpt):
    xr = pytest.importorskip("xarray")
    import zarr

    ckpt, _ = student_ckpt
    extract(tmp_path, synth_corpus, ckpt=ckpt)
    ds = xr.open_zarr(tmp_path / "f.zarr", group="rate=0.500", consolidated=False)
    assert ds["feats"].dims == ("frame", "layer", "dim") and ds["utt_id"].dims == ("utt",)
    z = zarr.open_group(str(tmp_path / "f.zarr"), mode="r")
    assert z["rate=0.500/feats"].shape[1:] == (3, 64)


def test_torch_dataset(tmp_path, synth_corpus, student_ckpt):
    from ofactl.storage.dataset import FeatureDataset

    ckpt, _ = student_ckpt
    extract(tmp_path, synth_corpus, ckpt=ckpt)
    ds = FeatureDataset(tmp_path / "f.zarr", 0.5, layers=[2])
    _, x = ds[0]
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 64)
    lazy = FeatureDataset(tmp_path / "f.zarr", 0.5, in_memory=False)
    assert torch.equal(lazy[3][1][:, 2:], ds[3][1])


def test_cli_pipeline_from_stdin_json(tmp_path, synth_corpus, student_ckpt):
    ckpt, _ = student_ckpt
    paths = "\n".join(str(p) for p in sorted((synth_corpus.parent / "wavs").rglob("*.wav"))[:6])
    r = CliRunner().invoke(app, ["extract", "--ckpt", str(ckpt), "--corpus", "-", "--out", str(tmp_path / "p.zarr"),
                                 "--frame-ms", "40", "--json", "--workers", "0"], input=paths + "\n")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["groups"][0]["group"] == "rate=0.500" and doc["groups"][0]["utterances"] == 6
    r = CliRunner().invoke(app, ["info", str(tmp_path / "p.zarr"), "--json"])
    assert json.loads(r.stdout)["groups"][0]["complete"] is True
    r = CliRunner().invoke(app, ["extract", "--ckpt", str(ckpt), "--corpus", str(synth_corpus), "--out",
                                 str(tmp_path / "p.zarr"), "--rate", "1.5"])
    assert r.exit_code == 1 and "rate 1.5 is outside (0, 1]" in r.stderr


_KILL_SCRIPT = """
import sys, torch
from ofactl.extract import ExtractConfig, run_extract
torch.set_num_threads(int(sys.argv[4]))  # the test's own: another count sums in another order
cfg = ExtractConfig(rates=(1.0, 0.5), num_workers=0, block_utts=4, chunk_frames=16, batch_seconds=1.0, dtype="float32",
                    device="cpu")
run_extract(cfg, sys.argv[1], sys.argv[2], sys.argv[3])
"""


@pytest.mark.slow
def test_sigkill_then_resume_equals_clean_run(tmp_path, synth_corpus):
    # a slower student so the kill lands mid-run
    torch.manual_seed(0)
    cfg = student_config("tiny")
    cfg.arch.conv_layers = tuple((384, k, s) for _, k, s in cfg.arch.conv_layers)
    ckpt = save_student(tmp_path / "slow.pt", Student(cfg))
    store = tmp_path / "k.zarr"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(ckpt), str(synth_corpus), str(store),
                             str(torch.get_num_threads())])
    import zarr

    deadline = time.monotonic() + 120
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = np.asarray(zarr.open_group(str(store), mode="r")["rate=0.500/done"][:])
            if done.sum() >= 5:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
        except Exception:
            pass
        time.sleep(0.02)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    assert 0 < int(open_store(store).group(0.5).done.sum()) < len(open_store(store).group(0.5))
    cfg_e = ExtractConfig(rates=(1.0, 0.5), num_workers=0, block_utts=4, chunk_frames=16, batch_seconds=1.0,
                          dtype="float32", device="cpu")
    res = run_extract(cfg_e, ckpt, synth_corpus, store)
    assert all(g.complete for g in res.groups)
    run_extract(cfg_e, ckpt, synth_corpus, tmp_path / "clean.zarr")
    for rate in (1.0, 0.5):
        a, b = all_feats(store, rate), all_feats(tmp_path / "clean.zarr", rate)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_cli_hdf5_format_and_recorded_config(tmp_path, synth_corpus, student_ckpt):
    ckpt, _ = student_ckpt
    out = tmp_path / "f.h5"
    r = CliRunner().invoke(app, ["extract", "--ckpt", str(ckpt), "--corpus", str(synth_corpus), "--out", str(out),
                                 "--rate", "0.5", "--format", "hdf5", "--workers", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    from ofactl.storage.hdf5_export import read_hdf5_group

    h = read_hdf5_group(out, 0.5)
    g = open_store(str(out) + ".zarr").group(0.5)
    assert h["utt_id"] == g.utt_ids and h["attrs"]["extract_config"]["rates"] == [0.5]
    r = CliRunner().invoke(app, ["info", str(out), "--json"])
    assert json.loads(r.stdout)["groups"][0]["utterances"] == len(g)


def test_an_out_ending_in_h5_is_an_hdf5_export_and_info_reads_each_kind_by_what_it_is(tmp_path, synth_corpus,
                                                                                     student_ckpt):
    ckpt, _ = student_ckpt
    base = ["extract", "--ckpt", str(ckpt), "--corpus", str(synth_corpus), "--rate", "0.5", "--workers", "0", "--quiet"]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "f.h5")])  # no --format: the suffix says hdf5
    assert r.exit_code == 0, r.output
    assert (tmp_path / "f.h5").is_file() and (tmp_path / "f.h5.zarr" / "zarr.json").is_file()
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "z.h5"), "--format", "zarr"])  # asked for: a folder
    assert r.exit_code == 0 and (tmp_path / "z.h5" / "zarr.json").is_file()
    for name, kind in (("f.h5", "hdf5 feature export"), ("z.h5", "feature store")):
        r = CliRunner().invoke(app, ["info", str(tmp_path / name), "--json"])
        assert r.exit_code == 0 and json.loads(r.stdout)["kind"] == kind, r.output
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "f.h5"), "--format", "zarr"])  # as sweep --store f.h5
    assert r.exit_code == 1 and f"the store beside it is {tmp_path / 'f.h5.zarr'}" in r.stderr, r.stderr
    (tmp_path / "junk.h5").write_text("not hdf5\n")
    r = CliRunner().invoke(app, ["info", str(tmp_path / "junk.h5")])
    assert r.exit_code == 1 and "junk.h5: not an HDF5 file, nor a feature store folder" in r.stderr


def test_rates_a_student_never_trained_at_are_noted_and_extracted(tmp_path, synth_corpus):
    torch.manual_seed(0)
    ckpt = save_student(tmp_path / "ofa.pt", Student(student_config("tiny")),
                        trained_rates={"kind": "range", "min": 0.4, "max": 1.0})
    r = CliRunner().invoke(app, ["extract", "--ckpt", str(ckpt), "--corpus", str(synth_corpus), "--out",
                                 str(tmp_path / "f.zarr"), "--rate", "0.5", "--rate", "0.25", "--rate", "0.1",
                                 "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert f"note: {ckpt} was trained on rates 0.4-1; rates 0.25, 0.1 lie outside that range" in r.stderr
    assert open_store(tmp_path / "f.zarr").rates == [0.5, 0.25, 0.1]


@pytest.mark.parametrize(("flags", "message"), [
    (["--frame-ms", "100000"], "rate 0.0002 would be stored as rate=0.000"),
    (["--rate", "0.5", "--rate", "0.5004"], "collide at 3 decimals")])
def test_rates_a_store_cannot_name_apart_are_refused(tmp_path, flags, message):
    r = CliRunner().invoke(app, ["extract", "--ckpt", "x.pt", "--corpus", "x", "--out", str(tmp_path / "f"), *flags])
    assert r.exit_code == 1 and message in r.stderr


# ----------------------------------------------------------------------------- crash safety and integrity
def _store_bytes_equal(a, b, rates=(1.0, 0.5)):
    for rate in rates:
        x, y = all_feats(a, rate), all_feats(b, rate)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), rate


@pytest.mark.slow
def test_group_appears_only_when_complete(tmp_path, synth_corpus, student_ckpt, monkeypatch):
    ckpt, _ = student_ckpt
    import ofactl.storage.zarr_store as zs

    def die(*a, **k):
        raise KeyboardInterrupt  # the process dies after building the group, before it is renamed in

    monkeypatch.setattr(zs.os, "rename", die)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path, synth_corpus, ckpt=ckpt)
    monkeypatch.undo()
    store = tmp_path / "f.zarr"
    assert open_store(store).group_names() == []  # the half-built group is invisible
    assert list(store.glob(".creating-rate=*"))
    r = CliRunner().invoke(app, ["info", str(store)])
    assert r.exit_code == 0, r.output
    extract(tmp_path, synth_corpus, ckpt=ckpt)
    assert not list(store.glob(".creating-*"))  # the staging folder was cleared
    extract(tmp_path, synth_corpus, ckpt=ckpt, name="clean.zarr")
    _store_bytes_equal(store, tmp_path / "clean.zarr")


@pytest.mark.slow
def test_half_created_group_is_rebuilt_with_a_note(tmp_path, synth_corpus, student_ckpt):
    ckpt, _ = student_ckpt
    import zarr

    store = tmp_path / "f.zarr"
    root = zarr.open_group(str(store), mode="a")
    root.attrs.update({"format": "ofactl-features", "format_version": 1})
    root.create_group("rate=0.500")  # what an older ofactl left when killed mid-creation
    r = CliRunner().invoke(app, ["info", str(store), "--json"])
    assert r.exit_code == 0, r.output
    assert "half-created" in json.loads(r.stdout)["groups"][0]["state"]
    from ofactl.progress import NullProgress

    prog = NullProgress()
    res = extract(tmp_path, synth_corpus, ckpt=ckpt, progress=prog)
    assert all(g.complete for g in res.groups)
    assert any("half-created" in m and "rebuilding" in m for m in prog.messages)
    extract(tmp_path, synth_corpus, ckpt=ckpt, name="clean.zarr")
    _store_bytes_equal(store, tmp_path / "clean.zarr")


def _chunk_files(store, rate_key, array):
    return sorted(p for p in (store / rate_key / array / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("array,damage", [("feats", "delete"), ("feats", "truncate"), ("lengths", "delete"), ("lengths", "truncate"),
                                          ("checksum", "delete"), ("utt_id", "delete")])
@pytest.mark.slow
def test_damage_is_detected_named_and_repaired_bitwise(tmp_path, synth_corpus, student_ckpt, array, damage):
    ckpt, _ = student_ckpt
    store = tmp_path / "f.zarr"
    extract(tmp_path, synth_corpus, ckpt=ckpt)
    extract(tmp_path, synth_corpus, ckpt=ckpt, name="clean.zarr")
    chunk = _chunk_files(store, "rate=0.500", array)[1]
    if damage == "delete":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:5])
    g = open_store(store).group(0.5)
    with pytest.raises(StoreError, match=r"rate=0.500: utterance .* is damaged|per-utterance arrays are damaged"):
        g.load_all()  # never zeros or empty arrays where data was lost
    r = CliRunner().invoke(app, ["info", str(store), "--verify", "--json"])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    damaged = {d["id"] for gr in doc["groups"] for d in gr["damaged"]}
    assert damaged and all(gr["damaged"] == [] for gr in doc["groups"] if gr["group"] == "rate=1.000")
    g = open_store(store).group(0.5)
    assert not g.complete and int((~g.done).sum()) == len(damaged)  # exactly those are redone
    res = extract(tmp_path, synth_corpus, ckpt=ckpt)
    assert {r.rate: r.written for r in res.groups} == {1.0: 0, 0.5: len(damaged)}
    _store_bytes_equal(store, tmp_path / "clean.zarr")
    r = CliRunner().invoke(app, ["info", str(store), "--verify"])
    assert r.exit_code == 0 and "verified" in r.stdout


def test_info_lists_skipped_inputs_with_reasons(tmp_path, synth_corpus, student_ckpt, write_wav):
    ckpt, _ = student_ckpt
    lst = tmp_path / "list.txt"
    good = [u.path for u in read_corpus(synth_corpus)][:3]
    short = write_wav("tiny.wav", seconds=0.01)
    lst.write_text("\n".join(map(str, good + [short, tmp_path / "gone.wav"])) + "\n")
    with pytest.raises(Exception) as e:  # default: every knowable problem in one error
        run_extract(CFG, ckpt, lst, tmp_path / "a.zarr")
    assert "tiny.wav: too short" in str(e.value) and "gone.wav: file not found" in str(e.value)
    run_extract(replace(CFG, on_error="skip"), ckpt, lst, tmp_path / "f.zarr")
    r = CliRunner().invoke(app, ["info", str(tmp_path / "f.zarr"), "--json"])
    skipped = json.loads(r.stdout)["groups"][0]["skipped"]
    assert set(skipped) == {"tiny", "gone"} and "too short" in skipped["tiny"]
    r = CliRunner().invoke(app, ["info", str(tmp_path / "f.zarr")])
    assert "skipped tiny:" in r.stdout and "skipped gone:" in r.stdout


@pytest.mark.slow
def test_long_utterances_run_in_windows(tmp_path, synth_corpus, student_ckpt):
    ckpt, _ = student_ckpt
    cfg = replace(CFG, long_window_s=1.0, long_context_s=0.3)
    extract(tmp_path, synth_corpus, cfg=cfg, ckpt=ckpt)
    extract(tmp_path, synth_corpus, ckpt=ckpt, name="whole.zarr")
    g = open_store(tmp_path / "f.zarr").group(0.5)
    assert g.attrs["long_window_s"] == 1.0 and g.attrs["long_context_s"] == 0.3
    long = [u.id for u in read_corpus(synth_corpus) if u.n_samples_16k > 16000]
    assert long
    w, h = all_feats(tmp_path / "f.zarr", 0.5), all_feats(tmp_path / "whole.zarr", 0.5)
    for u in long:
        assert w[u].shape == h[u].shape  # lengths stay round(r * T)
        assert np.allclose(w[u][:, 0], h[u][:, 0], atol=1e-5)  # before attention: the same
        rel = np.linalg.norm(w[u][:, -1] - h[u][:, -1]) / np.linalg.norm(h[u][:, -1])
        assert rel < 0.1, (u, rel)  # attention sees window + context only: close, not equal


def test_shard_and_device_from_the_launcher():
    from ofactl.extract import parse_shard
    from ofactl.runtime import local_device

    assert parse_shard(None, {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}) == (2, 4)
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5",
                                "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 3)
    assert parse_shard(None, {}) is None and parse_shard("1/3", {"RANK": "0", "WORLD_SIZE": "2"}) == (1, 3)
    with pytest.raises(Exception, match="--shard auto: no launcher found"):
        parse_shard("auto", {})
    with pytest.raises(Exception, match="launcher environment is inconsistent"):
        parse_shard(None, {"WORLD_SIZE": "2"})
    want = "cuda:1" if torch.cuda.device_count() > 1 else ("cuda:0" if torch.cuda.is_available() else "auto")
    assert local_device("auto", {"LOCAL_RANK": "1"}) == want
    assert local_device("cpu", {"LOCAL_RANK": "1"}) == "cpu"


@pytest.mark.parametrize("frontend", ["cnn-thin", "fbank"])
def test_every_front_end_extracts_in_one_multi_rate_pass_and_in_windows(tmp_path, synth_corpus, frontend):
    from ofactl.model.windowed import features_windowed

    torch.manual_seed(0)
    s = Student(replace(student_config("tiny"), frontend=frontend, frontend_channels=16)).eval()
    ckpt = save_student(tmp_path / "s.pt", s)
    corpus = read_corpus(synth_corpus)
    utts = sorted(corpus, key=lambda u: -u.n_samples_16k)[:6]
    res = extract(tmp_path, corpus.subset({u.id for u in utts}), ckpt=ckpt)
    assert all(g.complete for g in res.groups)
    for rate in (1.0, 0.5):
        g = open_store(tmp_path / "f.zarr").group(rate)
        for u in utts[:2]:
            got, wav = g[u.id], load_audio(u.path)
            with torch.no_grad():
                ref = s.features(wav[None], torch.tensor([len(wav)]), [rate])[rate].states[0]
                win = features_windowed(s, wav, [rate], window=20, context=10)[rate].states[0]
            assert got.shape == tuple(ref.shape) and np.allclose(got, ref.numpy(), atol=1e-4), (frontend, rate)
            assert win.shape == ref.shape and torch.allclose(win[:, 0], ref[:, 0], atol=1e-4)  # before attention


def _loud_and_quiet(folder: Path) -> tuple[Path, Path]:
    """The same second of noisy tone twice: at about -13 dBFS and 40 dB below it."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    x = (0.3 * np.sin(2 * np.pi * 180 * np.arange(16000) / 16000) + 0.05 * rng.standard_normal(16000)).astype(np.float32)
    folder.mkdir()
    sf.write(str(folder / "loud.wav"), x, 16000, subtype="FLOAT")
    sf.write(str(folder / "quiet.wav"), x / 100, 16000, subtype="FLOAT")
    return folder / "loud.wav", folder / "quiet.wav"


def test_level_db_makes_a_quiet_copy_extract_like_the_loud_one(tmp_path, student_ckpt):
    ckpt, _ = student_ckpt
    _loud_and_quiet(tmp_path / "wavs")
    cfg = replace(CFG, rates=(1.0,))
    raw = extract(tmp_path, tmp_path / "wavs", cfg=cfg, ckpt=ckpt, name="raw.zarr")
    lev = extract(tmp_path, tmp_path / "wavs", cfg=replace(cfg, level_db=-25.0), ckpt=ckpt, name="lev.zarr")
    f_raw, f_lev = all_feats(tmp_path / "raw.zarr", 1.0), all_feats(tmp_path / "lev.zarr", 1.0)
    gap_raw = np.abs(f_raw["loud"] - f_raw["quiet"]).max()
    gap_lev = np.abs(f_lev["loud"] - f_lev["quiet"]).max()
    assert gap_lev < 1e-3 and gap_raw > 100 * gap_lev  # the epsilon hears the level; levelled, it cannot
    assert open_store(tmp_path / "lev.zarr").group(1.0).attrs["level_db"] == -25.0
    # the run measures the levels as recorded, and warns only when nothing levels them
    assert raw.loudness.measured == 2 and raw.loudness.quiet == 1 and raw.loudness.quietest.endswith("quiet.wav")
    assert -55 < raw.loudness.quietest_db < -50
    assert "1 of 2 recording(s) are quieter than -35 dBFS" in raw.quiet_warning() and "--level-db" in raw.quiet_warning()
    assert "--set extract.level_db=-25 levels" in raw.quiet_warning("--set extract.level_db=")
    assert lev.quiet_warning() is None and lev.to_json()["loudness"]["levelled"] is True
    # a student whose front end normalises each utterance (fbank) does not hear the level: no warning
    torch.manual_seed(0)
    fb = save_student(tmp_path / "fbank.pt", Student(replace(student_config("tiny"), frontend="fbank")))
    res = extract(tmp_path, tmp_path / "wavs", cfg=cfg, ckpt=fb, name="fb.zarr")
    assert res.loudness.quiet == 1 and res.quiet_warning() is None


def test_another_level_db_is_refused_unless_overwrite(tmp_path, student_ckpt):
    ckpt, _ = student_ckpt
    _loud_and_quiet(tmp_path / "wavs")
    cfg = replace(CFG, rates=(1.0,))
    extract(tmp_path, tmp_path / "wavs", cfg=cfg, ckpt=ckpt)
    with pytest.raises(StoreError, match=r"another --level-db \(level_db: None vs -25.0\).*--overwrite"):
        extract(tmp_path, tmp_path / "wavs", cfg=replace(cfg, level_db=-25.0), ckpt=ckpt)
    res = extract(tmp_path, tmp_path / "wavs", cfg=replace(cfg, level_db=-25.0), ckpt=ckpt, overwrite=True)
    assert all(g.written == g.utterances == 2 for g in res.groups)


def test_level_db_auto_is_the_level_the_student_was_distilled_at(tmp_path, student_ckpt):
    ckpt, _ = student_ckpt
    _loud_and_quiet(tmp_path / "wavs")
    torch.manual_seed(0)
    s = Student(student_config("tiny"))
    s.input_level_db = -30.0  # what distill records: the median level of its training audio
    known = save_student(tmp_path / "known.pt", s)
    cfg = replace(CFG, rates=(1.0,))
    auto = extract(tmp_path, tmp_path / "wavs", cfg=replace(cfg, level_db="auto"), ckpt=known, name="auto.zarr")
    extract(tmp_path, tmp_path / "wavs", cfg=replace(cfg, level_db=-30.0), ckpt=known, name="n.zarr")
    f_auto, f_num = all_feats(tmp_path / "auto.zarr", 1.0), all_feats(tmp_path / "n.zarr", 1.0)
    assert all(np.array_equal(f_auto[u], f_num[u]) for u in f_num)
    assert open_store(tmp_path / "auto.zarr").group(1.0).attrs["level_db"] == -30.0  # the number, not "auto"
    assert auto.quiet_warning() is None
    # the same store asked again with auto is complete: auto and its number are one setting
    again = extract(tmp_path, tmp_path / "wavs", cfg=replace(cfg, level_db="auto"), ckpt=known, name="n.zarr")
    assert all(g.written == 0 and g.reused == 2 for g in again.groups)
    # quiet recordings and a student that knows its level: the warning offers auto
    raw = extract(tmp_path, tmp_path / "wavs", cfg=cfg, ckpt=known, name="raw.zarr")
    assert "--level-db auto (the -30 dBFS this student was distilled at) levels" in raw.quiet_warning()
    # a checkpoint that does not record a level: one clear error, before any store is made
    with pytest.raises(ConfigError, match=r"--level-db auto: .*student.pt does not record the level.*--level-db -25"):
        extract(tmp_path, tmp_path / "wavs", cfg=replace(cfg, level_db="auto"), ckpt=ckpt, name="none.zarr")
    assert not (tmp_path / "none.zarr").exists()
    assert load_config(ExtractConfig, "extract", None, ["level_db=auto"]).level_db == "auto"
    with pytest.raises(ConfigError, match=r"level_db .*expected float \| 'auto' \| null, got str 'loud'"):
        load_config(ExtractConfig, "extract", None, ["level_db=loud"])


def test_cli_level_db_flag_and_its_bounds(tmp_path, student_ckpt):
    ckpt, _ = student_ckpt
    _loud_and_quiet(tmp_path / "wavs")
    base = ["extract", "--ckpt", str(ckpt), "--corpus", str(tmp_path / "wavs"), "--device", "cpu", "--workers", "0"]
    r = CliRunner().invoke(app, base + ["--out", str(tmp_path / "a.zarr")])
    assert r.exit_code == 0 and "1 of 2 recording(s) are quieter" in r.output
    r = CliRunner().invoke(app, base + ["--out", str(tmp_path / "b.zarr"), "--level-db", "-25"])
    assert r.exit_code == 0 and "quieter" not in r.output
    assert open_store(tmp_path / "b.zarr").group(1.0).attrs["level_db"] == -25.0
    info = CliRunner().invoke(app, ["info", str(tmp_path / "b.zarr")])
    assert info.exit_code == 0 and "level_db: -25.0" in info.output
    r = CliRunner().invoke(app, base + ["--out", str(tmp_path / "c.zarr"), "--level-db", "6"])
    assert r.exit_code == 1 and "--level-db 6.0" in r.output and "from -80 to 0" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(app, base + ["--out", str(tmp_path / "d.zarr"), "--level-db", "loud"])
    assert r.exit_code == 1 and "--level-db loud: expected an RMS level in dBFS (e.g. -25) or auto" in r.output
    r = CliRunner().invoke(app, base + ["--out", str(tmp_path / "e.zarr"), "--level-db", "auto"])
    assert r.exit_code == 1 and "--level-db auto:" in r.output and "does not record" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "d.zarr").exists() and not (tmp_path / "e.zarr").exists()


def test_recordings_sampled_below_8khz_are_noted_and_still_extracted(tmp_path, student_ckpt, write_wav):
    ckpt, _ = student_ckpt
    for name, sr in (("a.wav", 16000), ("b.wav", 8000), ("c.wav", 4000), ("d.wav", 2000)):
        write_wav(f"in/{name}", seconds=0.5, sr=sr)
    r = CliRunner().invoke(app, ["extract", "--ckpt", str(ckpt), "--corpus", str(tmp_path / "in"), "--out",
                                 str(tmp_path / "f.zarr"), "--rate", "1", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert (f"note: 2 of 4 recording(s) are sampled below 8000 Hz (lowest 2000 Hz: {tmp_path / 'in' / 'd.wav'}); "
            "resampled to 16000 Hz they still hold nothing above 1000 Hz") in r.stderr
    g = open_store(tmp_path / "f.zarr").group(1.0)
    assert g.complete and sorted(g.utt_ids) == ["a", "b", "c", "d"] and g["d"].shape[0] == 24  # 0.5 s, 20 ms frames
    assert read_corpus(tmp_path / "in").subset(["a", "b"]).narrowband_note() is None  # 8 kHz, the telephone band: fine
