"""The two reference points of every table: fine-tuning (a full copy of T0 per task) and the
feature extractor (T0 shared whole; normalisation layers and head per task)."""

from __future__ import annotations

from ..cwps.bank import KernelBank
from .base import FitPlan, Harness, Method, Trained, split_param_count


def fit_t0_copy(harness: Harness, task: str, iteration: int, mode: str):
    """T0 with this task's head, trained for the budget in train mode ``mode``."""
    model = harness.new_model(task, iteration)
    harness.step(f"{mode} {task}: {harness.epochs} epoch(s)")
    plan = FitPlan(harness.epochs, seed=harness.seed(task, "fit", iteration), train=mode)
    harness.fit(model, task, plan, name=task)
    return model


class FineTune(Method):
    name = "finetune"
    label = "Fine-Tuning"

    def train(self, task: str, iteration: int, bank: KernelBank, harness: Harness) -> Trained:
        model = fit_t0_copy(harness, task, iteration, "finetune")
        return Trained(model, params=split_param_count(model, harness.shareable))


class Frozen(Method):
    name = "frozen"
    label = "Feature extractor (frozen T0)"

    def train(self, task: str, iteration: int, bank: KernelBank, harness: Harness) -> Trained:
        model = fit_t0_copy(harness, task, iteration, "frozen")
        own = split_param_count(model, harness.shareable)["task_own"]
        return Trained(model, params={"kernels": 0, "task_own": own})
