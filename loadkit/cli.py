"""The ``loadkit`` command: subcommands around one Hydra application.

    loadkit [run] +job=NAME [param=value ...] [Hydra flags]   load (the default subcommand)
    loadkit plan  +job=NAME [param=value ...]                 print the resolved plan, write nothing
    loadkit init  FILE... [-o job.yaml] [--name NAME]          infer a job YAML from sample files
    loadkit history list|show|compare ...                      past runs (ledger + MLflow)
    loadkit db url|stop|path                                   the embedded PostgreSQL
    loadkit help                                               this text

``run`` and ``plan`` are plain Hydra apps: every Hydra flag works as in any Hydra app
(``--config-dir/-cd``, ``--config-name/-cn``, ``--cfg job``, ``--info``, ``-m``,
``hydra.searchpath=[...]``). loadkit's own config groups ship inside the package; a project
keeps its jobs in ``<dir>/job/*.yaml`` and points at them with ``--config-dir <dir>`` or the
``LOADKIT_CONFIG_DIR`` environment variable (used when no ``--config-dir`` is given).
Other modules add subcommands with ``register_command`` (e.g. ``health``).

Exit codes: 0 ok, 2 config error, 3 source data error, 4 infrastructure, 1 bug, 130 interrupted.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from loadkit.errors import EXIT_CODES, ConfigError, LoadkitError

CONFIG_DIR_ENV = "LOADKIT_CONFIG_DIR"


@dataclass(frozen=True)
class Command:
    """A subcommand: ``run(argv) -> exit code`` and a one-line help."""

    run: Callable[[List[str]], int]
    help: str


COMMANDS: Dict[str, Command] = {}


def register_command(name: str, run: Callable[[List[str]], int], help: str) -> None:
    """Add (or replace) a ``loadkit NAME ...`` subcommand; ``run`` gets the arguments after NAME."""
    COMMANDS[name] = Command(run, help)


def conf_dir() -> str:
    """loadkit's config groups: LOADKIT_CONF if set (a full copy of conf/), else the conf/ shipped
    inside the package. Resolved when a command runs, never at import time."""
    for candidate in (os.environ.get("LOADKIT_CONF"), str(Path(__file__).resolve().parent / "conf")):
        if candidate and os.path.isfile(os.path.join(candidate, "config.yaml")):
            return os.path.abspath(candidate)
    raise ConfigError("cannot find loadkit's conf/config.yaml (LOADKIT_CONF does not hold one, and the "
                      "installed package has no conf/)", key="LOADKIT_CONF")


def fail(exc: LoadkitError, prog: str = "loadkit") -> int:
    """Print one classified error line (or Hydra's multi-line hint) and return its exit code."""
    sys.stderr.write(f"{prog}: {exc.category.value} error: {exc}\n")
    return EXIT_CODES[exc.category]


# ---------------------------------------------------------------- Hydra arguments


def hydra_argv(argv: List[str]) -> List[str]:
    """The arguments for Hydra, with ``--config-dir $LOADKIT_CONFIG_DIR`` added when the variable
    is set and the command line gives no config dir of its own."""
    env = os.environ.get(CONFIG_DIR_ENV)
    has_dir = any(a in ("--config-dir", "-cd") or a.startswith("--config-dir=") for a in argv)
    if env and not has_dir:
        return ["--config-dir", env, *argv]
    return list(argv)


def _hydra_args(argv: List[str]) -> Any:
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def precheck(argv: List[str]) -> Any:
    """Compose the config exactly as Hydra will (same search path, --config-dir, --config-name,
    hydra.searchpath) before Hydra runs, so a config error exits 2 with Hydra's full message
    (its hints included: available options, ``use +job=...``) instead of Hydra's exit 1.

    Skipped (returns None) for Hydra's informational flags and for multiruns (their sweeps compose
    per job); else returns the typed LoadkitConfig."""
    return _precheck(argv)[0]


def _precheck(argv: List[str]) -> Any:
    """``precheck`` and the composed ``hydra.mode`` (None when the config leaves it unset), as a tuple."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from loadkit.config import compose_error, register, to_config

    args = _hydra_args(argv)
    if (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
            or args.multirun or getattr(args, "experimental_rerun", None)):
        return None, None
    register()
    primary = conf_dir()
    if args.config_path:  # Hydra resolves a relative --config-path against the task's module (loadkit/)
        primary = os.path.join(os.path.dirname(os.path.abspath(__file__)), args.config_path)
    try:
        search_path = create_config_search_path(f"file://{primary}")
        if args.config_dir is not None:
            extra = os.path.abspath(args.config_dir)
            if not os.path.isdir(extra):
                raise ConfigError(f"config directory {extra} not found", key="--config-dir")
            from hydra.core.config_search_path import SearchPathQuery

            search_path.prepend(provider="command-line", path=f"file://{extra}",
                                anchor=SearchPathQuery(provider="schema"))
        GlobalHydra.instance().clear()
        hydra = Hydra.create_main_hydra2(task_name="loadkit", config_search_path=search_path)
        cfg = hydra.compose_config(args.config_name or "config", args.overrides, run_mode=RunMode.RUN,
                                   with_log_configuration=False)
        mode = cfg.hydra.get("mode")
        with open_dict(cfg):
            del cfg["hydra"]
        return to_config(cfg), mode
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise compose_error(exc) from None
    finally:
        GlobalHydra.instance().clear()


def resolve_latest(argv: List[str]) -> List[str]:
    """``month=latest``: the newest complete month the job's remote publishes (loadkit.source.fetch.latest_month);
    returns argv with concrete ``year=`` and ``month=`` in its place. Other argv is returned unchanged."""
    if "month=latest" not in argv:
        return argv
    from loadkit.source import fetch

    rest = [a for a in argv if not a.startswith(("month=", "year="))]
    cfg = precheck(rest + ["year=2000", "month=1"])
    if cfg is None or cfg.job is None:
        raise ConfigError("month=latest needs a job with job.remote (and no -m/--cfg)", key="month")
    from loadkit.plan import fetch_plan

    settings = fetch_plan(cfg)
    year, month = fetch.latest_month(fetch.settings_from(settings), settings.root_url)
    sys.stderr.write(f"loadkit: month=latest is {year:04d}-{month:02d}\n")
    return rest + [f"year={year}", f"month={month}"]


def run_hydra(argv: List[str], task: Callable[[Any], Optional[int]]) -> int:
    """Run ``task(cfg)`` as a Hydra app over loadkit's packaged config groups."""
    import hydra

    from loadkit.config import register

    register()
    argv = hydra_argv(argv)
    codes: List[int] = []

    def app(cfg: Any) -> Optional[int]:
        code = task(cfg) or 0
        codes.append(code)
        return code

    app.__module__ = task.__module__  # Hydra names the job after the task's module
    try:
        argv = resolve_latest(argv)
        config_path = conf_dir()
        single = _compose_single(argv, app, config_path)
        if single is None:  # not a plain single run: check the config here, hydra.main runs it below
            _precheck(argv)
    except LoadkitError as exc:  # a config error, or month=latest could not reach/read the remote
        return fail(exc)
    if single is not None:
        _run_single(*single, app)
        failed = [c for c in codes if c]
        return failed[0] if failed else 0
    saved = sys.argv
    sys.argv = [saved[0] if saved else "loadkit", *argv]
    try:
        hydra.main(config_path=config_path, config_name="config", version_base="1.3")(app)()
    finally:
        sys.argv = saved
    failed = [c for c in codes if c]
    return failed[0] if failed else 0


_Single = Tuple[Any, str, Any, List[str], List[str]]  # (hydra, config name, composed config, overrides, argv)


def _compose_single(argv: List[str], app: Callable[[Any], Optional[int]], config_path: str) -> Optional[_Single]:
    """A single run's config, composed once (issue 16: each compose is ~0.25 CPU-s of a ~1.7 CPU-s
    sample run) and checked as ``precheck`` checks it: the Hydra that will run the job, as
    ``hydra.main`` builds it (same task name, search path, overrides), composes it; a compose or
    validation error is a ConfigError (exit 2, Hydra's message), raised before any output folder.

    Returns (hydra, config name, composed config, overrides, argv), or None, having composed nothing, for what
    ``hydra.main`` must handle: informational flags, ``-m``, ``--config-path``, and (composed, then
    dropped) a config whose ``hydra.mode`` is not a single run."""
    import copy

    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import (create_automatic_config_search_path,
                                       detect_calling_file_or_module_from_task_function, detect_task_name,
                                       run_and_report)
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from loadkit.config import compose_error, to_config

    args = _hydra_args(argv)
    if (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.multirun
            or getattr(args, "experimental_rerun", None) or args.config_path is not None):
        return None
    search_dir = config_path
    if args.config_dir is not None:
        extra = os.path.abspath(args.config_dir)
        if not os.path.isdir(extra):
            raise ConfigError(f"config directory {extra} not found", key="--config-dir")
    calling_file, calling_module = detect_calling_file_or_module_from_task_function(app)
    task_name = detect_task_name(calling_file, calling_module)
    search_path = create_automatic_config_search_path(calling_file, calling_module, search_dir)
    if args.config_dir is not None:
        search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(args.config_dir)}",
                            anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    hydra = run_and_report(lambda: Hydra.create_main_hydra2(task_name=task_name, config_search_path=search_path))
    config_name = args.config_name or "config"
    keep = False
    try:
        cfg = hydra.compose_config(config_name, args.overrides, run_mode=RunMode.RUN, with_log_configuration=False)
        if cfg.hydra.get("mode") not in (None, RunMode.RUN):
            return None
        task_cfg = copy.deepcopy(cfg)  # what the task gets (Hydra's run_job drops the hydra node the same way)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        to_config(task_cfg)
        keep = True
        return hydra, config_name, cfg, list(args.overrides), argv
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise compose_error(exc) from None
    finally:
        if not keep:
            GlobalHydra.instance().clear()


def _run_single(hydra: Any, config_name: str, cfg: Any, overrides: List[str], argv: List[str],
                app: Callable[[Any], Optional[int]]) -> None:
    """Run the job on the config ``_compose_single`` composed, as ``Hydra.run`` does (hydra.mode RUN,
    Hydra's logging configured, callbacks, run_job with its output folder and error reporting) minus
    its compose: Hydra would compose the same config again, and before this ``hydra.main`` composed
    it a third time only to read ``hydra.mode``."""
    import logging

    from hydra._internal import hydra as hydra_module
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.utils import run_and_report
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import configure_log, run_job
    from hydra.types import HydraContext, RunMode
    from omegaconf import read_write

    def run() -> Any:
        if cfg.hydra.mode is None:  # hydra.main passes the override hydra.mode=RUN: the config records it
            with read_write(cfg.hydra):
                cfg.hydra.mode = RunMode.RUN
                cfg.hydra.overrides.hydra.append("hydra.mode=RUN")
        configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
        hydra_module.log = logging.getLogger(hydra_module.__name__)  # as compose_config sets it
        hydra._print_debug_info(config_name, [*overrides, "hydra.mode=RUN"], RunMode.RUN)
        callbacks = Callbacks(cfg)
        callbacks.on_run_start(config=cfg, config_name=config_name)
        ret = run_job(hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
                      task_function=app, config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None,
                      configure_logging=True)
        callbacks.on_run_end(config=cfg, config_name=config_name, job_return=ret)
        _ = ret.return_value  # raises the job's exception, as Hydra.run does
        return ret

    saved = sys.argv
    sys.argv = [saved[0] if saved else "loadkit", *argv]
    try:
        run_and_report(run)
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()


# ---------------------------------------------------------------- subcommands


def _run(argv: List[str]) -> int:
    from loadkit import __main__ as app

    return run_hydra(argv, app.run_task)


def _plan(argv: List[str]) -> int:
    from loadkit import __main__ as app

    return run_hydra(argv, app.plan_task)


def _history(argv: List[str]) -> int:
    from loadkit import history
    from loadkit.home import pgdata

    if not any(a == "--embedded-dir" or a.startswith("--embedded-dir=") for a in argv):
        argv = ["--embedded-dir", str(pgdata()), *argv]
    return history.main(argv)


def _init(argv: List[str]) -> int:
    from loadkit.source import infer

    return infer.main(argv)


def _db(argv: List[str]) -> int:
    """loadkit db url|stop|path [--embedded-dir DIR]: the embedded PostgreSQL in loadkit's home."""
    import argparse

    from loadkit.home import pgdata

    p = argparse.ArgumentParser(prog="loadkit db", description=_db.__doc__)
    p.add_argument("action", choices=("url", "stop", "path"),
                   help="url: start it if needed and print its DSN; stop: stop it; path: print its data folder")
    p.add_argument("--embedded-dir", default=str(pgdata()), help="the server's data folder (default: %(default)s)")
    args = p.parse_args(argv)
    path = Path(args.embedded_dir).expanduser().resolve()
    if args.action == "path":
        sys.stdout.write(f"{path}\n")
        return 0
    if args.action == "url":
        from loadkit.postgres.db import embedded_dsn

        try:
            sys.stdout.write(embedded_dsn(str(path)) + "\n")
        except Exception as exc:  # pgserver raises its own errors; the user needs the folder and the cause
            return fail(ConfigError(f"cannot start the embedded PostgreSQL in {path}: {exc}", key="--embedded-dir"))
        return 0
    if not (path / "postmaster.pid").is_file():
        sys.stdout.write(f"no embedded PostgreSQL running in {path}\n")
        return 0
    import subprocess

    from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

    # pgserver runs the server as the system user "pgserver" when started by root: stop it as that user.
    user = "pgserver" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "stop"], pgdata=path, user=user)
    except subprocess.CalledProcessError as exc:
        return fail(ConfigError(f"could not stop the embedded PostgreSQL in {path}: {exc}", key="--embedded-dir"))
    sys.stdout.write(f"stopped the embedded PostgreSQL in {path}\n")
    return 0


def _help(argv: List[str]) -> int:
    for name in OPTIONAL_COMMANDS:
        _load_optional(name)
    lines = ["usage: loadkit [COMMAND] [ARGS...]   (COMMAND defaults to run)", "", "commands:"]
    lines += [f"  {name:<8} {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "run/plan take Hydra arguments: loadkit run --help lists the config groups; a project's own",
              f"jobs: --config-dir DIR or {CONFIG_DIR_ENV}=DIR with DIR/job/NAME.yaml, then +job=NAME."]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


register_command("run", _run, "load a job (default): loadkit run +job=NAME [key=value ...]")
register_command("plan", _plan, "print the resolved plan and the ledger's state; writes nothing")
register_command("init", _init, "infer a job YAML from sample files: loadkit init FILE... -o job/NAME.yaml")
register_command("history", _history, "past runs: loadkit history list | show RUN | compare A B")
register_command("db", _db, "the embedded PostgreSQL: loadkit db url | stop | path")
register_command("help", _help, "this list")

# Subcommands living in optional modules, imported only when present and asked for: each module
# defines ``cli_main(argv) -> int`` and ``CLI_HELP`` (one line). The observability engineer's
# ``loadkit health`` plugs in here.
OPTIONAL_COMMANDS = {"health": "loadkit.health"}


def _load_optional(name: str) -> bool:
    import importlib
    import importlib.util

    module_name = OPTIONAL_COMMANDS.get(name)
    if module_name is None or importlib.util.find_spec(module_name) is None:
        return False
    module = importlib.import_module(module_name)
    if not hasattr(module, "cli_main"):
        return False
    register_command(name, module.cli_main, getattr(module, "CLI_HELP", f"see {module_name}"))
    return True


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``loadkit [COMMAND] ARGS``; anything that is not a command name goes to ``run``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in COMMANDS and args[0] in OPTIONAL_COMMANDS:
        _load_optional(args[0])
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]].run(args[1:])
    return COMMANDS["run"].run(args)
