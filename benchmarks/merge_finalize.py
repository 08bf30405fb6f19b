"""Merge finalisation CPU per row: the PostgreSQL backend's CPU (psutil on pg_backend_pid) while
``Merge.finalize`` publishes a staged month, before (the ON CONFLICT upsert loadkit used up to 658d365)
vs after (this checkout), alternated, medians.

    python -m benchmarks.merge_finalize --rows 1000000 --reps 5

Stages estabelecimentos once (the monthly job through loadkit, its finalisation stopped so staging and
ledger stay), then per repetition, each variant in its own transaction that is ROLLED BACK (the target
returns to its state; VACUUM in between, not timed):
- first:  finalize into the empty target (as created by the job: PK present);
- reload: finalize into a second target already holding the same month (committed once, same batch ids:
          an unchanged month reloaded).
Variants: ``before`` (the old upsert), ``after`` (Merge.finalize: a first load swaps the direct staging in),
``hinted`` (Merge.finalize with the duplicate-key hints an in-process run passes: the repeated keys),
``insert`` (Merge.finalize with the swap refused: the insert path of aca0e3b), ``upsert`` (Merge.finalize
without the reload's read-only comparison: the upsert of aca0e3b), ``verified`` (verify_staging,
then Merge.finalize: the whole publishing transaction's work), ``merge`` (for reference: PG15 MERGE with the
same IS DISTINCT FROM condition, no counts). Parallel query and parallel index builds are off
in the timed session (max_parallel_*=0) so one process holds all the CPU; production may use them.
Prints JSON: per variant and scenario the CPU µs/row and wall seconds (medians), the load averages.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import psutil
import psycopg2

import benchmarks.copy_bench as cb
from loadkit.plan import build_plan
from loadkit.postgres.ledger import Ledger
from loadkit.postgres.modes import Merge, Published, _cols, mode_for, record_steps
from loadkit.security import qualified, quote_ident

TABLE = "estabelecimentos"


def before_finalize(mode: Merge, cur: Any, ledger: Ledger) -> Published:
    """Merge.finalize as of 658d365: one INSERT ... ON CONFLICT DO UPDATE of every staged key."""
    table = mode.table
    names = mode.published_names()
    target = qualified(table.schema, table.name)
    updates = ", ".join(f"{quote_ident(n)} = EXCLUDED.{quote_ident(n)}" for n in names if n not in table.key)
    cur.execute(
        f"WITH up AS (INSERT INTO {target} ({_cols(names)}) {mode._dedup_select(ledger)} "
        f"ON CONFLICT ({_cols(table.key)}) DO UPDATE SET {updates} RETURNING (xmax = 0) AS inserted) "
        "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up")
    inserted, updated = cur.fetchone()
    cur.execute(f"DROP TABLE {qualified(table.load_schema, table.load_table)}")
    mode._create_indexes(cur, table.name)
    cur.execute(f"ANALYZE {target}")
    return Published(int(inserted), int(updated))


def merge_finalize(mode: Merge, cur: Any, ledger: Ledger) -> Published:
    """Reference: PG15 MERGE with the after-side's change condition (rowcount only: no insert/update split)."""
    table = mode.table
    names = mode.published_names()
    target = qualified(table.schema, table.name)
    rest = [n for n in names if n not in table.key]
    on = " AND ".join(f"t.{quote_ident(k)} = d.{quote_ident(k)}" for k in table.key)
    cur.execute(f"MERGE INTO {target} t USING ({mode._dedup_select(ledger)}) d ON {on} "
                f"WHEN MATCHED AND {mode._changed_sql(names)} THEN UPDATE SET "
                + ", ".join(f"{quote_ident(n)} = d.{quote_ident(n)}" for n in rest)
                + f" WHEN NOT MATCHED THEN INSERT ({_cols(names)}) VALUES ("
                + ", ".join(f"d.{quote_ident(n)}" for n in names) + ")")
    written = cur.rowcount
    cur.execute(f"DROP TABLE {qualified(table.load_schema, table.load_table)}")
    mode._create_indexes(cur, table.name)
    cur.execute(f"ANALYZE {target}")
    return Published(None, written)


def insert_finalize(mode: Merge, cur: Any, ledger: Ledger) -> Published:
    """Merge.finalize with the swap refused: a first load inserts from staging (the path up to aca0e3b)."""
    refused = type(mode)._swap_refusal
    type(mode)._swap_refusal = lambda self, cur: "benchmark: the insert path"  # type: ignore[method-assign]
    try:
        return mode.finalize(cur, ledger)
    finally:
        type(mode)._swap_refusal = refused  # type: ignore[method-assign]


def verified_finalize(mode: Merge, cur: Any, ledger: Ledger) -> Published:
    """What the sink runs in the publishing transaction: verify_staging (per-batch counts), then finalize."""
    lost = mode.verify_staging(cur, ledger, PERIOD)
    assert not lost, lost
    return mode.finalize(cur, ledger)


def upsert_finalize(mode: Merge, cur: Any, ledger: Ledger) -> Published:
    """Merge.finalize with the reload's read-only comparison skipped: a reload upserts at once (aca0e3b)."""
    likely = type(mode)._same_batches_likely
    type(mode)._same_batches_likely = lambda self, cur: False  # type: ignore[method-assign]
    try:
        return mode.finalize(cur, ledger)
    finally:
        type(mode)._same_batches_likely = likely  # type: ignore[method-assign]


# The repeated keys of the staged month (pyarrow table), found before any timing: what a real run's in-process
# writers hand the publish as duplicate-key hints (loadkit.postgres.keyhints), computed here on the server.
REPEATED: Dict[str, Any] = {}


def hinted_finalize(mode: Merge, cur: Any, ledger: Ledger) -> Published:
    """Merge.finalize with the duplicate-key hints of an in-process run (the keys that repeat): a first load
    deletes losers among their rows only and builds the key once; a reload compares staging without
    deduplicating it. The client's hashing is not in this figure (benchmarks.merge_reload_wall has it)."""
    mode.key_candidates = REPEATED[mode.table.name]
    try:
        return mode.finalize(cur, ledger)
    finally:
        mode.key_candidates = None


VARIANTS: Dict[str, Callable[[Merge, Any, Ledger], Published]] = {
    "hinted": hinted_finalize,
    "before": before_finalize, "after": lambda m, c, led: m.finalize(c, led), "merge": merge_finalize,
    "insert": insert_finalize, "verified": verified_finalize, "upsert": upsert_finalize}
PERIOD = f"{cb.YEAR:04d}-{cb.MONTH:02d}"


def stage(month: cb.Month, dsn: str, target: str, led: str) -> None:
    """Run the monthly job on estabelecimentos into ``target`` with its finalisation stopped: the batches
    stay staged and ledgered (the run fails on purpose)."""
    from loadkit.runner import run_job
    from tests.helpers import compose

    def stop(self: Merge, cur: Any, ledger: Ledger) -> Published:
        raise RuntimeError("benchmark: finalisation stopped, staging kept")

    original = Merge.finalize
    Merge.finalize = stop  # type: ignore[method-assign]
    try:
        run_job(compose(overrides(month, dsn, target, led)))
    finally:
        Merge.finalize = original  # type: ignore[method-assign]


def overrides(month: cb.Month, dsn: str, target: str, led: str) -> List[str]:
    pattern = cb.MEMBERS[TABLE]
    return ["+job=monthly", f"year={cb.YEAR}", f"month={cb.MONTH}", f"data_root={month.root}", f"sink.dsn={dsn}",
            f"job.schema={target}", f"sink.ledger_schema={led}", "tracking.enabled=false",
            "env.progress_bars=false", "env.executor=inprocess",
            *[f"job.tables.{t}.enabled=false" for t in (*cb.OTHER_TABLES, "empresas")],
            f'job.tables.{TABLE}.source.paths=["{{year:04d}}-{{month:02d}}/{pattern}"]',
            f"job.tables.{TABLE}.source.format=csv", f"job.tables.{TABLE}.source.member=null",
            f"job.tables.{TABLE}.delete_missing=false"]


def backend_cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def timed(dsn: str, mode: Merge, ledger: Ledger, variant: str, settings: Sequence[str] = ()) -> Dict[str, Any]:
    """One finalisation in a transaction that is rolled back: backend CPU seconds and wall seconds."""
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        cur.execute("SET max_parallel_workers_per_gather = 0; SET max_parallel_maintenance_workers = 0")
        base, *own = variant.split("@")  # "after@work_mem=64MB": that variant with a setting of its own
        for setting in [*settings, *own]:  # e.g. work_mem=64MB
            name, _, value = setting.partition("=")
            cur.execute("SELECT set_config(%s, %s, false)", (name, value))
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
        cpu0, wall0 = backend_cpu(pid), time.perf_counter()
        with record_steps() as steps:
            published = VARIANTS[base](mode, cur, ledger)
        wall, cpu = time.perf_counter() - wall0, backend_cpu(pid) - cpu0
        conn.rollback()
    finally:
        conn.close()
    return {"cpu_s": cpu, "wall_s": wall, "published": list(published),  # type: ignore[dict-item]
            "steps": {k: round(v, 2) for k, v in steps.items()}}


def vacuum(dsn: str, *tables: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        for t in tables:
            conn.cursor().execute(f"VACUUM {t}")
    finally:
        conn.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.merge_finalize", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="estabelecimentos rows of the generated month")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--variants", default="before,after,merge",
                   help="before, after, hinted, merge, insert, verified, upsert; NAME@setting=value runs NAME with "
                        "a session setting of its own")
    p.add_argument("--scenarios", default="first,reload")
    p.add_argument("--pg-set", action="append", default=[], help="a setting of the timed session, e.g. work_mem=64MB")
    p.add_argument("--unique", action="store_true",
                   help="delete the duplicate keys' losers from staging first (a month with no duplicate key)")
    p.add_argument("--dsn", default=os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test"))
    p.add_argument("--data", type=Path, default=Path("/tmp/loadkit-bench"))
    args = p.parse_args(argv)
    month = cb.generate(args.data / f"rows{args.rows}", args.rows)
    tag = uuid.uuid4().hex[:8]
    first_schema, reload_schema, led = f"mfb_a_{tag}", f"mfb_b_{tag}", f"mfb_l_{tag}"
    variants = args.variants.split(",")
    scenarios = args.scenarios.split(",")
    try:
        stage(month, args.dsn, first_schema, led)
        plan = build_plan(__import__("tests.helpers", fromlist=["compose"]).compose(
            overrides(month, args.dsn, first_schema, led)))
        spec = plan.table(TABLE)
        ledger = Ledger(led)
        if args.unique:  # staging without duplicate keys (the ledger's counts then differ: no verify variant)
            conn = psycopg2.connect(args.dsn)
            with conn, conn.cursor() as cur:
                stage_t = qualified(spec.load_schema, spec.load_table)
                key = _cols(spec.key)
                cur.execute(f"DELETE FROM {stage_t} WHERE ctid IN (SELECT id FROM (SELECT s.ctid AS id, row_number() "
                            f"OVER (PARTITION BY {key} ORDER BY b.file_ordinal DESC, b.start_offset DESC, "
                            f"s._lk_row DESC) AS rn FROM {stage_t} s JOIN {ledger.batch} b "
                            "ON b.batch_id = s._lk_batch) r WHERE r.rn > 1)")
            conn.close()
        conn = psycopg2.connect(args.dsn)
        with conn, conn.cursor() as cur:
            key = _cols(spec.key)
            cur.execute(f"SELECT {key} FROM {qualified(spec.load_schema, spec.load_table)} GROUP BY {key} "
                        "HAVING count(*) > 1")
            found = cur.fetchall()
        conn.close()
        import pyarrow as pa

        REPEATED[spec.name] = pa.table({k: pa.array([r[i] for r in found], pa.string())
                                        for i, k in enumerate(spec.key)})
        modes = {"first": mode_for(spec), "reload": mode_for(dataclasses.replace(spec, schema=reload_schema))}
        rb = modes["reload"].table
        conn = psycopg2.connect(args.dsn)
        with conn, conn.cursor() as cur:  # the reload target: the same month, published and committed
            cur.execute(f"SELECT count(*) FROM {qualified(spec.load_schema, spec.load_table)}")
            staged = int(cur.fetchone()[0])
            cur.execute(f"CREATE SCHEMA {quote_ident(reload_schema)}; CREATE SCHEMA {quote_ident(rb.load_schema)}")
            cur.execute(f"CREATE TABLE {qualified(rb.schema, rb.name)} "
                        f"(LIKE {qualified(spec.schema, spec.name)} INCLUDING ALL)")
            cur.execute(f"CREATE UNLOGGED TABLE {qualified(rb.load_schema, rb.load_table)} AS "
                        f"SELECT * FROM {qualified(spec.load_schema, spec.load_table)}")
            cur.execute(f"INSERT INTO {qualified(rb.schema, rb.name)} ({_cols(modes['reload'].published_names())}) "
                        f"{modes['reload']._dedup_select(ledger)}")
            distinct = cur.rowcount
            modes["reload"]._create_indexes(cur, rb.name)
        conn.close()
        vacuum(args.dsn, qualified(rb.schema, rb.name))
        cpu: Dict[str, List[float]] = {f"{s}/{v}": [] for s in scenarios for v in variants}
        wall: Dict[str, List[float]] = {k: [] for k in cpu}
        counts: Dict[str, Any] = {}
        loads = []
        for rep in range(args.reps):
            loads.append(round(os.getloadavg()[0], 2))
            order = variants if rep % 2 == 0 else variants[::-1]
            for scenario in scenarios:
                for v in order:
                    m = modes[scenario]
                    r = timed(args.dsn, m, ledger, v, args.pg_set)  # type: ignore[arg-type]
                    vacuum(args.dsn, qualified(m.table.schema, m.table.name))
                    cpu[f"{scenario}/{v}"].append(r["cpu_s"])
                    wall[f"{scenario}/{v}"].append(r["wall_s"])
                    counts[f"{scenario}/{v}"] = r["published"]
                    cb.log(f"rep {rep + 1} {scenario}/{v}: cpu {r['cpu_s']:.2f} s, wall {r['wall_s']:.2f} s, "
                           f"published {r['published']}, steps (wall s) {r['steps']}")
        print(json.dumps({
            "rows_staged": staged, "distinct_keys": distinct, "reps": args.reps,
            "cpu_us_per_row_median": {k: round(statistics.median(v) / staged * 1e6, 2) for k, v in cpu.items()},
            "wall_s_median": {k: round(statistics.median(v), 2) for k, v in wall.items()},
            "cpu_s": cpu, "published": counts, "pg_settings": args.pg_set, "load_averages": loads}, indent=1))
    finally:
        cb._psql(args.dsn, "; ".join(f'DROP SCHEMA IF EXISTS "{s}" CASCADE' for s in (
            first_schema, f"{first_schema}__lk_stage", reload_schema, f"{reload_schema}__lk_stage", led)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
