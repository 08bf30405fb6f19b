"""Download throughput of the fetch stage vs curl, from a local HTTP server on 127.0.0.1.

    PYTHONPATH=. python benchmarks/fetch_bench.py --rows 300000 [--load]

Generates a CNPJ month, serves it with Python's stock http.server (its HTML directory listing is what
discovery=html parses), then times: loadkit.source.fetch (pool.downloads at a time, zip CRC test on and off),
curl of the same files one after another, and curl with the same parallelism (xargs -P). With --load it
also times the whole fetch + load of the month (fetch=always) into $LOADKIT_DSN / the local server.
"""
from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from loadkit.source import fetch
from loadkit.examples.cnpj.sample import generate_month


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--downloads", type=int, default=4)
    ap.add_argument("--load", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fetch_bench_"))
    try:
        month = generate_month(work / "remote", 2024, 5, rows=args.rows, shards=4, seed=1)
        files = sorted(month.folder.glob("*.zip"))
        total = sum(f.stat().st_size for f in files)
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(work / "remote")))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        s = fetch.Settings(url=base + "{year:04d}-{month:02d}/", discovery="html", downloads=args.downloads)
        results = {}
        for label, settings in (("loadkit fetch (CRC test)", s),
                                ("loadkit fetch (no CRC test)", fetch.Settings(**{**s.__dict__, "verify_zip": False}))):
            dest = work / label.replace(" ", "_")
            results[label] = timed(lambda: fetch.fetch_month(settings, dest, 2024, 5))
        urls = [f"{base}2024-05/{f.name}" for f in files]
        out = work / "curl"
        out.mkdir()
        results["curl, one at a time"] = timed(lambda: [
            subprocess.run(["curl", "-s", "-o", str(out / u.rsplit("/", 1)[1]), u], check=True) for u in urls])
        results[f"curl, {args.downloads} at a time"] = timed(lambda: subprocess.run(
            f"printf '%s\\n' {' '.join(urls)} | xargs -P {args.downloads} -n 1 curl -s -O", shell=True, check=True,
            cwd=out))
        print(f"{len(files)} files, {total / 1e6:,.1f} MB, 127.0.0.1, {args.downloads} downloads")
        ref = results[f"curl, {args.downloads} at a time"]
        for label, secs in results.items():
            print(f"  {label:32s} {secs:6.2f} s  {total / secs / 1e6:8.1f} MB/s  ({ref / secs:.2f} x curl -P)")
        if args.load:
            import os

            from tests.conftest import compose
            from loadkit.runner import run_job

            dsn = os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test")
            data = work / "load"
            overrides = ["+job=monthly", "year=2024", "month=5", f"data_root={data}", f"sink.dsn={dsn}",
                         "job.schema=fetch_bench", "sink.ledger_schema=fetch_bench_ledger", "tracking.enabled=false",
                         f'job.remote.url="{base}{{year:04d}}-{{month:02d}}/"', "job.remote.discovery=html",
                         "env.progress_bars=false", "force=true"]
            started = time.perf_counter()
            result = run_job(compose(overrides))
            wall = time.perf_counter() - started
            rows = sum(t.rows_read for t in result.metrics.tables.values())
            print(f"  fetch + load: {wall:.1f} s, {rows:,} rows, status {result.status}")
        server.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
