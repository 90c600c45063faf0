from .mask_stage import MaskStageCallback

__all__ = ["MaskStageCallback"]
