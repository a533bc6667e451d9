"""TdxModule: VE info, #DF on nesting, TDCALL leaves 3 and 0 (ref 2.1-2.4, 7.2-7.3)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxve.abi import IoInsn, IoKind, Segment
from tdxve.errors import (
    DecodeError,
    DoubleFault,
    GeneralProtectionFault,
    GuestFault,
    InvalidArgumentError,
    UnsupportedExitError,
)
from tdxve.regs import GPR_NAMES, Regs
from tdxve.tdx import TdxModule, VeInfo


import ve_helpers as H  # noqa: E402  (tests/ is on pythonpath)

NO_VALID_VE_INFO = 0xC000070400000000       # ref 2.3, 2.7
OPERAND_INVALID_RAX = 0xC000010000000000    # ref 2.1, 2.7
OPERAND_INVALID_RCX = 0xC000010000000001    # ref 2.4


class Recorder:
    """Host that records the image it is shown and then overwrites every GPR."""

    def __init__(self, fill: int = 0x5A5A5A5A5A5A5A5A) -> None:
        self.seen: list[Regs] = []
        self.fill = fill

    def tdvmcall(self, regs: Regs) -> None:
        self.seen.append(regs.copy())
        for n in range(16):
            regs.set_gpr(n, (self.fill + n) & (2**64 - 1))


def distinct_regs(**kw: int) -> Regs:
    r = Regs(rip=0xFFFFFFFF81001000, **kw)
    for n in range(16):
        if GPR_NAMES[n] not in kw:
            r.set_gpr(n, 0x1111111111111111 * ((n % 15) + 1))
    return r


@pytest.fixture
def tdx() -> TdxModule:
    return TdxModule(Recorder())


# ---------------------------------------------------------------- VE info and #VE injection
# ref 6.1 rows: bytes, DX, exit qual, instr_len
IO_VECTORS = [
    (b"\xee", 0x3F8, 0x03F80000, 1),
    (b"\xec", 0x3FD, 0x03FD0008, 1),
    (b"\xe4\x71", 0, 0x00710048, 2),
    (b"\xe6\x80", 0, 0x00800040, 2),
    (b"\xed", 0xCFC, 0x0CFC000B, 1),
    (b"\xef", 0xCF8, 0x0CF80003, 1),
    (b"\x66\xed", 0x1F0, 0x01F00009, 2),
    (b"\x66\xef", 0x604, 0x06040001, 2),
    (b"\xe5\xff", 0, 0x00FF004B, 2),
    (b"\xf3\x6e", 0x3F8, 0x03F80030, 2),
    (b"\x66\xf3\x6d", 0x1F0, 0x01F00039, 3),
    (b"\x6d", 0x1F0, 0x01F0001B, 1),
]


@pytest.mark.parametrize("code,dx,qual,length", IO_VECTORS, ids=[v[0].hex() for v in IO_VECTORS])
def test_inject_io_ve_stores_ref_6_1_exit_info(tdx: TdxModule, code: bytes, dx: int, qual: int,
                                              length: int) -> None:
    regs = distinct_regs(rdx=dx)
    before = regs.copy()
    ve = tdx.inject_io_ve(regs, code)
    # ref 2.2 / 7.2: reason 30, qual, GLA = GPA = 0, length, VALID = 0xFFFFFFFF, RIP unchanged
    assert ve == VeInfo(30, qual, 0, 0, length, ve.instr_info)
    assert tdx.valid == 0xFFFFFFFF and tdx.ve_pending
    assert tdx.ve_info == ve
    assert regs == before
    assert tdx.ve_injected == 1


def test_inject_io_ve_accepts_a_decoded_insn(tdx: TdxModule) -> None:
    insn = IoInsn(IoKind.OUTS, 1, None, True, 32, Segment.FS, 3, 0xF3)
    ve = tdx.inject_io_ve(Regs(rdx=0x3F8), insn)
    # instr info: address size 32 -> bits 9:7 = 1; FS -> bits 17:15 = 4 (ref 3.2)
    assert ve.instr_info == (1 << 7) | (4 << 15)
    assert ve.exit_qual == 0x03F80030 and ve.instr_len == 3


def test_inject_io_ve_rejects_non_io_bytes_without_storing(tdx: TdxModule) -> None:
    with pytest.raises(DecodeError):
        tdx.inject_io_ve(Regs(), b"\x90")
    assert not tdx.ve_pending and tdx.ve_injected == 0


def test_ve_info_area_layout(tdx: TdxModule) -> None:
    tdx.inject_ve(Regs(), 48, 0x181, gla=0x1122334455667788, gpa=0x99AABBCC, instr_len=7,
                  instr_info=0xDEADBEEF, eptp_index=3)
    area = tdx.ve_info_area()
    # ref 2.3 offsets: 0 reason, 4 valid, 8 qual, 0x10 GLA, 0x18 GPA, 0x20 EPTP index,
    # 0x24 instruction length, 0x28 instruction information; 128 bytes
    assert len(area) == 128
    assert struct.unpack_from("<I", area, 0x00)[0] == 48
    assert struct.unpack_from("<I", area, 0x04)[0] == 0xFFFFFFFF
    assert struct.unpack_from("<Q", area, 0x08)[0] == 0x181
    assert struct.unpack_from("<Q", area, 0x10)[0] == 0x1122334455667788
    assert struct.unpack_from("<Q", area, 0x18)[0] == 0x99AABBCC
    assert struct.unpack_from("<H", area, 0x20)[0] == 3
    assert struct.unpack_from("<I", area, 0x24)[0] == 7
    assert struct.unpack_from("<I", area, 0x28)[0] == 0xDEADBEEF
    assert area[0x2C:] == bytes(128 - 0x2C)


def test_second_ve_before_veinfo_get_is_a_double_fault(tdx: TdxModule) -> None:
    regs = Regs(rip=0x1234, rdx=0x3F8)
    first = tdx.inject_io_ve(regs, b"\xee")
    with pytest.raises(DoubleFault) as ei:
        tdx.inject_ve(regs, 12, instr_len=1)
    assert isinstance(ei.value, GuestFault)
    assert ei.value.vector == 8 and ei.value.regs == regs and ei.value.regs is not regs
    # the module injects #DF instead and keeps the first #VE's information (ref 2.2)
    assert tdx.ve_info == first and tdx.valid == 0xFFFFFFFF
    assert tdx.df_injected == 1 and tdx.ve_injected == 1


def test_ve_after_veinfo_get_is_fine(tdx: TdxModule) -> None:
    tdx.inject_io_ve(Regs(rdx=0x3F8), b"\xee")
    call = Regs(rax=3)
    assert tdx.tdcall(call) == 0
    tdx.inject_ve(Regs(), 10, instr_len=2)
    assert tdx.ve_info.exit_reason == 10


@pytest.mark.parametrize("field,value", [
    ("exit_reason", 1 << 32), ("exit_qual", 1 << 64), ("instr_len", -1),
    ("instr_info", 1 << 32), ("gla", "x"), ("eptp_index", 1 << 16), ("gpa", True),
])
def test_inject_ve_rejects_fields_that_do_not_fit(tdx: TdxModule, field: str, value: object) -> None:
    args: dict[str, object] = {"exit_reason": 30, "exit_qual": 0}
    args[field] = value
    reason = args.pop("exit_reason")
    qual = args.pop("exit_qual")
    with pytest.raises(InvalidArgumentError, match=field):
        tdx.inject_ve(Regs(), reason, qual, **args)  # type: ignore[arg-type]
    assert not tdx.ve_pending


def test_bad_regs_and_host() -> None:
    with pytest.raises(InvalidArgumentError, match="tdvmcall"):
        TdxModule(object())  # type: ignore[arg-type]
    tdx = TdxModule(Recorder())
    with pytest.raises(InvalidArgumentError, match="Regs"):
        tdx.tdcall({"rax": 3})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="Regs"):
        tdx.inject_io_ve(None, b"\xec")  # type: ignore[arg-type]


# ---------------------------------------------------------------- leaf 3 VEINFO.GET
def test_veinfo_get_returns_and_clears(tdx: TdxModule) -> None:
    tdx.inject_io_ve(Regs(), IoInsn(IoKind.INS, 2, None, True, 16, Segment.ES, 3, 0xF3))
    call = distinct_regs(rax=3)
    before = call.copy()
    assert tdx.tdcall(call) == 0
    # ref 2.3: RCX reason, RDX qual, R8 GLA, R9 GPA, R10 = len | info << 32
    assert (call.rax, call.rcx, call.r8, call.r9) == (0, 30, 0, 0)
    assert call.rdx == tdx.ve_info.exit_qual
    assert call.r10 == 3 | (0 << 7 | 0 << 15) << 32
    assert call.rip == before.rip + 4
    changed = set(call.diff(before))
    assert changed <= {"rax", "rcx", "rdx", "r8", "r9", "r10", "rip"}
    assert tdx.valid == 0 and not tdx.ve_pending and tdx.veinfo_gets == 1


def test_veinfo_get_with_nothing_valid_zeroes_outputs(tdx: TdxModule) -> None:
    call = distinct_regs(rax=3)
    before = call.copy()
    assert tdx.tdcall(call) == NO_VALID_VE_INFO
    assert call.rax == NO_VALID_VE_INFO
    assert (call.rcx, call.rdx, call.r8, call.r9, call.r10) == (0, 0, 0, 0, 0)
    assert set(call.diff(before)) == {"rax", "rcx", "rdx", "r8", "r9", "r10", "rip"}
    assert tdx.veinfo_gets == 0


def test_veinfo_consumed_exactly_once(tdx: TdxModule) -> None:
    tdx.inject_io_ve(Regs(), b"\xec")
    assert tdx.tdcall(Regs(rax=3)) == 0
    assert tdx.tdcall(Regs(rax=3)) == NO_VALID_VE_INFO


# ---------------------------------------------------------------- malformed TDCALLs
@pytest.mark.parametrize("rax", [
    1 << 24 | 3,               # reserved bits 63:24 (ref 2.1)
    1 << 63,
    1 << 16 | 3,               # VEINFO.GET version 1: 2.0 modules only
    1 << 16,                   # VMCALL version 1
    13, 0xFFFF, 21, 63,        # leaf numbers the module does not define
])
def test_malformed_rax_gets_operand_invalid(tdx: TdxModule, rax: int) -> None:
    tdx.inject_io_ve(Regs(), b"\xec")
    call = distinct_regs(rax=rax)
    before = call.copy()
    assert tdx.tdcall(call) == OPERAND_INVALID_RAX
    assert call.diff(before) == {"rax": (OPERAND_INVALID_RAX, rax), "rip": (before.rip + 4, before.rip)}
    assert tdx.ve_pending                      # nothing consumed
    assert tdx.host.seen == []                 # type: ignore[attr-defined]


@pytest.mark.parametrize("leaf", [1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18, 20, 22, 23, 24, 25, 26, 27])
def test_defined_but_unmodelled_leaf_is_a_typed_error(tdx: TdxModule, leaf: int) -> None:
    call = distinct_regs(rax=leaf)
    before = call.copy()
    with pytest.raises(UnsupportedExitError, match=f"leaf {leaf}"):
        tdx.tdcall(call)
    assert call == before


@pytest.mark.parametrize("mode", [16, 32])
def test_tdcall_outside_64_bit_mode_is_gp(tdx: TdxModule, mode: int) -> None:
    tdx.inject_io_ve(Regs(), b"\xec")
    call = Regs(mode=mode, rax=3, rip=0x500)
    with pytest.raises(GeneralProtectionFault) as ei:
        tdx.tdcall(call)
    assert ei.value.vector == 13
    assert call.rip == 0x500 and call.rax == 3 and tdx.ve_pending


# ---------------------------------------------------------------- leaf 0 VMCALL
@pytest.mark.parametrize("mask", [
    1 << 0, 1 << 1, 1 << 4,            # RAX, RCX, RSP may never be selected
    1 << 5,                            # RBP, because of NO_RBP_MOD
    0xFFCC | 1 << 32, 1 << 63,         # bits 63:32 must be 0
    0xFFFF,
])
def test_vmcall_bad_select_mask(tdx: TdxModule, mask: int) -> None:
    call = distinct_regs(rax=0, rcx=mask)
    before = call.copy()
    assert tdx.tdcall(call) == OPERAND_INVALID_RCX
    assert call.diff(before) == {"rax": (OPERAND_INVALID_RCX, 0), "rip": (before.rip + 4, before.rip)}
    assert tdx.host.seen == [] and tdx.vmcalls == 0    # type: ignore[attr-defined]


def test_rbp_allowed_without_no_rbp_mod() -> None:
    host = Recorder()
    tdx = TdxModule(host, no_rbp_mod=False)
    call = distinct_regs(rax=0, rcx=1 << 5)
    assert tdx.tdcall(call) == 0
    assert host.seen[0].rbp == 0x6666666666666666
    assert call.rbp == (host.fill + 5)


@pytest.mark.parametrize("mask", [0xFC00, 0xFFCC, 0x0004, 0xFFCC | 0xFFFF0000])
def test_vmcall_exposes_only_selected_registers(mask: int) -> None:
    host = Recorder()
    tdx = TdxModule(host)
    call = distinct_regs(rax=0, rcx=mask)
    before = call.copy()
    assert tdx.tdcall(call) == 0
    seen = host.seen[0]
    # What the host sees (ref 2.4): RAX = exit reason 77 (TDCALL), RCX = the
    # GPR/XMM select mask, selected GPRs from RDX up, every other register 0.
    assert seen.rax == 77 and seen.rcx == mask
    for n in range(2, 16):
        expected = before.gpr(n) if mask >> n & 1 else 0
        assert seen.gpr(n) == expected, GPR_NAMES[n]
    assert (seen.rip, seen.fs_base, seen.gs_base) == (0, 0, 0)
    # What the guest keeps: RAX = TDX_SUCCESS, RCX its mask, selected GPRs =
    # the host's values, unselected = its own, RIP past the TDCALL.
    assert call.rax == 0 and call.rcx == mask and call.rip == before.rip + 4
    for n in range(2, 16):
        expected = (host.fill + n) if mask >> n & 1 else before.gpr(n)
        assert call.gpr(n) == expected, GPR_NAMES[n]
    assert tdx.vmcalls == 1 and tdx.tdcalls == 1


def test_vmcall_convenience_sets_leaf_0() -> None:
    host = Recorder()
    tdx = TdxModule(host)
    call = Regs(rax=3, rcx=0xFC00, r11=30)
    assert tdx.vmcall(call) == 0
    assert host.seen[0].r11 == 30


def test_host_exception_leaves_guest_registers_alone() -> None:
    class Broken:
        def tdvmcall(self, regs: Regs) -> None:
            regs.r10 = 5
            raise RuntimeError("device blew up")

    tdx = TdxModule(Broken())
    call = Regs(rcx=0xFC00, r10=0)
    before = call.copy()
    with pytest.raises(RuntimeError):
        tdx.tdcall(call)
    assert call == before


@settings(max_examples=200, deadline=None)
@given(mask=st.integers(0, 2**64 - 1) | st.integers(0, 0xFFFF),
       values=st.lists(st.integers(0, 2**64 - 1), min_size=16, max_size=16),
       no_rbp_mod=st.booleans())
def test_vmcall_select_mask_property(mask: int, values: list[int], no_rbp_mod: bool) -> None:
    host = Recorder(fill=0x0123456789ABCDEF)
    tdx = TdxModule(host, no_rbp_mod=no_rbp_mod)
    call = Regs()
    for n, v in enumerate(values):
        call.set_gpr(n, v)
    call.rax = 0
    call.rcx = mask
    before = call.copy()
    status = tdx.tdcall(call)
    forbidden = 0b10011 | (0b100000 if no_rbp_mod else 0)
    if mask >> 32 or mask & forbidden:
        assert status == OPERAND_INVALID_RCX and host.seen == []
        assert call.diff(before).keys() == {"rax", "rip"}
        return
    assert status == 0
    seen = host.seen[0]
    for n in range(2, 16):
        selected = bool(mask >> n & 1)
        assert seen.gpr(n) == (before.gpr(n) if selected else 0)
        assert call.gpr(n) == ((host.fill + n) & (2**64 - 1) if selected else before.gpr(n))
    assert call.rcx == mask and call.rax == 0
