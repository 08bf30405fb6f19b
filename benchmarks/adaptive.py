"""Adaptive batch sizing vs a sweep of fixed sizes on one generated month (a benchmark, not a test).

    python benchmarks/adaptive.py --rows 40000 --sizes 2000,10000,50000,200000 --start 10000

Loads the same month once per fixed size and once with batch=adaptive (starting at --start),
each into fresh schemas with force=true, and prints rows/s per run plus adaptive's distance to
the best fixed size. Needs the PostgreSQL at LOADKIT_BENCH_DSN (default: the local test server).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from loadkit.examples.cnpj.sample import generate_month  # noqa: E402
from loadkit import db  # noqa: E402
from loadkit.config import register, to_config  # noqa: E402
from loadkit.execute.ray import ensure_ray  # noqa: E402
from loadkit.runner import RunResult, run_job  # noqa: E402


def run_once(data: Path, dsn: str, mlflow_uri: str, extra: List[str]) -> RunResult:
    tag = uuid.uuid4().hex[:8]
    overrides = ["+job=monthly", "year=2024", "month=5", f"data_root={data}", f"sink.dsn={dsn}",
                 f"job.schema=bench_{tag}", f"sink.ledger_schema=bench_l_{tag}", f"tracking.uri={mlflow_uri}",
                 "tracking.experiment=loadkit-bench", "env.progress_bars=false", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "loadkit" / "conf"), version_base="1.3"):
        cfg = to_config(compose("config", overrides=overrides))
    try:
        result = run_job(cfg)
    finally:
        with db.transaction(dsn) as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "bench_{tag}" CASCADE')
            cur.execute(f'DROP SCHEMA IF EXISTS "bench_l_{tag}" CASCADE')
    if result.status != "succeeded":
        raise SystemExit(f"benchmark run failed: {result.error}")
    return result


def rate(result: RunResult) -> float:
    return result.metrics.totals()[0] / result.wall_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--sizes", default="2000,10000,50000,200000")
    parser.add_argument("--start", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    dsn = os.environ.get("LOADKIT_BENCH_DSN", "postgresql://root@127.0.0.1:5432/test")
    register()
    ensure_ray(None, 2, 500_000_000, None, False)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "data")
        manifest = generate_month(data, 2024, 5, rows=args.rows, shards=2, seed=1)
        mlflow_uri = f"sqlite:///{Path(tmp, 'mlflow.db')}"
        sizes = [int(s) for s in args.sizes.split(",")]
        results: List[Tuple[str, float, str]] = []
        for _ in range(args.repeat):
            for size in sizes:
                r = run_once(data, mlflow_uri=mlflow_uri, dsn=dsn, extra=["batch=fixed", f"batch.size={size}"])
                results.append((f"fixed {size}", rate(r), f"{len(r.metrics.batches)} batches"))
            r = run_once(data, mlflow_uri=mlflow_uri, dsn=dsn,
                         extra=["batch=adaptive", f"batch.size={args.start}", f"batch.min_size={min(sizes)}",
                                f"batch.max_size={max(sizes)}", "batch.window_s=1.0"])
            path = " -> ".join(str(rows) for _, rows, _ in r.metrics.batch_sizes) or "unchanged"
            results.append(("adaptive", rate(r), f"{len(r.metrics.batches)} batches; sizes {args.start} -> {path}"))
    total = sum(manifest.rows.values())
    print(f"{total:,} rows per run, {args.repeat} repeat(s)")
    for name, rows_s, note in results:
        print(f"{name:>14}  {rows_s:10,.0f} rows/s  {note}")
    best_fixed = max(v for n, v, _ in results if n.startswith("fixed"))
    adaptive = max(v for n, v, _ in results if n == "adaptive")
    print(f"adaptive / best fixed = {adaptive / best_fixed:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
