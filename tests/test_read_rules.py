"""A resume under other read rules (plan.read_rules, ledger batch.rules): the file is read again whole.

A crashed run leaves a file's first batches committed; their byte ranges are record boundaries under the rules
that cut them. Resumed after the dialect or a column rule changed, the reads began at those offsets -- mid-record
under the new rules -- and the file's rows came from two sets of rules. Each case here builds that state (a whole
load under rules A, then the file's later batches and its file row removed as a crash before them leaves it),
resumes under rules B and compares target and ledger with a fresh load under B.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Tuple

import pytest

from loadkit.config import (BatchConfig, ColumnConfig, DialectConfig, EnvConfig, JobConfig, LoadkitConfig, SinkConfig,
                            SourceConfig, TableConfig, TrackingConfig, to_config)
from loadkit.plan import BATCH_COL, build_plan, read_rules
from loadkit.runner import run_job
from tests.corpus import spec
from tests.helpers import autocommit_cursor, query

COLUMNS = [ColumnConfig(name="id", type="integer", nullable=False), ColumnConfig(name="a", type="text"),
           ColumnConfig(name="b", type="text")]
BATCH_ROWS = 10


def _records() -> Tuple[bytes, int, int, int]:
    """(the file, its records read with '"' quoting, the byte offset inside one of them where rules A's first
    chunk ends, that record's id). No header; every 7th record is two lines when '"' quotes (a quoted
    newline), two short lines (rejects) when it does not; every fifth b is NA. One such pair straddles 64 KiB
    (the smallest chunk, source.read._target_bytes): rules A's first chunk ends between its lines, inside a
    record of rules B."""
    out, records, size, inside, straddler = [], 0, 0, -1, 0
    i = 1
    while size < 200_000:
        if inside < 0 and size > 65_536 - 200:
            first, second = f'{i},"open{i}\n', f'close{i}{"x" * 400}",tail{i}\n'
            inside, straddler = size + len(first), i
        elif i % 7 == 0:
            first, second = f'{i},"open{i}\n', f'close{i}",tail{i}\n'
        else:
            first, second = f"{i},a{i},{'NA' if i % 5 == 0 else f'b{i}'}\n", ""
        out += [first, second]
        size += len(first) + len(second)
        records += 1
        i += 1
    return "".join(out).encode(), records, inside, straddler


def _config(root: Path, target: str, led: str, dsn: str, mlflow_uri: str, quote: Optional[str],
            null_values: Tuple[str, ...] = (), path: str = "2024-05/items.csv", job: str = "rules") -> Any:
    columns = [dataclasses.replace(c, null_values=list(null_values)) if c.name == "b" else c for c in COLUMNS]
    dialect = DialectConfig(header=False, quote=quote, newlines_in_values=quote is not None)
    return to_config(LoadkitConfig(
        year=2024, month=5, data_root=str(root),
        job=JobConfig(name=job, schema=target, tables={
            "items": TableConfig(source=SourceConfig(paths=[path], dialect=dialect), columns=columns,
                                 mode="append", max_reject_rate=1.0)}),
        sink=SinkConfig(dsn=dsn, ledger_schema=led), tracking=TrackingConfig(uri=mlflow_uri, enabled=False),
        batch=BatchConfig(size=BATCH_ROWS, min_size=BATCH_ROWS), env=EnvConfig(progress_bars=False,
                                                                             executor="inprocess")))


def _crash_after_first_batch(dsn: str, target: str, led: str) -> int:
    """The state a crash after the file's first commit leaves: later batches (rows, ledger, rejects) and the
    file row gone. Returns the first batch's id."""
    with autocommit_cursor(dsn) as cur:
        cur.execute(f'SELECT batch_id FROM "{led}".batch ORDER BY start_offset')
        ids = [r[0] for r in cur.fetchall()]
        assert len(ids) >= 3
        later = ids[1:]
        cur.execute(f'DELETE FROM "{target}".items WHERE "{BATCH_COL}" = ANY(%s)', (later,))
        cur.execute(f'DELETE FROM "{led}".reject WHERE batch_id = ANY(%s)', (later,))
        cur.execute(f'DELETE FROM "{led}".batch WHERE batch_id = ANY(%s)', (later,))
        cur.execute(f'DELETE FROM "{led}".file')
    return int(ids[0])


def _state(dsn: str, target: str, led: str) -> Tuple[list, list, list]:
    rows = query(dsn, f'SELECT id, a, b FROM "{target}".items ORDER BY id, a NULLS FIRST')
    totals = query(dsn, f'SELECT sum(rows_in), sum(rows_loaded), sum(rows_rejected) FROM "{led}".batch')
    rejects = query(dsn, f'SELECT line_number, raw FROM "{led}".reject WHERE NOT discarded ORDER BY line_number')
    return rows, totals, rejects


@pytest.mark.e2e
@pytest.mark.parametrize("change", ["dialect", "column_rule"])
def test_a_resume_under_other_read_rules_reads_the_file_again_whole(change: str, tmp_path: Path, pg_dsn: str,
                                                                    schemas: tuple, fresh: Any, mlflow_uri: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """dialect: rules A read '"' as a plain character, B quotes with it (A's first batch ends inside one of B's
    records). column_rule: B reads NA as NULL in column b. Before: the resume kept A's first batch and read on
    from its end by B (dialect: from the middle of record 10, which neither run loaded)."""
    (tmp_path / "2024-05").mkdir()
    data, _, inside, straddler = _records()
    (tmp_path / "2024-05" / "items.csv").write_bytes(data)
    target, led = schemas
    rules_a = dict(quote=None) if change == "dialect" else dict(quote='"')
    rules_b = dict(quote='"') if change == "dialect" else dict(quote='"', null_values=("NA",))
    first = run_job(_config(tmp_path, target, led, pg_dsn, mlflow_uri, **rules_a))  # type: ignore[arg-type]
    assert first.status == "succeeded", first.error
    kept = _crash_after_first_batch(pg_dsn, target, led)
    if change == "dialect":  # the case: rules A's first batch ends inside a record of rules B
        assert query(pg_dsn, f'SELECT end_offset FROM "{led}".batch') == [(inside,)]

    resumed = run_job(_config(tmp_path, target, led, pg_dsn, mlflow_uri, **rules_b))  # type: ignore[arg-type]
    assert resumed.status == "succeeded", resumed.error
    other_target, other_led = fresh()
    whole = run_job(_config(tmp_path, other_target, other_led, pg_dsn, mlflow_uri, **rules_b))  # type: ignore[arg-type]
    assert whole.status == "succeeded", whole.error

    assert _state(pg_dsn, target, led) == _state(pg_dsn, other_target, other_led)
    assert query(pg_dsn, f'SELECT count(*) FROM "{led}".batch WHERE batch_id = %s AND run_id = %s',
                 (kept, first.run_id)) == [(0,)]  # rules A's batch is gone, not resumed
    b_rules = read_rules(build_plan(_config(tmp_path, target, led, pg_dsn, mlflow_uri, **rules_b)).tables[0])  # type: ignore[arg-type]
    stored = query(pg_dsn, f'SELECT DISTINCT rules FROM "{led}".batch')
    assert stored == [(b_rules,)]
    assert query(pg_dsn, f'SELECT DISTINCT rules FROM "{other_led}".batch') == stored
    assert resumed.metrics.tables["items"].rows_read == whole.metrics.tables["items"].rows_read
    assert any("committed under other read rules" in r.getMessage() for r in caplog.records)
    if change == "dialect":
        assert query(pg_dsn, f'SELECT a, b FROM "{target}".items WHERE id = %s', (straddler,)) == [
            (f"open{straddler}\nclose{straddler}" + "x" * 400, f"tail{straddler}")]


@pytest.mark.e2e
def test_a_resume_under_the_same_rules_keeps_what_was_committed(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                                 mlflow_uri: str) -> None:
    """Unchanged rules (another batch size is not another rule): the resume keeps the first run's batch and
    reads only the rest; a published file is not read again under other rules (force=true does that)."""
    (tmp_path / "2024-05").mkdir()
    data, records, _, _ = _records()
    (tmp_path / "2024-05" / "items.csv").write_bytes(data)
    target, led = schemas
    first = run_job(_config(tmp_path, target, led, pg_dsn, mlflow_uri, quote='"'))
    assert first.status == "succeeded", first.error
    kept = _crash_after_first_batch(pg_dsn, target, led)
    (kept_rows,), = query(pg_dsn, f'SELECT rows_in FROM "{led}".batch')
    cfg = _config(tmp_path, target, led, pg_dsn, mlflow_uri, quote='"')
    cfg.batch.size = cfg.batch.min_size = 7
    resumed = run_job(cfg)
    assert resumed.status == "succeeded", resumed.error
    assert query(pg_dsn, f'SELECT run_id FROM "{led}".batch WHERE batch_id = %s', (kept,)) == [(first.run_id,)]
    assert resumed.metrics.tables["items"].rows_read == records - kept_rows  # only what was not committed
    published = _state(pg_dsn, target, led)
    again = run_job(_config(tmp_path, target, led, pg_dsn, mlflow_uri, quote='"', null_values=("NA",)))
    assert again.status == "succeeded", again.error
    assert again.metrics.tables["items"].status == "skipped"
    assert _state(pg_dsn, target, led) == published


@pytest.mark.e2e
def test_another_jobs_unfinished_file_is_not_discarded_under_this_jobs_rules(tmp_path: Path, pg_dsn: str,
                                                                             schemas: tuple, mlflow_uri: str) -> None:
    """Two jobs append their own files to one table name and period (one ledger): job x's crashed file keeps its
    committed batch when job y, under other rules, loads y.csv. Before (a reviewer's case): y discarded x's batch
    and rows -- every unpublished file of the table and period, not only its own -- and never read x.csv again."""
    (tmp_path / "2024-05").mkdir()
    data, _, _, _ = _records()
    (tmp_path / "2024-05" / "x.csv").write_bytes(data)
    (tmp_path / "2024-05" / "y.csv").write_bytes(b"1,a,b\n2,c,d\n")
    target, led = schemas
    x = run_job(_config(tmp_path, target, led, pg_dsn, mlflow_uri, quote='"', path="2024-05/x.csv", job="x"))
    assert x.status == "succeeded", x.error
    kept = _crash_after_first_batch(pg_dsn, target, led)
    rows_before = query(pg_dsn, f'SELECT count(*) FROM "{target}".items')
    y = run_job(_config(tmp_path, target, led, pg_dsn, mlflow_uri, quote=None, path="2024-05/y.csv", job="y"))
    assert y.status == "succeeded", y.error
    assert query(pg_dsn, f'SELECT run_id FROM "{led}".batch WHERE batch_id = %s', (kept,)) == [(x.run_id,)]
    assert query(pg_dsn, f'SELECT count(*) FROM "{target}".items') == [(rows_before[0][0] + 2,)]


def test_read_rules_follow_what_reads_a_record_and_nothing_else() -> None:
    """Every dialect field and column rule changes the fingerprint; the table's name, schema, mode, files and key
    do not (none changes what a record is or holds)."""
    base = spec([("id", "integer"), ("a", "text")])
    same = [dataclasses.replace(base, name="other", schema="s2", mode="merge", key=("id",), files=())]
    assert {read_rules(t) for t in same} == {read_rules(base)}
    d = base.dialect
    changed = [dataclasses.replace(base, dialect=dataclasses.replace(d, delimiter=";")),
               dataclasses.replace(base, dialect=dataclasses.replace(d, quote=None)),
               dataclasses.replace(base, dialect=dataclasses.replace(d, encoding="latin-1")),
               dataclasses.replace(base, dialect=dataclasses.replace(d, skip_lines=1)),
               dataclasses.replace(base, dialect=dataclasses.replace(d, null_values=("NA",))),
               dataclasses.replace(base, columns=(base.columns[0], dataclasses.replace(base.columns[1], kind="date"))),
               dataclasses.replace(base, columns=(base.columns[0],
                                                  dataclasses.replace(base.columns[1], null_values=("-",)))),
               dataclasses.replace(base, format="parquet"), dataclasses.replace(base, member="x.csv")]
    prints = [read_rules(t) for t in changed]
    assert len(set(prints)) == len(prints) and read_rules(base) not in prints
    assert all(len(p) == 16 and int(p, 16) >= 0 for p in prints)
