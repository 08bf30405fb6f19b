"""Property tests of the record scanner and the parse path (issue 11).

Random tables (text with delimiters, quotes, escapes, CR/LF, NUL, non-ASCII, empty strings and
NULLs) are written with random dialects, optionally corrupted (ragged rows, stray quotes,
unterminated quotes, bad bytes), cut into chunks of random sizes (and read as random split
spans) and parsed by loadkit. Checked:

* clean inputs: every value loaded equals the table written, and Python's csv (the reference,
  strict dialects) reads the same table;
* always: rows_in = loaded + rejected (+ blank lines skipped), every reject has a line number,
  raw text and reason, and the result does not depend on chunk size or split points.

Profiles: ``ci`` (default; fixed seed, 300 examples per property, ~10 s) and ``long`` (``LOADKIT_HYPOTHESIS=long``:
many more examples, random seed), e.g.
``LOADKIT_HYPOTHESIS=long pytest tests/test_scanner_properties.py``.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import c_path_only
from loadkit.source import scanner
from loadkit.source import files
from loadkit.plan import ROW_COL
from loadkit.transform import parse_chunk
from tests.corpus import spec

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
# Applied per test (not load_profile: that would change every other hypothesis test in the session).
PROFILE = {"ci": settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=_QUIET),
           "long": settings(max_examples=3000, deadline=None, suppress_health_check=_QUIET)}[
    os.environ.get("LOADKIT_HYPOTHESIS", "ci")]

ALPHABET = st.sampled_from(list("ab ,;|\t\"'\\\n\r\x00é€Z0"))
VALUE = st.one_of(st.none(), st.just(""), st.text(ALPHABET, max_size=8))


@st.composite
def dialects(draw: Any) -> Dict[str, Any]:
    delimiter = draw(st.sampled_from([",", ";", "\t", "|"]))
    quote = draw(st.sampled_from(['"', "'"]))
    escape = draw(st.sampled_from([None, None, "\\"]))
    quoting = draw(st.sampled_from(["strict", "strict", "lenient"]))
    return dict(delimiter=delimiter, quote=quote, escape=escape, quoting=quoting,
                newlines_in_values=draw(st.booleans()), null_values=[""], quoted_can_be_null=False)


def _lenient_safe(v: str, d: Dict[str, Any]) -> str:
    """Under lenient quoting a quote followed by the delimiter or a line end closes the field."""
    q = d["quote"]
    out = []
    for i, c in enumerate(v):
        nxt = v[i + 1] if i + 1 < len(v) else ""
        out.append("x" if c == q and nxt in (d["delimiter"], "\n", "\r", "") else c)
    return "".join(out)


def _field(v: Optional[str], d: Dict[str, Any], force_quote: bool) -> str:
    if v is None:
        return ""
    q, e = d["quote"], d["escape"]
    special = set(d["delimiter"] + q + "\n\r" + (e or ""))
    if d["quoting"] == "lenient" and not e:
        return q + _lenient_safe(v, d) + q
    if not v or force_quote or any(c in special for c in v):
        if e:
            body = v.replace(e, e + e).replace(q, e + q)
        else:
            body = v.replace(q, q + q)
        return q + body + q
    return v


def serialise(rows: List[List[Optional[str]]], d: Dict[str, Any], eol: str, quote_all: bool) -> str:
    return "".join(d["delimiter"].join(_field(v, d, quote_all) for v in r) + eol for r in rows)


def expected_rows(rows: List[List[Optional[str]]], d: Dict[str, Any]) -> List[List[Optional[str]]]:
    out = []
    for r in rows:
        vals = []
        for v in r:
            if v is not None and d["quoting"] == "lenient" and not d["escape"]:
                v = _lenient_safe(v, d)
            vals.append(None if v is None else v.replace("\x00", ""))
        out.append(vals)
    return out


def load(data: bytes, d: Dict[str, Any], ncols: int, target: int, cap: int = scanner.DEFAULT_MAX_RECORD_BYTES,
         splits: Tuple[int, ...] = ()) -> Tuple[List[list], List[dict], int, int]:
    """(rows, rejects, rows_in, blank lines) the way the pipeline reads: chunks, optional split spans."""
    table = spec([(f"c{i}", "text") for i in range(ncols)], max_record_bytes=cap, **d)
    syn = scanner.Syntax.of(table.dialect)
    fh = io.BytesIO(data)
    # the pipeline's split read: each span from its exact start, ending where its own reader finds the next
    # span's start (files.span_reader); the chunks of all spans tile the data
    cuts = [0, *splits, len(data)]
    rows: List[list] = []
    rejects: List[dict] = []
    rows_in = blank = 0
    ends = [0]
    for lo, hi in zip(cuts, cuts[1:]):  # one span after the other: they share the one file handle
        chunks = list(files.span_reader(fh, "m", (lo, hi), len(data), syn, target))
        for chunk in chunks:
            assert (chunk.start, chunk.first_line) == (ends[-1], 1 + data.count(b"\n", 0, chunk.start))
            ends.append(chunk.end)
        for chunk in chunks:
            hint = chunk.summary.encode() if chunk.summary else None
            p = parse_chunk(table, chunk.data, chunk.first_line, reject=chunk.reject, hint=hint)
            again = parse_chunk(table, chunk.data, chunk.first_line, reject=chunk.reject)  # no hint: scans itself
            assert (p.rows.to_pylist(), p.rejects.to_pylist()) == (again.rows.to_pylist(), again.rejects.to_pylist())
            assert p.rows_in == p.rows.num_rows + p.rejects.num_rows
            rows_in += p.rows_in
            blank += p.blank_lines
            rows += [list(r.values()) for r in p.rows.drop_columns([ROW_COL]).to_pylist()]
            rejects += p.rejects.to_pylist()
    assert ends[-1] == len(data), "the spans' chunks end where the data ends"
    return rows, rejects, rows_in, blank


@pytest.fixture(autouse=True)
def _tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "_MIN_TARGET", 1)


@PROFILE
@given(d=dialects(), ncols=st.integers(1, 4), data=st.data(), eol=st.sampled_from(["\n", "\r\n"]),
       quote_all=st.booleans())
def test_clean_tables_round_trip_for_every_chunk_size_and_split(d: Dict[str, Any], ncols: int, data: Any, eol: str,
                                                                  quote_all: bool) -> None:
    rows = data.draw(st.lists(st.lists(VALUE, min_size=ncols, max_size=ncols), max_size=10))
    text = serialise(rows, d, eol, quote_all)
    raw = text.encode("utf-8")
    want = expected_rows(rows, d)
    if d["quoting"] == "strict":  # the reference parser reads the same table
        ref = list(csv.reader(io.StringIO(text, newline=""), delimiter=d["delimiter"], quotechar=d["quote"],
                              escapechar=d["escape"], doublequote=d["escape"] is None, strict=True))
        # csv reads a blank line as no row; loadkit's rule: the NULL row of a one-column table.
        ref = [r or [""] for r in ref]
        assert [[v or None for v in r] for r in ref] == [[None if v is None else (v or None) for v in r] for r in rows]
    target = data.draw(st.integers(1, max(1, len(raw))))
    splits = tuple(sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=2))))
    got, rejects, rows_in, blank = load(raw, d, ncols, target, splits=splits)
    assert rejects == []
    assert got == want
    assert rows_in == len(rows) and blank == 0


CORRUPTIONS = ["ragged", "stray_quote", "unterminated", "bad_bytes", "blank", "nul"]


@PROFILE
@given(d=dialects(), ncols=st.integers(1, 4), data=st.data(), eol=st.sampled_from(["\n", "\r\n"]))
def test_corrupted_inputs_keep_the_accounting_and_do_not_depend_on_chunking(d: Dict[str, Any], ncols: int, data: Any,
                                                                          eol: str) -> None:
    rows = data.draw(st.lists(st.lists(VALUE, min_size=ncols, max_size=ncols), min_size=1, max_size=8))
    lines = serialise(rows, d, eol, False).encode("utf-8").split(b"\n")
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(CORRUPTIONS))
        at = data.draw(st.integers(0, len(lines) - 1))
        q, dl = d["quote"].encode(), d["delimiter"].encode()
        if kind == "ragged":
            lines.insert(at, dl.join([b"r"] * (ncols + 1)))
        elif kind == "stray_quote":
            pos = data.draw(st.integers(0, len(lines[at])))
            lines[at] = lines[at][:pos] + q + lines[at][pos:]
        elif kind == "unterminated":
            lines.insert(at, dl.join([b"u"] * (ncols - 1) + [q + b"open"]))
        elif kind == "bad_bytes":
            lines.insert(at, b"\xff\xfe" + dl * (ncols - 1))
        elif kind == "blank":
            lines.insert(at, b"")
        else:
            lines.insert(at, b"n\x00ul" + dl * (ncols - 1))
    raw = b"\n".join(lines)
    cap = data.draw(st.sampled_from([scanner.DEFAULT_MAX_RECORD_BYTES, 40]))
    whole = load(raw, d, ncols, len(raw) + 1, cap)
    target = data.draw(st.integers(1, max(1, len(raw))))
    splits = tuple(sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=2))))
    cut = load(raw, d, ncols, target, cap, splits)
    assert cut == whole
    got, rejects, rows_in, blank = whole
    assert rows_in == len(got) + len(rejects)
    for r in rejects:
        assert r["line_number"] is not None and r["raw"] is not None and r["reason"]
    # every physical line is part of exactly one record, a blank line, or the trailing empty line
    sc = scanner.scan(raw, scanner.Syntax.of(spec([("c", "text")], max_record_bytes=cap, **d).dialect))
    assert sc.consumed == len(raw)
    assert rows_in + blank == len(sc)


@PROFILE
@given(data=st.binary(max_size=300), d=dialects(), final=st.booleans())
def test_scan_is_total_linear_and_prefix_stable(data: bytes, d: Dict[str, Any], final: bool) -> None:
    """Any bytes: records tile a prefix, and scanning more data never moves an earlier record end."""
    syn = scanner.Syntax(d["delimiter"], d["quote"], d["escape"], d["quoting"] == "lenient", 64)
    sc = scanner.scan(data, syn, final=final)
    ends = sc.ends.tolist()
    assert ends == sorted(set(ends)) and all(0 < e <= len(data) for e in ends)
    if final:
        assert sc.consumed == len(data)
    full = scanner.scan(data, syn, final=True).ends.tolist()
    assert full[:len(ends)] == ends


@PROFILE
@given(d=dialects(), ncols=st.integers(2, 3), data=st.data(), eol=st.sampled_from(["\n", "\r\n"]),
       bom=st.booleans(), banner=st.integers(0, 2))
def test_files_with_header_bom_and_banner_lines_through_the_reader(tmp_path_factory: pytest.TempPathFactory,
                                                                  d: Dict[str, Any], ncols: int, data: Any, eol: str,
                                                                  bom: bool, banner: int) -> None:
    """The pipeline's reader (head, header, skip_lines, BOM, chunks) on whole files, random chunk sizes."""
    from loadkit.source import read as pipeline
    from tests.corpus import read_local

    rows = data.draw(st.lists(st.lists(VALUE, min_size=ncols, max_size=ncols), max_size=8))
    names = [f"c{i}" for i in range(ncols)]
    head = "".join(f"exported by tool {i}{eol}" for i in range(banner))
    text = head + d["delimiter"].join(names) + eol + serialise(rows, d, eol, False)
    path = tmp_path_factory.mktemp("f") / "t.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom and not banner else b"") + text.encode("utf-8"))
    target = data.draw(st.integers(1, 200))
    table = spec([(n, "text") for n in names], header=True, skip_lines=banner, **d)
    real = pipeline._target_bytes
    pipeline._target_bytes = lambda sample, rows: target  # type: ignore[assignment]
    try:
        load = read_local(table, path)
    finally:
        pipeline._target_bytes = real  # type: ignore[assignment]
    assert load.errors == [] and load.rejects == []
    assert [list(r.values()) for r in load.rows] == expected_rows(rows, d)


@PROFILE
@given(delimiter=st.sampled_from([",", ";", "\t", "|"]), quote=st.sampled_from(['"', "'"]),
       line=st.text(st.sampled_from(list("ab;,|\t\"'\\é")), max_size=24))
def test_fields_reads_escaped_lines_like_python_csv(delimiter: str, quote: str, line: str) -> None:
    """``scanner.fields`` (the record-by-record path) on any one-line text with a backslash escape,
    strict quoting: whatever ``fields`` reads, csv reads to the same values (a dangling escape at the end
    is where they differ: csv refuses it, loadkit drops it; the scanner rejects such records earlier)."""
    syn = scanner.Syntax(delimiter, quote, "\\", False, 1 << 16)
    got, why = scanner.fields(line + "\n", syn)
    try:
        ref = next(csv.reader([line], delimiter=delimiter, quotechar=quote, escapechar="\\", doublequote=False,
                              strict=True), [])
    except csv.Error:
        ref = None
    if line.endswith("\\") and (len(line) - len(line.rstrip("\\"))) % 2 == 1:
        return  # a dangling escape: csv raises, fields drops it; the scanner rejects such records before
    if why is None:  # whatever loadkit reads, csv reads the same way
        assert ref is not None, (got, ref)
        assert [v for v, _, _ in got] == (ref or [""])
    # csv may read what loadkit refuses: with doublequote off, csv takes a character after a closing
    # quote into the field (``"";`` -> ``;``) where loadkit reports malformed quoting.


# ---------------------------------------------------------------- the C fast path against the numpy one

def _syntaxes() -> Any:
    """Random scanner syntaxes: every delimiter/quote/escape the config allows here, strict or lenient,
    max_record_bytes from tiny (most records too long) to the default."""
    return st.builds(scanner.Syntax, st.sampled_from([",", ";", "\t", "|"]), st.sampled_from(['"', "'", None]),
                     st.sampled_from([None, "\\"]), st.booleans(),
                     st.one_of(st.integers(1, 48), st.just(scanner.DEFAULT_MAX_RECORD_BYTES)))


# Pieces that put quotes, escapes and line ends everywhere: well-formed quoted fields, doubled and
# escaped quotes, stray quotes, CR/LF/CR LF and bare CRs, NUL, non-ASCII, long runs.
_PIECES = st.sampled_from([b'"', b"'", b'""', b",", b";", b"\t", b"|", b"\n", b"\r\n", b"\r", b"\\", b"\\\"",
                           b"\\\n", b"a", b"bc", b"\x00", "é".encode(), b'"x,y"', b"'p;q'", b'"a""b"', b'"l\nm"',
                           b"z" * 30])
CHUNKY = st.lists(_PIECES, max_size=60).map(b"".join)


def _same_scan(data: bytes, syn: "scanner.Syntax", final: bool, first_line: int = 1) -> "scanner.Scan":
    """Scan with both paths and assert every field of the Scan agrees; returns the C path's."""
    ref = scanner.scan_numpy(data, syn, final, first_line)
    got = scanner._scan_accel(data, syn, final, first_line)
    assert got.ends.tolist() == ref.ends.tolist()
    assert got.lines.tolist() == ref.lines.tolist()
    assert got.errors == ref.errors
    assert got.slow == ref.slow
    assert got.quoted_newlines == ref.quoted_newlines
    assert got.ends.dtype == ref.ends.dtype == got.lines.dtype == np.int64
    assert scanner.summarize(data, got) == scanner.summarize(data, ref) if final else True
    return got


def test_the_c_scanner_is_built_and_used_in_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent fallback: the extension imports (``python setup.py build_ext --inplace`` or ``pip install -e .``),
    ``scan`` runs it, and LOADKIT_SCANNER=numpy (read at import) is the only way to the numpy path."""
    c_path_only(monkeypatch, scanner, "LOADKIT_SCANNER", "scan_numpy", "loadkit.source._scanner")
    sc = scanner.scan(b'"a";"b"\n"c\nd";e\nstray"quote;\\x\n', scanner.Syntax(";", '"', "\\"), final=True)
    assert sc.ends.tolist() == [8, 16, 31] and sc.slow == {2} and sc.quoted_newlines


MANY = settings(PROFILE, max_examples=PROFILE.max_examples * 5)  # each example costs microseconds


@MANY
@given(data=CHUNKY, syn=_syntaxes(), final=st.booleans(), first_line=st.integers(1, 10**6))
def test_c_scan_equals_numpy_scan_on_quote_heavy_bytes(data: bytes, syn: "scanner.Syntax", final: bool,
                                                        first_line: int) -> None:
    """Record ends, line numbers, errors (reasons with absolute line numbers), slow records and quoted
    newlines: the same from both paths, for final and partial buffers."""
    _same_scan(data, syn, final, first_line)


@MANY
@given(pieces=st.lists(_PIECES, min_size=20, max_size=400), syn=_syntaxes(), final=st.booleans(),
       lead=st.integers(0, 70))
def test_c_scan_equals_numpy_scan_across_64_byte_blocks(pieces: List[bytes], syn: "scanner.Syntax", final: bool,
                                                        lead: int) -> None:
    """Longer inputs (the C path reads 64-byte blocks with bit masks, the last bytes one by one): every
    special byte lands on every block offset and at block edges; ``lead`` plain bytes shift them."""
    _same_scan(b"x" * lead + b"".join(pieces), syn, final)


@st.composite
def _csv_for(draw: Any, syn: "scanner.Syntax") -> bytes:
    """Mostly well-formed CSV in ``syn``'s dialect, fields of every length (so delimiter-quote, quote-CR-LF
    and the like fall on every 64-byte block edge), with the odd stray quote, escape or bare CR."""
    d, q = syn.delimiter.encode(), (syn.quote or '"').encode()
    text = st.text(st.sampled_from(list("abc xyz0" + syn.delimiter + "\n")), max_size=12).map(str.encode)
    plain = st.text(st.sampled_from(list("abcdef 0123")), max_size=12).map(str.encode)
    field = st.one_of(plain, text.map(lambda t: q + t.replace(q, q + q) + q),
                      st.sampled_from([q, b"a" + q, q + b"b" + q + b"c", b"\\", b"\r", b"\\" + q]))
    row = st.lists(field, min_size=1, max_size=8).map(d.join)
    eol = st.sampled_from([b"\n", b"\r\n", b"\n", b"\r\n", b"\r"])
    lines = draw(st.lists(st.tuples(row, eol), max_size=30))
    return b"".join(r + e for r, e in lines)


@MANY
@given(syn=_syntaxes(), data=st.data(), final=st.booleans(), lead=st.integers(0, 63))
def test_c_scan_equals_numpy_scan_on_dialect_csv(syn: "scanner.Syntax", data: Any, final: bool, lead: int) -> None:
    _same_scan(b"x" * lead + data.draw(_csv_for(syn)), syn, final)


@pytest.mark.parametrize("syn", [scanner.Syntax(";", '"', None), scanner.Syntax(",", "'", "\\"),
                                 scanner.Syntax("|", '"', None, True), scanner.Syntax("\t", '"', None, False, 70)],
                         ids=["doubled", "escaped", "lenient", "cap70"])
def test_c_scan_equals_numpy_scan_for_every_short_motif_at_every_block_edge(syn: "scanner.Syntax") -> None:
    """Exhaustive where random inputs are thin: every string of up to 3 special bytes (delimiter, quote,
    LF, CR, escape, a letter) inserted into well-formed CSV at the offsets around the first two 64-byte
    block edges (and the data start), for final and partial buffers."""
    import itertools

    d, q, e = syn.delimiter.encode(), (syn.quote or '"').encode(), (syn.escape or "\\").encode()
    alphabet = [d, q, b"\n", b"\r", e, b"a"]
    background = (q + b"ab" + q + d + b"cd" + d + q + b"e\nf" + q + b"\r\n") * 12
    offsets = [0, 1, 2, *range(58, 71), *range(122, 135)]
    checked = 0
    for size in (1, 2, 3):
        for motif in itertools.product(alphabet, repeat=size):
            m = b"".join(motif)
            for off in offsets:
                data = background[:off] + m + background[off:]
                for final in (True, False):
                    _same_scan(data, syn, final)
                    checked += 1
    assert checked == 2 * len(offsets) * (6 + 36 + 216)


@MANY
@given(data=st.binary(max_size=200), syn=_syntaxes(), final=st.booleans())
def test_c_scan_equals_numpy_scan_on_any_bytes(data: bytes, syn: "scanner.Syntax", final: bool) -> None:
    _same_scan(data, syn, final)


@PROFILE
@given(d=dialects(), ncols=st.integers(1, 4), rows=st.data(), eol=st.sampled_from(["\n", "\r\n"]),
       cap=st.sampled_from([scanner.DEFAULT_MAX_RECORD_BYTES, 64]), cut=st.data())
def test_c_scan_equals_numpy_scan_on_tables_and_every_prefix(d: Dict[str, Any], ncols: int, rows: Any, eol: str,
                                                             cap: int, cut: Any) -> None:
    """Serialised tables (clean, or with a stray quote inserted anywhere), whole and cut at a random
    byte (a non-final buffer, as the chunk reader scans it)."""
    table = rows.draw(st.lists(st.lists(VALUE, min_size=ncols, max_size=ncols), max_size=10))
    raw = serialise(table, d, eol, rows.draw(st.booleans())).encode("utf-8")
    if raw and cut.draw(st.booleans()):
        at = cut.draw(st.integers(0, len(raw)))
        raw = raw[:at] + d["quote"].encode() + raw[at:]
    syn = scanner.Syntax(d["delimiter"], d["quote"], d["escape"], d["quoting"] == "lenient", cap)
    _same_scan(raw, syn, True)
    _same_scan(raw[:cut.draw(st.integers(0, len(raw)))], syn, False)


def _chunks(data: bytes, syn: "scanner.Syntax", target: int, accelerated: bool) -> List[tuple]:
    saved = scanner.ACCELERATED
    scanner.ACCELERATED = accelerated
    try:
        reader = files.ChunkReader(io.BytesIO(data), "m", target, None, None, False, syntax=syn)
        return [(c.start, c.end, c.first_line, c.data, c.reject, c.summary) for c in reader]
    finally:
        scanner.ACCELERATED = saved


@PROFILE
@given(data=CHUNKY, syn=_syntaxes(), target=st.integers(1, 300))
def test_chunk_reader_cuts_the_same_chunks_with_either_scanner(data: bytes, syn: "scanner.Syntax",
                                                               target: int) -> None:
    """Random chunk sizes: the same chunks (bytes, offsets, first lines, rejects, summaries) with the C
    path as with numpy, and every chunk edge is a record end of the whole buffer's scan."""
    got = _chunks(data, syn, target, True)
    assert got == _chunks(data, syn, target, False)
    whole = set(_same_scan(data, syn, True).ends.tolist()) | {0}
    assert b"".join(c[3] for c in got if c[4] is None) == b"".join(
        data[c[0]:c[1]] for c in got if c[4] is None)
    starts, ends = [c[0] for c in got], [c[1] for c in got]
    assert (starts == [0] + ends[:-1] and ends[-1] == len(data)) if got else data == b""
    for start, end, *_ in got:
        assert start in whole and end in whole, (start, end, sorted(whole))


def _uncovered(size: int, ranges: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """[0, size) less the sorted, disjoint ``ranges``, as (start, end) pieces."""
    out, at = [], 0
    for s, e in ranges:
        if s > at:
            out.append((at, s))
        at = max(at, e)
    return out + [(at, size)] if at < size else out


@PROFILE
@given(data=CHUNKY, syn=_syntaxes(), target=st.integers(1, 300), picks=st.data())
def test_spans_with_committed_ranges_read_every_uncommitted_byte_once(data: bytes, syn: "scanner.Syntax",
                                                                       target: int, picks: Any) -> None:
    """A split read (files.span_reader: each span's end found by its own reader as it cuts chunks) against the
    whole buffer's scan: random cuts, random committed ranges between record ends (what an earlier run with
    any batch size or split commits), random chunk sizes, record caps and quote-heavy bytes. The spans'
    chunks, in order, cover exactly the uncommitted bytes, each from one record end of the whole scan to
    another, with its exact first line and, unless it is a too-long record's reject, its exact bytes."""
    edges = [0] + scanner.scan(data, syn, final=True).ends.tolist()
    points = sorted(picks.draw(st.lists(st.integers(0, len(edges) - 1), max_size=6, unique=True)))
    committed = [(edges[a], edges[b]) for a, b in zip(points[::2], points[1::2])]
    cuts = sorted(picks.draw(st.lists(st.integers(0, len(data)), max_size=3)))
    fh = io.BytesIO(data)
    got = []
    for lo, hi in zip([0, *cuts], [*cuts, len(data)]):
        got += list(files.span_reader(fh, "m", (lo, hi), len(data), syn, target, committed))
    merged: List[Tuple[int, int]] = []
    for c in got:
        assert c.start in edges and c.end in edges and c.start < c.end, (c.start, c.end, edges)
        assert c.first_line == 1 + data.count(b"\n", 0, c.start)
        assert c.reject is not None or c.data == data[c.start:c.end]
        if merged and merged[-1][1] == c.start:
            merged[-1] = (merged[-1][0], c.end)
        else:
            assert not merged or merged[-1][1] < c.start, "chunks in order, none twice"
            merged.append((c.start, c.end))
    assert merged == _uncovered(len(data), [r for r in committed if r[0] < r[1]])
