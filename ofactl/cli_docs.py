"""Regenerate the docs that come from code: ``python -m ofactl.cli_docs``.

docs/cli.md from the typer app, and the key reference in docs/presets.md from the config
dataclasses; tests check both are current. ``replace_block`` also serves the README's
figures table (benchmarks/readme_table.py).
"""

from __future__ import annotations

from pathlib import Path

from ofactl.cli import cli_markdown
from ofactl.config import KEYS_BEGIN, KEYS_END, keys_markdown


def replace_block(doc: str, begin: str, end: str, block: str, where: str) -> str:
    """``doc`` with the text from the ``begin`` marker through the ``end`` marker replaced by
    ``block`` (which carries both markers itself)."""
    if begin not in doc or end not in doc:
        raise ValueError(f"{where} lacks the generated-block markers {begin!r} ... {end!r}")
    head, rest = doc.split(begin, 1)
    return head + block + rest.split(end, 1)[1]


def with_keys(doc: str) -> str:
    """``doc`` (docs/presets.md) with its generated key reference replaced by the current one."""
    return replace_block(doc, KEYS_BEGIN, KEYS_END, keys_markdown(), "docs/presets.md")


if __name__ == "__main__":
    docs = Path(__file__).resolve().parent.parent / "docs"
    (docs / "cli.md").write_text(cli_markdown())
    presets = docs / "presets.md"
    presets.write_text(with_keys(presets.read_text()))
    print(f"wrote {docs / 'cli.md'} and {presets}")
