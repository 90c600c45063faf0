"""Composite Parent Model Searching (CPMS, paper section 3.2.2) and mask initialisation.

For every shareable layer and output channel j, pick among the kept models of all other tasks
(T0 included) the one whose kernel j is nearest to the child's kernel j (Eq. 3), and assemble
the composite parent from those choices (Eq. 4/5). Vectorised per layer.

Mask-logit initialisation (``mask_init``; paper Eq. 9 text: "initiated according to the
standardized results of function D"; appendix A.1: "normalize the values of D and multiply them
by 3/mean(D)"; Table 4 compares it with a random and a constant init). With d_j the distance of
channel j to its chosen parent kernel, over the scope (one layer, or all layers' relative
distances at once) and a scale a (``init_scale``; None takes the default in brackets):

    standardized  s_j = a * (d_j - mean d) / std d      [a = 1]   z-scores (the paper's Eq. 9)
    log_standardized  the same on log(max(d_j, 1e-6 mean d))  [a = 1]  z-scores of log D
    mean_ratio    s_j = a * (d_j - mean d) / mean d     [a = 3]   the A.1 formula read literally
    random        s_j ~ N(0, a^2)                        [a = 1]   Table 4 "Random Init"
    constant      s_j = a                                [a = 0]   Table 4 "Constant Init"

then clamped to [-6, 6]. log_standardized is the default. The initial share of task-specific
channels is P(sigmoid(s) >= lambda) = P(z >= logit(lambda) / a): for a symmetric z (a = 1) about 80% at lambda 0.3, 50% at 0.5, 20%
at 0.7, the shape of the paper's Table 3. But D is heavy-tailed (measured on the digits tasks:
skewness 4-12, most channels within 1e-4 of their parent, a few far away), and z-scores keep the
skew: every channel starts at z >= -0.5, so lambda 0.3 keeps all of them and lambda 0.7 about
10%. The logarithm makes D nearly symmetric (82% / 49% / 28% at 0.3 / 0.5 / 0.7, measured);
mean_ratio divides by the mean of the tail and puts most channels below every lambda in
0.3-0.7 (31% / 27% / 23%). README, "lambda and the mask initialisation", compares all of them.
Degenerate scopes: all distances 0 (every channel identical to its parent; under cosine a kernel
equal to its parent counts 0, not the rounding of 1 - cos, and an equal candidate is chosen over
a nearer-by-rounding one: equal_kernels_first) start shared
(s = -6 standardized, -a mean_ratio); all equal and > 0, standardized starts undecided (s = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bank import KernelBank
from .surgery import check_model, cwps_layers, require_cwps_layers

DISTANCES = ("l2", "cosine")
INIT_SCOPES = ("layer", "global")
#: the defaults of the CLI too (cwps_lightning.settings.CWPSSettings reads them from here)
DEFAULT_DISTANCE = "cosine"
DEFAULT_INIT_SCOPE = "global"
MASK_INITS = ("standardized", "log_standardized", "mean_ratio", "random", "constant")
DEFAULT_MASK_INIT = "log_standardized"
#: init_scale=None takes these
INIT_SCALES = {"standardized": 1.0, "log_standardized": 1.0, "mean_ratio": 3.0, "random": 1.0,
               "constant": 0.0}
#: log_standardized: distances below this fraction of the scope's mean count as this (a kernel
#: identical to its parent has d = 0, or cosine rounding noise, and log 0 is -inf)
LOG_FLOOR = 1e-6
INIT_CLAMP = 6.0
#: cosine distances at most this are looked at for a kernel equal to its parent: 1 - cos of two
#: equal float32 kernels is rounding, not 0 (measured: up to a few 1e-7, of either sign)
COSINE_ROUNDING = 1e-5


def check_distance(distance: str) -> str:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    return distance


def kernel_distances(child: Tensor, candidates: Tensor | list[Tensor],
                     distance: str = DEFAULT_DISTANCE,
                     ids: Tensor | list[Tensor] | None = None) -> Tensor:
    """D between child kernel j and every candidate's kernel j.

    child: [C, ...]; candidates: [T, C, ...] stacked, or a list of T [C, ...] tensors (no
    stacked copy of them). Returns [T, C]. "l2" is the Euclidean distance, "cosine" is
    1 - cosine similarity (so smaller is nearer for both).

    ``ids`` (optional, [T, C] or T tensors of [C], as a KernelBank gives them): the kernel id
    of every candidate kernel. A kernel j with the id of an earlier candidate's kernel j holds
    the same numbers (the bank's contract), so it takes that candidate's distance instead of
    computing it again: the same result, bit for bit, from less work. Used on the CPU, for
    candidates of one dtype; elsewhere every kernel is computed (_distance_rows).
    """
    check_distance(distance)
    if isinstance(candidates, Tensor):
        candidates = list(candidates.unbind(0))
    if isinstance(ids, Tensor):
        ids = list(ids.unbind(0))
    if ids is not None and (len(ids) != len(candidates) or any(
            i.shape != (c.shape[0],) for i, c in zip(ids, candidates, strict=True))):
        raise ValueError(f"ids must be one [C] tensor per candidate ({len(candidates)}), got "
                         f"shapes {[tuple(i.shape) for i in ids]}")
    return _distance_rows(child, candidates, distance, ids)


def _distance_rows(child: Tensor, candidates: list[Tensor], distance: str,
                   ids: list[Tensor] | None = None) -> Tensor:
    """kernel_distances with the candidates as a list of [C, ...] tensors (no [T, C, K] stack
    of them); each kernel flattened to a row (a view of a contiguous kernel, as the bank keeps
    them). With ``ids``, on the CPU, each candidate computes only the channels whose kernel no
    earlier candidate holds (_distinct_channels): a task's shared channels are its parents'
    kernels, so in a bank most kernels of later tasks are T0's (the default job shares about
    two thirds of every task's channels). Elsewhere, or with candidates of several dtypes,
    every kernel is computed, as without ids (a GPU reduces a subset of rows in another order
    than all of them, which could break a tie between equal kernels the other way)."""
    c = child.flatten(1)
    cn = None
    reuse_ids = (ids is not None and all(k.device.type == "cpu" for k in candidates)
                 and len({k.dtype for k in candidates}) == 1)
    rows: list[Tensor] = []
    for t, cand in enumerate(candidates):
        k = cand.flatten(1)
        if distance == "cosine" and (cn is None or cn.dtype != k.dtype):
            cn = _normalised(c.to(k.dtype))
        other = c if distance == "l2" else cn
        reuse = _distinct_channels(ids, t) if reuse_ids and t else None
        if reuse is None:
            rows.append(_row_distances(k, other, distance))
            continue
        compute, earlier = reuse
        d = torch.empty_like(rows[0])
        for s in earlier.unique().tolist():
            if s >= 0:
                at = (earlier == s).nonzero().squeeze(1)
                d[at] = rows[s][at]
        n = compute.numel()
        if n:
            at = compute
            if n == 1 and k.shape[0] > 1:
                # one row alone is one output, which torch reduces split over the threads
                # once the row is longer than its grain (32768 values): another rounding than
                # the row reduced whole, as it is among others. Two rows, the second dropped.
                at = torch.cat([compute, (compute + 1) % k.shape[0]])
            d[compute] = _row_distances(k.index_select(0, at), other.index_select(0, at),
                                        distance)[:n]
        rows.append(d)
    return torch.stack(rows)


def _distinct_channels(ids: list[Tensor], t: int) -> tuple[Tensor, Tensor] | None:
    """For candidate ``t``: the channels whose kernel id no earlier candidate has at that
    channel (to compute), and per channel the first earlier candidate with the same id (-1
    where none); None when every channel is new (compute them all)."""
    mine = ids[t].cpu()
    seen = torch.stack([i.cpu() for i in ids[:t]]) == mine.unsqueeze(0)  # [t, C]
    hit = seen.any(0)
    if not bool(hit.any()):
        return None
    earlier = torch.where(hit, seen.to(torch.int8).argmax(0), -1)
    return (~hit).nonzero().squeeze(1), earlier


def _row_distances(k: Tensor, other: Tensor, distance: str) -> Tensor:
    """Row j of ``k`` against row j of ``other``: the child's rows for l2, its normalised rows
    for cosine. On the CPU two or more rows give each row's distance bit for bit as all C rows
    do (each row is reduced whole; one row alone need not be: _distance_rows)."""
    if distance == "l2":
        return (k - other.to(k.dtype)).norm(dim=1)
    return 1.0 - _normalised(k).mul_(other).sum(-1)


def _normalised(k: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows over their clamped norms: with the product of two such summed, F.cosine_similarity
    bit for bit (torch normalises each side, then sums the product; it expands the child to
    [T, C, K] first and normalises it T times, here it is normalised once: CPMS on resnet18 at
    three candidates 0.13 -> 0.06 s on this project's CPU)."""
    return k / torch.linalg.vector_norm(k, 2, dim=-1, keepdim=True).clamp_min(eps)


def nearest_parents(child: Tensor, candidates: Tensor | list[Tensor],
                    distance: str = DEFAULT_DISTANCE,
                    ids: Tensor | list[Tensor] | None = None):
    """Index [C] of the nearest candidate for each channel, and that distance [C]
    (``candidates`` and ``ids`` as :func:`kernel_distances` takes them; of equal distances the
    first candidate wins)."""
    d = kernel_distances(child, candidates, distance, ids)
    dist, choice = d.min(dim=0)
    return choice, dist


def gather_channels(candidates: Tensor | list[Tensor], choice: Tensor,
                    out: Tensor | None = None) -> Tensor:
    """Row j of candidates[choice[j]], for candidates stacked [T, C, ...] or a list of T [C, ...]
    tensors (kernels, biases or kernel ids; a list needs no stacked copy of them), written into
    ``out`` if given (any layout: a channels_last parent is filled in place, with no copy
    between the layouts)."""
    if out is None:
        out = candidates[0].clone()
    else:
        out.copy_(candidates[0])
    for t in range(1, len(candidates)):
        rows = (choice == t).nonzero().squeeze(1)
        if rows.numel():
            out[rows] = candidates[t][rows].to(out.dtype)
    return out


def check_mask_init(mask_init: str) -> str:
    if mask_init not in MASK_INITS:
        raise ValueError(f"mask_init must be one of {list(MASK_INITS)}, got {mask_init!r}")
    return mask_init


def init_mask_logits(
    dist: Tensor,
    mask_init: str = DEFAULT_MASK_INIT,
    scale: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The mask-logit init of the module docstring for the distances ``dist`` of one scope.

    ``generator`` draws the random init (on the CPU, so every device and rank draws the same).
    """
    check_mask_init(mask_init)
    if not isinstance(dist, Tensor):
        raise TypeError(f"init_mask_logits: dist must be a tensor of kernel distances, got "
                        f"{type(dist).__name__}")
    a = INIT_SCALES[mask_init] if scale is None else float(scale)
    if not abs(a) < float("inf"):  # (nan too: every logit, and then every output, was nan)
        raise ValueError(f"init_scale must be a finite number or None, got {scale!r}")
    dist = dist.float()
    if mask_init == "constant":
        s = torch.full_like(dist, a)
    elif mask_init == "random":
        s = a * torch.randn(dist.shape, generator=generator, dtype=dist.dtype)
    elif mask_init in ("standardized", "log_standardized"):
        far = float(dist.max()) > 0.0
        if mask_init == "log_standardized" and far:
            dist = dist.clamp_min(LOG_FLOOR * float(dist.mean())).log()
        std = dist.std(unbiased=False) if dist.numel() > 1 else dist.new_zeros(())
        if float(std) > 0.0:
            s = a * (dist - dist.mean()) / std
        else:  # no spread: identical to the parents (shared), or all equally far (undecided)
            s = torch.full_like(dist, 0.0 if far else -INIT_CLAMP)
    else:
        mean = dist.mean()
        if float(mean) <= 0.0:
            return torch.full_like(dist, -a).clamp(-INIT_CLAMP, INIT_CLAMP)
        s = a * (dist - mean) / mean
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
    mask_init: str = DEFAULT_MASK_INIT,
    init_scale: float | None = None,
    seed: int = 0,
) -> SearchResult:
    """Run CPMS for every CWPS layer of ``model`` against ``bank`` (excluding ``task`` itself):
    install the composite parent and initialise ``mask_logits`` (``mask_init`` and
    ``init_scale`` as the module docstring says; ``seed`` seeds the random init).

    Every bank layer must be a CWPS layer of the model with the same kernel shape; a CWPS layer
    the bank lacks keeps its parent (and is refused if that was never written).

    ``init_scope="layer"`` applies the mask-logit formula within each layer (every layer starts
    with a similar share of task-specific channels); ``"global"`` applies it to relative
    distances (see :func:`relative_distances`) over all channels of all layers at once, so the
    layers that moved most from their parents start with more task-specific channels.
    """
    check_distance(distance)
    check_mask_init(mask_init)
    if init_scope not in INIT_SCOPES:
        raise ValueError(f"init_scope must be one of {INIT_SCOPES}, got {init_scope!r}")
    layers = dict(cwps_layers(check_model(model, "search_parents")))
    if not isinstance(bank, KernelBank):
        raise TypeError(f"search_parents: bank must be a KernelBank, got {type(bank).__name__}")
    missing = [n for n in bank.layer_names if n not in layers]
    if missing:
        raise ValueError(f"the model has no CWPS layer for bank layers {missing[:5]}")
    # a layer the bank lacks keeps its parent: refused if that was never written
    # (inject_cwps(fill_parents=False))
    in_bank = set(bank.layer_names)
    unset = [n for n, layer in layers.items() if n not in in_bank and layer.parent_unset]
    if unset:
        raise ValueError(f"the bank has no kernels for the model's CWPS layers {unset[:5]}, "
                         "whose parents are unwritten (inject_cwps(fill_parents=False))")
    candidates = {name: bank.candidate_lists(name, exclude=task) for name in bank.layer_names}
    for name, (weights, biases, _, _) in candidates.items():  # all checked before any write
        try:
            layers[name].check_parent_fits(weights[0].shape, biases is not None)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: the bank's kernels do not fit: {e}") from None
    gen = torch.Generator().manual_seed(int(seed))

    def init(dist: Tensor) -> Tensor:
        return init_mask_logits(dist.cpu(), mask_init, init_scale, gen)

    parent_ids, parent_task, distances = {}, {}, {}
    for name in bank.layer_names:
        layer = layers[name]
        weights, biases, ids, names = candidates[name]
        device = layer.weight.device
        weights = [w.to(device) for w in weights]
        choice, dist = nearest_parents(layer.weight.detach().float(),
                                       [w.float() for w in weights], distance, ids)
        # gathered straight into the layer's parent (set_parent without its copy)
        parent_w = gather_channels(weights, choice, out=layer.parent_weight)
        if distance == "cosine":  # (patches the parent's rows it changes)
            dist, choice = equal_kernels_first(dist, choice, layer.weight.detach(), weights,
                                               parent_w)
        if biases is not None:
            gather_channels([b.to(device) for b in biases], choice, out=layer.parent_bias)
        layer._parent_installed()
        if init_scope == "layer":
            layer.mask_logits.copy_(init(dist).to(layer.mask_logits))
        choice_cpu = choice.cpu()
        parent_ids[name] = gather_channels(ids, choice_cpu)
        parent_task[name] = [names[i] for i in choice_cpu.tolist()]
        distances[name] = dist.cpu()
    if init_scope == "global":
        rel = {n: relative_distances(distances[n], layers[n].weight.detach().cpu(), distance)
               for n in bank.layer_names}
        flat = init(torch.cat(list(rel.values())))
        start = 0
        for n in bank.layer_names:
            c = rel[n].numel()
            layers[n].mask_logits.copy_(flat[start:start + c].to(layers[n].mask_logits))
            start += c
    return SearchResult(parent_ids, parent_task, distances)


def _near(dist: Tensor) -> Tensor:
    """Channels whose cosine distance could be that of an equal kernel: within COSINE_ROUNDING,
    or exactly 1 (an all-zero kernel: its cosine with anything is 0)."""
    return ((dist.abs() <= COSINE_ROUNDING) | (dist == 1.0)).nonzero().squeeze(1)


def _equal_rows(rows: Tensor, child: Tensor, other: Tensor) -> Tensor:
    """Which of channels ``rows`` of ``child`` equal ``other``'s bit for bit (bool per row),
    compared first by their first and last values: many channels are near without being equal
    (a kernel that weight decay alone moved is a scaled copy of its parent: cosine 1 up to
    rounding), and comparing them whole took longer than the rest of the search (the digits
    job: 6259 of 14400 channels near)."""
    same = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
    for corner in (0, -1):
        left = same.nonzero().squeeze(1)
        if not left.numel():
            return same
        at = (rows[left],) + (corner,) * (child.dim() - 1)
        same[left] = child[at].to(other.dtype) == other[at]
    left = same.nonzero().squeeze(1)
    if left.numel():
        r = rows[left]
        same[left] = (child[r].to(other.dtype) == other[r]).flatten(1).all(dim=1)
    return same


def equal_kernels_first(dist: Tensor, choice: Tensor, child: Tensor, candidates: list[Tensor],
                        parent: Tensor) -> tuple[Tensor, Tensor]:
    """CPMS's cosine choice with a kernel equal to the child's, bit for bit, preferred: at
    distance 0, and chosen even where rounding made another candidate nearer. Computed, 1 - cos
    of two equal kernels is rounding noise, so a scope whose kernels all equal their parents (no
    warm-up, or a layer the warm-up left alone) would start from z-scores of that noise instead
    of all shared (init_mask_logits' degenerate scope). Only channels near 0 (or at 1) are
    compared (_near, _equal_rows). A bank holds near ones: a task whose channel weight decay
    alone moved keeps a scaled copy of T0's kernel, whose 1 - cos with a child equal to T0
    rounds below T0's own about half the time (resnet18, the child T0's, a bank of T0 and T0
    scaled by 1 - 1e-4: 1229 of 4800 channels chose the copy, 674 of them at a rounding
    distance, and the global log_standardized init made every channel task-specific instead of
    every one shared).

    ``parent`` (the candidates gathered by ``choice``) gets the rows of the changed choices in
    place. Returns (distances, choice), new tensors where anything changed. Of several equal
    candidates the chosen one stays; otherwise the first in the bank's order wins."""
    near = _near(dist)
    if not near.numel():
        return dist, choice
    same = _equal_rows(near, child, parent)
    zero = near[same]
    rest = near[~same]
    moved = []
    for t, cand in enumerate(candidates):  # the first equal one in the bank's order wins
        rows = rest[choice[rest] != t]  # (a channel's own choice was compared above)
        if not rows.numel():
            continue
        found = rows[_equal_rows(rows, child, cand)]
        if found.numel():
            moved.append((found, t))
            rest = rest[~torch.isin(rest, found)]
    if not zero.numel() and not moved:
        return dist, choice
    dist, choice = dist.clone(), choice.clone()
    dist[zero] = 0.0
    for rows, t in moved:
        dist[rows] = 0.0
        choice[rows] = t
        parent[rows] = candidates[t][rows].to(parent.dtype)
    return dist, choice


def merged_kernel_ids(model: nn.Module, result: SearchResult) -> dict[str, Tensor]:
    """Kernel ids after the merge: the parent id for shared channels, -1 (fresh) otherwise."""
    out = {}
    for name, layer in require_cwps_layers(model, "merged_kernel_ids"):
        ids = result.parent_ids[name].clone()
        ids[layer.task_specific().cpu()] = -1
        out[name] = ids
    return out
