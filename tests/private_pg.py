"""A private, throw-away PostgreSQL for tests that crash or restart the server.

initdb + pg_ctl (``LOADKIT_PG_BIN``, default /usr/lib/postgresql/15/bin) into a temp dir, on a
free port, trust auth on 127.0.0.1 only; torn down (immediate stop, directory removed) after.
Never the shared server. PostgreSQL refuses to run as root, so under root the server runs as
the ``postgres`` system user (``runuser``). Under CI=true missing binaries fail instead of skip.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List

import pytest

from tests.helpers import free_port

PG_BIN = Path(os.environ.get("LOADKIT_PG_BIN", "/usr/lib/postgresql/15/bin"))



def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"private PostgreSQL unavailable: {why}")
    pytest.skip(f"private PostgreSQL unavailable: {why}")


class PrivatePostgres:
    """One private cluster: ``dsn`` to use it, ``crash_restart()`` to crash it (immediate mode) and start it."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            _unavailable(f"no initdb in {PG_BIN}")
        self.root = Path(tempfile.mkdtemp(prefix="loadkit-private-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as: List[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                _unavailable("running as root and there is no 'postgres' user to run the server as")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "loadkit", "-A", "trust", "-E", "UTF8", "--no-sync")
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c max_connections=60 -c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "-o", opts, "start")
        self.dsn = f"postgresql://loadkit@127.0.0.1:{self.port}/postgres"
        self.crashes = 0

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as, str(PG_BIN / tool), *args], check=True, capture_output=True, timeout=120)

    def crash_restart(self) -> float:
        """``pg_ctl -m immediate restart``: no checkpoint, crash recovery on start (UNLOGGED tables emptied).

        Returns the seconds until the server accepted connections again."""
        started = time.monotonic()
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-m", "immediate", "-w",
                  "-t", "60", "restart")  # -l again, or the new postmaster holds our stdout pipe open
        self.crashes += 1
        return time.monotonic() - started

    def close(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass  # already down
        shutil.rmtree(self.root, ignore_errors=True)
