from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ofactl.config import (
    apply_overrides,
    available_presets,
    build_config,
    find_preset,
    load_config,
    load_yaml,
    parse_override,
    save_resolved,
)
from ofactl.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)


@dataclass
class Demo:
    name: str = "x"
    steps: int = 10
    use_amp: bool = False
    rates: tuple[float, ...] = (1.0, 0.5)
    mode: str = "a"
    optim: Optim = field(default_factory=Optim)
    note: str | None = None


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_builtin_presets_are_found_and_valid():
    from ofactl.synth import SynthConfig

    assert {"synth-tiny", "synth-small"} <= set(available_presets())
    cfg = load_config(SynthConfig, "synth", "synth-tiny")
    assert cfg.n_speakers == 24
    assert find_preset("synth-small").name == "synth-small.yaml"


def test_preset_section_and_overrides(tmp_path):
    p = write(tmp_path, "distill:\n  steps: 5\n  optim: {lr: 0.01}\n")
    cfg = load_config(Demo, "distill", p, ["optim.lr=2e-4", "rates=[1, 0.25]", "use_amp=true"])
    assert cfg.steps == 5
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.rates == (1.0, 0.25)
    assert cfg.use_amp is True


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "distill:\n  optim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr' in .*p\.yaml"):
        load_config(Demo, "distill", p)


def test_wrong_type_names_expected_type(tmp_path):
    p = write(tmp_path, "distill:\n  steps: ten\n")
    with pytest.raises(ConfigError, match=r"steps in .*p\.yaml: expected int, got str 'ten'"):
        load_config(Demo, "distill", p)
    with pytest.raises(ConfigError, match=r"use_amp .*expected bool"):
        build_config(Demo, {"use_amp": "yes"})


def test_override_errors():
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr' in --set optim.lrr=1"):
        apply_overrides(Demo, {}, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("steps")
    with pytest.raises(ConfigError, match="steps in defaults with --set steps=abc: expected int"):
        load_config(Demo, "distill", None, ["steps=abc"])


def test_unknown_and_missing_sections(tmp_path):
    p = write(tmp_path, "distil:\n  steps: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'distil'"):
        load_config(Demo, "distill", p)
    p2 = write(tmp_path, "synth:\n  seed: 1\n", "q.yaml")
    with pytest.raises(ConfigError, match="has no 'distill' section"):
        load_config(Demo, "distill", p2)


def test_yaml_errors_and_missing_files(tmp_path):
    p = write(tmp_path, "distill:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*p\.yaml line"):
        load_yaml(p)
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml not found"):
        find_preset(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available:"):
        find_preset("nope")


def test_yaml_tags_are_not_executed(tmp_path):
    p = write(tmp_path, "distill: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml(p)


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(Demo, "distill", None, ["optim.lr=0.5", "note=hello"])
    path = save_resolved(cfg, "distill", tmp_path / "run" / "config.yaml")
    again = load_config(Demo, "distill", path)
    assert again == cfg


@dataclass
class _Helped:
    a: int = 1  # on the line

    # above the field,
    # two lines
    b: int = 2
    c: int = 3  # on the line,
    # continued below

    d: int = 4


def test_field_help_reads_comments_on_above_and_below_a_field():
    from ofactl.config import field_help

    assert field_help(_Helped) == {"a": "on the line", "b": "above the field, two lines",
                                   "c": "on the line, continued below"}


def test_every_config_key_has_a_meaning():
    from ofactl.config import COMMAND_SECTIONS, _leaf_keys, section_class, to_dict

    missing = [f"{s}.{key}" for s in COMMAND_SECTIONS
               for key, _, _, meaning in _leaf_keys(section_class(s), to_dict(section_class(s)())) if not meaning]
    assert not missing, f"add a comment on these fields' lines: {missing}"


def test_every_preset_loads_and_validates():
    from ofactl.config import COMMAND_SECTIONS, load_yaml, section_class

    for name in available_presets():
        doc = load_yaml(find_preset(name))
        sections = [s for s in COMMAND_SECTIONS if s in doc]
        assert sections and isinstance(doc.get("description"), str), name
        for s in sections:
            load_config(section_class(s), s, name)


def test_baseline_presets_train_at_one_recorded_rate():
    from ofactl.distill import DistillConfig, trained_rates, with_fixed_rate

    for name in ("distill-tiny-fixed", "distilhubert-fixed"):
        cfg = load_config(DistillConfig, "distill", name)
        assert cfg.student.compressor == "avgpool"
        assert trained_rates(cfg, 0.3) == {"kind": "fixed", "rates": [0.5]}
        assert trained_rates(with_fixed_rate(cfg, 0.25), 0.3) == {"kind": "fixed", "rates": [0.25]}
    assert trained_rates(load_config(DistillConfig, "distill", "distilhubert-ofa"), 0.3)["kind"] == "range"


def test_set_on_a_text_key_keeps_the_text():
    from ofactl.sweep import SweepConfig

    data = apply_overrides(SweepConfig, {}, ["label_column=a #1: b", "layers=0,2"])
    assert data == {"label_column": "a #1: b", "layers": "0,2"}
    assert apply_overrides(SweepConfig, {}, ['label_column=""'])["label_column"] == ""
    assert apply_overrides(SweepConfig, {}, ["rates=[1, 0.5]"])["rates"] == [1, 0.5]  # other keys stay YAML
