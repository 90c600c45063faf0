"""The runner: one loop that drives every method over the tasks, and the harness (Lightning
fits, seeds, evaluation) the methods train with.

For every method (CWPS first, then the baselines) and each of its passes over the tasks: skip
what a resumed run has done, let the method train a model for the task (methods/base.py), test
it, and keep it if it is the task's first model or has a higher validation top-1 than the kept
one (joint mode, paper section 3.3, Algorithm 1: the old model's weights leave the bank, the new
ones enter). Test accuracy is recorded, never used for a choice. After every visit the result
is persisted (``on_task_done``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import distributed
from .cwps import KernelBank
from .data.base import PRETRAINED_NAME
from .errors import ConfigError
from .fitting import FitSettings, evaluate_top1, fit
from .methods.base import (
    FitPlan,
    Method,
    Trained,
    additive_param_count,
    head_param_count,
    param_ratios,
)
from .models import backbone_param_count, head_classes, task_model

log = logging.getLogger(__name__)

T0 = PRETRAINED_NAME


def check_trained(method: Method, trained) -> None:
    """What a method's ``train`` returned keeps the contract of methods/base.py, or one line
    (a ConfigError) names the method and what is wrong; the tasks stored before stay."""
    where = (f"method {method.name!r} ({type(method).__module__}:{type(method).__qualname__}): "
             f"train() must return a Trained")
    if not isinstance(trained, Trained):
        raise ConfigError(f"{where}, got {type(trained).__name__} (README: *A method of your "
                          f"own*)")
    if not isinstance(trained.model, nn.Module):
        raise ConfigError(f"{where} whose model is an nn.Module, got "
                          f"{type(trained.model).__name__}")
    if not method.shares_tasks and not (isinstance(trained.params, dict) and
                                        {"kernels", "task_own"} <= set(trained.params)):
        got = sorted(trained.params) if isinstance(trained.params, dict) else trained.params
        raise ConfigError(f"{where} with params 'kernels' and 'task_own' (the parameters the "
                          f"task adds to the store; got {got!r})")


@dataclass
class MethodResult:
    """What one method produced: per-task metrics, every visit, and its bank (T0 and, for a
    method that shares between tasks, every kept model)."""

    name: str
    bank: KernelBank
    tasks: dict[str, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    done: list[list] = field(default_factory=list)  # visits finished: [iteration, task]
    #: parameters counted from the bank (True) or as T0 + each task's own cost (False)
    shares_tasks: bool = True

    def record(self) -> dict:
        """What a progress record keeps of this method (the bank goes to the store)."""
        return {"tasks": self.tasks, "history": self.history, "done": self.done}

    def param_count(self) -> dict:
        if self.shares_tasks:
            return self.bank.param_count()
        return additive_param_count(self.bank.param_count([T0]), self.tasks)

    def summary(self, backbone_params: int) -> dict:
        counts = self.param_count()
        tops = [m["top1"] for m in self.tasks.values()]
        return {
            "tasks": self.tasks,
            "mean_top1": sum(tops) / len(tops) if tops else float("nan"),
            **param_ratios(counts, backbone_params),
            "params": counts,
            # every visit's training and test time (joint mode: all passes), per task
            # (a mean of times kept to 0.1 s: two decimals, not 7.400000000000001)
            "seconds_per_task": (round(sum(h.get("seconds", 0.0) for h in self.history)
                                       / len(self.tasks), 2) if self.tasks else float("nan")),
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
        """``n`` steps done before (a CWPS visit is two fits), as one line: [1-2/12]."""
        first, self.done = self.done + 1, self.done + n
        steps = f"{first}-{self.done}" if n > 1 else f"{self.done}"
        log.info("[%s/%d] %s (done before, resumed)", steps, self.total, msg)


class Runner:
    """Drives methods over the datamodule's tasks; is the Harness they train with."""

    def __init__(
        self,
        datamodule,
        t0_model: nn.Module,
        settings: FitSettings,
        epochs: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        on_task_done: Callable[[MethodResult], None] | None = None,
    ):
        self.dm = datamodule
        self.t0 = t0_model
        self.settings = settings
        self.epochs = epochs
        self.seed_base = seed
        self.device = torch.device(device)
        self.on_task_done = on_task_done or (lambda result: None)
        self.shareable = KernelBank.shareable_of(t0_model)
        self.backbone_params = backbone_param_count(t0_model)
        self.t0_classes = head_classes(t0_model)
        self._progress = Progress(0)
        self._group = ""

    # -- the harness a method trains with (methods/base.py: Harness) ---------------------------
    def seed(self, task: str, phase: str, iteration: int = 0) -> int:
        """A stable seed per task, phase and visit, independent of what ran before it.

        The method is deliberately not part of the key (common random numbers): every method's
        model of a task starts from the same head and sees the same data order, and CWPS's
        warm-up fit is the first epochs of the fine-tuning run exactly (cwps/method.py), so a
        difference between methods comes from the methods, not from different draws. (It does
        not make one run's difference noise-free: training diverges chaotically once CPMS swaps
        kernels in; README. Batch for batch on one device only: under DDP, Lightning's
        DistributedSampler draws each fit's order from that fit's seed.)
        """
        key = f"{task}/{phase}/{iteration}"
        return (self.seed_base * 1_000_003
                + sum(ord(c) * (i + 1) for i, c in enumerate(key))) % 2**31

    def new_model(self, task: str, iteration: int = 0) -> nn.Module:
        return task_model(self.t0, self.dm.num_classes(task),
                          seed=self.seed(task, "head", iteration))

    def fit(self, model: nn.Module, task: str, plan: FitPlan, name: str) -> nn.Module:
        return fit(model, self.dm, task, plan, self.settings, self.shareable,
                   log_group=self._group, log_name=name)

    def reseed_shuffle(self, seed: int) -> None:
        self.dm.reseed_shuffle(seed)

    def step(self, message: str) -> None:
        self._progress.step(message)

    # -- the loop ------------------------------------------------------------------------------
    def new_bank(self) -> KernelBank:
        bank = KernelBank(self.shareable)
        bank.add(T0, self.t0, self.t0_classes)
        return bank

    def new_result(self, method: Method, **record) -> MethodResult:
        """An empty result for ``method`` (or one restored from a progress ``record``)."""
        return MethodResult(method.name, self.new_bank(), shares_tasks=method.shares_tasks,
                            **record)

    def _test(self, model: nn.Module, task: str) -> tuple[float, float]:
        with self.settings.stopwatch.timed("evaluation"):
            self.dm.use(task)
            val = evaluate_top1(model, self.dm.val_dataloader(), self.device)
            test = evaluate_top1(model, self.dm.test_dataloader(), self.device)
            model.cpu()
        return val, test

    def steps(self, methods: list[Method]) -> int:
        k = len(self.dm.task_names)
        return sum(m.steps_per_visit * m.iterations * k for m in methods)

    def run(self, methods: list[Method], results: dict[str, MethodResult]) -> None:
        """Every method in turn; ``results`` holds (restored) results by method name and
        receives the new ones."""
        self._progress = Progress(self.steps(methods))
        for method in methods:
            if method.name not in results:
                results[method.name] = self.new_result(method)
            self.run_method(method, results[method.name])

    def run_method(self, method: Method, result: MethodResult) -> MethodResult:
        """All visits of ``method``; those ``result`` records as done are skipped."""
        self._group = method.name
        for it in range(method.iterations):
            for task in self.dm.task_names:
                if [it, task] in result.done:
                    self._progress.skip(method.steps_per_visit, f"{method.name} {task}-it{it}")
                    continue
                self.visit(method, result, task, it)
        return result

    def visit(self, method: Method, result: MethodResult, task: str, iteration: int) -> None:
        started = time.perf_counter()
        trained = method.train(task, iteration, result.bank, self)
        check_trained(method, trained)  # (before its test pass: a broken method stops sooner)
        val, test = self._test(trained.model, task)
        info = {"val_top1": val, "top1": test, **trained.info}
        if not method.shares_tasks:
            # the head is the task's own whatever the method: counted for the with-heads figure
            info["params"] = {"heads": head_param_count(trained.model), **trained.params}
        info["seconds"] = round(time.perf_counter() - started, 1)
        self.settings.stopwatch.add("cpms", info.get("cpms_seconds", 0.0))
        kept = result.tasks.get(task)
        # rank 0 decides for all (the counts are reduced, so the ranks agree anyway)
        accepted = distributed.broadcast_object(kept is None or val > kept["val_top1"])
        result.history.append({"iteration": iteration, "task": task, "accepted": accepted,
                               **info})
        if accepted:
            if method.shares_tasks:
                result.bank.add(task, trained.model, self.dm.num_classes(task),
                                kernel_ids=trained.kernel_ids)
            result.tasks[task] = {**info, "iteration": iteration}
        result.done.append([iteration, task])
        log.info("%s %s it%d: val %.2f test %.2f%s%s", method.name, task, iteration, val, test,
                 method.describe(trained.info),
                 "" if kept is None else
                 f" (replaces the model of it{kept['iteration']}: its val top-1 was "
                 f"{kept['val_top1']:.2f})" if accepted else
                 f" (kept the earlier model, of it{kept['iteration']}: its val top-1 "
                 f"{kept['val_top1']:.2f} is {'equal' if val == kept['val_top1'] else 'higher'}; "
                 f"a new model must beat it)")
        with self.settings.stopwatch.timed("store_writes"):
            self.on_task_done(result)
        # stored: a rerun no longer needs this visit's fit checkpoints
        prefix = f"{task}-it{iteration}-"
        self.settings.drop_checkpoints(self._group, lambda n: n == task or n.startswith(prefix))
