"""Regenerate the docs that come from code: ``python -m ofactl.cli_docs``.

docs/cli.md from the typer app, and the key reference in docs/presets.md from the config
dataclasses; tests check both are current.
"""

from __future__ import annotations

from pathlib import Path

from ofactl.cli import cli_markdown
from ofactl.config import with_keys

if __name__ == "__main__":
    docs = Path(__file__).resolve().parent.parent / "docs"
    (docs / "cli.md").write_text(cli_markdown())
    presets = docs / "presets.md"
    presets.write_text(with_keys(presets.read_text()))
    print(f"wrote {docs / 'cli.md'} and {presets}")
