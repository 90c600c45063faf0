"""Compose at the optimiser step (cwps/step_compose.py): the same training as the forward
compose with SGD and the shared-channel freeze, and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from cwps_lightning.cwps import cwps_layers, inject_cwps, merge_cwps, set_stage
from cwps_lightning.cwps.freeze import SharedChannelFreeze
from cwps_lightning.cwps.step_compose import (
    StepComposeSGD,
    release_composed,
    use_forward_compose,
    use_step_compose,
)


def make_net(channels_last: bool = False, seed: int = 1) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.ReLU(),
        nn.Conv2d(16, 16, 3),  # 1x1 output on a 3x3 input: the window path of the forward mode
        nn.Flatten(), nn.Linear(16, 12), nn.Linear(12, 5))
    inject_cwps(net)  # every layer but the head (8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in cwps_layers(net):
            w = layer.weight
            layer.set_parent(w + 0.1 * torch.randn(w.shape, generator=g),
                             None if layer.bias is None else layer.bias + 0.1)
            layer.mask_logits.copy_(2 * torch.randn(layer.mask_logits.shape, generator=g))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def groups(net: nn.Module, mask_lr: float) -> list[dict]:
    masks = [layer.mask_logits for _, layer in cwps_layers(net)]
    ids = {id(p) for p in masks}
    return [{"params": [p for p in net.parameters() if id(p) not in ids]},
            {"params": masks, "lr": mask_lr, "weight_decay": 0.0}]


HYPER = dict(lr=0.05, momentum=0.9, weight_decay=5e-3)


def pair(mask_lr: float = 200.0, channels_last: bool = False, compiled: bool = False,
         momentum: float = 0.9):
    """The same model twice: forward compose with torch's SGD and the freeze, and step
    compose with StepComposeSGD."""
    a = make_net(channels_last)
    b = copy.deepcopy(a)
    use_step_compose(b)
    hyper = {**HYPER, "momentum": momentum}
    opt_a = torch.optim.SGD(groups(a, mask_lr), **hyper)
    SharedChannelFreeze(a).attach(opt_a)
    opt_b = StepComposeSGD(groups(b, mask_lr), **hyper, model=b, compiled=compiled)
    return a, opt_a, b, opt_b


def batch(n: int = 6, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def train(net, opt, stages, x, y, penalty: float = 0.0):
    losses = []
    for stage in stages:
        set_stage(net, stage)
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        if penalty:
            loss = loss + penalty * sum(layer.mask_logits.sigmoid().sum()
                                        for _, layer in cwps_layers(net))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def decisions(net) -> list[list[bool]]:
    return [layer.task_specific().tolist() for _, layer in cwps_layers(net)]


def assert_same_params(a, b, atol=1e-6):
    """To rounding: the score gradient sums its products in another order (the mask
    learning rate of 200 makes the scores' differences the largest: up to 6e-5 on scores of
    11, channels_last, after 12 steps), so the scores compare relative to their size."""
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        tol = atol * max(1.0, 100 * float(pa.abs().max())) if name.endswith("mask_logits") \
            else atol
        torch.testing.assert_close(pb, pa, atol=tol, rtol=1e-5, msg=name)


STAGES = ["soft"] * 4 + ["hard"] * 8


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_trains_as_the_forward_compose_with_the_freeze(channels_last, momentum):
    a, opt_a, b, opt_b = pair(channels_last=channels_last, momentum=momentum)
    x, y = batch()
    seen = []
    for stage in STAGES:
        la = train(a, opt_a, [stage], x, y)
        lb = train(b, opt_b, [stage], x, y)
        assert lb == pytest.approx(la, rel=1e-5)
        assert_same_params(a, b)
        seen.append(decisions(a))
        assert decisions(b) == seen[-1]
    # the mask learning rate moves decisions in the hard stage: channels turn shared and back
    assert len({str(d) for d in seen[4:]}) > 2


def test_shared_channels_stand_still_in_the_hard_stage():
    _, _, b, opt_b = pair(mask_lr=0.0)  # decisions fixed
    x, y = batch()
    set_stage(b, "hard")
    before = {id(layer): layer.weight.detach().clone() for _, layer in cwps_layers(b)}
    train(b, opt_b, ["hard"] * 3, x, y)
    moved = 0
    for _, layer in cwps_layers(b):
        shared = ~layer.task_specific()
        old, new = before[id(layer)], layer.weight.detach()
        assert torch.equal(new[shared], old[shared])
        moved += int((new[~shared] != old[~shared]).any())
        # the composed weight is the merge's: the parent on shared channels
        torch.testing.assert_close(layer.composed_weight, layer.merged_weights()[0])
    assert moved


def test_gradient_on_the_scores_is_added():
    """A loss term on the scores themselves (a penalty) reaches them as in the forward mode."""
    a, opt_a, b, opt_b = pair()
    x, y = batch()
    for stage in ("soft", "soft", "hard"):
        train(a, opt_a, [stage], x, y, penalty=0.01)
        train(b, opt_b, [stage], x, y, penalty=0.01)
        assert_same_params(a, b)


def test_zero_grad_between_forward_and_backward_and_accumulation():
    """Lightning zeroes after the forward, before the backward; two backwards before a step
    sum, as for any parameter; a layer run twice gets the sum of both uses."""
    a, opt_a, b, opt_b = pair()
    x, y = batch()
    x2, y2 = batch(seed=3)
    for net, opt in ((a, opt_a), (b, opt_b)):
        set_stage(net, "soft")
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        F.cross_entropy(net(x2), y2).backward()
        opt.step()
    assert_same_params(a, b)
    # a discarded backward: zero_grad after it drops its gradient
    for net, opt in ((a, opt_a), (b, opt_b)):
        F.cross_entropy(net(x), y).backward()
        opt.zero_grad()
        F.cross_entropy(net(x2), y2).backward()
        opt.step()
    assert_same_params(a, b)


def test_a_layer_run_twice_sums_its_gradients():
    torch.manual_seed(0)
    nets = []
    for _ in range(2):
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
        inject_cwps(net, exclude=["1"])
        with torch.no_grad():
            net[0].set_parent(net[0].weight + 0.3, net[0].bias - 0.2)
            net[0].mask_logits.copy_(torch.tensor([-1.0, 0.5, 2.0, 0.0]))
        nets.append(net)
    nets[1].load_state_dict(nets[0].state_dict())
    use_step_compose(nets[1])
    opts = [torch.optim.SGD(nets[0].parameters(), **HYPER),
            StepComposeSGD(nets[1].parameters(), **HYPER, model=nets[1])]
    x = torch.randn(5, 4)
    for net, opt in zip(nets, opts, strict=True):
        set_stage(net, "soft")
        opt.zero_grad()
        net[1](net[0](net[0](x))).square().mean().backward()
        opt.step()
    assert_same_params(nets[0], nets[1])


def test_optimizer_state_round_trip():
    """A step-compose fit resumed from its state dicts continues as the uninterrupted one."""
    _, _, b, opt_b = pair()
    x, y = batch()
    train(b, opt_b, ["soft", "soft", "hard"], x, y)
    model_state = copy.deepcopy(b.state_dict())
    opt_state = copy.deepcopy(opt_b.state_dict())
    assert not any("composed" in k for k in model_state)
    train(b, opt_b, ["hard"] * 3, x, y)

    c = make_net()
    use_step_compose(c)
    c.load_state_dict(model_state)
    opt_c = StepComposeSGD(groups(c, 200.0), **HYPER, model=c)
    opt_c.load_state_dict(opt_state)
    assert len(opt_c.state) == len(opt_b.state)
    train(c, opt_c, ["hard"] * 3, x, y)
    assert_same_params(b, c, atol=0)


def test_composed_weight_follows_every_change():
    """Stage, threshold, parent, an in-place edit, a device/format move: the next forward
    composes again; the forward output is the forward mode's."""
    a = make_net()
    b = copy.deepcopy(a)
    use_step_compose(b)
    x, _ = batch()

    def same():
        with torch.no_grad():
            torch.testing.assert_close(b(x), a(x), atol=1e-6, rtol=1e-5)

    for stage in ("soft", "hard"):
        set_stage(a, stage)
        set_stage(b, stage)
        same()
    for net in (a, b):
        net[0].threshold = 0.2
        with torch.no_grad():
            net[3].weight.mul_(1.5)
        net[5].set_parent(torch.zeros_like(net[5].weight), torch.ones_like(net[5].bias))
    same()
    a, b = (net.to(memory_format=torch.channels_last) for net in (a, b))
    same()


def test_merge_after_step_compose_training():
    _, _, b, opt_b = pair()
    x, y = batch()
    train(b, opt_b, ["soft", "hard", "hard"], x, y)
    b.eval()
    with torch.no_grad():
        before = b(x)
        merged = merge_cwps(copy.deepcopy(b))
        torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=1e-5)


def test_forward_compose_again_and_release():
    a = make_net()
    b = copy.deepcopy(a)
    assert use_step_compose(b) == 4
    assert use_step_compose(b) == 4  # twice: no-op
    set_stage(b, "soft")
    x, _ = batch()
    b(x)
    assert all(layer.composed_weight is not None for _, layer in cwps_layers(b))
    assert release_composed(b) == 4
    assert all(layer.composed_weight is None for _, layer in cwps_layers(b))
    opt = StepComposeSGD(b.parameters(), **HYPER, model=b)
    assert use_forward_compose(b) == 4
    with pytest.raises(RuntimeError, match="composes in the forward again"):
        opt.step()
    assert all(layer.compose == "forward" and "composed_weight" not in layer._buffers
               for _, layer in cwps_layers(b))
    set_stage(a, "soft")
    torch.testing.assert_close(b(x), a(x))


@pytest.mark.slow
def test_compiled_step_trains_as_the_eager_one():
    torch.compiler.reset()
    _, _, b, opt_b = pair(channels_last=True)
    _, _, c, opt_c = pair(channels_last=True, compiled=True)
    x, y = batch()
    set_stage(c, "soft")
    opt_c.precompile()
    assert_same_params(b, c, atol=0)  # the dry run moves nothing
    assert not opt_c.state
    for stage in STAGES[:6]:
        train(b, opt_b, [stage], x, y)
        train(c, opt_c, [stage], x, y)
        assert_same_params(b, c, atol=1e-5)



@pytest.mark.slow
def test_an_lr_schedule_steps_in_one_compiled_graph():
    """A scheduler moves the lr every step and takes both groups to 0 (the job's schedule
    ends there): the step keeps one lr tensor per group, written in place (a fresh one per
    step would wait for the GPU, a shared one at lr 0 recompiled the step), and steps the
    scheduled lrs as torch's SGD does."""
    torch.compiler.reset()
    counters.clear()
    a, opt_a, b, opt_b = pair(mask_lr=2.0, compiled=True)
    def fraction(t):  # steps 0-5 at 1, 0.75, 0.5, 0.25, 0, 0: lr 0 in the middle of a stage
        return max(0.0, 1.0 - t / 4)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, fraction)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, fraction)
    x, y = batch()
    for stage in ["soft"] * 2 + ["hard"] * 4:
        train(a, opt_a, [stage], x, y)
        train(b, opt_b, [stage], x, y)
        sched_a.step()
        sched_b.step()
        assert_same_params(a, b, atol=1e-5)
    assert [g["lr"] for g in opt_b.param_groups] == [0.0, 0.0]
    # soft and hard each compile once (the stage is a constant of the graph)
    assert counters["stats"]["unique_graphs"] == 2


def test_a_one_by_one_kernel_with_a_gradient_in_another_layout():
    """Autograd keeps a gradient whose strides differ from its tensor's only where the size is
    1 (a 1x1 kernel of an NCHW model fed channels_last inputs can get strides (K, 1, K, K)
    against the kernel's (K, 1, 1, 1), as the convolution backend makes it). The step takes
    such a gradient (it refused it once) and trains as the forward mode does."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(),
                      nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    inject_cwps(a, exclude=[])
    with torch.no_grad():
        for _, layer in cwps_layers(a):
            layer.set_parent(layer.weight + 0.1, None if layer.bias is None else layer.bias + 0.1)
            layer.mask_logits.normal_(0.0, 2.0)
    b = copy.deepcopy(a)
    use_step_compose(b)
    opt_a = torch.optim.SGD(groups(a, 2.0), **HYPER)
    SharedChannelFreeze(a).attach(opt_a)
    opt_b = StepComposeSGD(groups(b, 2.0), **HYPER, model=b, compiled=False)
    x, y = batch()
    x = x.contiguous(memory_format=torch.channels_last)
    for stage in ["soft", "soft", "hard", "hard"]:
        for net, opt in ((a, opt_a), (b, opt_b)):
            set_stage(net, stage)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
        for kernel in (b[2], b[4]):  # channels_last strides, whatever the backend made
            leaf = kernel.__dict__["_step_leaves"][0]
            k = leaf.shape[1]
            leaf.grad = torch.empty_strided(leaf.shape, (k, 1, k, k)).copy_(leaf.grad)
            assert leaf.stride() == (k, 1, 1, 1)
        opt_a.step()
        opt_b.step()
        assert_same_params(a, b)


def test_a_compiler_that_fails_is_named_with_the_ways_around_it():
    """No working C++ compiler for inductor: the first step says what failed and what to do,
    and has written nothing (the compile comes before the step)."""
    import torch._inductor.config as inductor

    torch.compiler.reset()
    _, _, b, opt_b = pair(compiled=True)
    x, y = batch()
    set_stage(b, "soft")
    before = [p.detach().clone() for p in b.parameters()]
    F.cross_entropy(b(x), y).backward()
    # (no cached graph either: one needs no compiler)
    with inductor.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}), \
            pytest.raises(RuntimeError, match=r"could not compile the optimiser step "
                          r"\(InvalidCxxCompiler: No working C\+\+ compiler.*\); pass "
                          r"compiled=False .*cwps\.compose=forward"):
        opt_b.step()
    for p, old in zip(b.parameters(), before, strict=True):
        assert torch.equal(p, old)
    torch.compiler.reset()

# -- refusals -----------------------------------------------------------------------------------
def test_refusals():
    a = make_net()
    with pytest.raises(ValueError, match="use_step_compose"):
        StepComposeSGD(a.parameters(), lr=0.1, model=a)
    with pytest.raises(ValueError, match="train none of the model's CWPS layers"):
        StepComposeSGD(a[8].parameters(), lr=0.1, model=a)
    use_step_compose(a)
    with pytest.raises(ValueError, match="nesterov"):
        StepComposeSGD([{"params": list(a.parameters()), "nesterov": True}], lr=0.1, model=a)
    with pytest.raises(ValueError, match="momentum must be >= 0"):
        StepComposeSGD(a.parameters(), lr=0.1, momentum=-1.0, model=a)


def test_a_stage_switch_inside_an_accumulation_folds_the_gradient():
    """soft backward, hard backward, one step (Lightning's accumulate_grad_batches with the
    switch inside the window): the soft gradient goes to the child and the scores under the
    soft mask, as the forward compose sums the two; release_composed folds likewise."""
    a, opt_a, b, opt_b = pair()
    x, y = batch()
    x2, y2 = batch(seed=3)
    for net, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        set_stage(net, "soft")
        F.cross_entropy(net(x), y).backward()
        set_stage(net, "hard")
        F.cross_entropy(net(x2), y2).backward()
        opt.step()
    assert_same_params(a, b)
    for net, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if net is b:
            assert release_composed(b) == 4  # the pending gradient: the children's now
            assert all(layer.weight.grad is not None for _, layer in cwps_layers(b))
        opt.step()
    assert_same_params(a, b)


def test_a_layer_that_did_not_run_is_stepped_as_torch_steps_it():
    """A layer the forward skipped: with a gradient of its own on the scores (a penalty) it is
    stepped (held in the hard stage) and composed again; after zero_grad(set_to_none=False)
    its zero gradient is stepped too (weight decay, momentum), as torch's SGD does."""
    for set_to_none in (True, False):
        a, opt_a, b, opt_b = pair(mask_lr=20.0)
        x, y = batch()
        for step in range(4):
            for net, opt in ((a, opt_a), (b, opt_b)):
                set_stage(net, "soft" if step < 2 else "hard")
                opt.zero_grad(set_to_none=set_to_none)
                if step % 2 == 0:
                    loss = F.cross_entropy(net(x), y)
                else:  # net[7] (a CWPS Linear) takes no part; a penalty on its scores
                    h = net[:7](x)
                    with torch.no_grad():
                        h = net[7](h)
                    loss = net[8](h).square().mean() + net[7].mask_logits.sigmoid().sum()
                loss.backward()
                opt.step()
            assert_same_params(a, b)
        with torch.no_grad():  # the skipped layer's kept weight is the stepped one
            torch.testing.assert_close(b(x), a(x), atol=1e-5, rtol=1e-5)


def test_first_forward_under_inference_mode():
    """An evaluation first (trainer.test before a fit, or after release_composed) composes
    into an ordinary tensor, so the versions the next forwards compare are there."""
    a = make_net()
    b = copy.deepcopy(a)
    use_step_compose(b)
    set_stage(a, "hard")
    set_stage(b, "hard")
    x, _ = batch()
    for _ in range(2):
        with torch.inference_mode():
            out = b(x)
        torch.testing.assert_close(out, a(x).detach())
        assert not b[0].composed_weight.is_inference()
        release_composed(b)


def test_a_momentum_buffer_of_another_layout_is_taken_in_the_childs():
    """model.to(channels_last) after some steps: the buffers made before follow the children's
    new layout (rows read alike), as torch's SGD applies them element by element."""
    a, opt_a, b, opt_b = pair()
    x, y = batch()
    train(a, opt_a, ["soft", "soft"], x, y)
    train(b, opt_b, ["soft", "soft"], x, y)
    a.to(memory_format=torch.channels_last)
    b.to(memory_format=torch.channels_last)
    train(a, opt_a, ["soft", "hard", "hard"], x, y)
    train(b, opt_b, ["soft", "hard", "hard"], x, y)
    assert_same_params(a, b)


def test_under_torch_compile_and_refuses_transformed_layers():
    """Under torch.compile each step-compose layer runs eagerly (a graph break: the leaf its
    gradient goes to) and trains the same; fullgraph refuses; jit.trace is refused."""
    a, _, b, opt_b = pair()
    c = copy.deepcopy(b)
    opt_c = StepComposeSGD(groups(c, 200.0), **HYPER, model=c)
    x, y = batch()
    train(b, opt_b, ["soft", "hard"], x, y)
    torch.compiler.reset()
    compiled = torch.compile(c, backend="eager")
    for stage in ("soft", "hard"):
        set_stage(c, stage)
        opt_c.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt_c.step()
    assert_same_params(b, c)
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.trace(c, x)

    class Other(type(a[0])):
        pass

    a = make_net()
    a[0].__class__ = Other
    with pytest.raises(ValueError, match="only CWPSConv2d and CWPSLinear"):
        use_step_compose(nn.Sequential(a[0]))


def test_refuses_ddp(monkeypatch):
    a = make_net()
    use_step_compose(a)
    opt = StepComposeSGD(a.parameters(), **HYPER, model=a)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="pass process_group"):
        opt.step()


def test_a_pending_gradient_is_refused_against_other_weights():
    """An edit of the scores, the child or the parent between a backward and the step would
    fold the composed weight's gradient against weights it was not taken under: refused (a
    stage or threshold change folds: the accumulation test above)."""
    x, y = batch()
    for edit in (lambda layer: layer.mask_logits.add_(1.0),
                 lambda layer: layer.weight.mul_(1.5),
                 lambda layer: layer.set_parent(torch.zeros_like(layer.parent_weight),
                                                torch.zeros_like(layer.parent_bias))):
        a = make_net()
        use_step_compose(a)
        opt = StepComposeSGD(a.parameters(), **HYPER, model=a)
        set_stage(a, "soft")
        F.cross_entropy(a(x), y).backward()
        with torch.no_grad():
            edit(a[0])
        with pytest.raises(RuntimeError, match="changed between a backward and the optimiser"):
            opt.step()


def soft_backward_then(between) -> None:
    """A soft backward, then ``between(net, x, y)`` before the step, in both modes; the same
    weights after it."""
    a, opt_a, b, opt_b = pair()
    x, y = batch()
    for net, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        set_stage(net, "soft")
        F.cross_entropy(net(x), y).backward()
        between(net, x, y)
        opt.step()
    assert_same_params(a, b)


def test_a_fold_under_inference_mode_makes_ordinary_gradients():
    def evaluate_then_hard_backward(net, x, y):
        set_stage(net, "hard")
        with torch.inference_mode():
            net(x)  # (an evaluation: the step mode folds its pending soft gradient here)
        assert not any(p.grad is not None and p.grad.is_inference() for p in net.parameters())
        F.cross_entropy(net(x), y).backward()  # adds to the folded gradients

    soft_backward_then(evaluate_then_hard_backward)


def test_a_switch_to_finetune_before_the_step_keeps_the_gradient():
    """The soft gradient is the child's and the scores', stepped by the inner SGD, as in the
    forward mode."""
    soft_backward_then(lambda net, x, y: set_stage(net, "finetune"))


def test_zero_gradients_kept_step_only_what_was_stepped_before():
    """zero_grad(set_to_none=False): torch's SGD steps a zero gradient only for a tensor that
    had one. A layer that never ran, stepped once through a penalty on its scores, keeps its
    child where it was."""
    a, opt_a, b, opt_b = pair()
    x, y = batch()
    for net, opt in ((a, opt_a), (b, opt_b)):
        set_stage(net, "soft")
        for _ in range(3):
            opt.zero_grad(set_to_none=False)
            h = net[:7](x)
            with torch.no_grad():
                h = net[7](h)  # never part of the graph
            (net[8](h).square().mean() + net[7].mask_logits.sigmoid().sum()).backward()
            opt.step()
    assert_same_params(a, b)
    assert torch.equal(b[7].weight, make_net()[7].weight)  # the child never stepped


def same_training(sequence, a=None, opt_a=None, b=None, opt_b=None) -> None:
    """``sequence(net, opt)`` in both modes, then the same weights."""
    if a is None:
        a, opt_a, b, opt_b = pair()
    for net, opt in ((a, opt_a), (b, opt_b)):
        sequence(net, opt)
    assert_same_params(a, b)


X, Y = batch()
X2, Y2 = batch(seed=3)


def switch_between_two_forwards(net, opt) -> None:
    """A soft forward, the switch to hard, a hard forward, one backward of both, a step."""
    opt.zero_grad()
    set_stage(net, "soft")
    first = F.cross_entropy(net(X), Y)
    set_stage(net, "hard")
    (first + F.cross_entropy(net(X2), Y2)).backward()
    opt.step()


def test_two_forwards_with_a_stage_switch_between_and_one_backward():
    """soft forward, switch, hard forward, one backward of both: the switch composes into new
    memory, so the first forward's graph keeps the weight it ran on, and its gradient goes to
    the child and the scores under the soft mask as it arrives, as the forward mode sums the
    two."""
    def sequence(net, opt):
        for _ in range(2):
            switch_between_two_forwards(net, opt)
        train(net, opt, ["hard"] * 2, X, Y)

    same_training(sequence)


def test_a_pending_backward_after_an_accumulated_one_or_kept_zeros():
    """The leaves already hold a gradient (or kept zeros) when the switch comes and another
    forward on them still waits for its backward: both parts are taken."""
    def accumulated(net, opt):
        opt.zero_grad()
        set_stage(net, "soft")
        F.cross_entropy(net(X), Y).backward()
        pending = F.cross_entropy(net(X2), Y2)
        set_stage(net, "hard")
        (pending + F.cross_entropy(net(X), Y)).backward()
        opt.step()

    def kept_zeros(net, opt):
        set_stage(net, "soft")
        F.cross_entropy(net(X), Y).backward()
        opt.step()
        F.cross_entropy(net(X), Y).backward()
        opt.zero_grad(set_to_none=False)
        pending = F.cross_entropy(net(X), Y)
        set_stage(net, "hard")
        (pending + F.cross_entropy(net(X2), Y2)).backward()
        opt.step()

    same_training(accumulated)
    same_training(kept_zeros)


def test_a_forward_whose_weight_was_let_go_takes_two_backwards():
    """Two soft forwards, switch, a hard one, backward of the first with the hard one, back
    to soft, another forward, backward of the second with it: every part arrives."""
    def sequence(net, opt):
        opt.zero_grad()
        set_stage(net, "soft")
        first, second = F.cross_entropy(net(X), Y), F.cross_entropy(net(X2), Y2)
        set_stage(net, "hard")
        (first + F.cross_entropy(net(X), Y)).backward()
        set_stage(net, "soft")
        (second + F.cross_entropy(net(X2), Y2)).backward()
        opt.step()

    same_training(sequence)


def test_a_layer_with_nothing_to_train_keeps_the_weight_its_graph_ran_on():
    """A frozen CWPS layer runs on its composed weight itself (no leaf): the switch must not
    write it in place under a graph that needs it for the input's gradient."""
    a, opt_a, b, opt_b = pair()
    for net in (a, b):
        for p in (net[3].weight, net[3].mask_logits):
            p.requires_grad_(False)

    same_training(switch_between_two_forwards, a, opt_a, b, opt_b)


def test_release_or_forward_compose_between_a_forward_and_its_backward():
    """The gradient of a backward that comes after release_composed / use_forward_compose
    still reaches the children and the scores, as in the forward mode."""
    for let_go in (release_composed, use_forward_compose):
        a, opt_a, b, opt_b = pair()
        for net in (a, b):
            set_stage(net, "soft")
            first = F.cross_entropy(net(X), Y)
            set_stage(net, "hard")
            second = F.cross_entropy(net(X2), Y2)
            if net is b:
                let_go(b)
            (first + second).backward()
        for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            assert (pa.grad is None) == (pb.grad is None), name
            if pa.grad is not None:
                torch.testing.assert_close(pb.grad, pa.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_dropped_forward_frees_its_composed_weight():
    """A forward whose loss is dropped keeps nothing alive past a switch: the old composed
    weights go with the graph (nothing piles up until the step)."""
    import gc
    import weakref

    _, _, b, opt_b = pair()
    set_stage(b, "soft")
    b(X)
    old = [weakref.ref(layer.composed_weight) for _, layer in cwps_layers(b)]
    for stage in ["hard", "soft"] * 3:
        set_stage(b, stage)
        b(X)
    gc.collect()
    assert all(ref() is None for ref in old)


def test_zero_grad_to_none_then_kept_zeros_steps_nothing():
    """After zero_grad(set_to_none=True), zero_grad(set_to_none=False) keeps no zeros (there
    is no gradient to zero): torch's SGD steps nothing, nor does this one."""
    def sequence(net, opt):
        set_stage(net, "soft")
        opt.zero_grad()
        F.cross_entropy(net(X), Y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=False)
        opt.step()

    same_training(sequence)


def test_a_change_of_the_child_between_a_forward_and_its_backward_is_refused():
    a = make_net()
    use_step_compose(a)
    StepComposeSGD(a.parameters(), **HYPER, model=a)
    set_stage(a, "soft")
    first = F.cross_entropy(a(X), Y)
    set_stage(a, "hard")
    second = F.cross_entropy(a(X), Y)
    with torch.no_grad():
        a[0].weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="changed between a forward and its backward"):
        (first + second).backward()


def test_a_backward_after_the_step_of_its_forward_is_refused():
    """A forward recorded before an optimiser step, its backward after it: the forward mode
    fails (autograd's in-place check); so does the step mode, by name, where autograd saw no
    weight to check (a linear layer whose input needs no gradient) and the gradient would
    have been lost."""
    a, opt_a, b, opt_b = pair()
    for net, opt, error in ((a, opt_a, "modified by an inplace operation"),
                            (b, opt_b, "forward recorded before the optimiser step")):
        set_stage(net, "soft")
        pending = net[7](X.reshape(6, -1)[:, :16]).sum()  # saves no weight
        F.cross_entropy(net(X2), Y2).backward()
        opt.step()
        opt.zero_grad()
        with pytest.raises(RuntimeError, match=error):
            pending.backward()


def test_scores_train_with_the_children_frozen():
    """Children frozen, scores trained (a fit of the masks alone): the composed weight's
    gradient still reaches the scores, which train as in the forward mode."""
    a, opt_a, b, opt_b = pair()
    for net in (a, b):
        for _, layer in cwps_layers(net):
            for p in (layer.weight, layer.bias):
                if p is not None:
                    p.requires_grad_(False)
    start = [layer.mask_logits.detach().clone() for _, layer in cwps_layers(b)]
    same_training(lambda net, opt: train(net, opt, ["soft", "soft", "hard"], X, Y),
                  a, opt_a, b, opt_b)
    for (_, layer), s0 in zip(cwps_layers(b), start, strict=True):
        assert not torch.equal(layer.mask_logits.detach(), s0)


def test_a_copy_made_between_a_backward_and_the_step():
    """deepcopy of the model with a gradient pending on its composed weights: the copy
    computes as the original and carries none of that gradient; the original steps as if no
    copy had been made."""
    a, opt_a, b, opt_b = pair()
    for net, opt in ((a, opt_a), (b, opt_b)):
        set_stage(net, "soft")
        opt.zero_grad()
        F.cross_entropy(net(X), Y).backward()
    c = copy.deepcopy(b)
    with torch.no_grad():
        torch.testing.assert_close(c(X), b(X))
    assert all(layer.weight.grad is None and layer.mask_logits.grad is None
               for _, layer in cwps_layers(c))
    opt_a.step()
    opt_b.step()
    assert_same_params(a, b)


@pytest.mark.parametrize("bad", [dict(dampening=0.1), dict(maximize=True)])
def test_refuses_group_settings_it_does_not_step(bad):
    a = make_net()
    use_step_compose(a)
    with pytest.raises(ValueError, match=next(iter(bad))):
        StepComposeSGD([{"params": list(a.parameters()), **bad}], lr=0.1, model=a)


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay"])
@pytest.mark.parametrize("value", [-0.1, float("nan")])
def test_refuses_a_negative_or_nan_hyperparameter(name, value):
    a = make_net()
    use_step_compose(a)
    with pytest.raises(ValueError, match=f"{name} must be >= 0"):
        StepComposeSGD(a.parameters(), **{**HYPER, name: value}, model=a)


def test_hyperparameters_moved_on_the_groups_reach_every_parameter():
    """A schedule that moves momentum or weight decay on the param groups (OneCycleLR cycles
    the momentum) steps the normalisation layers and the head with the new values as well, as
    torch's SGD does."""
    def sequence(net, opt):
        train(net, opt, ["soft"], X, Y)
        for group in opt.param_groups:
            group["momentum"], group["weight_decay"] = 0.5, 0.05
        train(net, opt, ["soft", "hard"], X, Y)

    same_training(sequence)


def test_a_loaded_state_steps_at_its_own_learning_rates():
    """A state dict saved after a schedule moved the learning rates: the optimiser it is loaded
    into steps every parameter at the loaded rates, as the uninterrupted one does."""
    _, _, b, opt_b = pair()
    train(b, opt_b, ["soft"], X, Y)
    for group in opt_b.param_groups:
        group["lr"] *= 0.1
    model_state = copy.deepcopy(b.state_dict())
    opt_state = copy.deepcopy(opt_b.state_dict())
    train(b, opt_b, ["soft", "hard"], X, Y)

    c = make_net()
    use_step_compose(c)
    c.load_state_dict(model_state)
    opt_c = StepComposeSGD(groups(c, 200.0), **HYPER, model=c)
    opt_c.load_state_dict(opt_state)
    train(c, opt_c, ["soft", "hard"], X, Y)
    assert_same_params(b, c, atol=0)


def test_a_gradient_of_its_own_stays_after_the_step():
    """As torch's SGD leaves it, a tensor's own gradient (a penalty on the scores of a layer
    that did not run) is still on it after the step, for whatever reads it before zero_grad."""
    a, opt_a, b, opt_b = pair()
    for net, opt in ((a, opt_a), (b, opt_b)):
        set_stage(net, "soft")
        opt.zero_grad()
        h = net[:7](X)
        with torch.no_grad():
            h = net[7](h)
        (net[8](h).square().mean() + net[7].mask_logits.sigmoid().sum()).backward()
        opt.step()
    assert a[7].mask_logits.grad is not None
    torch.testing.assert_close(b[7].mask_logits.grad, a[7].mask_logits.grad)


def test_identity_mask_gradient_trains_as_the_forward_compose():
    """mask_grad="identity" (the hard stage's dL/ds = dL/dm): the step takes it as the forward
    compose's backward does."""
    a, opt_a, b, opt_b = pair(mask_lr=2.0)
    for net in (a, b):
        for _, layer in cwps_layers(net):
            layer.mask_grad = "identity"
    same_training(lambda net, opt: train(net, opt, ["soft", "hard", "hard", "hard"], X, Y),
                  a, opt_a, b, opt_b)


def test_each_group_steps_with_its_own_momentum():
    """A group's own momentum (the optimiser's default none) steps the children it holds with
    momentum, as torch's SGD does."""
    a = make_net()
    b = copy.deepcopy(a)
    use_step_compose(b)
    hyper = {**HYPER, "momentum": 0.0}

    def grouped(net):
        g = groups(net, 20.0)
        g[0]["momentum"] = 0.9
        return g

    opt_a = torch.optim.SGD(grouped(a), **hyper)
    SharedChannelFreeze(a).attach(opt_a)
    opt_b = StepComposeSGD(grouped(b), **hyper, model=b, compiled=False)
    same_training(lambda net, opt: train(net, opt, ["soft", "soft", "hard", "hard"], X, Y),
                  a, opt_a, b, opt_b)


def test_a_closure_step_trains_as_a_plain_step_and_returns_its_loss():
    """Lightning steps with a closure that runs the forward and the backward (the step itself
    runs without gradients): it trains as a plain step and returns the closure's loss, as
    torch's SGD does."""
    a, opt_a, b, opt_b = pair()
    losses = []
    for net, opt in ((a, opt_a), (b, opt_b)):
        for stage in ("soft", "hard"):
            set_stage(net, stage)

            def closure(net=net, opt=opt):
                opt.zero_grad()
                loss = F.cross_entropy(net(X), Y)
                loss.backward()
                return loss

            losses.append(opt.step(closure))
    assert all(isinstance(loss, torch.Tensor) for loss in losses)
    assert [loss.item() for loss in losses[2:]] == pytest.approx(
        [loss.item() for loss in losses[:2]], rel=1e-5)
    assert_same_params(a, b)


def test_finetune_stage_gradients_are_on_the_parameters_after_the_backward():
    """In the finetune stage a step-compose layer is the plain layer: the backward leaves
    every gradient on the parameters themselves (where a clip or a log reads it before the
    step), as in the forward mode, and the scores get none."""
    a = make_net()
    b = copy.deepcopy(a)
    use_step_compose(b)
    for net in (a, b):
        set_stage(net, "finetune")
        F.cross_entropy(net(X), Y).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, msg=name)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1),
                                  lambda ps: torch.optim.Adam(ps, lr=0.01)],
                         ids=["SGD", "Adam"])
def test_another_optimiser_over_a_step_compose_layer_is_refused(make):
    """Its children and scores get no gradient (it lands on the composed weight): torch's SGD
    and Adam skipped them, and the model trained its head and norms alone without a word."""
    net = make_net()
    use_step_compose(net)
    set_stage(net, "soft")
    x, y = torch.randn(4, 3, 7, 7), torch.randint(0, 5, (4,))
    opt = make(net.parameters())
    F.cross_entropy(net(x), y).backward()
    with pytest.raises(RuntimeError, match=r"steps the child or mask scores of a CWPS layer that "
                                           r"composes at the step .* in the soft stage: .* use "
                                           r"StepComposeSGD\(params, model=model\)"):
        opt.step()
    # what may step them: StepComposeSGD (its inner SGD too), the finetune stage, the forward
    # mode; and any optimiser over the other parameters
    StepComposeSGD(groups(net, 1.0), model=net, compiled=False, **HYPER).step()
    heads = [p for n, p in net.named_parameters() if n.startswith("8.")]
    make(heads).step()
    set_stage(net, "finetune")
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    use_forward_compose(net)
    set_stage(net, "hard")
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()



def test_a_copy_of_a_step_compose_model_pickles_and_keeps_the_refusal():
    """(the guard once rode on the parameters: a weakref there made the model unpicklable,
    and a deepcopy, which leaves a parameter's attributes behind, trained nothing again)"""
    import io
    import pickle

    net = make_net()
    use_step_compose(net)
    x, y = torch.randn(4, 3, 7, 7), torch.randint(0, 5, (4,))
    buffer = io.BytesIO()
    torch.save(net, buffer)
    for copied in (copy.deepcopy(net), pickle.loads(pickle.dumps(net)),
                   torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        set_stage(copied, "soft")
        opt = torch.optim.SGD(copied.parameters(), lr=0.1)
        F.cross_entropy(copied(x), y).backward()
        with pytest.raises(RuntimeError, match="composes at the step"):
            opt.step()
