"""Write modes, one class each: target/staging DDL before the load, schema checks, and the
finalisation after it. ``mode_for(table)`` picks the class from the config's mode name (MODES).

- Append:   batches COPY straight into the target; secondary indexes are built after the load.
- Merge:    batches COPY into an UNLOGGED staging table; finalize keeps one row per key. Into an
            empty target it inserts with no primary key/indexes and adds them after; otherwise it
            inserts new keys and rewrites only rows that differ (IS DISTINCT FROM), reporting
            inserted / updated / unchanged.
- Sync:     merge with ``delete_missing`` (each period is a full snapshot): after the upsert,
            keys the period no longer has are deleted (or closed, with ``history``).
- Replace:  batches COPY into staging; finalize builds a shadow table from it, adds PK and
            indexes after the data, ANALYZEs it and swaps it in, all in one transaction.
- Snapshot: like replace, for one LIST partition (ref_period = YYYYMM) of a partitioned target.

Duplicate keys (merge, replace, snapshot) are resolved deterministically: the last file of the
table's sorted file list wins, then the last batch (byte offset) in it, then the last row in the
batch -- i.e. "last shard wins, last record wins", the same in every run.

Staging is UNLOGGED (no WAL: about half the write I/O). PostgreSQL empties UNLOGGED tables in
crash recovery while the ledger still says their batches committed, so ``verify_staging``
compares staged rows per batch with the ledger before every resume and again inside every
publishing transaction, and forgets what was lost so it is read again (never published short).

Every finalisation runs in the caller's transaction, together with marking the files loaded.
The ledger statements a mode needs go through the ``Ledger`` it is given.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass, field
from datetime import date
from typing import Any, ClassVar, Dict, Iterator, List, NamedTuple, Optional, Tuple, Type

from loadkit.postgres.ledger import REJECTS_KEPT_PER_FILE, Ledger, StagedBatch
from loadkit.errors import ConfigError
from loadkit.plan import BATCH_COL, PERIOD_COL, ROW_COL, ColumnSpec, MigratePolicy, TableSpec
from loadkit.security import qualified, quote_ident

log = logging.getLogger("loadkit.postgres.modes")

# Columns a merge table with history=true carries besides its declared ones (see Sync).
HISTORY_COLS = ("valid_from", "valid_to")

# Finalisation step timings: ``record_steps`` collects what ``step`` measures (see below).
_steps: contextvars.ContextVar[Optional[Dict[str, float]]] = contextvars.ContextVar("loadkit_steps", default=None)
SLOW_STEP_S = 1.0  # a finalisation step that takes longer is logged at INFO

# A merge reload ANALYZEs the target only when it wrote (inserted + updated) at least 1/10 of the keys it
# published, autovacuum's default analyze threshold: an unchanged month skips a ~1 µs/row sample read.
ANALYZE_WRITTEN_SHARE_INV = 10

PG_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL truncates longer names (silently, or fails later)


@contextlib.contextmanager
def record_steps() -> Iterator[Dict[str, float]]:
    """Collect the seconds of every ``step`` run inside the block: {step name: seconds}, in the order
    run (a step run twice adds up). The caller (the sink) keeps them in TableMetrics.finalise_steps."""
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
        return f"{base}({col.length}){col.collate}"
    if col.kind == "numeric":
        return f"numeric({col.precision},{col.scale})"
    return base + col.collate


def _cols(names: Tuple[str, ...]) -> str:
    return ", ".join(quote_ident(n) for n in names)


def _index_name(on: str, cols: Tuple[str, ...]) -> str:
    return f"{on}__{'_'.join(cols)}_idx"[:63]


class Published(NamedTuple):
    """What a finalisation published, in rows (None: the mode does not tell). For merge, every distinct
    staged key is exactly one of inserted (new key), updated (key present, some published column --
    ``_lk_batch`` included -- differed) or unchanged (key present, every column equal: not rewritten);
    staged rows beyond one per key are the duplicates (the sink counts them). Replace/snapshot report
    the rows the new table/partition holds as ``inserted``."""

    inserted: Optional[int]
    updated: Optional[int] = None
    unchanged: Optional[int] = None


# ---------------------------------------------------------------- what the database has


def existing_columns(cur: Any, schema: str, name: str) -> Optional[Dict[str, str]]:
    """column -> format_type of an existing table, or None if there is no such table. A column whose
    collation is not its type's default gets ' COLLATE "<name>"' appended (as canonical_type spells a
    declared one), so a collation differs like a type does."""
    cur.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attcollation <> 0 "
        "AND a.attcollation <> t.typcollation THEN ' COLLATE \"' || co.collname || '\"' ELSE '' END "
        "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_type t ON t.oid = a.atttypid LEFT JOIN pg_collation co ON co.oid = a.attcollation "
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
    expected = mode_for(table).target_columns()
    return SchemaDiff(
        missing={c: ddl for c, (ddl, _) in expected.items() if c not in actual},
        extra={c: t for c, t in actual.items() if c not in expected},
        changed={c: (actual[c], canon, ddl) for c, (ddl, canon) in expected.items()
                 if c in actual and actual[c] != canon},
    )


# ---------------------------------------------------------------- the modes


class WriteMode:
    """One table's write mode: what the load writes into, and how the load is published.

    The base class is a staged mode (batches COPY into UNLOGGED staging, the finalisation
    publishes them); Append overrides that. Construct through ``mode_for(table)``."""

    name: ClassVar[str]
    staged: ClassVar[bool] = True  # batches go to staging; the finalisation publishes them
    # A publish rebuilds the whole period from every file: a new file in a published period reloads all.
    whole_period: ClassVar[bool] = False
    partitioned: ClassVar[bool] = False  # the target is LIST-partitioned by PERIOD_COL
    # identity: a later period's batches legitimately overwrite this period's rows in the target.
    overwritten_later: ClassVar[bool] = False

    def __init__(self, table: TableSpec) -> None:
        self.table = table

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.table.name!r})"

    # ------------------------------------------------------------ shape

    def declared(self) -> List[Tuple[str, str]]:
        """(name, DDL type) of the data columns, derived key included."""
        t = self.table
        cols = [(c.name, c.sql_type + c.collate) for c in t.columns]
        if t.derived_key:
            cols.append((t.derived_key[0], "text"))
        return cols

    def target_columns(self) -> Dict[str, Tuple[str, str]]:
        """name -> (DDL type, format_type spelling) of every column the target must have."""
        t = self.table
        out = {c.name: (c.sql_type + c.collate, canonical_type(c)) for c in t.columns}
        if t.derived_key:
            out[t.derived_key[0]] = ("text", "text")
        out[BATCH_COL] = ("bigint", "bigint")
        return out

    def staging_columns(self) -> Dict[str, str]:
        out = {n: t for n, (_, t) in self.target_columns().items() if n != PERIOD_COL and n not in HISTORY_COLS}
        out[ROW_COL] = "integer"
        return out

    def column_ddl(self) -> str:
        cols = [f"{quote_ident(n)} {t}" for n, t in self.declared()]
        return ", ".join(cols + [f"{quote_ident(BATCH_COL)} bigint"])

    def published_names(self) -> Tuple[str, ...]:
        return tuple(n for n, _ in self.declared()) + (BATCH_COL,)

    def derived_identifiers(self) -> List[str]:
        """Every name loadkit derives from the table's for this mode: staging, shadow, partition, keys, indexes."""
        return [self.table.name, self.table.load_table, self.table.load_schema]

    def validate_identifiers(self) -> None:
        """Refuse, before any SQL, a table whose derived names PostgreSQL would truncate (and later trip on)."""
        table = self.table
        key = f"job.tables.{table.name}"
        for name in self.derived_identifiers():
            size = len(name.encode("utf-8"))
            if size > PG_IDENTIFIER_BYTES:
                raise ConfigError(f"table name {table.name!r} is too long for mode {table.mode}: it derives "
                                  f"{name!r} ({size} bytes, PostgreSQL allows {PG_IDENTIFIER_BYTES}); use a name "
                                  f"of at most {len(table.name) - (size - PG_IDENTIFIER_BYTES)} characters", key=key)
        bases = [n for n in self.derived_identifiers() if not n.endswith(("_pkey", "_period"))]
        indexes = [_index_name(on, cols) for on in bases for cols in table.indexes]
        if len(set(indexes)) != len(indexes):
            raise ConfigError(f"table {table.name!r}: index names collide once cut to {PG_IDENTIFIER_BYTES} bytes; "
                              "use a shorter table name", key=key)

    # ------------------------------------------------------------ before the load

    def prepare(self, cur: Any, migrate: MigratePolicy) -> None:
        """Create the target (and staging) if missing; reconcile an existing target with the declaration.

        A target that differs stops the run with the full diff unless ``migrate`` (add_columns,
        alter_types, allow_extra_columns) allows each difference: missing columns are added, changed
        types converted, extra columns kept.
        """
        table = self.table
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(table.schema)}")
        actual = existing_columns(cur, table.schema, table.name)
        if actual is None:
            self.create_target(cur)
        else:
            self.check_shape(cur)
            diff = schema_diff(table, actual)
            if diff:
                self._migrate(cur, diff, migrate)
        if self.staged:
            self._prepare_staging(cur)

    def create_target(self, cur: Any) -> None:
        """The target without constraints during the load (replace builds them at the swap)."""
        cur.execute(f"CREATE TABLE {qualified(self.table.schema, self.table.name)} ({self.column_ddl()})")

    def check_shape(self, cur: Any) -> None:
        """Differences no column migration can fix (partitioning, the upsert key)."""
        t = self.table
        partitioned = _is_partitioned(cur, t.schema, t.name)
        if partitioned != self.partitioned:
            raise ConfigError(f"table {t.schema}.{t.name} is {'' if partitioned else 'not '}partitioned by "
                              f"{PERIOD_COL}, but mode is {t.mode}: changing to or from snapshot needs a new table "
                              "(rename or drop it)", key=f"job.tables.{t.name}.mode")

    def _migrate(self, cur: Any, diff: SchemaDiff, migrate: MigratePolicy) -> None:
        table = self.table
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
            cur.execute(f"ALTER TABLE {target} ALTER COLUMN {quote_ident(col)} TYPE {ddl} "
                        f"USING {quote_ident(col)}::{ddl}")
        if diff.extra:
            log.warning("keeping undeclared columns of %s.%s (loads leave them NULL or default): %s",
                        table.schema, table.name, ", ".join(diff.extra))

    def _prepare_staging(self, cur: Any) -> None:
        """UNLOGGED staging of the declared shape; one left by another declaration is dropped (its batches
        reload)."""
        table = self.table
        stage = qualified(table.load_schema, table.load_table)
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(table.load_schema)}")
        # Staging of an older loadkit lived in the target schema: drop it (its batches are found missing
        # from the new staging and read again), so nothing of loadkit's stays in the user's schema.
        cur.execute(f"DROP TABLE IF EXISTS {qualified(table.schema, table.load_table)}")
        actual = existing_columns(cur, table.load_schema, table.load_table)
        if actual is not None and actual != self.staging_columns():
            log.warning("staging table %s.%s does not match the declaration; dropping it, its batches will reload",
                        table.load_schema, table.load_table)
            cur.execute(f"DROP TABLE {stage}")
        cur.execute(f"CREATE UNLOGGED TABLE IF NOT EXISTS {stage} ({self.column_ddl()}, "
                    f"{quote_ident(ROW_COL)} integer)")

    def drop_staging(self, cur: Any) -> None:
        """Drop the table's staging (nothing of this period is waiting in it): no litter left."""
        cur.execute(f"DROP TABLE IF EXISTS {qualified(self.table.load_schema, self.table.load_table)}")

    def verify_staging(self, cur: Any, ledger: Ledger, period: str) -> List[StagedBatch]:
        """Compare staging with the ledger per batch; forget (and return) the batches whose rows are gone.

        Crash recovery empties UNLOGGED tables (and a staging table is dropped when the
        declaration changed), while the ledger still says those batches committed. Forgetting
        them (their ledger rows, rejects and any partial staged rows) makes the next read take
        their byte ranges again. Staged rows of batches the ledger does not know are deleted
        too. Runs before every resume and, in the publishing transaction, before every
        finalisation, so nothing is published from a staging table that lost rows.
        """
        table = self.table
        expected = ledger.unpublished_batch_rows(cur, table.name, period)
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
        ledger.forget_batches(cur, lost)
        rows = sum(expected[b].rows_loaded for b in lost)
        log.warning("%s: %d committed batch(es) with %d rows are missing from staging %s (crash recovery empties "
                    "UNLOGGED tables); they will be read again", table.name, len(lost), rows, table.load_table)
        return [expected[b] for b in lost]

    def forget_lost_batches(self, cur: Any, ledger: Ledger, period: str) -> Tuple[int, int]:
        """verify_staging, summarised: (batches, rows) forgotten."""
        lost = self.verify_staging(cur, ledger, period)
        return len(lost), sum(b.rows_loaded for b in lost)

    def reset(self, cur: Any, ledger: Ledger, period: str) -> None:
        """force=true: remove what earlier runs of this period loaded, so the reload does not duplicate it."""
        cur.execute(f"TRUNCATE {qualified(self.table.load_schema, self.table.load_table)}")
        ledger.forget(cur, self.table.name, period)

    def discard_file(self, cur: Any, ledger: Ledger, period: str, file_sha: str) -> None:
        """Remove every committed batch of one failed file (data and ledger) in one transaction.

        Its first REJECTS_KEPT_PER_FILE rejects stay, marked discarded, so the failed run shows
        why (a reject threshold, say) in the ledger and in its MLflow reject sample."""
        table = self.table
        ids = ledger.batch_ids_of(cur, table.name, period, file_sha)
        if ids:
            cur.execute(f"DELETE FROM {qualified(table.load_schema, table.load_table)} "
                        f"WHERE {quote_ident(BATCH_COL)} = ANY(%s)", (ids,))
        ledger.forget(cur, table.name, period, file_sha, keep_rejects=REJECTS_KEPT_PER_FILE)

    # ------------------------------------------------------------ after the load

    @property
    def settled_status(self) -> str:
        """The ledger status of a file whose batches all committed: 'staged' until the finalisation
        publishes it, 'loaded' where committing is publishing (append)."""
        return "staged" if self.staged else "loaded"

    def finalize(self, cur: Any, ledger: Ledger) -> Published:
        """Publish the staged rows; returns what was published (see Published)."""
        raise NotImplementedError

    def sync(self, cur: Any, ledger: Ledger, period: str, month_start: Optional[date],
             files_failed: bool) -> Optional[int]:
        """After publishing, in the same transaction: remove what the period no longer has. Only Sync
        does anything; None means no sync ran."""
        return None

    def _dedup_select(self, ledger: Ledger, extra: str = "") -> str:
        """Staged rows, one per key when a key is declared: the last file, offset and row win."""
        table = self.table
        cols = ", ".join(f"s.{quote_ident(n)}" for n in self.published_names())
        stage = qualified(table.load_schema, table.load_table)
        if not table.key:
            return f"SELECT {cols}{extra} FROM {stage} s"
        key = ", ".join(f"s.{quote_ident(k)}" for k in table.key)
        order_tail = f"b.file_ordinal DESC, b.start_offset DESC, s.{quote_ident(ROW_COL)} DESC"
        return (f"SELECT DISTINCT ON ({key}) {cols}{extra} FROM {stage} s "
                f"JOIN {ledger.batch} b ON b.batch_id = s.{quote_ident(BATCH_COL)} ORDER BY {key}, {order_tail}")

    def _create_indexes(self, cur: Any, on: str) -> None:
        for cols in self.table.indexes:
            cur.execute(f"CREATE INDEX IF NOT EXISTS {quote_ident(_index_name(on, cols))} "
                        f"ON {qualified(self.table.schema, on)} ({_cols(cols)})")

    def _rename_indexes(self, cur: Any, old: str, new: str) -> None:
        table = self.table
        if table.key:
            cur.execute(f"ALTER INDEX {qualified(table.schema, old + '_pkey')} RENAME TO {quote_ident(new + '_pkey')}")
        for cols in table.indexes:
            cur.execute(f"ALTER INDEX {qualified(table.schema, _index_name(old, cols))} "
                        f"RENAME TO {quote_ident(_index_name(new, cols))}")

    def _build_shadow(self, cur: Any, ledger: Ledger, like: str, name: str, period_tag: Optional[int] = None) -> None:
        """A fresh table shaped like ``like`` (migrations included), filled from staging, then PK, indexes,
        ANALYZE."""
        table = self.table
        shadow = qualified(table.schema, name)
        names = self.published_names() + ((PERIOD_COL,) if period_tag is not None else ())
        extra = f", {period_tag}" if period_tag is not None else ""
        with step("insert", table.name):  # dedup into a fresh shadow table
            cur.execute(f"DROP TABLE IF EXISTS {shadow}")
            cur.execute(f"CREATE TABLE {shadow} (LIKE {qualified(table.schema, like)} INCLUDING DEFAULTS)")
            cur.execute(f"INSERT INTO {shadow} ({_cols(names)}) {self._dedup_select(ledger, extra)}")
        if table.key:
            pk_cols = table.key + ((PERIOD_COL,) if period_tag is not None else ())
            with step("primary_key", table.name):
                cur.execute(f"ALTER TABLE {shadow} ADD CONSTRAINT {quote_ident(name + '_pkey')} "
                            f"PRIMARY KEY ({_cols(pk_cols)})")
        with step("indexes", table.name):
            self._create_indexes(cur, name)
        with step("analyze", table.name):
            cur.execute(f"ANALYZE {shadow}")


class Append(WriteMode):
    """Batches COPY straight into the target; committing a batch publishes it."""

    name = "append"
    staged = False

    def derived_identifiers(self) -> List[str]:
        return [self.table.name]

    def drop_staging(self, cur: Any) -> None:
        return None  # there is none

    def verify_staging(self, cur: Any, ledger: Ledger, period: str) -> List[StagedBatch]:
        return []  # the target is logged: nothing to lose

    def reset(self, cur: Any, ledger: Ledger, period: str) -> None:
        ids = ledger.batch_ids_of(cur, self.table.name, period)
        if ids:
            cur.execute(f"DELETE FROM {qualified(self.table.schema, self.table.name)} "
                        f"WHERE {quote_ident(BATCH_COL)} = ANY(%s)", (ids,))
        ledger.forget(cur, self.table.name, period)

    def finalize(self, cur: Any, ledger: Ledger) -> Published:
        with step("indexes", self.table.name):
            self._create_indexes(cur, self.table.name)
        return Published(None)


class Merge(WriteMode):
    """Upsert the staged rows (one per key, the last wins) into a target keyed by ``key``."""

    name = "merge"
    overwritten_later = True

    def create_target(self, cur: Any) -> None:
        t = self.table
        history = "".join(f", {quote_ident(c)} date" for c in HISTORY_COLS) if t.history else ""
        cur.execute(f"CREATE TABLE {qualified(t.schema, t.name)} ({self.column_ddl()}{history}, "
                    f"PRIMARY KEY ({_cols(t.key)}))")

    def check_shape(self, cur: Any) -> None:
        super().check_shape(cur)
        t = self.table
        if not _has_unique_on(cur, t.schema, t.name, t.key):
            raise ConfigError(f"table {t.schema}.{t.name} has no primary key or unique index on {list(t.key)}, which "
                              "mode merge needs for its upsert: add one, or load it once with mode replace",
                              key=f"job.tables.{t.name}.mode")

    def finalize(self, cur: Any, ledger: Ledger) -> Published:
        """Publish one row per staged key (the last wins): a first load into an empty target inserts
        without the primary key and adds it after; otherwise only new keys are inserted and only rows
        that differ are rewritten. Everything in the caller's (publishing) transaction."""
        table = self.table
        target = qualified(table.schema, table.name)
        first = self._empty_and_locked(cur)
        published = self._first_load(cur, ledger) if first else self._reload(cur, ledger)
        with step("drop_staging", table.name):
            cur.execute(f"DROP TABLE {qualified(table.load_schema, table.load_table)}")  # published: no litter left
        with step("indexes", table.name):
            self._create_indexes(cur, table.name)
        written = (published.inserted or 0) + (published.updated or 0)
        if first or written * ANALYZE_WRITTEN_SHARE_INV >= written + (published.unchanged or 0):
            with step("analyze", table.name):  # else autovacuum's own threshold (10% changed) covers it
                cur.execute(f"ANALYZE {target}")
        return published

    def _empty_and_locked(self, cur: Any) -> bool:
        """True if the target is empty, then held ACCESS EXCLUSIVE until the transaction ends (so it stays
        empty and its primary key can be dropped and re-added). A target with rows is not locked beyond
        what the reload's statements take, so readers keep reading it."""
        target = qualified(self.table.schema, self.table.name)
        cur.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {target})")
        if not cur.fetchone()[0]:
            return False
        cur.execute(f"LOCK TABLE {target} IN ACCESS EXCLUSIVE MODE")
        cur.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {target})")  # a writer may have committed in between
        return bool(cur.fetchone()[0])

    def _droppable_pkey(self, cur: Any) -> Optional[Tuple[str, str]]:
        """(name, definition) of the target's primary key when it is on exactly the table's key and nothing
        depends on it (no foreign key references it), so dropping and re-adding it in one transaction
        changes nothing a reader can see; None otherwise (the first load then keeps it)."""
        t = self.table
        cur.execute(
            "SELECT con.conname, pg_get_constraintdef(con.oid), "
            "ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = con.conrelid "
            "AND a.attnum = ANY(con.conkey) ORDER BY a.attname), "
            "EXISTS (SELECT 1 FROM pg_constraint f WHERE f.confrelid = con.conrelid AND f.contype = 'f') "
            "FROM pg_constraint con WHERE con.conrelid = %s::regclass AND con.contype = 'p'",
            (qualified(t.schema, t.name),))
        row = cur.fetchone()
        if row is None or sorted(row[2]) != sorted(t.key) or row[3]:
            return None
        return row[0], row[1]

    def _first_load(self, cur: Any, ledger: Ledger) -> Published:
        """Insert the deduplicated rows into the empty (locked) target with no primary key or declared
        index to maintain, then add them back: building a key index over sorted input costs a fraction
        of maintaining it row by row (PK present during the insert: ~2x the CPU). The table keeps its
        OID, grants, comments and dependants; only the constraint and indexes are rebuilt."""
        table = self.table
        target = qualified(table.schema, table.name)
        pkey = self._droppable_pkey(cur)
        with step("insert", table.name):
            if pkey is not None:
                cur.execute(f"ALTER TABLE {target} DROP CONSTRAINT {quote_ident(pkey[0])}")
            for cols in table.indexes:  # rebuilt by _create_indexes after the insert
                cur.execute(f"DROP INDEX IF EXISTS {qualified(table.schema, _index_name(table.name, cols))}")
            cur.execute(f"INSERT INTO {target} ({_cols(self.published_names())}) {self._dedup_select(ledger)}")
            inserted = int(cur.rowcount)
        if pkey is not None:
            with step("primary_key", table.name):
                cur.execute(f"ALTER TABLE {target} ADD CONSTRAINT {quote_ident(pkey[0])} {pkey[1]}")
        return Published(inserted, 0, 0)

    def _changed_sql(self, names: Tuple[str, ...]) -> str:
        """SQL condition: target row ``t`` differs from deduplicated row ``d`` in a published non-key column
        (NULL-safe: NULL -> value and value -> NULL are changes). ``_lk_batch`` is compared too, so every
        row keeps naming the batch of the latest load that delivered it (the full-snapshot sync and the
        identity check rely on that; batch ids are deterministic, so reloading the same files finds
        unchanged rows unchanged). A closed history row (valid_to set) always counts as changed."""
        rest = [n for n in names if n not in self.table.key]
        cond = (f"({', '.join(f't.{quote_ident(n)}' for n in rest)}) IS DISTINCT FROM "
                f"({', '.join(f'd.{quote_ident(n)}' for n in rest)})") if len(rest) > 1 else (
                f"t.{quote_ident(rest[0])} IS DISTINCT FROM d.{quote_ident(rest[0])}")
        if self.table.history:
            cond = f"({cond} OR t.{quote_ident(HISTORY_COLS[1])} IS NOT NULL)"
        return cond

    def _reload(self, cur: Any, ledger: Ledger) -> Published:
        """Into a target that has rows, in one statement over one deduplication: rewrite the rows whose
        key is present and some column differs, insert the keys that are new. Unchanged rows are not
        written at all (no dead tuple, no index entry, no WAL). Exact counts from the statement itself:
        inserted and updated from RETURNING, unchanged = distinct staged keys - inserted - updated (all
        three parts see the same snapshot, and a key is in exactly one)."""
        table = self.table
        names = self.published_names()
        target = qualified(table.schema, table.name)
        rest = [n for n in names if n not in table.key]
        on = " AND ".join(f"t.{quote_ident(k)} = d.{quote_ident(k)}" for k in table.key)
        sets = ", ".join(f"{quote_ident(n)} = d.{quote_ident(n)}" for n in rest)
        picked = ", ".join(f"d.{quote_ident(n)}" for n in names)
        with step("upsert", table.name):
            cur.execute(
                f"WITH d AS MATERIALIZED ({self._dedup_select(ledger)}), "
                f"upd AS (UPDATE {target} t SET {sets} FROM d WHERE {on} AND {self._changed_sql(names)} "
                "RETURNING 1), "
                f"ins AS (INSERT INTO {target} ({_cols(names)}) SELECT {picked} "
                f"FROM d WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE {on}) RETURNING 1) "
                "SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM upd), (SELECT count(*) FROM d)")
            inserted, updated, distinct = (int(v) for v in cur.fetchone())
        return Published(inserted, updated, distinct - inserted - updated)


class Sync(Merge):
    """Merge with ``delete_missing``: each period is a full snapshot of the keys.

    After the upsert (in the same transaction), target rows whose key the period no longer has
    are deleted -- or, with ``history``, closed (valid_to) while rows the period wrote are
    (re)opened (valid_from). Only once every file of the period is published and no file of the
    run failed: a partial period would delete keys that are merely not loaded yet."""

    def target_columns(self) -> Dict[str, Tuple[str, str]]:
        out = super().target_columns()
        if self.table.history:
            out.update({c: ("date", "date") for c in HISTORY_COLS})
        return out

    def sync(self, cur: Any, ledger: Ledger, period: str, month_start: Optional[date],
             files_failed: bool) -> Optional[int]:
        table = self.table
        # config.job_params makes year and month required for a merge table with delete_missing
        assert month_start is not None
        if table.history:
            self.open_history(cur, ledger, period, month_start)
        if files_failed or not self.month_complete(cur, ledger, period):
            log.warning("%s: not deleting keys absent from %s: %s", table.name, period,
                        "a file of this run failed" if files_failed else "not every file of the month is loaded yet")
            return None
        before = ledger.fewer_files_than_before(cur, table.name, period, len(table.files))
        if before is not None:
            log.warning("%s: not deleting keys absent from %s: it has %d file(s), the month before had %d "
                        "(an incomplete download?); add the missing files and run again", table.name, period,
                        len(table.files), before)
            return None
        return self.sync_missing(cur, ledger, period, month_start)

    def month_complete(self, cur: Any, ledger: Ledger, period: str) -> bool:
        """True when every file of the table's period is published ('loaded') in the ledger."""
        done = ledger.loaded_files(cur, self.table.name, period)
        return bool(self.table.files) and all(done.get(f.sha256) == "loaded" for f in self.table.files)

    def open_history(self, cur: Any, ledger: Ledger, period: str, month_start: date) -> int:
        """history=true, after every merge: rows this period wrote that are new or had been closed get
        valid_from = month_start and valid_to = NULL. Returns the rows (re)opened."""
        table = self.table
        frm, to = (quote_ident(c) for c in HISTORY_COLS)
        with step("open_history", table.name):
            cur.execute(f"UPDATE {qualified(table.schema, table.name)} t SET {frm} = %s, {to} = NULL "
                        f"WHERE (t.{to} IS NOT NULL OR t.{frm} IS NULL) AND {ledger.written_since_sql(BATCH_COL)}",
                        (month_start, table.name, period))
        return int(cur.rowcount or 0)

    def sync_missing(self, cur: Any, ledger: Ledger, period: str, month_start: date) -> int:
        """Delete (history=false) or close (history=true: valid_to = month_start) the target rows whose key
        the period no longer has: rows last written by a batch of an older period (or by a batch the ledger
        no longer knows). Rows a newer period wrote are never touched. Returns the rows deleted or closed."""
        table = self.table
        target = qualified(table.schema, table.name)
        seen = ledger.written_since_sql(BATCH_COL)
        with step("sync_missing", table.name):
            if table.history:
                to = quote_ident(HISTORY_COLS[1])
                cur.execute(f"UPDATE {target} t SET {to} = %s WHERE t.{to} IS NULL AND NOT {seen}",
                            (month_start, table.name, period))
            else:
                cur.execute(f"DELETE FROM {target} t WHERE NOT {seen}", (table.name, period))
        gone = int(cur.rowcount or 0)
        log.info("%s: %d row(s) %s: their keys are absent from %s", table.name, gone,
                 "closed" if table.history else "deleted", period)
        return gone


class Replace(WriteMode):
    """Build a shadow table from staging while readers keep the old one, then swap it in."""

    name = "replace"
    whole_period = True
    overwritten_later = True

    def derived_identifiers(self) -> List[str]:
        n = self.table.name
        return super().derived_identifiers() + [f"{n}__lk_new", f"{n}__lk_new_pkey", f"{n}_pkey"]

    def finalize(self, cur: Any, ledger: Ledger) -> Published:
        table = self.table
        new = f"{table.name}__lk_new"
        self._build_shadow(cur, ledger, like=table.name, name=new)
        with step("swap", table.name):  # readers block only for the rename
            cur.execute(f"DROP TABLE {qualified(table.schema, table.name)}")
            cur.execute(f"ALTER TABLE {qualified(table.schema, new)} RENAME TO {quote_ident(table.name)}")
            self._rename_indexes(cur, new, table.name)
        with step("drop_staging", table.name):
            cur.execute(f"DROP TABLE {qualified(table.load_schema, table.load_table)}")
        with step("count", table.name):
            cur.execute(f"SELECT count(*) FROM {qualified(table.schema, table.name)}")
        return Published(int(cur.fetchone()[0]))


class Snapshot(WriteMode):
    """Like Replace, for the period's LIST partition (``ref_period`` = the period tag) of a partitioned target."""

    name = "snapshot"
    whole_period = True
    partitioned = True

    def target_columns(self) -> Dict[str, Tuple[str, str]]:
        out = super().target_columns()
        out[PERIOD_COL] = ("integer", "integer")
        return out

    def derived_identifiers(self) -> List[str]:
        part = f"{self.table.name}__p{self.table.period_tag}"
        return super().derived_identifiers() + [part, f"{part}__lk_new", f"{part}__lk_new_pkey",
                                                f"{part}__lk_new_period", f"{part}_pkey"]

    def create_target(self, cur: Any) -> None:
        t = self.table
        pk = f", PRIMARY KEY ({_cols(t.key + (PERIOD_COL,))})" if t.key else ""
        cur.execute(f"CREATE TABLE {qualified(t.schema, t.name)} ({self.column_ddl()}, "
                    f"{quote_ident(PERIOD_COL)} integer NOT NULL{pk}) PARTITION BY LIST ({quote_ident(PERIOD_COL)})")

    def finalize(self, cur: Any, ledger: Ledger) -> Published:
        """Build the period's partition aside, then detach/drop the old one and attach the new one."""
        table = self.table
        tag = int(table.period_tag)
        part = f"{table.name}__p{tag}"
        new = f"{part}__lk_new"
        parent = qualified(table.schema, table.name)
        self._build_shadow(cur, ledger, like=table.name, name=new, period_tag=tag)
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
            self._rename_indexes(cur, new, part)
        with step("attach", table.name):
            cur.execute(f"ALTER TABLE {parent} ATTACH PARTITION {qualified(table.schema, part)} "
                        f"FOR VALUES IN ({tag})")
        with step("parent_indexes", table.name):
            self._create_indexes(cur, table.name)
        with step("drop_staging", table.name):
            cur.execute(f"DROP TABLE {qualified(table.load_schema, table.load_table)}")
        with step("count", table.name):
            cur.execute(f"SELECT count(*) FROM {qualified(table.schema, part)}")
        return Published(int(cur.fetchone()[0]))


# The config's mode name -> its class (config.WRITE_MODES lists the same names).
MODES: Dict[str, Type[WriteMode]] = {m.name: m for m in (Append, Merge, Replace, Snapshot)}


def mode_for(table: TableSpec) -> WriteMode:
    """The write mode of ``table``: MODES[table.mode], or Sync for a merge that deletes missing keys."""
    try:
        cls = MODES[table.mode]
    except KeyError:  # config validation refuses it first; keep this total
        raise ConfigError(f"unknown write mode {table.mode!r} (one of {sorted(MODES)})",
                          key=f"job.tables.{table.name}.mode") from None
    if cls is Merge and table.delete_missing:
        cls = Sync
    return cls(table)


# ---------------------------------------------------------------- shortcuts for callers without a mode at hand


def prepare(cur: Any, table: TableSpec, migrate: MigratePolicy) -> None:
    """``mode_for(table).prepare(cur, migrate)``."""
    mode_for(table).prepare(cur, migrate)


def derived_identifiers(table: TableSpec) -> List[str]:
    return mode_for(table).derived_identifiers()


def validate_identifiers(table: TableSpec) -> None:
    mode_for(table).validate_identifiers()
