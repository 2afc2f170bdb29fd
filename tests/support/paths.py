"""Where things are in the repository."""

from __future__ import annotations

from pathlib import Path

__all__ = ["readme", "root"]

root = Path(__file__).resolve().parents[2]
readme = root / "README.md"
