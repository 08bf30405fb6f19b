"""Column rules at the transform level (issue 11 items 8, 10-12, 17-19; issue 15 item 5).

Each test feeds the failing input of the issue and checks the right value: rows, or the
named reject with its line. The same rules apply to CSV text and to Parquet, typed or not.
"""
from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, List

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loadkit.config import ColumnConfig, JobConfig, LoadkitConfig, SourceConfig, TableConfig, validate
from loadkit.errors import ConfigError
from loadkit.transform import parse_parquet_batch
from loadkit.records import ipc_bytes
from tests.corpus import parse, read_local, rejects_of, rows_of, spec


def reasons(parsed: Any) -> List[tuple]:
    return [(r["line_number"], r["column_name"], r["reason"]) for r in parsed.rejects.to_pylist()]


# ---------------------------------------------------------------- dates and date-times (items 10, 11, 18)


def test_fractional_seconds_load_with_microseconds() -> None:
    col = ColumnConfig(name="ts", type="timestamp", format="%Y/%m/%d %H:%M:%S.%f")
    parsed = parse(spec([("id", "integer"), col]),
                   b"1,2024/05/02 08:15:30.250000\n2,2024/05/02 08:15:30.25\n3,2024/05/02 08:15:30\n")
    assert rows_of(parsed) == [{"id": 1, "ts": dt.datetime(2024, 5, 2, 8, 15, 30, 250000)},
                               {"id": 2, "ts": dt.datetime(2024, 5, 2, 8, 15, 30, 250000)}]
    # strptime's %f needs 1-6 digits: a value without the fraction does not match this format ...
    assert reasons(parsed) == [(3, "ts", "not a valid timestamp (%Y/%m/%d %H:%M:%S.%f): '2024/05/02 08:15:30'")]
    # ... and loads with a format that has none.
    plain = parse(spec([("id", "integer"), ColumnConfig(name="ts", type="timestamp", format="%Y/%m/%d %H:%M:%S")]),
                  b"3,2024/05/02 08:15:30\n")
    assert rows_of(plain) == [{"id": 3, "ts": dt.datetime(2024, 5, 2, 8, 15, 30)}]


@pytest.mark.parametrize("fmt,text,value", [
    ("%b %d %Y", "Jan 1 2000", dt.date(2000, 1, 1)),
    ("%m/%d/%Y", "1/5/2024", dt.date(2024, 1, 5)),
    ("%m/%d/%Y", "02/29/2024", dt.date(2024, 2, 29)),
    ("%d %B %Y", "3 MARCH 1999", dt.date(1999, 3, 3)),
    ("%Y%m%d", "20240501", dt.date(2024, 5, 1)),
])
def test_dates_without_leading_zeros_are_read_as_strptime_does(fmt: str, text: str, value: dt.date) -> None:
    parsed = parse(spec([("id", "integer"), ColumnConfig(name="d", type="date", format=fmt)]), f"1,{text}\n".encode())
    assert rows_of(parsed) == [{"id": 1, "d": value}]
    assert dt.datetime.strptime(text, fmt).date() == value


@pytest.mark.parametrize("fmt,text", [("%b %d %Y", "Feb 30 2000"), ("%m/%d/%Y", "2/30/2024"),
                                      ("%m/%d/%Y", "2/29/2023"), ("%Y%m%d", "20240230"), ("%m/%d/%Y", "13/1/2024"),
                                      ("%Y-%m-%d", "0000-01-01")])
def test_impossible_dates_are_still_rejected(fmt: str, text: str) -> None:
    parsed = parse(spec([("id", "integer"), ColumnConfig(name="d", type="date", format=fmt)]),
                   f"1,{text}\n2,\n".encode())
    assert rows_of(parsed) == [{"id": 2, "d": None}]
    assert reasons(parsed) == [(1, "d", f"not a valid date ({fmt}): {text!r}")]


def test_unpadded_date_times() -> None:
    col = ColumnConfig(name="ts", type="timestamp", format="%m/%d/%Y %H:%M:%S")
    parsed = parse(spec([("id", "integer"), col]), b"1,5/19/2006 0:00:00\n2,12/1/2006 13:5:9\n3,5/19/2006 24:00:00\n")
    assert rows_of(parsed) == [{"id": 1, "ts": dt.datetime(2006, 5, 19)},
                               {"id": 2, "ts": dt.datetime(2006, 12, 1, 13, 5, 9)}]
    assert rejects_of(parsed) == [(3, "ts", "not a valid timestamp (%m/%d/%Y %H")]


def test_a_date_column_with_a_time_format_keeps_the_calendar_day() -> None:
    col = ColumnConfig(name="d", type="date", format="%Y-%m-%d %H:%M")
    parsed = parse(spec([("id", "integer"), col]), b"1,1969-12-31 23:00\n2,2024-01-01 05:00\n")
    assert [r["d"] for r in rows_of(parsed)] == [dt.date(1969, 12, 31), dt.date(2024, 1, 1)]


def test_twelve_hour_clock_and_surrounding_spaces() -> None:
    col = ColumnConfig(name="ts", type="timestamp", format="%I:%M %p %d/%m/%Y")
    parsed = parse(spec([("id", "integer"), col]), b"1, 12:30 am 1/2/2000 \n2,1:05 PM 01/02/2000\n")
    assert [r["ts"] for r in rows_of(parsed)] == [dt.datetime(2000, 2, 1, 0, 30), dt.datetime(2000, 2, 1, 13, 5)]


@pytest.mark.parametrize("fmt", ["%Y-%m-%d %z", "%Y-%m-%d %Z", "%Y-%m-%d %Q"])
def test_time_zone_and_unknown_directives_are_refused_at_config_time(fmt: str) -> None:
    with pytest.raises(ConfigError) as info:
        _validate([ColumnConfig(name="t", type="timestamp", format=fmt)])
    assert info.value.context["key"] == "job.tables.t.columns[0].format"


# ---------------------------------------------------------------- min / max (item 12)


@pytest.mark.parametrize("kind,lo,hi,good,bad,reason", [
    ("integer", None, "10", "10", "99", "greater than max 10: '99'"),
    ("smallint", "-5", None, "-5", "-6", "less than min -5: '-6'"),
    ("bigint", "0", "9223372036854775807", "9223372036854775807", "-1", "less than min 0: '-1'"),
    ("numeric(6,2)", "0.01", "100", "100.00", "0.001", "does not fit numeric(6,2): '0.001'"),
    ("numeric(6,2)", "0.01", "100", "0.01", "100.01", "greater than max 100: '100.01'"),
    ("double", "-1.5", "1e3", "1000", "1000.5", "greater than max 1e3: '1000.5'"),
    ("date", "2000-01-01", "2024-12-31", "20000101", "19991231", "less than min 2000-01-01: '19991231'"),
    ("timestamp", None, "2024-05-01 12:00:00", "2024-05-01 12:00:00", "2024-05-01 12:00:01",
     "greater than max 2024-05-01 12:00:00: '2024-05-01 12:00:01'"),
])
def test_min_and_max_are_enforced_on_every_orderable_type(kind: str, lo: Any, hi: Any, good: str, bad: str,
                                                          reason: str) -> None:
    col = ColumnConfig(name="v", type=kind, min=lo, max=hi)
    _validate([col])
    parsed = parse(spec([("id", "integer"), col]), f"1,{good}\n2,{bad}\n3,\n".encode())
    assert [r["id"] for r in rows_of(parsed)] == [1, 3]
    assert reasons(parsed) == [(2, "v", reason)]


def test_out_of_bounds_with_on_invalid_null_is_stored_as_null_and_counted() -> None:
    col = ColumnConfig(name="v", type="integer", max="10", on_invalid="null")
    parsed = parse(spec([("id", "integer"), col]), b"1,9\n2,99\n")
    assert rows_of(parsed) == [{"id": 1, "v": 9}, {"id": 2, "v": None}]
    assert parsed.coerced == {"v": 1}


@pytest.mark.parametrize("col,key,message", [
    (ColumnConfig(name="v", type="text", max="z"), "max", "min/max do not apply to text"),
    (ColumnConfig(name="v", type="boolean", min="false"), "min", "min/max do not apply to boolean"),
    (ColumnConfig(name="v", type="char(2)", min="a"), "min", "min/max do not apply to char"),
    (ColumnConfig(name="v", type="integer", max="ten"), "max", "invalid literal"),
    (ColumnConfig(name="v", type="date", min="2024-13-01"), "min", "month must be in 1..12"),
    (ColumnConfig(name="v", type="numeric(5,2)", max="NaN"), "max", "not a finite number"),
    (ColumnConfig(name="v", type="integer", min="5", max="1"), "min", "greater than max"),
])
def test_meaningless_or_unreadable_bounds_are_refused_at_config_time(col: ColumnConfig, key: str,
                                                                     message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _validate([col])
    assert info.value.context["key"] == f"job.tables.t.columns[0].{key}"


def _validate(columns: List[ColumnConfig]) -> None:
    validate(LoadkitConfig(year=2024, month=5, job=JobConfig(name="j", tables={
        "t": TableConfig(source=SourceConfig(paths=["x.csv"]), columns=list(columns))})))


# ---------------------------------------------------------------- integers and decimals at their edges


def test_integer_edges_are_values_or_rejects_never_a_failed_chunk() -> None:
    parsed = parse(spec([("id", "integer"), ("v", "bigint")]),
                   b"1,+5\n2,0000000000000000000000042\n3,9999999999999999999\n4,-9223372036854775808\n"
                   b"5,123456789012345678901234567890123456789012\n")
    assert rows_of(parsed) == [{"id": 1, "v": 5}, {"id": 2, "v": 42}, {"id": 4, "v": -(2**63)}]
    assert rejects_of(parsed) == [(3, "v", "out of range for bigint"), (5, "v", "out of range for bigint")]


def test_decimal_forms_postgres_accepts_are_stored_exactly() -> None:
    parsed = parse(spec([("id", "integer"), ("n", "numeric(4,1)")]), b"1,.5\n2,7.\n3,1.50\n4,-0.000\n5,1.25\n")
    assert rows_of(parsed) == [{"id": 1, "n": Decimal("0.5")}, {"id": 2, "n": Decimal("7.0")},
                               {"id": 3, "n": Decimal("1.5")}, {"id": 4, "n": Decimal("0.0")}]
    assert rejects_of(parsed) == [(5, "n", "does not fit numeric(4,1)")]  # never rounded


# ---------------------------------------------------------------- boolean (item 17)


def test_nullable_boolean_with_an_empty_value_is_null() -> None:
    parsed = parse(spec([("id", "integer"), ("flag", "boolean")], header=True), b"id,flag\n1,true\n2,\n3,maybe\n")
    assert rows_of(parsed) == [{"id": 1, "flag": True}, {"id": 2, "flag": None}]
    assert reasons(parsed) == [(4, "flag", "not a boolean: 'maybe'")]
    required = parse(spec([("id", "integer"), ColumnConfig(name="flag", type="boolean", nullable=False)]), b"2,\n")
    assert rejects_of(required) == [(1, "flag", "required value is missing")]


# ---------------------------------------------------------------- placeholders before zfill (issue 15 item 5)


def test_placeholders_are_null_before_zfill_pads_them() -> None:
    """Null markers are matched on the raw value, then zfill pads, then the length is checked."""
    cep = ColumnConfig(name="cep", type="char(8)", zfill=8, null_values=["0", "       0", "00000000"])
    parsed = parse(spec([("id", "integer"), cep], delimiter=";"),
                   b"1;0\n2;       0\n3;00000000\n4;1310100\n5;01310100\n6;000000000\n7;123456789\n")
    assert rows_of(parsed) == [{"id": 1, "cep": None}, {"id": 2, "cep": None}, {"id": 3, "cep": None},
                               {"id": 4, "cep": "01310100"}, {"id": 5, "cep": "01310100"}]
    assert reasons(parsed) == [(6, "cep", "longer than char(8): '000000000'"),
                               (7, "cep", "longer than char(8): '123456789'")]


# ---------------------------------------------------------------- Parquet: the same rules (items 8, 19)


def _parquet(columns: List[Any], src: Dict[str, pa.Array]) -> Any:
    parsed = parse_parquet_batch(spec(columns, fmt="parquet"), ipc_bytes(pa.table(src)), first_row=1)
    assert parsed.rows_in == parsed.rows.num_rows + parsed.rejects.num_rows
    return parsed


def test_parquet_int_codes_take_zfill_and_over_length_is_a_row_reject() -> None:
    code = ColumnConfig(name="code", type="char(6)", zfill=6)
    parsed = _parquet([("id", "integer"), code], {"id": pa.array([1, 2, 3]),
                                                   "code": pa.array([38881, 1234567, None], pa.int64())})
    assert rows_of(parsed) == [{"id": 1, "code": "038881"}, {"id": 3, "code": None}]
    assert reasons(parsed) == [(2, "code", "longer than char(6): '1234567'")]
    assert '"code": 1234567' in parsed.rejects.column("raw")[0].as_py()
    lenient = ColumnConfig(name="code", type="char(6)", zfill=6, on_invalid="null")
    coerced = _parquet([("id", "integer"), lenient], {"id": pa.array([2]), "code": pa.array([1234567])})
    assert rows_of(coerced) == [{"id": 2, "code": None}] and coerced.coerced == {"code": 1}


def test_parquet_text_and_typed_columns_follow_the_csv_rules() -> None:
    cols = [("id", "integer"), ColumnConfig(name="n", type="integer", null_values=["0"], max="100"),
            ColumnConfig(name="d", type="date", min="2000-01-01"),
            ColumnConfig(name="s", type="date", format="%m/%d/%Y", null_values=["00/00/0000"]),
            ColumnConfig(name="f", type="boolean")]
    parsed = _parquet(cols, {
        "id": pa.array([1, 2, 3, 4]),
        "n": pa.array([0, 7, 101, 5], pa.int32()),
        "d": pa.array([dt.date(2000, 1, 1), dt.date(2024, 1, 1), dt.date(2024, 1, 1), dt.date(1999, 12, 31)]),
        "s": pa.array(["1/5/2024", "00/00/0000", "2/30/2024", "12/31/1999"]),
        "f": pa.array([True, None, False, None]),
    })
    assert rows_of(parsed) == [{"id": 1, "n": None, "d": dt.date(2000, 1, 1), "s": dt.date(2024, 1, 5), "f": True},
                               {"id": 2, "n": 7, "d": dt.date(2024, 1, 1), "s": None, "f": None}]
    assert reasons(parsed) == [(3, "n", "greater than max 100: 101"), (4, "d", "less than min 2000-01-01: "
                                                                               "datetime.date(1999, 12, 31)")]


def test_parquet_int96_timestamps_load_exactly(tmp_path: Path) -> None:
    values = [dt.datetime(9999, 12, 31), dt.datetime(1, 1, 1), dt.datetime(2024, 5, 1, 8, 30, 15, 123456), None]
    path = tmp_path / "legacy.parquet"
    pq.write_table(pa.table({"id": pa.array([1, 2, 3, 4]), "ts": pa.array(values, pa.timestamp("us"))}), path,
                   use_deprecated_int96_timestamps=True)
    assert pq.ParquetFile(path).schema.column(1).physical_type == "INT96"
    loaded = read_local(spec([("id", "integer"), ("ts", "timestamp")], fmt="parquet"), path)
    assert loaded.errors == [] and loaded.rejects == []
    assert [r["ts"] for r in loaded.rows] == values


def test_parquet_dates_outside_postgres_range_are_row_rejects() -> None:
    """Arrow holds dates PostgreSQL refuses; they are rejects, never error 22008 for the whole table."""
    parsed = _parquet([("id", "integer"), ("d", "date"), ("ts", "timestamp")], {
        "id": pa.array([1, 2, 3]),
        "d": pa.array([0, -2_440_589, 2_145_042_907], pa.date32()),  # 1970-01-01, 4714-11-23 BC, 5874898 AD
        "ts": pa.array([0, 0, -212_760_172_800_000_001], pa.timestamp("us"))})
    assert rows_of(parsed) == [{"id": 1, "d": dt.date(1970, 1, 1), "ts": dt.datetime(1970, 1, 1)}]
    assert [(r[0], r[1]) for r in reasons(parsed)] == [(2, "d"), (3, "d")]
    assert all("outside the range of PostgreSQL's date" in r[2] for r in reasons(parsed))
    ts_only = _parquet([("ts", "timestamp")], {"ts": pa.array([-212_760_172_800_000_000, -212_760_172_800_000_001],
                                                                pa.timestamp("us"))})
    assert ts_only.rows.num_rows == 1 and reasons(ts_only)[0][:2] == (2, "ts")
