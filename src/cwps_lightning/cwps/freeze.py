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
:meth:`attach`; around every step it copies the shared channels' child kernels out and back
(two passes over the shared channels only). A parameter whose channels are all shared (whole
layers are, deep in a backbone: the default job shares every channel of the four 3x3
convolutions of resnet18's last stage, three quarters of its weights) is not copied at all under
SGD: it sits the step out.

Whether a channel turned task-specific is judged against the decisions of the parameter's last
step, which the freeze holds; a training loop that checkpoints keeps them with its checkpoint
(:meth:`SharedChannelFreeze.state_dict`, ``load_state_dict``; the Lightning module does), or a
channel that turns task-specific at the first step after a resume keeps its stale momentum.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .layers import hard_mask
from .surgery import require_cwps_layers


@dataclass
class _Steps:
    """One optimiser's side of the freeze."""

    step: int = 0
    # (parameter, indices of its shared rows, those rows packed) for the step under way
    pending: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    # (parameter, its gradient) of the parameters sitting the step under way out
    sat_out: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    # id(p) -> (shared rows at its last step (bool per channel), their indices, that step)
    last: dict[int, tuple[Tensor, Tensor, int]] = field(default_factory=dict)
    # (the layers, all their decisions in one tensor) at the last step
    last_flat: tuple[list[int], Tensor] | None = None


class SharedChannelFreeze:
    """Restore shared channels' child weights after every optimiser step in the hard stage.

    Each step it copies out the rows of the channels shared at that step, packed (in index
    order), and after the step writes those rows back, and only those (a pass over the shared
    channels, not over the weight). The copy lives for the step alone and is taken after the
    backward, when the step's activations are gone, so it adds nothing to the training peak;
    held between steps it would (with half the channels shared it is half the weights: on
    resnet18 21 MiB, 8% of fine-tuning's peak memory growth at batch 32, 112 px). A step given a
    closure (Lightning's automatic optimisation: ``optimizer.step(closure)`` runs the forward
    and backward inside the step) takes it when the closure's first call returns. Between steps
    the shared rows are the weight's own: a restore puts back what they held before the step,
    and an edit between steps (a checkpoint load) is what the next step keeps. The optimiser's
    state rows of a channel are zeroed when it turns task-specific again (while shared, they are
    never applied). Only the parameters of the optimiser that steps are touched, so one freeze
    may serve several optimisers.

    A parameter with every channel shared sits the step out instead, under SGD: its gradient is
    taken away for the step (SGD steps only parameters with one) and handed back after it. The
    weight is then bit for bit what the copy would restore, with no pass over it at all (copy
    out, SGD, copy back); what differs is the momentum buffer, which keeps its rows rather than
    decaying them, and a shared channel's buffer rows are never applied and are zeroed before it
    trains again. A parameter without a momentum buffer yet (momentum on) takes the copy: SGD
    starts a missing buffer as the gradient, not as a step from zero (with dampening the numbers
    would differ; torch's fused step refuses a mix of missing and present buffers). Only
    ``torch.optim.SGD`` itself and classes that declare ``sgd_skips_params_without_grad = True``
    in their own body (``optim.FusedSGD``) sit out: a subclass might call the closure twice (a second backward
    makes a fresh gradient the step would apply) or step parameters without one. Other
    optimisers keep the copy: Adam's step count is per parameter, so sitting out would change
    the bias correction of the parameter's later steps. ``sit_out``: None (the default) sits out
    where it can; False always copies. Attaching one freeze to an optimiser twice is a no-op.
    """

    def __init__(self, model: nn.Module, sit_out: bool | None = None):
        if sit_out not in (None, False):
            raise ValueError(f"sit_out must be None (under SGD) or False, got {sit_out!r}")
        # (built before inject_cwps, it would freeze nothing)
        named = require_cwps_layers(model, "SharedChannelFreeze")
        self.layers = [layer for _, layer in named]
        self._layer_names = [name for name, _ in named]
        self.sit_out = sit_out
        # the optimisers it is attached to, each with its side of the freeze
        self._steps: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Steps] = \
            weakref.WeakKeyDictionary()

    def attach(self, optimizer: torch.optim.Optimizer) -> SharedChannelFreeze:
        if optimizer in self._steps:  # twice would take the gradients and drop them
            return self
        self._steps[optimizer] = _Steps()
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)
        return self

    def state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
        """Which channels of each parameter were shared at its last step under ``optimizer``
        (bool per channel, on the CPU), by the parameter's name in the model.

        A fit resumed from a checkpoint needs them (``load_state_dict``): a channel shared at
        the last step before the checkpoint and task-specific at the first step after it gets
        its optimiser state rows zeroed there, as in the fit that was not interrupted."""
        steps = self._steps_of(optimizer)
        out = {}
        for name, p in self._named_params():
            last = steps.last.get(id(p))
            if last is not None:
                out[name] = last[0].detach().to("cpu", copy=True)
        return out

    def load_state_dict(self, optimizer: torch.optim.Optimizer,
                        state: dict[str, Tensor]) -> None:
        """The decisions of ``state_dict`` as this freeze's own under ``optimizer`` (attached),
        for the parameters of the same names; checked whole before anything is set."""
        steps = self._steps_of(optimizer)
        params = dict(self._named_params())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"shared-channel freeze state names parameters this model's CWPS "
                             f"layers do not have: {unknown[:5]}")
        for name, held in state.items():
            c = params[name].shape[0]
            if held.dtype != torch.bool or held.shape != (c,):
                raise ValueError(f"shared-channel freeze state of {name!r}: expected a bool "
                                 f"tensor of shape ({c},), got {held.dtype} of shape "
                                 f"{tuple(held.shape)}")
        for name, held in state.items():
            held = held.to(params[name].device)
            # step -1: never "the last step", so the first step compares the decisions
            steps.last[id(params[name])] = (held, held.nonzero().squeeze(1), -1)
        steps.last_flat = None

    def _steps_of(self, optimizer) -> _Steps:
        steps = self._steps.get(optimizer)
        if steps is None:
            raise ValueError("this SharedChannelFreeze is not attached to that optimiser "
                             "(attach it first)")
        return steps

    def _named_params(self):
        for name, layer in zip(self._layer_names, self.layers, strict=True):
            for kind in ("weight", "bias"):
                p = getattr(layer, kind)
                if p is not None:
                    yield (f"{name}.{kind}" if name else kind), p

    def _before_step(self, optimizer, args, kwargs):
        steps = self._steps[optimizer]
        # a step that raised before its post-hook: its copies and the gradients it took go
        # (a gradient handed back now could be summed into by this step's backward)
        steps.pending, steps.sat_out = [], []
        steps.step += 1
        # torch passes step's own arguments, the optimiser first (as ``self``)
        at = 1 if args and args[0] is optimizer else 0
        closure = kwargs["closure"] if "closure" in kwargs else \
            (args[at] if len(args) > at else None)
        if closure is None:  # the backward has run
            self._copy_out(optimizer, steps)
            return None
        called = False

        def closure_then_copy():
            nonlocal called
            loss = closure()
            if not called:  # an optimiser that calls it again (LBFGS) has moved the weights
                called = True
                self._copy_out(optimizer, steps)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_copy}
        return (*args[:at], closure_then_copy, *args[at + 1:]), kwargs

    def _shared_index(self, optimizer, steps: _Steps, p: Tensor, shared: Tensor,
                      unchanged: bool) -> Tensor:
        """The indices of ``shared``; rows shared at ``p``'s last step and not now get their
        optimiser state zeroed. ``unchanged``: every layer's decisions are those of the last
        step, so if ``p`` stepped then too its indices hold without comparing."""
        last = steps.last.get(id(p))
        if last is not None and last[0].shape == shared.shape:
            held, index, stepped = last
            if (unchanged and stepped == steps.step - 1) or torch.equal(held, shared):
                steps.last[id(p)] = (held, index, steps.step)
                return index
            released = held & ~shared
            if bool(released.any()):  # task-specific again: no stale momentum or moments
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        value[released] = 0.0
        index = shared.nonzero().squeeze(1)
        steps.last[id(p)] = (shared, index, steps.step)
        return index

    @torch.no_grad()
    def _copy_out(self, optimizer, steps: _Steps) -> None:
        mine = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        layers = [layer for layer in self.layers if layer.stage == "hard" and (
            layer.weight.requires_grad or layer.bias is not None and layer.bias.requires_grad)]
        # the masks of this step's forward (the logits move in this step)
        per_layer, flat = _shared_channels(layers)
        # the decisions rarely change: one comparison for all layers (one device sync on a
        # GPU, not one per layer) tells whether the last step's indices still hold
        ids = [id(layer) for layer in layers]
        unchanged = (flat is not None and steps.last_flat is not None
                     and steps.last_flat[0] == ids and torch.equal(steps.last_flat[1], flat))
        steps.last_flat = None if flat is None else (ids, flat)
        sit_out = self.sit_out is None and _sgd_that_skips(optimizer)
        for layer, shared in zip(layers, per_layer, strict=True):
            for p in (layer.weight, layer.bias):
                if p is None or not p.requires_grad or id(p) not in mine:
                    continue
                index = self._shared_index(optimizer, steps, p, shared, unchanged)
                if not index.numel():
                    continue
                if sit_out and index.numel() == p.shape[0] and _has_momentum_state(
                        optimizer, mine[id(p)], p):
                    if p.grad is not None:  # (without one, SGD leaves it alone already)
                        steps.sat_out.append((p, p.grad))
                        p.grad = None
                    continue
                steps.pending.append((p, index, _rows(p).index_select(0, index)))

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        steps = self._steps[optimizer]
        for p, index, packed in steps.pending:
            _rows(p).index_copy_(0, index, packed)
        steps.pending = []  # the copies go: the next step takes its own
        self._hand_back(steps)

    @staticmethod
    def _hand_back(steps: _Steps) -> None:
        """The gradients of the parameters that sat the step out, back where they were."""
        for p, grad in steps.sat_out:
            if p.grad is None:
                p.grad = grad
        steps.sat_out = []


def _sgd_that_skips(optimizer) -> bool:
    """torch's SGD, or a class that says its step leaves a parameter without a gradient alone
    and calls the closure once (``sgd_skips_params_without_grad``)."""
    cls = type(optimizer)
    # declared by the class itself: a subclass of such a class may step otherwise
    return cls is torch.optim.SGD or vars(cls).get("sgd_skips_params_without_grad") is True


def _has_momentum_state(optimizer, group: dict, p: Tensor) -> bool:
    """Whether ``p``'s next SGD step would find the state it needs: momentum off, or a buffer."""
    if not group.get("momentum"):
        return True
    return optimizer.state.get(p, {}).get("momentum_buffer") is not None


def _shared_channels(layers: list) -> tuple[list[Tensor], Tensor | None]:
    """Per layer, bool per channel: shared by the hard mask (sigmoid(s) < lambda); and all of
    them in one tensor where layers have one threshold, dtype and device (a model's): those are
    decided in one pass over all their scores (None otherwise)."""
    if not layers:
        return [], None
    s0, t0 = layers[0].mask_logits, layers[0].threshold
    if all(layer.threshold == t0 and layer.mask_logits.dtype == s0.dtype
           and layer.mask_logits.device == s0.device and layer.mask_logits.dim() == 1
           for layer in layers):
        flat = torch.cat([layer.mask_logits for layer in layers])
        sizes = [layer.mask_logits.numel() for layer in layers]
        shared = hard_mask(flat, t0) == 0
        return list(shared.split(sizes)), shared
    return [hard_mask(layer.mask_logits, layer.threshold) == 0 for layer in layers], None


def row_matrix(p: Tensor) -> Tensor | None:
    """``p`` as a matrix with a row per output channel: a [C, K] view where every channel's
    values are one dense run in memory (contiguous and channels_last kernels, biases); None
    where they are not."""
    c = p.shape[0]
    k = p.numel() // c if c else 0
    dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
    if dense and (c <= 1 or p.stride(0) == k):
        return p.as_strided((c, k), (k, 1))
    return None


def _rows(p: Tensor) -> Tensor:
    """``p``'s row_matrix with wide elements, so rows are copied whole; ``p`` itself where it
    has none (its rows indexed along dim 0)."""
    rows = row_matrix(p)
    return p if rows is None else _wide(rows)


def _wide(rows: Tensor) -> Tensor:
    """The same bytes with 16-byte elements (8 where 16 do not divide a row), on the CPU.

    The rows are only copied (index_select, index_copy_), never computed with, so any element
    type moves the same bits; the CPU's index_copy_ loops over elements, and at 4 bytes each it
    took 2-3x as long as index_select over the same rows (resnet18, 32 px, half the channels
    shared: 4.6 ms against 1.7 ms a step). At 16 bytes both run at about index_select's speed.
    """
    # (a conjugate or negative view has no plain bytes to reinterpret)
    if rows.device.type != "cpu" or rows.dim() != 2 or rows.is_conj() or rows.is_neg():
        return rows
    size = rows.element_size()
    row_bytes = rows.shape[1] * size
    for wide in (torch.complex128, torch.float64):
        w = wide.itemsize
        # every element aligned to its size: the first row's start (the storage's base too,
        # which memory from numpy or a buffer need not be) and every row's length
        # (view(dtype) asks the storage offset to be a whole number of them as well)
        if (w > size and row_bytes % w == 0 and rows.data_ptr() % w == 0
                and rows.storage_offset() * size % w == 0):
            return rows.view(wide)
    return rows
