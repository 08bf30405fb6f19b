"""Compile a LoadPlan into a Ray Data pipeline and stream its results back.

    read (one task per source file, record-aligned chunks as they decompress)
      -> parse/validate/transform (map_batches, fused with the read by Ray)
      -> BatchWriter actor pool (COPY + ledger per batch, one transaction each)
      -> per-batch results streamed to the driver

Blocks are one chunk each, so memory is bounded by chunk size times the number of
blocks Ray keeps in flight (its streaming executor applies backpressure), never by
file size. Source errors become 'error' records for their file instead of failing
the whole dataset, so the other files keep loading.
"""
from __future__ import annotations

import functools
import logging
import queue
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import pyarrow as pa

from loadkit.source import scanner
from loadkit.source import files
from loadkit.postgres.db import cancel_backends
from loadkit.errors import SourceDataError
from loadkit.monitor import release_memory
from loadkit.plan import FileSpec, LoadPlan, TableSpec, batch_id
from loadkit.transform import parse_chunk, parse_parquet_batch
from loadkit.postgres.writer import BATCH_COUNT_FIELDS, BatchWriter, TableTarget, WriterSettings, ipc_bytes

log = logging.getLogger("loadkit.execute.pipeline")

_SAMPLE_BYTES = 256 * 1024
_POLL_S = 0.5  # how often a read task asks the driver for the current batch size
# Writers wait on the server, not the CPU. Any CPU they reserve comes out of Ray Data's task
# budget: at 0.25 each, 2 cores ran one parse task at a time (the rest 'backpressured').
_WRITER_CPUS = 0.0
_BLOCK_BYTES = 1 << 20  # Ray Data block target: below one chunk, so blocks are single chunks

# Where a record comes from: shared by the raw chunks and the parsed batches.
_SOURCE_FIELDS = [
    ("kind", pa.string()),  # data|eof|error
    ("table_name", pa.string()),
    ("file_sha", pa.string()),
    ("file_ordinal", pa.int32()),
    ("file_path", pa.string()),
    ("member", pa.string()),
    ("start", pa.int64()),
    ("end", pa.int64()),
    ("first_line", pa.int64()),
]

CHUNK_SCHEMA = pa.schema(_SOURCE_FIELDS + [
    ("header", pa.list_(pa.string())),
    ("skip_header", pa.bool_()),
    ("scan", pa.string()),  # the reader's scanner.Summary of data (encoded), so parse need not rescan
    ("data", pa.large_binary()),
    ("message", pa.string()),
])

PARSED_SCHEMA = pa.schema(_SOURCE_FIELDS + [("batch_id", pa.int64()), ("rows_in", pa.int64())]
                          + BATCH_COUNT_FIELDS + [
    ("rows", pa.large_binary()),
    ("rejects", pa.large_binary()),
    ("message", pa.string()),
])


@dataclass(frozen=True)
class ReadUnit:
    """One source file of one table, with the byte ranges a previous run already committed."""

    table: TableSpec
    file: FileSpec
    committed: Tuple[Tuple[str, Tuple[Tuple[int, int], ...]], ...]
    batch_rows: int
    span: Optional[Tuple[int, int]] = None  # [lo, hi) bytes of a split file, widened to record boundaries

    def ranges(self, member: str) -> Tuple[Tuple[int, int], ...]:
        for m, r in self.committed:
            if m == member:
                return r
        return ()


# ---------------------------------------------------------------- read


def _record(unit: ReadUnit, kind: str, member: str = "", message: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
    row: Dict[str, Any] = {f.name: None for f in CHUNK_SCHEMA}
    row.update(kind=kind, table_name=unit.table.name, file_sha=unit.file.sha256, file_ordinal=unit.file.ordinal,
               file_path=unit.file.rel, member=member, message=message, skip_header=False)
    row.update(extra)
    return row


def _block(rows: List[Dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA)


def _fields_of_first_record(data: bytes, table: TableSpec) -> Tuple[List[str], Optional[str]]:
    """The first record's fields as the record scanner reads them (any field length, BOM dropped),
    or why it cannot be read."""
    d = table.dialect
    return scanner.first_record_fields(data.replace(b"\x00", b""), scanner.Syntax.of(d), d.encoding)


def _data_records(sample: bytes, table: TableSpec) -> int:
    """Non-blank records in a whole (short) member, header excluded."""
    sc = scanner.scan(sample, scanner.Syntax.of(table.dialect), final=True)
    blank = sum(1 for i in range(len(sc)) if sample[slice(*sc.span(i))] in (b"\n", b"\r\n"))
    return len(sc) - blank - int(table.dialect.header)


def _complete_head(sample: bytes, stream: Any, table: TableSpec) -> bytes:
    """Read on until the sample holds the first record whole (a header or first value may be longer
    than the sample), up to max_record_bytes; the caller's stream continues after the result."""
    d = table.dialect
    syn = scanner.Syntax.of(d)
    while len(sample) < syn.max_record_bytes + _SAMPLE_BYTES:
        skip = scanner.skip_lines(sample, d.skip_lines)
        if len(scanner.scan(sample[skip:], syn, final=False)):
            break
        more = stream.read(max(_SAMPLE_BYTES, len(sample)))
        if not more:
            break
        sample += more
    return sample


def _check_layout(data: bytes, table: TableSpec, member: str, path: str) -> Optional[List[str]]:
    """Refuse a member whose first record does not have the declared columns (layout drift)."""
    declared = [c.name for c in table.columns]
    fields, why = _fields_of_first_record(data, table)
    if why is not None:
        if table.dialect.header:
            raise SourceDataError(f"cannot read the header: {why}", file=path, member=member, line=1)
        return None  # no layout to compare: the reader rejects that record with its reason
    if table.dialect.header:
        names = [f.strip() for f in fields]
        if table.dialect.match_by_name:
            missing = [c for c in declared if c not in names]
            if missing:
                raise SourceDataError(f"header lacks declared columns {missing}", file=path, member=member)
        elif len(names) != len(declared):
            raise SourceDataError(f"layout drift: header has {len(names)} columns, declared {len(declared)}",
                                  file=path, member=member)
        return names
    if fields and len(fields) != len(declared):
        raise SourceDataError(
            f"layout drift: first record has {len(fields)} fields, the declaration has {len(declared)}",
            file=path, member=member, line=1)
    return None


def _target_bytes(sample: bytes, batch_rows: int) -> int:
    """Bytes per chunk for ~batch_rows records, from the average record length of a sample."""
    lines = max(1, sample.count(b"\n"))
    return max(64 * 1024, int(len(sample) / lines * batch_rows))


def split_units(units: Sequence[ReadUnit], splits: int, block_bytes: int) -> List[ReadUnit]:
    """Cut each large uncompressed file into ``splits`` byte-range units that read in parallel.

    Only where every newline ends a record (no newlines in values, not CR-only): a span then
    starts just past the first newline at or after its offset, so spans need no coordination.
    Batch ids stay member byte offsets, so a split and an unsplit run skip each other's batches.
    """
    out: List[ReadUnit] = []
    for u in units:
        n = min(splits, u.file.size // max(1, block_bytes))
        if n < 2 or u.table.format != "csv" or u.table.dialect.newlines_in_values or not _newline_ended(u):
            out.append(u)
            continue
        cuts = [u.file.size * i // n for i in range(n + 1)]
        out.extend(replace(u, span=(cuts[i], cuts[i + 1])) for i in range(n))
    return out


def _newline_ended(unit: ReadUnit) -> bool:
    with open(unit.file.path, "rb") as fh:
        sample = fh.read(_SAMPLE_BYTES)
    return b"\n" in sample


def read_unit(unit: ReadUnit, board: Any = None) -> Iterator[pa.Table]:
    """Yield one block per chunk, then an eof record per member, or an error record for the file."""
    table, path = unit.table, Path(unit.file.path)
    feed = _SizeFeed(board, unit.batch_rows)
    try:
        if table.format == "parquet":
            yield from _read_parquet(unit)
            return
        if unit.span is not None:
            yield from _read_span(unit, feed)
            return
        for member, stream in files.open_members(path, table.format, table.member, table.max_member_bytes,
                                                   table.max_compression_ratio):
            yield from _read_member(unit, member, stream, feed)
    except SourceDataError as exc:
        yield _block([_record(unit, "error", message=str(exc))])
    except (*files.read_errors(), pa.ArrowInvalid) as exc:
        yield _block([_record(unit, "error", message=f"corrupt or unreadable source: {type(exc).__name__}: {exc}")])


def _read_member(unit: ReadUnit, member: str, stream: Any, feed: "_SizeFeed") -> Iterator[pa.Table]:
    table = unit.table
    sample = stream.read(_SAMPLE_BYTES)
    if files.is_cr_only(sample):
        sample, stream = sample.replace(b"\r", b"\n"), files.CrToLf(stream)
    sample = _complete_head(sample, stream, table)
    d = table.dialect
    skip = scanner.skip_lines(sample, d.skip_lines)  # banner lines: not records, still counted as lines
    body = sample[skip:]
    if len(sample) < _SAMPLE_BYTES:
        _check_not_empty(table, _data_records(body, table), member, unit.file.rel)
    header = _check_layout(body, table, member, unit.file.rel) if body.strip() else None
    reader = files.ChunkReader(stream, member, _target_bytes(body or sample, unit.batch_rows), d.quote, d.escape,
                                 d.newlines_in_values, unit.ranges(member), prefix=body, origin=skip,
                                 origin_line=1 + sample.count(b"\n", 0, skip), syntax=scanner.Syntax.of(d))
    yield from _emit_chunks(unit, member, reader, sample, header, feed, data_start=skip)


def _read_span(unit: ReadUnit, feed: "_SizeFeed") -> Iterator[pa.Table]:
    """One byte range of a split plain file: from its first record start to the next span's."""
    assert unit.span is not None
    table, member, size = unit.table, Path(unit.file.path).name, unit.file.size
    d = table.dialect
    with open(unit.file.path, "rb") as fh:
        sample = fh.read(_SAMPLE_BYTES)  # the file's head: layout and header, whichever span this is
        sample = _complete_head(sample, fh, table)
        skip = scanner.skip_lines(sample, d.skip_lines)
        header = _check_layout(sample[skip:], table, member, unit.file.rel)
        syn = scanner.Syntax.of(d)
        skip_line = 1 + sample.count(b"\n", 0, skip)
        # Exact span edges: scanned from the data start, so a quoted newline is never a cut.
        start, line = files.record_start(fh, max(unit.span[0], skip), size, syn, skip, skip_line)
        end, _ = files.record_start(fh, max(unit.span[1], skip), size, syn, skip, skip_line)
        fh.seek(start)
        committed = [(max(s, start), min(e, end)) for s, e in unit.ranges(member) if s < end and e > start]
        window = cast(BinaryIO, files.Window(fh, end))  # a read()-only view of the span
        reader = files.ChunkReader(window, member, _target_bytes(sample, unit.batch_rows), d.quote, d.escape,
                                     d.newlines_in_values, committed, origin=start, origin_line=line, syntax=syn)
        yield from _emit_chunks(unit, member, reader, sample, header, feed, data_start=skip)


def _emit_chunks(unit: ReadUnit, member: str, reader: "files.ChunkReader", sample: bytes,
                 header: Optional[List[str]], feed: "_SizeFeed", data_start: int = 0) -> Iterator[pa.Table]:
    d = unit.table.dialect
    count = 0
    for chunk in reader:
        count += 1
        handed = time.perf_counter()
        # A data record's message, when set, is the reason the reader rejected the chunk's one record.
        yield _block([_record(unit, "data", member, chunk.reject, start=chunk.start, end=chunk.end,
                              first_line=chunk.first_line, data=chunk.data, header=header,
                              skip_header=bool(d.header and chunk.start == data_start),
                              scan=chunk.summary.encode() if chunk.summary else None)])
        rows = feed.chunk_done(time.perf_counter() - handed)
        if rows is not None:
            reader.retarget(_target_bytes(sample, rows))
    feed.flush()
    yield _block([_record(unit, "eof", member, message=str(count))])


def _check_not_empty(table: TableSpec, records: int, member: str, path: str) -> None:
    """An empty or header-only member loads zero rows, unless the source says that is an error."""
    if records <= 0 and not table.allow_empty:
        raise SourceDataError("source has no data rows and source.allow_empty is false", file=path, member=member)


def _read_parquet(unit: ReadUnit) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    member = Path(unit.file.path).name
    done = unit.ranges(member)
    # INT96 (legacy Impala/Spark timestamps) at microseconds: at Arrow's default (ns) 9999-12-31 overflows.
    pf = pq.ParquetFile(unit.file.path, coerce_int96_timestamp_unit="us")
    missing = [c.name for c in unit.table.columns if c.name not in pf.schema_arrow.names]
    if missing:
        raise SourceDataError(f"layout drift: parquet file lacks declared columns {missing}", file=unit.file.rel)
    _check_not_empty(unit.table, pf.metadata.num_rows, member, unit.file.rel)
    offset, count = 0, 0
    for rb in pf.iter_batches(batch_size=unit.batch_rows):
        start, end = offset, offset + rb.num_rows
        offset = end
        if any(s <= start and end <= e for s, e in done):
            continue
        count += 1
        yield _block([_record(unit, "data", member, start=start, end=end, first_line=start + 1,
                              data=ipc_bytes(pa.Table.from_batches([rb])))])
    yield _block([_record(unit, "eof", member, message=str(count))])


# ---------------------------------------------------------------- batch size channel


class SizeBoard:
    """A tiny actor between the driver and the read tasks.

    Driver -> read tasks: the rows per batch the sizing policy wants now. Read tasks ->
    driver: chunks handed downstream and the time spent waiting to hand them (parse plus
    backpressure), so the driver sees queue depth and blocked time without Ray internals.
    """

    def __init__(self, rows: int) -> None:
        self._rows = rows
        self._chunks = 0
        self._wait_s = 0.0

    def set(self, rows: int) -> None:
        self._rows = rows

    def poll(self, chunks: int, wait_s: float) -> int:
        self._chunks += chunks
        self._wait_s += wait_s
        return self._rows

    def counters(self) -> Tuple[int, float]:
        return self._chunks, self._wait_s


class SizeChannel:
    """The driver's end of the SizeBoard."""

    def __init__(self, rows: int) -> None:
        import ray

        self.actor: Any = ray.remote(num_cpus=0, max_restarts=0)(SizeBoard).remote(rows)  # an ActorHandle

    def publish(self, rows: int) -> None:
        self.actor.set.remote(rows)

    def counters(self) -> Tuple[int, float]:
        import ray

        rows, seconds = ray.get(self.actor.counters.remote(), timeout=30)
        return int(rows), float(seconds)

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


class LocalSizeChannel:
    """The SizeChannel of the in-process executor: the same board, as a plain object."""

    def __init__(self, rows: int) -> None:
        self.actor = SizeBoard(rows)

    def publish(self, rows: int) -> None:
        self.actor.set(rows)

    def counters(self) -> Tuple[int, float]:
        return self.actor.counters()

    def close(self) -> None:
        """Nothing to release: the board lives in this process."""


class _SizeFeed:
    """A read task's end of the SizeBoard: polls between chunks, at most every _POLL_S seconds."""

    def __init__(self, board: Any, rows: int) -> None:
        self._board = board
        self._rows = rows
        self._chunks = 0
        self._wait_s = 0.0
        self._polled = time.monotonic()

    def chunk_done(self, wait_s: float) -> Optional[int]:
        """Count one chunk handed downstream; the new rows per batch if the driver changed it."""
        self._chunks += 1
        self._wait_s += wait_s
        if self._board is None or time.monotonic() - self._polled < _POLL_S:
            return None
        return self.flush()

    def flush(self) -> Optional[int]:
        if self._board is None:
            return None
        self._polled = time.monotonic()
        if isinstance(self._board, SizeBoard):  # the in-process executor's board: a plain object
            rows = self._board.poll(self._chunks, self._wait_s)
        else:
            import ray

            try:
                rows = ray.get(self._board.poll.remote(self._chunks, self._wait_s), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                # Sizing is an optimisation: without the board this task keeps its last size.
                log.warning("batch size board unreachable, keeping %s rows per batch: %s", self._rows, exc)
                self._board = None
                return None
        self._chunks, self._wait_s = 0, 0.0
        if rows == self._rows:
            return None
        self._rows = rows
        return rows


# ---------------------------------------------------------------- parse


def parse_block(batch: pa.Table, tables: Dict[str, TableSpec], period: str) -> pa.Table:
    """map_batches UDF: raw chunk records -> typed rows and rejects, serialised for the writer."""
    out = pa.Table.from_pylist([_parse_record(r, tables, period) for r in batch.to_pylist()], schema=PARSED_SCHEMA)
    release_memory()
    return out


def _parse_record(rec: Dict[str, Any], tables: Dict[str, TableSpec], period: str) -> Dict[str, Any]:
    out = {f.name: rec.get(f.name) for f in PARSED_SCHEMA}
    if rec["kind"] != "data":
        return out
    table = tables[rec["table_name"]]
    started = time.perf_counter()
    try:
        if table.format == "parquet":
            parsed = parse_parquet_batch(table, rec["data"], rec["first_line"])
        else:
            parsed = parse_chunk(table, rec["data"], rec["first_line"], rec["header"], rec["skip_header"],
                                 reject=rec.get("message"), hint=rec.get("scan"))
    except SourceDataError as exc:  # the file fails, not the whole dataset
        out.update(kind="error", message=str(exc))
        return out
    out.update(
        batch_id=batch_id(table.name, period, rec["file_sha"], rec["member"], rec["start"]),
        rows_in=parsed.rows_in, rows_loaded=parsed.rows.num_rows, rows_rejected=parsed.rejects.num_rows,
        rows_coerced=sum(parsed.coerced.values()), bytes=len(rec["data"]), parse_s=time.perf_counter() - started,
        blank_lines=parsed.blank_lines,
        rows=ipc_bytes(parsed.rows), rejects=ipc_bytes(parsed.rejects), message=None,
    )
    return out


# ---------------------------------------------------------------- build and run


def writer_settings(plan: LoadPlan, dsn: str) -> WriterSettings:
    targets = {t.name: TableTarget(t.load_schema, t.load_table, t.mode != "append") for t in plan.tables}
    return WriterSettings(dsn=dsn, ledger_schema=plan.ledger_schema, run_id=plan.run_id, period=plan.period,
                          tables=targets, connections=plan.connections_per_writer, pre_ping=plan.pre_ping,
                          retry=plan.retry, copy_encoder=plan.copy_encoder)


def build_dataset(plan: LoadPlan, units: Sequence[ReadUnit], dsn: str, board: Any = None) -> Any:
    import ray.data
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
                ReadTask(functools.partial(read_unit, u, board),
                         BlockMetadata(num_rows=None, size_bytes=u.file.size, input_files=(u.file.path,),
                                       exec_stats=None),
                         schema=CHUNK_SCHEMA)
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
        BatchWriter,
        fn_constructor_args=(writer_settings(plan, dsn),),
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


def execute(plan: LoadPlan, units: Sequence[ReadUnit], dsn: str, board: Any = None) -> Iterator[pa.Table]:
    """Run the pipeline; yield per-batch result tables as writers finish them.

    ``board`` (SizeChannel.actor) lets the read tasks follow the driver's batch size.
    """
    if not units:
        return iter(())
    ds = build_dataset(plan, units, dsn, board)
    return ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)


def execute_inprocess(plan: LoadPlan, units: Sequence[ReadUnit], dsn: str, board: SizeBoard) -> Iterator[pa.Table]:
    """The same stages without Ray: one parse thread feeding ``pool.writers`` writer threads.

    pyarrow's parser and ADBC's COPY release the GIL, so parsing, encoding and the server's
    work overlap. A writer encodes a batch and then waits for the server, so two writer
    threads keep both busy. Parsed batches wait in a queue of one per writer (bounded
    memory); results come back to the caller's thread. Same BatchWriter, same batch ids and
    ledger rows as the Ray pipeline, so a run or a resume may switch executors freely.
    """
    tables = {t.name: replace(t, files=()) for t in plan.tables}
    parsed: "queue.Queue[Any]" = queue.Queue(maxsize=plan.writers)
    results: "queue.Queue[Any]" = queue.Queue()
    stop = threading.Event()
    writers = _open_writers(writer_settings(plan, dsn), plan.writers)  # connect up front, in this thread

    def produce() -> None:
        for unit in units:
            for block in read_unit(unit, board):
                if not _offer(parsed, parse_block(block, tables, plan.period), stop):
                    return
        for _ in writers:  # one end marker per writer
            _offer(parsed, None, stop)

    def write(writer: BatchWriter) -> None:
        while (item := _take(parsed, stop)) is not None:
            results.put(writer(item))
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
            cancel_backends(dsn, plan.run_id)
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


def ensure_ray(address: Optional[str], num_cpus: Optional[int], object_store_memory: Optional[int],
               runtime_env: Optional[Dict[str, Any]], progress_bars: bool) -> bool:
    """Start or join Ray unless this process already did. Returns True if this call started it."""
    import ray
    import ray.data

    started = False
    if not ray.is_initialized():
        kwargs: Dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
        if address:
            kwargs["address"] = address
        else:
            kwargs.update(num_cpus=num_cpus, object_store_memory=object_store_memory)
        if runtime_env:
            kwargs["runtime_env"] = runtime_env
        with _keep_signal_handlers():
            ray.init(**kwargs)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.execution_options.preserve_order = False
    ctx.max_errored_blocks = 0
    # Ray Data polls every task's USS on a thread of its own; loadkit's MemoryMonitor already
    # samples the whole process tree (one memory monitor per process).
    ctx.memory_usage_poll_interval_s = None
    return started
