"""The multi-task store: round trip, deduplication, reference counting, corruption."""

from __future__ import annotations

import copy
import json
import re

import pytest
import timm
import torch

from cwps_lightning.cwps import (
    KernelBank,
    MultiTaskStore,
    StoreError,
    cwps_layers,
    inject_cwps,
    merge_cwps,
    merged_kernel_ids,
    save_store,
    search_parents,
    set_stage,
)

META = {"backbone": {"name": "resnet18", "kwargs": {}}}


def _t0():
    return timm.create_model("resnet18", num_classes=10).eval()


def _child(t0, bank, task, num_classes, noise, logit_fn):
    """A task model sharing with ``bank`` through CPMS, with a chosen mask."""
    model = timm.create_model("resnet18", num_classes=num_classes)
    state = {k: v for k, v in t0.state_dict().items() if not k.startswith("fc.")}
    model.load_state_dict(state, strict=False)
    inject_cwps(model)
    with torch.no_grad():
        for _, layer in cwps_layers(model):
            layer.weight.add_(noise * torch.randn_like(layer.weight))
    result = search_parents(model, bank, task)
    with torch.no_grad():
        for name, layer in cwps_layers(model):
            layer.mask_logits.copy_(logit_fn(name, layer.mask_logits.shape[0]))
    set_stage(model, "hard")
    ids = merged_kernel_ids(model, result)
    merge_cwps(model)
    return model.eval(), ids


def _t0_bank() -> KernelBank:
    """A bank holding only a random T0."""
    t0 = _t0()
    bank = KernelBank(KernelBank.shareable_of(t0))
    bank.add("T0", t0, 10)
    return bank


def _half(name, c):  # first half of every layer task-specific, second half shared
    return torch.where(torch.arange(c) < c // 2, 5.0, -5.0)


def test_round_trip_reproduces_every_model_and_counts(tmp_path):
    torch.manual_seed(0)
    t0 = _t0()
    bank = KernelBank(KernelBank.shareable_of(t0))
    bank.add("T0", t0, 10)
    a, ids_a = _child(t0, bank, "a", 5, 0.01, _half)
    bank.add("a", a, 5, kernel_ids=ids_a)
    save_store(tmp_path, bank, META)
    store = MultiTaskStore.load(tmp_path)
    assert store.tasks == ["T0", "a"]
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(store.model("a")(x), a(x))
    assert torch.equal(store.model("T0")(x), t0(x))
    assert store.param_count() == bank.param_count()
    # a shares half of its channels: the store holds T0 + about half a backbone
    backbone = sum(p.numel() for n, p in t0.named_parameters() if not n.startswith("fc."))
    ratio = store.param_count()["total"] / backbone
    assert 1.4 < ratio < 1.6
    # no hidden copies: tensor bytes within 5% of 4 bytes per stored parameter
    tensor_bytes = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert tensor_bytes <= 1.05 * 4 * store.param_count()["total"]
    # by construction (_half): in every layer of C channels, the last C - C // 2 are T0's
    channels = [t0.get_submodule(n).weight.shape[0] for n in store.layers]
    names, rel = store.relation_matrix()
    assert names == ["T0", "a"]
    assert rel.tolist() == [[sum(channels), sum(c - c // 2 for c in channels)],
                            [sum(c - c // 2 for c in channels), sum(channels)]]
    # index(): a layer's rows; a task or layer it lacks is named (a bare KeyError of its key)
    layer = store.layers[0]
    assert store.index("a", layer).shape == (channels[0],)
    with pytest.raises(KeyError, match=r"task 'nope' is not in the store; tasks: \['T0', 'a'\]"):
        store.index("nope", layer)
    with pytest.raises(KeyError, match=r"layer 'conv9' is not one of the store's layers: "):
        store.index("a", "conv9")


def _copy_channels(model, source, layer_channels):
    """Copy kernels (weight[j] and bias[j]) of ``source`` into ``model``: {layer: [j, ...]}."""
    with torch.no_grad():
        for name, js in layer_channels.items():
            dst, src = model.get_submodule(name), source.get_submodule(name)
            for j in js:
                dst.weight[j] = src.weight[j]
                if dst.bias is not None:
                    dst.bias[j] = src.bias[j]


def test_relation_matrix_counts_the_shared_channels_of_every_pair(tmp_path):
    """Three tasks with chosen kernel ids; in each layer of C channels, channel j of
    a: T0's kernel j for j < C // 4, else its own;
    b: T0's kernel j for j % 4 == 0, a's kernel j for j % 4 in (1, 2), else its own.
    So a and b hold the same kernel where b took a's, or where both took T0's."""
    torch.manual_seed(2)
    t0 = _t0()
    bank = KernelBank(KernelBank.shareable_of(t0))
    bank.add("T0", t0, 10)
    t0_ids = {n: bank.entries["T0"].layers[n].ids for n in bank.layer_names}
    channels = {n: t0.get_submodule(n).weight.shape[0] for n in bank.layer_names}
    a_from_t0 = {n: [j for j in range(c) if j < c // 4] for n, c in channels.items()}
    b_from_t0 = {n: [j for j in range(c) if j % 4 == 0] for n, c in channels.items()}
    b_from_a = {n: [j for j in range(c) if j % 4 in (1, 2)] for n, c in channels.items()}

    a = timm.create_model("resnet18", num_classes=5).eval()
    _copy_channels(a, t0, a_from_t0)
    ids_a = {n: torch.full((c,), -1, dtype=torch.int64) for n, c in channels.items()}
    for n, js in a_from_t0.items():
        ids_a[n][js] = t0_ids[n][js]
    bank.add("a", a, 5, kernel_ids=ids_a)
    a_ids = {n: bank.entries["a"].layers[n].ids for n in bank.layer_names}

    b = timm.create_model("resnet18", num_classes=3).eval()
    _copy_channels(b, t0, b_from_t0)
    _copy_channels(b, a, b_from_a)
    ids_b = {n: torch.full((c,), -1, dtype=torch.int64) for n, c in channels.items()}
    for n in channels:
        ids_b[n][b_from_t0[n]] = t0_ids[n][b_from_t0[n]]
        ids_b[n][b_from_a[n]] = a_ids[n][b_from_a[n]]
    bank.add("b", b, 3, kernel_ids=ids_b)
    save_store(tmp_path, bank, META)
    store = MultiTaskStore.load(tmp_path)

    def count(js_of):  # channels over all layers where j is in js_of(layer, C)
        return sum(len(js_of(n, c)) for n, c in channels.items())

    total = sum(channels.values())
    t0_a = count(lambda n, c: a_from_t0[n])
    t0_b = count(lambda n, c: set(b_from_t0[n]) | (set(b_from_a[n]) & set(a_from_t0[n])))
    a_b = count(lambda n, c: set(b_from_a[n]) | (set(b_from_t0[n]) & set(a_from_t0[n])))
    assert len({t0_a, t0_b, a_b}) == 3  # every pair has a count of its own
    names, rel = store.relation_matrix()
    assert names == ["T0", "a", "b"]
    assert rel.tolist() == [[total, t0_a, t0_b], [t0_a, total, a_b], [t0_b, a_b, total]]
    # and the models the store rebuilds hold those copies: b's kernel j is a's kernel j
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(store.model("b")(x), b(x))
    assert torch.equal(store.model("a")(x), a(x))


def test_reference_counting_keeps_used_kernels_and_drops_unused(tmp_path):
    torch.manual_seed(1)
    t0 = _t0()
    bank = KernelBank(KernelBank.shareable_of(t0))
    bank.add("T0", t0, 10)
    a, ids_a = _child(t0, bank, "a", 4, 0.05, lambda n, c: torch.full((c,), 5.0))  # all new
    bank.add("a", a, 4, kernel_ids=ids_a)
    ids_a = {n: bank.entries["a"].layers[n].ids.clone() for n in bank.layer_names}
    # b starts from a's weights, so CPMS picks a's kernels; it shares half of its channels
    b, ids_b = _child(a, bank, "b", 4, 0.0, _half)
    bank.add("b", b, 4, kernel_ids=ids_b)
    used_by_b = {n: set(ids_b[n].tolist()) & set(ids_a[n].tolist()) for n in bank.layer_names}
    assert sum(len(v) for v in used_by_b.values()) > 0, "b must share some of a's kernels"
    before = bank.param_count()["kernels"]
    # a is replaced (joint mode): a's old kernels leave the search space ...
    a2, ids_a2 = _child(t0, bank, "a", 4, 0.05, lambda n, c: torch.full((c,), 5.0))
    bank.add("a", a2, 4, kernel_ids=ids_a2)
    save_store(tmp_path, bank, META)
    store = MultiTaskStore.load(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    # ... but those b still references stay loadable: b's model is exact
    assert torch.equal(store.model("b")(x), b(x))
    assert torch.equal(store.model("a")(x), a2(x))
    # and a's old kernels that nobody references are dropped
    old_only = sum(len(set(ids_a[n].tolist()) - used_by_b[n]) for n in bank.layer_names)
    assert old_only > 0
    for n in bank.layer_names:
        alive = set(bank.distinct_ids(n).tolist())
        assert used_by_b[n] <= alive
        assert not (set(ids_a[n].tolist()) - used_by_b[n]) & alive
    after = store.param_count()["kernels"]
    assert after == bank.param_count()["kernels"]
    assert after != before


def test_truncated_tensor_file_gives_clear_error(tmp_path):
    bank = _t0_bank()
    save_store(tmp_path, bank, META)
    kernels = next(tmp_path.glob("kernels-*.safetensors"))
    data = kernels.read_bytes()
    kernels.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=kernels.name):
        MultiTaskStore.load(tmp_path)


def test_a_file_given_for_the_store_names_the_folder(tmp_path):
    save_store(tmp_path / "store", _t0_bank(), META)
    manifest = tmp_path / "store" / "manifest.json"
    with pytest.raises(StoreError, match=rf"manifest\.json: a file, not a store directory; the "
                                         rf"store is its folder, {re.escape(str(manifest.parent))}$"):
        MultiTaskStore.load(manifest)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(StoreError, match=r"a file, not a store directory; give the store's "
                                         r"folder \(the one with manifest\.json\)$"):
        MultiTaskStore.load(tmp_path / "results.json")
    with pytest.raises(StoreError, match=r"nope: no such store directory$"):
        MultiTaskStore.load(tmp_path / "nope")


def test_corrupt_bytes_and_manifest_give_clear_errors(tmp_path):
    bank = _t0_bank()
    save_store(tmp_path, bank, META)
    tasks = next(tmp_path.glob("tasks-*.safetensors"))
    data = bytearray(tasks.read_bytes())
    data[-10] ^= 0xFF
    tasks.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        MultiTaskStore.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest"):
        MultiTaskStore.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(StoreError, match="not a CWPS store"):
        MultiTaskStore.load(tmp_path)


def test_a_manifest_cut_short_or_edited_is_named_not_a_traceback(tmp_path):
    save_store(tmp_path, _t0_bank(), META)
    good = json.loads((tmp_path / "manifest.json").read_text())
    edits = {
        "a list": ([], r"corrupt manifest \(a JSON list, not an object\)"),
        "no files": ({k: v for k, v in good.items() if k != "files"}, r"'files' missing"),
        "files cut": ({**good, "files": {"kernels": good["files"]["kernels"]}}, r"'files'"),
        "no layers": ({**good, "layers": None}, r"'layers' missing or of another type"),
    }
    for name, (manifest, message) in edits.items():
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(StoreError, match=rf"manifest\.json: {message}" if name == "a list"
                           else message):
            MultiTaskStore.load(tmp_path)


def test_resave_without_change_rewrites_only_manifest(tmp_path):
    bank = _t0_bank()
    save_store(tmp_path, bank, META)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    save_store(tmp_path, bank, {**META, "note": 1})
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == files
    assert json.loads((tmp_path / "manifest.json").read_text())["note"] == 1
    bank.add("x", _t0(), 10)
    save_store(tmp_path, bank, META)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) != files
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # stale versions removed
    store = MultiTaskStore.load(tmp_path)
    assert store.tasks == ["T0", "x"]
    rebuilt = store.to_bank()
    assert rebuilt.param_count() == bank.param_count()


def test_atomic_write_with_concurrent_writers(tmp_path):
    """Parallel runs writing one cache file: no error, the file is one writer's whole bytes,
    no aside file left behind, and the file has the usual permissions."""
    import os
    import threading

    from cwps_lightning.cwps.store import atomic_write

    target = tmp_path / "t0.pt"
    payloads = [bytes([i]) * (1 << 20) for i in range(8)]
    errors = []

    def write(data):
        try:
            for _ in range(5):
                atomic_write(target, data)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["t0.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_save_touches_only_the_stores_own_files(tmp_path):
    """Other files in the folder stay (a save tidied every *.safetensors away), and meta may
    not set the keys the store writes itself."""
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "backbone.safetensors"))
    (tmp_path / "notes.tmp").write_text("mine")
    # named as a store's file, of a version this store has not reached: no file of its own
    save_file({"w": torch.ones(1)}, str(tmp_path / "kernels-999999.safetensors"))
    bank = _t0_bank()
    save_store(tmp_path, bank, META)
    bank.add("x", _t0(), 10)
    save_store(tmp_path, bank, META)
    assert (tmp_path / "backbone.safetensors").is_file() and (tmp_path / "notes.tmp").is_file()
    assert (tmp_path / "kernels-999999.safetensors").is_file()
    # (its stale version went)
    assert sorted(p.name for p in tmp_path.glob("kernels-*.safetensors")) == [
        "kernels-000001.safetensors", "kernels-999999.safetensors"]
    before = (tmp_path / "manifest.json").read_text()
    with pytest.raises(ValueError, match=r"meta sets \['tasks'\], which the store writes"):
        save_store(tmp_path, bank, {**META, "tasks": ["T0"]})
    with pytest.raises(ValueError, match=r"the bank holds no task"):
        save_store(tmp_path / "empty", KernelBank(bank.layer_names), META)
    with pytest.raises(StoreError, match=r"a file, not a folder"):
        save_store(tmp_path / "notes.tmp", bank, META)
    assert (tmp_path / "manifest.json").read_text() == before


def test_two_banks_taken_from_one_store_save_their_own_tensors(tmp_path):
    """(each took the store's uid and revision: the second's save kept the first's tensors)"""
    import shutil

    save_store(tmp_path / "a", _t0_bank(), META)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first, second = (MultiTaskStore.load(tmp_path / "a").to_bank() for _ in range(2))
    first.add("one", _t0(), 10)
    second.add("two", _t0(), 10)
    save_store(tmp_path / "b", first, META)
    with pytest.warns(UserWarning, match=r"holds task\(s\) \['one'\], which this bank neither"):
        save_store(tmp_path / "b", second, META)
    store = MultiTaskStore.load(tmp_path / "b")
    assert store.tasks == ["T0", "two"]
    store.model("two", lambda n: timm.create_model("resnet18", num_classes=n))


def _small_bank(*tasks: str) -> tuple[KernelBank, dict]:
    """A bank of helpers.Small models (fresh kernels each), quick to store."""
    from ..helpers import Small

    torch.manual_seed(0)
    models = {t: Small().eval() for t in tasks}
    bank = KernelBank(KernelBank.shareable_of(models[tasks[0]]))
    for t, m in models.items():
        bank.add(t, m, 3)
    return bank, models


def _small_factory(num_classes):
    from ..helpers import Small

    return Small()


def test_a_task_added_to_a_loaded_bank_gets_ids_no_stored_kernel_has(tmp_path):
    bank, models = _small_bank("T0")
    save_store(tmp_path, bank, META)
    loaded = MultiTaskStore.load(tmp_path).to_bank()
    models["a"] = _small_bank("a")[1]["a"]
    with torch.no_grad():
        for p in models["a"].parameters():
            p.add_(1.0)
    loaded.add("a", models["a"], 3)
    for layer in loaded.layer_names:
        old = set(loaded.entries["T0"].layers[layer].ids.tolist())
        assert not old & set(loaded.entries["a"].layers[layer].ids.tolist()), layer
    save_store(tmp_path, loaded, META)
    store = MultiTaskStore.load(tmp_path)
    x = torch.randn(2, 3, 6, 6)
    for task in ("T0", "a"):
        assert torch.equal(store.model(task, _small_factory)(x), models[task](x)), task


def test_copies_of_a_bank_grown_apart_save_their_own_tensors_and_dropped_tasks_are_said(
        tmp_path, recwarn):
    """(a deepcopy kept the bank's uid: two copies that each added a task were both (uid,
    revision + 1), and the second's save kept the first's tensors under its own manifest,
    which named a task the tensors lacked)"""
    import pickle

    from ..helpers import Small

    bank, models = _small_bank("T0")
    fork, pickled = copy.deepcopy(bank), pickle.loads(pickle.dumps(bank))
    assert len({bank.uid, fork.uid, pickled.uid, copy.copy(bank).uid}) == 4
    torch.manual_seed(1)
    models["one"], models["two"] = Small().eval(), Small().eval()
    bank.add("one", models["one"], 3)
    fork.add("two", models["two"], 3)
    save_store(tmp_path, bank, META)
    assert not recwarn.list
    with pytest.warns(UserWarning, match=r"holds task\(s\) \['one'\], which this bank neither "
                                         r"holds nor removed .*the new version drops them"):
        save_store(tmp_path, fork, META)
    store = MultiTaskStore.load(tmp_path)
    assert store.tasks == ["T0", "two"]
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(store.model("two", _small_factory)(x), models["two"](x))


def test_a_save_after_a_remove_stores_what_the_bank_holds(tmp_path, recwarn):
    bank, _ = _small_bank("T0", "a")
    save_store(tmp_path, bank, META)
    bank.remove("a")
    save_store(tmp_path, bank, META)
    assert not recwarn.list  # (this bank's own removal: no word)
    store = MultiTaskStore.load(tmp_path)
    assert store.tasks == ["T0"]
    assert store.param_count() == bank.param_count()
    # nor that of a bank loaded from the store (a uid of its own) or a copy of one
    save_store(tmp_path, _small_bank("T0", "a")[0], META)
    loaded = MultiTaskStore.load(tmp_path).to_bank()
    loaded.remove("a")
    save_store(tmp_path, copy.deepcopy(loaded), META)
    assert not recwarn.list and MultiTaskStore.load(tmp_path).tasks == ["T0"]


def test_a_shallow_copy_of_a_bank_is_a_bank_of_its_own(tmp_path):
    """(copy.copy shared the entries dict: a task added to the original appeared in the copy
    under its unchanged (uid, revision), and its save named a task its tensors lacked)"""
    bank, _ = _small_bank("T0")
    shallow = copy.copy(bank)
    save_store(tmp_path, shallow, META)
    bank.add("a", _small_bank("a")[1]["a"], 3)
    assert shallow.tasks == ["T0"] and bank.tasks == ["T0", "a"]
    shallow.remove("T0")
    assert bank.tasks == ["T0", "a"] and "T0" not in bank.removed
    save_store(tmp_path, bank, META)
    assert MultiTaskStore.load(tmp_path).tasks == ["T0", "a"]
    store = MultiTaskStore.load(tmp_path)
    store.model("a", _small_factory)


def test_a_truncated_file_is_named_truncated_without_the_checksum(tmp_path):
    bank, _ = _small_bank("T0")
    save_store(tmp_path, bank, META)
    kernels = next(tmp_path.glob("kernels-*.safetensors"))
    kernels.write_bytes(kernels.read_bytes()[:-8])
    with pytest.raises(StoreError, match=rf"{kernels.name}: \d+ bytes, the manifest says \d+ "
                                         r"\(truncated\?\)"):
        MultiTaskStore.load(tmp_path, verify=False)


def test_a_task_whose_head_reset_classifier_made_is_rebuilt_as_the_job_made_it(tmp_path):
    # timm RepViT: the constructor gives T0 a distillation head, reset_classifier (how the
    # job makes a task's model) drops it; the store rebuilt every task with the constructor
    torch.manual_seed(0)
    meta = {"backbone": {"name": "repvit_m0_9", "kwargs": {}}}
    t0 = timm.create_model("repvit_m0_9", num_classes=10).eval()
    task = timm.create_model("repvit_m0_9", num_classes=10)
    task.load_state_dict(t0.state_dict())
    task.reset_classifier(5)
    task.eval()
    assert any("head_dist" in k for k in t0.state_dict())
    assert not any("head_dist" in k for k in task.state_dict())
    bank = KernelBank(KernelBank.shareable_of(t0))
    bank.add("T0", t0, 10)
    bank.add("a", task, 5)
    save_store(tmp_path, bank, meta)
    store = MultiTaskStore.load(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(store.model("a")(x), task(x))
        assert torch.equal(store.model("T0")(x), t0(x))


def test_a_model_that_does_not_fit_a_tasks_tensors_is_named_with_its_keys(tmp_path):
    bank, _ = _small_bank("T0")
    save_store(tmp_path, bank, META)
    store = MultiTaskStore.load(tmp_path)
    with pytest.raises(StoreError, match=r"task 'T0''s tensors do not fit the factory's model: "
                                         r"\d+ missing \(.*\); \d+ unexpected \(.*\); in Python"):
        store.model("T0", lambda n: torch.nn.Linear(3, n))
    with pytest.raises(StoreError, match=r"do not fit timm's 'resnet18' \(kwargs \{\}\): \d+ "
                                         r"missing .*in Python, MultiTaskStore.model\(task, "):
        store.model("T0")  # (META names resnet18; the tensors are helpers.Small's)

    from ..helpers import Small

    class OtherReset(Small):  # a reset_classifier of another signature: the keys are named
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

        def reset_classifier(self):
            pass

    with pytest.raises(StoreError, match=r": 2 missing \(extra\.bias, extra\.weight\); in"):
        store.model("T0", lambda n: OtherReset())

    def seven_classes(n):
        model = Small()
        model.head = torch.nn.Linear(10, 7)
        return model

    with pytest.raises(StoreError, match=r": 2 of another shape \(head\.bias \(3,\) vs \(7,\), "
                                         r"head\.weight \(3, 10\) vs \(7, 10\)\); in"):
        store.model("T0", seven_classes)


def test_a_first_save_stopped_before_its_manifest_is_found_and_written_over(tmp_path,
                                                                            monkeypatch):
    """A run killed (SIGTERM outside a fit, SIGKILL) while it wrote its store's first version
    left kernels-000000 and no manifest; the resume refused the folder as not a store."""
    from cwps_lightning.cwps import store as store_module

    bank, models = _small_bank("T0")
    real = store_module.atomic_write

    def killed(path, data):
        raise KeyboardInterrupt  # (stopped at the manifest: the tensors are written)

    monkeypatch.setattr(store_module, "atomic_write", killed)
    with pytest.raises(KeyboardInterrupt):
        save_store(tmp_path, bank, META)
    monkeypatch.setattr(store_module, "atomic_write", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels-000000.safetensors",
                                                          "tasks-000000.safetensors"]
    assert store_module.unfinished_first_save(tmp_path) == ["kernels-000000.safetensors",
                                                            "tasks-000000.safetensors"]
    save_store(tmp_path, bank, META)  # the next save writes version 0 and keeps its files
    assert store_module.unfinished_first_save(tmp_path) == []
    store = MultiTaskStore.load(tmp_path)
    assert store.manifest["version"] == 0 and store.tasks == ["T0"]
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(store.model("T0", _small_factory)(x), models["T0"](x))
    # anything else in a folder without a manifest is not taken for it
    for names in (["kernels-000000.safetensors", "notes.txt"], ["kernels-000001.safetensors"],
                  []):
        other = tmp_path / f"other{len(names)}{names[:1]}"
        other.mkdir()
        for name in names:
            (other / name).write_bytes(b"x")
        assert store_module.unfinished_first_save(other) == []


def test_a_save_gives_its_tensor_files_the_manifests_mode_and_tidies_safetensors_aside_files(
        tmp_path):
    """safetensors writes through a '.tmp' + 6 characters file of mode 0600: the tensor files
    were owner-only next to a manifest readable by the group (a shared store), and the aside
    file of a save killed mid-write (47 MB in a walk-through) stayed in the store for good."""
    import stat

    from cwps_lightning.cwps import store as store_module

    bank, _ = _small_bank("T0")
    (tmp_path / ".tmpi3hVtd").write_bytes(b"a killed save's tensors")
    assert store_module.unfinished_first_save(tmp_path) == [".tmpi3hVtd"]
    save_store(tmp_path, bank, META)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert set(modes) == {"manifest.json", "kernels-000000.safetensors",
                          "tasks-000000.safetensors"}
    assert set(modes.values()) == {0o666 & ~store_module._UMASK}  # (0644 under umask 022)


def test_save_store_refuses_meta_it_could_not_rebuild_from_and_task_names_with_a_slash(
        tmp_path):
    """A bare backbone name was accepted and failed at MultiTaskStore.model with
    AttributeError; a task named 'a/rest/x' was stored and task 'a' could not be rebuilt
    (its keys' prefix took the other task's tensors)."""
    bank, models = _small_bank("T0")
    for meta, error in (({"backbone": "resnet18"}, ValueError), (None, TypeError),
                        ({"backbone": {"name": "resnet18", "kwargs": "x"}}, ValueError)):
        with pytest.raises(error, match=r"save_store: meta"):
            save_store(tmp_path, bank, meta)
    assert not list(tmp_path.iterdir())  # (refused before anything was written)
    with pytest.raises(ValueError, match=r"bank.add\('a/rest/x'\): a task name may not "
                                         r"contain '/'"):
        bank.add("a/rest/x", models["T0"], 3)
    assert bank.tasks == ["T0"]
    save_store(tmp_path, bank, {"backbone": {"name": "resnet18"}})  # (kwargs optional)
    save_store(tmp_path, bank, {"backbone": {}})  # (no name: a factory builds the models)
    with pytest.raises(StoreError, match="no backbone name; pass a factory"):
        MultiTaskStore.load(tmp_path).model("T0")
