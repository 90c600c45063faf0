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
