"""The two reference points of every table: fine-tuning (a full copy of T0 per task) and the
feature extractor (T0 shared whole; normalisation layers and head per task)."""

from __future__ import annotations

from ..cwps.bank import KernelBank
from .base import FitPlan, Harness, Method, Trained, split_param_count


class FineTune(Method):
    name = "finetune"
    label = "Fine-Tuning"

    def train(self, task: str, iteration: int, bank: KernelBank, harness: Harness) -> Trained:
        model = harness.new_model(task, iteration)
        harness.step(f"finetune {task}: {harness.epochs} epoch(s)")
        plan = FitPlan(harness.epochs, seed=harness.seed(task, "fit", iteration), train="finetune")
        harness.fit(model, task, plan, name=task)
        return Trained(model, params=split_param_count(model, harness.shareable))


class Frozen(Method):
    name = "frozen"
    label = "Feature extractor (frozen T0)"

    def train(self, task: str, iteration: int, bank: KernelBank, harness: Harness) -> Trained:
        model = harness.new_model(task, iteration)
        harness.step(f"frozen {task}: {harness.epochs} epoch(s)")
        plan = FitPlan(harness.epochs, seed=harness.seed(task, "fit", iteration), train="frozen")
        harness.fit(model, task, plan, name=task)
        own = split_param_count(model, harness.shareable)["task_own"]
        return Trained(model, params={"kernels": 0, "task_own": own})
