"""benchmarks/seed_sweep.py with the training job stood in for: where runs go, what is read."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .helpers import load_benchmark

sweep = load_benchmark("seed_sweep")


def fake_job(calls: list):
    """subprocess.run for ``python -m cwps_lightning.train``: writes a results.json into
    hydra.run.dir, read as the job reads it (relative to the job's cwd)."""
    def run(cmd, cwd=None, **kwargs):
        calls.append((cmd, cwd))
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("hydra.run.dir="))
        seed = int(next(a.split("=", 1)[1] for a in cmd if a.startswith("seed=")))
        run_dir = Path(cwd or ".") / out
        run_dir.mkdir(parents=True, exist_ok=True)
        methods = {m: {"mean_top1": base + seed, "param_ratio": ratio,
                       "param_ratio_with_heads": ratio,
                       "tasks": {"a": {"top1": base + seed}}}
                   for m, base, ratio in (("cwps", 90.0, 1.3), ("finetune", 91.0, 4.0))}
        (run_dir / "results.json").write_text(json.dumps({"methods": methods}))
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_a_relative_keep_dir_is_the_callers_and_every_run_is_read(tmp_path, monkeypatch,
                                                                   capsys):
    """The runs start in the checkout; a relative --keep-dir still means the caller's
    directory, where the script then reads them (they all count, none FAILED)."""
    calls = []
    monkeypatch.setattr(sweep.subprocess, "run", fake_job(calls))
    monkeypatch.setattr(sweep, "REPO", tmp_path / "checkout")  # (where a wrong run dir goes)
    here = tmp_path / "caller"
    here.mkdir()
    monkeypatch.chdir(here)
    out = tmp_path / "sweep.json"
    assert sweep.main(["--seeds", "0", "1", "--keep-dir", "runs/x", "--out", str(out)]) == 0
    assert "FAILED" not in capsys.readouterr().out
    assert all(cwd == sweep.REPO for _, cwd in calls)
    assert sorted(p.name for p in (here / "runs" / "x").iterdir()) == ["default_s0",
                                                                      "default_s1"]
    summary = json.loads(out.read_text())["summary"]["default"]
    assert summary["cwps_minus_finetune"] == [-1.0, -1.0]
    assert summary["cwps"]["mean_top1"] == [90.0, 91.0]


def test_a_run_that_leaves_no_results_is_named_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "done", ""))
    assert sweep.main(["--seeds", "0", "--keep-dir", str(tmp_path / "runs")]) == 1
    out = capsys.readouterr().out
    assert "default seed 0: FAILED (no " in out and "results.json" in out
