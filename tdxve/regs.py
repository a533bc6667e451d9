"""The guest register file.

:class:`Regs` holds the 16 general-purpose registers, RIP and RFLAGS as
unsigned 64-bit Python ints, plus the processor ``mode`` (16/32/64), the
current privilege level ``cpl`` (0-3) and the FS/GS segment bases. Every write
is checked: a value that is not an int in ``[0, 2**64)`` raises
:class:`tdxve.errors.RegisterValueError` naming the register and the value, and
leaves the register unchanged.

GPRs are also addressable by their number in the TDG.VP.VMCALL RCX select
bitmap order (RAX=0, RCX=1, RDX=2, RBX=3, RSP=4, RBP=5, RSI=6, RDI=7,
R8..R15; ref 2.4): ``regs.gpr(n)`` / ``regs.set_gpr(n, v)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from .abi import U64_MASK
from .errors import RegisterValueError, UnsupportedModeError

__all__ = ["Regs", "GPR_NAMES", "address_size_write"]

#: GPR names in VMCALL bitmap / ModRM numbering (ref 2.4).
GPR_NAMES: tuple[str, ...] = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)
_GPR_INDEX = {n: i for i, n in enumerate(GPR_NAMES)}
#: Every 64-bit register in a fixed order (the order of ``as_dict`` / ``__iter__``).
REG_NAMES: tuple[str, ...] = GPR_NAMES + ("rip", "rflags", "fs_base", "gs_base")


def address_size_write(old: int, new: int, abits: int) -> int:
    """The register a string instruction leaves after updating rSI/rDI/rCX to ``new``.

    The address size picks the register width: 16-bit updates only SI/DI/CX
    (bits 63:16 kept), 32-bit writes ESI/EDI/ECX zero-extended into the
    64-bit register (SDM Vol. 1 3.4.1.1), 64-bit the whole register.
    """
    if abits == 64:
        return new & U64_MASK
    if abits == 32:
        return new & 0xFFFFFFFF
    return (old & ~0xFFFF & U64_MASK) | (new & 0xFFFF)


def _check_u64(name: str, value: Any) -> int:
    # bool is an int subclass but never a meaningful register value.
    if type(value) is not int:
        if isinstance(value, int) and not isinstance(value, bool):
            value = int(value)
        else:
            raise RegisterValueError(
                f"{name} must be an int in [0, 2**64), got {type(value).__name__} {value!r}")
    if value < 0 or value > U64_MASK:
        raise RegisterValueError(f"{name} must be in [0, 2**64), got {value:#x}"
                                 if value >= 0 else f"{name} must be in [0, 2**64), got {value}")
    return int(value)


def _gpr_property(idx: int, name: str) -> property:
    def get(self: Regs) -> int:
        return self._g[idx]

    def set(self: Regs, value: int) -> None:
        self._g[idx] = value if type(value) is int and 0 <= value <= U64_MASK else _check_u64(name, value)

    return property(get, set, doc=f"{name.upper()} (unsigned 64-bit)")


class Regs:
    """Guest register file: 16 GPRs, RIP, RFLAGS, mode, CPL, FS/GS bases.

    :param mode: 16, 32 or 64 (default 64: TDX guests run in 64-bit mode).
    :param cpl: current privilege level, 0-3 (default 0, kernel).
    :param values: initial register values by name (``rax=…, rip=…``).
    :raises RegisterValueError: a value is not an int in ``[0, 2**64)``.
    :raises UnsupportedModeError: ``mode`` is not 16, 32 or 64.
    :raises InvalidArgumentError: ``cpl`` is not 0-3, or an unknown register name.
    """

    if not TYPE_CHECKING:
        # Hidden from type checkers, which would otherwise reject the GPR
        # attributes below (properties attached after the class body).
        __slots__ = ("_g", "_rip", "_rflags", "_fs_base", "_gs_base", "_mode", "_cpl")

    # The 16 GPRs: properties generated at the end of this module.
    rax: int
    rcx: int
    rdx: int
    rbx: int
    rsp: int
    rbp: int
    rsi: int
    rdi: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int

    def __init__(self, *, mode: int = 64, cpl: int = 0, **values: int) -> None:
        self._g: list[int] = [0] * 16
        self._rip = 0
        self._rflags = 0x2          # bit 1 is always 1 (SDM Vol. 1 3.4.3)
        self._fs_base = 0
        self._gs_base = 0
        self._mode = 64
        self._cpl = 0
        self.mode = mode
        self.cpl = cpl
        for name, value in values.items():
            if name not in REG_NAMES:
                from .errors import InvalidArgumentError
                raise InvalidArgumentError(f"unknown register {name!r}")
            setattr(self, name, value)

    # ------------------------------------------------------------ non-GPRs
    @property
    def rip(self) -> int:
        """RIP (unsigned 64-bit)."""
        return self._rip

    @rip.setter
    def rip(self, value: int) -> None:
        self._rip = value if type(value) is int and 0 <= value <= U64_MASK else _check_u64("rip", value)

    @property
    def rflags(self) -> int:
        """RFLAGS (unsigned 64-bit)."""
        return self._rflags

    @rflags.setter
    def rflags(self, value: int) -> None:
        self._rflags = _check_u64("rflags", value)

    @property
    def fs_base(self) -> int:
        """FS segment base (used by 64-bit string I/O with an FS override)."""
        return self._fs_base

    @fs_base.setter
    def fs_base(self, value: int) -> None:
        self._fs_base = _check_u64("fs_base", value)

    @property
    def gs_base(self) -> int:
        """GS segment base (used by 64-bit string I/O with a GS override)."""
        return self._gs_base

    @gs_base.setter
    def gs_base(self, value: int) -> None:
        self._gs_base = _check_u64("gs_base", value)

    @property
    def mode(self) -> int:
        """Processor mode: 16, 32 or 64."""
        return self._mode

    @mode.setter
    def mode(self, value: int) -> None:
        if type(value) is not int or value not in (16, 32, 64):
            raise UnsupportedModeError(f"mode must be 16, 32 or 64, got {value!r}")
        self._mode = value

    @property
    def cpl(self) -> int:
        """Current privilege level, 0 (kernel) to 3 (user)."""
        return self._cpl

    @cpl.setter
    def cpl(self, value: int) -> None:
        if type(value) is not int or not 0 <= value <= 3:
            from .errors import InvalidArgumentError
            raise InvalidArgumentError(f"cpl must be 0, 1, 2 or 3, got {value!r}")
        self._cpl = value

    @property
    def df(self) -> bool:
        """RFLAGS.DF (bit 10), the string-instruction direction flag."""
        return bool(self._rflags & 0x400)

    @property
    def tf(self) -> bool:
        """RFLAGS.TF (bit 8), the single-step trap flag."""
        return bool(self._rflags & 0x100)

    # ------------------------------------------------------------ GPR by number
    def gpr(self, n: int) -> int:
        """GPR number ``n`` (0-15) in VMCALL bitmap order (RAX, RCX, RDX, RBX, RSP, …)."""
        return self._g[n]

    def set_gpr(self, n: int, value: int) -> None:
        """Set GPR number ``n`` (0-15); the value is checked like any register write."""
        self._g[n] = _check_u64(GPR_NAMES[n], value)

    # ------------------------------------------------------------ whole-state helpers
    def copy(self) -> Regs:
        """An independent copy."""
        r = Regs.__new__(Regs)
        r._g = self._g.copy()
        r._rip = self._rip
        r._rflags = self._rflags
        r._fs_base = self._fs_base
        r._gs_base = self._gs_base
        r._mode = self._mode
        r._cpl = self._cpl
        return r

    def as_dict(self) -> dict[str, int]:
        """All 64-bit registers plus ``mode`` and ``cpl`` by name."""
        d = {name: getattr(self, name) for name in REG_NAMES}
        d["mode"] = self._mode
        d["cpl"] = self._cpl
        return d

    def update(self, **values: int) -> None:
        """Set several registers; all are validated before any is written."""
        for name, value in values.items():
            if name not in REG_NAMES:
                from .errors import InvalidArgumentError
                raise InvalidArgumentError(f"unknown register {name!r}")
            _check_u64(name, value)
        for name, value in values.items():
            setattr(self, name, value)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self.as_dict().items())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Regs):
            return NotImplemented
        return (self._g == other._g and self._rip == other._rip
                and self._rflags == other._rflags and self._fs_base == other._fs_base
                and self._gs_base == other._gs_base and self._mode == other._mode
                and self._cpl == other._cpl)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def diff(self, other: Regs) -> dict[str, tuple[int, int]]:
        """Registers that differ: ``{name: (self_value, other_value)}``."""
        a, b = self.as_dict(), other.as_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    def __repr__(self) -> str:
        parts = [f"{n}={getattr(self, n):#x}" for n in REG_NAMES if getattr(self, n)]
        return f"Regs(mode={self._mode}, cpl={self._cpl}{', ' if parts else ''}{', '.join(parts)})"


for _i, _n in enumerate(GPR_NAMES):
    setattr(Regs, _n, _gpr_property(_i, _n))
del _i, _n
