"""The T0 backbone: from a weights file, or pretrained at the start of the run and cached.

The built-in benchmarks pretrain T0 on a task of their own (digits: its ``mnist`` part;
colour_digits: ``optdigits``). The result is cached under ``<cache_dir>/t0/<key>.pt``, the key a
hash of everything that decides the weights (model, benchmark class and pretraining task, image
size, seed, pretraining settings, the Trainer arguments that change the fit and the device type:
``t0_spec``), so a rerun skips it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .cwps.small_input import use_small_input_convs
from .cwps.store import atomic_write
from .fitting import FitSettings, evaluate_top1, fit
from .methods.base import FitPlan, OptimizerPlan
from .models import ModelConfigError, create_backbone, load_backbone_weights
from .report import is_number
from .settings import ADDED_KEYS_AT_OLD_VALUE

log = logging.getLogger(__name__)


def cache_key(spec: Mapping[str, Any]) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


#: the Trainer arguments that change what a T0 fit computes: the ranks (each takes its own
#: batches), the device and the arithmetic; all from the run's config, the same on every rank
#: (the launcher's environment is not: Lightning's own launcher sets WORLD_SIZE for rank 0 only
#: at the first fit, after the key is taken)
T0_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision")


def t0_spec(datamodule, model_name: str, model_kwargs: Mapping[str, Any], epochs: int,
            lr: float, seed: int, trainer: Mapping[str, Any] | None = None,
            device_type: str = "cpu") -> dict:
    """Everything that decides a pretrained T0's weights; its hash is the cache key. The
    benchmark enters by its class name, its pretraining task and its ``cache_spec()``; the
    run by its Trainer arguments (``T0_TRAINER_KEYS``) and the type of device it evaluates on
    (``accelerator: auto`` is a GPU on one machine and the CPU on another)."""
    trainer = trainer or {}
    spec = {
        "model": model_name,
        "model_kwargs": dict(model_kwargs),
        "data": type(datamodule).__name__,
        "data_spec": getattr(datamodule, "cache_spec", lambda: {})(),
        "task": datamodule.pretrain_task,
        "epochs": epochs,
        "lr": lr,
        "seed": seed,
        "batch_size": datamodule.batch_size,
        # training batches are all full (data/base.py): T0s cached before that are not reused
        "batches": "full",
        # SGD steps with torch's fused kernel on the CPU (optim.py), which rounds otherwise:
        # T0s pretrained before are not reused either
        "sgd": "fused on cpu",
        # (a key added at its old value reads as absent: settings.ADDED_KEYS_AT_OLD_VALUE)
        "trainer": {k: None if trainer.get(k) == ADDED_KEYS_AT_OLD_VALUE.get(("trainer", k))
                    else trainer.get(k) for k in T0_TRAINER_KEYS},
        "device_type": device_type,
    }
    spec["trainer"]["precision"] = precision_run(spec["trainer"]["precision"], device_type)
    threads = cpu_threads(trainer, device_type)
    if threads is not None:  # (absent elsewhere: the keys of GPU and multi-rank T0s stand)
        spec["cpu_threads"] = threads
    return spec


#: Lightning's short names of its precisions
PRECISION_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


def precision_run(value, device_type: str):
    """The precision Lightning runs ``value`` as: two names of one arithmetic share a T0
    (``32`` is ``32-true``; on the CPU ``16-mixed`` runs as ``bf16-mixed``, and pretrained a
    T0 of its own before)."""
    name = PRECISION_ALIASES.get(str(value), value) if value is not None else None
    return "bf16-mixed" if device_type == "cpu" and name == "16-mixed" else name


def cpu_threads(trainer: Mapping[str, Any], device_type: str) -> int | None:
    """torch's intra-op thread count where one process pretrains T0 on the CPU, else None.
    The count orders the float sums, so it decides the weights (on one machine, the digits T0
    read val top-1 92.89 with two threads, 93.33 with one): T0s of two counts must not share a
    cache file.
    Under several processes each rank's launcher sets its count after the key is taken, and
    the ranks must agree on the key, so it stays out there (README, *Several processes*)."""
    single = (str(trainer.get("devices", "auto")) in ("1", "auto", "None")
              and str(trainer.get("num_nodes", 1)) in ("1", "None"))
    return torch.get_num_threads() if device_type == "cpu" and single else None


def t0_source_missing(datamodule) -> str:
    """What to say where T0 has no source: no pretrained or given weights, and a benchmark
    without a pretraining task (the real benchmarks start from an ImageNet backbone)."""
    return (f"{type(datamodule).__name__} has no pretraining task for T0: set "
            f"model.pretrained=true (timm hub weights) or model.weights=<checkpoint file>")


def pretrain_t0(
    datamodule,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    epochs: int,
    lr: float,
    settings: FitSettings,
    cache_dir: str | Path | None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, dict]:
    """Train (or load from the cache) a T0 backbone on ``datamodule.pretrain_task``."""
    task = datamodule.pretrain_task
    if task is None:
        raise ModelConfigError(
            f"{type(datamodule).__name__} has no pretraining task: give pretrained weights"
        )
    if epochs < 1:
        raise ValueError(f"t0.epochs must be >= 1, got {epochs}")
    num_classes = datamodule.num_classes(task)
    spec = t0_spec(datamodule, model_name, model_kwargs, epochs, lr, seed, settings.trainer,
                   torch.device(device).type)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "t0" / f"{cache_key(spec)}.pt"
        cached = _load_cached(path, model_name, num_classes, model_kwargs)
        # the ranks take T0 from one source: a rank that pretrained while another loaded its
        # (node-local) cache would pair its T0 fit's collectives with the other's CWPS fit
        if distributed.every_rank(cached is not None, "t0-cached") and cached is not None:
            model, val = cached
            log.info("T0: loaded cached backbone %s (val top-1 %.2f)", path, val)
            return model, {"cached": str(path), "val_top1": val}
        if cached is not None:
            log.warning("T0: another rank has no cache %s: every rank pretrains T0", path)
    limit = getattr(datamodule, "limit_per_task", None)
    log.info("T0: pretraining %s on %r for %d epoch(s)%s", model_name, task, epochs,
             # (a quick run's limit caps T0's task too: a T0 of a few hundred images is weak)
             f", on the first {limit} of its images (data.limit_per_task)" if limit else "")
    torch.manual_seed(seed)
    model = create_backbone(model_name, num_classes, model_kwargs)
    use_small_input_convs(model)  # exact, faster on CPU (cwps/small_input.py)
    shareable: list[str] = []  # finetune mode trains everything
    plan = FitPlan(epochs, seed=seed, train="finetune",
                   optimizer=OptimizerPlan(lr=lr, lr_key="t0.lr"))
    fit(model, datamodule, task, plan, settings, shareable, log_group="t0", log_name=task)
    settings.drop_checkpoints("t0", lambda name: True)  # T0 is trained: in the cache now
    datamodule.use(task)
    val = evaluate_top1(model, datamodule.val_dataloader(), device)
    model.cpu()
    log.info("T0: val top-1 %.2f", val)
    if path is not None and distributed.rank() == 0:  # the ranks trained it together
        buf = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "val_top1": val, "spec": spec}, buf)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, buf.getvalue())
        except OSError as err:  # (a read-only or full cache: the run has its T0 all the same)
            log.warning("T0: cannot write the cache %s (%s); the run goes on, and the next "
                        "run pretrains T0 again", path, err.strerror or err)
    return model, {"cached": None, "val_top1": val}


def _load_cached(path: Path, model_name: str, num_classes: int,
                 model_kwargs: Mapping[str, Any]) -> tuple[nn.Module, float] | None:
    """T0 and its val top-1 from the cache file ``path``; None where there is none, or it is
    unreadable (said)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = create_backbone(model_name, num_classes, model_kwargs)
        model.load_state_dict(saved["state_dict"])
        val = saved["val_top1"]
        if not is_number(val):
            raise KeyError(f"val_top1 is {val!r}, not a finite number")  # (went to results)
        return model, float(val)
    except (RuntimeError, KeyError, TypeError, OSError, EOFError,
            pickle.UnpicklingError) as err:
        # (an empty or truncated file: EOFError; bytes of something else: Unpickling)
        log.warning("T0: cache %s unreadable (%s); pretraining again", path, err)
        return None


def acquire_t0(cfg, datamodule, settings: FitSettings, device) -> tuple[nn.Module, dict]:
    """T0 for a run (``cfg`` is the composed run config): ``model.weights`` if given, else timm's
    hub weights if ``model.pretrained`` is true (the head they come with is kept as T0's), else
    the benchmark's own pretraining (cached)."""
    from omegaconf import OmegaConf

    model_kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True) or {}
    if cfg.model.weights:
        model = load_backbone_weights(cfg.model.name, cfg.model.weights, model_kwargs)
        log.info("T0: %s from %s (model.weights)", cfg.model.name, cfg.model.weights)
        return model, {"weights": str(cfg.model.weights)}
    if cfg.model.get("pretrained", False):
        import timm

        from .models import check_model_name

        check_model_name(cfg.model.name)
        try:
            model = timm.create_model(cfg.model.name, pretrained=True, **model_kwargs)
        except Exception as err:  # noqa: BLE001 - network, hub and cache errors alike
            reason = " ".join(str(err).split())[:300]
            raise ModelConfigError(
                f"model.pretrained=true: cannot get timm's pretrained weights for "
                f"{cfg.model.name!r} ({type(err).__name__}: {reason}); without network access, "
                f"save them elsewhere (timm.create_model({cfg.model.name!r}, pretrained=True)"
                f".state_dict()) and pass model.weights=<file>"
            ) from err
        tag = getattr(model, "pretrained_cfg", {}).get("hf_hub_id") or cfg.model.name
        log.info("T0: timm pretrained weights %s", tag)
        return model, {"pretrained": str(tag)}
    if getattr(datamodule, "pretrain_task", None) is None:
        raise ModelConfigError(t0_source_missing(datamodule))
    return pretrain_t0(
        datamodule, cfg.model.name, model_kwargs, int(cfg.t0.epochs), float(cfg.t0.lr),
        settings, cfg.paths.cache_dir if cfg.t0.cache else None, cfg.seed, device,
    )
