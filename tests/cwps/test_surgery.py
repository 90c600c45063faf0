"""inject_cwps / merge_cwps / set_stage / sharing_stats on small models and timm backbones."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cwps_lightning.cwps import (
    CWPSConv2d,
    CWPSLinear,
    classifier_names,
    cwps_layers,
    inject_cwps,
    merge_cwps,
    set_stage,
    set_threshold,
    shareable_layers,
    sharing_stats,
)

from ..helpers import Small

timm = pytest.importorskip("timm")

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)

# name -> (create_model kwargs, head name)
TIMM_MODELS = {
    "resnet18": (dict(num_classes=5), "fc"),
    "vit_tiny_patch16_224": (dict(num_classes=5, img_size=32, patch_size=8), "head"),
    "densenet121": (dict(num_classes=5), "classifier"),
}


def timm_model(name: str) -> nn.Module:
    kwargs, _ = TIMM_MODELS[name]
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@torch.no_grad()
def randomise_model(model: nn.Module, scale: float = 0.3) -> None:
    """Random parents near the child and random logits (both signs) in every CWPS layer."""
    for _, layer in cwps_layers(model):
        w = layer.weight
        pw = w + scale * (w.std() + 1e-3) * torch.randn_like(w)
        pb = None if layer.bias is None else layer.bias + scale * torch.randn_like(layer.bias)
        layer.set_parent(pw, pb)
        layer.mask_logits.normal_(0.0, 2.0)




# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_inject_and_merge_timm(name):
    _, head = TIMM_MODELS[name]
    model = timm_model(name)
    # keep the original modules (surgery replaces them in place; no deepcopy, it is slow here)
    orig_modules = dict(model.named_modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y_orig = model(x)

    norms = {n: m for n, m in model.named_modules() if isinstance(m, NORM_TYPES)}
    assert norms, "the backbone should have normalisation layers"
    head_module = model.get_submodule(head)
    expected = [
        n for n, m in orig_modules.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != head
    ]
    assert classifier_names(model) == [head]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Conv2d/Linear subclass should be skipped here
        names = inject_cwps(model)

    assert names == expected
    assert [n for n, _ in cwps_layers(model)] == expected
    # head untouched (same object, plain type)
    assert model.get_submodule(head) is head_module
    assert type(head_module) is nn.Linear
    # norm layers untouched (same objects) and never wrapped
    for n, m in norms.items():
        assert model.get_submodule(n) is m
    for n, layer in cwps_layers(model):
        assert isinstance(
            layer, CWPSConv2d if isinstance(orig_modules[n], nn.Conv2d) else CWPSLinear
        )
        assert layer.stage == "finetune"
        assert torch.equal(layer.weight, orig_modules[n].weight)
        assert torch.equal(layer.parent_weight, orig_modules[n].weight)
        assert not layer.training

    with torch.no_grad():
        y_ft = model(x)
    torch.testing.assert_close(y_ft, y_orig, atol=1e-6, rtol=0)

    randomise_model(model)
    set_stage(model, "hard")
    stats = sharing_stats(model)
    assert 0.0 < stats["specific_channel_fraction"] < 1.0
    with torch.no_grad():
        y_hard = model(x)
    assert not torch.allclose(y_hard, y_orig, atol=1e-3), "the parents should change the output"

    merged = merge_cwps(model)
    assert merged is model
    assert not list(cwps_layers(merged))
    merged_modules = dict(merged.named_modules())
    for n in expected:
        assert type(merged_modules[n]) is type(orig_modules[n])
    assert not any(k.endswith(("parent_weight", "mask_logits")) for k in merged.state_dict())
    with torch.no_grad():
        y_merged = merged(x)
    torch.testing.assert_close(y_merged, y_hard, atol=1e-5, rtol=0)


def test_plain_checkpoint_loads_into_injected_model():
    orig = Small()
    fresh = Small()
    inject_cwps(fresh)
    result = fresh.load_state_dict(orig.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(
        k.rsplit(".", 1)[1] in ("parent_weight", "parent_bias", "mask_logits")
        for k in result.missing_keys
    )
    x = torch.randn(2, 3, 8, 8)
    fresh.eval(), orig.eval()
    torch.testing.assert_close(fresh(x), orig(x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_inject_takes_the_plain_parameters_and_keeps_their_layout(channels_last):
    """The CWPS layers' children are the plain layers' own Parameters (no copy), the parents
    equal copies in the same memory format; from_conv / from_linear on their own copy (the
    plain layer stays independent)."""
    model = Small()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.conv1.weight.requires_grad_(False)
    plain = {n: model.get_submodule(n) for n in shareable_layers(model)}
    inject_cwps(model)
    for name, layer in cwps_layers(model):
        p = plain[name]
        assert layer.weight is p.weight and layer.bias is p.bias
        assert layer.parent_weight.stride() == p.weight.stride()
        assert torch.equal(layer.parent_weight, p.weight)
        assert layer.parent_weight.data_ptr() != p.weight.data_ptr()
        assert layer.weight.requires_grad == (name != "conv1")
    for p in plain.values():
        copied = (CWPSConv2d.from_conv(p) if isinstance(p, nn.Conv2d)
                  else CWPSLinear.from_linear(p))
        assert torch.equal(copied.weight, p.weight)
        assert copied.weight.stride() == p.weight.stride()
        assert copied.weight.requires_grad == p.weight.requires_grad
        with torch.no_grad():
            copied.weight.add_(1.0)
        assert not torch.equal(copied.weight, p.weight)


def test_inject_copies_weights_it_cannot_take():
    """A weight computed by a parametrization (weight norm) and a Parameter two layers hold
    (tied) are copied, as before the layers took theirs over; the rest are taken."""
    model = Small()
    nn.utils.parametrizations.weight_norm(model.conv1)
    w1 = model.conv1.weight.detach().clone()
    fc_w = model.fc.weight
    inject_cwps(model)
    assert torch.equal(model.conv1.weight, w1) and type(model.conv1.weight) is nn.Parameter
    assert model.fc.weight is fc_w
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    tied[2].weight = tied[0].weight
    w, b0 = tied[0].weight, tied[0].bias
    inject_cwps(tied)
    assert tied[0].weight is not w and tied[2].weight is not w
    assert tied[0].weight is not tied[2].weight
    assert torch.equal(tied[0].weight, w) and torch.equal(tied[2].weight, w)
    assert tied[0].bias is not b0 and torch.equal(tied[0].bias, b0)  # the layer is copied


def test_a_layer_whose_weight_disagrees_with_its_attributes_is_refused():
    conv = nn.Conv2d(3, 8, 3)
    conv.weight = nn.Parameter(torch.randn(8, 3, 5, 5))
    with pytest.raises(ValueError, match=r"weight has shape \(8, 3, 5, 5\).*\(8, 3, 3, 3\)"):
        CWPSConv2d.from_conv(conv, take=True)


def test_unwritten_parents_are_refused_until_installed():
    model = Small()
    inject_cwps(model, fill_parents=False)
    assert all(layer.parent_unset for _, layer in cwps_layers(model))
    x = torch.randn(2, 3, 8, 8)
    model(x)  # finetune: the parent is not read
    # set_stage names the layers (the forward, later, named only the class)
    for stage in ("soft", "hard"):
        with pytest.raises(RuntimeError, match=rf"set_stage\('{stage}'\): no parent installed "
                                               r"in conv1, conv2, fc \(inject_cwps with "):
            set_stage(model, stage)
        assert all(layer.stage == "finetune" for _, layer in cwps_layers(model))
    set_stage(model, "finetune")
    for _, layer in cwps_layers(model):  # (a layer's own stage setter: its forward refuses)
        layer.stage = "soft"
    with pytest.raises(RuntimeError, match="parent was never installed"):
        model(x)
    for _, layer in cwps_layers(model):
        layer.stage = "hard"
    with pytest.raises(RuntimeError, match="parent was never installed"):
        merge_cwps(model)
    model.conv1.set_parent(model.conv1.weight, model.conv1.bias)
    assert not model.conv1.parent_unset and model.conv2.parent_unset
    with pytest.raises(RuntimeError, match=r"no parent installed in conv2, fc \("):
        set_stage(model, "hard")
    filled = Small()
    inject_cwps(filled)
    model.load_state_dict(filled.state_dict())
    assert not any(layer.parent_unset for _, layer in cwps_layers(model))
    model(x)
    merge_cwps(model)


def test_refuses_to_wrap_twice():
    model = Small()
    inject_cwps(model)
    snapshot = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="twice"):
        inject_cwps(model)
    assert [type(m) for m in model.modules()] == snapshot


def test_nothing_to_wrap_raises():
    with pytest.raises(ValueError, match="no nn.Conv2d/nn.Linear"):
        inject_cwps(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()))
    # everything excluded is "nothing matched" too
    with pytest.raises(ValueError, match="no nn.Conv2d/nn.Linear"):
        inject_cwps(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))  # the only Linear is the head


def test_exclude_names_honoured():
    model = timm_model("resnet18")
    names = inject_cwps(model, exclude=["fc", "layer1", "layer3.0.downsample"])
    assert names
    for n in names:
        assert not n.startswith("layer1.") and n != "fc"
        assert not n.startswith("layer3.0.downsample")
    assert "layer2.0.conv1" in names and "conv1" in names and "layer3.0.conv1" in names
    assert type(model.layer1[0].conv1) is nn.Conv2d
    assert type(model.layer3[0].downsample[0]) is nn.Conv2d
    assert type(model.fc) is nn.Linear
    assert isinstance(model.layer2[0].conv1, CWPSConv2d)

    # exclude=[] overrides the default: the head is wrapped too
    model = timm_model("resnet18")
    names = inject_cwps(model, exclude=[])
    assert "fc" in names and isinstance(model.fc, CWPSLinear)


def test_exclude_is_by_module_prefix_not_string_prefix():
    model = nn.Module()
    model.layer1 = nn.Conv2d(3, 3, 1)
    model.layer10 = nn.Conv2d(3, 3, 1)
    model.head = nn.Linear(3, 2)
    assert shareable_layers(model, exclude=["layer1"]) == ["layer10", "head"]


def test_unknown_exclude_raises():
    model = Small()
    with pytest.raises(ValueError, match="no_such_layer"):
        inject_cwps(model, exclude=["head", "no_such_layer"])
    assert not list(cwps_layers(model))


def test_a_model_without_a_head_found_warns_that_every_layer_is_shared():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 10, 1))
    with pytest.warns(UserWarning, match="found no classifier head in Sequential"):
        assert inject_cwps(model) == ["0", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # naming the head (or anything) is the way out
        assert shareable_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 10, 1)),
                                exclude=["1"]) == ["0"]


def test_default_exclude_is_last_linear_without_timm_cfg():
    model = Small()
    assert classifier_names(model) == ["head"]
    assert inject_cwps(model) == ["conv1", "conv2", "fc"]
    assert type(model.head) is nn.Linear and type(model.bn) is nn.BatchNorm2d


def test_custom_forward_subclass_left_alone_with_warning():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(4, 4), Scaled(4, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="custom forward"):
        names = inject_cwps(model)
    assert names == ["0"]
    assert type(model[1]) is Scaled


def test_set_stage_and_threshold():
    model = Small()
    with pytest.raises(ValueError):
        set_stage(model, "soft")  # no CWPS layers yet
    inject_cwps(model, threshold=0.3)
    assert all(layer.threshold == 0.3 for _, layer in cwps_layers(model))
    set_stage(model, "soft")
    assert all(layer.stage == "soft" for _, layer in cwps_layers(model))
    set_threshold(model, 0.7)
    assert all(layer.threshold == 0.7 for _, layer in cwps_layers(model))


def test_sharing_stats_consistent_with_masks():
    model = Small()
    inject_cwps(model)
    # finetune: everything is task-specific
    assert sharing_stats(model) == {
        "specific_channel_fraction": 1.0,
        "specific_param_fraction": 1.0,
    }

    with torch.no_grad():
        model.conv1.mask_logits.copy_(torch.tensor([1.0, -1, 1, -1, 1, -1, -1, -1]))  # 3 / 8
        model.conv2.mask_logits.copy_(torch.tensor([1.0, 1, 1, 1, 1, -1]))  # 5 / 6
        model.fc.mask_logits.copy_(-torch.ones(10))  # 0 / 10
    set_stage(model, "hard")
    # per-channel parameter counts: conv1 3*3*3 + 1 = 28, conv2 (8/2)*3*3 = 36, fc 6 + 1 = 7
    spec = {"conv1": 3, "conv2": 5, "fc": 0}
    chans = {"conv1": 8, "conv2": 6, "fc": 10}
    per = {"conv1": 28, "conv2": 36, "fc": 7}
    for n, layer in cwps_layers(model):
        assert int(layer.task_specific().sum()) == spec[n]
    stats = sharing_stats(model)
    assert stats["specific_channel_fraction"] == pytest.approx(8 / 24)
    expected_params = sum(spec[n] * per[n] for n in spec) / sum(chans[n] * per[n] for n in spec)
    assert stats["specific_param_fraction"] == pytest.approx(expected_params)

    # a lower threshold makes every channel specific (sigmoid(-1) = 0.27 >= 0.2)
    set_threshold(model, 0.2)
    assert sharing_stats(model)["specific_channel_fraction"] == 1.0
    # the soft stage reports the same hard-mask statistics as the hard stage
    set_threshold(model, 0.5)
    set_stage(model, "soft")
    assert sharing_stats(model) == stats


def test_inject_refuses_root_layer():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="itself"):
        inject_cwps(conv, exclude=[])


def test_mask_flips_counts_changed_decisions_per_stage():
    from cwps_lightning.cwps.surgery import mask_flips

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.Linear(5, 2))
    inject_cwps(net, exclude=["3"], threshold=0.5)
    a, b = net[0], net[2]
    with torch.no_grad():
        a.mask_logits.copy_(torch.tensor([-1.0, -1.0, 1.0, 1.0]))
        b.mask_logits.copy_(torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0]))
    set_stage(net, "soft")
    with torch.no_grad():  # soft stage: a flips channel 0 and 2; b flips channel 3
        a.mask_logits.copy_(torch.tensor([1.0, -1.0, -1.0, 1.0]))
        b.mask_logits.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0]))
    set_stage(net, "hard")
    with torch.no_grad():  # hard stage: a flips channel 0 back
        a.mask_logits[0] = -1.0
    flips = mask_flips(net)
    assert flips == {"soft": 3, "hard": 1, "total": 2, "channels": 9}


def test_mask_flips_of_a_fit_without_soft_stage():
    from cwps_lightning.cwps.surgery import mask_flips

    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    inject_cwps(net, exclude=["1"])
    set_stage(net, "hard")
    with torch.no_grad():
        net[0].mask_logits.fill_(-1.0)  # zeros (all specific) -> all shared
    assert mask_flips(net) == {"soft": 0, "hard": 4, "total": 4, "channels": 4}


def test_merge_refuses_nan_weights_and_leaves_the_model_as_it_was():
    model = Small()
    inject_cwps(model)
    set_stage(model, "hard")
    layers = dict(cwps_layers(model))
    with torch.no_grad():
        layers["conv2"].weight[0].fill_(float("nan"))
        layers["conv2"].mask_logits[0] = 10.0  # the nan channel is task-specific: it merges
    with pytest.raises(ValueError, match=r"merge_cwps: conv2\.weight has nan/inf"):
        merge_cwps(model)
    assert isinstance(model.conv1, CWPSConv2d) and isinstance(model.conv2, CWPSConv2d)


def test_a_model_without_cwps_layers_is_refused_where_the_answer_would_be_empty():
    """(after merge_cwps, or before inject_cwps: sharing_stats said 0 % task-specific,
    set_threshold did nothing, a freeze froze nothing, a merge merged nothing)"""
    from cwps_lightning.cwps import merged_kernel_ids, set_threshold, sharing_stats
    from cwps_lightning.cwps.freeze import SharedChannelFreeze
    from cwps_lightning.cwps.step_compose import use_forward_compose, use_step_compose
    from cwps_lightning.cwps.surgery import specific_by_layer

    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    for call, name in ((lambda: sharing_stats(plain), "sharing_stats"),
                       (lambda: specific_by_layer(plain), "specific_by_layer"),
                       (lambda: set_threshold(plain, 0.3), "set_threshold"),
                       (lambda: merged_kernel_ids(plain, None), "merged_kernel_ids"),
                       (lambda: SharedChannelFreeze(plain), "SharedChannelFreeze"),
                       # (merge_cwps returned the model as it was; use_step_compose returned 0)
                       (lambda: merge_cwps(plain), "merge_cwps"),
                       (lambda: use_step_compose(plain), "use_step_compose"),
                       # (use_forward_compose returned 0 where use_step_compose raised)
                       (lambda: use_forward_compose(plain), "use_forward_compose")):
        with pytest.raises(ValueError, match=rf"^{name}: the model has no CWPS layers"):
            call()


def test_something_that_is_not_a_module_is_refused_by_name():
    """(a model's name passed for the model: raw AttributeErrors from deep inside)"""
    from cwps_lightning.cwps import (
        KernelBank,
        SharedChannelFreeze,
        classifier_names,
        release_composed,
        search_parents,
    )

    for call, name in ((lambda: inject_cwps("resnet18"), "inject_cwps"),
                       (lambda: list(cwps_layers("resnet18")), "cwps_layers"),
                       (lambda: classifier_names("resnet18"), "classifier_names"),
                       (lambda: release_composed("resnet18"), "release_composed"),
                       (lambda: KernelBank.shareable_of("resnet18"), "shareable_layers"),
                       (lambda: set_stage("resnet18", "soft"), "set_stage"),
                       (lambda: merge_cwps("resnet18"), "merge_cwps"),
                       (lambda: SharedChannelFreeze("resnet18"), "SharedChannelFreeze"),
                       (lambda: search_parents("resnet18", None, "t"), "search_parents")):
        with pytest.raises(TypeError, match=rf"^{name}: expected the model, an nn\.Module; got "
                                            r"str 'resnet18' \(a name is not a model"):
            call()
    with pytest.raises(TypeError, match=r"^set_stage: expected the model, an nn\.Module; got "
                                        r"NoneType$"):
        set_stage(None, "soft")
    model = Small()
    inject_cwps(model)
    with pytest.raises(TypeError, match=r"search_parents: bank must be a KernelBank, got dict"):
        search_parents(model, {}, "t")


def test_one_excluded_name_as_a_string_and_a_threshold_out_of_range():
    from cwps_lightning.cwps import hard_mask, shareable_layers

    model = Small()
    assert shareable_layers(model, exclude="head") == shareable_layers(model, exclude=["head"])
    assert "fc" not in shareable_layers(model, exclude="fc")
    with pytest.raises(ValueError, match=r"threshold \(lambda\) must be in \[0, 1\], got 2\.0"):
        hard_mask(torch.zeros(3), 2.0)


class _Aliased(nn.Module):
    """One conv registered under two names (c and c2), applied twice."""

    def __init__(self, classes=3):
        super().__init__()
        self.inp = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = self.c
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        h = torch.relu(self.c(self.inp(x)))
        return self.fc(torch.relu(self.c2(h)).mean((2, 3)))


def test_a_module_registered_under_two_names_stays_one_module_through_inject_and_merge():
    """inject_cwps set the first name only: the second kept the plain conv (untied), the
    model trained two different convs, and a store rebuilt it from both of them."""
    from cwps_lightning.methods.taps import inject_taps, merge_taps

    torch.manual_seed(0)
    model = _Aliased()
    names = inject_cwps(model, exclude=["fc"])
    assert names == ["inp", "c"]
    assert model.c2 is model.c and isinstance(model.c, CWPSConv2d)
    set_stage(model, "hard")
    x = torch.randn(2, 3, 6, 6)
    hard = model(x)
    merge_cwps(model)
    assert model.c2 is model.c and type(model.c) is nn.Conv2d
    assert torch.allclose(model(x), hard, atol=1e-6)
    other = _Aliased()  # the baselines' layers (methods/weight_layers.py) likewise
    inject_taps(other, exclude=["fc"])
    assert other.c2 is other.c and type(other.c) is not nn.Conv2d
    merge_taps(other)
    assert other.c2 is other.c and type(other.c) is nn.Conv2d
