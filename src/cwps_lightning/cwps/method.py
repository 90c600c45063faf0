"""CWPS as a method of the runner (plain PyTorch: the fits come from the runner's harness).

One visit of a task (paper section 3.2): a copy of T0 with a new head, a warm-up fine-tune, CPMS
over the bank (every kept task but this one), soft then hard mask stages, merge. Joint mode
(section 3.3, Algorithm 1) is ``iterations`` passes of such visits; the runner keeps each
task's model with the best validation top-1 and swaps it in the bank.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..methods.base import FitPlan, Harness, Method, Trained
from .bank import KernelBank
from .search import merged_kernel_ids, search_parents
from .step_compose import use_step_compose
from .surgery import inject_cwps, mask_flips, merge_cwps, sharing_stats, specific_by_layer

if TYPE_CHECKING:
    from ..settings import CWPSSettings


class CWPSMethod(Method):
    name = "cwps"
    label = "CWPS"
    steps_per_visit = 2
    shares_tasks = True

    def __init__(self, settings: CWPSSettings):
        self.settings = settings

    @classmethod
    def from_settings(cls, job) -> CWPSMethod:
        return cls(job.cwps)

    @property
    def iterations(self) -> int:
        return self.settings.iterations

    def train(self, task: str, iteration: int, bank: KernelBank, harness: Harness) -> Trained:
        """A candidate model for ``task`` with ``bank`` (minus ``task``) as parents."""
        c, stages = self.settings, self.settings.stages
        model = harness.new_model(task, iteration)
        tag = f"{task}-it{iteration}"
        warmup_window, mask_window = c.lr_windows()
        fit_seed = harness.seed(task, "fit", iteration)
        # one data order for the visit, the fine-tuning run's: the warm-up fit takes its first
        # epochs, the mask fit continues it
        harness.reseed_shuffle(fit_seed)
        harness.step(f"cwps {tag}: warm-up fine-tune, {stages.warmup_epochs} epoch(s)")
        harness.fit(model, task, FitPlan(stages.warmup_epochs, seed=fit_seed, train="finetune",
                                         lr_window=warmup_window, continue_order=True),
                    name=f"{tag}-warmup")
        started = time.perf_counter()
        # (CPMS installs every parent: no copy of the child into them first)
        inject_cwps(model, exclude=None, threshold=c.threshold, mask_grad=c.mask_grad,
                    fill_parents=False)
        search = search_parents(model, bank, task, c.distance, c.init_scope, c.mask_init,
                                c.init_scale, seed=harness.seed(task, "mask_init", iteration))
        cpms_seconds = time.perf_counter() - started
        if c.compose == "step":  # the fit steps with StepComposeSGD (lit_module)
            use_step_compose(model)
        harness.step(
            f"cwps {tag}: CPMS over {[t for t in bank.tasks if t != task]} ({c.distance}, "
            f"{c.mask_init} init); soft {stages.soft_epochs:g} + hard {stages.hard_epochs:g} "
            "epoch(s)"
        )
        harness.fit(model, task, FitPlan(stages.mask_epochs,
                                         seed=harness.seed(task, "mask", iteration), train="cwps",
                                         soft_epochs=stages.soft_epochs, lr_window=mask_window,
                                         continue_order=True),
                    name=f"{tag}-mask")
        stats = sharing_stats(model)
        flips = mask_flips(model)
        by_layer = specific_by_layer(model)
        ids = merged_kernel_ids(model, search)
        parent_counts: dict[str, int] = {}
        for name, tasks in search.parent_task.items():
            shared = (ids[name] >= 0).tolist()
            for t, s in zip(tasks, shared, strict=True):
                if s:
                    parent_counts[t] = parent_counts.get(t, 0) + 1
        merge_cwps(model)
        info = {
            "specific_channels": stats["specific_channel_fraction"],
            "specific_params": stats["specific_param_fraction"],
            "shared_from": parent_counts,
            "specific_by_layer": by_layer,
            # channels whose hard decision changed in each stage (README: the masks barely move)
            "mask_flips": flips,
            # injection + CPMS (the parent search and the mask-logit init), wall seconds
            "cpms_seconds": round(cpms_seconds, 4),
        }
        return Trained(model, kernel_ids=ids, info=info)

    def describe(self, info: dict) -> str:
        text = f", {100 * info['specific_channels']:.1f}% channels task-specific"
        flips = info.get("mask_flips")
        if flips:
            text += (f", mask flips soft {flips['soft']} / hard {flips['hard']} of "
                     f"{flips['channels']}")
        return text
