"""The Ray Data executor: one row per read unit -> map_batches on a pool of loader actors.

    from_items(unit indices, largest unit first)
      -> map_batches(LoaderUDF): an actor pool; each call loads one whole unit in its process,
         read_unit -> parse -> BatchWriter.write chunk by chunk, yielding one result block per batch
      -> per-batch BatchResults streamed to the driver (iter_batches)

Read, parse and write of a chunk are fused in one process, so neither the raw chunk nor the parsed
batch crosses the object store (a result block is a few hundred bytes); memory is bounded per
actor by the one batch in hand, never by file size. Before (issue #16) read/parse tasks and a
writer actor pool were separate processes with the parsed batch going through the object store
between them. Measured (README, session 6): 1.8M rows, 2 cores, CPU µs/row (all but PostgreSQL)
and peak PSS, alternated in one sitting at load 5-9: that pipeline 10.1 and 1.71 GB, this one
7.2 and 1.23 GB; an earlier sitting (load 1-2): 12.1 / 1.7 GB, 8.2 / 1.33 GB, and the same
loaders as plain Ray actors without Ray Data 5.9 and 0.87 GB -- the difference is Ray Data's
own actors (stats, autoscaling coordinator, actor location tracker: ~2.1 CPU-s, ~305 MB) and
its pandas import in the driver and every worker. On the local Ray loadkit starts, those three
actors are now answered in the driver (:func:`_serve_ray_data_here`; 1.16 -> 0.85 GB at 1.8M rows).

Batch ids and ledger rows are the in-process executor's: both run ``read_unit`` -> ``parse`` ->
``BatchWriter.write``. Each unit load first reads the file's committed batches from the ledger
(one query), so the call Ray Data retries after a loader actor died skips what the dead attempt
committed and cuts its chunks at their edges (the batch size may have changed in between): never
a row twice.

Never a result lost either. A map_batches call is a Ray streaming generator task; when its actor
dies, Ray re-runs the call from its start on the restarted actor and drops, BY POSITION, the
outputs the dead attempt already handed over (Ray expects a replay to repeat itself). A retry
that only loads what is left yields fewer outputs, and its first ones -- new batches, maybe the
eof -- were dropped as "already seen": the run's summary came out short of its ledger (CI: 840
rows read, 1,160 in the ledger). So the retry first re-reports, from the ledger and in read order,
the batches this run committed in the unit since it was planned (``_replayed``), and its output
begins with the dead attempt's. The driver drops a result it already has (``Once``), and the
runner checks the run's counts against its ledger rows after every stream
(``PostgresSink.check_accounting``). With ``execute.channel``'s board kept in Ray's key-value
store, this is the only module that talks to Ray.
"""
from __future__ import annotations

import gc
import itertools
import logging
import os
import signal
import sys
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import pyarrow as pa
import ray
import ray._private.ray_constants as ray_constants
import ray.data

from loadkit.execute.parse import parse
from loadkit.plan import LoadPlan, TableSpec
from loadkit.postgres.ledger import Ledger, LedgerBatch
from loadkit.postgres.writer import BatchWriter, WriterSettings
from loadkit.records import BatchResult
from loadkit.source.read import Board, ReadUnit, read_unit, split_units

log = logging.getLogger("loadkit.execute.ray")


class RayExecutor:
    """Ray: loader actors (read + parse + write, one unit at a time each) on the cluster's cores."""

    name = "ray"
    unit_ends = False  # a split file's spans are units of their own, made here: the driver cannot count them

    def __init__(self, address: Optional[str], num_cpus: Optional[int], object_store_memory: Optional[int],
                 runtime_env: Optional[Dict[str, Any]], progress_bars: bool, worker_logs: bool = True) -> None:
        self._init = (address, num_cpus, object_store_memory, runtime_env, progress_bars)
        self._worker_logs = worker_logs

    def start(self) -> None:
        """Start or join Ray (see :func:`ensure_ray`)."""
        ensure_ray(*self._init, worker_logs=self._worker_logs)

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
    ~100 MB PSS measured), for a value that changes a few times a run."""

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
    """A loader actor's work (held by :class:`LoaderUDF`): read units in, BatchResults out, one unit at a time.

    A chunk is read, parsed and written before the next is read (see :func:`_pipeline`)."""

    def __init__(self, settings: WriterSettings, tables: Dict[str, TableSpec], period: str) -> None:
        self._settings, self._tables, self._period = settings, tables, period
        self._writer: Optional[BatchWriter] = None  # connected by the first load: its error is that call's
        self._raylet = os.getppid()  # a worker's parent is its node's raylet

    def load(self, unit: ReadUnit, board: Optional[Board]) -> Iterator[BatchResult]:
        """The unit's BatchResults, then its eof (or error) records, in read order.

        First one ledger query for the file (:func:`_ledger_now`): its committed ranges are skipped,
        so a retry after this actor died skips what the dead attempt committed. That retry also
        re-reports, where the dead attempt reported them, the batches this run committed in the
        unit since it was planned (:func:`_replayed`): Ray re-runs a retried generator task from
        the start and keeps only the outputs past those the dead attempt already handed over, by
        position, so the retry's outputs must begin with the dead attempt's (see :func:`_run`)."""
        if self._writer is None:
            self._writer = BatchWriter(self._settings)
        batches = _ledger_now(unit, self._settings, self._period)
        replay = _replayed(unit, batches, self._settings.run_id)
        if replay:
            log.info("unit retried: re-reporting %d batch(es) an earlier attempt committed",
                     sum(len(r) for r in replay.values()), extra={"table": unit.table.name, "file": unit.file.rel})
        now = replace(unit, committed=_ranges(batches))
        results = _pipeline(read_unit(now, board), self._tables, self._period, self._writer, self._orphaned)
        yield from _with_replay(results, replay)

    def _orphaned(self) -> None:
        """Exit at once if this worker's raylet is gone (the driver was killed with its local Ray).

        Ray's own check runs every second and a loader has a whole file to go: measured, orphans
        went on committing batches for ~2 s after a kill -9 of the driver, while the next run could
        already have read the ledger's committed ranges (and cut its chunks elsewhere). Checked
        before each batch, the orphan commits at most the batch in hand."""
        if os.getppid() != self._raylet:
            os._exit(1)


def _pipeline(chunks: Iterator[Any], tables: Dict[str, TableSpec], period: str, writer: BatchWriter,
              before_write: Callable[[], None] = lambda: None) -> Iterator[BatchResult]:
    """Parse and write each chunk in turn: one batch in hand at a time. ``before_write`` runs before
    each write (the loader's orphan check).

    Serial, not a parse thread feeding the write: measured on 1.8M rows, 2 cores, the same CPU per
    row (6.75 µs both), ~85 MB less PSS (two loaders), ~10% more wall under a shared load of 8-10;
    with one loader per core, another loader parses while this one waits on the server."""
    for chunk in chunks:
        batch = parse(chunk, tables, period)
        # No release_memory() here: the writer hands freed pages back once the process has grown by
        # writer.TRIM_GROWTH_BYTES (BatchWriter._finish), as in process. A trim after every chunk made the
        # next chunk fault the same pages in again, zeroed (perf on a loader actor: 19% of its samples in the
        # kernel, clear_page and page faults, against 8% in the in-process driver).
        before_write()
        yield writer.write(batch)
        del batch


def _ledger_now(unit: ReadUnit, settings: WriterSettings, period: str) -> List[LedgerBatch]:
    """The file's committed batches as the ledger has them now (one query, retried under the run's
    retry policy: a server restarting mid-load must not fail the unit, which would abort the whole
    Ray Data dataset)."""
    from loadkit.postgres import db
    from loadkit.resilience import retrying

    def read() -> List[LedgerBatch]:
        with db.transaction(settings.dsn) as cur:
            return Ledger(settings.ledger_schema).file_batches(cur, unit.table.name, period, unit.file.sha256)

    return retrying(settings.retry)(read)


def _ranges(batches: Sequence[LedgerBatch]) -> Tuple[Tuple[str, Tuple[Tuple[int, int], ...]], ...]:
    """``ReadUnit.committed`` from the file's batches: per member, the committed byte ranges in order.

    The reader skips them and cuts its chunks at their edges, so a retry never overlaps what a dead
    attempt committed, whatever the batch size is now. The ranges the unit was planned with (a
    previous run's) are among them: the ledger keeps them."""
    out: Dict[str, List[Tuple[int, int]]] = {}
    for b in batches:
        out.setdefault(b.member, []).append((b.start, b.end))
    return tuple((m, tuple(sorted(r))) for m, r in out.items())


def _replayed(unit: ReadUnit, batches: Sequence[LedgerBatch], run_id: str) -> Dict[str, List[BatchResult]]:
    """member -> the results an earlier attempt of this unit load reported (or would have), in read order.

    Those are the batches in the unit's span (a split file's other spans are other units: their
    batches start outside ``unit.span``) that the ranges the unit was planned with do not cover: only
    this unit writes its span in this run, and a first attempt finds none. ``run_id``'s are reported
    committed. Another run's is one committed after this run planned (a killed run's orphaned loader
    committing the batch in hand): the dead attempt reported it ``skipped`` where it reached it, so it
    is replayed skipped (counted nowhere but ``batches_skipped``); left out, the retry's outputs fell
    one short of the dead attempt's and Ray's by-position drop lost a batch of this run. Members are
    keyed in the order their first batch committed (the order they were read); batches by offset."""
    lo, hi = unit.span if unit.span is not None else (0, None)
    out: Dict[str, List[BatchResult]] = {}
    mine = sorted((b for b in batches if lo <= b.start and (hi is None or b.start < hi)
                   and not any(s <= b.start and b.end <= e for s, e in unit.ranges(b.member))),
                  key=lambda b: (b.committed_at, b.start))
    for b in mine:
        out.setdefault(b.member, [])
    for b in sorted(mine, key=lambda b: b.start):
        out[b.member].append(BatchResult(
            kind="data", status="committed" if b.run_id == run_id else "skipped", table_name=unit.table.name,
            file_sha=unit.file.sha256, file_ordinal=unit.file.ordinal, file_path=unit.file.rel, member=b.member,
            start=b.start, end=b.end,
            first_line=b.first_line, batch_id=b.batch_id, rows_in=b.rows_in, rows_loaded=b.rows_loaded,
            rows_rejected=b.rows_rejected, rows_coerced=b.rows_coerced, blank_lines=b.blank_lines,
            bytes=0 if unit.table.format == "parquet" else b.end - b.start,  # parquet offsets are rows
            writer=b.writer, attempts=b.attempts, finished_at=b.committed_at))
    return out


def _with_replay(results: Iterator[BatchResult], replay: Dict[str, List[BatchResult]]) -> Iterator[BatchResult]:
    """``results`` with each member's replayed batches put where the first attempt reported them: before the
    member's first record of this attempt (its chunks continue where the dead attempt's commits end); the
    member's eof counts them among its chunks; an error record (the file failed) comes after every replayed
    batch. The output is then the dead attempt's, extended: what :func:`_run` relies on."""
    pending = dict(replay)
    replayed: Dict[str, int] = {}
    for result in results:
        if result.kind == "error":
            for member, rows in pending.items():
                replayed[member] = len(rows)
                yield from rows
            pending.clear()
        elif result.member in pending:
            rows = pending.pop(result.member)
            replayed[result.member] = len(rows)
            yield from rows
        if result.kind == "eof" and replayed.get(result.member):
            result = replace(result, chunks=result.chunks + replayed[result.member])
        yield result
    for rows in pending.values():  # a member this attempt did not reach: reported all the same
        yield from rows


# ---------------------------------------------------------------- the driver


def loader_count(plan: LoadPlan, units: int, cluster_cpus: int) -> int:
    """Loader actors of a run: ``pool.parse_concurrency`` when set, else one per CPU of the cluster
    and at least ``pool.writers``; never more than ``units`` (an actor loads one unit at a time)
    and at least 1. Each holds ``pool.connections_per_writer`` connections: one COPY stream each."""
    wanted = plan.parse_concurrency if plan.parse_concurrency > 0 else max(plan.writers, cluster_cpus)
    return max(1, min(wanted, units))


class LoaderUDF:
    """map_batches UDF (an actor): a block of unit indices -> one result block per batch of each unit."""

    def __init__(self, settings: WriterSettings, tables: Dict[str, TableSpec], period: str,
                 units: Sequence[ReadUnit], board: Optional[Board]) -> None:
        self._loader = Loader(settings, tables, period)
        self._units, self._board = list(units), board
        # Everything this worker holds now (Ray, pyarrow, loadkit: its modules and this actor) lives as long as
        # the worker, and the cyclic garbage collector's full collections walked all of it again while the
        # batches' allocations kept triggering collections: ~13% of a loader actor's CPU samples in perf (1.8M
        # rows). Frozen, the collector skips those objects (gc.freeze: module state, never garbage). Machine
        # CPU of a 1.8M-row Ray run, alternated pairs: 10.80 -> 10.33 CPU-s (medians of 4), 11.05 -> 10.26
        # (of 3). The in-process driver showed no difference (a smaller heap), so only here.
        gc.freeze()

    def __call__(self, block: pa.Table) -> Iterator[pa.Table]:
        for index in block.column("unit").to_pylist():
            for result in self._loader.load(self._units[index], self._board):
                # the unit's index rides along (BatchResult.from_table ignores it): the driver tells a
                # unit's second eof/error record from another unit's (a split file's spans share a member)
                yield BatchResult.to_table([result]).append_column(_UNIT, pa.array([index], pa.int32()))


_UNIT = "unit"  # the column of a result block naming the unit it came from
_RESULT_BLOCK_BYTES = 1  # every yielded result its own block: Ray Data buffers up to this before emitting


def build_dataset(plan: LoadPlan, units: Sequence[ReadUnit], settings: WriterSettings,
                  board: Optional[Board] = None) -> Any:
    """The Ray Data dataset of a run: one row per read unit (largest first) -> map_batches(LoaderUDF)
    on a pool of loader actors, one unit per call, results streamed as one-row blocks."""
    tables = {t.name: replace(t, files=()) for t in plan.tables}
    ordered = sorted(split_units(units, plan.read_splits, plan.batch.read_block_bytes),
                     key=lambda u: -(u.span[1] - u.span[0] if u.span else u.file.size))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n = loader_count(plan, len(ordered), cpus)
    ray.data.DataContext.get_current().target_max_block_size = _RESULT_BLOCK_BYTES
    ds = ray.data.from_items([{"unit": i} for i in range(len(ordered))], override_num_blocks=len(ordered))
    # Ray Data's actor pool restarts a dead actor and retries its call (max_restarts and
    # max_task_retries -1): the retried load skips what the ledger committed (Loader.load).
    return ds.map_batches(LoaderUDF, fn_constructor_args=(settings, tables, plan.period, ordered, board),
                          batch_format="pyarrow", batch_size=1, zero_copy_batch=True,
                          compute=ray.data.ActorPoolStrategy(size=n, max_tasks_in_flight_per_actor=1),
                          num_cpus=min(1.0, cpus / n))


def _run(plan: LoadPlan, units: Sequence[ReadUnit], settings: WriterSettings,
         board: Optional[Board]) -> Iterator[BatchResult]:
    if not units:
        return
    blocks = build_dataset(plan, units, settings, board).iter_batches(batch_size=None, batch_format="pyarrow",
                                                                      prefetch_batches=0)
    once = Once()
    try:
        for block in blocks:
            for unit, result in zip(block.column(_UNIT).to_pylist(), BatchResult.from_table(block)):
                if once.first(unit, result):
                    yield result
    finally:
        getattr(blocks, "close", lambda: None)()  # stop Ray Data's executor on an early exit
        if once.dropped:
            log.debug("dropped %d result(s) already received (a retried loader call delivered from its start)",
                      once.dropped)


class Once:
    """The driver's guard against a result delivered twice: a batch by its id, a unit's eof or error
    record by (unit index, kind, member).

    A retried loader call (its actor died) is a Ray streaming generator re-run from its start: Ray
    keeps only the outputs past those the dead attempt already delivered, by position, and the
    retry replays the dead attempt's outputs first (``Loader.load``), so normally nothing arrives
    twice. Should a retry ever be delivered whole (as a fresh call), its first outputs repeat
    results already counted: dropped here, and counted in ``dropped``."""

    def __init__(self) -> None:
        self._seen: Set[Tuple[Any, ...]] = set()
        self.dropped = 0

    def first(self, unit: int, result: BatchResult) -> bool:
        """True the first time this result is seen (count it), False for a repeat (drop it)."""
        key = ("data", result.batch_id) if result.kind == "data" else (result.kind, unit, result.member)
        if key in self._seen:
            self.dropped += 1
            return False
        self._seen.add(key)
        return True


@contextmanager
def _keep_signal_handlers(hold: bool = True) -> Iterator[None]:
    """Start or join Ray with the driver's SIGINT/SIGTERM handlers kept: a signal that arrives meanwhile is
    held, and delivered to them once ``ray.init`` is done (a local Ray starts in seconds).

    ``ray.init`` sets SIGTERM handlers of its own (``sys.exit``, the head node's kill-and-exit) first thing:
    a SIGTERM while it started ended the run 'failed (bug): 15', exit 1. And a handler that raises there --
    theirs or the runner's StopRequested -- can land in an at-fork callback of a Ray process start
    (``subprocess`` with a ``preexec_fn`` runs logging's), where Python drops the exception with the logging
    module's lock still held: the run hung, its ledger row 'running'. So while Ray starts, Ray may not set
    a SIGTERM handler (``ray._private.utils.set_sigterm_handler``, the one call both make; checked against
    the pinned 2.60) and a signal is only recorded; it is raised again (``signal.raise_signal``) once the
    driver's handlers are back. ``hold=False`` (joining a cluster: no process is started, and ray.init
    retries an unreachable address for minutes, a held SIGTERM with it): the driver's handlers stay
    in place and stop the run at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import ray._private.utils as ray_utils

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    held: List[int] = []

    def held_now(signum: int, frame: Any) -> None:
        held.append(signum)

    set_sigterm_handler = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    if hold:
        for sig in saved:
            signal.signal(sig, held_now)
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = set_sigterm_handler
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if held:  # the first signal, now: the driver's handler stops the run (another handler does its own thing)
            signal.raise_signal(held[0])


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
               runtime_env: Optional[Dict[str, Any]], progress_bars: bool, worker_logs: bool = True) -> bool:
    """Start or join Ray unless this process already did. Returns True if this call started it.

    A local Ray starts without dashboard, autoscaler monitor and (unless ``worker_logs``) log
    monitor, with the raylet's memory monitor and metrics off (``_LOCAL_SYSTEM_CONFIG`` and
    :func:`_lean_local_node`), and Ray Data's three helper actors are answered in this process
    instead of starting (:func:`_serve_ray_data_here`). ``worker_logs``: the workers' output reaches the driver's log
    (``log_to_driver``); off, it stays in the session's log files. A joined cluster's workers
    stream theirs whatever ``worker_logs`` says (its log monitors are its own). ``progress_bars``
    is accepted for the executor interface: the driver draws its own progress."""
    started = not ray.is_initialized()
    if started:
        _init(address, num_cpus, object_store_memory, runtime_env, worker_logs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.enable_auto_log_stats = False  # the run's own metrics say it; the stats dump costs a GCS walk
    ctx.enable_get_object_locations_for_metrics = False
    ctx.execution_options.preserve_order = False
    ctx.max_errored_blocks = 0
    # Ray Data polls every task's USS on a thread of its own; loadkit's MemoryMonitor already
    # samples the whole process tree (one memory monitor per process).
    ctx.memory_usage_poll_interval_s = None
    return started


def _init(address: Optional[str], num_cpus: Optional[int], object_store_memory: Optional[int],
          runtime_env: Optional[Dict[str, Any]], worker_logs: bool) -> None:
    kwargs: Dict[str, Any] = dict(include_dashboard=False, log_to_driver=bool(address) or worker_logs,
                                  configure_logging=False)
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(num_cpus=num_cpus, object_store_memory=object_store_memory,
                      _system_config=dict(_LOCAL_SYSTEM_CONFIG))
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    with _keep_signal_handlers(hold=not address), (_lean_local_node(worker_logs) if not address else nullcontext()):
        ray.init(**kwargs)
    if not address:
        _serve_ray_data_here(ray.get_runtime_context().get_node_id())


@contextmanager
def _lean_local_node(log_monitor: bool) -> Iterator[None]:
    """While ray.init starts a local Ray: no autoscaler monitor, no dashboard head process, and a log
    monitor only if ``log_monitor`` (``env.worker_logs``: ~50-70 MB PSS and ~0.3 µs/row of CPU,
    measured; without it the workers' output is in the session's log files only).

    A local Ray is one node of fixed size: the autoscaler monitor (``monitor.py``, ~56 MB PSS
    measured) has no node to add or remove, and with ``include_dashboard=False`` the dashboard head
    still starts to serve usage stats alone (~83 MB, ~0.6 CPU-s). Ray Data's autoscaling
    coordinator talks to its own actor and the GCS, not to either. ``ray.init`` exposes none of
    these switches: ``no_monitor`` (``ray start --no-monitor``'s) and ``include_log_monitor`` are set
    on the node's parameters and the head's ``start_api_server`` is skipped while the node starts
    (Ray 2.60's ``Node``; tests/test_executors.py lists the processes and catches a Ray whose
    ``Node`` no longer has these)."""
    from ray._private import services
    from ray._private.node import Node

    node_init, start_api_server = Node.__init__, Node.start_api_server
    python_command = services._build_python_executable_command_memory_profileable
    stub = _agent_stub_command()

    def init(self: Any, ray_params: Any, *args: Any, **kw: Any) -> None:
        ray_params.no_monitor = True
        ray_params.include_log_monitor = log_monitor
        node_init(self, ray_params, *args, **kw)

    def agent_python(component: str, session_dir: str, *args: Any, **kw: Any) -> List[str]:
        if stub and component == ray_constants.PROCESS_TYPE_DASHBOARD_AGENT:
            return stub
        return python_command(component, session_dir, *args, **kw)

    Node.__init__ = init  # type: ignore[method-assign]
    Node.start_api_server = lambda self, **kw: None  # type: ignore[method-assign]
    services._build_python_executable_command_memory_profileable = agent_python
    try:
        yield
    finally:
        Node.__init__, Node.start_api_server = node_init, start_api_server  # type: ignore[method-assign]
        services._build_python_executable_command_memory_profileable = python_command


def _agent_stub_command() -> List[str]:
    """The command that starts :mod:`loadkit.execute.ray_agent_stub` in place of Ray's dashboard agent, or [] (keep
    Ray's) where the real agent has work: an install with the dashboard's dependencies (``ray[default]``: its
    modules load and serve metrics and logs), or a memory profile asked of it (Ray's memray switch).

    The raylet starts its dashboard agent as ``<this prefix> <ray's agent.py> --node-id=... --session-dir=...``
    (Ray 2.60's ``services.start_raylet``: the prefix is the Python command it builds for each component);
    the stub reads the flags it needs from there and the names of the ports to write (-1: no service, what
    the minimal agent writes) from ``--ports``."""
    from ray._private import services
    from ray._private.utils import get_dashboard_dependency_error
    from ray._raylet import (DASHBOARD_AGENT_LISTEN_PORT_NAME, METRICS_AGENT_PORT_NAME,  # type: ignore[attr-defined]
                             METRICS_EXPORT_PORT_NAME)

    if get_dashboard_dependency_error() is None or os.environ.get(services.RAY_MEMRAY_PROFILE_COMPONENT_ENV):
        return []
    ports = ",".join((METRICS_AGENT_PORT_NAME, METRICS_EXPORT_PORT_NAME, DASHBOARD_AGENT_LISTEN_PORT_NAME))
    return [sys.executable, "-u", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_agent_stub.py"),
            f"--ports={ports}"]


# ---------------------------------------------------------------- Ray Data's services on a local Ray, in the driver


_LOCAL_NODE: Optional[str] = None  # the node id of the local Ray this process started (see _serve_ray_data_here)


def _on_local_node() -> bool:
    """True while this process is connected to the local Ray it started (not a joined cluster, not after
    a ``ray.shutdown``)."""
    return _LOCAL_NODE is not None and ray.is_initialized() and ray.get_runtime_context().get_node_id() == _LOCAL_NODE


class _Calls:
    """An actor method's stand-in: ``.remote(*args)`` calls ``fn`` here."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.remote = fn


def _nothing(*args: Any, **kwargs: Any) -> None:
    """A fire-and-forget actor method's answer: nothing to do, None."""
    return None


class _StatsHere:
    """Ray Data's stats actor (``_StatsActor``) on a local Ray: its metrics and dataset registry feed the
    dashboard and Prometheus only, neither of which a local run has (``include_dashboard=False``,
    metrics collection off), so those calls do nothing; dataset ids come from a counter, as the
    actor's do (one driver per local Ray: unique)."""

    update_execution_metrics = update_iteration_metrics = register_dataset = _Calls(_nothing)

    def __init__(self) -> None:
        ids = itertools.count()
        self.gen_dataset_id = _Calls(lambda: ray.put(str(next(ids))))  # Ray Data ray.get()s it


class _LocationsHere:
    """Ray Data's actor location tracker (``ActorLocationTracker``) on a local Ray: every actor is on its
    one node. A loader actor reports its node at start (``update_actor_location``: nothing to keep);
    the actor pool's lookup (``get_actor_locations``, replaced by :func:`_no_locations`) finds nothing
    and keeps the node each actor reported when it became ready -- the same node. Picklable: it is
    passed to every loader actor."""

    update_actor_location = _Calls(_nothing)


def _no_locations(logical_actor_ids: Tuple[str, ...]) -> Dict[str, str]:
    return {}


class _NodeShare:
    """Ray Data's autoscaling coordinator (``_AutoscalingCoordinatorActor``) on a local Ray, answered in the
    driver: one fixed node (``node``: its resources), no autoscaler to ask. It reserves as the actor does
    on one node: live requests (a running dataset's cluster autoscaler each; expired or cancelled ones
    drop out) in the order they were first made get their explicit bundles where they still fit, then
    each requester asking the leftover of a resource type (``request_remaining``: CPU, GPU, memory,
    object store) gets an equal whole share of what is left of it. A lone dataset is reserved the
    whole node. ``request_resources``, ``cancel_request`` and ``get_reserved_resources`` are what
    ``DefaultAutoscalingCoordinator`` calls (``.remote(...)``; the reservation as an ObjectRef)."""

    def __init__(self, node_id: str, node: Dict[str, float], clock: Callable[[], float] = time.monotonic) -> None:
        self._node_id, self._node, self._clock = node_id, node, clock
        # requester -> (bundles, types of the leftover, expiry); dict order = first request
        self._requests: Dict[str, Tuple[List[Dict[str, float]], frozenset, float]] = {}
        self._lock = threading.Lock()
        self.request_resources, self.cancel_request = _Calls(self._request), _Calls(self._cancel)
        self.get_reserved_resources = _Calls(lambda requester_id: ray.put(self.reserved(requester_id)))

    def _request(self, requester_id: str, resources: Sequence[Dict[str, float]] = (), expire_after_s: float = 0.0,
                 request_remaining: Optional[Sequence[str]] = None, **kwargs: Any) -> None:
        with self._lock:
            self._requests[requester_id] = ([dict(b) for b in resources], frozenset(request_remaining or ()),
                                            self._clock() + expire_after_s)

    def _cancel(self, requester_id: str) -> None:
        with self._lock:
            self._requests.pop(requester_id, None)

    def reserved(self, requester_id: str) -> Dict[str, Dict[str, float]]:
        """node id -> resources reserved to ``requester_id`` now (empty: no live request)."""
        with self._lock:
            now = self._clock()
            self._requests = {r: v for r, v in self._requests.items() if v[2] > now}
            if requester_id not in self._requests:
                return {}
            left = dict(self._node)
            mine: Dict[str, float] = {}
            for requester, (bundles, _, _) in self._requests.items():
                for bundle in bundles:
                    if all(left.get(k, 0) >= v for k, v in bundle.items()):
                        for k, v in bundle.items():
                            left[k] = left.get(k, 0) - v
                            if requester == requester_id and v:
                                mine[k] = mine.get(k, 0) + v
            for kind in self._requests[requester_id][1]:
                share = left.get(kind, 0) // sum(kind in types for _, types, _ in self._requests.values())
                if share > 0:
                    mine[kind] = mine.get(kind, 0) + share
            return {self._node_id: mine}


_STATS: Optional[_StatsHere] = None
_SHARE: Optional[_NodeShare] = None


def _serve_ray_data_here(node_id: str) -> None:
    """Answer Ray Data's three cluster-wide helper actors in the driver while it runs on the local Ray it
    started (``node_id``): the stats actor, the actor location tracker and the autoscaling coordinator.

    Ray Data 2.60 starts each as a detached actor, a worker process of its own that imports Ray Data
    and pandas: ~310 MB PSS of a local run's ~1.1 GB and ~3.5 CPU-s (measured, 1.8M rows, 2 cores),
    for services a one-node Ray does not use -- metrics for a dashboard it has not got, locations on
    its one node, and resources no autoscaler can add (:class:`_StatsHere`, :class:`_LocationsHere`,
    :class:`_NodeShare`). Ray Data looks each up through a module-level ``get_or_create_*`` function
    at the time of use; those names are rebound here, once per process, to functions that answer in
    the driver while :func:`_on_local_node` holds and otherwise call Ray Data's own (a joined cluster
    keeps its actors). Checked against the pinned 2.60; tests/test_executors.py lists the named actors
    after an actor-pool dataset on a local Ray and catches a Ray Data that looks them up elsewhere."""
    global _LOCAL_NODE, _STATS, _SHARE
    import ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator as coordinator
    import ray.data._internal.execution.operators.actor_pool_map_operator as actor_pool
    import ray.data._internal.stats as stats

    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
    if node is None:  # not expected of the node this process just started: Ray Data keeps its own actors
        log.warning("local Ray node %s not among ray.nodes(): Ray Data starts its helper actors", node_id)
        return
    _LOCAL_NODE, _STATS, _SHARE = node_id, _StatsHere(), _NodeShare(node_id, dict(node["Resources"]))
    if getattr(stats.get_or_create_stats_actor, "_loadkit", False):
        return  # rebound by an earlier local Ray of this process: the functions read the globals above

    def here(original: Callable[..., Any], local: Callable[..., Any]) -> Callable[..., Any]:
        def pick(*args: Any, **kwargs: Any) -> Any:
            return local(*args, **kwargs) if _on_local_node() else original(*args, **kwargs)
        pick._loadkit = True  # type: ignore[attr-defined]
        return pick

    stats.get_or_create_stats_actor = here(stats.get_or_create_stats_actor, lambda: _STATS)
    actor_pool.get_or_create_actor_location_tracker = here(actor_pool.get_or_create_actor_location_tracker,
                                                           lambda: _LocationsHere())
    actor_pool.get_actor_locations = here(actor_pool.get_actor_locations, _no_locations)
    coordinator.get_or_create_autoscaling_coordinator = here(coordinator.get_or_create_autoscaling_coordinator,
                                                             lambda: _SHARE)
