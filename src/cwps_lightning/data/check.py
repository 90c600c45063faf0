"""``python -m cwps_lightning.data check +experiment=domainnet data.root=<dir>``: verify a dataset
before hours of GPU time are spent on it.

The command composes the same Hydra config as training (same presets, same overrides), builds
the benchmark's DataModule and asks it to check its tree: layout, split files, classes, image
counts against the reference dataset, and every image decoded in full. Each problem is printed
on one line, ``ERROR`` or ``WARN``, with the file (and split-file line) it concerns; the last
line is a summary. Exit status: 0 no errors (warnings allowed, unless ``--strict``), 1 problems
found, 2 bad configuration (e.g. a missing data.root).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TextIO

# one compose / instantiate helper for every command; data check composes what train runs
from ..config import CONF_DIR, compose_config, instantiate_data  # noqa: F401
from ..errors import ConfigError
from .images import find_unreadable


class Report:
    """Collects and prints a check's findings, at most ``limit`` lines per (kind, task)."""

    def __init__(self, stream: TextIO | None = None, limit: int = 20, workers: int | None = None):
        self.stream = stream or sys.stdout
        self.limit = limit
        self.workers = workers
        self.errors: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()
        self._shown: Counter[tuple] = Counter()
        self._hidden: Counter[tuple] = Counter()
        self.decoded = 0

    def _emit(self, level: str, kind: str, message: str, task: str | None) -> None:
        key = (level, kind, task)
        if self._shown[key] >= self.limit:
            self._hidden[key] += 1
            return
        self._shown[key] += 1
        where = f"{task}: " if task else ""
        print(f"{level:<5} [{kind}] {where}{message}", file=self.stream, flush=True)

    def error(self, kind: str, message: str, task: str | None = None) -> None:
        self.errors[kind] += 1
        self._emit("ERROR", kind, message, task)

    def warn(self, kind: str, message: str, task: str | None = None) -> None:
        self.warnings[kind] += 1
        self._emit("WARN", kind, message, task)

    def info(self, message: str, task: str | None = None) -> None:
        print(f"{'INFO':<5} {message}", file=self.stream, flush=True)

    def decode_all(self, paths: Iterable[str]) -> None:
        """Decode every image in full; each one that fails is a ``corrupt-image`` error."""
        paths = sorted(set(paths))
        started = time.time()
        def say(done: int, total: int, seconds: float) -> None:
            print(f"  decoding: {done}/{total} images, {done / max(seconds, 1e-9):.0f} images/s",
                  file=self.stream, flush=True)

        for path, why in find_unreadable(paths, full=True, workers=self.workers, progress=say):
            self.error("corrupt-image", f"{path}: {why}")
        self.decoded += len(paths)
        self.info(f"decoded {len(paths)} image(s) in {time.time() - started:.1f} s")

    def finish(self, strict: bool = False) -> int:
        for (level, kind, task), n in sorted(self._hidden.items(), key=str):
            where = f" ({task})" if task else ""
            print(f"{level:<5} [{kind}]{where} ... and {n} more like the above", file=self.stream)
        n_err, n_warn = sum(self.errors.values()), sum(self.warnings.values())

        def kinds(c: Counter) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(c.items()))

        if n_err:
            print(f"data check: FAILED, {n_err} error(s) ({kinds(self.errors)}), {n_warn} "
                  f"warning(s){f' ({kinds(self.warnings)})' if n_warn else ''}", file=self.stream)
            return 1
        if n_warn:
            verdict = "FAILED (--strict)" if strict else "OK"
            print(f"data check: {verdict}, no errors, {n_warn} warning(s) ({kinds(self.warnings)})",
                  file=self.stream)
            return 1 if strict else 0
        print("data check: OK, no errors, no warnings", file=self.stream)
        return 0


def run_check(overrides: Sequence[str], strict: bool = False, stream: TextIO | None = None) -> int:
    """Compose the config, build the DataModule, check its tree; the exit status."""
    from .image_tasks import ImageTasksDataModule

    cfg = compose_config(overrides)
    dm = instantiate_data(cfg)
    if not isinstance(dm, ImageTasksDataModule):
        raise ConfigError(f"data check reads datasets on disk (data=imagenet_sketch, domainnet, "
                          f"folders); {type(dm).__name__} is built in memory, nothing to check")
    dm.validate_settings()
    root = dm.check_root()
    dm.validate_tasks()
    dm.check_resize_used()
    stream = stream or sys.stdout
    # (no root: data.folders lists every folder by its absolute path)
    where = f"at {root}" if root is not None else "listed in data.folders"
    print(f"checking {dm.benchmark} {where}: tasks {dm.tasks_requested}", file=stream)
    report = Report(stream=stream, workers=dm.num_workers * 4 or None)
    dm.check_dataset(report)
    return report.finish(strict)
