"""tdxve.embed.unicorn: real x86 code under Unicorn through the TDX #VE path.

The demo guest (tdxve/guests/demo.S) and the string-I/O guest run end to
end; small hand-checked snippets (assembly in the comments, bytes from GNU
as) pin the corner cases: faults with a store right behind the IN, REP/DF/
address-size string I/O, the linux-2022 32-bit IN barrier, mode switches on
UC_MODE_64/32/16 instances, and attach/detach. References "ref N.M" are
sections of shared/reference/tdx-port-io.md; "anchors 2.1" is Unicorn.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

unicorn = pytest.importorskip("unicorn")
from unicorn import x86_const as X  # noqa: E402

from tdxve.abi import TdvmcallStatus  # noqa: E402
from tdxve.embed.unicorn import UnicornAttachment, attach, attachment_of, detach  # noqa: E402
from tdxve.errors import AttachError, DeviceError, EarlyPanic, VeFault  # noqa: E402
from tdxve.guests import DEMO, STRING_IO  # noqa: E402
from tdxve.host import Host  # noqa: E402
from tdxve.machine import Machine  # noqa: E402

BASE = 0x1000


def new_uc(code: bytes, mode: int = unicorn.UC_MODE_64) -> Any:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, mode)
    uc.mem_map(0, 0x200000)
    uc.mem_write(BASE, code)
    uc.mem_write(0x3000, b"ABCDE")
    uc.mem_write(0x3010, b"xyz")
    return uc


def run(code: bytes, machine: Machine, mode: int = unicorn.UC_MODE_64, *, path: str | None = None,
        count: int = 0, **regs: int) -> tuple[Any, UnicornAttachment, BaseException | None]:
    uc = new_uc(code, mode)
    for name, value in regs.items():
        uc.reg_write(getattr(X, f"UC_X86_REG_{name.upper()}"), value)
    att = attach(uc, machine, path=path)
    err: BaseException | None = None
    try:
        # `until` past the code: every snippet ends in HLT, which stops Unicorn
        # first; right behind a HLT the two stops are indistinguishable.
        uc.emu_start(BASE, BASE + len(code) + 0x10, count=count)
    except Exception as exc:        # noqa: BLE001 - returned for the test to inspect
        err = exc
    return uc, att, err


class FailingPortHost:
    """The standard PC, except that Instruction.IO on one port answers INVALID_OPERAND."""

    def __init__(self, port: int) -> None:
        self.inner = Host()
        self.bus = self.inner.bus
        self.port = port

    def tdvmcall(self, regs: Any) -> None:
        if regs.r11 == 30 and regs.r14 == self.port:
            regs.r10 = int(TdvmcallStatus.INVALID_OPERAND)
            return
        self.inner.tdvmcall(regs)


# ==========================================================================
# The demo guest, end to end
# ==========================================================================
def run_image(image: Any, **machine_kw: Any) -> tuple[Machine, UnicornAttachment, Any,
                                                       BaseException | None]:
    path = machine_kw.get("path", "normal")
    m = Machine(**machine_kw)
    uc = image.unicorn()
    att = attach(uc, m, path=path)
    err: BaseException | None = None
    try:
        uc.emu_start(image.entry, image.end)
    except Exception as exc:        # noqa: BLE001
        err = exc
    return m, att, uc, err


def expected_serial(rax: int) -> bytes:
    # demo.S: banner, then "CMOS status A = 0x" + 2 hex digits, then the PCI
    # line; early_serial_write turns every "\n" into "\r\n".
    return (b"tdxve demo guest: 16550 up (Linux earlyprintk init, 9600 8n1)\r\n"
            b"CMOS status A = 0x26\r\n"
            + f"PCI 00:00.0 dword 0 -> RAX = 0x{rax:016x}\r\n".encode())


@pytest.mark.parametrize("profile, rax, barriers", [
    ("linux-2022", 0xDEADBEEE12378086, 1),     # ref 6.3 live measurement
    ("linux", 0x0000000012378086, 0),          # ref 1.4 fixed code
    ("architectural", 0x0000000012378086, 0),
    ("linux-5.19-rc", 0xDEADBEEE12378086, 1),  # normal path: 2022 merge rule
])
def test_demo_guest_normal_path(profile: str, rax: int, barriers: int) -> None:
    m, att, uc, err = run_image(DEMO, profile=profile)
    assert err is None and att.halted
    serial = m.host.uart.output
    assert serial == expected_serial(rax)
    assert m.host.debugcon.output == b"tdxve demo guest: done, halting\n"
    assert m.host.post.codes == [0x01, 0x02, 0x03, 0x04, 0x10, 0x20, 0x30, 0x40]
    assert int.from_bytes(uc.mem_read(DEMO.address("pci_rax"), 8), "little") == rax
    assert uc.mem_read(DEMO.address("cmos_a"), 1) == b"\x26"   # status A default (issue 4)

    # Exact #VE counts, from the program: every character is one LSR poll
    # (THRE is set: the model transmits at once) and one THR write; the UART
    # init is 8 OUTs and 1 IN (LCR read); CMOS and PCI 2 each; 5 POST codes
    # and every debug-console byte in 64-bit mode; 3 POST codes before it.
    chars = len(serial)
    dbg = len(m.host.debugcon.output)
    ports = att.stats.ports()
    assert ports[(0x3F8, False)] == (chars + 1, chars + 1, 0)     # THR + DLL
    assert ports[(0x3FD, True)] == (chars, chars, 0)              # LSR polls
    assert ports[(0x402, False)] == (dbg, dbg, 0)
    assert ports[(0x80, False)] == (5, 5, 3)                      # 3 direct (real, pm16, pm32)
    assert ports[(0xCFC, True)] == (1, 1, 0) and ports[(0xCF8, False)] == (1, 1, 0)
    assert ports[(0x70, False)] == (1, 1, 0) and ports[(0x71, True)] == (1, 1, 0)
    io_ves = 9 + 2 * chars + 2 + 2 + 5 + dbg
    assert sum(c.ves for c in ports.values()) == io_ves == 318
    assert att.stats.exits() == {12: (1, 1)}                      # HLT -> TDG.VP.VMCALL<HLT>
    assert (att.stats.ves, att.stats.tdvmcalls, att.stats.direct) == (io_ves + 1, io_ves + 1, 3)
    assert m.tdx.ve_injected == io_ves + 1 and m.host.halt_count == 1
    assert att.modes == {"real": 1, "protected-16": 1, "protected-32": 1, "64-bit": io_ves}
    assert att.barriers == barriers
    assert att.registers()["rip"] == DEMO.address("halt") + 1


def test_demo_guest_early_path_ends_at_the_hlt() -> None:
    # ref 1.7: the early #VE handler handles port I/O only, so HLT panics.
    m, att, uc, err = run_image(DEMO, profile="linux", path="early")
    assert isinstance(err, EarlyPanic)
    halt = DEMO.address("halt")
    assert str(err).startswith(f"PANIC: early exception 0x14 IP 10:{halt:x} error 0 cr2 0x0")
    assert err.regs.rip == halt
    assert att.registers()["rip"] == halt            # Unicorn holds the state at the fault
    assert m.host.uart.output == expected_serial(0x12378086)
    assert att.stats.exits() == {12: (1, 0)} and m.host.halt_count == 0


def test_demo_guest_linux_5_19_rc_early_loops() -> None:
    # ref 1.1: the April-2022 early handler never advanced RIP.
    from tdxve.errors import VeLoopError

    m, att, uc, err = run_image(DEMO, profile="linux-5.19-rc", path="early")
    assert isinstance(err, VeLoopError)
    lm64 = DEMO.address("lm64")
    first_out = lm64 + 7                              # movl $STACK_TOP, %esp; movb $4, %al
    assert err.regs.rip == first_out == att.registers()["rip"]
    assert m.host.post.codes == [1, 2, 3, 4, 4, 4]    # 3 #VEs, each re-executing the OUT
    assert att.stats.ports()[(0x80, False)] == (3, 3, 3)


def test_registers_on_a_uc_mode_16_instance() -> None:
    # UC_MODE_16's reg_read refuses RAX..R15; the attachment still reads them.
    m, att, uc, err = run_image(DEMO, profile="linux-2022")
    regs = att.registers()
    assert regs["r8"] == 0xDEADBEEE12378086           # uart_hex keeps the printed value in R8
    assert set(regs) >= {"rax", "r15", "rip", "rflags", "fs_base", "gs_base"}


# ==========================================================================
# The failure-path guest
# ==========================================================================
def test_string_io_guest_rejected_on_the_early_path() -> None:
    m, att, uc, err = run_image(STRING_IO, string_io="reject", path="early")
    assert isinstance(err, EarlyPanic)
    rep = STRING_IO.address("done") - 6               # rep outsb (2); movb $0x51,%al (2); outb (2)
    assert str(err).split("\n")[0] == f"PANIC: early exception 0x14 IP 10:{rep:x} error 0 cr2 0x0"
    assert "string I/O" in str(err)
    r = att.registers()
    msg = STRING_IO.address("msg")
    length = STRING_IO.symbols["msg_end"] - STRING_IO.symbols["msg"]
    assert (r["rip"], r["rsi"], r["rcx"]) == (rep, msg, length)    # nothing executed
    assert m.host.uart.output == b""
    assert m.host.post.codes == [0x50]
    assert att.stats.ports()[(0x3F8, False)] == (1, 0, 0)          # one #VE, no TDVMCALL


def test_string_io_guest_rejected_on_the_normal_path() -> None:
    m, att, uc, err = run_image(STRING_IO, string_io="reject", path="normal")
    assert isinstance(err, VeFault) and "string I/O" in str(err)


def test_string_io_guest_emulated() -> None:
    m, att, uc, err = run_image(STRING_IO, string_io="emulate", path="early")
    assert err is None
    msg = uc.mem_read(STRING_IO.address("msg"), STRING_IO.symbols["msg_end"] - STRING_IO.symbols["msg"])
    assert m.host.uart.output == bytes(msg) == b"rep outsb: one instruction, one #VE, the whole line\r\n"
    assert m.host.post.codes == [0x50, 0x51]
    r = att.registers()
    assert (r["rip"], r["rsi"], r["rcx"]) == (STRING_IO.address("done"), STRING_IO.address("msg_end"), 0)
    assert att.stats.ports()[(0x3F8, False)] == (1, len(msg), 0)   # one #VE, one TDVMCALL per byte
    assert att.barriers == 0


# ==========================================================================
# Snippets (64-bit, loaded at 0x1000; 0x3000 holds "ABCDE", 0x3010 "xyz")
# ==========================================================================
# movw $0x99,%dx ; inb %dx,%al ; movb %al,(%rbx) ; incq %rcx ; hlt
IN_FAULT = bytes.fromhex("66ba9900ec880348ffc1f4")
# movl $0x80000000,%eax ; movw $0xcf8,%dx ; outl %eax,%dx ; movw $0xcfc,%dx ;
# movl $0x3000,%edi ; movl $3,%ecx ; cld ; rep insl (%dx),%es:(%rdi) ; hlt
REP_INSD = bytes.fromhex("b80000008066baf80cef66bafc0cbf00300000b903000000fcf36df4")
# movl $0x3004,%esi ; movl $5,%ecx ; movw $0x402,%dx ; std ; rep outsb ; cld ; hlt
STD_OUTSB = bytes.fromhex("be04300000b90500000066ba0204fdf36efcf4")
# movabsq $0xffff000000003000,%rsi ; movabsq $0x1234567800000003,%rcx ;
# movw $0x402,%dx ; cld ; addr32 rep outsb ; hlt
ADDR32_OUTSB = bytes.fromhex("48be003000000000ffff48b9030000007856341266ba0204fc67f36ef4")
# movl $0x3000,%esi ; movw $0x402,%dx ; cld ; outsw ; hlt
OUTSW = bytes.fromhex("be0030000066ba0204fc666ff4")
# movl $0x80000000,%eax ; movw $0xcf8,%dx ; outl %eax,%dx ;
# movabsq $0xdeadbeef00000000,%rax ; movw $0xcfc,%dx ; inl %dx,%eax ;
# movq %rax,(0x3000) ; movq %rax,%rbx ; hlt
IN32 = bytes.fromhex("b80000008066baf80cef48b800000000efbeadde66bafc0ced48890425003000004889c3f4")


@pytest.mark.parametrize("profile, rax", [
    ("linux", 0xFFFFFFFFFFFFFF00),        # insn_assign_reg(AL, 0) on failure (ref 1.4)
    ("linux-2022", 0xFFFFFFFFFFFFFE00),   # GENMASK(8, 0) cleared on failure (ref 6.2)
    ("architectural", 0xFFFFFFFFFFFFFFFF),
])
def test_failed_in_stops_before_the_store_behind_it(profile: str, rax: int) -> None:
    uc, att, err = run(IN_FAULT, Machine(profile=profile, host=FailingPortHost(0x99)),
                       rax=0xFFFFFFFFFFFFFFFF, rbx=0x3000)
    assert isinstance(err, VeFault) and err.regs.rip == BASE + 4
    r = att.registers()
    assert (r["rip"], r["rax"], r["rcx"]) == (BASE + 4, rax, 0)   # the IN, not past it
    assert uc.mem_read(0x3000, 1) == b"A"                         # movb %al,(%rbx) never ran
    assert att.barriers == 1
    assert all(p & unicorn.UC_PROT_WRITE for _b, _e, p in uc.mem_regions())   # restored


def test_rep_insd_one_ve_three_tdvmcalls() -> None:
    uc, att, err = run(REP_INSD, Machine(string_io="emulate"))
    assert err is None
    assert uc.mem_read(0x3000, 12) == (0x12378086).to_bytes(4, "little") * 3
    r = att.registers()
    assert (r["rdi"], r["rcx"]) == (0x300C, 0)
    assert att.stats.ports()[(0xCFC, True)] == (1, 3, 0)
    assert att.barriers == 0


def test_rep_outsb_with_df_set_runs_backwards() -> None:
    m = Machine(string_io="emulate")
    uc, att, err = run(STD_OUTSB, m)
    assert err is None and m.host.debugcon.output == b"EDCBA"
    r = att.registers()
    assert (r["rsi"], r["rcx"], r["rip"]) == (0x2FFF, 0, BASE + len(STD_OUTSB))


def test_rep_outsb_with_32bit_address_size() -> None:
    # 67 prefix in 64-bit mode: ESI/ECX are used and written zero-extended (ref 3.4).
    m = Machine(string_io="emulate")
    uc, att, err = run(ADDR32_OUTSB, m)
    assert err is None and m.host.debugcon.output == b"ABC"
    r = att.registers()
    assert (r["rsi"], r["rcx"]) == (0x3003, 0)


def test_outsw_without_rep() -> None:
    m = Machine(string_io="emulate")
    uc, att, err = run(OUTSW, m)
    assert err is None
    assert att.registers()["rsi"] == 0x3002
    assert att.stats.ports()[(0x402, False)] == (1, 1, 0)       # one 2-byte TDVMCALL
    # debugcon takes bytes: the bus splits the word (issue 4), 0x403 is unassigned
    assert m.host.debugcon.output == b"A"


@pytest.mark.parametrize("profile, rax, barriers", [
    ("linux-2022", 0xDEADBEEE12378086, 1),
    ("linux", 0x12378086, 0),
])
def test_in_eax_result_reaches_the_code_behind_it(profile: str, rax: int, barriers: int) -> None:
    # Unicorn zero-extends EAX itself; the 2022 profile's RAX needs the barrier,
    # and the store and move right behind the IN must see the handler's value.
    uc, att, err = run(IN32, Machine(profile=profile))
    assert err is None
    assert int.from_bytes(uc.mem_read(0x3000, 8), "little") == rax
    r = att.registers()
    assert r["rax"] == r["rbx"] == rax and r["rip"] == BASE + len(IN32)
    assert att.barriers == barriers


def test_barrier_resumes_under_a_timeout() -> None:
    uc = new_uc(IN32)
    att = attach(uc, Machine(profile="linux-2022"))
    uc.emu_start(BASE, BASE + len(IN32) + 0x10, timeout=5_000_000)   # microseconds
    r = att.registers()
    assert r["rbx"] == 0xDEADBEEE12378086 and att.barriers == 1 and att.halted


def test_barrier_with_an_instruction_count_stops_after_the_in() -> None:
    uc, att, err = run(IN32, Machine(profile="linux-2022"), count=100)
    assert err is None
    r = att.registers()
    in_end = BASE + 0x19
    assert (r["rip"], r["rax"], r["rbx"]) == (in_end, 0xDEADBEEE12378086, 0)


def test_device_error_is_raised_with_the_cpu_at_the_instruction() -> None:
    class Broken:
        def read(self, port: int, size: int) -> int:
            raise RuntimeError("device bug")

        def write(self, port: int, size: int, value: int) -> None:
            raise RuntimeError("device bug")

    m = Machine()
    m.host.bus.register(0x99, 1, Broken())
    uc, att, err = run(IN_FAULT, m, rbx=0x3000)
    assert isinstance(err, DeviceError)
    assert att.registers()["rip"] == BASE + 4 and uc.mem_read(0x3000, 1) == b"A"


def test_ins_rejected_keeps_unicorns_restartability_store() -> None:
    # Documented deviation (docs/embedding.md): Unicorn stores 0 at ES:[RDI]
    # before it calls the IN hook of an INS element (QEMU gen_ins), so a
    # rejected INS leaves that element zeroed although a TD exits first.
    uc, att, err = run(REP_INSD, Machine(string_io="reject"))
    assert isinstance(err, VeFault)
    r = att.registers()
    assert (r["rdi"], r["rcx"]) == (0x3000, 3)
    assert uc.mem_read(0x3000, 8) == b"\x00\x00\x00\x00E\x00\x00\x00"


# ==========================================================================
# Modes
# ==========================================================================
# UC_MODE_64, no GDT of its own (Unicorn's synthetic long mode), then its own GDT:
#   lgdt gdtd(%rip) ; movb $0x61,%al ; outb %al,$0x80   -> 64-bit (fallback)
#   ljmpl *farp(%rip)                                   -> 0x08: 32-bit code, L = 0
#   movb $0x62,%al ; outb %al,$0x80                     -> compatibility mode: direct
#   ljmp $0x10,$back64                                  -> 0x10: 64-bit code, L = 1
#   movb $0x63,%al ; outb %al,$0x80 ; hlt               -> 64-bit from the GDT descriptor
COMPAT = bytes.fromhex(
    "0f011539000000b061e680ff2d39000000b062e680ea1c1000001000b063e680f40f1f80000000000000000000"
    "000000ffff0000009acf00ffff0000009aaf0017002810000000000000111000000800")
# UC_MODE_32: movb $0x0a,%al ; outb %al,$0x70 ; inb $0x71,%al ; movb %al,(0x3000) ;
# movl $0x3010,%esi ; movl $3,%ecx ; movw $0x402,%dx ; cld ; rep outsb ; hlt
PM32 = bytes.fromhex("b00ae670e471a200300000be10300000b90300000066ba0204fcf36ef4")
# UC_MODE_16 real mode: xorw %ax,%ax ; movw %ax,%ds ; movw $0x3000,%si ; movw $3,%cx ;
# movw $0x402,%dx ; cld ; rep outsb ; movw $0x71,%dx ; movb $0x0a,%al ; outb %al,$0x70 ;
# movw $0x0100,%ax ; inb %dx,%al ; hlt
REAL = bytes.fromhex("31c08ed8be0030b90300ba0204fcf36eba7100b00ae670b80001ecf4")


def test_compatibility_mode_inside_a_uc_mode_64_instance() -> None:
    m = Machine()
    uc, att, err = run(COMPAT, m)
    assert err is None and att.halted
    assert m.host.post.codes == [0x61, 0x62, 0x63]
    assert att.modes == {"64-bit": 2, "compatibility-32": 1}
    assert att.stats.ports()[(0x80, False)] == (2, 2, 1)
    assert att.stats.exits() == {12: (1, 1)}


def test_32bit_protected_mode_is_all_direct() -> None:
    m = Machine(string_io="reject")            # no #VE, so the policy plays no part
    uc, att, err = run(PM32, m, unicorn.UC_MODE_32)
    assert err is None
    assert uc.mem_read(0x3000, 1) == b"\x26" and m.host.debugcon.output == b"xyz"
    assert att.modes == {"protected-32": 5}
    assert (att.stats.ves, att.stats.direct) == (0, 5)            # every element counted
    assert m.tdx.ve_injected == 0
    assert att.halted and att.stats.exits() == {}                 # a firmware HLT is no #VE


def test_real_mode_is_all_direct() -> None:
    m = Machine()
    uc, att, err = run(REAL, m, unicorn.UC_MODE_16)
    assert err is None and m.host.debugcon.output == b"ABC"
    assert uc.reg_read(X.UC_X86_REG_AX) == 0x0126                 # AL from CMOS, AH kept
    assert att.modes == {"real": 5} and att.stats.ves == 0


# ==========================================================================
# attach / detach
# ==========================================================================
def test_attach_refuses_an_existing_in_hook() -> None:
    # anchors 2.1: only the first IN hook is called.
    uc = new_uc(b"\xec\xf4")
    uc.hook_add(unicorn.UC_HOOK_INSN, lambda *a: 0, None, 1, 0, X.UC_X86_INS_IN)
    with pytest.raises(AttachError, match="first IN hook"):
        attach(uc, Machine())


def test_attach_argument_errors() -> None:
    uc = new_uc(b"\xf4")
    with pytest.raises(AttachError):
        attach(object(), Machine())
    with pytest.raises(AttachError):
        attach(unicorn.Uc(unicorn.UC_ARCH_ARM, unicorn.UC_MODE_ARM), Machine())
    with pytest.raises(AttachError, match="execute"):
        attach(uc, object())
    with pytest.raises(AttachError, match="path"):
        attach(uc, Machine(), path="late")
    m = Machine()
    att = attach(uc, m)
    with pytest.raises(AttachError, match="already attached"):
        attach(uc, Machine())
    with pytest.raises(AttachError, match="another Unicorn instance"):
        attach(new_uc(b"\xf4"), m)
    att.detach()
    with pytest.raises(AttachError, match="not attached"):
        detach(uc)
    assert isinstance(AttachError("x"), ValueError)


def test_detach_restores_the_unicorn_instance() -> None:
    m = Machine(path="early")
    own_memory = m.guest.memory
    code = bytes.fromhex("66baf803ecf4")            # movw $0x3f8,%dx ; inb %dx,%al ; hlt
    uc = new_uc(code)
    with attach(uc, m, path="normal") as att:
        assert attachment_of(uc) is att and m.path == "normal"
        assert "emu_start" in vars(uc) and m.guest.memory is not own_memory
        uc.reg_write(X.UC_X86_REG_RAX, 0x1100)
        uc.emu_start(BASE, BASE + 0x100)
        assert uc.reg_read(X.UC_X86_REG_RAX) == 0x1100    # UART RBR: empty -> 0
        assert att.stats.ves == 2                          # IN and HLT
    assert not att.attached and attachment_of(uc) is None
    assert "emu_start" not in vars(uc) and "emu_stop" not in vars(uc)
    assert m.path == "early" and m.guest.memory is own_memory
    att.detach()                                          # idempotent
    with pytest.raises(AttachError, match="detached"):
        att.registers()
    uc.reg_write(X.UC_X86_REG_RAX, 0x11FF)
    uc.emu_start(BASE, BASE + 0x100)
    assert uc.reg_read(X.UC_X86_REG_RAX) == 0x1100         # Unicorn alone: IN reads 0
    assert att.stats.ves == 2


def test_importing_tdxve_does_not_import_unicorn(run_python: Any) -> None:
    code = ("import sys, tdxve, tdxve.embed, tdxve.guests, tdxve.demo;"
            "assert 'unicorn' not in sys.modules, sorted(m for m in sys.modules if 'unicorn' in m);"
            "import tdxve.embed as e; assert callable(e.unicorn.attach);"
            "assert 'unicorn' not in sys.modules  # imported on the first attach")
    run_python("-c", code)
