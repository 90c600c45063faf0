"""persist.py: the progress record a run keeps in its store, and T0 taken back on resume."""

from omegaconf import OmegaConf


def test_the_progress_record_keeps_test_and_val_top1_and_whether_the_run_is_complete(
        monkeypatch, tmp_path):
    """persist.RunRecorder.save: the manifest's metrics are each CWPS task's test top-1 (what
    evaluate re-tests against) and val top-1; 'complete' as given."""
    from cwps_lightning import persist
    from cwps_lightning.runner import MethodResult

    saved = []
    monkeypatch.setattr(persist, "save_store", lambda store_dir, bank, meta: saved.append(meta))
    recorder = persist.RunRecorder(tmp_path, OmegaConf.create({"cwps": {"threshold": 0.5}}),
                                   {"name": "resnet18"}, {})
    cwps = MethodResult("cwps", bank=None, tasks={"a": {"top1": 70.0, "val_top1": 80.0}},
                        done=[[0, "a"]])
    for complete in (False, True):
        recorder.save({"cwps": cwps}, complete=complete)
    assert [m["metrics"] for m in saved] == [{"a": {"top1": 70.0, "val_top1": 80.0}}] * 2
    assert [m["run"]["complete"] for m in saved] == [False, True]
    assert saved[0]["run"]["methods"] == {"cwps": cwps.record()}


def test_a_resumed_run_takes_t0_from_the_store_in_train_mode():
    from torch import nn

    from cwps_lightning.persist import RunRecorder

    class Store:
        def model(self, name):
            assert name == "T0"
            return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()

    assert all(m.training for m in RunRecorder.t0_from(Store()).modules())


def test_the_record_keeps_t0_and_the_ranks_over_attempts(monkeypatch, tmp_path):
    """A rerun of a finished DDP run fits nothing and makes no process group: it reported
    world size 1 and 0 fits checked, and T0 without its val top-1. The manifest keeps the
    first attempt's T0 and every attempt's ranks record."""
    from cwps_lightning import persist

    saved = []
    monkeypatch.setattr(persist, "save_store", lambda store_dir, bank, meta: saved.append(meta))
    cfg = OmegaConf.create({"cwps": {"threshold": 0.5}})
    first = persist.RunRecorder(tmp_path, cfg, {"name": "resnet18"}, {})
    first.t0_info = {"cached": None, "val_top1": 91.0}
    monkeypatch.setattr(persist.distributed, "ranks_report",
                        lambda: {"world_size": 2, "fits_checked_equal": 3})
    first.save({"cwps": _cwps()})
    manifest = saved[-1]
    assert manifest["run"]["t0"] == {"cached": None, "val_top1": 91.0}
    assert manifest["run"]["ranks"] == {"world_size": 2, "fits_checked_equal": 3}

    class Store:  # (what existing() reads back)
        def __init__(self):
            self.manifest = manifest

    monkeypatch.setattr(persist.MultiTaskStore, "load", staticmethod(lambda path: Store()))
    monkeypatch.setattr(persist, "check_same_config", lambda *a: None)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / persist.MANIFEST).write_text("{}")
    again = persist.RunRecorder(tmp_path, cfg, {"name": "resnet18"}, {})
    again.existing()
    assert again.t0_info == {"cached": None, "val_top1": 91.0}
    # a rerun that fits nothing (no group: world size 1): the earlier attempts' record
    monkeypatch.setattr(persist.distributed, "ranks_report",
                        lambda: {"world_size": 1, "fits_checked_equal": 0})
    assert again.ranks_over_attempts() == {"world_size": 2, "fits_checked_equal": 3}
    # a resumed attempt that fitted 2 more
    monkeypatch.setattr(persist.distributed, "ranks_report",
                        lambda: {"world_size": 2, "fits_checked_equal": 2})
    assert again.ranks_over_attempts() == {"world_size": 2, "fits_checked_equal": 5}


def test_a_resume_under_another_cpu_thread_count_says_so_and_keeps_the_first(
        monkeypatch, tmp_path, caplog):
    """On the CPU the thread count orders the float sums: a run stopped under one count and
    resumed under another mixed both without a word (results.json recorded the last). Said at
    the resumed attempt's first stored task, once: its fits ran under the count they use
    (Lightning's launcher sets it at the first fit); a rerun that trains nothing says nothing."""
    import logging

    import torch

    from cwps_lightning import persist

    saved = []
    monkeypatch.setattr(persist, "save_store", lambda store_dir, bank, meta: saved.append(meta))
    cfg = OmegaConf.create({"cwps": {"threshold": 0.5}})
    threads = [1]
    monkeypatch.setattr(persist.torch, "get_num_threads", lambda: threads[0])
    first = persist.RunRecorder(tmp_path, cfg, {"name": "resnet18"}, {})
    first.device = torch.device("cpu")
    first.save({"cwps": _cwps()})
    manifest = saved[-1]
    assert manifest["run"]["cpu_threads"] == 1

    class Store:
        def __init__(self, manifest):
            self.manifest = manifest

    monkeypatch.setattr(persist, "check_same_config", lambda *a: None)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / persist.MANIFEST).write_text("{}")

    def resumed(manifest, device="cpu"):
        monkeypatch.setattr(persist.MultiTaskStore, "load",
                            staticmethod(lambda path: Store(manifest)))
        recorder = persist.RunRecorder(tmp_path, cfg, {"name": "resnet18"}, {})
        recorder.existing()
        recorder.device = torch.device(device)
        return recorder

    threads[0] = 2
    with caplog.at_level(logging.WARNING, logger="cwps_lightning.persist"):
        resumed(manifest, "cuda").save({"cwps": _cwps()})  # (the count plays no part there)
        resumed(manifest).save({"cwps": _cwps()}, complete=True)  # (a rerun: nothing trained)
        assert caplog.records == []
        again = resumed(manifest)
        again.save({"cwps": _cwps()})
        again.save({"cwps": _cwps()})
    (record,) = caplog.records
    assert "the tasks stored before trained with 1 CPU thread(s), this attempt's with 2" in \
        record.getMessage() and "OMP_NUM_THREADS=1" in record.getMessage()
    assert saved[-1]["run"]["cpu_threads"] == 1  # (the count the stored tasks trained under)
    # a store written before the count was kept: unknown, and kept so (not this attempt's)
    older = {**manifest, "run": {k: v for k, v in manifest["run"].items() if k != "cpu_threads"}}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cwps_lightning.persist"):
        resumed(older).save({"cwps": _cwps()})
    assert caplog.records == [] and saved[-1]["run"]["cpu_threads"] is None


def _cwps():
    from cwps_lightning.runner import MethodResult

    return MethodResult("cwps", bank=None, tasks={"a": {"top1": 70.0, "val_top1": 80.0}},
                        done=[[0, "a"]])


def test_the_config_difference_names_each_setting_with_both_values():
    """A store of another benchmark was refused naming data._convert_, data._target_ and the
    first keys of data.download, cut at 8 without a word: now the class says it, with values."""
    from cwps_lightning.config import compose_config
    from cwps_lightning.persist import config_difference, result_config

    digits = result_config(compose_config([]))
    domainnet = result_config(compose_config(["+experiment=domainnet", "data.root=/d"]))
    said = config_difference(domainnet, digits)
    assert "data._target_: 'cwps_lightning.data.domainnet.DomainNetDataModule' there, " \
           "'cwps_lightning.data.digits.DigitsDataModule' now" in said, said
    assert "_convert_" not in said and "data.download" not in said and "data.root" not in said
    assert said.startswith(f"{said.split()[0]} setting(s) differ: ")
    many = config_difference({"a": 1, "b": [1] * 40, "c": 3, "d": 4, "e": 5, "f": 6},
                             {"a": 2, "b": [2] * 40, "g": None}, limit=3)
    cut = [repr([v] * 40)[:57] + "..." for v in (1, 2)]  # (a long value: its first 57)
    assert many == (f"7 setting(s) differ: a: 1 there, 2 now; b: {cut[0]} there, {cut[1]} now; "
                    f"c: 3 there, unset now; and 4 more")
    # what the hash tells apart, the line does too (1 against 1.0 read "0 setting(s) differ")
    assert config_difference({"optim": {"lr": 1}}, {"optim": {"lr": 1.0}}) == \
        "1 setting(s) differ: optim.lr: 1 there, 1.0 now"
    assert config_difference({"a": {}}, {}) == "the config's hashes differ"
    # null and booleans as an override types them (a stored task order read "None there")
    assert config_difference({"data": {"tasks": None}, "x": True}, {
        "data": {"tasks": ["b", "a"]}, "x": False}) == (
        "2 setting(s) differ: data.tasks: null there, ['b', 'a'] now; x: true there, false now")


def test_a_store_folder_a_stopped_first_save_left_is_started_afresh(tmp_path, caplog):
    """SIGTERM outside a fit (Python's default handler: no cleanup) while the first task's
    store was written left kernels-000000 without a manifest; the same command then refused
    the run ("files but no manifest.json; not a store this code wrote")."""
    import pytest

    from cwps_lightning import persist

    store = tmp_path / "store"
    store.mkdir()
    (store / "kernels-000000.safetensors").write_bytes(b"part of a file")
    (store / ".manifest.json.k2j3.tmp").write_bytes(b"{")
    recorder = persist.RunRecorder(tmp_path, OmegaConf.create({"cwps": {}}), {}, {})
    with caplog.at_level("WARNING", logger="cwps_lightning.persist"):
        assert recorder.existing() is None
    assert "stopped while writing the store's first version (.manifest.json.k2j3.tmp, " \
           "kernels-000000.safetensors, no manifest.json): starting afresh" in caplog.text
    (store / "notes.txt").write_text("mine")  # a folder holding anything else stays refused
    with pytest.raises(persist.StoreError, match="files but no manifest.json; not a store"):
        recorder.existing()


def test_only_rank_zero_says_it_starts_afresh(tmp_path, caplog, monkeypatch):
    from cwps_lightning import persist

    store = tmp_path / "store"
    store.mkdir()
    (store / "kernels-000000.safetensors").write_bytes(b"part")
    monkeypatch.setattr(persist.distributed, "rank", lambda: 1)
    recorder = persist.RunRecorder(tmp_path, OmegaConf.create({"cwps": {}}), {}, {})
    with caplog.at_level("WARNING", logger="cwps_lightning.persist"):
        assert recorder.existing() is None  # (the same decision on every rank)
    assert "starting afresh" not in caplog.text


def test_a_resume_refuses_a_store_without_a_task_its_record_has_done(tmp_path):
    """A manifest that lost a task (edited, damaged) but kept the progress record: the resume
    stored the run again without it (the ratio fell from 1.32x to 1.21x, a helper's run) and
    evaluate then tested the others, all without a word."""
    import pytest

    from cwps_lightning import persist
    from cwps_lightning.cwps import StoreError

    class Store:
        tasks = ["T0", "b"]
        manifest = {"run": {"methods": {"cwps": _cwps().record()}}}

        def to_bank(self):
            raise AssertionError("the bank was taken")

    class Runner:
        def new_result(self, method, **record):
            from cwps_lightning.runner import MethodResult

            return MethodResult(method.name, None, shares_tasks=method.shares_tasks, **record)

    class Cwps:
        name, shares_tasks = "cwps", True

    recorder = persist.RunRecorder(tmp_path, OmegaConf.create({}), {"name": "resnet18"}, {})
    with pytest.raises(StoreError, match=r"cwps's record has task\(s\) \['a'\] done that the "
                                         r"store does not hold \(it holds \['T0', 'b'\]\)"):
        recorder.restore(Store(), Runner(), [Cwps()])
    Store.tasks = ["T0", "a"]
    Store.to_bank = lambda self: "bank"
    assert recorder.restore(Store(), Runner(), [Cwps()])["cwps"].bank == "bank"


def test_a_store_path_that_is_a_file_or_a_record_of_another_type_is_one_line(tmp_path):
    """(NotADirectoryError and AttributeError tracebacks on resume)"""
    import pytest

    from cwps_lightning import persist
    from cwps_lightning.cwps import StoreError

    (tmp_path / "store").write_text("not a folder")
    recorder = persist.RunRecorder(tmp_path, OmegaConf.create({}), {"name": "resnet18"}, {})
    with pytest.raises(StoreError, match=r"store: a file where the run keeps its store"):
        recorder.existing()

    class Store:
        tasks = ["T0"]
        manifest = {"run": {"methods": [1, 2]}}

    with pytest.raises(StoreError, match=r"corrupt manifest \('run\.methods' of another type"):
        recorder.restore(Store(), None, [])
