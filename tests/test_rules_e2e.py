"""Column rules end to end (issue 11 items 8, 10, 11, 13, 17, 18, 19), through the runner on both executors.

One job, three tables: Parquet codes into char(6) with zfill (an over-length value is a row
reject, not PostgreSQL's 22001) plus an INT96 timestamp at 9999-12-31; a CSV of unpadded
dates, fractional seconds, an empty boolean and a max; and a table whose reject threshold
aborts it, whose rejects must survive in the ledger and the MLflow reject sample.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loadkit import tracking
from loadkit.config import (BatchConfig, ColumnConfig, DialectConfig, EnvConfig, JobConfig, LoadkitConfig, SinkConfig,
                            SourceConfig, TableConfig, TrackingConfig, to_config)
from loadkit.errors import RejectThresholdError
from loadkit.runner import run_job
from tests.helpers import autocommit_cursor, query

CODES = [ColumnConfig(name="id", type="integer", nullable=False),
         ColumnConfig(name="code", type="char(6)", zfill=6, null_values=["0"]),
         ColumnConfig(name="seen", type="timestamp")]
EVENTS = [ColumnConfig(name="id", type="integer", nullable=False),
          ColumnConfig(name="day", type="date", format="%m/%d/%Y"),
          ColumnConfig(name="at", type="timestamp", format="%Y/%m/%d %H:%M:%S.%f"),
          ColumnConfig(name="flag", type="boolean"),
          ColumnConfig(name="qty", type="integer", max="10")]
EVENTS_CSV = (b"id,day,at,flag,qty\n"
              b"1,1/5/2024,2024/05/02 08:15:30.250000,true,10\n"
              b"2,12/31/1999,2024/05/02 8:15:30.5,,\n"
              b"3,2/30/2024,2024/05/02 08:15:30.000001,false,1\n"
              b"4,5/19/2006,2024/05/02 08:15:30.1,f,99\n")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("executor", ["inprocess", "ray"])
def test_column_rules_and_kept_rejects_on_both_executors(executor: str, tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                          mlflow_uri: str, ray_session: None) -> None:
    month = tmp_path / "2024-05"
    month.mkdir()
    pq.write_table(pa.table({
        "id": pa.array([1, 2, 3, 4], pa.int32()),
        "code": pa.array([38881, 1234567, 0, 123456], pa.int64()),
        "seen": pa.array([dt.datetime(9999, 12, 31), None, dt.datetime(2024, 5, 1, 8, 30, 0, 5), dt.datetime(1, 1, 1)],
                         pa.timestamp("us")),
    }), month / "codes.parquet", use_deprecated_int96_timestamps=True)
    (month / "events.csv").write_bytes(EVENTS_CSV)
    (month / "strict.csv").write_bytes(b"id,day,at,flag,qty\n" + b"".join(
        f"{i},1/{1 + i % 28}/2024,2024/01/01 00:00:00.0,t,{i % 12}\n".encode() for i in range(1, 41)))
    target, led = schemas
    csv = DialectConfig(header=True)
    cfg = to_config(LoadkitConfig(
        year=2024, month=5, data_root=str(tmp_path),
        job=JobConfig(name="rules", schema=target, tables={
            "codes": TableConfig(source=SourceConfig(paths=["2024-05/codes.parquet"], format="parquet"),
                                 columns=CODES, max_reject_rate=1.0),
            "events": TableConfig(source=SourceConfig(paths=["2024-05/events.csv"], dialect=csv), columns=EVENTS,
                                  max_reject_rate=1.0),
            "strict": TableConfig(source=SourceConfig(paths=["2024-05/strict.csv"], dialect=csv), columns=EVENTS,
                                  max_rejects=2)}),
        sink=SinkConfig(dsn=pg_dsn, ledger_schema=led), tracking=TrackingConfig(uri=mlflow_uri),
        batch=BatchConfig(size=10, min_size=10), env=EnvConfig(progress_bars=False, executor=executor)))
    result = run_job(cfg)
    assert result.metrics.executor == executor

    # item 13: the threshold fails the run, the table loads nothing, and its rejects stay with the run
    assert result.status == "failed" and isinstance(result.error, RejectThresholdError)
    assert "strict" in str(result.error) and f"{led}.reject (discarded=true)" in str(result.error)
    assert query(pg_dsn, f'SELECT count(*) FROM "{target}".strict') == [(0,)]
    kept = query(pg_dsn, f'SELECT run_id, file_path, line_number, column_name, reason, raw FROM "{led}".reject '
                         "WHERE table_name='strict' AND discarded ORDER BY line_number")
    assert [(r[0], r[1], r[2], r[3]) for r in kept] == [(result.run_id, "2024-05/strict.csv", n + 1, "qty")
                                                        for n in (11, 23, 35)]
    assert kept[0][4:] == ("greater than max 10: '11'", "11,1/12/2024,2024/01/01 00:00:00.0,t,11")
    assert query(pg_dsn, f"SELECT count(*) FROM \"{led}\".batch WHERE table_name='strict'") == [(0,)]
    root = Path(tracking.download_artifact(mlflow_uri, result.mlflow_run_id, "rejects_sample.parquet",
                                           str(tmp_path / "artifacts")))
    sample = pq.read_table(root).to_pylist()
    assert sorted(r["line_number"] for r in sample if r["table_name"] == "strict") == [12, 24, 36]
    assert all(r["discarded"] for r in sample if r["table_name"] == "strict")

    # item 8 and 19: Parquet takes zfill and null markers, over-length is a row reject, INT96 is exact
    assert query(pg_dsn, f'SELECT id, code, seen FROM "{target}".codes ORDER BY id') == [
        (1, "038881", dt.datetime(9999, 12, 31)), (3, None, dt.datetime(2024, 5, 1, 8, 30, 0, 5)),
        (4, "123456", dt.datetime(1, 1, 1))]
    # items 10, 11, 17, 18 and 12: unpadded dates, fractions, an empty boolean, a max
    assert query(pg_dsn, f'SELECT id, day, at, flag, qty FROM "{target}".events ORDER BY id') == [
        (1, dt.date(2024, 1, 5), dt.datetime(2024, 5, 2, 8, 15, 30, 250000), True, 10),
        (2, dt.date(1999, 12, 31), dt.datetime(2024, 5, 2, 8, 15, 30, 500000), None, None)]
    rejects = query(pg_dsn, f"SELECT table_name, line_number, column_name, reason, discarded FROM \"{led}\".reject "
                            "WHERE table_name <> 'strict' ORDER BY 1, 2")
    assert rejects == [("codes", 2, "code", "longer than char(6): '1234567'", False),
                       ("events", 4, "day", "not a valid date (%m/%d/%Y): '2/30/2024'", False),
                       ("events", 5, "qty", "greater than max 10: '99'", False)]
    files = query(pg_dsn, f'SELECT path, status, rows_read, rows_loaded, rows_rejected FROM "{led}".file ORDER BY 1')
    assert files[:2] == [("2024-05/codes.parquet", "loaded", 4, 3, 1), ("2024-05/events.csv", "loaded", 4, 2, 2)]
    assert files[2][:2] == ("2024-05/strict.csv", "failed")


def test_an_older_ledger_gains_the_discarded_column_once(pg_dsn: str, schemas: tuple) -> None:
    from loadkit.postgres import ledger

    led = schemas[1]
    with autocommit_cursor(pg_dsn) as cur:
        cur.execute(f'CREATE SCHEMA "{led}"')
        cur.execute(f'CREATE TABLE "{led}".reject (batch_id bigint NOT NULL, run_id text NOT NULL, table_name text '
                    'NOT NULL, period text NOT NULL, file_path text, member text, line_number bigint, '
                    'column_name text, reason text NOT NULL, raw text)')
        cur.execute(f"INSERT INTO \"{led}\".reject VALUES (1, 'r', 't', '2024-05', 'f', 'm', 3, 'c', 'why', 'x')")
        ledger.Ledger(led).ensure(cur)
        ledger.Ledger(led).ensure(cur)  # idempotent
        cur.execute(f'SELECT line_number, discarded FROM "{led}".reject')
        assert cur.fetchall() == [(3, False)]
        ledger.Ledger(led).forget_batches(cur, [1], keep_rejects=1)
        ledger.Ledger(led).forget_batches(cur, [1])  # a kept reject is never forgotten again
        cur.execute(f'SELECT line_number, discarded FROM "{led}".reject')
        assert cur.fetchall() == [(3, True)]
