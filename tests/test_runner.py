"""The task sequence (runner.py): methods are compared on common random numbers."""

from __future__ import annotations

import pytest
import timm
import torch

from cwps_lightning.data.digits import DigitsDataModule
from cwps_lightning.fitting import FitSettings
from cwps_lightning.runner import CWPSSettings, Progress, Runner

TRAINER = dict(
    accelerator="cpu", devices=1, enable_checkpointing=False, enable_model_summary=False,
    enable_progress_bar=False, num_sanity_val_steps=0,
)


def _runner(cwps: CWPSSettings, seed: int = 3, **loader) -> Runner:
    dm = DigitsDataModule(image_size=16, limit_per_task=96, tasks=["optdigits"], batch_size=16,
                          seed=0, **loader)
    torch.manual_seed(0)  # the same T0 for every runner
    t0 = timm.create_model("resnet18", pretrained=False, num_classes=10)
    # momentum 0: SGD keeps no state across fits, so a warm-up fit followed by a mask fit can
    # reproduce one fine-tuning fit of the same epochs step for step
    settings = FitSettings(trainer=TRAINER, lr=0.05, mask_lr=0.02, momentum=0.0)
    return Runner(dm, t0, settings, cwps, seed=seed)


def _max_weight_diff(a, b, task: str) -> float:
    layers_a, layers_b = a.bank.entries[task].layers, b.bank.entries[task].layers
    return max(float((layers_a[n].weight - layers_b[n].weight).abs().max()) for n in layers_a)


# the data loader settings the pairing must hold under: in-process, and persistent workers
# (which start one pass per loader, so a split into two fits must not shift the order)
LOADERS = {"in_process": {}, "persistent_workers": dict(num_workers=1, persistent_workers=True)}


@pytest.fixture(scope="module", params=list(LOADERS))
def loader(request):
    return request.param


@pytest.fixture(scope="module")
def finetuned(loader):
    cwps = CWPSSettings(threshold=0.0, warmup_epochs=1, soft_epochs=0, hard_epochs=2)
    return _runner(cwps, **LOADERS[loader]).run_baseline("finetune", Progress(1))


@pytest.mark.parametrize("warmup_epochs", [1, 0])
def test_cwps_without_sharing_reproduces_the_finetuning_run(finetuned, loader, warmup_epochs):
    """lambda = 0 keeps every channel task-specific; with no soft stage, CWPS is then the
    fine-tuning run cut in two fits (or, without a warm-up, in one): same head, same data
    order, same schedule."""
    cwps = CWPSSettings(threshold=0.0, warmup_epochs=warmup_epochs, soft_epochs=0,
                        hard_epochs=3 - warmup_epochs)
    torch.rand(7)  # what ran before must not matter: every fit seeds itself
    result = _runner(cwps, **LOADERS[loader]).run_cwps(Progress(2))
    assert result.tasks["optdigits"]["specific_channels"] == 1.0
    assert _max_weight_diff(result, finetuned, "optdigits") < 1e-4
    assert result.tasks["optdigits"]["top1"] == finetuned.tasks["optdigits"]["top1"]


def test_another_seed_gives_another_run(finetuned, loader):
    """The control for the test above: the weights do depend on the draw."""
    if loader != "in_process":
        pytest.skip("one control is enough")
    cwps = CWPSSettings(threshold=0.0, warmup_epochs=1, soft_epochs=0, hard_epochs=2)
    other = _runner(cwps, seed=4).run_cwps(Progress(2))
    assert _max_weight_diff(other, finetuned, "optdigits") > 1e-2
