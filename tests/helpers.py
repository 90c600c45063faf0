"""Shared test helpers: one small test network and the one place tests build CWPSSettings."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


class Small(nn.Module):
    """conv(bias) -> bn -> conv(no bias, groups) -> pool -> linear -> head.

    Shareable layers conv1 (8 channels, kernel 3*3*3 + 1 = 28 parameters), conv2 (6 channels,
    grouped, no bias: 4*3*3 = 36) and fc (10 channels: 6 + 1 = 7); bn and head are the task's own.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, groups=2, bias=False)
        self.fc = nn.Linear(6, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = self.conv2(x).mean((2, 3))
        return self.head(torch.relu(self.fc(x)))


def indexed_images(n: int, seed: int, classes: int = 3) -> torch.utils.data.TensorDataset:
    """Random 6x6 images whose first pixel is their index (a batch says which images it holds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return torch.utils.data.TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


def synthetic_tasks(n_train: int = 45, batch_size: int = 8):
    """A MultiTaskDataModule with one task "t" of indexed_images (3 classes, Small's head)."""
    from cwps_lightning.data.base import MultiTaskDataModule, TaskSplits

    class SyntheticTasks(MultiTaskDataModule):
        default_tasks = ("t",)

        def build_tasks(self):
            return {"t": TaskSplits("t", 3, indexed_images(n_train, 0), indexed_images(10, 1),
                                    indexed_images(10, 2))}

    return SyntheticTasks(batch_size=batch_size)


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:  # a benchmark may import its neighbours
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cwps_conv_twins(stage: str):
    """Two CWPSConv2d(4 -> 6, 3x3, padding 1) with the same weights, random parents and random
    mask logits, both in ``stage``: one to keep, one for a benchmark to re-class."""
    from cwps_lightning.cwps import CWPSConv2d, set_stage

    torch.manual_seed(0)
    real = CWPSConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1))
    with torch.no_grad():
        real.set_parent(torch.randn_like(real.parent_weight), torch.randn_like(real.bias))
        real.mask_logits.normal_()
    twin = CWPSConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1))
    twin.load_state_dict(real.state_dict())
    for layer in (real, twin):
        set_stage(layer, stage)
    return real, twin


STAGE_KEYS = ("warmup_epochs", "soft_epochs", "hard_epochs", "lr_schedule")


def cwps_settings(**kwargs):
    """``CWPSSettings`` from flat keyword arguments, stage keys (``warmup_epochs``,
    ``soft_epochs``, ``hard_epochs``, ``lr_schedule``) included.

    The only place tests construct it: the stage keys go into ``stages=StageSettings(...)``
    where the settings have a nested ``stages`` field, and stay flat where they do not.
    """
    from cwps_lightning.settings import CWPSSettings

    if "stages" not in {f.name for f in dataclasses.fields(CWPSSettings)}:
        return CWPSSettings(**kwargs)
    stage_kwargs = {k: kwargs.pop(k) for k in STAGE_KEYS if k in kwargs}
    stages_type = type(CWPSSettings().stages)
    return CWPSSettings(stages=stages_type(**stage_kwargs), **kwargs)
