"""Issue 11's numbered inputs (the record-scanner half) and issue 14's bounds (bomb, stray quote,
long first field), each with its right value. Most run at the parse level (read_unit + parse, the
functions the pipeline runs); one runs end to end through the runner on both executors."""
from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path
from typing import List

import pytest

from loadkit.source import scanner
from loadkit.source import files
from loadkit.config import ColumnConfig, DialectConfig, _validate_dialect
from loadkit.errors import ConfigError
from tests.helpers import compose, query
from tests.corpus import parse, read_local, rejects_of, rows_of, spec, write_zip

TWO = [("a", "text"), ("b", "text")]
NOTES = [("n", "text"), ("s", "text"), ("v", "text")]


def test_item1_backslash_escape_keeps_every_line() -> None:
    data = (b'pen,blue\npen,"pens, blue"\npen,ink \\" pad\npen,\\"red ink\\"\npen,stapler\n'
            b'pen,glue,extra\npen,ruler\n')
    parsed = parse(spec(TWO, escape="\\"), data)
    assert [r["b"] for r in rows_of(parsed)] == ["blue", "pens, blue", 'ink " pad', '"red ink"', "stapler", "ruler"]
    assert rejects_of(parsed) == [(6, None, "expected 2 fields, found 3")]
    assert parsed.rejects.column("raw").to_pylist() == ["pen,glue,extra"]


def test_item2_typing_rejects_after_a_reparse_keep_line_and_raw() -> None:
    # line 2 forces the record-by-record path (ragged); line 4 is a bad integer found by typing
    data = b"1,x\n2,y,z\n3,\"q\nr\"\nbad,w\n"
    parsed = parse(spec([("a", "integer"), ("b", "text")]), data)
    assert rows_of(parsed) == [{"a": 1, "b": "x"}, {"a": 3, "b": "q\nr"}]
    rej = parsed.rejects.to_pylist()
    assert [(r["line_number"], r["raw"]) for r in rej] == [(2, "2,y,z"), (5, "bad,w")]
    assert all(r["reason"] for r in rej)


def test_item3_inner_quotes_strict_rejects_and_lenient_keeps_the_text() -> None:
    data = b'"1";"PADARIA "BOM DIA" LTDA";"x"\n"2";"ok";"y"\n'
    strict = parse(spec(NOTES, delimiter=";"), data)
    assert [r["n"] for r in rows_of(strict)] == ["2"]
    assert rejects_of(strict) == [(1, None, "malformed record")]
    assert "after a closing quote" in strict.rejects.column("reason")[0].as_py()
    lenient = parse(spec(NOTES, delimiter=";", quoting="lenient"), data)
    assert rows_of(lenient) == [{"n": "1", "s": 'PADARIA "BOM DIA" LTDA', "v": "x"}, {"n": "2", "s": "ok", "v": "y"}]


def test_item3_monthly_job_dialect_is_lenient() -> None:
    cfg = compose(["+job=monthly", "year=2024", "month=5", "data_root=/tmp"])
    assert cfg.job.tables["empresas"].source.dialect.quoting == "lenient"


@pytest.mark.parametrize("newlines", [False, True])
def test_item4_unterminated_quote_in_last_column_costs_its_line(tmp_path: Path, newlines: bool) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(b'N1,ok,a\nN2,ok,"27 inch\nN3,ok,c\nN4,ok,d\n')
    load = read_local(spec(NOTES, newlines_in_values=newlines), path)
    assert [r["n"] for r in load.rows] == ["N1", "N3", "N4"]
    assert [(r["line_number"], r["raw"]) for r in load.rejects] == [(2, 'N2,ok,"27 inch')]
    assert load.rejects[0]["reason"] == "malformed record: unterminated quote opened on line 2"


def test_item5_mysql_null_marker_with_backslash_escape() -> None:
    cols = [ColumnConfig(name="a", type="integer"), ColumnConfig(name="b", type="text"),
            ColumnConfig(name="c", type="date", format="%Y-%m-%d")]
    parsed = parse(spec(cols, escape="\\", null_values=["\\N"]), b"1,\\N,2024-01-02\n2,x,\\N\n")
    assert [(r["a"], r["b"], r["c"] is None) for r in rows_of(parsed)] == [(1, None, False), (2, "x", True)]
    assert parsed.rejects.num_rows == 0


def _cnaes(lines: int, at: int, lf_at: int = 0) -> bytes:
    """A cnaes-shaped member whose line ``at`` holds a quoted LF; with ``lf_at`` the first line is
    padded so that LF sits at that byte offset (where a 64 KiB chunk target cuts)."""
    out = []
    for i in range(1, lines + 1):
        text = "COMERCIO VAREJISTA DE ARTIGOS DIVERSOS\nNAO ESPECIFICADOS" if i == at else f"ATIVIDADE {i}"
        out.append(f'"{i:07d}";"{text}"\n')
    data = "".join(out).encode("latin-1")
    if lf_at:
        pad = lf_at - data.index(b"DIVERSOS\n") - len(b"DIVERSOS")
        data = data.replace(b"ATIVIDADE 1\"", b"ATIVIDADE 1" + b"-" * pad + b"\"", 1)
        assert data.index(b"DIVERSOS\n") + len(b"DIVERSOS") == lf_at
    return data


def test_item6_quoted_newline_on_a_chunk_cut_for_every_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "_MIN_TARGET", 1)
    data = _cnaes(2000, 1457)
    path = tmp_path / "c.csv"
    path.write_bytes(data)
    table = spec([("codigo", "text"), ("descricao", "text")], delimiter=";", encoding="latin-1",
                 newlines_in_values=False, quoting="lenient")
    results = []
    for batch_rows in (1, 7, 1000, 50_000):
        load = read_local(table, path, batch_rows=batch_rows)
        assert load.rejects == [] and len(load.rows) == 2000
        results.append(load.rows)
    assert all(r == results[0] for r in results)
    assert results[0][1456]["descricao"] == "COMERCIO VAREJISTA DE ARTIGOS DIVERSOS\nNAO ESPECIFICADOS"
    # split reads: every split point gives the same records
    syn = scanner.Syntax.of(table.dialect)
    whole = scanner.scan(data, syn).ends.tolist()
    for offset in range(0, len(data), 997):
        start, line = files.record_start(io.BytesIO(data), offset, len(data), syn)
        assert start in whole + [0] and line == data.count(b"\n", 0, start) + 1


@pytest.mark.e2e
@pytest.mark.parametrize("executor,size", [("inprocess", 1), ("inprocess", 1000), ("ray", 100)])
def test_item6_end_to_end_same_rows_for_every_batch_size(tmp_path: Path, pg_dsn: str, schemas: tuple, job_overrides,
                                                         ray_session: None, executor: str, size: int) -> None:
    from loadkit.runner import run_job

    month = tmp_path / "2024-05"
    month.mkdir()
    # the reader's 64 KiB chunk target ends between the quoted LF and the record's end
    member = _cnaes(2000, 1457, lf_at=65_530)
    write_zip(month / "Cnaes.zip", {"F.K03200$Z.D40511.CNAECSV": member})
    others = ("empresas", "estabelecimentos", "socios", "simples", "motivos", "municipios", "naturezas", "paises",
              "qualificacoes")
    result = run_job(compose(job_overrides(tmp_path, f"env.executor={executor}", f"batch.size={size}",
                                           "batch.policy=fixed",
                                           *[f"job.tables.{t}.enabled=false" for t in others])))
    assert result.status == "succeeded", result.error
    target, _ = schemas
    got = query(pg_dsn, f'SELECT codigo, descricao FROM "{target}".cnaes ORDER BY codigo')
    assert len(got) == 2000 and result.metrics.tables["cnaes"].rows_rejected == 0
    assert got[1456] == ("0001457", "COMERCIO VAREJISTA DE ARTIGOS DIVERSOS\nNAO ESPECIFICADOS")
    # the accounting adds up across batches (item 7): records = loaded + rejected in the ledger and
    # the metrics, and lines = records + blank lines skipped + the one quoted LF (no header)
    led = schemas[1]
    rows_in, loaded, rejected, blank = query(
        pg_dsn, f'SELECT sum(rows_in), sum(rows_loaded), sum(rows_rejected), sum(blank_lines) FROM "{led}".batch')[0]
    cnaes = result.metrics.tables["cnaes"]
    assert rows_in == loaded + rejected == cnaes.rows_read == cnaes.rows_loaded + cnaes.rows_rejected == 2000
    assert member.count(b"\n") == rows_in + blank + 1 and blank == cnaes.blank_lines == 0


def test_item7_blank_lines_are_null_rows_of_a_one_column_table_else_skipped_and_counted() -> None:
    one = parse(spec([("v", "text")]), b"a\n\nb\n\nc\n")
    assert [r["v"] for r in rows_of(one)] == ["a", None, "b", None, "c"] and one.blank_lines == 0
    two = parse(spec(TWO), b"a,1\n\nb,2\r\n\r\nc,3\n")
    assert [r["a"] for r in rows_of(two)] == ["a", "b", "c"]
    assert two.blank_lines == 2 and two.rows_in == 3


def test_item9_nul_byte_rejects_its_line_when_not_stripped() -> None:
    parsed = parse(spec([("a", "integer"), ("b", "text")], strip_nul=False), b"1,half\x00way\n2,ok\n")
    assert rows_of(parsed) == [{"a": 2, "b": "ok"}]
    assert [(r["line_number"], r["reason"]) for r in parsed.rejects.to_pylist()] == [
        (1, "NUL byte in a value (dialect.strip_nul is false)")]


def test_item14_postgres_copy_rule_for_quoted_empty() -> None:
    data = b'a,b\n1,""\n2,\n'
    copy_rule = parse(spec(TWO, header=True, quoted_can_be_null=False), data)
    assert [r["b"] for r in rows_of(copy_rule)] == ["", None]
    default = parse(spec(TWO, header=True), data)
    assert [r["b"] for r in rows_of(default)] == [None, None]
    # the slow path (a ragged row forces it) keeps the same distinction
    slow = parse(spec(TWO, header=True, quoted_can_be_null=False), data + b"3,x,y\n")
    assert [r["b"] for r in rows_of(slow)] == ["", None] and slow.rejects.num_rows == 1


def test_item15_escape_outside_quotes_follows_the_reference_parsers() -> None:
    # Python's csv and pyarrow both resolve escapes outside quotes: loadkit does the same (README)
    assert rows_of(parse(spec(TWO, escape="\\"), b"1,C:\\temp\\new\n"))[0]["b"] == "C:tempnew"
    assert rows_of(parse(spec(TWO), b"1,C:\\temp\\new\n"))[0]["b"] == "C:\\temp\\new"


def test_item16_nul_stripped_after_null_detection_and_counted() -> None:
    parsed = parse(spec([("a", "text"), ("b", "integer")]), b"\x00,2\n\x001,3\n")
    assert rows_of(parsed) == [{"a": "", "b": 2}, {"a": "1", "b": 3}]
    assert parsed.coerced == {"a": 2}


def test_item20_skip_lines_before_the_header(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_bytes(b"exported 2026-11-30\nid,name\n1,a\n2,b,x\n")
    load = read_local(spec([("id", "integer"), ("name", "text")], header=True, skip_lines=1), path)
    assert load.errors == [] and load.rows == [{"id": 1, "name": "a"}]
    assert [r["line_number"] for r in load.rejects] == [4]


def test_item21_utf16_is_refused_at_config_time() -> None:
    for enc in ("utf-16", "utf-16-le", "utf-32"):
        with pytest.raises(ConfigError, match="not ASCII-compatible"):
            _validate_dialect("d", DialectConfig(encoding=enc))
    with pytest.raises(ConfigError, match="one byte"):
        _validate_dialect("d", DialectConfig(delimiter="§"))
    _validate_dialect("d", DialectConfig(delimiter="§", encoding="latin-1"))


def test_item22_and_issue14_3_stray_quote_is_one_reject_in_linear_time(tmp_path: Path) -> None:
    n = 200_000
    path = tmp_path / "big.csv"
    path.write_bytes(b'id,note\n1,"open\n' + b"".join(b"%d,b\n" % i for i in range(2, n + 1)))
    load = read_local(spec([("id", "integer"), ("note", "text")], header=True, newlines_in_values=True), path,
                      batch_rows=5000)
    assert len(load.rows) == n - 1 and [r["line_number"] for r in load.rejects] == [2]
    # the scanner touches each byte a bounded number of times: count the exact-machine calls
    calls: List[int] = []
    real = scanner._one_record

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*a, **kw)

    scanner._one_record = counting  # type: ignore[assignment]
    try:
        sc = scanner.scan_numpy(path.read_bytes(), scanner.Syntax())
    finally:
        scanner._one_record = real  # type: ignore[assignment]
    assert len(sc) == n + 1 and len(calls) == 1 and list(sc.errors) == [1]
    # the C scanner (scanner.scan in a built checkout) calls its port of the machine exactly there too
    fast = scanner.scan(path.read_bytes(), scanner.Syntax())
    assert fast.ends.tolist() == sc.ends.tolist() and fast.slow == sc.slow == {1} and fast.errors == sc.errors


def test_issue14_2_zip_bomb_is_one_reject_with_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("bomb.csv", "w") as fh:
            fh.write(b"1,ok\n")
            block = b"\x00" * (1 << 20)
            for _ in range(96):  # 96 MiB of NUL, no newline
                fh.write(block)
            fh.write(b"\n2,ok\n")
    table = spec(TWO, max_record_bytes=1 << 20)
    tracemalloc.start()
    try:
        load = read_local(table.__class__(**{**table.__dict__, "format": "zip"}), path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["a"] for r in load.rows] == ["1", "2"]
    assert [(r["line_number"], r["reason"]) for r in load.rejects] == [(2, scanner.TOO_LONG)]
    assert len(load.rejects[0]["raw"]) <= 4096
    assert peak < 64 * 1024 * 1024  # far below the 96 MiB record
    # the decompression guards fail that file clearly, before reading it all
    by_size = table.__class__(**{**table.__dict__, "format": "zip", "max_member_bytes": 8 << 20})
    assert read_local(by_size, path).errors == [
        "member decompresses past 8388608 bytes (source.max_member_bytes) [file=bomb.zip, member=bomb.csv]"]
    by_ratio = table.__class__(**{**table.__dict__, "format": "zip", "max_compression_ratio": 100.0})
    err = read_local(by_ratio, path).errors
    assert len(err) == 1 and "source.max_compression_ratio 100" in err[0]


def test_issue14_4_field_over_128_kib_in_the_first_record_loads(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    big = "x" * (300 * 1024)
    path.write_bytes(f'1,"{big}"\n2,b\n'.encode())
    load = read_local(spec([("a", "integer"), ("b", "text")]), path)
    assert load.errors == [] and [len(r["b"]) for r in load.rows] == [len(big), 1]
    hdr = tmp_path / "hdr.csv"
    hdr.write_bytes(f'a,"{big}"\n1,x\n'.encode())
    assert read_local(spec([("a", "integer"), ("b", "text")], header=True, match_by_name=False), hdr).errors == []


def test_a_malformed_first_record_is_a_reject_not_layout_drift(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(b'"1";"PADARIA "BOM DIA" LTDA";"x"\n"2";"ok";"y"\n')
    load = read_local(spec(NOTES, delimiter=";"), path)
    assert load.errors == [] and [r["n"] for r in load.rows] == ["2"]
    assert [r["line_number"] for r in load.rejects] == [1]
    path.write_bytes(b'a,"b\n1,2,3\n')
    assert "cannot read the header: unterminated quote" in read_local(spec(NOTES, header=True), path).errors[0]
