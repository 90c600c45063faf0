"""CWPS layers: drop-in Conv2d / Linear with a child weight, a frozen composite parent and a
per-output-channel mask (paper section 3.2.3-3.2.4).

The forward composes the weight once (paper Eq. 6/7),

    w = m * w_child + (1 - m) * w_parent,    b = m * b_child + (1 - m) * b_parent,

and runs ONE convolution / matmul. This is the same function as the paper's two-pass Eq. 8
(the layer is linear in its weights) with the same gradients for the child and the mask, at the
cost of the plain layer. A custom autograd function recomputes ``w`` in the backward instead of
keeping it alive between forward and backward, so training memory matches plain fine-tuning.

Stages:
  finetune  a plain layer on the child weights (the warm-up fine-tune);
  soft      m = sigmoid(mask_logits)                                     (Eq. 9);
  hard      m = 1[sigmoid(mask_logits) >= threshold] in the forward       (Eq. 10/11),
            straight-through in the backward: dL/ds = dL/dm * sigmoid'(s) (mask_grad
            "sigmoid", the paper's), or dL/ds = dL/dm (mask_grad "identity", the plain
            straight-through estimator TAPS uses: no sigmoid slope to damp the score's update).

Every layer remembers its hard decisions (sigmoid(s) >= lambda) at the moment it enters the
soft and the hard stage, so the channels a mask fit flips can be counted afterwards
(surgery.mask_flips).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .small_input import SmallInputConv2d, centre_tap, tap_slice

STAGES = ("finetune", "soft", "hard")
#: the hard stage's gradient to the mask scores: through sigmoid' (paper) or straight (TAPS)
MASK_GRADS = ("sigmoid", "identity")


def check_mask_grad(mask_grad: str) -> str:
    if mask_grad not in MASK_GRADS:
        raise ValueError(f"mask_grad must be one of {list(MASK_GRADS)}, got {mask_grad!r}")
    return mask_grad


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not (0.0 <= threshold <= 1.0) or math.isnan(threshold):
        raise ValueError(f"threshold (lambda) must be in [0, 1], got {threshold}")
    return threshold


def hard_mask(mask_logits: Tensor, threshold: float) -> Tensor:
    """1 where a channel is task-specific (sigmoid(s) >= lambda), 0 where it is shared."""
    return _binarise(torch.sigmoid(mask_logits), threshold)


def _binarise(sig: Tensor, threshold: float) -> Tensor:
    """The hard-stage rule on sigmoid(s): a tie at lambda is task-specific."""
    return (sig >= threshold).to(sig.dtype)


def _stage_mask(logits: Tensor, hard: bool, threshold: float) -> tuple[Tensor, Tensor]:
    """The mask the stage uses in the forward, and sigmoid(logits)."""
    sig = torch.sigmoid(logits)
    return (_binarise(sig, threshold) if hard else sig), sig


def mask_slope(sig: Tensor, hard: bool, mask_grad: str = "sigmoid") -> Tensor:
    """dm/ds as the backward uses it: sigmoid'(s), or 1 in the hard stage with "identity"."""
    if hard and mask_grad == "identity":
        return torch.ones_like(sig)
    return sig * (1.0 - sig)


def _compose(
    child: Tensor, parent: Tensor, mask: Tensor, binary: bool = False, out: Tensor | None = None
) -> Tensor:
    """parent + m * (child - parent), with m broadcast along dim 0 (output channels).

    ``lerp`` does it in one pass over the weights (addcmul on a difference takes two and an
    extra buffer), which matters: this runs twice per layer and step. ``binary=True`` selects
    instead, so kept channels equal the child bit for bit (used for the merge).
    """
    m = mask.view(-1, *([1] * (child.dim() - 1)))
    if binary:
        return torch.where(m.bool(), child, parent)
    return torch.lerp(parent, child, m.to(parent.dtype), out=out)


class _Scratch(threading.local):
    """One reusable buffer per thread, device and dtype for the composed weight.

    The composed weight lives only for one conv/linear call (forward) or one conv backward plus
    the mask gradient (backward), and layers run one after the other, so every layer can write
    it into the same memory. On CPU this matters for speed: a fresh weight-sized allocation per
    layer and pass costs page faults that take longer than the compose itself (measured on
    resnet18: 47 ms -> 19 ms for the backward's weight-sized work per step). CUDA's caching
    allocator already reuses memory, so other devices allocate normally.
    """

    def __init__(self):
        self.buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def like(self, t: Tensor) -> Tensor:
        dense = t.is_contiguous() or (
            t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
        )
        if t.device.type != "cpu" or not dense:
            return torch.empty_like(t)
        key = (t.device, t.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < t.numel():
            buf = self.buffers[key] = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
        # same shape and strides as t (channels_last weights stay channels_last)
        return buf.as_strided(t.shape, t.stride())


_SCRATCH = _Scratch()


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _run_plain(device_type: str, fn, *args):
    """Run ``fn`` outside autocast: its inputs are already cast the way autocast would."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return fn(*args)
    return fn(*args)


class _ComposedOp(torch.autograd.Function):
    """y = op(x, compose(child, parent, mask)) with the composed weight recomputed in backward.

    ``op`` is a small object with ``forward(x, w, b)``,
    ``backward(grad, x, w, has_bias, need_x)`` returning (grad_x, grad_w, grad_b), and
    ``reduce(x, w)`` returning the op to run and the kernel tap it needs (None: all of the
    weight); see _ConvOp and _LinearOp. The per-channel mask and sigmoid slope are kept from
    the forward (C numbers each), so the backward only redoes the weight-sized compose.
    """

    @staticmethod
    def forward(ctx: Any, x, w_child, b_child, logits, w_parent, b_parent, hard, threshold, op,
                mask_grad="sigmoid"):
        mask, sig = _stage_mask(logits, hard, threshold)  # no autograd inside forward
        m = mask.to(w_parent.dtype).view(-1, *([1] * (w_child.dim() - 1)))
        # a conv on a 1x1 map uses one kernel tap: compose and convolve only that (small_input)
        op, tap = op.reduce(x, w_child)
        wc, wp = _weight_part(w_child, tap), _weight_part(w_parent, tap)
        # w is dead once the op has run (nothing inside a Function forward keeps it): scratch
        w = _compose(wc, wp, m, out=_SCRATCH.like(wc))
        b = None if b_child is None else _compose(b_child, b_parent, m)
        # Autocast does not reach inside a Function: cast the way it would for conv/linear.
        cast = _autocast_dtype(x.device.type)
        if cast is None:
            xc = x
            y = op.forward(x, w, b)
        else:
            xc = x.to(cast)
            bc = None if b is None else b.to(cast)
            y = _run_plain(x.device.type, op.forward, xc, w.to(cast), bc)
        ctx.save_for_backward(xc, w_child, b_child, w_parent, b_parent)
        ctx.mask, ctx.op, ctx.tap, ctx.x_dtype = m, op, tap, x.dtype
        # straight-through in the hard stage: dmask/dlogits as mask_slope says
        ctx.slope = mask_slope(sig, hard, mask_grad) if ctx.needs_input_grad[3] else None
        return y

    @staticmethod
    def backward(ctx: Any, grad_y):
        xc, w_child, b_child, w_parent, b_parent = ctx.saved_tensors
        m, tap = ctx.mask, ctx.tap
        wc, wp = _weight_part(w_child, tap), _weight_part(w_parent, tap)
        w = _compose(wc, wp, m, out=_SCRATCH.like(wc))
        has_bias = b_child is not None
        gx, gw, gb = _run_plain(
            xc.device.type, ctx.op.backward, grad_y.to(xc.dtype), xc, w.to(xc.dtype), has_bias,
            ctx.needs_input_grad[0],
        )
        if gx is not None:
            gx = gx.to(ctx.x_dtype)
        grad_child = grad_logits = grad_b_child = None
        gw = gw.to(w_child.dtype)
        if has_bias:
            gb = gb.to(b_child.dtype)
        if ctx.needs_input_grad[3]:
            # dL/dm_j = <dL/dw_j, child_j - parent_j> + dL/db_j * (b_child_j - b_parent_j);
            # the composed weight is dead after the conv backward: reuse its buffer
            dm = torch.sub(wc, wp, out=w).mul_(gw).flatten(1).sum(1)
            if has_bias:
                dm.addcmul_(gb, b_child - b_parent)
            grad_logits = dm.mul_(ctx.slope)
        if ctx.needs_input_grad[1]:
            grad_child = gw.mul_(m)  # in place: gw is not needed any more
            if tap is not None:  # the other taps only ever met zero padding
                full = torch.zeros_like(w_child)
                tap_slice(full, tap).copy_(grad_child)
                grad_child = full
        if has_bias and ctx.needs_input_grad[2]:
            grad_b_child = gb * m.view(-1)
        return gx, grad_child, grad_b_child, grad_logits, None, None, None, None, None, None


def _weight_part(w: Tensor, tap: tuple[int, int] | None) -> Tensor:
    """``w``, or the view of its kernel tap ``tap``."""
    return w if tap is None else tap_slice(w, tap)


class _ConvOp:
    def __init__(self, stride, padding, dilation, groups):
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def reduce(self, x, w):
        """(op, tap): on a 1x1 input that meets one kernel tap only, the 1x1 convolution of
        that tap (see small_input.py) and the tap; else (self, None)."""
        tap = centre_tap(x.shape[-2:], w.shape[-2:], self.stride, self.padding, self.dilation)
        if tap is None:
            return self, None
        return _ConvOp((1, 1), (0, 0), (1, 1), self.groups), tap

    def forward(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, g, x, w, has_bias, need_x):
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, w, [w.shape[0]] if has_bias else None,
            list(self.stride), list(self.padding), list(self.dilation),
            False, [0, 0], self.groups, [need_x, True, has_bias],
        )
        return gx, gw, gb


class _LinearOp:
    def reduce(self, x, w):
        return self, None

    def forward(self, x, w, b):
        return F.linear(x, w, b)

    def backward(self, g, x, w, has_bias, need_x):
        gx = g @ w if need_x else None
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        gw = g2.t() @ x2
        gb = g2.sum(0) if has_bias else None
        return gx, gw, gb


_LINEAR_OP = _LinearOp()


class CWPSMixin:
    """State and behaviour shared by CWPSConv2d and CWPSLinear.

    ``weight``/``bias`` are the child (state-dict names of the wrapped layer are kept, so a
    checkpoint of the plain backbone still loads); ``parent_weight``/``parent_bias`` are frozen
    buffers; ``mask_logits`` has one entry per output channel.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_cwps(self, threshold: float, mask_grad: str = "sigmoid") -> None:
        out = self.weight.shape[0]
        self.register_buffer("parent_weight", self.weight.detach().clone())
        self.register_buffer(
            "parent_bias", None if self.bias is None else self.bias.detach().clone()
        )
        self.mask_logits = nn.Parameter(
            torch.zeros(out, device=self.weight.device, dtype=self.weight.dtype)
        )
        self.threshold = threshold
        self.mask_grad = check_mask_grad(mask_grad)
        #: hard decisions (bool per channel) when the layer entered "soft" / "hard"
        self.decisions: dict[str, Tensor] = {}
        self.stage = "finetune"

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check_threshold(value)

    @torch.no_grad()
    def _start_from(self, plain: nn.Module):
        """Child and parent both start as ``plain``'s weights (the T0 / warm-up weights).

        ``from_conv``/``from_linear`` build the layer on the meta device and allocate it empty,
        so every tensor is filled here: wrapping a model skips the default initialisation's
        work and draws no random numbers (the data order of the fit that follows is the one it
        would have been without the surgery).
        """
        self.weight.copy_(plain.weight)
        self.mask_logits.zero_()
        self.parent_weight.copy_(plain.weight)
        if plain.bias is not None:
            self.bias.copy_(plain.bias)
            self.parent_bias.copy_(plain.bias)
        self.weight.requires_grad_(plain.weight.requires_grad)
        self.train(plain.training)
        return self

    @torch.no_grad()
    def _fill_plain(self, plain: nn.Module):
        """Give a plain layer of the same shape (allocated empty) the merged weights."""
        w, b = self.merged_weights()
        plain.weight.copy_(w)
        if b is not None:
            plain.bias.copy_(b)
        plain.train(self.training)
        return plain

    # -- stage -------------------------------------------------------------------------------
    @property
    def stage(self) -> str:
        return self._stage

    @stage.setter
    def stage(self, value: str) -> None:
        if value not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {value!r}")
        if value != "finetune" and value != getattr(self, "_stage", None):
            self.decisions[value] = self.decision()
        self._stage = value

    @torch.no_grad()
    def decision(self) -> Tensor:
        """Bool per channel: sigmoid(s) >= lambda now, whatever the stage."""
        return hard_mask(self.mask_logits.detach(), self.threshold).bool().cpu()

    def set_parent(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Install the frozen composite parent (copied; never trained)."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"parent weight shape {tuple(weight.shape)} != layer weight shape "
                f"{tuple(self.weight.shape)}"
            )
        self.parent_weight.copy_(weight.detach())
        if self.bias is not None:
            if bias is None:
                raise ValueError("this layer has a bias: set_parent needs a parent bias")
            self.parent_bias.copy_(bias.detach())
        elif bias is not None:
            raise ValueError("this layer has no bias: set_parent got a parent bias")

    def mask(self) -> Tensor:
        """The mask of the current stage (all ones in finetune)."""
        if self.stage == "finetune":
            return torch.ones_like(self.mask_logits)
        if self.stage == "soft":
            return torch.sigmoid(self.mask_logits)
        return hard_mask(self.mask_logits, self.threshold)

    def task_specific(self) -> Tensor:
        """Bool per output channel: True where the merged layer keeps the child's kernel."""
        if self.stage == "finetune":
            return torch.ones_like(self.mask_logits, dtype=torch.bool)
        return hard_mask(self.mask_logits.detach(), self.threshold).bool()

    @torch.no_grad()
    def merged_weights(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias after the post-training stage (hard mask), or the child in finetune."""
        m = self.task_specific()
        w = _compose(self.weight, self.parent_weight, m, binary=True)
        b = None if self.bias is None else _compose(self.bias, self.parent_bias, m, binary=True)
        return w, b

    def _cwps_forward(self, x: Tensor, op) -> Tensor:
        if self.stage == "finetune":
            return op.forward(x, self.weight, self.bias)
        return _ComposedOp.apply(
            x, self.weight, self.bias, self.mask_logits, self.parent_weight, self.parent_bias,
            self.stage == "hard", self.threshold, op, self.mask_grad,
        )

    def extra_repr(self) -> str:
        grad = "" if self.mask_grad == "sigmoid" else f", mask_grad={self.mask_grad}"
        return f"{super().extra_repr()}, stage={self.stage}, threshold={self.threshold}{grad}"


class CWPSConv2d(CWPSMixin, SmallInputConv2d):
    """nn.Conv2d with CWPS parameter sharing over its output channels.

    (SmallInputConv2d is an nn.Conv2d that computes a 1x1 input's convolution as a 1x1
    convolution; the soft and hard stages take the same shortcut in _ConvOp.)
    """

    def __init__(self, *args, threshold: float = 0.5, mask_grad: str = "sigmoid", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_cwps(threshold, mask_grad)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, threshold: float = 0.5,
                  mask_grad: str = "sigmoid") -> CWPSConv2d:
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device="meta", dtype=conv.weight.dtype, threshold=threshold, mask_grad=mask_grad,
        )
        return layer.to_empty(device=conv.weight.device)._start_from(conv)

    def _pad_and_padding(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Resolve padding modes and 'same'/'valid' to explicit zero padding ints."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return x, (0, 0)
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return x, (0, 0)
            pads, sym = [], []
            for d, k in zip(self.dilation, self.kernel_size, strict=True):
                total = d * (k - 1)
                left = total // 2
                pads.append((left, total - left))
                sym.append(left)
            if all(lo == hi for lo, hi in pads):
                return x, tuple(sym)
            # asymmetric 'same' padding: pad explicitly (F.pad takes last dim first)
            x = F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
            return x, (0, 0)
        return x, tuple(self.padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.stage == "finetune":
            return super().forward(x)
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
            return self.forward(x.unsqueeze(0)).squeeze(0)
        x, padding = self._pad_and_padding(x)
        op = _ConvOp(self.stride, padding, self.dilation, self.groups)
        return self._cwps_forward(x, op)

    def to_plain(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, padding_mode=self.padding_mode,
            device="meta", dtype=self.weight.dtype,
        )
        return self._fill_plain(conv.to_empty(device=self.weight.device))


class CWPSLinear(CWPSMixin, nn.Linear):
    """nn.Linear with CWPS parameter sharing over its output features (any leading dims)."""

    def __init__(self, *args, threshold: float = 0.5, mask_grad: str = "sigmoid", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_cwps(threshold, mask_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 0.5,
                    mask_grad: str = "sigmoid") -> CWPSLinear:
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device="meta", dtype=linear.weight.dtype, threshold=threshold, mask_grad=mask_grad,
        )
        return layer.to_empty(device=linear.weight.device)._start_from(linear)

    def forward(self, x: Tensor) -> Tensor:
        return self._cwps_forward(x, _LINEAR_OP)

    def to_plain(self) -> nn.Linear:
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device="meta", dtype=self.weight.dtype,
        )
        return self._fill_plain(linear.to_empty(device=self.weight.device))


CWPS_LAYER_TYPES = (CWPSConv2d, CWPSLinear)
