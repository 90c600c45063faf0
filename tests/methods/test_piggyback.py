"""Piggyback layers: the binarised mask against a naive reference, model surgery, merge, stats."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cwps_lightning.cwps.small_input import SmallInputConv2d, use_small_input_convs
from cwps_lightning.methods.piggyback import (
    MASK_INIT,
    THRESHOLD,
    PiggybackConv2d,
    PiggybackLinear,
    binarise,
    inject_piggyback,
    kept_fraction,
    masked_numel,
    merge_piggyback,
    piggyback_layers,
)

from .helpers import (
    CONV_VARIANTS,
    MODELS,
    NORM_TYPES,
    PlanRecorder,
    resnet18,
    small_model,
    spy_conv2d,
)


@torch.no_grad()
def random_mask(layer) -> None:
    """A "trained" real-valued mask: about half of it at or below the threshold."""
    layer.mask_real.uniform_(0.0, 2 * THRESHOLD)


def check_against_reference(layer, x, ref_op) -> None:
    """Output and gradients (input, mask) against ``ref_op`` run on w = w0 * 1[m > thr] as a
    leaf tensor: straight-through, dL/dm = dL/dw * w0."""
    random_mask(layer)
    x1 = x.clone().requires_grad_()
    y = layer(x1)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    keep = (layer.mask_real.detach() > THRESHOLD).float()
    assert 0 < keep.mean() < 1
    w = (layer.weight * keep).detach().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().clone()
    x2 = x.clone().requires_grad_()
    y_ref = ref_op(x2, w, b)
    y_ref.backward(grad_y)

    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    # straight-through: dropped weights get their gradient too
    torch.testing.assert_close(layer.mask_real.grad, w.grad * layer.weight, **tol)
    # the backbone, bias included, is frozen
    assert not layer.weight.requires_grad and layer.weight.grad is None
    if layer.bias is not None:
        assert not layer.bias.requires_grad and layer.bias.grad is None


# ----------------------------------------------------------------------------------------------
def test_binarise_threshold_and_straight_through():
    m = torch.tensor([-1.0, 0.0, THRESHOLD, THRESHOLD + 1e-5, MASK_INIT, 2.0], requires_grad=True)
    out = binarise(m)
    assert out.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # a tie at the threshold drops
    g = torch.randn(6)
    out.backward(g)
    assert torch.equal(m.grad, g)
    assert THRESHOLD == 5e-3 and MASK_INIT == 1e-2


@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
def test_conv_matches_reference(variant):
    kwargs, shape, small_input = CONV_VARIANTS[variant]
    plain = nn.Conv2d(**kwargs)
    if small_input:
        use_small_input_convs(plain)
    layer = PiggybackConv2d.from_conv(plain)
    assert layer.small_input is small_input
    assert torch.equal(layer.weight, plain.weight)

    def ref(x, w, b):
        return F.conv2d(x, w, b, plain.stride, plain.padding, plain.dilation, plain.groups)

    check_against_reference(layer, torch.randn(shape), ref)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_matches_reference(shape, bias):
    layer = PiggybackLinear.from_linear(nn.Linear(7, 4, bias=bias))
    check_against_reference(layer, torch.randn(shape), F.linear)


def test_conv_takes_the_small_input_shortcut(monkeypatch):
    """On a 1x1 map the layer multiplies the centre tap only (a [3, 4] matmul, no
    convolution), and convolves with the full kernel when small_input is off; both compute
    the same."""
    kernels = spy_conv2d(monkeypatch)
    layer = PiggybackConv2d(4, 3, 3, padding=1)
    random_mask(layer)
    x = torch.randn(2, 4, 1, 1)
    y = layer(x)
    layer.small_input = False
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
    assert kernels == [("linear", (3, 4)), ("conv", (3, 3))]


def test_fresh_layers_keep_every_weight():
    for layer in (PiggybackConv2d(3, 4, 3), PiggybackLinear(3, 4)):
        assert torch.equal(layer.mask_real.detach(), torch.full_like(layer.weight, MASK_INIT))
        assert torch.equal(layer.binary_mask(), torch.ones_like(layer.weight))
        assert set(dict(layer.named_buffers())) == {"weight", "bias"}
        assert [n for n, _ in layer.named_parameters()] == ["mask_real"]


def wrapped(name: str):
    """(frozen backbone, Piggyback copy of it, input)."""
    factory, shape = MODELS[name]
    base = factory()
    model = copy.deepcopy(base)
    inject_piggyback(model)
    return base, model, torch.randn(shape)


@pytest.mark.parametrize("name", list(MODELS))
def test_all_ones_mask_equals_frozen_backbone(name):
    base, model, x = wrapped(name)
    with torch.no_grad():
        for _, layer in piggyback_layers(model):
            layer.mask_real.uniform_(THRESHOLD * 1.01, 1.0)  # all above the threshold
        assert kept_fraction(model) == 1.0
        assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("name", list(MODELS))
def test_random_mask_equals_naive_masked_model(name):
    base, model, x = wrapped(name)
    naive = copy.deepcopy(base)
    with torch.no_grad():
        for n, layer in piggyback_layers(model):
            random_mask(layer)
            keep = (layer.mask_real > THRESHOLD).float()
            naive.get_submodule(n).weight.mul_(keep)
        y = model(x)
        assert torch.equal(y, naive(x))
        assert not torch.allclose(y, base(x), atol=1e-4), "the mask should matter"


@pytest.mark.parametrize("name", list(MODELS))
def test_merge_equals_wrapped(name):
    base, model, x = wrapped(name)
    expected = {}
    with torch.no_grad():
        for n, layer in piggyback_layers(model):
            random_mask(layer)
            expected[n] = layer.weight * (layer.mask_real > THRESHOLD)
        y = model(x)
    merged = merge_piggyback(model)
    assert merged is model and not list(piggyback_layers(model))
    for n, w in expected.items():
        plain = model.get_submodule(n)
        assert type(plain) is type(base.get_submodule(n))  # SmallInputConv2d stays one
        assert torch.equal(plain.weight, w)
        if plain.bias is not None:
            assert torch.equal(plain.bias, base.get_submodule(n).bias)  # frozen
    assert set(model.state_dict()) == set(base.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_inject_timm_resnet18_wraps_all_but_the_head():
    model = resnet18()  # at 32x32 its layer4 runs on 1x1 maps
    orig = dict(model.named_modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    expected = [
        n for n, m in orig.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "fc"
    ]
    names = inject_piggyback(model)
    assert names == expected == [n for n, _ in piggyback_layers(model)]
    assert len(names) == 20
    assert model.fc is orig["fc"] and type(model.fc) is nn.Linear
    for n, m in orig.items():
        if isinstance(m, NORM_TYPES):
            assert model.get_submodule(n) is m
    for n, layer in piggyback_layers(model):
        assert type(layer) is PiggybackConv2d and layer.small_input
        assert isinstance(orig[n], SmallInputConv2d)
        assert torch.equal(layer.weight, orig[n].weight)
        assert not layer.training
    # the backbone weights are buffers: of the wrapped layers only the masks train
    trainable = {n for n, _ in model.named_parameters()}
    assert {n for n in trainable if n.rpartition(".")[0] in names} == {
        f"{n}.mask_real" for n in names
    }
    n_weights = sum(orig[n].weight.numel() for n in names)
    assert masked_numel(model) == n_weights
    assert kept_fraction(model) == 1.0
    with torch.no_grad():
        assert torch.equal(model(x), y)  # the initial mask keeps everything
    with pytest.raises(ValueError, match="already"):
        inject_piggyback(model)

    with torch.no_grad():
        for _, layer in piggyback_layers(model):
            random_mask(layer)
        y_pb = model(x)
        assert not torch.allclose(y_pb, y, atol=1e-4)
        merge_piggyback(model)
        assert torch.equal(model(x), y_pb)
    assert all(type(model.get_submodule(n)) is SmallInputConv2d for n in names)


def test_inject_small_net_and_exclude():
    model = small_model()
    assert inject_piggyback(model) == ["conv1", "conv2", "fc"]
    assert type(model.fc) is PiggybackLinear and type(model.head) is nn.Linear
    other = small_model()
    assert inject_piggyback(other, exclude=["conv2", "head"]) == ["conv1", "fc"]
    assert type(other.conv2) is nn.Conv2d


def test_plain_checkpoint_loads_into_injected_model():
    orig, fresh = small_model(), small_model()
    inject_piggyback(fresh)
    result = fresh.load_state_dict(orig.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == ["conv1.mask_real", "conv2.mask_real", "fc.mask_real"]
    assert torch.equal(fresh.conv1.weight, orig.conv1.weight)
    assert torch.equal(fresh.conv1.bias, orig.conv1.bias)


# ----------------------------------------------------------------------------------------------
def test_kept_fraction_and_masked_numel():
    model = small_model()
    inject_piggyback(model)
    # Small: conv1 8*3*3*3 = 216, conv2 6*4*3*3 = 216, fc 10*6 = 60 masked weights
    assert masked_numel(model) == 216 + 216 + 60
    with torch.no_grad():
        model.conv1.mask_real.fill_(THRESHOLD)  # a tie drops: 216 dropped
        model.fc.mask_real[:3].fill_(-1.0)  # 18 dropped
    assert kept_fraction(model) == pytest.approx((216 + 60 - 18) / 492)


def test_helpers_refuse_a_model_without_piggyback_layers():
    with pytest.raises(ValueError, match="no Piggyback layers"):
        kept_fraction(small_model())
    with pytest.raises(ValueError, match="no Piggyback layers"):
        masked_numel(small_model())


def test_binary_mask_and_kept_fraction_drop_a_tie_at_the_threshold_as_the_layer_does():
    model = small_model()
    inject_piggyback(model)
    layers = dict(piggyback_layers(model))
    first = next(iter(layers.values()))
    with torch.no_grad():
        first.mask_real.view(-1)[:5] = THRESHOLD  # a tie: the weight is dropped
    assert torch.equal(first.binary_mask(), binarise(first.mask_real.detach()))
    assert float(first.binary_mask().sum()) == first.weight.numel() - 5
    total = masked_numel(model)
    assert kept_fraction(model) == pytest.approx((total - 5) / total)


@pytest.mark.parametrize("train_norms", [False, True])
def test_a_piggyback_fit_trains_masks_and_head_and_the_norms_only_if_asked(train_norms):
    """What PiggybackMethod asks the harness for: masks at mask_lr in their own group, the head
    at lr, no weight decay (the authors' default), the norms trained (parameters and
    statistics) only with train_norms."""
    from cwps_lightning.methods.piggyback import PiggybackMethod, trainable_setter
    from cwps_lightning.settings import PiggybackSettings

    harness = PlanRecorder()
    settings = PiggybackSettings(lr=0.02, mask_lr=0.03, train_norms=train_norms)
    PiggybackMethod(settings).train("t", 0, None, harness)
    (plan,) = harness.plans
    assert (plan.optimizer.kind, plan.optimizer.lr) == ("adam", 0.02)
    assert plan.optimizer.weight_decay == 0.0
    assert plan.optimizer.groups == {"mask_real": 0.03}
    assert plan.frozen_norms is not train_norms
    model = small_model()
    inject_piggyback(model)
    trainable_setter(train_norms)(model)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    names = [n for n, _ in model.named_parameters()]
    masks = {n for n in names if n.endswith("mask_real")}
    head = {n for n in names if n.startswith("head.")}
    norms = {n for n in names if n.startswith("bn.")}
    assert masks and head and norms
    assert trains == masks | head | (norms if train_norms else set())
