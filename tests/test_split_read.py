"""One large uncompressed file is read by several byte-range tasks: every record exactly once,
exact line numbers in every span, and the load matches the oracle."""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any, List, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadkit.examples.cnpj.sample import generate_month
from loadkit.source import files
from loadkit.source.read import ReadUnit, read_unit, split_units
from loadkit.records import Chunk
from loadkit.plan import build_plan
from tests.helpers import compose, query

TABLES = ("estabelecimentos", "empresas")
PATTERNS = {"estabelecimentos": "*ESTABELE", "empresas": "*EMPRECSV"}


def raw_overrides(*tables: str) -> List[str]:
    """Point the monthly job's tables at raw (unzipped) members and disable the others."""
    out: List[str] = []
    for t in tables:
        out += [f'job.tables.{t}.source.paths=["{{year:04d}}-{{month:02d}}/{PATTERNS[t]}"]',
                f"job.tables.{t}.source.format=csv", f"job.tables.{t}.source.member=null"]
    others = ("socios", "simples", "cnaes", "motivos", "municipios", "naturezas", "paises", "qualificacoes")
    return out + [f"job.tables.{t}.enabled=false" for t in others + tuple(x for x in TABLES if x not in tables)]


@pytest.fixture(scope="module")
def raw_month(tmp_path_factory: pytest.TempPathFactory):
    return generate_month(tmp_path_factory.mktemp("raw"), 2024, 5, rows=3000, shards=1, seed=11, compress=False)


def _chunks(unit: ReadUnit) -> List[Chunk]:
    return [c for c in read_unit(unit) if c.kind == "data"]


class _Trickle(io.RawIOBase):
    """A stream that hands over at most ``step`` bytes per call (a socket's, a decompressor's short reads)."""

    def __init__(self, data: bytes, step: int, pos: int) -> None:
        self._data, self._pos, self._step = data, pos, step

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        block = self._data[self._pos:self._pos + min(len(buffer), self._step)]
        buffer[:len(block)] = block
        self._pos += len(block)
        return len(block)


class _ReadOnly:
    """A stream with ``read`` alone (no ``readinto``), short reads included."""

    def __init__(self, data: bytes, step: int, pos: int) -> None:
        self._data, self._pos, self._step = data, pos, step

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        block = self._data[self._pos:self._pos + min(size, self._step)]
        self._pos += len(block)
        return block


@given(data=st.binary(max_size=300), start=st.integers(0, 300), end=st.integers(0, 320),
       sizes=st.lists(st.integers(1, 80), min_size=1, max_size=8), step=st.integers(1, 50),
       kind=st.sampled_from([_Trickle, _ReadOnly]))
def test_a_window_reads_into_a_buffer_exactly_the_bytes_it_reads(data: bytes, start: int, end: int,
                                                                  sizes: List[int], step: int, kind: type) -> None:
    """Window.readinto (ChunkReader's path: no fresh bytes object per fill) hands over the span's bytes,
    the same as read, whatever the buffer sizes, however short the stream's own reads are, and over a
    stream with ``read`` alone; 0 at the end."""
    start = min(start, len(data))
    want = data[start:max(start, min(end, len(data)))]
    got = bytearray()
    stream = kind(data, step, start)  # positioned at the span's start, as _read_span seeks it
    window = files.Window(stream, end)  # type: ignore[arg-type]
    for i in range(10 * len(data) + 10):
        buf = bytearray(sizes[i % len(sizes)])
        n = window.readinto(memoryview(buf)[: len(buf)])
        if not n:
            break
        got += buf[:n]
    assert bytes(got) == want
    assert window.readinto(bytearray(8)) == 0
    plain = io.BytesIO(data)
    plain.seek(start)
    assert files.Window(plain, end).read() == want  # type: ignore[arg-type]


def test_a_window_over_a_stream_with_no_data_ready_fails_instead_of_ending_the_span() -> None:
    """A non-blocking stream's None is not the span's end: taken as 0 it would cut the span short."""
    class NotReady(_Trickle):
        def readinto(self, buffer) -> None:  # type: ignore[no-untyped-def, override]
            return None

    buf = bytearray(16)
    window = files.Window(NotReady(b"abc", 3, 0), 3)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="no data ready"):
        window.readinto(buf)
    buf += b"x"  # the failed read left no view of the buffer behind: it can still grow


def test_spans_cover_the_file_once_with_exact_lines(raw_month, tmp_path: Path) -> None:
    cfg = compose(["+job=monthly", "year=2024", "month=5", f"data_root={raw_month.root}", "batch.size=200",
                   "batch.read_block_bytes=65536", "pool.read_splits=3", *raw_overrides("estabelecimentos")])
    plan = build_plan(cfg)
    table = plan.table("estabelecimentos")
    whole = ReadUnit(table, table.files[0], (), plan.batch.size)
    spans = split_units([whole], plan.read_splits, plan.batch.read_block_bytes)
    assert [u.span is not None for u in spans] == [True, True, True]
    chunks = [c for u in spans for c in _chunks(u)]
    data = Path(table.files[0].path).read_bytes()
    assert b"".join(c.data for c in chunks) == data, "spans must tile the file record by record"
    assert [c.start for c in chunks[1:]] == [c.end for c in chunks[:-1]]
    for c in chunks:  # every chunk starts on a record and knows its physical line
        assert c.start == 0 or data[c.start - 1:c.start] == b"\n"
        assert c.first_line == data.count(b"\n", 0, c.start) + 1


class _Counted:
    """A file handle that counts the bytes read through it (read and readinto)."""

    def __init__(self, fh, tally: List[int]) -> None:  # type: ignore[no-untyped-def]
        self._fh, self._tally = fh, tally

    def read(self, size: int = -1) -> bytes:
        block = self._fh.read(size)
        self._tally[0] += len(block)
        return block

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = self._fh.readinto(buffer)
        self._tally[0] += n or 0
        return n

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._fh, name)


def _counted_spans(raw_month, monkeypatch) -> Tuple[Any, List[ReadUnit], List[int]]:  # type: ignore[no-untyped-def]
    """(the estabelecimentos table, its file cut into 3 spans, the tally of bytes read through every file
    handle the read stage opens from now on)."""
    import contextlib

    from loadkit.source import read as read_mod

    cfg = compose(["+job=monthly", "year=2024", "month=5", f"data_root={raw_month.root}", "batch.size=200",
                   "batch.read_block_bytes=65536", "pool.read_splits=3", *raw_overrides("estabelecimentos")])
    plan = build_plan(cfg)
    table = plan.table("estabelecimentos")
    spans = split_units([ReadUnit(table, table.files[0], (), plan.batch.size)], plan.read_splits,
                        plan.batch.read_block_bytes)
    opened = read_mod.files.open_source
    tally = [0]

    @contextlib.contextmanager
    def counted(path, retry=None):  # type: ignore[no-untyped-def]
        with opened(path, retry) as fh:
            yield _Counted(fh, tally)

    monkeypatch.setattr(read_mod.files, "open_source", counted)
    return table, spans, tally


def test_the_last_span_reads_only_its_prefix_and_its_own_bytes(raw_month, monkeypatch) -> None:
    """A span's edges are found by scanning from the data start (exact under quoted newlines), but the last
    span ends at the file's end: it reads the head, the prefix up to its start and its own bytes -- once.
    It used to count every line of the whole file again for its end's line number, which nobody reads."""
    from loadkit.source import read as read_mod

    table, spans, tally = _counted_spans(raw_month, monkeypatch)
    size = table.files[0].size
    last = spans[-1]
    assert last.span is not None and last.span[1] == size
    chunks = _chunks(last)
    head = read_mod._SAMPLE_BYTES
    assert b"".join(c.data for c in chunks) == Path(table.files[0].path).read_bytes()[chunks[0].start:]
    start = chunks[0].start
    # the head + the prefix scanned to the start (in whole read blocks, not past the end) + the span itself;
    # not a second pass over the file
    assert tally[0] <= min(head, size) + min(size, start + files._READ_SIZE) + (size - start), (tally[0], size)


def test_an_inner_span_scans_its_prefix_once_and_stops_past_its_end(raw_month, monkeypatch) -> None:
    """An inner span finds its start by scanning from the data start, and its end as it reads (the first
    record end at or after its cut, ChunkReader's stop_at): it reads the head, the prefix, its own bytes and
    at most a chunk and a read past its end. Its end used to be found by a second scan from the file's start
    (each cut of a split file scanned twice: 0.48 CPU-s per cut of the 0.92 GB benchmark file)."""
    from loadkit.source import read as read_mod

    monkeypatch.setattr(files, "_READ_SIZE", 64 * 1024)  # scan blocks well below the file's size
    table, spans, tally = _counted_spans(raw_month, monkeypatch)
    data = Path(table.files[0].path).read_bytes()
    inner = spans[1]
    assert inner.span is not None and 0 < inner.span[0] < inner.span[1] < len(data)
    chunks = _chunks(inner)
    start, end = chunks[0].start, chunks[-1].end
    assert start == data.index(b"\n", inner.span[0] - 1) + 1 and end == data.index(b"\n", inner.span[1] - 1) + 1
    target = max(len(c.data) for c in chunks)
    bound = read_mod._SAMPLE_BYTES + (start + files._READ_SIZE) + (end - start) + target + files._MIN_READ
    assert tally[0] <= bound < start + end + (end - start), (tally[0], bound)  # the old second scan: + end


def test_committed_ranges_are_clipped_to_each_span(raw_month) -> None:
    """A range an unsplit run committed may straddle a span edge: each span skips its own part."""
    cfg = compose(["+job=monthly", "year=2024", "month=5", f"data_root={raw_month.root}", "batch.size=200",
                   "batch.read_block_bytes=65536", "pool.read_splits=2", *raw_overrides("estabelecimentos")])
    plan = build_plan(cfg)
    table = plan.table("estabelecimentos")
    f = table.files[0]
    data = Path(f.path).read_bytes()
    lo = data.index(b"\n", f.size // 3) + 1
    hi = data.index(b"\n", 2 * f.size // 3) + 1  # straddles the middle, where the two spans meet
    unit = ReadUnit(table, f, ((Path(f.path).name, ((lo, hi),)),), plan.batch.size)
    chunks = [c for u in split_units([unit], plan.read_splits, plan.batch.read_block_bytes) for c in _chunks(u)]
    assert b"".join(c.data for c in chunks) == data[:lo] + data[hi:]


@pytest.mark.e2e
def test_split_load_matches_the_oracle(raw_month, pg_dsn: str, schemas: tuple, ray_session: None,
                                       job_overrides) -> None:
    from loadkit.runner import run_job

    target, led = schemas
    result = run_job(compose(job_overrides(raw_month.root, "batch.size=300", "batch.read_block_bytes=65536",
                                           "pool.read_splits=3", "job.tables.estabelecimentos.mode=append",
                                           *raw_overrides(*TABLES))))
    assert result.status == "succeeded", result.error
    expected = raw_month.expected["estabelecimentos"]
    cols = list(expected[0].keys())
    got = query(pg_dsn, f'SELECT {", ".join(cols)} FROM "{target}".estabelecimentos')
    canon = lambda row: tuple(v.rstrip() if isinstance(v, str) else v for v in row)  # noqa: E731
    assert Counter(canon(r) for r in got) == Counter(canon(tuple(r[c] for c in cols)) for r in expected)
    batches = query(pg_dsn, f'SELECT count(DISTINCT start_offset), count(*), sum(rows_in) FROM "{led}".batch '
                            "WHERE table_name = 'estabelecimentos'")
    assert batches[0][0] == batches[0][1] and batches[0][2] == raw_month.rows["estabelecimentos"]
    assert result.metrics.tables["empresas"].rows_read == raw_month.rows["empresas"]
