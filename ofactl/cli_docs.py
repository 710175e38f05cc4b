"""Write docs/cli.md from the typer app: ``python -m ofactl.cli_docs [PATH]``."""

from __future__ import annotations

import sys
from pathlib import Path

from ofactl.cli import cli_markdown

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "docs" / "cli.md"
    out.write_text(cli_markdown())
    print(f"wrote {out}")
