"""KernelBank: membership, kernel ids, parameter accounting, reference counting, load_into."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cwps_lightning.cwps import KernelBank, shareable_layers

from ..helpers import Small

LAYERS = ["conv1", "conv2", "fc"]
CHANNELS = {"conv1": 8, "conv2": 6, "fc": 10}
KERNEL = {"conv1": 28, "conv2": 36, "fc": 7}
HEAD = 10 * 3 + 3  # the head's weight and bias (Small.head, its last Linear)
OWN = 8 + 8 + HEAD  # bn weight/bias + head: the task's own parameters


def trained_small() -> nn.Module:
    """A Small whose BN running statistics are not the defaults."""
    m = Small()
    m.train()
    with torch.no_grad():
        m(torch.randn(4, 3, 6, 6))
    return m.eval()


def all_ids(bank: KernelBank, layer: str) -> set[int]:
    return {int(i) for t in bank.tasks for i in bank.entries[t].layers[layer].ids}


def sharing_copy(src: nn.Module, bank: KernelBank, task: str, share: dict[str, torch.Tensor]):
    """A model that holds ``task``'s kernels where ``share[layer]`` is True (and new random
    kernels elsewhere, with its own BN/head), and the kernel ids saying so."""
    m = copy.deepcopy(src)
    ids = {}
    with torch.no_grad():
        for name in LAYERS:
            layer = m.get_submodule(name)
            keep = share[name]
            layer.weight[~keep] = torch.randn_like(layer.weight[~keep])
            if layer.bias is not None:
                layer.bias[~keep] = torch.randn_like(layer.bias[~keep])
            ids[name] = torch.where(keep, bank.entries[task].layers[name].ids, -1)
        for p in list(m.bn.parameters()) + list(m.head.parameters()):
            p.normal_()
    return m, ids


def test_model_layout():
    m = Small()
    assert shareable_layers(m) == LAYERS
    assert (
        sum(p.numel() for p in m.parameters()) == sum(CHANNELS[n] * KERNEL[n] for n in LAYERS) + OWN
    )


def test_shareable_of_takes_inject_cwps_exclude():
    """A bank for a model injected with an exclude list tracks the layers it wrapped (it took
    no exclude: such a bank needed shareable_layers by hand); a list replaces the head's
    default exclusion, as in inject_cwps."""
    from cwps_lightning.cwps import cwps_layers, inject_cwps

    assert KernelBank.shareable_of(Small()) == LAYERS
    assert KernelBank.shareable_of(Small(), exclude=["head", "conv2"]) == ["conv1", "fc"]
    assert KernelBank.shareable_of(Small(), exclude=["conv2"]) == ["conv1", "fc", "head"]
    model = Small()
    inject_cwps(model, exclude=["head", "conv2"])
    assert [n for n, _ in cwps_layers(model)] == KernelBank.shareable_of(
        Small(), exclude=["head", "conv2"])


def test_needs_layers():
    with pytest.raises(ValueError):
        KernelBank([])


def with_head(classes: int) -> Small:
    m = Small()
    m.head = nn.Linear(10, classes)
    return m


def test_add_remove_membership():
    bank = KernelBank(LAYERS)
    assert bank.tasks == []
    bank.add("T0", Small(), num_classes=3, meta={"acc": 0.9})
    bank.add("T1", with_head(5), num_classes=5)
    assert bank.tasks == ["T0", "T1"]
    assert "T0" in bank and "T9" not in bank
    assert bank.entries["T1"].num_classes == 5
    assert bank.entries["T0"].meta == {"acc": 0.9}
    bank.remove("T0")
    assert bank.tasks == ["T1"] and "T0" not in bank
    with pytest.raises(KeyError, match=r"bank\.remove\('T0'\): no such task; the bank holds "
                                       r"\['T1'\]"):
        bank.remove("T0")
    # adding under an existing name replaces the entry
    bank.add("T1", with_head(7), num_classes=7)
    assert bank.tasks == ["T1"] and bank.entries["T1"].num_classes == 7


def test_fresh_ids():
    bank = KernelBank(LAYERS)
    bank.add("T0", Small(), num_classes=3)
    bank.add("T1", Small(), num_classes=3)
    for name in LAYERS:
        a = bank.entries["T0"].layers[name].ids
        b = bank.entries["T1"].layers[name].ids
        assert a.dtype == b.dtype == torch.int64
        assert a.shape == b.shape == (CHANNELS[name],)
        assert len(set(a.tolist())) == CHANNELS[name]
        assert not set(a.tolist()) & set(b.tolist())
    assert bank.shared_channels("T0", "T1") == 0


def test_shared_ids():
    bank = KernelBank(LAYERS)
    t0 = Small()
    bank.add("T0", t0, num_classes=3)
    share = {n: torch.arange(CHANNELS[n]) < 3 for n in LAYERS}  # first 3 channels shared
    t1, ids = sharing_copy(t0, bank, "T0", share)
    given = copy.deepcopy(ids)
    bank.add("T1", t1, num_classes=3, kernel_ids=ids)
    for name in LAYERS:
        ids0 = bank.entries["T0"].layers[name].ids
        ids1 = bank.entries["T1"].layers[name].ids
        keep = share[name]
        assert torch.equal(ids1[keep], ids0[keep])
        new = ids1[~keep].tolist()
        assert len(set(new)) == len(new)
        assert not set(new) & set(ids0.tolist())
        assert (ids1 >= 0).all()
        assert torch.equal(ids[name], given[name])  # the caller's tensor is not modified
    assert bank.shared_channels("T1", "T0") == 9
    assert bank.shared_channels("T0", "T1") == 9
    assert bank.shared_channels("T0", "T0") == sum(CHANNELS.values())


def test_wrong_number_of_ids_raises():
    bank = KernelBank(LAYERS)
    ids = {n: torch.full((CHANNELS[n],), -1) for n in LAYERS}
    ids["conv2"] = torch.full((5,), -1)
    with pytest.raises(ValueError, match="conv2"):
        bank.add("T0", Small(), num_classes=3, kernel_ids=ids)


def test_param_count_single_task():
    bank = KernelBank(LAYERS)
    m = trained_small()
    bank.add("T0", m, num_classes=3)
    count = bank.param_count()
    total = sum(p.numel() for p in m.parameters())  # buffers (BN stats) not counted
    assert count == {
        "kernels": sum(CHANNELS[n] * KERNEL[n] for n in LAYERS),
        "task_own": OWN,
        "heads": HEAD,
        "total": total,
        "backbone": total - sum(p.numel() for p in m.head.parameters()),
    }
    assert {n: bank.kernel_params(n) for n in LAYERS} == KERNEL


def test_param_count_full_and_partial_sharing():
    bank = KernelBank(LAYERS)
    t0 = Small()
    bank.add("T0", t0, num_classes=3)
    alone = bank.param_count()

    # T1 shares every kernel with T0: only its own (BN + head) parameters are added
    everything = {n: torch.ones(CHANNELS[n], dtype=torch.bool) for n in LAYERS}
    t1, ids = sharing_copy(t0, bank, "T0", everything)
    bank.add("T1", t1, num_classes=3, kernel_ids=ids)
    both = bank.param_count()
    assert both["kernels"] == alone["kernels"]
    assert both["task_own"] == 2 * OWN
    assert both["total"] == alone["total"] + OWN
    # the paper's count: a task that shares everything adds only its normalisation layers
    assert both["heads"] == 2 * HEAD and both["backbone"] == alone["backbone"] + OWN - HEAD

    # T2 shares only channel 0 of every layer with T0
    first = {n: torch.arange(CHANNELS[n]) == 0 for n in LAYERS}
    t2, ids = sharing_copy(t0, bank, "T0", first)
    bank.add("T2", t2, num_classes=3, kernel_ids=ids)
    fresh = sum((CHANNELS[n] - 1) * KERNEL[n] for n in LAYERS)
    assert bank.param_count()["kernels"] == alone["kernels"] + fresh
    assert bank.param_count()["total"] == alone["total"] + 2 * OWN + fresh
    # counting a subset of tasks
    assert bank.param_count(["T1"]) == alone
    assert bank.param_count(["T1", "T2"])["kernels"] == alone["kernels"] + fresh


def test_reference_counting_on_remove():
    bank = KernelBank(LAYERS)
    t0 = Small()
    bank.add("T0", t0, num_classes=3)
    share = {n: torch.arange(CHANNELS[n]) % 2 == 0 for n in LAYERS}
    t1, ids = sharing_copy(t0, bank, "T0", share)
    bank.add("T1", t1, num_classes=3, kernel_ids=ids)
    ids0 = {n: bank.entries["T0"].layers[n].ids.clone() for n in LAYERS}
    ids1 = {n: bank.entries["T1"].layers[n].ids.clone() for n in LAYERS}
    issued = {n: all_ids(bank, n) for n in LAYERS}
    before = bank.param_count()

    bank.remove("T0")  # T0 created the shared kernels; T1 still references them
    for name in LAYERS:
        distinct = set(bank.distinct_ids(name).tolist())
        assert set(ids0[name][share[name]].tolist()) <= distinct  # survive
        assert not set(ids0[name][~share[name]].tolist()) & distinct  # dropped
        assert distinct == set(ids1[name].tolist())
    after = bank.param_count()
    dropped = sum(int((~share[n]).sum()) * KERNEL[n] for n in LAYERS)
    assert after["kernels"] == before["kernels"] - dropped
    assert after["total"] == before["total"] - dropped - OWN
    total = sum(p.numel() for p in t1.parameters())
    assert after == {
        "kernels": sum(CHANNELS[n] * KERNEL[n] for n in LAYERS),
        "task_own": OWN,
        "heads": HEAD,
        "total": total,
        "backbone": total - HEAD,
    }

    # ids handed out later are fresh: never one that was issued before
    bank.add("T2", Small(), num_classes=3)
    for name in LAYERS:
        assert not set(bank.entries["T2"].layers[name].ids.tolist()) & issued[name]


def test_candidates():
    bank = KernelBank(LAYERS)
    models = {t: Small() for t in ("T0", "T1", "T2")}
    for t, m in models.items():
        bank.add(t, m, num_classes=3)
    w, b, ids, names = bank.candidates("conv1", exclude="T1")
    assert names == ["T0", "T2"]
    assert w.shape == (2, 8, 3, 3, 3) and b.shape == (2, 8) and ids.shape == (2, 8)
    assert torch.equal(w[1], models["T2"].conv1.weight.detach())
    assert torch.equal(b[0], models["T0"].conv1.bias.detach())
    assert torch.equal(ids[1], bank.entries["T2"].layers["conv1"].ids)
    w, b, ids, names = bank.candidates("conv2")
    assert names == ["T0", "T1", "T2"] and b is None
    single = KernelBank(LAYERS)
    single.add("T0", Small(), num_classes=3)
    with pytest.raises(ValueError, match="T0"):
        single.candidates("fc", exclude="T0")


def test_bank_copies_weights():
    bank = KernelBank(LAYERS)
    m = Small()
    bank.add("T0", m, num_classes=3)
    before = bank.entries["T0"].layers["conv1"].weight.clone()
    bn_before = bank.entries["T0"].rest["bn.weight"].clone()
    with torch.no_grad():
        m.conv1.weight.add_(1.0)
        m.bn.weight.add_(1.0)
    assert torch.equal(bank.entries["T0"].layers["conv1"].weight, before)
    assert torch.equal(bank.entries["T0"].rest["bn.weight"], bn_before)


def test_load_into_round_trip():
    bank = KernelBank(LAYERS)
    t0 = trained_small()
    bank.add("T0", t0, num_classes=3)
    share = {n: torch.arange(CHANNELS[n]) < 4 for n in LAYERS}
    t1, ids = sharing_copy(t0, bank, "T0", share)
    t1.train()
    with torch.no_grad():
        t1(torch.randn(4, 3, 6, 6))  # its own BN statistics
    t1.eval()
    bank.add("T1", t1, num_classes=3, kernel_ids=ids)

    x = torch.randn(2, 3, 6, 6)
    for task, src in (("T0", t0), ("T1", t1)):
        target = Small().eval()
        assert not torch.allclose(target(x), src(x))
        out = bank.load_into(task, target)
        assert out is target
        src_state, new_state = src.state_dict(), target.state_dict()
        assert src_state.keys() == new_state.keys()
        for k in src_state:
            assert torch.equal(src_state[k], new_state[k]), k
        torch.testing.assert_close(target(x), src(x), atol=0, rtol=0)


def bank_state(bank: KernelBank):
    return (bank.tasks, dict(bank.next_id), bank.revision)


@pytest.mark.parametrize("layer, edit", [("conv2", "weight"), ("fc", "bias")])
def test_a_shared_channel_with_other_numbers_is_refused(layer, edit):
    """The same id, the same numbers: a store keeps each id once, so a carried id whose kernel
    differs would be served to one of the two tasks wrongly."""
    bank = KernelBank(LAYERS)
    t0 = trained_small()
    bank.add("T0", t0, num_classes=3)
    share = {n: torch.arange(CHANNELS[n]) < 3 for n in LAYERS}
    t1, ids = sharing_copy(t0, bank, "T0", share)
    with torch.no_grad():
        getattr(t1.get_submodule(layer), edit)[1] += 1e-3
    before = bank_state(bank)
    kid = int(bank.entries["T0"].layers[layer].ids[1])
    with pytest.raises(ValueError, match=rf"{layer} channel 1 carries kernel id {kid}, which task "
                                         r"'T0' holds with other numbers"):
        bank.add("T1", t1, num_classes=3, kernel_ids=ids)
    assert bank_state(bank) == before


def test_an_id_no_other_task_holds_is_refused():
    bank = KernelBank(LAYERS)
    bank.add("T0", Small(), num_classes=3)
    ids = {n: torch.full((CHANNELS[n],), -1) for n in LAYERS}
    ids["fc"][4] = 999
    before = bank_state(bank)
    with pytest.raises(ValueError, match="fc channel 4 carries kernel id 999, which no kept"):
        bank.add("T1", Small(), num_classes=3, kernel_ids=ids)
    assert bank_state(bank) == before


def test_a_carried_kernel_at_another_channel_or_from_the_replaced_entry():
    """An id is the kernel's wherever it sits; a replaced task may carry its own earlier ids,
    with their numbers (two of its channels with one id and other numbers: refused)."""
    bank = KernelBank(LAYERS)
    t0 = trained_small()
    bank.add("T0", t0, num_classes=3)
    t1 = copy.deepcopy(t0)
    with torch.no_grad():
        t1.conv1.weight[0] = t0.conv1.weight[5]
        t1.conv1.bias[0] = t0.conv1.bias[5]
        t1.fc.weight.add_(1.0)
    ids = {n: torch.full((CHANNELS[n],), -1) for n in LAYERS}
    ids["conv1"][0] = bank.entries["T0"].layers["conv1"].ids[5]
    bank.add("T1", t1, num_classes=3, kernel_ids=ids)
    assert bank.shared_channels("T0", "T1") == 0  # (the same kernel at other channels)
    assert bank.distinct_ids("conv1").numel() == 2 * CHANNELS["conv1"] - 1
    own = {n: bank.entries["T1"].layers[n].ids.clone() for n in LAYERS}
    bank.add("T1", copy.deepcopy(t1), num_classes=3, kernel_ids=own)  # fc: T1's ids alone
    assert torch.equal(bank.entries["T1"].layers["fc"].ids, own["fc"])
    own["fc"][1] = own["fc"][0]
    before = bank_state(bank)
    with pytest.raises(ValueError, match=r"fc channel 1 carries kernel id \d+, which task 'T1' "
                                         r"\(the entry it replaces\) holds with other numbers"):
        bank.add("T1", copy.deepcopy(t1), num_classes=3, kernel_ids=own)
    assert bank_state(bank) == before


def test_weights_of_another_dtype_are_refused():
    """The store keeps one table per layer: a bfloat16 task next to float32 ones is refused
    at once (the store would fail to write it later)."""
    bank = KernelBank(LAYERS)
    t0 = trained_small()
    bank.add("T0", t0, num_classes=3)
    before = bank_state(bank)
    with pytest.raises(ValueError, match=r"conv1 holds torch.bfloat16 weights, the bank's tasks "
                                         r"torch.float32"):
        bank.add("T1", copy.deepcopy(t0).to(torch.bfloat16), num_classes=3)
    assert bank_state(bank) == before
    bank.add("T0", copy.deepcopy(t0).to(torch.bfloat16), num_classes=3)  # (its only task)
    assert bank.entries["T0"].layers["fc"].weight.dtype == torch.bfloat16


def test_what_add_takes_is_checked_before_the_bank_changes():
    """A model whose CWPS layers are not merged, of another architecture (a missing layer,
    another kernel shape, a layer the bank's tasks lack: a deeper model of
    the same family was accepted, its extra layers counted as its own, and only the store's
    rebuild failed), a head of another class count, kernel ids not per layer: refused, naming
    it, with the bank as it was."""
    from cwps_lightning.cwps import inject_cwps

    bank = KernelBank(LAYERS)
    bank.add("T0", Small(), num_classes=3)
    fresh = {n: torch.full((CHANNELS[n],), -1) for n in LAYERS}
    unmerged = Small()
    inject_cwps(unmerged)
    other = Small()
    other.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)  # (not grouped: another shape)
    headless = Small()
    del headless.fc
    deeper = Small()  # every shared layer, and one more the bank's tasks lack
    deeper.extra = nn.Conv2d(6, 6, 1)
    wider = Small()  # (a layer left out of sharing: not in the bank's layers)
    wider.extra = nn.Sequential(nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 1),
                                nn.Conv2d(6, 6, 1))
    cases = [
        (deeper, {}, ValueError, r"the model's kernels are not the bank's tasks' \(another "
                                 r"architecture\?\): 1 kernel\(s\) they lack "
                                 r"\(extra\.weight\)"),
        (wider, {}, ValueError, r"4 kernel\(s\) they lack \(extra\.0\.weight, "
                                r"extra\.1\.weight, extra\.2\.weight, \.\.\.\)"),
        (unmerged, {}, ValueError, r"still has CWPS layers \(conv1, .*merge_cwps"),
        (other, {}, ValueError, r"conv2 has a \(6, 8, 3, 3\) kernel, the bank's tasks "
                                r"\(6, 4, 3, 3\)"),
        (headless, {}, ValueError, r"the model has no layer 'fc'"),
        (Small(), {"num_classes": 5}, ValueError, r"num_classes=5, but its head head\.weight "
                                                  r"has 3 outputs"),
        (Small(), {"kernel_ids": [1, 2]}, TypeError, r"kernel_ids must be a dict"),
        (Small(), {"kernel_ids": {"conv1": torch.full((8,), -1)}}, ValueError,
         r"kernel_ids has no entry for layer 'conv2'"),
        # ids: integers, -1 or a kept kernel's (-3 counted as fresh; a float list was
        # truncated, a str raised an AttributeError)
        (Small(), {"kernel_ids": {**fresh, "conv1": torch.tensor([-1] * 7 + [-3])}}, ValueError,
         r"conv1 channel 7 carries kernel id -3; an id is a kept kernel's \(>= 0\) or -1"),
        (Small(), {"kernel_ids": {**fresh, "conv2": [0.0] * 6}}, TypeError,
         r"kernel_ids\['conv2'\] must be integer ids \(a tensor or list of ints\), got list "
         r"of torch\.float32"),
        (Small(), {"kernel_ids": {**fresh, "fc": "0123456789"}}, TypeError,
         r"kernel_ids\['fc'\] must be integer ids .*got str"),
        (Small(), {"kernel_ids": {**fresh, "fc": [-1] * 9}}, ValueError,
         r"fc: \(9,\) kernel ids for 10 channels"),
        ("Small", {}, TypeError, r"bank\.add\('T1'\): expected the model, an nn\.Module; got "
                                 r"str 'Small'"),
    ]
    for model, kwargs, error, message in cases:
        kwargs = {"num_classes": 3, **kwargs}
        with pytest.raises(error, match=message):
            bank.add("T1", model, **kwargs)
        assert bank.tasks == ["T0"] and bank.revision == 1


def test_kernel_ids_given_as_lists_are_taken_and_layers_not_conv_or_linear_refused():
    bank = KernelBank(LAYERS)
    t0 = Small()
    bank.add("T0", t0, num_classes=3)
    held = {n: bank.entries["T0"].layers[n].ids.tolist() for n in LAYERS}
    bank.add("T1", copy.deepcopy(t0), num_classes=3, kernel_ids=held)  # every channel shared
    assert bank.shared_channels("T0", "T1") == sum(CHANNELS.values())
    # a norm's weight is a vector of the task's own; the bank shares Conv2d / Linear kernels
    with pytest.raises(ValueError, match=r"bank\.add\('T0'\): the bank's layer 'bn' is a "
                                         r"BatchNorm2d, not an nn\.Conv2d / nn\.Linear"):
        KernelBank([*LAYERS, "bn"]).add("T0", Small(), num_classes=3)


def test_a_task_of_another_class_count_joins_a_bank_whose_t0_kept_no_head_names():
    """(a store of a revision before head names were kept loads its T0 with none: its head
    tensors are in its rest, and the architecture check must still leave heads out)"""
    bank = KernelBank(LAYERS)
    bank.add("T0", Small(), num_classes=3)
    bank.entries["T0"].head_param_names = []
    bank.add("T1", with_head(5), num_classes=5)
    assert bank.tasks == ["T0", "T1"]


def test_a_head_that_drops_t0s_distillation_head_joins_the_bank():
    """timm's RepViT: a task's head (reset_classifier) has no head_dist, T0's has one with its
    BatchNorm; the architecture check must not take that for another architecture."""
    from cwps_lightning.models import create_backbone, task_model

    t0 = create_backbone("repvit_m0_9", 10)
    bank = KernelBank(KernelBank.shareable_of(t0))
    bank.add("T0", t0, num_classes=10)
    bank.add("T1", task_model(t0, 5), num_classes=5)
    assert bank.tasks == ["T0", "T1"]


def test_num_classes_is_an_integer():
    """numpy's and a tensor's integers are taken as ints (the manifest recorded '5' and
    'tensor(5)', which the store could not rebuild); 5.0, '5' and True are refused."""
    np = pytest.importorskip("numpy")
    bank = KernelBank(LAYERS)
    for i, count in enumerate((3, np.int64(3), torch.tensor(3))):
        entry = bank.add(f"T{i}", Small(), num_classes=count)
        assert type(entry.num_classes) is int and entry.num_classes == 3
    for count in (3.0, "3", True, torch.tensor(True)):
        with pytest.raises(TypeError, match=r"num_classes must be an integer, got "):
            bank.add("bad", Small(), num_classes=count)
    with pytest.raises(ValueError, match=r"num_classes must be >= 1, got 0"):
        bank.add("bad", Small(), num_classes=0)
    assert bank.tasks == ["T0", "T1", "T2"]


def test_a_task_name_that_is_no_string_is_refused():
    """(an int name was stored, then model(0) said 'task 0 is not in the store; tasks: [0]')"""
    bank = KernelBank(LAYERS)
    for name in (0, "", None):
        with pytest.raises(TypeError, match=r"the task name must be a non-empty string"):
            bank.add(name, Small(), num_classes=3)
    assert bank.tasks == []


def test_a_carried_kernel_id_0_with_other_numbers_is_refused():
    """Id 0 (T0's first kernel of every layer) is a kernel id like the others."""
    bank = KernelBank(LAYERS)
    t0 = trained_small()
    bank.add("T0", t0, num_classes=3)
    share = {n: torch.arange(CHANNELS[n]) < 3 for n in LAYERS}
    t1, ids = sharing_copy(t0, bank, "T0", share)
    assert int(ids["conv1"][0]) == 0
    with torch.no_grad():
        t1.conv1.weight[0] += 1e-3
    before = bank_state(bank)
    with pytest.raises(ValueError, match="conv1 channel 0 carries kernel id 0, which task 'T0'"):
        bank.add("T1", t1, num_classes=3, kernel_ids=ids)
    assert bank_state(bank) == before
