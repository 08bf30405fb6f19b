"""The read stage: one source file (or span of one) -> record-aligned Chunks, as they decompress.

    ReadUnit (file of a table + what a previous run committed)
      -> members (zip entries, gzip, plain file; parquet row groups)
      -> layout checks on the first record (header names, field count: drift is a file error)
      -> files.ChunkReader: chunks of ~batch.size records, cut by THE record scanner
      -> Chunk records; an eof per member, or one error record for the file

Both executors run this same code (a Ray read task, or the in-process read thread), so a
chunk's byte range and first line, hence its batch id, never depend on the executor. A
source error becomes an error record for its file instead of an exception, so the other
files keep loading. No Ray and no database here (import-linter contract): the batch size is
followed through a plain ``Board`` (``poll``), which each executor provides.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, List, Optional, Protocol, Sequence, Tuple

import pyarrow as pa

from loadkit import tracing
from loadkit.errors import SourceDataError, TransientSourceError, is_network_failure
from loadkit.plan import FileSpec, RetryPolicy, TableSpec
from loadkit.records import Chunk, Kind, ipc_bytes
from loadkit.source import files, scanner

_SAMPLE_BYTES = 256 * 1024
_POLL_S = 0.5  # how often a read task asks the driver for the current batch size


@dataclass(frozen=True)
class ReadUnit:
    """One source file of one table, with the byte ranges a previous run already committed."""

    table: TableSpec
    file: FileSpec
    committed: Tuple[Tuple[str, Tuple[Tuple[int, int], ...]], ...]
    batch_rows: int
    span: Optional[Tuple[int, int]] = None  # [lo, hi) bytes of a split file, widened to record boundaries
    # W3C traceparent of the file's span (telemetry.tracing on), "" when off: see loadkit.tracing
    traceparent: str = ""
    # retry.* of the run: a remote file's dropped connection is retried from the failed read's byte
    # offset (files.Resumable); None: RetryConfig's defaults
    retry: Optional[RetryPolicy] = None

    def ranges(self, member: str) -> Tuple[Tuple[int, int], ...]:
        """The committed [start, end) ranges of ``member``, sorted.

        A plain, gzip or parquet file is one stream named after the file: its ranges are every range the
        ledger holds for the file's content (sha256), under whatever name it had when they were committed
        (a renamed or re-delivered file resumes where it stopped instead of loading its committed rows again)."""
        if self.table.format != "zip":
            return tuple(sorted(r for _, rs in self.committed for r in rs))
        for m, r in self.committed:
            if m == member:
                return r
        return ()


def _chunk(unit: ReadUnit, kind: Kind, member: str = "", **fields: Any) -> Chunk:
    return Chunk(kind=kind, table_name=unit.table.name, file_sha=unit.file.sha256, file_ordinal=unit.file.ordinal,
                 file_path=unit.file.rel, member=member, **fields)


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

    Only where the dialect says no value holds a newline and the file has LF line ends (not CR-only).
    Each span's edges are exact whatever the bytes (``files.span_reader``: the start scanned from the
    data start, the end found by the span's own reader), so spans need no coordination.
    Batch ids stay member byte offsets, so a split and an unsplit run skip each other's batches.
    A remote file (URL) is never split: a span finds its exact first record by scanning from the
    file's start, which for an object would download that prefix once per span.
    """
    out: List[ReadUnit] = []
    for u in units:
        n = min(splits, u.file.size // max(1, block_bytes))
        if n < 2 or u.table.format != "csv" or u.table.dialect.newlines_in_values or files.is_url(u.file.path) \
                or not _newline_ended(u):
            out.append(u)
            continue
        cuts = [u.file.size * i // n for i in range(n + 1)]
        out.extend(replace(u, span=(cuts[i], cuts[i + 1])) for i in range(n))
    return out


def _newline_ended(unit: ReadUnit) -> bool:
    with files.open_source(unit.file.path) as fh:
        sample = fh.read(_SAMPLE_BYTES)
    return b"\n" in sample


def read_unit(unit: ReadUnit, board: Optional[Board] = None) -> Iterator[Chunk]:
    """Yield the file's chunks, then an eof record per member, or an error record for the file.

    ``board``: where the rows per batch come from mid-run (None: ``unit.batch_rows`` throughout).
    Never raises for bad source data: a SourceDataError or an unreadable container becomes the
    file's error record (after any chunks already yielded). With ``unit.traceparent`` set (tracing
    on), each data chunk opens its batch span and carries its ``read`` span (``loadkit.tracing``)."""
    chunks = _marked_end(_read_unit(unit, board))
    if not unit.traceparent:
        return chunks
    return _traced(unit, chunks)


def _marked_end(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """The chunks, the last one (an eof or error record: a unit always ends with one) marked ``unit_end``.

    Only eof/error records are held back until the next record shows whether they were the last: a data
    chunk is handed on at once (the read stage's hand-off timing, ``SizeFeed``, stays the chunk's own)."""
    held: Optional[Chunk] = None
    for chunk in chunks:
        if held is not None:
            yield held
            held = None
        if chunk.kind == "data":
            yield chunk
        else:
            held = chunk
    if held is not None:
        yield replace(held, unit_end=True)


def _traced(unit: ReadUnit, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """The chunks, each data chunk with its batch span opened and its ``read`` span: the time
    spent producing it (reading, decompressing, cutting), not the time its consumer held it."""
    while True:
        started = time.time_ns()
        chunk = next(chunks, None)
        if chunk is None:
            return
        if chunk.kind == "data":
            ended = time.time_ns()
            trace = tracing.open_batch(unit.traceparent, started)
            chunk = replace(chunk, trace=tracing.add_stage(trace, "read", started, ended, bytes=len(chunk.data),
                                                           member=chunk.member, start=chunk.start))
        yield chunk


def _read_unit(unit: ReadUnit, board: Optional[Board]) -> Iterator[Chunk]:
    table, path = unit.table, unit.file.path  # a local path or an fsspec URL this task opens itself
    feed = SizeFeed(board, unit.batch_rows)
    try:
        if table.format == "parquet":
            yield from _read_parquet(unit)
            return
        if unit.span is not None:
            yield from _read_span(unit, feed)
            return
        for member, stream in files.open_members(path, table.format, table.member, table.max_member_bytes,
                                                   table.max_compression_ratio, unit.retry):
            yield from _read_member(unit, member, stream, feed)
    except SourceDataError as exc:
        yield _chunk(unit, "error", message=str(exc))
    except (*files.read_errors(), pa.ArrowInvalid) as exc:
        if files.is_url(path) and is_network_failure(exc):  # the network, not the file: exit 4, rerun resumes
            raise TransientSourceError(f"reading the remote source failed on the network: {type(exc).__name__}",
                                       file=unit.file.rel) from exc
        yield _chunk(unit, "error", message=f"corrupt or unreadable source: {type(exc).__name__}: {exc}")


def _read_member(unit: ReadUnit, member: str, stream: Any, feed: "SizeFeed") -> Iterator[Chunk]:
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


def _read_span(unit: ReadUnit, feed: "SizeFeed") -> Iterator[Chunk]:
    """One byte range of a split plain file: from its first record start to the next span's."""
    assert unit.span is not None
    table, member, size = unit.table, files.basename(unit.file.path), unit.file.size
    d = table.dialect
    with files.open_source(unit.file.path, unit.retry) as fh:
        sample = fh.read(_SAMPLE_BYTES)  # the file's head: layout and header, whichever span this is
        sample = _complete_head(sample, fh, table)
        skip = scanner.skip_lines(sample, d.skip_lines)
        header = _check_layout(sample[skip:], table, member, unit.file.rel)
        syn = scanner.Syntax.of(d)
        skip_line = 1 + sample.count(b"\n", 0, skip)
        # Exact span edges: the start scanned from the data start (a quoted newline is never a cut), the end
        # found by the reader as it cuts its chunks (files.span_reader); the last span reads to the file's end.
        reader = files.span_reader(fh, member, unit.span, size, syn, _target_bytes(sample, unit.batch_rows),
                                   unit.ranges(member), origin=skip, origin_line=skip_line)
        yield from _emit_chunks(unit, member, reader, sample, header, feed, data_start=skip)


def _emit_chunks(unit: ReadUnit, member: str, reader: "files.ChunkReader", sample: bytes,
                 header: Optional[List[str]], feed: "SizeFeed", data_start: int = 0) -> Iterator[Chunk]:
    d = unit.table.dialect
    count = 0
    for chunk in reader:
        count += 1
        handed = time.perf_counter()
        yield _chunk(unit, "data", member, reject=chunk.reject, start=chunk.start, end=chunk.end,
                     first_line=chunk.first_line, data=chunk.data, header=None if header is None else tuple(header),
                     skip_header=bool(d.header and chunk.start == data_start),
                     scan=chunk.summary.encode() if chunk.summary else None)
        rows = feed.chunk_done(time.perf_counter() - handed)
        if rows is not None:
            reader.retarget(_target_bytes(sample, rows))
    feed.flush()
    yield _chunk(unit, "eof", member, chunks=count)


def _check_not_empty(table: TableSpec, records: int, member: str, path: str) -> None:
    """An empty or header-only member loads zero rows, unless the source says that is an error."""
    if records <= 0 and not table.allow_empty:
        raise SourceDataError("source has no data rows and source.allow_empty is false", file=path, member=member)


def _read_parquet(unit: ReadUnit) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    member = files.basename(unit.file.path)
    with files.open_source(unit.file.path, unit.retry) as fh:
        # INT96 (legacy Impala/Spark timestamps) at microseconds: at Arrow's default (ns) 9999-12-31 overflows.
        yield from _read_parquet_file(unit, member, pq.ParquetFile(fh, coerce_int96_timestamp_unit="us"))


def _read_parquet_file(unit: ReadUnit, member: str, pf: Any) -> Iterator[Chunk]:
    done = sorted(unit.ranges(member))
    missing = [c.name for c in unit.table.columns if c.name not in pf.schema_arrow.names]
    if missing:
        raise SourceDataError(f"layout drift: parquet file lacks declared columns {missing}", file=unit.file.rel)
    _check_not_empty(unit.table, pf.metadata.num_rows, member, unit.file.rel)
    offset, count = 0, 0
    for rb in pf.iter_batches(batch_size=unit.batch_rows):
        for start, end in _uncommitted(offset, offset + rb.num_rows, done):
            count += 1
            yield _chunk(unit, "data", member, start=start, end=end, first_line=start + 1,
                         data=ipc_bytes(pa.Table.from_batches([rb.slice(start - offset, end - start)])))
        offset += rb.num_rows
    yield _chunk(unit, "eof", member, chunks=count)


def _uncommitted(start: int, end: int, done: Sequence[Tuple[int, int]]) -> Iterator[Tuple[int, int]]:
    """The parts of rows [start, end) outside the committed row ranges ``done`` (sorted, disjoint), in order.

    A parquet batch is cut at the committed edges, as ``files.ChunkReader`` cuts a text chunk: a resume
    whose ``batch.size`` differs from the run that committed ``done`` reads each uncommitted row once,
    and no chunk starts where a committed batch starts (it would carry that batch's id and be skipped
    whole, its uncommitted tail with it)."""
    for s, e in done:
        if e <= start or s >= end:
            continue
        if s > start:
            yield start, s
        start = max(start, e)
        if start >= end:
            return
    if start < end:
        yield start, end


# ---------------------------------------------------------------- the batch size, as a read task sees it


class Board(Protocol):
    """What a read task polls between chunks (the driver's SizeBoard, or a proxy for a remote one)."""

    def poll(self, chunks: int, wait_s: float) -> Optional[int]:
        """Report ``chunks`` handed downstream and ``wait_s`` seconds spent handing them; returns the
        rows per batch the driver wants now, or None once the board is unreachable (keep the last size)."""
        ...


class SizeFeed:
    """A read task's end of the batch-size board: polls between chunks, at most every _POLL_S seconds."""

    def __init__(self, board: Optional[Board], rows: int) -> None:
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
        rows = self._board.poll(self._chunks, self._wait_s)
        if rows is None:  # sizing is an optimisation: without the board this task keeps its last size
            self._board = None
            return None
        self._chunks, self._wait_s = 0, 0.0
        if rows == self._rows:
            return None
        self._rows = rows
        return rows
