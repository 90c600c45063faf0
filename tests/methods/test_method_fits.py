"""The methods trained by the runner on a tiny digits task: what each one trains, what it keeps
of T0, and what it counts as stored (methods/base.py, baselines.py, taps.py, piggyback.py)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from cwps_lightning.cwps import KernelBank
from cwps_lightning.data.digits import DigitsDataModule
from cwps_lightning.fitting import FitSettings
from cwps_lightning.methods import taps
from cwps_lightning.methods.base import additive_param_count, head_param_count, split_param_count
from cwps_lightning.methods.baselines import FineTune, Frozen
from cwps_lightning.methods.piggyback import PiggybackMethod
from cwps_lightning.methods.taps import TAPSMethod
from cwps_lightning.runner import T0, Runner
from cwps_lightning.settings import PiggybackSettings, TAPSSettings

from .helpers import NORM_TYPES

TASK = "optdigits"
TRAINER = dict(accelerator="cpu", devices=1, enable_checkpointing=False,
               enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0)


def tiny_runner(epochs: int = 1) -> Runner:
    dm = DigitsDataModule(image_size=16, limit_per_task=64, tasks=[TASK], batch_size=16, seed=0)
    torch.manual_seed(0)
    t0 = timm.create_model("resnet18", pretrained=False, num_classes=10)
    return Runner(dm, t0, FitSettings(trainer=TRAINER), epochs=epochs, seed=1)


def shareable_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


def norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and running statistics of every normalisation layer."""
    return {f"{name}.{k}": v.detach().clone() for name, m in model.named_modules()
            if isinstance(m, NORM_TYPES) for k, v in m.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runner() -> Runner:
    return tiny_runner()


def test_taps_with_every_gate_closed_keeps_t0s_weights_and_costs_what_frozen_costs(runner):
    """A gate penalty that outweighs the loss closes every gate during the fit: the merged
    model is T0's layers with its own norms and head, the frozen baseline's kind of model, and
    costs exactly what the frozen baseline's does."""
    method = TAPSMethod(TAPSSettings(lam=1000.0, gate_lr=0.1, penalty_from_epoch=0))
    trained = method.train(TASK, 0, runner.new_bank(), runner)
    assert trained.info["open_layers"] == 0 and trained.info["open"] == []
    merged = shareable_weights(trained.model, runner.shareable)
    t0 = shareable_weights(runner.t0, runner.shareable)
    assert all(torch.equal(merged[n], t0[n]) for n in t0)
    assert not same_state(norm_state(trained.model), norm_state(runner.t0))  # norms trained
    frozen = Frozen().train(TASK, 0, runner.new_bank(), runner)
    assert trained.params == frozen.params == {
        "kernels": 0, "task_own": split_param_count(trained.model, runner.shareable)["task_own"]}


def test_taps_penalty_counts_only_from_its_epoch(runner):
    """The same fit with the penalty starting after the only epoch leaves gates open: what
    closed them above was the penalty, from the epoch it is told to start."""
    method = TAPSMethod(TAPSSettings(lam=1000.0, gate_lr=0.1, penalty_from_epoch=1))
    trained = method.train(TASK, 0, runner.new_bank(), runner)
    assert trained.info["open_layers"] > 0


def test_taps_cost_is_the_full_residual_of_each_open_layer():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    names = taps.inject_taps(model)
    every = split_param_count(timm.create_model("resnet18", num_classes=10), names)
    assert taps.task_param_count(model) == every  # all open: fine-tuning's cost
    closed = names[:3]
    with torch.no_grad():
        for n in closed:
            model.get_submodule(n).gate.fill_(0.0)
    saved = sum(model.get_submodule(n).weight.numel() for n in closed)
    assert taps.task_param_count(model) == {"kernels": every["kernels"] - saved,
                                            "task_own": every["task_own"]}


@pytest.mark.parametrize("train_norms", [False, True])
def test_piggyback_trains_masks_and_head_and_keeps_or_trains_norms(runner, train_norms):
    """Every merged weight is T0's or zero (a binary mask of it); the head trains; norms keep
    T0's parameters and running statistics unless train_norms. Cost: a bit per masked weight,
    the head, and the norms only if they trained."""
    settings = PiggybackSettings(mask_lr=0.01, train_norms=train_norms)
    trained = PiggybackMethod(settings).train(TASK, 0, runner.new_bank(), runner)
    merged = shareable_weights(trained.model, runner.shareable)
    t0 = shareable_weights(runner.t0, runner.shareable)
    for n, w in merged.items():
        assert torch.equal(w, torch.where(w == 0, 0.0, t0[n])), n
    kept = trained.info["kept_weights"]
    assert 0.5 < kept < 1.0  # at mask_lr 0.01 some masks cross the threshold, most do not
    assert same_state(norm_state(trained.model), norm_state(runner.t0)) is not train_norms
    new_head = runner.new_model(TASK).get_classifier().weight
    assert not torch.equal(trained.model.get_classifier().weight, new_head)
    masked = sum(w.numel() for w in t0.values())
    counts = split_param_count(trained.model, runner.shareable)
    head = sum(p.numel() for p in trained.model.get_classifier().parameters())
    own = counts["task_own"] if train_norms else head
    assert trained.params == {"kernels": masked / 32, "task_own": own}


def test_methods_that_share_only_with_t0_add_their_costs_up_to_the_banks_count(runner):
    """Fine-tuning's additive count (T0 + each task's full copy) is what a bank holding the
    fine-tuned model counts: the two ways of counting agree."""
    trained = FineTune().train(TASK, 0, runner.new_bank(), runner)
    bank = runner.new_bank()
    bank.add(TASK, trained.model, 10)
    # (the runner adds the head's count to every task's params, as here)
    tasks = {TASK: {"params": {"heads": head_param_count(trained.model), **trained.params}}}
    assert additive_param_count(bank.param_count([T0]), tasks) == bank.param_count()
    assert isinstance(bank, KernelBank)


def test_runner_keeps_only_sharing_methods_models_in_the_bank(runner):
    result = runner.run_method(Frozen(), runner.new_result(Frozen()))
    assert result.bank.tasks == [T0] and not result.shares_tasks
    entry = result.tasks[TASK]
    assert entry["params"]["kernels"] == 0 and entry["seconds"] >= 0.0
    assert result.done == [[0, TASK]] and result.history[0]["accepted"]
    summary = result.summary(runner.backbone_params)
    counts = summary["params"]
    t0 = runner.new_bank().param_count()
    assert counts["total"] == t0["total"] + entry["params"]["task_own"]
    # frozen: the head is the task's own, so the paper's ratio adds only the task's norms
    head = sum(p.numel() for p in runner.new_model(TASK).get_classifier().parameters())
    assert entry["params"]["heads"] == head
    norms = entry["params"]["task_own"] - entry["params"]["heads"]
    assert summary["param_ratio"] == (runner.backbone_params + norms) / runner.backbone_params


def test_the_readme_lora_example_trains_merges_and_counts(runner):
    """examples/lora.py, the README's one-file method: it trains (the merged weights leave
    T0's), merges back into plain layers, and stores far fewer kernel parameters than a copy."""
    from examples import lora

    method = lora.LoRA()
    trained = method.train(TASK, 0, runner.new_bank(), runner)
    merged = shareable_weights(trained.model, runner.shareable)
    t0 = shareable_weights(runner.t0, runner.shareable)
    assert any(not torch.equal(merged[n], t0[n]) for n in t0)
    assert not list(lora.layers_of(trained.model, (lora.LoRAConv2d, lora.LoRALinear)))
    full = split_param_count(runner.t0, runner.shareable)["kernels"]
    assert 0 < trained.params["kernels"] < full / 10


def test_resume_restores_every_methods_record_and_count(runner, tmp_path):
    """The progress record in the store's manifest brings back each method's finished visits
    and, for a method that shares with T0 only, its parameter count (no models needed)."""
    from omegaconf import OmegaConf

    from cwps_lightning.cwps.method import CWPSMethod
    from cwps_lightning.persist import RunRecorder
    from cwps_lightning.settings import CWPSSettings

    methods = [CWPSMethod(CWPSSettings()), Frozen()]
    results = {m.name: runner.new_result(m) for m in methods}
    runner.run_method(methods[1], results["frozen"])
    recorder = RunRecorder(tmp_path, OmegaConf.create({"seed": 0}), backbone={}, cwps_meta={})
    recorder.save(results)
    restored = recorder.restore(recorder.existing(), runner, methods)
    assert set(restored) == {"cwps", "frozen"}
    again, before = restored["frozen"], results["frozen"]
    assert (again.tasks, again.done, again.history) == (before.tasks, before.done, before.history)
    assert again.summary(runner.backbone_params) == before.summary(runner.backbone_params)
    assert restored["cwps"].shares_tasks and restored["cwps"].bank.tasks == [T0]


def test_frozen_keeps_t0s_shareable_weights_and_trains_its_norms_and_head(runner):
    """The feature extractor: T0's convolutions and linear layers untouched, the task's own
    normalisation layers and head trained."""
    trained = Frozen().train(TASK, 0, runner.new_bank(), runner)
    kept = shareable_weights(trained.model, runner.shareable)
    t0 = shareable_weights(runner.t0, runner.shareable)
    assert all(torch.equal(kept[n], t0[n]) for n in t0)
    assert not same_state(norm_state(trained.model), norm_state(runner.t0))
    new_head = runner.new_model(TASK).get_classifier().weight
    assert not torch.equal(trained.model.get_classifier().weight, new_head)
