"""Helpers to run the real CLI in a subprocess with tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# a tiny but complete run: 3 tasks, every phase, 1 epoch each, a few dozen images per task
TINY = [
    "data.limit_per_task=48",
    "data.batch_size=16",
    "t0.epochs=1",
    "cwps.stages.warmup_epochs=1",
    "cwps.stages.soft_epochs=1",
    "cwps.stages.hard_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]


def cli_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HYDRA_FULL_ERROR="0", WANDB_MODE="disabled")
    return env


def train_cmd(run_dir: Path, *overrides: str, cache: Path | None = None) -> list[str]:
    return [
        sys.executable, "-m", "cwps_lightning.train",
        *TINY,
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache or run_dir.parent / 'cache'}",
        *overrides,
    ]


def run_train(run_dir: Path, *overrides: str, cache: Path | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(run_dir, *overrides, cache=cache), cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=timeout)


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="session")
def t0_cache(tmp_path_factory) -> Path:
    """One T0 cache for the session: the tiny T0 is pretrained once."""
    return tmp_path_factory.mktemp("t0-cache")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def compose_run_config(run_dir: Path, *overrides: str):
    """The config `python -m cwps_lightning.train` would run, composed in-process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(REPO)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
