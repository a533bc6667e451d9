"""FaultyHost / FaultPlan: deterministic, seeded fault injection (issue 4; statuses from ref 2.6)."""

from __future__ import annotations

import pytest

from tdxve.errors import InvalidArgumentError
from tdxve.host import STATUS_FAULTS, FaultKind, FaultPlan, FaultRecord, FaultyHost, Host
from tdxve.regs import Regs

IO, CPUID = 30, 10


def io_in(port: int, size: int = 1, **extra: int) -> Regs:
    return Regs(r10=0, r11=IO, r12=size, r13=0, r14=port, **extra)


def io_out(port: int, value: int, size: int = 1) -> Regs:
    return Regs(r10=0, r11=IO, r12=size, r13=1, r14=port, r15=value)


@pytest.mark.parametrize("kind,status", [
    (FaultKind.RETRY, 0x1), (FaultKind.INVALID_OPERAND, 0x8000000000000000),
    (FaultKind.ALIGN_ERROR, 0x8000000000000002), (FaultKind.SUBFUNC_UNSUPPORTED, 0x8000000000000003),
])
def test_status_faults_skip_the_call(kind: FaultKind, status: int) -> None:
    """Ref 2.6 status values; the device is not touched and R11 stays as the guest passed it."""
    host = FaultyHost(FaultPlan(at={0: kind}), log=4)
    r = io_out(0x3F8, 0x41)
    host.tdvmcall(r)
    assert r.r10 == status == STATUS_FAULTS[kind]
    assert r.r11 == IO and host.uart.output == b""
    assert host.faults == [FaultRecord(0, IO, kind, True, status, IO, (), 0)]
    assert host.stats.calls == {IO: 1} and host.stats.failures == {status: 1}
    assert host.log is not None and host.log.events[-1].fault == kind.value
    host.tdvmcall(io_out(0x3F8, 0x42))              # call 1: no fault
    assert host.uart.output == b"B" and len(host.faults) == 1


def test_status_fault_on_other_calls() -> None:
    host = FaultyHost(FaultPlan(at={0: "retry", 1: "align_error"}))
    r = Regs(r11=CPUID, r12=0x40000000)
    host.tdvmcall(r)
    assert r.r10 == 1 and r.r12 == 0x40000000       # CPUID not performed
    r = Regs(r10=7, r11=3)
    host.tdvmcall(r)
    assert r.r10 == 0x8000000000000002 and host.stats.vmm_calls == {7: 1}
    assert [f.subfn for f in host.faults] == [CPUID, 7]


@pytest.mark.parametrize("size", [1, 2, 4])
def test_garbage_above_width_on_in(size: int) -> None:
    host = FaultyHost(FaultPlan(seed=3, at={0: FaultKind.GARBAGE_HIGH}), log=4)
    host.bus.write(0xCF8, 4, 0x8000_0000)
    r = io_in(0xCFC, size)
    host.tdvmcall(r)
    width = (1 << (8 * size)) - 1
    assert r.r10 == 0
    assert r.r11 & width == 0x12378086 & width      # the real value is intact
    assert r.r11 >> (8 * size) != 0                 # ... with garbage above it
    (rec,) = host.faults
    assert rec.applied and rec.garbage == r.r11 & ~width and rec.value == r.r11
    assert host.log is not None
    ev = host.log.events[-1]
    assert ev.fault == "garbage_high" and ev.value == r.r11


def test_garbage_not_applicable_to_out_is_recorded_unapplied() -> None:
    host = FaultyHost(FaultPlan(at={0: FaultKind.GARBAGE_HIGH}))
    r = io_out(0x80, 0x12)
    host.tdvmcall(r)
    assert host.post.codes == [0x12] and r.r11 == IO
    assert host.faults[0].applied is False and host.faults[0].garbage == 0


def test_clobber_targets_unselected_registers_from_rcx_mask() -> None:
    """Ref 2.4: the host sees the select mask in RCX; 0xFFCC leaves RAX, RCX, RSP, RBP unexposed."""
    host = FaultyHost(FaultPlan(seed=9, at={0: "clobber", 1: "clobber", 2: "clobber"}))
    r = io_in(0x3FD, rax=77, rcx=0xFFCC, rbx=5)
    host.tdvmcall(r)
    rec = host.faults[0]
    assert [n for n, _ in rec.clobbered] == ["rax", "rcx", "rsp", "rbp"]
    assert all(getattr(r, n) == v for n, v in rec.clobbered)
    assert r.rbx == 5 and r.r11 == 0x60 and r.r10 == 0   # the call itself was served
    r = io_in(0x3FD, rcx=0xFC00)                    # Linux 2022 mask: R10-R15 only
    host.tdvmcall(r)
    assert [n for n, _ in host.faults[1].clobbered] == ["rax", "rcx", "rdx", "rbx", "rsp", "rbp",
                                                         "rsi", "rdi", "r8", "r9"]
    r = io_in(0x3FD)                                # no mask in the image
    host.tdvmcall(r)
    assert [n for n, _ in host.faults[2].clobbered] == ["rax", "rcx", "rsp", "rbp"]


def test_clobber_explicit_registers() -> None:
    host = FaultyHost(FaultPlan(at={0: "clobber"}, clobber_regs=("r12", "rdi")))
    r = io_in(0x3FD)
    host.tdvmcall(r)
    assert [n for n, _ in host.faults[0].clobbered] == ["r12", "rdi"]


def test_clobber_does_not_leak_through_the_tdx_module() -> None:
    """Issue 3's TdxModule copies back only selected GPRs: the clobbered ones keep guest values."""
    tdx_mod = pytest.importorskip("tdxve.tdx")
    host = FaultyHost(FaultPlan(seed=1, at={0: "clobber"}))
    tdx = tdx_mod.TdxModule(host)
    regs = Regs(rcx=0xFFCC, rbp=0x1111, rsp=0x2222, r10=0, r11=IO, r12=1, r13=0, r14=0x3FD)
    assert tdx.vmcall(regs) == 0
    assert regs.rbp == 0x1111 and regs.rsp == 0x2222 and regs.rcx == 0xFFCC and regs.rax == 0
    assert regs.r11 == 0x60
    assert {n for n, _ in host.faults[0].clobbered} == {"rax", "rcx", "rsp", "rbp"}


def test_random_faults_are_deterministic_per_seed() -> None:
    def run(seed: int) -> list[FaultRecord]:
        host = FaultyHost(FaultPlan(seed=seed, rate=0.3))
        for i in range(200):
            host.tdvmcall(io_in(0x3FD) if i % 3 else io_out(0x80, i & 0xFF))
        return host.faults

    a, b, c = run(42), run(42), run(43)
    assert a == b and a != c
    assert 30 <= len(a) <= 90                       # ~60 of 200 at rate 0.3
    assert {f.kind for f in a} == set(FaultKind)
    assert all(f.kind is not FaultKind.GARBAGE_HIGH or f.applied for f in a)


def test_random_faults_only_on_chosen_subfunctions_and_kinds() -> None:
    host = FaultyHost(FaultPlan(seed=0, rate=1.0, kinds=["retry"], subfns=[IO]))
    r = Regs(r11=CPUID, r12=0x40000000)
    host.tdvmcall(r)
    assert r.r10 == 0 and r.r12 == 0x40000001       # CPUID not eligible
    r = io_in(0x3FD)
    host.tdvmcall(r)
    assert r.r10 == 1
    host.tdvmcall(Regs(r10=1))                      # VMM calls are not in subfns=[30]
    assert [f.call for f in host.faults] == [1]


def test_garbage_only_random_kind_skips_non_in_calls() -> None:
    host = FaultyHost(FaultPlan(rate=1.0, kinds=[FaultKind.GARBAGE_HIGH]))
    host.tdvmcall(io_out(0x80, 1))
    host.tdvmcall(io_in(0x3FD))
    assert [(f.call, f.kind) for f in host.faults] == [(1, FaultKind.GARBAGE_HIGH)]


def test_plan_reset_replays() -> None:
    plan = FaultPlan(seed=5, rate=0.5)
    host = FaultyHost(plan)
    for _ in range(50):
        host.tdvmcall(io_in(0x3FD))
    first = list(host.faults)
    plan.reset()
    host.faults.clear()
    for _ in range(50):
        host.tdvmcall(io_in(0x3FD))
    assert host.faults == first


def test_no_faults_by_default_behaves_like_host() -> None:
    a, b = FaultyHost(), Host()
    for h in (a, b):
        for i in range(10):
            h.tdvmcall(io_out(0x3F8, 0x30 + i))
    assert a.uart.output == b.uart.output == b"0123456789" and a.faults == []


@pytest.mark.parametrize("kw", [
    {"seed": 1.5}, {"rate": 1.5}, {"rate": -0.1}, {"rate": True}, {"kinds": []}, {"kinds": ["explode"]},
    {"at": {-1: "retry"}}, {"at": {0: "nope"}}, {"subfns": [-1]}, {"clobber_regs": ["xmm0"]},
    {"clobber_regs": []},
])
def test_plan_argument_checks(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        FaultPlan(**kw)  # type: ignore[arg-type]


def test_faulty_host_argument_checks() -> None:
    with pytest.raises(InvalidArgumentError):
        FaultyHost(plan="retry")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        FaultyHost().tdvmcall(None)  # type: ignore[arg-type]
