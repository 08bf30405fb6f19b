"""The ledger: what each run, table, file and batch committed -- and every statement on it.

``Ledger(schema)`` owns every SQL statement on the ledger's tables (run, table_load, file,
batch, reject), all in one parameter style (``%s``, psycopg2's), with named constraints.
The writer's two statements (the "already committed?" probe and the ledger-row COPY) run on
an ADBC cursor; the probe binds no parameter at all (the batch id is an integer literal), so
no statement here is spelled twice for two drivers. A duplicate commit is recognised by the
violated constraint's name from the error's diagnostics (``Ledger.is_duplicate_batch``),
never by searching the message text.

Batch rows are written by the writer in the same transaction as the batch's data and
rejects (see writer.py), so "the ledger says committed" and "the rows are there" can never
disagree. Everything else runs in the driver over psycopg2.

Tables and columns are unchanged from earlier ledgers (existing ledgers keep working): the
constraint names are PostgreSQL's own defaults, now spelled out; ``migrations()`` adds the
columns that came later.
"""
from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from typing import Callable, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pyarrow as pa

from loadkit.postgres.db import diag_constraint
from loadkit.errors import sqlstate_of
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
    ("rules", pa.string()),  # plan.read_rules of the rules that read the batch (NULL in older ledgers)
    ("file_path", pa.string()),  # the file's path under the data root when read (NULL in older ledgers)
])

REJECT_META = [("batch_id", pa.int64()), ("run_id", pa.string()), ("table_name", pa.string()),
               ("period", pa.string()), ("file_path", pa.string()), ("member", pa.string())]

# Rejects kept per discarded file (the first lines), so a failed run still shows why.
REJECTS_KEPT_PER_FILE = 1000

# Constraint names (PostgreSQL's defaults for these tables, so ledgers created before they were
# spelled out carry the same names). BATCH_PKEY is how a duplicate commit is recognised.
RUN_PKEY = "run_pkey"
TABLE_LOAD_PKEY = "table_load_pkey"
FILE_PKEY = "file_pkey"
BATCH_PKEY = "batch_pkey"
BATCH_ACCOUNTING = "batch_accounting"
BATCH_BLANK_LINES = "batch_blank_lines_check"
TARGET_PKEY = "target_pkey"

_UNIQUE_VIOLATION = "23505"


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
    rows_discarded: int = 0  # loaded, then discarded with failed files (metrics.TableMetrics.rows_discarded)


@dataclass(frozen=True)
class StagedBatch:
    """A committed batch whose rows should still be in staging (its file is not published yet)."""

    batch_id: int
    run_id: str
    rows_in: int
    rows_loaded: int
    rows_rejected: int
    rows_coerced: int = 0
    blank_lines: int = 0


@dataclass(frozen=True)
class LedgerBatch:
    """One committed batch as the ledger has it (``Ledger.file_batches``): who committed which byte
    range of which member, with its counts. ``committed_at`` is epoch seconds (the transaction's start)."""

    batch_id: int
    run_id: str
    member: str
    start: int  # [start, end) bytes of the member (parquet: row offsets)
    end: int
    first_line: int
    rows_in: int
    rows_loaded: int
    rows_rejected: int
    rows_coerced: int
    blank_lines: int
    writer: str
    attempts: int
    committed_at: float


@dataclass(frozen=True)
class RunTotals:
    """A table's batches committed by one run, summed (``Ledger.run_totals``): what its summary must say."""

    batches: int = 0
    rows_in: int = 0
    rows_loaded: int = 0
    rows_rejected: int = 0
    rows_coerced: int = 0
    blank_lines: int = 0


_CREATE = re.compile(r'^\s*CREATE (?:TABLE|(?:UNIQUE )?INDEX) IF NOT EXISTS (?:"[^"]+"\.)?"?(\w+)"?', re.IGNORECASE)


class Ledger:
    """Every statement on the ledger in ``schema``. Methods take the caller's cursor: the caller
    owns the transaction (a file's settlement, a table's publication) the statement belongs to.

    Cheap and immutable: build one wherever a schema is known (``Ledger(plan.ledger_schema)``)."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.run = qualified(schema, "run")
        self.table_load = qualified(schema, "table_load")
        self.file = qualified(schema, "file")
        self.batch = qualified(schema, "batch")
        self.reject = qualified(schema, "reject")
        self.target = qualified(schema, "target")

    def __repr__(self) -> str:
        return f"Ledger({self.schema!r})"

    # ------------------------------------------------------------ shape

    def ddl(self) -> List[str]:
        s = quote_ident(self.schema)
        return [
            f"CREATE SCHEMA IF NOT EXISTS {s}",
            f"""CREATE TABLE IF NOT EXISTS {s}.run (
                run_id text NOT NULL, job text NOT NULL, period text NOT NULL, status text NOT NULL,
                started_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz, host text,
                error_category text, error_text text, rows_read bigint, rows_loaded bigint, rows_rejected bigint,
                config jsonb, mlflow_run_id text,
                CONSTRAINT {RUN_PKEY} PRIMARY KEY (run_id))""",
            f"""CREATE TABLE IF NOT EXISTS {s}.table_load (
                run_id text NOT NULL, table_name text NOT NULL, period text NOT NULL, mode text NOT NULL,
                status text NOT NULL, files int, files_skipped int, rows_read bigint, rows_loaded bigint,
                rows_rejected bigint, inserted bigint, updated bigint, started_at timestamptz NOT NULL DEFAULT now(),
                finished_at timestamptz, seconds double precision, error_text text,
                CONSTRAINT {TABLE_LOAD_PKEY} PRIMARY KEY (run_id, table_name))""",
            f"""CREATE TABLE IF NOT EXISTS {s}.file (
                table_name text NOT NULL, period text NOT NULL, file_sha text NOT NULL, path text NOT NULL,
                ordinal int NOT NULL, size bigint NOT NULL, status text NOT NULL, rows_read bigint,
                rows_loaded bigint, rows_rejected bigint, run_id text, error_text text,
                updated_at timestamptz NOT NULL DEFAULT now(),
                CONSTRAINT {FILE_PKEY} PRIMARY KEY (table_name, period, file_sha))""",
            f"""CREATE TABLE IF NOT EXISTS {s}.batch (
                batch_id bigint NOT NULL, run_id text NOT NULL, table_name text NOT NULL, period text NOT NULL,
                file_sha text NOT NULL, file_ordinal int NOT NULL, member text NOT NULL, start_offset bigint NOT NULL,
                end_offset bigint NOT NULL, first_line bigint, rows_in bigint NOT NULL, rows_loaded bigint NOT NULL,
                rows_rejected bigint NOT NULL, rows_coerced bigint NOT NULL DEFAULT 0, writer text, attempts int,
                committed_at timestamptz NOT NULL DEFAULT now(), rules text, file_path text,
                CONSTRAINT {BATCH_PKEY} PRIMARY KEY (batch_id),
                CONSTRAINT {BATCH_ACCOUNTING} CHECK (rows_in = rows_loaded + rows_rejected))""",
            f"CREATE INDEX IF NOT EXISTS batch_file_idx ON {s}.batch (table_name, period, file_sha)",
            f"""CREATE TABLE IF NOT EXISTS {s}.reject (
                batch_id bigint NOT NULL, run_id text NOT NULL, table_name text NOT NULL, period text NOT NULL,
                file_path text, member text, line_number bigint, column_name text, reason text NOT NULL, raw text,
                discarded boolean NOT NULL DEFAULT false)""",
            f"CREATE INDEX IF NOT EXISTS reject_batch_idx ON {s}.reject (batch_id)",
            # Which target schema a table name's rows of a period account for (claim_targets).
            f"""CREATE TABLE IF NOT EXISTS {s}.target (
                table_name text NOT NULL, period text NOT NULL, target_schema text NOT NULL, job text NOT NULL,
                claimed_at timestamptz NOT NULL DEFAULT now(),
                CONSTRAINT {TARGET_PKEY} PRIMARY KEY (table_name, period))""",
        ]

    def migrations(self) -> List[str]:
        """Columns added to ledgers created before they existed. Each statement checks the catalog first,
        so a ledger that has the column takes no ALTER TABLE lock at every run start (an unconditional
        ALTER takes an exclusive lock, stalling other jobs' writers)."""
        s = quote_ident(self.schema)

        def add(table: str, col: str, ddl: str) -> str:
            return (f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{s}.{table}'::regclass "
                    f"AND attname = '{col}' AND NOT attisdropped) THEN ALTER TABLE {s}.{table} ADD COLUMN {col} {ddl}; "
                    "END IF; END $$")

        return [
            # Rows a finalisation collapsed as duplicate keys, and rows a full-snapshot sync deleted or
            # closed (NULL: no sync ran).
            add("table_load", "duplicates", "bigint"),
            add("table_load", "deleted", "bigint"),
            # Merge keys whose row was already as staged (not rewritten): inserted + updated + unchanged
            # + duplicates = rows_loaded. NULL in rows older ledgers wrote (their updated counted them).
            add("table_load", "unchanged", "bigint"),
            # Blank lines a batch skipped (not records: rows_in = rows_loaded + rows_rejected still holds,
            # and the batch's source lines = rows_in + blank_lines); 0 in older ledgers.
            add("batch", "blank_lines",
                f"bigint NOT NULL DEFAULT 0 CONSTRAINT {BATCH_BLANK_LINES} CHECK (blank_lines >= 0)"),
            # Rejects of discarded files are kept (marked) since a failed run must show why.
            add("reject", "discarded", "boolean NOT NULL DEFAULT false"),
            # The read rules' fingerprint of each batch (plan.read_rules); NULL in rows older ledgers wrote.
            add("batch", "rules", "text"),
            # The path (under the data root) the batch's file was read from; NULL in rows older ledgers wrote.
            # What tells a file whose content changed at the same path since a crash (replaced_files).
            add("batch", "file_path", "text"),
            # Records a run loaded from files that then failed and were discarded whole (rows_read = rows_loaded
            # + rows_rejected + rows_discarded); NULL in rows older ledgers wrote (they counted them as loaded).
            add("run", "rows_discarded", "bigint"),
            add("table_load", "rows_discarded", "bigint"),
        ]

    def ensure(self, cur: Any) -> None:
        """Create the ledger if missing and migrate an older one; in the caller's one transaction.

        Serialises concurrent first-time creation (CREATE ... IF NOT EXISTS races on the catalog)
        under the schema's DDL lock -- the key the sink's target DDL takes per schema, so a ledger
        inside a target schema shares it. An existing ledger takes no DDL at all: CREATE INDEX IF
        NOT EXISTS takes a SHARE lock on its table before it finds the index, which deadlocks with
        other runs' writers (reject, then batch)."""
        ddl_lock(cur, self.schema)
        statements = self.ddl()
        relations = _created_relations(statements)
        missing = True
        if relations is not None:
            cur.execute("SELECT count(to_regclass(format('%%I.%%I', %s::text, n))) FROM unnest(%s::text[]) n",
                        (self.schema, relations))
            missing = cur.fetchone()[0] != len(relations)
        if missing:
            for stmt in statements:
                cur.execute(stmt)
        for stmt in self.migrations():
            cur.execute(stmt)

    # ------------------------------------------------------------ runs

    def job_lock_key(self, job: str, period: str) -> str:
        """The advisory-lock key of one job and period on this ledger (runs on other ledgers share nothing)."""
        return f"loadkit-run:{self.schema}:{job}:{period}"

    def try_lock_job(self, cur: Any, job: str, period: str) -> bool:
        """A session advisory lock so two runs of the same job and period on one ledger never interleave."""
        return _try_advisory_lock(cur, self.job_lock_key(job, period))

    def claim_targets(self, cur: Any, period: str, job: str, targets: Mapping[str, str]) -> List[Tuple[str, str, str]]:
        """Record that this ledger's rows of each table name in ``targets`` (name -> target schema) and
        ``period`` account for that schema's table; returns (table, schema, job) for each name already
        claimed for another schema whose table still exists -- the run must not load it through this ledger.

        The ledger tells tables apart by name and period only (file, batch, table_load rows), and
        ``sink.ledger_schema`` defaults to one ``loadkit`` schema per database. Two jobs with a same-named
        table loading one period into two schemas would read each other's claims as their own: each run's
        identity check found its own target missing the other's rows and forgot the other's claims, so the
        other job's next run read its files again -- an append target got every row twice. A claim whose
        table is gone (the target dropped, or moved to another schema) is taken over. Call under the run's
        locks (try_lock_tables) so two first claims cannot race."""
        names, schemas = sorted(targets), json.dumps(dict(targets))
        cur.execute(f"DELETE FROM {self.target} c WHERE c.period = %s AND c.table_name = ANY(%s::text[]) "
                    "AND c.target_schema <> (%s::jsonb ->> c.table_name) "
                    "AND to_regclass(format('%%I.%%I', c.target_schema, c.table_name)) IS NULL",
                    (period, names, schemas))
        cur.execute(f"INSERT INTO {self.target} (table_name, period, target_schema, job) "
                    "SELECT n, %s, %s::jsonb ->> n, %s FROM unnest(%s::text[]) n "
                    f"ON CONFLICT ON CONSTRAINT {TARGET_PKEY} DO NOTHING",
                    (period, schemas, job, names))
        cur.execute(f"SELECT table_name, target_schema, job FROM {self.target} WHERE period = %s "
                    "AND table_name = ANY(%s::text[]) ORDER BY table_name", (period, names))
        return [(str(t), str(schema), str(owner)) for t, schema, owner in cur.fetchall() if schema != targets[t]]

    def table_lock_key(self, table: str, period: str) -> str:
        """The advisory-lock key of one table name and period on this ledger, whatever the job."""
        return f"loadkit-table:{self.schema}:{table}:{period}"

    def try_lock_tables(self, cur: Any, tables: Sequence[str], period: str) -> Optional[str]:
        """Session advisory locks on ``tables`` of ``period``, taken with the job lock: None when all are
        taken, else the first table another session holds (the ones taken here are given back).

        The ledger knows a table by its name and period only (file, batch and table_load rows), so two
        jobs whose tables share a name -- their own jobs in their own folders, one default ledger schema
        -- would read each other's batches as their own: a publish's verify_staging would count the other
        job's batches as lost from its staging and forget them. Their runs of one period therefore never
        overlap; one after the other, claim_targets refuses a second target schema for the same name."""
        taken: List[str] = []
        for table in sorted(set(tables)):
            key = self.table_lock_key(table, period)
            if not _try_advisory_lock(cur, key):
                for held in taken:
                    cur.execute("SELECT pg_advisory_unlock(hashtext(%s))", (held,))
                return table
            taken.append(key)
        return None

    def start_run(self, cur: Any, run_id: str, job: str, period: str, config: Dict[str, Any]) -> None:
        cur.execute(f"INSERT INTO {self.run} (run_id, job, period, status, host, config) "
                    "VALUES (%s, %s, %s, 'running', %s, %s)",
                    (run_id, job, period, socket.gethostname(), json.dumps(config, default=str)))

    def run_status(self, cur: Any, run_id: str) -> Optional[str]:
        cur.execute(f"SELECT status FROM {self.run} WHERE run_id = %s", (run_id,))
        row = cur.fetchone()
        return None if row is None else str(row[0])

    def finish_run(self, cur: Any, run_id: str, status: str, totals: Tuple[int, int, int],
                   category: Optional[str] = None, error: Optional[str] = None,
                   mlflow_run_id: Optional[str] = None, discarded: int = 0) -> None:
        """``totals``: (rows read, loaded, rejected); ``discarded``: rows loaded, then discarded with failed files."""
        cur.execute(f"UPDATE {self.run} SET status=%s, finished_at=now(), rows_read=%s, rows_loaded=%s, "
                    "rows_rejected=%s, rows_discarded=%s, error_category=%s, error_text=%s, "
                    "mlflow_run_id=coalesce(%s, mlflow_run_id) WHERE run_id=%s",
                    (status, *totals, discarded, category, error, mlflow_run_id, run_id))

    def mark_stale_runs(self, cur: Any, job: str, period: str) -> int:
        """Runs left 'running' by a killed driver (we hold the job lock, so none is alive): mark them
        crashed, and close their table rows still 'loading' the same way."""
        cur.execute(f"UPDATE {self.run} SET status='crashed', finished_at=coalesce(finished_at, now()) "
                    "WHERE job=%s AND period=%s AND status='running' RETURNING run_id", (job, period))
        stale = [r[0] for r in cur.fetchall()]
        cur.execute(f"UPDATE {self.table_load} t SET status='crashed', finished_at=coalesce(t.finished_at, now()) "
                    f"FROM {self.run} r WHERE r.run_id = t.run_id AND r.job=%s AND r.period=%s "
                    "AND r.status <> 'running' AND t.status = 'loading'", (job, period))
        return len(stale)

    # ------------------------------------------------------------ tables of a run

    def start_table(self, cur: Any, run_id: str, table: str, period: str, mode: str, files: int,
                    skipped: int) -> None:
        cur.execute(f"INSERT INTO {self.table_load} (run_id, table_name, period, mode, status, files, "
                    "files_skipped) VALUES (%s, %s, %s, %s, 'loading', %s, %s) "
                    f"ON CONFLICT ON CONSTRAINT {TABLE_LOAD_PKEY} DO NOTHING",
                    (run_id, table, period, mode, files, skipped))

    def finish_table(self, cur: Any, run_id: str, table: str, o: TableOutcome) -> None:
        cur.execute(f"UPDATE {self.table_load} SET status=%s, rows_read=%s, rows_loaded=%s, rows_rejected=%s, "
                    "rows_discarded=%s, inserted=%s, updated=%s, seconds=%s, error_text=%s, finished_at=now() "
                    "WHERE run_id=%s AND table_name=%s",
                    (o.status, o.rows_read, o.rows_loaded, o.rows_rejected, o.rows_discarded, o.inserted, o.updated,
                     o.seconds, o.error, run_id, table))

    def record_collapse(self, cur: Any, run_id: str, table: str, duplicates: Optional[int],
                        deleted: Optional[int], unchanged: Optional[int] = None) -> None:
        """Duplicates collapsed by the finalisation, rows deleted/closed by a sync (None: no sync ran) and
        merge rows found equal to the target's and left as they were (None: not a merge)."""
        cur.execute(f"UPDATE {self.table_load} SET duplicates=coalesce(%s, duplicates), "
                    "deleted=coalesce(%s, deleted), unchanged=coalesce(%s, unchanged) "
                    "WHERE run_id=%s AND table_name=%s", (duplicates, deleted, unchanged, run_id, table))

    def sync_done(self, cur: Any, table: str, period: str) -> bool:
        """True if a run already synced this table's period (table_load.deleted is set only by a sync)."""
        cur.execute(f"SELECT 1 FROM {self.table_load} WHERE table_name=%s AND period=%s "
                    "AND deleted IS NOT NULL LIMIT 1", (table, period))
        return cur.fetchone() is not None

    # ------------------------------------------------------------ files

    def loaded_files(self, cur: Any, table: str, period: str) -> Dict[str, str]:
        """file sha -> status for this table and period."""
        cur.execute(f"SELECT file_sha, status FROM {self.file} WHERE table_name=%s AND period=%s", (table, period))
        return {sha: status for sha, status in cur.fetchall()}

    def file_totals(self, cur: Any, table: str, period: str, file_sha: str) -> Tuple[int, int, int]:
        """(rows_in, rows_loaded, rows_rejected) summed over the file's committed batches."""
        cur.execute(f"SELECT coalesce(sum(rows_in),0), coalesce(sum(rows_loaded),0), coalesce(sum(rows_rejected),0) "
                    f"FROM {self.batch} WHERE table_name=%s AND period=%s AND file_sha=%s", (table, period, file_sha))
        r = cur.fetchone()
        return int(r[0]), int(r[1]), int(r[2])

    def mark_file(self, cur: Any, run_id: str, table: str, period: str, sha: str, path: str, ordinal: int,
                  size: int, status: str, totals: Tuple[int, int, int] = (0, 0, 0),
                  error: Optional[str] = None) -> None:
        cur.execute(
            f"INSERT INTO {self.file} (table_name, period, file_sha, path, ordinal, size, status, "
            "rows_read, rows_loaded, rows_rejected, run_id, error_text) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            f"ON CONFLICT ON CONSTRAINT {FILE_PKEY} DO UPDATE SET status=EXCLUDED.status, path=EXCLUDED.path, "
            "ordinal=EXCLUDED.ordinal, rows_read=EXCLUDED.rows_read, rows_loaded=EXCLUDED.rows_loaded, "
            "rows_rejected=EXCLUDED.rows_rejected, run_id=EXCLUDED.run_id, error_text=EXCLUDED.error_text, "
            "updated_at=now()",
            (table, period, sha, path, ordinal, size, status, *totals, run_id, error))

    def mark_files_loaded(self, cur: Any, table: str, period: str) -> None:
        """After a finalisation: every staged file of the table's period is now published."""
        cur.execute(f"UPDATE {self.file} SET status='loaded', updated_at=now() "
                    "WHERE table_name=%s AND period=%s AND status='staged'", (table, period))

    def staged_files(self, cur: Any, table: str, period: str) -> int:
        """How many files of the table's period are staged but not yet published."""
        cur.execute(f"SELECT count(*) FROM {self.file} WHERE table_name=%s AND period=%s AND status='staged'",
                    (table, period))
        return int(cur.fetchone()[0])

    def fewer_files_than_before(self, cur: Any, table: str, period: str, files: int) -> Optional[int]:
        """The file count of the table's latest earlier period, if it had more files than ``files``."""
        cur.execute(f"SELECT count(*) FROM {self.file} WHERE table_name=%s AND status='loaded' AND period = "
                    f"(SELECT max(period) FROM {self.file} WHERE table_name=%s AND period < %s AND status='loaded')",
                    (table, table, period))
        before = int(cur.fetchone()[0])
        return before if before > files else None

    def loaded_elsewhere(self, cur: Any, table: str, period: str, file_sha: str) -> List[Tuple[str, int]]:
        """(period, rows_loaded) of the other periods under which this file's content is loaded into the table."""
        cur.execute(f"SELECT period, coalesce(rows_loaded, 0) FROM {self.file} "
                    "WHERE table_name=%s AND file_sha=%s AND period <> %s AND status='loaded' ORDER BY period",
                    (table, file_sha, period))
        return [(str(p), int(n)) for p, n in cur.fetchall()]

    # ------------------------------------------------------------ batches

    def committed_ranges(self, cur: Any, table: str, period: str) -> Dict[Tuple[str, str], List[Tuple[int, int]]]:
        """(file sha, member) -> sorted committed byte ranges, for the resume."""
        cur.execute(f"SELECT file_sha, member, start_offset, end_offset FROM {self.batch} "
                    "WHERE table_name=%s AND period=%s ORDER BY file_sha, member, start_offset", (table, period))
        out: Dict[Tuple[str, str], List[Tuple[int, int]]] = {}
        for sha, member, start, end in cur.fetchall():
            out.setdefault((sha, member), []).append((int(start), int(end)))
        return out

    def read_by_other_rules(self, cur: Any, table: str, period: str, rules: str,
                            files: Sequence[str]) -> Dict[str, int]:
        """file sha -> its committed batches, for each of ``files`` (the run's file shas) that is not published
        ('loaded') in the table's period and has a committed batch read by rules other than ``rules``
        (plan.read_rules). A batch an older ledger wrote (rules NULL) counts as read by these rules: nothing
        tells otherwise. Files outside ``files`` are another run's to resume (another job loading the same
        table name and period, a file since dropped from the list): never reported."""
        cur.execute(self._unpublished("b.file_sha, count(*)") + " AND b.file_sha = ANY(%s) "
                    "GROUP BY b.file_sha HAVING bool_or(b.rules <> %s)", (table, period, list(files), rules))
        return {str(sha): int(n) for sha, n in cur.fetchall()}

    def replaced_files(self, cur: Any, table: str, period: str,
                       files: Mapping[str, str]) -> Dict[str, Tuple[str, int]]:
        """old file sha -> (path, committed batches) for each unpublished file (no 'loaded' file row) of the
        table's period whose batches were read from one of ``files`` (path -> the sha256 of its content now,
        this run's files) but whose content is none of this run's files: the file at that path changed
        since those batches committed (a re-download after a crash, a corrected extraction). Their ranges
        are record boundaries of content that no longer exists, so they can neither be resumed nor
        published. A renamed file (same content, other path) is not reported, nor are batches of older
        ledgers (no path stored) or of files this run does not read (another job's: its rerun decides)."""
        cur.execute(self._unpublished("b.file_sha, min(b.file_path), count(*)")
                    + " AND b.file_path = ANY(%s) AND NOT b.file_sha = ANY(%s) GROUP BY b.file_sha",
                    (table, period, list(files), list(files.values())))
        return {str(sha): (str(path), int(n)) for sha, path, n in cur.fetchall()}

    def unread_files(self, cur: Any, table: str, period: str, job: str,
                     files: Sequence[str]) -> Dict[str, Tuple[Optional[str], int]]:
        """file sha -> (path it was read from, or None in older ledgers; committed batches) for each unpublished
        file (no 'loaded' file row) of the table's period that runs of ``job`` committed batches of and that is
        none of ``files`` (this run's file shas): a file removed from the job's list since a crash, or renamed
        and changed. Another job's unfinished files are not reported (its own rerun decides)."""
        cur.execute(self._unpublished("b.file_sha, min(b.file_path), count(*)")
                    + f" AND b.run_id IN (SELECT run_id FROM {self.run} WHERE job = %s) AND NOT b.file_sha = ANY(%s) "
                    "GROUP BY b.file_sha", (table, period, job, list(files)))
        return {str(sha): (None if path is None else str(path), int(n)) for sha, path, n in cur.fetchall()}

    def other_jobs_unfinished(self, cur: Any, table: str, period: str, job: str) -> List[Tuple[str, str, int]]:
        """(job, file path or sha, committed batches) of each unpublished file (no 'loaded' file row) of the table's
        period that runs of another job than ``job`` committed batches of: another job's unfinished load."""
        cur.execute(self._unpublished(f"(SELECT r.job FROM {self.run} r WHERE r.run_id = b.run_id), "
                                      "coalesce(min(b.file_path), b.file_sha), count(*)")
                    + f" AND b.run_id IN (SELECT run_id FROM {self.run} WHERE job <> %s) "
                    "GROUP BY 1, b.file_sha ORDER BY 1, 2", (table, period, job))
        return [(str(j), str(p), int(n)) for j, p, n in cur.fetchall()]

    def published_as_other_content(self, cur: Any, table: str, period: str,
                                   files: Mapping[str, str]) -> List[Tuple[str, str, int]]:
        """(path, published sha, rows loaded) for each of ``files`` (path -> the sha256 of its content now) whose
        path has a published ('loaded') file row of the table's period with other content: the file changed
        after it was loaded."""
        cur.execute(f"SELECT path, file_sha, coalesce(rows_loaded, 0) FROM {self.file} WHERE table_name = %s "
                    "AND period = %s AND status = 'loaded' AND path = ANY(%s) AND NOT file_sha = ANY(%s) ORDER BY path",
                    (table, period, list(files), list(files.values())))
        return [(str(p), str(sha), int(n)) for p, sha, n in cur.fetchall()]

    def file_batches(self, cur: Any, table: str, period: str, file_sha: str) -> List[LedgerBatch]:
        """Every committed batch of one file (any run), by member and start offset: the committed
        ranges a unit load skips, and the batches its own run already committed (a retried Ray
        loader call re-reports those, see ``execute.ray``). One query on ``batch_file_idx``."""
        cur.execute(f"SELECT batch_id, run_id, member, start_offset, end_offset, coalesce(first_line, 0), rows_in, "
                    "rows_loaded, rows_rejected, rows_coerced, blank_lines, coalesce(writer, ''), "
                    "coalesce(attempts, 0), extract(epoch FROM committed_at)::float8 "
                    f"FROM {self.batch} WHERE table_name=%s AND period=%s AND file_sha=%s "
                    "ORDER BY member, start_offset", (table, period, file_sha))
        return [LedgerBatch(int(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6]), int(r[7]),
                            int(r[8]), int(r[9]), int(r[10]), str(r[11]), int(r[12]), float(r[13]))
                for r in cur.fetchall()]

    def run_totals(self, cur: Any, run_id: str, period: str, tables: Sequence[str]) -> Dict[str, RunTotals]:
        """table -> RunTotals of the batches ``run_id`` committed in ``period`` (tables without any are
        absent). One query (``batch_file_idx`` narrows it to the tables and period)."""
        cur.execute(f"SELECT table_name, count(*), coalesce(sum(rows_in), 0), coalesce(sum(rows_loaded), 0), "
                    "coalesce(sum(rows_rejected), 0), coalesce(sum(rows_coerced), 0), coalesce(sum(blank_lines), 0) "
                    f"FROM {self.batch} WHERE table_name = ANY(%s) AND period=%s AND run_id=%s GROUP BY table_name",
                    (list(tables), period, run_id))
        return {str(r[0]): RunTotals(*(int(v) for v in r[1:])) for r in cur.fetchall()}

    def batch_ids_of(self, cur: Any, table: str, period: str, file_sha: Optional[str] = None) -> List[int]:
        sql = f"SELECT batch_id FROM {self.batch} WHERE table_name=%s AND period=%s"
        args: Sequence[Any] = (table, period)
        if file_sha is not None:
            sql += " AND file_sha=%s"
            args = (table, period, file_sha)
        cur.execute(sql, args)
        return [int(r[0]) for r in cur.fetchall()]

    def _unpublished(self, columns: str) -> str:
        return (f"SELECT {columns} FROM {self.batch} b LEFT JOIN {self.file} f "
                "ON f.table_name = b.table_name AND f.period = b.period AND f.file_sha = b.file_sha "
                "WHERE b.table_name=%s AND b.period=%s AND f.status IS DISTINCT FROM 'loaded'")

    def unpublished_batches(self, cur: Any, table: str, period: str) -> Dict[int, int]:
        """batch id -> rows_loaded of committed batches whose file is not yet published (still in staging)."""
        cur.execute(self._unpublished("b.batch_id, b.rows_loaded"), (table, period))
        return {int(b): int(n) for b, n in cur.fetchall()}

    def unpublished_batch_rows(self, cur: Any, table: str, period: str) -> Dict[int, StagedBatch]:
        """batch id -> StagedBatch for committed batches of unpublished files: what staging must hold."""
        cur.execute(self._unpublished("b.batch_id, b.run_id, b.rows_in, b.rows_loaded, b.rows_rejected, "
                                      "b.rows_coerced, b.blank_lines"), (table, period))
        return {int(r[0]): StagedBatch(int(r[0]), r[1], *(int(v) for v in r[2:])) for r in cur.fetchall()}

    def forget_batches(self, cur: Any, ids: Sequence[int], keep_rejects: int = 0) -> None:
        """Drop these batches and their rejects from the ledger, so a resume reads their byte ranges again.

        ``keep_rejects``: keep that many of their rejects (lowest member and line first), marked
        ``discarded = true``: the record of a failed run, counted in no batch and never forgotten
        here (rejects already marked discarded are left alone)."""
        if not ids:
            return
        if keep_rejects > 0:
            cur.execute(f"UPDATE {self.reject} SET discarded = true WHERE ctid IN ("
                        f"SELECT ctid FROM {self.reject} WHERE batch_id = ANY(%s) AND NOT discarded "
                        "ORDER BY member, line_number LIMIT %s)", (list(ids), keep_rejects))
        cur.execute(f"DELETE FROM {self.reject} WHERE batch_id = ANY(%s) AND NOT discarded", (list(ids),))
        cur.execute(f"DELETE FROM {self.batch} WHERE batch_id = ANY(%s)", (list(ids),))

    def forget(self, cur: Any, table: str, period: str, file_sha: Optional[str] = None,
               keep_rejects: int = 0) -> None:
        """Drop ledger entries (batches, rejects, file rows) of a table's period, or of one file;
        ``keep_rejects`` as in forget_batches."""
        self.forget_batches(cur, self.batch_ids_of(cur, table, period, file_sha), keep_rejects)
        if file_sha is None:
            cur.execute(f"DELETE FROM {self.file} WHERE table_name=%s AND period=%s", (table, period))
        else:
            cur.execute(f"DELETE FROM {self.file} WHERE table_name=%s AND period=%s AND file_sha=%s",
                        (table, period, file_sha))

    def reject_sample(self, cur: Any, run_id: str, limit: int = 200) -> pa.Table:
        """A few of the rows a run rejected (file, line, column, reason, raw text), for its MLflow record."""
        cols = ("table_name", "file_path", "member", "line_number", "column_name", "reason", "raw", "discarded")
        cur.execute(f"SELECT {', '.join(cols)} FROM {self.reject} WHERE run_id=%s "
                    "ORDER BY table_name, file_path, line_number LIMIT %s", (run_id, limit))
        rows = cur.fetchall()
        return pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)}) if rows else pa.table({})

    # ------------------------------------------------------------ the operator's side (history, health)

    RUN_COLUMNS = ("run_id", "job", "period", "status", "started_at", "finished_at", "rows_read", "rows_loaded",
                   "rows_rejected", "rows_discarded", "error_category", "error_text", "mlflow_run_id")
    TABLE_COLUMNS = ("table_name", "mode", "status", "files", "files_skipped", "rows_read", "rows_loaded",
                     "rows_rejected", "rows_discarded", "seconds")

    def exists(self, cur: Any) -> bool:
        """True once a run created the ledger tables in this schema."""
        cur.execute("SELECT to_regclass(%s)", (self.run,))
        return cur.fetchone()[0] is not None

    def _select_list(self, cur: Any, table: str, columns: Tuple[str, ...]) -> str:
        """``columns`` as a SELECT list of ``table``, a column an older ledger lacks as ``NULL AS <name>``: history
        reads a ledger no newer run has migrated yet (``ensure`` adds them at a run's start), read-only."""
        cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                    "AND NOT attisdropped", (table,))
        present = {name for (name,) in cur.fetchall()}
        return ", ".join(c if c in present else f"NULL AS {c}" for c in columns)

    def recent_runs(self, cur: Any, limit: int, job: Optional[str] = None) -> List[Dict[str, Any]]:
        """The newest ``limit`` runs (of ``job`` when given), newest first, as {RUN_COLUMNS: value}."""
        where, args = ("WHERE job = %s ", [job]) if job else ("", [])
        cur.execute(f"SELECT {self._select_list(cur, self.run, self.RUN_COLUMNS)} FROM {self.run} {where}"
                    "ORDER BY started_at DESC LIMIT %s", (*args, limit))
        return [dict(zip(self.RUN_COLUMNS, r)) for r in cur.fetchall()]

    def runs_by_prefix(self, cur: Any, prefix: str, limit: int = 2) -> List[Dict[str, Any]]:
        """Runs whose id starts with ``prefix`` (``%`` in it is ignored), newest first, at most ``limit``."""
        cur.execute(f"SELECT {self._select_list(cur, self.run, self.RUN_COLUMNS)} FROM {self.run} WHERE run_id LIKE %s "
                    "ORDER BY started_at DESC LIMIT %s", (prefix.replace("%", "") + "%", limit))
        return [dict(zip(self.RUN_COLUMNS, r)) for r in cur.fetchall()]

    def table_loads(self, cur: Any, run_id: str) -> List[Dict[str, Any]]:
        """One {TABLE_COLUMNS: value} per table the run loaded, by table name."""
        cur.execute(f"SELECT {self._select_list(cur, self.table_load, self.TABLE_COLUMNS)} FROM {self.table_load} "
                    "WHERE run_id=%s ORDER BY table_name", (run_id,))
        return [dict(zip(self.TABLE_COLUMNS, r)) for r in cur.fetchall()]

    def running_periods(self, cur: Any) -> List[Tuple[str, str, int]]:
        """(job, period, number of runs) with runs still marked 'running'."""
        cur.execute(f"SELECT job, period, count(*) FROM {self.run} WHERE status='running' GROUP BY job, period")
        return [(job, period, int(n)) for job, period, n in cur.fetchall()]

    def job_is_free(self, cur: Any, job: str, period: str) -> bool:
        """True if no live run holds the job lock of ``job`` and ``period`` (taken and given back at once)."""
        if not self.try_lock_job(cur, job, period):
            return False
        cur.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self.job_lock_key(job, period),))
        return True

    def loading_tables(self, cur: Any) -> List[Tuple[str, str, str, Optional[str], Optional[str]]]:
        """(run id, table, period, job, run status — None when the run row is missing) of every
        ``table_load`` row still 'loading', oldest first."""
        cur.execute(f"SELECT t.run_id, t.table_name, t.period, r.job, r.status FROM {self.table_load} t "
                    f"LEFT JOIN {self.run} r ON r.run_id = t.run_id WHERE t.status = 'loading' "
                    "ORDER BY t.started_at, t.table_name")
        return [tuple(r) for r in cur.fetchall()]  # type: ignore[misc]

    def run_count(self, cur: Any) -> int:
        cur.execute(f"SELECT count(*) FROM {self.run}")
        return int(cur.fetchone()[0])

    # ------------------------------------------------------------ the writer's side (an ADBC cursor)

    def committed_batch(self, cur: Any, batch_id: int) -> Optional[Tuple[str, int, int]]:
        """(run id, start offset, end offset) of the committed batch, None if it is not committed: the id
        names a start, so a writer tells the committed batch from another chunk starting there (another
        extent) by the end. Binds no parameter (the id is an integer literal), so the same statement runs on
        the writer's driver and on psycopg2."""
        cur.execute(f"SELECT run_id, start_offset, end_offset FROM {self.batch} WHERE batch_id = {int(batch_id)}")
        rows = cur.fetchall()
        return (str(rows[0][0]), int(rows[0][1]), int(rows[0][2])) if rows else None

    def append_batch(self, copy: Callable[[Any, str, str, pa.Table], None], conn: Any, row: pa.Table) -> None:
        """COPY one batch's ledger row (BATCH_SCHEMA) with the writer's encoder (``copy.CopyEncoder.copy_arrow``)
        on ``conn``, inside the batch's open transaction."""
        copy(conn, self.schema, "batch", row)

    def append_rejects(self, copy: Callable[[Any, str, str, pa.Table], None], conn: Any, rows: pa.Table) -> None:
        """COPY a batch's rejects (REJECT_META columns + the parser's) with the writer's encoder on ``conn``."""
        copy(conn, self.schema, "reject", rows)

    def is_duplicate_batch(self, exc: BaseException) -> bool:
        """True if ``exc`` is this ledger's batch primary key refusing a second commit of one batch
        (another writer committed it first): told by SQLSTATE 23505 and the constraint's schema and name
        from the error's diagnostics (psycopg2 ``diag``, ADBC ``details``), never by the message text --
        a target table named ``batch`` has a ``batch_pkey`` too."""
        return sqlstate_of(exc) == _UNIQUE_VIOLATION and diag_constraint(exc) == (self.schema, BATCH_PKEY)

    # ------------------------------------------------------------ claims (is the target holding them?)

    def claimed_rows(self, cur: Any, table: str, period: str) -> int:
        """Rows the ledger says the table's published files of this period put into the target."""
        cur.execute(f"SELECT coalesce(sum(rows_loaded), 0) FROM {self.file} "
                    "WHERE table_name=%s AND period=%s AND status='loaded'", (table, period))
        return int(cur.fetchone()[0])

    def claimed_batches_sql(self) -> str:
        """SQL selecting the batch ids of a table's published files in one period (args: table, period)."""
        return (f"SELECT b.batch_id FROM {self.batch} b JOIN {self.file} f "
                "ON f.table_name = b.table_name AND f.period = b.period AND f.file_sha = b.file_sha "
                "WHERE b.table_name = %s AND b.period = %s AND f.status = 'loaded'")

    def claimed_or_later_sql(self) -> str:
        """SQL selecting the batch ids of a table's published batches committed at or after the first
        batch of this period (args: table, table, period): for merge/replace targets, where a later
        period's batches legitimately overwrite this one's rows."""
        return (f"SELECT b.batch_id FROM {self.batch} b JOIN {self.file} f "
                "ON f.table_name = b.table_name AND f.period = b.period AND f.file_sha = b.file_sha "
                "WHERE b.table_name = %s AND f.status = 'loaded' AND b.committed_at >= "
                f"(SELECT min(committed_at) FROM {self.batch} WHERE table_name = %s AND period = %s)")

    def written_since_sql(self, batch_col: str) -> str:
        """SQL condition: the row ``t`` was last written by a batch of this table in this period or a later
        one (args: table, period); ``batch_col`` is the row's batch-id column."""
        return (f"EXISTS (SELECT 1 FROM {self.batch} b WHERE b.batch_id = t.{quote_ident(batch_col)} "
                "AND b.table_name = %s AND b.period >= %s)")


def ddl_lock(cur: Any, schema: str) -> None:
    """Serialise DDL on one schema across runs until the caller's transaction ends (a prepare's: it
    excludes every other prepare and every publish on the schema)."""
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"loadkit-ddl:{schema}",))


def publish_lock(cur: Any, schema: str, table: str) -> None:
    """A publish's lock until the caller's transaction ends: ``ddl_lock``'s key shared (no prepare on the
    schema meanwhile, other tables' publishes go on), then the table's own key exclusive (one publish of
    a table at a time). Always in this order, so two publishes never wait on each other crosswise."""
    cur.execute("SELECT pg_advisory_xact_lock_shared(hashtext(%s))", (f"loadkit-ddl:{schema}",))
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"loadkit-publish:{schema}.{table}",))


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


def _try_advisory_lock(cur: Any, key: str) -> bool:
    """pg_try_advisory_lock on hashtext(``key``): True if this session now holds it (session-level: it lasts
    until pg_advisory_unlock or the session ends)."""
    cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,))
    return bool(cur.fetchone()[0])
