"""T0 pretrained on the benchmark's own pretraining task (pretrain.py): the cache, the seed and
what the run's config passes in. A tiny timm model on 6x6 images, one epoch."""

from __future__ import annotations

import pytest
import torch

from cwps_lightning import pretrain
from cwps_lightning.config import compose_config
from cwps_lightning.data.base import MultiTaskDataModule, TaskSplits
from cwps_lightning.fitting import FitSettings
from cwps_lightning.models import ModelConfigError
from cwps_lightning.pretrain import pretrain_t0

from .helpers import indexed_images

TRAINER = dict(accelerator="cpu", devices=1, enable_checkpointing=False,
               enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0)
MODEL = "test_resnet"  # (timm's tiny ResNet)


class Pretrainable(MultiTaskDataModule):
    """One task "t" and the pretraining task "p" (3 classes each, 6x6 images)."""

    default_tasks = ("t",)
    pretrain_task = "p"

    def build_tasks(self):
        return {name: TaskSplits(name, 3, indexed_images(24, seed), indexed_images(8, seed + 1),
                                 indexed_images(8, seed + 2))
                for name, seed in (("t", 0), ("p", 5))}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t0(cache_dir=None, seed=0, kwargs=None, settings=None):
    return pretrain_t0(Pretrainable(batch_size=8), MODEL, kwargs or {}, 1, 0.1,
                       settings or FitSettings(trainer=TRAINER), cache_dir, seed=seed)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_cached_t0_is_loaded_not_pretrained_again(tmp_path, monkeypatch):
    kwargs = {"stem_width": 8}  # (model.kwargs that change the weights' shapes)
    model, info = t0(tmp_path, kwargs=kwargs)
    assert info["cached"] is None
    cached, = (tmp_path / "t0").glob("*.pt")
    monkeypatch.setattr(pretrain, "fit", lambda *a, **k: pytest.fail("pretrained again"))
    again, again_info = t0(tmp_path, kwargs=kwargs)
    assert again_info == {"cached": str(cached), "val_top1": info["val_top1"]}
    assert same_weights(model, again)


def test_a_cache_another_rank_lacks_is_not_used(tmp_path, monkeypatch, caplog):
    """Ranks that took T0 from two sources (one its node's cache, one pretraining) paired
    their fits' collectives and stopped on RanksDisagree: every rank pretrains unless every
    rank has the cache (distributed.every_rank)."""
    model, _ = t0(tmp_path)
    said = []
    monkeypatch.setattr(pretrain.distributed, "every_rank",
                        lambda flag, what: said.append((flag, what)) or False)
    with caplog.at_level("WARNING"):
        again, info = t0(tmp_path)
    assert said == [(True, "t0-cached")]  # this rank has it
    assert info["cached"] is None and "another rank has no cache" in caplog.text
    assert same_weights(model, again)  # (pretrained again: the same seed, the same weights)


def test_an_unreadable_cache_entry_is_pretrained_again(tmp_path, caplog):
    model, info = t0(tmp_path)
    cached, = (tmp_path / "t0").glob("*.pt")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "val_top1": 1.0}, cached)
    with caplog.at_level("WARNING"):
        again, again_info = t0(tmp_path)
    assert "unreadable" in caplog.text and again_info["cached"] is None
    assert same_weights(model, again)
    torch.save({"val_top1": 1.0}, cached)  # (no state dict)
    assert t0(tmp_path)[1]["cached"] is None


def test_a_cache_entry_whose_val_top1_is_no_number_is_pretrained_again(tmp_path, caplog):
    """(a string went into results.json and the log lines as T0's accuracy)"""
    model, _ = t0(tmp_path)
    cached, = (tmp_path / "t0").glob("*.pt")
    for bad in ("93.1", None, True, float("nan")):
        torch.save({"state_dict": model.state_dict(), "val_top1": bad}, cached)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert t0(tmp_path)[1]["cached"] is None, bad
        assert "not a finite number" in caplog.text


def test_a_cache_that_cannot_be_written_leaves_the_run_its_t0(tmp_path, caplog):
    """(a read-only cache, or a full disk: the run failed after pretraining T0)"""
    cache = tmp_path / "cache"
    (cache / "t0").mkdir(parents=True)
    model, _ = t0(tmp_path / "fresh")
    key_file, = (tmp_path / "fresh" / "t0").glob("*.pt")
    (cache / "t0" / key_file.name).mkdir()  # (where the file goes: a folder, so unwritable)
    with caplog.at_level("WARNING"):
        again, info = t0(cache)
    assert info["cached"] is None and same_weights(model, again)
    assert "cannot write the cache" in caplog.text and "the run goes on" in caplog.text


def test_the_seed_alone_decides_t0(tmp_path):
    """Whatever drew from torch's generator before, one seed gives one T0 (the cache key holds
    the seed, not the generator's state); another seed gives another."""
    torch.manual_seed(123)
    a, _ = t0(seed=4)
    torch.rand(100)
    b, _ = t0(seed=4)
    c, _ = t0(seed=5)
    assert same_weights(a, b) and not same_weights(a, c)


def test_only_rank_zero_writes_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain.distributed, "rank", lambda: 1)
    t0(tmp_path / "rank1")
    assert not (tmp_path / "rank1").exists()
    monkeypatch.setattr(pretrain.distributed, "rank", lambda: 0)
    t0(tmp_path / "rank0")
    assert len(list((tmp_path / "rank0" / "t0").glob("*.pt"))) == 1


def test_t0s_epoch_checkpoints_go_once_it_is_trained(tmp_path):
    """(T0 is in the cache then: a rerun does not continue its fit)"""
    settings = FitSettings(trainer={**TRAINER, "enable_checkpointing": True},
                           checkpoint_dir=tmp_path / "checkpoints")
    t0(settings=settings)
    assert not list((tmp_path / "checkpoints").rglob("*.ckpt"))


def test_no_pretraining_task_or_no_epochs_is_refused():
    class NoPretraining(Pretrainable):
        pretrain_task = None

    with pytest.raises(ModelConfigError, match="NoPretraining has no pretraining task"):
        pretrain_t0(NoPretraining(), MODEL, {}, 1, 0.1, FitSettings(trainer=TRAINER), None)
    with pytest.raises(ValueError, match="t0.epochs must be >= 1, got 0"):
        pretrain_t0(Pretrainable(), MODEL, {}, 0, 0.1, FitSettings(trainer=TRAINER), None)


def test_a_run_pretrains_t0_with_the_t0_settings_and_its_seed(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(pretrain, "pretrain_t0", lambda *args: asked.append(args) or (None, {}))
    base = [f"model.name={MODEL}", "+model.kwargs.stem_width=8", "t0.epochs=2", "t0.lr=0.25",
            "optim.lr=0.5", "seed=9", f"paths.cache_dir={tmp_path}"]
    dm, settings = Pretrainable(), FitSettings(trainer=TRAINER)
    pretrain.acquire_t0(compose_config(base), dm, settings, "cpu")
    pretrain.acquire_t0(compose_config([*base, "t0.cache=false"]), dm, settings, "cpu")
    assert asked == [(dm, MODEL, {"stem_width": 8}, 2, 0.25, settings, str(tmp_path), 9, "cpu"),
                     (dm, MODEL, {"stem_width": 8}, 2, 0.25, settings, None, 9, "cpu")]


def test_the_cache_key_holds_every_setting_that_decides_t0():
    """Another model, model kwargs, benchmark settings, number of epochs, lr, seed or batch
    size is another T0; the order the kwargs come in is not."""
    from cwps_lightning.data.digits import DigitsDataModule
    from cwps_lightning.pretrain import cache_key, t0_spec

    def key(model="resnet18", kwargs=None, epochs=3, lr=0.05, seed=0, **data):
        return cache_key(t0_spec(DigitsDataModule(**data), model, kwargs or {}, epochs, lr, seed))

    base = key(kwargs={"drop_rate": 0.1, "stem_width": 8})
    assert key(kwargs={"stem_width": 8, "drop_rate": 0.1}) == base
    others = [key(model="resnet34", kwargs={"drop_rate": 0.1, "stem_width": 8}),
              key(kwargs={"drop_rate": 0.2, "stem_width": 8}),
              key(kwargs={"drop_rate": 0.1, "stem_width": 8}, image_size=16),
              key(kwargs={"drop_rate": 0.1, "stem_width": 8}, epochs=4),
              key(kwargs={"drop_rate": 0.1, "stem_width": 8}, lr=0.1),
              key(kwargs={"drop_rate": 0.1, "stem_width": 8}, seed=1),
              key(kwargs={"drop_rate": 0.1, "stem_width": 8}, batch_size=32)]
    assert base not in others and len(set(others)) == len(others)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint"], ids=["empty", "foreign"])
def test_an_empty_or_foreign_cache_file_is_pretrained_again(tmp_path, content):
    def t0():
        return pretrain_t0(Pretrainable(batch_size=8), MODEL, {}, 1, 0.1,
                           FitSettings(trainer=TRAINER), tmp_path, seed=0)

    first, _ = t0()
    cached, = (tmp_path / "t0").glob("*.pt")
    cached.write_bytes(content)
    again, info = t0()
    assert info["cached"] is None  # trained again, not a traceback
    for key, value in first.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key  # the same seed, the same T0
    assert torch.load(cached, weights_only=True)["val_top1"] == info["val_top1"]  # rewritten


def test_the_pretraining_line_says_a_limit_caps_t0s_task_too(caplog, monkeypatch):
    """(data.limit_per_task, a quick run's setting, also caps T0's pretraining task: a T0 of a
    few hundred images is weak, and nothing said where it came from)"""
    with caplog.at_level("INFO", logger="cwps_lightning.pretrain"):
        t0()
    assert f"T0: pretraining {MODEL} on 'p' for 1 epoch(s)\n" in caplog.text + "\n"
    caplog.clear()
    monkeypatch.setattr(Pretrainable, "limit_per_task", 300, raising=False)
    with caplog.at_level("INFO", logger="cwps_lightning.pretrain"):
        t0()
    assert (f"T0: pretraining {MODEL} on 'p' for 1 epoch(s), on the first 300 of its images "
            "(data.limit_per_task)") in caplog.text
