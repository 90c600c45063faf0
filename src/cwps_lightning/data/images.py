"""Image files: which names are images, whether a file reads, and a Dataset of image files.

Unreadable files are found before training (``find_unreadable``, ``data.verify_images``) so
that a bad file fails the run at once, listed, instead of hours in; ``ImageListDataset`` still
guards each read, for files that pass the header check but do not decode. Which file names
are images is torchvision's ImageFolder rule (``IMG_EXTENSIONS``, case-insensitive), so a tree
reads here as it does there.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, is_image_file

from .base import DataConfigError

__all__ = ["IMG_EXTENSIONS", "ImageListDataset", "available_cpus", "find_unreadable",
           "is_image_file", "probe_image"]

log = logging.getLogger(__name__)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def probe_image(path: str, full: bool) -> str | None:
    """None if ``path`` is a readable image, else why not (one line).

    ``full=False`` reads the header only (catches missing, empty and non-image files);
    ``full=True`` decodes every pixel (also catches truncated files).
    """
    try:
        with Image.open(path) as img:
            if full:
                img.load()
            elif img.width < 1 or img.height < 1:
                return "image has no pixels"
    except FileNotFoundError:
        return "no such file"
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        text = str(err).splitlines()[0] if str(err) else ""
        return f"{type(err).__name__}: {text}"[:160]
    return None


def find_unreadable(
    paths: Iterable[str], full: bool, workers: int | None = None,
    progress: Callable[[int, int, float], None] | None = None, every: float = 10.0,
) -> list[tuple[str, str]]:
    """``[(path, reason)]`` for every path that is not a readable image, in input order.
    ``progress(done, total, seconds)`` is called every ``every`` seconds while it reads (a
    full decode of DomainNet takes minutes)."""
    paths = list(paths)
    if not paths:
        return []
    workers = workers or min(32, 4 * available_cpus())
    started = last = time.monotonic()
    reasons = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for reason in pool.map(lambda p: probe_image(p, full), paths, chunksize=64):
            reasons.append(reason)
            now = time.monotonic()
            if progress is not None and now - last >= every:
                progress(len(reasons), len(paths), now - started)
                last = now
    return [(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]


def log_progress(what: str) -> Callable[[int, int, float], None]:
    """A find_unreadable progress callback that logs ``what: done/total images (rate)``."""
    def say(done: int, total: int, seconds: float) -> None:
        log.info("%s: %d/%d images, %.0f images/s", what, done, total, done / max(seconds, 1e-9))
    return say


class ImageListDataset(Dataset):
    """``(image, label)`` pairs from image files; paths are kept in a numpy array so that
    worker processes do not copy them (no Python refcounts to touch).

    An item is an index, or an ``(index, seed)`` pair (base.EpochOrderSampler gives them): the
    transform's random draws then come from ``seed`` alone, and the process's RNG is left as
    it was."""

    #: base.EpochOrderSampler gives it (index, seed) pairs
    takes_sample_seeds = True

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform=None,
                 skip_corrupt: bool = False):
        self.paths = np.array(list(paths), dtype=np.str_)
        self.labels = np.asarray(list(labels), dtype=np.int64)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self._skipped: set[int] = set()  # (said once each, not at every epoch's read)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, seed: int | None = None):
        with Image.open(str(self.paths[index])) as img:
            img = img.convert("RGB")
        if self.transform is None:
            return img
        if seed is None:
            return self.transform(img)
        # torchvision's random transforms draw from torch's CPU generator (only that one is
        # seeded and restored: torch.manual_seed would also reseed the GPUs' generators)
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.transform(img)
        finally:
            generator.set_state(state)

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, None)
        try:
            return self.load(index, seed), int(self.labels[index])
        except Exception as err:  # noqa: BLE001
            path = str(self.paths[index])
            if not self.skip_corrupt:
                raise DataConfigError(
                    f"cannot read image {path} ({type(err).__name__}: {err}); run "
                    f"`python -m cwps_lightning.data check` to list every bad file, or set "
                    f"data.skip_corrupt=true to leave unreadable images out"
                ) from err
            if index not in self._skipped:
                self._skipped.add(index)
                log.warning("data.skip_corrupt=true: skipping unreadable image %s (%s)", path,
                            err)
        for step in range(1, len(self)):  # a replacement: the next readable sample
            j = (index + step) % len(self)
            try:
                return self.load(j, seed), int(self.labels[j])
            except Exception:  # noqa: BLE001
                continue
        raise DataConfigError(f"no readable image among {len(self)} (first {self.paths[0]})")
