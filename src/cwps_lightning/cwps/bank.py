"""The bank of trained weights (the paper's W_trained), with an identity for every kernel.

Every output channel ("kernel": weight[j] and bias[j]) of every shareable layer of every kept
task has a kernel id. A task-specific channel gets a fresh id; a shared channel carries the id of
the kernel it copied. Two tasks that show the same id hold the same numbers, so a store keeps
each id once, and the parameters a set of tasks needs is the number of distinct ids they use.

A kernel stays stored as long as any kept task references it (reference counting by
construction): removing a task from the bank drops exactly the ids no other task uses.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .surgery import (
    check_model,
    classifier_names,
    cwps_layers,
    nonfinite_tensors,
    shareable_layers,
)


@dataclass
class LayerWeights:
    weight: Tensor  # [C, ...]
    bias: Tensor | None  # [C] or None
    ids: Tensor  # [C] int64 kernel ids


@dataclass
class TaskEntry:
    """One kept model: its shareable layers (with kernel ids) and everything else it owns."""

    layers: dict[str, LayerWeights]
    rest: dict[str, Tensor]  # state-dict entries outside the shareable layers (norms, head, ...)
    rest_param_names: list[str]  # which of ``rest`` are parameters (counted in param_count)
    num_classes: int
    meta: dict = field(default_factory=dict)
    #: which of ``rest_param_names`` belong to the classifier head (the paper's parameter
    #: count leaves heads out)
    head_param_names: list[str] = field(default_factory=list)


def split_state(model: nn.Module, layer_names: list[str]):
    """Split a plain model's state into shareable layer weights and the rest."""
    layer_set = set(layer_names)
    rest = {}
    for key, value in model.state_dict().items():
        module, _, attr = key.rpartition(".")
        if module in layer_set and attr in ("weight", "bias"):
            continue
        rest[key] = value.detach().cpu().clone()
    param_names = [n for n, _ in model.named_parameters() if n in rest]
    heads = tuple(f"{h}." for h in classifier_names(model))
    head_names = [n for n in param_names if n.startswith(heads)]
    weights = {}
    for name in layer_names:
        module = model.get_submodule(name)
        bias = None if module.bias is None else module.bias.detach().cpu().clone()
        # contiguous whatever the model's memory format: CPMS reads each kernel as a flat row
        # (a view of a contiguous kernel; a channels_last one would be copied at every search)
        weight = module.weight.detach().cpu().clone(memory_format=torch.contiguous_format)
        weights[name] = (weight, bias)
    return weights, rest, param_names, head_names


def _class_count(task: str, num_classes) -> int:
    """``num_classes`` as an int (numpy's and a one-element tensor's integers are), or a
    TypeError / ValueError: the manifest records it and the store rebuilds the head from it."""
    try:
        if isinstance(num_classes, bool) or (isinstance(num_classes, Tensor)
                                             and num_classes.dtype == torch.bool):
            raise TypeError
        count = operator.index(num_classes)
    except TypeError:
        raise TypeError(f"bank.add({task!r}): num_classes must be an integer, got "
                        f"{num_classes!r} ({type(num_classes).__name__}). The bank is "
                        "unchanged") from None
    if count < 1:
        raise ValueError(f"bank.add({task!r}): num_classes must be >= 1, got {count}. The "
                         "bank is unchanged")
    return count


def _check_same_rest(task: str, model: nn.Module, rest: dict[str, Tensor],
                     held: TaskEntry) -> None:
    """The model's kernels outside the shared layers and the head (layers left out of
    sharing, embeddings: its tensors of 2 or more dimensions) must be the bank's tasks', by
    name: the store rebuilds every task on one architecture. (A deeper model of the same
    family has every layer the bank shares, and more: those were kept as the task's own,
    inflating its count, and only rebuilding it from the store failed.) Names, not shapes:
    the kernel check before this one names a shape that differs. Vectors are left out: a
    head's normalisation may go with it (timm's RepViT drops T0's distillation head, its
    BatchNorm included, when a task's head is made)."""
    heads = tuple(f"{h}." for h in classifier_names(model))  # (a store's T0 of a revision
    # that kept no head names has them in its rest)

    def kernels(state: dict[str, Tensor], head_names: list[str]) -> list[str]:
        named = set(head_names)  # (once, not per tensor)
        return [k for k, v in state.items() if v.dim() >= 2 and k not in named
                and not k.startswith(heads)]

    mine = kernels(rest, [])
    theirs = kernels(held.rest, held.head_param_names)
    if set(mine) == set(theirs):
        return
    parts = [f"{len(found)} {what} ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
             for what, found in (("kernel(s) they lack", [k for k in mine if k not in theirs]),
                                 ("of theirs missing", [k for k in theirs if k not in mine]))
             if found]
    raise ValueError(f"bank.add({task!r}): outside the shared layers and the head, the model's "
                     f"kernels are not the bank's tasks' (another architecture?): "
                     f"{'; '.join(parts)}. The bank is unchanged")


def _kernel_id_tensor(task: str, layer: str, ids) -> Tensor:
    """One layer's kernel ids as an int64 CPU tensor (a list or an integer array is taken as
    one); other values, fractional ids included, a TypeError."""
    given = ids
    try:
        ids = torch.as_tensor(ids.detach() if isinstance(ids, Tensor) else ids)
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        what = type(given).__name__ if ids is None else f"{type(given).__name__} of {ids.dtype}"
        raise TypeError(f"bank.add({task!r}): kernel_ids[{layer!r}] must be integer ids (a "
                        f"tensor or list of ints), got {what}. The bank is unchanged")
    return ids.cpu().to(torch.int64)


def param_counts(kernels: int, task_own: int, heads: int) -> dict[str, int]:
    """The parameter-count keys every counter returns: ``kernels``, ``task_own`` (heads
    included), ``heads``, ``total`` = kernels + task_own, and ``backbone`` = total - heads: the
    paper's count (Table 1: fine-tuning K tasks on T0 is exactly 1 + K backbones)."""
    total = kernels + task_own
    return {"kernels": kernels, "task_own": task_own, "heads": heads, "total": total,
            "backbone": total - heads}


class KernelBank:
    """Kept models by task name, in insertion order; T0 is a task like the others."""

    def __init__(self, layer_names: list[str]):
        if not layer_names:
            raise ValueError("KernelBank needs at least one shareable layer name")
        self.layer_names = list(layer_names)
        self.entries: dict[str, TaskEntry] = {}
        self.next_id: dict[str, int] = {name: 0 for name in self.layer_names}
        # (uid, revision) names this bank's content, so a store knows when to rewrite tensors
        self.uid = uuid.uuid4().hex
        self.revision = 0
        #: tasks this bank (or the bank it was copied from) removed: a save that drops them
        #: from a store is this bank's own doing, not a stale copy's
        self.removed: set[str] = set()

    def __setstate__(self, state: dict) -> None:
        # a deep copy or an unpickled bank names its content anew: two copies grown apart
        # would both be (uid, revision + 1), and a save of the second into the first's store
        # kept the first's tensors under the second's manifest
        self.__dict__.update(state)
        self.__dict__.setdefault("removed", set())
        self.uid = uuid.uuid4().hex

    def __copy__(self) -> KernelBank:
        """A bank of its own (copy.copy): the entries are shared tensors, but adding to or
        removing from one bank leaves the other as it was (a shared entries dict gave a
        copy new tasks under an unchanged (uid, revision))."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.layer_names, new.entries = list(self.layer_names), dict(self.entries)
        new.next_id, new.removed = dict(self.next_id), set(self.removed)
        new.uid = uuid.uuid4().hex
        return new

    @staticmethod
    def shareable_of(model: nn.Module, exclude: Iterable[str] | None = None) -> list[str]:
        """The layer names a bank for ``model`` tracks: those inject_cwps wraps with the same
        ``exclude`` (by default every Conv2d / Linear but the classifier head)."""
        return shareable_layers(model, exclude)

    # -- identities ----------------------------------------------------------------------------
    def new_ids(self, layer: str, n: int) -> Tensor:
        start = self.next_id[layer]
        self.next_id[layer] = start + n
        return torch.arange(start, start + n, dtype=torch.int64)

    # -- membership ----------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, task: str) -> bool:
        return task in self.entries

    def add(
        self,
        task: str,
        model: nn.Module,
        num_classes: int,
        kernel_ids: dict[str, Tensor] | None = None,
        meta: dict | None = None,
    ) -> TaskEntry:
        """Add (or replace) ``task``'s kept model, a plain (merged) nn.Module.

        ``kernel_ids[layer][j]`` is the id the channel carries: a shared channel's parent id,
        or -1 for a task-specific channel (which gets a fresh id). None: every channel is new.
        A carried id must be one a kept task holds, with the same numbers (_check_carried),
        and the weights must have the dtype of the bank's other tasks; otherwise ValueError and
        the bank is unchanged.
        """
        check_model(model, f"bank.add({task!r})")
        bad = nonfinite_tensors(model)
        if bad:  # a diverged fit must not reach the store
            raise ValueError(f"bank.add({task!r}): {bad[0]} has nan/inf values "
                             f"({len(bad)} tensor(s) in all); the bank is unchanged")
        self._check_model(task, model, kernel_ids)
        num_classes = _class_count(task, num_classes)
        weights, rest, param_names, head_names = split_state(model, self.layer_names)
        others = [entry for name, entry in self.entries.items() if name != task]
        for name, (w, b) in weights.items():  # (a store holds one table per layer)
            if not others:
                continue
            held = others[0].layers[name]
            if w.dtype != held.weight.dtype:
                raise ValueError(f"bank.add({task!r}): {name} holds {w.dtype} weights, the "
                                 f"bank's tasks {held.weight.dtype}; convert the model (e.g. "
                                 f"model.to({held.weight.dtype})) first. The bank is unchanged")
            if w.shape != held.weight.shape or (b is None) != (held.bias is None):
                raise ValueError(f"bank.add({task!r}): {name} has a {tuple(w.shape)} kernel"
                                 f"{'' if b is None else ' and a bias'}, the bank's tasks "
                                 f"{tuple(held.weight.shape)}"
                                 f"{'' if held.bias is None else ' and a bias'} (another "
                                 "architecture?). The bank is unchanged")
        if others:
            _check_same_rest(task, model, rest, others[0])
        heads = [n for n in head_names if n.endswith("weight") and n in rest]
        if heads and rest[heads[-1]].shape[0] != num_classes:  # (the store would record it)
            raise ValueError(f"bank.add({task!r}): num_classes={num_classes}, but its head "
                             f"{heads[-1]} has {rest[heads[-1]].shape[0]} outputs. The bank is "
                             "unchanged")
        carried = {}
        for name, (w, _) in weights.items():
            if kernel_ids is None:
                continue
            ids = _kernel_id_tensor(task, name, kernel_ids[name])
            if ids.shape != (w.shape[0],):
                raise ValueError(f"bank.add({task!r}): {name}: {tuple(ids.shape)} kernel ids for "
                                 f"{w.shape[0]} channels (one id per output channel). The bank "
                                 "is unchanged")
            below = (ids < -1).nonzero()
            if below.numel():
                j = int(below[0, 0])
                raise ValueError(f"bank.add({task!r}): {name} channel {j} carries kernel id "
                                 f"{int(ids[j])}; an id is a kept kernel's (>= 0) or -1 (a "
                                 "task-specific channel, given a fresh id). The bank is "
                                 "unchanged")
            carried[name] = ids
        for name, ids in carried.items():  # before any id is issued: a refusal changes nothing
            self._check_carried(task, name, ids, *weights[name])
        layers = {}
        for name, (w, b) in weights.items():
            ids = carried.get(name)
            if ids is None:
                ids = self.new_ids(name, w.shape[0])
            else:
                ids = ids.clone()
                fresh = ids < 0
                ids[fresh] = self.new_ids(name, int(fresh.sum()))
            layers[name] = LayerWeights(w, b, ids)
        entry = TaskEntry(layers, rest, param_names, num_classes, dict(meta or {}), head_names)
        self.entries[task] = entry
        self.removed.discard(task)
        self.revision += 1
        return entry

    def _check_carried(self, task: str, layer: str, ids: Tensor, weight: Tensor,
                       bias: Tensor | None) -> None:
        """Hold the bank's contract, "the same id, the same numbers": every id ``task`` carries
        (>= 0) must be held by a kept task (another one, or the entry ``task`` replaces) with
        this kernel's numbers, weight row and bias. A store keeps each id once, so a kernel
        that differs would be served to the other task, or this one, silently."""
        rows = (ids >= 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        want, found = ids[rows], torch.zeros(rows.numel(), dtype=torch.bool)
        # the other tasks first: what the store serves them must not change
        for other in sorted(self.entries, key=lambda name: name == task):
            held = self.entries[other].layers[layer]
            order = held.ids.argsort()
            pos = torch.searchsorted(held.ids[order], want).clamp(max=len(order) - 1)
            src = order[pos]
            hit = (held.ids[src] == want) & ~found
            if not hit.any():
                continue
            for mine, theirs in ((weight, held.weight), (bias, held.bias)):
                if mine is None or theirs is None:
                    continue
                a, b = mine[rows[hit]], theirs[src[hit]]
                differs = (a != b).reshape(a.shape[0], -1).any(1)
                if differs.any():
                    i = int(differs.nonzero()[0])
                    channel, kid = int(rows[hit][i]), int(want[hit][i])
                    gap = float((a[i].double() - b[i].double()).abs().max())
                    whose = f"task {other!r}" + (" (the entry it replaces)" if other == task
                                                 else "")
                    raise ValueError(
                        f"bank.add({task!r}): {layer} channel {channel} carries kernel id {kid}, "
                        f"which {whose} holds with other numbers (max |difference| {gap:.3g}; "
                        f"{int(differs.sum())} such channel(s) there); a shared channel must "
                        "hold its parent's kernel exactly. The bank is unchanged")
            found |= hit
        if not found.all():
            i = int((~found).nonzero()[0])
            raise ValueError(
                f"bank.add({task!r}): {layer} channel {int(rows[i])} carries kernel id "
                f"{int(want[i])}, which no kept task holds ({int((~found).sum())} such "
                f"channel(s)); pass -1 for a task-specific channel. The bank is unchanged")

    def remove(self, task: str) -> None:
        if task not in self.entries:
            raise KeyError(f"bank.remove({task!r}): no such task; the bank holds {self.tasks}")
        del self.entries[task]
        self.removed.add(task)
        self.revision += 1

    def _check_model(self, task: str, model: nn.Module, kernel_ids) -> None:
        """What ``add`` takes: a task name, a plain model (CWPS layers merged) with the bank's
        shareable layers, and kernel ids (if any) for each of them."""
        if not isinstance(task, str) or not task:  # (a store key: '<task>/index/<layer>')
            raise TypeError(f"bank.add: the task name must be a non-empty string, got {task!r}")
        if "/" in task:  # (the store's key separator: 'a' would take 'a/rest/x's tensors)
            raise ValueError(f"bank.add({task!r}): a task name may not contain '/'")
        mixed = [n for n, _ in cwps_layers(model)]
        if mixed:  # (its state would hold children, parents and scores, not the task's weights)
            raise ValueError(f"bank.add({task!r}): the model still has CWPS layers ({mixed[0]}, "
                             f"{len(mixed)} in all); take the merged model (merge_cwps) first")
        modules = dict(model.named_modules())
        missing = [n for n in self.layer_names if n not in modules
                   or not isinstance(getattr(modules[n], "weight", None), torch.Tensor)]
        if missing:
            raise ValueError(f"bank.add({task!r}): the model has no layer {missing[0]!r} "
                             f"({len(missing)} of the bank's {len(self.layer_names)} layers "
                             "missing: another architecture?)")
        other = [n for n in self.layer_names if not isinstance(modules[n], (nn.Conv2d, nn.Linear))]
        if other:  # (CWPS shares Conv2d / Linear kernels; a norm's weight is a vector per task)
            raise ValueError(f"bank.add({task!r}): the bank's layer {other[0]!r} is a "
                             f"{type(modules[other[0]]).__name__}, not an nn.Conv2d / nn.Linear "
                             f"({len(other)} such layer(s)); build the bank with "
                             "KernelBank.shareable_of(model)")
        if kernel_ids is not None:
            if not hasattr(kernel_ids, "keys"):
                raise TypeError(f"bank.add({task!r}): kernel_ids must be a dict of layer name "
                                f"-> ids, got {type(kernel_ids).__name__}")
            absent = [n for n in self.layer_names if n not in kernel_ids]
            if absent:
                raise ValueError(f"bank.add({task!r}): kernel_ids has no entry for layer "
                                 f"{absent[0]!r} ({len(absent)} of {len(self.layer_names)} "
                                 "missing; merged_kernel_ids gives one per layer)")

    # -- search space --------------------------------------------------------------------------
    def candidates(self, layer: str, exclude: str | None = None):
        """Stacked weights [T, C, ...], biases [T, C] (or None), ids [T, C] and task names."""
        weights, biases, ids, names = self.candidate_lists(layer, exclude)
        return (torch.stack(weights), None if biases is None else torch.stack(biases),
                torch.stack(ids), names)

    def candidate_lists(self, layer: str, exclude: str | None = None):
        """As :meth:`candidates`, one tensor per task in lists: no stacked copy of the weights."""
        names = [t for t in self.entries if t != exclude]
        if not names:
            raise ValueError(f"the bank has no task other than {exclude!r} to share with")
        lw = [self.entries[t].layers[layer] for t in names]
        biases = None if lw[0].bias is None else [x.bias for x in lw]
        return [x.weight for x in lw], biases, [x.ids for x in lw], names

    # -- accounting ----------------------------------------------------------------------------
    def kernel_params(self, layer: str) -> int:
        lw = next(iter(self.entries.values())).layers[layer]
        return lw.weight[0].numel() + (0 if lw.bias is None else 1)

    def distinct_ids(self, layer: str, tasks: list[str] | None = None) -> Tensor:
        tasks = self.tasks if tasks is None else tasks
        return torch.unique(torch.cat([self.entries[t].layers[layer].ids for t in tasks]))

    def param_count(self, tasks: list[str] | None = None) -> dict[str, int]:
        """Parameters needed to serve ``tasks`` (default: all): each distinct kernel once, plus
        every task's own parameters outside the shareable layers (normalisation, head, ...);
        keys as :func:`param_counts`."""
        tasks = self.tasks if tasks is None else tasks
        shared = sum(
            self.kernel_params(layer) * self.distinct_ids(layer, tasks).numel()
            for layer in self.layer_names
        )
        own = sum(
            sum(self.entries[t].rest[n].numel() for n in self.entries[t].rest_param_names)
            for t in tasks
        )
        heads = sum(
            sum(self.entries[t].rest[n].numel() for n in self.entries[t].head_param_names)
            for t in tasks
        )
        return param_counts(shared, own, heads)

    def shared_channels(self, a: str, b: str) -> int:
        """Number of output channels where tasks ``a`` and ``b`` hold the same kernel."""
        return sum(
            int((self.entries[a].layers[n].ids == self.entries[b].layers[n].ids).sum())
            for n in self.layer_names
        )

    def load_into(self, task: str, model: nn.Module) -> nn.Module:
        """Load ``task``'s kept weights into a plain model of the right architecture."""
        entry = self.entries[task]
        state = dict(entry.rest)
        for name, lw in entry.layers.items():
            state[f"{name}.weight"] = lw.weight
            if lw.bias is not None:
                state[f"{name}.bias"] = lw.bias
        model.load_state_dict(state)
        return model
