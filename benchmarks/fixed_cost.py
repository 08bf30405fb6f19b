"""Fixed cost of one CLI run: the committed sample month end to end, code trees alternated.

    python -m benchmarks.fixed_cost --tree before=/tmp/base --tree after=. [--reps 5] [--tracking local]
                                    [--what run|plan|python]

Each rep runs the sample month once per tree (benchmarks.cli_timing.run_sample: PYTHONPATH set to
the tree, fresh target and ledger schemas, a shared SQLite MLflow store created by a warm-up run,
so later runs take the CLI's background flush), alternating which tree goes first. Reports per
tree the medians of the process's CPU seconds (user + system, from wait4; the detached MLflow
flush is not included, it runs after the shell is released) and of the wall time from process
start to exit, plus the load average. ``--what plan`` times ``loadkit plan`` (compose, validate,
plan: the start-up alone) and ``--what python`` the bare interpreter.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchmarks.cli_timing import DEFAULT_DSN, run_sample


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fixed_cost", description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=PATH of a loadkit checkout")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tracking", default="local")
    p.add_argument("--what", choices=("run", "plan", "python"), default="run")
    p.add_argument("--dsn", default=DEFAULT_DSN)
    args = p.parse_args(argv)
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.tree)}
    cpu: Dict[str, List[float]] = {n: [] for n in trees}
    wall: Dict[str, List[float]] = {n: [] for n in trees}
    loads: List[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for tree in trees.values():  # warm-up: creates the store, fills the OS cache for every tree
            run_sample(tree, args.tracking, uri, args.dsn, args.what, prefix="fc")
        for rep in range(args.reps):
            order = list(trees.items()) if rep % 2 == 0 else list(reversed(trees.items()))
            for name, tree in order:
                loads.append(os.getloadavg()[0])
                t = run_sample(tree, args.tracking, uri, args.dsn, args.what, prefix="fc")
                cpu[name].append(t.cpu_s)
                wall[name].append(t.wall_s)
                print(f"rep {rep} {name}: cpu {t.cpu_s:.2f} s, wall {t.wall_s:.2f} s, load {loads[-1]:.1f}",
                      flush=True)
    for name in trees:
        print(f"{name} ({args.what}, tracking={args.tracking}): CPU {statistics.median(cpu[name]):.2f} s "
              f"(min {min(cpu[name]):.2f}), wall {statistics.median(wall[name]):.2f} s "
              f"(min {min(wall[name]):.2f}), reps {args.reps}")
    print(f"load average during runs: median {statistics.median(loads):.1f} "
          f"(range {min(loads):.1f}-{max(loads):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
