"""Process memory: one monitor per process, shared by everything in it.

``MemoryMonitor.instance()`` samples this process (and, in the driver, its Ray
descendants) on a background thread; everything that wants memory figures asks the
same instance instead of starting its own sampler.
"""
from __future__ import annotations

import os
import threading
import time
from typing import List, Optional, Tuple

import psutil

_lock = threading.Lock()


def process_rss() -> int:
    """Resident set size of the current process, in bytes."""
    return psutil.Process(os.getpid()).memory_info().rss


def tree_rss(pid: Optional[int] = None) -> int:
    """RSS of a process and all its descendants (the driver plus a local Ray's workers)."""
    try:
        root = psutil.Process(pid or os.getpid())
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class MemoryMonitor:
    """Samples tree RSS and system memory use every ``interval_s`` seconds."""

    _instance: Optional["MemoryMonitor"] = None

    def __init__(self, interval_s: float = 0.5) -> None:
        self._interval = interval_s
        self._stop = threading.Event()
        self._samples: List[Tuple[float, int, float]] = []
        self._peak = 0
        self._thread = threading.Thread(target=self._run, name="loadkit-memory", daemon=True)
        self._thread.start()

    @classmethod
    def instance(cls) -> "MemoryMonitor":
        with _lock:
            if cls._instance is None or cls._instance._stop.is_set():
                cls._instance = MemoryMonitor()
            return cls._instance

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def sample(self) -> Tuple[float, int, float]:
        rss = tree_rss()
        point = (time.time(), rss, psutil.virtual_memory().percent / 100.0)
        with _lock:
            self._samples.append(point)
            if len(self._samples) > 20_000:  # bounded: keep every other old sample
                self._samples = self._samples[::2]
            self._peak = max(self._peak, rss)
        return point

    @property
    def peak_rss(self) -> int:
        return self._peak

    def latest(self) -> Tuple[float, int, float]:
        with _lock:
            return self._samples[-1] if self._samples else (time.time(), 0, 0.0)

    def samples(self) -> List[Tuple[float, int, float]]:
        with _lock:
            return list(self._samples)

    def reset_peak(self) -> None:
        with _lock:
            self._peak = 0
            self._samples.clear()

    def stop(self) -> None:
        self._stop.set()
