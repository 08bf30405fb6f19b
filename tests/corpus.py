"""Helpers for the bad-input corpus: table specs built in Python and a DB-free read+parse path.

``read_local`` drives the same functions both executors run (read_unit and the parse
stage) in-process, so edge cases are tested exactly as
they load, without a cluster or a database.
"""
from __future__ import annotations

import gzip
import io
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union


from loadkit.config import ColumnConfig, DialectConfig
from loadkit.execute.parse import parse as parse_batch
from loadkit.source.read import ReadUnit, read_unit
from loadkit.plan import ROW_COL, Dialect, FileSpec, TableSpec, column_spec
from loadkit.source.files import fingerprint
from loadkit.transform import ParsedChunk, decode_text_columns, parse_chunk

Col = Union[ColumnConfig, Tuple[str, str]]


def spec(columns: Sequence[Col], fmt: str = "csv", member: Optional[str] = None, allow_empty: bool = True,
         **dialect: Any) -> TableSpec:
    """A TableSpec named ``t`` from (name, type) pairs or ColumnConfigs and DialectConfig keywords."""
    cols = [c if isinstance(c, ColumnConfig) else ColumnConfig(name=c[0], type=c[1]) for c in columns]
    d = asdict(DialectConfig(**dialect))
    d["null_values"] = tuple(d["null_values"])
    return TableSpec(name="t", schema="s", mode="append", columns=tuple(column_spec(c) for c in cols), key=(),
                     derived_key=None, indexes=(), format=fmt, member=member, dialect=Dialect(**d),
                     allow_empty=allow_empty, files=(), max_reject_rate=1.0, max_rejects=None)


def rows_of(parsed: ParsedChunk) -> List[Dict[str, Any]]:
    """The good rows as Python values; latin-1 text kept as source bytes (server transcoding) is decoded,
    i.e. the text PostgreSQL stores."""
    return decode_text_columns(parsed.rows).drop_columns([ROW_COL]).to_pylist()


def rejects_of(parsed: ParsedChunk) -> List[Tuple[Optional[int], Optional[str], str]]:
    """(line, column, reason) per reject, with the reason cut at its first colon for stable matching."""
    return [(r["line_number"], r["column_name"], r["reason"].split(":")[0]) for r in parsed.rejects.to_pylist()]


def parse(table: TableSpec, data: bytes, first_line: int = 1) -> ParsedChunk:
    parsed = parse_chunk(table, data, first_line, skip_header=table.dialect.header)
    assert parsed.rows_in == parsed.rows.num_rows + parsed.rejects.num_rows
    return parsed


@dataclass
class LocalLoad:
    rows: List[Dict[str, Any]] = field(default_factory=list)
    rejects: List[Dict[str, Any]] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    rows_in: int = 0
    members: List[str] = field(default_factory=list)


def read_local(table: TableSpec, path: Path, batch_rows: int = 50_000) -> LocalLoad:
    """Read and parse one source file the way the pipeline does, in this process."""
    f = FileSpec(path=str(path), rel=path.name, ordinal=0, size=path.stat().st_size, sha256=fingerprint(path))
    out = LocalLoad()
    tables = {table.name: table}
    for chunk in read_unit(ReadUnit(table, f, (), batch_rows)):
        if chunk.kind == "error":
            out.errors.append(chunk.message or "")
            continue
        if chunk.kind == "eof":
            out.members.append(chunk.member)
            continue
        parsed = parse_batch(chunk, tables, "2024-05")
        if parsed.kind == "error":
            out.errors.append(parsed.message or "")
            continue
        assert parsed.rows is not None and parsed.rejects is not None
        out.rows_in += parsed.rows_in
        out.rows += decode_text_columns(parsed.rows).drop_columns([ROW_COL]).to_pylist()
        out.rejects += [dict(r, member=chunk.member) for r in parsed.rejects.to_pylist()]
    assert out.rows_in == len(out.rows) + len(out.rejects)
    return out


def write_zip(path: Path, members: Dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def write_gzip(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data))
    return path


def corrupt_zip_member(path: Path, members: Dict[str, bytes], bad: str) -> Path:
    """A zip whose member ``bad`` is stored uncompressed with one byte flipped: its CRC check fails."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    raw = bytearray(buf.getvalue())
    at = raw.index(members[bad][-200:], raw.index(bad.encode()))  # inside that member's stored data
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    return path

