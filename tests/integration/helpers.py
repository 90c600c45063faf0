"""Helpers to run the real CLI in a subprocess with tiny settings, and to compose its config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


# -- counting by hand: what a run's accounting and accuracies must come to ---------------------
def own_param_names(model) -> set[str]:
    """A task's own parameters: those outside the Conv2d/Linear layers, and the classifier's."""
    from torch import nn

    head = {id(p) for p in model.get_classifier().parameters()}
    names = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not isinstance(module, (nn.Conv2d, nn.Linear)) or id(p) in head:
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def model_param_counts(name: str, num_classes: int, kwargs: dict | None = None) -> dict:
    """Parameters of a fresh timm model: all of them, the backbone's (all but the classifier)
    and the task's own (see own_param_names)."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **(kwargs or {}))
    params = dict(model.named_parameters())
    head = sum(p.numel() for p in model.get_classifier().parameters())
    full = sum(p.numel() for p in params.values())
    return {"full": full, "backbone": full - head,
            "own": sum(params[n].numel() for n in own_param_names(model))}


def store_tensors(store_dir: Path) -> tuple[dict, dict, dict]:
    """The manifest and the raw kernel and task tensors of a store, read without the project."""
    from safetensors.torch import load_file

    manifest = json.loads((store_dir / "manifest.json").read_text())
    kernels = load_file(str(store_dir / manifest["files"]["kernels"]["file"]))
    tasks = load_file(str(store_dir / manifest["files"]["tasks"]["file"]))
    return manifest, kernels, tasks


def count_store_params(store_dir: Path, model_name: str, kwargs: dict | None = None) -> int:
    """Parameters a store holds, counted from its tensors: every row of every kernel table
    (each a distinct kernel, so no row may go unused) plus each task's own parameters."""
    import timm
    import torch

    manifest, kernels, tasks = store_tensors(store_dir)
    for layer in manifest["layers"]:
        used = torch.cat([tasks[f"{t}/index/{layer}"] for t in manifest["task_order"]])
        assert torch.unique(used).numel() == kernels[f"{layer}.weight"].shape[0], layer
    total = sum(t.numel() for t in kernels.values())
    for task in manifest["task_order"]:
        model = timm.create_model(model_name, pretrained=False, **(kwargs or {}),
                                  num_classes=manifest["tasks"][task]["num_classes"])
        total += sum(tasks[f"{task}/rest/{n}"].numel() for n in own_param_names(model))
    return total


def count_test_top1(model, datamodule, task: str) -> float:
    """Top-1 (%) of ``model`` on ``task``'s test split, counted image by image."""
    import torch

    datamodule.use(task)
    correct = seen = 0
    model.eval()
    with torch.no_grad():
        for x, y in datamodule.test_dataloader():
            correct += int((model(x).argmax(dim=1) == y).sum())
            seen += len(y)
    return 100.0 * correct / seen
