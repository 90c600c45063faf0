"""Method names the config accepts, and the classes they stand for.

A built-in method is named by its short name (``cwps.baselines=[finetune,taps]``); any other
is named by ``package.module:Class``, a Method subclass importable from where the run starts
(a new method is one file plus that config entry; see the README).
"""

from __future__ import annotations

import importlib

from .base import Method

#: short name -> "module:Class" (imported on first use, so a run loads only what it runs)
BUILTIN = {
    "cwps": "cwps_lightning.cwps.method:CWPSMethod",
    "finetune": "cwps_lightning.methods.baselines:FineTune",
    "frozen": "cwps_lightning.methods.baselines:Frozen",
    "taps": "cwps_lightning.methods.taps:TAPSMethod",
    "piggyback": "cwps_lightning.methods.piggyback:PiggybackMethod",
}
#: what ``cwps.baselines`` may list by short name (CWPS itself always runs)
BASELINE_NAMES = tuple(n for n in BUILTIN if n != "cwps")
#: what a cwps.baselines that lists CWPS itself is told (the settings' check and the job's)
CWPS_ALWAYS_RUNS = (f"CWPS runs in every job; list the methods to compare it with "
                    f"({list(BASELINE_NAMES)} or 'package.module:Class')")


def method_class(name: str) -> type[Method]:
    """The Method subclass ``name`` stands for; ValueError naming what is accepted if none."""
    path = BUILTIN.get(name, name)
    if ":" not in path:
        raise ValueError(
            f"unknown method {name!r}; accepted: {list(BASELINE_NAMES)} or "
            "'package.module:Class' (a Method subclass)"
        )
    module_name, _, class_name = path.partition(":")
    if not module_name or not class_name:  # (':' failed in importlib: "Empty module name")
        raise ValueError(f"method {name!r}: accepted: 'package.module:Class' (a Method "
                         f"subclass: a module and a class, both named), or one of "
                         f"{list(BASELINE_NAMES)}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as err:  # (a module of one's own: found from the working directory
        # when the job runs as `python -m`, else on PYTHONPATH)
        raise ValueError(f"method {name!r}: cannot import {path} ({err}; a module of your own "
                         f"must be importable: under the working directory, or on "
                         f"PYTHONPATH)") from None
    except AttributeError as err:
        raise ValueError(f"method {name!r}: cannot import {path} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"method {name!r}: {path} is not a subclass of "
                         "cwps_lightning.methods.base.Method")
    return cls

