"""The untrusted VMM as a TD guest sees it through ``TDG.VP.VMCALL``, with KVM's semantics.

Every rule cites the KVM source it reproduces: ``arch/x86/kvm/vmx/tdx.c``
(indexed at commit 3829d81b, ref [K1]) -- ``tdx_handle_exit``,
``handle_tdvmcall``, ``tdx_emulate_io``, ``tdx_emulate_cpuid``,
``tdx_get_td_vm_call_info``, ``tdx_complete_emulated_msr``,
``tdx_emulate_vmcall`` -- and ``arch/x86/kvm/cpuid.c``/``x86.c``. "ref N.M"
is a section of ``shared/reference/tdx-port-io.md``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Callable, Mapping

from ..abi import U64_MASK, TdvmcallStatus, TdvmcallSubfn
from ..devices.clock import Clock, SteppingClock
from ..devices.cmos import CmosRtc
from ..devices.i8042 import I8042
from ..devices.pci import PciHost
from ..devices.pmtimer import DEFAULT_PORT as PM_TIMER_DEFAULT_PORT
from ..devices.pmtimer import AcpiPmTimer
from ..devices.simple import DebugConsole, PostCodePort
from ..devices.uart import Uart16550
from ..errors import DeviceError, InvalidArgumentError
from ..regs import Regs
from .bus import DeviceErrorRecord, PortBus
from .log import DEFAULT_CAPACITY, EventLog
from .stats import HostStats

__all__ = [
    "Host", "FatalReport", "DEFAULT_CPUID", "DEFAULT_MSRS", "KVM_READ_ONLY_MSRS",
    "KVM_ENOSYS", "KVM_HC_VAPIC_POLL_IRQ",
]

_SUCCESS = int(TdvmcallStatus.SUCCESS)
_INVALID_OPERAND = int(TdvmcallStatus.INVALID_OPERAND)
_SUBFUNC_UNSUPPORTED = int(TdvmcallStatus.SUBFUNC_UNSUPPORTED)
_IO = int(TdvmcallSubfn.IO)
_CPUID = int(TdvmcallSubfn.CPUID)
_HLT = int(TdvmcallSubfn.HLT)
_RDMSR = int(TdvmcallSubfn.RDMSR)
_WRMSR = int(TdvmcallSubfn.WRMSR)
_GET_TD_VM_CALL_INFO = int(TdvmcallSubfn.GET_TD_VM_CALL_INFO)
_REPORT_FATAL_ERROR = int(TdvmcallSubfn.REPORT_FATAL_ERROR)
_MASK = (0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFF)
_U32 = 0xFFFFFFFF

#: ``-KVM_ENOSYS`` (include/uapi/linux/kvm_para.h: KVM_ENOSYS = 1000) as the
#: 64-bit R10 a VMM-specific call with an unknown number gets back.
KVM_ENOSYS = (-1000) & U64_MASK
#: KVM hypercall 1: answers 0 and does nothing (x86.c ``____kvm_emulate_hypercall``).
KVM_HC_VAPIC_POLL_IRQ = 1

#: KVM's hypervisor CPUID leaves (arch/x86/kvm/cpuid.c): 0x40000000 gives the
#: highest KVM leaf and the signature "KVMKVMKVM\0\0\0"; 0x40000001 the KVM
#: paravirt feature bits, none here. Keys: a leaf (any subleaf) or (leaf, subleaf).
DEFAULT_CPUID: dict[int | tuple[int, int], tuple[int, int, int, int]] = {
    0x40000000: (0x40000001, 0x4B4D564B, 0x564B4D56, 0x0000004D),
    0x40000001: (0, 0, 0, 0),
}

#: MSRs KVM emulates for a TD (tdx.c ``tdx_has_emulated_msr``) with KVM's
#: values: APIC base in x2APIC mode for the BSP (``tdx_vcpu_init``), EFER
#: SCE|LME|LMA|NX (``tdx_vcpu_create``), FEAT_CTL locked (``tdx_get_msr``),
#: MISC_ENABLE PEBS/BTS unavailable and PLATFORM_INFO CPUID-faulting
#: (``kvm_vcpu_reset``/``kvm_arch_vcpu_create``), MTRRcap 0x500 | 8 variable
#: ranges (mtrr.c), MTRRdefType and TSC_DEADLINE 0.
DEFAULT_MSRS: dict[int, int] = {
    0x0000001B: 0xFEE00D00,        # IA32_APIC_BASE
    0x0000003A: 0x1,               # IA32_FEATURE_CONTROL
    0x000000CE: 0x80000000,        # MSR_PLATFORM_INFO
    0x000000FE: 0x508,             # IA32_MTRRCAP
    0x000001A0: 0x1800,            # IA32_MISC_ENABLE
    0x000002FF: 0x0,               # IA32_MTRR_DEF_TYPE
    0x000006E0: 0x0,               # IA32_TSC_DEADLINE
    0xC0000080: 0xD01,             # IA32_EFER
}

#: Guest writes fail: tdx.c ``tdx_is_read_only_msr`` (APIC base, EFER, FEAT_CTL)
#: plus those KVM's common code refuses from the guest (MTRRcap, PLATFORM_INFO).
KVM_READ_ONLY_MSRS: frozenset[int] = frozenset({0x1B, 0x3A, 0xC0000080, 0xFE, 0xCE})

Handler = Callable[[Regs], None]


class FatalReport:
    """A ``TDG.VP.VMCALL<ReportFatalError>`` the guest made (KVM exits to user
    space with ``KVM_SYSTEM_EVENT_TDX_FATAL`` and the guest's registers).

    ``error_code`` is R12; ``regs`` a copy of the whole host-visible image.
    """

    __slots__ = ("error_code", "regs")

    def __init__(self, error_code: int, regs: Regs) -> None:
        self.error_code = error_code
        self.regs = regs

    def __repr__(self) -> str:
        return f"FatalReport(error_code={self.error_code:#x})"


def _check_u32x4(key: object, v: object) -> tuple[int, int, int, int]:
    if (not isinstance(v, tuple) or len(v) != 4
            or any(type(x) is not int or not 0 <= x <= _U32 for x in v)):
        raise InvalidArgumentError(f"CPUID {key!r} must map to four 32-bit ints (eax, ebx, ecx, edx), got {v!r}")
    return v  # type: ignore[return-value]


def _check_cpuid(table: Mapping[int | tuple[int, int], tuple[int, int, int, int]]
                 ) -> dict[int | tuple[int, int], tuple[int, int, int, int]]:
    out: dict[int | tuple[int, int], tuple[int, int, int, int]] = {}
    for key, val in table.items():
        if type(key) is int:
            if not 0 <= key <= _U32:
                raise InvalidArgumentError(f"CPUID leaf must be a 32-bit int, got {key:#x}")
        elif (isinstance(key, tuple) and len(key) == 2
              and all(type(k) is int and 0 <= k <= _U32 for k in key)):
            pass
        else:
            raise InvalidArgumentError(f"CPUID key must be a leaf or (leaf, subleaf) of 32-bit ints, got {key!r}")
        out[key] = _check_u32x4(key, val)
    return out


def _check_msrs(msrs: Mapping[int, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for k, v in msrs.items():
        if type(k) is not int or not 0 <= k <= _U32:
            raise InvalidArgumentError(f"MSR index must be a 32-bit int, got {k!r}")
        if type(v) is not int or not 0 <= v <= U64_MASK:
            raise InvalidArgumentError(f"MSR {k:#x} value must be a 64-bit unsigned int, got {v!r}")
        out[k] = v
    return out


class Host:
    """The VMM serving TDG.VP.VMCALL (KVM semantics) in front of a standard PC.

    ``Host()`` builds the PC: :attr:`uart` (16550A, 0x3F8-0x3FF),
    :attr:`debugcon` (0x402 and 0xE9), :attr:`post` (0x80), :attr:`cmos`
    (0x70-0x71), :attr:`pci` (0xCF8-0xCFF, host bridge 8086:1237 at 00:00.0),
    :attr:`pm_timer` (``pm_timer_port``, default 0x608) and :attr:`i8042`
    (0x60, 0x64), all on :attr:`bus`. ``pc=False`` leaves the bus empty (the
    device objects still exist, unregistered).

    **TDVMCALL dispatch** (:meth:`tdvmcall`; KVM ``tdx_handle_exit``, ref 5.1):

    * R10 != 0 is a VMM-specific call, which KVM treats as a KVM hypercall
      (``tdx_emulate_vmcall``: number = R10, arguments R11-R14). Number 1
      (``KVM_HC_VAPIC_POLL_IRQ``) answers R10 = 0; any other number answers
      R10 = ``-KVM_ENOSYS`` (0xFFFFFFFFFFFFFC18) -- the hypercalls that need
      a real vCPU (kick, IPI, yield, clock pairing, map GPA) are not modelled.
      :meth:`set_vmm_handler` installs one.
    * R11 = 30 Instruction.IO (``tdx_emulate_io``, ref 5.2): R13 (direction)
      not 0/1 or R12 (size) not 1/2/4 -> R10 = INVALID_OPERAND; otherwise the
      port is R14 truncated to 16 bits (KVM's ``unsigned short`` PIO port), an
      OUT sends the low ``size`` bytes of R15, an IN puts the value
      zero-extended in R11. On success R10 is **not written**: KVM relies on
      the guest having passed 0 (and it did, or this would be a VMM call).
      R11 is untouched by an OUT (it still holds 30).
    * R11 = 10 CPUID (``tdx_emulate_cpuid``): leaf = R12[31:0], subleaf =
      R13[31:0]; EAX/EBX/ECX/EDX go to R12/R13/R14/R15 (not R11). The table
      (``cpuid=``) is looked up as KVM's ``kvm_cpuid`` does: an exact
      (leaf, subleaf) entry, else a leaf entry (subleaf not significant), else
      Intel's out-of-range rule (``get_out_of_range_cpuid_entry``: the max
      basic leaf's entry when leaf 0 exists, the vendor is not AMD/Hygon and
      the leaf is above its class's maximum), else zeros. R10 not written.
    * R11 = 12 HLT (``kvm_emulate_halt_noskip``): R12 = "interrupts blocked".
      The host records it (:attr:`halted`, :attr:`halt_count`,
      :attr:`hlt_irq_blocked`, optional ``on_halt`` callback). R10 not written.
      :attr:`halted` is cleared by the next TDVMCALL.
    * R11 = 31 RDMSR / 32 WRMSR (``kvm_emulate_rdmsr``/``wrmsr`` +
      ``tdx_complete_emulated_msr``): index = R12[31:0]; WRMSR value = R13.
      An MSR not in :attr:`msrs` -- KVM's ``tdx_has_emulated_msr`` is false
      -- and a write to a read-only MSR answer R10 = INVALID_OPERAND.
      RDMSR success puts the value in R11. KVM's per-MSR value checks
      (reserved bits, canonical addresses) are not modelled: a write to a
      writable MSR stores the value.
    * R11 = 0x10000 GetTdVmCallInfo (``tdx_get_td_vm_call_info``): R12 = 0 ->
      R10 = 0, R11-R14 = 0; R12 = 1 -> R10 = 0 and R11-R14 from
      ``tdvmcall_info`` (what user space -- QEMU -- would fill); other R12 ->
      INVALID_OPERAND.
    * R11 = 0x10003 ReportFatalError: recorded in :attr:`fatal_reports`
      (KVM exits to user space; the guest does not resume). R10 not written.
    * Any other sub-function -> R10 = SUBFUNC_UNSUPPORTED (``handle_tdvmcall``),
      including MapGPA and GetQuote, which need guest memory this model does
      not have; :meth:`set_handler` installs a handler for any sub-function.

    **Device errors**: when a device raises while serving Instruction.IO, the
    guest gets R10 = INVALID_OPERAND (R11 untouched), which every Linux
    version treats as a failed access (#VE fault / early panic); the error is
    recorded in :attr:`device_errors`. With ``on_device_error="raise"``
    (default) :class:`~tdxve.errors.DeviceError` is then raised from
    :meth:`tdvmcall` with the register image already holding that reply, so
    a simulator stops on its device bug; with ``"record"`` the call returns
    normally. The bus stays consistent either way (see :class:`PortBus`).

    **Thread safety**: a Host is not thread-safe. :meth:`tdvmcall`, direct
    :attr:`bus` accesses and the devices update shared state (device
    registers, counters, the event log) without locking. Serve one vCPU's
    calls from one thread at a time, as KVM serialises a vCPU's exits; to
    share one Host between threads (several vCPUs), hold one lock of your own
    around every call. Separate Host instances share no mutable state
    (``tests/test_concurrency.py``).

    :param pc: register the standard PC devices on :attr:`bus`.
    :param clock: time source for the RTC and PM timer (default
        :class:`~tdxve.devices.SteppingClock`, 1 us per reading).
    :param cpuid: CPUID table (default :data:`DEFAULT_CPUID`).
    :param msrs: MSR values (default :data:`DEFAULT_MSRS`); copied.
    :param read_only_msrs: MSRs whose guest writes fail (default :data:`KVM_READ_ONLY_MSRS`).
    :param tdvmcall_info: R11-R14 answered to GetTdVmCallInfo leaf 1.
    :param log: ``None`` (no event log), ``True`` (default capacity), an int
        capacity, or an :class:`EventLog` to share.
    :param on_device_error: ``"raise"`` or ``"record"``.
    :param pm_timer_port: PM_TMR_BLK port.
    :param rtc_start: RTC wall time at clock 0 (datetime or Unix seconds).
    :param on_halt: callback ``on_halt(irq_blocked: bool)`` on each HLT.
    :raises InvalidArgumentError: any bad argument.
    """

    def __init__(self, *, pc: bool = True, clock: Clock | None = None,
                 cpuid: Mapping[int | tuple[int, int], tuple[int, int, int, int]] | None = None,
                 msrs: Mapping[int, int] | None = None,
                 read_only_msrs: frozenset[int] | set[int] | None = None,
                 tdvmcall_info: tuple[int, int, int, int] = (0, 0, 0, 0),
                 log: EventLog | int | bool | None = None, on_device_error: str = "raise",
                 pm_timer_port: int = PM_TIMER_DEFAULT_PORT, rtc_start: datetime | int | None = None,
                 on_halt: Callable[[bool], object] | None = None) -> None:
        if clock is None:
            clock = SteppingClock()
        elif not callable(getattr(clock, "now_ns", None)):
            raise InvalidArgumentError(f"clock must have a now_ns() method, got {clock!r}")
        if (not isinstance(tdvmcall_info, tuple) or len(tdvmcall_info) != 4
                or any(type(x) is not int or not 0 <= x <= U64_MASK for x in tdvmcall_info)):
            raise InvalidArgumentError(f"tdvmcall_info must be four 64-bit ints, got {tdvmcall_info!r}")
        self.clock: Clock = clock
        self.bus = PortBus(on_device_error=on_device_error)
        self._stats = HostStats(direct=self.bus.stats)
        # Hot-path aliases; HostStats.reset() clears these containers in place.
        self._calls = self._stats.calls
        self._io_counts = self._stats.io.counts
        self.uart = Uart16550(0x3F8)
        self.debugcon = DebugConsole()
        self.post = PostCodePort()
        self.cmos = CmosRtc(clock, start=rtc_start)
        self.pci = PciHost()
        self.pm_timer = AcpiPmTimer(clock, port=pm_timer_port)
        self.i8042 = I8042()
        if pc:
            self._register_pc()
        self.cpuid = _check_cpuid(DEFAULT_CPUID if cpuid is None else cpuid)
        self.msrs = _check_msrs(DEFAULT_MSRS if msrs is None else msrs)
        if read_only_msrs is None:
            read_only_msrs = KVM_READ_ONLY_MSRS
        elif not all(type(m) is int and 0 <= m <= _U32 for m in read_only_msrs):
            raise InvalidArgumentError(f"read_only_msrs must hold 32-bit MSR indices, got {read_only_msrs!r}")
        self.read_only_msrs = frozenset(read_only_msrs)
        self.tdvmcall_info = tdvmcall_info
        self.on_halt = on_halt
        self.halted = False
        self.halt_count = 0
        self.hlt_irq_blocked = False
        self.fatal_reports: list[FatalReport] = []
        self._log: EventLog | None = None
        self.log = self._make_log(log)
        self._handlers: dict[int, tuple[str, Handler]] = self._builtin_handlers()
        self._vmm_handlers: dict[int, Handler] = {KVM_HC_VAPIC_POLL_IRQ: _vapic_poll_irq}

    # ------------------------------------------------------------ configuration
    def _register_pc(self) -> None:
        b = self.bus
        b.register(0x3F8, 8, self.uart, sizes=(1,), name="uart")
        b.register(0x402, 1, self.debugcon, sizes=(1,), name="debugcon")
        b.register(0xE9, 1, self.debugcon, sizes=(1,), name="debugcon")
        b.register(0x80, 1, self.post, sizes=(1,), name="post")
        b.register(0x70, 2, self.cmos, sizes=(1,), name="cmos")
        b.register(0xCF8, 8, self.pci, sizes=(1, 2, 4), name="pci")
        b.register(self.pm_timer.port, 4, self.pm_timer, sizes=(4,), name="pm_timer")
        b.register(0x60, 1, self.i8042, sizes=(1,), name="i8042")
        b.register(0x64, 1, self.i8042, sizes=(1,), name="i8042")

    def _builtin_handlers(self) -> dict[int, tuple[str, Handler]]:
        return {
            _CPUID: ("cpuid", self._cpuid),
            _HLT: ("hlt", self._hlt),
            _RDMSR: ("rdmsr", self._rdmsr),
            _WRMSR: ("wrmsr", self._wrmsr),
            _GET_TD_VM_CALL_INFO: ("get_td_vm_call_info", self._get_td_vm_call_info),
            _REPORT_FATAL_ERROR: ("report_fatal_error", self._report_fatal_error),
        }

    @staticmethod
    def _make_log(log: EventLog | int | bool | None) -> EventLog | None:
        if log is None or log is False:
            return None
        if log is True:
            return EventLog(DEFAULT_CAPACITY)
        if isinstance(log, EventLog):
            return log
        if type(log) is int:
            return EventLog(log)
        raise InvalidArgumentError(f"log must be None, a bool, a capacity or an EventLog, got {log!r}")

    @property
    def log(self) -> EventLog | None:
        """The event log (None when disabled); shared with :attr:`bus` for direct accesses."""
        return self._log

    @log.setter
    def log(self, value: EventLog | None) -> None:
        if value is not None and not isinstance(value, EventLog):
            raise InvalidArgumentError(f"log must be an EventLog or None, got {value!r}")
        self._log = value
        self.bus.log = value

    def enable_log(self, capacity: int = DEFAULT_CAPACITY) -> EventLog:
        """Start a fresh event log keeping the last ``capacity`` events and return it.

        :raises InvalidArgumentError: ``capacity`` is not a positive int.
        """
        self.log = EventLog(capacity)
        return self.log

    def set_handler(self, subfn: int, handler: Handler | None) -> None:
        """Serve standard sub-function ``subfn`` (R11) with ``handler(regs)``,
        which writes its own reply (R10, R11...); ``None`` restores the built-in
        behaviour (or SUBFUNC_UNSUPPORTED). Instruction.IO (30) cannot be
        replaced: register a device on :attr:`bus` instead. Exceptions from the
        handler propagate unchanged.

        :raises InvalidArgumentError: ``subfn`` is not a 64-bit int, is 30, or
            ``handler`` is not callable.
        """
        if type(subfn) is not int or not 0 <= subfn <= U64_MASK or subfn == _IO:
            raise InvalidArgumentError(f"subfn must be a 64-bit int other than 30 (IO), got {subfn!r}")
        builtin = self._builtin_handlers()
        if handler is None:
            if subfn in builtin:
                self._handlers[subfn] = builtin[subfn]
            else:
                self._handlers.pop(subfn, None)
            return
        if not callable(handler):
            raise InvalidArgumentError(f"handler must be callable, got {handler!r}")
        self._handlers[subfn] = ("user", handler)

    def set_vmm_handler(self, nr: int, handler: Handler | None) -> None:
        """Serve VMM-specific call number ``nr`` (R10 != 0) with ``handler(regs)``;
        ``None`` removes it (the call then answers ``-KVM_ENOSYS``).

        :raises InvalidArgumentError: ``nr`` is 0 or not a 64-bit int, or
            ``handler`` is not callable.
        """
        if type(nr) is not int or not 1 <= nr <= U64_MASK:
            raise InvalidArgumentError(f"VMM call number must be a non-zero 64-bit int, got {nr!r}")
        if handler is None:
            self._vmm_handlers.pop(nr, None)
            return
        if not callable(handler):
            raise InvalidArgumentError(f"handler must be callable, got {handler!r}")
        self._vmm_handlers[nr] = handler

    # ------------------------------------------------------------ state
    @property
    def stats(self) -> HostStats:
        """Counters (reset them with ``stats.reset()``)."""
        return self._stats

    @property
    def device_errors(self) -> list[DeviceErrorRecord]:
        """Device errors recorded by the bus (most recent 1024)."""
        return list(self.bus.device_errors)

    @property
    def reset_requested(self) -> int:
        """Reset requests the guest made (i8042 pulse/output port + PCI 0xCF9)."""
        return self.i8042.reset_requests + self.pci.reset_requests

    def reset(self) -> None:
        """Power-on reset of every device and of the halt state; statistics,
        the event log, captured output and reset counters are kept."""
        for dev in (self.uart, self.debugcon, self.post, self.cmos, self.pci, self.pm_timer, self.i8042):
            dev.reset()
        self.halted = False
        self.hlt_irq_blocked = False

    # ------------------------------------------------------------ TDG.VP.VMCALL
    def tdvmcall(self, regs: Regs) -> None:
        """Serve one TDG.VP.VMCALL from the host-visible register image ``regs``.

        Writes the reply into ``regs`` exactly as KVM does (class docstring).
        Never raises for register contents.

        :raises InvalidArgumentError: ``regs`` is not a :class:`~tdxve.regs.Regs`.
        :raises DeviceError: a device raised and the policy is ``"raise"``
            (``regs`` already holds R10 = INVALID_OPERAND).
        """
        if not isinstance(regs, Regs):
            raise InvalidArgumentError(f"tdvmcall() needs a tdxve.Regs register image, got {type(regs).__name__}")
        g = regs._g
        self.halted = False
        if g[10]:
            self._vmm_call(regs)
            return
        sub = g[11]
        calls = self._calls
        calls[sub] = calls.get(sub, 0) + 1
        if sub != _IO:
            self._other(regs, sub)
            return
        # Instruction.IO, inline because it is the hot path: tdx.c tdx_emulate_io (ref 5.2).
        size = g[12]
        write = g[13]
        if (write != 0 and write != 1) or (size != 1 and size != 2 and size != 4):
            self._io_rejected(g)
            return
        port = g[14] & 0xFFFF                       # unsigned short port in the PIO helpers
        bus = self.bus
        errors = bus.error_count
        c = self._io_counts.get(port)
        if c is None:
            c = self._io_counts[port] = [0, 0, 0, 0]
        if write:
            value = g[15] & _MASK[size]             # only `size` bytes of R15 reach the device
            c[1] += 1
            c[3] += size
            try:
                bus._write(port, size, value)
            except DeviceError:
                self._device_failed(g, port, size, 1, value)
                raise
        else:
            c[0] += 1
            c[2] += size
            try:
                value = bus._read(port, size)
            except DeviceError:
                self._device_failed(g, port, size, 0, -1)
                raise
        if bus.error_count != errors:               # policy "record": the guest still sees a failure
            self._device_failed(g, port, size, write, value if write else -1)
            return
        if not write:
            g[11] = value                           # zero-extended; R10 left as passed (0)
        log = self._log
        if log is not None:
            log.record("tdvmcall", "io", _IO, port, size, write, value, g[10], "")

    def _other(self, regs: Regs, sub: int) -> None:
        g = regs._g
        self._last_arg = g[12]
        self._last_value = -1
        entry = self._handlers.get(sub)
        if entry is None:
            g[10] = _SUBFUNC_UNSUPPORTED            # tdx.c handle_tdvmcall default
            name = "unsupported"
        else:
            name = entry[0]
            entry[1](regs)
        st = g[10]
        if st:
            f = self.stats.failures
            f[st] = f.get(st, 0) + 1
        log = self._log
        if log is not None:
            log.record("tdvmcall", name, sub, self._last_arg, -1, -1, self._last_value, st, "")

    def _io_rejected(self, g: list[int]) -> None:
        # write not 0/1 or size not 1/2/4: INVALID_OPERAND, nothing else (tdx_emulate_io).
        g[10] = _INVALID_OPERAND
        f = self.stats.failures
        f[_INVALID_OPERAND] = f.get(_INVALID_OPERAND, 0) + 1
        log = self._log
        if log is not None:
            log.record("tdvmcall", "io", _IO, g[14], g[12], g[13], -1, _INVALID_OPERAND, "")

    def _device_failed(self, g: list[int], port: int, size: int, write: int, value: int) -> None:
        g[10] = _INVALID_OPERAND
        f = self.stats.failures
        f[_INVALID_OPERAND] = f.get(_INVALID_OPERAND, 0) + 1
        log = self._log
        if log is not None:
            log.record("tdvmcall", "io", _IO, port, size, write, value, _INVALID_OPERAND, "device_error")

    def _vmm_call(self, regs: Regs) -> None:
        # tdx.c tdx_emulate_vmcall -> x86.c ____kvm_emulate_hypercall (nr = R10, a0..a3 = R11..R14).
        g = regs._g
        nr = g[10]
        vc = self.stats.vmm_calls
        vc[nr] = vc.get(nr, 0) + 1
        handler = self._vmm_handlers.get(nr)
        if handler is None:
            g[10] = KVM_ENOSYS                      # complete_hypercall_exit: R10 = -KVM_ENOSYS
        else:
            handler(regs)
        st = g[10]
        if st:
            f = self.stats.failures
            f[st] = f.get(st, 0) + 1
        log = self._log
        if log is not None:
            log.record("tdvmcall", "vmm", nr, g[11], -1, -1, -1, st, "")

    # Built-in handlers leave (arg, value) for the event log here (cheaper than returning tuples).
    _last_arg = -1
    _last_value = -1

    # ------------------------------------------------------------ sub-functions
    def _cpuid(self, regs: Regs) -> None:
        # tdx.c tdx_emulate_cpuid: EAX/ECX in from R12/R13 (u32), out to R12..R15.
        g = regs._g
        leaf = g[12] & _U32
        sub = g[13] & _U32
        self._last_arg, self._last_value = leaf, sub
        e = self.cpuid_lookup(leaf, sub)
        g[12], g[13], g[14], g[15] = e

    def cpuid_lookup(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """What CPUID ``leaf``/``subleaf`` answers (KVM ``kvm_cpuid`` rules, class docstring)."""
        t = self.cpuid
        e = t.get((leaf, subleaf))
        if e is None:
            e = t.get(leaf)
        if e is not None:
            return e
        return self._out_of_range(leaf, subleaf)

    def _class_entry(self, leaf: int) -> tuple[int, int, int, int] | None:
        # kvm_find_cpuid_entry(vcpu, leaf): index not significant.
        t = self.cpuid
        e = t.get(leaf)
        if e is None:
            e = t.get((leaf, 0))
        if e is None:
            for k, v in t.items():
                if isinstance(k, tuple) and k[0] == leaf:
                    return v
        return e

    def _out_of_range(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        # cpuid.c get_out_of_range_cpuid_entry (Intel only).
        basic = self._class_entry(0)
        if basic is None:
            return (0, 0, 0, 0)
        vendor = (basic[1], basic[3], basic[2])     # EBX, EDX, ECX spell the vendor string
        if vendor in ((0x68747541, 0x69746E65, 0x444D4163),      # "AuthenticAMD"
                      (0x6F677948, 0x6E65476E, 0x656E6975)):     # "HygonGenuine"
            return (0, 0, 0, 0)
        if 0x40000000 <= leaf <= 0x4FFFFFFF:
            cls = self._class_entry(leaf & 0xFFFFFF00)
        elif leaf >= 0xC0000000:
            cls = self._class_entry(0xC0000000)
        else:
            cls = self._class_entry(leaf & 0x80000000)
        if cls is not None and leaf <= cls[0]:
            return (0, 0, 0, 0)
        t = self.cpuid
        e = t.get((basic[0], subleaf))
        if e is None:
            e = t.get(basic[0])
        return e if e is not None else (0, 0, 0, 0)

    def _hlt(self, regs: Regs) -> None:
        # tdx.c -> kvm_emulate_halt_noskip; R12 = interrupts blocked (tdx_interrupt_allowed).
        g = regs._g
        blocked = bool(g[12])
        self._last_arg, self._last_value = g[12], -1
        self.halted = True
        self.halt_count += 1
        self.hlt_irq_blocked = blocked
        cb = self.on_halt
        if cb is not None:
            cb(blocked)

    def _rdmsr(self, regs: Regs) -> None:
        # tdx.c: RCX := R12, kvm_emulate_rdmsr (ECX is 32 bits); tdx_complete_emulated_msr.
        g = regs._g
        idx = g[12] & _U32
        v = self.msrs.get(idx)
        self._last_arg, self._last_value = idx, -1 if v is None else v
        if v is None:
            g[10] = _INVALID_OPERAND
        else:
            g[11] = v

    def _wrmsr(self, regs: Regs) -> None:
        # tdx.c: RCX := R12, EDX:EAX := R13; unknown or read-only -> INVALID_OPERAND.
        g = regs._g
        idx = g[12] & _U32
        v = g[13]
        self._last_arg, self._last_value = idx, v
        if idx not in self.msrs or idx in self.read_only_msrs:
            g[10] = _INVALID_OPERAND
        else:
            self.msrs[idx] = v

    def _get_td_vm_call_info(self, regs: Regs) -> None:
        # tdx.c tdx_get_td_vm_call_info.
        g = regs._g
        leaf = g[12]
        self._last_arg, self._last_value = leaf, -1
        if leaf == 0:
            g[11] = g[12] = g[13] = g[14] = 0
            g[10] = _SUCCESS
        elif leaf == 1:
            g[11], g[12], g[13], g[14] = self.tdvmcall_info
            g[10] = _SUCCESS
        else:
            g[10] = _INVALID_OPERAND

    def _report_fatal_error(self, regs: Regs) -> None:
        # tdx.c tdx_report_fatal_error: exit to user space with the registers.
        self._last_arg, self._last_value = regs._g[12], -1
        self.fatal_reports.append(FatalReport(regs._g[12], regs.copy()))

    def __repr__(self) -> str:
        return f"Host({self.bus!r}, calls={self.stats.total_calls})"


def _vapic_poll_irq(regs: Regs) -> None:
    # x86.c: case KVM_HC_VAPIC_POLL_IRQ: ret = 0.
    regs._g[10] = 0
