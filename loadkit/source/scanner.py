"""The record scanner: the one place that decides where every CSV record starts and ends.

Chunk cutting (``sources.ChunkReader``), the exact start of a split read (``sources.record_start``),
the record-by-record reparse of a chunk pyarrow cannot take (``transform``) and header reading
all ask this module, so a record is the same record whichever of them looks at it, whatever the
chunk size, batch size or number of read splits.

Rules (``Syntax`` carries them; ``Syntax.of(dialect)`` builds one from a plan dialect):

* A record ends at a line feed (LF) outside quotes; a CR just before that LF belongs to the line
  end. Line numbers count LFs (CR-only files are turned into LF files upstream). A bare CR (not
  followed by LF) is data: pyarrow and Python's ``csv`` would end the record there, loadkit does
  not (a CR in a value is far more common than a CR-only line end in the middle of an LF file).
* A quote is special only at the start of a field (after a delimiter or at the record start);
  elsewhere in an unquoted field it is literal text (as in Python's ``csv`` and pyarrow).
* Inside a quoted field, with ``escape`` unset and strict quoting, ``""`` is one quote; with
  ``escape`` set, escape+char is that char. The escape character also works outside quotes
  (``C:\\temp`` with ``escape: "\\"`` reads ``C:temp``), as in both reference parsers.
* ``strict`` quoting (the default): a closing quote must be followed by the delimiter, the line
  end or the end of data; anything else makes the record malformed. It is rejected from its start
  through the end of the physical line where the bad quote is (what Python's ``csv`` with
  ``strict=True`` does), and scanning goes on with the next line.
* ``lenient`` quoting: a quote inside a quoted field closes it only when followed by the
  delimiter, the line end or the end of data; every other quote is literal text (no un-doubling:
  ``"a""b"`` reads ``a""b``). ``"PADARIA "BOM DIA" LTDA"`` reads ``PADARIA "BOM DIA" LTDA``.
* An unterminated quote (no closing quote before the end of data, or before the record reaches
  ``max_record_bytes``) makes the record run from its start through the end of the line on which
  that quote opened; it is rejected ("unterminated quote opened on line N") and scanning goes on
  with the next line. One stray quote costs one record, never the rest of the file.
* A record may not be longer than ``max_record_bytes``: past it, the record runs to the first LF
  at or after that length (or the end of data) and is rejected as too long. Memory stays bounded
  and time linear, whatever the input.

Speed: where every quote sits where well-formed CSV puts it, record ends come from the quote
parity at each LF (exact for well-formed data). Only records with a quote out of place, an escape
character or a bare CR go through the per-token Python state machine (``_one_record``), which then
re-syncs the fast path. Two implementations of all this: a C extension (``_scanner.c``: the fast
path over 64-byte blocks with bit masks, and a line-for-line port of ``_one_record``, without the
GIL) when it is built (``ACCELERATED``), else numpy (``scan_numpy``: finds the quotes, LFs and other
special bytes as arrays, then the Python ``_one_record``). Both yield the same Scan, record for
record, with the same ``slow`` records and reasons (tests/test_scanner_properties.py).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

_c: Optional[ModuleType]
try:
    from loadkit.source import _scanner as _c  # the C fast path (setup.py; optional)
except ImportError:  # built without a compiler: the numpy path
    _c = None

LF, CR = 10, 13
# True when ``scan`` runs the C fast path: the extension is built and LOADKIT_SCANNER is not "numpy"
# (which forces the numpy path, e.g. to compare the two).
ACCELERATED = _c is not None and os.environ.get("LOADKIT_SCANNER", "").lower() != "numpy"
DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024
UNTERMINATED = "unterminated quote"
TOO_LONG = "record longer than max_record_bytes"


@dataclass(frozen=True)
class Syntax:
    """The byte-level CSV syntax of one source: everything the scanner needs, nothing else.

    delimiter, quote, escape: single characters (quote/escape may be None); they must encode to
    one byte each in the source encoding (config validation refuses encodings like UTF-16).
    lenient: the lenient quoting rule (see the module docstring); strict otherwise.
    max_record_bytes: the longest record, in bytes, before it is rejected as too long.
    """

    delimiter: str = ","
    quote: Optional[str] = '"'
    escape: Optional[str] = None
    lenient: bool = False
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES

    @classmethod
    def of(cls, dialect: Any) -> "Syntax":
        """From any object with delimiter/quote/escape and optionally quoting/max_record_bytes."""
        return cls(dialect.delimiter, dialect.quote, dialect.escape,
                   getattr(dialect, "quoting", "strict") == "lenient",
                   getattr(dialect, "max_record_bytes", DEFAULT_MAX_RECORD_BYTES))

    @property
    def doublequote(self) -> bool:
        """True when ``""`` inside a quoted field stands for one quote."""
        return self.quote is not None and self.escape is None and not self.lenient

    def _b(self, ch: Optional[str]) -> Optional[int]:
        return ch.encode("latin-1")[0] if ch else None


@dataclass
class Scan:
    """Records found in a byte string.

    ends[i] is the offset just past record i (record i spans ends[i-1] (or 0) .. ends[i]);
    lines[i] its 1-based physical start line; errors maps a record index to why it cannot be read
    (unterminated quote, malformed quoting, too long); slow holds the indexes of records the
    per-token state machine read (their fields need the exact parser, not a plain CSV reader);
    quoted_newlines is true when some LF lies inside a quoted value; consumed == ends[-1] or 0.
    """

    ends: np.ndarray
    lines: np.ndarray
    errors: Dict[int, str] = field(default_factory=dict)
    slow: set = field(default_factory=set)
    quoted_newlines: bool = False

    @property
    def consumed(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __len__(self) -> int:
        return len(self.ends)

    def span(self, i: int) -> Tuple[int, int]:
        """Byte range [start, end) of record i."""
        return (int(self.ends[i - 1]) if i else 0), int(self.ends[i])

    @property
    def clean(self) -> bool:
        """True when every record was read on the fast path without error: pyarrow reads it the same."""
        return not self.errors and not self.slow


@dataclass(frozen=True)
class Summary:
    """What a chunk's reader learnt by scanning it, so the parse need not scan it again.

    clean: every record is well-formed with every quote in place (pyarrow reads exactly these
    records); quoted_newlines: some value holds a LF; records: records in the chunk (blank ones
    included); blank: blank lines among them. Travels as a short string (``encode``/``decode``).
    """

    clean: bool
    quoted_newlines: bool
    records: int
    blank: int

    def encode(self) -> str:
        return f"{int(self.clean)},{int(self.quoted_newlines)},{self.records},{self.blank}"

    @classmethod
    def decode(cls, text: Optional[str]) -> Optional["Summary"]:
        if not text:
            return None
        c, qn, r, b = text.split(",")
        return cls(c == "1", qn == "1", int(r), int(b))


def blank_records(data: bytes, sc: "Scan") -> np.ndarray:
    """Boolean mask of the records that are blank lines (b"\\n" or b"\\r\\n", no error)."""
    ends = sc.ends
    blank = np.zeros(len(ends), bool)
    if len(ends):
        starts = np.concatenate([[0], ends[:-1]])
        for i in np.flatnonzero((ends - starts) <= 2).tolist():
            if i not in sc.errors and data[int(starts[i]):int(ends[i])] in (b"\n", b"\r\n"):
                blank[i] = True
    return blank


def summarize(data: bytes, sc: "Scan") -> Summary:
    """The Summary of a chunk whose records are exactly ``sc`` (sc.consumed == len(data))."""
    return Summary(sc.clean, sc.quoted_newlines, len(sc), int(blank_records(data, sc).sum()))


class _Need(Exception):
    """The record runs past the end of the buffer and the buffer is not final: read more."""


def scan(data: bytes, syn: Syntax, final: bool = True, first_line: int = 1) -> Scan:
    """Every complete record of ``data`` (which starts at a record start).

    With ``final`` the end of data ends the last record; otherwise a record the buffer does not
    hold whole is left out (``consumed`` says where the next scan must start). Time is linear in
    ``len(data)`` (a record past ``max_record_bytes`` is cut there), memory a few bytes per LF/quote.

    ``data`` may be bytes, a bytearray or a memoryview of either (a reader's window of its buffer;
    the numpy path copies it to bytes first). Runs the C
    fast path when it is built and usable (``ACCELERATED``, ``_accelerable``), else ``scan_numpy``;
    both give the same Scan (tests/test_scanner_properties.py).
    """
    if ACCELERATED and _accelerable(syn):
        return _scan_accel(data, syn, final, first_line)
    return scan_numpy(data, syn, final, first_line)


def _accelerable(syn: Syntax) -> bool:
    """True when the C path's byte dispatch is unambiguous: delimiter, quote and escape are distinct
    bytes and none is a line-end byte (config validation ensures the first; the second is only
    unusual). Anything else goes to the numpy path."""
    b = [syn._b(syn.delimiter), syn._b(syn.quote), syn._b(syn.escape)]
    used = [x for x in b if x is not None]
    return len(set(used)) == len(used) and not {LF, CR} & set(used)


def _scan_accel(data: bytes, syn: Syntax, final: bool = True, first_line: int = 1) -> Scan:
    """``scan`` by the C extension (``_scanner.scan``): the numpy path's parity rule over clean
    stretches, byte by byte, and a port of ``_one_record`` for the records that rule cannot read,
    called exactly where ``scan_numpy`` calls ``_one_record``; all without the GIL. Lines are counted
    as it goes (no array of every LF). The reasons are worded here, as ``_one_record`` words them."""
    assert _c is not None
    qb, eb = syn._b(syn.quote), syn._b(syn.escape)
    pairs, slow_idx, errs, qnl = _c.scan(data, final, syn.delimiter.encode("latin-1")[0],
                                         -1 if qb is None else qb, -1 if eb is None else eb,
                                         syn.doublequote, syn.lenient, syn.max_record_bytes)
    both = np.frombuffer(pairs, np.int64).reshape(-1, 2)
    ends = both[:, 0].copy()
    lines = both[:, 1] + first_line
    errors: Dict[int, Tuple[str, int]] = {}
    for index, kind, aux in errs:
        if kind == 1:
            errors[index] = (f"{UNTERMINATED} opened on line +{aux}", 0)
        elif kind == 2:
            errors[index] = (TOO_LONG, 0)
        else:
            errors[index] = (f"malformed quoting: {chr(aux)!r} after a closing quote", 0)
    return Scan(ends, lines, _absolute(errors, lines), set(np.frombuffer(slow_idx, np.int64).tolist()), bool(qnl))


def _absolute(errors: Dict[int, Tuple[str, int]], lines: np.ndarray) -> Dict[int, str]:
    """The reasons, with "opened on line +k" (relative to the record start) made absolute."""
    reasons: Dict[int, str] = {}
    for i, (why, _start) in errors.items():
        if "opened on line +" in why:  # relative to the record start: make it absolute
            head, rel = why.rsplit("+", 1)
            why = f"{head}{int(lines[i]) + int(rel)}"
        reasons[i] = why
    return reasons


def scan_numpy(data: bytes, syn: Syntax, final: bool = True, first_line: int = 1) -> Scan:
    """``scan`` with numpy: the fallback without the C extension, and the reference the C path is
    tested against. Same contract as ``scan``."""
    if isinstance(data, memoryview):
        data = data.tobytes()
    n = len(data)
    arr = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(arr == LF)
    qb, eb = syn._b(syn.quote), syn._b(syn.escape)
    db = syn.delimiter.encode("latin-1")[0]
    # int64 throughout: searchsorted on an int32 array with a Python int converts the whole array
    empty = np.empty(0, np.int64)
    q = np.flatnonzero(arr == qb) if (qb is not None and data.find(bytes([qb])) >= 0) else empty
    # Positions the parity rule cannot read: escape characters, bare CRs.
    others: List[np.ndarray] = []
    if eb is not None and data.find(bytes([eb])) >= 0:
        others.append(np.flatnonzero(arr == eb))
    cr = np.flatnonzero(arr == CR) if data.find(b"\r") >= 0 else np.empty(0, np.int64)
    if len(cr):
        after = cr + 1
        bare = np.ones(len(cr), bool)
        inside = after < n
        bare[inside] = arr[after[inside]] != LF
        others.append(cr[bare])
    other = np.sort(np.concatenate(others)) if others else np.empty(0, np.int64)
    bad = _bad_quotes(arr, q, db, qb, syn, final) if (qb is not None and len(q)) else (empty, empty)

    ends: List[np.ndarray] = []
    errors: Dict[int, Tuple[str, int]] = {}
    slow: set = set()
    count = 0
    quoted_nl = False
    cap = syn.max_record_bytes
    pos, j = 0, 0  # byte offset of the current record start; index of the first quote at/after it
    while pos < n:
        bad_idx = bad[j & 1]
        k = int(np.searchsorted(bad_idx, j))
        stop = int(q[bad_idx[k]]) if k < len(bad_idx) else n
        k2 = int(np.searchsorted(other, pos))
        if k2 < len(other):
            stop = min(stop, int(other[k2]))
        # [pos, stop) is clean: a LF there ends a record iff the quotes since pos are even.
        lf = nl[np.searchsorted(nl, pos):np.searchsorted(nl, stop)]
        if len(lf):
            parity = ((np.searchsorted(q, lf) - j) & 1) if len(q) else np.zeros(len(lf), np.int64)
            good = lf[parity == 0] + 1
            if len(good) and int(good[-1]) - pos > cap:  # some record may be too long: find the first
                over = np.flatnonzero(np.diff(good, prepend=pos) > cap)
                if len(over):
                    good = good[:over[0]]
            if len(good):
                if parity[:np.searchsorted(lf, good[-1])].any():
                    quoted_nl = True
                ends.append(good)
                count += len(good)
                pos = int(good[-1])
                j = int(np.searchsorted(q, pos)) if len(q) else 0
        if pos >= n:
            break
        if stop == n and not final and n - pos <= cap:
            break  # the tail holds no complete record yet: wait for more data
        # The record at pos holds something the parity rule cannot read: the exact machine reads it.
        try:
            end, why = _one_record(data, pos, syn, final, nl)
        except _Need:
            break
        ends.append(np.array([end], np.int64))
        if why is not None:
            errors[count] = (why, pos)
        elif not quoted_nl and b"\n" in data[pos:end - 1]:
            quoted_nl = True
        slow.add(count)
        count += 1
        pos = end
        j = int(np.searchsorted(q, pos)) if len(q) else 0
    all_ends = np.concatenate(ends) if ends else np.empty(0, np.int64)
    starts = np.concatenate([[0], all_ends[:-1]]) if len(all_ends) else all_ends
    lines = first_line + np.searchsorted(nl, starts)
    return Scan(all_ends.astype(np.int64), lines.astype(np.int64), _absolute(errors, lines), slow, quoted_nl)


def _bad_quotes(arr: np.ndarray, q: np.ndarray, db: int, qb: int, syn: Syntax,
                final: bool) -> "_Bad":
    """Quote indexes that break the parity rule, for both alignments (quote 0 opening / closing).

    An opening quote must follow a delimiter or LF (or start the data); a closing one must precede
    a delimiter, LF, CR LF or the end of (final) data; with doubled quotes a closing quote may
    precede, and an opening one follow, another quote (``""`` inside a value).
    """
    n = len(arr)
    # Padded copy: one LF before (the data starts a record), two sentinels after.
    pad = np.empty(n + 3, np.uint8)
    pad[0] = LF
    pad[1:n + 1] = arr
    pad[n + 1] = LF if final else 0  # end of final data closes a quote; of a partial buffer: unknown
    pad[n + 2] = 0
    prev = pad[q]  # the byte before each quote (views, not q+k arrays: no 8-byte-per-quote temporaries)
    nxt = pad[2:][q]
    open_ok = (prev == db) | (prev == LF)
    close_ok = (nxt == db) | (nxt == LF)
    cr = nxt == CR
    if cr.any():
        close_ok |= cr & (pad[3:][q] == LF)
    if syn.doublequote:
        open_ok |= prev == qb
        close_ok |= nxt == qb
    return _Bad(~open_ok, ~close_ok)


class _Bad:
    """Sorted indexes of the quotes that break the parity rule, per alignment, built on first use."""

    def __init__(self, bad_open: np.ndarray, bad_close: np.ndarray) -> None:
        self._open, self._close = bad_open, bad_close
        self._idx: Dict[int, np.ndarray] = {}

    def __getitem__(self, alignment: int) -> np.ndarray:
        if alignment not in self._idx:
            m = np.empty(len(self._open), bool)
            first, second = (self._open, self._close) if alignment == 0 else (self._close, self._open)
            m[0::2] = first[0::2]  # alignment 0: even quotes open, odd ones close
            m[1::2] = second[1::2]
            self._idx[alignment] = np.flatnonzero(m)
        return self._idx[alignment]


def _line_of(data: bytes, nl: Optional[np.ndarray], start: int, pos: int) -> int:
    """How many LFs lie in [start, pos): the line offset of pos within a record starting at start
    (from ``nl``, the offsets of every LF, when the caller has it; else counted)."""
    if nl is None:
        return data.count(b"\n", start, pos)
    return int(np.searchsorted(nl, pos) - np.searchsorted(nl, start))


def _one_record(data: bytes, s: int, syn: Syntax, final: bool,
                nl: Optional[np.ndarray]) -> Tuple[int, Optional[str]]:
    """The exact state machine for one record starting at ``s``: (end offset, error or None).

    ``nl``: the offsets of every LF in data, or None (then counted where needed).
    Raises _Need when the buffer ends first and is not final.
    """
    n = len(data)
    cap_end = s + syn.max_record_bytes
    delim = syn.delimiter.encode("latin-1")
    quote = syn.quote.encode("latin-1") if syn.quote else None
    esc = syn.escape.encode("latin-1") if syn.escape else None
    esc_byte = esc[0] if esc else -1
    unquoted = re.compile(b"[" + re.escape(delim + b"\n" + (esc or b"")) + b"]")
    # no quote and no escape: nothing ends a quoted field ("[]" is no valid pattern; "(?!)" never matches)
    quoted = re.compile(b"[" + re.escape((quote or b"") + (esc or b"")) + b"]" if (quote or esc) else b"(?!)")
    i = s

    def line_end(p: int) -> int:
        """Offset just past the LF ending the physical line holding p (or the end of data)."""
        k = data.find(b"\n", p)
        if k < 0:
            if not final:
                raise _Need()
            return n
        return k + 1

    def next_unquoted(p: int) -> int:
        """Offset of the first delimiter or LF at or after p in an unquoted field, skipping escape+char
        pairs (an escape keeps the scan inside the same field); -1 when none lies before the end of the
        data or the record cap. Raises _Need for an escape at the very end of a non-final buffer."""
        stop = min(n, cap_end)
        while True:
            m = unquoted.search(data, p, stop)
            if m is None:
                return -1
            j = m.start()
            if esc is None or data[j] != esc_byte:
                return j
            if j + 1 >= n and not final:
                raise _Need()
            p = j + 2

    def too_long() -> Tuple[int, Optional[str]]:
        k = data.find(b"\n", cap_end - 1)
        if k < 0:
            if not final:
                raise _Need()
            return n, TOO_LONG
        return k + 1, TOO_LONG

    while True:
        if i >= cap_end:
            return too_long()
        if i >= n:
            if not final:
                raise _Need()
            return n, None
        if quote is not None and data[i:i + 1] == quote:
            open_at = i
            i += 1
            while True:
                m = quoted.search(data, i, min(n, cap_end))
                if m is None:
                    if cap_end <= n or final:
                        # unterminated: through the end of the line the quote opened on
                        end = line_end(open_at)
                        if end > cap_end:
                            return too_long()
                        return end, f"{UNTERMINATED} opened on line +{_line_of(data, nl, s, open_at)}"
                    raise _Need()
                j = m.start()
                if esc is not None and data[j:j + 1] == esc:
                    i = j + 2
                    continue
                if j + 1 >= n and not final:
                    raise _Need()
                nxt = data[j + 1:j + 2]
                if syn.doublequote and nxt == quote:
                    i = j + 2
                    continue
                if nxt in (delim, b"\n", b"") or (nxt == b"\r" and data[j + 2:j + 3] == b"\n") \
                        or (nxt == b"\r" and j + 2 >= n and final):
                    i = j + 1
                    break
                if nxt == b"\r" and j + 2 >= n:
                    raise _Need()
                if syn.lenient:
                    i = j + 1
                    continue
                end = line_end(j)
                if end > cap_end:
                    return too_long()
                return end, f"malformed quoting: {nxt.decode('latin-1')!r} after a closing quote"
            # after a closing quote: the delimiter, CR LF, LF or the end
            if i >= n:
                return n, None
            c = data[i:i + 1]
            if c == delim:
                i += 1
                continue
            if c == b"\r":
                i += 1
            return min(i + 1, n), None
        j = next_unquoted(i)
        if j < 0:
            if cap_end <= n:
                return too_long()
            if not final:
                raise _Need()
            return n, None
        if data[j] == 10:  # LF
            return j + 1, None
        i = j + 1  # a delimiter: the next field starts


# ---------------------------------------------------------------- fields


def _take_escaped(text: str, i: int, buf: List[str]) -> int:
    """The escape character at ``text[i]`` makes the next character literal (Python csv's
    ``escapechar``; an escape as the last character is dropped). Appends that character to ``buf``
    and returns the index after it."""
    if i + 1 < len(text):
        buf.append(text[i + 1])
    return i + 2


def fields(text: str, syn: Syntax) -> Tuple[List[Tuple[str, bool, str]], Optional[str]]:
    """The fields of one record (decoded text, line end included or not) as (value, was_quoted, as_written).

    ``as_written`` is an unquoted field's text before escapes are resolved (null markers such as
    MySQL's ``\\N`` match it); for a quoted field it is the value.

    Follows exactly the rules of ``_one_record``; returns a reason instead of fields when the
    record is malformed (a scan already rejects those, so this is a second line of defence).
    """
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    d, qc, ec = syn.delimiter, syn.quote, syn.escape
    out: List[Tuple[str, bool, str]] = []
    n = len(text)
    i = 0
    while True:
        buf: List[str] = []
        if qc is not None and i < n and text[i] == qc:
            i += 1
            while True:
                if i >= n:
                    return out, UNTERMINATED
                c = text[i]
                if ec is not None and c == ec:
                    i = _take_escaped(text, i, buf)
                    continue
                if c == qc:
                    nxt = text[i + 1] if i + 1 < n else ""
                    if syn.doublequote and nxt == qc:
                        buf.append(qc)
                        i += 2
                        continue
                    if nxt in (d, "") or (nxt == "\r" and i + 2 == n):
                        i += 1
                        break
                    if syn.lenient:
                        buf.append(c)
                        i += 1
                        continue
                    return out, f"malformed quoting: {nxt!r} after a closing quote"
                buf.append(c)
                i += 1
            value = "".join(buf)
            out.append((value, True, value))
            if i >= n or text[i] == "\r":
                return out, None
            i += 1  # the delimiter
            continue
        begin = i
        while i < n:
            c = text[i]
            if ec is not None and c == ec:
                i = _take_escaped(text, i, buf)
                continue
            if c == d:
                break
            buf.append(c)
            i += 1
        out.append(("".join(buf), False, text[begin:min(i, n)]))
        if i >= n:
            return out, None
        i += 1


def first_record_fields(data: bytes, syn: Syntax, encoding: str) -> Tuple[List[str], Optional[str]]:
    """(The fields of the first record of ``data``, None) — a header or a layout sample; BOM dropped —
    or ([], why) when that record cannot be read (malformed quoting, too long)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    sc = scan(data, syn, final=False)
    if len(sc) == 0:
        sc = scan(data, syn, final=True)
    if len(sc) == 0:
        return [], None
    if 0 in sc.errors:
        return [], sc.errors[0]
    a, b = sc.span(0)
    vals, why = fields(data[a:b].decode(encoding, errors="replace"), syn)
    return ([v for v, _q, _w in vals], None) if why is None else ([], why)


def skip_lines(data: bytes, count: int) -> int:
    """Offset just past the first ``count`` physical lines of data (len(data) if it has fewer)."""
    pos = 0
    for _ in range(count):
        k = data.find(b"\n", pos)
        if k < 0:
            return len(data)
        pos = k + 1
    return pos
