"""tdxve.invariants: the value rules (ref 1.4, 6.2), each check failing when it must, and the
ExecuteChecker over real machines and hosts (issue 7)."""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdxve import invariants as inv
from tdxve.abi import INSN_DTYPE, IoKind
from tdxve.errors import (
    InvalidArgumentError,
    InvariantViolation,
    TdxveError,
    VeFault,
)
from tdxve.guest import ArrayMemory
from tdxve.host import FaultPlan, FaultyHost, Host
from tdxve.host.faults import FaultKind
from tdxve.machine import Machine
from tdxve.regs import Regs

U64 = 2**64 - 1
PROFILES = ["linux", "linux-2022", "architectural", "linux-5.19-rc"]


# ---------------------------------------------------------------- value rules (ref 1.4)
def test_gcp_repro_inl_without_zero_extension() -> None:
    """Ref 4.2 / [src:L16]: RAX=0xDEADBEEF00000000, inl 0xCFC -> 0xDEADBEEE12378086 on 2022
    kernels (bit 32 cleared, 63:33 kept); the fixed code zero-extends."""
    rax, reply = 0xDEADBEEF00000000, 0x12378086
    assert inv.expected_in_rax("linux-2022", rax, reply, 4, True) == 0xDEADBEEE12378086
    assert inv.expected_in_rax("linux", rax, reply, 4, True) == 0x12378086
    assert inv.expected_in_rax("architectural", rax, reply, 4, True) == 0x12378086


@pytest.mark.parametrize("size,leak", [(1, 1 << 8), (2, 1 << 16), (4, 1 << 32)])
def test_2022_takes_exactly_one_extra_bit_from_the_host(size: int, leak: int) -> None:
    """Ref 1.4 IN table: GENMASK(8*size, 0) lets bit 8*size of R11 into RAX, nothing above."""
    garbage = U64
    got = inv.expected_in_rax("linux-2022", 0, garbage, size, True)
    assert got == (1 << (8 * size)) - 1 | leak
    for rule in ("linux", "architectural"):
        assert inv.expected_in_rax(rule, 0, garbage, size, True) == (1 << (8 * size)) - 1


def test_failure_rules() -> None:
    """Ref 1.4: on failure 2022 clears the masked bits, linux writes 0, architectural nothing."""
    rax = 0x1122334455667788
    assert inv.expected_in_rax("linux-2022", rax, U64, 1, False) == rax & ~0x1FF
    assert inv.expected_in_rax("linux", rax, U64, 1, False) == rax & ~0xFF
    assert inv.expected_in_rax("linux", rax, U64, 4, False) == 0
    assert inv.expected_in_rax("architectural", rax, U64, 4, False) == rax
    # non-conforming sizes (docs/ve-model.md): insn_assign_reg leaves 3 alone, 8 writes all
    assert inv.expected_in_rax("linux", rax, 5, 3, True) == rax
    assert inv.expected_in_rax("linux", rax, 5, 8, True) == 5
    assert inv.expected_in_rax("linux-2022", rax, U64, 8, True) == rax | 1


@pytest.mark.parametrize("size", [1, 2, 4])
def test_out_value_rules(size: int) -> None:
    """Ref 1.4 OUT table: 2022 sends RAX & GENMASK(8*size, 0), fixed code RAX & width."""
    w = (1 << (8 * size)) - 1
    assert inv.expected_out_value("linux-2022", U64, size) == (w << 1) | 1
    assert inv.expected_out_value("linux", U64, size) == w
    assert inv.expected_out_value("architectural", U64, size) == w
    inv.check_out_value("linux-2022", size, U64, (w << 1) | 1)
    with pytest.raises(InvariantViolation, match="out-value") as ei:
        inv.check_out_value("linux-2022", size, U64, w)          # the leak must be reproduced
    assert ei.value.invariant == "out-value"
    with pytest.raises(InvariantViolation) as ei:
        inv.check_out_value("linux", size, U64, (w << 1) | 1)
    assert ei.value.invariant == "out-width" and isinstance(ei.value, TdxveError)


def test_check_in_rax_names_the_rule() -> None:
    inv.check_in_rax("linux", 1, 0xAB00, 0xAB7F, 0x17F, True)
    with pytest.raises(InvariantViolation) as ei:
        inv.check_in_rax("linux", 1, 0xAB00, 0xAA7F, 0x17F, True)   # bit 8 from the host
    assert ei.value.invariant == "rax-width" and ei.value.details["reply"] == 0x17F
    with pytest.raises(InvariantViolation) as ei:
        inv.check_in_rax("linux", 1, 0xAB00, 0xAB7E, 0x17F, True)
    assert ei.value.invariant == "rax-merge"
    inv.check_in_rax("linux-2022", 1, 0xAB00, 0xAB7F, 0x17F, True)  # bit 8 of R11 is 1, of RAX 1
    with pytest.raises(InvariantViolation, match="rax-merge"):
        inv.check_in_rax("linux-2022", 1, 0xAA00, 0xAA7F, 0x17F, True)  # the leak must happen


def test_profiles_resolve_to_rules_and_bad_arguments_raise() -> None:
    assert inv.merge_rule("linux-5.19-rc") == "linux-2022"
    assert [inv.merge_rule(p) for p in inv.MERGE_RULES] == list(inv.MERGE_RULES)
    for bad in ("linux-2030", 3, None):
        with pytest.raises(InvalidArgumentError):
            inv.merge_rule(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="size"):
        inv.width_mask(9)
    with pytest.raises(InvalidArgumentError, match="rax"):
        inv.expected_in_rax("linux", -1, 0, 1, True)


def test_registers_and_rip_checks() -> None:
    a = Regs(rax=1, rbx=2, rip=0x10)
    b = a.copy()
    b.rax, b.rip = 5, 0x12
    inv.check_registers(a, b, inv.allowed_changes(IoKind.IN))
    with pytest.raises(InvariantViolation, match="rax") as ei:
        inv.check_registers(a, b, inv.allowed_changes(IoKind.OUT))
    assert ei.value.invariant == "registers"
    b.rflags |= 0x400
    with pytest.raises(InvariantViolation, match="rflags"):
        inv.check_registers(a, b, {"rax", "rip"})
    inv.check_rip(U64, 1, retired=True, instr_len=2)                # wraps modulo 2**64
    inv.check_rip(0x10, 0x10, retired=False, instr_len=2)
    with pytest.raises(InvariantViolation, match="rip"):
        inv.check_rip(0x10, 0x12, retired=False, instr_len=2)
    with pytest.raises(InvariantViolation, match="rip"):
        inv.check_rip(0x10, 0x11, retired=True, instr_len=2)


def test_allowed_changes_table() -> None:
    assert inv.allowed_changes(IoKind.IN) == {"rax", "rip"}
    assert inv.allowed_changes(IoKind.OUT) == {"rip"}
    assert inv.allowed_changes(IoKind.INS) == {"rip"}                   # rejected string I/O
    assert inv.allowed_changes(IoKind.INS, emulated=True) == {"rdi", "rip"}
    assert inv.allowed_changes(IoKind.OUTS, rep=True, emulated=True) == {"rsi", "rcx", "rip"}
    with pytest.raises(InvalidArgumentError):
        inv.allowed_changes(7)


# ---------------------------------------------------------------- recorder and devices
def test_recorder_records_and_forwards() -> None:
    host = Host()
    rec = inv.TdvmcallRecorder(host)
    assert rec.uart is host.uart and rec.bus is host.bus
    r = Regs(r11=30, r12=1, r13=1, r14=0x3F8, r15=0x41)
    rec.tdvmcall(r)
    (c,) = rec.calls
    assert c.is_io and c.accepted and c.image[15] == 0x41 and host.uart.output == b"A"
    with pytest.raises(InvalidArgumentError):
        rec.tdvmcall("not regs")  # type: ignore[arg-type]
    assert len(rec.calls) == 1
    host.bus.on_device_error = "raise"
    host.bus.register(0x500, 1, types.SimpleNamespace(read=lambda p, s: 1 // 0, write=lambda p, s, v: None), name="bad")
    with pytest.raises(TdxveError):
        rec.tdvmcall(Regs(r11=30, r12=1, r13=0, r14=0x500))
    assert rec.calls[-1].error is not None and not rec.calls[-1].accepted and rec.calls[-1].is_io
    with pytest.raises(InvalidArgumentError):
        inv.TdvmcallRecorder(object())


def test_device_state_sees_every_change_and_nothing_else() -> None:
    host = Host()
    s0 = inv.device_state(host)
    assert inv.device_state(host) == s0
    host.bus.write(0x3FF, 1, 0x5A)                  # UART scratch register
    s1 = inv.device_state(host)
    assert s1 != s0
    with pytest.raises(InvariantViolation, match="uart") as ei:
        inv.check_devices_unchanged(s0, s1)
    assert ei.value.invariant == "device-state"
    host.bus.read(0x1234, 1)                        # unassigned: no device changes
    inv.check_devices_unchanged(s1, inv.device_state(host))
    assert inv.device_state(host, exclude=("uart",)) == inv.device_state(host, exclude=("uart",))


def test_device_state_of_unpicklable_devices() -> None:
    host = Host(pc=False)
    host.uart.on_tx = lambda b: None                # a lambda cannot be pickled
    host.bus.register(0x3F8, 8, host.uart, sizes=(1,), name="uart")
    s0 = inv.device_state(host)
    assert s0[0][0] == "uart"                       # walked, not pickled
    host.bus.write(0x3F8, 1, 0x41)
    with pytest.raises(InvariantViolation, match="uart"):
        inv.check_devices_unchanged(s0, inv.device_state(host))


class _SloppyHost(FaultyHost):
    """A broken host: performs the access even when its plan refuses the call."""

    def _status_fault(self, g: list[int], kind: FaultKind, status: int) -> None:
        if g[11] == 30 and g[13] == 1:
            self.bus._write(g[14] & 0xFFFF, g[12], g[15] & 0xFF)
        super()._status_fault(g, kind, status)


@pytest.mark.parametrize("sloppy", [False, True])
def test_device_state_changes_only_through_accepted_accesses(sloppy: bool) -> None:
    cls = _SloppyHost if sloppy else FaultyHost
    host = cls(FaultPlan(seed=4, rate=0.5, kinds=["retry", "invalid_operand", "garbage_high"]))
    rec = inv.TdvmcallRecorder(host)
    m = Machine(host=rec)
    regs = Regs(rip=0x1000)
    for i in range(40):
        regs.rdx = (0x3F8, 0x3FF, 0x70, 0x71, 0x80)[i % 5]
        regs.rax = i
        try:
            m.execute(regs, b"\xee" if i % 3 else b"\xec")
        except VeFault:
            pass
    assert any(not c.accepted for c in rec.calls) and any(c.accepted for c in rec.calls)
    if sloppy:
        with pytest.raises(InvariantViolation, match="device-state"):
            inv.check_devices_replay(host, rec.calls, Host())
    else:
        inv.check_devices_replay(host, rec.calls, Host())


# ---------------------------------------------------------------- batch == per event
def test_batch_checks_pass_on_both_backends(core: Any) -> None:
    rng = np.random.default_rng(7)
    pool = [b"\xec", b"\xee", b"\xe4\x80", b"\x66\xed", b"\xf3\x6c", b"\x67\x6f", b"\x90"]
    buf = b"".join(pool[i] for i in rng.integers(0, 6, 300)) + b"\x66"
    recs = inv.check_decode_batch(buf, 64, core=core)
    assert recs.shape[0] == 300
    quals = rng.integers(0, 2**63, 500, dtype=np.uint64) | np.uint64(1 << 63) * rng.integers(0, 2, 500).astype(np.uint64)
    assert inv.check_exit_quals_batch(quals, core=core).shape == (500,)
    assert inv.check_exit_infos_batch(recs, 0x3F8, core=core) is not None
    bad = recs.copy()
    bad[7]["size"] = 3
    assert inv.check_exit_infos_batch(bad, rng.integers(0, 2**16, 300, dtype=np.uint64),
                                      core=core) is None


def test_batch_checks_catch_a_batch_that_disagrees(core: Any) -> None:
    def tampered(buffer: Any, mode: int = 64, *, on_error: str = "raise") -> np.ndarray:
        out = core.decode_insns(buffer, mode, on_error=on_error)
        if out.shape[0] > 2:
            out[2]["port"] = 0x42
        return out  # type: ignore[no-any-return]
    fake = types.SimpleNamespace(decode_insns=tampered, decode_insn=core.decode_insn)
    with pytest.raises(InvariantViolation, match="record 2") as ei:
        inv.check_decode_batch(b"\xec\xee\xed\xef", core=fake)  # type: ignore[arg-type]
    assert ei.value.invariant == "batch"
    fake2 = types.SimpleNamespace(
        exit_infos=lambda insns, dx=0: np.zeros(insns.shape[0], dtype=core.exit_infos(insns[:0]).dtype),
        exit_info=core.exit_info)
    recs = core.decode_insns(b"\xec\xee")
    with pytest.raises(InvariantViolation, match="exit_infos\\[0\\]"):
        inv.check_exit_infos_batch(recs, 0x80, core=fake2)  # type: ignore[arg-type]
    assert recs.dtype == INSN_DTYPE


# ---------------------------------------------------------------- ExecuteChecker
u64 = st.integers(0, U64)
PROP = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@PROP
@given(profile=st.sampled_from(PROFILES), path=st.sampled_from(["normal", "early"]),
       emulate=st.booleans(), seed=st.integers(0, 2**32), rate=st.sampled_from([0.0, 0.3, 1.0]),
       steps=st.lists(st.tuples(st.sampled_from([b"\xec", b"\xed", b"\x66\xed", b"\xee", b"\xef",
                                                 b"\xe4\x71", b"\xe6\x80", b"\xf3\x6c", b"\x6f",
                                                 b"\x66\xf3\x6d", b"\xf0\xec", b"\x90"]),
                                st.sampled_from([0x3F8, 0x3FD, 0x70, 0x71, 0xCFC, 0xCFE, 0x608, 0x1234]),
                                u64, st.integers(0, 6)), min_size=1, max_size=6))
def test_property_every_invariant_holds_against_a_faulty_host(
        profile: str, path: str, emulate: bool, seed: int, rate: float,
        steps: list[tuple[bytes, int, int, int]]) -> None:
    host = FaultyHost(FaultPlan(seed=seed, rate=rate))
    m = Machine(profile=profile, path=path, host=host, string_io="emulate" if emulate else "reject",
                memory=ArrayMemory(64, base=0x100), max_rep=8)
    ck = inv.ExecuteChecker(m)
    assert ck.device_host is host
    for code, port, rax, rcx in steps:
        regs = Regs(rax=rax, rdx=port, rcx=rcx, rsi=0x100, rdi=0x120, rip=0xFFFFFFFF81000000)
        try:
            ck.execute(regs, code)
        except InvariantViolation:
            raise
        except TdxveError:
            pass
    assert ck.executions == len(steps) == ck.retired + ck.faults
    inv.check_devices_replay(host, ck.recorder.calls, Host())


def _broken(m: Machine, what: str) -> None:
    g = m.guest
    if what == "merge":
        real = g._merge
        g._merge = lambda rax, v, size, ok: real(rax, v, size, ok) | (v & (1 << (8 * size)))  # type: ignore[method-assign]
    elif what == "out":
        g._out = lambda rax, size: rax                                          # type: ignore[method-assign]
    elif what == "rip":
        real_io = g._handle_io
        g._handle_io = lambda regs, ve: real_io(regs, ve) + 1                  # type: ignore[method-assign]
    elif what == "clobber":
        real_io = g._handle_io

        def io(regs: Regs, ve: Any) -> int:
            regs.rbx ^= 1
            return real_io(regs, ve)  # type: ignore[no-any-return]
        g._handle_io = io                                                       # type: ignore[method-assign]


@pytest.mark.parametrize("what,code,invariant", [
    ("merge", b"\xec", "rax-width"), ("out", b"\xee", "out-width"), ("rip", b"\xec", "rip"),
    ("clobber", b"\xee", "registers"),
])
def test_checker_catches_a_broken_guest(what: str, code: bytes, invariant: str) -> None:
    class AllOnes(Host):
        def tdvmcall(self, regs: Regs) -> None:
            super().tdvmcall(regs)
            regs.r11 = U64                           # garbage in every bit of the reply
    m = Machine(host=AllOnes())
    _broken(m, what)
    ck = inv.ExecuteChecker(m)
    with pytest.raises(InvariantViolation) as ei:
        ck.execute(Regs(rax=0x1FF if what == "out" else 0x1200, rdx=0x3FD, rip=0x1000), code)
    assert ei.value.invariant == invariant


def test_checker_catches_foreign_exceptions_and_a_stale_ve_info() -> None:
    class Crashing:
        def tdvmcall(self, regs: Regs) -> None:
            raise KeyError("boom")
    ck = inv.ExecuteChecker(Machine(host=Crashing()))
    with pytest.raises(InvariantViolation) as ei:
        ck.execute(Regs(rdx=0x80), b"\xee")
    assert ei.value.invariant == "exception-class"
    m = Machine(host=Host())
    m.guest.get_ve_info = lambda: m.tdx.ve_info        # type: ignore[method-assign]  # never VEINFO.GET
    with pytest.raises(InvariantViolation) as ei:
        inv.ExecuteChecker(m).execute(Regs(rdx=0x80), b"\xee")
    assert ei.value.invariant == "ve-info"


def test_checker_sees_the_2022_leak_reproduced_exactly() -> None:
    """Ref 1.4: under linux-2022 OUT shows the host RAX bit 8*size, and an IN merges R11's bit
    8*size; the checker accepts exactly that (and rejects it under linux)."""
    for profile, leak_ok in (("linux-2022", True), ("linux", False)):
        host = FaultyHost(FaultPlan(seed=1, at={1: "garbage_high"}))
        ck = inv.ExecuteChecker(Machine(profile=profile, host=host))
        regs = Regs(rax=0x1FF, rdx=0x80, rip=0x1000)
        ck.execute(regs, b"\xee")
        assert ck.recorder.calls[-1].image[15] == (0x1FF if leak_ok else 0xFF)
        regs.rdx = 0x3FD
        ck.execute(regs, b"\xec")
        garbage = host.faults[-1].garbage
        assert garbage and regs.rax >> 9 == 0
        assert (regs.rax >> 8) & 1 == (((garbage >> 8) & 1) if leak_ok else 1)
