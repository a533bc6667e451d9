"""Regression tests for what the fuzz harnesses found (issue 7). Each pins one finding."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("code", [b"\x67\xf3\x6c", b"\xf2\xe4\x80", b"\xe6\xff", b"\x66\xed"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_decode_insn_on_numpy_buffer_returns_python_scalars(core, code: bytes, dtype: type) -> None:
    """fuzz_decode finding: the pure twin built IoInsn from numpy scalars (np.uint8 port and
    rep_prefix, np.bool_ rep) when the code was a numpy array; the compiled core returns Python
    ints and bools. IoInsn's fields are documented as int / bool (abi.IoInsn)."""
    insn = core.decode_insn(np.frombuffer(code, dtype=dtype))
    ref = core.decode_insn(code)
    assert insn == ref
    assert [type(v) for v in insn] == [type(v) for v in ref]
    assert type(insn.rep) is bool and type(insn.rep_prefix) is int
    assert insn.port is None or type(insn.port) is int
