"""Composite Parent Model Searching (CPMS, paper section 3.2.2) and mask initialisation.

For every shareable layer and output channel j, pick among the kept models of all other tasks
(T0 included) the one whose kernel j is nearest to the child's kernel j (Eq. 3), and assemble
the composite parent from those choices (Eq. 4/5). Vectorised per layer.

Mask-logit initialisation (appendix A.1: "normalise the values of D and multiply them by
3/mean(D)"). The text leaves "normalise" open; we use, per layer, with d_j the distance of
channel j to its chosen parent kernel and mean(d) the layer mean:

    s_j = 3 * (d_j - mean(d)) / mean(d)          (clamped to [-6, 6]; all-zero d gives -3)

Why: the distances of different layers live on different scales, so they are divided by their
mean (the 1/mean(D) factor); centring puts a channel of average distance at sigmoid(0) = 0.5,
the default lambda, so the initial mask splits a layer around its typical distance; the factor 3
spans sigmoid(-3) = 0.05 (a channel identical to its parent starts as shared) to sigmoid(3) =
0.95 (a channel twice as far as the average starts as task-specific), a range the mask learning
rate can still move within a few epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bank import KernelBank
from .surgery import cwps_layers

DISTANCES = ("l2", "cosine")
INIT_SCOPES = ("layer", "global")
#: the defaults of the CLI too (cwps_lightning.settings.CWPSSettings reads them from here)
DEFAULT_DISTANCE = "cosine"
DEFAULT_INIT_SCOPE = "global"
INIT_SCALE = 3.0
INIT_CLAMP = 6.0


def check_distance(distance: str) -> str:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    return distance


def kernel_distances(child: Tensor, candidates: Tensor, distance: str = DEFAULT_DISTANCE) -> Tensor:
    """D between child kernel j and every candidate's kernel j.

    child: [C, ...]; candidates: [T, C, ...]. Returns [T, C]. "l2" is the Euclidean distance,
    "cosine" is 1 - cosine similarity (so smaller is nearer for both).
    """
    check_distance(distance)
    c = child.flatten(1).unsqueeze(0).to(candidates.dtype)  # [1, C, K]
    k = candidates.flatten(2)  # [T, C, K]
    if distance == "l2":
        return (k - c).norm(dim=2)
    return 1.0 - torch.nn.functional.cosine_similarity(k, c, dim=2, eps=1e-12)


def nearest_parents(child: Tensor, candidates: Tensor, distance: str = DEFAULT_DISTANCE):
    """Index [C] of the nearest candidate for each channel, and that distance [C]."""
    d = kernel_distances(child, candidates, distance)
    dist, choice = d.min(dim=0)
    return choice, dist


def gather_channels(stacked: Tensor, choice: Tensor) -> Tensor:
    """stacked [T, C, ...], choice [C] -> [C, ...] with row j taken from stacked[choice[j], j]."""
    return stacked[choice, torch.arange(stacked.shape[1], device=stacked.device)]


def init_mask_logits(dist: Tensor) -> Tensor:
    """The formula in the module docstring."""
    mean = dist.mean()
    if float(mean) <= 0.0:
        return torch.full_like(dist, -INIT_SCALE)
    s = INIT_SCALE * (dist - mean) / mean
    return s.clamp(-INIT_CLAMP, INIT_CLAMP)


@dataclass
class SearchResult:
    parent_ids: dict[str, Tensor]  # per layer [C]: kernel id of the chosen parent kernel
    parent_task: dict[str, list[str]]  # per layer: task name chosen for each channel
    distances: dict[str, Tensor]  # per layer [C]


def relative_distances(dist: Tensor, child: Tensor, distance: str) -> Tensor:
    """Distances made comparable across layers: l2 over the child kernel's norm (cosine is
    already scale-free)."""
    if distance == "cosine":
        return dist
    return dist / child.flatten(1).norm(dim=1).clamp_min(1e-12).to(dist.dtype)


@torch.no_grad()
def search_parents(
    model: nn.Module,
    bank: KernelBank,
    task: str,
    distance: str = DEFAULT_DISTANCE,
    init_scope: str = DEFAULT_INIT_SCOPE,
) -> SearchResult:
    """Run CPMS for every CWPS layer of ``model`` against ``bank`` (excluding ``task`` itself):
    install the composite parent and initialise ``mask_logits``.

    ``init_scope="layer"`` applies the mask-logit formula within each layer (every layer starts
    with a similar share of task-specific channels); ``"global"`` applies it to relative
    distances (see :func:`relative_distances`) over all channels of all layers at once, so the
    layers that moved most from their parents start with more task-specific channels.
    """
    check_distance(distance)
    if init_scope not in INIT_SCOPES:
        raise ValueError(f"init_scope must be one of {INIT_SCOPES}, got {init_scope!r}")
    layers = dict(cwps_layers(model))
    missing = [n for n in bank.layer_names if n not in layers]
    if missing:
        raise ValueError(f"the model has no CWPS layer for bank layers {missing[:5]}")
    parent_ids, parent_task, distances = {}, {}, {}
    for name in bank.layer_names:
        layer = layers[name]
        weights, biases, ids, names = bank.candidates(name, exclude=task)
        device = layer.weight.device
        weights = weights.to(device)
        choice, dist = nearest_parents(layer.weight.detach().float(), weights.float(), distance)
        parent_b = None if biases is None else gather_channels(biases.to(device), choice)
        layer.set_parent(gather_channels(weights, choice), parent_b)
        if init_scope == "layer":
            layer.mask_logits.copy_(init_mask_logits(dist).to(layer.mask_logits.dtype))
        choice_cpu = choice.cpu()
        parent_ids[name] = gather_channels(ids, choice_cpu)
        parent_task[name] = [names[i] for i in choice_cpu.tolist()]
        distances[name] = dist.cpu()
    if init_scope == "global":
        rel = {n: relative_distances(distances[n], layers[n].weight.detach().cpu(), distance)
               for n in bank.layer_names}
        flat = init_mask_logits(torch.cat(list(rel.values())))
        start = 0
        for n in bank.layer_names:
            c = rel[n].numel()
            layers[n].mask_logits.copy_(flat[start:start + c].to(layers[n].mask_logits))
            start += c
    return SearchResult(parent_ids, parent_task, distances)


def merged_kernel_ids(model: nn.Module, result: SearchResult) -> dict[str, Tensor]:
    """Kernel ids after the merge: the parent id for shared channels, -1 (fresh) otherwise."""
    out = {}
    for name, layer in cwps_layers(model):
        ids = result.parent_ids[name].clone()
        ids[layer.task_specific().cpu()] = -1
        out[name] = ids
    return out
