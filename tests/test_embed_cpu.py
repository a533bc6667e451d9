"""tdxve.embed: the GuestCpu protocol over plain Python state, the driver, mode derivation.

No simulator here: ``PlainCpu`` below is the "few lines" a simulator writes
to implement :class:`tdxve.embed.GuestCpu`. References "ref N.M" are
sections of shared/reference/tdx-port-io.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from tdxve.abi import TdvmcallStatus
from tdxve.embed import (
    GuestCpu,
    IoStats,
    cpu_cpl,
    cpu_mode,
    execute_halt,
    execute_port_io,
    mode_label,
)
from tdxve.errors import (
    EarlyPanic,
    EmbedError,
    GuestMemoryFault,
    InvalidArgumentError,
    NotPortIoError,
    UnsupportedModeError,
    VeFault,
)
from tdxve.host import Host
from tdxve.machine import Machine
from tdxve.regs import REG_NAMES


class PlainCpu:
    """A GuestCpu over a dict of registers and a flat bytearray of memory."""

    def __init__(self, mode: int = 64, cpl: int = 0, mem_size: int = 0x10000, **regs: int) -> None:
        self.mode = mode
        self.cpl = cpl
        self.regs = {name: 0 for name in REG_NAMES + ("es_base", "cs_base", "ss_base", "ds_base")}
        self.regs["rflags"] = 0x2
        self.regs.update(regs)
        self.mem = bytearray(mem_size)
        self.writes: list[dict[str, int]] = []

    def read_registers(self, names: Sequence[str]) -> Sequence[int]:
        return [self.regs[n] for n in names]

    def write_registers(self, values: Mapping[str, int]) -> None:
        self.writes.append(dict(values))
        self.regs.update(values)

    def read_memory(self, addr: int, size: int) -> bytes:
        if addr < 0 or addr + size > len(self.mem):
            raise IndexError(f"{addr:#x}+{size}")
        return bytes(self.mem[addr:addr + size])

    def write_memory(self, addr: int, data: bytes) -> None:
        if addr < 0 or addr + len(data) > len(self.mem):
            raise IndexError(f"{addr:#x}+{len(data)}")
        self.mem[addr:addr + len(data)] = data


def place(cpu: PlainCpu, addr: int, code: bytes) -> None:
    cpu.mem[addr:addr + len(code)] = code
    cpu.regs["rip"] = addr


def test_plain_cpu_implements_the_protocol() -> None:
    assert isinstance(PlainCpu(), GuestCpu)


# ---------------------------------------------------------------- 64-bit mode: through #VE
@pytest.mark.parametrize("profile, expected", [
    ("linux-2022", 0xDEADBEEE12378086),     # ref 6.3: live GCP measurement
    ("linux", 0x0000000012378086),          # ref 1.4: after 941370fc
    ("architectural", 0x0000000012378086),  # SDM: EAX zero-extends
])
def test_pci_read_leaves_rax_per_profile(profile: str, expected: int) -> None:
    m = Machine(profile=profile)
    cpu = PlainCpu(rax=0x80000000, rdx=0xCF8)
    place(cpu, 0x1000, b"\xef")                     # OUT DX, EAX (CONFIG_ADDRESS)
    ev = execute_port_io(cpu, m)
    assert ev.via_ve and ev.exit_qual == 0x0CF80003 and ev.next_rip == 0x1001   # ref 6.1
    cpu.regs.update(rax=0xDEADBEEF00000000, rdx=0xCFC)
    place(cpu, 0x1001, b"\xed")                     # IN EAX, DX (CONFIG_DATA)
    ev = execute_port_io(cpu, m)
    assert ev.exit_qual == 0x0CFC000B
    assert cpu.regs["rax"] == expected
    assert cpu.regs["rip"] == 0x1002
    assert ev.tdvmcalls == 1 and ev.ves == 1 and ev.port == 0xCFC and ev.is_in and ev.size == 4


@pytest.mark.parametrize("profile, expected", [
    ("linux-2022", 0x0026),     # ref 6.3 row 2: AH bit 0 lost
    ("linux", 0x0126),
])
def test_cmos_inb_with_ah_set(profile: str, expected: int) -> None:
    m = Machine(profile=profile)
    cpu = PlainCpu(rax=0x0A)
    place(cpu, 0x2000, b"\xe6\x70")                 # OUT 0x70, AL (index 0x0A: status A)
    assert execute_port_io(cpu, m).exit_qual == 0x00700040
    cpu.regs["rax"] = 0x0100
    place(cpu, 0x2002, b"\xe4\x71")                 # IN AL, 0x71
    ev = execute_port_io(cpu, m)
    assert ev.exit_qual == 0x00710048               # ref 6.1
    assert cpu.regs["rax"] == expected
    assert cpu.regs["rip"] == 0x2004


def test_only_changed_registers_are_written_back() -> None:
    m = Machine()
    cpu = PlainCpu(rax=0x41, rdx=0x3F8, r15=0x1234)
    place(cpu, 0x1000, b"\xee")                     # OUT DX, AL
    execute_port_io(cpu, m)
    assert cpu.writes == [{"rip": 0x1001}]
    assert m.host.uart.output == b"A"


def test_string_io_emulated_through_cpu_memory() -> None:
    m = Machine(string_io="emulate")
    cpu = PlainCpu(rsi=0x3000, rcx=5, rdx=0x402)
    cpu.mem[0x3000:0x3005] = b"hello"
    place(cpu, 0x1000, b"\xf3\x6e")                 # REP OUTSB
    ev = execute_port_io(cpu, m)
    assert m.host.debugcon.output == b"hello"
    assert ev.exit_qual == 0x04020030 and ev.elements == 5 and ev.tdvmcalls == 5 and ev.ves == 1
    assert (cpu.regs["rsi"], cpu.regs["rcx"], cpu.regs["rip"]) == (0x3005, 0, 0x1002)
    # the guest's own memory is restored after the call
    assert m.guest.memory is m.memory and not isinstance(m.guest.memory, PlainCpu)


def test_rep_insd_writes_cpu_memory() -> None:
    m = Machine(string_io="emulate")
    cpu = PlainCpu(rax=0x80000000, rdx=0xCF8)
    place(cpu, 0x1000, b"\xef")
    execute_port_io(cpu, m)
    cpu.regs.update(rdi=0x4000, rcx=2, rdx=0xCFC)
    place(cpu, 0x1001, b"\xf3\x6d")                 # REP INSD
    execute_port_io(cpu, m)
    assert bytes(cpu.mem[0x4000:0x4008]) == (0x12378086).to_bytes(4, "little") * 2
    assert (cpu.regs["rdi"], cpu.regs["rcx"]) == (0x4008, 0)


@pytest.mark.parametrize("path, exc", [("early", EarlyPanic), ("normal", VeFault)])
def test_string_io_rejected_sets_fault_state(path: str, exc: type) -> None:
    # ref 1.8: Linux never handles INS/OUTS #VEs; registers stay at the instruction.
    m = Machine(path=path)
    cpu = PlainCpu(rsi=0x3000, rcx=5, rdx=0x3F8)
    place(cpu, 0x1000, b"\xf3\x6e")
    with pytest.raises(exc) as ei:
        execute_port_io(cpu, m)
    assert ei.value.regs.rip == 0x1000
    assert (cpu.regs["rip"], cpu.regs["rsi"], cpu.regs["rcx"]) == (0x1000, 0x3000, 5)
    assert m.host.uart.output == b""


def test_failed_in_writes_back_the_profiles_rax() -> None:
    class FailingHost:
        def __init__(self) -> None:
            self.bus = Host().bus

        def tdvmcall(self, regs: object) -> None:
            regs.r10 = int(TdvmcallStatus.INVALID_OPERAND)     # type: ignore[attr-defined]

    m = Machine(profile="linux-2022", host=FailingHost())
    cpu = PlainCpu(rax=0xFFFFFFFFFFFFFFFF, rdx=0x99)
    place(cpu, 0x1000, b"\xec")                     # IN AL, DX
    with pytest.raises(VeFault):
        execute_port_io(cpu, m)
    # ref 6.2: on failure the 2022 code clears GENMASK(8, 0); RIP does not move.
    assert cpu.regs["rax"] == 0xFFFFFFFFFFFFFE00
    assert cpu.regs["rip"] == 0x1000


# ---------------------------------------------------------------- other modes: direct
def test_real_mode_out_goes_straight_to_the_device() -> None:
    m = Machine()
    cpu = PlainCpu(mode=16, rax=0x11)
    place(cpu, 0x500, b"\xe6\x80")                  # OUT 0x80, AL
    ev = execute_port_io(cpu, m)
    assert not ev.via_ve and ev.exit_qual is None and ev.tdvmcalls == 0 and ev.ves == 0
    assert m.host.post.codes == [0x11]
    assert m.tdx.ve_injected == 0 and m.tdx.vmcalls == 0
    assert cpu.regs["rip"] == 0x502


def test_real_mode_in_merges_architecturally_and_ip_wraps() -> None:
    m = Machine(profile="linux-2022")               # the profile plays no part without #VE
    cpu = PlainCpu(mode=16, rax=0x0A)
    place(cpu, 0x10, b"\xe6\x70")
    execute_port_io(cpu, m)
    cpu.regs["rax"] = 0xFFFF0100
    cpu.regs["cs_base"] = 0x0
    cpu.mem[0xFFFF:0x10001] = b"\xec\x90"           # IN AL, DX at IP 0xFFFF
    cpu.regs.update(rip=0xFFFF, rdx=0x71)
    execute_port_io(cpu, m)
    assert cpu.regs["rax"] == 0xFFFF0126            # AL only
    assert cpu.regs["rip"] == 0x0000                # 16-bit IP wraps


def test_32bit_in_eax_zero_extends() -> None:
    m = Machine()
    cpu = PlainCpu(mode=32, rax=0xDEADBEEF80000000, rdx=0xCF8)
    place(cpu, 0x1000, b"\xef")
    execute_port_io(cpu, m)
    cpu.regs.update(rdx=0xCFC)
    place(cpu, 0x1001, b"\xed")
    execute_port_io(cpu, m)
    assert cpu.regs["rax"] == 0x12378086


def test_real_mode_rep_outsb_uses_segment_base_and_si() -> None:
    m = Machine()
    cpu = PlainCpu(mode=16, rsi=0xFFFE, rcx=0x10003, rdx=0x402, ds_base=0x20000, mem_size=0x40000)
    cpu.mem[0x2FFFE:0x30000] = b"ab"
    cpu.mem[0x20000:0x20001] = b"c"                 # SI wraps at 64 KiB
    place(cpu, 0x100, b"\xf3\x6e")
    ev = execute_port_io(cpu, m)
    assert m.host.debugcon.output == b"abc"
    assert ev.elements == 3 and not ev.via_ve
    assert cpu.regs["rsi"] == 0x0001 and cpu.regs["rcx"] == 0x10000   # CX only
    assert m.host.stats.direct[0x402].writes == 3


def test_direct_string_memory_fault_keeps_progress() -> None:
    m = Machine()
    cpu = PlainCpu(mode=32, rdi=0xFFFE, rcx=4, rdx=0x402, mem_size=0x10000)
    place(cpu, 0x100, b"\xf3\x6c")                  # REP INSB into the last 2 bytes, then past
    with pytest.raises(GuestMemoryFault) as ei:
        execute_port_io(cpu, m)
    assert (cpu.regs["rdi"], cpu.regs["rcx"], cpu.regs["rip"]) == (0x10000, 2, 0x100)
    assert ei.value.regs.rdi == 0x10000
    assert bytes(cpu.mem[0xFFFE:]) == b"\xe9\xe9"     # debugcon reads back 0xE9


def test_direct_needs_a_bus() -> None:
    class NoBus:
        def tdvmcall(self, regs: object) -> None: ...

    cpu = PlainCpu(mode=32)
    place(cpu, 0x100, b"\xee")
    with pytest.raises(EmbedError, match="no bus"):
        execute_port_io(cpu, Machine(host=NoBus()))


# ---------------------------------------------------------------- HLT
def test_halt_normal_path_is_a_tdvmcall() -> None:
    m = Machine()
    cpu = PlainCpu()
    place(cpu, 0x1000, b"\xf4")
    assert execute_halt(cpu, m) == 1
    assert cpu.regs["rip"] == 0x1001
    assert m.host.halt_count == 1


def test_halt_early_path_panics_at_the_hlt() -> None:
    # ref 1.7: the early handler handles exit reason 30 only.
    m = Machine(path="early")
    cpu = PlainCpu()
    place(cpu, 0x1000, b"\xf4")
    with pytest.raises(EarlyPanic, match="early exception 0x14"):
        execute_halt(cpu, m)
    assert cpu.regs["rip"] == 0x1000


def test_halt_outside_64bit_mode_is_not_a_ve() -> None:
    m = Machine()
    cpu = PlainCpu(mode=32)
    assert execute_halt(cpu, m) == 0
    assert m.tdx.ve_injected == 0 and cpu.writes == []


# ---------------------------------------------------------------- bad inputs
def test_bad_mode_cpl_and_values() -> None:
    m = Machine()
    with pytest.raises(UnsupportedModeError):
        execute_port_io(PlainCpu(mode=8), m)
    with pytest.raises(InvalidArgumentError):
        execute_port_io(PlainCpu(cpl=4), m)
    cpu = PlainCpu(rax=-1)
    place(cpu, 0, b"\xee")
    with pytest.raises(EmbedError, match="rax"):
        execute_port_io(cpu, m)


def test_not_port_io_and_unreadable_code() -> None:
    m = Machine()
    cpu = PlainCpu()
    place(cpu, 0x100, b"\x90")
    with pytest.raises(NotPortIoError):
        execute_port_io(cpu, m)
    cpu.regs["rip"] = 0x20000                       # outside memory
    with pytest.raises(EmbedError, match="cannot read"):
        execute_port_io(cpu, m)


def test_code_at_the_end_of_memory_is_read_partially() -> None:
    m = Machine()
    cpu = PlainCpu(rax=0x42, rdx=0x402, mem_size=0x1000)
    place(cpu, 0xFFF, b"\xee")
    execute_port_io(cpu, m)
    assert m.host.debugcon.output == b"B" and cpu.regs["rip"] == 0x1000


# ---------------------------------------------------------------- mode and CPL
CODE32 = 0x00CF9A000000FFFF      # D = 1
CODE16 = 0x00009A000000FFFF      # D = 0
CODE64 = 0x00AF9A000000FFFF      # L = 1
DATA = 0x00CF92000000FFFF        # not code
LMA = 1 << 10


@pytest.mark.parametrize("cr0, efer, rflags, desc, mode, label", [
    (0x10, 0, 0x2, None, 16, "real"),                       # CR0.PE = 0
    (0x11, 0, 0x2 | 1 << 17, CODE32, 16, "virtual-8086"),   # RFLAGS.VM
    (0x11, 0, 0x2, CODE16, 16, "protected-16"),
    (0x11, 0, 0x2, CODE32, 32, "protected-32"),
    (0x80000011, LMA, 0x2, CODE64, 64, "64-bit"),
    (0x80000011, LMA, 0x2, CODE32, 32, "compatibility-32"),
    (0x80000011, LMA, 0x2, CODE16, 16, "compatibility-16"),
    (0x11, 0, 0x2, CODE64, 16, "protected-16"),             # L counts only with EFER.LMA; D = 0
])
def test_cpu_mode_table(cr0: int, efer: int, rflags: int, desc: int | None, mode: int, label: str) -> None:
    # SDM Vol. 3A 5.2.1 / Vol. 1 3.6.1: PE, VM, LMA, CS.L and CS.D decide.
    assert cpu_mode(cr0=cr0, efer=efer, rflags=rflags, cs_descriptor=desc) == mode
    assert mode_label(cr0=cr0, efer=efer, rflags=rflags, cs_descriptor=desc) == label


def test_cpu_mode_falls_back_without_a_usable_descriptor() -> None:
    for desc in (None, DATA, CODE64 & ~(1 << 47)):   # missing, data segment, not present
        assert cpu_mode(cr0=0x11, efer=LMA, rflags=2, cs_descriptor=desc, fallback=64) == 64
        assert cpu_mode(cr0=0x11, efer=0, rflags=2, cs_descriptor=desc, fallback=32) == 32
    with pytest.raises(UnsupportedModeError):
        cpu_mode(cr0=0x11, efer=0, rflags=2, cs_descriptor=None, fallback=48)


def test_cpu_cpl() -> None:
    assert cpu_cpl(cr0=0, rflags=2, cs_selector=0x33) == 0          # real mode
    assert cpu_cpl(cr0=1, rflags=2 | 1 << 17, cs_selector=0) == 3   # virtual-8086
    assert cpu_cpl(cr0=1, rflags=2, cs_selector=0x33) == 3
    assert cpu_cpl(cr0=1, rflags=2, cs_selector=0x10) == 0


# ---------------------------------------------------------------- counters
def test_io_stats_accumulates_events() -> None:
    m = Machine(string_io="emulate")
    stats = IoStats()
    cpu = PlainCpu(rax=0x41, rdx=0x3F8)
    place(cpu, 0x1000, b"\xee")
    stats.add(execute_port_io(cpu, m))
    cpu.regs.update(rsi=0x3000, rcx=3, rdx=0x3F8)
    place(cpu, 0x1001, b"\xf3\x6e")
    stats.add(execute_port_io(cpu, m))
    cpu32 = PlainCpu(mode=32, rax=1)
    place(cpu32, 0x10, b"\xe6\x80")
    stats.add(execute_port_io(cpu32, m))
    stats.add_exit(12, 1)
    ports = stats.ports()
    assert ports[(0x3F8, False)] == (2, 4, 0)
    assert ports[(0x80, False)] == (0, 0, 1)
    assert stats.exits() == {12: (1, 1)}
    assert (stats.ves, stats.tdvmcalls, stats.direct) == (3, 5, 1)
    stats.reset()
    assert stats.ves == 0 and stats.ports() == {}
