"""Plain helpers shared by the test modules (fixtures live in conftest.py; pytest imports that itself).

Importable as ``tests.helpers`` because pyproject's ``[tool.pytest.ini_options] pythonpath`` puts the
repository root on sys.path, so ``pytest tests/test_config.py`` collects on its own.
"""
from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any, Iterator, List, Sequence, Tuple

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "loadkit" / "conf"
LOCAL_DSN = "postgresql://root@127.0.0.1:5432/test"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound once, released), for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drop_load_schemas(dsn: str, target: str, ledger: str) -> None:
    """Drop a run's target and ledger schemas and loadkit's staging schema beside the target."""
    with autocommit_cursor(dsn) as cur:
        for schema in (target, ledger, f"{target}__lk_stage"):
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def compose(overrides: List[str]):
    """The typed config for these overrides, exactly as the CLI would compose it: a composition error
    (unknown key, wrong type, a value outside a choice) is the CLI's ConfigError naming the key."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from loadkit.config import compose_error, register, to_config

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        try:
            composed = hydra_compose("config", overrides=overrides)
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
            raise compose_error(exc) from None
        return to_config(composed)


@contextlib.contextmanager
def autocommit_cursor(dsn: str) -> Iterator[Any]:
    """A psycopg2 cursor in autocommit mode; its connection is closed when the block ends."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def query(dsn: str, sql: str, args: tuple = ()) -> list:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def zip_members_into_one(zips: Sequence[Path]) -> List[Tuple[str, bytes]]:
    """Rewrite a table's one-member shard zips as ONE zip (the first path) holding all their members in order;
    the other zips are removed. Returns the (member name, bytes) it wrote (the generator writes one member a
    zip; a multi-member zip is what the RFB's larger files are)."""
    import zipfile

    members: List[Tuple[str, bytes]] = []
    for z in zips:
        with zipfile.ZipFile(z) as zf:
            members += [(name, zf.read(name)) for name in zf.namelist()]
        z.unlink()
    with zipfile.ZipFile(zips[0], "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return members


def c_path_only(monkeypatch: Any, module: Any, env: str, fallback: str, built_by: str) -> None:
    """No silent fallback to an optional C extension's numpy path (loadkit.source.scanner, loadkit.postgres.keyhints):
    the extension imports (``python setup.py build_ext --inplace`` or ``pip install -e .``); ``module.ACCELERATED``
    is True unless the environment variable ``env`` is "numpy", which (read at import, checked in a fresh
    interpreter both ways) is the only way to the numpy path; then ACCELERATED is forced on and the numpy function
    ``fallback`` made to fail, so what the caller runs next must take the C path."""
    import os
    import subprocess
    import sys

    assert module._c is not None, f"{built_by} is not built (python setup.py build_ext --inplace)"
    assert module.ACCELERATED is (os.environ.get(env, "").lower() != "numpy")
    probe = f"import {module.__name__} as m; print(m.ACCELERATED, m._c is not None)"
    for value, want in (("numpy", "False True"), ("", "True True")):
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                             env={**os.environ, env: value}, timeout=120)
        assert out.stdout.split() == want.split(), (value, out.stdout, out.stderr)
    monkeypatch.setattr(module, "ACCELERATED", True)

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError(f"{module.__name__} fell back to numpy ({fallback})")

    monkeypatch.setattr(module, fallback, refuse)
