"""The records that flow from a source file to the ledger, and the words for their parts.

Glossary (outermost first):

- **file**: one source file of one table (``plan.FileSpec``: path, size, sha256). Its identity is
  its sha256, so a renamed file is the same file and a changed file is a new one.
- **member**: a stream inside a file: a zip entry, the inside of a gzip, or the file itself.
  Byte offsets (``start``/``end``) are offsets in the member's uncompressed bytes.
- **span**: a byte range ``[lo, hi)`` of a large plain member, widened to record boundaries,
  read by its own task (``source.read.split_units``); spans never change batch identity.
- **chunk = batch**: a record-aligned run of ~``batch.size`` records of one member. The reader
  cuts a chunk (:class:`Chunk`), the parser turns it into typed rows and rejects
  (:class:`ParsedBatch`), a writer commits it in one transaction and reports it
  (:class:`BatchResult`). Its id (``plan.batch_id``: table, period, file sha, member, start offset)
  is the ledger's primary key: one chunk is one batch is one ledger row, whichever executor ran it.
- **record**: one logical row of the source (a CSV record may span lines); a record becomes
  one loaded row or one reject, never both (``rows_in = rows_loaded + rows_rejected``).

Every record here also carries a ``kind``: ``data`` (a chunk/batch), ``eof`` (a member was read to
its end; ``chunks`` says how many data chunks it gave) or ``error`` (the file could not be read or
parsed; ``message`` says why; the other files keep loading).

The three records are frozen dataclasses, and their Arrow schemas are derived from the fields
(:func:`arrow_schema`), so a field is declared once. Code passes the dataclasses around; Arrow
appears only where Ray Data needs blocks: ``to_table`` / ``from_table`` are called by
``loadkit.execute.ray`` at its UDF boundaries (read task -> parse -> writer actor -> driver), and
the in-process executor never converts at all. Fields of type ``pa.Table`` (a batch's rows and
rejects) cross those boundaries as Arrow IPC stream bytes.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Type, TypeVar

import pyarrow as pa

Kind = Literal["data", "eof", "error"]
Status = Literal["committed", "skipped", "eof", "error"]


def ipc_bytes(table: pa.Table) -> bytes:
    """An Arrow table as Arrow IPC stream bytes (how typed rows cross a Ray block boundary)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_table(data: bytes) -> pa.Table:
    """The table ``ipc_bytes`` encoded."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def _int32() -> Any:
    return field(default=0, metadata={"arrow": pa.int32()})


@dataclass(frozen=True, kw_only=True)
class Origin:
    """Where a record comes from: table, file, member and the member's byte range."""

    kind: Kind
    table_name: str
    file_sha: str
    file_ordinal: int = _int32()  # the file's position in the plan's listing of the table's files
    file_path: str = ""  # relative to the data root (shown in rejects and errors)
    member: str = ""
    start: int = 0  # [start, end) bytes of the member (parquet: row offsets)
    end: int = 0
    first_line: int = 0  # the member's line number of the chunk's first byte (1-based)
    chunks: int = 0  # eof only: data chunks the member gave this run
    message: Optional[str] = None  # error only: why the file failed
    # eof/error only: the last record of its read unit (``source.read.read_unit``); the in-process executor
    # delivers it after every batch of the unit, so the driver knows the unit is wholly committed
    unit_end: bool = False
    # data only, tracing on: the batch's span and its finished stage spans (loadkit.tracing.BatchTrace,
    # compact JSON), added to by each stage; "" with tracing off (the default)
    trace: str = ""

    @classmethod
    def schema(cls) -> pa.Schema:
        """This record's Arrow schema (see :func:`arrow_schema`)."""
        return arrow_schema(cls)

    @classmethod
    def to_table(cls: Type[R], records: Sequence[R]) -> pa.Table:
        """Records of this class as one Arrow table (a Ray Data block)."""
        return to_table(cls, records)

    @classmethod
    def from_table(cls: Type[R], table: pa.Table) -> List[R]:
        """The records of a block ``to_table`` made."""
        return from_table(cls, table)


@dataclass(frozen=True, kw_only=True)
class Chunk(Origin):
    """The reader's output: raw bytes of whole records of one member (kind ``data``), or an eof/error mark."""

    data: bytes = b""  # csv: the records' bytes; parquet: an Arrow IPC stream of the row group slice
    header: Optional[Tuple[str, ...]] = None  # the member's header names, when the dialect has a header
    skip_header: bool = False  # the chunk starts with the header line
    scan: Optional[str] = None  # the reader's scanner.Summary of ``data`` (encoded), so the parser need not rescan
    reject: Optional[str] = None  # set when the reader rejected the chunk's one record (why)


@dataclass(frozen=True, kw_only=True)
class Counted(Origin):
    """A parsed batch's id and counts, shared by :class:`ParsedBatch` and :class:`BatchResult`."""

    batch_id: int = 0  # plan.batch_id: the ledger's key; 0 for eof/error records
    rows_in: int = 0  # records read (= rows_loaded + rows_rejected)
    rows_loaded: int = 0
    rows_rejected: int = 0
    rows_coerced: int = 0  # values changed to fit (trimmed, NUL removed, ...), counted per value
    bytes: int = 0  # source bytes parsed
    parse_s: float = 0.0  # seconds the parser spent on the batch
    # Blank lines the parser skipped (a table of two or more columns; in a one-column table a blank
    # line is a NULL row). Not records: a batch's source lines = rows_in + blank_lines (+ header).
    blank_lines: int = 0


@dataclass(frozen=True, kw_only=True)
class ParsedBatch(Counted):
    """The parser's output: typed rows (target columns + row ordinal) and rejects (ledger reject columns)."""

    rows: Optional[pa.Table] = None
    rejects: Optional[pa.Table] = None


@dataclass(frozen=True, kw_only=True)
class BatchResult(Counted):
    """What a writer reports to the driver for one batch (or passes on for an eof/error record)."""

    status: Status = "eof"  # committed | skipped (the ledger had it) | eof | error (copied from kind)
    write_s: float = 0.0  # seconds from the first attempt to the commit (COPY + ledger row), retries included
    attempts: int = _int32()
    deadlocks: int = _int32()  # attempts lost to a deadlock/serialization failure (retried); Prometheus counts them
    writer: str = ""  # writer-<pid>
    pool_utilisation: float = 0.0  # the writer's connection pool, when the batch finished (0..1)
    rss_bytes: int = 0  # the writer process's resident memory then
    finished_at: float = 0.0  # epoch seconds of the commit
    received_at: float = 0.0  # epoch seconds the driver received the result (set by RunMetrics.add)


R = TypeVar("R", bound=Origin)


def carry(src: Origin, cls: Type[R], **changes: Any) -> R:
    """A ``cls`` record with every field ``src`` shares with it, then ``changes``
    (a chunk's origin into its parsed batch, a parsed batch's counts into its result)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {f.name: getattr(src, f.name) for f in dataclasses.fields(src) if f.name in names}
    values.update(changes)
    return cls(**values)

_PLAIN: Dict[Any, pa.DataType] = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
                                  bytes: pa.large_binary()}


@dataclass(frozen=True)
class _Column:
    name: str
    type: pa.DataType
    optional: bool = False  # the field is Optional: a null stays None (else a null takes the field's default)
    encode: Optional[Callable[[Any], Any]] = None  # dataclass value -> Arrow value
    decode: Optional[Callable[[Any], Any]] = None  # Arrow (Python) value -> dataclass value


def _column(f: dataclasses.Field, hint: Any) -> _Column:
    optional = typing.get_origin(hint) is typing.Union  # Optional[X]: X, and None stays None
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if "arrow" in f.metadata:
        return _Column(f.name, f.metadata["arrow"], optional)
    if typing.get_origin(hint) is Literal:
        return _Column(f.name, pa.string(), optional)
    if typing.get_origin(hint) is tuple:  # Tuple[str, ...]
        item = _PLAIN[typing.get_args(hint)[0]]
        return _Column(f.name, pa.list_(item), optional, decode=lambda v: None if v is None else tuple(v))
    if hint is pa.Table:
        return _Column(f.name, pa.large_binary(), optional, encode=lambda t: None if t is None else ipc_bytes(t),
                       decode=lambda b: None if b is None else ipc_table(b))
    return _Column(f.name, _PLAIN[hint], optional)


_COLUMNS: Dict[type, Tuple[_Column, ...]] = {}


def _columns(cls: type) -> Tuple[_Column, ...]:
    cols = _COLUMNS.get(cls)
    if cols is None:
        hints = typing.get_type_hints(cls)
        cols = _COLUMNS[cls] = tuple(_column(f, hints[f.name]) for f in dataclasses.fields(cls))
    return cols


def arrow_schema(cls: Type[Origin]) -> pa.Schema:
    """The Arrow schema of a record class: one nullable column per field, in field order.

    str -> string, int -> int64 (or the field's ``metadata["arrow"]``), float -> float64, bool ->
    bool, bytes -> large_binary, Tuple[str, ...] -> list<string>, Literal -> string, pa.Table ->
    large_binary (Arrow IPC stream); Optional[X] -> X."""
    return pa.schema([(c.name, c.type) for c in _columns(cls)])


def to_table(cls: Type[R], records: Sequence[R]) -> pa.Table:
    """Records of ``cls`` as one Arrow table of ``arrow_schema(cls)`` (a Ray Data block)."""
    arrays = []
    for c in _columns(cls):
        values = [getattr(r, c.name) for r in records]
        if c.encode is not None:
            values = [c.encode(v) for v in values]
        arrays.append(pa.array(values, c.type))
    return pa.Table.from_arrays(arrays, schema=arrow_schema(cls))


def from_table(cls: Type[R], table: pa.Table) -> List[R]:
    """The records of a table ``to_table`` made. Extra columns are ignored; a missing column, or a
    null in a column whose field is not Optional, takes the field's default."""
    # column_names builds its list anew at every access: read once (Ray's driver decodes a result block per
    # batch; 1.26 -> 0.21 ms a block, ~0.4 CPU-s of a 7.2M-row run's driver)
    names = set(table.column_names)
    cols = [c for c in _columns(cls) if c.name in names]
    columns = [(c, table.column(c.name).to_pylist()) for c in cols]
    out: List[R] = []
    for i in range(table.num_rows):
        values: Dict[str, Any] = {}
        for c, vals in columns:
            v = vals[i]
            if v is None and not c.optional:
                continue
            values[c.name] = c.decode(v) if c.decode is not None and v is not None else v
        out.append(cls(**values))
    return out
