"""Stage switching (soft -> hard) and sharing-ratio logging.

The parameter set never changes inside one fit (DDP wraps it once): the stage is a flag on the
CWPS layers, set from the fit's position (epoch + batch / batches per epoch) at the start of every
batch, so the switch can fall inside an epoch (the paper's quarter of 3 mask epochs is 0.75 of
one) and a resumed fit lands in the right stage without storing it.
"""

from __future__ import annotations

import lightning as L

from ..cwps import cwps_layers, set_stage, sharing_stats


class MaskStageCallback(L.Callback):
    """Soft mask for the first ``soft_epochs`` epochs of the fit (a fraction of an epoch counts
    in batches), hard mask afterwards."""

    def __init__(self, soft_epochs: float):
        if not soft_epochs >= 0:
            raise ValueError(f"soft_epochs must be >= 0, got {soft_epochs}")
        self.soft_epochs = float(soft_epochs)
        self._stage: str | None = None

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
        self._set(pl_module, self.stage_for_epoch(trainer.current_epoch))

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
