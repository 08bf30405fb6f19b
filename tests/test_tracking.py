"""Every run is an MLflow run: masked params, the named tags, metrics over time and at the end, artifacts.

The sink DSN carries a password (the local server trusts, so it is ignored) and no
param, tag or artifact may contain it.
"""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Dict, List
from urllib.parse import urlsplit, urlunsplit

import pyarrow.parquet as pq
import pytest

from loadkit.examples.cnpj.sample import SampleManifest
from loadkit import tracking
from loadkit.logs import JsonFormatter, TextFormatter, set_context
from loadkit.runner import run_job
from tests.helpers import compose, query

pytestmark = pytest.mark.e2e

SECRET = "s3cretpw"


def with_password(dsn: str, password: str = SECRET) -> str:
    parts = urlsplit(dsn)
    netloc = f"{parts.username or 'root'}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def inject_rejects(manifest: SampleManifest, table: str, lines: List[bytes]) -> None:
    """Append unparseable records to the table's first zip member (a real reject, found by the parser)."""
    path = manifest.root / manifest.files[table][0]
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    first = sorted(members)[0]
    members[first] += b"".join(lines)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


MONTH = {"rows": 300, "shards": 1, "seed": 11}  # the size of conftest's `month`


@pytest.fixture(scope="module")
def month(month: SampleManifest) -> SampleManifest:
    manifest = month
    inject_rejects(manifest, "empresas", [b'"";"NO KEY";"2062";"49";"0,00";"01";""\n'])
    return manifest


def all_artifacts(uri: str, run_id: str, dst: Path) -> Dict[str, bytes]:
    root = Path(tracking.download_artifact(uri, run_id, "", str(dst)))
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_run_is_tracked_with_masked_params_tags_metrics_and_artifacts(
        month: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None, job_overrides, mlflow_uri: str,
        tmp_path: Path) -> None:
    if urlsplit(pg_dsn).port is None:
        pytest.skip("needs a TCP DSN to add a password to")  # the embedded fallback uses a socket path
    secret_dsn = with_password(pg_dsn)
    cfg = compose(job_overrides(month.root, f"sink.dsn={secret_dsn}", "batch.size=100"))
    result = run_job(cfg, tags={"sweep_id": "sweep-tracking-test"})
    assert result.status == "succeeded", result.error
    run = tracking.get_run(mlflow_uri, result.mlflow_run_id)

    params = run.data.params
    assert params["batch.size"] == "100" and params["year"] == "2024" and params["month"] == "5"
    assert params["job.name"] == "cnpj_monthly" and params["pool.writers"] == "2"
    assert "***" in params["sink.dsn"] and SECRET not in params["sink.dsn"]

    tags = run.data.tags
    assert tags["job"] == "cnpj_monthly" and tags["year"] == "2024" and tags["month"] == "5"
    assert tags["sweep_id"] == "sweep-tracking-test" and tags["status"] == "succeeded"
    assert tags["hostname"] and len(tags["git_commit"]) in (40, len("unknown"))
    assert tags["loadkit_run_id"] == result.run_id

    m = run.data.metrics
    total = sum(month.rows.values()) + 1
    assert m["rows_read"] == total and m["rows_rejected"] == 1 and m["rows_loaded"] == total - 1
    assert m["empresas.rows_rejected"] == 1 and m["empresas.rows_per_s"] > 0 and m["empresas.batches_per_s"] > 0
    assert m["batches"] >= len(month.rows) and m["batches_per_s"] > 0 and m["rows_per_s"] > 0
    for stage in ("write", "parse"):
        assert 0 < m[f"batch_{stage}_s_p50"] <= m[f"batch_{stage}_s_p95"] <= m[f"batch_{stage}_s_max"]
    assert m["peak_rss_bytes"] > 0 and m["writer_rss_bytes_max"] > 0
    assert 0 < m["writer_busy_max"] <= 1 and "pool_utilisation_max" in m
    assert m["file_completed_s_max"] > 0 and m["driver_wait_s"] > 0 and m["read_wait_s"] > 0
    assert m["retries"] == 0 and m["alerts"] == 0
    history = tracking.metric_history(mlflow_uri, result.mlflow_run_id, "progress.queue_depth")
    assert history, "progress metrics are logged while the run streams"

    artifacts = all_artifacts(mlflow_uri, result.mlflow_run_id, tmp_path / "artifacts")
    expected = {"config.yaml", "summary.txt", "alerts.json", "batches.parquet", "files.parquet", "memory.parquet",
                "rejects_sample.parquet", "report.html"}
    assert expected <= set(artifacts), sorted(artifacts)
    report = artifacts["report.html"].decode()
    assert "TOTAL" in report and "NO KEY" in report and report.count("<svg") == 3
    assert b"batch:" in artifacts["config.yaml"] and b"cnpj_monthly" in artifacts["config.yaml"]
    assert b"TOTAL" in artifacts["summary.txt"]
    assert json.loads(artifacts["alerts.json"]) == []
    batches = pq.read_table(tmp_path / "artifacts" / "batches.parquet")
    assert sum(batches.column("rows_in").to_pylist()) == total
    rejects = pq.read_table(tmp_path / "artifacts" / "rejects_sample.parquet").to_pylist()
    assert len(rejects) == 1 and rejects[0]["table_name"] == "empresas" and "NO KEY" in rejects[0]["raw"]
    files = pq.read_table(tmp_path / "artifacts" / "files.parquet")
    assert files.num_rows == sum(len(v) for v in month.files.values())

    leaks = [k for k, v in {**params, **tags}.items() if SECRET in k or SECRET in v]
    leaks += [name for name, data in artifacts.items() if SECRET.encode() in data]
    assert leaks == []
    _, led = schemas
    config = query(pg_dsn, f'SELECT config::text, mlflow_run_id FROM "{led}".run WHERE run_id=%s', (result.run_id,))
    assert SECRET not in config[0][0] and config[0][1] == result.mlflow_run_id


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("loadkit.test", logging.WARNING, __file__, 1,
                               "connecting to postgresql://u:%s@h/db", (SECRET,), None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_log_records_carry_run_table_and_file_and_never_a_password() -> None:
    from loadkit.logs import _ContextFilter

    set_context(run_id="r-123")
    record = _record(table="empresas", file="Empresas0.zip")  # the engine's way: extra={"table": ..., "file": ...}
    _ContextFilter().filter(record)
    data = json.loads(JsonFormatter().format(record))
    assert (data["run_id"], data["table"], data["file"], data["level"]) == ("r-123", "empresas", "Empresas0.zip",
                                                                            "WARNING")
    assert SECRET not in data["message"] and "***" in data["message"]
    outside = _record()
    _ContextFilter().filter(outside)
    data = json.loads(JsonFormatter().format(outside))
    assert data["table"] is None and data["file"] is None and data["run_id"] == "r-123"
    text = TextFormatter().format(record)
    assert "[r-123 empresas Empresas0.zip]" in text and SECRET not in text
    set_context(run_id=None)
