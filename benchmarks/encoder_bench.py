"""The writers' binary COPY encoders side by side: ADBC against pgpq + psycopg 3 (``sink.copy_encoder``).

    python -m benchmarks.encoder_bench                           # 1M estabelecimentos (+0.8M empresas), 5 reps
    python -m benchmarks.encoder_bench --rows 100000 --reps 1    # a quick smoke run

Generates (or reuses) the CNPJ-like month of benchmarks/copy_bench.py, parses it once with loadkit's own
parse_chunk into the typed Arrow batches the writers receive (``batch.size`` rows each, ``_lk_batch`` added,
``_lk_row`` dropped as for append), then, ``--reps`` times, alternating which encoder goes first, COPYs every
batch of each table into fresh typed tables with ``postgres/copy.py``'s ``copy_arrow``, one transaction per
batch as the writer does. Measured per encoder and table: client CPU (this process's user + system time,
``resource.getrusage``: encoding and the driver's threads), server CPU (the backend's user + system time from
/proc via psutil), both per source row, and wall time. The machine is shared, so the CPU counters are the
figure of merit; medians over reps, with the 1-minute load average at each rep. The first rep checks both
encoders left identical tables (count and an order-independent hash of every row's text).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import psutil
import pyarrow as pa

from benchmarks.copy_bench import MEMBERS, OTHER_TABLES, OUT, ROOT, YEAR, MONTH, generate, log

ENCODERS = ("adbc", "pgpq")


@dataclass
class Prepared:
    name: str
    ddl: str  # column definitions of the typed target (modes' own DDL)
    batches: List[pa.Table]

    @property
    def rows(self) -> int:
        return sum(b.num_rows for b in self.batches)


def plan_tables(data_root: Path, dsn: str) -> Dict[str, Any]:
    """The monthly job's TableSpecs for the two benchmarked tables, composed as the CLI would."""
    from hydra import compose, initialize_config_dir

    from loadkit.config import register, to_config
    from loadkit.plan import build_plan

    overrides = ["+job=monthly", f"year={YEAR}", f"month={MONTH}", f"data_root={data_root}", f"sink.dsn={dsn}"]
    overrides += [f"job.tables.{t}.enabled=false" for t in OTHER_TABLES]
    for table, pattern in MEMBERS.items():
        overrides += [f'job.tables.{table}.source.paths=["{{year:04d}}-{{month:02d}}/{pattern}"]',
                      f"job.tables.{table}.source.format=csv", f"job.tables.{table}.source.member=null"]
    register()
    with initialize_config_dir(config_dir=str(ROOT / "loadkit" / "conf"), version_base="1.3"):
        plan = build_plan(to_config(compose("config", overrides=overrides)))
    return {t: plan.table(t) for t in MEMBERS}


def prepare(path: Path, table: Any, batch_rows: int) -> Prepared:
    """The file parsed into typed batches of about batch_rows rows each (outside any timing)."""
    from loadkit.plan import BATCH_COL, ROW_COL
    from loadkit.postgres.modes import mode_for
    from loadkit.transform import parse_chunk

    data = path.read_bytes()
    batches: List[pa.Table] = []
    start, line, rejected = 0, 1, 0
    while start < len(data):
        end = start
        for _ in range(batch_rows):  # batch_rows records (the generated month has no quoted newlines)
            nl = data.find(b"\n", end)
            if nl < 0:
                end = len(data)
                break
            end = nl + 1
        parsed = parse_chunk(table, data[start:end], line)
        rejected += parsed.rejects.num_rows
        rows = parsed.rows.drop_columns([ROW_COL])
        bid = len(batches) + 1
        batches.append(rows.append_column(BATCH_COL, pa.array([bid] * rows.num_rows, pa.int64())))
        line += parsed.rows_in + parsed.blank_lines
        start = end
    log(f"{table.name}: {sum(b.num_rows for b in batches):,} rows in {len(batches)} batches ({rejected} rejected)")
    return Prepared(table.name, mode_for(table).column_ddl(), batches)


def _psql(dsn: str, sql: str) -> List[tuple]:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_one(dsn: str, encoder_name: str, schema: str, prep: Prepared) -> Dict[str, float]:
    """COPY every batch of one table with one encoder, a transaction per batch; CPU and wall."""
    from loadkit.postgres.copy import encoder

    enc = encoder(encoder_name)
    _psql(dsn, f'TRUNCATE "{schema}"."{prep.name}"')
    conn = enc.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            backend = psutil.Process(int(cur.fetchall()[0][0]))
        conn.rollback()
        server0 = sum(backend.cpu_times()[:2])
        client0, wall0 = _cpu_self(), time.perf_counter()
        for batch in prep.batches:
            enc.copy_arrow(conn, schema, prep.name, batch)
            conn.commit()
        wall = time.perf_counter() - wall0
        client = _cpu_self() - client0
        server = sum(backend.cpu_times()[:2]) - server0
    finally:
        conn.close()
    n = prep.rows
    return {"client_us_row": client / n * 1e6, "server_us_row": server / n * 1e6,
            "cpu_us_row": (client + server) / n * 1e6, "wall_s": wall}


def table_digest(dsn: str, schema: str, table: str) -> Tuple[int, int]:
    """(rows, order-independent sum of hashtext(row text)): equal tables give equal digests."""
    (row,) = _psql(dsn, f'SELECT count(*), coalesce(sum(hashtext(r::text)::bigint), 0) FROM "{schema}"."{table}" r')
    return int(row[0]), int(row[1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.encoder_bench", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="estabelecimentos rows (empresas follow, 0.8x)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch-rows", type=int, default=50_000, help="rows per COPY transaction (batch.size)")
    p.add_argument("--dsn", default=os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test"))
    p.add_argument("--data", type=Path, default=Path("/tmp/loadkit-bench"), help="where generated months go")
    args = p.parse_args(argv)

    month = generate(args.data / f"rows{args.rows}", args.rows)
    specs = plan_tables(month.root, args.dsn)
    prepared = {t: prepare(month.files[t], specs[t], args.batch_rows) for t in MEMBERS}
    schemas = {e: f"bench_enc_{e}_{uuid.uuid4().hex[:6]}" for e in ENCODERS}
    for e, schema in schemas.items():
        _psql(args.dsn, f'CREATE SCHEMA "{schema}"; ' + "; ".join(
            f'CREATE TABLE "{schema}"."{t}" ({prep.ddl})' for t, prep in prepared.items()))
    samples: Dict[Tuple[str, str], List[Dict[str, float]]] = {(e, t): [] for e in ENCODERS for t in MEMBERS}
    loads: List[float] = []
    identical: Dict[str, bool] = {}
    try:
        for rep in range(args.reps):
            loads.append(os.getloadavg()[0])
            order = ENCODERS if rep % 2 == 0 else tuple(reversed(ENCODERS))
            for t, prep in prepared.items():
                for e in order:
                    samples[(e, t)].append(run_one(args.dsn, e, schemas[e], prep))
                if rep == 0:
                    digests = {e: table_digest(args.dsn, schemas[e], t) for e in ENCODERS}
                    identical[t] = len(set(digests.values())) == 1 and digests[ENCODERS[0]][0] == prep.rows
            log(f"rep {rep + 1}/{args.reps} (load average {loads[-1]:.2f}): " + ", ".join(
                f"{e} {t} {samples[(e, t)][-1]['cpu_us_row']:.2f} us/row" for t in MEMBERS for e in ENCODERS))
    finally:
        for schema in schemas.values():
            _psql(args.dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    results = []
    for (e, t), got in samples.items():
        med = {k: statistics.median(s[k] for s in got) for k in got[0]}
        results.append({"encoder": e, "table": t, "rows": prepared[t].rows, "reps": len(got), **med,
                        "cpu_us_row_min": min(s["cpu_us_row"] for s in got),
                        "cpu_us_row_max": max(s["cpu_us_row"] for s in got)})
    head = f"{'encoder':<6} {'table':<17} {'rows':>9} {'client us/row':>13} {'server us/row':>13} " \
           f"{'CPU us/row (min-max)':>22} {'wall s':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        cpu = f"{r['cpu_us_row']:.2f} ({r['cpu_us_row_min']:.2f}-{r['cpu_us_row_max']:.2f})"
        lines.append(f"{r['encoder']:<6} {r['table']:<17} {r['rows']:>9,} {r['client_us_row']:>13.2f} "
                     f"{r['server_us_row']:>13.2f} {cpu:>22} {r['wall_s']:>7.2f}")
    report = {"at": datetime.now().isoformat(timespec="seconds"), "rows": args.rows, "reps": args.reps,
              "batch_rows": args.batch_rows, "cpus": psutil.cpu_count(), "load_average_at_reps": loads,
              "identical_tables": identical, "results": results}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"encoder_bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print("\n".join(lines))
    print(f"identical tables (first rep): {identical}")
    print(f"load averages at each rep: {[round(x, 2) for x in loads]}")
    print(f"written {path.relative_to(ROOT)}")
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
