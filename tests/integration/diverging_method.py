"""Baselines that fail on purpose, named in a run as
``cwps.baselines=[tests.integration.diverging_method:<class>]``: one diverges (learning rate
1e6), to test what a run does when a fit meets a non-finite loss after CWPS has stored its
tasks; one raises an error of its own."""

from __future__ import annotations

from cwps_lightning.methods.base import FitPlan, OptimizerPlan, Trained, split_param_count
from cwps_lightning.methods.baselines import FineTune


class Diverging(FineTune):
    name = "diverging"
    label = "Fine-tuning at lr 1e6"

    def train(self, task, iteration, bank, harness) -> Trained:
        model = harness.new_model(task, iteration)
        plan = FitPlan(harness.epochs, seed=harness.seed(task, "fit", iteration),
                       train="finetune", optimizer=OptimizerPlan(lr=1e6))
        harness.fit(model, task, plan, name=task)
        return Trained(model, params=split_param_count(model, harness.shareable))


class Crashing(FineTune):
    """A baseline whose training raises an error of no kind the project knows (a bug)."""

    name = "crashing"
    label = "Crashes"

    def train(self, task, iteration, bank, harness) -> Trained:
        raise RuntimeError("a bug in a method")


class CrashingOnRank1(FineTune):
    """Under DDP: a bug that only rank 1 meets, while rank 0 goes on into the fit (and waits
    there for rank 1 in the fit's first collective)."""

    name = "crashing_on_rank_1"
    label = "Crashes on rank 1"

    def train(self, task, iteration, bank, harness) -> Trained:
        from cwps_lightning import distributed

        if distributed.rank() == 1:
            raise KeyError("a bug on rank 1")
        return super().train(task, iteration, bank, harness)
