"""The README's promises: its set-up commands, its images, a figures table that matches the
committed benchmark results, and (with docs/) commands whose flags exist and Python examples that
run."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_first_lines_are_the_two_setup_commands():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block[0].endswith("pip install . && ofactl quickstart")
    assert block[1].endswith("pip install '.[dev]' && pytest -q")
    assert README.index("```bash") < 40  # right under the title


def test_every_linked_image_and_doc_exists():
    for target in re.findall(r"\]\(([^)#]+)\)", README) + re.findall(r"`(docs/[\w./-]+)`", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_figures_table_matches_benchmark_results():
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "benchmarks" / "readme_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    assert mod.with_table(README, doc) == README, "README figures are stale: python benchmarks/readme_table.py"
    for cmd in ("python benchmarks/model_bench.py", "python benchmarks/extract_bench.py", "python benchmarks/distill_bench.py"):
        assert f"`{cmd}`" in README


def _shell_blocks(text: str) -> list[str]:
    """The shell code blocks of a markdown text (bash, sh, console or unnamed), continuations joined."""
    blocks, current, lang = [], [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang = line[3:].strip()
                current = []
            else:
                if lang in ("", "bash", "sh", "console"):
                    blocks.append(re.sub(r"\\\n\s*", " ", "\n".join(current)))
                lang = None
        elif lang is not None:
            current.append(line)
    return blocks


def _ofactl_calls(block: str) -> list[list[str]]:
    """Each ``ofactl SUBCOMMAND ...`` of a shell block as words, comments and other commands of a
    pipeline left out."""
    calls = []
    for line in block.splitlines():
        for part in re.split(r"\|\||&&|\||;|\$\(", line.split(" #")[0]):
            words = part.split()
            if "ofactl" in words and len(words) > words.index("ofactl") + 1:
                calls.append(words[words.index("ofactl") + 1 :])
    return calls


def test_every_documented_command_uses_flags_that_exist():
    import typer.main

    from ofactl.cli import app

    group = typer.main.get_command(app)
    stale = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in _shell_blocks(doc.read_text()):
            for sub, *args in _ofactl_calls(block):
                if sub.startswith(("-", "[")):  # ofactl --version, a usage line's [OPTIONS]
                    continue
                cmd = group.commands.get(sub)  # type: ignore[attr-defined]
                if cmd is None:
                    stale.append(f"{doc.name}: ofactl {sub}: no such command")
                    continue
                flags = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
                stale += [f"{doc.name}: ofactl {sub} {w}" for w in args
                          if w.startswith("-") and w != "-" and w.split("=")[0].strip("'\"") not in flags]
    assert not stale, "documented flags that do not exist:\n" + "\n".join(stale)
    assert len([1 for block in _shell_blocks(README) for _ in _ofactl_calls(block)]) > 10  # the README was read


def test_every_documented_preset_and_set_item_loads():
    import shlex

    from ofactl.config import SECTION_CLASSES, load_config, section_class
    from ofactl.errors import OfactlError

    presets = {p.stem for p in (ROOT / "presets").glob("*.yaml")}
    checked, stale = 0, []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in _shell_blocks(doc.read_text()):
            for sub, *args in _ofactl_calls(block):
                if sub not in SECTION_CLASSES:
                    continue
                words = shlex.split(" ".join(args))
                preset = next((b for a, b in itertools.pairwise(words) if a in ("-c", "--config")), None)
                sets = [b for a, b in itertools.pairwise(words) if a == "--set"]
                if (preset is not None and preset not in presets) or any("$" in s for s in sets):
                    continue  # a file of the reader's own, or a shell variable: nothing to load here
                try:
                    load_config(section_class(sub), sub, preset, sets)
                except OfactlError as e:
                    stale.append(f"{doc.name}: ofactl {sub} {' '.join(args)}: {e}")
                checked += 1
    assert not stale, "documented settings that do not load:\n" + "\n".join(stale)
    assert checked > 30


def python_examples(text: str) -> list[list[str]]:
    """The Python examples of a Markdown text: each ```python block as its paragraphs (split at
    blank lines: a block may show one library per paragraph, and some are not ofactl's)."""
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [[par for par in re.split(r"\n\s*\n", b) if par.strip()] for b in blocks]


def _imports(code: str) -> set[str]:
    return set(re.findall(r"^\s*(?:from|import)\s+(\w+)", code, flags=re.M))


@pytest.mark.slow
def test_every_documented_python_example_runs(tmp_path, synth_corpus, student_ckpt):
    """Run with the files the examples name made first: a student, a store and its HDF5 copy
    (ids from the synthetic corpus). Examples for a library this machine lacks are named, not run."""
    import shutil
    import subprocess
    import sys

    from ofactl.extract import ExtractConfig, run_extract

    shutil.copy(student_ckpt[0], tmp_path / "student.pt")
    cfg = ExtractConfig(rates=(0.5,), num_workers=0, device="cpu")
    run_extract(cfg, tmp_path / "student.pt", synth_corpus, tmp_path / "feats.zarr")
    run_extract(cfg, tmp_path / "student.pt", synth_corpus, tmp_path / "feats.h5")
    prelude = ("import torch\nwav, lengths = torch.randn(2, 32000), torch.tensor([32000, 20000])\n"  # the reader's audio
               "wav1, wav2 = wav[0], wav[1, :20000]\n")
    examples, absent = [], set()
    for doc in ("README.md", "docs/models.md", "docs/store-format.md"):
        for paragraphs in python_examples((ROOT / doc).read_text()):
            kept = []
            for par in paragraphs:
                missing = {m for m in _imports(par) if importlib.util.find_spec(m) is None}
                absent |= missing
                kept += [] if missing else [par]
            examples.append((doc, "\n".join(kept)))

    def run(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, capture_output=True, text=True)

    with ThreadPoolExecutor(2) as pool:  # each example its own interpreter; two at a time (most of it is imports)
        results = list(pool.map(run, [code for _, code in examples]))
    for (doc, code), r in zip(examples, results, strict=True):
        assert r.returncode == 0, f"{doc}: this example fails:\n{code}\n{r.stderr[-2000:]}"
    assert len(examples) >= 7 and absent <= {"dask"}, (len(examples), absent)  # 7 when this was written
