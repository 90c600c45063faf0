"""The training data order: EpochOrderSampler, and how a data module continues or restarts it."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from cwps_lightning.data.base import EpochOrderSampler, MultiTaskDataModule, TaskSplits

N = 12


def indices(n: int = N) -> TensorDataset:
    return TensorDataset(torch.arange(n))


def permutations(seed: int, count: int, n: int = N) -> list[list[int]]:
    """The first ``count`` permutations a generator seeded with ``seed`` draws."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g).tolist() for _ in range(count)]


def test_an_epochs_order_is_the_seeds_permutation_of_start_plus_epoch():
    want = permutations(5, 6)
    sampler = EpochOrderSampler(indices(), seed=5)
    for epoch in (2, 0, 3, 1, 1):  # forwards, back and again: only the index decides
        sampler.set_epoch(epoch)
        assert list(sampler) == want[epoch], epoch
    resumed = EpochOrderSampler(indices(), seed=5, start=2)
    for epoch in (0, 3, 1):
        resumed.set_epoch(epoch)
        assert list(resumed) == want[2 + epoch], epoch
    assert list(EpochOrderSampler(indices(), seed=6)) != want[0]


def test_without_set_epoch_each_pass_is_the_next_epoch():
    sampler = EpochOrderSampler(indices(), seed=3, start=1)
    assert [list(sampler) for _ in range(3)] == permutations(3, 4)[1:]


class OneTask(MultiTaskDataModule):
    default_tasks = ("t",)

    def build_tasks(self):
        return {"t": TaskSplits("t", 2, indices(), indices(), indices())}


def first_epoch(dm: MultiTaskDataModule) -> list[int]:
    (batch,) = list(dm.train_dataloader())  # one batch of every index
    return batch[0].tolist()


def test_the_loaders_order_starts_at_the_seed_continues_after_a_fit_and_restarts_on_reseed():
    dm = OneTask(batch_size=N, seed=4).use("t")
    assert first_epoch(dm) == permutations(4, 1)[0]  # before any reseed: the data seed
    dm.reseed_shuffle(9)
    assert first_epoch(dm) == permutations(9, 1)[0]
    dm.epochs_trained(2)  # a fit of two epochs: the next one goes on with the third
    dm.epochs_trained(1)
    assert first_epoch(dm) == permutations(9, 4)[3]
    dm.reseed_shuffle(9)
    assert first_epoch(dm) == permutations(9, 1)[0]
