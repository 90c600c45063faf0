"""ImageFolder trees (``<split dir>/<class>/<image>``): scanning one, making a task of a train
and a test tree, and checking a task's trees for ``python -m cwps_lightning.data check``.

Labels are the sorted class folder names of the train tree. A class folder may hold sub-folders;
names starting with a dot are skipped. torchvision's ``make_dataset`` is not used for the scan:
it keeps hidden files, orders nested folders by path string rather than folder by folder, fails
on an empty class, and does not report the loose and non-image files the check lists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import short_list
from .base import DataConfigError
from .image_tasks import TaskSource
from .images import is_image_file


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


def single_class_error(train_dir: Path, classes: list[str]) -> str:
    # one class: the head has one output, every prediction is right and the accuracy metrics
    # refuse it at the first fit
    return (f"{train_dir} has a single class folder, {classes[0]!r}; a task needs 2 or more "
            f"classes")


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
    if len(classes) < 2:
        raise DataConfigError(f"task {name!r}: " + single_class_error(train_dir, classes))
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
    val_dir: Path | None = None, num_classes: int | None = None,
) -> list[str]:
    """Report layout, class and file problems of an ImageFolder task (what folder_task_source
    refuses, and more); returns its image paths (for the decode check)."""
    dirs = {"train": train_dir, "test": test_dir, "val": val_dir}
    scans: dict[str, ClassFolders] = {}
    for split, d in dirs.items():
        if d is None:
            continue
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
    for split in ("test", "val"):
        if "train" not in scans or split not in scans:
            continue
        train_cls = {c for c, p in scans["train"].classes.items() if p}
        split_cls = {c for c, p in scans[split].classes.items() if p}
        for cls in sorted(split_cls - train_cls):
            report.error("missing-class", f"class {cls!r} is in {dirs[split]} but missing from "
                         f"{train_dir}", task=name)
        for cls in sorted(train_cls - split_cls):
            kind = report.warn if test_may_lack_classes else report.error
            kind("missing-class", f"class {cls!r} is in {train_dir} but missing from "
                 f"{dirs[split]}", task=name)
    counts = {s: sum(len(p) for p in scan.classes.values()) for s, scan in scans.items()}
    n_cls = len(scans["train"].classes) if "train" in scans else 0
    if "train" in scans and n_cls < 2:
        report.error("classes", single_class_error(train_dir, sorted(scans["train"].classes)),
                     task=name)
    if "train" in scans and num_classes is not None and num_classes != n_cls:
        report.error("classes", f"num_classes={num_classes} disagrees with the {n_cls} class "
                     f"folders of {train_dir}", task=name)
    val = f", val {counts.get('val', 0)} images" if val_dir is not None else ""
    report.info(f"{name}: {n_cls} classes, train {counts.get('train', 0)} images, test "
                f"{counts.get('test', 0)} images{val}", task=name)
    if reference is not None and scans:
        got = (n_cls, counts.get("train", 0), counts.get("test", 0))
        for label, want, have in zip(("classes", "train images", "test images"), reference, got,
                                     strict=True):
            if want != have:
                report.warn("count", f"{have} {label}, the reference dataset has {want}",
                            task=name)
    return [p for scan in scans.values() for paths in scan.classes.values() for p in paths
            if os.path.exists(p)]
