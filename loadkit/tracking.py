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
import shutil
import socket
import subprocess
import sys
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


def find_default_uri(start: Optional[Path] = None) -> str:
    """The store a loadkit run used by default: MLFLOW_TRACKING_URI if set, else the store in loadkit's
    per-user home (``default_uri()``), which is the same whatever the current folder — so a notebook
    opened from ``notebooks/`` (or anywhere) reads the store the CLI wrote. ``start`` is accepted for
    callers that pass the notebook's folder; it no longer changes the answer."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_uri()


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


_BATCH_METRICS = 1000  # MLflow's log_batch limits: 1000 metrics, 100 params, 100 tags per call
_BATCH_TAGS = 100
_BATCH_PARAMS = 100
_FLUSH_ATTEMPTS = 4


def _launched_from_cli() -> bool:
    """True in ``python -m loadkit`` / the ``loadkit`` script, where a user's shell waits for the process."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None) == "loadkit.__main__" or Path(sys.argv[0] if sys.argv else "").name == "loadkit"


class RunTracker:
    """One MLflow run, written with as few store round trips as possible.

    Everything is buffered here: progress metrics (``progress.*``, steps 1..n), tags, the final
    metrics (plain names, step 0: the value MLflow, ``history`` and the notebook show is the
    printed summary's) and artifacts (files in a staging folder). The store is written in
    batches (``log_batch``) and the artifacts in one ``log_artifacts`` call.

    ``flush`` decides when MLflow (import ~1.5 s, store open ~1 s of CPU) is touched:

    - ``sync``: the store opens on a thread at ``start`` (while the driver prepares tables and
      starts Ray); ``ready`` waits for it, so a broken store stops the run before data moves,
      and ``end`` returns once everything is written. ``run_id`` is known at the end.
    - ``background``: nothing of MLflow is imported while data moves. A run still streaming after
      ``live_after_s``, with at least as long to go by its ETA (or no ETA), opens the store on a
      thread and logs live from then on (``progress``); any other run (or one whose store failed)
      hands its buffered record to a detached ``python -m loadkit.tracking flush DIR`` process,
      so the user's shell is not held. ``run_id`` stays None (``history`` finds the run by
      its ``loadkit_run_id`` tag); a failed flush leaves DIR and its ``flush.log`` for a retry.
    - ``auto`` (default): ``background`` for a single run launched from the loadkit command
      line, ``sync`` otherwise (library calls, tests, notebooks and sweeps, whose comparison
      table reads the store right after each point) and for the run that creates a new local
      store (two processes creating one SQLite store at once race on its migrations).

    A failure to open the store is raised once, by the first call that waits (``ready``), and
    turns the tracker off so that recording the failed run cannot fail too.
    """

    def __init__(self, enabled: bool, uri: Optional[str], experiment: str, flush: str = "sync",
                 live_after_s: float = 20.0, report: bool = False) -> None:
        self.enabled = enabled
        self._uri, self._experiment = uri, experiment
        self._flush, self._live_after_s, self._report = flush, live_after_s, report
        self._run_id: Optional[str] = None
        self._opening: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._client: Any = None
        self._lock = threading.Lock()
        self._pending_metrics: List[Tuple[str, float, int, int]] = []
        self._pending_tags: Dict[str, str] = {}
        self._staging: Optional[Path] = None
        self._started = time.time()
        self._name = ""
        self._params: List[Tuple[str, str]] = []
        self._tags: Dict[str, str] = {}
        self._live_failed = False

    @classmethod
    def from_config(cls, cfg: Any) -> "RunTracker":
        """From a ``TrackingConfig`` (enabled, uri, experiment, flush, live_after_s, report)."""
        return cls(cfg.enabled, cfg.uri, cfg.experiment, getattr(cfg, "flush", "auto"),
                   getattr(cfg, "live_after_s", 20.0), getattr(cfg, "report", True))

    @property
    def background(self) -> bool:
        return self._flush == "background"

    def start(self, name: str, params: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self._flush == "auto":
            background = _launched_from_cli() and not tags.get("sweep_id") and _store_exists(self._uri)
            self._flush = "background" if background else "sync"
        self._started = time.time()
        base = {"hostname": socket.gethostname(), "git_commit": git_commit() or "unknown"}
        self._tags = {**base, **{k: mask_text(str(v)) for k, v in tags.items() if v is not None}}
        self._params = list(flatten(mask_mapping(dict(params))).items())
        self._name = name
        if not self.background:
            self._open_async()

    def _open_async(self) -> None:
        self._opening = threading.Thread(target=self._open, name="loadkit-mlflow", daemon=True)
        self._opening.start()

    def _open(self) -> None:
        try:
            client = _client(self._uri)
            run = client.create_run(_experiment_id(client, self._experiment, self._uri), run_name=self._name,
                                    tags=self._tags, start_time=int(self._started * 1000))
            _log_params(client, run.info.run_id, self._params)
            self._client, self._run_id = client, run.info.run_id
        except BaseException as exc:  # raised in the driver's thread by ready()
            self._error = exc

    def _join(self) -> bool:
        """Wait for an opening store; raise its failure once. True when the run is open."""
        if self._opening is not None:
            self._opening.join()
            self._opening = None
            if self._error is not None:
                self.enabled = False
                raise self._error
        return self.enabled and self._run_id is not None

    def ready(self) -> bool:
        """Before data moves. sync: wait for the store and raise its failure. background: check
        cheaply, without MLflow, that a local store's folder is writable. True when the run is open."""
        if not self.enabled:
            return False
        if self.background and self._opening is None:
            check_store_writable(self._uri)
            return False
        return self._join()

    @property
    def run_id(self) -> Optional[str]:
        if self._opening is not None:
            self._opening.join()
        return self._run_id

    def metrics(self, values: Mapping[str, float], step: Optional[int] = None) -> None:
        """Buffer ``values`` (name -> number; None skipped) at ``step`` (0: the final figures); written now
        if the store is open. Never opens a background run's store (only a stream sample does: ``progress``)."""
        if not self.enabled or not values:
            return
        self._buffer(values, step)
        self._maybe_flush(open_live=False)

    def _buffer(self, values: Mapping[str, float], step: Optional[int]) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            self._pending_metrics += [(_metric_key(k), float(v), now, step or 0) for k, v in values.items()
                                      if v is not None]

    def progress(self, values: Mapping[str, float], step: int, stream_ended: bool = False) -> None:
        """A sample taken while the run streams (``stream_ended``: the one taken as its stream ended):
        logged as ``progress.<name>`` at ``step`` (1, 2, ...), apart from the final figures, so a metric's
        latest value is always the end-of-run one.

        In background mode the store opens here, at a sample taken ``live_after_s`` seconds or more after
        ``start`` whose stream has at least as long to go by ``values["eta_s"]`` (seconds; absent: unknown,
        which counts as long), never at the stream's last sample. Opening (MLflow's import and store) costs
        the driver ~2.5-4 CPU-s and ~60-140 MB beside a stream that keeps both cores of a 2-core machine
        busy, and a live record of a run about to end shows nothing the end-of-run flush does not (a merge
        first load of the 1.16 GB month: 24.3 s without tracking, 26.7 s when the store opened at 20 s,
        into its publish)."""
        if not self.enabled or not values:
            return
        self._buffer({f"progress.{k}": v for k, v in values.items()}, step)
        eta = values.get("eta_s")
        self._maybe_flush(open_live=not stream_ended and (eta is None or eta >= self._live_after_s))

    def _maybe_flush(self, open_live: bool) -> None:
        """Write what is buffered if the run is open; in background mode, with ``open_live``, open it once
        the run is long."""
        if open_live and self.background and self._opening is None and self._run_id is None and \
                not self._live_failed and time.time() - self._started >= self._live_after_s:
            self._open_async()  # a long run: worth a live record, and the import is small beside it
        if self._opening is not None and self._opening.is_alive():
            return
        try:
            is_open = self._join()
        except Exception as exc:
            if not self.background:
                raise
            self._keep_for_the_flush(exc)
            return
        if is_open:
            self._write_pending()

    def _keep_for_the_flush(self, exc: BaseException) -> None:
        """A background run's store failed to open (``_join`` raised ``exc`` and turned tracking off):
        background mode promised not to stop a load over MLflow, nor lose its record, so tracking stays on,
        buffering, and ``end`` hands the record to the detached flush (which retries)."""
        log.warning("MLflow store not reachable (%s: %s); the run's record is written at its end by the "
                    "background flush", type(exc).__name__, exc)
        self.enabled, self._error, self._live_failed = True, None, True

    def _write_pending(self) -> None:
        from mlflow.entities import Metric, RunTag

        with self._lock:
            metrics, self._pending_metrics = self._pending_metrics, []
            tags, self._pending_tags = self._pending_tags, {}
        items = [Metric(k, v, ts, step) for k, v, ts, step in metrics]
        tag_items = [RunTag(k, v) for k, v in tags.items()]
        while items or tag_items:
            some_tags, tag_items = tag_items[:_BATCH_TAGS], tag_items[_BATCH_TAGS:]
            some, items = items[:_BATCH_METRICS - len(some_tags)], items[_BATCH_METRICS - len(some_tags):]
            self._client.log_batch(self._run_id, metrics=some, tags=some_tags)

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            with self._lock:
                self._pending_tags[_metric_key(key)] = mask_text(value)[:5000]

    def alert(self, rule: str, subject: str, value: float) -> None:
        """A fired alert: a tag naming it and a metric with the breaching value."""
        self.tag(f"alert.{rule}.{subject}", f"{value:.4g}")
        self.metrics({f"alert.{rule}": value})

    def _stage(self) -> Path:
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="loadkit-mlflow-"))
            (self._staging / "artifacts").mkdir()
        return self._staging / "artifacts"

    def artifact_text(self, name: str, text: str) -> None:
        if self.enabled:
            (self._stage() / name).write_text(mask_text(text), encoding="utf-8")

    def artifact_json(self, name: str, data: Any) -> None:
        self.artifact_text(name, json.dumps(mask_mapping(data), indent=2, default=str))

    def artifact_yaml(self, name: str, data: Mapping[str, Any]) -> None:
        if self.enabled:
            self.artifact_text(name, to_yaml(mask_mapping(dict(data))))

    def artifact_table(self, name: str, table: Any) -> None:
        """Stage an Arrow table as Parquet (string cells masked first)."""
        if table is None or table.num_columns == 0 or not self.enabled:
            return
        import pyarrow.parquet as pq

        pq.write_table(_masked_table(table), str(self._stage() / name))

    def end(self, status: str) -> None:
        """Write everything left: buffered metrics and tags, the report, the artifacts (one call), the status."""
        if not self.enabled:
            self._discard()
            return
        mlflow_status = _STATUS.get(status, "FAILED")
        if self.background and self._opening is not None:
            try:
                self._join()  # a live open still in flight
            except Exception as exc:
                self._keep_for_the_flush(exc)
        if self.background and self._run_id is None:
            self._spawn_flush(mlflow_status)
            return
        try:
            if not self._join():
                return
            self._write_pending()
            if self._staging is not None:
                if self._report:
                    write_report(self._staging / "artifacts")
                self._client.log_artifacts(self._run_id, str(self._staging / "artifacts"))
            self._client.set_terminated(self._run_id, status=mlflow_status)
        finally:
            self._discard()

    def _discard(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _spawn_flush(self, mlflow_status: str) -> None:
        """Hand the run to a detached flush process; this one (and the user's shell) goes on."""
        spool = self._stage().parent
        with self._lock:
            record = {"uri": self._uri, "experiment": self._experiment, "name": self._name, "tags": self._tags,
                      "params": self._params, "metrics": self._pending_metrics, "late_tags": self._pending_tags,
                      "status": mlflow_status, "start_ms": int(self._started * 1000),
                      "end_ms": int(time.time() * 1000), "report": self._report}
        (spool / "run.json").write_text(json.dumps(record), encoding="utf-8")
        self._staging = None  # the flush process owns (and deletes) it now
        with open(spool / "flush.log", "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "loadkit.tracking", "flush", str(spool)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                    cwd=os.getcwd())
        log.info("MLflow run recorded in the background (pid %d, spool %s)", proc.pid, spool)


def _log_params(client: Any, run_id: str, params: List[Tuple[str, str]]) -> None:
    from mlflow.entities import Param

    for i in range(0, len(params), _BATCH_PARAMS):
        client.log_batch(run_id, params=[Param(k, v) for k, v in params[i:i + _BATCH_PARAMS]])


def _store_exists(uri: Optional[str]) -> bool:
    """False for a local SQLite store not created yet: the first run creates it in-process, since two
    processes creating one store at once (a flush and a reader) race on its schema migration."""
    target = uri or default_uri()
    if target.startswith("sqlite:///"):
        path = Path(target[len("sqlite:///"):])
        return path.is_file() and path.stat().st_size > 0
    return True


def check_store_writable(uri: Optional[str]) -> None:
    """A local store (SQLite file or folder) must be creatable and writable; raises ConfigError.

    Remote stores (http, databricks...) are not contacted here: ``loadkit.health`` does that."""
    from loadkit.errors import ConfigError

    target = uri or default_uri()
    if target.startswith("sqlite:///"):
        folder = Path(target[len("sqlite:///"):]).parent
    elif target.startswith("file:") or "://" not in target:
        folder = Path(target.removeprefix("file://"))
    else:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"MLflow store folder {folder} cannot be created: {exc}", key="tracking.uri") from None
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"MLflow store folder {folder} is not writable", key="tracking.uri")


def flush_spool(spool: Path) -> str:
    """Record a spooled run (``run.json`` + ``artifacts/``) in MLflow; returns the MLflow run id.

    Flushes are serialised by a lock file in the spool's parent folder: several runs ending
    together (a shell loop) must not write one SQLite store at once."""
    import fcntl

    from mlflow.entities import Metric, RunTag

    record = json.loads((spool / "run.json").read_text(encoding="utf-8"))
    with open(spool.parent / "loadkit-mlflow-flush.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = _client(record["uri"])
        loadkit_run = record["tags"].get("loadkit_run_id")
        if loadkit_run:  # a retried flush: drop the incomplete run an earlier attempt left
            for old in find_runs(record["uri"], record["experiment"], f"tags.loadkit_run_id = '{loadkit_run}'"):
                client.delete_run(old.info.run_id)
        run = client.create_run(_experiment_id(client, record["experiment"], record["uri"]), run_name=record["name"],
                                tags=record["tags"], start_time=record["start_ms"])
        run_id = run.info.run_id
        _log_params(client, run_id, [tuple(p) for p in record["params"]])
        items = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
        tags = [RunTag(k, v) for k, v in record["late_tags"].items()]
        while items or tags:
            some_tags, tags = tags[:_BATCH_TAGS], tags[_BATCH_TAGS:]
            some, items = items[:_BATCH_METRICS - len(some_tags)], items[_BATCH_METRICS - len(some_tags):]
            client.log_batch(run_id, metrics=some, tags=some_tags)
        if record.get("report"):
            write_report(spool / "artifacts")
        client.log_artifacts(run_id, str(spool / "artifacts"))
        client.set_terminated(run_id, status=record["status"], end_time=record["end_ms"])
    return run_id


def write_report(folder: Path) -> None:
    """The run's static HTML report (loadkit.report) next to its artifacts; a failure only logs."""
    try:
        from loadkit.report import write_html

        write_html(folder)
    except Exception as exc:  # the report is a convenience: never lose the run's record over it
        log.warning("could not write the HTML report: %s: %s", type(exc).__name__, exc)


def to_yaml(data: Mapping[str, Any]) -> str:
    """``data`` as YAML: the text ``OmegaConf.to_yaml(OmegaConf.create(data))`` gives (OmegaConf's own
    dumper: block style, keys in order, strings that read as other types quoted), without building
    the OmegaConf tree first, ~3x less CPU (~0.06 CPU-s for a run's config, at every run end).
    Data that is not plain (keys not str, an Enum, a tuple, a Path...) goes through OmegaConf."""
    from omegaconf import OmegaConf

    if _plain(data):
        try:
            import yaml
            from omegaconf._utils import get_omega_conf_dumper
        except ImportError:  # a future omegaconf without it: the public path below
            pass
        else:
            return str(yaml.dump(dict(data), Dumper=get_omega_conf_dumper(), default_flow_style=False,
                                 allow_unicode=True, sort_keys=False))
    return OmegaConf.to_yaml(OmegaConf.create(dict(data)))


def _plain(value: Any) -> bool:
    """Only dicts with str keys, lists, str, int, float, bool and None (what YAML shows as OmegaConf does)."""
    if isinstance(value, Mapping):
        return type(value) is dict and all(type(k) is str and _plain(v) for k, v in value.items())
    if type(value) is list:
        return all(_plain(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


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


def find_by_loadkit_run(uri: Optional[str], loadkit_run_id: str, experiment: str = "loadkit",
                        wait_s: float = 0.0) -> Optional[Any]:
    """The MLflow run tagged with this loadkit run id (a background flush leaves the ledger without its id).

    ``wait_s`` > 0 polls until the run is FINISHED (or FAILED/KILLED) for up to that many seconds:
    a CLI run's record may still be on its way from the background flush."""
    deadline = time.time() + wait_s
    while True:
        try:
            found = find_runs(uri, experiment, filter_string=f"tags.loadkit_run_id = '{loadkit_run_id}'",
                              max_results=1)
        except Exception:  # noqa: BLE001 - while waiting, a store busy being written is retried
            if time.time() >= deadline:
                raise
            found = []
        if found and (wait_s <= 0 or found[0].info.status != "RUNNING"):
            return found[0]
        if time.time() >= deadline:
            return found[0] if found else None
        time.sleep(0.5)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m loadkit.tracking flush DIR``: record a spooled run (what a background flush runs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "flush":
        sys.stderr.write("usage: python -m loadkit.tracking flush SPOOL_DIR\n")
        return 2
    spool = Path(args[1])
    logging.basicConfig(level=logging.WARNING)
    for attempt in range(1, _FLUSH_ATTEMPTS + 1):
        try:
            run_id = flush_spool(spool)
            break
        except Exception as exc:  # e.g. another process creating a new SQLite store's tables at the same time
            if attempt == _FLUSH_ATTEMPTS:
                raise
            log.warning("flush attempt %d failed (%s: %s); retrying", attempt, type(exc).__name__, exc)
            time.sleep(2 * attempt)
    shutil.rmtree(spool, ignore_errors=True)
    sys.stdout.write(f"recorded MLflow run {run_id}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
