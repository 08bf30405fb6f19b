"""The history CLI over a real ledger and MLflow store: list, show, compare (delta and %)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loadkit.examples.cnpj.sample import SampleManifest
from loadkit.history import comparison, main, render_compare
from loadkit.runner import RunResult, run_job
from tests.helpers import ROOT, compose

pytestmark = pytest.mark.e2e


MONTH = {"rows": 100, "shards": 1, "seed": 17}  # the size of conftest's `month`


def test_list_show_and_compare_two_runs(month: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None,
                                        job_overrides, mlflow_uri: str, capsys: pytest.CaptureFixture) -> None:
    _, led = schemas
    first: RunResult = run_job(compose(job_overrides(month.root, "batch.size=100")))
    second: RunResult = run_job(compose(job_overrides(month.root, "batch.size=400", "force=true")))
    assert first.status == second.status == "succeeded"
    base = ["--dsn", pg_dsn, "--ledger-schema", led, "--tracking-uri", mlflow_uri]

    assert main([*base, "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:4] == ["run", "job", "period", "status"]
    rows = [line.split() for line in listing[2:]]
    assert [r[0] for r in rows] == [second.run_id, first.run_id]  # newest first
    total = f"{sum(month.rows.values()):,}"
    assert all(r[3] == "succeeded" and r[-3] == total for r in rows)

    assert main([*base, "show", first.run_id[:8]]) == 0
    shown = capsys.readouterr().out
    assert first.run_id in shown and "empresas" in shown and "rows_per_s" in shown
    assert first.mlflow_run_id in shown

    assert main([*base, "compare", first.run_id, second.run_id]) == 0
    compared = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[4:]}
    assert compared["rows_read"][1:] == [total, total, "0", "+0.0%"]
    assert {"seconds", "rows_per_s", "batch_write_s_p50", "peak_rss_bytes"} <= set(compared)
    assert compared["rows_per_s"][-1].endswith("%")
    assert compared["rows_discarded"][1:3] == ["0", "0"]


def test_compare_keeps_a_count_a_run_did_not_record_unknown() -> None:
    """A count the ledger holds as NULL (an unfinished run, or a row an older ledger wrote: rows_discarded) is "-" in
    ``history compare``, never 0 with a made-up delta (a fresh review: ``rows_discarded 0 0 0``)."""
    from datetime import datetime

    run = {"rows_read": 10, "rows_loaded": 10, "rows_rejected": 0, "rows_discarded": None,
           "started_at": datetime(2024, 5, 1), "finished_at": None}
    done = {**run, "rows_discarded": 3, "finished_at": datetime(2024, 5, 1, 0, 1)}
    rows = {r["metric"]: r for r in comparison(run, done, {}, {})}
    discarded = rows["rows_discarded"]
    assert (discarded["a"], discarded["b"], discarded["delta"]) == (None, 3, None)
    shown = render_compare({"run_id": "a", "status": "running"}, {"run_id": "b", "status": "ok"}, list(rows.values()))
    line = next(ln.split() for ln in shown.splitlines() if ln.startswith("rows_discarded"))
    assert line[1:] == ["-", "3", "-", "-"]


def test_cli_entry_point_and_unknown_ledger(pg_dsn: str) -> None:
    env = {**os.environ, "LOADKIT_DSN": pg_dsn}
    out = subprocess.run([sys.executable, "-m", "loadkit.history", "--ledger-schema", "no_such_ledger", "list"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "no_such_ledger" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("error:") == 1, out.stderr  # printed once
