"""MLflow logging: every run is an MLflow run with masked params, metrics and artifacts.

Only this module imports mlflow. With tracking disabled every method is a no-op, so
callers never branch on it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from loadkit.security import mask_mapping, mask_text

log = logging.getLogger("loadkit.tracking")

DEFAULT_URI_DIR = ".loadkit"


def default_uri() -> str:
    path = Path(DEFAULT_URI_DIR).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


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
                              check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class RunTracker:
    def __init__(self, enabled: bool, uri: Optional[str], experiment: str) -> None:
        self.enabled = enabled
        self.run_id: Optional[str] = None
        if not enabled:
            return
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(uri or default_uri())
        if mlflow.get_experiment_by_name(experiment) is None:
            artifacts = Path(DEFAULT_URI_DIR, "mlartifacts").resolve()
            mlflow.create_experiment(experiment, artifact_location=artifacts.as_uri() if not uri else None)
        mlflow.set_experiment(experiment)

    def start(self, name: str, params: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        run = self._mlflow.start_run(run_name=name)
        self.run_id = run.info.run_id
        masked = flatten(mask_mapping(dict(params)))
        items = list(masked.items())
        for i in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[i:i + 100]))
        base_tags = {"host": socket.gethostname(), "git_commit": git_commit() or "unknown"}
        self._mlflow.set_tags({**base_tags, **{k: str(v) for k, v in tags.items() if v is not None}})

    def metrics(self, values: Mapping[str, float], step: Optional[int] = None) -> None:
        if self.enabled and values:
            self._mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            self._mlflow.set_tag(key, mask_text(value))

    def artifact_text(self, name: str, text: str) -> None:
        if self.enabled:
            self._mlflow.log_text(mask_text(text), name)

    def artifact_json(self, name: str, data: Any) -> None:
        if self.enabled:
            self._mlflow.log_text(mask_text(json.dumps(mask_mapping(data), indent=2, default=str)), name)

    def artifact_table(self, name: str, table: Any) -> None:
        """Log an Arrow table as Parquet."""
        if not self.enabled or table is None or table.num_columns == 0:
            return
        import pyarrow.parquet as pq

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            pq.write_table(table, path)
            self._mlflow.log_artifact(path)

    def end(self, status: str) -> None:
        if self.enabled and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status={"succeeded": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
