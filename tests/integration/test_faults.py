"""Faults a long run must survive through the real CLI: a diverged fit stops the run with one
line and leaves the finished tasks stored; a multirun through submitit's local executor."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from cwps_lightning.cwps import MultiTaskStore
from cwps_lightning.errors import DIVERGED_RUN_DIR
from cwps_lightning.sweep import sweep_rows

from .helpers import REPO, TINY, cli_env, run_train

DIVERGING = "tests.integration.diverging_method:Diverging"


def test_a_diverged_fit_stops_the_run_with_one_line_and_the_store_keeps_cwps_tasks(
        run_dir, t0_cache):
    # CWPS trains and stores its 3 tasks; then a baseline at lr 1e6 meets a nan loss
    proc = run_train(run_dir, f"cwps.baselines=[{DIVERGING}]", cache=t0_cache)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    # (after a stored task: a lower learning rate takes a new run dir, the line says)
    assert re.fullmatch(r"error: task 'optdigits', fit diverging/optdigits: the training loss "
                        r"is (nan|inf|-inf) at epoch \d+, step \d+ \(counted from 0; .*\); the "
                        r"store keeps the tasks finished before, " + re.escape(DIVERGED_RUN_DIR),
                        errors[0]), errors[0]
    assert "Traceback" not in proc.stderr
    store = MultiTaskStore.load(run_dir / "store")
    assert store.tasks == ["T0", "optdigits", "mnist_sketch", "mnist_m"]
    record = store.manifest["run"]["methods"]
    assert len(record["cwps"]["done"]) == 3 and record.get("diverging", {}).get("done", []) == []
    assert not (run_dir / "results.json").exists()
    assert store.manifest["run"]["complete"] is False


def test_a_nan_loss_in_the_first_fit_stops_before_anything_is_stored(run_dir, t0_cache):
    proc = run_train(run_dir, "optim.lr=1e6", "data.tasks=[optdigits]", "cwps.baselines=[]",
                     cache=t0_cache)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: task 'optdigits', fit cwps/" in proc.stderr
    assert not (run_dir / "store" / "manifest.json").exists()


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path, t0_cache):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "cwps_lightning.train", "-m", "hydra/launcher=submitit_local",
           "hydra.launcher.timeout_min=10", *TINY, "data.tasks=[optdigits]", "cwps.baselines=[]",
           f"hydra.sweep.dir={sweep}", f"paths.cache_dir={t0_cache}", "cwps.threshold=0.3,0.7"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = sweep_rows(sweep)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    thresholds = [json.loads((sweep / r["dir"] / "results.json").read_text())
                  ["config"]["cwps"]["threshold"] for r in rows]
    assert thresholds == [0.3, 0.7]
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit


def test_a_single_run_that_crashes_says_so_and_mentions_no_sweep(run_dir, t0_cache):
    """An error of no kind the project knows ends a single run with its traceback and exit 1;
    the run is no sweep, so no 'job(s) of the sweep failed' line names a sweep.md."""
    proc = run_train(run_dir, "data.tasks=[optdigits]",
                     "cwps.baselines=[tests.integration.diverging_method:Crashing]",
                     cache=t0_cache)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "RuntimeError: a bug in a method" in proc.stderr
    assert "sweep" not in proc.stderr + proc.stdout, (proc.stderr + proc.stdout)[-3000:]
