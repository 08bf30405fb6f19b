"""The Ledger object: named constraints compatible with older ledgers, and a duplicate batch commit
told by the violated constraint's name from the driver's diagnostics (psycopg2 and ADBC), not by
the message text."""
from __future__ import annotations

import psycopg2
import pyarrow as pa
import pytest

from loadkit.postgres import db
from loadkit.postgres.copy import adbc_copy_arrow
from loadkit.postgres.ledger import BATCH_PKEY, BATCH_SCHEMA, FILE_PKEY, RUN_PKEY, TABLE_LOAD_PKEY, Ledger
from tests.conftest import query

# How the ledger's tables were declared before the constraints were named (PostgreSQL named them).
_OLD_DDL = """
CREATE TABLE {s}.run (run_id text PRIMARY KEY, job text NOT NULL, period text NOT NULL, status text NOT NULL,
  started_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz, host text, error_category text,
  error_text text, rows_read bigint, rows_loaded bigint, rows_rejected bigint, config jsonb, mlflow_run_id text);
CREATE TABLE {s}.table_load (run_id text NOT NULL, table_name text NOT NULL, period text NOT NULL,
  mode text NOT NULL, status text NOT NULL, files int, files_skipped int, rows_read bigint, rows_loaded bigint,
  rows_rejected bigint, inserted bigint, updated bigint, started_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz, seconds double precision, error_text text, PRIMARY KEY (run_id, table_name));
CREATE TABLE {s}.file (table_name text NOT NULL, period text NOT NULL, file_sha text NOT NULL, path text NOT NULL,
  ordinal int NOT NULL, size bigint NOT NULL, status text NOT NULL, rows_read bigint, rows_loaded bigint,
  rows_rejected bigint, run_id text, error_text text, updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (table_name, period, file_sha));
CREATE TABLE {s}.batch (batch_id bigint PRIMARY KEY, run_id text NOT NULL, table_name text NOT NULL,
  period text NOT NULL, file_sha text NOT NULL, file_ordinal int NOT NULL, member text NOT NULL,
  start_offset bigint NOT NULL, end_offset bigint NOT NULL, first_line bigint, rows_in bigint NOT NULL,
  rows_loaded bigint NOT NULL, rows_rejected bigint NOT NULL, rows_coerced bigint NOT NULL DEFAULT 0, writer text,
  attempts int, committed_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT batch_accounting CHECK (rows_in = rows_loaded + rows_rejected));
CREATE INDEX batch_file_idx ON {s}.batch (table_name, period, file_sha);
CREATE TABLE {s}.reject (batch_id bigint NOT NULL, run_id text NOT NULL, table_name text NOT NULL,
  period text NOT NULL, file_path text, member text, line_number bigint, column_name text, reason text NOT NULL,
  raw text);
CREATE INDEX reject_batch_idx ON {s}.reject (batch_id);
"""


def _constraints(dsn: str, schema: str) -> set:
    return set(query(dsn, "SELECT c.conrelid::regclass::text, c.conname FROM pg_constraint c "
                          "JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = %s", (schema,)))


def _batch_row(batch_id: int) -> pa.Table:
    return pa.Table.from_pylist([{
        "batch_id": batch_id, "run_id": "r", "table_name": "t", "period": "2024-05", "file_sha": "s",
        "file_ordinal": 0, "member": "m", "start_offset": 0, "end_offset": 10, "first_line": 1, "rows_in": 1,
        "rows_loaded": 1, "rows_rejected": 0, "rows_coerced": 0, "writer": "w", "attempts": 1, "blank_lines": 0}],
        schema=BATCH_SCHEMA)


def test_an_older_ledger_carries_the_same_constraint_names_and_migrates(pg_dsn: str, schemas: tuple) -> None:
    fresh, old = schemas
    with db.transaction(pg_dsn) as cur:
        Ledger(fresh).ensure(cur)
        cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{old}"')
        cur.execute(_OLD_DDL.format(s=f'"{old}"'))
        Ledger(old).ensure(cur)  # migrations: duplicates, deleted, blank_lines, discarded
    names = {n for _, n in _constraints(pg_dsn, fresh)}
    assert {RUN_PKEY, TABLE_LOAD_PKEY, FILE_PKEY, BATCH_PKEY, "batch_accounting", "batch_blank_lines_check"} <= names
    assert {n for _, n in _constraints(pg_dsn, old)} == names
    cols = set(query(pg_dsn, "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema=%s",
                     (old,)))
    assert cols == set(query(pg_dsn, "SELECT table_name, column_name FROM information_schema.columns "
                                     "WHERE table_schema=%s", (fresh,)))


def test_a_duplicate_batch_is_told_by_its_constraint_name_on_both_drivers(pg_dsn: str, schemas: tuple) -> None:
    led = Ledger(schemas[1])
    with db.transaction(pg_dsn) as cur:
        led.ensure(cur)
    conn = db.adbc_connect(pg_dsn)
    try:
        with conn.cursor() as cur:
            assert led.committed_batch(cur, 7) is None
            led.append_batch(adbc_copy_arrow, conn, _batch_row(7))
            conn.commit()
            assert led.committed_batch(cur, 7) == ("r", 0, 10)
            with pytest.raises(Exception) as dup:
                led.append_batch(adbc_copy_arrow, conn, _batch_row(7))
            conn.rollback()
        assert led.is_duplicate_batch(dup.value)
    finally:
        conn.close()
    conn2 = psycopg2.connect(pg_dsn)
    conn2.autocommit = True
    try:
        with conn2.cursor() as cur:
            assert led.committed_batch(cur, 7) == ("r", 0, 10)  # the same statement on psycopg2
            with pytest.raises(psycopg2.Error) as dup2:
                cur.execute(f"INSERT INTO {led.batch} (batch_id, run_id, table_name, period, file_sha, file_ordinal, "
                            "member, start_offset, end_offset, rows_in, rows_loaded, rows_rejected) "
                            "VALUES (7, 'r', 't', '2024-05', 's', 0, 'm', 0, 10, 1, 1, 0)")
            assert led.is_duplicate_batch(dup2.value)
            # Other unique violations whose message names "batch_pkey" are not a duplicate batch: a target
            # table called batch in another schema, and a constraint whose name merely contains it.
            cur.execute(f'CREATE SCHEMA "{schemas[0]}"')
            cur.execute(f'CREATE TABLE "{schemas[0]}".batch (batch_id int PRIMARY KEY)')
            cur.execute(f'CREATE TABLE "{schemas[1]}".other (k int CONSTRAINT batch_pkey_of_other PRIMARY KEY)')
            for table in (f'"{schemas[0]}".batch', f'"{schemas[1]}".other'):
                cur.execute(f"INSERT INTO {table} VALUES (1)")
                with pytest.raises(psycopg2.Error) as other:
                    cur.execute(f"INSERT INTO {table} VALUES (1)")
                assert "batch_pkey" in str(other.value)
                assert other.value.pgcode == "23505" and not led.is_duplicate_batch(other.value)
    finally:
        conn2.close()


def test_file_batches_and_run_totals_read_what_the_writers_committed(pg_dsn: str, schemas: tuple) -> None:
    """``file_batches``: one file's batches of every run, by member and offset, with their counts and owner (a
    Ray unit load's skip list and replay); ``run_totals``: one run's batches summed per table (the end-of-stream
    accounting check); other files, periods and runs stay out."""
    from loadkit.postgres.ledger import LedgerBatch, RunTotals

    led = Ledger(schemas[1])
    with db.transaction(pg_dsn) as cur:
        led.ensure(cur)
    rows = [  # (id, run, file, member, start, end, rows_in, rejected, coerced, blank, period)
        (1, "r1", "s", "m2", 0, 10, 4, 1, 2, 1, "2024-05"), (2, "r1", "s", "m1", 10, 20, 5, 0, 0, 0, "2024-05"),
        (3, "r2", "s", "m1", 0, 10, 6, 2, 0, 3, "2024-05"), (4, "r1", "other", "m1", 0, 10, 7, 0, 0, 0, "2024-05"),
        (5, "r1", "s", "m1", 20, 30, 8, 0, 0, 0, "2024-06")]
    with db.transaction(pg_dsn) as cur:
        for i, run, sha, member, start, end, n, rej, coerced, blank, period in rows:
            cur.execute(f"INSERT INTO {led.batch} (batch_id, run_id, table_name, period, file_sha, file_ordinal, "
                        "member, start_offset, end_offset, first_line, rows_in, rows_loaded, rows_rejected, "
                        "rows_coerced, writer, attempts, blank_lines) VALUES "
                        "(%s, %s, 't', %s, %s, 0, %s, %s, %s, 1, %s, %s, %s, %s, 'writer-9', 1, %s)",
                        (i, run, period, sha, member, start, end, n, n - rej, rej, coerced, blank))
    with db.transaction(pg_dsn) as cur:
        batches = led.file_batches(cur, "t", "2024-05", "s")
        totals = led.run_totals(cur, "r1", "2024-05", ["t", "u"])
    assert [(b.batch_id, b.run_id, b.member, b.start, b.end) for b in batches] == [
        (3, "r2", "m1", 0, 10), (2, "r1", "m1", 10, 20), (1, "r1", "m2", 0, 10)]
    first = batches[2]
    assert isinstance(first, LedgerBatch) and (first.rows_in, first.rows_loaded, first.rows_rejected,
                                                first.rows_coerced, first.blank_lines, first.first_line,
                                                first.writer, first.attempts) == (4, 3, 1, 2, 1, 1, "writer-9", 1)
    assert first.committed_at > 1.7e9  # epoch seconds
    assert totals == {"t": RunTotals(batches=3, rows_in=16, rows_loaded=15, rows_rejected=1, rows_coerced=2,
                                     blank_lines=1)}
