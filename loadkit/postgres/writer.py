"""The batch writer: one COPY stream per connection, data + rejects + ledger in one transaction.

The binary COPY itself is postgres/copy.py's (``sink.copy_encoder``: pgpq over psycopg 3, or ADBC);
every statement of a batch runs on one connection of that encoder's driver.

A plain class with no Ray import: ``write(ParsedBatch) -> BatchResult``. Ray Data runs it
in a pooled actor (``loadkit.execute``'s map_batches UDF converts the Arrow blocks), the
in-process executor on threads, and tests call it directly. The pool is opened in
``__init__`` (actor start), health-checked on every borrow, and closed by ``close()``.

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
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import pyarrow as pa

from loadkit import tracing
from loadkit.postgres import ledger
from loadkit.postgres.copy import DEFAULT_ENCODER, encoder
from loadkit.postgres.ledger import Ledger
from loadkit.records import BatchResult, ParsedBatch, Status, carry
from loadkit.postgres.db import ConnectionPool, application_name, with_application_name
from loadkit.errors import BatchRangeConflict, as_loadkit_error, is_deadlock
from loadkit.monitor import process_rss, release_memory
from loadkit.plan import BATCH_COL, ROW_COL, RetryPolicy
from loadkit.resilience import CircuitBreaker, retrying

log = logging.getLogger("loadkit.postgres.writer")

# A writer trims the process's freed heap once its RSS has grown this much since the last trim (bytes):
# it bounds what freed-but-kept pages add to the peak, without faulting every batch's pages in anew.
TRIM_GROWTH_BYTES = 64 * 2**20


@dataclass(frozen=True)
class TableTarget:
    schema: str
    load_table: str
    keep_row_ordinal: bool  # staging tables keep ROW_COL for the last-row-wins dedup
    rules: Optional[str] = None  # plan.read_rules of the table: stored with every batch (ledger batch.rules)


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


class BatchWriter:
    def __init__(self, settings: WriterSettings) -> None:
        self._s = settings
        self._name = f"writer-{os.getpid()}"
        self._trace = ""  # the batch in hand's trace (loadkit.tracing), "" with tracing off
        self._breaker = CircuitBreaker(settings.retry.breaker_failures, settings.retry.breaker_cooldown_s)
        self._attempts = 0
        self._ledger = Ledger(settings.ledger_schema)
        self._copy = encoder(settings.copy_encoder)
        self._trimmed_rss = process_rss()  # the process's RSS after the last trim (see _finish)
        self._pool = self._open_pool()

    def _open_pool(self) -> ConnectionPool:
        dsn = with_application_name(self._s.dsn, application_name(self._s.run_id, "writer"))
        return retrying(self._s.retry)(lambda: ConnectionPool(dsn, self._s.connections, self._s.pre_ping,
                                                                 connect=self._copy.connect))

    def write(self, batch: ParsedBatch) -> BatchResult:
        """Commit one parsed batch (or pass an eof/error record on) and report it.

        Raises the classified LoadkitError once retries are exhausted or the failure is permanent."""
        if batch.kind != "data":
            return self._finish(batch, status=batch.kind, write_s=0.0, attempts=0)
        started = time.perf_counter()
        self._attempts, deadlocks = 0, [0]
        self._trace = batch.trace  # tracing on: _commit adds its copy/commit spans (loadkit.tracing)

        def lost(state: Any) -> None:  # reported in the result: this writer may run in a Ray worker
            exc = state.outcome.exception() if state.outcome else None
            deadlocks[0] += int(exc is not None and is_deadlock(exc))

        try:
            status = retrying(self._s.retry, on_retry=lost, count_deadlocks=False)(
                lambda: self._breaker.call(lambda: self._commit(batch)))
        except Exception as exc:  # retries exhausted or permanent: fail with the classified cause
            raise as_loadkit_error(exc, table=batch.table_name, batch_id=batch.batch_id, writer=self._name,
                                   attempts=self._attempts) from exc
        return self._finish(batch, status=status, write_s=time.perf_counter() - started, attempts=self._attempts,
                            deadlocks=deadlocks[0], trace=self._trace)

    def _finish(self, batch: ParsedBatch, **outcome: Any) -> BatchResult:
        rss = process_rss()
        if rss - self._trimmed_rss >= TRIM_GROWTH_BYTES:
            # Hand freed heap back to the OS (Arrow's pool + malloc_trim) once the process has grown by
            # TRIM_GROWTH_BYTES since the last trim, not after every batch: the freed pages of one batch
            # are the next batch's, and trimming them made the read and writer threads fault them in
            # again (zeroed) each time. Measured on the benchmark month in process: driver 1.15 -> 1.06
            # CPU µs/row without the per-batch trim, peak RSS 340 -> 352 MB (README, "Where the time goes").
            release_memory()
            rss = process_rss()
            self._trimmed_rss = rss
        return carry(batch, BatchResult, writer=self._name, pool_utilisation=self._pool.stats().utilisation,
                     rss_bytes=rss, finished_at=time.time(), **outcome)

    def _commit(self, batch: ParsedBatch) -> Status:
        """One transaction on one connection of the COPY encoder's driver: skip if the ledger has the
        batch, else COPY rows + rejects + ledger row, then commit.

        A batch the ledger already holds is ``skipped`` when another run committed it, and
        ``committed`` when this run did: an earlier attempt of this call whose commit reached the
        server while its reply was lost (a server crash or a dropped connection at COMMIT), or the
        unreported last commit of a dead Ray loader attempt. That commit is this run's and was never
        reported, so reporting it here keeps the run's counts equal to its ledger rows. Either only when the
        committed batch is this chunk (same end): else BatchRangeConflict (see ``_already``)."""
        self._attempts += 1
        target = self._s.tables[batch.table_name]
        with self._pool.connection() as conn:
            with conn.cursor() as cur:
                found = self._ledger.committed_batch(cur, batch.batch_id)
                if found is not None:
                    conn.rollback()
                    return self._already(batch, found)
                try:
                    if not self._trace:
                        self._copy_all(conn, batch, target)
                        conn.commit()
                    else:
                        self._traced(lambda: self._copy_all(conn, batch, target), "copy", rows=batch.rows_loaded,
                                     rejects=batch.rows_rejected, attempt=self._attempts)
                        self._traced(conn.commit, "commit", attempt=self._attempts)
                except Exception as exc:
                    _rollback_after(conn, exc)
                    if self._ledger.is_duplicate_batch(exc):  # another session committed it first
                        found = self._ledger.committed_batch(cur, batch.batch_id)
                        conn.rollback()
                        if found is not None:
                            return self._already(batch, found)
                    raise
        return "committed"

    def _already(self, batch: ParsedBatch, found: Tuple[str, int, int]) -> Status:
        """The status of a batch the ledger already holds as ``found`` (run id, start, end; see ``_commit``).

        Raises BatchRangeConflict when the committed batch ends elsewhere than ``batch``: the same id
        (same start) but another chunk, which neither skipping nor reporting would load exactly once."""
        owner, start, end = found
        if (start, end) != (batch.start, batch.end):
            raise BatchRangeConflict(
                "the ledger holds this batch's id for another byte range: a commit landed after this read "
                "planned its ranges, at another batch size; nothing of this chunk is written, rerun to resume",
                table=batch.table_name, file=batch.file_path, member=batch.member or None, batch_id=batch.batch_id,
                committed=f"[{start}, {end})", batch=f"[{batch.start}, {batch.end})", owner=owner)
        return "committed" if owner == self._s.run_id else "skipped"

    def _traced(self, step: Callable[[], Any], name: str, **attributes: Any) -> None:
        """Run ``step`` and add its span to the batch's trace (only when it succeeds: a failed
        attempt is visible as the next attempt's ``attempt`` attribute and the result's ``attempts``)."""
        begun = time.time_ns()
        step()
        self._trace = tracing.add_stage(self._trace, name, begun, time.time_ns(), **attributes)

    def _copy_all(self, conn: Any, batch: ParsedBatch, target: TableTarget) -> None:
        copy_arrow = self._copy.copy_arrow
        rows = batch.rows
        if rows is not None and rows.num_rows:
            rows = rows.append_column(BATCH_COL, pa.array(np.full(rows.num_rows, batch.batch_id, np.int64)))
            if not target.keep_row_ordinal:
                rows = rows.drop_columns([ROW_COL])
            copy_arrow(conn, target.schema, target.load_table, rows)
        rejects = batch.rejects
        if rejects is not None and rejects.num_rows:
            self._ledger.append_rejects(copy_arrow, conn, self._reject_rows(batch, rejects))
        self._ledger.append_batch(copy_arrow, conn, self._ledger_row(batch))

    def _reject_rows(self, batch: ParsedBatch, rejects: pa.Table) -> pa.Table:
        n = rejects.num_rows
        meta = [batch.batch_id, self._s.run_id, batch.table_name, self._s.period, batch.file_path, batch.member]
        cols = [pa.array([v] * n, t) for v, (_, t) in zip(meta, ledger.REJECT_META)]
        names = [name for name, _ in ledger.REJECT_META]
        return pa.Table.from_arrays(cols + rejects.columns, names=names + rejects.column_names)

    def _ledger_row(self, batch: ParsedBatch) -> pa.Table:
        b = batch
        values = {
            "batch_id": b.batch_id, "run_id": self._s.run_id, "table_name": b.table_name,
            "period": self._s.period, "file_sha": b.file_sha, "file_ordinal": b.file_ordinal,
            "member": b.member, "start_offset": b.start, "end_offset": b.end,
            "first_line": b.first_line, "rows_in": b.rows_in, "rows_loaded": b.rows_loaded,
            "rows_rejected": b.rows_rejected, "rows_coerced": b.rows_coerced, "writer": self._name,
            "attempts": self._attempts, "blank_lines": b.blank_lines, "rules": self._s.tables[b.table_name].rules,
            "file_path": b.file_path,
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
