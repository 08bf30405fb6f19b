"""The batch writer: one COPY stream per connection, data + rejects + ledger in one transaction.

The binary COPY itself is postgres/copy.py's (``sink.copy_encoder``: pgpq over psycopg 3, or ADBC);
every statement of a batch runs on one connection of that encoder's driver.

A plain callable class with no Ray import: Ray Data runs it as a pooled actor
(``map_batches(BatchWriter, compute=ActorPoolStrategy(...))``), and tests can call it
directly. The pool is opened in ``__init__`` (actor start), health-checked on every
borrow, and closed by ``close()``.

Exactly-once: a batch's identity is deterministic (plan.batch_id). The ledger row has
that id as its primary key and is written in the same transaction as the rows, so a
retried or duplicated batch either finds its id (skip) or violates the key (rollback,
skip): never two copies.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict

import pyarrow as pa

from loadkit.postgres import ledger
from loadkit.postgres.copy import DEFAULT_ENCODER, encoder
from loadkit.postgres.db import ConnectionPool, application_name, with_application_name
from loadkit.errors import as_loadkit_error, sqlstate_of
from loadkit.monitor import process_rss, release_memory
from loadkit.plan import BATCH_COL, ROW_COL, RetryPolicy
from loadkit.resilience import CircuitBreaker, retrying
from loadkit.security import qualified

log = logging.getLogger("loadkit.postgres.writer")

# Per-batch counts the parser produces and the writer passes on to the driver.
BATCH_COUNT_FIELDS = [
    ("rows_loaded", pa.int64()),
    ("rows_rejected", pa.int64()),
    ("rows_coerced", pa.int64()),
    ("bytes", pa.int64()),
    ("parse_s", pa.float64()),
    # Blank lines the parser skipped (a table of two or more columns; in a one-column table a blank
    # line is a NULL row). Not records: a batch's source lines = rows_in + blank_lines (+ header).
    ("blank_lines", pa.int64()),
]

RESULT_SCHEMA = pa.schema([
    ("kind", pa.string()),
    ("table_name", pa.string()),
    ("file_sha", pa.string()),
    ("member", pa.string()),
    ("batch_id", pa.int64()),
    ("status", pa.string()),  # committed|skipped|eof|error
    ("rows_in", pa.int64()),
] + BATCH_COUNT_FIELDS + [
    ("write_s", pa.float64()),
    ("attempts", pa.int32()),
    ("writer", pa.string()),
    ("pool_utilisation", pa.float64()),
    ("rss_bytes", pa.int64()),
    ("finished_at", pa.float64()),
    ("message", pa.string()),
])


@dataclass(frozen=True)
class TableTarget:
    schema: str
    load_table: str
    keep_row_ordinal: bool  # staging tables keep ROW_COL for the last-row-wins dedup


@dataclass(frozen=True)
class WriterSettings:
    dsn: str
    ledger_schema: str
    run_id: str
    period: str
    tables: Dict[str, TableTarget]
    connections: int
    pre_ping: bool
    retry: RetryPolicy
    copy_encoder: str = DEFAULT_ENCODER  # sink.copy_encoder: pgpq (psycopg 3) or adbc; see postgres/copy.py


def ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


class BatchWriter:
    def __init__(self, settings: WriterSettings) -> None:
        self._s = settings
        self._name = f"writer-{os.getpid()}"
        self._breaker = CircuitBreaker(settings.retry.breaker_failures, settings.retry.breaker_cooldown_s)
        self._attempts = 0
        self._copy = encoder(settings.copy_encoder)
        self._pool = self._open_pool()

    def _open_pool(self) -> ConnectionPool:
        dsn = with_application_name(self._s.dsn, application_name(self._s.run_id, "writer"))
        return retrying(self._s.retry)(lambda: ConnectionPool(dsn, self._s.connections, self._s.pre_ping,
                                                                 connect=self._copy.connect))

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = [self._handle(rec) for rec in batch.to_pylist()]
        release_memory()
        return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)

    def _handle(self, rec: Dict[str, Any]) -> Dict[str, Any]:
        out = {k: rec.get(k) for k in ("kind", "table_name", "file_sha", "member", "batch_id", "rows_in",
                                        "rows_loaded", "rows_rejected", "rows_coerced", "bytes", "parse_s",
                                        "blank_lines", "message")}
        out["writer"] = self._name
        if rec["kind"] != "data":
            out.update(status=rec["kind"], write_s=0.0, attempts=0)
            return self._finish(out)
        started = time.perf_counter()
        self._attempts = 0
        try:
            status = retrying(self._s.retry)(lambda: self._breaker.call(lambda: self._commit(rec)))
        except Exception as exc:  # retries exhausted or permanent: fail with the classified cause
            raise as_loadkit_error(exc, table=rec["table_name"], batch_id=rec["batch_id"], writer=self._name,
                                   attempts=self._attempts) from exc
        out.update(status=status, write_s=time.perf_counter() - started, attempts=self._attempts)
        return self._finish(out)

    def _finish(self, out: Dict[str, Any]) -> Dict[str, Any]:
        out["pool_utilisation"] = self._pool.stats().utilisation
        out["rss_bytes"] = process_rss()
        out["finished_at"] = time.time()
        return out

    def _commit(self, rec: Dict[str, Any]) -> str:
        """One transaction on one connection of the COPY encoder's driver: skip if the ledger has the
        batch, else COPY rows + rejects + ledger row, then commit."""
        self._attempts += 1
        target = self._s.tables[rec["table_name"]]
        with self._pool.connection() as conn:
            with conn.cursor() as cur:
                cur.execute(f"SELECT 1 FROM {qualified(self._s.ledger_schema, 'batch')} "
                            f"WHERE batch_id = {self._copy.placeholder}", (rec["batch_id"],))
                if cur.fetchall():
                    conn.rollback()
                    return "skipped"
                try:
                    self._copy_all(conn, rec, target)
                    conn.commit()
                except Exception as exc:
                    _rollback_after(conn, exc)
                    if sqlstate_of(exc) == "23505" and "batch_pkey" in str(exc):
                        return "skipped"  # another writer committed the same batch first
                    raise
        return "committed"

    def _copy_all(self, conn: Any, rec: Dict[str, Any], target: TableTarget) -> None:
        copy_arrow = self._copy.copy_arrow
        rows = ipc_table(rec["rows"])
        if rows.num_rows:
            rows = rows.append_column(BATCH_COL, pa.array([rec["batch_id"]] * rows.num_rows, pa.int64()))
            if not target.keep_row_ordinal:
                rows = rows.drop_columns([ROW_COL])
            copy_arrow(conn, target.schema, target.load_table, rows)
        rejects = ipc_table(rec["rejects"])
        if rejects.num_rows:
            copy_arrow(conn, self._s.ledger_schema, "reject", self._reject_rows(rec, rejects))
        copy_arrow(conn, self._s.ledger_schema, "batch", self._ledger_row(rec))

    def _reject_rows(self, rec: Dict[str, Any], rejects: pa.Table) -> pa.Table:
        n = rejects.num_rows
        meta = [rec["batch_id"], self._s.run_id, rec["table_name"], self._s.period, rec["file_path"], rec["member"]]
        cols = [pa.array([v] * n, t) for v, (_, t) in zip(meta, ledger.REJECT_META)]
        names = [name for name, _ in ledger.REJECT_META]
        return pa.Table.from_arrays(cols + rejects.columns, names=names + rejects.column_names)

    def _ledger_row(self, rec: Dict[str, Any]) -> pa.Table:
        values = {
            "batch_id": rec["batch_id"], "run_id": self._s.run_id, "table_name": rec["table_name"],
            "period": self._s.period, "file_sha": rec["file_sha"], "file_ordinal": rec["file_ordinal"],
            "member": rec["member"], "start_offset": rec["start"], "end_offset": rec["end"],
            "first_line": rec["first_line"], "rows_in": rec["rows_in"], "rows_loaded": rec["rows_loaded"],
            "rows_rejected": rec["rows_rejected"], "rows_coerced": rec["rows_coerced"], "writer": self._name,
            "attempts": self._attempts, "blank_lines": rec.get("blank_lines") or 0,
        }
        return pa.Table.from_pylist([values], schema=ledger.BATCH_SCHEMA)

    def close(self) -> None:
        self._pool.close()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.close()


def _rollback_after(conn: Any, cause: BaseException) -> None:
    """Roll back after a failed batch; if the connection is dead too, the caller's error is the one to raise.

    The server rolls back a transaction whose connection died, so a failed rollback loses
    nothing; the pool replaces the connection when the borrow ends with the error."""
    try:
        conn.rollback()
    except Exception as exc:
        log.warning("rollback after %s failed too (%s); the connection will be replaced",
                    type(cause).__name__, exc)
