"""The fuzz harnesses in fuzz/ run from the suite for a bounded, short time (issue 7).

Each harness checks both decoder backends on every input (same result or same
exception class; only TdxveError subclasses escape; the invariants of
tdxve.invariants hold). Here each runs a fixed number of inputs of the seeded
random engine (deterministic, ~1-3 s per harness, both backends), the
hypothesis engine briefly, and the command line (atheris only when installed:
it is not a test dependency). The >= 10**6-execution runs are documented in
fuzz/README.md.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import tdxve
from tdxve import _core, _core_py

FUZZ_DIR = Path(__file__).resolve().parent.parent / "fuzz"
if str(FUZZ_DIR) not in sys.path:
    sys.path.insert(0, str(FUZZ_DIR))

import fuzzlib  # noqa: E402

# (harness, inputs for the in-suite run): sized for ~1-3 s on a 2-core machine
HARNESSES = [("decode", 6000), ("exit_qual", 2500), ("exit_info", 4000), ("machine", 1500),
             ("replay", 600)]


def harness(name: str) -> ModuleType:
    return importlib.import_module(f"fuzz_{name}")


@pytest.mark.parametrize("name,runs", HARNESSES, ids=[h for h, _ in HARNESSES])
def test_harness_bounded_run_finds_nothing(name: str, runs: int) -> None:
    mod = harness(name)
    assert [n for n, _ in mod.BACKENDS] == ["cython", "python"]      # both backends, every input
    stats = fuzzlib.run_random(mod.check_one, seconds=60, runs=runs, seed=20261124,
                               max_len=256, seeds=mod.SEEDS, artifacts=None, name=name)
    assert stats.executions == runs and stats.findings == 0


@pytest.mark.parametrize("name", [h for h, _ in HARNESSES])
def test_harness_seeds_and_edge_inputs(name: str) -> None:
    mod = harness(name)
    for data in [*mod.SEEDS, b"", b"\0", b"\xff" * 600, bytes(range(256))]:
        mod.check_one(data)


def test_hypothesis_engine_runs_the_decode_harness() -> None:
    """The fallback engine when atheris is not installed."""
    mod = harness("decode")
    stats = fuzzlib.run_hypothesis(mod.check_one, seconds=30, runs=150, seed=3, max_len=48,
                                   seeds=mod.SEEDS[:3], name="decode")
    assert stats.executions >= 150


def test_backend_bound_swaps_every_layer_and_restores() -> None:
    import tdxve.guest
    import tdxve.machine
    import tdxve.tdx
    mods = (tdxve.tdx, tdxve.guest, tdxve.machine, tdxve._backend)
    before = [m.core for m in mods]
    for target in (_core, _core_py):
        with fuzzlib.backend_bound(target):
            assert all(m.core is target for m in mods)
        assert [m.core for m in mods] == before


def test_disagreement_and_foreign_exceptions_are_findings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness machinery itself can fail: a backend that answers differently, or raises
    something that is not a TdxveError, is reported."""
    mod = harness("exit_qual")
    real = _core_py.decode_exit_qual

    def off_by_one(q: Any, *, strict: bool = True) -> Any:
        r = real(q, strict=strict)
        return r._replace(port=(r.port + 1) & 0xFFFF)

    monkeypatch.setattr(_core_py, "decode_exit_qual", off_by_one)
    with pytest.raises(fuzzlib.Finding, match="decode_exit_qual|disagree"):
        mod.check_one(bytes.fromhex("00" + "0800f803" + "00000000"))
    monkeypatch.setattr(_core_py, "decode_exit_qual", lambda q, strict=True: {}[q])
    with pytest.raises(fuzzlib.Finding, match="KeyError"):
        mod.check_one(bytes.fromhex("00" + "0800f803" + "00000000"))


def test_machine_harness_catches_a_leaky_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the RAX merge of the 'linux' profile (let the host's bit 8 through, like the 2022
    mask): the machine harness must report the broken invariant within a short run."""
    import tdxve.guest as g
    mod = harness("machine")
    real = g._MERGE_FN["linux"]
    monkeypatch.setitem(g._MERGE_FN, "linux",
                        lambda rax, v, size, ok: real(rax, v, size, ok) | (v & (1 << (8 * size))))
    with pytest.raises(fuzzlib.Finding, match="rax-width|rax-merge"):
        fuzzlib.run_random(mod.check_one, seconds=60, runs=20000, seed=5, max_len=256,
                           seeds=mod.SEEDS, artifacts=None, name="machine")


def test_command_line_random_engine_and_reproduction(run_python: Any, tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    r = run_python(str(FUZZ_DIR / "fuzz_exit_info.py"), "--engine", "random", "--seconds", "1",
                   "--json", str(out))
    summary = json.loads(out.read_text())
    assert summary["findings"] == 0 and summary["executions_per_backend"] > 100
    assert summary["harness"] == "exit_info" and '"engine": "random"' in r.stdout
    crash = tmp_path / "input"
    crash.write_bytes(b"\x00\xec\xf8\x03")
    r = run_python(str(FUZZ_DIR / "fuzz_exit_info.py"), str(crash))
    assert "no finding" in r.stdout


def test_command_line_atheris(run_python: Any, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is optional (not in the test extra)")
    r = run_python(str(FUZZ_DIR / "fuzz_decode.py"), "--engine", "atheris", "--seconds", "3",
                   "--runs", "3000", "--artifacts", str(tmp_path), check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Done 3000 runs" in r.stderr


def test_package_under_test_is_the_one_the_harnesses_use() -> None:
    mod = harness("decode")
    assert mod.inv.__name__ == "tdxve.invariants" and sys.modules["tdxve"] is tdxve


def test_replay_harness_catches_a_batch_that_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_replay must notice a batch engine whose results or devices differ from the loop."""
    import numpy as np

    from tdxve import invariants as inv
    from tdxve.abi import EVENT_DTYPE
    from tdxve.errors import InvariantViolation
    from tdxve.machine import Machine
    from tdxve.replay import replay

    ev = np.zeros(3, dtype=EVENT_DTYPE)
    ev["exit_qual"], ev["instr_len"], ev["rax"] = 0x03F80000, 1, 0x41   # OUT DX, AL to the UART

    def wrong_rax(events, machine, **kw):
        out = replay(events, machine, **kw)
        out["rax"][1] ^= 1
        return out

    def extra_write(events, machine, **kw):
        out = replay(events, machine, **kw)
        machine.host.post.write(0x80, 1, 0x55)      # a device change no event explains
        return out

    assert len(inv.check_replay(ev, Machine)) == 3
    for bad in (wrong_rax, extra_write):
        with pytest.raises(InvariantViolation):
            inv.check_replay(ev, Machine, replay_fn=bad)
