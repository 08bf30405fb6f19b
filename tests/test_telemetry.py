"""Live telemetry of a run: the Prometheus /metrics and /healthz endpoint (scraped mid-run)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadkit import prom
from loadkit.examples.cnpj.sample import SampleManifest, generate_month
from loadkit.metrics import RunMetrics
from loadkit.records import BatchResult


def get(url: str) -> tuple:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> Dict[str, List[tuple]]:
    out: Dict[str, List[tuple]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def batch(table: str, rows: int, write_s: float, **extra: Any) -> BatchResult:
    fields: Dict[str, Any] = dict(
        kind="data", table_name=table, file_sha="f" * 64, member="m", status="committed", rows_in=rows,
        rows_loaded=rows - 1, rows_rejected=1, rows_coerced=0, bytes=rows * 10, attempts=1, write_s=write_s,
        parse_s=0.01, writer="w1", pool_utilisation=0.5, rss_bytes=123_000_000, finished_at=time.time())
    fields.update(extra)
    return BatchResult(**fields)


def test_metrics_and_healthz_reflect_the_run_state() -> None:
    metrics = RunMetrics({"people": "append"})
    metrics.add(batch("people", 1000, 0.2))
    metrics.add(batch("people", 2000, 3.0, attempts=3))
    endpoint = prom.MetricsEndpoint(prom.RunCollector(metrics), port=0, run_id="r1", stall_seconds=60).start()
    try:
        host, port = prom.current_address()
        code, text = get(f"http://{host}:{port}/metrics")
        assert code == 200
        s = samples(text)
        assert ({"table": "people", "status": "committed"}, 2.0) in s["loadkit_batches_total"]
        assert ({"table": "people", "kind": "rejected"}, 2.0) in s["loadkit_rows_total"]
        write = {lab["le"]: v for lab, v in s["loadkit_batch_seconds_bucket"] if lab["stage"] == "write"}
        assert write["0.25"] == 1 and write["5.0"] == 2 and write["+Inf"] == 2
        assert s["loadkit_connection_failures_total"][0][1] == 2  # the second batch needed two retries
        assert ({"writer": "w1"}, 0.5) in s["loadkit_pool_utilisation"]
        assert s["loadkit_ledger_up"][0][1] == 1
        code, body = get(f"http://{host}:{port}/healthz")
        assert code == 200 and json.loads(body)["healthy"] is True and json.loads(body)["run_id"] == "r1"
        metrics.last_progress -= 120  # no batch result for two minutes: past stall_seconds
        code, body = get(f"http://{host}:{port}/healthz")
        assert code == 503 and json.loads(body)["healthy"] is False
    finally:
        endpoint.stop()
    assert prom.current_address() is None


MONTH = {"rows": 100, "shards": 1, "seed": 29}  # the size of conftest's `month`


@pytest.mark.e2e
def test_the_endpoint_serves_during_a_run(month: SampleManifest, job_overrides,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from loadkit.postgres.sink import PostgresSink
    from loadkit.runner import run_job
    from tests.helpers import compose

    scraped: Dict[str, object] = {}
    finalize = PostgresSink.complete

    def scrape_then_finalize(self: PostgresSink, *args: object) -> object:  # the run has streamed, not yet finished
        host, port = prom.current_address()
        scraped["metrics"] = get(f"http://{host}:{port}/metrics")
        scraped["healthz"] = get(f"http://{host}:{port}/healthz")
        return finalize(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(PostgresSink, "complete", scrape_then_finalize)
    result = run_job(compose(job_overrides(month.root, "env.executor=inprocess", "tracking=off",
                                           "telemetry.metrics_port=0")))
    assert result.status == "succeeded", result.error
    code, text = scraped["metrics"]
    s = samples(text)
    read = sum(v for lab, v in s["loadkit_rows_total"] if lab["kind"] == "read")
    assert code == 200 and read == sum(month.rows.values())
    assert any(lab["thread"] == "loadkit-memory" for lab, _ in s["loadkit_thread_up"])
    assert s["loadkit_memory_rss_bytes"][0][1] > 0
    assert scraped["healthz"][0] == 200
    assert prom.current_address() is None, "the endpoint stops with the run"


def _in_memory_provider() -> tuple:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture(scope="module")
def chunky_month(tmp_path_factory: pytest.TempPathFactory) -> SampleManifest:
    """Files of several 64 KiB chunks (the reader's smallest), so files hold several batches."""
    return generate_month(tmp_path_factory.mktemp("chunky"), 2024, 5, rows=2000, shards=1, seed=31)


@pytest.mark.e2e
@pytest.mark.parametrize("executor", ["inprocess", pytest.param("ray", marks=pytest.mark.slow)])
def test_tracing_spans_run_table_file_batch_on_both_executors(executor: str, chunky_month: SampleManifest,
                                                               job_overrides,
                                                               request: pytest.FixtureRequest) -> None:
    """The stage spans are recorded where the work ran (a Ray read task / parse / writer actor, or
    the in-process threads) under the file span whose traceparent the read unit carried, and reach
    the driver's exporter exactly once, in one trace."""
    month = chunky_month
    from loadkit import telemetry
    from loadkit.runner import run_job
    from tests.helpers import compose

    if executor == "ray":
        request.getfixturevalue("ray_session")
    provider, exporter = _in_memory_provider()
    telemetry.use_provider(provider)
    try:
        result = run_job(compose(job_overrides(month.root, f"env.executor={executor}", "tracking=off",
                                               "telemetry.tracing=console", "batch.size=200",
                                               "batch.policy=fixed")))
    finally:
        telemetry.use_provider(None)
    assert result.status == "succeeded", result.error
    assert result.metrics.executor == executor
    spans = exporter.get_finished_spans()
    assert len({s.context.span_id for s in spans}) == len(spans), "a span was emitted twice"
    by_id = {s.context.span_id: s for s in spans}
    [run] = [s for s in spans if s.name == "run"]
    assert run.attributes["loadkit.run_id"] == result.run_id and run.parent is None
    assert {s.context.trace_id for s in spans} == {run.context.trace_id}, "one trace per run"

    def parent(s: Any) -> Any:
        return by_id[s.parent.span_id]

    tables = [s for s in spans if s.name == "table"]
    assert {s.attributes["loadkit.table"] for s in tables} == set(month.rows)
    assert all(parent(s) is run for s in tables)
    files = [s for s in spans if s.name == "file"]
    assert all(parent(s).name == "table" and parent(s).attributes["loadkit.table"] == s.attributes["loadkit.table"]
               for s in files)
    assert len(files) == sum(len(v) for v in month.files.values())
    batches = [s for s in spans if s.name == "batch"]
    assert all(parent(s).name == "file" for s in batches)
    data = [b for b in result.metrics.batches if b.kind == "data"]
    assert len(batches) == len(data) and len(batches) > len(files), "files of several chunks"
    assert sorted(s.attributes["loadkit.batch_id"] for s in batches) == sorted(b.batch_id for b in data)
    assert sum(s.attributes["loadkit.rows_in"] for s in batches) == sum(month.rows.values())
    assert all(s.attributes["loadkit.bytes"] > 0 and s.attributes["loadkit.batch_id"] for s in batches)
    children: Dict[int, List[Any]] = {}
    for s in spans:
        if s.name in ("read", "parse", "copy", "commit"):
            children.setdefault(s.parent.span_id, []).append(s)
    assert set(children) == {b.context.span_id for b in batches}, "every stage span hangs under a batch span"
    for b in batches:
        stages = sorted(children[b.context.span_id], key=lambda s: s.start_time)
        assert [s.name for s in stages] == ["read", "parse", "copy", "commit"]  # a fresh load: one attempt each
        read, parse_, copy, commit = stages
        assert b.start_time == read.start_time and commit.end_time <= b.end_time
        assert read.end_time <= parse_.start_time and parse_.end_time <= copy.start_time
        assert read.attributes["loadkit.bytes"] == parse_.attributes["loadkit.bytes"] == b.attributes["loadkit.bytes"]
        assert parse_.attributes["loadkit.rows_in"] == b.attributes["loadkit.rows_in"]
        assert copy.attributes["loadkit.rows"] == b.attributes["loadkit.rows_loaded"]
        assert all(s.attributes["loadkit.batch_id"] == b.attributes["loadkit.batch_id"] for s in stages)
    for s in spans:
        assert s.start_time <= s.end_time
    assert [s.name for s in spans].count("finalise") == len(tables)


@pytest.mark.e2e
def test_tracing_is_off_by_default(month: SampleManifest, job_overrides, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default config: no provider is built, no read unit carries a traceparent and no stage
    records a span (the tracing module's recorders would raise if any stage called them)."""
    from loadkit import telemetry, tracing
    from loadkit.config import TelemetryConfig
    from loadkit.runner import run_job
    from tests.conftest import compose

    assert TelemetryConfig().tracing == "off"

    def never(*args: object, **kwargs: object) -> str:
        raise AssertionError("a stage recorded a span with tracing off")

    monkeypatch.setattr(tracing, "open_batch", never)
    monkeypatch.setattr(tracing, "add_stage", never)
    provider, exporter = _in_memory_provider()
    telemetry.use_provider(None)
    cfg = compose(job_overrides(month.root, "env.executor=inprocess", "tracking=off", "batch.size=100"))
    result = run_job(cfg)
    assert result.status == "succeeded", result.error
    assert telemetry._provider is None, "tracing off builds no TracerProvider"
    assert telemetry.start_run(cfg, None) is None
    data = [b for b in result.metrics.batches if b.kind == "data"]
    assert data and all(b.trace == "" for b in data)
    assert exporter.get_finished_spans() == ()


def test_batch_trace_round_trips_through_the_records_and_w3c_headers() -> None:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from loadkit import tracing
    from loadkit.records import Chunk, ParsedBatch, carry

    header = tracing.traceparent(0xABC, 0x123)
    assert header == f"00-{0xABC:032x}-{0x123:016x}-01"
    extracted = TraceContextTextMapPropagator().extract({"traceparent": header})
    assert extracted and tracing.parse_traceparent(header) == (0xABC, 0x123)
    assert tracing.parse_traceparent("garbage") is None and tracing.open_batch("garbage", 1) == ""
    assert tracing.open_batch("", 1) == "" and tracing.add_stage("", "read", 1, 2) == ""
    trace = tracing.add_stage(tracing.open_batch(header, 10), "read", 10, 20, bytes=5, member="m")
    chunk = Chunk(kind="data", table_name="t", file_sha="s", data=b"abcde", trace=trace)
    [back] = Chunk.from_table(Chunk.to_table([chunk]))  # a Ray block boundary
    parsed = carry(back, ParsedBatch, trace=tracing.add_stage(back.trace, "parse", 21, 30, rows_in=1))
    bt = tracing.BatchTrace.decode(parsed.trace)
    assert (bt.trace_id, bt.parent_id, bt.start_ns) == (0xABC, 0x123, 10) and bt.span_id not in (0, 0x123)
    assert [(s.name, s.start_ns, s.end_ns, s.attributes) for s in bt.stages] == [
        ("read", 10, 20, {"bytes": 5, "member": "m"}), ("parse", 21, 30, {"rows_in": 1})]
    assert len({bt.span_id, *(s.span_id for s in bt.stages)}) == 3
    with pytest.raises(ValueError):
        tracing.BatchTrace.decode('{"v": 99}')


def _deadlocks_total(collector: prom.RunCollector) -> float:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return samples(generate_latest(registry).decode())["loadkit_deadlocks_total"][0][1]


def test_deadlock_retries_feed_loadkit_deadlocks_total(pg_dsn: str, schemas: tuple) -> None:
    """A real deadlock (40P01) retried by resilience.retrying is counted where it is retried; writers'
    deadlock retries arrive in their batch results. Both end up in loadkit_deadlocks_total."""
    import threading

    import psycopg2

    from loadkit import resilience
    from loadkit.plan import RetryPolicy
    from tests.conftest import query

    target, _ = schemas
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{target}"')
        cur.execute(f'CREATE TABLE "{target}".locks (id int PRIMARY KEY, v int)')
        cur.execute(f'INSERT INTO "{target}".locks VALUES (1, 0), (2, 0)')
    conn.close()
    update = f'UPDATE "{target}".locks SET v = v + 1 WHERE id = %s'
    metrics = RunMetrics({"people": "append"})
    collector = prom.RunCollector(metrics)
    assert _deadlocks_total(collector) == 0
    policy = RetryPolicy(attempts=3, initial_wait_s=0.01, max_wait_s=0.1, multiplier=2.0, jitter_s=0.0,
                         breaker_failures=5, breaker_cooldown_s=1.0)
    attempts: List[int] = []

    def once() -> None:
        attempts.append(1)
        ours = psycopg2.connect(pg_dsn, application_name="lk-test-ours")
        other = psycopg2.connect(pg_dsn, application_name="lk-test-other") if len(attempts) == 1 else None
        waiter = None
        try:
            with ours.cursor() as cur:
                cur.execute("SET deadlock_timeout = '200ms'")  # ours detects the cycle (the other waits 60 s)
                cur.execute(update, (1,))
                if other is not None:
                    ocur = other.cursor()
                    ocur.execute("SET deadlock_timeout = '60s'")
                    ocur.execute(update, (2,))
                    waiter = threading.Thread(target=lambda: (ocur.execute(update, (1,)), other.commit()))
                    waiter.start()
                    deadline = time.monotonic() + 30
                    while not query(pg_dsn, "SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
                                            "AND wait_event_type = 'Lock'", ("lk-test-other",)):
                        assert time.monotonic() < deadline, "the other session never waited for our lock"
                        time.sleep(0.05)
                cur.execute(update, (2,))  # closes the cycle: 40P01 on the first attempt
            ours.commit()
        finally:
            ours.close()  # rolls back: the other session gets its lock and commits
            if waiter is not None:
                waiter.join(30)
            if other is not None:
                other.close()

    before = resilience.deadlock_retries()
    resilience.retrying(policy)(once)
    assert len(attempts) == 2 and resilience.deadlock_retries() - before == 1
    assert query(pg_dsn, f'SELECT v FROM "{target}".locks ORDER BY id') == [(2,), (2,)]
    assert _deadlocks_total(collector) == 1
    metrics.add(batch("people", 10, 0.1, attempts=3, deadlocks=2))
    assert _deadlocks_total(collector) == 3


def test_ledger_up_is_a_real_ledger_check(pg_dsn: str, schemas: tuple) -> None:
    from loadkit.postgres import db, ledger
    from tests.conftest import LOCAL_DSN

    _, led = schemas
    now = [0.0]
    probe = prom.LedgerProbe(pg_dsn, led, clock=lambda: now[0])
    assert probe() is False, "no ledger in that schema yet"
    with db.transaction(pg_dsn) as cur:
        ledger.Ledger(led).ensure(cur)
    assert probe() is False, "the answer is kept ttl_s seconds"
    now[0] += prom.LedgerProbe.ttl_s
    assert probe() is True
    metrics = RunMetrics({"people": "append"})
    metrics.add(batch("people", 10, 0.1))
    down = prom.LedgerProbe(LOCAL_DSN.replace(":5432/", ":1/"), led)  # nothing listens there
    endpoint = prom.MetricsEndpoint(prom.RunCollector(metrics, ledger_up=down), port=0, run_id="r2").start()
    try:
        host, port = endpoint.address
        code, text = get(f"http://{host}:{port}/metrics")
        assert code == 200 and samples(text)["loadkit_ledger_up"][0][1] == 0
        code, body = get(f"http://{host}:{port}/healthz")
        assert code == 503 and json.loads(body)["ledger_up"] is False
    finally:
        endpoint.stop()
