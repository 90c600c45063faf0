"""The Lightning layer: trainable sets, optimiser groups, soft -> hard switching in one fit."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cwps_lightning.callbacks import MaskStageCallback
from cwps_lightning.cwps import cwps_layers, inject_cwps, set_stage
from cwps_lightning.cwps.freeze import SharedChannelFreeze
from cwps_lightning.models import CWPSLitModule, select_trainable
from cwps_lightning.optim import FusedSGD


def small_net(classes=3):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, classes),
    )


def loader(n=32, classes=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def injected():
    net = small_net()
    names = inject_cwps(net, exclude=["7"])  # the last Linear is the head
    for _, layer in cwps_layers(net):
        with torch.no_grad():
            layer.set_parent(torch.randn_like(layer.weight),
                             None if layer.bias is None else torch.randn_like(layer.bias))
    return net, names


def test_select_trainable_modes():
    net, names = injected()
    select_trainable(net, "frozen", names)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"1.weight", "1.bias", "7.weight", "7.bias"}  # norm + head only
    select_trainable(net, "finetune", names)
    assert not any(p.requires_grad for n, p in net.named_parameters() if "mask_logits" in n)
    assert all(p.requires_grad for n, p in net.named_parameters() if "mask_logits" not in n)
    select_trainable(net, "cwps", names)
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="sideways"):
        select_trainable(net, "sideways", names)


class StageRecorder(L.Callback):
    def __init__(self):
        self.stages = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.stages.append({layer.stage for _, layer in cwps_layers(pl_module)})


def test_soft_then_hard_in_one_fit_with_mask_lr_group(tmp_path):
    torch.manual_seed(0)
    net, names = injected()
    select_trainable(net, "cwps", names)
    parents = {n: layer.parent_weight.clone() for n, layer in cwps_layers(net)}
    logits_before = {n: layer.mask_logits.detach().clone() for n, layer in cwps_layers(net)}
    module = CWPSLitModule(net, num_classes=3, lr=0.1, mask_lr=0.05)
    recorder = StageRecorder()
    trainer = quiet_trainer(3, [MaskStageCallback(soft_epochs=1), recorder])
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader(16))
    assert recorder.stages == [{"soft"}, {"hard"}, {"hard"}]
    groups = trainer.optimizers[0].param_groups
    mask_group = [g for g in groups if g.get("weight_decay") == 0.0]
    assert len(mask_group) == 1
    assert {id(p) for p in mask_group[0]["params"]} == {
        id(layer.mask_logits) for _, layer in cwps_layers(net)}
    assert mask_group[0]["initial_lr"] == 0.05 and groups[0]["initial_lr"] == 0.1
    for n, layer in cwps_layers(net):
        assert torch.equal(layer.parent_weight, parents[n])  # the parent never changes
        assert not torch.equal(layer.mask_logits.detach(), logits_before[n])  # masks learn
        assert layer.stage == "hard"
    logged = trainer.logged_metrics
    assert 0.0 <= float(logged["sharing/specific_channels"]) <= 1.0
    assert float(logged["sharing/hard"]) == 1.0


def test_callback_needs_cwps_layers():
    module = CWPSLitModule(small_net(), num_classes=3)
    trainer = L.Trainer(max_epochs=1, callbacks=[MaskStageCallback(1)], accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="CWPS layers"):
        trainer.fit(module, train_dataloaders=loader())


class LRRecorder(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def lrs_of_fit(epochs, window):
    module = CWPSLitModule(small_net(), num_classes=3, lr=0.1, lr_window=window)
    rec = LRRecorder()
    trainer = L.Trainer(max_epochs=epochs, callbacks=[rec], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader())
    return rec.lrs


def test_lr_windows_of_two_fits_make_one_cosine():
    """Warm-up (first quarter) then the rest: the same learning rates, step by step, as one fit
    over all the epochs; the full window is the plain cosine from lr to 0."""
    whole = lrs_of_fit(4, (0.0, 1.0))
    steps = len(whole)  # 4 batches per epoch
    assert whole == pytest.approx(
        [0.05 * (1 + math.cos(math.pi * t / steps)) for t in range(steps)])
    split = lrs_of_fit(1, (0.0, 0.25)) + lrs_of_fit(3, (0.25, 1.0))
    assert split == pytest.approx(whole)
    restart = lrs_of_fit(1, (0.0, 1.0)) + lrs_of_fit(3, (0.0, 1.0))
    assert restart != pytest.approx(whole)


@pytest.mark.parametrize("window", [(0.5, 0.5), (-0.1, 1.0), (0.0, 1.5), (0.8, 0.2)])
def test_bad_lr_window(window):
    with pytest.raises(ValueError, match="lr_window"):
        CWPSLitModule(small_net(), num_classes=3, lr_window=window)


def test_cwps_settings_lr_windows():
    from cwps_lightning.settings import CWPSSettings, StageSettings

    task = CWPSSettings(stages=StageSettings(warmup_epochs=1, soft_epochs=1, hard_epochs=2))
    assert task.lr_windows() == ((0.0, 0.25), (0.25, 1.0))
    per_fit = CWPSSettings(stages=StageSettings(1, 1, 2, lr_schedule="per_fit"))
    assert per_fit.lr_windows() == ((0.0, 1.0), (0.0, 1.0))
    no_warmup = CWPSSettings(stages={"warmup_epochs": 0, "soft_epochs": 1, "hard_epochs": 2})
    assert no_warmup.lr_windows()[1] == (0.0, 1.0)
    with pytest.raises(ValueError, match="lr_schedule.*'weekly'"):
        StageSettings(lr_schedule="weekly")


# -- a method's optimiser plan, loss penalty and frozen normalisation statistics ---------------
def quiet_trainer(epochs: int, callbacks: list) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary."""
    return L.Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)


def fit_small(module, epochs=1, **trainer_args):
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, **trainer_args)
    trainer.fit(module, train_dataloaders=loader())
    return trainer


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[list[float]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.losses.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[-1].append(float(outputs["loss"]))


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_the_logged_epoch_loss_is_the_mean_of_that_epochs_step_losses(tmp_path, precision):
    """train/loss_epoch is summed by the module (not by Lightning's on_epoch bookkeeping):
    the mean of the epoch's steps, from zero at every epoch, next to train/loss_step; in
    float32 whatever the loss's dtype (a bf16 sum of 1000 losses of 2.3 is 1024)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    module = CWPSLitModule(small_net(), num_classes=3, lr=0.1)
    recorder = LossRecorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", callbacks=[recorder],
                        logger=CSVLogger(tmp_path, name="fit", version="0"),
                        precision=precision, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader())
    with open(tmp_path / "fit" / "0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    epochs = [float(r["train/loss_epoch"]) for r in rows if r["train/loss_epoch"]]
    steps = [float(r["train/loss_step"]) for r in rows if r["train/loss_step"]]
    assert [len(e) for e in recorder.losses] == [4, 4]  # (32 images, batches of 8)
    assert epochs == pytest.approx([sum(e) / len(e) for e in recorder.losses], rel=1e-6)
    assert steps == pytest.approx([x for e in recorder.losses for x in e], rel=1e-6)


@pytest.mark.parametrize("kind, cls", [("sgd", FusedSGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_optimizer_plan_kind_lr_and_own_groups(kind, cls):
    from cwps_lightning.methods.base import OptimizerPlan

    net = small_net()
    plan = OptimizerPlan(kind, lr=0.01, weight_decay=0.1, groups={"7.weight": 0.5})
    trainer = fit_small(CWPSLitModule(net, num_classes=3, lr=0.2, optimizer=plan))
    opt = trainer.optimizers[0]
    assert type(opt) is cls
    main, own = opt.param_groups
    assert (main["initial_lr"], main["weight_decay"]) == (0.01, 0.1)
    assert (own["initial_lr"], own["weight_decay"]) == (0.5, 0.0)
    assert [id(p) for p in own["params"]] == [id(net[7].weight)]


def test_sgd_on_the_cpu_steps_with_the_fused_kernel():
    trainer = fit_small(CWPSLitModule(small_net(), num_classes=3, lr=0.2))
    opt = trainer.optimizers[0]
    assert type(opt) is FusedSGD and all(g["fused"] for g in opt.param_groups)


def test_gradient_clipping_under_mixed_precision_keeps_the_loop():
    """Lightning refuses to clip a fused optimiser's gradients under mixed precision."""
    trainer = fit_small(CWPSLitModule(small_net(), num_classes=3, lr=0.2),
                        precision="bf16-mixed", gradient_clip_val=1.0)
    assert trainer.state.finished
    assert not any(g["fused"] for g in trainer.optimizers[0].param_groups)


def test_optimizer_plan_rejects_an_unknown_kind():
    from cwps_lightning.methods.base import OptimizerPlan

    with pytest.raises(ValueError, match=r"one of \['sgd', 'adam', 'adamw'\], got 'lion'"):
        OptimizerPlan("lion")


@pytest.mark.parametrize("from_epoch, changes", [(0, True), (1, False)])
def test_penalty_enters_the_loss_from_its_epoch(from_epoch, changes):
    """A penalty on one parameter the loss does not otherwise reach (an unused extra) moves it
    only if it counts in the epoch trained."""
    torch.manual_seed(0)
    net = small_net()
    net.extra = nn.Parameter(torch.ones(()))
    module = CWPSLitModule(net, num_classes=3, lr=0.1, penalty=lambda m: m.extra.abs(),
                           penalty_weight=1.0, penalty_from_epoch=from_epoch)
    fit_small(module)
    assert (float(net.extra.detach()) < 1.0) is changes


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_norms_keep_their_running_statistics(frozen):
    torch.manual_seed(0)
    net = small_net()
    before = net[1].running_mean.clone()
    fit_small(CWPSLitModule(net, num_classes=3, frozen_norms=frozen))
    assert torch.equal(net[1].running_mean, before) is frozen


class BatchStageRecorder(L.Callback):
    def __init__(self):
        self.stages = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.stages.append({layer.stage for _, layer in cwps_layers(pl_module)})


def test_soft_to_hard_switch_falls_inside_an_epoch(tmp_path):
    """soft_epochs=0.75 with 4 batches per epoch: batches 0-2 soft, then hard."""
    net, names = injected()
    select_trainable(net, "cwps", names)
    recorder = BatchStageRecorder()
    trainer = quiet_trainer(2, [MaskStageCallback(soft_epochs=0.75), recorder])
    trainer.fit(CWPSLitModule(net, num_classes=3), train_dataloaders=loader(32))
    assert recorder.stages == [{"soft"}] * 3 + [{"hard"}] * 5
    assert MaskStageCallback(1.5).stage_for_epoch(1, 1, 4) == "soft"
    assert MaskStageCallback(1.5).stage_for_epoch(1, 2, 4) == "hard"


def test_mask_stage_checkpoint_state_is_checked_and_restored():
    """The callback's checkpoint entry: the stage and each layer's decisions, put back at the
    resumed fit's start (after entering the stage, which records decisions of its own), or at
    once where the fit has started (a strategy that restores after setup); a checkpoint
    without it warns, a malformed one or one of other layers is refused."""
    net, names = injected()
    module = CWPSLitModule(net, num_classes=3)
    layers = dict(cwps_layers(module))
    held = {name: {"soft": torch.arange(layer.mask_logits.numel()) % 2 == 0,
                   "hard": torch.zeros(layer.mask_logits.numel(), dtype=torch.bool)}
            for name, layer in layers.items()}
    saving = MaskStageCallback(1)
    checkpoint = {}
    saving.on_save_checkpoint(None, module, checkpoint)
    assert checkpoint == {}  # not inside a fit: nothing of one to keep
    saving._stage = "hard"
    for name, layer in layers.items():
        layer.decisions = {k: v.clone() for k, v in held[name].items()}
    saving.on_save_checkpoint(None, module, checkpoint)
    state = checkpoint["cwps_mask_stage"]
    assert state["stage"] == "hard" and set(state["decisions"]) == set(layers)

    def restored() -> bool:
        return all(layer.stage == "hard" and {k: v.tolist() for k, v in layer.decisions.items()}
                   == {k: v.tolist() for k, v in held[name].items()}
                   for name, layer in layers.items())

    for layer in layers.values():
        layer.decisions = {}
    loading = MaskStageCallback(1)
    loading.on_load_checkpoint(None, module, checkpoint)
    assert not restored()  # held until the fit starts
    loading.on_fit_start(None, module)
    assert restored()
    set_stage(module, "soft")
    for layer in layers.values():
        layer.decisions = {}
    started = MaskStageCallback(1)
    started.on_fit_start(SimpleNamespace(current_epoch=0), module)  # soft, from epoch 0
    started.on_load_checkpoint(None, module, checkpoint)  # after setup: applied at once
    assert restored()
    with pytest.warns(UserWarning, match="no mask-stage decisions"):
        MaskStageCallback(1).on_load_checkpoint(None, module, {})

    def refused(state, match):
        with pytest.raises(ValueError, match=match):
            MaskStageCallback(1).on_load_checkpoint(None, module, {"cwps_mask_stage": state})

    refused({"stage": "finetune", "decisions": state["decisions"]}, "'finetune'; expected")
    refused({"stage": None, "decisions": state["decisions"]}, "None; expected")
    first = next(iter(layers))
    c = layers[first].mask_logits.numel()
    refused({"stage": "soft", "decisions": {**state["decisions"], first: {"soft": torch.zeros(c)}}},
            rf"of '{first}': expected .* shape \({c},\)")
    refused({"stage": "soft", "decisions": {**state["decisions"],
                                            first: {"soft": torch.zeros(c + 1, dtype=torch.bool)}}},
            rf"shape \({c},\)")
    refused({"stage": "soft", "decisions": {"model.9": {}}},
            r"missing \[.*'model.0'.*\], not in the model \['model.9'\]")


def test_fit_keeps_shared_channels_still_in_the_hard_stage():
    """The LitModule's optimiser freezes the children of shared channels (cwps/freeze.py)."""
    net, names = injected()
    select_trainable(net, "cwps", names)
    layer = net[0]
    with torch.no_grad():
        layer.mask_logits.copy_(torch.tensor([-4.0] * 4 + [4.0] * 4))  # far from lambda = 0.5
    w0 = layer.weight.detach().clone()
    trainer = quiet_trainer(1, [MaskStageCallback(soft_epochs=0)])
    trainer.fit(CWPSLitModule(net, num_classes=3, lr=0.1, weight_decay=0.1),
                train_dataloaders=loader(32))
    shared = ~(torch.sigmoid(layer.mask_logits.detach()) >= 0.5)
    assert shared.tolist() == [True] * 4 + [False] * 4
    moved = (layer.weight.detach() != w0).flatten(1).any(1)
    assert moved.tolist() == [False] * 4 + [True] * 4


def test_the_freezes_copy_is_not_alive_in_the_training_step():
    """Lightning runs the forward and backward inside optimizer.step(closure): the freeze's
    copy of the shared channels is taken after them, so it adds nothing to their peak."""
    net, names = injected()
    select_trainable(net, "cwps", names)
    with torch.no_grad():
        net[0].mask_logits.copy_(torch.tensor([-4.0] * 4 + [4.0] * 4))
    seen = []

    class Watching(CWPSLitModule):
        def training_step(self, batch, batch_idx):
            hooks = self.trainer.optimizers[0]._optimizer_step_pre_hooks.values()
            freeze = next(h.__self__ for h in hooks
                          if isinstance(getattr(h, "__self__", None), SharedChannelFreeze))
            steps = freeze._steps.get(self.trainer.optimizers[0])
            seen.append(0 if steps is None else len(steps.pending))
            return super().training_step(batch, batch_idx)

    trainer = quiet_trainer(1, [MaskStageCallback(soft_epochs=0)])
    trainer.fit(Watching(net, num_classes=3, lr=0.1), train_dataloaders=loader(32))
    assert len(seen) > 1 and seen == [0] * len(seen)


def test_a_module_fitted_again_from_a_checkpoint_gives_the_decisions_to_its_new_freeze(
        tmp_path, monkeypatch):
    """Lightning restores the module before it asks for the optimisers: a module that kept the
    freeze of an earlier fit must not hand the checkpoint's decisions to that one."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cwps_lightning.models.lit_module import FREEZE_STATE_KEY

    torch.manual_seed(0)
    net, names = injected()
    select_trainable(net, "cwps", names)
    module = CWPSLitModule(net, num_classes=3, lr=0.1)

    def trainer(epochs):
        return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         callbacks=[MaskStageCallback(soft_epochs=0),
                                    ModelCheckpoint(dirpath=tmp_path, filename="last")],
                         enable_progress_bar=False, enable_model_summary=False)

    trainer(1).fit(module, train_dataloaders=loader())
    first = module._freeze[0]
    path = tmp_path / "last.ckpt"
    saved = torch.load(path, weights_only=True)[FREEZE_STATE_KEY]
    assert set(saved) == {f"{n}.{k}" for n in names for k in ("weight", "bias")}
    loaded = []
    original = SharedChannelFreeze.load_state_dict
    monkeypatch.setattr(SharedChannelFreeze, "load_state_dict",
                        lambda self, opt, state: (loaded.append((self, opt)),
                                                  original(self, opt, state)))
    again = trainer(2)
    again.fit(module, train_dataloaders=loader(), ckpt_path=str(path))
    assert loaded == [(module._freeze[0], again.optimizers[0])]
    assert module._freeze[0] is not first


def test_a_checkpoint_without_freeze_decisions_is_named_on_resume():
    net, _ = injected()
    module = CWPSLitModule(net, num_classes=3)
    with pytest.warns(UserWarning, match="no shared-channel freeze decisions"):
        module.on_load_checkpoint({"state_dict": {}})
    plain = CWPSLitModule(small_net(), num_classes=3)  # no CWPS layers: nothing to say
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.on_load_checkpoint({"state_dict": {}})


def test_a_fit_that_ends_inside_the_soft_stage_leaves_the_model_hard():
    """on_fit_end: the model leaves the fit in the stage it is merged and tested in, also when
    the whole fit was soft."""
    net, names = injected()
    select_trainable(net, "cwps", names)
    recorder = BatchStageRecorder()
    trainer = quiet_trainer(1, [MaskStageCallback(soft_epochs=5), recorder])
    trainer.fit(CWPSLitModule(net, num_classes=3), train_dataloaders=loader(32))
    assert recorder.stages == [{"soft"}] * 4
    assert {layer.stage for _, layer in cwps_layers(net)} == {"hard"}


def test_sharing_logs_are_the_channel_and_the_parameter_fractions():
    from cwps_lightning.cwps import sharing_stats

    torch.manual_seed(0)
    net, names = injected()
    select_trainable(net, "cwps", names)
    with torch.no_grad():  # conv: 2 of 8 channels specific, linear: all 16 (lambda 0.5)
        net[0].mask_logits.copy_(torch.tensor([4.0] * 2 + [-4.0] * 6))
        net[5].mask_logits.fill_(4.0)
    trainer = quiet_trainer(1, [MaskStageCallback(soft_epochs=0)])
    trainer.fit(CWPSLitModule(net, num_classes=3, lr=0.0, mask_lr=0.0),
                train_dataloaders=loader(32))
    stats = sharing_stats(net)
    logged = trainer.logged_metrics
    assert stats["specific_channel_fraction"] != pytest.approx(stats["specific_param_fraction"])
    assert float(logged["sharing/specific_channels"]) == pytest.approx(
        stats["specific_channel_fraction"])
    assert float(logged["sharing/specific_params"]) == pytest.approx(
        stats["specific_param_fraction"])


@pytest.mark.parametrize("soft_epochs", [1, 0.75])
def test_a_loader_without_a_length_switches_stages_at_whole_epochs(soft_epochs):
    """An iterable without a length (trainer.num_training_batches is inf): the callback cannot
    place a batch inside its epoch, so the soft stage takes whole epochs (it took one batch per
    epoch of soft_epochs: [soft, hard x 7]); a fraction is rounded up, with a warning."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(32):
                yield torch.randn(3, 8, 8, generator=g), int(torch.randint(0, 3, (), generator=g))

    net, names = injected()
    select_trainable(net, "cwps", names)
    recorder = BatchStageRecorder()
    trainer = quiet_trainer(2, [MaskStageCallback(soft_epochs), recorder])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(CWPSLitModule(net, num_classes=3),
                    train_dataloaders=DataLoader(Stream(), batch_size=8))
    assert recorder.stages == [{"soft"}] * 4 + [{"hard"}] * 4
    rounded = [str(w.message) for w in caught if "has no length" in str(w.message)]
    assert rounded == ([] if soft_epochs == 1 else [
        "the training loader has no length: the soft stage ends at a whole epoch, so "
        "soft_epochs=0.75 counts as 1"])


def test_a_module_with_every_parameter_frozen_is_refused():
    net = small_net()
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train: every parameter is frozen"):
        fit_small(CWPSLitModule(net, num_classes=3))


def test_own_groups_take_parameters_by_name_suffix_only():
    """groups={"gate": lr}: a parameter named ...gate joins the own group; one whose name only
    contains the word (gate_proj.weight) stays in the main group with weight decay."""
    from cwps_lightning.methods.base import OptimizerPlan

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_net()
            self.gate = nn.Parameter(torch.zeros(()))
            self.gate_proj = nn.Linear(3, 3)

        def forward(self, x):
            return self.gate_proj(self.body(x)) + self.gate

    net = Net()
    plan = OptimizerPlan(weight_decay=0.1, groups={"gate": 0.5})
    trainer = fit_small(CWPSLitModule(net, num_classes=3, lr=0.2, optimizer=plan))
    main, own = trainer.optimizers[0].param_groups
    assert [id(p) for p in own["params"]] == [id(net.gate)]
    assert {id(net.gate_proj.weight), id(net.gate_proj.bias)} <= {id(p) for p in main["params"]}
