"""Property: whatever table ``loadkit init`` is shown, the job it infers parses that file back exactly
with loadkit's own parser -- every row, no reject, every value equal to what was written.

Generated files vary the delimiter, header, encoding (UTF-8 / latin-1), quoting (text with the
delimiter, quotes and accents), empty cells, and column kinds: integers, codes with leading zeros,
decimals with a dot or a decimal comma, dates in unambiguous formats. At least one column is typed:
a file of text columns only has no evidence of a header row either way (csv.Sniffer guesses).
"""
from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal
from pathlib import Path
from typing import Any, List, Optional, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadkit.source import infer
from loadkit.config import ColumnConfig
from loadkit.plan import Dialect, TableSpec, column_spec
from loadkit.transform import decode_text_columns, parse_chunk

DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%d.%m.%Y")
TEXT = st.text(alphabet="abcxyzÁéçõ ;,|\"'-", min_size=1, max_size=12).filter(lambda s: s.strip() and
                                                                             any(c.isalpha() for c in s))


@st.composite
def column(draw: Any, rows: int, comma_ok: bool) -> Tuple[str, List[Optional[str]], List[Any]]:
    """(kind, written cells, expected parsed values); None cells are written empty and load as NULL."""
    kind = draw(st.sampled_from(["int", "code", "decimal", "decimal_comma", "date", "text"] if comma_ok
                                else ["int", "code", "decimal", "date", "text"]))
    nulls = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    nulls[0] = False  # the first data row carries a value (header detection looks at it)
    written: List[Optional[str]] = []
    expected: List[Any] = []
    scale = draw(st.integers(1, 3))
    fmt = draw(st.sampled_from(DATE_FORMATS))
    for i in range(rows):
        if nulls[i] and kind != "code":
            written.append(None)
            expected.append(None)
            continue
        if kind == "int":
            v = draw(st.integers(-10**12, 10**12))
            written.append(str(v))
            expected.append(v)
        elif kind == "code":
            v = "0" + str(draw(st.integers(0, 99999)))
            written.append(v)
            expected.append(v)
        elif kind in ("decimal", "decimal_comma"):
            units = draw(st.integers(-10**9, 10**9))
            v = Decimal(units).scaleb(-scale)
            text = f"{v:.{scale}f}"
            written.append(text.replace(".", ",") if kind == "decimal_comma" else text)
            expected.append(v)
        elif kind == "date":
            d = draw(st.dates(dt.date(1900, 1, 1), dt.date(2100, 12, 31)))
            written.append(d.strftime(fmt))
            expected.append(d)
        else:
            v = draw(TEXT)
            written.append(v)
            expected.append(v)
    return kind, written, expected


@st.composite
def table(draw: Any) -> Tuple[str, bool, str, List[Tuple[str, List[Optional[str]], List[Any]]]]:
    delimiter = draw(st.sampled_from([",", ";", "\t", "|"]))
    rows = draw(st.integers(3, 25))
    cols = draw(st.lists(column(rows, delimiter != ","), min_size=2, max_size=6))
    if all(kind in ("text", "code") for kind, _, _ in cols):
        cols.append(draw(column(rows, delimiter != ",").filter(lambda c: c[0] not in ("text", "code"))))
    return delimiter, draw(st.booleans()), draw(st.sampled_from(["utf-8", "latin-1"])), cols


def _write(path: Path, delimiter: str, header: bool, encoding: str, cols: list) -> None:
    out = io.StringIO()
    w = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    if header:
        w.writerow([f"Field {chr(65 + i)}" for i in range(len(cols))])
    for r in range(len(cols[0][1])):
        w.writerow(["" if c[1][r] is None else c[1][r] for c in cols])
    path.write_bytes(out.getvalue().encode(encoding))


def _spec(g: infer.TableGuess) -> TableSpec:
    return TableSpec(name="t", schema="s", mode="append",
                     columns=tuple(column_spec(ColumnConfig(**c.as_config())) for c in g.columns), key=(),
                     derived_key=None, indexes=(), format="csv", member=None,
                     dialect=Dialect(g.delimiter, g.quote, None, g.header, False, g.encoding, ("",),
                                     g.newlines_in_values, True, False),
                     allow_empty=True, files=(), max_reject_rate=0.0, max_rejects=None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(table())
def test_an_inferred_job_parses_its_sample_back_exactly(tmp_path: Path, t: tuple) -> None:
    delimiter, header, encoding, cols = t
    path = tmp_path / "sample.csv"
    _write(path, delimiter, header, encoding, cols)
    g = infer.infer_file(path)
    assert (g.delimiter, g.header) == (delimiter, header)
    data = path.read_bytes()
    parsed = parse_chunk(_spec(g), data, 1, None, g.header)
    assert parsed.rejects.num_rows == 0, parsed.rejects.to_pylist()[:3]
    assert parsed.rows.num_rows == len(cols[0][1])
    for (kind, _, expected), guess in zip(cols, g.columns):
        got = decode_text_columns(parsed.rows).column(guess.name).to_pylist()  # latin-1 text: source bytes
        if kind == "text":
            expected = [v if v else None for v in expected]
        assert got == expected, (kind, guess)
