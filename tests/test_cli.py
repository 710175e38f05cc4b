from __future__ import annotations

import json
import subprocess
import sys

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


def test_cli_import_does_not_import_torch():
    code = "import sys, ofactl.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "ofactl", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


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


def test_json_failure_prints_an_error_document(tmp_path):
    r = runner.invoke(app, ["extract", "--ckpt", str(tmp_path / "none.pt"), "--corpus", "x", "--json"])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 1 and "checkpoint not found" in doc["error"] and doc["kind"] == "CheckpointError"
    assert "checkpoint not found" in r.stderr  # the message stays on stderr too


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
            warnings.warn("first line of a torch warning\n  second line\n  third", UserWarning)
    finally:
        warnings.showwarning = saved
    err = capsys.readouterr().err
    assert err == "warning: first line of a torch warning\n"
