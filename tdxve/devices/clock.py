"""Clocks that drive the time-keeping devices (ACPI PM timer, CMOS RTC).

A clock is any object with ``now_ns() -> int`` returning nanoseconds since
"power-on" (a non-negative, never-decreasing int). Three are provided:

* :class:`ManualClock` -- time moves only when the user says so
  (``advance``/``set``). Fully deterministic; a guest that busy-waits on the
  PM timer never sees it move, so use it for unit tests, not for running
  guest code that polls.
* :class:`SteppingClock` -- every reading advances time by a fixed step
  (default 1 us, about the cost of one port-I/O exit on real hardware).
  Deterministic *and* polling loops terminate: this is :class:`tdxve.Host`'s
  default.
* :class:`MonotonicClock` -- host wall time (``time.monotonic_ns``), for
  interactive use. Not deterministic.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

from ..errors import InvalidArgumentError

__all__ = ["Clock", "ManualClock", "SteppingClock", "MonotonicClock"]


@runtime_checkable
class Clock(Protocol):
    """What the time-keeping devices need: nanoseconds since power-on."""

    def now_ns(self) -> int:
        """Current time in nanoseconds (non-negative, never decreasing)."""
        ...


def _check_ns(name: str, value: object) -> int:
    if type(value) is not int or value < 0:
        raise InvalidArgumentError(f"{name} must be a non-negative int (nanoseconds), got {value!r}")
    return value


class ManualClock:
    """A clock that moves only when told to.

    :param start_ns: initial time in nanoseconds.
    :raises InvalidArgumentError: ``start_ns`` is not a non-negative int.
    """

    __slots__ = ("ns",)

    def __init__(self, start_ns: int = 0) -> None:
        #: Current time in nanoseconds (plain state; prefer :meth:`advance`).
        self.ns = _check_ns("start_ns", start_ns)

    def now_ns(self) -> int:
        """Current time; reading does not advance it."""
        return self.ns

    def advance(self, ns: int) -> None:
        """Move time forward by ``ns`` nanoseconds.

        :raises InvalidArgumentError: ``ns`` is negative or not an int.
        """
        self.ns += _check_ns("ns", ns)

    def set(self, ns: int) -> None:
        """Set the absolute time; time never goes backwards.

        :raises InvalidArgumentError: ``ns`` is not an int, or is earlier than now.
        """
        _check_ns("ns", ns)
        if ns < self.ns:
            raise InvalidArgumentError(f"clock cannot go backwards: now {self.ns} ns, asked {ns} ns")
        self.ns = ns

    def __repr__(self) -> str:
        return f"ManualClock(ns={self.ns})"


class SteppingClock:
    """Deterministic virtual time: each reading returns the current time, then
    advances it by ``step_ns`` (an "instruction count" clock in the spirit of
    QEMU's ``-icount``).

    :param step_ns: nanoseconds added after every :meth:`now_ns` (> 0).
    :param start_ns: initial time.
    :raises InvalidArgumentError: a non-int, a negative value, or ``step_ns == 0``.
    """

    __slots__ = ("ns", "step_ns")

    def __init__(self, step_ns: int = 1_000, start_ns: int = 0) -> None:
        if _check_ns("step_ns", step_ns) == 0:
            raise InvalidArgumentError("step_ns must be > 0 (use ManualClock for a clock that stands still)")
        self.step_ns = step_ns
        self.ns = _check_ns("start_ns", start_ns)

    def now_ns(self) -> int:
        """Current time; then time advances by ``step_ns``."""
        t = self.ns
        self.ns = t + self.step_ns
        return t

    def advance(self, ns: int) -> None:
        """Move time forward by ``ns`` nanoseconds on top of the stepping.

        :raises InvalidArgumentError: ``ns`` is negative or not an int.
        """
        self.ns += _check_ns("ns", ns)

    def __repr__(self) -> str:
        return f"SteppingClock(step_ns={self.step_ns}, ns={self.ns})"


class MonotonicClock:
    """Host time since construction (``time.monotonic_ns``); not deterministic."""

    __slots__ = ("_origin",)

    def __init__(self) -> None:
        self._origin = time.monotonic_ns()

    def now_ns(self) -> int:
        """Nanoseconds since this clock was created."""
        return time.monotonic_ns() - self._origin

    def __repr__(self) -> str:
        return "MonotonicClock()"
