"""OpenTelemetry tracing of a run: spans run -> table -> file -> batch -> (parse, write).

Off by default (``telemetry.tracing=off``: the OpenTelemetry SDK is not even imported);
``console`` prints finished spans to stderr, ``otlp`` sends them to ``telemetry.otlp_endpoint``
(needs ``opentelemetry-exporter-otlp-proto-http``).

The spans are built by the driver when the run ends, from what the run already measured: every
batch result carries its parse and write (COPY + ledger + commit) durations and its finish time,
whether a Ray worker or an in-process thread produced it, so both executors give the same tree
with no tracing code in the workers' hot path. Span times are those measurements: a batch's
``write`` span ends at its commit; its ``parse`` span is placed just before the write (the time
the batch waited in a queue between the two is not part of either).

Attributes: ``loadkit.run_id``, ``loadkit.table``, ``loadkit.file`` (path), ``loadkit.batch_id``,
``loadkit.rows_in`` / ``rows_loaded`` / ``rows_rejected``, ``loadkit.bytes``, ``loadkit.postgres.writer``,
``loadkit.attempts``, ``loadkit.status``.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Dict, Optional

from loadkit.records import BatchResult

log = logging.getLogger("loadkit.telemetry")

_provider: Any = None  # the process's TracerProvider once built (or one a test installed)


def use_provider(provider: Any) -> None:
    """Send spans to this TracerProvider (tests: one with an InMemorySpanExporter); None resets."""
    global _provider
    _provider = provider


def _build(tracing: str, endpoint: Optional[str]) -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider(resource=Resource.create({"service.name": "loadkit"}))
    if tracing == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
        except ImportError:
            from loadkit.errors import ConfigError

            raise ConfigError("telemetry.tracing=otlp needs opentelemetry-exporter-otlp-proto-http installed",
                              key="telemetry.tracing") from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def provider_for(cfg: Any) -> Any:
    """The TracerProvider for this config, or None with tracing off."""
    global _provider
    telemetry = getattr(cfg, "telemetry", None)
    tracing = getattr(telemetry, "tracing", "off")
    if telemetry is None or tracing == "off":
        return None
    if _provider is None:
        _provider = _build(tracing, telemetry.otlp_endpoint)
    return _provider


def _ns(t: float) -> int:
    return int(t * 1e9)


def record_run(cfg: Any, plan: Any, metrics: Any, status: str, started: float, wall_s: float) -> None:
    """Emit the run's span tree (see the module doc). Never fails the run: problems are logged."""
    provider = provider_for(cfg)
    if provider is None:
        return
    try:
        _emit(provider, plan, metrics, status, started, wall_s)
        provider.force_flush()
    except Exception as exc:  # tracing is diagnostics: the run's outcome stands without it
        log.warning("could not record the run's trace: %s: %s", type(exc).__name__, exc)


def _emit(provider: Any, plan: Any, metrics: Any, status: str, started: float, wall_s: float) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    tracer = provider.get_tracer("loadkit")
    paths: Dict[tuple, str] = {(t.name, f.sha256): f.rel for t in plan.tables for f in t.files}
    run = tracer.start_span("run", start_time=_ns(started), attributes={
        "loadkit.run_id": plan.run_id, "loadkit.job": plan.job, "loadkit.period": plan.period,
        "loadkit.status": status, "loadkit.rows_read": metrics.totals()[0]})
    run_ctx = trace.set_span_in_context(run)
    batches_by_file: Dict[tuple, list] = {}
    for b in metrics.batches:
        batches_by_file.setdefault((b.table_name, b.file_sha), []).append(b)
    for tm in metrics.tables.values():
        end = tm.started + tm.stream_s
        if tm.finalised_at is not None:
            end = max(end, tm.finalised_at)
        table = tracer.start_span("table", context=run_ctx, start_time=_ns(tm.started), attributes={
            "loadkit.table": tm.name, "loadkit.mode": tm.mode, "loadkit.status": tm.status,
            "loadkit.rows_read": tm.rows_read, "loadkit.rows_loaded": tm.rows_loaded,
            "loadkit.rows_rejected": tm.rows_rejected, "loadkit.bytes": tm.bytes})
        table_ctx = trace.set_span_in_context(table)
        for (tname, sha), batches in batches_by_file.items():
            if tname != tm.name:
                continue
            ev = metrics.file_events.get((tname, sha), {})
            first = min(_batch_start(b) for b in batches)
            last = max([b.finished_at or first for b in batches] + [ev.get("last_at", first)])
            file_span = tracer.start_span("file", context=table_ctx, start_time=_ns(first), attributes={
                "loadkit.table": tname, "loadkit.file": paths.get((tname, sha), sha),
                "loadkit.file_sha": sha, "loadkit.batches": len(batches)})
            if ev.get("error"):
                file_span.set_status(Status(StatusCode.ERROR, ev["error"][:500]))
            file_ctx = trace.set_span_in_context(file_span)
            for b in batches:
                _batch_spans(tracer, file_ctx, b)
            file_span.end(end_time=_ns(last))
        if tm.finalised_at is not None:
            tracer.start_span("finalise", context=table_ctx, start_time=_ns(tm.finalised_at - tm.finalise_s),
                              attributes={"loadkit.table": tm.name, "loadkit.mode": tm.mode}
                              ).end(end_time=_ns(tm.finalised_at))
        table.end(end_time=_ns(end))
    if status != "succeeded":
        run.set_status(Status(StatusCode.ERROR, status))
    run.end(end_time=_ns(started + wall_s))


def _batch_start(b: BatchResult) -> float:
    return (b.finished_at or b.received_at) - b.write_s - b.parse_s


def _batch_spans(tracer: Any, parent: Any, b: BatchResult) -> None:
    from opentelemetry import trace

    finished = b.finished_at or b.received_at
    write_start = finished - b.write_s
    parse_start = write_start - b.parse_s
    attrs = {"loadkit.table": b.table_name, "loadkit.batch_id": b.batch_id,
             "loadkit.rows_in": b.rows_in, "loadkit.rows_loaded": b.rows_loaded,
             "loadkit.rows_rejected": b.rows_rejected, "loadkit.bytes": b.bytes,
             "loadkit.postgres.writer": b.writer, "loadkit.attempts": b.attempts,
             "loadkit.status": b.status}
    span = tracer.start_span("batch", context=parent, start_time=_ns(parse_start), attributes=attrs)
    ctx = trace.set_span_in_context(span)
    tracer.start_span("parse", context=ctx, start_time=_ns(parse_start),
                      attributes={"loadkit.rows_in": attrs["loadkit.rows_in"], "loadkit.bytes": attrs["loadkit.bytes"]}
                      ).end(end_time=_ns(write_start))
    tracer.start_span("write", context=ctx, start_time=_ns(write_start),
                      attributes={"loadkit.rows_loaded": attrs["loadkit.rows_loaded"],
                                  "loadkit.attempts": attrs["loadkit.attempts"]}).end(end_time=_ns(finished))
    span.end(end_time=_ns(finished))
