"""The simple-format date check: full round trip (before) vs shape test + overflow re-check (after).

CPU microseconds per value (getrusage, this process), runs alternated, medians; also checks that
both give identical results on the same values. Values: valid dates with days 1..31 (so ~1/3 of
the 29..31 ones overflow), ~2% unpadded, ~1% with whitespace, the empty string.

    PYTHONPATH=$PWD python benchmarks/date_check.py [--n 1000000] [--reps 7]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from loadkit import transform


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _round_trip(text: pa.Array, parsed: pa.Array, fmt: str, in_range: pa.Array) -> pa.Array:
    """The check before: every value's canonical text compared with its text."""
    return pc.and_(pc.equal(transform._format_time(parsed, fmt), text), in_range)


def _values(n: int, fmt: str) -> pa.Array:
    rng = np.random.default_rng(16)
    y, m, d = rng.integers(1900, 2030, n), rng.integers(1, 13, n), rng.integers(1, 32, n)
    sep = "-" if "-" in fmt else ""
    out = [f"{a:04d}{sep}{b:02d}{sep}{c:02d}" for a, b, c in zip(y, m, d)]
    for i in rng.integers(0, n, n // 50):
        out[i] = f"{y[i]}{sep}{m[i]}{sep}{d[i]}"
    for i in rng.integers(0, n, n // 100):
        out[i] = " " + out[i]
    out[0] = ""
    return pa.array(out, pa.string())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        text = _values(args.n, fmt)
        times = {"round_trip": [], "shape+recheck": []}  # type: dict
        results = {}
        for _ in range(args.reps):
            for name in times:
                t0 = _cpu()
                original = transform._canonical
                if name == "round_trip":
                    transform._canonical = _round_trip  # type: ignore[assignment]
                try:
                    results[name] = transform.parse_datetimes(text, fmt)
                finally:
                    transform._canonical = original  # type: ignore[assignment]
                times[name].append(_cpu() - t0)
        same = results["round_trip"].equals(results["shape+recheck"])
        line = ", ".join(f"{k} {statistics.median(v) / args.n * 1e6:.3f}" for k, v in times.items())
        print(f"{fmt}: parse_datetimes CPU us/value (median of {args.reps}): {line}; identical={same}; "
              f"loadavg={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
