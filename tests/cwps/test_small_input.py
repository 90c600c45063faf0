"""cwps/small_input.py: convolutions on a 1x1 input computed as 1x1 convolutions."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from cwps_lightning.cwps.small_input import (
    SmallInputConv2d,
    centre_tap,
    use_small_input_convs,
)


@pytest.mark.parametrize(
    "input_hw, kernel, stride, padding, dilation, expected",
    [
        ((1, 1), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1)),
        ((1, 1), (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),
        ((1, 1), (3, 3), (1, 1), (2, 2), (2, 2), (1, 1)),
        ((1, 1), (5, 5), (1, 1), (2, 2), (1, 1), (2, 2)),
        ((1, 1), (1, 3), (1, 1), (0, 1), (1, 1), (0, 1)),
        ((1, 1), (3, 3), (1, 1), (2, 2), (1, 1), None),  # output 3x3
        ((1, 1), (3, 3), (1, 1), (0, 0), (1, 1), None),  # no output at all
        ((1, 1), (3, 3), (1, 1), (1, 1), (2, 2), None),  # no tap meets the pixel
        ((1, 1), (1, 1), (1, 1), (0, 0), (1, 1), None),  # already 1x1
        ((2, 2), (3, 3), (1, 1), (1, 1), (1, 1), None),
        ((1, 2), (3, 3), (1, 1), (1, 1), (1, 1), None),
    ],
)
def test_centre_tap(input_hw, kernel, stride, padding, dilation, expected):
    assert centre_tap(input_hw, kernel, stride, padding, dilation) == expected


CASES = [
    (dict(in_channels=8, out_channels=5, kernel_size=3, padding=1), (4, 8, 1, 1)),
    (dict(in_channels=8, out_channels=5, kernel_size=3, padding=1, stride=2, bias=False),
     (4, 8, 1, 1)),
    (dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8), (4, 8, 1, 1)),
    (dict(in_channels=8, out_channels=6, kernel_size=5, padding=4, dilation=2, groups=2),
     (4, 8, 1, 1)),
    (dict(in_channels=8, out_channels=5, kernel_size=3, padding=1), (4, 8, 2, 2)),  # no shortcut
    (dict(in_channels=8, out_channels=5, kernel_size=3, padding="same"), (4, 8, 1, 1)),
]


@pytest.mark.parametrize("kwargs, shape", CASES)
def test_small_input_conv_equals_conv2d_with_gradients(kwargs, shape):
    plain = nn.Conv2d(**kwargs)
    fast = copy.deepcopy(plain)
    assert use_small_input_convs(fast) == 1 and type(fast) is SmallInputConv2d
    x = torch.randn(shape)
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_plain, y_fast = plain(xp), fast(xf)
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_plain)
    y_plain.backward(g)
    y_fast.backward(g)
    torch.testing.assert_close(xf.grad, xp.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    if plain.bias is not None:
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)


def test_small_input_conv_takes_the_shortcut():
    """The shortcut is taken: the result ignores every tap but the centre one."""
    conv = SmallInputConv2d(4, 3, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 1, 1)
    before = conv(x)
    with torch.no_grad():
        conv.weight[:, :, 0, :] = float("nan")  # taps that only ever meet padding
    after = conv(x)
    assert torch.equal(before, after)


def test_resnet18_at_32px_unchanged_by_the_switch():
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    fast = copy.deepcopy(model)
    n = use_small_input_convs(fast)
    assert n == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert set(fast.state_dict()) == set(model.state_dict())
    x = torch.randn(2, 3, 32, 32)  # layer4 runs on 1x1 maps
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert use_small_input_convs(fast) == 0  # idempotent


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stage", ["soft", "hard"])
def test_cwps_layer_takes_the_shortcut(stage, channels_last):
    """CWPSConv2d on a 1x1 map composes and convolves only the centre tap: poisoning every
    other tap of child and parent changes nothing, in the output or the gradients."""
    from cwps_lightning.cwps import CWPSConv2d

    torch.manual_seed(0)
    layer = CWPSConv2d(6, 4, 3, padding=1)
    with torch.no_grad():
        layer.set_parent(torch.randn_like(layer.weight), torch.randn_like(layer.bias))
        layer.mask_logits.copy_(torch.tensor([-2.0, 2.0, -0.5, 0.5]))
    layer.stage = stage
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layer.to(memory_format=fmt)
    x = torch.randn(3, 6, 1, 1).to(memory_format=fmt)

    def run():
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        return y.detach(), layer.weight.grad[:, :, 1, 1].clone(), layer.mask_logits.grad.clone()

    before = run()
    with torch.no_grad():
        for w in (layer.weight, layer.parent_weight):
            centre = w[:, :, 1, 1].clone()
            w.fill_(float("nan"))
            w[:, :, 1, 1] = centre
    after = run()
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    assert torch.all(layer.weight.grad[:, :, 0, :] == 0)
