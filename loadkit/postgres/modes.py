"""Write modes, one class each: target/staging DDL before the load, schema checks, and the
finalisation after it. ``mode_for(table)`` picks the class from the config's mode name (MODES).

- Append:   batches COPY straight into the target; secondary indexes are built after the load.
- Merge:    batches COPY into an UNLOGGED staging table; finalize keeps one row per key (which keys
            repeat, the in-process writers' key hashes tell it in advance: keyhints). Into an
            empty target that nothing depends on, staging is instead a LOGGED table shaped like the
            target, swapped in at the publish (the data is written once; see Merge's first-load
            section); into any other empty target it inserts with no primary key/indexes and adds
            them after; otherwise it inserts new keys and rewrites only rows that differ (IS
            DISTINCT FROM; a reload of the same batches compares read-only first), reporting
            inserted / updated / unchanged.
- Sync:     merge with ``delete_missing`` (each period is a full snapshot): after the upsert,
            keys the period no longer has are deleted (or closed, with ``history``).
- Replace:  batches COPY into staging; finalize builds a shadow table from it, adds PK and
            indexes after the data, ANALYZEs it and swaps it in, all in one transaction.
- Snapshot: like replace, for one LIST partition (ref_period = YYYYMM) of a partitioned target.

Duplicate keys (merge, replace, snapshot) are resolved deterministically: the last file of the
table's sorted file list wins, then the last batch (byte offset) in it, then the last row in the
batch -- i.e. "last shard wins, last record wins", the same in every run.

Staging is UNLOGGED (no WAL: about half the write I/O), except a merge first load's direct staging,
which becomes the target and is logged like it. PostgreSQL empties UNLOGGED tables in
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
from typing import Any, ClassVar, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Type

import pyarrow as pa

from loadkit.postgres.ledger import REJECTS_KEPT_PER_FILE, Ledger, StagedBatch
from loadkit.errors import ConfigError, sqlstate_of
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

# A merge reload first probes this many staged rows' keys in the target (Merge._same_batches_likely).
RELOAD_SAMPLE_ROWS = 1000

# work_mem of a reload's comparison when it joins unsorted staged rows (hinted: Merge._winners) to the target: the
# join hashes the target, ~210 MB for a 1M-row, 28-column target. With the default 4 MB it splits
# into 64 batches written to temporary files (measured 5.5-6.5 s CPU against 3.0 at 256 MB, 1M rows; the
# sort it replaces: 3.6). SET LOCAL for the statement only; hash_mem_multiplier (2) applies on top, and a parallel
# hash shares work_mem x multiplier x participants. The run's value is sink.compare_work_mem (the same default).
JOIN_WORK_MEM = "256MB"

UNIQUE_VIOLATION = "23505"  # SQLSTATE unique_violation: the swapped-in key index found a duplicate key

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
def settings(cur: Any, **values: Optional[str]) -> Iterator[None]:
    """Run the block's statements with the given server settings (``work_mem="256MB"``, ``jit="off"``;
    transaction-local, None: unchanged), then put back the values they had. (A statement that fails aborts
    the transaction, which undoes them.)"""
    changed = {name: value for name, value in values.items() if value is not None}
    before = {}
    for name, value in changed.items():
        cur.execute("SELECT current_setting(%s), set_config(%s, %s, true)", (name, name, value))
        before[name] = cur.fetchone()[0]
    yield
    for name, value in before.items():
        cur.execute("SELECT set_config(%s, %s, true)", (name, value))


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


def _sql_values(column: Any) -> List[Any]:
    """An Arrow key column as Python values for a driver array parameter. Binary values are latin-1 text
    read as bytes (dialect.server_transcode: PostgreSQL decodes them as LATIN1, so does this)."""
    values = column.to_pylist()
    return [v.decode("latin-1") if isinstance(v, bytes) else v for v in values]


def _sql_array(values: Sequence[Any]) -> str:
    """``values`` (_sql_values' Python values) as one PostgreSQL array literal, for a ``%s::type[]`` parameter:
    every element double-quoted (backslash and quote escaped), None as NULL. The server reads it with the
    element type's input function (numbers, dates, timestamps and booleans by their str(), which it accepts).
    psycopg2 would send a list as ARRAY['a', 'b', ...], one expression per element to parse and fold: 0.70-0.78 s
    for 200k keys against 0.045-0.049 s as a literal (every key of a month repeated: see _candidate_keys)."""
    return "{" + ",".join("NULL" if v is None else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
                          for v in values) + "}"


def _cols(names: Tuple[str, ...]) -> str:
    return ", ".join(quote_ident(n) for n in names)


def _index_name(on: str, cols: Tuple[str, ...]) -> str:
    return f"{on}__{'_'.join(cols)}_idx"[:63]


class Winners(NamedTuple):
    """The staged rows, one per key (the last wins: Merge._winners), as disjoint SELECTs with their parameters
    (``parts``; ``sql``/``args``: their UNION ALL), whether the rows come unsorted (duplicate-key hints: a
    join to the target then hashes, see JOIN_WORK_MEM), and how many of the parts, at the end, hold only the
    few rows of the repeated keys (``few``: a join looks those up in the target's key index, _unchanged)."""

    parts: Tuple[Tuple[str, List[Any]], ...]
    unsorted: bool
    few: int = 0

    @property
    def sql(self) -> str:
        if len(self.parts) == 1:
            return self.parts[0][0]
        return " UNION ALL ".join(f"({sql})" for sql, _ in self.parts)

    @property
    def args(self) -> List[Any]:
        return [a for _, args in self.parts for a in args]


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


def _not_null_columns(cur: Any, table: str) -> Set[str]:
    """The columns of ``table`` (a qualified name) marked NOT NULL; empty if there is no such table."""
    cur.execute("SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 "
                "AND NOT a.attisdropped AND a.attnotnull", (table,))
    return {str(r[0]) for r in cur.fetchall()}


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
    # After the publish, target rows no batch of this period wrote are deleted (or closed): Sync.
    sync_deletes: ClassVar[bool] = False

    def __init__(self, table: TableSpec) -> None:
        self.table = table
        # The rows staging holds, as the last verify_staging counted them (None: not verified, or lost rows).
        self._verified_rows: Optional[int] = None

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
            self._prepare_staging(cur, created=actual is None)

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

    def _prepare_staging(self, cur: Any, created: bool = False) -> None:
        """UNLOGGED staging of the declared shape; one left by another declaration is dropped (its batches
        reload). ``created``: prepare has just created the target (Merge uses it; see Merge)."""
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

        The total is counted first (no column of a row decoded) and, when it equals the ledger's, taken as
        the per-batch answer: a batch's rows enter staging only in the transaction that commits its ledger
        row and leave only with it (verify_staging, discard_file, reset) or all at once (crash recovery
        resets an UNLOGGED table; a staging table whose shape changed is dropped) -- so a lost batch makes
        the total short, and rows of a batch the ledger does not know cannot appear. Only a differing
        total pays the per-batch count, which decodes every row up to the batch id at its end (0.8 s
        against 0.25 s for 4M rows of the monthly job's widest table).
        """
        table = self.table
        expected = ledger.unpublished_batch_rows(cur, table.name, period)
        total = sum(sb.rows_loaded for sb in expected.values())
        stage = qualified(table.load_schema, table.load_table)
        cur.execute("SELECT to_regclass(%s)", (stage,))
        if cur.fetchone()[0] is None:
            staged: Dict[int, int] = {}
        else:
            if self._count_staged(cur, stage) == total:
                self._verified_rows = total
                return []
            cur.execute(f"SELECT {quote_ident(BATCH_COL)}, count(*) FROM {stage} GROUP BY 1")
            staged = {int(b): int(n) for b, n in cur.fetchall()}
        lost = [b for b, sb in expected.items() if staged.get(b, 0) != sb.rows_loaded]
        self._verified_rows = None if lost else total
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

    def _count_staged(self, cur: Any, stage: str) -> int:
        """count(*) of the staging table ``stage``: verify_staging's total (Merge gathers more in the same scan)."""
        cur.execute(f"SELECT count(*) FROM {stage}")
        return int(cur.fetchone()[0])

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

    def _staged_select(self, where: str = "", extra: str = "") -> str:
        """Every staged row ``s`` (its published columns, then ``extra``), or those meeting ``where``: no
        deduplication."""
        table = self.table
        cols = ", ".join(f"s.{quote_ident(n)}" for n in self.published_names())
        return (f"SELECT {cols}{extra} FROM {qualified(table.load_schema, table.load_table)} s"
                + (f" WHERE {where}" if where else ""))

    def _dedup_select(self, ledger: Ledger, extra: str = "", where: str = "") -> str:
        """Staged rows, one per key when a key is declared: the last file, member, offset and row win.
        ``where``: a condition on the staged rows ``s`` (only those are read)."""
        table = self.table
        if not table.key:
            return self._staged_select(where, extra)
        cols = ", ".join(f"s.{quote_ident(n)}" for n in self.published_names())
        stage = qualified(table.load_schema, table.load_table)
        key = ", ".join(f"s.{quote_ident(k)}" for k in table.key)
        order_tail = _last_wins_order(table.format)
        return (f"SELECT DISTINCT ON ({key}) {cols}{extra} FROM {stage} s "
                f"JOIN {ledger.batch} b ON b.batch_id = s.{quote_ident(BATCH_COL)} "
                + (f"WHERE {where} " if where else "") + f"ORDER BY {key}, {order_tail}")

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

    def __init__(self, table: TableSpec) -> None:
        super().__init__(table)
        # Set by the sink before finalize: the key values whose hash repeats among the staged rows (keyhints;
        # no rows: no key repeats), None without hints (a Ray run, a resumed run, too many rows): _swap_in.
        self.key_candidates: Optional[pa.Table] = None
        self._first_publish = False  # finalize found the target empty: a sync has nothing to delete
        # finalize's reload found every target row's key staged and every staged key unchanged (_unchanged): every
        # row then names a batch of this period, so a sync has nothing to delete either.
        self._all_keys_unchanged = False
        self.compare_work_mem: Optional[str] = JOIN_WORK_MEM  # set by the sink: sink.compare_work_mem
        # (staged rows counted, the ctids of the rows that may hold a candidate key: every row that does, and
        # more) from verify_staging's one scan of a direct staging table (_count_staged); _delete_hinted_losers
        # then reads only those rows.
        self._candidate_rows: Optional[Tuple[int, str]] = None

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

    # ------------------------------------------------------------ a first load written once (issue 16)
    #
    # Into an empty target nothing needs comparing, and copying every staged row into the target (the old
    # first load: INSERT ... SELECT DISTINCT ON, ~4.4 µs/row of backend CPU) writes the data twice. So when
    # prepare finds the target empty and swappable, the table's staging is made LOGGED and shaped like the
    # target (its columns, in its order, types and collations, plus ROW_COL): the batches COPY into what
    # becomes the target. The publishing transaction then (target locked, still empty, still swappable)
    # drops the empty target, moves staging in under its name, resolves duplicate keys in place (with the
    # client's duplicate-key hints -- postgres/keyhints.py -- only among the rows of the keys whose hash
    # repeats, before the key is built once; without hints, or when the key's unique index still cannot be
    # built, by grouping the whole table), drops ROW_COL (O(1): a dropped column), and rebuilds the
    # target's own constraints and indexes by their definitions and names. A target something could tell
    # apart after the swap (dependants, grants, comments, triggers, ... see _swap_blockers) is never
    # swapped: the first load then inserts from staging as before (both staging shapes serve every path).

    def _prepare_staging(self, cur: Any, created: bool = False) -> None:
        """Staging of the declared shape (UNLOGGED), or -- for a first load into an empty, swappable target
        -- a LOGGED table shaped like the target plus ROW_COL (``_direct_columns``). An existing staging
        table keeps its kind (its committed batches are the resume's); one whose columns no longer match
        is dropped and its batches reload (verify_staging finds them missing)."""
        table = self.table
        stage = qualified(table.load_schema, table.load_table)
        persistence = self._staging_persistence(cur)
        if persistence == "p":
            actual = existing_columns(cur, table.load_schema, table.load_table)
            if actual is not None and list(actual.items()) == list(self._direct_columns(cur).items()):
                return
            log.warning("staging table %s.%s does not match the target; dropping it, its batches will reload",
                        table.load_schema, table.load_table)
            cur.execute(f"DROP TABLE {stage}")
        if persistence == "u" or not self._direct_wanted(cur, created):
            super()._prepare_staging(cur, created)
            return
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(table.load_schema)}")
        cur.execute(f"DROP TABLE IF EXISTS {qualified(table.schema, table.load_table)}")  # see WriteMode's
        cols = self._direct_columns(cur) if not created else {
            **{n: ddl for n, (ddl, _) in self.target_columns().items()}, ROW_COL: "integer"}
        required = self._required_keys(cur, created)
        cur.execute(f"CREATE TABLE IF NOT EXISTS {stage} ("
                    + ", ".join(f"{quote_ident(n)} {t}{' NOT NULL' if n in required else ''}"
                                for n, t in cols.items()) + ")")

    def _required_keys(self, cur: Any, created: bool) -> List[str]:
        """The key columns a direct staging table declares NOT NULL: declared ``nullable: false`` (the client
        rejects a row missing one, so COPY never meets a NULL there) and NOT NULL in the target (a primary
        key's columns are). The swap's key build then has no NOT NULL to verify: ADD PRIMARY KEY on a nullable
        column scans the whole table first (0.44-0.47 s before a 3.0-3.4 s build for the monthly job's widest
        table, 4M rows, on one core at the end of the run). A target whose key allows NULL (a unique index)
        keeps it."""
        t = self.table
        declared = [c.name for c in t.columns if c.name in t.key and not c.nullable]
        if created or not declared:
            return declared
        notnull = _not_null_columns(cur, qualified(t.schema, t.name))
        return [n for n in declared if n in notnull]

    def _staging_persistence(self, cur: Any) -> Optional[str]:
        """pg_class.relpersistence of the staging table ('p' logged: the direct kind, 'u'), None if absent."""
        cur.execute("SELECT c.relpersistence FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %s AND c.relname = %s", (self.table.load_schema, self.table.load_table))
        row = cur.fetchone()
        return str(row[0]) if row else None

    def _direct_columns(self, cur: Any) -> Dict[str, str]:
        """name -> DDL type of a direct staging table: the target's columns in its order (existing_columns'
        spelling, collations included, no NOT NULL: those are checked at the swap like the old insert
        checked them), then ROW_COL."""
        target = existing_columns(cur, self.table.schema, self.table.name) or {}
        return {**target, ROW_COL: "integer"}

    def _direct_wanted(self, cur: Any, created: bool) -> bool:
        """At prepare: the target is empty and nothing blocks a swap (a cheap look; publish checks again).
        A target prepare has just created (``created``) is both, with nothing to look up."""
        if created:
            return True
        target = qualified(self.table.schema, self.table.name)
        cur.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {target})")
        row = cur.fetchone()
        return bool(row and row[0]) and not self._swap_blockers(cur)

    def _swap_blockers(self, cur: Any) -> List[str]:
        """What about the target a swap would lose or change, as short reasons; [] = it can be swapped.

        Allowed: a plain, logged table owned by the current user, in the default tablespace, whose
        columns carry nothing but name/type/collation/NOT NULL (no n_distinct: core PostgreSQL's column
        options; others a server may set on every new table are its own), whose constraints are primary key /
        unique / check / exclusion (validated, not inherited) and whose indexes are valid and in the
        default tablespace -- all rebuilt by definition under their own names. Everything else blocks:
        grants (table or column), comments, security labels, row security and policies, triggers (foreign
        keys either way among them), rules, views or anything else depending on the table or its row type,
        inheritance and partitions, publications naming it, extended statistics, storage/statistics/
        column options, reloptions, replica identity, a clustered index."""
        target = qualified(self.table.schema, self.table.name)
        checks = {
            "not a plain logged table": "c.relkind <> 'r' OR c.relpersistence <> 'p' OR c.relispartition",
            "owned by another role": "c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)",
            "has grants": "c.relacl IS NOT NULL OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid "
                          "AND a.attacl IS NOT NULL)",
            "has storage options or a tablespace": "c.reloptions IS NOT NULL OR c.reltablespace <> 0 "
                                                   "OR c.relreplident <> 'd'",
            "has row security": "c.relrowsecurity OR c.relforcerowsecurity "
                                "OR EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid)",
            "has triggers or foreign keys": "c.relhastriggers OR EXISTS (SELECT 1 FROM pg_constraint k "
                                            "WHERE k.confrelid = c.oid OR (k.conrelid = c.oid AND (k.contype NOT IN "
                                            "('p', 'u', 'c', 'x') OR NOT k.convalidated OR k.coninhcount > 0)))",
            "has rules": "c.relhasrules",
            "has inheritance": "c.relhassubclass OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)",
            "has column defaults or options": (
                "EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid WHERE a.attrelid = c.oid "
                "AND a.attnum > 0 AND NOT a.attisdropped AND (a.atthasdef OR a.attidentity <> '' "
                "OR a.attgenerated <> '' OR a.attfdwoptions IS NOT NULL OR EXISTS (SELECT 1 FROM "
                "unnest(a.attoptions) o WHERE o LIKE 'n\\_distinct%%') "
                "OR a.attstattarget <> -1 OR a.attstorage <> t.typstorage OR a.attcompression <> ''))"),
            "has an index it cannot rebuild": (
                "EXISTS (SELECT 1 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = c.oid "
                "AND (NOT i.indisvalid OR i.indisclustered OR ic.reltablespace <> 0))"),
            "has dependants": (
                "EXISTS (SELECT 1 FROM pg_depend d WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid "
                "AND NOT ((d.classid = 'pg_type'::regclass AND d.deptype = 'i') "
                "OR (d.classid = 'pg_class'::regclass AND (d.objid = c.reltoastrelid OR d.objid IN "
                "(SELECT i.indexrelid FROM pg_index i WHERE i.indrelid = c.oid))) "
                "OR (d.classid = 'pg_constraint'::regclass AND d.objid IN "
                "(SELECT k.oid FROM pg_constraint k WHERE k.conrelid = c.oid)))) "
                "OR EXISTS (SELECT 1 FROM pg_depend d JOIN pg_type t ON t.oid = c.reltype "
                "WHERE d.refclassid = 'pg_type'::regclass AND d.refobjid IN (t.oid, t.typarray) "
                "AND NOT (d.classid = 'pg_type'::regclass AND d.deptype = 'i'))"),
            "is published or has extended statistics": (
                "EXISTS (SELECT 1 FROM pg_publication_rel p WHERE p.prrelid = c.oid) "
                "OR EXISTS (SELECT 1 FROM pg_statistic_ext x WHERE x.stxrelid = c.oid)"),
            "has comments or security labels": (
                "EXISTS (SELECT 1 FROM pg_description d WHERE d.objoid = c.oid OR d.objoid IN "
                "(SELECT i.indexrelid FROM pg_index i WHERE i.indrelid = c.oid) OR d.objoid IN "
                "(SELECT k.oid FROM pg_constraint k WHERE k.conrelid = c.oid)) "
                "OR EXISTS (SELECT 1 FROM pg_seclabel l WHERE l.objoid = c.oid)"),
        }
        cur.execute("SELECT " + ", ".join(f"({sql})" for sql in checks.values())
                    + " FROM pg_class c WHERE c.oid = to_regclass(%s)", (target,))
        row = cur.fetchone()
        if row is None:
            return ["no such table"]
        return [why for why, hit in zip(checks, row) if hit]

    def _swap_refusal(self, cur: Any) -> Optional[str]:
        """At publish, with the target empty and locked: why the staged rows cannot become the target by a
        swap (None: they can). Direct staging, the same columns in the same order, the same owner and
        grants as the target, no blocker, and a unique constraint or index on exactly the key."""
        table = self.table
        if self._staging_persistence(cur) != "p":
            return "staging is not the direct kind"
        staged = existing_columns(cur, table.load_schema, table.load_table)
        if staged is None or list(staged.items()) != list(self._direct_columns(cur).items()):
            return "staging is not shaped like the target"
        cur.execute("SELECT s.relowner = t.relowner AND s.relacl IS NOT DISTINCT FROM t.relacl "
                    "FROM pg_class s, pg_class t WHERE s.oid = to_regclass(%s) AND t.oid = to_regclass(%s)",
                    (qualified(table.load_schema, table.load_table), qualified(table.schema, table.name)))
        row = cur.fetchone()
        if not (row and row[0]):
            return "staging's owner or grants differ from the target's"
        blockers = self._swap_blockers(cur)
        if blockers:
            return "the target " + ", ".join(blockers)
        if self._rebuild_statements(cur)[0] is None:
            return "no unique constraint or index on exactly the key"
        return None

    def _rebuild_statements(self, cur: Any) -> Tuple[Optional[str], List[str]]:
        """(the statement that rebuilds the target's unique constraint/index on exactly the key, the
        statements that rebuild everything else: its other constraints and indexes by definition and name,
        then NOT NULL exactly as the target has it), read from the catalog before the target is dropped. The
        definitions name the target, so they run as they are on the table swapped in under its name."""
        t = self.table
        target = qualified(t.schema, t.name)
        cur.execute(
            "SELECT k.contype IN ('p', 'u') AND NOT k.condeferrable AND ARRAY(SELECT a.attname::text "
            "FROM pg_attribute a WHERE a.attrelid = k.conrelid AND a.attnum = ANY(k.conkey) "
            "ORDER BY a.attname::text COLLATE \"C\") = %s::text[], "
            "format('ALTER TABLE %%s ADD CONSTRAINT %%I %%s', %s, k.conname, pg_get_constraintdef(k.oid)) "
            "FROM pg_constraint k WHERE k.conrelid = to_regclass(%s) ORDER BY k.contype <> 'p', k.conname",
            (sorted(t.key), target, target))
        constraints = [(bool(r[0]), str(r[1])) for r in cur.fetchall()]
        cur.execute(
            "SELECT i.indisunique AND i.indexprs IS NULL AND i.indpred IS NULL AND ARRAY(SELECT a.attname::text "
            "FROM pg_attribute a WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "ORDER BY a.attname::text COLLATE \"C\") = %s::text[] "
            "AND i.indnkeyatts = array_length(%s::text[], 1), pg_get_indexdef(i.indexrelid) "
            "FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = to_regclass(%s) "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid "
            "AND k.conrelid = i.indrelid) ORDER BY ic.relname",
            (sorted(t.key), sorted(t.key), target))
        indexes = [(bool(r[0]), str(r[1])) for r in cur.fetchall()]
        # NOT NULL as the target has it, on every column: a key column's too (a primary key sets it, and then
        # SET NOT NULL is a no-op; a unique constraint or index does not), and none the target lacks (a direct
        # staging's required key columns, _required_keys, when the target's key was made nullable since prepare).
        wanted = _not_null_columns(cur, target)
        staged = _not_null_columns(cur, qualified(t.load_schema, t.load_table))
        notnull = [f"ALTER TABLE {target} ALTER COLUMN {quote_ident(c)} SET NOT NULL" for c in sorted(wanted)]
        notnull += [f"ALTER TABLE {target} ALTER COLUMN {quote_ident(c)} DROP NOT NULL"
                    for c in sorted(staged - wanted)]
        key = next((sql for on_key, sql in constraints + indexes if on_key), None)
        rest = [sql for _, sql in constraints + indexes if sql != key]
        return key, rest + notnull

    def _count_staged(self, cur: Any, stage: str) -> int:
        """verify_staging's count of the staged rows; with duplicate-key hints (``key_candidates``, set before
        verify_staging by the sink) on a direct staging table, the same scan also gathers the ctids of the
        rows that may hold a candidate key (``_candidate_rows``), so a swapped first load finds its duplicates
        without a second full scan (_delete_hinted_losers: the monthly job's widest table, 4M rows, a count
        then a filtered scan ~0.45 + ~0.65 s in a whole run); the count is serial (array_agg has no parallel
        combine before PostgreSQL 16) -- on two tables publishing side by side that costs no wall.

        The rows gathered are those whose every key column is one of the candidates' values in it
        (_key_filter: a hashed ``= ANY`` per column, in the scan) -- a superset of the candidates' rows, which
        _delete_hinted_losers matches exactly by key. Never ``(key) IN (candidates)`` here: inside an aggregate's
        FILTER that is a subplan, not a join, and past hash_mem (~70k candidate keys at the default work_mem: a
        month whose file came twice) an unhashed one, rescanned for every row -- 300k rows ran for hours."""
        self._candidate_rows = None
        keys = self.key_candidates
        if keys is None or not keys.num_rows or self._staging_persistence(cur) != "p":
            return super()._count_staged(cur, stage)
        maybe, values = self._key_filter(keys, self.table.key)
        cur.execute(f"SELECT count(*), array_agg(s.ctid) FILTER (WHERE {maybe}) FROM {stage} s", values)
        counted, tids = cur.fetchone()
        self._candidate_rows = (int(counted), str(tids) if tids is not None else "{}")
        return int(counted)

    def _swap_in(self, cur: Any, ledger: Ledger) -> Published:
        """Publish a first load by making the direct staging the target (see the section comment): the
        target is empty and ACCESS EXCLUSIVE locked by the caller, and _swap_refusal said yes. Duplicate keys:
        with hints (``key_candidates``, keyhints) the losers among the repeated keys' rows go first and the key
        is built once; without, the key build is tried and a unique_violation sends it to the whole-table
        search (_delete_losers), as does a duplicate the hints missed. Exact count: the rows staged (what
        verify_staging just counted) less the duplicate-key losers deleted."""
        table = self.table
        target = qualified(table.schema, table.name)
        key_sql, rest = self._rebuild_statements(cur)
        assert key_sql is not None  # _swap_refusal checked it
        staged = self._verified_rows
        if staged is None:
            cur.execute(f"SELECT count(*) FROM {qualified(table.load_schema, table.load_table)}")
            staged = int(cur.fetchone()[0])
        with step("swap", table.name):  # RESTRICT: a dependant _swap_blockers missed stops it here
            cur.execute(f"DROP TABLE {target}")
            cur.execute(f"ALTER TABLE {qualified(table.load_schema, table.load_table)} RENAME TO "
                        f"{quote_ident(table.name)}")
            cur.execute(f"ALTER TABLE {qualified(table.load_schema, table.name)} "
                        f"SET SCHEMA {quote_ident(table.schema)}")
        deleted, duplicated = 0, False
        if self.key_candidates is not None and self.key_candidates.num_rows:
            with step("dedup_hint", table.name):  # only the rows whose key hash repeats: see keyhints
                deleted = self._delete_hinted_losers(cur, ledger, self.key_candidates)
        with step("primary_key", table.name):  # optimistic without hints: most months have no duplicate key
            cur.execute("SAVEPOINT lk_swap_key")
            try:
                cur.execute(key_sql)
            except Exception as exc:
                if sqlstate_of(exc) != UNIQUE_VIOLATION:
                    raise
                duplicated = True
            cur.execute(("ROLLBACK TO" if duplicated else "RELEASE") + " SAVEPOINT lk_swap_key")
        if duplicated:  # unique_violation: delete the losers, then build the key (steps: not nested, they add up)
            if self.key_candidates is not None:
                log.warning("%s: a duplicate key the client's key hashes missed (equal in PostgreSQL, not in "
                            "bytes: a collation or char padding); searching the whole table", table.name,
                            extra={"table": table.name})
            with step("dedup", table.name):
                deleted += self._delete_losers(cur, ledger)
            with step("primary_key", table.name):
                cur.execute(key_sql)
        cur.execute(f"ALTER TABLE {target} DROP COLUMN {quote_ident(ROW_COL)}")
        with step("indexes", table.name):
            for sql in rest:
                cur.execute(sql)
        return Published(staged - deleted, 0, 0)

    def _delete_losers(self, cur: Any, ledger: Ledger) -> int:
        """Delete, from the swapped-in table, every row of a duplicated key but the one _dedup_select keeps
        (the last file, member, offset, row: the same ORDER BY). Only the duplicated keys are sorted. Finding
        them groups every key (hash aggregate, in work_mem: with maintenance_work_mem's 64 MB instead of 4 MB
        it measured slower, 4.9 vs 3.1 s for 4M rows)."""
        target = qualified(self.table.schema, self.table.name)
        keys = _cols(self.table.key)
        repeated = f"SELECT {keys} FROM {target} GROUP BY {keys} HAVING count(*) > 1"
        return self._delete_losers_among(cur, ledger, repeated)

    def _key_type(self, name: str) -> Tuple[str, str]:
        """(SQL type, ' COLLATE "..."' or '') of key column ``name``: as declared; a derived key is text."""
        col = next((c for c in self.table.columns if c.name == name), None)
        return (col.sql_type, col.collate) if col is not None else ("text", "")

    def _candidate_keys(self, keys: pa.Table) -> Tuple[str, List[Any]]:
        """(a SELECT of ``keys``' rows as the table's key columns c0, c1, ... -- their declared types and
        collations --, its parameters): the key values whose hash repeats (keyhints.KeyHints.candidates)."""
        table = self.table
        types = [self._key_type(k) for k in table.key]
        arrays = ", ".join(f"%s::{kind}[]" for kind, _ in types)
        picked = ", ".join(f"u.c{i}{collate} AS c{i}" for i, (_, collate) in enumerate(types))
        named = ", ".join(f"c{i}" for i in range(len(table.key)))
        return (f"SELECT {picked} FROM unnest({arrays}) u({named})",
                [_sql_array(_sql_values(keys.column(k))) for k in table.key])

    def _delete_hinted_losers(self, cur: Any, ledger: Ledger, keys: pa.Table) -> int:
        """Delete, from the swapped-in table, the losers among the rows holding one of ``keys`` (the key values
        whose hash repeats: keyhints.KeyHints.candidates), by _dedup_select's order. One scan that keeps the
        rows whose key is in that small set, then a sort of those. A loser among them loses in its whole key
        group too (the winner is the greatest of the group), so whatever a hint misses, nothing deleted here
        is a row the full search would keep.

        The scan filters on the first key column against a constant array of the candidates' values
        (``= ANY``: a hashed lookup, PostgreSQL 14+, in the scan itself), so only the few rows that pass are
        read beyond their leading columns; the exact key match then joins those. Without it the semi-join sat
        above the scan, which handed every row up with its batch id and row number -- the last columns of a
        wide row, so every column of every row was decoded: 2.0 s against 0.4 s for 4M rows of the monthly
        job's widest table (benchmarks/merge_finalize.py's first load)."""
        gathered = self._candidate_rows
        if gathered is not None and gathered[0] == self._verified_rows:  # verify_staging's scan found them
            prefilter, values = "s.ctid = ANY(%s::tid[])", [gathered[1]]  # a TID scan of those rows only
        else:
            prefilter, values = self._first_key_filter(keys)
        keys_sql, args = self._candidate_keys(keys)
        return self._delete_losers_among(cur, ledger, keys_sql, [*values, *args], prefilter=f"{prefilter} AND ")

    def _first_key_filter(self, keys: pa.Table) -> Tuple[str, List[Any]]:
        """(a condition on staged rows ``s``: their first key column is one of ``keys``' values in it, its
        one parameter: those values, distinct). A superset of the rows holding one of ``keys``, tested in the
        scan itself against a constant array (hashed, PostgreSQL 14+), so the rows it drops are never decoded
        past that column (see _delete_hinted_losers)."""
        return self._key_filter(keys, self.table.key[:1])

    def _key_filter(self, keys: pa.Table, columns: Sequence[str]) -> Tuple[str, List[Any]]:
        """(a condition on staged rows ``s``: each of the key ``columns`` is one of ``keys``' values in it, its
        parameters: those values per column, distinct): _first_key_filter's test on several columns, each a
        hashed lookup in the scan -- linear in the rows whatever the number of keys."""
        tests, values = [], []
        for name in columns:
            kind, collate = self._key_type(name)
            tests.append(f"s.{quote_ident(name)}{collate} = ANY(%s::{kind}[])")
            values.append(_sql_array(list(dict.fromkeys(_sql_values(keys.column(name))))))  # distinct, in order
        return " AND ".join(tests), values

    def _delete_losers_among(self, cur: Any, ledger: Ledger, keys_sql: str, args: Sequence[Any] = (),
                             prefilter: str = "") -> int:
        """Delete, from the swapped-in table, the rows whose key ``keys_sql`` selects (the key columns, in
        order; ``args`` its parameters, after ``prefilter``'s: a condition on the scanned rows ``s`` ending
        in AND, or '') but the one per key _dedup_select keeps; returns how many."""
        table = self.table
        target = qualified(table.schema, table.name)
        key = ", ".join(f"s.{quote_ident(k)}" for k in table.key)
        cur.execute(
            f"DELETE FROM {target} WHERE ctid = ANY(ARRAY(SELECT r.id FROM (SELECT s.ctid AS id, row_number() OVER "
            f"(PARTITION BY {key} ORDER BY {_last_wins_order(table.format)}) AS rn FROM {target} s "
            f"JOIN {ledger.batch} b ON b.batch_id = s.{quote_ident(BATCH_COL)} "
            f"WHERE {prefilter}({key}) IN ({keys_sql})) r WHERE r.rn > 1))", list(args) or None)
        return int(cur.rowcount)

    def finalize(self, cur: Any, ledger: Ledger) -> Published:
        """Publish one row per staged key (the last wins): a first load into an empty target swaps the
        direct staging in when nothing can tell (_swap_in), else inserts without the primary key and adds
        it after; otherwise only new keys are inserted and only rows that differ are rewritten. Everything
        in the caller's (publishing) transaction."""
        table = self.table
        target = qualified(table.schema, table.name)
        self._all_keys_unchanged = False
        first = self._first_publish = self._empty_and_locked(cur)
        refusal = self._swap_refusal(cur) if first else "the target has rows"
        if refusal is None:
            published = self._swap_in(cur, ledger)
        else:
            if self._staging_persistence(cur) == "p":
                log.info("%s: first load inserts from staging instead of swapping it in: %s", table.name, refusal,
                         extra={"table": table.name})
            published = self._first_load(cur, ledger) if first else self._reload(cur, ledger)
            with step("drop_staging", table.name):
                cur.execute(f"DROP TABLE {qualified(table.load_schema, table.load_table)}")  # published: no litter
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
            winners = self._winners(cur, ledger)
            cur.execute(f"INSERT INTO {target} ({_cols(self.published_names())}) {winners.sql}",
                        winners.args or None)
            inserted = int(cur.rowcount)
        if pkey is not None:
            with step("primary_key", table.name):
                cur.execute(f"ALTER TABLE {target} ADD CONSTRAINT {quote_ident(pkey[0])} {pkey[1]}")
        return Published(inserted, 0, 0)

    def _winners(self, cur: Any, ledger: Ledger) -> Winners:
        """(a SELECT of the rows _dedup_select keeps -- one per staged key, the last wins --, its parameters).

        With duplicate-key hints (``key_candidates``: the key values whose hash repeats among the staged rows,
        keyhints) on key columns whose equality is byte equality (_hints_exact), only the candidate keys' rows
        are sorted; every other staged row is its key's only row and passes as it is, unsorted. The full
        deduplication sorts every whole staged row (~3 µs/row of backend CPU on the monthly job's widest
        table, spilling to disk); a month without repeated keys then costs one scan. Without hints (a Ray run,
        a resumed run) or on other key types: _dedup_select. Used by the reload's comparison (_unchanged) and
        the insert-path first load (_first_load: 3.86 → 3.12 CPU-s per 1M rows); not by _upsert, whose joins
        with the target's key index were faster on the sorted rows (6.8 vs 11.6 CPU-s per 1M rows)."""
        keys = self.key_candidates
        if keys is None or not self._hints_exact(cur):
            return Winners(((self._dedup_select(ledger), []),), False)
        if not keys.num_rows:  # no key hash repeats: every staged row wins
            return Winners(((self._staged_select(), []),), True)
        candidates, args = self._candidate_keys(keys)
        prefilter, values = self._first_key_filter(keys)
        match = " AND ".join(f"k.c{i} = s.{quote_ident(k)}" for i, k in enumerate(self.table.key))
        hit = f"EXISTS (SELECT 1 FROM ({candidates}) k WHERE {match})"
        # No CTE for the candidates (written out in each part instead): a CTE scan is parallel-restricted (see
        # _unchanged). The repeated keys' rows are found by _first_key_filter's scan filter first.
        return Winners(((self._staged_select(f"NOT {hit}"), args),
                        (self._dedup_select(ledger, where=f"{prefilter} AND {hit}"), [*values, *args])), True,
                       few=1)

    def _hints_exact(self, cur: Any) -> bool:
        """True if, on staging's key columns, PostgreSQL's equality is the equality of the bytes the hints hash
        (char(n) without trailing spaces): no floating-point column (-0 = 0), no non-deterministic collation.
        Where it is not, a repeat the hints miss would pass as two rows of one key (the swap's unique index
        build would catch it; a reload's join would not), so the full deduplication runs."""
        table = self.table
        cur.execute("SELECT count(*) = %s AND bool_and(t.typname NOT IN ('float4', 'float8') "
                    "AND coalesce(co.collisdeterministic, true)) FROM pg_attribute a "
                    "JOIN pg_type t ON t.oid = a.atttypid LEFT JOIN pg_collation co ON co.oid = a.attcollation "
                    "WHERE a.attrelid = to_regclass(%s) AND a.attname = ANY(%s::text[]) AND NOT a.attisdropped",
                    (len(table.key), qualified(table.load_schema, table.load_table), list(table.key)))
        row = cur.fetchone()
        return bool(row and row[0])

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
        """Into a target that has rows: when a sample of the staged rows finds their target rows written by
        the same batches (the same files reloaded), first a read-only comparison (_unchanged); if it finds
        every staged key present and equal, nothing is written. Otherwise (or then) the upsert (_upsert)."""
        if self._same_batches_likely(cur):
            with step("compare", self.table.name):
                distinct = self._unchanged(cur, ledger)
            if distinct is not None:
                return Published(0, 0, distinct)
        return self._upsert(cur, ledger)

    def _same_batches_likely(self, cur: Any) -> bool:
        """True if at least half of (up to) RELOAD_SAMPLE_ROWS staged rows find their key in the target
        written by the very batch that staged them (batch ids are deterministic: the same file bytes give
        the same ids) -- a reload of files already published (a duplicate key's losers never match, hence
        only half). A new month's files never do (other ids). Cost: that many primary-key probes."""
        table = self.table
        on = " AND ".join(f"t.{quote_ident(k)} = s.{quote_ident(k)}" for k in table.key)
        batch = quote_ident(BATCH_COL)
        cur.execute(f"SELECT count(*) FILTER (WHERE t.{batch} = s.{batch}), count(*) FROM (SELECT * FROM "
                    f"{qualified(table.load_schema, table.load_table)} LIMIT {RELOAD_SAMPLE_ROWS}) s "
                    f"LEFT JOIN {qualified(table.schema, table.name)} t ON {on}")
        same, sampled = cur.fetchone()
        return bool(sampled) and int(same) * 2 >= int(sampled)

    def _unchanged(self, cur: Any, ledger: Ledger) -> Optional[int]:
        """The number of distinct staged keys if every one of them is in the target with every published
        column equal (NULL-safe, ``_lk_batch`` included: _changed_sql), else None. Read-only: the staged
        winners (_winners: with hints, mostly unsorted) joined to the target on the key. The same statement
        (one snapshot) counts the target's rows: as many as the staged keys, all present and unchanged, means
        every target row is a staged key's and names a batch of this period, so a sync has nothing to delete
        (``_all_keys_unchanged``: its scan is skipped). A FULL JOIN would count them too, but without hints
        the planner, with no statistics on staging, then hashed the whole deduplicated staging (an unchanged
        1.8M-row reload measured 18 s instead of 10)."""
        table = self.table
        names = self.published_names()
        target = qualified(table.schema, table.name)
        on = " AND ".join(f"t.{quote_ident(k)} = d.{quote_ident(k)}" for k in table.key)
        k0 = quote_ident(table.key[0])
        winners = self._winners(cur, ledger)
        # Each part of the winners joins the target on its own, the counts summed: the hinted winners are the
        # rows of the keys that occur once (most) plus the repeated keys' deduplicated rows, and joined as one
        # UNION ALL the planner kept the whole compare in one process; part by part, the big part runs as a
        # Parallel Hash Left Join (4M rows of the monthly job's widest table: 17.2 -> 9.0 s, load 3-4), using
        # the core the other table's publish leaves idle. JIT off: at that size its compilation, repeated in
        # every parallel worker, cost more than it saved (10.1 s with it).
        # The repeated keys' part (winners.few: a few hundred rows) looks its keys up in the target's key index
        # (LATERAL, OFFSET 0 so the subquery is not pulled up into a plain join: a parameterised index scan).
        # As a plain join the planner, with no statistics on the deduplicated rows, hashed them and read the
        # whole target: 1.2-1.3 s of one core for 400 keys of a 4M-row target, after the big part, in the
        # publish's critical path; 0.2 s this way (EXPLAIN ANALYZE, most of it finding the candidates' rows).
        lookups = len(winners.parts) - winners.few
        joined = " UNION ALL ".join(
            f"SELECT count(*) AS n, count(*) FILTER (WHERE t.{k0} IS NULL OR {self._changed_sql(names)}) AS x "
            + (f"FROM ({sql}) d LEFT JOIN {target} t ON {on}" if i < lookups else
               f"FROM ({sql}) d LEFT JOIN LATERAL (SELECT * FROM {target} t WHERE {on} OFFSET 0) t ON true")
            for i, (sql, _) in enumerate(winners.parts))
        with settings(cur, work_mem=self.compare_work_mem if winners.unsorted else None, jit="off"):
            cur.execute(f"SELECT coalesce(sum(n), 0), coalesce(sum(x), 0), (SELECT count(*) FROM {target}) "
                        f"FROM ({joined}) c", winners.args or None)
            distinct, differ, rows = (int(v) for v in cur.fetchone())
        if differ:
            return None
        self._all_keys_unchanged = rows == distinct
        return distinct

    def _upsert(self, cur: Any, ledger: Ledger) -> Published:
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
        with step("upsert", table.name):  # not _winners: unsorted, its joins cost 11.6 vs 6.8 CPU-s per 1M rows
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

    sync_deletes = True

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
        no longer knows). Rows a newer period wrote are never touched. Returns the rows deleted or closed.
        After a publish into an empty target (a first load), or a reload that found every target row's key
        staged and unchanged (_unchanged), there is nothing to find: 0, without the scan."""
        table = self.table
        target = qualified(table.schema, table.name)
        seen = ledger.written_since_sql(BATCH_COL)
        if self._first_publish:  # the target was empty: every row is this period's, just verified staging
            return 0
        if self._all_keys_unchanged:  # every target row is a staged key's, unchanged: it names this period's batch
            return 0
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


def _last_wins_order(fmt: str) -> str:
    """The ORDER BY tail that puts a key's winning staged row first (``s`` staged rows, ``b`` their ledger batch):
    the last file, then (a zip) the last member of it, then the last offset and row. A zip's members are read
    in name order (``source.files._zip_members`` sorts them; COLLATE "C" is that order for UTF-8 names) and each
    counts its offsets from 0, so without the member a repeat in a zip's first member at a higher offset than
    in its second won. Any other format is one stream whose member is the file's name, which a renamed file
    changes between runs: its offsets alone order it."""
    member = 'b.member COLLATE "C" DESC, ' if fmt == "zip" else ""
    return f"b.file_ordinal DESC, {member}b.start_offset DESC, s.{quote_ident(ROW_COL)} DESC"
