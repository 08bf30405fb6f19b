"""MLflow tracking's cost on a small run: the committed sample month with tracking on and off.

    python -m benchmarks.tracking_overhead [--reps 3] [--dsn DSN] [--mlflow-uri URI]

Alternates ``tracking=local`` (a SQLite store) and ``tracking=off`` runs of the sample month
(benchmarks.cli_timing.run_sample, the same timing as benchmarks.fixed_cost: fresh schemas each
time, dropped afterwards) and prints the median wall time of each, from process start to process
exit (how long the user's shell is held), and the median CPU seconds. After a tracked run it waits
for the background MLflow flush to finish, so the flush never slows the next run down.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from typing import Dict, List, Optional, Sequence

from benchmarks.cli_timing import DEFAULT_DSN, ROOT, run_sample


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tracking_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dsn", default=DEFAULT_DSN)
    p.add_argument("--mlflow-uri", default=None, help="default: a fresh SQLite store in a temp dir")
    args = p.parse_args(argv)
    wall: Dict[str, List[float]] = {"local": [], "off": []}
    cpu: Dict[str, List[float]] = {"local": [], "off": []}
    loads: List[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.mlflow_uri or f"sqlite:///{tmp}/mlflow.db"
        run_sample(ROOT, "local", uri, args.dsn, prefix="trk")  # warm-up: creates the store, as a first run would
        for _ in range(args.reps):
            for mode in ("local", "off"):
                loads.append(os.getloadavg()[0])
                t = run_sample(ROOT, mode, uri, args.dsn, prefix="trk")
                wall[mode].append(t.wall_s)
                cpu[mode].append(t.cpu_s)
    for mode, label in (("local", "tracking on "), ("off", "tracking off")):
        print(f"{label}: {' '.join(f'{s:.2f}' for s in wall[mode])}  median {statistics.median(wall[mode]):.2f} s "
              f"wall, {statistics.median(cpu[mode]):.2f} s CPU")
    print(f"difference  : {statistics.median(wall['local']) - statistics.median(wall['off']):+.2f} s wall, "
          f"{statistics.median(cpu['local']) - statistics.median(cpu['off']):+.2f} s CPU")
    print(f"load average during runs: median {statistics.median(loads):.1f} (range {min(loads):.1f}-{max(loads):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
