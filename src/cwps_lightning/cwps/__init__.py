"""The CWPS core, in plain PyTorch (no Lightning, no Hydra)."""

from .bank import KernelBank, TaskEntry
from .freeze import SharedChannelFreeze
from .layers import STAGES, CWPSConv2d, CWPSLinear, hard_mask
from .search import (
    DISTANCES,
    SearchResult,
    check_distance,
    init_mask_logits,
    kernel_distances,
    merged_kernel_ids,
    nearest_parents,
    search_parents,
)
from .step_compose import (
    StepComposeSGD,
    release_composed,
    use_forward_compose,
    use_step_compose,
)
from .store import MultiTaskStore, StoreError, save_store
from .surgery import (
    classifier_names,
    cwps_layers,
    inject_cwps,
    merge_cwps,
    set_stage,
    set_threshold,
    shareable_layers,
    sharing_stats,
)

__all__ = [
    "DISTANCES",
    "STAGES",
    "CWPSConv2d",
    "CWPSLinear",
    "KernelBank",
    "MultiTaskStore",
    "StoreError",
    "SearchResult",
    "SharedChannelFreeze",
    "StepComposeSGD",
    "TaskEntry",
    "check_distance",
    "classifier_names",
    "cwps_layers",
    "hard_mask",
    "init_mask_logits",
    "inject_cwps",
    "kernel_distances",
    "merge_cwps",
    "merged_kernel_ids",
    "nearest_parents",
    "release_composed",
    "search_parents",
    "save_store",
    "set_stage",
    "set_threshold",
    "shareable_layers",
    "sharing_stats",
    "use_forward_compose",
    "use_step_compose",
]
