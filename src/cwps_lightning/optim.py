"""The training job's SGD, shared with the benchmarks (plain PyTorch)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def fused_sgd_ok(param_lists: Iterable[Iterable[Tensor]]) -> bool:
    """Whether SGD steps these parameters with torch's fused kernel: float32/float64 on the CPU,
    where the per-parameter loop makes four passes over memory per parameter and the fused
    kernel one (resnet18 with momentum and weight decay on the 2-core CPU machine: the optimiser
    step alone 8.8 -> 4.3 ms, a whole training step at batch 32, 32 px 53.7 -> 51.8 ms). It
    rounds differently from the loop in rare elements (by one ulp, in one of 2M elements after
    five steps, in a check), which is enough for a training run to end in other weights.
    Elsewhere (CUDA: torch's multi-tensor path; half-precision weights) torch picks."""
    params = [p for ps in param_lists for p in ps]
    return bool(params) and all(
        p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params)


def make_sgd(groups: list[dict], *, lr: float, momentum: float, weight_decay: float,
             fused: bool | None = None) -> torch.optim.SGD:
    """SGD over ``groups`` (torch's param-group dicts). ``fused`` None: the fused kernel where
    :func:`fused_sgd_ok` says so; False: torch's own choice."""
    if fused is None:
        fused = fused_sgd_ok(g["params"] for g in groups)
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                          fused=True if fused else None)  # False would also turn off foreach
    if fused and momentum:
        opt.register_step_pre_hook(_momentum_for_late_starters)
    return opt


@torch.no_grad()
def _momentum_for_late_starters(optimizer, args, kwargs) -> None:
    """Torch's fused SGD fails on a step where some parameters have a momentum buffer and
    others, with their first gradient, do not (a parameter unused in the first steps). The
    loop starts such a buffer at the gradient; a zero buffer does the same with dampening 0
    (0.9 * 0 + grad)."""
    for group in optimizer.param_groups:
        if not group["momentum"] or group["dampening"]:
            continue
        with_grad = [p for p in group["params"] if p.grad is not None]
        started = [optimizer.state.get(p, {}).get("momentum_buffer") is not None
                   for p in with_grad]
        if any(started) and not all(started):
            for p, has in zip(with_grad, started, strict=True):
                if not has:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
