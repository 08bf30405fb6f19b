"""Config: composition, typing and validation errors that name the key, before any work starts."""
from __future__ import annotations

import pytest

from loadkit.config import LoadkitConfig
from loadkit.errors import ConfigError
from tests.conftest import compose

BASE = ["+job=monthly", "year=2024", "month=5"]


def test_monthly_job_composes_typed() -> None:
    cfg = compose(BASE)
    assert isinstance(cfg, LoadkitConfig)
    assert cfg.job is not None and len(cfg.job.tables) == 10
    est = cfg.job.tables["estabelecimentos"]
    assert est.source.dialect.delimiter == ";" and est.source.dialect.encoding == "latin-1"
    assert est.key == ["cnpj_basico", "cnpj_ordem", "cnpj_dv"]
    assert cfg.batch.size >= 1 and cfg.pool.writers >= 1


@pytest.mark.parametrize("override, key", [
    ("pool.writers=0", "pool.writers"),
    ("batch.size=0", "batch.size"),
    ("month=13", "month"),
    ("job.tables.empresas.mode=upsert", "job.tables.empresas.mode"),
    ("job.tables.empresas.columns.0.type=varchar", "job.tables.empresas.columns[0].type"),
    ("job.schema=bad-name", "job.schema"),
    ("retry.attempts=0", "retry.attempts"),
    ("alerts.reject_rate.action=explode", "alerts.reject_rate.action"),
])
def test_impossible_values_name_their_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose(BASE + [override])
    assert err.value.context.get("key") == key


def test_missing_year_is_reported() -> None:
    with pytest.raises(Exception) as err:
        compose(["+job=monthly", "month=5"])
    assert "year" in str(err.value)


def test_unknown_key_and_wrong_type_fail_at_compose() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose(BASE + ["batch.sise=10"])
    assert "sise" in str(err.value.__cause__ or err.value)
    with pytest.raises(ConfigCompositionException):
        compose(BASE + ["batch.size=lots"])


def test_no_job_selected() -> None:
    with pytest.raises(ConfigError) as err:
        compose(["year=2024", "month=5"])
    assert err.value.context["key"] == "job"


def test_sql_injection_in_table_name_is_refused() -> None:
    import copy

    from loadkit.config import validate
    from loadkit.security import quote_ident

    cfg = compose(BASE)
    assert cfg.job is not None
    cfg.job.tables["x; drop table y"] = copy.deepcopy(cfg.job.tables["cnaes"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "identifier" in str(err.value)
    with pytest.raises(ConfigError):
        quote_ident('x"; drop table y; --')
    assert quote_ident("empresas") == '"empresas"'


def test_sync_and_fetch_make_year_and_month_required() -> None:
    """A merge table with delete_missing is synced per month, and job.remote.url's placeholders are
    run parameters: job_params asks for them even when no path template uses them."""
    from loadkit.config import JobConfig, RemoteConfig, SourceConfig, TableConfig, job_params

    table = TableConfig(mode="merge", key=["id"], source=SourceConfig(paths=["people.csv"]))
    assert job_params(JobConfig(name="one", tables={"people": table})) == []
    table.delete_missing = True
    assert job_params(JobConfig(name="one", tables={"people": table})) == ["year", "month"]
    table.delete_missing = False
    remote = RemoteConfig(url="http://127.0.0.1:8000/{year:04d}/{day:02d}/")
    assert job_params(JobConfig(name="one", tables={"people": table}, remote=remote)) == ["year", "day"]
