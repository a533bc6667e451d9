"""Counters: per TDVMCALL sub-function and per port and direction."""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

__all__ = ["PortCounts", "PortStats", "HostStats", "PORT_STATS_DTYPE"]

#: :meth:`PortStats.to_array` record layout.
PORT_STATS_DTYPE = np.dtype([("port", "<u2"), ("reads", "<u8"), ("writes", "<u8"),
                             ("read_bytes", "<u8"), ("write_bytes", "<u8")])


class PortCounts(NamedTuple):
    """Accesses to one port: counts and bytes per direction."""

    reads: int
    writes: int
    read_bytes: int
    write_bytes: int


class PortStats:
    """Per-port access counters.

    An access is counted once, at the port the guest named, with the size it
    asked for (an access the bus splits is still one access).

    The storage is ``counts``: a dict ``port -> [reads, writes, read_bytes,
    write_bytes]`` holding only ports that were touched.
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[int, list[int]] = {}

    def add_read(self, port: int, size: int) -> None:
        """Count one read of ``size`` bytes at ``port``."""
        c = self.counts.get(port)
        if c is None:
            c = self.counts[port] = [0, 0, 0, 0]
        c[0] += 1
        c[2] += size

    def add_write(self, port: int, size: int) -> None:
        """Count one write of ``size`` bytes at ``port``."""
        c = self.counts.get(port)
        if c is None:
            c = self.counts[port] = [0, 0, 0, 0]
        c[1] += 1
        c[3] += size

    def __getitem__(self, port: int) -> PortCounts:
        c = self.counts.get(port)
        return PortCounts(0, 0, 0, 0) if c is None else PortCounts(*c)

    def __len__(self) -> int:
        return len(self.counts)

    def ports(self) -> list[int]:
        """Ports that saw at least one access, ascending."""
        return sorted(self.counts)

    def items(self) -> Iterator[tuple[int, PortCounts]]:
        """``(port, PortCounts)`` for every touched port, ascending."""
        for p in sorted(self.counts):
            yield p, PortCounts(*self.counts[p])

    @property
    def reads(self) -> int:
        """Total reads."""
        return sum(c[0] for c in self.counts.values())

    @property
    def writes(self) -> int:
        """Total writes."""
        return sum(c[1] for c in self.counts.values())

    @property
    def bytes(self) -> int:
        """Total bytes moved in both directions."""
        return sum(c[2] + c[3] for c in self.counts.values())

    def reset(self) -> None:
        """Zero every counter."""
        self.counts.clear()

    def to_array(self) -> np.ndarray:
        """Touched ports as a :data:`PORT_STATS_DTYPE` array, ascending by port."""
        out = np.zeros(len(self.counts), dtype=PORT_STATS_DTYPE)
        for i, p in enumerate(sorted(self.counts)):
            out[i] = (p, *self.counts[p])
        return out

    def __repr__(self) -> str:
        return f"PortStats({len(self.counts)} ports, {self.reads} reads, {self.writes} writes)"


class HostStats:
    """What the host served.

    * ``calls``: standard TDVMCALLs (R10 = 0) by sub-function number (R11),
      including unknown sub-functions and rejected ones;
    * ``vmm_calls``: VMM-specific calls (R10 != 0) by R10;
    * ``failures``: non-zero statuses returned in R10, by status;
    * ``io``: per-port counters of Instruction.IO calls that reached the bus;
    * ``direct``: per-port counters of direct :class:`~tdxve.host.PortBus`
      accesses (``bus.read``/``bus.write``: firmware modes, no #VE).
    """

    __slots__ = ("calls", "vmm_calls", "failures", "io", "direct")

    def __init__(self, direct: PortStats | None = None) -> None:
        self.calls: dict[int, int] = {}
        self.vmm_calls: dict[int, int] = {}
        self.failures: dict[int, int] = {}
        self.io = PortStats()
        self.direct = direct if direct is not None else PortStats()

    @property
    def total_calls(self) -> int:
        """Every TDVMCALL served (standard and VMM-specific)."""
        return sum(self.calls.values()) + sum(self.vmm_calls.values())

    def ports(self) -> dict[int, PortCounts]:
        """TDVMCALL and direct accesses summed per port."""
        out: dict[int, PortCounts] = {}
        for stats in (self.io, self.direct):
            for p, c in stats.counts.items():
                o = out.get(p, PortCounts(0, 0, 0, 0))
                out[p] = PortCounts(o.reads + c[0], o.writes + c[1], o.read_bytes + c[2], o.write_bytes + c[3])
        return dict(sorted(out.items()))

    def reset(self) -> None:
        """Zero every counter (including the bus's direct counters)."""
        self.calls.clear()
        self.vmm_calls.clear()
        self.failures.clear()
        self.io.reset()
        self.direct.reset()

    def __repr__(self) -> str:
        return (f"HostStats(calls={dict(sorted(self.calls.items()))}, vmm_calls={self.vmm_calls}, "
                f"failures={ {hex(k): v for k, v in self.failures.items()} }, io={self.io!r}, "
                f"direct={self.direct!r})")
