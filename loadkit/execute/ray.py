"""The Ray Data executor: a LoadPlan compiled into a Ray Data pipeline, its results streamed back.

    read (one task per source file or span: source.read.read_unit, chunks as they decompress)
      -> parse (map_batches(parse_block), fused with the read by Ray)
      -> write (map_batches(WriterActor): a pool of BatchWriter actors, COPY + ledger per batch)
      -> per-batch BatchResults streamed to the driver

Blocks are one chunk each, so memory is bounded by chunk size times the number of blocks Ray
keeps in flight (its streaming executor applies backpressure), never by file size. This is the
only module that converts records to Arrow blocks and back (``loadkit.records``: read task ->
parse -> writer -> driver), and with ``execute.channel``'s board kept in Ray's key-value store,
the only one that talks to Ray.
"""
from __future__ import annotations

import functools
import logging
import signal
import threading
import uuid
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import ray
import ray.data

from loadkit.execute.parse import parse
from loadkit.monitor import release_memory
from loadkit.plan import LoadPlan, TableSpec
from loadkit.postgres.writer import BatchWriter, WriterSettings
from loadkit.records import BatchResult, Chunk, ParsedBatch
from loadkit.source.read import Board, ReadUnit, read_unit, split_units

log = logging.getLogger("loadkit.execute.ray")

# Writers wait on the server, not the CPU. Any CPU they reserve comes out of Ray Data's task
# budget: at 0.25 each, 2 cores ran one parse task at a time (the rest 'backpressured').
_WRITER_CPUS = 0.0
_BLOCK_BYTES = 1 << 20  # Ray Data block target: below one chunk, so blocks are single chunks


class RayExecutor:
    """Ray Data: read/parse tasks on every core of the cluster, a pool of writer actors."""

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
        """Run the pipeline; yield per-batch results as writers finish them. Closing the iterator
        stops Ray Data's executor. ``board`` (RaySizeChannel.board) lets the read tasks follow the
        driver's batch size."""
        return _run(plan, units, settings, board)


def _run(plan: LoadPlan, units: Sequence[ReadUnit], settings: WriterSettings,
         board: Optional[Board]) -> Iterator[BatchResult]:
    if not units:
        return
    ds = build_dataset(plan, units, settings, board)
    blocks = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    try:
        for block in blocks:
            yield from BatchResult.from_table(block)
    finally:
        getattr(blocks, "close", lambda: None)()  # stop Ray Data's executor on an early exit


# ---------------------------------------------------------------- the batch-size board in Ray's KV store


class KVBoard:
    """A read task's end of the board (a ``source.read.Board``), kept in the GCS key-value store.

    The driver writes the wanted rows per batch under ``<prefix>rows``; each read task writes its
    own running totals (chunks handed downstream, seconds spent) under ``<prefix>task:<uuid>``,
    which the driver sums. No actor: an actor is a worker process of its own (~1 CPU-s to start,
    ~100 MB PSS measured, notes/ray.md), for a value that changes a few times a run."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._key: Optional[bytes] = None  # this task's totals (set on first poll, in the task)
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


# ---------------------------------------------------------------- the UDFs (records <-> Arrow blocks)


def _read_blocks(unit: ReadUnit, board: Optional[Board]) -> Iterator[pa.Table]:
    """The Ray read task: read_unit's chunks as one-chunk blocks."""
    for chunk in read_unit(unit, board):
        yield Chunk.to_table([chunk])


def parse_block(block: pa.Table, tables: Dict[str, TableSpec], period: str) -> pa.Table:
    """map_batches UDF: a block of Chunks -> a block of ParsedBatches (rows and rejects as IPC bytes)."""
    out = ParsedBatch.to_table([parse(c, tables, period) for c in Chunk.from_table(block)])
    release_memory()
    return out


class WriterActor:
    """map_batches UDF (an actor): a block of ParsedBatches -> a block of BatchResults via a BatchWriter."""

    def __init__(self, settings: WriterSettings) -> None:
        self.writer = BatchWriter(settings)

    def __call__(self, block: pa.Table) -> pa.Table:
        out = BatchResult.to_table([self.writer.write(b) for b in ParsedBatch.from_table(block)])
        release_memory()  # the batch's rows and COPY buffers: a writer kept ~100 MB more without it
        return out


# ---------------------------------------------------------------- build and run


def build_dataset(plan: LoadPlan, units: Sequence[ReadUnit], settings: WriterSettings,
                  board: Optional[Board] = None) -> Any:
    """The Ray Data dataset of a run: read -> parse -> write, one block per chunk."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class SourceDatasource(Datasource):
        def __init__(self, units: Sequence[ReadUnit]) -> None:
            super().__init__()
            self._units = list(units)

        def estimate_inmemory_data_size(self) -> Optional[int]:
            return sum(u.file.size for u in self._units)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                           data_context: Any = None) -> List[ReadTask]:
            return [
                ReadTask(functools.partial(_read_blocks, u, board),
                         BlockMetadata(num_rows=None, size_bytes=u.file.size, input_files=(u.file.path,),
                                       exec_stats=None),
                         schema=Chunk.schema())
                for u in self._units
            ]

    tables = {t.name: replace(t, files=()) for t in plan.tables}
    units = split_units(units, plan.read_splits, plan.batch.read_block_bytes)
    # Ray buffers a task's yielded tables into blocks of up to target_max_block_size (128 MB):
    # a whole small file became one block, parsed and written by one writer, results only at
    # its end. A chunk is one batch of a few MB, so 1 MB makes every chunk its own block.
    ray.data.DataContext.get_current().target_max_block_size = _BLOCK_BYTES
    ds = ray.data.read_datasource(SourceDatasource(units), override_num_blocks=max(1, len(units)))
    # A plain function (tasks, not actors): Ray fuses it into the read task, so a chunk is
    # parsed in the process that decompressed it and never crosses the object store raw.
    # Ray Data retries a read/parse task lost with its worker (max_retries=-1 by default); batches
    # it already handed to writers are skipped by their ledger ids, so a rerun never duplicates.
    parse_args: Dict[str, Any] = dict(batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                                      fn_kwargs={"tables": tables, "period": plan.period})
    if plan.parse_concurrency:
        parse_args["compute"] = ray.data.TaskPoolStrategy(size=plan.parse_concurrency)
    ds = ds.map_batches(parse_block, **parse_args)
    # Writers hold connections, not CPU (see _WRITER_CPUS): the cores stay with read/parse.
    return ds.map_batches(
        WriterActor,
        fn_constructor_args=(settings,),
        batch_format="pyarrow",
        batch_size=1,
        # One batch in flight per writer: a batch is seconds of COPY, so queueing several on the
        # first actor that is ready (Ray's default, 4) left the others idle on one-file loads.
        compute=ray.data.ActorPoolStrategy(size=plan.writers, max_tasks_in_flight_per_actor=1),
        num_cpus=_WRITER_CPUS,
        # A killed writer restarts and its in-flight batch is retried (same batch id, so the ledger
        # decides committed-or-not): Ray Data's actor-pool defaults max_restarts=-1 and
        # max_task_retries=-1 (passing them again is deprecated); tests/test_faults.py kills one.
    )


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
    (``_LOCAL_SYSTEM_CONFIG``); worker output still reaches the driver's log (``log_to_driver``)."""
    started = False
    if not ray.is_initialized():
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
        started = True
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
