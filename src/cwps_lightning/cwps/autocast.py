"""Autocast inside custom autograd functions (layers._ComposedOp, small_input._WindowConv).

Autocast does not reach inside a torch.autograd.Function: the function casts its inputs the way
autocast would for a conv / linear (``autocast_dtype``) and runs the op with autocast off
(``run_plain``), so the backward sees the same dtypes as the forward.
"""

from __future__ import annotations

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` now, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def run_plain(device_type: str, fn, *args):
    """Run ``fn`` outside autocast: its inputs are already cast the way autocast would."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return fn(*args)
    return fn(*args)
