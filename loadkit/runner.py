"""Run one job: plan, prepare, stream the pipeline, verify, finalise, record.

The driver owns the run-level ledger work (run, table, file rows, finalisation) and
reacts to the writers' per-batch results: progress, alerts, reject thresholds,
signals. Batch-level exactly-once lives in the writer; this module makes sure a run
ends in a recorded state (succeeded / failed / interrupted) whatever happens.
"""
from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

from loadkit import prom, reload, telemetry
from loadkit.postgres import db
from loadkit.postgres import identity
from loadkit.postgres import ledger
from loadkit.postgres import modes
from loadkit.alerts import AlertEngine, Watchdog
from loadkit.batching import BatchSizer, SizingSettings
from loadkit.config import LoadkitConfig, as_plain_dict
from loadkit.errors import (EXIT_CODES, Category, TransientDBError, InterruptedRun, LoadkitError, RejectThresholdError,
                            JobLockLost, RunDeadlineExceeded, SourceDataError, classify)
from loadkit.errors import as_loadkit_error, unwrap
from loadkit.logs import heartbeat, set_context
from loadkit.metrics import ProgressBar, RunMetrics, memory_table, progress_line, progress_text, summary_table
from loadkit.monitor import MemoryMonitor
from loadkit.execute import choose_executor, make_executor, writer_settings
from loadkit.execute.channel import SizeChannel
from loadkit.plan import LoadPlan, TableSpec, build_plan
from loadkit.records import BatchResult
from loadkit.source.read import ReadUnit
from loadkit.resilience import retrying
from loadkit.security import mask_dsn, mask_text, qualified
from loadkit.tracking import RunTracker

log = logging.getLogger("loadkit.run")

_PROGRESS_EVERY_S = 5.0
_BAR_EVERY_S = 0.5  # the in-place progress line (a terminal) is redrawn at most this often between reports
# Read-again rounds when staging lost batches before publishing (a crash restart empties UNLOGGED
# tables); past this many the run fails transient and the rerun resumes.
_MAX_REREADS = 3


@dataclass
class RunResult:
    run_id: str
    status: str
    metrics: RunMetrics
    wall_s: float
    error: Optional[BaseException] = None
    mlflow_run_id: Optional[str] = None
    failed_files: List[Tuple[str, str, str]] = field(default_factory=list)
    fetched: List[Any] = field(default_factory=list)  # loadkit.source.fetch.Fetched, one per remote file
    label: str = ""  # heads the summary: a sweep point's id and overrides

    @property
    def summary(self) -> str:
        from loadkit.source.fetch import summary_line

        head = summary_line(self.fetched) + "\n" if self.fetched else ""
        return head + summary_table(self.metrics, self.run_id, self.wall_s, self.label)


class _Signals:
    """SIGINT/SIGTERM raise InterruptedRun in the driver's main thread, at once.

    Python runs a signal handler only when the main thread is back in the interpreter, not
    while it waits inside libpq (a finalize statement blocked on a lock). So the C-level
    handler also writes to a wakeup pipe (``signal.set_wakeup_fd``) and a watcher thread
    calls ``on_signal`` at once -- the runner cancels the run's own statements there
    (``db.cancel_backends``), the blocked call returns, and the handler runs. The watchdog
    and the run deadline interrupt the same way (``_thread.interrupt_main`` trips the pipe).
    """

    def __init__(self, pending: Optional[Callable[[], Optional[BaseException]]] = None,
                 on_signal: Optional[Callable[[], object]] = None) -> None:
        self._previous: Dict[int, Any] = {}
        self.received: Optional[int] = None
        self._pending = pending  # an error the watchdog wants raised (it interrupts with SIGINT)
        self._on_signal = on_signal
        self._pipe: Optional[Tuple[int, int]] = None
        self._old_wakeup = -1
        self._watcher: Optional[threading.Thread] = None
        self.defer = False

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread): leave signals alone
                break
        if self._previous and self._on_signal is not None:
            r, w = os.pipe()
            os.set_blocking(w, False)
            try:
                self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            except ValueError:
                os.close(r)
                os.close(w)
                return self
            self._pipe = (r, w)
            self._watcher = threading.Thread(target=self._watch, args=(r,), name="loadkit-signals", daemon=True)
            self._watcher.start()
        return self

    def _watch(self, fd: int) -> None:
        wanted = {int(signal.SIGINT), int(signal.SIGTERM)}
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:  # write end closed: the run is over
                return
            if wanted & set(data) and self._on_signal is not None:
                try:
                    self._on_signal()
                except Exception as exc:  # best effort; the handler still stops the run
                    log.warning("could not cancel the run's statements: %s", exc)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.defer:  # the run is recording its end: that finishes first (it is quick)
            self.received = self.received or signum
            return
        pending = self._pending() if self._pending is not None else None
        if pending is not None:
            raise pending
        if self.received is None:
            self.received = signum
            raise InterruptedRun(f"stopped by {signal.Signals(signum).name}", signal=signum)

    def __exit__(self, *exc: Any) -> None:
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            os.close(self._pipe[1])
            if self._watcher is not None:
                self._watcher.join(timeout=2)
            os.close(self._pipe[0])
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_LOCK_CHECK_S = 1.0


class _JobLock:
    """The run's job lock (a session advisory lock) and its health check.

    The lock lives as long as its session: a terminated session or a server restart drops
    it, and a second run of the month would be admitted. A watcher thread pings the session
    every ``_LOCK_CHECK_S``; when it is gone it reconnects and takes the lock again, and
    keeps the run only if nobody else has it and the ledger still shows this run
    'running' (another run marks it 'crashed' when it starts). Otherwise the run stops as
    transient (``on_lost``), before it can publish. Publishing checks it synchronously too.
    While the server is unreachable nobody else can run either, so the watcher keeps trying.
    """

    def __init__(self, dsn: str, plan: LoadPlan, on_lost: Callable[[LoadkitError], None]) -> None:
        self._dsn = db.with_application_name(dsn, db.application_name(plan.run_id, "lock"))
        self._plan = plan
        self._on_lost = on_lost
        self._conn: Any = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[LoadkitError] = None

    def acquire(self) -> bool:
        self._conn = db.connect(self._dsn, autocommit=True)
        with self._conn.cursor() as cur:
            return ledger.try_lock_job(cur, self._plan.ledger_schema, self._plan.job, self._plan.period)

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
                    cur.execute(f"SELECT status FROM {qualified(plan.ledger_schema, 'run')} WHERE run_id = %s",
                                (plan.run_id,))
                    row = cur.fetchone()
            except LoadkitError:
                raise TransientDBError("cannot reach the server to check the job lock") from None  # retried
            except Exception as exc:
                raise TransientDBError(f"cannot check the job lock: {exc}") from None
            if not took or row is None or row[0] != "running":
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
                try:
                    self._conn.close()
                except Exception:  # already broken: the lock is gone with it
                    pass


class Runner:
    def __init__(self, cfg: LoadkitConfig, tags: Optional[Dict[str, str]] = None,
                 fetched: Optional[List[Any]] = None) -> None:
        self.cfg = cfg
        self.tags = tags or {}
        self.fetched = fetched or []  # what the fetch stage downloaded before this run (ledger: fetched)
        self.plan: Optional[LoadPlan] = None
        self.dsn = ""
        # table -> why its reject threshold was exceeded; its files of this run get discarded.
        self._aborted: Dict[str, str] = {}
        self._reading: Dict[str, set] = {}  # table -> shas of the files this run reads
        self._watchdog: Optional[Watchdog] = None
        self._deadline_error: Optional[RunDeadlineExceeded] = None
        self._signals: Optional[_Signals] = None
        self._lock_error: Optional[LoadkitError] = None
        self._job_lock: Optional[_JobLock] = None
        self._bar: Optional[ProgressBar] = None  # the in-place progress line (env.progress_bars on a terminal)
        self._interrupt_main = threading.current_thread() is threading.main_thread()
        self._trace: Optional[telemetry.RunTrace] = None  # span ids of this run (telemetry.tracing on)

    # ------------------------------------------------------------ entry

    def run(self) -> RunResult:
        if self.cfg.sink.dsn:  # a malformed DSN is refused (exit 2, text withheld) before any file is listed
            db.parse_dsn(self.cfg.sink.dsn)
        self.plan = plan = build_plan(self.cfg)
        for table in plan.tables:  # every derived name fits PostgreSQL's 63 bytes, before any SQL
            modes.validate_identifiers(table)
        set_context(run_id=plan.run_id)
        sink = self.cfg.sink
        self.dsn = db.session_dsn(db.resolve_dsn(sink.dsn, sink.embedded_dir), sink.connect_timeout,
                                  sink.statement_timeout_ms, sink.lock_timeout_ms,
                                  db.application_name(plan.run_id, "driver"))
        db.server_check(self.dsn)
        metrics = RunMetrics({t.name: t.mode for t in plan.tables})
        tracker = RunTracker.from_config(self.cfg.tracking)
        monitor = MemoryMonitor.instance()
        monitor.reset_peak()
        started = time.time()
        self._signals = _Signals(self._pending_error, lambda: db.cancel_backends(self.dsn, plan.run_id))
        with self._signals:  # from the first ledger statement: a stop while waiting on a lock there is prompt too
            return self._run_locked(plan, metrics, tracker, monitor, started)

    def _run_locked(self, plan: LoadPlan, metrics: RunMetrics, tracker: RunTracker, monitor: MemoryMonitor,
                    started: float) -> RunResult:
        self._job_lock = job_lock = _JobLock(self.dsn, plan, self._lock_lost)
        try:
            try:
                retrying(plan.retry)(self._ensure_ledger, plan)
                if not job_lock.acquire():
                    raise TransientDBError(f"another run of {plan.job} {plan.period} is in progress "
                                           f"(ledger {plan.ledger_schema}); retry when it ends")
                with job_lock.cursor() as cur:
                    ledger.mark_stale_runs(cur, plan.ledger_schema, plan.job, plan.period)
                    ledger.start_run(cur, plan.ledger_schema, plan.run_id, plan.job, plan.period, self._params())
                    if self.fetched:
                        from loadkit.source import fetch

                        fetch.record(cur, plan.ledger_schema, plan.run_id, plan.period, self.fetched)
            except LoadkitError:
                raise
            except Exception as exc:  # a driver error before the run row exists: its category, not a traceback
                raise as_loadkit_error(exc, ledger=plan.ledger_schema) from exc
            job_lock.watch()
            tracker.start(f"{plan.job}-{plan.period}", self._params(), self._tags())
            result = self._run_tracked(plan, metrics, tracker, monitor, started)
        finally:
            job_lock.close()  # releases the session advisory lock
        return result

    def _ensure_ledger(self, plan: LoadPlan) -> None:
        """The ledger's tables, in one transaction (its DDL lock is transaction-level); retried on deadlock."""
        with db.transaction(self.dsn) as cur:
            ledger.ensure(cur, plan.ledger_schema)

    def _lock_lost(self, error: LoadkitError) -> None:
        """The job lock's watcher lost the lock for good: stop the run (transient) before it can race."""
        self._lock_error = error
        log.error("%s", error)
        if self._interrupt_main:
            _thread.interrupt_main()

    def _run_tracked(self, plan: LoadPlan, metrics: RunMetrics, tracker: RunTracker, monitor: MemoryMonitor,
                     started: float) -> RunResult:
        alerts = AlertEngine(self.cfg.alerts, plan.run_id, on_alert=lambda a: tracker.alert(a.rule, a.subject, a.value))
        self._watchdog = None
        endpoint = prom.serve(self.cfg, metrics, monitor, alerts, plan.run_id, self.dsn)
        deadline = self._start_deadline(started)
        status, error = "succeeded", cast(Optional[BaseException], None)
        failed: List[Tuple[str, str, str]] = []
        try:
            self._trace = telemetry.start_run(self.cfg, plan)
            units = self._prepare(plan, metrics)
            tables = [t.name for t in plan.tables]
            for round_ in range(_MAX_REREADS + 1):
                for u in units:
                    self._reading.setdefault(u.table.name, set()).add(u.file.sha256)
                self._stream(plan, units, metrics, alerts, monitor, tracker)
                finalising = time.perf_counter()
                self._check_final_thresholds(plan, metrics)
                failed += self._settle_files(plan, metrics, tables)
                lost = self._finalize_tables(plan, metrics, failed, tables)
                metrics.finalise_s += time.perf_counter() - finalising
                if not lost:
                    break
                if round_ == _MAX_REREADS:
                    raise TransientDBError(f"staging lost committed batches {round_ + 1} times (is the server "
                                           "crash-restarting?); nothing of them was published, rerun to resume",
                                           tables=",".join(lost))
                log.warning("re-reading the batches staging lost before publishing: %s", ", ".join(lost))
                units, tables = self._reread(plan, metrics, lost), lost
            if self._aborted:
                status = "failed"
                error = RejectThresholdError("; ".join(self._aborted.values()), tables=sorted(self._aborted))
            elif failed:
                status = "failed"
                error = SourceDataError(f"{len(failed)} source file(s) failed: " +
                                        "; ".join(f"{t}/{p}: {m}" for t, p, m in failed))
        except (InterruptedRun, KeyboardInterrupt) as exc:  # Ctrl-C outside the signal handler's reach too
            status = "interrupted"
            error = exc if isinstance(exc, InterruptedRun) else InterruptedRun("stopped by KeyboardInterrupt")
            self._shutdown_ray()
        except BaseException as exc:  # recorded, then re-raised to the caller below via the result
            status, error = "failed", unwrap(exc)  # the classified cause, not Ray's wrapper around it
            if classify(error) is Category.INTERRUPTED:  # our own cancel surfaced before the handler's error
                status, error = "interrupted", InterruptedRun(f"stopped: {error}")
                self._shutdown_ray()
        if deadline is not None:
            deadline.cancel()
        if self._signals is not None:
            self._signals.defer = True  # a second stop must not cut the recording of the first short
        wall = time.time() - started
        try:
            self._record_end(plan, metrics, tracker, monitor, status, error, wall, alerts)
        finally:
            if endpoint is not None:
                endpoint.stop()
        telemetry.record_run(self.cfg, plan, metrics, status, started, wall, self._trace)
        return RunResult(plan.run_id, status, metrics, wall, error, tracker.run_id, failed, self.fetched,
                         run_label(self.tags))

    def _pending_error(self) -> Optional[BaseException]:
        """An error a helper thread wants raised in the main thread (it interrupts with SIGINT)."""
        if self._watchdog is not None and self._watchdog.error is not None:
            return self._watchdog.error
        return self._deadline_error or self._lock_error

    def _start_deadline(self, started: float) -> Optional[threading.Timer]:
        """env.max_run_seconds: a timer that stops the run like an interrupt (the error is transient)."""
        limit = self.cfg.env.max_run_seconds
        if not limit:
            return None
        interrupt = threading.current_thread() is threading.main_thread()

        def fire() -> None:
            self._deadline_error = RunDeadlineExceeded(f"run deadline exceeded: env.max_run_seconds={limit:g}; "
                                                       "committed batches are kept, rerun to resume")
            log.error("%s", self._deadline_error)
            if interrupt:
                _thread.interrupt_main()

        timer = threading.Timer(max(0.0, limit - (time.time() - started)), fire)
        timer.daemon = True
        timer.start()
        return timer

    # ------------------------------------------------------------ stages

    def _prepare(self, plan: LoadPlan, metrics: RunMetrics) -> List[ReadUnit]:
        """DDL, force resets and the resume state; returns the files still to read."""
        units: List[ReadUnit] = []
        for table in plan.tables:
            with db.transaction(self.dsn) as cur:
                assert self.cfg.job is not None
                # Concurrent runs on one database: their DDL (CREATE ... IF NOT EXISTS races on the
                # catalog) is serialised per target schema until this transaction ends.
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"loadkit-ddl:{table.schema}",))
                modes.prepare(cur, table, self.cfg.job.migrate)
                if plan.force:
                    modes.reset(cur, table, plan.ledger_schema, plan.period)
                else:  # staged batches a crash (UNLOGGED) or a declaration change lost: read them again
                    modes.forget_lost_batches(cur, table, plan.ledger_schema, plan.period)
                todo, ranges = self._todo(cur, plan, table, verify=True)
                if table.mode in ("replace", "snapshot") and 0 < len(todo) < len(table.files):
                    # These modes publish a whole month at once: a new file in a published month
                    # means rebuilding it from every file, or the swap would drop the others' rows.
                    log.info("table %s: %d new file(s) in a published month; reloading all %d", table.name,
                             len(todo), len(table.files))
                    modes.reset(cur, table, plan.ledger_schema, plan.period)
                    ranges, todo = {}, list(table.files)
                ledger.start_table(cur, plan.ledger_schema, plan.run_id, table.name, plan.period, table.mode,
                                   len(table.files), len(table.files) - len(todo))
            tm = metrics.tables[table.name]
            tm.files, tm.files_skipped = len(table.files), len(table.files) - len(todo)
            units += self._units(plan, table, todo, ranges)
            if not todo:
                tm.status = "skipped"
                with db.transaction(self.dsn) as cur:  # nothing staged for a published month: no litter
                    modes.drop_staging(cur, table)
        return units

    def _todo(self, cur: Any, plan: LoadPlan, table: TableSpec,
              verify: bool = False) -> Tuple[List[Any], Dict[Any, Any]]:
        """The table's files not yet published, and the byte ranges already committed (to skip).

        ``verify``: the ledger's claims are checked against the target first (dropped table, changed
        job.schema: loadkit.postgres.identity), as a run does before it skips anything."""
        if verify:
            assert self.cfg.job is not None
            done = identity.verified_files(cur, table, plan.ledger_schema, plan.period,
                                           self.cfg.job.verify, self.cfg.job.on_drift)
        else:
            done = ledger.loaded_files(cur, plan.ledger_schema, table.name, plan.period)
        ranges = ledger.committed_ranges(cur, plan.ledger_schema, table.name, plan.period)
        return [f for f in table.files if done.get(f.sha256) != "loaded"], ranges

    def _units(self, plan: LoadPlan, table: TableSpec, todo: List[Any], ranges: Dict[Any, Any]) -> List[ReadUnit]:
        out = []
        for f in todo:
            committed = tuple((m, tuple(r)) for (sha, m), r in ranges.items() if sha == f.sha256)
            parent = self._trace.traceparent(table.name, f.sha256) if self._trace is not None else ""
            out.append(ReadUnit(table, f, committed, plan.batch.size, traceparent=parent))
        return out

    def _reread(self, plan: LoadPlan, metrics: RunMetrics, tables: List[str]) -> List[ReadUnit]:
        """Read units for the byte ranges staging lost (the committed rest is skipped by its ranges)."""
        units: List[ReadUnit] = []
        for name in tables:
            table = plan.table(name)
            with db.transaction(self.dsn) as cur:
                todo, ranges = self._todo(cur, plan, table)
            units += self._units(plan, table, todo, ranges)
            metrics.tables[name].status = "pending"
        return units

    def _stream(self, plan: LoadPlan, units: List[ReadUnit], metrics: RunMetrics, alerts: AlertEngine,
                monitor: MemoryMonitor, tracker: RunTracker) -> None:
        if not units:
            log.info("nothing to load: every file of %s is already loaded (force=true reloads)", plan.period)
            return
        env = self.cfg.env
        executor = make_executor(self._executor(units), env.address, env.num_cpus, env.object_store_memory,
                                 _runtime_env(env.ship_code), env.progress_bars)
        metrics.executor = executor.name
        log.info("executor: %s (%d file(s), %.1f MB to read)", executor.name, len(units),
                 sum(u.file.size for u in units) / 1e6)
        executor.start()
        tracker.ready()  # opened while Ray started; a broken store stops the run before any data moves
        tracker.tag("executor", executor.name)
        last_report, step = time.time(), 0
        for tm in metrics.tables.values():
            tm.started = last_report
        metrics.expect((u.table.name, u.file.sha256, u.file.path, u.table.format, u.file.size) for u in units)
        metrics.touch()  # the stall clock starts with the pipeline
        stream_started = time.perf_counter()
        sizer = BatchSizer(self._sizing())
        channel = executor.size_channel(plan.batch.size)
        # Only the main thread can be interrupted; elsewhere the loop polls the watchdog between results.
        interrupt = _thread.interrupt_main if threading.current_thread() is threading.main_thread() else None
        results_iter = executor.run(plan, units, writer_settings(plan, self.dsn), channel.board)
        self.reloader = reload.install(self.cfg, self.tags.get("overrides"), alerts, sizer, channel, metrics)
        self._bar = ProgressBar() if env.progress_bars and _stderr_is_tty() else None
        try:
            with Watchdog(alerts, metrics.seconds_since_progress, interrupt) as self._watchdog:
                while True:
                    waited = time.perf_counter()
                    result = next(results_iter, None)
                    metrics.driver_wait_s += time.perf_counter() - waited
                    if result is None:
                        break
                    self._watchdog.raise_if_tripped()
                    if self._deadline_error is not None:
                        raise self._deadline_error
                    if self._lock_error is not None:
                        raise self._lock_error
                    result = metrics.add(result)
                    if result.kind == "data":
                        self._check_batch(plan, metrics, alerts, result)
                        self._resize(sizer, channel, metrics, monitor, result)
                    elif result.kind == "eof":
                        log.debug("read done: %d chunk(s)", result.chunks,
                                  extra={"table": result.table_name, "file": result.member or result.file_sha[:12]})
                    else:
                        log.warning("read failed: %s", result.message,
                                    extra={"table": result.table_name, "file": result.member or result.file_sha[:12]})
                    if time.time() - last_report >= _PROGRESS_EVERY_S:
                        step += 1
                        self._progress(metrics, alerts, monitor, tracker, step, channel)
                        last_report = time.time()
                    elif self._bar is not None and time.time() - self._bar.drawn_at >= _BAR_EVERY_S:
                        self._bar.draw(progress_line(metrics.progress(monitor.latest())))
            metrics.stream_s = time.perf_counter() - stream_started
            self._progress(metrics, alerts, monitor, tracker, step + 1, channel)
            for tm in metrics.tables.values():  # small tables never reach the mid-stream sample size
                alerts.check("reject_rate", tm.name, tm.reject_rate)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.reloader.uninstall()
            getattr(results_iter, "close", lambda: None)()  # stop Ray Data's executor on an early exit
            channel.close()

    def _executor(self, units: List[ReadUnit]) -> str:
        """Ray Data, or the same stages in this process where Ray's start-up or its processes would
        cost more than they give: a small input, or a small local machine (see README, Benchmark)."""
        env = self.cfg.env
        return choose_executor(env.executor, env.address, sum(u.file.size for u in units),
                               env.num_cpus or os.cpu_count() or 1, env.inprocess_max_bytes, env.inprocess_max_cpus)

    def _sizing(self) -> SizingSettings:
        assert self.plan is not None
        b = self.plan.batch
        return SizingSettings(b.policy, b.size, b.min_size, b.max_size, window_s=b.window_s,
                              memory_ceiling=b.memory_ceiling)

    def _resize(self, sizer: BatchSizer, channel: SizeChannel, metrics: RunMetrics,
                monitor: MemoryMonitor,
                result: BatchResult) -> None:
        """Feed the sizing policy a committed batch; publish the new size to the read tasks if it moved."""
        if result.status != "committed":
            return
        decision = sizer.observe(result.rows_in, monitor.latest()[2])
        if decision is not None:
            channel.publish(decision.size)
            metrics.size_changed(decision.size, decision.reason)
            log.info("batch size -> %s rows (%s, %.0f rows/s)", f"{decision.size:,}", decision.reason, decision.rate)

    def _check_batch(self, plan: LoadPlan, metrics: RunMetrics, alerts: AlertEngine, result: BatchResult) -> None:
        table = plan.table(result.table_name)
        tm = metrics.tables[table.name]
        # Mid-stream the rate needs a base to mean anything: judge it after the first full batch.
        self._check_threshold(table, tm, judge_rate=tm.rows_read >= min(plan.batch.size, 1000))
        alerts.check("reject_rate", table.name, tm.reject_rate, tm.rows_read >= 1000)
        alerts.check("pool_utilisation", result.writer, result.pool_utilisation)

    def _check_threshold(self, table: TableSpec, tm: Any, judge_rate: bool) -> None:
        """Mark the table aborted once it rejects too much.

        The stream is not cut short: batches already in flight could commit after a
        discard and survive it. The table's files of this run are discarded in
        _settle_files, once every writer is done, and the run fails with this message.
        """
        if table.name in self._aborted:
            return
        why = None
        if table.max_rejects is not None and tm.rows_rejected > table.max_rejects:
            why = f"{tm.rows_rejected} rows, more than max_rejects={table.max_rejects}"
        elif judge_rate and tm.reject_rate > table.max_reject_rate:
            why = f"{tm.reject_rate:.2%} of rows, more than max_reject_rate={table.max_reject_rate:.2%}"
        if why:
            self._aborted[table.name] = (f"table {table.name} rejected {why} (of {tm.rows_read} read); "
                                         "its files of this run were discarded, nothing of them is loaded; "
                                         f"their first rejects stay in {self.plan.ledger_schema if self.plan else ''}"
                                         ".reject (discarded=true) and in the MLflow rejects_sample")
            log.error("reject threshold exceeded: %s", self._aborted[table.name], extra={"table": table.name})

    def _check_final_thresholds(self, plan: LoadPlan, metrics: RunMetrics) -> None:
        """Judge every table on its complete counts, however few rows it had."""
        for table in plan.tables:
            self._check_threshold(table, metrics.tables[table.name], judge_rate=True)

    def _progress(self, metrics: RunMetrics, alerts: AlertEngine, monitor: MemoryMonitor, tracker: RunTracker,
                  step: int, channel: SizeChannel) -> None:
        metrics.chunks_read, metrics.read_wait_s = channel.counters()
        figures = metrics.progress(monitor.latest())
        done = figures.get("done_fraction")
        if self._bar is not None:  # drawn in place; the same line still goes to the log, at DEBUG
            self._bar.draw(progress_line(figures))
        log.log(logging.DEBUG if self._bar is not None else logging.INFO,
                "progress: %s%s rows read, %s loaded, %s rejected, %.0f rows/s, rss %.0f MB, %d batches queued",
                "" if done is None else progress_text(done, figures.get("eta_s"), _stderr_is_tty()) + ": ",
                f"{figures['rows_read']:,}", f"{figures['rows_loaded']:,}", f"{figures['rows_rejected']:,}",
                figures["rows_per_s"], figures["rss_bytes"] / 2**20, figures["queue_depth"])
        tracker.progress(figures, step)
        alerts.check("memory_fraction", "host", figures["memory_fraction"])

    def _settle_files(self, plan: LoadPlan, metrics: RunMetrics, tables: List[str]) -> List[Tuple[str, str, str]]:
        """Per file: verify accounting, mark it, or discard everything a failed file committed."""
        failed: List[Tuple[str, str, str]] = []
        for table in plan.tables:
            if table.name not in tables:
                continue
            for f in table.files:
                if metrics.tables[table.name].status == "skipped":
                    continue
                error = metrics.file_error(table.name, f.sha256)
                if error is None and f.sha256 in self._reading.get(table.name, ()):
                    error = self._aborted.get(table.name)
                retrying(plan.retry)(self._settle_file, plan, table, f, error, failed)
        return failed

    def _settle_file(self, plan: LoadPlan, table: TableSpec, f: Any, error: Optional[str],
                     failed: List[Tuple[str, str, str]]) -> None:
        """One file's settlement, one transaction (retried whole on a transient failure)."""
        with db.transaction(self.dsn) as cur:
            if error:
                modes.discard_file(cur, table, plan.ledger_schema, plan.period, f.sha256)
                ledger.mark_file(cur, plan.ledger_schema, plan.run_id, table.name, plan.period, f.sha256,
                                 f.rel, f.ordinal, f.size, "failed", error=error)
            else:
                totals = ledger.file_totals(cur, plan.ledger_schema, table.name, plan.period, f.sha256)
                if totals[0] != totals[1] + totals[2]:
                    raise LoadkitError("rows_read != rows_loaded + rows_rejected", table=table.name, file=f.rel,
                                       totals=totals)
                status = "loaded" if table.mode == "append" else "staged"
                ledger.mark_file(cur, plan.ledger_schema, plan.run_id, table.name, plan.period, f.sha256,
                                 f.rel, f.ordinal, f.size, status, totals)
        if error:
            failed.append((table.name, f.rel, error))

    def _finalize_tables(self, plan: LoadPlan, metrics: RunMetrics, failed: List[Tuple[str, str, str]],
                         tables: List[str]) -> List[str]:
        """Publish each table whose files all settled; returns the tables whose staging lost batches.

        Each table publishes in one transaction that first re-verifies staging against the
        ledger per batch (``modes.verify_staging``): a crash restart empties UNLOGGED staging,
        and publishing from it would lose rows while the ledger says they loaded. Lost batches
        are forgotten (committed, without publishing) and the caller reads them again. A
        transient failure (the server restarting mid-finalise) retries the whole transaction;
        a table whose files are already all published (a commit whose reply was lost) is not
        published twice.
        """
        failed_tables = {t for t, _, _ in failed}
        lost_tables: List[str] = []
        for table in plan.tables:
            tm = metrics.tables[table.name]
            if table.name not in tables:
                continue
            if tm.status == "skipped":
                if table.delete_missing and not failed:  # a sync an earlier run had to defer
                    with db.transaction(self.dsn) as cur:
                        if not modes.sync_done(cur, plan.ledger_schema, table.name, plan.period):
                            tm.deleted = self._sync(cur, plan, table, failed)
                            ledger.record_collapse(cur, plan.ledger_schema, plan.run_id, table.name, None, tm.deleted)
                continue
            if table.name in failed_tables:
                tm.status = "failed"
                continue
            if retrying(plan.retry)(self._finalize_table, plan, table, tm, failed):
                lost_tables.append(table.name)
        return lost_tables

    def _finalize_table(self, plan: LoadPlan, table: TableSpec, tm: Any, failed: List[Tuple[str, str, str]]) -> bool:
        """One table's verify-then-publish transaction; True if staging lost batches (nothing published).

        In the same transaction: the duplicates count, the full-snapshot sync (merge + delete_missing)
        and the ledger's table row, so a published month is always a synced, accounted month."""
        if self._job_lock is not None:
            self._job_lock.check()  # never publish without the job lock (raises TransientDBError if lost)
        finalising = time.perf_counter()
        with db.transaction(self.dsn) as cur:
            # Publishing is DDL too (indexes, swaps, partitions): serialised with other runs' per target
            # schema, so concurrent runs never deadlock here (a deadlock with anyone else is retried).
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"loadkit-ddl:{table.schema}",))
            if table.mode != "append" and not ledger.staged_files(cur, plan.ledger_schema, table.name, plan.period):
                log.info("%s: already published (the previous attempt committed)", table.name)
                tm.status = "loaded"
                ledger.finish_table(cur, plan.ledger_schema, plan.run_id, table.name, self._outcome(tm))
                return False
            lost = modes.verify_staging(cur, table, plan.ledger_schema, plan.period)
            if lost:
                ours = [b for b in lost if b.run_id == plan.run_id]  # counted by this run: read again below
                tm.rows_read -= sum(b.rows_in for b in ours)
                tm.rows_loaded -= sum(b.rows_loaded for b in ours)
                tm.rows_rejected -= sum(b.rows_rejected for b in ours)
                tm.batches -= len(ours)
                return True
            staged = sum(ledger.unpublished_batches(cur, plan.ledger_schema, table.name, plan.period).values())
            with heartbeat(log, f"finalising {table.name} ({table.mode})", table=table.name), \
                    modes.record_steps() as steps:
                inserted, updated = modes.finalize(cur, table, plan.ledger_schema)
            ledger.mark_files_loaded(cur, plan.ledger_schema, table.name, plan.period)
            tm.inserted, tm.updated, tm.status = inserted, updated, "loaded"
            if table.mode != "append":  # rows staged but collapsed onto a later row with the same key
                tm.duplicates = max(0, staged - (inserted or 0) - (updated or 0))
            with modes.record_steps() as synced:
                tm.deleted = self._sync(cur, plan, table, failed)
            tm.finalise_steps = {**steps, **synced}  # seconds per step (upsert, swap, indexes, sync_missing...)
            tm.finalise_s = time.perf_counter() - finalising  # the commit below is not counted
            tm.finalised_at = time.time()
            ledger.finish_table(cur, plan.ledger_schema, plan.run_id, table.name, self._outcome(tm))
            ledger.record_collapse(cur, plan.ledger_schema, plan.run_id, table.name, tm.duplicates, tm.deleted)
        return False

    def _sync(self, cur: Any, plan: LoadPlan, table: TableSpec, failed: List[Tuple[str, str, str]]) -> Optional[int]:
        """Full-snapshot sync (merge + delete_missing), in the finalisation's transaction: only when no file
        of this run failed and every file of the table's month is published; else deferred (None)."""
        if not table.delete_missing:
            return None
        from datetime import date

        # config.job_params makes year and month required for a merge table with delete_missing
        assert plan.year is not None and plan.month is not None
        month_start = date(plan.year, plan.month, 1)
        if table.history:
            modes.open_history(cur, table, plan.ledger_schema, plan.period, month_start)
        if failed or not modes.month_complete(cur, table, plan.ledger_schema, plan.period):
            log.warning("%s: not deleting keys absent from %s: %s", table.name, plan.period,
                        "a file of this run failed" if failed else "not every file of the month is loaded yet")
            return None
        before = modes.fewer_files_than_before(cur, table, plan.ledger_schema, plan.period)
        if before is not None:
            log.warning("%s: not deleting keys absent from %s: it has %d file(s), the month before had %d "
                        "(an incomplete download?); add the missing files and run again", table.name, plan.period,
                        len(table.files), before)
            return None
        return modes.sync_missing(cur, table, plan.ledger_schema, plan.period, month_start)

    # ------------------------------------------------------------ end of run

    def _record_end(self, plan: LoadPlan, metrics: RunMetrics, tracker: RunTracker, monitor: MemoryMonitor,
                    status: str, error: Optional[BaseException], wall: float, alerts: AlertEngine) -> None:
        category = classify(error).value if error is not None else None
        text = mask_text(f"{type(error).__name__}: {error}") if error is not None else None
        if error is not None and category == "bug":
            text = report_bug(error, text or "")
        def record() -> None:
            # Not a loadkit:<run>:* session: a stop's cancel_backends (possibly still in flight) spares it.
            with db.transaction(self.dsn, application_name=f"loadkit-end:{plan.run_id}"[:63]) as cur:
                for t in metrics.tables.values():
                    if t.status not in ("loaded", "skipped"):
                        t.status = "failed" if status == "failed" else status if status != "succeeded" else t.status
                        ledger.finish_table(cur, plan.ledger_schema, plan.run_id, t.name, self._outcome(t, text))
                    elif t.status == "skipped":  # a no-op table's row is closed too, never left 'loading'
                        ledger.finish_table(cur, plan.ledger_schema, plan.run_id, t.name, self._outcome(t))
                ledger.finish_run(cur, plan.ledger_schema, plan.run_id, status, metrics.totals(), category, text,
                                  tracker.run_id)

        try:  # the run's end must reach the ledger even if the server is restarting right now
            retrying(plan.retry)(record)
        except Exception as exc:  # reported, never a traceback instead of the run's own outcome
            log.error("could not record the end of run %s in the ledger: %s", plan.run_id, mask_text(str(exc)))
        if category is not None:
            metrics.errors[category] += 1
        self._track_end(plan, metrics, tracker, monitor, status, text, wall, alerts)

    def _track_end(self, plan: LoadPlan, metrics: RunMetrics, tracker: RunTracker, monitor: MemoryMonitor,
                   status: str, text: Optional[str], wall: float, alerts: AlertEngine) -> None:
        tracker.metrics(metrics.final(wall, monitor.peak_rss, len(alerts.fired), monitor.peak_pss))
        tracker.tag("status", status)
        if text:
            tracker.tag("error", text[:5000])
        tracker.artifact_text("summary.txt", summary_table(metrics, plan.run_id, wall, run_label(self.tags)))
        tracker.artifact_yaml("config.yaml", self._params())
        tracker.artifact_json("alerts.json", alerts.summary())
        tracker.artifact_table("batches.parquet", metrics.batch_table())
        tracker.artifact_table("files.parquet", metrics.file_table())
        tracker.artifact_table("batch_sizes.parquet", metrics.size_table())
        tracker.artifact_table("memory.parquet", memory_table(monitor.samples(), metrics.started))
        if tracker.enabled:
            try:
                with db.transaction(self.dsn) as cur:
                    tracker.artifact_table("rejects_sample.parquet", ledger.reject_sample(cur, plan.ledger_schema,
                                                                                          plan.run_id))
            except LoadkitError as exc:
                log.warning("could not read the reject sample of run %s: %s", plan.run_id, exc)
        tracker.end(status)

    def _outcome(self, t: Any, error: Optional[str] = None) -> ledger.TableOutcome:
        return ledger.TableOutcome(t.status, t.rows_read, t.rows_loaded, t.rows_rejected, t.inserted, t.updated,
                                   t.seconds, error)

    def _params(self) -> Dict[str, Any]:
        data = as_plain_dict(self.cfg)
        data["sink"]["dsn"] = mask_dsn(self.dsn) if self.dsn else None
        return data

    def _tags(self) -> Dict[str, Any]:
        assert self.plan is not None
        return {"job": self.plan.job, "year": self.plan.year, "month": self.plan.month, "period": self.plan.period,
                "loadkit_run_id": self.plan.run_id, **self.tags}

    def _shutdown_ray(self) -> None:
        """On interrupt: stop every worker now; their open transactions roll back server-side.

        Never imports Ray (seconds of start-up): if this process has not imported it, there is no Ray to stop."""
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()


def _runtime_env(ship_code: bool) -> Optional[Dict[str, Any]]:
    """Ship loadkit/ (with its conf/ and examples/) to cluster workers that do not have it installed."""
    if not ship_code:
        return None
    import loadkit

    return {"py_modules": [str(Path(loadkit.__file__).parent)]}


def report_bug(error: BaseException, text: str) -> str:
    """A bug's ledger text: its one line plus the (masked) traceback. The traceback is logged too
    at DEBUG, or at ERROR with LOADKIT_FULL_ERROR=1 (Hydra's convention for full errors)."""
    import traceback

    trace = mask_text("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    if os.environ.get("LOADKIT_FULL_ERROR") == "1":
        log.error("bug: %s\n%s", text, trace.rstrip())
    else:
        log.debug("bug: %s\n%s", text, trace.rstrip())
    return f"{text}\n{trace}"


def _stderr_is_tty() -> bool:
    try:
        return os.isatty(2)
    except OSError:
        return False


def run_label(tags: Dict[str, str]) -> str:
    """The line heading a sweep point's summary: its sweep id, job number and overrides (empty outside sweeps)."""
    if not tags.get("sweep_id"):
        return ""
    from loadkit.sweep import point_overrides

    overrides = mask_text(point_overrides(tags.get("overrides", "")))
    return f"sweep {tags['sweep_id']} point {tags.get('sweep_job', '?')}: {overrides}"


def run_job(cfg: LoadkitConfig, tags: Optional[Dict[str, str]] = None) -> RunResult:
    """Fetch (when job.remote.url is set and fetch is not never), then load (unless fetch=only)."""
    started = time.time()
    if cfg.sink.dsn:  # a malformed DSN is a config error (exit 2, text withheld) before any download
        db.parse_dsn(cfg.sink.dsn)
    fetched = _fetch_stage(cfg)
    if cfg.fetch == "only":
        period = f"{cfg.year:04d}-{cfg.month:02d}"
        try:
            with db.transaction(db.resolve_dsn(cfg.sink.dsn, cfg.sink.embedded_dir)) as cur:
                from loadkit.source import fetch

                ledger.ensure(cur, cfg.sink.ledger_schema)
                fetch.record(cur, cfg.sink.ledger_schema, None, period, fetched)
        except Exception as exc:  # the files are in place; the ledger row is the only thing missing
            log.warning("fetched, but could not record it in the ledger: %s", mask_text(str(exc)))
        return RunResult(f"fetch-{period}", "succeeded", RunMetrics({}), time.time() - started, fetched=fetched)
    return Runner(cfg, tags, fetched).run()


def _fetch_stage(cfg: LoadkitConfig) -> List[Any]:
    remote = cfg.job.remote if cfg.job is not None else None
    if cfg.fetch == "never" or remote is None or not remote.url:
        return []
    from loadkit.source import fetch, files

    if files.is_url(cfg.data_root):  # read straight from the object store: nothing to download
        return []

    if cfg.year is None or cfg.month is None:
        from loadkit.errors import ConfigError

        raise ConfigError("the fetch stage downloads one month: give year= and month= (or fetch=never)", key="month")
    root = Path(cfg.data_root).expanduser()
    folder = root / f"{cfg.year:04d}-{cfg.month:02d}"
    if cfg.fetch == "auto" and not fetch.needs_fetch(folder):
        log.info("fetch: %s is already here (fetch=always re-checks the remote)", folder)
        return []
    return fetch.fetch_month(fetch.settings_from(cfg), root, cfg.year, cfg.month)


def exit_code(result: RunResult) -> int:
    """0 on success, 130 when interrupted, else the failure category's code (errors.EXIT_CODES: config 2,
    source data 3, transient infrastructure 4, operator/environment 5, alert abort 6, bug 1)."""
    if result.status == "succeeded":
        return 0
    if result.status == "interrupted":
        return 130
    return EXIT_CODES[classify(result.error)] if result.error is not None else 1
