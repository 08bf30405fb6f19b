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
_PSS_EVERY = 8  # samples between PSS reads (4 s at 0.5 s): ~2 ms a process, ~30 ms for a local Ray's tree
_TREE_EVERY = _PSS_EVERY  # samples between walks of /proc for the process tree (psutil reads every process)
_PSS_GROWTH = 1.10  # ... and at an RSS peak 10% above the RSS of the last PSS read


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


def _tree() -> List[psutil.Process]:
    """This process and all its descendants (the driver plus a local Ray's workers)."""
    try:
        root = psutil.Process(os.getpid())
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _rss(p: psutil.Process) -> int:
    """Resident set size. Summed over a tree it counts pages shared between processes (Ray's
    object store, libraries) once per process that maps them, overstating what the tree holds."""
    return p.memory_info().rss


def _pss(p: psutil.Process) -> int:
    """Proportional set size: each shared page split among the processes mapping it, so a tree's
    sum is the memory it really holds. Reads smaps_rollup: ~1 ms a process."""
    return getattr(p.memory_full_info(), "pss", 0)


def _summed(procs: List[psutil.Process], read: Callable[[psutil.Process], int]) -> int:
    total = 0
    for p in procs:
        try:
            total += read(p)
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
        self._pss_rss = 0  # tree RSS when PSS was last read
        self._procs: Optional[List[psutil.Process]] = None  # the tree as last walked (see sample)
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
        # The tree is looked up again every _TREE_EVERY samples (4 s), not at each: psutil finds a tree's
        # descendants by reading every process on the machine (~4.7 ms with ~100 of them), which at two
        # samples a second was ~1% of a core, in process as on Ray. A process started since the last walk
        # (a Ray worker starting) is counted from the next; one that ended is skipped (_summed).
        if self._procs is None or len(self._samples) % _TREE_EVERY == 0:
            self._procs = _tree()
        procs = self._procs
        rss = _summed(procs, _rss)
        point = (time.time(), rss, psutil.virtual_memory().percent / 100.0)
        # PSS costs more to read (smaps_rollup walks each process's page tables): every _PSS_EVERY
        # samples, and at an RSS peak _PSS_GROWTH above the RSS of the last read. Read at every new
        # RSS peak, a growing Ray tree had it twice a second: 2.2-4.6 CPU-s a run (issue #16).
        due = len(self._samples) % _PSS_EVERY == 0 or rss > self._pss_rss * _PSS_GROWTH
        pss = _summed(procs, _pss) if due else 0
        if due:
            self._pss_rss = rss
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
            self._peak = self._peak_pss = self._pss_rss = 0
            self._samples.clear()
            self._procs = None

    def stop(self) -> None:
        self._stop.set()
