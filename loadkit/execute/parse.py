"""The parse stage, shared by both executors: a Chunk -> a ParsedBatch (typed rows, rejects, counts, id)."""
from __future__ import annotations

import time
from typing import Dict

from loadkit import tracing
from loadkit.errors import SourceDataError
from loadkit.plan import TableSpec, batch_id
from loadkit.records import Chunk, ParsedBatch, carry
from loadkit.transform import parse_chunk, parse_parquet_batch


def parse(chunk: Chunk, tables: Dict[str, TableSpec], period: str) -> ParsedBatch:
    """One chunk -> its typed rows and rejects with the batch's id and counts (eof/error pass through).

    A SourceDataError (a chunk the parser cannot read at all) becomes an error record: the file
    fails, the other files keep loading."""
    if chunk.kind != "data":
        return carry(chunk, ParsedBatch)
    table = tables[chunk.table_name]
    started, started_ns = time.perf_counter(), time.time_ns() if chunk.trace else 0
    try:
        if table.format == "parquet":
            parsed = parse_parquet_batch(table, chunk.data, chunk.first_line)
        else:
            parsed = parse_chunk(table, chunk.data, chunk.first_line, chunk.header, chunk.skip_header,
                                 reject=chunk.reject, hint=chunk.scan)
    except SourceDataError as exc:  # the file fails, not the whole dataset
        return carry(chunk, ParsedBatch, kind="error", message=str(exc), trace="")
    parse_s = time.perf_counter() - started
    trace = chunk.trace and tracing.add_stage(chunk.trace, "parse", started_ns, started_ns + int(parse_s * 1e9),
                                              rows_in=parsed.rows_in, bytes=len(chunk.data))
    return carry(
        chunk, ParsedBatch, trace=trace,
        batch_id=batch_id(table.name, period, chunk.file_sha, chunk.member, chunk.start),
        rows_in=parsed.rows_in, rows_loaded=parsed.rows.num_rows, rows_rejected=parsed.rejects.num_rows,
        rows_coerced=sum(parsed.coerced.values()), bytes=len(chunk.data), parse_s=parse_s,
        blank_lines=parsed.blank_lines, rows=parsed.rows, rejects=parsed.rejects,
    )
