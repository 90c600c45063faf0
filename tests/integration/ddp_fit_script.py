"""One fine-tuning fit through fitting.fit under Lightning's DDP on 2 CPU ranks (gloo), run as
a script (Lightning's launcher re-executes it for rank 1). Every rank saves the batches it
trained on (the images carry their index) and the learning rate of each step; rank 0 saves the
weights. tests/integration/test_ddp_fit.py replays them on one process.

usage: python ddp_fit_script.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cwps_lightning.data.base import MultiTaskDataModule, TaskSplits
from cwps_lightning.fitting import FitSettings, fit
from cwps_lightning.methods.base import FitPlan
from cwps_lightning.models import lit_module

N_TRAIN, BATCH, EPOCHS, CLASSES = 45, 8, 2, 3


def images(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Random images whose first pixel is their index (so a batch says which images it holds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return torch.utils.data.TensorDataset(x, torch.randint(0, CLASSES, (n,), generator=g))


class Synthetic(MultiTaskDataModule):
    default_tasks = ("t",)

    def build_tasks(self):
        return {"t": TaskSplits("t", CLASSES, images(N_TRAIN, 0), images(10, 1), images(10, 2))}


def model() -> torch.nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.helpers import Small

    torch.manual_seed(0)
    return Small()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    seen = []
    train_step = lit_module.CWPSLitModule.training_step

    def recording(self, batch, batch_idx):
        x, y = batch
        lrs = [g["lr"] for g in self.trainer.optimizers[0].param_groups]
        seen.append((x.detach().clone(), y.clone(), lrs))
        return train_step(self, batch, batch_idx)

    lit_module.CWPSLitModule.training_step = recording
    net = model()
    settings = FitSettings(trainer=dict(
        accelerator="cpu", devices=2, strategy="ddp", enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0))
    fit(net, Synthetic(batch_size=BATCH), "t", FitPlan(EPOCHS, seed=5, train="finetune"),
        settings, shareable=[], log_group="g", log_name="t")
    rank = torch.distributed.get_rank()
    torch.save(seen, out / f"batches{rank}.pt")
    if rank == 0:
        torch.save(net.state_dict(), out / "weights.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
