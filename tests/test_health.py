"""``loadkit health``: every component checked, non-zero exit naming what failed."""
from __future__ import annotations

from pathlib import Path

import pytest

from loadkit.postgres import db
from loadkit.postgres import ledger
from loadkit.health import main
from tests.helpers import LOCAL_DSN, ROOT


def checks_of(out: str) -> dict:
    return {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line.strip()}


def test_a_healthy_setup_passes_every_check(pg_dsn: str, schemas: tuple, mlflow_uri: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    target, led = schemas
    code = main(["+job=monthly", "year=2024", "month=5", f"data_root={ROOT / 'data'}", f"sink.dsn={pg_dsn}",
                 f"job.schema={target}", f"sink.ledger_schema={led}", f"tracking.uri={mlflow_uri}",
                 "--min-free-mb", "1"])
    out = capsys.readouterr()
    assert code == 0, out
    assert checks_of(out.out) == {"postgres": "ok", "ledger": "ok", "mlflow": "ok", "ray": "skipped", "disk": "ok",
                                  "sources": "ok"}
    assert "10 table(s), 13 file(s)" in out.out


def test_failures_are_named_and_exit_non_zero(pg_dsn: str, schemas: tuple, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    _, led = schemas
    with db.transaction(pg_dsn) as cur:  # a run whose driver died: 'running', and nobody holds its lock
        ledger.Ledger(led).ensure(cur)
        ledger.Ledger(led).start_run(cur, "deadbeef", "somejob", "2024-05", {})
    assert main([f"sink.dsn={pg_dsn}", f"sink.ledger_schema={led}", "tracking=off", f"data_root={tmp_path}",
                 "--min-free-mb", "1"]) == 4
    out = capsys.readouterr()
    assert checks_of(out.out)["ledger"] == "FAIL" and "somejob 2024-05 (1)" in out.out
    assert out.err.strip() == "unhealthy: ledger"

    dead = LOCAL_DSN.replace(":5432/", ":1/")
    assert main([f"sink.dsn={dead}", "tracking=off", f"data_root={tmp_path}", "--min-free-mb", "1"]) == 4
    out = capsys.readouterr()
    assert checks_of(out.out)["postgres"] == "FAIL" and checks_of(out.out)["ledger"] == "skipped"
    assert out.err.strip() == "unhealthy: postgres"


def test_health_is_a_loadkit_subcommand(pg_dsn: str, schemas: tuple, mlflow_uri: str,
                                        capsys: pytest.CaptureFixture) -> None:
    """`loadkit health ...` dispatches to loadkit.health and returns its exit code."""
    from loadkit.cli import main as cli_main

    target, led = schemas
    code = cli_main(["health", "+job=monthly", "year=2024", "month=5", f"data_root={ROOT / 'data'}",
                     f"sink.dsn={pg_dsn}", f"job.schema={target}", f"sink.ledger_schema={led}",
                     f"tracking.uri={mlflow_uri}", "--min-free-mb", "1"])
    out = capsys.readouterr()
    assert code == 0, out
    assert checks_of(out.out)["postgres"] == "ok"
    assert cli_main(["help"]) == 0 and "health" in capsys.readouterr().out
