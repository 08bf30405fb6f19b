"""dlt loading raw CNPJ-shaped files into PostgreSQL: run by benchmarks.peers in dlt's own virtualenv.

    <dlt venv>/bin/python benchmarks/peer_dlt.py --dsn DSN --schema S --format csv TABLE=PATH [TABLE=PATH ...]

Imports nothing from loadkit (dlt's dependencies stay out of loadkit's environment). Each file is
read with pyarrow's streaming CSV reader (``;``, latin-1, every column a string, as psql's text
reference) and handed to dlt as Arrow record batches — the input dlt documents as its fastest.
``--format csv`` makes dlt load with PostgreSQL COPY (its fastest PostgreSQL loader file format);
``--format default`` leaves dlt's own choice (INSERT statements for PostgreSQL). Prints one JSON
line: rows loaded per table and the seconds spent in extract, normalize and load.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Dict, Iterator

import dlt
import pyarrow as pa
import pyarrow.csv as pacsv
from dlt.common.configuration.specs import ConnectionStringCredentials


def batches(path: str, width: int) -> Iterator[pa.RecordBatch]:
    names = [f"c{i}" for i in range(1, width + 1)]
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=names, encoding="latin-1", block_size=16 << 20),
        parse_options=pacsv.ParseOptions(delimiter=";", quote_char='"'),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False),
    )
    for batch in reader:
        yield batch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", required=True)
    p.add_argument("--schema", required=True)
    p.add_argument("--format", choices=("csv", "default"), default="csv")
    p.add_argument("--width", action="append", default=[], help="TABLE=N columns")
    p.add_argument("files", nargs="+", help="TABLE=PATH")
    args = p.parse_args()
    widths = dict(w.split("=", 1) for w in args.width)
    creds = ConnectionStringCredentials(args.dsn)
    if not creds.password:  # dlt insists on one; a trust-auth server ignores it
        creds.password = "unused"
    pipeline = dlt.pipeline(pipeline_name=f"bench_{args.schema}",
                            destination=dlt.destinations.postgres(creds.to_native_representation()),
                            dataset_name=args.schema, pipelines_dir=f"/tmp/dlt-pipelines-{args.schema}")
    resources = []
    for spec in args.files:
        table, path = spec.split("=", 1)
        resources.append(dlt.resource(batches(path, int(widths[table])), name=table, write_disposition="append"))
    kwargs = {"loader_file_format": "csv"} if args.format == "csv" else {}
    t0 = time.perf_counter()
    pipeline.extract(resources, **kwargs)
    t1 = time.perf_counter()
    pipeline.normalize()
    t2 = time.perf_counter()
    info = pipeline.load()
    t3 = time.perf_counter()
    info.raise_on_failed_jobs()
    counts: Dict[str, int] = {}
    with pipeline.sql_client() as client:
        for spec in args.files:
            table = spec.split("=", 1)[0]
            counts[table] = client.execute_sql(f"SELECT count(*) FROM {table}")[0][0]
    print(json.dumps({"rows": counts, "extract_s": t1 - t0, "normalize_s": t2 - t1, "load_s": t3 - t2}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
