"""The sample-month generator: layout, determinism, quirks, and the expected-value oracle."""

from __future__ import annotations

import json
import re
import zipfile
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from loadkit.examples.cnpj import sample
from loadkit.examples.cnpj.sample import COLUMNS, TABLES, SampleManifest, generate_month

SEP = '";"'
Record = list[str]


MONTH = {"rows": 200, "shards": 2, "seed": 0}  # the size of conftest's `month`


def member_bytes(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        (info,) = zf.infolist()
        return zf.read(info)


def records(manifest: SampleManifest, table: str) -> list[Record]:
    """Raw fields of every record of a table, in file order (shard order, then line order)."""
    out: list[Record] = []
    for rel in manifest.files[table]:
        path = manifest.root / rel
        raw = member_bytes(path) if path.suffix == ".zip" else path.read_bytes()
        text = raw.decode("latin-1")
        assert text.endswith("\n") and "\r" not in text
        for line in text[:-1].split("\n"):
            assert line.startswith('"') and line.endswith('"'), line
            out.append(line[1:-1].split(SEP))
    return out


def column(manifest: SampleManifest, table: str, name: str) -> list[str]:
    index = COLUMNS[table].index(name)
    return [rec[index] for rec in records(manifest, table)]


def shard_keys(manifest: SampleManifest, table: str, width: int) -> list[list[tuple[str, ...]]]:
    """Primary keys per shard file (the first `width` fields)."""
    per_shard = []
    for rel in manifest.files[table]:
        text = member_bytes(manifest.root / rel).decode("latin-1")
        per_shard.append([tuple(line[1:-1].split(SEP)[:width]) for line in text.splitlines()])
    return per_shard


# --- files -----------------------------------------------------------------------------------------

def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    first = generate_month(tmp_path / "a", 2024, 5, rows=200, shards=2, seed=7)
    second = generate_month(tmp_path / "b", 2024, 5, rows=200, shards=2, seed=7)
    other = generate_month(tmp_path / "c", 2024, 5, rows=200, shards=2, seed=8)
    assert first.files == second.files
    for paths in first.files.values():
        for rel in paths:
            assert (first.root / rel).read_bytes() == (second.root / rel).read_bytes(), rel
    changed = [rel for paths in first.files.values() for rel in paths
               if (first.root / rel).read_bytes() != (other.root / rel).read_bytes()]
    assert "2024-05/Estabelecimentos0.zip" in changed  # the seed matters


def test_zip_names_and_member_names(month: SampleManifest) -> None:
    folder = month.root / "2024-05"
    expected_zips = {f"{stem}{i}.zip" for stem in ("Empresas", "Estabelecimentos", "Socios") for i in range(2)}
    expected_zips |= {f"{stem}.zip" for stem in ("Simples", "Cnaes", "Motivos", "Municipios", "Naturezas",
                                                 "Paises", "Qualificacoes")}
    assert {p.name for p in folder.glob("*.zip")} == expected_zips
    suffix = {"empresas": "EMPRECSV", "estabelecimentos": "ESTABELE", "socios": "SOCIOCSV", "cnaes": "CNAECSV",
              "motivos": "MOTICSV", "municipios": "MUNICCSV", "naturezas": "NATJUCSV", "paises": "PAISCSV",
              "qualificacoes": "QUALSCSV"}
    for table, paths in month.files.items():
        for shard, rel in enumerate(paths):
            with zipfile.ZipFile(month.root / rel) as zf:
                (info,) = zf.infolist()
            if table == "simples":
                assert info.filename == "F.K03200$W.SIMPLES.CSV.D40511"
            elif table in sample.SHARDED_TABLES:
                assert info.filename == f"K3241.K03200Y{shard}.D40511.{suffix[table]}"
            else:  # reference tables, as in the real 2025-12 release: F.K03200$Z.D51213.CNAECSV
                assert info.filename == f"F.K03200$Z.D40511.{suffix[table]}"
            assert info.date_time == (2024, 5, 11, 0, 0, 0)


def test_2021_naming_names_each_zip_after_its_member(tmp_path: Path, month: SampleManifest) -> None:
    """2021 to mid-2022 releases: K3241.K03200Y0.D10612.EMPRECSV.zip, F.K03200$W.SIMPLES.CSV.D10612.zip;
    same rows as the current naming."""
    old = generate_month(tmp_path, 2024, 5, rows=200, shards=2, seed=0, naming="2021")
    names = {p.name for p in old.folder.glob("*.zip")}
    assert "K3241.K03200Y0.D40511.EMPRECSV.zip" in names and "K3241.K03200Y1.D40511.ESTABELE.zip" in names
    assert "F.K03200$W.SIMPLES.CSV.D40511.zip" in names and "F.K03200$Z.D40511.QUALSCSV.zip" in names
    assert len(names) == 13
    for table in TABLES:
        for zipped, renamed in zip(month.files[table], old.files[table]):
            with zipfile.ZipFile(old.root / renamed) as zf:
                (info,) = zf.infolist()
            assert Path(renamed).name == info.filename + ".zip"
            assert member_bytes(month.root / zipped) == member_bytes(old.root / renamed)
    with pytest.raises(ValueError, match="naming"):
        generate_month(tmp_path / "x", 2024, 5, rows=200, naming="1999")


def test_members_are_latin1_fully_quoted_with_layout_column_counts(month: SampleManifest) -> None:
    assert len(COLUMNS["empresas"]) == 7 and len(COLUMNS["estabelecimentos"]) == 30
    assert len(COLUMNS["socios"]) == 11 and len(COLUMNS["simples"]) == 7
    for table in TABLES:
        recs = records(month, table)
        assert recs, table
        for rec in recs:
            assert len(rec) == len(COLUMNS[table]), (table, rec)
            assert not any('"' in field or ";" in field for field in rec), rec
    # the bytes really are latin-1 (a UTF-8 decoder chokes on them)
    raw = member_bytes(month.root / month.files["estabelecimentos"][0])
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")


def test_no_compress_writes_the_raw_members(tmp_path: Path, month: SampleManifest) -> None:
    raw = generate_month(tmp_path, 2024, 5, rows=200, shards=2, seed=0, compress=False)
    assert raw.files["estabelecimentos"] == ["2024-05/K3241.K03200Y0.D40511.ESTABELE",
                                             "2024-05/K3241.K03200Y1.D40511.ESTABELE"]
    assert raw.files["simples"] == ["2024-05/F.K03200$W.SIMPLES.CSV.D40511"]
    for table in TABLES:
        for zipped, plain in zip(month.files[table], raw.files[table]):
            assert member_bytes(month.root / zipped) == (raw.root / plain).read_bytes()


def test_manifest_json_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sample.main(["--year", "2024", "--month", "5", "--out", str(tmp_path), "--rows", "200"]) == 0
    doc = json.loads((tmp_path / "2024-05" / "manifest.json").read_text())
    assert set(doc) == {"year", "month", "files", "rows"}
    assert doc["rows"]["estabelecimentos"] == 200 and len(doc["files"]["socios"]) == 2
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "13 files" in summary[0] and "estabelecimentos=200" in summary[0]


def test_rejects_too_few_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_month(tmp_path, 2024, 5, rows=60, shards=2)


# --- quirks ----------------------------------------------------------------------------------------

def test_counts_and_ratios(month: SampleManifest) -> None:
    for table in TABLES:
        assert len(records(month, table)) == month.rows[table] == len(month.expected[table]), table
    assert month.rows["estabelecimentos"] == 200
    assert (month.rows["empresas"], month.rows["socios"], month.rows["simples"]) == (160, 100, 120)
    assert 25 <= month.rows["cnaes"] <= 35 and month.rows["motivos"] == 10


QUIRKS = {
    "NUL byte in ESTABELE text": ("estabelecimentos", "complemento", lambda v: "\x00" in v),
    "numero S/N": ("estabelecimentos", "numero", lambda v: v == "S/N"),
    "accented name": ("estabelecimentos", "nome_fantasia", lambda v: "Ç" in v and "Ã" in v),
    "accented street": ("estabelecimentos", "logradouro", lambda v: "Ç" in v or "Ã" in v),
    "accented razao social": ("empresas", "razao_social", lambda v: "Ç" in v or "Ã" in v),
    "empty nome_fantasia": ("estabelecimentos", "nome_fantasia", lambda v: v == ""),
    "empty complemento": ("estabelecimentos", "complemento", lambda v: v == ""),
    "date 0": ("estabelecimentos", "data_situacao_cadastral", lambda v: v == "0"),
    "date 00000000": ("estabelecimentos", "data_situacao_cadastral", lambda v: v == "00000000"),
    "date empty": ("estabelecimentos", "data_situacao_cadastral", lambda v: v == ""),
    "impossible date": ("estabelecimentos", "data_situacao_cadastral", lambda v: v == "20230230"),
    "socio date 0": ("socios", "data_entrada_sociedade", lambda v: v == "0"),
    "simples date 00000000": ("simples", "data_exclusao_do_simples", lambda v: v == "00000000"),
    "capital 1.234,56": ("empresas", "capital_social", lambda v: v == "1.234,56"),
    "capital 10000,00": ("empresas", "capital_social", lambda v: v == "10000,00"),
    "capital 0,00": ("empresas", "capital_social", lambda v: v == "0,00"),
    "capital sentinel": ("empresas", "capital_social", lambda v: v == "999999999999,00"),
    "cep with 7 digits": ("estabelecimentos", "cep", lambda v: len(v) == 7 and v.isdigit()),
    "pais 105": ("estabelecimentos", "pais", lambda v: v == "105"),
    "pais 023": ("estabelecimentos", "pais", lambda v: v == "023"),
    "motivo 01": ("estabelecimentos", "motivo_situacao_cadastral", lambda v: v == "01"),
    "orphan motivo 32": ("estabelecimentos", "motivo_situacao_cadastral", lambda v: v == "32"),
    "natureza 2062": ("empresas", "natureza_juridica", lambda v: v == "2062"),
    "municipio 0971": ("estabelecimentos", "municipio", lambda v: v == "0971"),
    "cnae list": ("estabelecimentos", "cnae_fiscal_secundaria",
                  lambda v: re.fullmatch(r"\d{7}(,\d{7})+", v) is not None),
    "cnae list empty": ("estabelecimentos", "cnae_fiscal_secundaria", lambda v: v == ""),
}


@pytest.mark.parametrize("quirk", sorted(QUIRKS))
def test_quirk_present_at_200_rows(month: SampleManifest, quirk: str) -> None:
    table, name, predicate = QUIRKS[quirk]
    assert any(predicate(value) for value in column(month, table, name)), quirk


def test_orphan_motivo_is_missing_from_motivos(month: SampleManifest) -> None:
    codes = {rec[0] for rec in records(month, "motivos")}
    assert "01" in codes and "32" not in codes
    assert {"023", "105"} <= {rec[0] for rec in records(month, "paises")}
    assert "0971" in {rec[0] for rec in records(month, "municipios")}


def test_duplicate_keys_across_shards_later_record_differs(month: SampleManifest) -> None:
    for table, width, name in (("estabelecimentos", 3, "nome_fantasia"), ("empresas", 1, "razao_social")):
        first, second = shard_keys(month, table, width)
        assert len(set(first)) == len(first) and len(set(second)) == len(second)  # unique within a shard
        repeated = set(first) & set(second)
        assert 1 <= len(repeated) <= 5, table
        index = COLUMNS[table].index(name)
        by_key: dict[tuple[str, ...], list[str]] = {}
        for rec in records(month, table):
            by_key.setdefault(tuple(rec[:width]), []).append(rec[index])
        for key in repeated:
            older, newer = by_key[key]
            assert older != newer and newer.endswith("(NOVA DENOMINAÇÃO)")


def test_references_between_tables(month: SampleManifest) -> None:
    empresas = set(column(month, "empresas", "cnpj_basico"))
    assert set(column(month, "estabelecimentos", "cnpj_basico")) <= empresas
    assert set(column(month, "socios", "cnpj_basico")) <= empresas
    simples = column(month, "simples", "cnpj_basico")
    assert len(set(simples)) == len(simples) and set(simples) <= empresas
    matriz = column(month, "estabelecimentos", "identificador_matriz_filial")
    assert set(matriz) == {"1", "2"}


@pytest.mark.parametrize(("year", "month_no", "alnum"), [(2026, 6, False), (2026, 7, True), (2027, 1, True)])
def test_alphanumeric_cnpj_only_from_2026_07(tmp_path: Path, year: int, month_no: int, alnum: bool) -> None:
    manifest = generate_month(tmp_path, year, month_no, rows=200)
    keys = [tuple(rec[:3]) for rec in records(manifest, "estabelecimentos")]
    assert all(re.fullmatch(r"[0-9A-Z]{8}", b) and re.fullmatch(r"[0-9A-Z]{4}", o) and re.fullmatch(r"\d{2}", dv)
               for b, o, dv in keys)
    lettered_basico = any(not b.isdigit() for b, _, _ in keys)
    lettered_ordem = any(not o.isdigit() for _, o, _ in keys)
    assert lettered_basico is alnum and lettered_ordem is alnum
    assert any(not b.isdigit() for b in column(manifest, "empresas", "cnpj_basico")) is alnum


# --- oracle ----------------------------------------------------------------------------------------

def typed_pairs(manifest: SampleManifest, table: str, name: str) -> list[tuple[str, object]]:
    """(raw field, expected value) per record: expected is in file order."""
    index = COLUMNS[table].index(name)
    return [(rec[index], row[name]) for rec, row in zip(records(manifest, table), manifest.expected[table])]


def test_oracle_types_the_quirks(month: SampleManifest) -> None:
    dates = dict(typed_pairs(month, "estabelecimentos", "data_situacao_cadastral"))
    assert dates["0"] is None and dates["00000000"] is None and dates[""] is None and dates["20230230"] is None
    assert all(value == date(int(raw[:4]), int(raw[4:6]), int(raw[6:]))
               for raw, value in dates.items() if raw not in ("0", "00000000", "", "20230230"))
    capital = dict(typed_pairs(month, "empresas", "capital_social"))
    assert capital["1.234,56"] == Decimal("1234.56") and capital["10000,00"] == Decimal("10000.00")
    assert capital["0,00"] == Decimal("0") and capital["999999999999,00"] == Decimal("999999999999")
    assert capital["1.500.000,00"] == Decimal("1500000")
    cep = dict(typed_pairs(month, "estabelecimentos", "cep"))
    assert cep["1310100"] == "01310100"
    complemento = dict(typed_pairs(month, "estabelecimentos", "complemento"))
    # NUL stripped after null detection (issue 11 item 16): a lone NUL is an empty string
    assert complemento["SALA\x00 101"] == "SALA 101" and complemento["\x00"] == "" and complemento[""] is None
    logradouro = dict(typed_pairs(month, "estabelecimentos", "logradouro"))
    assert logradouro["DA CONCEIÇÃO\x00"] == "DA CONCEIÇÃO"
    municipio = dict(typed_pairs(month, "estabelecimentos", "municipio"))
    assert municipio["0971"] == "0971"
    pais = dict(typed_pairs(month, "estabelecimentos", "pais"))
    assert pais["023"] == "023" and pais[""] is None
    matriz = dict(typed_pairs(month, "estabelecimentos", "identificador_matriz_filial"))
    assert matriz == {"1": 1, "2": 2}


_DDD = ("0", "00", "000", "0000")
_PHONE = ("0", "0000", "00000000")
PLACEHOLDERS = {"cep": ("0", "       0", "00000000"), "ddd_1": _DDD, "ddd_2": _DDD, "ddd_fax": _DDD,
                "telefone_1": _PHONE, "telefone_2": _PHONE, "fax": _PHONE}  # "none" in real rows: NULL


def test_oracle_agrees_with_every_field_written(month: SampleManifest) -> None:
    """An independent reading of the files gives exactly the oracle (so lazy regeneration = files)."""
    for table in TABLES:
        names = COLUMNS[table]
        recs = records(month, table)
        assert len(recs) == len(month.expected[table])
        for rec, row in zip(recs, month.expected[table]):
            assert list(row) == list(names)
            for name, raw in zip(names, rec):
                value, text = row[name], raw.replace("\x00", "")
                placeholder = PLACEHOLDERS.get(name, ())
                if not raw or (name in sample.DATE_COLUMNS and text in ("", "0", "00000000")) or text in placeholder:
                    assert value is None, (table, name, raw)
                elif not text:  # a lone NUL: stripped after null detection, an empty string (issue 11 item 16)
                    assert value == "", (table, name, raw)
                elif name in sample.DATE_COLUMNS:
                    assert value is None if text in ("20230230", "20210931", "20190229", "20221301", "20200000") \
                        else value.strftime("%Y%m%d") == text, (table, name, raw)
                elif name == "capital_social":
                    assert value == Decimal(text.replace(".", "").replace(",", ".")), raw
                elif name == "identificador_matriz_filial":
                    assert value == int(text)
                elif name == "cep":
                    assert value == text.rjust(8, "0") and len(text) in (7, 8), raw
                else:
                    assert value == text, (table, name, raw)


def test_expected_keeps_duplicates_in_file_order(month: SampleManifest) -> None:
    rows = month.expected["estabelecimentos"]
    keys = [(r["cnpj_basico"], r["cnpj_ordem"], r["cnpj_dv"]) for r in rows]
    assert len(keys) == 200 > len(set(keys))
    last = {}
    for row, key in zip(rows, keys):
        last[key] = row["nome_fantasia"]
    repeated = {k for k in keys if keys.count(k) > 1}
    assert all(last[k].endswith("(NOVA DENOMINAÇÃO)") for k in repeated)


@pytest.mark.parametrize("shards", [1, 3])
def test_other_shard_counts_keep_duplicates_later(tmp_path: Path, shards: int) -> None:
    manifest = generate_month(tmp_path, 2024, 5, rows=150 * shards, shards=shards, seed=3)
    assert len(manifest.files["estabelecimentos"]) == shards and len(manifest.files["simples"]) == 1
    rows = manifest.expected["estabelecimentos"]
    assert len(rows) == len(records(manifest, "estabelecimentos")) == 150 * shards
    seen: dict[tuple[str, str, str], int] = {}
    repeated = 0
    for row in rows:
        key = (row["cnpj_basico"], row["cnpj_ordem"], row["cnpj_dv"])
        if key in seen:
            repeated += 1
            assert (row["nome_fantasia"] or "").endswith("(NOVA DENOMINAÇÃO)")
        seen[key] = 1
    assert repeated >= 3


# --- realism: the shares measured on the real 2025-12 rows (/work/shared/real_cnpj, see its README) ------

@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> SampleManifest:
    return generate_month(tmp_path_factory.mktemp("big"), 2024, 5, rows=4000, shards=2, seed=3)


def share(values: list[str], predicate) -> float:
    return sum(1 for v in values if predicate(v)) / len(values)


def test_empresas_look_like_the_real_rows(big: SampleManifest) -> None:
    recs = records(big, "empresas")
    # no thousands dot in capital_social (0 of 2,012 real rows); only the forced quirk rows carry one
    assert sum("." in r[4] for r in recs) <= 2
    mei = [r for r in recs if r[2] == "2135"]
    assert 0.6 < len(mei) / len(recs) < 0.78  # real: 69%
    rooted = [r for r in mei if re.match(r"^\d\d\.\d{3}\.\d{3} ", r[1])]
    assert 0.55 < len(rooted) / len(mei) < 0.71  # real: 63% start with the formatted root
    assert all(r[1].startswith(f"{r[0][:2]}.{r[0][2:5]}.{r[0][5:]} ") for r in rooted)  # their own root
    assert share([r[1] for r in recs], lambda v: v != sample._ascii(v)) < 0.005  # real: no accents


def test_estabelecimentos_look_like_the_real_rows(big: SampleManifest) -> None:
    recs = records(big, "estabelecimentos")
    col = {name: [r[i] for r in recs] for i, name in enumerate(COLUMNS["estabelecimentos"])}
    assert {"SN", "S N", "S/N"} <= set(col["numero"])
    assert 0.06 < share(col["numero"], lambda v: v.startswith("S")) < 0.13  # real: 9.7% S/N, SN, S N
    assert "10A RUA" in col["tipo_logradouro"] and "PRAÇA" not in col["tipo_logradouro"]
    emails = [v for v in col["correio_eletronico"] if v]
    assert 0.6 < len(emails) / len(recs) < 0.8 and 0.65 < share(emails, lambda v: v == v.upper()) < 0.9
    assert 0.02 < share(col["telefone_1"], lambda v: v == "0") < 0.07  # real: 4% '0' placeholders
    assert "00000000" in col["telefone_2"] and "0000" in col["ddd_2"]
    assert any(len(v) == 3 for v in col["ddd_1"])
    assert share(col["nome_fantasia"], lambda v: v != sample._ascii(v)) < 0.005


def test_simples_writes_missing_dates_only_as_zeros(big: SampleManifest) -> None:
    recs = records(big, "simples")
    assert all(r[1] in ("S", "N") and r[4] in ("S", "N") for r in recs)
    for i in (2, 3, 5, 6):
        assert not any(r[i] in ("", "0") for r in recs)
    assert share([r[3] for r in recs], lambda v: v == "00000000") > 0.3
