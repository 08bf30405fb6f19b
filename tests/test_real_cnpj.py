"""Real rows in CI: the anonymised 2025-12 CNPJ month (byte-exact RFB fragments) loads exactly, on both executors.

The expected content of every table is computed here, from the raw zips, with Python's ``csv`` module and
typing rules written out in this file (never loadkit's parser or transform): the test hashes what the
database holds and what the files say, per table, and the two must agree. The data lives outside the repo
(``../shared/real_cnpj`` next to the clone in CI, ``/work/shared/real_cnpj`` on the dev box); under
``CI=true`` a missing folder fails the test instead of skipping it.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import zipfile
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from loadkit.runner import run_job
from tests.helpers import ROOT, compose, query

pytestmark = pytest.mark.e2e

MONTH = "2025-12"
CANDIDATES = (ROOT.parent / "shared" / "real_cnpj", Path("/work/shared/real_cnpj"))

# The files' own layout (RFB "dados abertos" dictionary): column names in file order, and the key whose
# last record wins. socios has no natural key: loadkit derives one from these identity columns.
LAYOUT: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "empresas": (("cnpj_basico", "razao_social", "natureza_juridica", "qualificacao_responsavel", "capital_social",
                  "porte", "ente_federativo_responsavel"), ("cnpj_basico",)),
    "estabelecimentos": (("cnpj_basico", "cnpj_ordem", "cnpj_dv", "identificador_matriz_filial", "nome_fantasia",
                          "situacao_cadastral", "data_situacao_cadastral", "motivo_situacao_cadastral",
                          "nome_cidade_exterior", "pais", "data_inicio_atividade", "cnae_fiscal_principal",
                          "cnae_fiscal_secundaria", "tipo_logradouro", "logradouro", "numero", "complemento", "bairro",
                          "cep", "uf", "municipio", "ddd_1", "telefone_1", "ddd_2", "telefone_2", "ddd_fax", "fax",
                          "correio_eletronico", "situacao_especial", "data_situacao_especial"),
                         ("cnpj_basico", "cnpj_ordem", "cnpj_dv")),
    "socios": (("cnpj_basico", "identificador_de_socio", "nome_socio", "cnpj_cpf_do_socio", "qualificacao_do_socio",
                "data_entrada_sociedade", "pais", "representante_legal", "nome_do_representante",
                "qualificacao_do_representante_legal", "faixa_etaria"),
               ("cnpj_basico", "identificador_de_socio", "cnpj_cpf_do_socio", "nome_socio", "data_entrada_sociedade")),
    "simples": (("cnpj_basico", "opcao_pelo_simples", "data_opcao_pelo_simples", "data_exclusao_do_simples",
                 "opcao_pelo_mei", "data_opcao_pelo_mei", "data_exclusao_do_mei"), ("cnpj_basico",)),
    **{t: (("codigo", "descricao"), ("codigo",))
       for t in ("cnaes", "motivos", "municipios", "naturezas", "paises", "qualificacoes")},
}
FILES = {"empresas": "Empresas", "estabelecimentos": "Estabelecimentos", "socios": "Socios", "simples": "Simples",
         "cnaes": "Cnaes", "motivos": "Motivos", "municipios": "Municipios", "naturezas": "Naturezas",
         "paises": "Paises", "qualificacoes": "Qualificacoes"}
ROWS = {"empresas": 2012, "estabelecimentos": 2013, "socios": 2018, "simples": 2000, "cnaes": 1359, "motivos": 63,
        "municipios": 5572, "naturezas": 91, "paises": 255, "qualificacoes": 68}  # from the folder's README


def real_month() -> Path:
    for base in CANDIDATES:
        if (base / MONTH).is_dir():
            return base / MONTH
    where = " or ".join(str(b / MONTH) for b in CANDIDATES)
    if os.environ.get("CI") == "true":
        pytest.fail(f"the real CNPJ month is missing ({where}); CI must check it out next to the repo")
    pytest.skip(f"the real CNPJ month is not here ({where})")


# ---------------------------------------------------------------- the oracle: raw files -> typed values


def _date(v: Optional[str]) -> Optional[date]:
    if v is None or v in ("0", "00000000"):
        return None
    try:
        return date(int(v[:4]), int(v[4:6]), int(v[6:8])) if len(v) == 8 and v.isdigit() else None
    except ValueError:  # impossible dates (20230230) are stored as NULL
        return None


def _none_if(*placeholders: str) -> Callable[[Optional[str]], Optional[str]]:
    return lambda v: None if v is None or v in placeholders else v


def _cep(v: Optional[str]) -> Optional[str]:
    return None if v is None or v in ("0", "       0", "00000000") else v.zfill(8)


TYPING: Dict[str, Callable[[Optional[str]], Any]] = {
    "capital_social": lambda v: None if v is None else Decimal(v.replace(".", "").replace(",", ".")),
    "identificador_matriz_filial": lambda v: None if v is None else int(v),
    "cep": _cep,
    **{c: _none_if("0", "00", "000", "0000") for c in ("ddd_1", "ddd_2", "ddd_fax")},
    **{c: _none_if("0", "0000", "00000000") for c in ("telefone_1", "telefone_2", "fax")},
}


def _typer(column: str) -> Callable[[Optional[str]], Any]:
    if column.startswith("data_"):
        return _date
    return TYPING.get(column, lambda v: v)


def raw_records(folder: Path, table: str) -> List[List[str]]:
    """Every record of a table's zips, in file-name order then line order, split by Python's csv module."""
    out: List[List[str]] = []
    for path in sorted(folder.glob(f"{FILES[table]}*.zip")):
        with zipfile.ZipFile(path) as zf:
            (member,) = [n for n in zf.namelist() if not n.endswith("/")]
            text = zf.read(member).decode("latin-1")
        out.extend(csv.reader(io.StringIO(text, newline=""), delimiter=";", quotechar='"'))
    return out


def expected_rows(folder: Path, table: str) -> Tuple[int, List[tuple]]:
    """(records read, typed rows after last-record-wins deduplication on the key)."""
    columns, key = LAYOUT[table]
    typers = [_typer(c) for c in columns]
    records = raw_records(folder, table)
    kept: Dict[tuple, tuple] = {}
    for rec in records:
        assert len(rec) == len(columns), (table, rec)
        values = tuple(t(v.replace("\x00", "") or None) for t, v in zip(typers, rec))
        row = dict(zip(columns, values))
        kept[tuple(row[k] for k in key)] = values
    return len(records), list(kept.values())


def canonical(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, Decimal):
        return f"{value:.2f}"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        return value.rstrip(" ")  # char(n) pads with blanks
    return str(value)


def content_hash(rows: List[tuple]) -> str:
    """Order-independent: sha256 over the sorted canonical lines."""
    lines = sorted("\x1f".join(canonical(v) for v in row) for row in rows)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def real_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the month (the shared folder is read-only in CI)."""
    source = real_month()
    root = tmp_path_factory.mktemp("real")
    (root / MONTH).mkdir()
    for f in source.iterdir():
        shutil.copyfile(f, root / MONTH / f.name)
    return root


@pytest.fixture(scope="module")
def expected(real_root: Path) -> Dict[str, Tuple[int, int, str]]:
    """table -> (records read, distinct rows, content hash), from the raw files alone."""
    out = {}
    for table in LAYOUT:
        read, rows = expected_rows(real_root / MONTH, table)
        out[table] = (read, len(rows), content_hash(rows))
    return out


def test_oracle_counts_match_the_folder_readme(expected: Dict[str, Tuple[int, int, str]]) -> None:
    """The oracle reads every record the README announces: 15,451 in all."""
    assert {t: e[0] for t, e in expected.items()} == ROWS
    assert sum(ROWS.values()) == 15_451


# Both COPY encoders (sink.copy_encoder) against the same oracle hash: identical content, 0 rejects.
@pytest.mark.parametrize("executor,copy_encoder", [("ray", "pgpq"), ("inprocess", "pgpq"), ("inprocess", "adbc")])
def test_real_month_loads_exactly(real_root: Path, expected: Dict[str, Tuple[int, int, str]], pg_dsn: str,
                                  schemas: tuple, ray_session: None, job_overrides, executor: str,
                                  copy_encoder: str) -> None:
    target, led = schemas
    result = run_job(compose(job_overrides(real_root, f"env.executor={executor}", f"sink.copy_encoder={copy_encoder}",
                                           year=2025, month=12)))
    assert result.status == "succeeded", result.error
    assert result.metrics.executor == executor
    for table, (read, distinct, digest) in expected.items():
        tm = result.metrics.tables[table]
        assert (tm.rows_read, tm.rows_loaded, tm.rows_rejected) == (read, read, 0), table
        columns = LAYOUT[table][0]
        cols = ", ".join(f'"{c}"' for c in columns)
        got = query(pg_dsn, f'SELECT {cols} FROM "{target}"."{table}"')
        assert len(got) == distinct, table
        assert content_hash(got) == digest, f"{table}: the loaded rows differ from the raw files"
    assert query(pg_dsn, f'SELECT count(*) FROM "{led}".reject')[0][0] == 0
    assert query(pg_dsn, f'SELECT sum(rows_in), sum(rows_loaded) FROM "{led}".batch') == [(15_451, 15_451)]
    # The placeholders really are in these rows, and load as NULL (not '00000000').
    est = f'"{target}".estabelecimentos'
    assert query(pg_dsn, f"SELECT count(*) FROM {est} WHERE cep = '00000000' OR telefone_1 IN ('0', '00000000') "
                         "OR ddd_2 = '0000'")[0][0] == 0
    assert query(pg_dsn, f"SELECT count(*) FROM {est} WHERE telefone_1 IS NULL AND ddd_1 IS NULL")[0][0] > 300
