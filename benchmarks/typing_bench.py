"""Typing cost per column kind (transform._convert_column) on a generated CNPJ month, no database.

The column rules' share of the parse, measured alone so a change in them shows above the noise
of a whole load: the members are read once as strings with pyarrow, then every declared column
of the monthly job is converted ``--reps`` times; the minimum per column is reported, summed by
kind, in ns per value. Also times unpadded and fractional date-times against Python's strptime.

    python -m benchmarks.typing_bench --rows 100000 --reps 15
"""
from __future__ import annotations

import argparse
import datetime as dt
import random
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict

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
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate_month(Path(tmp), 2024, 5, rows=args.rows, shards=1, seed=0)
        register()
        with initialize_config_dir(config_dir=str(ROOT / "loadkit" / "conf"), version_base="1.3"):
            cfg = to_config(compose("config", overrides=["+job=monthly", "year=2024", "month=5", f"data_root={tmp}"]))
        plan = build_plan(cfg)
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


if __name__ == "__main__":
    raise SystemExit(main())
