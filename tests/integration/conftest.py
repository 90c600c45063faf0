"""Fixtures of the CLI tests (the helpers they call are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def t0_cache(tmp_path_factory) -> Path:
    """One T0 cache for the session: the tiny T0 is pretrained once.

    Under pytest-xdist every worker is a session of its own; they share one cache directory
    (the parent of the workers' base temp dirs), so the tiny T0 is pretrained once for all of
    them, or at worst once per worker if two start it at the same moment: the cache file is
    written atomically and keyed by what decides the weights, so concurrent runs are safe.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # not under pytest-xdist
        return tmp_path_factory.mktemp("t0-cache")
    shared = tmp_path_factory.getbasetemp().parent / "t0-cache"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
