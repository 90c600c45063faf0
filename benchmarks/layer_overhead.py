#!/usr/bin/env python
"""Training-step cost of CWPS layers against plain fine-tuning, measured side by side.

Variants (all share the same weights; CWPS variants share the same parents and mask logits):

  finetune        the plain timm model, no CWPS at all, its convolutions switched to
                  SmallInputConv2d as the training job does (convs with a 1x1 output run as
                  matmuls; no effect unless a layer has one, e.g. resnet18's last stage at 32 px);
  finetune-conv2d the same with torch's nn.Conv2d (on request: shows what the 1x1-output
                  shortcut saves, e.g. --size 32 --variants finetune,finetune-conv2d);
  cwps-soft       inject_cwps + set_stage("soft") (one conv, w recomputed in backward);
  cwps-hard       inject_cwps + set_stage("hard");
  two-pass        the paper's Eq. 8, y = m*conv(x, child) + (1-m)*conv(x, parent), soft mask;
  naive-autograd  w = parent + m*(child - parent) with ordinary autograd ops, then F.conv2d
                  (autograd keeps w and child - parent alive until backward), soft mask;
  cwps-soft-per-layer, cwps-hard-per-layer
                  cwps-soft / cwps-hard with every small kernel composed on its own (its layer's
                  autograd ops), not in one node with the others (on request: what the
                  ComposeGroup of cwps/compose_group.py saves);
  cwps-floor      NOT a CWPS step, a timing floor (on request): cwps-soft with the compose and
                  the mask gradient of every layer without a 1x1 output switched off (the child
                  convolved as it is), so what is left is the layers' other cost: the Python
                  autograd function, the mask ops, the 1x1-output window path, SGD on the
                  mask scores (every kernel runs through a Python function here, while the
                  real layer composes small kernels with ordinary autograd ops);
  traffic-floor   NOT a CWPS step, a lower bound (on request): fine-tuning plus only the weight
                  traffic that no implementation composing one weight per layer can avoid:
                  each layer's compose (a lerp of the weight, or of the taps a 1x1 output
                  meets, with the CWPS model's parent, into memory the layer keeps), all before the
                  forward, and one fused pass per layer for the mask and child gradients (an
                  addcmul with value 0: reads the gradient, the weight and the parent, writes
                  the gradient), all after the last weight gradient; no recompute, no mask
                  ops, no Python autograd function, no freeze. Its weights step exactly as
                  fine-tuning's (class TrafficFloor);
  step-compose-soft, step-compose-hard
                  NOT the CWPS layers of src/: a prototype of another design (on request). The
                  layer is fine-tuning's, its weight the composed weight parent + m * (child -
                  parent), kept between steps (a weight-sized buffer more than cwps-soft keeps,
                  allocated before the steps, so the peak growth does not count it) and written
                  by the optimiser step, not by the forward: after the backward one function per
                  step (torch.compile'd) takes each layer's weight gradient to the mask-score
                  and child gradients, steps scores and children as the training job's SGD does
                  (hard: the shared channels' children stand still, as SharedChannelFreeze
                  keeps them) and writes the next step's composed weight. Forward and backward
                  are fine-tuning's; the step trains the same numbers as cwps-soft / cwps-hard
                  (class StepCompose; tests/test_benchmark_step_compose.py);
  cwps-step-soft, cwps-step-hard
                  the CWPS layers of src/ in compose="step" (cwps/step_compose.py): the layer
                  keeps its composed weight and runs as the plain layer on it, and
                  StepComposeSGD's step (compiled before the steps) takes that weight's
                  gradient to the child and the scores, steps them and writes the next
                  composed weight: the step-compose design above, in the core; its composed
                  weights are allocated by the steps, so the peak growth counts them (the
                  step-compose prototype's are not);
  <v>+compile     any of the above under torch.compile (on request, e.g. --variants
                  finetune,finetune+compile,cwps-soft+compile,cwps-hard+compile; the warm-up
                  rounds take the compilation, so give --warmup >= 2);
  <v>+compile-ro  the same with mode="reduce-overhead" (CUDA graphs on a GPU: one launch
                  replays the step's kernels, the cure for launch-bound steps).

two-pass, naive-autograd and cwps-floor are implemented here (not in src/) as subclasses of
CWPSConv2d / CWPSLinear whose ``forward`` differs (SWAPS); they are swapped into a copy of the
CWPS model by re-classing its layers, so they hold exactly the same parameters and buffers as
cwps-soft.

Time: forward + backward + SGD step as the training job steps (momentum 0.9, weight decay 5e-4,
fused on the CPU; on models with CWPS layers with the training job's SharedChannelFreeze: the
hard stage restores the shared channels after each step),
round-robin over the variants (rotated every round) to cancel drift. The verdict uses the paired ratio: the median over rounds of the
variant's step time over fine-tuning's step time in the same round, with a bootstrap 95% CI.
Memory: each variant runs in a fresh
subprocess of this script. On CPU the figure is the peak RSS growth during the training steps,
``ru_maxrss after the steps - RSS just before the first step`` (after model build and one
no_grad warm-up forward, the CWPS layers' scratch buffer dropped after it so that the steps
count it), with MALLOC_MMAP_THRESHOLD_=1 MiB in the workers so glibc returns
freed activation buffers to the OS (--malloc-default to keep glibc's dynamic threshold); on
CUDA ``max_memory_allocated - memory_allocated`` before the step.
Also reported, allocator-independent: the bytes of the tensors autograd saves for backward in
one step (unique storages, via torch.autograd.graph.saved_tensors_hooks), excluding storages
that belong to the model's parameters and buffers.

Decisions: by default the CWPS variants' mask scores are N(0, 2), about half of every layer's
channels task-specific, so every hard-stage parameter has shared rows to restore. A trained job
shares unevenly (the default job: every channel of resnet18's last-stage 3x3 convolutions, which
then sit the SGD step out, see cwps/freeze.py); ``--decisions path/to/results.json`` takes that
job's fraction of task-specific channels per layer (``--decisions-task``: which task's).

    python benchmarks/layer_overhead.py [--device cpu|cuda] [--batch 32] [--size 112]
        [--steps N] [--warmup N] [--model resnet18] [--decisions random|results.json]
        [--out path.json]

Stopped by SIGTERM (``timeout``, as the GPU suite time-boxes each run) it reports and writes
what it measured so far: the timed rounds every variant finished (the ratios over those), the
memory workers that finished, and ``"stopped": {"in": phase, "rounds": n}`` in the JSON; then
it exits with status 3. A GPU session gets minutes: a run cut short still returns figures.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
try:  # the package may not be pip-installed: fall back to the source tree
    import cwps_lightning  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))

from cwps_lightning.cwps import cwps_layers, inject_cwps, set_stage, step_compose  # noqa: E402
from cwps_lightning.cwps import layers as _layers  # noqa: E402
from cwps_lightning.cwps.freeze import SharedChannelFreeze, row_matrix  # noqa: E402
from cwps_lightning.cwps.layers import CWPSConv2d, CWPSLinear  # noqa: E402
from cwps_lightning.cwps.small_input import live_window, use_small_input_convs  # noqa: E402
from cwps_lightning.cwps.surgery import ungroup_small_kernels  # noqa: E402
from cwps_lightning.optim import make_sgd  # noqa: E402

VARIANTS = ("finetune", "cwps-soft", "cwps-hard", "two-pass", "naive-autograd")
EXTRA_VARIANTS = ("finetune-conv2d", "cwps-floor", "cwps-soft-per-layer", "cwps-hard-per-layer",
                  "traffic-floor", "step-compose-soft", "step-compose-hard", "cwps-step-soft",
                  "cwps-step-hard")
STEP = "cwps-step-"  # prefix: the CWPS layers in compose="step" (cwps/step_compose.py)
PER_LAYER = "-per-layer"  # suffix: a CWPS stage without its ComposeGroups
# suffixes: the variant under torch.compile in this mode (valid for every variant)
COMPILE_MODES = {"+compile": None, "+compile-ro": "reduce-overhead"}
TARGET_TIME = 1.05
TARGET_MEM = 1.10
MiB = 2**20


class Stopped(BaseException):
    """SIGTERM arrived (a BaseException: no ``except Exception`` on the way swallows it)."""


def _stop(signum, frame):
    raise Stopped()


def split_compile(name: str) -> tuple[str, str | None, bool]:
    """(eager variant, torch.compile mode, compiled?) of a --variants name."""
    for suffix, mode in COMPILE_MODES.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), mode, True
    return name, None, False


# ---------------------------------------------------------------------------------------------
# The two alternatives (benchmark-only; not part of the library)
# ---------------------------------------------------------------------------------------------
def _train_mask(layer) -> torch.Tensor:
    """The stage's mask as an autograd expression of mask_logits (straight-through if hard)."""
    s = torch.sigmoid(layer.mask_logits)
    if layer.stage == "hard":
        return (s >= layer.threshold).to(s.dtype) + (s - s.detach())
    return s


class TwoPassConv2d(CWPSConv2d):
    """Paper Eq. 8: two convolutions per layer, outputs mixed per output channel."""

    def forward(self, x):
        if self.stage == "finetune":
            return super().forward(x)
        x, padding = self._pad_and_padding(x)
        m = _train_mask(self).view(1, -1, 1, 1)
        y_child = F.conv2d(
            x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups
        )
        y_parent = F.conv2d(
            x,
            self.parent_weight,
            self.parent_bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
        )
        return m * y_child + (1 - m) * y_parent


class TwoPassLinear(CWPSLinear):
    def forward(self, x):
        if self.stage == "finetune":
            return super().forward(x)
        m = _train_mask(self)
        return m * F.linear(x, self.weight, self.bias) + (1 - m) * F.linear(
            x, self.parent_weight, self.parent_bias
        )


def _naive_compose(layer):
    m = _train_mask(layer)
    w = torch.addcmul(
        layer.parent_weight,
        m.view(-1, *([1] * (layer.weight.dim() - 1))),
        layer.weight - layer.parent_weight,
    )
    b = None
    if layer.bias is not None:
        b = torch.addcmul(layer.parent_bias, m, layer.bias - layer.parent_bias)
    return w, b


class NaiveConv2d(CWPSConv2d):
    """Compose w with plain autograd ops, then one F.conv2d (autograd keeps w for backward)."""

    def forward(self, x):
        if self.stage == "finetune":
            return super().forward(x)
        x, padding = self._pad_and_padding(x)
        w, b = _naive_compose(self)
        return F.conv2d(x, w, b, self.stride, padding, self.dilation, self.groups)


class NaiveLinear(CWPSLinear):
    def forward(self, x):
        if self.stage == "finetune":
            return super().forward(x)
        w, b = _naive_compose(self)
        return F.linear(x, w, b)


class _FloorOp(torch.autograd.Function):
    """The CWPS layer's machinery with its weight-sized work switched off (timing only, NOT a
    CWPS step): where the output is larger than 1x1 the forward convolves the child itself and the
    backward neither recomposes nor computes the mask gradient (zeros); the mask ops, the saved
    state, the Python function and the 1x1-output window path stay as in layers._ComposedOp."""

    @staticmethod
    def forward(ctx, x, w_child, b_child, logits, w_parent, b_parent, hard, threshold, op,
                window=None, mask_grad="sigmoid"):
        if window is not None:
            ctx.real = True
            return _layers._ComposedOp.forward(ctx, x, w_child, b_child, logits, w_parent,
                                               b_parent, hard, threshold, op, window, mask_grad)
        ctx.real = False
        mask, sig = _layers._stage_mask(logits, hard, threshold)
        ctx.mask = mask.view(-1, *([1] * (w_child.dim() - 1)))
        ctx.slope = _layers.mask_slope(sig, hard, mask_grad)
        ctx.op, ctx.has_bias = op, b_child is not None
        ctx.save_for_backward(x, w_child)
        return op.forward(x, w_child, b_child)

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.real:
            return _layers._ComposedOp.backward(ctx, grad_y)
        x, w = ctx.saved_tensors
        gx, gw, gb = ctx.op.backward(grad_y, x, w, ctx.has_bias, ctx.needs_input_grad[0])
        m = ctx.mask
        grad_b = gb * m.view(-1) if ctx.has_bias else None
        return (gx, gw.mul_(m), grad_b, torch.zeros_like(ctx.slope)) + (None,) * 7


class FloorConv2d(CWPSConv2d):
    _composed_op = _FloorOp
    _small_kernels_by_autograd = False  # every kernel through _FloorOp


class FloorLinear(CWPSLinear):
    _composed_op = _FloorOp
    _small_kernels_by_autograd = False


class TrafficFloor:
    """The traffic-floor variant's hooks on a fine-tuning model (see the module docstring).

    Each CWPS layer's module of the fine-tuning model gets the CWPS model's parent and soft mask
    as buffers (``floor_parent``, ``floor_mask``: they follow the model's device and memory
    format). The traffic is placed where it costs least, so that this is a floor: every layer
    composed in one go before the model's forward (a layer's 1x1-output window as its last
    forward found it: the benchmark's input size does not change; the parent's window kept
    dense, as a CWPS layer keeps it), and every fused pass in one go once the last weight
    gradient is in (streaming through the weights, not between the layers' own work; the
    ComposeGroup of the real layers works that way); each layer composes into memory of its own
    (a model's worth in all: the floor's peak memory is not a CWPS figure). ``passes`` counts
    (composes, fused passes) and ``window_numel`` holds each layer's composed size."""

    def __init__(self, model: nn.Module, cwps: nn.Module):
        self.passes = [0, 0]
        self.window_numel: dict[str, int] = {}
        self.modules: dict[str, nn.Module] = {}
        self._ready = 0
        for name, layer in cwps_layers(cwps):
            module = model.get_submodule(name)
            parent = layer.parent_weight.detach().clone()
            mask = torch.sigmoid(layer.mask_logits.detach().float())
            module.register_buffer("floor_parent", parent)
            module.register_buffer("floor_mask", mask.view(-1, *([1] * (parent.dim() - 1))))
            module.floor_taps = None  # the window of its last forward (None: the whole kernel)
            module.register_forward_pre_hook(self._find_window)
            module.weight.register_post_accumulate_grad_hook(self._gradient_in)
            self.modules[name] = module
        model.register_forward_pre_hook(self._compose_all)

    @staticmethod
    def _find_window(module, args) -> None:
        x = args[0]
        taps = None
        if isinstance(module, nn.Conv2d) and x.dim() == 4 and not isinstance(module.padding, str):
            taps = live_window(x.shape[-2:], module.weight.shape[-2:], module.stride,
                               module.padding, module.dilation)
        module.floor_taps = taps

    @staticmethod
    def _taps(module, t: torch.Tensor) -> torch.Tensor:
        return t if module.floor_taps is None else module.floor_taps.kernel(t)

    @classmethod
    def _parent_taps(cls, module) -> torch.Tensor:
        if module.floor_taps is None:
            return module.floor_parent
        kept = module.__dict__.get("floor_parent_window")
        if kept is None or kept[0] != module.floor_taps:
            kept = (module.floor_taps, cls._taps(module, module.floor_parent).clone())
            module.__dict__["floor_parent_window"] = kept
        return kept[1]

    @torch.no_grad()
    def _compose_all(self, model, args) -> None:
        self._ready = 0
        for name, module in self.modules.items():
            w = self._taps(module, module.weight.detach())
            # into memory of its own that stays (a fresh tensor per step, or one scratch buffer
            # for all layers, each cost about 1% more at 32 px on the project's CPU)
            out = module.__dict__.get("floor_out")
            if out is None or out.shape != w.shape:
                out = module.__dict__["floor_out"] = torch.empty_like(w)
            torch.lerp(self._parent_taps(module), w, module.floor_mask, out=out)
            self.passes[0] += 1
            self.window_numel[name] = w.numel()

    @torch.no_grad()
    def _gradient_in(self, p) -> None:
        self._ready += 1
        if self._ready < len(self.modules):
            return
        for module in self.modules.values():
            g = module.weight.grad
            if g is not None:  # g + 0 * w * parent: g exactly, one pass over the three
                self._taps(module, g).addcmul_(self._taps(module, module.weight.detach()),
                                               self._parent_taps(module), value=0.0)
                self.passes[1] += 1


def _step_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [channels, K], a view (row_matrix); an error where its rows are not dense."""
    rows = row_matrix(t)
    if rows is None:
        raise ValueError(f"step-compose needs dense rows, got shape {tuple(t.shape)} strides "
                         f"{t.stride()}")
    return rows


def _step_compose_layers(layers, lr: torch.Tensor, momentum: float, weight_decay: float,
                         hard: bool, threshold: float) -> None:
    """One SGD step of every layer's child and mask scores from its composed weight's
    gradient, then the composed weights for the next forward. ``layers``: per layer
    (scores, score momentum, weight part, bias part or None), a part being (gradient, child,
    parent, child momentum, composed) as [C, K] rows (_step_rows). ``lr``: a 0-dim tensor (a
    graph input, not a constant of the compiled graph: StepCompose.warm_up steps at 0)."""
    for scores, score_mom, *parts in layers:
        parts = [q for q in parts if q is not None]
        m, sig = _layers._stage_mask(scores, hard, threshold)  # the layers' own mask
        m = m[:, None]
        # dL/ds = sigmoid'(s) <dL/dw, child - parent> (straight through in the hard stage)
        dot = sum((g * (child - parent)).sum(1) for g, child, parent, _, _ in parts)
        score_mom.mul_(momentum).add_(_layers.mask_slope(sig, hard) * dot)
        scores.sub_(lr * score_mom)  # no weight decay on the scores, as in the job
        m_next = _layers._stage_mask(scores, hard, threshold)[0][:, None]
        for g, child, parent, mom, w in parts:
            step = momentum * mom + (m * g + weight_decay * child)
            if hard:  # shared rows stand still; their momentum is never applied (zeroed)
                keep = m > 0
                mom.copy_(torch.where(keep, step, 0.0))
                child.copy_(torch.where(keep, child - lr * step, child))
            else:
                mom.copy_(step)
                child.sub_(lr * step)
            w.copy_(torch.lerp(parent, child, m_next))


class StepCompose:
    """The step-compose variants' state on a fine-tuning model (see the module docstring).

    Each CWPS layer's module gets the CWPS model's child, parent, mask scores and their
    momentum buffers as buffers (``sc_*``; they follow the model's device and memory format),
    and its weight (and bias) set to the composed one. :meth:`step` runs after the backward
    (``StepComposeSGD``); the weights and biases of these modules are stepped by it alone."""

    def __init__(self, model: nn.Module, cwps: nn.Module, hard: bool, compiled: bool = True):
        self.hard = hard
        self.modules: list[nn.Module] = []
        thresholds = set()
        with torch.no_grad():
            for name, layer in cwps_layers(cwps):
                if layer.mask_grad != "sigmoid":  # the step's score gradient is sigmoid'(s)
                    raise ValueError(f"step-compose: {name} has mask_grad "
                                     f"{layer.mask_grad!r}; only 'sigmoid' is prototyped")
                module = model.get_submodule(name)
                for kind in ("weight", "bias"):
                    p = getattr(layer, kind)
                    if p is None:
                        continue
                    parent = layer.parent_weight if kind == "weight" else layer.parent_bias
                    module.register_buffer(f"sc_{kind}_child", p.detach().clone())
                    module.register_buffer(f"sc_{kind}_parent", parent.detach().clone())
                    # made at the first step, as SGD makes its momentum buffers: the peak
                    # growth of the steps counts it as it counts fine-tuning's
                    module.register_buffer(f"sc_{kind}_mom", None)
                module.register_buffer("sc_scores", layer.mask_logits.detach().float().clone())
                module.register_buffer("sc_score_mom", None)
                thresholds.add(layer.threshold)
                self.modules.append(module)
        if len(thresholds) > 1:
            raise ValueError(f"step-compose: one threshold for all layers, got {thresholds}")
        self.threshold = thresholds.pop() if thresholds else 0.5
        self.compose = torch.compile(_step_compose_layers) if compiled else _step_compose_layers
        self.compose_now()

    def _tensors(self, module, kind: str):
        child = getattr(module, f"sc_{kind}_child")
        if getattr(module, f"sc_{kind}_mom") is None:  # zeros, as FusedSGD starts a buffer
            setattr(module, f"sc_{kind}_mom", torch.zeros_like(child))
        return (getattr(module, kind).grad, getattr(module, f"sc_{kind}_child"),
                getattr(module, f"sc_{kind}_parent"), getattr(module, f"sc_{kind}_mom"),
                getattr(module, kind))

    @torch.no_grad()
    def compose_now(self) -> None:
        """The composed weights from the children, parents and scores as they are."""
        for module in self.modules:
            m = _layers._stage_mask(module.sc_scores, self.hard, self.threshold)[0]
            for kind in ("weight", "bias"):
                if getattr(module, f"sc_{kind}_child", None) is not None:
                    child, parent = (getattr(module, f"sc_{kind}_{k}") for k in ("child", "parent"))
                    w = getattr(module, kind)
                    w.copy_(torch.lerp(parent, child, m.view(-1, *([1] * (w.dim() - 1)))))

    @torch.no_grad()
    def step(self, lr: float, momentum: float, weight_decay: float) -> None:
        self._run(self._layers(), lr, momentum, weight_decay)

    @torch.no_grad()
    def warm_up(self, momentum: float, weight_decay: float) -> None:
        """Compile the step before the first one (a compile inside the first step would count
        in its peak memory, ~90 MiB for resnet18 on the CPU): one step at lr 0 from zero
        gradients leaves children and scores as they were (bit for bit) and rewrites the
        composed weights (the same to rounding: the compiled lerp may round otherwise than
        torch's), and the momentum buffers it makes go again (the first step makes them, as
        SGD makes fine-tuning's)."""
        self._run(self._layers(zero_grads=True), 0.0, momentum, weight_decay)
        for module in self.modules:
            for kind in ("weight", "bias", "score"):
                if hasattr(module, f"sc_{kind}_mom"):
                    setattr(module, f"sc_{kind}_mom", None)

    def _run(self, layers, lr: float, momentum: float, weight_decay: float) -> None:
        device = self.modules[0].sc_scores.device if self.modules else torch.device("cpu")
        # one lr tensor per device, written in place when the lr moves (as StepComposeSGD's)
        lr_t = step_compose.held_scalar(self.__dict__.setdefault("_lrs", {}), device, lr, device)
        self.compose(layers, lr_t, momentum, weight_decay, self.hard, self.threshold)

    def _layers(self, zero_grads: bool = False) -> list:
        layers = []
        for module in self.modules:
            parts = []
            for kind in ("weight", "bias"):
                if getattr(module, f"sc_{kind}_child", None) is None:
                    parts.append(None)
                    continue
                tensors = self._tensors(module, kind)
                if zero_grads:  # (autograd gives a gradient its weight's strides)
                    tensors = (torch.zeros_like(tensors[-1]), *tensors[1:])
                if tensors[0] is None:  # no gradient: this layer did not take part
                    break
                if len({t.is_contiguous() for t in tensors}) > 1:
                    raise ValueError(f"step-compose: {kind} tensors of {module} are not laid "
                                     "out alike (move the model with .to(memory_format=))")
                parts.append(tuple(_step_rows(t) for t in tensors))
            else:
                if module.sc_score_mom is None:
                    module.sc_score_mom = torch.zeros_like(module.sc_scores)
                layers.append((module.sc_scores, module.sc_score_mom, *parts))
        return layers


class StepComposeSGD:
    """The training job's SGD for a step-compose model: torch's for the other parameters,
    :meth:`StepCompose.step` for the composed layers' weights and biases."""

    def __init__(self, model: nn.Module, sc: StepCompose, lr: float, momentum: float,
                 weight_decay: float):
        composed = {id(getattr(m, k)) for m in sc.modules for k in ("weight", "bias")
                    if getattr(m, k, None) is not None}
        self.composed = [p for p in model.parameters() if id(p) in composed]
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in composed]
        self.rest = make_sgd([{"params": rest}], lr=lr, momentum=momentum,
                             weight_decay=weight_decay)
        self.sc, self.hyper = sc, (lr, momentum, weight_decay)
        sc.warm_up(momentum, weight_decay)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.rest.zero_grad(set_to_none=set_to_none)
        for p in self.composed:
            p.grad = None

    def step(self) -> None:
        self.rest.step()
        self.sc.step(*self.hyper)


SWAPS = {
    "two-pass": {CWPSConv2d: TwoPassConv2d, CWPSLinear: TwoPassLinear},
    "naive-autograd": {CWPSConv2d: NaiveConv2d, CWPSLinear: NaiveLinear},
    "cwps-floor": {CWPSConv2d: FloorConv2d, CWPSLinear: FloorLinear},
}


def reclass_layers(model: nn.Module, table: dict[type, type]) -> int:
    """Re-class every CWPS layer of ``model`` (in place) by ``table`` (class -> class)."""
    n = 0
    for _, layer in list(cwps_layers(model)):
        layer.__class__ = table[type(layer)]
        n += 1
    return n


def swap_layers(model: nn.Module, kind: str) -> int:
    """Re-class every CWPS layer of ``model`` (in place) to the ``kind`` alternative."""
    return reclass_layers(model, SWAPS[kind])


# ---------------------------------------------------------------------------------------------
# Model building (deterministic, so worker subprocesses rebuild identical weights)
# ---------------------------------------------------------------------------------------------
def build_base(model_name: str, seed: int) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(model_name, pretrained=False)


def load_decisions(path: str, task: str | None = None) -> tuple[str, dict[str, float]]:
    """(task, {layer: fraction of its channels task-specific}) from a training job's
    results.json (``methods.cwps.tasks.<task>.specific_by_layer``); task None: the last one."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--decisions {path}: not a readable results.json ({e})") from e
    tasks = results.get("methods", {}).get("cwps", {}).get("tasks", {})
    tasks = {t: v["specific_by_layer"] for t, v in tasks.items() if "specific_by_layer" in v}
    if not tasks:
        raise SystemExit(f"--decisions {path}: no CWPS task with specific_by_layer in it "
                         "(methods.cwps.tasks.<task>.specific_by_layer)")
    if task is None:
        task = list(tasks)[-1]
    if task not in tasks:
        raise SystemExit(f"--decisions-task {task!r} is not in {path}; it has {list(tasks)}")
    return task, tasks[task]


@torch.no_grad()
def make_cwps(base: nn.Module, seed: int, decisions: dict[str, float] | None = None) -> nn.Module:
    """inject_cwps into a copy; random parents (perturbed child) and random mask logits, or
    with ``decisions`` (layer -> fraction task-specific, load_decisions) that fraction of each
    layer's channels task-specific (which ones drawn at random), the rest shared."""
    model = copy.deepcopy(base)
    inject_cwps(model)
    g = torch.Generator().manual_seed(seed + 1)
    pick = torch.Generator().manual_seed(seed + 2)  # its own: the parents stay those of random
    layers = list(cwps_layers(model))
    if decisions is not None:
        names = [name for name, _ in layers]
        if set(names) != set(decisions):
            raise SystemExit(
                f"--decisions: its layers are not this model's CWPS layers (missing "
                f"{sorted(set(names) - set(decisions))[:5]}, unknown "
                f"{sorted(set(decisions) - set(names))[:5]}): use the job's backbone"
            )
    for name, layer in layers:
        w = layer.weight.detach().cpu()
        noise = torch.randn(w.shape, generator=g) * w.std() * 0.5
        pb = None
        if layer.bias is not None:
            b = layer.bias.detach().cpu()
            pb = (b + torch.randn(b.shape, generator=g) * 0.1).to(layer.bias.device)
        layer.set_parent((w + noise).to(layer.weight.device), pb)
        # N(0, 2): about half the channels specific (sigmoid >= 0.5), half shared
        logits = torch.randn(layer.mask_logits.shape, generator=g) * 2.0
        if decisions is not None:  # (drawn all the same: the parents stay those of random)
            c = logits.numel()
            specific = torch.randperm(c, generator=pick)[: round(decisions[name] * c)]
            logits = torch.full((c,), -3.0)
            logits[specific] = 3.0  # sigmoid 0.95 / 0.05: either side of any threshold used
        layer.mask_logits.copy_(logits.to(layer.mask_logits.device))
    return model


def make_variant(name: str, base: nn.Module, cwps: nn.Module | None, seed: int,
                 decisions: dict[str, float] | None = None) -> nn.Module:
    eager, mode, compiled = split_compile(name)
    if compiled:
        return torch.compile(make_variant(eager, base, cwps, seed, decisions), mode=mode)
    if name == "finetune":
        model = copy.deepcopy(base)
        use_small_input_convs(model)
    elif name == "finetune-conv2d":
        model = copy.deepcopy(base)
    elif name.startswith("step-compose-"):
        model = copy.deepcopy(base)
        use_small_input_convs(model)
        cwps = cwps if cwps is not None else make_cwps(base, seed, decisions)
        model.step_compose = StepCompose(model, cwps, hard=name.endswith("-hard"))
    elif name == "traffic-floor":
        model = copy.deepcopy(base)
        use_small_input_convs(model)
        cwps = cwps if cwps is not None else make_cwps(base, seed, decisions)
        model.traffic_floor = TrafficFloor(model, cwps)
    else:
        model = copy.deepcopy(cwps if cwps is not None else make_cwps(base, seed, decisions))
        if name in SWAPS:
            swap_layers(model, name)
        if name.endswith(PER_LAYER):
            name = name.removesuffix(PER_LAYER)
            ungroup_small_kernels(model)
        if name.startswith(STEP):
            step_compose.use_step_compose(model)
        set_stage(model, "hard" if name.endswith("-hard") else "soft")
    return model.train()


def build_all(names, model_name, seed, device, channels_last: bool = False,
              decisions: dict[str, float] | None = None):
    base = build_base(model_name, seed)
    cwps = make_cwps(base, seed, decisions) if any(n != "finetune" for n in names) else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = {
        n: make_variant(n, base, cwps, seed, decisions).to(device, memory_format=fmt)
        for n in names
    }
    del base, cwps
    return models


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """SGD as the training job steps it (momentum 0.9, weight decay 5e-4, none on the mask
    scores; torch's fused kernel on the CPU, cwps_lightning.optim.make_sgd); on a model with
    CWPS layers with SharedChannelFreeze attached, as the training job does (its restore of the
    shared channels is part of every hard step)."""
    sc = getattr(model, "step_compose", None)
    if sc is not None:
        return StepComposeSGD(model, sc, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    masks = {id(layer.mask_logits) for _, layer in cwps_layers(model)}
    groups = [{"params": [p for p in params if id(p) not in masks]},
              {"params": [p for p in params if id(p) in masks], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    hyper = dict(lr=1e-3, momentum=0.9, weight_decay=5e-4)
    if any(layer.compose == "step" for _, layer in cwps_layers(model)):
        # the inner SGD for the other parameters is the job's (fused on the CPU); compiled
        # before the steps, as StepCompose.warm_up does
        opt = step_compose.StepComposeSGD(groups, **hyper, model=model,
                                          make_rest=lambda gs: make_sgd(gs, **hyper))
        opt.precompile()
        step_compose.release_composed(model)  # (allocated again by the steps, which count them)
        return opt
    opt = make_sgd(groups, **hyper)
    if masks:
        SharedChannelFreeze(model).attach(opt)
    return opt


def make_batch(args, device, num_classes: int):
    g = torch.Generator().manual_seed(args.seed + 2)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, num_classes, (args.batch,), generator=g)
    if getattr(args, "channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device), y.to(device)


def num_classes_of(model: nn.Module) -> int:
    return getattr(model, "num_classes", None) or 1000


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_step(model, opt, x, y, amp: str = "none") -> torch.Tensor:
    """One step; ``amp`` bf16/fp16: the forward under torch.autocast (the weights stay fp32,
    as with Lightning's precision=bf16-mixed / 16-mixed; fp16 without a loss scaler here)."""
    opt.zero_grad(set_to_none=True)
    dtype = AMP_DTYPES[amp]
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Memory (one fresh process per variant)
# ---------------------------------------------------------------------------------------------
def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0), so build-time peaks do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def saved_tensor_bytes(model, opt, x, y) -> dict:
    """Bytes of unique storages autograd saves for backward in one training step."""
    owned = {t.untyped_storage().data_ptr() for t in model.parameters()}
    owned |= {t.untyped_storage().data_ptr() for t in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr and ptr not in seen:
            seen[ptr] = st.nbytes()
        return t

    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    total = sum(seen.values())
    activations = sum(n for p, n in seen.items() if p not in owned)
    return {
        "saved_total_bytes": total,
        "saved_activation_bytes": activations,
        "saved_param_buffer_bytes": total - activations,
    }


def memory_worker(args) -> dict:
    device = torch.device(args.device)
    name = args._worker
    models = build_all([name], args.model, args.seed, device, args.channels_last,
                       decisions_of(args)[1])
    model = models.pop(name)
    opt = make_optimizer(model)
    x, y = make_batch(args, device, num_classes_of(model))
    with torch.no_grad():
        model(x)
    # the layers' scratch memory (cwps/layers.py: one buffer per thread for the composed
    # weights of large kernels) is memory training needs: let the steps allocate it and count
    # it, not the warm-up forward (whether that forward composes into it depends on the stage
    # and the masks)
    _layers._SCRATCH.buffers.clear()
    step_compose.release_composed(model)  # the same for the step-compose layers' composed weights
    gc.collect()
    sync(device)
    out = {"variant": name, "mem_steps": args.mem_steps}
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.mem_steps):
            train_step(model, opt, x, y, args.amp)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        out.update(peak_growth_bytes=peak, method="cuda max_memory_allocated - allocated")
    else:
        hwm_reset = reset_hwm()
        rss0 = rss_kib()
        maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(args.mem_steps):
            train_step(model, opt, x, y, args.amp)
        maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        hwm1 = hwm_kib()
        out.update(
            peak_growth_bytes=(maxrss1 - rss0) * 1024,
            hwm_growth_bytes=(hwm1 - rss0) * 1024,
            rss_before_kib=rss0,
            ru_maxrss_before_kib=maxrss0,
            ru_maxrss_after_kib=maxrss1,
            hwm_reset=hwm_reset,
            # ru_maxrss is a process high-water mark: it is only the training peak if the
            # training steps raised it
            peak_reached_in_steps=maxrss1 > maxrss0,
            method="ru_maxrss after steps - VmRSS before first step",
        )
    out.update(saved_tensor_bytes(model, opt, x, y))
    return out


def run_memory(args, names, decisions_task: str | None = None,
               results: dict | None = None) -> dict:
    """Each variant's memory in a fresh worker; ``decisions_task``: the task of --decisions
    (resolved once, in main), None for random. ``results``: the dict to fill (a run stopped
    part way keeps the workers that finished)."""
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.device == "cpu" and not args.malloc_default:
        # A fixed mmap threshold stops glibc from keeping freed activation buffers in the heap
        # (its dynamic threshold grows to 32 MiB), so RSS follows the live tensors closely.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    results = {} if results is None else results
    for name in names:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--_worker",
            name,
            "--device",
            args.device,
            "--batch",
            str(args.batch),
            "--size",
            str(args.size),
            "--model",
            args.model,
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
            "--mem-steps",
            str(args.mem_steps),
            "--amp",
            args.amp,
        ] + (["--channels-last"] if args.channels_last else []) + (
            [] if decisions_task is None
            else ["--decisions", args.decisions, "--decisions-task", decisions_task]
        )
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise RuntimeError(f"memory worker for {name} failed (rc={proc.returncode})")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["worker_wall_s"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        print(
            f"  memory {name:<19} {res['peak_growth_bytes'] / MiB:8.1f} MiB peak growth, "
            f"{res['saved_activation_bytes'] / MiB:8.1f} MiB saved activations "
            f"({res['worker_wall_s']:.0f} s)",
            flush=True,
        )
    return results


# ---------------------------------------------------------------------------------------------
# Equivalence check (small batch) and timing
# ---------------------------------------------------------------------------------------------
def check_equivalence(models, args, device) -> dict:
    """The soft variants must compute the same function and gradients (sanity check)."""
    soft = [n for n in ("cwps-soft", "two-pass", "naive-autograd") if n in models]
    if len(soft) < 2:
        return {}
    x, y = make_batch(
        argparse.Namespace(**{**vars(args), "batch": 2}), device, num_classes_of(models[soft[0]])
    )
    ref = None
    report = {}
    for n in soft:
        m = copy.deepcopy(models[n])
        # full fp32 (no TF32) so that two convolutions vs one composed one compare closely
        cudnn = torch.backends.cudnn
        with cudnn.flags(
            enabled=cudnn.enabled,
            benchmark=cudnn.benchmark,
            deterministic=cudnn.deterministic,
            allow_tf32=False,
        ):
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                loss = F.cross_entropy(m(x), y)
                loss.backward()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
        grads = {k: p.grad.detach().clone() for k, p in m.named_parameters() if p.grad is not None}
        if ref is None:
            # each tensor's difference over its own scale, floored at 1e-3 of the largest
            # gradient: a gradient that is rounding noise (a bias before a BatchNorm) is no scale
            floor = 1e-3 * max(g.abs().max().item() for g in grads.values()) + 1e-12
            ref = (loss.detach(), grads)
            continue
        gerr = max(
            (grads[k] - g).abs().max().item() / max(g.abs().max().item(), floor)
            for k, g in ref[1].items()
        )
        report[n] = {
            "loss_abs_diff": (loss.detach() - ref[0]).abs().item(),
            "max_rel_grad_diff": gerr,
        }
        del m
    return report


def run_timing(models, args, device) -> dict:
    names = list(models)
    opts = {n: make_optimizer(m) for n, m in models.items()}
    x, y = make_batch(args, device, num_classes_of(models[names[0]]))
    times = {n: [] for n in names}
    losses = {}
    stopped = False
    gc.collect()
    gc.disable()
    try:
        for r in range(args.warmup + args.steps):
            k = r % len(names)
            for n in names[k:] + names[:k]:  # rotate the order every round
                gc.collect()
                sync(device)
                t0 = time.perf_counter()
                loss = train_step(models[n], opts[n], x, y, args.amp)
                sync(device)
                dt = time.perf_counter() - t0
                if r >= args.warmup:
                    times[n].append(dt)
                losses[n] = float(loss)
            if r >= args.warmup:
                line = "  ".join(f"{n} {times[n][-1] * 1e3:6.0f}" for n in names)
                print(f"  round {r - args.warmup + 1:>2}/{args.steps} ms: {line}", flush=True)
            else:
                print(f"  warm-up {r + 1}/{args.warmup}", flush=True)
    except Stopped:
        stopped = True
        done = min(len(t) for t in times.values())  # the rounds every variant finished
        times = {n: t[:done] for n, t in times.items()}
    finally:
        gc.enable()
    return {"times_s": times, "final_loss": losses, "stopped": stopped}


def same_mode_ratios(times: dict[str, list[float]]) -> dict[str, tuple[str, float, tuple]]:
    """For each compiled variant other than fine-tuning, whose fine-tuning compiled in the same
    mode was timed too: (that variant's name, the paired ratio against it, its 95% CI)."""
    out = {}
    for n, t in times.items():
        eager, _, compiled = split_compile(n)
        base = "finetune" + n.removeprefix(eager)
        if compiled and eager != "finetune" and base in times:
            paired, ci = paired_ratio(t, times[base])
            out[n] = (base, paired, ci)
    return out


def paired_ratio(times, base, resamples: int = 2000, seed: int = 0):
    """Median over rounds of time / finetune time in the same round, with a bootstrap 95% CI.

    Pairing by round cancels the machine's drift (both steps ran seconds apart); the median
    ignores the odd step a noisy neighbour slowed down.
    """
    ratios = [a / b for a, b in zip(times, base, strict=True)]
    rng = random.Random(seed)
    boots = sorted(
        statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples)
    )
    lo, hi = boots[int(0.025 * resamples)], boots[int(0.975 * resamples) - 1]
    return statistics.median(ratios), (lo, hi)


# ---------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv=None):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=112)
    p.add_argument(
        "--steps", type=int, default=30,
        help="timed rounds (steps per variant); on a shared 2-core machine single steps vary "
        "by +-10%%, so a 5%% difference needs a few dozen rounds to resolve",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--amp", default="none", choices=list(AMP_DTYPES),
                   help="autocast the forward to bf16 or fp16 (the paper's GPU runs: bf16)")
    p.add_argument(
        "--channels-last", action="store_true",
        help="model and batch in NHWC (the training job's model.channels_last, its default)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of " + ",".join(VARIANTS + EXTRA_VARIANTS),
    )
    p.add_argument(
        "--mem-steps",
        type=int,
        default=2,
        help="training steps per memory worker (the peak over them is reported)",
    )
    p.add_argument("--threads", type=int, default=cores)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument(
        "--malloc-default",
        action="store_true",
        help="CPU memory workers: keep glibc's dynamic mmap threshold",
    )
    p.add_argument(
        "--decisions", default="random",
        help="which channels the CWPS variants share: 'random' (N(0, 2) mask scores: about half "
        "of every layer's channels) or a training job's results.json, whose per-layer "
        "task-specific fractions (methods.cwps.tasks.<task>.specific_by_layer) it takes, the "
        "channels drawn at random (the job's backbone only)",
    )
    p.add_argument("--decisions-task", default=None,
                   help="with --decisions PATH: the task whose decisions to take (default: the "
                   "file's last task)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_args(p, args, {"batch": 1, "size": 8, "steps": 1, "warmup": 0, "mem_steps": 1,
                         "threads": 1})
    return args


def check_args(p: argparse.ArgumentParser, args, least: dict[str, int]) -> None:
    """Each integer argument named in ``least`` at least its value, and ``--model`` a timm
    model: else ``p.error`` (one line, exit 2), before any work (a bad one failed deep in a
    worker with a traceback, or ran and timed nothing)."""
    for name, low in least.items():
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be an integer >= {low}, got "
                    f"{getattr(args, name)}")
    from cwps_lightning.models import ModelConfigError, check_model_name

    try:
        check_model_name(args.model)
    except ModelConfigError as err:
        p.error(f"--model: {err}")


def decisions_of(args) -> tuple[str | None, dict[str, float] | None]:
    """--decisions as (task, the fractions make_cwps takes); (None, None) for random."""
    if args.decisions == "random":
        return None, None
    return load_decisions(args.decisions, args.decisions_task)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._worker:
        print(json.dumps(memory_worker(args)))
        return 0

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if split_compile(n)[0] not in VARIANTS + EXTRA_VARIANTS]
    if bad or "finetune" not in names:
        raise SystemExit(
            f"--variants must include finetune and be among {VARIANTS + EXTRA_VARIANTS} "
            f"(each also with a suffix of {list(COMPILE_MODES)}); got {bad}"
        )
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    t_start = time.perf_counter()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"{args.model}, batch {args.batch}, {args.size}x{args.size}, device {args.device} "
        f"({dev_name}), {args.threads} threads, autocast {args.amp}, "
        f"{'channels_last' if args.channels_last else 'NCHW'}, torch {torch.__version__}",
        flush=True,
    )

    # read once (a bad file stops the run here, before any work)
    decisions_task, decisions = decisions_of(args)
    if decisions is not None:
        print(f"decisions: {args.decisions}, task {decisions_task} (mean "
              f"{statistics.mean(decisions.values()):.2f} of a layer's channels task-specific)",
              flush=True)

    # a TERM (the GPU suite's timeout) ends the phase under way; what was measured is reported
    signal.signal(signal.SIGTERM, _stop)
    phase = "memory"
    mem, equiv, n_cwps = {}, {}, 0
    timing = {"times_s": {n: [] for n in names}, "final_loss": {}, "stopped": False}
    try:
        # Memory first, while this process is still small (a child's ru_maxrss starts from
        # the parent's high-water mark at exec).
        if not args.skip_memory:
            print(
                f"memory: {len(names)} fresh subprocesses, {args.mem_steps} training steps each",
                flush=True,
            )
            run_memory(args, names, decisions_task, results=mem)

        phase = "build"
        print("building models ...", flush=True)
        models = build_all(names, args.model, args.seed, device, args.channels_last, decisions)
        # (the CWPS variants' count, whichever variant --variants names last)
        n_cwps = max(len(list(cwps_layers(m))) for m in models.values())
        equiv = check_equivalence(models, args, device)
        for n, r in equiv.items():
            print(
                f"  check {n} vs cwps-soft: |dloss| {r['loss_abs_diff']:.2e}, "
                f"max rel grad diff {r['max_rel_grad_diff']:.2e}",
                flush=True,
            )
        phase = "timing"
        print(f"timing: {args.warmup} warm-up + {args.steps} timed rounds, round-robin",
              flush=True)
        timing = run_timing(models, args, device)
        stopped = timing["stopped"]
    except Stopped:
        stopped = True
    # measuring is over: a TERM from here on (a second one) ends the run at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rounds = len(timing["times_s"]["finetune"])
    if stopped:
        print(f"\nSTOPPED (SIGTERM) in the {phase} phase, after {rounds} of {args.steps} timed "
              f"rounds and {len(mem)} of {0 if args.skip_memory else len(names)} memory "
              "workers: the figures below are over those", flush=True)

    # ---- report
    times = timing["times_s"]
    ft = statistics.median(times["finetune"]) if rounds else float("nan")
    rows = {}
    for n in names:
        row = {}
        if rounds:
            t = times[n]
            med = statistics.median(t)
            paired, ci = paired_ratio(t, times["finetune"])
            row.update({
                "median_ms": med * 1e3,
                "min_ms": min(t) * 1e3,
                "max_ms": max(t) * 1e3,
                "time_ratio": med / ft,
                "paired_time_ratio": paired,
                "paired_time_ratio_ci95": list(ci),
                "times_ms": [v * 1e3 for v in t],
                "final_loss": timing["final_loss"].get(n, float("nan")),
            })
        if n in mem:
            row.update(mem[n])
            if "finetune" in mem:
                base = mem["finetune"]
                row["mem_ratio"] = mem[n]["peak_growth_bytes"] / base["peak_growth_bytes"]
                row["saved_activation_ratio"] = (mem[n]["saved_activation_bytes"]
                                                 / base["saved_activation_bytes"])
        if row:
            rows[n] = row
    for n, (base, paired, ci) in (same_mode_ratios(times) if rounds else {}).items():
        rows[n].update(same_mode_base=base, paired_time_ratio_same_mode=paired,
                       paired_time_ratio_same_mode_ci95=list(ci))

    mem_unit = "peak RSS growth" if device.type == "cpu" else "peak alloc growth"
    w = max(15, *(len(n) for n in names))  # the variant column
    hdr = (
        f"{'variant':<{w}} {'median ms':>10} {'x finetune':>10} {'paired x':>9} {'95% CI':>13} "
        f"{mem_unit + ' MiB':>21} {'x finetune':>10} {'saved act MiB':>14} {'x finetune':>10}"
    )
    print()
    print(hdr)
    print("-" * len(hdr))
    for n in rows:
        r = rows[n]
        line = (
            f"{n:<{w}} {r['median_ms']:>10.1f} {r['time_ratio']:>10.3f} "
            f"{r['paired_time_ratio']:>9.3f} {r['paired_time_ratio_ci95'][0]:>6.3f}-"
            f"{r['paired_time_ratio_ci95'][1]:.3f}"
        ) if rounds else f"{n:<{w}} {'-':>10} {'-':>10} {'-':>9} {'-':>13}"
        if "mem_ratio" in r:
            line += (
                f" {r['peak_growth_bytes'] / MiB:>21.1f} {r['mem_ratio']:>10.3f}"
                f" {r['saved_activation_bytes'] / MiB:>14.1f}"
                f" {r['saved_activation_ratio']:>10.3f}"
            )
        print(line)
    print()
    same = [n for n in rows if "same_mode_base" in rows[n]]
    for n in same:  # like for like: compiled CWPS against fine-tuning compiled the same way
        lo, hi = rows[n]["paired_time_ratio_same_mode_ci95"]
        print(f"{n:<{w}} paired x {rows[n]['same_mode_base']}: "
              f"{rows[n]['paired_time_ratio_same_mode']:.3f} [95% CI {lo:.3f}-{hi:.3f}]")
    if same:
        print()

    verdict = {}
    for n in ("cwps-soft", "cwps-hard"):
        if n not in rows or not rounds:
            continue
        # the verdict uses the paired ratio: it is the drift-free estimate
        v = {"time_ok": rows[n]["paired_time_ratio"] <= TARGET_TIME}
        if "mem_ratio" in rows[n]:
            v["mem_ok"] = rows[n]["mem_ratio"] <= TARGET_MEM
        verdict[n] = v
        lo, hi = rows[n]["paired_time_ratio_ci95"]
        msg = (
            f"time {rows[n]['paired_time_ratio']:.3f} [95% CI {lo:.3f}-{hi:.3f}] "
            f"(<= {TARGET_TIME}: {'PASS' if v['time_ok'] else 'FAIL'})"
        )
        if "mem_ok" in v:
            msg += (
                f", memory {rows[n]['mem_ratio']:.3f} (<= {TARGET_MEM}: "
                f"{'PASS' if v['mem_ok'] else 'FAIL'})"
            )
        print(f"{n}: {msg}")
    if device.type == "cpu" and mem:
        notes = [n for n in mem if not mem[n].get("peak_reached_in_steps", True)]
        if notes:
            print(
                f"WARNING: ru_maxrss not raised by the training steps for {notes}; "
                "the growth figure there is an upper bound"
            )
    bad_loss = [n for n in names if rounds and not math.isfinite(rows[n]["final_loss"])]
    if bad_loss:
        print(f"WARNING: non-finite loss after training for {bad_loss}")
    wall = time.perf_counter() - t_start
    print(f"total wall time {wall:.0f} s")

    if args.out:
        result = {
            "config": {k: v for k, v in vars(args).items() if k != "_worker"},
            "env": {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "device_name": dev_name,
                "threads": torch.get_num_threads(),
                "platform": platform.platform(),
                "malloc_mmap_threshold": None
                if args.malloc_default or device.type != "cpu"
                else os.environ.get("MALLOC_MMAP_THRESHOLD_", str(1 << 20)),
            },
            "cwps_layers": n_cwps,
            # which channels the CWPS variants shared: random, or a job's (file, task)
            "decisions": "random" if decisions is None
            else {"results": args.decisions, "task": decisions_task},
            "targets": {"time_ratio_max": TARGET_TIME, "mem_ratio_max": TARGET_MEM},
            "equivalence_check": equiv,
            "variants": rows,
            "verdict": verdict,
            "wall_s": wall,
        }
        if stopped:  # (absent from a run that finished)
            result["stopped"] = {"in": phase, "rounds": rounds, "memory_workers": len(mem)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 3 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
