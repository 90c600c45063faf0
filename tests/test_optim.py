"""Optimiser settings shared by the job and the benchmarks (optim.py)."""

from __future__ import annotations

import pytest
import torch

from cwps_lightning.optim import FusedSGD, fused_sgd_ok, make_sgd


def test_fused_sgd_on_cpu_float_parameters_only():
    assert fused_sgd_ok([[torch.zeros(2)], [torch.zeros(3, dtype=torch.float64)]])
    # torch's choice wherever one parameter is not a CPU float32/64 tensor, or there is none
    assert not fused_sgd_ok([[torch.zeros(2)], [torch.zeros(2, dtype=torch.int64)]])
    assert not fused_sgd_ok([[torch.zeros(2, dtype=torch.bfloat16)]])
    assert not fused_sgd_ok([[torch.zeros(2, device="meta")]])
    assert not fused_sgd_ok([[], []])


def test_the_fused_step_follows_the_loop():
    """Same update rule (momentum, weight decay): equal to float rounding."""
    torch.manual_seed(0)
    weights = [torch.randn(64, 9), torch.randn(10)]
    results = []
    for fused in (False, True):
        params = [w.clone().requires_grad_() for w in weights]
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=fused)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append(params)
    for loop, fused, start in zip(*results, weights, strict=True):
        assert not torch.equal(loop, start)  # they moved
        torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-7)


def test_make_sgd_leaves_torch_its_choice_where_it_does_not_fuse():
    p = [torch.zeros(2, requires_grad=True)]
    assert make_sgd([{"params": p}], lr=0.1, momentum=0.9, weight_decay=0.0).defaults["fused"]
    other = make_sgd([{"params": p}], lr=0.1, momentum=0.9, weight_decay=0.0, fused=False)
    # None, not False: False would turn torch's multi-tensor path (CUDA) off as well
    assert other.defaults["fused"] is None and other.defaults["foreach"] is None


def test_a_parameter_with_its_first_gradient_late_steps_as_in_the_loop():
    """Torch's fused SGD alone fails when one parameter has a momentum buffer and another
    has none yet; make_sgd starts the late one's buffer as the loop would."""
    results = []
    for fused in (False, True):
        a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
        opt = make_sgd([{"params": [a, b]}], lr=0.1, momentum=0.9, weight_decay=5e-4,
                       fused=fused)
        a.grad = torch.full((3,), 0.5)
        opt.step()  # b has no gradient yet
        b.grad = torch.full((3,), 2.0)
        opt.step()
        opt.step()
        results.append((a.detach().clone(), b.detach().clone()))
    for loop, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-7)


# -- FusedSGD: torch's fused step, channels_last weights as flat views ----------------------------
def _weights():
    torch.manual_seed(0)
    return [
        torch.randn(32, 16, 3, 3).contiguous(memory_format=torch.channels_last),  # flat
        torch.randn(5, 3, 3, 3).contiguous(memory_format=torch.channels_last),  # scalar tail
        torch.randn(10, 32),
        torch.randn(10),
    ]


def _run(make, weights, steps=4, closure=False, **kwargs):
    params = [w.clone().requires_grad_() for w in weights]
    opt = make(params, **kwargs)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.1 * (1 - 0.1 * i)  # a schedule moves it

        def grads():
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).contiguous(
                    memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)
            return 0.0

        if closure:
            opt.step(grads)
        else:
            grads()
            opt.step()
    return params, opt


@pytest.mark.parametrize("kwargs", [
    {"momentum": 0.9, "weight_decay": 5e-4},
    {"momentum": 0.9, "weight_decay": 1e-2, "nesterov": True},
    {"momentum": 0.5, "dampening": 0.3, "maximize": True},
    {"momentum": 0.0, "weight_decay": 5e-4},
])
@pytest.mark.parametrize("closure", [False, True])
def test_fused_sgd_gives_torchs_fused_step_bit_for_bit(kwargs, closure):
    weights = _weights()
    ours, opt = _run(lambda p, **kw: FusedSGD(p, lr=0.1, **kw), weights, closure=closure,
                     **kwargs)
    theirs, ref = _run(lambda p, **kw: torch.optim.SGD(p, lr=0.1, fused=True, **kw), weights,
                       closure=closure, **kwargs)
    for a, b, w in zip(ours, theirs, weights, strict=True):
        assert not torch.equal(a, w)
        assert torch.equal(a, b) and a.stride() == w.stride()
    if kwargs["momentum"]:
        for a, b in zip(ours, theirs, strict=True):
            buf_a, buf_b = opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"]
            assert torch.equal(buf_a, buf_b) and buf_a.stride() == a.stride()


def test_fused_sgd_steps_channels_last_weights_without_copies():
    from torch.profiler import ProfilerActivity, profile

    w = torch.randn(64, 32, 3, 3).contiguous(memory_format=torch.channels_last)
    copies = {}
    for name, make in (("ours", lambda p: FusedSGD(p, lr=0.1, momentum=0.9)),
                       ("torch", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True))):
        p = w.clone().requires_grad_()
        opt = make([p])
        p.grad = torch.ones_like(p)  # channels_last, as autograd makes it
        opt.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        copies[name] = sum(e.count for e in prof.key_averages() if e.key == "aten::copy_")
    assert copies["torch"] > 0  # what FusedSGD is for
    assert copies["ours"] == 0


def test_fused_sgd_runs_its_step_hooks_once():
    """Making any torch SGD wraps SGD.step with the hook runner; FusedSGD.step must not call
    it again (its hooks would run twice)."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    p = torch.zeros(3, requires_grad=True)
    opt = FusedSGD([p], lr=0.1, momentum=0.9)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    p.grad = torch.ones(3)
    opt.step()
    assert calls == ["pre", "post"]


def test_fused_sgd_skips_a_step_the_grad_scaler_found_inf_in():
    """Also the first step, whose momentum buffer must then not be left uninitialised."""
    garbage = [torch.full((4096,), 3e17) for _ in range(64)]  # freed memory holds big values
    del garbage
    p = torch.ones(4, requires_grad=True)
    opt = FusedSGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(4)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4))
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros(4))
    opt.found_inf = torch.tensor(0.0)
    opt.step()  # the gradient unscaled: 0.5
    assert torch.allclose(p.detach(), torch.full((4,), 1 - 0.1 * 0.5))


def test_fused_sgd_refuses_sparse_gradients():
    p = torch.zeros(3, requires_grad=True)
    opt = FusedSGD([p], lr=0.1)
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("weight_layout, other", [
    ("channels_last", "gradient"), ("channels_last", "buffer"), ("contiguous", "gradient")])
def test_a_gradient_or_buffer_laid_out_otherwise_steps_as_in_the_loop(weight_layout, other):
    """Torch's fused CPU kernel mis-steps a weight whose gradient or momentum buffer has other
    strides (a gradient set by hand, a buffer loaded from a checkpoint of another layout): a
    difference of about 1 after two steps with torch 2.14.1. FusedSGD lays them out first."""
    cl, cont = torch.channels_last, torch.contiguous_format
    mine, theirs = (cl, cont) if weight_layout == "channels_last" else (cont, cl)
    torch.manual_seed(0)
    start, grad, buf = (torch.randn(4, 3, 2, 2) for _ in range(3))
    results = []
    for fused in (False, True):
        p = start.clone().contiguous(memory_format=mine).requires_grad_()
        opt = make_sgd([{"params": [p]}], lr=0.1, momentum=0.9, weight_decay=5e-4, fused=fused)
        if other == "buffer":
            opt.state[p]["momentum_buffer"] = buf.clone(memory_format=theirs)
        for _ in range(2):
            p.grad = grad.contiguous(memory_format=theirs if other == "gradient" else mine)
            opt.step()
        results.append(p.detach().clone())
    assert isinstance(opt, FusedSGD)
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)


def test_each_param_group_steps_with_its_own_settings():
    """Per-group lr, momentum, dampening, weight decay and nesterov (the job's mask scores have
    a group of their own, without weight decay): the same weights and buffers as torch's
    fused step, bit for bit."""
    weights = _weights()

    def groups(params):
        return [{"params": params[:2], "lr": 0.05, "momentum": 0.9, "dampening": 0.3,
                 "weight_decay": 5e-4},
                {"params": params[2:3], "lr": 0.2, "momentum": 0.5, "weight_decay": 0.0,
                 "nesterov": True},
                {"params": params[3:], "lr": 0.1}]

    results = []
    for make in (lambda g: FusedSGD(g, lr=0.3, momentum=0.0, weight_decay=1e-2),
                 lambda g: torch.optim.SGD(g, lr=0.3, momentum=0.0, weight_decay=1e-2,
                                           fused=True)):
        params = [w.clone().requires_grad_() for w in weights]
        opt = make(groups(params))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).contiguous(
                    memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)
            opt.step()
        results.append((params, opt))
    (ours, opt), (theirs, ref) = results
    for a, b, w in zip(ours, theirs, weights, strict=True):
        assert not torch.equal(a, w)
        assert torch.equal(a, b)
    for a, b in zip(ours[:3], theirs[:3], strict=True):
        assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])


@pytest.mark.parametrize("make", [
    lambda p: FusedSGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    lambda p: make_sgd([{"params": p}], lr=0.1, momentum=0.9, weight_decay=5e-4),
], ids=["FusedSGD", "make_sgd"])
def test_a_closure_step_runs_the_backward_and_returns_the_loss(make):
    """Lightning steps with a closure that runs the forward and the backward: the step (itself
    without gradients) runs it with gradients on, steps on the gradient it made and returns
    its loss, as torch's SGD does."""
    torch.manual_seed(0)
    x, target = torch.randn(8, 4), torch.randn(8, 3)
    results = []
    for opt_of in (make, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9,
                                                   weight_decay=5e-4, fused=True)):
        torch.manual_seed(1)
        layer = torch.nn.Linear(4, 3)
        opt = opt_of(list(layer.parameters()))
        losses = []
        for _ in range(3):
            def closure(opt=opt, layer=layer):
                opt.zero_grad()
                loss = (layer(x) - target).square().mean()
                loss.backward()
                return loss

            losses.append(opt.step(closure))
        results.append((losses, [p.detach().clone() for p in layer.parameters()]))
    (losses, params), (ref_losses, ref_params) = results
    assert all(isinstance(loss, torch.Tensor) for loss in losses)
    assert [v.item() for v in losses] == [v.item() for v in ref_losses]
    assert losses[-1] < losses[0]
    for p, q in zip(params, ref_params, strict=True):
        assert torch.equal(p, q)


def test_make_sgd_leaves_half_precision_weights_to_torch():
    """The fused CPU step is for float32/float64 weights; bf16 ones (or a mix) get torch's own
    SGD, which picks its kernel."""
    for params in ([torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)],
                   [torch.zeros(2, requires_grad=True),
                    torch.zeros(2, dtype=torch.float16, requires_grad=True)]):
        opt = make_sgd([{"params": params}], lr=0.1, momentum=0.9, weight_decay=0.0)
        assert not isinstance(opt, FusedSGD)
        assert opt.defaults["fused"] is None
