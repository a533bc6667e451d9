"""Port-I/O device models for :class:`tdxve.Host`'s standard PC.

Every device is a plain object with ``read(port, size) -> int`` and
``write(port, size, value)`` taking absolute port numbers (the
:class:`tdxve.host.PortDevice` protocol), keeps its state in plain,
documented attributes and has ``reset()`` for the power-on state.

=====================  ====================  ======  =========================
device                  ports                 sizes   datasheet / model
=====================  ====================  ======  =========================
:class:`Uart16550`      0x3F8-0x3FF           1       PC16550D; QEMU serial
:class:`DebugConsole`   0x402, 0xE9           1       QEMU isa-debugcon
:class:`PostCodePort`   0x80                  1       POST code latch
:class:`CmosRtc`        0x70-0x71             1       MC146818A; QEMU mc146818rtc
:class:`PciHost`        0xCF8-0xCFF           1,2,4   PCI 3.0 config mechanism #1
:class:`AcpiPmTimer`    0x608-0x60B           4       ACPI PM timer, 3.579545 MHz
:class:`I8042`          0x60, 0x64            1       i8042; QEMU pckbd
=====================  ====================  ======  =========================
"""

from __future__ import annotations

from .clock import Clock, ManualClock, MonotonicClock, SteppingClock
from .cmos import CmosRtc
from .i8042 import I8042
from .pci import PciFunction, PciHost, type0_w1cmask, type0_wmask
from .pmtimer import PM_TIMER_HZ, AcpiPmTimer
from .simple import DebugConsole, PostCodePort
from .uart import Uart16550

__all__ = [
    "Uart16550", "DebugConsole", "PostCodePort", "CmosRtc", "PciHost", "PciFunction",
    "AcpiPmTimer", "I8042",
    "Clock", "ManualClock", "SteppingClock", "MonotonicClock",
    "PM_TIMER_HZ", "type0_wmask", "type0_w1cmask",
]
