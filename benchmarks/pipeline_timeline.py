"""Where the in-process pipeline's time goes: per-thread CPU of the driver and its backends, split into
running / runnable-but-not-running / asleep, the stage waits and write()'s phases, over one CLI run.

    python -m benchmarks.pipeline_timeline --rows 4000000 [--set pool.parse_threads=2 ...] [--bucket 0.5]
    python -m benchmarks.pipeline_timeline --variant base= --variant p2=pool.parse_threads=2 --reps 3
    python -m benchmarks.pipeline_timeline --variant before@/tmp/lk-before= --variant after= --reps 3

Runs the benchmark month (Estabelecimentos + Empresas of benchmarks.copy_bench.generate, raw CSV, MLflow off,
the overrides of notes/lkrun.sh) through the CLI with a probe imported before ``loadkit``: Python threads
get their ``threading`` name as OS name (prctl), and the executor's queue waits (``inprocess._take`` /
``_offer``), parse, ``BatchWriter.write`` and its phases (ledger check, pgpq encode, COPY send / end,
commit, trim), each read unit's first and last chunk and the cyclic GC are timed per thread, written as JSON
at exit. Meanwhile this process samples, every ``--interval`` s, /proc/<pid>/task/*/schedstat (CPU and
run-queue wait per thread), the run's PostgreSQL backends the same way (benchmarks.procstat: matched by
client port), the writer sessions' pg_stat_activity wait events and /proc/stat (machine idle).

Why schedstat: on a shared machine a thread is running, runnable but waiting for a core another
process holds (the load), or asleep (waiting for another stage, the server, a lock, I/O: the pipeline's
own idle). Only the last is the pipeline's shape; CPU per row and the asleep share do not depend on the
load, the wall does. A single run prints the timeline per ``--bucket`` s; ``--variant`` alternates
configurations (or checkouts, ``NAME@PATH``: a git worktree with its C extension built in place) for
``--reps`` and prints median (min–max) of each figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


from benchmarks.procstat import ProcSampler

_TICK = os.sysconf("SC_CLK_TCK")

# Imported by the CLI process before loadkit: names threads, times waits. Writes to $LK_PROBE_OUT at exit.
_PROBE = r'''
import ctypes, json, os, threading, time, atexit, runpy, sys
_libc = ctypes.CDLL(None)
_run = threading.Thread.run
def _named_run(self):
    try:
        _libc.prctl(15, self.name[:15].encode(), 0, 0, 0)
    except Exception:
        pass
    _run(self)
threading.Thread.run = _named_run
_t0 = time.time()
import gc
_gc_start = {}
def _gc_cb(phase, info):
    key = threading.get_ident()
    if phase == "start":
        _gc_start[key] = (time.perf_counter(), time.thread_time())
    else:
        w, c = _gc_start.pop(key, (time.perf_counter(), time.thread_time()))
        v = _cpu.setdefault(f"gc.gen{info['generation']}", [0.0, 0.0, 0])
        v[0] += time.perf_counter() - w; v[1] += time.thread_time() - c; v[2] += 1
gc.callbacks.append(_gc_cb)
_cpu = {}  # phase -> [wall s, thread CPU s, calls]
_events = []  # (thread, what, start, end)
def _rec(what, a, b):
    _events.append((threading.current_thread().name, what, a - _t0, b - _t0))
import loadkit.execute.inprocess as ip
_take, _offer = ip._take, ip._offer
def take(q, stop):
    a = time.time(); r = _take(q, stop); _rec("take", a, time.time()); return r
def offer(q, item, stop):
    a = time.time(); r = _offer(q, item, stop); _rec("offer", a, time.time()); return r
ip._take, ip._offer = take, offer
_parse = ip.parse
def parse(chunk, tables, period):
    a = time.time(); r = _parse(chunk, tables, period); _rec("parse", a, time.time()); return r
ip.parse = parse
import loadkit.postgres.writer as wr
import loadkit.postgres.copy as cp
def _phase(name, fn):
    def wrapped(*a, **k):
        w, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            v = _cpu.setdefault(name, [0.0, 0.0, 0])
            v[0] += time.perf_counter() - w; v[1] += time.thread_time() - c; v[2] += 1
    return wrapped
def _phases(obj, names, prefix):
    for n in names:
        if hasattr(obj, n):
            setattr(obj, n, _phase(prefix + n, getattr(obj, n)))
_phases(wr.BatchWriter, ["_commit", "_copy_all", "_finish", "_ledger_row"], "writer.")
if os.environ.get("LK_PROBE_NO_TRIM"):  # measurement only: what the per-batch trim costs and saves
    wr.release_memory = lambda: None
_phases(wr, ["release_memory", "process_rss"], "writer.")
import loadkit.postgres.ledger as lg
_phases(lg.Ledger, ["has_batch", "append_batch"], "ledger.")
import pgpq, psycopg
_Enc = pgpq.ArrowToPostgresBinaryEncoder
class _TimedEnc:
    def __init__(self, schema):
        self._e = _Enc(schema)
        self.write_header, self.finish = self._e.write_header, self._e.finish
        self.write_batch = _phase("copy.encode", self._e.write_batch)
pgpq.ArrowToPostgresBinaryEncoder = _TimedEnc
psycopg.Copy.write = _phase("copy.send", psycopg.Copy.write)
psycopg.Copy.__exit__ = _phase("copy.end", psycopg.Copy.__exit__)
psycopg.Connection.commit = _phase("conn.commit", psycopg.Connection.commit)
cp._BY_NAME["pgpq"] = cp.CopyEncoder("pgpq", "%s", cp.psycopg_connect, _phase("copy.pgpq_total", cp.pgpq_copy_arrow))
_write = wr.BatchWriter.write
def write(self, batch):
    a = time.time(); r = _write(self, batch); _rec("write", a, time.time()); return r
wr.BatchWriter.write = write
_read_unit = ip.read_unit
def read_unit(unit, board=None):
    a = time.time(); n = 0
    for c in _read_unit(unit, board):
        if n == 0: _rec("unit-first:" + unit.table.name, a, time.time())
        n += 1
        b = time.time(); yield c; a2 = time.time()
        _rec("read-yield", b, a2)
    _rec("unit:" + unit.table.name, a, time.time())
ip.read_unit = read_unit
def _dump():
    with open(os.environ["LK_PROBE_OUT"], "w") as fh:
        json.dump({"t0": _t0, "events": _events, "phases": _cpu}, fh)
atexit.register(_dump)
sys.argv = ["loadkit"] + sys.argv[1:]
runpy.run_module("loadkit", run_name="__main__", alter_sys=True)
'''


def cli_args(data: Path, rows: int, dsn: str, mode: str, extra: Sequence[str]) -> List[str]:
    """The overrides of /work/wt/notes/lkrun.sh: the two big tables of the benchmark month, plain CSV."""
    tag = f"{os.getpid()}{int(time.time() * 1000) % 100000}"
    ov = [f"job.tables.{t}.enabled=false" for t in
          ("socios", "simples", "cnaes", "motivos", "municipios", "naturezas", "paises", "qualificacoes")]
    ov += ['job.tables.estabelecimentos.source.paths=["{year:04d}-{month:02d}/*ESTABELE"]',
           'job.tables.empresas.source.paths=["{year:04d}-{month:02d}/*EMPRECSV"]']
    for t in ("estabelecimentos", "empresas"):
        ov += [f"job.tables.{t}.source.format=csv", f"job.tables.{t}.source.member=null",
               f"job.tables.{t}.mode={mode}", f"job.tables.{t}.indexes=[]"]
    return ["+job=monthly", "year=2024", "month=5", f"data_root={data}/rows{rows}", f"sink.dsn={dsn}",
            f"job.schema=tl_{tag}", f"sink.ledger_schema=tll_{tag}", "tracking.enabled=false",
            "env.progress_bars=false", *ov, *extra], tag


def _threads(pid: int) -> Dict[int, tuple]:
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                s = fh.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                run_ns, wait_ns = (int(x) for x in fh.read().split()[:2])
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(tid)] = (name, run_ns / 1e9, wait_ns / 1e9)
    return out


def _hwm_kb(pid: int) -> int:
    """The process's peak RSS so far (VmHWM), kB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _machine() -> tuple:
    """Seconds of (busy, idle, iowait) of all cores since boot (/proc/stat)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    idle, iowait = f[3], f[4]
    return ((sum(f[:8]) - idle - iowait) / _TICK, idle / _TICK, iowait / _TICK)


def _group(name: str) -> str:
    if name.startswith("loadkit-write"):
        return "write"
    if name.startswith("loadkit-parse"):
        return "parse"
    if name == "loadkit-read":
        return "read"
    if name in ("python", "python3") or name.startswith("python"):
        return "main"
    return "other"


def run(rows: int, data: Path, dsn: str, mode: str, extra: Sequence[str], interval: float, bucket: float,
        python: str, tree: Optional[Path] = None) -> Dict[str, Any]:
    """One instrumented CLI run of the checkout ``tree`` (default: this one; its loadkit comes first on
    sys.path, so a ``git worktree`` of an earlier commit with its C extension built in place runs as is)."""
    args, tag = cli_args(data, rows, dsn, mode, extra)
    probe_out = tempfile.mktemp(suffix=".json")
    env = dict(os.environ, LK_PROBE_OUT=probe_out)
    env.update(x[4:].split("=", 1) for x in extra if x.startswith("env:"))  # type: ignore[misc]
    args = [x for x in args if not x.startswith("env:")]
    load = os.getloadavg()
    t_start = time.time()
    proc = subprocess.Popen([python, "-c", _PROBE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tree or Path(__file__).resolve().parent.parent)
    backends = ProcSampler(proc.pid, interval_s=10.0)  # only its backend lookup is used
    samples: List[tuple] = []  # (t, {tid: (name, cpu)}, {backend pid: cpu}, machine (busy, idle, iowait) s)
    bpids: set = set()
    last_lookup = 0.0
    waits: Dict[str, int] = defaultdict(int)  # "state/wait_event" of the run's backends, per sample
    peak_kb = 0  # the driver's peak RSS (VmHWM)
    import psycopg
    conn = psycopg.connect(dsn, autocommit=True)
    while proc.poll() is None:
        now = time.time()
        th = _threads(proc.pid)
        if bpids:
            for st, wt, we in conn.execute("SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                                           "WHERE pid = ANY(%s) AND application_name LIKE 'loadkit:%%:writer'",
                                           (list(bpids),)):
                waits[f"{st}/{wt or '-'}:{we or 'cpu'}"] += 1
        if now - last_lookup > 0.5:
            try:
                bpids |= backends._backends({proc.pid})
            except Exception:
                pass
            last_lookup = now
        bc = {}
        for b in list(bpids):
            try:
                with open(f"/proc/{b}/schedstat") as fh:
                    run_ns, wait_ns = (int(x) for x in fh.read().split()[:2])
                bc[b] = (run_ns / 1e9, wait_ns / 1e9)
            except (FileNotFoundError, ProcessLookupError):
                pass
        samples.append((now - t_start, th, bc, _machine()))
        peak_kb = max(peak_kb, _hwm_kb(proc.pid))
        time.sleep(interval)
    out = proc.stdout.read() if proc.stdout else ""
    wall = time.time() - t_start
    subprocess.run(["psql", dsn, "-q", "-c",  # the staged modes' schema beside the target too (--mode merge)
                    f"DROP SCHEMA IF EXISTS tl_{tag} CASCADE; DROP SCHEMA IF EXISTS tll_{tag} CASCADE; "
                    f"DROP SCHEMA IF EXISTS tl_{tag}__lk_stage CASCADE"], capture_output=True)
    probe = json.loads(Path(probe_out).read_text()) if Path(probe_out).exists() else {"t0": t_start, "events": []}
    shift = probe["t0"] - t_start
    events = [(th, w, a + shift, b + shift) for th, w, a, b in probe["events"]]
    conn.close()
    return {"wall": wall, "samples": samples, "events": events, "phases": probe.get("phases", {}), "load": load,
            "end_load": os.getloadavg(), "pg_waits": dict(waits), "peak_rss_mb": peak_kb / 1024,
            "output": out, "rc": proc.returncode}


def report(r: Dict[str, Any], bucket: float) -> str:
    samples, events = r["samples"], r["events"]
    # CPU per group per bucket from consecutive samples
    n = int(r["wall"] / bucket) + 1
    cpu: Dict[str, List[float]] = defaultdict(lambda: [0.0] * n)
    prev_th: Dict[int, tuple] = {}
    prev_b: Dict[int, tuple] = {}
    prev_m: Optional[tuple] = None
    totals: Dict[str, float] = defaultdict(float)
    runq: Dict[str, List[float]] = defaultdict(lambda: [0.0] * n)  # runnable but not running (other processes)
    runq_tot: Dict[str, float] = defaultdict(float)
    names: Dict[int, str] = {}
    for t, th, bc, m in samples:
        i = min(n - 1, int(t / bucket))
        if prev_m is not None:
            for k, v0, v1 in zip(("M.busy", "M.idle", "M.iow"), prev_m, m):
                cpu[k][i] += v1 - v0
                totals[k] += v1 - v0
        prev_m = m
        for tid, (name, c, w) in th.items():
            names[tid] = name
            _, c0, w0 = prev_th.get(tid, (name, 0.0, 0.0))
            g = _group(name)
            cpu[g][i] += c - c0
            totals[g] += c - c0
            runq[g][i] += w - w0
            runq_tot[g] += w - w0
        for b, (c, w) in bc.items():
            c0, w0 = prev_b.get(b, (0.0, 0.0))  # first seen: counted from its start (it connects as the run starts)
            cpu["pg"][i] += c - c0
            totals["pg"] += c - c0
            runq["pg"][i] += w - w0
            runq_tot["pg"] += w - w0
        prev_th = {**prev_th, **th}
        prev_b = {**prev_b, **bc}
    waits: Dict[str, List[float]] = defaultdict(lambda: [0.0] * n)
    wait_tot: Dict[str, float] = defaultdict(float)
    for th, w, a, b in events:
        key = None
        if w == "take" and th.startswith("loadkit-write"):
            key = "w.wait"
        elif w == "write":
            key = "w.write"
        elif w == "offer" and th == "loadkit-read":
            key = "r.block"
        elif w == "take" and th.startswith("loadkit-parse"):
            key = "p.wait"
        elif w == "offer" and th.startswith("loadkit-parse"):
            key = "p.block"
        elif w == "parse":
            key = "parse"
        if key is None:
            continue
        wait_tot[key] += b - a
        # spread the interval over buckets
        s = a
        while s < b:
            i = min(n - 1, int(s / bucket))
            e = min(b, (i + 1) * bucket)
            waits[key][i] += e - s
            if e <= s:
                break
            s = e
    groups = [g for g in ("main", "read", "parse", "write", "other", "pg") if g in cpu]
    demand = [sum(cpu[g][i] + runq[g][i] for g in groups) / bucket for i in range(n)]
    machine = [g for g in ("M.busy", "M.idle", "M.iow") if g in cpu]
    wk = [k for k in ("r.block", "p.wait", "p.block", "w.wait", "w.write", "parse") if k in waits]
    head = (f"{'t s':>5} " + " ".join(f"{g:>6}" for g in groups) + f" {'sum':>5} | " + " ".join(f"{k:>7}" for k in wk)
            + " | " + " ".join(f"{g:>6}" for g in machine) + " | runq: " + " ".join(f"{g:>5}" for g in groups)
            + " | demand")
    lines = [f"cores used per {bucket}s bucket (CPU s / bucket s) | seconds of stage time per bucket (summed over "
             "threads) | machine | runnable-not-running cores | our threads running or runnable",
             head]
    for i in range(n):
        row = [cpu[g][i] / bucket for g in groups]
        lines.append(f"{i * bucket:>5.1f} " + " ".join(f"{v:>6.2f}" for v in row) + f" {sum(row):>5.2f} | "
                     + " ".join(f"{waits[k][i]:>7.2f}" for k in wk) + " | "
                     + " ".join(f"{cpu[g][i] / bucket:>6.2f}" for g in machine) + " |       "
                     + " ".join(f"{runq[g][i] / bucket:>5.2f}" for g in groups) + f" | {demand[i]:>5.2f}")
    tot = sum(totals[g] for g in groups)
    lines.append("CPU s: " + ", ".join(f"{g} {totals[g]:.2f}" for g in groups) + f", all {tot:.2f} over wall "
                 f"{r['wall']:.2f} s = {tot / r['wall']:.2f} cores")
    lines.append("demand (running + runnable, cores) by phase: " + _by_phase(demand, events, bucket))
    lines.append("runnable, not running (CPU taken by others) s: "
                 + ", ".join(f"{g} {runq_tot[g]:.2f}" for g in groups))
    lines.append("stage s: " + ", ".join(f"{k} {wait_tot[k]:.2f}" for k in wk))
    ph = {}
    for th, w, a, b in events:
        if w.startswith("unit-first:"):
            ph[f"first chunk {w[11:]}"] = b
        if w.startswith("unit:"):
            ph[f"read done {w[5:]}"] = b
    writes = [b for th, w, a, b in events if w == "write"]
    starts = [a for th, w, a, b in events if w in ("take", "offer")]
    if starts:
        ph["executor start"] = min(starts)
    if writes:
        ph["last write"] = max(writes)
    ph["exit"] = r["wall"]
    lines.append("phases: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(ph.items(), key=lambda kv: kv[1])))
    lines.append(f"threads: {sorted(set(names.values()))}")
    lines.append("call phases (wall s / thread CPU s / calls): " + ", ".join(
        f"{k} {v[0]:.2f}/{v[1]:.2f}/{v[2]}" for k, v in sorted(r.get("phases", {}).items())))
    lines.append("machine (all processes, cores): " + ", ".join(f"{g} {totals[g] / r['wall']:.2f}" for g in machine))
    pw = r.get("pg_waits", {})
    nw = sum(pw.values()) or 1
    top = sorted(pw.items(), key=lambda kv: -kv[1])[:10]
    lines.append("writer backends' state samples: " + ", ".join(f"{k} {v / nw:.0%}" for k, v in top))
    lines.append(f"load average at start {r['load'][0]:.2f}, at end {r['end_load'][0]:.2f}; rc {r['rc']}")
    return "\n".join(lines)


def metrics(r: Dict[str, Any], rows: int) -> Dict[str, float]:
    """One run's load-robust figures: CPU µs/row per group, and over the streaming phase (first chunk to
    last commit) each group's share of its threads' time running / runnable / asleep (asleep = waiting
    on another stage, the server, a lock or I/O: the pipeline's own idle, which the machine's load does
    not add to); start-up = process start to the first chunk."""
    samples, events = r["samples"], r["events"]
    starts = [a for th, w, a, b in events if w.startswith("unit-first:")]
    writes = [b for th, w, a, b in events if w == "write"]
    s0, s1 = (min(starts), max(writes)) if starts and writes else (0.0, r["wall"])
    def at(t: float) -> tuple:
        return min(samples, key=lambda x: abs(x[0] - t))
    a, b = at(s0 + 0.1), at(s1 - 0.15)  # samples inside the stream: the threads are alive in both
    span = b[0] - a[0]
    out: Dict[str, float] = {"wall": r["wall"], "startup": s0, "stream": s1 - s0, "load": r["load"][0],
                             "peak_rss_mb": r.get("peak_rss_mb", 0.0)}
    cpu: Dict[str, float] = defaultdict(float)
    last_t: Dict[int, tuple] = {}
    for _, th, _, _ in samples:
        last_t.update(th)
    for tid, (name, c, w) in last_t.items():
        cpu[_group(name)] += c
    last_b: Dict[int, tuple] = {}
    for _, _, bc, _ in samples:
        last_b.update(bc)
    cpu["pg"] = sum(c for c, w in last_b.values())
    for g in ("main", "read", "parse", "write", "pg"):
        out[f"us_{g}"] = cpu.get(g, 0.0) * 1e6 / rows
    out["us_driver"] = sum(out[f"us_{g}"] for g in ("main", "read", "parse", "write")) + \
        sum(v for k, v in cpu.items() if k == "other") * 1e6 / rows
    out["us_all"] = out["us_driver"] + out["us_pg"]
    for g in ("read", "parse", "write", "pg"):
        run = runq = 0.0
        threads = 0
        if g == "pg":
            items = [(pid, v, a[2].get(pid, (0.0, 0.0))) for pid, v in b[2].items()]
            items = [(pid, v, v0) for pid, v, v0 in items]
        else:
            items = [(tid, (v[1], v[2]), (a[1][tid][1], a[1][tid][2]) if tid in a[1] else (0.0, 0.0))
                     for tid, v in b[1].items() if _group(v[0]) == g]
        for _, (c1, w1), (c0, w0) in items:
            if c1 - c0 < 0.05 and g == "pg":
                continue  # an idle session (job lock, sink): not part of the stream
            run += c1 - c0
            runq += w1 - w0
            threads += 1
        if threads and span > 0:
            out[f"{g}_run"] = run / (span * threads)
            out[f"{g}_runq"] = runq / (span * threads)
            out[f"{g}_sleep"] = max(0.0, 1 - (run + runq) / (span * threads))
            out[f"{g}_n"] = threads
    m0, m1 = a[3], b[3]
    tot = sum(m1) - sum(m0)
    out["machine_idle"] = (m1[1] - m0[1] + m1[2] - m0[2]) / tot if tot else 0.0
    return out


def _by_phase(demand: List[float], events: List[tuple], bucket: float) -> str:
    """Mean demand over start-up (before the first chunk) and streaming (first chunk to last write)."""
    starts = [a for th, w, a, b in events if w.startswith("unit-first:")]
    writes = [b for th, w, a, b in events if w == "write"]
    if not starts or not writes:
        return "?"
    s, e = int(min(starts) / bucket), int(max(writes) / bucket)
    up = demand[:s] or [0.0]
    st = demand[s:e] or [0.0]
    return f"start-up {sum(up) / len(up):.2f}, streaming {sum(st) / len(st):.2f} (min bucket {min(st):.2f})"


def _rows(data: Path, rows: int) -> int:
    """Source rows of the benchmark month (estabelecimentos + empresas: copy_bench.generate's 0.8 ratio)."""
    return rows + rows * 4 // 5


def compare(results: Dict[str, List[Dict[str, float]]]) -> str:
    """Median (min–max) per figure and variant."""
    import statistics

    keys = [k for k in next(iter(results.values()))[0]]
    names = list(results)
    lines = [f"{'figure':<14}" + "".join(f"{n:>24}" for n in names)]
    for k in keys:
        cells = []
        for n in names:
            vals = [m.get(k, float("nan")) for m in results[n]]
            cells.append(f"{statistics.median(vals):>8.2f} ({min(vals):.2f}–{max(vals):.2f})")
        lines.append(f"{k:<14}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_timeline", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4000000)
    p.add_argument("--data", type=Path, default=Path("/tmp/loadkit-bench"))
    p.add_argument("--dsn", default=os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test"))
    p.add_argument("--mode", default="append")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--bucket", type=float, default=0.5)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--show-output", action="store_true")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME[@CHECKOUT]=override[,override...]: alternate these (with --reps) and print a "
                        "comparison; @CHECKOUT runs another checkout (a git worktree with its extension built)")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--json", type=Path, help="write every run's figures here")
    a = p.parse_args(argv)  # an override "env:NAME=VALUE" sets the CLI's environment instead
    if not a.variant:
        r = run(a.rows, a.data, a.dsn, a.mode, a.set, a.interval, a.bucket, a.python)
        if a.show_output or r["rc"]:
            print(r["output"][-3000:])
        print(report(r, a.bucket))
        return 0
    variants = []
    for v in a.variant:
        head, sets = v.split("=", 1)
        name, _, tree = head.partition("@")
        variants.append((name, [x for x in sets.split(",") if x], Path(tree) if tree else None))
    rows = _rows(a.data, a.rows)
    results: Dict[str, List[Dict[str, float]]] = defaultdict(list)
    for rep in range(a.reps):
        for name, sets, tree in (variants if rep % 2 == 0 else variants[::-1]):  # order alternates
            r = run(a.rows, a.data, a.dsn, a.mode, [*a.set, *sets], a.interval, a.bucket, a.python, tree)
            if r["rc"]:
                print(r["output"][-3000:])
                return 1
            m = metrics(r, rows)
            results[name].append(m)
            print(f"rep {rep} {name}: " + " ".join(f"{k} {v:.2f}" for k, v in m.items()), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    print(compare(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
