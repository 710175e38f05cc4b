"""The README's promises: its set-up commands, its images, and a figures table that matches
the committed benchmark results."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

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
