"""ComposeGroup: the small kernels of an injected model composed in one autograd node, with the
values and gradients of the per-layer composition bit for bit, and composed again exactly when
something it depends on changed."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cwps_lightning.cwps import compose_group, surgery
from cwps_lightning.cwps.layers import KEEP_COMPOSED_NUMEL, CWPSConv2d, CWPSLinear
from cwps_lightning.cwps.surgery import cwps_layers, inject_cwps, set_stage


class Net(nn.Module):
    """Convs with and without bias, a linear head with bias, a second head that only
    ``use_second`` uses, and (``twice``) conv2 run twice in one forward."""

    def __init__(self, twice=False):
        super().__init__()
        self.twice = twice
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.head = nn.Linear(8, 5)
        self.other = nn.Linear(8, 5, bias=False)
        self.use_second = False

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        if self.twice:
            x = F.relu(self.conv2(x))
        x = x.mean((2, 3))
        return self.other(x) if self.use_second else self.head(x)


def _model(stage="soft", mask_grad="sigmoid", seed=0, twice=False):
    torch.manual_seed(seed)
    model = Net(twice)
    inject_cwps(model, exclude=[], threshold=0.5, mask_grad=mask_grad)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in cwps_layers(model):
            w = layer.weight
            pb = None if layer.bias is None else layer.bias + torch.randn(layer.bias.shape, generator=g)
            layer.set_parent(w + torch.randn(w.shape, generator=g), pb)
            layer.mask_logits.copy_(torch.randn(layer.mask_logits.shape, generator=g) * 2)
    set_stage(model, stage)
    return model


def _ungrouped(model):
    """A copy whose layers compose one by one (the path without a group)."""
    twin = copy.deepcopy(model)
    for _, layer in cwps_layers(twin):
        layer.__dict__.pop("_compose_group", None)
    return twin


def _grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def _step(model, x, r):
    out = model(x)
    (out * r).sum().backward()
    return out.detach()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 5, generator=g)


def _assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
        elif exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_inject_groups_the_small_kernels():
    model = _model()
    group = model.conv1.__dict__["_compose_group"][0]
    assert group.layers == [layer for _, layer in cwps_layers(model)]
    big = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1025), nn.Linear(1025, 2))
    inject_cwps(big, exclude=["2"])
    assert big[0].weight.numel() == KEEP_COMPOSED_NUMEL
    assert "_compose_group" in big[0].__dict__
    assert "_compose_group" not in big[1].__dict__  # over the bound: composes on its own


def test_groups_are_consecutive_layers_of_at_most_group_numel(monkeypatch):
    monkeypatch.setattr(surgery, "GROUP_NUMEL", 8 * 3 * 9 + 8 * 8)  # conv1 and conv2
    model = _model()
    groups = [layer.__dict__["_compose_group"] for _, layer in cwps_layers(model)]
    assert [i for _, i in groups] == [0, 1, 0, 1]  # conv1, conv2 | head, other
    assert groups[0][0] is groups[1][0] and groups[2][0] is groups[3][0]
    assert groups[0][0] is not groups[2][0]


@pytest.mark.parametrize("stage,mask_grad,group_numel", [
    ("soft", "sigmoid", None), ("hard", "sigmoid", None), ("hard", "identity", None),
    ("soft", "sigmoid", 8 * 3 * 9 + 8 * 8),  # two groups
])
def test_values_and_gradients_equal_the_per_layer_path(batch, monkeypatch, stage, mask_grad,
                                                       group_numel):
    x, r = batch
    if group_numel is not None:
        monkeypatch.setattr(surgery, "GROUP_NUMEL", group_numel)
    grouped = _model(stage, mask_grad)
    plain = _ungrouped(grouped)
    for _ in range(2):  # a second step: composed again after the first backward
        out_g, out_p = _step(grouped, x, r), _step(plain, x, r)
        assert torch.equal(out_g, out_p)
        _assert_same(_grads(grouped), _grads(plain))
    grads = _grads(grouped)
    assert grads["conv2.mask_logits"].abs().sum() > 0  # the scores learn
    assert grads["other.weight"] is None  # not used: no gradient, as without the group


def test_gradients_under_cpu_autocast_equal_the_per_layer_path(batch):
    x, r = batch
    grouped = _model("hard")
    plain = _ungrouped(grouped)
    for model in (grouped, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        (out.float() * r).sum().backward()
    _assert_same(_grads(grouped), _grads(plain))


def test_a_frozen_child_gets_no_gradient_and_the_scores_still_learn(batch):
    x, r = batch
    grouped = _model("soft")
    grouped.conv1.weight.requires_grad_(False)
    plain = _ungrouped(grouped)
    _step(grouped, x, r), _step(plain, x, r)
    _assert_same(_grads(grouped), _grads(plain))
    assert grouped.conv1.weight.grad is None and grouped.conv1.mask_logits.grad is not None


def test_the_unused_member_takes_part_when_used(batch):
    x, r = batch
    grouped = _model("hard")
    grouped.use_second = True
    plain = _ungrouped(grouped)
    _step(grouped, x, r), _step(plain, x, r)
    _assert_same(_grads(grouped), _grads(plain))
    assert grouped.other.weight.grad is not None and grouped.head.weight.grad is None


def _count_composes(monkeypatch, alone_calls=None):
    """Record the index of every shared composition made (into ``alone_calls`` the
    single-layer ones made outside a model's forward)."""
    calls = []
    real = compose_group.ComposeGroup._compose

    def counted(self, index, key, alone=False):
        if not alone:
            calls.append(index)
        elif alone_calls is not None:
            alone_calls.append(index)
        return real(self, index, key, alone=alone)

    monkeypatch.setattr(compose_group.ComposeGroup, "_compose", counted)
    return calls


class _InForward:
    """The model's layers share compositions as inside its forward (the hooks' enter / exit)."""

    def __init__(self, model):
        self.groups = model.__dict__["_compose_groups"]

    def __enter__(self):
        for g in self.groups:
            g.enter()

    def __exit__(self, *exc):
        for g in self.groups:
            g.exit()


def test_composes_once_per_forward_and_again_when_an_input_changes(batch, monkeypatch):
    x, r = batch
    calls = _count_composes(monkeypatch)
    model = _model("soft")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(model, x, r)
    assert len(calls) == 1  # four layers in one node
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        before = model(x)
        model(x)
    assert len(calls) == 3  # one composition per forward
    with torch.no_grad():
        model.conv1.weight.data.mul_(0.5)  # no version bump: a new forward composes anyway
        after = model(x)
    assert len(calls) == 4 and not torch.equal(before, after)
    assert torch.equal(after, _ungrouped(model)(x))


def test_an_input_changed_inside_a_forward_composes_again(batch, monkeypatch):
    x, _ = batch
    calls = _count_composes(monkeypatch)
    model = _model("soft")
    z = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), _InForward(model):
        model.conv1(x)  # conv1 served: the composition holds conv2's weight too
        model.conv2.parent_weight.mul_(0.5)
        model.conv2.stage = "hard"
        y = model.conv2(z)
        assert len(calls) == 2  # conv2's inputs changed since: a new composition
    with torch.no_grad():
        assert torch.equal(y, _ungrouped(model).conv2(z))


def test_a_forward_after_a_backward_composes_again(batch, monkeypatch):
    x, r = batch
    calls = _count_composes(monkeypatch)
    grouped = _model("hard")
    plain = _ungrouped(grouped)
    # two backward passes before a step (gradient accumulation): the weights did not change,
    # but the first backward freed the node, so the second forward makes a new one
    for _ in range(2):
        _step(grouped, x, r), _step(plain, x, r)
    assert len(calls) == 2
    _assert_same(_grads(grouped), _grads(plain))


def test_a_layer_run_twice_in_one_forward(batch, monkeypatch):
    """Its second call starts a new composition, as the per-layer path composes per call: the
    same gradients bit for bit."""
    x, r = batch
    calls = _count_composes(monkeypatch)
    grouped = _model("hard", twice=True)
    plain = _ungrouped(grouped)
    for _ in range(2):
        assert torch.equal(_step(grouped, x, r), _step(plain, x, r))
    assert len(calls) == 4
    _assert_same(_grads(grouped), _grads(plain))


@pytest.mark.parametrize("stage,separate", [("soft", False), ("hard", True)])
def test_two_forwards_then_one_or_two_backwards(batch, stage, separate):
    x, r = batch
    grouped = _model(stage)
    plain = _ungrouped(grouped)
    for model in (grouped, plain):
        first, second = (model(x) * r).sum(), (model(x * 2) * r).sum()
        if separate:
            first.backward()
            second.backward()
        else:
            first.add(second).backward()
    _assert_same(_grads(grouped), _grads(plain))


def test_two_losses_of_one_forward_backpropagated_one_after_the_other(batch):
    """The node keeps its inputs as attributes: a second backward through it works (with the
    graph retained up to it), as through the per-layer composition."""
    x, r = batch
    grouped = _model("soft")
    plain = _ungrouped(grouped)
    for model in (grouped, plain):
        out = model(x)
        (out * r).sum().backward(retain_graph=True)
        (out * r * 2).sum().backward()
    _assert_same(_grads(grouped), _grads(plain))


def test_an_in_place_change_before_the_backward_is_an_error(batch):
    x, r = batch
    model = _model("soft")
    loss = (model(x) * r).sum()
    with torch.no_grad():
        model.conv1.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_non_reentrant_activation_checkpointing(batch):
    from torch.utils.checkpoint import checkpoint

    x, r = batch
    grouped = _model("hard")
    plain = _ungrouped(grouped)
    for model in (grouped, plain):
        (checkpoint(model, x, use_reentrant=False) * r).sum().backward()
    _assert_same(_grads(grouped), _grads(plain))


def test_a_dropped_model_is_freed_without_the_garbage_collector(batch):
    import gc
    import weakref

    x, r = batch
    model = _model("soft")
    _step(model, x, r)
    with torch.no_grad():
        model(x)  # a live composition too
    weight = weakref.ref(model.conv1.weight)
    gc.disable()
    try:
        del model
        assert weight() is None
    finally:
        gc.enable()


def test_copies_and_pickles_start_without_a_composition(batch):
    x, r = batch
    model = _model("soft")
    out = model(x)  # a live composition (with its autograd graph) in the group
    twin = copy.deepcopy(model)
    clone = pickle.loads(pickle.dumps(model))
    for other in (twin, clone):
        group, index = other.conv1.__dict__["_compose_group"]
        assert group.layers[index] is other.conv1
        assert getattr(group._local, "composition", None) is None
        assert torch.equal(other(x), out)
    with torch.no_grad():
        twin.conv1.weight.add_(1.0)
    assert not torch.equal(twin(x), out) and torch.equal(model(x), out)
    (out * r).sum().backward()  # the original's graph is intact
    assert model.conv1.weight.grad is not None


def test_layers_made_one_by_one_compose_on_their_own():
    conv = CWPSConv2d.from_conv(nn.Conv2d(3, 4, 3))
    linear = CWPSLinear.from_linear(nn.Linear(3, 4))
    assert "_compose_group" not in conv.__dict__ and "_compose_group" not in linear.__dict__


def test_a_shallow_copy_of_a_member_composes_on_its_own(batch, monkeypatch):
    """nn.DataParallel's replicas copy the layer's __dict__: they share the group attribute but
    are not its members, so they compose from their own tensors."""
    x, _ = batch
    calls = _count_composes(monkeypatch)
    model = _model("soft")
    twin = CWPSConv2d.__new__(CWPSConv2d)
    twin.__dict__ = model.conv1.__dict__.copy()  # as _replicate_for_data_parallel does
    assert twin.__dict__["_compose_group"] == model.conv1.__dict__["_compose_group"]
    with torch.no_grad():
        out = twin(x)
        assert torch.equal(out, _ungrouped(model).conv1(x))
    assert calls == []  # no group composition: the per-layer path


def test_threads_compose_for_themselves(batch, monkeypatch):
    """A composition belongs to the thread that made it: another thread's forward neither
    takes weights from it nor replaces it."""
    import threading

    x, _ = batch
    calls = _count_composes(monkeypatch)
    model = _model("hard")
    z = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(3))
    out = {}

    def other():
        with torch.no_grad(), _InForward(model):
            out["other"] = model.conv2(z)

    with torch.no_grad(), _InForward(model):
        model.conv1(x)  # this thread's composition, conv2 not served yet
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert len(calls) == 2  # the other thread composed its own
        out["main"] = model.conv2(z)  # served from this thread's composition
    assert len(calls) == 2
    with torch.no_grad():
        expected = _ungrouped(model).conv2(z)
    assert torch.equal(out["main"], expected) and torch.equal(out["other"], expected)


def test_a_layer_called_on_its_own_composes_alone_and_nothing_is_left_after_a_forward(
        batch, monkeypatch):
    x, _ = batch
    alone = []
    calls = _count_composes(monkeypatch, alone)
    model = _model("soft")
    group = model.__dict__["_compose_groups"][0]
    feat = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(x)  # the second head is not used: it is not served
        assert len(calls) == 1 and getattr(group._local, "composition", None) is None
        model.other.weight.data.add_(1.0)  # no version bump
        y = model.other(feat)  # outside the model's forward: composed alone, from now
        assert len(calls) == 1 and alone == [3]
        assert torch.equal(y, _ungrouped(model).other(feat))


def test_an_error_in_the_forward_ends_the_shared_composition(batch):
    x, _ = batch
    model = _model("soft")
    group = model.__dict__["_compose_groups"][0]
    model.head.register_forward_hook(lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(x)
    assert getattr(group._local, "depth", 0) == 0
    assert getattr(group._local, "composition", None) is None


def test_checkpointed_region_after_a_weight_write_that_counts_no_version(batch):
    """A layer outside a checkpointed region, the others inside, weights written through
    .data between steps (as a fused optimiser does, without a version bump): the gradients of
    every step are the per-layer path's."""
    from torch.utils.checkpoint import checkpoint

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU())
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            h = checkpoint(self.block, self.conv1(x), use_reentrant=False)
            return self.head(h.mean((2, 3)))

    x, r = batch
    torch.manual_seed(0)
    grouped = Outer()
    inject_cwps(grouped, exclude=[])
    set_stage(grouped, "soft")
    plain = _ungrouped(grouped)
    for _ in range(3):
        for model in (grouped, plain):
            model.zero_grad()
            _step(model, x, r)
            for p in model.parameters():
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-0.1)
        _assert_same(_grads(grouped), _grads(plain))


def test_double_backward_is_refused_with_a_clear_error(batch):
    x, r = batch
    model = _model("soft")
    loss = (model(x) * r).sum()
    (g,) = torch.autograd.grad(loss, model.conv2.mask_logits, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        g.sum().backward()


def test_torch_func_transforms_compose_per_layer(batch):
    x, r = batch
    grouped = _model("hard")
    plain = _ungrouped(grouped)
    params = {k: v.detach() for k, v in grouped.named_parameters()}

    def loss(model):
        return lambda p: (torch.func.functional_call(model, p, (x,)) * r).sum()

    ga = torch.func.grad(loss(grouped))(params)
    gb = torch.func.grad(loss(plain))(params)
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k


def test_ungroup_small_kernels_removes_the_groups_and_hooks(batch):
    x, _ = batch
    model = _model("soft")
    assert model._forward_pre_hooks and model._forward_hooks
    surgery.ungroup_small_kernels(model)
    assert "_compose_groups" not in model.__dict__
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all("_compose_group" not in layer.__dict__ for _, layer in cwps_layers(model))
    model(x)


def test_a_layer_copied_on_its_own_leaves_its_group_behind(batch):
    x, _ = batch
    model = _model("soft")
    for twin in (copy.deepcopy(model.conv1), pickle.loads(pickle.dumps(model.conv1))):
        assert "_compose_group" not in twin.__dict__
        assert len(pickle.dumps(twin)) < len(pickle.dumps(model)) / 2  # not every member
        with torch.no_grad():
            assert torch.equal(twin(x), _ungrouped(model).conv1(x))
    copied = copy.deepcopy(model)  # the whole model: its layers join the copied group
    group, index = copied.conv2.__dict__["_compose_group"]
    assert group is copied.__dict__["_compose_groups"][0] and group.layers[index] is copied.conv2


def test_an_interrupted_forward_does_not_leave_the_scope_open(batch):
    x, _ = batch
    model = _model("soft")
    group = model.__dict__["_compose_groups"][0]
    handle = model.head.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        model(x)
    handle.remove()
    assert group._local.depth == 1  # PyTorch runs always-called hooks on Exception only
    with torch.no_grad():
        model(x)  # the next forward starts afresh and closes the scope
    assert group._local.depth == 0 and group._local.composition is None


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_takes_the_per_layer_path(batch):
    x, _ = batch
    model = _model("hard")
    traced = torch.jit.trace(model, (x,), check_trace=False)
    with torch.no_grad():
        assert torch.equal(traced(x), _ungrouped(model)(x))


@pytest.mark.parametrize("change", ["weight", "parent_weight"])
def test_one_in_place_write_inside_a_forward_composes_again(batch, change):
    """Only conv2's child (or only its parent) is written between two layers of one forward."""
    x, _ = batch
    model = _model("soft")
    z = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), _InForward(model):
        model.conv1(x)  # the composition holds conv2's weight too
        getattr(model.conv2, change).mul_(0.5)
        y = model.conv2(z)
    with torch.no_grad():
        assert torch.equal(y, _ungrouped(model).conv2(z))


def test_a_layer_run_with_autograd_after_one_run_without_gets_its_gradients(batch):
    x, _ = batch
    model = _model("soft")
    z = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(3))
    with _InForward(model):
        with torch.no_grad():
            model.conv1(x)  # the shared composition is made without autograd
        model.conv2(z).sum().backward()
    assert model.conv2.weight.grad is not None and model.conv2.mask_logits.grad is not None


def test_a_merged_model_keeps_no_group_and_copies_and_pickles(batch):
    x, _ = batch
    model = surgery.merge_cwps(_model("hard"))
    assert "_compose_groups" not in model.__dict__
    assert not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        y = model(x)
        assert torch.equal(copy.deepcopy(model)(x), y)
        assert torch.equal(pickle.loads(pickle.dumps(model))(x), y)
