"""Progress a person can follow: an in-place bar on a terminal (log lines elsewhere), and the
finalisation's steps (upsert, swap, indexes, sync...) each with its own seconds."""
from __future__ import annotations

import io
import logging
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List

import pytest

from loadkit.postgres import modes
from loadkit.metrics import ProgressBar, RunMetrics, progress_line
from tests.helpers import ROOT, compose

TABLES = ("empresas", "estabelecimentos", "socios", "simples", "cnaes", "motivos", "municipios", "naturezas",
          "paises", "qualificacoes")


def only(*tables: str) -> List[str]:
    return [f"job.tables.{t}.enabled=false" for t in TABLES if t not in tables]


# ---------------------------------------------------------------- the bar, unit level


def test_the_bar_is_redrawn_in_place_and_a_log_line_clears_it_first() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("loadkit.test_progress_bar")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        bar = ProgressBar(stream, logger=logger.name)
        bar.draw("one")
        bar.draw("two")
        logger.info("a log line")
        bar.draw("three")
        bar.close()
        logger.info("after")  # the filter is gone: no clearing sequence once the bar is closed
    finally:
        logger.handlers[:] = []
    assert stream.getvalue() == ("\rone\x1b[K\rtwo\x1b[K" "\r\x1b[K" "a log line\n" "\rthree\x1b[K" "\n" "after\n")
    assert handler.filters == []


def test_the_bar_line_shows_share_eta_rows_and_rate() -> None:
    figures = {"done_fraction": 0.42, "eta_s": 70.0, "rows_read": 1234.0, "rows_per_s": 5678.4}
    assert progress_line(figures) == "[########............] 42% of bytes, ETA 1m10s | 1,234 rows, 5,678 rows/s"
    assert progress_line({"rows_read": 5.0, "rows_per_s": 2.0}) == "5 rows, 2 rows/s"  # share unknown


# ---------------------------------------------------------------- finalisation steps, unit level


def test_steps_are_collected_summed_and_slow_ones_logged(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    with modes.step("outside", "t"):
        pass  # no collector open: nothing recorded, nothing raised
    monkeypatch.setattr(modes, "SLOW_STEP_S", 0.01)
    modes.log.addHandler(caplog.handler)  # the "loadkit" logger may not propagate (logs.setup_logging)
    try:
        with caplog.at_level(logging.INFO, logger="loadkit.postgres.modes"), modes.record_steps() as steps:
            with modes.step("upsert", "t"):
                time.sleep(0.02)
            with modes.step("indexes", "t"):
                pass
            with modes.step("indexes", "t"):
                pass
    finally:
        modes.log.removeHandler(caplog.handler)
    assert list(steps) == ["upsert", "indexes"] and steps["upsert"] >= 0.02
    assert "t: finalise step upsert took" in caplog.text and "step indexes" not in caplog.text
    metrics = RunMetrics({"t": "merge"})
    metrics.tables["t"].finalise_steps = dict(steps)
    final = metrics.final(1.0, 0, 0, 0)
    assert final["t.finalise.upsert_s"] == steps["upsert"] and "t.finalise.indexes_s" in final


# ---------------------------------------------------------------- through a real run


@pytest.mark.e2e
def test_merge_and_replace_finalisation_report_their_steps(tmp_path: Path, job_overrides: Any) -> None:
    from loadkit.examples.cnpj.sample import generate_month
    from loadkit.runner import run_job

    generate_month(tmp_path / "data", 2024, 5, rows=60, shards=1, seed=5)
    result = run_job(compose(job_overrides(tmp_path / "data", *only("empresas", "cnaes"), "env.executor=inprocess",
                                           "tracking.enabled=false")))
    assert result.status == "succeeded", result.error
    merge, replace = result.metrics.tables["empresas"], result.metrics.tables["cnaes"]
    # a first load into the empty target: staging swapped in, the sample's duplicate keys (known from the
    # writers' key hints) deleted in place, then PK and indexes built once; an empty target has nothing for the
    # sync to delete (a reload: upsert, ...)
    assert list(merge.finalise_steps) == ["swap", "dedup_hint", "primary_key", "indexes", "analyze"]
    assert list(replace.finalise_steps) == ["insert", "primary_key", "indexes", "analyze", "swap", "drop_staging",
                                            "count"]
    for tm in (merge, replace):
        assert all(s >= 0 for s in tm.finalise_steps.values())
        assert 0 < sum(tm.finalise_steps.values()) <= tm.finalise_s
    final = result.metrics.final(result.wall_s, 0, 0, 0)
    assert final["empresas.finalise.primary_key_s"] == merge.finalise_steps["primary_key"]
    assert final["cnaes.finalise.swap_s"] == replace.finalise_steps["swap"]


@pytest.mark.e2e
def test_a_terminal_gets_an_in_place_bar_ending_at_100_percent(tmp_path: Path, pg_dsn: str, schemas: tuple) -> None:
    from loadkit.examples.cnpj.sample import generate_month

    generate_month(tmp_path / "data", 2024, 5, rows=60, shards=1, seed=5)
    target, led = schemas
    args = ["+job=monthly", "year=2024", "month=5", f"data_root={tmp_path / 'data'}", f"sink.dsn={pg_dsn}",
            f"job.schema={target}", f"sink.ledger_schema={led}", "tracking.enabled=false",
            "env.executor=inprocess", "env.progress_bars=true", *only("empresas", "cnaes")]
    env = {k: v for k, v in os.environ.items() if k not in ("LOADKIT_DSN", "LOADKIT_SWEEP_ID", "LOADKIT_FULL_ERROR")}
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "loadkit", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    out = b""
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal closed it
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = out.decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:]
    draws = [part.split("\x1b[K")[0] for part in text.split("\r") if "% of bytes" in part and "rows/s" in part]
    assert draws, text[-3000:]  # drawn in place: each draw starts with a carriage return
    assert draws[-1].startswith("[####################] 100% of bytes, ETA 0s | "), draws[-1]
    assert "progress: " not in text  # no repeated progress log lines on a terminal (they go to DEBUG)
