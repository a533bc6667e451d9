"""The default run proves the compiled backend was loaded (issue 2)."""

from __future__ import annotations

import importlib
import os

import tdxve


def test_backend_matches_environment(pure_requested):
    if pure_requested:
        assert tdxve.BACKEND == "python"
        assert tdxve.decode_insn is tdxve._core_py.decode_insn
    else:
        # Without TDXVE_PUREPYTHON the compiled core must be what tdxve uses.
        assert tdxve.BACKEND == "cython", "compiled core not loaded"
        compiled = importlib.import_module("tdxve._core")
        assert tdxve.decode_insn is compiled.decode_insn
        assert compiled.__file__.endswith((".so", ".pyd"))


def test_env_switch_selects_the_twin_in_a_fresh_interpreter(run_python):
    out = run_python("-c", "import tdxve; print(tdxve.BACKEND)", env={"TDXVE_PUREPYTHON": "1"})
    assert out.stdout.strip() == "python"


def test_debug_build_flag_matches_environment(pure_requested):
    """CI runs the suite once on a TDXVE_DEBUG=1 build and sets TDXVE_EXPECT_DEBUG=1."""
    if pure_requested:
        return
    compiled = importlib.import_module("tdxve._core")
    expect = os.environ.get("TDXVE_EXPECT_DEBUG", "") not in ("", "0")
    assert compiled.DEBUG_BUILD is expect
