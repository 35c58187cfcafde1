"""The bench's progress line on stderr: which entry and seed runs, how many are done, and an ETA.

The ETA adds, for each run still to do, the mean wall time of the finished runs of the same entry,
else of every finished run of the same kind (trained or prompted), else of every finished run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from .spec import RunSpec


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Tracks finished runs' wall times; `start` announces a run (nothing when `show` is False)."""

    def __init__(self, total: int, show: bool = True, write: Callable[[str], None] | None = None) -> None:
        self.total, self.show = total, show
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.walls: list[tuple[RunSpec, float]] = []
        self.started = time.perf_counter()
        self.done = 0

    def eta(self, remaining: list[RunSpec]) -> float | None:
        """Seconds the `remaining` runs should take; None before any run has finished."""
        if not self.walls:
            return None
        total = 0.0
        for spec in remaining:
            same = [w for s, w in self.walls if s.label == spec.label]
            kind = [w for s, w in self.walls if s.prompted == spec.prompted]
            pool = same or kind or [w for _, w in self.walls]
            total += sum(pool) / len(pool)
        return total

    def start(self, spec: RunSpec, seed: int, remaining: list[RunSpec]) -> None:
        """Announce run `spec` / `seed`; `remaining` holds it and every run after it."""
        if not self.show:
            return
        eta = self.eta(remaining)
        left = f"about {_clock(eta)} left" if eta is not None else "ETA after the first run"
        self.write(f"peftkit bench: [{self.done + 1}/{self.total}] {spec.label} (seed {seed}) — "
                   f"{_clock(time.perf_counter() - self.started)} elapsed, {left}")

    def finish(self, spec: RunSpec, wall: float) -> None:
        self.walls.append((spec, wall))
        self.done += 1

    def skip(self, spec: RunSpec, wall: float | None) -> None:
        """A run found already done (a resumed bench): counted, and its recorded wall time kept for the ETA."""
        if wall is not None:
            self.walls.append((spec, wall))
        self.done += 1
