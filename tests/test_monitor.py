"""The memory monitor: the process tree's RSS, with the tree looked up every few samples, not at each."""
from __future__ import annotations

import subprocess
import sys
import time
from typing import List

import psutil
import pytest

from loadkit import monitor

CHILD_MB = 160
CHILD = (f"import sys, time; b = bytearray({CHILD_MB} * 2**20); b[::4096] = b'\\x01' * len(b[::4096]); "
         "print('ready', flush=True); sys.stdin.read()")


def test_the_tree_is_walked_every_few_samples_and_a_new_process_is_counted_from_the_next_walk(
        monkeypatch: pytest.MonkeyPatch) -> None:
    walks: List[int] = []
    real_tree = monitor._tree

    def counted() -> List[psutil.Process]:
        walks.append(1)
        return real_tree()

    monkeypatch.setattr(monitor, "_tree", counted)
    mon = monitor.MemoryMonitor(interval_s=3600)  # its thread samples once, at start; the test samples itself
    try:
        deadline = time.monotonic() + 10
        while not mon.samples() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(mon.samples()) == 1 and len(walks) == 1
        alone = mon.latest()[1]
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None and child.stdout.readline() == b"ready\n"
            # Until the next walk the child is not in the tree: the samples before it leave it out.
            for _ in range(monitor._TREE_EVERY - 1):
                assert mon.sample()[1] < alone + CHILD_MB * 2**20 // 2
            assert len(walks) == 1, "the tree was walked again before _TREE_EVERY samples"
            with_child = mon.sample()[1]  # the _TREE_EVERY-th sample walks the tree again
            assert len(walks) == 2
            assert with_child >= alone + CHILD_MB * 2**20 * 0.9, (alone, with_child)
            assert mon.peak_rss >= with_child
        finally:
            child.kill()
            child.wait()
        # A process of the tree that ended is skipped until the next walk drops it.
        after = mon.sample()[1]
        assert after < with_child - CHILD_MB * 2**20 // 2, (after, with_child)
    finally:
        mon.stop()
