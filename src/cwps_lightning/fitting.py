"""One Lightning fit, and plain top-1 evaluation: the two things the runner does to a model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader

from .callbacks import MaskStageCallback
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
    mode: str,
    epochs: int,
    settings: FitSettings,
    shareable: list[str],
    log_group: str,
    log_name: str,
    soft_epochs: int | None = None,
    seed: int = 0,
    lr: float | None = None,
    lr_window: tuple[float, float] = (0.0, 1.0),
    continue_order: bool = False,
) -> nn.Module:
    """Train ``model`` on ``task`` for ``epochs`` in ``mode`` (see select_trainable).

    With ``soft_epochs`` set, the CWPS layers run soft for that many epochs then hard.
    ``lr_window``: the part of one cosine schedule this fit covers (see CWPSLitModule).
    ``seed`` seeds every RNG and restarts the training data order; ``continue_order=True``
    keeps the order going from the previous fit instead, as if both fits were one run.
    Returns the model (trained in place, moved back to the CPU by Lightning's teardown).
    """
    if epochs <= 0:
        return model
    L.seed_everything(seed, workers=True, verbose=False)
    if not continue_order:
        datamodule.reseed_shuffle(seed)
    datamodule.use(task)
    select_trainable(model, mode, shareable)
    if settings.channels_last:  # NHWC convolutions: faster on CPU (oneDNN) and tensor cores
        model.to(memory_format=torch.channels_last)
    module = CWPSLitModule(
        model,
        num_classes=datamodule.num_classes(task),
        lr=settings.lr if lr is None else lr,
        mask_lr=settings.mask_lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        lr_window=lr_window,
    )
    callbacks = [] if soft_epochs is None else [MaskStageCallback(soft_epochs)]
    trainer_args = dict(settings.trainer)
    # model selection looks at the merged model only: by default validate once, at the end
    if trainer_args.get("check_val_every_n_epoch") is None:
        trainer_args["check_val_every_n_epoch"] = epochs
    trainer = L.Trainer(
        max_epochs=epochs,
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
