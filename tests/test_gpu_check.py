"""benchmarks/gpu_check.py, run on the CPU: every layer path is checked, and a path no case
took fails the check."""

from __future__ import annotations

import pytest
import torch

from cwps_lightning.cwps import compose_group, layers, step_compose

from .helpers import load_benchmark


@pytest.fixture
def check():
    """The benchmark module; the process-wide settings its main() changes (random state, TF32
    flags) and this test's thread count are put back afterwards."""
    threads = torch.get_num_threads()
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield load_benchmark("gpu_check")
    torch.set_num_threads(threads)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_every_path_is_checked_and_counted(check, capsys):
    assert check.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for path in check.PATHS:
        assert f"ok  path {path!r} taken" in out and f"{path!r} taken 0 " not in out
    assert out.strip().endswith("ALL OK")
    # the counters are gone afterwards
    assert "apply" not in layers._ComposedOp.__dict__
    assert "apply" not in compose_group._GroupCompose.__dict__


def test_a_path_no_case_took_fails(check, capsys, monkeypatch):
    # every kernel small: nothing reaches the large-kernel path
    monkeypatch.setattr(layers, "KEEP_COMPOSED_NUMEL", 1 << 30)
    assert check.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL path 'composed-op large kernel' taken 0 time(s)" in out
    assert out.strip().endswith("SOME CHECKS FAILED")


def test_a_wrong_mask_gradient_fails(check, capsys, monkeypatch):
    slope = layers.mask_slope
    monkeypatch.setattr(layers, "mask_slope", lambda *a, **k: 2.0 * slope(*a, **k))
    assert check.main(["--device", "cpu"]) == 1
    assert "FAIL large 3x3      soft fp32" in capsys.readouterr().out


def test_a_wrong_step_compose_fails(check, capsys, monkeypatch):
    """The step compose's own mask gradient doubled: only its checks fail."""
    slope = step_compose.mask_slope
    monkeypatch.setattr(step_compose, "mask_slope", lambda *a, **k: 2.0 * slope(*a, **k))
    assert check.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL step compose") == 3
    assert "FAIL " not in out.replace("FAIL step compose", "")
