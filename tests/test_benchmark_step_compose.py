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
    bench = load_benchmark("layer_overhead")
    names = ["finetune", f"cwps-{stage}", f"step-compose-{stage}"]
    models = bench.build_all(names, "resnet18", 0, torch.device("cpu"), channels_last)
    cwps, proto = models[f"cwps-{stage}"], models[f"step-compose-{stage}"]
    sc = proto.step_compose
    kept = [(m.sc_weight_child.clone(), m.sc_scores.clone()) for m in sc.modules]
    opts = {n: bench.make_optimizer(models[n]) for n in names[1:]}
    assert isinstance(opts[names[2]], bench.StepComposeSGD)
    # its warm-up compiled the step and left the state as it was, momentum buffers unmade
    for m, (child, scores) in zip(sc.modules, kept, strict=True):
        assert torch.equal(m.sc_weight_child, child) and torch.equal(m.sc_scores, scores)
        assert m.sc_weight_mom is None and m.sc_score_mom is None
    args = argparse.Namespace(batch=16, size=32, seed=0, channels_last=channels_last)
    x, y = bench.make_batch(args, torch.device("cpu"), 1000)
    layers = dict(bench.cwps_layers(cwps))
    start = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    shared = {n: torch.sigmoid(layer.mask_logits.detach()) < layer.threshold
              for n, layer in layers.items()}
    # The compiled function on resnet18's shapes (channels_last among them), three steps (the
    # later ones apply momentum): the same to rounding (children within 1e-7 of their largest
    # value). Batch 16: at batch 2 BatchNorm over two values on layer4's 1x1 maps amplifies
    # rounding about 100-fold a step. The float64 test below checks the update exactly.
    for _ in range(3):
        with torch._dynamo.config.patch(error_on_recompile=True):  # the warm-up's graph serves
            losses = [bench.train_step(models[n], opts[n], x, y) for n in names[1:]]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0.0)
    for name, layer in layers.items():
        module = proto.get_submodule(name)
        child = layer.weight.detach()
        assert not torch.equal(module.sc_weight_child, start[name]), name  # it trained
        scale = child.abs().max().item()
        torch.testing.assert_close(module.sc_weight_child, child, rtol=0.0, atol=1e-6 * scale)
        torch.testing.assert_close(module.sc_scores, layer.mask_logits.detach().float(),
                                   rtol=0.0, atol=1e-6)
        # the next forward's weight is the CWPS layer's composed one
        torch.testing.assert_close(module.weight.detach(), _composed(layer), rtol=0.0,
                                   atol=1e-6 * scale)
        if stage == "hard":  # the freeze: shared channels' children stand still, bit for bit
            rows = shared[name]
            assert torch.equal(module.sc_weight_child[rows], start[name][rows]), name


@pytest.mark.parametrize("stage", ["soft", "hard"])
def test_step_compose_matches_the_cwps_layers_while_decisions_flip(stage):
    """In float64 on a model whose CWPS layers have biases, at a learning rate that flips
    decisions both ways in the hard stage (so the freeze restores rows and zeroes the momentum
    of released ones): the same children, biases, scores and other parameters step by step."""
    import copy

    from cwps_lightning.cwps import set_stage
    from cwps_lightning.cwps.small_input import use_small_input_convs

    from .helpers import Small

    torch.set_num_threads(1)
    bench = load_benchmark("layer_overhead")
    torch.manual_seed(0)
    base = Small()
    cwps = bench.make_cwps(base, 0)
    with torch.no_grad():  # scores near lambda = 0.5: decisions that a few steps flip
        for _, layer in bench.cwps_layers(cwps):
            layer.mask_logits.copy_(torch.randn(layer.mask_logits.shape) * 0.3)
    real = copy.deepcopy(cwps).double()
    set_stage(real, stage)
    proto = copy.deepcopy(base)
    use_small_input_convs(proto)
    sc = bench.StepCompose(proto, cwps, hard=stage == "hard", compiled=False)
    proto.double()
    sc.compose_now()
    layers = dict(bench.cwps_layers(real))
    assert any(layer.bias is not None for layer in layers.values())
    lr = 2.0
    opt_real = bench.make_optimizer(real)  # the job's SGD and freeze, at this lr
    for group in opt_real.param_groups:
        group["lr"] = lr
    opt_proto = bench.StepComposeSGD(proto, sc, lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    decided = {n: torch.sigmoid(layer.mask_logits.detach()) >= layer.threshold
               for n, layer in layers.items()}
    flips = [0, 0]  # to task-specific, to shared
    for _ in range(40):
        x = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=g)
        for model, opt in ((real, opt_real), (proto, opt_proto)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for name, layer in layers.items():
            module = proto.get_submodule(name)
            torch.testing.assert_close(module.sc_weight_child, layer.weight.detach(),
                                       rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(module.sc_scores, layer.mask_logits.detach(),
                                       rtol=1e-9, atol=1e-12)
            if layer.bias is not None:
                torch.testing.assert_close(module.sc_bias_child, layer.bias.detach(),
                                           rtol=1e-9, atol=1e-12)
            now = torch.sigmoid(layer.mask_logits.detach()) >= layer.threshold
            flips[0] += int((now & ~decided[name]).sum())
            flips[1] += int((~now & decided[name]).sum())
            decided[name] = now
        own = dict(proto.named_parameters())
        for name, p in real.named_parameters():
            if name.startswith(("bn.", "head.")):
                torch.testing.assert_close(own[name], p, rtol=1e-9, atol=1e-12)
    if stage == "hard":
        assert min(flips) > 0, flips  # both ways, or the freeze's release went untested


def test_step_compose_refuses_tensors_laid_out_unlike():
    bench = load_benchmark("layer_overhead")
    t = torch.randn(4, 3, 3, 3)
    assert bench._step_rows(t).shape == (4, 27)
    cl = t.contiguous(memory_format=torch.channels_last)
    assert torch.equal(bench._step_rows(cl)[1], cl[1].permute(1, 2, 0).reshape(-1))
    with pytest.raises(ValueError, match="dense rows"):
        bench._step_rows(t.transpose(0, 1))
