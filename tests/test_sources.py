"""files.ChunkReader and the file-level read path (source.read.read_unit), without Ray or a database."""
from __future__ import annotations

import datetime as dt
import gzip
import io
import random
from decimal import Decimal
from pathlib import Path
from typing import List

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loadkit.source import files
from loadkit.errors import SourceDataError
from tests.corpus import corrupt_zip_member, read_local, spec, write_gzip, write_zip

ABC = [("a", "integer"), ("b", "text"), ("c", "text")]


def _records(n: int, seed: int = 3) -> bytes:
    """n CSV records, some with quoted newlines, delimiters and doubled quotes."""
    rnd = random.Random(seed)
    out = []
    for i in range(1, n + 1):
        b = rnd.choice(["plain", '"multi\nline"', '"has,comma"', '"say ""x"""', '"two\n\nblank"'])
        out.append(f"{i},{b},{'z' * rnd.randint(0, 40)}\n")
    return "".join(out).encode()


def _chunks(data: bytes, target: int, committed=()) -> List[files.Chunk]:
    return list(files.ChunkReader(io.BytesIO(data), "m", target, '"', None, True, committed))


def test_chunks_end_on_record_boundaries_and_cover_every_byte() -> None:
    data = _records(3000)
    chunks = _chunks(data, 1024)
    assert len(chunks) > 50
    assert b"".join(c.data for c in chunks) == data
    for prev, nxt in zip(chunks, chunks[1:]):
        assert prev.end == nxt.start
        assert nxt.first_line == prev.first_line + prev.data.count(b"\n")
        assert nxt.data.split(b",", 1)[0].isdigit(), "a chunk starts at a record, never inside a quoted value"


def test_committed_ranges_are_skipped_and_line_numbers_keep_counting() -> None:
    data = _records(500)
    full = _chunks(data, 1024)
    done = [(full[1].start, full[1].end), (full[3].start, full[3].end)]
    rest = _chunks(data, 1024, done)
    assert [c.start for c in rest] == [c.start for c in full if (c.start, c.end) not in done]
    assert [c.first_line for c in rest] == [c.first_line for c in full if (c.start, c.end) not in done]


def test_cr_only_file_is_read_as_records(tmp_path: Path) -> None:
    path = tmp_path / "mac.csv"
    path.write_bytes(b"a,b,c\r1,x,y\r2,\"q\",z\rbad,x,y\r")
    load = read_local(spec(ABC, header=True), path)
    assert load.rows == [{"a": 1, "b": "x", "c": "y"}, {"a": 2, "b": "q", "c": "z"}]
    assert [(r["line_number"], r["column_name"]) for r in load.rejects] == [(4, "a")]


def test_cr_to_lf_keeps_offsets() -> None:
    data = b"1,a\r2,b\r"
    chunks = list(files.ChunkReader(files.CrToLf(io.BytesIO(data)), "m", 1024, '"', None, True))
    assert chunks[0].end == len(data) and chunks[0].data == b"1,a\n2,b\n"


def test_empty_and_header_only_files_load_zero_rows(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "head.csv").write_bytes(b"a,b,c\r\n")
    for name in ("empty.csv", "head.csv"):
        load = read_local(spec(ABC, header=True), tmp_path / name)
        assert (load.rows, load.rejects, load.errors, load.members) == ([], [], [], [name])


def test_empty_file_is_an_error_when_not_allowed(tmp_path: Path) -> None:
    (tmp_path / "head.csv").write_bytes(b"a,b,c\n")
    load = read_local(spec(ABC, header=True, allow_empty=False), tmp_path / "head.csv")
    assert load.rows == [] and len(load.errors) == 1 and "allow_empty is false" in load.errors[0]


def test_layout_drift_fails_the_file_before_any_row(tmp_path: Path) -> None:
    (tmp_path / "wide.csv").write_bytes(b"1,x,y,new\n2,x,y,new\n")
    load = read_local(spec(ABC), tmp_path / "wide.csv")
    assert load.rows == [] and load.rows_in == 0
    assert load.errors == ["layout drift: first record has 4 fields, the declaration has 3 [file=wide.csv, "
                           "member=wide.csv, line=1]"]
    (tmp_path / "hdr.csv").write_bytes(b"a,b\n1,x\n")
    assert "header has 2 columns, declared 3" in read_local(spec(ABC, header=True), tmp_path / "hdr.csv").errors[0]
    missing = read_local(spec(ABC, header=True, match_by_name=True), tmp_path / "hdr.csv").errors[0]
    assert "header lacks declared columns ['c']" in missing


def test_first_record_with_a_quoted_newline_is_not_layout_drift(tmp_path: Path) -> None:
    (tmp_path / "nl.csv").write_bytes(b'1,"a\nb",c\n2,d,e\n')
    assert [r["a"] for r in read_local(spec(ABC), tmp_path / "nl.csv").rows] == [1, 2]


def test_gzip_and_multi_member_zip_with_member_filter(tmp_path: Path) -> None:
    write_gzip(tmp_path / "f.csv.gz", b"1,x,y\n2,x,y\n")
    gz = read_local(spec(ABC, fmt="gzip"), tmp_path / "f.csv.gz")
    assert [r["a"] for r in gz.rows] == [1, 2]
    write_zip(tmp_path / "m.zip", {"part1.csv": b"1,x,y\n", "readme.txt": b"not data\n", "part2.csv": b"2,x,y\n3,x\n"})
    z = read_local(spec(ABC, fmt="zip", member="part*.csv"), tmp_path / "m.zip")
    assert z.members == ["part1.csv", "part2.csv"]
    assert [r["a"] for r in z.rows] == [1, 2]
    assert [(r["member"], r["line_number"], r["reason"]) for r in z.rejects] == [
        ("part2.csv", 2, "expected 3 fields, found 2")]
    none = read_local(spec(ABC, fmt="zip", member="*.parquet"), tmp_path / "m.zip")
    assert "zip has no member matching '*.parquet'" in none.errors[0]


def test_truncated_gzip_and_corrupt_zip_fail_the_file(tmp_path: Path) -> None:
    data = _records(20000, seed=5)
    whole = gzip.compress(data)
    (tmp_path / "cut.csv.gz").write_bytes(whole[: len(whole) // 2])
    cut = read_local(spec(ABC, fmt="gzip"), tmp_path / "cut.csv.gz")
    assert len(cut.errors) == 1 and "corrupt or unreadable source: EOFError" in cut.errors[0]
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    assert "corrupt zip" in read_local(spec(ABC, fmt="zip"), tmp_path / "junk.zip").errors[0]
    corrupt_zip_member(tmp_path / "crc.zip", {"a.csv": b"1,x,y\n", "b.csv": _records(300)}, "b.csv")
    crc = read_local(spec(ABC, fmt="zip"), tmp_path / "crc.zip")
    assert "BadZipFile" in crc.errors[0] and "CRC" in crc.errors[0]


def test_discover_names_the_paths_it_searched(tmp_path: Path) -> None:
    with pytest.raises(SourceDataError) as info:
        files.discover(tmp_path, ["2024-05/Empresas*.zip", "other/*.csv"])
    assert str(tmp_path / "2024-05/Empresas*.zip") in str(info.value)
    assert str(tmp_path / "other/*.csv") in str(info.value)


def test_parquet_file_dates_decimals_timestamps(tmp_path: Path) -> None:
    src = pa.table({
        "id": pa.array(range(1, 6), pa.int64()),
        "d": pa.array([dt.date(2024, 1, i) for i in range(1, 6)], pa.date32()),
        "amount": pa.array([Decimal(f"{i}.25") for i in range(5)], pa.decimal128(8, 2)),
        "ts": pa.array([dt.datetime(2024, 1, 1, i) for i in range(5)], pa.timestamp("ms")),
        "extra": pa.array(["ignored"] * 5),
    })
    pq.write_table(src, tmp_path / "f.parquet", row_group_size=2)
    table = spec([("id", "integer"), ("d", "date"), ("amount", "numeric(10,2)"), ("ts", "timestamp")],
                 fmt="parquet")
    load = read_local(table, tmp_path / "f.parquet", batch_rows=2)
    assert load.rows == src.drop_columns(["extra"]).to_pylist()
    wrong = spec([("id", "integer"), ("missing", "text")], fmt="parquet")
    assert "parquet file lacks declared columns ['missing']" in read_local(wrong, tmp_path / "f.parquet").errors[0]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 truncated")
    assert "corrupt or unreadable source" in read_local(table, tmp_path / "bad.parquet").errors[0]


def test_empty_parquet_is_zero_rows_or_an_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": pa.array([], pa.int64())}), tmp_path / "e.parquet")
    assert read_local(spec([("id", "integer")], fmt="parquet"), tmp_path / "e.parquet").errors == []
    strict = spec([("id", "integer")], fmt="parquet", allow_empty=False)
    assert "allow_empty is false" in read_local(strict, tmp_path / "e.parquet").errors[0]


def test_fingerprints_on_threads_equal_sha256_of_the_bytes_and_raise_like_fingerprint(tmp_path: Path) -> None:
    """Files hashed ahead on 1-3 threads (started out of order, some asked for without a start) give
    each file's own sha256; a missing file raises what ``fingerprint`` raises, when asked for."""
    import hashlib

    rnd = random.Random(5)
    paths = []
    for i in range(7):
        p = tmp_path / f"f{i}.csv"
        p.write_bytes(rnd.randbytes(rnd.choice([0, 1, 4096, 3 * files._FINGERPRINT_BLOCK + 17])))
        paths.append(p)
    for threads in (1, 2, 3):
        with files.Fingerprints(threads) as fp:
            fp.start(paths[::-2])
            got = {p: fp(p) for p in paths}
            with pytest.raises(FileNotFoundError):
                fp(tmp_path / "missing.csv")
        assert got == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
        assert all(got[p] == files.fingerprint(p) for p in paths)


def test_parquet_resume_with_another_batch_size_reads_each_uncommitted_row_once(tmp_path: Path) -> None:
    """A parquet file committed in part at one batch size and resumed at another (``batch.size`` changed
    between runs) must read exactly the rows the ledger does not hold, in chunks that start outside
    the committed ranges (a chunk starting where a committed batch starts would carry its batch id and be
    skipped whole by the writer, losing its uncommitted tail). Before: the reader skipped only chunks
    lying wholly inside a committed range, so rows 3-5 of [(0, 3), (3, 6)] came back in [0, 4) and
    [4, 8): read twice, and the first chunk's id collided with the committed batch at 0."""
    from loadkit.source.read import ReadUnit, read_unit
    from loadkit.plan import FileSpec
    from loadkit.source.files import fingerprint

    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"id": pa.array(range(10), pa.int64())}), path, row_group_size=5)
    table = spec([("id", "integer")], fmt="parquet")
    f = FileSpec(path=str(path), rel=path.name, ordinal=0, size=path.stat().st_size, sha256=fingerprint(path))
    for done in [((0, 3), (3, 6)), ((3, 6),), ((0, 3), (6, 9)), ((0, 10),), ()]:
        for rows in (1, 3, 4, 7, 50):
            chunks = [c for c in read_unit(ReadUnit(table, f, (("f.parquet", done),), rows)) if c.kind == "data"]
            read = [i for c in chunks for i in range(c.start, c.end)]
            want = [i for i in range(10) if not any(s <= i < e for s, e in done)]
            assert read == want, (done, rows)
            ids = [v for c in chunks for v in pa.ipc.open_stream(c.data).read_all().column("id").to_pylist()]
            assert ids == want, (done, rows)  # the chunk's rows are the rows its offsets say
            assert not {c.start for c in chunks} & {s for s, _ in done}, (done, rows)
            assert all(c.end - c.start <= rows for c in chunks), (done, rows)


@pytest.mark.parametrize("fmt", ["csv", "gzip", "parquet"])
def test_a_renamed_single_stream_file_resumes_from_the_ranges_committed_under_its_old_name(tmp_path: Path,
                                                                                            fmt: str) -> None:
    """A plain, gzip or parquet file is one stream whose member name is the file's name. Partly loaded, then
    renamed (same content, same sha256: a re-delivery under a new name, a moved file), its resume must skip
    what the ledger committed under the old name. Before: ranges were looked up by the new name only, so
    the whole file was read again under new batch ids and the committed rows were loaded twice."""
    from loadkit.plan import FileSpec
    from loadkit.source.files import fingerprint
    from loadkit.source.read import ReadUnit, read_unit

    table = spec([("a", "integer"), ("b", "text"), ("c", "text")] if fmt != "parquet" else [("id", "integer")],
                 fmt=fmt, newlines_in_values=True)
    old, new = tmp_path / f"old.{fmt}", tmp_path / f"new.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"id": pa.array(range(500), pa.int64())}), old, row_group_size=100)
    elif fmt == "gzip":
        write_gzip(old, _records(8000))
    else:
        old.write_bytes(_records(8000))
    rows = 50

    def unit(path: Path, committed: tuple) -> ReadUnit:
        f = FileSpec(path=str(path), rel=path.name, ordinal=0, size=path.stat().st_size, sha256=fingerprint(path))
        return ReadUnit(table, f, committed, rows)

    first = [c for c in read_unit(unit(old, ())) if c.kind == "data"]
    assert len(first) >= 4 and {c.member for c in first} == {old.name}
    done = tuple(sorted((c.start, c.end) for c in first[:3]))
    old.rename(new)
    rest = [c for c in read_unit(unit(new, ((old.name, done),))) if c.kind == "data"]
    assert [(c.start, c.end) for c in rest] == [(c.start, c.end) for c in first[3:]]
