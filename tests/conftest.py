"""Shared fixtures.

``core`` runs a test on both decoder backends in one invocation; the public
``tdxve`` package is bound to whichever backend ``TDXVE_PUREPYTHON`` selects,
and CI runs the whole suite once per setting.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

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
