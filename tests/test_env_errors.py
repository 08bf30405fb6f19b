"""Operator/environment refusals, alert aborts and interrupts each get their own category and exit code.

Real PostgreSQL refusals: a role without CREATE on the database (42501), a read-only session
(25006, what a hot standby answers), a database that does not exist (3D000 at connect).
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import psycopg2
import pytest

from loadkit.errors import (EXIT_CODES, AlertAbort, Category, InterruptedRun, LoadkitError, OperatorError,
                            classify)
from loadkit.runner import RunResult, exit_code, run_job
from tests.helpers import compose

DROP_ALL_BUT_CNAES = [f"~job.tables.{t}" for t in ("empresas", "estabelecimentos", "socios", "simples", "motivos",
                                                    "municipios", "naturezas", "paises", "qualificacoes")]


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    from loadkit.examples.cnpj.sample import generate_month

    return generate_month(tmp_path, 2024, 5, rows=50, shards=1, seed=3).root


def _refused(job_overrides, data_root: Path, dsn: str, monkeypatch: pytest.MonkeyPatch) -> LoadkitError:
    """Run with this DSN (through LOADKIT_DSN: no Hydra quoting of its spaces and quotes); the refusal."""
    monkeypatch.setenv("LOADKIT_DSN", dsn)
    overrides = [o for o in job_overrides(data_root, "tracking.enabled=false", *DROP_ALL_BUT_CNAES)
                 if not o.startswith("sink.dsn=")]
    with pytest.raises(LoadkitError) as info:
        run_job(compose(overrides))
    return info.value


@pytest.fixture()
def unprivileged_role(pg_dsn: str) -> Iterator[str]:
    """A LOGIN role with no CREATE on the database (cluster-wide object: unique name, dropped after)."""
    role = f"lk_noperm_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE ROLE "{role}" LOGIN')
        cur.execute("SELECT current_database()")
        db = cur.fetchone()[0]
        cur.execute(f'REVOKE CREATE ON DATABASE "{db}" FROM PUBLIC')  # PG15: PUBLIC has no CREATE anyway
    yield role
    with conn.cursor() as cur:
        cur.execute(f'DROP OWNED BY "{role}"')
        cur.execute(f'DROP ROLE "{role}"')
    conn.close()


def _with(dsn: str, **params: str) -> str:
    return psycopg2.extensions.make_dsn(dsn, **params)


def test_permission_denied_is_operator_environment(pg_dsn, job_overrides, data_root, unprivileged_role,
                                                      monkeypatch) -> None:
    err = _refused(job_overrides, data_root, _with(pg_dsn, user=unprivileged_role), monkeypatch)
    assert isinstance(err, OperatorError) and classify(err) is Category.OPERATOR, err
    assert "42501" in str(err) or "permission denied" in str(err)
    assert EXIT_CODES[classify(err)] == 5


def test_read_only_session_is_operator_environment(pg_dsn, job_overrides, data_root, monkeypatch) -> None:
    err = _refused(job_overrides, data_root, _with(pg_dsn, options="-c default_transaction_read_only=on"),
                   monkeypatch)
    assert isinstance(err, OperatorError), err
    assert "25006" in str(err)
    assert EXIT_CODES[classify(err)] == 5


def test_missing_database_is_operator_environment(pg_dsn, job_overrides, data_root, monkeypatch) -> None:
    err = _refused(job_overrides, data_root, _with(pg_dsn, dbname=f"lk_missing_{uuid.uuid4().hex[:6]}"),
                   monkeypatch)
    assert isinstance(err, OperatorError), err
    assert "does not exist" in str(err)
    assert EXIT_CODES[classify(err)] == 5


def test_alert_aborts_and_interrupts_have_their_own_category() -> None:
    assert classify(AlertAbort("memory_fraction 0.97 > 0.9")) is Category.ALERT
    assert classify(InterruptedRun("stopped by SIGINT")) is Category.INTERRUPTED
    assert classify(KeyboardInterrupt()) is Category.INTERRUPTED
    codes = {EXIT_CODES[c] for c in Category}
    assert len(codes) == len(Category), "every category has its own exit code"
    from loadkit.metrics import RunMetrics

    def result(status: str, error: BaseException) -> RunResult:
        return RunResult("r", status, RunMetrics({}), 0.0, error)

    assert exit_code(result("failed", AlertAbort("stall"))) == 6
    assert exit_code(result("interrupted", InterruptedRun("SIGTERM"))) == 130
