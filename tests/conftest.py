"""Shared fixtures.

``core`` runs a test on both decoder backends in one invocation; the public
``tdxve`` package is bound to whichever backend ``TDXVE_PUREPYTHON`` selects,
and CI runs the whole suite once per setting.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

import tdxve

BACKEND_MODULES = ["tdxve._core", "tdxve._core_py"]


@pytest.fixture(scope="session", params=BACKEND_MODULES, ids=["cython", "python"])
def core(request: pytest.FixtureRequest) -> ModuleType:
    """Each decoder backend in turn (compiled core and pure twin)."""
    return importlib.import_module(request.param)


@pytest.fixture(scope="session")
def pure_requested() -> bool:
    return os.environ.get("TDXVE_PUREPYTHON", "") not in ("", "0")


def pytest_report_header(config: pytest.Config) -> str:
    return f"tdxve {tdxve.__version__}, backend {tdxve.BACKEND}"


@pytest.fixture(scope="session")
def run_python(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Run ``python ARGS...`` in a child process that imports the same tdxve as the tests.

    The child starts in an empty directory with the tested package's parent on
    PYTHONPATH: started from the repository root, ``python -m``/``-c`` would
    import the source tree (no compiled core) instead of the installed package.
    """
    cwd = tmp_path_factory.mktemp("child")
    site = os.path.dirname(os.path.dirname(tdxve.__file__))

    def run(*args: str, env: dict[str, str] | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        full_env = dict(os.environ, PYTHONPATH=site, **(env or {}))
        return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              env=full_env, cwd=cwd, check=check)

    return run
