"""A store survives what kills long runs: SIGKILL in the middle of a write (many trials at
random moments), a full disk, and a diverged model that must not enter the bank."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import random
import signal
import time

import pytest
import torch
from torch import nn

from cwps_lightning.cwps import KernelBank, MultiTaskStore, StoreError, save_store
from cwps_lightning.cwps import store as store_module

META = {"backbone": {"name": "tiny", "kwargs": {}}}


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Conv2d(64, 64, 3),
                         nn.Flatten(), nn.Linear(64, 10))


def _bank(tasks: int) -> KernelBank:
    bank = KernelBank(KernelBank.shareable_of(_net(0)))
    for i in range(tasks):
        bank.add(f"t{i}", _net(i), 10)
    return bank


def _write_forever(path: str) -> None:
    """Save stores with ever more tasks until killed (a run that persists after every task)."""
    torch.set_num_threads(1)
    i = 1
    while True:
        save_store(path, _bank(1 + i % 4), {**META, "i": i})
        i += 1


def _version(path) -> int:
    try:
        return MultiTaskStore.load(path, verify=False).manifest["version"]
    except StoreError:
        return -1


def test_sigkill_at_random_moments_of_store_writes_leaves_a_store_that_loads(tmp_path):
    rng = random.Random(0)
    ctx = mp.get_context("fork")  # a fresh interpreter per trial would cost seconds
    path = tmp_path / "store"
    seen_versions = set()
    for trial in range(20):
        proc = ctx.Process(target=_write_forever, args=(str(path),))
        proc.start()
        start, deadline = _version(path), time.time() + 60
        while _version(path) <= start:  # the writer is up and writing: kill it at random
            assert time.time() < deadline and proc.is_alive(), "the writer never wrote"
            time.sleep(0.02)
        time.sleep(rng.random() * 0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        store = MultiTaskStore.load(path, verify=True)
        version = store.manifest["version"]
        seen_versions.add(version)
        n = 1 + store.manifest["i"] % 4
        assert store.tasks == [f"t{k}" for k in range(n)], trial
        for task in store.tasks:  # every task's weights are whole and as saved
            expected = _net(int(task[1:])).state_dict()
            got = store.state_dict(task)
            assert all(torch.equal(got[k], expected[k]) for k in expected), (trial, task)
    assert len(seen_versions) >= 10, seen_versions  # the kills fell at many different points


def _full_disk_on(monkeypatch, target: str):
    """Make every write of ``target`` (tensors or manifest) fail as a full disk does."""
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module, target, fail)


@pytest.mark.parametrize("target", ["_write_tensors", "atomic_write"])
def test_a_full_disk_gives_one_clear_error_and_keeps_the_previous_store(
        tmp_path, monkeypatch, target):
    save_store(tmp_path, _bank(2), META)
    before = sorted(p.name for p in tmp_path.iterdir())
    _full_disk_on(monkeypatch, target)
    with pytest.raises(StoreError, match=r"cannot write store version 1 \(No space left on "
                                         r"device\); the store there is still version 0 with "
                                         r"tasks \['t0', 't1'\], intact"):
        save_store(tmp_path, _bank(3), META)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial version left
    assert MultiTaskStore.load(tmp_path, verify=True).tasks == ["t0", "t1"]


def test_safetensors_own_io_error_is_an_io_error_too(tmp_path, monkeypatch):
    """safetensors wraps an OS error in its own type: the writer's real one (here: a folder
    that is not there) must take the clear line too, not a traceback."""
    from safetensors.torch import save_file

    save_store(tmp_path, _bank(2), META)

    def unwritable(path, name, tensors):
        save_file(tensors, str(path / "no-such-folder" / name))

    monkeypatch.setattr(store_module, "_write_tensors", unwritable)
    with pytest.raises(StoreError, match=r"cannot write store version 1 \(.*I/O error.*\); the "
                                         r"store there is still version 0"):
        save_store(tmp_path, _bank(3), META)
    assert MultiTaskStore.load(tmp_path, verify=True).tasks == ["t0", "t1"]


def test_a_full_disk_on_the_first_write_says_nothing_was_stored(tmp_path, monkeypatch):
    _full_disk_on(monkeypatch, "_write_tensors")
    with pytest.raises(StoreError, match="still without a manifest"):
        save_store(tmp_path, _bank(1), META)
    assert list(tmp_path.iterdir()) == []


def test_the_bank_refuses_a_model_with_nan_weights():
    bank = _bank(1)
    bad = _net(1)
    with torch.no_grad():
        bad[2].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"bank.add\('t1'\): 2.weight has nan/inf"):
        bank.add("t1", bad, 10)
    assert bank.tasks == ["t0"]


def test_a_file_the_manifest_names_missing_is_a_store_error(tmp_path):
    save_store(tmp_path, _bank(2), META)
    next(tmp_path.glob("kernels-*.safetensors")).unlink()
    with pytest.raises(StoreError, match=r"kernels-000000\.safetensors: missing \(named by"):
        MultiTaskStore.load(tmp_path)


def test_a_store_replaced_while_it_is_read_loads_the_new_version(tmp_path, monkeypatch):
    """A reader (evaluate on a running job's store) between the manifest and the tensor files
    while the writer saves its next version, which removes the old files: the reader takes
    the new version."""
    save_store(tmp_path, _bank(2), META)
    read_manifest = store_module._read_manifest
    replaced = []

    def read_then_replace(path):
        manifest = read_manifest(path)
        if not replaced:
            replaced.append(manifest["version"])
            save_store(tmp_path, _bank(3), META)
        return manifest

    monkeypatch.setattr(store_module, "_read_manifest", read_then_replace)
    store = MultiTaskStore.load(tmp_path)
    assert replaced == [0] and store.manifest["version"] == 1
    assert store.tasks == ["t0", "t1", "t2"]


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda m: m["task_order"].remove("t1"), r"\(task_order \['t0'\] and the tasks it describes "
                                            r"\['t0', 't1'\] differ"),
    (lambda m: m["tasks"].pop("t1"), r"\(task_order \['t0', 't1'\] and the tasks it describes "
                                     r"\['t0'\] differ"),
    (lambda m: m["task_order"].append("t0"), r"\(task_order \['t0', 't1', 't0'\]"),
    (lambda m: m.pop("kernel_counts"), r"\('kernel_counts' missing or of another type\)"),
    (lambda m: m["tasks"]["t1"].update(num_classes="10"),
     r"\('tasks\.t1' missing or of another type\)"),
    (lambda m: m["tasks"]["t1"].pop("rest_params"), r"\('tasks\.t1' missing"),
    (lambda m: m["tasks"].update(t1=3), r"\('tasks\.t1' missing"),
])
def test_a_manifest_whose_tasks_disagree_or_lack_a_field_is_named(tmp_path, edit, expected):
    """(a task dropped from task_order was dropped without a word: a resume stored the run
    again without it; a missing field failed later with a KeyError)"""
    save_store(tmp_path, _bank(2), META)
    file = tmp_path / "manifest.json"
    manifest = json.loads(file.read_text())
    edit(manifest)
    file.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"manifest\.json: corrupt manifest " + expected):
        MultiTaskStore.load(tmp_path)
