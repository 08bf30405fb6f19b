"""Stage spans recorded where the work happens (read task, parser, writer), carried in the batch record.

A run's trace context travels as a W3C ``traceparent`` (``ReadUnit.traceparent``: the trace id and
the span id of the unit's *file* span, written by the driver with OpenTelemetry's
``TraceContextTextMapPropagator``). Each stage then records its span as plain data in the batch's
``trace`` field (``records.Origin.trace``), which ``records.carry`` copies from the Chunk into the
ParsedBatch and the BatchResult, so the data crosses every Ray block boundary (a string column)
and every in-process queue with the batch it describes:

- the read stage opens the **batch** span (a new span id, child of the file span) and adds
  ``read`` (reading, decompressing and cutting that chunk);
- the parser adds ``parse``; the writer adds ``copy`` (each attempt's COPY of rows, rejects
  and the ledger row) and ``commit``, and the batch span ends at the writer's finish.

Why record data instead of a tracer provider in every Ray worker: a worker's provider would need
the exporter's settings and network access in every process, a ``console`` exporter would print
in worker logs, a ``BatchSpanProcessor`` loses what it buffered when Ray kills or restarts a
worker, and no in-memory exporter in the test process could see worker spans. Recorded data
reaches the driver with the batch result that proves the work happened; the driver
(``loadkit.telemetry``) turns each result's spans into real OpenTelemetry spans with these ids and
timestamps, once per result it received (a batch whose result never arrived, e.g. its worker died,
leaves no spans; a retried batch is a new batch span). One export path, one exporter.

Tracing off (the default): ``traceparent`` is ``""``, every stage checks that one string and
records nothing, and this module does not import OpenTelemetry.

The ``trace`` string is compact JSON (``TRACE_VERSION`` 1)::

    {"v": 1, "t": trace id (32 hex), "p": parent (file) span id (16 hex), "b": batch span id (16 hex),
     "s": batch start (epoch ns), "x": [[name, span id (16 hex), start ns, end ns, {attributes}], ...]}
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

TRACE_VERSION = 1
Attr = Union[str, int, float, bool]

_rng = random.SystemRandom()


def new_span_id() -> int:
    """A random non-zero 64-bit span id (W3C trace context)."""
    return _rng.getrandbits(64) or 1


def new_trace_id() -> int:
    """A random non-zero 128-bit trace id (W3C trace context)."""
    return _rng.getrandbits(128) or 1


def traceparent(trace_id: int, span_id: int) -> str:
    """The W3C ``traceparent`` header of a sampled span (OpenTelemetry's propagator writes it)."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = trace.set_span_in_context(trace.NonRecordingSpan(trace.SpanContext(
        trace_id, span_id, is_remote=False, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))))
    carrier: Dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=ctx)
    return carrier["traceparent"]


def parse_traceparent(header: str) -> Optional[Tuple[int, int]]:
    """(trace id, span id) of a ``traceparent`` header, or None if it is not a valid one."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    span = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": header}))
    sc = span.get_span_context()
    return (sc.trace_id, sc.span_id) if sc.is_valid else None


@dataclass(frozen=True)
class StageSpan:
    """One finished stage span of a batch (its parent is the batch span)."""

    name: str  # read | parse | copy | commit
    span_id: int
    start_ns: int  # epoch nanoseconds
    end_ns: int
    attributes: Dict[str, Attr]


@dataclass(frozen=True)
class BatchTrace:
    """A batch's trace as carried in its records (see the module doc)."""

    trace_id: int
    parent_id: int  # the file span
    span_id: int  # the batch span
    start_ns: int
    stages: Tuple[StageSpan, ...] = ()

    def encode(self) -> str:
        """The compact JSON form stored in ``records.Origin.trace``."""
        return json.dumps({"v": TRACE_VERSION, "t": f"{self.trace_id:032x}", "p": f"{self.parent_id:016x}",
                           "b": f"{self.span_id:016x}", "s": self.start_ns,
                           "x": [[s.name, f"{s.span_id:016x}", s.start_ns, s.end_ns, s.attributes]
                                 for s in self.stages]}, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> "BatchTrace":
        """The trace ``encode`` wrote. Raises ValueError on anything else."""
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("v") != TRACE_VERSION:
            raise ValueError(f"not a loadkit batch trace (version {TRACE_VERSION}): {text[:80]!r}")
        return cls(int(d["t"], 16), int(d["p"], 16), int(d["b"], 16), int(d["s"]),
                   tuple(StageSpan(n, int(i, 16), int(a), int(b), dict(attrs)) for n, i, a, b, attrs in d["x"]))


def open_batch(parent: str, start_ns: int) -> str:
    """A new batch span (child of the ``traceparent`` ``parent``) started at ``start_ns``, encoded;
    ``""`` when ``parent`` is empty (tracing off) or not a valid traceparent."""
    if not parent:
        return ""
    ids = parse_traceparent(parent)
    if ids is None:
        return ""
    return BatchTrace(ids[0], ids[1], new_span_id(), start_ns).encode()


def add_stage(trace: str, name: str, start_ns: int, end_ns: int, **attributes: Attr) -> str:
    """``trace`` with one more finished stage span; ``""`` stays ``""`` (tracing off)."""
    if not trace:
        return ""
    t = BatchTrace.decode(trace)
    stage = StageSpan(name, new_span_id(), start_ns, end_ns, attributes)
    return BatchTrace(t.trace_id, t.parent_id, t.span_id, t.start_ns, t.stages + (stage,)).encode()
