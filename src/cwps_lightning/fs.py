"""Small file-system questions that the checks of several layers ask alike."""

from __future__ import annotations

from pathlib import Path


def file_in_the_way(path) -> Path | None:
    """The file that stops ``path`` from being, or being made, a directory: ``path`` itself or
    the nearest existing folder above it, where that is not a directory; None otherwise."""
    there = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
    return there if there is not None and not there.is_dir() else None
