"""Every kind of bad input and what tdxve does with it: one test per row of docs/bad-input.md
(issue 7). References "ref N.M" are sections of shared/reference/tdx-port-io.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tdxve import invariants as inv
from tdxve.abi import INSN_DTYPE, IoInsn, IoKind
from tdxve.errors import (
    DeviceError,
    DoubleFault,
    EarlyPanic,
    ExitQualError,
    GuestMemoryFault,
    GuestPanic,
    InstructionTooLongError,
    InvalidArgumentError,
    LockPrefixError,
    NotPortIoError,
    RegisterValueError,
    StringIoLimitError,
    TdxveError,
    TruncatedInputError,
    UnsupportedExitError,
    UnsupportedModeError,
    VeFault,
    VeLoopError,
)
from tdxve.guest import ArrayMemory
from tdxve.host import FaultPlan, FaultyHost, Host
from tdxve.machine import Machine
from tdxve.regs import Regs
from tdxve.stream import decode_stream

RIP = 0xFFFFFFFF81000000
U64 = 2**64 - 1
INVALID_OPERAND = 0x8000000000000000
DOCS = Path(__file__).resolve().parent.parent / "docs" / "bad-input.md"


def checked(**kw: Any) -> inv.ExecuteChecker:
    """A Machine whose every call is checked against tdxve.invariants."""
    exclude = kw.pop("exclude_devices", ())
    kw.setdefault("host", Host())
    return inv.ExecuteChecker(Machine(**kw), exclude_devices=exclude)


def no_exit(ck: inv.ExecuteChecker, code: bytes, exc: type[Exception], mode: int = 64) -> None:
    """The instruction never reaches a VM exit: exception, nothing changed, no #VE, no TDVMCALL."""
    regs = Regs(mode=mode, rax=0x1234, rdx=0x3F8, rip=RIP)
    before = regs.copy()
    with pytest.raises(exc):
        ck.execute(regs, code)
    assert regs == before and not ck.recorder.calls and ck.machine.tdx.ve_injected == 0


# ---------------------------------------------------------------- instruction bytes
@pytest.mark.parametrize("code", [b"", b"\x66", b"\xf3\x67", b"\xe4", b"\x66\xe5", b"\x2e" * 14])
def test_truncated_instruction(core: Any, code: bytes) -> None:
    with pytest.raises(TruncatedInputError) as ei:
        core.decode_insn(code)
    assert ei.value.offset == 0
    no_exit(checked(), code, TruncatedInputError)


def test_lock_prefix_is_ud(core: Any) -> None:
    """Ref 3.4: LOCK on IN/OUT/INS/OUTS is #UD before any VM exit."""
    with pytest.raises(LockPrefixError, match="F0"):
        core.decode_insn(b"\xf0\xec")
    no_exit(checked(), b"\x66\xf0\xed", LockPrefixError)


@pytest.mark.parametrize("code", [b"\x66" * 15 + b"\xec", b"\x66" * 16, b"\x2e" * 14 + b"\xe4"])
def test_more_than_15_bytes_is_gp(core: Any, code: bytes) -> None:
    """Ref 3.4: an instruction longer than 15 bytes is #GP(0), even when the input is also short."""
    with pytest.raises(InstructionTooLongError):
        core.decode_insn(code)
    no_exit(checked(), code, InstructionTooLongError)


@pytest.mark.parametrize("code,byte", [(b"\x90", "0x90"), (b"\x0f\x0b", "0x0f"), (b"\x66\xcc", "0xcc"),
                                       (b"\xf4", "0xf4")])
def test_non_io_opcode(core: Any, code: bytes, byte: str) -> None:
    with pytest.raises(NotPortIoError, match=byte):
        core.decode_insn(code)
    no_exit(checked(), code, NotPortIoError)


def test_rex_outside_64_bit_mode_is_inc_dec(core: Any) -> None:
    """Wrong mode for the bytes: 48 ED is REX.W IN in 64-bit mode, DEC EAX + IN elsewhere."""
    assert core.decode_insn(b"\x48\xed", 64).length == 2
    with pytest.raises(NotPortIoError, match="REX exists only in 64-bit mode"):
        core.decode_insn(b"\x48\xed", 32)
    no_exit(checked(), b"\x48\xed", NotPortIoError, mode=16)


@pytest.mark.parametrize("mode", [0, 8, 63, 128, "64", 64.0, True, None])
def test_unsupported_mode(core: Any, mode: Any) -> None:
    with pytest.raises(UnsupportedModeError):
        core.decode_insn(b"\xec", mode)
    with pytest.raises(UnsupportedModeError):
        core.decode_insns(b"\xec", mode)
    with pytest.raises(UnsupportedModeError):
        Regs(mode=mode)


@pytest.mark.parametrize("code", [[0xEC], "ec", 0xEC, np.array([0xEC], dtype=np.uint16), None])
def test_code_that_is_not_a_byte_buffer(core: Any, code: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        core.decode_insn(code)
    with pytest.raises(InvalidArgumentError):
        checked().execute(Regs(), code)


def test_bad_instruction_inside_a_stream(core: Any) -> None:
    buf = b"\xec\xee\x66\xed\x90\xec"
    with pytest.raises(NotPortIoError) as ei:
        core.decode_insns(buf)
    assert ei.value.offset == 4
    assert core.decode_insns(buf, on_error="stop").shape == (3,)
    with pytest.raises(InvalidArgumentError, match="on_error"):
        core.decode_insns(buf, on_error="skip")


# ---------------------------------------------------------------- exit qualifications
@pytest.mark.parametrize("qual", [0x3F80008 | 1 << 7, 0x3F80008 | 1 << 15, 0x3F80008 | 1 << 32,
                                  0x3F80008 | 1 << 63])
def test_reserved_exit_qualification_bits(core: Any, qual: int) -> None:
    """SDM Table 27-5 (ref 3.1): strict decode rejects reserved bits; Linux ignores them
    (ref 1.3: it works on the low 32 bits, and ignores 15:7), so the guest still does the IN."""
    with pytest.raises(ExitQualError, match="reserved") as ei:
        core.decode_exit_qual(qual)
    assert ei.value.value == qual
    assert core.decode_exit_qual(qual, strict=False).port == 0x3F8
    assert not core.decode_exit_quals([qual])["valid"][0]
    ck = checked()
    regs = Regs(rip=RIP)
    ck.execute_exit(regs, 30, exit_qual=qual, instr_len=1)
    assert regs.rip == RIP + 1 and ck.recorder.calls[0].image[14] == 0x3F8


@pytest.mark.parametrize("enc,size", [(2, 3), (4, 5), (5, 6), (6, 7), (7, 8)])
@pytest.mark.parametrize("profile", ["linux", "linux-2022", "architectural"])
def test_impossible_size_encoding(core: Any, enc: int, size: int, profile: str) -> None:
    """Ref 1.3, 4.1: Linux passes size = bits 2:0 + 1 unvalidated; KVM rejects sizes other than
    1/2/4 with INVALID_OPERAND, so the guest faults; RAX follows the profile's rule."""
    with pytest.raises(ExitQualError, match="size encoding"):
        core.decode_exit_qual(0x3F80008 | enc)
    ck = checked(profile=profile)
    regs = Regs(rax=0x1122334455667788, rip=RIP)
    with pytest.raises(VeFault) as ei:
        ck.execute_exit(regs, 30, exit_qual=0x3F80008 | enc, instr_len=1)
    assert ei.value.reason == "io-failed" and regs.rip == RIP
    assert ck.recorder.calls[0].image[12] == size and ck.recorder.calls[0].reply[10] == INVALID_OPERAND


@pytest.mark.parametrize("qual,what", [(0x3F80058, "immediate-port bit 6 set on a string"),
                                       (0x1000048, "does not fit an imm8")])
def test_immediate_bit_on_string_or_wide_port(core: Any, qual: int, what: str) -> None:
    with pytest.raises(ExitQualError, match=what):
        core.decode_exit_qual(qual)
    with pytest.raises(ExitQualError):
        core.encode_exit_qual(size=1, is_in=True, port=0x100, is_imm=True)


@pytest.mark.parametrize("q,exc", [(-1, ExitQualError), (2**64, ExitQualError), (1.0, InvalidArgumentError),
                                   ("8", InvalidArgumentError), (True, InvalidArgumentError)])
def test_exit_qualification_not_a_64_bit_int(core: Any, q: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        core.decode_exit_qual(q)
    if q is not True:      # a list goes through numpy's integer conversion: True there is 1
        with pytest.raises(InvalidArgumentError):
            core.decode_exit_quals([0, q])
    with pytest.raises(InvalidArgumentError):
        core.decode_exit_quals(np.array([0, q] if q is not True else [False, True]))
    with pytest.raises(InvalidArgumentError):
        checked().execute_exit(Regs(), 30, exit_qual=q, instr_len=1)


def test_inconsistent_instruction_records(core: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="size"):
        core.exit_info(IoInsn(IoKind.IN, 3, None, False, 64, None, 1, 0))
    with pytest.raises(InvalidArgumentError, match="port"):
        core.exit_info(IoInsn(IoKind.INS, 1, 0x80, False, 64, 0, 2, 0))    # type: ignore[arg-type]
    recs = core.decode_insns(b"\xec\xee\xed")
    recs[1]["length"] = 16
    with pytest.raises(InvalidArgumentError, match=r"insns\[1\]"):
        core.exit_infos(recs)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        core.exit_infos(np.zeros(2, dtype=np.uint8))
    with pytest.raises(InvalidArgumentError):
        core.exit_info(core.decode_insn(b"\xec"), -1)


# ---------------------------------------------------------------- registers
@pytest.mark.parametrize("value", [-1, 2**64, True, 1.0, "0", None])
def test_out_of_range_register_values(value: Any) -> None:
    regs = Regs(rax=5)
    for name in ("rax", "rdx", "rip", "rflags", "fs_base"):
        with pytest.raises(RegisterValueError):
            setattr(regs, name, value)
    with pytest.raises(RegisterValueError):
        regs.update(rax=1, rbx=value)
    assert regs.rax == 5 and regs.rbx == 0
    with pytest.raises(InvalidArgumentError):
        checked().execute("regs", b"\xec")  # type: ignore[arg-type]


def test_port_bits_above_15_in_dx_are_ignored() -> None:
    """SDM: the DX forms use DX = RDX[15:0]; the qualification carries 16 bits (ref 3.1)."""
    ck = checked()
    regs = Regs(rdx=0xFFFFFFFF_FFFF0080, rax=0x42, rip=RIP)
    out = ck.execute(regs, b"\xee")
    assert (out.exit_qual >> 16) == 0x80 and ck.machine.host.post.codes == [0x42]  # type: ignore[attr-defined]


def test_rip_at_the_top_wraps() -> None:
    regs = Regs(rdx=0x80, rip=U64)
    checked().execute(regs, b"\x66\xef")
    assert regs.rip == 1


# ---------------------------------------------------------------- what the host replies
@pytest.mark.parametrize("profile", ["linux", "architectural", "linux-2022"])
@pytest.mark.parametrize("size,code", [(1, b"\xec"), (2, b"\x66\xed"), (4, b"\xed")])
def test_host_reply_with_garbage_above_the_width(profile: str, size: int, code: bytes) -> None:
    """Ref 1.4: linux/architectural mask R11 to the access width; linux-2022 takes exactly one
    more bit (8*size) -- reproduced bit for bit, checked by ExecuteChecker."""
    class Garbage(Host):
        def tdvmcall(self, regs: Regs) -> None:
            super().tdvmcall(regs)
            regs.r11 |= U64 << (8 * size) & U64
    ck = checked(profile=profile, host=Garbage())
    regs = Regs(rax=0, rdx=0x3FF, rip=RIP)
    ck.execute(regs, code)
    width = (1 << (8 * size)) - 1
    assert regs.rax >> (8 * size) == (1 if profile == "linux-2022" else 0)
    assert regs.rax & width == 0 if size == 1 else True


def test_host_garbage_in_every_register() -> None:
    """Ref 2.4: the TDX module copies back only the selected GPRs; garbage in RAX/RCX/RSP/RBP
    of the reply never reaches the guest, nor anything into a non-IN register."""
    host = FaultyHost(FaultPlan(seed=3, at={0: "clobber", 1: "clobber"}))
    ck = checked(host=host)
    regs = Regs(rax=0xAA, rbx=1, rcx=2, rsp=3, rbp=4, rdx=0x80, rip=RIP)
    before = regs.copy()
    ck.execute(regs, b"\xee")
    ck.execute(regs, b"\xe4\x71")
    assert regs.diff(before).keys() <= {"rax", "rip"} and host.faults[0].clobbered


@pytest.mark.parametrize("status", [1, INVALID_OPERAND, 0x8000000000000002, 0x8000000000000003, 7, U64])
@pytest.mark.parametrize("path", ["normal", "early"])
def test_host_error_status(status: int, path: str) -> None:
    """Ref 1.6, 1.7: any non-zero R10 fails the access: VeFault (normal path) or EarlyPanic;
    RIP unchanged; under linux a failed IN writes 0 into AL (insn_assign_reg, ref 1.4)."""
    class Refusing(Host):
        def tdvmcall(self, regs: Regs) -> None:
            super().tdvmcall(regs)
            regs.r10 = status
    ck = checked(host=Refusing(), path=path)
    regs = Regs(rax=0x1234, rdx=0x3FD, rip=RIP)
    with pytest.raises(VeFault if path == "normal" else EarlyPanic) as ei:
        ck.execute(regs, b"\xec")
    assert regs.rip == RIP and regs.rax == 0x1200 and "io-failed" in ei.value.reason


def test_host_claims_success_with_garbage_r11_on_out() -> None:
    class Noisy(Host):
        def tdvmcall(self, regs: Regs) -> None:
            super().tdvmcall(regs)
            regs.r11 = U64
    regs = Regs(rax=0x41, rdx=0x3F8, rip=RIP)
    checked(host=Noisy()).execute(regs, b"\xee")
    assert regs.rax == 0x41


# ---------------------------------------------------------------- devices
class Broken:
    def __init__(self, how: str) -> None:
        self.how = how

    def read(self, port: int, size: int) -> Any:
        if self.how == "raise":
            raise RuntimeError("device bug")
        return {"non-int": "x", "huge": 1 << 100 | 0xAB, "negative": -2}[self.how]

    def write(self, port: int, size: int, value: int) -> None:
        if self.how == "raise":
            raise RuntimeError("device bug")


@pytest.mark.parametrize("policy", ["raise", "record"])
def test_device_that_raises(policy: str) -> None:
    """docs/host.md 4: the guest gets INVALID_OPERAND; policy 'raise' then raises DeviceError
    (registers untouched, the #VE consumed), 'record' lets the guest fault (VeFault)."""
    host = Host(on_device_error=policy)
    host.bus.register(0x500, 4, Broken("raise"), name="broken")
    ck = checked(host=host, exclude_devices=("broken",))
    regs = Regs(rax=0x77, rdx=0x500, rip=RIP)
    before = regs.copy()
    with pytest.raises(DeviceError if policy == "raise" else VeFault) as ei:
        ck.execute(regs, b"\xec")
    if policy == "raise":
        assert isinstance(ei.value.__cause__, RuntimeError) and regs == before
    assert regs.rip == RIP and not ck.machine.tdx.ve_pending and len(host.device_errors) == 1


@pytest.mark.parametrize("how,rax", [("non-int", None), ("huge", 0xAB), ("negative", 0xFE)])
def test_device_returning_a_bad_value(how: str, rax: int | None) -> None:
    """A non-int read is a device error; ints are masked to the access width (KVM/QEMU copy
    `size` bytes)."""
    host = Host(on_device_error="record")
    host.bus.register(0x500, 4, Broken(how), name="broken")
    ck = checked(host=host, exclude_devices=("broken",))
    regs = Regs(rdx=0x500, rip=RIP)
    if rax is None:
        with pytest.raises(VeFault):
            ck.execute(regs, b"\xec")
    else:
        ck.execute(regs, b"\xec")
        assert regs.rax == rax


# ---------------------------------------------------------------- the #VE itself
def test_second_ve_before_veinfo_get_is_double_fault() -> None:
    """Ref 2.2: while VALID is set, the TDX module turns the next #VE into #DF; the stored
    information stays; nothing reaches the host."""
    ck = checked()
    regs = Regs(rdx=0x80, rip=RIP)
    info = ck.machine.tdx.inject_io_ve(regs, b"\xec")
    before = regs.copy()
    with pytest.raises(DoubleFault) as ei:
        ck.execute(regs, b"\xee")
    assert ei.value.vector == 8 and regs == before and ck.machine.tdx.ve_info == info
    assert not ck.recorder.calls


def test_veinfo_get_without_valid_info_panics() -> None:
    """Ref 1.2: tdx_get_ve_info panics on a non-zero TDCALL status (TDX_NO_VALID_VE_INFO)."""
    m = Machine(host=Host())
    with pytest.raises(GuestPanic, match="TDCALL 3 failed"):
        m.guest.get_ve_info()


def test_handler_that_never_advances_rip_is_a_ve_loop() -> None:
    """Ref 1.1: the April-2022 early handler (linux-5.19-rc) re-executes the IN forever."""
    ck = checked(profile="linux-5.19-rc", path="early")
    regs = Regs(rdx=0x80, rip=RIP)
    with pytest.raises(VeLoopError):
        ck.execute(regs, b"\xec")
    assert regs.rip == RIP and len(ck.recorder.calls) == ck.machine.ve_loop_limit


def test_port_io_from_user_mode() -> None:
    """Ref 1.6: virt_exception_user handles no port I/O: SIGSEGV."""
    ck = checked()
    regs = Regs(cpl=3, rdx=0x80, rip=0x401000)
    with pytest.raises(VeFault) as ei:
        ck.execute(regs, b"\xee")
    assert ei.value.reason == "user-io" and not ck.recorder.calls


@pytest.mark.parametrize("reason,exc", [(77, VeFault), (0xFFFFFFFF, VeFault), (48, UnsupportedExitError)])
def test_unhandled_or_unmodelled_exit_reason(reason: int, exc: type[Exception]) -> None:
    m = Machine(host=Host())
    with pytest.raises(exc):
        m.execute_exit(Regs(rip=RIP), reason, instr_len=1)
    m.path = "early"
    with pytest.raises(EarlyPanic, match="PANIC: early exception 0x14"):
        m.execute_exit(Regs(rip=RIP), 10, instr_len=2)
    with pytest.raises(InvalidArgumentError, match="exit_reason"):
        m.execute_exit(Regs(), 2**32, instr_len=1)


# ---------------------------------------------------------------- string I/O
def test_string_io_rejected_like_linux() -> None:
    ck = checked()
    regs = Regs(rdx=0x3F8, rsi=0, rcx=3, rip=RIP)
    with pytest.raises(VeFault) as ei:
        ck.execute(regs, b"\xf3\x6e")
    assert ei.value.reason == "string-io" and not ck.recorder.calls


def test_string_io_with_an_enormous_rcx() -> None:
    """docs/ve-model.md: max_rep (default 2**20) refuses it before any element moves; with
    max_rep=None the elements run until guest memory ends."""
    ck = checked(string_io="emulate")
    regs = Regs(rdx=0x80, rsi=0, rcx=U64, rip=RIP)
    before = regs.copy()
    with pytest.raises(StringIoLimitError):
        ck.execute(regs, b"\xf3\x6e")
    assert regs == before and not ck.recorder.calls
    ck = checked(string_io="emulate", max_rep=None, memory=ArrayMemory(16))
    with pytest.raises(GuestMemoryFault):
        ck.execute(regs, b"\xf3\x6e")
    assert len(ck.recorder.calls) == 16 and regs.rsi == 16 and regs.rcx == U64 - 16


def test_guest_memory_out_of_bounds() -> None:
    """INS checks its destination before the port read: no device data is consumed; the fault
    leaves RDI/RCX at the completed elements and RIP in place."""
    ck = checked(string_io="emulate", memory=ArrayMemory(4, base=0x1000))
    regs = Regs(rdx=0x3FD, rdi=0x1002, rcx=5, rip=RIP)
    with pytest.raises(GuestMemoryFault) as ei:
        ck.execute(regs, b"\xf3\x6c")
    assert ei.value.vector == 14 and regs.rdi == 0x1004 and regs.rcx == 3 and regs.rip == RIP
    assert len(ck.recorder.calls) == 2


@pytest.mark.parametrize("info", [3 << 7, 7 << 7, 6 << 15 | 1 << 7])
def test_string_io_with_impossible_instruction_information(info: int) -> None:
    ck = checked(string_io="emulate")
    regs = Regs(rdx=0x80, rsi=0, rip=RIP)
    with pytest.raises(VeFault) as ei:
        ck.execute_exit(regs, 30, exit_qual=0x800010, instr_len=1, instr_info=info)
    assert ei.value.reason == "bad-instr-info"


# ---------------------------------------------------------------- size
def test_huge_input_is_decoded_in_chunks() -> None:
    """tdxve.stream: the records of any cut equal one decode_insns; memory per chunk (the 10**8
    byte run is tests/test_resources.py::test_hundred_million_bytes_in_bounded_memory)."""
    data = b"\xec\x66\xed\xe4\x80" * 1000 + b"\x66"
    with pytest.raises(TruncatedInputError) as ei:
        list(decode_stream([data[i:i + 333] for i in range(0, len(data), 333)]))
    assert ei.value.offset == 5000


# ---------------------------------------------------------------- the table itself
def test_every_row_of_docs_bad_input_points_at_a_real_test() -> None:
    text = DOCS.read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(refs) >= 25
    root = DOCS.parent.parent
    for path, name in refs:
        src = (root / path).read_text()
        assert re.search(rf"^def {name}\(", src, re.M), f"{path}::{name} does not exist"
