"""A table publishes as soon as its own files are read, while the other tables still stream (runner.EarlyPublish).

The other tables' reading is held at a gate (their ``read_unit`` waits on an event) so what is asserted is an
order of events in the ledger, never seconds: the first table's publish committed before any batch of the gated
tables did. Each test then checks the whole run exactly (rows equal the oracle, no byte range twice).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable, Dict, Iterator, List

import pytest

from loadkit.examples.cnpj.sample import SampleManifest
from loadkit.execute import inprocess
from loadkit.runner import run_job
from tests.helpers import autocommit_cursor, compose, query
from tests.test_faults import DROP_REFERENCE, TABLES, assert_exactly_once
from tests.test_shutdown import Blocker, count, wait_for, waiting_on_lock

pytestmark = [pytest.mark.slow]

MONTH = {"rows": 600, "shards": 2, "seed": 7}  # the size of conftest's `month`


def largest(month: SampleManifest) -> str:
    """The table the in-process executor reads first (execute.inprocess.largest_first: most source bytes)."""
    return max(TABLES, key=lambda t: sum((month.root / rel).stat().st_size for rel in month.files[t]))


class Gate:
    """Holds every read of the tables not named ``first`` until ``open()`` (or its safety timeout); with
    ``hold_first``, also the reads of ``first`` until ``open_first()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, first: str, hold_first: bool = False) -> None:
        self.first, self.opened, self.reached = first, threading.Event(), threading.Event()
        self.first_opened = threading.Event()
        if not hold_first:
            self.first_opened.set()
        read = inprocess.read_unit

        def gated(unit: Any, board: Any) -> Iterator[Any]:
            if unit.table.name == self.first:
                assert self.first_opened.wait(120), "the first table's gate was never opened"
            else:
                self.reached.set()
                assert self.opened.wait(120), "the gate was never opened"
            yield from read(unit, board)

        monkeypatch.setattr(inprocess, "read_unit", gated)

    def open_first(self) -> None:
        self.first_opened.set()

    def open(self) -> None:
        self.first_opened.set()
        self.opened.set()


def published(dsn: str, led: str, table: str) -> bool:
    return count(dsn, f'SELECT count(*) FROM "{led}".table_load WHERE table_name = \'{table}\' '
                      "AND finished_at IS NOT NULL AND status = 'loaded'") > 0


def first_commits(dsn: str, led: str) -> Dict[str, Any]:
    """Per table: (its first batch's commit time, its last one's)."""
    return {t: (lo, hi) for t, lo, hi in query(dsn, f'SELECT table_name, min(committed_at), max(committed_at) '
                                                    f'FROM "{led}".batch GROUP BY 1')}


def in_background(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def run_watched(watch: Callable[[], None], gate: Gate, overrides: List[str]) -> Any:
    """``run_job`` on this thread (its signal handlers need the main thread) while ``watch`` runs beside it;
    the gate opens whatever happens, and the watcher is joined."""
    watcher = in_background(watch)
    try:
        return run_job(compose(overrides))
    finally:
        gate.open()
        watcher.join(10)


def sigterm_once_the_publish_waits(dsn: str, led: str, sent: List[bool], what: str) -> None:
    """Wait for this run's driver (a publish) waiting on a lock, then SIGTERM this process (the run's handler)."""
    wait_for(lambda: waiting_on_lock(dsn, led, "driver"), 120, what)
    sent.append(True)
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture()
def overrides(job_overrides, month: SampleManifest) -> Callable[..., List[str]]:
    def make(*extra: str) -> List[str]:
        return job_overrides(month.root, "env.executor=inprocess", "tracking.enabled=false", "batch.size=100",
                             *DROP_REFERENCE, *extra)
    return make


def test_a_table_publishes_while_the_others_still_stream(month: SampleManifest, pg_dsn: str, schemas: tuple,
                                                        overrides, monkeypatch: pytest.MonkeyPatch) -> None:
    target, led = schemas
    first = largest(month)
    gate = Gate(monkeypatch, first)
    seen: List[bool] = []

    def watch() -> None:  # the gated tables stream only once the first one is published (or 120 s passed)
        try:
            wait_for(lambda: published(pg_dsn, led, first), 120, f"{first} published")
            seen.append(count(pg_dsn, f'SELECT count(*) FROM "{target}"."{first}"') > 0
                        and count(pg_dsn, f'SELECT count(*) FROM "{led}".batch WHERE table_name <> \'{first}\'') == 0)
        finally:
            gate.open()

    result = run_watched(watch, gate, overrides())
    assert result.status == "succeeded", result.error
    assert seen == [True], "the first table was not published before the others read anything"
    commits = first_commits(pg_dsn, led)
    done = query(pg_dsn, f'SELECT finished_at FROM "{led}".table_load WHERE table_name = %s', (first,))[0][0]
    assert all(lo > done for t, (lo, _) in commits.items() if t != first), (done, commits)
    assert_exactly_once(pg_dsn, schemas, month)


def test_publish_early_false_publishes_after_the_whole_stream(month: SampleManifest, pg_dsn: str, schemas: tuple,
                                                             overrides) -> None:
    _, led = schemas
    result = run_job(compose(overrides("sink.publish_early=false")))
    assert result.status == "succeeded", result.error
    last_commit = max(hi for _, hi in first_commits(pg_dsn, led).values())
    finished = [r[0] for r in query(pg_dsn, f'SELECT finished_at FROM "{led}".table_load WHERE run_id = %s',
                                    (result.run_id,))]
    assert len(finished) == len(TABLES) and all(f > last_commit for f in finished), (last_commit, finished)
    assert_exactly_once(pg_dsn, schemas, month)


def test_a_stop_rolls_back_the_publish_in_flight_and_the_rerun_is_exact(
        month: SampleManifest, pg_dsn: str, schemas: tuple, overrides, monkeypatch: pytest.MonkeyPatch,
        ray_session: None) -> None:
    """SIGTERM while the first table's publish waits for its target's lock (held by the test) and the others are
    gated: the run ends interrupted without waiting for the lock holder, the publish rolled back (its files settled,
    none published, the target empty), and the rerun loads everything exactly once. The stopped in-process run
    leaves alone the Ray this process holds for something else (here the test session's; it used to shut it down,
    and every later test on it failed)."""
    import ray

    target, led = schemas
    first = largest(month)
    gate = Gate(monkeypatch, first, hold_first=True)
    blocker = Blocker(pg_dsn)
    sent: List[bool] = []

    def watch() -> None:
        try:  # the run's prepare created the target; its stream waits at the gate
            wait_for(lambda: count(pg_dsn, f"SELECT count(*) FROM pg_tables WHERE schemaname = '{target}' "
                                           f"AND tablename = '{first}'") > 0, 120, f"{target}.{first} created")
            blocker.lock(f'"{target}"."{first}"', "ACCESS SHARE")  # the publish's ACCESS EXCLUSIVE waits for it
            gate.open_first()
            sigterm_once_the_publish_waits(pg_dsn, led, sent, "the publish waiting on the lock")
        finally:
            if not sent:
                gate.open()

    result = run_watched(watch, gate, overrides())
    assert sent == [True]
    assert result.status == "interrupted", result.error
    assert ray.is_initialized()
    blocker.assert_still_held("the stop")
    blocker.release()
    assert not published(pg_dsn, led, first)
    assert count(pg_dsn, f'SELECT count(*) FROM "{led}".file WHERE status = \'loaded\'') == 0  # settled, unpublished
    assert count(pg_dsn, f'SELECT count(*) FROM "{target}"."{first}"') == 0
    blocker.close()
    again = run_job(compose(overrides()))
    assert again.status == "succeeded", again.error
    assert_exactly_once(pg_dsn, schemas, month)


def test_a_stop_ends_a_publish_waiting_to_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish thread (EarlyPublish, PUBLISH_CONCURRENCY) cannot be interrupted by the signal handler: the stop's
    ``PostgresSink.cancel`` ends its wait between retries of a transient failure, which then raises InterruptedRun
    instead of sleeping out the backoff (here 60 s, the test's own timeout) and trying again."""
    from types import SimpleNamespace

    from loadkit.errors import InterruptedRun, TransientDBError
    from loadkit.plan import RetryPolicy
    from loadkit.postgres import sink as sink_module

    sink = sink_module.PostgresSink.__new__(sink_module.PostgresSink)  # only the stop and the retry policy
    sink._stopping = threading.Event()
    sink.plan = SimpleNamespace(retry=RetryPolicy(attempts=5, initial_wait_s=60, max_wait_s=60, multiplier=2,
                                                  jitter_s=0, breaker_failures=5, breaker_cooldown_s=1))
    sink.dsn, sink.plan.run_id = "", "r"
    cancelled: List[str] = []
    monkeypatch.setattr(sink_module.db, "cancel_backends", lambda dsn, run_id: cancelled.append(run_id) or 0)
    attempts: List[int] = []

    def publish() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            threading.Thread(target=sink.cancel, daemon=True).start()  # the stop path's cancel
        raise TransientDBError("the server went away")

    with pytest.raises(InterruptedRun):
        sink._retrying()(publish)
    assert attempts == [1] and cancelled == ["r"]


def test_a_stop_after_the_publish_set_its_status_reports_what_the_ledger_holds(
        month: SampleManifest, pg_dsn: str, schemas: tuple, overrides, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the first table's publish waits on its own ledger row (``finish_table``, held FOR UPDATE by the
    test): that is after ``_finalize_table`` has set the table's status to 'loaded', before its commit. The stop
    rolls the publish back, so the run's result and its ledger must not call the table loaded: its table_load row
    is closed (not left 'loading'), its status agrees with the result's, and the rerun loads exactly once."""
    import psycopg2

    target, led = schemas
    first = largest(month)
    gate = Gate(monkeypatch, first, hold_first=True)
    holder = psycopg2.connect(pg_dsn, application_name="loadkit-test-blocker")
    safety = threading.Timer(90, holder.rollback)
    sent: List[bool] = []

    def watch() -> None:
        try:  # the run's start inserted the table's row; its stream waits at the gate
            wait_for(lambda: count(pg_dsn, f'SELECT count(*) FROM "{led}".table_load WHERE table_name = '
                                           f"'{first}' AND status = 'loading'") > 0, 120, f"{first}'s ledger row")
            with holder.cursor() as cur:  # finish_table's UPDATE of this row waits for it
                cur.execute(f'SELECT 1 FROM "{led}".table_load WHERE table_name = %s FOR UPDATE', (first,))
            safety.start()
            gate.open_first()
            sigterm_once_the_publish_waits(pg_dsn, led, sent, "the publish waiting on its ledger row")
            wait_for(lambda: not waiting_on_lock(pg_dsn, led, "driver"), 120, "the stop to cancel the publish")
        finally:
            holder.rollback()  # the run's end may update the row too
            if not sent:
                gate.open()

    try:
        result = run_watched(watch, gate, overrides())
    finally:
        safety.cancel()
        holder.close()
    assert sent == [True]
    assert result.status == "interrupted", result.error
    (status, finished), = query(pg_dsn, f'SELECT status, finished_at FROM "{led}".table_load '
                                        "WHERE run_id = %s AND table_name = %s", (result.run_id, first))
    rows = count(pg_dsn, f'SELECT count(*) FROM "{target}"."{first}"')
    assert finished is not None, f"{first}'s ledger row was left {status!r}"
    assert (status == "loaded") == (rows > 0), (status, rows)
    assert result.metrics.tables[first].status == status, (result.metrics.tables[first].status, status, rows)
    again = run_job(compose(overrides()))
    assert again.status == "succeeded", again.error
    assert_exactly_once(pg_dsn, schemas, month)


@pytest.mark.parametrize("early", ["true", "false"])
def test_a_table_whose_staging_lost_batches_is_read_again_and_counted_once(
        month: SampleManifest, pg_dsn: str, schemas: tuple, overrides, monkeypatch: pytest.MonkeyPatch,
        early: str) -> None:
    """The first table's staging is emptied just before its publish (what a crash restart does to an UNLOGGED
    staging table): the publish finds the batches lost, the run reads them again in a second round (runner's
    re-read loop) and publishes. Early or not, the target equals the month exactly and the run's figures -- per
    table in the result and in its table_load rows, and its total -- are the month's rows, each read once."""
    from loadkit.postgres import sink as sink_module
    from loadkit.postgres.modes import mode_for

    target, led = schemas
    first = largest(month)
    original = sink_module.PostgresSink.complete
    emptied: List[str] = []

    def complete(self: Any, metrics: Any, aborted: Any, failed: Any, tables: List[str]) -> Any:
        if first in tables and not emptied:
            table = self.plan.table(first)
            assert mode_for(table).staged, table.mode
            with autocommit_cursor(pg_dsn) as cur:
                cur.execute(f'DELETE FROM "{table.load_schema}"."{table.load_table}"')
                assert cur.rowcount > 0
            emptied.append(first)
        return original(self, metrics, aborted, failed, tables)

    monkeypatch.setattr(sink_module.PostgresSink, "complete", complete)
    result = run_job(compose(overrides(f"sink.publish_early={early}")))
    assert emptied == [first]
    assert result.status == "succeeded", result.error
    assert_exactly_once(pg_dsn, schemas, month)
    for t in TABLES:
        tm = result.metrics.tables[t]
        assert tm.rows_read == month.rows[t] == tm.rows_loaded + tm.rows_rejected, (t, tm.rows_read, month.rows[t])
    ledger = {t: (r, lo, rj) for t, r, lo, rj in query(
        pg_dsn, f'SELECT table_name, rows_read, rows_loaded, rows_rejected FROM "{led}".table_load '
                "WHERE run_id = %s", (result.run_id,))}
    assert ledger == {t: (tm.rows_read, tm.rows_loaded, tm.rows_rejected)
                      for t, tm in result.metrics.tables.items()}, ledger
    (read,), = query(pg_dsn, f'SELECT rows_read FROM "{led}".run WHERE run_id = %s', (result.run_id,))
    assert read == sum(month.rows[t] for t in TABLES), read


def test_a_failed_early_publish_lets_the_others_finish(
        month: SampleManifest, pg_dsn: str, schemas: tuple, overrides, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first table's publish fails (not transiently) while the second table's publish waits on its own ledger
    row (``finish_table``; held FOR UPDATE by the test, released 2 s after the run starts collecting the publishes,
    ``EarlyPublish.completion``). A failed table does not stop the others (PostgresSink._finalize_tables): the second
    table still publishes, and the run fails with the first one's error; the rerun publishes the first table and the
    month is loaded exactly once. (The release is timed, never an assertion: with the collection cancelling the
    others at the first error, 0.25 s later, the second table was rolled back.)"""
    import psycopg2

    from loadkit.errors import LoadkitError
    from loadkit.postgres import sink as sink_module
    from loadkit.runner import EarlyPublish

    target, led = schemas
    first, second = sorted(TABLES, key=lambda t: -sum((month.root / rel).stat().st_size for rel in month.files[t]))[:2]
    gate = Gate(monkeypatch, first)
    holder = psycopg2.connect(pg_dsn, application_name="loadkit-test-blocker")
    release = threading.Timer(2, holder.rollback)
    finalize = sink_module.PostgresSink._finalize_table

    def failing(self: Any, table: Any, tm: Any, failed: Any) -> bool:
        if table.name == first:
            raise LoadkitError("simulated publish failure", table=table.name)
        return finalize(self, table, tm, failed)

    collect = EarlyPublish.completion

    def completion(self: Any, done: Any) -> Any:
        release.start()
        return collect(self, done)

    monkeypatch.setattr(sink_module.PostgresSink, "_finalize_table", failing)
    monkeypatch.setattr(EarlyPublish, "completion", completion)

    def watch() -> None:
        try:
            wait_for(lambda: count(pg_dsn, f'SELECT count(*) FROM "{led}".table_load WHERE table_name = '
                                           f"'{second}' AND status = 'loading'") > 0, 120, f"{second}'s ledger row")
            with holder.cursor() as cur:  # finish_table's UPDATE of this row waits for it
                cur.execute(f'SELECT 1 FROM "{led}".table_load WHERE table_name = %s FOR UPDATE', (second,))
        finally:
            gate.open()

    try:
        result = run_watched(watch, gate, overrides())
    finally:
        release.cancel()
        holder.rollback()
        holder.close()
    assert result.status == "failed" and "simulated publish failure" in str(result.error), result.error
    assert published(pg_dsn, led, second), f"{second}'s publish was rolled back by {first}'s failure"
    assert not published(pg_dsn, led, first)
    monkeypatch.undo()
    again = run_job(compose(overrides()))
    assert again.status == "succeeded", again.error
    assert_exactly_once(pg_dsn, schemas, month)


def test_cli_sigterm_while_an_early_publish_waits_exits_130_and_the_rerun_is_exact(
        month: SampleManifest, pg_dsn: str, schemas: tuple, overrides, tmp_path) -> None:
    """``python -m loadkit``: the first table's publish waits for its target's lock (held by the test) while the
    other tables stream, ungated; SIGTERM exits 130 without waiting for the lock holder, the first table is not
    published, the run is recorded interrupted, and the rerun loads the month exactly once."""
    from tests.test_faults import Cli

    target, led = schemas
    first = largest(month)
    blocker = Blocker(pg_dsn)
    run = Cli(overrides("batch.size=20"), tmp_path / "cli.log")
    try:
        wait_for(lambda: count(pg_dsn, f"SELECT count(*) FROM pg_tables WHERE schemaname = '{target}' "
                                       f"AND tablename = '{first}'") > 0, 120, f"{target}.{first} created")
        blocker.lock(f'"{target}"."{first}"', "ACCESS SHARE")
        wait_for(lambda: waiting_on_lock(pg_dsn, led, "driver"), 120, "the publish waiting on the lock")
        run.signal(signal.SIGTERM)
        code = run.wait(60)
    finally:
        if run.alive():
            run.reap()
    assert code == 130, run.tail()
    blocker.assert_still_held("the stop")
    blocker.close()
    assert not published(pg_dsn, led, first)
    assert query(pg_dsn, f'SELECT status, error_category FROM "{led}".run') == [("interrupted", "interrupted")]
    assert query(pg_dsn, f'SELECT count(*) FROM "{led}".table_load WHERE finished_at IS NULL') == [(0,)]
    again = run_job(compose(overrides()))
    assert again.status == "succeeded", again.error
    assert_exactly_once(pg_dsn, schemas, month)


class _FakeSink:
    """EarlyPublish's view of the sink: a publish that waits for ``release``, and the stop's re-cancel recorded."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.completed: List[str] = []
        self.stops: List[int] = []

    def check_accounting(self, metrics: Any, tables: Any) -> None:
        pass

    def complete(self, metrics: Any, aborted: Any, failed: Any, tables: List[str]) -> Any:
        from loadkit.postgres.sink import Completion

        self.started.set()
        assert self.release.wait(60)
        self.completed += tables
        return Completion()

    def stop_publishes(self, futures: Any) -> None:
        self.stops.append(len(futures))
        self.release.set()  # what the re-cancel does to a publish: it ends


@pytest.mark.parametrize("error, stops", [(ValueError("a bug in the stream"), False),
                                          (KeyboardInterrupt(), True)])
def test_only_a_stop_cancels_the_early_publishes_in_flight(error: BaseException, stops: bool) -> None:
    """A failure of the stream that is not a stop (a bug, a later table's accounting mismatch) waits for the
    early publish in flight -- a complete, accounted table -- instead of rolling it back; a stop (here the
    handler's KeyboardInterrupt) cancels it (PostgresSink.stop_publishes)."""
    from types import SimpleNamespace

    from loadkit.runner import EarlyPublish

    sink = _FakeSink()
    supervisor = SimpleNamespace(aborted={}, check_final_thresholds=lambda tables: None)
    with pytest.raises(type(error)):
        with EarlyPublish(SimpleNamespace(), sink, supervisor, SimpleNamespace(), []) as early:  # type: ignore[arg-type]
            early.table_read("t")
            assert sink.started.wait(60)
            if not stops:  # nothing else ends this publish: let it finish while __exit__ waits for it
                threading.Timer(0.2, sink.release.set).start()
            raise error
    assert sink.stops == ([1] if stops else [])
    assert sink.completed == ["t"]


def test_a_stop_landing_inside_table_read_leaves_no_publish_unaccounted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal can land between any two bytecodes of table_read. Each publish is listed before it is submitted,
    so a stop there still finds it: a listed publish never submitted is cancelled and waited for by nobody (the
    exit does not hang on it), and nothing of it runs."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from loadkit import runner

    class StoppedAtSubmit(ThreadPoolExecutor):
        def submit(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            raise KeyboardInterrupt  # the handler's stop, right after the publish was listed

    monkeypatch.setattr(runner, "ThreadPoolExecutor", StoppedAtSubmit)
    sink = _FakeSink()
    supervisor = SimpleNamespace(aborted={}, check_final_thresholds=lambda tables: None)
    with pytest.raises(KeyboardInterrupt):
        with runner.EarlyPublish(SimpleNamespace(), sink, supervisor, SimpleNamespace(), []) as early:  # type: ignore[arg-type]
            early.table_read("t")
    assert early.tables == ["t"] and early._futures[0].cancelled()
    assert sink.stops == [1] and sink.completed == []
