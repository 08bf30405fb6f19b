"""What the Python latin-1 -> UTF-8 transcode costs inside parse_chunk, and what reading the
columns as bytes (server-side transcoding, ``client_encoding=LATIN1``) would leave.

    python -m loadkit.examples.cnpj.sample --year 2024 --month 6 --out /tmp/ppdata --rows 100000 --shards 1
    PYTHONPATH=$PWD python benchmarks/latin1_transcode.py /tmp/ppdata/2024-06 [--reps 7]

    # the append itself, dialect.server_transcode on vs off (parse + binary COPY, loadkit + backend CPU)
    PYTHONPATH=$PWD python benchmarks/latin1_transcode.py --append [--rows 1000000] [--reps 5]

``--append``: the estabelecimentos file of ``benchmarks/copy_bench.py``'s generated month (``--rows``
rows), cut into ``--batch-rows`` record chunks; each rep, alternating which side goes first, runs
``parse_chunk`` + the writer's pgpq ``copy_arrow`` (one transaction per batch, ``_lk_batch`` added as
the writer does) with server_transcode on and off into fresh typed tables. Per side: this process's
CPU (getrusage: parse + encode + send) and the backend's (psutil on its pid), per source row; medians
over reps and the 1-minute load average at each rep. The first rep checks both tables are identical
(count and an order-independent hash of every row's text).

Per CNPJ table (estabelecimentos, empresas): CPU microseconds per row (getrusage of this process,
one thread), medians of alternated reps, of: ``parse_chunk`` whole (today's path), the transcode
step alone (``transform._transcode``), pyarrow's CSV read of the UTF-8 text as strings (today)
and of the raw latin-1 bytes as binary columns (what server transcoding would parse).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pyarrow as pa
import pyarrow.csv as pacsv

from loadkit import transform
from loadkit.config import register, to_config
from loadkit.plan import build_plan

CONF = Path(__file__).resolve().parent.parent / "loadkit" / "conf"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _tables(data_root: Path) -> Dict[str, object]:
    from hydra import compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_config(compose("config", overrides=["+job=monthly", "year=2024", "month=6",
                                                      f"data_root={data_root.parent}"]))
    return {t.name: t for t in build_plan(cfg).tables}


def _append_side(dsn: str, schema: str, spec: object, chunks: List[Tuple[bytes, int]]) -> Dict[str, float]:
    """parse_chunk + pgpq COPY of every chunk, one transaction each; CPU of this process and the backend."""
    import psutil

    from loadkit.plan import BATCH_COL, ROW_COL
    from loadkit.postgres.copy import encoder

    enc = encoder("pgpq")
    name = spec.name  # type: ignore[attr-defined]
    conn = enc.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f'TRUNCATE "{schema}"."{name}"')
            cur.execute("SELECT pg_backend_pid()")
            backend = psutil.Process(int(cur.fetchall()[0][0]))
        conn.commit()
        server0, client0, parse_cpu, rows = sum(backend.cpu_times()[:2]), _cpu(), 0.0, 0
        for k, (chunk, line) in enumerate(chunks):
            p0 = _cpu()
            parsed = transform.parse_chunk(spec, chunk, line)  # type: ignore[arg-type]
            parse_cpu += _cpu() - p0
            batch = parsed.rows.drop_columns([ROW_COL])
            batch = batch.append_column(BATCH_COL, pa.array([k + 1] * batch.num_rows, pa.int64()))
            enc.copy_arrow(conn, schema, name, batch)
            conn.commit()
            rows += parsed.rows_in
        client, server = _cpu() - client0, sum(backend.cpu_times()[:2]) - server0
    finally:
        conn.close()
    return {"parse_us_row": parse_cpu / rows * 1e6, "client_us_row": client / rows * 1e6,
            "server_us_row": server / rows * 1e6, "cpu_us_row": (client + server) / rows * 1e6}


def append_bench(rows: int, reps: int, batch_rows: int, dsn: str, data: Path) -> None:
    import uuid

    import benchmarks.copy_bench as cb
    from benchmarks.encoder_bench import _psql, plan_tables, table_digest
    from loadkit.postgres.modes import mode_for

    month = cb.generate(data / f"rows{rows}", rows)
    spec = plan_tables(month.root, dsn)["estabelecimentos"]
    raw = month.files["estabelecimentos"].read_bytes()
    chunks: List[Tuple[bytes, int]] = []
    start, line = 0, 1
    while start < len(raw):
        end = start
        for _ in range(batch_rows):  # the generated month has no quoted newlines
            nl = raw.find(b"\n", end)
            end = len(raw) if nl < 0 else nl + 1
            if nl < 0:
                break
        chunks.append((raw[start:end], line))
        line += raw.count(b"\n", start, end)
        start = end
    sides = {on: dataclasses.replace(spec, dialect=dataclasses.replace(spec.dialect, server_transcode=on))
             for on in (True, False)}
    assert transform.server_encoding(sides[True].dialect) == "LATIN1"
    schema = f"bench_latin1_{uuid.uuid4().hex[:6]}"
    tables = {True: "estabelecimentos_on", False: "estabelecimentos_off"}
    ddl = mode_for(spec).column_ddl()
    _psql(dsn, f'CREATE SCHEMA "{schema}"; ' + "; ".join(f'CREATE TABLE "{schema}"."{t}" ({ddl})'
                                                        for t in tables.values()))
    got: Dict[bool, List[Dict[str, float]]] = {True: [], False: []}
    loads: List[float] = []
    identical = None
    try:
        for rep in range(reps):
            loads.append(os.getloadavg()[0])
            for on in ((True, False) if rep % 2 == 0 else (False, True)):
                named = dataclasses.replace(sides[on], name=tables[on])
                got[on].append(_append_side(dsn, schema, named, chunks))
            if rep == 0:
                digests = {on: table_digest(dsn, schema, t) for on, t in tables.items()}
                identical = digests[True] == digests[False]
            print(f"rep {rep + 1}/{reps} (load {loads[-1]:.2f}): " + ", ".join(
                f"{'server' if on else 'python'} {got[on][-1]['cpu_us_row']:.2f}" for on in (True, False)),
                flush=True)
    finally:
        _psql(dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    n = sum(c.count(b"\n") for c, _ in chunks)
    print(f"estabelecimentos, {n:,} rows, {batch_rows:,}-row batches, {reps} reps alternated; identical tables: "
          f"{identical}; load averages {[round(x, 2) for x in loads]}")
    for on in (True, False):
        med = {k: statistics.median(s[k] for s in got[on]) for k in got[on][0]}
        spread = [round(s["cpu_us_row"], 2) for s in got[on]]
        print(f"  server_transcode={str(on).lower():<5} CPU us/row: parse {med['parse_us_row']:.2f}, "
              f"loadkit {med['client_us_row']:.2f}, backend {med['server_us_row']:.2f}, "
              f"total {med['cpu_us_row']:.2f} (reps {spread})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("month_dir", type=Path, nargs="?")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--append", action="store_true", help="parse + COPY, server_transcode on vs off")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-rows", type=int, default=50_000)
    ap.add_argument("--dsn", default=os.environ.get("LOADKIT_DSN", "postgresql://root@127.0.0.1:5432/test"))
    ap.add_argument("--data", type=Path, default=Path("/tmp/loadkit-bench"))
    args = ap.parse_args()
    if args.append:
        append_bench(args.rows, args.reps, args.batch_rows, args.dsn, args.data)
        return
    if args.month_dir is None:
        ap.error("month_dir is required without --append")
    tables = _tables(args.month_dir)
    for name, prefix in (("estabelecimentos", "Estabelecimentos"), ("empresas", "Empresas")):
        spec = tables[name]
        zpath = sorted(args.month_dir.glob(f"{prefix}*.zip"))[0]
        with zipfile.ZipFile(zpath) as z:
            data = z.read(z.namelist()[0])
        d = spec.dialect  # type: ignore[attr-defined]
        names = [c.name for c in spec.columns]  # type: ignore[attr-defined]
        utf8 = transform._transcode(data, d.encoding)
        fast = dataclasses.replace(spec, dialect=dataclasses.replace(d, server_transcode=True))
        d = dataclasses.replace(d, server_transcode=False)  # the old path, for the whole-chunk numbers
        spec = dataclasses.replace(spec, dialect=d)
        rows = transform.parse_chunk(spec, data, 1).rows_in  # type: ignore[arg-type]

        def read(buf: bytes, kind: pa.DataType) -> None:
            pacsv.read_csv(pa.py_buffer(buf), read_options=pacsv.ReadOptions(column_names=names, use_threads=False,
                                                                              block_size=len(buf) + 1),
                           parse_options=pacsv.ParseOptions(delimiter=d.delimiter, quote_char=d.quote),
                           convert_options=pacsv.ConvertOptions(column_types={n: kind for n in names},
                                                                null_values=[""], strings_can_be_null=True))

        steps: Dict[str, Callable[[], object]] = {
            "parse_chunk": lambda: transform.parse_chunk(spec, data, 1),  # type: ignore[arg-type]
            "parse_chunk server_transcode": lambda: transform.parse_chunk(fast, data, 1),  # type: ignore[arg-type]
            "transcode": lambda: transform._transcode(data, d.encoding),
            "read utf8 as string": lambda: read(utf8, pa.string()),
            "read latin1 as binary": lambda: read(data, pa.binary()),
        }
        times: Dict[str, List[float]] = {k: [] for k in steps}
        for _ in range(args.reps):
            for k, f in steps.items():
                t0 = _cpu()
                f()
                times[k].append(_cpu() - t0)
        line = ", ".join(f"{k} {statistics.median(v) / rows * 1e6:.3f}" for k, v in times.items())
        print(f"{name} ({rows:,} rows, {len(data) / rows:.0f} B/row): CPU us/row: {line}; "
              f"loadavg {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
