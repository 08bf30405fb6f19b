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
from loadkit.examples.cnpj.sample import SampleManifest
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


@pytest.mark.e2e
@pytest.mark.parametrize("executor", ["inprocess", pytest.param("ray", marks=pytest.mark.slow)])
def test_tracing_spans_run_table_file_batch_on_both_executors(executor: str, month: SampleManifest, job_overrides,
                                                               request: pytest.FixtureRequest) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    from loadkit import telemetry
    from loadkit.runner import run_job
    from tests.helpers import compose

    if executor == "ray":
        request.getfixturevalue("ray_session")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use_provider(provider)
    try:
        result = run_job(compose(job_overrides(month.root, f"env.executor={executor}", "tracking=off",
                                               "telemetry.tracing=console", "batch.size=100")))
    finally:
        telemetry.use_provider(None)
    assert result.status == "succeeded", result.error
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    names = [s.name for s in spans]
    [run] = [s for s in spans if s.name == "run"]
    assert run.attributes["loadkit.run_id"] == result.run_id and run.parent is None
    tables = [s for s in spans if s.name == "table"]
    assert {s.attributes["loadkit.table"] for s in tables} == set(month.rows)
    assert all(by_id[s.parent.span_id].name == "run" for s in tables)
    files = [s for s in spans if s.name == "file"]
    assert all(by_id[s.parent.span_id].name == "table" for s in files)
    assert len(files) == sum(len(v) for v in month.files.values())
    batches = [s for s in spans if s.name == "batch"]
    assert all(by_id[s.parent.span_id].name == "file" for s in batches)
    assert sum(s.attributes["loadkit.rows_in"] for s in batches) == sum(month.rows.values())
    assert all(s.attributes["loadkit.bytes"] > 0 and s.attributes["loadkit.batch_id"] for s in batches)
    assert names.count("parse") == names.count("write") == len(batches)
    assert len({s.context.trace_id for s in spans}) == 1, "one trace per run"
    for s in spans:
        assert s.start_time <= s.end_time


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
        ledger.ensure(cur, led)
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
