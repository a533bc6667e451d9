"""A TD vCPU wired end to end: host + TDX module + guest kernel.

:class:`Machine` is the one-line entry for users and tests::

    m = Machine(profile="linux-2022")
    regs = Regs(rax=0x0100, rdx=0x71, rip=0x1000)
    out = m.execute(regs, b"\\xec")          # IN AL, DX
    out.rip, hex(regs.rax)

``execute`` runs the port-I/O instruction through the whole path of
``shared/reference/tdx-port-io.md`` ("ref"): decode (the CPU), VE info and #VE
(the TDX module, ref 2.2), the guest's early or normal #VE handler
(ref 1.6, 1.7), TDVMCALL<Instruction.IO> (ref 2.5) served by the host, and the
RAX merge / RIP advance of the chosen profile (ref 1.4, 1.5).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

from ._backend import core
from .abi import ExitReason
from .errors import InvalidArgumentError, VeLoopError
from .guest import DEFAULT_MAX_REP, Guest, GuestMemory, Profile
from .regs import Regs
from .tdx import TdvmcallHost, TdxModule, VeInfo

__all__ = ["Machine", "Outcome", "PATHS", "DEFAULT_INSTR_LEN"]

#: The #VE delivery paths: ``"normal"`` (the #VE IDT handler, ref 1.6) and
#: ``"early"`` (``do_early_exception`` before ``idt_setup_early_traps``, ref 1.7).
PATHS = ("normal", "early")

#: Instruction lengths ``execute_exit`` assumes when none is given: the
#: shortest encodings (HLT F4; CPUID 0F A2; RDMSR 0F 32; WRMSR 0F 30; INVD
#: 0F 08; WBINVD 0F 09; VMCALL 0F 01 C1). EPT violations and
#: misconfigurations have no instruction length (ref 1.5): 0.
DEFAULT_INSTR_LEN: dict[int, int] = {
    ExitReason.HLT: 1, ExitReason.CPUID: 2, ExitReason.MSR_READ: 2, ExitReason.MSR_WRITE: 2,
    ExitReason.INVD: 2, ExitReason.WBINVD: 2, ExitReason.VMCALL: 3,
    ExitReason.EPT_VIOLATION: 0, ExitReason.EPT_MISCONFIG: 0,
}


class Outcome(NamedTuple):
    """What one :meth:`Machine.execute` / :meth:`Machine.execute_exit` did.

    :ivar exit_reason: the VMX exit reason in the VE info (30 for port I/O).
    :ivar exit_qual: the exit qualification.
    :ivar instr_len: the instruction length in the VE info.
    :ivar instr_info: the instruction information in the VE info.
    :ivar tdvmcalls: TDG.VP.VMCALLs that reached the host.
    :ivar rip: RIP after the instruction (also in ``regs.rip``).
    :ivar ve_count: #VEs delivered (1 unless a handler left RIP in place).
    :ivar fixed_up: True when an exception-table fixup moved RIP instead of
        the instruction retiring.
    """

    exit_reason: int
    exit_qual: int
    instr_len: int
    instr_info: int
    tdvmcalls: int
    rip: int
    ve_count: int
    fixed_up: bool


class Machine:
    """A TD vCPU: :class:`~tdxve.tdx.TdxModule` + :class:`~tdxve.guest.Guest` + a host.

    :param profile: the guest's profile (``"linux"``, ``"linux-2022"``,
        ``"architectural"``, ``"linux-5.19-rc"`` or a
        :class:`~tdxve.guest.Profile`).
    :param string_io: ``"reject"`` (Linux) or ``"emulate"``.
    :param path: ``"normal"`` (the #VE IDT handler) or ``"early"``
        (``do_early_exception``); settable later through :attr:`path`.
    :param host: anything with ``tdvmcall(regs)``; None builds
        ``tdxve.host.Host()`` (a standard PC).
    :param memory: the :class:`~tdxve.guest.GuestMemory` for emulated string
        I/O; None creates an :class:`~tdxve.guest.ArrayMemory` of 1 MiB at 0.
    :param port_filter: the guest's port allow-list (see :class:`~tdxve.guest.Guest`).
    :param max_rep: the guest's guard for emulated REP string I/O.
    :param ve_loop_limit: how many consecutive #VEs at one RIP whose handler
        returned without moving RIP (e.g. the ``linux-5.19-rc`` early path)
        are let happen before :class:`~tdxve.errors.VeLoopError` is raised.
    :raises InvalidArgumentError: a bad argument.
    :raises ImportError: ``host`` is None and ``tdxve.host`` cannot be imported.

    Attributes: ``host``, ``tdx``, ``guest``, ``memory``.

    **Thread safety**: a Machine is one vCPU and is not thread-safe. Its TDX
    module (the VE info), guest and host hold mutable state, so call
    :meth:`execute` / :meth:`execute_exit` from one thread at a time (a
    second thread entering mid-#VE would see the VE info still valid: a
    spurious #DF). Separate Machines with separate hosts share no mutable
    state and may run in parallel threads (``tests/test_concurrency.py``).
    """

    def __init__(self, *, profile: str | Profile = "linux", string_io: str = "reject",
                 path: str = "normal", host: TdvmcallHost | None = None,
                 memory: GuestMemory | None = None, port_filter: Any = None,
                 max_rep: int | None = DEFAULT_MAX_REP, ve_loop_limit: int = 3) -> None:
        if type(ve_loop_limit) is not int or ve_loop_limit < 1:
            raise InvalidArgumentError(f"ve_loop_limit must be an int >= 1, got {ve_loop_limit!r}")
        if host is None:
            try:
                host_cls = importlib.import_module("tdxve.host").Host
            except (ImportError, AttributeError) as exc:
                raise ImportError(
                    f"Machine(host=None) builds tdxve.host.Host(), which cannot be imported ({exc}); "
                    f"pass any object with a tdvmcall(regs) method as host=") from exc
            host = host_cls()
        self.host: TdvmcallHost = host
        self.tdx = TdxModule(host)
        self.guest = Guest(self.tdx, profile=profile, string_io=string_io,
                           port_filter=port_filter, memory=memory, max_rep=max_rep)
        self.memory: GuestMemory = self.guest.memory
        self.ve_loop_limit = ve_loop_limit
        self._path = "normal"
        self.path = path

    @property
    def path(self) -> str:
        """The #VE delivery path, ``"normal"`` or ``"early"``."""
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in PATHS:
            raise InvalidArgumentError(f"path must be 'normal' or 'early', got {value!r}")
        self._path = value

    @property
    def profile(self) -> Profile:
        """The guest's :class:`~tdxve.guest.Profile`."""
        return self.guest.profile

    def __repr__(self) -> str:
        return (f"Machine(profile={self.guest.profile.name!r}, string_io={self.guest.string_io!r}, "
                f"path={self._path!r}, host={type(self.host).__name__})")

    # ------------------------------------------------------------ entries
    def execute(self, regs: Regs, code: bytes | bytearray | memoryview) -> Outcome:
        """Run the port-I/O instruction ``code`` at ``regs.rip`` through the whole path.

        ``regs`` is mutated in place exactly as the CPU and the guest handler
        leave it: on success RIP += the instruction length and RAX (IN), or
        RSI/RDI/RCX (emulated INS/OUTS) hold the results; on failure RIP does
        not move and RAX is whatever the profile leaves (ref 1.4, 1.10).

        The CPU's own I/O-permission check (IOPL / TSS bitmap, ref 3.5) is
        assumed to have passed: user-mode code gets here only with ``ioperm``.

        :param regs: the guest register file (``mode`` selects the decoding).
        :param code: the instruction bytes (trailing bytes are ignored).
        :returns: an :class:`Outcome`.
        :raises DecodeError: not a port-I/O instruction the CPU would execute
            (no VM exit: #UD / #GP happen before it, ref 3.5).
        :raises GuestFault: the guest could not complete it -- VeFault,
            EarlyPanic, DoubleFault, VeLoopError, GuestMemoryFault,
            UnsupportedExitError, StringIoLimitError, GuestPanic; each
            carries a copy of the registers at the fault.
        :raises InvalidArgumentError: ``regs`` is not a :class:`~tdxve.regs.Regs`.
        """
        if not isinstance(regs, Regs):
            raise InvalidArgumentError(f"regs must be a tdxve.Regs, got {type(regs).__name__}")
        insn = core.decode_insn(code, regs.mode)
        tdx = self.tdx
        return self._run(regs, lambda: tdx.inject_io_ve(regs, insn))

    def execute_exit(self, regs: Regs, reason: int, *, exit_qual: int = 0,
                     instr_len: int | None = None, instr_info: int = 0, gla: int = 0,
                     gpa: int = 0) -> Outcome:
        """Deliver a #VE for any exit reason (HLT, CPUID, RDMSR, WRMSR, ...) at ``regs.rip``.

        The exit information is taken as given (no decoding), so this also
        reaches the guest with exit qualifications no instruction produces
        (e.g. reason 30 with size encoding 2).

        :param reason: the VMX exit reason (32-bit field).
        :param exit_qual: the exit qualification.
        :param instr_len: the VM-exit instruction length; defaults from
            :data:`DEFAULT_INSTR_LEN` (required for other reasons, e.g. 30).
        :param instr_info: the VM-exit instruction information.
        :param gla: guest linear address (EPT violations).
        :param gpa: guest physical address (EPT violations).
        :returns: an :class:`Outcome`.
        :raises GuestFault: as :meth:`execute`.
        :raises InvalidArgumentError: a bad field, or no ``instr_len`` for a
            reason without a default.
        """
        if not isinstance(regs, Regs):
            raise InvalidArgumentError(f"regs must be a tdxve.Regs, got {type(regs).__name__}")
        if instr_len is None:
            if type(reason) is bool or not isinstance(reason, int) or reason not in DEFAULT_INSTR_LEN:
                raise InvalidArgumentError(
                    f"instr_len is required for exit reason {reason!r} (defaults exist for "
                    f"{', '.join(str(int(r)) for r in DEFAULT_INSTR_LEN)})")
            instr_len = DEFAULT_INSTR_LEN[reason]
        tdx = self.tdx
        il: int = instr_len

        def inject() -> VeInfo:
            # inject_ve validates every field before storing anything.
            return tdx.inject_ve(regs, reason, exit_qual, gla=gla, gpa=gpa, instr_len=il,
                                 instr_info=instr_info)

        return self._run(regs, inject)

    # ------------------------------------------------------------ the loop
    def _run(self, regs: Regs, inject: Callable[[], VeInfo]) -> Outcome:
        tdx = self.tdx
        guest = self.guest
        early = self._path == "early"
        vmcalls0 = tdx.vmcalls
        fixups0 = guest.fixups
        start = regs.rip
        ves = 0
        while True:
            ve = inject()                       # #DF if the VE info is still valid
            ves += 1
            if early:
                guest.do_early_exception(regs, 20)
            else:
                guest.handle_ve(regs)
            if regs.rip != start:
                break
            # The handler returned without moving RIP: IRET re-executes the
            # same instruction, which exits again (the 5.19-rc early-#VE bug,
            # ref 1.1; or a fixup pointing at the faulting RIP).
            if ves >= self.ve_loop_limit:
                raise VeLoopError(
                    f"endless #VE loop: {ves} #VEs (exit reason {ve.exit_reason}) at RIP "
                    f"{start:#x}, the {self._path} handler of profile "
                    f"{guest.profile.name!r} returns without advancing RIP",
                    regs=regs.copy(), vector=20, reason="ve-loop")
        return Outcome(ve.exit_reason, ve.exit_qual, ve.instr_len, ve.instr_info,
                       tdx.vmcalls - vmcalls0, regs.rip, ves, guest.fixups != fixups0)
