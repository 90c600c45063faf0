"""benchmarks/layer_overhead.py's cwps-floor variant: what it switches off and what it keeps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cwps_lightning.cwps import CWPSConv2d, set_stage

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "layer_overhead.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("layer_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layer_pair(bench):
    torch.manual_seed(0)
    real = CWPSConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1))
    with torch.no_grad():
        real.set_parent(torch.randn_like(real.parent_weight), torch.randn_like(real.bias))
        real.mask_logits.normal_()
    set_stage(real, "soft")
    floor = CWPSConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1))
    floor.load_state_dict(real.state_dict())
    set_stage(floor, "soft")
    floor.__class__ = bench.FloorConv2d
    return real, floor


def test_floor_skips_the_compose_and_mask_gradient_off_1x1_maps():
    real, floor = layer_pair(load_bench())
    x = torch.randn(2, 4, 5, 5)
    y = floor(x)
    torch.testing.assert_close(y, F.conv2d(x, floor.weight, floor.bias, padding=1))
    assert not torch.allclose(y, real(x))  # the real layer composes with the parent
    y.sum().backward()
    assert torch.equal(floor.mask_logits.grad, torch.zeros(6))
    m = torch.sigmoid(floor.mask_logits.detach()).view(-1, 1, 1, 1)
    w = floor.weight.detach().clone().requires_grad_()
    F.conv2d(x, w, floor.bias.detach(), padding=1).sum().backward()
    torch.testing.assert_close(floor.weight.grad, w.grad * m)


def test_floor_is_the_real_layer_on_a_1x1_map():
    real, floor = layer_pair(load_bench())
    x = torch.randn(3, 4, 1, 1)
    yr, yf = real(x), floor(x)
    assert torch.equal(yr, yf)
    yr.sum().backward()
    yf.sum().backward()
    assert torch.equal(real.mask_logits.grad, floor.mask_logits.grad)
    assert torch.equal(real.weight.grad, floor.weight.grad)
