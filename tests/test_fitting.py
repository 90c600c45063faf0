"""fitting.fit stops a diverged fit with TrainingDiverged, whether the loss shows it or only
the weights do."""

from __future__ import annotations

import warnings

import pytest
import torch

from cwps_lightning.cwps import inject_cwps
from cwps_lightning.fitting import FitSettings, RunInterrupted, TrainingDiverged, fit
from cwps_lightning.methods.base import FitPlan, OptimizerPlan
from cwps_lightning.models import lit_module

from .helpers import Small, synthetic_tasks

TRAINER = dict(accelerator="cpu", devices=1, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False)


def _fit(net, plan=None):
    fit(net, synthetic_tasks(n_train=24, batch_size=8), "t",
        plan or FitPlan(1, seed=0, train="finetune"), FitSettings(trainer=TRAINER), [], "g", "t")


def test_a_fit_that_trains_finite_weights_returns_them():
    torch.manual_seed(0)
    net = Small()
    _fit(net)
    assert all(bool(torch.isfinite(t).all()) for t in net.state_dict().values()
               if t.is_floating_point())


def test_a_nan_loss_stops_the_fit_at_its_step(monkeypatch):
    torch.manual_seed(0)
    step = lit_module.CWPSLitModule._step

    def nan_at_step_one(self, batch, metric, prefix):
        loss = step(self, batch, metric, prefix)
        return loss * float("nan") if self.global_step == 1 else loss

    monkeypatch.setattr(lit_module.CWPSLitModule, "_step", nan_at_step_one)
    with pytest.raises(TrainingDiverged, match=r"task 't', fit g/t: .*loss is nan.*step 1 "
                                               r"\(counted from 0; lower optim\.lr, or"):
        _fit(Small())
    # a fit with its own learning rate (T0's pretraining, TAPS, Piggyback) names its key
    plan = FitPlan(1, seed=0, train="finetune", optimizer=OptimizerPlan(lr=0.1, lr_key="t0.lr"))
    with pytest.raises(TrainingDiverged, match=r"step 1 \(counted from 0; lower t0\.lr, or"):
        _fit(Small(), plan)
    # a method's own rate that names no key: that rate (it named optim.lr, which it ignores)
    plan = FitPlan(1, seed=0, train="finetune", optimizer=OptimizerPlan(lr=0.1))
    with pytest.raises(TrainingDiverged, match=r"step 1 \(counted from 0; lower the learning "
                                               r"rate its method sets \(0\.1\), or"):
        _fit(Small(), plan)
    # a fit that trains a group at its own rate names that key too: mask logits (a CWPS
    # fit) at optim.mask_lr, Piggyback's masks at methods.piggyback.mask_lr
    net = Small()
    inject_cwps(net)
    with pytest.raises(TrainingDiverged, match=r"step 1 \(counted from 0; lower optim\.lr "
                                               r"\(or optim\.mask_lr\), or"):
        _fit(net, FitPlan(1, seed=0, train="cwps"))
    plan = FitPlan(1, seed=0, train="finetune", optimizer=OptimizerPlan(
        lr=0.1, lr_key="methods.piggyback.lr",
        group_keys={"mask_real": "methods.piggyback.mask_lr"}))
    with pytest.raises(TrainingDiverged, match=r"lower methods\.piggyback\.lr \(or "
                                               r"methods\.piggyback\.mask_lr\), or"):
        _fit(Small(), plan)


def test_finite_losses_but_nan_statistics_stop_the_fit(monkeypatch):
    """lr=1e6 with one step per epoch does this: the step's loss is finite, the BatchNorm
    statistics it leaves are not."""
    torch.manual_seed(0)

    def poison(self):
        self.model.bn.running_var.fill_(float("inf"))

    monkeypatch.setattr(lit_module.CWPSLitModule, "on_train_end", poison, raising=False)
    with pytest.raises(TrainingDiverged, match=r"fit g/t: the fit ended with nan/inf in "
                                               r"bn\.running_var \(1 tensor\(s\) in all; "
                                               r"lower optim\.lr, or"):
        _fit(Small())
    plan = FitPlan(1, seed=0, train="finetune",
                   optimizer=OptimizerPlan(lr=0.1, lr_key="methods.taps.lr"))
    with pytest.raises(TrainingDiverged, match=r"in all; lower methods\.taps\.lr, or"):
        _fit(Small(), plan)


def test_sigterm_in_a_fit_stops_it_with_run_interrupted_and_no_collective(monkeypatch):
    """The signal arrives in the middle of a step (here: the forward of step 1); the fit stops
    at the epoch's end (one process) with RunInterrupted, and the handler that ran is the
    callback's: Lightning's own calls dist.broadcast inside the handler (a hang under DDP)."""
    import os
    import signal

    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    torch.manual_seed(0)
    step = lit_module.CWPSLitModule._step
    lightnings, steps = [], []

    def signal_at_step_one(self, batch, metric, prefix):
        if prefix == "train":
            steps.append((self.current_epoch, self.global_step))
            if self.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, metric, prefix)

    monkeypatch.setattr(lit_module.CWPSLitModule, "_step", signal_at_step_one)
    monkeypatch.setattr(_SignalConnector, "_sigterm_notifier_fn",
                        lambda self, signum, frame: lightnings.append(signum))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted, match=r"task 't', fit g/t: stopped by SIGTERM at epoch "
                                             r"0 .* the same command resumes the run") as stop:
        fit(Small(), synthetic_tasks(n_train=24, batch_size=8), "t",
            FitPlan(2, seed=0, train="finetune"), FitSettings(trainer=TRAINER), [], "g", "t")
    assert lightnings == []  # Lightning's notifier (with its broadcast) did not run
    assert stop.value.status == 143
    # the rest of epoch 0 ran, then the stop: none of the 2-epoch plan's epoch 1
    assert {epoch for epoch, _ in steps} == {0} and [s for _, s in steps][-1] >= 1
    assert signal.getsignal(signal.SIGTERM) == before  # (the fit put the handler back)


def test_sigterm_after_the_last_training_batch_stops_the_run_at_the_fits_end(monkeypatch):
    """In the last validation (or a checkpoint save, the teardown) the callback recorded the
    signal, but no batch end was left to act on it: the fit returned and the job went on."""
    import os
    import signal

    torch.manual_seed(0)
    step = lit_module.CWPSLitModule._step
    sent = []

    def signal_in_validation(self, batch, metric, prefix):
        if prefix == "val" and not sent:
            sent.append(self.current_epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, metric, prefix)

    monkeypatch.setattr(lit_module.CWPSLitModule, "_step", signal_in_validation)
    with pytest.raises(RunInterrupted, match=r"^task 't', fit g/t: stopped by SIGTERM at the "
                                             r"end of the fit; .* the same command resumes") as stop:
        _fit(Small())
    assert sent == [0] and stop.value.status == 143


def test_ctrl_c_in_a_fit_stops_it_with_run_interrupted_status_130(monkeypatch):
    """Lightning ends a fit Ctrl-C interrupts with sys.exit(1), its line at INFO (which the
    job keeps quiet): the run ended with status 1 and no word."""
    torch.manual_seed(0)
    step = lit_module.CWPSLitModule._step

    def interrupt_at_step_one(self, batch, metric, prefix):
        if prefix == "train" and self.global_step == 1:
            raise KeyboardInterrupt
        return step(self, batch, metric, prefix)

    monkeypatch.setattr(lit_module.CWPSLitModule, "_step", interrupt_at_step_one)
    with pytest.raises(RunInterrupted, match=r"fit g/t: stopped by Ctrl-C \(SIGINT\) at "
                                             r"epoch 0") as stopped:
        _fit(Small())
    assert stopped.value.status == 130
    # (Lightning ignores SIGINT after the first: put Python's handler back for what follows)
    import signal
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_sys_exit_in_a_fit_that_was_not_interrupted_goes_through(monkeypatch):
    step = lit_module.CWPSLitModule._step

    def exit_at_step_one(self, batch, metric, prefix):
        if prefix == "train" and self.global_step == 1:
            raise SystemExit(4)
        return step(self, batch, metric, prefix)

    monkeypatch.setattr(lit_module.CWPSLitModule, "_step", exit_at_step_one)
    with pytest.raises(SystemExit) as stopped:
        _fit(Small())
    assert stopped.value.code == 4 and not isinstance(stopped.value, RunInterrupted)


def test_a_cwps_fit_steps_the_mask_logits_at_mask_lr_without_weight_decay(monkeypatch):
    """CWPS's plans name no optimiser groups: fit gives the mask logits their own group at
    optim.mask_lr (paper: 0.02), no weight decay; the rest trains at optim.lr with decay."""
    from cwps_lightning.cwps import cwps_layers, inject_cwps

    torch.manual_seed(0)
    net = Small()
    names = inject_cwps(net)
    made = []
    configure = lit_module.CWPSLitModule.configure_optimizers

    def recording(self):
        out = configure(self)
        made.append(out["optimizer"])
        return out

    monkeypatch.setattr(lit_module.CWPSLitModule, "configure_optimizers", recording)
    fit(net, synthetic_tasks(n_train=24, batch_size=8), "t",
        FitPlan(1, seed=0, train="cwps", soft_epochs=0.5),
        FitSettings(trainer=TRAINER, lr=0.1, mask_lr=0.02, weight_decay=5e-4), names, "g", "t")
    (opt,) = made
    logits = {id(layer.mask_logits) for _, layer in cwps_layers(net)}
    (group,) = [g for g in opt.param_groups if {id(p) for p in g["params"]} & logits]
    assert {id(p) for p in group["params"]} == logits
    assert (group["initial_lr"], group["weight_decay"]) == (0.02, 0.0)
    main = opt.param_groups[0]
    assert (main["initial_lr"], main["weight_decay"]) == (0.1, 5e-4)


def test_a_plan_of_no_epochs_leaves_the_model_and_the_data_alone():
    """(A warm-up of 0 epochs): no seeding, no reshuffle, no change of what trains."""
    from unittest import mock

    net = Small()
    net.head.weight.requires_grad_(False)
    datamodule = mock.MagicMock()
    settings = FitSettings(trainer=TRAINER)
    assert fit(net, datamodule, "t", FitPlan(0, seed=0, train="finetune"), settings, [], "g",
               "t") is net
    assert datamodule.mock_calls == []
    assert not net.head.weight.requires_grad


def test_drop_checkpoints_deletes_the_named_fits_on_rank_0_only(tmp_path, monkeypatch):
    from cwps_lightning import distributed

    settings = FitSettings(trainer=TRAINER, checkpoint_dir=tmp_path)
    for name in ("a", "b"):
        (tmp_path / "g" / name).mkdir(parents=True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)  # another rank: rank 0 wrote them
    settings.drop_checkpoints("g", lambda n: True)
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["a", "b"]
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    settings.drop_checkpoints("g", lambda n: n == "a")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["b"]


def test_evaluate_top1_is_the_percentage_of_samples_right_and_keeps_the_mode():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from cwps_lightning.fitting import evaluate_top1

    class Pick(nn.Module):  # predicts the class in the first feature
        def forward(self, x):
            return nn.functional.one_hot(x[:, 0].long(), 3).float()

    x = torch.tensor([[0.0], [1.0], [2.0], [0.0], [1.0], [2.0], [0.0], [1.0], [2.0], [0.0]])
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 0, 1])  # 7 of 10 right, batches of 4, 4, 2
    model = Pick().train()
    assert evaluate_top1(model, DataLoader(TensorDataset(x, y), batch_size=4), "cpu") == 70.0
    assert model.training


def _metrics(path):
    import csv

    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_fit_resumed_from_its_checkpoint_keeps_the_metrics_of_the_epochs_before(tmp_path):
    """Lightning's CSVLogger deletes a fit's metrics.csv when the fit starts again, so a run
    resumed with checkpoints lost the rows of every epoch it did not rerun (a finished warm-up
    kept an empty directory). Now the rows up to the checkpoint's epoch stay, the rows of the
    epoch that was cut short go (it reruns), and the new epochs follow under one header."""
    from cwps_lightning.fitting import csv_logger_factory

    trainer = {**TRAINER, "enable_checkpointing": True, "log_every_n_steps": 1}
    settings = FitSettings(trainer=trainer, logger_factory=csv_logger_factory(tmp_path / "logs"),
                           checkpoint_dir=tmp_path / "ckpt")

    def run(epochs):
        torch.manual_seed(0)
        fit(Small(), synthetic_tasks(n_train=24, batch_size=8), "t",
            FitPlan(epochs, seed=0, train="finetune"), settings, [], "g", "t")

    run(2)  # stopped after its second epoch (epochs 0 and 1 in its checkpoint)
    path = tmp_path / "logs" / "g" / "t" / "metrics.csv"
    before = _metrics(path)
    assert {row["epoch"] for row in before} == {"0", "1"}
    with open(path, "a") as file:  # a row of the epoch the stop cut short
        file.write("2," + ",".join("" for _ in before[0])[:-1] + "\n")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run(3)
    # (Lightning's "Checkpoint directory ... exists and is not empty": the resumed fit's own)
    assert not [w for w in seen if "exists and is not empty" in str(w.message)]
    after = _metrics(path)
    kept = [row for row in after if row["epoch"] in ("0", "1")]
    assert [{k: row.get(k, "") for k in before[0]} for row in kept] == before
    new = [row for row in after if row["epoch"] == "2"]
    assert any(row["train/loss_step"] for row in new) and any(row["train/loss_epoch"]
                                                              for row in new)
    assert len(after) == len(before) + len(new)


def test_a_fit_without_a_checkpoint_starts_its_metrics_afresh(tmp_path):
    """(no checkpoint: the fit starts over, and so does its file, as Lightning does)"""
    from cwps_lightning.fitting import csv_logger_factory

    settings = FitSettings(trainer={**TRAINER, "log_every_n_steps": 1},
                           logger_factory=csv_logger_factory(tmp_path / "logs"))
    counts = []
    for _ in range(2):
        torch.manual_seed(0)
        fit(Small(), synthetic_tasks(n_train=24, batch_size=8), "t",
            FitPlan(1, seed=0, train="finetune"), settings, [], "g", "t")
        rows = _metrics(tmp_path / "logs" / "g" / "t" / "metrics.csv")
        counts.append(len(rows))
    assert {row["epoch"] for row in rows} == {"0"} and counts[1] == counts[0] > 0


def test_a_batch_of_one_image_at_a_1x1_batch_norm_is_a_config_error_naming_the_batch_size():
    """data.batch_size=1 (or a task of one training image) with a backbone whose feature map
    is 1x1 before a batch norm (resnet18 at 32 px) ended in torch's ValueError traceback."""
    from torch import nn

    from cwps_lightning.errors import ConfigError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4),
                        nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ConfigError, match=r"^task 't', fit g/t: a training batch of one image "
                                          r"at a 1x1 feature map .*set data\.batch_size >= 2 "
                                          r"\(it is 1\)"):
        fit(net, synthetic_tasks(n_train=4, batch_size=1), "t",
            FitPlan(1, seed=0, train="finetune"), FitSettings(trainer=TRAINER), [], "g", "t")
    # two images a batch train
    fit(net, synthetic_tasks(n_train=4, batch_size=2), "t",
        FitPlan(1, seed=0, train="finetune"), FitSettings(trainer=TRAINER), [], "g", "t")
