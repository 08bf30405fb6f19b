"""The record scanner's speed on one chunk, against the scanner of another git revision.

    python -m benchmarks.scanner_bench [--ref main] [--mb 8] [--reps 7]

Runs ``scanner.scan`` over the same chunk with this tree's scanner (its C fast path when built:
``scanner.ACCELERATED``; build it with ``python setup.py build_ext --inplace``), this tree's numpy
path (``scanner.scan_numpy``) and the scanner at ``--ref`` (loaded from ``git show
<ref>:loadkit/source/scanner.py``, numpy only), alternating them for ``--reps`` rounds, and prints the
median µs per MB of each plus the load average. Two chunks: CNPJ-like
(every field quoted: the numpy fast path) and MySQL-dump-like (backslash escapes: every record
goes through the per-token state machine, ``_one_record``).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent


def scanner_at(ref: str) -> ModuleType:
    """The scanner module as it is at a git revision, imported under another name."""
    text = subprocess.run(["git", "show", f"{ref}:loadkit/source/scanner.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="lkscan")) / "scanner_ref.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("scanner_ref", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scanner_ref"] = module
    spec.loader.exec_module(module)
    return module


def cnpj_chunk(size: int, rng: random.Random) -> bytes:
    out, total = [], 0
    while total < size:
        line = ('"%08d";"EMPRESA %d LTDA";"2062";"49";"%d,00";"01";""\n'
                % (rng.randrange(10**8), rng.randrange(10**6), rng.randrange(10**5))).encode()
        out.append(line)
        total += len(line)
    return b"".join(out)


def escaped_chunk(size: int, rng: random.Random) -> bytes:
    out, total = [], 0
    while total < size:
        line = ("%d;nome\\;com ponto e virgula %d;C:\\\\temp\\\\%d;\\N;linha\\\nquebrada\n"
                % (rng.randrange(10**6), rng.randrange(1000), rng.randrange(100))).encode()
        out.append(line)
        total += len(line)
    return b"".join(out)


def time_scan(mod: Any, data: bytes, quote: str, escape: str | None) -> float:
    syn = mod.Syntax(delimiter=";", quote=quote, escape=escape)
    started = time.perf_counter()
    sc = mod.scan(data, syn, final=True)
    elapsed = time.perf_counter() - started
    assert len(sc) > 0
    return elapsed / (len(data) / 1e6) * 1e6  # µs per MB


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--ref", default="main", help="git revision whose scanner is the reference (default main)")
    p.add_argument("--mb", type=float, default=8.0, help="chunk size in MB (default 8)")
    p.add_argument("--reps", type=int, default=7, help="alternated rounds (default 7)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from loadkit.source import scanner

    ref = scanner_at(args.ref)
    rng = random.Random(7)
    size = int(args.mb * 1e6)
    chunks: Dict[str, Tuple[bytes, str, str | None]] = {
        "cnpj (quoted, fast path)": (cnpj_chunk(size, rng), '"', None),
        "escaped (state machine)": (escaped_chunk(size, rng), '"', "\\"),
    }
    numpy_path = SimpleNamespace(scan=scanner.scan_numpy, Syntax=scanner.Syntax)
    scanners: List[Tuple[str, Any]] = [(args.ref, ref), ("this tree numpy", numpy_path), ("this tree", scanner)]
    print(f"scanner.ACCELERATED={scanner.ACCELERATED}")
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
          f"{args.reps} alternated rounds, median µs/MB")
    for name, (data, quote, escape) in chunks.items():
        a, b = (ref.scan(data, ref.Syntax(delimiter=";", quote=quote, escape=escape)),
                scanner.scan(data, scanner.Syntax(delimiter=";", quote=quote, escape=escape)))
        assert list(a.ends) == list(b.ends), "the two scanners disagree"
        times: Dict[str, List[float]] = {label: [] for label, _ in scanners}
        for rnd in range(args.reps):
            order: List[Tuple[str, Any]] = scanners if rnd % 2 == 0 else scanners[::-1]
            for label, mod in order:
                run: Callable[[], float] = lambda m=mod: time_scan(m, data, quote, escape)  # noqa: E731
                times[label].append(run())
        medians = {label: statistics.median(v) for label, v in times.items()}
        base = medians[args.ref]
        cells = "  ".join(f"{label}: {m:,.0f}" for label, m in medians.items())
        print(f"{name:28s} {len(data) / 1e6:.1f} MB  {cells}  ratio {medians['this tree'] / base:.3f}")
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
