"""``loadkit init``: a job inferred from five real CSVs (vega_datasets) and variants of them -- different
delimiters, with and without a header, UTF-8 and latin-1, several date formats, a decimal comma, NA
markers, gzip -- loads every one of them exactly (row counts, a column sum, NULL counts)."""
from __future__ import annotations

import csv
import gzip
import io
from decimal import Decimal
from pathlib import Path
from typing import Dict, List

import pytest

from loadkit.source import infer
from loadkit.runner import run_job
from tests.helpers import compose, query

pytestmark = pytest.mark.e2e


def vega(name: str) -> str:
    import vega_datasets

    return (Path(vega_datasets.__file__).parent / "_data" / name).read_text(encoding="utf-8")


def _rows(text: str) -> List[List[str]]:
    return list(csv.reader(io.StringIO(text)))


def _write(rows: List[List[str]], delimiter: str) -> str:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\n").writerows(rows)
    return out.getvalue()


def make_samples(root: Path) -> Dict[str, dict]:
    """Five files; per table the oracle: rows, a column whose sum is checked, expected dialect facts."""
    samples: Dict[str, dict] = {}
    # 1. as shipped: comma, header, UTF-8, dates 2012/01/01
    (root / "weather.csv").write_text(vega("seattle-weather.csv"))
    w = _rows(vega("seattle-weather.csv"))[1:]
    samples["weather"] = dict(rows=len(w), col="temp_max", total=sum(Decimal(r[2]) for r in w), delimiter=",",
                              header=True, encoding="utf-8", date=("date", "%Y/%m/%d"))
    # 2. semicolon, latin-1 with accents, day-first dates, decimal comma with thousands dots
    iowa = _rows(vega("iowa-electricity.csv"))
    out = [["ano", "fonte", "geração"]]
    for year, source, gen in iowa[1:]:
        value = Decimal(gen) / 10
        whole, frac = f"{value:.1f}".split(".")
        out.append([f"{year[8:10]}/{year[5:7]}/{year[:4]}", source.replace("Fuels", "Fósseis"),
                    f"{int(whole):,}".replace(",", ".") + "," + frac])
    (root / "iowa.csv").write_bytes(_write(out, ";").encode("latin-1"))
    samples["iowa"] = dict(rows=len(iowa) - 1, col="gera_o", total=sum(Decimal(r[2]) / 10 for r in iowa[1:]),
                           delimiter=";", header=True, encoding="latin-1", date=("ano", "%d/%m/%Y"),
                           decimal_comma="gera_o")
    # 3. gzip, comma, header, dates like "Jan 1 2000" (kept as text: they do not round-trip)
    (root / "stocks.csv.gz").write_bytes(gzip.compress(vega("stocks.csv").encode()))
    s = _rows(vega("stocks.csv"))[1:]
    samples["stocks"] = dict(rows=len(s), col="price", total=sum(Decimal(r[2]) for r in s), delimiter=",",
                             header=True, encoding="utf-8", format="gzip")
    # 4. pipe, no header, NA as the null marker of a number column, ISO dates
    riots = _rows(vega("la-riots.csv"))[1:]
    for r in riots:
        r[2] = r[2] or "NA"
    (root / "riots.txt").write_text(_write(riots, "|"))
    ages = [Decimal(r[2]) for r in riots if r[2] != "NA"]
    samples["riots"] = dict(rows=len(riots), col="col_3", total=sum(ages), nulls=("col_3", len(riots) - len(ages)),
                            delimiter="|", header=False, encoding="utf-8", date=("col_6", "%Y-%m-%d"))
    # 5. tab, header, timestamps 2010/01/01 00:00
    temps = _rows(vega("seattle-temps.csv"))
    (root / "temps.tsv").write_text(_write(temps, "\t"))
    samples["temps"] = dict(rows=len(temps) - 1, col="temp", total=sum(Decimal(r[1]) for r in temps[1:]),
                            delimiter="\t", header=True, encoding="utf-8", date=("date", "%Y/%m/%d %H:%M"))
    return samples


def test_init_infers_five_csvs_that_load_exactly(tmp_path: Path, pg_dsn: str, schemas: tuple) -> None:
    data, conf = tmp_path / "data", tmp_path / "conf"
    data.mkdir()
    samples = make_samples(data)
    files = [str(p) for p in sorted(data.iterdir())]
    assert infer.main([*files, "-o", str(conf / "job" / "samples.yaml")]) == 0
    text = (conf / "job" / "samples.yaml").read_text()
    assert text.startswith("# Inferred by `loadkit init`") and "e.g." in text
    assert infer.main([files[0], "-o", str(conf / "job" / "samples.yaml")]) == 2  # no silent overwrite

    target, led = schemas
    cfg = compose([f"hydra.searchpath=[file://{conf}]", "+job=samples", f"data_root={data}", f"sink.dsn={pg_dsn}",
                   f"job.schema={target}", f"sink.ledger_schema={led}", "tracking.enabled=false",
                   "env.executor=inprocess", "env.progress_bars=false"])
    assert cfg.job is not None and set(cfg.job.tables) == set(samples)
    for name, expect in samples.items():
        t = cfg.job.tables[name]
        d = t.source.dialect
        assert (d.delimiter, d.header, d.encoding) == (expect["delimiter"], expect["header"], expect["encoding"]), name
        assert t.source.format == expect.get("format", "csv"), name
        cols = {c.name: c for c in t.columns}
        if "date" in expect:
            col, fmt = expect["date"]
            assert cols[col].format == fmt and cols[col].type in ("date", "timestamp"), (name, cols[col])
        if "decimal_comma" in expect:
            assert cols[expect["decimal_comma"]].decimal_comma
        if "nulls" in expect:
            assert cols[expect["nulls"][0]].null_values == ["NA"] and cols[expect["nulls"][0]].type == "integer"

    result = run_job(cfg)
    assert result.status == "succeeded", result.error
    for name, expect in samples.items():
        tm = result.metrics.tables[name]
        assert (tm.rows_read, tm.rows_loaded, tm.rows_rejected) == (expect["rows"], expect["rows"], 0), name
        got = query(pg_dsn, f'SELECT count(*), sum("{expect["col"]}") FROM "{target}"."{name}"')[0]
        assert got == (expect["rows"], expect["total"]), name
        if "nulls" in expect:
            col, n = expect["nulls"]
            assert query(pg_dsn, f'SELECT count(*) FROM "{target}"."{name}" WHERE "{col}" IS NULL') == [(n,)]
    accents = query(pg_dsn, f'SELECT count(*) FROM "{target}".iowa WHERE fonte = %s', ("Fossil Fósseis",))
    assert accents[0][0] > 0


def test_header_names_become_unique_identifiers() -> None:
    used: List[str] = []
    for raw in ("Date", "date", "2nd value", "_lk_batch", "%%%"):
        used.append(infer.identifier(raw, used, len(used) + 1))
    assert used == ["date", "date_2", "c_2nd_value", "col_lk_batch", "col_5"]


def test_codes_keep_leading_zeros_and_a_decimal_comma_is_found(tmp_path: Path) -> None:
    path = tmp_path / "codes.csv"
    path.write_text("code;amount;when\n007;1,5;2024-02-29\n120;2,25;2024-03-01\n")
    g = infer.infer_file(path)
    assert (g.delimiter, g.header) == (";", True)
    assert [(c.name, c.type, c.decimal_comma, c.format) for c in g.columns] == [
        ("code", "text", False, None), ("amount", "numeric(5,2)", True, None), ("when", "date", False, "%Y-%m-%d")]


def test_zip_members_and_parquet_schemas_are_read(tmp_path: Path) -> None:
    import zipfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    with zipfile.ZipFile(tmp_path / "people.zip", "w") as zf:
        zf.writestr("PEOPLE.CSV", "id;name;born\n1;Ana;2001-02-03\n2;Bo;1999-12-31\n")
    z = infer.infer_file(tmp_path / "people.zip")
    assert (z.format, z.member, z.delimiter, z.header) == ("zip", "PEOPLE.CSV", ";", True)
    assert [c.type for c in z.columns] == ["integer", "text", "date"]
    pq.write_table(pa.table({"n": pa.array([1, 2], pa.int64()), "x": [0.5, 1.5], "s": ["a", "b"]}),
                   tmp_path / "t.parquet")
    p = infer.infer_file(tmp_path / "t.parquet")
    assert p.format == "parquet" and [(c.name, c.type) for c in p.columns] == [
        ("n", "bigint"), ("x", "double"), ("s", "text")]
    text = infer.render("mixed", [z, p], tmp_path)
    assert 'member: "PEOPLE.CSV"' in text and "dialect" not in text.split("  t:")[1]
