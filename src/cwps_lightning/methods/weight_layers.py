"""The frame shared by layers that compute with a transformed weight (TAPS, Piggyback).

A method's layer is a mixin that defines its state (``_init_state``, ``_start_from``) and
``effective_weight()`` (the weight the layer computes with, with autograd to the method's
parameters); ``WeightConv2d`` / ``WeightLinear`` add what every such layer does the same way:
build from a plain layer on the meta device (no random draws), run the convolution or linear
map on the effective weight, keep the project's small-input shortcut (cwps/small_input.py), and
merge back to a plain layer holding the effective weight bit for bit. ``inject`` / ``merge``
swap a model's shareable layers for a pair of such classes and back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from ..cwps.small_input import SmallInputConv2d
from ..cwps.surgery import replace_module, shareable_layers


def to_buffer(layer: nn.Module, name: str) -> None:
    """Make parameter ``name`` a buffer (frozen, still saved under the same state-dict key)."""
    t = getattr(layer, name)
    if t is not None:
        delattr(layer, name)
        layer.register_buffer(name, t.detach())


class WeightTransform:
    """Merge support for a layer whose mixin defines ``effective_weight()``."""

    weight: Tensor
    bias: Tensor | None

    def effective_weight(self) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The weight the layer computes with now (the same expression, so the same bits)."""
        return self.effective_weight()

    @torch.no_grad()
    def _fill_plain(self, plain: nn.Module):
        plain.weight.copy_(self.merged_weight())
        if self.bias is not None:
            plain.bias.copy_(self.bias)
        plain.train(self.training)
        return plain


class WeightConv2d(WeightTransform, SmallInputConv2d):
    """A Conv2d on ``effective_weight()``. With ``small_input=True`` a convolution with a 1x1
    output runs as a matmul of the taps that meet the input, else as nn.Conv2d runs it;
    ``from_conv`` sets it to whether the wrapped layer is a SmallInputConv2d, so the layer and
    its merge compute exactly what the wrapped layer did."""

    def __init__(self, *args, small_input: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.small_input = small_input
        self._init_state()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d):
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
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def to_plain(self) -> nn.Conv2d:
        """A SmallInputConv2d (small_input) or nn.Conv2d holding the merged weight."""
        conv = (SmallInputConv2d if self.small_input else nn.Conv2d)(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, padding_mode=self.padding_mode,
            device="meta", dtype=self.weight.dtype,
        )
        return self._fill_plain(conv.to_empty(device=self.weight.device))


class WeightLinear(WeightTransform, nn.Linear):
    """An nn.Linear on ``effective_weight()`` (any leading dims)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_state()

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device="meta", dtype=linear.weight.dtype,
        )
        return layer.to_empty(device=linear.weight.device)._start_from(linear)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.effective_weight(), self.bias)

    def to_plain(self) -> nn.Linear:
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device="meta", dtype=self.weight.dtype,
        )
        return self._fill_plain(linear.to_empty(device=self.weight.device))


def layers_of(model: nn.Module, types: tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, layer) for every layer of ``types`` in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, types):
            yield name, module


def layers_or_raise(model: nn.Module, types: tuple[type, ...], method: str,
                    what: str) -> list[tuple[str, nn.Module]]:
    layers = list(layers_of(model, types))
    if not layers:
        raise ValueError(f"{what}: the model has no {method} layers")
    return layers


def inject(model: nn.Module, conv_cls: type[WeightConv2d], linear_cls: type[WeightLinear],
           method: str, exclude: Iterable[str] | None = None) -> list[str]:
    """Replace every shareable nn.Conv2d / nn.Linear of ``model`` (in place) by ``conv_cls`` /
    ``linear_cls``: ``shareable_layers(model, exclude)``, by default all but the classifier
    head. Refuses a model that already has such layers. Returns the names wrapped."""
    already = [n for n, _ in layers_of(model, (conv_cls, linear_cls))]
    if already:
        raise ValueError(
            f"model already has {method} layer(s) (e.g. {already[0]!r}); not wrapping twice"
        )
    # stock forwards only: these layers run nn.Conv2d's convolution on their weight, so a
    # weight-standardised or TF-"SAME" timm conv would silently change what it computes
    names = shareable_layers(model, exclude, transformed=False)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            new = conv_cls.from_conv(module)
        else:
            new = linear_cls.from_linear(module)
        replace_module(model, name, new)
    return names


def merge(model: nn.Module, types: tuple[type, ...]) -> nn.Module:
    """Replace every layer of ``types`` (in place) by its plain layer; returns ``model``."""
    for name, layer in list(layers_of(model, types)):
        replace_module(model, name, layer.to_plain())
    return model
