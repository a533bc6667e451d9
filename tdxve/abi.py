"""ABI facts: exit reasons, TDCALL leaves, TDVMCALL sub-functions and status
codes, bit layouts, value types and numpy dtypes.

Every number here cites the section of ``shared/reference/tdx-port-io.md``
("ref") it comes from; that file names the primary sources (Intel SDM, the TDX
module sources, Linux, KVM). This module imports nothing of tdxve and is shared
by both decoder backends, so the types users receive are the same objects
whichever backend is active.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import numpy as np

__all__ = [
    # enums
    "IoKind", "Segment", "ExitReason", "TdcallLeaf", "TdvmcallSubfn",
    "TdvmcallStatus", "TdxStatus", "Gpr",
    # value types
    "ExitQual", "IoInsn",
    # dtypes
    "EXIT_QUAL_DTYPE", "INSN_DTYPE", "EXIT_INFO_DTYPE",
]

U64_MASK = (1 << 64) - 1

# --------------------------------------------------------------------------
# Exit qualification for I/O instructions (SDM Vol. 3C Table 27-5; ref 3.1)
# --------------------------------------------------------------------------
QUAL_SIZE_MASK = 0x7          # bits 2:0: access size - 1 (0, 1, 3 valid)
QUAL_IN = 1 << 3              # bit 3: 1 = IN, 0 = OUT
QUAL_STRING = 1 << 4          # bit 4: INS/OUTS
QUAL_REP = 1 << 5             # bit 5: REP prefixed
QUAL_IMM = 1 << 6             # bit 6: port operand is an immediate
QUAL_PORT_SHIFT = 16          # bits 31:16: port
QUAL_PORT_MASK = 0xFFFF << 16
QUAL_RESERVED_MASK = 0xFFFFFFFF_00000000 | 0xFF80   # bits 63:32 and 15:7
QUAL_VALID_SIZE_ENCODINGS = (0, 1, 3)               # 1, 2, 4 bytes

# VM-exit instruction-information field for INS/OUTS (SDM Table 27-8; ref 3.2)
INFO_ADDR_SIZE_SHIFT = 7      # bits 9:7: 0 = 16-bit, 1 = 32-bit, 2 = 64-bit
INFO_SEGMENT_SHIFT = 15       # bits 17:15: ES=0 CS=1 SS=2 DS=3 FS=4 GS=5

MAX_INSN_LENGTH = 15          # longer -> #GP(0) at decode, no VM exit (ref 3.4)


class IoKind(IntEnum):
    """The four port-I/O instruction families (ref 3.3)."""

    IN = 0
    OUT = 1
    INS = 2
    OUTS = 3

    @property
    def is_in(self) -> bool:
        return self in (IoKind.IN, IoKind.INS)

    @property
    def is_string(self) -> bool:
        return self in (IoKind.INS, IoKind.OUTS)


class Segment(IntEnum):
    """Segment registers in SDM instruction-information encoding (ref 3.2)."""

    ES = 0
    CS = 1
    SS = 2
    DS = 3
    FS = 4
    GS = 5


class ExitReason(IntEnum):
    """VMX basic exit reasons the TDX module forwards as #VE (ref 1.9, 2.2)."""

    CPUID = 10
    HLT = 12
    INVD = 13
    VMCALL = 18
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    WBINVD = 54
    TDCALL = 77


class TdcallLeaf(IntEnum):
    """TDCALL leaf numbers, RAX bits 15:0 (TDX module tdx_api_defs.h; ref 2.1)."""

    VP_VMCALL = 0
    VP_INFO = 1
    MR_RTMR_EXTEND = 2
    VP_VEINFO_GET = 3
    MR_REPORT = 4
    VP_CPUIDVE_SET = 5
    MEM_PAGE_ACCEPT = 6
    VM_RD = 7
    VM_WR = 8
    VP_RD = 9
    VP_WR = 10
    SYS_RD = 11
    SYS_RDALL = 12
    SERVTD_RD = 18
    SERVTD_WR = 20
    MR_VERIFYREPORT = 22
    MEM_PAGE_ATTR_RD = 23
    MEM_PAGE_ATTR_WR = 24
    VP_ENTER = 25
    VP_INVEPT = 26
    VP_INVVPID = 27


class TdvmcallSubfn(IntEnum):
    """TDG.VP.VMCALL sub-functions in R11 for standard calls (R10 = 0) (ref 2.6).

    Instruction sub-functions equal the VMX basic exit reasons.
    """

    CPUID = 10
    HLT = 12
    IO = 30
    RDMSR = 31
    WRMSR = 32
    REQUEST_MMIO = 48
    WBINVD = 54
    GET_TD_VM_CALL_INFO = 0x10000
    MAP_GPA = 0x10001
    GET_QUOTE = 0x10002
    REPORT_FATAL_ERROR = 0x10003
    SETUP_EVENT_NOTIFY_INTERRUPT = 0x10004
    SERVICE = 0x10005


class TdvmcallStatus(IntEnum):
    """TDVMCALL completion status returned in R10 (ref 2.6)."""

    SUCCESS = 0x0000000000000000
    RETRY = 0x0000000000000001
    INVALID_OPERAND = 0x8000000000000000
    GPA_INUSE = 0x8000000000000001
    ALIGN_ERROR = 0x8000000000000002
    SUBFUNC_UNSUPPORTED = 0x8000000000000003


class TdxStatus(IntEnum):
    """TDCALL completion status returned in RAX by the TDX module (ref 2.7)."""

    SUCCESS = 0
    OPERAND_INVALID = 0xC000010000000000
    NO_VALID_VE_INFO = 0xC000070400000000


# Operand ids OR-ed into TDX_OPERAND_INVALID (ref 2.1, 2.4)
OPERAND_ID_RAX = 0
OPERAND_ID_RCX = 1
TDX_OPERAND_INVALID_RAX = TdxStatus.OPERAND_INVALID | OPERAND_ID_RAX
TDX_OPERAND_INVALID_RCX = TdxStatus.OPERAND_INVALID | OPERAND_ID_RCX  # 0xC000010000000001

# TDCALL RAX input: bits 15:0 leaf, 23:16 version, 63:24 must be 0 (ref 2.1)
TDCALL_LEAF_MASK = 0xFFFF
TDCALL_VERSION_SHIFT = 16
TDCALL_VERSION_MASK = 0xFF << 16
TDCALL_RAX_RESERVED_MASK = U64_MASK & ~0xFFFFFF

# VE-info VALID marker (TDX module tdx_inject_ve; ref 2.2, 2.3)
VE_INFO_VALID = 0xFFFFFFFF

# #VE and #DF injection (ref 2.2)
VECTOR_DF = 8
VECTOR_VE = 20


class Gpr(IntEnum):
    """GPR numbering of the TDG.VP.VMCALL RCX select bitmap (ref 2.4)."""

    RAX = 0
    RCX = 1
    RDX = 2
    RBX = 3
    RSP = 4
    RBP = 5
    RSI = 6
    RDI = 7
    R8 = 8
    R9 = 9
    R10 = 10
    R11 = 11
    R12 = 12
    R13 = 13
    R14 = 14
    R15 = 15


# TDG.VP.VMCALL RCX mask (ref 2.4): bits 15:0 GPRs, 31:16 XMMs, 63:32 must be 0;
# RAX, RCX, RSP must not be selected, nor RBP when the TD has NO_RBP_MOD (KVM).
VMCALL_RCX_RESERVED_MASK = 0xFFFFFFFF_00000000
VMCALL_RCX_FORBIDDEN_GPRS = (1 << Gpr.RAX) | (1 << Gpr.RCX) | (1 << Gpr.RSP)
VMCALL_RCX_NO_RBP_MOD = 1 << Gpr.RBP
LINUX_2022_VMCALL_RCX = 0xFC00     # R10-R15 (ref 2.4)
LINUX_VMCALL_RCX = 0xFFCC          # RDX, RBX, RSI, RDI, R8-R15 since Dec 2022 (ref 2.4)


# --------------------------------------------------------------------------
# Value types returned by the single-record decoders (both backends)
# --------------------------------------------------------------------------
class ExitQual(NamedTuple):
    """A decoded VMX exit qualification for an I/O instruction (ref 3.1).

    ``size`` is in bytes. Under the strict decode it is 1, 2 or 4; under
    ``strict=False`` it is ``bits 2:0 + 1`` exactly as Linux computes it
    (1..8, ref 1.3). ``port`` is bits 31:16; ``raw`` the 64-bit input.
    """

    size: int
    is_in: bool
    is_string: bool
    is_rep: bool
    is_imm: bool
    port: int
    raw: int


class IoInsn(NamedTuple):
    """One decoded port-I/O instruction (ref 3.3, 3.4).

    ``port`` is the imm8 for E4-E7 and None when the port is in DX.
    ``rep`` is True when an F2 or F3 prefix is present, on any form;
    ``rep_prefix`` is the last of them (0xF2 or 0xF3; 0 when none), which is
    the one that decides (iced-x86 ``DecoderTest64.txt``: ``F3 F2 6C`` is
    ``repne insb``). ``addr_size`` is the address-size attribute (16/32/64),
    meaningful for INS/OUTS. ``segment`` is the segment of the memory
    operand of INS (always ES) and OUTS (DS or the override), None for IN/OUT.
    ``length`` includes every prefix.
    """

    kind: IoKind
    size: int
    port: int | None
    rep: bool
    addr_size: int
    segment: Segment | None
    length: int
    rep_prefix: int

    @property
    def is_in(self) -> bool:
        return self.kind == IoKind.IN or self.kind == IoKind.INS

    @property
    def is_string(self) -> bool:
        return self.kind >= IoKind.INS


# --------------------------------------------------------------------------
# numpy dtypes of the batch APIs (layouts mirrored by C structs in _core.pxd;
# _core checks the item sizes at import)
# --------------------------------------------------------------------------
#: ``decode_exit_quals`` output, 16 bytes per record. Fields are the Linux
#: (non-strict) decode; ``valid`` says whether the strict decode accepts it.
EXIT_QUAL_DTYPE = np.dtype(
    {
        "names": ["raw", "port", "size", "is_in", "is_string", "is_rep", "is_imm", "valid"],
        "formats": ["<u8", "<u2", "u1", "?", "?", "?", "?", "?"],
        "offsets": [0, 8, 10, 11, 12, 13, 14, 15],
        "itemsize": 16,
    }
)

#: ``decode_insns`` output, 20 bytes per record. ``port`` is -1 when the port
#: is in DX; ``segment`` is -1 for IN/OUT; ``kind`` is an :class:`IoKind`.
INSN_DTYPE = np.dtype(
    {
        "names": ["offset", "port", "length", "kind", "size", "rep", "addr_size",
                  "segment", "rep_prefix"],
        "formats": ["<i8", "<i4", "u1", "u1", "u1", "?", "u1", "i1", "u1"],
        "offsets": [0, 8, 12, 13, 14, 15, 16, 17, 18],
        "itemsize": 20,
    }
)

#: ``exit_infos`` output: what the TDX module stores in the VE info (ref 2.3).
EXIT_INFO_DTYPE = np.dtype(
    {
        "names": ["exit_qual", "instr_len", "instr_info"],
        "formats": ["<u8", "<u4", "<u4"],
        "offsets": [0, 8, 12],
        "itemsize": 16,
    }
)


# --------------------------------------------------------------------------
# Batch replay (issue 6; tdxve.replay). Layouts mirror the structs in
# tdxve/_replay.pxi, which checks the sizes at import.
# --------------------------------------------------------------------------
#: One port-I/O event for :func:`tdxve.replay.replay`, 32 bytes: the VE info
#: the TDX module reports (``exit_qual``, ``instr_len``; exit reason 30),
#: RAX before the instruction, and ``reply``, what a port no device model
#: serves answers (instead of all-ones) when replaying with
#: ``unassigned="reply"``. Bytes 28-31 are reserved (write 0).
EVENT_DTYPE = np.dtype(
    {
        "names": ["exit_qual", "rax", "reply", "instr_len"],
        "formats": ["<u8", "<u8", "<u8", "<u4"],
        "offsets": [0, 8, 16, 24],
        "itemsize": 32,
    }
)

#: What :func:`tdxve.replay.replay` returns per event, 48 bytes: ``rax``
#: after the event, ``r15`` what the last OUT TDVMCALL sent (0 when none),
#: ``r11`` and ``status`` the R11 / R10 the guest got back from the last
#: TDVMCALL (0 when none), ``rip_delta`` how far RIP moved (``instr_len`` on
#: success, 0 on failure), ``ves`` the #VEs delivered, ``tdvmcalls`` the
#: TDG.VP.VMCALLs made, ``fault`` a :class:`ReplayFault`. Bytes 45-47 are
#: reserved (0).
RESULT_DTYPE = np.dtype(
    {
        "names": ["rax", "r15", "r11", "status", "rip_delta", "ves", "tdvmcalls", "fault"],
        "formats": ["<u8", "<u8", "<u8", "<u8", "<u4", "<u4", "<u4", "u1"],
        "offsets": [0, 8, 16, 24, 32, 36, 40, 44],
        "itemsize": 48,
    }
)


class ReplayFault(IntEnum):
    """``RESULT_DTYPE["fault"]``: how a replayed event ended (docs/replay.md).

    The exception :meth:`tdxve.machine.Machine.execute_exit` raises for the
    same event is :class:`~tdxve.errors.VeFault` on the normal path and
    :class:`~tdxve.errors.EarlyPanic` on the early path for ``IO_FAILED`` and
    ``STRING_IO`` (``.reason`` ``"io-failed"`` / ``"string-io"``),
    :class:`~tdxve.errors.VeLoopError` for ``VE_LOOP`` and
    :class:`~tdxve.errors.GuestPanic` (``"tdvmcall-failed"``) for
    ``GUEST_PANIC``.
    """

    NONE = 0            # RIP advanced by instr_len
    IO_FAILED = 1       # the TDVMCALL returned R10 != 0 (ref 1.4, 1.6, 1.7)
    STRING_IO = 2       # exit-qualification bit 4: Linux's handle_io returns -EIO (ref 1.8)
    VE_LOOP = 3         # RIP never advances: linux-5.19-rc early path (ref 1.1), or instr_len 0
    GUEST_PANIC = 4     # the TDVMCALL's TDCALL itself failed (bad RCX mask; ref 1.10, 2.4)


__all__ += ["EVENT_DTYPE", "RESULT_DTYPE", "ReplayFault"]
