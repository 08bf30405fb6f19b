"""An optional HTTP endpoint on 127.0.0.1 while a run streams: Prometheus ``/metrics`` and ``/healthz``.

Off by default; ``telemetry.metrics_port=9464`` (or ``0`` for any free port) turns it on. The
figures are read from the run's own state at scrape time (a custom collector over
``RunMetrics``, the memory monitor, the alert engine and the process's threads), so the
pipeline's hot path gains no instrumentation. Served names (all prefixed ``loadkit_``):

- ``batches_total{table,status}``, ``rows_total{table,kind}`` (read/loaded/rejected), ``bytes_total{table}``
- ``batch_seconds{stage}`` histogram (parse, write) and ``batch_seconds_per_1k_rows{stage}`` histogram
- ``file_completion_seconds`` histogram (seconds since the run started when each file finished)
- ``batches_per_second``, ``rows_per_second`` (since the pipeline started)
- ``memory_rss_bytes`` (driver + local workers), ``memory_host_fraction``, ``writer_rss_bytes{writer}``
  (memory per batch, as the writer saw it), ``memory_pressure_events_total`` (memory alerts fired)
- ``pool_utilisation{writer}``, ``queue_depth`` (chunks read but not yet written), ``read_wait_seconds``
- ``connection_failures_total`` (retried transient failures), ``deadlocks_total``,
  ``processing_failures_total{category}``, ``alerts_total``
- ``thread_up{thread}`` (1 per live loadkit background thread), ``seconds_since_progress``,
  ``ledger_up`` (the last ledger write succeeded)

``/healthz`` answers 200 with a JSON status while the run makes progress, 503 once no batch
result arrived for ``alerts.stall_seconds``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

log = logging.getLogger("loadkit.prom")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FILE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_current: Optional["MetricsEndpoint"] = None


def current_address() -> Optional[Tuple[str, int]]:
    """(host, port) of the endpoint of the run in progress in this process, if one is serving."""
    return _current.address if _current is not None else None


def _histogram(name: str, doc: str, samples: Dict[str, List[float]], label: str, buckets: Iterable[float]) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    family = HistogramMetricFamily(name, doc, labels=[label] if label else None)
    edges = list(buckets)
    for key, values in samples.items():
        ordered = sorted(values)
        counts, i = [], 0
        for edge in edges:
            while i < len(ordered) and ordered[i] <= edge:
                i += 1
            counts.append((str(edge), i))
        counts.append(("+Inf", len(ordered)))
        family.add_metric([key] if label else [], counts, sum(ordered))
    return family


class RunCollector:
    """Reads the run's state at scrape time. ``sources`` are callables so a scrape never blocks the run."""

    def __init__(self, metrics: Any, monitor: Any = None, alerts: Any = None,
                 ledger_up: Optional[Callable[[], bool]] = None) -> None:
        self.metrics, self.monitor, self.alerts = metrics, monitor, alerts
        self.ledger_up = ledger_up or (lambda: True)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.metrics
        with m._lock:  # a consistent snapshot; the driver holds this lock only to fold a result in
            batches = list(m.batches)
            tables = [(t.name, t.batches, t.batches_skipped, t.rows_read, t.rows_loaded, t.rows_rejected, t.bytes,
                       t.retries) for t in m.tables.values()]
            errors = dict(m.errors)
            files = [ev["last_at"] - m.started for ev in m.file_events.values() if "last_at" in ev]
            since = time.time() - m.last_progress
        done = [b for b in batches if b.status == "committed"]
        fam = CounterMetricFamily("loadkit_batches", "Batch results by table and status", labels=["table", "status"])
        rows = CounterMetricFamily("loadkit_rows", "Rows by table and kind", labels=["table", "kind"])
        size = CounterMetricFamily("loadkit_bytes", "Source bytes parsed, by table", labels=["table"])
        for name, n, skipped, read, loaded, rejected, nbytes, _ in tables:
            fam.add_metric([name, "committed"], n)
            fam.add_metric([name, "skipped"], skipped)
            for kind, value in (("read", read), ("loaded", loaded), ("rejected", rejected)):
                rows.add_metric([name, kind], value)
            size.add_metric([name], nbytes)
        yield fam
        yield rows
        yield size
        stages = {"parse": [b.parse_s for b in done], "write": [b.write_s for b in done]}
        yield _histogram("loadkit_batch_seconds", "Per-batch stage latency", stages, "stage", _LATENCY_BUCKETS)
        per_k = {s: [v / max(1e-9, b.rows_in / 1000) for v, b in zip(vals, done) if b.rows_in]
                 for s, vals in stages.items()}
        yield _histogram("loadkit_batch_seconds_per_1k_rows", "Per-batch stage latency per 1,000 rows", per_k,
                         "stage", _LATENCY_BUCKETS)
        yield _histogram("loadkit_file_completion_seconds", "Seconds since the run started when each file finished",
                         {"": files}, "", _FILE_BUCKETS)
        elapsed = max(1e-9, time.time() - m.started)
        yield GaugeMetricFamily("loadkit_batches_per_second", "Committed batches per second", value=len(done) / elapsed)
        yield GaugeMetricFamily("loadkit_rows_per_second", "Rows read per second",
                                value=sum(t[3] for t in tables) / elapsed)
        if self.monitor is not None:
            _, rss, fraction = self.monitor.latest()
            if not rss:  # no sample since the run started (the monitor samples every 0.5 s): read one now
                _, rss, fraction = self.monitor.sample()
            yield GaugeMetricFamily("loadkit_memory_rss_bytes", "RSS of the driver and its local workers", value=rss)
            yield GaugeMetricFamily("loadkit_memory_host_fraction", "Host memory in use (0..1)", value=fraction)
        writer_rss = GaugeMetricFamily("loadkit_writer_rss_bytes", "Writer RSS after its last batch", labels=["writer"])
        pool = GaugeMetricFamily("loadkit_pool_utilisation", "Writer connection busy fraction", labels=["writer"])
        last = {b.writer: b for b in done}  # each writer's latest committed batch
        for writer, b in last.items():
            writer_rss.add_metric([writer], b.rss_bytes)
            pool.add_metric([writer], b.pool_utilisation)
        yield writer_rss
        yield pool
        yield GaugeMetricFamily("loadkit_queue_depth", "Chunks read but not yet written",
                                value=max(0, m.chunks_read - len(batches)))
        yield GaugeMetricFamily("loadkit_read_wait_seconds", "Read tasks' time blocked handing chunks on",
                                value=m.read_wait_s)
        fired = list(self.alerts.fired) if self.alerts is not None else []
        yield CounterMetricFamily("loadkit_memory_pressure_events", "Memory alerts fired",
                                  value=sum(1 for a in fired if a.rule == "memory_fraction"))
        yield CounterMetricFamily("loadkit_alerts", "Alerts fired", value=len(fired))
        yield CounterMetricFamily("loadkit_connection_failures", "Transient failures answered by a retry",
                                  value=sum(t[7] for t in tables))
        yield CounterMetricFamily("loadkit_deadlocks", "Deadlocks detected (and retried)",
                                  value=errors.get("deadlock", 0))
        failures = CounterMetricFamily("loadkit_processing_failures", "Failures by category", labels=["category"])
        for category, count in errors.items():
            failures.add_metric([category], count)
        yield failures
        threads = GaugeMetricFamily("loadkit_thread_up", "Live loadkit background threads", labels=["thread"])
        for t in threading.enumerate():
            if t.name.startswith("loadkit-"):
                threads.add_metric([t.name], 1.0 if t.is_alive() else 0.0)
        yield threads
        yield GaugeMetricFamily("loadkit_seconds_since_progress", "Seconds since the last batch result", value=since)
        yield GaugeMetricFamily("loadkit_ledger_up", "1 when the last ledger write succeeded",
                                value=1.0 if self.ledger_up() else 0.0)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)


class MetricsEndpoint:
    """The HTTP server of one run. ``start`` binds (port 0 = any free port) and serves on a daemon thread."""

    def __init__(self, collector: RunCollector, host: str = "127.0.0.1", port: int = 0, run_id: str = "",
                 stall_seconds: float = 300.0) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)  # type: ignore[arg-type]
        self.collector, self.run_id, self.stall_seconds = collector, run_id, stall_seconds
        self.status = "running"
        self._host, self._port = host, port
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> Tuple[str, int]:
        assert self._server is not None
        return self._host, int(self._server.server_address[1])

    def _app(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            body = generate_latest(self.registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path == "/healthz":
            since = time.time() - self.collector.metrics.last_progress
            healthy = self.status == "running" and since < self.stall_seconds and self.collector.ledger_up()
            body = json.dumps({"status": self.status, "healthy": healthy, "run_id": self.run_id,
                               "seconds_since_progress": round(since, 3),
                               "ledger_up": self.collector.ledger_up()}).encode()
            start_response("200 OK" if healthy else "503 Service Unavailable", [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"loadkit: /metrics or /healthz\n"]

    def start(self) -> "MetricsEndpoint":
        global _current
        self._server = make_server(self._host, self._port, self._app, server_class=_Server, handler_class=_Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, name="loadkit-metrics-http", daemon=True)
        self._thread.start()
        _current = self
        host, port = self.address
        log.info("metrics endpoint: http://%s:%d/metrics (and /healthz)", host, port)
        return self

    def stop(self) -> None:
        global _current
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if _current is self:
            _current = None


def serve(cfg: Any, metrics: Any, monitor: Any, alerts: Any, run_id: str) -> Optional[MetricsEndpoint]:
    """Start the endpoint if ``cfg.telemetry.metrics_port`` is set (None: off); never fails the run."""
    telemetry = getattr(cfg, "telemetry", None)
    port = getattr(telemetry, "metrics_port", None)
    if telemetry is None or port is None:
        return None
    try:
        return MetricsEndpoint(RunCollector(metrics, monitor, alerts), telemetry.metrics_host, port, run_id,
                               cfg.alerts.stall_seconds.threshold).start()
    except OSError as exc:
        log.warning("metrics endpoint not started on %s:%s: %s", telemetry.metrics_host, port, exc)
        return None
