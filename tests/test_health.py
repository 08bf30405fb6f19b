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


def test_stale_loading_table_rows_are_listed(pg_dsn: str, schemas: tuple, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """A table row left 'loading' by a run that is gone is named; one whose run is alive is not."""
    import psycopg2

    _, led = schemas
    with db.transaction(pg_dsn) as cur:
        book = ledger.Ledger(led)
        book.ensure(cur)
        book.start_run(cur, "failedrun", "jobA", "2024-05", {})
        book.start_table(cur, "failedrun", "empresas", "2024-05", "merge", 2, 0)
        cur.execute(f'UPDATE "{led}".run SET status = %s WHERE run_id = %s', ("failed", "failedrun"))
        book.start_run(cur, "liverun", "jobB", "2024-06", {})
        book.start_table(cur, "liverun", "socios", "2024-06", "append", 1, 0)
        book.start_table(cur, "liverun", "cnaes", "2024-06", "replace", 1, 0)
        cur.execute(f'UPDATE "{led}".table_load SET status = %s WHERE table_name = %s', ("loaded", "cnaes"))
    args = [f"sink.dsn={pg_dsn}", f"sink.ledger_schema={led}", "tracking=off", f"data_root={tmp_path}",
            "--min-free-mb", "1"]
    driver = psycopg2.connect(pg_dsn)  # jobB's driver is alive: it holds the job lock
    try:
        with driver.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"loadkit-run:{led}:jobB:2024-06",))
        assert main(args) == 4
        out = capsys.readouterr()
        assert checks_of(out.out)["ledger"] == "FAIL"
        assert "1 table row(s) stale 'loading'" in out.out and "failedrun empresas 2024-05 (run failed)" in out.out
        assert "liverun" not in out.out and "stuck 'running'" not in out.out
    finally:
        driver.close()  # the driver dies: its run and its 'loading' row are stale now
    assert main(args) == 4
    out = capsys.readouterr().out
    assert "jobB 2024-06 (1)" in out and "2 table row(s) stale 'loading'" in out
    assert "liverun socios 2024-06 (run running)" in out and "cnaes" not in out
