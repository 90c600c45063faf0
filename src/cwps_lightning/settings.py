"""The run's settings as typed dataclasses: the one source of every default.

The Hydra config (conf/) is these dataclasses registered as schemas (see config.py); its YAML
files only override them, so the library used from plain Python and the CLI run the same method
with the same defaults. Plain Python, no Hydra: ``CWPSSettings()`` is what
``python -m cwps_lightning.train`` runs. Checks that a type cannot express sit in
``__post_init__`` and raise ValueError naming the key and what is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .cwps.layers import MASK_GRADS, check_threshold
from .cwps.search import (
    DEFAULT_DISTANCE,
    DEFAULT_INIT_SCOPE,
    DEFAULT_MASK_INIT,
    DISTANCES,
    INIT_SCOPES,
    MASK_INITS,
)
from .cwps.step_compose import COMPOSE_MODES
from .methods.base import OPTIMIZERS
from .methods.registry import BASELINE_NAMES, CWPS_ALWAYS_RUNS

MODES = ("incremental", "joint")
#: the largest float32, the mask logits' type
FLOAT32_MAX = 3.4028234663852886e38
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: the baselines of the default run
BASELINES = ("finetune", "frozen")
LR_SCHEDULES = ("task", "per_fit")
LOGGERS = ("csv", "wandb", "none")
WANDB_MODES = ("online", "offline", "disabled")


def _one_of(key: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"{key} must be one of {list(accepted)}, got {value!r}")


#: config keys added after runs were made, at the value that computes what those runs
#: computed: left out of a run's resume hash at that value (persist.result_config), so such a
#: run's store still resumes and its fit checkpoints, whose folder is named by the hash, are
#: still found; the T0 cache key reads them as absent too (pretrain.t0_spec)
ADDED_KEYS_AT_OLD_VALUE = {
    ("cwps", "compose"): "forward",
    # Lightning's defaults, which runs before these keys were in conf/trainer/default.yaml had
    # by leaving them out (None: no clipping, as a missing key)
    ("trainer", "num_nodes"): 1,
    ("trainer", "gradient_clip_val"): None,
    ("trainer", "accumulate_grad_batches"): 1,
}


@dataclass
class StageSettings:
    """Epochs per phase of every task visit (paper 3.2: warm-up fine-tune, soft mask, hard mask).

    The paper's split, read one way for the default and every preset: of a visit's E epochs
    (the baselines train E too), the warm-up takes E/4 (section 3.2.1, "one-quarter of the
    total training epochs"); of the mask training that follows, one quarter is soft and three
    quarters hard (section 3.2.4; appendix A.1 "one-quarter of the epochs are dedicated to the
    soft mask training stage, while the remainder focuses on the hard"). E = 4 gives 1 / 0.75 /
    2.25; the paper's E = 40 gives 10 / 7.5 / 22.5. The soft-to-hard switch may fall inside an
    epoch (it counts batches); the warm-up and the whole mask fit are whole epochs.
    """

    warmup_epochs: int = 1
    soft_epochs: float = 0.75
    hard_epochs: float = 2.25
    #: task: one cosine schedule over warm-up + soft + hard, as a fine-tuning run of the same
    #: epochs; per_fit: the warm-up fit and the mask fit each restart the cosine
    lr_schedule: str = "task"

    def __post_init__(self):
        for key in ("warmup_epochs", "soft_epochs", "hard_epochs"):
            _non_negative(f"cwps.stages.{key}", getattr(self, key))
        if int(self.warmup_epochs) != self.warmup_epochs:
            raise ValueError(
                f"cwps.stages.warmup_epochs must be a whole number, got {self.warmup_epochs}")
        self.warmup_epochs = int(self.warmup_epochs)
        mask = self.soft_epochs + self.hard_epochs
        if mask < 1 or abs(mask - round(mask)) > 1e-9:
            raise ValueError(
                "cwps.stages: soft_epochs + hard_epochs (the mask fit) must be a whole number "
                f">= 1, got {self.soft_epochs} + {self.hard_epochs} = {mask}")
        _one_of("cwps.stages.lr_schedule", self.lr_schedule, LR_SCHEDULES)

    @property
    def mask_epochs(self) -> int:
        return round(self.soft_epochs + self.hard_epochs)

    @property
    def total_epochs(self) -> int:
        return self.warmup_epochs + self.mask_epochs


@dataclass
class CWPSSettings:
    """The method: mode, lambda, CPMS distance, mask-logit init, stages, and the baselines
    trained in the same job."""

    #: incremental: one pass over the tasks (paper 3.2); joint: Algorithm 1 (paper 3.3)
    mode: str = "incremental"
    #: passes over the tasks; > 1 needs mode=joint
    iterations: int = 1
    #: lambda: a channel is task-specific where sigmoid(s) >= threshold. 0.7 on the digits
    #: benchmark, chosen by a lambda sweep over seeds (README); the paper presets use 0.5
    threshold: float = 0.7
    #: CPMS kernel distance: l2 | cosine (1 - cosine similarity)
    distance: str = DEFAULT_DISTANCE
    #: mask-logit init over all layers at once (global) or within each layer (layer)
    init_scope: str = DEFAULT_INIT_SCOPE
    #: mask-logit init (paper Table 4): log_standardized (z-scores of log D, D the CPMS
    #: distances) | standardized (z-scores of D) | mean_ratio (3 (d - mean d) / mean d) |
    #: random (Gaussian) | constant (cwps/search.py)
    mask_init: str = DEFAULT_MASK_INIT
    #: the init's scale (standardized/mean_ratio: factor; random: std; constant: the logit);
    #: null = 1 / 1 / 3 / 1 / 0 respectively
    init_scale: Optional[float] = None  # noqa: UP045
    #: hard-stage gradient to the mask scores: sigmoid (dL/dm * sigmoid': Eq. 10 with F alone
    #: passed straight through, our reading of the paper, which names no formula) or identity
    #: (dL/dm, the straight-through estimator TAPS uses)
    mask_grad: str = "sigmoid"
    #: where the soft / hard weight is composed (cwps/step_compose.py): forward (every forward,
    #: autograd through the compose) | step (kept between steps, written by the optimiser step:
    #: the fit steps with cwps.StepComposeSGD; SGD only, no gradient clipping, no 16-mixed).
    #: step pays at large inputs (resnet18 at 112 px) and costs more at the digits job's 32 px
    #: (README, "Compose at the step")
    compose: str = "forward"
    stages: StageSettings = field(default_factory=StageSettings)
    #: methods run in the same job for the results table, after CWPS: finetune, frozen, taps,
    #: piggyback, or 'package.module:Class' (a Method subclass); [] for none
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
        _one_of("cwps.mask_init", self.mask_init, MASK_INITS)
        _one_of("cwps.mask_grad", self.mask_grad, MASK_GRADS)
        _one_of("cwps.compose", self.compose, COMPOSE_MODES)
        # (the logits are float32: 1e40 overflowed at the mask's making, after T0)
        if self.init_scale is not None and not abs(self.init_scale) <= FLOAT32_MAX:
            raise ValueError(f"cwps.init_scale must be a finite number (float32: magnitude at "
                             f"most {FLOAT32_MAX:.4g}) or null, got {self.init_scale}")
        if self.init_scale is not None and self.mask_init != "constant" and \
                not self.init_scale > 0:  # (a factor or std <= 0 turned the init around:
            # the channels nearest their parent started task-specific)
            raise ValueError(f"cwps.init_scale must be > 0 (or null) for cwps.mask_init="
                             f"{self.mask_init}, a factor or std; got {self.init_scale} (any "
                             f"finite logit for mask_init=constant)")
        if "cwps" in self.baselines:
            raise ValueError(f"cwps.baselines lists cwps: {CWPS_ALWAYS_RUNS}")
        bad = [b for b in self.baselines if b not in BASELINE_NAMES and ":" not in b]
        if bad:
            raise ValueError(
                f"cwps.baselines has unknown entries {bad}; accepted: {list(BASELINE_NAMES)} "
                "or 'package.module:Class' (a Method subclass)"
            )
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"cwps.baselines lists a method twice: {list(self.baselines)}")
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


def _positive(key: str, value: float) -> None:
    if not 0.0 < value < math.inf:  # also catches NaN
        raise ValueError(f"{key} must be a finite number > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if not 0.0 <= value < math.inf:  # also catches NaN
        raise ValueError(f"{key} must be a finite number >= 0, got {value}")


@dataclass
class TAPSSettings:
    """TAPS (Wallingford et al., CVPR 2022) for the digits budget (4 epochs per task): AdamW on
    residuals, gates, norms and head, one cosine schedule; the gate penalty from epoch
    ``penalty_from_epoch`` on (the authors' warm-up epochs without it)."""

    #: weight of the gate penalty mean |s| (the authors use 0.1-1)
    lam: float = 0.5
    optimizer: str = "adamw"
    lr: float = 1.0e-3
    #: the gate scores' own learning rate (no weight decay): at lr a gate moves at most ~lr per
    #: step, too little to cross from 0.15 to 0.1 in the digits budget's ~100 penalised steps
    gate_lr: float = 1.0e-2
    weight_decay: float = 1.0e-4
    #: 0-based epoch from which the penalty counts (the CWPS warm-up's length by default)
    penalty_from_epoch: int = 1

    def __post_init__(self):
        _non_negative("methods.taps.lam", self.lam)
        _one_of("methods.taps.optimizer", self.optimizer, OPTIMIZERS)
        _positive("methods.taps.lr", self.lr)
        _positive("methods.taps.gate_lr", self.gate_lr)
        _non_negative("methods.taps.weight_decay", self.weight_decay)
        if self.penalty_from_epoch < 0:
            raise ValueError(
                f"methods.taps.penalty_from_epoch must be >= 0, got {self.penalty_from_epoch}")


@dataclass
class PiggybackSettings:
    """Piggyback (Mallya et al., ECCV 2018) for the digits budget: Adam, masks at ``mask_lr``,
    the head at ``lr``; normalisation layers frozen (parameters and running statistics, the
    authors' default) unless ``train_norms`` (their ``--train_bn``)."""

    optimizer: str = "adam"
    #: learning rate of the head (and of the normalisation layers with train_norms)
    lr: float = 1.0e-3
    #: the masks' learning rate: the authors' 1e-4 moves too few masks across the threshold in
    #: the digits budget (99.7% kept, measured); 1e-3 keeps about 90-94%
    mask_lr: float = 1.0e-3
    train_norms: bool = False

    def __post_init__(self):
        _one_of("methods.piggyback.optimizer", self.optimizer, OPTIMIZERS)
        _positive("methods.piggyback.lr", self.lr)
        _positive("methods.piggyback.mask_lr", self.mask_lr)


@dataclass
class MethodsSettings:
    """Settings of the methods ``cwps.baselines`` can add to a run (others keep defaults)."""

    taps: TAPSSettings = field(default_factory=TAPSSettings)
    piggyback: PiggybackSettings = field(default_factory=PiggybackSettings)

    def __post_init__(self):
        if isinstance(self.taps, dict):
            self.taps = TAPSSettings(**self.taps)
        if isinstance(self.piggyback, dict):
            self.piggyback = PiggybackSettings(**self.piggyback)


@dataclass
class OptimSettings:
    """SGD + cosine schedule for every fit (paper appendix A.1); mask logits get their own lr."""

    lr: float = 0.05
    mask_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5.0e-4

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        for key in ("mask_lr", "momentum", "weight_decay"):
            _non_negative(f"optim.{key}", getattr(self, key))
        if not self.momentum < 1:  # (1.5 ran, and every method's training collapsed)
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")


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
    #: torch.compile the task model for every fit's training steps (the merged model and the
    #: store are unaffected); off by default: on the 2-core CPU it does not pay (README)
    compile: bool = False
    #: torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"

    def __post_init__(self):
        _one_of("model.compile_mode", self.compile_mode, COMPILE_MODES)


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
        _positive("t0.lr", self.lr)


@dataclass
class LoggerSettings:
    """Where each fit's curves go: csv (<run dir>/logs), wandb, or none."""

    kind: str = "csv"
    project: str = "cwps-lightning"
    entity: Optional[str] = None  # noqa: UP045
    #: null = <the run directory's parent>/<the run directory> (a multirun's jobs: one group)
    group: Optional[str] = None  # noqa: UP045
    #: null = WANDB_MODE or online; offline | online | disabled
    mode: Optional[str] = None  # noqa: UP045
    tags: list[str] = field(default_factory=list)
    #: W&B: upload the store as an artifact of the job's summary run
    log_store: bool = False

    def __post_init__(self):
        _one_of("logger.kind", self.kind, LOGGERS)
        if self.mode is not None:
            _one_of("logger.mode", self.mode, WANDB_MODES)
