"""PostgreSQL crash restarts (``pg_ctl -m immediate restart``) while a month loads: nothing lost.

Crash recovery empties UNLOGGED tables, so the staging of merge/replace/snapshot loses every
batch it held while the ledger says they committed. The run must notice before it publishes
(staging is re-verified per batch inside the publishing transaction), read the lost batches
again, and finish with exactly the generator's oracle -- or fail transient, never succeed short.

Each test crashes a private server (tests/private_pg.py, never the shared one) twice: once
mid-stream after a few committed batches, with a writer holding an uncommitted batch (see Crasher),
once when the first file is settled (the run is about to publish, or publishing). Every mode, both
executors.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional

import psycopg2
import pytest

from loadkit.examples.cnpj.sample import SampleManifest
from loadkit.runner import run_job
from tests.helpers import compose, query
from tests.private_pg import PrivatePostgres
from tests.test_e2e_monthly import KEYS, SOCIO_IDENTITY, canon, last_wins, table_rows
from tests.test_faults import LedgerGate, Running, committed, ledger_count

pytestmark = [pytest.mark.slow, pytest.mark.fault]

TABLES = ("empresas", "estabelecimentos", "socios", "simples")
DROP_REFERENCE = [f"~job.tables.{t}"
                  for t in ("cnaes", "motivos", "municipios", "naturezas", "paises", "qualificacoes")]
# Every mode in every run (one table each), two layouts so each mode meets each table shape.
LAYOUTS = {
    "A": {"empresas": "append", "estabelecimentos": "merge", "socios": "replace", "simples": "snapshot"},
    "B": {"empresas": "snapshot", "estabelecimentos": "replace", "socios": "append", "simples": "merge"},
}
FAST_RETRY = ["retry.initial_wait_s=0.2", "retry.max_wait_s=1.0", "retry.jitter_s=0.1", "retry.attempts=10",
              "retry.breaker_cooldown_s=1.0"]


@pytest.fixture(scope="module")
def server() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        yield pg
    finally:
        pg.close()


MONTH = {"rows": 400, "shards": 2, "seed": 5}  # the size of conftest's `month`


def _count(dsn: str, sql: str) -> int:
    try:
        return int(query(dsn, sql)[0][0])
    except psycopg2.Error:  # not created yet, or the server is restarting
        return 0


class Crasher:
    """Crashes the server twice from a thread: mid-stream, then when the first file is settled.

    Mid-stream is deterministic, not timed: a LedgerGate holds the ledger's batch table, so no writer can
    commit a batch without waiting on it. The gate lets the waiting writers commit until ``crash_at``
    batches have, one of them into an UNLOGGED staging table (``unlogged``: the tables whose staging crash
    recovery empties), waits until a writer is blocked again with a batch in hand (rows COPYed, its ledger
    row waiting), and crashes the server then -- which also ends the gate's session, so the load goes on.
    Until then a second session holds the ledger's file table, so no file settles and no table publishes
    before the crash: a table whose batches all came through the gate would otherwise publish its staging
    into the logged target first, and the crash would find nothing to empty (1 run in ~5 of layout B).
    (Polling the ledger every 20 ms and crashing once it counted ``crash_at`` batches depended on the
    load lasting long enough: the month is ~40 small batches, and a CI run committed all of them
    between two polls: no crash.) The settle crash stays a poll: a run may finish before it."""

    def __init__(self, pg: PrivatePostgres, led: str, crash_at: int, unlogged: List[str],
                 settled: Callable[[], int]) -> None:
        self.pg, self.crash_at, self.unlogged, self.settled = pg, crash_at, unlogged, settled
        self.led = led
        self.gate = LedgerGate(pg.dsn, led)  # makes the ledger: the file table exists from here on
        self.files = psycopg2.connect(pg.dsn, application_name="loadkit-test-gate")
        with self.files.cursor() as cur:
            cur.execute(f'LOCK TABLE "{led}".file IN SHARE ROW EXCLUSIVE MODE')  # no settle, no publish
        self.run = Running()
        self.hit: List[str] = []
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._crash, daemon=True)

    def _crash(self) -> None:
        try:
            try:
                while committed(self.pg.dsn, self.led) < self.crash_at or not self._staged_unlogged():
                    self.gate.let_through(self.run)
                self.gate.wait_blocked(self.run)
                self.pg.crash_restart()
            finally:
                self.gate.close()  # after a crash their sessions are gone already
                self.files.close()
            self.hit.append("stream")
            while self.settled() < 1:
                if self._stop.wait(0.02):
                    return
            self.pg.crash_restart()
            self.hit.append("publish")
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _staged_unlogged(self) -> bool:
        return ledger_count(self.pg.dsn, self.led, "SELECT count(*) FROM {led}.batch WHERE table_name = ANY(%s)",
                            (self.unlogged,)) > 0

    def __enter__(self) -> "Crasher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.run.done.set()
        self._stop.set()
        self._thread.join(60)


class LostBatches(logging.Handler):
    """Collects modes.verify_staging's warnings (committed batches missing from staging) while a run goes;
    on the logger itself, so whatever the ``loadkit`` logger's propagation is."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []
        self._logger = logging.getLogger("loadkit.postgres.modes")

    def emit(self, record: logging.LogRecord) -> None:
        if "missing from staging" in record.getMessage():
            self.messages.append(record.getMessage())

    def __enter__(self) -> "LostBatches":
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._logger.removeHandler(self)


def oracle_report(dsn: str, target: str, led: str, month: SampleManifest,
                  layout: Dict[str, str]) -> Dict[str, Dict[str, int]]:
    """Per table: rows lost and duplicated against the oracle, overlapping ledger ranges, ledger rows - source."""
    report: Dict[str, Dict[str, int]] = {}
    for table, mode in layout.items():
        expected = month.expected[table]
        columns = list(expected[0].keys())
        rows = expected if mode == "append" else last_wins(expected, KEYS.get(table, SOCIO_IDENTITY))
        want = Counter(canon(r) for r in rows)
        got = Counter(canon(r) for r in table_rows(dsn, target, table, columns))
        ranges = query(dsn, f'SELECT file_sha, member, start_offset, end_offset, rows_in FROM "{led}".batch '
                            "WHERE table_name = %s ORDER BY 1, 2, 3", (table,))
        report[table] = {
            "lost": sum((want - got).values()), "duplicated": sum((got - want).values()),
            "overlapping_batches": sum(1 for a, b in zip(ranges, ranges[1:]) if a[:2] == b[:2] and b[2] < a[3]),
            "ledger_rows_minus_source": sum(r[4] for r in ranges) - month.rows[table],
        }
    return report


@pytest.mark.parametrize("executor", ["inprocess", "ray"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_crash_restarts_lose_nothing(layout: str, executor: str, server: PrivatePostgres, month: SampleManifest,
                                     ray_session: None, request: pytest.FixtureRequest,
                                     record_property: Callable[[str, Any], None]) -> None:
    dsn = server.dsn
    modes = LAYOUTS[layout]
    target, led = f"t_crash_{layout}_{executor}".lower(), f"l_crash_{layout}_{executor}".lower()
    overrides = [
        "+job=monthly", "year=2024", "month=5", f"data_root={month.root}", f"sink.dsn={dsn}",
        f"job.schema={target}", f"sink.ledger_schema={led}", "tracking.enabled=false", "env.progress_bars=false",
        f"env.executor={executor}", "batch.size=40", "batch.policy=fixed", *DROP_REFERENCE, *FAST_RETRY,
        *[f"job.tables.{t}.mode={m}" for t, m in modes.items()],
    ]
    cfg = compose(overrides)
    settled = lambda: _count(dsn, f'SELECT count(*) FROM "{led}".file')  # noqa: E731
    crash_at = 1 if layout == "A" else 4  # different points of the stream per layout
    unlogged = [t for t, m in modes.items() if m in ("replace", "snapshot")]  # a merge first load's is logged
    lost = LostBatches()
    started = time.monotonic()
    with Crasher(server, led, crash_at, unlogged, settled) as crasher, lost:
        first = run_job(cfg)
        # The publish crash may come after the run ended (a fast finish): the report below still holds.
    assert crasher.error is None, crasher.error
    record_property("crashes", ",".join(crasher.hit))
    record_property("first_run", f"{first.status}: {first.error}")
    record_property("lost", "; ".join(lost.messages))
    assert "stream" in crasher.hit, "the load finished before the first crash: the test proved nothing"
    # The stream crash came after a batch committed into UNLOGGED staging: recovery emptied it, and the run
    # must have noticed (verify_staging) -- else this run never met the fault the test is about.
    assert lost.messages, "no committed batch went missing from staging: the crash proved nothing"
    # The driver retries its own transactions through a restart, and the writers theirs: the first run
    # must succeed (the old behaviour was to succeed short, or to fail on a settle/publish crash).
    assert first.status == "succeeded", first.error
    # A success is exact at once, whatever the crash points hit: never published short.
    report = oracle_report(dsn, target, led, month, modes)
    record_property("seconds", round(time.monotonic() - started, 1))
    assert all(v == 0 for t in report.values() for v in t.values()), report
    # Every run row that says succeeded counted what its ledger batches hold.
    for run_id, rows_read in query(dsn, f'SELECT run_id, rows_read FROM "{led}".run WHERE status = %s',
                                   ("succeeded",)):
        in_ledger = query(dsn, f'SELECT coalesce(sum(rows_in), 0) FROM "{led}".batch WHERE run_id = %s',
                          (run_id,))[0][0]
        assert rows_read == in_ledger, (run_id, rows_read, in_ledger)
    request.addfinalizer(lambda: _drop(dsn, target, led, f"{target}__lk_stage"))


def _drop(dsn: str, *schemas: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        for s in schemas:
            cur.execute(f'DROP SCHEMA IF EXISTS "{s}" CASCADE')
    conn.close()
