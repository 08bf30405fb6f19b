"""psql \\copy against the monthly job's first load (merge into an empty target, and append), walls only, unsampled.
A fourth side, ``psql+key``, is psql \\copy followed by a btree on each table's key columns (copy_bench.psql_copy's
``key_index``): the floor of a keyed first load with PostgreSQL's own tools, beside which merge's first load
is compared too (``x_psql_key``).

    PYTHONPATH=. python -m benchmarks.first_load_walls 7             # 7 reps, the 1.16 GB month (4M + 3.2M rows)
    PYTHONPATH=. python -m benchmarks.first_load_walls 3 1000000     # 3 reps, 1M estabelecimentos + 0.8M empresas

No process is sampled on either side (merge_reload_wall samples both for CPU per row; a sampler is a thread
of this process competing for the same 2 cores), so the walls compare as they are. Sides rotate each rep
(psql, merge, append, psql+key, then merge, append, psql+key, psql, ...); fresh schemas per run. Prints as
JSON: medians, the ratios of the medians to psql's and to psql+key's, each rep's ratios to that rep's psql,
and the load average before each rep.
"""
import json
import os
import statistics
import sys
from pathlib import Path

import benchmarks.copy_bench as cb


def main() -> int:
    dsn = os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test")
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 4_000_000
    month = cb.generate(Path(f"/tmp/merge-bench-wr/rows{size}"), size)
    sides = ["psql", "merge", "append", "psql+key"]
    walls: dict = {s: [] for s in sides}
    loads = []
    for rep in range(reps):
        loads.append(round(os.getloadavg()[0], 2))
        for side in sides[rep % len(sides):] + sides[:rep % len(sides)]:
            if side.startswith("psql"):
                wall = cb.psql_copy(month, dsn, key_index=side == "psql+key").wall_s
            else:
                wall = cb.loadkit_cli(month, dsn, side, "sqlite:////dev/null", ["tracking.enabled=false"]).wall_s
            walls[side].append(wall)
            cb.log(f"rep {rep + 1} {side}: {wall:.1f} s (load {os.getloadavg()[0]:.2f})")
    med = {k: statistics.median(v) for k, v in walls.items()}
    per_rep = {k: [round(p / w, 3) for p, w in zip(walls["psql"], v)] for k, v in walls.items()}
    print(json.dumps({"median_s": med, "x_psql": {k: round(med["psql"] / v, 3) for k, v in med.items()},
                      "x_psql_key": {k: round(med["psql+key"] / v, 3) for k, v in med.items()},
                      "per_rep_x_psql": per_rep,
                      "walls_s": walls, "rows": sum(month.rows.values()), "load_averages": loads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
