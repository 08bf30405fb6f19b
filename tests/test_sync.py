"""Full-snapshot sync: merge + delete_missing removes (or, with history, closes) the keys a month no longer has,
only once every file of the month has loaded, never after a failed file; counts in summary and ledger.

Two generated months with the same keys; the second loses records (partners who left, closed establishments,
MEI options that ended). The expected keys come from the second month's raw files, read here with ``csv``.
"""
from __future__ import annotations

import csv
import io
import zipfile
from datetime import date
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from loadkit.examples.cnpj.sample import SampleManifest, generate_month
from loadkit.runner import exit_code, run_job
from tests.helpers import compose, query

pytestmark = pytest.mark.e2e

SYNCED = ("empresas", "estabelecimentos", "socios", "simples")
KEY_FIELDS = {"empresas": (0,), "estabelecimentos": (0, 1, 2), "simples": (0,), "socios": (0, 1, 3, 2, 5)}
KEY_SQL = {"empresas": "cnpj_basico", "estabelecimentos": "cnpj_basico || cnpj_ordem || cnpj_dv",
           "simples": "cnpj_basico", "socios": "socio_id"}
SYNC = [f"job.tables.{t}.delete_missing=true" for t in SYNCED]
REFERENCE_OFF = [f"job.tables.{t}.enabled=false"
                 for t in ("cnaes", "motivos", "municipios", "naturezas", "paises", "qualificacoes")]


def _member(path: Path) -> Tuple[str, str]:
    with zipfile.ZipFile(path) as zf:
        (info,) = zf.infolist()
        return info.filename, zf.read(info).decode("latin-1")


def drop_records(path: Path, every: int) -> int:
    """Rewrite a zip without every ``every``-th record; returns how many were dropped."""
    name, text = _member(path)
    lines = text.splitlines(keepends=True)
    kept = [line for i, line in enumerate(lines) if i % every != every - 1]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, "".join(kept).encode("latin-1"))
    return len(lines) - len(kept)


def raw_keys(month: SampleManifest, table: str) -> Set[tuple]:
    """Distinct keys of a table in a month's files, parsed with csv (not loadkit)."""
    keys = set()
    for rel in month.files[table]:
        _, text = _member(month.root / rel)
        for rec in csv.reader(io.StringIO(text, newline=""), delimiter=";"):
            keys.add(tuple(rec[i] for i in KEY_FIELDS[table]))
    return keys


def db_count(dsn: str, schema: str, table: str, where: str = "") -> int:
    return query(dsn, f'SELECT count(*) FROM "{schema}"."{table}" {where}')[0][0]


@pytest.fixture()
def months(tmp_path: Path) -> Tuple[SampleManifest, SampleManifest, Dict[str, int]]:
    """2024-05 in full; 2024-06 with the same keys, minus some records in every synced table."""
    may = generate_month(tmp_path, 2024, 5, rows=200, shards=2, seed=1)
    june = generate_month(tmp_path, 2024, 6, rows=200, shards=2, seed=1)
    dropped = {t: sum(drop_records(june.root / rel, 9) for rel in june.files[t]) for t in SYNCED}
    return may, june, dropped


def run(overrides, root: Path, month: int, *extra: str):
    result = run_job(compose(overrides(root, "env.executor=inprocess", *SYNC, *REFERENCE_OFF, *extra, month=month)))
    return result


def test_delete_missing_removes_keys_absent_from_the_new_month(months, pg_dsn: str, schemas: tuple,
                                                             job_overrides) -> None:
    may, june, dropped = months
    target, led = schemas
    first = run(job_overrides, may.root, 5)
    assert first.status == "succeeded", first.error
    for t in SYNCED:
        assert db_count(pg_dsn, target, t) == len(raw_keys(may, t)), t
        assert first.metrics.tables[t].deleted == 0
    second = run(job_overrides, june.root, 6)
    assert second.status == "succeeded", second.error
    for t in SYNCED:
        gone = raw_keys(may, t) - raw_keys(june, t)
        assert dropped[t] > 0 and len(gone) > 0, t
        assert db_count(pg_dsn, target, t) == len(raw_keys(june, t)), t
        assert second.metrics.tables[t].deleted == len(gone), t
    # The exact key set, not just the count (estabelecimentos: the three key parts).
    got = {r[0] for r in query(pg_dsn, f'SELECT {KEY_SQL["estabelecimentos"]} FROM "{target}".estabelecimentos')}
    assert got == {"".join(k) for k in raw_keys(june, "estabelecimentos")}
    ledger_rows = dict(query(pg_dsn, f'SELECT table_name, deleted FROM "{led}".table_load WHERE run_id=%s',
                             (second.run_id,)))
    assert ledger_rows == {t: second.metrics.tables[t].deleted for t in SYNCED}
    assert "deleted" in second.summary and "duplicates" in second.summary


def test_no_delete_while_a_file_of_the_month_failed_then_the_deferred_sync_runs(
        months, pg_dsn: str, schemas: tuple, job_overrides) -> None:
    """A table's sync holds off on a failed file of its own: a truncated socios download leaves socios as it
    was (not published, nothing deleted) until the file is fetched again. The other tables' months are whole
    (every one of their files loaded), so they publish and sync in that same run: another table's failed file
    says nothing about them, and each table publishes as soon as its own files are read (runner.EarlyPublish)."""
    may, june, _ = months
    target, led = schemas
    assert run(job_overrides, may.root, 5).status == "succeeded"
    before = {t: db_count(pg_dsn, target, t) for t in SYNCED}
    broken = june.root / june.files["socios"][1]
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 2])  # a truncated download
    failed = run(job_overrides, june.root, 6)
    assert failed.status == "failed" and exit_code(failed) == 3
    assert failed.metrics.tables["socios"].status == "failed"
    assert failed.metrics.tables["socios"].deleted is None
    assert db_count(pg_dsn, target, "socios") == before["socios"]  # not published: its month is not whole
    others = [t for t in SYNCED if t != "socios"]
    for t in others:
        assert failed.metrics.tables[t].status == "loaded", t
        assert db_count(pg_dsn, target, t) == len(raw_keys(june, t)), t
        assert failed.metrics.tables[t].deleted == len(raw_keys(may, t) - raw_keys(june, t)), t
    broken.write_bytes(good)  # fetched again
    fixed = run(job_overrides, june.root, 6)
    assert fixed.status == "succeeded", fixed.error
    assert fixed.metrics.tables["empresas"].status == "skipped"  # its files came with the failed run
    for t in SYNCED:
        assert db_count(pg_dsn, target, t) == len(raw_keys(june, t)), t
    assert fixed.metrics.tables["socios"].deleted == len(raw_keys(may, "socios") - raw_keys(june, "socios"))
    assert all(fixed.metrics.tables[t].deleted is None for t in others)  # synced once, by the failed run
    again = run(job_overrides, june.root, 6)  # a sync runs once per month
    assert all(again.metrics.tables[t].deleted is None for t in SYNCED)


def test_a_month_with_fewer_shards_than_the_last_is_not_synced(months, pg_dsn: str, schemas: tuple,
                                                               job_overrides) -> None:
    """A missing shard looks like an incomplete download: deleting its keys would lose a tenth of a table."""
    may, june, _ = months
    target, _ = schemas
    assert run(job_overrides, may.root, 5).status == "succeeded"
    before = db_count(pg_dsn, target, "estabelecimentos")
    (june.root / june.files["estabelecimentos"][1]).unlink()
    result = run(job_overrides, june.root, 6)
    assert result.status == "succeeded", result.error
    assert result.metrics.tables["estabelecimentos"].deleted is None
    assert db_count(pg_dsn, target, "estabelecimentos") == before
    assert result.metrics.tables["empresas"].deleted == len(raw_keys(may, "empresas") - raw_keys(june, "empresas"))


def test_history_closes_absent_keys_and_reopens_returning_ones(months, pg_dsn: str, schemas: tuple,
                                                               job_overrides, tmp_path: Path) -> None:
    may, june, _ = months
    target, _ = schemas
    history = [f"job.tables.{t}.history=true" for t in SYNCED]
    assert run(job_overrides, may.root, 5, *history).status == "succeeded"
    second = run(job_overrides, june.root, 6, *history)
    assert second.status == "succeeded", second.error
    gone = raw_keys(may, "empresas") - raw_keys(june, "empresas")
    assert db_count(pg_dsn, target, "empresas") == len(raw_keys(may, "empresas"))  # nothing deleted
    closed = {r[0] for r in query(pg_dsn, f'SELECT cnpj_basico FROM "{target}".empresas '
                                          "WHERE valid_to = '2024-06-01'")}
    assert closed == {k[0] for k in gone} and second.metrics.tables["empresas"].deleted == len(gone)
    assert db_count(pg_dsn, target, "empresas", "WHERE valid_to IS NULL AND valid_from = '2024-05-01'") == \
        len(raw_keys(june, "empresas"))
    # July has May's full content again: the closed keys come back with a new valid_from.
    july = generate_month(tmp_path / "july", 2024, 7, rows=200, shards=2, seed=1)
    third = run(job_overrides, july.root, 7, *history)
    assert third.status == "succeeded", third.error
    reopened = query(pg_dsn, f'SELECT cnpj_basico, valid_from, valid_to FROM "{target}".empresas '
                             "WHERE cnpj_basico = ANY(%s)", (sorted(k[0] for k in gone),))
    assert {(v, t) for _, v, t in reopened} == {(date(2024, 7, 1), None)} and len(reopened) == len(gone)
    assert third.metrics.tables["empresas"].deleted == 0


def test_delete_missing_applies_to_merge_and_history_needs_it(tmp_path: Path) -> None:
    from loadkit.errors import ConfigError
    from loadkit.plan import build_plan

    generate_month(tmp_path, 2024, 5, rows=100, shards=1)

    base = ["+job=monthly", "year=2024", "month=5"]
    plan = build_plan(compose(base + [f"data_root={tmp_path}", "job.tables.cnaes.delete_missing=true",
                                      "job.tables.empresas.mode=append"]))
    assert not plan.table("cnaes").delete_missing and not plan.table("empresas").delete_missing  # merge only
    assert plan.table("socios").delete_missing
    with pytest.raises(ConfigError, match="history needs delete_missing"):
        compose(base + ["job.tables.empresas.delete_missing=false", "job.tables.empresas.history=true"])


def test_duplicates_are_counted(pg_dsn: str, schemas: tuple, job_overrides, tmp_path: Path) -> None:
    """Whole-line duplicates (real in 2021 and 2024 files) show as collapsed, not as extra loaded rows."""
    month = generate_month(tmp_path, 2024, 5, rows=200, shards=2, seed=1)
    path = month.root / month.files["empresas"][0]
    name, text = _member(path)
    lines: List[str] = text.splitlines(keepends=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, "".join(lines + lines[:3]).encode("latin-1"))
    result = run(job_overrides, month.root, 5)
    assert result.status == "succeeded", result.error
    tm = result.metrics.tables["empresas"]
    target, led = schemas
    distinct = db_count(pg_dsn, target, "empresas")
    assert tm.rows_loaded == month.rows["empresas"] + 3
    assert (tm.inserted, tm.updated) == (distinct, 0)
    assert tm.duplicates == tm.rows_loaded - distinct >= 3
    assert query(pg_dsn, f'SELECT duplicates FROM "{led}".table_load WHERE run_id=%s AND table_name=%s',
                 (result.run_id, "empresas")) == [(tm.duplicates,)]
    final = result.metrics.final(1.0, 0, 0, 0)  # what MLflow receives
    assert final["empresas.duplicates"] == tm.duplicates and final["empresas.deleted"] == 0
