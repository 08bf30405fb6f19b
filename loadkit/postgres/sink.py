"""The PostgreSQL sink: the run-level half of exactly-once, with a Datasink-like lifecycle.

Shaped after Ray Data's ``Datasink`` (on_write_start / write / on_write_complete /
on_write_failed), with the run's resources owned in one place:

- ``open(params)``  (a context manager): the job lock (a session advisory lock, watched), stale
  runs marked crashed, the run's ledger row, what the fetch stage downloaded.
- ``start(metrics) -> todo``: per table, the target/staging DDL, ``force`` resets, the resume
  state (files not yet published, byte ranges already committed); returns what is left to read.
- ``writer_settings()``: what every BatchWriter (the per-batch ``write``) needs.
- ``check_accounting(metrics, tables)``: after each stream, the run's counts equal the batches it
  committed (one query), else ``LedgerMismatch`` before anything is published.
- ``complete(metrics, ...)``: settle every file (accounting checked, failed files discarded) and
  publish every table (verify staging, finalise per write mode, sync) -- the tables whose staging
  lost batches come back to be read again.
- ``end(...)``: the run's and its tables' end rows, whatever happened (``on_write_failed`` too).

Batch-level exactly-once lives in the writer (postgres/writer.py); every ledger statement in
``Ledger``; every mode-specific step in the mode classes (postgres/modes.py).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import date
from types import TracebackType
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type

from loadkit.errors import (ConfigError, InterruptedRun, JobLockLost, LedgerMismatch, LoadkitError, OperatorError,
                            SourceDataError, TransientDBError, as_loadkit_error)
from loadkit.logs import heartbeat
from loadkit.plan import FileSpec, LoadPlan, TableSpec, read_rules
from loadkit.postgres import db, identity, keyhints
from loadkit.postgres.ledger import Ledger, RunTotals, TableOutcome, ddl_lock, publish_lock
from loadkit.postgres.modes import Merge, WriteMode, mode_for, record_steps, settings
from loadkit.postgres.writer import TableTarget, WriterSettings
from loadkit.resilience import retrying
from loadkit.security import mask_text

log = logging.getLogger("loadkit.run")

_LOCK_CHECK_S = 1.0
# Tables published at once, one connection each: a table's key and index builds are one server process's
# CPU, so two tables use both cores of a 2-core machine (measured: see README, session 7).
PUBLISH_CONCURRENCY = 2
# A stop while tables publish: their statements are cancelled again this often until the publishes have ended.
STOP_RECANCEL_S = 0.25


@dataclass(frozen=True)
class Todo:
    """One file of one table still to read, with the byte ranges earlier runs committed (skipped)."""

    table: TableSpec
    file: FileSpec
    committed: Tuple[Tuple[str, Tuple[Tuple[int, int], ...]], ...]


@dataclass
class Completion:
    """What ``complete`` did: files that failed (table, path, why), tables whose staging lost batches."""

    failed: List[Tuple[str, str, str]] = field(default_factory=list)
    lost: List[str] = field(default_factory=list)


# How long an interrupted run waits for its writer sessions to leave their transactions before it reads its
# committed batches for its counts (PostgresSink._counts_from_ledger), seconds.
WRITERS_SETTLE_S = 5.0


def session_dsn(plan: LoadPlan, role: str = "driver") -> str:
    """The DSN of this run's sessions: the configured (or LOADKIT_DSN, or embedded) server with the plan's
    ``sink.connect_timeout`` (libpq, seconds) and server-side ``statement_timeout`` / ``lock_timeout``
    (ms, 0 = none) in it, so every connection -- driver, writers, Ray workers -- gets them."""
    s = plan.sink
    return db.session_dsn(db.resolve_dsn(s.dsn, s.embedded_dir), s.connect_timeout, s.statement_timeout_ms,
                          s.lock_timeout_ms, db.application_name(plan.run_id, role))


def writer_settings(plan: LoadPlan, dsn: str) -> WriterSettings:
    """What every BatchWriter needs: where each table's batches go (target or staging) and the ledger."""
    targets = {t.name: TableTarget(t.load_schema, t.load_table, mode_for(t).staged, read_rules(t)) for t in plan.tables}
    return WriterSettings(dsn=dsn, ledger_schema=plan.ledger_schema, run_id=plan.run_id, period=plan.period,
                          tables=targets, connections=plan.connections_per_writer, pre_ping=plan.pre_ping,
                          retry=plan.retry, copy_encoder=plan.sink.copy_encoder)


class JobLock:
    """The run's job lock (a session advisory lock) and its health check.

    The lock lives as long as its session: a terminated session or a server restart drops
    it, and a second run of the period would be admitted. A watcher thread pings the session
    every ``_LOCK_CHECK_S``; when it is gone it reconnects and takes the lock again, and
    keeps the run only if nobody else has it and the ledger still shows this run
    'running' (another run marks it 'crashed' when it starts). Otherwise the run stops as
    transient (``on_lost``), before it can publish. Publishing checks it synchronously too.
    While the server is unreachable nobody else can run either, so the watcher keeps trying.
    """

    def __init__(self, dsn: str, plan: LoadPlan, on_lost: Callable[[LoadkitError], None]) -> None:
        self._dsn = db.with_application_name(dsn, db.application_name(plan.run_id, "lock"))
        self._plan = plan
        self._ledger = Ledger(plan.ledger_schema)
        self._on_lost = on_lost
        self._conn: Any = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[LoadkitError] = None
        self.held_table: Optional[str] = None  # acquire: the table whose lock another run holds

    def acquire(self) -> bool:
        """Take the job lock and the run's tables' locks (Ledger.try_lock_tables) on a new session; False if
        another session holds one (``held_table`` names the table, None: the job lock)."""
        self._conn = db.connect(self._dsn, autocommit=True)
        self.held_table = None
        plan = self._plan
        with self._conn.cursor() as cur:
            if not self._ledger.try_lock_job(cur, plan.job, plan.period):
                return False
            self.held_table = self._ledger.try_lock_tables(cur, [t.name for t in plan.tables], plan.period)
            if self.held_table is not None:
                cur.execute("SELECT pg_advisory_unlock_all()")
                return False
        return True

    def cursor(self) -> Any:
        return self._conn.cursor()

    def watch(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loadkit-job-lock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_LOCK_CHECK_S):
            try:
                self.check()
            except LoadkitError as exc:
                if self.error is not None and not self._stop.is_set():
                    self._on_lost(exc)
                    return

    def check(self) -> None:
        """Raise TransientDBError if the lock is lost for good; re-take it after a dropped session."""
        if self.error is not None:
            raise self.error
        with self._mutex:
            try:
                with self._conn.cursor() as cur:
                    cur.execute("SELECT 1")
                return
            except Exception as exc:  # the session is gone (terminated, server restarted)
                log.warning("the job lock's session is gone (%s); taking the lock again", mask_text(str(exc)))
            try:
                self._conn.close()
            except Exception:  # already broken
                pass
            plan = self._plan
            try:
                took = self.acquire()
                with self._conn.cursor() as cur:
                    status = self._ledger.run_status(cur, plan.run_id)
            except LoadkitError:
                raise TransientDBError("cannot reach the server to check the job lock") from None  # retried
            except Exception as exc:
                raise TransientDBError(f"cannot check the job lock: {exc}") from None
            if not took or status != "running":
                self.error = JobLockLost(
                    f"lost the job lock of {plan.job} {plan.period} (its session ended) and another run "
                    f"{'holds it' if not took else 'took over meanwhile'}: stopping before anything is published; "
                    "committed batches stay for the resume")
                raise self.error
            log.info("job lock of %s %s taken again", plan.job, plan.period)

    def close(self) -> None:
        self._stop.set()
        with self._mutex:
            if self._conn is not None:
                try:  # released now, not when the server gets round to ending the session: a rerun
                    # started right after this run ends (a scheduler retrying exit 4) must not find it held
                    with self._conn.cursor() as cur:
                        cur.execute("SELECT pg_advisory_unlock_all()")
                except Exception:  # the session is already gone, and the lock with it
                    pass
                try:
                    self._conn.close()
                except Exception:  # already broken: the lock is gone with it
                    pass


class PostgresSink:
    """One run's sink (see the module doc). ``dsn`` is the session DSN with the plan's timeouts."""

    def __init__(self, plan: LoadPlan, fetched: Sequence[Any] = (),
                 on_lock_lost: Callable[[LoadkitError], None] = lambda e: None) -> None:
        self.plan = plan
        self.ledger = Ledger(plan.ledger_schema)
        self.dsn = session_dsn(plan)
        self._fetched = list(fetched)
        self._lock = JobLock(self.dsn, plan, on_lock_lost)
        self._reading: Dict[str, Set[str]] = {}  # table -> shas of the files this run reads
        # Merge's duplicate-key hints: the in-process writers hash each committed batch's key (keyhints).
        self._hints = keyhints.open_hints(plan.run_id, [t for t in plan.tables if isinstance(mode_for(t), Merge)])
        self._stopping = threading.Event()  # set by cancel(): settle and publish stop waiting to retry

    # ------------------------------------------------------------ open / close: the job lock and the run row

    def check_server(self) -> str:
        """The server version; ConfigError / OperatorError / TransientDBError before any work (db.server_check)."""
        return db.server_check(self.dsn)

    def cancel(self) -> int:
        """Cancel the statements of this run's sessions now (a stop): they roll back, committed batches stay.
        A settle or publish waiting to retry a transient failure stops waiting (``_retrying``): on a publish
        thread (runner.EarlyPublish, PUBLISH_CONCURRENCY) no signal handler can end that sleep."""
        self._stopping.set()
        return db.cancel_backends(self.dsn, self.plan.run_id)

    def _retrying(self) -> Any:
        """``retrying(plan.retry)`` whose waits between attempts end at a stop (``cancel``) with InterruptedRun."""
        return retrying(self.plan.retry, sleep=self._sleep_unless_stopped)

    def _sleep_unless_stopped(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise InterruptedRun("stopped while waiting to retry a transient failure")

    def cancel_end(self) -> int:
        """Cancel the statement recording the run's end (``end``): a stop insisted while it was stuck."""
        return db.cancel_backends(self.dsn, self.plan.run_id, prefix=self._end_session)

    @property
    def _end_session(self) -> str:
        # Not a loadkit:<run>:* session: a stop's cancel_backends (possibly still in flight) spares it.
        return f"loadkit-end:{self.plan.run_id}"[:63]

    def open(self, params: Dict[str, Any]) -> "PostgresSink":
        """The ledger, the job lock, the run row (with ``params``, the run's masked settings)."""
        plan = self.plan
        try:
            retrying(plan.retry)(self._ensure_ledger)
            if not self._lock.acquire():
                if self._lock.held_table is not None:
                    raise TransientDBError(
                        f"another run is loading a table named {self._lock.held_table} for period {plan.period} "
                        f"on ledger {plan.ledger_schema} (another job, or another run of {plan.job}); the ledger "
                        "knows a table by its name, so the two must not overlap: retry when it ends, or give this "
                        "job its own sink.ledger_schema")
                raise TransientDBError(f"another run of {plan.job} {plan.period} is in progress "
                                       f"(ledger {plan.ledger_schema}); retry when it ends")
            with self._lock.cursor() as cur:
                claimed = self.ledger.claim_targets(cur, plan.period, plan.job,
                                                    {t.name: t.schema for t in plan.tables})
                if claimed:
                    raise ConfigError(
                        "; ".join(f"ledger {plan.ledger_schema} accounts for table {name} of period {plan.period} "
                                  f"in schema {schema} (job {owner}), not {plan.table(name).schema}"
                                  for name, schema, owner in claimed)
                        + ". A ledger tells tables apart by name and period, so loading both through it would mix "
                        "their accounting (each run would take the other's rows for its own and reload them: an "
                        "append target would get them twice). Give this job its own sink.ledger_schema, or load "
                        "into that schema; a dropped target's claim is taken over.", key="sink.ledger_schema")
                self.ledger.mark_stale_runs(cur, plan.job, plan.period)
                self.ledger.start_run(cur, plan.run_id, plan.job, plan.period, params)
                if self._fetched:
                    from loadkit.source import fetch

                    fetch.record(cur, plan.ledger_schema, plan.run_id, plan.period, self._fetched)
        except (LoadkitError, KeyboardInterrupt):  # KeyboardInterrupt: a stop (errors.StopRequested)
            self.close()
            raise
        except Exception as exc:  # a driver error before the run row exists: its category, not a traceback
            self.close()
            raise as_loadkit_error(exc, ledger=plan.ledger_schema) from exc
        self._lock.watch()
        return self

    def __enter__(self) -> "PostgresSink":
        return self

    def __exit__(self, et: Optional[Type[BaseException]], e: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()

    def close(self) -> None:
        """Release the job lock (its session ends); free the run's key hints."""
        self._lock.close()
        keyhints.close_hints(self.plan.run_id)

    def _ensure_ledger(self) -> None:
        """The ledger's tables, in one transaction (its DDL lock is transaction-level); retried on deadlock."""
        with db.transaction(self.dsn) as cur:
            self.ledger.ensure(cur)

    # ------------------------------------------------------------ start: DDL, force, resume

    def start(self, metrics: Any) -> List[Todo]:
        """DDL, force resets and the resume state of every table; returns the files still to read."""
        plan = self.plan
        todo: List[Todo] = []
        refused: List[Tuple[str, str]] = []  # (table, why) of append tables whose published files changed
        blocked: List[str] = []  # staged tables holding another job's unfinished batches (_other_jobs_staged)
        for table in plan.tables:
            mode = mode_for(table)
            with db.transaction(self.dsn) as cur:
                # Concurrent runs on one database: their DDL (CREATE ... IF NOT EXISTS races on the
                # catalog) is serialised per target schema until this transaction ends.
                ddl_lock(cur, table.schema)
                mode.prepare(cur, plan.migrate)
                if plan.force:
                    mode.reset(cur, self.ledger, plan.period)
                else:  # staged batches a crash (UNLOGGED) or a declaration change lost: read them again
                    mode.forget_lost_batches(cur, self.ledger, plan.period)
                    self._discard_other_rules(cur, mode, table)
                    self._discard_replaced_files(cur, mode, table)
                    self._discard_unread_files(cur, mode, table)
                    if mode.staged:
                        blocked += self._other_jobs_staged(cur, table)
                files, ranges = self._verified_todo(cur, table)
                reload = False
                if files:
                    why, reload = self._changed_published(cur, mode, table)
                    refused += why
                if reload:  # a full-snapshot month with a changed file: every file again, then the sync
                    mode.reset(cur, self.ledger, plan.period)
                    ranges, files = {}, list(table.files)
                elif mode.whole_period and 0 < len(files) < len(table.files):
                    # These modes publish a whole period at once: a new file in a published period
                    # means rebuilding it from every file, or the swap would drop the others' rows.
                    log.info("table %s: %d new file(s) in a published month; reloading all %d", table.name,
                             len(files), len(table.files))
                    mode.reset(cur, self.ledger, plan.period)
                    ranges, files = {}, list(table.files)
                self.ledger.start_table(cur, plan.run_id, table.name, plan.period, table.mode, len(table.files),
                                        len(table.files) - len(files))
            tm = metrics.tables[table.name]
            tm.files, tm.files_skipped = len(table.files), len(table.files) - len(files)
            todo += self._todo(table, files, ranges)
            if not files:
                tm.status = "skipped"
                with db.transaction(self.dsn) as cur:  # nothing staged for a published period: no litter
                    mode.drop_staging(cur)
        if blocked:
            raise OperatorError("; ".join(blocked) + ". This run's publish would publish them with its own: rerun "
                                "that job first (it resumes and publishes its file), or run this one with force=true "
                                "(the period's staging and ledger rows are reset and its files read again)",
                                period=plan.period)
        if refused:  # every table named at once (force=true reloads the whole period anyway)
            raise SourceDataError("; ".join(why for _, why in refused) + ". Rerun with force=true to reload the "
                                  "period from the files as they are now, or restore the files as loaded",
                                  tables=",".join(t for t, _ in refused))
        return todo

    def _discard_other_rules(self, cur: Any, mode: WriteMode, table: TableSpec) -> None:
        """Discard (rows and ledger, in the caller's transaction) the committed batches of each unpublished file
        that other read rules read (plan.read_rules: the dialect, a column rule, ... changed since), so the
        file is read again whole by this run's rules. Resumed instead, its committed byte ranges -- record
        boundaries under the old rules -- could start this run's reads mid-record, and one file would be
        loaded by two sets of rules. Published files are left alone (``force=true`` reloads them), and so are
        files this run does not read (another job's of the same table and period: its own rerun decides)."""
        period = self.plan.period
        paths = {f.sha256: f.rel for f in table.files}
        other = self.ledger.read_by_other_rules(cur, table.name, period, read_rules(table), list(paths))
        for sha, batches in other.items():
            path = paths.get(sha, sha[:12])
            log.warning("%s: %d batch(es) of %s were committed under other read rules (dialect, columns or format "
                        "changed since); discarding them, the file is read again whole", table.name, batches, path,
                        extra={"table": table.name, "file": path})
            mode.discard_file(cur, self.ledger, period, sha)

    def _discard_replaced_files(self, cur: Any, mode: WriteMode, table: TableSpec) -> None:
        """Discard (rows and ledger, in the caller's transaction) the committed batches of each unpublished file
        whose path this run reads with other content (Ledger.replaced_files: the file changed since a crash).
        Kept, append published the old content's batches beside the new content's rows, and the staged modes
        published them at the finalisation: records of a file that is no longer there, in a load the ledger
        accounted to no file (session 19's fresh-user review: +44,635 rows appended, 299,970 merged of 299,000
        read)."""
        period = self.plan.period
        current = {f.rel: f.sha256 for f in table.files}
        for sha, (path, batches) in self.ledger.replaced_files(cur, table.name, period, current).items():
            log.warning("%s: %s changed since %d of its batch(es) were committed (content %s, now %s); discarding "
                        "them, the file is read again whole", table.name, path, batches, sha[:12],
                        current[path][:12], extra={"table": table.name, "file": path})
            mode.discard_file(cur, self.ledger, period, sha)

    def _other_jobs_staged(self, cur: Any, table: TableSpec) -> List[str]:
        """Why this run must not publish the staged table: another job's unfinished files of the same table and
        period sit in its staging (Ledger.other_jobs_unfinished). The publish takes all of staging, so it
        published them -- a half-read file, with no file row, that stayed in the target even after that job
        dropped the file (a second review, session 20: 10,000 records read, 21,791 keys inserted). Append
        publishes per batch and leaves them to their job."""
        return [f"{table.name}: staging holds {n} committed batch(es) of job {job}'s unfinished file {path} for "
                f"period {self.plan.period}"
                for job, path, n in self.ledger.other_jobs_unfinished(cur, table.name, self.plan.period, self.plan.job)]

    def _discard_unread_files(self, cur: Any, mode: WriteMode, table: TableSpec) -> None:
        """Discard (rows and ledger, in the caller's transaction) the committed batches of each unpublished file
        this job's runs read that this run does not (Ledger.unread_files: removed from the month since a crash,
        or renamed and changed; in an older ledger, without stored paths, any change). Kept, the staged modes
        published them with the rest of staging and append kept them in the target -- records of a file that is
        not in the load, which no rerun would ever complete (a fresh-user review, session 20: 13,216 keys merged
        from 8,000 records read). Another job's unfinished file of the table and period is left alone."""
        period = self.plan.period
        shas = [f.sha256 for f in table.files]
        for sha, (path, batches) in self.ledger.unread_files(cur, table.name, period, self.plan.job, shas).items():
            log.warning("%s: %d batch(es) of %s (content %s) were committed by an earlier run of this job, which no "
                        "longer reads that file (removed from the month, or changed); discarding them", table.name,
                        batches, path or "a file", sha[:12], extra={"table": table.name, "file": path or sha[:12]})
            mode.discard_file(cur, self.ledger, period, sha)

    def _changed_published(self, cur: Any, mode: WriteMode,
                           table: TableSpec) -> Tuple[List[Tuple[str, str]], bool]:
        """A published file whose path now holds other content (Ledger.published_as_other_content): returns
        (refusals, reload the period).

        append (committing is publishing): appending the new content would keep both (every unchanged record
        twice), and taking the old rows out would unpublish what readers saw. Neither is this run's call: each
        such file is returned as (table, why), and start stops the run with one SourceDataError (exit 3) naming
        them all and the remedies. merge with delete_missing (each period a full snapshot): the whole period is
        read again (the mode's reset: staging and the period's ledger rows; the target stays until the publish),
        so the sync keeps exactly the keys the month's files have now. Kept, the old content's batches counted as
        the month's and its dropped keys survived the sync (a fresh-user review: 23,998 keys for a month of
        16,000); forgetting only the changed file's batches lost keys it shared with an unchanged file whose rows
        named its batches (a second review: 10 of 40,000 keys deleted). Plain merge upserts the new content over
        the old (both stay accounted for); replace and snapshot rebuild the period from every file anyway."""
        current = {f.rel: f.sha256 for f in table.files}
        changed = self.ledger.published_as_other_content(cur, table.name, self.plan.period, current)
        if changed and mode.sync_deletes:
            for path, old, rows in changed:
                log.warning("%s: %s changed since it was loaded (%s, %d rows; now %s): reading the month's %d "
                            "file(s) again, the sync then keeps exactly their keys", table.name, path, old[:12], rows,
                            current[path][:12], len(table.files), extra={"table": table.name, "file": path})
            return [], True
        if changed and not mode.staged:
            return [(table.name, f"{table.name}: {path} was loaded into period {self.plan.period} ({rows:,} rows, "
                                 f"content {old[:12]}) and now holds other content ({current[path][:12]}); appended, "
                                 "the target would hold both") for path, old, rows in changed], False
        return [], False

    def _verified_todo(self, cur: Any, table: TableSpec) -> Tuple[List[FileSpec], Dict[Any, Any]]:
        """The table's files not yet published, after checking the ledger's claims against the target
        (dropped table, changed job.schema: loadkit.postgres.identity), as a run does before it skips."""
        plan = self.plan
        done = identity.verified_files(cur, table, self.ledger, plan.period, plan.verify, plan.on_drift)
        return self._unpublished(cur, table, done)

    def _ledger_todo(self, cur: Any, table: TableSpec) -> Tuple[List[FileSpec], Dict[Any, Any]]:
        """The table's files not yet published, as the ledger says (a re-read within this run)."""
        return self._unpublished(cur, table, self.ledger.loaded_files(cur, table.name, self.plan.period))

    def _unpublished(self, cur: Any, table: TableSpec, done: Dict[str, str]) -> Tuple[List[FileSpec], Dict[Any, Any]]:
        ranges = self.ledger.committed_ranges(cur, table.name, self.plan.period)
        return [f for f in table.files if done.get(f.sha256) != "loaded"], ranges

    def _todo(self, table: TableSpec, files: List[FileSpec], ranges: Dict[Any, Any]) -> List[Todo]:
        out = []
        for f in files:
            self._reading.setdefault(table.name, set()).add(f.sha256)
            committed = tuple((m, tuple(r)) for (sha, m), r in ranges.items() if sha == f.sha256)
            out.append(Todo(table, f, committed))
        return out

    def reread(self, metrics: Any, tables: List[str]) -> List[Todo]:
        """What to read again for the byte ranges staging lost (the committed rest is skipped by its ranges)."""
        todo: List[Todo] = []
        for name in tables:
            table = self.plan.table(name)
            with db.transaction(self.dsn) as cur:
                files, ranges = self._ledger_todo(cur, table)
            todo += self._todo(table, files, ranges)
            metrics.tables[name].status = "pending"
        return todo

    # ------------------------------------------------------------ the writers' side

    def writer_settings(self) -> WriterSettings:
        return writer_settings(self.plan, self.dsn)

    # ------------------------------------------------------------ after a stream: the counts against the ledger

    def check_accounting(self, metrics: Any, tables: Sequence[str]) -> None:
        """After a stream, before anything settles: each of ``tables`` counts, in ``metrics``, exactly the
        batches this run committed to the ledger (batches, rows read / loaded / rejected / coerced, blank
        lines). One query (retried through a server restart).

        The summary is built from the batch results the executor delivered; the ledger rows are written in
        each batch's own transaction. A difference means a result was lost or counted twice on its way to
        the driver (a bug: the data itself is as the ledger says), so the run stops here, before it
        publishes anything, with a ``LedgerMismatch`` naming each table's figures, rather than report a
        summary its ledger contradicts; a rerun resumes from the ledger. ``tables`` are the tables this
        round streamed: a later round (staging lost batches) re-reads only tables that settled cleanly,
        whose counts lost the forgotten batches (``_finalize_table``)."""
        plan = self.plan

        def read() -> Dict[str, RunTotals]:
            with db.transaction(self.dsn) as cur:
                return self.ledger.run_totals(cur, plan.run_id, plan.period, tables)

        ledger = retrying(plan.retry)(read)
        wrong = []
        for name in tables:
            t, want = metrics.tables[name], ledger.get(name, RunTotals())
            got = counted(t)
            if got != want:
                wrong.append(f"{name}: counted {_figures(got)}, ledger {_figures(want)}")
        if wrong:
            raise LedgerMismatch("the run's counts disagree with the batches it committed to the ledger "
                                 f"(nothing published; the ledger is right, rerun to resume): {'; '.join(wrong)}",
                                 run_id=plan.run_id, ledger=plan.ledger_schema)

    # ------------------------------------------------------------ complete: settle and publish

    def complete(self, metrics: Any, aborted: Dict[str, str], failed: List[Tuple[str, str, str]],
                 tables: List[str]) -> Completion:
        """Settle the files of ``tables`` (a table in ``aborted`` has its files of this run discarded),
        then publish every table whose files all settled. ``failed`` holds the files that failed in
        earlier rounds of this run (their tables are not published; a sync waits)."""
        done = Completion()
        done.failed = self._settle_files(metrics, aborted, tables)
        done.lost = self._finalize_tables(metrics, failed + done.failed, tables)
        return done

    def _settle_files(self, metrics: Any, aborted: Dict[str, str], tables: List[str]) -> List[Tuple[str, str, str]]:
        """Per file: verify accounting, mark it, or discard everything a failed file committed."""
        failed: List[Tuple[str, str, str]] = []
        for table in self.plan.tables:
            if table.name not in tables:
                continue
            for f in table.files:
                if metrics.tables[table.name].status == "skipped":
                    continue
                if f.sha256 not in self._reading.get(table.name, ()):
                    # published before this run (skipped): settled already. Marked again, a published file of a
                    # merge table went back to 'staged' beside a new or changed file of its month, its batches
                    # then counted as lost from staging, were forgotten and the file read again (a fresh-user
                    # review's "10 committed batch(es) ... missing from staging" where nothing had crashed).
                    continue
                error = metrics.file_error(table.name, f.sha256) or aborted.get(table.name)
                discarded = self._retrying()(self._settle_file, table, f, error, failed)
                if discarded:  # what the run loaded of a failed file is not loaded after all
                    tm = metrics.tables[table.name]
                    tm.rows_loaded -= discarded
                    tm.rows_discarded += discarded
        return failed

    def _settle_file(self, table: TableSpec, f: FileSpec, error: Optional[str],
                     failed: List[Tuple[str, str, str]]) -> int:
        """One file's settlement, one transaction (retried whole on a transient failure); returns the rows this
        run had loaded of a failed file (discarded with it)."""
        plan, led = self.plan, self.ledger
        mode = mode_for(table)
        discarded = 0
        with db.transaction(self.dsn) as cur:
            if error:
                discarded = sum(b.rows_loaded for b in led.file_batches(cur, table.name, plan.period, f.sha256)
                                if b.run_id == plan.run_id)
                mode.discard_file(cur, led, plan.period, f.sha256)
                led.mark_file(cur, plan.run_id, table.name, plan.period, f.sha256, f.rel, f.ordinal, f.size,
                              "failed", error=error)
            else:
                totals = led.file_totals(cur, table.name, plan.period, f.sha256)
                if totals[0] != totals[1] + totals[2]:
                    raise LoadkitError("rows_read != rows_loaded + rows_rejected", table=table.name, file=f.rel,
                                       totals=totals)
                led.mark_file(cur, plan.run_id, table.name, plan.period, f.sha256, f.rel, f.ordinal, f.size,
                              mode.settled_status, totals)
        if error:
            failed.append((table.name, f.rel, error))
        return discarded

    def _finalize_tables(self, metrics: Any, failed: List[Tuple[str, str, str]], tables: List[str]) -> List[str]:
        """Publish each table whose files all settled; returns the tables whose staging lost batches.

        Tables publish PUBLISH_CONCURRENCY at a time, each on its own connection (the key and index
        builds are single-process CPU: two tables use two cores). Each table's publish stays one
        transaction, so what a reader sees of a table is unchanged; across tables there was never one
        transaction (they committed one after the other, in plan order -- now in whichever order they
        finish). A failed table does not stop the others: they publish, and the resume skips them.
        Each table publishes in one transaction that first re-verifies staging against the
        ledger per batch (the mode's ``verify_staging``): a crash restart empties UNLOGGED staging,
        and publishing from it would lose rows while the ledger says they loaded. Lost batches
        are forgotten (committed, without publishing) and the caller reads them again. A
        transient failure (the server restarting mid-finalise) retries the whole transaction;
        a table whose files are already all published (a commit whose reply was lost) is not
        published twice.
        """
        failed_tables = {t for t, _, _ in failed}
        publish: List[TableSpec] = []
        for table in self.plan.tables:
            tm = metrics.tables[table.name]
            if table.name not in tables:
                continue
            if tm.status == "skipped":
                if table.delete_missing:  # a sync an earlier run had to defer (its files are all loaded)
                    with db.transaction(self.dsn) as cur:
                        if not self.ledger.sync_done(cur, table.name, self.plan.period):
                            tm.deleted = self._sync(cur, mode_for(table), failed)
                            self.ledger.record_collapse(cur, self.plan.run_id, table.name, None, tm.deleted)
                continue
            if table.name in failed_tables:
                tm.status = "failed"
                continue
            publish.append(table)

        def one(table: TableSpec) -> bool:
            return bool(self._retrying()(self._finalize_table, table, metrics.tables[table.name], failed))

        if len(publish) < 2 or PUBLISH_CONCURRENCY < 2:
            lost = [one(t) for t in publish]
        else:  # each table in its own transaction on its own connection, PUBLISH_CONCURRENCY at a time
            with ThreadPoolExecutor(PUBLISH_CONCURRENCY, thread_name_prefix="loadkit-publish") as pool:
                futures = [pool.submit(one, t) for t in publish]
                try:
                    wait(futures)
                except BaseException:
                    self.stop_publishes(futures)
                    raise
            lost = [f.result() for f in futures]  # the first table's error (plan order) if any failed
        return [t.name for t, was_lost in zip(publish, lost) if was_lost]

    def stop_publishes(self, futures: Sequence[Any]) -> None:
        """A stop (signal, run deadline) raised in this thread while publish threads ran (this sink's pool,
        runner.EarlyPublish's): the tables not started are dropped, and the run's statements are
        cancelled every STOP_RECANCEL_S until the started ones have ended (their pool's exit joins them). One
        cancel was not enough: it ended the two publishes in progress, the pool then started the third table,
        whose statement waited on a lock held elsewhere (the stop's single cancel had already passed), and the
        exit's join hung the stop (a CI run's SIGTERM with ledger.file locked; test_shutdown 'driver_blocked',
        about 1 in 6 locally). A cancel that fails (the server gone) is logged: the publish then fails alone."""
        for f in futures:
            f.cancel()
        while wait(futures, timeout=STOP_RECANCEL_S).not_done:
            try:
                self.cancel()
            except Exception as exc:  # noqa: BLE001 -- best effort, the loop waits for the threads either way
                log.warning("could not cancel the publishes' statements: %s", exc)

    def _finalize_table(self, table: TableSpec, tm: Any, failed: List[Tuple[str, str, str]]) -> bool:
        """One table's verify-then-publish transaction; True if staging lost batches (nothing published).

        In the same transaction: the duplicates count, the full-snapshot sync (Sync mode) and the
        ledger's table row, so a published period is always a synced, accounted period.

        The table's metrics are set inside the transaction (its ledger row is written from them), so a
        transaction that does not commit -- a stop's cancel, a transient failure -- puts them back as they
        were: a stop during the sync or the ledger row's update once left the run's result (and its summary,
        MLflow) calling the table 'loaded' with the rolled-back publish's counts, and its table_load row
        'loading' (the run's end closes only rows not 'loaded'); a retry of the lost-batches branch would
        subtract the lost batches from the counts twice."""
        before = {k: getattr(tm, k) for k in _FINALIZE_FIELDS}
        try:
            return self._finalize_table_once(table, tm, failed)
        except BaseException:
            for k, v in before.items():
                setattr(tm, k, v)
            raise

    def _finalize_table_once(self, table: TableSpec, tm: Any, failed: List[Tuple[str, str, str]]) -> bool:
        plan, led = self.plan, self.ledger
        mode = mode_for(table)
        self._lock.check()  # never publish without the job lock (raises TransientDBError if lost)
        finalising = time.perf_counter()
        with db.transaction(self.dsn) as cur:
            # Publishing is DDL too (indexes, swaps, partitions): never at the same time as another run's
            # prepare on this schema, nor as another publish of this table (a deadlock is retried).
            publish_lock(cur, table.schema, table.name)
            if mode.staged and not led.staged_files(cur, table.name, plan.period):
                log.info("%s: already published (the previous attempt committed)", table.name)
                tm.status = "loaded"
                led.finish_table(cur, plan.run_id, table.name, outcome(tm))
                return False
            batches = led.unpublished_batches(cur, table.name, plan.period)
            if isinstance(mode, Merge):  # before verify_staging: its count gathers the candidates' rows too
                mode.key_candidates = self._hints.candidates(table.name, batches)
                mode.compare_work_mem = plan.sink.compare_work_mem
            lost = mode.verify_staging(cur, led, plan.period)
            if lost:
                ours = [b for b in lost if b.run_id == plan.run_id]  # counted by this run: read again
                tm.rows_read -= sum(b.rows_in for b in ours)
                tm.rows_loaded -= sum(b.rows_loaded for b in ours)
                tm.rows_rejected -= sum(b.rows_rejected for b in ours)
                tm.rows_coerced -= sum(b.rows_coerced for b in ours)
                tm.blank_lines -= sum(b.blank_lines for b in ours)
                tm.batches -= len(ours)
                return True
            staged = sum(batches.values())  # verify_staging found none lost: the batches are as read above
            # sink.maintenance_work_mem for the key and index builds (a sort in memory, not on disk)
            with heartbeat(log, f"finalising {table.name} ({table.mode})", table=table.name), \
                    record_steps() as steps, settings(cur, maintenance_work_mem=plan.sink.maintenance_work_mem):
                published = mode.finalize(cur, led)
            led.mark_files_loaded(cur, table.name, plan.period)
            tm.inserted, tm.updated, tm.unchanged, tm.status = (published.inserted, published.updated,
                                                                published.unchanged, "loaded")
            if mode.staged:  # rows staged but collapsed onto a later row with the same key
                tm.duplicates = max(0, staged - sum(n or 0 for n in published))
            with record_steps() as synced:
                tm.deleted = self._sync(cur, mode, failed)
            tm.finalise_steps = {**steps, **synced}  # seconds per step (upsert, swap, indexes, sync_missing...)
            tm.finalise_s = time.perf_counter() - finalising  # the commit below is not counted
            tm.finalised_at = time.time()
            led.finish_table(cur, plan.run_id, table.name, outcome(tm))
            led.record_collapse(cur, plan.run_id, table.name, tm.duplicates, tm.deleted, tm.unchanged)
        self._hints.drop(table.name)  # published: its staging is gone
        return False

    def _sync(self, cur: Any, mode: WriteMode, failed: List[Tuple[str, str, str]]) -> Optional[int]:
        """The mode's full-snapshot sync (modes.Sync), in the finalisation's transaction; None: none ran.

        It holds off when a file of its own table failed in this run (``failed``: (table, path, why)); another
        table's failed file says nothing about this table's month (and that table may publish later: a table
        publishes as soon as its own files are read, runner.EarlyPublish)."""
        plan = self.plan
        month_start = date(plan.year, plan.month, 1) if plan.year is not None and plan.month is not None else None
        own = [f for f in failed if f[0] == mode.table.name]
        return mode.sync(cur, self.ledger, plan.period, month_start, bool(own))

    # ------------------------------------------------------------ end

    def end(self, metrics: Any, status: str, category: Optional[str], text: Optional[str],
            mlflow_run_id: Optional[str]) -> None:
        """The run's end in the ledger (its tables' rows closed too), retried through a server restart;
        a failure to record is logged, never raised instead of the run's own outcome."""
        plan = self.plan
        if status == "interrupted":
            self._counts_from_ledger(metrics)

        def record() -> None:
            with db.transaction(self.dsn, application_name=self._end_session) as cur:
                for t in metrics.tables.values():
                    if t.status not in ("loaded", "skipped"):
                        t.status = "failed" if status == "failed" else status if status != "succeeded" else t.status
                        self.ledger.finish_table(cur, plan.run_id, t.name, outcome(t, text))
                    elif t.status == "skipped":  # a no-op table's row is closed too, never left 'loading'
                        self.ledger.finish_table(cur, plan.run_id, t.name, outcome(t))
                self.ledger.finish_run(cur, plan.run_id, status, metrics.totals(), category, text, mlflow_run_id,
                                       metrics.discarded())

        try:  # the run's end must reach the ledger even if the server is restarting right now
            retrying(plan.retry)(record)
        except Exception as exc:  # reported, never a traceback instead of the run's own outcome
            log.error("could not record the end of run %s in the ledger: %s", plan.run_id, mask_text(str(exc)))

    def _counts_from_ledger(self, metrics: Any) -> None:
        """An interrupted run's counts, made the ledger's: batches whose commit was on its way when the stop came
        landed after the driver stopped collecting results (a fresh-user review, session 19: a SIGTERM'd run's
        summary said 4 batches / 19,825 rows where its ledger held 6 / 29,755). Waits up to WRITERS_SETTLE_S
        for the run's writer sessions to leave their transactions (each commits or rolls back), then takes
        each table's figures from Ledger.run_totals. Tables that discarded files keep their own counts (the
        ledger no longer holds the discarded batches). Best effort: a failure is logged, the counts stay."""
        plan = self.plan
        try:
            deadline = time.monotonic() + WRITERS_SETTLE_S
            while db.sessions_in_transaction(self.dsn, plan.run_id, "writer") and time.monotonic() < deadline:
                time.sleep(0.05)
            with db.transaction(self.dsn, application_name=self._end_session) as cur:
                totals = self.ledger.run_totals(cur, plan.run_id, plan.period, list(metrics.tables))
        except Exception as exc:  # the end is still recorded, with the counts the driver has
            log.warning("could not read run %s's committed batches from the ledger; its counts are the driver's: %s",
                        plan.run_id, mask_text(str(exc)))
            return
        for name, tm in metrics.tables.items():
            want = totals.get(name, RunTotals())
            got = counted(tm)
            if tm.rows_discarded or got == want:
                continue
            log.info("%s: %d batch(es) committed after the stop were not yet counted; the counts are the ledger's",
                     name, want.batches - got.batches, extra={"table": name})
            (tm.batches, tm.rows_read, tm.rows_loaded, tm.rows_rejected, tm.rows_coerced,
             tm.blank_lines) = (want.batches, want.rows_in, want.rows_loaded, want.rows_rejected, want.rows_coerced,
                                want.blank_lines)

    def reject_sample(self) -> Any:
        """A few of this run's rejects (an Arrow table) for its MLflow record."""
        with db.transaction(self.dsn) as cur:
            return self.ledger.reject_sample(cur, self.plan.run_id)


# What _finalize_table sets on a table's metrics before its transaction commits (put back if it does not).
_FINALIZE_FIELDS = ("status", "inserted", "updated", "unchanged", "duplicates", "deleted", "finalise_steps",
                    "finalise_s", "finalised_at", "batches", "rows_read", "rows_loaded", "rows_rejected",
                    "rows_coerced", "blank_lines")


def counted(t: Any) -> RunTotals:
    """A table's counts in its TableMetrics, in the shape of the ledger's (Ledger.run_totals)."""
    return RunTotals(t.batches, t.rows_read, t.rows_loaded, t.rows_rejected, t.rows_coerced, t.blank_lines)


def _figures(t: RunTotals) -> str:
    return (f"{t.batches} batches, {t.rows_in} read, {t.rows_loaded} loaded, {t.rows_rejected} rejected, "
            f"{t.rows_coerced} coerced, {t.blank_lines} blank lines")


def outcome(t: Any, error: Optional[str] = None) -> TableOutcome:
    """A table's ledger row from its TableMetrics."""
    return TableOutcome(t.status, t.rows_read, t.rows_loaded, t.rows_rejected, t.inserted, t.updated, t.seconds,
                        error, t.rows_discarded)
