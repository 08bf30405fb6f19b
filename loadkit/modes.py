"""Write modes: target/staging DDL before the load and the finalisation after it.

- append:   batches COPY straight into the target.
- merge:    batches COPY into a staging table; finalize dedups by key (last file,
            last offset, last row wins) and upserts, reporting inserted vs updated.
- replace:  batches COPY into staging; finalize builds a new table with PK and
            indexes, ANALYZEs it and swaps it in with one transaction.
- snapshot: like replace, for one LIST partition (ref_period = YYYYMM) of the target.

Every finalisation also marks the table's files loaded, in the same transaction.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

from loadkit.errors import ConfigError
from loadkit.plan import BATCH_COL, PERIOD_COL, ROW_COL, ColumnSpec, TableSpec
from loadkit.security import qualified, quote_ident

log = logging.getLogger("loadkit.modes")

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


def _declared(table: TableSpec) -> List[Tuple[str, str]]:
    cols = [(c.name, c.sql_type) for c in table.columns]
    if table.derived_key:
        cols.append((table.derived_key[0], "text"))
    return cols


def _expected_canonical(table: TableSpec) -> Dict[str, str]:
    out = {c.name: canonical_type(c) for c in table.columns}
    if table.derived_key:
        out[table.derived_key[0]] = "text"
    out[BATCH_COL] = "bigint"
    if table.mode == "snapshot":
        out[PERIOD_COL] = "integer"
    return out


def existing_columns(cur: Any, schema: str, name: str) -> Optional[Dict[str, str]]:
    cur.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (schema, name),
    )
    rows = cur.fetchall()
    return {r[0]: r[1] for r in rows} if rows else None


def schema_diff(expected: Dict[str, str], actual: Dict[str, str]) -> List[str]:
    diff = [f"missing column {c} {t}" for c, t in expected.items() if c not in actual]
    diff += [f"extra column {c} {t}" for c, t in actual.items() if c not in expected]
    diff += [f"column {c} is {actual[c]}, declared {t}" for c, t in expected.items() if c in actual and actual[c] != t]
    return diff


def _column_ddl(table: TableSpec) -> str:
    cols = [f"{quote_ident(n)} {t}" for n, t in _declared(table)]
    return ", ".join(cols + [f"{quote_ident(BATCH_COL)} bigint"])


def prepare(cur: Any, table: TableSpec) -> None:
    """Create the target (and staging) if missing; stop with a diff if the target differs from the declaration."""
    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(table.schema)}")
    actual = existing_columns(cur, table.schema, table.name)
    if actual is None:
        _create_target(cur, table)
    else:
        diff = schema_diff(_expected_canonical(table), actual)
        if diff:
            raise ConfigError(f"table {table.schema}.{table.name} differs from its declaration: " + "; ".join(diff),
                              key=f"job.tables.{table.name}")
    if table.mode != "append":
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {qualified(table.schema, table.load_table)} "
            f"({_column_ddl(table)}, {quote_ident(ROW_COL)} integer)"
        )


def _create_target(cur: Any, table: TableSpec) -> None:
    target = qualified(table.schema, table.name)
    if table.mode == "snapshot":
        pk = f", PRIMARY KEY ({_cols(table.key + (PERIOD_COL,))})" if table.key else ""
        cur.execute(f"CREATE TABLE {target} ({_column_ddl(table)}, {quote_ident(PERIOD_COL)} integer NOT NULL{pk}) "
                    f"PARTITION BY LIST ({quote_ident(PERIOD_COL)})")
    elif table.mode == "merge":
        cur.execute(f"CREATE TABLE {target} ({_column_ddl(table)}, PRIMARY KEY ({_cols(table.key)}))")
    else:  # append, replace: no constraints during the load; replace builds them at the swap
        cur.execute(f"CREATE TABLE {target} ({_column_ddl(table)})")
    _create_indexes(cur, table, table.name)


def _cols(names: Tuple[str, ...]) -> str:
    return ", ".join(quote_ident(n) for n in names)


def _create_indexes(cur: Any, table: TableSpec, on: str) -> None:
    for cols in table.indexes:
        name = f"{on}__{'_'.join(cols)}_idx"[:63]
        cur.execute(f"CREATE INDEX IF NOT EXISTS {quote_ident(name)} ON {qualified(table.schema, on)} ({_cols(cols)})")


def reset(cur: Any, table: TableSpec, ledger_schema: str, period: str) -> None:
    """force=true: remove what earlier runs of this month loaded, so the reload does not duplicate it."""
    from loadkit import ledger

    ids = ledger.batch_ids_of(cur, ledger_schema, table.name, period)
    if table.mode == "append" and ids:
        cur.execute(f"DELETE FROM {qualified(table.schema, table.name)} WHERE {quote_ident(BATCH_COL)} = ANY(%s)",
                    (ids,))
    if table.mode != "append":
        cur.execute(f"TRUNCATE {qualified(table.schema, table.load_table)}")
    ledger.forget(cur, ledger_schema, table.name, period)


def discard_file(cur: Any, table: TableSpec, ledger_schema: str, period: str, file_sha: str) -> None:
    """Remove every committed batch of one failed file (data, rejects and ledger) in one transaction."""
    from loadkit import ledger

    ids = ledger.batch_ids_of(cur, ledger_schema, table.name, period, file_sha)
    if ids:
        cur.execute(f"DELETE FROM {qualified(table.schema, table.load_table)} WHERE {quote_ident(BATCH_COL)} = ANY(%s)",
                    (ids,))
    ledger.forget(cur, ledger_schema, table.name, period, file_sha)


def _dedup_select(table: TableSpec, ledger_schema: str, extra: str = "") -> str:
    """Staged rows, one per key when a key is declared: the last file, offset and row win."""
    names = [n for n, _ in _declared(table)] + [BATCH_COL]
    cols = ", ".join(f"s.{quote_ident(n)}" for n in names)
    stage = qualified(table.schema, table.load_table)
    batch = qualified(ledger_schema, "batch")
    order_tail = f"b.file_ordinal DESC, b.start_offset DESC, s.{quote_ident(ROW_COL)} DESC"
    if not table.key:
        return f"SELECT {cols}{extra} FROM {stage} s"
    key = ", ".join(f"s.{quote_ident(k)}" for k in table.key)
    return (f"SELECT DISTINCT ON ({key}) {cols}{extra} FROM {stage} s "
            f"JOIN {batch} b ON b.batch_id = s.{quote_ident(BATCH_COL)} ORDER BY {key}, {order_tail}")


def finalize(cur: Any, table: TableSpec, ledger_schema: str) -> Tuple[Optional[int], Optional[int]]:
    """Publish the staged rows per the table's mode. Returns (inserted, updated) where meaningful."""
    if table.mode == "append":
        return None, None
    if table.mode == "merge":
        return _finalize_merge(cur, table, ledger_schema)
    if table.mode == "replace":
        return _finalize_replace(cur, table, ledger_schema)
    return _finalize_snapshot(cur, table, ledger_schema)


def _finalize_merge(cur: Any, table: TableSpec, ledger_schema: str) -> Tuple[int, int]:
    names = [n for n, _ in _declared(table)] + [BATCH_COL]
    target = qualified(table.schema, table.name)
    updates = ", ".join(f"{quote_ident(n)} = EXCLUDED.{quote_ident(n)}" for n in names if n not in table.key)
    cur.execute(
        f"WITH up AS (INSERT INTO {target} ({_cols(tuple(names))}) {_dedup_select(table, ledger_schema)} "
        f"ON CONFLICT ({_cols(table.key)}) DO UPDATE SET {updates} RETURNING (xmax = 0) AS inserted) "
        "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up"
    )
    inserted, updated = cur.fetchone()
    cur.execute(f"TRUNCATE {qualified(table.schema, table.load_table)}")
    _create_indexes(cur, table, table.name)
    return int(inserted), int(updated)


def _finalize_replace(cur: Any, table: TableSpec, ledger_schema: str) -> Tuple[int, None]:
    new = f"{table.name}__lk_new"
    _build_table(cur, table, ledger_schema, new, extra="")
    cur.execute(f"DROP TABLE IF EXISTS {qualified(table.schema, table.name)}")
    cur.execute(f"ALTER TABLE {qualified(table.schema, new)} RENAME TO {quote_ident(table.name)}")
    _rename_indexes(cur, table, new, table.name)
    cur.execute(f"DROP TABLE {qualified(table.schema, table.load_table)}")
    cur.execute(f"SELECT count(*) FROM {qualified(table.schema, table.name)}")
    return int(cur.fetchone()[0]), None


def _build_table(cur: Any, table: TableSpec, ledger_schema: str, name: str, extra: str) -> None:
    """A fresh table from the staged rows, with PK and indexes built after the data, then ANALYZEd."""
    target = qualified(table.schema, name)
    period_col = f", {quote_ident(PERIOD_COL)} integer NOT NULL" if extra else ""
    cur.execute(f"DROP TABLE IF EXISTS {target}")
    cur.execute(f"CREATE TABLE {target} ({_column_ddl(table)}{period_col})")
    cur.execute(f"INSERT INTO {target} {_dedup_select(table, ledger_schema, extra)}")
    if table.key:
        pk_cols = table.key + ((PERIOD_COL,) if extra else ())
        cur.execute(f"ALTER TABLE {target} ADD CONSTRAINT {quote_ident(name + '_pkey')} PRIMARY KEY ({_cols(pk_cols)})")
    _create_indexes(cur, table, name)
    cur.execute(f"ANALYZE {target}")


def _rename_indexes(cur: Any, table: TableSpec, old: str, new: str) -> None:
    if table.key:
        cur.execute(f"ALTER INDEX {qualified(table.schema, old + '_pkey')} RENAME TO {quote_ident(new + '_pkey')}")
    for cols in table.indexes:
        before = f"{old}__{'_'.join(cols)}_idx"[:63]
        after = f"{new}__{'_'.join(cols)}_idx"[:63]
        cur.execute(f"ALTER INDEX {qualified(table.schema, before)} RENAME TO {quote_ident(after)}")


def _finalize_snapshot(cur: Any, table: TableSpec, ledger_schema: str) -> Tuple[int, None]:
    tag = int(table.period_tag)
    part = f"{table.name}__p{tag}"
    new = f"{part}__lk_new"
    _build_table(cur, table, ledger_schema, new, extra=f", {tag}")
    cur.execute(f"ALTER TABLE {qualified(table.schema, new)} ADD CONSTRAINT {quote_ident(new + '_period')} "
                f"CHECK ({quote_ident(PERIOD_COL)} = {tag})")
    parent = qualified(table.schema, table.name)
    cur.execute("SELECT to_regclass(%s)", (f'{quote_ident(table.schema)}.{quote_ident(part)}',))
    if cur.fetchone()[0] is not None:
        cur.execute(f"ALTER TABLE {parent} DETACH PARTITION {qualified(table.schema, part)}")
        cur.execute(f"DROP TABLE {qualified(table.schema, part)}")
    cur.execute(f"ALTER TABLE {qualified(table.schema, new)} RENAME TO {quote_ident(part)}")
    _rename_indexes(cur, table, new, part)
    cur.execute(f"ALTER TABLE {parent} ATTACH PARTITION {qualified(table.schema, part)} FOR VALUES IN ({tag})")
    cur.execute(f"DROP TABLE {qualified(table.schema, table.load_table)}")
    cur.execute(f"SELECT count(*) FROM {qualified(table.schema, part)}")
    return int(cur.fetchone()[0]), None
