"""loadkit append before vs after a change, alternated in one sitting, with psql \\copy as the reference.

    git worktree add --detach /tmp/lk-before <rev>
    python -m benchmarks.before_after --before /tmp/lk-before --rows 4000000 --reps 3
    python -m benchmarks.before_after --before /tmp/lk-before --set tracking.enabled=false   # the parse path only

Each repetition runs psql \\copy of the raw month, then both checkouts' CLI on it (their order alternates
between repetitions so neither always runs on a warmer cache), each on fresh schemas. The "after" side is
this checkout unless --after names another. Prints the medians, the speed ratio and the load averages as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import benchmarks.copy_bench as cb


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.before_after", description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="a checkout of the earlier commit (git worktree)")
    p.add_argument("--after", type=Path, default=cb.ROOT, help="the later checkout (default: this one)")
    p.add_argument("--rows", type=int, default=4_000_000, help="estabelecimentos rows (1.16 GB raw with 4M)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mode", default="append")
    p.add_argument("--set", action="append", default=[], help="extra override for both sides")
    p.add_argument("--dsn", default=os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test"))
    p.add_argument("--data", type=Path, default=Path("/tmp/loadkit-bench"))
    p.add_argument("--mlflow-uri", default=f"sqlite:///{cb.OUT / 'before_after.db'}")
    args = p.parse_args(argv)
    cb.OUT.mkdir(parents=True, exist_ok=True)
    month = cb.generate(args.data / f"rows{args.rows}", args.rows)
    cb._warm_store(args.mlflow_uri)
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    walls: Dict[str, List[float]] = {"psql": [], "before": [], "after": []}
    rss: Dict[str, List[int]] = {"before": [], "after": []}
    loads = []
    for rep in range(args.reps):
        loads.append(round(os.getloadavg()[0], 2))
        walls["psql"].append(cb.psql_copy(month, args.dsn).wall_s)
        order = ("before", "after") if rep % 2 == 0 else ("after", "before")
        for name in order:
            cb.ROOT = sides[name]  # run_cli starts `python -m loadkit` in that checkout
            s = cb.loadkit_cli(month, args.dsn, args.mode, args.mlflow_uri, args.set)
            walls[name].append(s.wall_s)
            rss[name].append(s.peak_rss or 0)
            cb.log(f"rep {rep + 1} {name}: {s.wall_s:.1f} s, peak RSS {(s.peak_rss or 0) / 2**20:.0f} MB")
        cb.log(f"rep {rep + 1} psql: {walls['psql'][-1]:.1f} s")
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(json.dumps({"rows": month.total_rows, "mb": round(month.bytes / 1e6), "overrides": args.set,
                      "walls_s": walls, "median_s": med,
                      "peak_rss_mb": {k: [r // 2**20 for r in v] for k, v in rss.items()},
                      "after_speedup": med["before"] / med["after"], "before_x_psql": med["psql"] / med["before"],
                      "after_x_psql": med["psql"] / med["after"], "load_averages": loads}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
