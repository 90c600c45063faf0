"""One autograd node that composes the soft / hard weights of many small CWPS layers.

Composing a small kernel costs little arithmetic but many small ops: the stage's mask and its
straight-through slope from the scores, the compose, and in the backward the child gradient,
the mask gradient and the score gradient, each an op (and an autograd node) of its own per layer.
At the digits job's shape (resnet18, batch 32, 32 px) that per-layer overhead cost more than the
arithmetic itself. A ``ComposeGroup`` composes all its layers' weights in one custom autograd
function when the first of them runs, and hands each layer its composed weight from there. The
gradients are those of the per-layer composition (``CWPSMixin._composed_by_autograd``) bit for
bit: the same ops on the same tensors, only batched into one node.

Compositions are shared only inside the forward of the model the group belongs to (a forward
pre-hook and an always-called forward hook on it, see ``surgery.group_small_kernels``), and one
composition serves one pass: it hands each layer its weight once, and a layer that asks again
(a layer run twice) starts a new composition, as the per-layer path composes at every call.
The forward hook drops the composition, so no state carries over between forwards, whatever
changed the weights in between (an optimiser step, a ``.data`` edit, a fused optimiser that does
not count versions). A layer called outside the model's forward (on its own, or in a
checkpointed region recomputed during the backward) is composed alone, through the same node.
Within a forward a layer whose own tensors, stage, threshold or grad mode changed since the
composition also starts a new one (a write that counts no version, through ``.data`` by a
hook inside the forward, is not seen there). A layer's gradient depends only on its own
tensors, so layers served by different compositions get the same gradients as from one.

Every member's parameters are inputs of a shared composition's node: a member the forward did
not use gets no gradient, as on the per-layer path, but hooks on its parameters run (with
None), and DDP without ``find_unused_parameters`` reduces a zero gradient for it instead of
stopping with its unused-parameter error. ``surgery.ungroup_small_kernels`` turns the groups
off. The node's backward is not itself differentiable (double backward raises); torch.compile,
torch.jit.trace and torch.func transforms take the per-layer path.

The node keeps its inputs (parameters and buffers) as attributes, not as saved tensors, and
checks their versions itself: a backward through it again (two losses of one forward, each
backpropagated) works as for the per-layer path, and activation checkpointing counts no tensors
of it. The group holds its layers by weak reference (a model dropped is freed at once, with no
cycle for the garbage collector), and each thread composes for itself.

``inject_cwps`` puts every small kernel (at most ``layers.KEEP_COMPOSED_NUMEL`` elements) of a
model into groups (``surgery.group_small_kernels``); layers made one by one compose on their own.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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
    """The composed weights of one compose call, and which layers it has served."""

    __slots__ = ("grad", "keys", "weights", "biases", "served")

    def __init__(self, grad: bool, keys: list, weights: list, biases: list):
        self.grad, self.keys, self.weights, self.biases = grad, keys, weights, biases
        self.served = [False] * len(keys)


class _Plan:
    """Where each layer's tensors sit in the node's flat inputs. Holds no layer: the node
    outlives the forward (the composition would otherwise keep every layer alive)."""

    def __init__(self, n: int, with_bias: list[int]):
        self.n, self.with_bias = n, with_bias

    def split(self, tensors):
        n, nb = self.n, len(self.with_bias)
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


def _compose(parents, parent_biases, children, biases, masks):
    """lerp(parent, child, mask) per layer; ``parent_biases``/``biases`` None where no bias."""
    weights = [torch.lerp(p, c, m.view(-1, *([1] * (c.dim() - 1))))
               for p, c, m in zip(parents, children, masks, strict=True)]
    out_biases = [None if b is None else torch.lerp(pb, b, m)
                  for pb, b, m in zip(parent_biases, biases, masks, strict=True)]
    return weights, out_biases


def _check_versions(tensors, versions) -> None:
    if any(t._version != v for t, v in zip(tensors, versions, strict=True)):
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            "inplace operation: a CWPS layer's child, bias, parent or scores changed between "
            "its ComposeGroup's forward and this backward")


class _GroupCompose(torch.autograd.Function):
    """(children, child biases, scores) of every layer -> (composed weights, composed biases).

    ``layers`` (given to the forward only) is the list of layers; the backward needs none."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, layers: list, *tensors):
        children, biases, logits = plan.split(tensors)
        masks, slopes = _masks(layers, logits)
        parents = [layer.parent_weight for layer in layers]
        parent_biases = [layer.parent_bias for layer in layers]
        bias_of = dict(zip(plan.with_bias, biases, strict=True))
        full_biases = [bias_of.get(i) for i in range(plan.n)]
        weights, out_biases = _compose(parents, parent_biases, children, full_biases, masks)
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.masks, ctx.slopes = plan, masks, slopes
        # kept as attributes (they are parameters and buffers, not intermediates): see module
        ctx.inputs = (children, biases, parents, [parent_biases[i] for i in plan.with_bias])
        flat = [*children, *biases, *parents, *ctx.inputs[3]]
        ctx.versions = [t._version for t in flat]
        return (*weights, *[out_biases[i] for i in plan.with_bias])

    @staticmethod
    @once_differentiable  # no double backward (the per-layer path has one for small kernels)
    def backward(ctx: Any, *grads):
        plan = ctx.plan
        children, biases, parents, parent_biases = ctx.inputs
        _check_versions([*children, *biases, *parents, *parent_biases], ctx.versions)
        n, nb = plan.n, len(plan.with_bias)
        need_child, need_bias, need_logits = plan.split(ctx.needs_input_grad[2:])
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
        return (None, None, *grad_children, *grad_biases, *grad_logits)


class ComposeGroup:
    """Composes the weights of ``layers`` (CWPS layers) together; see the module docstring."""

    def __init__(self, layers):
        self._refs = [weakref.ref(layer) for layer in layers]
        self._local = threading.local()
        for i, layer in enumerate(layers):
            layer.__dict__["_compose_group"] = (self, i)  # a plain attribute: not state

    @property
    def layers(self) -> list:
        return [ref() for ref in self._refs]

    def is_member(self, layer, index: int) -> bool:
        return self._refs[index]() is layer

    def __getstate__(self):  # copies and pickles start without a composition
        return {"layers": self.layers}

    def __setstate__(self, state):
        # a copy of the model (which holds its groups): its layers join the copied group (a
        # layer copied or pickled on its own leaves its group behind, CWPSMixin.__getstate__)
        layers = state["layers"]
        self._refs = [weakref.ref(layer) for layer in layers]
        self._local = threading.local()
        for i, layer in enumerate(layers):
            layer.__dict__["_compose_group"] = (self, i)

    # -- the model's forward (hooks that group_small_kernels puts on the model) ---------------
    def enter(self) -> None:
        # a fresh scope even if one seems open: a forward stopped by KeyboardInterrupt or
        # SystemExit never ran the exit hook (PyTorch calls it on Exception only). A model that
        # calls itself ends the outer scope at the inner exit: the rest compose alone.
        self._local.depth, self._local.composition = 1, None

    def exit(self) -> None:
        # nothing is handed out after the forward: no state carries over
        self._local.depth, self._local.composition = 0, None

    def weights(self, index: int) -> tuple[Tensor, Tensor | None]:
        """The composed weight and bias of ``self.layers[index]`` (in the soft / hard stage):
        inside the model's forward from the composition of the whole group, outside it (a layer
        called on its own, a checkpointed region recomputed in the backward) composed alone."""
        key = _inputs_key(self._refs[index]())
        if not getattr(self._local, "depth", 0):
            c = self._compose(index, key, alone=True)
            return c.weights[index], c.biases[index]
        c = getattr(self._local, "composition", None)
        if (c is None or c.served[index] or c.grad != torch.is_grad_enabled()
                or c.keys[index] != key):
            c = self._compose(index, key)
        c.served[index] = True
        return c.weights[index], c.biases[index]

    def _compose(self, index: int, key: tuple, alone: bool = False) -> _Composition:
        everyone = self.layers
        n = len(everyone)
        members = [i for i in range(n) if everyone[i] is not None
                   and (i == index or (not alone and everyone[i].stage != "finetune"))]
        layers = [everyone[i] for i in members]
        keys: list = [None] * n
        for i in members:
            keys[i] = key if i == index else _inputs_key(everyone[i])
        children = [layer.weight for layer in layers]
        biases = [layer.bias for layer in layers if layer.bias is not None]
        logits = [layer.mask_logits for layer in layers]
        grad = torch.is_grad_enabled()
        plan = _Plan(len(layers), [j for j, layer in enumerate(layers) if layer.bias is not None])
        if grad and any(t.requires_grad for t in (*children, *biases, *logits)):
            out = _GroupCompose.apply(plan, layers, *children, *biases, *logits)
            w, b_out = list(out[:len(layers)]), out[len(layers):]
            b = [None] * len(layers)
            for k, j in enumerate(plan.with_bias):
                b[j] = b_out[k]
        else:
            with torch.no_grad():
                masks, _ = _masks(layers, logits)
                w, b = _compose([layer.parent_weight for layer in layers],
                                [layer.parent_bias for layer in layers], children,
                                [layer.bias for layer in layers], masks)
        weights, out_biases = [None] * n, [None] * n
        for j, i in enumerate(members):
            weights[i], out_biases[i] = w[j], b[j]
        comp = _Composition(grad, keys, weights, out_biases)
        if not alone:
            self._local.composition = comp
        return comp


def enter_forward(model, args) -> None:
    """Forward pre-hook of a model with ComposeGroups: its layers share a composition."""
    if not torch.compiler.is_compiling():
        for group in model.__dict__.get("_compose_groups", ()):
            group.enter()


def exit_forward(model, args, output) -> None:
    """Forward hook (always called, errors included): the composition is dropped."""
    if not torch.compiler.is_compiling():
        for group in model.__dict__.get("_compose_groups", ()):
            group.exit()

