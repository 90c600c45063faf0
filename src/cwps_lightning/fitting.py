"""One Lightning fit, and plain top-1 evaluation: the two things the runner does to a model."""

from __future__ import annotations

import csv
import io
import logging
import os
import pickle
import shutil
import signal
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import distributed
from .callbacks import MaskStageCallback, SigtermAtNextBatch
from .cwps.store import atomic_write
from .cwps.surgery import nonfinite_tensors
from .errors import STORE_KEEPS, ConfigError
from .methods.base import FitPlan
from .models.lit_module import CWPSLitModule, NonFiniteLoss, select_trainable
from .settings import OptimSettings
from .timing import Stopwatch

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A fit met a non-finite loss: the run stops; the store keeps the tasks finished before.
    ``status``: the run's exit status."""

    status = 3


#: Lightning's warning that a fit's checkpoint folder is not empty, which a resumed fit's is
RESUMED_DIRECTORY_WARNING = r"Checkpoint directory .* exists and is not empty"
#: torch's error for batch norm given one value per channel in training mode
ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel when training"


class RunInterrupted(RuntimeError):
    """A signal stopped a fit: SIGTERM (every rank at the same batch) or SIGINT (Ctrl-C). The
    run stops; the store keeps the tasks finished before, and the same command resumes it.
    ``status``: the exit status a shell gives a process the signal ended (128 + its number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.status = 128 + signum


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
        checkpoint_dir: str | Path | None = None,
        stopwatch: Stopwatch | None = None,
        compile_mode: str | None = None,
    ):
        self.trainer = dict(trainer)
        self.lr, self.mask_lr = lr, mask_lr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.logger_factory = logger_factory or (lambda group, name: False)
        self.channels_last = channels_last
        #: epoch checkpoints of every fit go to <checkpoint_dir>/<group>/<fit>/last.ckpt, and a
        #: fit that finds one there continues from it (None: no checkpoints)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.stopwatch = stopwatch or Stopwatch()
        #: torch.compile mode of every fit's training forward (None: eager)
        self.compile_mode = compile_mode

    def fit_checkpoint_dir(self, group: str, name: str) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / group / name

    def drop_checkpoints(self, group: str, names: Callable[[str], bool]) -> None:
        """Delete the checkpoints of ``group``'s fits whose name ``names`` accepts (a stored
        task needs them no more). Rank 0 only: it wrote them."""
        if self.checkpoint_dir is None or distributed.rank() != 0:
            return
        root = self.checkpoint_dir / group
        for fit_dir in (root.iterdir() if root.is_dir() else []):
            if names(fit_dir.name):
                shutil.rmtree(fit_dir, ignore_errors=True)


class _ResumedMetricsWriter(ExperimentWriter):
    """Lightning's CSV writer, except that it keeps the rows of the epochs a resumed fit's
    checkpoint holds (epoch <= ``through_epoch``) where Lightning's deletes the whole file."""

    def __init__(self, log_dir: str, through_epoch: int):
        self.through_epoch = through_epoch
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        try:
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                # save() appends its rows in the order of metrics_keys: the file's header is
                # written in that same order (Lightning's is sorted already)
                keys = sorted(reader.fieldnames or [])
                # (a row of the epoch the fit was stopped in is logged again when it reruns it)
                rows = [row for row in reader if (row.get("epoch") or "").strip() and
                        int(float(row["epoch"])) <= self.through_epoch]
        except (UnicodeDecodeError, csv.Error, ValueError, TypeError) as err:
            # (damaged: the resumed fit goes on, and its earlier epochs' rows are lost)
            log.warning("%s: unreadable (%s: %s); it starts again with the resumed epochs",
                        self.metrics_file_path, type(err).__name__, err)
            self._fs.rm(self.metrics_file_path)
            return
        self.metrics_keys = keys
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.metrics_file_path, text.getvalue().encode())  # (never half a file)


class FitCSVLogger(CSVLogger):
    """Lightning's CSVLogger; a fit that continues from its checkpoint keeps the metrics of
    the epochs before it (resume_through), where Lightning's would delete them."""

    through_epoch: int | None = None

    def resume_through(self, epoch: int) -> None:
        """The fit continues after ``epoch`` (its checkpoint's): rows up to it stay."""
        self.through_epoch = epoch

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.through_epoch is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedMetricsWriter(self.log_dir, self.through_epoch)
        return super().experiment


def csv_logger_factory(save_dir: str | Path) -> Callable[[str, str], Logger]:
    """A CSV logger per fit: <save_dir>/<group>/<name>/metrics.csv."""

    def make(group: str, name: str) -> Logger:
        return FitCSVLogger(save_dir=str(save_dir), name=group, version=name)

    return make


def _checkpoint_epoch(path: str) -> int | None:
    """The epoch a Lightning checkpoint was saved at the end of (read without its tensors);
    None, said, where the file cannot be read (cut short by a full disk or a copy): the fit
    then starts from its beginning, as without one (its next epoch's end overwrites it)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["epoch"])
    except (RuntimeError, EOFError, OSError, KeyError, TypeError, ValueError,
            pickle.UnpicklingError) as err:
        log.warning("%s: unreadable (%s: %s); this fit starts from its beginning", path,
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None


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
                                                  **plan.optimizer.groups},
                          group_keys={**mask_lr_key(model), **plan.optimizer.group_keys}),
        penalty=plan.penalty,
        penalty_weight=plan.penalty_weight,
        penalty_from_epoch=plan.penalty_from_epoch,
        frozen_norms=plan.frozen_norms,
        compile_mode=settings.compile_mode,
    )
    sigterm = SigtermAtNextBatch()
    callbacks: list[L.Callback] = [sigterm]
    if plan.soft_epochs is not None:
        callbacks.append(MaskStageCallback(plan.soft_epochs))
    trainer_args = dict(settings.trainer)
    # model selection looks at the merged model only: by default validate once, at the end
    if trainer_args.get("check_val_every_n_epoch") is None:
        trainer_args["check_val_every_n_epoch"] = plan.epochs
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "plugins" not in trainer_args:
        # submitit requeues a preempted job (hydra/launcher=slurm) and the run resumes from
        # its store; Lightning's own SIGUSR1 requeue would requeue it a second time
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        trainer_args["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    resume_from = None
    fit_dir = settings.fit_checkpoint_dir(log_group, log_name)
    if fit_dir is not None:
        # every epoch's end: last.ckpt only (weights, optimiser, schedule, epoch), overwritten.
        # A top-1 checkpoint without a monitor is the latest one; save_last with save_top_k=0
        # saves nothing between epochs since Lightning 2.6 (last only follows a saved top-k).
        callbacks.append(ModelCheckpoint(dirpath=fit_dir, filename="last", save_top_k=1,
                                         every_n_epochs=1, save_on_train_epoch_end=True,
                                         enable_version_counter=False))
        if (fit_dir / "last.ckpt").is_file():
            resume_from = str(fit_dir / "last.ckpt")
            log.info("%s/%s: continuing from %s", log_group, log_name, resume_from)
    resumed_epoch = None if resume_from is None else _checkpoint_epoch(resume_from)
    if resumed_epoch is None:
        resume_from = None
    datamodule.start_at_epoch(0 if resumed_epoch is None else resumed_epoch + 1)
    with settings.stopwatch.timed("trainer_construction"):
        logger = settings.logger_factory(log_group, log_name)
        if resumed_epoch is not None and isinstance(logger, FitCSVLogger):
            logger.resume_through(resumed_epoch)
        trainer = L.Trainer(
            max_epochs=plan.epochs,
            callbacks=callbacks,
            logger=logger,
            **trainer_args,
        )
    what = f"task {task!r}, fit {log_group}/{log_name}"
    try:
        with settings.stopwatch.timed("training"), warnings.catch_warnings():
            if resume_from is not None:  # (the folder holds the checkpoint it resumes from)
                warnings.filterwarnings("ignore", message=RESUMED_DIRECTORY_WARNING)
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except NonFiniteLoss as err:
        raise TrainingDiverged(f"{what}: {err}") from None
    except ValueError as err:
        if ONE_VALUE_PER_CHANNEL not in str(err):
            raise
        # a batch of one image, where the backbone's feature map is 1x1: batch norm has one
        # value per channel (data.batch_size=1, or a task of one training image per rank)
        raise ConfigError(
            f"{what}: a training batch of one image at a 1x1 feature map leaves batch norm one "
            f"value per channel (torch: '{ONE_VALUE_PER_CHANNEL}'); set data.batch_size >= 2 "
            f"(it is {getattr(datamodule, 'batch_size', '?')}) and give each task at least "
            f"2 training images per rank") from None
    except SIGTERMException:
        raise RunInterrupted(_stopped_by(what, "SIGTERM", trainer), signal.SIGTERM) from None
    except SystemExit as stop:
        # Lightning ends a fit that Ctrl-C interrupted with sys.exit(1) while it handles the
        # KeyboardInterrupt (its context), and says so at INFO only
        if not isinstance(stop.__context__, KeyboardInterrupt):
            raise
        raise RunInterrupted(_stopped_by(what, "Ctrl-C (SIGINT)", trainer),
                             signal.SIGINT) from None
    # a SIGTERM after the last training batch (in the last validation, a checkpoint save, the
    # teardown) was recorded, but no batch end was left to act on it: the run stops here, on
    # every rank, rather than going on as if none came
    late = int(sigterm.signalled or bool(getattr(trainer, "received_sigterm", False)))
    if distributed.all_reduce_sum([late], trainer.strategy.root_device)[0]:
        raise RunInterrupted(f"{what}: stopped by SIGTERM at the end of the fit; "
                             f"{STORE_KEEPS}: the same command resumes the run", signal.SIGTERM)
    datamodule.epochs_trained(plan.epochs)
    datamodule.start_at_epoch(0)
    # every rank leaves the fit with rank 0's weights, or the run stops here
    distributed.sync_buffers(model)
    distributed.check_same_weights(model, what)
    # a loss can stay finite while the weights or BatchNorm statistics overflow (a huge
    # learning rate, one step per epoch): the same stop as a non-finite loss, on every rank
    bad = nonfinite_tensors(model)
    if bad:
        raise TrainingDiverged(f"{what}: the fit ended with nan/inf in {bad[0]} ({len(bad)} "
                               f"tensor(s) in all; lower {plan.optimizer.lr_hint}, or check the "
                               f"data); "
                               f"{STORE_KEEPS}")
    return model


def mask_lr_key(model: nn.Module) -> dict[str, str]:
    """optim.mask_lr, for a diverged fit's message, where the fit trains mask logits."""
    trains = any(p.requires_grad for n, p in model.named_parameters()
                 if n.endswith("mask_logits"))
    return {"mask_logits": "optim.mask_lr"} if trains else {}


def _stopped_by(what: str, signal_name: str, trainer: L.Trainer) -> str:
    return (f"{what}: stopped by {signal_name} at epoch {trainer.current_epoch} (counted from "
            f"0); {STORE_KEEPS}: the same command resumes the run")


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
