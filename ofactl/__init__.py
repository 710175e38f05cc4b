"""ofactl: once-for-all sequence compression for self-supervised speech models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
