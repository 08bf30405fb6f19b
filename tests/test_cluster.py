"""env=cluster: the monthly job joins an existing multi-node Ray cluster and ships its code there.

The test owns the cluster: a head and a worker node started with ``ray start --block`` in their
own process groups and their own temp dir (so no other Ray on this machine can find or join
them), killed by process group at the end -- never ``ray stop``, which would stop every Ray here.
The job runs through the CLI in a subprocess, because the pytest process may already hold a Ray.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import IO, Dict, Iterator, List

import pytest

from loadkit.examples.cnpj.sample import generate_month
from tests.helpers import ROOT, free_port, query
from tests.test_e2e_monthly import KEYS, SOCIO_IDENTITY, canon, last_wins, table_rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))
STARTED = "Ray runtime started"
# The cluster's own token (Ray's token auth), given to every process of the test through the
# environment: the head, the worker node and the job's driver, as a real deployment would.
TOKEN = secrets.token_hex(32)


def ray_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "LOADKIT_DSN"}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}



def _port_flags() -> List[str]:
    """Explicit free ports: the defaults (10001, 52365, ...) may be taken by other Rays on this machine."""
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")
    return [f"--{n}={free_port()}" for n in names]


class RayNode:
    """One ``ray start --block`` process group, owned by the test."""

    def __init__(self, args: List[str], log: Path) -> None:
        self.log = log
        self._out: IO[bytes] = open(log, "wb")
        self.proc = subprocess.Popen([RAY, "start", "--block", "--num-cpus=1", "--object-store-memory=80000000",
                                      "--node-ip-address=127.0.0.1", "--disable-usage-stats", *_port_flags(), *args],
                                     stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=ray_env())

    def wait_started(self, timeout_s: float = 120.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if STARTED in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"ray node did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def kill(self) -> None:
        """SIGTERM the whole process group (raylet, GCS, workers), SIGKILL whatever is left."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + grace
            while time.time() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.2)
        self.proc.wait(timeout=5)
        self._out.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _join_worker(address: str, temp: Path, attempts: int = 2) -> RayNode:
    """A 1-CPU worker node. Ray gives a joining raylet a fixed 30 s to register, which a busy
    machine can miss, so one failed start is retried before the test fails."""
    for attempt in range(1, attempts + 1):
        node = RayNode([f"--address={address}", f"--temp-dir={temp}"], temp / f"worker{attempt}.log")
        try:
            node.wait_started()
            return node
        except AssertionError:
            node.kill()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


@pytest.fixture()
def ray_cluster() -> Iterator[tuple]:
    """(address, temp dir) of a private two-node cluster: a 1-CPU head plus a 1-CPU worker node."""
    temp = Path(tempfile.mkdtemp(prefix="lkray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: List[RayNode] = []
    try:
        nodes.append(RayNode(["--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false"],
                             temp / "head.log"))
        nodes[0].wait_started()
        nodes.append(_join_worker(address, temp))
        yield address, temp
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(temp, ignore_errors=True)


def test_monthly_job_runs_on_a_ray_cluster(ray_cluster: tuple, pg_dsn: str, schemas: tuple, mlflow_uri: str,
                                           tmp_path: Path) -> None:
    address, temp = ray_cluster
    target, led = schemas
    month = generate_month(tmp_path / "data", 2024, 5, rows=200, shards=2, seed=3)
    out = subprocess.run(
        [sys.executable, "-m", "loadkit", "+job=monthly", "year=2024", "month=5", f"data_root={month.root}",
         "env=cluster", f"env.address={address}", f"sink.dsn={pg_dsn}", f"job.schema={target}",
         f"sink.ledger_schema={led}", f"tracking.uri={mlflow_uri}", "env.progress_bars=false",
         # Two 1-CPU nodes: one writer (0.25 CPU) leaves a whole CPU free on the other node for reads.
         "pool.writers=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=420, env=ray_env())
    assert out.returncode == 0, out.stderr[-4000:]

    for table, expected in month.expected.items():
        wanted = last_wins(expected, KEYS.get(table, SOCIO_IDENTITY))
        got = table_rows(pg_dsn, target, table, list(expected[0].keys()))
        assert Counter(canon(r) for r in got) == Counter(canon(r) for r in wanted), table
    runs = query(pg_dsn, f'SELECT status, rows_read, config #>> \'{{env,name}}\', config #>> \'{{env,address}}\' '
                         f'FROM "{led}".run')
    assert runs == [("succeeded", sum(month.rows.values()), "cluster", address)]
    # The code went through the runtime env: the cluster unpacked loadkit/ (conf/ and examples/ inside) as py_modules.
    shipped = {p.name for p in temp.glob("session_*/runtime_resources/py_modules_files/_ray_pkg_*")}
    assert len(shipped) >= 2, sorted(p.name for p in temp.glob("session_*/*"))
