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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from ..cwps.small_input import SmallInputConv2d
from ..cwps.surgery import shareable_layers

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


def _weight_to_buffer(layer: nn.Module) -> None:
    """Make ``weight`` a buffer (frozen, still saved under the same state-dict key)."""
    w = layer.weight.detach()
    del layer.weight
    layer.register_buffer("weight", w)


class TAPSMixin:
    """State shared by TAPSConv2d and TAPSLinear (see the module docstring)."""

    weight: Tensor
    bias: nn.Parameter | None

    def _init_taps(self) -> None:
        _weight_to_buffer(self)
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

    def composed_weight(self) -> Tensor:
        """w0 + gate_ste(s) * dw, with autograd to dw and s."""
        return self.weight + gate_ste(self.gate) * self.residual

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The weight the layer computes with now (the same expression, so the same bits)."""
        return self.composed_weight()

    @torch.no_grad()
    def _fill_plain(self, plain: nn.Module):
        plain.weight.copy_(self.merged_weight())
        if self.bias is not None:
            plain.bias.copy_(self.bias)
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate={float(self.gate.detach()):.4g}"


class TAPSConv2d(TAPSMixin, SmallInputConv2d):
    """nn.Conv2d with a frozen base weight, a gated residual and one gate score.

    It subclasses SmallInputConv2d, as CWPSConv2d does. With ``small_input=True`` a convolution
    on a 1x1 map runs as the 1x1 convolution of its centre tap (cwps/small_input.py), else as
    nn.Conv2d runs it. ``from_conv`` sets ``small_input`` to whether the wrapped layer is a
    SmallInputConv2d, so the TAPS layer and its merge compute exactly what the wrapped layer did.
    """

    def __init__(self, *args, small_input: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.small_input = small_input
        self._init_taps()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> TAPSConv2d:
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device="meta", dtype=conv.weight.dtype,
            small_input=isinstance(conv, SmallInputConv2d),
        )
        return layer.to_empty(device=conv.weight.device)._start_from(conv)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.small_input:
            return super()._conv_forward(x, weight, bias)
        return nn.Conv2d._conv_forward(self, x, weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.composed_weight(), self.bias)

    def to_plain(self) -> nn.Conv2d:
        """A SmallInputConv2d (small_input) or nn.Conv2d holding the merged weight."""
        conv = (SmallInputConv2d if self.small_input else nn.Conv2d)(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, padding_mode=self.padding_mode,
            device="meta", dtype=self.weight.dtype,
        )
        return self._fill_plain(conv.to_empty(device=self.weight.device))


class TAPSLinear(TAPSMixin, nn.Linear):
    """nn.Linear with a frozen base weight, a gated residual and one gate score."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_taps()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> TAPSLinear:
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device="meta", dtype=linear.weight.dtype,
        )
        return layer.to_empty(device=linear.weight.device)._start_from(linear)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.composed_weight(), self.bias)

    def to_plain(self) -> nn.Linear:
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device="meta", dtype=self.weight.dtype,
        )
        return self._fill_plain(linear.to_empty(device=self.weight.device))


TAPS_LAYER_TYPES = (TAPSConv2d, TAPSLinear)
TAPSLayer = TAPSConv2d | TAPSLinear


def taps_layers(model: nn.Module) -> Iterator[tuple[str, TAPSLayer]]:
    """(qualified name, layer) for every TAPS layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, TAPS_LAYER_TYPES):
            yield name, module


def inject_taps(model: nn.Module, exclude: Iterable[str] | None = None) -> list[str]:
    """Replace every shareable nn.Conv2d / nn.Linear of ``model`` (in place) by its TAPS layer.

    What is wrapped is ``shareable_layers(model, exclude)``: by default all but the classifier
    head; normalisation layers are never touched. The new layers start with dw = 0 and the gate
    open (GATE_INIT >= THRESHOLD), so the model computes what it did. Returns the names.
    """
    already = [n for n, _ in taps_layers(model)]
    if already:
        raise ValueError(f"model already has TAPS layer(s) (e.g. {already[0]!r}); not wrapping twice")
    names = shareable_layers(model, exclude)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            new = TAPSConv2d.from_conv(module)
        else:
            new = TAPSLinear.from_linear(module)
        model.set_submodule(name, new)
    return names


def merge_taps(model: nn.Module) -> nn.Module:
    """Replace every TAPS layer (in place) by a plain layer with weight w0 + 1[open] * dw.

    The merged model computes bit for bit what the TAPS model computes. Returns ``model``.
    """
    for name, layer in list(taps_layers(model)):
        model.set_submodule(name, layer.to_plain())
    return model


def _layers_or_raise(model: nn.Module, what: str) -> list[tuple[str, TAPSLayer]]:
    layers = list(taps_layers(model))
    if not layers:
        raise ValueError(f"{what}: the model has no TAPS layers")
    return layers


def gate_penalty(model: nn.Module) -> Tensor:
    """Mean over the TAPS layers of |s| (the sparsity term; the authors' ``train`` sums the
    |indicator| of their 52 ResNet-50 layers and divides by 52)."""
    layers = _layers_or_raise(model, "gate_penalty")
    return torch.stack([layer.gate.abs() for _, layer in layers]).mean()


def open_gates(model: nn.Module) -> dict[str, bool]:
    """{layer name: True where the layer uses its residual (s >= THRESHOLD)}."""
    return {name: layer.is_open() for name, layer in _layers_or_raise(model, "open_gates")}
