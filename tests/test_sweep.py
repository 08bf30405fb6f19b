"""A Hydra multirun from the real command line: one MLflow run per sweep point, all under one sweep id."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadkit.examples.cnpj.sample import SampleManifest
from loadkit import tracking
from tests.helpers import ROOT
from tests.test_tracking import SECRET, with_password

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


MONTH = {"rows": 100, "shards": 1, "seed": 13}  # the size of conftest's `month`


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.mark.timeout(600)
def test_three_point_sweep_makes_three_runs_under_one_sweep(month: SampleManifest, pg_dsn: str, schemas: tuple,
                                                            ray_session: None, mlflow_uri: str,
                                                            tmp_path: Path) -> None:
    target, led = schemas
    sweep_dir = tmp_path / "sweep"
    dsn = with_password(pg_dsn) if "@127.0.0.1:" in pg_dsn or "@localhost:" in pg_dsn else pg_dsn
    args = ["-m", "+job=monthly", "year=2024", "month=5", f"data_root={month.root}", f"sink.dsn={dsn}",
            f"job.schema={target}", f"sink.ledger_schema={led}", f"tracking.uri={mlflow_uri}", "force=true",
            "env.progress_bars=false", f"env.address={ray_address()}",  # join the session's Ray, not a new one
            "batch.size=100,200,400", f"hydra.sweep.dir={sweep_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOADKIT_DSN", "LOADKIT_SWEEP_ID")}
    out = subprocess.run([sys.executable, "-m", "loadkit", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=540, env=env)
    problems = [line for line in out.stderr.splitlines() if "loadkit:" in line or "Error" in line]
    assert out.returncode == 0, "\n".join(problems[-20:]) or out.stderr[-3000:]
    assert out.stdout.count("TOTAL") == 3
    sweep = "/".join(sweep_dir.resolve().parts[-2:])
    assert out.stdout.startswith(f"sweep {sweep} ("), out.stdout[:300]  # the sweep id comes first
    for job, size in enumerate((100, 200, 400)):  # each summary is labelled with its point's overrides
        assert f"sweep {sweep} point {job}: " in out.stdout and f"batch.size={size}" in out.stdout
    comparison = out.stdout[out.stdout.index(f"sweep {sweep}: 3 point(s)"):].splitlines()
    assert comparison[1].split()[:3] == ["point", "overrides", "status"]
    points = [line.split() for line in comparison[3:6]]
    assert [p[0] for p in points] == ["0", "1", "2"] and all("succeeded" in p for p in points)
    assert all(f"{sum(month.rows.values()):,}" in p for p in points)

    runs = tracking.find_runs(mlflow_uri, filter_string=f"tags.sweep_dir = '{sweep_dir.resolve()}'")
    assert len(runs) == 3
    assert {r.data.tags["sweep_id"] for r in runs} == {"/".join(sweep_dir.resolve().parts[-2:])}
    assert sorted(int(r.data.params["batch.size"]) for r in runs) == [100, 200, 400]
    assert {r.data.tags["sweep_job"] for r in runs} == {"0", "1", "2"}
    assert all(r.info.status == "FINISHED" and r.data.metrics["rows_read"] == sum(month.rows.values())
               for r in runs)
    # Hydra's own record of the sweep holds the DSN: it is masked on disk.
    leaked = [str(p) for p in sweep_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert (sweep_dir / "multirun.yaml").is_file() and leaked == []
