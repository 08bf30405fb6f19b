"""Any schedule, and ledger claims checked against the target (issue 12, items 3 and 4).

A user job kept outside loadkit (a temporary conf/job/weather.yaml) loads the real
seattle-weather.csv that vega_datasets ships, in-process against the real PostgreSQL:
- a one-off job (no year/month) reruns without duplicates;
- the same file under another period into an append target is skipped, not loaded twice;
- a changed job.schema is refused while the old target exists, then loads into the new schema once the
  old table is dropped; a dropped target table is reloaded, or
  refused with job.on_drift=stop; a merge target whose rows were deleted is reloaded.
"""
from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Iterator, List, Tuple

import psycopg2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadkit.errors import ConfigError
from loadkit.runner import RunResult, run_job
from tests.helpers import compose, query

pytestmark = pytest.mark.e2e

WEATHER_ROWS = 1461
WEATHER_PRECIPITATION = "4426.0"  # sum of the precipitation column, read from the file in weather_csv()

JOB = """\
name: weather
schema: public
tables:
  seattle_weather:
    mode: append
    source:
      paths: ["{path}"]
      dialect: {{delimiter: ",", header: true}}
    columns:
      - {{name: date, type: date, format: "%Y/%m/%d"}}
      - {{name: precipitation, type: "numeric(6,1)"}}
      - {{name: temp_max, type: "numeric(6,1)"}}
      - {{name: temp_min, type: "numeric(6,1)"}}
      - {{name: wind, type: "numeric(6,1)"}}
      - {{name: weather, type: text}}
"""


def weather_csv() -> Path:
    """seattle-weather.csv as vega_datasets ships it (a test dependency: missing means failing)."""
    import vega_datasets

    path = Path(vega_datasets.__file__).parent / "_data" / "seattle-weather.csv"
    text = path.read_text().splitlines()
    assert len(text) - 1 == WEATHER_ROWS
    from decimal import Decimal

    assert str(sum(Decimal(line.split(",")[1]) for line in text[1:])) == WEATHER_PRECIPITATION
    return path


def write_job(conf: Path, path: str = "seattle-weather.csv", name: str = "weather") -> Path:
    (conf / "job").mkdir(parents=True, exist_ok=True)
    (conf / "job" / f"{name}.yaml").write_text(JOB.format(path=path))
    return conf


@pytest.fixture()
def project(tmp_path: Path) -> Tuple[Path, Path]:
    """(conf dir holding job/weather.yaml, data root holding seattle-weather.csv)."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(weather_csv(), data / "seattle-weather.csv")
    return write_job(tmp_path / "conf"), data


@pytest.fixture()
def other_schema(pg_dsn: str) -> Iterator[str]:
    name = f"t2_{uuid.uuid4().hex[:8]}"
    yield name
    execute(pg_dsn, f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def execute(dsn: str, sql: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


def run(project: Tuple[Path, Path], pg_dsn: str, schemas: tuple, *extra: str) -> RunResult:
    conf, data = project
    target, led = schemas
    cfg = compose([f"hydra.searchpath=[file://{conf}]", "+job=weather", f"data_root={data}", f"sink.dsn={pg_dsn}",
                   f"job.schema={target}", f"sink.ledger_schema={led}", "tracking.enabled=false",
                   "env.executor=inprocess", "env.progress_bars=false", *extra])
    return run_job(cfg)


def weather(pg_dsn: str, schema: str) -> List[tuple]:
    got = query(pg_dsn, f'SELECT count(*), sum(precipitation)::text FROM "{schema}".seattle_weather')
    return [(int(n), s) for n, s in got]


def test_one_off_job_needs_no_period_and_reruns_without_duplicates(project, pg_dsn: str, schemas: tuple) -> None:
    first = run(project, pg_dsn, schemas)
    assert first.status == "succeeded", first.error
    again = run(project, pg_dsn, schemas)
    assert again.status == "succeeded" and again.metrics.tables["seattle_weather"].files_skipped == 1
    assert weather(pg_dsn, schemas[0]) == [(WEATHER_ROWS, WEATHER_PRECIPITATION)]
    assert query(pg_dsn, f'SELECT DISTINCT period FROM "{schemas[1]}".file') == [("all",)]


def test_same_file_under_another_period_is_skipped_not_duplicated(project, pg_dsn: str, schemas: tuple,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    monthly = ("job.params=[year,month]", "year=2024")
    assert run(project, pg_dsn, schemas, *monthly, "month=1").status == "succeeded"
    with caplog.at_level(logging.WARNING, logger="loadkit.postgres.identity"):
        second = run(project, pg_dsn, schemas, *monthly, "month=2")
    assert second.status == "succeeded" and second.metrics.tables["seattle_weather"].files_skipped == 1
    assert weather(pg_dsn, schemas[0]) == [(WEATHER_ROWS, WEATHER_PRECIPITATION)]
    assert "already loaded into" in caplog.text and "2024-01" in caplog.text


def test_changed_schema_is_refused_while_the_old_target_exists(project, pg_dsn: str, schemas: tuple,
                                                                other_schema: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A changed job.schema with the old target still there: the ledger's rows of the table and period account
    for the old target (Ledger.claim_targets), so the run is refused before any work -- a ledger shared by two
    targets let each run forget the other's claims, and an append target got its rows twice once the files
    differed (tests/test_concurrency.py). Back on the first schema: skipped, not duplicated. Once the old
    table is dropped, the new schema takes the claim over and loads every row."""
    target, led = schemas
    assert run(project, pg_dsn, schemas).status == "succeeded"
    with pytest.raises(ConfigError, match=f"accounts for table seattle_weather of period all in schema {target} "
                                          r"\(job weather\).*sink\.ledger_schema"):
        run(project, pg_dsn, (other_schema, led))
    assert query(pg_dsn, "SELECT to_regclass(%s)", (f"{other_schema}.seattle_weather",)) == [(None,)]
    back = run(project, pg_dsn, schemas)  # the first schema still holds its rows: skipped, not duplicated
    assert back.metrics.tables["seattle_weather"].files_skipped == 1
    assert weather(pg_dsn, target) == [(WEATHER_ROWS, WEATHER_PRECIPITATION)]
    execute(pg_dsn, f'DROP TABLE "{target}".seattle_weather')
    with caplog.at_level(logging.WARNING, logger="loadkit.postgres.identity"):
        moved = run(project, pg_dsn, (other_schema, led))
    assert moved.status == "succeeded" and moved.metrics.tables["seattle_weather"].rows_loaded == WEATHER_ROWS
    assert weather(pg_dsn, other_schema) == [(WEATHER_ROWS, WEATHER_PRECIPITATION)]
    assert f"{other_schema}.seattle_weather" in caplog.text


def test_dropped_table_is_reloaded_or_refused(project, pg_dsn: str, schemas: tuple,
                                              caplog: pytest.LogCaptureFixture) -> None:
    target, _ = schemas
    assert run(project, pg_dsn, schemas).status == "succeeded"
    execute(pg_dsn, f'DROP TABLE "{target}".seattle_weather')
    refused = run(project, pg_dsn, schemas, "job.on_drift=stop")
    assert refused.status == "failed" and isinstance(refused.error, ConfigError)
    assert f"{target}.seattle_weather" in str(refused.error) and "force=true" in str(refused.error)
    # refused inside the preparing transaction: not even the empty table was recreated
    assert query(pg_dsn, "SELECT to_regclass(%s)", (f"{target}.seattle_weather",)) == [(None,)]
    with caplog.at_level(logging.WARNING, logger="loadkit.postgres.identity"):
        reloaded = run(project, pg_dsn, schemas)
    assert reloaded.status == "succeeded" and f"{target}.seattle_weather" in caplog.text
    assert weather(pg_dsn, target) == [(WEATHER_ROWS, WEATHER_PRECIPITATION)]


def test_emptied_merge_target_is_reloaded_but_a_rerun_is_not(project, pg_dsn: str, schemas: tuple) -> None:
    target, _ = schemas
    merge = ("job.tables.seattle_weather.mode=merge", "job.tables.seattle_weather.key=[date]")
    assert run(project, pg_dsn, schemas, *merge).status == "succeeded"
    assert run(project, pg_dsn, schemas, *merge).metrics.tables["seattle_weather"].files_skipped == 1
    execute(pg_dsn, f'DELETE FROM "{target}".seattle_weather')
    again = run(project, pg_dsn, schemas, *merge)
    assert again.metrics.tables["seattle_weather"].files_skipped == 0
    assert weather(pg_dsn, target) == [(WEATHER_ROWS, WEATHER_PRECIPITATION)]


def test_count_check_catches_deleted_rows_in_an_append_target(project, pg_dsn: str, schemas: tuple) -> None:
    target, _ = schemas
    assert run(project, pg_dsn, schemas).status == "succeeded"
    execute(pg_dsn, f'DELETE FROM "{target}".seattle_weather WHERE weather = \'sun\'')
    assert run(project, pg_dsn, schemas).metrics.tables["seattle_weather"].files_skipped == 1  # exists: still some
    fixed = run(project, pg_dsn, schemas, "job.verify=count")
    assert fixed.metrics.tables["seattle_weather"].files_skipped == 0
    assert weather(pg_dsn, target) == [(WEATHER_ROWS, WEATHER_PRECIPITATION)]


def test_parameters_are_required_only_by_jobs_that_use_them(project) -> None:
    conf, data = project
    write_job(conf, path="{year:04d}/{month:02d}/seattle-weather.csv", name="monthly_weather")
    base = [f"hydra.searchpath=[file://{conf}]", f"data_root={data}"]
    assert compose(base + ["+job=weather"]).year is None  # a one-off load needs none
    with pytest.raises(ConfigError) as err:
        compose(base + ["+job=monthly_weather", "year=2024"])
    assert err.value.context["key"] == "month" and "month=" in str(err.value)
    with pytest.raises(ConfigError) as err:
        compose(base + ["+job=weather", "job.params=[day]"])
    assert err.value.context["key"] == "day"
    from loadkit.plan import period_key

    cfg = compose(base + ["+job=weather", "job.params=[year,month,day,partition]", "year=2024", "month=5", "day=3",
                          "partition=eu"])
    assert cfg.job is not None and period_key(cfg.job, {"year": 2024, "month": 5, "day": 3, "partition": "eu"}) \
        == "2024-05-03/eu"
    from loadkit.plan import build_plan

    snapshot = compose(base + ["+job=weather", "job.params=[partition]", "partition=eu",
                               "job.tables.seattle_weather.mode=snapshot"])
    with pytest.raises(ConfigError) as err:
        build_plan(snapshot)  # its partition column is an integer period
    assert err.value.context["key"] == "job.tables.seattle_weather.mode"


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_every_period_gets_its_own_identifier_safe_staging_tag(a: str, b: str) -> None:
    from loadkit.plan import period_tag, staging_name
    from loadkit.security import quote_ident

    tags = [period_tag(p, {"partition": p}) for p in (a, b)]
    for tag in tags:
        quote_ident(staging_name("t" * 39, tag))  # a valid identifier for table names up to 39 chars
    assert (tags[0] == tags[1]) == (a == b)
    assert period_tag("2024-05", {"year": 2024, "month": 5}) == "202405"
    assert period_tag("2024-05-03", {"year": 2024, "month": 5, "day": 3}) == "20240503"
    assert period_tag("all", {}) == "all"
