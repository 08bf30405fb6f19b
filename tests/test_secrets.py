"""No DSN password in any output: masking by libpq's reading of the DSN, for valid and malformed DSNs.

Property tests over random passwords drawn from the whole printable set (reserved URI characters,
quotes, backslashes, spaces, '%', '#'), in every DSN shape: URI percent-encoded (valid), URI written
raw (malformed whenever a reserved character is in it), key=value quoted (valid) and unquoted
(malformed with a space or quote). Then one real run per shape with MLflow on: the ledger's run
row, MLflow params/tags/artifacts and the log hold no password; and the CLI (``--cfg job``, a
malformed DSN) prints none and exits 2 for the malformed one.
"""
from __future__ import annotations

import json
import logging
import os
import string
import subprocess
import sys
from pathlib import Path
from typing import List
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadkit.postgres import db
from loadkit.errors import Category, ConfigError, LoadkitError, classify
from loadkit.logs import TextFormatter
from loadkit.security import MIN_FREE_TEXT_SECRET, mask_dsn, mask_mapping, mask_text
from tests.helpers import ROOT, compose, query

PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " "
passwords = st.text(alphabet=PRINTABLE, min_size=MIN_FREE_TEXT_SECRET, max_size=24).filter(lambda p: p.strip())


def kv_quote(pw: str) -> str:
    return "'" + pw.replace("\\", "\\\\").replace("'", "\\'") + "'"


def shapes(pw: str, host: str = "127.0.0.1", port: int = 1, dbname: str = "test") -> List[str]:
    """Five ways to write one DSN with password ``pw`` (``dbname``: the database, the test server's own in a
    real run -- a reviewer's LOADKIT_TEST_DSN on another database failed three tests here and left schemas)."""
    return [
        f"postgresql://lkuser:{quote(pw, safe='')}@{host}:{port}/{dbname}",  # valid
        f"postgresql://lkuser:{pw}@{host}:{port}/{dbname}",  # raw: malformed if pw has a reserved character
        f"host={host} port={port} user=lkuser dbname={dbname} password={kv_quote(pw)}",  # valid
        f"host={host} port={port} user=lkuser password={pw} dbname={dbname}",  # malformed with a space or quote
        f"postgresql://lkuser@{host}:{port}/{dbname}?password={quote(pw, safe='')}",  # valid, in the query
    ]


def leaks(pw: str, text: str) -> bool:
    return pw in text or quote(pw, safe="") in text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pw=passwords, shape=st.integers(0, 4))
def test_masking_never_shows_a_password(pw: str, shape: int) -> None:
    dsn = shapes(pw)[shape]
    assert not leaks(pw, mask_dsn(dsn) or "")
    assert not leaks(pw, json.dumps(mask_mapping({"sink": {"dsn": dsn}, "note": f"using {dsn}"})))
    assert not leaks(pw, mask_text(f"connecting with {dsn} failed"))
    record = logging.LogRecord("loadkit.postgres.db", logging.ERROR, __file__, 1, "cannot use %s", (dsn,), None)
    assert not leaks(pw, TextFormatter().format(record))
    # libpq's reading: a valid DSN gets its session settings, a malformed one a ConfigError that never
    # quotes it; a connect failure's text is scrubbed either way.
    try:
        session = db.session_dsn(dsn, 2, 1000, 500)
    except ConfigError as exc:
        assert not leaks(pw, str(exc)) and exc.category is Category.CONFIG
        return
    assert not leaks(pw, mask_dsn(session) or "")
    read = db.parse_dsn(session).get("password") or ""
    if shape in (0, 2, 4):
        assert read == pw  # a well-formed DSN: libpq reads the password exactly as written
    elif read:  # a raw key=value password libpq reads differently (a '\\ ' escape): what it read is masked
        assert read not in (mask_dsn(session) or "") or len(read) < MIN_FREE_TEXT_SECRET


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pw=passwords, value=st.text(alphabet=PRINTABLE, max_size=12), where=st.sampled_from(
    ["application_name", "options", "password", "dbname"]))
def test_an_at_sign_outside_the_userinfo_is_no_misread_password(pw: str, value: str, where: str) -> None:
    """A well-formed URI (the password percent-encoded) whose query value or database name holds '@' and other
    reserved characters is accepted, and libpq's reading of it is what parse_dsn returns. Before (a fresh-user
    review, session 20), the check for an unencoded password read up to the last '@' and refused
    ``...?application_name=a@b`` with a valid password as "not read by libpq as written"."""
    value = "@" + value  # always an '@' outside the userinfo
    if where == "dbname":
        dsn = f"postgresql://lkuser:{quote(pw, safe='')}@127.0.0.1:1/{quote(value, safe='@')}"
    elif where == "password":
        dsn = f"postgresql://lkuser@127.0.0.1:1/test?password={quote(value, safe='@')}"
    else:
        dsn = f"postgresql://lkuser:{quote(pw, safe='')}@127.0.0.1:1/test?{where}={quote(value, safe='@')}"
    import psycopg2.extensions

    assert db.parse_dsn(dsn) == psycopg2.extensions.parse_dsn(dsn)
    # a key=value string whose values hold "://" and "@" is no URI (a second review: it was refused)
    kv = f"host=127.0.0.1 port=1 user=lkuser dbname=test password={kv_quote('a://b:' + value)}"
    assert db.parse_dsn(kv) == psycopg2.extensions.parse_dsn(kv)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pw=passwords, shape=st.integers(0, 4))
def test_connect_failures_never_show_a_password(pw: str, shape: int) -> None:
    """Port 1 refuses at once: the driver's error text passes through our scrubbing."""
    try:
        session = db.session_dsn(shapes(pw)[shape], 2)
        db.connect(session).close()
    except LoadkitError as exc:
        assert not leaks(pw, str(exc)), str(exc)
        assert classify(exc) in (Category.CONFIG, Category.TRANSIENT)
    else:
        pytest.fail("connected to port 1")


NASTY = ["p#ss/w@rd%41?x:y", "it's a \\secret\\ 'pw'", "100% ~`!$^&*()[]{}|;<>,.\"="]


@pytest.mark.slow
@pytest.mark.parametrize("shape", [0, 2, 4])
def test_a_real_run_stores_and_logs_no_password(shape: int, pg_dsn: str, schemas: tuple, job_overrides,
                                                mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """The shared server trusts any password, so a run with one succeeds and every record can be searched."""
    from loadkit.examples.cnpj.sample import generate_month
    from loadkit.runner import run_job

    params = db.parse_dsn(pg_dsn)
    pw = NASTY[shape // 2]
    dsn = shapes(pw, params.get("host", "127.0.0.1"), int(params.get("port", 5432)),
                 params.get("dbname", "test"))[shape].replace(
        "user=lkuser", f"user={params.get('user', 'root')}").replace("lkuser", params.get("user", "root"))
    month = generate_month(tmp_path / "data", 2024, 5, rows=50, shards=1, seed=1)
    monkeypatch.setenv("LOADKIT_DSN", dsn)  # no Hydra quoting of the password's characters
    keep = ("~job.tables.empresas", "~job.tables.estabelecimentos", "~job.tables.socios", "~job.tables.simples")
    overrides = [o for o in job_overrides(month.root, "env.executor=inprocess", *keep) if not o.startswith("sink.dsn=")]
    caplog.set_level(logging.DEBUG)
    result = run_job(compose(overrides), tags={"overrides": f"sink.dsn={dsn}"})
    assert result.status == "succeeded", result.error
    _, led = schemas
    stored = json.dumps(query(pg_dsn, f'SELECT config::text, error_text FROM "{led}".run'))
    assert not leaks(pw, stored) and "***" in stored
    assert not leaks(pw, caplog.text)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(result.mlflow_run_id)
    assert not leaks(pw, json.dumps(run.data.params)) and not leaks(pw, json.dumps(run.data.tags))
    artifacts = Path(client.download_artifacts(result.mlflow_run_id, "", str(tmp_path / "artifacts")))
    for f in artifacts.rglob("*"):
        if f.is_file():
            assert not leaks(pw, f.read_bytes().decode("utf-8", "replace")), f


def cli(*args: str, env_dsn: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "LOADKIT_DSN": env_dsn}
    return subprocess.run([sys.executable, "-m", "loadkit", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_cli_masks_cfg_job_and_refuses_a_malformed_dsn_with_exit_2(tmp_path: Path) -> None:
    pw = "Se#cr/et@99"
    shown = cli("+job=monthly", "year=2024", "month=5", "--cfg", "job",
                env_dsn=f"postgresql://u:{quote(pw, safe='')}@h/db")
    assert shown.returncode == 0, shown.stderr
    assert "dsn:" in shown.stdout and not leaks(pw, shown.stdout + shown.stderr)
    (tmp_path / "2024-05").mkdir()
    bad = cli("+job=monthly", "year=2024", "month=5", f"data_root={tmp_path}", "tracking.enabled=false",
              env_dsn=f"postgresql://u:{pw}@127.0.0.1:1/db")
    assert bad.returncode == 2, bad.stderr
    assert "config error" in bad.stderr and not leaks(pw, bad.stdout + bad.stderr)
    # The unencoded password's pieces became libpq's host and port: the error names the password, not the port
    # (a fresh-user review, session 19: "port is not a port number" sent them to the wrong part of the DSN).
    assert "percent-encode" in bad.stderr and "port is not a port number" not in bad.stderr, bad.stderr
    # a port that is no number (a new user's typo, session 12): refused before the fetch stage lists any file,
    # quoting neither the DSN nor libpq's complaint
    encoded = quote(pw, safe="")
    for port, dsn in (("notaport", f"postgresql://u:{encoded}@127.0.0.1:notaport/db"),
                      ("70000", f"postgresql://u:{encoded}@127.0.0.1:70000/db"),
                      ("5432,x", f"host=127.0.0.1,127.0.0.2 port=5432,x user=u password={encoded} dbname=db")):
        typo = cli("+job=monthly", "year=2024", "month=5", f"data_root={tmp_path}", "tracking.enabled=false",
                   env_dsn=dsn)
        assert typo.returncode == 2, typo.stderr
        assert "port is not a port number" in typo.stderr and "[key=sink.dsn]" in typo.stderr, typo.stderr
        assert "fetch:" not in typo.stderr and port not in typo.stderr.split("config error", 1)[1]
        assert not leaks(pw, typo.stdout + typo.stderr) and "127.0.0.1" not in typo.stderr
