"""A fit whose CWPS layers compose at the step (cwps.compose=step): the Lightning module steps
with StepComposeSGD and trains as the forward compose does; what it cannot do is refused."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from cwps_lightning.callbacks import MaskStageCallback
from cwps_lightning.cwps import cwps_layers, release_composed, use_step_compose
from cwps_lightning.cwps.step_compose import StepComposeSGD
from cwps_lightning.methods.base import OptimizerPlan
from cwps_lightning.models import CWPSLitModule, select_trainable
from cwps_lightning.settings import CWPSSettings

from .test_module_and_callbacks import injected, loader


def mask_fit(net, names, epochs=2, soft_epochs=0.75, mode="cwps", **trainer_args):
    select_trainable(net, mode, names)
    module = CWPSLitModule(net, num_classes=3, lr=0.1, mask_lr=20.0, weight_decay=0.01,
                           **trainer_args.pop("module", {}))
    trainer = L.Trainer(max_epochs=epochs, callbacks=[MaskStageCallback(soft_epochs)],
                        accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, **trainer_args)
    trainer.fit(module, train_dataloaders=loader(32))
    return trainer


def scored_pair():
    torch.manual_seed(0)
    net, names = injected()
    with torch.no_grad():
        for _, layer in cwps_layers(net):
            layer.mask_logits.normal_(0.0, 1.0)
    step = copy.deepcopy(net)
    use_step_compose(step)
    return net, step, names


def assert_same(net, step):
    for (name, a), b in zip(net.named_parameters(), step.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_a_step_compose_fit_trains_as_the_forward_compose_fit():
    net, step, names = scored_pair()
    decisions = []
    for model in (net, step):
        trainer = mask_fit(model, names)
        decisions.append([layer.task_specific().tolist() for _, layer in cwps_layers(model)])
    assert type(trainer.optimizers[0]) is StepComposeSGD
    assert not trainer.optimizers[0]._optimizer_step_post_hooks  # no SharedChannelFreeze
    assert decisions[0] == decisions[1]
    assert_same(net, step)
    # some layer shares and keeps channels: the hard stage's hold on shared rows had work
    assert any(not all(d) and any(d) for d in decisions[0])


def test_gradients_accumulated_over_the_soft_to_hard_switch():
    """accumulate_grad_batches=3 with the switch at the third batch (soft_epochs 0.5 of 4
    batches): the soft batches' gradient reaches the child and the scores under the soft mask,
    as the forward mode sums it."""
    net, step, names = scored_pair()
    for model in (net, step):
        mask_fit(model, names, epochs=2, soft_epochs=0.5, accumulate_grad_batches=3)
    assert_same(net, step)


def test_a_fit_that_trains_no_step_layer_steps_as_the_forward_mode():
    """The frozen mode (normalisation layers and head only) on a step-compose model: torch's
    SGD, as in the forward mode, and the same weights."""
    net, step, names = scored_pair()
    for model in (net, step):
        trainer = mask_fit(model, names, epochs=1, mode="frozen")
        assert type(trainer.optimizers[0]) is not StepComposeSGD
    assert_same(net, step)


def test_a_test_run_after_release_composes_again():
    """trainer.test (inference_mode) on a step-compose model whose composed weights were
    released: the same accuracy as the forward mode."""
    net, step, names = scored_pair()
    release_composed(step)
    results = []
    for model in (net, step):
        mask_fit(model, names, epochs=1)
        release_composed(model)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        results.append(trainer.test(CWPSLitModule(model, num_classes=3), loader(16),
                                    verbose=False)[0]["test/loss"])
    assert results[1] == pytest.approx(results[0], rel=1e-4)


@pytest.mark.parametrize("trainer_args, message", [
    ({"module": {"optimizer": OptimizerPlan("adam")}}, "steps with SGD; this fit's optimiser"),
    ({"gradient_clip_val": 1.0}, "does not clip gradients"),
])
def test_a_step_compose_fit_refuses(trainer_args, message):
    net, names = injected()
    use_step_compose(net)
    with pytest.raises(ValueError, match=message):
        mask_fit(net, names, epochs=1, **trainer_args)


def test_a_step_compose_fit_refuses_fp16_mixed_precision():
    """(On the CPU Lightning runs 16-mixed as bf16-mixed: a GPU trainer's settings, stubbed.)"""
    net, names = injected()
    use_step_compose(net)
    module = CWPSLitModule(net, num_classes=3)
    module._trainer = SimpleNamespace(precision="16-mixed", gradient_clip_val=None,
                                      world_size=1)
    with pytest.raises(ValueError, match="does not run under trainer.precision=16-mixed"):
        module.configure_optimizers()
    module._trainer.precision = "bf16-mixed"
    opt = module._step_compose_sgd([{"params": list(net.parameters())}], "sgd", 0.1, 0.0)
    assert type(opt) is StepComposeSGD and opt.process_group is None


def test_the_setting_is_checked():
    assert CWPSSettings(compose="step").compose == "step"
    with pytest.raises(ValueError, match=r"cwps.compose.*'backward'"):
        CWPSSettings(compose="backward")
