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


def test_a_dataset_that_takes_sample_seeds_gets_one_per_sample_from_the_seed_and_epoch(
        tmp_path):
    """(index, seed) pairs in the epoch's order; the seeds depend on the order's seed and the
    epoch alone, the orders are those without seeds; ImageListDataset's random transform
    draws from the seed and leaves the process's RNG as it was."""
    from torchvision import transforms as T

    from cwps_lightning.data.images import ImageListDataset

    from .helpers import write_image

    paths = [str(write_image(tmp_path / f"{i}.png", seed=i, size=(12, 10))) for i in range(N)]
    ds = ImageListDataset(paths, [0] * N, T.Compose([T.RandomResizedCrop(6), T.ToTensor()]))
    sampler = EpochOrderSampler(ds, seed=5)
    epochs = [list(sampler) for _ in range(3)]
    assert [[i for i, _ in e] for e in epochs] == permutations(5, 3)
    late = EpochOrderSampler(ds, seed=5, epoch=2)  # (a fit resumed at its epoch 2)
    assert list(late) == epochs[2]
    seeds = [s for e in epochs for _, s in e]
    assert len(set(seeds)) == len(seeds)
    state = torch.get_rng_state()
    first = ds[epochs[0][0]][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(ds[epochs[0][0]][0], first)  # the same pair: the same crop
    index, seed = epochs[0][0]
    assert any(not torch.equal(ds[(index, s)][0], first) for s in (seed + 1, seed + 2, seed + 3))
    assert ds[index][0].shape == first.shape  # (a plain index: the process's RNG, as before)
