"""A stand-in for Ray's dashboard agent on the local Ray loadkit starts, where the real agent has nothing to run.

Run by the raylet (``execute.ray._lean_local_node`` puts it in the agent's command) as
``python -u ray_agent_stub.py --ports=NAME,... <ray's agent.py> --node-id=ID --session-dir=DIR ...``; a plain
script (nothing of loadkit or Ray imported: its whole point is not to pay for those imports).

Ray 2.60's raylet requires a dashboard agent process: it waits for the agent to write its ports
(``<session dir>/<name>_<node id>``, the port as text) and fate-shares with it (the raylet exits when the
agent does). On an install without the dashboard's dependencies (``ray`` without ``[default]``, loadkit's),
the real agent runs in its minimal mode: it tries to import every dashboard module, loads none ("Available
modules: []" in its log), writes -1 (no service) for each of its ports and then only waits for the raylet
to end -- ~1.1-1.4 CPU-s of imports and ~77 MB PSS per run (measured, issue #16), and ~1.7 s of
``ray.init``'s wall while the raylet waits for those files. This writes the same -1 ports at once and waits
the same way. What it does not do: advertise the agent's (absent) HTTP and gRPC ports in the GCS
key-value store, which only the dashboard head and the state API read (neither runs on loadkit's local
Ray), and forward the raylet's last log lines to the driver when the raylet dies unexpectedly (the
runtime-env agent, which stays, forwards them too: Ray's ``process_watcher`` runs in both).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence

POLL_S = 1.0  # how often the raylet's liveness is checked (Ray's agent checks once a second too)


def options(argv: Sequence[str]) -> Dict[str, str]:
    """``--name=value`` arguments as {name: value}; others (the agent script's path, flags) are ignored."""
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def write_ports(session_dir: str, node_id: str, names: List[str], port: int = -1) -> None:
    """Each ``<session_dir>/<name>_<node_id>`` holds ``port`` (written whole: a temporary file renamed)."""
    for name in names:
        path = os.path.join(session_dir, f"{name}_{node_id}")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, path)


def wait_for_raylet(raylet: int, parent: int) -> None:
    """Return once the raylet is gone: this process re-parented away from ``parent``, or ``raylet`` dead."""
    while os.getppid() == parent:
        try:
            os.kill(raylet, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # alive, another user's (never here: the raylet started this process)
            pass
        time.sleep(POLL_S)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = options(sys.argv[1:] if argv is None else argv)
    parent = os.getppid()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the raylet's stop: an expected exit, as Ray's agent
    write_ports(args["session-dir"], args["node-id"], [n for n in args["ports"].split(",") if n])
    wait_for_raylet(int(os.environ.get("RAY_RAYLET_PID") or parent), parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
