"""The host side: a KVM-faithful TDG.VP.VMCALL service in front of a PC's port bus.

* :class:`Host` -- serves one TDVMCALL from a register image
  (``host.tdvmcall(regs)``) with KVM's semantics, owns :class:`PortBus` and the
  standard PC devices (:mod:`tdxve.devices`), counts everything
  (:class:`HostStats`) and can keep a bounded :class:`EventLog`.
* :class:`PortBus` -- the 16-bit port space: registration, unassigned ports
  (all-ones), QEMU-style splitting of accesses a device does not accept,
  device-error containment.
* :class:`FaultyHost` / :class:`FaultPlan` -- deterministic, seeded fault
  injection for hardening tests.

See ``docs/host.md`` for the rules and the choices made where the references
are silent.
"""

from __future__ import annotations

from .bus import DEVICE_ERROR_POLICIES, DeviceErrorRecord, PortBus, PortDevice, PortRange
from .faults import STATUS_FAULTS, FaultKind, FaultPlan, FaultRecord, FaultyHost
from .host import (
    DEFAULT_CPUID,
    DEFAULT_MSRS,
    KVM_ENOSYS,
    KVM_HC_VAPIC_POLL_IRQ,
    KVM_READ_ONLY_MSRS,
    FatalReport,
    Host,
)
from .log import LOG_FORMAT_HEADER, Event, EventLog
from .stats import PORT_STATS_DTYPE, HostStats, PortCounts, PortStats

__all__ = [
    "Host", "FaultyHost", "FaultPlan", "FaultKind", "FaultRecord", "STATUS_FAULTS",
    "PortBus", "PortDevice", "PortRange", "DeviceErrorRecord", "DEVICE_ERROR_POLICIES",
    "EventLog", "Event", "LOG_FORMAT_HEADER",
    "HostStats", "PortStats", "PortCounts", "PORT_STATS_DTYPE",
    "FatalReport", "DEFAULT_CPUID", "DEFAULT_MSRS", "KVM_READ_ONLY_MSRS",
    "KVM_ENOSYS", "KVM_HC_VAPIC_POLL_IRQ",
]
