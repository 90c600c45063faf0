"""Small file-system questions that the checks of several layers ask alike."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError


def file_in_the_way(path) -> Path | None:
    """The file that stops ``path`` from being, or being made, a directory: ``path`` itself or
    the nearest existing folder above it, where that is not a directory; None otherwise."""
    there = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
    return there if there is not None and not there.is_dir() else None


class RunDirBusy(ConfigError):
    """Another job holds the run directory (its lock): this one must not touch it, nor remove
    it as its own stub."""


class RunDirLock:
    """An exclusive lock on a run directory for one job's life, so that a second job started
    into it (the same command twice, a sweep's job dir given to a single run) stops at once
    instead of resuming from the first one's half-written progress. The lock is the
    directory's own (``flock`` on the folder: no file is left behind) and goes with the
    process, whatever ends it; a file system that has no such locks (some network ones) runs
    unlocked, as before."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        import fcntl
        import os

        try:
            fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return self  # (no folder yet, or not one: the job's own checks name that)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusy(f"{self.run_dir}: another job is running in this run dir; wait "
                             "for it to end (the same command then resumes or rereads it), "
                             "or give this one another hydra.run.dir") from None
        except OSError:  # (no locks on this file system)
            os.close(fd)
            return self
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import os

        if self._fd is not None:
            os.close(self._fd)  # (closing releases the lock)
            self._fd = None
