"""CWPS for timm's StdConv2d / ScaledStdConv2d / Conv2dSame (cwps/transformed.py): wrapping
whole timm backbones, exact merges back to the timm classes, gradients against a reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from cwps_lightning.cwps import (
    KernelBank,
    MultiTaskStore,
    cwps_layers,
    inject_cwps,
    merge_cwps,
    merged_kernel_ids,
    save_store,
    search_parents,
    set_stage,
    shareable_layers,
)
from cwps_lightning.cwps.transformed import TRANSFORMED_CONVS, TransformedCWPSConv2d

timm = pytest.importorskip("timm")
from timm.layers import (  # noqa: E402
    Conv2dSame,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    StdConv2d,
    StdConv2dSame,
)

# name -> (input size, number of Conv2d layers, which all get wrapped; the head is a Linear or
# a 1x1 Conv2d classifier, excluded as usual)
MODELS = {
    "resnetv2_50x1_bit": (32, 53),  # every conv a StdConv2d (head.fc: a plain 1x1 conv)
    "tf_efficientnet_b0": (64, 81),  # 76 nn.Conv2d + 5 Conv2dSame (+ the Linear classifier)
}


# a half-width BiT (same layers, all StdConv2d; 5.9M parameters instead of 23.5M) where the
# size only costs time: the store writes and hashes every kernel
HALF_BIT = {"channels": [128, 256, 512, 1024], "stem_chs": 32}


def timm_model(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()


@torch.no_grad()
def randomise(model: nn.Module) -> None:
    """Move the child off its init (BiT zero-inits some kernels), give every channel its own
    parent perturbation and draw mask logits of both signs."""
    for _, layer in cwps_layers(model):
        w = layer.weight
        scale = w.std() + 1e-3
        w.add_(0.1 * scale * torch.randn_like(w))
        amp = torch.rand(w.shape[0], 1, 1, 1) * 0.8 + 0.2  # per output channel
        pb = None if layer.bias is None else layer.bias + 0.1 * torch.randn_like(layer.bias)
        layer.set_parent(w + amp * scale * torch.randn_like(w), pb)
        layer.mask_logits.normal_(0.0, 2.0)


def conv_names(model: nn.Module, head: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != head]


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_timm_backbone_wraps_every_conv_and_merges_exactly(name):
    size, n_convs = MODELS[name]
    model = timm_model(name)
    plain_keys = list(model.state_dict())
    orig_types = {n: type(m) for n, m in model.named_modules()}
    head = model.pretrained_cfg["classifier"]
    convs = conv_names(model, head)
    assert len(convs) == n_convs

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left to the warning
        names = inject_cwps(model)
    assert [n for n in names if n in convs] == convs  # (a) every conv wrapped
    layers = dict(cwps_layers(model))
    assert list(layers) == names
    for n in convs:
        expected = TRANSFORMED_CONVS.get(f"{orig_types[n].__module__}.{orig_types[n].__qualname__}")
        if expected is not None:
            assert type(layers[n]) is expected
    assert any(isinstance(m, TransformedCWPSConv2d) for m in layers.values())

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y_plain = model(x)  # finetune stage: the wrapped model computes the plain one
    randomise(model)
    set_stage(model, "hard")
    with torch.no_grad():
        y_hard = model(x)
    scale = y_hard.abs().max()
    assert not torch.allclose(y_hard, y_plain, atol=1e-3 * float(scale)), "parents must matter"

    merge_cwps(model)
    assert not list(cwps_layers(model))
    for n in names:  # (c) the merged layers are the original classes
        assert type(model.get_submodule(n)) is orig_types[n]
    assert list(model.state_dict()) == plain_keys
    with torch.no_grad():
        y_merged = model(x)
    # (b) wrapped hard == merged (bit for bit in practice)
    torch.testing.assert_close(y_merged, y_hard, atol=1e-5 * float(scale), rtol=0)


def test_plain_checkpoint_loads_into_wrapped_bit():
    plain = timm_model("resnetv2_50x1_bit")
    model = timm_model("resnetv2_50x1_bit")
    inject_cwps(model)
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert {k.rsplit(".", 1)[1] for k in result.missing_keys} == {"parent_weight", "mask_logits"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)


def test_bank_and_store_round_trip_a_merged_bit(tmp_path):
    name = "resnetv2_50x1_bit"
    t0 = timm_model(name, **HALF_BIT)
    bank = KernelBank(KernelBank.shareable_of(t0))
    assert bank.layer_names == conv_names(t0, "head.fc")
    bank.add("T0", t0, 5)

    model = timm_model(name, **HALF_BIT)
    model.load_state_dict(t0.state_dict())
    inject_cwps(model)
    with torch.no_grad():
        for _, layer in cwps_layers(model):
            layer.weight.add_(0.05 * torch.randn_like(layer.weight))
    result = search_parents(model, bank, "a")
    with torch.no_grad():
        for _, layer in cwps_layers(model):  # first half task-specific, the rest shared
            c = layer.mask_logits.shape[0]
            layer.mask_logits.copy_(torch.where(torch.arange(c) < c // 2, 5.0, -5.0))
    set_stage(model, "hard")
    ids = merged_kernel_ids(model, result)
    merge_cwps(model)
    bank.add("a", model, 5, kernel_ids=ids)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        loaded = bank.load_into("a", timm_model(name, **HALF_BIT))
        assert torch.equal(loaded(x), y)
        save_store(tmp_path, bank, {"backbone": {"name": name, "kwargs": HALF_BIT}})
        store = MultiTaskStore.load(tmp_path)
        assert torch.equal(store.model("a")(x), y)
        assert torch.equal(store.model("T0")(x), t0(x))
    assert store.param_count() == bank.param_count()


# -- single layers: merge and gradients ----------------------------------------------------------
# name -> (timm layer factory, input shape); strides 2 make the SAME padding dynamic
LAYERS = {
    "std": (lambda: StdConv2d(4, 6, 3, padding=1), (2, 4, 7, 7)),
    "std_bias_eps": (lambda: StdConv2d(4, 6, 3, stride=2, bias=True, eps=1e-3), (2, 4, 8, 8)),
    "std_same": (lambda: StdConv2dSame(4, 6, 3, stride=2), (2, 4, 8, 8)),
    "std_same_static": (lambda: StdConv2dSame(4, 6, 3), (2, 4, 7, 7)),
    "scaled": (lambda: ScaledStdConv2d(4, 6, 3, gamma=1.7), (2, 4, 7, 7)),
    "scaled_same": (lambda: ScaledStdConv2dSame(8, 6, 3, stride=2, groups=2), (2, 8, 8, 8)),
    "same": (lambda: Conv2dSame(4, 6, 3, stride=2), (2, 4, 8, 8)),
    "same_depthwise_5x5": (
        lambda: Conv2dSame(6, 6, 5, stride=2, groups=6, bias=False), (2, 6, 9, 9)
    ),
    "std_dilated": (lambda: StdConv2d(4, 6, 3, padding=2, dilation=2), (2, 4, 9, 9)),
    "same_dilated": (lambda: Conv2dSame(4, 6, 3, stride=2, dilation=2), (2, 4, 9, 9)),
}


def make_layer(name: str, dtype=torch.float32):
    factory, shape = LAYERS[name]
    plain = factory().to(dtype)
    with torch.no_grad():
        if hasattr(plain, "gain"):
            plain.gain.uniform_(0.5, 1.5)  # not the constant init
    cls = TRANSFORMED_CONVS[f"{type(plain).__module__}.{type(plain).__qualname__}"]
    layer = cls.from_conv(plain)
    with torch.no_grad():
        w = layer.weight
        pw = w + torch.randn_like(w) * (w.std() + 0.1)
        pb = None if layer.bias is None else layer.bias + torch.randn_like(layer.bias)
        layer.set_parent(pw, pb)
        logits = torch.randn_like(layer.mask_logits) * 2.0
        logits[0], logits[1], logits[2] = 2.0, -2.0, 0.0  # specific, shared, a tie (specific)
        layer.mask_logits.copy_(logits)
    return plain, layer, torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_finetune_is_plain_and_hard_merges_exactly(name):
    plain, layer, x = make_layer(name)
    assert layer.stage == "finetune"
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))
        layer.stage = "hard"
        spec = layer.task_specific()
        assert spec.any() and (~spec).any()
        y_hard = layer(x)
        merged = layer.to_plain()
        assert type(merged) is type(plain)
        assert list(merged.state_dict()) == list(plain.state_dict())
        for attr in ("eps", "scale", "same_pad", "gain_init"):
            if hasattr(plain, attr):
                assert getattr(merged, attr) == getattr(plain, attr), attr
        if hasattr(plain, "gain"):
            assert torch.equal(merged.gain, plain.gain)
        assert torch.equal(merged.weight[spec], layer.weight[spec])
        assert torch.equal(merged.weight[~spec], layer.parent_weight[~spec])
        assert torch.equal(merged(x), y_hard)
        # the mask matters: neither the child's nor the parent's layer gives this output
        assert not torch.allclose(y_hard, plain(x), atol=1e-4)


def reference(plain: nn.Module, layer, x, stage: str, params: dict[str, torch.Tensor]):
    """Naive autograd: compose (straight-through via hard + sig - sig.detach()), then run the
    timm layer's own forward on the composed weight."""
    sig = torch.sigmoid(params["mask_logits"])
    m = sig if stage == "soft" else (sig >= layer.threshold).to(sig.dtype) + sig - sig.detach()
    pw, pb = layer.parent_weight, layer.parent_bias
    state = {"weight": pw + m.view(-1, 1, 1, 1) * (params["weight"] - pw)}
    if layer.bias is not None:
        state["bias"] = pb + m * (params["bias"] - pb)
    if "gain" in params:
        state["gain"] = params["gain"]
    return functional_call(plain, state, (x,))


@pytest.mark.parametrize("stage", ["soft", "hard"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_gradients_match_naive_reference(name, stage):
    plain, layer, x = make_layer(name, torch.float64)
    layer.stage = stage
    x1 = x.clone().requires_grad_(True)
    y = layer(x1)
    g = torch.randn_like(y)
    y.backward(g)

    own = dict(layer.named_parameters())
    params = {k: p.detach().clone().requires_grad_(True) for k, p in own.items()}
    x2 = x.clone().requires_grad_(True)
    y_ref = reference(plain, layer, x2, stage, params)
    y_ref.backward(g)

    opts = dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(y, y_ref, **opts)
    torch.testing.assert_close(x1.grad, x2.grad, **opts)
    assert set(own) >= {"weight", "mask_logits"}
    for k, p in own.items():  # child weight/bias, mask logits, gain
        torch.testing.assert_close(p.grad, params[k].grad, **opts, msg=k)
    assert layer.mask_logits.grad.abs().min() > 0
    assert layer.parent_weight.grad is None


@pytest.mark.parametrize("mask_grad", ["sigmoid", "identity"])
def test_hard_mask_gradient_is_slope_times_mask_gradient(mask_grad):
    """dL/ds = dL/dm * sigmoid'(s) in the hard stage (identity: dL/dm), as the stock layers'
    _ComposedOp."""
    _, layer, x = make_layer("std", torch.float64)
    layer.mask_grad = mask_grad
    layer.stage = "hard"
    y = layer(x)
    g = torch.randn_like(y)
    m = layer.task_specific().to(torch.float64).requires_grad_(True)
    # dL/dm at the hard mask, computed on the composed weight directly
    w = layer.parent_weight + m.view(-1, 1, 1, 1) * (layer.weight.detach() - layer.parent_weight)
    y_m = nn.functional.conv2d(x, layer._transform(w), None, layer.stride, layer.padding)
    (grad_m,) = torch.autograd.grad(y_m, m, g)
    y.backward(g)
    sig = torch.sigmoid(layer.mask_logits.detach())
    slope = sig * (1 - sig) if mask_grad == "sigmoid" else torch.ones_like(sig)
    torch.testing.assert_close(layer.mask_logits.grad, grad_m * slope)


# -- what is not wrapped -------------------------------------------------------------------------
def test_unsupported_subclasses_are_skipped_with_a_warning_naming_them():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    class MyStdConv2d(StdConv2d):  # a subclass is not the class CWPS knows: not matched
        pass

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), Doubled(4, 4, 1), MyStdConv2d(4, 4, 1), StdConv2d(4, 4, 1),
        nn.Flatten(), nn.Linear(36, 2),
    )
    with pytest.warns(UserWarning, match=r"custom forward.*Doubled, MyStdConv2d.*'1', '2'"):
        names = inject_cwps(model)
    assert names == ["0", "3"]
    assert type(model[1]) is Doubled and type(model[2]) is MyStdConv2d


def test_stock_only_selection_leaves_transformed_convs_out():
    """TAPS / Piggyback wrap with nn.Conv2d's forward: they ask for stock layers only."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), StdConv2d(4, 4, 1), Conv2dSame(4, 4, 3, 2),
                          nn.Linear(4, 2))
    assert shareable_layers(model) == ["0", "1", "2"]
    with pytest.warns(UserWarning, match="Conv2dSame, StdConv2d"):
        assert shareable_layers(model, transformed=False) == ["0"]


def test_a_frozen_gain_stays_frozen():
    """A ScaledStdConv2d whose gain is frozen: the CWPS layer and its merge keep it frozen."""
    plain = ScaledStdConv2d(4, 6, 3)
    plain.gain.requires_grad_(False)
    layer = TRANSFORMED_CONVS["timm.layers.std_conv.ScaledStdConv2d"].from_conv(plain)
    assert not layer.gain.requires_grad
    with torch.no_grad():
        layer.set_parent(torch.randn_like(layer.weight), torch.randn_like(layer.bias))
    layer.stage = "hard"
    layer(torch.randn(2, 4, 7, 7)).sum().backward()
    assert layer.gain.grad is None and layer.weight.grad is not None
    assert not layer.to_plain().gain.requires_grad


def test_from_conv_refuses_a_layer_of_another_class():
    """Wrapping a plain conv in the standardising CWPS class would change what it computes."""
    cls = TRANSFORMED_CONVS["timm.layers.std_conv.StdConv2d"]
    with pytest.raises(TypeError, match="CWPSStdConv2d wraps timm.layers.std_conv.StdConv2d, "
                                        "got Conv2d"):
        cls.from_conv(nn.Conv2d(4, 6, 3))


@pytest.mark.parametrize("stage", ["soft", "hard"])
def test_unwritten_parent_is_refused(stage):
    plain, _, x = make_layer("std")
    layer = type(_).from_conv(plain, fill_parent=False)
    assert layer.parent_unset
    layer(x)  # finetune: the parent is not read
    layer.stage = stage
    with pytest.raises(RuntimeError, match="parent was never installed"):
        layer(x)


def test_hard_stage_decides_at_the_layers_threshold():
    """At lambda = 0.8 a channel with sigmoid(s) = 0.5 is shared: the hard stage computes what
    the merged timm layer computes."""
    plain, layer, x = make_layer("std")
    layer.threshold = 0.8
    layer.stage = "hard"
    spec = layer.task_specific()
    assert spec[0] and not spec[2]  # sigmoid(2) = 0.88 specific, sigmoid(0) = 0.5 shared
    with torch.no_grad():
        assert torch.equal(layer(x), layer.to_plain()(x))


def test_a_float64_layer_merges_into_a_float64_timm_layer():
    plain, layer, x = make_layer("scaled", torch.float64)
    layer.stage = "hard"
    merged = layer.to_plain()
    assert merged.weight.dtype == torch.float64 and type(merged) is type(plain)
    with torch.no_grad():
        assert torch.equal(merged(x), layer(x))


def test_built_directly_the_scaled_layer_computes_as_timms():
    """CWPSScaledStdConv2d(...) with timm's defaults (gamma 1: the scale fan_in ** -0.5) in
    the finetune stage is ScaledStdConv2d with the same weights."""
    cls = TRANSFORMED_CONVS["timm.layers.std_conv.ScaledStdConv2d"]
    ours = cls(4, 6, 3, padding=1)
    theirs = ScaledStdConv2d(4, 6, 3, padding=1)
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items()
                            if k in theirs.state_dict()})
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
