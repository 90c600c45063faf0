"""Errors that mean "the input is wrong", reported to the user as one line (no traceback)."""

import re
from collections.abc import Sequence

#: what the line of a fit stopped by a diverged loss or a signal says of the run's store (the
#: job says instead that there is none, where no task was finished: train.task_wrapper)
STORE_KEEPS = "the store keeps the tasks finished before"
NO_STORE_YET = "no task was finished before it, so there is no store yet"
#: after STORE_KEEPS, where a fit diverged: the run dir resumes under its own settings only
DIVERGED_RUN_DIR = ("under this run's settings, which a run dir keeps: rerun with the lower "
                    "learning rate in a new run dir")

#: how many offending items an error message lists before "... and N more"
LIST_LIMIT = 10


def short_list(items: Sequence[str], limit: int = LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def as_typed(value) -> str:
    """A config value as an override types it: null, true, false; anything else its repr."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


#: what torch's DataLoader makes of an error raised in a worker process: the same class, built
#: from "Caught <class> in DataLoader worker process <n>.\nOriginal Traceback ... <class>: msg"
_WORKER = re.compile(r"Caught (\w+) (in DataLoader worker process \d+)\.\nOriginal Traceback")


class ConfigError(ValueError):
    """A bad configuration value or input file; the message names it and what is accepted.

    Raised in a DataLoader worker (an image found unreadable while a fit reads it), it comes
    back with the worker's traceback in its message: that is cut to the original line."""

    def __init__(self, *args):
        caught = _WORKER.match(args[0]) if len(args) == 1 and isinstance(args[0], str) else None
        if caught:
            kind, where = caught.groups()
            # the traceback ends "<module.>Kind: message" (the message may span lines)
            starts = list(re.finditer(rf"^(?:[\w.]+\.)?{kind}: ", args[0], re.MULTILINE))
            if starts:
                args = (f"{args[0][starts[-1].end():].rstrip()} ({where})",)
        super().__init__(*args)
