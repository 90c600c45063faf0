"""benchmarks/seed_sweep.py with the training job stood in for: where runs go, what is read."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .helpers import load_benchmark

sweep = load_benchmark("seed_sweep")


def results_json(methods: dict) -> str:
    """A results.json of the layout the report reads, with these methods."""
    return json.dumps({"methods": methods, "tasks": ["a"], "backbone": "resnet18",
                       "backbone_params": 100})


def keep_manifest(run_dir: Path, overrides: list[str]) -> None:
    """The store manifest's run record train leaves, as --reuse checks it."""
    from cwps_lightning.config import compose_config
    from cwps_lightning.persist import config_hash, result_config

    made = result_config(compose_config(overrides))
    (run_dir / "store").mkdir()
    (run_dir / "store" / "manifest.json").write_text(json.dumps(
        {"run": {"config_hash": config_hash(made), "config": made}}))


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
        (run_dir / "results.json").write_text(results_json(methods))
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


def test_one_failed_run_of_several_fails_the_sweep_and_the_rest_are_summarised(
        tmp_path, monkeypatch, capsys):
    calls = []
    job = fake_job(calls)

    def run(cmd, cwd=None, **kwargs):
        if "seed=1" in cmd:  # this one crashes
            calls.append((cmd, cwd))
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback")
        return job(cmd, cwd=cwd, **kwargs)

    monkeypatch.setattr(sweep.subprocess, "run", run)
    out = tmp_path / "sweep.json"
    assert sweep.main(["--seeds", "0", "1", "2", "--keep-dir", str(tmp_path / "runs"),
                       "--out", str(out)]) == 1
    assert "default seed 1: FAILED (exit 1)" in capsys.readouterr().out
    summary = json.loads(out.read_text())["summary"]["default"]
    assert summary["seeds"] == [0, 2]
    assert summary["cwps"]["mean_top1"] == [90.0, 92.0]


def test_the_summary_takes_the_papers_param_ratio_and_the_sample_sd(tmp_path, monkeypatch):
    """param_ratio (without the heads, the paper's), not param_ratio_with_heads; spread as the
    sample standard deviation (n - 1): 1, 2, 3 give 2.00 +- 1.00."""
    def run(cmd, cwd=None, **kwargs):
        out = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("hydra.run.dir=")))
        out.mkdir(parents=True, exist_ok=True)
        methods = {"cwps": {"mean_top1": 1.0, "param_ratio": 1.3, "param_ratio_with_heads": 1.9,
                            "tasks": {"a": {"top1": 1.0}}}}
        (out / "results.json").write_text(results_json(methods))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sweep.subprocess, "run", run)
    out = tmp_path / "sweep.json"
    assert sweep.main(["--seeds", "0", "--keep-dir", str(tmp_path / "r"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["summary"]["default"]["cwps"]["param_ratio"] == [1.3]
    assert sweep.mean_sd([1.0, 2.0, 3.0]) == "2.00 +- 1.00"
    assert sweep.mean_sd([5.0]) == "5.00 +- 0.00" and sweep.mean_sd([]) == "-"


def test_a_finished_run_is_reused_only_when_asked(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sweep.subprocess, "run", fake_job(calls))
    keep = str(tmp_path / "runs")
    assert sweep.main(["--seeds", "0", "--keep-dir", keep]) == 0
    assert len(calls) == 1
    assert sweep.main(["--seeds", "0", "--keep-dir", keep]) == 0  # run again
    assert len(calls) == 2
    # (a kept run whose settings cannot be checked, without its store's manifest: not read)
    assert sweep.main(["--seeds", "0", "--keep-dir", keep, "--reuse"]) == 1
    out = capsys.readouterr().out
    assert "default seed 0: FAILED (not reused: " in out and "settings cannot be checked" in out
    keep_manifest(Path(keep) / "default_s0", ["seed=0"])
    assert sweep.main(["--seeds", "0", "--keep-dir", keep, "--reuse"]) == 0
    assert len(calls) == 2 and "reused" in capsys.readouterr().out
    # (a kept results.json cut short or edited: named, not a traceback)
    results = Path(keep) / "default_s0" / "results.json"
    results.write_text(results.read_text().replace("91.0", "true"))
    assert sweep.main(["--seeds", "0", "--keep-dir", keep, "--reuse"]) == 1
    assert "'methods.finetune.mean_top1' missing or of another type" in capsys.readouterr().out
    results.write_text(results.read_text()[:40])
    assert sweep.main(["--seeds", "0", "--keep-dir", keep, "--reuse"]) == 1
    assert "results.json: cannot read (" in capsys.readouterr().out
    assert len(calls) == 2


def test_a_kept_run_of_other_settings_is_not_reused(tmp_path, monkeypatch, capsys):
    """--reuse read a kept run's numbers under a setting it was not made with (the train
    command itself refuses such a run dir): the store's manifest is checked as train checks it."""
    from cwps_lightning.config import compose_config
    from cwps_lightning.persist import config_hash, result_config

    calls = []
    monkeypatch.setattr(sweep.subprocess, "run", fake_job(calls))
    keep = tmp_path / "runs"
    assert sweep.main(["--seeds", "0", "--keep-dir", str(keep), "--setting",
                       "a=cwps.threshold=0.5"]) == 0
    made = result_config(compose_config(["cwps.threshold=0.5", "seed=0"]))
    (keep / "a_s0" / "store").mkdir()
    (keep / "a_s0" / "store" / "manifest.json").write_text(json.dumps(
        {"run": {"config_hash": config_hash(made), "config": made}}))
    capsys.readouterr()
    assert sweep.main(["--seeds", "0", "--keep-dir", str(keep), "--reuse", "--setting",
                       "a=cwps.threshold=0.5"]) == 0
    assert "a seed 0: reused" in capsys.readouterr().out
    assert sweep.main(["--seeds", "0", "--keep-dir", str(keep), "--reuse", "--setting",
                       "a=cwps.threshold=0.3"]) == 1
    out = capsys.readouterr().out
    assert "a seed 0: FAILED (not reused: " in out and "cwps.threshold: 0.5 there, 0.3 now" in out
    assert len(calls) == 1
    # the pool's threads check their kept runs in turn (Hydra's compose is process-wide: two at
    # once ended the sweep in "GlobalHydra is already initialized")
    for seed in (1, 2, 3):
        assert sweep.main(["--seeds", str(seed), "--keep-dir", str(keep), "--setting",
                           "a=cwps.threshold=0.5"]) == 0
        made = result_config(compose_config(["cwps.threshold=0.5", f"seed={seed}"]))
        (keep / f"a_s{seed}" / "store").mkdir()
        (keep / f"a_s{seed}" / "store" / "manifest.json").write_text(json.dumps(
            {"run": {"config_hash": config_hash(made), "config": made}}))
    capsys.readouterr()
    assert sweep.main(["--seeds", "0", "1", "2", "3", "--parallel", "4", "--keep-dir", str(keep),
                       "--reuse", "--setting", "a=cwps.threshold=0.5"]) == 0
    assert capsys.readouterr().out.count(": reused ") == 4 and len(calls) == 4


def test_common_overrides_go_to_every_run_and_bad_arguments_are_refused(tmp_path, monkeypatch,
                                                                        capsys):
    import argparse

    import pytest

    calls = []
    monkeypatch.setattr(sweep.subprocess, "run", fake_job(calls))
    assert sweep.main(["--seeds", "0", "--keep-dir", str(tmp_path / "r"), "--common",
                       "trainer=gpu data.x=1", "--setting", "a=cwps.threshold=0.3",
                       "--setting", "b="]) == 0
    assert len(calls) == 2
    for cmd, _ in calls:
        assert "trainer=gpu" in cmd and "data.x=1" in cmd
    assert "cwps.threshold=0.3" in calls[0][0] and "cwps.threshold=0.3" not in calls[1][0]
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=OVERRIDES"):
        sweep.parse_setting("no_equals_sign")
    # one usage line and exit 2 each, before any run (an unbalanced quote in --common and a
    # --keep-dir that is a file ended in tracebacks)
    (tmp_path / "a_file").write_text("")
    for argv, needle in ((["--reuse"], "--reuse needs --keep-dir"),
                         (["--setting", "a=", "--setting", "a=x=1"], "must be unique"),
                         (["--common", 'seed="1'], "--common 'seed=\"1': No closing quotation"),
                         (["--setting", 'a=seed="1'], "argument --setting: 'seed=\"1': No "
                                                      "closing quotation"),
                         (["--keep-dir", str(tmp_path / "a_file")], "a_file: cannot be made a "
                                                                      "directory"),
                         (["--keep-dir", str(tmp_path / "a_file" / "sub")], "cannot be made")):
        with pytest.raises(SystemExit) as stop:
            sweep.main(argv)
        assert stop.value.code == 2 and needle in capsys.readouterr().err, argv
    assert len(calls) == 2


def test_a_settings_override_wins_over_a_common_one(tmp_path, monkeypatch):
    """Hydra takes the last of two values for one key: a setting (what the sweep varies) comes
    after --common (the base every run shares), so it is the one that counts."""
    calls = []
    monkeypatch.setattr(sweep.subprocess, "run", fake_job(calls))
    assert sweep.main(["--seeds", "0", "--keep-dir", str(tmp_path / "r"), "--common",
                       "cwps.threshold=0.5", "--setting", "low=cwps.threshold=0.3"]) == 0
    (cmd, _), = calls
    values = [a for a in cmd if a.startswith("cwps.threshold=")]
    assert values[-1] == "cwps.threshold=0.3"
