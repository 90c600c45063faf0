from .backbone import (
    ModelConfigError,
    backbone_param_count,
    check_model_name,
    create_backbone,
    head_classes,
    load_backbone_weights,
    task_model,
)
from .lit_module import CWPSLitModule, select_trainable

__all__ = [
    "CWPSLitModule",
    "ModelConfigError",
    "backbone_param_count",
    "check_model_name",
    "load_backbone_weights",
    "create_backbone",
    "head_classes",
    "select_trainable",
    "task_model",
]
