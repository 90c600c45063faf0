"""One fine-tuning fit through fitting.fit under Lightning's DDP on 2 CPU ranks (gloo), run as
a script (Lightning's launcher re-executes it for rank 1). Every rank saves the batches it
trained on (the images carry their index) and the learning rate of each step; rank 0 saves the
weights. tests/integration/test_ddp_fit.py replays them on one process.

With COMPOSE (forward or step) the fit is a CWPS mask fit instead (soft, then hard, with
cwps_lightning.cwps layers in that compose mode) and only rank 0's weights are saved:
tests/integration/test_ddp_fit.py compares the two modes.

usage: python ddp_fit_script.py OUT_DIR [COMPOSE]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cwps_lightning.fitting import FitSettings, fit
from cwps_lightning.methods.base import FitPlan
from cwps_lightning.models import lit_module

N_TRAIN, BATCH, EPOCHS = 45, 8, 2
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.helpers, run as a script

from tests.helpers import Small, synthetic_tasks  # noqa: E402


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Small()


def cwps_model(compose: str) -> tuple[torch.nn.Module, list[str]]:
    """Small with CWPS layers (random parents and scores, drawn the same for both modes)."""
    from cwps_lightning.cwps import cwps_layers, inject_cwps, use_step_compose

    net = model()
    names = inject_cwps(net, exclude=["head"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in cwps_layers(net):
            w = layer.weight
            layer.set_parent(w + 0.2 * torch.randn(w.shape, generator=g),
                             None if layer.bias is None else layer.bias + 0.1)
            layer.mask_logits.copy_(torch.randn(layer.mask_logits.shape, generator=g))
    if compose == "step":
        use_step_compose(net)
    return net, names


def main(out: Path, compose: str | None = None) -> None:
    torch.set_num_threads(1)
    settings = FitSettings(trainer=dict(
        accelerator="cpu", devices=2, strategy="ddp", enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0),
        mask_lr=5.0)
    if compose is not None:
        net, names = cwps_model(compose)
        fit(net, synthetic_tasks(N_TRAIN, BATCH), "t",
            FitPlan(EPOCHS, seed=5, train="cwps", soft_epochs=0.5), settings,
            shareable=names, log_group="g", log_name="t")
        if torch.distributed.get_rank() == 0:
            torch.save(net.state_dict(), out / f"weights_{compose}.pt")
        return
    seen = []
    train_step = lit_module.CWPSLitModule.training_step

    def recording(self, batch, batch_idx):
        x, y = batch
        lrs = [g["lr"] for g in self.trainer.optimizers[0].param_groups]
        seen.append((x.detach().clone(), y.clone(), lrs))
        return train_step(self, batch, batch_idx)

    lit_module.CWPSLitModule.training_step = recording
    net = model()
    fit(net, synthetic_tasks(N_TRAIN, BATCH), "t", FitPlan(EPOCHS, seed=5, train="finetune"),
        settings, shareable=[], log_group="g", log_name="t")
    rank = torch.distributed.get_rank()
    torch.save(seen, out / f"batches{rank}.pt")
    if rank == 0:
        torch.save(net.state_dict(), out / "weights.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
