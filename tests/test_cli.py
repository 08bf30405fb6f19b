"""The command line as a user runs it: exit codes, one clear error line, the summary."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from tests.helpers import ROOT, query

pytestmark = pytest.mark.e2e


def cli(args: List[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("LOADKIT_DSN", None)
    return subprocess.run([sys.executable, "-m", "loadkit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_config_error_exits_2_naming_the_key() -> None:
    out = cli(["+job=monthly", "year=2024", "month=5", "pool.writers=0"])
    assert out.returncode == 2
    assert "pool.writers" in out.stderr and "Traceback" not in out.stderr


def test_unknown_key_exits_2() -> None:
    out = cli(["+job=monthly", "year=2024", "month=5", "batch.sise=3"])
    assert out.returncode == 2
    assert "sise" in out.stderr and "Traceback" not in out.stderr


def test_missing_month_folder_exits_3_listing_the_path(tmp_path: Path) -> None:
    out = cli(["+job=monthly", "year=2031", "month=1", f"data_root={tmp_path}", "tracking.enabled=false",
               "fetch=never"])  # the local path error, not the download of a month that does not exist
    assert out.returncode == 3, out.stderr
    assert str(tmp_path) in out.stderr and "2031-01" in out.stderr


def test_dead_database_exits_4_without_password(tmp_path: Path) -> None:
    from loadkit.examples.cnpj.sample import generate_month

    generate_month(tmp_path, 2024, 5, rows=50, shards=1)
    out = cli(["+job=monthly", "year=2024", "month=5", f"data_root={tmp_path}", "tracking.enabled=false",
               "sink.dsn=postgresql://root:hunter2@127.0.0.1:1/test", "sink.connect_timeout=2"])
    assert out.returncode == 4, out.stderr
    assert "hunter2" not in out.stderr + out.stdout
    assert "cannot connect" in out.stderr


def test_flagship_command_on_the_committed_sample(pg_dsn: str, schemas: tuple, mlflow_uri: str) -> None:
    target, led = schemas
    out = cli(["+job=monthly", "year=2024", "month=5", f"sink.dsn={pg_dsn}", f"job.schema={target}",
               f"sink.ledger_schema={led}", f"tracking.uri={mlflow_uri}", "env.progress_bars=false"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "estabelecimentos" in out.stdout and "run id:" in out.stdout
    assert f"mlflow ui --backend-store-uri {mlflow_uri}" in out.stderr  # how to open the run in the UI
    run_id = out.stdout.strip().splitlines()[-1].split()[-1]
    status = query(pg_dsn, f'SELECT status, rows_read, rows_loaded + rows_rejected FROM "{led}".run WHERE run_id=%s',
                   (run_id,))
    assert status[0][0] == "succeeded" and status[0][1] == status[0][2] > 0


# ---------------------------------------------------------------- the framework CLI (issue 12)


def loadkit(args: List[str], cwd: Path, timeout: int = 300, **env_extra: str) -> subprocess.CompletedProcess:
    """``python -m loadkit`` from a folder outside the checkout (the checkout only on PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOADKIT_DSN", "LOADKIT_CONFIG_DIR", "LOADKIT_CONF")}
    env.update(PYTHONPATH=str(ROOT), LOADKIT_HOME=str(cwd / "home"), **env_extra)
    return subprocess.run([sys.executable, "-m", "loadkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture()
def user_project(tmp_path: Path) -> Path:
    """A user's folder: conf/job/weather.yaml, conf/weather_run.yaml (a primary config of their
    own, on top of loadkit's) and data/seattle-weather.csv."""
    import shutil

    from tests.test_identity import weather_csv, write_job

    write_job(tmp_path / "conf")
    (tmp_path / "conf" / "weather_run.yaml").write_text(
        "defaults:\n  - config\n  - job: weather\n  - _self_\ndata_root: data\n")
    (tmp_path / "data").mkdir()
    shutil.copy(weather_csv(), tmp_path / "data" / "seattle-weather.csv")
    return tmp_path


def test_import_resolves_nothing(tmp_path: Path) -> None:
    code = "import loadkit.__main__, loadkit.cli; print('imported')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "LOADKIT_CONF": str(tmp_path / "nowhere")})
    assert out.returncode == 0 and out.stdout.strip() == "imported", out.stderr


def test_hydra_flags_work_as_in_any_hydra_app(user_project: Path) -> None:
    shown = loadkit(["--config-dir", "conf", "--cfg", "job", "+job=weather"], user_project)
    assert shown.returncode == 0 and "seattle_weather" in shown.stdout, shown.stderr
    info = loadkit(["-cd", "conf", "--info", "searchpath"], user_project)
    assert info.returncode == 0 and str(user_project / "conf") in info.stdout, info.stderr
    # -cn: the user's own primary config, which extends loadkit's
    named = loadkit(["plan", "-cd", "conf", "-cn", "weather_run", "sink.dsn=postgresql://x@127.0.0.1:1/x",
                     "sink.connect_timeout=1"], user_project)
    assert named.returncode == 0 and "table public.seattle_weather" in named.stdout, named.stderr
    # --help says how to see a job's keys (without a job they are null), and shows them once one is chosen
    bare = loadkit(["run", "--help"], user_project)
    assert bare.returncode == 0 and "loadkit +job=monthly --help" in bare.stdout, bare.stderr
    chosen = loadkit(["-cd", "conf", "+job=weather", "--help"], user_project)
    assert chosen.returncode == 0 and "seattle_weather" in chosen.stdout and "tables:" in chosen.stdout
    searched = loadkit(["plan", f"hydra.searchpath=[file://{user_project / 'conf'}]", "+job=weather",
                        "data_root=data", "sink.dsn=postgresql://x@127.0.0.1:1/x", "sink.connect_timeout=1"],
                       user_project)
    assert searched.returncode == 0 and "CREATE TABLE" in searched.stdout, searched.stderr


def test_config_errors_keep_hydras_hints(user_project: Path) -> None:
    wrong = loadkit(["+job=nope"], user_project, LOADKIT_CONFIG_DIR=str(user_project / "conf"))
    assert wrong.returncode == 2 and "Available options" in wrong.stderr
    assert "monthly" in wrong.stderr and "weather" in wrong.stderr  # loadkit's jobs and the project's
    plain = loadkit(["job=monthly"], user_project)
    assert plain.returncode == 2 and "+job=monthly" in plain.stderr and "Traceback" not in plain.stderr
    helped = loadkit(["help"], user_project)
    assert helped.returncode == 0 and all(c in helped.stdout for c in ("run", "plan", "init", "history", "db"))


def test_plan_prints_files_ddl_and_ledger_and_writes_nothing(user_project: Path, pg_dsn: str,
                                                             schemas: tuple) -> None:
    target, led = schemas
    args = ["plan", "+job=weather", "data_root=data", f"sink.dsn={pg_dsn}", f"job.schema={target}",
            f"sink.ledger_schema={led}"]
    before = loadkit(args, user_project, LOADKIT_CONFIG_DIR=str(user_project / "conf"))
    assert before.returncode == 0, before.stderr
    assert "seattle-weather.csv" in before.stdout and "ledger: new" in before.stdout
    assert f'CREATE TABLE "{target}"."seattle_weather"' in before.stdout and "would load 1 of 1" in before.stdout
    assert query(pg_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname IN (%s, %s)", (target, led)) == [(0,)]
    from loadkit.source import files

    sha = files.fingerprint(user_project / "data" / "seattle-weather.csv")
    assert sha[:16] in before.stdout

    from loadkit.runner import run_job
    from tests.helpers import compose

    run_job(compose([f"hydra.searchpath=[file://{user_project / 'conf'}]", "+job=weather",
                     f"data_root={user_project / 'data'}", f"sink.dsn={pg_dsn}", f"job.schema={target}",
                     f"sink.ledger_schema={led}", "tracking.enabled=false", "env.executor=inprocess"]))
    after = loadkit(args, user_project, LOADKIT_CONFIG_DIR=str(user_project / "conf"))
    assert after.returncode == 0 and "ledger: loaded" in after.stdout and "would load 0 of 1" in after.stdout
    assert "no DDL" in after.stdout
    history = loadkit(["history", "--dsn", pg_dsn, "--ledger-schema", led, "list"], user_project)
    assert history.returncode == 0 and "weather" in history.stdout, history.stderr


@pytest.mark.slow
def test_db_url_starts_the_embedded_server_in_the_home_and_stop_stops_it(tmp_path: Path) -> None:
    import psycopg2

    url = loadkit(["db", "url"], tmp_path, timeout=180)
    assert url.returncode == 0 and url.stdout.startswith("postgresql://"), url.stderr[-2000:]
    try:
        psycopg2.connect(url.stdout.strip(), connect_timeout=10).close()
        assert (tmp_path / "home" / "pgdata" / "PG_VERSION").is_file()
    finally:
        stopped = loadkit(["db", "stop"], tmp_path)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not (tmp_path / "home" / "pgdata" / "postmaster.pid").exists()
    assert "no embedded PostgreSQL running" in loadkit(["db", "stop"], tmp_path).stdout


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LOADKIT_DSN", "LOADKIT_NORMAL_EXIT")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_importing_the_cli_and_planning_import_no_mlflow() -> None:
    """MLflow (~2 CPU-s to import) is not loaded by the command line itself nor by a plan: a run
    imports it only to write its record (issue 16)."""
    out = _python(
        "import sys\n"
        "import loadkit.cli, loadkit.__main__\n"
        "print('import', sorted(m for m in ('mlflow', 'ray') if m in sys.modules))\n"
        "try:\n"
        "    loadkit.cli.main(['plan', '+job=monthly', 'year=2024', 'month=5', 'data_root=data',\n"
        "                      'sink.dsn=postgresql://x@127.0.0.1:1/x', 'tracking=local'])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
        "print('plan', sorted(m for m in ('mlflow', 'ray') if m in sys.modules))\n")
    assert out.returncode == 0, out.stderr
    assert "import []" in out.stdout and "plan []" in out.stdout, out.stdout
    assert "CREATE" in out.stdout  # the plan was printed: the command really ran


@pytest.mark.parametrize("code, status, err", [("3", 3, ""), ("None", 0, ""), ("'boom'", 1, "boom"),
                                                ("True", 1, "")])
def test_fast_exit_runs_atexit_flushes_output_and_keeps_the_code(tmp_path: Path, code: str, status: int,
                                                                  err: str) -> None:
    """``exit_now`` skips the interpreter's teardown, not what matters at exit: atexit handlers
    (logging, Ray, OpenTelemetry), buffered stdout/stderr and the exit code as SystemExit has it."""
    marker = tmp_path / "atexit.txt"
    out = _python(
        "import atexit, logging, sys\n"
        f"logging.basicConfig(filename={str(tmp_path / 'log.txt')!r})\n"
        "logging.getLogger('t').warning('logged')\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
        "sys.stdout.write('partial line, no newline')\n"
        "from loadkit.__main__ import exit_now\n"
        f"exit_now({code})\n"
        "print('not reached')\n")
    assert out.returncode == status, out.stderr
    assert out.stdout == "partial line, no newline"
    assert out.stderr.strip() == err
    assert marker.read_text() == "ran"
    assert "logged" in (tmp_path / "log.txt").read_text()


def test_fast_exit_waits_for_a_non_daemon_thread(tmp_path: Path) -> None:
    """A live non-daemon thread makes exit_now fall back to the normal exit, which waits for it."""
    done = tmp_path / "thread.txt"
    out = _python(
        "import threading, time\n"
        "def work():\n"
        "    time.sleep(0.5)\n"
        f"    open({str(done)!r}, 'w').write('finished')\n"
        "threading.Thread(target=work).start()\n"
        "from loadkit.__main__ import exit_now\n"
        "exit_now(4)\n")
    assert out.returncode == 4, out.stderr
    assert done.read_text() == "finished"
