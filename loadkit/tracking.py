"""MLflow logging: every run is an MLflow run with masked params, tags, metrics and artifacts.

Only this module imports mlflow. It talks to MLflow through an explicit ``MlflowClient``
and run id, never the fluent "active run": the driver's watchdog thread records alerts
too, and a Hydra sweep runs several jobs in one process. With tracking disabled every
method is a no-op, so callers never branch on it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from loadkit.security import mask_mapping, mask_text

log = logging.getLogger("loadkit.tracking")

_STATUS = {"succeeded": "FINISHED", "interrupted": "KILLED"}


def _default_artifacts() -> Path:
    from loadkit.home import mlflow_artifacts

    return mlflow_artifacts()


def default_uri() -> str:
    """A SQLite store in loadkit's per-user state folder (LOADKIT_HOME), whatever the current folder."""
    from loadkit.home import mlflow_uri

    return mlflow_uri()


def flatten(data: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    out: Dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            continue  # column lists: in the config artifact, too long for params
        else:
            out[name] = str(value)[:500]
    return out


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _client(uri: Optional[str]) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or default_uri())


def _experiment_id(client: Any, name: str, uri: Optional[str]) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    artifacts = _default_artifacts().as_uri() if not uri else None
    try:
        return str(client.create_experiment(name, artifact_location=artifacts))
    except Exception:  # another process created it between the lookup and the create
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


class RunTracker:
    """One MLflow run. ``start`` returns at once: importing mlflow and opening the store (~3 s)
    happen on a thread while the driver prepares tables and starts Ray; every later call
    waits for that thread. A failure there is raised once, by the first call that waits
    (``ready``), and turns the tracker off so that recording the failed run cannot fail too."""

    def __init__(self, enabled: bool, uri: Optional[str], experiment: str) -> None:
        self.enabled = enabled
        self._uri, self._experiment = uri, experiment
        self._run_id: Optional[str] = None
        self._opening: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def start(self, name: str, params: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        base = {"hostname": socket.gethostname(), "git_commit": git_commit() or "unknown"}
        all_tags = {**base, **{k: mask_text(str(v)) for k, v in tags.items() if v is not None}}
        masked = list(flatten(mask_mapping(dict(params))).items())
        self._opening = threading.Thread(target=self._open, args=(name, all_tags, masked), name="loadkit-mlflow",
                                         daemon=True)
        self._opening.start()

    def _open(self, name: str, tags: Dict[str, str], params: List[Tuple[str, str]]) -> None:
        try:
            from mlflow.entities import Param

            self._client = _client(self._uri)
            run = self._client.create_run(_experiment_id(self._client, self._experiment, self._uri), run_name=name,
                                          tags=tags)
            for i in range(0, len(params), 100):
                self._client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params[i:i + 100]])
            self._run_id = run.info.run_id
        except BaseException as exc:  # raised in the driver's thread by ready()
            self._error = exc

    def ready(self) -> bool:
        """Wait for start(); raise its failure once. True when the run is open."""
        if self._opening is not None:
            self._opening.join()
            self._opening = None
            if self._error is not None:
                self.enabled = False
                raise self._error
        return self.enabled and self._run_id is not None

    @property
    def run_id(self) -> Optional[str]:
        if self._opening is not None:
            self._opening.join()
        return self._run_id

    def metrics(self, values: Mapping[str, float], step: Optional[int] = None) -> None:
        if not values or not self.ready():
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, step or 0) for k, v in values.items() if v is not None]
        for i in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[i:i + 500])

    def tag(self, key: str, value: str) -> None:
        if self.ready():
            self._client.set_tag(self.run_id, _metric_key(key), mask_text(value))

    def alert(self, rule: str, subject: str, value: float) -> None:
        """A fired alert: a tag naming it and a metric with the breaching value."""
        self.tag(f"alert.{rule}.{subject}", f"{value:.4g}")
        self.metrics({f"alert.{rule}": value})

    def artifact_text(self, name: str, text: str) -> None:
        if self.ready():
            self._client.log_text(self.run_id, mask_text(text), name)

    def artifact_json(self, name: str, data: Any) -> None:
        self.artifact_text(name, json.dumps(mask_mapping(data), indent=2, default=str))

    def artifact_yaml(self, name: str, data: Mapping[str, Any]) -> None:
        from omegaconf import OmegaConf

        self.artifact_text(name, OmegaConf.to_yaml(OmegaConf.create(mask_mapping(dict(data)))))

    def artifact_table(self, name: str, table: Any) -> None:
        """Log an Arrow table as Parquet (string cells masked first)."""
        if table is None or table.num_columns == 0 or not self.ready():
            return
        import pyarrow.parquet as pq

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            pq.write_table(_masked_table(table), path)
            self._client.log_artifact(self.run_id, path)

    def end(self, status: str) -> None:
        if self.ready():
            self._client.set_terminated(self.run_id, status=_STATUS.get(status, "FAILED"))


def _metric_key(key: str) -> str:
    """MLflow keys allow letters, digits, _ - . / and space; anything else becomes _."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)[:250]


def _masked_table(table: Any) -> Any:
    import pyarrow as pa

    cols = []
    for col in table.columns:
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = pa.array([mask_text(v) if v is not None else None for v in col.to_pylist()], col.type)
        cols.append(col)
    return pa.Table.from_arrays(cols, names=table.column_names)


# ---------------------------------------------------------------- reading runs back (history, notebook)


def find_runs(uri: Optional[str], experiment: str = "loadkit", filter_string: str = "",
              max_results: int = 100) -> List[Any]:
    """Runs of an experiment, newest first (mlflow Run objects)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=max_results,
                                   order_by=["attributes.start_time DESC"]))


def get_run(uri: Optional[str], run_id: str) -> Any:
    return _client(uri).get_run(run_id)


def metric_history(uri: Optional[str], run_id: str, key: str) -> List[Any]:
    return list(_client(uri).get_metric_history(run_id, key))


def download_artifact(uri: Optional[str], run_id: str, path: str, dst: str) -> str:
    return str(_client(uri).download_artifacts(run_id, path, dst))
