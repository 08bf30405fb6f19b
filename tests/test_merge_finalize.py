"""Merge finalisation (issue 16): a first load adds the primary key after the insert; a reload rewrites
only rows that changed and inserts new keys, with exact inserted / updated / unchanged / duplicates counts;
the full-snapshot sync and history still right; the column ``collation`` option (DDL and drift).

Every expectation is computed here from the CSV text we write (csv module, "last file, last row wins"),
never from loadkit's output. One batch per file (the files are tiny), so a row's ``_lk_batch`` is the batch
of its file's content: a row whose winning file changed is rewritten (updated) even with equal values.
"""
from __future__ import annotations

import contextlib
import csv
import io
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from loadkit.config import (BatchConfig, ColumnConfig, DerivedKeyConfig, DialectConfig, EnvConfig, JobConfig,
                            LoadkitConfig, MigrateConfig, SinkConfig, SourceConfig, TableConfig, TrackingConfig,
                            to_config)
from loadkit.errors import ConfigError
from loadkit.runner import RunResult, run_job
from tests.helpers import autocommit_cursor, drop_load_schemas, query

pytestmark = pytest.mark.e2e

Row = Tuple[str, Optional[str], Optional[str]]  # k, a, b (as CSV text; "" is NULL)
COLUMNS = [ColumnConfig(name="k", type="varchar(8)", nullable=False, collation="C"),
           ColumnConfig(name="a", type="text"), ColumnConfig(name="b", type="integer")]


def config(root: Path, dsn: str, schemas: tuple, mlflow_uri: str, files: Sequence[str], *, month: int = 5,
           sync: bool = False, history: bool = False, force: bool = False, columns: Optional[list] = None,
           migrate: Optional[MigrateConfig] = None, batch_rows: Optional[int] = None,
           indexes: Optional[List[List[str]]] = None, max_rejects: Optional[int] = None,
           key: Sequence[str] = ("k",), encoding: str = "utf-8", derived_key: Optional[DerivedKeyConfig] = None):
    target, led = schemas
    table = TableConfig(source=SourceConfig(paths=[f"2024-{month:02d}/{f}" for f in files],
                                            dialect=DialectConfig(header=False, encoding=encoding)),
                        columns=columns or COLUMNS, mode="merge", key=list(key), delete_missing=sync, history=history,
                        indexes=indexes or [], max_rejects=max_rejects, derived_key=derived_key)
    batch = BatchConfig(size=batch_rows, min_size=1) if batch_rows else BatchConfig()
    return to_config(LoadkitConfig(
        year=2024, month=month, data_root=str(root), force=force, batch=batch,
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
    # The same batches again: a read-only comparison finds every key equal, so no upsert runs; nothing written,
    # so no ANALYZE either.
    assert "compare" in tm.finalise_steps and "upsert" not in tm.finalise_steps
    assert "analyze" not in tm.finalise_steps

    # Rows edited behind loadkit's back (value -> NULL, NULL -> value) are restored by a reload of the
    # same files: IS DISTINCT FROM sees NULLs as values.
    with autocommit_cursor(pg_dsn) as cur:
        cur.execute(f"UPDATE \"{target}\".items SET a = NULL WHERE k = 'k4'")  # 'w' -> NULL
        cur.execute(f"UPDATE \"{target}\".items SET b = 9 WHERE k = 'k3'")  # NULL -> 9
        cur.execute(f"UPDATE \"{target}\".items SET a = 'q' WHERE k = 'k5'")  # NULL -> 'q'
    repaired = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, files, force=True)))
    assert counts(repaired) == (0, 3, 2, 2)
    assert list(repaired.metrics.tables["items"].finalise_steps)[:2] == ["compare", "upsert"]  # compared, then written
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
    # every target row is a staged key, unchanged: the sync knows it has nothing to delete without its scan
    assert "compare" in again.metrics.tables["items"].finalise_steps
    assert "sync_missing" not in again.metrics.tables["items"].finalise_steps
    # a row no batch of this period wrote (an unknown batch): the same unchanged reload must still delete it
    with autocommit_cursor(pg_dsn) as cur:
        cur.execute(f"INSERT INTO \"{target}\".items (k, a, b, _lk_batch) VALUES ('k9', 'v', 9, 12345)")
    stale = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, ["a.csv", "b.csv"], sync=True, force=True)))
    assert counts(stale) == (0, 0, 3, 0) and stale.metrics.tables["items"].deleted == 1
    assert table_state(pg_dsn, target) == {"k1": ("x", 1), "k2": ("y", 2), "k3": ("z", 3)}
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


# ---------------------------------------------------------------- a first load written once (the swap)

ITEMS_DDL = 'k varchar(8) COLLATE "C", a text, b integer, _lk_batch bigint, PRIMARY KEY (k)'


def target_snapshot(dsn: str, schema: str) -> Dict[str, list]:
    """Everything a reader can tell of ``schema``.items: rows (``_lk_batch`` too) and their checksum,
    columns in order (type, collation, NOT NULL), constraints and indexes by name and definition (the
    schema's name spelled S), persistence, kind, owner and grants."""
    t = f'"{schema}".items'
    norm = lambda rows: [tuple(str(v).replace(f'"{schema}"', "S").replace(schema, "S") for v in r)  # noqa: E731
                         for r in rows]
    return {
        "rows": query(dsn, f"SELECT k, a, b, _lk_batch FROM {t} ORDER BY k COLLATE \"C\""),
        "checksum": query(dsn, f"SELECT md5(string_agg(x::text, '|' ORDER BY x.k COLLATE \"C\")) FROM {t} x"),
        "columns": query(dsn, "SELECT attname, format_type(atttypid, atttypmod), attcollation::regcollation::text, "
                              "attnotnull FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                              "AND NOT attisdropped ORDER BY attnum", (t,)),
        "constraints": query(dsn, "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                                  "WHERE conrelid = %s::regclass ORDER BY 1", (t,)),
        "indexes": norm(query(dsn, "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s "
                                   "AND tablename = 'items' ORDER BY 1", (schema,))),
        "class": query(dsn, "SELECT relkind, relpersistence, relowner::regrole::text, relacl::text "
                            "FROM pg_class WHERE oid = %s::regclass", (t,)),
    }


def empty_target(dsn: str, schema: str, ddl: str, *more: str) -> str:
    """Create ``schema``.items as ``ddl`` (its columns and constraints), then run ``more`` (``{t}``: the table);
    returns the table's qualified name."""
    t = f'"{schema}".items'
    with autocommit_cursor(dsn) as cur:
        cur.execute(f'CREATE SCHEMA "{schema}"')
        cur.execute(f"CREATE TABLE {t} ({ddl})")
        for sql in more:
            cur.execute(sql.format(t=t))
    return t


def catalog(dsn: str, schema: str) -> Dict[str, list]:
    """target_snapshot without the rows: what a swap must leave as it found it."""
    return {k: v for k, v in target_snapshot(dsn, schema).items() if k not in ("rows", "checksum")}


def no_staging_left(dsn: str, schema: str) -> bool:
    return query(dsn, "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                      "WHERE n.nspname = %s", (f"{schema}__lk_stage",)) == [(0,)]


def steps_of(result: RunResult) -> List[str]:
    return list(result.metrics.tables["items"].finalise_steps)


@pytest.fixture()
def old_path(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A context manager that makes the runs inside it take the old first load: UNLOGGED staging, insert."""
    from loadkit.postgres.modes import Merge

    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        with monkeypatch.context() as m:
            m.setattr(Merge, "_direct_wanted", lambda self, cur, created: False)
            m.setattr(Merge, "_swap_refusal", lambda self, cur: "the old path (test)")
            yield
    return ctx


@pytest.mark.slow
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_swapped_first_load_equals_the_insert_path(data: st.DataObject, tmp_path_factory: pytest.TempPathFactory,
                                                   pg_dsn: str, mlflow_uri: str, old_path: Any) -> None:
    """Random months of 1-3 files over a few keys (duplicates within batches, across batches of a file and
    across files; batches of 1-4 rows): the first load through the swap gives the same table as the old
    insert path -- rows and ``_lk_batch``, checksum, columns, PK, declared index -- and the same counts."""
    import uuid

    tmp = tmp_path_factory.mktemp("swap")
    value = st.one_of(st.just(""), st.sampled_from(["p", "q", "r s"]))
    number = st.one_of(st.just(""), st.integers(-3, 3).map(str))
    row = st.tuples(st.sampled_from([f"k{i}" for i in range(6)] + ["K0", "k10", "f1"]), value, number)
    placed = st.lists(st.tuples(st.floats(0, 1), row), min_size=1, max_size=12)
    drawn = data.draw(st.dictionaries(st.sampled_from(["a.csv", "b.csv", "c.csv"]), placed, min_size=1, max_size=3))
    files = {}
    for name, rows in drawn.items():  # ~2000 filler rows a file (3+ batches: a chunk is >= 64 KiB), some shared
        body: List[Row] = [(f"f{i}", f"{name}-{i}".ljust(70, "."), str(i)) for i in range(0, 2000)]
        for at, r in sorted(rows, key=lambda p: p[0]):
            body.insert(int(at * len(body)), r)
        files[name] = body
    batch_rows = data.draw(st.sampled_from([None, 1]))
    names = write_month(tmp, 5, files)
    snaps, results = [], []
    for old in (False, True):
        schemas = (f"t_{uuid.uuid4().hex[:8]}", f"l_{uuid.uuid4().hex[:8]}")
        try:
            with old_path() if old else contextlib.nullcontext():
                result = ok(run_job(config(tmp, pg_dsn, schemas, mlflow_uri, names, batch_rows=batch_rows,
                                           indexes=[["b", "a"]])))
            snaps.append(target_snapshot(pg_dsn, schemas[0]))
            results.append(result)
            assert no_staging_left(pg_dsn, schemas[0])
        finally:
            drop_load_schemas(pg_dsn, *schemas)
    new, old_ = results
    assert "swap" in steps_of(new) and "insert" not in steps_of(new)
    assert "insert" in steps_of(old_) and "swap" not in steps_of(old_)
    assert snaps[0] == snaps[1]
    want = last_wins(files)
    assert [(k, a, b) for k, a, b, _ in snaps[0]["rows"]] == sorted(
        ((k, v[0], v[1]) for k, (v, _) in want.items()), key=lambda r: r[0].encode())
    assert counts(new) == counts(old_) == expected_counts({}, want, set(), sum(len(r) for r in files.values()))
    # duplicates resolved in place only if any, among the rows whose key the client's hashes saw repeat
    assert ("dedup_hint" in steps_of(new)) == (counts(new)[3] > 0) and "dedup" not in steps_of(new)
    if batch_rows:
        assert new.metrics.tables["items"].batches >= 3 * len(files)


def test_a_two_column_key_resolves_duplicates_among_the_hinted_keys_only(
        tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str, old_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Key (k, a): the hinted first load's scan keeps the rows whose first key column is a candidate's
    (k1 and k2 here, each also under other second columns that are not duplicated) and resolves only the
    exact repeated keys -- the same table and counts as the insert path, every other (k1, *) row kept.
    That scan is verify_staging's count (Merge._count_staged): the key filter is built once."""
    import uuid

    columns = [ColumnConfig(name="k", type="varchar(8)", nullable=False, collation="C"),
               ColumnConfig(name="a", type="text", nullable=False), ColumnConfig(name="b", type="integer")]
    month = {"a.csv": [(f"f{i}", "x", str(i)) for i in range(500)]
             + [("k1", "p", "1"), ("k1", "q", "2"), ("k2", "p", "3"), ("k1", "p", "4"), ("k1", "r", "5")],
             "b.csv": [("k2", "p", "6"), ("k2", "q", "7"), ("k1", "q", "8")]}
    names = write_month(tmp_path, 5, month)
    want = {}
    for name in sorted(month):
        for k, a, b in month[name]:
            want[(k, a)] = int(b)
    from loadkit.postgres.modes import Merge

    filters: List[Tuple[str, ...]] = []  # key scan filters built: one, on every key column, for the count
    key_filter = Merge._key_filter

    def spy(self: Merge, keys: Any, columns: Sequence[str]) -> Tuple[str, List[Any]]:
        filters.append(tuple(columns))
        return key_filter(self, keys, columns)

    monkeypatch.setattr(Merge, "_key_filter", spy)
    results, states = [], []
    for old in (False, True):
        run_schemas = (f"t_{uuid.uuid4().hex[:8]}", f"l_{uuid.uuid4().hex[:8]}")
        try:
            with old_path() if old else contextlib.nullcontext():
                results.append(ok(run_job(config(tmp_path, pg_dsn, run_schemas, mlflow_uri, names, columns=columns,
                                                 key=("k", "a"), batch_rows=2))))
            if not old:  # verify_staging's count gathered the candidates' rows: the delete read only those
                assert filters == [("k", "a")]
            states.append(query(pg_dsn, f'SELECT k, a, b, _lk_batch FROM "{run_schemas[0]}".items ORDER BY 1, 2'))
        finally:
            drop_load_schemas(pg_dsn, *run_schemas)
    new, old_ = results
    assert "dedup_hint" in steps_of(new) and "dedup" not in steps_of(new) and "insert" in steps_of(old_)
    assert states[0] == states[1]
    assert {(k, a): b for k, a, b, _ in states[0]} == want
    assert counts(new) == counts(old_) == (len(want), 0, 0, 508 - len(want))


def test_a_month_whose_keys_mostly_repeat_gathers_its_candidates_in_one_linear_scan(
        tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The month's file came twice (every key repeated; key (k, a), k of two values). verify_staging's count
    gathers the candidates' rows (Merge._count_staged) with no subplan: ``(key) IN (candidates)`` in the
    aggregate's FILTER is one, unhashed once the candidates outgrow hash_mem, and then rescanned for every row
    (quadratic: 150k keys sent twice ran for hours at the default work_mem). Here work_mem is 64kB for that
    statement, so 3000 keys outgrow it; the plan is PostgreSQL's EXPLAIN of the statement as sent. The table
    and counts are the csv module's last row per key."""
    from loadkit.postgres.modes import Merge

    columns = [ColumnConfig(name="k", type="varchar(8)", nullable=False, collation="C"),
               ColumnConfig(name="a", type="text", nullable=False), ColumnConfig(name="b", type="integer")]
    rows = [("AB"[i % 2], f"v{i}", str(i)) for i in range(3000)]
    month = {"a.csv": rows, "b.csv": [(k, a, str(int(b) + 1)) for k, a, b in rows]}
    names = write_month(tmp_path, 5, month)
    want: Dict[Tuple[str, str], int] = {}
    for name in sorted(month):
        with open(tmp_path / "2024-05" / name, newline="") as f:
            for k, a, b in csv.reader(f):
                want[(k, a)] = int(b)
    plans: List[str] = []
    count_staged = Merge._count_staged

    class Explaining:
        def __init__(self, cur: Any) -> None:
            self._cur = cur

        def __getattr__(self, name: str) -> Any:
            return getattr(self._cur, name)

        def execute(self, sql: str, args: Any = None) -> Any:
            if "array_agg(s.ctid)" in sql:
                self._cur.execute("SET LOCAL work_mem = '64kB'")
                self._cur.execute("EXPLAIN " + sql, args)
                plans.append("\n".join(r[0] for r in self._cur.fetchall()))
            return self._cur.execute(sql, args)

    def spy(self: Merge, cur: Any, stage: str) -> int:
        return count_staged(self, Explaining(cur), stage)

    monkeypatch.setattr(Merge, "_count_staged", spy)
    result = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, names, columns=columns, key=("k", "a"))))
    assert len(plans) == 1 and "SubPlan" not in plans[0], plans
    assert "dedup_hint" in steps_of(result) and "dedup" not in steps_of(result)
    got = query(pg_dsn, f'SELECT k, a, b FROM "{schemas[0]}".items')
    assert len(got) == len(want) and {(k, a): b for k, a, b in got} == want
    assert counts(result) == (len(want), 0, 0, 2 * len(rows) - len(want))


def test_a_key_repeated_in_batches_of_different_longest_values_is_hinted(tmp_path: Path, pg_dsn: str,
                                                                         schemas: tuple, mlflow_uri: str,
                                                                         old_path: Any) -> None:
    """A varchar key repeated in two batches, one of which also holds a key longer than 8 bytes: the key
    hashes alike in both. Its hash once depended on its batch's longest value, so the repeat was missed: the
    swapped first load fell back to searching the whole table, and a first load into a target that cannot
    be swapped (the insert path, which passes unhinted keys' rows unsorted) failed on its primary key at
    every rerun. Then an unchanged reload and a changed one, exact."""
    cols = [ColumnConfig(name="k", type="varchar(40)", nullable=False, collation="C"),
            ColumnConfig(name="a", type="text"), ColumnConfig(name="b", type="integer")]
    target, _ = schemas
    month = {"a.csv": [("ab", "x", "1"), ("a-key-longer-than-one-lane-0001", "y", "2")],
             "b.csv": [("ab", "z", "3"), ("cd", "w", "4")]}
    names = write_month(tmp_path, 5, month)
    want = last_wins(month)
    first = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, names, columns=cols, batch_rows=2)))
    assert "dedup_hint" in steps_of(first) and "dedup" not in steps_of(first)
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in want.items()}
    assert counts(first) == (3, 0, 0, 1)
    again = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, names, columns=cols, batch_rows=2, force=True)))
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in want.items()}
    assert counts(again)[3] == 1 and sum(counts(again)[:3]) == 3
    month["b.csv"] = [("ab", "changed", "5"), ("cd", "w", "4")]
    names = write_month(tmp_path, 5, month)
    changed = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, names, columns=cols, batch_rows=2, force=True)))
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in last_wins(month).items()}
    assert counts(changed)[3] == 1 and sum(counts(changed)[:3]) == 3
    inserted = (target + "i", schemas[1] + "i")
    try:
        with old_path():
            via_insert = ok(run_job(config(tmp_path, pg_dsn, inserted, mlflow_uri, names, columns=cols, batch_rows=2)))
        assert "insert" in steps_of(via_insert) and counts(via_insert) == (3, 0, 0, 1)
        assert table_state(pg_dsn, inserted[0]) == {k: v for k, (v, _) in last_wins(month).items()}
    finally:
        drop_load_schemas(pg_dsn, *inserted)


def test_a_duplicate_key_the_hashes_miss_falls_back_to_the_full_search(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                                        mlflow_uri: str) -> None:
    """Keys equal in PostgreSQL but not in bytes (a double key: -0 = 0) are missed by the client's key hashes:
    the key's build, the authority, fails and the whole table is searched (step dedup) -- the last row wins
    as always, counts exact -- and the keys the hashes did see are resolved first (dedup_hint)."""
    cols = [ColumnConfig(name="k", type="double", nullable=False), ColumnConfig(name="a", type="text"),
            ColumnConfig(name="b", type="integer")]
    target, _ = schemas
    rows = {"a.csv": [("0", "first", "1"), ("1.5", "x", "2"), ("-0", "last", "3"), ("1.5", "y", "4"), ("2", "z", "")]}
    result = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 5, rows), columns=cols)))
    assert {"swap", "dedup_hint", "dedup"} <= set(steps_of(result))
    assert sorted(query(pg_dsn, f'SELECT k, a, b FROM "{target}".items')) == [
        (0.0, "last", 3), (1.5, "y", 4), (2.0, "z", None)]
    assert counts(result) == (3, 0, 0, 2)
    # A month whose "0" and "-0" rows are equal in every other column, loaded, then loaded again: one key in
    # PostgreSQL, so one unchanged key and one duplicate (a reload deduplicates staging on the server).
    same = {"a.csv": [("0", "s", "1"), ("-0", "s", "1"), ("2", "z", "")]}
    names = write_month(tmp_path, 6, same)
    schemas2 = (target + "b", schemas[1] + "b")
    try:
        first = ok(run_job(config(tmp_path, pg_dsn, schemas2, mlflow_uri, names, columns=cols, month=6)))
        again = ok(run_job(config(tmp_path, pg_dsn, schemas2, mlflow_uri, names, columns=cols, month=6, force=True)))
        assert counts(first) == (2, 0, 0, 1)
        assert counts(again) == (0, 0, 2, 1)
        assert sorted(query(pg_dsn, f'SELECT k, a, b FROM "{schemas2[0]}".items')) == [(0.0, "s", 1), (2.0, "z", None)]
    finally:
        drop_load_schemas(pg_dsn, *schemas2)


def test_the_tables_of_a_run_publish_side_by_side(tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str) -> None:
    """Two tables publish on two connections at once: while another session holds the first table's publish
    lock, the second table publishes anyway (one after the other, it would wait behind the first); once
    released, the first publishes too and both are exact."""
    import threading
    import time

    import psycopg2

    target, led = schemas
    files = write_month(tmp_path, 5, MAY)
    table = TableConfig(source=SourceConfig(paths=[f"2024-05/{f}" for f in files], dialect=DialectConfig(header=False)),
                        columns=COLUMNS, mode="merge", key=["k"])
    cfg = to_config(LoadkitConfig(
        year=2024, month=5, data_root=str(tmp_path),
        job=JobConfig(name="sidebyside", schema=target, tables={"items": table, "zz": table}),
        sink=SinkConfig(dsn=pg_dsn, ledger_schema=led), tracking=TrackingConfig(uri=mlflow_uri, enabled=False),
        env=EnvConfig(progress_bars=False, executor="inprocess")))
    holder = psycopg2.connect(pg_dsn)
    results: List[RunResult] = []
    try:
        holder.cursor().execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"loadkit-publish:{target}.items",))
        runner = threading.Thread(target=lambda: results.append(run_job(cfg)))
        runner.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and query(
                pg_dsn, "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = %s AND c.relname = 'zz' AND c.reltuples > 0", (target,)) != [(1,)]:
            time.sleep(0.1)
        published_meanwhile = query(pg_dsn, f'SELECT count(*) FROM "{target}".zz')
        assert query(pg_dsn, f'SELECT count(*) FROM "{target}".items') == [(0,)]  # still held
    finally:
        holder.rollback()
        holder.close()
    runner.join(60)
    assert published_meanwhile == [(5,)]
    ok(results[0])
    for name in ("items", "zz"):
        rows = {k: (a, b) for k, a, b in query(pg_dsn, f'SELECT k, a, b FROM "{target}".{name}')}
        assert rows == {k: v for k, (v, _) in last_wins(MAY).items()}
        assert results[0].metrics.tables[name].duplicates == 2


def test_the_publish_builds_its_key_with_sink_maintenance_work_mem(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                                   mlflow_uri: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The key build of a swapped first load runs under sink.maintenance_work_mem (a sort in memory, not on
    disk), read by the server inside that transaction; the ledger writes after the publish see the session's
    own value again, and the load is exact."""
    from loadkit.postgres import modes

    target, _ = schemas
    files = write_month(tmp_path, 5, MAY)
    cfg = config(tmp_path, pg_dsn, schemas, mlflow_uri, files)
    cfg.sink.maintenance_work_mem = "3MB"  # neither the server's default (64MB) nor loadkit's
    seen: Dict[str, str] = {}
    swap_in, finish_table = modes.Merge._swap_in, modes.Ledger.finish_table

    def spy_swap(self: Any, cur: Any, ledger: Any) -> Any:
        cur.execute("SHOW maintenance_work_mem")
        seen["key build"] = cur.fetchone()[0]
        return swap_in(self, cur, ledger)

    def spy_finish(self: Any, cur: Any, *args: Any, **kwargs: Any) -> Any:
        cur.execute("SHOW maintenance_work_mem")
        seen["after"] = cur.fetchone()[0]
        return finish_table(self, cur, *args, **kwargs)

    monkeypatch.setattr(modes.Merge, "_swap_in", spy_swap)
    monkeypatch.setattr(modes.Ledger, "finish_table", spy_finish)
    with autocommit_cursor(pg_dsn) as cur:
        cur.execute("SHOW maintenance_work_mem")
        default = cur.fetchone()[0]
    ok(run_job(cfg))
    assert default != "3MB" and seen == {"key build": "3MB", "after": default}
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in last_wins(MAY).items()}


@pytest.mark.parametrize("blocker", ["view", "grant", "referenced", "comment", "trigger"])
def test_first_load_into_a_target_that_cannot_be_swapped_inserts(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                                  mlflow_uri: str, blocker: str) -> None:
    """Something a swap would lose or break: the first load takes the old path (insert into the table
    itself), which keeps the table, its OID and the dependant, and loads exactly."""
    target, _ = schemas
    t = f'"{target}".items'
    with autocommit_cursor(pg_dsn) as cur:
        cur.execute(f'CREATE SCHEMA "{target}"')
        cur.execute(f"CREATE TABLE {t} ({ITEMS_DDL})")
        cur.execute({
            "view": f'CREATE VIEW "{target}".v AS SELECT k, b FROM {t}',
            "grant": f"GRANT SELECT ON {t} TO PUBLIC",
            "referenced": f'CREATE TABLE "{target}".child (k varchar(8) COLLATE "C" REFERENCES {t} (k))',
            "comment": f"COMMENT ON COLUMN {t}.a IS 'kept'",
            "trigger": f'CREATE FUNCTION "{target}".f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; '
                       f'END $$; CREATE TRIGGER tr BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION "{target}".f()',
        }[blocker])
    oid = query(pg_dsn, "SELECT %s::regclass::oid", (t,))[0][0]
    result = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 5, MAY))))
    assert steps_of(result)[0] == "insert" and "swap" not in steps_of(result)  # (a referenced PK stays in place)
    assert query(pg_dsn, "SELECT %s::regclass::oid", (t,))[0][0] == oid
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in last_wins(MAY).items()}
    assert counts(result) == (5, 0, 0, 2)
    if blocker == "view":
        assert query(pg_dsn, f'SELECT count(*) FROM "{target}".v') == [(5,)]
    assert no_staging_left(pg_dsn, target)


def test_first_load_swaps_a_plain_existing_target_keeping_its_names(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                                    mlflow_uri: str) -> None:
    """An existing empty target with only what a swap rebuilds (a named PK, a CHECK, a user index, a NOT NULL
    column): swapped, and every one of them is back under its own name and definition."""
    target, _ = schemas
    empty_target(pg_dsn, target, 'k varchar(8) COLLATE "C", a text NOT NULL, b integer, _lk_batch bigint, '
                 "CONSTRAINT my_key PRIMARY KEY (k), CONSTRAINT b_small CHECK (b < 100)",
                 "CREATE INDEX my_idx ON {t} (a) WHERE b IS NOT NULL")
    before = catalog(pg_dsn, target)
    rows = {"a.csv": [("k1", "x", "1"), ("k2", "y", ""), ("k1", "z", "3")]}
    result = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 5, rows))))
    assert "swap" in steps_of(result) and "dedup_hint" in steps_of(result) and "dedup" not in steps_of(result)
    after = target_snapshot(pg_dsn, target)
    assert {k: v for k, v in after.items() if k not in ("rows", "checksum")} == before
    assert table_state(pg_dsn, target) == {"k1": ("z", 3), "k2": ("y", None)}
    assert counts(result) == (2, 0, 0, 1)
    # NOT NULL outside the key is checked like the old insert checked it: a NULL fails the publish.
    bad = {"a.csv": [("k3", "", "1")]}
    failed = run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 6, bad), month=6))
    assert failed.status == "failed"  # (a reload: the target has rows; the insert refuses the NULL)


@pytest.mark.parametrize("target_key", [None, "unique"])
def test_direct_staging_declares_a_required_key_not_null_and_the_target_keeps_its_own(
        tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch,
        target_key: Optional[str]) -> None:
    """A key declared ``nullable: false`` is NOT NULL in a direct staging table when the target's key column is
    (a primary key's is), so the swap's key build has no NOT NULL to verify by a scan; a row missing it is a
    reject, never a NULL sent to COPY. A target whose key is a unique index on a nullable column is swapped
    with the column still nullable (its staging leaves it so): the target reads the same before and after."""
    from loadkit.postgres.modes import Merge

    target, _ = schemas
    t = f'"{target}".items'
    if target_key == "unique":
        empty_target(pg_dsn, target, 'k varchar(8) COLLATE "C", a text, b integer, _lk_batch bigint',
                     "CREATE UNIQUE INDEX items_k ON {t} (k)")
        before = catalog(pg_dsn, target)
    staged_not_null: List[bool] = []
    original = Merge.finalize

    def look_then_finalize(self: Merge, cur: Any, ledger: Any) -> Any:
        staged_not_null.extend(r[0] for r in query(
            pg_dsn, "SELECT a.attnotnull FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN "
                    "pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relpersistence = 'p' "
                    "AND a.attname = 'k'", (f"{target}__lk_stage",)))
        return original(self, cur, ledger)

    monkeypatch.setattr(Merge, "finalize", look_then_finalize)
    good = [(f"k{i}", f"v{i}", str(i)) for i in range(30)]  # one reject in 32 rows: under max_reject_rate
    rows = {"a.csv": [("k1", "x", "1"), ("", "no key", "2"), ("k2", "y", ""), *good[3:], ("k1", "z", "3")]}
    result = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 5, rows))))
    assert "swap" in steps_of(result)
    assert staged_not_null == [target_key is None]  # one direct staging table, seen at its publish
    assert table_state(pg_dsn, target) == {"k1": ("z", 3), "k2": ("y", None),
                                           **{k: (a, int(b)) for k, a, b in good[3:]}}
    assert counts(result) == (29, 0, 0, 1)
    assert result.metrics.tables["items"].rows_rejected == 1
    assert query(pg_dsn, f"SELECT column_name, reason, line_number FROM \"{schemas[1]}\".reject") == [
        ("k", "required value is missing: None", 2)]
    if target_key == "unique":
        assert catalog(pg_dsn, target) == before
    else:
        assert query(pg_dsn, "SELECT attnotnull FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'k'",
                     (t,)) == [(True,)]
        assert query(pg_dsn, "SELECT contype FROM pg_constraint WHERE conrelid = %s::regclass", (t,)) == [("p",)]
    assert no_staging_left(pg_dsn, target)


def test_a_unique_key_target_keeps_its_not_null_key_columns_through_the_swap(
        tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str) -> None:
    """A target keyed by a UNIQUE constraint (not a primary key) on columns it declares NOT NULL, the config
    leaving one of them nullable: the swap keeps both NOT NULL (a unique constraint does not set it, so the
    rebuild must), and a month with an empty value there fails the publish instead of publishing a NULL into a
    NOT NULL column. Found by session 13's review (the swap rebuilt NOT NULL outside the key only)."""
    target, _ = schemas
    t = empty_target(pg_dsn, target, 'k varchar(8) COLLATE "C" NOT NULL, a text, b integer NOT NULL, '
                     "_lk_batch bigint, CONSTRAINT items_kb UNIQUE (k, b)")
    before = catalog(pg_dsn, target)
    rows = {"a.csv": [(f"k{i}", "x", str(i)) for i in range(5)]}
    result = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 5, rows), key=("k", "b"))))
    assert "swap" in steps_of(result)
    assert catalog(pg_dsn, target) == before
    with autocommit_cursor(pg_dsn) as cur:
        cur.execute(f"TRUNCATE {t}")
    bad = {"a.csv": [(f"k{i}", "x", str(i)) for i in range(30)] + [("k99", "x", "")]}  # b empty: NULL
    failed = run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 6, bad), month=6,
                            key=("k", "b")))
    assert failed.status == "failed"
    assert query(pg_dsn, f"SELECT count(*) FROM {t}") == [(0,)]  # nothing published, no NULL in b
    assert catalog(pg_dsn, target) == before


def test_a_target_key_made_nullable_before_the_publish_stays_nullable(
        tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct staging declared the required key NOT NULL (the target had a primary key then); before the
    publish someone replaced the key by a unique index on a nullable column: the swapped target is what the
    target was at the publish, the key column nullable (the staging's NOT NULL is dropped). Session 13's review."""
    from loadkit.postgres.modes import Merge

    target, _ = schemas
    t = empty_target(pg_dsn, target, 'k varchar(8) COLLATE "C", a text, b integer, _lk_batch bigint, PRIMARY KEY (k)')
    original = Merge.finalize
    seen: Dict[str, Any] = {}

    def rekey_then_finalize(self: Merge, cur: Any, ledger: Any) -> Any:
        with autocommit_cursor(pg_dsn) as other:
            other.execute(f"ALTER TABLE {t} DROP CONSTRAINT items_pkey")
            other.execute(f"ALTER TABLE {t} ALTER COLUMN k DROP NOT NULL")
            other.execute(f"CREATE UNIQUE INDEX items_k ON {t} (k)")
        seen["before"] = catalog(pg_dsn, target)
        return original(self, cur, ledger)

    monkeypatch.setattr(Merge, "finalize", rekey_then_finalize)
    result = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 5, MAY))))
    assert "swap" in steps_of(result)
    assert catalog(pg_dsn, target) == seen["before"]
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in last_wins(MAY).items()}


def test_target_written_before_publish_takes_the_reload(tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct staging was prepared for an empty target, but someone wrote into the target before the
    publish: the staged rows are upserted (the reload) from the same staging, counts exact."""
    from loadkit.postgres.modes import Merge

    target, _ = schemas
    original = Merge.finalize

    def write_then_finalize(self: Merge, cur: Any, ledger: Any) -> Any:
        stage = query(pg_dsn, "SELECT relpersistence FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                              "WHERE n.nspname = %s", (f"{target}__lk_stage",))
        assert stage == [("p",)]  # the direct kind
        with autocommit_cursor(pg_dsn) as other:
            other.execute(f"INSERT INTO \"{target}\".items VALUES ('k1', 'old', 0, NULL), ('k9', 'n', 9, NULL)")
        return original(self, cur, ledger)

    monkeypatch.setattr(Merge, "finalize", write_then_finalize)
    result = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 5, MAY))))
    assert "upsert" in steps_of(result) and "swap" not in steps_of(result)
    assert counts(result) == (4, 1, 0, 2)
    assert table_state(pg_dsn, target) == {**{k: v for k, (v, _) in last_wins(MAY).items()}, "k9": ("n", 9)}
    assert no_staging_left(pg_dsn, target)


def test_target_gets_a_view_before_publish_inserts_from_direct_staging(
        tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct staging was prepared, then a view on the target appeared: the publish refuses the swap and
    inserts from the direct staging (the old path), the view keeps working."""
    from loadkit.postgres.modes import Merge

    target, _ = schemas
    original = Merge.finalize

    def view_then_finalize(self: Merge, cur: Any, ledger: Any) -> Any:
        with autocommit_cursor(pg_dsn) as other:
            other.execute(f'CREATE VIEW "{target}".v AS SELECT * FROM "{target}".items')
        return original(self, cur, ledger)

    monkeypatch.setattr(Merge, "finalize", view_then_finalize)
    result = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, write_month(tmp_path, 5, MAY),
                               indexes=[["a"]])))
    assert steps_of(result)[:2] == ["insert", "primary_key"]
    assert counts(result) == (5, 0, 0, 2)
    assert query(pg_dsn, f'SELECT count(*) FROM "{target}".v') == [(5,)]
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in last_wins(MAY).items()}
    assert no_staging_left(pg_dsn, target)


@pytest.mark.parametrize("loss", ["batch", "row"])
def test_stopped_before_publish_then_resume_publishes_through_the_swap(
        tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch,
        loss: str) -> None:
    """A run stopped at its publish (every batch committed to the logged, direct staging, the files
    settled 'staged'); staging then loses a batch, or one row of a batch, behind loadkit's back (what crash
    recovery does to UNLOGGED staging, or a hand-made DELETE); the resume reads only that batch again and
    publishes through the swap, exactly (verify_staging: a short total sends it to the per-batch count).
    A force=true rerun over the published month is an unchanged reload."""
    from loadkit.errors import LoadkitError
    from loadkit.postgres.modes import Merge

    target, led = schemas
    month = {"a.csv": [(f"k{i}", "x" * 70, str(i)) for i in range(2000)] + [("k1", "dup", "")],
             "b.csv": [("k2", "late", "2"), ("k20", "", "")]}
    names = write_month(tmp_path, 5, month)

    def crash(self: Merge, cur: Any, ledger: Any) -> Any:
        raise LoadkitError("stopped at the publish (test)")

    with monkeypatch.context() as m:
        m.setattr(Merge, "finalize", crash)
        stopped = run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, names, batch_rows=3))
    assert stopped.status == "failed"
    kinds = query(pg_dsn, "SELECT c.relname, c.relpersistence FROM pg_class c JOIN pg_namespace n "
                          "ON n.oid = c.relnamespace WHERE n.nspname = %s", (f"{target}__lk_stage",))
    assert len(kinds) == 1 and kinds[0][1] == "p"  # the direct kind: logged
    stage = f'"{target}__lk_stage"."{kinds[0][0]}"'
    batches = query(pg_dsn, f'SELECT count(*), sum(rows_loaded) FROM "{led}".batch WHERE table_name = %s',
                    ("items",))[0]
    assert batches[0] > 2 and batches[1] == 2003 == query(pg_dsn, f"SELECT count(*) FROM {stage}")[0][0]
    with autocommit_cursor(pg_dsn) as cur:
        cur.execute(f"SELECT count(*) FROM {stage} WHERE _lk_batch = (SELECT min(_lk_batch) FROM {stage})")
        lost = cur.fetchone()[0]  # the rows of the batch read again
        cur.execute(f"DELETE FROM {stage} WHERE ctid IN (SELECT ctid FROM {stage} WHERE _lk_batch = "
                    f"(SELECT min(_lk_batch) FROM {stage}) LIMIT {'ALL' if loss == 'batch' else 1})")
        assert cur.rowcount == (lost if loss == "batch" else 1)
    resumed = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, names, batch_rows=3)))
    assert "swap" in steps_of(resumed)
    want = last_wins(month)
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in want.items()}
    assert counts(resumed) == expected_counts({}, want, set(), 2003) == (2000, 0, 0, 3)
    assert 0 < lost == resumed.metrics.tables["items"].rows_read  # only the lost batch was read again
    assert query(pg_dsn, f'SELECT sum(rows_loaded) FROM "{led}".batch WHERE table_name = %s', ("items",)) == [(2003,)]
    assert no_staging_left(pg_dsn, target)
    again = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, names, batch_rows=3, force=True)))
    assert counts(again) == (0, 0, 2000, 3) and "compare" in steps_of(again) and "upsert" not in steps_of(again)


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hinted_reload_equals_the_full_deduplication(data: st.DataObject, tmp_path_factory: pytest.TempPathFactory,
                                                      pg_dsn: str, mlflow_uri: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A first load, then a reload of a random month (duplicates within batches, across batches and files;
    rows changed, new and unchanged): with the in-process duplicate-key hints the reload's comparison sorts
    only the repeated keys' rows (Merge._winners; the upsert always deduplicates every staged row); without them
    (as a Ray or resumed run) it deduplicates every staged row. The two give the same table (rows,
    ``_lk_batch``, checksum) and the same counts."""
    import uuid

    from loadkit.postgres import keyhints
    from loadkit.postgres.modes import Merge

    tmp = tmp_path_factory.mktemp("hinted")
    value = st.one_of(st.just(""), st.sampled_from(["p", "q", "r s"]))
    number = st.one_of(st.just(""), st.integers(-3, 3).map(str))
    row = st.tuples(st.sampled_from([f"k{i}" for i in range(6)] + ["K0", "k10", "f1", "f7"]), value, number)
    placed = st.lists(st.tuples(st.floats(0, 1), row), min_size=0, max_size=10)

    def month() -> Dict[str, List[Row]]:
        drawn = data.draw(st.dictionaries(st.sampled_from(["a.csv", "b.csv", "c.csv"]), placed, min_size=1,
                                          max_size=3))
        files = {}
        for name, rows in drawn.items():  # ~1500 filler rows a file (several batches), the same in every month
            body: List[Row] = [(f"f{i}", f"{name}-{i}".ljust(40, "."), str(i)) for i in range(1500)]
            for at, r in sorted(rows, key=lambda p: p[0]):
                body.insert(int(at * len(body)), r)
            files[name] = body
        return files

    months = [month(), month()]
    batch_rows = data.draw(st.sampled_from([None, 1]))
    used: List[bool] = []
    winners = Merge._winners

    def spy(self: Merge, cur: Any, ledger: Any) -> Any:
        found = winners(self, cur, ledger)
        used.append(found.unsorted)
        return found

    monkeypatch.setattr(Merge, "_winners", spy)
    snaps, results = [], []
    for hinted in (True, False):
        schemas = (f"t_{uuid.uuid4().hex[:8]}", f"l_{uuid.uuid4().hex[:8]}")
        try:
            with monkeypatch.context() as m:
                if not hinted:
                    m.setattr(keyhints.KeyHints, "candidates", lambda self, table, staged: None)
                for i, files in enumerate(months):
                    names = write_month(tmp, 5, files)
                    used.clear()
                    result = ok(run_job(config(tmp, pg_dsn, schemas, mlflow_uri, names, batch_rows=batch_rows,
                                               force=i > 0)))
                assert all(u == hinted for u in used)  # a compared reload took the path under test
            snaps.append(target_snapshot(pg_dsn, schemas[0]))
            results.append(result)
        finally:
            drop_load_schemas(pg_dsn, *schemas)
    assert snaps[0] == snaps[1]
    assert counts(results[0]) == counts(results[1])
    merged = {**last_wins(months[0]), **last_wins(months[1])}
    assert [(k, a, b) for k, a, b, _ in snaps[0]["rows"]] == sorted(
        ((k, v[0], v[1]) for k, (v, _) in merged.items()), key=lambda r: r[0].encode())


@pytest.mark.parametrize("swap", [True, False])
def test_a_latin1_key_in_a_transcoded_and_a_python_decoded_batch_is_one_key(
        tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str, swap: bool) -> None:
    """A latin-1 month: a clean chunk goes to the server as source bytes (it transcodes them), a chunk with a
    bad row is parsed and sent as UTF-8 text. JOSÉ in both is one key: the client's key hashes must see it
    repeat. They hashed the latin-1 bytes against the UTF-8 ones and missed it, so the insert-path first load
    (a target with a grant cannot be swapped) inserted both rows and failed on the primary key (the swap
    fell back to the whole-table search). Now both paths resolve it among the hinted keys: b.csv's row wins."""
    target, _ = schemas
    folder = tmp_path / "2024-05"
    folder.mkdir()
    filler = b"".join(b"f%d,v,%d\n" % (i, i) for i in range(100))
    (folder / "a.csv").write_bytes(filler + "JOS\u00c9,first,1\n".encode("latin-1"))
    (folder / "b.csv").write_bytes(filler.replace(b"f", b"g") + "JOS\u00c9,second,2\n".encode("latin-1")
                                   + b"bad,row,3,extra\n")
    if not swap:
        with autocommit_cursor(pg_dsn) as cur:
            cur.execute(f'CREATE SCHEMA "{target}"')
            cur.execute(f'CREATE TABLE "{target}".items ({ITEMS_DDL})')
            cur.execute(f'GRANT SELECT ON "{target}".items TO PUBLIC')
    result = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, ["a.csv", "b.csv"], encoding="latin-1",
                               max_rejects=1)))
    assert query(pg_dsn, f'SELECT a, b FROM "{target}".items WHERE k = %s', ("JOS\u00c9",)) == [("second", 2)]
    assert counts(result) == (201, 0, 0, 1) and result.metrics.tables["items"].rows_rejected == 1
    assert ("swap" in steps_of(result)) == swap and "dedup" not in steps_of(result)
    assert "dedup_hint" in steps_of(result) if swap else "insert" in steps_of(result)


# Key values as CSV text, per declared type of the first key column: several spellings of one PostgreSQL value
# ("007" and "7", "1.5" and "1.50", "t" and "yes", "ab" and "ab " in a char column) and values that differ.
KEY_SPELLINGS = {
    "integer": ["7", "007", "+7", "8", "-0", "0"],
    "bigint": ["9000000000", "09000000000", "1"],
    "numeric(10,2)": ["1.5", "1.50", "01.5", "2", "2.00", "-0", "0"],
    "date": ["20240501", "20240502", "20231231"],
    "timestamp": ["2024-05-01 00:00:00", "2024-05-01 00:00:01"],
    "boolean": ["t", "true", "1", "yes", "f", "0", "no"],
    "char(4)": ["ab", "ab ", "ab  ", "a", " ab"],
    "varchar(6)": ["ab", "ab ", "AB", "a", "\u00e9", "e\u0301", "E\u0301"],
}


@pytest.fixture()
def case_insensitive(pg_dsn: str) -> Iterator[Optional[str]]:
    """A non-deterministic ICU collation ("a" = "A") for the test's columns, in public (a column's COLLATE is
    unqualified), dropped after; None where the server has no ICU (the other collations still run)."""
    import uuid

    import psycopg2

    name = f"lk_ci_{uuid.uuid4().hex[:8]}"
    try:
        with autocommit_cursor(pg_dsn) as cur:
            cur.execute(f"CREATE COLLATION public.{name} (provider = icu, locale = 'und-u-ks-level2', "
                        "deterministic = false)")
    except psycopg2.Error:
        yield None
        return
    try:
        yield name
    finally:
        with autocommit_cursor(pg_dsn) as cur:
            cur.execute(f"DROP COLLATION IF EXISTS public.{name}")


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hinted_paths_equal_the_full_deduplication_for_every_key_type(
        data: st.DataObject, tmp_path_factory: pytest.TempPathFactory, pg_dsn: str, mlflow_uri: str,
        monkeypatch: pytest.MonkeyPatch, case_insensitive: Optional[str]) -> None:
    """The hinted paths against the unhinted insert path (DISTINCT ON over every staged row, no hints), over a
    first load and a reload (rows changed, added, gone; sync on or off): a first key column of every declared
    type (its value in several spellings), a collation (none, C, a non-deterministic one: "a" = "A"), a
    second key column or none, or a derived key first or second. The hinted swap (its duplicate search
    filters the scan on the first key column's candidate values, Merge._first_key_filter) and the hinted
    insert path and reload (Merge._winners, compared part by part) give the same table (rows, ``_lk_batch``)
    and counts as the full deduplication, or fail alike."""
    import uuid

    from loadkit.postgres import keyhints
    from loadkit.postgres.modes import Merge

    tmp = tmp_path_factory.mktemp("types")
    kind = data.draw(st.sampled_from(sorted(KEY_SPELLINGS)))
    collation = data.draw(st.sampled_from([None, "C"] + ([case_insensitive] if case_insensitive else []))) \
        if kind.startswith("varchar") else None
    shape = data.draw(st.sampled_from(["one", "two", "derived_first", "derived_second"]))
    columns = [ColumnConfig(name="k", type=kind, nullable=False, collation=collation),
               ColumnConfig(name="a", type="text", nullable=False), ColumnConfig(name="b", type="integer")]
    derived = DerivedKeyConfig(name="dk", columns=["k", "a"]) if shape.startswith("derived") else None
    key = {"one": ("k",), "two": ("k", "a"), "derived_first": ("dk", "b"), "derived_second": ("k", "dk")}[shape]
    if shape == "derived_first":
        columns[2] = ColumnConfig(name="b", type="integer", nullable=False)
    row = st.tuples(st.sampled_from(KEY_SPELLINGS[kind]), st.sampled_from(["x", "y"]), st.sampled_from(["1", "2"]))
    month = st.dictionaries(st.sampled_from(["a.csv", "b.csv"]), st.lists(row, min_size=1, max_size=8),
                            min_size=1, max_size=2)
    months = [data.draw(month), data.draw(month)]
    sync = data.draw(st.booleans())
    batch_rows = data.draw(st.sampled_from([None, 1, 2]))
    cols = ", ".join(["k::text", "a", "b"] + (["dk"] if derived else []))
    outcomes = []
    for hinted, swap in ((True, True), (True, False), (False, False)):
        schemas = (f"t_{uuid.uuid4().hex[:8]}", f"l_{uuid.uuid4().hex[:8]}")
        runs = []
        try:
            with monkeypatch.context() as m:
                if not hinted:
                    m.setattr(keyhints.KeyHints, "candidates", lambda self, table, staged: None)
                if not swap:
                    m.setattr(Merge, "_direct_wanted", lambda self, cur, created: False)
                    m.setattr(Merge, "_swap_refusal", lambda self, cur: "the old path (test)")
                for i, files in enumerate(months):
                    result = run_job(config(tmp, pg_dsn, schemas, mlflow_uri, write_month(tmp, 5, files), sync=sync,
                                            force=i > 0, columns=columns, key=key, batch_rows=batch_rows,
                                            derived_key=derived))
                    if result.status != "succeeded":
                        runs.append((result.status, type(result.error).__name__))
                        break
                    rows = query(pg_dsn, f'SELECT {cols}, _lk_batch FROM "{schemas[0]}".items')
                    runs.append((counts(result), sorted(rows, key=repr)))
                    if hinted and collation != case_insensitive:  # the hints saw every repeat: no fallback
                        assert "dedup" not in steps_of(result)
        finally:
            drop_load_schemas(pg_dsn, *schemas)
        outcomes.append(runs)
    assert outcomes[0] == outcomes[2] and outcomes[1] == outcomes[2]
    assert all(isinstance(r[0], tuple) for r in outcomes[2])  # every month loads (no NULL or reject in these)


@pytest.mark.parametrize("short", [False, True])
def test_staged_rows_of_a_batch_the_ledger_does_not_know_are_never_published(
        tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch,
        short: bool) -> None:
    """A run stopped at its publish; then staging gains rows of a batch the ledger does not know (one with a
    staged key, one with a new key), and -- ``short`` -- loses one row of a known batch too. The resume's
    verify_staging finds the total off (it skips the per-batch count only when the total is the ledger's),
    deletes the stray rows and re-reads only the short batch: the published table is exactly the month,
    the stray rows' keys and values nowhere, counts exact."""
    from loadkit.errors import LoadkitError
    from loadkit.postgres.modes import Merge

    target, led = schemas
    month = {"a.csv": [(f"k{i}", "x" * 70, str(i)) for i in range(600)] + [("k1", "dup", "")],
             "b.csv": [("k2", "late", "2")]}
    names = write_month(tmp_path, 5, month)

    def crash(self: Merge, cur: Any, ledger: Any) -> Any:
        raise LoadkitError("stopped at the publish (test)")

    with monkeypatch.context() as m:
        m.setattr(Merge, "finalize", crash)
        assert run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, names, batch_rows=3)).status == "failed"
    (stage_name,) = query(pg_dsn, "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                  "WHERE n.nspname = %s", (f"{target}__lk_stage",))[0]
    stage = f'"{target}__lk_stage"."{stage_name}"'
    with autocommit_cursor(pg_dsn) as cur:
        cur.execute(f"INSERT INTO {stage} (k, a, b, _lk_batch, _lk_row) VALUES ('k1', 'stray', 99, 4242, 1), "
                    "('zz', 'stray', 98, 4242, 2)")
        lost = 0
        if short:
            cur.execute(f"SELECT count(*) FROM {stage} WHERE _lk_batch = (SELECT min(_lk_batch) FROM {stage})")
            lost = cur.fetchone()[0]
            cur.execute(f"DELETE FROM {stage} WHERE ctid IN (SELECT ctid FROM {stage} WHERE _lk_batch = "
                        f"(SELECT min(_lk_batch) FROM {stage}) LIMIT 1)")
    resumed = ok(run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, names, batch_rows=3)))
    want = last_wins(month)
    assert table_state(pg_dsn, target) == {k: v for k, (v, _) in want.items()}
    assert counts(resumed) == (600, 0, 0, 2)
    assert resumed.metrics.tables["items"].rows_read == lost  # only a short batch is read again
    assert query(pg_dsn, f'SELECT count(*) FROM "{target}".items WHERE _lk_batch = 4242') == [(0,)]


@pytest.mark.parametrize("kind, values", [
    ("text", ["", "NULL", None, "a,b", "{x}", 'say "hi"', "back\\slash", "  padded  ", "caf\u00e9", "'", "\\\"",
              "\t\n"]),
    ("character(4)", ["ab", "ab  ", "", None]),
    ("character varying(6)", ["ab ", "\u00e9\u00e9", "NULL"]),
    ("integer", [0, -7, 2**31 - 1, None]),
    ("bigint", [-(2**63), 2**63 - 1]),
    ("numeric(12,2)", [Decimal("1.50"), Decimal("-0.00"), Decimal("1E+2"), Decimal("9999999999.99"), None]),
    ("double precision", [-0.0, 0.1, 1e-300, 1.7976931348623157e308, float("inf"), float("-inf"), float("nan")]),
    ("date", [date(2024, 5, 1), date(1, 1, 1), date(9999, 12, 31)]),
    ("timestamp", [datetime(2024, 5, 1, 0, 0, 0, 1), datetime(1900, 1, 1)]),
    ("boolean", [True, False, None]),
])
def test_key_arrays_sent_as_one_literal_read_back_as_sent(pg_dsn: str, kind: str, values: List[Any]) -> None:
    """The candidate keys' arrays (modes._sql_array: one literal, not psycopg2's ARRAY[...] of one expression per
    element) hold exactly the values psycopg2's own adaptation gives, for every key type and the awkward
    texts (quotes, backslashes, braces, commas, "NULL", blanks)."""
    from loadkit.postgres.modes import _sql_array

    got = query(pg_dsn, f"SELECT %s::{kind}[] = %s::{kind}[], %s::{kind}[]::text, %s::{kind}[]::text, %s::{kind}[]",
                (_sql_array(values), values, _sql_array(values), values, _sql_array(values)))
    assert got[0][0], got  # equal as the type compares them
    if kind == "double precision":  # psycopg2's ARRAY[-0.0] loses the sign (numeric -0.0 is 0); the literal keeps it
        assert [repr(v) for v in got[0][3]] == [repr(v) for v in values]
    else:
        assert got[0][1] == got[0][2], got


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.text(st.characters(blacklist_categories=("Cs",),
                                                                    blacklist_characters="\x00"))), max_size=8))
def test_any_text_array_sent_as_one_literal_reads_back_as_sent(pg_dsn: str, values: List[Optional[str]]) -> None:
    from loadkit.postgres.modes import _sql_array

    assert query(pg_dsn, "SELECT %s::text[]", (_sql_array(values),)) == [(values,)]
