"""loadkit.records: schemas derived from the dataclass fields, and Arrow round trips (the Ray block boundary)."""
from __future__ import annotations

import dataclasses

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from loadkit.records import BatchResult, Chunk, Counted, Origin, ParsedBatch, arrow_schema, carry

_text = st.text(max_size=20)
_int = st.integers(min_value=0, max_value=2**62)
_float = st.floats(min_value=0, max_value=1e9, allow_nan=False)
_origin = dict(kind=st.sampled_from(["data", "eof", "error"]), table_name=_text, file_sha=_text,
               file_ordinal=st.integers(0, 2**31 - 1), file_path=_text, member=_text, start=_int, end=_int,
               first_line=_int, chunks=_int, message=st.none() | _text)
_counts = dict(batch_id=st.integers(-2**63, 2**63 - 1), rows_in=_int, rows_loaded=_int, rows_rejected=_int,
               rows_coerced=_int, bytes=_int, parse_s=_float, blank_lines=_int)


def test_every_field_is_a_column_in_field_order() -> None:
    for cls in (Chunk, ParsedBatch, BatchResult):
        assert arrow_schema(cls).names == [f.name for f in dataclasses.fields(cls)]
        assert cls.schema() == arrow_schema(cls)
    chunk, result = arrow_schema(Chunk), arrow_schema(BatchResult)
    assert chunk.field("header").type == pa.list_(pa.string()) and chunk.field("data").type == pa.large_binary()
    assert chunk.field("file_ordinal").type == pa.int32() and result.field("attempts").type == pa.int32()
    assert arrow_schema(ParsedBatch).field("rows").type == pa.large_binary()  # a table crosses as IPC bytes
    assert set(arrow_schema(Origin).names) < set(chunk.names) and set(arrow_schema(Counted).names) < set(result.names)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.builds(Chunk, **_origin, data=st.binary(max_size=64),
                          header=st.none() | st.lists(_text, max_size=4).map(tuple), skip_header=st.booleans(),
                          scan=st.none() | _text, reject=st.none() | _text), max_size=4))
def test_chunks_survive_a_block(chunks: list) -> None:
    assert Chunk.from_table(Chunk.to_table(chunks)) == chunks


@settings(max_examples=50, deadline=None)
@given(st.lists(st.builds(BatchResult, **_origin, **_counts, status=st.sampled_from(["committed", "skipped"]),
                          write_s=_float, attempts=st.integers(0, 100), writer=_text, pool_utilisation=_float,
                          rss_bytes=_int, finished_at=_float, received_at=_float), max_size=4))
def test_results_survive_a_block(results: list) -> None:
    assert BatchResult.from_table(BatchResult.to_table(results)) == results


def test_parsed_batches_carry_their_tables_as_ipc() -> None:
    rows = pa.table({"a": [1, 2], "b": ["x", None]})
    rejects = pa.table({"line_number": pa.array([3], pa.int64()), "reason": ["bad"]})
    batch = ParsedBatch(kind="data", table_name="t", file_sha="s", batch_id=7, rows_in=3, rows_loaded=2,
                        rows_rejected=1, rows=rows, rejects=rejects)
    eof = ParsedBatch(kind="eof", table_name="t", file_sha="s", chunks=4)
    back = ParsedBatch.from_table(ParsedBatch.to_table([batch, eof]))
    assert back[0].rows is not None and back[0].rows.equals(rows) and back[0].rejects is not None
    assert back[0].rejects.equals(rejects)
    assert dataclasses.replace(back[0], rows=None, rejects=None) == dataclasses.replace(batch, rows=None, rejects=None)
    assert back[1] == eof and back[1].rows is None


def test_carry_keeps_the_shared_fields() -> None:
    chunk = Chunk(kind="data", table_name="t", file_sha="s", file_ordinal=2, file_path="p", member="m", start=10,
                  end=20, first_line=3, data=b"x,y\n", reject="too long")
    parsed = carry(chunk, ParsedBatch, batch_id=5, rows_in=1)
    assert (parsed.table_name, parsed.file_ordinal, parsed.start, parsed.end, parsed.batch_id) == ("t", 2, 10, 20, 5)
    result = carry(parsed, BatchResult, status="committed", attempts=1)
    assert (result.member, result.rows_in, result.status, result.message) == ("m", 1, "committed", None)


def test_older_blocks_and_nulls_take_the_defaults() -> None:
    """A block from before a field existed (or a null where the field is not Optional) reads as the default."""
    old = pa.table({"kind": ["data"], "table_name": ["t"], "file_sha": ["s"], "status": ["committed"],
                    "rows_in": pa.array([None], pa.int64()), "extra": [1]})
    (r,) = BatchResult.from_table(old)
    assert (r.rows_in, r.received_at, r.writer, r.message) == (0, 0.0, "", None)
