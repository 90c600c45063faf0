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
