"""The in-process executor: the read, parse and write stages on threads of the driver, no Ray.

Where Ray's start-up (~seconds) and its worker processes would cost more than they give (a
small input, a small machine: ``execute.choose_executor``), the same ``read_unit`` -> ``parse``
-> ``BatchWriter.write`` run here. Same batch ids and ledger rows as the Ray executor, so a run
or a resume may switch executors freely. This module never imports Ray (import-linter contract).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence

from loadkit.execute.channel import LocalSizeChannel
from loadkit.execute.parse import parse
from loadkit.plan import LoadPlan
from loadkit.postgres.db import cancel_backends
from loadkit.postgres import keyhints
from loadkit.postgres.writer import BatchWriter, WriterSettings
from loadkit.records import BatchResult
from loadkit.source.files import usable_cpus
from loadkit.source.read import Board, ReadUnit, read_unit

log = logging.getLogger("loadkit.execute.inprocess")


class InProcessExecutor:
    """A read thread feeding ``pool.parse_threads`` parse threads feeding ``pool.writers`` writer threads."""

    name = "inprocess"
    unit_ends = True  # _in_file_order holds a unit's eof/error records back until its batches came

    def start(self) -> None:
        """Nothing to start: the stages run on threads of this process."""

    def size_channel(self, rows: int) -> LocalSizeChannel:
        return LocalSizeChannel(rows)

    def run(self, plan: LoadPlan, units: Sequence[ReadUnit], settings: WriterSettings,
            board: Board) -> Iterator[BatchResult]:
        """Yield each batch's result as a writer thread finishes it.

        One thread reads the units in order (decompression, record cutting: ``read_unit``);
        ``pool.parse_threads`` threads parse its chunks (pyarrow's CSV parser and compute release
        the GIL, so they run on several cores at once; with one, the read thread parses its
        chunks itself); ``pool.writers`` threads commit them (a
        writer encodes a batch and then waits for the server, so two keep both busy). Bounded
        memory: one chunk waits per parse thread and one parsed batch per writer, besides the one
        each thread holds. Batches finish out of order (each is its own transaction and its id
        comes from its byte range, not its position), but a member's eof (or a file's error)
        comes back only after every batch its read unit issued before it. Results come back to
        the caller's thread. Closing the iterator stops the threads (the batch in hand commits or
        rolls back, both safe; a stuck statement is cancelled).

        Units are read table by table, the table with the most source bytes first (``largest_first``):
        a table whose units all ended can publish while the others still stream (``Supervisor.stream``'s
        ``on_table_read``), and the largest table's publish is the longest.
        """
        return _run(plan, largest_first(units), settings, board)


def _run(plan: LoadPlan, units: Sequence[ReadUnit], settings: WriterSettings,
         board: Board) -> Iterator[BatchResult]:
    tables = {t.name: replace(t, files=()) for t in plan.tables}
    parsers = parse_threads(plan.parse_threads, plan.env.num_cpus)  # env.num_cpus pins in-process runs too
    # One parse thread: the read thread parses its own chunks (a hand-off to a second thread cost
    # ~0.4 µs/row and gained nothing, see parse_threads); more: that many threads behind it.
    spawned = 0 if parsers == 1 else parsers
    # Bounded memory: one chunk waiting per parse thread, one parsed batch waiting per writer,
    # besides the one each thread holds.
    chunks: "queue.Queue[Any]" = queue.Queue(maxsize=max(1, spawned))
    parsed: "queue.Queue[Any]" = queue.Queue(maxsize=plan.writers)
    results: "queue.Queue[Any]" = queue.Queue()
    stop = threading.Event()
    writers = _open_writers(settings, plan.writers)  # connect up front, in this thread
    parsers_left = [spawned]
    parsers_lock = threading.Lock()

    def parse_one(item: _Item) -> bool:
        """Parse a chunk and queue it for the writers; False once the consumer has stopped."""
        # No release_memory() here: a writer hands freed pages back for this whole process once its
        # RSS has grown by writer.TRIM_GROWTH_BYTES (BatchWriter._finish). Trimming per batch made the
        # allocators fault the same pages in again: a second trim per batch +0.15 CPU µs/row
        # and the writers' own per-batch trim +0.09 (README, "Where the time goes").
        batch = parse(item.record, tables, plan.period)
        return _offer(parsed, replace(item, record=batch), stop)

    def end_writers() -> None:
        for _ in writers:  # one end marker per writer
            _offer(parsed, None, stop)

    def read() -> None:
        for index, unit in enumerate(units):
            issued = 0  # data chunks of this unit handed to the parse stage so far
            for chunk in read_unit(unit, board):
                if chunk.kind == "data":
                    issued += 1
                item = _Item(index, chunk.kind != "data", issued, chunk)
                if not (_offer(chunks, item, stop) if spawned else parse_one(item)):
                    return
        if not spawned:
            end_writers()
        for _ in range(spawned):  # one end marker per parse thread
            _offer(chunks, None, stop)

    def parse_loop() -> None:
        while (item := _take(chunks, stop)) is not None:
            if not parse_one(item):
                return
        with parsers_lock:  # the last parse thread out ends the writers' queue
            parsers_left[0] -= 1
            last = parsers_left[0] == 0
        if last and not stop.is_set():
            end_writers()

    hints = keyhints.active(plan.run_id)  # merge's duplicate-key hints, kept for the publish

    def write(writer: BatchWriter) -> None:
        while (item := _take(parsed, stop)) is not None:
            result = writer.write(item.record)
            if hints is not None and result.kind == "data" and result.status in ("committed", "skipped"):
                hints.add(item.record.table_name, item.record.batch_id, item.record.rows)  # in staging now
            results.put(replace(item, record=result))
        results.put(None)

    threads = [threading.Thread(target=_reporting(read, results), name="loadkit-read", daemon=True)]
    threads += [threading.Thread(target=_reporting(parse_loop, results), name=f"loadkit-parse-{i}", daemon=True)
                for i in range(spawned)]
    writer_threads = [threading.Thread(target=_reporting(write, results, w), name=f"loadkit-write-{i}", daemon=True)
                      for i, w in enumerate(writers)]
    threads += writer_threads
    for t in threads:
        t.start()
    try:
        yield from _in_file_order(results, len(writers))
    finally:
        stop.set()  # threads finish the batch in hand (committed or rolled back, both safe) and leave
        _join(threads, _STOP_GRACE_S)
        if any(t.is_alive() for t in writer_threads):
            # A writer is inside a statement (a COPY waiting on a lock, a slow server): cancel this
            # run's statements so it rolls back and leaves now, not when the lock is released.
            cancel_backends(settings.dsn, plan.run_id)
            _join(threads, _STOP_GRACE_S)
        for t, w in zip(writer_threads, writers, strict=True):
            if t.is_alive():  # still stuck (server unreachable): a daemon thread; its pool closes with it
                log.warning("writer thread %s did not stop in time; leaving it behind", t.name)
            else:
                w.close()


def largest_first(units: Sequence[ReadUnit]) -> List[ReadUnit]:
    """``units`` grouped by table, the tables with the most source bytes first (ties: plan order), each
    table's units in their own order (files in plan order).

    Read this way, a table's stream ends while the others' still runs, so its publish -- key builds and
    ANALYZE, seconds of one core for millions of rows -- overlaps their reading instead of following it;
    the largest table's publish is the longest (longest-processing-time-first scheduling)."""
    size: Dict[str, int] = {}
    first: Dict[str, int] = {}
    for i, unit in enumerate(units):
        size[unit.table.name] = size.get(unit.table.name, 0) + unit.file.size
        first.setdefault(unit.table.name, i)
    return sorted(units, key=lambda u: (-size[u.table.name], first[u.table.name]))


def parse_threads(configured: int, cpus: Optional[int] = None) -> int:
    """Parse threads for ``pool.parse_threads``: the configured count, or for 0 one per two cores
    (``cpus``: ``env.num_cpus`` when set, else ``os.sched_getaffinity``), at least 1 and at most
    _AUTO_PARSE_THREADS_MAX.

    Why one per two cores: parsing is about a third of a row's CPU (client CPU µs/row on the benchmark
    month: read 0.9, parse 2.3, write 2.1; the server's COPY ~2), so half the cores for parsing
    leaves the rest to the read thread, the writers and the server. On 2 cores a second parse thread
    cost +0.4 µs/row and gained no wall time (every core already busy); see README, "Benchmark results".
    Measured again after the C scanner and cheaper typing (read + parse 0.68 µs/row, backends 1.16):
    +0.04 µs/row, no wall gain, and the single read thread is asleep only 16% of the stream, blocked
    on full writer queues, so it is not what the run waits for (``benchmarks.pipeline_timeline
    --variant base= --variant p2=pool.parse_threads=2 --reps 3``, README "Where the time goes")."""
    if configured > 0:
        return configured
    if cpus is None:
        cpus = usable_cpus()
    return max(1, min(cpus // 2, _AUTO_PARSE_THREADS_MAX))


_AUTO_PARSE_THREADS_MAX = 4  # one read thread (~0.9 µs/row) feeds them: past ~4 it is the bottleneck


@dataclass(frozen=True)
class _Item:
    """A record on its way through the stages, tagged with its read unit (see _in_file_order)."""

    unit: int  # index of its read unit
    mark: bool  # an eof/error record (it closes the data chunks its unit issued before it)
    issued: int  # data chunks its unit had issued up to and including this record
    record: Any  # Chunk, then ParsedBatch, then BatchResult


def _in_file_order(results: "queue.Queue[Any]", writers: int) -> Iterator[BatchResult]:
    """The writers' results, each eof/error record held back until every data batch its read
    unit issued before it has been yielded.

    Parse threads and writers finish batches out of order; the driver counts a member as read
    (RunMetrics ``ended``) on its eof, so the eof must come after that member's batches."""
    done = 0
    delivered: Dict[int, int] = {}  # unit -> data results yielded
    held: Dict[int, List[_Item]] = {}  # unit -> eof/error records waiting for their batches
    while done < writers:
        item = results.get()
        if isinstance(item, _Failed):
            raise item.error
        if item is None:
            done += 1
            continue
        if item.mark:
            held.setdefault(item.unit, []).append(item)
        else:
            delivered[item.unit] = delivered.get(item.unit, 0) + 1
            yield item.record
        waiting = held.get(item.unit)
        if waiting:
            ready = sorted((m for m in waiting if m.issued <= delivered.get(item.unit, 0)), key=lambda m: m.issued)
            for mark in ready:
                waiting.remove(mark)
                yield mark.record
    for waiting in held.values():  # every batch came back (the writers ended), so none can be left
        for mark in waiting:
            yield mark.record


_STOP_GRACE_S = 0.25  # per stage of a stop: threads leaving by themselves, then after a cancel


def _join(threads: Sequence[threading.Thread], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))


def _open_writers(settings: WriterSettings, count: int) -> List[BatchWriter]:
    """``count`` writers, or none: a failed connect closes the ones already open."""
    writers: List[BatchWriter] = []
    try:
        for _ in range(count):
            writers.append(BatchWriter(settings))
    except BaseException:
        for w in writers:
            w.close()
        raise
    return writers


@dataclass(frozen=True)
class _Failed:
    error: BaseException


def _reporting(fn: Any, results: "queue.Queue[Any]", *args: Any) -> Any:
    """Run fn(*args) on a thread; its exception goes to the caller's thread through results."""
    def run() -> None:
        try:
            fn(*args)
        except BaseException as exc:
            results.put(_Failed(exc))
    return run


def _offer(q: "queue.Queue[Any]", item: Any, stop: threading.Event) -> bool:
    """Put with backpressure, giving up once the consumer has stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _take(q: "queue.Queue[Any]", stop: threading.Event) -> Any:
    """Next item, or None once the consumer has stopped."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            continue
    return None


