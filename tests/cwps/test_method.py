"""CWPSMethod's visit: what it reports of the channels it shares (the fits stubbed out)."""

from __future__ import annotations

import copy

import pytest
import torch

from cwps_lightning.cwps import KernelBank, set_stage
from cwps_lightning.cwps.method import CWPSMethod

from ..helpers import Small, cwps_settings

LAYERS = ["conv1", "conv2", "fc"]


class _NoFitHarness:
    """A runner harness whose fits train nothing (CWPSMethod.train on T0's own weights)."""

    def __init__(self, t0):
        self.t0 = t0

    def seed(self, task, phase, iteration=0):
        return 0

    def new_model(self, task, iteration=0):
        return copy.deepcopy(self.t0)

    def fit(self, model, task, plan, name):
        if name.endswith("-mask"):  # the mask fit: conv1's channel 0 turns task-specific
            set_stage(model, "soft")
            with torch.no_grad():
                model.conv1.mask_logits[0] = 6.0
            set_stage(model, "hard")
        return model

    def reseed_shuffle(self, seed):
        pass

    def step(self, message):
        pass


def test_a_visit_reports_every_shared_channel_under_its_parent_task():
    """Nothing trained: every channel is T0's kernel and shared but conv1's channel 0, kernel
    id 0 of conv2 and fc included; info counts them and the task-specific share."""
    t0 = Small().eval()
    bank = KernelBank(LAYERS)
    bank.add("T0", t0, num_classes=3)
    trained = CWPSMethod(cwps_settings()).train("a", 0, bank, _NoFitHarness(t0))
    for name, ids in trained.kernel_ids.items():
        want = bank.entries["T0"].layers[name].ids.clone()
        if name == "conv1":
            want[0] = -1
        assert torch.equal(ids, want), name
    assert trained.info["shared_from"] == {"T0": 8 + 6 + 10 - 1}
    assert trained.info["specific_channels"] == pytest.approx(1 / 24)
    assert trained.info["specific_params"] == pytest.approx(28 / (8 * 28 + 6 * 36 + 10 * 7))
