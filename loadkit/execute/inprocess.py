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
from typing import Any, Iterator, List, Sequence

from loadkit.execute.channel import LocalSizeChannel
from loadkit.execute.parse import parse
from loadkit.monitor import release_memory
from loadkit.plan import LoadPlan
from loadkit.postgres.db import cancel_backends
from loadkit.postgres.writer import BatchWriter, WriterSettings
from loadkit.records import BatchResult
from loadkit.source.read import Board, ReadUnit, read_unit

log = logging.getLogger("loadkit.execute.inprocess")


class InProcessExecutor:
    """One parse thread feeding ``pool.writers`` writer threads (see :meth:`run`)."""

    name = "inprocess"

    def start(self) -> None:
        """Nothing to start: the stages run on threads of this process."""

    def size_channel(self, rows: int) -> LocalSizeChannel:
        return LocalSizeChannel(rows)

    def run(self, plan: LoadPlan, units: Sequence[ReadUnit], settings: WriterSettings,
            board: Board) -> Iterator[BatchResult]:
        """Yield each batch's result as a writer thread finishes it.

        pyarrow's parser and ADBC's COPY release the GIL, so parsing, encoding and the server's
        work overlap. A writer encodes a batch and then waits for the server, so two writer
        threads keep both busy. Parsed batches wait in a queue of one per writer (bounded
        memory); results come back to the caller's thread. Closing the iterator stops the
        threads (the batch in hand commits or rolls back, both safe; a stuck statement is cancelled).
        """
        return _run(plan, units, settings, board)


def _run(plan: LoadPlan, units: Sequence[ReadUnit], settings: WriterSettings,
         board: Board) -> Iterator[BatchResult]:
    tables = {t.name: replace(t, files=()) for t in plan.tables}
    parsed: "queue.Queue[Any]" = queue.Queue(maxsize=plan.writers)
    results: "queue.Queue[Any]" = queue.Queue()
    stop = threading.Event()
    writers = _open_writers(settings, plan.writers)  # connect up front, in this thread

    def produce() -> None:
        for unit in units:
            for chunk in read_unit(unit, board):
                batch = parse(chunk, tables, plan.period)
                release_memory()
                if not _offer(parsed, batch, stop):
                    return
        for _ in writers:  # one end marker per writer
            _offer(parsed, None, stop)

    def write(writer: BatchWriter) -> None:
        while (item := _take(parsed, stop)) is not None:
            results.put(writer.write(item))
        results.put(None)

    threads = [threading.Thread(target=_reporting(produce, results), name="loadkit-parse", daemon=True)]
    threads += [threading.Thread(target=_reporting(write, results, w), name=f"loadkit-write-{i}", daemon=True)
                for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    try:
        done = 0
        while done < len(writers):
            item = results.get()
            if isinstance(item, _Failed):
                raise item.error
            if item is None:
                done += 1
                continue
            yield item
    finally:
        stop.set()  # threads finish the batch in hand (committed or rolled back, both safe) and leave
        _join(threads, _STOP_GRACE_S)
        if any(t.is_alive() for t in threads[1:]):
            # A writer is inside a statement (a COPY waiting on a lock, a slow server): cancel this
            # run's statements so it rolls back and leaves now, not when the lock is released.
            cancel_backends(settings.dsn, plan.run_id)
            _join(threads, _STOP_GRACE_S)
        for t, w in zip(threads[1:], writers, strict=True):
            if t.is_alive():  # still stuck (server unreachable): a daemon thread; its pool closes with it
                log.warning("writer thread %s did not stop in time; leaving it behind", t.name)
            else:
                w.close()


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


