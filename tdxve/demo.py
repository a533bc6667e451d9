"""``tdxve demo``: a Linux TD's port I/O through #VE, under Unicorn.

Runs the demo guest (:data:`tdxve.guests.DEMO`: real mode up to 64-bit mode,
16550 earlyprintk, CMOS, PCI 00:00.0, POST codes, debug console, HLT) in
Unicorn with :func:`tdxve.embed.unicorn.attach`, then the failure-path guest
(:data:`tdxve.guests.STRING_IO`: one ``rep outsb``), and prints

1. what the guest printed on its serial console and debug console, and its
   POST codes;
2. #VEs, TDVMCALLs and direct (non-64-bit) accesses per port and direction;
3. the value the PCI read left in RAX (RAX preloaded with 0xDEADBEEF00000000)
   under the chosen profile, next to every other profile's value;
4. elapsed time and #VE events per second;
5. the string-I/O guest in the early window: the kernel's early panic under
   ``--string-io reject``, the line printed under ``--string-io emulate``.

Expected guest faults (an early panic, a #VE fault, ...) are reported as
results, never as tracebacks. ``--trace FILE`` writes the host's event log
(every TDVMCALL and direct access of both guests; format in
:mod:`tdxve.host.log`).

Entry points: :func:`add_arguments` + :func:`command` (wired into
``python -m tdxve demo`` by :mod:`tdxve.cli`), :func:`main` for
``python -m tdxve.demo``, and :func:`run_guest` for programs and tests.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence, TextIO

from ._backend import BACKEND
from .errors import GuestFault, TdxveError
from .guests import DEMO, STRING_IO, GuestImage

__all__ = ["add_arguments", "command", "main", "run_guest", "GuestRun", "PORT_NAMES",
           "PCI_RAX_PRELOAD", "POST_AFTER_PCI"]

#: What the demo guest loads into RAX before ``in eax, dx`` (ref 6.3).
PCI_RAX_PRELOAD = 0xDEADBEEF00000000
#: The POST code the demo guest writes right after the PCI read.
POST_AFTER_PCI = 0x30

#: Register-level names of the standard PC's ports, for the tables.
PORT_NAMES: dict[int, str] = {
    0x60: "i8042 data", 0x64: "i8042 command/status",
    0x70: "CMOS index", 0x71: "CMOS data", 0x80: "POST code",
    0x3F8: "COM1 THR/RBR (DLL)", 0x3F9: "COM1 IER (DLH)", 0x3FA: "COM1 IIR/FCR",
    0x3FB: "COM1 LCR", 0x3FC: "COM1 MCR", 0x3FD: "COM1 LSR", 0x3FE: "COM1 MSR",
    0x3FF: "COM1 SCR", 0x402: "debug console", 0xE9: "debug console",
    0xCF8: "PCI CONFIG_ADDRESS", 0xCFC: "PCI CONFIG_DATA", 0xCFD: "PCI CONFIG_DATA+1",
    0xCFE: "PCI CONFIG_DATA+2", 0xCFF: "PCI CONFIG_DATA+3", 0x608: "ACPI PM timer",
}

_PROFILE_NOTES = {
    "linux-2022": "GENMASK(32, 0): bit 32 cleared, bits 63:33 kept (ref 1.4)",
    "linux": "insn_assign_reg: zero-extended (July 2026 fix)",
    "architectural": "what hardware IN EAX does: zero-extended",
    "linux-5.19-rc": "2022 merge rule; its early handler never advances RIP",
}


@dataclass
class GuestRun:
    """The outcome of one guest run under Unicorn.

    :ivar image: the guest.
    :ivar machine: the :class:`tdxve.machine.Machine` it ran against.
    :ivar attachment: the :class:`tdxve.embed.unicorn.UnicornAttachment`.
    :ivar fault: the guest fault that stopped it (None if it finished).
    :ivar elapsed: wall time inside ``emu_start``, seconds.
    :ivar pci_rax: RAX right after the PCI read (None if not reached).
    :ivar final_rip: RIP when emulation stopped.
    """

    image: GuestImage
    machine: Any
    attachment: Any
    fault: GuestFault | None
    elapsed: float
    pci_rax: int | None
    final_rip: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def serial(self) -> str:
        """What the guest wrote to COM1."""
        return bytes(self.machine.host.uart.output).decode("latin-1")

    @property
    def debugcon(self) -> str:
        """What the guest wrote to the debug console."""
        return bytes(self.machine.host.debugcon.output).decode("latin-1")

    @property
    def post_codes(self) -> list[int]:
        """POST codes in write order."""
        return list(self.machine.host.post.codes)

    @property
    def ves(self) -> int:
        """#VEs delivered (port I/O and HLT)."""
        n: int = self.attachment.stats.ves
        return n


def run_guest(image: GuestImage = DEMO, *, profile: str = "linux", path: str = "normal",
              string_io: str = "reject", log: Any = None) -> GuestRun:
    """Run ``image`` under Unicorn with tdxve attached.

    :param image: the guest (:data:`tdxve.guests.DEMO` or :data:`~tdxve.guests.STRING_IO`).
    :param profile: the guest kernel's profile (``tdxve.guest.PROFILE_NAMES``).
    :param path: ``"normal"`` or ``"early"`` (the #VE handler that runs).
    :param string_io: ``"reject"`` or ``"emulate"``.
    :param log: an :class:`tdxve.host.EventLog` for the host (None: no log).
    :returns: a :class:`GuestRun`; a guest fault is in ``.fault``, not raised.
    :raises ImportError: unicorn is not installed.
    :raises InvalidArgumentError: a bad profile, path or string_io.
    """
    from .embed.unicorn import attach
    from .host import Host
    from .machine import Machine

    host = Host(log=log) if log is not None else Host()
    machine = Machine(profile=profile, string_io=string_io, path=path, host=host)
    uc = image.unicorn()
    att = attach(uc, machine, path=path)
    fault: GuestFault | None = None
    t0 = time.perf_counter()
    try:
        uc.emu_start(image.entry, image.end)
    except GuestFault as exc:
        fault = exc
    elapsed = time.perf_counter() - t0
    pci_rax = None
    if "pci_rax" in image.symbols and POST_AFTER_PCI in host.post.codes:
        pci_rax = int.from_bytes(uc.mem_read(image.address("pci_rax"), 8), "little")
    rip = att.registers()["rip"]
    att.detach()
    return GuestRun(image, machine, att, fault, elapsed, pci_rax, rip)


# ==========================================================================
# Output
# ==========================================================================
def _table(out: TextIO, headers: Sequence[str], rows: Sequence[Sequence[str]], align: str,
           indent: str = "  ") -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)]
        return indent + "  ".join(parts).rstrip()

    out.write(line(headers) + "\n")
    out.write(indent + "  ".join("-" * w for w in widths) + "\n")
    for r in rows:
        out.write(line(r) + "\n")


def _heading(out: TextIO, text: str) -> None:
    out.write(f"\n{text}\n{'-' * len(text)}\n")


def _console(out: TextIO, text: str, indent: str = "  ") -> None:
    if not text:
        out.write(f"{indent}(nothing)\n")
        return
    for ln in text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n").split("\n"):
        out.write(f"{indent}| {ln}\n")


def _fault_text(fault: GuestFault) -> list[str]:
    lines = str(fault).split("\n")
    return [f"{type(fault).__name__}: {lines[0]}"] + lines[1:]


def _fault_short(fault: GuestFault) -> str:
    where = f" at RIP {fault.regs.rip:#x}" if getattr(fault.regs, "rip", None) is not None else ""
    reason = f" ({fault.reason})" if fault.reason else ""
    return f"stopped: {type(fault).__name__}{reason}{where}"


def _port_name(machine: Any, port: int) -> str:
    name = PORT_NAMES.get(port)
    if name is not None:
        return name
    try:
        dev = machine.host.bus.name_of(port)
    except (AttributeError, TdxveError):
        dev = None
    return dev if dev else "(unassigned)"


def _report_io(out: TextIO, run: GuestRun) -> None:
    stats = run.attachment.stats
    rows = []
    for (port, is_in), c in stats.ports().items():
        rows.append([f"{port:#06x}", _port_name(run.machine, port), "IN" if is_in else "OUT",
                     str(c.ves) if c.ves else "-", str(c.tdvmcalls) if c.ves else "-",
                     str(c.direct) if c.direct else "-"])
    rows.append(["", "total", "", str(sum(c.ves for c in stats.ports().values())),
                 str(sum(c.tdvmcalls for c in stats.ports().values())), str(stats.direct)])
    _table(out, ["port", "device register", "dir", "#VEs", "TDVMCALLs", "direct"], rows, "lllrrr")
    for reason, c in stats.exits().items():
        name = {12: "HLT", 10: "CPUID", 31: "RDMSR", 32: "WRMSR"}.get(reason, f"exit reason {reason}")
        out.write(f"  plus {c.ves} {name} #VE{'s' if c.ves != 1 else ''} "
                  f"({c.tdvmcalls} TDVMCALL{'s' if c.tdvmcalls != 1 else ''}: "
                  f"TDG.VP.VMCALL<{name}>)\n")
    modes = run.attachment.modes
    if modes:
        seen = " -> ".join(f"{label} ({n})" for label, n in modes.items())
        out.write(f"  CPU modes seen (port accesses in each):\n    {seen}\n")
    out.write("  #VE: 64-bit mode, through the guest's handler and TDG.VP.VMCALL<Instruction.IO>.\n"
              "  direct: real/protected mode, straight to the device (TDCALL exists only in\n"
              "  64-bit mode); Unicorn runs each element of a string instruction itself.\n")


def _report_pci(out: TextIO, run: GuestRun, others: dict[str, GuestRun]) -> None:
    out.write(f"  in eax, dx from port 0xcfc (PCI 00:00.0 dword 0 = 0x12378086),\n"
              f"  RAX preloaded with {PCI_RAX_PRELOAD:#018x} (the live measurement of ref 6.3)\n")
    chosen = run.machine.profile.name
    if run.pci_rax is not None:
        out.write(f"  profile {chosen!r} leaves RAX = {run.pci_rax:#018x}\n\n")
    else:
        out.write(f"  profile {chosen!r}: the guest stopped before the PCI read\n\n")
    rows = []
    for name, r in others.items():
        mark = "*" if name == chosen else ""
        if r.pci_rax is not None:
            value = f"{r.pci_rax:#018x}"
            note = _PROFILE_NOTES.get(name, "")
        else:
            value = "(not reached)"
            note = _fault_short(r.fault) if r.fault is not None else ""
        rows.append([mark, name, value, note])
    _table(out, ["", "profile", "RAX after the IN", "why"], rows, "llll")
    out.write(f"  (* = --profile; path {run.machine.path})\n")


def _report_timing(out: TextIO, run: GuestRun) -> None:
    ves = run.ves
    el = run.elapsed
    rate = ves / el if el > 0 else 0.0
    out.write(f"  {ves} #VEs and {run.attachment.stats.direct} direct accesses in {el * 1e3:.1f} ms "
              f"of emulation: {rate:,.0f} #VE events/s\n")
    out.write(f"  decoder backend {BACKEND}; every event: Unicorn hook -> decode at RIP -> #VE ->\n"
              f"  guest handler -> TDVMCALL -> host -> device -> registers back into Unicorn\n")
    att = run.attachment
    if att.fast_accesses:
        out.write(f"  {att.fast_accesses} of the accesses ran on the compiled fast path "
                  f"(attach(..., fast=True))\n")
    elif att.fast_off:
        out.write(f"  every access ran on the Python path: {att.fast_off}\n"
                  f"  (this guest starts in real mode; python benchmarks/bench_embed.py measures the fast path)\n")
    if run.attachment.barriers:
        out.write(f"  {run.attachment.barriers} access(es) needed a barrier: an outcome Unicorn's own\n"
                  f"  IN/OUT completion cannot express (see docs/embedding.md)\n")


def _report_string_io(out: TextIO, run: GuestRun, string_io: str) -> None:
    out.write(f"  guest {run.image.name}.S: {run.image.description}\n")
    out.write(f"  --string-io {string_io}, path early (before Linux unrolls string I/O, ref 1.8)\n")
    out.write("  serial console:\n")
    _console(out, run.serial, "    ")
    stats = run.attachment.stats.ports().get((0x3F8, False))
    if stats is not None:
        out.write(f"  rep outsb: {stats.ves} #VE, {stats.tdvmcalls} TDVMCALL(s) to port 0x3f8\n")
    if run.fault is not None:
        out.write("  the guest kernel stopped:\n")
        for ln in _fault_text(run.fault):
            out.write(f"    {ln}\n")
        if string_io == "reject":
            out.write("  (try --string-io emulate: the guest model transfers it element by element)\n")
    else:
        out.write(f"  POST codes: {' '.join(f'{c:02x}' for c in run.post_codes)}; "
                  f"finished at RIP {run.final_rip:#x}\n")


def _unicorn_version() -> str:
    mod: Any = importlib.import_module("unicorn")
    return str(getattr(mod, "__version__", "?"))


def report(out: TextIO, *, profile: str, path: str, string_io: str, trace: str | None) -> int:
    """Run both guests and print the report. Returns the exit status."""
    from .guest import PROFILE_NAMES
    from .host import EventLog

    log = EventLog() if trace else None
    title = "tdxve demo: a Linux TD's port I/O through #VE, under Unicorn"
    out.write(f"{title}\n{'=' * len(title)}\n")
    out.write(f"profile {profile}   path {path}   string I/O {string_io}   "
              f"decoder {BACKEND}   unicorn {_unicorn_version()}\n")
    run = run_guest(DEMO, profile=profile, path=path, string_io=string_io, log=log)
    out.write(f"guest {DEMO.name}.S ({len(DEMO.code)} bytes at {DEMO.load_address:#x}):\n"
              f"  {DEMO.description}\n")
    if run.fault is None:
        state = "halted (HLT)" if run.attachment.halted else f"stopped at {run.final_rip:#x}"
        out.write(f"result: {state}\n")
    else:
        out.write("result: the guest kernel stopped:\n")
        for ln in _fault_text(run.fault):
            out.write(f"    {ln}\n")

    _heading(out, "1. What the guest printed")
    out.write("serial console (COM1, 16550A at 0x3f8):\n")
    _console(out, run.serial)
    out.write("debug console (port 0x402):\n")
    _console(out, run.debugcon)
    out.write(f"POST codes (port 0x80): {' '.join(f'{c:02x}' for c in run.post_codes) or '(none)'}\n")

    _heading(out, "2. #VEs and TDVMCALLs per port and direction")
    _report_io(out, run)

    _heading(out, "3. The PCI read and the guest profile")
    others: dict[str, GuestRun] = {}
    for name in PROFILE_NAMES:
        others[name] = run if name == profile else run_guest(DEMO, profile=name, path=path,
                                                              string_io=string_io)
    _report_pci(out, run, others)

    _heading(out, "4. Time")
    _report_timing(out, run)

    _heading(out, "5. Failure path: string I/O in the early window")
    srun = run_guest(STRING_IO, profile=profile, path="early", string_io=string_io, log=log)
    _report_string_io(out, srun, string_io)

    if trace and log is not None:
        log.save(trace)
        out.write(f"\nhost event log: {len(log)} events written to {trace}\n")
    return 0


# ==========================================================================
# Command line
# ==========================================================================
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    from .guest import PROFILE_NAMES

    parser.add_argument("--profile", choices=PROFILE_NAMES, default="linux",
                        help="guest kernel whose #VE handler runs (default: linux)")
    parser.add_argument("--path", choices=("normal", "early"), default="normal",
                        help="#VE handler: the IDT handler or the early-boot one (default: normal)")
    parser.add_argument("--string-io", choices=("reject", "emulate"), default="reject",
                        dest="string_io", help="what the guest does with INS/OUTS (default: reject, as Linux)")
    parser.add_argument("--trace", metavar="FILE", default=None,
                        help="write the host's event log (every TDVMCALL and direct access) to FILE")


def command(args: argparse.Namespace, out: TextIO) -> int:
    """Run the demo for parsed ``args``; the ``tdxve demo`` subcommand."""
    try:
        importlib.import_module("unicorn")
    except ImportError:
        sys.stderr.write("error: the demo runs x86 code under Unicorn, which is not installed: "
                         "pip install 'tdxve[unicorn]'\n")
        return 2
    try:
        return report(out, profile=args.profile, path=args.path, string_io=args.string_io,
                      trace=args.trace)
    except OSError as exc:
        sys.stderr.write(f"error: cannot write the trace: {exc}\n")
        return 2


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """``python -m tdxve.demo [options]``."""
    p = argparse.ArgumentParser(prog="tdxve demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return command(args, out if out is not None else sys.stdout)


if __name__ == "__main__":      # pragma: no cover
    sys.exit(main())
