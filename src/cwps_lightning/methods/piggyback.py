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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from ..cwps.small_input import SmallInputConv2d
from ..cwps.surgery import shareable_layers

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


def _to_buffer(layer: nn.Module, name: str) -> None:
    """Make parameter ``name`` a buffer (frozen, still saved under the same state-dict key)."""
    t = getattr(layer, name)
    if t is not None:
        delattr(layer, name)
        layer.register_buffer(name, t.detach())


class PiggybackMixin:
    """State shared by PiggybackConv2d and PiggybackLinear (see the module docstring)."""

    weight: Tensor
    bias: Tensor | None

    def _init_piggyback(self) -> None:
        _to_buffer(self, "weight")
        _to_buffer(self, "bias")
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

    def masked_weight(self) -> Tensor:
        """w0 * binarise(mask_real), with autograd to the mask."""
        return self.weight * binarise(self.mask_real)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The weight the layer computes with now (the same expression, so the same bits)."""
        return self.masked_weight()

    @torch.no_grad()
    def _fill_plain(self, plain: nn.Module):
        plain.weight.copy_(self.merged_weight())
        if self.bias is not None:
            plain.bias.copy_(self.bias)
        plain.train(self.training)
        return plain


class PiggybackConv2d(PiggybackMixin, SmallInputConv2d):
    """nn.Conv2d with a frozen weight and bias and a binarised element-wise weight mask.

    It subclasses SmallInputConv2d, as CWPSConv2d does. With ``small_input=True`` a convolution
    on a 1x1 map runs as the 1x1 convolution of its centre tap (cwps/small_input.py), else as
    nn.Conv2d runs it. ``from_conv`` sets ``small_input`` to whether the wrapped layer is a
    SmallInputConv2d, so the layer and its merge compute exactly what the wrapped layer did.
    """

    def __init__(self, *args, small_input: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.small_input = small_input
        self._init_piggyback()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PiggybackConv2d:
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
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def to_plain(self) -> nn.Conv2d:
        """A SmallInputConv2d (small_input) or nn.Conv2d holding the merged weight."""
        conv = (SmallInputConv2d if self.small_input else nn.Conv2d)(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, padding_mode=self.padding_mode,
            device="meta", dtype=self.weight.dtype,
        )
        return self._fill_plain(conv.to_empty(device=self.weight.device))


class PiggybackLinear(PiggybackMixin, nn.Linear):
    """nn.Linear with a frozen weight and bias and a binarised element-wise weight mask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_piggyback()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PiggybackLinear:
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device="meta", dtype=linear.weight.dtype,
        )
        return layer.to_empty(device=linear.weight.device)._start_from(linear)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.masked_weight(), self.bias)

    def to_plain(self) -> nn.Linear:
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device="meta", dtype=self.weight.dtype,
        )
        return self._fill_plain(linear.to_empty(device=self.weight.device))


PIGGYBACK_LAYER_TYPES = (PiggybackConv2d, PiggybackLinear)
PiggybackLayer = PiggybackConv2d | PiggybackLinear


def piggyback_layers(model: nn.Module) -> Iterator[tuple[str, PiggybackLayer]]:
    """(qualified name, layer) for every Piggyback layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, PIGGYBACK_LAYER_TYPES):
            yield name, module


def inject_piggyback(model: nn.Module, exclude: Iterable[str] | None = None) -> list[str]:
    """Replace every shareable nn.Conv2d / nn.Linear of ``model`` (in place) by its Piggyback
    layer.

    What is wrapped is ``shareable_layers(model, exclude)``: by default all but the classifier
    head; normalisation layers are never touched. The masks start above the threshold, so the
    model computes what it did. Returns the names wrapped.
    """
    already = [n for n, _ in piggyback_layers(model)]
    if already:
        raise ValueError(
            f"model already has Piggyback layer(s) (e.g. {already[0]!r}); not wrapping twice"
        )
    names = shareable_layers(model, exclude)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            new = PiggybackConv2d.from_conv(module)
        else:
            new = PiggybackLinear.from_linear(module)
        model.set_submodule(name, new)
    return names


def merge_piggyback(model: nn.Module) -> nn.Module:
    """Replace every Piggyback layer (in place) by a plain layer with weight w0 * binary mask.

    The merged model computes bit for bit what the Piggyback model computes. Returns ``model``.
    """
    for name, layer in list(piggyback_layers(model)):
        model.set_submodule(name, layer.to_plain())
    return model


def _layers_or_raise(model: nn.Module, what: str) -> list[tuple[str, PiggybackLayer]]:
    layers = list(piggyback_layers(model))
    if not layers:
        raise ValueError(f"{what}: the model has no Piggyback layers")
    return layers


def masked_numel(model: nn.Module) -> int:
    """Number of masked weights over the Piggyback layers (the method stores 1 bit each)."""
    return sum(layer.mask_real.numel() for _, layer in _layers_or_raise(model, "masked_numel"))


@torch.no_grad()
def kept_fraction(model: nn.Module) -> float:
    """Share of the masked weights that the binary masks keep."""
    layers = _layers_or_raise(model, "kept_fraction")
    kept = sum(int((layer.mask_real > THRESHOLD).sum()) for _, layer in layers)
    return kept / masked_numel(model)
