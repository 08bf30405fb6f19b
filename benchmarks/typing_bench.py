"""Typing cost per column kind (transform._convert_column) on a generated CNPJ month, no database.

The column rules' share of the parse, measured alone so a change in them shows above the noise
of a whole load: the members are read once as strings with pyarrow, then every declared column
of the monthly job is converted ``--reps`` times; the minimum per column is reported, summed by
kind, in ns per value. Also times unpadded and fractional date-times against Python's strptime.

``--chunks``: the whole parse stage per table (``transform.parse_chunk`` on 50,000-record chunks
with the reader's scan summary, as a load runs it: pyarrow's CSV read, typing, the split), CPU µs
per row, pyarrow reading in ``transform._ARROW_BLOCK`` blocks and in one block per chunk, alternated.
``--encode``: pgpq's binary COPY encoding of those typed chunks, CPU ns per row, per slice size
(``postgres/copy.py`` ``_ENCODE_ROWS``).

    python -m benchmarks.typing_bench --rows 100000 --reps 15
    python -m benchmarks.typing_bench --rows 200000 --reps 5 --chunks --encode
"""
from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pyarrow as pa
import pyarrow.csv as pacsv

ROOT = Path(__file__).resolve().parents[1]


def best(fn: Callable[[], object], reps: int) -> float:
    out = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - started)
    return out


def main() -> int:
    from hydra import compose, initialize_config_dir

    from loadkit.config import register, to_config
    from loadkit.examples.cnpj.sample import generate_month
    from loadkit.plan import build_plan
    from loadkit.transform import _Checker, _convert_column

    p = argparse.ArgumentParser(prog="python -m benchmarks.typing_bench", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000, help="estabelecimentos rows of the generated month")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--chunks", action="store_true", help="time parse_chunk per table (CPU us/row)")
    p.add_argument("--encode", action="store_true", help="time pgpq's COPY encoding per slice size (CPU ns/row)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate_month(Path(tmp), 2024, 5, rows=args.rows, shards=1, seed=0)
        register()
        with initialize_config_dir(config_dir=str(ROOT / "loadkit" / "conf"), version_base="1.3"):
            cfg = to_config(compose("config", overrides=["+job=monthly", "year=2024", "month=5", f"data_root={tmp}"]))
        plan = build_plan(cfg)
        if args.chunks or args.encode:
            for name in ("estabelecimentos", "empresas", "simples", "socios"):
                chunk_costs(plan.table(name), args.reps, args.chunks, args.encode)
        for name in ("estabelecimentos", "empresas", "simples", "socios"):
            table = plan.table(name)
            d = table.dialect
            with zipfile.ZipFile(table.files[0].path) as zf:
                data = zf.read(zf.namelist()[0]).replace(b"\x00", b"").decode(d.encoding).encode()
            names = [c.name for c in table.columns]
            raw = pacsv.read_csv(pa.py_buffer(data), read_options=pacsv.ReadOptions(column_names=names),
                                 parse_options=pacsv.ParseOptions(delimiter=d.delimiter, quote_char=d.quote or False,
                                                                  newlines_in_values=True),
                                 convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                      null_values=list(d.null_values),
                                                                      strings_can_be_null=True))
            by_kind: Dict[str, float] = {}
            for col in table.columns:
                arr = raw[col.name].combine_chunks()
                by_kind[col.kind] = by_kind.get(col.kind, 0.0) + best(
                    lambda: _convert_column(col, arr, _Checker(len(arr))), args.reps)
            n = raw.num_rows
            print(f"{name:17} {n:>9,} rows  " + "  ".join(f"{k} {v * 1e9 / n:.0f}" for k, v in sorted(by_kind.items()))
                  + f"  total {sum(by_kind.values()) * 1e9 / n:.0f} ns/row")
    try:
        from loadkit.transform import parse_datetimes
    except ImportError:  # a checkout before the vectorised strptime (to compare column costs)
        return 0
    rng = random.Random(1)
    moments = [dt.datetime(1990, 1, 1) + dt.timedelta(seconds=rng.randint(0, 10**9)) for _ in range(args.rows)]
    for label, fmt, values in (
            ("padded", "%m/%d/%Y %H:%M:%S", [m.strftime("%m/%d/%Y %H:%M:%S") for m in moments]),
            ("unpadded", "%m/%d/%Y %H:%M:%S", [f"{m.month}/{m.day}/{m.year} {m.hour}:{m.minute:02d}:{m.second:02d}"
                                               for m in moments]),
            ("fraction", "%Y/%m/%d %H:%M:%S.%f", [m.strftime("%Y/%m/%d %H:%M:%S") + ".25" for m in moments])):
        arr = pa.array(values)
        ours = best(lambda: parse_datetimes(arr, fmt), args.reps)
        python = best(lambda: [dt.datetime.strptime(v, fmt) for v in values], 1)
        print(f"date-times {label:9} {fmt:22} loadkit {ours * 1e9 / len(values):6.0f} ns/value,"
              f" datetime.strptime {python * 1e9 / len(values):6.0f} ns/value")
    return 0


def chunk_costs(table: Any, reps: int, parse: bool, encode: bool, chunk_rows: int = 50_000) -> None:
    """Print parse_chunk's CPU µs/row (``parse``) and pgpq's encoding ns/row per slice size (``encode``)."""
    import numpy as np
    from pgpq import ArrowToPostgresBinaryEncoder

    from loadkit import transform
    from loadkit.plan import BATCH_COL, ROW_COL
    from loadkit.source import scanner

    with zipfile.ZipFile(table.files[0].path) as zf:
        lines = zf.read(zf.namelist()[0]).split(b"\n")
    chunks = [b"\n".join(lines[i:i + chunk_rows]) + b"\n" for i in range(0, len(lines) - 1, chunk_rows)]
    syntax = scanner.Syntax.of(table.dialect)
    hints = []
    for c in chunks:
        sc = scanner.scan(c, syntax, final=True)
        hints.append(scanner.Summary(sc.clean, sc.quoted_newlines, len(sc),
                                     int(scanner.blank_records(c, sc).sum())).encode())
    block = transform._ARROW_BLOCK
    by_block: Dict[int, List[float]] = {}
    typed: List[Any] = []
    for rep in range(reps if parse else 1):
        for size in (block, 1 << 30):
            transform._ARROW_BLOCK = size
            started, rows = time.process_time(), 0
            for c, h in zip(chunks, hints):
                out = transform.parse_chunk(table, c, 1, hint=h)
                rows += out.rows_in
                if not typed or len(typed) < len(chunks):
                    typed.append(out.rows)
            by_block.setdefault(size, []).append((time.process_time() - started) * 1e6 / max(rows, 1))
    transform._ARROW_BLOCK = block
    if parse:
        print(f"{table.name:17} parse_chunk  " + "  ".join(
            f"{'1 block' if k == 1 << 30 else f'{k >> 10} KiB blocks'} {statistics.median(v):.3f}"
            for k, v in by_block.items()) + " CPU us/row")
    if encode:
        batches = [t.append_column(BATCH_COL, pa.array(np.full(t.num_rows, 1, np.int64))).drop_columns([ROW_COL])
                   for t in typed[:len(chunks)]]
        costs: Dict[Optional[int], List[float]] = {}
        for _ in range(reps):
            for size in (None, 65536, 16384, 4096):
                started, rows = time.process_time(), 0
                for t in batches:
                    enc = ArrowToPostgresBinaryEncoder(t.schema)
                    enc.write_header()
                    for b in t.to_batches(max_chunksize=size):
                        enc.write_batch(b)
                    enc.finish()
                    rows += t.num_rows
                costs.setdefault(size, []).append((time.process_time() - started) * 1e9 / max(rows, 1))
        print(f"{table.name:17} pgpq encode  " + "  ".join(
            f"{'whole' if k is None else k} rows {statistics.median(v):.0f}" for k, v in costs.items()) + " CPU ns/row")


if __name__ == "__main__":
    raise SystemExit(main())
