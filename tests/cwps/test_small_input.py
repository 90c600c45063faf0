"""cwps/small_input.py: convolutions on a 1x1 input computed as 1x1 convolutions."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from cwps_lightning.cwps.small_input import (
    SmallInputConv2d,
    live_window,
    use_small_input_convs,
)


def _centre(window):
    """The window's single tap, or None (for the 1x1-map cases)."""
    if window is None:
        return None
    (r0, r1), (c0, c1) = window.taps
    assert (r1 - r0, c1 - c0) == (1, 1) and window.pixels == ((0, 1, window.pixels[0][2]),
                                                              (0, 1, window.pixels[1][2]))
    return r0, c0


@pytest.mark.parametrize(
    "input_hw, kernel, stride, padding, dilation, expected",
    [
        ((1, 1), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1)),
        ((1, 1), (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),
        ((1, 1), (3, 3), (1, 1), (2, 2), (2, 2), (1, 1)),
        ((1, 1), (5, 5), (1, 1), (2, 2), (1, 1), (2, 2)),
        ((1, 1), (1, 3), (1, 1), (0, 1), (1, 1), (0, 1)),
        ((1, 1), (1, 1), (1, 1), (0, 0), (1, 1), (0, 0)),  # a 1x1 conv on a 1x1 map
        ((1, 1), (3, 3), (1, 1), (2, 2), (1, 1), None),  # output 3x3
        ((1, 1), (3, 3), (1, 1), (0, 0), (1, 1), None),  # no output at all
        ((1, 1), (3, 3), (1, 1), (1, 1), (2, 2), None),  # no tap meets the pixel
        ((2, 2), (3, 3), (1, 1), (1, 1), (1, 1), None),  # output 2x2
        ((1, 2), (3, 3), (1, 1), (1, 1), (1, 1), None),
    ],
)
def test_live_window_on_a_1x1_map_is_one_tap(input_hw, kernel, stride, padding, dilation,
                                             expected):
    assert _centre(live_window(input_hw, kernel, stride, padding, dilation)) == expected


@pytest.mark.parametrize(
    "input_hw, kernel, stride, padding, dilation, taps, pixels",
    [
        # resnet's stride-2 3x3 conv from 2x2 to 1x1: the bottom-right 2x2 taps meet all four
        ((2, 2), (3, 3), (2, 2), (1, 1), (1, 1), ((1, 3), (1, 3)), ((0, 2, 1), (0, 2, 1))),
        # its stride-2 1x1 downsample from 2x2: one pixel
        ((2, 2), (1, 1), (2, 2), (0, 0), (1, 1), ((0, 1), (0, 1)), ((0, 1, 1), (0, 1, 1))),
        # a valid 3x3 conv on a 3x3 map: the whole kernel and the whole input
        ((3, 3), (3, 3), (1, 1), (0, 0), (1, 1), ((0, 3), (0, 3)), ((0, 3, 1), (0, 3, 1))),
        # dilation 2, padding 1 on a 3x3 map: only tap 1 meets a pixel (the centre one)
        ((3, 3), (3, 3), (3, 3), (1, 1), (2, 2), ((1, 2), (1, 2)), ((1, 2, 2), (1, 2, 2))),
        # dilation 2 on a 3x3 map: taps 0..1 meet pixels 0 and 2 (step 2), pixel 1 is skipped
        ((3, 3), (2, 2), (2, 2), (0, 0), (2, 2), ((0, 2), (0, 2)), ((0, 3, 2), (0, 3, 2))),
    ],
)
def test_live_window_geometry(input_hw, kernel, stride, padding, dilation, taps, pixels):
    window = live_window(input_hw, kernel, stride, padding, dilation)
    assert window is not None and window.taps == taps and window.pixels == pixels


CASES = [
    (dict(in_channels=8, out_channels=5, kernel_size=3, padding=1), (4, 8, 1, 1)),
    (dict(in_channels=8, out_channels=5, kernel_size=3, padding=1, stride=2, bias=False),
     (4, 8, 1, 1)),
    (dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8), (4, 8, 1, 1)),
    (dict(in_channels=8, out_channels=6, kernel_size=5, padding=4, dilation=2, groups=2),
     (4, 8, 1, 1)),
    (dict(in_channels=8, out_channels=5, kernel_size=3, padding=1), (4, 8, 2, 2)),  # no shortcut
    (dict(in_channels=8, out_channels=5, kernel_size=3, padding="same"), (4, 8, 1, 1)),
    # output 1x1 from larger maps: stride-2 3x3 and 1x1 convs from 2x2 (resnet's layer4 entry at
    # 32 px), a valid 3x3 on 3x3, a dilated grouped one that skips a pixel, a 1x1 on 1x1
    (dict(in_channels=8, out_channels=5, kernel_size=3, padding=1, stride=2), (4, 8, 2, 2)),
    (dict(in_channels=8, out_channels=5, kernel_size=1, stride=2, bias=False), (4, 8, 2, 2)),
    (dict(in_channels=8, out_channels=5, kernel_size=3), (4, 8, 3, 3)),
    (dict(in_channels=8, out_channels=4, kernel_size=2, stride=2, dilation=2, groups=2),
     (4, 8, 3, 3)),
    (dict(in_channels=8, out_channels=5, kernel_size=1), (4, 8, 1, 1)),
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


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kwargs, shape", CASES[-5:])
def test_small_input_conv_weight_gradient_keeps_the_weight_layout(kwargs, shape, channels_last):
    """The full-size weight gradient of the shortcut has the weight's memory format (so
    autograd does not copy it into that format), zero outside the window."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = SmallInputConv2d(**kwargs).to(memory_format=fmt)
    x = torch.randn(shape).to(memory_format=fmt)
    conv(x).square().sum().backward()
    assert conv.weight.grad.stride() == conv.weight.stride()
    window = live_window(shape[-2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    outside = conv.weight.grad.clone()
    window.kernel(outside).zero_()
    assert outside.abs().sum() == 0 and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_input_conv_under_autocast(dtype):
    """Under CPU autocast the shortcut computes in the autocast dtype, as F.conv2d would, and
    returns gradients in the parameters' dtype."""
    plain = nn.Conv2d(8, 5, 3, padding=1, stride=2)
    fast = copy.deepcopy(plain)
    use_small_input_convs(fast)
    x = torch.randn(4, 8, 2, 2)
    with torch.autocast("cpu", dtype=dtype):
        y_plain, y_fast = plain(x), fast(x)
    assert y_fast.dtype == y_plain.dtype == dtype
    torch.testing.assert_close(y_fast.float(), y_plain.float(), rtol=2e-2, atol=2e-2)
    y_fast.float().sum().backward()
    y_plain.float().sum().backward()
    assert fast.weight.grad.dtype == torch.float32 and fast.bias.grad.dtype == torch.float32
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(fast.bias.grad, plain.bias.grad, rtol=2e-2, atol=5e-2)


def test_small_input_conv_takes_the_shortcut():
    """The shortcut is taken: the result ignores every tap but the centre one."""
    conv = SmallInputConv2d(4, 3, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 1, 1)
    before = conv(x)
    with torch.no_grad():
        conv.weight[:, :, 0, :] = float("nan")  # taps that only ever meet padding
    after = conv(x)
    assert torch.equal(before, after)


def test_small_input_conv_reads_only_the_window():
    """A stride-2 3x3 conv from 2x2 to 1x1 reads only the bottom-right 2x2 taps."""
    conv = SmallInputConv2d(4, 3, 3, padding=1, stride=2, bias=False)
    x = torch.randn(2, 4, 2, 2)
    before = conv(x)
    with torch.no_grad():
        conv.weight[:, :, 0, :] = float("nan")
        conv.weight[:, :, :, 0] = float("nan")
    assert torch.equal(before, conv(x))


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


def test_small_input_conv_takes_an_unbatched_input():
    """A (C, 1, 1) input without a batch dim, as nn.Conv2d accepts it."""
    plain = nn.Conv2d(8, 5, 3, padding=1)
    fast = copy.deepcopy(plain)
    use_small_input_convs(fast)
    x = torch.randn(8, 1, 1)
    y = fast(x)
    assert y.shape == (5, 1, 1)
    torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding_mode", ["circular", "replicate"])
def test_small_input_conv_with_a_padding_mode_on_a_1x1_map(padding_mode):
    """Circular or replicate padding repeats the pixel into every tap (zero padding would leave
    only the centre one): the result is nn.Conv2d's."""
    plain = nn.Conv2d(8, 5, 3, padding=1, padding_mode=padding_mode)
    fast = copy.deepcopy(plain)
    use_small_input_convs(fast)
    x = torch.randn(4, 8, 1, 1)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", [None, "finetune", "soft", "hard"])
@pytest.mark.parametrize("groups", [1, 2])
def test_an_in_place_activation_after_a_conv_with_a_1x1_output_trains(stage, groups):
    """A squeeze-excite block's pooled conv followed by ReLU(inplace=True) (MobileNetV3,
    EfficientNet): autograd refused to modify the window's output in place ('Output 0 of
    _WindowConv is a view'), in every stage; now the gradients equal the plain model's."""
    from cwps_lightning.cwps import inject_cwps, set_stage

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Conv2d(8, 6, 1, groups=groups), nn.ReLU(inplace=True),
                          nn.Flatten(), nn.Linear(6, 3))
    model = copy.deepcopy(plain)
    use_small_input_convs(model)
    if stage is not None:  # (parents = children: every stage computes the plain function)
        inject_cwps(model)
        set_stage(model, stage)
    x = torch.randn(5, 4, 6, 6)
    plain(x).square().sum().backward()
    model(x).square().sum().backward()
    grads = {name: q.grad for name, q in model.named_parameters()}
    wrapped = {f"{name}.{attr}" for name, m in model.named_modules()
               if hasattr(m, "mask_logits") for attr in ("weight", "bias")}
    for name, p in plain.named_parameters():
        # (the soft mask is sigmoid(0) = 1/2: a child's gradient is half the plain one)
        scale = 0.5 if stage == "soft" and name in wrapped else 1.0
        torch.testing.assert_close(grads[name], scale * p.grad, msg=name)


def test_a_squeeze_excite_backbone_trains_after_the_switch():
    """timm's MobileNetV3 at 32 px (its SE convs see a 1x1 map)."""
    from cwps_lightning.cwps import inject_cwps, set_stage

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=3)
    use_small_input_convs(model)
    inject_cwps(model)
    set_stage(model, "hard")
    nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
