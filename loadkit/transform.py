"""Arrow-level parsing, typing and validation of one chunk: good rows vs rejects.

The fast path hands the whole chunk to pyarrow's CSV reader (all columns as strings)
and types columns with vectorised compute kernels. A chunk pyarrow cannot take
(invalid bytes for the encoding, an unterminated quote) goes through a slow path
that splits it into records with Python's csv module, so one bad record costs one
reject, never the batch. Every input record ends up either in ``rows`` or in
``rejects``: ``rows_in == len(rows) + len(rejects)`` is asserted per chunk.
"""
from __future__ import annotations

import codecs
import csv
import datetime as dt
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from loadkit.source import scanner
from loadkit.literals import bound_value
from loadkit.errors import LoadkitError, SourceDataError
from loadkit.plan import ROW_COL, ColumnSpec, Dialect, TableSpec

REJECT_SCHEMA = pa.schema([
    ("line_number", pa.int64()),
    ("column_name", pa.string()),
    ("reason", pa.string()),
    ("raw", pa.string()),
])

_INT_RANGES = {"smallint": (-(2**15), 2**15 - 1), "integer": (-(2**31), 2**31 - 1), "bigint": (-(2**63), 2**63 - 1)}
_ARROW_INT = {"smallint": pa.int16(), "integer": pa.int32(), "bigint": pa.int64()}
_BOM = b"\xef\xbb\xbf"
_TRUE = ("true", "t", "1", "yes", "y")
_FALSE = ("false", "f", "0", "no", "n")


@dataclass
class ParsedChunk:
    rows: pa.Table  # typed good rows, plus ROW_COL (ordinal within the chunk)
    rejects: pa.Table  # REJECT_SCHEMA
    rows_in: int
    coerced: Dict[str, int] = field(default_factory=dict)  # column -> values stored as NULL by on_invalid=null
    # (or altered by dialect.strip_nul: NUL bytes removed from the value)
    blank_lines: int = 0  # blank lines skipped (not rows: rows_in excludes them)


def arrow_schema(table: TableSpec, client_encoding: Optional[str] = None) -> pa.Schema:
    """The Arrow types that binary COPY maps onto the declared SQL types.

    ``client_encoding`` (a PostgreSQL encoding name, from :func:`server_encoding`): text, char and
    varchar columns are ``binary`` holding the source's bytes, which the server transcodes; the
    schema's metadata names the encoding (:data:`CLIENT_ENCODING_KEY`, read by postgres/copy.py)."""
    text = pa.binary() if client_encoding else pa.string()
    fields = [pa.field(c.name, text if c.kind in _TEXT_KINDS else _arrow_type(c)) for c in table.columns]
    if table.derived_key:
        fields.append(pa.field(table.derived_key[0], pa.string()))
    meta = {CLIENT_ENCODING_KEY: client_encoding.encode()} if client_encoding else None
    return pa.schema(fields + [pa.field(ROW_COL, pa.int32())], metadata=meta)


# ---------------------------------------------------------------- server-side transcoding
# A latin-1 source can skip Python's latin-1 -> UTF-8 transcode: text columns are read as bytes and
# sent as they are, with client_encoding set to the matching PostgreSQL encoding for that COPY
# (postgres/copy.py), so the server's textrecv/varcharrecv convert them. Allowed only where the
# server's conversion equals Python's codec for every byte a value can hold (0x01-0xFF; NUL never
# reaches a COPY) -- tests/test_copy_encoders.py checks all 256 bytes against the server. WIN1252
# equals cp1252 on its defined bytes, but its 5 undefined bytes (0x81 0x8D 0x8F 0x90 0x9D) would
# fail the whole COPY instead of rejecting a record: not enabled.

CLIENT_ENCODING_KEY = b"loadkit.client_encoding"
# Python codec name (codecs.lookup(..).name) -> PostgreSQL encoding whose conversion equals it.
SERVER_ENCODINGS: Dict[str, str] = {"iso8859-1": "LATIN1"}


def server_encoding(d: Dialect) -> Optional[str]:
    """The PostgreSQL client_encoding a chunk's text columns can be sent in as source bytes, or None.

    None (Python transcodes, as before) unless ``dialect.server_transcode`` is on, the encoding is
    in :data:`SERVER_ENCODINGS`, ``dialect.trim`` is off (Arrow trims Unicode whitespace, U+0085 and
    U+00A0 included) and the delimiter, quote, escape and dialect null markers are ASCII (pyarrow
    matches those on the raw bytes). Column rules of text/char/varchar columns (null_values, zfill,
    length) work on bytes with the same result for a single-byte encoding; typed columns and derived
    key sources are decoded per column (:func:`decode_column`)."""
    if not d.server_transcode or d.trim:
        return None
    try:
        pg = SERVER_ENCODINGS.get(codecs.lookup(d.encoding).name)
    except LookupError:
        return None
    specials = [d.delimiter, d.quote or "", d.escape or "", *d.null_values]
    return pg if pg and all(s.isascii() for s in specials) else None


def decode_column(arr: pa.Array, encoding: str) -> pa.Array:
    """A binary array of single-byte-encoded text (``encoding``, a Python codec) as a UTF-8 string array.

    ASCII-only data is a zero-copy view; otherwise one codec call over the values' bytes and new
    offsets from a per-byte UTF-8 width table (exact for single-byte codecs, which are stateless).
    Raises UnicodeDecodeError on a byte the codec does not define."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_binary(arr.type):
        return arr
    n = len(arr)
    if n == 0 or arr.null_count == n:
        return pa.nulls(n, pa.string()) if n else pa.array([], pa.string())
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    start, end = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(bufs[2], dtype=np.uint8)[start:end] if bufs[2] is not None else np.zeros(0, np.uint8)
    if not len(data) or int(data.max()) < 0x80:
        return arr.view(pa.string())
    text = data.tobytes().decode(encoding).encode("utf-8")
    # New offsets: each value start moves by the extra UTF-8 bytes of the non-ASCII bytes before it,
    # counted per non-ASCII byte (few) rather than per byte (a width lookup and a cumsum of every
    # byte cost ~7 ns a byte; this ~1).
    high = np.flatnonzero(data >= 0x80)
    extra = np.zeros(len(high) + 1, np.int64)
    np.cumsum(_utf8_widths(encoding)[data[high]] - 1, out=extra[1:])
    new_offsets = (offsets + extra[np.searchsorted(high, offsets - start)]).astype(np.int32) - start
    validity = pc.is_valid(arr).buffers()[1] if arr.null_count else None
    return pa.Array.from_buffers(pa.string(), n, [validity, pa.py_buffer(new_offsets), pa.py_buffer(text)],
                                 arr.null_count)


def _is_ascii(arr: pa.Array) -> bool:
    """No byte >= 0x80 among a binary array's values."""
    if len(arr) == 0 or arr.null_count == len(arr):
        return True
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8)[offsets[0]:offsets[-1]] if bufs[2] is not None else ()
    return not len(data) or int(np.max(data)) < 0x80


@functools.lru_cache(maxsize=8)
def _utf8_widths(encoding: str) -> np.ndarray:
    """UTF-8 bytes of each byte value's character in a single-byte ``encoding`` (0: undefined)."""
    return np.array([len(bytes([b]).decode(encoding, errors="ignore").encode("utf-8")) for b in range(256)],
                    np.int64)


def decode_text_columns(data: pa.Table) -> pa.Table:
    """``data`` with its source-byte (binary) columns decoded to UTF-8 strings and the client-encoding
    mark removed: for a COPY that cannot set client_encoding (ADBC, a server that is not UTF8)."""
    meta = data.schema.metadata or {}
    pg = meta.get(CLIENT_ENCODING_KEY)
    if pg is None:
        return data
    py = {v: k for k, v in SERVER_ENCODINGS.items()}[pg.decode()]
    cols = [decode_column(c, py) if pa.types.is_binary(c.type) else c for c in data.columns]
    rest = {k: v for k, v in meta.items() if k != CLIENT_ENCODING_KEY}
    return pa.Table.from_arrays(cols, names=data.column_names, metadata=rest or None)


def _arrow_type(col: ColumnSpec) -> pa.DataType:
    if col.kind in _ARROW_INT:
        return _ARROW_INT[col.kind]
    return {
        "double": pa.float64(),
        "numeric": pa.decimal128(col.precision or 38, col.scale or 0),
        "date": pa.date32(),
        "timestamp": pa.timestamp("us"),
        "boolean": pa.bool_(),
    }.get(col.kind, pa.string())


# ---------------------------------------------------------------- parsing


def _transcode(data: bytes, encoding: str) -> bytes:
    """UTF-8 bytes for pyarrow; raises UnicodeDecodeError on bytes invalid for the encoding."""
    enc = encoding.lower().replace("_", "-")
    if enc in ("utf-8", "utf8", "utf-8-sig"):
        data.decode("utf-8")  # validate: pyarrow would fail the whole chunk
        return data
    return data.decode(encoding).encode("utf-8")


def _arrow_parse(text: bytes, names: Sequence[str], d: Dialect, quoted_newlines: bool,
                 keep_blank: bool = False, kind: pa.DataType = pa.string()) -> pa.Table:
    """pyarrow's reader on a chunk the scanner found clean (its records are exactly pyarrow's rows).

    ``quoted_newlines`` comes from the scanner, never from the dialect: ``newlines_in_values``
    is only a hint. ``kind`` binary reads the values as the source's bytes (server transcoding,
    :func:`server_encoding`). No invalid_row_handler: it slows pyarrow's parse by ~30%, and a bad row sends
    the chunk to the record-by-record reparse anyway, which finds the exact lines.

    Blocks of :data:`_ARROW_BLOCK` bytes: the parsed block stays in cache while pyarrow converts it
    (~18% less CPU than one block for the whole chunk, a 30-column latin-1 chunk of 13 MB). A
    record longer than a block makes pyarrow refuse the chunk; it is read again as one block.
    """
    try:
        return _read_csv(text, names, d, quoted_newlines, keep_blank, kind, _ARROW_BLOCK)
    except pa.ArrowInvalid:
        if len(text) < _ARROW_BLOCK:
            raise
    return _read_csv(text, names, d, quoted_newlines, keep_blank, kind, min(len(text) + 1, 1 << 30))


_ARROW_BLOCK = 1 << 20


def _read_csv(text: bytes, names: Sequence[str], d: Dialect, quoted_newlines: bool, keep_blank: bool,
              kind: pa.DataType, block_size: int) -> pa.Table:
    return pacsv.read_csv(
        pa.py_buffer(text),
        read_options=pacsv.ReadOptions(column_names=list(names), use_threads=False, block_size=block_size),
        parse_options=pacsv.ParseOptions(
            delimiter=d.delimiter, quote_char=d.quote or False, escape_char=d.escape or False,
            double_quote=d.escape is None, newlines_in_values=quoted_newlines,
            ignore_empty_lines=not keep_blank,
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={n: kind for n in names}, null_values=list(d.null_values),
            strings_can_be_null=True, quoted_strings_can_be_null=d.quoted_can_be_null,
        ),
    )


@dataclass
class _Record:
    line: int
    raw: bytes


csv.field_size_limit(2**31 - 1)  # records are bounded by dialect.max_record_bytes, not by csv's 128 KiB


def split_records(data: bytes, d: Dialect, first_line: int) -> List[_Record]:
    """Every record of a chunk with its physical start line, as the record scanner cuts them."""
    sc = scanner.scan(data, scanner.Syntax.of(d), final=True, first_line=first_line)
    return [_Record(int(sc.lines[i]), data[slice(*sc.span(i))]) for i in range(len(sc))]


def _is_blank(raw: bytes) -> bool:
    return raw == b"\n" or raw == b"\r\n"


class _Layout:
    """A chunk's records as the scanner sees them: which are data, blank, the header."""

    def __init__(self, data: bytes, d: Dialect, first_line: int, skip_header: bool, ncols: int) -> None:
        self.data = data
        self.sc = scanner.scan(data, scanner.Syntax.of(d), final=True, first_line=first_line)
        first = 1 if (skip_header and len(self.sc)) else 0
        self.header_end = int(self.sc.ends[0]) if first else 0
        # Blank lines are NULL rows of a one-column table (its one value is empty); else skipped.
        self.keep_blank = ncols == 1
        blank = scanner.blank_records(data, self.sc) if not self.keep_blank else np.zeros(len(self.sc), bool)
        blank[:first] = True  # the header is no data record either
        self.blank = int(blank[first:].sum())
        self.index = np.flatnonzero(~blank)  # data record ordinal - 1 -> scanner record index

    def record(self, ordinal: int) -> _Record:
        i = int(self.index[ordinal - 1])
        return _Record(int(self.sc.lines[i]), self.data[slice(*self.sc.span(i))])

    def get(self, ordinal: int, default: Optional[_Record] = None) -> Optional[_Record]:
        """The record of a data ordinal (1-based), like dict.get: rejects look up only their own."""
        return self.record(ordinal) if 1 <= ordinal <= len(self.index) else default

    def records(self) -> "_Layout":
        return self


def _slow_parse(lay: _Layout, names: Sequence[str], d: Dialect) -> Tuple[pa.Table, List[Tuple[int, str, str]]]:
    """Record-by-record parse: every record becomes a row or a reject with its reason.

    Record ends and quoting rules are the scanner's; fields of records the fast path could read
    come from Python's csv (same values, C speed), the others from ``scanner.fields``. Returns the
    string table and the rejects as (record ordinal, reason, raw text).
    """
    syn = scanner.Syntax.of(d)
    nulls = set(d.null_values)
    exact = not d.quoted_can_be_null
    rows: List[List[Optional[str]]] = []
    invalid: List[Tuple[int, str, str]] = []
    texts: List[Tuple[int, str, bool]] = []
    for ordinal, i in enumerate(lay.index, start=1):
        raw = lay.data[slice(*lay.sc.span(int(i)))]
        why = lay.sc.errors.get(int(i))
        if why is not None and why != scanner.TOO_LONG:
            why = f"malformed record: {why}"
        text = ""
        if why is None:
            try:
                text = raw.decode(d.encoding)
            except UnicodeDecodeError as exc:
                why = f"invalid bytes for encoding {d.encoding} at byte {exc.start}"
        if why is None and not d.strip_nul and "\x00" in text:
            why = "NUL byte in a value (dialect.strip_nul is false)"
        if why is not None:
            invalid.append((ordinal, why, _raw_text(raw, d.encoding)))
            continue
        texts.append((ordinal, text, exact or int(i) in lay.sc.slow))
    plain = [t for o, t, slow in texts if not slow]
    parsed_plain = iter(csv.reader(plain, delimiter=d.delimiter, quotechar=d.quote or '"',
                                   quoting=csv.QUOTE_MINIMAL if d.quote else csv.QUOTE_NONE,
                                   escapechar=d.escape, doublequote=d.escape is None, strict=True))
    for ordinal, text, slow in texts:
        if slow:
            vals, why = scanner.fields(text, syn)
            if why is not None:
                invalid.append((ordinal, f"malformed record: {why}", _raw_text(text.encode(d.encoding), d.encoding)))
                continue
            if d.trim:
                vals = [(v.strip(), q, w.strip()) for v, q, w in vals]
            # null markers match what was written (MySQL's \N before the escape is resolved);
            # with quoted_can_be_null false a quoted value is never NULL (PostgreSQL COPY's rule)
            fields = [None if ((w if not q else v) in nulls and not (q and exact)) else v for v, q, w in vals]
        else:
            got = next(parsed_plain, [])
            fields = [None if f in nulls else f for f in ((x.strip() for x in got) if d.trim else got)]
        if len(fields) != len(names):
            invalid.append((ordinal, f"expected {len(names)} fields, found {len(fields)}",
                            _raw_text(lay.data[slice(*lay.sc.span(lay.index[ordinal - 1]))], d.encoding)))
            continue
        rows.append(fields)
    invalid.sort()
    columns = {n: pa.array([r[k] for r in rows], pa.string()) for k, n in enumerate(names)}
    return (pa.table(columns) if names else pa.table({})), invalid


def _raw_text(raw: bytes, encoding: str) -> str:
    """A reject's raw text: bytes the encoding lacks and NUL (which PostgreSQL's text cannot hold: the
    ledger's COPY of the rejects would fail the whole batch) as backslash escapes (\\x00)."""
    return raw.decode(encoding, errors="backslashreplace").rstrip("\r\n").replace("\x00", "\\x00")


# ---------------------------------------------------------------- typing


class _Checker:
    """Collects, per row, the first reason it must be rejected."""

    def __init__(self, n: int, encoding: str = "utf-8") -> None:
        self.encoding = encoding  # the source's codec: binary values (source bytes) are shown decoded
        self.reason: List[Optional[Tuple[str, str]]] = [None] * n
        self.coerced: Dict[str, int] = {}
        self.rejected = 0  # rows with a reason: lets the clean path skip per-row Python loops

    def flag(self, bad: pa.Array, column: str, why: str, values: pa.Array, on_invalid: str) -> pa.Array:
        """Apply on_invalid to rows where ``bad`` is true; returns the mask of rows nulled."""
        bad = pc.fill_null(bad, False)
        count = pc.sum(bad).as_py() or 0
        if not count:
            return bad
        if on_invalid == "null":
            self.coerced[column] = self.coerced.get(column, 0) + count
            return bad
        for i in pc.indices_nonzero(bad).to_pylist():
            if self.reason[i] is None:
                self.reason[i] = (column, f"{why}: {_shown(values, i, self.encoding)!r}")
                self.rejected += 1
        return bad


def _shown(values: pa.Array, i: int, encoding: str = "utf-8") -> object:
    """The value at i as Python shows it (source bytes decoded with ``encoding``); Arrow's text where
    Python has no such value (year 0, -4713)."""
    if pa.types.is_binary(values.type):
        raw = values[i].as_py()
        return raw if raw is None else raw.decode(encoding)
    try:
        return values[i].as_py()
    except (OverflowError, ValueError):
        try:
            return values.slice(i, 1).cast(pa.string())[0].as_py()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return str(values.slice(i, 1).view(pa.int64() if values.type.bit_width == 64 else pa.int32())[0])


def _null_out(arr: pa.Array, mask: pa.Array) -> pa.Array:
    """``arr`` with NULL where ``mask`` is true (and where it is NULL). A mask with no true and no NULL
    (the common case: nothing flagged) returns ``arr`` itself: if_else would copy every value."""
    if mask.null_count == 0 and not pc.any(mask).as_py():
        return arr
    return pc.if_else(mask, pa.scalar(None, arr.type), arr)


def _convert_bytes(col: ColumnSpec, arr: pa.Array, chk: _Checker) -> pa.Array:
    """A text/char/varchar column kept as the source's bytes (server transcoding): the same rules as
    :func:`_convert_column` on text, exact for a single-byte encoding (one byte is one character).
    Null markers are compared as their bytes in the encoding (a marker the encoding cannot write
    matches no value, as on text); zfill pads with b"0" to ``zfill`` bytes; length is bytes."""
    if col.null_values:
        markers = []
        for v in col.null_values:
            try:
                markers.append(v.encode(chk.encoding))
            except UnicodeEncodeError:
                continue
        if markers:
            arr = _null_out(arr, pc.is_in(arr, value_set=pa.array(markers, pa.binary())))
    if col.zfill:
        text = decode_column(arr, "ascii") if _is_ascii(arr) else None  # codes are: Arrow's lpad, a view
        if text is not None:
            arr = pc.utf8_lpad(text, width=col.zfill, padding="0").view(pa.binary())
        else:
            missing = pc.max_element_wise(pc.subtract(col.zfill, pc.binary_length(arr)), 0)
            arr = pc.binary_join_element_wise(pc.binary_repeat(pa.scalar(b"0"), missing), arr, b"")
    out = arr
    if col.kind in ("char", "varchar"):
        too_long = pc.greater(pc.binary_length(arr), col.length)
        out = _null_out(arr, chk.flag(too_long, col.name, f"longer than {col.sql_type}", arr, col.on_invalid))
    if not col.nullable:
        chk.flag(pc.is_null(out), col.name, "required value is missing", arr, "reject")
    return out


def _convert_column(col: ColumnSpec, arr: pa.Array, chk: _Checker) -> pa.Array:
    if col.null_values:
        arr = _null_out(arr, pc.is_in(arr, value_set=pa.array(list(col.null_values), pa.string())))
    if col.zfill:
        arr = pc.utf8_lpad(arr, width=col.zfill, padding="0")
    raw = arr
    if col.kind in ("char", "varchar"):
        too_long = pc.greater(pc.utf8_length(arr), col.length)
        out = arr
        bad = chk.flag(too_long, col.name, f"longer than {col.sql_type}", raw, col.on_invalid)
        out = _null_out(out, bad)
    elif col.kind == "text":
        out = arr
    elif col.kind in _ARROW_INT:
        out = _to_int(col, arr, chk)
    elif col.kind == "double":
        ok = pc.match_substring_regex(arr, r"^\s*[+-]?((\d+\.?\d*)|(\.\d+))([eE][+-]?\d+)?\s*$|^(NaN|[+-]?Infinity)$")
        bad = chk.flag(pc.invert(ok), col.name, "not a number", raw, col.on_invalid)
        out = pc.cast(_null_out(pc.utf8_trim_whitespace(arr), bad), pa.float64())
    elif col.kind == "numeric":
        out = _to_numeric(col, arr, chk)
    elif col.kind in ("date", "timestamp"):
        out = _to_time(col, arr, chk)
    elif col.kind == "boolean":
        low = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
        is_true = pc.is_in(low, value_set=pa.array(_TRUE))
        is_false = pc.is_in(low, value_set=pa.array(_FALSE))
        # An empty (NULL) value is NULL, not "not a boolean"; nullable=false rejects it below.
        bad = chk.flag(pc.and_(pc.is_valid(arr), pc.invert(pc.or_(is_true, is_false))), col.name, "not a boolean",
                       raw, col.on_invalid)
        out = _null_out(is_true, pc.or_(bad, pc.is_null(arr)))
    else:  # validation refuses other kinds; a new kind without a converter is a bug
        raise LoadkitError(f"no converter for column type {col.kind}")
    out = _check_bounds(col, out, chk, raw)
    if not col.nullable:
        chk.flag(pc.is_null(out), col.name, "required value is missing", raw, "reject")
    return out


def _check_bounds(col: ColumnSpec, out: pa.Array, chk: _Checker, raw: pa.Array) -> pa.Array:
    """min/max, compared on the typed value (inclusive): a value outside is flagged per on_invalid.

    Config validation allows min/max only on orderable kinds (integers, numeric, double,
    date, timestamp) and checks that they parse as that kind (see literals.bound_value)."""
    if col.min is None and col.max is None:
        return out
    for bound, cmp, why in ((col.min, pc.less, "less than min"), (col.max, pc.greater, "greater than max")):
        if bound is None:
            continue
        value = bound_value(col.kind, bound)
        scalar = pa.scalar(value, pa.timestamp("us") if col.kind == "timestamp" else
                           pa.date32() if col.kind == "date" else None)
        bad = chk.flag(cmp(out, scalar), col.name, f"{why} {bound}", raw, col.on_invalid)
        out = _null_out(out, bad)
    return out


def _to_int(col: ColumnSpec, arr: pa.Array, chk: _Checker) -> pa.Array:
    """ASCII digits with an optional sign, surrounding whitespace and leading zeros allowed (as
    PostgreSQL's int input): the value is Python's ``int()`` of it, or a reject "out of range"."""
    text = pc.utf8_trim_whitespace(arr)
    ok = pc.match_substring_regex(text, r"^-?[0-9]{1,18}$")  # the common case: Arrow casts it as it is
    if pc.sum(ok).as_py() == len(text) - text.null_count:
        try:  # every value plain: one cast, which refuses the array when a value is out of the type's range
            return pc.cast(text, _ARROW_INT[col.kind])
        except pa.ArrowInvalid:
            pass
    else:
        ok = pc.match_substring_regex(text, r"^[+-]?[0-9]+$")
        # "+0042" -> "42", "-007" -> "-7": Arrow's cast takes neither a plus sign nor 19+ digits with zeros
        text = pc.replace_substring_regex(text, r"^(?:\+|(-))?0*([0-9])", r"\1\2")
    bad = chk.flag(pc.invert(ok), col.name, "not an integer", arr, col.on_invalid)
    text = _null_out(text, bad)
    lo, hi = _INT_RANGES[col.kind]
    why = f"out of range for {col.kind}"
    ndigits = pc.utf8_length(pc.utf8_ltrim(text, characters="-"))
    long = pc.fill_null(pc.greater(ndigits, 18), False)  # may not fit int64: judged as decimal128(38, 0)
    if pc.any(long).as_py():
        huge = pc.fill_null(pc.greater(ndigits, 38), False)
        dec = pc.cast(_null_out(text, pc.or_(pc.invert(long), huge)), pa.decimal128(38, 0))
        over = pc.or_(pc.less(dec, pa.scalar(Decimal(lo))), pc.greater(dec, pa.scalar(Decimal(hi))))
        bad_long = chk.flag(pc.or_(huge, pc.fill_null(over, False)), col.name, why, arr, col.on_invalid)
        text = _null_out(text, bad_long)
    as64 = pc.cast(text, pa.int64())
    out_of_range = pc.or_(pc.less(as64, lo), pc.greater(as64, hi))
    bad2 = chk.flag(out_of_range, col.name, why, arr, col.on_invalid)
    return pc.cast(_null_out(as64, bad2), _ARROW_INT[col.kind])


def _to_numeric(col: ColumnSpec, arr: pa.Array, chk: _Checker) -> pa.Array:
    """Decimal text (``12``, ``-1.50``, ``.5``, ``1.``; with decimal_comma ``1.234,56``) stored exactly:
    a value with more significant fraction digits than the scale, or more integer digits than
    precision - scale, is rejected "does not fit", never rounded. Trailing fraction zeros are
    not significant (``1.50`` fits numeric(3,1))."""
    text = pc.utf8_trim_whitespace(arr)
    if col.decimal_comma:
        ok_shape = pc.match_substring_regex(text, r"^[+-]?\d{1,3}(\.\d{3})*(,\d+)?$|^[+-]?\d+(,\d+)?$")
        text = pc.replace_substring(pc.replace_substring(text, ".", ""), ",", ".")
    else:
        ok_shape = pc.match_substring_regex(text, r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)$")
    if pc.any(pc.greater(pc.utf8_length(text), 38)).as_py():
        # Arrow parses at most 38 digits: drop leading zeros and trailing fraction zeros first
        # (one canonical form: 000.500 -> 0.5, .0 -> 0, -2. -> -02)
        text = pc.replace_substring_regex(text, r"^([+-]?)0*([0-9]*)(?:\.0*|(\.[0-9]*[1-9])0*)?$", r"\10\2\3")
    precision, scale = col.precision or 38, col.scale or 0
    target = pa.decimal128(precision, scale)
    bad = chk.flag(pc.invert(ok_shape), col.name, "not a number", arr, col.on_invalid)
    shaped = _null_out(text, bad)
    try:
        # The common case, one kernel: Arrow's cast refuses the whole array when a value has more
        # integer digits than precision - scale ("does not fit in precision") or a non-zero digit
        # past the scale ("would cause data loss"): exactly the "does not fit" rule below, so a cast
        # that succeeds means no value is flagged (tests/test_typing_props.py: both paths).
        return pc.cast(shaped, target)
    except pa.ArrowInvalid:
        pass
    return _cast_fitting(col, arr, shaped, chk, target)


def _cast_fitting(col: ColumnSpec, arr: pa.Array, shaped: pa.Array, chk: _Checker, target: pa.DataType) -> pa.Array:
    """Flag the shaped decimal texts that do not fit ``target`` (digits counted per value), cast the rest.

    ``shaped``: ASCII ``[+-]?digits[.digits]`` or NULL (flagged "not a number" already), at most 38
    digits unless its leading or trailing zeros make it longer."""
    precision, scale = target.precision, target.scale
    # Integer digits: after the sign and leading zeros, up to the point. Significant fraction digits:
    # after the point, trailing zeros excluded. Plain string kernels, no regex replacement (~5x faster).
    body = pc.utf8_ltrim(shaped, characters="+-0")
    point = pc.find_substring(body, ".")
    has_point = pc.greater_equal(point, 0)
    int_digits = pc.if_else(has_point, point, pc.binary_length(body))
    frac_digits = pc.if_else(has_point, pc.subtract(pc.binary_length(pc.utf8_rtrim(body, characters="0")),
                                                    pc.add(point, 1)), 0)
    fits = pc.and_(pc.less_equal(int_digits, precision - scale), pc.less_equal(frac_digits, scale))
    bad = chk.flag(pc.invert(fits), col.name, f"does not fit {col.sql_type}", arr, col.on_invalid)
    return pc.cast(_null_out(shaped, bad), target)


def _to_time(col: ColumnSpec, arr: pa.Array, chk: _Checker) -> pa.Array:
    fmt = col.format or "%Y-%m-%d"
    text = pc.utf8_trim_whitespace(arr)
    parsed = parse_datetimes(text, fmt)
    bad = chk.flag(pc.and_(pc.is_valid(text), pc.is_null(parsed)), col.name, f"not a valid {col.kind} ({fmt})", arr,
                   col.on_invalid)
    parsed = _null_out(parsed, bad)
    if col.kind == "date":  # the calendar day, also before 1970 (a plain cast would round toward zero)
        timeless = not re.search(r"%[HIMSfpXcTrR]", fmt.replace("%%", ""))
        return pc.cast(parsed if timeless else pc.floor_temporal(parsed, unit="day"), pa.date32())
    return parsed


# ---------------------------------------------------------------- strptime, vectorised

# Directives the component path (_regex_times) turns into values; a format with any other
# directive (%j, %U, %W, %w, %u, %G, %V, %c, %x, %X...) is parsed by datetime.strptime per value.
_REGEX_GROUPS = frozenset("YymbBdHIpMSfaA")
# Python's str.isspace() over ASCII: what Python's \s matches there (RE2's \s lacks \v and \x1c-\x1f).
_PY_SPACE = r"[\t\n\x0b\x0c\r\x1c-\x1f ]"
_MIN_S = pa.scalar(dt.datetime(1, 1, 1), pa.timestamp("s"))
_MAX_S = pa.scalar(dt.datetime(9999, 12, 31, 23, 59, 59), pa.timestamp("s"))
_US = 1_000_000


def parse_datetimes(text: pa.Array, fmt: str) -> pa.Array:
    """``datetime.strptime(value, fmt)`` over a string array, vectorised: timestamp[us], NULL where invalid.

    Accepts exactly the values Python's ``datetime.strptime`` accepts (current LC_TIME locale),
    with the same result: unpadded fields (``1/5/2024``, ``5/19/2006 0:00:00``), ``%f``
    fractions of 1-6 digits, case-insensitive names and literals, runs of whitespace for a
    space. Impossible dates (Feb 30), years outside 1..9999 and leap seconds are NULL.
    Stages, each only for the values the previous one left: (0) for formats made only of
    ``%Y %m %d %H %M %S`` with nothing between them, values of the full width in ASCII digits are
    read as integers (:func:`_digit_times`); (1) for formats made of
    ``%Y %m %d %H %M %S`` and literals, Arrow's strptime with a round trip through the
    canonical text (the common zero-padded case: ~0.1 us a value for ``%Y%m%d``); (2) Python's own strptime
    regex (``_strptime.TimeRE``) run by Arrow's RE2 on ASCII values, the fields assembled with
    numpy calendar arithmetic; (3) ``datetime.strptime`` itself for what is left (non-ASCII
    digits or spaces, directives stage 2 does not assemble).
    """
    text = text.cast(pa.string()) if text.type != pa.string() else text
    n = len(text)
    out = pa.nulls(n, pa.timestamp("us"))
    todo = pc.is_valid(text)
    digits = _digit_fields(fmt)
    if digits is not None:  # stage 0: all-digit formats (%Y%m%d), values of the full width
        fast, got = _digit_times(text, digits)
        if fast is not None:
            out = got
            todo = pc.and_(todo, pc.invert(fast))
            if not pc.any(todo).as_py():
                return out
    if _simple_format(fmt):
        parsed = pc.strptime(text, format=fmt, unit="s", error_is_null=True)
        # years 1..9999 only, as datetime (the round trip cannot see a 5-digit %Y)
        in_range = pc.and_(pc.greater_equal(parsed, _MIN_S), pc.less_equal(parsed, _MAX_S))
        ok = pc.fill_null(_canonical(text, parsed, fmt, in_range), False)
        out = _null_out(pc.cast(parsed, pa.timestamp("us")), pc.invert(ok))
        todo = pc.and_(todo, pc.invert(ok))
    if not pc.any(todo).as_py():
        return out
    plan = _regex_plan(fmt, _strptime_lang())
    rest = text.filter(todo)
    if plan is not None:
        ascii_ = pc.fill_null(pc.string_is_ascii(rest), False)
        got = _regex_times(rest, plan)
        out = pc.replace_with_mask(out, todo, got)
        # An ASCII value the regex did not take is invalid for Python too: RE2 and re agree there.
        todo_idx = pc.indices_nonzero(todo)
        slow = pc.filter(todo_idx, pc.invert(ascii_))
    else:
        slow = pc.indices_nonzero(todo)
    if len(slow):
        values = pc.take(text, slow).to_pylist()
        mask = np.zeros(n, dtype=bool)
        mask[slow.to_numpy()] = True
        out = pc.replace_with_mask(out, pa.array(mask), pa.array([_py_strptime(v, fmt) for v in values],
                                                                 pa.timestamp("us")))
    return out


@functools.lru_cache(maxsize=64)
def _digit_fields(fmt: str) -> Optional[Tuple[Tuple[str, int], ...]]:
    """(directive, width) of each field of a format made only of %Y %m %d %H %M %S, each at most once
    and nothing between them (``%Y%m%d``, ``%Y%m%d%H%M%S``); None for any other format."""
    parts = [p for p in re.split(r"(%.)", fmt) if p]
    if not parts or any(p not in _TIME_FIELDS for p in parts) or len(set(parts)) != len(parts):
        return None
    return tuple((p, _TIME_FIELDS[p][1]) for p in parts)


def _digit_times(text: pa.Array, fields: Tuple[Tuple[str, int], ...]) -> Tuple[Optional[pa.Array], pa.Array]:
    """Stage 0 of :func:`parse_datetimes` for an all-digit format: (mask of the values it decided,
    timestamp[us] of the valid ones, NULL elsewhere); (None, _) when no value has the shape.

    A value of exactly the format's width made only of ASCII digits is read by Python's strptime
    field by field at fixed offsets: every field is at most two digits wide except %Y (exactly four),
    so a value of the full width gives every field its full width. Python's regex then takes a
    month 01-12, a day 01-31, an hour 00-23, a minute 00-59 and a second 00-61, and datetime()
    refuses a day past the month's end, a second above 59 and year 0: the values those checks leave
    are exactly the valid ones, computed here as integers (no strptime, no round trip; 37 ns a
    value against 88 in stages 1-2 for %Y%m%d). Unset fields default as in Python (1900-01-01 00:00:00)."""
    width = sum(w for _, w in fields)
    fast = pc.fill_null(pc.and_(pc.equal(pc.binary_length(text), width), pc.ascii_is_decimal(text)), False)
    count = pc.sum(fast).as_py() or 0
    if not count:
        return None, text
    if count == len(text):
        return fast, _digit_values(text, fields)
    return fast, pc.replace_with_mask(pa.nulls(len(text), pa.timestamp("us")), fast,
                                      _digit_values(pc.filter(text, fast), fields))


def _digit_values(text: pa.Array, fields: Tuple[Tuple[str, int], ...]) -> pa.Array:
    """timestamp[us] of ``text``, non-NULL values of the format's full width in ASCII digits (NULL where
    the fields make no valid date-time). The values lie back to back in the data buffer: a matrix of
    digits, each field a small sum of digit columns; days from per-year and per-month tables (no
    integer division, which cost ~4 ns an element and most of the time here)."""
    n = len(text)
    width = sum(w for _, w in fields)
    bufs = text.buffers()
    first = int(np.frombuffer(bufs[1], np.int32, 1, text.offset * 4)[0])
    digits = (np.frombuffer(bufs[2], np.uint8, n * width, first).reshape(n, width) - 48).astype(np.int32)
    got: Dict[str, np.ndarray] = {}
    starts: Dict[str, int] = {}
    at = 0
    for name, w in fields:
        value = digits[:, at]
        for k in range(at + 1, at + w):
            value = value * 10 + digits[:, k]
        got[name], starts[name] = value, at
        at += w
    one = np.ones(n, np.int32)
    zero = np.zeros(n, np.int32)
    month, day = got.get("%m", one), got.get("%d", one)
    hour, minute, second = got.get("%H", zero), got.get("%M", zero), got.get("%S", zero)
    if "%Y" in got:
        year = got["%Y"]
        # leap: divisible by 4 and not by 100, or by 400; from the year's two halves (no division)
        at = starts["%Y"]
        century, low = digits[:, at] * 10 + digits[:, at + 1], digits[:, at + 2] * 10 + digits[:, at + 3]
        leap = ((low & 3) == 0) & ((low != 0) | ((century & 3) == 0))
    else:
        year, leap = np.full(n, 1900, np.int32), np.zeros(n, bool)  # Python's default year, not leap
    safe_month = np.clip(month, 0, 12)
    valid = ((year >= 1) & (month >= 1) & (month <= 12) & (day >= 1)
             & (day <= _MONTH_DAYS[safe_month] + ((month == 2) & leap)) & (hour <= 23) & (minute <= 59)
             & (second <= 59))
    days = _YEAR_DAYS[year] + _MONTH_START[safe_month] + ((month > 2) & leap) + day - 1
    seconds = ((days * 24 + hour) * 60 + minute) * 60 + second
    return pa.array(seconds * _US, pa.timestamp("us"), mask=~valid)


_MONTH_DAYS = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], np.int64)
_MONTH_START = np.concatenate([[0], np.cumsum(_MONTH_DAYS[:-1])]).astype(np.int64)  # days before month m (m=1..12)
# days from 1970-01-01 to January 1st of each year 0..9999 (proleptic Gregorian; year 0 is never valid)
_YEAR_DAYS = np.array([(dt.date(max(y, 1), 1, 1) - dt.date(1970, 1, 1)).days - (366 if y == 0 else 0)
                       for y in range(10000)], np.int64)


def _epoch_us(year: np.ndarray, month: np.ndarray, day: np.ndarray, hour: np.ndarray, minute: np.ndarray,
              second: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Microseconds since 1970-01-01 of proleptic Gregorian fields (days from the civil date by
    H. Hinnant's algorithm); any int64 arrays of one length, not validated."""
    yy = year - (month <= 2)
    era = yy // 400
    yoe = yy - era * 400
    doy = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    us: np.ndarray = ((days * 24 + hour) * 60 + minute) * 60 + second
    return us * _US + frac


def _canonical(text: pa.Array, parsed: pa.Array, fmt: str, in_range: pa.Array) -> pa.Array:
    """Per value: is ``text`` the zero-padded text of ``parsed`` (a successful Arrow strptime of a
    simple format)? Then Python's strptime takes it with the same result.

    Arrow's strptime (glibc's on Linux) also takes unpadded fields, whitespace before a number
    and calendar overflow (Feb 30 -> Mar 1, second 60 -> the next minute). For a format without
    whitespace, a text of the canonical byte length with no whitespace at all has every field at
    its full width (each field reads at most its width in digits, the literals are fixed), so
    only an overflow can make the value differ from the text; an overflow lands on day 1..3 or
    a seconds field of 60 or 61, and only those values are compared with their canonical text (the round trip
    costs ~0.13 us a value, the shape test ~0.03). A format with whitespace takes the round trip
    for every value (its spaces match any run, even an empty one)."""
    if any(c.isspace() for c in fmt):
        return pc.and_(pc.equal(_format_time(parsed, fmt), text), in_range)
    parts = [p for p in re.split(r"(%.)", fmt) if p]
    width = sum(_TIME_FIELDS[p][1] if p in _TIME_FIELDS else len(p.encode()) for p in parts)
    shaped = pc.and_(pc.and_(pc.equal(pc.binary_length(text), width), pc.ascii_is_printable(text)),
                     pc.invert(pc.match_substring(text, " ")))
    ok = pc.fill_null(pc.and_(shaped, in_range), False)
    overflow = pc.less_equal(pc.day(parsed), 3)
    if "%S" in parts:  # second 60 or 61: the field's text (at a fixed offset once shaped) says so
        at = 0
        for p in parts[:parts.index("%S")]:
            at += _TIME_FIELDS[p][1] if p in _TIME_FIELDS else len(p)
        overflow = pc.or_(overflow, pc.greater_equal(pc.utf8_slice_codeunits(text, at, at + 2), "60"))
    recheck = pc.fill_null(pc.and_(ok, overflow), False)
    if pc.any(recheck).as_py():
        idx = pc.indices_nonzero(recheck)
        same = pc.equal(_format_time(pc.take(parsed, idx), fmt), pc.take(text, idx))
        ok = pc.replace_with_mask(ok, recheck, pc.fill_null(same, False))
    return ok


def _py_strptime(value: str, fmt: str) -> Optional[dt.datetime]:
    try:
        parsed = dt.datetime.strptime(value, fmt)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is None else None  # %z: refused by config validation


def _simple_format(fmt: str) -> bool:
    parts = [p for p in re.split(r"(%.)", fmt) if p]
    return bool(parts) and all(p in _TIME_FIELDS if p.startswith("%") else "%" not in p for p in parts) and \
        any(p in _TIME_FIELDS for p in parts) and fmt.isascii()


def _strptime_lang() -> object:
    import _strptime  # type: ignore[import-not-found]  # the stdlib module behind datetime.strptime

    return _strptime._getlang()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _RegexPlan:
    pattern: str  # RE2, anchored at the start, ending in the group "rest_" (must be empty)
    groups: Tuple[str, ...]
    months: Tuple[str, ...]  # locale month names, lower case, index = month number (0 is "")
    months_abbr: Tuple[str, ...]
    am_pm: Tuple[str, ...]


@functools.lru_cache(maxsize=64)
def _regex_plan(fmt: str, lang: object) -> Optional[_RegexPlan]:
    """Python's strptime regex for ``fmt`` as RE2, or None when stage 2 cannot assemble it."""
    import _strptime  # type: ignore[import-not-found]  # the stdlib module behind datetime.strptime

    time_re = _strptime.TimeRE()
    try:
        pattern = time_re.pattern(fmt)
    except (KeyError, ValueError, IndexError):
        return None
    groups = tuple(re.findall(r"\(\?P<(\w+)>", pattern))
    targets = [{"Y": "year", "y": "year", "m": "month", "b": "month", "B": "month", "H": "hour",
                "I": "hour"}.get(g, g) for g in groups]
    if (not set(groups) <= _REGEX_GROUPS or len(set(targets)) != len(targets) or not pattern.isascii()
            or "\\\\" in pattern):
        return None
    body = pattern.replace(r"\s", _PY_SPACE).replace(r"\d", "[0-9]")
    re2 = f"(?i)^{body}(?P<rest_>(?s:.*))$"
    try:
        pc.extract_regex(pa.array([], pa.string()), re2)  # RE2 must take it; else stage 3 does the work
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    lt = time_re.locale_time
    return _RegexPlan(re2, groups, tuple(m.lower() for m in lt.f_month), tuple(m.lower() for m in lt.a_month),
                      tuple(p.lower() for p in lt.am_pm))


def _regex_times(text: pa.Array, plan: _RegexPlan) -> pa.Array:
    """Stage 2: match Python's pattern (leftmost-first, like re.match), then build the values as
    _strptime does (defaults 1900-01-01 00:00:00, %y pivot at 68, %I with %p), and keep only
    real calendar dates in years 1..9999 with seconds below 60 (datetime's own checks)."""
    m = pc.extract_regex(text, plan.pattern)
    ok = pc.fill_null(pc.equal(pc.struct_field(m, "rest_"), ""), False)

    def num(g: str) -> np.ndarray:
        s = pc.utf8_trim_whitespace(pc.fill_null(pc.struct_field(m, g), "0"))
        return pc.cast(pc.if_else(pc.equal(s, ""), "0", s), pa.int64()).to_numpy(zero_copy_only=False)

    def named(g: str, names: Tuple[str, ...]) -> np.ndarray:
        idx = pc.index_in(pc.utf8_lower(pc.struct_field(m, g)), value_set=pa.array(names))
        return pc.fill_null(idx, 0).to_numpy(zero_copy_only=False).astype(np.int64)

    n = len(text)
    g = set(plan.groups)
    year = np.full(n, 1900, np.int64)
    if "Y" in g:
        year = num("Y")
    elif "y" in g:
        y = num("y")
        year = np.where(y <= 68, y + 2000, y + 1900)
    month = num("m") if "m" in g else named("b", plan.months_abbr) if "b" in g else \
        named("B", plan.months) if "B" in g else np.ones(n, np.int64)
    day = num("d") if "d" in g else np.ones(n, np.int64)
    hour = np.zeros(n, np.int64)
    if "H" in g:
        hour = num("H")
    elif "I" in g:
        hour = num("I")
        pm = named("p", plan.am_pm) == 1 if "p" in g else np.zeros(n, bool)
        hour = np.where(pm, np.where(hour != 12, hour + 12, hour), np.where(hour == 12, 0, hour))
    minute = num("M") if "M" in g else np.zeros(n, np.int64)
    second = num("S") if "S" in g else np.zeros(n, np.int64)
    frac = np.zeros(n, np.int64)
    if "f" in g:
        f = pc.utf8_rpad(pc.fill_null(pc.struct_field(m, "f"), "0"), width=6, padding="0")
        frac = pc.cast(f, pa.int64()).to_numpy(zero_copy_only=False)
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    mdays = _MONTH_DAYS[np.clip(month, 0, 12)] + ((month == 2) & leap)
    valid = (ok.to_numpy(zero_copy_only=False) & (year >= 1) & (year <= 9999) & (month >= 1) & (month <= 12)
             & (day >= 1) & (day <= mdays) & (second <= 59))
    return pa.array(_epoch_us(year, month, day, hour, minute, second, frac), pa.timestamp("us"), mask=~valid)


_TIME_FIELDS = {"%Y": (pc.year, 4), "%m": (pc.month, 2), "%d": (pc.day, 2), "%H": (pc.hour, 2),
                "%M": (pc.minute, 2), "%S": (pc.second, 2)}


def _format_time(parsed: pa.Array, fmt: str) -> pa.Array:
    """The canonical (zero-padded) text of ``parsed`` for a format of %Y %m %d %H %M %S and literals,
    built from components: Arrow's strftime costs ~1.5 us a value."""
    pieces: List[object] = []
    run: List[str] = []  # adjacent fields (%Y%m%d) become one integer, one cast and one pad (~3x faster)

    def flush() -> None:
        if run:
            acc = pc.cast(_TIME_FIELDS[run[0]][0](parsed), pa.int64())
            for f in run[1:]:
                fn, width = _TIME_FIELDS[f]
                acc = pc.add(pc.multiply(acc, 10 ** width), pc.cast(fn(parsed), pa.int64()))
            width = sum(_TIME_FIELDS[f][1] for f in run)
            pieces.append(pc.utf8_lpad(pc.cast(acc, pa.string()), width=width, padding="0"))
            run.clear()

    for p in (p for p in re.split(r"(%.)", fmt) if p):
        if p in _TIME_FIELDS:
            run.append(p)
        else:
            flush()
            pieces.append(pa.scalar(p, pa.string()))
    flush()
    return pc.binary_join_element_wise(*pieces, "") if len(pieces) > 1 else pieces[0]


def derived_key(values: Sequence[pa.Array]) -> pa.Array:
    """md5 hex of the source values joined by U+001F, NULL as empty: stable across runs.

    ``values``: string arrays of one length; returns a string array of 32-character keys. The md5
    of each joined value's UTF-8 bytes is taken straight from the joined array's buffer (no Python
    str per row: ~40% less CPU than ``to_pylist`` + ``encode``)."""
    filled = [pc.fill_null(v, "") for v in values]
    joined = pc.binary_join_element_wise(*filled, "\x1f")
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    n = len(joined)
    bufs = joined.buffers()
    offsets = np.frombuffer(bufs[1], np.int32, n + 1, joined.offset * 4).tolist()
    data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")
    md5 = hashlib.md5
    hexes = "".join([md5(data[a:b]).hexdigest() for a, b in zip(offsets, offsets[1:])]).encode("ascii")
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(np.arange(0, 32 * n + 1, 32, dtype=np.int32)),
                                                  pa.py_buffer(hexes)])


# ---------------------------------------------------------------- entry points


def parse_parquet_batch(table: TableSpec, data: bytes, first_row: int = 1) -> ParsedChunk:
    """Type a Parquet record batch: text columns go through the text rules, typed ones are cast safely.

    ``first_row`` is the 1-based row number of the batch in its file; rejects carry it
    as their line number and the offending row (as JSON) as their raw text.
    """
    src = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    missing = [c.name for c in table.columns if c.name not in src.column_names]
    if missing:  # source.read._read_parquet refuses such a file before any row; keep this total
        raise SourceDataError(f"parquet file lacks declared columns {missing}")
    chk = _Checker(src.num_rows)
    typed: Dict[str, pa.Array] = {}
    for col in table.columns:
        arr = src[col.name].combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
                or (col.kind in _TEXT_KINDS and _has_text_form(arr.type))):
            # Text targets take the text rules whatever the stored type: null markers on the
            # value's text, then zfill, then the length check (an int 38881 into char(6) with
            # zfill 6 is '038881'; 7 digits are a reject, never PostgreSQL's 22001).
            typed[col.name] = _convert_column(col, arr.cast(pa.string()), chk)
            continue
        typed[col.name] = _cast_typed(col, arr, chk)
        if not col.nullable:
            chk.flag(pc.is_null(typed[col.name]), col.name, "required value is missing", arr, "reject")
    if table.derived_key:
        name, cols = table.derived_key
        typed[name] = derived_key([pc.cast(src[c].combine_chunks(), pa.string()) for c in cols])
    ordinals = list(range(1, src.num_rows + 1))
    records = {i + 1: _Record(first_row + i, _row_json(src, i)) for i, r in enumerate(chk.reason) if r is not None}
    return _split(table, typed, chk, [], ordinals, src.num_rows, records)


_TEXT_KINDS = ("text", "char", "varchar")
# PostgreSQL's date and timestamp range (4714-11-24 BC .. 5874897-12-31 AD; timestamps up to 294276 AD,
# beyond int64 microseconds) as days / microseconds since 1970-01-01.
_PG_RANGE = {"date": (-2_440_588, 2_145_042_906), "timestamp": (-212_760_172_800_000_000, 2**63 - 1)}


def _has_text_form(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_decimal(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_temporal(t))


def _row_json(src: pa.Table, i: int) -> bytes:
    """Row i of a Parquet batch as JSON, the raw text of its reject."""
    row = src.slice(i, 1)
    try:
        values = row.to_pylist()[0]
    except (OverflowError, ValueError):  # a value Python cannot hold (a date before year 1)
        values = {name: _shown(row.column(name).combine_chunks(), 0) for name in row.column_names}
    return json.dumps(values, default=str).encode()


def _cast_typed(col: ColumnSpec, arr: pa.Array, chk: _Checker) -> pa.Array:
    """A typed Parquet column into a typed target, with the same rules as text.

    Null markers are matched on the value's text as Arrow writes it (int 0 -> "0", a date ->
    "2024-01-31"); the cast is safe and values that do not fit are flagged one by one;
    min/max apply to the cast value. Raises SourceDataError when the types cannot convert."""
    target = _arrow_type(col)
    if col.null_values and _has_text_form(arr.type):
        marked = pc.is_in(pc.cast(arr, pa.string()), value_set=pa.array(list(col.null_values), pa.string()))
        arr = _null_out(arr, pc.fill_null(marked, False))
    try:
        out = pc.cast(arr, target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        if isinstance(exc, pa.ArrowNotImplementedError) or len(arr) == 0:
            raise SourceDataError(f"parquet column {col.name} ({arr.type}) cannot become {col.sql_type}: {exc}") \
                from None
        fits = _fitting(arr, target)
        bad = chk.flag(pc.invert(fits), col.name, f"does not fit {col.sql_type}", arr, col.on_invalid)
        out = pc.cast(_null_out(arr, bad), target, safe=True)
    if col.kind in _PG_RANGE:  # Arrow holds dates PostgreSQL refuses (22008 would fail the whole table)
        lo, hi = _PG_RANGE[col.kind]
        stored = out.view(pa.int64() if col.kind == "timestamp" else pa.int32())
        outside = pc.or_(pc.less(stored, lo), pc.greater(stored, hi))
        out = _null_out(out, chk.flag(outside, col.name, f"outside the range of PostgreSQL's {col.kind}", arr,
                                      col.on_invalid))
    return _check_bounds(col, out, chk, arr)


def _fitting(arr: pa.Array, target: pa.DataType) -> pa.Array:
    """Per value: does the safe cast to ``target`` succeed? Integer targets from integers or floats
    (overflow, fractions, NaN): vectorised as an unchecked cast and back, a value that survives
    the round trip lost nothing. Other types value by value (decimal scale and precision rules)."""
    if pa.types.is_integer(target) and (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        back = pc.cast(pc.cast(arr, target, safe=False), arr.type, safe=False)
        return pc.fill_null(pc.equal(back, arr), True)
    return pa.array([_fits(v, target) for v in arr], pa.bool_())


def _fits(value: pa.Scalar, target: pa.DataType) -> bool:
    try:
        value.cast(target, safe=True)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def parse_chunk(table: TableSpec, data: bytes, first_line: int, header: Optional[Sequence[str]] = None,
                skip_header: bool = False, reject: Optional[str] = None, hint: Optional[str] = None) -> ParsedChunk:
    """Parse, type and validate one record-aligned chunk of a source member.

    ``reject``: the chunk is one record the reader already rejected (too long); ``data`` holds
    its first bytes. ``hint``: the reader's ``scanner.Summary`` of this chunk (encoded), which
    spares a second scan of a clean chunk. ``ParsedChunk.blank_lines`` counts blank lines
    skipped (never rows).
    """
    d = table.dialect
    declared = [c.name for c in table.columns]
    names = list(header) if (header and d.match_by_name) else declared
    if reject is not None:
        rej = pa.table([pa.array([first_line], pa.int64()), pa.array([None], pa.string()),
                        pa.array([reject], pa.string()),
                        pa.array([_raw_text(data, d.encoding)[:len(data)]], pa.string())],  # escapes stay bounded
                       schema=REJECT_SCHEMA)
        return ParsedChunk(arrow_schema(table).empty_table(), rej, 1)
    bom = first_line == 1 and data.startswith(_BOM)
    if bom:
        data = data[len(_BOM):]
    keep_blank = len(names) == 1
    summary = None if (skip_header or bom) else scanner.Summary.decode(hint)
    lay: Optional[_Layout] = None
    if summary is None:
        lay = _Layout(data, d, first_line, skip_header, len(names))
        summary = scanner.Summary(lay.sc.clean, lay.sc.quoted_newlines, len(lay.sc), lay.blank)
    want_rows = len(lay.index) if lay is not None else summary.records - (0 if keep_blank else summary.blank)
    has_nul = b"\x00" in data
    raw: Optional[pa.Table] = None
    invalid: List[Tuple[int, str, str]] = []
    pg_encoding = server_encoding(d)  # not None: text columns stay source bytes, the server transcodes
    if summary.clean and not (has_nul and not d.strip_nul):
        try:
            body = data[lay.header_end if lay else 0:]
            raw = _arrow_parse(body if pg_encoding else _transcode(body, d.encoding), names, d,
                               summary.quoted_newlines, keep_blank=keep_blank,
                               kind=pa.binary() if pg_encoding else pa.string())
            if raw.num_rows != want_rows:  # a defence: the scanner and pyarrow must agree
                raw = None
        except (UnicodeDecodeError, pa.ArrowInvalid):
            raw = None
        if raw is not None and d.trim:
            raw = _trimmed(raw, d)
    records: Optional[Any] = None  # ordinal -> _Record lookups (a _Layout)
    if raw is None:
        # pyarrow does not say where a bad row was: reparse record by record for exact lines.
        lay = lay or _Layout(data, d, first_line, skip_header, len(names))
        raw, invalid = _slow_parse(lay, names, d)  # text (UTF-8): this chunk is sent as before
        records = lay.records()
        pg_encoding = None
    coerced: Dict[str, int] = {}
    if has_nul and d.strip_nul:
        raw = _strip_nul(raw, coerced)
    rows_in = raw.num_rows + len(invalid)
    bad_ordinals = {o for o, _, _ in invalid}
    ordinals: Sequence[int] = ([o for o in range(1, rows_in + 1) if o not in bad_ordinals] if bad_ordinals
                               else range(1, rows_in + 1))
    typed, chk = _type_columns(table, raw, as_bytes=pg_encoding is not None)
    if records is None and chk.rejected:
        records = (lay or _Layout(data, d, first_line, skip_header, len(names))).records()
    out = _split(table, typed, chk, invalid, ordinals, rows_in, records or {}, pg_encoding)
    for k, v in coerced.items():
        out.coerced[k] = out.coerced.get(k, 0) + v
    out.blank_lines = lay.blank if lay is not None else (0 if keep_blank else summary.blank)
    return out


def _strip_nul(raw: pa.Table, coerced: Dict[str, int]) -> pa.Table:
    """Remove NUL bytes from values, after null detection; count the values altered per column."""
    cols = {}
    for n in raw.column_names:
        arr = raw[n]
        has = pc.fill_null(pc.match_substring(arr, "\x00"), False)  # string or binary (source bytes)
        count = pc.sum(has).as_py() or 0
        if count:
            coerced[n] = coerced.get(n, 0) + count
            arr = pc.replace_substring(arr, "\x00", "")
        cols[n] = arr
    return pa.table(cols) if cols else raw


def _trimmed(raw: pa.Table, d: Dialect) -> pa.Table:
    """Trim whitespace, then apply the null markers again: ' NA ' is as null as 'NA'."""
    nulls = pa.array(list(d.null_values), pa.string())
    cols = {}
    for n in raw.column_names:
        arr = pc.utf8_trim_whitespace(raw[n])
        cols[n] = pc.if_else(pc.is_in(arr, value_set=nulls), pa.scalar(None, pa.string()), arr)
    return pa.table(cols)


def _type_columns(table: TableSpec, raw: pa.Table, as_bytes: bool = False) -> Tuple[Dict[str, pa.Array], _Checker]:
    """Typed columns and the rejects' reasons. ``as_bytes``: ``raw`` holds the source's bytes (binary
    columns, server transcoding): text kinds stay bytes, the others are decoded per column."""
    enc = table.dialect.encoding
    chk = _Checker(raw.num_rows, enc)
    typed: Dict[str, pa.Array] = {}
    for col in table.columns:
        arr = (raw[col.name].combine_chunks() if col.name in raw.column_names
               else pa.nulls(raw.num_rows, pa.binary() if as_bytes else pa.string()))
        if not as_bytes:
            typed[col.name] = _convert_column(col, arr, chk)
        elif col.kind in _TEXT_KINDS:
            typed[col.name] = _convert_bytes(col, arr, chk)
        else:
            typed[col.name] = _convert_column(col, decode_column(arr, enc), chk)
    if table.derived_key:
        name, cols = table.derived_key
        source = [decode_column(raw[c].combine_chunks(), enc) for c in cols]
        typed[name] = derived_key(source) if raw.num_rows else pa.array([], pa.string())
    return typed, chk


def _split(table: TableSpec, typed: Dict[str, pa.Array], chk: _Checker, invalid: List[Tuple[int, str, str]],
           ordinals: Sequence[int], rows_in: int, records: Dict[int, _Record],
           client_encoding: Optional[str] = None) -> ParsedChunk:
    schema = arrow_schema(table, client_encoding)
    typed[ROW_COL] = (pa.array(np.arange(ordinals.start, ordinals.stop, dtype=np.int32)) if isinstance(ordinals, range)
                      else pa.array(ordinals, pa.int32()))
    good = pa.table([typed[f.name] for f in schema], schema=schema)
    reject_rows: List[Tuple[int, Optional[str], str, Optional[str]]] = [
        (o, None, why, text) for o, why, text in invalid]
    if chk.rejected:
        good = good.filter(pa.array([r is None for r in chk.reason]))
        reject_rows += [(ordinals[i], r[0], r[1], None) for i, r in enumerate(chk.reason) if r is not None]
    rejects = _reject_table(table.dialect.encoding, records, reject_rows)
    if good.num_rows + rejects.num_rows != rows_in:
        raise LoadkitError("row accounting mismatch inside a chunk", rows_in=rows_in, loaded=good.num_rows,
                           rejected=rejects.num_rows)
    return ParsedChunk(good, rejects, rows_in, chk.coerced)


def _reject_table(encoding: str, records: Dict[int, _Record],
                  reject_rows: List[Tuple[int, Optional[str], str, Optional[str]]]) -> pa.Table:
    if not reject_rows:
        return REJECT_SCHEMA.empty_table()
    lines, cols, reasons, raws = [], [], [], []
    for ordinal, column, reason, text in sorted(reject_rows, key=lambda r: r[0]):
        rec = records.get(ordinal)
        lines.append(rec.line if rec else None)
        cols.append(column)
        reasons.append(reason)
        raws.append(text if text is not None else (_raw_text(rec.raw, encoding) if rec else None))
    return pa.table([pa.array(lines, pa.int64()), pa.array(cols, pa.string()), pa.array(reasons, pa.string()),
                     pa.array(raws, pa.string())], schema=REJECT_SCHEMA)
