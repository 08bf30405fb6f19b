"""The Ray executor: a pool of loader actors, each reading, parsing and writing whole read units.

    driver: read units, largest first -> the next free actor's ``load(unit)`` (a streaming generator)
    actor:  read_unit -> parse -> BatchWriter.write -> yield the BatchResult, chunk by chunk
    driver: results as any actor yields them (``ray.wait`` over the running generators)

A chunk is read, parsed and written in one process, so neither the raw chunk nor the parsed batch
crosses the object store (a result is a few hundred bytes, inlined in Ray's reply); memory is
bounded per actor by the one batch in hand, never by file size. No Ray Data: its pipeline ran
read/parse tasks and writer actors in separate processes (the parsed batch went through the
object store between them), plus three actors of its own (stats, autoscaling coordinator, actor
location tracker), and importing it pulls pandas into the driver and every worker. Measured on
1.8M rows, 2 cores: 12.1 -> 6.8 CPU µs/row, peak PSS 1.7 -> 0.93 GB (notes/ray.md, issue #16).

Batch ids and ledger rows are the in-process executor's: both run ``read_unit`` -> ``parse`` ->
``BatchWriter.write``. A loader actor that dies (SIGKILL, OOM, node lost) restarts; the driver
gives its unit to it again, with the byte ranges the ledger has committed since the run started
added to the unit's committed ranges, so the retry skips exactly what committed and cuts its
chunks at their edges (the batch size may have changed in between): never a row twice.
With ``execute.channel``'s board kept in Ray's key-value store, this is the only module that
talks to Ray.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import ray


def _spare_pandas() -> None:
    """In a Ray worker: keep pyarrow's first Python-value conversion from importing pandas
    (~0.3 CPU-s and ~35 MB a worker; loadkit.transform makes Arrow scalars at import, and pyarrow
    imports pandas then only to ask whether the values are pandas objects). The same trick as the
    CLI's ``loadkit.__main__.pyarrow_without_pandas`` (an entry point this layer cannot import):
    the first probe runs while ``import pandas`` fails, then the failing finder is removed, so
    pandas stays importable. Only in a worker process: a library caller's driver keeps pyarrow's
    pandas support as it is."""
    if "pandas" in sys.modules or not sys.argv or not sys.argv[0].endswith("default_worker.py"):
        return
    import pyarrow as pa

    sys.meta_path.insert(0, _NoPandas)  # type: ignore[arg-type]
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(_NoPandas)  # type: ignore[arg-type]


class _NoPandas:
    """A meta path finder that fails ``import pandas``."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"no module named {name!r} (loadkit.execute.ray._spare_pandas)", name=name)


_spare_pandas()  # before the imports below: they reach loadkit.transform

from loadkit.execute.parse import parse  # noqa: E402
from loadkit.monitor import release_memory  # noqa: E402
from loadkit.plan import LoadPlan, TableSpec  # noqa: E402
from loadkit.postgres.writer import BatchWriter, WriterSettings  # noqa: E402
from loadkit.records import BatchResult  # noqa: E402
from loadkit.source.read import Board, ReadUnit, read_unit, split_units  # noqa: E402

log = logging.getLogger("loadkit.execute.ray")


class RayExecutor:
    """Ray: loader actors (read + parse + write, one unit at a time each) on the cluster's cores."""

    name = "ray"

    def __init__(self, address: Optional[str], num_cpus: Optional[int], object_store_memory: Optional[int],
                 runtime_env: Optional[Dict[str, Any]], progress_bars: bool) -> None:
        self._init = (address, num_cpus, object_store_memory, runtime_env, progress_bars)

    def start(self) -> None:
        """Start or join Ray (see :func:`ensure_ray`)."""
        ensure_ray(*self._init)

    def size_channel(self, rows: int) -> "RaySizeChannel":
        return RaySizeChannel(rows)

    def run(self, plan: LoadPlan, units: Sequence[ReadUnit], settings: WriterSettings,
            board: Optional[Board] = None) -> Iterator[BatchResult]:
        """Yield per-batch results as the loader actors commit them (see :func:`_run`). Closing the
        iterator stops the actors. ``board`` (RaySizeChannel.board) lets the actors' reads follow
        the driver's batch size."""
        return _run(plan, units, settings, board)


# ---------------------------------------------------------------- the batch-size board in Ray's KV store


class KVBoard:
    """A read's end of the board (a ``source.read.Board``), kept in the GCS key-value store.

    The driver writes the wanted rows per batch under ``<prefix>rows``; each read writes its
    own running totals (chunks handed downstream, seconds spent) under ``<prefix>task:<uuid>``,
    which the driver sums. No actor: an actor is a worker process of its own (~1 CPU-s to start,
    ~100 MB PSS measured, notes/ray.md), for a value that changes a few times a run."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._key: Optional[bytes] = None  # this read's totals (set on first poll, in the actor)
        self._chunks = 0
        self._wait_s = 0.0

    def poll(self, chunks: int, wait_s: float) -> Optional[int]:
        from ray.experimental import internal_kv as kv

        self._chunks += chunks
        self._wait_s += wait_s
        if self._key is None:
            self._key = f"{self.prefix}task:{uuid.uuid4().hex}".encode()
        try:
            kv._internal_kv_put(self._key, f"{self._chunks} {self._wait_s!r}".encode(), overwrite=True,
                                namespace=_KV_NAMESPACE)
            rows = kv._internal_kv_get(f"{self.prefix}rows".encode(), namespace=_KV_NAMESPACE)
        except Exception as exc:  # noqa: BLE001 -- sizing is an optimisation: keep the current size
            log.warning("batch size board unreachable, keeping the current rows per batch: %s", exc)
            return None
        return int(rows) if rows is not None else None


_KV_NAMESPACE = "loadkit"


class RaySizeChannel:
    """The driver's end of the board in Ray's KV store (an ``execute.channel.SizeChannel``)."""

    def __init__(self, rows: int) -> None:
        self.prefix = f"board:{uuid.uuid4().hex}:"
        self.board = KVBoard(self.prefix)
        self.publish(rows)

    def publish(self, rows: int) -> None:
        from ray.experimental import internal_kv as kv

        kv._internal_kv_put(f"{self.prefix}rows".encode(), str(int(rows)).encode(), overwrite=True,
                            namespace=_KV_NAMESPACE)

    def _task_keys(self) -> List[bytes]:
        from ray.experimental import internal_kv as kv

        return list(kv._internal_kv_list(f"{self.prefix}task:".encode(), namespace=_KV_NAMESPACE))

    def counters(self) -> Tuple[int, float]:
        from ray.experimental import internal_kv as kv

        chunks, seconds = 0, 0.0
        for key in self._task_keys():
            value = kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
            if value:
                c, s = value.split()
                chunks, seconds = chunks + int(c), seconds + float(s)
        return chunks, seconds

    def close(self) -> None:
        from ray.experimental import internal_kv as kv

        for key in [*self._task_keys(), f"{self.prefix}rows".encode()]:
            kv._internal_kv_del(key, namespace=_KV_NAMESPACE)


# ---------------------------------------------------------------- the loader actor


class Loader:
    """A Ray actor (see :func:`_run`): read units in, BatchResults out, one unit at a time.

    A chunk is read, parsed and written before the next is read (see :func:`_pipeline`)."""

    def __init__(self, settings: WriterSettings, tables: Dict[str, TableSpec], period: str) -> None:
        self._settings, self._tables, self._period = settings, tables, period
        self._writer: Optional[BatchWriter] = None  # connected by the first load: its error is that call's
        self._raylet = os.getppid()  # a worker's parent is its node's raylet

    def load(self, unit: ReadUnit, board: Optional[Board], again: bool) -> Iterator[BatchResult]:
        """The unit's BatchResults, then its eof (or error) records, in read order.

        ``again``: an earlier attempt at this unit died with its actor; the ranges the ledger has
        committed for the file since are skipped (see :func:`_committed_now`)."""
        if self._writer is None:
            self._writer = BatchWriter(self._settings)
        if again:
            unit = _committed_now(unit, self._settings, self._period)
        yield from _pipeline(read_unit(unit, board), self._tables, self._period, self._writer, self._orphaned)

    def _orphaned(self) -> None:
        """Exit at once if this worker's raylet is gone (the driver was killed with its local Ray).

        Ray's own check runs every second and a loader has a whole file to go: measured, orphans
        went on committing batches for ~2 s after a kill -9 of the driver, while the next run could
        already have read the ledger's committed ranges (and cut its chunks elsewhere). Checked
        before each batch, the orphan commits at most the batch in hand."""
        if os.getppid() != self._raylet:
            os._exit(1)

    def close(self) -> None:
        """Close the writer's connections (the actor is then killed)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _pipeline(chunks: Iterator[Any], tables: Dict[str, TableSpec], period: str, writer: BatchWriter,
              before_write: Callable[[], None] = lambda: None) -> Iterator[BatchResult]:
    """Parse and write each chunk in turn: one batch in hand at a time. ``before_write`` runs before
    each write (the loader's orphan check).

    Serial, not a parse thread feeding the write: measured on 1.8M rows, 2 cores, the same CPU per
    row (6.75 µs both), ~85 MB less PSS (two loaders), ~10% more wall under a shared load of 8-10;
    with one loader per core, another loader parses while this one waits on the server."""
    for chunk in chunks:
        batch = parse(chunk, tables, period)
        release_memory()  # the chunk's bytes and the parser's buffers (see loadkit.monitor)
        before_write()
        yield writer.write(batch)
        del batch


def _committed_now(unit: ReadUnit, settings: WriterSettings, period: str) -> ReadUnit:
    """``unit`` with the file's committed byte ranges as the ledger has them now (the retry of a unit
    whose actor died: what the dead attempt committed is skipped, and chunks are cut at its edges,
    so the batch ids of the retry never overlap them whatever the batch size is now).

    The ranges of the run's start (``unit.committed``) are a subset: the ledger keeps them."""
    from loadkit.postgres import db
    from loadkit.postgres.ledger import Ledger

    with db.transaction(settings.dsn) as cur:
        ranges = Ledger(settings.ledger_schema).committed_ranges(cur, unit.table.name, period)
    committed = tuple((m, tuple(r)) for (sha, m), r in ranges.items() if sha == unit.file.sha256)
    return replace(unit, committed=committed)


# ---------------------------------------------------------------- the driver


def loader_count(plan: LoadPlan, units: int, cluster_cpus: int) -> int:
    """Loader actors of a run: ``pool.parse_concurrency`` when set, else one per CPU of the cluster
    and at least ``pool.writers``; never more than ``units`` (an actor loads one unit at a time)
    and at least 1. Each holds ``pool.connections_per_writer`` connections: one COPY stream each."""
    wanted = plan.parse_concurrency if plan.parse_concurrency > 0 else max(plan.writers, cluster_cpus)
    return max(1, min(wanted, units))


def _run(plan: LoadPlan, units: Sequence[ReadUnit], settings: WriterSettings,
         board: Optional[Board]) -> Iterator[BatchResult]:
    """Give each loader actor a unit (largest first) and the next when it is done; yield every result.

    A unit whose actor died is given again (its actor restarts: ``max_restarts=-1``) up to
    ``retry.attempts`` times in all; any other error (the writer's classified LoadkitError) ends
    the run. A closed iterator kills the actors: a batch in hand rolls back with its connection."""
    if not units:
        return
    tables = {t.name: replace(t, files=()) for t in plan.tables}
    todo: Deque[Tuple[ReadUnit, int]] = deque(
        (u, 1) for u in sorted(split_units(units, plan.read_splits, plan.batch.read_block_bytes),
                               key=lambda u: -(u.span[1] - u.span[0] if u.span else u.file.size)))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n = loader_count(plan, len(todo), cpus)
    # A CPU each where the cluster has them (so actors spread over nodes), a share of them otherwise.
    actor: Any = ray.remote(Loader).options(num_cpus=min(1.0, cpus / n), max_restarts=-1, max_task_retries=0,
                                       scheduling_strategy="SPREAD")
    actors: List[Any] = [actor.remote(settings, tables, plan.period) for _ in range(n)]
    free = list(actors)
    running: Dict[Any, Tuple[Any, ReadUnit, int]] = {}  # generator -> (actor, unit, attempt)
    finished = False
    try:
        while todo or running:
            while todo and free:
                unit, attempt = todo.popleft()
                a = free.pop()
                running[a.load.remote(unit, board, attempt > 1)] = (a, unit, attempt)
            # A bounded wait: the main thread must get back to the interpreter to run the runner's
            # SIGINT/SIGTERM handler (InterruptedRun); ray.wait does not return for a signal.
            ready: List[Any] = ray.wait(list(running), num_returns=1, timeout=_WAIT_S)[0]
            for gen in ready:
                a, unit, attempt = running[gen]
                try:
                    result: BatchResult = ray.get(next(gen))
                except StopIteration:
                    del running[gen]
                    free.append(a)
                    continue
                except ray.exceptions.RayActorError as exc:
                    del running[gen]
                    if attempt >= plan.retry.attempts:
                        raise
                    log.warning("loader actor died reading %s (%s); giving the file to it again, attempt %d of %d",
                                unit.file.rel, type(exc).__name__, attempt + 1, plan.retry.attempts)
                    time.sleep(min(plan.retry.max_wait_s, plan.retry.initial_wait_s))
                    todo.appendleft((unit, attempt + 1))
                    free.append(a)  # restarting: Ray queues the call until it is back
                    continue
                yield result
        finished = True
    finally:
        _stop(actors, graceful=finished)


_WAIT_S = 0.05  # the longest a signal waits for the driver's loop (each loaded actor commits on meanwhile)


def _stop(actors: List[Any], graceful: bool) -> None:
    """End the actors: after a complete run, close their connections first; otherwise at once (a
    batch in hand rolls back server-side with its connection; committed batches stay)."""
    if graceful:
        try:
            ray.get([a.close.remote() for a in actors], timeout=10)
        except Exception as exc:  # noqa: BLE001 -- the load is done; the kill below ends them anyway
            log.debug("closing loader actors: %s", exc)
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception as exc:  # noqa: BLE001 -- already gone
            log.debug("killing a loader actor: %s", exc)


@contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """Undo ray.init's SIGTERM handler (sys.exit) in the driver: the runner's graceful shutdown
    (stop, record 'interrupted', exit 130) must stay the process's reaction to SIGINT/SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


# Raylet settings of a local Ray (ray.init's _system_config; a joined cluster keeps its own).
# memory_monitor_refresh_ms=0: the raylet's OOM-kill poll, every 250 ms by default, is off; loadkit's
# MemoryMonitor already samples the tree and the reject/alert path reacts to memory. Metrics
# collection feeds Prometheus/dashboard exporters nobody reads in a local run (include_dashboard=False).
# Task events (for the state API and dashboard timeline) and per-event stats are bookkeeping on
# every task and RPC that nothing in a local run reads. An unknown key stops Ray's start (the GCS
# checks them): these are long-standing Ray 2.x keys, checked against the pinned 2.60.
_LOCAL_SYSTEM_CONFIG: Dict[str, Any] = {
    "memory_monitor_refresh_ms": 0,
    "enable_metrics_collection": False,
    "metrics_report_interval_ms": 60_000,
    "task_events_report_interval_ms": 0,
    "event_stats": False,
}


def ensure_ray(address: Optional[str], num_cpus: Optional[int], object_store_memory: Optional[int],
               runtime_env: Optional[Dict[str, Any]], progress_bars: bool) -> bool:
    """Start or join Ray unless this process already did. Returns True if this call started it.

    A local Ray starts without dashboard, with the raylet's memory monitor and metrics off
    (``_LOCAL_SYSTEM_CONFIG``); worker output still reaches the driver's log (``log_to_driver``).
    ``progress_bars`` is accepted for the executor interface: the driver draws its own progress."""
    if ray.is_initialized():
        return False
    kwargs: Dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(num_cpus=num_cpus, object_store_memory=object_store_memory,
                      _system_config=dict(_LOCAL_SYSTEM_CONFIG))
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    with _keep_signal_handlers():
        ray.init(**kwargs)
    return True
