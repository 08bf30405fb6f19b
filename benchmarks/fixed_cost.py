"""Fixed cost of one CLI run: the committed sample month end to end, code trees alternated.

    python -m benchmarks.fixed_cost --tree before=/tmp/base --tree after=. [--reps 5] [--tracking local]

Each rep runs ``python -m loadkit +job=monthly year=2024 month=5`` once per tree (PYTHONPATH set to
the tree, fresh target and ledger schemas, a shared SQLite MLflow store created by a warm-up run,
so later runs take the CLI's background flush). Reports per tree the medians of the process's CPU
seconds (user + system, from wait4: the loadkit process and anything it waited for; the detached
MLflow flush is not included, it runs after the shell is released) and of the wall time from
process start to exit, plus the load average. After each tracked run it waits for the
background flush to land, so a flush never slows the next run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent


def one(tree: Path, dsn: str, uri: str, tracking: str) -> Tuple[float, float]:
    tag = uuid.uuid4().hex[:8]
    target, led = f"fc_t_{tag}", f"fc_l_{tag}"
    args = [sys.executable, "-m", "loadkit", "+job=monthly", "year=2024", "month=5", f"data_root={ROOT / 'data'}",
            f"sink.dsn={dsn}", f"job.schema={target}", f"sink.ledger_schema={led}", f"tracking={tracking}",
            "env.progress_bars=false"]
    if tracking != "off":
        args.append(f"tracking.uri={uri}")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=tree, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    subprocess.run(["psql", dsn, "-qc", f'DROP SCHEMA IF EXISTS "{target}" CASCADE; '
                    f'DROP SCHEMA IF EXISTS "{led}" CASCADE; '
                    f'DROP SCHEMA IF EXISTS "{target}__lk_stage" CASCADE'], capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: loadkit exited {proc.returncode}:\n{stderr[-3000:]}")
    if tracking != "off":
        from loadkit.tracking import find_by_loadkit_run

        run_id = stdout.split("run id: ")[1].split()[0]
        if find_by_loadkit_run(uri, run_id, wait_s=300) is None:
            raise SystemExit(f"run {run_id} never reached MLflow")
    return usage.ru_utime + usage.ru_stime, wall


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fixed_cost", description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=PATH of a loadkit checkout")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tracking", default="local")
    p.add_argument("--dsn", default=os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test"))
    args = p.parse_args(argv)
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.tree)}
    cpu: Dict[str, List[float]] = {n: [] for n in trees}
    wall: Dict[str, List[float]] = {n: [] for n in trees}
    loads: List[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        one(next(iter(trees.values())), args.dsn, uri, args.tracking)  # warm-up: creates the store
        for rep in range(args.reps):
            order = list(trees.items()) if rep % 2 == 0 else list(reversed(trees.items()))
            for name, tree in order:
                loads.append(os.getloadavg()[0])
                c, w = one(tree, args.dsn, uri, args.tracking)
                cpu[name].append(c)
                wall[name].append(w)
                print(f"rep {rep} {name}: cpu {c:.2f} s, wall {w:.2f} s, load {loads[-1]:.1f}", flush=True)
    for name in trees:
        print(f"{name}: CPU {statistics.median(cpu[name]):.2f} s (min {min(cpu[name]):.2f}), "
              f"wall {statistics.median(wall[name]):.2f} s (min {min(wall[name]):.2f}), reps {args.reps}")
    print(f"load average during runs: median {statistics.median(loads):.1f} "
          f"(range {min(loads):.1f}-{max(loads):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
