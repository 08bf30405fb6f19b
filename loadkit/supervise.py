"""The driver's streaming loop: progress, reject thresholds, alerts, batch sizing, watchdog, stops.

``Supervisor.stream(todo)`` picks the executor, runs it, and reacts to every per-batch result
the writers send back: metrics and progress (log line, progress bar, MLflow), per-table reject
thresholds, alerts, the adaptive batch size (published to the read tasks), and the stops a helper
thread asks for (watchdog, run deadline, lost job lock). ``Signals`` turns SIGINT/SIGTERM into a
stop (errors.StopRequested) promptly even while the main thread waits inside libpq or Ray.
"""
from __future__ import annotations

import _thread
import logging
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from loadkit import reload
from loadkit.alerts import AlertEngine, Watchdog
from loadkit.batching import BatchSizer, SizingSettings
from loadkit.errors import InterruptedRun, LoadkitError, RunDeadlineExceeded, StopRequested
from loadkit.execute import choose_executor, make_executor
from loadkit.execute.channel import SizeChannel
from loadkit.metrics import ProgressBar, RunMetrics, progress_line, progress_text
from loadkit.monitor import MemoryMonitor
from loadkit.plan import EnvPlan, LoadPlan, TableSpec
from loadkit.postgres.sink import Todo, writer_settings
from loadkit.records import BatchResult
from loadkit.source.read import ReadUnit
from loadkit.tracking import RunTracker

log = logging.getLogger("loadkit.run")

_PROGRESS_EVERY_S = 5.0
_BAR_EVERY_S = 0.5  # the in-place progress line (a terminal) is redrawn at most this often between reports


class Signals:
    """SIGINT/SIGTERM stop the run from the driver's main thread, at once.

    The handler raises ``errors.StopRequested`` (a KeyboardInterrupt carrying the InterruptedRun, or
    the error a helper thread stopped the run with): a KeyboardInterrupt passes through library
    catch-alls and through Ray's C++ waits, where any other exception raised by a handler is lost.
    It raises once a run (``stopped``): a later signal, or a helper thread's stop (the run deadline
    firing while the run cleans up after a SIGTERM), must not cut that cleanup short -- it did, and
    the run left without recording its end.

    Python runs a signal handler only when the main thread is back in the interpreter, not
    while it waits inside libpq (a finalize statement blocked on a lock). So the C-level
    handler also writes to a wakeup pipe (``signal.set_wakeup_fd``) and a watcher thread
    calls ``on_signal`` at once -- the runner cancels the run's own statements there
    (``PostgresSink.cancel``), the blocked call returns, and the handler runs. The watchdog
    and the run deadline interrupt the same way (``_thread.interrupt_main`` trips the pipe).

    While the run records its end (``defer``) one signal is held: the recording is quick, and a
    second stop must not cut the first one's recording short. A second signal then means the
    recording is stuck (its UPDATE waits on a lock someone holds; there is no lock_timeout by
    default): the watcher calls ``on_insist`` (the runner cancels the recording's statement,
    ``PostgresSink.cancel_end``) and the handler raises; ``abandoned`` says so. Before, every
    signal was held and only SIGKILL ended the process.
    """

    def __init__(self, pending: Optional[Callable[[], Optional[LoadkitError]]] = None,
                 on_signal: Optional[Callable[[], object]] = None,
                 on_insist: Optional[Callable[[], object]] = None) -> None:
        self._previous: Dict[int, Any] = {}
        self.received: Optional[int] = None
        self._pending = pending  # an error the watchdog wants raised (it interrupts with SIGINT)
        self._on_signal = on_signal
        self._on_insist = on_insist  # a second signal while deferred: cancel the recording's statement
        self._pipe: Optional[Tuple[int, int]] = None
        self._old_wakeup = -1
        self._watcher: Optional[threading.Thread] = None
        self.defer = False
        self._deferred = 0  # signals the handler held while deferred
        self._seen_deferred = 0  # signals the watcher saw while deferred (coalesced ones too)
        self.abandoned = False  # a second signal while deferred: the recording was given up
        self.stopped: Optional[LoadkitError] = None  # the error of the stop the handler raised (once a run)

    def __enter__(self) -> "Signals":
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
            if self.defer:
                self._seen_deferred += sum(1 for n in data if n in wanted)
                if self._seen_deferred >= 2 and not self.abandoned:
                    # The handler cannot run while the recording waits inside libpq (a lock): its
                    # statement is cancelled, then the handler raises (it sees ``abandoned``).
                    self.abandoned = True
                    log.warning("stopped again while recording the end: giving the recording up")
                    if self._on_insist is not None:
                        try:
                            self._on_insist()
                        except Exception as exc:  # best effort
                            log.warning("could not cancel the recording of the end: %s", exc)
                continue
            if wanted & set(data) and self._on_signal is not None:
                names = ", ".join(signal.Signals(n).name for n in sorted(wanted & set(data)))
                log.warning("%s received: stopping (cancelling this run's statements)", names)
                try:
                    self._on_signal()
                except Exception as exc:  # best effort; the handler still stops the run
                    log.warning("could not cancel the run's statements: %s", exc)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.defer:  # the run is recording its end: that finishes first (it is quick)...
            self.received = self.received or signum
            self._deferred += 1
            if self._deferred < 2 and not self.abandoned:
                return
            self.abandoned = True  # ...unless a second signal comes meanwhile: the recording is stuck
            raise StopRequested(self.interruption())
        if self.stopped is not None:  # the run is stopping: its cleanup (Ray's shutdown, the writers'
            self.received = self.received or signum  # join, recording the end) must not be cut short
            return
        pending = self._pending() if self._pending is not None else None
        if pending is not None:
            self.stopped = pending
            raise StopRequested(pending)
        if self.received is None:
            self.received = signum
            self.stopped = self.interruption()
            raise StopRequested(self.stopped)

    def interruption(self) -> InterruptedRun:
        """The InterruptedRun to record for the signal received (SIGINT if none: a bare Ctrl-C)."""
        received = self.received or int(signal.SIGINT)
        return InterruptedRun(f"stopped by {signal.Signals(received).name}", signal=received)

    def raise_if_received(self) -> None:
        """Raise InterruptedRun if SIGINT/SIGTERM arrived: its handler raises wherever the main thread
        happens to be, and library code that catches every exception can swallow it there (Ray Data's
        iteration-stats call does: a SIGTERM landing in it was logged as a warning and the run went on
        to succeed). The streaming loop calls this after every result, so a swallowed stop still stops
        the run at the next one."""
        if self.received is not None:
            raise self.interruption()

    def __exit__(self, *exc: Any) -> None:
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            os.close(self._pipe[1])
            if self._watcher is not None:
                self._watcher.join(timeout=2)
            os.close(self._pipe[0])
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def stop_cause(exc: BaseException, signals: Optional[Signals], pending: Optional[LoadkitError]) -> LoadkitError:
    """The error to record for a stop that reached the runner as ``exc``: an InterruptedRun, the handler's
    StopRequested, or the plain KeyboardInterrupt Ray raises in its place (so the error is recovered from
    ``signals`` and ``pending``): the helper thread's error if one stopped the run and no signal came,
    else the signal's InterruptedRun (SIGINT for a Ctrl-C outside the handler's reach)."""
    if isinstance(exc, StopRequested):
        return exc.error
    if isinstance(exc, InterruptedRun):
        return exc
    if signals is not None and signals.stopped is not None:  # the stop the handler raised, whatever came after
        return signals.stopped
    if pending is not None and (signals is None or signals.received is None):
        return pending
    return (signals or Signals()).interruption()


def executor_for(env: EnvPlan, units: Sequence[ReadUnit]) -> str:
    """``env.executor`` resolved for these units (execute.choose_executor: ``auto`` picks in-process for a
    small input or a small machine, Ray on a cluster or otherwise)."""
    return choose_executor(env.executor, env.address, sum(u.file.size for u in units),
                           env.num_cpus or os.cpu_count() or 1, env.inprocess_max_bytes, env.inprocess_max_cpus)


def _runtime_env(ship_code: bool) -> Optional[Dict[str, Any]]:
    """Ship loadkit/ (with its conf/ and examples/) to cluster workers that do not have it installed."""
    if not ship_code:
        return None
    import loadkit

    return {"py_modules": [str(Path(loadkit.__file__).parent)]}


def _stderr_is_tty() -> bool:
    try:
        return os.isatty(2)
    except OSError:
        return False


class Supervisor:
    """The run's streaming loop and the stops around it (see the module doc).

    ``aborted``: table -> why its reject threshold was exceeded (its files of this run get discarded
    by the sink's ``complete``). ``stop(error)`` is how a helper thread (job lock watcher) stops the
    run: the error is raised in the main thread at the next result, or at once through a signal."""

    def __init__(self, plan: LoadPlan, dsn: str, metrics: RunMetrics, alerts: AlertEngine, tracker: RunTracker,
                 monitor: MemoryMonitor, overrides: Optional[str] = None) -> None:
        self.plan = plan
        self._dsn = dsn
        self.metrics = metrics
        self.alerts = alerts
        self.tracker = tracker
        self.monitor = monitor
        self._overrides = overrides
        self.aborted: Dict[str, str] = {}
        self._watchdog: Optional[Watchdog] = None
        self._stop_error: Optional[LoadkitError] = None
        self._deadline: Optional[threading.Timer] = None
        self._bar: Optional[ProgressBar] = None  # the in-place progress line (env.progress_bars on a terminal)
        self._interrupt_main = threading.current_thread() is threading.main_thread()
        self.trace: Optional[Any] = None  # telemetry.RunTrace of this run (telemetry.tracing on)
        self.reloader: Any = None
        self.signals: Optional[Signals] = None  # the run's (see Signals.raise_if_received), set by the runner

    # ------------------------------------------------------------ stops from other threads

    def stop_cause(self, exc: BaseException) -> LoadkitError:
        """The error to record for a stop that reached the runner as ``exc`` (see :func:`stop_cause`)."""
        return stop_cause(exc, self.signals, self.pending_error())

    def pending_error(self) -> Optional[LoadkitError]:
        """An error a helper thread wants raised in the main thread (it interrupts with SIGINT)."""
        if self._watchdog is not None and self._watchdog.error is not None:
            return self._watchdog.error
        return self._stop_error

    def stop(self, error: LoadkitError) -> None:
        """Stop the run with ``error`` (from any thread): raised in the main thread at once."""
        self._stop_error = self._stop_error or error
        log.error("%s", error)
        if self._interrupt_main:
            _thread.interrupt_main()

    def start_deadline(self, started: float) -> None:
        """env.max_run_seconds: a timer that stops the run like an interrupt (the error is transient)."""
        limit = self.plan.env.max_run_seconds
        if not limit:
            return

        def fire() -> None:
            self.stop(RunDeadlineExceeded(f"run deadline exceeded: env.max_run_seconds={limit:g}; "
                                          "committed batches are kept, rerun to resume"))

        self._deadline = threading.Timer(max(0.0, limit - (time.time() - started)), fire)
        self._deadline.daemon = True
        self._deadline.start()

    def cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()

    # ------------------------------------------------------------ the stream

    def stream(self, todo: List[Todo], on_table_read: Optional[Callable[[str], None]] = None) -> None:
        """Read, parse and write ``todo`` on the chosen executor, reacting to every batch result.

        ``on_table_read(table)``, on this thread, once every read unit of ``table`` has ended and all its
        batches have been counted (the executor's ``unit_ends``: the in-process one; with Ray, never):
        the caller may settle and publish it while the other tables stream."""
        plan, metrics, alerts, monitor, tracker = self.plan, self.metrics, self.alerts, self.monitor, self.tracker
        if not todo:
            log.info("nothing to load: every file of %s is already loaded (force=true reloads)", plan.period)
            return
        trace = self.trace  # each unit carries its file span's W3C traceparent (empty with tracing off)
        units = [ReadUnit(t.table, t.file, t.committed, plan.batch.size,
                          traceparent=trace.traceparent(t.table.name, t.file.sha256) if trace is not None else "",
                          retry=plan.retry)
                 for t in todo]
        env = plan.env
        executor = make_executor(executor_for(env, units), env.address, env.num_cpus, env.object_store_memory,
                                 _runtime_env(env.ship_code), env.progress_bars, worker_logs=env.worker_logs,
                                 input_bytes=sum(u.file.size for u in units))
        metrics.executor = executor.name
        units_left: Counter[str] = Counter()  # table -> read units not ended yet (only where the executor tells)
        if on_table_read is not None and executor.unit_ends:
            units_left.update(u.table.name for u in units)
        log.info("executor: %s (%d file(s), %.1f MB to read)", executor.name, len(units),
                 sum(u.file.size for u in units) / 1e6)
        executor.start()
        tracker.ready()  # opened while Ray started; a broken store stops the run before any data moves
        tracker.tag("executor", executor.name)
        last_report, step = time.time(), 0
        for tm in metrics.tables.values():
            tm.started = last_report
        metrics.expect((u.table.name, u.file.sha256, u.file.path, u.table.format, u.file.size, u.table.member)
                       for u in units)
        metrics.touch()  # the stall clock starts with the pipeline
        stream_started = time.perf_counter()
        sizer = BatchSizer(self._sizing())
        channel = executor.size_channel(plan.batch.size)
        # Only the main thread can be interrupted; elsewhere the loop polls the watchdog between results.
        interrupt = _thread.interrupt_main if threading.current_thread() is threading.main_thread() else None
        results_iter = executor.run(plan, units, writer_settings(plan, self._dsn), channel.board)
        self.reloader = reload.install(plan, self._overrides, alerts, sizer, channel, metrics)
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
                    if self._stop_error is not None:
                        raise self._stop_error
                    if self.signals is not None:
                        self.signals.raise_if_received()
                    result = metrics.add(result)
                    if result.kind == "data":
                        self._check_batch(result)
                        self._resize(sizer, channel, result)
                    elif result.kind == "eof":
                        log.debug("read done: %d chunk(s)", result.chunks,
                                  extra={"table": result.table_name, "file": result.member or result.file_sha[:12]})
                    else:
                        log.warning("read failed: %s", result.message,
                                    extra={"table": result.table_name, "file": result.member or result.file_sha[:12]})
                    if result.unit_end and result.table_name in units_left:
                        units_left[result.table_name] -= 1
                        if not units_left[result.table_name]:
                            del units_left[result.table_name]
                            assert on_table_read is not None
                            on_table_read(result.table_name)
                    if time.time() - last_report >= _PROGRESS_EVERY_S:
                        step += 1
                        self._progress(step, channel)
                        last_report = time.time()
                    elif self._bar is not None and time.time() - self._bar.drawn_at >= _BAR_EVERY_S:
                        self._bar.draw(progress_line(metrics.progress(monitor.latest())))
            if self.signals is not None:  # a stop swallowed while the last results came in
                self.signals.raise_if_received()
            metrics.stream_s = time.perf_counter() - stream_started
            self._progress(step + 1, channel, stream_ended=True)
            for tm in metrics.tables.values():  # small tables never reach the mid-stream sample size
                alerts.check("reject_rate", tm.name, tm.reject_rate)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.reloader.uninstall()
            getattr(results_iter, "close", lambda: None)()  # stop Ray Data's executor on an early exit
            channel.close()

    def _sizing(self) -> SizingSettings:
        b = self.plan.batch
        return SizingSettings(b.policy, b.size, b.min_size, b.max_size, window_s=b.window_s,
                              memory_ceiling=b.memory_ceiling)

    def _resize(self, sizer: BatchSizer, channel: SizeChannel, result: BatchResult) -> None:
        """Feed the sizing policy a committed batch; publish the new size to the read tasks if it moved."""
        if result.status != "committed":
            return
        decision = sizer.observe(result.rows_in, self.monitor.latest()[2])
        if decision is not None:
            channel.publish(decision.size)
            self.metrics.size_changed(decision.size, decision.reason)
            log.info("batch size -> %s rows (%s, %.0f rows/s)", f"{decision.size:,}", decision.reason, decision.rate)

    def _check_batch(self, result: BatchResult) -> None:
        table = self.plan.table(result.table_name)
        tm = self.metrics.tables[table.name]
        # Mid-stream the rate needs a base to mean anything: judge it after the first full batch.
        self._check_threshold(table, tm, judge_rate=tm.rows_read >= min(self.plan.batch.size, 1000))
        self.alerts.check("reject_rate", table.name, tm.reject_rate, tm.rows_read >= 1000)
        self.alerts.check("pool_utilisation", result.writer, result.pool_utilisation)

    def _check_threshold(self, table: TableSpec, tm: Any, judge_rate: bool) -> None:
        """Mark the table aborted once it rejects too much.

        The stream is not cut short: batches already in flight could commit after a
        discard and survive it. The table's files of this run are discarded when the sink
        settles them, once every writer is done, and the run fails with this message.
        """
        if table.name in self.aborted:
            return
        why = None
        if table.max_rejects is not None and tm.rows_rejected > table.max_rejects:
            why = f"{tm.rows_rejected} rows, more than max_rejects={table.max_rejects}"
        elif judge_rate and tm.reject_rate > table.max_reject_rate:
            why = f"{tm.reject_rate:.2%} of rows, more than max_reject_rate={table.max_reject_rate:.2%}"
        if why:
            self.aborted[table.name] = (f"table {table.name} rejected {why} (of {tm.rows_read} read); "
                                        "its files of this run were discarded, nothing of them is loaded; "
                                        f"their first rejects stay in {self.plan.ledger_schema}"
                                        ".reject (discarded=true) and in the MLflow rejects_sample")
            log.error("reject threshold exceeded: %s", self.aborted[table.name], extra={"table": table.name})

    def check_final_thresholds(self, tables: Optional[Sequence[str]] = None) -> None:
        """Judge every table (or those named in ``tables``) on its complete counts, however few rows it had."""
        for table in self.plan.tables:
            if tables is None or table.name in tables:
                self._check_threshold(table, self.metrics.tables[table.name], judge_rate=True)

    def _progress(self, step: int, channel: SizeChannel, stream_ended: bool = False) -> None:
        metrics = self.metrics
        metrics.chunks_read, metrics.read_wait_s = channel.counters()
        figures = metrics.progress(self.monitor.latest())
        done = figures.get("done_fraction")
        if self._bar is not None:  # drawn in place; the same line still goes to the log, at DEBUG
            self._bar.draw(progress_line(figures))
        log.log(logging.DEBUG if self._bar is not None else logging.INFO,
                "progress: %s%s rows read, %s loaded, %s rejected, %.0f rows/s, rss %.0f MB, %d batches queued",
                "" if done is None else progress_text(done, figures.get("eta_s"), _stderr_is_tty()) + ": ",
                f"{figures['rows_read']:,}", f"{figures['rows_loaded']:,}", f"{figures['rows_rejected']:,}",
                figures["rows_per_s"], figures["rss_bytes"] / 2**20, figures["queue_depth"])
        self.tracker.progress(figures, step, stream_ended=stream_ended)
        self.alerts.check("memory_fraction", "host", figures["memory_fraction"])
