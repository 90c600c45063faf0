"""benchmarks/gpu_suite.sh: the steps' order, the time budget, what comes back (no GPU needed:
the interpreter is replaced by a stand-in that records its arguments)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"

# Records each call; `-m cwps_lightning.train` writes a results.json into its hydra.run.dir;
# a call whose arguments contain $FAIL exits 1; every call sleeps $NAP seconds.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
sleep "${NAP:-0}"
for a in "$@"; do
  case $a in hydra.run.dir=*) d=${a#hydra.run.dir=}; mkdir -p "$d"; echo '{}' > "$d/results.json" ;; esac
done
case "$*" in *"${FAIL:-@none@}"*) exit 1 ;; esac
exit 0
"""


def run_suite(tmp_path, budget, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    calls = tmp_path / "calls.txt"
    proc = subprocess.run(
        ["bash", str(SUITE), str(out), str(budget)], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHON": str(fake), "CALLS": str(calls),
             "WORK": str(tmp_path / "work"), **env},
        timeout=120,
    )
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc, out, [line for line in lines if "import sys" not in line]


def test_every_step_runs_in_order_and_at_most_eight_files_come_back(tmp_path):
    proc, out, calls = run_suite(tmp_path, 600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jsons = [c.split("--out ")[1].split()[0] for c in calls if "layer_overhead.py" in c]
    assert [Path(j).stem for j in jsons] == [
        "overhead_paper_bf16", "overhead_digits_compile", "overhead_digits_job_decisions",
        "overhead_paper_bf16_compile", "overhead_digits_cudagraphs"]
    assert all(Path(j).parent == out for j in jsons)
    assert "gpu_check.py" in calls[0] and "cwps_lightning.train" in calls[3]
    # the job's decisions come from the training run's own results.json, under WORK
    decisions = calls[4].split("--decisions ")[1].split()[0]
    assert decisions == str(tmp_path / "work" / "train" / "results.json")
    assert "--device cuda" in calls[1] and "--amp bf16" in calls[1] and "resnet50" in calls[1]
    returned = sorted(p.name for p in out.iterdir())
    assert returned == ["steps.log", "summary.txt", "train_amp_results.json"]  # (stand-in)
    assert len(returned) + len(jsons) <= 8  # the benchmark JSONs, once real runs write them
    summary = (out / "summary.txt").read_text()
    assert summary.count(": exit 0") == 7 and "skipped" not in summary


def test_a_spent_budget_skips_the_remaining_steps_and_a_failed_step_fails_the_suite(tmp_path):
    # the version line takes 3-4 s of 24, gpu_check 20-21 s at most (it takes 3): then < 20 left
    proc, out, calls = run_suite(tmp_path, 24, NAP="3", FAIL="gpu_check.py")
    assert proc.returncode == 1
    assert len(calls) == 1 and "gpu_check.py" in calls[0]
    summary = (out / "summary.txt").read_text()
    assert re.search(r"== gpu_check \(limit 2[01] s\)", summary) and "== gpu_check: exit 1" in summary
    assert "== overhead_paper_bf16: skipped" in summary
    assert "== overhead_digits_cudagraphs: skipped" in summary
    assert "overhead_digits_job_decisions: skipped, train_amp wrote no results.json" in summary


@pytest.mark.parametrize("budget", ["ten", "-5"])
def test_a_bad_budget_is_named(tmp_path, budget):
    proc, out, calls = run_suite(tmp_path, budget)
    assert proc.returncode == 2 and f"got '{budget}'" in proc.stderr and not calls
