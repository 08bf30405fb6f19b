"""Merge finalisation (issue 16): a first load adds the primary key after the insert; a reload rewrites
only rows that changed and inserts new keys, with exact inserted / updated / unchanged / duplicates counts;
the full-snapshot sync and history still right; the column ``collation`` option (DDL and drift).

Every expectation is computed here from the CSV text we write (csv module, "last file, last row wins"),
never from loadkit's output. One batch per file (the files are tiny), so a row's ``_lk_batch`` is the batch
of its file's content: a row whose winning file changed is rewritten (updated) even with equal values.
"""
from __future__ import annotations

import csv
import io
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from loadkit.config import (ColumnConfig, DialectConfig, EnvConfig, JobConfig, LoadkitConfig, MigrateConfig,
                            SinkConfig, SourceConfig, TableConfig, TrackingConfig, to_config)
from loadkit.errors import ConfigError
from loadkit.runner import RunResult, run_job
from tests.helpers import autocommit_cursor, drop_load_schemas, query

pytestmark = pytest.mark.e2e

Row = Tuple[str, Optional[str], Optional[str]]  # k, a, b (as CSV text; "" is NULL)
COLUMNS = [ColumnConfig(name="k", type="varchar(8)", nullable=False, collation="C"),
           ColumnConfig(name="a", type="text"), ColumnConfig(name="b", type="integer")]


def config(root: Path, dsn: str, schemas: tuple, mlflow_uri: str, files: Sequence[str], *, month: int = 5,
           sync: bool = False, history: bool = False, force: bool = False, columns: Optional[list] = None,
           migrate: Optional[MigrateConfig] = None):
    target, led = schemas
    table = TableConfig(source=SourceConfig(paths=[f"2024-{month:02d}/{f}" for f in files],
                                            dialect=DialectConfig(header=False)),
                        columns=columns or COLUMNS, mode="merge", key=["k"], delete_missing=sync, history=history)
    return to_config(LoadkitConfig(
        year=2024, month=month, data_root=str(root), force=force,
        job=JobConfig(name="mergefin", schema=target, tables={"items": table}, migrate=migrate or MigrateConfig()),
        sink=SinkConfig(dsn=dsn, ledger_schema=led), tracking=TrackingConfig(uri=mlflow_uri, enabled=False),
        env=EnvConfig(progress_bars=False, executor="inprocess")))


def write_month(root: Path, month: int, files: Dict[str, List[Row]]) -> List[str]:
    folder = root / f"2024-{month:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for name, rows in files.items():
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        (folder / name).write_text(buf.getvalue())
    return sorted(files)


def last_wins(files: Dict[str, List[Row]]) -> Dict[str, Tuple[Tuple[Optional[str], Optional[int]], str]]:
    """key -> ((a, b) as loaded, winning file name): the last file of the sorted list, then the last row."""
    out = {}
    for name in sorted(files):
        for k, a, b in files[name]:
            out[k] = ((a or None, int(b) if b else None), name)
    return out


def table_state(dsn: str, schema: str) -> Dict[str, Tuple[Optional[str], Optional[int]]]:
    return {k: (a, b) for k, a, b in query(dsn, f'SELECT k, a, b FROM "{schema}".items')}


def expected_counts(before: Dict[str, Tuple[Tuple[Optional[str], Optional[int]], str]],
                    after: Dict[str, Tuple[Tuple[Optional[str], Optional[int]], str]],
                    changed_files: set, rows: int) -> Tuple[int, int, int, int]:
    """(inserted, updated, unchanged, duplicates) of publishing ``after`` over ``before``: a present key is
    updated when its values differ, or its winning row now comes from another file or a changed file
    (another batch id)."""
    inserted = sum(1 for k in after if k not in before)
    updated = sum(1 for k, (v, f) in after.items() if k in before and (
        v != before[k][0] or f != before[k][1] or f in changed_files))
    unchanged = len(after) - inserted - updated
    return inserted, updated, unchanged, rows - len(after)


def counts(result: RunResult) -> Tuple[int, int, int, int]:
    tm = result.metrics.tables["items"]
    return tm.inserted, tm.updated, tm.unchanged, tm.duplicates


def ok(result: RunResult) -> RunResult:
    assert result.status == "succeeded", result.error
    return result


MAY = {"a.csv": [("k1", "x", "1"), ("k2", "", "2"), ("k3", "y", ""), ("k2", "z", "3")],  # k2 twice in a file
       "b.csv": [("k4", "w", "4"), ("k1", "x2", "5"), ("k5", "", "")]}  # k1 again: b.csv wins


def test_first_load_unchanged_reload_and_changes(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                 mlflow_uri: str) -> None:
    target, led = schemas
    files = write_month(tmp_path, 5, MAY)
    # A target that exists, empty, with a grant and a comment: the first load must keep the table itself.
    with autocommit_cursor(pg_dsn) as cur:
        cur.execute(f'CREATE SCHEMA "{target}"')
        cur.execute(f'CREATE TABLE "{target}".items (k varchar(8) COLLATE "C", a text, b integer, _lk_batch bigint, '
                    "PRIMARY KEY (k))")
        cur.execute(f'GRANT SELECT ON "{target}".items TO PUBLIC')
        cur.execute(f'COMMENT ON TABLE "{target}".items IS \'kept\'')
    oid = query(pg_dsn, "SELECT %s::regclass::oid", (f'"{target}".items',))[0][0]

    first = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, files)))
    want = last_wins(MAY)
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in want.items()}
    assert counts(first) == (5, 0, 0, 2) == expected_counts({}, want, set(), 7)
    assert query(pg_dsn, "SELECT %s::regclass::oid", (f'"{target}".items',))[0][0] == oid
    assert query(pg_dsn, "SELECT obj_description(%s::regclass, 'pg_class'), "
                         "has_table_privilege('public', %s::regclass, 'SELECT')",
                 (f'"{target}".items', f'"{target}".items')) == [("kept", True)]
    assert query(pg_dsn, "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass",
                 (f'"{target}".items',)) == [("items_pkey", "PRIMARY KEY (k)")]
    recorded = query(pg_dsn, f'SELECT inserted, updated, unchanged, duplicates FROM "{led}".table_load '
                             "WHERE run_id=%s", (first.run_id,))
    assert recorded == [counts(first)]

    # The same files again (force): nothing is rewritten, every key is unchanged.
    xmins = dict(query(pg_dsn, f'SELECT k, xmin::text FROM "{target}".items'))
    again = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, files, force=True)))
    assert counts(again) == (0, 0, 5, 2)
    assert dict(query(pg_dsn, f'SELECT k, xmin::text FROM "{target}".items')) == xmins
    tm = again.metrics.tables["items"]
    assert tm.rows_read == tm.rows_loaded + tm.rows_rejected == sum(counts(again))
    assert list(first.metrics.tables["items"].finalise_steps)[:2] == ["insert", "primary_key"]
    assert "upsert" in tm.finalise_steps and "analyze" not in tm.finalise_steps  # nothing written: no ANALYZE

    # Rows edited behind loadkit's back (value -> NULL, NULL -> value) are restored by a reload of the
    # same files: IS DISTINCT FROM sees NULLs as values.
    with autocommit_cursor(pg_dsn) as cur:
        cur.execute(f"UPDATE \"{target}\".items SET a = NULL WHERE k = 'k4'")  # 'w' -> NULL
        cur.execute(f"UPDATE \"{target}\".items SET b = 9 WHERE k = 'k3'")  # NULL -> 9
        cur.execute(f"UPDATE \"{target}\".items SET a = 'q' WHERE k = 'k5'")  # NULL -> 'q'
    repaired = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, files, force=True)))
    assert counts(repaired) == (0, 3, 2, 2)
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in want.items()}

    # Changes: b.csv edited (new key, value -> NULL, duplicate of an a.csv key), a.csv untouched, c.csv new.
    june = {"a.csv": MAY["a.csv"],
            "b.csv": [("k4", "", "4"), ("k1", "x2", "5"), ("k6", "n", "6"), ("k3", "y", "")],
            "c.csv": [("k7", "m", ""), ("k6", "n2", "7"), ("k7", "m", "8")]}
    files = write_month(tmp_path, 5, june)
    before = last_wins(MAY)
    changed = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, files, force=True)))
    after = last_wins(june)
    assert counts(changed) == expected_counts(before, after, {"b.csv"}, 11)
    assert counts(changed) == (2, 3, 1, 5)  # k6 k7 new; k1 k3 (b.csv's batch), k4 (value) updated; k2 not
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in {**before, **after}.items()}  # k5 stays


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_months_equal_last_row_per_key(data: st.DataObject, tmp_path_factory: pytest.TempPathFactory,
                                              pg_dsn: str, mlflow_uri: str) -> None:
    """Two random months of 1-3 files over a few keys (NULLs, duplicates within and across files): after each
    publish the table is "last row per key wins" and the counts split exactly."""
    import uuid

    tmp = tmp_path_factory.mktemp("prop")
    schemas = (f"t_{uuid.uuid4().hex[:8]}", f"l_{uuid.uuid4().hex[:8]}")
    value = st.one_of(st.just(""), st.sampled_from(["p", "q", "r s"]))
    number = st.one_of(st.just(""), st.integers(-3, 3).map(str))
    row = st.tuples(st.sampled_from([f"k{i}" for i in range(8)]), value, number)
    month = st.dictionaries(st.sampled_from(["a.csv", "b.csv", "c.csv"]), st.lists(row, min_size=1, max_size=8),
                            min_size=1, max_size=3)
    try:
        state: Dict[str, Tuple[Tuple[Optional[str], Optional[int]], str]] = {}
        shas: Dict[str, str] = {}
        for files in (data.draw(month), data.draw(month)):
            names = write_month(tmp, 5, files)
            result = ok(run_job(config(tmp, pg_dsn, schemas, mlflow_uri, names, force=bool(state))))
            text = {n: (tmp / "2024-05" / n).read_text() for n in names}
            changed = {n for n in names if shas.get(n) != text[n]}
            after = last_wins(files)
            merged = {**state, **after}
            assert counts(result) == expected_counts(state, after, changed, sum(len(r) for r in files.values()))
            assert table_state(pg_dsn, schemas[0]) == {k: v for k, (v, _) in merged.items()}
            state = {k: (v, f) for k, (v, f) in merged.items()}
            shas = text
    finally:
        drop_load_schemas(pg_dsn, *schemas)


def test_sync_deletes_and_history_after_unchanged_reloads(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                          mlflow_uri: str) -> None:
    target, _ = schemas
    may = {"a.csv": [("k1", "x", "1"), ("k2", "y", "2"), ("k3", "z", "3")]}
    ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 5, may), sync=True,
                      history=True)))
    again = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, ["a.csv"], sync=True, history=True, force=True)))
    assert counts(again)[:3] == (0, 0, 3) and again.metrics.tables["items"].deleted == 0  # nothing closed
    rows = f'SELECT k, a, valid_from, valid_to FROM "{target}".items ORDER BY k'
    assert query(pg_dsn, rows) == [(k, a, date(2024, 5, 1), None) for k, a, _ in may["a.csv"]]
    # June lacks k2: closed. July has it again, unchanged: reopened (a closed row always counts as changed).
    june = {"a.csv": [("k1", "x", "1"), ("k3", "z", "3")]}
    ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 6, june), month=6, sync=True,
                      history=True)))
    assert query(pg_dsn, rows)[1] == ("k2", "y", date(2024, 5, 1), date(2024, 6, 1))
    july = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 7, may), month=7,
                             sync=True, history=True)))
    assert counts(july)[:3] == (0, 3, 0)  # another month's batches: every row is rewritten (its _lk_batch)
    assert query(pg_dsn, rows)[1] == ("k2", "y", date(2024, 7, 1), None)


def test_sync_deletes_after_an_unchanged_reload(tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str) -> None:
    target, _ = schemas
    may = {"a.csv": [("k1", "x", "1"), ("k2", "y", "2")], "b.csv": [("k3", "z", "3")]}
    ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 5, may), sync=True)))
    again = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, ["a.csv", "b.csv"], sync=True, force=True)))
    assert counts(again) == (0, 0, 3, 0) and again.metrics.tables["items"].deleted == 0
    june = {"a.csv": [("k1", "x", "1"), ("k2", "y", "2")], "b.csv": [("k4", "w", "")]}
    synced = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 6, june), month=6,
                               sync=True)))
    assert synced.metrics.tables["items"].deleted == 1  # k3
    assert table_state(pg_dsn, target) == {"k1": ("x", 1), "k2": ("y", 2), "k4": ("w", None)}


def test_first_load_keeps_a_referenced_primary_key(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                   mlflow_uri: str) -> None:
    """A foreign key depends on the target's PK: the first load leaves the PK in place (and still loads)."""
    target, _ = schemas
    with autocommit_cursor(pg_dsn) as cur:
        cur.execute(f'CREATE SCHEMA "{target}"')
        cur.execute(f'CREATE TABLE "{target}".items (k varchar(8) COLLATE "C", a text, b integer, _lk_batch bigint, '
                    "PRIMARY KEY (k))")
        cur.execute(f'CREATE TABLE "{target}".child (k varchar(8) COLLATE "C" REFERENCES "{target}".items (k))')
    ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 5, MAY))))
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in last_wins(MAY).items()}
    assert query(pg_dsn, "SELECT count(*) FROM pg_constraint WHERE confrelid = %s::regclass",
                 (f'"{target}".items',)) == [(1,)]


# ---------------------------------------------------------------- collation


def collations(dsn: str, schema: str, table: str) -> Dict[str, str]:
    return dict(query(dsn, "SELECT a.attname, co.collname FROM pg_attribute a JOIN pg_collation co "
                           "ON co.oid = a.attcollation WHERE a.attrelid = %s::regclass AND a.attnum > 0",
                      (f'"{schema}"."{table}"',)))


def test_collation_in_target_and_staging_ddl(tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str) -> None:
    target, _ = schemas
    cfg = config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 5, MAY))
    from loadkit.plan import build_plan
    from loadkit.postgres.modes import mode_for

    spec = build_plan(cfg).table("items")
    assert [c.collation for c in spec.columns] == ["C", None, None]
    ok(run_job(cfg))
    assert collations(pg_dsn, target, "items") == {"k": "C", "a": "default"}
    # staging gets the same DDL (so the dedup sort is bytewise too); it is dropped once published
    assert mode_for(spec).staging_columns()["k"] == 'character varying(8) COLLATE "C"'


def test_collation_drift_is_refused_or_migrated(tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str) -> None:
    target, _ = schemas
    files = write_month(tmp_path, 5, MAY)
    plain = [ColumnConfig(name="k", type="varchar(8)", nullable=False)] + COLUMNS[1:]
    ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, files, columns=plain)))
    assert collations(pg_dsn, target, "items")["k"] == "default"
    refused = run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, files, force=True))
    assert refused.status == "failed" and isinstance(refused.error, ConfigError)
    assert 'column k is character varying(8), declared character varying(8) COLLATE "C"' in str(refused.error)
    assert "job.migrate.alter_types=true" in str(refused.error)
    migrated = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, files, force=True,
                                 migrate=MigrateConfig(alter_types=True))))
    assert collations(pg_dsn, target, "items")["k"] == "C"
    assert counts(migrated) == (0, 0, 5, 2)  # the same rows: unchanged
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in last_wins(MAY).items()}


@pytest.mark.parametrize("column, error", [
    (ColumnConfig(name="k", type="text", collation='C" ; DROP'), "not a plain collation name"),
    (ColumnConfig(name="k", type="integer", collation="C"), "text/char/varchar columns only"),
])
def test_collation_config_is_validated(tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str,
                                       column: ColumnConfig, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        config(tmp_path, pg_dsn, schemas, mlflow_uri, ["a.csv"], columns=[column])
