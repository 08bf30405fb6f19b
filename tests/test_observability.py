"""Observability that tells the truth: the printed summary, ``history show`` and MLflow agree;
a CLI run's MLflow record is written in the background without holding the shell; a bug shows
its traceback; a normal run prints no warning noise."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from loadkit import tracking
from loadkit.examples.cnpj.sample import SampleManifest
from loadkit.history import main as history_main
from loadkit.records import BatchResult, Kind
from tests.helpers import ROOT

pytestmark = pytest.mark.e2e


MONTH = {"rows": 150, "shards": 1, "seed": 23}  # the size of conftest's `month`


def cli(month: SampleManifest, pg_dsn: str, schemas: tuple, mlflow_uri: str, *extra: str,
        env_extra: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    target, led = schemas
    args = ["+job=monthly", "year=2024", "month=5", f"data_root={month.root}", f"sink.dsn={pg_dsn}",
            f"job.schema={target}", f"sink.ledger_schema={led}", f"tracking.uri={mlflow_uri}",
            "env.progress_bars=false", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("LOADKIT_DSN", "LOADKIT_SWEEP_ID", "LOADKIT_FULL_ERROR")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "loadkit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env, check=False)


def summary_rows(stdout: str) -> Dict[str, List[str]]:
    """The summary table's rows by first cell (TOTAL's empty mode column drops out of split())."""
    lines = stdout[stdout.index("table "):].splitlines()
    return {line.split()[0]: line.split() for line in lines[2:] if line.strip() and not line.startswith("run id")}


def wait_for_run(uri: str, loadkit_run_id: str, timeout_s: float = 120) -> object:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            found = tracking.find_by_loadkit_run(uri, loadkit_run_id)
        except Exception:  # noqa: BLE001 - a brand-new SQLite store may still be migrating in the flusher
            found = None
        if found is not None and found.info.status == "FINISHED":
            return found
        time.sleep(1)
    raise AssertionError(f"the background flush never recorded run {loadkit_run_id}")


@pytest.mark.slow
def test_summary_history_and_mlflow_show_the_same_numbers(month: SampleManifest, pg_dsn: str, schemas: tuple,
                                                          mlflow_uri: str, capsys: pytest.CaptureFixture) -> None:
    tracking.find_runs(mlflow_uri)  # the store exists (creating one races with any concurrent reader)
    out = cli(month, pg_dsn, schemas, mlflow_uri, env_extra={"PYTHONPROFILEIMPORTTIME": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    imports = [line for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert imports and not [line for line in imports if line.split("|")[-1].strip().startswith("mlflow")], \
        "a CLI run imports nothing of MLflow (the background flush process does)"
    noise = [line for line in out.stderr.splitlines() if not line.startswith("import time:") and
             ("XDG_RUNTIME_DIR" in line or "Warning" in line)]
    assert noise == [], noise
    summary = summary_rows(out.stdout)
    run_id = out.stdout.split("run id: ")[1].split()[0]
    assert "MLflow run recorded in the background" in out.stderr  # the shell did not wait for MLflow
    assert "progress: 100% of bytes, ETA 0s: " in out.stderr

    run = wait_for_run(mlflow_uri, run_id)
    m = run.data.metrics
    # TOTAL files skipped read loaded rejected inserted updated unchanged duplicates deleted stream final seconds
    # rows/s
    total = summary["TOTAL"]
    assert f"{m['rows_read']:,.0f}" == total[3] and f"{m['rows_per_s']:,.0f}" == total[14]
    assert f"{m['wall_s']:.1f}" == total[13] and f"{m['stream_s']:.1f}" == total[11]
    assert f"{m['finalise_s']:.1f}" == total[12]
    for name in month.rows:  # name mode files skipped read loaded rejected ins upd unch dup del stream final s rows/s
        row = summary[name]
        assert f"{m[f'{name}.rows_per_s']:,.0f}" == row[15] and f"{m[f'{name}.seconds']:.1f}" == row[14]
        assert float(row[14]) == pytest.approx(float(row[12]) + float(row[13]), abs=0.11)  # finalisation included
    # Progress samples live under their own names: the final value is the only one under the plain name.
    assert [p.step for p in tracking.metric_history(mlflow_uri, run.info.run_id, "rows_per_s")] == [0]
    assert tracking.metric_history(mlflow_uri, run.info.run_id, "progress.rows_per_s")

    _, led = schemas
    assert history_main(["--dsn", pg_dsn, "--ledger-schema", led, "--tracking-uri", mlflow_uri, "show", run_id]) == 0
    shown = capsys.readouterr().out
    assert run.info.run_id in shown, "history found the background-flushed run by its tag"
    shown_metrics = {line.split()[0]: line.split()[1] for line in shown.splitlines() if len(line.split()) == 2}
    assert shown_metrics["rows_per_s"] == total[14] and f"rows read {total[3]}," in shown
    tables = {line.split()[0]: line.split() for line in shown.splitlines() if line.split()[:1] and
              line.split()[0] in month.rows}
    for name in month.rows:  # table mode status files skipped read loaded rejected seconds rows/s
        assert tables[name][-1] == summary[name][15] and tables[name][-2] == summary[name][14]
    artifacts = [a.path for a in tracking._client(mlflow_uri).list_artifacts(run.info.run_id)]
    assert {"report.html", "summary.txt", "memory.parquet"} <= set(artifacts)


def test_a_bug_shows_its_traceback_and_the_ledger_keeps_it(month: SampleManifest, pg_dsn: str, schemas: tuple,
                                                          job_overrides, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture) -> None:
    from loadkit.postgres import modes
    from loadkit.runner import run_job
    from tests.helpers import compose, query

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("finalize got a bad argument")  # stands for any programming error

    for mode in {modes.WriteMode, *modes.MODES.values(), modes.Sync}:  # every write mode's publish step
        monkeypatch.setattr(mode, "finalize", broken)
    monkeypatch.setenv("LOADKIT_FULL_ERROR", "1")
    caplog.set_level("INFO", logger="loadkit")
    result = run_job(compose(job_overrides(month.root, "env.executor=inprocess", "tracking=off")))
    assert result.status == "failed" and isinstance(result.error, TypeError)
    logged = [r for r in caplog.records if r.getMessage().startswith("bug: TypeError")]
    assert len(logged) == 1 and "Traceback" in logged[0].getMessage() and "in broken" in logged[0].getMessage()
    _, led = schemas
    [(category, text)] = query(pg_dsn, f'SELECT error_category, error_text FROM "{led}".run')
    assert category == "bug" and text.startswith("TypeError: finalize got a bad argument\nTraceback")
    assert history_main(["--dsn", pg_dsn, "--ledger-schema", led, "show", result.run_id]) == 0
    shown = capsys.readouterr().out
    assert shown.count("error (bug): TypeError") == 1 and shown.count("Traceback") == 1 and "in broken" in shown


def test_the_notebook_finds_the_store_the_cli_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From notebooks/ or any folder, the notebook reads the store the CLI wrote: the one in loadkit's home."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LOADKIT_HOME", str(tmp_path / "home"))
    (tmp_path / "notebooks").mkdir()
    expected = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert tracking.default_uri() == expected
    assert tracking.find_default_uri(tmp_path / "notebooks") == expected
    monkeypatch.chdir(tmp_path / "notebooks")
    assert tracking.find_default_uri() == expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.find_default_uri(tmp_path / "notebooks") == "http://127.0.0.1:5000"


def batch_result(kind: Kind, sha: str, member: Optional[str], nbytes: int) -> BatchResult:
    """A committed batch (or a file's eof) of table t that parsed ``nbytes`` of file ``sha``/``member``."""
    return BatchResult(kind=kind, table_name="t", file_sha=sha, member=member, status="committed",
                       rows_in=10, rows_loaded=10, bytes=nbytes, attempts=1, write_s=0.1, parse_s=0.1, writer="w",
                       pool_utilisation=0.1, rss_bytes=1, finished_at=time.time(), chunks=int(kind == "eof"))


def test_progress_is_a_share_of_bytes_with_an_eta(tmp_path: Path) -> None:
    import zipfile

    from loadkit.metrics import RunMetrics, format_eta, progress_text, uncompressed_size

    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("one.csv", b"x" * 6000)
        zf.writestr("two.csv", b"y" * 4000)
    assert uncompressed_size(str(path), "zip", path.stat().st_size) == (10_000, 2)
    m = RunMetrics({"t": "append"})
    m.expect([("t", "sha", str(path), "zip", path.stat().st_size)])
    assert m.done_fraction() == 0.0 and m.eta_s() is None

    m.add(batch_result("data", "sha", "one.csv", 6000))
    assert m.done_fraction() == pytest.approx(0.6) and m.eta_s() is not None
    m.add(batch_result("eof", "sha", "one.csv", 0))
    m.add(batch_result("data", "sha", "two.csv", 3990))  # a member's last bytes may be a trailing newline never parsed
    assert m.done_fraction() < 1.0
    m.add(batch_result("eof", "sha", "two.csv", 0))
    assert m.done_fraction() == 1.0 and m.eta_s() == pytest.approx(0.0)
    assert (format_eta(None), format_eta(12.4), format_eta(245), format_eta(3725)) == ("?", "12s", "4m05s", "1h02m")
    assert progress_text(0.42, 70, bar=True) == "[########............] 42% of bytes, ETA 1m10s"
    assert progress_text(None, None) == ""


def test_the_eta_is_unknown_while_a_file_outgrows_its_planned_size() -> None:
    """A URL listed without a size is planned at 1 byte, a Parquet file at its file size against the Arrow
    bytes parsed: past its planned size, the fraction done says nothing about the time left, so there is
    no ETA (the progress line shows '?', and a background run counts the stream as long) until it ends."""
    from loadkit.metrics import RunMetrics

    m = RunMetrics({"t": "append"})
    m.expect([("t", "known", "a.csv", "csv", 100_000), ("t", "unsized", "https://x/b.csv", "csv", 0)])

    m.add(batch_result("data", "known", None, 50_000))
    assert m.eta_s() is not None, "both estimates still hold"
    m.add(batch_result("data", "unsized", None, 5_000))
    assert m.eta_s() is None, "b.csv parsed 5000 bytes of a planned 1"
    m.add(batch_result("eof", "unsized", None, 0))
    assert m.eta_s() is not None, "b.csv ended: it counts whole"
    m.add(batch_result("data", "known", None, 60_000))
    assert m.eta_s() is None, "a.csv parsed 110000 bytes of a planned 100000"
    m.add(batch_result("eof", "known", None, 0))
    assert m.eta_s() == pytest.approx(0.0)


def test_a_long_step_is_never_silent(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from loadkit.logs import heartbeat

    log = logging.getLogger("loadkit.test")
    caplog.set_level("DEBUG", logger="loadkit")
    with heartbeat(log, "finalising big (merge)", every_s=0.05):
        time.sleep(0.3)
    with heartbeat(log, "finalising small (merge)", every_s=5):
        pass
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any(m.startswith("still finalising big (merge)") for m in messages)
    assert any(m.startswith("finalising big (merge): done in") for m in messages)
    assert not any("small" in m for m in messages), "a quick step adds no INFO line"


def test_a_long_background_run_opens_the_store_and_logs_live(month: SampleManifest, job_overrides,
                                                             mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Background mode on a run longer than live_after_s (0 here) and sampled while it streams (after every
    batch here, as a long run is every 5 s): the store opens mid-run, the record is written before the run
    returns and the ledger gets its MLflow id, as in sync mode."""
    from loadkit import supervise
    from loadkit.runner import run_job
    from tests.helpers import compose

    monkeypatch.setattr(supervise, "_PROGRESS_EVERY_S", 0.0)
    result = run_job(compose(job_overrides(month.root, "env.executor=inprocess", "tracking.flush=background",
                                           "tracking.live_after_s=0")))
    assert result.status == "succeeded" and result.mlflow_run_id
    run = tracking.get_run(mlflow_uri, result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["rows_read"] == sum(month.rows.values())
    assert tracking.metric_history(mlflow_uri, result.mlflow_run_id, "progress.rows_read")


@pytest.mark.parametrize("later_eta_s", [None, 5.0, 30.0])
def test_a_background_run_about_to_end_never_opens_the_store_mid_run(tmp_path: Path,
                                                                     later_eta_s: Optional[float]) -> None:
    """Past live_after_s, a stream sample whose ETA is shorter than live_after_s, and the final metrics, leave
    MLflow unopened (the detached flush writes the record at the end); a sample with as long to go, or no
    ETA, opens it and logs live."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.RunTracker(True, uri, "live-test", flush="background", live_after_s=5.0)
    tracker.start("live", {"year": 2024}, {})
    tracker._started -= 10  # the run has streamed 10 s
    tracker.progress({"rows_read": 100.0, "eta_s": 4.9}, 1)
    tracker.metrics({"rows_read": 200.0})
    assert tracker.run_id is None, "a run with 4.9 s to go opened the store"
    tracker.progress({"rows_read": 120.0}, 2, stream_ended=True)
    assert tracker.run_id is None, "the sample taken as the stream ended opened the store"
    tracker.progress({"rows_read": 150.0} if later_eta_s is None else {"rows_read": 150.0, "eta_s": later_eta_s}, 3)
    run_id = tracker.run_id
    assert run_id is not None, "a run with as long to go (or no ETA) did not open the store"
    tracker.end("succeeded")
    run = tracking.get_run(uri, run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["rows_read"] == 200.0
    assert [m.value for m in tracking.metric_history(uri, run_id, "progress.rows_read")] == [100.0, 120.0, 150.0]


def test_a_background_store_that_fails_while_opening_at_the_end_hands_the_record_to_the_flush(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The live open is still in flight when the run ends, and fails: end() neither raises nor drops the
    record; the detached flush (its own process, MLflow unpatched) writes all of it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    warm = tracking.RunTracker(True, uri, "fail-test", flush="sync")
    warm.start("warm", {}, {})
    warm.end("succeeded")  # the store exists (a detached flush never creates one)

    def slow_failing_client(_uri: object) -> object:
        time.sleep(0.5)
        raise RuntimeError("store down")

    monkeypatch.setattr(tracking, "_client", slow_failing_client)
    tracker = tracking.RunTracker(True, uri, "fail-test", flush="background", live_after_s=5.0)
    tracker.start("late", {"year": 2024}, {"loadkit_run_id": "lk-late-fail"})
    tracker._started -= 10
    tracker.progress({"rows_read": 1.0}, 1)  # no ETA: opens, and the open is still failing when end() comes
    tracker.metrics({"rows_read": 9.0})
    tracker.artifact_text("summary.txt", "nine rows")
    tracker.end("succeeded")
    monkeypatch.undo()
    run = tracking.find_by_loadkit_run(uri, "lk-late-fail", experiment="fail-test", wait_s=90)
    assert run is not None and run.info.status == "FINISHED"
    assert run.data.metrics["rows_read"] == 9.0 and run.data.params["year"] == "2024"
    assert [m.value for m in tracking.metric_history(uri, run.info.run_id, "progress.rows_read")] == [1.0]


def test_the_final_batch_figures_are_the_tables_counts() -> None:
    """MLflow's ``batches`` and ``batches_per_s`` are the tables' counts, which an interrupted run takes from its
    ledger (PostgresSink._counts_from_ledger): a batch committed as the stop came, whose result never reached
    the driver, is counted. Before (a fresh-user review, session 20), MLflow and ``history show`` said 52 batches
    where the run's ledger, summary and run row held 53."""
    from loadkit.metrics import RunMetrics

    m = RunMetrics({"t": "append"})
    for _ in range(2):
        m.add(batch_result("data", "sha", "one.csv", 100))
    assert m.final(2.0, 0, 0, 0)["batches"] == 2
    m.tables["t"].batches, m.tables["t"].rows_read = 3, 30  # the ledger's figures after the stop
    final = m.final(2.0, 0, 0, 0)
    assert (final["batches"], final["batches_per_s"], final["rows_read"]) == (3, 1.5, 30)
