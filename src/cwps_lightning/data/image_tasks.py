"""What every on-disk benchmark shares: ``ImageTasksDataModule``.

PIL loading, image checks (unreadable files are listed, or skipped with
``data.skip_corrupt=true``), a deterministic validation split carved from each task's training
images, transforms at a configurable size and the loader settings a GPU run needs. Subclasses
say where a task's images and labels are (``load_source``, a ``TaskSource``) and how to check a
tree (``check_dataset``, used by ``python -m cwps_lightning.data check``).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed
from ..errors import short_list
from .base import DataConfigError, MultiTaskDataModule, TaskSplits, split_indices
from .images import ImageListDataset, available_cpus, find_unreadable, log_progress
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    POLICIES,
    build_transform,
    check_transform_settings,
)

log = logging.getLogger(__name__)

VERIFY_MODES = ("header", "full", "none")


def resolve_num_workers(value) -> int:
    """``auto`` = one worker per CPU, at most 8; else a non-negative integer."""
    if value == "auto":
        return min(8, available_cpus())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataConfigError(f"data.num_workers must be 'auto' or an integer >= 0, got {value!r}")
    return value


def resolve_pin_memory(value) -> bool:
    """``auto`` = pin host memory when CUDA is available."""
    if value == "auto":
        return torch.cuda.is_available()
    if not isinstance(value, bool):
        raise DataConfigError(f"data.pin_memory must be true, false or 'auto', got {value!r}")
    return value


def stable_seed(seed: int, name: str) -> int:
    """A seed per task that does not depend on Python's hash randomisation or task order."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def check_val_fraction(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise DataConfigError(f"{key} must be a number in (0, 1) (the share of training images "
                              f"held out for validation), got {value!r}")
    return float(value)


def carve_validation(
    samples: list[tuple[str, int]], fraction: float, seed: int, task: str
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Deterministic (seed, task name) random split of training samples into train / val."""
    n = len(samples)
    if n < 2:
        raise DataConfigError(f"task {task!r} has {n} training image(s): too few to carve a "
                              f"validation split from")
    n_val = min(n - 1, max(1, int(round(fraction * n))))
    val_idx, train_idx = split_indices(n, (n_val / n,), stable_seed(seed, task))
    if len(val_idx) != n_val:  # rounding in split_indices; keep the intended sizes
        perm = torch.cat([val_idx, train_idx])
        val_idx, train_idx = perm[:n_val], perm[n_val:]
    return [samples[i] for i in sorted(train_idx.tolist())], [samples[i] for i in
                                                              sorted(val_idx.tolist())]


@dataclass
class TaskSource:
    """Where one task's images are: ``(path, label)`` pairs for train and test."""

    name: str
    num_classes: int
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    policy: str
    classes: list[str] = field(default_factory=list)  # label -> class name, where known
    val: list[tuple[str, int]] | None = None  # an explicit validation split, else carved
    val_fraction: float | None = None  # per-task override of data.val_fraction


class ImageTasksDataModule(MultiTaskDataModule):
    """Tasks of image files on disk. Subclasses implement ``load_source`` and
    ``check_dataset``; the rest (checks, validation split, transforms, loaders) is here."""

    #: the benchmark's name and expected layout, for messages
    benchmark = "image folders"
    layout = "<root>/<task>/{train,test}/<class>/<image>"
    #: how to get the dataset, said where data.root is not set or does not exist ("": nothing)
    obtain = ""
    #: default transform policy when data.transform=auto
    default_policy = "crop"

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        resize_size: int | None = None,
        transform: str = "auto",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        val_fraction: float = 0.1,
        verify_images: str = "header",
        skip_corrupt: bool = False,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        persistent_workers: bool = True,
        **kwargs,
    ):
        # 'auto' loader settings are resolved here; a bad one is kept for validate_tasks, as
        # the base class does with its own settings
        errors: list[str] = []
        try:
            workers = resolve_num_workers(num_workers)
        except DataConfigError as err:
            errors.append(str(err))
            workers = 0
        try:
            pin = resolve_pin_memory(pin_memory)
        except DataConfigError as err:
            errors.append(str(err))
            pin = False
        super().__init__(num_workers=workers, pin_memory=pin,
                         persistent_workers=bool(persistent_workers), **kwargs)
        self._deferred[:0] = errors
        self.root = Path(str(root)).expanduser() if root else None
        self.image_size, self.resize_size = image_size, resize_size
        self._resize_given = resize_size is not None  # (validate_settings fills in a default)
        self.transform, self.mean, self.std = transform, mean, std
        self.val_fraction = val_fraction
        self.verify_images = verify_images
        self.skip_corrupt = skip_corrupt
        self.skipped: dict[str, int] = {}

    # -- hooks ---------------------------------------------------------------------------------
    def load_source(self, task: str) -> TaskSource:
        raise NotImplementedError

    def check_dataset(self, report) -> None:
        raise NotImplementedError

    def policy_for(self, task: str) -> str:
        return self.default_policy if self.transform == "auto" else self.transform

    # -- settings ------------------------------------------------------------------------------
    def validate_settings(self) -> None:
        self.raise_deferred()
        self.image_size, self.resize_size, self.mean, self.std = check_transform_settings(
            self.image_size, self.resize_size, self.mean, self.std)
        if self.transform != "auto" and self.transform not in POLICIES:
            raise DataConfigError(
                f"data.transform must be auto or one of {list(POLICIES)}, got {self.transform!r}")
        check_val_fraction(self.val_fraction, "data.val_fraction")
        if self.verify_images not in VERIFY_MODES:
            raise DataConfigError(f"data.verify_images must be one of {list(VERIFY_MODES)}, "
                                  f"got {self.verify_images!r}")
        if not isinstance(self.skip_corrupt, bool):
            raise DataConfigError(f"data.skip_corrupt must be true or false, "
                                  f"got {self.skip_corrupt!r}")

    def check_settings(self, here: bool = True) -> None:
        """The settings, the task names and (``here``: the job runs on this machine) the
        root; names that come from the root only ``here`` (a listing at most; the images are
        read when the data module is built)."""
        self.validate_settings()
        if here:
            self.check_root()
        if here or not self.tasks_from_disk:
            self.validate_tasks()
            self.check_resize_used()

    def check_resize_used(self) -> None:
        """A data.resize_size given where every task is resized to image_size x image_size
        (policy resize) would change nothing: said, not ignored. (After validate_tasks; the
        run's checks and data check call it, not the build: evaluate rebuilds a stored config
        for some of its tasks, which may all be resized where the run's were not.)"""
        policies = [self.policy_for(t) for t in self.tasks_requested]
        if self._resize_given and policies and all(p == "resize" for p in policies):
            raise DataConfigError(
                f"data.resize_size={self.resize_size} is not used: every task's transform is "
                f"'resize', which resizes each image to data.image_size x data.image_size "
                f"({self.image_size}); leave data.resize_size null, or take a transform that "
                f"crops (data.transform: {', '.join(p for p in POLICIES if p != 'resize')})")

    def check_root(self) -> Path:
        obtain = f"; {self.obtain}" if self.obtain else ""
        if self.root is None:
            raise DataConfigError(f"data.root is not set: point it at the {self.benchmark} "
                                  f"dataset ({self.layout}){obtain}")
        if not self.root.exists():
            raise DataConfigError(f"data.root={str(self.root)!r} does not exist; expected the "
                                  f"{self.benchmark} layout {self.layout}{obtain}")
        if not self.root.is_dir():
            raise DataConfigError(f"data.root={str(self.root)!r} is not a directory; expected "
                                  f"the {self.benchmark} layout {self.layout}")
        return self.root

    def layout_error(self, what: str) -> DataConfigError:
        present = sorted(p.name + ("/" if p.is_dir() else "")
                         for p in self.root.iterdir() if not p.name.startswith("."))
        return DataConfigError(
            f"data.root={str(self.root)!r} does not look like the {self.benchmark} layout "
            f"(expected {self.layout}): {what}; found there: {short_list(present) or 'nothing'}"
        )

    @property
    def task_names(self) -> list[str]:
        self.splits  # noqa: B018 - resolves the task list and reports bad data up front
        return list(self.tasks_requested)

    # -- building ------------------------------------------------------------------------------
    def build_tasks(self) -> dict[str, TaskSplits]:
        self.validate_settings()
        self.check_root()
        sources = {task: self.load_source(task) for task in self.tasks_requested}
        self.drop_unreadable(sources)
        for src in sources.values():
            untested = sorted({y for _, y in src.train} - {y for _, y in src.test})
            if untested and distributed.rank() == 0:  # (rank 0 says it)
                # trains as it is (the head has the class), but the test top-1 leaves it out:
                # not the protocol of a reference dataset (`data check` calls it an error there)
                log.warning("task %r: %d class(es) with training images have no test image, so "
                            "the test top-1 leaves them out: %s", src.name, len(untested),
                            short_list([src.classes[y] if y < len(src.classes) else str(y)
                                        for y in untested]))
        return {task: self.make_splits(src) for task, src in sources.items()}

    def drop_unreadable(self, sources: Mapping[str, TaskSource]) -> None:
        """Verify images (``data.verify_images``): fail listing the bad files, or leave them
        out when ``data.skip_corrupt`` is true, saying how many."""
        if self.verify_images == "none":
            return
        paths = sorted({p for s in sources.values()
                        for part in (s.train, s.test, s.val or []) for p, _ in part})
        bad = dict(find_unreadable(paths, full=self.verify_images == "full",
                                   progress=log_progress(f"verifying images "
                                                         f"({self.verify_images})")))
        if not bad:
            return
        if not self.skip_corrupt:
            listed = [f"{p} ({why})" for p, why in bad.items()]
            raise DataConfigError(
                f"{len(bad)} unreadable image(s): {short_list(listed)}; fix or remove them "
                f"(`python -m cwps_lightning.data check` lists every problem), or set "
                f"data.skip_corrupt=true to leave them out"
            )
        for task, src in sources.items():
            before = len(src.train) + len(src.test) + len(src.val or [])
            src.train = [s for s in src.train if s[0] not in bad]
            src.test = [s for s in src.test if s[0] not in bad]
            if src.val is not None:
                src.val = [s for s in src.val if s[0] not in bad]
            dropped = before - len(src.train) - len(src.test) - len(src.val or [])
            if dropped:
                self.skipped[task] = dropped
        log.warning(
            "data.skip_corrupt=true: skipped %d unreadable image(s) (%s): %s", len(bad),
            ", ".join(f"{t}: {n}" for t, n in self.skipped.items()),
            short_list([f"{p} ({why})" for p, why in bad.items()]),
        )

    def make_splits(self, src: TaskSource) -> TaskSplits:
        if not src.train:
            raise DataConfigError(f"task {src.name!r} has no training images left")
        if not src.test:
            raise DataConfigError(f"task {src.name!r} has no test images left")
        policy = src.policy
        settings = dict(image_size=self.image_size, resize_size=self.resize_size,
                        mean=self.mean, std=self.std)
        train_tf = build_transform(policy, train=True, **settings)
        eval_tf = build_transform(policy, train=False, **settings)
        if src.val is not None:
            train, val = src.train, src.val
        else:
            fraction = self.val_fraction if src.val_fraction is None else src.val_fraction
            train, val = carve_validation(src.train, fraction, self.seed, src.name)

        def ds(samples, tf):
            return ImageListDataset([p for p, _ in samples], [y for _, y in samples], tf,
                                    skip_corrupt=self.skip_corrupt)

        return TaskSplits(src.name, src.num_classes, ds(train, train_tf), ds(val, eval_tf),
                          ds(src.test, eval_tf))
