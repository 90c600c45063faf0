"""CWPS layers for timm's convolutions that transform their weight or their input.

timm's ``StdConv2d`` / ``StdConv2dSame`` standardise every output channel's kernel before the
convolution (weight standardisation, BiT ResNet-V2 and ViT hybrids), ``ScaledStdConv2d`` /
``ScaledStdConv2dSame`` also scale it by ``gain * scale`` (NFNets), and ``Conv2dSame`` and the
``*Same`` variants pad the input the TensorFlow way, from its size (tf_efficientnet). These act
per output channel or on the input, so composing the raw kernels first and transforming after,

    y = conv(pad(x), T(m * w_child + (1 - m) * w_parent)),

merges exactly: under a 0/1 mask, T of the composed weight is T(child) on kept channels and
T(parent) on shared ones, which is what the original class computes holding the selected raw
kernels. ``to_plain`` rebuilds that class; the bank and store keep raw kernels, as for the
stock layers.

These layers run plain autograd (compose with torch ops, then the layer's own transform and
padding, then F.conv2d) instead of layers._ComposedOp: exactness over speed, and the
transform's backward comes from autograd. The masks match the stock layers: m = sigmoid(s) in
the soft stage; in the hard stage 1[sigmoid(s) >= threshold] in the forward and, straight
through, dL/ds = dL/dm * sigmoid'(s) in the backward.

``gain`` (Scaled variants) is the task's own, like a normalisation layer's affine weight: it
is not composed, keeps its state-dict name and lands in the bank's ``rest``. Sharing it with
the kernel would need a parent gain the bank does not track; the merge is exact either way.

The core does not import timm (it is slow to import): classes are matched by dotted name and
timm is imported only when a layer is rebuilt or padded, i.e. when a timm model exists.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import CWPSConv2d, _stage_mask, mask_slope


class _StraightThrough(torch.autograd.Function):
    """The hard mask in the forward (exact 0/1), dL/ds = dL/dm * slope in the backward.

    A function rather than ``hard + sig - sig.detach()``: that sum rounds, so the kept
    channels would not be the child's bits and the merge would not be exact.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, threshold: float, mask_grad: str = "sigmoid") -> Tensor:
        mask, sig = _stage_mask(logits, True, threshold)
        ctx.save_for_backward(mask_slope(sig, True, mask_grad))  # as layers._ComposedOp
        return mask

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None


@functools.cache
def _resolve(path: str) -> Any:
    """The object a dotted name points to (imports its module)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _standardise(w: Tensor, eps: float, gain: Tensor | None = None) -> Tensor:
    """timm's weight standardisation of every output channel (the same call, same numbers)."""
    return F.batch_norm(
        w.reshape(1, w.shape[0], -1), None, None, weight=gain, training=True, momentum=0.0,
        eps=eps,
    ).reshape_as(w)


class TransformedCWPSConv2d(CWPSConv2d):
    """A CWPSConv2d that runs a timm convolution's own padding and weight transform.

    Subclasses name the timm class (``source``), the plain attributes it needs (``attrs``,
    copied from and back to it) and its parameters that stay the task's own (``own_params``);
    they override ``_transform`` and set ``same_pad``. Built with ``from_conv``; the class
    defaults follow timm's constructors.
    """

    source: ClassVar[str]
    attrs: ClassVar[tuple[str, ...]] = ()
    own_params: ClassVar[tuple[str, ...]] = ()
    same_pad: bool = False  # pad the input TF "SAME" style, from its size

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, threshold: float = 0.5, mask_grad: str = "sigmoid",
                  *, take: bool = False, fill_parent: bool = True) -> TransformedCWPSConv2d:
        if _class_path(type(conv)) != cls.source:
            raise TypeError(f"{cls.__name__} wraps {cls.source}, got {type(conv).__name__}")
        return super().from_conv(conv, threshold=threshold, mask_grad=mask_grad, take=take,
                                 fill_parent=fill_parent)

    def _copy_extras(self, src: nn.Module, dst: nn.Module) -> None:
        for name in self.attrs:
            setattr(dst, name, getattr(src, name))
        for name in self.own_params:
            p, q = getattr(src, name), getattr(dst, name)
            q.copy_(p)
            q.requires_grad_(p.requires_grad)

    @torch.no_grad()
    def _start_from(self, plain: nn.Module, take: bool = False, fill_parent: bool = True):
        super()._start_from(plain, take, fill_parent)
        self._copy_extras(plain, self)
        return self

    def _transform(self, w: Tensor) -> Tensor:
        return w

    def _pad(self, x: Tensor) -> Tensor:
        if not self.same_pad:
            return x
        return _resolve("timm.layers.padding.pad_same")(
            x, self.kernel_size, self.stride, self.dilation
        )

    def _stage_weights(self) -> tuple[Tensor, Tensor | None]:
        """The raw weight and bias of the current stage (before ``_transform``)."""
        if self.stage == "finetune":
            return self.weight, self.bias
        self._check_parent_set()
        if self.stage == "soft":
            m = torch.sigmoid(self.mask_logits)
        else:
            m = _StraightThrough.apply(self.mask_logits, self.threshold, self.mask_grad)
        # lerp is exact at m = 0 and m = 1: kept channels are the child's bits (as in the merge)
        w = torch.lerp(self.parent_weight, self.weight, m.view(-1, 1, 1, 1))
        b = None if self.bias is None else torch.lerp(self.parent_bias, self.bias, m)
        return w, b

    def forward(self, x: Tensor) -> Tensor:
        w, b = self._stage_weights()
        x = self._pad(x)
        return F.conv2d(x, self._transform(w), b, self.stride, self.padding, self.dilation,
                        self.groups)

    def to_plain(self) -> nn.Conv2d:
        """The timm class itself, holding the merged raw weights (and its own attributes)."""
        conv = _resolve(self.source)(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, device="meta", dtype=self.weight.dtype,
        ).to_empty(device=self.weight.device)
        with torch.no_grad():
            self._copy_extras(self, conv)
        return self._fill_plain(conv)


class CWPSConv2dSame(TransformedCWPSConv2d):
    """timm ``Conv2dSame``: TF "SAME" padding computed from the input size, then a conv."""

    source = "timm.layers.conv2d_same.Conv2dSame"
    same_pad = True  # always (Conv2dSame has no flag)


class CWPSStdConv2d(TransformedCWPSConv2d):
    """timm ``StdConv2d``: every output channel's kernel standardised (the layer's eps)."""

    source = "timm.layers.std_conv.StdConv2d"
    attrs = ("eps",)
    eps = 1e-6

    def _transform(self, w: Tensor) -> Tensor:
        return _standardise(w, self.eps)


class CWPSStdConv2dSame(CWPSStdConv2d):
    """timm ``StdConv2dSame``: StdConv2d with TF "SAME" padding where it is dynamic."""

    source = "timm.layers.std_conv.StdConv2dSame"
    attrs = ("eps", "same_pad")
    same_pad = True


class CWPSScaledStdConv2d(TransformedCWPSConv2d):
    """timm ``ScaledStdConv2d``: standardised kernels times ``gain * scale`` per channel.

    ``gain`` [C, 1, 1, 1] stays the task's own parameter (see module docstring).
    """

    source = "timm.layers.std_conv.ScaledStdConv2d"
    attrs = ("eps", "scale", "gain_init")
    own_params = ("gain",)
    eps = 1e-6
    gain_init = 1.0

    def _init_cwps(self, threshold: float, mask_grad: str = "sigmoid") -> None:
        # registered before the CWPS state: the parameters keep the timm layer's order
        self.gain = nn.Parameter(torch.full(
            (self.out_channels, 1, 1, 1), self.gain_init, device=self.weight.device,
            dtype=self.weight.dtype,
        ))
        self.scale = self.weight[0].numel() ** -0.5  # timm's default (gamma = 1)
        super()._init_cwps(threshold, mask_grad)

    def _transform(self, w: Tensor) -> Tensor:
        return _standardise(w, self.eps, (self.gain * self.scale).view(-1))


class CWPSScaledStdConv2dSame(CWPSScaledStdConv2d):
    """timm ``ScaledStdConv2dSame``: ScaledStdConv2d with TF "SAME" padding where dynamic."""

    source = "timm.layers.std_conv.ScaledStdConv2dSame"
    attrs = ("eps", "scale", "gain_init", "same_pad")
    same_pad = True


#: timm class (dotted name) -> the CWPS class that wraps it exactly
TRANSFORMED_CONVS: dict[str, type[TransformedCWPSConv2d]] = {
    cls.source: cls
    for cls in (
        CWPSConv2dSame, CWPSStdConv2d, CWPSStdConv2dSame, CWPSScaledStdConv2d,
        CWPSScaledStdConv2dSame,
    )
}


def transformed_class(module: nn.Module) -> type[TransformedCWPSConv2d] | None:
    """The CWPS class for ``module``'s exact class, or None (subclasses are not matched:
    their forward may differ)."""
    return TRANSFORMED_CONVS.get(_class_path(type(module)))
