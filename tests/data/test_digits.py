"""The built-in digits benchmark's loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cwps_lightning.data import digits
from cwps_lightning.data.base import TaskSplits


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


@pytest.mark.parametrize("n, batches, seen", [(65, 2, 64), (66, 3, 66), (64, 2, 64), (1, 1, 1)])
def test_a_lone_last_training_image_is_dropped(n, batches, seen):
    """A last batch of one image would break BatchNorm on 1x1 maps; no other batch is lost."""
    dm = digits.DigitsDataModule(batch_size=32)
    x = torch.zeros(n, 3, 8, 8)
    y = torch.zeros(n, dtype=torch.int64)
    ds = TensorDataset(x, y)
    dm._splits = {"t": TaskSplits("t", 2, ds, ds, ds)}
    dm.use("t")
    sizes = [len(b[1]) for b in dm.train_dataloader()]
    assert len(sizes) == batches and sum(sizes) == seen
    assert sum(len(b[1]) for b in dm.val_dataloader()) == n  # evaluation sees every image
