"""OpenTelemetry tracing of a run: spans run -> table -> file -> batch -> (read, parse, copy, commit).

Off by default (``telemetry.tracing=off``: the OpenTelemetry SDK is not even imported, read units
carry no ``traceparent`` and no stage records anything); ``console`` prints finished spans to
stderr, ``otlp`` sends them to ``telemetry.otlp_endpoint`` (needs ``opentelemetry-exporter-otlp-proto-http``).

Propagation (see :mod:`loadkit.tracing`): when a run starts, :func:`start_run` fixes the run's
trace id and the span ids of its run, table and file spans; each read unit carries its file
span's W3C ``traceparent`` into the read task (a Ray task or the in-process parse thread); the
read stage opens the batch span there and records ``read``, the parser ``parse``, the writer (a
Ray actor or a writer thread) ``copy`` and ``commit``, all as data in the batch record. The
driver emits, when the run ends (:func:`record_run`), the run/table/file spans with their fixed
ids and times from the run's metrics, and each received batch result's spans with the ids and
timestamps its stages recorded: every span exactly once, whichever process did the work.

Spans are emitted as finished ``ReadableSpan`` objects handed to the provider's span processor
(``TracerProvider._active_span_processor``: the SDK has no public call that ends a span whose ids
were chosen elsewhere), so the configured processors and exporters (console, OTLP, a test's
in-memory exporter) see them as they see any span.

Attributes: ``loadkit.run_id``, ``loadkit.table``, ``loadkit.file`` (path), ``loadkit.batch_id``,
``loadkit.rows_in`` / ``rows_loaded`` / ``rows_rejected``, ``loadkit.bytes``, ``loadkit.postgres.writer``,
``loadkit.attempts``, ``loadkit.status``; stage spans: ``loadkit.bytes``/``loadkit.member`` (read),
``loadkit.rows_in``/``loadkit.bytes`` (parse), ``loadkit.rows``/``loadkit.rejects``/``loadkit.attempt`` (copy).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from loadkit import tracing
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


@dataclass
class RunTrace:
    """The ids of a run's driver-side spans, fixed before any data moves so that read units can
    carry their file span's ``traceparent`` (see the module doc)."""

    trace_id: int
    run_id: int
    tables: Dict[str, int] = field(default_factory=dict)  # table name -> its span id
    files: Dict[Tuple[str, str], int] = field(default_factory=dict)  # (table, sha256) -> the file span id

    def traceparent(self, table: str, sha: str) -> str:
        """The W3C traceparent of a file's span (the parent of its batches' spans)."""
        span_id = self.files.setdefault((table, sha), tracing.new_span_id())
        self.tables.setdefault(table, tracing.new_span_id())
        return tracing.traceparent(self.trace_id, span_id)


def start_run(cfg: Any, plan: Any) -> Optional[RunTrace]:
    """The run's trace ids, or None with tracing off (then nothing is traced and OpenTelemetry is not imported)."""
    if provider_for(cfg) is None:
        return None
    return RunTrace(tracing.new_trace_id(), tracing.new_span_id(),
                    {t.name: tracing.new_span_id() for t in plan.tables})


def record_run(cfg: Any, plan: Any, metrics: Any, status: str, started: float, wall_s: float,
               trace: Optional[RunTrace] = None) -> None:
    """Emit the run's spans (see the module doc). Never fails the run: problems are logged."""
    provider = provider_for(cfg)
    if provider is None or trace is None:
        return
    try:
        _export(provider, _spans(trace, plan, metrics, status, started, wall_s))
        provider.force_flush()
    except Exception as exc:  # tracing is diagnostics: the run's outcome stands without it
        log.warning("could not record the run's trace: %s: %s", type(exc).__name__, exc)


@dataclass(frozen=True)
class _Span:
    trace_id: int
    name: str
    span_id: int
    parent_id: Optional[int]
    start_ns: int
    end_ns: int
    attributes: Dict[str, Any]
    error: Optional[str] = None


def _spans(trace: RunTrace, plan: Any, metrics: Any, status: str, started: float, wall_s: float) -> List[_Span]:
    paths: Dict[tuple, str] = {(t.name, f.sha256): f.rel for t in plan.tables for f in t.files}
    out = [_Span(trace.trace_id, "run", trace.run_id, None, _ns(started), _ns(started + wall_s), {
        "loadkit.run_id": plan.run_id, "loadkit.job": plan.job, "loadkit.period": plan.period,
        "loadkit.status": status, "loadkit.rows_read": metrics.totals()[0]},
        None if status == "succeeded" else status)]
    batches: Dict[Tuple[str, str], List[Tuple[BatchResult, tracing.BatchTrace]]] = {}
    for b in metrics.batches:
        if b.kind == "data" and b.trace:
            batches.setdefault((b.table_name, b.file_sha), []).append((b, tracing.BatchTrace.decode(b.trace)))
    for tm in metrics.tables.values():
        table_id = trace.tables.get(tm.name)
        if table_id is None:
            continue
        end = tm.started + tm.stream_s
        if tm.finalised_at is not None:
            end = max(end, tm.finalised_at)
            out.append(_Span(trace.trace_id, "finalise", tracing.new_span_id(), table_id,
                             _ns(tm.finalised_at - tm.finalise_s), _ns(tm.finalised_at),
                             {"loadkit.table": tm.name, "loadkit.mode": tm.mode}))
        out.append(_Span(trace.trace_id, "table", table_id, trace.run_id, _ns(tm.started), _ns(end), {
            "loadkit.table": tm.name, "loadkit.mode": tm.mode, "loadkit.status": tm.status,
            "loadkit.rows_read": tm.rows_read, "loadkit.rows_loaded": tm.rows_loaded,
            "loadkit.rows_rejected": tm.rows_rejected, "loadkit.bytes": tm.bytes}))
    for (tname, sha), file_id in trace.files.items():
        ev = metrics.file_events.get((tname, sha), {})
        mine = batches.get((tname, sha), [])
        if not mine and not ev:
            continue  # never reached the stream (nothing left to load)
        for b, bt in mine:
            out += _batch_spans(b, bt, file_id)
        first = min([bt.start_ns for _, bt in mine] or [_ns(ev.get("last_at", started))])
        last = max([_ns(b.finished_at or b.received_at) for b, _ in mine] + [_ns(ev.get("last_at", 0.0)), first])
        out.append(_Span(trace.trace_id, "file", file_id, trace.tables[tname], first, last, {
            "loadkit.table": tname, "loadkit.file": paths.get((tname, sha), sha), "loadkit.file_sha": sha,
            "loadkit.batches": len(mine)}, (ev.get("error") or "")[:500] or None))
    return out


def _batch_spans(b: BatchResult, bt: tracing.BatchTrace, file_id: int) -> List[_Span]:
    end = max([_ns(b.finished_at or b.received_at)] + [s.end_ns for s in bt.stages])
    attrs = {"loadkit.table": b.table_name, "loadkit.batch_id": b.batch_id,
             "loadkit.rows_in": b.rows_in, "loadkit.rows_loaded": b.rows_loaded,
             "loadkit.rows_rejected": b.rows_rejected, "loadkit.bytes": b.bytes,
             "loadkit.postgres.writer": b.writer, "loadkit.attempts": b.attempts,
             "loadkit.status": b.status}
    out = [_Span(bt.trace_id, "batch", bt.span_id, file_id, bt.start_ns, end, attrs)]
    for s in bt.stages:
        out.append(_Span(bt.trace_id, s.name, s.span_id, bt.span_id, s.start_ns, s.end_ns,
                         {"loadkit.batch_id": b.batch_id, **{f"loadkit.{k}": v for k, v in s.attributes.items()}}))
    return out


def _export(provider: Any, spans: List[_Span]) -> None:
    """Hand finished spans with pre-chosen ids to the provider's processors (see the module doc)."""
    from opentelemetry import trace as api
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Status, StatusCode

    processor = getattr(provider, "_active_span_processor", None)
    if processor is None:
        raise RuntimeError(f"{type(provider).__name__} has no span processor to hand spans to")
    scope = InstrumentationScope("loadkit")
    sampled = api.TraceFlags(api.TraceFlags.SAMPLED)
    for s in spans:
        ctx = api.SpanContext(s.trace_id, s.span_id, is_remote=False, trace_flags=sampled)
        parent = (None if s.parent_id is None
                  else api.SpanContext(s.trace_id, s.parent_id, is_remote=False, trace_flags=sampled))
        status = Status(StatusCode.ERROR, s.error) if s.error else Status(StatusCode.UNSET)
        processor.on_end(ReadableSpan(s.name, context=ctx, parent=parent, resource=provider.resource,
                                      attributes=s.attributes, status=status, start_time=s.start_ns,
                                      end_time=max(s.start_ns, s.end_ns), instrumentation_scope=scope))
