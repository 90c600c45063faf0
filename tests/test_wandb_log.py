"""W&B logging (wandb_log.py) against a stand-in ``wandb`` module: what each fit's run and the
job's summary run are made with, and that no run is left open. (The real W&B, offline, through
the CLI: tests/integration/test_wandb_offline.py.)"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import lightning.pytorch.loggers as pl_loggers
import pytest

from cwps_lightning import wandb_log
from cwps_lightning.config import compose_config
from cwps_lightning.settings import LoggerSettings


class FakeWandb:
    """The parts of ``wandb`` wandb_log.py uses; every call is recorded in ``events``."""

    def __init__(self):
        self.events: list[tuple] = []
        self.runs: list[FakeRun] = []
        module = types.ModuleType("wandb")
        module.run = None
        module.finish = self.finish
        module.init = self.init
        module.Table = FakeTable
        module.Image = lambda path: ("image", path)
        module.Artifact = FakeArtifact
        self.module = module

    def open(self):
        self.module.run = "a run left open"

    def finish(self, exit_code=None):
        self.events.append(("finish", self.module.run))
        self.module.run = None

    def init(self, **kwargs):
        run = FakeRun(self, f"id{len(self.runs)}", kwargs)
        self.runs.append(run)
        self.events.append(("init", kwargs["name"]))
        self.module.run = run
        return run


class FakeRun:
    def __init__(self, wandb, run_id, init):
        self.wandb, self.id, self.init = wandb, run_id, init
        self.logged, self.summary, self.artifacts, self.finished = [], {}, [], False

    def log(self, data):
        self.logged.append(data)

    def log_artifact(self, artifact):
        self.artifacts.append(artifact)

    def finish(self):
        self.finished = True
        self.wandb.module.run = None


class FakeTable:
    def __init__(self, columns):
        self.columns, self.rows = columns, []

    def add_data(self, *row):
        self.rows.append(list(row))


class FakeArtifact:
    def __init__(self, name, type):
        self.name, self.type, self.dirs = name, type, []

    def add_dir(self, path):
        self.dirs.append(path)


@pytest.fixture
def wandb(monkeypatch) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module)
    return fake


def job_config(*overrides: str):
    """The config a job gets (Hydra's own node taken out, as Hydra gives it to the task)."""
    from omegaconf import open_dict

    cfg = compose_config(list(overrides))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def settings(**kwargs) -> LoggerSettings:
    return LoggerSettings(kind="wandb", **kwargs)


def results(figures=("figures/accuracy.png", "figures/sharing.png")) -> dict:
    return {
        "tasks": ["optdigits", "mnist_m"],
        "methods": {
            "cwps": {"label": "CWPS", "param_ratio": 1.25, "param_ratio_with_heads": 1.5,
                     "tasks": {"optdigits": {"top1": 90.0}, "mnist_m": {"top1": 70.0}},
                     "mean_top1": 80.0},
            "frozen": {"param_ratio": 1.0, "param_ratio_with_heads": 1.125,
                       "tasks": {"optdigits": {"top1": 60.0}}, "mean_top1": 60.0},
        },
        "figures": list(figures),
    }


def test_close_run_finishes_an_open_run_only(wandb):
    wandb_log.close_run()
    assert wandb.events == []
    wandb.open()
    wandb_log.close_run()
    assert wandb.events == [("finish", "a run left open")] and wandb.module.run is None


def test_each_fit_gets_its_own_run_in_the_jobs_group(wandb, monkeypatch, tmp_path):
    """The run of the fit before is finished first (Lightning would log into it); the run is
    named <method>/<fit>, its job type the method, in the group of the job's run dir."""
    made = []

    class Logger:
        def __init__(self, **kwargs):
            made.append((kwargs, wandb.module.run))

    monkeypatch.setattr(pl_loggers, "WandbLogger", Logger)
    cfg = job_config("logger=wandb", "seed=7")
    run_dir = tmp_path / "multirun" / "3"
    make = wandb_log.wandb_logger_factory(
        cfg, settings(project="p", entity="team", mode="offline", tags=["a", "b"]), run_dir)
    wandb.open()
    make("cwps", "optdigits-it0-mask")
    (kwargs, open_run), = made
    assert open_run is None  # the open run was finished before the logger was made
    assert kwargs["name"] == "cwps/optdigits-it0-mask" and kwargs["job_type"] == "cwps"
    assert kwargs["group"] == "multirun/3"
    assert (kwargs["project"], kwargs["entity"], kwargs["mode"], kwargs["tags"]) == (
        "p", "team", "offline", ["a", "b"])
    assert Path(kwargs["save_dir"]) == run_dir
    assert kwargs["config"]["seed"] == 7
    assert kwargs["config"]["paths"]["cache_dir"] == str(cfg.paths.cache_dir)  # resolved
    wandb_log.wandb_logger_factory(cfg, settings(group="mine"), run_dir)("frozen", "mnist_m")
    assert made[-1][0]["group"] == "mine"


def test_the_summary_run_holds_the_table_figures_and_means(wandb, tmp_path):
    wandb.open()
    wandb_log.log_job_summary(job_config(), settings(project="p"), tmp_path / "runs" / "r",
                              results(), tmp_path / "store")
    assert wandb.events[:2] == [("finish", "a run left open"), ("init", "summary")]
    run, = wandb.runs
    assert run.init["job_type"] == "summary" and run.init["group"] == "runs/r"
    assert run.init["project"] == "p"
    logged, = run.logged
    table = logged.pop("results")
    assert table.columns == ["method", "param_ratio", "param_ratio_with_heads", "optdigits",
                             "mnist_m", "mean_top1"]
    assert table.rows == [["CWPS", 1.25, 1.5, 90.0, 70.0, 80.0],
                          ["frozen", 1.0, 1.125, 60.0, None, 60.0]]  # (a task it lacks)
    assert logged == {
        "figures/accuracy": ("image", str(tmp_path / "runs" / "r" / "figures/accuracy.png")),
        "figures/sharing": ("image", str(tmp_path / "runs" / "r" / "figures/sharing.png"))}
    assert run.summary == {"cwps/mean_top1": 80.0, "frozen/mean_top1": 60.0}
    assert run.artifacts == [] and run.finished  # (logger.log_store=false)


def test_the_store_is_an_artifact_only_with_log_store_and_a_store(wandb, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for log_store, store_dir, logged in ((False, store, False), (True, tmp_path / "none", False),
                                         (True, store, True)):
        wandb_log.log_job_summary(job_config(), settings(log_store=log_store), tmp_path,
                                  results(figures=()), store_dir)
        run = wandb.runs[-1]
        assert run.finished
        if logged:
            artifact, = run.artifacts
            assert (artifact.type, artifact.dirs) == ("cwps-store", [str(store)])
            assert artifact.name == f"store-{run.id}"
        else:
            assert run.artifacts == []


def test_a_failing_summary_still_finishes_its_run(wandb, tmp_path):
    bad = results()
    del bad["methods"]["frozen"]["mean_top1"]
    with pytest.raises(KeyError):
        wandb_log.log_job_summary(job_config(), settings(), tmp_path, bad, None)
    assert wandb.runs[-1].finished and wandb.module.run is None
