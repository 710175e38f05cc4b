import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_pretrain import ARCH, tiny_cfg

import ofactl.units as units_mod
from ofactl.audio import Utterance, read_corpus
from ofactl.errors import AudioError
from ofactl.progress import NullProgress
from ofactl.units import (
    TARGETS_FILE,
    FeatureSource,
    Shard,
    cached_unit_targets,
    fit_units,
    mfcc_features,
    targets_key,
    unit_targets,
)


@pytest.mark.slow
def test_mfcc_and_units_are_deterministic(synth_corpus):
    utts = list(read_corpus(synth_corpus))
    cfg = tiny_cfg()
    src = FeatureSource(cfg, torch.device("cpu"))
    x = src(utts[0])
    from ofactl.model.blocks import cnn_lengths

    assert x.shape == (int(cnn_lengths(ARCH, torch.tensor([utts[0].n_samples_16k]))[0]), 39)
    assert torch.equal(x, src(utts[0]))
    a, b = fit_units(cfg, utts, src, NullProgress()), fit_units(cfg, utts, src, NullProgress())
    assert a.centroids.shape == (12, 39) and torch.equal(a.centroids, b.centroids)
    c = fit_units(replace(cfg, seed=1), utts, src, NullProgress())
    assert not torch.equal(a.centroids, c.centroids)
    assert mfcc_features(torch.zeros(100), 0).shape == (0, 39)


def test_a_shard_takes_every_world_th_item_and_the_shares_interleave_back():
    items = list(range(11))
    parts = [Shard(r, 3).of(items) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert units_mod._interleaved(parts) == items


def test_worker_processes_make_the_same_features_and_units_as_one_process(synth_corpus):
    cfg = tiny_cfg(kmeans_utts=8, kmeans_frames=100)
    utts = list(read_corpus(synth_corpus))[:10]
    src = FeatureSource(cfg, torch.device("cpu"))
    alone = fit_units(cfg, utts, src, NullProgress())
    spread = fit_units(replace(cfg, num_workers=2), utts, src, NullProgress())
    assert torch.equal(alone.centroids, spread.centroids) and torch.equal(alone.mean, spread.mean)
    one = unit_targets(utts, alone, src, NullProgress())
    two = unit_targets(utts, alone, src, NullProgress(), workers=2)
    assert list(two) == [u.id for u in utts] and all(np.array_equal(one[k], two[k]) for k in one)
    assert all(np.array_equal(one[u.id], alone.assign(src(u))) for u in utts)
    # an unreadable recording is one clear error naming it, from a worker as from this process
    gone = Utterance("gone", synth_corpus / "no-such.wav", 16000, 16000)
    for workers in (0, 2):
        with pytest.raises(AudioError, match="no-such.wav: file not found"):
            unit_targets([*utts[:3], gone], alone, src, NullProgress(), workers=workers)


def test_unit_targets_are_kept_and_read_back_for_the_same_units_and_utterances(tmp_path, synth_corpus, monkeypatch):
    cfg = tiny_cfg()
    utts = list(read_corpus(synth_corpus))[:12]
    src = FeatureSource(cfg, torch.device("cpu"))
    units = fit_units(replace(cfg, kmeans_utts=6), utts, src, NullProgress())
    path, key = tmp_path / TARGETS_FILE, targets_key(units, utts, None)
    made = cached_unit_targets(utts, units, src, path, key, True, NullProgress())
    assert path.is_file() and made.keys() == {u.id for u in utts}

    def assigned_again(*args, **kwargs):
        raise AssertionError("the units were assigned again")

    monkeypatch.setattr(units_mod, "unit_targets", assigned_again)
    progress = NullProgress()
    again = cached_unit_targets(utts, units, src, path, key, True, progress)
    assert progress.messages == [f"using the unit targets in {path}"]
    assert all(np.array_equal(again[k], made[k]) and again[k].dtype == np.int16 for k in made)
    monkeypatch.undo()
    # other utterances or other units: another key, assigned again (and the file rewritten)
    assert targets_key(units, utts[:-1], None) != key != targets_key(units, utts, "it1/teacher.safetensors")
    other = fit_units(replace(cfg, kmeans_utts=6, seed=1), utts, src, NullProgress())
    assert targets_key(other, utts, None) != key
    # a file made for other units is set aside on its key alone: its arrays are not read
    asked: list[tuple[str, ...]] = []
    real = units_mod.read_targets_file
    monkeypatch.setattr(units_mod, "read_targets_file", lambda p, *names: asked.append(names) or real(p, *names))
    assert units_mod._read_targets(path, "another key", NullProgress()) is None and asked == [("key",)]
    assert units_mod._read_targets(path, key, NullProgress()) is not None and asked[1:] == [("key",), ("ids", "lengths", "units")]
    monkeypatch.undo()
    # a file cut short (a kill mid-write cannot leave one: it is written whole, then renamed) or
    # not such a file: said, and assigned again
    for bad in (path.read_bytes()[:200], b"not a zip"):
        path.write_bytes(bad)
        progress = NullProgress()
        redone = cached_unit_targets(utts, units, src, path, key, False, progress)
        assert any("unreadable" in m for m in progress.messages), progress.messages
        assert all(np.array_equal(redone[k], made[k]) for k in made)
    assert unit_targets(utts[:2], units, src, NullProgress()).keys() == {u.id for u in utts[:2]}
    # a stop while assigning (Ctrl-C, SIGTERM) keeps the utterances done; the next start assigns the rest
    path.unlink()
    calls: list[str] = []
    stopping = [True]
    read = units_mod.load_audio

    def stopped_at_the_fifth(p):  # the first time only
        calls.append(str(p))
        if stopping[0] and len(calls) == 5:
            stopping[0] = False
            raise KeyboardInterrupt
        return read(p)

    monkeypatch.setattr(units_mod, "load_audio", stopped_at_the_fifth)
    progress = NullProgress()
    with pytest.raises(KeyboardInterrupt):
        cached_unit_targets(utts, units, src, path, key, True, progress)
    assert progress.messages == [f"kept the units of 4 of 12 utterance(s) in {path}"]
    calls.clear()
    progress = NullProgress()
    resumed = cached_unit_targets(utts, units, src, path, key, True, progress)
    assert len(calls) == 8 and f"using the units of 4 utterance(s) kept in {path}; assigning the other 8" in progress.messages
    assert list(resumed) == [u.id for u in utts] and all(np.array_equal(resumed[k], made[k]) for k in made)
    assert cached_unit_targets(utts, units, src, path, key, True, NullProgress()).keys() == made.keys()


RANKS = textwrap.dedent("""
    import json, sys
    from dataclasses import replace
    from pathlib import Path

    import numpy as np
    import torch
    import torch.distributed as dist

    sys.path.insert(0, sys.argv[3])
    from test_pretrain import tiny_cfg

    import ofactl.units as U
    from ofactl.audio import Utterance, read_corpus
    from ofactl.errors import OfactlError
    from ofactl.progress import NullProgress

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(sys.argv[2])
    shard = U.Shard(rank, 2)
    read, calls = U.load_audio, []
    U.load_audio = lambda p: calls.append(str(p)) or read(p)
    cfg = tiny_cfg(kmeans_utts=9, kmeans_frames=200)
    utts = list(read_corpus(sys.argv[1]))[:11]
    src = U.FeatureSource(cfg, torch.device("cpu"))
    units = U.fit_units(cfg, utts, src, NullProgress(), shard)
    fit_calls = len(calls)
    made = U.unit_targets(utts, units, src, NullProgress(), shard=shard)
    np.savez(out / f"rank{rank}.npz", centroids=units.centroids.numpy(), **made)
    told = {"fit_reads": fit_calls, "assign_reads": len(calls) - fit_calls}
    try:  # rank 0 alone fits: its error reaches every rank, none waits for units that never come
        U.fit_units(replace(cfg, n_units=100000), utts, src, NullProgress(), shard)
    except OfactlError as e:
        told["fit_error"] = str(e)
    # one recording gone (the eighth: rank 1's fourth), two utterances a round: both ranks stop
    # in the second round, rank 0 keeps what the ranks had gathered (rank 1's third included)
    U.ROUND = 2
    gone = Utterance("gone", Path(sys.argv[1]).parent / "no-such.wav", 16000, 16000)
    bad = [*utts[:7], gone, *utts[7:]]
    try:
        U.cached_unit_targets(bad, units, src, out / "kept.npz", "k", rank == 0, NullProgress(), shard)
    except OfactlError as e:
        told["error"] = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps(told))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_ranks_share_the_reading_and_end_with_the_units_of_one_process(tmp_path, synth_corpus):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(synth_corpus), str(tmp_path), os.path.dirname(__file__)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = tiny_cfg(kmeans_utts=9, kmeans_frames=200)
    utts = list(read_corpus(synth_corpus))[:11]
    src = FeatureSource(cfg, torch.device("cpu"))
    units = fit_units(cfg, utts, src, NullProgress())
    alone = unit_targets(utts, units, src, NullProgress())
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as z:
            assert np.array_equal(z["centroids"], units.centroids.numpy())
            assert all(np.array_equal(z[k], alone[k]) for k in alone) and len(z.files) == 12
    told = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [t["fit_reads"] for t in told] == [5, 4] and [t["assign_reads"] for t in told] == [6, 5]
    assert [t["fit_error"] for t in told] == ["n_units=100000 is more than the 200 frames sampled for k-means "
                                              "(kmeans_utts=9); use fewer units or more audio"] * 2
    gone = str(synth_corpus.parent / "no-such.wav")
    assert [t["error"] for t in told] == [f"{gone}: file not found"] * 2
    with np.load(tmp_path / "kept.npz") as z:  # the first round, and the second up to the recording gone
        assert sorted(z["ids"].tolist()) == sorted(u.id for u in utts[:7])
