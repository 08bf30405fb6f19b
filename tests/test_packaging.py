"""Installed as users install it: build the wheel, install it into a fresh virtualenv outside the
repository, and run a user's own job from a temporary folder with the ``loadkit`` console script.

The virtualenv reuses this environment's dependencies through a .pth file (added after the
install, so pip sees an empty environment and ``--no-deps`` installs only loadkit); nothing of
the checkout is importable there: ``loadkit`` must resolve to the installed wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, query
from tests.test_identity import WEATHER_PRECIPITATION, WEATHER_ROWS, weather_csv, write_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def build_wheel(out: Path) -> Path:
    """The wheel of a clean copy of the sources (no build/ or egg-info left in the checkout; no extension
    built in place either: the wheel build compiles its own)."""
    src = out / "src"
    shutil.copytree(ROOT / "loadkit", src / "loadkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = out / "dist"
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return dist / done.stdout.strip().splitlines()[-1]


def make_venv(where: Path, wheel: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "--no-compile", "--disable-pip-version-check", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "_loadkit_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return where / "bin"


def test_wheel_installs_and_runs_a_user_job_outside_the_repo(tmp_path: Path, pg_dsn: str, schemas: tuple) -> None:
    wheel = build_wheel(tmp_path / "build")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    # loadkit-0.1.0-cp311-cp311-linux_x86_64.whl: a platform wheel, it holds the C extensions (scanner, key hashes)
    assert {n.split("/")[0] for n in names} == {"loadkit", "-".join(wheel.name.split("-")[:2]) + ".dist-info"}
    for ext in ("loadkit/source/_scanner.", "loadkit/postgres/_keyhash."):
        assert [n for n in names if n.startswith(ext) and n.endswith(".so")], (ext, names)
    assert "loadkit/postgres/_keyhash.pyi" in names
    for group in ("config.yaml", "sink/default.yaml", "batch/fixed.yaml", "pool/default.yaml", "retry/default.yaml",
                  "alerts/default.yaml", "env/local.yaml", "tracking/local.yaml", "job/monthly.yaml"):
        assert f"loadkit/conf/{group}" in names, group
    assert "loadkit/examples/cnpj/sample.py" in names

    bin_dir = make_venv(tmp_path / "venv", wheel)
    work = tmp_path / "project"  # the user's folder: their conf/job and their data, nothing of loadkit
    data = work / "data"
    data.mkdir(parents=True)
    shutil.copy(weather_csv(), data / "seattle-weather.csv")
    write_job(work / "conf")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOADKIT_DSN", "LOADKIT_CONF",
                                                             "LOADKIT_CONFIG_DIR", "LOADKIT_HOME")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")  # platformdirs' per-user folder, private to this test

    def loadkit(*args: str, cwd: Path = work, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / "loadkit"), *args], cwd=cwd, capture_output=True, text=True,
                              timeout=300, env={**env, **extra})

    where = subprocess.run([str(bin_dir / "python"), "-c", "import loadkit.__main__ as m; print(m.__file__); "
                            "import loadkit.source.scanner as s; print(s.ACCELERATED); "
                            "import loadkit.postgres.keyhints as k; print(k.ACCELERATED)"],
                           cwd=work, capture_output=True, text=True, env=env, timeout=120)
    assert where.returncode == 0 and where.stdout.startswith(str(tmp_path / "venv")), where.stdout + where.stderr
    assert where.stdout.split()[-2:] == [str(os.environ.get("LOADKIT_SCANNER", "").lower() != "numpy"),
                                         str(os.environ.get("LOADKIT_KEYHASH", "").lower() != "numpy")], where.stdout

    target, led = schemas
    common = ["+job=weather", f"data_root={data}", f"sink.dsn={pg_dsn}", f"sink.ledger_schema={led}",
              "tracking.enabled=false", "env.executor=inprocess", "env.progress_bars=false"]
    out = loadkit("--config-dir", "conf", *common, f"job.schema={target}")
    assert out.returncode == 0, out.stderr[-3000:]
    got = query(pg_dsn, f'SELECT count(*), sum(precipitation)::text FROM "{target}".seattle_weather')
    assert got == [(WEATHER_ROWS, WEATHER_PRECIPITATION)]
    # The same job through LOADKIT_CONFIG_DIR, from another folder: the ledger recognises the file.
    again = loadkit(*common, f"job.schema={target}", cwd=tmp_path, LOADKIT_CONFIG_DIR=str(work / "conf"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipped" in again.stdout
    assert query(pg_dsn, f'SELECT count(*) FROM "{target}".seattle_weather') == [(WEATHER_ROWS,)]
    # One home for local state whatever the folder; nothing written into the user's folder.
    homes = {loadkit("db", "path", cwd=cwd).stdout.strip() for cwd in (work, tmp_path)}
    assert homes == {str(tmp_path / "xdg" / "loadkit" / "pgdata")}
    assert sorted(p.name for p in work.iterdir()) == ["conf", "data"]
