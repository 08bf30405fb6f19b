"""Property tests: the typing functions against Python references (issue 11, items 10-12, 18).

Dates and date-times: ``transform.parse_datetimes`` accepts exactly what ``datetime.strptime``
accepts and returns the same value, on random values formatted with random formats (zero
padded or not, names in any case, runs of spaces, fractions of 1-6 digits) plus corrupted
ones. Integers and decimals: the column converters against ``int()`` / ``Decimal`` over the
documented grammar, with min/max.

CI runs a fixed-seed, bounded profile (derandomize=True); a longer search:
``LOADKIT_HYPOTHESIS_EXAMPLES=20000 pytest tests/test_typing_props.py``.
"""
from __future__ import annotations

import datetime as dt
import decimal
import os
import re
from decimal import Decimal
from typing import Any, Dict, List, Optional, Tuple

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadkit.config import ColumnConfig
from loadkit.plan import column_spec
from loadkit.transform import _Checker, _convert_column, parse_datetimes

PROFILE = settings(max_examples=int(os.environ.get("LOADKIT_HYPOTHESIS_EXAMPLES", "150")), derandomize=True,
                   deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def py_strptime(value: Optional[str], fmt: str) -> Optional[dt.datetime]:
    if value is None:
        return None
    try:
        return dt.datetime.strptime(value, fmt)
    except ValueError:
        return None


# ---------------------------------------------------------------- dates and date-times

# Each piece: (directive, how to render a datetime with or without padding)
def _render(directive: str, v: dt.datetime, pad: bool, upper: bool) -> str:
    if directive == "%%":
        return "%"
    if directive == "%Y":
        return f"{v.year:04d}"
    if directive == "%y":
        return f"{v.year % 100:02d}" if pad else str(v.year % 100).zfill(2)  # Python needs 2 digits
    if directive in ("%m", "%d", "%H", "%M", "%S"):
        n = {"%m": v.month, "%d": v.day, "%H": v.hour, "%M": v.minute, "%S": v.second}[directive]
        return f"{n:02d}" if pad else str(n)
    if directive == "%I":
        h = v.hour % 12 or 12
        return f"{h:02d}" if pad else str(h)
    if directive == "%p":
        s = "AM" if v.hour < 12 else "PM"
        return s if upper else s.lower()
    if directive == "%f":
        digits = f"{v.microsecond:06d}"
        return digits if pad else (digits.rstrip("0") or "0")
    if directive in ("%b", "%B"):
        name = MONTHS[v.month - 1][:3] if directive == "%b" else MONTHS[v.month - 1]
        return name.upper() if upper else name
    if directive in ("%a", "%A"):
        name = DAYS[v.weekday()][:3] if directive == "%a" else DAYS[v.weekday()]
        return name.lower() if upper else name
    raise AssertionError(directive)


DATE_ORDERS = [["%Y", "-", "%m", "-", "%d"], ["%m", "/", "%d", "/", "%Y"], ["%d", ".", "%m", ".", "%y"],
               ["%Y", "%m", "%d"], ["%b", " ", "%d", " ", "%Y"], ["%d", " ", "%B", ", ", "%Y"],
               ["%a", " ", "%b", " ", "%d", " ", "%Y"], ["%Y", "/", "%m", "/", "%d"], ["%d", "%m", "%Y"],
               ["(", "%Y", ")[", "%m", "]+", "%d", "*?|^$\\"], ["%d", "%%", "%m", "{2}", "%y"]]
TIME_PARTS = [[], [" ", "%H", ":", "%M", ":", "%S"], ["T", "%H", ":", "%M", ":", "%S", ".", "%f"],
              [" ", "%H", ":", "%M"], [" ", "%I", ":", "%M", " ", "%p"], [" ", "%H", "%M", "%S"],
              [" ", "%H", ":", "%M", ":", "%S", ".", "%f"]]


@st.composite
def formatted(draw: Any) -> Tuple[str, List[str]]:
    """A format and a few values: well formed (padded or not), then some corrupted."""
    pieces = draw(st.sampled_from(DATE_ORDERS)) + draw(st.sampled_from(TIME_PARTS))
    fmt = "".join(pieces)
    values = []
    for _ in range(draw(st.integers(1, 8))):
        v = draw(st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59, 59)))
        if "%y" in fmt:  # %y covers 1969..2068 only
            v = v.replace(year=1969 + v.year % 100, day=min(v.day, 28) if v.month == 2 else v.day)
        pad, upper = draw(st.booleans()), draw(st.booleans())
        text = "".join(_render(p, v, pad or draw(st.booleans()), upper) if p.startswith("%") else
                       (p if p != " " else draw(st.sampled_from([" ", "  ", "\t"]))) for p in pieces)
        values.append(_corrupt(draw, text))
    return fmt, values


def _corrupt(draw: Any, text: str) -> str:
    how = draw(st.sampled_from(["none", "none", "none", "digit", "insert", "cut", "feb", "space", "unicode"]))
    if how == "none" or not text:
        return text
    at = draw(st.integers(0, len(text) - 1))
    if how == "digit":
        return text[:at] + draw(st.sampled_from("0123456789")) + text[at + 1:]
    if how == "insert":
        return text[:at] + draw(st.sampled_from(list("0 9x:-/\x0b\x1c") + ["\u2003", "\u0663"])) + text[at:]
    if how == "cut":
        return text[:at]
    if how == "feb":  # impossible days and hours where the format allows them
        return re.sub(r"\b(0?[1-9]|1[0-2])([-/.])(\d\d?)\b", lambda m: f"2{m.group(2)}30", text, count=1)
    if how == "space":
        return draw(st.sampled_from([" ", ""])) + text
    return text.replace("1", "\u0661")  # ARABIC-INDIC DIGIT ONE: Python's \d takes it


@PROFILE
@given(formatted())
def test_parse_datetimes_equals_python_strptime(case: Tuple[str, List[str]]) -> None:
    fmt, values = case
    assert_same_as_python(values, fmt)


@PROFILE
@given(st.sampled_from(["%Y-%m-%d", "%m/%d/%Y %H:%M:%S", "%Y%m%d", "%d %b %Y", "%Y-%m-%dT%H:%M:%S.%f"]),
       st.lists(st.text(alphabet="0123456789 -/:.TJanFebDecmay\t\x0b\u0663", max_size=22), max_size=12))
def test_parse_datetimes_on_arbitrary_text(fmt: str, values: List[str]) -> None:
    got = parse_datetimes(pa.array(values, pa.string()), fmt).to_pylist()
    assert got == [py_strptime(v, fmt) for v in values]


# The zero-padded formats take a shape test plus a re-check of the values that may have overflowed
# (transform._canonical); these cases aim at it: impossible days, second 60/61, years 0 and 9999,
# unpadded fields of the canonical length, signs and whitespace.
FIXED_FORMATS = ["%Y%m%d", "%Y-%m-%d", "%d/%m/%Y", "%Y-%m-%dT%H:%M:%S", "%Y%m%d%H%M%S", "%H:%M:%S %d.%m.%Y"]


@st.composite
def fixed_fields(draw: Any) -> Tuple[str, List[str]]:
    fmt = draw(st.sampled_from(FIXED_FORMATS))
    values = []
    for _ in range(draw(st.integers(1, 10))):
        fields = {"%Y": draw(st.sampled_from([0, 1, 2, 1900, 2000, 2023, 2024, 9998, 9999, 10000])
                             | st.integers(0, 9999)),
                  "%m": draw(st.integers(0, 13)), "%d": draw(st.sampled_from([0, 1, 2, 3, 28, 29, 30, 31, 32])
                                                             | st.integers(0, 32)),
                  "%H": draw(st.integers(0, 24)), "%M": draw(st.integers(0, 60)),
                  "%S": draw(st.sampled_from([0, 1, 59, 60, 61]) | st.integers(0, 62))}
        pad = draw(st.sampled_from(["all", "all", "none", "some"]))
        text = ""
        for p in (p for p in re.split(r"(%.)", fmt) if p):
            if p in fields:
                w = 4 if p == "%Y" else 2
                padded = pad == "all" or (pad == "some" and draw(st.booleans()))
                text += str(fields[p]).zfill(w) if padded else str(fields[p])
            else:
                text += p
        how = draw(st.sampled_from(["none", "none", "none", "sign", "space", "swap"]))
        if how == "sign":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.sampled_from("+-")) + text[at:]
        elif how == "space":  # whitespace before a field, of the canonical length when a field is unpadded
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.sampled_from([" ", "\t", "\x0b", "\n"])) + text[at:]
        elif how == "swap" and len(text) > 1:
            at = draw(st.integers(0, len(text) - 2))
            text = text[:at] + text[at + 1] + text[at] + text[at + 2:]
        values.append(text)
    return fmt, values


def assert_same_as_python(values: List[str], fmt: str) -> None:
    """parse_datetimes of ``values`` equals Python's strptime of each (None where it refuses)."""
    got = parse_datetimes(pa.array(values, pa.string()), fmt).to_pylist()
    assert got == [py_strptime(v, fmt) for v in values], fmt


@PROFILE
@given(fixed_fields())
def test_zero_padded_formats_equal_python_strptime(case: Tuple[str, List[str]]) -> None:
    fmt, values = case
    assert_same_as_python(values, fmt)


def test_every_day_number_of_every_month_number_equals_python_strptime() -> None:
    """Exhaustive over the overflow edges: days 00..32 of months 00..13 in leap, non-leap and edge years,
    padded and unpadded (' 2024-1-05' has the canonical length), with second 59..61 at the end of a day."""
    values = []
    for year in ("0000", "0001", "1900", "2000", "2023", "2024", "9999"):
        for month in range(14):
            for day in range(33):
                values += [f"{year}-{month:02d}-{day:02d}", f"{year}-{month}-{day:02d} ", f" {year}-{month}-{day}"]
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        texts = values if "-" in fmt else [v.replace("-", "") for v in values]
        got = parse_datetimes(pa.array(texts, pa.string()), fmt).to_pylist()
        assert got == [py_strptime(v, fmt) for v in texts], fmt
    stamps = [f"{d}T23:59:{s}" for d in ("2024-02-28", "2024-02-29", "2023-02-28", "2024-12-31", "9999-12-31")
              for s in ("59", "60", "61", "62", "6", " 6")]
    got = parse_datetimes(pa.array(stamps, pa.string()), "%Y-%m-%dT%H:%M:%S").to_pylist()
    assert got == [py_strptime(v, "%Y-%m-%dT%H:%M:%S") for v in stamps]


DIGIT_FORMATS = ["%Y%m%d", "%Y%m%d%H%M%S", "%d%m%Y", "%m%d", "%Y%m", "%H%M%S", "%Y", "%S%d%M%m%H%Y"]


@st.composite
def digit_values(draw: Any) -> Tuple[str, List[str]]:
    """An all-digit format and values of its full width (transform._digit_times) mixed with others."""
    fmt = draw(st.sampled_from(DIGIT_FORMATS))
    width = sum(4 if p == "%Y" else 2 for p in re.findall(r"%.", fmt))
    full = st.text("0123456789", min_size=width, max_size=width)
    near = st.one_of(st.text("0123456789", min_size=max(0, width - 2), max_size=width + 1),
                     st.text("0123456789 +-\u0663\uff11", min_size=width, max_size=width))
    return fmt, draw(st.lists(st.one_of(full, full, near), min_size=1, max_size=12))


@PROFILE
@given(digit_values())
def test_all_digit_formats_equal_python_strptime(case: Tuple[str, List[str]]) -> None:
    fmt, values = case
    assert_same_as_python(values, fmt)


def test_every_eight_digit_date_of_edge_years_equals_python_strptime() -> None:
    """Every month 00-99 and day 00-99 of edge years, as %Y%m%d (the all-digit stage alone)."""
    texts = [f"{y}{m:02d}{d:02d}" for y in ("0000", "0001", "1900", "2000", "2023", "2024", "9999")
             for m in range(100) for d in range(100)]
    got = parse_datetimes(pa.array(texts, pa.string()), "%Y%m%d").to_pylist()
    assert got == [py_strptime(v, "%Y%m%d") for v in texts]


# ---------------------------------------------------------------- integers and decimals

def convert(col: ColumnConfig, values: List[Optional[str]]) -> Tuple[List[Any], List[Optional[Tuple[str, str]]]]:
    chk = _Checker(len(values))
    out = _convert_column(column_spec(col), pa.array(values, pa.string()), chk)
    return out.to_pylist(), chk.reason


_INT = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}


def ref_int(value: Optional[str], kind: str, lo: Optional[int], hi: Optional[int]) -> Tuple[Any, Optional[str]]:
    """(value, reason prefix): the documented grammar [+-]?[0-9]+, then int(), the type's range, min/max."""
    if value is None:
        return None, None
    t = value.strip(" \t")
    if not re.fullmatch(r"[+-]?[0-9]+", t):
        return None, "not an integer"
    n = int(t)
    if not -_INT[kind] <= n < _INT[kind]:
        return None, f"out of range for {kind}"
    if lo is not None and n < lo:
        return None, f"less than min {lo}"
    if hi is not None and n > hi:
        return None, f"greater than max {hi}"
    return n, None


int_text = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.tuples(st.sampled_from(["", "+", "-", " ", "\t-"]), st.text("0", max_size=25), st.text("0123456789", min_size=1,
                                                                                         max_size=21),
              st.sampled_from(["", " ", "x", ".0", "_1"])).map("".join),
    st.text(alphabet="0123456789+-. e\u0663", max_size=8), st.none())


@PROFILE
@given(st.sampled_from(["smallint", "integer", "bigint"]), st.lists(int_text, max_size=12),
       st.one_of(st.none(), st.integers(-(2**40), 2**40)), st.one_of(st.none(), st.integers(-(2**40), 2**40)))
def test_integers_equal_python_int_with_min_max(kind: str, values: List[Optional[str]], lo: Optional[int],
                                                 hi: Optional[int]) -> None:
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    col = ColumnConfig(name="v", type=kind, min=None if lo is None else str(lo), max=None if hi is None else str(hi))
    got, reasons = convert(col, values)
    expected = [ref_int(v, kind, lo, hi) for v in values]
    assert got == [e[0] for e in expected]
    assert [r[1].split(":")[0] if r else None for r in reasons] == [e[1] for e in expected]


@PROFILE
@given(st.sampled_from(["smallint", "integer", "bigint"]), st.lists(int_text, max_size=12),
       st.sampled_from(["cast", "general"]))
def test_both_integer_paths_equal_python_int(kind: str, values: List[Optional[str]], path: str) -> None:
    """"cast": only values of the plain shape -?digits (up to 18) that fit, the one-cast path of
    transform._to_int; "general": a value out of the type's range added, the per-value checks for all."""
    plain = [v for v in values if v is None or re.fullmatch(r"-?[0-9]{1,18}", v.strip(" \t"))]
    if path == "cast":
        values = [v for v in plain if ref_int(v, kind, None, None)[1] is None]
    else:
        values = plain + [str(_INT[kind])]
    got, reasons = convert(ColumnConfig(name="v", type=kind), values)
    expected = [ref_int(v, kind, None, None) for v in values]
    assert got == [e[0] for e in expected]
    assert [r[1].split(":")[0] if r else None for r in reasons] == [e[1] for e in expected]


def ref_numeric(value: Optional[str], p: int, s: int, lo: Optional[Decimal],
                hi: Optional[Decimal]) -> Tuple[Any, Optional[str]]:
    if value is None:
        return None, None
    t = value.strip(" \t")
    if not re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)", t):
        return None, "not a number"
    with decimal.localcontext(decimal.Context(prec=200)):
        x = Decimal(t)
        if x != x.quantize(Decimal(1).scaleb(-s)) or abs(x) >= Decimal(10) ** (p - s):
            return None, f"does not fit numeric({p},{s})"
        if lo is not None and x < lo:
            return None, f"less than min {lo}"
        if hi is not None and x > hi:
            return None, f"greater than max {hi}"
        return x.quantize(Decimal(1).scaleb(-s)), None


dec_text = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-(10**9), max_value=10**9).map(str),
    st.tuples(st.sampled_from(["", "-", "+", " "]), st.text("0123456789", max_size=12), st.sampled_from(["", "."]),
              st.text("0123456789", max_size=6), st.sampled_from(["", "0", "000", " ", "e3", "x"])).map("".join),
    st.none())


@PROFILE
@given(st.tuples(st.integers(1, 20), st.integers(0, 6)).filter(lambda ps: ps[1] <= ps[0]),
       st.lists(dec_text, max_size=12),
       st.one_of(st.none(), st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-10**6,
                                        max_value=10**6)))
def test_decimals_equal_python_decimal_with_min(ps: Tuple[int, int], values: List[Optional[str]],
                                                lo: Optional[Decimal]) -> None:
    p, s = ps
    col = ColumnConfig(name="v", type=f"numeric({p},{s})", min=None if lo is None else str(lo))
    got, reasons = convert(col, values)
    expected = [ref_numeric(v, p, s, lo, None) for v in values]
    assert got == [e[0] for e in expected]
    assert [r[1].split(": ")[0] if r else None for r in reasons] == [e[1] for e in expected]


def ref_numeric_comma(value: Optional[str], p: int, s: int) -> Tuple[Any, Optional[str]]:
    """decimal_comma: groups of three with '.' and a ',' point (1.234,56), or plain digits (1234,56)."""
    if value is None:
        return None, None
    t = value.strip(" \t")
    if not re.fullmatch(r"[+-]?[0-9]{1,3}(\.[0-9]{3})*(,[0-9]+)?|[+-]?[0-9]+(,[0-9]+)?", t):
        return None, "not a number"
    return ref_numeric(t.replace(".", "").replace(",", "."), p, s, None, None)


comma_text = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=-(10**12), max_value=10**12).map(
        lambda d: str(d).replace(".", ",")),
    st.tuples(st.sampled_from(["", "-", "+", " "]), st.text("0123456789", min_size=1, max_size=3),
              st.lists(st.text("0123456789", min_size=3, max_size=3), max_size=5).map(
                  lambda g: "".join("." + x for x in g)),
              st.sampled_from(["", ",", ",5", ",50", ",500", ",05", ",123", ",1.2"])).map("".join),
    st.text(alphabet="0123456789.,+- x", max_size=10), st.none())

# Up to 60 digits: past 38 the converter canonicalises leading and trailing zeros first.
long_text = st.tuples(st.sampled_from(["", "-", "+"]), st.text("0", max_size=30), st.text("0123456789", max_size=25),
                      st.sampled_from(["", "."]), st.text("0123456789", max_size=8), st.text("0", max_size=30)
                      ).map("".join)


@PROFILE
@given(st.tuples(st.integers(1, 38), st.integers(0, 10)).filter(lambda ps: ps[1] <= ps[0]),
       st.lists(comma_text, max_size=12))
def test_decimal_comma_equals_python_decimal(ps: Tuple[int, int], values: List[Optional[str]]) -> None:
    """decimal_comma columns (capital_social of the monthly job) against Decimal; lists that all fit
    take the one-cast path, the others the per-value digit count (transform._cast_fitting)."""
    p, s = ps
    col = ColumnConfig(name="v", type=f"numeric({p},{s})", decimal_comma=True)
    got, reasons = convert(col, values)
    expected = [ref_numeric_comma(v, p, s) for v in values]
    assert got == [e[0] for e in expected]
    assert [r[1].split(": ")[0] if r else None for r in reasons] == [e[1] for e in expected]


@PROFILE
@given(st.tuples(st.integers(1, 38), st.integers(0, 12)).filter(lambda ps: ps[1] <= ps[0]),
       st.lists(st.one_of(long_text, dec_text, comma_text), max_size=10), st.sampled_from(["cast", "count"]),
       st.booleans())
def test_both_decimal_paths_equal_python_decimal(ps: Tuple[int, int], values: List[Optional[str]], path: str,
                                                 comma: bool) -> None:
    """Each path on its own: "cast" keeps only the values that fit (the one-cast path); "count" adds a
    value too long for the column (the per-value digit count of transform._cast_fitting for all)."""
    p, s = ps
    ref = (lambda v: ref_numeric_comma(v, p, s)) if comma else (lambda v: ref_numeric(v, p, s, None, None))
    if path == "cast":
        values = [v for v in values if ref(v)[1] is None]
    else:
        values = values + ["9" * (p - s + 1)]
    col = ColumnConfig(name="v", type=f"numeric({p},{s})", decimal_comma=comma)
    got, reasons = convert(col, values)
    expected = [ref(v) for v in values]
    assert got == [e[0] for e in expected]
    assert [r[1].split(": ")[0] if r else None for r in reasons] == [e[1] for e in expected]


# ---------------------------------------------------------------- typed Parquet values into integer columns


@PROFILE
@given(st.sampled_from([pa.int16(), pa.int32(), pa.int64()]),
       st.one_of(st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), max_size=10).map(
           lambda v: pa.array(v, pa.int64())),
           st.lists(st.one_of(st.none(), st.floats(allow_infinity=True, allow_nan=True),
                              st.integers(-99, 99).map(float)), max_size=10).map(lambda v: pa.array(v, pa.float64()))))
def test_vectorised_fit_check_equals_the_safe_cast_of_each_value(target: pa.DataType, arr: pa.Array) -> None:
    from loadkit.transform import _fits, _fitting

    assert _fitting(arr, target).to_pylist() == [_fits(v, target) if v.is_valid else True for v in arr]


# ---------------------------------------------------------------- pyarrow's block size


_cell = st.one_of(st.text(alphabet="ab;\"\n\r ,.0\u00e9\u00e3\x01", max_size=12), st.sampled_from(["", "NA", "0"]))


@PROFILE
@given(st.lists(st.lists(_cell, min_size=3, max_size=3), min_size=1, max_size=40), st.sampled_from([1, 7, 64]),
       st.sampled_from(["latin-1", "utf-8"]))
def test_parse_chunk_is_the_same_in_small_blocks(records: List[List[str]], block: int, encoding: str) -> None:
    """transform._arrow_parse reads a chunk in blocks of _ARROW_BLOCK bytes (a record longer than a
    block: the whole chunk in one): rows, rejects and counts equal those of one block per chunk."""
    import loadkit.transform as tr
    from tests.corpus import spec

    if records[0][0] == "":  # a one-column table: its blank lines are rows (NULL), not skipped
        table = spec([("a", "text")], encoding=encoding, delimiter=";", null_values=["NA", ""])
        data = "".join((r[1].replace("\n", "").replace("\r", "").replace('"', "").replace(";", "")
                        if i % 3 else "") + "\n" for i, r in enumerate(records)).encode(encoding)
    else:
        table = spec([("a", "text"), ("b", "varchar(5)"), ("c", "char(2)")], encoding=encoding, delimiter=";",
                     null_values=["NA"])
        data = "".join(";".join('"' + v.replace('"', '""') + '"' for v in r) + "\n"
                       for r in records).encode(encoding)

    def run(size: int) -> Tuple[Any, Any, int, Dict[str, int], int]:
        saved = tr._ARROW_BLOCK
        tr._ARROW_BLOCK = size
        try:
            p = tr.parse_chunk(table, data, 1)
        finally:
            tr._ARROW_BLOCK = saved
        return p.rows.to_pylist(), p.rejects.to_pylist(), p.rows_in, p.coerced, p.blank_lines

    assert run(block) == run(1 << 30)


# ---------------------------------------------------------------- derived keys


@PROFILE
@given(st.lists(st.tuples(st.one_of(st.none(), st.text(max_size=8)), st.one_of(st.none(), st.text(max_size=8))),
                max_size=20), st.integers(0, 3))
def test_derived_key_is_the_md5_of_the_joined_utf8_text(rows: List[Tuple[Optional[str], Optional[str]]],
                                                       offset: int) -> None:
    """transform.derived_key (hashed from the joined array's buffer) against hashlib over Python strings,
    NULL as empty, on sliced arrays too (a non-zero offset)."""
    import hashlib

    from loadkit.transform import derived_key

    cols = [pa.array([r[i] for r in rows], pa.string()).slice(min(offset, len(rows))) for i in range(2)]
    expected = [hashlib.md5(f"{a or ''}\x1f{b or ''}".encode("utf-8")).hexdigest() for a, b in rows[offset:]]
    got = derived_key(cols)
    got.validate(full=True)
    assert got.to_pylist() == expected
