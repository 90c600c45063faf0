"""Shared channels stand still in the hard stage.

A channel the hard mask shares (m = 0) gets no gradient for its child kernel (dL/dw_child =
m * dL/dw), but an optimiser still moves it: SGD's weight decay and momentum, Adam's running
moments. Nothing in the forward sees that drift, yet a channel whose mask flips back to
task-specific would start from wherever the drift took it. :class:`SharedChannelFreeze` keeps
the child kernels (and biases) of shared channels exactly where they were when the channel
became shared, and zeroes their rows of the optimiser's per-parameter state, so a flip back
starts from a defined point: the kernel it had, with no stale momentum.

Hooks on the optimiser's step (plain PyTorch), so any training loop gets it by calling
:meth:`attach`; the snapshot costs one copy of the CWPS layers' child weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .surgery import cwps_layers


class SharedChannelFreeze:
    """Restore shared channels' child weights after every optimiser step in the hard stage."""

    def __init__(self, model: nn.Module):
        self.layers = [layer for _, layer in cwps_layers(model)]
        self._pending: list[tuple[nn.Parameter, Tensor, Tensor]] = []
        self._snapshots: dict[int, Tensor] = {}

    def attach(self, optimizer: torch.optim.Optimizer) -> SharedChannelFreeze:
        self.optimizer = optimizer
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)
        return self

    def _snapshot(self, p: Tensor) -> Tensor:
        buf = self._snapshots.get(id(p))
        if buf is None or buf.shape != p.shape or buf.device != p.device:
            buf = self._snapshots[id(p)] = torch.empty_like(p)
        return buf.copy_(p)

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._pending = []
        for layer in self.layers:
            if layer.stage != "hard" or not layer.weight.requires_grad:
                continue
            # the mask of this step's forward: the logits move in the same step
            shared = ~(torch.sigmoid(layer.mask_logits) >= layer.threshold)
            if not bool(shared.any()):
                continue
            for p in (layer.weight, layer.bias):
                if p is not None and p.requires_grad:
                    rows = shared.view(-1, *([1] * (p.dim() - 1)))
                    self._pending.append((p, rows, self._snapshot(p)))

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for p, rows, before in self._pending:
            torch.where(rows, before, p, out=p)
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.masked_fill_(rows, 0.0)
        self._pending = []
