"""Batch sizing policy: a fixed size, or one that adapts to measured throughput and memory.

Pure and Ray-free: the driver feeds it every committed batch and publishes the size it
returns (execute.channel.SizeBoard); read tasks pick the new size up between chunks. A batch
is identified by its byte range, not its row count, so changing sizes mid-run keeps
exactly-once intact: a resume skips whatever ranges were committed, whatever their size.

The adaptive policy is hill climbing with a multiplicative back-off on memory pressure:
every window it compares rows/s with the previous window and keeps moving the size in
the same direction while throughput improves, reverses when it drops; above the memory
ceiling it halves the size at once (the "MD" of AIMD) and waits for the next window.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional


@dataclass(frozen=True)
class SizingSettings:
    policy: str = "fixed"  # fixed | adaptive
    size: int = 50_000
    min_size: int = 5_000
    max_size: int = 500_000
    # A decision needs at least this long and this many batches of evidence.
    window_s: float = 2.0
    window_batches: int = 2
    # Size multiplier per move; throughput changes smaller than tolerance count as noise.
    step: float = 2.0
    tolerance: float = 0.05
    memory_ceiling: float = 0.80


@dataclass
class Decision:
    size: int
    reason: str  # throughput-up | throughput-down | memory | bound
    rate: float


class BatchSizer:
    """Decides the rows per batch; ``observe`` returns a Decision when the size changes."""

    def __init__(self, settings: SizingSettings, now: Optional[float] = None) -> None:
        self.settings = settings
        self.size = self._clamp(settings.size)
        self._direction = 1
        self._last_rate: Optional[float] = None
        self._window_start = time.time() if now is None else now
        self._rows = 0
        self._batches = 0
        self.decisions: List[Decision] = []

    @property
    def adaptive(self) -> bool:
        return self.settings.policy == "adaptive"

    def _clamp(self, size: float) -> int:
        return int(min(self.settings.max_size, max(self.settings.min_size, size)))

    def restart_window(self, now: Optional[float] = None) -> None:
        """Start measuring afresh (after the pipeline's warm-up, or after a change)."""
        self._window_start = time.time() if now is None else now
        self._rows = self._batches = 0

    def observe(self, rows: int, memory_fraction: float, now: Optional[float] = None) -> Optional[Decision]:
        if not self.adaptive:
            return None
        now = time.time() if now is None else now
        self._rows += rows
        self._batches += 1
        if memory_fraction > self.settings.memory_ceiling and self.size > self.settings.min_size:
            self._direction = -1
            self._last_rate = None  # a memory-forced size says nothing about throughput
            return self._move(self.size / 2, "memory", 0.0, now)
        elapsed = now - self._window_start
        if elapsed < self.settings.window_s or self._batches < self.settings.window_batches:
            return None
        rate = self._rows / elapsed
        reason = self._judge(rate)
        target = self.size * self.settings.step if self._direction > 0 else self.size / self.settings.step
        if self._clamp(target) == self.size:  # at a bound: hold until throughput drops, which turns us round
            self.restart_window(now)
            return None
        return self._move(target, reason, rate, now)

    def _judge(self, rate: float) -> str:
        """Keep the direction while throughput holds or improves; reverse when it drops."""
        previous, self._last_rate = self._last_rate, rate
        if previous is not None and rate < previous * (1 - self.settings.tolerance):
            self._direction = -self._direction
        return "throughput-up" if self._direction > 0 else "throughput-down"

    def _move(self, target: float, reason: str, rate: float, now: float) -> Optional[Decision]:
        self.restart_window(now)
        new = self._clamp(target)
        if new == self.size:
            return None
        self.size = new
        decision = Decision(new, reason, rate)
        self.decisions.append(decision)
        return decision
