"""Stage switching (soft -> hard) and sharing-ratio logging.

The parameter set never changes inside one fit (DDP wraps it once): the stage is a flag on the
CWPS layers, set from the fit's position (epoch + batch / batches per epoch) at the start of every
batch, so the switch can fall inside an epoch (the paper's quarter of 3 mask epochs is 0.75 of
one).

The checkpoint keeps (``on_save_checkpoint``) the stage of the last batch and each CWPS layer's
decisions on entering each stage (``layer.decisions``, from which ``surgery.mask_flips``
counts): a resumed fit starts in the stage it stopped in, the next batch switches if a switch
is due, and the flips are counted from the same decisions as in the fit that was not
interrupted.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ..cwps import cwps_layers, set_stage, sharing_stats

#: the checkpoint's key for the stage and the layers' decisions
CHECKPOINT_KEY = "cwps_mask_stage"


class MaskStageCallback(L.Callback):
    """Soft mask for the first ``soft_epochs`` epochs of the fit (a fraction of an epoch counts
    in batches; with a training loader that has no length, in whole epochs), hard mask
    afterwards."""

    def __init__(self, soft_epochs: float):
        if not soft_epochs >= 0:
            raise ValueError(f"soft_epochs must be >= 0, got {soft_epochs}")
        self.soft_epochs = float(soft_epochs)
        self._stage: str | None = None
        # a checkpoint's stage and decisions, until the resumed fit starts (on_fit_start)
        self._resumed: dict | None = None
        self._fitting = False  # between on_fit_start and teardown

    def stage_for_epoch(self, epoch: int, batch: int = 0, batches: int = 1) -> str:
        """The stage of batch ``batch`` of ``batches`` in epoch ``epoch``."""
        return "soft" if epoch + batch / max(batches, 1) < self.soft_epochs else "hard"

    def _set(self, pl_module, stage: str) -> None:
        if stage != self._stage:
            set_stage(pl_module, stage)
            self._stage = stage

    def on_fit_start(self, trainer, pl_module):
        if next(iter(cwps_layers(pl_module)), None) is None:
            raise ValueError("MaskStageCallback needs a model with CWPS layers")
        self._stage = None
        self._fitting = True
        resumed, self._resumed = self._resumed, None
        if resumed is None:
            self._set(pl_module, self.stage_for_epoch(trainer.current_epoch))
        else:
            # (Lightning restores the epoch and batch counters after on_fit_start: the stage of
            # the checkpoint's last batch, not of epoch 0)
            self._restore(pl_module, resumed)

    def _restore(self, pl_module, state: dict) -> None:
        self._set(pl_module, state["stage"])
        for name, layer in cwps_layers(pl_module):  # (entering the stage recorded its own)
            layer.decisions = {k: v.clone() for k, v in state["decisions"][name].items()}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self._stage is None:  # (not inside a fit: nothing of one to keep)
            return
        checkpoint[CHECKPOINT_KEY] = {
            "stage": self._stage,
            "decisions": {name: {k: v.clone() for k, v in layer.decisions.items()}
                          for name, layer in cwps_layers(pl_module)}}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            rank_zero_warn(
                "this checkpoint has no mask-stage decisions (saved outside a fit, or by a "
                "revision before they were kept): the resumed fit counts mask_flips from its "
                "own start")
            return
        _check_state(state, pl_module)
        if self._fitting:
            # a strategy that restores after the fit has started (restore_checkpoint_after_setup:
            # FSDP, DeepSpeed): on_fit_start has run, so the state goes in now
            self._restore(pl_module, state)
        else:
            self._resumed = state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        batches = trainer.num_training_batches
        if not isinstance(batches, int):
            # inf, an iterable without a length: a batch cannot be placed inside its epoch, so
            # the stage changes at whole epochs (soft for ceil(soft_epochs) epochs)
            if batch_idx == 0 and trainer.current_epoch == 0 and not self.soft_epochs.is_integer():
                rank_zero_warn(f"the training loader has no length: the soft stage ends at a "
                               f"whole epoch, so soft_epochs={self.soft_epochs:g} counts as "
                               f"{math.ceil(self.soft_epochs)}")
            batch_idx, batches = 0, 1
        self._set(pl_module, self.stage_for_epoch(trainer.current_epoch, batch_idx, batches))

    def on_train_epoch_end(self, trainer, pl_module):
        stats = sharing_stats(pl_module)
        # (the same on every rank: the sync only keeps Lightning from warning under DDP)
        for name, value in (("specific_channels", stats["specific_channel_fraction"]),
                            ("specific_params", stats["specific_param_fraction"]),
                            ("hard", float(self._stage == "hard"))):
            pl_module.log(f"sharing/{name}", value, sync_dist=True)

    def teardown(self, trainer, pl_module, stage):
        self._fitting = False  # (also after a fit that raised)

    def on_fit_end(self, trainer, pl_module):
        # the model leaves the fit in the stage it is merged and tested in
        self._set(pl_module, "hard")


def _check_state(state, pl_module) -> None:
    """ValueError unless ``state`` holds a stage ('soft' / 'hard') and, for exactly this
    model's CWPS layers, bool decisions per channel at 'soft' / 'hard'."""
    if not isinstance(state, dict) or state.get("stage") not in ("soft", "hard"):
        stage = state.get("stage") if isinstance(state, dict) else state
        raise ValueError(f"the checkpoint's mask stage is {stage!r}; expected 'soft' or 'hard'")
    held = state.get("decisions")
    layers = dict(cwps_layers(pl_module))
    if not isinstance(held, dict) or set(held) != set(layers):
        names = set(held) if isinstance(held, dict) else set()
        raise ValueError(
            "the checkpoint's mask-stage decisions are not this model's CWPS layers: missing "
            f"{sorted(set(layers) - names)[:5]}, not in the model {sorted(names - set(layers))[:5]}")
    for name, seen in held.items():
        channels = layers[name].mask_logits.numel()
        ok = isinstance(seen, dict) and all(
            stage in ("soft", "hard") and isinstance(t, torch.Tensor) and t.dtype == torch.bool
            and tuple(t.shape) == (channels,) for stage, t in seen.items())
        if not ok:
            raise ValueError(f"the checkpoint's mask-stage decisions of {name!r}: expected "
                             f"{{'soft' / 'hard': a bool tensor of shape ({channels},)}}")
