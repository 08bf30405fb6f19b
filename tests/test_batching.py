"""Batch sizing: the policy on its own (with an explicit clock), and an adaptive run that changes size mid-run
and still loads every row exactly once."""
from __future__ import annotations

from typing import Callable, List

import pytest

from loadkit.examples.cnpj.sample import SampleManifest
from loadkit.batching import BatchSizer, SizingSettings
from loadkit.runner import run_job
from tests.helpers import compose, query

ADAPTIVE = SizingSettings(policy="adaptive", size=10_000, min_size=1_000, max_size=80_000, window_s=1.0,
                          window_batches=2, step=2.0, tolerance=0.05, memory_ceiling=0.8)


def drive(sizer: BatchSizer, rate_of: Callable[[int], float], windows: int) -> List[int]:
    """Feed windows of two batches whose throughput follows rate_of(size); return the sizes visited."""
    now, sizes = 0.0, [sizer.size]
    for _ in range(windows):
        rows = sizer.size
        for _ in range(2):
            now += rows / rate_of(sizer.size)
            sizer.observe(rows, 0.1, now=now)
        sizes.append(sizer.size)
    return sizes


def test_fixed_policy_never_moves() -> None:
    sizer = BatchSizer(SizingSettings(policy="fixed", size=7_000), now=0.0)
    assert all(sizer.observe(7_000, 0.99, now=t) is None for t in range(1, 50)) and sizer.size == 7_000


def test_climbs_to_the_bound_when_bigger_is_always_faster() -> None:
    sizer = BatchSizer(ADAPTIVE, now=0.0)
    sizes = drive(sizer, lambda size: 1_000 + size / 10, windows=8)
    assert sizes[-1] == ADAPTIVE.max_size and sizes == sorted(sizes)


def test_turns_round_past_the_optimum_and_stays_near_it() -> None:
    peak = 20_000
    sizer = BatchSizer(ADAPTIVE, now=0.0)
    sizes = drive(sizer, lambda size: 50_000 - abs(size - peak) / 2, windows=12)
    assert max(sizes) <= 2 * 2 * peak  # overshoots by at most one step before reversing
    assert all(peak / 4 <= s <= peak * 4 for s in sizes[-6:])
    assert any(d.reason == "throughput-down" for d in sizer.decisions)


def test_memory_pressure_halves_at_once_within_bounds() -> None:
    sizer = BatchSizer(ADAPTIVE, now=0.0)
    decision = sizer.observe(10_000, 0.95, now=0.1)
    assert decision is not None and decision.reason == "memory" and sizer.size == 5_000
    for t in range(2, 10):
        sizer.observe(1_000, 0.95, now=t)
    assert sizer.size == ADAPTIVE.min_size


MONTH = {"rows": 3000, "shards": 1, "seed": 23}  # the size of conftest's `month`


@pytest.mark.e2e
def test_adaptive_run_changes_size_mid_run_and_loads_exactly_once(month: SampleManifest, pg_dsn: str, schemas: tuple,
                                                                  ray_session: None, job_overrides) -> None:
    target, led = schemas
    # Tiny sizes and a short window so a small month sees several decisions.
    cfg = compose(job_overrides(month.root, "batch=adaptive", "batch.size=300", "batch.min_size=300",
                                "batch.max_size=5000", "batch.window_s=0.2", "tracking=off"))
    result = run_job(cfg)
    assert result.status == "succeeded", result.error
    assert result.metrics.batch_sizes, "the policy moved the size during the run"
    ledgered = dict(query(pg_dsn, f'SELECT table_name, sum(rows_in)::int FROM "{led}".batch GROUP BY 1'))
    assert ledgered == month.rows  # every row in exactly one committed batch
    assert {t: m.rows_read for t, m in result.metrics.tables.items()} == month.rows
    assert query(pg_dsn, f'SELECT count(*) FROM "{target}".socios')[0][0] == month.rows["socios"]
    # Byte ranges of one member tile it without gaps or overlaps, whatever sizes they were cut at.
    spans = query(pg_dsn, f'SELECT file_sha, member, start_offset, end_offset FROM "{led}".batch '
                          "ORDER BY file_sha, member, start_offset")
    for (sha, member, start, end), (sha2, member2, start2, _) in zip(spans, spans[1:]):
        if (sha, member) == (sha2, member2):
            assert end == start2
