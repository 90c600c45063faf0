"""benchmarks/layer_overhead.py: --channels-last builds what the training job trains."""

from __future__ import annotations

import argparse

import torch

from .helpers import load_benchmark


def test_channels_last_puts_every_variant_and_the_batch_in_nhwc():
    bench = load_benchmark("layer_overhead")
    names = ["finetune", "cwps-hard"]
    models = bench.build_all(names, "resnet18", 0, torch.device("cpu"), channels_last=True)
    for name in names:
        # (a 1x1 kernel is contiguous in both formats: the 3x3 ones tell)
        kernels = [t for t in models[name].state_dict().values()
                   if t.dim() == 4 and t.shape[-1] > 1]
        assert kernels and all(t.is_contiguous(memory_format=torch.channels_last)
                               and not t.is_contiguous() for t in kernels), name
    args = argparse.Namespace(batch=2, size=32, seed=0, channels_last=True)
    x, _ = bench.make_batch(args, torch.device("cpu"), 10)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    plain = bench.build_all(["finetune"], "resnet18", 0, torch.device("cpu"))["finetune"]
    assert plain.conv1.weight.is_contiguous()
    assert bench.parse_args(["--channels-last"]).channels_last
    assert not bench.parse_args([]).channels_last


def test_per_layer_variants_are_the_stage_without_its_groups():
    """cwps-hard-per-layer: the same layers, stage and step as cwps-hard (the same loss and
    gradients bit for bit on resnet18, whose layers each run once), only without ComposeGroups."""
    bench = load_benchmark("layer_overhead")
    names = ["finetune", "cwps-hard", "cwps-hard-per-layer"]
    torch.manual_seed(0)
    models = bench.build_all(names, "resnet18", 0, torch.device("cpu"))
    grouped, per_layer = models["cwps-hard"], models["cwps-hard-per-layer"]
    layers = dict(bench.cwps_layers(per_layer))
    assert all(layer.stage == "hard" and "_compose_group" not in layer.__dict__
               for layer in layers.values())
    assert any("_compose_group" in layer.__dict__ for _, layer in bench.cwps_layers(grouped))
    args = argparse.Namespace(batch=2, size=32, seed=0, channels_last=False)
    x, y = bench.make_batch(args, torch.device("cpu"), 1000)
    losses = [bench.train_step(m, bench.make_optimizer(m), x, y) for m in (grouped, per_layer)]
    assert torch.equal(*losses)
    for (name, a), b in zip(grouped.named_parameters(), per_layer.parameters(), strict=True):
        assert torch.equal(a, b), name  # after one SGD step: the same gradients
    assert "cwps-soft-per-layer" in bench.EXTRA_VARIANTS


def test_cwps_variants_step_with_the_jobs_shared_channel_freeze():
    """The hard step restores the shared channels after the SGD step, as the training job's
    optimiser does; fine-tuning's optimiser has no such hook."""
    bench = load_benchmark("layer_overhead")
    models = bench.build_all(["finetune", "cwps-hard"], "resnet18", 0, torch.device("cpu"))
    ft_opt = bench.make_optimizer(models["finetune"])
    assert not ft_opt._optimizer_step_post_hooks
    model = models["cwps-hard"]
    opt = bench.make_optimizer(model)
    hooks = opt._optimizer_step_post_hooks.values()
    assert any(isinstance(getattr(h, "__self__", None), bench.SharedChannelFreeze) for h in hooks)
    opt.param_groups[0]["weight_decay"] = 0.1  # moves every row, shared ones too, unless restored
    layer = model.layer1[0].conv1
    shared = torch.sigmoid(layer.mask_logits.detach()) < layer.threshold
    assert shared.any() and (~shared).any()
    before = layer.weight.detach().clone()
    args = argparse.Namespace(batch=2, size=32, seed=0, channels_last=False)
    x, y = bench.make_batch(args, torch.device("cpu"), 1000)
    bench.train_step(model, opt, x, y)
    moved = (layer.weight.detach() != before).flatten(1).any(1)
    assert not moved[shared].any() and moved[~shared].all()
