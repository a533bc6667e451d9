"""Embedding: drive tdxve from CPU simulators.

* :class:`GuestCpu` -- a small protocol any simulator implements (mode, CPL,
  registers by name, memory by linear address) -- and
  :func:`execute_port_io` / :func:`execute_halt`, which run a port-I/O
  instruction (or HLT) through a :class:`tdxve.machine.Machine` exactly as a
  TD would: through #VE in 64-bit mode, straight to the host's devices in real
  mode and 16/32-bit protected mode.
* :mod:`tdxve.embed.unicorn` -- ``attach(uc, machine)`` for Unicorn 2.1,
  imported on first use (``import tdxve.embed`` never imports unicorn).

See ``docs/embedding.md``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .cpu import (
    REGISTER_NAMES,
    SEGMENT_BASE_NAMES,
    ExitCounts,
    GuestCpu,
    IoCounts,
    IoEvent,
    IoStats,
    bound_memory,
    cpu_cpl,
    cpu_mode,
    execute_halt,
    execute_port_io,
    fetch_code,
    mode_label,
    usable_code_descriptor,
)

__all__ = [
    "GuestCpu", "IoEvent", "IoStats", "IoCounts", "ExitCounts",
    "execute_port_io", "execute_halt", "cpu_mode", "cpu_cpl", "mode_label",
    "usable_code_descriptor", "fetch_code", "bound_memory",
    "REGISTER_NAMES", "SEGMENT_BASE_NAMES",
]


def __getattr__(name: str) -> ModuleType:
    # ``tdxve.embed.unicorn`` without an explicit import: load it on first use.
    if name == "unicorn":
        return importlib.import_module(".unicorn", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
