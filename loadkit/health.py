"""``loadkit health``: is everything a run needs reachable and usable? One line per check.

    python -m loadkit.health [overrides...]        e.g. +job=monthly year=2024 month=5 sink.dsn=...

Takes the same Hydra overrides as a run and checks, without loading anything:

- ``postgres``: connect, server version, and the privileges a run needs (CREATE and USAGE on the
  target and ledger schemas if they exist, else CREATE on the database to make them);
- ``ledger``: its tables exist (or can be made), no run is stuck ``running`` (a ``running``
  row whose job lock nobody holds: its driver died; the next run of that job marks it crashed) and
  no ``table_load`` row is stale ``loading`` (its run is closed, missing or such a dead run: listed
  by run id, table and period);
- ``mlflow``: the tracking store answers (skipped with tracking off);
- ``ray``: the cluster in ``env.address`` accepts a TCP connection (skipped when none is set);
- ``disk``: free space under ``data_root`` and the temp dir is at least ``--min-free-mb``;
- ``sources``: every enabled table's source files for the month resolve (needs +job, year, month).

Exit code 0 when nothing failed; otherwise 4 and a last line ``unhealthy: <check>, ...`` on
stderr. ``main(argv)`` is the entry point a ``loadkit health`` subcommand can call.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence
from urllib.parse import urlsplit

from loadkit.errors import EXIT_CODES, Category
from loadkit.security import mask_text

DEFAULT_MIN_FREE_MB = 512
_LISTED = 10  # stale ledger rows named in the ledger check's detail (the rest are counted)


@dataclass
class Check:
    """One check's outcome: ``status`` is ok, FAIL or skipped; ``detail`` says what was seen."""

    name: str
    status: str
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


def _run(name: str, fn: Any, *args: Any) -> Check:
    try:
        status, detail = fn(*args)
    except Exception as exc:  # a check reports its failure instead of stopping the others
        status, detail = "FAIL", f"{type(exc).__name__}: {exc}".splitlines()[0]
    return Check(name, status, mask_text(detail))


def check_postgres(dsn: str, schemas: Sequence[str]) -> tuple:
    from loadkit.postgres import db

    conn = db.connect(dsn, connect_timeout=5, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            version = cur.fetchone()[0]
            missing = []
            for schema in schemas:
                cur.execute("SELECT has_schema_privilege(%s, 'CREATE') AND has_schema_privilege(%s, 'USAGE') "
                            "FROM pg_namespace WHERE nspname = %s", (schema, schema, schema))
                row = cur.fetchone()
                if row is None:
                    cur.execute("SELECT has_database_privilege(current_database(), 'CREATE')")
                    if not cur.fetchone()[0]:
                        missing.append(f"CREATE on the database (schema {schema} does not exist yet)")
                elif not row[0]:
                    missing.append(f"CREATE/USAGE on schema {schema}")
    finally:
        conn.close()
    if missing:
        return "FAIL", f"PostgreSQL {version}; missing privileges: {'; '.join(missing)}"
    return "ok", f"PostgreSQL {version}; may write schemas {', '.join(schemas)}"


def check_ledger(dsn: str, schema: str) -> tuple:
    """No run stuck 'running' and no table row stale 'loading'.

    A 'running' run whose job lock is free belongs to a dead driver. A ``table_load`` row still
    'loading' is stale when its run is gone: that run is closed (crashed, failed, interrupted ...),
    missing, or one of those dead 'running' runs. Both are listed (run id, table, period); the next
    run of that job and month marks them crashed."""
    from loadkit.postgres import db
    from loadkit.postgres.ledger import Ledger

    conn = db.connect(dsn, connect_timeout=5, autocommit=True)
    try:
        with conn.cursor() as cur:
            led = Ledger(schema)
            if not led.exists(cur):
                return "ok", f"no ledger in schema {schema} yet (the first run creates it)"
            stuck, dead = [], set()
            for job, period, count in led.running_periods(cur):
                if led.job_is_free(cur, job, period):  # nobody runs this job now: its 'running' rows are stuck
                    stuck.append(f"{job} {period} ({count})")
                    dead.add((job, period))
            loading = [f"{run_id} {table} {period} (run {status or 'missing'})"
                       for run_id, table, period, job, status in led.loading_tables(cur)
                       if status != "running" or (job, period) in dead]
            runs = led.run_count(cur)
    finally:
        conn.close()
    problems = []
    if stuck:
        problems.append(f"runs stuck 'running' with no live driver: {', '.join(stuck)}")
    if loading:
        shown = ", ".join(loading[:_LISTED]) + (f" and {len(loading) - _LISTED} more" if len(loading) > _LISTED else "")
        problems.append(f"{len(loading)} table row(s) stale 'loading' (their run is gone): {shown}")
    if problems:
        return "FAIL", "; ".join(problems) + "; the next run of that job and month marks them crashed"
    return "ok", f"{runs} run(s) recorded in {schema}, none stuck, no stale 'loading' table row"


def check_mlflow(uri: Optional[str], experiment: str) -> tuple:
    from loadkit import tracking

    target = uri or tracking.find_default_uri()
    if target.startswith(("sqlite:", "file:")) or "://" not in target:
        tracking.check_store_writable(target)
    runs = tracking.find_runs(target, experiment, max_results=1)
    return "ok", f"{mask_text(target)} answers ({'has runs' if runs else 'no run yet'})"


def check_ray(address: str) -> tuple:
    if address == "auto":
        import ray

        ray.init(address="auto", include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            cpus = ray.cluster_resources().get("CPU", 0)
        finally:
            ray.shutdown()
        return "ok", f"joined the local cluster: {cpus:g} CPUs"
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    host, port = parts.hostname or "127.0.0.1", parts.port or (10001 if address.startswith("ray://") else 6379)
    with socket.create_connection((host, port), timeout=5):
        pass
    return "ok", f"{host}:{port} accepts connections"


def check_disk(paths: Sequence[str], min_free_mb: int) -> tuple:
    seen, low = [], []
    for p in paths:
        path = Path(p)
        while not path.exists() and path != path.parent:
            path = path.parent
        free = shutil.disk_usage(path).free // 2**20
        seen.append(f"{p}: {free:,} MB free")
        if free < min_free_mb:
            low.append(p)
    if low:
        return "FAIL", f"less than {min_free_mb:,} MB free under {', '.join(low)} ({'; '.join(seen)})"
    return "ok", "; ".join(seen)


def check_sources(cfg: Any) -> tuple:
    from loadkit.plan import build_plan

    plan = build_plan(cfg)
    files = sum(len(t.files) for t in plan.tables)
    size = sum(f.size for t in plan.tables for f in t.files)
    return "ok", f"{len(plan.tables)} table(s), {files} file(s), {size / 1e6:,.1f} MB for {plan.period}"


def check_health(cfg: Any, min_free_mb: int = DEFAULT_MIN_FREE_MB, sources: bool = True) -> List[Check]:
    """Every check for this (typed) config, in order; none raises."""
    from loadkit.postgres import db

    checks: List[Check] = []
    try:
        dsn = db.resolve_dsn(cfg.sink.dsn, cfg.sink.embedded_dir)
    except Exception as exc:
        dsn = None
        checks.append(Check("postgres", "FAIL", mask_text(f"no database: {exc}")))
    if dsn:
        schemas = [cfg.sink.ledger_schema] + ([cfg.job.schema] if cfg.job is not None else [])
        checks.append(_run("postgres", check_postgres, dsn, schemas))
        checks.append(_run("ledger", check_ledger, dsn, cfg.sink.ledger_schema) if not checks[-1].failed
                      else Check("ledger", "skipped", "PostgreSQL is not usable"))
    if cfg.tracking.enabled:
        checks.append(_run("mlflow", check_mlflow, cfg.tracking.uri, cfg.tracking.experiment))
    else:
        checks.append(Check("mlflow", "skipped", "tracking is off"))
    if cfg.env.address:
        checks.append(_run("ray", check_ray, cfg.env.address))
    else:
        checks.append(Check("ray", "skipped", "no env.address: a run starts its own local Ray when it needs one"))
    checks.append(_run("disk", check_disk, [cfg.data_root, tempfile.gettempdir()], min_free_mb))
    if sources and cfg.job is not None:
        checks.append(_run("sources", check_sources, cfg))
    else:
        checks.append(Check("sources", "skipped", "give +job=<name> year=<y> month=<m> to check the month's files"))
    return checks


def render(checks: Sequence[Check]) -> str:
    """One left-aligned line per check: name, status, detail."""
    rows = [("check", "status", "detail")] + [(c.name, c.status, c.detail) for c in checks]
    w = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]}" for r in rows]
    return "\n".join([lines[0], f"{'-' * w[0]}  {'-' * w[1]}  {'-' * 6}"] + lines[1:])


def _conf_dir() -> str:
    for candidate in (os.environ.get("LOADKIT_CONF"), str(Path(__file__).resolve().parent / "conf")):
        if candidate and os.path.isfile(os.path.join(candidate, "config.yaml")):
            return os.path.abspath(candidate)
    raise FileNotFoundError("cannot find conf/config.yaml (set LOADKIT_CONF)")


def compose_config(overrides: Sequence[str]) -> tuple:
    """The typed config for these overrides; year/month default to this month (then the
    sources check is skipped, since no month was named). Returns (config, month_named)."""
    import datetime

    from hydra import compose, initialize_config_dir

    from loadkit.config import register, to_config

    named = any(o.startswith("year=") for o in overrides) and any(o.startswith("month=") for o in overrides)
    today = datetime.date.today()
    extra = [] if named else [f"year={today.year}", f"month={today.month}"]
    register()
    with initialize_config_dir(config_dir=_conf_dir(), version_base="1.3"):
        composed = compose("config", overrides=[*overrides, *extra])
    if composed.get("job") is None:
        from omegaconf import OmegaConf

        from loadkit.config import LoadkitConfig

        cfg = OmegaConf.to_object(composed)  # no job: validate() would refuse it, health checks the rest
        assert isinstance(cfg, LoadkitConfig)
        return cfg, False
    return to_config(composed), named


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run every check and print the table; 0 when healthy, else 4 with the failed checks named."""
    import argparse

    p = argparse.ArgumentParser(prog="loadkit health", description=__doc__.splitlines()[0])
    p.add_argument("--min-free-mb", type=int, default=DEFAULT_MIN_FREE_MB,
                   help=f"free disk space required under data_root and the temp dir (default {DEFAULT_MIN_FREE_MB})")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for a run")
    args = p.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    from loadkit.errors import ConfigError

    try:
        cfg, named = compose_config(args.overrides)
    except ConfigError as exc:
        sys.stderr.write(f"loadkit health: config error: {exc}\n")
        return EXIT_CODES[Category.CONFIG]
    except Exception as exc:  # Hydra's own override errors
        sys.stderr.write(f"loadkit health: config error: {mask_text(str(exc)).splitlines()[0]}\n")
        return EXIT_CODES[Category.CONFIG]
    checks = check_health(cfg, args.min_free_mb, sources=named)
    sys.stdout.write(render(checks) + "\n")
    failed = [c.name for c in checks if c.failed]
    if failed:
        sys.stderr.write(f"unhealthy: {', '.join(failed)}\n")
        return EXIT_CODES[Category.TRANSIENT]
    return 0


# ``loadkit health`` (loadkit.cli picks these up).
CLI_HELP = "check PostgreSQL, the ledger, MLflow, Ray, disk and sources: loadkit health [overrides]"
cli_main = main


if __name__ == "__main__":
    raise SystemExit(main())
