"""CWPS layers: drop-in Conv2d / Linear with a child weight, a frozen composite parent and a
per-output-channel mask (paper section 3.2.3-3.2.4).

The forward composes the weight once (paper Eq. 6/7),

    w = m * w_child + (1 - m) * w_parent,    b = m * b_child + (1 - m) * b_parent,

and runs ONE convolution / matmul. This is the same function as the paper's two-pass Eq. 8
(the layer is linear in its weights) with the same gradients for the child and the mask, at the
cost of the plain layer. A custom autograd function recomputes a large kernel's ``w`` in the
backward instead of keeping it alive between forward and backward, so training memory matches
plain fine-tuning up to the small kernels (at most KEEP_COMPOSED_NUMEL elements each), which
compose with ordinary autograd ops that keep their ``w`` for the backward
(CWPSMixin._composed_by_autograd: the same numbers, no Python backward), and convs with a 1x1
output, which keep their window-sized composed weight (see _ComposedOp).

Stages:
  finetune  a plain layer on the child weights (the warm-up fine-tune);
  soft      m = sigmoid(mask_logits)                                     (Eq. 9);
  hard      m = 1[sigmoid(mask_logits) >= threshold] in the forward       (Eq. 10/11),
            straight-through in the backward: dL/ds = dL/dm * sigmoid'(s) (mask_grad
            "sigmoid": F alone passed straight through, our reading of the paper's
            "straight-through estimator ... drawing inspiration from TAPS", which names no
            formula), or dL/ds = dL/dm (mask_grad "identity", the plain
            straight-through estimator TAPS uses: no sigmoid slope to damp the score's update).

Every layer remembers its hard decisions (sigmoid(s) >= lambda) at the moment it enters the
soft and the hard stage, so the channels a mask fit flips can be counted afterwards
(surgery.mask_flips).
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autocast import autocast_dtype, run_plain
from .small_input import SmallInputConv2d, Window, WindowOp, live_window, own_output

STAGES = ("finetune", "soft", "hard")
#: kernels with at most this many elements keep their composed weight from the forward for the
#: backward (4 MiB in fp32) instead of recomposing it there. At small inputs the weights are the
#: step's memory traffic and the recompose a sizeable part of it (resnet18 at 32 px: layers 1-3
#: and the head, 3.5M elements in all); at large inputs these kernels are small next to the
#: activations (resnet18 at 112 px: 14 MiB kept, about 5% of the step's peak memory growth).
KEEP_COMPOSED_NUMEL = 1 << 20
#: the hard stage's gradient to the mask scores: through sigmoid' (paper) or straight (TAPS)
MASK_GRADS = ("sigmoid", "identity")


def check_mask_grad(mask_grad: str) -> str:
    if mask_grad not in MASK_GRADS:
        raise ValueError(f"mask_grad must be one of {list(MASK_GRADS)}, got {mask_grad!r}")
    return mask_grad


def _allocate_meta(module: nn.Module, device: torch.device) -> None:
    """The parameters and buffers of ``module`` (and of its submodules) still on the meta
    device, allocated empty on ``device``: what to_empty does, for only the tensors not taken or
    made already (to_empty would allocate weight-sized ones only for them to be replaced, and
    goes through torch's Python meta path at ~0.1 ms a tensor: injecting timm resnet18,
    5.8 -> 4.0 ms)."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_meta:
                m._parameters[name] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


#: the values lambda may take (a channel is task-specific where sigmoid(s) >= lambda)
THRESHOLD_RANGE = "[0, 1]"


def check_threshold(threshold: float) -> float:
    if isinstance(threshold, (str, bytes, bool)):  # (float('0.5') and float(True) would pass)
        raise TypeError(f"threshold (lambda) must be a number in {THRESHOLD_RANGE}, got "
                        f"{threshold!r}")
    threshold = float(threshold)
    if not (0.0 <= threshold <= 1.0) or math.isnan(threshold):
        raise ValueError(f"threshold (lambda) must be in {THRESHOLD_RANGE}, got {threshold}")
    return threshold


def hard_mask(mask_logits: Tensor, threshold: float) -> Tensor:
    """1 where a channel is task-specific (sigmoid(s) >= lambda), 0 where it is shared."""
    return _binarise(torch.sigmoid(mask_logits), check_threshold(threshold))


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


def _select(child: Tensor, parent: Tensor, mask: Tensor) -> Tensor:
    """The child's channel where the (binary) mask is 1, the parent's where it is 0: kept
    channels equal the child bit for bit (the merge). The training forward composes with
    ``lerp`` instead, parent + m * (child - parent) in one pass over the weights."""
    m = mask.view(-1, *([1] * (child.dim() - 1)))
    return torch.where(m.bool(), child, parent)


def _whole(mask: Tensor, weight: Tensor) -> str | None:
    """"parent" if a binary mask is all 0, "child" if all 1, None otherwise, off the CPU
    (reading the mask on a GPU would wait for it) and under torch.compile (reading a value
    breaks the graph, one break per layer).

    lerp(parent, child, 0) is the parent and lerp(parent, child, 1) the child, value for value
    (lerp computes parent + 0 * (child - parent) and child - (child - parent) * 0), but for the
    sign of a zero (where the parent holds -0.0 the lerp gives +0.0, and the child's -0.0
    likewise), which can change a convolution's output only in the sign of an exact zero."""
    if weight.device.type != "cpu" or mask.numel() == 0 or torch.compiler.is_compiling():
        return None
    kept = int(torch.count_nonzero(mask))  # (a sum in bf16 rounds 511 ones to 512)
    if kept == 0:
        return "parent"
    if kept == mask.numel():
        return "child"
    return None


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
        # (under torch.compile the compiler plans memory, and keeping a buffer is a side
        # effect it cannot trace)
        if t.device.type != "cpu" or not dense or torch.compiler.is_compiling():
            return torch.empty_like(t)
        key = (t.device, t.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < t.numel():
            buf = self.buffers[key] = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
        # same shape and strides as t (channels_last weights stay channels_last)
        return buf.as_strided(t.shape, t.stride())


_SCRATCH = _Scratch()


class _ComposedOp(torch.autograd.Function):
    """y = op(x, compose(child, parent, mask)), the composed weight kept small.

    ``op`` is a small object with ``forward(x, w, b)`` and
    ``backward(grad, x, w, has_bias, need_x)`` returning (grad_x, grad_w, grad_b); see _ConvOp
    and _LinearOp. The per-channel mask and sigmoid are kept from the forward (C numbers each).

    Three paths:
    - ``window`` None, a kernel larger than KEEP_COMPOSED_NUMEL: the composed weight is written
      into scratch memory and recomputed in the backward, so the step holds no weight-sized
      tensor of its own;
    - ``window`` None, a small kernel: the composed weight is kept for the backward (its own
      tensor, not the scratch buffer: another layer's forward reuses that);
    - ``window`` (a conv with a 1x1 output, see small_input.py; ``op`` is then its WindowOp):
      only the kernel taps that meet the input are composed and multiplied. ``w_parent`` is
      then the parent's window, already dense (the layer keeps it: the parent is frozen); the
      child's window is read in place where its taps are runs of whole input-channel vectors
      (channels_last), copied out once otherwise (NCHW: reading taps scattered over the kernel
      costs about as much as reading the kernel); the window-sized composed weight is kept for
      the backward (on a 1x1 map a ninth of a 3x3 kernel).

    On each path, a hard mask that shares every channel or none (eager, on the CPU:
    ``_whole``) takes the parent or the child (or their windows) as the composed weight, in the
    forward and the backward: no compose, nothing kept.
    """

    @staticmethod
    def forward(ctx: Any, x, w_child, b_child, logits, w_parent, b_parent, hard, threshold, op,
                window=None, mask_grad="sigmoid"):
        mask, sig = _stage_mask(logits, hard, threshold)  # no autograd inside forward
        if mask.dtype != w_parent.dtype:
            mask = mask.to(w_parent.dtype)
        m = mask.view(-1, *([1] * (w_child.dim() - 1)))
        keep = window is not None or w_child.numel() <= KEEP_COMPOSED_NUMEL
        # a hard mask all 0 or all 1 composes to the parent or the child: that tensor itself,
        # in the forward and in the backward (no compose, no recompose, nothing kept)
        ctx.whole = _whole(mask, w_child) if hard else None
        if window is None:
            wc = w_child
        else:
            wc = window.kernel(w_child)
            if wc.stride(1) != 1:
                # NCHW: the window's taps are scattered over the whole kernel, and reading them
                # costs about what reading the kernel does: copy them out once for the forward
                # and the backward. (clone, not contiguous: the copy keeps the kernel's format.)
                # A channels_last window is runs of whole input-channel vectors, read in place.
                wc = wc.clone()
        if ctx.whole is not None:
            w = w_parent if ctx.whole == "parent" else wc
        else:
            # a scratch w (a large kernel's: windows are kept) is dead once the op has run
            # (nothing inside a Function forward keeps it)
            w = torch.lerp(w_parent, wc, m, out=None if keep else _SCRATCH.like(wc))
        b = None if b_child is None else torch.lerp(b_parent, b_child, mask)
        # Autocast does not reach inside a Function: cast the way it would for conv/linear.
        cast = autocast_dtype(x.device.type)
        if cast is None:
            xc = x
            y = op.forward(x, w, b)
        else:
            xc = x.to(cast)
            w = w.to(cast)
            y = run_plain(x.device.type, op.forward, xc, w, None if b is None else b.to(cast))
        if window is not None:  # (its matmul's output seen as N x C x 1 x 1: own_output)
            y = own_output(y)
        # wc is the child itself, its window or the window's copy; w_child gives the gradient's
        # layout
        ctx.save_for_backward(xc, wc, b_child, w_parent, b_parent, w_child)
        ctx.composed = w if keep and ctx.whole is None else None
        ctx.mask, ctx.op, ctx.window, ctx.x_dtype = m, op, window, x.dtype
        if ctx.needs_input_grad[3]:
            # straight-through in the hard stage: dmask/dlogits as mask_slope says
            ctx.slope = mask_slope(sig, hard, mask_grad)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y):
        xc, wc, b_child, wp, b_parent, w_child = ctx.saved_tensors
        m, window = ctx.mask, ctx.window
        if ctx.composed is None:
            if ctx.whole is not None:
                w = wp if ctx.whole == "parent" else wc
            else:
                w = torch.lerp(wp, wc, m, out=_SCRATCH.like(wc))
            if w.dtype != xc.dtype:
                w = w.to(xc.dtype)
        else:
            w, ctx.composed = ctx.composed, None
        has_bias = b_child is not None
        if grad_y.dtype != xc.dtype:
            grad_y = grad_y.to(xc.dtype)
        gx, gw, gb = run_plain(
            xc.device.type, ctx.op.backward, grad_y, xc, w, has_bias, ctx.needs_input_grad[0]
        )
        if gx is not None and gx.dtype != ctx.x_dtype:
            gx = gx.to(ctx.x_dtype)
        grad_child = grad_logits = grad_b_child = None
        if gw.dtype != wc.dtype:
            gw = gw.to(wc.dtype)
        if has_bias and gb.dtype != b_child.dtype:
            gb = gb.to(b_child.dtype)
        if ctx.needs_input_grad[3]:
            # dL/dm_j = <dL/dw_j, child_j - parent_j> + dL/db_j * (b_child_j - b_parent_j);
            # the composed weight is dead after the conv backward: reuse its buffer (the
            # scratch, or the kept tensor, the forward's own)
            # (never the parent or the child themselves: scratch memory, free again then)
            out = _SCRATCH.like(wc) if ctx.whole is not None else (
                w if w.dtype == wc.dtype else None)
            prod = torch.sub(wc, wp, out=out).mul_(gw)
            # summed over its own dims: flatten(1) of a channels_last kernel is a copy, and
            # that copy cost twice the sum (a 256x256x3x3 kernel on the CPU: 341 -> 124 us)
            dm = prod.sum(dim=tuple(range(1, prod.dim())))
            if has_bias:  # a product, then a sum: rounded as autograd's lerp backward does
                dm.add_(gb * (b_child - b_parent))
            grad_logits = dm.mul_(ctx.slope)
        if ctx.needs_input_grad[1]:
            if window is None:
                grad_child = gw.mul_(m)  # in place: gw is not needed any more
            else:  # the other taps only ever met zero padding
                grad_child = torch.zeros_like(w_child)
                if torch.compiler.is_compiling():  # it cannot trace mul(out=) into a view
                    window.kernel(grad_child).copy_(gw.mul_(m))
                else:  # one pass, not two
                    torch.mul(gw, m, out=window.kernel(grad_child))
        if has_bias and ctx.needs_input_grad[2]:
            grad_b_child = gb * m.view(-1)
        return (gx, grad_child, grad_b_child, grad_logits, None, None, None, None, None, None,
                None)


class _ConvOp:
    def __init__(self, stride, padding, dilation, groups):
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

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
    def forward(self, x, w, b):
        return F.linear(x, w, b)

    def backward(self, g, x, w, has_bias, need_x):
        gx = g @ w if need_x else None
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        gw = g2.t() @ x2
        gb = g2.sum(0) if has_bias else None
        return gx, gw, gb


_LINEAR_OP = _LinearOp()


def _add_grad(p: Tensor, g: Tensor) -> None:
    p.grad = g if p.grad is None else p.grad + g


def _identities(*tensors: Tensor | None) -> tuple:
    """Which tensors these are and how often each was written in place (compose='step')."""
    return tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in tensors)


def _has_gradient(leaves: tuple | None) -> bool:
    return leaves is not None and any(
        leaf is not None and leaf.grad is not None for leaf in leaves)


@torch.no_grad()
def _fold_on_arrival(layer_ref, which: int, stage_key: tuple, sources: tuple, leaf) -> None:
    """A backward reached a leaf its layer let go (fold_step_gradient): its gradient goes to
    the child and the scores as it arrives, under the stage it was composed in."""
    layer = layer_ref()
    if layer is None or leaf.grad is None:
        return
    if layer._step_sources() != sources:
        raise _changed(layer, "between a forward and its backward")
    grads = [None, None]
    grads[which] = leaf.grad
    leaf.grad = None
    with torch.inference_mode(False):
        layer._fold(tuple(grads), stage_key)


def _refuse_on_arrival(layer_ref, leaf) -> None:
    """A backward reached a leaf its layer let go at an optimiser step (let_go_at_step): the
    forward it belongs to ran on weights the step has changed since."""
    layer = layer_ref()
    if layer is None:
        return
    raise RuntimeError(
        f"{type(layer).__name__}: a backward reached the composed weight of a forward recorded "
        "before the optimiser step, which has stepped the weights it ran on since (its "
        "gradient would be taken against other weights; the forward compose fails here with "
        "autograd's in-place error); run a forward's backward before the step")


def _changed(layer, between: str, what: str = "child, mask scores or parent") -> RuntimeError:
    return RuntimeError(
        f"{type(layer).__name__}: its {what} changed {between} (the composed weight's "
        "gradient would be taken against other weights); step or zero_grad first")


#: the layers that compose at the step (step_compose.use_step_compose, and their copies): a step
#: of another optimiser than StepComposeSGD over what they train is refused (_check_step)
STEP_LAYERS: weakref.WeakSet = weakref.WeakSet()


class CWPSMixin:
    """State and behaviour shared by CWPSConv2d and CWPSLinear.

    ``weight``/``bias`` are the child (state-dict names of the wrapped layer are kept, so a
    checkpoint of the plain backbone still loads); ``parent_weight``/``parent_bias`` are frozen
    buffers; ``mask_logits`` has one entry per output channel.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    #: the autograd function of the soft and hard stages (benchmarks swap in a variant)
    _composed_op: type[torch.autograd.Function] = _ComposedOp
    #: small kernels (at most KEEP_COMPOSED_NUMEL elements, output larger than 1x1) compose with
    #: ordinary autograd ops instead of _composed_op (_composed_by_autograd); benchmarks that
    #: swap in a variant of the function for every kernel set this False
    _small_kernels_by_autograd: bool = True

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
    def _start_from(self, plain: nn.Module, take: bool = False, fill_parent: bool = True):
        """Child and parent both start as ``plain``'s weights (the T0 / warm-up weights), in
        their memory format (a channels_last model stays channels_last: no conversion here and
        none back at the next fit).

        ``from_conv``/``from_linear`` build the layer on the meta device, and every tensor is
        taken, made or filled here, on ``plain``'s device: wrapping a model skips the default
        initialisation's work and draws no random numbers (the data order of the fit that
        follows is the one it would have been without the surgery).

        ``take``: the child is ``plain``'s own weight and bias Parameters, not copies of them
        (inject_cwps, which replaces ``plain`` in its model; a weight that is not a registered
        Parameter, e.g. one computed by torch.nn.utils.parametrize, is copied all the same).
        ``fill_parent`` False leaves the parent allocated but unwritten (``parent_unset``), for
        a caller that installs it next (CPMS: a copy would be overwritten unread).
        """
        def child(name: str) -> nn.Parameter:
            t = getattr(plain, name)
            declared = getattr(self, name)  # (allocated from plain's attributes)
            if t.shape != declared.shape:
                raise ValueError(f"{type(plain).__name__}.{name} has shape {tuple(t.shape)}, "
                                 f"its attributes make {tuple(declared.shape)}")
            if take and plain._parameters.get(name) is t:
                t.grad = None  # (the plain layer's last gradient means nothing here)
                return t
            return nn.Parameter(t.detach().clone(), t.requires_grad)

        w = plain.weight
        self.weight = child("weight")
        self.parent_weight = w.detach().clone() if fill_parent else torch.empty_like(w)
        if plain.bias is not None:
            b = plain.bias
            self.bias = child("bias")
            self.parent_bias = b.detach().clone() if fill_parent else torch.empty_like(b)
        _allocate_meta(self, w.device)  # the scores (and a subclass's own tensors, which it fills)
        self.mask_logits.zero_()
        self.__dict__["_parent_unset"] = not fill_parent  # a plain attribute: not state
        self.train(plain.training)
        return self

    @property
    def parent_unset(self) -> bool:
        """True while the parent is unwritten: from ``inject_cwps(fill_parents=False)`` until
        search_parents, set_parent or a loaded state dict installs one. The soft and hard
        stages and the merge refuse such a layer."""
        return self.__dict__.get("_parent_unset", False)

    def _parent_installed(self) -> None:
        self.__dict__["_parent_unset"] = False

    def _check_parent_set(self) -> None:
        if self.parent_unset:
            raise RuntimeError(
                f"{type(self).__name__}: its parent was never installed (inject_cwps with "
                "fill_parents=False leaves it unwritten): run search_parents or set_parent first"
            )

    # -- state dict: the stage and lambda travel with the tensors ----------------------------
    # (they decide the outputs and the merge: a state dict loaded into a layer injected with
    # another lambda, or still in finetune, gave other outputs without a word). They are one
    # int64 tensor, (stage index in STAGES, lambda's float64 bits): a state dict stays all
    # tensors (code that compares or saves state dicts tensor by tensor, safetensors included,
    # keeps working), lambda round-trips exactly, and a cast of a state dict's floating-point
    # tensors (to half, say) leaves it alone, where a float tensor's 0.7 came back 0.7002.
    def get_extra_state(self) -> Tensor:
        # (on the CPU whatever device context is active: a meta tensor would hold no values)
        bits = torch.tensor([self.threshold], dtype=torch.float64, device="cpu")
        return torch.cat([torch.tensor([STAGES.index(self.stage)], device="cpu"),
                          bits.view(torch.int64)])

    @staticmethod
    def _read_extra_state(state: Any) -> tuple[str, float]:
        """(stage, lambda) of get_extra_state's tensor, or a ValueError saying what it is."""
        if not (isinstance(state, Tensor) and state.dtype == torch.int64
                and state.shape == (2,) and not state.is_meta):
            what = (f"a {state.dtype} {'meta ' if state.is_meta else ''}tensor of shape "
                    f"{tuple(state.shape)}" if isinstance(state, Tensor)
                    else type(state).__name__)
            raise ValueError(f"a CWPS layer's extra state is an int64 tensor of 2 values "
                             f"(stage index, lambda's float64 bits), got {what} (a state dict "
                             "whose integer tensors were cast?)")
        stage = int(state[0])
        if stage not in range(len(STAGES)):
            raise ValueError(f"the extra state's stage index {stage} is not one of "
                             f"{list(range(len(STAGES)))} ({STAGES})")
        threshold = float(state[1:].cpu().view(torch.float64))
        check_threshold(threshold)
        return STAGES[stage], threshold

    def set_extra_state(self, state: Any) -> None:
        """Take the stage and lambda of a state dict. Loading starts the stage history anew
        (``decisions``): the loaded stage is entered with the loaded scores, as a
        ``set_stage`` right after the load did before the stage was kept, and the decisions
        of the scores the layer held before are dropped. (A fit resumed by the training job
        gets its recorded decisions back from the checkpoint: MaskStageCallback.)"""
        stage, threshold = self._read_extra_state(state)
        self.threshold = threshold
        self.decisions = {}
        self._stage = "finetune"
        self.stage = stage  # (after the scores: load_state_dict sets the extra state last)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        extra = prefix + "_extra_state"  # (torch's key for get_extra_state's value)
        if extra in state_dict:
            try:
                self._read_extra_state(state_dict[extra])
            except ValueError as err:  # (reported with the key, as torch reports a bad shape)
                error_msgs.append(f'While copying the extra state "{extra}": {err}.')
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "parent_weight" in state_dict:
            self._parent_installed()
        # a state dict saved before the stage and lambda were kept loads as before: the layer
        # keeps its own
        if extra in missing_keys:
            missing_keys.remove(extra)

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

    def check_parent_fits(self, shape: tuple[int, ...], has_bias: bool) -> None:
        """ValueError unless a parent weight of ``shape``, with a bias or without as
        ``has_bias`` says, fits this layer (set_parent; search_parents before it writes)."""
        if tuple(shape) != tuple(self.weight.shape):
            raise ValueError(
                f"parent weight shape {tuple(shape)} != layer weight shape "
                f"{tuple(self.weight.shape)}"
            )
        if self.bias is not None and not has_bias:
            raise ValueError("this layer has a bias: its parent needs one")
        if self.bias is None and has_bias:
            raise ValueError("this layer has no bias: its parent has one")

    def set_parent(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Install the frozen composite parent (copied; never trained)."""
        self.check_parent_fits(weight.shape, bias is not None)
        self.parent_weight.copy_(weight.detach())
        if bias is not None:
            self.parent_bias.copy_(bias.detach())
        self._parent_installed()

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
        if self.stage != "finetune":
            self._check_parent_set()
        m = self.task_specific()
        w = _select(self.weight, self.parent_weight, m)
        b = None if self.bias is None else _select(self.bias, self.parent_bias, m)
        return w, b

    # -- compose at the optimiser step (step_compose.py) -------------------------------------
    @property
    def compose(self) -> str:
        """Where the soft / hard weight is composed: "forward" (every forward, with autograd
        through the compose) or "step" (kept in ``composed_weight`` / ``composed_bias``,
        written by step_compose.StepComposeSGD's step; see step_compose.use_step_compose)."""
        return self.__dict__.get("_compose", "forward")

    def _step_inputs(self) -> tuple:
        """What the kept composed weight depends on: (stage, threshold, the child's, scores'
        and parent's identities, the composed weight's). Versions count in-place writes; a
        ``.data`` write counts none and is not seen."""
        return (self.stage, self.threshold, self._step_sources(),
                _identities(self.composed_weight, self.composed_bias))

    def _step_sources(self) -> tuple:
        """The child's, scores' and parent's identities (_step_inputs)."""
        return _identities(self.weight, self.bias, self.mask_logits, self.parent_weight,
                           self.parent_bias)

    @torch.no_grad()
    def recompose(self) -> None:
        """Write the kept composed weight (and bias) from the child, the parent and the
        stage's mask as they are: parent + m * (child - parent), the forward compose's values.
        A gradient of the old composed weight that no step has taken yet (a stage switch
        inside an accumulation of gradients) goes to the child and the scores first, as does
        one that a forward recorded on it still has to come (fold_step_gradient). The weight is
        written into new memory: a graph recorded on the old one keeps what it ran on (two
        forwards with a stage switch between them, one backward)."""
        self._check_parent_set()
        self.fold_step_gradient()
        # (in the child's memory format; an ordinary tensor even when the first forward runs
        # under inference_mode: an inference tensor counts no versions, which _step_inputs reads)
        with torch.inference_mode(False):
            self.composed_weight = torch.empty_like(self.weight.detach())
            if self.bias is not None:
                self.composed_bias = torch.empty_like(self.bias.detach())
        # the stage the kept weight is composed in: with the scores it was composed from
        # (the step writes both), what a gradient of it was taken under (fold_step_gradient)
        self.__dict__["_step_stage"] = (self.stage, self.threshold)
        m = self._step_mask()[0]
        torch.lerp(self.parent_weight, self.weight,
                   m.view(-1, *([1] * (self.weight.dim() - 1))), out=self.composed_weight)
        if self.bias is not None:
            torch.lerp(self.parent_bias, self.bias, m, out=self.composed_bias)
        self._composed_current()

    def _composed_current(self) -> None:
        """Note the kept weight as composed from the tensors as they are now (recompose; the
        optimiser step, which writes it with the children and scores)."""
        self.__dict__["_step_key"] = self._step_inputs()

    def _recompose_if_stale(self) -> bool:
        """Recompose where what the kept weight depends on changed since; True if it did."""
        if self.__dict__.get("_step_key") == self._step_inputs():
            return False
        self.recompose()
        return True

    def _step_leaf_pair(self) -> tuple[Tensor, Tensor | None]:
        """The leaves over the kept weight and bias that gradients go to until the step (made
        on first use)."""
        leaves = self.__dict__.get("_step_leaves")
        if leaves is None:
            w, b = self.composed_weight, self.composed_bias
            leaves = (w.detach().requires_grad_(),
                      None if b is None else b.detach().requires_grad_())
            self.__dict__["_step_leaves"] = leaves
        return leaves

    def _step_mask(self, stage_key: tuple | None = None) -> tuple[Tensor, Tensor]:
        """The mask (in the parent's dtype) and its slope of the kept weight's stage (or
        ``stage_key``'s, a (stage, threshold)) and the scores as they are."""
        stage, threshold = stage_key or self.__dict__["_step_stage"]
        logits, hard = self.mask_logits.detach(), stage == "hard"
        if stage == "finetune":
            m, slope = torch.ones_like(logits), torch.zeros_like(logits)
        else:
            m, sig = _stage_mask(logits, hard, threshold)
            slope = mask_slope(sig, hard, self.mask_grad)
        return m.to(self.parent_weight.dtype), slope

    @torch.no_grad()
    def fold_step_gradient(self) -> None:
        """Move the gradient of the kept composed weight that no step has taken yet to the
        child's and the scores' own ``.grad`` (added), as the forward compose gives them under
        the mask it was taken with: dL/dchild = m dL/dw, dL/ds = slope <dL/dw, child - parent>;
        the leaves go. A backward still to come through them (a graph recorded on the kept
        weight) folds its gradient the same way as it arrives (a hook on each leaf).
        StepComposeSGD steps such gradients with the rest."""
        leaves = self.__dict__.get("_step_leaves")
        if leaves is None:
            return
        stage_key, sources = self.__dict__["_step_stage"], self.__dict__["_step_key"][2]
        if _has_gradient(leaves):
            # the gradient was taken under the child, scores and parent the kept weight was
            # composed from: only the stage and the threshold may have changed since (they
            # are kept apart, _step_stage); anything else would fold it against other weights
            if self._step_inputs()[2:] != self.__dict__["_step_key"][2:]:
                raise _changed(self, "between a backward and the optimiser step",
                               "child, mask scores, parent or composed weight")
            # (.grad made here is an ordinary tensor even under inference_mode)
            with torch.inference_mode(False):
                self._fold(tuple(None if leaf is None else leaf.grad for leaf in leaves),
                           stage_key)
        self._let_go(lambda i: functools.partial(_fold_on_arrival, weakref.ref(self), i,
                                                 stage_key, sources))

    def let_go_at_step(self) -> None:
        """The optimiser step has taken the kept weight's gradient and stepped the child and
        the scores: the leaves go, and a backward still to come through one (a forward recorded
        before the step) is refused as it arrives, where its gradient would otherwise be lost
        (a layer whose input needs no gradient saves no weight for autograd to check)."""
        self._let_go(lambda i: functools.partial(_refuse_on_arrival, weakref.ref(self)))

    def _let_go(self, hook_for) -> None:
        """Drop the leaves over the kept weight and bias (and their gradients); ``hook_for(i)``
        is what a gradient that a later backward brings to leaf ``i`` meets."""
        leaves = self.__dict__.get("_step_leaves")
        self.__dict__["_step_leaves"] = None
        for i, leaf in enumerate(leaves or ()):
            if leaf is not None:
                leaf.grad = None
                leaf.register_post_accumulate_grad_hook(hook_for(i))

    def _fold(self, grads: tuple, stage_key: tuple) -> None:
        """Add the child's and the scores' gradients from the composed weight's and bias's
        ``grads`` (either None) under ``stage_key``'s mask."""
        m, slope = self._step_mask(stage_key)
        parts = [(grads[0], self.weight, self.parent_weight)]
        if self.bias is not None and len(grads) > 1:
            parts.append((grads[1], self.bias, self.parent_bias))
        dm = None
        for g, child, parent in parts:
            if g is None:
                continue
            mv = m.view(-1, *([1] * (g.dim() - 1)))
            if child.requires_grad:
                _add_grad(child, g * mv)
            if self.mask_logits.requires_grad:
                term = g * (child.detach() - parent)
                if term.dim() > 1:  # (a bias is a term per channel already)
                    term = term.sum(dim=tuple(range(1, term.dim())))
                dm = term if dm is None else dm + term
        if dm is not None:
            _add_grad(self.mask_logits, (dm * slope).to(self.mask_logits.dtype))

    @torch.compiler.disable  # (traced, its version reads would recompile the model each step)
    def _step_weights(self) -> tuple[Tensor, Tensor | None]:
        """The kept composed weight and bias for a forward of the soft / hard stage: while
        autograd records, leaf tensors over them (one pair until the optimiser step, so a
        layer run twice, or gradients accumulated over several backwards, sum into one
        gradient, which the step takes to the child and the mask scores)."""
        if self.__dict__.get("_parent_unset"):
            self._check_parent_set()
        # (under torch.compile the leaf below is a graph break: the layer runs eagerly)
        if torch.jit.is_tracing():
            raise RuntimeError(
                f"{type(self).__name__}: compose='step' does not run under torch.jit.trace (its "
                "gradient goes to a leaf the optimiser step reads); use compose='forward' "
                "(step_compose.use_forward_compose)")
        self._recompose_if_stale()
        if not torch.is_grad_enabled() or not (
                self.weight.requires_grad or self.mask_logits.requires_grad
                or (self.bias is not None and self.bias.requires_grad)):
            return self.composed_weight, self.composed_bias
        return self._step_leaf_pair()

    def _cwps_forward(self, x: Tensor, op, window: Window | None = None) -> Tensor:
        if self.stage == "finetune":
            return op.forward(x, self.weight, self.bias)
        if self.__dict__.get("_parent_unset"):
            self._check_parent_set()
        if (window is None and self._small_kernels_by_autograd
                and self.weight.numel() <= KEEP_COMPOSED_NUMEL):
            group = self.__dict__.get("_compose_group")
            # a shallow copy of the layer (nn.DataParallel's replicas) is not the group's member;
            # torch.compile, torch.jit.trace and torch.func transforms take the per-layer ops
            if (group is None or not group[0].is_member(self, group[1])
                    or torch.compiler.is_compiling() or torch.jit.is_tracing()
                    or torch._C._are_functorch_transforms_active()):
                w, b = self._composed_by_autograd()
            else:  # composed with the other small kernels in one node (compose_group.py)
                w, b = group[0].weights(group[1])
            return op.forward(x, w, b)
        parent = self.parent_weight if window is None else self._parent_window(window)
        flat = op is _LINEAR_OP and x.dim() != 2
        if flat:
            # F.linear returns a view of its 2-D product for any other input, and a view made
            # inside the Function cannot be modified in place (an in-place activation after
            # the layer): the Function takes and returns 2-D tensors, the view is made here
            # (the same product: F.linear flattens an N-D input the same way)
            lead = x.shape[:-1]
            x = x.reshape(-1, x.shape[-1])
        y = self._composed_op.apply(
            x, self.weight, self.bias, self.mask_logits, parent, self.parent_bias,
            self.stage == "hard", self.threshold, op, window, self.mask_grad,
        )
        return y.view(*lead, y.shape[-1]) if flat else y

    def _composed_by_autograd(self) -> tuple[Tensor, Tensor | None]:
        """The composed weight and bias of the soft / hard stage as ordinary autograd ops.

        For small kernels: autograd keeps the composed weight for the conv's backward, as
        _ComposedOp does for them, and its C++ nodes replace the Python backward, which cost
        more than these kernels' arithmetic. Values and gradients are _ComposedOp's bit for bit:
        the mask enters as ``mask + (s - s.detach()) * slope``, whose value is the stage's mask
        exactly (the added term is 0) and whose gradient to the scores s is dL/dm * slope, the
        straight-through estimator of the hard stage (mask_slope).
        """
        logits, hard = self.mask_logits, self.stage == "hard"
        with torch.no_grad():
            mask, sig = _stage_mask(logits, hard, self.threshold)
            slope = mask_slope(sig, hard, self.mask_grad)
        m = torch.addcmul(mask, logits - logits.detach(), slope)
        if m.dtype != self.parent_weight.dtype:
            m = m.to(self.parent_weight.dtype)
        w = torch.lerp(self.parent_weight, self.weight, m.view(-1, *([1] * (self.weight.dim() - 1))))
        b = None if self.bias is None else torch.lerp(self.parent_bias, self.bias, m)
        return w, b

    def _parent_window(self, window: Window) -> Tensor:
        """The parent's kernel taps in ``window``, dense (in the kernel's memory format), kept
        between steps (the parent is frozen).

        The copy is redone whenever the parent changes: set_parent, load_state_dict and any
        in-place write bump its version counter; ``.to()`` and friends give it a new tensor
        (a weak reference tells, so a new tensor at a freed one's address is not mistaken for
        it). Copies and pickles of the layer leave the kept window behind (__getstate__).
        """
        parent = self.parent_weight
        if torch.compiler.is_compiling():
            return window.kernel(parent).clone()
        key = (window, parent.data_ptr(), parent._version, parent.dtype, parent.device)
        kept = self.__dict__.get("_kept_parent_window")
        if kept is None or kept[0]() is not parent or kept[1] != key:
            kept = (weakref.ref(parent), key, window.kernel(parent).clone())
            self.__dict__["_kept_parent_window"] = kept  # a plain attribute: not state
        return kept[2]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_kept_parent_window", None)
        # a copy composes anew at its first forward and has no gradient to step
        state.pop("_step_leaves", None)
        state.pop("_step_key", None)
        state.pop("_step_stage", None)
        # a layer copied on its own leaves its ComposeGroup behind; a copy of the whole model
        # copies the group, which takes the copied layers back in (ComposeGroup.__setstate__)
        state.pop("_compose_group", None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if self.__dict__.get("_compose") == "step":  # a copy (or unpickled) composes at the step
            STEP_LAYERS.add(self)

    def extra_repr(self) -> str:
        grad = "" if self.mask_grad == "sigmoid" else f", mask_grad={self.mask_grad}"
        compose = "" if self.compose == "forward" else f", compose={self.compose}"
        return (f"{super().extra_repr()}, stage={self.stage}, threshold={self.threshold}{grad}"
                f"{compose}")


class CWPSConv2d(CWPSMixin, SmallInputConv2d):
    """nn.Conv2d with CWPS parameter sharing over its output channels.

    (SmallInputConv2d is an nn.Conv2d that computes a convolution with a 1x1 output as a
    matmul over the taps that meet the input; the soft and hard stages take the same shortcut
    with small_input.WindowOp.)
    """

    def __init__(self, *args, threshold: float = 0.5, mask_grad: str = "sigmoid", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_cwps(threshold, mask_grad)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, threshold: float = 0.5, mask_grad: str = "sigmoid",
                  *, take: bool = False, fill_parent: bool = True) -> CWPSConv2d:
        """The CWPS layer of ``conv``, child and parent ``conv``'s weights (``take`` and
        ``fill_parent``: see _start_from)."""
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device="meta", dtype=conv.weight.dtype, threshold=threshold, mask_grad=mask_grad,
        )
        return layer._start_from(conv, take, fill_parent)

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
        if self.__dict__.get("_compose") == "step":  # the plain conv on the kept weight
            return self._conv_forward(x, *self._step_weights())
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
            return self.forward(x.unsqueeze(0)).squeeze(0)
        x, padding = self._pad_and_padding(x)
        # a conv with a 1x1 output uses only the taps that meet the input: compose and
        # multiply only those (small_input)
        window = live_window(x.shape[-2:], self.kernel_size, self.stride, padding, self.dilation)
        if window is None:
            op = _ConvOp(self.stride, padding, self.dilation, self.groups)
        else:
            op = WindowOp(window, self.groups)
        return self._cwps_forward(x, op, window)

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
    def from_linear(cls, linear: nn.Linear, threshold: float = 0.5, mask_grad: str = "sigmoid",
                    *, take: bool = False, fill_parent: bool = True) -> CWPSLinear:
        """As CWPSConv2d.from_conv, for ``linear``."""
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device="meta", dtype=linear.weight.dtype, threshold=threshold, mask_grad=mask_grad,
        )
        return layer._start_from(linear, take, fill_parent)

    def forward(self, x: Tensor) -> Tensor:
        if self.stage != "finetune" and self.__dict__.get("_compose") == "step":
            return F.linear(x, *self._step_weights())
        return self._cwps_forward(x, _LINEAR_OP)

    def to_plain(self) -> nn.Linear:
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device="meta", dtype=self.weight.dtype,
        )
        return self._fill_plain(linear.to_empty(device=self.weight.device))


CWPS_LAYER_TYPES = (CWPSConv2d, CWPSLinear)
