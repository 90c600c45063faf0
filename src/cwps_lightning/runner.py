"""The task sequence, top to bottom: T0 -> for each task: warm-up -> CPMS -> soft/hard -> merge ->
test -> bank. Plain Python around one Lightning fit per phase.

Incremental mode (paper section 3.2) visits every task once. Joint mode (section 3.3,
Algorithm 1) traverses the tasks ``iterations`` times; each visit trains a candidate from T0 with
the whole current bank (other tasks) as search space, and the candidate replaces the task's kept
model only if its validation top-1 is higher: the old weights leave the bank, the new ones enter.
Test accuracy is recorded, never used for a choice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .cwps import (
    KernelBank,
    inject_cwps,
    merge_cwps,
    merged_kernel_ids,
    search_parents,
    sharing_stats,
)
from .fitting import FitSettings, evaluate_top1, fit
from .models import backbone_param_count, task_model
from .settings import BASELINES, CWPSSettings

log = logging.getLogger(__name__)

T0 = "T0"


@dataclass
class MethodResult:
    """What one method produced: per-task metrics, and the bank of kept models."""

    name: str
    bank: KernelBank
    tasks: dict[str, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    done: list[list] = field(default_factory=list)  # visits finished: [iteration, task]

    def record(self) -> dict:
        """What a progress record keeps of this method (the bank goes to the store)."""
        return {"tasks": self.tasks, "history": self.history, "done": self.done}

    def summary(self, backbone_params: int) -> dict:
        counts = self.bank.param_count()
        tops = [m["top1"] for m in self.tasks.values()]
        return {
            "tasks": self.tasks,
            "mean_top1": sum(tops) / len(tops) if tops else float("nan"),
            "param_ratio": counts["total"] / backbone_params,
            "params": counts,
            "history": self.history,
        }


class Progress:
    """One line per step of the run, to the log (and so to the console)."""

    def __init__(self, total_steps: int):
        self.total, self.done = total_steps, 0

    def step(self, msg: str) -> None:
        self.done += 1
        log.info("[%d/%d] %s", self.done, self.total, msg)

    def skip(self, n: int, msg: str) -> None:
        self.done += n
        log.info("[%d/%d] %s (done before, resumed)", self.done, self.total, msg)


class Runner:
    def __init__(
        self,
        datamodule,
        t0_model: nn.Module,
        settings: FitSettings,
        cwps: CWPSSettings,
        seed: int = 0,
        device: torch.device | str = "cpu",
        on_task_done: Callable[[MethodResult], None] | None = None,
    ):
        self.dm = datamodule
        self.t0 = t0_model
        self.settings = settings
        self.cwps = cwps
        self.seed = seed
        self.device = torch.device(device)
        self.on_task_done = on_task_done or (lambda result: None)
        self.shareable = KernelBank.shareable_of(t0_model)
        self.backbone_params = backbone_param_count(t0_model)
        self.t0_classes = int(t0_model.get_classifier().out_features)

    # -- helpers -------------------------------------------------------------------------------
    def new_bank(self) -> KernelBank:
        bank = KernelBank(self.shareable)
        bank.add(T0, self.t0, self.t0_classes)
        return bank

    def _seed(self, task: str, phase: str, iteration: int = 0) -> int:
        """A stable seed per task, phase and visit, independent of what ran before it.

        The method is deliberately not part of the key (common random numbers): every method's
        model of a task starts from the same head and sees the same data order, and CWPS's
        warm-up fit is the first epochs of the fine-tuning run exactly (see train_cwps_task), so
        a difference between methods comes from the methods, not from different draws. (It does
        not make one run's difference noise-free: training diverges chaotically once CPMS swaps
        kernels in; README. Batch for batch on one device only: under DDP, Lightning's
        DistributedSampler draws each fit's order from that fit's seed.)
        """
        key = f"{task}/{phase}/{iteration}"
        return (self.seed * 1_000_003 + sum(ord(c) * (i + 1) for i, c in enumerate(key))) % 2**31

    def _test(self, model: nn.Module, task: str) -> tuple[float, float]:
        self.dm.use(task)
        val = evaluate_top1(model, self.dm.val_dataloader(), self.device)
        test = evaluate_top1(model, self.dm.test_dataloader(), self.device)
        model.cpu()
        return val, test

    def _fit(self, model, task, mode, epochs, group, name, soft_epochs=None, seed=0,
             lr_window=(0.0, 1.0), continue_order=False):
        return fit(
            model, self.dm, task, mode, epochs, self.settings, self.shareable,
            log_group=group, log_name=name, soft_epochs=soft_epochs, seed=seed,
            lr_window=lr_window, continue_order=continue_order,
        )

    # -- CWPS ----------------------------------------------------------------------------------
    def train_cwps_task(self, bank: KernelBank, task: str, iteration: int, progress: Progress):
        """One visit: a candidate model for ``task`` with ``bank`` (minus ``task``) as parents."""
        c, stages = self.cwps, self.cwps.stages
        model = task_model(self.t0, self.dm.num_classes(task),
                           seed=self._seed(task, "head", iteration))
        tag = f"{task}-it{iteration}"
        warmup_window, mask_window = c.lr_windows()
        fit_seed = self._seed(task, "fit", iteration)
        # one data order for the visit, the fine-tuning run's: the warm-up fit takes its first
        # epochs, the mask fit continues it
        self.dm.reseed_shuffle(fit_seed)
        progress.step(f"cwps {tag}: warm-up fine-tune, {stages.warmup_epochs} epoch(s)")
        self._fit(model, task, "finetune", stages.warmup_epochs, "cwps", f"{tag}-warmup",
                  seed=fit_seed, lr_window=warmup_window, continue_order=True)
        inject_cwps(model, exclude=None, threshold=c.threshold)
        search = search_parents(model, bank, task, c.distance, c.init_scope)
        progress.step(
            f"cwps {tag}: CPMS over {[t for t in bank.tasks if t != task]} ({c.distance}); "
            f"soft {stages.soft_epochs} + hard {stages.hard_epochs} epoch(s)"
        )
        self._fit(model, task, "cwps", stages.soft_epochs + stages.hard_epochs, "cwps",
                  f"{tag}-mask",
                  soft_epochs=stages.soft_epochs, seed=self._seed(task, "mask", iteration),
                  lr_window=mask_window, continue_order=True)
        stats = sharing_stats(model)
        ids = merged_kernel_ids(model, search)
        parent_counts: dict[str, int] = {}
        for name, tasks in search.parent_task.items():
            shared = (ids[name] >= 0).tolist()
            for t, s in zip(tasks, shared, strict=True):
                if s:
                    parent_counts[t] = parent_counts.get(t, 0) + 1
        merge_cwps(model)
        val, test = self._test(model, task)
        info = {
            "val_top1": val,
            "top1": test,
            "specific_channels": stats["specific_channel_fraction"],
            "specific_params": stats["specific_param_fraction"],
            "shared_from": parent_counts,
        }
        return model, ids, info

    def run_cwps(self, progress: Progress, result: MethodResult | None = None) -> MethodResult:
        """All visits of the CWPS method; ``result`` (restored) skips the visits it has done."""
        c = self.cwps
        result = result or MethodResult("cwps", self.new_bank())
        for it in range(c.iterations):
            for task in self.dm.task_names:
                if [it, task] in result.done:
                    progress.skip(2, f"cwps {task}-it{it}")
                    continue
                model, ids, info = self.train_cwps_task(result.bank, task, it, progress)
                kept = result.tasks.get(task)
                accepted = kept is None or info["val_top1"] > kept["val_top1"]
                result.history.append({"iteration": it, "task": task, "accepted": accepted, **info})
                if accepted:
                    # Algorithm 1: the old model's weights leave the search space, the new enter
                    result.bank.add(task, model, self.dm.num_classes(task), kernel_ids=ids)
                    result.tasks[task] = {**info, "iteration": it}
                result.done.append([it, task])
                log.info(
                    "cwps %s it%d: val %.2f test %.2f, %.1f%% channels task-specific%s",
                    task, it, info["val_top1"], info["top1"], 100 * info["specific_channels"],
                    "" if accepted else " (kept the earlier model: higher val top-1)",
                )
                self.on_task_done(result)
        return result

    # -- baselines -----------------------------------------------------------------------------
    def _baseline_ids(self, kind: str, bank: KernelBank) -> dict | None:
        # finetune: every kernel new; frozen: every kernel is T0's
        if kind == "finetune":
            return None
        return {n: bank.entries[T0].layers[n].ids for n in self.shareable}

    def restore_baseline(self, kind: str, record: dict) -> MethodResult:
        """A baseline's finished tasks from a progress record. Baselines keep no weights; their
        bank is rebuilt for parameter accounting only (kernel ids and parameter shapes)."""
        result = MethodResult(kind, self.new_bank(), tasks=dict(record["tasks"]))
        ids = self._baseline_ids(kind, result.bank)
        for task in result.tasks:
            stand_in = task_model(self.t0, self.dm.num_classes(task))
            result.bank.add(task, stand_in, self.dm.num_classes(task), kernel_ids=ids)
        return result

    def run_baseline(
        self, kind: str, progress: Progress, result: MethodResult | None = None
    ) -> MethodResult:
        """finetune: a full copy of T0 per task. frozen: T0 shared whole, norms + head per task."""
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {kind!r}; accepted: {list(BASELINES)}")
        result = result or MethodResult(kind, self.new_bank())
        t0_ids = self._baseline_ids(kind, result.bank)
        for task in self.dm.task_names:
            if task in result.tasks:
                progress.skip(1, f"{kind} {task}")
                continue
            model = task_model(self.t0, self.dm.num_classes(task), seed=self._seed(task, "head"))
            epochs = self.cwps.total_epochs
            progress.step(f"{kind} {task}: {epochs} epoch(s)")
            self._fit(model, task, kind, epochs, kind, task, seed=self._seed(task, "fit"))
            val, test = self._test(model, task)
            result.bank.add(task, model, self.dm.num_classes(task), kernel_ids=t0_ids)
            result.tasks[task] = {"val_top1": val, "top1": test}
            log.info("%s %s: val %.2f test %.2f", kind, task, val, test)
            self.on_task_done(result)
        return result

    def steps(self, baselines: list[str]) -> int:
        k = len(self.dm.task_names)
        return 2 * k * self.cwps.iterations + k * len(baselines)
