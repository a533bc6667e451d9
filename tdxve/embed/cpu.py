"""Drive a :class:`tdxve.machine.Machine` from any CPU simulator.

A simulator implements :class:`GuestCpu` (mode, CPL, registers by name,
memory by linear address) and calls :func:`execute_port_io` when its CPU is
about to execute a port-I/O instruction (IN, OUT, INS, OUTS) -- before the
instruction has any effect, exactly where a TD's VM exit happens (ref 2.2).
``execute_port_io`` then does what the real machine would:

* in **64-bit mode** the instruction goes through the whole TDX path
  (:meth:`Machine.execute`): VE info and #VE, the guest's early or normal
  handler, TDG.VP.VMCALL<Instruction.IO> served by the host, the profile's
  RAX merge and RIP advance. A guest fault is raised after the simulator's
  registers have been set to the state at the fault.
* in **real mode and 16/32-bit protected mode** (firmware before the switch
  to long mode) there is no #VE: TDCALL exists only in 64-bit mode (ref 2.1),
  so the access goes straight to the host's devices through
  ``machine.host.bus`` and the instruction completes architecturally.

References "ref N.M" are sections of ``shared/reference/tdx-port-io.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol, runtime_checkable

from .._backend import core
from ..abi import MAX_INSN_LENGTH, U64_MASK, IoInsn, IoKind, Segment
from ..errors import (
    EmbedError,
    GuestFault,
    GuestMemoryFault,
    InvalidArgumentError,
    TruncatedInputError,
    UnsupportedModeError,
)
from ..regs import GPR_NAMES, Regs, address_size_write

__all__ = [
    "GuestCpu", "IoEvent", "IoStats", "IoCounts", "ExitCounts",
    "execute_port_io", "execute_halt", "cpu_mode", "cpu_cpl", "mode_label",
    "usable_code_descriptor", "fetch_code", "bound_memory", "REGISTER_NAMES", "SEGMENT_BASE_NAMES",
]

#: The registers :func:`execute_port_io` reads and writes, by the names
#: :class:`GuestCpu` uses (the 16 GPRs in VMCALL order, RIP, RFLAGS and the
#: FS/GS bases that 64-bit string I/O uses).
REGISTER_NAMES: tuple[str, ...] = GPR_NAMES + ("rip", "rflags", "fs_base", "gs_base")
#: Segment-base register names by :class:`tdxve.Segment` number. Outside
#: 64-bit mode, string I/O reads the base of the segment it uses and the
#: instruction fetch reads ``cs_base``.
SEGMENT_BASE_NAMES: tuple[str, ...] = ("es_base", "cs_base", "ss_base", "ds_base",
                                       "fs_base", "gs_base")

_U32 = 0xFFFFFFFF
_RFLAGS_DF = 1 << 10
_RFLAGS_VM = 1 << 17
_CR0_PE = 1
_EFER_LMA = 1 << 10
# Code-segment descriptor bits (SDM Vol. 3A 3.4.5, 5.2.1): S (44), code (43),
# P (47), L (53: 64-bit code), D/B (54: default operand size 32).
_DESC_S = 1 << 44
_DESC_CODE = 1 << 43
_DESC_P = 1 << 47
_DESC_L = 1 << 53
_DESC_D = 1 << 54


# ==========================================================================
# The protocol
# ==========================================================================
@runtime_checkable
class GuestCpu(Protocol):
    """What :func:`execute_port_io` needs from a simulator's CPU.

    * ``mode``: the decode mode, 16, 32 or 64 (see :func:`cpu_mode` for how
      to derive it from CR0.PE, EFER.LMA and the CS descriptor).
    * ``cpl``: the current privilege level, 0-3 (:func:`cpu_cpl`).
    * ``read_registers(names)``: the values of the named registers, in order,
      as unsigned ints. Names: :data:`REGISTER_NAMES`; outside 64-bit mode
      also ``cs_base`` (instruction fetch) and, for INS/OUTS, the base of the
      segment used (:data:`SEGMENT_BASE_NAMES`).
    * ``write_registers(values)``: set the named registers (only those that
      changed are passed).
    * ``read_memory(addr, size)`` / ``write_memory(addr, data)``: guest
      memory by **linear** address (the simulator applies paging). An
      address that cannot be accessed raises :class:`IndexError`, as the
      :class:`tdxve.guest.GuestMemory` protocol does.
    """

    @property
    def mode(self) -> int: ...

    @property
    def cpl(self) -> int: ...

    def read_registers(self, names: Sequence[str]) -> Sequence[int]: ...

    def write_registers(self, values: Mapping[str, int]) -> None: ...

    def read_memory(self, addr: int, size: int) -> bytes: ...

    def write_memory(self, addr: int, data: bytes) -> None: ...


# ==========================================================================
# Mode and CPL from architectural state
# ==========================================================================
def usable_code_descriptor(desc: int) -> bool:
    """Whether an 8-byte GDT/LDT entry is a present code-segment descriptor."""
    return bool(desc & _DESC_P and desc & _DESC_S and desc & _DESC_CODE)


def cpu_mode(*, cr0: int, efer: int, rflags: int, cs_descriptor: int | None,
             fallback: int = 64) -> int:
    """The decode mode (16, 32 or 64) the CPU is in.

    Real mode (CR0.PE = 0) and virtual-8086 mode (RFLAGS.VM) decode as 16-bit.
    In protected mode the CS descriptor decides: L = 1 with EFER.LMA = 1 is
    64-bit mode; otherwise D = 1 is 32-bit and D = 0 16-bit code (SDM Vol. 3A
    5.2.1; Vol. 1 3.6.1). In compatibility mode (LMA = 1, L = 0) D decides too.

    :param cr0: CR0.
    :param efer: IA32_EFER (bit 10 is LMA).
    :param rflags: RFLAGS (bit 17 is VM).
    :param cs_descriptor: the 8-byte CS descriptor, or None when it cannot be
        read (no usable GDT entry: e.g. Unicorn's synthetic initial state).
    :param fallback: the mode to report in protected mode without a usable
        descriptor.
    :returns: 16, 32 or 64.
    :raises UnsupportedModeError: ``fallback`` is not 16, 32 or 64.
    """
    if fallback not in (16, 32, 64):
        raise UnsupportedModeError(f"fallback mode must be 16, 32 or 64, got {fallback!r}")
    if not cr0 & _CR0_PE or rflags & _RFLAGS_VM:
        return 16
    if cs_descriptor is None or not usable_code_descriptor(cs_descriptor):
        return fallback
    if efer & _EFER_LMA and cs_descriptor & _DESC_L:
        return 64
    return 32 if cs_descriptor & _DESC_D else 16


def mode_label(*, cr0: int, efer: int, rflags: int, cs_descriptor: int | None,
               fallback: int = 64) -> str:
    """A human label for the CPU mode: ``"real"``, ``"virtual-8086"``,
    ``"protected-16"``, ``"protected-32"``, ``"compatibility-16"``,
    ``"compatibility-32"`` or ``"64-bit"`` (arguments as :func:`cpu_mode`)."""
    if not cr0 & _CR0_PE:
        return "real"
    if rflags & _RFLAGS_VM:
        return "virtual-8086"
    mode = cpu_mode(cr0=cr0, efer=efer, rflags=rflags, cs_descriptor=cs_descriptor, fallback=fallback)
    if mode == 64:
        return "64-bit"
    return f"{'compatibility' if efer & _EFER_LMA else 'protected'}-{mode}"


def cpu_cpl(*, cr0: int, rflags: int, cs_selector: int) -> int:
    """The current privilege level: 0 in real mode, 3 in virtual-8086 mode,
    else the RPL of CS (which equals the CPL after any CS load, SDM Vol. 3A 5.5)."""
    if not cr0 & _CR0_PE:
        return 0
    if rflags & _RFLAGS_VM:
        return 3
    return cs_selector & 3


# ==========================================================================
# Events and counters
# ==========================================================================
class IoEvent(NamedTuple):
    """One port-I/O instruction as the embedding layer handled it.

    :ivar rip: RIP of the instruction.
    :ivar mode: the decode mode (16, 32 or 64).
    :ivar insn: the decoded instruction.
    :ivar port: the port (imm8 or DX).
    :ivar is_in: IN/INS.
    :ivar size: access size in bytes.
    :ivar elements: elements transferred (1 for IN/OUT).
    :ivar via_ve: True when it went through #VE (64-bit mode), False for a
        direct access to the host's bus.
    :ivar tdvmcalls: TDG.VP.VMCALLs that reached the host.
    :ivar exit_qual: the exit qualification in the VE info (None if direct).
    :ivar next_rip: RIP afterwards.
    :ivar ves: #VEs delivered (0 if direct; more than 1 only when a handler
        left RIP in place and the instruction exited again).
    """

    rip: int
    mode: int
    insn: IoInsn
    port: int
    is_in: bool
    size: int
    elements: int
    via_ve: bool
    tdvmcalls: int
    exit_qual: int | None
    next_rip: int
    ves: int


class IoCounts(NamedTuple):
    """Counters for one (port, direction): #VEs, TDVMCALLs, direct accesses."""

    ves: int
    tdvmcalls: int
    direct: int


class ExitCounts(NamedTuple):
    """Counters for a non-I/O exit reason (e.g. HLT): #VEs and TDVMCALLs."""

    ves: int
    tdvmcalls: int


class IoStats:
    """#VEs, TDVMCALLs and direct accesses per port and direction.

    ``ports()`` gives ``{(port, is_in): IoCounts}``; ``exits()`` the non-I/O
    exit reasons (HLT) that went through #VE. Direct accesses are the ones
    made outside 64-bit mode, which reach the host's bus without a #VE; each
    element of a string instruction counts as one.
    """

    __slots__ = ("_ports", "_exits")

    def __init__(self) -> None:
        self._ports: dict[tuple[int, bool], list[int]] = {}
        self._exits: dict[int, list[int]] = {}

    def add_ve(self, port: int, is_in: bool, tdvmcalls: int, ves: int = 1) -> None:
        """Count ``ves`` #VEs for ``port`` (more than one when a handler left
        RIP in place and the instruction exited again) and their TDVMCALLs."""
        c = self._ports.get((port, is_in))
        if c is None:
            c = self._ports[(port, is_in)] = [0, 0, 0]
        c[0] += ves
        c[1] += tdvmcalls

    def add_direct(self, port: int, is_in: bool, accesses: int = 1) -> None:
        """Count direct (no #VE) accesses to ``port``."""
        c = self._ports.get((port, is_in))
        if c is None:
            c = self._ports[(port, is_in)] = [0, 0, 0]
        c[2] += accesses

    def add_exit(self, reason: int, tdvmcalls: int, ves: int = 1) -> None:
        """Count ``ves`` #VEs for a non-I/O exit reason (HLT, ...) and their TDVMCALLs."""
        c = self._exits.get(reason)
        if c is None:
            c = self._exits[reason] = [0, 0]
        c[0] += ves
        c[1] += tdvmcalls

    def add(self, event: IoEvent) -> None:
        """Count an :class:`IoEvent` returned by :func:`execute_port_io`."""
        if event.via_ve:
            self.add_ve(event.port, event.is_in, event.tdvmcalls, event.ves)
        else:
            self.add_direct(event.port, event.is_in, event.elements)

    def ports(self) -> dict[tuple[int, bool], IoCounts]:
        """``{(port, is_in): IoCounts}`` sorted by port, reads first."""
        return {k: IoCounts(*self._ports[k]) for k in sorted(self._ports, key=lambda k: (k[0], not k[1]))}

    def exits(self) -> dict[int, ExitCounts]:
        """``{exit_reason: ExitCounts}`` for non-I/O #VEs."""
        return {k: ExitCounts(*v) for k, v in sorted(self._exits.items())}

    @property
    def ves(self) -> int:
        """All #VEs (port I/O and other exit reasons)."""
        return sum(c[0] for c in self._ports.values()) + sum(c[0] for c in self._exits.values())

    @property
    def tdvmcalls(self) -> int:
        """All TDG.VP.VMCALLs the counted #VEs made."""
        return sum(c[1] for c in self._ports.values()) + sum(c[1] for c in self._exits.values())

    @property
    def direct(self) -> int:
        """All direct (non-64-bit) port accesses."""
        return sum(c[2] for c in self._ports.values())

    def reset(self) -> None:
        """Forget everything."""
        self._ports.clear()
        self._exits.clear()

    def __repr__(self) -> str:
        return f"IoStats(ves={self.ves}, tdvmcalls={self.tdvmcalls}, direct={self.direct})"


# ==========================================================================
# Machine plumbing
# ==========================================================================
class _CpuMemory:
    """A :class:`tdxve.guest.GuestMemory` over a :class:`GuestCpu`'s memory."""

    __slots__ = ("cpu",)

    def __init__(self, cpu: GuestCpu) -> None:
        self.cpu = cpu

    def read(self, addr: int, size: int) -> bytes:
        return bytes(self.cpu.read_memory(addr, size))

    def write(self, addr: int, data: bytes) -> None:
        self.cpu.write_memory(addr, bytes(data))


@contextmanager
def bound_memory(machine: Any, memory: Any) -> Iterator[None]:
    """Let ``machine``'s guest use ``memory`` for emulated string I/O while inside.

    The guest keeps its memory in ``machine.guest.memory`` (mirrored in
    ``machine.memory``); both are restored on exit.

    :raises EmbedError: ``machine`` has no ``guest.memory``.
    """
    guest = getattr(machine, "guest", None)
    if guest is None or not hasattr(guest, "memory"):
        raise EmbedError(f"{type(machine).__name__} has no guest.memory to bind simulator memory to")
    old_guest, old_machine = guest.memory, getattr(machine, "memory", None)
    guest.memory = memory
    if old_machine is not None:
        machine.memory = memory
    try:
        yield
    finally:
        guest.memory = old_guest
        if old_machine is not None:
            machine.memory = old_machine


def _check_mode_cpl(cpu: GuestCpu) -> tuple[int, int]:
    mode = cpu.mode
    if type(mode) is not int or mode not in (16, 32, 64):
        raise UnsupportedModeError(f"GuestCpu.mode must be 16, 32 or 64, got {mode!r}")
    cpl = cpu.cpl
    if type(cpl) is not int or not 0 <= cpl <= 3:
        raise InvalidArgumentError(f"GuestCpu.cpl must be 0, 1, 2 or 3, got {cpl!r}")
    return mode, cpl


def _read_values(cpu: GuestCpu, names: Sequence[str]) -> dict[str, int]:
    values = cpu.read_registers(names)
    if len(values) != len(names):
        raise EmbedError(f"GuestCpu.read_registers returned {len(values)} values for {len(names)} names")
    out: dict[str, int] = {}
    for name, v in zip(names, values):
        if type(v) is bool or not isinstance(v, int) or not 0 <= v <= U64_MASK:
            raise EmbedError(f"GuestCpu register {name} must be an int in [0, 2**64), got {v!r}")
        out[name] = int(v)
    return out


def fetch_code(read: Any, addr: int, mask: int = U64_MASK) -> bytes:
    """Up to 15 instruction bytes at ``addr`` from ``read(addr, size)``.

    Reads as many bytes as are accessible (an instruction may end right
    before an unmapped page); the decoder reports a truncated instruction
    when they are not enough.

    :raises EmbedError: not even the first byte can be read.
    """
    try:
        return bytes(read(addr, MAX_INSN_LENGTH))
    except IndexError:
        pass
    got = bytearray()
    for i in range(MAX_INSN_LENGTH):
        try:
            got += bytes(read((addr + i) & mask, 1))
        except IndexError:
            break
    if not got:
        raise EmbedError(f"cannot read the instruction bytes at linear address {addr:#x}")
    return bytes(got)


def _write_back(cpu: GuestCpu, before: Mapping[str, int], regs: Regs | None) -> None:
    if regs is None:
        return
    changed = {name: getattr(regs, name) for name in REGISTER_NAMES
               if getattr(regs, name) != before[name]}
    if changed:
        cpu.write_registers(changed)


def execute_port_io(cpu: GuestCpu, machine: Any, *, code: bytes | None = None) -> IoEvent:
    """Run the port-I/O instruction at the CPU's RIP as a TD would.

    Call it instead of executing the instruction. Afterwards the CPU's
    registers hold what the CPU and the guest handler leave: RIP past the
    instruction on success, RAX (IN) and RSI/RDI/RCX (string I/O) updated.

    In 64-bit mode the instruction goes through :meth:`Machine.execute` (the
    guest's emulated string I/O reads and writes the CPU's memory); in other
    modes it is performed architecturally against ``machine.host.bus`` with
    no #VE (a 32-bit IN zero-extends into RAX, as Unicorn/QEMU do).

    :param cpu: the simulator's CPU (:class:`GuestCpu`).
    :param machine: a :class:`tdxve.machine.Machine` (or compatible).
    :param code: the instruction bytes; by default up to 15 bytes are read
        at the linear RIP (``cs_base + rip`` outside 64-bit mode).
    :returns: an :class:`IoEvent`.
    :raises GuestFault: the guest could not complete the instruction (early
        panic, #VE fault, double fault, ...); the CPU's registers are set to
        the state at the fault first. Outside 64-bit mode, a string access to
        memory that cannot be accessed raises :class:`GuestMemoryFault` with
        the registers as hardware leaves them after the completed elements.
    :raises DecodeError: the bytes are not a port-I/O instruction.
    :raises EmbedError: the CPU returned bad values, the code cannot be read,
        or a direct access needs a host without a ``bus``.
    """
    mode, cpl = _check_mode_cpl(cpu)
    if mode == 64:
        before = _read_values(cpu, REGISTER_NAMES)
        if code is None:
            code = fetch_code(cpu.read_memory, before["rip"])
        regs = Regs(mode=64, cpl=cpl, **before)
        try:
            with bound_memory(machine, _CpuMemory(cpu)):
                out = machine.execute(regs, code)
        except GuestFault as fault:
            _write_back(cpu, before, fault.regs if isinstance(fault.regs, Regs) else None)
            raise
        _write_back(cpu, before, regs)
        insn = core.decode_insn(code, 64)
        port = insn.port if insn.port is not None else before["rdx"] & 0xFFFF
        elements = _elements(insn, before["rcx"]) if insn.is_string else 1
        return IoEvent(before["rip"], 64, insn, port, insn.is_in, insn.size, elements, True,
                       out.tdvmcalls, out.exit_qual, regs.rip, out.ve_count)
    return _execute_direct(cpu, machine, mode, code)


def _elements(insn: IoInsn, rcx: int) -> int:
    if not insn.rep:
        return 1
    return rcx & ((1 << insn.addr_size) - 1)


def _bus(machine: Any) -> Any:
    bus = getattr(getattr(machine, "host", None), "bus", None)
    if bus is None or not callable(getattr(bus, "read", None)) or not callable(getattr(bus, "write", None)):
        raise EmbedError(
            f"a port access outside 64-bit mode goes straight to the host's devices, but "
            f"{type(getattr(machine, 'host', None)).__name__} has no bus with read/write")
    return bus



def _execute_direct(cpu: GuestCpu, machine: Any, mode: int, code: bytes | None) -> IoEvent:
    names = GPR_NAMES + ("rip", "rflags", "cs_base")
    before = _read_values(cpu, names)
    rip = before["rip"]
    ip_mask = 0xFFFF if mode == 16 else _U32
    if code is None:
        code = fetch_code(cpu.read_memory, (before["cs_base"] + (rip & ip_mask)) & _U32, _U32)
    try:
        insn = core.decode_insn(code, mode)
    except TruncatedInputError as exc:
        raise EmbedError(f"the port-I/O instruction at {rip:#x} runs into inaccessible memory: "
                         f"{exc}") from exc
    bus = _bus(machine)
    rax = before["rax"]
    port = insn.port if insn.port is not None else before["rdx"] & 0xFFFF
    size = insn.size
    width = (1 << (8 * size)) - 1
    changed: dict[str, int] = {}
    elements = 1
    if insn.kind is IoKind.IN:
        value = bus.read(port, size) & width
        # AL/AX merge; EAX zero-extends into RAX (what QEMU/Unicorn do).
        changed["rax"] = value if size == 4 else (rax & ~width & U64_MASK) | value
    elif insn.kind is IoKind.OUT:
        bus.write(port, size, rax & width)
    else:
        elements = _direct_string(cpu, bus, insn, port, before, changed, mode)
    changed["rip"] = (rip & ~ip_mask) | ((rip + insn.length) & ip_mask)
    cpu.write_registers({k: v for k, v in changed.items() if v != before.get(k)})
    return IoEvent(rip, mode, insn, port, insn.is_in, size, elements, False, 0, None,
                   changed["rip"], 0)


def _direct_string(cpu: GuestCpu, bus: Any, insn: IoInsn, port: int, before: Mapping[str, int],
                   changed: dict[str, int], mode: int) -> int:
    # Architectural INS/OUTS (SDM Vol. 2 INS/OUTS; ref 3.3, 3.4): ES:rDI for
    # INS, the (overridable) segment:rSI for OUTS; rCX at the address size
    # when REP; the pointer moves by +/-size per element with RFLAGS.DF.
    abits = insn.addr_size
    amask = (1 << abits) - 1
    segment = insn.segment if insn.segment is not None else Segment.ES
    base = _read_values(cpu, (SEGMENT_BASE_NAMES[segment],))[SEGMENT_BASE_NAMES[segment]]
    ptr_name = "rdi" if insn.is_in else "rsi"
    ptr0 = before[ptr_name]
    count = before["rcx"] & amask if insn.rep else 1
    size = insn.size
    step = -size if before["rflags"] & _RFLAGS_DF else size
    off = ptr0 & amask
    done = 0
    try:
        while done < count:
            addr = (base + off) & _U32
            if insn.is_in:
                value = bus.read(port, size) & ((1 << (8 * size)) - 1)
                cpu.write_memory(addr, value.to_bytes(size, "little"))
            else:
                data = bytes(cpu.read_memory(addr, size))
                bus.write(port, size, int.from_bytes(data, "little"))
            off = (off + step) & amask
            done += 1
    except IndexError as exc:
        progress = _string_progress(ptr_name, ptr0, off, abits, insn.rep, before["rcx"], count, done)
        cpu.write_registers({k: v for k, v in progress.items() if v != before[k]})
        regs = Regs(mode=mode, **{n: before[n] for n in REGISTER_NAMES if n in before})
        regs.update(**progress)
        raise GuestMemoryFault(
            f"{'INS' if insn.is_in else 'OUTS'} element {done} of {count} at linear address "
            f"{(base + off) & _U32:#x} cannot be accessed ({exc}); {done} element(s) completed",
            regs=regs, vector=14, reason="string-memory") from exc
    changed.update(_string_progress(ptr_name, ptr0, off, abits, insn.rep, before["rcx"], count, done))
    return done


def _string_progress(ptr_name: str, ptr0: int, off: int, abits: int, rep: bool, rcx: int,
                     count: int, done: int) -> dict[str, int]:
    if done == 0:
        return {}
    out = {ptr_name: address_size_write(ptr0, off, abits)}
    if rep:
        out["rcx"] = address_size_write(rcx, count - done, abits)
    return out


def execute_halt(cpu: GuestCpu, machine: Any) -> int:
    """Deliver a HLT the CPU is about to execute.

    In 64-bit mode HLT is a #VE (exit reason 12, ref 1.9): the normal path
    issues TDG.VP.VMCALL<HLT> and advances RIP; the early path cannot handle
    it and ends in :class:`~tdxve.errors.EarlyPanic`. Outside 64-bit mode HLT
    is a plain halt and nothing happens here.

    :returns: the number of TDVMCALLs made (0 outside 64-bit mode).
    :raises GuestFault: as :func:`execute_port_io`.
    """
    from ..abi import ExitReason

    mode, cpl = _check_mode_cpl(cpu)
    if mode != 64:
        return 0
    before = _read_values(cpu, REGISTER_NAMES)
    regs = Regs(mode=64, cpl=cpl, **before)
    try:
        out = machine.execute_exit(regs, ExitReason.HLT, instr_len=1)
    except GuestFault as fault:
        _write_back(cpu, before, fault.regs if isinstance(fault.regs, Regs) else None)
        raise
    _write_back(cpu, before, regs)
    tdvmcalls: int = out.tdvmcalls
    return tdvmcalls
