"""The built-in digits benchmark's loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cwps_lightning.data import digits


def test_optdigits_read_directly_equals_scikit_learn():
    sk = pytest.importorskip("sklearn.datasets")
    assert digits._optdigits_file() is not None  # the fast path is the one under test
    x, y = digits.load_optdigits()
    ref = sk.load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.dtype == torch.int64
    assert torch.equal(x, torch.as_tensor(ref.images, dtype=torch.float32).unsqueeze(1) / 16.0)
    assert np.array_equal(y.numpy(), ref.target)


def test_optdigits_falls_back_to_scikit_learn(monkeypatch):
    pytest.importorskip("sklearn.datasets")
    x_fast, y_fast = digits.load_optdigits()
    monkeypatch.setattr(digits, "_optdigits_file", lambda: None)
    x, y = digits.load_optdigits()
    assert torch.equal(x, x_fast) and torch.equal(y, y_fast)
