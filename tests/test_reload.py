"""Hot reload: SIGHUP mid-run re-reads the alerts and batch groups, validates, applies or logs why not."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Dict, List

import pytest

from loadkit.examples.cnpj.sample import SampleManifest
from tests.helpers import CONF, compose

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signal")]


MONTH = {"rows": 300, "shards": 1, "seed": 31}  # the size of conftest's `month`


def edit(conf: Path, group: str, name: str, old: str, new: str) -> None:
    path = conf / group / f"{name}.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def add(conf: Path, group: str, name: str, line: str) -> None:
    from omegaconf import OmegaConf

    path = conf / group / f"{name}.yaml"
    assert line.split(":")[0] not in (OmegaConf.load(path) or {}), "the packaged file sets no default"
    with path.open("a") as fh:
        fh.write(line + "\n")


@pytest.mark.parametrize("valid", [True, False])
def test_sighup_reloads_alerts_and_batch_mid_run(valid: bool, month: SampleManifest, job_overrides, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from loadkit.runner import run_job
    from loadkit.supervise import Supervisor

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    monkeypatch.setenv("LOADKIT_CONF", str(conf))
    overrides = job_overrides(month.root, "env.executor=inprocess", "tracking=off", "batch.size=100")
    seen: Dict[str, List] = {"sizes": []}
    check = Supervisor._check_batch

    def check_then_signal(self: Supervisor, row) -> None:
        check(self, row)
        seen["sizes"].append(self.reloader.sizer.size)
        if len(seen["sizes"]) == 2:  # mid-run: edit the files, send SIGHUP, wait for the reload to finish
            # the packaged group files hold no defaults (config.py does): the edit adds the keys
            add(conf, "alerts", "default", "reject_rate: {threshold: 0.5}" if valid else "reject_rate: {threshold: -1}")
            add(conf, "batch", "fixed", "size: 400")
            os.kill(os.getpid(), signal.SIGHUP)
            assert self.reloader.done.wait(60)
            seen["threshold"] = self.alerts.rule("reject_rate").threshold

    monkeypatch.setattr(Supervisor, "_check_batch", check_then_signal)
    caplog.set_level("INFO", logger="loadkit")
    before = signal.getsignal(signal.SIGHUP)  # SIG_IGN under nohup, SIG_DFL otherwise
    result = run_job(compose(overrides), tags={"overrides": " ".join(overrides)})
    assert result.status == "succeeded", result.error
    if valid:
        # batch.size=100 on the command line still wins over the edited file: only the threshold moves.
        assert seen["threshold"] == 0.5 and len(set(seen["sizes"])) == 1
        assert "SIGHUP: configuration reloaded; changed: alerts.reject_rate" in caplog.text
    else:
        assert seen["threshold"] == 0.05 and len(set(seen["sizes"])) == 1
        assert "SIGHUP: configuration not applied" in caplog.text and "threshold" in caplog.text
    assert signal.getsignal(signal.SIGHUP) is before, "the run restores the SIGHUP handler"


def test_a_new_batch_size_reaches_the_read_tasks(month: SampleManifest, job_overrides, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from loadkit.runner import run_job
    from loadkit.supervise import Supervisor

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    monkeypatch.setenv("LOADKIT_CONF", str(conf))
    overrides = job_overrides(month.root, "env.executor=inprocess", "tracking=off", "batch=adaptive",
                              "batch.window_s=1000")
    calls: List[int] = []
    check = Supervisor._check_batch

    def check_then_signal(self: Supervisor, row) -> None:
        check(self, row)
        calls.append(1)
        if len(calls) == 1:
            edit(conf, "batch", "adaptive", "size: 20000", "size: 3000")
            os.kill(os.getpid(), signal.SIGHUP)
            assert self.reloader.done.wait(60) and self.reloader.applied == 1

    monkeypatch.setattr(Supervisor, "_check_batch", check_then_signal)
    result = run_job(compose(overrides), tags={"overrides": " ".join(overrides)})
    assert result.status == "succeeded", result.error
    assert (3000, "reload") in [(rows, why) for _, rows, why in result.metrics.batch_sizes]
