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

# Records each call; a call whose arguments contain $FAIL exits 1; otherwise
# `-m cwps_lightning.train` writes a results.json into its hydra.run.dir; one whose arguments contain $NAP_ON sleeps $NAP s.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in *"${NAP_ON:-@none@}"*) sleep "$NAP" ;; esac
case "$*" in *"${FAIL:-@none@}"*) exit 1 ;; esac
for a in "$@"; do
  case $a in hydra.run.dir=*) d=${a#hydra.run.dir=}; mkdir -p "$d"; echo '{}' > "$d/results.json" ;; esac
done
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


def test_without_a_gpu_it_says_so_once_and_runs_no_step(tmp_path):
    proc, out, calls = run_suite(tmp_path, 600, FAIL="cuda.is_available")
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.strip().endswith("error: no CUDA GPU visible to "
                                        f"{tmp_path / 'python'} (torch.cuda.is_available() is "
                                        "False); the suite runs nothing without one")
    assert "==" not in (out / "summary.txt").read_text()


def test_an_interpreter_without_torch_is_named_once(tmp_path):
    """(the interpreter's torch probe exits 3 when torch cannot be found)"""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\ncase "$*" in *find_spec*) exit 3 ;; esac\n'
                    'echo "$*" >> "$CALLS"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    proc = subprocess.run(["bash", str(SUITE), str(tmp_path / "out"), "600"], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(fake), "CALLS": str(tmp_path / "c"),
                               "WORK": str(tmp_path / "work")})
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"error: {fake} cannot import torch (PYTHON=... picks "
                                        "the interpreter); the suite runs nothing")
    calls = (tmp_path / "c").read_text().splitlines()
    assert all("import sys, torch, lightning" in c for c in calls)  # the versions line only


def test_a_step_stopped_by_the_budget_is_named_not_failed_and_the_rest_are_skipped(tmp_path):
    # gpu_check would take 60 s: it gets the whole budget (25 s, not its own 90), is stopped
    # there, and nothing is left for the steps after it
    proc, out, calls = run_suite(tmp_path, 25, NAP_ON="gpu_check.py", NAP="60")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary
    assert len(calls) == 1 and "gpu_check.py" in calls[0]
    assert re.search(r"== gpu_check \(limit 2[45] s\)", summary)
    assert "== gpu_check: exit 124 (stopped at the end of the budget)" in summary
    assert "== overhead_paper_bf16: skipped" in summary
    assert "== overhead_digits_cudagraphs: skipped" in summary
    assert "overhead_digits_job_decisions: skipped, train_amp wrote no results.json" in summary


def test_a_failed_step_fails_the_suite_and_the_others_still_run(tmp_path):
    proc, out, calls = run_suite(tmp_path, 600, FAIL="gpu_check.py")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1
    assert "== gpu_check: exit 1," in summary and summary.count(": exit 0") == 6


def test_a_rerun_trains_afresh_not_from_the_last_runs_directory(tmp_path):
    """The training run's directory under WORK is cleared first: a left one would be resumed,
    and its results.json would stand in for a run that failed this time."""
    stale = tmp_path / "work" / "train" / "results.json"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"stale": true}')
    proc, out, calls = run_suite(tmp_path, 600, FAIL="cwps_lightning.train")
    assert proc.returncode == 1
    assert not (out / "train_amp_results.json").exists()
    assert "job_decisions: skipped, train_amp wrote no results.json" in \
        (out / "summary.txt").read_text()


def test_a_budget_with_a_leading_zero_is_decimal(tmp_path):
    proc, out, calls = run_suite(tmp_path, "030")
    assert "== gpu_check (limit 30 s)" in (out / "summary.txt").read_text()


@pytest.mark.parametrize("budget", ["ten", "-5"])
def test_a_bad_budget_is_named(tmp_path, budget):
    proc, out, calls = run_suite(tmp_path, budget)
    assert proc.returncode == 2 and f"got '{budget}'" in proc.stderr and not calls


def test_every_variant_the_suite_asks_for_is_one_the_benchmark_knows(tmp_path):
    """A misspelt variant would cost a lent GPU's step (the benchmark refuses it on start)."""
    from .helpers import load_benchmark

    bench = load_benchmark("layer_overhead")
    proc, _, calls = run_suite(tmp_path, 600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    asked = [c.split("--variants ")[1].split()[0].split(",")
             for c in calls if "layer_overhead.py" in c]
    assert len(asked) == 5
    known = bench.VARIANTS + bench.EXTRA_VARIANTS
    for names in asked:
        assert "finetune" in names
        assert all(bench.split_compile(n)[0] in known for n in names), names
    # the prototype at the digits shape, in a step the recipe's budget always reaches (step 3)
    assert {"step-compose-soft", "step-compose-hard", "cwps-step-soft",
            "cwps-step-hard"} <= set(asked[1]), asked[1]


def test_a_step_left_under_20_seconds_is_skipped_not_run(tmp_path):
    """A 20 s budget: gpu_check (1.5 s) leaves 18-19 s (less on a loaded machine), under the
    20 s a step needs: every later step is skipped and named with the time left."""
    proc, out, calls = run_suite(tmp_path, 20, NAP_ON="gpu_check.py", NAP="1.5")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary
    assert len(calls) == 1 and "gpu_check.py" in calls[0]
    assert "== gpu_check: exit 0" in summary
    assert re.search(r"== overhead_paper_bf16: skipped, 1\d s of the budget left", summary)


def test_the_steps_run_the_checkouts_sources_on_the_gpu_without_memory_workers(tmp_path):
    """PYTHONPATH starts with this checkout's src (a GPU image has no editable install); the
    benchmark steps run on CUDA, timing only (peak memory is a separate run)."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "$PYTHONPATH | $*" >> "$CALLS"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    subprocess.run(["bash", str(SUITE), str(tmp_path / "out"), "600"], cwd=REPO,
                   capture_output=True, text=True, timeout=120,
                   env={**os.environ, "PYTHON": str(fake), "CALLS": str(calls),
                        "WORK": str(tmp_path / "work"), "PYTHONPATH": "/elsewhere"})
    lines = calls.read_text().splitlines()
    assert lines and all(line.startswith(f"{REPO}/src:/elsewhere | ") for line in lines)
    bench = [line for line in lines if "layer_overhead.py" in line]
    assert len(bench) == 4  # (no results.json from the stand-in training: one skipped)
    assert all("--device cuda" in line and "--skip-memory" in line for line in bench)


def test_a_step_stopped_by_its_own_limit_fails_the_suite(tmp_path):
    """(a stand-in `timeout` says gpu_check ran out of time: 124 at its own 90 s limit, the
    budget far from spent) a time limit is a failure, not the end of the budget."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "timeout"
    fake.write_text('#!/usr/bin/env bash\nshift 3\n'
                    'case "$*" in *gpu_check.py*) exit 124 ;; esac\nexec "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    proc, out, calls = run_suite(tmp_path, 600, PATH=f"{bin_dir}:{os.environ['PATH']}")
    summary = (out / "summary.txt").read_text()
    assert "== gpu_check (limit 90 s)" in summary
    assert "== gpu_check: exit 124 (time limit)" in summary
    assert proc.returncode == 1 and summary.count(": exit 0") == 6
