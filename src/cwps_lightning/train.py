"""Entry point: ``python -m cwps_lightning.train [overrides]`` (Hydra).

compose config -> check it -> data -> T0 -> CWPS (+ baselines) -> results.json / results.md.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .cwps import MultiTaskStore, StoreError
from .errors import ConfigError
from .fitting import FitSettings, csv_logger_factory, eval_device
from .models import check_model_name
from .persist import RunRecorder
from .pretrain import acquire_t0
from .report import write_results
from .runner import BASELINES, CWPSSettings, MethodResult, Progress, Runner

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


def is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def cwps_settings(cfg: DictConfig) -> CWPSSettings:
    c = cfg.cwps
    return CWPSSettings(
        mode=c.mode, iterations=int(c.iterations), threshold=float(c.threshold),
        distance=c.distance, init_scope=c.get("init_scope", "layer"), warmup_epochs=int(c.stages.warmup_epochs),
        soft_epochs=int(c.stages.soft_epochs), hard_epochs=int(c.stages.hard_epochs),
        lr_schedule=str(c.stages.get("lr_schedule", "task")),
    )


def logger_factory(cfg: DictConfig, run_dir: Path):
    kind = cfg.logger.kind
    if kind == "csv":
        return csv_logger_factory(run_dir / "logs")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        def make(group: str, name: str):
            return WandbLogger(
                project=cfg.logger.project, entity=cfg.logger.entity,
                group=cfg.logger.group or run_dir.name, name=f"{group}/{name}",
                job_type=group, tags=list(cfg.logger.tags), save_dir=str(run_dir),
                mode=cfg.logger.mode or None, reinit="finish_previous",
                config=OmegaConf.to_container(cfg, resolve=True),
            )

        return make
    if kind in ("none", None):
        return lambda group, name: False
    raise ConfigError(f"logger.kind must be csv, wandb or none, got {kind!r}")


def check_config(cfg: DictConfig) -> tuple[CWPSSettings, list[str]]:
    """Every check that can fail before any work is done."""
    try:
        settings = cwps_settings(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_model_name(cfg.model.name)
    baselines = list(cfg.cwps.baselines or [])
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ConfigError(f"cwps.baselines has unknown entries {bad}; accepted: {list(BASELINES)}")
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        raise ConfigError(f"model.weights: no such file {cfg.model.weights!r}")
    return settings, baselines


def instantiate_data(data_cfg: DictConfig):
    """The benchmark's DataModule; a ConfigError raised while building it stays one."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(data_cfg)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


def run(cfg: DictConfig) -> dict:
    quiet_lightning()
    settings, baselines = check_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    torch.manual_seed(cfg.seed)
    started = time.time()

    recorder = RunRecorder(
        run_dir, cfg,
        backbone={"name": cfg.model.name,
                  "kwargs": OmegaConf.to_container(cfg.model.kwargs, resolve=True) or {}},
        cwps_meta={"mode": settings.mode, "iterations": settings.iterations,
                   "threshold": settings.threshold, "distance": settings.distance},
    )
    store = recorder.existing()
    datamodule = instantiate_data(cfg.data)
    for task in datamodule.task_names:  # builds the splits; bad tasks / roots fail here
        datamodule.num_classes(task)
    fit_settings = FitSettings(
        trainer=OmegaConf.to_container(cfg.trainer, resolve=True),
        lr=cfg.optim.lr, mask_lr=cfg.optim.mask_lr, momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay, logger_factory=logger_factory(cfg, run_dir),
        channels_last=bool(cfg.model.get("channels_last", False)),
    )
    device = eval_device(cfg.trainer.accelerator)
    if store is not None:
        t0_model, t0_info = recorder.t0_from(store), {"restored_from": str(recorder.store_dir)}
    else:
        t0_model, t0_info = acquire_t0(cfg, datamodule, fit_settings, device)

    methods: dict[str, MethodResult] = {}

    def persist(_result=None, complete=False):
        if is_rank_zero():
            recorder.save(methods, complete=complete)

    runner = Runner(datamodule, t0_model, fit_settings, settings, seed=cfg.seed, device=device,
                    on_task_done=persist)
    if store is not None:
        methods.update(recorder.restore(store, runner))
    methods.setdefault("cwps", MethodResult("cwps", runner.new_bank()))
    progress = Progress(runner.steps(baselines))
    runner.run_cwps(progress, methods["cwps"])
    for kind in baselines:
        methods.setdefault(kind, MethodResult(kind, runner.new_bank()))
        runner.run_baseline(kind, progress, methods[kind])
    persist(complete=True)

    results = {
        "benchmark": type(datamodule).__name__,
        "tasks": datamodule.task_names,
        "backbone": cfg.model.name,
        "backbone_params": runner.backbone_params,
        "t0": t0_info,
        "store": str(recorder.store_dir),
        "methods": {},
        "seconds": round(time.time() - started, 1),
        "device": str(device),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    for name, result in methods.items():
        results["methods"][name] = result.summary(runner.backbone_params)
    cwps_result = results["methods"]["cwps"]
    cwps_result.update({"mode": settings.mode, "iterations": settings.iterations})
    if is_rank_zero():
        # CWPS's parameter count is read back from the store it produced
        stored = MultiTaskStore.load(recorder.store_dir).param_count()
        cwps_result["params"] = stored
        cwps_result["param_ratio"] = stored["total"] / runner.backbone_params
        write_results(run_dir, results)
        log.info("results: %s", run_dir / "results.md")
        print((run_dir / "results.md").read_text())
    return results


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except (ConfigError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # the returned value is what a Hydra sweeper would optimise
    return results["methods"]["cwps"]["mean_top1"]


if __name__ == "__main__":
    main()
