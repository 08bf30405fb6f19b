"""Fault suite: exactly-once through crashes, dead connections and a restarting database.

Every scenario loads a generated month (3 sharded tables, ~20 batches of a few hundred rows)
through real Ray and real PostgreSQL, injects a fault mid-load, and checks the final tables
against the generator's oracle row by row (0 lost, 0 duplicated) and the ledger's batches
against the source (every byte range committed once, rows_in summing to the source rows).

Faults touch only what the test started: its own CLI subprocesses (killed by process group),
its own Ray session's writer processes, backends whose application_name carries its run id, and
an embedded PostgreSQL in a temp dir (restarted with its own pg_ctl), never the shared server.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import psycopg2
import psycopg2.errors
import pytest

from loadkit.examples.cnpj.sample import SampleManifest
from loadkit.errors import Category, classify
from loadkit.plan import RetryPolicy
from loadkit.resilience import retrying
from loadkit.runner import run_job
from tests.helpers import ROOT, compose, query, zip_members_into_one
from tests.test_e2e_monthly import KEYS, SOCIO_IDENTITY, canon, last_wins, table_rows

pytestmark = [pytest.mark.slow, pytest.mark.fault]

TABLES = ("empresas", "estabelecimentos", "socios")
# The reference tables are one batch each: dropping them keeps every run short.
DROP_REFERENCE = [f"~job.tables.{t}" for t in
                  ("simples", "cnaes", "motivos", "municipios", "naturezas", "paises", "qualificacoes")]
FAST_RETRY = ["retry.initial_wait_s=0.2", "retry.max_wait_s=2.0", "retry.jitter_s=0.1", "retry.attempts=8",
              "retry.breaker_cooldown_s=2.0"]


MONTH = {"rows": 1500, "shards": 2, "seed": 11}  # the size of conftest's `month`


@pytest.fixture()
def args(job_overrides, month: SampleManifest) -> Callable[..., List[str]]:
    """Overrides for this test's schemas: three tables, small batches, fast retries, no MLflow."""

    def make(batch_size: int, *extra: str) -> List[str]:
        return job_overrides(month.root, f"batch.size={batch_size}", "tracking.enabled=false", *DROP_REFERENCE,
                             *FAST_RETRY, *extra)

    return make


# ------------------------------------------------------------------ oracle checks


def assert_exactly_once(dsn: str, schemas: tuple, month: SampleManifest) -> Dict[str, Dict[str, int]]:
    """Final tables equal the oracle and the ledger tiles every source member once; returns lost/duplicated."""
    target, led = schemas
    report: Dict[str, Dict[str, int]] = {}
    for table in TABLES:
        expected = month.expected[table]
        columns = list(expected[0].keys())
        want = Counter(canon(r) for r in last_wins(expected, KEYS.get(table, SOCIO_IDENTITY)))
        got = Counter(canon(r) for r in table_rows(dsn, target, table, columns))
        report[table] = {"lost": sum((want - got).values()), "duplicated": sum((got - want).values())}
        # Merge dedups by key, so also prove no byte range was committed twice: ranges never overlap
        # and their rows add up to exactly the source rows.
        ranges = query(dsn, f'SELECT file_sha, member, start_offset, end_offset, rows_in FROM "{led}".batch '
                            "WHERE table_name = %s ORDER BY 1, 2, 3", (table,))
        overlaps = sum(1 for a, b in zip(ranges, ranges[1:]) if a[:2] == b[:2] and b[2] < a[3])
        report[table]["overlapping_batches"] = overlaps
        report[table]["ledger_rows_minus_source"] = sum(r[4] for r in ranges) - month.rows[table]
    assert all(v == 0 for t in report.values() for v in t.values()), report
    return report


# ------------------------------------------------------------------ ledger probes


def ledger_count(dsn: str, led: str, sql: str, args: tuple = ()) -> int:
    try:
        return int(query(dsn, sql.format(led=f'"{led}"'), args)[0][0])
    except psycopg2.errors.UndefinedTable:  # the run has not created its ledger yet
        return 0


def committed(dsn: str, led: str) -> int:
    return ledger_count(dsn, led, "SELECT count(*) FROM {led}.batch")


def runs_so_far(dsn: str, led: str) -> List[str]:
    """Ids of the runs the ledger has recorded (none before the first run created it)."""
    try:
        return [r[0] for r in query(dsn, f'SELECT run_id FROM "{led}".run')]
    except psycopg2.errors.UndefinedTable:
        return []


def commits_since(dsn: str, led: str, known: List[str]) -> int:
    """Batches committed by runs other than ``known``: a run started after ``runs_so_far`` returned them."""
    return ledger_count(dsn, led, "SELECT count(*) FROM {led}.batch WHERE NOT run_id = ANY(%s)", (known,))


def current_run(dsn: str, led: str) -> Optional[str]:
    try:
        rows = query(dsn, f'SELECT run_id FROM "{led}".run WHERE status = %s ORDER BY started_at DESC LIMIT 1',
                     ("running",))
    except psycopg2.errors.UndefinedTable:
        return None
    return rows[0][0] if rows else None


def wait_until(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.05,
               show: Optional["Cli"] = None) -> None:
    """Poll ``condition``; on timeout fail with ``what`` and the end of ``show``'s log (the run's own account)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = f"\n--- the run's log ends:\n{show.tail()}" if show is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(poll)


class Background:
    """Runs a fault injector next to an in-process load and re-raises its failure in the test."""

    def __init__(self, target: Callable[[threading.Event], None]) -> None:
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True)

    def _run(self, target: Callable[[threading.Event], None]) -> None:
        try:
            target(self.stop)
        except BaseException as exc:  # handed to the test thread in join()
            self.error = exc

    def __enter__(self) -> "Background":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self._thread.join(timeout=30)
        if self.error is not None and exc[0] is None:
            raise self.error


# ------------------------------------------------------------------ CLI subprocesses


class Cli:
    """``python -m loadkit ...`` in its own process group, so the test can kill it and all it started."""

    def __init__(self, overrides: List[str], log: Path) -> None:
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "loadkit", *overrides, "env.num_cpus=2"],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.alive(), "the load finished before the fault could be injected"
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.reap()

    def tail(self, chars: int = 4000) -> str:
        """The end of the run's output so far (stdout and stderr); also once the run is reaped."""
        if not self._log.closed:
            self._log.flush()
        return Path(self._log.name).read_bytes()[-chars:].decode("utf-8", "replace")

    def reap(self) -> None:
        """Kill what the driver left (its Ray processes); only this process group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._log.close()


class LedgerGate:
    """Holds a ledger's batch table (SHARE ROW EXCLUSIVE) so every writer blocks on its ledger insert with its
    batch in hand; ``let_through`` lets exactly the writers blocked at that moment commit, then holds again
    (a second session queues its lock behind them before the first lets go: PostgreSQL grants in queue
    order, so later writers queue behind it)."""

    WAITERS = ("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE NOT l.granted "
               "AND l.relation = %s::regclass AND a.application_name LIKE %s AND NOT a.pid = ANY(%s)")

    def __init__(self, dsn: str, led: str) -> None:
        from loadkit.postgres.ledger import Ledger

        self._dsn, self._table = dsn, f'"{led}".batch'
        self._orphans: List[int] = []
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            Ledger(led).ensure(cur)  # an existing ledger takes no DDL at run start: the gate blocks no start
        conn.close()
        self._closed = False
        self._conn = self._hold()

    def _hold(self) -> Any:
        conn = psycopg2.connect(self._dsn, application_name="loadkit-test-gate")
        with conn.cursor() as cur:
            cur.execute(f"LOCK TABLE {self._table} IN SHARE ROW EXCLUSIVE MODE")
        if self._closed:  # a lock queued by a let_through that failed, granted after close(): let it go
            conn.close()
        return conn

    def _waiting(self, app: str) -> int:
        return int(query(self._dsn, self.WAITERS, (self._table, app, self._orphans))[0][0])

    def killed(self) -> None:
        """The run was killed: its sessions live on in the server (blocked, they cannot see the client is gone)
        and can never commit; later waits count only the next run's writers."""
        self._orphans += [r[0] for r in query(self._dsn, "SELECT pid FROM pg_stat_activity "
                                                         "WHERE application_name LIKE 'loadkit:%%'")]

    def wait_blocked(self, run: "Cli") -> None:
        wait_until(lambda: self._waiting("loadkit:%:writer") > 0 or not run.alive(), 300, "a writer blocked", show=run)
        assert run.alive(), "the run ended before a writer blocked on the ledger"

    def let_through(self, run: "Cli") -> None:
        self.wait_blocked(run)
        nxt: List[Any] = []
        queued = threading.Thread(target=lambda: nxt.append(self._hold()), daemon=True)
        queued.start()
        wait_until(lambda: self._waiting("loadkit-test-gate") > 0, 60, "the gate's next lock queued")
        self._conn.rollback()
        self._conn.close()
        queued.join(120)
        assert nxt, "the gate could not take the lock again"
        self._conn = nxt[0]

    def release(self) -> None:
        self._closed = True
        self._conn.rollback()
        self._conn.close()

    def close(self) -> None:
        """Drop the gate without a word to the server: after a crash restart its session is gone. A lock
        still queued by a let_through that failed is let go as soon as it is granted (``_hold``)."""
        self._closed = True
        self._conn.close()


@pytest.fixture()
def cli_runs(tmp_path: Path) -> Iterator[Callable[[List[str]], Cli]]:
    started: List[Cli] = []

    def start(overrides: List[str]) -> Cli:
        started.append(Cli(overrides, tmp_path / f"cli-{len(started)}.log"))
        return started[-1]

    yield start
    for c in started:
        if not c._log.closed:
            c.reap()


# ------------------------------------------------------------------ scenarios


def test_driver_kill9_and_sigterm_then_resume_with_other_batch_sizes(
        month: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None, args, cli_runs,
        record_property: Callable[[str, Any], None]) -> None:
    """kill -9 before and during commits, SIGTERM mid-load (stop < 1 s, 'interrupted', exit 130),
    each run with another batch size; the final run loads exactly the rest.

    Deterministic, not timed: a LedgerGate holds ledger.batch, so every fault lands while the run's writers
    wait with a batch in hand, after exactly the commits the gate let through. (Timed, the fast loaders
    committed a whole burst of batches between two polls: in CI the SIGTERM came after the last one, and the
    resume had nothing left to load -- ``assert 10 > 10``.)"""
    _, led = schemas
    rng = random.Random(20240511)
    gate = LedgerGate(pg_dsn, led)

    def waiting_after(batch_rows: int, commits: int) -> Any:
        """A CLI run let through ``commits`` commits of its own, its writers now waiting with the next batches."""
        known = runs_so_far(pg_dsn, led)
        run = cli_runs(args(batch_rows))
        while commits_since(pg_dsn, led, known) < commits:
            gate.let_through(run)
        gate.wait_blocked(run)
        return run

    try:
        # 1. kill -9 once the run's writers wait with their first batches: nothing committed yet.
        run = cli_runs(args(200))
        gate.wait_blocked(run)
        assert committed(pg_dsn, led) == 0
        run.signal(signal.SIGKILL)
        assert run.wait(30) == -signal.SIGKILL
        gate.killed()
        # 2. kill -9 after a random number of its own commits, its writers waiting with the next batches.
        kill_at = rng.randint(1, 4)
        run = waiting_after(200, kill_at)
        run.signal(signal.SIGKILL)
        assert run.wait(30) == -signal.SIGKILL
        gate.killed()
        after_kill = committed(pg_dsn, led)
        assert after_kill >= kill_at
        # 3. SIGTERM after a few commits of its own, with a smaller batch size, while its writers wait with
        # batches in hand; the gate holds until the process is gone, so those batches are surely left over.
        term_at = rng.randint(1, 2)
        run = waiting_after(120, term_at)
        run.signal(signal.SIGTERM)
        signalled = time.time()
        wait_until(lambda: ledger_count(pg_dsn, led,
                                        "SELECT count(*) FROM {led}.run WHERE status = 'interrupted'") == 1,
                   60, "the run to be marked interrupted", show=run)
        marked_after = time.time() - signalled
        assert run.wait(60) == 130, run.tail()
    finally:
        gate.release()
    late = ledger_count(pg_dsn, led, "SELECT count(*) FROM {led}.batch WHERE committed_at > to_timestamp(%s)",
                        (signalled + 1.0,))
    assert late == 0, "a batch started more than 1 s after SIGTERM"  # committed_at is the transaction start
    record_property("kill_points", f"kill -9 at 0 and {after_kill} commits, SIGTERM at {term_at}")
    record_property("sigterm_to_interrupted_s", round(marked_after, 2))
    assert marked_after < 30, f"took {marked_after:.1f}s to record the interruption"
    statuses = Counter(r[0] for r in query(pg_dsn, f'SELECT status FROM "{led}".run'))
    assert statuses == {"crashed": 2, "interrupted": 1}  # the killed runs were found and marked by the next
    # 4. Resume in-process with a smaller batch size: exactly the uncommitted rest is loaded.
    before = committed(pg_dsn, led)
    result = run_job(compose(args(160)))
    assert result.status == "succeeded", result.error
    assert sum(t.rows_read for t in result.metrics.tables.values()) < sum(month.rows[t] for t in TABLES)
    assert committed(pg_dsn, led) > before
    record_property("exactly_once", assert_exactly_once(pg_dsn, schemas, month))


def test_inprocess_executor_kill9_and_sigterm_then_resume(
        month: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None, args, cli_runs,
        record_property: Callable[[str, Any], None]) -> None:
    """The in-process executor (parse thread, writer threads) under the same faults: kill -9 mid-load,
    SIGTERM mid-load (writer threads finish or roll back the batch in hand, exit 130), then a Ray
    run finishes the month exactly once."""
    _, led = schemas
    # Deterministic, not timed (a fast in-process run outran every timed wait): a gate holds ledger.batch, so
    # writers block with a batch in hand; it lets exactly the writers blocked at that moment commit.
    gate = LedgerGate(pg_dsn, led)
    try:
        run = cli_runs(args(50, "env.executor=inprocess"))
        gate.let_through(run)
        after_kill = committed(pg_dsn, led)
        assert after_kill >= 1, "no batch committed before the kill -9"
        gate.wait_blocked(run)
        run.signal(signal.SIGKILL)  # mid-load: committed batches, and writers waiting with the next in hand
        assert run.wait(30) == -signal.SIGKILL
        gate.killed()
        run = cli_runs(args(80, "env.executor=inprocess"))
        gate.let_through(run)
        assert committed(pg_dsn, led) > after_kill
        gate.wait_blocked(run)
        run.signal(signal.SIGTERM)
        signalled = time.time()
    finally:
        gate.release()  # the blocked writers finish or roll back the batch in hand
    assert run.wait(60) == 130
    late = ledger_count(pg_dsn, led, "SELECT count(*) FROM {led}.batch WHERE committed_at > to_timestamp(%s)",
                        (signalled + 1.0,))
    assert late == 0, "a batch started more than 1 s after SIGTERM"  # committed_at is the transaction start
    statuses = Counter(r[0] for r in query(pg_dsn, f'SELECT status FROM "{led}".run'))
    assert statuses == {"crashed": 1, "interrupted": 1}
    record_property("kill_points", f"kill -9 after {after_kill} commits, SIGTERM with writers blocked")
    result = run_job(compose(args(120)))  # conftest's default: the Ray executor
    assert result.status == "succeeded", result.error
    assert result.metrics.executor == "ray"
    assert sum(t.rows_read for t in result.metrics.tables.values()) < sum(month.rows[t] for t in TABLES)
    record_property("exactly_once", assert_exactly_once(pg_dsn, schemas, month))


def test_writer_actor_killed_mid_load(month: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None,
                                      args,
        record_property: Callable[[str, Any], None]) -> None:
    """SIGKILL of a writer worker process: Ray restarts the actor, retries its batch, the job completes."""
    _, led = schemas
    killed: List[int] = []

    def kill_a_writer(stop: threading.Event) -> None:
        wait_until(lambda: committed(pg_dsn, led) >= 2 or stop.is_set(), 120, "2 commits")
        writers = query(pg_dsn, f'SELECT DISTINCT writer FROM "{led}".batch')
        pid = int(writers[0][0].split("-")[1])  # writer-<pid>: a worker of this session's Ray
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    with Background(kill_a_writer):
        result = run_job(compose(args(200)))
    assert result.status == "succeeded", result.error
    assert killed
    record_property("killed_writer_pid", killed[0])
    writers = {r[0] for r in query(pg_dsn, f'SELECT DISTINCT writer FROM "{led}".batch')}
    assert f"writer-{killed[0]}" in writers and len(writers) >= 2
    record_property("exactly_once", assert_exactly_once(pg_dsn, schemas, month))


class Running:
    """``alive()`` and ``tail()`` of an in-process run (what LedgerGate asks a CLI run)."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def alive(self) -> bool:
        return not self.done.is_set()

    def tail(self) -> str:
        return "(an in-process run: its log is in the test's captured output)"


def _blocked_ports(dsn: str, led: str) -> set:
    """Client ports of the sessions waiting for a lock on the ledger's batch table (held by a LedgerGate)."""
    return {r[0] for r in query(dsn, "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                                     "WHERE NOT l.granted AND l.relation = %s::regclass", (f'"{led}".batch',))}


def _ports_of(pid: int, server_port: int) -> set:
    """Local ports of ``pid``'s TCP connections to the database server."""
    import psutil

    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == server_port}


def run_totals(dsn: str, led: str, run_id: str) -> Dict[str, tuple]:
    """table -> (batches, rows read, loaded, rejected) that ``run_id`` committed, from its ledger rows."""
    return {r[0]: tuple(int(v) for v in r[1:]) for r in query(
        dsn, f'SELECT table_name, count(*), sum(rows_in), sum(rows_loaded), sum(rows_rejected) FROM "{led}".batch '
             "WHERE run_id = %s GROUP BY table_name", (run_id,))}


def summary_totals(result: Any) -> Dict[str, tuple]:
    """table -> (batches, rows read, loaded, rejected) as the run's summary counts them."""
    return {t.name: (t.batches, t.rows_read, t.rows_loaded, t.rows_rejected)
            for t in result.metrics.tables.values() if t.batches}


def test_loader_killed_mid_unit_and_resized_counts_every_batch_once(
        tmp_path: Path, pg_dsn: str, schemas: tuple, ray_session: None, job_overrides,
        record_property: Callable[[str, Any], None]) -> None:
    """SIGKILL of the loader actor in the middle of a file (batches of it committed, ~90 left), and the batch
    size changed before its retry. Deterministic, not timed: a LedgerGate holds ledger.batch, so loaders
    block on their ledger row with a batch in hand; it lets exactly the blocked loaders commit until the
    file's loader has committed 4 batches, and the kill lands while that loader waits with its 5th.

    Ray restarts the actor and re-runs the call from its start, keeping only outputs past those the dead
    attempt delivered (by position). The retry skips the committed ranges (cutting its chunks at their
    edges with the new size: every byte range once) and first re-reports the dead attempt's batches, so
    none of its own is dropped: the run's summary equals its ledger rows, table by table, and the target
    holds every row once. (Before the replay: the summary missed as many batches as the dead attempt had
    delivered.)"""
    from ray.experimental import internal_kv

    from loadkit.examples.cnpj.sample import generate_month

    _, led = schemas
    big = generate_month(tmp_path, 2024, 5, rows=30_000, shards=1, seed=3)  # estabelecimentos: ~90 chunks of 300
    server_port = int(query(pg_dsn, "SELECT inet_server_port()")[0][0] or 5432)
    killed: List[int] = []
    gate = LedgerGate(pg_dsn, led)
    run = Running()

    def estab(sql: str) -> list:
        return query(pg_dsn, sql.format(led=f'"{led}"'), ("estabelecimentos",))

    def kill_the_loader(stop: threading.Event) -> None:
        try:
            while not estab("SELECT 1 FROM {led}.batch WHERE table_name = %s OFFSET 3"):  # < 4 committed
                gate.let_through(run)
            (writer,), = estab("SELECT DISTINCT writer FROM {led}.batch WHERE table_name = %s")
            pid = int(writer.split("-")[1])  # writer-<pid>: the loader's worker process
            wait_until(lambda: bool(_ports_of(pid, server_port) & _blocked_ports(pg_dsn, led)) or not run.alive(),
                       120, "the file's loader blocked with its next batch")
            assert run.alive(), "the run ended before the loader could be killed"
            for key in internal_kv._internal_kv_list(b"board:", namespace="loadkit"):  # the run's batch-size board
                if key.endswith(b":rows"):
                    internal_kv._internal_kv_put(key, b"1000", overwrite=True, namespace="loadkit")
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        finally:
            gate.release()  # the killed loader's session never commits (its client is gone); the others go on

    with Background(kill_the_loader):
        try:
            result = run_job(compose(job_overrides(big.root, "batch.size=300", "tracking.enabled=false",
                                                   *DROP_REFERENCE, *FAST_RETRY)))
        finally:
            run.done.set()
    assert result.status == "succeeded", result.error
    assert result.metrics.executor == "ray"
    assert killed, "the load ended before the loader could be killed"
    by_writer = dict(estab("SELECT writer, count(*) FROM {led}.batch WHERE table_name = %s GROUP BY writer"))
    # One loader reads a file at a time: a second writer on the file is the restarted loader's retry.
    assert f"writer-{killed[0]}" in by_writer and len(by_writer) == 2, by_writer
    assert by_writer[f"writer-{killed[0]}"] >= 4, by_writer  # committed (and delivered) before the kill
    sizes = [r[0] for r in estab("SELECT rows_in FROM {led}.batch WHERE table_name = %s ORDER BY start_offset")]
    assert max(sizes) > 2 * min(sizes[:4]), f"the retry did not read with the new batch size: {sizes}"
    ledger = run_totals(pg_dsn, led, result.run_id)
    assert summary_totals(result) == ledger, (summary_totals(result), ledger)
    assert ledger["estabelecimentos"][1] == big.rows["estabelecimentos"]  # the whole file, in this one run
    record_property("killed_loader_pid", killed[0])
    record_property("killed_loaders_batches", by_writer[f"writer-{killed[0]}"])
    record_property("exactly_once", assert_exactly_once(pg_dsn, schemas, big))


@pytest.mark.parametrize("kills", [1, 2])
def test_loader_killed_in_a_zips_second_member_counts_every_batch_once(
        tmp_path: Path, pg_dsn: str, schemas: tuple, ray_session: None, job_overrides, kills: int,
        record_property: Callable[[str, Any], None]) -> None:
    """The loader kill of the test above, in the second member of a two-member zip: the dead attempt
    delivered the first member's batches and its eof, then some of the second member's; the batch size
    shrinks before the retry. The retry's outputs must begin with all of that (member 1's replayed batches,
    its eof carrying their count, member 2's replayed batches) or Ray's by-position drop eats the retry's
    first new batches. Same gate, same kill point: the loader waits with a batch in hand. ``kills=2``: the
    retry itself is killed the same way after committing 2 batches of its own (its replay and new batches
    delivered, a third attempt replays both dead attempts' commits)."""
    from ray.experimental import internal_kv

    from loadkit.examples.cnpj.sample import generate_month

    _, led = schemas
    big = generate_month(tmp_path, 2024, 5, rows=30_000, shards=2, seed=3)
    zips = [big.root / p for p in big.files["estabelecimentos"]]
    members = zip_members_into_one(zips)
    assert len(members) == 2
    second = members[1][0]
    server_port = int(query(pg_dsn, "SELECT inet_server_port()")[0][0] or 5432)
    killed: List[int] = []
    gate = LedgerGate(pg_dsn, led)
    run = Running()

    def estab(sql: str, *args: Any) -> list:
        return query(pg_dsn, sql.format(led=f'"{led}"'), ("estabelecimentos", *args))

    def kill_the_loader(stop: threading.Event) -> None:
        try:  # 2 batches of the second member committed (the first member's ~15 and its eof before them)
            while not estab("SELECT 1 FROM {led}.batch WHERE table_name = %s AND member = %s OFFSET 1", second):
                gate.let_through(run)
            for size in (b"300", b"700")[:kills]:
                if killed:  # the retry: 2 batches of its own committed
                    while len(estab("SELECT 1 FROM {led}.batch WHERE table_name = %s AND NOT writer = ANY(%s)",
                                    [f"writer-{p}" for p in killed])) < 2 and run.alive():
                        gate.let_through(run)
                (writer,), = estab("SELECT DISTINCT writer FROM {led}.batch WHERE table_name = %s "
                                   "AND NOT writer = ANY(%s)", [f"writer-{p}" for p in killed])
                pid = int(writer.split("-")[1])
                wait_until(lambda: bool(_ports_of(pid, server_port) & _blocked_ports(pg_dsn, led))
                           or not run.alive(), 120, "the file's loader blocked with its next batch")
                assert run.alive(), "the run ended before the loader could be killed"
                for key in internal_kv._internal_kv_list(b"board:", namespace="loadkit"):
                    if key.endswith(b":rows"):
                        internal_kv._internal_kv_put(key, size, overwrite=True, namespace="loadkit")
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        finally:
            gate.release()

    with Background(kill_the_loader):
        try:
            result = run_job(compose(job_overrides(big.root, "batch.size=1000", "tracking.enabled=false",
                                                   *DROP_REFERENCE, *FAST_RETRY)))
        finally:
            run.done.set()
    assert result.status == "succeeded", result.error
    assert killed, "the load ended before the loader could be killed"
    by_member = query(pg_dsn, f'SELECT member, writer, count(*) FROM "{led}".batch WHERE table_name = %s '
                              "GROUP BY 1, 2", ("estabelecimentos",))
    assert len(killed) == kills
    dead = f"writer-{killed[0]}"
    assert {m for m, w, _ in by_member if w == dead} == {members[0][0], second}, by_member
    assert any(m == second and w != dead for m, w, _ in by_member), by_member  # the retry loaded the rest
    assert len({w for _, w, _ in by_member}) == kills + 1, by_member
    ledger = run_totals(pg_dsn, led, result.run_id)
    assert summary_totals(result) == ledger, (summary_totals(result), ledger)
    assert ledger["estabelecimentos"][1] == big.rows["estabelecimentos"]
    record_property("exactly_once", assert_exactly_once(pg_dsn, schemas, big))


@pytest.mark.parametrize("spans", ["second", "both"])
def test_loader_killed_in_a_split_files_second_span_counts_every_batch_once(
        tmp_path: Path, pg_dsn: str, schemas: tuple, ray_session: None, job_overrides, spans: str,
        record_property: Callable[[str, Any], None]) -> None:
    """The loader kill in the second span of a split plain file (pool.read_splits=2), or both spans' loaders
    at once: two loaders of this run write the one file, so a retry's replay must take its own span's
    batches only (the other span's are this run's too) and its eof/error key must stay apart from the other
    span's (same member). Same gate, same kill point; the batch size shrinks before the retries."""
    from ray.experimental import internal_kv

    from loadkit.examples.cnpj.sample import generate_month

    target, led = schemas
    big = generate_month(tmp_path, 2024, 5, rows=30_000, shards=1, seed=3, compress=False)
    (path,) = [big.root / p for p in big.files["estabelecimentos"]]
    middle = path.stat().st_size // 2
    server_port = int(query(pg_dsn, "SELECT inet_server_port()")[0][0] or 5432)
    killed: List[int] = []
    gate = LedgerGate(pg_dsn, led)
    run = Running()

    def second_span(sql: str) -> list:
        return query(pg_dsn, sql.format(led=f'"{led}"'), (middle,))

    def kill_the_loader(stop: threading.Event) -> None:
        try:  # 2 batches of the second span committed (and of the first: it started at the same time)
            while not (second_span("SELECT 1 FROM {led}.batch WHERE start_offset > %s OFFSET 1")
                       and second_span("SELECT 1 FROM {led}.batch WHERE start_offset < %s OFFSET 1")):
                gate.let_through(run)
            where = "start_offset > %s" if spans == "second" else "%s > -1"
            pids = [int(w.split("-")[1]) for w, in second_span("SELECT DISTINCT writer FROM {led}.batch WHERE "
                                                                 + where)]
            assert len(pids) == (1 if spans == "second" else 2), pids
            for pid in pids:
                wait_until(lambda: bool(_ports_of(pid, server_port) & _blocked_ports(pg_dsn, led))
                           or not run.alive(), 120, "the span's loader blocked with its next batch")
            assert run.alive(), "the run ended before the loader could be killed"
            for key in internal_kv._internal_kv_list(b"board:", namespace="loadkit"):
                if key.endswith(b":rows"):
                    internal_kv._internal_kv_put(key, b"300", overwrite=True, namespace="loadkit")
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        finally:
            gate.release()

    split = ["batch.size=1000", "batch.read_block_bytes=65536", "pool.read_splits=2",
             'job.tables.estabelecimentos.source.paths=["{year:04d}-{month:02d}/*ESTABELE"]',
             "job.tables.estabelecimentos.source.format=csv", "job.tables.estabelecimentos.source.member=null",
             "job.tables.empresas.enabled=false", "job.tables.socios.enabled=false"]
    with Background(kill_the_loader):
        try:
            result = run_job(compose(job_overrides(big.root, *split, "tracking.enabled=false", *DROP_REFERENCE,
                                                   *FAST_RETRY)))
        finally:
            run.done.set()
    assert result.status == "succeeded", result.error
    assert killed, "the load ended before the loader could be killed"
    writers = dict(query(pg_dsn, f'SELECT writer, min(start_offset) FROM "{led}".batch GROUP BY writer'))
    assert len(writers) == 2 + len(killed), writers  # 2 spans + a retry per kill
    if spans == "second":
        assert writers[f"writer-{killed[0]}"] > middle / 2, writers
    ledger = run_totals(pg_dsn, led, result.run_id)
    assert summary_totals(result) == ledger, (summary_totals(result), ledger)
    assert ledger["estabelecimentos"][1] == big.rows["estabelecimentos"]
    ranges = query(pg_dsn, f'SELECT start_offset, end_offset FROM "{led}".batch ORDER BY 1')
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), "ranges tile the file: no gap, no overlap"
    expected = big.expected["estabelecimentos"]
    got = table_rows(pg_dsn, target, "estabelecimentos", list(expected[0].keys()))
    assert Counter(canon(r) for r in got) == Counter(canon(r) for r in last_wins(expected, KEYS["estabelecimentos"]))
    record_property("killed_loaders_batches", len(ranges))


def test_writer_connections_terminated_mid_load(month: SampleManifest, pg_dsn: str, schemas: tuple,
                                                ray_session: None, args,
        record_property: Callable[[str, Any], None]) -> None:
    """pg_terminate_backend on this run's writer sessions (by application_name) mid-load, twice: the writers
    retry on new connections, the run succeeds, every row once, its summary equal to its ledger rows.

    Deterministic, not timed: a LedgerGate holds ledger.batch, so a writer cannot commit any batch without
    waiting on it. The gate lets the first waiting writers commit (the load is under way), then the test
    terminates the run's writer sessions seen waiting on it with a batch in hand (rows COPYed, ledger row
    blocked), waits until the writers wait again on new sessions (the retries of those batches, or others),
    terminates those too, and only then lets the load go on. (Terminating whatever writer session existed
    every 0.15 s, or locking the ledger in short windows after the first commit, depended on the load
    lasting long enough: the load is ~10 batches committed within ~0.5 s, and the first window came after
    1-6 of them locally, after all of them in a CI run: 0 terminations.)"""
    _, led = schemas
    terminated: List[int] = []
    gate = LedgerGate(pg_dsn, led)
    run = Running()

    def sessions() -> str:  # for a failure message: what the run's sessions were doing
        return "\n".join(map(str, query(pg_dsn, "SELECT pid, application_name, state, wait_event_type, wait_event, "
                                                "left(query, 80) FROM pg_stat_activity WHERE application_name "
                                                "LIKE 'loadkit%%' ORDER BY 2")))

    def terminate_writers(stop: threading.Event) -> None:
        try:
            gate.let_through(run)  # mid-load: the first waiting writers' batches commit
            run_id = current_run(pg_dsn, led)
            assert run_id, "no running run in the ledger"
            waiting: List[int] = []

            def writers_waiting() -> bool:  # this run's writer sessions waiting on the gate, not terminated yet
                waiting[:] = [r[0] for r in query(
                    pg_dsn, "SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                            "WHERE NOT l.granted AND l.relation = %s::regclass AND a.application_name = %s "
                            "AND NOT a.pid = ANY(%s)", (f'"{led}".batch', f"loadkit:{run_id}:writer", terminated))]
                return bool(waiting) or not run.alive()

            for round_ in (1, 2):
                try:
                    wait_until(writers_waiting, 300, f"writer sessions waiting on the ledger (round {round_})")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}; the run's sessions:\n{sessions()}") from None
                assert run.alive(), f"the run ended before round {round_} of terminations:\n{sessions()}"
                for pid in waiting:
                    if query(pg_dsn, "SELECT pg_terminate_backend(%s)", (pid,))[0][0]:
                        terminated.append(pid)
                assert terminated, f"no waiting writer session could be terminated:\n{sessions()}"
        finally:
            gate.release()  # the retried writers commit; the load goes on to its end

    # Chunks are at least 64 KiB (read._target_bytes), so this month is ~10 batches at any small batch.size,
    # committed in ~0.5 s when nothing holds them: the gate, not the size, keeps the load going meanwhile.
    with Background(terminate_writers):
        try:
            result = run_job(compose(args(40)))
        finally:
            run.done.set()
    assert result.status == "succeeded", result.error
    assert len(terminated) >= 2, terminated
    record_property("backends_terminated", len(terminated))
    # Each terminated session failed one attempt of a batch in hand, which its writer retried and committed.
    retries = query(pg_dsn, f'SELECT coalesce(sum(attempts - 1), 0) FROM "{led}".batch WHERE run_id = %s',
                    (result.run_id,))[0][0]
    assert retries >= len(terminated), f"{retries} retried attempts in the ledger, {len(terminated)} terminations"
    record_property("retried_attempts", int(retries))
    summary = summary_totals(result)
    assert summary == run_totals(pg_dsn, led, result.run_id)
    assert all(read == loaded + rejected for _, read, loaded, rejected in summary.values()), summary
    record_property("exactly_once", assert_exactly_once(pg_dsn, schemas, month))


@pytest.fixture()
def embedded() -> Iterator[tuple]:
    """A private pgserver PostgreSQL (never the shared cluster): (dsn, pg_ctl), stopped and removed afterwards.

    Not under pytest's tmp_path: every pytest start re-chmods /tmp/pytest-of-<user> to 0700, which
    locks out the unprivileged user pgserver runs PostgreSQL as."""
    import pgserver

    from loadkit.postgres.db import embedded_dsn

    pgdata = Path(tempfile.mkdtemp(prefix="loadkit-faults-pg-")) / "pg"
    dsn = embedded_dsn(str(pgdata))
    server = pgserver.get_server(str(pgdata.resolve()), cleanup_mode=None)  # the same instance, for its user

    def pg_ctl(*argv: str) -> None:  # as the server's own (unprivileged) user, like pgserver does
        pgserver._commands.pg_ctl(["-w", *argv], pgdata=server.pgdata, user=server.system_user, timeout=60)

    yield dsn, pg_ctl
    pg_ctl("-m", "immediate", "stop")
    shutil.rmtree(pgdata.parent)


def test_embedded_server_restarted_mid_load(month: SampleManifest, ray_session: None, embedded: tuple,
                                            job_overrides, record_property: Callable[[str, Any], None]) -> None:
    """pg_ctl restart of the job's own embedded server mid-load: completes, or fails transient and the rerun does."""
    dsn, pg_ctl = embedded
    schemas = ("t_faults", "l_faults")
    overrides = [o for o in job_overrides(month.root) if not o.startswith(("sink.dsn=", "job.schema=",
                                                                          "sink.ledger_schema="))]
    cfg_args = overrides + [f"sink.dsn='{dsn}'", f"job.schema={schemas[0]}", f"sink.ledger_schema={schemas[1]}",
                            "batch.size=200", "tracking.enabled=false", *DROP_REFERENCE, *FAST_RETRY]
    restarts: List[float] = []
    # Mid-load, not timed: the gate lets writers commit until 2 batches have, and the restart comes while a
    # writer is blocked on the ledger with its next batch in hand (waiting for 2 commits by polling restarted
    # the server after the run had ended when the run was fast: a pass that proved nothing).
    gate = LedgerGate(dsn, schemas[1])
    run = Running()

    def restart(stop: threading.Event) -> None:
        try:
            while committed(dsn, schemas[1]) < 2:
                gate.let_through(run)
            gate.wait_blocked(run)
            started = time.monotonic()
            pg_ctl("-m", "fast", "restart")
            restarts.append(time.monotonic() - started)
        finally:
            gate.close()  # the restart ended its session (or the test failed: it goes with the connection)

    with Background(restart):
        try:
            first = run_job(compose(cfg_args))
        finally:
            run.done.set()
    assert restarts, "the server was never restarted"
    record_property("restart_s", round(restarts[0], 2))
    record_property("first_run", f"{first.status}: {first.error}")
    if first.status != "succeeded":
        assert first.status == "failed" and classify(first.error) is Category.TRANSIENT, first.error
        assert query(dsn, f'SELECT status, error_category FROM "{schemas[1]}".run WHERE run_id = %s',
                     (first.run_id,)) == [("failed", Category.TRANSIENT.value)]
        rerun = run_job(compose(cfg_args))
        assert rerun.status == "succeeded", rerun.error
    assert_exactly_once(dsn, schemas, month)


def test_ledger_deadlocks_are_retried(month: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None,
                                      args, record_property: Callable[[str, Any], None]) -> None:
    """A session locking ledger.batch then the staging tables, against writers that lock them the other
    way round: PostgreSQL aborts a writer with 40P01, the writer retries, counts stay exact.

    Deterministic, not timed: the interferer holds ledger.batch before the run starts (so no batch can
    commit before the collision), waits until a writer is blocked on it (that writer holds its staging
    table from its COPY), then closes the cycle. The writers run with deadlock_timeout=3s (in the DSN)
    and the interferer with 60 s, so the writer's own deadlock check -- due 3 s after it began waiting,
    long after the cycle closed -- finds the cycle and the writer is the victim."""
    from loadkit.postgres.ledger import Ledger

    target, led = schemas
    plan_table = compose(args(200)).job.tables["estabelecimentos"]
    assert plan_table.mode == "merge"  # so writers COPY into a staging table, then into ledger.batch
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        Ledger(led).ensure(cur)  # an existing ledger takes no DDL at run start: nothing the held lock blocks
    conn.close()
    slow_check = ("&" if "?" in pg_dsn else "?") + "options=-c%20deadlock_timeout%3D3s"
    run_args = [f"sink.dsn='{pg_dsn}{slow_check}'" if a.startswith("sink.dsn=") else a for a in args(200)]
    holder = psycopg2.connect(pg_dsn, application_name="loadkit-test-interferer")
    watcher = psycopg2.connect(pg_dsn, application_name="loadkit-test-watcher")
    watcher.autocommit = True
    deadlocks: List[str] = []
    cycles = [0]

    def writers_blocked_on_batch() -> bool:
        with watcher.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                        "WHERE NOT l.granted AND l.relation = %s::regclass AND a.application_name LIKE %s",
                        (f'"{led}".batch', "loadkit:%:writer"))
            return bool(cur.fetchone()[0])

    def staging_tables() -> List[str]:
        with watcher.cursor() as cur:
            cur.execute("SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
                        (f"{target}__lk_stage",))
            return [r[0] for r in cur.fetchall()]

    def interfere(stop: threading.Event) -> None:
        wait_until(lambda: writers_blocked_on_batch() or stop.is_set(), 120, "a writer blocked on ledger.batch")
        if stop.is_set():
            return
        cycles[0] += 1
        try:  # the blocked writer holds its staging table: this closes the cycle
            held.execute(f"LOCK TABLE {', '.join(staging_tables())} IN SHARE ROW EXCLUSIVE MODE")
        except psycopg2.errors.DeadlockDetected:
            deadlocks.append("interferer")
        holder.rollback()  # one collision (every writer blocked by then is in the cycle); the rest loads freely

    held = holder.cursor()  # before the run: no batch commits before the collision
    held.execute("SET LOCAL deadlock_timeout = '60s'")
    held.execute(f'LOCK TABLE "{led}".batch IN SHARE ROW EXCLUSIVE MODE')
    try:
        with Background(interfere):
            result = run_job(compose(run_args))
    finally:
        holder.close()
        watcher.close()
    assert result.status == "succeeded", result.error
    assert cycles[0] == 1, "the writers never blocked on ledger.batch: the scenario proved nothing"
    retried = ledger_count(pg_dsn, led, "SELECT count(*) FROM {led}.batch WHERE attempts > 1")
    record_property("writer_deadlock_retries", retried)
    record_property("interferer_deadlocks", len(deadlocks))
    assert deadlocks == [], "the interferer was the deadlock victim: no writer retry was exercised"
    assert retried >= 1, "no writer retried after the deadlocks"
    assert result.metrics.deadlocks >= 1, "the writers' deadlock count (summary, MLflow) missed the 40P01"
    record_property("exactly_once", assert_exactly_once(pg_dsn, schemas, month))


def test_serialization_failures_on_ledger_updates_are_retried(pg_dsn: str, schemas: tuple) -> None:
    """Two SERIALIZABLE read-then-write ledger transactions collide (40001); the retried one lands once."""
    from loadkit.postgres import ledger

    _, led = schemas
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        ledger.Ledger(led).ensure(cur)
    conn.close()
    policy = RetryPolicy(attempts=5, initial_wait_s=0.05, max_wait_s=0.5, multiplier=2.0, jitter_s=0.05,
                         breaker_failures=5, breaker_cooldown_s=1.0)
    barrier = threading.Barrier(2)
    attempts: Counter = Counter()
    errors: List[BaseException] = []

    def mark(sha: str) -> None:
        def once() -> None:
            attempts[sha] += 1
            conn = psycopg2.connect(pg_dsn)
            try:
                conn.set_session(isolation_level="SERIALIZABLE")
                with conn, conn.cursor() as cur:
                    cur.execute(f'SELECT count(*) FROM "{led}".file WHERE table_name = %s', ("t",))
                    ordinal = cur.fetchone()[0]
                    if attempts[sha] == 1:
                        barrier.wait(10)  # both have read before either writes: a write skew
                    ledger.Ledger(led).mark_file(cur, "run", "t", "2024-05", sha, f"{sha}.zip", ordinal, 1, "loaded")
            finally:
                conn.close()

        try:
            retrying(policy)(once)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=mark, args=(sha,)) for sha in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(attempts.values()) == [1, 2]  # exactly one transaction lost the race and was retried
    rows = query(pg_dsn, f'SELECT file_sha, ordinal FROM "{led}".file ORDER BY 1')
    assert [r[0] for r in rows] == ["a", "b"] and sorted(r[1] for r in rows) == [0, 1]


def test_the_embedded_server_starts_without_a_runtime_dir_warning() -> None:
    """Without $XDG_RUNTIME_DIR (a container, cron, sudo) pgserver's runtime folder made platformdirs warn on
    every embedded run (a fresh-user review, session 19); the fallback folder serves pgserver's lock, so the
    warning is silenced for that category only, around pgserver (``db.embedded_dsn``)."""
    code = textwrap.dedent("""
        import pathlib, shutil, tempfile, warnings
        warnings.simplefilter("always")
        pgdata = pathlib.Path(tempfile.mkdtemp(prefix="loadkit-xdg-")) / "pg"
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            from loadkit.postgres.db import embedded_dsn
            dsn = embedded_dsn(str(pgdata))
        import pgserver
        server = pgserver.get_server(str(pgdata.resolve()), cleanup_mode=None)
        pgserver._commands.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user,
                                  timeout=60)
        shutil.rmtree(pgdata.parent)
        print("started", dsn.startswith("postgresql://"))
        print("warnings", sorted({w.category.__name__ for w in seen}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "started True" in done.stdout, done.stdout
    assert "RuntimeDirWarning" not in done.stdout + done.stderr, done.stdout + done.stderr
