"""Shared fixtures: one real PostgreSQL, one Ray instance, one MLflow store per test session.

The database is LOADKIT_TEST_DSN if set, else the local server on 127.0.0.1:5432, else an
embedded pgserver. Each test gets its own schemas, so tests never see each other's tables.
Under CI=true a missing database fails the session instead of skipping.
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import psycopg2
import pytest

from tests.helpers import CONF, LOCAL_DSN, ROOT, compose, drop_load_schemas, query  # noqa: F401 -- re-exported: import tests.helpers


def _reachable(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn, connect_timeout=3).close()
        return True
    except psycopg2.OperationalError:
        return False


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    """Whole-job runs (e2e, fault) and every test on the shared Ray instance are slow: ``-m "not slow"``
    (the fast selection, README "Run the tests") leaves them out; CI runs everything."""
    for item in items:
        if (item.get_closest_marker("e2e") or item.get_closest_marker("fault")
                or "ray_session" in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # never imports Ray: a test that did not import it did not start it
    return ray is not None and bool(ray.is_initialized())


@pytest.fixture(autouse=True)
def _secrets_of_this_test_only() -> Iterator[None]:
    """The masking registry is process-wide (a real process runs one job): a password one test registers
    (test_secrets draws random ones) must not mask another test's text, e.g. a status that contains it."""
    from loadkit import security

    with security._SECRETS_LOCK:
        saved = set(security._SECRETS)
    yield
    with security._SECRETS_LOCK:
        security._SECRETS.clear()
        security._SECRETS.update(saved)


@pytest.fixture(autouse=True)
def ray_needs_a_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that starts Ray must be marked (e2e, fault or slow), or the fast selection would start it."""
    before = _ray_running()
    yield
    if not before and _ray_running() and request.node.get_closest_marker("slow") is None:
        pytest.fail("this test starts Ray: mark it e2e, fault or slow (pyproject [tool.pytest.ini_options] markers)")


@pytest.fixture(scope="session", autouse=True)
def loadkit_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """LOADKIT_HOME for the session (inherited by CLI subprocesses): tests never touch the user's
    own loadkit home (embedded server, default MLflow store, Hydra run folders)."""
    home = tmp_path_factory.mktemp("loadkit_home")
    previous = os.environ.get("LOADKIT_HOME")
    os.environ["LOADKIT_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("LOADKIT_HOME", None)
    else:
        os.environ["LOADKIT_HOME"] = previous


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    dsn = os.environ.get("LOADKIT_TEST_DSN")
    if dsn:
        if not _reachable(dsn):
            pytest.fail("LOADKIT_TEST_DSN is set but not reachable")
        return dsn
    if _reachable(LOCAL_DSN):
        return LOCAL_DSN
    try:
        from loadkit.postgres.db import embedded_dsn

        return embedded_dsn(str(tmp_path_factory.mktemp("pgdata")))
    except Exception as exc:  # no database at all: fail in CI, skip on a laptop
        if os.environ.get("CI") == "true":
            pytest.fail(f"no PostgreSQL available: {exc}")
        pytest.skip(f"no PostgreSQL available: {exc}")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One Ray instance for the whole session, started as a local run starts its own (execute.ray.ensure_ray:
    the lean node, Ray Data's helper actors answered in this process); loadkit's runs join it."""
    import ray

    from loadkit.execute.ray import ensure_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray.is_initialized():  # a test without this fixture let loadkit start Ray in this process: reuse it
        yield
        return
    ensure_ray(None, 2, 500_000_000, None, False, worker_logs=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{path / 'mlflow.db'}"


@pytest.fixture()
def schemas(pg_dsn: str) -> Iterator[tuple]:
    """A fresh (target schema, ledger schema) pair, dropped after the test."""
    tag = uuid.uuid4().hex[:8]
    target, led = f"t_{tag}", f"l_{tag}"
    yield target, led
    drop_load_schemas(pg_dsn, target, led)


@pytest.fixture()
def fresh(pg_dsn: str) -> Iterator[Callable[[], Tuple[str, str]]]:
    """Makes more (target schema, ledger schema) pairs, for a fresh load to compare with; dropped after the test."""
    made: List[Tuple[str, str]] = []

    def pair() -> Tuple[str, str]:
        tag = uuid.uuid4().hex[:8]
        made.append((f"t_{tag}", f"l_{tag}"))
        return made[-1]

    yield pair
    for target, led in made:
        drop_load_schemas(pg_dsn, target, led)


@pytest.fixture()
def job_overrides(pg_dsn: str, schemas: tuple, mlflow_uri: str, tmp_path: Path):
    """Overrides that point a job at this test's schemas, database and MLflow store.

    Tests run the Ray executor unless they ask for another: their inputs are small enough
    that env.executor=auto would load them in-process, and the Ray pipeline is what they test."""
    target, led = schemas

    def make(data_root: Path, *extra: str, job: str = "monthly", year: int = 2024, month: int = 5) -> List[str]:
        executor = [] if any(e.startswith("env.executor=") for e in extra) else ["env.executor=ray"]
        return [f"+job={job}", f"year={year}", f"month={month}", f"data_root={data_root}",
                f"sink.dsn={pg_dsn}", f"job.schema={target}", f"sink.ledger_schema={led}",
                f"tracking.uri={mlflow_uri}", "env.progress_bars=false", *executor, *extra]

    return make


@pytest.fixture(scope="module")
def month(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A generated CNPJ month, 2024-05 (loadkit.examples.cnpj.sample), one per test module.

    A module sizes it with ``MONTH = {"rows": ..., "shards": ..., "seed": ...}`` (default: 200 rows,
    one shard, seed 5); a module that alters the files overrides this fixture and requests it."""
    from loadkit.examples.cnpj.sample import generate_month

    size = {"rows": 200, "shards": 1, "seed": 5, **getattr(request.module, "MONTH", {})}
    return generate_month(tmp_path_factory.mktemp("month"), 2024, 5, **size)
