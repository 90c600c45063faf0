"""What can be checked before work starts is checked before work starts (checks.py and the
train command's preflight): each case ends with one ConfigError line, before data, T0 or any
fit; the CLI turns it into ``error: ...`` and exit 2 with nothing written."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cwps_lightning import checks
from cwps_lightning.config import compose_config
from cwps_lightning.errors import ConfigError
from cwps_lightning.settings import LoggerSettings
from cwps_lightning.train import preflight, sweep_jobs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_fits(monkeypatch):
    """Fail the test if anything starts training or builds data."""
    import cwps_lightning.fitting as fitting
    import cwps_lightning.train as train

    def boom(*args, **kwargs):
        raise AssertionError("work started before the config was checked")

    monkeypatch.setattr(fitting, "fit", boom)
    monkeypatch.setattr(train, "build_data", boom)


def test_gpu_trainer_without_gpu(monkeypatch, no_fits):
    monkeypatch.setattr(checks.torch.cuda, "is_available", lambda: False)
    for trainer in ("trainer=gpu", "trainer=ddp"):
        with pytest.raises(ConfigError, match=r"^trainer\.accelerator=gpu: no CUDA GPU"):
            preflight([trainer])
    preflight(["trainer=cpu"])  # and a CPU run passes


def test_more_gpus_than_visible(monkeypatch):
    monkeypatch.setattr(checks.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(checks.torch.cuda, "device_count", lambda: 2)
    checks.check_trainer({"accelerator": "gpu", "devices": 2})
    with pytest.raises(ConfigError, match=r"trainer\.devices=4: only 2 GPU"):
        checks.check_trainer({"accelerator": "gpu", "devices": 4})


def test_an_added_top_level_key_is_refused(no_fits):
    """Hydra adds ``+cwp.threshold=0.3`` at the top level, where nothing reads it: the run
    would go on at the default lambda."""
    with pytest.raises(ConfigError, match=r"^cwp: no such key; did you mean cwps\? accepted: "
                                          r"data, model, cwps, .*, seed$"):
        preflight(["+cwp.threshold=0.3"])
    with pytest.raises(ConfigError, match=r"^lambda: no such key; did you mean cwps\.threshold "
                                          r"\(the paper's lambda\)\? accepted: data, "):
        preflight(["+lambda=0.3"])
    with pytest.raises(ConfigError, match=r"^zzqq: no such key; accepted: data, "):
        preflight(["+zzqq=1"])
    # added under a typed node: the nearest name, or ours for the paper's
    with pytest.raises(ConfigError, match=r"^cwps\.lambda: no such key; did you mean "
                                          r"cwps\.threshold \(the paper's lambda\)\? accepted "
                                          r"under cwps: mode, "):
        preflight(["+cwps.lambda=0.3"])
    with pytest.raises(ConfigError, match=r"^optim\.lrr: no such key; did you mean optim\.lr\? "
                                          r"accepted under optim: lr, "):
        preflight(["+optim.lrr=0.1"])


def test_unknown_trainer_argument(no_fits):
    with pytest.raises(ConfigError, match=r"^trainer\.max_epoch: not an argument"):
        preflight(["+trainer.max_epoch=3"])
    with pytest.raises(ConfigError, match=r"^trainer\.max_epochs: set per fit"):
        preflight(["+trainer.max_epochs=3"])
    # a cap would cut a fit short of its planned epochs (the mask fit before its hard stage)
    for key in ("max_steps", "max_time"):
        with pytest.raises(ConfigError, match=rf"^trainer\.{key}: left to the epochs cwps\.stages "
                                              r".*\+trainer\.limit_train_batches; remove it$"):
            preflight([f"+trainer.{key}=5"])
    # a near miss names the nearest argument, and says so where the job sets it
    with pytest.raises(ConfigError, match=r"^trainer\.limit_train_batche: not an argument of "
                                          r"lightning\.Trainer; did you mean "
                                          r"trainer\.limit_train_batches\?$"):
        preflight(["+trainer.limit_train_batche=3"])
    with pytest.raises(ConfigError, match=r"^trainer\.max_step: .*; the nearest, "
                                          r"trainer\.max_steps, is left to the epochs"):
        preflight(["+trainer.max_step=3"])
    with pytest.raises(ConfigError, match=r"^trainer\.zzqq: not an argument of "
                                          r"lightning\.Trainer \(see its documentation"):
        preflight(["+trainer.zzqq=3"])


@pytest.mark.parametrize(("override", "expected"), [
    ("trainer.precision=16-mix", r"^trainer\.precision='16-mix': accepted: 32-true, 32, "
                                 r"16-mixed, 16, bf16-mixed, bf16$"),
    # Lightning's, which convert the weights: T0's float32 evaluation then failed after T0
    ("trainer.precision=64-true", r"^trainer\.precision='64-true': the job trains in float32 "
                                  r"weights; accepted: 32-true, 32, 16-mixed, 16, bf16-mixed, "
                                  r"bf16 \(mixed precision: autocast over float32 weights\)$"),
    ("trainer.precision=bf16-true", r"^trainer\.precision='bf16-true': the job trains in "),
    ("trainer.precision=64", r"^trainer\.precision=64: the job trains in float32 weights"),
    ("trainer.accelerator=cpux", r"^trainer\.accelerator='cpux': accepted: auto, cpu, cuda, gpu"),
    ("trainer.strategy=ddpx", r"^trainer\.strategy='ddpx': accepted: auto, ddp, "),
    ("trainer.devices=0", r"^trainer\.devices=0: accepted: a number of devices >= 1, -1"),
    ("trainer.devices=two", r"^trainer\.devices='two': accepted"),
    ("trainer.devices=[]", r"^trainer\.devices=\[\]: accepted"),
    ("trainer.num_nodes=0", r"^trainer\.num_nodes=0: accepted: an integer >= 1"),
    # Lightning's annotations, checked before T0: these failed after it with a traceback, or
    # ran (a "maybe" turned checkpoints on, a negative clip value clipped nothing)
    ("trainer.accumulate_grad_batches=0",
     r"^trainer\.accumulate_grad_batches=0: accepted: an integer >= 1$"),
    ("trainer.check_val_every_n_epoch=abc",
     r"^trainer\.check_val_every_n_epoch='abc': accepted: an integer >= 1 or null$"),
    ("trainer.gradient_clip_val=-1", r"^trainer\.gradient_clip_val=-1: accepted: a number >= 0 "
                                      r"or null$"),
    ("trainer.log_every_n_steps=abc", r"^trainer\.log_every_n_steps='abc': accepted: an "
                                       r"integer >= 0 or null$"),
    ("trainer.enable_checkpointing=maybe", r"^trainer\.enable_checkpointing='maybe': accepted: "
                                            r"true, false, or null$"),
    ("trainer.deterministic=1", r"^trainer\.deterministic=1: accepted: true, false, 'warn', or "
                                r"null$"),
    ("trainer.gradient_clip_val=nan", r"^trainer\.gradient_clip_val=nan: accepted: a number >= 0 "
                                      r"or null$"),
    ("trainer.accumulate_grad_batches=true", r"^trainer\.accumulate_grad_batches=true: "
                                             r"accepted: an integer >= 1$"),
    ("trainer.num_sanity_val_steps=-2", r"^trainer\.num_sanity_val_steps=-2: accepted: an "
                                         r"integer >= -1 or null$"),
])
def test_trainer_values_lightning_would_refuse_at_its_first_trainer(no_fits, override, expected):
    with pytest.raises(ConfigError, match=expected):
        preflight(["trainer=cpu", override])


@pytest.mark.parametrize("override", ["trainer.precision=bf16-mixed", "trainer.precision=32",
                                      "trainer.precision=null", "trainer.precision=16-mixed",
                                      "trainer.precision=bf16", "trainer.strategy=DDP",
                                      "trainer.devices=-1", "trainer.strategy=ddp_spawn",
                                      "trainer.gradient_clip_val=0.5",
                                      "trainer.accumulate_grad_batches=2",
                                      "trainer.num_sanity_val_steps=-1",
                                      "trainer.check_val_every_n_epoch=null",
                                      "trainer.deterministic=warn",
                                      "+trainer.limit_train_batches=0.5"])
def test_trainer_values_lightning_takes_pass(override):
    checks.check_trainer_values(dict(compose_config(["trainer=cpu", override]).trainer))


def test_one_unresolvable_trainer_annotation_leaves_the_others_checked(monkeypatch):
    """get_type_hints resolves every annotation of Trainer.__init__ or fails: one string that
    does not resolve (another Lightning version) skipped every key's check."""
    import typing

    from lightning import Trainer

    def fails(obj, *args, **kwargs):
        raise NameError("name 'SomeNewType' is not defined")

    monkeypatch.setattr(typing, "get_type_hints", fails)
    monkeypatch.setitem(Trainer.__init__.__annotations__, "max_time", "SomeNewType | None")
    trainer = dict(compose_config(["trainer=cpu"]).trainer)
    with pytest.raises(ConfigError, match=r"^trainer\.accumulate_grad_batches=0: accepted: an "
                                          r"integer >= 1$"):
        checks.check_trainer_types({**trainer, "accumulate_grad_batches": 0})
    checks.check_trainer_types({**trainer, "max_time": "anything"})  # (its own: unchecked)


@pytest.mark.parametrize(("override", "expected"), [
    # Lightning's own refusals, at its Trainer: they came after T0 with a traceback
    ("trainer.accelerator=tpu", r"lightning\.Trainer refuses them: Requirement 'torch_xla"),
    ("trainer.accelerator=null", r"refuses them: You selected an invalid accelerator name"),
    ("trainer.strategy=fsdp", r"refuses them: The strategy `fsdp` requires a GPU accelerator"),
    ("+trainer.limit_train_batches=1.5", r"refuses them: You have passed invalid value 1\.5 "),
    ("+trainer.gradient_clip_algorithm=nope", r"refuses them: `gradient_clip_algorithm` nope "),
    ("+trainer.profiler=nope", r"refuses them: When passing string value for the `profiler`"),
    # taken by Lightning, and then no training (reported as trained), a crash or a hang
    ("+trainer.limit_train_batches=0", r"^trainer\.limit_train_batches=0: no training batches"),
    ("+trainer.fast_dev_run=true", r"^trainer\.fast_dev_run=true: one batch per fit"),
    ("+trainer.val_check_interval=0", r"^trainer\.val_check_interval=0: accepted: a number > 0"),
    ("trainer.num_nodes=2", r"^trainer\.num_nodes=2: nothing starts the other nodes here"),
])
def test_trainer_settings_lightning_refuses_or_that_train_nothing_stop_before_the_job(
        no_fits, monkeypatch, override, expected):
    for var in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "NODE_RANK",
                "LSB_JOBID", "OMPI_COMM_WORLD_SIZE", "KUBERNETES_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=expected):
        preflight(["trainer=cpu", override])


def test_the_trainer_probe_says_nothing_and_leaves_lightnings_loggers_as_they_were(capsys):
    import logging

    before = logging.getLogger("lightning.pytorch").level
    checks.probe_trainer(dict(compose_config(["trainer=cpu"]).trainer))
    said = capsys.readouterr()
    assert "GPU available" not in said.out + said.err
    assert logging.getLogger("lightning.pytorch").level == before


@pytest.mark.parametrize(("override", "expected"), [
    # (an unset variable in a script: the working directory, the checkout, took the T0 cache
    # or the whole run; the benchmark's own T0 ran in place of a checkpoint)
    ("paths.cache_dir=", r"^paths\.cache_dir='': empty; give a directory$"),
    ("model.weights=", r"^model\.weights='': empty; give a T0 checkpoint file, or null"),
    ("hydra.run.dir=", r"^hydra\.run\.dir='': empty; give a directory \(hydra\.run\.dir=\. "),
])
def test_an_empty_path_is_refused_not_read_as_the_working_directory(no_fits, override,
                                                                     expected):
    with pytest.raises(ConfigError, match=expected):
        preflight([override])


@pytest.mark.parametrize("devices", ["[0,1]", "'0,1'", "'0,'", "[0]"])
def test_device_indices_on_the_cpu_are_refused_and_on_a_gpu_taken(devices, monkeypatch):
    """Lightning's CPU accelerator takes a number of processes only."""
    trainer = dict(compose_config(["trainer=cpu", f"trainer.devices={devices}"]).trainer)
    with pytest.raises(ConfigError, match=r"on the CPU devices is a number of processes"):
        checks.check_trainer_values(trainer)
    monkeypatch.setattr(checks.torch.cuda, "is_available", lambda: True)
    checks.check_trainer_values({**trainer, "accelerator": "gpu"})


def test_a_bad_devices_value_in_a_multirun_is_named_not_a_traceback(no_fits):
    for devices, shown in (("abc", "'abc'"), ("null", "None"), ("2.5", "2.5")):
        with pytest.raises(ConfigError, match=rf"trainer\.devices={re.escape(shown)}: accepted"):
            preflight(["-m", "trainer=cpu", f"trainer.devices={devices}",
                       "cwps.threshold=0.3,0.5"])


def test_a_seed_numpy_refuses_and_model_kwargs_timm_refuses(no_fits):
    with pytest.raises(ConfigError, match=r"^seed=-1: accepted: an integer from 0 to 4294967295"):
        preflight(["seed=-1"])
    with pytest.raises(ConfigError, match=r"^model\.kwargs=\{'drop_rat': 0\.1\}: timm cannot "
                                          r"build resnet18 with them \(.*'drop_rat'\)"):
        preflight(["+model.kwargs.drop_rat=0.1"])
    preflight(["+model.kwargs.drop_rate=0.1", "seed=4294967295"])
    for kwargs, raised in (("act_layer=bogus", "KeyError"), ("num_classes=10", "TypeError")):
        with pytest.raises(ConfigError, match=rf"^model\.kwargs=.*timm cannot build resnet18 "
                                              rf"with them \({raised}: "):
            preflight([f"+model.kwargs.{kwargs}"])
    with pytest.raises(ConfigError, match=r"^seed: "):
        preflight(["seed=${oc.env:CWPS_NO_SUCH_VARIABLE}"])


def test_a_model_that_cannot_take_the_benchmarks_image_size_is_named_before_any_work(no_fits):
    """A ViT made for 224 px given the digits' 32 px: it pretrained T0 up to its first
    forward and failed with timm's assertion, a traceback and a run directory. The meta
    device builds it and runs one batch of shapes (no arithmetic); a model that takes the size
    (img_size=32, or a CNN at any size) passes."""
    with pytest.raises(ConfigError, match=r"^model\.name=vit_tiny_patch16_224 cannot take "
                                          r"data\.image_size=32 images \(AssertionError: .*224"
                                          r".*\+model\.kwargs\.img_size=32$"):
        preflight(["model.name=vit_tiny_patch16_224"])
    preflight(["model.name=vit_tiny_patch16_224", "+model.kwargs.img_size=32"])
    preflight(["data.image_size=8"])  # (resnet18 takes 8 px: its last stage is 1x1)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["data.image_size=0"], r"^data\.image_size must be an integer from 8 to 2048, got 0$"),
    (["data.tasks=[optdigits,mnist_sketc]"], r"^unknown task\(s\) \['mnist_sketc'\]"),
    (["data.batch_size=0"], r"^data\.batch_size must be an integer >= 1, got 0$"),
    (["data.image_size=2049"], r"^data\.image_size must be an integer from 8 to 2048, got 2049$"),
    (["+data.image_sise=64"], r"^data\.image_sise: DigitsDataModule takes no such argument; did "
                              r"you mean data\.image_size\? accepted: image_size, limit_per_task, "
                              r"tasks, batch_size, "),
    (["+experiment=imagenet_sketch", "model.pretrained=false", "data.root=/nonexistent/isk"],
     r"^data\.root='/nonexistent/isk' does not exist; expected the ImageNet-to-Sketch layout"),
])
def test_data_settings_tasks_and_root_before_any_job(no_fits, overrides, expected):
    """What the data module can tell without reading the data is told before Hydra makes a run
    directory (and, for a sweep, before its first job)."""
    with pytest.raises(ConfigError, match=expected):
        preflight(overrides)


def test_a_sweep_with_bad_data_in_its_second_job_stops_before_the_first(no_fits):
    with pytest.raises(ConfigError, match=r"^job 1 of the sweep .*data\.limit_per_task must be "
                                          r"null or an integer >= 4"):
        preflight(["-m", "data.limit_per_task=40,2"])


def test_an_optuna_search_space_is_checked_at_its_ends_and_choices(no_fits):
    """The Optuna sweeper picks values as it goes: each end of every interval and every
    choice is checked before the study starts (a range past lambda's [0, 1] made every trial
    fail one by one)."""
    from cwps_lightning.train import search_space_probes

    with pytest.raises(ConfigError, match=r"^the sweeper's search space, at cwps\.threshold=1\.1: "
                                          r"cwps\.threshold \(lambda\) must be in \[0, 1\]"):
        preflight(["-m", "hparams_search=cwps_optuna", "cwps.threshold=interval(0.5,1.1)"])
    with pytest.raises(ConfigError, match=r"at cwps\.mask_init=nope: cwps\.mask_init must be"):
        preflight(["-m", "hparams_search=cwps_optuna", "cwps.mask_init=choice(random,nope)"])
    with pytest.raises(ConfigError, match=r"at cwps\.threshold=1\.5: "):  # (Optuna samples stop)
        preflight(["-m", "hparams_search=cwps_optuna", "cwps.threshold=range(0,1.5,0.5)"])
    preflight(["-m", "hparams_search=cwps_optuna", "++trainer.limit_train_batches=choice(1,2)"])
    probes = [probe for probe, _ in search_space_probes(["hparams_search=cwps_optuna"])]
    assert probes == ["cwps.threshold=0.1", "cwps.threshold=0.9", "optim.mask_lr=0.002",
                      "optim.mask_lr=0.2"]  # (the preset's own space, conf/hparams_search)
    preflight(["-m", "hparams_search=cwps_optuna"])
    assert search_space_probes(["cwps.threshold=0.3,0.5"]) == []  # (the basic sweeper's jobs)


def test_an_optuna_search_maximises_accuracy_and_runs_as_a_multirun(no_fits):
    """The Optuna sweeper's default direction, minimize, searched for the worst job (it
    reported the lower of two accuracies as the best); the preset without -m ran one job at
    its fixed values without a word."""
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.direction=minimize: each job "
                                          r"returns CWPS mean top-1 \(higher is better\), "):
        preflight(["-m", "hydra/sweeper=optuna", "cwps.threshold=interval(0.1,0.9)"])
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.direction=\[maximize, maximize\]: "
                                          r".*accepted: maximize, or \[maximize, minimize\]"):
        preflight(["-m", "hparams_search=cwps_optuna", "hydra.sweeper.direction=[maximize,"
                                                       "maximize]"])
    preflight(["-m", "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize",
               "cwps.threshold=interval(0.1,0.9)"])
    with pytest.raises(ConfigError, match=r"^hparams_search=cwps_optuna is a search: run it as "
                                          r"a multirun \(-m\)$"):
        preflight(["hparams_search=cwps_optuna"])
    with pytest.raises(ConfigError, match=r"^hydra/sweeper=optuna picks a sweep's jobs: run it "
                                          r"as a multirun \(-m\)$"):
        preflight(["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize"])
    # hydra.mode=MULTIRUN starts a multirun as -m does: the preset runs, the direction is
    # checked, and a basic sweep's jobs are each checked
    preflight(["hparams_search=cwps_optuna", "hydra.mode=MULTIRUN"])
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.direction=minimize: "):
        preflight(["hydra.mode=MULTIRUN", "hydra/sweeper=optuna"])
    with pytest.raises(ConfigError, match=r"^job 1 of the sweep \(hydra\.mode=MULTIRUN "
                                          r"cwps\.threshold=1\.5\): cwps\.threshold"):
        preflight(["hydra.mode=MULTIRUN", "cwps.threshold=0.3,1.5"])
    # (Optuna takes the names in lower case only)
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.direction=MAXIMIZE: "):
        preflight(["-m", "hydra/sweeper=optuna", "hydra.sweeper.direction=MAXIMIZE"])


def test_a_preset_that_sets_the_multirun_mode_has_its_sweep_checked(tmp_path, monkeypatch,
                                                                     no_fits):
    """hydra.mode=MULTIRUN in a config file starts a multirun without -m (Hydra reads the
    composed mode): every job of its sweep is checked, as with -m; before, only the config
    without the sweep was, and a bad value failed at its job, after the jobs before it ran."""
    import shutil

    from cwps_lightning import config

    conf = tmp_path / "conf"
    shutil.copytree(config.CONF_DIR, conf)
    (conf / "experiment" / "my_sweep.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n"
        "      cwps.threshold: 0.3,1.5\n")
    monkeypatch.setattr(config, "CONF_DIR", conf)
    with pytest.raises(ConfigError, match=r"^job 1 of the sweep \(cwps\.threshold=1\.5 "
                                          r"\+experiment=my_sweep\): cwps\.threshold"):
        preflight(["+experiment=my_sweep"])
    preflight(["+experiment=my_sweep", "cwps.threshold=0.3,0.5"])  # (the command line's wins)


def test_a_root_is_not_looked_for_where_the_job_does_not_run():
    cfg = compose_config(["+experiment=imagenet_sketch", "data.root=/nonexistent/isk"])
    checks.check_data(cfg, here=False)  # (the cluster's disk)
    with pytest.raises(ConfigError, match="does not exist"):
        checks.check_data(cfg, here=True)
    # task names the code knows are checked anyway; those data=folders finds on disk are not
    bad = compose_config(["+experiment=imagenet_sketch", "data.root=/nonexistent/isk",
                          "data.tasks=[nope]"])
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['nope'\]"):
        checks.check_data(bad, here=False)
    checks.check_data(compose_config(["data=folders", "data.root=/nonexistent/f",
                                      "data.tasks=[nope]", "model.pretrained=true"]),
                      here=False)


USER_DATAMODULE = """
from pathlib import Path
import lightning as L

class UserData(L.LightningDataModule):
    def __init__(self, tasks, image_size, limit_per_task, batch_size, eval_batch_size,
                 num_workers, pin_memory, persistent_workers, seed, marker=None):
        super().__init__()
        if marker:
            Path(marker).write_text("made")


def make_data(tasks, image_size, limit_per_task, batch_size, eval_batch_size, num_workers,
              pin_memory, persistent_workers, seed, marker=None):
    return UserData(tasks, image_size, limit_per_task, batch_size, eval_batch_size,
                    num_workers, pin_memory, persistent_workers, seed, marker)
"""


def test_a_benchmark_without_a_pretraining_task_needs_t0_weights(tmp_path):
    """data=folders (and the real benchmarks) have no task to pretrain T0 on: without
    model.pretrained or model.weights the job is refused before it starts."""
    (tmp_path / "t1" / "train" / "c1").mkdir(parents=True)
    (tmp_path / "t1" / "test" / "c1").mkdir(parents=True)
    base = ["data=folders", f"data.root={tmp_path}"]
    with pytest.raises(ConfigError, match=r"^FoldersDataModule has no pretraining task for T0: "
                                          r"set model\.pretrained=true .* or model\.weights="):
        checks.check_data(compose_config(base))
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    checks.check_data(compose_config([*base, f"model.weights={weights}"]))
    checks.check_data(compose_config([*base, "model.pretrained=true"]))


def test_a_users_own_datamodule_is_not_made_before_the_job(tmp_path, monkeypatch):
    """A DataModule that is not a MultiTaskDataModule (no check_settings) is not constructed
    by the checks (its __init__ may do work); that it takes the configured arguments is."""
    (tmp_path / "user_data_cwps_test.py").write_text(USER_DATAMODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "made"
    target = "data._target_=user_data_cwps_test.UserData"
    checks.check_data(compose_config([target, f"+data.marker={marker}"]))
    assert not marker.exists()
    with pytest.raises(ConfigError, match=r"^data=user_data_cwps_test\.UserData: got an "
                                          r"unexpected keyword argument 'markr'; accepted: tasks, "
                                          r"image_size, .*, seed, marker$"):
        checks.check_data(compose_config([target, f"+data.markr={marker}"]))
    with pytest.raises(ConfigError, match=r"missing a required argument: 'image_size'"):
        checks.check_data(compose_config([target, "~data.image_size"]))
    with pytest.raises(ConfigError, match=r"^data: .*CWPS_NO_SUCH_VARIABLE"):
        checks.check_data(compose_config([target, "+data.marker=${oc.env:CWPS_NO_SUCH_VARIABLE}"]))
    # a factory function likewise: not called, its arguments matched
    factory = "data._target_=user_data_cwps_test.make_data"
    checks.check_data(compose_config([factory, f"+data.marker={marker}"]))
    with pytest.raises(ConfigError, match=r"^data=user_data_cwps_test\.make_data: got an "
                                          r"unexpected keyword argument 'markr'; accepted: "):
        checks.check_data(compose_config([factory, f"+data.markr={marker}"]))
    assert not marker.exists()


def test_a_data_target_that_does_not_import_is_one_line_and_logs_nothing(caplog):
    with caplog.at_level("INFO"), pytest.raises(ConfigError, match=r"^cannot build data=nope\."):
        checks.check_data(compose_config(["data._target_=nope.Nope"]))
    assert not [r for r in caplog.records if r.name.startswith("hydra")]  # (get_class logged)


def test_a_reused_run_dir_with_a_manifest_of_another_shape_is_left_to_the_run(tmp_path):
    """Not a manifest this code wrote: the run's own load names it (one line, exit 2)."""
    from cwps_lightning.persist import check_run_dir_reuse

    (tmp_path / "store").mkdir()
    cfg = compose_config([])
    for text in ('{"run": "x"}', '{"run": {"config": "x"}}', "[1, 2]", "{not json"):
        (tmp_path / "store" / "manifest.json").write_text(text)
        check_run_dir_reuse(tmp_path, cfg)


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_wandb_without_credentials(no_wandb_credentials, no_fits, monkeypatch):
    with pytest.raises(ConfigError, match=r"^logger=wandb: no W&B credentials.*logger\.mode=off"):
        preflight(["logger=wandb", "logger.project=my-project"])
    # offline (the key or the environment) needs no account
    preflight(["logger=wandb", "logger.mode=offline"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    preflight(["logger=wandb"])
    # a WANDB_MODE wandb.init refuses (even beside logger.mode) is named, not taken for online
    for mode in ("ofline", ""):
        monkeypatch.setenv("WANDB_MODE", mode)
        with pytest.raises(ConfigError, match=rf"^WANDB_MODE={mode}: not a W&B mode; accepted: "
                                              r"online, offline, "):
            preflight(["logger=wandb", "logger.mode=offline"])
    monkeypatch.delenv("WANDB_MODE")
    # `wandb login` writes a netrc entry for the W&B host
    no_wandb_credentials.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40)
    os.chmod(no_wandb_credentials, 0o600)
    preflight(["logger=wandb"])


def test_hub_weights_without_network(monkeypatch, no_fits):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(checks, "hub_cached", lambda name: False)
    probed = []
    monkeypatch.setattr(checks, "reachable", lambda host, **kw: probed.append(host) or False)
    with pytest.raises(ConfigError, match=r"^model\.pretrained=true: .*'resnet18'.*cannot be "
                                          r"reached.*model\.weights=<file>"):
        preflight(["model.pretrained=true"])
    assert probed == ["huggingface.co"]
    # cached weights need no network; weights from a file need no hub at all
    monkeypatch.setattr(checks, "hub_cached", lambda name: True)
    preflight(["model.pretrained=true"])


def test_reachable_probes_a_port():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert checks.reachable("127.0.0.1", port, timeout=1.0) is True
    assert checks.reachable("127.0.0.1", port, timeout=1.0) is False  # closed now


def test_sweep_jobs_expand_command_line_and_preset_sweeps():
    assert sweep_jobs(["cwps.threshold=0.3,0.7", "seed=1"]) == [
        ["cwps.threshold=0.3", "seed=1"], ["cwps.threshold=0.7", "seed=1"]]
    jobs = sweep_jobs(["+experiment=lambda_sweep", "data.root=/x"])
    assert [j[0] for j in jobs] == [f"cwps.threshold={v}" for v in
                                    ("0", "0.3", "0.4", "0.5", "0.6", "0.7", "1")]


def test_sweep_jobs_are_numbered_as_hydras_basic_sweeper_numbers_them():
    """The config's hydra.sweeper.params come first, then the command line; a key both give
    keeps the config's place and takes the command line's values (BasicSweeper's order, which
    numbers the job directories that check_sweep_job_dir reads)."""
    def values(job):
        return [o.split("=")[1] for o in job if o.split("=")[0] in ("cwps.threshold", "seed")]

    jobs = sweep_jobs(["+experiment=lambda_sweep", "seed=0,1", "data.root=/x"])
    assert [values(j) for j in jobs[:3]] == [["0", "0"], ["0", "1"], ["0.3", "0"]]
    jobs = sweep_jobs(["+experiment=lambda_sweep", "seed=0,1", "cwps.threshold=0.2,0.8",
                       "data.root=/x"])
    assert [values(j) for j in jobs] == [["0.2", "0"], ["0.2", "1"], ["0.8", "0"], ["0.8", "1"]]


def test_a_bad_sweep_value_stops_the_sweep_before_any_job(no_fits):
    with pytest.raises(ConfigError, match=r"^job 1 of the sweep \(cwps\.threshold=1\.5\): "
                                          r"cwps\.threshold \(lambda\) must be in \[0, 1\]"):
        preflight(["-m", "cwps.threshold=0.3,1.5"])


def test_hydra_own_commands_skip_the_preflight(no_fits):
    preflight(["--help"])
    preflight(["--cfg", "job", "cwps.threshold=abc"])  # Hydra prints or rejects it itself


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cwps_lightning.train", *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("override", "key"), [
    ("cwps.no_such_key=1", "cwps.no_such_key"),
    ("cwps.threshold=abc", "cwps.threshold"),
])
def test_cli_bad_config_one_line_exit_2_nothing_written(tmp_path, override, key):
    run_dir = tmp_path / "run"
    proc = _cli(override, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}"), proc.stderr
    assert not run_dir.exists()


def test_cli_data_found_wrong_on_reading_leaves_no_run_dir(tmp_path):
    """Data found wrong only when read (one class, one training image) stops the
    job after Hydra made the run directory: Hydra's files alone are removed, a directory
    holding anything else stays."""
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "root" / "t1" / split / "c1").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "root" / "t1" / split / "c1" / "x.png")
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"x")  # (the job stops before it reads them)
    args = ("data=folders", f"data.root={tmp_path / 'root'}", f"model.weights={weights}")
    run_dir = tmp_path / "run"
    proc = _cli(*args, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: task 't1'"), proc.stderr
    assert not run_dir.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "train.log").write_text("an earlier attempt's log\n")
    proc = _cli(*args, f"hydra.run.dir={kept}")  # (it existed before: it stays)
    assert proc.returncode == 2, proc.stderr
    assert (kept / "train.log").read_text().startswith("an earlier attempt's log")


def test_cli_a_diverged_run_keeps_its_run_dir(tmp_path):
    """(exit 3: the log of what ran before the loss went to nan is the run's story)"""
    run_dir = tmp_path / "run"
    proc = _cli("logger.kind=none", "t0.lr=1e12", "t0.epochs=1", "t0.cache=false",
                "data.limit_per_task=100", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "the training loss is nan" in proc.stderr
    assert (run_dir / "train.log").is_file()


def stub(run_dir, *extra):
    (run_dir / ".hydra").mkdir(parents=True)
    for name in ("train.log", *extra):
        (run_dir / name).write_text("")
    return run_dir


def test_a_stub_is_hydras_files_and_the_ranks_logs_only(tmp_path, monkeypatch):
    from cwps_lightning import train

    monkeypatch.setattr(train, "RUN_DIR_EXISTED", False)
    for extra, removed in (("train_rank_1.log", True), ("train_ddp_process_2.log", True),
                           ("train.log.bak", False), ("store", False)):
        run_dir = stub(tmp_path / extra, extra)
        assert train.remove_if_stub(run_dir) == removed
        assert run_dir.exists() != removed, extra


def test_a_stub_this_run_did_not_make_stays(tmp_path, monkeypatch):
    """A run dir that existed before the run (hydra.run.dir=. , a requeued run's), or the
    working directory or one above it, is never removed, stub or not."""
    from cwps_lightning import train

    run_dir = stub(tmp_path / "run")
    monkeypatch.setattr(train, "RUN_DIR_EXISTED", True)
    assert not train.remove_if_stub(run_dir) and run_dir.is_dir()
    monkeypatch.setattr(train, "RUN_DIR_EXISTED", False)
    for cwd in (run_dir, run_dir / "sub"):
        assert not train.remove_if_stub(run_dir, cwds=[cwd]) and run_dir.is_dir()
    assert train.remove_if_stub(run_dir, cwds=[tmp_path / "elsewhere"])
    # the empty folders above it go too, up to the working directory (not beyond)
    (tmp_path / "outputs" / "kept").mkdir(parents=True)
    deep = stub(tmp_path / "outputs" / "runs" / "day" / "run")
    assert train.remove_if_stub(deep, cwds=[tmp_path])
    assert not (tmp_path / "outputs" / "runs").exists()
    assert (tmp_path / "outputs" / "kept").is_dir() and tmp_path.is_dir()
    # what preflight records: a timestamped run dir is new; a given one, as it is on disk
    assert not train.run_dir_existed(compose_config([]))
    assert train.run_dir_existed(compose_config(["hydra.run.dir=."]))
    assert not train.run_dir_existed(compose_config([f"hydra.run.dir={tmp_path / 'new'}"]))


def test_cli_hub_without_network_fails_within_seconds(tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = _cli("model.pretrained=true", f"hydra.run.dir={run_dir}",
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: model.pretrained=true:"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()
    # the check itself takes no time; the rest is importing torch and Lightning
    assert time.monotonic() - started < 60


def test_a_wrong_data_root_is_named_before_the_hub_is_asked(no_fits, monkeypatch, tmp_path):
    """Offline, the paper presets' model.pretrained=true fails the hub check; the data.root
    that does not exist is still the line the user sees first."""
    def offline(name):
        raise ConfigError("model.pretrained=true: the hub cannot be reached")

    monkeypatch.setattr(checks, "check_hub_weights", offline)
    cfg = compose_config(["+experiment=domainnet", f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"^data\.root=.*nope' does not exist"):
        checks.check_config(cfg)
    with pytest.raises(ConfigError, match=r"^model\.pretrained=true: the hub"):
        checks.check_config(compose_config(["+experiment=domainnet", f"data.root={tmp_path}"]))


def test_checks_compose_the_default_run_cleanly(no_fits):
    job = checks.check_config(compose_config([]))
    assert job.cwps.baselines == ["finetune", "frozen"] and job.model.name == "resnet18"


def test_lightnings_trainer_defaults_take_a_plain_override(no_fits, monkeypatch):
    """num_nodes, gradient_clip_val and accumulate_grad_batches are in the trainer config with
    Lightning's defaults: set without "+", passed to the Trainer."""
    monkeypatch.setenv("NODE_RANK", "0")  # (a launcher of the nodes: its own, by hand)
    cfg = compose_config(["trainer.num_nodes=2", "trainer.gradient_clip_val=0.5",
                          "trainer.accumulate_grad_batches=4"])
    checks.check_config(cfg)
    assert (cfg.trainer.num_nodes, cfg.trainer.gradient_clip_val,
            cfg.trainer.accumulate_grad_batches) == (2, 0.5, 4)
    import lightning as L

    defaults = inspect.signature(L.Trainer.__init__).parameters
    plain = compose_config([]).trainer
    for key in ("num_nodes", "gradient_clip_val", "accumulate_grad_batches"):
        assert plain[key] == defaults[key].default, key


@pytest.mark.parametrize("overrides, error", [
    (["trainer.gradient_clip_val=1.0"], r"trainer.gradient_clip_val=1.0: cwps.compose=step"),
    (["trainer.accelerator=gpu", "trainer.precision=16-mixed"],
     r"trainer.precision=16-mixed: cwps.compose=step .* on a GPU"),
])
def test_what_compose_step_cannot_train_with_is_refused_before_any_fit(overrides, error,
                                                                      no_fits, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (a GPU, for the check)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=error):
        checks.check_config(compose_config(["cwps.compose=step", *overrides]))
    checks.check_config(compose_config(overrides))  # the forward mode trains with them


def test_compose_step_with_16_mixed_on_the_cpu_passes(no_fits, monkeypatch):
    """On the CPU Lightning runs "16-mixed" as bf16-mixed, which the step handles."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checks.check_config(compose_config(["cwps.compose=step", "trainer.accelerator=cpu",
                                        "trainer.precision=16-mixed"]))
    checks.check_config(compose_config(["cwps.compose=step", "trainer.precision=16-mixed"]))
    # submitted elsewhere (SLURM), "auto" may well be a GPU there
    with pytest.raises(ConfigError, match="trainer.precision=16-mixed"):
        checks.check_config(compose_config(["cwps.compose=step", "trainer.precision=16-mixed"]),
                            here=False)


@pytest.mark.parametrize("argv", [
    ["check", "--strict", "data=folders", "data.root=/nowhere/at/all"],
    ["check", "data=folders", "--strict", "data.root=/nowhere/at/all"],
    ["check", "data=folders", "data.root=/nowhere/at/all", "--strict"],
])
def test_data_check_takes_strict_anywhere(argv, capsys):
    from cwps_lightning.data.__main__ import main

    assert main(argv) == 2  # the missing root, reported as one line (not an argparse error)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "/nowhere/at/all" in err[0]


def test_evaluate_on_a_run_dir_points_to_its_store(tmp_path, capsys):
    from cwps_lightning.evaluate import main

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text("{}")
    assert main([f"store={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"the run's store is {tmp_path / 'store'}" in err


# -- how a job is launched: DDP in sweeps, torchrun, SLURM (checks.check_launch) -----------------
@pytest.mark.parametrize("ddp", [
    ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"],
    ["trainer.accelerator=cpu", "trainer.strategy=ddp"],
    ["hydra/launcher=submitit_local", "trainer.accelerator=cpu", "trainer.devices=2",
     "trainer.strategy=ddp"],
])
def test_a_ddp_multirun_outside_slurm_is_refused_naming_the_way(ddp, no_fits):
    with pytest.raises(ConfigError, match=r"multirun with DDP .* not supported .* "
                                          r"hydra/launcher=slurm"):
        preflight(["-m", *ddp, "cwps.threshold=0.3,0.7"])


def test_a_one_device_multirun_and_a_ddp_single_run_pass_the_launch_check(monkeypatch):
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    checks.check_launch(compose_config(["cwps.threshold=0.3"]), multirun=True, overrides=[])
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    checks.check_launch(compose_config(ddp), multirun=False, overrides=ddp)


def test_torchrun_without_one_run_dir_is_refused(monkeypatch, no_fits):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"2 ranks .* give hydra\.run\.dir=<dir>"):
        preflight(["cwps.threshold=0.3"])
    preflight(["cwps.threshold=0.3", "hydra.run.dir=/tmp/x"])


def test_torchrun_ranks_must_be_one_ddp_job_over_as_many_devices(monkeypatch, no_fits):
    """torchrun --nproc_per_node=2 without a DDP Trainer ran the whole job on each rank."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    run_dir = "hydra.run.dir=/tmp/x"
    with pytest.raises(ConfigError, match=r"torchrun started 2 ranks, but trainer\.strategy="
                                          r"auto with trainer\.devices=1 runs one process"):
        preflight([run_dir])
    with pytest.raises(ConfigError, match=r"trainer\.devices=4 x trainer\.num_nodes=1 = 4; "
                                          r"give trainer\.devices=<ranks per node>"):
        preflight([run_dir, "trainer.accelerator=cpu", "trainer.devices=4",
                   "trainer.strategy=ddp"])
    ddp = ["trainer.accelerator=cpu", "trainer.strategy=ddp"]
    preflight([run_dir, *ddp, "trainer.devices=2"])
    preflight([run_dir, *ddp, "trainer.devices=1", "trainer.num_nodes=2"])
    preflight([run_dir, "trainer.accelerator=cpu", "trainer.num_nodes=2"])  # (auto: DDP)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # (SLURM's or a user's WORLD_SIZE: not torchrun)
    preflight([run_dir])


def test_slurm_launcher_without_sbatch_is_refused_naming_the_way(no_fits, monkeypatch):
    monkeypatch.setattr(checks.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"hydra/launcher=slurm: no sbatch .* login node"):
        preflight(["-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                   "hydra.launcher.gpus_per_node=4", "cwps.threshold=0.3,0.7"])


def test_slurm_launcher_settings_must_match_the_trainer(no_fits, monkeypatch):
    # (a machine with SLURM's tools; this one need not have them)
    monkeypatch.setattr(checks.shutil, "which", lambda name: f"/usr/bin/{name}")
    base = ["-m", "hydra/launcher=slurm", "trainer=ddp", "cwps.threshold=0.3,0.7"]
    with pytest.raises(ConfigError, match=r"trainer\.devices=2 but hydra\.launcher asks SLURM "
                                          r"for 4 \(gpus_per_node\)"):
        preflight([*base, "trainer.devices=2", "hydra.launcher.gpus_per_node=4"])
    with pytest.raises(ConfigError, match=r"trainer\.num_nodes=1 .* for 2 \(nodes\)"):
        preflight([*base, "trainer.devices=4", "hydra.launcher.nodes=2"])
    # matching settings pass, on a machine without GPUs: the jobs run on the cluster's
    preflight([*base, "trainer.devices=4", "hydra.launcher.gpus_per_node=4"])


def test_uses_ddp_reads_every_way_of_asking_for_ranks():
    assert not checks.uses_ddp({"devices": 1, "strategy": "auto"})
    assert checks.uses_ddp({"devices": 2})
    assert checks.uses_ddp({"devices": [0, 1]}) and not checks.uses_ddp({"devices": [3]})
    assert checks.uses_ddp({"devices": "0,1"})
    assert checks.uses_ddp({"devices": 1, "strategy": "ddp_spawn"})
    assert checks.uses_ddp({"devices": -1, "accelerator": "gpu"})
    assert not checks.uses_ddp({"devices": "auto", "accelerator": "cpu"})


@pytest.mark.parametrize(("name", "first"), [
    ("resnt18", "'resnet18'"),  # misspelt: the nearest spelling first
    ("vit_base", "'vit_base_"),  # the start of names: those names
    ("densenet12", "'densenet121'"),
])
def test_an_unknown_model_name_lists_the_names_it_was_likely_meant_as(no_fits, name, first):
    with pytest.raises(ConfigError, match=rf"^unknown model '{name}': .*; similar: \[{first}"):
        preflight([f"model.name={name}"])


def test_a_sweep_into_a_finished_sweeps_dir_with_other_values_is_refused(no_fits, tmp_path):
    """Job i's directory (hydra.sweep.dir/i) holding a store of another config: refused
    before Hydra writes the sweep's and the jobs' records over the finished sweep's; the same
    sweep again (a resume) passes."""
    import json

    from cwps_lightning.persist import config_hash, result_config

    sweep = tmp_path / "sweep"
    for i, threshold in enumerate((0.3, 0.5)):
        config = result_config(compose_config([f"cwps.threshold={threshold}"]))
        (sweep / str(i) / "store").mkdir(parents=True)
        (sweep / str(i) / "store" / "manifest.json").write_text(json.dumps(
            {"run": {"config": config, "config_hash": config_hash(config)}}))
    preflight(["-m", "cwps.threshold=0.3,0.5", f"hydra.sweep.dir={sweep}"])
    (tmp_path / "run" / "store").mkdir(parents=True)  # a single run's directory
    with pytest.raises(ConfigError, match=r"hydra\.sweep\.dir=.*run: a single run's directory"):
        preflight(["-m", "cwps.threshold=0.3,0.5", f"hydra.sweep.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^job 0 of the sweep \(cwps\.threshold=0\.6 .*\): .*0/"
                                          r"store/manifest\.json was written by a different "
                                          r"config \(1 setting\(s\) differ: cwps\.threshold: 0\.3 "
                                          r"there, 0\.6 now\)"):
        preflight(["-m", "cwps.threshold=0.6,0.7", f"hydra.sweep.dir={sweep}"])


@pytest.mark.parametrize(("argv", "message"), [
    (["-m", "cwps.threshold=0.3,"], r"^the sweep's overrides: cwps\.threshold=0\.3,: mismatched"),
    (["-m", "seed=choice()"], r"^the sweep's overrides: .*empty choice is not legal"),
    (["-m", "cwps.threshold=range(0,0)"], r"^the sweep has no jobs \(an empty range or choice"),
])
def test_sweep_overrides_hydra_cannot_expand_are_one_line(no_fits, argv, message):
    with pytest.raises(ConfigError, match=message) as err:
        preflight(argv)
    assert "See https://" not in str(err.value)  # (Hydra's pointer to its grammar page)


def test_a_run_dir_or_cache_dir_under_a_file_is_refused(no_fits, tmp_path):
    (tmp_path / "file").write_text("")
    for argv, key in ((["hydra.run.dir=" + str(tmp_path / "file" / "run")], "hydra.run.dir"),
                      (["paths.cache_dir=" + str(tmp_path / "file")], "paths.cache_dir"),
                      (["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'file'}"],
                       "hydra.sweep.dir")):
        with pytest.raises(ConfigError, match=rf"{key}=.*: {tmp_path / 'file'} is a file, not a "
                                              "directory"):
            preflight(argv)
    preflight([f"paths.cache_dir={tmp_path / 'file'}", "t0.cache=false"])  # (not used then)


def test_a_weights_file_that_is_no_file_of_tensors_says_what_is_accepted(no_fits, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, said in (("dir", "a directory"), ("empty.pt", "an empty file")):
        with pytest.raises(ConfigError, match=rf"^model\.weights='.*{name}': {said}; accepted: a "
                                              r"state dict of tensors saved with torch\.save"):
            preflight([f"model.weights={tmp_path / name}"])
    from cwps_lightning.models import load_backbone_weights

    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # (a pickled module)
    with pytest.raises(ConfigError) as err:
        load_backbone_weights("resnet18", tmp_path / "module.pt")
    assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)
    assert "(not a file of tensors that torch.load(weights_only=True) reads); accepted:" in str(
        err.value)


def test_a_baseline_named_as_cwps_is_refused():
    with pytest.raises(ConfigError, match=r"tests\.methods\.plugins:NamedCwps and cwps are both "
                                          r"named 'cwps'"):
        checks.check_methods(["tests.methods.plugins:NamedCwps"])


@pytest.mark.parametrize("nodes", [True, 0, 1.0, "2"])
def test_num_nodes_is_an_integer_from_one(nodes):
    checks.check_trainer_values({"accelerator": "cpu", "num_nodes": 1})
    with pytest.raises(ConfigError, match=r"^trainer\.num_nodes=.*: accepted: an integer >= 1"):
        checks.check_trainer_values({"accelerator": "cpu", "num_nodes": nodes})


def test_devices_as_text_read_as_lightning_reads_them():
    for devices in ("-1", " -1 ", "auto", "2", "0,1"):
        assert checks._devices_ok(devices), devices
    for devices in ("0", "", "1 2", "-2", ","):
        assert not checks._devices_ok(devices), devices
    with pytest.raises(ConfigError, match=r"^trainer\.devices='0': accepted"):
        checks.check_trainer_values({"accelerator": "cpu", "devices": "0"})


def test_wandb_dryrun_needs_no_credentials(no_wandb_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    checks.check_logger(LoggerSettings(kind="wandb"))
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError, match=r"^logger=wandb: no W&B credentials"):
        checks.check_logger(LoggerSettings(kind="wandb"))


def test_hf_hub_offline_0_is_not_offline(monkeypatch):
    monkeypatch.setattr(checks, "hub_cached", lambda name: False)
    monkeypatch.setattr(checks, "reachable", lambda host, **kw: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    checks.check_hub_weights("resnet18")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"HF_HUB_OFFLINE is set"):
        checks.check_hub_weights("resnet18")


def test_slurm_settings_compare_as_text_and_tasks_follow_gpus(no_fits, monkeypatch):
    monkeypatch.setattr(checks.shutil, "which", lambda name: f"/usr/bin/{name}")
    base = ["-m", "hydra/launcher=slurm", "trainer=ddp", "cwps.threshold=0.3,0.7"]
    preflight([*base, "trainer.devices='4'", "hydra.launcher.gpus_per_node=4"])
    with pytest.raises(ConfigError, match=r"hydra\.launcher\.tasks_per_node=2 must equal "
                                          r"gpus_per_node=4"):
        preflight([*base, "trainer.devices=4", "hydra.launcher.gpus_per_node=4",
                   "hydra.launcher.tasks_per_node=2"])


def test_a_single_runs_directory_holding_results_only_is_no_sweep_dir(no_fits, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"hydra\.sweep\.dir=.*run: a single run's directory"):
        preflight(["-m", "cwps.threshold=0.3,0.5", f"hydra.sweep.dir={tmp_path / 'run'}"])


def test_an_optuna_study_may_run_again_in_its_own_sweep_dir(no_fits, tmp_path):
    """Optuna numbers its trials as it samples them: job 0's store holds the values it drew,
    not the fixed part of the command, and is no reason to refuse the command."""
    import json

    from cwps_lightning.persist import config_hash, result_config

    sweep = tmp_path / "sweep"
    config = result_config(compose_config(["hparams_search=cwps_optuna", "cwps.threshold=0.37"]))
    (sweep / "0" / "store").mkdir(parents=True)
    (sweep / "0" / "store" / "manifest.json").write_text(json.dumps(
        {"run": {"config": config, "config_hash": config_hash(config)}}))
    preflight(["-m", "hparams_search=cwps_optuna", f"hydra.sweep.dir={sweep}"])


def test_a_search_space_value_this_machine_cannot_run_is_refused(no_fits, monkeypatch):
    monkeypatch.setattr(checks.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^the sweeper's search space, at "
                                          r"trainer\.accelerator=gpu: .*no CUDA GPU"):
        preflight(["-m", "hparams_search=cwps_optuna", "trainer.accelerator=choice(cpu,gpu)"])


def test_the_command_lines_search_space_replaces_the_presets():
    from cwps_lightning.train import search_space_probes

    def probes(*overrides):
        return [probe for probe, _ in search_space_probes(["hparams_search=cwps_optuna",
                                                           *overrides])]

    assert probes("cwps.threshold=interval(0.2,0.4)") == [
        "cwps.threshold=0.2", "cwps.threshold=0.4", "optim.mask_lr=0.002", "optim.mask_lr=0.2"]
    assert probes("cwps.threshold=0.5") == ["optim.mask_lr=0.002", "optim.mask_lr=0.2"]


def test_a_bad_config_is_printed_once_under_torchrun(monkeypatch, capsys, no_fits):
    """Every rank checks the command; rank 0 alone prints the error line."""
    from cwps_lightning import train

    monkeypatch.setattr(train.distributed, "rank", lambda: 1)
    with pytest.raises(SystemExit) as stopped:
        train.main(["cwps.threshold=abc"])
    assert stopped.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setattr(train.distributed, "rank", lambda: 0)
    with pytest.raises(SystemExit) as stopped:
        train.main(["cwps.threshold=abc"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert err.startswith("error: cwps.threshold must be") and len(err.splitlines()) == 1


def test_a_taps_penalty_from_past_its_epochs_is_refused(no_fits):
    """(penalty_from_epoch=100: the penalty never counted, and TAPS was reported at 4.00x as
    fine-tuning under its own name)"""
    with pytest.raises(ConfigError, match=r"^methods\.taps\.penalty_from_epoch=4: TAPS trains 4 "
                                          r"epoch\(s\) a task .* accepted: 0 to 3$"):
        preflight(["cwps.baselines=[taps]", "methods.taps.penalty_from_epoch=4"])
    preflight(["cwps.baselines=[taps]", "methods.taps.penalty_from_epoch=3"])
    preflight(["methods.taps.penalty_from_epoch=4"])  # (no TAPS in the job: not its concern)


def test_kwargs_that_break_the_forward_are_named_not_the_image_size():
    """(drop_rate=2 was said as 'resnet18 cannot take data.image_size=32 images; set
    data.image_size ...')"""
    with pytest.raises(ConfigError, match=r"^model\.kwargs=\{'drop_rate': 2\}: resnet18 with "
                                          r"them cannot run a batch \(ValueError: dropout"):
        checks.check_model_build("resnet18", {"drop_rate": 2}, 32)
    # a model that cannot take the size without its kwargs either: the size is named
    with pytest.raises(ConfigError, match=r"^model\.name=vit_tiny_patch16_224 cannot take "
                                          r"data\.image_size=32"):
        checks.check_model_build("vit_tiny_patch16_224", {"drop_rate": 0.1}, 32)


def test_a_model_build_that_passed_is_not_built_again(monkeypatch):
    """(the launch's check and the job's own ask for the same model: one meta build)"""
    import timm

    from cwps_lightning import checks

    builds = []
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: builds.append(a) or create(*a, **k))
    monkeypatch.setattr(checks, "_BUILDS_PASSED", set())
    for _ in range(2):
        checks.check_model_build("resnet18", {"drop_rate": 0.1}, 32)
    assert len(builds) == 1
    checks.check_model_build("resnet18", {"drop_rate": 0.1}, 64)  # (another size: built)
    assert len(builds) == 2
    for _ in range(2):  # a refusal is refused each time
        with pytest.raises(ConfigError, match="cannot take data.image_size=32"):
            checks.check_model_build("vit_tiny_patch16_224", {}, 32)
    assert len(builds) == 4


@pytest.mark.parametrize(("override", "instead"), [("model.compile=true",
                                                     "set model.compile=false"),
                                                    ("cwps.compose=step",
                                                     "use cwps.compose=forward")])
def test_compile_without_a_cpp_compiler_is_refused_before_any_work(monkeypatch, override,
                                                                    instead):
    """(it failed in the first compiled fit, after T0, with inductor's long traceback)"""
    from torch._inductor import cpp_builder

    def none_found():
        raise RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx")

    monkeypatch.setattr(checks, "_COMPILER_FOUND", [])
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none_found)
    cfg = compose_config(["trainer=cpu", override])
    with pytest.raises(ConfigError, match=rf"^{override}: torch.compile needs a working C\+\+ "
                                          rf"compiler on the CPU and found none \(RuntimeError: "
                                          rf"No working .*\); install one .*, or {instead}$"):
        checks.check_config(cfg, data=False)
    checks.check_config(compose_config(["trainer=cpu"]), data=False)  # (not asked: no check)
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    checks.check_config(cfg, data=False)


def test_a_run_dir_the_run_cannot_write_in_is_refused(tmp_path, monkeypatch, no_fits):
    """(Hydra's log handler failed on it with a ValueError traceback)"""
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK)  # (root ignores modes)
    with pytest.raises(ConfigError, match=rf"^hydra\.run\.dir={tmp_path}: not writable"):
        preflight([f"hydra.run.dir={tmp_path}"])


def test_a_batch_of_one_image_at_a_one_by_one_feature_map_is_refused_before_t0(no_fits):
    """(it was found in T0's first step, after the data was built)"""
    with pytest.raises(ConfigError, match=r"^data\.batch_size=1: resnet18 at data\.image_size=32 "
                                          r"ends in a 1x1 feature map.*accepted here: 2 or more$"):
        preflight(["data.batch_size=1"])
    preflight(["data.batch_size=1", "data.image_size=64"])  # (2x2 at the end: batch norm runs)
