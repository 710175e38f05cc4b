from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from ofactl import __version__
from ofactl.cli import app

runner = CliRunner()


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("distill", "extract", "sweep", "adapt", "synth", "info"):
        assert cmd in r.stdout
    assert runner.invoke(app, ["synth", "-h"]).exit_code == 0


def test_every_command_summary_is_one_line():
    """The command list shows a docstring's first paragraph as typed: one line, or it breaks mid-sentence."""
    for cmd in app.registered_commands:
        doc = cmd.callback.__doc__ or ""
        first = doc.strip().split("\n\n")[0]
        assert first and "\n" not in first, cmd.callback.__name__


def test_version_and_no_args():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.stdout
    r = runner.invoke(app, [])
    assert r.exit_code in (0, 2) and "Usage" in r.output


def test_usage_error_exit_2():
    r = runner.invoke(app, ["synth", "--no-such-flag"])
    assert r.exit_code == 2


def test_runtime_error_exit_1_one_line(tmp_path):
    r = runner.invoke(app, ["synth", "-c", "no-such-preset", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1
    assert "unknown preset 'no-such-preset'" in r.stderr
    assert "Traceback" not in r.stderr
    r = runner.invoke(app, ["synth", "--set", "seed=abc", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "seed in defaults with --set seed=abc: expected int" in r.stderr


def test_debug_shows_traceback(tmp_path):
    r = runner.invoke(app, ["synth", "--debug", "--set", "nope=1", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "Traceback" in r.stderr


def test_synth_json_on_stdout(tmp_path):
    out = tmp_path / "c"
    args = ["synth", "--out", str(out), "--json", "--set", "n_speakers=3", "--set", "keyword_takes=1",
            "--set", "keywords=[yes]", "--set", "sentences_per_speaker=1", "--set", "n_sentences=3"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["utterances"] == 6 and doc["speakers"] == 3 and not doc["reused"]
    assert (out / "manifest.tsv").is_file() and (out / "synth.yaml").is_file()
    doc2 = json.loads(runner.invoke(app, args).stdout)
    assert doc2["reused"] is True


def test_missing_required_options_exit_2():
    for cmd in ("distill", "extract", "sweep", "adapt"):
        r = runner.invoke(app, [cmd])
        assert r.exit_code == 2 and "Missing option" in r.output


def test_info_json():
    r = runner.invoke(app, ["info", "--json"])
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["ofactl"] == __version__ and "cuda_available" in doc and "torch" in doc


def test_info_missing_path(tmp_path):
    r = runner.invoke(app, ["info", str(tmp_path / "nothing.pt")])
    assert r.exit_code == 1 and "no such file" in r.stderr


def test_info_describes_a_recording_as_the_models_get_it(tmp_path, write_wav):
    stereo = write_wav("tel.wav", seconds=1.0, sr=8000, channels=2)
    doc = json.loads(runner.invoke(app, ["info", str(stereo), "--json"]).stdout)
    assert doc == {"kind": "audio", "seconds": 1.0, "sample_rate": 8000, "channels": 2, "samples_16k": 16000,
                   "frames_20ms": 49, "level_dbfs": pytest.approx(-13.5, abs=0.1),
                   "notes": ["resampled from 8000 Hz to 16000 Hz", "2 channels mixed down to mono"]}
    import soundfile as sf

    sf.write(str(tmp_path / "blip.flac"), 0.001 * np.ones(200, dtype=np.float32), 16000)
    r = runner.invoke(app, ["info", str(tmp_path / "blip.flac")])
    assert r.exit_code == 0 and "frames_20ms: 0" in r.stdout
    assert "note: quieter than -35 dBFS" in r.stdout and "note: too short: the models need at least 400 samples" in r.stdout
    tone = np.sin(np.linspace(0, 200 * np.pi, 16000)).astype(np.float32)
    sf.write(str(tmp_path / "hot.wav"), 1.5 * tone, 16000, subtype="FLOAT")
    notes = json.loads(runner.invoke(app, ["info", str(tmp_path / "hot.wav"), "--json"]).stdout)["notes"]
    assert notes == ["samples reach 1.50, past full scale (a float file outside [-1, 1]); the models take them as they are"]
    sf.write(str(tmp_path / "clipped.wav"), np.clip(1.5 * tone, -1, 1), 16000, subtype="PCM_16")
    notes = json.loads(runner.invoke(app, ["info", str(tmp_path / "clipped.wav"), "--json"]).stdout)["notes"]
    assert len(notes) == 1 and notes[0].startswith("clipped: ") and "of the samples are at full scale" in notes[0]


def test_an_audio_or_text_file_given_as_a_checkpoint_is_named_for_what_it_is(tmp_path, write_wav):
    wav = write_wav("a.wav")
    r = runner.invoke(app, ["extract", "--ckpt", str(wav), "--corpus", str(tmp_path), "--out", str(tmp_path / "f.zarr")])
    assert r.exit_code == 1 and "a.wav: an audio file, not a student checkpoint" in r.stderr, r.output
    r = runner.invoke(app, ["sweep", "--ckpt", "builtin:hubert-tiny", "--corpus", str(tmp_path), "--task", "ks"])
    assert r.exit_code == 1 and "builtin:hubert-tiny is a teacher, not a student checkpoint" in r.stderr, r.output
    assert "ofactl distill --teacher builtin:hubert-tiny" in r.stderr
    r = runner.invoke(app, ["info", "builtin:hubert-tiny"])
    assert r.exit_code == 1 and "'ofactl info --teacher builtin:hubert-tiny' describes it" in r.stderr, r.output
    (tmp_path / "preset.yaml").write_text("distill:\n  steps: 3\n")
    r = runner.invoke(app, ["info", str(tmp_path / "preset.yaml")])
    assert r.exit_code == 1 and "preset.yaml: not a student checkpoint (not a torch archive)" in r.stderr
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 cut short")
    r = runner.invoke(app, ["info", str(tmp_path / "cut.pt")])
    assert r.exit_code == 1 and "cut.pt: corrupt or truncated checkpoint" in r.stderr


@pytest.mark.slow
def test_cli_import_does_not_import_torch():
    code = "import sys, ofactl.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "ofactl", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_info_describes_a_corpus_as_every_command_reads_it(tmp_path, write_wav, synth_corpus):
    for i, sr in enumerate((16000, 16000, 8000)):
        write_wav(f"rec/r{i}.wav", seconds=0.5 + i, sr=sr)
    (tmp_path / "rec" / "same.wav").symlink_to(tmp_path / "rec" / "r0.wav")
    (tmp_path / "rec" / "zero.wav").write_bytes(b"")
    doc = json.loads(runner.invoke(app, ["info", str(tmp_path / "rec"), "--json"]).stdout)
    assert doc["kind"] == "corpus" and doc["utterances"] == 4 and doc["seconds"] == 5.0  # 0.5 twice, 1.5, 2.5
    assert doc["seconds_min_median_max"] == [0.5, 1.0, 2.5] and doc["sample_rates"] == {"16000": 3, "8000": 1}
    assert any("1 utterance(s) read a file another one reads too" in n and "r0 and same" in n for n in doc["notes"])
    assert any("1 file(s) unreadable" in n and "zero.wav: empty file" in n for n in doc["notes"])
    lst = tmp_path / "list.txt"
    lst.write_text(f"{tmp_path / 'rec' / 'r1.wav'}\n{tmp_path / 'rec' / 'r2.wav'}\n")
    doc = json.loads(runner.invoke(app, ["info", str(lst), "--json"]).stdout)
    assert doc["utterances"] == 2 and doc["seconds"] == 4.0 and doc["notes"] == []
    r = runner.invoke(app, ["info", str(synth_corpus)])  # a manifest: its labels summed up
    assert r.exit_code == 0 and "speakers: 6" in r.stdout and '"train": ' in r.stdout, r.stdout
    assert json.loads(runner.invoke(app, ["info", str(synth_corpus.parent), "--json"]).stdout)["speakers"] == 6
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["info", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "nor a corpus (no audio files below it)" in r.stderr


def test_info_tells_how_far_an_unfinished_synth_or_quickstart_has_got(tmp_path, small_synth_cfg):
    from ofactl.config import save_resolved

    out = tmp_path / "syn"
    out.mkdir()
    save_resolved(small_synth_cfg, "synth", out / "synth.yaml")
    (out / "wavs" / "spk001").mkdir(parents=True)
    (out / "wavs" / "spk001" / "rows.json").write_text("{}")
    doc = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    assert doc["kind"] == "synth, unfinished" and (doc["speakers"], doc["speakers_finished"]) == (6, 1)
    (tmp_path / "qs").mkdir()
    (tmp_path / "qs" / "quickstart.yaml").write_text("quickstart: {}\n")
    r = runner.invoke(app, ["info", str(tmp_path / "qs")])
    assert "kind: quickstart, unfinished" in r.stdout and "goes on, reusing the stages finished" in r.stdout


def test_info_describes_checkpoint_and_teacher(tmp_path):
    import torch

    from ofactl.checkpoint import save_student
    from ofactl.model.student import Student, student_config

    p = save_student(tmp_path / "s.pt", Student(student_config("tiny")), step=3)
    r = runner.invoke(app, ["info", str(p), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["step"] == 3
    r = runner.invoke(app, ["info", "--teacher", "random:tiny", "--json"])
    doc = json.loads(r.stdout)
    assert doc["format"] == "random" and doc["hidden_states"] == 5
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(1)}, bad)
    r = runner.invoke(app, ["info", "--teacher", str(bad)])
    assert r.exit_code == 1 and "accepted:" in r.stderr


def test_info_describes_a_teacher_file_and_the_run_folders_of_distill_and_pretrain(tmp_path):
    from ofactl.checkpoint import save_student
    from ofactl.model.blocks import HubertArch
    from ofactl.model.student import Student, student_config
    from ofactl.pretrain import PretrainModel, export_teacher

    arch = HubertArch(conv_layers=((8, 10, 5),) + ((8, 3, 2),) * 4 + ((8, 2, 2),) * 2, embed_dim=16,
                      num_layers=1, num_heads=2, ffn_dim=32, pos_conv_kernel=8, pos_conv_groups=2)
    (tmp_path / "pre").mkdir()
    export_teacher(PretrainModel(arch, 4, 8, 0.1), tmp_path / "pre" / "teacher.safetensors")
    save_student(tmp_path / "dis" / "student.pt", Student(student_config("tiny")), step=5)
    for args, key, want in ((["pre/teacher.safetensors"], "hidden_states", 2), (["pre"], "hidden_states", 2),
                            (["--teacher", "pre"], "hidden_states", 2), (["dis"], "step", 5)):
        r = runner.invoke(app, ["info", *(a if a.startswith("--") else str(tmp_path / a) for a in args), "--json"])
        assert r.exit_code == 0, (args, r.output)
        assert json.loads(r.stdout)[key] == want, args
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["info", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "adapt (summary.json), distill (student.pt) or pretrain" in r.stderr


def test_docs_cli_md_is_current():
    from pathlib import Path

    from ofactl.cli import cli_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert doc.read_text() == cli_markdown(), "docs/cli.md is stale: run python -m ofactl.cli_docs"
    for cmd in ("synth", "distill", "extract", "sweep", "adapt", "info"):
        assert f"## `ofactl {cmd}`" in doc.read_text()


def test_docs_presets_key_reference_is_current():
    from pathlib import Path

    from ofactl.cli_docs import with_keys

    doc = (Path(__file__).resolve().parents[1] / "docs" / "presets.md").read_text()
    assert doc == with_keys(doc), "docs/presets.md keys are stale: run python -m ofactl.cli_docs"
    for key in ("`student.spectral_bins`", "`probe.ctc_head`", "`cost`", "`rates`", "`adapt_tasks`", "`probe.max_frames`", "`long_window_s`"):
        assert key in doc


def test_generated_block_replacement_and_missing_markers():
    import pytest

    from ofactl.cli_docs import replace_block

    doc = "intro\n<!-- a -->\nold\n<!-- b -->\nrest\n"
    assert replace_block(doc, "<!-- a -->", "<!-- b -->", "<!-- a -->\nnew\n<!-- b -->", "x.md") == \
        "intro\n<!-- a -->\nnew\n<!-- b -->\nrest\n"
    with pytest.raises(ValueError, match="x.md lacks the generated-block markers"):
        replace_block("no markers", "<!-- a -->", "<!-- b -->", "", "x.md")


@pytest.mark.parametrize("cmd", [
    ["distill", "-c", "distill-tiny", "--corpus", "x"],
    ["sweep", "--ckpt", "x.pt", "--corpus", "x"],
    ["adapt", "--ckpt", "x.pt", "--corpus", "x"],
    ["quickstart"],
])
@pytest.mark.parametrize("device", ["gpu", "cuda:7"])
def test_bad_device_is_one_line_on_every_command(cmd, device, tmp_path):
    r = runner.invoke(app, cmd + ["--device", device, "--out", str(tmp_path / "o")])
    assert r.exit_code == 1, r.output
    assert r.stderr.count("\n") == 1 and f"--device {device}" in r.stderr.replace("'", "")
    assert not (tmp_path / "o").exists()  # refused before any work


@pytest.mark.parametrize("preset", [[], ["-c", "distilhubert-ofa"]])
def test_distill_without_a_teacher_is_refused_naming_the_flag(preset, tmp_path):
    # distilhubert-ofa leaves the teacher to --teacher: forgetting it must not train on an untrained model
    r = runner.invoke(app, ["distill", *preset, "--corpus", "x", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1, r.output
    assert r.stderr.count("\n") == 1 and "distill needs a teacher: --teacher builtin:hubert-tiny-v3" in r.stderr
    assert not (tmp_path / "o").exists()  # refused before the run folder is made


def test_json_failure_prints_an_error_document(tmp_path):
    r = runner.invoke(app, ["extract", "--ckpt", str(tmp_path / "none.pt"), "--corpus", "x", "--json"])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 1 and "none.pt not found" in doc["error"] and doc["kind"] == "CheckpointError"
    assert "none.pt not found" in r.stderr  # the message stays on stderr too


def test_a_folder_given_for_a_file_is_named_as_a_folder(tmp_path):
    r = runner.invoke(app, ["extract", "--ckpt", str(tmp_path), "--corpus", "x"])
    assert r.exit_code == 1 and "is a folder, not a checkpoint file" in r.output
    r = runner.invoke(app, ["distill", "-c", str(tmp_path), "--corpus", "x"])
    assert r.exit_code == 1 and "is a folder, not a YAML file" in r.output


def test_json_usage_error_prints_an_error_document(capsys):
    from ofactl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["extract", "--json"])
    assert e.value.code == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"error": "Missing option '--ckpt'.", "exit_code": 2, "kind": "usage"}


def test_library_warnings_print_one_line(capsys):
    import warnings

    from ofactl.cli import _one_line_warnings

    saved = warnings.showwarning
    try:
        _one_line_warnings()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("first line of a torch warning\n  second line\n  third", UserWarning, stacklevel=1)
    finally:
        warnings.showwarning = saved
    err = capsys.readouterr().err
    assert err == "warning: first line of a torch warning\n"


# ----------------------------------------------------------------------------- flags as values
# Each command's flags reach its run_* function as typed config values: patch run_* and look at
# what it receives. Paths keep '#', ': ' and spaces (no flag goes through YAML text).
ODD = "/models/hubert #2/a: b c.pt"


class _Captured(Exception):
    pass


def _capture(monkeypatch, module: str, name: str) -> dict:
    seen: dict = {}

    def fake(cfg, *args, **kwargs):
        seen.update(cfg=cfg, args=args, kwargs=kwargs)
        raise _Captured

    monkeypatch.setattr(f"{module}.{name}", fake)
    return seen


def _invoke_captured(args: list[str]):
    r = runner.invoke(app, args)
    assert isinstance(r.exception, _Captured), r.output
    return r


def test_distill_flags_are_values(monkeypatch):
    seen = _capture(monkeypatch, "ofactl.distill", "run_distill")
    _invoke_captured(["distill", "--corpus", ODD, "--out", ODD, "--teacher", ODD, "--boundaries", ODD,
                      "-c", "distill-tiny", "--set", "steps=5", "--steps", "7", "--compressor", "avgpool"])
    cfg = seen["cfg"]
    assert cfg.teacher == ODD and cfg.guidance.boundaries == ODD
    assert cfg.steps == 7 and cfg.student.compressor == "avgpool"  # flag over --set over preset
    assert seen["args"][0] == ODD and str(seen["args"][1]) == ODD
    _invoke_captured(["distill", "--corpus", "x", "-c", "distill-tiny", "--set", "steps=5"])
    assert seen["cfg"].steps == 5


def test_set_keeps_string_values_verbatim(monkeypatch):
    seen = _capture(monkeypatch, "ofactl.distill", "run_distill")
    _invoke_captured(["distill", "--corpus", "x", "--set", f"teacher={ODD}", "--set", "guidance.boundaries=runs/a: b.tsv"])
    assert seen["cfg"].teacher == ODD and seen["cfg"].guidance.boundaries == "runs/a: b.tsv"


def test_extract_flags_are_values(monkeypatch):
    seen = _capture(monkeypatch, "ofactl.extract", "run_extract")
    _invoke_captured(["extract", "--ckpt", ODD, "--corpus", ODD, "--out", ODD, "--rate", "1", "--frame-ms", "40",
                      "--dtype", "float32", "--workers", "0", "--adaptive-length", "--format", "hdf5"])
    cfg = seen["cfg"]
    assert cfg.rates == (1.0, 0.5) and cfg.dtype == "float32" and cfg.num_workers == 0 and cfg.adaptive_length
    assert [str(a) for a in seen["args"]] == [ODD, ODD, ODD] and seen["kwargs"]["format"] == "hdf5"


def test_a_bad_flag_is_named_as_typed(tmp_path):
    r = runner.invoke(app, ["extract", "--ckpt", "x.pt", "--corpus", "x", "--out", str(tmp_path / "s"), "--rate", "1.5"])
    assert r.exit_code == 1
    assert "--rate 1.5: rate 1.5 is outside (0, 1]" in r.stderr and "--set" not in r.stderr
    r = runner.invoke(app, ["extract", "--ckpt", "x.pt", "--corpus", "x", "--frame-ms", "10"])
    assert r.exit_code == 1 and "--frame-ms must be >= 20" in r.stderr
    r = runner.invoke(app, ["extract", "--ckpt", "x.pt", "--corpus", "x", "--rate", "0.5", "--frame-ms", "40"])
    assert r.exit_code == 1 and "--rate 0.5 --frame-ms 40: rates [0.5, 0.5] collide" in r.stderr
    r = runner.invoke(app, ["extract", "--ckpt", "x.pt", "--corpus", "x", "--rate", "1,half"])
    assert r.exit_code == 1 and "--rate 1,half: expected numbers, comma-separated or with --rate repeated" in r.stderr
    r = runner.invoke(app, ["sweep", "--ckpt", "x.pt", "--corpus", "x", "--rates", "1;0.5"])
    assert r.exit_code == 1 and "--rates 1;0.5: expected numbers" in r.stderr
    r = runner.invoke(app, ["quickstart", "--out", "q", "--set", "tasks=[zz]"])  # brackets are text, not style
    assert r.exit_code == 1 and "with --set tasks=[zz]: expected 'ks'" in r.stderr, r.output


def test_extract_takes_rates_as_a_comma_list_or_repeated(monkeypatch):
    seen = _capture(monkeypatch, "ofactl.extract", "run_extract")
    _invoke_captured(["extract", "--ckpt", ODD, "--corpus", ODD, "--rate", "1,0.5", "--rate", "0.25",
                      "--frame-ms", "100,200"])
    assert seen["cfg"].rates == (1.0, 0.5, 0.25, 0.2, 0.1)
    r = runner.invoke(app, ["extract", "--ckpt", "x.pt", "--corpus", "x", "--dtype", "int8"])
    assert r.exit_code == 2 and "float16" in r.output  # a fixed choice is checked by the parser


def test_sweep_and_adapt_flags_are_values(monkeypatch):
    seen = _capture(monkeypatch, "ofactl.sweep", "run_sweep")
    _invoke_captured(["sweep", "--ckpt", f"fixed={ODD}", "--ckpt", ODD, "--corpus", ODD, "--rates", "1,0.5",
                      "--task", "pr", "--out", ODD])
    assert seen["cfg"].rates == (1.0, 0.5) and seen["cfg"].task == "pr"
    assert [(label, str(p)) for label, p in seen["args"][0]] == [("fixed", ODD), ("hubert #2", ODD)]
    seen = _capture(monkeypatch, "ofactl.sweep", "run_sweep")  # extract's spelling works too
    _invoke_captured(["sweep", "--ckpt", ODD, "--corpus", ODD, "--rate", "1,0.5", "-r", "0.25", "--out", ODD])
    assert seen["cfg"].rates == (1.0, 0.5, 0.25)
    seen = _capture(monkeypatch, "ofactl.sweep", "run_sweep")  # and extract's other feature flags
    _invoke_captured(["sweep", "--ckpt", ODD, "--corpus", ODD, "--rates", "1", "--frame-ms", "40,80", "--adaptive-length",
                      "--level-db", "-25", "--out", ODD])
    ext = seen["cfg"].extract
    assert seen["cfg"].rates == (1.0, 0.5, 0.25) and ext.adaptive_length is True and ext.level_db == -25
    r = runner.invoke(app, ["sweep", "--ckpt", "x.pt", "--corpus", "x", "--rates", "0.5", "--frame-ms", "40"])
    assert r.exit_code == 1 and "--rates 0.5 --frame-ms 40: rates [0.5, 0.5] collide" in r.stderr, r.output
    seen = _capture(monkeypatch, "ofactl.adapt", "run_adapt")
    _invoke_captured(["adapt", "--ckpt", ODD, "--corpus", ODD, "--task", "ks", "--cost", "0.1", "--cost-form", "linear",
                      "--out", ODD])
    assert seen["cfg"].task == "ks" and seen["cfg"].cost == 0.1 and str(seen["args"][0]) == ODD
    assert seen["cfg"].cost_form == "linear"


def test_pretrain_from_is_a_flag(monkeypatch):
    seen = _capture(monkeypatch, "ofactl.pretrain", "run_pretrain")
    _invoke_captured(["pretrain", "--corpus", "x", "--targets", "layer:2", "--from", ODD])
    assert seen["cfg"].from_ckpt == ODD and seen["cfg"].targets == "layer:2"


def test_quickstart_and_synth_flags_are_values(monkeypatch):
    seen = _capture(monkeypatch, "ofactl.quickstart", "run_quickstart")
    _invoke_captured(["quickstart", "--out", ODD, "--device", "cpu", "--set", "rates=[1, 0.5]"])
    assert seen["cfg"].device == "cpu" and seen["cfg"].rates == (1.0, 0.5) and str(seen["args"][0]) == ODD
    seen = _capture(monkeypatch, "ofactl.synth", "run_synth")
    _invoke_captured(["synth", "--out", ODD, "-c", "synth-tiny", "--set", "seed=3"])
    assert seen["cfg"].seed == 3 and str(seen["args"][0]) == ODD


def test_tables_off_a_terminal_keep_every_cell_whole():
    import io

    from rich.console import Console

    from ofactl.cli import _show, _table

    cols = ["label", "rate", "achieved", "ms", "PER", "GMAC/s", "s/audio-s", "probe s", "MB", "infeasible"]
    t = _table(cols, "pr sweep")
    t.add_row("fixed0.25", "0.25", "0.250", "80.0", "0.2230 ± 0.0120", "0.01", "0.0012", "63.1", "12.3", "-")
    piped = Console(file=io.StringIO(), width=80)  # a file is no terminal: rich's default width is 80
    _show(piped, t)
    text = piped.file.getvalue()
    assert "…" not in text and "fixed0.25" in text and "0.2230 ± 0.0120" in text and "infeasible" in text
    assert max(len(line) for line in text.splitlines()) > 80


def test_extract_speed_keeps_two_digits_below_real_time():
    from ofactl.cli import _speed

    assert _speed(0.3, 12.6) == "0.024x real time"
    assert _speed(82.7, 1.0) == "82.7x real time"


@pytest.mark.parametrize("cmd", ["synth", "distill", "pretrain", "extract", "sweep", "adapt", "quickstart"])
def test_an_out_folder_under_a_file_is_one_error_on_every_command(cmd, tmp_path, synth_corpus, student_ckpt):
    (tmp_path / "f").write_text("")
    out = str(tmp_path / "f" / "run")
    corpus, ckpt = ["--corpus", str(synth_corpus)], ["--ckpt", str(student_ckpt[0])]
    args = {"synth": [], "quickstart": [], "distill": ["-c", "distill-tiny", *corpus, "--steps", "1"],
            "pretrain": ["-c", "pretrain-tiny", *corpus, "--steps", "1"], "extract": [*ckpt, *corpus, "--rate", "1"],
            "sweep": [*ckpt, *corpus, "--task", "ks", "--rates", "1"], "adapt": [*ckpt, *corpus, "--task", "ks"]}[cmd]
    r = runner.invoke(app, [cmd, *args, "--out", out])
    assert r.exit_code == 1 and "f is a file, not a folder" in r.output, r.output
    assert "Traceback" not in r.output and (tmp_path / "f").read_text() == ""


@pytest.mark.parametrize("cmd", ["distill", "pretrain", "sweep", "adapt"])
def test_a_refused_corpus_leaves_no_run_folder(tmp_path, student_ckpt, cmd):
    """Neither an empty folder nor one holding only the config of a run that never ran."""
    listing = tmp_path / "list.txt"
    listing.write_text("missing.wav\n")
    student = ["--ckpt", str(student_ckpt[0]), "--task", "ks"] if cmd in ("sweep", "adapt") else []
    student += ["--teacher", "random:tiny"] if cmd == "distill" else []
    r = runner.invoke(app, [cmd, "--corpus", str(listing), *student, "--out", str(tmp_path / "runs" / "x"),
                            "--device", "cpu"])
    assert r.exit_code == 1 and "missing.wav: file not found" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.txt"]


def test_off_a_terminal_progress_is_a_plain_line_every_so_often(capsys):
    import re
    import time

    from ofactl.cli import RichProgress

    p = RichProgress(enabled=False, quiet=False, every_s=0.0)
    p.start("pretraining", 100)
    before = time.monotonic()
    p.advance(40)  # a resumed run jumps to its step first: the origin of the speed, not part of it
    time.sleep(0.05)
    p.advance(10, loss=2.5)
    after = time.monotonic()
    p.finish()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "pretraining (100)" and len(lines) == 2, lines
    assert re.fullmatch(r"pretraining: 50/100 \(50%\), [\d.]+/s, \d+s left  loss=2\.5", lines[1]), lines[1]
    rate = float(lines[1].split(", ")[1].removesuffix("/s"))
    assert 0.98 * 10 / (after - before) <= rate <= 1.02 * 10 / 0.05  # 10 steps in at least 0.05 s, not 50
    for p in (RichProgress(enabled=False, quiet=False), RichProgress(enabled=False, quiet=True, every_s=0.0)):
        p.start("extracting", 3)
        p.advance(1)
        p.advance(2)
        p.finish()
    assert capsys.readouterr().err.strip().splitlines() == ["extracting (3)"]  # once a minute; quiet: nothing


def test_the_plain_lines_speed_forgets_a_pause_once_it_is_ten_lines_old(capsys, monkeypatch):
    from ofactl import cli

    clock = [0.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    p = cli.RichProgress(enabled=False, quiet=False, every_s=60.0)
    p.start("pretraining", 10_000)
    p.advance(100)  # the origin
    speeds = []
    for minute in range(1, 25):
        clock[0] += 60.0 + (600.0 if minute == 3 else 0.0)  # 60 steps a minute; a 10-minute pause before the third
        p.advance(60)
        speeds.append(float(capsys.readouterr().err.strip().split(", ")[1].removesuffix("/s")))
    p.finish()
    assert speeds[0] == 1.0 and speeds[2] < 0.3  # just after the pause it counts
    assert speeds[11] < 1.0 and speeds[12:] == [1.0] * 12  # ten lines after the third it no longer does


def test_info_tells_how_far_an_unfinished_run_has_got(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("pretrain:\n  steps: 100\n")
    for step in (20, 40):
        (run / "checkpoints" / f"step-{step:08d}.pt").write_bytes(b"")
    first = [{"step": s, "loss": 1.0, "elapsed_s": float(s)} for s in (10, 20, 30)]  # killed after step 30
    again = [{"step": s, "loss": 1.0, "elapsed_s": 2.0 * (s - 20)} for s in (30, 40, 50)]  # resumed at 20: 2 s a step
    lines = [*first, {"step": 20, "eval": {"acc_masked": 0.25}}, *again]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    doc = json.loads(runner.invoke(app, ["info", str(run), "--json"]).stdout)
    assert doc == {"kind": "pretrain run, unfinished", "steps": 100, "newest_checkpoint_step": 40,
                   "held_out": {"step": 20, "acc_masked": 0.25}, "logged_step": 50, "s_per_step": 2.0,
                   "time_left": "2m00s", "resume": "the same 'ofactl pretrain' command with --resume goes on from step 40"}
    for f in (run / "checkpoints").iterdir():
        f.unlink()
    (run / "metrics.jsonl").unlink()
    doc = json.loads(runner.invoke(app, ["info", str(run), "--json"]).stdout)
    assert doc["newest_checkpoint_step"] == 0 and "starts at step 0" in doc["resume"] and "s_per_step" not in doc
    (run / "config.yaml").write_text("adapt:\n  task: pr\n")  # not a training run: as before
    r = runner.invoke(app, ["info", str(run)])
    assert r.exit_code == 1 and "nor the folder of sweep" in r.stderr


def test_info_tells_how_far_a_pretrain_run_got_with_its_units(tmp_path):
    import torch

    from ofactl.units import TARGETS_FILE, Units, _write_targets

    run = tmp_path / "run"
    run.mkdir()
    Units(torch.randn(4, 39), torch.zeros(39), torch.ones(39), "mfcc").save(run / "kmeans.safetensors")
    _write_targets(run / TARGETS_FILE, "k", {f"u{i}": np.zeros(5, np.int16) for i in range(3)})
    # a first start stopped while assigning: no settings recorded yet, the units kept
    doc = json.loads(runner.invoke(app, ["info", str(run), "--json"]).stdout)
    assert doc == {"kind": "pretrain run, unfinished (first start: units)", "kmeans": "fitted: 4 units of mfcc",
                   "unit_targets": "3 utterances assigned",
                   "resume": "the same 'ofactl pretrain' command with --resume goes on, reusing the k-means and "
                             "the unit targets kept"}
    (run / "config.yaml").write_text("pretrain:\n  steps: 100\n")
    (run / "corpus.json").write_text(json.dumps({"utterances": 5}))
    (run / TARGETS_FILE).write_bytes((run / TARGETS_FILE).read_bytes()[:100])  # cut short
    doc = json.loads(runner.invoke(app, ["info", str(run), "--json"]).stdout)
    assert doc["kind"] == "pretrain run, unfinished" and doc["kmeans"] == "fitted: 4 units of mfcc"
    assert doc["unit_targets"] == "unreadable (BadZipFile): assigned again at the next start"
    _write_targets(run / TARGETS_FILE, "k", {f"u{i}": np.zeros(5, np.int16) for i in range(5)})
    assert json.loads(runner.invoke(app, ["info", str(run), "--json"]).stdout)["unit_targets"] == \
        "5 of 5 utterances assigned"


def _row(rate: float, test: float) -> dict:
    from ofactl.sweep import SweepRow

    return SweepRow(label="ofa", checkpoint_sha256="ab" * 32, store_group=f"r{rate}", task="ks", requested_rate=rate,
                    achieved_rate=rate, frame_period_ms=20 / rate, metric="accuracy", test=test, dev=test,
                    extra_metrics={}, upstream_gmacs_per_s=rate, upstream_cnn_gmacs_per_s=0.1,
                    extract_s_per_audio_s=0.01, probe_train_s=1.5, probe_params=10, probe_mmacs_per_s=0.1,
                    store_mb=1.0, infeasible_test=None, layer_weights=[1.0], seed=0).to_json()


def test_info_shows_what_a_sweep_adapt_or_quickstart_folder_measured(tmp_path):
    sw = tmp_path / "sw"
    (sw / "rows").mkdir(parents=True)
    (sw / "config.yaml").write_text("sweep:\n  task: ks\n")
    (sw / "rows" / "ofa__r1__ks.json").write_text(json.dumps(_row(1.0, 0.9)))
    (sw / "rows" / "ofa__r0.5__ks.json").write_text(json.dumps(_row(1.0, 0.9))[:30])  # cut short by a kill
    doc = json.loads(runner.invoke(app, ["info", str(sw), "--json"]).stdout)
    assert doc["kind"] == "sweep, unfinished" and [r["test"] for r in doc["rows"]] == [0.9]
    assert "goes on" in doc["resume"]
    (sw / "sweep.json").write_text(json.dumps({"task": "ks", "rows": [_row(1.0, 0.9), _row(0.5, 0.8125)],
                                               "not_scored": [{"label": "fixed", "rate": 0.25, "reason": "x"}]}))
    doc = json.loads(runner.invoke(app, ["info", str(sw), "--json"]).stdout)
    assert doc["kind"] == "sweep" and [r["requested_rate"] for r in doc["rows"]] == [1.0, 0.5]
    assert "later_rows" not in doc
    later = (sw / "sweep.json").stat().st_mtime + 60  # rows measured after sweep.json: one copied over, one a new sweep's
    (sw / "rows" / "ofa__r0.5__ks.json").write_text(json.dumps(_row(0.5, 0.8125)))
    (sw / "rows" / "ofa__r0.25__ks.json").write_text(json.dumps(_row(0.25, 0.75)))
    (sw / "rows" / "ofa__r1__sid.json").write_text(json.dumps(_row(1.0, 0.5)))  # an earlier sweep's row
    for f, t in (("ofa__r0.5__ks.json", later), ("ofa__r0.25__ks.json", later), ("ofa__r1__sid.json", later - 120)):
        os.utime(sw / "rows" / f, (t, t))
    doc = json.loads(runner.invoke(app, ["info", str(sw), "--json"]).stdout)
    assert doc["later_rows"].startswith("1 row(s)") and "running or was stopped" in doc["later_rows"], doc
    assert [r["requested_rate"] for r in doc["rows"]] == [1.0, 0.5]  # the finished sweep's table
    r = runner.invoke(app, ["info", str(sw)])
    assert r.exit_code == 0 and "0.8125" in r.stdout and "40.0" in r.stdout, r.output  # the table: metric, ms
    assert "fixed at rate 0.25: not scored" in r.stdout
    (sw / "sweep.json").write_text(json.dumps({"task": "ks", "rows": [{**_row(1.0, 0.9), "new_field": 1}]}))
    r = runner.invoke(app, ["info", str(sw)])
    assert r.exit_code == 1 and "sweep.json" in r.stderr and "new_field" in r.stderr and "Traceback" not in r.output
    (sw / "sweep.json").write_text("{")
    r = runner.invoke(app, ["info", str(sw)])
    assert r.exit_code == 1 and "sweep.json: unreadable" in r.stderr, r.output
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "summary.json").write_text(json.dumps({"task": "pr", "learned_rate": 0.75, "metric": "per"}))
    (ad / "rate.yaml").write_text("extract:\n  rates: [0.75]\n")
    doc = json.loads(runner.invoke(app, ["info", str(ad), "--json"]).stdout)
    assert doc == {"kind": "adapt", "task": "pr", "learned_rate": 0.75, "metric": "per"}
    assert "learned_rate: 0.75" in runner.invoke(app, ["info", str(ad)]).stdout
    qs = tmp_path / "qs"
    qs.mkdir()
    (qs / "quickstart.yaml").write_text("quickstart:\n  tasks: [ks]\n")
    adapt = {"task": "ks", "metric": "accuracy", "learned_rate": 0.3, "frame_period_ms": 66.7, "test": 0.9}
    summary = {"rows": [{**_row(1.0, 0.9), "test_sd": 0.01}, _row(0.5, 0.8125)], "adapt": {"ks": adapt},
               "paths": {"store": "qs/feats.zarr"}, "stage_seconds": {"synth": 10.0}, "note": "the teacher is x"}
    (qs / "summary.json").write_text(json.dumps(summary))
    r = runner.invoke(app, ["info", str(qs)])
    assert r.exit_code == 0 and "0.900 ± 0.010" in r.stdout and "0.812" in r.stdout, r.output  # the trade-off table
    assert "adapt --task ks: learned rate 0.300 (66.7 ms)" in r.stdout and "store: qs/feats.zarr" in r.stdout
    assert json.loads(runner.invoke(app, ["info", str(qs), "--json"]).stdout)["kind"] == "quickstart"
    (qs / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "paths"}))
    r = runner.invoke(app, ["info", str(qs)])
    assert r.exit_code == 1 and "summary.json: no paths" in r.stderr and "Traceback" not in r.output


@pytest.mark.parametrize("sig,code,word,kind", [(signal.SIGTERM, 143, "terminated", "Terminated"),
                                               (signal.SIGHUP, 129, "hung up", "HungUp"),
                                               (signal.SIGINT, 130, "interrupted", "KeyboardInterrupt")])
def test_a_command_stopped_by_a_signal_exits_with_the_shell_s_code(monkeypatch, capsys, sig, code, word, kind):
    import ofactl.about
    import ofactl.progress
    from ofactl.cli import main

    def stopped() -> dict:
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises at the next bytecode
        return {}

    monkeypatch.setattr(ofactl.about, "environment", stopped)
    monkeypatch.setattr(ofactl.progress, "_quiet_lost_outputs", lambda: None)  # not this test process's outputs
    with pytest.raises(SystemExit) as e:
        main(["info", "--json"])
    assert e.value.code == code
    assert json.loads(capsys.readouterr().out) == {"error": word, "exit_code": code, "kind": kind}
    assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
