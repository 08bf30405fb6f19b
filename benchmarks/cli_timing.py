"""One timed CLI run of the committed sample month, shared by benchmarks.fixed_cost and benchmarks.tracking_overhead.

``run_sample(tree, ...)`` runs ``python -m loadkit +job=monthly year=2024 month=5`` on data/ once,
with PYTHONPATH set to the given loadkit checkout, fresh target and ledger schemas (dropped
afterwards), and returns its CPU seconds (user + system from wait4: the loadkit process and
whatever it waited for; the detached MLflow flush is not included, it runs after the shell is
released) and its wall seconds from process start to exit (how long the user's shell is held).
After a tracked run it waits for the background MLflow flush to land, so a flush never slows
the next run. ``what="plan"`` times ``loadkit plan`` with the same arguments instead (compose,
validate, plan: the start-up without database, load or tracking); ``what="python"`` times
``python -c pass`` (the interpreter's own floor).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DSN = os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test")


@dataclass
class Timed:
    cpu_s: float  # user + system CPU seconds of the process (and of the children it waited for)
    wall_s: float  # process start to exit
    stdout: str
    stderr: str


def timed(args: List[str], tree: Path) -> Timed:
    """Run ``args`` with PYTHONPATH=tree in tree; its CPU (wait4) and wall seconds and output. Raises
    SystemExit with the tail of stderr when it exits non-zero."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("LOADKIT_NORMAL_EXIT", None)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=tree, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if code != 0:
        raise SystemExit(f"{tree}: {' '.join(args[1:4])} exited {code}:\n{stderr[-3000:]}")
    return Timed(usage.ru_utime + usage.ru_stime, wall, stdout, stderr)


def run_sample(tree: Path, tracking: str, uri: str, dsn: str = DEFAULT_DSN, what: str = "run",
               prefix: str = "bench") -> Timed:
    """One sample-month CLI run (``what``: run, plan or python) of the checkout at ``tree``; see the module doc."""
    if what == "python":
        return timed([sys.executable, "-c", "pass"], tree)
    tag = uuid.uuid4().hex[:8]
    target, led = f"{prefix}_t_{tag}", f"{prefix}_l_{tag}"
    args = [sys.executable, "-m", "loadkit", *(["plan"] if what == "plan" else []), "+job=monthly", "year=2024",
            "month=5", f"data_root={ROOT / 'data'}", f"sink.dsn={dsn}", f"job.schema={target}",
            f"sink.ledger_schema={led}", f"tracking={tracking}", "env.progress_bars=false"]
    if tracking != "off":
        args.append(f"tracking.uri={uri}")
    try:
        result = timed(args, tree)
    finally:
        subprocess.run(["psql", dsn, "-qc", f'DROP SCHEMA IF EXISTS "{target}" CASCADE; '
                        f'DROP SCHEMA IF EXISTS "{led}" CASCADE; '
                        f'DROP SCHEMA IF EXISTS "{target}__lk_stage" CASCADE'], capture_output=True)
    if what == "run" and tracking != "off":  # let the background flush land: it must not slow the next run
        from loadkit.tracking import find_by_loadkit_run

        run_id = result.stdout.split("run id: ")[1].split()[0]
        if find_by_loadkit_run(uri, run_id, wait_s=300) is None:
            raise SystemExit(f"run {run_id} never reached MLflow")
    return result
