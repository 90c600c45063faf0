"""CWPSConv2d / CWPSLinear: stages, the custom autograd function, merge, validation."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cwps_lightning.cwps import CWPSConv2d, CWPSLinear, merge_cwps, set_stage, set_threshold
from cwps_lightning.cwps import layers as cwps_layers_module
from cwps_lightning.cwps.small_input import use_small_input_convs
from cwps_lightning.cwps.surgery import cwps_layers, inject_cwps

# name -> (Conv2d kwargs, input shape [N, C, H, W])
CONV_VARIANTS = {
    "basic": (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (2, 4, 9, 9)),
    "stride2": (
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
        (2, 4, 9, 9),
    ),
    "dilation2": (
        dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding=2),
        (2, 4, 9, 9),
    ),
    "groups4": (
        dict(in_channels=8, out_channels=12, kernel_size=3, groups=4, padding=1),
        (2, 8, 7, 7),
    ),
    "depthwise": (
        dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, padding=1),
        (2, 6, 7, 7),
    ),
    "1x1": (dict(in_channels=4, out_channels=6, kernel_size=1), (2, 4, 5, 5)),
    "no_bias": (
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, bias=False),
        (2, 4, 7, 7),
    ),
    "same": (dict(in_channels=4, out_channels=6, kernel_size=3, padding="same"), (2, 4, 7, 7)),
    "same_even_kernel": (
        dict(in_channels=4, out_channels=6, kernel_size=4, padding="same"),
        (2, 4, 7, 7),
    ),
    "same_dilated": (
        dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding="same"),
        (2, 4, 8, 8),
    ),
    "valid": (dict(in_channels=4, out_channels=6, kernel_size=3, padding="valid"), (2, 4, 7, 7)),
    "rect_kernel_stride": (
        dict(in_channels=4, out_channels=6, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0)),
        (2, 4, 9, 6),
    ),
    "reflect": (
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
        (2, 4, 7, 7),
    ),
    "circular": (
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="circular"),
        (2, 4, 7, 7),
    ),
    "replicate_rect_padding": (
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=(1, 2),
             padding_mode="replicate"),
        (2, 4, 7, 7),
    ),
    "same_rect_even_kernel": (  # padded asymmetrically along the first dim only
        dict(in_channels=4, out_channels=6, kernel_size=(4, 3), padding="same"),
        (2, 4, 7, 6),
    ),
    # a 1x1 input: computed as a 1x1 conv of the kernel's centre tap (cwps/small_input.py)
    "input_1x1": (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (3, 4, 1, 1)),
    "input_1x1_stride2_dilated": (
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, dilation=2, padding=2),
        (3, 4, 1, 1),
    ),
    "input_1x1_depthwise_no_bias": (
        dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, padding=1, bias=False),
        (3, 6, 1, 1),
    ),
    "input_1x1_rect": (
        dict(in_channels=4, out_channels=6, kernel_size=(1, 3), padding=(0, 1)),
        (3, 4, 1, 1),
    ),
    "input_1x1_wide_padding": (  # a 3x3 output: no shortcut
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=2),
        (3, 4, 1, 1),
    ),
    # a 1x1 output from a larger map: the taps that meet the input, as a matmul
    "output_1x1_stride2": (
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
        (3, 4, 2, 2),
    ),
    "output_1x1_downsample": (
        dict(in_channels=4, out_channels=6, kernel_size=1, stride=2, bias=False),
        (3, 4, 2, 2),
    ),
    "output_1x1_grouped_dilated": (  # skips the middle pixel
        dict(in_channels=4, out_channels=6, kernel_size=2, stride=2, dilation=2, groups=2),
        (3, 4, 3, 3),
    ),
}

# name -> (Linear kwargs, input shape)
LINEAR_VARIANTS = {
    "linear_2d": (dict(in_features=7, out_features=6), (5, 7)),
    "linear_3d": (dict(in_features=7, out_features=6), (2, 5, 7)),
    "linear_no_bias_3d": (dict(in_features=7, out_features=6, bias=False), (2, 3, 7)),
}

ALL_VARIANTS = {**CONV_VARIANTS, **LINEAR_VARIANTS}


@pytest.fixture(autouse=True, params=["autograd", "function-kept", "recomposed"])
def composed_weight(request, monkeypatch) -> str:
    """Every test runs on each general path of the soft / hard stages: a small kernel composed
    with ordinary autograd ops (the default for these sizes), the same kept composed weight in
    the custom autograd function, and the function recomposing it in the backward (what
    kernels larger than KEEP_COMPOSED_NUMEL do). Convs with a 1x1 output take their window
    path in all three."""
    if request.param == "function-kept":
        monkeypatch.setattr(cwps_layers_module.CWPSMixin, "_small_kernels_by_autograd", False)
    if request.param == "recomposed":
        monkeypatch.setattr(cwps_layers_module, "KEEP_COMPOSED_NUMEL", 0)
    return request.param


def make_plain(name: str) -> tuple[nn.Module, torch.Tensor]:
    kwargs, shape = ALL_VARIANTS[name]
    layer = nn.Conv2d(**kwargs) if name in CONV_VARIANTS else nn.Linear(**kwargs)
    return layer, torch.randn(shape)


def wrap(plain: nn.Module, threshold: float = 0.5):
    if isinstance(plain, nn.Conv2d):
        return CWPSConv2d.from_conv(plain, threshold=threshold)
    return CWPSLinear.from_linear(plain, threshold=threshold)


def wrap64(name: str):
    """A float64 CWPS layer (converted after wrapping, so mask_logits is float64 too)."""
    plain, x = make_plain(name)
    layer = wrap(plain).double()
    return layer, x.double()


def randomise(layer, threshold: float = 0.5) -> None:
    """Random parent (not equal to the child) and random mask logits with both kinds of
    channel under ``threshold``."""
    with torch.no_grad():
        w = layer.weight
        pw = w + torch.randn_like(w) * (w.std() + 0.1)
        pb = None if layer.bias is None else layer.bias + torch.randn_like(layer.bias) + 0.1
        layer.set_parent(pw, pb)
        logits = torch.randn_like(layer.mask_logits) * 2.0
        centre = math.log(threshold / (1.0 - threshold))
        logits[0] = centre + 2.0  # task-specific
        logits[1] = centre - 2.0  # shared
        if threshold == 0.5:
            logits[2] = 0.0  # sigmoid(0) == 0.5 exactly: a tie is task-specific (>=)
        layer.mask_logits.copy_(logits)


def reference(layer, x, stage: str, params):
    """Naive autograd reference: compose the weight, run F.conv2d / F.linear."""
    w_child, b_child, logits = params
    sig = torch.sigmoid(logits)
    if stage == "soft":
        m = sig
    else:
        m = (sig >= layer.threshold).to(sig.dtype) + sig - sig.detach()
    pw, pb = layer.parent_weight, layer.parent_bias
    w = pw + m.view(-1, *([1] * (w_child.dim() - 1))) * (w_child - pw)
    b = None if b_child is None else pb + m * (b_child - pb)
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    padding = layer.padding
    if layer.padding_mode != "zeros":
        pads = []
        for p in reversed(layer.padding):
            pads += [p, p]
        x = F.pad(x, pads, mode=layer.padding_mode)
        padding = 0
    return F.conv2d(x, w, b, layer.stride, padding, layer.dilation, layer.groups)


def plain_with(layer, weight, bias):
    """Run the layer's op with explicit weights through the stock nn.Module code path."""
    if isinstance(layer, nn.Conv2d):
        return lambda x: nn.Conv2d._conv_forward(layer, x, weight, bias)
    return lambda x: F.linear(x, weight, bias)


# ----------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", list(ALL_VARIANTS))
def test_hard_equals_merged(name):
    plain, x = make_plain(name)
    layer = wrap(plain)
    randomise(layer)
    layer.stage = "hard"
    spec = layer.task_specific()
    assert spec.any() and (~spec).any(), "need both task-specific and shared channels"
    assert spec[2], "the tie channel is task-specific"

    with torch.no_grad():
        y_hard = layer(x)
        merged = layer.to_plain()
        assert type(merged) is type(plain)
        y_merged = merged(x)
        # via merge_cwps on a container too
        container = nn.Sequential(copy.deepcopy(layer))
        merge_cwps(container)
        assert not list(cwps_layers(container))
        y_container = container(x)
    assert y_hard.shape == plain(x).shape
    torch.testing.assert_close(y_merged, y_hard, atol=1e-5, rtol=0)
    torch.testing.assert_close(y_container, y_hard, atol=1e-5, rtol=0)

    # the merged kernel is the child's on specific channels and the parent's on shared ones
    w, b = merged.weight.detach(), merged.bias
    torch.testing.assert_close(w[spec], layer.weight.detach()[spec], atol=1e-6, rtol=0)
    assert torch.equal(w[~spec], layer.parent_weight[~spec])
    if b is not None:
        torch.testing.assert_close(b.detach()[spec], layer.bias.detach()[spec], atol=1e-6, rtol=0)
        assert torch.equal(b.detach()[~spec], layer.parent_bias[~spec])

    # the mask matters: neither the child-only nor the parent-only layer gives the same output
    with torch.no_grad():
        y_child = plain_with(layer, layer.weight, layer.bias)(x)
        y_parent = plain_with(layer, layer.parent_weight, layer.parent_bias)(x)
    assert not torch.allclose(y_hard, y_child, atol=1e-4)
    assert not torch.allclose(y_hard, y_parent, atol=1e-4)


def assert_matches_reference(layer, x, stage: str, net=lambda f, x: f(x)):
    """``net(layer, x)`` and ``net`` over the naive reference (on clones of the layer's
    parameters) give the same output and the same gradients of the input, child, bias and mask
    scores, float64-close."""
    x1 = x.clone().requires_grad_(True)
    y = net(layer, x1)
    g = torch.randn_like(y)
    y.backward(g)
    params = [None if p is None else p.detach().clone().requires_grad_(True)
              for p in (layer.weight, layer.bias, layer.mask_logits)]
    x2 = x.clone().requires_grad_(True)
    y_ref = net(lambda x: reference(layer, x, stage, params), x2)
    y_ref.backward(g)
    opts = dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(y, y_ref, **opts)
    torch.testing.assert_close(x1.grad, x2.grad, **opts)
    for p, ref in zip((layer.weight, layer.bias, layer.mask_logits), params, strict=True):
        if p is not None:
            torch.testing.assert_close(p.grad, ref.grad, **opts)


@pytest.mark.parametrize("stage", ["soft", "hard"])
@pytest.mark.parametrize("name", list(ALL_VARIANTS))
def test_autograd_matches_naive_reference(name, stage):
    layer, x = wrap64(name)
    randomise(layer)
    assert layer.weight.dtype == layer.mask_logits.dtype == torch.float64
    layer.stage = stage
    assert_matches_reference(layer, x, stage)
    assert layer.mask_logits.grad.abs().min() > 0
    # buffers never get gradients
    assert not layer.parent_weight.requires_grad


@pytest.mark.parametrize("name", ["basic", "groups4", "linear_3d"])
def test_autograd_without_input_grad(name):
    """x that does not need a gradient (first layer of a network): parameter grads still right."""
    layer, x = wrap64(name)
    randomise(layer)
    layer.stage = "soft"
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    params = [
        p.detach().clone().requires_grad_(True)
        for p in (layer.weight, layer.bias, layer.mask_logits)
    ]
    reference(layer, x, "soft", params).backward(g)
    torch.testing.assert_close(layer.weight.grad, params[0].grad)
    torch.testing.assert_close(layer.bias.grad, params[1].grad)
    torch.testing.assert_close(layer.mask_logits.grad, params[2].grad)


@pytest.mark.parametrize("name", ["basic", "depthwise", "linear_2d"])
def test_straight_through_reaches_logits_in_hard_stage(name):
    plain, x = make_plain(name)
    layer = wrap(plain)
    randomise(layer)
    layer.stage = "hard"
    layer(x).pow(2).sum().backward()
    grad = layer.mask_logits.grad
    assert grad is not None
    # every channel (shared and specific) gets a non-zero gradient through sigmoid'(s)
    assert torch.all(grad != 0)
    # and nothing flows to the logits in the finetune stage
    layer.zero_grad(set_to_none=True)
    layer.stage = "finetune"
    layer(x).pow(2).sum().backward()
    assert layer.mask_logits.grad is None or torch.all(layer.mask_logits.grad == 0)


@pytest.mark.parametrize("stage", ["soft", "hard"])
@pytest.mark.parametrize("name", ["basic", "no_bias", "linear_3d"])
def test_parent_frozen_under_sgd(name, stage):
    plain, x = make_plain(name)
    layer = wrap(plain)
    randomise(layer)
    layer.stage = stage
    parent_w = layer.parent_weight.clone()
    parent_b = None if layer.parent_bias is None else layer.parent_bias.clone()
    child_w = layer.weight.detach().clone()
    logits = layer.mask_logits.detach().clone()

    param_ids = {id(p) for p in layer.parameters()}
    assert id(layer.parent_weight) not in param_ids
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(4):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()

    assert torch.equal(layer.parent_weight, parent_w)
    if parent_b is not None:
        assert torch.equal(layer.parent_bias, parent_b)
    assert not torch.allclose(layer.weight.detach(), child_w)
    assert not torch.allclose(layer.mask_logits.detach(), logits)


@pytest.mark.parametrize("name", list(ALL_VARIANTS))
def test_finetune_equals_plain(name):
    plain, x = make_plain(name)
    # bit for bit against the same computation: CWPSConv2d takes the 1x1-input shortcut, whose
    # float rounding differs from nn.Conv2d's (closeness to nn.Conv2d: test_small_input.py)
    use_small_input_convs(plain)
    layer = wrap(copy.deepcopy(plain))
    randomise(layer)  # parent and logits must not matter in finetune
    assert layer.stage == "finetune"
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y = layer(x1)
    y_plain = plain(x2)
    torch.testing.assert_close(y, y_plain, atol=0, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y_plain.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    if plain.bias is not None:
        torch.testing.assert_close(layer.bias.grad, plain.bias.grad)
    # merge in finetune keeps the child (up to rounding of parent + 1 * (child - parent))
    torch.testing.assert_close(layer.to_plain()(x), y_plain.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["basic", "linear_3d"])
def test_soft_with_parent_equal_child_is_plain(name):
    """Right after wrapping, parent == child, so any mask gives the plain layer."""
    plain, x = make_plain(name)
    layer = wrap(copy.deepcopy(plain))
    with torch.no_grad():
        layer.mask_logits.normal_()
    for stage in ("soft", "hard"):
        layer.stage = stage
        torch.testing.assert_close(layer(x), plain(x), atol=1e-6, rtol=1e-5)


def test_threshold_extremes_select_child_or_parent():
    plain, x = make_plain("basic")
    layer = wrap(plain)
    randomise(layer)
    with torch.no_grad():
        layer.mask_logits.clamp_(-5, 5)
        y_child = plain_with(layer, layer.weight, layer.bias)(x)
        y_parent = plain_with(layer, layer.parent_weight, layer.parent_bias)(x)
    layer.stage = "hard"
    layer.threshold = 0.0  # sigmoid >= 0 everywhere: all task-specific
    assert layer.task_specific().all()
    torch.testing.assert_close(layer(x), y_child, atol=1e-5, rtol=0)
    layer.threshold = 1.0  # sigmoid(<= 5) < 1: all shared
    assert not layer.task_specific().any()
    torch.testing.assert_close(layer(x), y_parent, atol=1e-5, rtol=0)


def test_mask_per_stage():
    layer = CWPSLinear(3, 4, threshold=0.6)
    with torch.no_grad():
        layer.mask_logits.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    sig = torch.sigmoid(layer.mask_logits.detach())
    assert torch.equal(layer.mask(), torch.ones(4))
    assert layer.task_specific().all()
    layer.stage = "soft"
    torch.testing.assert_close(layer.mask().detach(), sig)
    layer.stage = "hard"
    expected = sig >= 0.6  # [0.27, 0.5, 0.62, 0.88]
    assert expected.tolist() == [False, False, True, True]
    assert torch.equal(layer.mask(), expected.float())
    assert torch.equal(layer.task_specific(), expected)
    # the comparison is >=: sigmoid(0) == 0.5 is task-specific at lambda = 0.5
    layer.threshold = 0.5
    assert layer.task_specific().tolist() == [False, True, True, True]


def test_autocast_cpu_bfloat16():
    plain, x = make_plain("basic")
    layer = wrap(plain)
    randomise(layer)
    layer.stage = "hard"
    merged = layer.to_plain()
    with torch.no_grad():
        y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_merged = merged(x)
    assert y.dtype == y_merged.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y32, atol=0.1, rtol=0.05)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    assert layer.mask_logits.grad.dtype == torch.float32
    assert torch.isfinite(layer.mask_logits.grad).all()


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["bogus", "Hard", ""])
def test_invalid_stage_raises(bad):
    layer = CWPSConv2d(3, 4, 3)
    with pytest.raises(ValueError, match=repr(bad)):
        layer.stage = bad
    assert layer.stage == "finetune"
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    inject_cwps(model)
    with pytest.raises(ValueError, match=repr(bad)):
        set_stage(model, bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_invalid_threshold_raises(bad):
    text = str(float(bad))
    with pytest.raises(ValueError, match=text):
        CWPSConv2d(3, 4, 3, threshold=bad)
    with pytest.raises(ValueError, match=text):
        CWPSLinear(3, 4, threshold=bad)
    with pytest.raises(ValueError, match=text):
        CWPSConv2d.from_conv(nn.Conv2d(3, 4, 3), threshold=bad)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=text):
        inject_cwps(copy.deepcopy(model), threshold=bad)
    inject_cwps(model)
    with pytest.raises(ValueError, match=text):
        set_threshold(model, bad)
    assert all(layer.threshold == 0.5 for _, layer in cwps_layers(model))


@pytest.mark.parametrize("bad", ["0.5", b"0.5", True])
def test_a_threshold_that_is_not_a_number_is_refused(bad):
    """float('0.5') and float(True) made a string or a bool a threshold without a word."""
    with pytest.raises(TypeError, match=r"threshold \(lambda\) must be a number in "):
        CWPSLinear(3, 4, threshold=bad)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"got " + re.escape(repr(bad))):
        inject_cwps(model, threshold=bad)


@pytest.mark.parametrize("ok", [0.0, 0.3, 1.0])
def test_valid_threshold_accepted(ok):
    assert CWPSLinear(3, 4, threshold=ok).threshold == ok


def test_set_parent_validation():
    conv = CWPSConv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"\(4, 3, 3, 3\)"):
        conv.set_parent(torch.zeros(4, 3, 3, 2), torch.zeros(4))
    with pytest.raises(ValueError):
        conv.set_parent(torch.zeros(5, 3, 3, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="bias"):
        conv.set_parent(torch.zeros(4, 3, 3, 3))  # missing parent bias
    no_bias = CWPSLinear(3, 4, bias=False)
    with pytest.raises(ValueError, match="bias"):
        no_bias.set_parent(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError):
        no_bias.set_parent(torch.zeros(3, 4))
    # a correct call copies (the layer does not alias the given tensor)
    w = torch.randn(4, 3)
    no_bias.set_parent(w)
    assert torch.equal(no_bias.parent_weight, w)
    w.add_(1.0)
    assert not torch.equal(no_bias.parent_weight, w)


@pytest.mark.parametrize("stage", ["soft", "hard"])
def test_unbatched_conv_input_trains(stage):
    layer = CWPSConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1))
    layer.set_parent(torch.randn_like(layer.weight), torch.randn_like(layer.bias))
    layer.stage = stage
    x = torch.randn(4, 9, 9)
    y = layer(x)
    assert y.shape == (6, 9, 9)
    assert torch.allclose(y, layer(x.unsqueeze(0)).squeeze(0))
    y.sum().backward()
    assert layer.weight.grad is not None and layer.mask_logits.grad is not None


def test_threshold_attribute_is_validated():
    layer = CWPSLinear.from_linear(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="5.0"):
        layer.threshold = 5.0
    layer.threshold = 0.3
    assert layer.threshold == 0.3


def test_mask_logits_follow_weight_dtype():
    layer = CWPSConv2d.from_conv(nn.Conv2d(3, 4, 3).double())
    assert layer.mask_logits.dtype == torch.float64


def test_kept_channels_merge_bit_exact_to_child():
    layer = CWPSLinear.from_linear(nn.Linear(5, 6))
    layer.set_parent(torch.randn_like(layer.weight), torch.randn_like(layer.bias))
    with torch.no_grad():
        layer.mask_logits.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0, 5.0, -5.0]))
    layer.stage = "hard"
    plain = layer.to_plain()
    keep = torch.tensor([True, False, True, False, True, False])
    assert torch.equal(plain.weight[keep], layer.weight[keep])
    assert torch.equal(plain.weight[~keep], layer.parent_weight[~keep])


class _NaiveLayer(nn.Module):
    """The reference composition of one CWPS layer with cloned leaf parameters."""

    def __init__(self, layer, stage: str):
        super().__init__()
        self.layer, self.stage = layer, stage
        self.params = [
            None if p is None else p.detach().clone().requires_grad_(True)
            for p in (layer.weight, layer.bias, layer.mask_logits)
        ]

    def forward(self, x):
        return reference(self.layer, x, self.stage, self.params)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stage", ["soft", "hard"])
def test_network_of_layers_matches_reference(stage, channels_last):
    """Layers of several sizes, one after the other, big before small and back (the composed
    weight of every layer shares one scratch buffer): every gradient is still exact."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 4, 1), nn.ReLU(),
        nn.Conv2d(4, 16, 3, stride=2, padding=1, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 5),
    ).double()
    inject_cwps(net, exclude=[])
    for _, layer in cwps_layers(net):
        randomise(layer)
    set_stage(net, stage)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    naive = nn.Sequential(*[
        _NaiveLayer(m, stage) if isinstance(m, (CWPSConv2d, CWPSLinear)) else m for m in net
    ])
    for _ in range(2):  # a second step runs on a warm scratch buffer
        net.zero_grad(set_to_none=True)
        y = net(x)
        y.backward(torch.ones_like(y))
    y_ref = naive(x)
    y_ref.backward(torch.ones_like(y_ref))
    opts = dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(y, y_ref, **opts)
    refs = [m for m in naive if isinstance(m, _NaiveLayer)]
    for (name, layer), ref in zip(cwps_layers(net), refs, strict=True):
        torch.testing.assert_close(layer.weight.grad, ref.params[0].grad, **opts, msg=name)
        torch.testing.assert_close(layer.bias.grad, ref.params[1].grad, **opts, msg=name)
        torch.testing.assert_close(layer.mask_logits.grad, ref.params[2].grad, **opts, msg=name)


@pytest.mark.parametrize("name", ["basic", "linear_3d"])
def test_identity_mask_grad_passes_dl_dm_straight_to_the_scores(name):
    """mask_grad="identity": dL/ds = dL/dm in the hard stage (TAPS' straight-through), and the
    soft stage keeps the true sigmoid derivative."""
    layer, x = wrap64(name)
    randomise(layer)
    layer.mask_grad = "identity"
    for stage in ("soft", "hard"):
        layer.zero_grad(set_to_none=True)
        layer.stage = stage
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
        logits = layer.mask_logits.detach().clone().requires_grad_(True)
        sig = torch.sigmoid(logits)
        if stage == "soft":
            m = sig
        else:  # forward: the hard mask; backward: identity
            m = (sig >= layer.threshold).to(sig.dtype).detach() + logits - logits.detach()
        pw = layer.parent_weight
        w = pw + m.view(-1, *([1] * (pw.dim() - 1))) * (layer.weight.detach() - pw)
        pb = layer.parent_bias
        b = None if pb is None else pb + m * (layer.bias.detach() - pb)
        y_ref = F.linear(x, w, b) if isinstance(layer, nn.Linear) else F.conv2d(
            x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
        y_ref.backward(g)
        torch.testing.assert_close(layer.mask_logits.grad, logits.grad, atol=1e-10, rtol=1e-9)
    # and it differs from the default's gradient by exactly the sigmoid slope
    hard_identity = layer.mask_logits.grad.clone()
    layer.zero_grad(set_to_none=True)
    layer.mask_grad = "sigmoid"
    layer(x).backward(g)
    sig = torch.sigmoid(layer.mask_logits.detach())
    torch.testing.assert_close(layer.mask_logits.grad, hard_identity * sig * (1 - sig))


def test_mask_grad_is_checked():
    with pytest.raises(ValueError, match=r"mask_grad must be one of \['sigmoid', 'identity'\], "
                                         r"got 'sign'"):
        CWPSLinear(3, 2, mask_grad="sign")


def test_layer_remembers_its_decisions_when_entering_each_stage():
    layer = CWPSLinear(4, 6, threshold=0.5)
    with torch.no_grad():
        layer.mask_logits.copy_(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]))
    assert layer.decisions == {}
    layer.stage = "soft"
    assert layer.decisions["soft"].tolist() == [False, False, True, True, True, True]
    with torch.no_grad():
        layer.mask_logits.mul_(-1)
    layer.stage = "soft"  # staying in a stage records nothing new
    assert layer.decisions["soft"].tolist() == [False, False, True, True, True, True]
    layer.stage = "hard"
    assert layer.decisions["hard"].tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize("change", ["set_parent", "load_state_dict", "in_place", "to_double"])
def test_kept_parent_tap_follows_every_change_of_the_parent(change):
    """On a 1x1 map the layer keeps the parent's kernel tap between steps: any change of the
    parent must reach the next forward (soft and hard), as the naive reference says."""
    plain = nn.Conv2d(4, 6, 3, padding=1)
    layer = wrap(plain)
    randomise(layer)
    x = torch.randn(3, 4, 1, 1)
    set_stage(layer, "soft")
    layer(x)  # fills the kept tap
    with torch.no_grad():
        new_parent = torch.randn_like(layer.parent_weight)
        if change == "set_parent":
            layer.set_parent(new_parent, layer.parent_bias.clone())
        elif change == "load_state_dict":
            state = {k: v.clone() for k, v in layer.state_dict().items()}
            state["parent_weight"] = new_parent
            layer.load_state_dict(state)
        elif change == "in_place":
            layer.parent_weight.mul_(-2.0)
        else:
            layer.double()
            x = x.double()
    for stage in ("soft", "hard"):
        set_stage(layer, stage)
        params = (layer.weight, layer.bias, layer.mask_logits)
        expected = reference(layer, x, stage, params)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_tap_path_gradient_keeps_the_weight_layout():
    """The full-size child gradient on a 1x1 map takes the child's memory format."""
    layer = wrap(nn.Conv2d(4, 6, 3, padding=1)).to(memory_format=torch.channels_last)
    randomise(layer)
    set_stage(layer, "soft")
    layer(torch.randn(3, 4, 1, 1)).sum().backward()
    assert layer.weight.grad.is_contiguous(memory_format=torch.channels_last)
    assert layer.weight.grad[:, :, 0].abs().sum() == 0  # only the centre tap met the pixel
    assert layer.weight.grad[:, :, 1, 1].abs().sum() > 0


def test_copies_and_pickles_of_a_layer_with_a_kept_tap():
    """deepcopy and pickle work after a 1x1-map forward, and the copy computes with its own
    parent, not the original's kept tap."""
    import io
    import pickle

    layer = wrap(nn.Conv2d(4, 6, 3, padding=1))
    randomise(layer)
    set_stage(layer, "soft")
    x = torch.randn(3, 4, 1, 1)
    layer(x)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.set_parent(torch.randn_like(twin.parent_weight), twin.parent_bias.clone())
    params = (twin.weight, twin.bias, twin.mask_logits)
    torch.testing.assert_close(twin(x), reference(twin, x, "soft", params), rtol=1e-5, atol=1e-6)
    buf = io.BytesIO()
    pickle.dump(layer, buf)
    again = pickle.loads(buf.getvalue())
    torch.testing.assert_close(again(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_tap_path_runs_the_plain_layers_convolution(channels_last):
    """With every channel task-specific (m == 1 exactly), a CWPS conv on a 1x1 map returns the
    plain (SmallInputConv2d) layer's output and gradients bit for bit, channels_last or not."""
    torch.manual_seed(0)
    plain = nn.Conv2d(512, 512, 3, padding=1)
    use_small_input_convs(plain)
    layer = wrap(copy.deepcopy(plain), threshold=0.5)
    x = torch.randn(8, 512, 1, 1)
    if channels_last:
        plain, layer = (m.to(memory_format=torch.channels_last) for m in (plain, layer))
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        layer.set_parent(torch.randn_like(layer.parent_weight), torch.randn_like(layer.bias))
        layer.mask_logits.fill_(100.0)  # sigmoid == 1.0 in float32
    g = torch.randn(8, 512, 1, 1)
    for stage in ("soft", "hard"):
        set_stage(layer, stage)
        xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        ys, yp = layer(xs), plain(xp)
        ys.backward(g)
        yp.backward(g)
        assert torch.equal(ys, yp)
        assert torch.equal(xs.grad, xp.grad)
        assert torch.equal(layer.weight.grad, plain.weight.grad)


def _count_lerps(monkeypatch) -> list[int]:
    """Patch torch.lerp to count its calls into the returned one-element list."""
    calls = [0]
    real = torch.lerp

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "lerp", counting)
    return calls


@pytest.mark.parametrize("name", ["basic", "no_bias", "linear_3d"])
def test_backward_recomposes_only_large_kernels(name, composed_weight, monkeypatch):
    """A kernel up to KEEP_COMPOSED_NUMEL elements keeps its composed weight (autograd or the
    function): the backward composes nothing; a larger one recomposes it (the kernel, and no
    bias)."""
    layer, x = wrap64(name)
    randomise(layer)
    layer.stage = "hard"
    lerps = _count_lerps(monkeypatch)
    y = layer(x.clone().requires_grad_(True))
    forward_lerps = lerps[0]
    assert forward_lerps == 1 + (layer.bias is not None)  # kernel (+ bias)
    y.backward(torch.randn_like(y))
    assert lerps[0] - forward_lerps == (1 if composed_weight == "recomposed" else 0)


@pytest.mark.parametrize("stage", ["soft", "hard"])
def test_layer_called_twice_in_one_forward_matches_reference(stage):
    """One layer applied twice before a backward (shared weights): each call's backward uses
    its own composed weight, kept or recomposed, and the gradients add up."""
    layer = wrap(nn.Conv2d(5, 5, 3, padding=1)).double()
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    randomise(layer)
    layer.stage = stage
    assert_matches_reference(layer, x, stage, net=lambda f, x: f(torch.tanh(f(x))))


@pytest.mark.parametrize("mask_grad", ["sigmoid", "identity"])
@pytest.mark.parametrize("stage", ["soft", "hard"])
@pytest.mark.parametrize("name", ["basic", "groups4", "no_bias", "linear_3d"])
def test_small_kernels_by_autograd_equal_the_function_bit_for_bit(name, stage, mask_grad,
                                                                   composed_weight, monkeypatch):
    """The ordinary-autograd composition of small kernels gives _ComposedOp's output and
    every gradient bit for bit (fp32), in both stages and with both mask gradients."""
    if composed_weight != "autograd":
        pytest.skip("compares the two paths itself")
    plain, x = make_plain(name)
    layer = wrap(plain)
    randomise(layer)
    layer.stage, layer.mask_grad = stage, mask_grad
    results = []
    for by_autograd in (True, False):
        monkeypatch.setattr(type(layer), "_small_kernels_by_autograd", by_autograd)
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        grads = [p.grad for p in (layer.weight, layer.bias, layer.mask_logits) if p is not None]
        results.append([y.detach(), xi.grad, *grads])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def _one_decision_layer(kind: str, specific: bool):
    torch.manual_seed(0)
    if kind == "linear":  # over KEEP_COMPOSED_NUMEL: recomposed in the backward
        layer, x = CWPSLinear.from_linear(nn.Linear(1100, 1000)), torch.randn(3, 1100)
    elif kind == "large":
        layer, x = CWPSConv2d.from_conv(nn.Conv2d(512, 512, 3, padding=1)), torch.randn(2, 512, 3, 3)
    else:  # a 1x1 output: the window path (kept composed window)
        layer, x = CWPSConv2d.from_conv(nn.Conv2d(16, 24, 3, padding=1)), torch.randn(4, 16, 1, 1)
    with torch.no_grad():
        layer.set_parent(torch.randn_like(layer.weight), torch.randn_like(layer.bias))
        layer.mask_logits.fill_(3.0 if specific else -3.0)
    layer.stage = "hard"
    return layer, x.requires_grad_()


@pytest.mark.parametrize("specific", [False, True], ids=["all shared", "all specific"])
@pytest.mark.parametrize("kind", ["large", "linear", "window"])
def test_a_hard_mask_of_one_decision_computes_with_the_parent_or_child_itself(kind, specific,
                                                                               monkeypatch):
    """The output and every gradient are those of the compose (lerp) bit for bit, and the
    parent and child are left as they were (the backward's mask gradient must not use them as
    its scratch memory)."""
    results = []
    for shortcut in (True, False):
        if not shortcut:
            monkeypatch.setattr(cwps_layers_module, "_whole", lambda mask, weight: None)
        layer, x = _one_decision_layer(kind, specific)
        parent, child = layer.parent_weight.clone(), layer.weight.detach().clone()
        y = layer(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        assert torch.equal(layer.parent_weight, parent) and torch.equal(layer.weight, child)
        results.append([y.detach(), x.grad, layer.weight.grad, layer.bias.grad,
                        layer.mask_logits.grad])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    if not specific:  # a shared channel's child gets no gradient
        assert not results[0][2].any()


def test_whole_reads_a_mask_on_the_cpu_only():
    whole = cwps_layers_module._whole
    assert whole(torch.zeros(4), torch.ones(1)) == "parent"
    assert whole(torch.ones(4), torch.ones(1)) == "child"
    assert whole(torch.tensor([0.0, 1.0]), torch.ones(1)) is None
    assert whole(torch.zeros(4), torch.ones(1, device="meta")) is None


def test_wrapping_starts_every_mask_score_at_zero():
    """from_conv / from_linear allocate the scores empty and must write them: under
    deterministic algorithms torch fills memory it hands out unwritten with NaN."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        layers = [wrap(make_plain(name)[0]) for name in ("basic", "linear_2d")]
    finally:
        torch.use_deterministic_algorithms(was)
    for layer in layers:
        assert torch.equal(layer.mask_logits.detach(), torch.zeros(6))


def test_decisions_are_taken_at_the_layers_threshold():
    layer = CWPSLinear(3, 4, threshold=0.7)
    with torch.no_grad():
        layer.mask_logits.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))  # sigmoid .27 .5 .62 .88
    assert layer.decision().tolist() == [False, False, False, True]
    layer.stage = "soft"
    assert layer.decisions["soft"].tolist() == [False, False, False, True]


def test_the_merged_layer_keeps_the_train_or_eval_mode():
    layer = wrap(make_plain("basic")[0])
    assert not layer.eval().to_plain().training
    assert layer.train().to_plain().training


@pytest.mark.parametrize("name", ["basic", "input_1x1", "linear_2d"])
def test_soft_scores_all_far_below_zero_still_blend_child_and_parent(name):
    """Scores far below zero give a soft mask of small values (together less than one): the
    soft stage still computes with parent + sigmoid(s) * (child - parent) (Eq. 6, 9), not the
    parent alone, in the output and every gradient."""
    layer, x = wrap64(name)
    randomise(layer)
    with torch.no_grad():
        layer.mask_logits.fill_(-4.0)  # sigmoid 0.018 on each of the 6 channels
    layer.stage = "soft"
    assert_matches_reference(layer, x, "soft")


def test_a_taken_over_weight_leaves_its_old_gradient_behind():
    """take=True makes the plain layer's Parameters the child: a gradient they still hold
    from the plain layer's last backward must not reach the CWPS fit's first step."""
    plain = nn.Conv2d(4, 6, 3, padding=1)
    plain(torch.randn(2, 4, 5, 5)).sum().backward()
    assert plain.weight.grad is not None
    layer = CWPSConv2d.from_conv(plain, take=True)
    assert layer.weight is plain.weight
    assert layer.weight.grad is None and layer.bias.grad is None


def test_a_checkpoint_without_parents_leaves_them_unwritten():
    """A layer made with its parent unwritten (fill_parent=False) stays unwritten after loading
    a checkpoint that has no parent (the plain backbone's): the soft stage refuses it; a
    checkpoint with the parent installs it."""
    plain = nn.Conv2d(4, 6, 3, padding=1)
    layer = CWPSConv2d.from_conv(plain, fill_parent=False)
    result = layer.load_state_dict(plain.state_dict(), strict=False)
    assert "parent_weight" in result.missing_keys
    assert layer.parent_unset
    layer.stage = "soft"
    with pytest.raises(RuntimeError, match="parent was never installed"):
        layer(torch.randn(2, 4, 5, 5))
    source = CWPSConv2d.from_conv(plain)
    source.stage = "hard"
    layer.load_state_dict(source.state_dict())
    assert not layer.parent_unset and layer.stage == "hard"
    layer(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("name", ["basic", "linear_3d"])
def test_wrapping_with_the_identity_mask_gradient(name):
    """from_conv / from_linear(mask_grad="identity") give the hard stage's scores dL/dm, the
    default's gradient divided by the sigmoid slope."""
    plain, x = make_plain(name)
    grads = {}
    for mask_grad in ("sigmoid", "identity"):
        layer = (CWPSConv2d.from_conv(plain, mask_grad=mask_grad) if isinstance(plain, nn.Conv2d)
                 else CWPSLinear.from_linear(plain, mask_grad=mask_grad)).double()
        torch.manual_seed(1)
        randomise(layer)
        layer.stage = "hard"
        layer(x.double()).square().sum().backward()
        grads[mask_grad] = layer.mask_logits.grad
    sig = torch.sigmoid(layer.mask_logits.detach())
    torch.testing.assert_close(grads["sigmoid"], grads["identity"] * sig * (1 - sig))
    assert not torch.allclose(grads["sigmoid"], grads["identity"])


def _bf16_hard_with_one_shared_channel(layer):
    torch.manual_seed(0)
    with torch.no_grad():
        layer.set_parent(torch.randn_like(layer.weight), torch.randn_like(layer.bias))
        layer.mask_logits.fill_(3.0)
        layer.mask_logits[7] = -3.0  # the one shared channel
    layer = layer.to(torch.bfloat16)
    layer.stage = "hard"
    assert int((~layer.task_specific()).sum()) == 1
    return layer


@pytest.mark.parametrize("kind", ["conv_on_a_1x1_map", "large_linear"])
def test_one_shared_channel_among_many_in_bf16_computes_with_its_parent(kind):
    """A bf16 sum of 511 ones reads 512: the count of kept channels must not round, or the
    one shared channel runs on the child's kernel."""
    torch.set_num_threads(1)
    if kind == "conv_on_a_1x1_map":  # the window path
        layer = _bf16_hard_with_one_shared_channel(
            CWPSConv2d.from_conv(nn.Conv2d(8, 512, 3, padding=1)))
        x = torch.randn(2, 8, 1, 1, dtype=torch.bfloat16)
        op = lambda x, w, b: F.conv2d(x, w, b, padding=1)  # noqa: E731
    else:  # a kernel over KEEP_COMPOSED_NUMEL: composed again in the backward
        layer = _bf16_hard_with_one_shared_channel(CWPSLinear.from_linear(nn.Linear(1100, 1000)))
        x = torch.randn(3, 1100, dtype=torch.bfloat16)
        op = F.linear
    with torch.no_grad():
        y = layer(x).float()
        w, b = layer.merged_weights()
        expected = op(x.float(), w.float(), b.float())
    torch.testing.assert_close(y[:, 7], expected[:, 7], atol=0.5, rtol=0.05)
    torch.testing.assert_close(y, expected, atol=0.5, rtol=0.05)


def _trained_looking_model(threshold: float, stage: str) -> nn.Module:
    """A small model (its conv injected) with distinct child / parent weights and mask
    scores spread around lambda (so lambda decides channels), in ``stage``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 5))
    inject_cwps(model, exclude=None, threshold=threshold)
    with torch.no_grad():
        for _, layer in cwps_layers(model):
            layer.weight.add_(torch.randn_like(layer.weight))
            n = layer.mask_logits.numel()  # (sigmoids spread over (0, 1): some in [0.5, 0.6))
            layer.mask_logits.copy_(torch.logit(torch.linspace(0.05, 0.95, n)))
    set_stage(model, stage)
    return model


@pytest.mark.parametrize("stage", ["soft", "hard"])
def test_a_state_dict_carries_the_stage_and_lambda(stage):
    """Loaded into a model injected with another lambda and left in finetune, a state dict
    gives the saved model's outputs (before, the loading model's lambda and stage stayed:
    other outputs without a word); lambda round-trips exactly, and loading records no
    decisions (entering a stage by loading is not one)."""
    saved = _trained_looking_model(threshold=0.6, stage=stage)
    x = torch.randn(4, 3, 6, 6)
    expected = saved(x)
    state = saved.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # (savable as tensors)
    loading = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(8 * 6 * 6, 5))
    inject_cwps(loading, exclude=None, threshold=0.5)
    loading.load_state_dict(state)
    for name, layer in cwps_layers(loading):
        assert layer.stage == stage and layer.threshold == 0.6
        # the loaded stage is entered with the loaded scores (a set_stage after the load did)
        assert list(layer.decisions) == [stage]
        assert torch.equal(layer.decisions[stage], saved.get_submodule(name).decision())
    torch.testing.assert_close(loading(x), expected, rtol=0, atol=0)
    # lambda matters here: the same tensors at the loading model's own 0.5 compute otherwise
    set_threshold(loading, 0.5)
    if stage == "hard":
        assert not torch.equal(loading(x), expected)


def test_a_state_dict_without_stage_and_lambda_loads_strictly_and_keeps_the_layers_own():
    """A state dict saved before the stage and lambda were kept (no ``_extra_state`` keys)
    loads with strict=True; the layer keeps its own stage and lambda."""
    saved = _trained_looking_model(threshold=0.6, stage="hard")
    old = {k: v for k, v in saved.state_dict().items() if not k.endswith("_extra_state")}
    loading = _trained_looking_model(threshold=0.3, stage="soft")
    result = loading.load_state_dict(old)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for _, layer in cwps_layers(loading):
        assert layer.stage == "soft" and layer.threshold == 0.3
        torch.testing.assert_close(layer.mask_logits, saved.get_submodule(_).mask_logits)


def _extra(stage: int, threshold: float) -> torch.Tensor:
    bits = torch.tensor([threshold], dtype=torch.float64).view(torch.int64)
    return torch.cat([torch.tensor([stage]), bits])


@pytest.mark.parametrize("bad, said", [
    (_extra(7, 0.5), r"stage index 7 is not one of \[0, 1, 2\]"),
    (_extra(1, 1.5), r"threshold \(lambda\) must be in \[0, 1\], got 1\.5"),
    (torch.tensor([1.0, 0.5], dtype=torch.float64), r"got a torch\.float64 tensor of shape "
                                                     r"\(2,\) \(a state dict whose integer"),
    (torch.tensor([1]), r"got a torch\.int64 tensor of shape \(1,\)"),
    ({"stage": "soft"}, r"got dict"),
])
def test_a_bad_stage_or_lambda_in_a_state_dict_is_refused_naming_its_key(bad, said):
    model = nn.Sequential(CWPSConv2d.from_conv(nn.Conv2d(3, 4, 3)))
    state = model.state_dict()
    state["0._extra_state"] = bad
    with pytest.raises(RuntimeError, match=rf'extra state "0\._extra_state": .*{said}'):
        model.load_state_dict(state)


def test_a_cast_of_a_state_dicts_floating_point_tensors_leaves_lambda_exact():
    """(as a float tensor, lambda 0.7 came back 0.7002 after .half())"""
    saved = _trained_looking_model(threshold=0.7, stage="hard")
    state = {k: v.half() if v.is_floating_point() else v for k, v in saved.state_dict().items()}
    loading = _trained_looking_model(threshold=0.5, stage="soft")
    loading.load_state_dict(state)
    assert all(layer.threshold == 0.7 for _, layer in cwps_layers(loading))


def test_loading_a_state_dict_starts_the_stage_history_anew():
    """Decisions of the scores held before the load go; the loaded stage is entered with the
    loaded scores, so mask_flips counts a later hard stage from them."""
    from cwps_lightning.cwps.surgery import mask_flips

    saved = _trained_looking_model(threshold=0.5, stage="soft")
    loading = _trained_looking_model(threshold=0.5, stage="hard")  # decisions soft and hard
    with torch.no_grad():
        for _, layer in cwps_layers(loading):
            layer.mask_logits.neg_()  # (other scores: other decisions, which must not stay)
    set_stage(loading, "finetune")
    set_stage(loading, "hard")
    loading.load_state_dict(saved.state_dict())
    layer = loading[0]
    assert list(layer.decisions) == ["soft"]
    with torch.no_grad():
        layer.mask_logits.neg_()  # every channel's decision flips, but the one at exactly 1/2
    set_stage(loading, "hard")
    flips = mask_flips(loading)
    assert flips["soft"] == flips["total"] == int((layer.decisions["soft"]
                                                   != layer.decisions["hard"]).sum()) > 0
    assert flips["hard"] == 0


@pytest.mark.parametrize("stage", ["soft", "hard"])
def test_an_in_place_activation_after_a_large_linear_on_3d_input_trains(stage):
    """F.linear's output on a 3-D input is a view of its 2-D product, which autograd refused to
    modify in place inside the Function ('Output 0 of _ComposedOp is a view'); the layer now
    hands the Function 2-D tensors, and the output and gradients are the same."""
    torch.manual_seed(0)
    big = nn.Linear(1100, 1000)  # over KEEP_COMPOSED_NUMEL: the Function's path
    x = torch.randn(2, 3, 1100)
    layer = CWPSLinear.from_linear(big)
    layer.stage = stage
    reference = copy.deepcopy(layer)
    y = layer(x)
    assert y.shape == (2, 3, 1000)
    torch.relu_(y).sum().backward()
    y_ref = torch.relu(reference(x.reshape(6, 1100)).reshape(2, 3, 1000))
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, reference.get_parameter(name).grad, rtol=0, atol=0)
    unbatched = layer(x[0, 0])  # (1-D: an unbatched input keeps its shape)
    assert unbatched.shape == (1000,)
