"""Shared pytest setup: few threads (the suite runs on small CPU boxes) and a seeded RNG."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# under pytest-xdist (`make test`: one worker per core) each worker gets one thread
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# The package lives in src/ (src layout); make it importable when it is not installed.
_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))


@pytest.fixture(autouse=True)
def _threads_restored():
    """A test may set torch's thread count for itself; the next one gets the worker's back.
    Left as a test set it, two threads in one xdist worker beside the other worker's run
    three on two cores for the rest of the suite, and one thread slows a serial run."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch's RNG before every test, so random weights/inputs are reproducible."""
    value = 0
    torch.manual_seed(value)
    return value
