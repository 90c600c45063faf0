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
:meth:`attach`; it keeps a copy of the shared channels' child kernels and writes them back
after every step (a pass over the shared channels only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import hard_mask
from .surgery import cwps_layers


class SharedChannelFreeze:
    """Restore shared channels' child weights after every optimiser step in the hard stage.

    Per parameter it keeps the rows of the channels shared at the last step, packed (the
    channels' indices and their kernels, in index order): after a step it writes those rows
    back, and only those (a pass over the shared channels, not over the weight). After the
    restore a held row equals its packed copy, so when the shared set changes (rare: the masks
    barely move) the new packed rows are read from the weight itself, the newly shared ones
    included. The optimiser's state rows of a channel are zeroed when it turns task-specific
    again (while shared, they are never applied).
    """

    def __init__(self, model: nn.Module):
        self.layers = [layer for _, layer in cwps_layers(model)]
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        # id(p) -> (shared rows held (bool), their indices, their kernels packed, p's layout)
        self._held: dict[int, tuple] = {}

    def attach(self, optimizer: torch.optim.Optimizer) -> SharedChannelFreeze:
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)
        return self

    def _hold(self, optimizer, p: Tensor, shared: Tensor) -> tuple[Tensor, Tensor]:
        """The indices of ``shared`` and ``rows(p)``'s rows there as they are now (kept between
        steps while ``shared`` stays the same)."""
        entry = self._held.get(id(p))
        rows = _rows(p)
        # the packed rows are in the memory order of p when they were taken: a change of
        # format (or shape, device) takes them anew
        if entry is not None and entry[3] == (p.shape, p.stride(), p.device) and \
                entry[0].shape == shared.shape:
            held, index, packed, _ = entry
            if torch.equal(held, shared):
                return index, packed
            released = held & ~shared
            if bool(released.any()):  # task-specific again: no stale momentum or moments
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        value[released] = 0.0
        index = shared.nonzero().squeeze(1)
        packed = rows.index_select(0, index)
        self._held[id(p)] = (shared, index, packed, (p.shape, p.stride(), p.device))
        return index, packed

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._pending = []
        layers = [layer for layer in self.layers
                  if layer.stage == "hard" and layer.weight.requires_grad]
        # the masks of this step's forward: the logits move in the same step
        for layer, shared in zip(layers, _shared_channels(layers), strict=True):
            for p in (layer.weight, layer.bias):
                if p is not None and p.requires_grad:
                    index, packed = self._hold(optimizer, p, shared)
                    if index.numel():
                        self._pending.append((p, index, packed))

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for p, index, packed in self._pending:
            _rows(p).index_copy_(0, index, packed)
        self._pending = []


def _shared_channels(layers: list) -> list[Tensor]:
    """Per layer, bool per channel: shared by the hard mask (sigmoid(s) < lambda). Layers with one
    threshold, dtype and device (a model's) are decided in one pass over all their scores."""
    if not layers:
        return []
    s0, t0 = layers[0].mask_logits, layers[0].threshold
    if all(layer.threshold == t0 and layer.mask_logits.dtype == s0.dtype
           and layer.mask_logits.device == s0.device and layer.mask_logits.dim() == 1
           for layer in layers):
        flat = torch.cat([layer.mask_logits for layer in layers])
        sizes = [layer.mask_logits.numel() for layer in layers]
        return list((hard_mask(flat, t0) == 0).split(sizes))
    return [hard_mask(layer.mask_logits, layer.threshold) == 0 for layer in layers]


def _rows(p: Tensor) -> Tensor:
    """``p`` as a matrix with a row per output channel: a [C, K] view where every channel's
    values are one dense run in memory (contiguous and channels_last kernels, biases), so rows
    are copied whole; ``p`` itself otherwise (its rows indexed along dim 0)."""
    c = p.shape[0]
    k = p.numel() // c if c else 0
    dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
    if dense and (c <= 1 or p.stride(0) == k):
        return p.as_strided((c, k), (k, 1))
    return p
