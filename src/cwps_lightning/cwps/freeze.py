"""Shared channels stand still in the hard stage.

A channel the hard mask shares (m = 0) gets no gradient for its child kernel (dL/dw_child =
m * dL/dw), but an optimiser still moves it: SGD's weight decay and momentum, Adam's running
moments. Nothing in the forward sees that drift, yet a channel whose mask flips back to
task-specific would start from wherever the drift took it. :class:`SharedChannelFreeze` keeps
the child kernels (and biases) of shared channels exactly where they were when the channel
became shared, and zeroes their rows of the optimiser's per-parameter state when it turns
task-specific again, so a flip back starts from a defined point: the kernel it had, with no
stale momentum.

Hooks on the optimiser's step (plain PyTorch), so any training loop gets it by calling
:meth:`attach`; the snapshot costs one copy of the CWPS layers' child weights in memory and one
pass over them per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import hard_mask
from .surgery import cwps_layers


class SharedChannelFreeze:
    """Restore shared channels' child weights after every optimiser step in the hard stage.

    Per parameter it keeps a snapshot whose rows are valid for the channels shared at the last
    step: a step copies in only the rows that became shared (rare: the masks barely move), and
    the post-step restore is one pass over the weight. The optimiser's state rows of a channel
    are zeroed when it turns task-specific again (while shared, they are never applied).
    """

    def __init__(self, model: nn.Module):
        self.layers = [layer for _, layer in cwps_layers(model)]
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self._held: dict[int, tuple[Tensor, Tensor]] = {}  # id(p) -> (snapshot, rows held)

    def attach(self, optimizer: torch.optim.Optimizer) -> SharedChannelFreeze:
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)
        return self

    def _hold(self, optimizer, p: Tensor, shared: Tensor) -> Tensor:
        """The snapshot of ``p`` with the rows of ``shared`` valid (their current values)."""
        snap, held = self._held.get(id(p), (None, None))
        if snap is None or snap.shape != p.shape or snap.device != p.device:
            snap, held = torch.empty_like(p), torch.zeros_like(shared)
        new = shared & ~held
        if bool(new.any()):
            snap[new] = p[new]
        released = held & ~shared
        if bool(released.any()):  # task-specific again: no stale momentum or moments
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value[released] = 0.0
        self._held[id(p)] = (snap, shared)
        return snap

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._pending = []
        for layer in self.layers:
            if layer.stage != "hard" or not layer.weight.requires_grad:
                continue
            # the mask of this step's forward: the logits move in the same step
            shared = hard_mask(layer.mask_logits, layer.threshold) == 0
            for p in (layer.weight, layer.bias):
                if p is not None and p.requires_grad:
                    snap = self._hold(optimizer, p, shared)
                    if bool(shared.any()):
                        rows = shared.view(-1, *([1] * (p.dim() - 1)))
                        self._pending.append((p, rows, snap))

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for p, rows, snap in self._pending:
            torch.where(rows, snap, p, out=p)
        self._pending = []
