"""The ledger: what each run, table, file and batch committed.

Batch rows are written by the writer in the same transaction as the batch's data
and rejects (see writer.py), so "the ledger says committed" and "the rows are there"
can never disagree. Everything else here runs in the driver over psycopg2.
"""
from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa

from loadkit.security import qualified, quote_ident

BATCH_SCHEMA = pa.schema([
    ("batch_id", pa.int64()),
    ("run_id", pa.string()),
    ("table_name", pa.string()),
    ("period", pa.string()),
    ("file_sha", pa.string()),
    ("file_ordinal", pa.int32()),
    ("member", pa.string()),
    ("start_offset", pa.int64()),
    ("end_offset", pa.int64()),
    ("first_line", pa.int64()),
    ("rows_in", pa.int64()),
    ("rows_loaded", pa.int64()),
    ("rows_rejected", pa.int64()),
    ("rows_coerced", pa.int64()),
    ("writer", pa.string()),
    ("attempts", pa.int32()),
    ("blank_lines", pa.int64()),  # blank lines skipped, not records (see writer.BATCH_COUNT_FIELDS)
])

REJECT_META = [("batch_id", pa.int64()), ("run_id", pa.string()), ("table_name", pa.string()),
               ("period", pa.string()), ("file_path", pa.string()), ("member", pa.string())]


def ddl(schema: str) -> List[str]:
    s = quote_ident(schema)
    return [
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"""CREATE TABLE IF NOT EXISTS {s}.run (
            run_id text PRIMARY KEY, job text NOT NULL, period text NOT NULL, status text NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz, host text,
            error_category text, error_text text, rows_read bigint, rows_loaded bigint, rows_rejected bigint,
            config jsonb, mlflow_run_id text)""",
        f"""CREATE TABLE IF NOT EXISTS {s}.table_load (
            run_id text NOT NULL, table_name text NOT NULL, period text NOT NULL, mode text NOT NULL,
            status text NOT NULL, files int, files_skipped int, rows_read bigint, rows_loaded bigint,
            rows_rejected bigint, inserted bigint, updated bigint, started_at timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz, seconds double precision, error_text text,
            PRIMARY KEY (run_id, table_name))""",
        f"""CREATE TABLE IF NOT EXISTS {s}.file (
            table_name text NOT NULL, period text NOT NULL, file_sha text NOT NULL, path text NOT NULL,
            ordinal int NOT NULL, size bigint NOT NULL, status text NOT NULL, rows_read bigint, rows_loaded bigint,
            rows_rejected bigint, run_id text, error_text text, updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (table_name, period, file_sha))""",
        f"""CREATE TABLE IF NOT EXISTS {s}.batch (
            batch_id bigint PRIMARY KEY, run_id text NOT NULL, table_name text NOT NULL, period text NOT NULL,
            file_sha text NOT NULL, file_ordinal int NOT NULL, member text NOT NULL, start_offset bigint NOT NULL,
            end_offset bigint NOT NULL, first_line bigint, rows_in bigint NOT NULL, rows_loaded bigint NOT NULL,
            rows_rejected bigint NOT NULL, rows_coerced bigint NOT NULL DEFAULT 0, writer text, attempts int,
            committed_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT batch_accounting CHECK (rows_in = rows_loaded + rows_rejected))""",
        f"CREATE INDEX IF NOT EXISTS batch_file_idx ON {s}.batch (table_name, period, file_sha)",
        f"""CREATE TABLE IF NOT EXISTS {s}.reject (
            batch_id bigint NOT NULL, run_id text NOT NULL, table_name text NOT NULL, period text NOT NULL,
            file_path text, member text, line_number bigint, column_name text, reason text NOT NULL, raw text,
            discarded boolean NOT NULL DEFAULT false)""",
        f"CREATE INDEX IF NOT EXISTS reject_batch_idx ON {s}.reject (batch_id)",
    ]


def migrations(schema: str) -> List[str]:
    """Columns added to ledgers created before they existed. Each statement checks the catalog first,
    so a ledger that has the column takes no ALTER TABLE lock at every run start."""
    s = quote_ident(schema)
    return [
        # Rows a finalisation collapsed as duplicate keys, and rows a full-snapshot sync deleted or closed
        # (NULL: no sync ran). Added to ledgers created before these columns existed; the catalog check
        # first, so a ledger that has them takes no ALTER TABLE lock at every run start.
        *(f"""DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{s}.table_load'::regclass
              AND attname = '{col}' AND NOT attisdropped) THEN ALTER TABLE {s}.table_load ADD COLUMN {col} bigint;
              END IF; END $$""" for col in ("duplicates", "deleted")),
        # Blank lines a batch skipped (not records: rows_in = rows_loaded + rows_rejected still holds, and
        # the batch's source lines = rows_in + blank_lines); 0 in ledgers created before the column existed.
        f"""DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{s}.batch'::regclass
              AND attname = 'blank_lines' AND NOT attisdropped) THEN
              ALTER TABLE {s}.batch ADD COLUMN blank_lines bigint NOT NULL DEFAULT 0 CHECK (blank_lines >= 0);
              END IF; END $$""",
    ]


def ensure(cur: Any, schema: str) -> None:
    # Serialise concurrent first-time creation (CREATE ... IF NOT EXISTS races on the catalog). The key is
    # the one the runner's target DDL takes per schema, so a ledger inside a target schema shares it.
    # Transaction-level: the caller runs this in one transaction (an autocommit session releases it at once).
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"loadkit-ddl:{schema}",))
    # An existing ledger needs no DDL: CREATE INDEX IF NOT EXISTS takes a SHARE lock on its table
    # before it finds the index, which deadlocks with other runs' writers (reject, then batch).
    statements = ddl(schema)
    relations = _created_relations(statements)
    missing: bool
    if relations is not None:
        cur.execute("SELECT count(to_regclass(format('%%I.%%I', %s::text, n))) FROM unnest(%s::text[]) n",
                    (schema, relations))
        missing = cur.fetchone()[0] != len(relations)
    else:
        missing = True
    if missing:
        for stmt in statements:
            cur.execute(stmt)
    for stmt in migrations(schema):
        cur.execute(stmt)
    # Ledgers created before rejects of discarded files were kept: add the column once (an
    # unconditional ALTER would take an exclusive lock on every run, stalling other jobs' writers).
    cur.execute("SELECT 1 FROM information_schema.columns WHERE table_schema=%s AND table_name='reject' "
                "AND column_name='discarded'", (schema,))
    if cur.fetchone() is None:
        cur.execute(f"ALTER TABLE {qualified(schema, 'reject')} ADD COLUMN discarded boolean NOT NULL DEFAULT false")


_CREATE = re.compile(r'^\s*CREATE (?:TABLE|(?:UNIQUE )?INDEX) IF NOT EXISTS (?:"[^"]+"\.)?"?(\w+)"?', re.IGNORECASE)


def _created_relations(statements: List[str]) -> Optional[List[str]]:
    """The relations ddl() creates, if it only creates relations (IF NOT EXISTS); None if it does more
    (a schema aside, e.g. an ALTER), in which case ensure() always runs it."""
    names = []
    for stmt in statements:
        if stmt.lstrip().upper().startswith("CREATE SCHEMA IF NOT EXISTS"):
            continue
        m = _CREATE.match(stmt)
        if m is None:
            return None
        names.append(m.group(1))
    return names


def try_lock_job(cur: Any, schema: str, job: str, period: str) -> bool:
    """A session advisory lock so two runs of the same job and month on one ledger never interleave.

    The ledger schema is part of the key: runs writing to different ledgers share nothing."""
    cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (f"loadkit-run:{schema}:{job}:{period}",))
    return bool(cur.fetchone()[0])


def start_run(cur: Any, schema: str, run_id: str, job: str, period: str, config: Dict[str, Any]) -> None:
    cur.execute(
        f"INSERT INTO {qualified(schema, 'run')} (run_id, job, period, status, host, config) "
        "VALUES (%s, %s, %s, 'running', %s, %s)",
        (run_id, job, period, socket.gethostname(), json.dumps(config, default=str)),
    )


def finish_run(cur: Any, schema: str, run_id: str, status: str, totals: Tuple[int, int, int],
               category: Optional[str] = None, error: Optional[str] = None,
               mlflow_run_id: Optional[str] = None) -> None:
    cur.execute(
        f"UPDATE {qualified(schema, 'run')} SET status=%s, finished_at=now(), rows_read=%s, rows_loaded=%s, "
        "rows_rejected=%s, error_category=%s, error_text=%s, mlflow_run_id=coalesce(%s, mlflow_run_id) "
        "WHERE run_id=%s",
        (status, *totals, category, error, mlflow_run_id, run_id),
    )


def start_table(cur: Any, schema: str, run_id: str, table: str, period: str, mode: str, files: int,
                skipped: int) -> None:
    cur.execute(
        f"INSERT INTO {qualified(schema, 'table_load')} (run_id, table_name, period, mode, status, files, "
        "files_skipped) VALUES (%s, %s, %s, %s, 'loading', %s, %s) "
        "ON CONFLICT (run_id, table_name) DO NOTHING",
        (run_id, table, period, mode, files, skipped),
    )


@dataclass
class TableOutcome:
    status: str
    rows_read: int = 0
    rows_loaded: int = 0
    rows_rejected: int = 0
    inserted: Optional[int] = None
    updated: Optional[int] = None
    seconds: float = 0.0
    error: Optional[str] = None


def finish_table(cur: Any, schema: str, run_id: str, table: str, o: TableOutcome) -> None:
    cur.execute(
        f"UPDATE {qualified(schema, 'table_load')} SET status=%s, rows_read=%s, rows_loaded=%s, rows_rejected=%s, "
        "inserted=%s, updated=%s, seconds=%s, error_text=%s, finished_at=now() WHERE run_id=%s AND table_name=%s",
        (o.status, o.rows_read, o.rows_loaded, o.rows_rejected, o.inserted, o.updated, o.seconds, o.error,
         run_id, table),
    )


def record_collapse(cur: Any, schema: str, run_id: str, table: str, duplicates: Optional[int],
                    deleted: Optional[int]) -> None:
    """Duplicates collapsed by the finalisation and rows deleted/closed by a sync (None: no sync ran)."""
    cur.execute(f"UPDATE {qualified(schema, 'table_load')} SET duplicates=coalesce(%s, duplicates), "
                "deleted=coalesce(%s, deleted) WHERE run_id=%s AND table_name=%s",
                (duplicates, deleted, run_id, table))


def loaded_files(cur: Any, schema: str, table: str, period: str) -> Dict[str, str]:
    """file sha -> status for this table and month."""
    cur.execute(f"SELECT file_sha, status FROM {qualified(schema, 'file')} WHERE table_name=%s AND period=%s",
                (table, period))
    return {sha: status for sha, status in cur.fetchall()}


def committed_ranges(cur: Any, schema: str, table: str, period: str) -> Dict[Tuple[str, str], List[Tuple[int, int]]]:
    """(file sha, member) -> sorted committed byte ranges, for the resume."""
    cur.execute(
        f"SELECT file_sha, member, start_offset, end_offset FROM {qualified(schema, 'batch')} "
        "WHERE table_name=%s AND period=%s ORDER BY file_sha, member, start_offset",
        (table, period),
    )
    out: Dict[Tuple[str, str], List[Tuple[int, int]]] = {}
    for sha, member, start, end in cur.fetchall():
        out.setdefault((sha, member), []).append((int(start), int(end)))
    return out


def file_totals(cur: Any, schema: str, table: str, period: str, file_sha: str) -> Tuple[int, int, int]:
    cur.execute(
        f"SELECT coalesce(sum(rows_in),0), coalesce(sum(rows_loaded),0), coalesce(sum(rows_rejected),0) "
        f"FROM {qualified(schema, 'batch')} WHERE table_name=%s AND period=%s AND file_sha=%s",
        (table, period, file_sha),
    )
    r = cur.fetchone()
    return int(r[0]), int(r[1]), int(r[2])


def mark_file(cur: Any, schema: str, run_id: str, table: str, period: str, sha: str, path: str, ordinal: int,
              size: int, status: str, totals: Tuple[int, int, int] = (0, 0, 0), error: Optional[str] = None) -> None:
    cur.execute(
        f"INSERT INTO {qualified(schema, 'file')} (table_name, period, file_sha, path, ordinal, size, status, "
        "rows_read, rows_loaded, rows_rejected, run_id, error_text) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
        "ON CONFLICT (table_name, period, file_sha) DO UPDATE SET status=EXCLUDED.status, path=EXCLUDED.path, "
        "ordinal=EXCLUDED.ordinal, rows_read=EXCLUDED.rows_read, rows_loaded=EXCLUDED.rows_loaded, "
        "rows_rejected=EXCLUDED.rows_rejected, run_id=EXCLUDED.run_id, error_text=EXCLUDED.error_text, "
        "updated_at=now()",
        (table, period, sha, path, ordinal, size, status, *totals, run_id, error),
    )


def mark_files_loaded(cur: Any, schema: str, table: str, period: str) -> None:
    """After a finalisation: every staged file of the table's month is now published."""
    cur.execute(f"UPDATE {qualified(schema, 'file')} SET status='loaded', updated_at=now() "
                "WHERE table_name=%s AND period=%s AND status='staged'", (table, period))


def batch_ids_of(cur: Any, schema: str, table: str, period: str, file_sha: Optional[str] = None) -> List[int]:
    sql = f"SELECT batch_id FROM {qualified(schema, 'batch')} WHERE table_name=%s AND period=%s"
    args: Sequence[Any] = (table, period)
    if file_sha is not None:
        sql += " AND file_sha=%s"
        args = (table, period, file_sha)
    cur.execute(sql, args)
    return [int(r[0]) for r in cur.fetchall()]


def unpublished_batches(cur: Any, schema: str, table: str, period: str) -> Dict[int, int]:
    """batch id -> rows_loaded of committed batches whose file is not yet published (still in staging)."""
    cur.execute(
        f"SELECT b.batch_id, b.rows_loaded FROM {qualified(schema, 'batch')} b "
        f"LEFT JOIN {qualified(schema, 'file')} f "
        "ON f.table_name = b.table_name AND f.period = b.period AND f.file_sha = b.file_sha "
        "WHERE b.table_name=%s AND b.period=%s AND f.status IS DISTINCT FROM 'loaded'",
        (table, period),
    )
    return {int(b): int(n) for b, n in cur.fetchall()}


@dataclass(frozen=True)
class StagedBatch:
    """A committed batch whose rows should still be in staging (its file is not published yet)."""

    batch_id: int
    run_id: str
    rows_in: int
    rows_loaded: int
    rows_rejected: int


def unpublished_batch_rows(cur: Any, schema: str, table: str, period: str) -> Dict[int, StagedBatch]:
    """batch id -> StagedBatch for committed batches of unpublished files: what staging must hold."""
    cur.execute(
        f"SELECT b.batch_id, b.run_id, b.rows_in, b.rows_loaded, b.rows_rejected FROM {qualified(schema, 'batch')} b "
        f"LEFT JOIN {qualified(schema, 'file')} f "
        "ON f.table_name = b.table_name AND f.period = b.period AND f.file_sha = b.file_sha "
        "WHERE b.table_name=%s AND b.period=%s AND f.status IS DISTINCT FROM 'loaded'",
        (table, period),
    )
    return {int(r[0]): StagedBatch(int(r[0]), r[1], int(r[2]), int(r[3]), int(r[4])) for r in cur.fetchall()}


def staged_files(cur: Any, schema: str, table: str, period: str) -> int:
    """How many files of the table's month are staged but not yet published."""
    cur.execute(f"SELECT count(*) FROM {qualified(schema, 'file')} WHERE table_name=%s AND period=%s "
                "AND status='staged'", (table, period))
    return int(cur.fetchone()[0])


# Rejects kept per discarded file (the first lines), so a failed run still shows why.
REJECTS_KEPT_PER_FILE = 1000


def forget_batches(cur: Any, schema: str, ids: Sequence[int], keep_rejects: int = 0) -> None:
    """Drop these batches and their rejects from the ledger, so a resume reads their byte ranges again.

    ``keep_rejects``: keep that many of their rejects (lowest member and line first), marked
    ``discarded = true``: the record of a failed run, counted in no batch and never forgotten
    here (rejects already marked discarded are left alone)."""
    if ids:
        if keep_rejects > 0:
            cur.execute(f"UPDATE {qualified(schema, 'reject')} SET discarded = true WHERE ctid IN ("
                        f"SELECT ctid FROM {qualified(schema, 'reject')} WHERE batch_id = ANY(%s) AND NOT discarded "
                        "ORDER BY member, line_number LIMIT %s)", (list(ids), keep_rejects))
        cur.execute(f"DELETE FROM {qualified(schema, 'reject')} WHERE batch_id = ANY(%s) AND NOT discarded",
                    (list(ids),))
        cur.execute(f"DELETE FROM {qualified(schema, 'batch')} WHERE batch_id = ANY(%s)", (list(ids),))


def forget(cur: Any, schema: str, table: str, period: str, file_sha: Optional[str] = None,
           keep_rejects: int = 0) -> None:
    """Drop ledger entries (batches, rejects, file rows) of a table's month, or of one file;
    ``keep_rejects`` as in forget_batches."""
    forget_batches(cur, schema, batch_ids_of(cur, schema, table, period, file_sha), keep_rejects)
    if file_sha is None:
        cur.execute(f"DELETE FROM {qualified(schema, 'file')} WHERE table_name=%s AND period=%s", (table, period))
    else:
        cur.execute(f"DELETE FROM {qualified(schema, 'file')} WHERE table_name=%s AND period=%s AND file_sha=%s",
                    (table, period, file_sha))


def mark_stale_runs(cur: Any, schema: str, job: str, period: str) -> int:
    """Runs left 'running' by a killed driver (we hold the job lock, so none is alive): mark them crashed,
    and close their table rows still 'loading' the same way."""
    cur.execute(
        f"UPDATE {qualified(schema, 'run')} SET status='crashed', finished_at=coalesce(finished_at, now()) "
        "WHERE job=%s AND period=%s AND status='running' RETURNING run_id",
        (job, period),
    )
    stale = [r[0] for r in cur.fetchall()]
    cur.execute(
        f"UPDATE {qualified(schema, 'table_load')} t SET status='crashed', finished_at=coalesce(t.finished_at, now()) "
        f"FROM {qualified(schema, 'run')} r WHERE r.run_id = t.run_id AND r.job=%s AND r.period=%s "
        "AND r.status <> 'running' AND t.status = 'loading'",
        (job, period),
    )
    return len(stale)


def reject_sample(cur: Any, schema: str, run_id: str, limit: int = 200) -> pa.Table:
    """A few of the rows a run rejected (file, line, column, reason, raw text), for its MLflow record."""
    cols = ("table_name", "file_path", "member", "line_number", "column_name", "reason", "raw", "discarded")
    cur.execute(f"SELECT {', '.join(cols)} FROM {qualified(schema, 'reject')} WHERE run_id=%s "
                "ORDER BY table_name, file_path, line_number LIMIT %s", (run_id, limit))
    rows = cur.fetchall()
    return pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)}) if rows else pa.table({})


# ---------------------------------------------------------------- file identity: is a claim still true?


def claimed_batches_sql(schema: str) -> str:
    """SQL selecting the batch ids of a table's published files in one period (args: table, period)."""
    return (f"SELECT b.batch_id FROM {qualified(schema, 'batch')} b JOIN {qualified(schema, 'file')} f "
            "ON f.table_name = b.table_name AND f.period = b.period AND f.file_sha = b.file_sha "
            "WHERE b.table_name = %s AND b.period = %s AND f.status = 'loaded'")


def claimed_rows(cur: Any, schema: str, table: str, period: str) -> int:
    """Rows the ledger says the table's published files of this period put into the target."""
    cur.execute(f"SELECT coalesce(sum(rows_loaded), 0) FROM {qualified(schema, 'file')} "
                "WHERE table_name=%s AND period=%s AND status='loaded'", (table, period))
    return int(cur.fetchone()[0])


def claimed_or_later_sql(schema: str) -> str:
    """SQL selecting the batch ids of a table's published batches committed at or after the first
    batch of this period (args: table, period, table): for merge/replace targets, where a later
    period's batches legitimately overwrite this one's rows."""
    return (f"SELECT b.batch_id FROM {qualified(schema, 'batch')} b JOIN {qualified(schema, 'file')} f "
            "ON f.table_name = b.table_name AND f.period = b.period AND f.file_sha = b.file_sha "
            "WHERE b.table_name = %s AND f.status = 'loaded' AND b.committed_at >= "
            f"(SELECT min(committed_at) FROM {qualified(schema, 'batch')} WHERE table_name = %s AND period = %s)")


def loaded_elsewhere(cur: Any, schema: str, table: str, period: str, file_sha: str) -> List[Tuple[str, int]]:
    """(period, rows_loaded) of the other periods under which this file's content is loaded into the table."""
    cur.execute(f"SELECT period, coalesce(rows_loaded, 0) FROM {qualified(schema, 'file')} "
                "WHERE table_name=%s AND file_sha=%s AND period <> %s AND status='loaded' ORDER BY period",
                (table, file_sha, period))
    return [(str(p), int(n)) for p, n in cur.fetchall()]
