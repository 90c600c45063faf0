"""TAPS layers (Task Adaptive Parameter Sharing, Wallingford et al., CVPR 2022), plain PyTorch.

Reference followed: the authors' code, github.com/MattWallingford/TAPS, ``models/taps_net.py``
(``THRESHOLD``, ``INITIALIZATION``, ``BinarizeIndictator``, ``freeze_conv``) and
``train_sequential.py`` (``train``: the |indicator| penalty; "Percent Weights Activated").

Every nn.Conv2d / nn.Linear of the backbone except the classifier head gets

    weight    the frozen base weight w0 (a buffer: same state-dict key as the plain layer),
    residual  a task residual dw of the same shape (Parameter, zero-initialised),
    gate      ONE scalar gate score s per layer (Parameter, initialised to GATE_INIT),

and computes with  w = w0 + 1[s >= THRESHOLD] * dw.  The indicator is straight-through: its
backward passes the gradient unchanged (their ``BinarizeIndictator``), so

    dL/ds = <dL/dw, dw>,    dL/d(dw) = 1[s >= THRESHOLD] * dL/dw.

Biases: as in ``freeze_conv``, which freezes only ``weight``, the bias stays the layer's own
Parameter (trainable if it was; not gated, so it is task-specific whatever the gate says; their
ResNet convs have no bias).

Public API
  THRESHOLD, GATE_INIT                 0.1 and 0.15, as in the authors' code
  gate_ste(score) -> Tensor            1[score >= THRESHOLD], straight-through backward
  TAPSConv2d, TAPSLinear               the layers (``from_conv``/``from_linear``, ``to_plain``,
                                       ``merged_weight``, ``is_open``)
  TAPS_LAYER_TYPES                     (TAPSConv2d, TAPSLinear)
  inject_taps(model, exclude=None)     wrap in place; returns the names wrapped (default: every
                                       shareable Conv2d/Linear but the classifier head, as
                                       ``inject_cwps``)
  merge_taps(model)                    back to plain layers with w0 + 1[open] * dw (bit-exact)
  taps_layers(model)                   iterator of (name, layer)
  gate_penalty(model) -> Tensor        mean |s| over the TAPS layers (differentiable)
  open_gates(model) -> dict[str, bool] which layers use their residual
  TAPSMethod                           the method for the runner (settings: TAPSSettings)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..cwps.bank import KernelBank
from .base import FitPlan, Harness, Method, OptimizerPlan, Trained, split_param_count
from .weight_layers import (
    WeightConv2d,
    WeightLinear,
    WeightTransform,
    inject,
    layers_of,
    layers_or_raise,
    merge,
    to_buffer,
)

if TYPE_CHECKING:
    from ..settings import TAPSSettings

THRESHOLD = 0.1
GATE_INIT = 0.15


class _GateSTE(torch.autograd.Function):
    """1[s >= THRESHOLD] forward, identity backward (their BinarizeIndictator)."""

    @staticmethod
    def forward(ctx, score: Tensor) -> Tensor:
        return (score >= THRESHOLD).to(score.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def gate_ste(score: Tensor) -> Tensor:
    """1 where the gate is open (score >= THRESHOLD), else 0; gradient straight through."""
    return _GateSTE.apply(score)


class TAPSMixin(WeightTransform):
    """State shared by TAPSConv2d and TAPSLinear (see the module docstring)."""

    bias: nn.Parameter | None

    def _init_state(self) -> None:
        to_buffer(self, "weight")
        w = self.weight
        self.residual = nn.Parameter(torch.zeros_like(w))
        self.gate = nn.Parameter(torch.full((), GATE_INIT, device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def _start_from(self, plain: nn.Module):
        """w0 = ``plain``'s weight, dw = 0, s = GATE_INIT, bias copied (built on meta and
        allocated empty, so every tensor is filled here and no random numbers are drawn)."""
        self.weight.copy_(plain.weight)
        self.residual.zero_()
        self.gate.fill_(GATE_INIT)
        if plain.bias is not None:
            self.bias.copy_(plain.bias)
            self.bias.requires_grad_(plain.bias.requires_grad)
        self.train(plain.training)
        return self

    def is_open(self) -> bool:
        return bool(self.gate.detach() >= THRESHOLD)

    def effective_weight(self) -> Tensor:
        """w0 + gate_ste(s) * dw, with autograd to dw and s."""
        return self.weight + gate_ste(self.gate) * self.residual

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate={float(self.gate.detach()):.4g}"


class TAPSConv2d(TAPSMixin, WeightConv2d):
    """nn.Conv2d with a frozen base weight, a gated residual and one gate score (small-input
    shortcut and merge: weight_layers.WeightConv2d)."""


class TAPSLinear(TAPSMixin, WeightLinear):
    """nn.Linear with a frozen base weight, a gated residual and one gate score."""


TAPS_LAYER_TYPES = (TAPSConv2d, TAPSLinear)
TAPSLayer = TAPSConv2d | TAPSLinear


def taps_layers(model: nn.Module) -> Iterator[tuple[str, TAPSLayer]]:
    """(qualified name, layer) for every TAPS layer of ``model``, in module order."""
    return layers_of(model, TAPS_LAYER_TYPES)


def inject_taps(model: nn.Module, exclude: Iterable[str] | None = None) -> list[str]:
    """Replace every shareable nn.Conv2d / nn.Linear of ``model`` (in place) by its TAPS layer.

    What is wrapped is ``shareable_layers(model, exclude)``: by default all but the classifier
    head; normalisation layers are never touched. The new layers start with dw = 0 and the gate
    open (GATE_INIT >= THRESHOLD), so the model computes what it did. Returns the names.
    """
    return inject(model, TAPSConv2d, TAPSLinear, "TAPS", exclude)


def merge_taps(model: nn.Module) -> nn.Module:
    """Replace every TAPS layer (in place) by a plain layer with weight w0 + 1[open] * dw.

    The merged model computes bit for bit what the TAPS model computes. Returns ``model``.
    """
    return merge(model, TAPS_LAYER_TYPES)


def gate_penalty(model: nn.Module) -> Tensor:
    """Mean over the TAPS layers of |s| (the sparsity term; the authors' ``train`` sums the
    |indicator| of their 52 ResNet-50 layers and divides by 52)."""
    layers = layers_or_raise(model, TAPS_LAYER_TYPES, "TAPS", "gate_penalty")
    return torch.stack([layer.gate.abs() for _, layer in layers]).mean()


def open_gates(model: nn.Module) -> dict[str, bool]:
    """{layer name: True where the layer uses its residual (s >= THRESHOLD)}."""
    layers = layers_or_raise(model, TAPS_LAYER_TYPES, "TAPS", "open_gates")
    return {name: layer.is_open() for name, layer in layers}


@torch.no_grad()
def task_param_count(model: nn.Module) -> dict[str, int]:
    """What a TAPS task stores beyond T0: the residual of every open layer (a closed layer
    computes with w0), every wrapped layer's bias (trained, ungated), and the parameters
    outside the wrapped layers (normalisation layers, head)."""
    layers = list(taps_layers(model))
    kernels = sum(layer.residual.numel() for _, layer in layers if layer.is_open())
    kernels += sum(layer.bias.numel() for _, layer in layers
                   if layer.bias is not None and layer.bias.requires_grad)
    own = split_param_count(model, [name for name, _ in layers])["task_own"]
    return {"kernels": kernels, "task_own": own}


class TAPSMethod(Method):
    """T0's layers plus a residual per layer that a learned gate switches on; the gate penalty
    (``lam`` x mean |s|, from ``penalty_from_epoch``) closes the gates a task can do without."""

    name = "taps"
    label = "TAPS"

    def __init__(self, settings: TAPSSettings):
        self.settings = settings

    @classmethod
    def from_settings(cls, job) -> TAPSMethod:
        return cls(job.methods.taps)

    def train(self, task: str, iteration: int, bank: KernelBank, harness: Harness) -> Trained:
        s = self.settings
        model = harness.new_model(task, iteration)
        inject_taps(model)
        harness.step(f"taps {task}: {harness.epochs} epoch(s), lam {s.lam}")
        plan = FitPlan(
            harness.epochs, seed=harness.seed(task, "fit", iteration), train="finetune",
            optimizer=OptimizerPlan(s.optimizer, lr=s.lr, weight_decay=s.weight_decay,
                                    groups={"gate": s.gate_lr}, lr_key="methods.taps.lr",
                                    group_keys={"gate": "methods.taps.gate_lr"}),
            penalty=gate_penalty, penalty_weight=s.lam, penalty_from_epoch=s.penalty_from_epoch,
        )
        harness.fit(model, task, plan, name=task)
        gates = open_gates(model)
        params = task_param_count(model)
        merge_taps(model)
        info = {"open_layers": sum(gates.values()), "layers": len(gates),
                "open": [name for name, is_open in gates.items() if is_open]}
        return Trained(model, params=params, info=info)

    def describe(self, info: dict) -> str:
        return f", {info['open_layers']}/{info['layers']} layers open"
