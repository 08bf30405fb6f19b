"""Peers timed in the same sitting as psql \\copy and loadkit: two-stream psql, dlt and pgloader.

Each function loads the benchmark month's raw files (``benchmarks.copy_bench.Month``) into a
fresh schema, checks the row count it reached, drops the schema, and returns a ``Sample``.

- ``psql-key`` (``copy_bench.psql_copy(key_index=True)``): one psql \\copy stream, then a btree on each
  table's key columns in the same session -- the floor of a keyed first load (merge's) with PostgreSQL's tools.
- ``psql_two_streams``: the month cut in two halves at record boundaries (cached beside the
  files), two psql ``\\copy`` processes at once into all-text tables — the 2-core ceiling for text.
- ``dlt_load``: dlt 1.x in its own virtualenv (created on first use with pip; its dependencies
  never enter loadkit's environment), Arrow record batches in, COPY (``loader_file_format=csv``,
  its fastest PostgreSQL path) or its default (INSERT statements). Text columns, as psql's.
- ``pgloader_load``: Debian's pgloader, ``LOAD CSV`` into the same typed tables loadkit creates
  (DDL from loadkit's own plan), with the monthly job's NULL markers, date placeholders and decimal
  comma expressed as pgloader transforms. Rows PostgreSQL refuses (impossible dates, which loadkit
  turns into NULL by ``on_invalid: null``) are pgloader's rejects and are reported, not hidden.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.copy_bench import MEMBERS, MONTH, ROOT, WIDTH, YEAR, Month, Sample, _psql, log, psql_copy

DLT_VERSION = "1.31.0"
DLT_VENV = Path(os.environ.get("LOADKIT_BENCH_DLT_VENV", "/tmp/loadkit-bench/dlt-venv"))


# ---------------------------------------------------------------- two-stream psql


def _split_point(path: Path, width: int) -> int:
    """A byte offset near the middle of ``path`` where a record starts (checked by parsing 200 records)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(size // 2)
        window = fh.read(4 << 20)
    pos = 0
    while True:
        nl = window.find(b"\n", pos)
        if nl < 0:
            raise RuntimeError(f"no record boundary found near the middle of {path}")
        sample = window[nl + 1: nl + 1 + (1 << 18)].decode("latin-1")
        rows = list(csv.reader(io.StringIO(sample), delimiter=";"))[:200]
        if rows and all(len(r) == width for r in rows[:-1]):
            return size // 2 + nl + 1
        pos = nl + 1


def halves(month: Month) -> Dict[str, Tuple[Path, Path]]:
    """Each file cut in two at a record boundary, written once beside the month and reused."""
    out: Dict[str, Tuple[Path, Path]] = {}
    for table, path in month.files.items():
        a, b = path.with_name(path.name + ".half1"), path.with_name(path.name + ".half2")
        if not (a.exists() and b.exists()):
            cut = _split_point(path, WIDTH[table])
            with open(path, "rb") as src, open(a, "wb") as fa, open(b, "wb") as fb:
                left = cut
                while left:
                    block = src.read(min(left, 16 << 20))
                    fa.write(block)
                    left -= len(block)
                shutil.copyfileobj(src, fb, 16 << 20)
        out[table] = (a, b)
    return out


def psql_two_streams(month: Month, dsn: str) -> Sample:
    """Two psql \\copy processes at once, each loading one half of every file into all-text tables."""
    parts = halves(month)
    schema = f"bench_ref2_{uuid.uuid4().hex[:8]}"
    ddl = [f'CREATE SCHEMA "{schema}"']
    for table, width in WIDTH.items():
        ddl.append(f'CREATE TABLE "{schema}".{table} ({", ".join(f"c{i} text" for i in range(1, width + 1))})')
    _psql(dsn, "; ".join(ddl))
    try:
        procs = []
        started = time.perf_counter()
        for half in (0, 1):
            args: List[str] = []
            for table in WIDTH:
                args += ["-c", f"\\copy \"{schema}\".{table} FROM '{parts[table][half]}' "
                               "WITH (FORMAT csv, DELIMITER ';', ENCODING 'LATIN1')"]
            procs.append(subprocess.Popen(["psql", dsn, "-q", "-v", "ON_ERROR_STOP=1", *args]))
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError("a psql stream failed")
        wall = time.perf_counter() - started
        _check_rows(dsn, schema, month)
        return Sample(wall)
    finally:
        _psql(dsn, f'DROP SCHEMA "{schema}" CASCADE')


# ---------------------------------------------------------------- dlt


def ensure_dlt() -> Path:
    """dlt's own virtualenv (pinned version); created with pip on first use."""
    python = DLT_VENV / "bin" / "python"
    if not python.exists():
        log(f"creating {DLT_VENV} with dlt[postgres,parquet]=={DLT_VERSION}")
        subprocess.run([sys.executable, "-m", "venv", str(DLT_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"dlt[postgres,parquet]=={DLT_VERSION}"],
                       check=True)
    return python


def dlt_load(month: Month, dsn: str, file_format: str) -> Sample:
    """dlt in its own interpreter: ``file_format`` 'csv' (COPY) or 'default' (dlt's own choice)."""
    python = ensure_dlt()
    schema = f"bench_dlt_{uuid.uuid4().hex[:8]}"
    cmd = [str(python), str(ROOT / "benchmarks" / "peer_dlt.py"), "--dsn", dsn, "--schema", schema,
           "--format", file_format, *[f"--width={t}={w}" for t, w in WIDTH.items()],
           *[f"{t}={p}" for t, p in month.files.items()]]
    try:
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp")
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"dlt failed:\n{proc.stderr[-3000:]}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if report["rows"] != month.rows:
            raise RuntimeError(f"dlt loaded {report['rows']}, expected {month.rows}")
        return Sample(wall, extra={k: report[k] for k in ("extract_s", "normalize_s", "load_s")})
    finally:
        _psql(dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE; DROP SCHEMA IF EXISTS "{schema}_staging" CASCADE')
        shutil.rmtree(f"/tmp/dlt-pipelines-{schema}", ignore_errors=True)


# ---------------------------------------------------------------- pgloader


def _typed_tables() -> Dict[str, Any]:
    """The monthly job's TableSpecs for the benchmarked tables, from loadkit's own plan."""
    from hydra import compose, initialize_config_dir

    from loadkit.config import register, to_config
    from loadkit.plan import build_plan

    register()
    with initialize_config_dir(config_dir=str(ROOT / "loadkit" / "conf"), version_base="1.3"):
        cfg = to_config(compose("config", overrides=["+job=monthly", f"year={YEAR}", f"month={MONTH}",
                                                      "data_root=/tmp"]))
    specs = {}
    assert cfg.job is not None
    for name in list(cfg.job.tables):
        if name not in MEMBERS:
            del cfg.job.tables[name]
    for name, t in cfg.job.tables.items():
        t.source.paths = ["*"]  # files are not resolved here; only the column specs are used
    try:
        plan = build_plan(cfg)
    except Exception:  # plan refuses an empty match on some versions: build the specs directly
        from loadkit.plan import _table_spec  # type: ignore[attr-defined]

        return {n: _table_spec(n, t, cfg.job.schema, Path("/tmp"), YEAR, MONTH) for n, t in cfg.job.tables.items()}
    for t in plan.tables:
        specs[t.name] = t
    return specs


def _lisp_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pgloader_command(path: Path, dsn: str, schema: str, spec: Any) -> str:
    fields, targets = [], []
    for c in spec.columns:
        fields.append(f"{c.name} [null if blanks]")
        nulls = [v for v in c.null_values if v]
        expr = c.name
        if c.decimal_comma:
            # thousands dots out, decimal comma to a point (pgloader's reader has no #\\ literals)
            expr = f'(substitute (char "." 0) (char "," 0) (remove (char "." 0) {expr}))'
        if nulls:
            tests = " ".join(f"(string= {c.name} {_lisp_string(v)})" for v in nulls)
            expr = f"(if (or {tests}) nil {expr})"
        # the table exists already (typed, from loadkit's plan): target columns name no type
        targets.append(c.name if expr == c.name else f"{c.name} text using (when {c.name} {expr})")
    return (f"LOAD CSV FROM '{path}' WITH ENCODING latin1 ({', '.join(fields)})\n"
            f"  INTO {dsn}\n  TARGET TABLE \"{schema}\".\"{spec.name}\"\n  ({', '.join(targets)})\n"
            "  WITH fields terminated by ';', fields optionally enclosed by '\"', fields escaped by double-quote,\n"
            "       batch rows = 25000, workers = 2, concurrency = 1\n  SET work_mem to '64MB';\n")


def pgloader_load(month: Month, dsn: str) -> Sample:
    """pgloader LOAD CSV into the typed tables loadkit would create (no key, no index)."""
    if not shutil.which("pgloader"):
        raise RuntimeError("pgloader is not installed (Debian: apt-get install pgloader)")
    specs = _typed_tables()
    schema = f"bench_pgl_{uuid.uuid4().hex[:8]}"
    ddl = [f'CREATE SCHEMA "{schema}"']
    for table in MEMBERS:
        cols = ", ".join(f'"{c.name}" {c.sql_type}' for c in specs[table].columns)
        ddl.append(f'CREATE TABLE "{schema}"."{table}" ({cols})')
    _psql(dsn, "; ".join(ddl))
    workdir = Path(f"/tmp/loadkit-bench/pgloader-{schema}")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        wall = 0.0
        loaded: Dict[str, int] = {}
        for table, path in month.files.items():
            cmd_file = workdir / f"{table}.load"
            cmd_file.write_text(_pgloader_command(path, _pgloader_dsn(dsn), schema, specs[table]))
            started = time.perf_counter()
            proc = subprocess.run(["pgloader", "--root-dir", str(workdir), str(cmd_file)],
                                  capture_output=True, text=True)
            wall += time.perf_counter() - started
            if proc.returncode != 0:
                raise RuntimeError(f"pgloader failed on {table}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            loaded[table] = _count(dsn, schema, table)
        rejected = {t: month.rows[t] - n for t, n in loaded.items()}
        return Sample(wall, extra={"loaded": loaded, "rejected_by_postgresql": rejected})
    finally:
        _psql(dsn, f'DROP SCHEMA "{schema}" CASCADE')
        if not os.environ.get("LOADKIT_BENCH_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


def _pgloader_dsn(dsn: str) -> str:
    """pgloader wants postgresql://user@host:port/db (it does not read libpq key=value strings)."""
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise RuntimeError("pgloader needs a URL-style DSN")
    return dsn


# ---------------------------------------------------------------- checks


def _count(dsn: str, schema: str, table: str) -> int:
    out = subprocess.run(["psql", dsn, "-At", "-c", f'SELECT count(*) FROM "{schema}"."{table}"'],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def _check_rows(dsn: str, schema: str, month: Month) -> None:
    got = {t: _count(dsn, schema, t) for t in WIDTH}
    if got != month.rows:
        raise RuntimeError(f"loaded {got}, expected {month.rows}")


PEERS = {
    "psql2": ("psql \\copy x2 streams", psql_two_streams),
    "psql-key": ("psql \\copy + key index", lambda m, d: psql_copy(m, d, key_index=True)),
    "dlt": ("dlt csv/COPY (text)", lambda m, d: dlt_load(m, d, "csv")),
    "dlt-default": ("dlt default (text)", lambda m, d: dlt_load(m, d, "default")),
    "pgloader": ("pgloader (typed)", pgloader_load),
}


def run_peer(key: str, month: Month, dsn: str) -> Optional[Sample]:
    """One repetition of one peer; a peer that cannot run here is logged and returns None."""
    try:
        return PEERS[key][1](month, dsn)
    except Exception as exc:  # a missing peer must not void the whole sitting; it is reported in the output
        log(f"peer {key} failed: {exc}")
        return None
