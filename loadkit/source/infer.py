"""``loadkit init FILE...``: infer a job from sample files and write it as a commented job YAML.

What is inferred, and from what:
- compression / container from magic bytes: gzip (1f 8b), zip (PK), parquet (PAR1); else plain text;
- encoding: UTF-8 if the sample decodes, else latin-1 / cp1252 by the high bytes present, else
  charset_normalizer's guess (check accented text after a first load);
- delimiter and quote: ``csv.Sniffer`` over the sample (candidates , ; tab |);
- header: a first row whose values do not fit the types of the rows below it (``csv.Sniffer.has_header``
  when every column is text);
- column names (from the header, made into SQL identifiers) and types, in this order: boolean,
  integer/bigint (codes with leading zeros stay text), numeric(p,s) with a dot or a decimal comma,
  double (exponents), date and timestamp with the first format of ``DATE_FORMATS`` / ``TIMESTAMP_FORMATS``
  every value round-trips through, else text;
- null markers (``NA``, ``null``, ``-``...) per typed column, when the column types only without them;
- parquet: names and types from the file's schema.

Every inferred type is then checked with the engine's own parser (``transform.parse_chunk``) over
the whole sample: a column with any reject falls back to text, so the job loads the sample exactly.
Files up to ``--sample-bytes`` (default 64 MB) are read whole; for larger files the types come from
that prefix and the YAML says so.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import io
import json
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

NULL_MARKERS = ("NA", "N/A", "n/a", "null", "NULL", "Null", "None", "none", "NaN", "nan", "-", "#N/A", "\\N")
DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%d-%m-%Y", "%Y%m%d")
TIMESTAMP_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y/%m/%d %H:%M:%S", "%Y/%m/%d %H:%M",
                     "%Y-%m-%d %H:%M", "%d/%m/%Y %H:%M:%S", "%d/%m/%Y %H:%M", "%m/%d/%Y %H:%M:%S")
_BOOL = {"true", "false", "t", "f", "yes", "no", "y", "n"}
_INT = re.compile(r"^[+-]?\d+$")
_DEC = re.compile(r"^[+-]?\d+(\.\d+)?$")
_DEC_COMMA = re.compile(r"^[+-]?\d{1,3}(\.\d{3})*(,\d+)?$|^[+-]?\d+(,\d+)?$")
_FLOAT = re.compile(r"^\s*[+-]?((\d+\.?\d*)|(\.\d+))([eE][+-]?\d+)?\s*$")
_IDENT = re.compile(r"[^a-z0-9_]+")


@dataclass
class ColumnGuess:
    """One inferred column: its SQL name, the header text it came from, type and parse options."""

    name: str
    source_name: str
    type: str = "text"
    format: Optional[str] = None
    decimal_comma: bool = False
    null_values: List[str] = field(default_factory=list)
    example: str = ""
    note: str = ""

    def as_config(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "type": self.type}
        if self.format:
            out["format"] = self.format
        if self.decimal_comma:
            out["decimal_comma"] = True
        if self.null_values:
            out["null_values"] = list(self.null_values)
        return out


@dataclass
class TableGuess:
    """What ``init`` found out about one file."""

    table: str
    path: Path
    format: str = "csv"
    member: Optional[str] = None
    delimiter: str = ","
    quote: Optional[str] = '"'
    header: bool = True
    encoding: str = "utf-8"
    newlines_in_values: bool = True
    columns: List[ColumnGuess] = field(default_factory=list)
    rows_sampled: int = 0
    whole_file: bool = True
    notes: List[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading the sample


def _container(path: Path) -> str:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"PK\x03\x04":
        return "zip"
    if magic == b"PAR1":
        return "parquet"
    return "csv"


def _sample(path: Path, fmt: str, limit: int) -> Tuple[bytes, bool, Optional[str]]:
    """(up to ``limit`` decompressed bytes cut at the last newline, whole file read?, zip member)."""
    member = None
    if fmt == "gzip":
        fh: Any = gzip.open(path, "rb")
    elif fmt == "zip":
        zf = zipfile.ZipFile(path)
        names = [i.filename for i in zf.infolist() if not i.is_dir()]
        member = names[0]
        fh = zf.open(member)
    else:
        fh = open(path, "rb")
    with fh:
        data = fh.read(limit + 1)
    whole = len(data) <= limit
    if not whole:
        data = data[: data.rfind(b"\n") + 1] or data[:limit]
    return data, whole, member


def _encoding(data: bytes) -> str:
    """utf-8 if the bytes decode as UTF-8; else latin-1 when every high byte is a latin-1 letter or
    sign (0xA0-0xFF: the common Western case), cp1252 when its 0x80-0x9F punctuation appears; only
    then charset_normalizer's guess (other 8-bit code pages), falling back to latin-1."""
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    high = set(data) & set(range(0x80, 0x100))
    if not high & set(range(0x80, 0xA0)):
        return "latin-1"
    try:
        data.decode("cp1252")
        return "cp1252"
    except UnicodeDecodeError:
        pass
    try:
        from charset_normalizer import from_bytes

        best = from_bytes(data[: 1 << 20]).best()
        if best is not None:
            enc = best.encoding.replace("_", "-")
            data.decode(enc)
            return enc
    except (ImportError, LookupError, UnicodeDecodeError):
        pass
    return "latin-1"  # decodes any byte sequence: nothing is rejected for its encoding


def _quote(head: str, delimiter: str, sniffed: Optional[str]) -> str:
    """'"' unless the sample has no '"' and a field wrapped in the sniffed quote holds the delimiter
    (the one reason to quote it: a value that merely starts and ends with ' is data)."""
    if sniffed in (None, '"') or '"' in head:
        return '"'
    q, d = re.escape(sniffed), re.escape(delimiter)
    wrapped = re.search(rf"(^|{d}){q}[^{q}\n]*{d}[^{q}\n]*{q}({d}|$)", head, re.MULTILINE)
    return sniffed if wrapped else '"'


def _score(head: str, delimiter: str, quote: str) -> Tuple[bool, int, int, int]:
    """(every row has the same number of fields > 1, columns that type as non-text below the first
    row, the same counting the first row, fields per row)."""
    rows = [r for r in csv.reader(io.StringIO(head, newline=""), delimiter=delimiter, quotechar=quote) if r]
    widths = {len(r) for r in rows}
    width = max(widths) if widths else 0
    if not rows or width < 2:
        return False, 0, 0, width

    others = set(";\t|") - {delimiter}  # left inside a field, these say the split is wrong

    def typed(part: List[List[str]]) -> int:
        count = 0
        for i in range(width):
            values = [r[i] for r in part if i < len(r) and r[i] != ""]
            if not any(others & set(v) for v in values) and _type_of(values, f"c{i}", delimiter)[0] != "text":
                count += 1
        return count

    return len(widths) == 1, typed(rows[1:] if len(rows) > 1 else rows), typed(rows), width


def _dialect(text: str) -> Tuple[str, Optional[str]]:
    """Delimiter and quote: csv.Sniffer's guess, replaced by another candidate delimiter that splits
    the sample into a consistent number of fields with more typed columns (the sniffer cannot tell
    "0;0,5" = two numbers with a decimal comma from "0;0" and "5")."""
    head = text[: 64 * 1024]
    try:
        d = csv.Sniffer().sniff(head, delimiters=",;\t|")
        delimiter, sniffed = d.delimiter, d.quotechar
    except csv.Error:
        counts = {c: head.count(c) for c in ",;\t|"}
        delimiter, sniffed = max(counts, key=lambda c: counts[c]), '"'
    # On a tie the rarer character in data wins (a comma is also a decimal mark and punctuation).
    rarity = {"\t": 3, "|": 2, ";": 1, ",": 0}

    def key(cand: str) -> Tuple[Any, ...]:
        return (*_score(head, cand, _quote(head, cand, sniffed))[:3], rarity[cand])

    candidates = [c for c in ",;\t|" if c == delimiter or c in head]
    delimiter = max(candidates, key=key)
    return delimiter, _quote(head, delimiter, sniffed)


# ---------------------------------------------------------------- column types


def _fits_time(values: Sequence[str], fmt: str) -> bool:
    for v in values:
        try:
            if dt.datetime.strptime(v, fmt).strftime(fmt) != v:  # the engine round-trips too
                return False
        except ValueError:
            return False
    return True


def _numeric_type(values: Sequence[str], comma: bool) -> Optional[str]:
    int_digits, scale = 1, 0
    for v in values:
        s = v.strip().lstrip("+-")
        if comma:
            s = s.replace(".", "").replace(",", ".")
        whole, _, frac = s.partition(".")
        int_digits = max(int_digits, len(whole.lstrip("0")) or 1)
        scale = max(scale, len(frac))
    # Two digits of headroom over the sample's widest integer part: the next file may be larger.
    precision = int_digits + 2 + scale
    if int_digits + scale > 38:
        return None
    return f"numeric({min(precision, 38)},{scale})"


def _type_of(values: Sequence[str], name: str, delimiter: str) -> Tuple[str, Optional[str], bool]:
    """(type, date format, decimal comma) fitting every value (no nulls among them)."""
    if not values:
        return "text", None, False
    stripped = [v.strip() for v in values]
    if all(v.lower() in _BOOL for v in stripped) and any(v.lower() in ("true", "false") for v in stripped):
        return "boolean", None, False
    if all(_INT.match(v) for v in stripped):
        if any(re.match(r"^[+-]?0\d", v) for v in stripped):
            return "text", None, False  # codes: a leading zero must survive
        if "dat" in name.lower() and _fits_time(values, "%Y%m%d"):
            return "date", "%Y%m%d", False
        biggest = max(abs(int(v)) for v in stripped)
        if biggest < 2**31:
            return "integer", None, False
        if biggest < 2**63:
            return "bigint", None, False
        return "text", None, False
    if all(_DEC.match(v) for v in stripped):
        t = _numeric_type(stripped, comma=False)
        if t:
            return t, None, False
    if delimiter != "," and all(_DEC_COMMA.match(v) for v in stripped) and any("," in v for v in stripped):
        t = _numeric_type(stripped, comma=True)
        if t:
            return t, None, True
    if all(_FLOAT.match(v) for v in stripped):
        return "double", None, False
    for fmt in DATE_FORMATS:
        if fmt != "%Y%m%d" and _fits_time(values, fmt):
            return "date", fmt, False
    for fmt in TIMESTAMP_FORMATS:
        if _fits_time(values, fmt):
            return "timestamp", fmt, False
    return "text", None, False


def _column(values: List[Optional[str]], name: str, source: str, delimiter: str) -> ColumnGuess:
    present = [v for v in values if v is not None and v != ""]
    col = ColumnGuess(name=name, source_name=source, example=present[0] if present else "")
    kind, fmt, comma = _type_of(present, name, delimiter)
    markers: List[str] = []
    if kind == "text":  # maybe typed once the null markers are out
        markers = sorted({v for v in present if v.strip() in NULL_MARKERS})
        rest = [v for v in present if v.strip() not in NULL_MARKERS]
        if markers and rest:
            kind2, fmt2, comma2 = _type_of(rest, name, delimiter)
            if kind2 != "text":
                kind, fmt, comma = kind2, fmt2, comma2
                col.example = rest[0]
            else:
                markers = []
        else:
            markers = []
    col.type, col.format, col.decimal_comma, col.null_values = kind, fmt, comma, markers
    return col


def identifier(text: str, used: Sequence[str], position: int) -> str:
    """A SQL identifier from a header value: lowercase, [a-z0-9_], not starting with a digit or
    the reserved _lk_, unique among ``used``; ``col_<n>`` when nothing is left."""
    name = _IDENT.sub("_", text.strip().lower()).strip("_")[:50] or f"col_{position}"
    if name[0].isdigit():
        name = f"c_{name}"
    if name.startswith("_lk_") or name.startswith("lk_"):
        name = f"col_{name.lstrip('_')}"
    base, n = name, 2
    while name in used:
        name, n = f"{base}_{n}", n + 1
    return name


# ---------------------------------------------------------------- one file


def infer_file(path: Path, table: Optional[str] = None, sample_bytes: int = 64 << 20) -> TableGuess:
    """Infer the table of one file (see the module docstring). Raises ValueError for an empty file."""
    path = Path(path)
    name = table or identifier(path.name.split(".")[0], [], 1)
    fmt = _container(path)
    if fmt == "parquet":
        return _infer_parquet(path, name)
    data, whole, member = _sample(path, fmt, sample_bytes)
    if not data.strip():
        raise ValueError(f"{path} is empty: nothing to infer from")
    guess = TableGuess(table=name, path=path, format=fmt, member=member, whole_file=whole)
    guess.encoding = _encoding(data)
    text = data.decode(guess.encoding)
    if text.startswith("\ufeff"):
        guess.notes.append("the file starts with a UTF-8 byte-order mark")
    guess.delimiter, guess.quote = _dialect(text)
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=guess.delimiter, quotechar=guess.quote or '"'))
    rows = [r for r in rows if r]
    width = max(len(r) for r in rows)
    guess.newlines_in_values = not whole or any("\n" in v or "\r" in v for r in rows for v in r)
    body = [r + [""] * (width - len(r)) for r in rows]
    guess.header = _has_header(body, text, guess.delimiter)
    header = body[0] if guess.header else [f"col_{i + 1}" for i in range(width)]
    data_rows = body[1:] if guess.header else body
    used: List[str] = []
    for i in range(width):
        cname = identifier(header[i], used, i + 1)
        used.append(cname)
        guess.columns.append(_column([r[i] for r in data_rows], cname, header[i], guess.delimiter))
    guess.rows_sampled = len(data_rows)
    _check_with_engine(guess, data)
    return guess


def _has_header(body: List[List[str]], text: str, delimiter: str) -> bool:
    if len(body) < 2:
        return False
    first, rest = body[0], body[1:]
    typed = False
    for i, value in enumerate(first):
        col = _column([r[i] for r in rest], f"c{i}", "", delimiter)
        if col.type == "text":
            continue
        typed = True
        if value == "" or value in col.null_values:
            continue
        if not _value_fits(value, col, delimiter):
            return True
    if typed:
        return False
    if any(v and _type_of([v], f"c{i}", delimiter)[0] != "text" for i, v in enumerate(first)):
        return False  # a header is names: a number or a date in the first row is data
    try:
        return csv.Sniffer().has_header(text[: 64 * 1024])
    except csv.Error:
        return len(set(first)) == len(first) and all(v and not v[0].isdigit() for v in first)


# A first-row value of one of these kinds is data, not a header, in a column of the key's kind
# (a header is words, so any number in a number column means "data").
_WIDER = {"integer": {"integer", "bigint", "numeric", "double"}, "bigint": {"integer", "bigint", "numeric", "double"},
          "numeric": {"integer", "bigint", "numeric", "double"}, "double": {"integer", "bigint", "numeric", "double"}}


def _value_fits(value: str, col: ColumnGuess, delimiter: str) -> bool:
    """Could this (first-row) value belong to the column as typed from the rows below it?"""
    if col.format:
        return _fits_time([value], col.format)
    kind, _, comma = _type_of([value], col.name, delimiter)
    base, col_base = kind.split("(")[0], col.type.split("(")[0]
    if col_base in _WIDER:
        return base in _WIDER[col_base]
    return base == col_base


def _infer_parquet(path: Path, name: str) -> TableGuess:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    guess = TableGuess(table=name, path=path, format="parquet", header=False, quote=None)
    used: List[str] = []
    for i, f in enumerate(schema):
        cname = identifier(f.name, used, i + 1)
        used.append(cname)
        t = f.type
        kind = ("boolean" if pa.types.is_boolean(t) else "smallint" if t in (pa.int8(), pa.int16(), pa.uint8())
                else "integer" if t in (pa.int32(), pa.uint16()) else "bigint" if pa.types.is_integer(t)
                else "double" if pa.types.is_floating(t) else "date" if pa.types.is_date(t)
                else "timestamp" if pa.types.is_timestamp(t)
                else f"numeric({t.precision},{t.scale})" if pa.types.is_decimal(t) else "text")
        guess.columns.append(ColumnGuess(cname, f.name, kind))
    guess.rows_sampled = pq.ParquetFile(path).metadata.num_rows
    return guess


def _check_with_engine(guess: TableGuess, data: bytes) -> None:
    """Parse the sample with loadkit's own parser; a column with rejects falls back to text."""
    from loadkit.plan import Dialect, TableSpec, column_from
    from loadkit.transform import parse_chunk

    for _ in range(len(guess.columns) + 1):
        spec = TableSpec(
            name=guess.table, schema="public", mode="append",
            columns=tuple(column_from(c.as_config()) for c in guess.columns),
            key=(), derived_key=None, indexes=(), format="csv", member=None,
            dialect=Dialect(guess.delimiter, guess.quote, None, guess.header, False, guess.encoding, ("",),
                            guess.newlines_in_values, True, False),
            allow_empty=True, files=(), max_reject_rate=0.0, max_rejects=None)
        parsed = parse_chunk(spec, data, 1, None, guess.header)
        if parsed.rejects.num_rows == 0:
            return
        bad = {c for c in parsed.rejects.column("column_name").to_pylist() if c}
        typed = [c for c in guess.columns if c.name in bad and c.type != "text"]
        if not typed:
            guess.notes.append(f"{parsed.rejects.num_rows} sampled row(s) do not parse as records: "
                               f"{parsed.rejects.column('reason').to_pylist()[:3]}")
            return
        for c in typed:
            c.note = f"was {c.type}{' ' + c.format if c.format else ''}; loadkit's parser rejected a value"
            c.type, c.format, c.decimal_comma, c.null_values = "text", None, False, []


# ---------------------------------------------------------------- the YAML


def _q(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # JSON is YAML: quoting and escapes are right


def render(job: str, guesses: Sequence[TableGuess], data_root: Path) -> str:
    """The commented job YAML for these tables (paths relative to data_root)."""
    lines = [f"# Inferred by `loadkit init` from {len(guesses)} file(s) under {data_root}.",
             "# Every type fits every sampled value, checked with loadkit's own parser; read the notes, then load:",
             f"#   loadkit --config-dir <the folder holding job/> +job={job} data_root={data_root}",
             f"name: {job}", "schema: public", "tables:"]
    for g in guesses:
        rel = g.path.resolve().relative_to(data_root.resolve()).as_posix()
        sample = (f"all {g.rows_sampled:,} rows" if g.whole_file else
                  f"the first {g.rows_sampled:,} rows (a prefix of the file: check the types)")
        lines += [f"  # {rel}: {g.format}, types from {sample}"] + [f"  # note: {n}" for n in g.notes]
        lines += [f"  {g.table}:", "    mode: append  # or merge (with key: [...]), replace, snapshot", "    source:",
                  f"      paths: [{_q(rel)}]", f"      format: {g.format}"]
        if g.member:
            lines.append(f"      member: {_q(g.member)}")
        if g.format != "parquet":
            dialect = {"delimiter": g.delimiter, "quote": g.quote, "header": g.header, "encoding": g.encoding,
                       "null_values": [""], "newlines_in_values": g.newlines_in_values}
            lines.append("      dialect: {" + ", ".join(f"{k}: {_q(v)}" for k, v in dialect.items()) + "}")
        lines.append("    columns:")
        for c in g.columns:
            cfg = ", ".join(f"{k}: {_q(v)}" for k, v in c.as_config().items())
            comment = f"  # {c.source_name!r}" if c.source_name != c.name else ""
            if c.example:
                comment += f"{'  #' if not comment else ','} e.g. {c.example[:40]!r}"
            if c.note:
                comment += f" ({c.note})"
            lines.append(f"      - {{{cfg}}}{comment}")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loadkit init", description="Infer a job YAML from sample files.")
    p.add_argument("files", nargs="+", type=Path, help="sample files (csv, gzip, zip, parquet)")
    p.add_argument("-o", "--output", type=Path, help="where to write the YAML (default: print it); "
                   "put it in <dir>/job/NAME.yaml and load with --config-dir <dir>")
    p.add_argument("--name", help="job name (default: the output file's stem, else the first file's)")
    p.add_argument("--data-root", type=Path,
                   help="folder the paths are relative to (default: the files' common folder)")
    p.add_argument("--sample-bytes", type=int, default=64 << 20, help="bytes read per file (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``loadkit init``: 0 written, 2 bad arguments (missing file, existing output)."""
    import os

    args = parser().parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        sys.stderr.write(f"loadkit init: config error: no such file: {', '.join(missing)}\n")
        return 2
    root = args.data_root or Path(os.path.commonpath([str(f.resolve().parent) for f in args.files]))
    job = args.name or (args.output.stem if args.output else identifier(args.files[0].name.split(".")[0], [], 1))
    used: List[str] = []
    guesses = []
    for f in args.files:
        table = identifier(f.name.split(".")[0], used, len(used) + 1)
        used.append(table)
        try:
            guesses.append(infer_file(f, table, args.sample_bytes))
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            sys.stderr.write(f"loadkit init: source data error: {f}: {exc}\n")
            return 3
    text = render(job, guesses, root)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    if args.output.exists() and not args.force:
        sys.stderr.write(f"loadkit init: config error: {args.output} exists (--force overwrites it)\n")
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    sys.stderr.write(f"wrote {args.output}; load with: loadkit --config-dir {args.output.parent.parent} "
                     f"+job={job} data_root={root}\n")
    return 0


