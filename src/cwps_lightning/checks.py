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
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import torch
from omegaconf import DictConfig, OmegaConf

from .config import settings_of
from .errors import ConfigError
from .methods.registry import method_class
from .models import check_model_name
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


@dataclass
class JobSettings:
    """The typed settings of one run (the config's checked sections)."""

    cwps: CWPSSettings
    methods: MethodsSettings
    optim: OptimSettings
    model: ModelSettings
    t0: T0Settings
    logger: LoggerSettings


def check_config(cfg: DictConfig) -> JobSettings:
    job = JobSettings(
        cwps=settings_of(cfg.cwps, CWPSSettings, "cwps"),
        methods=settings_of(cfg.methods, MethodsSettings, "methods"),
        optim=settings_of(cfg.optim, OptimSettings, "optim"),
        model=settings_of(cfg.model, ModelSettings, "model"),
        t0=settings_of(cfg.t0, T0Settings, "t0"),
        logger=settings_of(cfg.logger, LoggerSettings, "logger"),
    )
    check_methods(job.cwps.baselines)
    check_model_name(job.model.name)
    if job.model.weights and not Path(job.model.weights).is_file():
        raise ConfigError(f"model.weights: no such file {job.model.weights!r}")
    check_trainer(OmegaConf.to_container(cfg.trainer, resolve=True))
    check_logger(job.logger)
    if job.model.pretrained and not job.model.weights:
        check_hub_weights(job.model.name)
    return job


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
        if cls.name in seen:
            raise ConfigError(f"cwps.baselines: {entry} and {seen[cls.name]} are both named "
                              f"{cls.name!r}; give each method its own `name`")
        if cls.shares_tasks:
            raise ConfigError(f"cwps.baselines: {entry} sets shares_tasks=True; only CWPS may "
                              "share between tasks for now (the store keeps one bank, CWPS's)")
        seen[cls.name] = entry


@cache
def _trainer_arguments() -> frozenset[str]:
    import lightning as L

    return frozenset(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


def check_trainer(trainer: dict) -> None:
    """Trainer arguments Lightning would reject, and a GPU accelerator without a GPU."""
    bad = sorted(set(trainer) - _trainer_arguments() - {"max_epochs"})
    if bad:
        raise ConfigError(f"trainer.{bad[0]}: not an argument of lightning.Trainer "
                          f"(see its documentation for the accepted ones)")
    if "max_epochs" in trainer:
        raise ConfigError("trainer.max_epochs: set per fit from cwps.stages and t0.epochs; "
                          "remove it")
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in GPU_ACCELERATORS:
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
    mode = logger.mode or os.environ.get("WANDB_MODE", "online")
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
