"""loadkit against psql \\copy (one and two streams), its peers dlt and pgloader, and pandas to_sql, on one month.

    python -m benchmarks.copy_bench                     # ~1 GB month (4M estabelecimentos), 3 reps each
    python -m benchmarks.copy_bench --rows 200000 --reps 1 --scaling ""   # a quick smoke run

Generates a CNPJ-like month of raw (unzipped) Estabelecimentos + Empresas members with
loadkit.examples.cnpj.sample, then alternates, ``--reps`` times each: psql \\copy into all-text tables, the monthly
job through the CLI (typed, validated, rejects + ledger on, fresh schemas per repetition) in
each ``--modes`` write mode (``append@ray`` forces the Ray executor; plain modes use the
default ``env.executor=auto``), pandas read_csv(chunksize) + to_sql on a subset, extrapolated, and the
``--peers`` of benchmarks/peers.py (two-stream psql, dlt's COPY and default loaders in dlt's own
virtualenv, Debian's pgloader into the typed tables); ``--slow-peers`` run on a smaller month, extrapolated.
Prints a table, writes it as JSON under benchmarks/out/ and records it as one MLflow run.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import psutil

from benchmarks.procstat import ProcSampler

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
YEAR, MONTH = 2024, 5
MEMBERS = {"estabelecimentos": "*ESTABELE", "empresas": "*EMPRECSV"}
WIDTH = {"estabelecimentos": 30, "empresas": 7}
OTHER_TABLES = ("socios", "simples", "cnaes", "motivos", "municipios", "naturezas", "paises", "qualificacoes")
_RAY_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s+INFO streaming_executor\.py:\d+ -- (.*)$")


@dataclass
class Month:
    root: Path
    files: Dict[str, Path]
    rows: Dict[str, int]

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


@dataclass
class Sample:
    """One timed repetition of one loader."""

    wall_s: float
    peak_rss: Optional[int] = None  # summed RSS of the driver + every Ray process (shared pages counted per process)
    peak_pss: Optional[int] = None  # summed PSS: shared pages (object store, libraries) counted once
    startup_s: Optional[float] = None  # process start -> pipeline start (imports, plan, ledger, ray.init)
    finish_s: Optional[float] = None  # pipeline end -> process end (finalize, MLflow artifacts)
    extrapolated_from: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- data


def generate(root: Path, rows: int) -> Month:
    """A raw month under root (reused when already there). NULs are dropped: PostgreSQL's COPY refuses them."""
    from loadkit.examples.cnpj.sample import generate_month

    stamp = root / "bench.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("rows") == rows:
        meta = json.loads(stamp.read_text())
        return Month(root, {t: Path(p) for t, p in meta["files"].items()}, meta["counts"])
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    manifest = generate_month(root, YEAR, MONTH, rows=rows, shards=1, seed=0, compress=False)
    folder = root / f"{YEAR:04d}-{MONTH:02d}"
    files: Dict[str, Path] = {}
    for table, pattern in MEMBERS.items():
        (path,) = folder.glob(pattern)
        _strip_nul(path)
        files[table] = path
    for other in folder.iterdir():  # only the two benchmarked tables stay on disk
        if other not in files.values():
            other.unlink()
    counts = {t: manifest.rows[t] for t in MEMBERS}
    stamp.write_text(json.dumps({"rows": rows, "files": {t: str(p) for t, p in files.items()}, "counts": counts}))
    log(f"generated {sum(counts.values()):,} rows, {sum(p.stat().st_size for p in files.values()) / 1e6:.0f} MB "
        f"in {time.perf_counter() - started:.0f} s under {root}")
    return Month(root, files, counts)


def _strip_nul(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        while block := src.read(16 << 20):
            dst.write(block.replace(b"\x00", b""))
    tmp.replace(path)


# ---------------------------------------------------------------- loaders


# The monthly job's key columns by position in the all-text reference tables (c1 = cnpj_basico, ...).
KEY_COLUMNS = {"estabelecimentos": ("c1", "c2", "c3"), "empresas": ("c1",)}


def psql_copy(month: Month, dsn: str, procs: bool = False, key_index: bool = False) -> Sample:
    """psql \\copy of each raw file into an all-text, index-free, logged table (one stream).

    ``procs``: sample psql and its backend like a loadkit run (benchmarks.procstat) into ``extra["procs"]``,
    so a comparison whose loadkit side is sampled charges both sides the sampler's CPU.
    ``key_index``: after each file's copy, the same psql session builds a btree on the table's key columns
    (``KEY_COLUMNS``, ``COLLATE "C"`` as the monthly job declares them) -- the floor of a keyed first load with
    PostgreSQL's own tools: the copy, then the key's sort and index build. Not unique (the generated month
    repeats 1 key in 10,000, which a primary key would refuse) and no deduplication, typing or ledger, so it
    is a lower bound for merge's first load, not the same work."""
    schema = f"bench_ref_{uuid.uuid4().hex[:8]}"
    ddl = [f'CREATE SCHEMA "{schema}"']
    for table, width in WIDTH.items():
        cols = ", ".join(f"c{i} text" for i in range(1, width + 1))
        ddl.append(f'CREATE TABLE "{schema}".{table} ({cols})')
    _psql(dsn, "; ".join(ddl))
    try:
        args = []
        for table, path in month.files.items():
            args += ["-c", f"\\copy \"{schema}\".{table} FROM '{path}' "
                           "WITH (FORMAT csv, DELIMITER ';', ENCODING 'LATIN1')"]
            if key_index:
                cols = ", ".join(f'{c} COLLATE "C"' for c in KEY_COLUMNS[table])
                args += ["-c", f'CREATE INDEX ON "{schema}".{table} ({cols})']
        started = time.perf_counter()
        popen = subprocess.Popen(["psql", dsn, "-q", "-v", "ON_ERROR_STOP=1", *args])
        sampler = ProcSampler(popen.pid).start() if procs else None
        if popen.wait() != 0:
            raise subprocess.CalledProcessError(popen.returncode, popen.args)
        wall = time.perf_counter() - started
        stats = sampler.stop() if sampler else None
        return Sample(wall, extra={"procs": asdict(stats)} if stats else {})
    finally:
        _psql(dsn, f'DROP SCHEMA "{schema}" CASCADE')


def loadkit_cli(month: Month, dsn: str, mode: str, mlflow_uri: str, extra: Sequence[str], **kw: Any) -> Sample:
    """The monthly job through its CLI, restricted to the two raw tables, without secondary indexes.

    ``mode`` may name an executor too: ``append@ray`` is append mode with env.executor=ray."""
    mode, _, executor = mode.partition("@")
    overrides = [f"job.tables.{t}.enabled=false" for t in OTHER_TABLES]
    if executor:
        overrides.append(f"env.executor={executor}")
    for table, pattern in MEMBERS.items():
        overrides += [f'job.tables.{table}.source.paths=["{{year:04d}}-{{month:02d}}/{pattern}"]',
                      f"job.tables.{table}.source.format=csv", f"job.tables.{table}.source.member=null",
                      f"job.tables.{table}.mode={mode}", f"job.tables.{table}.indexes=[]"]
    return run_cli(month.root, dsn, mlflow_uri, [*overrides, *extra], **kw)


@functools.lru_cache(maxsize=1)
def compile_bytecode() -> bool:
    """Compile loadkit's modules to bytecode once, before the first timed run, as a regular install does.

    An editable install leaves that to the first import, which writes ``__pycache__`` -- unless
    PYTHONDONTWRITEBYTECODE is set (this machine's shell sets it, as many container images do): then every
    process compiled loadkit from source at each start, ~0.3-0.5 CPU-s per process, which the Ray path pays
    in the driver and in each loader actor (perf + py-spy of a Ray run, session 18: ``source_to_code`` under
    loadkit's imports in both workers). Python reads existing bytecode whatever that variable says, so both
    executors then measure loadkit rather than the compiler. Returns whether every module compiled."""
    import compileall

    return bool(compileall.compile_dir(str(ROOT / "loadkit"), quiet=1))


def run_cli(data_root: Path, dsn: str, mlflow_uri: str, extra: Sequence[str], procs: bool = False,
            prefix: Sequence[str] = (), env: Optional[Dict[str, str]] = None) -> Sample:
    """``python -m loadkit +job=monthly`` on fresh target and ledger schemas, dropped afterwards.

    ``procs``: sample per-process CPU and memory (benchmarks.procstat) into ``extra["procs"]``;
    ``prefix``: a command the CLI runs under (e.g. ``taskset -c 0``); ``env``: extra environment."""
    compile_bytecode()
    tag = uuid.uuid4().hex[:8]
    target, led = f"bench_t_{tag}", f"bench_l_{tag}"
    overrides = ["+job=monthly", f"year={YEAR}", f"month={MONTH}", f"data_root={data_root}", f"sink.dsn={dsn}",
                 f"job.schema={target}", f"sink.ledger_schema={led}", f"tracking.uri={mlflow_uri}",
                 "env.progress_bars=false", *extra]
    started_at = time.time()
    started = time.perf_counter()
    popen = subprocess.Popen([*prefix, sys.executable, "-m", "loadkit", *overrides], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    # Looked up every sample (not once a second): the executor comparison counts every Ray process's CPU,
    # short-lived ones included, and its figures are CPU per row, not wall against an unsampled reference.
    sampler = ProcSampler(popen.pid, discover_every=1).start() if procs else None
    stdout, stderr = popen.communicate()
    wall = time.perf_counter() - started
    stats = sampler.stop() if sampler else None
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"loadkit exited {proc.returncode}:\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}")
        tracked = "tracking.enabled=false" not in extra
        run_id = re.search(r"run id: (\w+)", proc.stdout) if tracked else None
        metrics = _run_metrics(mlflow_uri, run_id.group(1)) if run_id else {}
        pipe_start, pipe_end = _pipeline_span(proc.stderr)
        return Sample(wall, peak_rss=int(metrics.get("peak_rss_bytes", 0)) or None,
                      peak_pss=int(metrics.get("peak_pss_bytes", 0)) or None,
                      startup_s=pipe_start - started_at if pipe_start else None,
                      finish_s=started_at + wall - pipe_end if pipe_end else None,
                      extra={k: metrics[k] for k in ("rows_read", "rows_rejected", "backpressure_s", "driver_wait_s")
                             if k in metrics} | {"writers": _writers(mlflow_uri, run_id.group(1) if run_id else None)}
                      | ({"procs": asdict(stats)} if stats else {}))
    finally:
        _psql(dsn, f'DROP SCHEMA IF EXISTS "{target}" CASCADE; DROP SCHEMA IF EXISTS "{led}" CASCADE; '
                   f'DROP SCHEMA IF EXISTS "{target}__lk_stage" CASCADE')  # staged modes' schema beside the target


def pandas_to_sql(month: Month, dsn: str, subset_rows: int) -> Sample:
    """read_csv(chunksize) + to_sql of the first subset_rows of each file, extrapolated to the full month."""
    import pandas as pd
    from sqlalchemy import create_engine

    schema = f"bench_pd_{uuid.uuid4().hex[:8]}"
    engine = create_engine(dsn.replace("postgresql://", "postgresql+psycopg2://", 1))
    _psql(dsn, f'CREATE SCHEMA "{schema}"')
    try:
        done, started = 0, time.perf_counter()
        for table, path in month.files.items():
            n = min(subset_rows, month.rows[table])
            for chunk in pd.read_csv(path, sep=";", header=None, dtype=str, encoding="latin-1", keep_default_na=False,
                                     chunksize=10_000, nrows=n):
                chunk.to_sql(table, engine, schema=schema, if_exists="append", index=False)
            done += n
        elapsed = time.perf_counter() - started
        return Sample(elapsed * month.total_rows / done, extrapolated_from=done, extra={"measured_s": elapsed})
    finally:
        engine.dispose()
        _psql(dsn, f'DROP SCHEMA "{schema}" CASCADE')


def sample_month_size() -> Month:
    manifest = json.loads((ROOT / "data" / f"{YEAR:04d}-{MONTH:02d}" / "manifest.json").read_text())
    files = {p: ROOT / "data" / p for paths in manifest["files"].values() for p in paths}
    return Month(ROOT / "data", files, manifest["rows"])


# ---------------------------------------------------------------- helpers


def _psql(dsn: str, sql: str) -> None:
    subprocess.run(["psql", dsn, "-q", "-v", "ON_ERROR_STOP=1", "-c", sql], check=True, capture_output=True)


def _warm_store(uri: str) -> None:
    """Create/migrate the MLflow store once, outside the timed runs (no run is waited for)."""
    from loadkit.tracking import find_runs

    find_runs(uri)


def _run_metrics(uri: str, loadkit_run_id: str) -> Dict[str, float]:
    from loadkit.tracking import find_by_loadkit_run

    run = find_by_loadkit_run(uri, loadkit_run_id, wait_s=120)  # a CLI run's record is flushed in the background
    return dict(run.data.metrics) if run else {}


def _writers(uri: str, loadkit_run_id: Optional[str]) -> Dict[str, int]:
    """Committed batches per writer actor (from the run's batches.parquet artifact)."""
    import tempfile

    import pyarrow.parquet as pq

    from loadkit.tracking import download_artifact, find_by_loadkit_run

    run = find_by_loadkit_run(uri, loadkit_run_id, wait_s=120) if loadkit_run_id else None
    if run is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        rows = pq.read_table(download_artifact(uri, run.info.run_id, "batches.parquet", tmp)).to_pylist()
    out: Dict[str, int] = {}
    for r in rows:
        if r["kind"] == "data" and r["status"] == "committed":
            out[r["writer"]] = out.get(r["writer"], 0) + 1
    return out


def _pipeline_span(stderr: str) -> tuple:
    """Wall-clock times Ray Data started and finished the dataset, from its own log lines."""
    start = end = None
    for line in stderr.splitlines():
        m = _RAY_TS.match(line)
        if not m:
            continue
        ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if m.group(2).startswith("Starting execution") and start is None:
            start = ts
        elif "execution finished" in m.group(2):
            end = ts
    return start, end


def log(msg: str) -> None:
    sys.stderr.write(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def load_average() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- report


def summarise(name: str, samples: List[Sample], month: Month, reference: Optional[float],
              loadkit_median: Optional[float] = None) -> Dict[str, Any]:
    """Medians of one loader's reps; ratios are speed ratios (reference wall / this wall, > 1 = faster)."""
    walls = [s.wall_s for s in samples]
    med = statistics.median(walls)
    pick = lambda attr: [getattr(s, attr) for s in samples if getattr(s, attr) is not None]  # noqa: E731
    row: Dict[str, Any] = {
        "loader": name, "reps": len(samples), "wall_median_s": med, "wall_min_s": min(walls), "wall_max_s": max(walls),
        "rows_per_s": month.total_rows / med, "mb_per_s": month.bytes / 1e6 / med,
        "peak_rss_mb": max(pick("peak_rss")) / 2**20 if pick("peak_rss") else None,
        "peak_pss_mb": max(pick("peak_pss")) / 2**20 if pick("peak_pss") else None,
        "startup_s": statistics.median(pick("startup_s")) if pick("startup_s") else None,
        "finish_s": statistics.median(pick("finish_s")) if pick("finish_s") else None,
        "ratio_to_psql": reference / med if reference else None,
        "ratio_to_loadkit": loadkit_median / med if loadkit_median else None,
        "extrapolated_from_rows": samples[0].extrapolated_from,
        "samples": [asdict(s) for s in samples],
    }
    return row


def render(rows: List[Dict[str, Any]]) -> str:
    head = f"{'loader':<22} {'wall s median (min-max)':>24} {'rows/s':>10} {'MB/s':>7} {'peak RSS MB':>11} " \
           f"{'peak PSS MB':>11} " \
           f"{'startup s':>9} {'finish s':>8} {'x psql':>7} {'x loadkit':>9}"
    lines = [head, "-" * len(head)]
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for r in rows:
        wall = f"{r['wall_median_s']:.1f} ({r['wall_min_s']:.1f}-{r['wall_max_s']:.1f})"
        name = r["loader"] + (" *" if r["extrapolated_from_rows"] else "")
        lines.append(f"{name:<22} {wall:>24} {r['rows_per_s']:>10,.0f} {r['mb_per_s']:>7.1f} "
                     f"{fmt(r['peak_rss_mb'], '11.0f'):>11} {fmt(r['peak_pss_mb'], '11.0f'):>11} "
                     f"{fmt(r['startup_s'], '9.1f'):>9} "
                     f"{fmt(r['finish_s'], '8.1f'):>8} {fmt(r['ratio_to_psql'], '7.2f'):>7} "
                     f"{fmt(r.get('ratio_to_loadkit'), '9.2f'):>9}")
    if any(r["extrapolated_from_rows"] for r in rows):
        lines.append("* extrapolated linearly from a subset (rows in extrapolated_from_rows)")
    return "\n".join(lines)


def track(report: Dict[str, Any], uri: str) -> Optional[str]:
    """The benchmark as one MLflow run: parameters, one metric group per loader, the JSON as artifact."""
    from loadkit.tracking import RunTracker

    tracker = RunTracker(True, uri, "loadkit-benchmark")
    tracker.start("copy_bench", report["params"], {"kind": "benchmark"})
    for r in report["results"]:
        key = re.sub(r"[^A-Za-z0-9_.\-/]", "", r["loader"].replace(" ", "_"))
        tracker.metrics({f"{key}.{m}": r[m] for m in ("wall_median_s", "rows_per_s", "mb_per_s", "peak_rss_mb",
                                                       "peak_pss_mb", "startup_s", "finish_s", "ratio_to_psql",
                                                       "ratio_to_loadkit")
                         if r.get(m) is not None})
    for s in report.get("scaling", []):
        key = "scaling." + s["mode"].replace("@", "_")
        tracker.metrics({f"{key}.peak_rss_mb": s["peak_rss_mb"], f"{key}.peak_pss_mb": s["peak_pss_mb"]},
                        step=s["factor"])
    tracker.artifact_json("benchmark.json", report)
    tracker.end("succeeded")
    return tracker.run_id


# ---------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.copy_bench", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4_000_000, help="estabelecimentos rows (empresas follow, 0.8x)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--modes", default="append,merge,append@ray",
                   help="loadkit write modes to time (comma-separated; mode@executor forces env.executor)")
    p.add_argument("--pandas-rows", type=int, default=50_000, help="rows per file the pandas baseline loads")
    p.add_argument("--scaling", default="1,2,4", help="input multiples for the memory-scaling run ('' = skip)")
    p.add_argument("--scaling-rows", type=int, default=0, help="rows of the 1x scaling input (default: --rows)")
    p.add_argument("--scaling-modes", default="append,append@ray", help="loadkit modes of the memory-scaling run")
    p.add_argument("--dsn", default=os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test"))
    p.add_argument("--data", type=Path, default=Path("/tmp/loadkit-bench"), help="where generated months go")
    p.add_argument("--mlflow-uri", default=f"sqlite:///{OUT / 'mlflow.db'}")
    p.add_argument("--set", action="append", default=[], help="extra loadkit override, e.g. pool.writers=3")
    p.add_argument("--sample-reps", type=int, default=3, help="runs of the committed sample month (data/2024-05)")
    p.add_argument("--peers", default="psql2,psql-key,dlt,dlt-default,pgloader",
                   help="peers timed in the same reps (benchmarks/peers.py): psql2, psql-key, dlt, dlt-default, "
                        "pgloader")
    # 15-50x slower than psql on the whole month (dlt ~290 s, pgloader ~920 s per repetition, session 14): on a
    # tenth of it by default, so the README's command ends in ~25 minutes.
    p.add_argument("--slow-peers", default="dlt,dlt-default,pgloader",
                   help="peers run on a smaller generated month (--slow-peer-rows) and extrapolated")
    p.add_argument("--slow-peer-rows", type=int, default=0,
                   help="estabelecimentos rows for --slow-peers (default: a tenth of --rows)")
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]

    month = generate(args.data / f"rows{args.rows}", args.rows)
    _warm_store(args.mlflow_uri)  # creates/migrates the MLflow store outside the timed runs
    samples: Dict[str, List[Sample]] = {"psql \\copy (text)": []}
    samples.update({f"loadkit {m}": [] for m in modes})
    samples["pandas to_sql"] = []
    from benchmarks import peers as peer_mod

    peer_keys = [k for k in args.peers.split(",") if k]
    slow = {k for k in args.slow_peers.split(",") if k}
    slow_rows = args.slow_peer_rows or max(args.rows // 10, 1)
    small_month = generate(args.data / f"rows{slow_rows}", slow_rows) if slow & set(peer_keys) else None
    for k in peer_keys:
        samples[peer_mod.PEERS[k][0]] = []
    loads = []
    for rep in range(args.reps):
        loads.append(load_average())
        log(f"rep {rep + 1}/{args.reps} (load average {loads[-1]:.1f})")
        samples["psql \\copy (text)"].append(psql_copy(month, args.dsn))
        for m in modes:
            samples[f"loadkit {m}"].append(loadkit_cli(month, args.dsn, m, args.mlflow_uri, args.set))
        samples["pandas to_sql"].append(pandas_to_sql(month, args.dsn, args.pandas_rows))
        for k in peer_keys:
            on = small_month if (k in slow and small_month) else month
            got = peer_mod.run_peer(k, on, args.dsn)
            if got is not None and on is not month:  # extrapolated linearly to the full month, labelled
                got = Sample(got.wall_s * month.total_rows / on.total_rows, extrapolated_from=on.total_rows,
                             extra=got.extra | {"measured_s": got.wall_s})
            if got is not None:
                samples[peer_mod.PEERS[k][0]].append(got)
        log("  " + ", ".join(f"{k} {v[-1].wall_s:.1f}s" for k, v in samples.items()))
    reference = statistics.median(s.wall_s for s in samples["psql \\copy (text)"])
    samples = {k: v for k, v in samples.items() if v}  # a peer that could not run here is left out (logged)
    ours = samples.get(f"loadkit {modes[0]}") if modes else None
    ours_med = statistics.median(s.wall_s for s in ours) if ours else None
    results = [summarise(name, s, month, reference, ours_med) for name, s in samples.items()]
    small = [run_cli(ROOT / "data", args.dsn, args.mlflow_uri, args.set) for _ in range(args.sample_reps)]
    sample_month = summarise("sample month 2024-05", small, sample_month_size(), None) if small else None

    scaling = []
    for factor in [int(f) for f in args.scaling.split(",") if f]:
        rows = (args.scaling_rows or args.rows) * factor
        scaled = generate(args.data / f"rows{rows}", rows)
        for mode in [m for m in args.scaling_modes.split(",") if m]:
            s = loadkit_cli(scaled, args.dsn, mode, args.mlflow_uri, args.set)
            scaling.append({"factor": factor, "mode": mode, "input_mb": scaled.bytes / 1e6, "rows": scaled.total_rows,
                            "wall_s": s.wall_s, "peak_rss_mb": (s.peak_rss or 0) / 2**20,
                            "peak_pss_mb": (s.peak_pss or 0) / 2**20})
            log(f"scaling x{factor} {mode}: {scaled.bytes / 1e6:.0f} MB, {s.wall_s:.1f} s, "
                f"peak RSS {(s.peak_rss or 0) / 2**20:.0f} MB, PSS {(s.peak_pss or 0) / 2**20:.0f} MB")

    from loadkit.tracking import git_commit

    report = {
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params": {"rows": args.rows, "total_rows": month.total_rows, "input_mb": round(month.bytes / 1e6, 1),
                   "reps": args.reps, "modes": args.modes, "pandas_rows": args.pandas_rows, "overrides": args.set,
                   "cpus": psutil.cpu_count(), "git_commit": git_commit() or "unknown",
                   "load_average_at_reps": [round(x, 2) for x in loads]},
        "results": results, "sample_month": sample_month, "scaling": scaling,
    }
    report["mlflow_run_id"] = track(report, args.mlflow_uri)
    path = OUT / f"copy_bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(render(results + ([sample_month] if sample_month else [])))
    if scaling:
        print("memory scaling: " + ", ".join(f"{s['mode']} x{s['factor']} {s['input_mb']:.0f} MB -> "
                                             f"RSS {s['peak_rss_mb']:.0f} MB, PSS {s['peak_pss_mb']:.0f} MB"
                                             for s in scaling))
    print(f"load averages at each rep: {report['params']['load_average_at_reps']}")
    print(f"written {path.relative_to(ROOT)}; MLflow run {report['mlflow_run_id']} ({args.mlflow_uri})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
