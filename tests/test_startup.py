"""The fixed cost of a CLI run (issue 16): what a sample-month run imports before its load is published.

No timing is asserted (the machine is shared); what is asserted is the cause of the cost: the
modules a small run must not pay for are absent from the driver process when the load is
published, and the MLflow record written afterwards by the background flush still carries the
printed summary's numbers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from loadkit import tracking
from loadkit.examples.cnpj.sample import SampleManifest
from tests.helpers import ROOT

# Modules a sample month (local files already in place, telemetry and metrics export off, the
# in-process executor, MLflow flushed in the background) has no use for in the driver.
NOT_BEFORE_PUBLISH = ("mlflow", "ray", "pandas", "httpx", "fsspec", "s3fs", "wsgidav", "opentelemetry",
                      "prometheus_client", "sqlalchemy")

# Runs the real CLI entry point (loadkit.__main__.entry, argv[0] "loadkit" as the console script
# has it) with two probes: the loaded top-level packages when the sink publishes the load
# (PostgresSink.complete, before it runs) and at exit (an atexit handler, which exit_now runs).
_DRIVER = """
import atexit, json, sys
# The CLI's entry spares pyarrow's pandas probe before it imports the engine; this driver imports the
# sink first (to patch it), so it does the same first, as entry() would.
from loadkit.__main__ import pyarrow_without_pandas
pyarrow_without_pandas()
from loadkit.postgres.sink import PostgresSink

SEEN = {}
WATCH = %r

def loaded():
    return sorted(m for m in WATCH if m in sys.modules)

original = PostgresSink.complete
def complete(self, *args, **kwargs):
    SEEN.setdefault("publish", loaded())
    return original(self, *args, **kwargs)
PostgresSink.complete = complete

def report():
    SEEN["exit"] = loaded()
    with open(%r, "w") as out:
        json.dump(SEEN, out)
atexit.register(report)

sys.argv = ["loadkit", *sys.argv[1:]]
from loadkit.__main__ import entry
entry()
"""


def _summary_rows(stdout: str) -> Dict[str, List[str]]:
    lines = stdout[stdout.index("table "):].splitlines()
    return {line.split()[0]: line.split() for line in lines[2:] if line.strip() and not line.startswith("run id")}


@pytest.mark.e2e
def test_a_tracked_sample_month_imports_no_mlflow_ray_pandas_or_fetch_client_before_publishing(
        month: SampleManifest, pg_dsn: str, schemas: tuple, mlflow_uri: str, tmp_path: Path) -> None:
    tracking.find_runs(mlflow_uri)  # the store exists: a CLI run then flushes in the background (tracking=auto)
    target, led = schemas
    probe = tmp_path / "modules.json"
    args = ["+job=monthly", "year=2024", "month=5", f"data_root={month.root}", f"sink.dsn={pg_dsn}",
            f"job.schema={target}", f"sink.ledger_schema={led}", "tracking=local", f"tracking.uri={mlflow_uri}",
            "env.executor=inprocess", "env.progress_bars=false"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOADKIT_DSN", "LOADKIT_SWEEP_ID", "LOADKIT_NORMAL_EXIT", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _DRIVER % (NOT_BEFORE_PUBLISH, str(probe)), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(probe.read_text())
    assert seen["publish"] == [], f"imported before the load was published: {seen['publish']}"
    assert seen["exit"] == [], f"imported by the driver by its exit: {seen['exit']}"
    assert "MLflow run recorded in the background" in out.stderr  # the record went to the flush process

    # The flush process's record has the printed summary's numbers.
    run_id = out.stdout.split("run id: ")[1].split()[0]
    run = tracking.find_by_loadkit_run(mlflow_uri, run_id, wait_s=180)
    assert run is not None and run.info.status == "FINISHED", run
    m = run.data.metrics
    total = _summary_rows(out.stdout)["TOTAL"]
    # TOTAL files skipped read loaded rejected inserted updated unchanged duplicates deleted stream final seconds
    # rows/s
    assert f"{m['rows_read']:,.0f}" == total[3] == f"{sum(month.rows.values()):,}"
    assert f"{m['rows_loaded']:,.0f}" == total[4] and f"{m['rows_rejected']:,.0f}" == total[5]
    assert f"{m['wall_s']:.1f}" == total[13] and f"{m['rows_per_s']:,.0f}" == total[14]
    assert run.data.tags["status"] == "succeeded" and run.data.tags["loadkit_run_id"] == run_id


_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_keys = st.text(min_size=1).filter(lambda k: not k.startswith("_"))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) |
                       st.dictionaries(_keys, inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=6))
def test_config_artifact_yaml_is_omegaconfs_text(data: dict) -> None:
    """tracking.to_yaml (PyYAML's C dumper: the run's config.yaml, written at every run end) gives the
    text the reference, OmegaConf.to_yaml(OmegaConf.create(...)), gave before it."""
    try:
        reference = OmegaConf.to_yaml(OmegaConf.create(data))
    except Exception:  # noqa: BLE001 - e.g. a string OmegaConf reads as a malformed ${...}: not a config
        return
    assert tracking.to_yaml(data) == reference
