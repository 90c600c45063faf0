from .mask_stage import MaskStageCallback
from .sigterm import SigtermAtNextBatch

__all__ = ["MaskStageCallback", "SigtermAtNextBatch"]
