"""Entry point: ``loadkit`` / ``python -m loadkit`` (subcommands in loadkit.cli).

    loadkit +job=monthly year=2024 month=5 [group=choice] [key=value ...]
    loadkit -m +job=monthly year=2024 month=5 batch.size=5000,20000,100000
    loadkit --config-dir ./conf +job=weather          # a job kept in the project's conf/job/
    loadkit plan +job=monthly year=2024 month=5        # what would load; writes nothing

Nothing is resolved at import time: the config folder is found when a command runs.
Exit codes (errors.EXIT_CODES): 0 ok, 1 bug, 2 config error, 3 source data error, 4 transient
infrastructure, 5 operator/environment (permissions, read-only standby, missing database), 6 alert
abort, 130 interrupted.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from loadkit.cli import conf_dir, fail  # noqa: F401 (conf_dir: public helper, kept importable here)
from loadkit.config import LoadkitConfig, to_config
from loadkit.errors import ConfigError, LoadkitError, classify
from loadkit.logs import setup_logging
from loadkit.security import MaskingStream, mask_text, register_argv_secrets


def _typed(cfg: DictConfig) -> LoadkitConfig:
    setup_logging(cfg.logging.format, cfg.logging.level)
    return to_config(cfg)


def run_task(cfg: DictConfig) -> Optional[int]:
    """The Hydra task of ``loadkit run``: load, print the summary, return the exit code."""
    pyarrow_without_pandas()  # before loadkit.runner: loadkit.transform makes Arrow scalars at import
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from loadkit.runner import exit_code, run_job

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:
        _scrub_multirun_yaml(Path(hc.sweep.dir))
    try:
        typed = _typed(cfg)
    except ConfigError as exc:
        return _stop(fail(exc), multirun)
    tags = {"sweep_id": sweep_id(hc.sweep.dir) if multirun else None,
            "sweep_dir": str(Path(hc.sweep.dir).resolve()) if multirun else None,
            "sweep_job": str(hc.job.num) if multirun else None,
            "overrides": " ".join(hc.overrides.task)}
    try:
        result = run_job(typed, tags={k: v for k, v in tags.items() if v})
    except LoadkitError as exc:  # refused before the run started (plan, sink): nothing was written
        return _stop(fail(exc), multirun)
    sys.stdout.write(result.summary + "\n")
    sys.stdout.flush()
    if result.mlflow_run_id:
        sys.stderr.write(mlflow_hint(typed.tracking.uri, result.mlflow_run_id) + "\n")
    elif typed.tracking.enabled:  # recorded by the background flush: its MLflow id is not known yet
        sys.stderr.write(mlflow_hint(typed.tracking.uri, None, loadkit_run_id=result.run_id) + "\n")
    code = exit_code(result)
    if result.error is not None:
        sys.stderr.write(f"loadkit: run {result.status} ({classify(result.error).value}): {result.error}\n")
    return _stop(code, multirun)


def pyarrow_without_pandas() -> None:
    """Spare the CLI's load pandas' import (~0.3 CPU-s, a tenth of the sample month's fixed cost).

    pyarrow imports pandas at its first conversion of Python values (``pa.scalar``, ``pa.array`` of
    a list; loadkit.transform makes some at import) only to ask whether they are pandas objects;
    nothing in a loadkit run hands it any. Here that first probe runs while ``import pandas`` fails,
    so pyarrow records "no pandas" and never asks again; the failing finder is removed at once, so
    pandas stays importable (MLflow, ``Table.to_pandas()``: pyarrow imports it again on a call that
    needs it). Only in the CLI's run task, and not when pandas is already loaded (nothing to spare)."""
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    sys.meta_path.insert(0, _NoPandas)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(_NoPandas)


class _NoPandas:
    """A meta path finder that fails ``import pandas`` (pyarrow's Cython import reads a None in
    ``sys.modules`` as the module itself, so that marker cannot be used)."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"no module named {name!r} (loadkit.__main__.pyarrow_without_pandas)",
                                      name=name)


def _stop(code: int, multirun: bool) -> int:
    """A single run exits with its code at once; a sweep goes on and exits with the first failure."""
    if code and not multirun:
        raise SystemExit(code)
    return code


def plan_task(cfg: DictConfig) -> Optional[int]:
    """The Hydra task of ``loadkit plan``: print the resolved plan; nothing is written."""
    from loadkit import explain
    from loadkit.plan import build_plan

    try:
        typed = _typed(cfg)
        sys.stdout.write(explain.describe(build_plan(typed)) + "\n")
    except LoadkitError as exc:
        raise SystemExit(fail(exc)) from None
    return 0


def mlflow_hint(uri: Optional[str], run_id: Optional[str], loadkit_run_id: Optional[str] = None) -> str:
    """How to open this MLflow run in the UI: the URL on a tracking server, else the ``mlflow ui``
    command for the local store and the run's page on it (the store's URI masked). Without an
    MLflow ``run_id`` (a background flush is still writing it), the page is the run search by the
    ``loadkit_run_id`` tag; MLflow itself is then not imported."""
    from loadkit.tracking import default_uri

    store = uri or default_uri()
    if run_id is None:
        page = f"#/experiments  (search: tags.loadkit_run_id = '{loadkit_run_id}')"
    else:
        from loadkit.tracking import get_run

        try:
            page = f"#/experiments/{get_run(uri, run_id).info.experiment_id}/runs/{run_id}"
        except Exception:  # noqa: BLE001 -- the hint must never fail a finished run
            page = f"#/runs/{run_id}"
    if store.startswith(("http://", "https://")):
        return f"loadkit: MLflow run: {mask_text(store.rstrip('/'))}/{page}"
    return (f"loadkit: open the MLflow run with: mlflow ui --backend-store-uri {mask_text(store)}"
            f"  then http://127.0.0.1:5000/{page}")


def sweep_id(sweep_dir: str) -> str:
    """LOADKIT_SWEEP_ID, else the sweep folder's last two parts (Hydra's date/time by default)."""
    return os.environ.get("LOADKIT_SWEEP_ID") or "/".join(Path(sweep_dir).parts[-2:])


def _scrub_multirun_yaml(sweep_dir: Path) -> None:
    """Hydra's sweeper saves the composed config (DSN included) as multirun.yaml: mask it in place."""
    path = sweep_dir / "multirun.yaml"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        masked = mask_text(text)
        if masked != text:
            path.write_text(masked, encoding="utf-8")


def entry() -> None:
    """The ``loadkit`` console script. Passwords on the command line or in LOADKIT_DSN are masked in
    everything printed, Hydra's own output (--cfg job, override parse errors) included."""
    register_argv_secrets(sys.argv[1:] + [f"dsn={os.environ.get('LOADKIT_DSN', '')}"])
    sys.stdout, sys.stderr = MaskingStream(sys.stdout), MaskingStream(sys.stderr)
    from loadkit.cli import main

    try:
        code: object = main()
    except SystemExit as exc:
        code = exc.code
    exit_now(code)


def exit_now(code: object) -> None:
    """End the CLI process with ``code`` (SystemExit's meaning: None 0, an int itself, anything else
    printed and 1) without the interpreter's teardown, which frees every module and object one by
    one (~1 CPU-s after a run that imported pyarrow, Ray, Hydra...; nothing of it is output).

    Everything that matters at exit still happens first: the atexit handlers (logging's flush and
    close, Ray's shutdown, OpenTelemetry's exporters, an embedded PostgreSQL's stop), then stdout
    and stderr are flushed. Falls back to a normal exit when a non-daemon thread is still alive
    (the interpreter would wait for it) or ``LOADKIT_NORMAL_EXIT=1`` is set."""
    import atexit
    import threading

    if not isinstance(code, int):
        if code is not None:
            sys.stderr.write(f"{code}\n")
        code = 0 if code is None else 1
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others or os.environ.get("LOADKIT_NORMAL_EXIT") == "1":
        raise SystemExit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(int(code) & 0xFF)


if __name__ == "__main__":
    entry()
