"""CPMS (nearest parent kernel per channel), mask initialisation, kernel ids after merge."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from cwps_lightning.cwps import (
    KernelBank,
    cwps_layers,
    init_mask_logits,
    inject_cwps,
    kernel_distances,
    merge_cwps,
    merged_kernel_ids,
    nearest_parents,
    search_parents,
    set_stage,
    shareable_layers,
)
from cwps_lightning.cwps.search import gather_channels, relative_distances

from ..helpers import Small

LAYERS = ["conv1", "conv2", "fc"]


# -- nearest kernel on constructed cases ---------------------------------------------------------
def constructed_case():
    """child [3, 1, 1, 2] and candidates [3 tasks, 3, 1, 1, 2]."""
    child = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).view(3, 1, 1, 2)
    cands = torch.tensor(
        [
            # task 0            task 0 (channel 1)   task 0: a scaled copy of channel 2
            [[1.0, 0.1], [1.0, 0.0], [3.0, 3.0]],
            # task 1
            [[5.0, 5.0], [0.2, 1.5], [1.2, 0.9]],
            # task 2: channel 1 is a (slightly longer) parallel copy
            [[-1.0, 0.0], [0.0, 1.05], [-1.0, -1.0]],
        ]
    ).view(3, 3, 1, 1, 2)
    return child, cands


def test_kernel_distances_values():
    child, cands = constructed_case()
    d_l2 = kernel_distances(child, cands, "l2")
    d_cos = kernel_distances(child, cands, "cosine")
    assert d_l2.shape == d_cos.shape == (3, 3)
    for t in range(3):
        for j in range(3):
            a, b = child[j].flatten(), cands[t, j].flatten()
            assert d_l2[t, j].item() == pytest.approx(math.dist(a.tolist(), b.tolist()), abs=1e-6)
            cos = float(a @ b) / (float(a.norm()) * float(b.norm()))
            assert d_cos[t, j].item() == pytest.approx(1.0 - cos, abs=1e-6)


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (16, 3, 7, 7), (24, 8, 1, 1), (10, 40)])
def test_cosine_distances_equal_torch_cosine_similarity_bit_for_bit(shape):
    """CPMS's own cosine (no [T, C, K] expansion of the child) is F.cosine_similarity exactly,
    so the parents chosen and the mask init are those of before; a channels_last child, a
    candidate equal to the child and an all-zero kernel included."""
    g = torch.Generator().manual_seed(0)
    child = torch.randn(shape, generator=g)
    child[0] = 0.0
    if len(shape) == 4:
        child = child.contiguous(memory_format=torch.channels_last)
    cands = torch.stack([child.contiguous() + 0.1 * torch.randn(shape, generator=g)
                         for _ in range(3)] + [child.contiguous()])
    ref = 1.0 - torch.nn.functional.cosine_similarity(
        cands.flatten(2), child.flatten(1).unsqueeze(0), dim=2, eps=1e-12)
    assert torch.equal(kernel_distances(child, cands, "cosine"), ref)


@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("shape", [(6, 8, 3, 3), (4, 40000)])
def test_kernel_ids_skip_kernels_an_earlier_candidate_holds_and_change_nothing(distance, shape):
    """A candidate kernel with an earlier candidate's id at its channel takes that distance
    (in a bank, a task's shared channels are its parents' kernels): distances, choices and ties
    are those of computing every kernel, bit for bit. A channels_last child; candidates with
    some kernels new, one new, none new (a copy of T0: ties go to T0) and all new; long rows
    too, on two threads (one long row alone is reduced split over the threads, which rounds
    otherwise). The child is near T0, as after a warm-up: distances near 0 keep every bit."""
    g = torch.Generator().manual_seed(3)
    c = shape[0]
    t0 = torch.randn(shape, generator=g)
    child = t0 + 1e-3 * torch.randn(shape, generator=g)
    if len(shape) == 4:
        child = child.contiguous(memory_format=torch.channels_last)
    cands, ids = [t0], [torch.arange(c)]
    fresh = iter(range(100, 200))
    # (start: the candidate whose kernels it keeps where none are new)
    for start, new_rows in ((0, [1, 3]), (1, [0]), (0, []), (0, list(range(c)))):
        k, i = cands[start].clone(), ids[start].clone()
        for r in new_rows:
            k[r] = t0[r] + 1e-3 * torch.randn(shape[1:], generator=g)
            i[r] = next(fresh)
        cands.append(k)
        ids.append(i)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        full = kernel_distances(child, cands, distance)
        skipped = kernel_distances(child, cands, distance, ids)
        choice_full, _ = nearest_parents(child, cands, distance)
        choice, _ = nearest_parents(child, torch.stack(cands), distance, torch.stack(ids))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(skipped, full)
    assert torch.equal(choice, choice_full)
    # the copy of T0 (candidate 3) ties with T0 on every channel and never wins
    assert torch.equal(full[3], full[0]) and not (choice == 3).any()


def test_a_kernel_with_an_earlier_candidates_id_takes_its_distance():
    """The id is what tells: a kernel that claims an earlier candidate's id at its channel gets
    that candidate's distance without being compared, and the others are computed."""
    child, cands = constructed_case()
    ids = torch.tensor([[0, 1, 2], [0, 4, 5], [6, 4, 8]])  # cand 1 ch 0 = cand 0's; cand 2 ch 1 = cand 1's
    ref = kernel_distances(child, cands, "l2")
    d = kernel_distances(child, cands, "l2", ids)
    assert d[1, 0] == ref[0, 0] != ref[1, 0]
    assert d[2, 1] == ref[1, 1] != ref[2, 1]
    others = torch.ones_like(d, dtype=torch.bool)
    others[1, 0] = others[2, 1] = False
    assert torch.equal(d[others], ref[others])


def test_kernel_ids_are_not_used_across_candidates_of_several_dtypes():
    """A float64 candidate after a float32 one: each is computed in its own dtype, as without
    ids, even where the ids say the kernels are the same."""
    child, cands = constructed_case()
    mixed = [cands[0], cands[0].double()]
    ids = [torch.arange(3), torch.arange(3)]
    d = kernel_distances(child, mixed, "cosine", ids)
    assert d.dtype == torch.float64
    assert torch.equal(d, kernel_distances(child, mixed, "cosine"))


def test_kernel_ids_of_the_wrong_shape_are_refused():
    child, cands = constructed_case()
    with pytest.raises(ValueError, match=r"one \[C\] tensor per candidate \(3\).*\(2,\)"):
        kernel_distances(child, cands, "cosine", [torch.arange(3), torch.arange(2), torch.arange(3)])
    with pytest.raises(ValueError, match="per candidate"):
        kernel_distances(child, cands, "cosine", torch.zeros(2, 3, dtype=torch.int64))


def test_nearest_parents_l2():
    child, cands = constructed_case()
    choice, dist = nearest_parents(child, cands, "l2")
    # ch0: task 0 at 0.1; ch1: task 2 at 0.05; ch2: task 1 at |(0.2, -0.1)| (the scaled copy
    # in task 0 is 2*sqrt(2) away)
    assert choice.tolist() == [0, 2, 1]
    torch.testing.assert_close(dist, torch.tensor([0.1, 0.05, math.sqrt(0.05)]))


def test_nearest_parents_cosine():
    child, cands = constructed_case()
    choice, dist = nearest_parents(child, cands, "cosine")
    # ch2: the scaled copy (task 0) is at cosine distance 0, l2 picked task 1 instead
    assert choice.tolist() == [0, 2, 0]
    assert dist[1].item() == pytest.approx(0.0, abs=1e-6)
    assert dist[2].item() == pytest.approx(0.0, abs=1e-6)
    assert dist[0].item() == pytest.approx(1.0 - 1.0 / math.sqrt(1.01), abs=1e-6)


def test_unknown_distance_raises():
    child, cands = constructed_case()
    with pytest.raises(ValueError, match="manhattan"):
        nearest_parents(child, cands, "manhattan")
    with pytest.raises(ValueError, match="manhattan"):
        search_parents(Small(), KernelBank(LAYERS), "T0", distance="manhattan")


def test_gather_channels():
    stacked = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    out = gather_channels(stacked, torch.tensor([2, 0, 1, 2]))
    expected = torch.stack([stacked[2, 0], stacked[0, 1], stacked[1, 2], stacked[2, 3]])
    assert torch.equal(out, expected)


def test_gather_channels_into_a_tensor_of_another_layout():
    """With ``out``, the rows land in ``out`` itself (a channels_last parent, a float64 one),
    every element written: the same values as the gathered copy."""
    cands = [torch.randn(5, 3, 2, 2) for _ in range(3)]
    choice = torch.tensor([2, 0, 1, 2, 1])
    expected = gather_channels(cands, choice)
    for out in (torch.full((5, 2, 2, 3), float("nan")).permute(0, 3, 1, 2),
                torch.full((5, 3, 2, 2), float("nan"), dtype=torch.float64)):
        got = gather_channels(cands, choice, out=out)
        assert got is out
        assert torch.equal(out.float(), expected)
    assert out.dtype == torch.float64


# -- mask initialisation -------------------------------------------------------------------------
def test_init_mask_logits_mean_ratio_formula():
    d = torch.tensor([1.0, 2.0, 3.0])  # mean 2: s = 3 * (d - 2) / 2
    torch.testing.assert_close(init_mask_logits(d, "mean_ratio"), torch.tensor([-1.5, 0.0, 1.5]))
    d = torch.tensor([0.0, 0.5, 1.0, 2.5])  # mean 1
    torch.testing.assert_close(init_mask_logits(d, "mean_ratio"),
                               torch.tensor([-3.0, -1.5, 0.0, 4.5]))
    # a channel at the layer mean starts at sigmoid(0) = 0.5, identical channels at -3
    assert init_mask_logits(torch.tensor([0.0, 4.0]), "mean_ratio")[0].item() == pytest.approx(-3)
    # init_scale replaces the factor 3
    torch.testing.assert_close(init_mask_logits(torch.tensor([1.0, 3.0]), "mean_ratio", 1.0),
                               torch.tensor([-0.5, 0.5]))


@pytest.mark.parametrize("mask_init", ["mean_ratio", "log_standardized", "constant", "random"])
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_init_scale_is_refused(mask_init, scale):
    """search_parents(init_scale=nan) gave every mask logit, and then every output, nan."""
    with pytest.raises(ValueError, match=r"init_scale must be a finite number or None, got "):
        init_mask_logits(torch.tensor([1.0, 3.0]), mask_init, scale)


def test_distances_that_are_no_tensor_are_refused_by_name():
    with pytest.raises(TypeError, match=r"^init_mask_logits: dist must be a tensor of kernel "
                                        r"distances, got list"):
        init_mask_logits([1.0, 3.0])


def test_init_mask_logits_standardized_is_a_z_score():
    d = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, population std sqrt(3.5)
    z = (d - 3.0) / 3.5 ** 0.5
    torch.testing.assert_close(init_mask_logits(d, "standardized"), z)  # scale 1
    torch.testing.assert_close(init_mask_logits(d, "standardized", 2.0), 2.0 * z)
    out = init_mask_logits(torch.rand(1000, generator=torch.Generator().manual_seed(0)) ** 3,
                           "standardized")
    assert abs(out.mean().item()) < 1e-5 and out.std(unbiased=False).item() == pytest.approx(1.0)


def test_the_default_init_is_log_standardized():
    d = torch.rand(50) + 0.01
    assert torch.equal(init_mask_logits(d), init_mask_logits(d, "log_standardized"))


def test_init_mask_logits_degenerate_scopes():
    assert torch.equal(init_mask_logits(torch.zeros(5), "mean_ratio"), torch.full((5,), -3.0))
    for kind in ("standardized", "log_standardized"):
        assert torch.equal(init_mask_logits(torch.full((4,), 2.0), kind), torch.zeros(4))
        assert torch.equal(init_mask_logits(torch.tensor([0.7]), kind), torch.zeros(1))
        assert torch.equal(init_mask_logits(torch.zeros(3), kind), torch.full((3,), -6.0))


def test_init_mask_logits_clamp():
    d = torch.tensor([0.0, 0.0, 0.0, 10.0])  # mean 2.5: 3 * 7.5 / 2.5 = 9 -> clamped to 6
    out = init_mask_logits(d, "mean_ratio")
    torch.testing.assert_close(out, torch.tensor([-3.0, -3.0, -3.0, 6.0]))
    assert out.max().item() == 6.0
    assert init_mask_logits(d, "standardized", 100.0).max().item() == 6.0


def test_log_standardized_is_the_z_score_of_log_d_with_a_floor():
    d = torch.tensor([1e-3, 1e-2, 1e-1, 1.0, 0.0])
    floored = d.clamp_min(1e-6 * d.mean().item()).log()
    z = (floored - floored.mean()) / floored.std(unbiased=False)
    torch.testing.assert_close(init_mask_logits(d, "log_standardized"), z.clamp(-6, 6))
    # a heavy tail: z of D leaves nothing below logit(0.3); z of log D spreads the channels
    d = torch.distributions.LogNormal(0.0, 2.0).sample((4000,))
    share = {kind: [(torch.sigmoid(init_mask_logits(d, kind)) >= lam).float().mean().item()
                    for lam in (0.3, 0.5, 0.7)] for kind in ("standardized", "log_standardized")}
    assert share["standardized"][0] == 1.0
    assert share["log_standardized"] == pytest.approx([0.8, 0.5, 0.2], abs=0.03)
    assert torch.equal(init_mask_logits(torch.zeros(3), "log_standardized"), torch.full((3,), -6.))
    assert torch.equal(init_mask_logits(torch.full((3,), 0.2), "log_standardized"), torch.zeros(3))


@pytest.mark.parametrize("kind", ["standardized", "log_standardized", "mean_ratio"])
def test_init_mask_logits_scale_invariant(kind):
    d = torch.rand(7) + 0.1
    torch.testing.assert_close(init_mask_logits(d, kind), init_mask_logits(d * 1000.0, kind))


def test_init_mask_logits_random_and_constant_ignore_the_distances():
    d = torch.rand(500)
    g = torch.Generator().manual_seed(3)
    a = init_mask_logits(d, "random", 2.0, torch.Generator().manual_seed(3))
    b = init_mask_logits(d * 7, "random", 2.0, g)
    assert torch.equal(a, b)  # same seed, same draw, whatever d is
    assert a.std().item() == pytest.approx(2.0, rel=0.15)
    c = init_mask_logits(d * 7, "random", 2.0, g)
    assert not torch.equal(b, c)  # the generator moves on
    assert torch.equal(init_mask_logits(d, "constant"), torch.zeros(500))
    assert torch.equal(init_mask_logits(d, "constant", -1.5), torch.full((500,), -1.5))


def test_init_mask_logits_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match="mask_init must be one of .*'standardized'.*got 'zscore'"):
        init_mask_logits(torch.rand(3), "zscore")


# -- search_parents with a KernelBank ------------------------------------------------------------
def perturbed(base: nn.Module, near: dict[str, torch.Tensor]) -> nn.Module:
    """Copy of ``base`` whose shareable channels are near the base where ``near[layer]`` is
    True (tiny noise) and far elsewhere (large noise)."""
    m = copy.deepcopy(base)
    with torch.no_grad():
        for name in LAYERS:
            layer = m.get_submodule(name)
            scale = torch.where(near[name], 1e-3, 1.0)
            layer.weight.add_(
                scale.view(-1, *[1] * (layer.weight.dim() - 1)) * torch.randn_like(layer.weight)
            )
            if layer.bias is not None:
                layer.bias.add_(scale * torch.randn_like(layer.bias))
        for p in m.head.parameters():
            p.normal_()
    return m


@pytest.fixture
def bank_setup():
    base = Small()
    assert shareable_layers(base) == LAYERS
    pattern = {
        n: torch.arange(base.get_submodule(n).weight.shape[0]) % 3 != 1 for n in LAYERS
    }  # True: T0 near, False: T1 near
    t0 = perturbed(base, pattern)
    t1 = perturbed(base, {n: ~p for n, p in pattern.items()})
    bank = KernelBank(LAYERS)
    bank.add("T0", t0, num_classes=3)
    bank.add("T2", base, num_classes=3)  # the task itself: distance 0 if it were not excluded
    bank.add("T1", t1, num_classes=3)
    model = copy.deepcopy(base)
    inject_cwps(model)
    return bank, model, pattern


def brute_force(layer_weight: torch.Tensor, bank: KernelBank, name: str, tasks, distance):
    """Per channel: (task, distance) of the nearest kernel, by a plain Python loop."""
    out = []
    for j in range(layer_weight.shape[0]):
        a = layer_weight[j].flatten()
        best = None
        for t in tasks:
            b = bank.entries[t].layers[name].weight[j].flatten()
            if distance == "l2":
                d = float((a - b).norm())
            else:
                d = 1.0 - float(a @ b) / (float(a.norm()) * float(b.norm()))
            if best is None or d < best[1]:
                best = (t, d)
        out.append(best)
    return out


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_search_parents_installs_chosen_kernels(bank_setup, distance):
    bank, model, pattern = bank_setup
    child = {n: layer.weight.detach().clone() for n, layer in cwps_layers(model)}
    result = search_parents(model, bank, "T2", distance=distance, init_scope="layer",
                            mask_init="mean_ratio")
    layers = dict(cwps_layers(model))
    assert set(result.parent_ids) == set(LAYERS)
    for name in LAYERS:
        layer = layers[name]
        tasks = result.parent_task[name]
        assert len(tasks) == layer.weight.shape[0]
        assert "T2" not in tasks  # the task itself is excluded
        # the constructed nearest task, and the brute-force nearest among T0/T1
        expected = ["T0" if p else "T1" for p in pattern[name].tolist()]
        assert tasks == expected
        bf = brute_force(child[name], bank, name, ["T0", "T1"], distance)
        assert tasks == [t for t, _ in bf]
        torch.testing.assert_close(
            result.distances[name], torch.tensor([d for _, d in bf]), atol=1e-5, rtol=1e-4
        )
        for j, t in enumerate(tasks):
            entry = bank.entries[t].layers[name]
            assert torch.equal(layer.parent_weight[j], entry.weight[j])
            if layer.bias is not None:
                assert torch.equal(layer.parent_bias[j], entry.bias[j])
            assert result.parent_ids[name][j].item() == entry.ids[j].item()
        # the child itself is untouched, the logits follow the init formula
        assert torch.equal(layer.weight.detach(), child[name])
        torch.testing.assert_close(
            layer.mask_logits.detach(),
            init_mask_logits(result.distances[name], "mean_ratio"),
        )
    assert layers["conv2"].bias is None and layers["conv2"].parent_bias is None


def test_search_parents_errors():
    base = Small()
    bank = KernelBank(LAYERS)
    bank.add("T0", base, num_classes=3)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="CWPS layer"):
        search_parents(model, bank, "T1")  # model not injected
    inject_cwps(model)
    with pytest.raises(ValueError, match="T0"):
        search_parents(model, bank, "T0")  # nothing else to share with
    # a new task T1 may share with T0: every channel then picks T0
    # (l2: the distance of a kernel to its own copy is exactly 0; cosine's is rounding noise)
    result = search_parents(model, bank, "T1", distance="l2")
    assert all(t == "T0" for n in LAYERS for t in result.parent_task[n])
    # distance 0 everywhere -> every channel starts as shared (sigmoid(-6), mean_ratio: -3)
    for _, layer in cwps_layers(model):
        assert torch.equal(layer.mask_logits.detach(), torch.full_like(layer.mask_logits, -6.0))
    search_parents(model, bank, "T1", distance="l2", mask_init="mean_ratio")
    for _, layer in cwps_layers(model):
        assert torch.equal(layer.mask_logits.detach(), torch.full_like(layer.mask_logits, -3.0))


def test_merged_kernel_ids_and_bank_identity(bank_setup):
    bank, model, _ = bank_setup
    result = search_parents(model, bank, "T2")
    layers = dict(cwps_layers(model))
    with torch.no_grad():
        for layer in layers.values():
            c = layer.weight.shape[0]
            layer.mask_logits.copy_(torch.where(torch.arange(c) % 2 == 0, 2.0, -2.0))
    set_stage(model, "hard")
    ids = merged_kernel_ids(model, result)
    assert set(ids) == set(LAYERS)
    for name, layer in layers.items():
        spec = layer.task_specific()
        assert spec.any() and (~spec).any()
        assert torch.all(ids[name][spec] == -1)
        assert torch.equal(ids[name][~spec], result.parent_ids[name][~spec])
        # the result is not modified in place
        assert torch.all(result.parent_ids[name] >= 0)

    # the merged model, added with those ids, keeps the "same id, same numbers" invariant
    merge_cwps(model)
    bank.add("T3", model, num_classes=3, kernel_ids=ids)
    for name in LAYERS:
        new = bank.entries["T3"].layers[name]
        others = torch.cat([bank.entries[t].layers[name].ids for t in ("T0", "T1", "T2")])
        fresh = ids[name] == -1
        assert not torch.isin(new.ids[fresh], others).any()
        assert torch.equal(new.ids[~fresh], ids[name][~fresh])
        for t in ("T0", "T1", "T2"):
            old = bank.entries[t].layers[name]
            same = old.ids == new.ids
            assert torch.equal(old.weight[same], new.weight[same])
            if old.bias is not None:
                assert torch.equal(old.bias[same], new.bias[same])
    assert bank.shared_channels("T3", "T2") == 0
    assert bank.shared_channels("T3", "T0") + bank.shared_channels("T3", "T1") == sum(
        int((ids[n] >= 0).sum()) for n in LAYERS
    )


def _two_layer_case(scale_far: float):
    """A T0 with two layers; the child moved far (relative) in layer 0 and little in layer 1."""
    t0 = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 2))
    bank = KernelBank(["0", "2"])
    bank.add("T0", t0, 2)
    child = copy.deepcopy(t0)
    inject_cwps(child, exclude=["3"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        child[0].weight.add_(scale_far * torch.randn(child[0].weight.shape, generator=g))
        child[2].weight.add_(0.01 * torch.randn(child[2].weight.shape, generator=g))
    return child, bank


def test_init_scope_global_gives_more_specific_channels_where_the_layer_moved():
    child, bank = _two_layer_case(1.0)
    search_parents(child, bank, "a", "l2", init_scope="global")
    far = (torch.sigmoid(child[0].mask_logits) >= 0.5).float().mean()
    near = (torch.sigmoid(child[2].mask_logits) >= 0.5).float().mean()
    assert far == 1.0 and near == 0.0
    child, bank = _two_layer_case(1.0)
    search_parents(child, bank, "a", "l2", init_scope="layer")
    for i in (0, 2):  # per-layer: each layer splits around its own mean
        frac = (torch.sigmoid(child[i].mask_logits) >= 0.5).float().mean()
        assert 0.0 < frac < 1.0


def test_init_scope_unknown_raises():
    child, bank = _two_layer_case(1.0)
    with pytest.raises(ValueError, match="sideways"):
        search_parents(child, bank, "a", "l2", init_scope="sideways")


def test_search_parents_random_init_is_seeded():
    outs = []
    for seed in (5, 5, 6):
        child, bank = _two_layer_case(1.0)
        search_parents(child, bank, "a", "l2", mask_init="random", seed=seed)
        outs.append(torch.cat([child[0].mask_logits.detach(), child[2].mask_logits.detach()]))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_search_parents_standardized_global_init_is_z_scores_of_relative_distances():
    child, bank = _two_layer_case(1.0)
    result = search_parents(child, bank, "a", "l2", init_scope="global", mask_init="standardized")
    rel = torch.cat([relative_distances(result.distances[n], child.get_submodule(n).weight.detach(),
                                        "l2") for n in ("0", "2")])
    logits = torch.cat([child[0].mask_logits.detach(), child[2].mask_logits.detach()])
    torch.testing.assert_close(logits, ((rel - rel.mean()) / rel.std(unbiased=False)).clamp(-6, 6))


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_channels_last_models_search_as_contiguous_ones(bank_setup, distance):
    """The bank keeps kernels contiguous whatever the model's memory format, and CPMS on a
    channels_last model (bank and child) picks the same parents with the same distances, bit
    for bit, as on the contiguous one."""
    bank, model, _ = bank_setup
    cl_bank = KernelBank(LAYERS)
    for task, entry in bank.entries.items():
        net = copy.deepcopy(Small())
        net.load_state_dict({**entry.rest, **{f"{n}.{a}": getattr(entry.layers[n], a)
                                              for n in LAYERS for a in ("weight", "bias")
                                              if getattr(entry.layers[n], a) is not None}})
        cl_bank.add(task, net.to(memory_format=torch.channels_last), num_classes=3)
    kernel = cl_bank.entries["T0"].layers["conv1"].weight
    assert kernel.is_contiguous() and not kernel.is_contiguous(memory_format=torch.channels_last)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    plain = search_parents(model, bank, "T2", distance=distance)
    cl = search_parents(cl_model, cl_bank, "T2", distance=distance)
    for name in LAYERS:
        assert torch.equal(plain.distances[name], cl.distances[name])
        assert torch.equal(plain.parent_ids[name], cl.parent_ids[name])
        a, b = (dict(cwps_layers(m))[name] for m in (model, cl_model))
        assert torch.equal(a.parent_weight, b.parent_weight)
        assert torch.equal(a.mask_logits, b.mask_logits)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_unwritten_parents_are_all_installed_by_the_search(bank_setup, distance, channels_last):
    """inject_cwps(fill_parents=False) leaves the parents unwritten (here: NaN); the search
    writes every element of every one, in the layer's own layout, and the result is the one
    of parents first copied from the child."""
    bank, _, _ = bank_setup
    base = Small()
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    filled, unwritten = copy.deepcopy(base), copy.deepcopy(base)
    inject_cwps(filled)
    inject_cwps(unwritten, fill_parents=False)
    with torch.no_grad():
        for _, layer in cwps_layers(unwritten):
            layer.parent_weight.fill_(float("nan"))
            if layer.parent_bias is not None:
                layer.parent_bias.fill_(float("nan"))
    a = search_parents(filled, bank, "T2", distance=distance)
    b = search_parents(unwritten, bank, "T2", distance=distance)
    for name in LAYERS:
        assert torch.equal(a.distances[name], b.distances[name])
        x, y = (dict(cwps_layers(m))[name] for m in (filled, unwritten))
        assert torch.equal(x.parent_weight, y.parent_weight)
        assert torch.equal(x.mask_logits, y.mask_logits)
        if x.parent_bias is not None:
            assert torch.equal(x.parent_bias, y.parent_bias)
        assert y.parent_weight.stride() == y.weight.stride()


def test_a_layer_the_bank_lacks_keeps_its_parent_and_is_refused_if_that_is_unwritten(
        bank_setup):
    bank, _, _ = bank_setup
    small = KernelBank(["conv1", "fc"])
    for task, entry in bank.entries.items():
        small.entries[task] = copy.copy(entry)
        small.entries[task].layers = {n: entry.layers[n] for n in ("conv1", "fc")}
    filled, unwritten = Small(), Small()
    inject_cwps(filled)
    inject_cwps(unwritten, fill_parents=False)
    kept = filled.conv2.parent_weight.clone()
    search_parents(filled, small, "T2")
    assert torch.equal(filled.conv2.parent_weight, kept)
    assert not filled.fc.parent_unset and unwritten.fc.parent_unset
    with pytest.raises(ValueError, match=r"no kernels for the model's CWPS layers \['conv2'\]"):
        search_parents(unwritten, small, "T2")
    assert unwritten.conv1.parent_unset  # refused before anything was written


def test_search_checks_every_layers_shape_before_it_writes_any(bank_setup):
    bank, model, _ = bank_setup
    for entry in bank.entries.values():  # one channel fewer in the bank than in the model
        lw = entry.layers["fc"]
        entry.layers["fc"] = type(lw)(lw.weight[:-1], lw.bias[:-1], lw.ids[:-1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c, k = model.fc.weight.shape
    with pytest.raises(ValueError, match=rf"'fc'.*\({c - 1}, {k}\).*\({c}, {k}\)"):
        search_parents(model, bank, "T2")
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in before.items())


@pytest.mark.parametrize("mask_init", ["log_standardized", "standardized", "mean_ratio"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_kernels_equal_to_their_parents_start_shared_under_cosine(mask_init, scope):
    """A child whose kernels are T0's, bit for bit (no warm-up): every channel's distance is 0,
    not the rounding of 1 - cos, so every channel starts shared, as under l2."""
    torch.manual_seed(3)
    base = Small()
    for p in base.parameters():  # kernels of many sizes and signs: plenty of rounding
        p.data.normal_().mul_(0.05)
    bank = KernelBank(LAYERS)
    bank.add("T0", base, num_classes=3)
    model = copy.deepcopy(base)
    inject_cwps(model)
    raw = {n: 1.0 - torch.nn.functional.cosine_similarity(
        model.get_submodule(n).weight.detach().flatten(1),
        base.get_submodule(n).weight.detach().flatten(1), dim=1) for n in LAYERS}
    assert any(bool((d != 0).any()) for d in raw.values())  # the noise the fix is about
    for distance in ("cosine", "l2"):
        result = search_parents(model, bank, "task", distance, init_scope=scope,
                                mask_init=mask_init)
        for name in LAYERS:
            assert torch.equal(result.distances[name], torch.zeros_like(result.distances[name]))
            logits = model.get_submodule(name).mask_logits.detach()
            assert bool((torch.sigmoid(logits) < 0.3).all()), (distance, name, logits)


def test_only_kernels_equal_to_their_parents_count_zero():
    """A kernel a hair from its parent keeps its (tiny) cosine distance; the equal one next to
    it gets 0."""
    from cwps_lightning.cwps.search import equal_kernels_first

    def equal_kernels_at_zero(dist, child, parent):  # the parent as the only candidate
        choice = torch.zeros(dist.numel(), dtype=torch.long)
        return equal_kernels_first(dist, choice, child, [parent], parent.clone())[0]

    parent = torch.randn(5, 4, 3, 3)
    child = parent.clone()
    child[1, 0, 0, 0] += 1e-3  # its first value differs
    child[3, 2, 1, 1] += 1e-3  # a value in the middle: first and last are equal
    child[4].mul_(1 - 1e-4)  # a scaled copy (weight decay alone): cosine 1, not equal
    dist = torch.tensor([3e-7, 2e-6, -1e-7, 4e-6, 1.2e-7])
    out = equal_kernels_at_zero(dist, child, parent)
    assert out.tolist() == [0.0, pytest.approx(2e-6), 0.0, pytest.approx(4e-6),
                            pytest.approx(1.2e-7)]
    assert dist[0] == pytest.approx(3e-7)  # the input is left alone
    far = torch.tensor([0.5, 2e-6, 0.1, 0.2, 0.3])  # only channels within COSINE_ROUNDING
    assert equal_kernels_at_zero(far, child, parent).tolist() == pytest.approx(far.tolist())
    # an all-zero kernel equal to its parent: cosine distance 1 (F.cosine_similarity's 0), now 0
    zero_child, zero_parent = child.clone(), parent.clone()
    zero_child[2], zero_parent[2] = 0.0, 0.0
    zero_parent[0] = 0.0  # only the child's kernel 0 is nonzero there: 1 - 0 stays
    d = torch.tensor([1.0, 2e-6, 1.0, 4e-6, 1.2e-7])
    assert equal_kernels_at_zero(d, zero_child, zero_parent).tolist() == pytest.approx(
        [1.0, 2e-6, 0.0, 4e-6, 1.2e-7])
    # channels_last kernels and 2-D (linear) ones alike
    cl = equal_kernels_at_zero(dist, child.to(memory_format=torch.channels_last),
                               parent.to(memory_format=torch.channels_last))
    assert torch.equal(cl, out)
    assert torch.equal(equal_kernels_at_zero(dist, child.flatten(1), parent.flatten(1)), out)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_kernel_equal_to_t0s_is_chosen_over_a_scaled_copy_nearer_by_rounding(scope):
    """A bank can hold a scaled copy of T0's kernel (a task whose channel weight decay alone
    moved). For a child equal to T0 (no warm-up), 1 - cos with that copy rounds below T0's own
    for some channels: those must still get T0's kernel at distance 0, so every channel starts
    shared, as with T0 alone."""
    torch.manual_seed(3)
    base = Small()
    for p in base.parameters():
        p.data.normal_().mul_(0.05)
    scaled = copy.deepcopy(base)
    with torch.no_grad():
        for n in LAYERS:
            scaled.get_submodule(n).weight.mul_(1 - 1e-4)
    bank = KernelBank(LAYERS)
    bank.add("T0", base, num_classes=3)
    bank.add("a", scaled, num_classes=3)
    fooled = 0  # channels whose plain argmin takes the copy (what the test is about)
    for n in LAYERS:
        w = base.get_submodule(n).weight.detach()
        choice, _ = nearest_parents(w, [w, scaled.get_submodule(n).weight.detach()], "cosine")
        fooled += int((choice == 1).sum())
    assert fooled > 0
    model = copy.deepcopy(base)
    inject_cwps(model)
    result = search_parents(model, bank, "task", "cosine", init_scope=scope)
    t0_ids = {n: bank.entries["T0"].layers[n].ids for n in LAYERS}
    for n in LAYERS:
        layer = model.get_submodule(n)
        assert torch.equal(result.distances[n], torch.zeros_like(result.distances[n])), n
        assert set(result.parent_task[n]) == {"T0"}, n
        assert torch.equal(result.parent_ids[n], t0_ids[n]), n
        assert torch.equal(layer.parent_weight, base.get_submodule(n).weight.detach()), n
        assert torch.equal(layer.parent_bias, base.get_submodule(n).bias.detach()) \
            if layer.bias is not None else True
        assert bool((torch.sigmoid(layer.mask_logits.detach()) < 0.3).all()), n


def test_equal_kernels_first_keeps_an_equal_choice_and_patches_the_parent_rows():
    from cwps_lightning.cwps.search import equal_kernels_first

    child = torch.randn(6, 4, 3, 3)
    a, b = child.clone(), child.clone()
    a[0].mul_(1 - 1e-4)  # channel 0: only b equals the child
    b[1, 0, 0, 0] += 1.0  # channel 1: only a does
    c = child * (1 - 1e-4)  # a scaled copy of every channel
    candidates = [c, a, b]
    choice = torch.tensor([0, 0, 1, 2, 0, 0])  # (channels 2, 3 chose an equal candidate)
    dist = torch.tensor([-1e-7, 2e-7, 3e-7, 0.0, 0.4, 1e-7])
    parent = gather_channels(candidates, choice)
    d, ch = equal_kernels_first(dist, choice, child, candidates, parent)
    # 0 -> b (a is not equal there), 1 -> a, 2 and 3 keep theirs, 4 is far, 5 -> a (first)
    assert ch.tolist() == [2, 1, 1, 2, 0, 1]
    assert d.tolist() == [0.0, 0.0, 0.0, 0.0, pytest.approx(0.4), 0.0]
    assert torch.equal(parent, gather_channels(candidates, ch))
    assert choice.tolist() == [0, 0, 1, 2, 0, 0]  # the inputs are left alone
    assert dist[0] == pytest.approx(-1e-7)


def test_global_init_is_z_scores_of_l2_over_the_child_norm_in_every_layers_own_slice(bank_setup):
    """init_scope="global" with l2: the z-scores of d_j / ||child_j|| over all channels of all
    layers, and each layer takes its own channels' slice (three layers of 8, 6 and 10)."""
    bank, model, _ = bank_setup
    child = {n: layer.weight.detach().clone() for n, layer in cwps_layers(model)}
    result = search_parents(model, bank, "T2", "l2", init_scope="global",
                            mask_init="standardized")
    rel = torch.cat([result.distances[n] / child[n].flatten(1).norm(dim=1) for n in LAYERS])
    want = ((rel - rel.mean()) / rel.std(unbiased=False)).clamp(-6, 6)
    got = torch.cat([layer.mask_logits.detach() for _, layer in cwps_layers(model)])
    torch.testing.assert_close(got, want)
