"""Run one job: sink.start -> executor.run (supervised) -> sink.complete -> sink.end -> tracking.

Orchestration only. The run-level ledger work (job lock, run row, DDL, force/resume, settle,
publish, the end rows) is the sink's (``loadkit.postgres.sink.PostgresSink``); the streaming
loop and everything that reacts to batch results (progress, thresholds, alerts, sizing,
watchdog, deadline) is the supervisor's (``loadkit.supervise``). This module makes sure a run
ends in a recorded state (succeeded / failed / interrupted) whatever happens. ``Runner`` reads
only the plan; ``run_job`` is the entry point that turns a composed config into one.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from loadkit import prom, telemetry
from loadkit.alerts import AlertEngine
from loadkit.config import LoadkitConfig
from loadkit.errors import (EXIT_CODES, Category, InterruptedRun, LoadkitError, RejectThresholdError, SourceDataError,
                            TransientDBError, classify, unwrap)
from loadkit.logs import set_context
from loadkit.metrics import RunMetrics, memory_table, summary_table
from loadkit.monitor import MemoryMonitor
from loadkit.plan import LoadPlan, build_plan, fetch_plan
from loadkit.postgres import db
from loadkit.postgres.ledger import Ledger
from loadkit.postgres.modes import mode_for
from loadkit.postgres.sink import PUBLISH_CONCURRENCY, Completion, PostgresSink
from loadkit.security import mask_dsn, mask_text
from loadkit.supervise import Signals, Supervisor
from loadkit.tracking import RunTracker

log = logging.getLogger("loadkit.run")

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


class Runner:
    """One run of a plan, start to recorded end."""

    def __init__(self, plan: LoadPlan, tags: Optional[Dict[str, str]] = None, fetched: Optional[List[Any]] = None):
        self.plan = plan
        self.tags = tags or {}
        self.fetched = fetched or []  # what the fetch stage downloaded before this run (ledger: fetched)

    def run(self) -> RunResult:
        plan = self.plan
        for table in plan.tables:  # every derived name fits PostgreSQL's 63 bytes, before any SQL
            mode_for(table).validate_identifiers()
        set_context(run_id=plan.run_id)
        metrics = RunMetrics({t.name: t.mode for t in plan.tables})
        tracker = RunTracker.from_config(plan.tracking)
        monitor = MemoryMonitor.instance()
        monitor.reset_peak()
        started = time.time()
        alerts = AlertEngine(plan.alerts, plan.run_id, on_alert=lambda a: tracker.alert(a.rule, a.subject, a.value))
        sink = PostgresSink(plan, self.fetched, on_lock_lost=lambda e: supervisor.stop(e))
        supervisor = Supervisor(plan, sink.dsn, metrics, alerts, tracker, monitor, self.tags.get("overrides"))
        sink.check_server()
        trace = supervisor.trace = telemetry.start_run(plan, plan)
        signals = supervisor.signals = Signals(supervisor.pending_error, sink.cancel, sink.cancel_end)
        params = plan.settings_dict()  # the run's parameters, with the DSN it connects to (masked)
        params["sink"]["dsn"] = mask_dsn(sink.dsn)
        with signals, _stops_as_errors(supervisor):  # from the first ledger statement: a stop there is prompt
            with sink.open(params):
                tracker.start(f"{plan.job}-{plan.period}", params, self._tags())
                endpoint = prom.serve(plan, metrics, monitor, alerts, plan.run_id, sink.dsn)
                supervisor.start_deadline(started)
                status, error, failed = self._load(sink, supervisor, metrics)
                supervisor.cancel_deadline()
                signals.defer = True  # a second stop must not cut the recording of the first short
                wall = time.time() - started
                try:
                    self._record_end(sink, metrics, tracker, monitor, alerts, status, error, wall, params)
                except KeyboardInterrupt:  # stopped twice while recording (Signals): it was stuck
                    log.error("the end of run %s (%s) was not recorded: stopped again while recording it; the "
                              "ledger shows it 'running' until the next run of %s %s marks it crashed",
                              plan.run_id, status, plan.job, plan.period)
                    raise
                finally:
                    if endpoint is not None:
                        endpoint.stop()
        telemetry.record_run(plan, plan, metrics, status, started, wall, trace)
        return RunResult(plan.run_id, status, metrics, wall, error, tracker.run_id, failed, self.fetched,
                         run_label(self.tags))

    def _load(self, sink: PostgresSink, supervisor: Supervisor,
              metrics: RunMetrics) -> Tuple[str, Optional[BaseException], List[Tuple[str, str, str]]]:
        """start -> stream -> complete (again for what staging lost); (status, error, failed files)."""
        failed: List[Tuple[str, str, str]] = []
        try:
            todo = sink.start(metrics)
            tables = [t.name for t in self.plan.tables]
            for round_ in range(_MAX_REREADS + 1):
                with EarlyPublish(self.plan, sink, supervisor, metrics, failed) as early:
                    supervisor.stream(todo, early.table_read if self.plan.sink.publish_early else None)
                    rest = [t for t in tables if t not in early.tables]  # the tables not published yet
                    sink.check_accounting(metrics, rest)  # the summary is the ledger's, or the run stops here
                    finalising = time.perf_counter()
                    supervisor.check_final_thresholds()
                    done = sink.complete(metrics, supervisor.aborted, failed, rest)
                    done = early.completion(done)  # the early publishes' files and lost tables too (or error)
                failed += done.failed
                metrics.finalise_s += time.perf_counter() - finalising
                if not done.lost:
                    break
                if round_ == _MAX_REREADS:
                    raise TransientDBError(f"staging lost committed batches {round_ + 1} times (is the server "
                                           "crash-restarting?); nothing of them was published, rerun to resume",
                                           tables=",".join(done.lost))
                log.warning("re-reading the batches staging lost before publishing: %s", ", ".join(done.lost))
                todo, tables = sink.reread(metrics, done.lost), done.lost
            if supervisor.aborted:
                return "failed", RejectThresholdError("; ".join(supervisor.aborted.values()),
                                                      tables=sorted(supervisor.aborted)), failed
            if failed:
                return "failed", SourceDataError(f"{len(failed)} source file(s) failed: " +
                                                 "; ".join(f"{t}/{p}: {m}" for t, p, m in failed)), failed
            return "succeeded", None, failed
        except (InterruptedRun, KeyboardInterrupt) as exc:  # a signal, a helper thread's stop, a bare Ctrl-C
            cause = supervisor.stop_cause(exc)
            if not isinstance(cause, InterruptedRun):  # the watchdog, the run deadline, a lost job lock
                return "failed", cause, failed
            _shutdown_ray(metrics)
            return "interrupted", cause, failed
        except BaseException as exc:  # recorded, then returned to the caller via the result
            error = unwrap(exc)  # the classified cause, not Ray's wrapper around it
            if classify(error) is Category.INTERRUPTED:  # our own cancel surfaced before the handler's error
                _shutdown_ray(metrics)
                return "interrupted", InterruptedRun(f"stopped: {error}"), failed
            return "failed", error, failed

    def _record_end(self, sink: PostgresSink, metrics: RunMetrics, tracker: RunTracker, monitor: MemoryMonitor,
                    alerts: AlertEngine, status: str, error: Optional[BaseException], wall: float,
                    params: Dict[str, Any]) -> None:
        """The end in the ledger (sink.end), then in MLflow: metrics, tags and the run's artifacts."""
        plan = self.plan
        category = classify(error).value if error is not None else None
        text = mask_text(f"{type(error).__name__}: {error}") if error is not None else None
        if error is not None and category == "bug":
            text = report_bug(error, text or "")
        sink.end(metrics, status, category, text, tracker.run_id)
        if category is not None:
            metrics.errors[category] += 1
        tracker.metrics(metrics.final(wall, monitor.peak_rss, len(alerts.fired), monitor.peak_pss))
        tracker.tag("status", status)
        if text:
            tracker.tag("error", text[:5000])
        tracker.artifact_text("summary.txt", summary_table(metrics, plan.run_id, wall, run_label(self.tags)))
        tracker.artifact_yaml("config.yaml", params)
        tracker.artifact_json("alerts.json", alerts.summary())
        tracker.artifact_table("batches.parquet", metrics.batch_table())
        tracker.artifact_table("files.parquet", metrics.file_table())
        tracker.artifact_table("batch_sizes.parquet", metrics.size_table())
        tracker.artifact_table("memory.parquet", memory_table(monitor.samples(), metrics.started))
        if tracker.enabled:
            try:
                tracker.artifact_table("rejects_sample.parquet", sink.reject_sample())
            except LoadkitError as exc:
                log.warning("could not read the reject sample of run %s: %s", plan.run_id, exc)
        tracker.end(status)

    def _tags(self) -> Dict[str, Any]:
        p = self.plan
        return {"job": p.job, "year": p.year, "month": p.month, "period": p.period, "loadkit_run_id": p.run_id,
                **self.tags}


class EarlyPublish:
    """Settle and publish each table as soon as its stream ended (PUBLISH_CONCURRENCY at a time, each on
    its own connection) while the other tables still stream (``Supervisor.stream``'s ``on_table_read``;
    the in-process executor reads the largest table first, ``execute.inprocess.largest_first``).

    What a table's publish needs is all its own: its files' batches (all counted when its read units
    ended), its accounting check against the ledger (``check_accounting``, done here first, on the
    caller's thread, so a mismatch stops the run before anything of it publishes), its reject threshold
    judged on its complete counts, and its own transaction (``PostgresSink.complete`` for that table; a
    full-snapshot sync, ``delete_missing``, holds off on a failed file of its own table only). What
    overlaps is the server's work: a merge's key build and ANALYZE run beside the next table's COPY
    (a merge first load of two large tables: see README, session 11).

    On leaving with a stop (a signal, the watchdog, the run deadline, a lost job lock: a KeyboardInterrupt
    here, or our own cancel surfacing), the publishes in flight are cancelled (``PostgresSink.stop_publishes``:
    again and again until they end) and waited for: each rolls back, or it had committed a complete,
    accounted table that the rerun skips. On leaving with any other error they are only waited for: a
    failed table (or a bug in the stream) does not roll back another table's complete publish.
    ``completion`` folds the early publishes' results into the end's, raising the first one's error."""

    def __init__(self, plan: LoadPlan, sink: PostgresSink, supervisor: Supervisor, metrics: RunMetrics,
                 failed: List[Tuple[str, str, str]]) -> None:
        self._plan, self._sink, self._supervisor, self._metrics = plan, sink, supervisor, metrics
        self._failed = list(failed)  # files that failed in earlier rounds of this run
        # (table, its publish) in order, each listed before it is submitted: one append, so a signal landing
        # anywhere in table_read leaves every publish that may run in this list, where a stop finds it
        self._publishing: List[Tuple[str, Future[Completion]]] = []
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def tables(self) -> List[str]:
        """The tables handed to an early publish, in order (whatever became of the publish)."""
        return [name for name, _ in self._publishing]

    @property
    def _futures(self) -> List[Future[Completion]]:
        return [future for _, future in self._publishing]

    def __enter__(self) -> "EarlyPublish":
        return self

    def table_read(self, name: str) -> None:
        """``name``'s read units all ended (every batch counted): check it and publish it in the background."""
        self._sink.check_accounting(self._metrics, [name])
        self._supervisor.check_final_thresholds([name])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(PUBLISH_CONCURRENCY, thread_name_prefix="loadkit-publish-early")
        log.info("%s: every file read; publishing it while the other tables stream", name, extra={"table": name})
        future: Future[Completion] = Future()
        self._publishing.append((name, future))  # before the submit: a stop cancels it even if never submitted
        self._pool.submit(self._publish, name, future)

    def _publish(self, name: str, future: Future[Completion]) -> None:
        """On a pool thread: ``name``'s settle and publish (``PostgresSink.complete``), its outcome in ``future``;
        nothing if a stop cancelled it before it started."""
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(self._sink.complete(self._metrics, self._supervisor.aborted, self._failed, [name]))
        except BaseException as exc:  # noqa: BLE001 -- handed to whoever waits on the future
            future.set_exception(exc)

    def completion(self, done: Completion) -> Completion:
        """``done`` (the end's completion) with every early publish's failed files and lost tables added;
        waits for them all, and raises the first one's error (the other tables have published by then: a
        failed table does not stop the others, as in ``PostgresSink._finalize_tables``)."""
        wait(self._futures)
        for future in self._futures:
            early = future.result()
            done.failed += early.failed
            done.lost += early.lost
        return done

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if self._pool is None:
            return
        if et is not None and (issubclass(et, KeyboardInterrupt) or classify(unwrap(ev)) is Category.INTERRUPTED):
            self._sink.stop_publishes(self._futures)  # the run is stopping: its publishes in flight roll back
        self._pool.shutdown(wait=True)
        for _, future in self._publishing:  # listed but never submitted (submit itself raised): never runs now
            future.cancel()
        for name, future in self._publishing:  # an error nobody asked for: logged, not lost
            error = future.exception() if et is not None and not future.cancelled() else None
            if error is None:
                continue
            if classify(unwrap(error)) is Category.INTERRUPTED:  # our own cancel: rolled back, as it should
                log.info("%s: its publish was rolled back by the stop (%s)", name, error, extra={"table": name})
            else:
                log.error("%s: its publish failed too: %s", name, error, extra={"table": name})


@contextmanager
def _stops_as_errors(supervisor: Supervisor) -> Iterator[None]:
    """A stop raised outside the load (while the run opens: the handler's StopRequested, a KeyboardInterrupt)
    leaves ``Runner.run`` as the LoadkitError it stands for, as every refusal before the load does."""
    try:
        yield
    except KeyboardInterrupt as exc:
        raise supervisor.stop_cause(exc) from None


def _shutdown_ray(metrics: RunMetrics) -> None:
    """On interrupt of a run on the Ray executor: stop every worker now; their open transactions roll back
    server-side. An in-process run leaves alone a Ray its process holds for something else (a notebook's, a
    test session's): it has no worker there.

    Never imports Ray (seconds of start-up): if this process has not imported it, there is no Ray to stop."""
    ray = sys.modules.get("ray")
    if metrics.executor == "ray" and ray is not None and ray.is_initialized():
        ray.shutdown()


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


def run_label(tags: Dict[str, str]) -> str:
    """The line heading a sweep point's summary: its sweep id, job number and overrides (empty outside sweeps)."""
    if not tags.get("sweep_id"):
        return ""
    from loadkit.sweep import point_overrides

    overrides = mask_text(point_overrides(tags.get("overrides", "")))
    return f"sweep {tags['sweep_id']} point {tags.get('sweep_job', '?')}: {overrides}"


def run_job(cfg: LoadkitConfig, tags: Optional[Dict[str, str]] = None) -> RunResult:
    """The entry point: fetch (when job.remote.url is set and fetch is not never), then plan and load
    (unless fetch=only). The composed config stops here: Runner sees only the plan."""
    started = time.time()
    if cfg.sink.dsn:  # a malformed DSN is a config error (exit 2, text withheld) before any download
        db.parse_dsn(cfg.sink.dsn)
    fetched = _fetch_stage(cfg)
    if cfg.fetch == "only":
        period = f"{cfg.year:04d}-{cfg.month:02d}"
        try:
            s = cfg.sink  # the same session limits as a run's (connect, statement and lock timeouts)
            dsn = db.session_dsn(db.resolve_dsn(s.dsn, s.embedded_dir), s.connect_timeout, s.statement_timeout_ms,
                                 s.lock_timeout_ms, "loadkit-fetch")
            with db.transaction(dsn) as cur:
                from loadkit.source import fetch

                Ledger(cfg.sink.ledger_schema).ensure(cur)
                fetch.record(cur, cfg.sink.ledger_schema, None, period, fetched)
        except Exception as exc:  # the files are in place; the ledger row is the only thing missing
            log.warning("fetched, but could not record it in the ledger: %s", mask_text(str(exc)))
        return RunResult(f"fetch-{period}", "succeeded", RunMetrics({}), time.time() - started, fetched=fetched)
    return Runner(build_plan(cfg), tags, fetched).run()


def _fetch_stage(cfg: LoadkitConfig) -> List[Any]:
    plan = fetch_plan(cfg)
    if plan.mode == "never" or not plan.url:
        return []
    from loadkit.source import fetch, files

    if files.is_url(plan.data_root):  # read straight from the object store: nothing to download
        return []

    if plan.year is None or plan.month is None:
        from loadkit.errors import ConfigError

        raise ConfigError("the fetch stage downloads one month: give year= and month= (or fetch=never)", key="month")
    root = Path(plan.data_root)
    folder = root / f"{plan.year:04d}-{plan.month:02d}"
    if plan.mode == "auto" and not fetch.needs_fetch(folder):
        log.info("fetch: %s is already here (fetch=always re-checks the remote)", folder)
        return []
    return fetch.fetch_month(fetch.settings_from(plan), root, plan.year, plan.month)


def exit_code(result: RunResult) -> int:
    """0 on success, 130 when interrupted, else the failure category's code (errors.EXIT_CODES: config 2,
    source data 3, transient infrastructure 4, operator/environment 5, alert abort 6, bug 1)."""
    if result.status == "succeeded":
        return 0
    if result.status == "interrupted":
        return 130
    return EXIT_CODES[classify(result.error)] if result.error is not None else 1
