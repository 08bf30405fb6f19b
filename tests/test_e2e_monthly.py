"""End to end: the monthly CNPJ job on a generated month, through real Ray and PostgreSQL."""
from __future__ import annotations

from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, List

import pytest

from loadkit.examples.cnpj.sample import SampleManifest, generate_month
from loadkit.runner import run_job
from tests.helpers import compose, query, zip_members_into_one

pytestmark = pytest.mark.e2e

KEYS = {"empresas": ("cnpj_basico",), "estabelecimentos": ("cnpj_basico", "cnpj_ordem", "cnpj_dv"),
        "simples": ("cnpj_basico",), "cnaes": ("codigo",), "motivos": ("codigo",), "municipios": ("codigo",),
        "naturezas": ("codigo",), "paises": ("codigo",), "qualificacoes": ("codigo",)}
SOCIO_IDENTITY = ("cnpj_basico", "identificador_de_socio", "cnpj_cpf_do_socio", "nome_socio", "data_entrada_sociedade")


MONTH = {"rows": 600, "shards": 2, "seed": 7}  # the size of conftest's `month`


def last_wins(rows: List[Dict[str, Any]], key: tuple) -> List[Dict[str, Any]]:
    """The generator's rows deduplicated the way the merge/replace modes must: the later record wins."""
    out: Dict[tuple, Dict[str, Any]] = {}
    for r in rows:
        out[tuple(r[k] for k in key)] = r
    return list(out.values())


def table_rows(dsn: str, schema: str, table: str, columns: List[str]) -> List[Dict[str, Any]]:
    cols = ", ".join(f'"{c}"' for c in columns)
    return [dict(zip(columns, r)) for r in query(dsn, f'SELECT {cols} FROM "{schema}"."{table}"')]


def canon(row: Dict[str, Any]) -> tuple:
    return tuple(sorted((k, v.rstrip() if isinstance(v, str) else v) for k, v in row.items()))


@pytest.mark.parametrize("executor", ["ray", "inprocess"])
def test_monthly_job_loads_every_table_exactly(month: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None,
                                               job_overrides, executor: str) -> None:
    target, led = schemas
    result = run_job(compose(job_overrides(month.root, f"env.executor={executor}")))
    assert result.status == "succeeded", result.error
    assert result.metrics.executor == executor
    for table, expected in month.expected.items():
        columns = list(expected[0].keys())
        wanted = (last_wins(expected, KEYS[table]) if table in KEYS else last_wins(expected, SOCIO_IDENTITY))
        got = table_rows(pg_dsn, target, table, columns)
        assert Counter(canon(r) for r in got) == Counter(canon(r) for r in wanted), table
        assert result.metrics.tables[table].rows_read == month.rows[table]
        assert result.metrics.tables[table].rows_rejected == 0


def test_quirks_are_typed(month: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None, job_overrides) -> None:
    target, _ = schemas
    assert run_job(compose(job_overrides(month.root))).status == "succeeded"
    est = f'"{target}".estabelecimentos'
    # NUL bytes are gone, accents survive latin-1 -> UTF-8, 7-digit CEPs regain their zero.
    assert query(pg_dsn, f"SELECT count(*) FROM {est} WHERE complemento LIKE '%%' || chr(1) || '%%'")[0][0] == 0
    assert query(pg_dsn, f"SELECT count(*) FROM {est} WHERE logradouro ~ '[ÇÃÉÍÓÔÕÚ]' "
                         f"OR nome_fantasia ~ '[ÇÃÉÍÓÔÕÚçãéíóôõú]' OR bairro ~ '[ÇÃÉÍÓÔÕÚçãéíóôõú]'")[0][0] > 0
    assert query(pg_dsn, f"SELECT count(*) FROM {est} WHERE length(cep) <> 8")[0][0] == 0
    assert query(pg_dsn, f"SELECT count(*) FROM {est} WHERE numero = 'S/N'")[0][0] > 0
    # '0' / '00000000' / impossible dates are NULL; capital 1.234,56 is numeric 1234.56.
    expected_null_dates = sum(1 for r in month.expected["estabelecimentos"] if r["data_situacao_cadastral"] is None)
    assert expected_null_dates > 0
    caps = {r[0] for r in query(pg_dsn, f'SELECT capital_social FROM "{target}".empresas')}
    assert Decimal("1234.56") in caps
    pais = {r[0] for r in query(pg_dsn, f"SELECT pais FROM {est} WHERE pais IS NOT NULL")}
    assert any(p.startswith("0") for p in pais), "leading zeros kept"
    types = dict(query(pg_dsn, "SELECT column_name, data_type FROM information_schema.columns "
                               "WHERE table_schema=%s AND table_name='estabelecimentos'", (target,)))
    assert types["data_inicio_atividade"] == "date" and types["cnpj_basico"] == "character"


def test_rerun_is_idempotent_and_ledgered(month: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None,
                                          job_overrides) -> None:
    target, led = schemas
    first = run_job(compose(job_overrides(month.root)))
    counts = {t: query(pg_dsn, f'SELECT count(*) FROM "{target}"."{t}"')[0][0] for t in month.rows}
    second = run_job(compose(job_overrides(month.root)))
    assert first.status == second.status == "succeeded"
    assert {t: query(pg_dsn, f'SELECT count(*) FROM "{target}"."{t}"')[0][0] for t in month.rows} == counts
    assert all(t.files_skipped == t.files for t in second.metrics.tables.values())
    runs = query(pg_dsn, f'SELECT run_id, status, rows_read, rows_loaded, rows_rejected FROM "{led}".run '
                         'ORDER BY started_at')
    assert [r[1] for r in runs] == ["succeeded", "succeeded"]
    assert runs[0][2] == sum(month.rows.values()) == runs[0][3] + runs[0][4]
    assert runs[1][2] == 0
    files = query(pg_dsn, f'SELECT status, count(*) FROM "{led}".file GROUP BY 1')
    assert files == [("loaded", sum(len(v) for v in month.files.values()))]
    batches = query(pg_dsn, f'SELECT sum(rows_in), sum(rows_loaded) + sum(rows_rejected) FROM "{led}".batch')
    assert batches[0][0] == batches[0][1] == sum(month.rows.values())
    tables = query(pg_dsn, f'SELECT table_name, status, rows_read FROM "{led}".table_load WHERE run_id=%s',
                   (first.run_id,))
    assert {t: (s, n) for t, s, n in tables} == {t: ("loaded", n) for t, n in month.rows.items()}


@pytest.mark.slow
def test_one_large_file_streams_in_bounded_blocks(tmp_path: Path, pg_dsn: str, schemas: tuple, ray_session: None,
                                                 job_overrides) -> None:
    """One ~20 MB member is cut into many record-aligned batches and loads without stalling."""
    target, led = schemas
    month = generate_month(tmp_path, 2024, 5, rows=80_000, shards=1, seed=3)
    others = [f"job.tables.{t}.enabled=false" for t in month.rows if t != "estabelecimentos"]
    result = run_job(compose(job_overrides(month.root, "batch.size=5000", *others)))
    assert result.status == "succeeded", result.error
    batches = query(pg_dsn, f'SELECT count(*), max(end_offset - start_offset), sum(rows_in) FROM "{led}".batch')
    count, widest, rows_in = batches[0]
    assert rows_in == month.rows["estabelecimentos"] == 80_000
    assert count >= 10, "the file must be cut into many batches, not read whole"
    assert widest < 8 * 2**20, "a batch is bounded by batch.size, not by the file"
    distinct = len({(r["cnpj_basico"], r["cnpj_ordem"], r["cnpj_dv"]) for r in month.expected["estabelecimentos"]})
    assert query(pg_dsn, f'SELECT count(*) FROM "{target}".estabelecimentos')[0][0] == distinct


def test_auto_executor_runs_small_months_in_process_and_resumes_across_executors(
        month: SampleManifest, pg_dsn: str, schemas: tuple, ray_session: None, job_overrides) -> None:
    """auto picks by the bytes left to read (and the cores); both executors write the same batch ids, so a run
    one executor started, the other finishes without duplicating a row."""
    target, led = schemas
    shards = sorted(p.name for p in month.folder.glob("Estabelecimentos*.zip"))
    assert len(shards) == 2
    only_first = f'job.tables.estabelecimentos.source.paths=["{{year:04d}}-{{month:02d}}/{shards[0]}"]'
    first = run_job(compose(job_overrides(month.root, "env.executor=auto", "env.inprocess_max_bytes=0",
                                          "env.inprocess_max_cpus=0", only_first)))
    assert first.status == "succeeded", first.error
    assert first.metrics.executor == "ray"
    rest = run_job(compose(job_overrides(month.root, "env.executor=auto")))
    assert rest.status == "succeeded", rest.error
    assert rest.metrics.executor == "inprocess"
    assert rest.metrics.tables["empresas"].status == "skipped"  # all its files came with the first run
    wanted = last_wins(month.expected["estabelecimentos"], KEYS["estabelecimentos"])
    columns = list(wanted[0].keys())
    got = table_rows(pg_dsn, target, "estabelecimentos", columns)
    assert Counter(canon(r) for r in got) == Counter(canon(r) for r in wanted)
    # The two runs' ledger batches tile the source once: every source row counted in exactly one batch.
    assert query(pg_dsn, f'SELECT sum(rows_in) FROM "{led}".batch WHERE table_name = %s',
                 ("estabelecimentos",))[0][0] == month.rows["estabelecimentos"]


@pytest.mark.parametrize("max_bytes, max_cpus, cpus, address, expected", [
    (0, 0, 8, None, "ray"),  # a big input on a big machine
    (1 << 40, 0, 8, None, "inprocess"),  # a small input
    (0, 2, 2, None, "inprocess"),  # a small machine
    (1 << 40, 2, 2, "auto", "ray"),  # a cluster run is always Ray
])
def test_auto_executor_rule(month: SampleManifest, max_bytes: int, max_cpus: int, cpus: int, address: object,
                            expected: str) -> None:
    from loadkit.source.read import ReadUnit
    from loadkit.plan import build_plan
    from loadkit.supervise import executor_for

    extra = [f"env.inprocess_max_bytes={max_bytes}", f"env.inprocess_max_cpus={max_cpus}", f"env.num_cpus={cpus}"]
    cfg = compose(["+job=monthly", "year=2024", "month=5", f"data_root={month.root}", *extra,
                   f"env.address={address}" if address else "env.address=null"])
    plan = build_plan(cfg)
    units = [ReadUnit(t, f, (), plan.batch.size) for t in plan.tables for f in t.files]
    assert executor_for(plan.env, units) == expected


def test_merge_last_wins_follows_member_order_in_a_multi_member_zip(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                                      job_overrides) -> None:
    """Two shards of estabelecimentos as two members of one zip (a job's ``source.member`` glob picks every
    member). Members are read in name order, each with its own offsets from 0; a key repeated in the later
    member must win, as it does when the shards are two files. Before: the merge's DISTINCT ON ordered by
    (file, start offset, row) without the member, so a duplicate in the first member at a higher offset than
    its repeat in the second won (found by a Ray loader-kill test on such a zip: the summary matched the
    ledger, the target did not match the source)."""
    target, _ = schemas
    month = generate_month(tmp_path, 2024, 5, rows=3000, shards=2, seed=3)
    zips = [month.root / p for p in month.files["estabelecimentos"]]
    members = zip_members_into_one(zips)
    assert [m for m, _ in members] == sorted(m for m, _ in members)  # shard order is name order: read order
    result = run_job(compose(job_overrides(month.root, "env.executor=inprocess", "tracking.enabled=false")))
    assert result.status == "succeeded", result.error
    expected = month.expected["estabelecimentos"]
    key = KEYS["estabelecimentos"]
    wanted = last_wins(expected, key)
    assert len(wanted) < len(expected)  # keys repeated across the shards: the later one must win
    got = table_rows(pg_dsn, target, "estabelecimentos", list(expected[0].keys()))
    assert Counter(canon(r) for r in got) == Counter(canon(r) for r in wanted)
    # The same zip again (force): the reload's deduplication (with the in-process key hints, only the repeated
    # keys' rows are sorted) must pick the same winners, so every key is unchanged and the table stays.
    again = run_job(compose(job_overrides(month.root, "env.executor=inprocess", "tracking.enabled=false",
                                          "force=true")))
    assert again.status == "succeeded", again.error
    tm = again.metrics.tables["estabelecimentos"]
    assert (tm.inserted, tm.updated, tm.unchanged, tm.duplicates) == (0, 0, len(wanted), len(expected) - len(wanted))
    got = table_rows(pg_dsn, target, "estabelecimentos", list(expected[0].keys()))
    assert Counter(canon(r) for r in got) == Counter(canon(r) for r in wanted)
