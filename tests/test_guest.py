"""Guest: early and normal #VE paths, sub-handlers, port filter, paravirt helpers (ref 1.x)."""

from __future__ import annotations


import pytest

from tdxve.errors import (
    EarlyPanic,
    GuestFault,
    GuestPanic,
    InvalidArgumentError,
    UnsupportedExitError,
    VeFault,
)
from tdxve.guest import (
    INTEL_ALLOWED_PORTS,
    INTEL_DEBUG_ALLOWED_PORTS,
    PROFILE_NAMES,
    PROFILES,
    ArrayMemory,
    Guest,
    GuestMemory,
    Profile,
    merge_in,
    out_data,
)
from tdxve.regs import Regs
from tdxve.tdx import TdxModule


import ve_helpers as H  # noqa: E402  (tests/ is on pythonpath)
KRIP = 0xFFFFFFFF81000ABC          # a kernel-text RIP


def make(profile: str = "linux", **kw: object) -> tuple[Guest, TdxModule, object]:
    host = H.KvmHost({0x71: 0x26, 0xCFC: 0x12378086, 0x3FD: 0x60})
    tdx = TdxModule(host)
    return Guest(tdx, profile=profile, **kw), tdx, host  # type: ignore[arg-type]


def io_ve(tdx: TdxModule, regs: Regs, code: bytes) -> None:
    tdx.inject_io_ve(regs, code)


# ---------------------------------------------------------------- early path (ref 1.7)
def test_early_path_handles_port_io() -> None:
    g, tdx, host = make()
    regs = Regs(rip=KRIP, rdx=0x3FD, rax=0xAB00)
    io_ve(tdx, regs, b"\xec")                      # IN AL, DX
    g.do_early_exception(regs, 20)
    assert regs.rax == 0xAB60 and regs.rip == KRIP + 1
    assert not tdx.ve_pending


def test_early_cpuid_ve_panics_with_the_kernel_message() -> None:
    g, tdx, host = make()
    regs = Regs(rip=KRIP, rax=0x40000000)
    before = regs.copy()
    tdx.inject_ve(regs, 10, instr_len=2)           # CPUID #VE in the early window
    with pytest.raises(EarlyPanic) as ei:
        g.do_early_exception(regs, 20)
    msg = str(ei.value)
    # early_fixup_exception: "PANIC: early exception 0x%02x IP %lx:%lx error %lx cr2 0x%lx"
    assert msg.splitlines()[0] == "PANIC: early exception 0x14 IP 10:ffffffff81000abc error 0 cr2 0x0"
    assert "exit reason 10" in msg
    assert ei.value.vector == 20 and ei.value.reason == "unexpected-exit"
    assert ei.value.regs == before and regs == before
    assert not tdx.ve_pending                      # VEINFO.GET ran first (ref 1.7 step 2.1)
    assert host.calls == []                        # type: ignore[attr-defined]


def test_exception_table_entry_rescues_early_cpuid() -> None:
    g, tdx, _ = make()
    g.extable[KRIP] = KRIP + 0x40
    regs = Regs(rip=KRIP)
    tdx.inject_ve(regs, 10, instr_len=2)
    g.do_early_exception(regs, 20)
    assert regs.rip == KRIP + 0x40 and g.fixups == 1


def test_early_string_io_panics() -> None:
    g, tdx, _ = make()
    regs = Regs(rip=KRIP, rdx=0x3F8, rcx=3)
    io_ve(tdx, regs, b"\xf3\x6e")
    with pytest.raises(EarlyPanic) as ei:
        g.do_early_exception(regs, 20)
    assert ei.value.reason == "string-io" and regs.rip == KRIP and regs.rcx == 3


@pytest.mark.parametrize("profile,expected_rax", [
    ("linux-2022", 0xAAAAAAAAAAAAAA00),    # bits 8:0 cleared (ref 1.4, 1.10)
    ("linux", 0xAAAAAAAAAAAAAA00),         # AL := 0
    ("architectural", 0xAAAAAAAAAAAAAAAA),  # a faulting IN writes nothing
])
def test_early_failed_in_modifies_rax_then_panics(profile: str, expected_rax: int) -> None:
    g, tdx, host = make(profile)
    host.replies.append((0x8000000000000000, 0x55))    # type: ignore[attr-defined]
    regs = Regs(rip=KRIP, rdx=0x3FD, rax=0xAAAAAAAAAAAAAAAA)
    io_ve(tdx, regs, b"\xec")
    with pytest.raises(EarlyPanic) as ei:
        g.do_early_exception(regs, 20)
    assert regs.rax == expected_rax and regs.rip == KRIP
    assert ei.value.regs.rax == expected_rax and ei.value.reason == "io-failed"


def test_early_user_mode_cs_fails_even_with_a_fixup() -> None:
    g, tdx, _ = make()
    g.extable[0x401000] = 0x401100
    regs = Regs(rip=0x401000, cpl=3)
    tdx.inject_ve(regs, 12, instr_len=1)
    with pytest.raises(EarlyPanic, match=r"^PANIC: early exception 0x14 IP 33:401000 error 0"):
        g.do_early_exception(regs, 20)


def test_early_other_vectors_and_nmi() -> None:
    g, tdx, _ = make()
    regs = Regs(rip=KRIP)
    with pytest.raises(EarlyPanic, match=r"^PANIC: early exception 0x0d IP 10:ffffffff81000abc"):
        g.do_early_exception(regs, 13)
    g.do_early_exception(regs, 2)                  # NMI: ignored
    assert regs.rip == KRIP
    for bad in (-1, 256, "20", None, True):
        with pytest.raises(InvalidArgumentError):
            g.do_early_exception(regs, bad)  # type: ignore[arg-type]


def test_early_5_19_rc_does_not_advance_rip() -> None:
    g, tdx, host = make("linux-5.19-rc")
    regs = Regs(rip=KRIP, rdx=0x3F8, rax=0x41)
    io_ve(tdx, regs, b"\xee")
    g.do_early_exception(regs, 20)
    assert regs.rip == KRIP and host.io == [("out", 0x3F8, 1, 0x41)]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- normal path (ref 1.6, 1.9)
def test_handle_ve_without_pending_info_panics() -> None:
    g, tdx, _ = make()
    regs = Regs(rip=KRIP)
    with pytest.raises(GuestPanic, match=r"TDCALL 3 failed \(Buggy TDX module!\)") as ei:
        g.handle_ve(regs)
    assert ei.value.regs == regs


def test_tdvmcall_tdcall_failure_panics() -> None:
    host = H.KvmHost()
    bad = Profile("bad-mask", "linux", vmcall_rcx=0xFFCD)      # selects RAX: operand invalid
    g = Guest(TdxModule(host), profile=bad)
    regs = Regs(rip=KRIP, rdx=0x80)
    g.tdx.inject_io_ve(regs, b"\xee")
    with pytest.raises(GuestPanic, match="TDVMCALL failed. TDX module bug?"):
        g.handle_ve(regs)
    assert regs.rip == KRIP and host.calls == []


@pytest.mark.parametrize("rflags,irq_disabled", [(0x202, 0), (0x002, 1)])
def test_hlt(rflags: int, irq_disabled: int) -> None:
    g, tdx, host = make()
    regs = Regs(rip=KRIP, rflags=rflags)
    tdx.inject_ve(regs, 12, instr_len=1)
    g.handle_ve(regs)
    assert regs.rip == KRIP + 1
    assert host.halts == [irq_disabled]          # type: ignore[attr-defined]
    assert host.last.r11 == 12                   # type: ignore[attr-defined]


def test_rdmsr_splits_r11_into_eax_edx() -> None:
    g, tdx, host = make()
    host.msrs[0x1B] = 0xFEE00900_12345678       # type: ignore[attr-defined]
    regs = Regs(rip=KRIP, rcx=0x1B, rax=0xFFFFFFFFFFFFFFFF, rdx=0xFFFFFFFFFFFFFFFF)
    tdx.inject_ve(regs, 31, instr_len=2)
    g.handle_ve(regs)
    assert (regs.rax, regs.rdx, regs.rip) == (0x12345678, 0xFEE00900, KRIP + 2)


def test_rdmsr_failure_is_a_ve_fault() -> None:
    g, tdx, _ = make()
    regs = Regs(rip=KRIP, rcx=0x999, rax=7)
    tdx.inject_ve(regs, 31, instr_len=2)
    with pytest.raises(VeFault, match="kernel oops") as ei:
        g.handle_ve(regs)
    assert ei.value.reason == "msr-failed" and regs.rip == KRIP and regs.rax == 7


@pytest.mark.parametrize("profile,expected", [
    # write_msr: (u64)regs->dx << 32 | regs->ax -- RAX bits 63:32 leak (Linux)
    ("linux", 0xCAFEF00D_DEADBEEF | 0x11111111_00000000),
    ("linux-2022", 0xCAFEF00D_DEADBEEF | 0x11111111_00000000),
    ("architectural", 0xCAFEF00D_DEADBEEF),      # EDX:EAX only
])
def test_wrmsr_value(profile: str, expected: int) -> None:
    g, tdx, host = make(profile)
    regs = Regs(rip=KRIP, rcx=0x1_0000_0010, rax=0x11111111_DEADBEEF, rdx=0x22222222_CAFEF00D)
    tdx.inject_ve(regs, 32, instr_len=2)
    g.handle_ve(regs)
    msr = 0x1_0000_0010 if profile != "architectural" else 0x10
    assert host.msrs == {msr: expected}           # type: ignore[attr-defined]
    assert regs.rip == KRIP + 2


def test_cpuid_hypervisor_range_goes_to_host() -> None:
    g, tdx, host = make()
    host.cpuid[(0x40000000, 0)] = (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)  # type: ignore[attr-defined]
    regs = Regs(rip=KRIP, rax=0x40000000, rbx=9, rcx=0, rdx=9)
    tdx.inject_ve(regs, 10, instr_len=2)
    g.handle_ve(regs)
    assert (regs.rax, regs.rbx, regs.rcx, regs.rdx) == (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)
    assert regs.rip == KRIP + 2


@pytest.mark.parametrize("leaf", [0, 1, 0x3FFFFFFF, 0x50000000, 0x80000000])
def test_cpuid_outside_hypervisor_range_reads_zero_without_host(leaf: int) -> None:
    g, tdx, host = make()
    regs = Regs(rip=KRIP, rax=leaf, rbx=1, rcx=2, rdx=3, rsi=4)
    tdx.inject_ve(regs, 10, instr_len=2)
    g.handle_ve(regs)
    assert (regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi) == (0, 0, 0, 0, 4)
    assert host.calls == []                       # type: ignore[attr-defined]


def test_cpuid_upper_rax_bits_linux_vs_architectural() -> None:
    # Linux compares the full 64-bit RAX with the range; CPUID itself uses EAX.
    for profile, host_called in (("linux", False), ("architectural", True)):
        g, tdx, host = make(profile)
        host.cpuid[(0x40000000, 0)] = (1, 2, 3, 4)   # type: ignore[attr-defined]
        regs = Regs(rip=KRIP, rax=0x1_40000000)
        tdx.inject_ve(regs, 10, instr_len=2)
        g.handle_ve(regs)
        assert bool(host.calls) is host_called, profile      # type: ignore[attr-defined]


def test_user_mode_cpuid_is_handled() -> None:
    g, tdx, host = make()
    regs = Regs(rip=0x401000, cpl=3, rax=5)
    tdx.inject_ve(regs, 10, instr_len=2)
    g.handle_ve(regs)
    assert regs.rip == 0x401002 and regs.rax == 0


def test_user_mode_port_io_is_sigsegv() -> None:
    g, tdx, host = make()
    g.extable[0x401000] = 0x402000               # user faults never use the kernel extable
    regs = Regs(rip=0x401000, cpl=3, rdx=0x3F8, rax=0x41)
    before = regs.copy()
    io_ve(tdx, regs, b"\xee")
    with pytest.raises(VeFault, match="SIGSEGV") as ei:
        g.handle_ve(regs)
    assert ei.value.reason == "user-io" and ei.value.vector == 20
    assert regs == before and host.calls == []   # type: ignore[attr-defined]
    assert not tdx.ve_pending


@pytest.mark.parametrize("cpl", [0, 3])
@pytest.mark.parametrize("reason", [54, 13, 18, 49, 0x10000000 | 30])
def test_unexpected_reason_is_a_ve_fault(cpl: int, reason: int) -> None:
    g, tdx, _ = make()
    regs = Regs(rip=KRIP, cpl=cpl)
    tdx.inject_ve(regs, reason, instr_len=2)
    with pytest.raises(VeFault, match=f"Unexpected #VE: {reason}"):
        g.handle_ve(regs)
    assert regs.rip == KRIP


@pytest.mark.parametrize("reason", [12, 31, 32])
def test_user_mode_hlt_and_msr_are_faults(reason: int) -> None:
    g, tdx, host = make()
    regs = Regs(rip=0x401000, cpl=3)
    tdx.inject_ve(regs, reason, instr_len=2)
    with pytest.raises(VeFault, match="SIGSEGV"):
        g.handle_ve(regs)
    assert host.calls == []                      # type: ignore[attr-defined]


@pytest.mark.parametrize("cpl", [0, 3])
def test_ept_violation_is_unsupported_for_now(cpl: int) -> None:
    g, tdx, _ = make()
    regs = Regs(rip=KRIP, cpl=cpl)
    tdx.inject_ve(regs, 48, 0x181, gla=0xFED00000, gpa=0xFED00000)
    with pytest.raises(UnsupportedExitError, match="EPT violation") as ei:
        g.handle_ve(regs)
    assert isinstance(ei.value, GuestFault) and ei.value.reason == "ept-violation"
    assert regs.rip == KRIP and not tdx.ve_pending


def test_kernel_failure_with_extable_entry_is_fixed_up() -> None:
    g, tdx, host = make("linux-2022")
    g.extable[KRIP] = KRIP + 0x100
    host.replies.append((1, 0))                  # type: ignore[attr-defined]
    regs = Regs(rip=KRIP, rdx=0x3FD, rax=0x1FF)
    io_ve(tdx, regs, b"\xec")
    g.handle_ve(regs)
    assert regs.rip == KRIP + 0x100 and regs.rax == 0 and g.fixups == 1


def test_normal_string_io_rejected_by_default() -> None:
    g, tdx, host = make()
    regs = Regs(rip=KRIP, rdx=0x1F0, rdi=0x1000, rcx=4)
    before = regs.copy()
    io_ve(tdx, regs, b"\x66\xf3\x6d")
    with pytest.raises(VeFault, match="string I/O") as ei:
        g.handle_ve(regs)
    assert ei.value.reason == "string-io" and regs == before and host.calls == []  # type: ignore[attr-defined]


def test_handle_io_ignores_qual_bits_63_32_and_rep_on_in() -> None:
    # handle_io works on a u32 copy and never looks at REP / imm (ref 1.3, 1.4)
    g, tdx, host = make()
    regs = Regs(rip=KRIP, rax=0)
    tdx.inject_ve(regs, 30, 0xFFFF_FFFF_0071_0068, instr_len=3)   # IN, imm, REP bit, bits 63:32
    g.handle_ve(regs)
    assert regs.rax == 0x26 and regs.rip == KRIP + 3


def test_port_above_16_bits_not_possible_and_port_is_qual_31_16() -> None:
    g, tdx, host = make()
    regs = Regs(rip=KRIP, rax=0x5A)
    tdx.inject_ve(regs, 30, 0xFFFF0000, instr_len=1)              # OUT DX, AL to port 0xFFFF
    g.handle_ve(regs)
    assert host.io == [("out", 0xFFFF, 1, 0x5A)]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- port filter (ref 1.11)
def test_intel_allow_list_constant() -> None:
    # intel/tdx filter.c tdx_allowed_port (anchors 4.2)
    for p in (0x70, 0x71, 0x80, 0x8F, 0xCD8, 0xCDF, 0xCF8, 0xCFF, 0xCC4, 0xCC8, 0x600, 0x62F):
        assert p in INTEL_ALLOWED_PORTS
    for p in (0x6F, 0x72, 0x90, 0xCC5, 0xCF7, 0x630, 0x3F8, 0x2F8, 0x60, 0x64, 0x402):
        assert p not in INTEL_ALLOWED_PORTS
    assert len(INTEL_ALLOWED_PORTS) == 2 + 16 + 8 + 8 + 2 + 0x30
    serial = {0x2E8, 0x2EF, 0x2F8, 0x2FF, 0x3E8, 0x3EF, 0x3F8, 0x3FF}
    assert serial <= INTEL_DEBUG_ALLOWED_PORTS and not serial & INTEL_ALLOWED_PORTS
    assert len(INTEL_DEBUG_ALLOWED_PORTS) == len(INTEL_ALLOWED_PORTS) + 32


@pytest.mark.parametrize("profile,code,rax,expected", [
    # downstream: regs->ax &= ~mask; regs->ax |= UINT_MAX & mask (9/17/33-bit mask)
    ("linux-2022", b"\xec", 0xAAAAAAAAAAAAAAAA, 0xAAAAAAAAAAAAABFF),
    ("linux-2022", b"\xed", 0xAAAAAAAAAAAAAAAA, 0xAAAAAAAAFFFFFFFF),
    ("linux", b"\xec", 0xAAAAAAAAAAAAAAAA, 0xAAAAAAAAAAAAAAFF),
    ("linux", b"\x66\xed", 0xAAAAAAAAAAAAAAAA, 0xAAAAAAAAAAAAFFFF),
    ("linux", b"\xed", 0xAAAAAAAAAAAAAAAA, 0x00000000FFFFFFFF),
    ("architectural", b"\xed", 0xAAAAAAAAAAAAAAAA, 0x00000000FFFFFFFF),
])
def test_denied_in_reads_all_ones_and_succeeds(profile: str, code: bytes, rax: int,
                                               expected: int) -> None:
    g, tdx, host = make(profile, port_filter=INTEL_ALLOWED_PORTS)
    regs = Regs(rip=KRIP, rdx=0x3F8, rax=rax)
    io_ve(tdx, regs, code)
    g.handle_ve(regs)
    assert regs.rax == expected and regs.rip == KRIP + len(code)
    assert host.calls == []                      # type: ignore[attr-defined]


def test_denied_out_is_dropped_allowed_port_reaches_host() -> None:
    g, tdx, host = make(port_filter=INTEL_ALLOWED_PORTS)
    regs = Regs(rip=KRIP, rdx=0x3F8, rax=0x41)
    io_ve(tdx, regs, b"\xee")
    g.handle_ve(regs)
    assert regs.rip == KRIP + 1 and host.calls == []   # type: ignore[attr-defined]
    regs = Regs(rip=KRIP, rax=0)
    io_ve(tdx, regs, b"\xe4\x71")
    g.handle_ve(regs)
    assert regs.rax == 0x26 and len(host.calls) == 1   # type: ignore[attr-defined]


def test_port_filter_callable_and_bad_filters() -> None:
    seen: list[int] = []

    def allow_even(port: int) -> bool:
        seen.append(port)
        return port % 2 == 0

    g, tdx, host = make(port_filter=allow_even)
    regs = Regs(rip=KRIP, rdx=0x3F9, rax=0)
    io_ve(tdx, regs, b"\xec")
    g.handle_ve(regs)
    assert regs.rax == 0xFF and seen == [0x3F9]
    for bad in ("0x70", b"\x70", 42, object()):
        with pytest.raises(InvalidArgumentError, match="port_filter"):
            make(port_filter=bad)


def test_filter_applies_on_the_early_path_too() -> None:
    g, tdx, host = make(port_filter=range(0x70, 0x72))
    regs = Regs(rip=KRIP, rdx=0x3FD, rax=0)
    io_ve(tdx, regs, b"\xec")
    g.do_early_exception(regs, 20)
    assert regs.rax == 0xFF and host.calls == []  # type: ignore[attr-defined]


# ---------------------------------------------------------------- paravirt helpers (ref 1.7)
def test_tdvmcall_io_read_write() -> None:
    g, tdx, host = make()
    assert g.tdvmcall_io_read(1, 0x71) == 0x26
    assert g.tdvmcall_io_read(4, 0xCFC) == 0x12378086
    assert g.tdvmcall_io_write(2, 0x604, 0x12342000) == 0
    assert host.io[-1] == ("out", 0x604, 2, 0x2000)       # type: ignore[attr-defined]
    assert host.last.r15 == 0x2000                        # type: ignore[attr-defined]
    assert tdx.ve_injected == 0 and tdx.vmcalls == 3


@pytest.mark.parametrize("size,expected", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)])
def test_tdvmcall_io_read_failure_is_all_ones(size: int, expected: int) -> None:
    g, tdx, host = make()
    host.replies.append((0x8000000000000000, 0x1234))     # type: ignore[attr-defined]
    assert g.tdvmcall_io_read(size, 0x80) == expected


def test_tdvmcall_io_write_returns_status_and_bad_args() -> None:
    g, _, host = make()
    host.replies.append((0x8000000000000000, 0))          # type: ignore[attr-defined]
    assert g.tdvmcall_io_write(1, 0x80, 0x1FF) == 0x8000000000000000
    assert host.last.r15 == 0xFF                          # type: ignore[attr-defined]
    for size, port in ((3, 0x80), (8, 0x80), (True, 0x80), (1, 0x10000), (1, -1), (1, "80")):
        with pytest.raises(InvalidArgumentError):
            g.tdvmcall_io_read(size, port)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        g.tdvmcall_io_write(1, 0x80, -5)


# ---------------------------------------------------------------- construction, profiles, memory
def test_guest_argument_validation() -> None:
    tdx = TdxModule(H.KvmHost())
    with pytest.raises(InvalidArgumentError, match="TdxModule"):
        Guest(H.KvmHost())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="profile"):
        Guest(tdx, profile="linux-2019")
    with pytest.raises(InvalidArgumentError, match="string_io"):
        Guest(tdx, string_io="unroll")
    with pytest.raises(InvalidArgumentError, match="max_rep"):
        Guest(tdx, max_rep=-1)
    with pytest.raises(InvalidArgumentError, match="memory"):
        Guest(tdx, memory=bytearray(10))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="Regs"):
        Guest(tdx).handle_ve("regs")  # type: ignore[arg-type]


def test_profiles_table() -> None:
    assert PROFILE_NAMES == ("linux-2022", "linux", "architectural", "linux-5.19-rc")
    assert PROFILES["linux-5.19-rc"].early_advances_rip is False
    assert PROFILES["linux-5.19-rc"].vmcall_rcx == 0xFC00       # 2022 __tdx_hypercall (ref 2.4)
    assert PROFILES["linux"].vmcall_rcx == 0xFFCC
    assert all(PROFILES[n].early_advances_rip for n in ("linux-2022", "linux", "architectural"))
    with pytest.raises(InvalidArgumentError, match="merge"):
        Profile("x", "linux-2021")
    with pytest.raises(TypeError):
        PROFILES["x"] = PROFILES["linux"]  # type: ignore[index]


def test_merge_helpers_validate() -> None:
    with pytest.raises(InvalidArgumentError):
        merge_in("linux", -1, 0, 1)
    with pytest.raises(InvalidArgumentError):
        merge_in("linux", 0, 1 << 64, 1)
    for size in (0, 9, 1.0, True):
        with pytest.raises(InvalidArgumentError, match="size"):
            out_data("linux", 0, size)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="profile"):
        out_data("nope", 0, 1)


def test_array_memory() -> None:
    mem = ArrayMemory(16, base=0x1000)
    assert isinstance(mem, GuestMemory)
    mem.write(0x1004, b"\x01\x02\x03")
    assert mem.read(0x1003, 5) == b"\x00\x01\x02\x03\x00"
    assert bytes(mem.data[4:7]) == b"\x01\x02\x03"
    assert mem.read(0x1010, 0) == b""
    for addr, n in ((0xFFF, 1), (0x100F, 2), (0x1010, 1)):
        with pytest.raises(IndexError, match="outside guest memory"):
            mem.read(addr, n)
    with pytest.raises(IndexError):
        mem.write(0x100E, b"abc")
    assert mem.read(0x100E, 2) == b"\x00\x00"         # nothing written
    with pytest.raises(InvalidArgumentError):
        mem.read(0x1000, -1)
    with pytest.raises(InvalidArgumentError):
        mem.read("0x1000", 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        mem.write(0x1000, 5)  # type: ignore[arg-type]
    for size, base in ((0, 0), (-1, 0), (1.5, 0), (16, -1), (16, 2**64 - 8)):
        with pytest.raises(InvalidArgumentError):
            ArrayMemory(size, base)  # type: ignore[arg-type]


def test_array_memory_accepts_numpy_integers() -> None:
    import numpy as np

    mem = ArrayMemory(8)
    mem.write(np.uint64(2), b"\x07")
    assert mem.read(np.int64(2), np.uint8(1)) == b"\x07"
    with pytest.raises(InvalidArgumentError):
        mem.read(2.0, 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        mem.read(np.bool_(True), 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [{"name": ""}, {"name": 5}, {"early_advances_rip": 1},
                                {"vmcall_rcx": -1}, {"vmcall_rcx": "0xffcc"}])
def test_profile_field_validation(kw: dict[str, object]) -> None:
    args: dict[str, object] = {"name": "custom", "merge": "linux"}
    args.update(kw)
    with pytest.raises(InvalidArgumentError):
        Profile(**args)  # type: ignore[arg-type]
