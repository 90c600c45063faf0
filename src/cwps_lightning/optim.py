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
    """SGD over ``groups`` (torch's param-group dicts). ``fused`` None: :class:`FusedSGD`
    (torch's fused kernel) where :func:`fused_sgd_ok` says so; False: torch's own choice."""
    if fused is None:
        fused = fused_sgd_ok(g["params"] for g in groups)
    if fused:
        return FusedSGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    # fused=None, not False: False would also turn off torch's multi-tensor path (CUDA)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


class FusedSGD(torch.optim.SGD):
    """``torch.optim.SGD(fused=True)``: the same kernel, the same numbers, and no copies of
    channels_last weights.

    Torch's fused CPU step makes contiguous copies of a channels_last gradient and momentum
    buffer and copies them back, which takes longer than the update itself: resnet18 at batch
    32, 32 px in the training job's layout (channels_last), on the 2-core CPU machine, the step
    took 10.4-12.5 ms, 5.5 ms of it those copies. The update is elementwise and a weight, its
    gradient and its buffer are laid out alike (autograd gives a gradient its weight's
    strides), so here such a weight goes into the same kernel as a flat view of its memory.
    Torch's copies keep the channels_last layout, so its kernel runs over the elements in
    memory order too: the flat view gets bit for bit the numbers torch's fused step gives
    (checked in the tests, a weight with a scalar tail included, and on the default job). A
    gradient or buffer laid out otherwise than its weight (set by hand, loaded) is copied into
    the weight's layout first: torch's fused kernel steps such a weight wrongly.

    A parameter whose momentum buffer starts late (its first gradient after others had
    theirs) starts it with its gradient, as torch's loop does (torch's fused step raises). A
    new buffer starts as zeros: torch's starts uninitialised, and when a gradient scaler skips
    that first step (found_inf) the next one reads whatever the memory held (seen with torch
    2.14.1: weights of 1e3 after one step of 0.05).
    """

    #: a step leaves a parameter without a gradient alone and calls a closure once, as
    #: torch's SGD does: cwps.freeze.SharedChannelFreeze lets wholly shared weights sit it out
    sgd_skips_params_without_grad = True

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         fused=True)

    # not super().step(): once torch has wrapped SGD.step with the step hooks (any SGD made
    # in the process does), calling it would run this optimiser's hooks a second time
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        bufs: list[Tensor | None] = []
        if self._init_group(group, params, grads, bufs):
            raise RuntimeError("FusedSGD does not support sparse gradients")
        momentum = group["momentum"]
        # one kernel call per kind of step: a buffer's first step is the gradient itself
        calls: dict[bool, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            b, fresh = (bufs[i], bufs[i] is None) if momentum else (None, False)
            if fresh:  # zeros, not empty: a first step a scaler skips must not leave garbage
                b = self.state[p]["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)
            # torch's fused kernel mis-steps a weight whose gradient or buffer is laid out
            # otherwise (torch 2.14.1, CPU: a gradient set by hand, a buffer from a checkpoint
            # of another layout); autograd's gradients and the buffers made here never are
            if g.stride() != p.stride():
                g = p.grad = _like(p, g)
            if b is not None and b.stride() != p.stride():
                b = self.state[p]["momentum_buffer"] = _like(p, b)
            flat = _flat_ok(p)
            for out, t in zip(calls.setdefault(fresh, ([], [], [])), (p, g, b), strict=True):
                if t is not None:
                    out.append(_flat(t) if flat else t)
        for first, (ps, gs, bs) in calls.items():
            torch._fused_sgd_(
                ps, gs, bs, weight_decay=group["weight_decay"], momentum=momentum,
                lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                maximize=group["maximize"], is_first_step=first,
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
            )


def _flat_ok(p: Tensor) -> bool:
    """A channels_last weight: one dense run of memory, as its gradient and buffer are (laid
    out as it is, _step_group), the same element at the same offset in each."""
    return (p.dim() == 4 and not p.is_contiguous()
            and p.is_contiguous(memory_format=torch.channels_last))


def _like(p: Tensor, t: Tensor) -> Tensor:
    """``t``'s values laid out as ``p`` is."""
    return torch.empty_strided(p.size(), p.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _flat(t: Tensor) -> Tensor:
    return t.as_strided((t.numel(),), (1,), t.storage_offset())
