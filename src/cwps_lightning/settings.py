"""The run's settings as typed dataclasses: the one source of every default.

The Hydra config (conf/) is these dataclasses registered as schemas (see config.py); its YAML
files only override them, so the library used from plain Python and the CLI run the same method
with the same defaults. Plain Python, no Hydra: ``CWPSSettings()`` is what
``python -m cwps_lightning.train`` runs. Checks that a type cannot express sit in
``__post_init__`` and raise ValueError naming the key and what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .cwps.layers import check_threshold
from .cwps.search import DEFAULT_DISTANCE, DEFAULT_INIT_SCOPE, DISTANCES, INIT_SCOPES

MODES = ("incremental", "joint")
BASELINES = ("finetune", "frozen")
LR_SCHEDULES = ("task", "per_fit")
LOGGERS = ("csv", "wandb", "none")
WANDB_MODES = ("online", "offline", "disabled")


def _one_of(key: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"{key} must be one of {list(accepted)}, got {value!r}")


@dataclass
class StageSettings:
    """Epochs per phase of every task visit (paper 3.2: warm-up fine-tune, soft mask, hard mask)."""

    warmup_epochs: int = 1
    soft_epochs: int = 1
    hard_epochs: int = 2
    #: task: one cosine schedule over warm-up + soft + hard, as a fine-tuning run of the same
    #: epochs; per_fit: the warm-up fit and the mask fit each restart the cosine
    lr_schedule: str = "task"

    def __post_init__(self):
        for key in ("warmup_epochs", "soft_epochs", "hard_epochs"):
            if getattr(self, key) < 0:
                raise ValueError(f"cwps.stages.{key} must be >= 0, got {getattr(self, key)}")
        if self.soft_epochs + self.hard_epochs == 0:
            raise ValueError("cwps.stages: soft_epochs + hard_epochs must be >= 1")
        _one_of("cwps.stages.lr_schedule", self.lr_schedule, LR_SCHEDULES)

    @property
    def total_epochs(self) -> int:
        return self.warmup_epochs + self.soft_epochs + self.hard_epochs


@dataclass
class CWPSSettings:
    """The method: mode, lambda, CPMS distance, mask-logit init, stages, and the baselines
    trained in the same job."""

    #: incremental: one pass over the tasks (paper 3.2); joint: Algorithm 1 (paper 3.3)
    mode: str = "incremental"
    #: passes over the tasks; > 1 needs mode=joint
    iterations: int = 1
    #: lambda: a channel is task-specific where sigmoid(s) >= threshold
    threshold: float = 0.5
    #: CPMS kernel distance: l2 | cosine (1 - cosine similarity)
    distance: str = DEFAULT_DISTANCE
    #: mask-logit init over all layers at once (global) or within each layer (layer)
    init_scope: str = DEFAULT_INIT_SCOPE
    stages: StageSettings = field(default_factory=StageSettings)
    #: methods run in the same job for the results table; [] for none
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))

    def __post_init__(self):
        if isinstance(self.stages, dict):  # CWPSSettings(stages={...}) from plain Python
            self.stages = StageSettings(**self.stages)
        _one_of("cwps.mode", self.mode, MODES)
        if self.iterations < 1:
            raise ValueError(f"cwps.iterations must be >= 1, got {self.iterations}")
        if self.mode == "incremental" and self.iterations != 1:
            raise ValueError(
                f"cwps.iterations={self.iterations} needs cwps.mode=joint (incremental = one pass)"
            )
        try:
            self.threshold = check_threshold(self.threshold)
        except ValueError as err:
            raise ValueError(f"cwps.{err}") from None
        _one_of("cwps.distance", self.distance, DISTANCES)
        _one_of("cwps.init_scope", self.init_scope, INIT_SCOPES)
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(
                f"cwps.baselines has unknown entries {bad}; accepted: {list(BASELINES)}"
            )
        self.baselines = list(self.baselines)

    def lr_windows(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """The cosine-schedule windows of the warm-up fit and the mask fit.

        "task": one schedule over all of the task's epochs, the warm-up its first part (as a
        fine-tuning run of the same epochs); "per_fit": each fit restarts the schedule.
        """
        s = self.stages
        if s.lr_schedule == "per_fit" or s.warmup_epochs == 0:
            return (0.0, 1.0), (0.0, 1.0)
        split = s.warmup_epochs / s.total_epochs
        return (0.0, split), (split, 1.0)

    @property
    def total_epochs(self) -> int:
        return self.stages.total_epochs


@dataclass
class OptimSettings:
    """SGD + cosine schedule for every fit (paper appendix A.1); mask logits get their own lr."""

    lr: float = 0.05
    mask_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5.0e-4

    def __post_init__(self):
        for key in ("lr", "mask_lr", "momentum", "weight_decay"):
            value = getattr(self, key)
            if not value >= 0.0:  # also catches NaN
                raise ValueError(f"optim.{key} must be >= 0, got {value}")
        if self.lr == 0.0:
            raise ValueError("optim.lr must be > 0")


@dataclass
class ModelSettings:
    """The backbone: any timm model name; T0 from a file, timm's hub or the benchmark."""

    name: str = "resnet18"
    #: extra timm.create_model arguments (e.g. img_size for ViTs)
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: a checkpoint file for T0 (wins over pretrained)
    weights: Optional[str] = None  # noqa: UP045 - OmegaConf reads Optional, not "str | None"
    #: true: timm hub weights (needs network or a filled HF cache); false: the benchmark's T0
    #: pretraining
    pretrained: bool = False
    #: train in NHWC memory format (faster convolutions on CPU and GPU)
    channels_last: bool = True


@dataclass
class T0Settings:
    """T0 pretraining, used when the benchmark has a pretraining task and model.weights is null."""

    epochs: int = 3
    lr: float = 0.05
    #: cache the pretrained T0 under paths.cache_dir, keyed by a hash of what decides it
    cache: bool = True

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"t0.epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0.0:
            raise ValueError(f"t0.lr must be > 0, got {self.lr}")


@dataclass
class LoggerSettings:
    """Where each fit's curves go: csv (<run dir>/logs), wandb, or none."""

    kind: str = "csv"
    project: str = "cwps-lightning"
    entity: Optional[str] = None  # noqa: UP045
    #: null = the run directory's name
    group: Optional[str] = None  # noqa: UP045
    #: null = WANDB_MODE or online; offline | online | disabled
    mode: Optional[str] = None  # noqa: UP045
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        _one_of("logger.kind", self.kind, LOGGERS)
        if self.mode is not None:
            _one_of("logger.mode", self.mode, WANDB_MODES)
