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
