"""Source checks: mypy --strict (config in pyproject.toml) is clean on the package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree")
def test_mypy_strict_is_clean():
    pytest.importorskip("mypy")
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                        "--no-incremental", str(ROOT / "tdxve")],
                       capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, MYPY_CACHE_DIR=os.devnull))
    assert r.returncode == 0, r.stdout + r.stderr
