"""Everything about a run config that can be checked before any work starts.

``check_config`` turns the composed config into typed settings and checks what would otherwise
fail minutes into a run: the model name, a weights file, Trainer arguments, a GPU that is not
there, W&B without credentials, timm hub weights without network. Each failure is one
ConfigError line naming the key and what is accepted; the CLI prints it and exits 2.
"""

from __future__ import annotations

import inspect
import netrc
import os
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import distributed
from .config import (
    TRAINER_SET_BY_JOB,
    init_arguments,
    instantiate_data,
    locate,
    nearest_key,
    no_such_key,
    one_line,
    schema_keys,
    settings_of,
    trainer_arguments,
)
from .errors import ConfigError, as_typed
from .fs import file_in_the_way
from .methods.registry import BUILTIN, CWPS_ALWAYS_RUNS, method_class
from .models import check_model_name
from .models.backbone import check_weights_file
from .models.lit_module import step_compose_refusal
from .pretrain import t0_source_missing
from .settings import (
    CWPSSettings,
    LoggerSettings,
    MethodsSettings,
    ModelSettings,
    OptimSettings,
    T0Settings,
)

#: seconds to wait for the timm hub's host before calling it unreachable
HUB_TIMEOUT = 3.0
GPU_ACCELERATORS = ("gpu", "cuda")
OFFLINE_WANDB_MODES = ("offline", "disabled", "dryrun")
#: what wandb itself takes in WANDB_MODE (logger.mode takes settings.WANDB_MODES)
WANDB_ENV_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


@dataclass
class JobSettings:
    """The typed settings of one run (the config's checked sections)."""

    cwps: CWPSSettings
    methods: MethodsSettings
    optim: OptimSettings
    model: ModelSettings
    t0: T0Settings
    logger: LoggerSettings


def check_config(cfg: DictConfig, here: bool = True, data: bool = True) -> JobSettings:
    """``here``: the job runs on this machine (False: a launcher submits it elsewhere, so a GPU
    that this machine lacks is not an error). ``data`` False: leave the data to the caller,
    which builds it next (train.run: build_data checks the same and more)."""
    check_top_level_keys(cfg)
    job = JobSettings(
        cwps=settings_of(cfg.cwps, CWPSSettings, "cwps"),
        methods=settings_of(cfg.methods, MethodsSettings, "methods"),
        optim=settings_of(cfg.optim, OptimSettings, "optim"),
        model=settings_of(cfg.model, ModelSettings, "model"),
        t0=settings_of(cfg.t0, T0Settings, "t0"),
        logger=settings_of(cfg.logger, LoggerSettings, "logger"),
    )
    check_methods(job.cwps.baselines)
    taps_from, epochs = job.methods.taps.penalty_from_epoch, job.cwps.total_epochs
    if "taps" in job.cwps.baselines and taps_from >= epochs:  # (the gates never penalised:
        # TAPS ran as fine-tuning, 4.00x, under its own name)
        raise ConfigError(f"methods.taps.penalty_from_epoch={taps_from}: TAPS trains "
                          f"{epochs} epoch(s) a task (cwps.stages), so the gate penalty would "
                          f"never count; accepted: 0 to {epochs - 1}")
    check_model_name(job.model.name)
    try:
        seed = cfg.seed
    except OmegaConfBaseException as err:
        raise ConfigError(one_line(err)) from None
    check_seed(seed)
    check_model_build(job.model.name, dict(job.model.kwargs or {}), _image_size(cfg))
    check_single_image_batch(cfg, job)
    if isinstance(job.model.weights, str) and not job.model.weights.strip():
        # (it fell back to the benchmark's own T0 without a word: an unset $WEIGHTS in a
        # script ran another experiment)
        raise ConfigError(f"model.weights='{job.model.weights}': empty; give a T0 checkpoint "
                          "file, or null for the benchmark's own T0")
    if job.model.weights:
        check_weights_file(job.model.weights)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    check_trainer(trainer, gpus_here=here)
    if job.cwps.compose == "step":
        check_step_compose_trainer(trainer, gpus_here=here)
    if here and _on_cpu(trainer):
        if job.model.compile:
            check_cpp_compiler("model.compile=true", "set model.compile=false")
        if job.cwps.compose == "step":
            check_cpp_compiler("cwps.compose=step", "use cwps.compose=forward")
    check_logger(job.logger)
    if job.t0.cache:
        check_directory("paths.cache_dir", cfg.paths.cache_dir)
    if data:  # (before the hub: a wrong data.root is the first thing to fix, and offline the
        check_data(cfg, here)  # hub's line would hide it)
    if job.model.pretrained and not job.model.weights:
        check_hub_weights(job.model.name)
    return job


def _on_cpu(trainer: dict) -> bool:
    accelerator = str(trainer.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


_COMPILER_FOUND: list = []  # (a compiler found once is not looked for again in this process)


def check_cpp_compiler(setting: str, instead: str) -> None:
    """torch.compile's inductor builds C++ on the CPU: without a working compiler the job
    failed in its first compiled fit, after T0, with a traceback of a hundred lines."""
    if _COMPILER_FOUND:
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # (inductor's own search)
    except ImportError:  # (another torch: the compile says it itself)
        _COMPILER_FOUND.append(None)
        return
    try:
        _COMPILER_FOUND.append(get_cpp_compiler())
    except Exception as err:  # noqa: BLE001 - inductor's InvalidCxxCompiler and the like
        text = " ".join(str(err).split())[:200]
        raise ConfigError(f"{setting}: torch.compile needs a working C++ compiler on the CPU "
                          f"and found none ({type(err).__name__}: {text}); install one (g++; "
                          f"the CXX variable names it), or {instead}") from None


def check_top_level_keys(cfg: DictConfig) -> None:
    """A top-level key the run config has no use for (``+cwp.threshold=0.3``: Hydra adds it,
    and the run would go on without the setting meant)."""
    accepted = schema_keys("")
    extra = [str(k) for k in cfg.keys() if k not in accepted and k != "hydra"]
    if extra:
        raise ConfigError(no_such_key(extra[0], nearest_key("", extra[0], accepted), accepted))


def check_data(cfg: DictConfig, here: bool = True) -> None:
    """The data settings, task names and root (MultiTaskDataModule.check_settings): the data
    module is made (it reads nothing yet) and checks itself, and T0 has a source (the
    benchmark's pretraining task, or given weights). ``here`` False: a launcher submits the
    job elsewhere, whose disk this machine cannot see: the settings only. A DataModule of a
    user's own (a class without check_settings, or a factory function) is not made: its
    __init__ may do work (the job makes it once, in build_data); only that it takes the
    configured arguments is checked."""
    target = cfg.data.get("_target_") if isinstance(cfg.data, DictConfig) else None
    made_by = locate(target)
    if made_by is not None and not hasattr(made_by, "check_settings"):
        _check_arguments(made_by, target, cfg)
        return
    datamodule = instantiate_data(cfg)
    check = getattr(datamodule, "check_settings", None)
    if check is None:  # (what a _target_ that is not a name made: the job names it)
        return
    check(here)
    model = cfg.model
    if getattr(datamodule, "pretrain_task", None) is None and not (
            model.get("pretrained") or model.get("weights")):
        raise ConfigError(t0_source_missing(datamodule))


def _check_arguments(made_by, target: str, cfg: DictConfig) -> None:
    """``made_by(**data)`` binds (names and count of arguments), without calling it."""
    try:
        kwargs = {k: v for k, v in cfg.data.items() if not str(k).startswith("_")}
        args = list(cfg.data.get("_args_", ()))
    except OmegaConfBaseException as err:  # (an interpolation that does not resolve, ???)
        raise ConfigError(f"data: {one_line(err)}") from None
    try:
        inspect.signature(made_by).bind(*args, **kwargs)
    except TypeError as err:
        accepted = ", ".join(init_arguments(made_by))
        raise ConfigError(f"data={target}: {err}; accepted: {accepted}") from None
    except ValueError:  # (no signature to read: a builtin)
        pass


def check_directory(key: str, path) -> None:
    """``path`` is, or can be made, a directory: neither it nor a folder above it is a file
    (found otherwise only where the job first writes there, after its work: T0's cache)."""
    if isinstance(path, str) and not path.strip():  # (Path("") is the working directory:
        # paths.cache_dir= cached T0 in the checkout's top folder)
        raise ConfigError(f"{key}='{path}': empty; give a directory")
    if path is not None and (there := file_in_the_way(path)) is not None:
        raise ConfigError(f"{key}={path}: {there} is a file, not a directory")


SEED_MAX = 2**32 - 1  # (numpy's seeds, which seed_everything sets as well)


def check_seed(seed) -> None:
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed={seed}: accepted: an integer from 0 to {SEED_MAX}")


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _image_size(cfg: DictConfig) -> int | None:
    """The benchmark's network input size (data.image_size), where it has one the data
    module accepts (another is the data check's to name)."""
    from .data.base import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

    try:
        size = cfg.data.get("image_size")
    except OmegaConfBaseException:
        return None
    accepted = isinstance(size, int) and not isinstance(size, bool)
    return size if accepted and MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE else None


#: the (model, kwargs, image size) check_model_build passed in this process: the launch's
#: check and the job's own (and a sweep's jobs) ask again, at 30-180 ms a build
_BUILDS_PASSED: set[tuple[str, str, int | None]] = set()


def check_model_build(name: str, kwargs: dict, image_size: int | None = None) -> None:
    """The timm model is built once on the meta device (no memory, no initialisation) and
    takes one batch of ``image_size`` images there (shapes only, no arithmetic): a misspelt or
    misplaced ``model.kwargs`` argument, or a model that cannot take the benchmark's image
    size (a ViT made for 224 px given 32 px images), stops the job before any work."""
    key = (name, repr(sorted(kwargs.items())), image_size)
    if key in _BUILDS_PASSED:
        return
    _check_model_build(name, kwargs, image_size)
    _BUILDS_PASSED.add(key)


def _meta_model(name: str, kwargs: dict) -> torch.nn.Module:
    """timm's ``name`` on the meta device (no memory, no initialisation), with a
    num_classes, as create_backbone builds it."""
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _meta_batch(model: torch.nn.Module, batch: int, image_size: int, train: bool = False):
    """One batch of ``image_size`` images through ``model`` on the meta device (shapes only)."""
    with torch.no_grad():
        return model.train(train)(torch.empty(batch, 3, image_size, image_size, device="meta"))


def _check_model_build(name: str, kwargs: dict, image_size: int | None) -> None:
    try:
        model = _meta_model(name, kwargs)
    except Exception as err:  # noqa: BLE001 - whatever timm raises for a bad argument
        text = _first_line(err)
        if "meta" in text.lower() or not kwargs:
            return  # a model that cannot be built on the meta device: the job finds out
        raise ConfigError(f"model.kwargs={kwargs}: timm cannot build {name} with them "
                          f"({type(err).__name__}: {text})") from None
    if image_size is None:
        return
    try:
        _meta_batch(model, 2, image_size)
    except (AssertionError, RuntimeError, ValueError) as err:
        text = _first_line(err)
        if "meta" in text.lower():
            return  # (an op without a meta kernel, or one that reads values: not the input's)
        if kwargs and _takes_size(name, image_size):  # (the kwargs' doing: drop_rate=2)
            raise ConfigError(f"model.kwargs={kwargs}: {name} with them cannot run a batch "
                              f"({type(err).__name__}: {text}); without them it can") from None
        raise ConfigError(
            f"model.name={name} cannot take data.image_size={image_size} images "
            f"({type(err).__name__}: {text}); set data.image_size to a size the model takes, "
            f"or, for a model built for one size (ViT), +model.kwargs.img_size={image_size}"
        ) from None
    except Exception:  # noqa: BLE001 - anything else the meta forward cannot do
        return


def check_single_image_batch(cfg: DictConfig, job) -> None:
    """data.batch_size=1 where the backbone's feature map ends at 1x1: train-mode batch norm
    gets one value per channel and fails, which was found in T0's first step. One train-mode
    batch of one image on the meta device (shapes only) finds it here."""
    try:
        batch = cfg.data.get("batch_size")
    except OmegaConfBaseException:
        return
    size = _image_size(cfg)
    if batch != 1 or size is None or isinstance(batch, bool):
        return
    from .fitting import ONE_VALUE_PER_CHANNEL

    try:
        _meta_batch(_meta_model(job.model.name, dict(job.model.kwargs or {})), 1, size,
                    train=True)
    except ValueError as err:
        if ONE_VALUE_PER_CHANNEL in str(err):
            raise ConfigError(f"data.batch_size=1: {job.model.name} at data.image_size={size} "
                              "ends in a 1x1 feature map, where train-mode batch norm has one "
                              "value per channel; accepted here: 2 or more") from None
    except Exception:  # noqa: BLE001 - anything else: the job's own fit says it
        return


def _takes_size(name: str, image_size: int) -> bool:
    """Whether timm's ``name`` without kwargs runs a batch of ``image_size`` images (meta)."""
    try:
        _meta_batch(_meta_model(name, {}), 2, image_size)
    except Exception:  # noqa: BLE001 - the size, or anything else: not the kwargs' doing
        return False
    return True


def check_methods(baselines: list[str]) -> None:
    """Every listed method imports, has a name of its own (results and resume records are
    keyed by it), and shares with T0 only: the store holds one bank, CWPS's."""
    seen = {"cwps": "cwps"}
    for entry in baselines:
        try:
            cls = method_class(entry)
        except ValueError as err:
            raise ConfigError(f"cwps.baselines: {err}") from None
        if not cls.name:
            raise ConfigError(f"cwps.baselines: {entry}: the class sets no `name` (the key of "
                              "its results)")
        if cls.name == "cwps" and entry in ("cwps", BUILTIN["cwps"]):
            raise ConfigError(f"cwps.baselines: {entry}: {CWPS_ALWAYS_RUNS}")
        if cls.name in seen:
            raise ConfigError(f"cwps.baselines: {entry} and {seen[cls.name]} are both named "
                              f"{cls.name!r}; give each method its own `name`")
        if cls.shares_tasks:
            raise ConfigError(f"cwps.baselines: {entry} sets shares_tasks=True; only CWPS may "
                              "share between tasks for now (the store keeps one bank, CWPS's)")
        seen[cls.name] = entry


def check_trainer(trainer: dict, gpus_here: bool = True) -> None:
    """Trainer arguments Lightning would reject, and a GPU accelerator without a GPU."""
    bad = sorted(set(trainer) - set(trainer_arguments()) - set(TRAINER_SET_BY_JOB))
    if bad:
        near = nearest_key("trainer", bad[0], trainer_arguments())
        hint = f"; {near}" if near else " (see its documentation for the accepted ones)"
        raise ConfigError(f"trainer.{bad[0]}: not an argument of lightning.Trainer{hint}")
    for key, why in TRAINER_SET_BY_JOB.items():
        if key in trainer:
            raise ConfigError(f"trainer.{key}: {why}; remove it")
    check_trainer_values(trainer)
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in GPU_ACCELERATORS and gpus_here:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise ConfigError(
                f"trainer.accelerator={accelerator}: no CUDA GPU is visible on this machine "
                f"(torch.cuda.is_available() is False); use trainer=cpu (or trainer=default, "
                f"which picks a GPU when there is one)"
            )
        devices = trainer.get("devices", "auto")
        if isinstance(devices, int) and devices > available:
            raise ConfigError(f"trainer.devices={devices}: only {available} GPU(s) visible")
    check_trainer_plan(trainer, here=gpus_here)
    if gpus_here and not _cluster_launched():  # (a launcher's Trainer reads its environment:
        # the ranks' variables, which the launch checks (check_launch) read first)
        probe_trainer(trainer)


def check_trainer_plan(trainer: dict, here: bool = True) -> None:
    """Trainer values Lightning takes that would leave the job's fits untrained while the run
    still reported them, or hang: no training batches, a debug run of one batch, and several
    nodes with nothing to start them (the first fit waited for the other nodes forever, deaf
    to SIGTERM). ``here``: the job runs on this machine (not a SLURM launcher's)."""
    limit = trainer.get("limit_train_batches")
    if limit is not None and not isinstance(limit, bool) and isinstance(limit, int | float) \
            and limit == 0:
        raise ConfigError(f"trainer.limit_train_batches={limit}: no training batches; every "
                          "fit would end untrained and the run report it as trained")
    fast = trainer.get("fast_dev_run")
    if fast not in (None, False, 0):
        raise ConfigError(f"trainer.fast_dev_run={as_typed(fast)}: one batch per fit, while the "
                          "run would report every method as trained; for a short run lower "
                          "the epochs (cwps.stages.*, t0.epochs) or +trainer.limit_train_batches")
    interval = trainer.get("val_check_interval")
    if interval is not None and not isinstance(interval, bool) and \
            isinstance(interval, int | float) and not interval > 0:
        raise ConfigError(f"trainer.val_check_interval={interval}: accepted: a number > 0 "
                          "or null")
    nodes = trainer.get("num_nodes", 1)
    if here and isinstance(nodes, int) and nodes > 1 and not _cluster_launched():
        raise ConfigError(f"trainer.num_nodes={nodes}: nothing starts the other nodes here (no "
                          "SLURM, torchrun, LSF, Kubeflow or MPI environment, no NODE_RANK); "
                          "launch the job on every node with one of them, or use "
                          "trainer.num_nodes=1")


def _cluster_launched() -> bool:
    """Whether a launcher that starts several nodes started this process (the environments
    Lightning detects, or NODE_RANK set by hand for its own)."""
    import os

    from lightning.fabric.plugins.environments import (
        KubeflowEnvironment,
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    detectors = (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment,
                 KubeflowEnvironment, MPIEnvironment)
    for env in detectors:
        try:
            if env.detect():
                return True
        except Exception:  # noqa: BLE001 - a detector's own dependency missing (mpi4py)
            continue
    return "NODE_RANK" in os.environ


def probe_trainer(trainer: dict) -> None:
    """Make a lightning.Trainer of these arguments (a few milliseconds, nothing run): what it
    refuses (an accelerator this machine lacks, a strategy it cannot run, a value out of its
    range, a profiler or plugin it does not know) is refused here, in its words, not after
    T0 with a traceback. Its banners are kept quiet."""
    import logging
    import warnings

    from lightning import Trainer

    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch",
                                              "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Trainer(**{**trainer, "logger": False, "callbacks": [], "max_epochs": 1,
                       "enable_progress_bar": False, "enable_model_summary": False,
                       "enable_checkpointing": False})
    except Exception as err:  # noqa: BLE001 - Lightning's errors are of many types
        text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()),
                    type(err).__name__)
        raise ConfigError(f"the trainer settings: lightning.Trainer refuses them: {text}") \
            from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def check_trainer_values(trainer: dict) -> None:
    """The values Lightning checks only when the first Trainer is made (after the data and in
    T0's pretraining): accelerator, strategy and precision names, devices, num_nodes."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    for key, names, fold in (
            ("accelerator", {"auto", "gpu", *AcceleratorRegistry.available_accelerators()}, str),
            # (Lightning reads a strategy name in lower case)
            ("strategy", {"auto", *StrategyRegistry.available_strategies()}, str.lower)):
        value = trainer.get(key, "auto")
        if isinstance(value, str) and fold(value) not in names:
            raise ConfigError(f"trainer.{key}={value!r}: accepted: {', '.join(sorted(names))}")
    precision = trainer.get("precision", "32-true")
    if precision is not None and precision not in JOB_PRECISIONS:
        listed = ", ".join(dict.fromkeys(str(p) for p in JOB_PRECISIONS))  # (32 and "32": one)
        accepted = _precisions()
        if accepted and precision not in accepted:  # (no precision of Lightning's)
            raise ConfigError(f"trainer.precision={precision!r}: accepted: {listed}")
        # ("64-true", "bf16-true", ...: Lightning converts the weights, and T0's evaluation,
        # CPMS, the merge and the store, which work in float32, then failed after T0)
        raise ConfigError(f"trainer.precision={precision!r}: the job trains in float32 weights; "
                          f"accepted: {listed} (mixed precision: autocast over float32 weights)")
    devices = trainer.get("devices", "auto")
    if not _devices_ok(devices):
        raise ConfigError(f"trainer.devices={devices!r}: accepted: a number of devices >= 1, -1 "
                          "(all), 'auto', or GPU indices ([0, 1] or '0,1')")
    if _on_cpu(trainer) and distributed.device_ids(devices) is not None:
        raise ConfigError(f"trainer.devices={devices!r}: on the CPU devices is a number of "
                          "processes (e.g. 1 or 2), not device indices")
    check_trainer_types(trainer)  # (num_nodes among them)


#: the lowest value of Trainer arguments that fail or do nothing below it, at the first
#: Trainer or after T0 (0 nodes; 0 accumulated batches divided by zero; a negative clip value
#: clipped nothing, without a word)
TRAINER_MINIMA = {"num_nodes": 1, "accumulate_grad_batches": 1, "check_val_every_n_epoch": 1,
                  "log_every_n_steps": 0, "num_sanity_val_steps": -1, "gradient_clip_val": 0,
                  "reload_dataloaders_every_n_epochs": 0}


def check_trainer_types(trainer: dict) -> None:
    """Each Trainer argument whose annotation is made of plain types (bool, int, float, str,
    None, literals) holds one of them, and the numbers above are in range: Lightning checks
    them when a fit starts, after T0, or not at all (``enable_checkpointing=maybe`` turned
    checkpoints on). Arguments that take objects (callbacks, a timedelta) are left to it."""
    for key, value in trainer.items():
        kinds = _plain_kinds(key)
        if kinds is None or value is None and None in kinds:
            continue
        low = TRAINER_MINIMA.get(key)
        if not _of_kinds(value, kinds) or (  # (not >=: nan is refused too)
                low is not None and not isinstance(value, bool) and not value >= low):
            raise ConfigError(f"trainer.{key}={as_typed(value)}: accepted: "
                              f"{_kinds_text(kinds, low)}")


@cache
def _plain_kinds(key: str) -> tuple | None:
    """The plain types (and literal values, None for NoneType) lightning.Trainer's annotation
    of ``key`` allows; None where it allows anything else too, or cannot be read."""
    import types
    import typing

    from lightning import Trainer

    try:
        hint = typing.get_type_hints(Trainer.__init__).get(key)
    except Exception:  # (one annotation that does not resolve in this version fails them all:
        # take this key's as written, unchecked where it is a string to resolve)
        hint = Trainer.__init__.__annotations__.get(key)
        if isinstance(hint, str | typing.ForwardRef):
            return None
    kinds, todo = [], [hint]
    while todo:
        t = todo.pop(0)
        origin = typing.get_origin(t)
        if origin in (typing.Union, types.UnionType):
            todo.extend(typing.get_args(t))
        elif origin is typing.Literal:
            kinds.extend(("literal", v) for v in typing.get_args(t))
        elif t is type(None):
            kinds.append(None)
        elif t in (bool, int, float, str):
            kinds.append(t)
        else:
            return None
    return tuple(kinds)


def _of_kinds(value, kinds: tuple) -> bool:
    for kind in kinds:
        if isinstance(kind, tuple):
            if value == kind[1] and type(value) is type(kind[1]):
                return True
        elif kind is bool:
            if isinstance(value, bool):
                return True
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif kind is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return True
        elif kind is str and isinstance(value, str):
            return True
    return False


def _kinds_text(kinds: tuple, low=None) -> str:
    """``kinds`` in words: "an integer >= 1 or null", "true, false, 'warn', or null"."""
    number = ("a number" if float in kinds else "an integer" if int in kinds else None)
    parts = [*(("true", "false") if bool in kinds else ()),
             None if number is None else number + ("" if low is None else f" >= {low}"),
             "a string" if str in kinds else None,
             *(repr(k[1]) for k in kinds if isinstance(k, tuple)),
             "null" if None in kinds else None]
    parts = [p for p in parts if p is not None]
    return " or ".join(parts) if len(parts) <= 2 else ", ".join(parts[:-1]) + ", or " + parts[-1]


#: the trainer.precision values the job runs: float32 weights, with or without autocast
JOB_PRECISIONS = ("32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16")


@cache
def _precisions() -> tuple:
    """Lightning's accepted precision values (empty where its types moved: no check)."""
    from typing import get_args

    try:
        from lightning.fabric.plugins.precision.precision import (
            _PRECISION_INPUT_INT,
            _PRECISION_INPUT_STR,
            _PRECISION_INPUT_STR_ALIAS,
        )
    except ImportError:
        return ()
    return (get_args(_PRECISION_INPUT_STR) + get_args(_PRECISION_INPUT_INT)
            + get_args(_PRECISION_INPUT_STR_ALIAS))


def _devices_ok(devices) -> bool:
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return bool(devices) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                     for d in devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return True
        if text.isdigit():
            return int(text) >= 1
        parts = [part.strip() for part in text.split(",") if part.strip()]
        return "," in text and bool(parts) and all(part.isdigit() for part in parts)
    return False


def check_step_compose_trainer(trainer: dict, gpus_here: bool = True) -> None:
    """What cwps.compose=step cannot train with (lit_module.step_compose_refusal), refused
    before T0 and the first fits: float16 mixed precision only where the job runs on a GPU
    (on the CPU Lightning runs "16-mixed" as bf16-mixed). ``gpus_here`` False (a launcher
    submits the job elsewhere): ``accelerator: auto`` counts as a GPU."""
    accelerator = str(trainer.get("accelerator", "auto"))
    on_gpu = accelerator in GPU_ACCELERATORS or (
        accelerator == "auto" and (torch.cuda.is_available() or not gpus_here))
    # (on the CPU: the precision Lightning runs "16-mixed" as)
    why = step_compose_refusal(trainer.get("gradient_clip_val"),
                               trainer.get("precision", "32-true") if on_gpu else "bf16-mixed")
    if why:
        raise ConfigError(why)


# -- how the job is launched: DDP, sweeps, SLURM --------------------------------------------------
SLURM_LAUNCHER = "SlurmLauncher"  # hydra-submitit-launcher's class (hydra/launcher=slurm)


def launcher_kind(cfg: DictConfig) -> str:
    """The class name of the multirun launcher the config selects (BasicLauncher, ...)."""
    return str(cfg.hydra.launcher.get("_target_", "")).rsplit(".", 1)[-1]


def uses_ddp(trainer: dict) -> bool:
    """Whether the Trainer settings start more than one process per job."""
    strategy = str(trainer.get("strategy", "auto"))
    if any(k in strategy for k in ("ddp", "fsdp", "deepspeed")):
        return True
    devices = trainer.get("devices", 1)
    if str(devices) in ("-1", "auto"):
        return str(trainer.get("accelerator", "auto")) in GPU_ACCELERATORS
    try:
        ids = distributed.device_ids(devices)  # (a list, or "0,1")
        return len(ids) > 1 if ids is not None else int(devices) > 1
    except (TypeError, ValueError):
        return False  # (check_trainer_values names a devices value that is neither)


def check_launch(cfg: DictConfig, multirun: bool, overrides) -> None:
    """DDP inside a sweep, torchrun without one run directory, SLURM settings that disagree.

    * A basic (or submitit_local) multirun runs every job in the sweep's process. Lightning's
      launcher would re-execute the whole sweep command for each extra rank, and every rank
      would run every job: refused. Each job's ranks must belong to that job: the SLURM
      launcher submits one job per point and SLURM starts its ranks.
    * torchrun starts every rank at once; each would pick its own time-stamped run directory.
    * Under the SLURM launcher the Trainer must use the devices and nodes SLURM gives the job.
    * Under torchrun the Trainer must run DDP over as many devices as torchrun started ranks.
    """
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    launcher = launcher_kind(cfg)
    # (hydra.mode=MULTIRUN, from the command line or a config, starts one as -m does)
    multirun = multirun or ("hydra" in cfg and str(cfg.hydra.get("mode")).endswith("MULTIRUN"))
    if multirun and uses_ddp(trainer) and launcher != SLURM_LAUNCHER:
        raise ConfigError(
            f"a multirun with DDP (trainer.strategy={trainer.get('strategy')}, "
            f"trainer.devices={trainer.get('devices')}) is not supported with the "
            f"{launcher or 'basic'} launcher: the extra ranks would re-run the whole sweep. "
            f"Use hydra/launcher=slurm (one multi-GPU SLURM job per point), or run the points "
            f"one after another without -m (benchmarks/seed_sweep.py does)"
        )
    if (not multirun and distributed.world_size_from_env() > 1
            and not any(o.startswith("hydra.run.dir=") for o in overrides)):
        raise ConfigError(
            f"{distributed.world_size_from_env()} ranks (torchrun or SLURM) and no "
            f"hydra.run.dir: every rank must write to one run directory, give "
            f"hydra.run.dir=<dir> (the default is time-stamped, so ranks would differ)"
        )
    ranks = distributed.torchrun_world_size()
    if not multirun and ranks is not None and ranks > 1:
        check_torchrun_trainer(trainer, ranks)
    choices = cfg.hydra.runtime.choices if "hydra" in cfg else {}
    search, sweeper = choices.get("hparams_search"), choices.get("hydra/sweeper")
    if search and not multirun:  # (it ran one job at the preset's fixed values, without a word)
        raise ConfigError(f"hparams_search={search} is a search: run it as a multirun (-m)")
    if sweeper not in (None, "basic") and not multirun:  # (likewise)
        raise ConfigError(f"hydra/sweeper={sweeper} picks a sweep's jobs: run it as a "
                          f"multirun (-m)")
    if multirun and "hydra" in cfg:
        check_sweep_direction(cfg.hydra.sweeper.get("direction"))
    if multirun and launcher == SLURM_LAUNCHER:
        # (submitit submits with sbatch and fails with a traceback about srun without it)
        if shutil.which("sbatch") is None:
            raise ConfigError(
                "hydra/launcher=slurm: no sbatch on this machine's PATH; submit the sweep "
                "from a SLURM login node, or run it here with the basic launcher (drop "
                "hydra/launcher=slurm; one device per job)")
        lc = cfg.hydra.launcher
        want = {"trainer.devices": (trainer.get("devices"), lc.get("gpus_per_node")),
                "trainer.num_nodes": (trainer.get("num_nodes", 1), lc.get("nodes"))}
        for key, (have, given) in want.items():
            if given is not None and str(have) != str(given):
                raise ConfigError(
                    f"{key}={have} but hydra.launcher asks SLURM for {given} "
                    f"({'gpus_per_node' if key == 'trainer.devices' else 'nodes'}): "
                    f"set both to the same number")
        if lc.get("tasks_per_node") is not None and str(lc.get("tasks_per_node")) != str(
                lc.get("gpus_per_node")):
            raise ConfigError(
                f"hydra.launcher.tasks_per_node={lc.get('tasks_per_node')} must equal "
                f"gpus_per_node={lc.get('gpus_per_node')} (Lightning runs one rank per task)")


def check_sweep_direction(direction) -> None:
    """A sweeper that optimises (Optuna: ``hydra.sweeper.direction``) gets CWPS mean top-1 from
    each job, higher better, and with two directions also its param_ratio, lower better
    (train.hydra_main): the Optuna sweeper's default, minimize, searched for the worst job."""
    if direction is None:
        return
    given = list(direction) if isinstance(direction, Sequence | ListConfig) and \
        not isinstance(direction, str) else [direction]
    names = [str(getattr(d, "name", d)) for d in given]  # (Optuna takes lower case only)
    if names not in (["maximize"], ["maximize", "minimize"]):
        shown = names[0] if len(names) == 1 else f"[{', '.join(names)}]"
        raise ConfigError(f"hydra.sweeper.direction={shown}: each job returns CWPS mean top-1 "
                          f"(higher is better), and with two directions also its param_ratio "
                          f"(lower is better); accepted: maximize, or [maximize, minimize] "
                          f"(as hparams_search=cwps_optuna sets)")


def check_torchrun_trainer(trainer: dict, ranks: int) -> None:
    """torchrun started ``ranks`` processes: the Trainer must make them one DDP job. Without
    a DDP strategy each rank would run the whole job alone (the work done ``ranks`` times,
    rank 0's kept); with another count of devices Lightning would wait for ranks that never
    come, or leave some out."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    fix = (f"give trainer.devices=<ranks per node> trainer.num_nodes=<nodes> "
           f"trainer.strategy=ddp, or trainer=ddp (devices x num_nodes = {ranks})")
    if not uses_ddp(trainer) and str(nodes) in ("1", "None"):  # (Lightning: nodes > 1 is DDP)
        raise ConfigError(f"torchrun started {ranks} ranks, but trainer.strategy="
                          f"{trainer.get('strategy')} with trainer.devices={devices} runs one "
                          f"process: each rank would run the whole job alone; {fix}")
    try:
        ids = distributed.device_ids(devices)
        per_node = len(ids) if ids is not None else int(devices)
        count = per_node * int(nodes)
    except (TypeError, ValueError):
        return  # ("auto", -1: Lightning counts them; check_trainer_values names a bad value)
    if per_node > 0 and count != ranks:
        raise ConfigError(f"torchrun started {ranks} ranks, but trainer.devices={devices} x "
                          f"trainer.num_nodes={nodes} = {count}; {fix}")


def wandb_credentials() -> bool:
    """Whether W&B has an API key: WANDB_API_KEY, or a netrc entry for its host (what
    `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_logger(logger: LoggerSettings) -> None:
    if logger.kind != "wandb":
        return
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"logger=wandb: cannot import wandb ({err})") from None
    env = os.environ.get("WANDB_MODE")
    # (wandb.init fails on another value at T0, even with logger.mode set)
    if env is not None and env not in WANDB_ENV_MODES:
        raise ConfigError(f"WANDB_MODE={env}: not a W&B mode; accepted: "
                          f"{', '.join(WANDB_ENV_MODES)} (or unset it and set logger.mode)")
    mode = logger.mode or env or "online"
    if mode not in OFFLINE_WANDB_MODES and not wandb_credentials():
        raise ConfigError(
            "logger=wandb: no W&B credentials (WANDB_API_KEY or `wandb login`); to log without "
            "an account or network use logger.mode=offline (or WANDB_MODE=offline) and "
            "`wandb sync` the run directory later"
        )


def hub_cached(model_name: str) -> bool:
    """Whether timm's pretrained weights for ``model_name`` are in the local HF cache."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        return False
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))


def reachable(host: str, port: int = 443, timeout: float = HUB_TIMEOUT) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_hub_weights(model_name: str) -> None:
    """model.pretrained=true: the weights must be cached or the hub reachable (a quick probe,
    instead of minutes of retries inside the first download)."""
    if hub_cached(model_name):
        return
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if offline or not reachable(host):
        why = "HF_HUB_OFFLINE is set" if offline else f"{host} cannot be reached"
        raise ConfigError(
            f"model.pretrained=true: timm's weights for {model_name!r} are not in the local "
            f"Hugging Face cache and {why}; on a machine with network run "
            f"timm.create_model({model_name!r}, pretrained=True) once (fills the cache), or "
            f"save its state_dict and pass model.weights=<file>"
        )
