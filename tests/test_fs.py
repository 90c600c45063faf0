"""fs.py: the run directory's lock."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cwps_lightning.fs import RunDirBusy, RunDirLock


def test_a_run_dir_is_held_by_one_job_at_a_time_and_freed_at_its_end(tmp_path):
    """(two jobs in one run dir: the second resumed the first's half-written progress, deleted
    its metrics files and crashed)"""
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirBusy, match=r"another job is running in this run dir"):
            with RunDirLock(tmp_path):
                pass
        # (another process too: the lock is the folder's, not this process's)
        held = subprocess.run([sys.executable, "-c", (
            "import sys; from cwps_lightning.fs import RunDirLock, RunDirBusy\n"
            "try:\n    RunDirLock(sys.argv[1]).__enter__()\n"
            "except RunDirBusy:\n    sys.exit(7)\n"), str(tmp_path)])
        assert held.returncode == 7
    with RunDirLock(tmp_path):  # (freed)
        pass
    assert list(tmp_path.iterdir()) == []  # (no lock file left)
    with RunDirLock(tmp_path / "not_made_yet"):  # (nothing to hold yet: the job makes it)
        pass


def test_the_preflight_refuses_a_run_dir_a_job_is_running_in(tmp_path):
    """Before Hydra writes its .hydra/ files there, which would record this job's config next
    to the running one's results."""
    from cwps_lightning.train import preflight

    with RunDirLock(tmp_path), pytest.raises(RunDirBusy, match=str(tmp_path)):
        preflight([f"hydra.run.dir={tmp_path}"])
    preflight([f"hydra.run.dir={tmp_path}"])
