"""Host.tdvmcall: KVM's TDVMCALL semantics (issue 4; reference 2.5, 2.6, 5.1, 5.2, 6.3).

KVM sources are cited as in tdxve/host/host.py: arch/x86/kvm/vmx/tdx.c
(tdx_emulate_io, tdx_emulate_cpuid, tdx_get_td_vm_call_info,
tdx_complete_emulated_msr, tdx_emulate_vmcall, handle_tdvmcall).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxve.abi import TdvmcallStatus
from tdxve.devices import ManualClock
from tdxve.errors import DeviceError, InvalidArgumentError
from tdxve.host import KVM_ENOSYS, EventLog, FatalReport, Host
from tdxve.regs import Regs

U64 = (1 << 64) - 1
INVALID_OPERAND = 0x8000000000000000
SUBFUNC_UNSUPPORTED = 0x8000000000000003


def io_image(size: int, direction: int, port: int, value: int = 0, **extra: int) -> Regs:
    """The register image Linux's handle_in/handle_out build (ref 1.4): R10=0 R11=30 R12-R15."""
    return Regs(r10=0, r11=30, r12=size, r13=direction, r14=port, r15=value, **extra)


def outb(host: Host, port: int, value: int, size: int = 1) -> None:
    r = io_image(size, 1, port, value)
    host.tdvmcall(r)
    assert r.r10 == 0, f"OUT {port:#x} failed: {r.r10:#x}"


def inb(host: Host, port: int, size: int = 1) -> int:
    r = io_image(size, 0, port)
    host.tdvmcall(r)
    assert r.r10 == 0, f"IN {port:#x} failed: {r.r10:#x}"
    return r.r11


class Recorder:
    def __init__(self, reply: int = 0) -> None:
        self.reply = reply
        self.calls: list[tuple[str, int, int, int | None]] = []

    def read(self, port: int, size: int) -> int:
        self.calls.append(("r", port, size, None))
        return self.reply

    def write(self, port: int, size: int, value: int) -> None:
        self.calls.append(("w", port, size, value))


class Boom:
    def read(self, port: int, size: int) -> int:
        raise ZeroDivisionError("model bug")

    def write(self, port: int, size: int, value: int) -> None:
        raise ZeroDivisionError("model bug")


# ---------------------------------------------------------------- KVM's validation table (ref 5.2)
@pytest.mark.parametrize("size", [0, 3, 5, 8, 16, U64])
@pytest.mark.parametrize("direction", [0, 1])
def test_kvm_rejects_bad_sizes(size: int, direction: int) -> None:
    """tdx_emulate_io: size not in {1,2,4} -> R10 = INVALID_OPERAND, nothing reaches a device."""
    host = Host()
    rec = Recorder()
    host.bus.register(0x50, 8, rec)
    r = io_image(size, direction, 0x50, 0xAB)
    before = r.copy()
    host.tdvmcall(r)
    assert r.r10 == INVALID_OPERAND == TdvmcallStatus.INVALID_OPERAND
    assert r.diff(before) == {"r10": (INVALID_OPERAND, 0)}     # R11 untouched (still 30)
    assert rec.calls == []


@pytest.mark.parametrize("direction", [2, 3, 0x100, U64])
def test_kvm_rejects_bad_direction(direction: int) -> None:
    host = Host()
    r = io_image(1, direction, 0x3F8, 0x41)
    host.tdvmcall(r)
    assert r.r10 == INVALID_OPERAND and r.r11 == 30
    assert host.uart.output == b""


def test_selftest_size5_write_invalid_operand() -> None:
    """Ref 6.4 (KVM selftests, port 0x51): a size-5 write returns 0x8000000000000000."""
    host = Host()
    r = io_image(5, 1, 0x51, 0xFFABCDEF)
    host.tdvmcall(r)
    assert r.r10 == 0x8000000000000000


@pytest.mark.parametrize("r14", [0x1_0000_03F8, 0xFFFF_FFFF_0000_03F8, 0xDEAD_03F8])
def test_port_truncated_to_16_bits(r14: int) -> None:
    """KVM passes the port as unsigned short: 0x1_0000_03F8 is port 0x3F8 (ref 5.2)."""
    host = Host()
    outb_r = io_image(1, 1, r14, ord("T"))
    host.tdvmcall(outb_r)
    assert outb_r.r10 == 0
    assert host.uart.output == b"T"
    assert host.stats.io[0x3F8].writes == 1


def test_selftest_port_0x51_values_reach_device_exactly() -> None:
    """Ref 6.4: writes of 0xAB/0xABCD/0xFFABCDEF (sizes 1/2/4) arrive as those values; IN 0xAC."""
    host = Host()
    rec = Recorder(reply=0xAC)
    host.bus.register(0x50, 8, rec)
    for size, v in ((1, 0xAB), (2, 0xABCD), (4, 0xFFABCDEF)):
        outb(host, 0x51, v, size)
    assert [c[3] for c in rec.calls] == [0xAB, 0xABCD, 0xFFABCDEF]
    assert inb(host, 0x50) == 0xAC


@pytest.mark.parametrize("size,sent", [(1, 0x86), (2, 0x8086), (4, 0x12378086)])
def test_out_uses_only_low_size_bytes_of_r15(size: int, sent: int) -> None:
    """Ref 1.4/6.2: Linux 2022 put RAX & 0x1FFFF... in R15; KVM copies only `size` bytes."""
    host = Host()
    rec = Recorder()
    host.bus.register(0x500, 4, rec)
    r = io_image(size, 1, 0x500, 0xFFFF_FFFF_0000_0000 | 0x1_1237_8086)
    host.tdvmcall(r)
    assert rec.calls == [("w", 0x500, size, sent)]
    assert r.r10 == 0 and r.r11 == 30           # OUT writes neither status nor value


@pytest.mark.parametrize("size", [1, 2, 4])
def test_in_zero_extends_into_r11(size: int) -> None:
    """The PIO layer fills `size` bytes of a zeroed buffer: R11 = value zero-extended (ref 5.2)."""
    host = Host()
    host.bus.register(0x500, 4, Recorder(reply=0xFEDC_BA98_7654_3210))
    r = io_image(size, 0, 0x500, r8=0x1111)
    before = r.copy()
    host.tdvmcall(r)
    assert r.r11 == 0x7654_3210 & ((1 << (8 * size)) - 1)
    assert r.r10 == 0
    assert set(r.diff(before)) == {"r11"}


def test_unassigned_port_reads_all_ones_through_tdvmcall() -> None:
    host = Host()
    assert inb(host, 0x1234, 4) == 0xFFFFFFFF
    assert inb(host, 0x1234, 2) == 0xFFFF


def test_reference_6_3_live_values() -> None:
    """Ref 6.3: INB 0x71 after selecting CMOS status A reads 0x26; INL 0xCFC of 00:00.0 reads 0x12378086."""
    host = Host()
    outb(host, 0x70, 0x0A)
    assert inb(host, 0x71) == 0x26
    outb(host, 0xCF8, 0x8000_0000, 4)
    assert inb(host, 0xCFC, 4) == 0x12378086


@settings(max_examples=300, deadline=None)
@given(size=st.one_of(st.sampled_from([1, 2, 4]), st.integers(0, U64)),
       direction=st.one_of(st.sampled_from([0, 1]), st.integers(0, U64)),
       port=st.integers(0, U64), value=st.integers(0, U64),
       other=st.integers(0, U64))
def test_io_never_raises_and_touches_only_r10_r11(size: int, direction: int, port: int,
                                                  value: int, other: int) -> None:
    """Property: any register contents -> a defined reply; only R10/R11 can change (ref 5.2)."""
    host = Host(clock=ManualClock())
    r = io_image(size, direction, port, value, rax=other, rbx=other, r8=other, r9=other)
    before = r.copy()
    host.tdvmcall(r)
    valid = size in (1, 2, 4) and direction in (0, 1)
    assert set(r.diff(before)) <= {"r10", "r11"}
    if not valid:
        assert r.r10 == INVALID_OPERAND and r.r11 == 30
    elif direction == 0:
        assert r.r10 == 0 and r.r11 < (1 << (8 * size))
    else:
        assert r.r10 == 0 and r.r11 == 30


def test_tdvmcall_needs_regs() -> None:
    with pytest.raises(InvalidArgumentError, match="Regs"):
        Host().tdvmcall({"r11": 30})  # type: ignore[arg-type]


# ---------------------------------------------------------------- Linux earlyprintk, unchanged
class EarlySerial:
    """arch/x86/boot/early_serial_console.c + arch/x86/kernel/early_printk.c, statement by statement,
    every inb/outb a TDG.VP.VMCALL<Instruction.IO> as Linux's handle_in/handle_out build it."""

    TXR, RXR, IER, IIR, FCR, LCR, MCR, LSR, MSR, DLL, DLH = 0, 0, 1, 2, 2, 3, 4, 5, 6, 0, 1
    XMTRDY, DLAB = 0x20, 0x80

    def __init__(self, host: Host) -> None:
        self.host = host
        self.calls = 0
        self.base = 0

    def outb(self, value: int, port: int) -> None:
        self.calls += 1
        outb(self.host, port, value & 0xFF)

    def inb(self, port: int) -> int:
        self.calls += 1
        return inb(self.host, port) & 0xFF

    def early_serial_init(self, port: int, baud: int) -> None:
        self.outb(0x3, port + self.LCR)       # 8n1
        self.outb(0, port + self.IER)         # no interrupt
        self.outb(0, port + self.FCR)         # no fifo
        self.outb(0x3, port + self.MCR)       # DTR + RTS
        divisor = 115200 // baud
        c = self.inb(port + self.LCR)
        self.outb(c | self.DLAB, port + self.LCR)
        self.outb(divisor & 0xFF, port + self.DLL)
        self.outb((divisor >> 8) & 0xFF, port + self.DLH)
        self.outb(c & ~self.DLAB, port + self.LCR)
        self.base = port

    def probe_baud(self, port: int) -> int:
        lcr = self.inb(port + self.LCR)
        self.outb(lcr | self.DLAB, port + self.LCR)
        dll = self.inb(port + self.DLL)
        dlh = self.inb(port + self.DLH)
        self.outb(lcr, port + self.LCR)
        return (1843200 // 16) // ((dlh << 8) | dll)

    def putc(self, ch: int) -> int:
        timeout = 0xFFFF
        while (self.inb(self.base + self.LSR) & self.XMTRDY) == 0:
            timeout -= 1
            if not timeout:
                break
        self.outb(ch, self.base + self.TXR)
        return 0 if timeout else -1

    def write(self, s: str) -> None:
        for ch in s:
            if ch == "\n":
                self.putc(ord("\r"))
            self.putc(ord(ch))


def test_linux_earlyprintk_sequence_prints_through_instruction_io_only() -> None:
    host = Host()
    con = EarlySerial(host)
    con.early_serial_init(0x3F8, 9600)           # DEFAULT_BAUD
    assert con.calls == 9                         # 8 OUTs + the LCR read-back
    u = host.uart
    assert (u.lcr, u.ier, u.fcr, u.mcr, u.divisor, u.baud) == (0x03, 0, 0, 0x03, 12, 9600)
    assert con.probe_baud(0x3F8) == 9600
    before = con.calls
    con.write("Linux version 6.x (tdx)\n")
    assert host.uart.output == b"Linux version 6.x (tdx)\r\n"
    n = len(b"Linux version 6.x (tdx)\r\n")
    assert con.calls - before == 2 * n            # one LSR poll (THRE at once) + one THR write each
    assert host.stats.calls == {30: con.calls}
    assert host.stats.io[0x3FD].reads == n
    assert host.stats.io[0x3F8].writes == n + 1   # + the DLL write


# ---------------------------------------------------------------- CPUID (sub-function 10)
def cpuid(host: Host, leaf: int, subleaf: int = 0) -> Regs:
    r = Regs(r10=0, r11=10, r12=leaf, r13=subleaf)
    host.tdvmcall(r)
    return r


def test_cpuid_kvm_signature_in_r12_to_r15() -> None:
    """tdx_emulate_cpuid: EAX..EDX to R12..R15; R10/R11 untouched. Leaf 0x40000000 = 'KVMKVMKVM'."""
    r = cpuid(Host(), 0x40000000)
    assert (r.r10, r.r11) == (0, 10)
    assert r.r12 == 0x40000001
    sig = b"".join(x.to_bytes(4, "little") for x in (r.r13, r.r14, r.r15))
    assert sig == b"KVMKVMKVM\0\0\0"


def test_cpuid_inputs_are_32_bit() -> None:
    r = cpuid(Host(), 0xFFFF_FFFF_4000_0000, 0xFFFF_FFFF_0000_0000)
    assert r.r12 == 0x40000001


def test_cpuid_missing_leaf_zeros_without_basic_leaf() -> None:
    r = cpuid(Host(), 0x7, 0)
    assert (r.r12, r.r13, r.r14, r.r15) == (0, 0, 0, 0) and r.r10 == 0


def test_cpuid_subleaf_and_intel_out_of_range_rule() -> None:
    """kvm_cpuid: exact (leaf, subleaf), leaf without index, then get_out_of_range_cpuid_entry."""
    intel = (0x0D, 0x756E6547, 0x6C65746E, 0x49656E69)      # max basic 0xD, "GenuineIntel"
    table = {0: intel, (0xD, 0): (1, 2, 3, 4), (0xD, 1): (5, 6, 7, 8), 0x80000000: (0x80000008, 0, 0, 0),
             0x40000000: (0x40000001, 0, 0, 0)}
    host = Host(cpuid=table)
    assert host.cpuid_lookup(0xD, 1) == (5, 6, 7, 8)
    assert host.cpuid_lookup(0xD, 7) == (0, 0, 0, 0)            # 0xD is in range: no redirect
    assert host.cpuid_lookup(0x20, 1) == (5, 6, 7, 8)           # above max basic -> leaf 0xD, same subleaf
    assert host.cpuid_lookup(0x80000009, 0) == (1, 2, 3, 4)     # above the extended max
    assert host.cpuid_lookup(0x80000005, 0) == (0, 0, 0, 0)     # inside the extended range
    assert host.cpuid_lookup(0x40000005, 0) == (1, 2, 3, 4)     # above the hypervisor sub-class max
    assert host.cpuid_lookup(0x40000100, 0) == (1, 2, 3, 4)     # hypervisor sub-class absent
    amd = dict(table)
    amd[0] = (0x0D, 0x68747541, 0x444D4163, 0x69746E65)         # "AuthenticAMD"
    assert Host(cpuid=amd).cpuid_lookup(0x20, 1) == (0, 0, 0, 0)


@pytest.mark.parametrize("bad", [{-1: (0, 0, 0, 0)}, {1: (0, 0, 0)}, {1: (0, 0, 0, 1 << 32)},
                                 {(1, 2, 3): (0, 0, 0, 0)}, {"1": (0, 0, 0, 0)}])
def test_cpuid_table_validated(bad: dict[object, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        Host(cpuid=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- HLT (12)
def test_hlt_recorded_and_cleared_by_next_call() -> None:
    seen: list[bool] = []
    host = Host(on_halt=seen.append)
    r = Regs(r11=12, r12=1)
    host.tdvmcall(r)
    assert (r.r10, r.r11) == (0, 12)
    assert host.halted and host.halt_count == 1 and host.hlt_irq_blocked and seen == [True]
    host.tdvmcall(Regs(r11=12, r12=0))
    assert host.halt_count == 2 and not host.hlt_irq_blocked and seen == [True, False]
    host.tdvmcall(io_image(1, 0, 0x3FD))
    assert not host.halted


# ---------------------------------------------------------------- RDMSR / WRMSR (31 / 32)
def rdmsr(host: Host, idx: int) -> Regs:
    r = Regs(r11=31, r12=idx)
    host.tdvmcall(r)
    return r


def wrmsr(host: Host, idx: int, value: int) -> Regs:
    r = Regs(r11=32, r12=idx, r13=value)
    host.tdvmcall(r)
    return r


def test_rdmsr_known_and_kvm_values() -> None:
    host = Host()
    r = rdmsr(host, 0x1B)
    assert (r.r10, r.r11) == (0, 0xFEE00D00)         # x2APIC mode, BSP (tdx_vcpu_init)
    assert rdmsr(host, 0xC0000080).r11 == 0xD01      # SCE|LME|LMA|NX (tdx_vcpu_create)
    assert rdmsr(host, 0xFFFF_FFFF_0000_003A).r11 == 1   # index is ECX: 32 bits


def test_unknown_msr_is_invalid_operand() -> None:
    """tdx_has_emulated_msr false -> kvm_emulate_rdmsr error -> tdx_complete_emulated_msr: INVALID_OPERAND."""
    host = Host()
    r = rdmsr(host, 0x10)                            # IA32_TIME_STAMP_COUNTER: not emulated for a TD
    assert r.r10 == INVALID_OPERAND and r.r11 == 31  # R11 untouched
    assert wrmsr(host, 0x10, 5).r10 == INVALID_OPERAND
    assert 0x10 not in host.msrs


def test_wrmsr_writable_and_read_only() -> None:
    host = Host()
    r = wrmsr(host, 0x6E0, 0x1234_5678_9ABC_DEF0)    # TSC_DEADLINE: full 64 bits from R13
    assert r.r10 == 0 and rdmsr(host, 0x6E0).r11 == 0x1234_5678_9ABC_DEF0
    for idx in (0x1B, 0xC0000080, 0x3A):             # tdx_is_read_only_msr
        before = host.msrs[idx]
        assert wrmsr(host, idx, 0).r10 == INVALID_OPERAND
        assert host.msrs[idx] == before


def test_custom_msr_map() -> None:
    host = Host(msrs={0x10: 42}, read_only_msrs=set())
    assert rdmsr(host, 0x10).r11 == 42
    assert rdmsr(host, 0x1B).r10 == INVALID_OPERAND
    with pytest.raises(InvalidArgumentError):
        Host(msrs={1 << 32: 0})
    with pytest.raises(InvalidArgumentError):
        Host(msrs={0x10: -1})


# ---------------------------------------------------------------- GetTdVmCallInfo, unknown, VMM calls
def test_get_td_vm_call_info() -> None:
    """tdx_get_td_vm_call_info: leaf 0 -> success and R11-R14 = 0; leaf 1 -> user space; else INVALID."""
    host = Host(tdvmcall_info=(0x1, 0x2, 0x3, 0x4))
    r = Regs(r11=0x10000, r12=0, r13=7, r14=8)
    host.tdvmcall(r)
    assert (r.r10, r.r11, r.r12, r.r13, r.r14) == (0, 0, 0, 0, 0)
    r = Regs(r11=0x10000, r12=1)
    host.tdvmcall(r)
    assert (r.r10, r.r11, r.r12, r.r13, r.r14) == (0, 1, 2, 3, 4)
    r = Regs(r11=0x10000, r12=2)
    host.tdvmcall(r)
    assert r.r10 == INVALID_OPERAND


@pytest.mark.parametrize("subfn", [0x10001, 0x10002, 48, 54, 0, 1, 0xFFFF, U64])
def test_unknown_subfunction_unsupported(subfn: int) -> None:
    """handle_tdvmcall default: SUBFUNC_UNSUPPORTED (0x8000000000000003, KVM commit b5aafcb4, ref 2.6)."""
    r = Regs(r11=subfn, r12=5)
    before = r.copy()
    Host().tdvmcall(r)
    assert r.r10 == SUBFUNC_UNSUPPORTED == TdvmcallStatus.SUBFUNC_UNSUPPORTED
    assert set(r.diff(before)) == {"r10"}


def test_vmm_specific_calls() -> None:
    """R10 != 0: KVM hypercall (tdx_emulate_vmcall). 1 (VAPIC_POLL_IRQ) -> 0; unknown -> -KVM_ENOSYS."""
    host = Host()
    r = Regs(r10=1, r11=30, r12=1, r13=1, r14=0x3F8, r15=0x41)
    host.tdvmcall(r)
    assert r.r10 == 0 and host.uart.output == b""   # not an Instruction.IO
    r = Regs(r10=0x1234, r11=30)
    host.tdvmcall(r)
    assert r.r10 == KVM_ENOSYS == 0xFFFFFFFFFFFFFC18 and r.r11 == 30
    assert host.stats.vmm_calls == {1: 1, 0x1234: 1} and host.stats.calls == {}

    def answer(regs: Regs) -> None:
        regs.r10 = 0
        regs.r11 = regs.r12 + 1

    host.set_vmm_handler(0x1234, answer)
    r = Regs(r10=0x1234, r12=41)
    host.tdvmcall(r)
    assert (r.r10, r.r11) == (0, 42)
    host.set_vmm_handler(0x1234, None)
    r = Regs(r10=0x1234)
    host.tdvmcall(r)
    assert r.r10 == KVM_ENOSYS
    with pytest.raises(InvalidArgumentError):
        host.set_vmm_handler(0, answer)


def test_user_handler_and_restore() -> None:
    host = Host()

    def map_gpa(regs: Regs) -> None:
        regs.r10 = 0

    host.set_handler(0x10001, map_gpa)
    r = Regs(r11=0x10001)
    host.tdvmcall(r)
    assert r.r10 == 0
    host.set_handler(0x10001, None)
    r = Regs(r11=0x10001)
    host.tdvmcall(r)
    assert r.r10 == SUBFUNC_UNSUPPORTED
    host.set_handler(12, map_gpa)                    # override a built-in, then restore it
    host.tdvmcall(Regs(r11=12))
    assert host.halt_count == 0
    host.set_handler(12, None)
    host.tdvmcall(Regs(r11=12))
    assert host.halt_count == 1
    for bad in (30, -1, "x"):
        with pytest.raises(InvalidArgumentError):
            host.set_handler(bad, map_gpa)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        host.set_handler(5, 5)  # type: ignore[arg-type]


def test_report_fatal_error_recorded() -> None:
    host = Host()
    r = Regs(r11=0x10003, r12=0xBAD, r13=0x1000)
    host.tdvmcall(r)
    assert r.r10 == 0
    (rep,) = host.fatal_reports
    assert isinstance(rep, FatalReport) and rep.error_code == 0xBAD and rep.regs.r13 == 0x1000


# ---------------------------------------------------------------- counters
def test_stats_per_subfunction_port_and_direction() -> None:
    host = Host()
    outb(host, 0x80, 0x12)
    outb(host, 0x80, 0x34)
    inb(host, 0xCFC, 4)
    host.tdvmcall(io_image(3, 0, 0x80))
    cpuid(host, 0x40000000)
    host.tdvmcall(Regs(r11=0x10002))
    host.bus.write(0x80, 1, 0x56)                    # direct (no #VE): counted separately
    s = host.stats
    assert s.calls == {30: 4, 10: 1, 0x10002: 1}
    assert s.failures == {INVALID_OPERAND: 1, SUBFUNC_UNSUPPORTED: 1}
    assert s.io[0x80] == (0, 2, 0, 2) and s.io[0xCFC] == (1, 0, 4, 0)
    assert s.direct[0x80] == (0, 1, 0, 1)
    assert s.ports()[0x80] == (0, 3, 0, 3)
    assert s.total_calls == 6
    arr = s.io.to_array()
    assert arr["port"].tolist() == [0x80, 0xCFC] and arr["write_bytes"].tolist() == [2, 0]
    s.reset()
    assert s.total_calls == 0 and len(s.io) == 0 and len(host.bus.stats) == 0
    assert host.post.codes == [0x12, 0x34, 0x56]


# ---------------------------------------------------------------- device errors
def test_device_error_raises_after_writing_invalid_operand() -> None:
    host = Host()
    host.bus.register(0x500, 1, Boom(), name="boom")
    r = io_image(1, 0, 0x500)
    with pytest.raises(DeviceError) as ei:
        host.tdvmcall(r)
    assert isinstance(ei.value.__cause__, ZeroDivisionError)
    assert r.r10 == INVALID_OPERAND and r.r11 == 30
    assert host.device_errors[-1].name == "boom"
    assert inb(host, 0x3FD) == 0x60                  # the host keeps working


def test_device_error_record_policy_guest_sees_failure() -> None:
    host = Host(on_device_error="record", log=8)
    host.bus.register(0x500, 1, Boom())
    r = io_image(1, 1, 0x500, 0x77)
    host.tdvmcall(r)                                  # no exception
    assert r.r10 == INVALID_OPERAND
    assert len(host.device_errors) == 1 and host.stats.failures == {INVALID_OPERAND: 1}
    assert host.log is not None and host.log.events[-1].fault == "device_error"


def test_host_argument_checks() -> None:
    for kw in ({"clock": object()}, {"tdvmcall_info": (1, 2, 3)}, {"log": "yes"},
               {"on_device_error": "ignore"}, {"read_only_msrs": {-1}}, {"pm_timer_port": 0x10000}):
        with pytest.raises(InvalidArgumentError):
            Host(**kw)  # type: ignore[arg-type]


def test_pc_false_leaves_bus_empty() -> None:
    host = Host(pc=False)
    assert host.bus.ranges() == []
    assert inb(host, 0x3FD) == 0xFF
    assert host.uart is not None


def test_standard_pc_layout() -> None:
    host = Host()
    layout = {(r.first, r.nports, r.name, r.sizes) for r in host.bus.ranges()}
    assert layout == {(0x3F8, 8, "uart", (1,)), (0x402, 1, "debugcon", (1,)), (0xE9, 1, "debugcon", (1,)),
                      (0x80, 1, "post", (1,)), (0x70, 2, "cmos", (1,)), (0xCF8, 8, "pci", (1, 2, 4)),
                      (0x608, 4, "pm_timer", (4,)), (0x60, 1, "i8042", (1,)), (0x64, 1, "i8042", (1,))}


def test_reset_and_reset_requested() -> None:
    host = Host()
    outb(host, 0x3FB, 0x83)
    outb(host, 0x64, 0xFE)
    outb(host, 0xCF9, 0x06)
    assert host.reset_requested == 2
    host.reset()
    assert host.uart.lcr == 0 and host.reset_requested == 2


# ---------------------------------------------------------------- event log
def test_event_log_records_calls_and_round_trips(tmp_path: object) -> None:
    import pathlib
    host = Host(log=True)
    outb(host, 0x3F8, 0x41)
    inb(host, 0x3FD)
    host.tdvmcall(io_image(3, 0, 0x1_0000_0080))
    cpuid(host, 0x40000000, 3)
    host.tdvmcall(Regs(r11=31, r12=0x1B))
    host.tdvmcall(Regs(r11=32, r12=0x6E0, r13=99))
    host.tdvmcall(Regs(r11=12, r12=1))
    host.tdvmcall(Regs(r10=5, r11=6))
    host.tdvmcall(Regs(r11=0x10002, r12=0x77))
    host.bus.write(0x80, 1, 0x99)
    log = host.log
    assert log is not None
    got = [(e.source, e.call, e.subfn, e.arg, e.size, e.direction, e.value, e.status) for e in log]
    assert got == [
        ("tdvmcall", "io", 30, 0x3F8, 1, 1, 0x41, 0),
        ("tdvmcall", "io", 30, 0x3FD, 1, 0, 0x60, 0),
        ("tdvmcall", "io", 30, 0x1_0000_0080, 3, 0, -1, INVALID_OPERAND),
        ("tdvmcall", "cpuid", 10, 0x40000000, -1, -1, 3, 0),
        ("tdvmcall", "rdmsr", 31, 0x1B, -1, -1, 0xFEE00D00, 0),
        ("tdvmcall", "wrmsr", 32, 0x6E0, -1, -1, 99, 0),
        ("tdvmcall", "hlt", 12, 1, -1, -1, -1, 0),
        ("tdvmcall", "vmm", 5, 6, -1, -1, -1, KVM_ENOSYS),
        ("tdvmcall", "unsupported", 0x10002, 0x77, -1, -1, -1, SUBFUNC_UNSUPPORTED),
        ("direct", "io", -1, 0x80, 1, 1, 0x99, -1),
    ]
    assert [e.seq for e in log] == list(range(10))
    path = pathlib.Path(str(tmp_path)) / "trace.txt"
    log.save(path)
    back = EventLog.load(path)
    assert back == log and back.events == log.events
    assert path.read_text().splitlines()[3] == "0 tdvmcall io 0x1e 0x3f8 0x1 0x1 0x41 0x0 -"


def test_event_log_is_bounded() -> None:
    host = Host(log=4)
    for i in range(10):
        outb(host, 0x80, i)
    log = host.log
    assert log is not None and len(log) == 4 and log.dropped == 6 and log.next_seq == 10
    assert [e.value for e in log] == [6, 7, 8, 9]
    back = EventLog.loads(log.dumps())
    assert back == log and back.dropped == 6 and back.capacity == 4
    back.record("direct", "io", -1, 1, 1, 0, 0, -1)
    assert back.events[-1].seq == 10


@pytest.mark.parametrize("text", [
    "", "hello\n", "# tdxve host event log v1\n0 tdvmcall io\n",
    "# tdxve host event log v1\n0 tdvmcall io 0x1e zz 0x1 0x1 0x41 0x0 -\n",
    "# tdxve host event log v1\n1 a b - - - - - - -\n0 a b - - - - - - -\n",
    "# tdxve host event log v1\n# capacity=1 dropped=0 next_seq=2\n0 a b - - - - - - -\n1 a b - - - - - - -\n",
    "# tdxve host event log v1\n0 a b -0x5 - - - - - -\n",
])
def test_event_log_rejects_malformed_text(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        EventLog.loads(text)


def test_event_log_args() -> None:
    for cap in (0, -1, 1.5, None):
        with pytest.raises(InvalidArgumentError):
            EventLog(cap)  # type: ignore[arg-type]
    host = Host()
    assert host.log is None
    log = host.enable_log(16)
    assert host.log is log and host.bus.log is log
    host.log = None
    assert host.bus.log is None
    with pytest.raises(InvalidArgumentError):
        host.log = 5  # type: ignore[assignment]


# ---------------------------------------------------------------- through the TDX module and guest (issue 3)
def test_machine_out_and_in_reach_the_pc_devices() -> None:
    machine_mod = pytest.importorskip("tdxve.machine")
    host = Host()
    m = machine_mod.Machine(host=host)
    regs = Regs(rip=0x1000, rax=ord("!"), rdx=0x3F8)
    out = m.execute(regs, b"\xee")                     # OUT DX, AL
    assert host.uart.output == b"!" and out.tdvmcalls == 1 and regs.rip == 0x1001
    regs.rdx = 0xCFC
    host.pci.config_address = 0x8000_0000
    regs.rax = 0xDEADBEEF00000000
    m.execute(regs, b"\xed")                           # IN EAX, DX
    assert regs.rax == 0x12378086                     # "linux" profile (2026-fixed) zero-extends
