"""What the Python latin-1 -> UTF-8 transcode costs inside parse_chunk, and what reading the
columns as bytes (server-side transcoding, ``client_encoding=LATIN1``) would leave.

    python -m loadkit.examples.cnpj.sample --year 2024 --month 6 --out /tmp/ppdata --rows 100000 --shards 1
    PYTHONPATH=$PWD python benchmarks/latin1_transcode.py /tmp/ppdata/2024-06 [--reps 7]

Per CNPJ table (estabelecimentos, empresas): CPU microseconds per row (getrusage of this process,
one thread), medians of alternated reps, of: ``parse_chunk`` whole (today's path), the transcode
step alone (``transform._transcode``), pyarrow's CSV read of the UTF-8 text as strings (today)
and of the raw latin-1 bytes as binary columns (what server transcoding would parse).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import zipfile
from pathlib import Path
from typing import Callable, Dict, List

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("month_dir", type=Path)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    tables = _tables(args.month_dir)
    for name, prefix in (("estabelecimentos", "Estabelecimentos"), ("empresas", "Empresas")):
        spec = tables[name]
        zpath = sorted(args.month_dir.glob(f"{prefix}*.zip"))[0]
        with zipfile.ZipFile(zpath) as z:
            data = z.read(z.namelist()[0])
        d = spec.dialect  # type: ignore[attr-defined]
        names = [c.name for c in spec.columns]  # type: ignore[attr-defined]
        utf8 = transform._transcode(data, d.encoding)
        rows = transform.parse_chunk(spec, data, 1).rows_in  # type: ignore[arg-type]

        def read(buf: bytes, kind: pa.DataType) -> None:
            pacsv.read_csv(pa.py_buffer(buf), read_options=pacsv.ReadOptions(column_names=names, use_threads=False,
                                                                              block_size=len(buf) + 1),
                           parse_options=pacsv.ParseOptions(delimiter=d.delimiter, quote_char=d.quote),
                           convert_options=pacsv.ConvertOptions(column_types={n: kind for n in names},
                                                                null_values=[""], strings_can_be_null=True))

        steps: Dict[str, Callable[[], object]] = {
            "parse_chunk": lambda: transform.parse_chunk(spec, data, 1),  # type: ignore[arg-type]
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
