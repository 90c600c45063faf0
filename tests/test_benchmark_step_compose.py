"""benchmarks/layer_overhead.py's step-compose variants: a prototype of composing the weight in
the optimiser step. They must train the numbers the CWPS layers train, or their timing says
nothing about CWPS."""

from __future__ import annotations

import argparse

import pytest
import torch

from .helpers import load_benchmark


def _composed(layer) -> torch.Tensor:
    sig = torch.sigmoid(layer.mask_logits.detach())
    m = (sig >= layer.threshold).to(sig.dtype) if layer.stage == "hard" else sig
    return torch.lerp(layer.parent_weight, layer.weight.detach(), m.view(-1, 1, 1, 1))


@pytest.mark.parametrize("stage,channels_last", [("soft", True), ("hard", False)])
def test_step_compose_trains_what_the_cwps_layers_train(stage, channels_last):
    torch.set_num_threads(2)
    bench = load_benchmark("layer_overhead")
    names = ["finetune", f"cwps-{stage}", f"step-compose-{stage}"]
    models = bench.build_all(names, "resnet18", 0, torch.device("cpu"), channels_last)
    cwps, proto = models[f"cwps-{stage}"], models[f"step-compose-{stage}"]
    opts = {n: bench.make_optimizer(models[n]) for n in names[1:]}
    assert isinstance(opts[names[2]], bench.StepComposeSGD)
    args = argparse.Namespace(batch=2, size=32, seed=0, channels_last=channels_last)
    x, y = bench.make_batch(args, torch.device("cpu"), 1000)
    layers = dict(bench.cwps_layers(cwps))
    start = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    shared = {n: torch.sigmoid(layer.mask_logits.detach()) < layer.threshold
              for n, layer in layers.items()}
    # Two steps (the second applies momentum). They differ by rounding only (the first step's
    # children by 4e-8 of their largest value), but a random resnet18 at batch 2 amplifies
    # that about 100-fold a step (BatchNorm over two values on layer4's 1x1 maps), so a third
    # step would need a tolerance that hides real differences.
    for _ in range(2):
        losses = [bench.train_step(models[n], opts[n], x, y) for n in names[1:]]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0.0)
    for name, layer in layers.items():
        module = proto.get_submodule(name)
        child = layer.weight.detach()
        assert not torch.equal(module.sc_weight_child, start[name]), name  # it trained
        scale = child.abs().max().item()
        torch.testing.assert_close(module.sc_weight_child, child, rtol=0.0, atol=1e-5 * scale)
        torch.testing.assert_close(module.sc_scores, layer.mask_logits.detach().float(),
                                   rtol=0.0, atol=1e-6)
        # the next forward's weight is the CWPS layer's composed one
        torch.testing.assert_close(module.weight.detach(), _composed(layer), rtol=0.0,
                                   atol=1e-5 * scale)
        if stage == "hard":  # the freeze: shared channels' children stand still, bit for bit
            rows = shared[name]
            assert torch.equal(module.sc_weight_child[rows], start[name][rows]), name


def test_step_compose_refuses_tensors_laid_out_unlike():
    bench = load_benchmark("layer_overhead")
    t = torch.randn(4, 3, 3, 3)
    assert bench._step_rows(t).shape == (4, 27)
    cl = t.contiguous(memory_format=torch.channels_last)
    assert torch.equal(bench._step_rows(cl)[1], cl[1].permute(1, 2, 0).reshape(-1))
    with pytest.raises(ValueError, match="dense rows"):
        bench._step_rows(t.transpose(0, 1))
