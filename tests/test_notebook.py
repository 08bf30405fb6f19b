"""notebooks/run_metrics.ipynb executes against runs this test creates, and draws its figures."""
from __future__ import annotations

import uuid
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from loadkit.examples.cnpj.sample import SampleManifest
from loadkit.runner import run_job
from tests.helpers import ROOT, compose

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FIGURES = ("throughput_vs_batch_size.png", "stage_latency.png", "memory_over_time.png", "before_after.png")


MONTH = {"rows": 100, "shards": 1, "seed": 19}  # the size of conftest's `month`


@pytest.mark.timeout(600)
def test_notebook_plots_a_sweep(month: SampleManifest, ray_session: None, job_overrides, mlflow_uri: str,
                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = f"nb-{uuid.uuid4().hex[:8]}"
    runs = [run_job(compose(job_overrides(month.root, f"batch.size={size}", "force=true")), tags={"sweep_id": sweep})
            for size in (100, 400)]
    assert all(r.status == "succeeded" for r in runs)
    figures = tmp_path / "figures"
    for key, value in {"LOADKIT_MLFLOW_URI": mlflow_uri, "LOADKIT_SWEEP_ID": sweep,
                       "LOADKIT_FIGURES_DIR": str(figures)}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    nb = nbformat.read(ROOT / "notebooks" / "run_metrics.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    for name in FIGURES:
        assert (figures / name).stat().st_size > 5_000, name
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = "".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    assert runs[0].mlflow_run_id in html and "rows_per_s" in html
