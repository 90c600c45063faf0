"""Shared channels stand still in the hard stage (cwps/freeze.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cwps_lightning.cwps import inject_cwps, set_stage
from cwps_lightning.cwps.freeze import SharedChannelFreeze, _rows, _sgd_that_skips
from cwps_lightning.optim import FusedSGD, make_sgd


def setup(stage: str, optimizer: str = "sgd", train_masks: bool = True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(6 * 4 * 4, 5), nn.Linear(5, 2))
    inject_cwps(net, exclude=["4"])
    with torch.no_grad():
        for layer in (net[0], net[3]):
            layer.set_parent(torch.randn_like(layer.weight), torch.randn_like(layer.bias))
            c = layer.mask_logits.numel()
            layer.mask_logits.copy_(torch.linspace(-2, 2, c))  # half shared, half specific
            layer.mask_logits.requires_grad_(train_masks)
    set_stage(net, stage)
    if optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1)
    return net, opt


def steps(net, opt, n=3):
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(n):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_shared_children_do_not_drift_in_the_hard_stage(optimizer):
    for freeze in (False, True):
        net, opt = setup("hard", optimizer, train_masks=False)  # decisions fixed over the steps
        if freeze:
            SharedChannelFreeze(net).attach(opt)
        layers = (net[0], net[3])
        shared = [~(torch.sigmoid(layer.mask_logits.detach()) >= 0.5) for layer in layers]
        before = [(layer.weight.detach().clone(), layer.bias.detach().clone()) for layer in layers]
        steps(net, opt)
        for layer, sh, (w0, b0) in zip(layers, shared, before, strict=True):
            moved_w = (layer.weight.detach() != w0).flatten(1).any(1)
            moved_b = layer.bias.detach() != b0
            # task-specific channels train either way
            assert moved_w[~sh].all() and moved_b[~sh].all()
            # shared channels: weight decay / moments move them unless frozen
            assert moved_w[sh].any() != freeze and moved_b[sh].any() != freeze


def test_soft_stage_is_left_alone():
    net, opt = setup("soft")
    SharedChannelFreeze(net).attach(opt)
    w0 = net[0].weight.detach().clone()
    steps(net, opt, 1)
    assert (net[0].weight.detach() != w0).flatten(1).any(1).all()


def test_a_channel_that_flips_back_starts_from_its_frozen_kernel():
    net, opt = setup("hard")
    SharedChannelFreeze(net).attach(opt)
    layer = net[0]
    steps(net, opt, 1)
    frozen = layer.weight.detach()[0].clone()  # channel 0: logit -2, shared
    with torch.no_grad():
        layer.mask_logits[0] = 3.0  # it becomes task-specific
    steps(net, opt, 1)
    # its first update as a task-specific channel starts from the frozen kernel, no momentum
    assert not torch.equal(layer.weight.detach()[0], frozen)
    buf = opt.state[layer.weight]["momentum_buffer"][0]
    step = frozen - layer.weight.detach()[0]
    torch.testing.assert_close(step, 0.1 * buf)  # lr * (0.9 * 0 + grad + wd * w) = lr * buf


def test_channels_last_kernels_restore_whole_rows():
    """Each channel's kernel is one dense run in a channels_last weight: the restore copies rows
    of a [C, K] view of it; the kernel keeps its format, shared channels stand still."""
    net, opt = setup("hard", train_masks=False)
    net[0].to(memory_format=torch.channels_last)
    SharedChannelFreeze(net).attach(opt)
    layer = net[0]
    shared = ~(torch.sigmoid(layer.mask_logits.detach()) >= 0.5)
    w0 = layer.weight.detach().clone()
    x = torch.randn(8, 3, 4, 4).to(memory_format=torch.channels_last)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    w = layer.weight.detach()
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    moved = (w != w0).flatten(1).any(1)
    assert not moved[shared].any() and moved[~shared].all()


@pytest.mark.parametrize("shape, dtype, wide", [
    ((6, 8, 1, 1), torch.float32, torch.complex128),  # rows of 32 bytes
    ((6, 2, 3, 3), torch.float32, torch.float64),  # 72 bytes: 8 divide, 16 do not
    ((6, 3, 3, 3), torch.float32, torch.float32),  # 108 bytes
    ((6, 8), torch.bfloat16, torch.complex128),
    ((6,), torch.float32, torch.float32),  # a bias: one value per row
])
def test_rows_are_moved_as_wide_elements_bit_for_bit(shape, dtype, wide):
    """The freeze copies rows through a view with the widest element that divides a row (the
    CPU's index_copy_ is per element): the same memory, and every bit pattern (NaN payloads,
    -0.0, subnormals) comes back as it was."""
    n = torch.Size(shape).numel()
    bits = torch.randint(-2**15, 2**15, (n,), dtype=torch.int16, generator=torch.Generator().manual_seed(0))
    if dtype == torch.float32:
        bits = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32,
                             generator=torch.Generator().manual_seed(0))
        bits[:4] = torch.tensor([0x7FC01234, -2**31, 1, 0x7F800001], dtype=torch.int32)
    p = bits.view(dtype).view(shape)
    rows = _rows(p)
    assert rows.dtype == wide and rows.data_ptr() == p.data_ptr() and rows.shape[0] == shape[0]
    index = torch.tensor([0, 2, 5])
    packed = rows.index_select(0, index)
    before = bits.clone()
    with torch.no_grad():
        p.view(bits.dtype).fill_(0)  # every row overwritten
    rows.index_copy_(0, index, packed)
    after = p.view(bits.dtype).view(shape)
    kept = before.view(shape)[index]
    assert torch.equal(after[index], kept)
    others = torch.ones(shape[0], dtype=torch.bool)
    others[index] = False
    assert (after[others] == 0).all()  # nothing written outside the rows


def test_rows_of_memory_not_aligned_to_wide_elements_stay_narrow():
    """Memory from a buffer can start anywhere: complex128 wants 16-byte alignment."""
    import numpy as np

    raw = np.zeros(4 + 6 * 8 * 4, dtype=np.uint8)
    p = torch.from_numpy(raw[4:4 + 6 * 8 * 4].view(np.float32)).view(6, 8)
    assert p.data_ptr() % 8 == 4 and p.storage_offset() == 0
    assert _rows(p).dtype == torch.float32


def test_conjugate_views_keep_their_own_rows():
    p = torch.randn(6, 4, dtype=torch.complex64).conj()
    rows = _rows(p)
    assert rows.dtype == torch.complex64 and rows.is_conj()


def test_rows_at_an_offset_that_wide_elements_cannot_meet_stay_narrow():
    flat = torch.zeros(2 + 6 * 8)
    p = flat[1:49].view(6, 8)  # 4 bytes into the storage: no 8- or 16-byte element starts there
    assert _rows(p).dtype == torch.float32
    p2 = flat[2:].view(6, 8)  # 8 bytes in: float64 fits, complex128 does not
    assert _rows(p2).dtype == torch.float64


def test_a_change_of_memory_format_between_steps_keeps_the_frozen_kernels():
    net, opt = setup("hard", train_masks=False)
    SharedChannelFreeze(net).attach(opt)
    layer = net[0]
    shared = ~(torch.sigmoid(layer.mask_logits.detach()) >= 0.5)
    steps(net, opt, 1)
    frozen = layer.weight.detach()[shared].clone()
    net[0].to(memory_format=torch.channels_last)  # same values, another order in memory
    steps(net, opt, 2)
    assert torch.equal(layer.weight.detach()[shared], frozen)


def test_the_copy_lives_for_the_step_alone():
    """Nothing weight-sized stays with the freeze between steps (it would add to the training
    peak): it keeps per layer only the decisions and their indices."""
    net, opt = setup("hard")
    freeze = SharedChannelFreeze(net).attach(opt)
    steps(net, opt, 2)
    assert freeze._steps[opt].pending == []
    held = sum(t.numel() for entry in freeze._steps[opt].last.values() for t in entry[:2])
    channels = sum(layer.mask_logits.numel() for layer in (net[0], net[3]))
    assert 0 < held <= 2 * 2 * channels  # bools and indices, weight and bias of each layer


def test_an_edit_between_steps_is_what_the_next_steps_keep():
    """The rows a step restores are the weight's own at that step: a shared channel edited
    between steps (a checkpoint load, a user's write) keeps the edit, then stands still."""
    net, opt = setup("hard", train_masks=False)
    SharedChannelFreeze(net).attach(opt)
    layer = net[0]
    shared = ~(torch.sigmoid(layer.mask_logits.detach()) >= 0.5)
    steps(net, opt, 1)
    with torch.no_grad():
        layer.weight[shared] = 7.0
    steps(net, opt, 2)
    assert (layer.weight.detach()[shared] == 7.0).all()


def test_a_parameter_that_sat_out_a_step_takes_the_decisions_anew():
    """Decisions that change while a bias sits out a step (frozen), then stay: the bias must
    not reuse the indices of its own last step, two steps back."""
    net, opt = setup("hard", train_masks=False)
    SharedChannelFreeze(net).attach(opt)
    layer = net[0]
    steps(net, opt, 1)  # shared: the channels with negative logits (0..2)
    layer.bias.requires_grad_(False)
    with torch.no_grad():
        layer.mask_logits.neg_()  # now channels 3..5 are shared
    steps(net, opt, 1)
    layer.bias.requires_grad_(True)
    shared = ~(torch.sigmoid(layer.mask_logits.detach()) >= 0.5)
    b0 = layer.bias.detach().clone()
    steps(net, opt, 1)  # decisions as at the last step: the one-comparison path
    moved = layer.bias.detach() != b0
    assert not moved[shared].any() and moved[~shared].all()


@pytest.mark.parametrize("keyword", [False, True])
def test_a_step_with_a_closure_copies_after_the_backward(keyword):
    """optimizer.step(closure) runs the forward and backward inside the step (Lightning's
    automatic optimisation): the copy is taken when the closure returns, not before the
    forward, and the shared channels still stand still."""
    net, opt = setup("hard", train_masks=False)
    freeze = SharedChannelFreeze(net).attach(opt)
    layer = net[0]
    shared = ~(torch.sigmoid(layer.mask_logits.detach()) >= 0.5)
    w0 = layer.weight.detach().clone()
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    held_in_closure = []

    def closure():
        held_in_closure.append(len(freeze._steps[opt].pending))
        opt.zero_grad()
        loss = net(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure=closure) if keyword else opt.step(closure)
    assert held_in_closure == [0, 0]
    moved = (layer.weight.detach() != w0).flatten(1).any(1)
    assert not moved[shared].any() and moved[~shared].all()


class _TwoCalls(torch.optim.Optimizer):
    """Calls the closure twice and moves every weight after each call, as LBFGS does."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for _ in range(2):
            with torch.enable_grad():
                loss = closure()
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(1.0)
        return loss


def test_the_copy_is_of_the_weights_before_the_step_began():
    net, _ = setup("hard", train_masks=False)
    opt = _TwoCalls(net.parameters())
    SharedChannelFreeze(net).attach(opt)
    layer = net[0]
    shared = ~(torch.sigmoid(layer.mask_logits.detach()) >= 0.5)
    w0 = layer.weight.detach().clone()
    x = torch.randn(8, 3, 4, 4)

    def closure():
        opt.zero_grad()
        loss = net(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    w = layer.weight.detach()
    assert torch.equal(w[shared], w0[shared])
    torch.testing.assert_close(w[~shared], w0[~shared] + 2.0)


def test_each_optimiser_zeroes_its_own_state_when_a_channel_flips_back():
    """Weights in one optimiser, biases in another, one freeze attached to both."""
    net, _ = setup("hard", train_masks=False)
    layer = net[0]
    biases = [p for name, p in net.named_parameters() if name.endswith("bias")]
    rest = [p for name, p in net.named_parameters() if not name.endswith("bias")]
    a = torch.optim.SGD(rest, lr=1e-3, momentum=0.9, weight_decay=0.1)
    b = torch.optim.SGD(biases, lr=1e-3, momentum=0.9, weight_decay=0.1)
    freeze = SharedChannelFreeze(net)
    freeze.attach(a)
    freeze.attach(b)
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))

    def both_steps():
        a.zero_grad()
        b.zero_grad()
        net(x).pow(2).mean().backward()
        a.step()
        b.step()

    both_steps()
    both_steps()
    with torch.no_grad():
        layer.mask_logits[0] = 3.0  # channel 0: shared -> task-specific
    a.zero_grad()
    b.zero_grad()
    net(x).pow(2).mean().backward()
    b0, g0 = layer.bias[0].item(), layer.bias.grad[0].item()
    a.step()
    b.step()
    # the bias's momentum row started from zero: buf = 0.9 * 0 + grad + wd * b
    assert b.state[layer.bias]["momentum_buffer"][0].item() == pytest.approx(g0 + 0.1 * b0)


def _all_shared_then_hard(optimizer: str):
    """net[0] with every channel shared, net[3] half; one soft step first (momentum exists)."""
    net, _ = setup("soft", train_masks=False)
    # (the loss is in the thousands with these parents: a larger lr takes it to inf)
    opt = make_sgd(list(net.parameters()), lr=1e-5, momentum=0.9, weight_decay=0.1,
                   fused=optimizer == "fused")
    with torch.no_grad():
        net[0].mask_logits.fill_(-3.0)
    steps(net, opt, 1)
    set_stage(net, "hard")
    return net, opt


@pytest.mark.parametrize("optimizer", ["sgd", "fused"])
def test_a_parameter_with_every_channel_shared_sits_the_step_out(optimizer):
    """Under SGD it is not stepped at all: its weight and momentum stay bit for bit, its
    gradient is back after the step; the half-shared layer still trains its specific rows."""
    net, opt = _all_shared_then_hard(optimizer)
    freeze = SharedChannelFreeze(net).attach(opt)
    w0, b0 = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    buf0 = opt.state[net[0].weight]["momentum_buffer"].clone()
    lin0 = net[3].weight.detach().clone()
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        grad = net[0].weight.grad
        opt.step()
        assert net[0].weight.grad is grad and freeze._steps[opt].sat_out == []
    assert torch.equal(net[0].weight.detach(), w0) and torch.equal(net[0].bias.detach(), b0)
    assert torch.equal(opt.state[net[0].weight]["momentum_buffer"], buf0)
    shared = ~(torch.sigmoid(net[3].mask_logits.detach()) >= 0.5)
    moved = (net[3].weight.detach() != lin0).any(1)
    assert not moved[shared].any() and moved[~shared].all()


def test_sitting_out_moves_the_weights_as_the_copy_does():
    """Sitting out and copying give the same weights bit for bit, through a channel of the
    all-shared layer turning task-specific again (its momentum row starts from zero either
    way); the momentum buffers agree on every task-specific row."""
    nets = []
    for sit_out in (None, False):
        net, opt = _all_shared_then_hard("sgd")
        SharedChannelFreeze(net, sit_out=sit_out).attach(opt)
        nets.append((net, opt))
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for step in range(4):
        if step == 2:
            for net, _ in nets:
                with torch.no_grad():
                    net[0].mask_logits[1] = 3.0
        for net, opt in nets:
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
        (a, opt_a), (b, opt_b) = nets
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert pa.isfinite().all() and torch.equal(pa, pb)
    specific = torch.sigmoid(a[0].mask_logits.detach()) >= 0.5
    assert specific.tolist() == [False, True, False, False, False, False]
    bufs = [opt.state[net[0].weight]["momentum_buffer"] for net, opt in nets]
    assert torch.equal(bufs[0][specific], bufs[1][specific])
    assert not torch.equal(bufs[0][~specific], bufs[1][~specific])  # the copy decayed them


def test_adam_keeps_copying_a_parameter_with_every_channel_shared():
    """Adam's step count is the parameter's: it steps (count and all) and the copy restores."""
    net, _ = setup("hard", train_masks=False)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1)
    with torch.no_grad():
        net[0].mask_logits.fill_(-3.0)
    SharedChannelFreeze(net).attach(opt)
    w0 = net[0].weight.detach().clone()
    steps(net, opt, 2)
    assert torch.equal(net[0].weight.detach(), w0)
    assert float(opt.state[net[0].weight]["step"]) == 2.0


def test_sit_out_takes_none_or_false():
    net, _ = setup("hard")
    with pytest.raises(ValueError, match="sit_out must be None .* got True"):
        SharedChannelFreeze(net, sit_out=True)


@pytest.mark.parametrize("kind", ["dampening", "torch-fused"])
def test_a_parameter_without_a_momentum_buffer_yet_is_copied(kind):
    """Shared from the first step, a parameter has no momentum buffer: SGD would start one as
    the gradient where the copy path's zeroed row steps from zero (dampening makes them differ)
    and torch's fused step refuses a mix of missing and present buffers. It is copied until it
    has one: the same weights as always copying, through a channel turning task-specific."""
    nets = []
    for sit_out in (None, False):
        net, _ = setup("hard", train_masks=False)
        with torch.no_grad():
            net[0].mask_logits.fill_(-3.0)
        opt = torch.optim.SGD(net.parameters(), lr=1e-5, momentum=0.9, weight_decay=0.1,
                              dampening=0.5 if kind == "dampening" else 0.0,
                              fused=kind == "torch-fused")
        SharedChannelFreeze(net, sit_out=sit_out).attach(opt)
        nets.append((net, opt))
    for step in range(4):
        if step == 2:
            for net, _ in nets:
                with torch.no_grad():
                    net[0].mask_logits[1] = 3.0
        steps(nets[0][0], nets[0][1], 1)
        steps(nets[1][0], nets[1][1], 1)
        for pa, pb in zip(nets[0][0].parameters(), nets[1][0].parameters(), strict=True):
            assert torch.equal(pa, pb)


class _ClosureTwiceSGD(torch.optim.SGD):
    """An SGD subclass whose step runs the closure twice (a probe pass, then the real one)."""

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            closure()
            loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.add(p, alpha=group["weight_decay"]), alpha=-group["lr"])
        return loss


def test_an_sgd_subclass_that_does_not_declare_it_keeps_the_copy():
    """Its second closure call makes a fresh gradient the step applies: sitting out would let
    the wholly shared weight move. Undeclared subclasses are copied; torch's SGD and FusedSGD
    sit out."""
    net, _ = setup("hard", train_masks=False)
    with torch.no_grad():
        net[0].mask_logits.fill_(-3.0)
    opt = _ClosureTwiceSGD(net.parameters(), lr=1e-3, weight_decay=0.1)
    freeze = SharedChannelFreeze(net).attach(opt)
    w0 = net[0].weight.detach().clone()
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))

    def closure():
        opt.zero_grad()
        loss = net(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    assert torch.equal(net[0].weight.detach(), w0)
    assert not freeze._steps[opt].sat_out
    assert freeze._steps[opt].step == 2

    class _OfFused(FusedSGD):  # inherits the declaration, does not make it
        pass

    sits = [_sgd_that_skips(c([torch.zeros(1)], lr=0.1))
            for c in (torch.optim.SGD, FusedSGD, _ClosureTwiceSGD, _OfFused)]
    assert sits == [True, True, False, False]


def test_attaching_twice_is_one_attachment():
    """A second attach would take the gradients in its pre-hook after the first did, and
    drop them: it does nothing."""
    net, opt = _all_shared_then_hard("sgd")
    freeze = SharedChannelFreeze(net)
    assert freeze.attach(opt) is freeze.attach(opt)
    assert len(opt._optimizer_step_pre_hooks) == 1
    w0 = net[0].weight.detach().clone()
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    opt.zero_grad()
    net(x).pow(2).mean().backward()
    opt.step()
    assert net[0].weight.grad is not None and torch.equal(net[0].weight.detach(), w0)


def _resumed(sit_out: bool, carry_state: bool | None):
    """Two hard steps, a checkpoint (weights, optimiser, and with ``carry_state`` the freeze's
    decisions), a shared channel of net[0] turned task-specific, two more steps: in one process
    (``carry_state`` None) or in fresh objects that load the checkpoint (a resumed fit)."""
    def make():
        if sit_out:
            net, opt = _all_shared_then_hard("sgd")
        else:  # half of net[0] shared: the copy (lr as in _all_shared_then_hard)
            net, _ = setup("hard", train_masks=False)
            opt = torch.optim.SGD(net.parameters(), lr=1e-5, momentum=0.9, weight_decay=0.1)
        return net, opt, SharedChannelFreeze(net).attach(opt)

    net, opt, freeze = make()
    steps(net, opt, 2)
    if carry_state is not None:
        saved = (net.state_dict(), opt.state_dict(), freeze.state_dict(opt))
        net, opt, freeze = make()
        net.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
        if carry_state:
            freeze.load_state_dict(opt, saved[2])
    with torch.no_grad():
        net[0].mask_logits[0] = 3.0  # shared until now
    steps(net, opt, 2)
    return net.state_dict()


@pytest.mark.parametrize("sit_out", [False, True])
def test_a_resumed_fit_zeroes_the_momentum_of_a_channel_that_flips_at_the_checkpoint(sit_out):
    """The freeze's decisions of the last step go with the checkpoint: a channel that turns
    task-specific at the first step after it starts without stale momentum, as it does in the
    fit that was not interrupted; without them the weights differ."""
    whole = _resumed(sit_out, None)
    resumed = _resumed(sit_out, True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert torch.isfinite(whole["0.weight"]).all()
    forgot = _resumed(sit_out, False)
    assert not torch.equal(whole["0.weight"], forgot["0.weight"])


def test_freeze_state_names_its_parameters_and_is_checked_whole():
    net, opt = setup("hard", train_masks=False)
    freeze = SharedChannelFreeze(net).attach(opt)
    assert freeze.state_dict(opt) == {}  # no step yet
    steps(net, opt, 1)
    state = freeze.state_dict(opt)
    assert sorted(state) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    expected = ~(torch.sigmoid(net[0].mask_logits.detach()) >= 0.5)
    assert torch.equal(state["0.weight"], expected) and state["0.weight"].dtype == torch.bool
    other = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not attached"):
        freeze.state_dict(other)
    fresh_net, fresh_opt = setup("hard", train_masks=False)
    fresh = SharedChannelFreeze(fresh_net).attach(fresh_opt)
    with pytest.raises(ValueError, match=r"\['9.weight'\]"):
        fresh.load_state_dict(fresh_opt, {**state, "9.weight": state["0.weight"]})
    with pytest.raises(ValueError, match=r"'3.weight'.*shape \(5,\).*torch.float32"):
        fresh.load_state_dict(fresh_opt, {**state, "3.weight": torch.zeros(5)})
    assert fresh._steps[fresh_opt].last == {}  # nothing set by a refused state
    fresh.load_state_dict(fresh_opt, state)
    assert fresh.state_dict(fresh_opt).keys() == state.keys()


def test_shared_bias_rows_stand_still_when_only_the_bias_trains():
    """A layer whose child kernel is frozen and whose bias trains: the shared channels' bias
    rows are held too (the layer is not skipped for its frozen weight)."""
    net, opt = setup("hard", train_masks=False)  # decisions fixed
    for layer in (net[0], net[3]):
        layer.weight.requires_grad_(False)
    shared = {id(layer): ~layer.task_specific() for layer in (net[0], net[3])}
    before = {id(layer): layer.bias.detach().clone() for layer in (net[0], net[3])}
    SharedChannelFreeze(net).attach(opt)
    steps(net, opt)
    for layer in (net[0], net[3]):
        rows, old = shared[id(layer)], before[id(layer)]
        assert rows.any() and torch.equal(layer.bias.detach()[rows], old[rows])
        assert not torch.equal(layer.bias.detach()[~rows], old[~rows])


def test_each_layer_is_frozen_at_its_own_threshold():
    net, opt = setup("hard", train_masks=False)
    net[3].threshold = 0.8  # layers of two thresholds: decided layer by layer
    SharedChannelFreeze(net).attach(opt)
    shared = ~net[3].task_specific()
    assert shared.tolist() == [True, True, True, True, False]  # sigmoid .12 .27 .5 .73 .88
    w0 = net[3].weight.detach().clone()
    steps(net, opt)
    moved = (net[3].weight.detach() != w0).any(1)
    assert not moved[shared].any() and moved[~shared].all()


def test_optimiser_state_not_shaped_like_the_weight_is_left_alone():
    """Adafactor keeps a Linear's second moments factored (a [C, 1] row and a [1, K] column
    factor): no per-channel rows to zero, and a channel turning task-specific again must not
    index them as if they had."""
    net, _ = setup("hard")
    opt = torch.optim.Adafactor(net.parameters(), lr=0.01)
    SharedChannelFreeze(net).attach(opt)
    steps(net, opt, 1)
    with torch.no_grad():
        net[3].mask_logits[0] = 3.0  # shared at the last step, task-specific now
    steps(net, opt, 1)
    assert net[3].task_specific()[0]
