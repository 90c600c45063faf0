"""Compose at the optimiser step: the CWPS layers' ``compose="step"`` mode and its SGD.

In the default mode (``compose="forward"``) a CWPS layer composes its weight
``w = parent + m * (child - parent)`` in every forward and autograd takes the gradient through
the compose to the child and the mask scores. That costs passes over the weights in the
forward and the backward, and per layer a Python autograd function (layers._ComposedOp).

In ``compose="step"`` the layer keeps its composed weight (``composed_weight`` /
``composed_bias``, buffers left out of the state dict) and runs as the plain layer on it:
forward and backward are fine-tuning's. The gradient lands on that weight (a leaf tensor over
it), and :class:`StepComposeSGD`'s step takes it to the child and the mask scores, steps them
as SGD does and writes the next composed weight, every layer in one function
(torch.compile'd unless ``compiled=False``):

    dL/dchild = m * dL/dw                                  (+ any gradient the child has)
    dL/ds     = mask_slope(s) * <dL/dw, child - parent>    (+ dL/db (b_child - b_parent))
    child, s  <- SGD (momentum, weight decay; the scores' group's own)
    w         <- parent + m' * (child - parent)            (m' the mask of the new scores)

These are the numbers of the forward mode followed by SGD, to rounding (the compiled function
sums and fuses in its own order). In the hard stage the shared channels' child rows stand
still and their momentum rows are zeroed, which is what cwps.freeze.SharedChannelFreeze gives
the forward mode (it holds the rows and zeroes the momentum when a channel turns specific
again: the weights are the same; only a return from the hard stage to the soft or finetune
stage differs, where the forward mode applies the momentum the shared rows kept). A layer takes part in a
step as torch's SGD would step its tensors: when it ran, when they have a gradient of their
own (a penalty; a gradient folded by CWPSMixin.fold_step_gradient when the kept weight had to
change before the step, or that a backward through a weight it had let go brought), or with
kept zeros after ``zero_grad(set_to_none=False)`` where it had a gradient before. Parameters of layers in the finetune stage, of layers in the
forward mode and of everything else (normalisation layers, heads) are stepped by an inner SGD
over the same parameter groups (``make_rest``, default torch.optim.SGD), which shares this
optimiser's state, so ``state_dict`` and ``load_state_dict`` hold every momentum buffer.

Gradient clipping (``torch.nn.utils.clip_grad_norm_`` over ``model.parameters()``) is not
refused here, only by the job (``trainer.gradient_clip_val``), and clips the wrong norm: the
children's gradients are the composed weights', which the model's parameters leave out
(the children then step thousands of times further than the same clip gives in the forward
mode). Do not clip in step mode.

Limits, each refused with an error where it would apply: StepComposeSGD alone steps these
layers' children and scores in the soft and hard stages (another optimiser's step over them is
refused: their gradient is the composed weight's); SGD without dampening or nesterov;
the stock CWPSConv2d / CWPSLinear (not the transformed timm layers); not under
torch.jit.trace. Under torch.distributed it needs ``process_group`` (the DDP model's): the step
averages the composed weights' gradients (and the children's and scores' own) over the ranks in
one all-reduce, as DDP averages the other gradients, after a small one in which the ranks
agree on which gradients exist (one a rank lacks is a zero there); the DDP model must leave the children, scores and composed weights alone
(``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``: they get no
gradient in the backward, which DDP would wait for), and since DDP then does not broadcast them
at the wrap either, give every rank rank 0's values first (the Lightning module does). Under torch.compile each such layer is a graph break (the leaf its gradient goes to)
and runs eagerly: the numbers are the same, the compiler's gain is lost there. Zero the
gradients with the optimiser's ``zero_grad`` (``model.zero_grad()`` does not reach the
composed weights' gradients); a step drops them too, and refuses a backward that comes after it
through a forward recorded before it (CWPSMixin.let_go_at_step).

What it buys is measured by ``benchmarks/layer_overhead.py`` (variants ``cwps-step-soft`` and
``cwps-step-hard``): the step's passes over the weights cost about the same at every input
size, so it pays where activations are large (resnet18 at 112 px) and costs more than the
forward compose where they are small (the default job's 32 px); see the README.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .freeze import row_matrix
from .layers import STEP_LAYERS, CWPSConv2d, CWPSLinear, _stage_mask, mask_slope
from .surgery import check_model, cwps_layers, require_cwps_layers

COMPOSE_MODES = ("forward", "step")


def trained_tensors(layer) -> list[Tensor]:
    """What a CWPS layer trains: its child weight, child bias (where it has one) and mask
    scores (whether or not they require a gradient)."""
    return [p for p in (layer.weight, layer.bias, layer.mask_logits) if p is not None]


def held_scalar(held: dict, key, value: float, device, dtype=torch.float32) -> Tensor:
    """``value`` as a 0-dim tensor kept in ``held`` under ``key`` (with the value it holds) and
    written in place when the value moves: a new tensor per step would be a host-to-device copy
    on a GPU, which waits for the work queued before it (fill_ is queued like any kernel)."""
    entry = held.get(key)
    if entry is None:
        entry = held[key] = [torch.tensor(value, device=device, dtype=dtype), value]
    elif entry[1] != value:
        entry[0].fill_(value)
        entry[1] = value
    return entry[0]


def use_step_compose(model: nn.Module) -> int:
    """Put every CWPS layer of ``model`` in ``compose="step"`` (in place; the layers keep
    their parameters, a composed weight and bias are added as non-persistent buffers in the
    child's memory format). Every layer is checked before any changes. Returns how many; a
    model with no CWPS layers (inject_cwps first) raises ValueError."""
    layers = require_cwps_layers(model, "use_step_compose")
    for name, layer in layers:
        if type(layer) not in (CWPSConv2d, CWPSLinear):
            raise ValueError(f"compose='step': {name or 'the model'} is a "
                             f"{type(layer).__name__}; only CWPSConv2d and CWPSLinear compose "
                             "at the step (use compose='forward')")
    _refuse_other_optimisers()
    for _, layer in layers:
        STEP_LAYERS.add(layer)  # (what the refusal of other optimisers looks at)
        if layer.compose == "step":
            continue
        # allocated at the first forward of the soft / hard stage (CWPSMixin.recompose)
        layer.register_buffer("composed_weight", None, persistent=False)
        layer.register_buffer("composed_bias", None, persistent=False)
        layer.__dict__["_compose"] = "step"
        layer.__dict__["_step_key"] = None
    return len(layers)


_REFUSING: list = []  # the hook's handle, once registered


def _refuse_other_optimisers() -> None:
    """From the first use_step_compose on, a step of any optimiser but StepComposeSGD (and
    its inner SGD) over the child or scores of a layer that composes at the step, in the soft
    or hard stage, is refused: their gradient goes to the composed weight, which only
    StepComposeSGD takes to them, so another optimiser left them untrained without a word
    (torch's SGD and Adam skip a parameter without a gradient)."""
    if not _REFUSING:
        _REFUSING.append(register_optimizer_step_pre_hook(_check_step))


def _check_step(optimizer, args, kwargs) -> None:
    if isinstance(optimizer, StepComposeSGD) or getattr(optimizer, "_steps_for_compose", False):
        return
    trained = {id(t): (t, layer) for layer in list(STEP_LAYERS)
               if layer.compose == "step" and layer.stage != "finetune"
               for t in trained_tensors(layer)}
    if not trained:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            t, layer = trained.get(id(p), (None, None))
            if t is p:
                raise RuntimeError(
                    f"{type(optimizer).__name__} steps the child or mask scores of a CWPS layer "
                    f"that composes at the step (use_step_compose), in the {layer.stage} stage: "
                    f"the gradient goes to its composed weight, which only StepComposeSGD takes "
                    f"to them, so they would not train; use StepComposeSGD(params, "
                    f"model=model), or use_forward_compose(model) first")


def release_composed(model: nn.Module) -> int:
    """Free the composed weights the step-compose layers of ``model`` keep (the next forward
    of a soft / hard stage composes them again): memory back for evaluation or a merge. A
    gradient of theirs that no step has taken yet goes to the children and the scores first
    (CWPSMixin.fold_step_gradient)."""
    n = 0
    for _, layer in cwps_layers(check_model(model, "release_composed")):
        if layer.compose != "step" or layer.composed_weight is None:
            continue
        layer.fold_step_gradient()
        layer.composed_weight = None
        layer.composed_bias = None
        layer.__dict__["_step_key"] = None
        layer.__dict__["_step_leaves"] = None
        n += 1
    return n


def use_forward_compose(model: nn.Module) -> int:
    """Back to ``compose="forward"``: the composed buffers go. Returns how many layers; a
    model with no CWPS layers (never injected, or merged) raises ValueError, as
    use_step_compose does."""
    n = 0
    for _, layer in require_cwps_layers(model, "use_forward_compose"):
        if layer.compose != "step":
            continue
        if layer.composed_weight is not None:  # (a pending gradient: the children's now)
            layer.fold_step_gradient()
        for name in ("composed_weight", "composed_bias"):
            del layer._buffers[name]
        for key in ("_compose", "_step_key", "_step_leaves", "_step_stage"):
            layer.__dict__.pop(key, None)
        STEP_LAYERS.discard(layer)
        n += 1
    return n


def _rows(t: Tensor) -> Tensor:
    rows = row_matrix(t)
    if rows is None:
        raise ValueError(f"compose='step' needs each channel's values dense in memory, got "
                         f"shape {tuple(t.shape)} strides {t.stride()}")
    return rows


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """The same shape and the same strides along every dimension longer than 1: the same
    elements at the same offsets. A size-1 dimension's stride is free (autograd keeps such a
    gradient as the backward made it: a 1x1 kernel of an NCHW model fed channels_last inputs
    gets strides (K, 1, K, K) where the kernel has (K, 1, 1, 1)), so it is not compared."""
    return a.shape == b.shape and all(
        sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True) if n > 1)


def _like(p: Tensor, t: Tensor) -> Tensor:
    """``t`` laid out as ``p`` (itself where it is): compose_step reads both as [C, K] rows."""
    if _same_layout(t, p):
        return t
    return torch.empty_like(p.detach()).copy_(t)


def _sgd(p: Tensor, d: Tensor, mom: Tensor | None, lr: Tensor, momentum: float,
         keep: Tensor | None) -> None:
    """p -= lr * (momentum * mom + d), the momentum buffer updated; rows where ``keep`` is
    False stand still and their buffer rows are zeroed."""
    if mom is not None:
        d = momentum * mom + d
        mom.copy_(d if keep is None else torch.where(keep, d, 0.0))
    p.copy_(p - lr * d if keep is None else torch.where(keep, p - lr * d, p))


def compose_step(layers: list) -> None:
    """One SGD step of each layer's child and scores from its composed weight's gradient,
    then the composed weights of the new scores. Per layer a tuple
    (scores, hard, threshold, mask_grad, score_step, parts), ``score_step`` None or
    (momentum buffer or None, extra gradient or None, lr, momentum, weight_decay), a part
    (weight, then bias) being (grad, child, parent, composed, child_step) as [C, K] rows,
    ``child_step`` None or (buffer, extra, lr, momentum, weight_decay) likewise. ``lr``: 0-dim
    tensors (graph inputs, not constants of a compiled graph: schedulers change them)."""
    for scores, hard, threshold, mask_grad, score_step, parts in layers:
        m, sig = _stage_mask(scores, hard, threshold)
        m = m.to(parts[0][2].dtype)[:, None]
        keep = (m > 0) if hard else None
        if score_step is not None:
            mom, extra, lr, momentum, decay = score_step
            dot = sum((g * (child - parent)).sum(1) for g, child, parent, _, _ in parts)
            d = mask_slope(sig, hard, mask_grad) * dot.to(scores.dtype)
            if extra is not None:
                d = d + extra
            if decay:
                d = d + decay * scores
            _sgd(scores, d, mom, lr, momentum, None)
        for g, child, _, _, child_step in parts:
            if child_step is not None:
                mom, extra, lr, momentum, decay = child_step
                d = m * g
                if extra is not None:
                    d = d + extra
                if decay:
                    d = d + decay * child
                _sgd(child, d, mom, lr, momentum, keep)
        m_next = _stage_mask(scores, hard, threshold)[0].to(parts[0][2].dtype)[:, None]
        for _, child, parent, w, _ in parts:
            w.copy_(torch.lerp(parent, child, m_next))


class StepComposeSGD(torch.optim.Optimizer):
    """SGD for a model whose CWPS layers compose at the step (see the module docstring).

    ``params``: parameters or parameter groups as torch.optim.SGD takes them (the mask scores
    usually in a group of their own, without weight decay). ``model``: the model, its CWPS
    layers put in ``compose="step"`` by :func:`use_step_compose` first. ``make_rest``: builds
    the inner SGD for every parameter with a gradient of its own, from a list of groups
    (default torch.optim.SGD). ``compiled``: compose_step under torch.compile (the first step
    compiles it; False runs it eagerly).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, model: nn.Module,
                 make_rest: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
                 compiled: bool = True, process_group=None):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        for group in self.param_groups:
            extra = sorted(set(group) - {"params", "lr", "momentum", "weight_decay"})
            if extra:
                raise ValueError(f"StepComposeSGD steps plain SGD (lr, momentum, weight_decay "
                                 f"per group); a group sets {extra}")
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        self.layers = [layer for _, layer in cwps_layers(model)
                       if any(id(p) in self._group_of for p in trained_tensors(layer))]
        if not self.layers:
            raise ValueError("StepComposeSGD: these parameters train none of the model's CWPS "
                             "layers")
        forward = sum(layer.compose != "step" for layer in self.layers)
        if forward:
            raise ValueError(f"StepComposeSGD: {forward} of the {len(self.layers)} CWPS layers "
                             "it trains compose in the forward (call "
                             "cwps.step_compose.use_step_compose(model) first)")
        groups = [dict(g) for g in self.param_groups]
        if make_rest is None:
            self._rest = torch.optim.SGD(groups, lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)
        else:
            self._rest = make_rest(groups)
        self._rest.state = self.state  # one state: momentum buffers by parameter
        self._rest._steps_for_compose = True  # (its step is this one's: _check_step)
        self._step = torch.compile(compose_step) if compiled else compose_step
        self.process_group = process_group
        self._lrs: dict = {}  # (id(group), device, dtype) -> [0-dim lr tensor, its value]
        self._zeros_kept = False  # the last zero_grad's set_to_none=False (_takes_part)
        # what torch's SGD would find a gradient tensor on (zeroed or not): stepped since the
        # last zero_grad(set_to_none=True)
        self._stepped_before: set[int] = set()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._lrs = {}  # (the groups are new dicts)
        self._rest.state = self.state
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._zeros_kept = not set_to_none
        if set_to_none:  # (torch's SGD would find no gradient on them, zeroed or not, after it)
            self._stepped_before.clear()
        # the leaves stay: a forward may have run already (Lightning zeroes between its
        # forward and its backward), and its backward writes into them
        for layer in self.layers:
            for leaf in layer.__dict__.get("_step_leaves") or ():
                if leaf is not None and leaf.grad is not None:
                    if set_to_none:
                        leaf.grad = None
                    else:
                        leaf.grad.zero_()

    def _hyper(self, p: Tensor, grads: list | None, rows: bool = True):
        """(momentum buffer, extra gradient, lr, momentum, weight decay) for ``p``, or None
        where this optimiser does not train it. The extra gradient (``p``'s own ``.grad``:
        a penalty on the scores) is taken from ``p`` for the step and kept in ``grads``.
        ``grads`` None: a dry run (precompile), at lr 0 with a scratch buffer and no extra.
        ``rows``: buffer and extra gradient as [C, K] rows (a child's; the scores stay 1-D)."""
        shape = _rows if rows else (lambda t: t)
        group = self._group_of.get(id(p))
        if group is None or not p.requires_grad:
            return None
        extra = None if grads is None else p.grad
        if extra is not None:
            grads.append((p, extra))
            p.grad = None  # the inner SGD must not step it as well
            extra = shape(_like(p, extra))
        mom = None
        if group["momentum"]:
            if grads is None:
                mom = torch.zeros_like(p.detach())
            else:
                state = self.state[p]
                if state.get("momentum_buffer") is None:  # zeros + d: SGD's first buffer, d
                    state["momentum_buffer"] = torch.zeros_like(p.detach())
                # (a buffer from before a change of memory format: its rows in p's order)
                mom = state["momentum_buffer"] = _like(p, state["momentum_buffer"])
            mom = shape(mom)
        if grads is not None:
            self._stepped_before.add(id(p))
        lr = self._lr_tensor(0.0 if grads is None else float(group["lr"]), group, p)
        return mom, extra, lr, float(group["momentum"]), float(group["weight_decay"])

    def _lr_tensor(self, value: float, group: dict, p: Tensor) -> Tensor:
        """``group``'s lr as a 0-dim tensor on ``p``'s device, in float32 (float64 for float64
        parameters; torch's SGD keeps its lr a double, and a bf16 lr would be off by up to
        0.4%): one tensor per group and device (held_scalar), written in place when a
        scheduler moves the lr; per group, since two groups whose lrs met (both 0 at the end
        of a schedule) would otherwise share one, which recompiles the step."""
        dtype = torch.promote_types(p.dtype, torch.float32)
        return held_scalar(self._lrs, (id(group), p.device, dtype), value, p.device, dtype)

    def _items(self, taken: list | None) -> tuple[list, list]:
        """compose_step's input for the layers with a composed weight's gradient (``taken``
        None: every layer in the soft / hard stage, from zero gradients), and those layers."""
        items, stepped = [], []
        for layer in self.layers:
            if layer.compose != "step":  # (its hard stage would step without a freeze)
                raise RuntimeError(f"StepComposeSGD: a {type(layer).__name__} it trains "
                                   "composes in the forward again (use_forward_compose): "
                                   "train it with torch's SGD and SharedChannelFreeze instead")
            if layer.stage == "finetune":  # the child has its own gradient, the inner SGD's
                layer.fold_step_gradient()  # (and so has a soft / hard one not stepped yet)
                continue
            leaves = layer.__dict__.get("_step_leaves") or (None, None)
            ran = [leaf is not None and leaf.grad is not None for leaf in leaves]
            if taken is not None and not any(
                    self._takes_part(any(ran), q) for q in trained_tensors(layer)):
                continue  # not run since the last step, nothing of its own: SGD skips it too
            if layer._recompose_if_stale():  # (its gradient, if any, is the child's and
                leaves = (None, None)            # the scores' now)
            parts = []
            for i, kind in enumerate(("weight", "bias")):
                child = getattr(layer, kind)
                if child is None:
                    continue
                w = getattr(layer, f"composed_{kind}")
                g = None if taken is None or leaves[i] is None else leaves[i].grad
                g = torch.zeros_like(w) if g is None else g
                tensors = (g, child.detach(), getattr(layer, f"parent_{kind}"), w)
                if not all(_same_layout(t, w) for t in tensors):
                    raise ValueError(f"compose='step': the {kind} tensors of a "
                                     f"{type(layer).__name__} are not laid out alike (move the "
                                     "model with .to(memory_format=), then step)")
                steps = taken is None or self._takes_part(ran[i], child)
                parts.append((*(_rows(t) for t in tensors),
                              self._hyper(child, taken) if steps else None))
            scores = layer.mask_logits
            steps = taken is None or self._takes_part(any(ran), scores)
            items.append((scores.detach(), layer.stage == "hard", layer.threshold,
                          layer.mask_grad,
                          self._hyper(scores, taken, rows=False) if steps else None, parts))
            stepped.append(layer)
        return items, stepped

    def _average(self, ranks: int) -> None:
        """Average over the ranks, in one all-reduce, every gradient of these layers that DDP
        does not see: the composed weights', and the children's and scores' own (a finetune
        stage's, a penalty's). The ranks first agree on which exist (a small all-reduce): one
        that a rank lacks (a layer it did not run, a penalty only it had) is a zero there,
        as DDP reduces an unused parameter's gradient."""
        # a slot: (layer, 0 / 1) the leaf over its kept weight / bias; (None, p) a tensor it
        # trains (trained_tensors), with its own gradient. Every rank lists them in one order.
        slots = []
        for layer in self.layers:
            leaves = layer.__dict__.get("_step_leaves") or (None, None)
            slots += [((layer, i), leaves[i] is not None and leaves[i].grad is not None)
                      for i, kept in enumerate((layer.weight, layer.bias)) if kept is not None]
            slots += [((None, p), p.grad is not None) for p in trained_tensors(layer)]
        if not slots:
            return
        device = self.layers[0].weight.device
        present = torch.tensor([float(has) for _, has in slots], device=device)
        torch.distributed.all_reduce(present, op=torch.distributed.ReduceOp.MAX,
                                     group=self.process_group)
        grads = []
        for (slot, has), anywhere in zip(slots, present.tolist(), strict=True):
            if not anywhere:
                continue
            grads.append(self._slot_grad(*slot) if has else self._zero_slot(*slot))
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, group=self.process_group)
        flat.div_(ranks)
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view(g.shape))  # (reshape(-1) flattened in logical order)

    @staticmethod
    def _slot_grad(layer, which) -> Tensor:
        """The gradient in a slot of _average: a leaf's (``layer``, 0 / 1) or a trained
        tensor's own (None, the tensor)."""
        if layer is None:
            return which.grad
        return layer.__dict__["_step_leaves"][which].grad

    @staticmethod
    def _zero_slot(layer, which) -> Tensor:
        """A zero gradient in a slot of _average (the leaf made where the layer has none)."""
        if layer is None:
            which.grad = torch.zeros_like(which.detach())
            return which.grad
        layer._recompose_if_stale()
        leaf = layer._step_leaf_pair()[which]
        leaf.grad = torch.zeros_like(leaf.detach())
        return leaf.grad

    def _takes_part(self, ran: bool, p: Tensor) -> bool:
        """Whether ``p`` (a child, bias or scores) is stepped now, as torch's SGD would step
        it: ``ran`` (the composed weight has a gradient through it), or it has a gradient of
        its own (a penalty, a folded gradient), or the last zero_grad kept zeros and ``p`` was
        stepped since the last zero_grad(set_to_none=True) (SGD steps a zero gradient: decay
        and momentum)."""
        if not p.requires_grad:
            return False
        return ran or p.grad is not None or (self._zeros_kept and id(p) in self._stepped_before)

    def _run(self, items: list) -> None:
        """compose_step over ``items``; a compiler that fails (no C++ compiler for inductor on
        the CPU, say) is named with the ways around it. It fails before the step runs, so
        nothing has been written."""
        try:
            self._step(items)
        except Exception as err:
            from torch._dynamo.exc import BackendCompilerFailed  # (loaded with torch.compile)

            if not isinstance(err, BackendCompilerFailed):
                raise
            inner = getattr(err, "inner_exception", None) or err  # (the compiler's own error)
            text = str(inner).strip()
            reason = f"{type(inner).__name__}: {text.splitlines()[0]}" if text else \
                type(inner).__name__
            raise RuntimeError(
                f"StepComposeSGD: torch.compile could not compile the optimiser step ({reason}); "
                "pass compiled=False to run it eagerly (slower), or train with "
                "cwps.compose=forward (use_forward_compose and torch's SGD)") from err

    @torch.no_grad()
    def precompile(self) -> None:
        """Compile the step for the layers' present stages before the first step (a compile
        inside a step counts in its time and peak memory): one step at lr 0 from zero
        gradients, which leaves children, scores and this optimiser's state as they were and
        rewrites the composed weights (the same, to the compiled lerp's rounding)."""
        items, stepped = self._items(None)
        if items:
            self._run(items)
        for layer in stepped:
            layer._composed_current()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ranks = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = torch.distributed.get_world_size(self.process_group)
        if ranks > 1 and self.process_group is None:
            raise RuntimeError("StepComposeSGD under torch.distributed: pass process_group (the "
                               "DDP model's) so the composed weights' gradients are averaged "
                               "over the ranks as DDP averages the others")
        if ranks > 1:
            self._average(ranks)
        taken: list[tuple[Tensor, Tensor]] = []
        try:
            items, stepped = self._items(taken)
            if items:  # first: a step whose compile fails steps nothing (they share no tensor)
                self._run(items)
            for group, inner in zip(self.param_groups, self._rest.param_groups, strict=True):
                for key in ("lr", "momentum", "weight_decay"):
                    inner[key] = group[key]
            self._rest.step()
        finally:
            for p, grad in taken:  # back where they were (zero_grad takes them)
                p.grad = grad
        for layer in stepped:
            layer.let_go_at_step()
            layer._composed_current()
        return loss
