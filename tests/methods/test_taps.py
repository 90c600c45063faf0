"""TAPS layers: the gated residual against a naive reference, model surgery, merge, penalty."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cwps_lightning.cwps.small_input import SmallInputConv2d, use_small_input_convs
from cwps_lightning.methods.taps import (
    GATE_INIT,
    THRESHOLD,
    TAPSConv2d,
    TAPSLinear,
    gate_penalty,
    gate_ste,
    inject_taps,
    merge_taps,
    open_gates,
    taps_layers,
)

from .helpers import CONV_VARIANTS, MODELS, NORM_TYPES, resnet18, small_model, spy_conv2d


def randomise(layer, open_: bool) -> None:
    """A "trained" residual and bias, and the gate on either side of the threshold."""
    with torch.no_grad():
        layer.residual.normal_(0.0, 0.1)
        layer.gate.fill_(0.3 if open_ else 0.05)
        if layer.bias is not None:
            layer.bias.normal_()


def check_against_reference(layer, x, ref_op, open_: bool) -> None:
    """Output and gradients (input, residual, gate, bias) against ``ref_op`` run on the
    composed weight w = w0 + 1[open] * dw as a leaf tensor."""
    randomise(layer, open_)
    x1 = x.clone().requires_grad_()
    y = layer(x1)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    on = 1.0 if open_ else 0.0
    w = (layer.weight + on * layer.residual).detach().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y_ref = ref_op(x2, w, b)
    y_ref.backward(grad_y)

    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    torch.testing.assert_close(layer.residual.grad, on * w.grad, **tol)  # 1[open] dL/dw
    # straight-through: <dL/dw, dw> whether the gate is open or not
    expected_gate = (w.grad * layer.residual.detach()).sum()
    assert expected_gate.abs() > 1e-3
    torch.testing.assert_close(layer.gate.grad, expected_gate, **tol)
    if b is not None:
        torch.testing.assert_close(layer.bias.grad, b.grad, **tol)
    assert not layer.weight.requires_grad and layer.weight.grad is None  # w0 is frozen


# ----------------------------------------------------------------------------------------------
def test_gate_ste_threshold_and_straight_through():
    s = torch.tensor([-1.0, 0.0, THRESHOLD - 1e-4, THRESHOLD, GATE_INIT, 2.0], requires_grad=True)
    out = gate_ste(s)
    assert out.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # a tie at the threshold is open
    g = torch.randn(6)
    out.backward(g)
    assert torch.equal(s.grad, g)
    assert THRESHOLD == 0.1 and GATE_INIT == 0.15


@pytest.mark.parametrize("open_", [True, False], ids=["open", "closed"])
@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
def test_conv_matches_reference(variant, open_):
    kwargs, shape, small_input = CONV_VARIANTS[variant]
    plain = nn.Conv2d(**kwargs)
    if small_input:
        use_small_input_convs(plain)
    layer = TAPSConv2d.from_conv(plain)
    assert layer.small_input is small_input
    assert torch.equal(layer.weight, plain.weight) and not layer.residual.any()

    def ref(x, w, b):
        return F.conv2d(x, w, b, plain.stride, plain.padding, plain.dilation, plain.groups)

    check_against_reference(layer, torch.randn(shape), ref, open_)


@pytest.mark.parametrize("open_", [True, False], ids=["open", "closed"])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_matches_reference(shape, bias, open_):
    layer = TAPSLinear.from_linear(nn.Linear(7, 4, bias=bias))
    check_against_reference(layer, torch.randn(shape), F.linear, open_)


@pytest.mark.parametrize("open_", [True, False], ids=["open", "closed"])
def test_conv_takes_the_small_input_shortcut(open_, monkeypatch):
    """On a 1x1 map the layer multiplies the centre tap only (a [3, 4] matmul, no
    convolution), and convolves with the full kernel when small_input is off; both compute
    the same."""
    kernels = spy_conv2d(monkeypatch)
    layer = TAPSConv2d(4, 3, 3, padding=1)
    randomise(layer, open_)
    x = torch.randn(2, 4, 1, 1)
    y = layer(x)
    layer.small_input = False
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
    assert kernels == [("linear", (3, 4)), ("conv", (3, 3))]


def test_fresh_layers_start_open_with_zero_residual():
    for layer in (TAPSConv2d(3, 4, 3), TAPSLinear(3, 4)):
        assert torch.equal(layer.gate.detach(), torch.tensor(GATE_INIT)) and layer.is_open()
        assert layer.gate.shape == () and not layer.residual.any()
        assert "weight" in dict(layer.named_buffers())
        assert {n for n, _ in layer.named_parameters()} == {"residual", "gate", "bias"}


def wrapped(name: str):
    """(frozen base model, TAPS copy of it, input)."""
    factory, shape = MODELS[name]
    base = factory()
    model = copy.deepcopy(base)
    inject_taps(model)
    return base, model, torch.randn(shape)


@torch.no_grad()
def train_randomly(model: nn.Module, gates: str) -> None:
    """Random residuals; gates all open, all closed or mixed."""
    layers = list(taps_layers(model))
    for i, (_, layer) in enumerate(layers):
        layer.residual.normal_(0.0, 0.02)
        is_open = {"open": True, "closed": False, "mixed": i % 2 == 0}[gates]
        layer.gate.fill_(0.5 if is_open else -0.2)


@pytest.mark.parametrize("name", list(MODELS))
def test_closed_gates_equal_frozen_base(name):
    base, model, x = wrapped(name)
    train_randomly(model, "closed")
    assert not any(open_gates(model).values())
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("name", list(MODELS))
def test_open_gates_equal_plain_model_with_shifted_weights(name):
    base, model, x = wrapped(name)
    train_randomly(model, "open")
    shifted = copy.deepcopy(base)
    with torch.no_grad():
        for n, layer in taps_layers(model):
            shifted.get_submodule(n).weight.copy_(layer.weight + layer.residual)
        y = model(x)
        assert torch.equal(y, shifted(x))
        assert not torch.allclose(y, base(x), atol=1e-4), "the residuals should matter"


@pytest.mark.parametrize("name", list(MODELS))
def test_merge_equals_wrapped(name):
    base, model, x = wrapped(name)
    train_randomly(model, "mixed")
    gates = open_gates(model)
    assert any(gates.values()) and not all(gates.values())
    expected = {n: layer.weight + float(gates[n]) * layer.residual for n, layer in taps_layers(model)}
    with torch.no_grad():
        y = model(x)
    merged = merge_taps(model)
    assert merged is model and not list(taps_layers(model))
    for n, w in expected.items():
        plain = model.get_submodule(n)
        assert type(plain) is type(base.get_submodule(n))  # SmallInputConv2d stays one
        assert torch.equal(plain.weight, w)
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
    names = inject_taps(model)
    assert names == expected == [n for n, _ in taps_layers(model)]
    assert len(names) == 20
    assert model.fc is orig["fc"] and type(model.fc) is nn.Linear
    for n, m in orig.items():
        if isinstance(m, NORM_TYPES):
            assert model.get_submodule(n) is m
    for n, layer in taps_layers(model):
        assert type(layer) is TAPSConv2d and layer.small_input
        assert isinstance(orig[n], SmallInputConv2d)
        assert torch.equal(layer.weight, orig[n].weight)
        assert not layer.training
    # the base weights are buffers: only residuals, gates (and norms, head) train
    trainable = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith(".weight") and n.rpartition(".")[0] in names for n in trainable)
    assert {f"{n}.residual" for n in names} | {f"{n}.gate" for n in names} <= trainable
    with torch.no_grad():
        assert torch.equal(model(x), y)  # dw = 0: the function is unchanged
    with pytest.raises(ValueError, match="already"):
        inject_taps(model)

    train_randomly(model, "closed")
    with torch.no_grad():
        assert torch.equal(model(x), y)
    train_randomly(model, "mixed")
    with torch.no_grad():
        y_taps = model(x)
        assert not torch.allclose(y_taps, y, atol=1e-4)
        merge_taps(model)
        assert torch.equal(model(x), y_taps)
    assert all(type(model.get_submodule(n)) is SmallInputConv2d for n in names)


def test_inject_small_net_and_exclude():
    model = small_model()
    assert inject_taps(model) == ["conv1", "conv2", "fc"]
    assert type(model.fc) is TAPSLinear and type(model.head) is nn.Linear
    other = small_model()
    assert inject_taps(other, exclude=["conv2", "head"]) == ["conv1", "fc"]
    assert type(other.conv2) is nn.Conv2d


def test_plain_checkpoint_loads_into_injected_model():
    orig, fresh = small_model(), small_model()
    inject_taps(fresh)
    result = fresh.load_state_dict(orig.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(
        f"{n}.{k}" for n in ("conv1", "conv2", "fc") for k in ("residual", "gate")
    )
    assert torch.equal(fresh.conv1.weight, orig.conv1.weight)


# ----------------------------------------------------------------------------------------------
def test_gate_penalty_is_mean_abs_gate_and_differentiable():
    model = small_model()
    inject_taps(model)
    values = [0.3, -0.2, 0.05]
    with torch.no_grad():
        for (_, layer), v in zip(taps_layers(model), values, strict=True):
            layer.gate.fill_(v)
    penalty = gate_penalty(model)
    torch.testing.assert_close(penalty, torch.tensor(sum(abs(v) for v in values) / 3))
    penalty.backward()
    for (_, layer), v in zip(taps_layers(model), values, strict=True):
        torch.testing.assert_close(layer.gate.grad, torch.tensor((1.0 if v > 0 else -1.0) / 3))
    assert open_gates(model) == {"conv1": True, "conv2": False, "fc": False}


def test_helpers_refuse_a_model_without_taps_layers():
    with pytest.raises(ValueError, match="no TAPS layers"):
        gate_penalty(small_model())
    with pytest.raises(ValueError, match="no TAPS layers"):
        open_gates(small_model())


def test_a_gate_at_the_threshold_is_open_and_its_residual_is_counted():
    """The layer computes with the residual at s == THRESHOLD (gate_ste), so is_open,
    open_gates and the parameter count must say so too."""
    from cwps_lightning.methods.taps import task_param_count

    model = small_model()
    inject_taps(model)
    layers = dict(taps_layers(model))
    first, layer = next(iter(layers.items()))
    with torch.no_grad():
        for other in layers.values():
            other.gate.fill_(0.0)  # closed
        layer.gate.fill_(THRESHOLD)
    assert float(gate_ste(layer.gate.detach())) == 1.0
    assert layer.is_open()
    assert open_gates(model) == {name: name == first for name in layers}
    assert task_param_count(model)["kernels"] == layer.residual.numel() + sum(
        other.bias.numel() for other in layers.values()
        if other.bias is not None and other.bias.requires_grad)


def test_merge_keeps_the_models_eval_mode():
    model = small_model().eval()
    inject_taps(model)
    merge_taps(model)
    assert not any(m.training for m in model.modules())
