"""The import contracts in pyproject.toml hold, and loadkit/ knows nothing about CNPJ."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is part of the test extra"
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_framework_has_no_domain_code() -> None:
    """The engine knows nothing about CNPJ; the example package loadkit/examples/ holds the domain code."""
    pattern = re.compile(r"cnpj|estabelecimento|empresas|receita", re.IGNORECASE)
    examples = ROOT / "loadkit" / "examples"
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "loadkit").rglob("*.py")
                 if examples not in p.parents and pattern.search(p.read_text())]
    assert offenders == []


def test_ruff_is_clean() -> None:
    """pyproject's [tool.ruff] rules (print() in the engine is T201) over the code, tests and benchmarks."""
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert exe, "ruff is part of the test extra"
    out = subprocess.run([exe, "check", "loadkit", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean() -> None:
    """pyproject's [tool.mypy] over loadkit/: the hints are checked, not decoration."""
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
