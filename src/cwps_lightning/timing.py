"""Where a job's wall time goes: named parts summed over the run (results.json ``time_split``).

One Stopwatch per job; the steps that take time are timed into it: Trainer construction, the
training inside each fit (``trainer.fit``), evaluation, CPMS, store writes, figures, and
T0's own remainder (data, cache). Parts are exclusive: a part timed inside another
pauses it (T0's fit counts as training, not as ``t0``), so the parts and ``other`` add up to
the total. Wall-clock seconds (time.perf_counter); under DDP they are rank 0's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

#: the parts, in the order results.json lists them
PARTS = ("t0", "trainer_construction", "training", "evaluation", "cpms", "store_writes",
         "figures")


class Stopwatch:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self._stack: list[str] = []
        self._since = 0.0

    def _check(self, part: str) -> None:
        if part not in self.seconds:
            raise KeyError(f"unknown time part {part!r}; known: {list(PARTS)}")

    def add(self, part: str, seconds: float) -> None:
        self._check(part)
        self.seconds[part] += seconds

    def _charge(self, now: float) -> None:
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        self._since = now

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        self._check(part)
        self._charge(time.perf_counter())
        self._stack.append(part)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._stack.pop()

    def split(self, total: float) -> dict:
        """Every part in seconds and as a share of ``total``; the rest is ``other``."""
        parts = {**self.seconds, "other": max(total - sum(self.seconds.values()), 0.0)}
        return {"total": round(total, 2),
                "seconds": {k: round(v, 2) for k, v in parts.items()},
                "percent": {k: round(100 * v / total, 2) if total > 0 else 0.0
                            for k, v in parts.items()}}
