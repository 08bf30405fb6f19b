"""Merge whole-run wall: a first load and a force=true reload of the same month, before vs after, vs psql \\copy
and vs append (this checkout's append mode, first load only), all in one sitting.

    git archive <rev> | tar -x -C /tmp/merge-before
    PYTHONPATH=$PWD python -m benchmarks.merge_reload_wall 3            # 1M + 0.8M rows
    PYTHONPATH=$PWD python -m benchmarks.merge_reload_wall 3 4000000    # the 1.16 GB month (4M + 3.2M rows)

The monthly job's estabelecimentos + empresas (1M + 0.8M generated rows, or the second argument's estabelecimentos
rows + 0.8 times as many empresas) in mode merge without secondary indexes,
each side's CLI in its own checkout (its own monthly.yaml), fresh schemas per repetition, side order rotating
(before, after, append). Prints medians, the ratios to psql and to append, per-process CPU µs/row (driver,
postgres backends: benchmarks.procstat; what a shared machine's load changes least) and the load averages as JSON.
psql is sampled the same way (its "driver" is psql), so the sampler's own CPU (~2% of a core) burdens both sides.
"""
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import benchmarks.copy_bench as cb
from benchmarks.procstat import ProcSampler


def main() -> int:
    dsn = os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test")
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    month = cb.generate(Path(f"/tmp/merge-bench-wr/rows{size}"), size)
    sides = {"before": Path(os.environ.get("MERGE_BEFORE", "/tmp/merge-before")), "after": cb.ROOT}
    walls: dict = {f"{s}/{k}": [] for s in sides for k in ("first", "reload")}
    walls["append/first"] = []
    walls["psql"] = []
    cpu: dict = {k: [] for k in walls}
    rows = sum(month.rows.values())
    loads = []
    order = ["before", "after", "append"]
    for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        loads.append(round(os.getloadavg()[0], 2))
        ref = cb.psql_copy(month, dsn, procs=True)  # sampled like the loadkit runs: both pay the sampler
        walls["psql"].append(ref.wall_s)
        cpu["psql"].append({g: round(v / rows * 1e6, 3) for g, v in ref.extra["procs"]["cpu_s"].items()})
        for side in order[rep % 3:] + order[:rep % 3]:
            tag = uuid.uuid4().hex[:8]
            target, led = f"mrw_t_{tag}", f"mrw_l_{tag}"
            mode = "append" if side == "append" else "merge"
            overrides = [f"job.tables.{t}.enabled=false" for t in cb.OTHER_TABLES]
            for table, pattern in cb.MEMBERS.items():
                overrides += [f'job.tables.{table}.source.paths=["{{year:04d}}-{{month:02d}}/{pattern}"]',
                              f"job.tables.{table}.source.format=csv", f"job.tables.{table}.source.member=null",
                              f"job.tables.{table}.mode={mode}", f"job.tables.{table}.indexes=[]"]
            base = ["+job=monthly", f"year={cb.YEAR}", f"month={cb.MONTH}", f"data_root={month.root}",
                    f"sink.dsn={dsn}", f"job.schema={target}", f"sink.ledger_schema={led}", "tracking.enabled=false",
                    "env.progress_bars=false", *overrides]
            try:
                for kind, extra in (("first", []), ("reload", ["force=true"]))[:1 if side == "append" else 2]:
                    t0 = time.perf_counter()
                    p = subprocess.Popen([sys.executable, "-m", "loadkit", *base, *extra], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, cwd=sides.get(side, cb.ROOT))
                    sampler = ProcSampler(p.pid).start()
                    _, err = p.communicate()
                    walls[f"{side}/{kind}"].append(time.perf_counter() - t0)
                    stats = sampler.stop()
                    assert p.returncode == 0, err[-2000:]
                    cpu[f"{side}/{kind}"].append({g: round(v / rows * 1e6, 3) for g, v in stats.cpu_s.items()})
                    cb.log(f"rep {rep + 1} {side}/{kind}: {walls[f'{side}/{kind}'][-1]:.1f} s, CPU µs/row "
                           f"{cpu[f'{side}/{kind}'][-1]} (load {os.getloadavg()[0]:.2f})")
            finally:
                cb._psql(dsn, f'DROP SCHEMA IF EXISTS "{target}" CASCADE; '
                              f'DROP SCHEMA IF EXISTS "{target}__lk_stage" CASCADE; '
                              f'DROP SCHEMA IF EXISTS "{led}" CASCADE')
        loads.append(round(os.getloadavg()[0], 2))
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(json.dumps({"walls_s": walls, "median_s": med, "x_psql": {k: med["psql"] / v for k, v in med.items()},
                      "x_append": {k: med["append/first"] / v for k, v in med.items()},
                      "cpu_us_per_row_median": {k: {g: statistics.median(r.get(g, 0.0) for r in v) for g in v[0]}
                                                for k, v in cpu.items() if v},
                      "rows": rows,
                      "load_averages": loads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
