"""``data=folders``: the user's own tasks, each a pair of ImageFolder trees.

Layout: a list of tasks ``data.folders=[{name, train, test}]`` whose ``train`` / ``test`` are
ImageFolder trees ``<dir>/<class>/<image>`` (absolute paths are used as they are, relative ones
are taken from ``data.root``), or, with ``data.folders=null``, every
``<root>/<task>/{train,test}/<class>/<image>``. Labels are the training split's class folder
names, sorted; a class only in the test split is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .base import DataConfigError, task_name_error
from .image_tasks import ImageTasksDataModule, TaskSource, check_val_fraction
from .scan import check_folder_task, folder_task_source
from .transforms import POLICIES

#: the keys a data.folders entry may have
ENTRY_KEYS = ("name", "train", "test", "val", "val_fraction", "num_classes", "transform")
TREE = "<dir>/<class>/<image>"


class FoldersDataModule(ImageTasksDataModule):
    """``data=folders``: the user's own tasks, one ImageFolder tree per split."""

    benchmark = "folders"
    layout = ("data.folders=[{name, train, test}] of ImageFolder trees <dir>/<class>/<image>, "
              "or <root>/<task>/{train,test}/<class>/<image>")
    default_policy = "crop"
    tasks_from_disk = True  # (discovered under data.root, or listed with paths it resolves)

    def __init__(self, folders: list[Mapping] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.folders = folders
        self._tasks_given = bool(self.tasks_requested)
        self._specs: dict[str, dict] | None = None
        self._root_used = False  # whether a listed path was resolved against data.root

    # -- the task list -------------------------------------------------------------------------
    def folder_specs(self) -> dict[str, dict]:
        """``{name: {train, test, val?, val_fraction?, num_classes?, transform?}}``."""
        if self._specs is None:
            self._specs = (self.discovered_specs() if self.folders is None
                           else self.listed_specs())
        return self._specs

    def discovered_specs(self) -> dict[str, dict]:
        """Every ``<root>/<task>/train`` folder, in sorted order."""
        root = super().check_root()
        specs = {d.name: {"train": d / "train", "test": d / "test"}
                 for d in sorted(root.iterdir())
                 if d.is_dir() and not d.name.startswith(".") and (d / "train").is_dir()}
        if not specs:
            raise self.layout_error("no <task>/train folder")
        return specs

    def listed_specs(self) -> dict[str, dict]:
        """The entries of ``data.folders``, checked, with their paths resolved."""
        entries = self.folders
        if isinstance(entries, str) or not isinstance(entries, Sequence) or not entries:
            raise DataConfigError(f"data.folders must be a non-empty list of {{name, train, "
                                  f"test}} entries (or null), got {entries!r}")
        specs: dict[str, dict] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or not {"name", "train", "test"} <= set(entry):
                raise DataConfigError(f"data.folders[{i}] must have keys name, train and "
                                      f"test, got {entry!r}")
            unknown = sorted(set(entry) - set(ENTRY_KEYS))
            if unknown:
                raise DataConfigError(f"data.folders[{i}] has unknown key(s) {unknown}; "
                                      f"accepted: {sorted(ENTRY_KEYS)}")
            # a number names a task too (Hydra reads name: 2019 as an integer)
            name = entry["name"]
            if isinstance(name, int) and not isinstance(name, bool):
                name = str(name)
            error = task_name_error(name, f"data.folders[{i}].name")
            if error:
                raise DataConfigError(error)
            if name in specs:
                raise DataConfigError(f"data.folders names task {name!r} twice")
            spec = {k: v for k, v in entry.items() if k != "name"}
            check_entry_settings(spec, f"data.folders[{i}]")
            for key in ("train", "test", "val"):
                if spec.get(key) is not None:
                    spec[key] = self.resolve_path(spec[key])
            check_distinct_folders(spec, f"data.folders[{i}]")
            specs[name] = spec
        return specs

    def resolve_path(self, value) -> Path:
        """An absolute path as it is; a relative one under data.root, which must then exist."""
        path = Path(str(value)).expanduser()
        if path.is_absolute():
            return path
        if self.root is None:
            raise DataConfigError(f"data.folders path {str(value)!r} is relative but data.root "
                                  f"is not set")
        if not self.root.is_dir():
            state = "is not a directory" if self.root.exists() else "does not exist"
            raise DataConfigError(f"data.folders path {str(value)!r} is relative to "
                                  f"data.root={str(self.root)!r}, which {state}; give an "
                                  f"absolute path, or point data.root at the folder it is in")
        self._root_used = True
        return self.root / path

    def check_root(self) -> Path | None:
        """The root, checked only where it is read: to discover the tasks, or to resolve a
        relative data.folders path (None when every listed path is absolute)."""
        if self.folders is None:
            return super().check_root()
        self.folder_specs()
        return self.root if self._root_used else None

    def known_tasks(self) -> list[str]:
        return list(self.folder_specs())

    def validate_tasks(self) -> None:
        self.raise_deferred()  # a bad setting first, before the folders are read
        if not self._tasks_given:
            self.tasks_requested = self.known_tasks()
        super().validate_tasks()

    # -- loading -------------------------------------------------------------------------------
    def policy_for(self, task: str) -> str:
        return self.folder_specs()[task].get("transform") or super().policy_for(task)

    def load_source(self, task: str) -> TaskSource:
        spec = self.folder_specs()[task]  # (its settings checked by listed_specs)
        src = folder_task_source(task, spec["train"], spec["test"], self.policy_for(task), TREE,
                                 val_dir=spec.get("val"), num_classes=spec.get("num_classes"))
        src.val_fraction = spec.get("val_fraction")
        return src

    def check_dataset(self, report) -> None:
        paths: list[str] = []
        for task in self.tasks_requested:
            spec = self.folder_specs()[task]
            paths += check_folder_task(report, task, spec["train"], spec["test"], TREE,
                                       test_may_lack_classes=True, val_dir=spec.get("val"),
                                       num_classes=spec.get("num_classes"))
        report.decode_all(paths)


def check_entry_settings(spec: Mapping, where: str) -> None:
    """The values of one data.folders entry (less its name), before any folder is read: the
    train command and data check both refuse a bad one here."""
    for key in ("train", "test", "val"):
        value = spec.get(key)
        if value is None and key == "val":
            continue
        if not isinstance(value, str | os.PathLike) or not str(value).strip():
            optional = " or null (a share of train is held out)" if key == "val" else ""
            raise DataConfigError(f"{where}.{key} must be a path to a folder {TREE}{optional}, "
                                  f"got {value!r}")
    policy = spec.get("transform")
    if policy is not None and policy not in POLICIES:
        raise DataConfigError(f"{where}.transform must be one of {list(POLICIES)} or null "
                              f"(data.transform), got {policy!r}")
    if spec.get("val_fraction") is not None:
        check_val_fraction(spec["val_fraction"], f"{where}.val_fraction")
    num_classes = spec.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int) or num_classes < 2):
        raise DataConfigError(f"{where}.num_classes must be an integer >= 2 (a task needs 2 or "
                              f"more classes) or null, got {num_classes!r}")


def check_distinct_folders(spec: Mapping, where: str) -> None:
    """No two splits of an entry are one folder: test = train would report accuracy on the
    training images, val = train or test would select the model on them."""
    given = [(k, Path(os.path.realpath(spec[k]))) for k in ("train", "val", "test")
             if spec.get(k) is not None]
    for n, (key, path) in enumerate(given):
        for other, other_path in given[n + 1:]:
            if path == other_path:
                raise DataConfigError(f"{where}: {key} and {other} are the same folder "
                                      f"{spec[key]}; each split needs a folder of its own")
