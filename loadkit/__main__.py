"""Hydra entry point: compose, validate, run, exit code.

    python -m loadkit +job=monthly year=2024 month=5 [group=choice] [key=value ...]
    python -m loadkit -m +job=monthly year=2024 month=5 batch.size=5000,20000,100000

Exit codes (errors.EXIT_CODES): 0 ok, 1 bug, 2 config error, 3 source data error, 4 transient
infrastructure, 5 operator/environment (permissions, read-only standby, missing database), 6 alert
abort, 130 interrupted.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from loadkit.config import register, to_config
from loadkit.errors import EXIT_CODES, ConfigError, LoadkitError, classify
from loadkit.logs import setup_logging
from loadkit.security import MaskingStream, mask_text, register_argv_secrets


def conf_dir() -> str:
    """loadkit's config groups: LOADKIT_CONF if set, else the conf/ shipped inside the package."""
    for candidate in (os.environ.get("LOADKIT_CONF"), str(Path(__file__).resolve().parent / "conf")):
        if candidate and os.path.isfile(os.path.join(candidate, "config.yaml")):
            return os.path.abspath(candidate)
    raise SystemExit("loadkit: cannot find conf/config.yaml (set LOADKIT_CONF)")


_HYDRA_FLAGS = ("-m", "--multirun", "-c", "--cfg", "--info", "-h", "--help", "--hydra-help", "--resolve",
                "-p", "--package", "--shell-completion", "-sc", "--version", "--run", "-r")


def _precheck(argv: List[str]) -> None:
    """Compose once before Hydra runs so a config error exits 2 with one clear line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(a.split("=")[0] in _HYDRA_FLAGS for a in argv):
        return
    overrides = [a for a in argv if not a.startswith("hydra.") and not a.startswith("hydra/")]
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            to_config(compose("config", overrides=overrides))
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        cause = exc.__cause__ or exc
        key = getattr(cause, "full_key", None) or getattr(exc, "full_key", None)
        message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise ConfigError(message, key=key) from None


def _fail(exc: LoadkitError) -> None:
    sys.stderr.write(f"loadkit: {exc.category.value} error: {exc}\n")
    raise SystemExit(EXIT_CODES[exc.category])


@hydra.main(config_path=conf_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Optional[int]:
    from loadkit.runner import exit_code, run_job

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:
        _scrub_multirun_yaml(Path(hc.sweep.dir))
    setup_logging(cfg.logging.format, cfg.logging.level)
    try:
        typed = to_config(cfg)
    except ConfigError as exc:
        _fail(exc)
    tags = {"sweep_id": sweep_id(hc.sweep.dir) if multirun else None,
            "sweep_dir": str(Path(hc.sweep.dir).resolve()) if multirun else None,
            "sweep_job": str(hc.job.num) if multirun else None,
            "overrides": " ".join(hc.overrides.task)}
    try:
        result = run_job(typed, tags={k: v for k, v in tags.items() if v})
    except LoadkitError as exc:  # refused before the run started (plan, sink): nothing was written
        _fail(exc)
    sys.stdout.write(result.summary + "\n")
    sys.stdout.flush()
    code = exit_code(result)
    if result.error is not None:
        sys.stderr.write(f"loadkit: run {result.status} ({classify(result.error).value}): {result.error}\n")
    if code and not multirun:
        raise SystemExit(code)
    _sweep_codes.append(code)
    return code


_sweep_codes: List[int] = []  # a sweep exits non-zero if any of its runs failed


def sweep_id(sweep_dir: str) -> str:
    """LOADKIT_SWEEP_ID, else the sweep folder's last two parts (Hydra's date/time by default)."""
    return os.environ.get("LOADKIT_SWEEP_ID") or "/".join(Path(sweep_dir).parts[-2:])


def _scrub_multirun_yaml(sweep_dir: Path) -> None:
    """Hydra's sweeper saves the composed config (DSN included) as multirun.yaml: mask it in place."""
    path = sweep_dir / "multirun.yaml"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        masked = mask_text(text)
        if masked != text:
            path.write_text(masked, encoding="utf-8")


def entry() -> None:
    # Passwords on the command line or in LOADKIT_DSN are masked in everything printed, Hydra's
    # own output (--cfg job, override parse errors) included.
    register_argv_secrets(sys.argv[1:] + [f"dsn={os.environ.get('LOADKIT_DSN', '')}"])
    sys.stdout, sys.stderr = MaskingStream(sys.stdout), MaskingStream(sys.stderr)
    register()
    try:
        _precheck(sys.argv[1:])
    except ConfigError as exc:
        _fail(exc)
    main()
    failed = [c for c in _sweep_codes if c]
    if failed:
        raise SystemExit(failed[0])


if __name__ == "__main__":
    entry()
