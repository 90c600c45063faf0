"""The train command's job (train.py): its loggers, fit settings and methods, the wrapper that
reports a job's outputs, rank-0 logging, the cleanup of a stopped run's directory, and what a
tiny whole run leaves. (Its checks before Hydra runs are in test_checks.py; the command in a
subprocess is in tests/integration.)"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import types
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from cwps_lightning import checks, train
from cwps_lightning.config import compose_config
from cwps_lightning.data.base import DataConfigError, MultiTaskDataModule
from cwps_lightning.errors import DIVERGED_RUN_DIR, NO_STORE_YET, STORE_KEEPS, ConfigError
from cwps_lightning.fitting import RunInterrupted, TrainingDiverged


def job_of(*overrides: str):
    cfg = compose_config(list(overrides))
    return cfg, checks.check_config(cfg, data=False)


# -- loggers and fit settings --------------------------------------------------------------------
def test_logger_none_gives_lightning_no_logger_and_csv_logs_under_the_run_dir(tmp_path):
    """logger.kind=none: no logger at all (Lightning would add its default one, writing
    lightning_logs/, for a missing logger); csv: <run dir>/logs/<method>/<fit>/."""
    cfg, job = job_of("logger.kind=none")
    make = train.logger_factory(cfg, job, tmp_path)
    trainer = L.Trainer(accelerator="cpu", logger=make("cwps", "optdigits-it0-mask"),
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path / "default"))
    assert trainer.loggers == []
    cfg, job = job_of("logger=csv")
    logger = train.logger_factory(cfg, job, tmp_path)("cwps", "optdigits-it0-mask")
    assert Path(logger.log_dir) == tmp_path / "logs" / "cwps" / "optdigits-it0-mask"


def test_fit_settings_take_the_optimiser_model_and_checkpoint_settings(tmp_path):
    cfg, job = job_of("optim.lr=0.3", "optim.mask_lr=0.07", "optim.momentum=0.5",
                      "optim.weight_decay=0.001", "model.channels_last=false",
                      "model.compile_mode=max-autotune")
    s = train.fit_settings_of(cfg, job, tmp_path, config_hash="a" * 64)
    assert (s.lr, s.mask_lr, s.momentum, s.weight_decay) == (0.3, 0.07, 0.5, 0.001)
    assert s.channels_last is False
    assert s.compile_mode is None  # a compile mode without model.compile: eager
    assert s.checkpoint_dir is None  # trainer.enable_checkpointing=false (the default)
    cfg, job = job_of("model.compile=true", "model.compile_mode=max-autotune",
                      "trainer.enable_checkpointing=true")
    s = train.fit_settings_of(cfg, job, tmp_path, config_hash="a" * 64)
    assert s.channels_last is True and s.compile_mode == "max-autotune"
    # under <run dir>/checkpoints, one folder per config: a run dir reused by another config
    # does not continue from this one's checkpoints
    other = train.fit_settings_of(cfg, job, tmp_path, config_hash="b" * 64)
    assert s.checkpoint_dir.parent == tmp_path / "checkpoints"
    assert other.checkpoint_dir.parent == tmp_path / "checkpoints"
    assert s.checkpoint_dir != other.checkpoint_dir


def test_cwps_runs_first_then_the_baselines_in_the_configs_order():
    _, job = job_of("cwps.baselines=[frozen,finetune]")
    assert [m.name for m in train.methods_of(job)] == ["cwps", "frozen", "finetune"]


# -- the job wrapper -----------------------------------------------------------------------------
class OpenRun:
    """Stands in for the ``wandb`` module with a run open: records that it was finished."""

    def __init__(self):
        self.module = types.ModuleType("wandb")
        self.module.run = object()
        self.finished = 0
        self.exit_codes = []

        def finish(exit_code=None):
            self.finished += 1
            self.exit_codes.append(exit_code)
            self.module.run = None

        self.module.finish = finish


@pytest.fixture
def job_dir(monkeypatch, tmp_path):
    """The run directory Hydra reports to the job, and an open W&B run."""
    hydra = types.SimpleNamespace(runtime=types.SimpleNamespace(output_dir=str(tmp_path)))
    monkeypatch.setattr(train.HydraConfig, "get", staticmethod(lambda: hydra))
    wandb = OpenRun()
    monkeypatch.setitem(sys.modules, "wandb", wandb.module)
    return tmp_path, wandb


@pytest.mark.parametrize("error", [ConfigError("cwps.threshold: bad"),
                                   TrainingDiverged("the training loss is nan")])
def test_an_error_with_its_own_line_is_not_logged_again(job_dir, caplog, error):
    """Bad input and a diverged fit end with the CLI's one ``error:`` line; the wrapper adds
    no log line of its own, and the W&B run left open is finished."""
    _, wandb = job_dir

    def task(cfg):
        raise error

    with caplog.at_level(logging.INFO, logger="cwps_lightning"), pytest.raises(type(error)):
        train.task_wrapper(task)(None)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # with the job's exit status: W&B marks the run failed (it read as a success)
    assert wandb.finished == 1 and wandb.exit_codes == [train.exit_status(error)]


def test_any_other_failure_logs_where_the_outputs_are(job_dir, caplog):
    run_dir, wandb = job_dir

    def task(cfg):
        raise RuntimeError("disk full")

    with caplog.at_level(logging.INFO, logger="cwps_lightning"):
        with pytest.raises(RuntimeError):
            train.task_wrapper(task)(None)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "RuntimeError: disk full" in errors[0]
        assert str(run_dir) in errors[0]
        assert wandb.finished == 1 and wandb.exit_codes == [1]
        wandb.module.run = object()  # (a job that ends well finishes its run as done)
        assert train.task_wrapper(lambda cfg: {"done": True})(None) == {"done": True}
        assert wandb.exit_codes == [1, None]
    assert f"outputs: {run_dir}" in caplog.text


@pytest.mark.parametrize("error", [
    TrainingDiverged(f"fit x: the training loss is nan (...); {STORE_KEEPS}"),
    RunInterrupted(f"fit x: stopped by SIGTERM at epoch 0; {STORE_KEEPS}: the same command "
                   f"resumes the run", 15)])
def test_a_stop_before_any_task_was_stored_says_there_is_no_store(job_dir, error):
    """The line said "the store keeps the tasks finished before" when no task was finished
    and there was no store; with a store (one task finished, say) it stays."""
    run_dir, _ = job_dir
    line = str(error)
    with pytest.raises(type(error)) as raised:
        train.task_wrapper(lambda cfg: (_ for _ in ()).throw(error))(None)
    assert str(raised.value) == line.replace(STORE_KEEPS, NO_STORE_YET)
    assert NO_STORE_YET in str(raised.value) and raised.value.status == error.status
    (run_dir / "store").mkdir()
    (run_dir / "store" / "manifest.json").write_text("{}")  # (a store: its manifest written)
    error.args = (line, *error.args[1:])
    with pytest.raises(type(error)) as raised:
        train.task_wrapper(lambda cfg: (_ for _ in ()).throw(error))(None)
    # a diverged fit's advice (a lower lr) needs a new run dir: this one refuses other
    # settings once its store is written
    assert str(raised.value) == (f"{line}, {DIVERGED_RUN_DIR}"
                                 if isinstance(error, TrainingDiverged) else line)


@pytest.fixture
def ranks(monkeypatch):
    """distributed's side of the error paths, recorded: the errors this rank announced, what
    rank 0 was told, and the peer error peer_error finds (``peer[0]``, None: none)."""
    said = types.SimpleNamespace(announced=[], told=[], waited=[], peer=[None])
    d = train.distributed
    monkeypatch.setattr(d, "announce_error", lambda line, status, kind="": said.announced.append(
        (line, status, kind)))
    monkeypatch.setattr(d, "peer_error", lambda: said.peer[0])
    monkeypatch.setattr(d, "rank_zero_stopped", said.told.append)
    monkeypatch.setattr(d, "await_rank_zero_stop", lambda: said.waited.append(True))
    monkeypatch.setattr(d, "tidied_up", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    return said


def test_an_error_this_rank_meets_is_announced_to_the_others(job_dir, ranks, monkeypatch,
                                                             caplog):
    """Its own stop (bad data) with its line and status, a crash with its type (and the ranks
    then stop together: rank 0 tells, a rank above 0 waits); a signal is no one rank's."""
    def failing(error):
        def task(cfg):
            raise error
        return train.task_wrapper(task)

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError):
        failing(ConfigError("cannot read image x.jpg"))(None)
    with pytest.raises(RunInterrupted):
        failing(RunInterrupted("stopped by SIGTERM", 15))(None)
    assert ranks.announced == [("cannot read image x.jpg", 2, "ConfigError")] and not ranks.waited
    with caplog.at_level(logging.INFO, logger="cwps_lightning"), pytest.raises(KeyError):
        failing(KeyError("w"))(None)
    assert ranks.announced[1:] == [("KeyError: 'w'", 1, "")] and ranks.waited == [True]
    assert "the job failed (KeyError" in caplog.text
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(KeyError):
        failing(KeyError("w"))(None)
    assert ranks.told == [train.distributed.RankZeroStop("KeyError: 'w'", removed=False)]


def test_a_collective_that_failed_because_another_rank_stopped_takes_its_error(
        job_dir, ranks, caplog):
    """gloo's "Connection closed by peer" after rank 1 announced a bad image: the job ends
    on rank 1's error and status, with no log line of its own and nothing announced."""
    ranks.peer[0] = train.distributed.PeerStopped(1, "cannot read image x.jpg", 2)

    def task(cfg):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer")

    with caplog.at_level(logging.INFO, logger="cwps_lightning"), \
            pytest.raises(train.distributed.PeerStopped) as stopped:
        train.task_wrapper(task)(None)
    assert stopped.value is ranks.peer[0] and train.exit_status(stopped.value) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert ranks.announced == []
    # this rank's own stop is its own, whatever a peer said; so is a bug (not the backend's
    # error), and a collective failure whose line is the peer's own: both met it
    with pytest.raises(ConfigError):
        train.task_wrapper(lambda cfg: (_ for _ in ()).throw(ConfigError("bad")))(None)
    with pytest.raises(RuntimeError, match="a bug"):
        train.task_wrapper(lambda cfg: (_ for _ in ()).throw(RuntimeError("a bug")))(None)
    ranks.peer[0] = train.distributed.PeerStopped(1, "RuntimeError: gloo timed out", 1)
    with pytest.raises(RuntimeError, match="gloo timed out"):
        train.task_wrapper(lambda cfg: (_ for _ in ()).throw(RuntimeError("gloo timed out")))(
            None)
    assert ranks.announced == [("bad", 2, "ConfigError"), ("RuntimeError: a bug", 1, ""),
                               ("RuntimeError: gloo timed out", 1, "")]


def test_a_crash_in_a_sweeps_job_waits_for_no_other_rank(job_dir, ranks, monkeypatch):
    """(in a multirun rank 0 fails the job and goes on: it never says it stopped)"""
    hydra = train.HydraConfig.get()
    from hydra.types import RunMode

    monkeypatch.setattr(hydra, "mode", RunMode.MULTIRUN, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(KeyError):
        train.task_wrapper(lambda cfg: {}["w"])(None)
    assert ranks.announced == [("KeyError: 'w'", 1, "")] and ranks.told == []


def test_exit_status_of_each_stop():
    peer = train.distributed.PeerStopped
    assert [train.exit_status(e) for e in (
        ConfigError("x"), train.StoreError("x"), TrainingDiverged("x"),
        RunInterrupted("x", 15), RunInterrupted("x", 2), peer(1, "x", 3), RuntimeError("x"))] \
        == [2, 2, 3, 143, 130, 3, 1]
    unexpected = OSError("HTTP Error 503")
    unexpected.status = 503  # (as urllib's HTTPError has): no exit status
    assert train.exit_status(unexpected) == 1


# -- logging -------------------------------------------------------------------------------------
@pytest.fixture
def logger_levels():
    """Put back the levels of the loggers the tests change."""
    names = ["", "cwps_lightning", "lightning.pytorch.utilities.rank_zero",
             "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed"]
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():  # (quiet_lightning adds filters)
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_ranks_above_zero_log_warnings_only(monkeypatch, logger_levels):
    logging.getLogger().setLevel(logging.INFO)
    train.log.setLevel(logging.INFO)
    monkeypatch.setattr(train.distributed, "rank", lambda: 0)
    train.quiet_other_ranks()
    assert train.log.isEnabledFor(logging.INFO)  # rank 0 logs the run
    monkeypatch.setattr(train.distributed, "rank", lambda: 1)
    train.quiet_other_ranks()
    assert not train.log.isEnabledFor(logging.INFO)
    assert not logging.getLogger("cwps_lightning.runner").isEnabledFor(logging.INFO)
    assert train.log.isEnabledFor(logging.WARNING)


def test_a_trainer_prints_no_device_banner(caplog, logger_levels):
    train.quiet_lightning()
    with caplog.at_level(logging.INFO):
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False)
    assert not [r for r in caplog.records if r.name.startswith("lightning")
                and r.levelno < logging.WARNING], caplog.text


# -- a stopped run's directory -------------------------------------------------------------------
def stub(run_dir: Path) -> Path:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "train.log").write_text("")
    return run_dir


def test_removing_a_stub_keeps_the_working_directory_and_folders_outside_it(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(train, "RUN_DIR_EXISTED", False)
    cwd = tmp_path / "work"
    run_dir = stub(cwd / "outputs" / "run")
    assert train.remove_if_stub(run_dir, cwds=[cwd])
    assert not (cwd / "outputs").exists()
    assert cwd.is_dir()  # emptied, but the working directory stays
    elsewhere = stub(tmp_path / "elsewhere" / "runs" / "run")
    assert train.remove_if_stub(elsewhere, cwds=[cwd])
    assert not elsewhere.exists()
    assert (tmp_path / "elsewhere" / "runs").is_dir()  # not below the working directory


def test_under_torchrun_a_run_dir_holding_only_other_ranks_logs_is_new(tmp_path, monkeypatch):
    """torchrun's rank 1 may make the run dir (for its log) before rank 0's preflight looks:
    that dir is this run's. Anything else in it, or an empty dir, existed before."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_config([f"hydra.run.dir={run_dir}"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.run_dir_existed(cfg)  # empty: the user's
    (run_dir / "train_rank_1.log").write_text("")
    assert not train.run_dir_existed(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train.run_dir_existed(cfg)  # (one process: no other rank made it)
    monkeypatch.setenv("WORLD_SIZE", "2")
    (run_dir / "store").mkdir()
    assert train.run_dir_existed(cfg)


def _stop(err, monkeypatch, *, rank: int, stop, **where):
    """train.stop_on_error on ``rank``, rank 0's word ``stop`` (await_rank_zero_stop's value);
    (exit status, what rank 0 was told, whether the rank said it tidied up)."""
    told, tidied = [], []
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(train.distributed, "rank_zero_stopped", told.append)
    monkeypatch.setattr(train.distributed, "await_rank_zero_stop", lambda: stop)
    monkeypatch.setattr(train.distributed, "tidied_up", lambda: tidied.append(True))
    with pytest.raises(SystemExit) as exit_:
        train.stop_on_error(err, 2, **where)
    return exit_.value.code, told, bool(tidied)


def test_rank_0_says_the_error_then_removes_the_stub_then_tells_the_others(tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.setattr(train, "RUN_DIR_EXISTED", False)
    run_dir = stub(tmp_path / "run")
    code, told, _ = _stop(ConfigError("bad data"), monkeypatch, rank=0, stop=None,
                          run_dir=run_dir, cwds=[tmp_path])
    assert code == 2 and capsys.readouterr().err == "error: bad data\n"
    assert not run_dir.exists()
    assert told == [train.distributed.RankZeroStop("bad data", removed=True)]
    run_dir = stub(tmp_path / "kept")
    monkeypatch.setattr(train, "RUN_DIR_EXISTED", True)
    _, told, _ = _stop(ConfigError("bad data"), monkeypatch, rank=0, stop=None,
                       run_dir=run_dir, cwds=[tmp_path])
    assert run_dir.is_dir() and told == [train.distributed.RankZeroStop("bad data", False)]


def test_a_rank_above_0_stops_after_rank_0_and_removes_its_own_log(tmp_path, monkeypatch,
                                                                  capsys):
    stop = train.distributed.RankZeroStop
    # rank 0 removed the stub; this rank's Hydra made its log after: the log and dir go
    run_dir = tmp_path / "outputs" / "run"
    run_dir.mkdir(parents=True)
    log = run_dir / "train_rank_1.log"
    log.write_text("")
    code, told, tidied = _stop(ConfigError("bad data"), monkeypatch, rank=1,
                               stop=stop("bad data", True), run_dir=run_dir, cwds=[tmp_path],
                               own_log=log)
    assert code == 2 and told == [] and tidied
    assert capsys.readouterr().err == ""  # (rank 0 said it)
    assert not (tmp_path / "outputs").exists() and tmp_path.is_dir()
    # rank 0 kept the directory: so does this rank, and its log
    run_dir.mkdir(parents=True)
    log.write_text("")
    _stop(ConfigError("bad data"), monkeypatch, rank=1, stop=stop("bad data", False),
          run_dir=run_dir, own_log=log)
    assert log.is_file()
    # rank 0 stopped on another error, or did not stop: this rank says its own
    _stop(ConfigError("bad data"), monkeypatch, rank=1, stop=stop("other", False))
    assert capsys.readouterr().err == "error (rank 1): bad data\n"
    _stop(ConfigError("bad data"), monkeypatch, rank=1, stop=False)
    assert capsys.readouterr().err == "error (rank 1): bad data\n"
    # without torchrun's store (Lightning's launcher): silent, as before
    _stop(ConfigError("bad data"), monkeypatch, rank=1, stop=None)
    assert capsys.readouterr().err == ""


def test_rank_0_says_another_ranks_error_as_that_ranks_and_logs_it(tmp_path, monkeypatch,
                                                                   capsys):
    """A bad image in rank 1's shard: rank 0 says it once, naming rank 1, with rank 1's status;
    the run dir (a fit had begun: not a stub) stays and its log ends with the line."""
    monkeypatch.setattr(train, "RUN_DIR_EXISTED", False)
    run_dir = tmp_path / "run"
    (run_dir / "store").mkdir(parents=True)
    handler = logging.FileHandler(run_dir / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        err = train.distributed.PeerStopped(1, "cannot read image x.jpg", 2)
        code, told, _ = _stop(err, monkeypatch, rank=0, stop=None, run_dir=run_dir,
                              cwds=[tmp_path])
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert capsys.readouterr().err == "error (rank 1): cannot read image x.jpg\n"
    assert code == 2 and told == [train.distributed.RankZeroStop("cannot read image x.jpg",
                                                                 removed=False)]
    assert (run_dir / "train.log").read_text() == "error (rank 1): cannot read image x.jpg\n"
    # rank 1, told rank 0's line: silent; a rank above 0 whose rank 0 never said it names the
    # rank that met the error, not itself
    stop = train.distributed.RankZeroStop
    _stop(err, monkeypatch, rank=1, stop=stop("cannot read image x.jpg", False))
    assert capsys.readouterr().err == ""
    _stop(train.distributed.PeerStopped(1, "bad", 2), monkeypatch, rank=2, stop=False)
    assert capsys.readouterr().err == "error (rank 1): bad\n"


def test_a_run_dir_known_only_later_is_taken_as_new_or_as_existing(tmp_path):
    """A timestamped run dir is new even where the folder its timestamp names exists now (it
    is resolved again when Hydra makes it); one that does not resolve before the run counts as
    existing (never removed)."""
    import time

    year = time.localtime().tm_year
    for y in (year, year + 1):  # (a run on New Year's Eve)
        (tmp_path / str(y)).mkdir()
    assert not train.run_dir_existed(compose_config([f"hydra.run.dir={tmp_path}/${{now:%Y}}"]))
    assert train.run_dir_existed(compose_config(
        [f"hydra.run.dir={tmp_path}/${{oc.env:CWPS_NO_SUCH_VARIABLE}}"]))


# -- a whole run, in-process (one task, timm's tiny ResNet on 8x8 images, one epoch a fit) --------
def tiny_run(run_dir: Path, *overrides: str) -> dict:
    from .integration.helpers import compose_run_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.run(compose_run_config(
            run_dir, "data.tasks=[optdigits]", "cwps.baselines=[]", "model.name=test_resnet",
            "data.image_size=8", "logger.kind=none", f"paths.cache_dir={run_dir.parent / 'cache'}",
            *overrides))
    finally:
        torch.set_num_threads(threads)


def test_a_finished_run_is_complete_keeps_no_checkpoints_and_resumes_from_its_store(
        tmp_path, monkeypatch):
    """Its manifest says complete and its epoch checkpoints go; run again, it takes T0 from
    its store (the T0 its tasks were trained from, even where the cache is gone), not from the
    cache or a new pretraining, and leaves another config's checkpoints in the run dir be."""
    summaries = []
    monkeypatch.setattr(train, "log_job_summary", lambda *args: summaries.append(args))
    run_dir = tmp_path / "run"
    first = tiny_run(run_dir, "trainer.enable_checkpointing=true")
    manifest = json.loads((run_dir / "store" / "manifest.json").read_text())
    assert manifest["run"]["complete"] is True
    assert not (run_dir / "checkpoints").exists()
    assert summaries == []  # (logger.kind=none: no W&B summary run)

    other = run_dir / "checkpoints" / "0123456789ab" / "cwps" / "optdigits-it0-mask"
    other.mkdir(parents=True)
    (other / "last.ckpt").write_bytes(b"another config's")
    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setattr(train, "acquire_t0", lambda *args: pytest.fail("T0 acquired again"))
    again = tiny_run(run_dir, "trainer.enable_checkpointing=true")
    assert again["t0"] == {**first["t0"], "restored_from": str(run_dir / "store")}
    assert "val_top1" in first["t0"]
    assert again["methods"]["cwps"]["tasks"] == first["methods"]["cwps"]["tasks"]
    assert (other / "last.ckpt").read_bytes() == b"another config's"


def test_a_failing_wandb_summary_run_leaves_the_results(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train, "wandb_logger_factory",
                        lambda cfg, settings, run_dir: lambda group, name: False)

    def down(*args):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(train, "log_job_summary", down)
    with caplog.at_level(logging.ERROR, logger="cwps_lightning"):
        results = tiny_run(tmp_path / "run", "logger.kind=wandb", "logger.mode=offline")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["methods"] == json.loads(
        json.dumps(results["methods"]))
    assert "W&B summary run failed (RuntimeError: W&B is down)" in caplog.text


class UnreadableTask(MultiTaskDataModule):
    """A benchmark whose one task turns out bad only when its images are read."""

    default_tasks = ("t",)

    def __init__(self, image_size=None, limit_per_task=None, **kwargs):
        super().__init__(**kwargs)

    def build_tasks(self):
        raise DataConfigError("task 't': its images do not decode")


def test_data_found_bad_on_reading_stops_the_run_before_t0_is_acquired(tmp_path, monkeypatch):
    """(T0 may be a download or a pretraining: the data's error comes first, nothing written)"""
    monkeypatch.setattr(train, "acquire_t0", lambda *args: pytest.fail("T0 before the data"))
    with pytest.raises(ConfigError, match="its images do not decode"):
        tiny_run(tmp_path / "run", f"data._target_={__name__}.UnreadableTask", "data.tasks=[t]")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_between_fits_stops_with_the_line_a_fit_gives(job_dir):
    """Ctrl-C in a test pass, CPMS or a store write (outside a fit, which turns it into
    RunInterrupted itself) printed a KeyboardInterrupt traceback of over 100 lines."""
    run_dir, wandb = job_dir

    def task(cfg):
        raise KeyboardInterrupt

    try:  # (a KeyboardInterrupt let through would end the whole pytest session)
        with pytest.raises(RunInterrupted) as raised:
            train.task_wrapper(task)(None)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt went through the wrapper")
    assert str(raised.value) == (f"stopped by Ctrl-C (SIGINT) outside a training loop; "
                                 f"{NO_STORE_YET}: the same command resumes the run")
    assert raised.value.status == 130 and train.exit_status(raised.value) == 130
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert wandb.finished == 1
    (run_dir / "store").mkdir()
    # a first save cut short leaves a folder without a manifest: still no task stored (it
    # said the store keeps the tasks finished before)
    (run_dir / "store" / "kernels-000000.safetensors").write_bytes(b"part")
    with pytest.raises(RunInterrupted, match=f"training loop; {NO_STORE_YET}: the same"):
        train.task_wrapper(task)(None)
    (run_dir / "store" / "manifest.json").write_text("{}")
    with pytest.raises(RunInterrupted, match=f"training loop; {STORE_KEEPS}: the same"):
        train.task_wrapper(task)(None)


def test_sigterm_between_fits_stops_with_one_line_and_a_fits_handler_keeps_it(job_dir):
    """SIGTERM in a test pass, CPMS or a store write ended the process by the default action:
    status 143 with no word. Inside a fit, Lightning's handler calls the one it found after
    its own (the fit stops at the next batch): that one must not raise there."""
    import os
    import signal

    run_dir, _ = job_dir
    seen = []

    def task(cfg):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        found = signal.getsignal(signal.SIGTERM)

        def fits_handler(signum, frame):  # (Lightning's: its own, then the one it found)
            seen.append(signum)
            found(signum, frame)

        signal.signal(signal.SIGTERM, fits_handler)
        os.kill(os.getpid(), signal.SIGTERM)  # (handled before the next line runs)
        signal.signal(signal.SIGTERM, found)  # (the fit's teardown)
        seen.append("fit went on")
        os.kill(os.getpid(), signal.SIGTERM)
        seen.append("not reached")

    with pytest.raises(RunInterrupted) as raised:
        train.task_wrapper(task)(None)
    assert seen == [signal.SIGTERM, "fit went on"]
    assert str(raised.value) == (f"stopped by SIGTERM outside a training loop; "
                                 f"{NO_STORE_YET}: the same command resumes the run")
    assert raised.value.status == 143 and train.exit_status(raised.value) == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # (restored after the job)
    # where SIGTERM has a handler already (a launcher's), that one stays
    mine = lambda signum, frame: seen.append("launcher's")  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        train.task_wrapper(lambda cfg: os.kill(os.getpid(), signal.SIGTERM))(None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen[-1] == "launcher's"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # (the point)
def test_a_sigterm_a_finaliser_swallowed_stops_the_job_at_its_end(job_dir):
    """(the handler's exception raised in a __del__, a DataLoader iterator joining its
    workers, is printed and dropped by Python: the job went on as if no signal came)"""
    import os
    import signal

    class Joins:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    done = []

    def task(cfg):
        it = Joins()
        del it
        done.append("went on")

    with pytest.raises(RunInterrupted, match=r"^stopped by SIGTERM outside a training loop"):
        train.task_wrapper(task)(None)
    assert done == ["went on"]


@pytest.mark.parametrize("ranks", ["1", "2"])
def test_sigterm_in_a_job_of_several_ranks_ends_the_process_as_before(ranks, tmp_path):
    """A rank waiting in a collective runs no Python handler until it ends, and the ranks
    would not stop together: there the signal keeps its default action."""
    import os
    import signal
    import subprocess

    # rank 0 under Lightning's launcher passes it on to the ranks it started (signalled
    # alone, it left them running, to fail in their next collective 17 s later)
    code = ("import os, signal, sys\n"
            "from cwps_lightning import distributed\n"
            "from cwps_lightning.train import sigterm_stops_the_job\n"
            "class Launcher:\n"
            "    procs = [object()]\n"
            "    def kill(self, signum):\n"
            "        open(sys.argv[1], 'w').write(str(signum))\n"
            "distributed.remember_launcher(Launcher())\n"
            "with sigterm_stops_the_job():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n")
    marker = tmp_path / "forwarded"
    proc = subprocess.run([sys.executable, "-c", code, str(marker)], capture_output=True,
                          text=True, env={**os.environ, "WORLD_SIZE": ranks}, timeout=120)
    if ranks == "2":
        assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
        assert marker.read_text() == str(int(signal.SIGTERM))
    else:
        assert proc.returncode == 1 and "_Terminated" in proc.stderr, proc.stderr[-2000:]
        assert not marker.exists()  # (one process: the job stops itself, nothing to pass on)


def test_the_job_refuses_an_unused_resize_size_the_checks_before_it_could_not_see(tmp_path):
    """A job submitted to a cluster checks its settings only before the submission: folder
    tasks found on a disk this machine cannot see left data.resize_size unchecked, and the
    build (which the job's own check leaves the data to) no longer checks it."""
    from .data.helpers import make_folder_task

    for task in ("t1", "t2"):
        make_folder_task(tmp_path / task)
    cfg = compose_config(["data=folders", f"data.root={tmp_path}", "data.transform=resize",
                          "data.resize_size=300", "data.image_size=32", "data.num_workers=0"])
    from cwps_lightning.config import instantiate_data

    instantiate_data(cfg).check_settings(here=False)  # (the remote check cannot tell)
    with pytest.raises(DataConfigError, match=r"data\.resize_size=300 is not used"):
        train.build_data(cfg)
