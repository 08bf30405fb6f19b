"""Per-process CPU and memory of one loadkit run: the driver, its Ray processes and its PostgreSQL backends.

``ProcSampler(pid).start()`` samples, every ``interval_s``, the process tree under ``pid`` (the CLI
driver; a local Ray's gcs_server, raylet and workers are its descendants) and the PostgreSQL
backends serving that tree's TCP connections (matched by client port: other sessions' backends on
the same server are left out). CPU is each process's last seen user+system seconds (a process's
final < interval_s is lost, ~1%; the tree and its backends are looked up once a second, so a process living
less than that between two lookups is missed); memory is the tree's summed RSS and PSS per sample, whose peak is
reported. ``stop()`` returns a ``ProcStats`` with CPU per group (driver, ray workers, ray
daemons, postgres) and the peaks.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import psutil

_PG_PORT = 5432
# Ray's daemons by a piece of their command line (first match wins: log_monitor.py before monitor.py,
# the agents before the dashboard whose folder holds agent.py); the agents retitle themselves ray::<Name>.
_DAEMONS = (("gcs_server", "gcs_server"), ("raylet", "raylet"), ("ray::DashboardAgent", "dashboard_agent"),
            ("dashboard/agent.py", "dashboard_agent"), ("ray::RuntimeEnvAgent", "runtime_env_agent"),
            ("runtime_env/agent", "runtime_env_agent"), ("log_monitor.py", "log_monitor"),
            ("monitor.py", "autoscaler_monitor"), ("dashboard", "dashboard"), ("ray_client_server", "client_server"))


@dataclass
class ProcStats:
    """CPU seconds per group and the tree's peak memory (bytes) over one run."""

    cpu_s: Dict[str, float] = field(default_factory=dict)  # driver | ray_workers | ray_daemons | postgres | other
    peak_rss: int = 0
    peak_pss: int = 0  # the loadkit tree (driver + Ray), postgres excluded
    peak_pss_driver: int = 0
    processes: Dict[str, float] = field(default_factory=dict)  # "<group>:<name>" -> CPU s (summed per name)
    counts: Dict[str, int] = field(default_factory=dict)  # "<group>:<name>" -> processes seen
    peak_pss_by: Dict[str, int] = field(default_factory=dict)  # "<group>:<name>" -> summed per-process PSS peaks

    @property
    def loadkit_cpu_s(self) -> float:
        return sum(v for k, v in self.cpu_s.items() if k != "postgres")

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_s.values())


def _group(proc: psutil.Process, root: int) -> Tuple[str, str]:
    if proc.pid == root:
        return "driver", "driver"
    try:
        argv = proc.cmdline()
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "other", "?"
    cmd = " ".join(argv)
    head = " ".join(argv[:3])  # the program and its script: a worker's arguments name the raylet too
    for piece, daemon in _DAEMONS:
        if piece in head or piece == name:
            return "ray_daemons", daemon
    if "default_worker.py" in cmd or name.startswith("ray::") or cmd.startswith("ray::"):
        # ray::<Actor>.<method> or ray::<task>: one name per actor class or task, whatever it runs now
        return "ray_workers", re.sub(r"[\s(.].*", "", cmd)[:60] if cmd.startswith("ray::") else "ray::?"
    return "other", name[:40]


class ProcSampler:
    """A background thread sampling a run's processes (see the module docstring)."""

    def __init__(self, pid: int, interval_s: float = 0.2, pss_every: int = 2, discover_every: int = 5) -> None:
        self.root = pid
        self.interval_s = interval_s
        self.pss_every = pss_every
        # The process tree and its backends are looked up every discover_every samples (1 s); CPU times are
        # cumulative, so a process found late loses nothing -- one that lives under 1 s between lookups is missed.
        self.discover_every = discover_every
        self._tree: List[psutil.Process] = []
        self._backend_pids: Set[int] = set()
        self._cpu: Dict[int, Tuple[str, str, float]] = {}  # pid -> (group, name, cpu s)
        self._procs: Dict[int, psutil.Process] = {}
        self._pss: Dict[int, int] = {}  # pid -> its peak PSS
        self._port_backend: Dict[int, int] = {}  # client TCP port -> its backend's pid (_backends)
        self._stats = ProcStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="procstat", daemon=True)

    def start(self) -> "ProcSampler":
        self._thread.start()
        return self

    def stop(self) -> ProcStats:
        self._stop.set()
        self._thread.join()
        for group, name, cpu in self._cpu.values():
            self._stats.cpu_s[group] = self._stats.cpu_s.get(group, 0.0) + cpu
            key = f"{group}:{name}"
            self._stats.processes[key] = self._stats.processes.get(key, 0.0) + cpu
            self._stats.counts[key] = self._stats.counts.get(key, 0) + 1
        for pid, peak in self._pss.items():
            key = f"{self._cpu[pid][0]}:{self._cpu[pid][1]}" if pid in self._cpu else "other:?"
            self._stats.peak_pss_by[key] = self._stats.peak_pss_by.get(key, 0) + peak
        return self._stats

    def _proc(self, pid: int) -> Optional[psutil.Process]:
        p = self._procs.get(pid)
        if p is None:
            try:
                p = self._procs[pid] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                return None
        return p

    def _loop(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self._sample(tick % self.pss_every == 0, tick % self.discover_every == 0)
            tick += 1
            self._stop.wait(self.interval_s)

    def _sample(self, with_pss: bool, discover: bool) -> None:
        if discover or not self._tree:
            try:
                root = self._proc(self.root)
                self._tree = [root] + root.children(recursive=True) if root else []
            except psutil.NoSuchProcess:
                return
        rss = pss = 0
        for p in self._tree:
            try:
                if p.pid not in self._cpu or self._cpu[p.pid][1] in ("ray::IDLE", "ray::?"):
                    group, name = _group(p, self.root)  # a Ray worker's title names its task once it has one
                else:
                    group, name, _ = self._cpu[p.pid]
                if group == "other" and name == "?":
                    continue
                t = p.cpu_times()
                self._cpu[p.pid] = (group, name, t.user + t.system)
                if with_pss:
                    m = p.memory_full_info()
                    rss += m.rss
                    pss += m.pss
                    self._pss[p.pid] = max(self._pss.get(p.pid, 0), m.pss)
                    if p.pid == self.root:
                        self._stats.peak_pss_driver = max(self._stats.peak_pss_driver, m.pss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if with_pss:
            self._stats.peak_rss = max(self._stats.peak_rss, rss)
            self._stats.peak_pss = max(self._stats.peak_pss, pss)
        if discover:
            self._backend_pids |= self._backends({p.pid for p in self._tree})
        for pid in self._backend_pids:
            p = self._proc(pid)
            try:
                t = p.cpu_times() if p else None
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if t is not None:
                self._cpu[pid] = ("postgres", "backend", t.user + t.system)

    def _backends(self, tree: Set[int]) -> Set[int]:
        """PostgreSQL backends whose client is a process of the tree (by the client's TCP port).

        Reads only the tree's own sockets (``Process.net_connections``), and the process list only when a
        port has no known backend yet: the machine-wide ``psutil.net_connections`` plus a cmdline read of every
        process cost ~10% of a core at 0.2 s, on the measured side only -- 5% of a 2-core machine that the
        unsampled reference (psql) did not pay."""
        ports = set()
        for pid in tree:
            p = self._proc(pid)
            try:
                conns = p.net_connections(kind="tcp") if p else []
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            ports.update(c.laddr.port for c in conns if c.raddr and c.raddr.port == _PG_PORT)
        known = {port: pid for port, pid in self._port_backend.items() if port in ports}
        if len(known) < len(ports) or not all(psutil.pid_exists(pid) for pid in known.values()):
            # a new port, or one whose backend exited and whose number a later connection reuses
            for p in psutil.process_iter(["name", "cmdline"]):
                if p.info["name"] != "postgres" or not p.info["cmdline"]:
                    continue
                m = re.search(r"\((\d+)\)", " ".join(p.info["cmdline"]))
                if m:
                    self._port_backend[int(m.group(1))] = p.pid
        return {self._port_backend[port] for port in ports if port in self._port_backend}
