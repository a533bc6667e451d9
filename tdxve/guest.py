"""The guest kernel's #VE handlers: early and normal paths, Linux-era profiles.

:class:`Guest` is what runs inside the TD after the TDX module reported a #VE
(references "ref N.M" are sections of ``shared/reference/tdx-port-io.md``):

* the **early path** (``do_early_exception`` -> ``tdx_early_handle_ve`` ->
  ``early_fixup_exception``, ref 1.7): port I/O only, anything else ends in
  :class:`~tdxve.errors.EarlyPanic` unless :attr:`Guest.extable` has a fixup;
* the **normal path** (``exc_virtualization_exception`` ->
  ``tdx_handle_virt_exception``, ref 1.6, 1.9): port I/O, HLT, RDMSR, WRMSR
  and CPUID through their TDVMCALL sub-functions; a failure becomes
  :class:`~tdxve.errors.VeFault` (Linux's ``ve_raise_fault``).

A :class:`Profile` picks the Linux version being modelled: how an IN result
is merged into RAX and what an OUT sends in R15 (ref 1.4, 6.2), whether the
early handler advances RIP (ref 1.1), which RCX mask TDG.VP.VMCALL uses
(ref 2.4). ``docs/ve-model.md`` lists every choice made where the sources are
silent.
"""

from __future__ import annotations

import collections.abc
import operator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np

from ._backend import core
from .abi import (
    LINUX_2022_VMCALL_RCX,
    LINUX_VMCALL_RCX,
    U64_MASK,
    VECTOR_VE,
    ExitReason,
    Gpr,
    Segment,
    TdcallLeaf,
    TdvmcallSubfn,
)
from .errors import (
    EarlyPanic,
    GuestMemoryFault,
    GuestPanic,
    InvalidArgumentError,
    StringIoLimitError,
    UnsupportedExitError,
    VeFault,
)
from .regs import Regs, address_size_write
from .tdx import TdxModule, VeInfo

__all__ = [
    "Guest", "Profile", "PROFILES", "PROFILE_NAMES",
    "GuestMemory", "ArrayMemory",
    "INTEL_ALLOWED_PORTS", "INTEL_DEBUG_ALLOWED_PORTS",
    "merge_in", "out_data",
    "DEFAULT_MAX_REP", "DEFAULT_MEMORY_SIZE", "STRING_IO_CHOICES",
]

_U32 = 0xFFFFFFFF
UINT_MAX = 0xFFFFFFFF
_RFLAGS_IF = 1 << 9
# Kernel CS as early_fixup_exception prints it (__KERNEL_CS, ref 1.7).
_KERNEL_CS = 0x10
_IO_IN_BIT = 1 << 3
# Linux returns -EIO from a #VE sub-handler that failed (ref 1.4, 1.9).
STRING_IO_CHOICES = ("reject", "emulate")
#: Default guard for emulated REP INS/OUTS (elements per instruction), see ``Guest(max_rep=...)``.
DEFAULT_MAX_REP = 1 << 20
#: Size of the :class:`ArrayMemory` a :class:`Guest` (or Machine) creates when given none.
DEFAULT_MEMORY_SIZE = 1 << 20


# ==========================================================================
# Profiles
# ==========================================================================
_MERGES = ("linux-2022", "linux", "architectural")


@dataclass(frozen=True)
class Profile:
    """How a given guest kernel handles a port-I/O #VE.

    :param name: the profile's name.
    :param merge: the IN/OUT data rules (ref 1.4): ``"linux-2022"``
        (``GENMASK(8*size, 0)``: one bit too wide, no 32-bit zero extension,
        masked bits cleared on failure), ``"linux"`` (the July-2026 code:
        ``insn_assign_reg``, 0 written on failure), ``"architectural"``
        (hardware IN/OUT: AL/AX merged, EAX zero-extended, RAX untouched on
        failure). It also selects how WRMSR/RDMSR/CPUID treat the upper
        register halves: the three Linux profiles use Linux's full-width
        arithmetic, ``"architectural"`` the instructions' 32-bit semantics.
    :param early_advances_rip: False models the April-2022 early handler
        that never advanced RIP (fixed by 60428d8bc27f, ref 1.1).
    :param vmcall_rcx: the TDG.VP.VMCALL register-select mask the guest
        passes (0xFC00 in 2022, 0xFFCC since Dec 2022; ref 2.4).
    :param description: one line for humans.
    :raises InvalidArgumentError: ``merge`` is not one of the three rules, or
        another field has the wrong type.
    """

    name: str
    merge: str
    early_advances_rip: bool = True
    vmcall_rcx: int = LINUX_VMCALL_RCX
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidArgumentError(f"Profile.name must be a non-empty str, got {self.name!r}")
        if self.early_advances_rip is not True and self.early_advances_rip is not False:
            raise InvalidArgumentError(
                f"Profile.early_advances_rip must be a bool, got {self.early_advances_rip!r}")
        if self.merge not in _MERGES:
            raise InvalidArgumentError(
                f"Profile.merge must be one of {', '.join(_MERGES)}, got {self.merge!r}")
        if type(self.vmcall_rcx) is not int or not 0 <= self.vmcall_rcx <= U64_MASK:
            raise InvalidArgumentError(f"Profile.vmcall_rcx must be a 64-bit int, got {self.vmcall_rcx!r}")


#: The built-in profiles by name.
PROFILES: Mapping[str, Profile] = MappingProxyType({
    "linux-2022": Profile(
        "linux-2022", "linux-2022", True, LINUX_VMCALL_RCX,
        "Linux 5.19 (June 2022) to July 2026: 9/17/33-bit masks, no 32-bit zero extension"),
    "linux": Profile(
        "linux", "linux", True, LINUX_VMCALL_RCX,
        "Linux after the July-2026 fixes (0f63e656, 941370fc): insn_assign_reg"),
    "architectural": Profile(
        "architectural", "architectural", True, LINUX_VMCALL_RCX,
        "what hardware IN/OUT do: AL/AX merged, EAX zero-extended, nothing written on failure"),
    "linux-5.19-rc": Profile(
        "linux-5.19-rc", "linux-2022", False, LINUX_2022_VMCALL_RCX,
        "the April-2022 merge: early #VE handler never advances RIP (endless #VE loop)"),
})
#: Names accepted by ``Guest(profile=...)`` and ``Machine(profile=...)``.
PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)


def _resolve_profile(profile: Any) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, str) and profile in PROFILES:
        return PROFILES[profile]
    raise InvalidArgumentError(
        f"profile must be one of {', '.join(PROFILE_NAMES)} or a Profile, got {profile!r}")


# ==========================================================================
# RAX merge and OUT data (ref 1.4, 6.2)
# ==========================================================================
def _genmask_x86(h: int) -> int:
    # Linux GENMASK(h, 0) = ~0UL >> (BITS_PER_LONG - 1 - h). For size 8 the
    # 2022 code asks for h = 64: undefined in C; the compiled kernel executes
    # SHR with a count of -1, which x86 masks to 63, giving the mask 0x1.
    return U64_MASK >> ((63 - h) & 63)


def _merge_2022(rax: int, value: int, size: int, ok: bool) -> int:
    # handle_in, 2022 code: clear GENMASK(8*size, 0), OR in r11 on success (ref 1.4).
    mask = _genmask_x86(8 * size)
    rax &= ~mask & U64_MASK
    if ok:
        rax |= value & mask
    return rax


def _insn_assign_reg(rax: int, value: int, size: int) -> int:
    # insn_assign_reg (1fe104b048d7, ex-KVM assign_register): narrow stores for
    # 1/2 bytes, (u32) into the full register for 4, all 64 bits for 8, any
    # other byte count leaves the register untouched (ref 1.4).
    if size == 1:
        return (rax & ~0xFF & U64_MASK) | (value & 0xFF)
    if size == 2:
        return (rax & ~0xFFFF & U64_MASK) | (value & 0xFFFF)
    if size == 4:
        return value & _U32
    if size == 8:
        return value & U64_MASK
    return rax


def _merge_linux(rax: int, value: int, size: int, ok: bool) -> int:
    # handle_in after 941370fc: insn_assign_reg(&ax, success ? r11 : 0, size).
    return _insn_assign_reg(rax, value if ok else 0, size)


def _merge_arch(rax: int, value: int, size: int, ok: bool) -> int:
    # Hardware IN: AL/AX leave the rest of RAX, EAX zero-extends (SDM Vol. 1
    # 3.4.1.1, ref 3.4). A failed access is a fault: no register is written.
    # Sizes 3, 5-7 (only from non-conforming qualifications) are extrapolated
    # as narrow writes of that many bytes; 8 writes all of RAX.
    if not ok:
        return rax
    if size == 4:
        return value & _U32
    if size >= 8:
        return value & U64_MASK
    mask = (1 << (8 * size)) - 1
    return (rax & ~mask & U64_MASK) | (value & mask)


def _out_2022(rax: int, size: int) -> int:
    # handle_out, 2022 code: regs->ax & GENMASK(8*size, 0) (ref 1.4).
    return rax & _genmask_x86(8 * size)


def _out_fixed(rax: int, size: int) -> int:
    # 0f63e656: GENMASK(8*size - 1, 0); also what hardware OUT sends.
    return rax & ((1 << (8 * size)) - 1) & U64_MASK


_MERGE_FN: dict[str, Callable[[int, int, int, bool], int]] = {
    "linux-2022": _merge_2022, "linux": _merge_linux, "architectural": _merge_arch,
}
_OUT_FN: dict[str, Callable[[int, int], int]] = {
    "linux-2022": _out_2022, "linux": _out_fixed, "architectural": _out_fixed,
}


def _check_u64(name: str, value: Any) -> int:
    if type(value) is bool or not isinstance(value, int):
        raise InvalidArgumentError(
            f"{name} must be an int in [0, 2**64), got {type(value).__name__} {value!r}")
    v = int(value)
    if not 0 <= v <= U64_MASK:
        raise InvalidArgumentError(f"{name} must be in [0, 2**64), got {v:#x}"
                                   if v >= 0 else f"{name} must be in [0, 2**64), got {v}")
    return v


def _as_index(name: str, value: Any) -> int:
    # Python and numpy integers, not bools or floats.
    if type(value) is bool or isinstance(value, np.bool_):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidArgumentError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def _check_linux_size(size: Any) -> int:
    if type(size) is bool or not isinstance(size, int) or not 1 <= size <= 8:
        raise InvalidArgumentError(
            f"size must be an int in 1..8 (exit-qualification bits 2:0 + 1), got {size!r}")
    return int(size)


def merge_in(profile: str | Profile, rax: int, r11: int, size: int, ok: bool = True) -> int:
    """RAX after an IN #VE under ``profile`` (ref 1.4 IN table, 6.2).

    :param profile: a profile name or :class:`Profile`.
    :param rax: RAX before the IN.
    :param r11: the data the host returned in R11.
    :param size: the size Linux decoded, 1..8 (3 and 5..8 come only from
        non-conforming exit qualifications).
    :param ok: whether the TDVMCALL succeeded (R10 == 0).
    :returns: the new RAX.
    :raises InvalidArgumentError: an unknown profile, a value outside
        ``[0, 2**64)`` or a size outside 1..8.
    """
    p = _resolve_profile(profile)
    return _MERGE_FN[p.merge](_check_u64("rax", rax), _check_u64("r11", r11),
                              _check_linux_size(size), bool(ok))


def out_data(profile: str | Profile, rax: int, size: int) -> int:
    """The value an OUT #VE sends the host in R15 under ``profile`` (ref 1.4 OUT table, 6.2).

    :raises InvalidArgumentError: an unknown profile, ``rax`` outside
        ``[0, 2**64)`` or a size outside 1..8.
    """
    p = _resolve_profile(profile)
    return _OUT_FN[p.merge](_check_u64("rax", rax), _check_linux_size(size))


# ==========================================================================
# Port filter (Intel downstream guest, ref 1.11; anchors 4.2)
# ==========================================================================
def _ports(*ranges: tuple[int, int]) -> frozenset[int]:
    return frozenset(p for lo, hi in ranges for p in range(lo, hi + 1))


#: ``tdx_allowed_port()`` of Intel's hardened guest (intel/tdx
#: ``arch/x86/coco/tdx/filter.c``): MC146818 RTC 0x70-0x71, i8237A DMA
#: 0x80-0x8F, PCI 0xCD8-0xCDF and 0xCF8-0xCFF, Q35 PCIe hotplug 0xCC4 and
#: 0xCC8, ACPI 0x600-0x62F (PM1a event/control, PM timer, GPE0).
INTEL_ALLOWED_PORTS: frozenset[int] = _ports(
    (0x70, 0x71), (0x80, 0x8F), (0xCD8, 0xCDF), (0xCF8, 0xCFF), (0xCC4, 0xCC4),
    (0xCC8, 0xCC8), (0x600, 0x62F))
#: The same list in a debug TD, which also allows the four serial ports'
#: ranges 0x2E8-0x2EF, 0x2F8-0x2FF, 0x3E8-0x3EF, 0x3F8-0x3FF.
INTEL_DEBUG_ALLOWED_PORTS: frozenset[int] = INTEL_ALLOWED_PORTS | _ports(
    (0x2E8, 0x2EF), (0x2F8, 0x2FF), (0x3E8, 0x3EF), (0x3F8, 0x3FF))


def _make_port_filter(port_filter: Any) -> Callable[[int], bool] | None:
    if port_filter is None:
        return None
    if isinstance(port_filter, (str, bytes, bytearray)):
        raise InvalidArgumentError(
            f"port_filter must be a collection of allowed ports or a callable(port) -> bool, "
            f"got {type(port_filter).__name__} {port_filter!r}")
    if isinstance(port_filter, collections.abc.Container):
        contains: Callable[[int], bool] = port_filter.__contains__
        return contains
    if callable(port_filter):
        fn: Callable[[int], Any] = port_filter
        return lambda port: bool(fn(port))
    raise InvalidArgumentError(
        f"port_filter must be a collection of allowed ports or a callable(port) -> bool, "
        f"got {type(port_filter).__name__}")


# ==========================================================================
# Guest memory (contract 2)
# ==========================================================================
@runtime_checkable
class GuestMemory(Protocol):
    """Guest memory as emulated string I/O sees it (linear addresses).

    Out-of-range accesses raise :class:`IndexError`; the guest turns that
    into :class:`~tdxve.errors.GuestMemoryFault`.
    """

    def read(self, addr: int, size: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


class ArrayMemory:
    """A flat, numpy-backed :class:`GuestMemory` covering ``[base, base + size)``.

    :param size: number of bytes (> 0).
    :param base: linear address of the first byte.
    :raises InvalidArgumentError: ``size`` not a positive int, ``base``
        negative, or the range passing 2**64.

    ``data`` is the backing ``uint8`` array (offset = address - base), for
    bulk inspection and loading.
    """

    __slots__ = ("data", "base", "size")

    def __init__(self, size: int, base: int = 0) -> None:
        if type(size) is bool or not isinstance(size, int) or size <= 0:
            raise InvalidArgumentError(f"ArrayMemory size must be a positive int, got {size!r}")
        base = _check_u64("base", base)
        if base + size > U64_MASK + 1:
            raise InvalidArgumentError(
                f"ArrayMemory [{base:#x}, {base + size:#x}) passes the end of the 64-bit address space")
        self.data = np.zeros(size, dtype=np.uint8)
        self.base = base
        self.size = size

    def _offset(self, addr: Any, n: int, what: str) -> int:
        a = _as_index("address", addr)
        off = a - self.base
        if off < 0 or off + n > self.size:
            raise IndexError(
                f"{what} of {n} byte(s) at {a:#x} outside guest memory "
                f"[{self.base:#x}, {self.base + self.size:#x})")
        return off

    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes at ``addr``.

        :raises IndexError: any byte outside the memory.
        :raises InvalidArgumentError: ``addr`` or ``size`` not an integer, or ``size`` negative.
        """
        n = _as_index("read size", size)
        if n < 0:
            raise InvalidArgumentError(f"read size must be non-negative, got {n}")
        off = self._offset(addr, n, "read")
        return self.data[off:off + n].tobytes()

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` (bytes-like) at ``addr``.

        :raises IndexError: any byte outside the memory (nothing is written).
        :raises InvalidArgumentError: ``addr`` not an int or ``data`` not bytes-like.
        """
        try:
            buf = memoryview(data).cast("B")
        except TypeError:
            raise InvalidArgumentError(
                f"data must be bytes-like, got {type(data).__name__}") from None
        off = self._offset(addr, len(buf), "write")
        self.data[off:off + len(buf)] = np.frombuffer(buf, dtype=np.uint8)

    def __repr__(self) -> str:
        return f"ArrayMemory(size={self.size:#x}, base={self.base:#x})"


# ==========================================================================
# The guest
# ==========================================================================
class _Fail(Exception):
    """A #VE sub-handler returned -EIO (internal; becomes VeFault or EarlyPanic)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# Fresh scratch register file for the handler's own TDCALLs (copy() is cheap).
_BLANK_REGS = Regs()

_USER_IO_DETAIL = "port I/O from user mode is not handled (Unexpected #VE: 30)"


class Guest:
    """The guest kernel's #VE handlers (Linux semantics, selectable era).

    :param tdx: the vCPU's :class:`~tdxve.tdx.TdxModule`.
    :param profile: ``"linux"`` (default), ``"linux-2022"``,
        ``"architectural"``, ``"linux-5.19-rc"`` or a :class:`Profile`.
    :param string_io: ``"reject"`` (Linux: an INS/OUTS #VE fails) or
        ``"emulate"`` (architectural INS/OUTS through one Instruction.IO
        TDVMCALL per element, using :attr:`memory`).
    :param port_filter: None, or an allow-list in the style of Intel's
        hardened guest: a collection of ports (e.g.
        :data:`INTEL_ALLOWED_PORTS`) or a ``callable(port) -> bool``. A denied
        IN yields all-ones (``UINT_MAX`` merged by the profile's rule) and
        succeeds; a denied OUT is dropped and succeeds; no TDVMCALL either way
        (ref 1.11).
    :param memory: the :class:`GuestMemory` emulated string I/O uses; a fresh
        :class:`ArrayMemory` of :data:`DEFAULT_MEMORY_SIZE` bytes when None.
    :param max_rep: guard for emulated string I/O: an INS/OUTS whose element
        count exceeds it raises :class:`~tdxve.errors.StringIoLimitError`
        before touching anything; None disables the guard (elements are then
        transferred one by one until the count is exhausted or memory
        faults).
    :raises InvalidArgumentError: any argument of the wrong kind.

    ``extable`` maps a faulting RIP to its fixup RIP (Linux's exception
    table): consulted by :meth:`early_fixup_exception` and, for kernel-mode
    failures, by the normal path's ``ve_raise_fault``. ``fixups`` counts how
    often an entry was used.
    """

    def __init__(self, tdx: TdxModule, *, profile: str | Profile = "linux",
                 string_io: str = "reject", port_filter: Any = None,
                 memory: GuestMemory | None = None, max_rep: int | None = DEFAULT_MAX_REP) -> None:
        if not isinstance(tdx, TdxModule):
            raise InvalidArgumentError(f"tdx must be a TdxModule, got {type(tdx).__name__}")
        if string_io not in STRING_IO_CHOICES:
            raise InvalidArgumentError(
                f"string_io must be 'reject' or 'emulate', got {string_io!r}")
        if max_rep is not None and (type(max_rep) is not int or max_rep < 0):
            raise InvalidArgumentError(f"max_rep must be a non-negative int or None, got {max_rep!r}")
        if memory is None:
            memory = ArrayMemory(DEFAULT_MEMORY_SIZE)
        elif not (callable(getattr(memory, "read", None)) and callable(getattr(memory, "write", None))):
            raise InvalidArgumentError(
                f"memory must provide read(addr, size) and write(addr, data), got {type(memory).__name__}")
        self.tdx = tdx
        self.profile = _resolve_profile(profile)
        self.string_io = string_io
        self.port_filter = port_filter
        self._allowed = _make_port_filter(port_filter)
        self.memory = memory
        self.max_rep = max_rep
        self.extable: dict[int, int] = {}
        self.fixups = 0
        self._merge = _MERGE_FN[self.profile.merge]
        self._out = _OUT_FN[self.profile.merge]
        self._arch = self.profile.merge == "architectural"
        self._early_cause: _Fail | None = None
        # The interrupted context while a handler runs (for GuestPanic.regs).
        self._ctx: Regs | None = None

    def __repr__(self) -> str:
        return (f"Guest(profile={self.profile.name!r}, string_io={self.string_io!r}, "
                f"port_filter={'on' if self._allowed else 'off'})")

    def _ctx_copy(self) -> Regs | None:
        return self._ctx.copy() if self._ctx is not None else None

    # ------------------------------------------------------------ TDCALL wrappers
    def get_ve_info(self) -> VeInfo:
        """``tdx_get_ve_info``: TDCALL leaf 3 with all inputs 0 (ref 1.2, 2.3).

        :raises GuestPanic: the TDCALL returned a non-zero status (e.g. no
            valid VE info): Linux panics "TDCALL 3 failed (Buggy TDX module!)".
        """
        t = _BLANK_REGS.copy()
        t.set_gpr(Gpr.RAX, TdcallLeaf.VP_VEINFO_GET)
        status = self.tdx.tdcall(t)
        if status:
            raise GuestPanic(
                f"TDCALL 3 failed (Buggy TDX module!): status {status:#x}",
                regs=self._ctx_copy(), vector=VECTOR_VE, reason="veinfo-get-failed")
        r10 = t.r10
        return VeInfo(t.rcx, t.rdx, t.r8, t.r9, r10 & _U32, r10 >> 32)

    def _hypercall(self, subfn: int, r12: int = 0, r13: int = 0, r14: int = 0,
                   r15: int = 0) -> Regs:
        # __tdx_hypercall: R10 = 0 (standard), R11 = sub-function, R12-R15
        # arguments, every other exposed register 0; panics if the TDCALL
        # itself fails (ref 1.10, 2.4).
        t = _BLANK_REGS.copy()
        t.set_gpr(Gpr.RCX, self.profile.vmcall_rcx)
        t.set_gpr(Gpr.R11, subfn)
        t.set_gpr(Gpr.R12, r12)
        if r13:
            t.set_gpr(Gpr.R13, r13)
        if r14:
            t.set_gpr(Gpr.R14, r14)
        if r15:
            t.set_gpr(Gpr.R15, r15)
        status = self.tdx.tdcall(t)
        if status:
            raise GuestPanic(
                f"TDVMCALL failed. TDX module bug? (TDCALL status {status:#x}, RCX mask "
                f"{self.profile.vmcall_rcx:#x})", regs=self._ctx_copy(), vector=VECTOR_VE,
                reason="tdvmcall-failed")
        return t

    # ------------------------------------------------------------ paravirt helpers
    def tdvmcall_io_read(self, size: int, port: int) -> int:
        """Port read without #VE, as the decompressor's ``tdx_inb`` does (ref 1.7).

        :param size: 1, 2 or 4.
        :param port: 0-0xFFFF.
        :returns: the host's data truncated to ``size`` bytes, or all-ones at
            that width when the host returned a non-zero status
            (``UINT_MAX`` truncated by the typed wrapper).
        :raises InvalidArgumentError: bad ``size`` or ``port``.
        """
        size, port = self._check_pio(size, port)
        t = self._hypercall(TdvmcallSubfn.IO, size, 0, port)
        value = UINT_MAX if t.r10 else t.r11
        return value & ((1 << (8 * size)) - 1)

    def tdvmcall_io_write(self, size: int, port: int, value: int) -> int:
        """Port write without #VE, as the decompressor's ``tdx_outb``/``tdx_outw`` do (ref 1.7).

        :param size: 1, 2 or 4.
        :param port: 0-0xFFFF.
        :param value: the data; truncated to ``size`` bytes like the C
            wrappers' ``u8``/``u16``/``u32`` parameters.
        :returns: the TDVMCALL status from R10 (the decompressor ignores it).
        :raises InvalidArgumentError: bad ``size``, ``port`` or ``value``.
        """
        size, port = self._check_pio(size, port)
        value = _check_u64("value", value) & ((1 << (8 * size)) - 1)
        t = self._hypercall(TdvmcallSubfn.IO, size, 1, port, value)
        return t.r10

    @staticmethod
    def _check_pio(size: Any, port: Any) -> tuple[int, int]:
        if type(size) is bool or not isinstance(size, int) or size not in (1, 2, 4):
            raise InvalidArgumentError(f"size must be 1, 2 or 4, got {size!r}")
        if type(port) is bool or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise InvalidArgumentError(f"port must be an int in 0-0xFFFF, got {port!r}")
        return int(size), int(port)

    # ------------------------------------------------------------ early path
    def do_early_exception(self, regs: Regs, trapnr: int) -> None:
        """``do_early_exception`` (head64.c, ref 1.7): the early IDT's C handler.

        For vector 20 the early #VE handler runs first; whatever it does not
        handle (and any other vector) goes to :meth:`early_fixup_exception`.
        The #PF early page-table builder and the SEV #VC path are not modelled.

        :raises EarlyPanic: nothing handled it and no fixup exists.
        :raises GuestPanic: VEINFO.GET failed.
        :raises InvalidArgumentError: bad ``regs`` or ``trapnr`` (0-255).
        """
        _check_regs(regs)
        if type(trapnr) is bool or not isinstance(trapnr, int) or not 0 <= trapnr <= 255:
            raise InvalidArgumentError(f"trapnr must be an exception vector 0-255, got {trapnr!r}")
        if trapnr == VECTOR_VE and self.early_handle_ve(regs):
            return
        self.early_fixup_exception(regs, trapnr)

    def early_handle_ve(self, regs: Regs) -> bool:
        """``tdx_early_handle_ve`` (ref 1.7 step 2): port I/O only.

        Fetches the VE info first, whatever happens next. Returns True when
        the I/O was emulated (RIP advanced, except under ``linux-5.19-rc``),
        False for any other exit reason or a failed I/O (RAX may already be
        modified, ref 1.4).

        :raises GuestPanic: VEINFO.GET failed.
        :raises GuestMemoryFault, StringIoLimitError: emulated string I/O only.
        """
        _check_regs(regs)
        self._ctx = regs
        try:
            ve = self.get_ve_info()
            if ve.exit_reason != ExitReason.IO_INSTRUCTION:
                self._early_cause = _Fail(
                    "unexpected-exit",
                    f"exit reason {ve.exit_reason} is not handled by the early #VE handler "
                    f"(port I/O only)")
                return False
            length = self._handle_io(regs, ve)
        except _Fail as fail:
            self._early_cause = fail
            return False
        finally:
            self._ctx = None
        if self.profile.early_advances_rip:
            regs.rip = (regs.rip + length) & U64_MASK
        return True

    def early_fixup_exception(self, regs: Regs, trapnr: int) -> None:
        """``early_fixup_exception`` (extable.c, ref 1.7 step 3).

        NMIs (vector 2) are ignored; a non-kernel CS (``regs.cpl != 0``)
        fails; an :attr:`extable` entry for ``regs.rip`` moves RIP to the
        fixup; otherwise the kernel prints "PANIC: early exception 0x14 IP
        10:<rip> error 0 cr2 0x0" and halts.

        :raises EarlyPanic: whose message starts with the kernel's line; the
            cause follows on a second line and in ``.reason``.
        """
        _check_regs(regs)
        cause, self._early_cause = self._early_cause, None
        if trapnr == 2:
            return
        if regs.cpl == 0:
            fixup = self.extable.get(regs.rip)
            if fixup is not None:
                regs.rip = fixup
                self.fixups += 1
                return
        cs = _KERNEL_CS if regs.cpl == 0 else (0x30 if regs.mode == 64 else 0x20) | regs.cpl
        # Early IDT stubs push a dummy error code 0 for vectors without one.
        msg = f"PANIC: early exception {trapnr:#04x} IP {cs:x}:{regs.rip:x} error 0 cr2 0x0"
        if cause is not None:
            msg += f"\n(cause: {cause.detail})"
        elif regs.cpl != 0:
            msg += "\n(cause: CS is not the kernel CS)"
        raise EarlyPanic(msg, regs=regs.copy(), vector=trapnr,
                         reason=cause.reason if cause is not None else "no-handler")

    # ------------------------------------------------------------ normal path
    def handle_ve(self, regs: Regs) -> None:
        """``exc_virtualization_exception``: the #VE IDT handler (ref 1.6).

        VEINFO.GET, then dispatch on the exit reason (ref 1.9). Kernel mode:
        port I/O (30), HLT (12), RDMSR (31), WRMSR (32), CPUID (10); user mode
        (CPL 3): CPUID only. On success RIP += the instruction length from the
        VE info.

        :raises VeFault: the sub-handler failed or the reason is not handled
            (``ve_raise_fault``: a kernel oops, or SIGSEGV for user mode); a
            kernel-mode failure with an :attr:`extable` entry is fixed up
            instead. RIP is unchanged; RAX as the profile leaves it.
        :raises UnsupportedExitError: EPT violation (48, MMIO), not modelled yet.
        :raises GuestPanic: VEINFO.GET or a TDVMCALL's TDCALL failed.
        :raises GuestMemoryFault, StringIoLimitError: emulated string I/O only.
        """
        _check_regs(regs)
        self._ctx = regs
        try:
            ve = self.get_ve_info()
            length = self._dispatch(regs, ve)
        except _Fail as fail:
            self._ve_raise_fault(regs, fail)
            return
        finally:
            self._ctx = None
        regs.rip = (regs.rip + length) & U64_MASK

    def _dispatch(self, regs: Regs, ve: VeInfo) -> int:
        reason = ve.exit_reason
        if reason == ExitReason.EPT_VIOLATION:
            raise UnsupportedExitError(
                f"EPT violation #VE (MMIO at GPA {ve.gpa:#x}, GLA {ve.gla:#x}) is not modelled yet",
                regs=regs.copy(), vector=VECTOR_VE, reason="ept-violation")
        if regs.cpl == 3:
            # virt_exception_user: CPUID only; port I/O -> SIGSEGV (ref 1.6, 1.9).
            if reason == ExitReason.CPUID:
                return self._handle_cpuid(regs, ve)
            if reason == ExitReason.IO_INSTRUCTION:
                raise _Fail("user-io", _USER_IO_DETAIL)
            raise _Fail("unexpected-exit", f"Unexpected #VE: {reason}")
        if reason == ExitReason.IO_INSTRUCTION:
            return self._handle_io(regs, ve)
        if reason == ExitReason.HLT:
            return self._handle_halt(regs, ve)
        if reason == ExitReason.MSR_READ:
            return self._read_msr(regs, ve)
        if reason == ExitReason.MSR_WRITE:
            return self._write_msr(regs, ve)
        if reason == ExitReason.CPUID:
            return self._handle_cpuid(regs, ve)
        raise _Fail("unexpected-exit", f"Unexpected #VE: {reason}")

    def _ve_raise_fault(self, regs: Regs, fail: _Fail) -> None:
        # ve_raise_fault (traps.c): user -> SIGSEGV; kernel -> exception-table
        # fixup if any, else die("VE fault") (ref 1.6 step 4).
        if regs.cpl == 3:
            raise VeFault(f"VE fault: {fail.detail} (SIGSEGV to user space at RIP {regs.rip:#x})",
                          regs=regs.copy(), vector=VECTOR_VE, reason=fail.reason)
        fixup = self.extable.get(regs.rip)
        if fixup is not None:
            regs.rip = fixup
            self.fixups += 1
            return None
        raise VeFault(f"VE fault: {fail.detail} (kernel oops at RIP {regs.rip:#x})",
                      regs=regs.copy(), vector=VECTOR_VE, reason=fail.reason)

    # ------------------------------------------------------------ sub-handlers
    def _handle_io(self, regs: Regs, ve: VeInfo) -> int:
        # handle_io works on a u32 copy of the qualification and decodes it
        # without validation: size = bits 2:0 + 1, port = bits 31:16 (ref 1.3, 1.4).
        q = core.decode_exit_qual(ve.exit_qual & _U32, strict=False)
        if q.is_string:
            if self.string_io == "reject":
                raise _Fail("string-io", "string I/O (INS/OUTS, exit-qualification bit 4) "
                                         "is not handled")
            self._string_io(regs, ve, q.size, q.is_in, q.is_rep, q.port)
            return ve.instr_len
        size = q.size
        port = q.port
        allowed = self._allowed
        if allowed is not None and not allowed(port):
            # Intel's hardened guest: denied IN reads all-ones, denied OUT is
            # dropped, both succeed without a TDVMCALL (ref 1.11).
            if q.is_in:
                regs.set_gpr(Gpr.RAX, self._merge(regs.rax, UINT_MAX, size, True))
            return ve.instr_len
        if q.is_in:
            t = self._hypercall(TdvmcallSubfn.IO, size, 0, port)
            status = t.r10
            regs.set_gpr(Gpr.RAX, self._merge(regs.rax, t.r11, size, status == 0))
            if status:
                raise _Fail("io-failed", f"IN {size} byte(s) from port {port:#x}: "
                                         f"host returned status {status:#x}")
        else:
            t = self._hypercall(TdvmcallSubfn.IO, size, 1, port, self._out(regs.rax, size))
            status = t.r10
            if status:
                raise _Fail("io-failed", f"OUT {size} byte(s) to port {port:#x}: "
                                         f"host returned status {status:#x}")
        return ve.instr_len

    def _handle_halt(self, regs: Regs, ve: VeInfo) -> int:
        # handle_halt: TDVMCALL HLT, R12 = "IRQs disabled" of the interrupted
        # context (the #VE handler re-enables IRQs only if it had IF set; ref 1.9).
        irq_disabled = 0 if regs.rflags & _RFLAGS_IF else 1
        t = self._hypercall(TdvmcallSubfn.HLT, irq_disabled)
        if t.r10:
            raise _Fail("hlt-failed", f"HLT: host returned status {t.r10:#x}")
        return ve.instr_len

    def _read_msr(self, regs: Regs, ve: VeInfo) -> int:
        # read_msr: R12 = regs->cx; RAX/RDX = lower/upper 32 bits of R11.
        msr = regs.rcx & _U32 if self._arch else regs.rcx
        t = self._hypercall(TdvmcallSubfn.RDMSR, msr)
        if t.r10:
            raise _Fail("msr-failed", f"RDMSR {msr:#x}: host returned status {t.r10:#x}")
        regs.set_gpr(Gpr.RAX, t.r11 & _U32)
        regs.set_gpr(Gpr.RDX, t.r11 >> 32)
        return ve.instr_len

    def _write_msr(self, regs: Regs, ve: VeInfo) -> int:
        # write_msr: R13 = (u64)regs->dx << 32 | regs->ax -- Linux ORs in the
        # whole RAX, so its bits 63:32 leak into the value; hardware WRMSR uses
        # EDX:EAX only.
        if self._arch:
            msr = regs.rcx & _U32
            value = ((regs.rdx & _U32) << 32) | (regs.rax & _U32)
        else:
            msr = regs.rcx
            value = ((regs.rdx << 32) & U64_MASK) | regs.rax
        t = self._hypercall(TdvmcallSubfn.WRMSR, msr, value)
        if t.r10:
            raise _Fail("msr-failed", f"WRMSR {msr:#x}: host returned status {t.r10:#x}")
        return ve.instr_len

    def _handle_cpuid(self, regs: Regs, ve: VeInfo) -> int:
        # handle_cpuid: only leaves 0x40000000-0x4FFFFFFF go to the VMM; any
        # other leaf reads as all zeros (ref 1.9). Linux compares and copies
        # full 64-bit registers; CPUID itself uses EAX/ECX and zero-extends.
        leaf = regs.rax & _U32 if self._arch else regs.rax
        subleaf = regs.rcx & _U32 if self._arch else regs.rcx
        if leaf < 0x40000000 or leaf > 0x4FFFFFFF:
            for n in (Gpr.RAX, Gpr.RBX, Gpr.RCX, Gpr.RDX):
                regs.set_gpr(n, 0)
            return ve.instr_len
        t = self._hypercall(TdvmcallSubfn.CPUID, leaf, subleaf)
        if t.r10:
            raise _Fail("cpuid-failed", f"CPUID {leaf:#x}.{subleaf:#x}: host returned status "
                                        f"{t.r10:#x}")
        out_mask = _U32 if self._arch else U64_MASK
        regs.set_gpr(Gpr.RAX, t.r12 & out_mask)
        regs.set_gpr(Gpr.RBX, t.r13 & out_mask)
        regs.set_gpr(Gpr.RCX, t.r14 & out_mask)
        regs.set_gpr(Gpr.RDX, t.r15 & out_mask)
        return ve.instr_len

    # ------------------------------------------------------------ string I/O
    def _string_io(self, regs: Regs, ve: VeInfo, size: int, is_in: bool, rep: bool,
                   port: int) -> None:
        # Architectural INS/OUTS (SDM INS/OUTS, ref 3.2-3.4): address size and
        # (OUTS) segment from the VM-exit instruction information, count from
        # rCX at the address size when REP, direction from RFLAGS.DF.
        info = ve.instr_info
        acode = (info >> 7) & 7
        if acode > 2:
            raise _Fail("bad-instr-info", f"instruction information {info:#x}: address-size "
                                          f"field {acode} is not 16/32/64-bit")
        abits = 16 << acode
        amask = (1 << abits) - 1
        if is_in:
            segment = Segment.ES            # INS always writes ES:rDI (ref 3.3)
        else:
            seg = (info >> 15) & 7
            if seg > 5:
                raise _Fail("bad-instr-info", f"instruction information {info:#x}: segment "
                                              f"field {seg} is not ES/CS/SS/DS/FS/GS")
            segment = Segment(seg)
        # Only FS and GS have non-zero bases in 64-bit mode; the register file
        # carries no other segment bases, so ES/CS/SS/DS are flat (base 0).
        base = regs.fs_base if segment == Segment.FS else (
            regs.gs_base if segment == Segment.GS else 0)
        lin_mask = U64_MASK if regs.mode == 64 else _U32
        count = regs.rcx & amask if rep else 1
        if count == 0:
            return                          # REP with rCX = 0: nothing, instruction retires
        if self.max_rep is not None and count > self.max_rep:
            raise StringIoLimitError(
                f"{'REP INS' if is_in else 'REP OUTS'} of {count} elements exceeds "
                f"max_rep={self.max_rep}; nothing transferred (raise Guest.max_rep or use None)",
                regs=regs.copy(), vector=VECTOR_VE, reason="max-rep")
        step = -size if regs.df else size
        ptr_reg = Gpr.RDI if is_in else Gpr.RSI
        ptr0 = regs.gpr(ptr_reg)
        off = ptr0 & amask
        width_mask = (1 << (8 * size)) - 1
        allowed = self._allowed is None or self._allowed(port)
        mem = self.memory
        done = 0
        try:
            while done < count:
                addr = (base + off) & lin_mask
                if is_in:
                    _mem_access(mem.read, addr, size, is_in)  # fault before the port read
                    if allowed:
                        t = self._hypercall(TdvmcallSubfn.IO, size, 0, port)
                        if t.r10:
                            raise _Fail("io-failed", f"INS element {done} of {count} from port "
                                                     f"{port:#x}: host returned status {t.r10:#x}")
                        value = t.r11 & width_mask
                    else:
                        value = UINT_MAX & width_mask
                    _mem_access(mem.write, addr, value.to_bytes(size, "little"), is_in)
                else:
                    data = _mem_access(mem.read, addr, size, is_in)
                    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != size:
                        raise InvalidArgumentError(
                            f"GuestMemory.read({addr:#x}, {size}) must return {size} bytes, "
                            f"got {data!r:.60}")
                    if allowed:
                        t = self._hypercall(TdvmcallSubfn.IO, size, 1, port,
                                            int.from_bytes(data, "little"))
                        if t.r10:
                            raise _Fail("io-failed", f"OUTS element {done} of {count} to port "
                                                     f"{port:#x}: host returned status {t.r10:#x}")
                off = (off + step) & amask
                done += 1
        except _MemFault as mf:
            _string_writeback(regs, ptr_reg, ptr0, off, abits, rep, count, done)
            raise GuestMemoryFault(
                f"{'INS' if is_in else 'OUTS'} element {done} of {count}: {mf}; "
                f"{done} element(s) completed, RIP unchanged",
                regs=regs.copy(), vector=14, reason="string-memory") from mf.__cause__
        except BaseException:
            _string_writeback(regs, ptr_reg, ptr0, off, abits, rep, count, done)
            raise
        _string_writeback(regs, ptr_reg, ptr0, off, abits, rep, count, done)


class _MemFault(Exception):
    """Guest memory raised IndexError (internal; becomes GuestMemoryFault)."""


def _mem_access(fn: Callable[[int, Any], Any], addr: int, arg: Any, is_in: bool) -> Any:
    try:
        return fn(addr, arg)
    except IndexError as exc:
        n = arg if isinstance(arg, int) else len(arg)
        what = "write" if is_in else "read"     # INS faults on its destination, OUTS on its source
        raise _MemFault(f"{n}-byte {what} at linear address {addr:#x} faults ({exc})") from exc


def _string_writeback(regs: Regs, ptr_reg: int, ptr0: int, off: int, abits: int,
                      rep: bool, count: int, done: int) -> None:
    # Registers as hardware leaves them after `done` elements: a 16-bit
    # address size updates SI/DI/CX only, a 32-bit one writes ESI/EDI/ECX
    # (zero-extended into the 64-bit register), 64-bit the whole register.
    if done == 0:
        return
    regs.set_gpr(ptr_reg, address_size_write(ptr0, off, abits))
    if rep:
        regs.set_gpr(Gpr.RCX, address_size_write(regs.rcx, count - done, abits))


def _check_regs(regs: Any) -> Regs:
    if not isinstance(regs, Regs):
        raise InvalidArgumentError(f"regs must be a tdxve.Regs, got {type(regs).__name__}")
    return regs
