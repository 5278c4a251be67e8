"""Where a sequence of runs stands (``compare``, ``sweep``): ``[4/6] sasrec seed 1 · ETA 2m10s``.

Plain text lines, meant to be printed even under ``--quiet``. The ETA is the mean duration of the
runs that trained from the start in this call, times the runs left. Runs reused from an earlier call
take no time, and a resumed run only trains the epochs it had left, so neither says how long the
others take: they do not count.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the run module reads parquet; progress lines must stay cheap to import
    from m3bsr.engine.runs import Reuse


def duration(seconds: float) -> str:
    """``42`` → ``"42s"``, ``130`` → ``"2m10s"``, ``7260`` → ``"2h01m"``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class RunProgress:
    """Counts runs through :meth:`start` / :meth:`finish` and words each start as one line."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic):
        self.total, self.clock = total, clock
        self.done = self.resumed = 0
        self.durations: list[float] = []
        self.t0 = clock()
        self._started: float | None = None

    def start(self, label: str) -> str:
        """The line for the next run, e.g. ``[4/6] sasrec seed 1 · ETA 2m10s (40s per run)``."""
        self._started = self.clock()
        line = f"[{self.done + 1}/{self.total}] {label}"
        if self.durations:
            per_run = sum(self.durations) / len(self.durations)
            line += f" · ETA {duration(per_run * (self.total - self.done))} ({duration(per_run)} per run)"
        return line

    def finish(self, action: Reuse) -> None:
        """The run started last is done; ``action`` = what was done: ``train``, ``resume`` or ``reuse``
        (the words of :meth:`m3bsr.engine.runs.RunDir.reuse`); only ``train`` times the ETA."""
        if action not in ("train", "resume", "reuse"):
            raise ValueError(f"unknown run action {action!r}")
        if action == "train" and self._started is not None:
            self.durations.append(self.clock() - self._started)
        self.resumed += action == "resume"
        self.done += 1
        self._started = None

    def summary(self, what: str = "runs") -> str:
        """``"6 runs done in 4m02s (4 trained, 2 reused)"``; resumed runs are counted when there are any."""
        resumed = f"{self.resumed} resumed, " if self.resumed else ""
        return (f"{self.done} {what} done in {duration(self.clock() - self.t0)} ({len(self.durations)} trained, "
                f"{resumed}{self.done - len(self.durations) - self.resumed} reused)")
