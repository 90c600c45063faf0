"""W&B: one run per fit, all runs of a job in one group, and a summary run at the end of the
job with the results table, the figures and (``logger.log_store=true``) the store.

Lightning's WandbLogger reuses a W&B run that is still open ("There is a wandb run already in
progress ..."), which put every fit of a job into one run with restarting step counters; so
the previous fit's run is finished before the next fit's logger is made.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .settings import LoggerSettings


def close_run(exit_code: int | None = None) -> None:
    """Finish the W&B run left open, if any; when a job fails (train.task_wrapper) with its
    exit status, so that W&B marks the run failed (finished without one, it read as a
    success)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)  # (None: wandb's default, the run's own end)


def group_of(settings: LoggerSettings, run_dir: Path) -> str:
    """logger.group, else the run directory with its parent: one group per job, also for the
    jobs of a multirun (whose directories are named 0, 1, ...)."""
    return settings.group or f"{run_dir.parent.name}/{run_dir.name}"


def _init_args(cfg: DictConfig, settings: LoggerSettings, run_dir: Path) -> dict:
    return dict(project=settings.project, entity=settings.entity,
                group=group_of(settings, run_dir), tags=list(settings.tags),
                mode=settings.mode, config=OmegaConf.to_container(cfg, resolve=True))


def wandb_logger_factory(cfg: DictConfig, settings: LoggerSettings, run_dir: Path):
    """A WandbLogger per fit, each its own W&B run (name ``<method>/<fit>``, job type the
    method)."""
    from lightning.pytorch.loggers import WandbLogger

    def make(group: str, name: str):
        close_run()
        return _without_anonymous(WandbLogger(name=f"{group}/{name}", job_type=group,
                                              save_dir=str(run_dir),
                                              **_init_args(cfg, settings, run_dir)))

    return make


def _without_anonymous(logger):
    """Lightning hands wandb.init ``anonymous=None`` when it is not asked for, and wandb warns
    on every run that the setting has no effect ("will be removed"): left out, as unset."""
    init = getattr(logger, "_wandb_init", None)  # (Lightning's private init arguments)
    if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
        del init["anonymous"]
    return logger


def log_job_summary(cfg: DictConfig, settings: LoggerSettings, run_dir: Path, results: dict,
                    store_dir: Path | None) -> None:
    """One more run in the job's group, ``summary``: the results table, every figure, and the
    store as an artifact if ``logger.log_store``."""
    import wandb

    close_run()
    run = wandb.init(name="summary", job_type="summary", dir=str(run_dir),
                     **_init_args(cfg, settings, run_dir))
    try:
        tasks = results["tasks"]
        table = wandb.Table(columns=["method", "param_ratio", "param_ratio_with_heads", *tasks,
                                     "mean_top1"])
        for name, r in results["methods"].items():
            table.add_data(r.get("label") or name, r["param_ratio"], r["param_ratio_with_heads"],
                           *[r["tasks"].get(t, {}).get("top1") for t in tasks], r["mean_top1"])
        logged = {"results": table}
        for figure in results.get("figures", []):
            logged[f"figures/{Path(figure).stem}"] = wandb.Image(str(run_dir / figure))
        run.log(logged)
        run.summary.update({f"{m}/mean_top1": r["mean_top1"]
                            for m, r in results["methods"].items()})
        if settings.log_store and store_dir is not None and store_dir.is_dir():
            artifact = wandb.Artifact(f"store-{run.id}", type="cwps-store")
            artifact.add_dir(str(store_dir))
            run.log_artifact(artifact)
    finally:
        run.finish()
