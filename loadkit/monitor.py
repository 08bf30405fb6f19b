"""Process memory: one monitor per process, shared by everything in it.

``MemoryMonitor.instance()`` samples this process (and, in the driver, its Ray
descendants) on a background thread; everything that wants memory figures asks the
same instance instead of starting its own sampler.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
from typing import Callable, List, Optional, Tuple

import psutil

_lock = threading.Lock()
_PSS_EVERY = 4


def release_memory() -> None:
    """Hand freed heap back to the OS after a batch.

    Arrow's allocator (mimalloc) and glibc's malloc both keep freed pages for reuse: a parse
    worker sat at ~330 MB USS after its chunks were gone, ~160 MB after this. Costs ~7 ms
    per batch of 100k rows."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def process_rss() -> int:
    """Resident set size of the current process, in bytes."""
    return psutil.Process(os.getpid()).memory_info().rss


def _tree(pid: Optional[int] = None) -> List[psutil.Process]:
    try:
        root = psutil.Process(pid or os.getpid())
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: Optional[int] = None) -> int:
    """RSS of a process and all its descendants (the driver plus a local Ray's workers).

    Pages shared between processes (Ray's object store, libraries) count once per process
    that maps them, so this overstates what the tree holds; tree_pss does not."""
    total = 0
    for p in _tree(pid):
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def tree_pss(pid: Optional[int] = None) -> int:
    """Proportional set size of the tree: each shared page split among the processes mapping
    it, so the sum is the memory the tree really holds. Reads smaps_rollup: ~1 ms a process."""
    total = 0
    for p in _tree(pid):
        try:
            total += getattr(p.memory_full_info(), "pss", 0)
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
        self._peak_pss = 0
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
        # PSS costs more to read; every _PSS_EVERY samples, and always at a new RSS peak.
        pss = tree_pss() if (len(self._samples) % _PSS_EVERY == 0 or rss > self._peak) else 0
        with _lock:
            self._samples.append(point)
            if len(self._samples) > 20_000:  # bounded: keep every other old sample
                self._samples = self._samples[::2]
            self._peak = max(self._peak, rss)
            self._peak_pss = max(self._peak_pss, pss)
        return point

    @property
    def peak_rss(self) -> int:
        """Peak of the tree's summed RSS (shared pages counted once per process)."""
        return self._peak

    @property
    def peak_pss(self) -> int:
        """Peak of the tree's summed PSS (shared pages counted once in all)."""
        return self._peak_pss

    def latest(self) -> Tuple[float, int, float]:
        with _lock:
            return self._samples[-1] if self._samples else (time.time(), 0, 0.0)

    def samples(self) -> List[Tuple[float, int, float]]:
        with _lock:
            return list(self._samples)

    def reset_peak(self) -> None:
        with _lock:
            self._peak = self._peak_pss = 0
            self._samples.clear()

    def stop(self) -> None:
        self._stop.set()
