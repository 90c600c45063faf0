"""Piggyback layers (Mallya et al., ECCV 2018), plain PyTorch.

Reference followed: the authors' code, github.com/arunmallya/piggyback, ``src/modnets/layers.py``
(``DEFAULT_THRESHOLD``, ``Binarizer``, ``ElementWiseConv2d``, ``ElementWiseLinear``) and
``src/main.py`` (``--mask_scale`` default 1e-2, ``Manager.check``).

Every nn.Conv2d / nn.Linear of the backbone except the classifier head gets

    weight     the frozen backbone weight w0 (a buffer: same state-dict key as the plain layer),
    mask_real  a real-valued mask with one entry per weight element (Parameter, MASK_INIT),

and computes with  w = w0 * binary(mask_real),  binary(m) = 1[m > THRESHOLD] (a tie at the
threshold drops the weight, as ``Binarizer``'s ``le``/``gt``). The binariser is straight-
through: dL/dmask_real = dL/dw * w0.  MASK_INIT > THRESHOLD, so training starts from the
backbone's function.

Biases: frozen and unmasked, as in the authors' layers (``bias`` is a Variable with
requires_grad=False, passed as is to conv2d/linear; ``Manager.check`` asserts it unchanged).
Here it is a buffer.

Public API
  THRESHOLD, MASK_INIT                       5e-3 and 1e-2, as in the authors' code
  binarise(mask) -> Tensor                   1[mask > THRESHOLD], straight-through backward
  PiggybackConv2d, PiggybackLinear           the layers (``from_conv``/``from_linear``,
                                             ``to_plain``, ``merged_weight``, ``binary_mask``)
  PIGGYBACK_LAYER_TYPES                      (PiggybackConv2d, PiggybackLinear)
  inject_piggyback(model, exclude=None)      wrap in place; returns the names wrapped (default:
                                             every shareable Conv2d/Linear but the classifier
                                             head, as ``inject_cwps``)
  merge_piggyback(model)                     back to plain layers with w0 * binary mask
                                             (bit-exact)
  piggyback_layers(model)                    iterator of (name, layer)
  kept_fraction(model) -> float              share of masked weights kept
  masked_numel(model) -> int                 number of masked weights (1 bit each to store)
  PiggybackMethod                            the method for the runner (PiggybackSettings)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..cwps.bank import KernelBank
from ..cwps.surgery import classifier_names
from .base import (
    FitPlan,
    Harness,
    Method,
    OptimizerPlan,
    Trained,
    head_param_count,
    split_param_count,
)
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
    from ..settings import PiggybackSettings

THRESHOLD = 5e-3
MASK_INIT = 1e-2


class _BinariseSTE(torch.autograd.Function):
    """1[m > THRESHOLD] forward, identity backward (their Binarizer)."""

    @staticmethod
    def forward(ctx, mask: Tensor) -> Tensor:
        return (mask > THRESHOLD).to(mask.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def binarise(mask: Tensor) -> Tensor:
    """1 where the weight is kept (mask > THRESHOLD), else 0; gradient straight through."""
    return _BinariseSTE.apply(mask)


class PiggybackMixin(WeightTransform):
    """State shared by PiggybackConv2d and PiggybackLinear (see the module docstring)."""

    def _init_state(self) -> None:
        to_buffer(self, "weight")
        to_buffer(self, "bias")
        self.mask_real = nn.Parameter(torch.full_like(self.weight, MASK_INIT))

    @torch.no_grad()
    def _start_from(self, plain: nn.Module):
        """w0 and bias from ``plain``, mask = MASK_INIT (built on meta and allocated empty, so
        every tensor is filled here and no random numbers are drawn)."""
        self.weight.copy_(plain.weight)
        if plain.bias is not None:
            self.bias.copy_(plain.bias)
        self.mask_real.fill_(MASK_INIT)
        self.train(plain.training)
        return self

    def binary_mask(self) -> Tensor:
        """The {0, 1} mask in use (no autograd)."""
        return (self.mask_real.detach() > THRESHOLD).to(self.weight.dtype)

    def effective_weight(self) -> Tensor:
        """w0 * binarise(mask_real), with autograd to the mask."""
        return self.weight * binarise(self.mask_real)


class PiggybackConv2d(PiggybackMixin, WeightConv2d):
    """nn.Conv2d with a frozen weight and bias and a binarised element-wise weight mask
    (small-input shortcut and merge: weight_layers.WeightConv2d)."""


class PiggybackLinear(PiggybackMixin, WeightLinear):
    """nn.Linear with a frozen weight and bias and a binarised element-wise weight mask."""


PIGGYBACK_LAYER_TYPES = (PiggybackConv2d, PiggybackLinear)
PiggybackLayer = PiggybackConv2d | PiggybackLinear


def piggyback_layers(model: nn.Module) -> Iterator[tuple[str, PiggybackLayer]]:
    """(qualified name, layer) for every Piggyback layer of ``model``, in module order."""
    return layers_of(model, PIGGYBACK_LAYER_TYPES)


def inject_piggyback(model: nn.Module, exclude: Iterable[str] | None = None) -> list[str]:
    """Replace every shareable nn.Conv2d / nn.Linear of ``model`` (in place) by its Piggyback
    layer.

    What is wrapped is ``shareable_layers(model, exclude)``: by default all but the classifier
    head; normalisation layers are never touched. The masks start above the threshold, so the
    model computes what it did. Returns the names wrapped.
    """
    return inject(model, PiggybackConv2d, PiggybackLinear, "Piggyback", exclude)


def merge_piggyback(model: nn.Module) -> nn.Module:
    """Replace every Piggyback layer (in place) by a plain layer with weight w0 * binary mask.

    The merged model computes bit for bit what the Piggyback model computes. Returns ``model``.
    """
    return merge(model, PIGGYBACK_LAYER_TYPES)


def masked_numel(model: nn.Module) -> int:
    """Number of masked weights over the Piggyback layers (the method stores 1 bit each)."""
    layers = layers_or_raise(model, PIGGYBACK_LAYER_TYPES, "Piggyback", "masked_numel")
    return sum(layer.mask_real.numel() for _, layer in layers)


@torch.no_grad()
def kept_fraction(model: nn.Module) -> float:
    """Share of the masked weights that the binary masks keep."""
    layers = layers_or_raise(model, PIGGYBACK_LAYER_TYPES, "Piggyback", "kept_fraction")
    kept = sum(int((layer.mask_real > THRESHOLD).sum()) for _, layer in layers)
    return kept / masked_numel(model)


def trainable_setter(train_norms: bool):
    """requires_grad for a Piggyback fit: the masks and the head, and the normalisation layers
    only with ``train_norms`` (the authors' ``--train_bn``; off by default, as theirs)."""

    def select(model: nn.Module) -> None:
        heads = tuple(f"{name}." for name in classifier_names(model))
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("mask_real") or name.startswith(heads) or train_norms)

    return select


def task_param_count(model: nn.Module, train_norms: bool) -> dict[str, float]:
    """What a Piggyback task stores beyond T0: one bit per masked weight (numel / 32 float32
    parameters), the head, and the normalisation layers if they were trained."""
    if train_norms:
        wrapped = [name for name, _ in piggyback_layers(model)]
        own = split_param_count(model, wrapped)["task_own"]
    else:
        own = head_param_count(model)
    return {"kernels": masked_numel(model) / 32, "task_own": own}


class PiggybackMethod(Method):
    """T0's weights, frozen, times a learned binary mask per weight; a new head per task."""

    name = "piggyback"
    label = "Piggyback"

    def __init__(self, settings: PiggybackSettings):
        self.settings = settings

    @classmethod
    def from_settings(cls, job) -> PiggybackMethod:
        return cls(job.methods.piggyback)

    def train(self, task: str, iteration: int, bank: KernelBank, harness: Harness) -> Trained:
        s = self.settings
        model = harness.new_model(task, iteration)
        inject_piggyback(model)
        harness.step(f"piggyback {task}: {harness.epochs} epoch(s)")
        plan = FitPlan(
            harness.epochs, seed=harness.seed(task, "fit", iteration),
            train=trainable_setter(s.train_norms),
            optimizer=OptimizerPlan(s.optimizer, lr=s.lr, weight_decay=0.0,
                                    groups={"mask_real": s.mask_lr},
                                    lr_key="methods.piggyback.lr",
                                    group_keys={"mask_real": "methods.piggyback.mask_lr"}),
            frozen_norms=not s.train_norms,
        )
        harness.fit(model, task, plan, name=task)
        params = task_param_count(model, s.train_norms)
        info = {"kept_weights": kept_fraction(model)}
        merge_piggyback(model)
        return Trained(model, params=params, info=info)

    def describe(self, info: dict) -> str:
        return f", {100 * info['kept_weights']:.1f}% of weights kept"
