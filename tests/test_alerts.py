"""Alerts: each rule fires on a forced breach (log record at its level, MLflow tag + metric, JSON-lines
file, webhook) and action=abort aborts the run, including "no progress" while the pipeline is blocked."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Iterator, List

import psycopg2
import pytest

from loadkit.examples.cnpj.sample import SampleManifest
from loadkit import tracking
from loadkit.postgres import ledger
from loadkit.alerts import AlertEngine, Watchdog
from loadkit.config import AlertRule, AlertsConfig
from loadkit.plan import alerts_plan
from loadkit.errors import AlertAbort
from loadkit.runner import run_job
from tests.helpers import compose
from tests.test_tracking import inject_rejects


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def alert_log() -> Iterator[_Capture]:
    handler = _Capture()
    logger = logging.getLogger("loadkit.alerts")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture()
def webhook() -> Iterator[tuple]:
    """A real HTTP endpoint on localhost collecting the JSON bodies posted to it."""
    received: List[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()
    server.server_close()


MONTH = {"rows": 200, "shards": 1, "seed": 5}  # the size of conftest's `month`


@pytest.fixture(scope="module")
def month(month: SampleManifest) -> SampleManifest:
    manifest = month
    inject_rejects(manifest, "cnaes", [b'"";"SEM CODIGO"\n'])  # 1 of 33 cnaes rows: under the 5% table limit
    return manifest


def rules(**overrides: str) -> List[str]:
    """Overrides setting alert rules, e.g. rules(memory_fraction="0:warn")."""
    out = []
    for name, spec in overrides.items():
        threshold, action = spec.split(":")
        out += [f"alerts.{name}.threshold={threshold}", f"alerts.{name}.action={action}"]
    return out


# ---------------------------------------------------------------- the engine and the watchdog alone


def test_engine_fires_once_per_subject_at_its_level_to_every_sink(tmp_path: Path, alert_log: _Capture,
                                                                  webhook: tuple) -> None:
    url, received = webhook
    cfg = AlertsConfig(sinks=["log", "jsonl", "webhook"], jsonl_path=str(tmp_path / "alerts.jsonl"), webhook_url=url)
    seen: List[str] = []
    engine = AlertEngine(alerts_plan(cfg), "run-1", on_alert=lambda a: seen.append(a.rule))
    engine.check("reject_rate", "t1", 0.01)  # under the threshold: nothing
    engine.check("reject_rate", "t1", 0.2)
    engine.check("reject_rate", "t1", 0.3)  # same rule and subject: once
    engine.check("memory_fraction", "host", 0.95)
    assert seen == ["reject_rate", "memory_fraction"]
    assert [(r.levelno, r.alert["rule"]) for r in alert_log.records] == [(logging.CRITICAL, "reject_rate"),
                                                                         (logging.WARNING, "memory_fraction")]
    lines = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(a["rule"], a["subject"], a["run_id"]) for a in lines] == [("reject_rate", "t1", "run-1"),
                                                                       ("memory_fraction", "host", "run-1")]
    assert [a["rule"] for a in received] == ["reject_rate", "memory_fraction"]


def test_abort_rule_raises_after_emitting(alert_log: _Capture) -> None:
    engine = AlertEngine(alerts_plan(AlertsConfig(pool_utilisation=AlertRule(0.9, "warning", "abort"))), "run-2")
    with pytest.raises(AlertAbort, match="pool_utilisation"):
        engine.check("pool_utilisation", "writer-1", 0.99)
    assert len(alert_log.records) == 1 and engine.summary()[0]["action"] == "abort"


def test_watchdog_flags_no_progress_without_any_result_arriving() -> None:
    engine = AlertEngine(alerts_plan(AlertsConfig(stall_seconds=AlertRule(0.2, "critical", "abort"))), "run-3")
    started = time.monotonic()
    interrupted = threading.Event()
    with Watchdog(engine, lambda: time.monotonic() - started, interrupted.set) as dog:
        assert interrupted.wait(5), "the watchdog interrupts the blocked driver"
    assert isinstance(dog.error, AlertAbort) and engine.fired[0].rule == "stall_seconds"
    with pytest.raises(AlertAbort):
        dog.raise_if_tripped()


# ---------------------------------------------------------------- real runs


@pytest.mark.e2e
def test_every_rule_fires_on_a_forced_breach_in_a_run(month: SampleManifest, ray_session: None, job_overrides,
                                                      mlflow_uri: str, tmp_path: Path, alert_log: _Capture,
                                                      webhook: tuple) -> None:
    url, received = webhook
    jsonl = tmp_path / "alerts.jsonl"
    cfg = compose(job_overrides(month.root, *rules(reject_rate="0:warn", memory_fraction="0:warn",
                                                   pool_utilisation="0:warn", stall_seconds="300:warn"),
                                "alerts.sinks=[log,jsonl,webhook]", f"alerts.jsonl_path={jsonl}",
                                f"alerts.webhook_url={url}"))
    result = run_job(cfg)
    assert result.status == "succeeded", result.error
    fired = {json.loads(line)["rule"] for line in jsonl.read_text().splitlines()}
    assert fired == {"reject_rate", "memory_fraction", "pool_utilisation"}
    assert {a["rule"] for a in received} == fired
    levels = {r.alert["rule"]: r.levelno for r in alert_log.records}
    assert levels["reject_rate"] == logging.CRITICAL and levels["memory_fraction"] == logging.WARNING
    run = tracking.get_run(mlflow_uri, result.mlflow_run_id)
    assert float(run.data.tags["alert.reject_rate.cnaes"]) > 0
    assert {"alert.reject_rate", "alert.memory_fraction", "alert.pool_utilisation"} <= set(run.data.metrics)
    assert run.data.metrics["alerts"] >= 3


@pytest.mark.e2e
def test_abort_action_stops_the_run_mid_stream(month: SampleManifest, ray_session: None, job_overrides) -> None:
    result = run_job(compose(job_overrides(month.root, *rules(pool_utilisation="0:abort"))))
    assert result.status == "failed"
    assert isinstance(result.error, AlertAbort) and "pool_utilisation" in str(result.error)


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_no_progress_aborts_while_the_pipeline_is_blocked(month: SampleManifest, pg_dsn: str, schemas: tuple,
                                                          ray_session: None, job_overrides) -> None:
    """A lock holds the writer that must record cnaes' reject; nothing arrives, the watchdog aborts."""
    _, led = schemas
    blocker = psycopg2.connect(pg_dsn)
    with blocker.cursor() as cur:
        ledger.Ledger(led).ensure(cur)
    blocker.commit()
    with blocker.cursor() as cur:
        cur.execute(f'LOCK TABLE "{led}".reject IN SHARE MODE')  # reads pass, the writer's COPY waits
    safety = threading.Timer(120, blocker.rollback)  # never leave the suite hanging if detection fails
    safety.start()
    try:
        started = time.monotonic()
        result = run_job(compose(job_overrides(month.root, *rules(stall_seconds="3:abort"))))
        elapsed = time.monotonic() - started
    finally:
        safety.cancel()
        blocker.rollback()
        blocker.close()
    assert elapsed < 120, "the run ended on its own, while the lock was still held"
    assert result.status == "failed"
    assert isinstance(result.error, AlertAbort) and "stall_seconds" in str(result.error)
    assert result.metrics.tables["cnaes"].rows_read == 0, "the locked batch never reported"
