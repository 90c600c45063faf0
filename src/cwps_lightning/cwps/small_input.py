"""Convolutions whose output is 1x1, computed as the matrix product they are.

When a convolution's output is a single pixel (resnet18's last stage at 32x32 input: 3x3
convolutions on 1x1 maps, and the stride-2 3x3 and 1x1 convolutions from 2x2 maps to 1x1), each
output channel is one dot product of the kernel taps that meet the input (the others meet zero
padding) with the input pixels they meet. ``live_window`` names those taps and pixels, and the
convolution runs as one matmul of the flattened window: oneDNN, PyTorch's CPU backend, does the
full kernel's work instead, and is slow at these shapes. Forward + backward at batch 32,
channels_last, on this project's 2-core CPU (AMD EPYC, AVX2): the stride-2 3x3 conv 256 -> 512
from a 2x2 map to 1x1 takes 37.7 ms as nn.Conv2d, 17.5 ms as the conv of its 2x2 window and
2.0 ms as the matmul; a 3x3 conv 512 -> 512 on a 1x1 map 4.5 ms as the 1x1 conv of its
centre tap (this module's earlier shortcut) and 1.1 ms as the matmul.

``SmallInputConv2d`` is an ``nn.Conv2d`` that takes the shortcut when it applies (same
parameters, same state-dict keys, the same result up to float rounding; the taps outside the
window get the zero gradient they get anyway, written straight into a gradient with the
weight's own memory format), and ``use_small_input_convs`` switches a model's plain
``nn.Conv2d`` layers to it in place. CWPSConv2d takes the same shortcut inside its own autograd
function (``WindowOp`` is shared).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autocast import autocast_dtype, run_plain


@dataclass(frozen=True)
class Window:
    """The kernel taps that meet the input of a convolution with a 1x1 output, and the input
    pixels they meet: (start, stop) of the taps and (start, stop, step) of the pixels, per
    spatial dim (the pixels' step is the dilation)."""

    taps: tuple[tuple[int, int], tuple[int, int]]
    pixels: tuple[tuple[int, int, int], tuple[int, int, int]]

    def kernel(self, weight: Tensor) -> Tensor:
        """weight[:, :, taps], a view."""
        (r0, r1), (c0, c1) = self.taps
        return weight[:, :, r0:r1, c0:c1]

    def crop(self, x: Tensor) -> Tensor:
        """x[..., pixels], a view."""
        (r0, r1, rs), (c0, c1, cs) = self.pixels
        return x[..., r0:r1:rs, c0:c1:cs]


def live_window(
    input_hw: Sequence[int],
    kernel_hw: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Window | None:
    """The Window of a zero-padded convolution whose output is 1x1, or None if the output is
    not 1x1 (or no tap meets the input)."""
    taps, pixels = [], []
    for n, k, s, p, d in zip(input_hw, kernel_hw, stride, padding, dilation, strict=True):
        span = n - 1 + 2 * p - d * (k - 1)  # output size is span // s + 1
        if span < 0 or span >= s:
            return None
        lo = max(0, -(-p // d))  # first tap i with i * d - p >= 0
        hi = min(k - 1, (n - 1 + p) // d)  # last tap with i * d - p <= n - 1
        if lo > hi:
            return None
        taps.append((lo, hi + 1))
        pixels.append((lo * d - p, hi * d - p + 1, d))
    return Window(taps=tuple(taps), pixels=tuple(pixels))


def _flat(t: Tensor) -> Tensor:
    """[A, C, h, w] -> [A, h * w * C]: the channels_last order, so a channels_last tensor
    (activations, kernels) flattens without a copy."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)


def _flat_kernel(w: Tensor) -> Tensor:
    """_flat of the window's taps as a matrix with unit stride along its rows. A one-tap
    window of an NCHW kernel flattens to a view with row stride kh * kw; the matmul would copy
    it anyway, but into the transposed layout, and a dense window (CWPS composes a copy of the
    taps) would then take another BLAS kernel, with other rounding on some CPUs (seen on an
    Intel AVX-512 one). Copied here, both layouts take the same kernel."""
    m = _flat(w)
    return m if m.stride(-1) == 1 else m.contiguous()


def _unflat(m: Tensor, shape: Sequence[int]) -> Tensor:
    """The inverse of _flat: [A, h * w * C] -> [A, C, h, w] (channels_last strides)."""
    a, c, h, w = shape
    return m.view(a, h, w, c).permute(0, 3, 1, 2)


class WindowOp:
    """y = conv(x, w) for a convolution with a 1x1 output, on the window's taps ``w`` only.

    ``forward(x, w, b)`` and ``backward(grad, x, w, has_bias, need_x)`` -> (grad_x, grad_w,
    grad_b) take the full input x and the kernel's window taps w (as layers._ComposedOp's
    ops do). groups == 1 runs as one matmul; grouped convolutions as the convolution of the
    cropped input with the window's kernel (no padding, a 1x1 output).
    """

    def __init__(self, window: Window, groups: int):
        self.window, self.groups = window, groups

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        xc = self.window.crop(x)
        if self.groups == 1:
            y = F.linear(_flat(xc), _flat_kernel(w), b)
            return y.view(*y.shape, 1, 1)
        return F.conv2d(xc, w, b, 1, 0, 1, self.groups)

    def backward(self, g: Tensor, x: Tensor, w: Tensor, has_bias: bool, need_x: bool):
        xc = self.window.crop(x)
        gxc = None
        if self.groups == 1:
            g2 = g.reshape(g.shape[0], g.shape[1])
            gw = _unflat(g2.t() @ _flat(xc), w.shape)
            gb = g2.sum(0) if has_bias else None
            if need_x:
                gxc = _unflat(g2 @ _flat_kernel(w), xc.shape)
        else:
            gxc, gw, gb = torch.ops.aten.convolution_backward(
                g, xc, w, [w.shape[0]] if has_bias else None, [1, 1], [0, 0], [1, 1],
                False, [0, 0], self.groups, [need_x, True, has_bias],
            )
        gx = None
        if need_x:
            if xc.shape == x.shape:  # the window meets every pixel
                gx = gxc
            else:  # pixels outside the window met no tap
                gx = torch.zeros_like(x)
                self.window.crop(gx).copy_(gxc)
        return gx, gw, gb


def own_output(y: Tensor) -> Tensor:
    """``y`` as a custom Function returns it: a copy where it is a view (WindowOp's matmul
    output seen as N x C x 1 x 1). Autograd forbids modifying a view made inside a Function in
    place, and an in-place activation right after a conv with a 1x1 output is common (the
    squeeze-excite blocks of MobileNetV3 / EfficientNet: ReLU(inplace=True) after the pooled
    conv), so such a model did not train. The copy is N x C numbers. (CWPSLinear's Function
    takes a 2-D input instead, whose product is not a view: no copy of a larger output.)"""
    return y.clone() if y._base is not None else y


class _WindowConv(torch.autograd.Function):
    """A plain convolution with a 1x1 output on its window (SmallInputConv2d): the weight's
    gradient is full-size with the weight's memory format, zero outside the window."""

    @staticmethod
    def forward(ctx, x, weight, bias, op):
        w = op.window.kernel(weight)
        cast = autocast_dtype(x.device.type)
        if cast is None:
            xc = x
            y = op.forward(x, w, bias)
        else:  # autocast does not reach inside a Function: cast as it would for a conv
            xc, w = x.to(cast), w.to(cast)
            b = None if bias is None else bias.to(cast)
            y = run_plain(x.device.type, op.forward, xc, w, b)
        y = own_output(y)
        ctx.save_for_backward(xc, w, weight)
        ctx.op, ctx.has_bias, ctx.x_dtype = op, bias is not None, x.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xc, w, weight = ctx.saved_tensors
        if grad_y.dtype != xc.dtype:
            grad_y = grad_y.to(xc.dtype)
        gx, gw, gb = ctx.op.backward(grad_y, xc, w, ctx.has_bias, ctx.needs_input_grad[0])
        if gx is not None and gx.dtype != ctx.x_dtype:
            gx = gx.to(ctx.x_dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            ctx.op.window.kernel(grad_weight).copy_(gw)
        if gb is not None and gb.dtype != ctx.b_dtype:
            gb = gb.to(ctx.b_dtype)
        return gx, grad_weight, gb if ctx.needs_input_grad[2] else None, None


def window_conv(x: Tensor, weight: Tensor, bias: Tensor | None, window: Window,
                groups: int) -> Tensor:
    """conv2d(x, weight, bias) for a convolution whose output is 1x1 (its ``window``)."""
    return _WindowConv.apply(x, weight, bias, WindowOp(window, groups))


class SmallInputConv2d(nn.Conv2d):
    """nn.Conv2d that computes a convolution with a 1x1 output on its window (see module)."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode == "zeros" and not isinstance(self.padding, str) and x.dim() == 4:
            window = live_window(x.shape[-2:], weight.shape[-2:], self.stride, self.padding,
                                 self.dilation)
            if window is not None:
                return window_conv(x, weight, bias, window, self.groups)
        return super()._conv_forward(x, weight, bias)


def use_small_input_convs(model: nn.Module) -> int:
    """Switch every plain nn.Conv2d of ``model`` to SmallInputConv2d in place (the class only:
    parameters, buffers and hooks stay). Returns how many were switched."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = SmallInputConv2d
            n += 1
    return n
