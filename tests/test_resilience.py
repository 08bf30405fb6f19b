"""Retry, classification, circuit breaker and pool health: the pieces the fault suite relies on.

Waits and clocks are injected (tenacity's sleep, the breaker's clock), so nothing here sleeps;
the pool test terminates a real backend on the real server (only its own, by application_name).
"""
from __future__ import annotations

import uuid
from typing import Callable, List

import psycopg2
import pytest

from loadkit.postgres.db import ConnectionPool, application_name, with_application_name
from loadkit.errors import (Category, CircuitOpenError, ConfigError, PermanentDBError, SourceDataError,
                            TransientDBError, as_loadkit_error, classify, unwrap)
from loadkit.plan import RetryPolicy
from loadkit.resilience import CircuitBreaker, retrying


class DriverError(Exception):
    """Stands for a driver exception: carries a SQLSTATE the way psycopg2 (pgcode) does."""

    def __init__(self, pgcode: str) -> None:
        super().__init__(f"server said {pgcode}")
        self.pgcode = pgcode


@pytest.mark.parametrize("code, category", [
    ("57P01", Category.TRANSIENT),  # admin_shutdown (pg_terminate_backend, restart)
    ("57P02", Category.TRANSIENT),  # crash_shutdown
    ("40001", Category.TRANSIENT),  # serialization_failure
    ("40P01", Category.TRANSIENT),  # deadlock_detected
    ("53300", Category.TRANSIENT),  # too_many_connections
    ("53100", Category.TRANSIENT),  # disk_full: the server's problem, may clear
    ("08006", Category.TRANSIENT),  # connection_failure
    ("08001", Category.TRANSIENT),  # sqlclient_unable_to_establish_sqlconnection
    ("55P03", Category.TRANSIENT),  # lock_not_available
    ("22P02", Category.SOURCE_DATA),  # invalid_text_representation
    ("23505", Category.SOURCE_DATA),  # unique_violation
    ("42P01", Category.BUG),  # undefined_table
    ("42501", Category.OPERATOR),  # insufficient_privilege: a GRANT, not a code change
    ("25006", Category.OPERATOR),  # read_only_sql_transaction: pointed at a standby
    ("3D000", Category.OPERATOR),  # invalid_catalog_name: the database does not exist
    ("28P01", Category.OPERATOR),  # invalid_password
    ("XX000", Category.BUG),  # internal_error
])
def test_sqlstate_classification(code: str, category: Category) -> None:
    assert classify(DriverError(code)) is category


def test_loadkit_errors_and_unknowns_classify_by_type() -> None:
    assert classify(ConfigError("bad key", key="x")) is Category.CONFIG
    assert classify(SourceDataError("bad file")) is Category.SOURCE_DATA
    assert classify(CircuitOpenError("open")) is Category.TRANSIENT
    assert classify(ConnectionResetError("peer reset")) is Category.TRANSIENT
    assert classify(KeyError("oops")) is Category.BUG  # unknown: fail fast, never retried


def test_wrapped_cause_is_classified_and_kept() -> None:
    """Ray re-raises a worker's error wrapped (RayTaskError -> UserCodeException -> cause)."""
    inner = TransientDBError("server closed the connection", sqlstate="57P01")
    try:
        try:
            raise inner
        except TransientDBError as exc:
            raise RuntimeError("UserCodeException: map_batches failed") from exc
    except RuntimeError as outer:
        assert classify(outer) is Category.TRANSIENT
        assert unwrap(outer) is inner
    # An error raised while handling another is its own failure: no borrowing of the context.
    try:
        try:
            raise TransientDBError("lost")
        except TransientDBError:
            raise KeyError("bug in the handler")
    except KeyError as exc:
        assert classify(exc) is Category.BUG


def test_as_loadkit_error_keeps_sqlstate_and_context() -> None:
    err = as_loadkit_error(DriverError("40P01"), table="t", batch_id=7)
    assert isinstance(err, TransientDBError) and err.context == {"sqlstate": "40P01", "table": "t", "batch_id": 7}
    assert isinstance(as_loadkit_error(DriverError("42P01")), PermanentDBError)
    import pickle

    assert pickle.loads(pickle.dumps(err)).context == err.context  # crosses Ray processes intact


def _policy(attempts: int = 4, jitter: float = 0.1) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, initial_wait_s=0.5, max_wait_s=20.0, multiplier=2.0, jitter_s=jitter,
                       breaker_failures=3, breaker_cooldown_s=10.0)


def _failing(times: int, exc: Callable[[], BaseException]) -> Callable[[], str]:
    calls = {"n": 0}

    def fn() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise exc()
        return "ok"

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def test_transient_errors_back_off_exponentially_with_bounded_jitter() -> None:
    sleeps: List[float] = []
    fn = _failing(3, lambda: DriverError("40P01"))
    assert retrying(_policy(), sleep=sleeps.append)(fn) == "ok"
    assert len(sleeps) == 3
    for waited, base in zip(sleeps, [0.5, 1.0, 2.0]):
        assert base <= waited <= base + 0.1


def test_retries_stop_at_the_configured_attempts_with_the_cause() -> None:
    sleeps: List[float] = []
    fn = _failing(10, lambda: DriverError("57P01"))
    with pytest.raises(DriverError, match="57P01"):
        retrying(_policy(attempts=3, jitter=0.0), sleep=sleeps.append)(fn)
    assert sleeps == [0.5, 1.0] and fn.calls["n"] == 3  # type: ignore[attr-defined]


def test_permanent_errors_fail_fast() -> None:
    sleeps: List[float] = []
    fn = _failing(1, lambda: DriverError("22P02"))
    with pytest.raises(DriverError):
        retrying(_policy(), sleep=sleeps.append)(fn)
    assert sleeps == [] and fn.calls["n"] == 1  # type: ignore[attr-defined]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_cools_down_half_opens_and_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown_s=10.0, clock=clock)
    down = _failing(100, lambda: DriverError("08006"))
    for _ in range(3):
        with pytest.raises(DriverError):
            breaker.call(down)
    assert breaker.state == "open" and breaker.trips == 1
    with pytest.raises(CircuitOpenError):  # fails at once: the dead server is not called
        breaker.call(down)
    assert down.calls["n"] == 3  # type: ignore[attr-defined]
    clock.now += 10.0
    assert breaker.state == "half-open"
    with pytest.raises(DriverError):  # the probe fails: open again for a full cool-down
        breaker.call(down)
    assert breaker.state == "open"
    clock.now += 9.9
    assert breaker.state == "open"
    clock.now += 0.1
    assert breaker.call(lambda: "up") == "up"
    assert breaker.state == "closed"


def test_bad_data_never_trips_the_breaker() -> None:
    breaker = CircuitBreaker(failures=2, cooldown_s=10.0, clock=Clock())
    for _ in range(5):
        with pytest.raises(DriverError):
            breaker.call(_failing(1, lambda: DriverError("23505")))
    assert breaker.state == "closed" and breaker.trips == 0


def test_pool_pre_ping_replaces_a_terminated_connection(pg_dsn: str) -> None:
    name = application_name(uuid.uuid4().hex[:12], "pooltest")
    pool = ConnectionPool(with_application_name(pg_dsn, name), size=1, pre_ping=True)
    try:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), current_setting('application_name')")
            pid, app = cur.fetchall()[0]
            conn.rollback()
        assert app == name
        admin = psycopg2.connect(pg_dsn)
        admin.autocommit = True
        with admin.cursor() as cur:  # only our own session, found by its application_name
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (name,))
            assert cur.fetchall() == [(True,)]
        admin.close()
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            assert cur.fetchall()[0][0] != pid
            conn.rollback()
        stats = pool.stats()
        assert stats.replaced == 1 and stats.opened == 2 and stats.in_use == 0
    finally:
        pool.close()


def test_pool_utilisation_is_a_busy_time_fraction(pg_dsn: str) -> None:
    clock = Clock()
    pool = ConnectionPool(pg_dsn, size=2, pre_ping=False, clock=clock)
    try:
        with pool.connection():
            clock.now += 3.0
            assert pool.stats().utilisation == pytest.approx(3.0 / (2 * 3.0))  # one of two busy so far
        clock.now += 5.0  # idle
        stats = pool.stats()
        assert stats.busy_s == pytest.approx(3.0) and stats.age_s == pytest.approx(8.0)
        assert stats.utilisation == pytest.approx(3.0 / 16.0)
    finally:
        pool.close()
