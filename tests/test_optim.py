"""Optimiser settings shared by the job and the benchmarks (optim.py)."""

from __future__ import annotations

import torch

from cwps_lightning.optim import fused_sgd_ok, make_sgd


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
