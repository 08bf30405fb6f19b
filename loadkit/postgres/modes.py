"""Write modes: target/staging DDL before the load, schema checks, and the finalisation after it.

- append:   batches COPY straight into the target; secondary indexes are built after the load.
- merge:    batches COPY into an UNLOGGED staging table; finalize keeps one row per key and
            upserts it (INSERT ... ON CONFLICT DO UPDATE), reporting inserted vs updated.
- replace:  batches COPY into staging; finalize builds a shadow table from it, adds PK and
            indexes after the data, ANALYZEs it and swaps it in, all in one transaction.
- snapshot: like replace, for one LIST partition (ref_period = YYYYMM) of a partitioned target.

Duplicate keys (merge, replace, snapshot) are resolved deterministically: the last file of the
table's sorted file list wins, then the last batch (byte offset) in it, then the last row in the
batch -- i.e. "last shard wins, last record wins", the same in every run.

Staging is UNLOGGED (no WAL: about half the write I/O). PostgreSQL empties UNLOGGED tables in
crash recovery while the ledger still says their batches committed, so ``verify_staging``
compares staged rows per batch with the ledger before every resume and again inside every
publishing transaction, and forgets what was lost so it is read again (never published short).

Every finalisation runs in the caller's transaction, together with marking the files loaded.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from loadkit.postgres import ledger
from loadkit.errors import ConfigError
from loadkit.plan import BATCH_COL, PERIOD_COL, ROW_COL, ColumnSpec, MigratePolicy, TableSpec
from loadkit.security import qualified, quote_ident

log = logging.getLogger("loadkit.postgres.modes")

# Columns a merge table with history=true carries besides its declared ones (see sync_missing).
HISTORY_COLS = ("valid_from", "valid_to")

# Finalisation step timings: ``record_steps`` collects what ``step`` measures (see below).
_steps: contextvars.ContextVar[Optional[Dict[str, float]]] = contextvars.ContextVar("loadkit_steps", default=None)
SLOW_STEP_S = 1.0  # a finalisation step that takes longer is logged at INFO


@contextlib.contextmanager
def record_steps() -> Iterator[Dict[str, float]]:
    """Collect the seconds of every ``step`` run inside the block: {step name: seconds}, in the order
    run (a step run twice adds up). The caller (the runner) keeps them in TableMetrics.finalise_steps."""
    steps: Dict[str, float] = {}
    token = _steps.set(steps)
    try:
        yield steps
    finally:
        _steps.reset(token)


@contextlib.contextmanager
def step(name: str, table: str) -> Iterator[None]:
    """Time one finalisation step (upsert, swap, indexes, ...) of ``table``: logged at INFO when it takes
    over SLOW_STEP_S seconds, added to the ``record_steps`` collector when one is open."""
    started = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - started
        steps = _steps.get()
        if steps is not None:
            steps[name] = steps.get(name, 0.0) + took
        if took > SLOW_STEP_S:
            log.info("%s: finalise step %s took %.1f s", table, name, took, extra={"table": table})


# format_type() spellings of the declared kinds, for the schema comparison.
_CANONICAL = {"char": "character", "varchar": "character varying", "timestamp": "timestamp without time zone",
              "double": "double precision"}


def canonical_type(col: ColumnSpec) -> str:
    base = _CANONICAL.get(col.kind, col.kind)
    if col.kind in ("char", "varchar"):
        return f"{base}({col.length})"
    if col.kind == "numeric":
        return f"numeric({col.precision},{col.scale})"
    return base


# ---------------------------------------------------------------- the declared shape


def _declared(table: TableSpec) -> List[Tuple[str, str]]:
    """(name, DDL type) of the data columns, derived key included."""
    cols = [(c.name, c.sql_type) for c in table.columns]
    if table.derived_key:
        cols.append((table.derived_key[0], "text"))
    return cols


def _target_columns(table: TableSpec) -> Dict[str, Tuple[str, str]]:
    """name -> (DDL type, format_type spelling) of every column the target must have."""
    out = {c.name: (c.sql_type, canonical_type(c)) for c in table.columns}
    if table.derived_key:
        out[table.derived_key[0]] = ("text", "text")
    out[BATCH_COL] = ("bigint", "bigint")
    if table.mode == "snapshot":
        out[PERIOD_COL] = ("integer", "integer")
    if table.history:
        out.update({c: ("date", "date") for c in HISTORY_COLS})
    return out


def _staging_columns(table: TableSpec) -> Dict[str, str]:
    out = {n: t for n, (_, t) in _target_columns(table).items() if n != PERIOD_COL and n not in HISTORY_COLS}
    out[ROW_COL] = "integer"
    return out


def _column_ddl(table: TableSpec) -> str:
    cols = [f"{quote_ident(n)} {t}" for n, t in _declared(table)]
    return ", ".join(cols + [f"{quote_ident(BATCH_COL)} bigint"])


def _cols(names: Tuple[str, ...]) -> str:
    return ", ".join(quote_ident(n) for n in names)


# ---------------------------------------------------------------- what the database has


def existing_columns(cur: Any, schema: str, name: str) -> Optional[Dict[str, str]]:
    """column -> format_type of an existing table, or None if there is no such table."""
    cur.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (schema, name),
    )
    rows = cur.fetchall()
    return {r[0]: r[1] for r in rows} if rows else None


def _is_partitioned(cur: Any, schema: str, name: str) -> bool:
    cur.execute("SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s", (schema, name))
    row = cur.fetchone()
    return bool(row and row[0])


def _has_unique_on(cur: Any, schema: str, name: str, cols: Tuple[str, ...]) -> bool:
    """True if a primary key or unique index covers exactly these columns (ON CONFLICT needs one)."""
    cur.execute(
        "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey) "
        "WHERE n.nspname = %s AND c.relname = %s AND i.indisunique GROUP BY i.indexrelid",
        (schema, name),
    )
    return sorted(cols) in [list(r[0]) for r in cur.fetchall()]


@dataclass
class SchemaDiff:
    """How an existing table differs from its declaration."""

    missing: Dict[str, str] = field(default_factory=dict)  # column -> declared DDL type
    extra: Dict[str, str] = field(default_factory=dict)  # column -> actual type
    changed: Dict[str, Tuple[str, str, str]] = field(default_factory=dict)  # column -> (actual, declared, DDL)

    def lines(self) -> List[str]:
        return ([f"missing column {c} {t}" for c, t in self.missing.items()]
                + [f"extra column {c} {t}" for c, t in self.extra.items()]
                + [f"column {c} is {a}, declared {d}" for c, (a, d, _) in self.changed.items()])

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.changed)


def schema_diff(table: TableSpec, actual: Dict[str, str]) -> SchemaDiff:
    expected = _target_columns(table)
    return SchemaDiff(
        missing={c: ddl for c, (ddl, _) in expected.items() if c not in actual},
        extra={c: t for c, t in actual.items() if c not in expected},
        changed={c: (actual[c], canon, ddl) for c, (ddl, canon) in expected.items()
                 if c in actual and actual[c] != canon},
    )


# ---------------------------------------------------------------- before the load


def prepare(cur: Any, table: TableSpec, migrate: MigratePolicy) -> None:
    """Create the target (and staging) if missing; reconcile an existing target with the declaration.

    A target that differs stops the run with the full diff unless ``migrate`` allows each
    difference: missing columns are added, changed types converted, extra columns kept.
    """
    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(table.schema)}")
    actual = existing_columns(cur, table.schema, table.name)
    if actual is None:
        _create_target(cur, table)
    else:
        _check_shape(cur, table)
        diff = schema_diff(table, actual)
        if diff:
            _migrate(cur, table, diff, migrate)
    if table.mode != "append":
        _prepare_staging(cur, table)


def _check_shape(cur: Any, table: TableSpec) -> None:
    """Differences no column migration can fix: partitioning and the upsert key."""
    key = f"job.tables.{table.name}.mode"
    where = f"table {table.schema}.{table.name}"
    partitioned = _is_partitioned(cur, table.schema, table.name)
    if partitioned != (table.mode == "snapshot"):
        raise ConfigError(f"{where} is {'' if partitioned else 'not '}partitioned by {PERIOD_COL}, but mode is "
                          f"{table.mode}: changing to or from snapshot needs a new table (rename or drop it)", key=key)
    if table.mode == "merge" and not _has_unique_on(cur, table.schema, table.name, table.key):
        raise ConfigError(f"{where} has no primary key or unique index on {list(table.key)}, which mode merge "
                          "needs for its upsert: add one, or load it once with mode replace", key=key)


def _migrate(cur: Any, table: TableSpec, diff: SchemaDiff, migrate: MigratePolicy) -> None:
    refused = SchemaDiff(
        missing=diff.missing if not migrate.add_columns else {},
        extra=diff.extra if not migrate.allow_extra_columns else {},
        changed=diff.changed if not migrate.alter_types else {},
    )
    if refused:
        hints = [h for cond, h in ((refused.missing, "job.migrate.add_columns=true"),
                                   (refused.changed, "job.migrate.alter_types=true"),
                                   (refused.extra, "job.migrate.allow_extra_columns=true")) if cond]
        raise ConfigError(f"table {table.schema}.{table.name} differs from its declaration: "
                          + "; ".join(refused.lines()) + f" (to accept, set {' and '.join(hints)})",
                          key=f"job.tables.{table.name}")
    target = qualified(table.schema, table.name)
    for col, ddl in diff.missing.items():
        log.warning("migrating %s.%s: adding column %s %s", table.schema, table.name, col, ddl)
        cur.execute(f"ALTER TABLE {target} ADD COLUMN {quote_ident(col)} {ddl}")
    for col, (was, _, ddl) in diff.changed.items():
        log.warning("migrating %s.%s: column %s from %s to %s", table.schema, table.name, col, was, ddl)
        cur.execute(f"ALTER TABLE {target} ALTER COLUMN {quote_ident(col)} TYPE {ddl} USING {quote_ident(col)}::{ddl}")
    if diff.extra:
        log.warning("keeping undeclared columns of %s.%s (loads leave them NULL or default): %s",
                    table.schema, table.name, ", ".join(diff.extra))


def _prepare_staging(cur: Any, table: TableSpec) -> None:
    """UNLOGGED staging of the declared shape; one left by another declaration is dropped (its batches reload)."""
    stage = qualified(table.load_schema, table.load_table)
    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(table.load_schema)}")
    # Staging of an older loadkit lived in the target schema: drop it (its batches are found missing
    # from the new staging and read again), so nothing of loadkit's stays in the user's schema.
    cur.execute(f"DROP TABLE IF EXISTS {qualified(table.schema, table.load_table)}")
    actual = existing_columns(cur, table.load_schema, table.load_table)
    if actual is not None and actual != _staging_columns(table):
        log.warning("staging table %s.%s does not match the declaration; dropping it, its batches will reload",
                    table.load_schema, table.load_table)
        cur.execute(f"DROP TABLE {stage}")
    cur.execute(f"CREATE UNLOGGED TABLE IF NOT EXISTS {stage} ({_column_ddl(table)}, {quote_ident(ROW_COL)} integer)")


def _create_target(cur: Any, table: TableSpec) -> None:
    """The target with the keys the load needs; secondary indexes come after the data (finalize)."""
    target = qualified(table.schema, table.name)
    if table.mode == "snapshot":
        pk = f", PRIMARY KEY ({_cols(table.key + (PERIOD_COL,))})" if table.key else ""
        cur.execute(f"CREATE TABLE {target} ({_column_ddl(table)}, {quote_ident(PERIOD_COL)} integer NOT NULL{pk}) "
                    f"PARTITION BY LIST ({quote_ident(PERIOD_COL)})")
    elif table.mode == "merge":
        history = "".join(f", {quote_ident(c)} date" for c in HISTORY_COLS) if table.history else ""
        cur.execute(f"CREATE TABLE {target} ({_column_ddl(table)}{history}, PRIMARY KEY ({_cols(table.key)}))")
    else:  # append, replace: no constraints during the load; replace builds them at the swap
        cur.execute(f"CREATE TABLE {target} ({_column_ddl(table)})")


PG_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL truncates longer names (silently, or fails later)


def derived_identifiers(table: TableSpec) -> List[str]:
    """Every name loadkit derives from the table's for its mode: staging, shadow, partition, keys, indexes."""
    names = [table.name]
    if table.mode != "append":
        names += [table.load_table, table.load_schema]
    if table.mode == "replace":
        names += [f"{table.name}__lk_new", f"{table.name}__lk_new_pkey", f"{table.name}_pkey"]
    if table.mode == "snapshot":
        part = f"{table.name}__p{table.period_tag}"
        names += [part, f"{part}__lk_new", f"{part}__lk_new_pkey", f"{part}__lk_new_period", f"{part}_pkey"]
    return names


def validate_identifiers(table: TableSpec) -> None:
    """Refuse, before any SQL, a table whose derived names PostgreSQL would truncate (and later trip on)."""
    key = f"job.tables.{table.name}"
    for name in derived_identifiers(table):
        if len(name.encode("utf-8")) > PG_IDENTIFIER_BYTES:
            raise ConfigError(f"table name {table.name!r} is too long for mode {table.mode}: it derives "
                              f"{name!r} ({len(name.encode('utf-8'))} bytes, PostgreSQL allows "
                              f"{PG_IDENTIFIER_BYTES}); use a name of at most "
                              f"{len(table.name) - (len(name.encode('utf-8')) - PG_IDENTIFIER_BYTES)} characters",
                              key=key)
    bases = [n for n in derived_identifiers(table) if not n.endswith(("_pkey", "_period"))]
    indexes = [_index_name(on, cols) for on in bases for cols in table.indexes]
    if len(set(indexes)) != len(indexes):
        raise ConfigError(f"table {table.name!r}: index names collide once cut to {PG_IDENTIFIER_BYTES} bytes; "
                          "use a shorter table name", key=key)


def drop_staging(cur: Any, table: TableSpec) -> None:
    """Drop the table's staging (nothing of this month is waiting in it): no litter in the target schema."""
    if table.mode != "append":
        cur.execute(f"DROP TABLE IF EXISTS {qualified(table.load_schema, table.load_table)}")


def _index_name(on: str, cols: Tuple[str, ...]) -> str:
    return f"{on}__{'_'.join(cols)}_idx"[:63]


def _create_indexes(cur: Any, table: TableSpec, on: str) -> None:
    for cols in table.indexes:
        cur.execute(f"CREATE INDEX IF NOT EXISTS {quote_ident(_index_name(on, cols))} "
                    f"ON {qualified(table.schema, on)} ({_cols(cols)})")


def verify_staging(cur: Any, table: TableSpec, ledger_schema: str, period: str) -> List[ledger.StagedBatch]:
    """Compare staging with the ledger per batch; forget (and return) the batches whose rows are gone.

    Crash recovery empties UNLOGGED tables (and a staging table is dropped when the
    declaration changed), while the ledger still says those batches committed. Forgetting
    them (their ledger rows, rejects and any partial staged rows) makes the next read take
    their byte ranges again. Staged rows of batches the ledger does not know are deleted
    too. Runs before every resume and, in the publishing transaction, before every
    finalisation, so nothing is published from a staging table that lost rows.
    """
    if table.mode == "append":
        return []
    expected = ledger.unpublished_batch_rows(cur, ledger_schema, table.name, period)
    stage = qualified(table.load_schema, table.load_table)
    cur.execute("SELECT to_regclass(%s)", (stage,))
    if cur.fetchone()[0] is None:
        staged: Dict[int, int] = {}
    else:
        cur.execute(f"SELECT {quote_ident(BATCH_COL)}, count(*) FROM {stage} GROUP BY 1")
        staged = {int(b): int(n) for b, n in cur.fetchall()}
    lost = [b for b, sb in expected.items() if staged.get(b, 0) != sb.rows_loaded]
    orphans = [b for b in staged if b not in expected]
    if (lost or orphans) and staged:
        cur.execute(f"DELETE FROM {stage} WHERE {quote_ident(BATCH_COL)} = ANY(%s)", (lost + orphans,))
    if not lost:
        return []
    ledger.forget_batches(cur, ledger_schema, lost)
    rows = sum(expected[b].rows_loaded for b in lost)
    log.warning("%s: %d committed batch(es) with %d rows are missing from staging %s (crash recovery empties "
                "UNLOGGED tables); they will be read again", table.name, len(lost), rows, table.load_table)
    return [expected[b] for b in lost]


def forget_lost_batches(cur: Any, table: TableSpec, ledger_schema: str, period: str) -> Tuple[int, int]:
    """verify_staging, summarised: (batches, rows) forgotten."""
    lost = verify_staging(cur, table, ledger_schema, period)
    return len(lost), sum(b.rows_loaded for b in lost)


def reset(cur: Any, table: TableSpec, ledger_schema: str, period: str) -> None:
    """force=true: remove what earlier runs of this month loaded, so the reload does not duplicate it."""
    ids = ledger.batch_ids_of(cur, ledger_schema, table.name, period)
    if table.mode == "append" and ids:
        cur.execute(f"DELETE FROM {qualified(table.schema, table.name)} WHERE {quote_ident(BATCH_COL)} = ANY(%s)",
                    (ids,))
    if table.mode != "append":
        cur.execute(f"TRUNCATE {qualified(table.load_schema, table.load_table)}")
    ledger.forget(cur, ledger_schema, table.name, period)


def discard_file(cur: Any, table: TableSpec, ledger_schema: str, period: str, file_sha: str) -> None:
    """Remove every committed batch of one failed file (data and ledger) in one transaction.

    Its first ledger.REJECTS_KEPT_PER_FILE rejects stay, marked discarded, so the failed run
    shows why (a reject threshold, say) in the ledger and in its MLflow reject sample."""
    ids = ledger.batch_ids_of(cur, ledger_schema, table.name, period, file_sha)
    if ids:
        cur.execute(f"DELETE FROM {qualified(table.load_schema, table.load_table)} "
                    f"WHERE {quote_ident(BATCH_COL)} = ANY(%s)",
                    (ids,))
    ledger.forget(cur, ledger_schema, table.name, period, file_sha, keep_rejects=ledger.REJECTS_KEPT_PER_FILE)


# ---------------------------------------------------------------- after the load


def _published_names(table: TableSpec) -> Tuple[str, ...]:
    return tuple(n for n, _ in _declared(table)) + (BATCH_COL,)


def _dedup_select(table: TableSpec, ledger_schema: str, extra: str = "") -> str:
    """Staged rows, one per key when a key is declared: the last file, offset and row win."""
    cols = ", ".join(f"s.{quote_ident(n)}" for n in _published_names(table))
    stage = qualified(table.load_schema, table.load_table)
    if not table.key:
        return f"SELECT {cols}{extra} FROM {stage} s"
    batch = qualified(ledger_schema, "batch")
    key = ", ".join(f"s.{quote_ident(k)}" for k in table.key)
    order_tail = f"b.file_ordinal DESC, b.start_offset DESC, s.{quote_ident(ROW_COL)} DESC"
    return (f"SELECT DISTINCT ON ({key}) {cols}{extra} FROM {stage} s "
            f"JOIN {batch} b ON b.batch_id = s.{quote_ident(BATCH_COL)} ORDER BY {key}, {order_tail}")


def finalize(cur: Any, table: TableSpec, ledger_schema: str) -> Tuple[Optional[int], Optional[int]]:
    """Publish the staged rows per the table's mode. Returns (inserted, updated) where meaningful."""
    if table.mode == "append":
        with step("indexes", table.name):
            _create_indexes(cur, table, table.name)
        return None, None
    if table.mode == "merge":
        return _finalize_merge(cur, table, ledger_schema)
    if table.mode == "replace":
        return _finalize_replace(cur, table, ledger_schema)
    return _finalize_snapshot(cur, table, ledger_schema)


def _finalize_merge(cur: Any, table: TableSpec, ledger_schema: str) -> Tuple[int, int]:
    names = _published_names(table)
    target = qualified(table.schema, table.name)
    updates = ", ".join(f"{quote_ident(n)} = EXCLUDED.{quote_ident(n)}" for n in names if n not in table.key)
    # xmax = 0 only on a freshly inserted tuple: the standard way to tell inserts from updates.
    with step("upsert", table.name):  # dedup + insert/update in one statement
        cur.execute(
            f"WITH up AS (INSERT INTO {target} ({_cols(names)}) {_dedup_select(table, ledger_schema)} "
            f"ON CONFLICT ({_cols(table.key)}) DO UPDATE SET {updates} RETURNING (xmax = 0) AS inserted) "
            "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up"
        )
        inserted, updated = cur.fetchone()
    with step("drop_staging", table.name):
        cur.execute(f"DROP TABLE {qualified(table.load_schema, table.load_table)}")  # published: no litter left
    with step("indexes", table.name):
        _create_indexes(cur, table, table.name)
    with step("analyze", table.name):
        cur.execute(f"ANALYZE {target}")
    return int(inserted), int(updated)


def _finalize_replace(cur: Any, table: TableSpec, ledger_schema: str) -> Tuple[int, None]:
    """Build the shadow while readers keep the old table, then swap: they block only for the rename."""
    new = f"{table.name}__lk_new"
    _build_shadow(cur, table, ledger_schema, like=table.name, name=new)
    with step("swap", table.name):
        cur.execute(f"DROP TABLE {qualified(table.schema, table.name)}")
        cur.execute(f"ALTER TABLE {qualified(table.schema, new)} RENAME TO {quote_ident(table.name)}")
        _rename_indexes(cur, table, new, table.name)
    with step("drop_staging", table.name):
        cur.execute(f"DROP TABLE {qualified(table.load_schema, table.load_table)}")
    with step("count", table.name):
        cur.execute(f"SELECT count(*) FROM {qualified(table.schema, table.name)}")
    return int(cur.fetchone()[0]), None


def _build_shadow(cur: Any, table: TableSpec, ledger_schema: str, like: str, name: str,
                  period_tag: Optional[int] = None) -> None:
    """A fresh table shaped like ``like`` (migrations included), filled from staging, then PK, indexes, ANALYZE."""
    shadow = qualified(table.schema, name)
    names = _published_names(table) + ((PERIOD_COL,) if period_tag is not None else ())
    extra = f", {period_tag}" if period_tag is not None else ""
    with step("insert", table.name):  # dedup into a fresh shadow table
        cur.execute(f"DROP TABLE IF EXISTS {shadow}")
        cur.execute(f"CREATE TABLE {shadow} (LIKE {qualified(table.schema, like)} INCLUDING DEFAULTS)")
        cur.execute(f"INSERT INTO {shadow} ({_cols(names)}) {_dedup_select(table, ledger_schema, extra)}")
    if table.key:
        pk_cols = table.key + ((PERIOD_COL,) if period_tag is not None else ())
        with step("primary_key", table.name):
            cur.execute(f"ALTER TABLE {shadow} ADD CONSTRAINT {quote_ident(name + '_pkey')} "
                        f"PRIMARY KEY ({_cols(pk_cols)})")
    with step("indexes", table.name):
        _create_indexes(cur, table, name)
    with step("analyze", table.name):
        cur.execute(f"ANALYZE {shadow}")


def _rename_indexes(cur: Any, table: TableSpec, old: str, new: str) -> None:
    if table.key:
        cur.execute(f"ALTER INDEX {qualified(table.schema, old + '_pkey')} RENAME TO {quote_ident(new + '_pkey')}")
    for cols in table.indexes:
        cur.execute(f"ALTER INDEX {qualified(table.schema, _index_name(old, cols))} "
                    f"RENAME TO {quote_ident(_index_name(new, cols))}")


def _finalize_snapshot(cur: Any, table: TableSpec, ledger_schema: str) -> Tuple[int, None]:
    """Build the month's partition aside, then detach/drop the old one and attach the new one."""
    tag = int(table.period_tag)
    part = f"{table.name}__p{tag}"
    new = f"{part}__lk_new"
    parent = qualified(table.schema, table.name)
    _build_shadow(cur, table, ledger_schema, like=table.name, name=new, period_tag=tag)
    # The CHECK lets ATTACH skip its validation scan of the new partition.
    with step("check_constraint", table.name):
        cur.execute(f"ALTER TABLE {qualified(table.schema, new)} ADD CONSTRAINT {quote_ident(new + '_period')} "
                    f"CHECK ({quote_ident(PERIOD_COL)} = {tag})")
    with step("swap", table.name):  # the old partition out, the shadow renamed in its place
        cur.execute("SELECT to_regclass(%s)", (qualified(table.schema, part),))
        if cur.fetchone()[0] is not None:
            cur.execute(f"ALTER TABLE {parent} DETACH PARTITION {qualified(table.schema, part)}")
            cur.execute(f"DROP TABLE {qualified(table.schema, part)}")
        cur.execute(f"ALTER TABLE {qualified(table.schema, new)} RENAME TO {quote_ident(part)}")
        _rename_indexes(cur, table, new, part)
    with step("attach", table.name):
        cur.execute(f"ALTER TABLE {parent} ATTACH PARTITION {qualified(table.schema, part)} FOR VALUES IN ({tag})")
    with step("parent_indexes", table.name):
        _create_indexes(cur, table, table.name)
    with step("drop_staging", table.name):
        cur.execute(f"DROP TABLE {qualified(table.load_schema, table.load_table)}")
    with step("count", table.name):
        cur.execute(f"SELECT count(*) FROM {qualified(table.schema, part)}")
    return int(cur.fetchone()[0]), None


# ---------------------------------------------------------------- full-snapshot sync (merge + delete_missing)


def _seen_since(ledger_schema: str) -> str:
    """SQL: target row ``t`` was last written by a batch of this table in this month or a later one.

    Every key present in a month is upserted by one of that month's batches, which sets the row's
    batch column, so a row whose batch belongs to an older month (or to no batch the ledger still
    knows) is a key the month no longer has. Rows a newer month wrote are never touched.
    """
    batch = qualified(ledger_schema, "batch")
    return (f"EXISTS (SELECT 1 FROM {batch} b WHERE b.batch_id = t.{quote_ident(BATCH_COL)} "
            "AND b.table_name = %s AND b.period >= %s)")


def month_complete(cur: Any, table: TableSpec, ledger_schema: str, period: str) -> bool:
    """True when every file of the table's month is published ('loaded') in the ledger."""
    done = ledger.loaded_files(cur, ledger_schema, table.name, period)
    return bool(table.files) and all(done.get(f.sha256) == "loaded" for f in table.files)


def fewer_files_than_before(cur: Any, table: TableSpec, ledger_schema: str, period: str) -> Optional[int]:
    """The file count of the latest earlier month of this table, if it had more files than this month.

    A month that arrives with fewer shards than the one before is more likely an incomplete download
    than a smaller snapshot; syncing it would delete every key of the missing shards.
    """
    f = qualified(ledger_schema, "file")
    cur.execute(f"SELECT count(*) FROM {f} WHERE table_name=%s AND status='loaded' AND period = "
                f"(SELECT max(period) FROM {f} WHERE table_name=%s AND period < %s AND status='loaded')",
                (table.name, table.name, period))
    before = int(cur.fetchone()[0])
    return before if before > len(table.files) else None


def sync_done(cur: Any, ledger_schema: str, table: str, period: str) -> bool:
    """True if a run already synced this table's month (table_load.deleted is set only by a sync)."""
    cur.execute(f"SELECT 1 FROM {qualified(ledger_schema, 'table_load')} WHERE table_name=%s AND period=%s "
                "AND deleted IS NOT NULL LIMIT 1", (table, period))
    return cur.fetchone() is not None


def open_history(cur: Any, table: TableSpec, ledger_schema: str, period: str, month_start: Any) -> int:
    """history=true, after every merge: rows this month wrote that are new or had been closed get
    valid_from = month_start and valid_to = NULL. Returns the rows (re)opened."""
    target = qualified(table.schema, table.name)
    frm, to = (quote_ident(c) for c in HISTORY_COLS)
    with step("open_history", table.name):
        cur.execute(f"UPDATE {target} t SET {frm} = %s, {to} = NULL WHERE (t.{to} IS NOT NULL OR t.{frm} IS NULL) "
                    f"AND {_seen_since(ledger_schema)}", (month_start, table.name, period))
    return int(cur.rowcount or 0)


def sync_missing(cur: Any, table: TableSpec, ledger_schema: str, period: str, month_start: Any) -> int:
    """Delete (history=false) or close (history=true: valid_to = month_start) the target rows whose key
    the month no longer has. Returns the rows deleted or closed.

    The caller runs it in the finalisation's transaction, and only once every file of the table's
    month is published and no file of the run failed: a partial month would delete keys that are
    merely not loaded yet.
    """
    target = qualified(table.schema, table.name)
    with step("sync_missing", table.name):
        if table.history:
            to = quote_ident(HISTORY_COLS[1])
            cur.execute(f"UPDATE {target} t SET {to} = %s WHERE t.{to} IS NULL AND NOT {_seen_since(ledger_schema)}",
                        (month_start, table.name, period))
        else:
            cur.execute(f"DELETE FROM {target} t WHERE NOT {_seen_since(ledger_schema)}", (table.name, period))
    gone = int(cur.rowcount or 0)
    log.info("%s: %d row(s) %s: their keys are absent from %s", table.name, gone,
             "closed" if table.history else "deleted", period)
    return gone
