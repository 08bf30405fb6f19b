"""Config: composition, typing and validation errors that name the key, before any work starts."""
from __future__ import annotations

import ast
import dataclasses
import enum
import hashlib
import inspect
import re
import textwrap
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from omegaconf import MISSING

from loadkit.config import AlertRule, LoadkitConfig
from loadkit.errors import ConfigError
from tests.helpers import CONF, ROOT, compose

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


@pytest.mark.parametrize("override, key", [
    ("batch.sise=10", "batch.sise"),  # unknown key
    ("batch.size=lots", "batch.size"),  # wrong type
    ("job.remote.discovery=ftp", "job.remote.discovery"),  # a value outside a choice (Enum)
    ("env.executor=threads", "env.executor"),
    ("logging.level=LOUD", "logging.level"),
    ("job.tables.cnaes.columns.0.on_invalid=drop", "job.tables.cnaes.columns[0].on_invalid"),
])
def test_unknown_key_wrong_type_and_bad_choice_fail_at_compose(override: str, key: str) -> None:
    """Hydra/OmegaConf refuse these while composing, before validate(); the error names the key."""
    with pytest.raises(ConfigError) as err:
        compose(BASE + [override])
    assert err.value.context.get("key") == key
    assert key.rsplit(".", 1)[-1] in str(err.value)


def test_choices_are_plain_strings_downstream() -> None:
    """A choice compares, formats and serialises as its value; the plan holds plain str."""
    import json

    from loadkit.config import WriteMode, as_plain_dict

    cfg = compose(BASE)
    assert cfg.job is not None
    mode = cfg.job.tables["empresas"].mode
    assert mode is WriteMode.merge and mode == "merge" and f"{mode}" == "merge" and str(mode) == "merge"
    assert json.loads(json.dumps(as_plain_dict(cfg)))["job"]["tables"]["empresas"]["mode"] == "merge"


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


@pytest.mark.parametrize("mode, delete_missing", [("replace", False), ("snapshot", False), ("merge", True),
                                                  ("append", False), ("merge", False)])
def test_a_whole_period_mode_needs_a_period_as_fine_as_its_paths(mode: str, delete_missing: bool,
                                                                 tmp_path: Path) -> None:
    """Paths by {day} and job.period by month: replace, snapshot and merge with delete_missing would publish
    the month from one day's file (a review lost 20,000 of 40,000 rows, the ledger still calling them
    loaded), so the config is refused naming the table's mode; append and plain merge accumulate and are
    fine. The same table with the day in job.period is accepted."""
    from loadkit.config import (ColumnConfig, ConfigError, JobConfig, LoadkitConfig, SinkConfig, SourceConfig,
                                TableConfig, to_config)

    def cfg(period: str) -> Any:
        table = TableConfig(mode=mode, key=["id"] if mode != "append" else [], delete_missing=delete_missing,
                            columns=[ColumnConfig(name="id", type="integer", nullable=False)],
                            source=SourceConfig(paths=["{year:04d}-{month:02d}/{day:02d}/people.csv"]))
        return LoadkitConfig(year=2024, month=5, day=1, data_root=str(tmp_path), sink=SinkConfig(dsn="x"),
                             job=JobConfig(name="daily", period=period, tables={"people": table}))

    (tmp_path / "2024-05" / "01").mkdir(parents=True)
    (tmp_path / "2024-05" / "01" / "people.csv").write_text("id\n1\n")
    if mode == "append" or (mode == "merge" and not delete_missing):
        to_config(cfg("{year:04d}-{month:02d}"))
    else:
        with pytest.raises(ConfigError) as refused:
            to_config(cfg("{year:04d}-{month:02d}"))
        assert refused.value.context.get("key") == "job.tables.people.mode" and "{day}" in str(refused.value)
    to_config(cfg("{year:04d}-{month:02d}-{day:02d}"))


# ---------------------------------------------------------------- one place for every default

def _plain(value: Any) -> Any:
    """A default as YAML would write it: Enums by value, dataclasses as mappings."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _config_classes() -> List[type]:
    """Every dataclass reachable from LoadkitConfig (through Optional, List and Dict fields)."""
    seen: List[type] = []
    todo: List[type] = [LoadkitConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for hint in typing.get_type_hints(cls).values():
            stack = [hint]
            while stack:
                t = stack.pop()
                if dataclasses.is_dataclass(t):
                    todo.append(t)  # type: ignore[arg-type]
                stack.extend(typing.get_args(t))
    return seen


def _field_docs(cls: type) -> Dict[str, str]:
    """name -> the attribute docstring written right under the field."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = after.value.value
    return docs


def test_every_config_field_has_a_one_line_docstring() -> None:
    for cls in _config_classes():
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            doc = docs.get(f.name, "")
            assert doc.strip(), f"{cls.__name__}.{f.name} has no docstring"
            assert "\n" not in doc.strip(), f"{cls.__name__}.{f.name}: the docstring is one line"


# README heading (its first `code` span; none for the top level) -> the dataclass that table documents.
README_SECTIONS = {
    "": "LoadkitConfig", "job": "JobConfig", "job.migrate": "MigrateConfig", "job.remote": "RemoteConfig",
    "job.tables.<t>": "TableConfig", "job.tables.<t>.source": "SourceConfig",
    "job.tables.<t>.source.dialect": "DialectConfig", "job.tables.<t>.columns[i]": "ColumnConfig",
    "job.tables.<t>.derived_key": "DerivedKeyConfig", "sink": "SinkConfig", "batch": "BatchConfig",
    "pool": "PoolConfig", "retry": "RetryConfig", "alerts": "AlertsConfig", "alerts.<rule>": "AlertRule",
    "env": "EnvConfig", "tracking": "TrackingConfig", "telemetry": "TelemetryConfig", "logging": "LoggingConfig",
}


def _readme_tables() -> Dict[str, Dict[str, str]]:
    """README's configuration reference: section prefix -> {key: default cell}."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration reference\n", 1)[1].split("\n## ", 1)[0]
    tables: Dict[str, Dict[str, str]] = {}
    current = None
    for line in section.splitlines():
        if line.startswith("### "):
            spans = re.findall(r"`([^`]+)`", line)
            current = spans[0] if spans else ""
            assert current not in tables, f"README documents {current!r} twice"
            tables[current] = {}
        elif current is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key = re.findall(r"`([^`]+)`", cells[0])[0]
            assert key not in tables[current], f"README documents {current}.{key} twice"
            tables[current][key] = cells[1]
    return tables


def test_readme_configuration_tables_match_the_dataclasses() -> None:
    """Every field is in README with its default (read as loadkit's YAML reads it, so `off` is a string);
    README documents nothing the dataclasses lack."""
    from omegaconf import OmegaConf

    classes = {cls.__name__: cls for cls in _config_classes()}
    assert set(README_SECTIONS.values()) == set(classes), "a config dataclass without a README section (or gone)"
    tables = _readme_tables()
    assert set(tables) == set(README_SECTIONS), f"README sections differ: {set(tables) ^ set(README_SECTIONS)}"
    for prefix, name in README_SECTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(classes[name])}
        documented = tables[prefix]
        where = prefix or "top level"
        assert set(documented) == set(fields), (f"README {where}: missing {sorted(set(fields) - set(documented))}, "
                                                f"not in {name}: {sorted(set(documented) - set(fields))}")
        for key, cell in documented.items():
            default = _default(fields[key])
            if default is MISSING or default == "???":
                assert "required" in cell, f"README {where}.{key}: say it is required"
                continue
            if dataclasses.is_dataclass(default) and not isinstance(default, AlertRule):
                continue  # a nested group: its own table
            spans = re.findall(r"`([^`]+)`", cell)
            assert spans, f"README {where}.{key}: no default in {cell!r}"
            written = OmegaConf.to_container(OmegaConf.create({"v": None}) if spans[0] == "null" else
                                             OmegaConf.create(f"v: {spans[0]}"), resolve=False)["v"]  # type: ignore
            assert written == _plain(default), \
                f"README {where}.{key}: default {spans[0]!r}, the dataclass has {_plain(default)!r}"


def _leaves(data: Any, path: str = "") -> Iterator[Tuple[str, Any]]:
    if isinstance(data, dict) and data:
        for k, v in data.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    else:
        yield path, data


def test_group_files_hold_only_what_differs_from_the_defaults() -> None:
    """A key a YAML file sets to its dataclass default is a second place for that default: none may."""
    from omegaconf import OmegaConf

    defaults = _plain(LoadkitConfig())
    checked = 0
    for path in sorted(CONF.glob("*.yaml")) + sorted(CONF.glob("*/*.yaml")):
        if path.parent.name == "job":
            continue  # job files declare tables; their keys have no dataclass default to restate
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        assert isinstance(data, dict)
        if path.parent == CONF:
            data = {k: v for k, v in data.items() if k not in ("defaults", "hydra")}
        elif "@package _global_" not in path.read_text(encoding="utf-8"):
            data = {path.parent.name: data}
        for key, value in _leaves(data):
            if not key:
                continue
            expected: Any = defaults
            for part in key.split("."):
                assert isinstance(expected, dict) and part in expected, f"{path.relative_to(CONF)}: no key {key}"
                expected = expected[part]
            assert value != expected, f"{path.relative_to(CONF)}: {key}: {value!r} restates the default"
            checked += 1
    assert checked >= 10  # the files that do differ (adaptive batch, cluster/prod env, embedded sink, ...)


def test_the_plan_carries_every_knob_a_run_reads(month) -> None:
    """Runner reads the plan, not the config: each frozen sub-plan mirrors its config class field for field, and
    build_plan carries the values (the sink's timeouts included, which were once accepted and ignored)."""
    from loadkit import config as c, plan as p

    pairs = [(p.SinkPlan, c.SinkConfig), (p.EnvPlan, c.EnvConfig), (p.AlertsPlan, c.AlertsConfig),
             (p.AlertRuleSpec, c.AlertRule), (p.TrackingPlan, c.TrackingConfig),
             (p.TelemetryPlan, c.TelemetryConfig), (p.MigratePolicy, c.MigrateConfig),
             (p.BatchPolicy, c.BatchConfig), (p.RetryPolicy, c.RetryConfig)]
    for frozen, source in pairs:
        assert [f.name for f in dataclasses.fields(frozen)] == [f.name for f in dataclasses.fields(source)], frozen
    cfg = compose(BASE + [f"data_root={month.root}", "sink.dsn=postgresql://u:secret@h/db", "sink.connect_timeout=3",
                          "sink.statement_timeout_ms=5000", "sink.lock_timeout_ms=700", "sink.compare_work_mem=64MB",
                          "env.executor=inprocess",
                          "alerts.stall_seconds.action=abort", "job.migrate.add_columns=true", "job.verify=count",
                          "tracking=off", "telemetry.tracing=console", "fetch=never"])
    plan = p.build_plan(cfg)
    assert (plan.sink.connect_timeout, plan.sink.statement_timeout_ms, plan.sink.lock_timeout_ms) == (3, 5000, 700)
    assert plan.sink.compare_work_mem == "64MB"
    from loadkit.postgres.modes import JOIN_WORK_MEM
    assert c.SinkConfig().compare_work_mem == p.SinkPlan("", "", "", 0, 0, 0).compare_work_mem == JOIN_WORK_MEM
    # PostgreSQL needs the unit spelled; nothing else passes. Nor does a size outside work_mem's range (64kB ..
    # 2147483647kB), which the server refuses at the reload's SET, after the whole load (the server's own
    # verdict on each: test_memory_sizes_are_what_the_server_accepts).
    for bad in ("256", "0MB", "1 GB", "256MB; SET x", "1kB", "63kB", "2TB", "2048GB", "2097152MB", "99999999999999MB"):
        with pytest.raises(ConfigError, match="sink.compare_work_mem"):
            p.build_plan(compose(BASE + [f"data_root={month.root}", f"sink.compare_work_mem='{bad}'"]))
    for good in ("64kB", "2147483647kB", "2047GB", "1TB"):
        assert p.build_plan(compose(BASE + [f"data_root={month.root}",
                                            f"sink.compare_work_mem={good}"])).sink.compare_work_mem == good
    # maintenance_work_mem (the publish's key and index builds): the same spelling, from 1MB (its server's floor)
    assert c.SinkConfig().maintenance_work_mem == p.SinkPlan("", "", "", 0, 0, 0).maintenance_work_mem == "512MB"
    for bad in ("512", "1023kB", "64kB", "2TB", "512MB; SET x"):
        with pytest.raises(ConfigError, match="sink.maintenance_work_mem"):
            p.build_plan(compose(BASE + [f"data_root={month.root}", f"sink.maintenance_work_mem='{bad}'"]))
    for good in ("1024kB", "1MB", "2GB", "2147483647kB"):
        assert p.build_plan(compose(BASE + [f"data_root={month.root}", f"sink.maintenance_work_mem={good}"])
                            ).sink.maintenance_work_mem == good
    assert plan.sink.dsn == "postgresql://u:secret@h/db" and "secret" not in repr(plan.sink)
    assert plan.env.executor == "inprocess" and type(plan.env.executor) is str
    assert plan.alerts.stall_seconds == p.AlertRuleSpec(300.0, "critical", "abort")
    assert plan.migrate.add_columns and plan.verify == "count" and not plan.tracking.enabled
    assert plan.telemetry.tracing == "console" and plan.fetch.mode == "never"
    # every table's files hashed ahead on threads: each FileSpec carries its own file's sha256, in file order
    specs = [f for t in plan.tables for f in t.files]
    assert len(specs) > 2 and all(f.sha256 == hashlib.sha256(Path(f.path).read_bytes()).hexdigest() for f in specs)
    assert all([f.ordinal for f in t.files] == list(range(len(t.files))) for t in plan.tables)
    assert type(plan.table("empresas").mode) is str and plan.table("empresas").mode == "merge"
    settings = plan.settings_dict()
    assert settings["sink"]["dsn"] == "postgresql://u:***@h/db" and settings["job"]["verify"] == "count"


@pytest.mark.parametrize("setting, size", [
    *(("work_mem", size) for size in ["64kB", "63kB", "2147483647kB", "2147483648kB", "2047GB", "2048GB", "1TB",
                                      "2TB"]),
    *(("maintenance_work_mem", size) for size in ["1024kB", "1023kB", "1MB", "64kB", "2147483647kB", "2147483648kB",
                                                   "2047GB", "2TB"])])
def test_memory_sizes_are_what_the_server_accepts(setting: str, size: str, pg_dsn: str) -> None:
    """The config accepts a sink.compare_work_mem (work_mem) or sink.maintenance_work_mem exactly when
    PostgreSQL accepts it for that setting (compare_work_mem used to take 1kB or 2TB, and the run failed at its
    reload's publish, after the whole load)."""
    import psycopg2

    from loadkit.config import MAINTENANCE_WORK_MEM_MIN_KB, WORK_MEM_MIN_KB, _work_mem_kb
    from tests.helpers import autocommit_cursor

    with autocommit_cursor(pg_dsn) as cur:
        try:
            cur.execute("SELECT set_config(%s, %s, false)", (setting, size))
            server = True
        except psycopg2.Error:
            server = False
    low = MAINTENANCE_WORK_MEM_MIN_KB if setting == "maintenance_work_mem" else WORK_MEM_MIN_KB
    assert (_work_mem_kb(size, low) is not None) == server


@pytest.mark.parametrize("override, key, text", [
    ("pool.writerz=3", "pool.writerz", "Key 'writerz' not in 'PoolConfig'"),
    ("batch.size=abc", "batch.size", "'abc' of type 'str' could not be converted to Integer"),
    ("env.executor=foo", "env.executor", "Invalid value 'foo', expected one of [auto, ray, inprocess]"),
    ("job.tables.empresas.mode=bogus", "job.tables.empresas.mode", "Invalid value 'bogus', expected one of"),
    ("job.tables.nope.mode=merge", "job.tables.nope", "Key 'nope' is not in struct"),
    ("pool=nope", None, "Could not find 'pool/nope'; Available options in 'pool': default"),
])
def test_a_composition_error_is_one_line_naming_the_key(override: str, key: Any, text: str) -> None:
    """README, exit code 2: an unknown key, a wrong type or a value outside a choice is one line naming the key
    (OmegaConf's further lines restate the key and name schema classes; Hydra's search path is left out)."""
    from loadkit import cli

    with pytest.raises(ConfigError) as raised:
        cli._precheck(["+job=monthly", "year=2024", "month=5", override])
    message = str(raised.value)
    assert "\n" not in message and text in message, message
    assert raised.value.context.get("key") == key and (key is None or f"[key={key}]" in message)
    assert "full_key" not in message and "Config search path" not in message
