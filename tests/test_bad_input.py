"""Bad input end to end (real Ray + PostgreSQL): rejects table, thresholds, failed files, safety.

Configs are built in Python from the loadkit.config dataclasses, so each test declares
exactly the table it needs and nothing lands in conf/job/.
"""
from __future__ import annotations

import datetime as dt
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest

from loadkit.config import (BatchConfig, ColumnConfig, DialectConfig, EnvConfig, JobConfig, LoadkitConfig, SinkConfig,
                            SourceConfig, TableConfig, TrackingConfig, to_config)
from loadkit.errors import ConfigError, RejectThresholdError, SourceDataError
from loadkit.history import History, render_show
from loadkit.plan import build_plan
from loadkit.runner import run_job
from tests.helpers import autocommit_cursor, query
from tests.corpus import corrupt_zip_member, write_zip

SECRET = "Sup3rSecretPw"
PEOPLE = [ColumnConfig(name="id", type="integer", nullable=False), ColumnConfig(name="name", type="text"),
          ColumnConfig(name="born", type="date", format="%Y-%m-%d"), ColumnConfig(name="score", type="numeric(6,2)")]


def table(paths: Sequence[str], columns: Sequence[ColumnConfig] = PEOPLE, fmt: str = "csv", **kw: Any) -> TableConfig:
    dialect = kw.pop("dialect", DialectConfig(header=True))
    return TableConfig(source=SourceConfig(paths=list(paths), format=fmt, dialect=dialect), columns=list(columns),
                       **kw)


def config(root: Path, dsn: str, schemas: tuple, mlflow_uri: str, tables: Dict[str, TableConfig]) -> LoadkitConfig:
    """A job over these tables; ~1000-row batches so a few thousand rows make several transactions."""
    target, led = schemas
    return to_config(LoadkitConfig(
        year=2024, month=5, data_root=str(root), job=JobConfig(name="bad_input", schema=target, tables=tables),
        sink=SinkConfig(dsn=dsn, ledger_schema=led), tracking=TrackingConfig(uri=mlflow_uri),
        batch=BatchConfig(size=1000, min_size=1000), env=EnvConfig(progress_bars=False)))


def people_csv(n: int, bad_every: Optional[int] = None) -> bytes:
    """A header and n rows; every bad_every-th row has an impossible date."""
    lines = ["id,name,born,score"]
    for i in range(1, n + 1):
        born = "2024-02-30" if bad_every and i % bad_every == 0 else f"19{i % 100:02d}-0{1 + i % 9}-1{i % 10}"
        lines.append(f'{i},"Name {i}, Jr.",{born},{i % 1000}.{i % 100:02d}')
    return ("\n".join(lines) + "\n").encode()


def rows(dsn: str, schema: str, tname: str, cols: str = "id, name, born, score") -> List[tuple]:
    return query(dsn, f'SELECT {cols} FROM "{schema}"."{tname}" ORDER BY 1')


# The run_job tests; the safety checks at the end need no database.
e2e = pytest.mark.e2e
slow = pytest.mark.slow


@e2e
@slow
def test_bad_rows_go_to_the_rejects_table_and_the_load_goes_on(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                               mlflow_uri: str, ray_session: None) -> None:
    month = tmp_path / "2024-05"
    month.mkdir()
    write_zip(month / "people.zip", {
        "p1.csv": b"id,name,born,score\n1,Ann,1990-01-02,1.50\n2,Bob\n3,\"Cy, \"\"C\"\"\",2000-12-31,\n",
        "p2.csv": "id,name,born,score\n4,Dé,1999-02-29,2\n5,Eve,1980-05-05,99999\n".encode()
                  + b"6,caf\xe9,1970-01-01,3\n7,\"multi\nline\",1971-01-01,4\n8,\"open,1972-01-01,5\n",
    })
    cfg = config(tmp_path, pg_dsn, schemas, mlflow_uri, {"people": table(["2024-05/*.zip"], fmt="zip",
                                                                         max_reject_rate=1.0)})
    result = run_job(cfg)
    target, led = schemas
    assert result.status == "succeeded", result.error
    assert rows(pg_dsn, target, "people") == [(1, "Ann", dt.date(1990, 1, 2), Decimal("1.50")),
                                              (3, 'Cy, "C"', dt.date(2000, 12, 31), None),
                                              (7, "multi\nline", dt.date(1971, 1, 1), Decimal("4.00"))]
    rejects = query(pg_dsn, f'SELECT run_id, table_name, file_path, member, line_number, column_name, reason, raw '
                            f'FROM "{led}".reject ORDER BY member, line_number')
    assert [r[:6] for r in rejects] == [
        (result.run_id, "people", "2024-05/people.zip", "p1.csv", 3, None),
        (result.run_id, "people", "2024-05/people.zip", "p2.csv", 2, "born"),
        (result.run_id, "people", "2024-05/people.zip", "p2.csv", 3, "score"),
        (result.run_id, "people", "2024-05/people.zip", "p2.csv", 4, None),
        (result.run_id, "people", "2024-05/people.zip", "p2.csv", 7, None)]
    assert [r[6] for r in rejects] == [
        "expected 4 fields, found 2", "not a valid date (%Y-%m-%d): '1999-02-29'",
        "does not fit numeric(6,2): '99999'", "invalid bytes for encoding utf-8 at byte 5",
        "malformed record: unterminated quote opened on line 7"]
    assert [r[7] for r in rejects] == ["2,Bob", "4,Dé,1999-02-29,2", "5,Eve,1980-05-05,99999",
                                       "6,caf\\xe9,1970-01-01,3", '8,"open,1972-01-01,5']
    files = query(pg_dsn, f'SELECT status, rows_read, rows_loaded, rows_rejected FROM "{led}".file')
    assert files == [("loaded", 8, 3, 5)]


@e2e
@slow
def test_reject_threshold_discards_the_tables_committed_batches(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                                mlflow_uri: str, ray_session: None,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    month = tmp_path / "2024-05"
    month.mkdir()
    (month / "a.csv").write_bytes(people_csv(6000))  # clean, several 64 KiB batches
    (month / "b.csv").write_bytes(people_csv(6000, bad_every=1000))  # six impossible dates
    (month / "ok.csv").write_bytes(people_csv(10))
    secret_dsn = pg_dsn.replace("root@", f"root:{SECRET}@") if "root@" in pg_dsn else pg_dsn
    cfg = config(tmp_path, secret_dsn, schemas, mlflow_uri, {
        "people": table(["2024-05/[ab].csv"], max_rejects=3),
        "fine": table(["2024-05/ok.csv"]),
    })
    result = run_job(cfg)
    target, led = schemas
    assert result.status == "failed"
    assert isinstance(result.error, RejectThresholdError)
    assert "table people rejected" in str(result.error) and "max_rejects=3" in str(result.error)
    committed = [b for b in result.metrics.batches if b.table_name == "people" and b.status == "committed"]
    assert len(committed) >= 3, "batches were committed before the threshold was known"
    assert rows(pg_dsn, target, "people") == []
    assert query(pg_dsn, f"SELECT count(*) FROM \"{led}\".batch WHERE table_name='people'") == [(0,)]
    # The discarded file's rejects stay as the failed run's record (issue 11 item 13), counted in no batch.
    assert query(pg_dsn, f"SELECT run_id, file_path, count(*), bool_and(discarded) FROM \"{led}\".reject "
                         "GROUP BY 1, 2") == [(result.run_id, "2024-05/b.csv", 6, True)]
    files = query(pg_dsn, f'SELECT path, status, error_text FROM "{led}".file WHERE table_name=%s ORDER BY 1',
                  ("people",))
    assert [(f[0], f[1]) for f in files] == [("2024-05/a.csv", "failed"), ("2024-05/b.csv", "failed")]
    assert all("max_rejects=3" in f[2] for f in files)
    assert len(rows(pg_dsn, target, "fine")) == 10
    run = query(pg_dsn, f'SELECT status, error_category, error_text, config::text FROM "{led}".run')
    assert run[0][:2] == ("failed", "source_data") and "max_rejects=3" in run[0][2]
    # Nothing of people is loaded, and no figure says otherwise: what the run had loaded of its files is
    # discarded (rows read = loaded + rejected + discarded) in the summary, the ledger and MLflow. Before (a
    # fresh-user review, session 19): summary and ledger said 1462 loaded while the target held none.
    tm = result.metrics.tables["people"]
    assert tm.rows_loaded == 0 and tm.rows_discarded > 0
    assert tm.rows_read == tm.rows_loaded + tm.rows_rejected + tm.rows_discarded
    (discarded_line,) = [ln for ln in result.summary.splitlines() if ln.startswith("discarded:")]
    assert f"people {tm.rows_discarded:,}" in discarded_line
    assert query(pg_dsn, f'SELECT rows_read, rows_loaded, rows_rejected, rows_discarded FROM "{led}".table_load '
                         "WHERE table_name = 'people'") == [(tm.rows_read, 0, tm.rows_rejected, tm.rows_discarded)]
    assert query(pg_dsn, f'SELECT rows_loaded, rows_discarded FROM "{led}".run') == [(10, tm.rows_discarded)]
    import mlflow
    recorded = mlflow.tracking.MlflowClient(tracking_uri=mlflow_uri).get_run(result.mlflow_run_id).data.metrics
    assert (recorded["rows_loaded"], recorded["rows_discarded"], recorded["people.rows_loaded"]) == (
        10, tm.rows_discarded, 0)
    # ... and in ``history show`` (before, it printed read, loaded and rejected only: read != loaded + rejected)
    history = History(pg_dsn, led, mlflow_uri)
    shown = render_show(history.run(result.run_id), history.tables(result.run_id), {})
    assert f"rejected {tm.rows_rejected:,}, discarded {tm.rows_discarded:,}" in shown
    (people_line,) = [ln.split() for ln in shown.splitlines() if ln.startswith("people ")]
    header = next(ln.split() for ln in shown.splitlines() if ln.startswith("table "))
    assert people_line[header.index("discarded")] == f"{tm.rows_discarded:,}"
    # A ledger no newer run has migrated (no rows_discarded column) is still shown, without the figure.
    with autocommit_cursor(pg_dsn) as cur:
        for name in ("run", "table_load"):
            cur.execute(f'ALTER TABLE "{led}".{name} DROP COLUMN rows_discarded')
    old = History(pg_dsn, led, mlflow_uri)
    shown = render_show(old.run(result.run_id), old.tables(result.run_id), {})
    lines = shown.splitlines()
    assert next(ln for ln in lines if ln.startswith("rows read")).startswith(
        f"rows read {tm.rows_read + 10:,}, loaded 10, rejected {tm.rows_rejected:,}  mlflow")
    assert "discarded" not in next(ln for ln in lines if ln.startswith("table "))
    _assert_secret_absent(result, run, mlflow_uri)
    assert "reject threshold exceeded" in caplog.text and SECRET not in caplog.text


def _assert_secret_absent(result: Any, run: List[tuple], mlflow_uri: str) -> None:
    """The DSN password appears nowhere a user or operator reads: error, ledger, MLflow params and tags."""
    import mlflow

    assert SECRET not in str(result.error) and SECRET not in result.summary
    assert all(SECRET not in str(v) for v in run[0])
    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_uri)
    data = client.get_run(result.mlflow_run_id).data
    assert data.params, "MLflow recorded the run's parameters"
    assert all(SECRET not in str(v) for v in [*data.params.values(), *data.tags.values()])


@e2e
@slow
def test_rate_threshold_is_judged_on_small_tables_too(tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str,
                                                       ray_session: None) -> None:
    (tmp_path / "2024-05").mkdir()
    (tmp_path / "2024-05" / "p.csv").write_bytes(people_csv(20, bad_every=4))  # 25% rejected
    result = run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri,
                            {"people": table(["2024-05/p.csv"], max_reject_rate=0.2)}))
    assert result.status == "failed" and "max_reject_rate=20.00%" in str(result.error)
    assert rows(pg_dsn, schemas[0], "people") == []


@e2e
@slow
def test_a_corrupt_file_commits_nothing_and_the_others_load(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                            mlflow_uri: str, ray_session: None) -> None:
    month = tmp_path / "2024-05"
    month.mkdir()
    corrupt_zip_member(month / "a.zip", {"part1.csv": people_csv(5000), "part2.csv": people_csv(3000)}, "part2.csv")
    write_zip(month / "b.zip", {"only.csv": people_csv(7)})
    (month / "empty.zip").write_bytes(b"")
    result = run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri,
                            {"people": table(["2024-05/[ab].zip"], fmt="zip"),
                             "nothing": table(["2024-05/empty.zip"], fmt="zip")}))
    target, led = schemas
    assert result.status == "failed" and isinstance(result.error, SourceDataError)
    good_batches = [b for b in result.metrics.batches if b.member == "part1.csv" and b.status == "committed"]
    assert good_batches, "the good member's batches were committed before the corrupt member was read"
    assert len(rows(pg_dsn, target, "people")) == 7, "only b.zip's rows remain"
    tm = result.metrics.tables["people"]  # part1's rows were loaded, then discarded with a.zip
    assert (tm.rows_loaded, tm.rows_discarded) == (7, sum(b.rows_loaded for b in good_batches))
    files = dict(query(pg_dsn, f'SELECT path, status FROM "{led}".file WHERE table_name=%s', ("people",)))
    assert files == {"2024-05/a.zip": "failed", "2024-05/b.zip": "loaded"}
    errors = {f for t, f, m in result.failed_files if "CRC" in m} | {f for t, f, m in result.failed_files
                                                                      if "corrupt zip" in m}
    assert errors == {"2024-05/a.zip", "2024-05/empty.zip"}


@e2e
@slow
def test_public_dataset_matches_a_pandas_reading(tmp_path: Path, pg_dsn: str, schemas: tuple, mlflow_uri: str,
                                                 ray_session: None) -> None:
    """vega_datasets ships airports.csv (NA markers, quoted commas) and seattle-temps.csv (hourly timestamps)."""
    import pandas as pd
    import vega_datasets

    data = Path(vega_datasets.__file__).parent / "_data"
    month = tmp_path / "2024-05"
    month.mkdir()
    for name in ("airports.csv", "seattle-temps.csv"):
        shutil.copy(data / name, month / name)
    na = DialectConfig(header=True, null_values=["NA"])
    airports = [ColumnConfig(name=n, type="text") for n in ("iata", "name", "city", "state", "country")] + [
        ColumnConfig(name="latitude", type="double"), ColumnConfig(name="longitude", type="double")]
    temps = [ColumnConfig(name="date", type="timestamp", format="%Y/%m/%d %H:%M"),
             ColumnConfig(name="temp", type="double")]
    result = run_job(config(tmp_path, pg_dsn, schemas, mlflow_uri, {
        "airports": table(["2024-05/airports.csv"], airports, dialect=na, key=["iata"], max_reject_rate=0.0),
        "temps": table(["2024-05/seattle-temps.csv"], temps, dialect=na, max_reject_rate=0.0)}))
    assert result.status == "succeeded", result.error
    target = schemas[0]
    for tname, path, cols in (("airports", "airports.csv", airports), ("temps", "seattle-temps.csv", temps)):
        expected = pd.read_csv(month / path, keep_default_na=False, na_values=["NA"], dtype={"iata": str})
        if tname == "temps":
            expected["date"] = pd.to_datetime(expected["date"], format="%Y/%m/%d %H:%M")
        names = [c.name for c in cols]
        got = pd.DataFrame(query(pg_dsn, f'SELECT {", ".join(names)} FROM "{target}"."{tname}" ORDER BY 1'),
                           columns=names)
        expected = expected.sort_values(names[0]).reset_index(drop=True)
        assert len(got) == len(expected) == result.metrics.tables[tname].rows_loaded > 1000
        for name in names:
            pd.testing.assert_series_equal(got[name], expected[name], check_dtype=False, check_names=False,
                                           obj=f"{tname}.{name}")
    assert query(pg_dsn, f"SELECT count(*) FROM \"{target}\".airports WHERE state IS NULL")[0][0] == 12


# ---------------------------------------------------------------- safety (no database needed)


def test_unsafe_identifiers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a valid SQL identifier"):
        config(tmp_path, "postgresql://x@h/db", ("s", "l"), "sqlite://", {"x; drop table y": table(["*.csv"])})
    with pytest.raises(ConfigError, match="not a valid SQL identifier"):
        config(tmp_path, "postgresql://x@h/db", ('s"; drop schema public; --', "l"), "sqlite://",
               {"t": table(["*.csv"])})
    evil = [ColumnConfig(name='a"b', type="text")]
    with pytest.raises(ConfigError, match="not a valid SQL identifier"):
        config(tmp_path, "postgresql://x@h/db", ("s", "l"), "sqlite://", {"t": table(["*.csv"], evil)})


@pytest.mark.parametrize("template", ["../outside/*.csv", "/etc/*.conf", "{year}/../../*.csv"])
def test_path_templates_cannot_leave_the_data_root(tmp_path: Path, template: str) -> None:
    root = tmp_path / "root"
    (root / "2024").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.csv").write_text("1\n")
    cfg = config(root, "postgresql://x@h/db", ("s", "l"), "sqlite://", {"t": table([template])})
    with pytest.raises((ConfigError, SourceDataError)) as info:
        build_plan(cfg)
    assert "outside the data root" in str(info.value) or "no source file matches" in str(info.value)


def test_symlink_out_of_the_data_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.csv").write_text("1\n")
    (root / "link.csv").symlink_to(tmp_path / "secret.csv")
    cfg = config(root, "postgresql://x@h/db", ("s", "l"), "sqlite://", {"t": table(["*.csv"])})
    with pytest.raises(ConfigError, match="outside the data root"):
        build_plan(cfg)


def test_path_templates_allow_only_year_and_month(tmp_path: Path) -> None:
    cfg = config(tmp_path, "postgresql://x@h/db", ("s", "l"), "sqlite://", {"t": table(["{year.__class__}/*.csv"])})
    with pytest.raises(ConfigError, match="may only use"):
        build_plan(cfg)
