"""Concurrent runs on one database, litter and stuck states, late refusals, session limits.

- 4 runs of different months at once, on a fresh database and again (force) on the initialised
  one: all exit 0 (DDL and publishing serialised per target schema under a transaction-level
  advisory lock; a deadlock with anyone else is retried).
- after a load and a no-op rerun no loadkit object is left in the target schema and no table row
  is left 'loading'; a killed run's rows are closed by the next run.
- a derived identifier over 63 bytes is refused before any SQL.
- sink.connect_timeout / statement_timeout_ms / lock_timeout_ms reach every session.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Tuple

import adbc_driver_postgresql.dbapi as adbc
import psycopg2
import pytest

from loadkit.postgres import db
from loadkit.postgres import modes
from loadkit.errors import ConfigError
from loadkit.examples.cnpj.sample import generate_month
from loadkit.plan import build_plan
from loadkit.runner import run_job
from tests.helpers import ROOT, compose, query

SMALL = [f"~job.tables.{t}" for t in ("estabelecimentos", "socios", "simples")]


@pytest.mark.slow
def test_four_concurrent_months_on_one_database_all_succeed(pg_dsn: str, schemas: tuple, job_overrides,
                                                           tmp_path: Path) -> None:
    target, led = schemas
    months = [5, 6, 7, 8]
    for m in months:
        generate_month(tmp_path / "data", 2024, m, rows=50, shards=1, seed=m)

    def wave(*extra: str) -> List[int]:
        procs = []
        for m in months:
            args = job_overrides(tmp_path / "data", "env.executor=inprocess", "tracking.enabled=false", *SMALL,
                                 *extra, month=m)
            log = open(tmp_path / f"run-{m}-{len(extra)}.log", "wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "loadkit", *args], cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT))
        return [p.wait(300) for p in procs]

    first = wave()
    logs = {f.name: f.read_text()[-1500:] for f in tmp_path.glob("run-*.log")}
    assert first == [0, 0, 0, 0], logs
    second = wave("force=true")  # the initialised database: publishing (indexes, swaps) at the same time
    logs = {f.name: f.read_text()[-1500:] for f in tmp_path.glob("run-*-1.log")}
    assert second == [0, 0, 0, 0], logs
    assert query(pg_dsn, f'SELECT status, count(*) FROM "{led}".run GROUP BY 1') == [("succeeded", 8)]


@pytest.mark.slow
def test_no_litter_and_no_stuck_rows(pg_dsn: str, schemas: tuple, job_overrides, tmp_path: Path) -> None:
    target, led = schemas
    month = generate_month(tmp_path / "data", 2024, 5, rows=50, shards=1, seed=2)
    overrides = job_overrides(month.root, "env.executor=inprocess", "tracking.enabled=false", *SMALL)
    assert run_job(compose(overrides)).status == "succeeded"
    # A killed run: its rows stay 'running' / 'loading' until the next run of the month closes them.
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(f'INSERT INTO "{led}".run (run_id, job, period, status) VALUES (%s, %s, %s, %s)',
                    ("killed", "cnpj_monthly", "2024-05", "running"))
        cur.execute(f'INSERT INTO "{led}".table_load (run_id, table_name, period, mode, status) '
                    "VALUES ('killed', 'empresas', '2024-05', 'merge', 'loading')")
    conn.close()
    rerun = run_job(compose(overrides))  # a no-op: every file is loaded
    assert rerun.status == "succeeded"
    litter = query(pg_dsn, "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
                           "AND table_name LIKE %s", (target, "%\\_\\_lk\\_%"))
    assert litter == [], litter
    staged = query(pg_dsn, "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                   (f"{target}__lk_stage",))
    assert staged == [], staged  # loadkit's own staging schema is empty after publishing, too
    assert query(pg_dsn, f'SELECT count(*) FROM "{led}".table_load WHERE status = %s', ("loading",)) == [(0,)]
    assert query(pg_dsn, f'SELECT status FROM "{led}".run WHERE run_id = %s', ("killed",)) == [("crashed",)]
    assert query(pg_dsn, f'SELECT status FROM "{led}".table_load WHERE run_id = %s', ("killed",)) == [("crashed",)]


def test_long_derived_identifiers_are_refused_before_any_sql(job_overrides, tmp_path: Path) -> None:
    month = generate_month(tmp_path / "data", 2024, 5, rows=50, shards=1, seed=2)
    plan = build_plan(compose(job_overrides(month.root)))
    base = plan.table("empresas")
    for mode, length in (("snapshot", 40), ("snapshot", 46), ("replace", 52), ("merge", 47)):
        table = dataclasses.replace(base, name="e" * length, mode=mode)
        with pytest.raises(ConfigError, match="too long"):
            modes.validate_identifiers(table)
    modes.validate_identifiers(dataclasses.replace(base, name="e" * 30, mode="snapshot"))  # fits
    assert all(len(n) <= 63 for n in modes.derived_identifiers(dataclasses.replace(base, name="e" * 30,
                                                                                    mode="snapshot")))


def test_session_limits_reach_driver_and_writer_sessions(pg_dsn: str) -> None:
    dsn = db.session_dsn(pg_dsn, connect_timeout=3, statement_timeout_ms=4500, lock_timeout_ms=700)
    assert db.parse_dsn(dsn)["connect_timeout"] == "3"
    conn = db.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('statement_timeout'), current_setting('lock_timeout')")
        assert cur.fetchone() == ("4500ms", "700ms")
    conn.close()
    writer = adbc.connect(db.with_application_name(dsn, "loadkit:test:writer"))
    with writer.cursor() as cur:
        cur.execute("SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
                    "current_setting('application_name')")
        assert cur.fetchall() == [("4500ms", "700ms", "loadkit:test:writer")]
    writer.close()
    with pytest.raises(psycopg2.errors.QueryCanceled):  # the limit is enforced, not just stored
        c = db.connect(db.session_dsn(pg_dsn, statement_timeout_ms=100))
        try:
            c.cursor().execute("SELECT pg_sleep(2)")
        finally:
            c.close()


def test_two_jobs_with_a_table_of_the_same_name_on_one_ledger_never_overlap(
        tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs (their own names and target schemas) whose table has the same name, on the default-style
    shared ledger, loading the same period: the ledger knows a table by its name and period, so while one
    run holds the table the other stops before it reads anything (transient: exit 4, retry), naming the
    table. Without that, the second run's publish counted the first one's batches as lost from its own
    staging and forgot them. Then each target holds exactly its month."""
    import dataclasses as dc
    import threading

    from loadkit.errors import TransientDBError
    from loadkit.postgres.modes import Merge
    from tests.helpers import autocommit_cursor
    from tests.test_merge_finalize import config, last_wins, table_state, write_month

    target, led = schemas
    other = target + "_b"
    month = {"a.csv": [(f"k{i}", "x", str(i)) for i in range(50)] + [("k1", "y", "7")]}
    names = write_month(tmp_path, 5, month)
    first_cfg = config(tmp_path, pg_dsn, (target, led), mlflow_uri, names)
    second_cfg = config(tmp_path, pg_dsn, (other, led), mlflow_uri, names)
    second_cfg.job = dc.replace(second_cfg.job, name="another_job")  # its own job: its own job lock
    publishing, release = threading.Event(), threading.Event()
    finalize = Merge.finalize

    def held(self: Merge, cur: Any, ledger: Any) -> Any:
        if self.table.schema == target:
            publishing.set()
            assert release.wait(120)
        return finalize(self, cur, ledger)

    monkeypatch.setattr(Merge, "finalize", held)
    results: List[Any] = []
    runner = threading.Thread(target=lambda: results.append(run_job(first_cfg)))
    runner.start()
    try:
        assert publishing.wait(120), "the first run never reached its publish"
        with pytest.raises(TransientDBError, match="a table named items for period"):
            run_job(second_cfg)
        # refused before its run row: nothing of the second job in the ledger, nothing in its target
        assert query(pg_dsn, f'SELECT count(*) FROM "{led}".run WHERE job = %s', ("another_job",)) == [(0,)]
        assert query(pg_dsn, "SELECT to_regclass(%s)", (f'"{other}".items',)) == [(None,)]
    finally:
        release.set()
        runner.join(120)
    own_ledger = led + "_b"
    try:
        assert results and results[0].status == "succeeded", results and results[0].error
        with pytest.raises(ConfigError, match="accounts for table items of period all in schema"):
            run_job(second_cfg)  # the ledger's rows of "items" are the first job's target's (Ledger.claim_targets)
        second_cfg.sink = dc.replace(second_cfg.sink, ledger_schema=own_ledger)
        again = run_job(second_cfg)
        assert again.status == "succeeded", again.error
        want = {k: v for k, (v, _) in last_wins(month).items()}
        assert table_state(pg_dsn, target) == want and table_state(pg_dsn, other) == want
    finally:
        with autocommit_cursor(pg_dsn) as cur:
            for schema in (other, f"{other}__lk_stage", own_ledger):
                cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.parametrize("mode", ["append", "merge"])
def test_a_ledger_accounts_for_one_target_per_table_name_and_period(
        tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str, mode: str) -> None:
    """Two jobs with a same-named table, one ledger, one period, one after the other, loading different
    files into two schemas. Each run's identity check used to find its own target missing the other's rows
    and forget the other's claims, so the first job's next run read its files again: an append target held
    every row twice (1600 -> 3200 with the CNPJ sample). Now the second job is refused before any work
    (config error naming the ledger, table, period and schema); with its own ledger it loads; the first job's
    rerun changes nothing. A claim whose target table is gone is taken over. Expected rows: the csv module."""
    import dataclasses as dc
    import re

    from tests.helpers import autocommit_cursor
    from tests.test_merge_finalize import config, write_month

    target, led = schemas
    other = target + "_b"
    first_root, second_root = tmp_path / "a", tmp_path / "b"
    first_names = write_month(first_root, 5, {"a.csv": [(f"k{i}", "x", str(i)) for i in range(40)]})
    second_names = write_month(second_root, 5, {"a.csv": [(f"z{i}", "y", str(i)) for i in range(25)]})

    def cfg(root: Path, names: List[str], schema: str, ledger: str, job: str) -> Any:
        c = config(root, pg_dsn, (schema, ledger), mlflow_uri, names)
        table = dc.replace(c.job.tables["items"], mode=mode, key=[] if mode == "append" else ["k"])
        c.job = dc.replace(c.job, name=job, tables={"items": table})
        return c

    def rows(schema: str) -> List[Tuple[str, str, int]]:
        return sorted(query(pg_dsn, f'SELECT k, a, b FROM "{schema}".items'))

    first_want = sorted((f"k{i}", "x", i) for i in range(40))
    second_want = sorted((f"z{i}", "y", i) for i in range(25))
    try:
        assert run_job(cfg(first_root, first_names, target, led, "job_a")).status == "succeeded"
        with pytest.raises(ConfigError, match=re.escape(f"ledger {led} accounts for table items of period all in "
                                                        f"schema {target} (job job_a), not {other}")):
            run_job(cfg(second_root, second_names, other, led, "job_b"))
        assert query(pg_dsn, "SELECT to_regclass(%s)", (f'"{other}".items',)) == [(None,)]
        assert run_job(cfg(second_root, second_names, other, led + "_b", "job_b")).status == "succeeded"
        again = run_job(cfg(first_root, first_names, target, led, "job_a"))
        assert again.status == "succeeded" and again.metrics.tables["items"].rows_read == 0  # nothing read again
        assert rows(target) == first_want and rows(other) == second_want
        # The first target dropped for good: its claim is taken over by a job that loads elsewhere.
        with autocommit_cursor(pg_dsn) as cur:
            cur.execute(f'DROP TABLE "{target}".items')
        moved = run_job(cfg(second_root, second_names, other + "_c", led, "job_b"))
        assert moved.status == "succeeded", moved.error
        assert rows(other + "_c") == second_want
    finally:
        with autocommit_cursor(pg_dsn) as cur:
            for schema in (other, f"{other}__lk_stage", led + "_b", other + "_c", f"{other}_c__lk_stage"):
                cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
