"""The LightningModule around a (possibly CWPS-injected) backbone."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.classification import MulticlassAccuracy

from .. import distributed
from ..cwps import cwps_layers
from ..cwps.freeze import SharedChannelFreeze
from ..cwps.step_compose import StepComposeSGD, trained_tensors
from ..errors import STORE_KEEPS
from ..methods.base import OptimizerPlan
from ..optim import make_sgd
from ..settings import OptimSettings

#: which parameters a fit trains
TRAIN_MODES = ("finetune", "cwps", "frozen")
#: where a checkpoint keeps the shared-channel freeze's decisions (cwps/freeze.py)
FREEZE_STATE_KEY = "cwps_shared_channel_freeze"


def _shareable_param_ids(model: nn.Module, layer_names: list[str]) -> set[int]:
    ids = set()
    for name in layer_names:
        module = model.get_submodule(name)
        ids.update(id(p) for p in module.parameters(recurse=False) if p is not None)
    return ids


def select_trainable(model: nn.Module, mode: str | Callable[[nn.Module], None],
                     shareable: list[str]) -> None:
    """Set requires_grad for ``mode``, once, before the Trainer (and DDP) see the module.

    finetune: every parameter but mask logits;  cwps: every parameter;
    frozen: only parameters outside the shareable layers (normalisation layers, head);
    a function: it sets requires_grad on the model itself (a method's own choice).
    """
    if callable(mode):
        mode(model)
        return
    if mode not in TRAIN_MODES:
        raise ValueError(f"train mode must be one of {TRAIN_MODES}, got {mode!r}")
    shared_ids = _shareable_param_ids(model, shareable)
    for name, p in model.named_parameters():
        if name.endswith("mask_logits"):
            p.requires_grad_(mode == "cwps")
        elif mode == "frozen":
            p.requires_grad_(id(p) not in shared_ids)
        else:
            p.requires_grad_(True)


class NonFiniteLoss(FloatingPointError):
    """The loss of a training step is nan or inf (on any rank: all ranks raise together)."""


def check_lr_window(window) -> tuple[float, float]:
    start, end = (float(v) for v in window)
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"lr_window must satisfy 0 <= start < end <= 1, got {window}")
    return start, end


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _NormBase | nn.GroupNorm | nn.LayerNorm)]


def step_compose_refusal(gradient_clip_val, precision) -> str | None:
    """Why cwps.compose=step cannot train under these Trainer settings (None: it can):
    gradient clipping, or float16 mixed precision (``precision`` as the Trainer runs it: on the
    CPU Lightning runs "16-mixed" as bf16-mixed, which the step handles). The module refuses
    them when it makes the optimiser; checks.check_config before the job starts."""
    if gradient_clip_val:
        return (f"trainer.gradient_clip_val={gradient_clip_val}: cwps.compose=step does not "
                "clip gradients (the composed weights' gradients are not the optimiser's); use "
                "cwps.compose=forward or gradient_clip_val=null")
    if str(precision) in ("16-mixed", "16"):
        return (f"trainer.precision={precision}: cwps.compose=step does not run under "
                f"trainer.precision={precision} on a GPU (its gradient scaler does not reach "
                "the composed weights' gradients); use bf16-mixed or 32-true, or "
                "cwps.compose=forward")
    return None


class CWPSLitModule(L.LightningModule):
    """Cross-entropy classification with top-1 metrics; SGD (or the plan's optimiser) + cosine;
    mask logits in their own parameter group (own learning rate, no weight decay).

    ``optimizer``: a method's OptimizerPlan (kind, lr, weight decay, own groups); its None fields
    take the arguments above. ``penalty``: a term added to the loss, times ``penalty_weight``,
    from epoch ``penalty_from_epoch`` on. ``frozen_norms``: normalisation layers stay in eval
    mode (running statistics kept) while the model trains.

    ``lr_window`` is the part of one cosine schedule (0 = its start at ``lr``, 1 = its end at 0)
    that this fit covers: a CWPS task's warm-up fit and mask fit take consecutive windows of one
    schedule, the same schedule a fine-tuning run of all their epochs follows.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = OptimSettings.lr,
        mask_lr: float = OptimSettings.mask_lr,
        momentum: float = OptimSettings.momentum,
        weight_decay: float = OptimSettings.weight_decay,
        label_smoothing: float = 0.0,
        lr_window: tuple[float, float] = (0.0, 1.0),
        optimizer: OptimizerPlan | None = None,
        penalty: Callable[[nn.Module], Tensor] | None = None,
        penalty_weight: float = 0.0,
        penalty_from_epoch: int = 0,
        frozen_norms: bool = False,
        compile_mode: str | None = None,
    ):
        super().__init__()
        self.lr_window = check_lr_window(lr_window)
        self.model = model
        self.lr, self.mask_lr = lr, mask_lr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.label_smoothing = label_smoothing
        self.optimizer_plan = optimizer or OptimizerPlan(groups={"mask_logits": mask_lr})
        self.penalty, self.penalty_weight = penalty, penalty_weight
        self.penalty_from_epoch = penalty_from_epoch
        self.frozen_norms = frozen_norms
        self.train_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes, average="micro")
        # kept out of the module tree (no second copy of the parameters in the state dict):
        # the compiled forward shares self.model's parameters
        compiled = None
        if compile_mode is not None:
            # torch.compile caches graphs per code object (the backbone's forward), shared by
            # every fit in the process; each fit adds its own (another head, the soft and hard
            # stages), and past torch._dynamo.config.recompile_limit (8) the forward runs eager
            # after one warning. A fit starts from an empty cache instead (recompiling what an
            # earlier fit compiled: the compiler's on-disk cache makes that cheaper). This
            # drops whatever else the process compiled too.
            torch.compiler.reset()
            compiled = torch.compile(model, mode=compile_mode)
        self.__dict__["_compiled"] = compiled
        # the shared-channel freeze and its optimiser (configure_optimizers), and its decisions
        # from a checkpoint until there is one to give them to
        self._freeze: tuple[SharedChannelFreeze, torch.optim.Optimizer] | None = None
        self._freeze_state: dict[str, Tensor] | None = None
        #: this epoch's training loss, summed over its steps (on_train_epoch_end logs the mean)
        self._loss_sum: Tensor | None = None
        self._loss_steps = 0

    def forward(self, x):
        return self.model(x)

    def _step(self, batch, metric, prefix):
        x, y = batch
        run = self._compiled if self._compiled is not None and prefix == "train" else self.model
        logits = run(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        metric.update(logits.detach(), y)
        if prefix == "train":
            # the step's loss is this rank's; the epoch's (on_train_epoch_end) is summed here:
            # Lightning's on_epoch bookkeeping costs more (a step of a tiny model on this CPU,
            # 3 runs each: one on_step + on_epoch call 1.25 ms, an on_step call and this sum
            # 1.19 ms, an on_step call and an on_epoch call 1.57 ms)
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
            detached = loss.detach().float()  # (float32, as Lightning sums: bf16-true)
            self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
            self._loss_steps += 1
        else:
            self.log(f"{prefix}/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log(f"{prefix}/top1", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, self.train_top1, "train")
        if self.penalty is not None and self.current_epoch >= self.penalty_from_epoch:
            term = self.penalty(self.model)
            self.log("train/penalty", term, on_step=False, on_epoch=True, sync_dist=True)
            loss = loss + self.penalty_weight * term
        self.check_finite(loss)
        return loss

    def check_finite(self, loss: Tensor) -> None:
        """Stop at the first non-finite loss: a diverged fit would train on and merge nan
        weights into the bank. Under DDP the ranks decide together (one reduced flag), so
        they all stop at the same step instead of some waiting in the next all-reduce."""
        mine = bool(torch.isfinite(loss.detach()))
        finite = mine
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(mine, all=True)
        if not finite:
            value = f"{float(loss.detach()):g}" if not mine else "non-finite on another rank"
            raise NonFiniteLoss(f"the training loss is {value} at epoch {self.current_epoch}, "
                                f"step {self.global_step} (counted from 0; lower "
                                f"{self.optimizer_plan.lr_hint}, or "
                                f"check the data); {STORE_KEEPS}")

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._loss_steps = None, 0

    def on_train_epoch_end(self) -> None:
        # the mean over every rank's batches (sync_dist: under DDP one all-reduce an epoch;
        # every training batch is full, so the mean of the ranks' means is the whole mean).
        # The name is the one a log call with on_step and on_epoch gives.
        if self._loss_steps:
            self.log("train/loss_epoch", self._loss_sum / self._loss_steps, prog_bar=True,
                     sync_dist=True)

    def on_train_batch_start(self, batch, batch_idx):
        # Lightning puts the whole module in train mode at every epoch (and after validation)
        if self.frozen_norms:
            for layer in norm_layers(self.model):
                layer.eval()

    def validation_step(self, batch, batch_idx):
        self._step(batch, self.val_top1, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, self.test_top1, "test")

    def configure_optimizers(self):
        plan = self.optimizer_plan
        named = list(self.model.named_parameters())
        own: dict[str, list] = {suffix: [] for suffix in plan.groups}
        rest = []
        for name, p in named:
            suffix = next((s for s in plan.groups if name.endswith(s)), None)
            (rest if suffix is None else own[suffix]).append(p)
        groups = [{"params": [p for p in rest if p.requires_grad]}]
        for suffix, params in own.items():
            trainable = [p for p in params if p.requires_grad]
            if trainable:
                groups.append({"params": trainable, "lr": plan.groups[suffix],
                               "weight_decay": 0.0})
        if not any(g["params"] for g in groups):
            raise ValueError("nothing to train: every parameter is frozen")
        lr = self.lr if plan.lr is None else plan.lr
        decay = self.weight_decay if plan.weight_decay is None else plan.weight_decay
        step_composed = self.step_composed()
        if step_composed:
            opt = self._step_compose_sgd(groups, plan.kind, lr, decay)
        elif plan.kind == "sgd":
            # Lightning refuses to clip the gradients of a fused optimiser under mixed
            # precision: clipping keeps torch's loop
            opt = make_sgd(groups, lr=lr, momentum=self.momentum, weight_decay=decay,
                           fused=False if self.trainer.gradient_clip_val else None)
        elif plan.kind == "adam":
            opt = torch.optim.Adam(groups, lr=lr, weight_decay=decay)
        else:
            opt = torch.optim.AdamW(groups, lr=lr, weight_decay=decay)
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        start, end = self.lr_window

        def cosine(step: int) -> float:
            pos = start + (end - start) * min(step, steps) / steps
            return 0.5 * (1.0 + math.cos(math.pi * pos))

        # shared channels must not drift in the hard stage (StepComposeSGD holds them itself)
        if self.has_cwps_layers() and not step_composed:
            freeze = SharedChannelFreeze(self.model).attach(opt)
            self._freeze = (freeze, opt)
            if self._freeze_state is not None:  # a resumed fit
                freeze.load_state_dict(opt, self._freeze_state)
                self._freeze_state = None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _step_compose_sgd(self, groups: list[dict], kind: str, lr: float,
                          decay: float) -> StepComposeSGD:
        """The optimiser of a fit whose CWPS layers compose at the step (cwps.compose=step),
        after refusing what it cannot do."""
        trainer = self.trainer
        if kind != "sgd":
            raise ValueError(f"cwps.compose=step steps with SGD; this fit's optimiser is "
                             f"{kind!r} (use cwps.compose=forward)")
        why = step_compose_refusal(trainer.gradient_clip_val, trainer.precision)
        if why:
            raise ValueError(why)
        group = torch.distributed.group.WORLD if trainer.world_size > 1 else None
        return StepComposeSGD(
            groups, lr=lr, momentum=self.momentum, weight_decay=decay, model=self.model,
            make_rest=lambda gs: make_sgd(gs, lr=lr, momentum=self.momentum,
                                          weight_decay=decay),
            process_group=group)

    def step_composed(self) -> bool:
        """Whether this module trains CWPS layers that compose at the step
        (cwps/step_compose.py): a fit that trains none of them (the frozen mode) steps as
        the forward mode's does."""
        return any(layer.compose == "step" and any(p.requires_grad for p in trained_tensors(layer))
                   for _, layer in cwps_layers(self.model))

    def setup(self, stage: str) -> None:
        # a fit starts without a freeze (configure_optimizers makes this fit's); a module fitted
        # again must not hand a checkpoint's decisions to the last fit's freeze, nor carry them
        # over from a validate / test run
        if stage == "fit":
            self._freeze, self._freeze_state = None, None
            # DDP broadcasts every buffer from rank 0 before every forward by default; the CWPS
            # parents are frozen buffers and all but 0.1-0.3% of the buffer bytes (resnet18
            # 44.7 MB, resnet50 93.8 MB a forward), so they are left out, and every rank takes
            # rank 0's once here (each searched its own; Lightning has made the process group
            # by the time it calls setup, before it wraps the module in DDP)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self, self.parent_buffer_names() + self.step_composed_names())
            distributed.sync_buffers(self.model)
            # what DDP leaves alone it does not broadcast at the wrap either: rank 0's children
            # and scores for every rank (equal already after the job's warm-up and CPMS)
            distributed.sync_tensors(
                p for _, layer in cwps_layers(self.model) if layer.compose == "step"
                for p in trained_tensors(layer))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the freeze's decisions of the last step: a channel that turns task-specific at the
        # first step of a resumed fit gets its momentum rows zeroed, as without the interruption
        if self._freeze is not None:
            freeze, opt = self._freeze
            checkpoint[FREEZE_STATE_KEY] = freeze.state_dict(opt)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning restores the module before it asks for the optimisers (which make the
        # freeze); a freeze already made takes the decisions at once
        state = checkpoint.get(FREEZE_STATE_KEY)
        if state is None and self.has_cwps_layers() and not self.step_composed():
            rank_zero_warn(
                "this checkpoint has no shared-channel freeze decisions (a revision before "
                "they were kept): a channel that turns task-specific at the first step after "
                "the resume keeps its momentum, which the uninterrupted fit zeroes")
        if state is not None and self._freeze is not None:
            freeze, opt = self._freeze
            freeze.load_state_dict(opt, state)
        else:
            self._freeze_state = state

    def parent_buffer_names(self) -> list[str]:
        """The CWPS parents' buffers, by their names in this module."""
        names = []
        for name, layer in cwps_layers(self.model):
            prefix = f"model.{name}." if name else "model."
            names += [prefix + kind for kind in ("parent_weight", "parent_bias")
                      if getattr(layer, kind, None) is not None]
        return names

    def step_composed_names(self) -> list[str]:
        """What DDP leaves alone in a fit that composes at the step: the children and mask
        scores (no gradient of their own: StepComposeSGD takes theirs from the composed
        weights, all-reducing those) and the composed weights (written by every rank's step)."""
        names = []
        for name, layer in cwps_layers(self.model):
            if layer.compose != "step":
                continue
            prefix = f"model.{name}." if name else "model."
            names += [prefix + kind for kind in ("weight", "bias", "mask_logits",
                                                  "composed_weight", "composed_bias")
                      if kind in layer._parameters or kind in layer._buffers]
        return names

    def has_cwps_layers(self) -> bool:
        return next(iter(cwps_layers(self.model)), None) is not None
