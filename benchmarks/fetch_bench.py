"""Download throughput of the fetch stage vs curl, and the whole fetch + load of a month, from a local
server on 127.0.0.1.

    PYTHONPATH=. python -m benchmarks.fetch_bench --rows 300000 [--server http|webdav] [--load]
    PYTHONPATH=. python -m benchmarks.fetch_bench --mb 1000 --server webdav --load --skip-curl   # ~1 GB month

Generates a CNPJ month (``--mb`` sizes it: the generator's bytes per row is measured on a small
month first, then scaled), serves it either with Python's stock http.server (its HTML directory
listing is what discovery=html parses) or with wsgidav on cheroot in the RFB's Nextcloud share
layout (discovery=webdav, PROPFIND), then times: loadkit.source.fetch (pool.downloads at a time, zip
CRC test on and off), curl of the same files one after another, and curl with the same parallelism
(xargs -P). With --load it also times the whole fetch + load of the month (fetch=always, into a
fresh schema of $LOADKIT_DSN / the local server) and, for reference, the load alone of the same
files already on disk (fetch=never), so the fetch's share of the wall time is visible. Prints the
load average before and after: the machine is shared, read the numbers with it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from loadkit.examples.cnpj.sample import generate_month
from loadkit.source import fetch


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def rows_for(mb: float, work: Path) -> int:
    """Rows that make a generated month of about ``mb`` MB of zips (measured on 20,000 rows)."""
    probe = generate_month(work / "probe", 2024, 5, rows=20_000, shards=4, seed=1)
    size = sum(f.stat().st_size for f in probe.folder.glob("*.zip"))
    shutil.rmtree(work / "probe", ignore_errors=True)
    return max(1_000, int(20_000 * mb * 1e6 / size))


SHARE = "public.php/dav/files/SHARE"  # the RFB's Nextcloud public-share layout, under the served root


def serve_http(root: Path) -> Tuple[str, str, Callable[[], None]]:
    """(URL of the folder holding YYYY-MM/, discovery, stop) for a stock HTTP server with HTML listings."""
    from tests.servers import serve_http as serve  # the tests' servers, one helper

    url, stop = serve(root)
    return f"{url}{SHARE}/", "html", stop


def serve_webdav(root: Path) -> Tuple[str, str, Callable[[], None]]:
    """The same files as a WebDAV share (wsgidav on cheroot, anonymous read, PROPFIND listings)."""
    from tests.servers import serve_webdav as serve

    url, stop = serve(root, threads=16)
    return f"{url}{SHARE}/", "webdav", stop


def drop(dsn: str, *schemas: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        for s in schemas:
            cur.execute(f'DROP SCHEMA IF EXISTS "{s}" CASCADE')
    conn.close()


def load(dsn: str, data: Path, base: str, discovery: str, fetch_mode: str) -> Tuple[float, int, str]:
    """(wall seconds, rows read, status) of one run of the monthly job into fresh schemas."""
    from loadkit.runner import run_job
    from tests.conftest import compose

    tag = uuid.uuid4().hex[:8]
    target, led = f"fetch_bench_{tag}", f"fetch_bench_ledger_{tag}"
    overrides = ["+job=monthly", "year=2024", "month=5", f"data_root={data}", f"sink.dsn={dsn}",
                 f"job.schema={target}", f"sink.ledger_schema={led}", "tracking.enabled=false",
                 f'job.remote.url="{base}{{year:04d}}-{{month:02d}}/"', f"job.remote.discovery={discovery}",
                 "env.progress_bars=false", f"fetch={fetch_mode}"]
    try:
        started = time.perf_counter()
        result = run_job(compose(overrides))
        wall = time.perf_counter() - started
        return wall, sum(t.rows_read for t in result.metrics.tables.values()), result.status
    finally:
        drop(dsn, target, led, f"{target}__lk_stage")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300_000, help="rows of the generated month (unless --mb)")
    ap.add_argument("--mb", type=float, default=None, help="size the month to about this many MB of zips")
    ap.add_argument("--downloads", type=int, default=4)
    ap.add_argument("--server", choices=("http", "webdav"), default="http")
    ap.add_argument("--load", action="store_true", help="also time fetch + load, and the load alone")
    ap.add_argument("--skip-curl", action="store_true", help="only the loadkit fetch (and --load) timings")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fetch_bench_"))
    stop: Callable[[], None] = lambda: None  # noqa: E731
    try:
        rows = rows_for(args.mb, work) if args.mb else args.rows
        month = generate_month(work / "remote" / SHARE, 2024, 5, rows=rows, shards=4, seed=1)
        files = sorted(month.folder.glob("*.zip"))
        total = sum(f.stat().st_size for f in files)
        base, discovery, stop = (serve_webdav if args.server == "webdav" else serve_http)(work / "remote")
        s = fetch.Settings(url=base + "{year:04d}-{month:02d}/", discovery=discovery, downloads=args.downloads)
        load1 = os.getloadavg()[0]
        results: Dict[str, float] = {}
        variants: List[Tuple[str, Any]] = [("loadkit fetch (CRC test)", s)]
        if not args.skip_curl:
            variants.append(("loadkit fetch (no CRC test)", fetch.Settings(**{**s.__dict__, "verify_zip": False})))
        for label, settings in variants:
            dest = work / label.replace(" ", "_")
            results[label] = timed(lambda: fetch.fetch_month(settings, dest, 2024, 5))
            shutil.rmtree(dest, ignore_errors=True)
        if not args.skip_curl:
            urls = [f"{base}2024-05/{f.name}" for f in files]
            out = work / "curl"
            out.mkdir()
            results["curl, one at a time"] = timed(lambda: [
                subprocess.run(["curl", "-s", "-o", str(out / u.rsplit("/", 1)[1]), u], check=True) for u in urls])
            results[f"curl, {args.downloads} at a time"] = timed(lambda: subprocess.run(
                f"printf '%s\\n' {' '.join(urls)} | xargs -P {args.downloads} -n 1 curl -s -O", shell=True,
                check=True, cwd=out))
            shutil.rmtree(out, ignore_errors=True)
        print(f"{len(files)} files, {total / 1e6:,.1f} MB, {rows:,} rows, {args.server} on 127.0.0.1, "
              f"{args.downloads} downloads; load average {load1:.2f}")
        ref = results.get(f"curl, {args.downloads} at a time")
        for label, secs in results.items():
            vs = f"  ({ref / secs:.2f} x curl -P)" if ref else ""
            print(f"  {label:32s} {secs:7.2f} s  {total / secs / 1e6:8.1f} MB/s{vs}")
        if args.load:
            dsn = os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test")
            wall, read, status = load(dsn, work / "load", base, discovery, "always")
            print(f"  fetch + load         {wall:7.1f} s  {read:,} rows  {total / wall / 1e6:6.1f} MB/s  "
                  f"status {status}")
            wall2, read2, status2 = load(dsn, work / "load", base, discovery, "never")  # the files are there now
            print(f"  load alone (on disk) {wall2:7.1f} s  {read2:,} rows  {total / wall2 / 1e6:6.1f} MB/s  "
                  f"status {status2}")
        print(f"load average after {os.getloadavg()[0]:.2f}")
    finally:
        stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
