from __future__ import annotations

import hashlib
from dataclasses import replace
from itertools import pairwise

import pytest
import soundfile as sf

from ofactl.audio import read_corpus
from ofactl.errors import ConfigError, OfactlError
from ofactl.synth import MANIFEST_COLUMNS, SynthConfig, make_sentences, plan, run_synth


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_same_seed_same_bytes(tmp_path, small_synth_cfg, synth_corpus):
    again = run_synth(small_synth_cfg, tmp_path / "again")
    assert digest(again.out_dir) == digest(synth_corpus.parent)
    other = run_synth(replace(small_synth_cfg, seed=2), tmp_path / "other")
    assert digest(other.out_dir) != digest(synth_corpus.parent)


def test_manifest_columns_and_labels(synth_corpus, small_synth_cfg):
    c = read_corpus(synth_corpus)
    assert set(MANIFEST_COLUMNS) <= set(c.columns)
    assert len(c) == len(plan(small_synth_cfg))
    kinds = {u.labels["kind"] for u in c}
    assert kinds == {"keyword", "sentence"}
    kws = [u for u in c if u.labels["kind"] == "keyword"]
    assert {u.labels["label"] for u in kws} == set(small_synth_cfg.keywords)
    assert all(u.sample_rate == 16000 for u in c)


def test_phone_times_increasing_and_inside_audio(synth_corpus):
    for u in read_corpus(synth_corpus):
        phones = u.labels["phones"].split()
        times = [float(t) for t in u.labels["phone_times"].split()]
        assert len(phones) == len(times) > 0
        assert all(b > a for a, b in pairwise(times))
        assert times[0] >= 0 and times[-1] < 1000 * u.seconds


def test_splits_are_speaker_and_text_disjoint(synth_corpus):
    c = read_corpus(synth_corpus)
    split_of_speaker: dict[str, set[str]] = {}
    texts: dict[str, set[str]] = {"train": set(), "dev": set(), "test": set()}
    for u in c:
        split_of_speaker.setdefault(u.labels["speaker"], set()).add(u.labels["split"])
        if u.labels["kind"] == "sentence":
            texts[u.labels["split"]].add(u.labels["text"])
    assert all(len(s) == 1 for s in split_of_speaker.values())
    assert {next(iter(s)) for s in split_of_speaker.values()} == {"train", "dev", "test"}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["dev"]


def test_rerun_reuses_and_refuses_other_content(tmp_path, small_synth_cfg, synth_corpus):
    res = run_synth(small_synth_cfg, synth_corpus.parent)
    assert res.reused
    with pytest.raises(OfactlError, match="not empty"):
        run_synth(replace(small_synth_cfg, seed=9), synth_corpus.parent)


def _interrupt_after_first_speaker(monkeypatch):
    """Make the next run_synth stop with Ctrl-C once its first WAV is on disk."""
    import ofactl.synth as synth

    real = synth.atomic_path

    def once(path, *a, **kw):
        cm = real(path, *a, **kw)
        if path.suffix == ".wav":
            monkeypatch.setattr(synth, "atomic_path", real)

            class Stop:
                def __enter__(self):
                    return cm.__enter__()

                def __exit__(self, *exc):
                    cm.__exit__(None, None, None)
                    raise KeyboardInterrupt

            return Stop()
        return cm

    monkeypatch.setattr(synth, "atomic_path", once)


def test_an_interrupted_synth_goes_on_unasked_and_never_reuses_a_stale_manifest(
        tmp_path, small_synth_cfg, synth_corpus, monkeypatch):
    import ofactl.synth as synth

    out = tmp_path / "c"
    _interrupt_after_first_speaker(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_synth(small_synth_cfg, out)
    assert (out / "synth.yaml").is_file() and not (out / "manifest.tsv").exists()
    res = run_synth(small_synth_cfg, out)  # the same config: no --overwrite needed
    assert not res.reused and digest(out) == digest(synth_corpus.parent)
    # interrupted after two whole speakers: they are kept, the rest made, the corpus the same
    first_two = {u.labels["speaker"] for u in read_corpus(synth_corpus)}
    first_two = set(sorted(first_two)[:2])
    real = synth._map_fresh

    def two_then_stop(jobs, workers):
        for k, res in enumerate(real(jobs, workers)):
            if k == 2:
                raise KeyboardInterrupt
            yield res

    monkeypatch.setattr(synth, "_map_fresh", two_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_synth(small_synth_cfg, out, overwrite=True)
    assert {p.parent.name for p in out.glob("wavs/*/rows.json")} == first_two
    second = out / "wavs" / sorted(first_two)[1] / "rows.json"
    second.write_text(second.read_text().replace('"seconds"', '"secs"'))  # edited: it vouches for nothing
    made = []

    def counted(jobs, workers):
        made.append(len(jobs))
        return real(jobs, workers)

    monkeypatch.setattr(synth, "_map_fresh", counted)
    run_synth(small_synth_cfg, out)
    assert made == [len(plan_speakers(small_synth_cfg)) - 1]  # only the speakers not finished (whole)
    assert digest(out) == digest(synth_corpus.parent) and not list(out.glob("wavs/*/rows.json"))
    # --overwrite with another config, interrupted: the first corpus's manifest is gone with it
    other = replace(small_synth_cfg, seed=9)
    _interrupt_after_first_speaker(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_synth(other, out, overwrite=True)
    assert not (out / "manifest.tsv").exists()
    with pytest.raises(OfactlError, match="not empty"):
        run_synth(small_synth_cfg, out)  # the folder now holds the other config's unfinished run
    assert not run_synth(other, out).reused


def plan_speakers(cfg):
    return {it.speaker.id for it in plan(cfg)}


def test_wavs_are_16k_pcm16(synth_corpus):
    c = read_corpus(synth_corpus)
    info = sf.info(str(c[0].path))
    assert info.samplerate == 16000 and info.subtype == "PCM_16"


def test_config_validation():
    with pytest.raises(ValueError, match="exceeds"):
        SynthConfig(n_speakers=10_000).validate()
    with pytest.raises(ValueError, match="dev_fraction"):
        SynthConfig(dev_fraction=0.6, test_fraction=0.5).validate()
    assert len(set(make_sentences(50, 0))) == 50
    assert make_sentences(10, 3) == make_sentences(10, 3)


def test_unknown_voice_is_clear(tmp_path, small_synth_cfg):
    with pytest.raises(ConfigError, match="no voice 'xx-none"):
        run_synth(replace(small_synth_cfg, accents=("xx-none",), n_speakers=3), tmp_path / "v")


def test_pretraining_voices_leave_out_another_presets_test_voices():
    from ofactl.config import load_config
    from ofactl.synth import SynthConfig, excluded_voices, make_speakers

    cfg = load_config(SynthConfig, "synth", "synth-pretrain")
    held = excluded_voices("synth-tiny")
    assert len(held) == 4  # synth-tiny's test speakers
    voices = {(s.accent, s.variant, s.pitch, s.speed) for s in make_speakers(cfg)}
    assert len(voices) == cfg.n_speakers and not voices & held
