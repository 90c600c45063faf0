"""cwps-lightning: Channel-Wise Parameter Sharing (CWPS) for knowledge transfer.

The core (``cwps_lightning.cwps``) is plain PyTorch; importing this package does not import
Lightning or Hydra.
"""

from .cwps import (
    CWPSConv2d,
    CWPSLinear,
    KernelBank,
    MultiTaskStore,
    cwps_layers,
    inject_cwps,
    merge_cwps,
    search_parents,
    set_stage,
)

__version__ = "0.1.0"

__all__ = [
    "CWPSConv2d",
    "CWPSLinear",
    "KernelBank",
    "MultiTaskStore",
    "__version__",
    "cwps_layers",
    "inject_cwps",
    "merge_cwps",
    "search_parents",
    "set_stage",
]
