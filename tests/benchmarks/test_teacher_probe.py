"""benchmarks/teacher_probe.py: the input level and the GroupNorm epsilon it can change."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from ofactl.audio import level_dbfs, read_corpus


@pytest.fixture(scope="module")
def probe(load_benchmark):
    return load_benchmark("teacher_probe")


@pytest.fixture
def loud_and_quiet(tmp_path):
    """The same second of noise twice: at -20 dBFS and 40 dB quieter."""
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    x *= 0.1 / np.sqrt(np.mean(x**2))
    sf.write(tmp_path / "0_loud_0.wav", x, 16000)
    sf.write(tmp_path / "0_quiet_0.wav", x * 0.01, 16000)
    return read_corpus(f"{tmp_path}::{{label}}_{{speaker}}_{{take}}")  # FSDD's naming


def _gap(feats: dict[str, np.ndarray]) -> float:
    a, b = (feats[k].astype(np.float32) for k in sorted(feats))
    return float(np.abs(a - b).max())


def test_audio_at_a_level_has_that_rms(probe, loud_and_quiet):
    recorded = probe.decode(loud_and_quiet)
    assert probe.speaker_levels(loud_and_quiet, recorded) == {"loud": -20.0, "quiet": -60.0}
    assert probe.at_level(recorded, None) is recorded
    for w in probe.at_level(recorded, -25.0).values():
        assert level_dbfs(w) == pytest.approx(-25.0, abs=1e-3)


def test_a_tiny_group_norm_epsilon_lets_a_quiet_copy_reach_the_model_as_the_loud_one(probe, loud_and_quiet):
    waves = probe.decode(loud_and_quiet)
    trained = probe.teacher_features("random:tiny", waves)
    tiny_eps = probe.teacher_features("random:tiny", waves, norm_eps=1e-12)
    assert _gap(trained) > 0.1          # 1e-5 is not small against a -60 dBFS copy's variance
    assert _gap(tiny_eps) < 0.1 * _gap(trained)


def test_input_level_is_a_number_or_the_level_a_teacher_file_records(probe, tmp_path):
    import torch

    from ofactl.model.teacher import RANDOM_ARCHS
    from ofactl.pretrain import PretrainModel, export_teacher

    torch.manual_seed(0)
    model = PretrainModel(RANDOM_ARCHS["tiny"], 8, 16, 0.1)
    recorded = export_teacher(model, tmp_path / "recorded.safetensors", {"input_level_db": "-21.5"})
    bare = export_teacher(model, tmp_path / "bare.safetensors")
    assert probe.input_level(None, str(bare)) is None
    assert probe.input_level("-25", str(bare)) == -25.0
    assert probe.input_level("auto", str(recorded)) == -21.5
    with pytest.raises(SystemExit, match=r"--input-level-db auto: .*bare.safetensors does not record the level.*"
                                         r"not by ofactl pretrain.*--input-level-db -25"):
        probe.input_level("auto", str(bare))
    with pytest.raises(SystemExit, match="teacher_probe: --input-level-db loud: expected an RMS level in dBFS"):
        probe.input_level("loud", str(bare))
