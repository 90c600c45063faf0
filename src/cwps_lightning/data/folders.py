"""Image benchmarks read from disk, and ``data=folders``: the user's own ImageFolder tasks.

``ImageTasksDataModule`` is what every on-disk benchmark shares: PIL loading, image checks
(unreadable files are listed, or skipped with ``data.skip_corrupt=true``), a deterministic
validation split carved from each task's training images, transforms at a configurable size
and the loader settings a GPU run needs. Subclasses say where a task's images and labels are
(``load_source``) and how to check a tree (``check_dataset``, used by
``python -m cwps_lightning.data check``).

``data=folders`` layout: a list of tasks ``{name, train, test}`` whose ``train`` / ``test`` are
ImageFolder trees ``<dir>/<class>/<image>`` (relative paths are taken from ``data.root``), or,
with ``data.folders=null``, every ``<root>/<task>/{train,test}/<class>/<image>``. Labels are the
training split's class folder names, sorted; a class only in the test split is an error.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .base import DataConfigError, MultiTaskDataModule, TaskSplits, split_indices
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    POLICIES,
    build_transform,
    check_transform_settings,
)

log = logging.getLogger(__name__)

#: file name endings read as images (case-insensitive), as torchvision's ImageFolder
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VERIFY_MODES = ("header", "full", "none")
#: how many offending files an error message lists before "... and N more"
LIST_LIMIT = 10


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def short_list(items: Sequence[str], limit: int = LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def stable_seed(seed: int, name: str) -> int:
    """A seed per task that does not depend on Python's hash randomisation or task order."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**31


# -- reading images ----------------------------------------------------------------------------
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
    paths: Iterable[str], full: bool, workers: int | None = None
) -> list[tuple[str, str]]:
    """``[(path, reason)]`` for every path that is not a readable image, in input order."""
    paths = list(paths)
    if not paths:
        return []
    workers = workers or min(32, 4 * available_cpus())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda p: probe_image(p, full), paths, chunksize=64))
    return [(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]


class ImageListDataset(Dataset):
    """``(image, label)`` pairs from image files; paths are kept in a numpy array so that
    worker processes do not copy them (no Python refcounts to touch)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform=None,
                 skip_corrupt: bool = False):
        self.paths = np.array(list(paths), dtype=np.str_)
        self.labels = np.asarray(list(labels), dtype=np.int64)
        self.transform = transform
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int):
        with Image.open(str(self.paths[index])) as img:
            img = img.convert("RGB")
        return self.transform(img) if self.transform is not None else img

    def __getitem__(self, index: int):
        try:
            return self.load(index), int(self.labels[index])
        except Exception as err:  # noqa: BLE001
            path = str(self.paths[index])
            if not self.skip_corrupt:
                raise DataConfigError(
                    f"cannot read image {path} ({type(err).__name__}: {err}); run "
                    f"`python -m cwps_lightning.data check` to list every bad file, or set "
                    f"data.skip_corrupt=true to leave unreadable images out"
                ) from err
            log.warning("data.skip_corrupt=true: skipping unreadable image %s (%s)", path, err)
        for step in range(1, len(self)):  # a replacement: the next readable sample
            j = (index + step) % len(self)
            try:
                return self.load(j), int(self.labels[j])
            except Exception:  # noqa: BLE001
                continue
        raise DataConfigError(f"no readable image among {len(self)} (first {self.paths[0]})")


# -- what a subclass provides ------------------------------------------------------------------
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


@dataclass
class ClassFolders:
    """The scan of one ImageFolder split directory."""

    classes: dict[str, list[str]]  # class -> image paths (sorted)
    ignored: list[str]  # files that are not images (by extension)
    loose_images: list[str]  # images directly in the split directory (no class folder)


def scan_class_folders(split_dir: Path) -> ClassFolders:
    """Sorted class folders of ``split_dir`` and their images (sub-folders included)."""
    classes: dict[str, list[str]] = {}
    ignored: list[str] = []
    loose: list[str] = []
    with os.scandir(split_dir) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found: list[str] = []
            for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith("."):
                        continue
                    full = os.path.join(dirpath, name)
                    (found if is_image_file(name) else ignored).append(full)
            classes[entry.name] = found
        elif is_image_file(entry.name):
            loose.append(entry.path)
        else:
            ignored.append(entry.path)
    return ClassFolders(classes, ignored, loose)


def folder_layout_error(split_dir: Path, expected: str, scan: ClassFolders | None = None) -> str:
    if not split_dir.exists():
        return f"{split_dir} does not exist; expected layout: {expected}"
    if not split_dir.is_dir():
        return f"{split_dir} is not a directory; expected layout: {expected}"
    if scan is not None and scan.loose_images and not scan.classes:
        return (f"{split_dir} holds images directly ({len(scan.loose_images)}, e.g. "
                f"{Path(scan.loose_images[0]).name}) but no class folders; expected layout: "
                f"{expected}")
    return f"{split_dir} has no class folders with images; expected layout: {expected}"


def folder_task_source(
    name: str, train_dir: Path, test_dir: Path, policy: str, expected: str,
    val_dir: Path | None = None, num_classes: int | None = None,
) -> TaskSource:
    """A task from ImageFolder trees; labels = sorted class folder names of ``train_dir``."""
    dirs = {"train": train_dir, "test": test_dir, "val": val_dir}
    scans: dict[str, ClassFolders] = {}
    for split, d in dirs.items():
        if d is None:
            continue
        scan = scan_class_folders(d) if d.is_dir() else None
        if scan is None or not any(scan.classes.values()):
            raise DataConfigError(f"task {name!r}: " + folder_layout_error(d, expected, scan))
        scans[split] = scan
    classes = sorted(scans["train"].classes)
    index = {c: i for i, c in enumerate(classes)}
    for split in ("test", "val"):
        extra = sorted(set(scans[split].classes) - set(classes)) if split in scans else []
        if extra:
            raise DataConfigError(
                f"task {name!r}: class folder(s) {short_list(extra)} of the {split} split "
                f"{dirs[split]} are missing from the train split {train_dir}, whose "
                f"{len(classes)} class folders define the head"
            )
    if num_classes is not None and num_classes != len(classes):
        raise DataConfigError(
            f"task {name!r}: num_classes={num_classes} disagrees with the {len(classes)} class "
            f"folders of {train_dir}"
        )

    def pairs(scan: ClassFolders) -> list[tuple[str, int]]:
        return [(p, index[c]) for c, paths in scan.classes.items() for p in paths]

    return TaskSource(
        name, len(classes), pairs(scans["train"]), pairs(scans["test"]), policy, classes,
        val=pairs(scans["val"]) if "val" in scans else None,
    )


def check_folder_task(
    report, name: str, train_dir: Path, test_dir: Path, expected: str,
    test_may_lack_classes: bool = False, reference: tuple[int, int, int] | None = None,
) -> list[str]:
    """Report layout, class and file problems of an ImageFolder task; returns its image paths
    (for the decode check)."""
    scans: dict[str, ClassFolders] = {}
    for split, d in (("train", train_dir), ("test", test_dir)):
        scan = scan_class_folders(d) if d.is_dir() else None
        if scan is None or not any(scan.classes.values()):
            report.error("layout", folder_layout_error(d, expected, scan), task=name)
            continue
        scans[split] = scan
        for cls, paths in scan.classes.items():
            if not paths:
                report.warn("empty-class", f"{d / cls} holds no images", task=name)
            for p in paths:
                if not os.path.exists(p):  # a dangling link
                    report.error("missing-file", f"{p} is a broken link / missing file", task=name)
        if scan.loose_images:
            report.warn("loose-files", f"{len(scan.loose_images)} image(s) directly in {d} "
                        f"(outside class folders) are not used", task=name)
        if scan.ignored:
            report.warn("ignored-files", f"{len(scan.ignored)} file(s) under {d} are not images "
                        f"by their extension (e.g. {scan.ignored[0]})", task=name)
    if "train" in scans and "test" in scans:
        train_cls = {c for c, p in scans["train"].classes.items() if p}
        test_cls = {c for c, p in scans["test"].classes.items() if p}
        for cls in sorted(test_cls - train_cls):
            report.error("missing-class", f"class {cls!r} is in {test_dir} but missing from "
                         f"{train_dir}", task=name)
        for cls in sorted(train_cls - test_cls):
            kind = report.warn if test_may_lack_classes else report.error
            kind("missing-class", f"class {cls!r} is in {train_dir} but missing from {test_dir}",
                 task=name)
    counts = {s: sum(len(p) for p in scan.classes.values()) for s, scan in scans.items()}
    n_cls = len(scans["train"].classes) if "train" in scans else 0
    report.info(f"{name}: {n_cls} classes, train {counts.get('train', 0)} images, test "
                f"{counts.get('test', 0)} images", task=name)
    if reference is not None and scans:
        got = (n_cls, counts.get("train", 0), counts.get("test", 0))
        for label, want, have in zip(("classes", "train images", "test images"), reference, got,
                                     strict=True):
            if want != have:
                report.warn("count", f"{have} {label}, the reference dataset has {want}",
                            task=name)
    return [p for scan in scans.values() for paths in scan.classes.values() for p in paths
            if os.path.exists(p)]


# -- the shared DataModule ---------------------------------------------------------------------
class ImageTasksDataModule(MultiTaskDataModule):
    """Tasks of image files on disk. Subclasses implement ``load_source`` and
    ``check_dataset``; the rest (checks, validation split, transforms, loaders) is here."""

    #: the benchmark's name and expected layout, for messages
    benchmark = "image folders"
    layout = "<root>/<task>/{train,test}/<class>/<image>"
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
        # Hydra's instantiate wraps exceptions raised here, so bad values are only recorded
        # now and reported (as one-line DataConfigErrors) when the tasks are built.
        self._deferred: list[str] = []
        try:
            workers = resolve_num_workers(num_workers)
        except DataConfigError as err:
            self._deferred.append(str(err))
            workers = 0
        try:
            pin = resolve_pin_memory(pin_memory)
        except DataConfigError as err:
            self._deferred.append(str(err))
            pin = False
        super().__init__(num_workers=workers, pin_memory=pin,
                         persistent_workers=bool(persistent_workers), **kwargs)
        self.root = Path(root).expanduser() if root else None
        self.image_size, self.resize_size = image_size, resize_size
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
        if self._deferred:
            raise DataConfigError(self._deferred[0])
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

    def check_root(self) -> Path:
        if self.root is None:
            raise DataConfigError(f"data.root is not set: point it at the {self.benchmark} "
                                  f"dataset ({self.layout})")
        if not self.root.exists():
            raise DataConfigError(f"data.root={str(self.root)!r} does not exist; expected the "
                                  f"{self.benchmark} layout {self.layout}")
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
        return {task: self.make_splits(src) for task, src in sources.items()}

    def drop_unreadable(self, sources: Mapping[str, TaskSource]) -> None:
        """Verify images (``data.verify_images``): fail listing the bad files, or leave them
        out when ``data.skip_corrupt`` is true, saying how many."""
        if self.verify_images == "none":
            return
        paths = sorted({p for s in sources.values()
                        for part in (s.train, s.test, s.val or []) for p, _ in part})
        bad = dict(find_unreadable(paths, full=self.verify_images == "full"))
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


class FoldersDataModule(ImageTasksDataModule):
    """``data=folders``: the user's own tasks, one ImageFolder tree per split."""

    benchmark = "folders"
    layout = ("data.folders=[{name, train, test}] of ImageFolder trees <dir>/<class>/<image>, "
              "or <root>/<task>/{train,test}/<class>/<image>")
    default_policy = "crop"

    def __init__(self, folders: list[Mapping] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.folders = folders
        self._tasks_given = bool(self.tasks_requested)
        self._specs: dict[str, dict] | None = None

    def folder_specs(self) -> dict[str, dict]:
        """``{name: {train, test, val?, val_fraction?, num_classes?, transform?}}``."""
        if self._specs is not None:
            return self._specs
        specs: dict[str, dict] = {}
        allowed = {"name", "train", "test", "val", "val_fraction", "num_classes", "transform"}
        if self.folders is None:
            root = self.check_root()
            for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if (d / "train").is_dir():
                    specs[d.name] = {"train": d / "train", "test": d / "test"}
            if not specs:
                raise self.layout_error("no <task>/train folder")
        else:
            if not isinstance(self.folders, list | tuple) or not self.folders:
                raise DataConfigError(f"data.folders must be a non-empty list of {{name, train, "
                                      f"test}} entries (or null), got {self.folders!r}")
            for i, entry in enumerate(self.folders):
                if not isinstance(entry, Mapping) or not {"name", "train", "test"} <= set(entry):
                    raise DataConfigError(f"data.folders[{i}] must have keys name, train and "
                                          f"test, got {entry!r}")
                unknown = sorted(set(entry) - allowed)
                if unknown:
                    raise DataConfigError(f"data.folders[{i}] has unknown key(s) {unknown}; "
                                          f"accepted: {sorted(allowed)}")
                name = str(entry["name"])
                if name in specs:
                    raise DataConfigError(f"data.folders names task {name!r} twice")
                spec = {k: v for k, v in entry.items() if k != "name"}
                for key in ("train", "test", "val"):
                    if spec.get(key) is not None:
                        spec[key] = self.resolve_path(spec[key])
                specs[name] = spec
        self._specs = specs
        return specs

    def resolve_path(self, value) -> Path:
        path = Path(str(value)).expanduser()
        if path.is_absolute():
            return path
        if self.root is None:
            raise DataConfigError(f"data.folders path {str(value)!r} is relative but data.root "
                                  f"is not set")
        return self.root / path

    def check_root(self) -> Path:
        if self.folders is not None and self.root is None:
            return Path(".")
        return super().check_root()

    def known_tasks(self) -> list[str]:
        return list(self.folder_specs())

    def validate_tasks(self) -> None:
        if not self._tasks_given:
            self.tasks_requested = self.known_tasks()
        super().validate_tasks()

    def policy_for(self, task: str) -> str:
        return self.folder_specs()[task].get("transform") or super().policy_for(task)

    def load_source(self, task: str) -> TaskSource:
        spec = self.folder_specs()[task]
        policy = self.policy_for(task)
        if policy not in POLICIES:
            raise DataConfigError(f"task {task!r}: transform must be one of {list(POLICIES)}, "
                                  f"got {policy!r}")
        fraction = spec.get("val_fraction")
        if fraction is not None:
            check_val_fraction(fraction, f"val_fraction of task {task!r}")
        num_classes = spec.get("num_classes")
        if num_classes is not None and (isinstance(num_classes, bool)
                                        or not isinstance(num_classes, int)):
            raise DataConfigError(f"num_classes of task {task!r} must be an integer, "
                                  f"got {num_classes!r}")
        src = folder_task_source(task, Path(spec["train"]), Path(spec["test"]), policy,
                                 "<dir>/<class>/<image>", val_dir=spec.get("val"),
                                 num_classes=num_classes)
        src.val_fraction = fraction
        return src

    def check_dataset(self, report) -> None:
        paths: list[str] = []
        for task in self.tasks_requested:
            spec = self.folder_specs()[task]
            paths += check_folder_task(report, task, Path(spec["train"]), Path(spec["test"]),
                                       "<dir>/<class>/<image>", test_may_lack_classes=True)
        report.decode_all(paths)
