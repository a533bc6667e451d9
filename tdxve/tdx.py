"""One vCPU's view of the Intel TDX module: VE info, VEINFO.GET, VMCALL.

:class:`TdxModule` models the three pieces of the TDX module a port-I/O
instruction passes through (references "ref N.M" are sections of
``shared/reference/tdx-port-io.md``):

* the **#VE injection** (``tdx_inject_ve``, ref 2.2): the exit information
  goes into the per-vCPU VE-info area, VALID becomes ``0xFFFFFFFF`` and #VE
  (vector 20) is reported with RIP unchanged; a second #VE while VALID is
  still set becomes a double fault (:class:`~tdxve.errors.DoubleFault`);
* **TDCALL leaf 3** ``TDG.VP.VEINFO.GET`` (ref 2.3): returns and invalidates
  the VE info;
* **TDCALL leaf 0** ``TDG.VP.VMCALL`` (ref 2.4): validates the RCX
  register-select mask, shows the host only the selected GPRs (all others are
  0 in the host's image), and afterwards gives the guest back the host's
  values only in the selected GPRs.

Modelled as the TDX module 1.5 source does it (ref 9 [M1]); what is not
modelled is listed in ``docs/ve-model.md``.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ._backend import core
from .abi import (
    TDCALL_LEAF_MASK,
    TDCALL_RAX_RESERVED_MASK,
    TDCALL_VERSION_SHIFT,
    TDX_OPERAND_INVALID_RAX,
    TDX_OPERAND_INVALID_RCX,
    U64_MASK,
    VE_INFO_VALID,
    VECTOR_DF,
    VECTOR_VE,
    VMCALL_RCX_FORBIDDEN_GPRS,
    VMCALL_RCX_NO_RBP_MOD,
    VMCALL_RCX_RESERVED_MASK,
    ExitReason,
    Gpr,
    IoInsn,
    TdcallLeaf,
    TdxStatus,
)
from .errors import (
    DoubleFault,
    GeneralProtectionFault,
    InvalidArgumentError,
    UnsupportedExitError,
)
from .regs import Regs

__all__ = [
    "TdxModule", "VeInfo", "TdvmcallHost",
    "TDCALL_INSN_LENGTH", "VE_INFO_AREA_SIZE",
]

#: TDCALL is ``66 0F 01 CC``; a completed TDCALL moves RIP past it (ref 2.1).
TDCALL_INSN_LENGTH = 4
#: Size of the VE-info area in TDVPS page 0 (ref 2.3).
VE_INFO_AREA_SIZE = 128
# Packed layout of the first 0x2C bytes of the VE-info area (ref 2.3 table):
# exit reason u32, valid u32, exit qual u64, GLA u64, GPA u64, EPTP index u16,
# reserved u16, instruction length u32, instruction information u32.
_VE_INFO_STRUCT = struct.Struct("<IIQQQHHII")

_U32_MASK = 0xFFFFFFFF
# Leaves the 1.5 module defines (ref 2.1); any other number gets
# TDX_OPERAND_INVALID with operand id RAX from td_call's default case.
_KNOWN_LEAVES = frozenset(int(leaf) for leaf in TdcallLeaf)
_IO_EXIT = int(ExitReason.IO_INSTRUCTION)
_TDCALL_EXIT = int(ExitReason.TDCALL)
_SUCCESS = int(TdxStatus.SUCCESS)
_NO_VALID_VE_INFO = int(TdxStatus.NO_VALID_VE_INFO)
# VEINFO.GET outputs, zeroed before anything else (ref 2.3).
_VEINFO_OUTPUTS = (Gpr.RCX, Gpr.RDX, Gpr.R8, Gpr.R9, Gpr.R10)
# Template for the host's register image (copy() is much cheaper than Regs()).
_BLANK_REGS = Regs()
# GPR-select bitmap -> (selected, unselected) GPR numbers from RDX up (RAX/RCX never travel).
_SELECTED: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}


class VeInfo(NamedTuple):
    """The VE information as Linux's ``struct ve_info`` holds it (ref 1.2).

    ``exit_reason`` is the full VMX exit-reason field (32 bits, VEINFO.GET
    RCX), ``instr_len`` and ``instr_info`` are R10 bits 31:0 and 63:32.
    """

    exit_reason: int
    exit_qual: int
    gla: int
    gpa: int
    instr_len: int
    instr_info: int


@runtime_checkable
class TdvmcallHost(Protocol):
    """What the TDX module needs from a host (contract: ``tdxve.host.Host``).

    ``tdvmcall(regs)`` serves one TDG.VP.VMCALL from the host-visible register
    image: R10 = 0 for a standard call, R11 the sub-function, R12-R15 the
    arguments, every register the guest did not select 0. The host writes the
    status into ``regs.r10`` and outputs into ``regs.r11`` (and, per
    sub-function, R12-R15) of that same object.
    """

    def tdvmcall(self, regs: Regs) -> None: ...


def _check_reg_int(name: str, value: Any, bits: int) -> int:
    if type(value) is bool or not isinstance(value, int):
        raise InvalidArgumentError(
            f"{name} must be an int in [0, 2**{bits}), got {type(value).__name__} {value!r}")
    v = int(value)
    if not 0 <= v < (1 << bits):
        raise InvalidArgumentError(f"{name} must be in [0, 2**{bits}), got {v:#x}"
                                   if v >= 0 else f"{name} must be in [0, 2**{bits}), got {v}")
    return v


def _check_regs(regs: Any) -> Regs:
    if not isinstance(regs, Regs):
        raise InvalidArgumentError(f"regs must be a tdxve.Regs, got {type(regs).__name__}")
    return regs


class TdxModule:
    """One vCPU's view of the TDX module (VE info, TDCALL leaves 0 and 3).

    :param host: the VMM that serves TDG.VP.VMCALL, any object with a
        ``tdvmcall(regs)`` method (:class:`TdvmcallHost`), normally
        :class:`tdxve.host.Host`.
    :param no_rbp_mod: the TD attribute ``NO_RBP_MOD`` (KVM always sets it):
        RBP may not be selected in the VMCALL RCX mask (ref 2.4).
    :raises InvalidArgumentError: ``host`` has no callable ``tdvmcall``.

    Counters (plain ints, never reset by the model): ``ve_injected``,
    ``df_injected``, ``veinfo_gets`` (successful VEINFO.GET calls),
    ``vmcalls`` (TDG.VP.VMCALLs that reached the host) and ``tdcalls``
    (every completed TDCALL, whatever its status).
    """

    __slots__ = (
        "host", "no_rbp_mod",
        "_valid", "_exit_reason", "_exit_qual", "_gla", "_gpa", "_eptp_index",
        "_instr_len", "_instr_info",
        "ve_injected", "df_injected", "veinfo_gets", "vmcalls", "tdcalls",
    )

    def __init__(self, host: TdvmcallHost, *, no_rbp_mod: bool = True) -> None:
        if not callable(getattr(host, "tdvmcall", None)):
            raise InvalidArgumentError(
                f"host must have a tdvmcall(regs) method, got {type(host).__name__}")
        if no_rbp_mod is not True and no_rbp_mod is not False:
            raise InvalidArgumentError(f"no_rbp_mod must be a bool, got {no_rbp_mod!r}")
        self.host = host
        self.no_rbp_mod = no_rbp_mod
        self._valid = 0
        self._exit_reason = 0
        self._exit_qual = 0
        self._gla = 0
        self._gpa = 0
        self._eptp_index = 0
        self._instr_len = 0
        self._instr_info = 0
        self.ve_injected = 0
        self.df_injected = 0
        self.veinfo_gets = 0
        self.vmcalls = 0
        self.tdcalls = 0

    # ------------------------------------------------------------ VE info area
    @property
    def valid(self) -> int:
        """The VE-info VALID field: ``0xFFFFFFFF`` while a #VE is unread, else 0."""
        return self._valid

    @property
    def ve_pending(self) -> bool:
        """True while the VE info is valid (a further #VE would be a #DF)."""
        return self._valid != 0

    @property
    def ve_info(self) -> VeInfo:
        """The stored VE information (whatever VALID says), as VEINFO.GET would return it."""
        return VeInfo(self._exit_reason, self._exit_qual, self._gla, self._gpa,
                      self._instr_len, self._instr_info)

    def ve_info_area(self) -> bytes:
        """The 128-byte VE-info area of TDVPS page 0, packed as the module stores it (ref 2.3)."""
        head = _VE_INFO_STRUCT.pack(self._exit_reason, self._valid, self._exit_qual, self._gla,
                                    self._gpa, self._eptp_index, 0, self._instr_len,
                                    self._instr_info)
        return head + bytes(VE_INFO_AREA_SIZE - len(head))

    # ------------------------------------------------------------ #VE injection
    def inject_ve(self, regs: Regs, exit_reason: int, exit_qual: int = 0, *, gla: int = 0,
                  gpa: int = 0, instr_len: int = 0, instr_info: int = 0,
                  eptp_index: int = 0) -> VeInfo:
        """Store VE information and report #VE, as ``tdx_inject_ve`` does (ref 2.2).

        RIP is left unchanged: the #VE is a fault on the exiting instruction.

        :param regs: the guest register file at the exiting instruction (only
            read: a copy goes into a :class:`DoubleFault`).
        :param exit_reason: the 32-bit VMX exit-reason field.
        :param exit_qual: the 64-bit exit qualification.
        :param gla: guest linear address (0 for everything but EPT violations).
        :param gpa: guest physical address (0 for everything but EPT violations).
        :param instr_len: VM-exit instruction length (32 bits).
        :param instr_info: VM-exit instruction information (32 bits).
        :param eptp_index: EPTP index (16 bits; stored, not returned by VEINFO.GET).
        :returns: the :class:`VeInfo` now pending.
        :raises DoubleFault: the VE info is still valid (the previous #VE was
            not fetched with VEINFO.GET); the module injects #DF instead and
            leaves the stored information as it was.
        :raises InvalidArgumentError: a field does not fit its width, or
            ``regs`` is not a :class:`~tdxve.regs.Regs`.
        """
        _check_regs(regs)
        exit_reason = _check_reg_int("exit_reason", exit_reason, 32)
        exit_qual = _check_reg_int("exit_qual", exit_qual, 64)
        gla = _check_reg_int("gla", gla, 64)
        gpa = _check_reg_int("gpa", gpa, 64)
        instr_len = _check_reg_int("instr_len", instr_len, 32)
        instr_info = _check_reg_int("instr_info", instr_info, 32)
        eptp_index = _check_reg_int("eptp_index", eptp_index, 16)
        return self._inject(regs, exit_reason, exit_qual, gla, gpa, instr_len, instr_info,
                            eptp_index)

    def _inject(self, regs: Regs, exit_reason: int, exit_qual: int, gla: int, gpa: int,
                instr_len: int, instr_info: int, eptp_index: int) -> VeInfo:
        if self._valid:
            # tdx_inject_ve: VALID still set -> #DF (0x80000B08), info untouched (ref 2.2).
            self.df_injected += 1
            raise DoubleFault(
                f"#VE (exit reason {exit_reason}) while the VE info of the previous #VE "
                f"(exit reason {self._exit_reason}) is still valid: the TDX module injects "
                f"#DF at RIP {regs.rip:#x}",
                regs=regs.copy(), vector=VECTOR_DF, reason="ve-info-valid")
        self._exit_reason = exit_reason
        self._exit_qual = exit_qual
        self._gla = gla
        self._gpa = gpa
        self._eptp_index = eptp_index
        self._instr_len = instr_len
        self._instr_info = instr_info
        self._valid = VE_INFO_VALID
        self.ve_injected += 1
        return VeInfo(exit_reason, exit_qual, gla, gpa, instr_len, instr_info)

    def inject_io_ve(self, regs: Regs, insn_or_code: IoInsn | bytes | bytearray | memoryview
                     ) -> VeInfo:
        """The I/O-instruction VM exit (reason 30) as the module turns it into a #VE.

        The exit qualification, instruction length and instruction
        information come from the decoder (``core.exit_info``; the port of
        the DX forms is ``regs.rdx & 0xFFFF``). GLA = GPA = 0 (ref 2.2, 7.2).

        :param regs: the guest register file at the instruction.
        :param insn_or_code: a decoded :class:`~tdxve.abi.IoInsn`, or the
            instruction bytes (decoded in ``regs.mode``).
        :returns: the :class:`VeInfo` now pending.
        :raises DoubleFault: the previous #VE's info is still valid.
        :raises DecodeError: the bytes are not a port-I/O instruction the CPU
            would execute (no VM exit happens then).
        :raises InvalidArgumentError: bad ``regs`` or ``insn_or_code``.
        """
        _check_regs(regs)
        if isinstance(insn_or_code, IoInsn):
            insn = insn_or_code
        else:
            insn = core.decode_insn(insn_or_code, regs.mode)
        qual, length, info = core.exit_info(insn, regs.rdx)
        return self._inject(regs, _IO_EXIT, qual, 0, 0, length, info, 0)

    # ------------------------------------------------------------ TDCALL
    def tdcall(self, regs: Regs) -> int:
        """Execute TDCALL with the leaf in RAX on the calling context ``regs``.

        ``regs`` is the register state of the code issuing TDCALL (the guest
        kernel's handler, not the context that took the #VE). On completion
        RAX holds the TDX status and RIP has moved past the 4-byte TDCALL.

        * leaf 3 ``TDG.VP.VEINFO.GET`` (ref 2.3): RCX, RDX, R8, R9, R10 are
          zeroed; with no valid VE info RAX = ``TDX_NO_VALID_VE_INFO``; else
          RCX = exit reason, RDX = exit qualification, R8 = GLA, R9 = GPA,
          R10 = instruction length | information << 32, and VALID is cleared.
        * leaf 0 ``TDG.VP.VMCALL`` (ref 2.4): see :meth:`vmcall`.
        * RAX bits 63:24 set, a version other than 0, or a leaf number the
          module does not define: RAX = ``TDX_OPERAND_INVALID`` | operand id
          RAX (``0xC000010000000000``), as ``td_call`` does.

        :returns: the status left in RAX.
        :raises GeneralProtectionFault: ``regs.mode`` is not 64: the module
            injects #GP(0) and RIP does not move (ref 2.1).
        :raises UnsupportedExitError: a leaf the module defines but this
            model does not implement (e.g. 1 ``TDG.VP.INFO``); registers
            untouched.
        :raises InvalidArgumentError: ``regs`` is not a :class:`~tdxve.regs.Regs`.
        """
        _check_regs(regs)
        if regs.mode != 64:
            raise GeneralProtectionFault(
                f"TDCALL in {regs.mode}-bit mode: the TDX module injects #GP(0) "
                f"(TDCALL is legal only in 64-bit mode) at RIP {regs.rip:#x}",
                regs=regs.copy(), vector=13, reason="tdcall-not-64-bit")
        rax = regs.rax
        leaf = rax & TDCALL_LEAF_MASK
        version = (rax >> TDCALL_VERSION_SHIFT) & 0xFF
        if rax & TDCALL_RAX_RESERVED_MASK or version != 0 or leaf not in _KNOWN_LEAVES:
            # td_call: reserved bits, a version only TDG.VM.RD (and, in 2.0,
            # VEINFO.GET) accepts, or the switch's default case (ref 2.1).
            status = TDX_OPERAND_INVALID_RAX
        elif leaf == TdcallLeaf.VP_VEINFO_GET:
            status = self._veinfo_get(regs)
        elif leaf == TdcallLeaf.VP_VMCALL:
            status = self._vmcall(regs)
        else:
            raise UnsupportedExitError(
                f"TDCALL leaf {leaf} ({TdcallLeaf(leaf).name}) is defined by the TDX module but "
                f"not modelled (only 0 TDG.VP.VMCALL and 3 TDG.VP.VEINFO.GET are)",
                regs=regs.copy(), vector=None, reason="tdcall-leaf")
        regs.set_gpr(Gpr.RAX, status)
        regs.rip = (regs.rip + TDCALL_INSN_LENGTH) & U64_MASK
        self.tdcalls += 1
        return status

    def vmcall(self, regs: Regs) -> int:
        """``TDG.VP.VMCALL`` (TDCALL leaf 0) on ``regs``; sets RAX = 0 first for convenience.

        RCX is the register-select mask (ref 2.4): bits 15:0 GPRs in the
        order RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15, bits 31:16 XMMs
        (accepted, not modelled: :class:`~tdxve.regs.Regs` has no XMM state),
        bits 63:32 must be 0; RAX, RCX, RSP (and RBP under ``no_rbp_mod``)
        must not be selected, else RAX = ``0xC000010000000001``.

        The host receives a fresh :class:`~tdxve.regs.Regs` image: RAX = 77
        (the TDCALL exit reason), RCX = the mask (the TD exit qualification,
        GPR/XMM select), each selected GPR from RDX up copied from ``regs``,
        every other register 0. Afterwards ``regs`` has RAX = 0
        (``TDX_SUCCESS``), RCX unchanged, each selected GPR = the host's
        value, every unselected GPR its own previous value.

        :returns: the TDCALL status (0, or the operand-invalid status).
        :raises GeneralProtectionFault: not in 64-bit mode.
        """
        _check_regs(regs)
        regs.set_gpr(Gpr.RAX, TdcallLeaf.VP_VMCALL)
        return self.tdcall(regs)

    def _veinfo_get(self, regs: Regs) -> int:
        if not self._valid:
            for n in _VEINFO_OUTPUTS:
                regs.set_gpr(n, 0)
            return _NO_VALID_VE_INFO
        # Version 0: RCX bits 63:32 stay 0 (the 2.0 VE category is version 1 only).
        regs.set_gpr(Gpr.RCX, self._exit_reason)
        regs.set_gpr(Gpr.RDX, self._exit_qual)
        regs.set_gpr(Gpr.R8, self._gla)
        regs.set_gpr(Gpr.R9, self._gpa)
        regs.set_gpr(Gpr.R10, self._instr_len | (self._instr_info << 32))
        self._valid = 0
        self.veinfo_gets += 1
        return _SUCCESS

    def _vmcall(self, regs: Regs) -> int:
        mask = regs.rcx
        forbidden = VMCALL_RCX_FORBIDDEN_GPRS | (VMCALL_RCX_NO_RBP_MOD if self.no_rbp_mod else 0)
        if mask & VMCALL_RCX_RESERVED_MASK or mask & forbidden:
            # tdg_vp_vmcall: bits 0, 1, 4 (and 5 with NO_RBP_MOD) and 63:32 must be 0.
            return TDX_OPERAND_INVALID_RCX
        split = _SELECTED.get(mask & 0xFFFF)
        if split is None:
            split = _SELECTED[mask & 0xFFFF] = (
                tuple(n for n in range(2, 16) if mask >> n & 1),
                tuple(n for n in range(2, 16) if not mask >> n & 1))
        sel, unsel = split
        # The host's image: every selected GPR from RDX up as the guest has it,
        # every other register 0 (copy, then clear what the host may not see).
        image = regs.copy()
        image.set_gpr(Gpr.RAX, _TDCALL_EXIT)   # the host sees exit reason 77 in RAX
        image.set_gpr(Gpr.RCX, mask)           # TD exit qualification: GPR/XMM select
        for n in unsel:
            image.set_gpr(n, 0)
        if image.rip:
            image.rip = 0
        if image.rflags != _BLANK_REGS.rflags:
            image.rflags = _BLANK_REGS.rflags
        if image.fs_base:
            image.fs_base = 0
        if image.gs_base:
            image.gs_base = 0
        if image.mode != 64:
            image.mode = 64
        if image.cpl:
            image.cpl = 0
        self.vmcalls += 1
        self.host.tdvmcall(image)
        # Back in the guest: selected GPRs from the host, the rest untouched (ref 2.4).
        for n in sel:
            v = image.gpr(n)
            if v != regs.gpr(n):
                regs.set_gpr(n, v)
        return _SUCCESS
