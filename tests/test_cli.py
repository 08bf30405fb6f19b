"""The command line as a user runs it: exit codes, one clear error line, the summary."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from tests.conftest import ROOT, query

pytestmark = pytest.mark.e2e


def cli(args: List[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("LOADKIT_DSN", None)
    return subprocess.run([sys.executable, "-m", "loadkit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_config_error_exits_2_naming_the_key() -> None:
    out = cli(["+job=monthly", "year=2024", "month=5", "pool.writers=0"])
    assert out.returncode == 2
    assert "pool.writers" in out.stderr and "Traceback" not in out.stderr


def test_unknown_key_exits_2() -> None:
    out = cli(["+job=monthly", "year=2024", "month=5", "batch.sise=3"])
    assert out.returncode == 2
    assert "sise" in out.stderr and "Traceback" not in out.stderr


def test_missing_month_folder_exits_3_listing_the_path(tmp_path: Path) -> None:
    out = cli(["+job=monthly", "year=2031", "month=1", f"data_root={tmp_path}", "tracking.enabled=false",
               "fetch=never"])  # the local path error, not the download of a month that does not exist
    assert out.returncode == 3, out.stderr
    assert str(tmp_path) in out.stderr and "2031-01" in out.stderr


def test_dead_database_exits_4_without_password(tmp_path: Path) -> None:
    from loadkit.examples.cnpj.sample import generate_month

    generate_month(tmp_path, 2024, 5, rows=50, shards=1)
    out = cli(["+job=monthly", "year=2024", "month=5", f"data_root={tmp_path}", "tracking.enabled=false",
               "sink.dsn=postgresql://root:hunter2@127.0.0.1:1/test", "sink.connect_timeout=2"])
    assert out.returncode == 4, out.stderr
    assert "hunter2" not in out.stderr + out.stdout
    assert "cannot connect" in out.stderr


def test_flagship_command_on_the_committed_sample(pg_dsn: str, schemas: tuple, mlflow_uri: str) -> None:
    target, led = schemas
    out = cli(["+job=monthly", "year=2024", "month=5", f"sink.dsn={pg_dsn}", f"job.schema={target}",
               f"sink.ledger_schema={led}", f"tracking.uri={mlflow_uri}", "env.progress_bars=false"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "estabelecimentos" in out.stdout and "run id:" in out.stdout
    run_id = out.stdout.strip().splitlines()[-1].split()[-1]
    status = query(pg_dsn, f'SELECT status, rows_read, rows_loaded + rows_rejected FROM "{led}".run WHERE run_id=%s',
                   (run_id,))
    assert status[0][0] == "succeeded" and status[0][1] == status[0][2] > 0
