"""fitting.fit stops a diverged fit with TrainingDiverged, whether the loss shows it or only
the weights do."""

from __future__ import annotations

import pytest
import torch

from cwps_lightning.fitting import FitSettings, TrainingDiverged, fit
from cwps_lightning.methods.base import FitPlan
from cwps_lightning.models import lit_module

from .helpers import Small, synthetic_tasks

TRAINER = dict(accelerator="cpu", devices=1, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False)


def _fit(net):
    fit(net, synthetic_tasks(n_train=24, batch_size=8), "t",
        FitPlan(1, seed=0, train="finetune"), FitSettings(trainer=TRAINER), [], "g", "t")


def test_a_fit_that_trains_finite_weights_returns_them():
    torch.manual_seed(0)
    net = Small()
    _fit(net)
    assert all(bool(torch.isfinite(t).all()) for t in net.state_dict().values()
               if t.is_floating_point())


def test_a_nan_loss_stops_the_fit_at_its_step(monkeypatch):
    torch.manual_seed(0)
    step = lit_module.CWPSLitModule._step

    def nan_at_step_one(self, batch, metric, prefix):
        loss = step(self, batch, metric, prefix)
        return loss * float("nan") if self.global_step == 1 else loss

    monkeypatch.setattr(lit_module.CWPSLitModule, "_step", nan_at_step_one)
    with pytest.raises(TrainingDiverged, match=r"task 't', fit g/t: .*loss is nan.*step 1"):
        _fit(Small())


def test_finite_losses_but_nan_statistics_stop_the_fit(monkeypatch):
    """lr=1e6 with one step per epoch does this: the step's loss is finite, the BatchNorm
    statistics it leaves are not."""
    torch.manual_seed(0)

    def poison(self):
        self.model.bn.running_var.fill_(float("inf"))

    monkeypatch.setattr(lit_module.CWPSLitModule, "on_train_end", poison, raising=False)
    with pytest.raises(TrainingDiverged, match=r"fit g/t: the fit ended with nan/inf in "
                                               r"bn\.running_var \(1 tensor"):
        _fit(Small())
