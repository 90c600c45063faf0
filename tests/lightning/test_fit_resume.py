"""A fit killed after an epoch and rerun from its epoch checkpoint ends with the weights of the
uninterrupted fit, bit for bit: the data order of an epoch depends only on the seed and the
epoch's index (data/base.py, EpochOrderSampler), and the rest of a fit's state (weights,
optimiser, schedule, the mask stage) is in the checkpoint. The fits are a CWPS visit's two:
a warm-up, then a mask fit with a soft and a hard stage that continues the warm-up's order."""

from __future__ import annotations

import pytest
import torch

from cwps_lightning.cwps import cwps_layers, inject_cwps, use_step_compose
from cwps_lightning.cwps.surgery import mask_flips
from cwps_lightning.data import base
from cwps_lightning.data.images import ImageListDataset
from cwps_lightning.fitting import FitSettings, fit
from cwps_lightning.methods.base import FitPlan
from cwps_lightning.models import lit_module

from ..helpers import Small, synthetic_tasks

TRAINER = dict(accelerator="cpu", devices=1, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0)
MASK_EPOCHS = 4


class Killed(Exception):
    """Stands for SIGKILL: the fit stops between epochs, its last checkpoint on disk."""


def flip_a_shared_channel(module) -> None:
    """The first CWPS layer's most shared channel (lowest score) turns task-specific."""
    layer = next(layer for _, layer in cwps_layers(module.model))
    s = layer.mask_logits
    # (a resumed fit is back in the hard stage from its first batch, MaskStageCallback)
    assert bool((torch.sigmoid(s) < 0.5).any())
    with torch.no_grad():
        s[int(s.argmin())] = 3.0


def augmented_tasks(root, num_workers: int = 0):
    """One task of 24 small image files, trained with random crops and flips (the real
    benchmarks' transforms), read by ``num_workers`` persistent workers."""
    from torchvision import transforms as T

    from cwps_lightning.data.base import MultiTaskDataModule, TaskSplits
    from cwps_lightning.data.images import ImageListDataset

    from ..data.helpers import write_image

    paths = [str(write_image(root / f"{i}.png", seed=i, size=(12, 10))) for i in range(24)]
    labels = [i % 3 for i in range(24)]
    train_tf = T.Compose([T.RandomResizedCrop(6), T.RandomHorizontalFlip(), T.ToTensor()])
    eval_tf = T.Compose([T.Resize((6, 6)), T.ToTensor()])

    class Augmented(MultiTaskDataModule):
        default_tasks = ("t",)

        def build_tasks(self):
            return {"t": TaskSplits("t", 3, ImageListDataset(paths, labels, train_tf),
                                    ImageListDataset(paths[:6], labels[:6], eval_tf),
                                    ImageListDataset(paths[:6], labels[:6], eval_tf))}

    return Augmented(batch_size=8, num_workers=num_workers,
                     persistent_workers=num_workers > 0)


def visit(checkpoints, kill_at_epoch: int | None = None,
          flip_at_epoch: int | None = None, compose: str = "forward",
          flips: dict | None = None, data=None) -> dict:
    """A warm-up fit, CWPS injection with fixed parents, a mask fit; a fresh datamodule and
    model each time, as in a rerun of the job. ``flip_at_epoch``: a shared channel turns
    task-specific as that epoch of the mask fit starts (flip_a_shared_channel). ``compose``:
    the layers' compose mode in the mask fit (cwps.compose). ``flips``: filled with the mask
    fit's mask_flips. ``data``: a function making the datamodule (synthetic_tasks')."""
    torch.manual_seed(0)
    net = Small()
    dm = data() if data is not None else synthetic_tasks(n_train=45, batch_size=8)
    settings = FitSettings(trainer=TRAINER, checkpoint_dir=checkpoints)
    dm.reseed_shuffle(11)
    fit(net, dm, "t", FitPlan(1, seed=11, train="finetune", continue_order=True), settings,
        [], "cwps", "t-warmup")
    names = inject_cwps(net, exclude=["head"], threshold=0.5)
    g = torch.Generator().manual_seed(3)
    for _, layer in cwps_layers(net):
        with torch.no_grad():
            layer.set_parent(layer.weight + 0.1 * torch.randn(layer.weight.shape, generator=g),
                             None if layer.bias is None else layer.bias.clone())
    if compose == "step":
        use_step_compose(net)
    plan = FitPlan(MASK_EPOCHS, seed=12, train="cwps", soft_epochs=1.5, continue_order=True)
    def start(self):
        if self.current_epoch == kill_at_epoch:
            raise Killed
        if self.current_epoch == flip_at_epoch:
            flip_a_shared_channel(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lit_module.CWPSLitModule, "on_train_epoch_start", start, raising=False)
        if kill_at_epoch is None:
            fit(net, dm, "t", plan, settings, names, "cwps", "t-mask")
        else:
            with pytest.raises(Killed):
                fit(net, dm, "t", plan, settings, names, "cwps", "t-mask")
    if flips is not None:
        flips.update(mask_flips(net))
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("compose", ["forward", "step"])
def test_a_killed_fit_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one(tmp_path,
                                                                                compose):
    """(compose=step: StepComposeSGD's state, every momentum buffer, is in the checkpoint; the
    composed weights are not, and are composed again from the restored weights.)"""
    torch.set_num_threads(1)
    whole = visit(tmp_path / "whole", compose=compose)
    visit(tmp_path / "killed", kill_at_epoch=2, compose=compose)  # mask epochs 0, 1 done
    assert (tmp_path / "killed" / "cwps" / "t-mask" / "last.ckpt").is_file()
    resumed = visit(tmp_path / "killed", compose=compose)
    assert whole.keys() == resumed.keys()
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, f"the resumed visit differs in {differ}"


def test_a_cut_short_checkpoint_or_metrics_file_restarts_the_fit_not_the_run(tmp_path, caplog):
    """(a truncated last.ckpt stopped the resumed run with a PytorchStreamReader traceback, an
    undecodable metrics.csv with a UnicodeDecodeError)"""
    torch.set_num_threads(1)
    whole = visit(tmp_path / "whole")
    visit(tmp_path / "killed", kill_at_epoch=2)
    fit_dir = tmp_path / "killed" / "cwps" / "t-mask"
    ckpt = fit_dir / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    with caplog.at_level("WARNING"):
        resumed = visit(tmp_path / "killed")
    assert "unreadable" in caplog.text and "this fit starts from its beginning" in caplog.text
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, f"the fit started again differs in {differ}"
    assert torch.load(ckpt, weights_only=False)["epoch"] == MASK_EPOCHS - 1


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_fit_draws_the_random_crops_and_flips_of_the_uninterrupted_one(tmp_path,
                                                                               workers):
    """The real benchmarks train with random augmentations. Their draws came from the global
    RNG (no workers) or the workers' seeds, which a resume restarts: the resumed epochs saw
    other crops (a walk-through: train loss 1.27 against 0.61 in the first resumed epoch).
    Each sample's draws now come from the data order's seed and the epoch alone."""
    torch.set_num_threads(1)

    def data():
        return augmented_tasks(tmp_path / "images", workers)

    whole = visit(tmp_path / "whole", data=data)
    visit(tmp_path / "killed", kill_at_epoch=2, data=data)
    resumed = visit(tmp_path / "killed", data=data)
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, f"the resumed visit differs in {differ}"
    # and the draws matter: the same visit with other augmentation seeds ends elsewhere
    with pytest.MonkeyPatch.context() as mp:
        load = ImageListDataset.load
        mp.setattr(ImageListDataset, "load",
                   lambda self, i, seed=None: load(self, i, None if seed is None else seed + 1))
        other = visit(tmp_path / "other", data=data)
    assert any(not torch.equal(whole[k], other[k]) for k in whole)


def test_the_comparison_tells_another_data_order_apart(tmp_path, monkeypatch):
    """The check above can fail: the same visit with every epoch's order shifted by one ends
    elsewhere."""
    torch.set_num_threads(1)
    whole = visit(tmp_path / "whole")
    original = base.EpochOrderSampler.set_epoch
    monkeypatch.setattr(base.EpochOrderSampler, "set_epoch",
                        lambda self, epoch: original(self, epoch + 1))
    shifted = visit(tmp_path / "shifted")
    assert any(not torch.equal(whole[k], shifted[k]) for k in whole)


def test_a_channel_that_turns_task_specific_as_the_resumed_fit_starts(tmp_path, monkeypatch):
    """The checkpoint keeps the shared-channel freeze's decisions of the last step (hard stage
    from epoch 1.5): a channel shared then and task-specific at the first step after the
    resume gets its momentum rows zeroed as in the uninterrupted fit, bit for bit; a checkpoint
    without them ends elsewhere."""
    torch.set_num_threads(1)
    whole_flips, resumed_flips = {}, {}
    whole = visit(tmp_path / "whole", flip_at_epoch=2, flips=whole_flips)
    visit(tmp_path / "killed", kill_at_epoch=2)
    resumed = visit(tmp_path / "killed", flip_at_epoch=2, flips=resumed_flips)
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, f"the resumed visit differs in {differ}"
    # the decisions at each stage's start are in the checkpoint too: the resumed fit counts
    # the hard stage's flip (and the soft stage's) as the uninterrupted one does
    assert whole_flips["hard"] >= 1
    assert resumed_flips == whole_flips
    # compose=step zeroes a shared channel's momentum rows at every step: nothing to keep
    step_whole = visit(tmp_path / "step-whole", flip_at_epoch=2, compose="step")
    visit(tmp_path / "step-killed", kill_at_epoch=2, compose="step")
    step_resumed = visit(tmp_path / "step-killed", flip_at_epoch=2, compose="step")
    differ = [k for k in step_whole if not torch.equal(step_whole[k], step_resumed[k])]
    assert not differ, f"the resumed compose=step visit differs in {differ}"
    monkeypatch.setattr(lit_module.CWPSLitModule, "on_save_checkpoint", lambda self, c: None)
    visit(tmp_path / "forgot", kill_at_epoch=2)
    forgot = visit(tmp_path / "forgot", flip_at_epoch=2)
    assert any(not torch.equal(whole[k], forgot[k]) for k in whole)


def test_a_resumed_fits_metrics_file_keeps_its_epochs_or_starts_again_when_unreadable(
        tmp_path, caplog):
    from cwps_lightning.fitting import _ResumedMetricsWriter

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss\n0,3,1.5\n1,7,1.2\n2,9,1.1\n")
    _ResumedMetricsWriter(str(tmp_path), through_epoch=1)
    assert metrics.read_text().splitlines() == ["epoch,step,train/loss", "0,3,1.5", "1,7,1.2"]
    metrics.write_bytes(b"epoch,step\n\xff\xfe\x00garbage\n")
    with caplog.at_level("WARNING"):
        _ResumedMetricsWriter(str(tmp_path), through_epoch=1)
    assert "unreadable (UnicodeDecodeError" in caplog.text and not metrics.exists()
