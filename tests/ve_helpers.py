"""Test doubles shared by the #VE-model tests (no tests here).

Test files import it as ``import ve_helpers as H`` (``tests/`` is on
pytest's ``pythonpath``; the name does not start with ``test_``, so pytest
does not collect it).

``KvmHost`` is a host that follows KVM's ``tdx_emulate_io`` (ref 5.2)
closely enough to test the guest against: size not in {1, 2, 4} or direction
not in {0, 1} -> R10 = INVALID_OPERAND; the port is truncated to 16 bits; an
OUT uses the low ``size`` bytes of R15; an IN returns the data zero-extended
in R11; on success R10 is *not* written (the guest passed 0). It also serves
HLT, RDMSR, WRMSR and CPUID, records every host-visible register image, and
can be told to answer the next calls with an exact (R10, R11) pair.
"""

from __future__ import annotations

from typing import Any

from tdxve.regs import Regs

INVALID_OPERAND = 0x8000000000000000
SUBFUNC_UNSUPPORTED = 0x8000000000000003


class KvmHost:
    """A KVM-like TDVMCALL server with latch devices (see module docstring).

    ``ports`` maps a port to the value an IN returns (before truncation to
    the access size); an OUT stores its (truncated) value there, so every
    port is a latch. Unknown ports read as all-ones, like QEMU's unassigned
    I/O (anchors 2.3). ``replies`` is a list of (r10, r11) pairs; while it is
    non-empty each Instruction.IO call pops one and writes both registers
    verbatim (after recording), bypassing validation and devices.
    """

    def __init__(self, ports: dict[int, int] | None = None) -> None:
        self.ports: dict[int, int] = dict(ports or {})
        self.calls: list[Regs] = []
        self.io: list[tuple[str, int, int, int]] = []     # (dir, port, size, value)
        self.replies: list[tuple[int, int]] = []
        self.msrs: dict[int, int] = {}
        self.cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self.halts: list[int] = []

    def tdvmcall(self, regs: Regs) -> None:
        self.calls.append(regs.copy())
        if regs.r10 != 0:
            regs.r10 = SUBFUNC_UNSUPPORTED
            return
        fn = regs.r11
        if fn == 30:
            self._io(regs)
        elif fn == 12:
            self.halts.append(regs.r12)
        elif fn == 31:
            if regs.r12 in self.msrs:
                regs.r11 = self.msrs[regs.r12]
            else:
                regs.r10 = INVALID_OPERAND
        elif fn == 32:
            self.msrs[regs.r12] = regs.r13
        elif fn == 10:
            out = self.cpuid.get((regs.r12, regs.r13))
            if out is None:
                regs.r10 = INVALID_OPERAND
            else:
                regs.r12, regs.r13, regs.r14, regs.r15 = out
        else:
            regs.r10 = SUBFUNC_UNSUPPORTED

    def _io(self, regs: Regs) -> None:
        if self.replies:
            r10, r11 = self.replies.pop(0)
            regs.r10 = r10
            regs.r11 = r11
            return
        size, write, port = regs.r12, regs.r13, regs.r14 & 0xFFFF
        if write not in (0, 1) or size not in (1, 2, 4):
            regs.r10 = INVALID_OPERAND
            return
        mask = (1 << (8 * size)) - 1
        if write:
            value = regs.r15 & mask
            self.ports[port] = value
            self.io.append(("out", port, size, value))
        else:
            value = self.ports.get(port, 0xFFFFFFFF) & mask
            regs.r11 = value
            self.io.append(("in", port, size, value))

    @property
    def last(self) -> Regs:
        return self.calls[-1]


class AnySizeHost(KvmHost):
    """Like KvmHost but accepts every size 1..8 (to reach the success merge of impossible sizes)."""

    def _io(self, regs: Regs) -> None:
        if self.replies:
            super()._io(regs)
            return
        size, write, port = regs.r12, regs.r13, regs.r14 & 0xFFFF
        mask = (1 << (8 * size)) - 1
        if write:
            self.ports[port] = regs.r15 & mask
        else:
            regs.r11 = self.ports.get(port, 0) & mask


def regs_snapshot(regs: Regs) -> dict[str, Any]:
    return regs.as_dict()
