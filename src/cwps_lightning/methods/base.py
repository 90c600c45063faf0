"""The method interface the runner drives, in plain PyTorch (no Lightning, no Hydra).

A method has one job: train a model for a task, given the bank of kept models it may share
from, and say what that model costs to store. Everything around it (the loop over tasks and
iterations, seeding, progress, recording, resuming, joint-mode acceptance) is the runner's,
written once; the training itself is a ``Harness`` the runner hands in, so a method never
builds a Trainer and this module never imports Lightning.

Adding a method: subclass ``Method`` in one file, implement ``train``, and name the class in
the config (``cwps.baselines=[finetune,my_package.my_file:MyMethod]``; see the README).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from ..cwps.bank import KernelBank, param_counts
from ..cwps.surgery import classifier_names

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class OptimizerPlan:
    """The optimiser of one fit. None fields take the run's ``optim.*`` settings.

    ``groups``: parameter-name suffix -> learning rate of an own group without weight decay
    (CWPS's mask logits, Piggyback's masks). The schedule is always the run's cosine.
    ``lr_key``: the config key ``lr`` comes from, which a diverged fit's message names;
    ``group_keys``: group suffix -> the config key of that group's learning rate, named too.
    """

    kind: str = "sgd"
    lr: float | None = None
    weight_decay: float | None = None
    groups: dict[str, float] = field(default_factory=dict)
    lr_key: str = "optim.lr"
    group_keys: dict[str, str] = field(default_factory=dict)

    @property
    def lr_hint(self) -> str:
        """The learning-rate keys a diverged fit's message tells the user to lower (a rate a
        method sets itself without naming its key: that rate, not optim.lr, which it ignores)."""
        extra = [k for k in self.group_keys.values() if k != self.lr_key]
        base = (f"the learning rate its method sets ({self.lr:g})"
                if self.lr is not None and self.lr_key == "optim.lr" else self.lr_key)
        return base + (f" (or {' / '.join(extra)})" if extra else "")

    def __post_init__(self):
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.kind!r}")


@dataclass(frozen=True)
class FitPlan:
    """What one fit trains, for how long, and how.

    ``train``: a train mode of the harness (``finetune``: every parameter but mask logits,
    ``cwps``: every parameter, ``frozen``: all but the shareable layers), or a function that
    sets ``requires_grad`` on the model itself. ``soft_epochs``: CWPS layers run soft for that
    many epochs, then hard. ``penalty``: a term added to the loss, times ``penalty_weight``,
    from epoch ``penalty_from_epoch`` on (0-based). ``frozen_norms``: normalisation layers keep
    their running statistics (eval mode) while the rest trains. ``lr_window``: the part of one
    cosine schedule this fit covers. ``continue_order``: keep the training data order going
    from the previous fit instead of restarting it from ``seed``.
    """

    epochs: int
    seed: int
    train: str | Callable[[nn.Module], None] = "finetune"
    optimizer: OptimizerPlan = field(default_factory=OptimizerPlan)
    soft_epochs: float | None = None
    penalty: Callable[[nn.Module], Tensor] | None = None
    penalty_weight: float = 0.0
    penalty_from_epoch: int = 0
    frozen_norms: bool = False
    lr_window: tuple[float, float] = (0.0, 1.0)
    continue_order: bool = False


class Harness(Protocol):
    """What the runner offers a method (implemented with Lightning in runner.py)."""

    t0: nn.Module  # the pretrained backbone with its head
    shareable: list[str]  # the layers a bank tracks (every Conv2d/Linear but the head)
    epochs: int  # the per-task training budget every method gets

    def seed(self, task: str, phase: str, iteration: int = 0) -> int:
        """A stable seed per task, phase and visit, the same for every method."""

    def new_model(self, task: str, iteration: int = 0) -> nn.Module:
        """A copy of T0 with a fresh head for ``task`` (the same head for every method)."""

    def fit(self, model: nn.Module, task: str, plan: FitPlan, name: str) -> nn.Module:
        """Train ``model`` on ``task`` in place as ``plan`` says; ``name`` labels the logs."""

    def reseed_shuffle(self, seed: int) -> None:
        """Restart the training data order from ``seed`` (for plans that continue it)."""

    def step(self, message: str) -> None:
        """One progress line (a method announces each of its ``steps_per_visit`` steps)."""


@dataclass
class Trained:
    """A method's model of one task: a plain nn.Module (layers merged back), what storing it
    costs, and any method-specific metrics (JSON values) for results.json."""

    model: nn.Module
    #: parameters this task adds to the store beyond T0: ``kernels`` inside the shareable
    #: layers, ``task_own`` outside them (normalisation layers, head). Methods that share
    #: between tasks (``shares_tasks``) are counted from their bank instead.
    params: dict[str, float] = field(default_factory=dict)
    #: for ``shares_tasks`` methods: per shareable layer, each channel's kernel id (-1: new)
    kernel_ids: dict[str, Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Method:
    """One method of the results table. Subclasses set ``name`` and implement ``train``."""

    name: ClassVar[str] = ""
    #: the results table's row label
    label: ClassVar[str] = ""
    #: progress lines per visit (``Harness.step`` calls in ``train``)
    steps_per_visit: ClassVar[int] = 1
    #: True: kept models enter the method's bank (later tasks may share them) and parameters
    #: are counted from the bank; False: every task shares with T0 only, costs add up
    shares_tasks: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, job: Any) -> Method:
        """The method as a run's settings (checks.JobSettings) configure it."""
        return cls()

    @property
    def iterations(self) -> int:
        """Passes over the tasks; > 1 keeps each task's model with the best val top-1."""
        return 1

    def train(self, task: str, iteration: int, bank: KernelBank, harness: Harness) -> Trained:
        raise NotImplementedError

    def describe(self, info: dict) -> str:
        """A short addition to the visit's log line (e.g. how much is task-specific)."""
        return ""


# -- parameter accounting -------------------------------------------------------------------------
def split_param_count(model: nn.Module, shareable: list[str]) -> dict[str, int]:
    """Parameters of ``model`` inside the shareable layers (kernels) and outside (task_own)."""
    inside = {id(p) for name in shareable
              for p in model.get_submodule(name).parameters(recurse=False)}
    kernels = sum(p.numel() for p in model.parameters() if id(p) in inside)
    rest = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return {"kernels": kernels, "task_own": rest}


def head_param_count(model: nn.Module) -> int:
    """Parameters of ``model``'s classifier head(s) (part of its task_own)."""
    return sum(p.numel() for name in classifier_names(model)
               for p in model.get_submodule(name).parameters())


def additive_param_count(t0_counts: dict[str, int], tasks: dict[str, dict]) -> dict:
    """T0's parameters plus every task's own cost (methods that share with T0 only).

    Keys as cwps.bank.param_counts."""
    kernels, own, heads = (t0_counts[k] + sum(t["params"][k] for t in tasks.values())
                           for k in ("kernels", "task_own", "heads"))
    return param_counts(kernels, own, heads)


def param_ratios(counts: dict, backbone_params: int) -> dict[str, float]:
    """``param_ratio`` (the paper's: heads out of numerator and denominator, so fine-tuning
    reads 1 + K) and ``param_ratio_with_heads`` (every head in the numerator)."""
    return {"param_ratio": counts["backbone"] / backbone_params,
            "param_ratio_with_heads": counts["total"] / backbone_params}
