"""benchmarks/layer_overhead.py's cwps-floor variant: what it switches off and what it keeps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .helpers import cwps_conv_twins, load_benchmark


def layer_pair(bench):
    real, floor = cwps_conv_twins("soft")
    floor.__class__ = bench.FloorConv2d
    return real, floor


def test_floor_skips_the_compose_and_mask_gradient_off_1x1_maps():
    real, floor = layer_pair(load_benchmark("layer_overhead"))
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
    real, floor = layer_pair(load_benchmark("layer_overhead"))
    x = torch.randn(3, 4, 1, 1)
    yr, yf = real(x), floor(x)
    assert torch.equal(yr, yf)
    yr.sum().backward()
    yf.sum().backward()
    assert torch.equal(real.mask_logits.grad, floor.mask_logits.grad)
    assert torch.equal(real.weight.grad, floor.weight.grad)
