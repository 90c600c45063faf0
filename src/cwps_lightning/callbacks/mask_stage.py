"""Stage switching (soft -> hard) and sharing-ratio logging.

The parameter set never changes inside one fit (DDP wraps it once): the stage is a flag on the
CWPS layers, set from the fit's position (epoch + batch / batches per epoch) at the start of every
batch, so the switch can fall inside an epoch (the paper's quarter of 3 mask epochs is 0.75 of
one) and a resumed fit lands in the right stage without storing it.

What the checkpoint does keep (``on_save_checkpoint``) is the stage of the last batch and each
CWPS layer's decisions on entering each stage (``layer.decisions``, from which
``surgery.mask_flips`` counts): a resumed fit starts in the stage it stopped in and counts the
flips from the same decisions as the fit that was not interrupted.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ..cwps import cwps_layers, set_stage, sharing_stats

#: the checkpoint's key for the stage and the layers' decisions
CHECKPOINT_KEY = "cwps_mask_stage"


class MaskStageCallback(L.Callback):
    """Soft mask for the first ``soft_epochs`` epochs of the fit (a fraction of an epoch counts
    in batches), hard mask afterwards."""

    def __init__(self, soft_epochs: float):
        if not soft_epochs >= 0:
            raise ValueError(f"soft_epochs must be >= 0, got {soft_epochs}")
        self.soft_epochs = float(soft_epochs)
        self._stage: str | None = None
        # a checkpoint's stage and decisions, until the resumed fit starts (on_fit_start)
        self._resumed: dict | None = None

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
        resumed, self._resumed = self._resumed, None
        if resumed is None:
            self._set(pl_module, self.stage_for_epoch(trainer.current_epoch))
            return
        # (Lightning restores the epoch and batch counters after on_fit_start: the stage of the
        # checkpoint's last batch, not of epoch 0; the next batch switches if it is due)
        self._set(pl_module, resumed["stage"])
        held = resumed["decisions"]
        layers = dict(cwps_layers(pl_module))
        if set(held) != set(layers):
            raise ValueError(
                f"the checkpoint's mask-stage decisions name other CWPS layers than this "
                f"model's: {sorted(set(held) ^ set(layers))[:5]}")
        for name, layer in layers.items():  # (entering the stage just now recorded its own)
            layer.decisions = {k: v.clone() for k, v in held[name].items()}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[CHECKPOINT_KEY] = {
            "stage": self._stage,
            "decisions": {name: {k: v.clone() for k, v in layer.decisions.items()}
                          for name, layer in cwps_layers(pl_module)}}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            rank_zero_warn(
                "this checkpoint has no mask-stage decisions (a revision before they were "
                "kept): the resumed fit counts mask_flips from its own start")
            return
        if state["stage"] not in ("soft", "hard"):
            raise ValueError(f"the checkpoint's mask stage is {state['stage']!r}; expected "
                             "'soft' or 'hard'")
        for name, seen in state["decisions"].items():
            for stage, held in seen.items():
                if stage not in ("soft", "hard") or not isinstance(held, torch.Tensor) \
                        or held.dtype != torch.bool or held.dim() != 1:
                    raise ValueError(f"the checkpoint's mask-stage decisions of {name!r} at "
                                     f"{stage!r}: expected a bool tensor per channel")
        self._resumed = state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        batches = trainer.num_training_batches
        if not isinstance(batches, int):  # inf: an iterable without a length
            batches = 1
        self._set(pl_module, self.stage_for_epoch(trainer.current_epoch, batch_idx, batches))

    def on_train_epoch_end(self, trainer, pl_module):
        stats = sharing_stats(pl_module)
        pl_module.log("sharing/specific_channels", stats["specific_channel_fraction"])
        pl_module.log("sharing/specific_params", stats["specific_param_fraction"])
        pl_module.log("sharing/hard", float(self._stage == "hard"))

    def on_fit_end(self, trainer, pl_module):
        # the model leaves the fit in the stage it is merged and tested in
        self._set(pl_module, "hard")
