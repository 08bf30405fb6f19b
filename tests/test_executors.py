"""loadkit.execute: the executor choice as a pure function, and the in-process path free of Ray."""
from __future__ import annotations

import subprocess
import sys

import pytest

from loadkit.execute import choose_executor, make_executor
from loadkit.execute.inprocess import InProcessExecutor
from tests.conftest import ROOT

GB = 1 << 30


@pytest.mark.parametrize("requested,address,nbytes,cpus,expected", [
    ("ray", None, 0, 1, "ray"),  # an explicit choice wins, however small
    ("inprocess", "auto", 100 * GB, 64, "inprocess"),
    ("auto", "auto", 0, 1, "ray"),  # a cluster run is always Ray
    ("auto", None, 1 * GB, 8, "inprocess"),  # a small input
    ("auto", None, 100 * GB, 2, "inprocess"),  # a small machine
    ("auto", None, 100 * GB, 8, "ray"),
    ("auto", None, 2 * GB, 3, "ray"),  # just past both limits
])
def test_auto_rule(requested: str, address: object, nbytes: int, cpus: int, expected: str) -> None:
    assert choose_executor(requested, address, nbytes, cpus, inprocess_max_bytes=2 * GB - 1,
                           inprocess_max_cpus=2) == expected


def test_an_inprocess_run_never_imports_ray() -> None:
    """The runner, the executor package and the in-process executor load without Ray (seconds of import)."""
    code = ("import sys, loadkit.runner, loadkit.execute; from loadkit.execute import make_executor; "
            "e = make_executor('inprocess'); e.start(); e.size_channel(10).publish(5); "
            "print(e.name, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["inprocess", "False"]


def test_local_size_channel_is_what_read_tasks_poll() -> None:
    executor = make_executor("inprocess")
    assert isinstance(executor, InProcessExecutor)
    channel = executor.size_channel(100)
    assert channel.board.poll(3, 0.5) == 100
    channel.publish(250)
    assert channel.board.poll(2, 0.25) == 250 and channel.counters() == (5, 0.75)
