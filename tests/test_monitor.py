"""The memory monitor: the process tree's RSS, with the tree looked up every few samples, not at each."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import List, Set

import psutil
import pytest

from loadkit import monitor


def test_the_tree_is_walked_every_few_samples_and_a_new_process_is_counted_from_the_next_walk(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Which processes each sample reads, not what the tree's RSS adds up to: in the whole suite this
    process's tree holds other tests' processes (a local Ray) whose RSS moves by more than any child's.
    Calls from other monitors' threads are not counted: earlier tests leave the process's shared monitor
    (MemoryMonitor.instance()) sampling every 0.5 s, and it calls the same patched functions (CI, stop 31)."""
    others = {t for t in threading.enumerate() if t.name == "loadkit-memory"}
    walks: List[int] = []
    read: List[Set[int]] = [set()]  # per sample: the pids whose RSS it read (the first: the thread's own)
    real_tree, real_rss = monitor._tree, monitor._rss

    def ours() -> bool:
        return threading.current_thread() not in others

    def counted() -> List[psutil.Process]:
        if ours():
            walks.append(1)
        return real_tree()

    def rss(p: psutil.Process) -> int:
        if ours():
            read[-1].add(p.pid)
        return real_rss(p)

    def sample() -> None:
        read.append(set())
        mon.sample()

    monkeypatch.setattr(monitor, "_tree", counted)
    monkeypatch.setattr(monitor, "_rss", rss)
    mon = monitor.MemoryMonitor(interval_s=3600)  # its thread samples once, at start; the test samples itself
    try:
        deadline = time.monotonic() + 10
        while not mon.samples() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(mon.samples()) == 1 and len(walks) == 1
        child = subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None and child.stdout.readline() == b"ready\n"
            # Until the next walk the child is not in the tree: the samples before it leave it out.
            for _ in range(monitor._TREE_EVERY - 1):
                sample()
                assert child.pid not in read[-1]
            assert len(walks) == 1, "the tree was walked again before _TREE_EVERY samples"
            sample()  # the _TREE_EVERY-th sample walks the tree again, and reads the child
            assert len(walks) == 2 and child.pid in read[-1]
            assert mon.peak_rss >= psutil.Process(child.pid).memory_info().rss
        finally:
            child.kill()
            child.wait()
        # A process of the tree that ended is skipped (psutil.NoSuchProcess) until the next walk drops it.
        sample()
        assert child.pid in read[-1] and mon.latest()[1] > 0
    finally:
        mon.stop()
