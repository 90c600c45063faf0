"""What every benchmark provides: named tasks, each with train / val / test splits.

A benchmark is one LightningDataModule that serves several tasks; ``use(task)`` selects the task
whose splits the dataloaders return. The validation split is carved from the training data and
is the only split model selection looks at; the test split is only ever reported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TaskSplits:
    name: str
    num_classes: int
    train: Dataset
    val: Dataset
    test: Dataset


#: the largest data.image_size taken: a larger one runs out of memory building the first batch
#: rather than failing with a message (the paper's inputs are 224 px)
MAX_IMAGE_SIZE = 2048
#: the smallest data.image_size taken
MIN_IMAGE_SIZE = 8


def int_range(minimum: int | None, maximum: int | None = None) -> str:
    """"an integer >= 8", "an integer from 8 to 2048": what an integer setting accepts."""
    if minimum is not None and maximum is not None:
        return f"an integer from {minimum} to {maximum}"
    if minimum is not None:
        return f"an integer >= {minimum}"
    return "an integer" + (f" <= {maximum}" if maximum is not None else "")

class DataConfigError(ConfigError):
    """Bad data configuration or dataset on disk; the message says what and where."""


#: the name the kernel bank and the store keep the pretrained model under: no task may take it
#: (its entry would take T0's place)
PRETRAINED_NAME = "T0"


def task_name_error(name, key: str) -> str | None:
    """Why ``name`` (the value of ``key``) cannot name a task; None if it can. A task name
    becomes a folder (checkpoints) and a store key (``<task>/index/<layer>``): a '/' in it, or
    an empty one, would land in another task's place."""
    if (isinstance(name, str) and name.strip() and name not in (".", "..")
            and not any(sep in name for sep in "/\\")):
        return None
    return (f"{key} must be a task name, got {name!r}; a task name is a non-empty string "
            f"without '/' or '\\' (it becomes a folder and a store key)")


def task_list_error(tasks) -> str | None:
    """Why ``data.tasks`` is not null or a list of task names; None if it is."""
    if tasks is None:
        return None
    entries = [tasks] if isinstance(tasks, Mapping) else tasks
    if isinstance(entries, Sequence) and not isinstance(entries, str):
        if not entries:  # (null is the default order; an empty list is no task at all)
            return ("data.tasks is empty: name at least one task (data.tasks=[a, b]), or "
                    "leave it null for the benchmark's default order")
        for i, entry in enumerate(entries):
            if isinstance(entry, Mapping):  # {name, train, test}: meant for data.folders
                return (f"data.tasks takes task names (data.tasks=[a, b]), but data.tasks[{i}] "
                        f"is a task description {entry!r}; tasks given by their image folders "
                        f"go in data.folders (with data=folders): "
                        f"'data.folders=[{{name: a, train: <dir>, test: <dir>}}, ...]'")
            error = task_name_error(entry, f"data.tasks[{i}]")
            if error:
                return error
        return None
    if isinstance(tasks, str):  # data.tasks=a: Hydra reads a string, not a list
        return f"data.tasks must be a list of task names, e.g. data.tasks=[{tasks}], got {tasks!r}"
    return f"data.tasks must be a list of task names or null, got {tasks!r}"


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Deterministic random partition of range(n) into len(fractions)+1 parts (rest last)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for f in fractions:
        size = int(round(f * n))
        parts.append(perm[start : start + size])
        start += size
    parts.append(perm[start:])
    return parts


class EpochOrderSampler(RandomSampler):
    """A random order of ``data_source`` per epoch that depends only on ``seed`` and the
    epoch's index.

    Epoch ``k`` of the sampler is the ``start + k``-th permutation drawn from a generator seeded
    with ``seed`` (randperm's; not the orders of a RandomSampler given that generator, which
    draws a second number per epoch for its own seed).
    Lightning calls ``set_epoch`` at every epoch's start, with the epoch restored from a
    checkpoint on resume, so a fit resumed at epoch ``k`` sees the batches the uninterrupted fit
    saw. Iterated without ``set_epoch`` (plain PyTorch), it moves on one epoch per pass.

    A dataset with ``takes_sample_seeds`` (images.ImageListDataset) is given ``(index, seed)``
    pairs: a seed per sample, drawn from ``seed`` and the epoch's index alone, for its random
    augmentations. They then depend on nothing else either (not the global RNG, the workers'
    seeds, their number, or where a resume restarted the workers), so a resumed epoch sees the
    crops and flips of the uninterrupted one.
    """

    def __init__(self, data_source, seed: int, start: int = 0, epoch: int = 0):
        super().__init__(data_source)
        self.seed, self.start, self.epoch = seed, start, epoch
        self._generator: torch.Generator | None = None
        self._drawn = 0  # permutations drawn from _generator so far

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n, index = len(self.data_source), self.start + self.epoch
        if self._generator is None or self._drawn > index:
            self._generator, self._drawn = torch.Generator().manual_seed(self.seed), 0
        while self._drawn < index:  # the epochs before: one permutation each, discarded
            torch.randperm(n, generator=self._generator)
            self._drawn += 1
        order = torch.randperm(n, generator=self._generator).tolist()
        self._drawn += 1
        self.epoch += 1
        if getattr(self.data_source, "takes_sample_seeds", False):
            # (a generator of its own: the orders stay those drawn without seeds)
            epoch_seed = (self.seed * 1_000_003 + index) % (2**63)
            seeds = torch.randint(0, 2**62, (n,),
                                  generator=torch.Generator().manual_seed(epoch_seed)).tolist()
            yield from zip(order, seeds, strict=True)
        else:
            yield from order


class MultiTaskDataModule(L.LightningDataModule):
    """Base class: subclasses implement ``build_tasks()`` returning ``{name: TaskSplits}``."""

    #: tasks of the benchmark in their default order
    default_tasks: tuple[str, ...] = ()
    #: a task used to pretrain the T0 backbone when no pretrained weights are given (or None)
    pretrain_task: str | None = None
    #: whether the task names come from the disk (data.root's folders), not from the code
    tasks_from_disk: bool = False

    def __init__(
        self,
        tasks: list[str] | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        # Hydra's instantiate wraps what __init__ raises in an error of its own (a traceback for
        # the user), so a bad value is recorded, replaced by a harmless one, and raised as a
        # one-line DataConfigError when the tasks are resolved (validate_tasks).
        self._deferred: list[str] = []
        tasks_error = task_list_error(tasks)
        if tasks_error:
            self._deferred.append(tasks_error)
        self.tasks_requested = (list(tasks) if tasks and not tasks_error
                                else list(self.default_tasks))
        self.batch_size = self.checked_int(batch_size, "data.batch_size", 1, fallback=1)
        self.eval_batch_size = self.checked_int(eval_batch_size, "data.eval_batch_size", 1,
                                                fallback=None, none_ok=True) or self.batch_size
        self.num_workers = self.checked_int(num_workers, "data.num_workers", 0, fallback=0)
        self.pin_memory = self.checked_bool(pin_memory, "data.pin_memory")
        self.persistent_workers = (self.checked_bool(persistent_workers, "data.persistent_workers")
                                   and self.num_workers > 0)
        # (the run's seed's range: 1e20 overflowed in the split, -1 ran)
        self.seed = self.checked_int(seed, "data.seed", 0, fallback=0, maximum=2**32 - 1)
        self._splits: dict[str, TaskSplits] | None = None
        self.current: str | None = None
        self._partial_warned: set[str | None] = set()  # (tasks said to train on a partial batch)
        self._order_seed, self._order_start = self.seed, 0
        self._first_epoch = 0  # (start_at_epoch)

    # -- settings ------------------------------------------------------------------------------
    def checked_int(self, value, key: str, minimum: int | None, fallback, none_ok: bool = False,
                    why: str = "", maximum: int | None = None):
        """``value`` if it is an integer >= ``minimum`` (and <= ``maximum``; or None where
        ``none_ok``); else ``fallback``, and the error is kept for validate_tasks."""
        if value is None and none_ok:
            return None
        if (isinstance(value, bool) or not isinstance(value, int)
                or (minimum is not None and value < minimum)
                or (maximum is not None and value > maximum)):
            accepted = int_range(minimum, maximum)
            self._deferred.append(f"{key} must be {'null or ' if none_ok else ''}{accepted}"
                                  f"{why}, got {value!r}")
            return fallback
        return value

    def checked_bool(self, value, key: str) -> bool:
        if not isinstance(value, bool):
            self._deferred.append(f"{key} must be true or false, got {value!r}")
            return False
        return value

    def raise_deferred(self) -> None:
        """Raise the first bad setting recorded while constructing."""
        if self._deferred:
            raise DataConfigError(self._deferred[0])

    def check_settings(self, here: bool = True) -> None:
        """Everything that can be checked without reading the data, for the train command's
        check before any job runs: the settings and the task names (where they come from the
        disk, only ``here``: the job runs on this machine)."""
        self.raise_deferred()
        if here or not self.tasks_from_disk:
            self.validate_tasks()

    # -- to implement --------------------------------------------------------------------------
    def build_tasks(self) -> dict[str, TaskSplits]:
        raise NotImplementedError

    def known_tasks(self) -> list[str]:
        """Every task name this benchmark can serve (default: default_tasks + pretrain_task)."""
        extra = [self.pretrain_task] if self.pretrain_task else []
        return list(self.default_tasks) + extra

    # -- task access ---------------------------------------------------------------------------
    def validate_tasks(self) -> None:
        self.raise_deferred()
        known = self.known_tasks()
        bad = [t for t in self.tasks_requested if t not in known]
        if bad:
            raise DataConfigError(f"unknown task(s) {bad} for this benchmark; known: {known}")
        if PRETRAINED_NAME in self.tasks_requested:
            raise DataConfigError(
                f"a task is named {PRETRAINED_NAME!r}, the name the kernel bank and the store "
                f"keep the pretrained model under; rename that task (its folder) to something "
                f"else")
        if len(set(self.tasks_requested)) != len(self.tasks_requested):
            raise DataConfigError(f"data.tasks lists a task twice: {self.tasks_requested}")
        if not self.tasks_requested:
            raise DataConfigError("data.tasks is empty: name at least one task")

    @property
    def splits(self) -> dict[str, TaskSplits]:
        if self._splits is None:
            self.validate_tasks()
            self._splits = self.build_tasks()
        return self._splits

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks_requested)

    def num_classes(self, task: str) -> int:
        return self.splits[task].num_classes

    def use(self, task: str) -> MultiTaskDataModule:
        if task not in self.splits:
            raise DataConfigError(f"task {task!r} is not loaded; loaded: {list(self.splits)}")
        self.current = task
        return self

    def _current(self) -> TaskSplits:
        if self.current is None:
            raise RuntimeError("call use(task) before asking for a dataloader")
        return self.splits[self.current]

    def reseed_shuffle(self, seed: int) -> None:
        """Restart the training data order from ``seed``.

        The order of training batches depends only on this seed and the epoch's index since
        (EpochOrderSampler), never on what else used the global RNG (a validation pass, a model
        surgery). Fits that follow one another without a reseed continue one order
        (``epochs_trained``): CWPS's warm-up fit and mask fit see, epoch for epoch, the batches
        of a fine-tuning run of the same task.
        """
        self._order_seed, self._order_start = seed, 0

    def start_at_epoch(self, epoch: int) -> None:
        """The next training loaders start at ``epoch`` of the fit (a fit resumed from its
        checkpoint; 0 otherwise). Lightning sets each epoch's index itself, but only after
        it created the first epoch's iterator, whose workers had already drawn their first
        batches from the sampler: a resumed fit trained its first epoch in epoch 0's order
        wherever the loader had workers."""
        self._first_epoch = epoch

    def epochs_trained(self, epochs: int) -> None:
        """A fit trained ``epochs`` epochs of the current order: the next training loader
        continues after them (fitting.fit calls this, also for a fit resumed from a finished
        checkpoint, so a rerun continues the order where the interrupted run did)."""
        self._order_start += epochs

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        # Every training batch is full: an incomplete last batch is dropped (its images come
        # round in other epochs, the order being reshuffled). Train-mode BatchNorm normalises
        # a batch by its own statistics and updates the running ones from them; a batch of
        # two images makes every channel of a 1x1 feature map exactly +-1 and its variance a
        # two-sample guess, and one of one image fails outright. DDP makes such batches: each
        # rank takes ceil(n / world) images (the sampler pads), so 900 images at 2 x 32 end
        # every epoch in two images per rank; mnist_m fine-tuning fell from 77 to 52 points
        # by that alone (README, "Several processes"). A rank's share smaller than one batch is
        # kept as one batch.
        world = 1 if self.trainer is None else self.trainer.world_size
        share = math.ceil(len(ds) / world)
        full_batches = train and share >= self.batch_size
        if train and not full_batches and self.current not in self._partial_warned:
            self._partial_warned.add(self.current)
            if getattr(self.trainer, "is_global_zero", True):  # (rank 0 says it)
                log.warning("task %r: %d training images%s, fewer than data.batch_size=%d: each "
                            "epoch is one partial batch of them", self.current, share,
                            f" per rank ({len(ds)} on {world} ranks)" if world > 1 else "",
                            self.batch_size)
        # The order comes from the sampler alone (see reseed_shuffle); the DataLoader gets no
        # generator, which would also make it draw worker seeds from it, and the order would
        # then depend on how the epochs are split into fits. On one device only: under DDP,
        # Lightning replaces the sampler with a DistributedSampler seeded per fit.
        sampler = (EpochOrderSampler(ds, self._order_seed, self._order_start,
                                     epoch=self._first_epoch) if train else None)
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=full_batches,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._current().train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._current().val, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._current().test, train=False)
