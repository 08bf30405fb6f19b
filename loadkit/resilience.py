"""Retry policy and circuit breaker, thin over tenacity.

Retry is data (stop, wait, retry-if) built from the plan's RetryPolicy; call sites
stay one line. The breaker counts consecutive infrastructure failures and, once
open, fails calls immediately until its cool-down passes, so a dead server is not
hammered by every writer at once. Bad data never trips it: only transient errors count.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, TypeVar

import tenacity

from loadkit.errors import (BatchRangeConflict, Category, CircuitOpenError, InterruptedRun, JobLockLost,
                            RunDeadlineExceeded, classify, is_deadlock)
from loadkit.plan import RetryPolicy

T = TypeVar("T")
log = logging.getLogger("loadkit.retry")
_deadlocks = 0  # deadlock/serialization retries made by this process's counting ``retrying`` calls
_deadlocks_lock = threading.Lock()


def deadlock_retries() -> int:
    """Deadlock and serialization-failure retries this process made so far (monotonic; a run reads
    the difference from its start). Writers report theirs per batch instead (``count_deadlocks=False``),
    since they may run in Ray worker processes."""
    with _deadlocks_lock:
        return _deadlocks


def _count_deadlock() -> None:
    global _deadlocks
    with _deadlocks_lock:
        _deadlocks += 1


class CircuitBreaker:
    """closed -> (N consecutive transient failures) -> open -> (cool-down) -> half-open -> closed."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = failures
        self._cooldown = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: Optional[float] = None
        self._lock = threading.Lock()
        self.trips = 0

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half-open" if self._clock() - self._opened_at >= self._cooldown else "open"

    def before_call(self) -> None:
        if self.state == "open":
            raise CircuitOpenError("database circuit is open after repeated failures; cooling down",
                                   cooldown_s=self._cooldown)

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None

    def record_failure(self, exc: BaseException) -> None:
        if classify(exc) is not Category.TRANSIENT or isinstance(exc, CircuitOpenError):
            return
        with self._lock:
            self._failures += 1
            if self._failures >= self._threshold and self._opened_at is None:
                self._opened_at = self._clock()
                self.trips += 1
            elif self._opened_at is not None:  # a failed half-open probe re-opens
                self._opened_at = self._clock()

    def call(self, fn: Callable[[], T]) -> T:
        self.before_call()
        try:
            result = fn()
        except BaseException as exc:
            self.record_failure(exc)
            raise
        self.record_success()
        return result


def _is_retryable(exc: BaseException) -> bool:
    # A stop (signal, run deadline, lost job lock, a batch range conflict) is "transient" for the rerun, never for
    # a retry in this run.
    return classify(exc) is Category.TRANSIENT and not isinstance(exc, (InterruptedRun, JobLockLost,
                                                                       RunDeadlineExceeded, BatchRangeConflict))


def retrying(policy: RetryPolicy, on_retry: Optional[Callable[[tenacity.RetryCallState], None]] = None,
             sleep: Callable[[float], None] = time.sleep, count_deadlocks: bool = True) -> tenacity.Retrying:
    """A tenacity Retrying for transient errors: exponential backoff with jitter, bounded attempts.

    Each retry of a deadlock or serialization failure (``errors.is_deadlock``) is counted in
    ``deadlock_retries()`` unless ``count_deadlocks`` is False (the caller reports it itself)."""

    def _log(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        if count_deadlocks and exc is not None and is_deadlock(exc):
            _count_deadlock()
        log.warning("transient failure (attempt %d/%d), retrying in %.2fs: %s",
                    state.attempt_number, policy.attempts, wait, exc)
        if on_retry is not None:
            on_retry(state)

    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=tenacity.wait_exponential(multiplier=policy.initial_wait_s, exp_base=policy.multiplier,
                                       max=policy.max_wait_s) + tenacity.wait_random(0, policy.jitter_s),
        retry=tenacity.retry_if_exception(_is_retryable),
        before_sleep=_log,
        sleep=sleep,
        reraise=True,
    )
