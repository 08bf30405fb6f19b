"""transform.parse_chunk on an edge-case corpus: exact rows, or the named reject with its line."""
from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pyarrow as pa
import pytest

from loadkit.config import ColumnConfig
from loadkit.transform import parse_parquet_batch
from loadkit.records import ipc_bytes
from tests.corpus import parse, rejects_of, rows_of, spec

ABC = [("a", "integer"), ("b", "text"), ("c", "text")]


def test_quoted_delimiters_doubled_quotes_and_newlines_in_values() -> None:
    data = b'1,"x,y","say ""hi"""\n2,"two\nlines",z\n3,plain,\n'
    parsed = parse(spec(ABC), data)
    assert rows_of(parsed) == [{"a": 1, "b": "x,y", "c": 'say "hi"'}, {"a": 2, "b": "two\nlines", "c": "z"},
                               {"a": 3, "b": "plain", "c": None}]


def test_backslash_escape() -> None:
    parsed = parse(spec(ABC, escape="\\"), b'1,"a \\"quoted\\" word",c\n')
    assert rows_of(parsed) == [{"a": 1, "b": 'a "quoted" word', "c": "c"}]


def test_reject_line_numbers_count_physical_lines_after_embedded_newlines() -> None:
    data = b'a,b,c\n1,"l1\nl2\nl3",x\n2,ok,y\nnope,ok,z\n'
    parsed = parse(spec(ABC, header=True), data, first_line=1)
    assert rows_of(parsed) == [{"a": 1, "b": "l1\nl2\nl3", "c": "x"}, {"a": 2, "b": "ok", "c": "y"}]
    assert rejects_of(parsed) == [(6, "a", "not an integer")]
    assert parsed.rejects.column("raw").to_pylist() == ["nope,ok,z"]


def test_unicode_survives() -> None:
    data = "1,São Paulo — ação,日本語 🚀\n".encode()
    assert rows_of(parse(spec(ABC), data)) == [{"a": 1, "b": "São Paulo — ação", "c": "日本語 🚀"}]


def test_empty_field_is_text_when_only_NA_is_null() -> None:
    parsed = parse(spec(ABC, null_values=["NA", "\\N", "NULL"]), b'1,,NA\n2,\\N,NULL\n3,"",x\n')
    assert rows_of(parsed) == [{"a": 1, "b": "", "c": None}, {"a": 2, "b": None, "c": None},
                               {"a": 3, "b": "", "c": "x"}]


def test_trim_applies_before_null_markers() -> None:
    parsed = parse(spec(ABC, null_values=["NA"], trim=True), b" 1 ,  x  , NA \n")
    assert rows_of(parsed) == [{"a": 1, "b": "x", "c": None}]


def test_bom_is_stripped_with_and_without_a_bad_row() -> None:
    clean = parse(spec(ABC, header=True), b"\xef\xbb\xbfa,b,c\r\n1,x,y\r\n")
    assert rows_of(clean) == [{"a": 1, "b": "x", "c": "y"}]
    # A ragged row forces the record-by-record path: the BOM must not leak into the first value there either.
    noheader = parse(spec(ABC), b"\xef\xbb\xbf1,x,y\r\n2,x\r\n")
    assert rows_of(noheader) == [{"a": 1, "b": "x", "c": "y"}]
    assert rejects_of(noheader) == [(2, None, "expected 3 fields, found 2")]


def test_crlf_values_carry_no_carriage_return() -> None:
    assert rows_of(parse(spec(ABC), b"1,x,y\r\n2,\"a\r\nb\",z\r\n")) == [
        {"a": 1, "b": "x", "c": "y"}, {"a": 2, "b": "a\r\nb", "c": "z"}]


def test_ragged_rows_are_rejected_with_their_lines_and_raw_text() -> None:
    data = b"a,b,c\n1,x,y\n2,x\n3,x,y,extra\n\n4,x,y\n"
    parsed = parse(spec(ABC, header=True), data, first_line=1)
    assert rows_of(parsed) == [{"a": 1, "b": "x", "c": "y"}, {"a": 4, "b": "x", "c": "y"}]
    assert rejects_of(parsed) == [(3, None, "expected 3 fields, found 2"), (4, None, "expected 3 fields, found 4")]
    assert parsed.rejects.column("raw").to_pylist() == ["2,x", "3,x,y,extra"]
    assert parsed.rows.column("_lk_row").to_pylist() == [1, 4]


def test_line_numbers_are_offset_by_the_chunk_start() -> None:
    parsed = parse(spec(ABC), b"1,x,y\nbad,x,y\n", first_line=1001)
    assert rejects_of(parsed) == [(1002, "a", "not an integer")]


@pytest.mark.parametrize("kind,value,reason", [
    ("date", "2024-02-30", "not a valid date (%Y-%m-%d)"),
    ("date", "20240101", "not a valid date (%Y-%m-%d)"),
    ("integer", "12.5", "not an integer"),
    ("integer", "3000000000", "out of range for integer"),
    ("numeric(5,2)", "1234.5", "does not fit numeric(5,2)"),
    ("numeric(5,2)", "1.2.3", "not a number"),
    ("boolean", "maybe", "not a boolean"),
    ("double", "1e", "not a number"),
    ("timestamp", "2024-01-01 25:00:00", "not a valid timestamp (%Y-%m-%d %H:%M:%S)"),
])
def test_values_that_do_not_parse_are_rejected_by_column(kind: str, value: str, reason: str) -> None:
    col = ColumnConfig(name="v", type=kind, format="%Y-%m-%d" if kind == "date" else None)
    parsed = parse(spec([("id", "integer"), col]), f"1,ok\n2,{value}\n".encode().replace(b"1,ok", _good(kind)))
    assert rows_of(parsed)[0]["id"] == 1 and len(rows_of(parsed)) == 1
    assert [(r["line_number"], r["column_name"], r["reason"]) for r in parsed.rejects.to_pylist()] == [
        (2, "v", f"{reason}: {value!r}")]


def _good(kind: str) -> bytes:
    return {"date": b"1,2024-02-29", "integer": b"1,7", "numeric(5,2)": b"1,123.45", "boolean": b"1,yes",
            "double": b"1,-1.5e3", "timestamp": b"1,2024-01-01 23:59:59"}[kind]


def test_typed_values() -> None:
    cols = [("i", "bigint"), ("n", "numeric(12,2)"), ("d", "date"), ("ts", "timestamp"), ("b", "boolean"),
            ("f", "double")]
    parsed = parse(spec(cols), b"-9,1234.50,20240229,2024-05-01 08:30:00,Y,2.5\n")
    assert rows_of(parsed) == [{"i": -9, "n": Decimal("1234.50"), "d": dt.date(2024, 2, 29),
                                "ts": dt.datetime(2024, 5, 1, 8, 30), "b": True, "f": 2.5}]


def test_on_invalid_null_stores_null_and_counts() -> None:
    col = ColumnConfig(name="d", type="date", on_invalid="null")
    parsed = parse(spec([("id", "integer"), col]), b"1,20240230\n2,20240101\n")
    assert rows_of(parsed) == [{"id": 1, "d": None}, {"id": 2, "d": dt.date(2024, 1, 1)}]
    assert parsed.coerced == {"d": 1} and parsed.rejects.num_rows == 0


def test_nul_bytes_are_stripped_after_null_detection_and_counted() -> None:
    # Issue 11 item 16: a lone NUL is a value (not the empty null marker); the stripped values count.
    parsed = parse(spec(ABC), b"1,a\x00b,\x00\n")
    assert rows_of(parsed) == [{"a": 1, "b": "ab", "c": ""}]
    assert parsed.coerced == {"b": 1, "c": 1}


def test_invalid_utf8_rejects_only_that_row() -> None:
    parsed = parse(spec(ABC), "1,ação,x\n2,".encode() + b"caf\xe9" + b",y\n3,ok,z\n")
    assert [r["a"] for r in rows_of(parsed)] == [1, 3]
    assert rejects_of(parsed) == [(2, None, "invalid bytes for encoding utf-8 at byte 5")]
    assert parsed.rejects.column("raw").to_pylist() == ["2,caf\\xe9,y"]


def test_latin1_and_cp1252() -> None:
    assert rows_of(parse(spec(ABC, encoding="latin-1"), b"1,S\xe3o,\xc7\n"))[0] == {"a": 1, "b": "São", "c": "Ç"}
    parsed = parse(spec(ABC, encoding="cp1252"), b"1,\x80 5,x\n2,\x81,y\n")
    assert rows_of(parsed) == [{"a": 1, "b": "€ 5", "c": "x"}]
    assert rejects_of(parsed) == [(2, None, "invalid bytes for encoding cp1252 at byte 2")]


def test_unterminated_quote_costs_one_row() -> None:
    data = b'1,x,y\n2,"open,x\n3,fine,y\n4,ok,z\n'
    parsed = parse(spec(ABC), data)
    assert [r["a"] for r in rows_of(parsed)] == [1, 3, 4]
    assert rejects_of(parsed) == [(2, None, "malformed record")]
    assert parsed.rejects.column("raw").to_pylist() == ['2,"open,x']
    one_line = parse(spec(ABC, newlines_in_values=False), data)
    assert [r["a"] for r in rows_of(one_line)] == [1, 3, 4] and rejects_of(one_line)[0][0] == 2


@pytest.mark.parametrize("delimiter", ["\t", "\x1f", "|", ";"])
def test_any_single_char_delimiter(delimiter: str) -> None:
    data = delimiter.join(["1", "x,y", "z"]).encode() + b"\n"
    assert rows_of(parse(spec(ABC, delimiter=delimiter), data)) == [{"a": 1, "b": "x,y", "c": "z"}]


def test_header_matched_by_name_in_any_order() -> None:
    from loadkit.transform import parse_chunk

    parsed = parse_chunk(spec(ABC, header=True, match_by_name=True), b"c,extra,a,b\nz,_,1,x\n", 1,
                         header=["c", "extra", "a", "b"], skip_header=True)
    assert rows_of(parsed) == [{"a": 1, "b": "x", "c": "z"}]


def test_required_value_missing() -> None:
    parsed = parse(spec([ColumnConfig(name="a", type="integer", nullable=False), ("b", "text")]), b",x\n1,y\n")
    assert rejects_of(parsed) == [(1, "a", "required value is missing")]


def test_parquet_dates_decimals_timestamps_and_values_that_do_not_fit() -> None:
    src = pa.table({
        "id": pa.array([1, 2, 3_000_000_000], pa.int64()),
        "d": pa.array([dt.date(2024, 1, 31), None, dt.date(1999, 12, 31)], pa.date32()),
        "amount": pa.array([Decimal("12.34"), Decimal("-0.01"), Decimal("5.00")], pa.decimal128(10, 2)),
        "ts": pa.array([dt.datetime(2024, 5, 1, 8, 30, 15, 123456), None, dt.datetime(2000, 1, 1)],
                       pa.timestamp("ns")),
        "note": pa.array(["x", None, "z"]),
    })
    table = spec([("id", "integer"), ("d", "date"), ("amount", "numeric(12,2)"), ("ts", "timestamp"),
                  ("note", "text")], fmt="parquet")
    parsed = parse_parquet_batch(table, ipc_bytes(src), first_row=101)
    assert rows_of(parsed) == [
        {"id": 1, "d": dt.date(2024, 1, 31), "amount": Decimal("12.34"),
         "ts": dt.datetime(2024, 5, 1, 8, 30, 15, 123456), "note": "x"},
        {"id": 2, "d": None, "amount": Decimal("-0.01"), "ts": None, "note": None}]
    assert [(r["line_number"], r["column_name"], r["reason"]) for r in parsed.rejects.to_pylist()] == [
        (103, "id", "does not fit integer: 3000000000")]
    assert '"id": 3000000000' in parsed.rejects.column("raw")[0].as_py()
