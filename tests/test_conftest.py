"""The suite's own setup: xdist groups hold together, and a thread count a test sets does not
outlive it (conftest.py)."""

from __future__ import annotations

import pytest
import torch

_seen: dict[str, int] = {}

pytestmark = pytest.mark.xdist_group("conftest")


def test_a_grouped_test_runs_in_its_group(request):
    """`make test` runs `--dist loadgroup`: one worker runs an xdist_group's tests (the DDP
    tests one at a time, a module fixture made once). xdist marks a grouped test's id with its
    group; a pytest that ignores the mark splits the group without a word."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not under pytest-xdist's --dist loadgroup")
    assert request.node.nodeid.endswith("@conftest"), request.node.nodeid


def test_a_test_sets_its_own_thread_count():
    _seen["before"] = torch.get_num_threads()
    torch.set_num_threads(_seen["before"] + 1)
    assert torch.get_num_threads() == _seen["before"] + 1


def test_the_next_test_gets_the_workers_count_back():
    if "before" not in _seen:
        pytest.skip("runs after test_a_test_sets_its_own_thread_count only")
    assert torch.get_num_threads() == _seen["before"]
