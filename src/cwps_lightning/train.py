"""Entry point: ``python -m cwps_lightning.train [overrides]`` (Hydra).

check the config (every job of a sweep, before any runs) -> data -> T0 -> CWPS (+ baselines)
-> results.json / results.md. Exit status: 0 done, 2 bad configuration or input (one
``error:`` line, nothing written), 3 training diverged (one ``error:`` line naming the task,
fit, epoch and step; the store keeps the tasks finished before), 143 / 130 SIGTERM / Ctrl-C
stopped the job, in a fit or between fits (one ``error:`` line; the same command resumes), 1
anything else (a traceback).
Under DDP an error one rank meets alone stops every rank with that rank's status, and rank 0
says it (``error (rank <i>): ...``).

Under DDP every rank runs this whole job (distributed.py says how they stay in step); only
rank 0 writes the store, results, figures and the T0 cache, and only rank 0 logs below
warnings.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from . import distributed
from .checks import (
    SLURM_LAUNCHER,
    JobSettings,
    check_config,
    check_directory,
    check_launch,
    launcher_kind,
)
from .config import compose_config, instantiate_data
from .cwps import MultiTaskStore, StoreError
from .cwps.store import MANIFEST
from .errors import DIVERGED_RUN_DIR, NO_STORE_YET, STORE_KEEPS, ConfigError
from .fitting import (
    FitSettings,
    RunInterrupted,
    TrainingDiverged,
    csv_logger_factory,
    eval_device,
)
from .fs import RunDirBusy, RunDirLock
from .methods.base import Method
from .methods.registry import method_class
from .persist import RunRecorder, check_run_dir_reuse
from .pretrain import acquire_t0
from .report import add_figures, assemble_results, write_results
from .runner import MethodResult, Runner
from .sweep import FAILED_JOBS, SweepJobFailed, error_line
from .timing import Stopwatch
from .wandb_log import close_run, log_job_summary, wandb_logger_factory

log = logging.getLogger("cwps_lightning")


def quiet_lightning() -> None:
    """Lightning prints device banners at every Trainer; this run makes many Trainers."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")


#: the project's own stops: said as one line, no traceback
STOPS = (ConfigError, StoreError, TrainingDiverged, RunInterrupted, distributed.PeerStopped)


def exit_status(err: BaseException) -> int:
    """The run's exit status for ``err``: 2 bad input; a stopped fit's own (3 diverged, 143 /
    130 a signal); another rank's error: that rank's; 1 anything else (whatever attribute
    ``status`` it has: an HTTP error's is no exit status)."""
    if isinstance(err, ConfigError | StoreError):
        return 2
    return err.status if isinstance(err, STOPS) else 1


def _failed_collective(err: BaseException) -> bool:
    """Whether ``err`` is the backend's: a collective this rank was in failed (gloo raises a
    plain RuntimeError naming itself, NCCL a DistBackendError)."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and "gloo" in str(err))


def is_rank_zero() -> bool:
    return distributed.rank() == 0


def quiet_other_ranks() -> None:
    """Ranks above 0 run the same job: their INFO lines would repeat rank 0's."""
    if not is_rank_zero():
        logging.getLogger().setLevel(logging.WARNING)
        log.setLevel(logging.WARNING)


def logger_factory(cfg: DictConfig, job: JobSettings, run_dir: Path):
    """A Lightning logger per fit (group = method, name = fit), or False for none."""
    settings = job.logger
    if settings.kind == "csv":
        return csv_logger_factory(run_dir / "logs")
    if settings.kind == "wandb":
        return wandb_logger_factory(cfg, settings, run_dir)
    return lambda group, name: False


class _Terminated(BaseException):
    """SIGTERM outside a training loop, raised where the job is as Ctrl-C raises
    KeyboardInterrupt (a BaseException: ``except Exception`` on the way does not take it)."""


@contextlib.contextmanager
def sigterm_stops_the_job():
    """SIGTERM outside a fit stops the job as Ctrl-C does, with one error line and status 143
    (the default action ended the process without a word). A fit's own handling stands: Lightning
    installs its handler for the fit and calls the one it found after its own, so this one
    raises only when it is the process's handler itself. Installed where SIGTERM has its
    default action, from the main thread. Where the signal cannot be taken this way it ends
    the process as before: in a forked process (a DataLoader worker), and in a job of several
    ranks (a rank waiting in a collective runs no Python handler until the collective ends,
    and the ranks would not stop together); rank 0 under Lightning's launcher passes it on to
    the ranks it started, as a fit's handler does. A signal whose exception a finaliser swallowed
    (one raised in a ``__del__`` is printed and dropped) stops the job when it ends."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    pid = os.getpid()
    received = []

    def handler(signum, frame) -> None:
        received.append(signum)
        if signal.getsignal(signal.SIGTERM) is not handler:
            return  # a fit's handler called this one: the fit stops itself
        forked = os.getpid() != pid
        if forked or distributed.active() or distributed.world_size_from_env() > 1:
            if not forked:
                distributed.forward_signal(signum)  # (the ranks Lightning started from here)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
        if received:
            raise _Terminated
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def task_wrapper(task: Callable[[DictConfig], dict]) -> Callable[[DictConfig], dict]:
    """Say where a job's outputs are, whatever happens to it, and close its loggers."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> dict:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        failed = None  # (the job's exit status, for its W&B run: a failed run is marked so)
        try:
            try:
                with sigterm_stops_the_job():
                    results = task(cfg)
            except (KeyboardInterrupt, _Terminated) as stop:
                # (a fit's training loop turns a signal into RunInterrupted itself; here it
                # came elsewhere: a test pass, CPMS, a store write, ...)
                name, signum = (("Ctrl-C (SIGINT)", signal.SIGINT)
                                if isinstance(stop, KeyboardInterrupt)
                                else ("SIGTERM", signal.SIGTERM))
                raise RunInterrupted(f"stopped by {name} outside a training loop; "
                                     f"{STORE_KEEPS}: the same command resumes the run",
                                     signum) from None
        except Exception as err:
            failed = exit_status(err)
            own = isinstance(err, STOPS)
            if isinstance(err, TrainingDiverged | RunInterrupted) and err.args and \
                    STORE_KEEPS in str(err.args[0]):
                if not (run_dir / "store" / MANIFEST).is_file():  # (a first save cut short
                    # left a folder without one: no task is stored)
                    err.args = (str(err.args[0]).replace(STORE_KEEPS, NO_STORE_YET),
                                *err.args[1:])
                elif isinstance(err, TrainingDiverged):  # (the same run dir refuses a lower
                    # learning rate: its store was written under these settings)
                    err.args = (f"{err.args[0]}, {DIVERGED_RUN_DIR}", *err.args[1:])
            # under DDP: a failed collective may be another rank's stop (its word is in the
            # store), whose error is the run's; an error every rank meets (a bug) stays each
            # rank's own
            peer = distributed.peer_error() if _failed_collective(err) else None
            if peer is not None and peer.line != error_line(err):
                failed = exit_status(peer)
                distributed.close_group()  # (a third rank may be waiting for this one)
                raise peer from None  # (the CLI prints its line)
            if not isinstance(err, RunInterrupted):  # (a signal stops every rank together)
                distributed.announce_error(str(err) if own else error_line(err),
                                           exit_status(err), type(err).__name__ if own else "")
            if own:
                raise  # the CLI prints the one line
            log.error("the job failed (%s: %s); its outputs so far: %s",
                      type(err).__name__, err, run_dir)
            if not _in_multirun():  # (a sweep's job fails alone: no rank waits there)
                _stop_together_on_a_crash(error_line(err))
            raise
        finally:
            # (after the other ranks were told: W&B's finish may take long online, and they
            # wait for rank 0's word a limited time)
            close_run(failed)
        log.info("outputs: %s", run_dir)
        return results

    return wrapped


def _in_multirun() -> bool:
    from hydra.types import RunMode

    return getattr(HydraConfig.get(), "mode", None) == RunMode.MULTIRUN


def _stop_together_on_a_crash(line: str) -> None:
    """After announce_error of an unexpected error (a traceback follows): the ranks stop
    together as on one of the project's own (stop_on_error), so that torchrun does not cut
    rank 0 off before it said the error. Nothing on one process."""
    if distributed.world_size() <= 1:
        return
    if is_rank_zero():
        distributed.rank_zero_stopped(distributed.RankZeroStop(line, removed=False))
    else:
        distributed.await_rank_zero_stop()
        distributed.tidied_up()


# -- the steps of a run -------------------------------------------------------------------------
def build_data(cfg: DictConfig):
    """The benchmark's DataModule with every task's splits built (bad tasks / roots fail here)."""
    datamodule = instantiate_data(cfg)
    for task in datamodule.task_names:
        datamodule.num_classes(task)
    # (the checks before the run skip it where the task names come from a disk they cannot
    # see: a job submitted to a cluster)
    unused_resize = getattr(datamodule, "check_resize_used", None)
    if unused_resize is not None:
        unused_resize()
    return datamodule


def fit_settings_of(cfg: DictConfig, job: JobSettings, run_dir: Path,
                    config_hash: str = "", stopwatch: Stopwatch | None = None) -> FitSettings:
    """``trainer.enable_checkpointing=true``: epoch checkpoints of every fit under
    <run dir>/checkpoints/<config hash>/ (a run dir reused by another config never picks up
    this one's), so a killed run continues inside the fit it was in."""
    o = job.optim
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    checkpoints = (run_dir / "checkpoints" / config_hash[:12]
                   if trainer.get("enable_checkpointing") else None)
    return FitSettings(
        trainer=trainer,
        lr=o.lr, mask_lr=o.mask_lr, momentum=o.momentum, weight_decay=o.weight_decay,
        logger_factory=logger_factory(cfg, job, run_dir), channels_last=job.model.channels_last,
        checkpoint_dir=checkpoints, stopwatch=stopwatch,
        compile_mode=job.model.compile_mode if job.model.compile else None,
    )


def methods_of(job: JobSettings) -> list[Method]:
    """CWPS, then every baseline the config lists, each configured by its settings."""
    return [method_class(name).from_settings(job) for name in ["cwps", *job.cwps.baselines]]


@task_wrapper
def run(cfg: DictConfig) -> dict:
    quiet_lightning()
    quiet_other_ranks()
    job = check_config(cfg, data=False)  # (build_data below checks the data)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    torch.manual_seed(cfg.seed)
    started = time.time()

    c = job.cwps
    recorder = RunRecorder(
        run_dir, cfg, backbone={"name": job.model.name, "kwargs": dict(job.model.kwargs)},
        cwps_meta={"mode": c.mode, "iterations": c.iterations, "threshold": c.threshold,
                   "distance": c.distance},
    )
    store = recorder.existing()
    datamodule = build_data(cfg)
    stopwatch = Stopwatch()
    fit_settings = fit_settings_of(cfg, job, run_dir, recorder.hash, stopwatch)
    device = eval_device(cfg.trainer.accelerator, cfg.trainer.devices)
    recorder.device = device
    with stopwatch.timed("t0"):
        if store is not None:
            t0_model = recorder.t0_from(store)
            t0_info = {**recorder.t0_info, "restored_from": str(recorder.store_dir)}
        else:
            t0_model, t0_info = acquire_t0(cfg, datamodule, fit_settings, device)
            recorder.t0_info = t0_info

    methods: dict[str, MethodResult] = {}

    def persist(_result=None, complete=False):
        if is_rank_zero():
            recorder.save(methods, complete=complete)

    runner = Runner(datamodule, t0_model, fit_settings, epochs=c.total_epochs, seed=cfg.seed,
                    device=device, on_task_done=persist)
    to_run = methods_of(job)
    methods.update(recorder.restore(store, runner, to_run) if store is not None else {})
    runner.run(to_run, methods)
    persist(complete=True)
    if fit_settings.checkpoint_dir is not None and is_rank_zero():  # every task is stored
        shutil.rmtree(fit_settings.checkpoint_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # <run dir>/checkpoints, unless other configs' remain
            fit_settings.checkpoint_dir.parent.rmdir()

    # read back once, by the rank that wrote it: CWPS's parameter count and the figures
    saved = MultiTaskStore.load(recorder.store_dir) if is_rank_zero() else None
    results = assemble_results(
        cfg, type(datamodule).__name__, datamodule.task_names, methods, to_run, c,
        runner.backbone_params, t0_info, recorder.store_dir, seconds=time.time() - started,
        device=device, saved=saved, ranks=recorder.ranks_over_attempts(),
    )
    if is_rank_zero():
        with stopwatch.timed("figures"):
            add_figures(run_dir, results, saved)
        results["time_split"] = stopwatch.split(time.time() - started)
        write_results(run_dir, results)
        if job.logger.kind == "wandb":
            try:
                log_job_summary(cfg, job.logger, run_dir, results, recorder.store_dir)
            except Exception as err:  # noqa: BLE001 - the job's results are written already
                log.error("W&B summary run failed (%s: %s); the results are in %s",
                          type(err).__name__, err, run_dir)
        log.info("results: %s", run_dir / "results.md")
        print((run_dir / "results.md").read_text())
    return results


#: what Hydra puts in a run directory before the job starts: its config and the job's log
#: (torchrun's other ranks and Lightning's DDP processes log beside rank 0: train_rank_<i>.log)
HYDRA_STUB = re.compile(r"\.hydra|train(_rank_\d+|_ddp_process_\d+)?\.log")
#: the log of a torchrun rank above 0 (its Hydra writes nothing else)
OTHER_RANKS_LOG = re.compile(r"train_rank_\d+\.log")


#: whether the run directory of this command's (single) run existed before Hydra ran: set by
#: preflight; a directory that did is never removed (remove_if_stub)
RUN_DIR_EXISTED = True


def run_dir_existed(cfg: DictConfig) -> bool:
    """Whether ``hydra.run.dir`` exists before the run; a timestamped one (``${now:...}``,
    the default) is taken as new (it is resolved again, a moment later, when Hydra makes it);
    one that does not resolve here counts as existing. Under torchrun one that holds only
    the other ranks' logs is new (their Hydra may run ahead of this rank's preflight)."""
    raw = OmegaConf.to_container(cfg.hydra.run, resolve=False).get("dir")
    if isinstance(raw, str) and "${now:" in raw:
        return False
    run_dir = _resolved(cfg, "hydra.run.dir")
    if not isinstance(run_dir, str):
        return True
    path = Path(run_dir)
    if distributed.world_size_from_env() > 1 and path.is_dir():
        # torchrun's other ranks may have made it a moment ago, for their logs
        entries = list(path.iterdir())
        return not entries or not all(OTHER_RANKS_LOG.fullmatch(p.name) for p in entries)
    return path.exists()


def remove_if_stub(run_dir: Path, cwds: Sequence[Path] = ()) -> bool:
    """A run that stopped on bad input before writing anything of its own (data that had to
    be read to be found wrong) leaves no run directory: Hydra's files alone are no output.
    Only a directory this run made goes (not one that existed before, RUN_DIR_EXISTED, nor
    a working directory ``cwds`` or one above it), and only with nothing more in it than
    Hydra's files (a store, logs, a resumed run's outputs stay). True if it went."""
    try:
        here, inside = run_dir.resolve(), [c.resolve() for c in cwds]
        if RUN_DIR_EXISTED or any(c == here or here in c.parents for c in inside):
            return False
        if here.is_dir() and all(HYDRA_STUB.fullmatch(p.name) for p in here.iterdir()):
            shutil.rmtree(here)
            _remove_empty_parents(here, inside)
            return True
    except OSError:
        pass  # (the error line matters more than the cleanup)
    return False


def _remove_empty_parents(here: Path, inside: Sequence[Path]) -> None:
    """The folders Hydra made above a removed run directory (outputs/runs of a first run),
    while empty, up to the working directory ``inside``."""
    for parent in here.parents:
        if not any(c in parent.parents for c in inside) or any(parent.iterdir()):
            break
        parent.rmdir()


def remove_own_log(log_file: Path, cwds: Sequence[Path] = ()) -> None:
    """A rank above 0, after rank 0 removed the run's stub directory: its own log goes, and
    the directory if that leaves it empty (the rank's Hydra made both after the removal)."""
    try:
        log_file.unlink(missing_ok=True)
        here = log_file.parent.resolve()
        if here.is_dir() and not any(here.iterdir()):
            here.rmdir()
            _remove_empty_parents(here, [c.resolve() for c in cwds])
    except OSError:
        pass


def _to_log_file(line: str) -> None:
    """``line`` in the job's log file (Hydra's file handler; none before Hydra runs), not on
    the console, which has it on stderr: a run directory that stays says why the run ended."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def stop_on_error(err: BaseException, status: int, run_dir: Path | None = None,
                  cwds: Sequence[Path] = (), own_log: Path | None = None) -> NoReturn:
    """The end of a run stopped by ``err`` (bad input, a diverged loss): rank 0 prints its
    ``error:`` line, then removes the run directory if it is a stub (``run_dir``; None: kept);
    every rank exits with ``status``. Under torchrun the ranks stop together
    (distributed.rank_zero_stopped): a rank above 0 exits after rank 0, says its own error
    only where rank 0 did not meet it, and removes its ``own_log`` where rank 0 removed the
    directory."""
    # whose error it is: another rank's (distributed.PeerStopped), or this one's
    who = err.peer if isinstance(err, distributed.PeerStopped) else distributed.rank()
    if is_rank_zero():
        line = f"error{f' (rank {who})' if who else ''}: {err}"
        print(line, file=sys.stderr, flush=True)
        removed = run_dir is not None and remove_if_stub(run_dir, cwds)
        if not removed:
            _to_log_file(line)
        distributed.rank_zero_stopped(distributed.RankZeroStop(str(err), removed))
    else:
        stop = distributed.await_rank_zero_stop()
        if stop is False or (stop and stop.line != str(err)):
            print(f"error (rank {who}): {err}", file=sys.stderr, flush=True)
        if stop and stop.removed and own_log is not None:
            remove_own_log(own_log, cwds)
        distributed.tidied_up()
    sys.exit(status)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | tuple[float, float]:
    try:
        # (rank 0 holds the run dir for the job; the other ranks work in it under its lock)
        with RunDirLock(HydraConfig.get().runtime.output_dir) if is_rank_zero() \
                else contextlib.nullcontext():
            results = run(cfg)
    except STOPS as err:
        hydra_cfg = HydraConfig.get()
        if _in_multirun() and not isinstance(err, RunInterrupted):
            # Hydra records the job as failed and runs the others (the basic sweeper; the Optuna
            # preset with max_failure_rate: 1.0); sweep.py reports it. A signal stops the
            # whole sweep (the process exits below; the job is listed as incomplete)
            raise SweepJobFailed(error_line(err), hydra_cfg.job.get("num", 0)) from err
        runtime = hydra_cfg.runtime
        status = exit_status(err)
        stop_on_error(err, status,
                      # (bad input may leave a stub run dir; a run stopped in a fit (3, 143,
                      # 130) keeps it: its log is its story)
                      run_dir=Path(runtime.output_dir)
                      if status == 2 and not isinstance(err, RunDirBusy) else None,
                      cwds=(Path.cwd(), Path(runtime.cwd)),
                      own_log=Path(runtime.output_dir) / f"{hydra_cfg.job.name}.log")
    # what a Hydra sweeper optimises: CWPS mean top-1, and with two directions declared
    # (hparams_search=cwps_optuna) also its param_ratio
    cwps = results["methods"]["cwps"]
    directions = HydraConfig.get().sweeper.get("direction")
    if isinstance(directions, Sequence | ListConfig) and not isinstance(directions, str) \
            and len(directions) == 2:
        return cwps["mean_top1"], cwps["param_ratio"]
    return cwps["mean_top1"]


# -- checks before Hydra runs anything ------------------------------------------------------------
def basic_sweeper(cfg: DictConfig) -> bool:
    """Whether ``cfg``'s sweeper is Hydra's basic one (its jobs known before they run)."""
    return str(cfg.hydra.sweeper.get("_target_", "")).rsplit(".", 1)[-1] == "BasicSweeper"


def _resolved(cfg: DictConfig, key: str):
    """``cfg``'s ``key`` resolved, or None where it resolves only in the running job (an
    interpolation of Hydra's runtime)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except (OmegaConfBaseException, ValueError):
        return None


def _sweep_plan(overrides: Sequence[str]) -> tuple[list, list[str], list, bool]:
    """A multirun's overrides parsed, the fixed ones (no sweep) as given, the sweeps (the
    command line's, then the config's ``hydra.sweeper.params`` it does not set), and whether
    the config's sweeper is the basic one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(list(overrides))
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    cfg = compose_config(fixed)
    given = {o.key_or_group for o in parsed}
    params = parser.parse_overrides([f"{k}={v}" for k, v in
                                     (cfg.hydra.sweeper.get("params") or {}).items()])
    sweeps = [o for o in parsed if o.is_sweep_override()] + [
        p for p in params if p.key_or_group not in given]
    basic = basic_sweeper(cfg)
    # (the config's params first, then the command line, as BasicSweeper lists them: its
    # split_arguments keeps a key where it first came and takes its last value, and so numbers
    # the jobs; check_sweep_job_dir reads job i's directory by that number)
    return params + parsed, fixed, sweeps, basic


def sweep_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """The override list of every job a basic-sweeper multirun of ``overrides`` would launch
    (command-line sweeps and the config's ``hydra.sweeper.params``)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    every, fixed, _, basic = _sweep_plan(overrides)
    if not basic:
        return [fixed]  # another sweeper chooses its jobs as it goes: check the fixed part
    batches = BasicSweeper.split_arguments(every, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def check_run_dir(cfg: DictConfig) -> None:
    """A run dir given as a path (``hydra.run.dir=...``, not the default's timestamp) whose
    store a different config wrote is refused here, before Hydra writes its .hydra/ files
    there; the run refuses it too (RunRecorder.existing), but by then those files record this
    config next to the other's results."""
    run_dir = _resolved(cfg, "hydra.run.dir")
    if isinstance(run_dir, str) and not run_dir.strip():  # (the working directory: an unset
        # $RUN_DIR in a script wrote the run into the checkout; "." says so on purpose)
        raise ConfigError("hydra.run.dir='': empty; give a directory (hydra.run.dir=. for the "
                          "working directory)")
    if run_dir:
        check_directory("hydra.run.dir", run_dir)
        if Path(run_dir).is_dir() and not os.access(run_dir, os.W_OK):  # (Hydra's log
            # handler failed with a ValueError traceback)
            raise ConfigError(f"hydra.run.dir={run_dir}: not writable; give a directory the "
                              "run can write in")
        refuse_if_held(run_dir)
        check_run_dir_reuse(run_dir, cfg)


def refuse_if_held(run_dir) -> None:
    """A job running in ``run_dir`` (its RunDirLock): refused before Hydra writes there. Rank
    0 asks: a rank above 0 runs in rank 0's dir, under its lock."""
    if is_rank_zero():
        with RunDirLock(run_dir):
            pass


def check_sweep_job_dir(cfg: DictConfig, num: int) -> None:
    """A basic sweep's job ``num``: its directory (``hydra.sweep.dir/subdir``) may not hold
    a store another config wrote (rerunning a sweep with other values into a finished one's
    dir): refused before Hydra writes the sweep's and the jobs' records there."""
    sweep_dir = _resolved(cfg, "hydra.sweep.dir")
    if sweep_dir is None:
        return
    check_directory("hydra.sweep.dir", sweep_dir)  # (an empty one too: the working directory)
    if (Path(sweep_dir) / "results.json").is_file() or (Path(sweep_dir) / "store").is_dir():
        raise ConfigError(f"hydra.sweep.dir={sweep_dir}: a single run's directory (it holds "
                          "its results.json or store); give the sweep a directory of its own")
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir")
    if subdir != "${hydra.job.num}":  # (another layout: the job's own check finds it)
        return
    refuse_if_held(Path(sweep_dir) / str(num))
    check_run_dir_reuse(Path(sweep_dir) / str(num), cfg)


def search_space_probes(overrides: Sequence[str]) -> list[tuple[str, list[str]]]:
    """For a sweeper that picks its jobs as it goes (Optuna): one job at each end of every
    interval and range (its stop included, as Optuna samples it), and one per choice, of the
    command line's and the config's ``hydra.sweeper.params`` (the others at the fixed part), as
    (the probed override, the job's overrides). Empty for the basic sweeper (sweep_jobs)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

    _, fixed, sweeps, basic = _sweep_plan(overrides)
    if basic:
        return []
    probes = []
    for o in sweeps:
        sweep = o.value()
        if isinstance(sweep, IntervalSweep):
            values = [sweep.start, sweep.end]
        elif isinstance(sweep, RangeSweep):  # (Optuna's range includes its stop)
            values = list(dict.fromkeys([sweep.start, sweep.stop]))
        elif isinstance(sweep, ChoiceSweep):
            values = list(sweep.list)
        else:
            continue
        for value in values:  # (the key as given: ++ / + and an @package stay)
            line = f"{o.get_key_element()}={Override._get_value_element_as_str(value)}"
            probes.append((line, [*fixed, line]))
    return probes


def _parsed(plan, overrides: Sequence[str]):
    """``plan(overrides)`` (sweep_jobs, search_space_probes), an override Hydra cannot parse
    or expand (``cwps.threshold=0.3,``, ``seed=choice()``) as one ConfigError line."""
    from hydra.errors import HydraException

    try:
        return plan(overrides)
    except (HydraException, ValueError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()
                 and not ln.strip().startswith("See https://")]
        text = "; ".join(lines) or type(err).__name__
        given = getattr(err, "override", None)  # (Hydra's parse error names the override)
        if given and given not in text:
            text = f"{given}: {text}"
        raise ConfigError(f"the sweep's overrides: {text}") from None


def sweep_jobs_checked(overrides: Sequence[str]) -> list[list[str]]:
    """sweep_jobs, with parse errors and a sweep without a job (``range(0,0)``) refused."""
    jobs = _parsed(sweep_jobs, overrides)
    if not jobs:
        raise ConfigError("the sweep has no jobs (an empty range or choice in "
                          f"{' '.join(overrides)})")
    return jobs


def _mode_set_in_config(overrides: Sequence[str]) -> tuple[bool, DictConfig | None]:
    """Whether the config (a preset's file) sets ``hydra.mode=MULTIRUN``, which starts a
    multirun as -m does (Hydra reads the mode of the config composed without the sweeps), and
    the composed config when it does not and it is the single job's. Overrides that do not
    parse or compose: (False, None), for the job's own check to name."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        cfg = compose_config(fixed)
    except (HydraException, ValueError, ConfigError):
        return False, None
    if str(cfg.hydra.get("mode")).endswith("MULTIRUN"):
        return True, None
    return False, cfg if len(fixed) == len(overrides) else None


def preflight(argv: Sequence[str]) -> None:
    """Compose and check the config of every job the command would run, before Hydra runs
    any: a bad key, type, value or environment stops the command with one line."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(list(argv))
    if (args.help or args.hydra_help or args.info or args.cfg or args.shell_completion
            or args.config_path or args.config_dir or args.config_name or args.experimental_rerun):
        return  # Hydra's own commands, or another config tree: Hydra checks those
    # (hydra.mode=MULTIRUN on the command line starts a multirun as -m does)
    multirun = args.multirun or any(o.lstrip("+") == "hydra.mode=MULTIRUN"
                                    for o in args.overrides)
    composed = None  # (the single job's config, when composed to read its mode)
    if not multirun:
        multirun, composed = _mode_set_in_config(args.overrides)
    jobs = sweep_jobs_checked(args.overrides) if multirun else [list(args.overrides)]
    for i, overrides in enumerate(jobs):
        try:
            cfg = composed if composed is not None else compose_config(overrides)
            check_config(cfg, here=not (multirun and launcher_kind(cfg) == SLURM_LAUNCHER))
            check_launch(cfg, multirun=multirun, overrides=overrides)
            if multirun and basic_sweeper(cfg):
                check_sweep_job_dir(cfg, i)  # (its job numbers are these; Optuna's come later)
        except ConfigError as err:
            if len(jobs) == 1:
                raise
            raise ConfigError(f"job {i} of the sweep ({' '.join(overrides)}): {err}") from None
    if not multirun:
        check_run_dir(cfg)
        global RUN_DIR_EXISTED
        RUN_DIR_EXISTED = run_dir_existed(cfg)
    for probe, overrides in _parsed(search_space_probes, args.overrides) if multirun \
            else ():
        try:
            cfg = compose_config(overrides)
            check_config(cfg, here=launcher_kind(cfg) != SLURM_LAUNCHER)
        except ConfigError as err:
            raise ConfigError(f"the sweeper's search space, at {probe}: {err}") from None
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        preflight(argv)
    except ConfigError as err:
        stop_on_error(err, 2)
    if (distributed.world_size_from_env() > 1 and not is_rank_zero()
            and "hydra.output_subdir=null" not in sys.argv):
        # torchrun's other ranks share rank 0's run directory: Hydra must not write its
        # .hydra/ files or its log there a second time (Lightning's launcher does the same)
        sys.argv += ["hydra.output_subdir=null",
                     f"hydra.job.name=train_rank_{distributed.rank()}"]
    try:
        hydra_main()
    except SystemExit:  # (the basic sweeper's end: Hydra printed the first failed job's line)
        exit_if_jobs_failed()
        raise
    exit_if_jobs_failed()  # (a sweeper that tolerates failures: the Optuna preset)


def exit_if_jobs_failed() -> None:
    """At a multirun's end, with every job run: the failed ones named, and exit status 1."""
    if FAILED_JOBS:
        sweep_dir = FAILED_JOBS[0][0]
        print(f"error: {len(FAILED_JOBS)} job(s) of the sweep failed "
              f"({[job for _, job in FAILED_JOBS]}); see {sweep_dir}/sweep.md", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
