"""Issue 11 item 7: blank lines, end to end. The rule: a blank line is a NULL row of a one-column
table (a record: read, then loaded or rejected) and a skipped line of any other table, counted as
``blank_lines`` per batch in the ledger, in the run metrics (MLflow) and in the printed summary.

Accounting, checked here on both executors: records = loaded + rejected (per table, from the
ledger's batches and from the metrics), and a file's lines = header + records + blank lines skipped.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from loadkit.config import (BatchConfig, ColumnConfig, DialectConfig, EnvConfig, JobConfig, LoadkitConfig, SinkConfig,
                            SourceConfig, TableConfig, TrackingConfig, to_config)
from loadkit.metrics import RunMetrics, skipped_lines_note, summary_table
from loadkit.runner import run_job
from tests.helpers import autocommit_cursor, query

PAIRS_CSV = b"id,name\n1,a\n\n2,b\n\n"  # header, 2 records, 2 blank lines
SINGLE_CSV = b"a\n\nb\n\nc\n"  # one column: 5 records, 2 of them NULL


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("executor", ["inprocess", "ray"])
def test_blank_lines_are_null_rows_of_a_one_column_table_else_counted_skips(
        executor: str, tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str, ray_session: None) -> None:
    month = tmp_path / "2024-05"
    month.mkdir()
    (month / "pairs.csv").write_bytes(PAIRS_CSV)
    (month / "single.csv").write_bytes(SINGLE_CSV)
    target, led = schemas
    cfg = to_config(LoadkitConfig(
        year=2024, month=5, data_root=str(tmp_path),
        job=JobConfig(name="blank", schema=target, tables={
            "pairs": TableConfig(source=SourceConfig(paths=["2024-05/pairs.csv"], dialect=DialectConfig(header=True)),
                                 columns=[ColumnConfig(name="id", type="integer", nullable=False),
                                          ColumnConfig(name="name", type="text")]),
            "single": TableConfig(source=SourceConfig(paths=["2024-05/single.csv"],
                                                      dialect=DialectConfig(header=False)),
                                  columns=[ColumnConfig(name="v", type="text")])}),
        sink=SinkConfig(dsn=pg_dsn, ledger_schema=led), tracking=TrackingConfig(uri=mlflow_uri),
        batch=BatchConfig(size=2, min_size=2), env=EnvConfig(progress_bars=False, executor=executor)))
    result = run_job(cfg)
    assert result.status == "succeeded", result.error
    assert result.metrics.executor == executor

    # the data: the multi-column table skips its blank lines, the one-column table loads them as NULL
    assert query(pg_dsn, f'SELECT id, name FROM "{target}".pairs ORDER BY id') == [(1, "a"), (2, "b")]
    assert sorted(query(pg_dsn, f'SELECT v FROM "{target}".single'), key=str) == [
        ("a",), ("b",), ("c",), (None,), (None,)]

    # the ledger: per table, records = loaded + rejected, and lines = header + records + blank lines
    sums = {r[0]: r[1:] for r in query(
        pg_dsn, f"SELECT table_name, sum(rows_in), sum(rows_loaded), sum(rows_rejected), sum(blank_lines) "
                f'FROM "{led}".batch GROUP BY table_name')}
    assert sums == {"pairs": (2, 2, 0, 2), "single": (5, 5, 0, 0)}
    for name, raw, header in (("pairs", PAIRS_CSV, 1), ("single", SINGLE_CSV, 0)):
        rows_in, loaded, rejected, blank = sums[name]
        assert rows_in == loaded + rejected
        assert raw.count(b"\n") == header + rows_in + blank

    # the metrics: the same figures, per table and in total, as MLflow records them
    pairs, single = result.metrics.tables["pairs"], result.metrics.tables["single"]
    assert (pairs.rows_read, pairs.rows_loaded, pairs.rows_rejected, pairs.blank_lines) == (2, 2, 0, 2)
    assert (single.rows_read, single.rows_loaded, single.rows_rejected, single.blank_lines) == (5, 5, 0, 0)
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(tracking_uri=mlflow_uri).get_run(result.mlflow_run_id).data.metrics
    assert (logged["blank_lines"], logged["pairs.blank_lines"], logged["single.blank_lines"]) == (2, 2, 0)
    assert logged["rows_read"] == logged["rows_loaded"] + logged["rows_rejected"] == 7

    # the summary: a footnote names the skipped lines and the table that skipped them
    assert "skipped lines: 2 blank (pairs 2); lines = records + blank lines skipped" in result.summary


def test_summary_has_no_skipped_lines_footnote_when_none_were_skipped() -> None:
    metrics = RunMetrics({"t": "append"})
    assert skipped_lines_note(metrics) == ""
    assert "skipped lines" not in summary_table(metrics, "r", 1.0)
    metrics.tables["t"].blank_lines = 1234
    assert skipped_lines_note(metrics).startswith("skipped lines: 1,234 blank (t 1,234);")


def test_an_older_ledger_gains_the_blank_lines_column_once(pg_dsn: str, schemas: tuple) -> None:
    from loadkit.postgres import ledger

    led = schemas[1]
    with autocommit_cursor(pg_dsn) as cur:
        ledger.Ledger(led).ensure(cur)
        cur.execute(f'ALTER TABLE "{led}".batch DROP COLUMN blank_lines')  # a ledger from before the column
        cur.execute(f"INSERT INTO \"{led}\".batch (batch_id, run_id, table_name, period, file_sha, file_ordinal, "
                    "member, start_offset, end_offset, rows_in, rows_loaded, rows_rejected) "
                    "VALUES (1, 'r', 't', '2024-05', 's', 0, 'm', 0, 10, 3, 2, 1)")
        ledger.Ledger(led).ensure(cur)
        ledger.Ledger(led).ensure(cur)  # idempotent
        cur.execute(f'SELECT rows_in, blank_lines FROM "{led}".batch')
        assert cur.fetchall() == [(3, 0)]


def test_a_blank_line_of_a_required_one_column_is_a_reject_with_its_line() -> None:
    from tests.corpus import parse, rejects_of, rows_of, spec

    parsed = parse(spec([ColumnConfig(name="v", type="text", nullable=False)]), b"a\n\nb\n")
    assert rows_of(parsed) == [{"v": "a"}, {"v": "b"}]
    assert rejects_of(parsed) == [(2, "v", "required value is missing")]
    assert parsed.rows_in == 3 == parsed.rows.num_rows + parsed.rejects.num_rows and parsed.blank_lines == 0
