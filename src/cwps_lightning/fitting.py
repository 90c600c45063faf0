"""One Lightning fit, and plain top-1 evaluation: the two things the runner does to a model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader

from .callbacks import MaskStageCallback
from .methods.base import FitPlan
from .models.lit_module import CWPSLitModule, select_trainable
from .settings import OptimSettings

log = logging.getLogger(__name__)


class FitSettings:
    """Optimiser and Trainer settings shared by every fit of a run."""

    def __init__(
        self,
        trainer: Mapping[str, Any],
        lr: float = OptimSettings.lr,
        mask_lr: float = OptimSettings.mask_lr,
        momentum: float = OptimSettings.momentum,
        weight_decay: float = OptimSettings.weight_decay,
        logger_factory: Callable[[str, str], Logger | bool] | None = None,
        channels_last: bool = False,
    ):
        self.trainer = dict(trainer)
        self.lr, self.mask_lr = lr, mask_lr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.logger_factory = logger_factory or (lambda group, name: False)
        self.channels_last = channels_last


def csv_logger_factory(save_dir: str | Path) -> Callable[[str, str], Logger]:
    """A CSV logger per fit: <save_dir>/<group>/<name>/metrics.csv."""

    def make(group: str, name: str) -> Logger:
        return CSVLogger(save_dir=str(save_dir), name=group, version=name)

    return make


def fit(
    model: nn.Module,
    datamodule,
    task: str,
    plan: FitPlan,
    settings: FitSettings,
    shareable: list[str],
    log_group: str,
    log_name: str,
) -> nn.Module:
    """Train ``model`` on ``task`` as ``plan`` says (epochs, what trains, optimiser, stages).

    ``plan.seed`` seeds every RNG and restarts the training data order; with
    ``plan.continue_order`` the order goes on from the previous fit instead, as if both fits
    were one run. Returns the model (trained in place, moved back to the CPU by Lightning's
    teardown).
    """
    if plan.epochs <= 0:
        return model
    L.seed_everything(plan.seed, workers=True, verbose=False)
    if not plan.continue_order:
        datamodule.reseed_shuffle(plan.seed)
    datamodule.use(task)
    select_trainable(model, plan.train, shareable)
    if settings.channels_last:  # NHWC convolutions: faster on CPU (oneDNN) and tensor cores
        model.to(memory_format=torch.channels_last)
    module = CWPSLitModule(
        model,
        num_classes=datamodule.num_classes(task),
        lr=settings.lr,
        mask_lr=settings.mask_lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        lr_window=plan.lr_window,
        optimizer=replace(plan.optimizer, groups={"mask_logits": settings.mask_lr,
                                                  **plan.optimizer.groups}),
        penalty=plan.penalty,
        penalty_weight=plan.penalty_weight,
        penalty_from_epoch=plan.penalty_from_epoch,
        frozen_norms=plan.frozen_norms,
    )
    callbacks = [] if plan.soft_epochs is None else [MaskStageCallback(plan.soft_epochs)]
    trainer_args = dict(settings.trainer)
    # model selection looks at the merged model only: by default validate once, at the end
    if trainer_args.get("check_val_every_n_epoch") is None:
        trainer_args["check_val_every_n_epoch"] = plan.epochs
    trainer = L.Trainer(
        max_epochs=plan.epochs,
        callbacks=callbacks,
        logger=settings.logger_factory(log_group, log_name),
        **trainer_args,
    )
    trainer.fit(module, datamodule=datamodule)
    return model


def eval_device(accelerator: str = "auto") -> torch.device:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@torch.no_grad()
def evaluate_top1(model: nn.Module, loader: DataLoader, device: torch.device | str) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode) over ``loader``."""
    was_training = model.training
    model.eval().to(device)
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += y.numel()
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluate_top1: the loader is empty")
    return 100.0 * correct / total
