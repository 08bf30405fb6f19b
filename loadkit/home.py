"""One home for loadkit's local state, the same whatever the current folder.

``LOADKIT_HOME`` if set, else the per-user data folder (platformdirs: ~/.local/share/loadkit
on Linux, ~/Library/Application Support/loadkit on macOS, %LOCALAPPDATA%\\loadkit on Windows).
It holds the embedded PostgreSQL (``pgdata/``), the default MLflow store (``mlflow.db`` and
``mlartifacts/``) and Hydra's run folders (``hydra/``). Nothing here is created at import time.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "LOADKIT_HOME"


def home() -> Path:
    """The state folder (absolute; not created)."""
    explicit = os.environ.get(ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    from platformdirs import user_data_dir

    return Path(user_data_dir("loadkit", appauthor=False)).resolve()


def path(*parts: str) -> Path:
    """A path under the state folder, e.g. path("pgdata")."""
    return home().joinpath(*parts)


def pgdata() -> Path:
    """The embedded PostgreSQL's data folder."""
    return path("pgdata")


def mlflow_uri() -> str:
    """The default MLflow tracking URI: a SQLite store in the state folder (folder created)."""
    h = home()
    h.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{h / 'mlflow.db'}"


def mlflow_artifacts() -> Path:
    """Where the default store keeps run artifacts."""
    return path("mlartifacts")
