"""One Lightning fit, and plain top-1 evaluation: the two things the runner does to a model."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import distributed
from .callbacks import MaskStageCallback
from .methods.base import FitPlan
from .models.lit_module import CWPSLitModule, NonFiniteLoss, select_trainable
from .settings import OptimSettings

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A fit met a non-finite loss: the run stops; the store keeps the tasks finished before."""


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
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "plugins" not in trainer_args:
        # submitit requeues a preempted job (hydra/launcher=slurm) and the run resumes from
        # its store; Lightning's own SIGUSR1 requeue would requeue it a second time
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        trainer_args["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    trainer = L.Trainer(
        max_epochs=plan.epochs,
        callbacks=callbacks,
        logger=settings.logger_factory(log_group, log_name),
        **trainer_args,
    )
    what = f"task {task!r}, fit {log_group}/{log_name}"
    try:
        trainer.fit(module, datamodule=datamodule)
    except NonFiniteLoss as err:
        raise TrainingDiverged(f"{what}: {err}") from None
    # every rank leaves the fit with rank 0's weights, or the run stops here
    distributed.sync_buffers(model)
    distributed.check_same_weights(model, what)
    return model


def eval_device(accelerator: str = "auto", devices=1) -> torch.device:
    """This rank's device for evaluation and CPMS (distributed.local_device)."""
    return distributed.local_device(accelerator, devices)


def _shard(loader: DataLoader) -> DataLoader:
    """This rank's part of an evaluation loader (the loader itself on one process)."""
    if not distributed.active():
        return loader
    part = Subset(loader.dataset, distributed.shard_indices(len(loader.dataset)))
    return DataLoader(part, batch_size=loader.batch_size, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


@torch.no_grad()
def evaluate_top1(model: nn.Module, loader: DataLoader, device: torch.device | str) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode) over ``loader``.

    Under DDP each rank counts its shard and the counts are summed, so every rank returns the
    same number, computed once over the whole set."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    correct = total = 0
    for x, y in _shard(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += y.numel()
    model.train(was_training)
    correct, total = distributed.all_reduce_sum([correct, total], device)
    if total == 0:
        raise ValueError("evaluate_top1: the loader is empty")
    return 100.0 * correct / total
