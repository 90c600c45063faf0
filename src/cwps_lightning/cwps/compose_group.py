"""One autograd node that composes the soft / hard weights of many small CWPS layers.

Composing a small kernel costs little arithmetic but many small ops: the stage's mask and its
straight-through slope from the scores, the compose, and in the backward the child gradient,
the mask gradient and the score gradient, each an op (and an autograd node) of its own per layer.
At the digits job's shape (resnet18, batch 32, 32 px) that per-layer overhead cost more than the
arithmetic itself. A ``ComposeGroup`` composes all its layers' weights in one custom autograd
function the first time one of them runs in a forward, and keeps the results until the inputs
change; the layers take their composed weight from it. The gradients are those of the
per-layer composition (``CWPSMixin._composed_by_autograd``) bit for bit: the same ops on the
same tensors, only batched into one node.

A composition is reused by every later forward for as long as each layer's own tensors,
stage, threshold and mask gradient rule, and the grad mode, are what they were when it was
made, and no backward has gone through it; otherwise the whole group is composed again. Each
layer checks only its own inputs: a layer whose inputs did not change gets a composed weight
that is still exact, and a layer whose inputs changed makes a new node for all (the older node
still gives the layers that used it their gradients: a layer's gradient never depends on
another layer's tensors).

``inject_cwps`` puts every small kernel (at most ``layers.KEEP_COMPOSED_NUMEL`` elements) of a
model into one group; layers made one by one compose on their own, as before.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from .layers import _SCRATCH, _stage_mask, mask_slope


def _inputs_key(layer) -> tuple:
    """What a layer's composed weight depends on, cheap to compare."""
    w, s, p = layer.weight, layer.mask_logits, layer.parent_weight
    key = (layer.stage, layer.threshold, layer.mask_grad, id(w), w.data_ptr(), w._version,
           w.requires_grad, id(s), s.data_ptr(), s._version, s.requires_grad,
           id(p), p.data_ptr(), p._version)
    b = layer.bias
    if b is not None:
        pb = layer.parent_bias
        key += (id(b), b.data_ptr(), b._version, b.requires_grad, id(pb), pb.data_ptr(),
                pb._version)
    return key


class _Composition:
    """The composed weights of one compose call, and whether a backward went through them."""

    __slots__ = ("grad", "keys", "weights", "biases", "consumed", "__weakref__")

    def __init__(self, grad: bool, keys: list, weights: list, biases: list):
        self.grad, self.keys, self.weights, self.biases = grad, keys, weights, biases
        self.consumed = False


class _Plan:
    """Which layers a compose call covers, and where their tensors sit in the flat inputs."""

    def __init__(self, layers: list):
        self.layers = layers
        self.with_bias = [i for i, layer in enumerate(layers) if layer.bias is not None]
        # a weak reference: the composition holds the node's outputs, which hold the node, which
        # holds this plan (a strong one would be a cycle that only the garbage collector frees)
        self.composition: weakref.ref | None = None

    def split(self, tensors):
        n, nb = len(self.layers), len(self.with_bias)
        return tensors[:n], tensors[n:n + nb], tensors[n + nb:]


def _masks(layers: list, logits) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer, the stage's mask (in the parent's dtype) and dmask/dscores.

    Layers that agree on stage, threshold, mask gradient rule, dtypes and device (as a model's
    do) get theirs from one pass over all their scores at once: the same elementwise ops, a few
    ops in all instead of a few per layer."""
    first, s0 = layers[0], logits[0]
    rule = (first.stage, first.threshold, first.mask_grad, first.parent_weight.dtype)
    if len(layers) > 1 and all(
        (layer.stage, layer.threshold, layer.mask_grad, layer.parent_weight.dtype) == rule
        and s.dtype == s0.dtype and s.device == s0.device and s.dim() == 1
        for layer, s in zip(layers, logits, strict=True)
    ):
        hard = first.stage == "hard"
        mask, sig = _stage_mask(torch.cat(logits), hard, first.threshold)
        if mask.dtype != rule[3]:
            mask = mask.to(rule[3])
        sizes = [s.numel() for s in logits]
        slope = mask_slope(sig, hard, first.mask_grad)
        return list(mask.split(sizes)), list(slope.split(sizes))
    masks, slopes = [], []
    for layer, s in zip(layers, logits, strict=True):
        hard = layer.stage == "hard"
        mask, sig = _stage_mask(s, hard, layer.threshold)
        if mask.dtype != layer.parent_weight.dtype:
            mask = mask.to(layer.parent_weight.dtype)
        masks.append(mask)
        slopes.append(mask_slope(sig, hard, layer.mask_grad))
    return masks, slopes


def _compose(layers: list, children, biases, masks) -> tuple[list[Tensor], list[Tensor | None]]:
    weights, out_biases, bias_iter = [], [], iter(biases)
    for layer, c, m in zip(layers, children, masks, strict=True):
        weights.append(torch.lerp(layer.parent_weight, c, m.view(-1, *([1] * (c.dim() - 1)))))
        out_biases.append(None if layer.bias is None
                          else torch.lerp(layer.parent_bias, next(bias_iter), m))
    return weights, out_biases


class _GroupCompose(torch.autograd.Function):
    """(children, child biases, scores) of every layer -> (composed weights, composed biases)."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, *tensors):
        children, biases, logits = plan.split(tensors)
        masks, slopes = _masks(plan.layers, logits)
        weights, out_biases = _compose(plan.layers, children, biases, masks)
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.masks, ctx.slopes = plan, masks, slopes
        parents = [layer.parent_weight for layer in plan.layers]
        parents += [plan.layers[i].parent_bias for i in plan.with_bias]
        ctx.save_for_backward(*children, *biases, *parents)
        return (*weights, *[out_biases[i] for i in plan.with_bias])

    @staticmethod
    def backward(ctx: Any, *grads):
        plan = ctx.plan
        comp = plan.composition() if plan.composition is not None else None
        if comp is not None:  # its saved tensors may be freed now: the next forward composes
            comp.consumed = True
            comp.weights = comp.biases = None
        n, nb = len(plan.layers), len(plan.with_bias)
        saved = ctx.saved_tensors
        children, biases = saved[:n], saved[n:n + nb]
        parents, parent_biases = saved[n + nb:2 * n + nb], saved[2 * n + nb:]
        need_child, need_bias, need_logits = plan.split(ctx.needs_input_grad[1:])
        g_weights, g_biases = grads[:n], grads[n:]
        grad_children, grad_logits = [None] * n, [None] * n
        grad_biases = [None] * nb
        bias_slot = {i: k for k, i in enumerate(plan.with_bias)}
        for i in range(n):
            gw, m = g_weights[i], ctx.masks[i]
            k = bias_slot.get(i)
            gb = None if k is None else g_biases[k]
            if gw is None and gb is None:
                continue  # the layer did not take part in the loss
            c, p = children[i], parents[i]
            if gw is None:
                gw = torch.zeros_like(c)
            if need_logits[i]:
                # dL/dm = <dL/dw, child - parent> (+ dL/db * (b_child - b_parent)), as
                # autograd's lerp backward computes it
                dm = torch.sub(c, p, out=_SCRATCH.like(c)).mul_(gw)
                dm = dm.sum(dim=tuple(range(1, c.dim())))
                if k is not None and gb is not None:
                    dm.add_(gb * (biases[k] - parent_biases[k]))
                grad_logits[i] = dm.mul_(ctx.slopes[i])
            if need_child[i]:
                # in place: dL/dw is the conv / linear weight gradient of this layer's own op
                # (fresh, or autograd's sum of them), nobody else's
                grad_children[i] = gw.mul_(m.view(-1, *([1] * (c.dim() - 1))))
            if k is not None and gb is not None and need_bias[k]:
                grad_biases[k] = gb * m
        return (None, *grad_children, *grad_biases, *grad_logits)


class ComposeGroup:
    """Composes the weights of ``layers`` (CWPS layers) together; see the module docstring."""

    def __init__(self, layers):
        self.layers = list(layers)
        self._composition: _Composition | None = None
        for i, layer in enumerate(self.layers):
            layer.__dict__["_compose_group"] = (self, i)  # a plain attribute: not state

    def __getstate__(self):  # copies and pickles start without a composition
        return {"layers": self.layers, "_composition": None}

    def weights(self, index: int) -> tuple[Tensor, Tensor | None]:
        """The composed weight and bias of ``self.layers[index]`` (in the soft / hard stage)."""
        key = _inputs_key(self.layers[index])
        c = self._composition
        if (c is None or c.consumed or c.grad != torch.is_grad_enabled()
                or c.keys[index] != key):
            c = self._compose(index, key)
        return c.weights[index], c.biases[index]

    def _compose(self, index: int, key: tuple) -> _Composition:
        n = len(self.layers)
        members = [i for i in range(n) if i == index or self.layers[i].stage != "finetune"]
        layers = [self.layers[i] for i in members]
        keys: list = [None] * n
        for i in members:
            keys[i] = key if i == index else _inputs_key(self.layers[i])
        children = [layer.weight for layer in layers]
        biases = [layer.bias for layer in layers if layer.bias is not None]
        logits = [layer.mask_logits for layer in layers]
        grad = torch.is_grad_enabled()
        plan = _Plan(layers)
        if grad and any(t.requires_grad for t in (*children, *biases, *logits)):
            out = _GroupCompose.apply(plan, *children, *biases, *logits)
            w, b_out = list(out[:len(layers)]), out[len(layers):]
            b = [None] * len(layers)
            for k, i in enumerate(plan.with_bias):
                b[i] = b_out[k]
        else:
            with torch.no_grad():
                masks, _ = _masks(layers, logits)
                w, b = _compose(layers, children, biases, masks)
        weights, out_biases = [None] * n, [None] * n
        for j, i in enumerate(members):
            weights[i], out_biases[i] = w[j], b[j]
        comp = _Composition(grad, keys, weights, out_biases)
        plan.composition = weakref.ref(comp)
        self._composition = comp
        return comp
