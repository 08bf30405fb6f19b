"""Write modes and schema management on the generated CNPJ month, through real Ray and PostgreSQL.

The oracle is the generator's manifest: every row for append, last-wins per key for the keyed
modes (merge, replace, snapshot), socios keyed by its derived id.
"""
from __future__ import annotations

import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Set

import psycopg2
import pytest

from loadkit.examples.cnpj.sample import SampleManifest, generate_month
from loadkit.postgres import modes
from loadkit.config import MigrateConfig
from loadkit.errors import Category, ConfigError, classify
from loadkit.plan import build_plan
from loadkit.runner import RunResult, run_job
from tests.helpers import compose, query
from tests.test_e2e_monthly import KEYS, SOCIO_IDENTITY, canon, last_wins, table_rows

pytestmark = pytest.mark.e2e

TABLES = ("empresas", "estabelecimentos", "socios", "simples", "cnaes", "motivos", "municipios", "naturezas",
          "paises", "qualificacoes")
REFERENCE = TABLES[4:]


MONTH = {"rows": 300, "shards": 2, "seed": 11}  # the size of conftest's `month`


@pytest.fixture(scope="module")
def june(month: SampleManifest) -> SampleManifest:
    """The next month in the same folder: same seed, so most keys recur (updates) and some are new."""
    return generate_month(month.root, 2024, 6, rows=400, shards=2, seed=11)


def identity(table: str) -> tuple:
    return KEYS.get(table, SOCIO_IDENTITY)


def keys_of(rows: List[Dict[str, Any]], table: str) -> Set[tuple]:
    return {tuple(r[k] for k in identity(table)) for r in rows}


def only(*tables: str) -> List[str]:
    return [f"job.tables.{t}.enabled=false" for t in TABLES if t not in tables]


def all_in(mode: str, tables: tuple = TABLES) -> List[str]:
    return [f"job.tables.{t}.mode={mode}" for t in tables]


def run(job_overrides: Any, root: Path, *extra: str, **kw: Any) -> RunResult:
    return run_job(compose(job_overrides(root, *extra, **kw)))


def assert_table_matches(dsn: str, schema: str, table: str, wanted: List[Dict[str, Any]], where: str = "") -> None:
    columns = list(wanted[0].keys())
    got = table_rows(dsn, schema, table, columns) if not where else [
        dict(zip(columns, r)) for r in query(dsn, f'SELECT {", ".join(columns)} FROM "{schema}"."{table}" {where}')]
    assert Counter(canon(r) for r in got) == Counter(canon(r) for r in wanted), table


def index_defs(dsn: str, schema: str, table: str) -> List[str]:
    return [r[0] for r in query(dsn, "SELECT indexdef FROM pg_indexes WHERE schemaname=%s AND tablename=%s",
                                (schema, table))]


# ---------------------------------------------------------------- the whole month in each mode


def check_month(result: RunResult, month: SampleManifest, dsn: str, schema: str, mode: str) -> None:
    """Every table against the oracle, post-load indexes, primary keys, no shadow tables left."""
    assert result.status == "succeeded", result.error
    for table in TABLES:
        expected = month.expected[table]
        wanted = expected if mode == "append" else last_wins(expected, identity(table))
        assert_table_matches(dsn, schema, table, wanted)
        tm = result.metrics.tables[table]
        assert (tm.rows_read, tm.rows_rejected) == (month.rows[table], 0), table
        if mode == "merge":
            assert (tm.inserted, tm.updated) == (len(wanted), 0), table
    for table in ("estabelecimentos", "socios"):
        assert any("(cnpj_basico)" in d for d in index_defs(dsn, schema, table)), table
    pks = query(dsn, "SELECT count(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
                     "WHERE n.nspname=%s AND c.contype='p'", (schema,))[0][0]
    assert pks == (0 if mode == "append" else len(TABLES) * (2 if mode == "snapshot" else 1))  # parent + partition
    assert query(dsn, "SELECT count(*) FROM information_schema.tables WHERE table_schema=%s "
                      "AND table_name LIKE '%%lk_new'", (schema,)) == [(0,)]


def test_the_month_repeats_keys_across_shards(month: SampleManifest) -> None:
    for table in ("empresas", "estabelecimentos"):
        assert len(last_wins(month.expected[table], KEYS[table])) < month.rows[table], table


@pytest.mark.slow
def test_append_keeps_every_row(month: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None,
                                job_overrides: Any) -> None:
    check_month(run(job_overrides, month.root, *all_in("append")), month, pg_dsn, schemas[0], "append")


# ---------------------------------------------------------------- merge: lost staging, then a second month


@pytest.mark.slow
def test_merge_reloads_batches_lost_from_staging_then_counts_updates(
        month: SampleManifest, june: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None,
        job_overrides: Any, tmp_path: Path) -> None:
    target, led = schemas
    root = tmp_path / "data"
    shutil.copytree(month.root, root)
    shard1 = root / "2024-05" / "Empresas1.zip"
    good = shard1.read_bytes()
    shard1.write_bytes(b"truncated download")
    failed = run(job_overrides, root, *only("empresas"))
    assert failed.status == "failed"  # shard 0 is staged and ledgered, shard 1 failed: nothing published
    stage = "empresas__lk_stage_202405"
    # A first load into an empty target stages into a logged table shaped like it (swapped in at the publish).
    assert query(pg_dsn, "SELECT relpersistence FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                         "WHERE n.nspname=%s AND c.relname=%s", (f"{target}__lk_stage", stage)) == [("p",)]
    ledgered = query(pg_dsn, f'SELECT sum(rows_loaded) FROM "{led}".batch WHERE table_name=%s', ("empresas",))[0][0]
    assert ledgered > 0 and query(pg_dsn, f'SELECT count(*) FROM "{target}__lk_stage"."{stage}"')[0][0] == ledgered

    # What crash recovery does to an UNLOGGED table, behind loadkit's back; then the file is fixed.
    _exec(pg_dsn, f'TRUNCATE "{target}__lk_stage"."{stage}"')
    shard1.write_bytes(good)
    resumed = run(job_overrides, root, *all_in("merge"))
    check_month(resumed, month, pg_dsn, target, "merge")  # empresas: shard 0 was read again, not skipped
    assert query(pg_dsn, f'SELECT sum(rows_in) FROM "{led}".batch WHERE table_name=%s', ("empresas",))[0][0] \
        == month.rows["empresas"]

    tables = ("empresas", "socios", "cnaes")
    # plain merge keeps keys June no longer has (the CNPJ job syncs them away: tests/test_sync.py)
    keep = [f"job.tables.{t}.delete_missing=false" for t in tables]
    second = run(job_overrides, root, *only(*tables), *all_in("merge", tables), *keep, month=6)
    assert second.status == "succeeded", second.error
    for table in tables:
        before, now = keys_of(month.expected[table], table), keys_of(june.expected[table], table)
        tm = second.metrics.tables[table]
        assert (tm.inserted, tm.updated) == (len(now - before), len(now & before)), table
        assert_table_matches(pg_dsn, target, table,
                             last_wins(month.expected[table] + june.expected[table], identity(table)))
    assert second.metrics.tables["empresas"].updated > 0 and second.metrics.tables["empresas"].inserted > 0
    recorded = query(pg_dsn, f'SELECT table_name, inserted, updated FROM "{led}".table_load WHERE run_id=%s',
                     (second.run_id,))
    assert {t: (i, u) for t, i, u in recorded} == {
        t: (second.metrics.tables[t].inserted, second.metrics.tables[t].updated) for t in tables}


# ---------------------------------------------------------------- snapshot: one partition per month


@pytest.mark.slow
def test_snapshot_keeps_every_month_and_a_reload_replaces_only_its_own(
        month: SampleManifest, june: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None,
        job_overrides: Any) -> None:
    target, _ = schemas
    check_month(run(job_overrides, month.root, *all_in("snapshot")), month, pg_dsn, target, "snapshot")
    tables = ("empresas", "socios", "cnaes")
    subset = [*only(*tables), *all_in("snapshot", tables)]
    assert run(job_overrides, month.root, *subset, month=6).status == "succeeded"

    def partition_oids() -> Dict[str, int]:
        return dict(query(pg_dsn, "SELECT c.relname, c.oid::int FROM pg_class c JOIN pg_namespace n "
                                  "ON n.oid = c.relnamespace WHERE n.nspname=%s AND c.relkind = 'r' "
                                  "AND c.relname LIKE 'empresas__p%%'",
                          (target,)))

    before = partition_oids()
    assert set(before) == {"empresas__p202405", "empresas__p202406"}
    reload = run(job_overrides, month.root, *subset, "force=true")
    assert reload.status == "succeeded", reload.error
    after = partition_oids()
    assert after["empresas__p202406"] == before["empresas__p202406"], "June was not touched"
    assert after["empresas__p202405"] != before["empresas__p202405"], "May was rebuilt and swapped in"
    for table in tables:
        for m, period in ((month, 202405), (june, 202406)):
            assert_table_matches(pg_dsn, target, table, last_wins(m.expected[table], identity(table)),
                                 where=f"WHERE ref_period = {period}")


# ---------------------------------------------------------------- replace: atomic swap, failure, migration


class CountPoller(threading.Thread):
    """Reads a table's row count in a loop, as a dashboard would during a load."""

    def __init__(self, dsn: str, relation: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.relation = dsn, relation
        self.counts: Counter = Counter()
        self.errors: List[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        conn = psycopg2.connect(self.dsn, application_name="loadkit-test-reader")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not self.done.is_set():
                    try:
                        cur.execute(f"SELECT count(*) FROM {self.relation}")
                        self.counts[cur.fetchone()[0]] += 1
                    except psycopg2.Error as exc:
                        self.errors.append(str(exc))
        finally:
            conn.close()


@pytest.mark.slow
def test_replace_swaps_atomically_keeps_the_old_table_on_failure_and_migrates(
        month: SampleManifest, june: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None,
        job_overrides: Any, tmp_path: Path) -> None:
    target, _ = schemas
    root = tmp_path / "data"
    shutil.copytree(month.root, root)
    check_month(run(job_overrides, root, *all_in("replace")), month, pg_dsn, target, "replace")
    counts = {len(last_wins(m.expected["cnaes"], identity("cnaes"))) for m in (month, june)}

    poller = CountPoller(pg_dsn, f'"{target}".cnaes')
    poller.start()
    try:
        assert run(job_overrides, root, *only(*REFERENCE), month=6).status == "succeeded"
    finally:
        poller.done.set()
        poller.join(10)
    assert poller.errors == []
    assert set(poller.counts) <= counts and sum(poller.counts.values()) > 10, \
        f"a reader saw a partial or empty table: {poller.counts}"
    june_cnaes = last_wins(june.expected["cnaes"], identity("cnaes"))
    assert_table_matches(pg_dsn, target, "cnaes", june_cnaes)

    # A reload of May whose Cnaes file is corrupt: cnaes keeps June's rows, the others are replaced.
    cnaes_zip = root / "2024-05" / "Cnaes.zip"
    good = cnaes_zip.read_bytes()
    cnaes_zip.write_bytes(b"this is not a zip file")
    failed = run(job_overrides, root, *only(*REFERENCE), "force=true")
    assert failed.status == "failed" and classify(failed.error) is Category.SOURCE_DATA
    assert_table_matches(pg_dsn, target, "cnaes", june_cnaes)
    assert_table_matches(pg_dsn, target, "motivos", last_wins(month.expected["motivos"], identity("motivos")))

    # Someone changed the table by hand: the run stops with the diff and touches nothing ...
    cnaes_zip.write_bytes(good)
    _exec(pg_dsn, f'ALTER TABLE "{target}".cnaes DROP COLUMN descricao, ADD COLUMN note text DEFAULT \'kept\'')
    refused = run(job_overrides, root, *only("cnaes"), "force=true")
    assert refused.status == "failed" and classify(refused.error) is Category.CONFIG
    assert "missing column descricao" in str(refused.error) and "extra column note" in str(refused.error)
    assert query(pg_dsn, f'SELECT count(*) FROM "{target}".cnaes')[0][0] == len(june_cnaes)
    # ... unless migrate allows it: the column comes back, the extra one is kept (with its default).
    migrated = run(job_overrides, root, *only("cnaes"), "force=true", "job.migrate.add_columns=true",
                   "job.migrate.allow_extra_columns=true")
    assert migrated.status == "succeeded", migrated.error
    assert_table_matches(pg_dsn, target, "cnaes", last_wins(month.expected["cnaes"], identity("cnaes")))
    assert query(pg_dsn, f'SELECT DISTINCT note FROM "{target}".cnaes') == [("kept",)]


# ---------------------------------------------------------------- schema management


def _exec(dsn: str, sql: str) -> None:
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


def _columns(dsn: str, schema: str, table: str) -> Dict[str, str]:
    return dict(query(dsn, "SELECT column_name, CASE WHEN character_maximum_length IS NULL THEN data_type ELSE "
                           "data_type || '(' || character_maximum_length || ')' END FROM information_schema.columns "
                           "WHERE table_schema=%s AND table_name=%s", (schema, table)))


def _prepare(dsn: str, table: Any, migrate: MigrateConfig) -> None:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            modes.prepare(cur, table, migrate)
    finally:
        conn.close()


def test_schema_drift_stops_with_a_diff_unless_migrate_allows_it(month: SampleManifest, pg_dsn: str,
                                                                 schemas: tuple, job_overrides: Any) -> None:
    target, _ = schemas
    plan = build_plan(compose(job_overrides(month.root)))
    empresas = plan.table("empresas")
    _prepare(pg_dsn, empresas, MigrateConfig())
    _exec(pg_dsn, f'ALTER TABLE "{target}".empresas DROP COLUMN porte, ADD COLUMN note text, '
                  f'ALTER COLUMN razao_social TYPE varchar(200)')

    with pytest.raises(ConfigError) as refused:
        _prepare(pg_dsn, empresas, MigrateConfig())
    text = str(refused.value)
    for part in ("missing column porte char(2)", "extra column note text",
                 "column razao_social is character varying(200), declared text", "job.migrate.add_columns=true",
                 "job.migrate.alter_types=true", "job.migrate.allow_extra_columns=true"):
        assert part in text
    with pytest.raises(ConfigError) as partly:  # adding is allowed, the rest is still refused
        _prepare(pg_dsn, empresas, MigrateConfig(add_columns=True))
    assert "porte" not in str(partly.value) and "note" in str(partly.value)
    assert _columns(pg_dsn, target, "empresas")["razao_social"] == "character varying(200)", "rolled back"

    _prepare(pg_dsn, empresas, MigrateConfig(add_columns=True, alter_types=True, allow_extra_columns=True))
    cols = _columns(pg_dsn, target, "empresas")
    assert cols["porte"] == "character(2)" and cols["razao_social"] == "text" and cols["note"] == "text"


def test_mode_and_key_mismatches_are_config_errors(month: SampleManifest, pg_dsn: str, schemas: tuple,
                                                   job_overrides: Any) -> None:
    target, _ = schemas
    plan = build_plan(compose(job_overrides(month.root, "job.tables.cnaes.mode=append")))
    _prepare(pg_dsn, plan.table("cnaes"), MigrateConfig())
    for mode, words in (("snapshot", "not partitioned"), ("merge", "no primary key or unique index")):
        table = build_plan(compose(job_overrides(month.root, f"job.tables.cnaes.mode={mode}"))).table("cnaes")
        with pytest.raises(ConfigError, match=words):
            _prepare(pg_dsn, table, MigrateConfig(add_columns=True, alter_types=True, allow_extra_columns=True))


def test_replace_rebuilds_a_published_month_when_a_new_file_arrives(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                                   ray_session: None, job_overrides: Any) -> None:
    """A shard that shows up after the month was published must not make the swap drop the other shard's rows."""
    target, _ = schemas
    month = generate_month(tmp_path, 2024, 5, rows=200, shards=2, seed=5)
    late = month.folder / "Empresas1.zip"
    parked = tmp_path / "Empresas1.zip.parked"
    late.rename(parked)
    first = run(job_overrides, month.root, *only("empresas"), "job.tables.empresas.mode=replace")
    assert first.status == "succeeded", first.error
    parked.rename(late)
    second = run(job_overrides, month.root, *only("empresas"), "job.tables.empresas.mode=replace")
    assert second.status == "succeeded", second.error
    assert second.metrics.tables["empresas"].files_skipped == 0
    assert_table_matches(pg_dsn, target, "empresas", last_wins(month.expected["empresas"], KEYS["empresas"]))
