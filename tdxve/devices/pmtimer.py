"""ACPI power-management timer (ACPI 6.x, 4.8.3.3 "Power Management Timer").

A free-running 24-bit counter at 3.579545 MHz, read as a 32-bit register
(PM_TMR_BLK); with TMR_VAL_EXT = 0 (FADT flag, the common case and QEMU's)
bits 31:24 read 0 and the counter wraps every 2**24 ticks (about 4.69 s).
Writes are ignored (QEMU ``acpi_pm_tmr_write`` is empty). The register is
dword-only, as QEMU declares it (``valid.min/max_access_size = 4``), so the
standard PC registers it with ``sizes=(4,)``.

The value is ``floor(t_ns * 3579545 / 10**9) mod 2**24`` for the time ``t``
since the timer's origin, computed in integers, so it is exact and
deterministic with a :class:`~tdxve.devices.ManualClock` or
:class:`~tdxve.devices.SteppingClock`.

State: ``origin_ns`` (clock time at which the counter was 0).
"""

from __future__ import annotations

from ..errors import InvalidArgumentError
from .clock import Clock

__all__ = ["AcpiPmTimer", "PM_TIMER_HZ"]

#: ACPI PM timer frequency (ACPI 4.8.3.3).
PM_TIMER_HZ = 3_579_545
PM_TIMER_MASK = 0xFF_FFFF
#: PM_TMR_BLK on QEMU's PIIX4 and ICH9 (PMBASE 0x600 + 8).
DEFAULT_PORT = 0x608


class AcpiPmTimer:
    """The ACPI PM timer at ``port`` (4 bytes).

    :param clock: time source.
    :param port: PM_TMR_BLK port (default 0x608).
    :raises InvalidArgumentError: bad ``port`` or clock.
    """

    def __init__(self, clock: Clock, *, port: int = DEFAULT_PORT) -> None:
        if not callable(getattr(clock, "now_ns", None)):
            raise InvalidArgumentError(f"clock must have a now_ns() method, got {clock!r}")
        if type(port) is not int or not 0 <= port <= 0xFFFC:
            raise InvalidArgumentError(f"PM timer port must be an int in [0, 0xFFFC], got {port!r}")
        self.clock = clock
        self.port = port
        self.origin_ns = 0

    def reset(self) -> None:
        """Restart the counter from 0 now."""
        self.origin_ns = self.clock.now_ns()

    @staticmethod
    def ticks(ns: int) -> int:
        """Counter value after ``ns`` nanoseconds (24-bit)."""
        return (ns * PM_TIMER_HZ // 1_000_000_000) & PM_TIMER_MASK

    def read(self, port: int, size: int) -> int:
        """The 24-bit counter, zero-extended to 32 bits."""
        return ((self.clock.now_ns() - self.origin_ns) * PM_TIMER_HZ // 1_000_000_000) & PM_TIMER_MASK

    def write(self, port: int, size: int, value: int) -> None:
        """Ignored: the register is read-only."""

    def __repr__(self) -> str:
        return f"AcpiPmTimer(port={self.port:#x})"
