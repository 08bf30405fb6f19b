"""MLflow tracking's cost on a small run: the committed sample month with tracking on and off.

    python -m benchmarks.tracking_overhead [--reps 3] [--dsn DSN] [--mlflow-uri URI]

Alternates ``tracking=local`` (a SQLite store) and ``tracking=off`` runs of
``python -m loadkit +job=monthly year=2024 month=5`` on data/ (fresh target and ledger
schemas each time, dropped afterwards) and prints the median wall time of each, measured
from process start to process exit, i.e. how long the user's shell is held. After a tracked run it
waits for the background MLflow flush to finish, so the flush never slows the next run down.
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
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent


def one(dsn: str, uri: str, tracking: str) -> float:
    tag = uuid.uuid4().hex[:8]
    target, led = f"trk_t_{tag}", f"trk_l_{tag}"
    args = [sys.executable, "-m", "loadkit", "+job=monthly", "year=2024", "month=5", f"data_root={ROOT / 'data'}",
            f"sink.dsn={dsn}", f"job.schema={target}", f"sink.ledger_schema={led}", f"tracking={tracking}",
            "env.progress_bars=false"]
    if tracking != "off":
        args.append(f"tracking.uri={uri}")
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    subprocess.run(["psql", dsn, "-qc", f'DROP SCHEMA IF EXISTS "{target}" CASCADE; '
                    f'DROP SCHEMA IF EXISTS "{led}" CASCADE'], capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"loadkit exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    if tracking != "off":  # let the background flush finish: it must not slow the next run down
        from loadkit.tracking import find_by_loadkit_run

        run_id = proc.stdout.split("run id: ")[1].split()[0]
        if find_by_loadkit_run(uri, run_id, wait_s=180) is None:
            raise SystemExit(f"run {run_id} never reached MLflow")
    return wall


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tracking_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dsn", default=os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test"))
    p.add_argument("--mlflow-uri", default=None, help="default: a fresh SQLite store in a temp dir")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.mlflow_uri or f"sqlite:///{tmp}/mlflow.db"
        one(args.dsn, uri, "local")  # warm-up: creates the store's tables once, as a first-ever run would
        on: List[float] = []
        off: List[float] = []
        for _ in range(args.reps):
            on.append(one(args.dsn, uri, "local"))
            off.append(one(args.dsn, uri, "off"))
    m_on, m_off = statistics.median(on), statistics.median(off)
    print(f"tracking on : {' '.join(f'{s:.2f}' for s in on)}  median {m_on:.2f} s")
    print(f"tracking off: {' '.join(f'{s:.2f}' for s in off)}  median {m_off:.2f} s")
    print(f"difference  : {m_on - m_off:+.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
