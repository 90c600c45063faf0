"""Stage switching (soft -> hard) and sharing-ratio logging.

The parameter set never changes inside one fit (DDP wraps it once): the stage is a flag on the
CWPS layers, set from the epoch number at the start of every epoch, so a resumed fit lands in the
right stage without storing it.
"""

from __future__ import annotations

import lightning as L

from ..cwps import cwps_layers, set_stage, sharing_stats


class MaskStageCallback(L.Callback):
    """Soft mask for the first ``soft_epochs`` epochs of the fit, hard mask afterwards."""

    def __init__(self, soft_epochs: int):
        if soft_epochs < 0:
            raise ValueError(f"soft_epochs must be >= 0, got {soft_epochs}")
        self.soft_epochs = soft_epochs

    def stage_for_epoch(self, epoch: int) -> str:
        return "soft" if epoch < self.soft_epochs else "hard"

    def on_fit_start(self, trainer, pl_module):
        if next(iter(cwps_layers(pl_module)), None) is None:
            raise ValueError("MaskStageCallback needs a model with CWPS layers")
        set_stage(pl_module, self.stage_for_epoch(trainer.current_epoch))

    def on_train_epoch_start(self, trainer, pl_module):
        set_stage(pl_module, self.stage_for_epoch(trainer.current_epoch))

    def on_train_epoch_end(self, trainer, pl_module):
        stats = sharing_stats(pl_module)
        pl_module.log("sharing/specific_channels", stats["specific_channel_fraction"])
        pl_module.log("sharing/specific_params", stats["specific_param_fraction"])
        pl_module.log("sharing/hard", float(self.stage_for_epoch(trainer.current_epoch) == "hard"))

    def on_fit_end(self, trainer, pl_module):
        # the model leaves the fit in the stage it is merged and tested in
        set_stage(pl_module, "hard")
