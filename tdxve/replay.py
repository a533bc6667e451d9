"""Batch replay: millions of port-I/O events through the whole #VE round trip.

:func:`replay` runs an :data:`EVENT_DTYPE` array through a
:class:`~tdxve.machine.Machine` with exactly the semantics of a loop of
``machine.execute_exit(Regs(rax=e.rax), 30, exit_qual=e.exit_qual,
instr_len=e.instr_len)`` -- the guest profile's exit-qualification decode,
the TDVMCALL register image, the host's validation, bus dispatch, the RAX
merge, RIP advance or failure -- in one call into the compiled core, which
releases the GIL. Results, device state, host statistics, the host event log
and the TDX module's counters afterwards are those the loop leaves
(``tests/test_replay_diff.py`` checks it on random events for every profile).

Devices with a compiled form run without Python: :class:`LatchDevice`,
:class:`CountingSink`, the 16550A UART (:class:`~tdxve.devices.Uart16550`:
transmit path, line status, the register file; receive-side operations go to
Python), POST (:class:`~tdxve.devices.PostCodePort`), the debug console,
CMOS (:class:`~tdxve.devices.CmosRtc`: index and RAM; the clock registers go
to Python) and PCI configuration mechanism #1
(:class:`~tdxve.devices.PciHost` with :class:`~tdxve.devices.PciFunction`
config spaces), as do unassigned ports. Any other device -- or any access a
compiled form leaves to Python -- is one Python call for that access only;
device state is synced both ways around it. A host that is not a plain
:class:`tdxve.host.Host` (a :class:`~tdxve.host.FaultyHost`, your own) is
called through Python for every TDVMCALL, with the guest side still compiled.

``docs/replay.md`` lists the fault codes, what replay refuses, the chunked
API for files larger than memory and every choice made where the issue is
silent.
"""

from __future__ import annotations

import mmap
import operator
import os
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import _replay_py as K
from . import guest as _guest_mod
from ._backend import core as _default_core
from .abi import EVENT_DTYPE, RESULT_DTYPE, U64_MASK, VMCALL_RCX_FORBIDDEN_GPRS, VMCALL_RCX_NO_RBP_MOD, \
    VMCALL_RCX_RESERVED_MASK, ExitReason, Gpr, ReplayFault, TdcallLeaf, TdvmcallSubfn
from .devices.cmos import CmosRtc
from .devices.pci import PciFunction, PciHost
from .devices.simple import DebugConsole, PostCodePort
from .devices.uart import Uart16550
from .errors import DeviceError, InvalidArgumentError, ReplayError, ReplayUnsupportedError
from .guest import Guest
from .host.bus import PortBus
from .host.host import Host
from .machine import Machine
from .regs import Regs
from .tdx import TdxModule

__all__ = [
    "replay", "replay_chunks", "replay_file", "Replayer", "ReplaySummary", "PortSummary",
    "io_events", "LatchDevice", "CountingSink",
    "EVENT_DTYPE", "RESULT_DTYPE", "ReplayFault", "UNASSIGNED_CHOICES", "DEFAULT_CHUNK",
]

#: ``unassigned=`` choices: ``"machine"`` (bytes no device serves read as the
#: bus says: all-ones, or ``bus.unassigned_reply``) or ``"reply"`` (each
#: event's ``reply`` field).
UNASSIGNED_CHOICES = ("machine", "reply")
#: Events per chunk of :func:`replay_chunks` / :func:`replay_file` (32 MiB of events).
DEFAULT_CHUNK = 1 << 20
# Output rows (UART/POST/debugcon bytes) and log rows buffered before Python flushes them.
_OUTBUF_ROWS = 1 << 20
_LOGBUF_ROWS = 1 << 16
_U32 = 0xFFFFFFFF
_IO = int(ExitReason.IO_INSTRUCTION)
_INVALID_OPERAND = K.INVALID_OPERAND


# ==========================================================================
# Devices with a compiled form that the standard PC does not have
# ==========================================================================
class LatchDevice:
    """A register: reads return the last value written (``writable=True``) or
    always ``value`` (``writable=False``, a constant).

    The bus keeps the low ``size`` bytes of a read, and a write stores the
    value the bus passes (already truncated to the access size), so a 1-byte
    write of 0x41 then a 4-byte read gives 0x41. Any access size is accepted;
    register it with the sizes you want (``host.bus.register(0x5000, 1,
    LatchDevice(0xAB))``). Compiled in :func:`replay`.

    :param value: initial (or constant) value, an int in ``[0, 2**64)``.
    :param writable: False makes writes no-ops.
    :raises InvalidArgumentError: a bad argument.

    State: ``value``.
    """

    def __init__(self, value: int = 0, *, writable: bool = True) -> None:
        if type(value) is not int or not 0 <= value <= U64_MASK:
            raise InvalidArgumentError(f"LatchDevice value must be an int in [0, 2**64), got {value!r}")
        if writable is not True and writable is not False:
            raise InvalidArgumentError(f"writable must be a bool, got {writable!r}")
        self.value = value
        self.writable = writable
        self._initial = value

    def reset(self) -> None:
        """Back to the initial value."""
        self.value = self._initial

    def read(self, port: int, size: int) -> int:
        """The latched value."""
        return self.value

    def write(self, port: int, size: int, value: int) -> None:
        """Latch ``value`` (ignored when not writable)."""
        if self.writable:
            self.value = value

    def __repr__(self) -> str:
        return f"LatchDevice(value={self.value:#x}, writable={self.writable})"


class CountingSink:
    """Drops every write and counts it; reads answer ``readback``.

    Counters: ``reads``, ``writes`` (accesses the device received -- a split
    access counts once per piece) and ``bytes_read``, ``bytes_written``.
    Compiled in :func:`replay`.

    :param readback: what reads return (the bus keeps the low ``size`` bytes).
    :raises InvalidArgumentError: ``readback`` is not an int in ``[0, 2**64)``.
    """

    def __init__(self, readback: int = 0xFFFFFFFF) -> None:
        if type(readback) is not int or not 0 <= readback <= U64_MASK:
            raise InvalidArgumentError(f"readback must be an int in [0, 2**64), got {readback!r}")
        self.readback = readback
        self.reads = 0
        self.writes = 0
        self.bytes_read = 0
        self.bytes_written = 0

    def reset(self) -> None:
        """Zero the counters."""
        self.reads = self.writes = self.bytes_read = self.bytes_written = 0

    def read(self, port: int, size: int) -> int:
        """Count the read; ``readback``."""
        self.reads += 1
        self.bytes_read += size
        return self.readback

    def write(self, port: int, size: int, value: int) -> None:
        """Count the write and drop it."""
        self.writes += 1
        self.bytes_written += size

    def __repr__(self) -> str:
        return (f"CountingSink(reads={self.reads}, writes={self.writes}, "
                f"bytes_read={self.bytes_read}, bytes_written={self.bytes_written})")


# ==========================================================================
# Events
# ==========================================================================
def io_events(port: Any, size: Any, is_in: Any, *, rax: Any = 0, reply: Any = _U32, instr_len: Any = 1,
              string: Any = False, rep: Any = False, imm: Any = False) -> np.ndarray:
    """Build an :data:`EVENT_DTYPE` array from per-field values (scalars or arrays, broadcast).

    The exit qualification is what the CPU reports (SDM Table 27-5, ref 3.1):
    size encoding, direction, string, REP and immediate bits and the port in
    bits 31:16. For qualifications no instruction produces (size encodings
    2, 4-7, reserved bits) fill ``exit_qual`` directly.

    :param port: 0-0xFFFF.
    :param size: 1, 2 or 4.
    :param is_in: True for IN/INS.
    :param rax: RAX before the instruction.
    :param reply: what unassigned ports answer under ``unassigned="reply"``.
    :param instr_len: VM-exit instruction length (e.g. 1 for ``in al, dx``).
    :param string: INS/OUTS (bit 4).
    :param rep: REP prefixed (bit 5).
    :param imm: immediate port operand (bit 6; ports up to 0xFF).
    :returns: a new 1-D array (0-D inputs give one event).
    :raises InvalidArgumentError: a value out of range or not an integer.
    """
    arrs = np.broadcast_arrays(*(np.asarray(a) for a in (port, size, is_in, rax, reply, instr_len,
                                                           string, rep, imm)))
    names = ("port", "size", "is_in", "rax", "reply", "instr_len", "string", "rep", "imm")
    for name, a in zip(names, arrs):
        if a.dtype.kind not in "uib":
            raise InvalidArgumentError(f"io_events: {name} must be integers, got dtype {a.dtype}")
    p, s, d, rx, rp, il, st, rpt, im = (a.reshape(-1) for a in arrs)
    for name, a, hi in (("port", p, 0xFFFF), ("instr_len", il, _U32), ("rax", rx, U64_MASK),
                        ("reply", rp, U64_MASK)):
        if a.size and (a.min() < 0 or (a.dtype.kind != "u" and int(a.max()) > hi)
                       or (a.dtype.kind == "u" and int(a.max()) > hi)):
            raise InvalidArgumentError(f"io_events: {name} must be in [0, {hi:#x}], "
                                       f"got values in [{int(a.min())}, {int(a.max())}]")
    if s.size and not np.isin(s, (1, 2, 4)).all():
        bad = int(s[~np.isin(s, (1, 2, 4))][0])
        raise InvalidArgumentError(f"io_events: size must be 1, 2 or 4, got {bad}")
    if im.size and (im.astype(bool) & ((p > 0xFF) | st.astype(bool))).any():
        raise InvalidArgumentError("io_events: an immediate port must be <= 0xFF and not on INS/OUTS")
    out = np.zeros(p.shape[0], dtype=EVENT_DTYPE)
    enc = np.where(s == 1, 0, np.where(s == 2, 1, 3)).astype(np.uint64)
    out["exit_qual"] = (enc | (d.astype(bool).astype(np.uint64) << np.uint64(3))
                        | (st.astype(bool).astype(np.uint64) << np.uint64(4))
                        | (rpt.astype(bool).astype(np.uint64) << np.uint64(5))
                        | (im.astype(bool).astype(np.uint64) << np.uint64(6))
                        | (p.astype(np.uint64) << np.uint64(16)))
    out["rax"] = rx.astype(np.uint64)
    out["reply"] = rp.astype(np.uint64)
    out["instr_len"] = il.astype(np.uint32)
    return out


_REQUIRED_FIELDS = ("exit_qual", "instr_len", "rax", "reply")


def _as_events(events: Any) -> np.ndarray:
    if not isinstance(events, np.ndarray) or events.dtype.names is None:
        raise InvalidArgumentError(
            f"events must be a numpy structured array of EVENT_DTYPE, got {type(events).__name__}"
            + (f" of dtype {events.dtype}" if isinstance(events, np.ndarray) else ""))
    if events.ndim != 1:
        raise InvalidArgumentError(f"events must be 1-D, got shape {events.shape}")
    if events.dtype == EVENT_DTYPE:
        return events
    missing = [f for f in _REQUIRED_FIELDS if f not in events.dtype.names]
    if missing:
        raise InvalidArgumentError(f"events lack the field(s) {', '.join(missing)} of EVENT_DTYPE")
    for f in _REQUIRED_FIELDS:
        if events.dtype[f].kind not in "ui":
            raise InvalidArgumentError(f"events field {f!r} must be an integer, got {events.dtype[f]}")
    return events


def _chunk_events(events: np.ndarray, lo: int, hi: int) -> np.ndarray:
    # A C-contiguous EVENT_DTYPE view (or converted copy) of events[lo:hi].
    part = events[lo:hi]
    if part.dtype == EVENT_DTYPE:
        return part if part.flags.c_contiguous else np.ascontiguousarray(part)
    out = np.zeros(hi - lo, dtype=EVENT_DTYPE)
    for f in _REQUIRED_FIELDS:
        col = part[f]
        if col.dtype.kind == "i" and col.size and col.min() < 0:
            raise InvalidArgumentError(f"events field {f!r} has negative values")
        out[f] = col
    return out


def _check_out(out: Any, n: int) -> np.ndarray:
    if (not isinstance(out, np.ndarray) or out.dtype != RESULT_DTYPE or out.ndim != 1
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise InvalidArgumentError(
            "out must be a writeable, C-contiguous 1-D array of RESULT_DTYPE, got "
            + (f"{out.dtype} shape {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__))
    if out.shape[0] != n:
        raise InvalidArgumentError(f"out has {out.shape[0]} records for {n} events")
    return out


# ==========================================================================
# Compiled device forms: sync between the objects and the kernel's arrays
# ==========================================================================
def _is_int(v: Any, hi: int) -> bool:
    return type(v) is int and 0 <= v <= hi


def _own_methods(dev: Any, cls: type) -> bool:
    # The class's own read/write, not replaced on the instance.
    d = getattr(dev, "__dict__", {})
    return type(dev) is cls and "read" not in d and "write" not in d


class _Adapter:
    """How one device object maps to a dstate row (internal).

    ``key(dev)`` is a cheap snapshot of everything the row depends on (scalar
    state and the identities of shared buffers); the row is rebuilt only when
    it changes, so re-reading the devices after a Python call costs one tuple
    per device. ``row`` validates and returns the 16 words, or None when the
    object is not in a state the compiled form handles (then Python serves it).
    """

    kind = K.DEV_PY
    outputs = False

    def __init__(self, dev: Any) -> None:
        self.dev = dev
        self.cache: Any = None

    def key(self, d: Any) -> Any:
        return None

    def row(self, d: Any, plan: _Plan) -> list[int] | None:
        return None

    def store(self, w: list[int], d: Any) -> None:
        pass

    def emit(self, data: np.ndarray) -> None:
        pass


def _u8(*vals: Any) -> bool:
    return all(type(v) is int and 0 <= v <= 0xFF for v in vals)


def _u64(*vals: Any) -> bool:
    return all(type(v) is int and 0 <= v <= U64_MASK for v in vals)


def _words(kind: int, *vals: int) -> list[int]:
    w = [kind, 0, *vals]
    return w + [0] * (K.NWORDS - len(w))


class _LatchAdapter(_Adapter):
    kind = K.DEV_LATCH

    def key(self, d: Any) -> Any:
        return (d.value, d.writable)

    def row(self, d: Any, plan: _Plan) -> list[int] | None:
        if not _u64(d.value) or type(d.writable) is not bool:
            return None
        return _words(self.kind, d.value, int(d.writable))

    def store(self, w: list[int], d: Any) -> None:
        d.value = w[K.W_LATCH_VALUE]


class _SinkAdapter(_Adapter):
    kind = K.DEV_SINK

    def key(self, d: Any) -> Any:
        return (d.readback, d.reads, d.writes, d.bytes_read, d.bytes_written)

    def row(self, d: Any, plan: _Plan) -> list[int] | None:
        vals = self.key(d)
        return _words(self.kind, *vals) if _u64(*vals) else None

    def store(self, w: list[int], d: Any) -> None:
        d.reads = w[K.W_SINK_READS]
        d.writes = w[K.W_SINK_WRITES]
        d.bytes_read = w[K.W_SINK_RBYTES]
        d.bytes_written = w[K.W_SINK_WBYTES]


# W_UART_IER .. W_UART_MSR_DELTA and W_UART_MODEM_LINES, in word order
_UART_REGS = ("ier", "lcr", "mcr", "fcr", "scr", "dll", "dlm", "rbr")
_UART_KEY = operator.attrgetter("base", *_UART_REGS, "thr_ipending", "msr_delta", "modem_lines", "rx", "on_tx")


class _UartAdapter(_Adapter):
    kind = K.DEV_UART
    outputs = True

    def key(self, d: Any) -> Any:
        k = _UART_KEY(d)
        return k[:-2] + (len(k[-2]), k[-1] is None)

    def row(self, d: Any, plan: _Plan) -> list[int] | None:
        base, *regs, thr, delta, lines, rx, on_tx = _UART_KEY(d)
        if (not _u8(*regs, delta, lines) or type(thr) is not bool or not isinstance(rx, bytearray)
                or not isinstance(d.tx, bytearray) or not (type(base) is int and 0 <= base <= 0xFFF8)):
            return None
        return _words(self.kind, base, *regs, int(thr), delta, lines, len(rx), int(on_tx is not None))

    def store(self, w: list[int], d: Any) -> None:
        (d.ier, d.lcr, d.mcr, d.fcr, d.scr, d.dll, d.dlm, d.rbr) = w[K.W_UART_IER:K.W_UART_RBR + 1]
        d.thr_ipending = bool(w[K.W_UART_THR_IPENDING])
        d.msr_delta = w[K.W_UART_MSR_DELTA]

    def emit(self, data: np.ndarray) -> None:
        self.dev.tx += data.tobytes()


class _PostAdapter(_Adapter):
    kind = K.DEV_POST
    outputs = True

    def key(self, d: Any) -> Any:
        return (d.on_code is None, type(d.codes))

    def row(self, d: Any, plan: _Plan) -> list[int] | None:
        if not isinstance(d.codes, list):
            return None
        return _words(self.kind, int(d.on_code is not None))

    def emit(self, data: np.ndarray) -> None:
        self.dev.codes.extend(data.tolist())


class _DebugconAdapter(_Adapter):
    kind = K.DEV_DEBUGCON
    outputs = True

    def key(self, d: Any) -> Any:
        return (d.readback, d.on_write is None, type(d.buf))

    def row(self, d: Any, plan: _Plan) -> list[int] | None:
        if not _u8(d.readback) or not isinstance(d.buf, bytearray):
            return None
        return _words(self.kind, d.readback, int(d.on_write is not None))

    def emit(self, data: np.ndarray) -> None:
        self.dev.buf += data.tobytes()


class _CmosAdapter(_Adapter):
    kind = K.DEV_CMOS

    def key(self, d: Any) -> Any:
        return (d.base, d.index, d.nmi_disabled, id(d.data))

    def row(self, d: Any, plan: _Plan) -> list[int] | None:
        if (not (type(d.base) is int and 0 <= d.base <= 0xFFFE) or not (type(d.index) is int and 0 <= d.index <= 0x7F)
                or type(d.nmi_disabled) is not bool or not isinstance(d.data, bytearray) or len(d.data) != 128):
            return None
        return _words(self.kind, d.base, d.index, int(d.nmi_disabled), plan.buf_index(d.data))

    def store(self, w: list[int], d: Any) -> None:
        d.index = w[K.W_CMOS_INDEX]
        d.nmi_disabled = bool(w[K.W_CMOS_NMI])


_FN_KEY = operator.attrgetter("config", "wmask", "w1cmask")


class _PciAdapter(_Adapter):
    kind = K.DEV_PCI

    def __init__(self, dev: Any) -> None:
        super().__init__(dev)
        self.rows: list[tuple[int, int, int, int, int]] = []

    def key(self, d: Any) -> Any:
        fns = tuple((k, f, type(f), "write" in getattr(f, "__dict__", ()), *map(id, _FN_KEY(f)))
                    for k, f in d.functions.items())
        return (d.base, d.config_address, d.rcr, d.reset_requests, fns)

    def row(self, d: Any, plan: _Plan) -> list[int] | None:
        if (not (type(d.base) is int and 0 <= d.base <= 0xFFF8) or not _u64(d.reset_requests)
                or not (type(d.config_address) is int and 0 <= d.config_address <= _U32) or not _u8(d.rcr)
                or not isinstance(d.functions, dict)):
            return None
        rows: list[tuple[int, int, int, int, int]] = []
        for key, fn in d.functions.items():
            if (not isinstance(key, tuple) or len(key) != 3 or not _u8(key[0])
                    or not (type(key[1]) is int and 0 <= key[1] <= 0x1F) or not (type(key[2]) is int and 0 <= key[2] <= 7)):
                return None
            cfg = getattr(fn, "config", None)
            if not isinstance(cfg, bytearray) or len(cfg) != 256:
                return None
            # PciHost reads config bytes itself; writes go through fn.write (the masks).
            compiled = (type(fn) is PciFunction and "write" not in getattr(fn, "__dict__", {})
                        and isinstance(fn.wmask, bytearray) and len(fn.wmask) == 256
                        and isinstance(fn.w1cmask, bytearray) and len(fn.w1cmask) == 256)
            rows.append((key[0] << 8 | key[1] << 3 | key[2], plan.buf_index(cfg),
                         plan.buf_index(fn.wmask) if compiled else 0,
                         plan.buf_index(fn.w1cmask) if compiled else 0, int(compiled)))
        rows.sort()
        self.rows = rows
        plan.pcifn_dirty = True
        # FN0 / NFN are filled in when plan.pcifn is assembled; no cached target.
        return _words(self.kind, d.base, d.config_address, d.rcr, d.reset_requests, 0, len(rows),
                      U64_MASK, U64_MASK)

    def store(self, w: list[int], d: Any) -> None:
        d.config_address = w[K.W_PCI_ADDR]
        d.rcr = w[K.W_PCI_RCR]
        d.reset_requests = w[K.W_PCI_RESETS]


def _adapter_for(dev: Any, spans: list[tuple[int, int]]) -> _Adapter:
    # spans: the (first, last) ports of every registration of this device.
    if _own_methods(dev, LatchDevice):
        return _LatchAdapter(dev)
    if _own_methods(dev, CountingSink):
        return _SinkAdapter(dev)
    if _own_methods(dev, PostCodePort):
        return _PostAdapter(dev)
    if _own_methods(dev, DebugConsole):
        return _DebugconAdapter(dev)
    base = getattr(dev, "base", None)
    if type(base) is int:
        # Compiled only where the model's own register decode applies.
        if _own_methods(dev, Uart16550) and all(base <= a and b <= base + 7 for a, b in spans):
            return _UartAdapter(dev)
        if _own_methods(dev, CmosRtc) and all(base <= a and b <= base + 1 for a, b in spans):
            return _CmosAdapter(dev)
        if _own_methods(dev, PciHost) and all(base <= a and b <= base + 7 for a, b in spans):
            return _PciAdapter(dev)
    return _Adapter(dev)


# ==========================================================================
# The plan: the machine as flat arrays, and the sync around Python calls
# ==========================================================================
_MACHINE_METHODS = ("execute_exit", "_run")
_GUEST_METHODS = ("handle_ve", "_dispatch", "_handle_io", "_ve_raise_fault", "get_ve_info", "_hypercall",
                  "do_early_exception", "early_handle_ve", "early_fixup_exception")
_TDX_METHODS = ("inject_ve", "_inject", "tdcall", "vmcall", "_vmcall", "_veinfo_get")
_HOST_METHODS = ("tdvmcall", "_io_rejected", "_device_failed")
_BUS_METHODS = ("_read", "_write", "_read_split", "_write_split", "_pieces", "_all_unassigned",
                "_failed", "_bad_value")
_MERGES: dict[tuple[Callable[..., int], Callable[..., int]], int] = {
    (_guest_mod._merge_2022, _guest_mod._out_2022): K.MERGE_2022,
    (_guest_mod._merge_linux, _guest_mod._out_fixed): K.MERGE_LINUX,
    (_guest_mod._merge_arch, _guest_mod._out_fixed): K.MERGE_ARCH}


def _overridden(obj: Any, base: type, names: Sequence[str]) -> list[str]:
    t = type(obj)
    inst = getattr(obj, "__dict__", {})
    return [n for n in names if getattr(t, n, None) is not getattr(base, n) or n in inst]


def _check_machine(machine: Any, *, embedded: bool = False) -> None:
    # embedded: the Unicorn fast path (tdxve.embed.unicorn), which sends string
    # I/O to the Python path itself and never commits a failed event, so the
    # string-I/O mode and the exception table do not matter to it.
    if not isinstance(machine, Machine):
        raise InvalidArgumentError(f"machine must be a tdxve.machine.Machine, got {type(machine).__name__}")
    g, tdx = machine.guest, machine.tdx
    if not isinstance(g, Guest) or not isinstance(tdx, TdxModule):
        raise ReplayUnsupportedError("replay needs the machine's own Guest and TdxModule")
    bad = ([f"Machine.{n}" for n in _overridden(machine, Machine, _MACHINE_METHODS)]
           + [f"Guest.{n}" for n in _overridden(g, Guest, _GUEST_METHODS)]
           + [f"TdxModule.{n}" for n in _overridden(tdx, TdxModule, _TDX_METHODS)])
    if bad:
        raise ReplayUnsupportedError(
            f"replay reproduces tdxve's own #VE path; this machine overrides {', '.join(bad)}")
    if g.string_io != "reject" and not embedded:
        raise ReplayUnsupportedError(
            f"replay refuses string_io={g.string_io!r}: emulated INS/OUTS needs RSI/RDI/RCX, guest "
            f"memory and the instruction information, which events do not carry (use Machine.execute)")
    if g.extable and not embedded:
        raise ReplayUnsupportedError(
            f"replay refuses a guest with exception-table entries ({len(g.extable)}): fixups are keyed "
            f"by RIP and events carry none")
    if tdx.ve_pending:
        raise ReplayUnsupportedError(
            "replay refuses a TDX module whose VE info is still valid: every event would be a #DF "
            "(call VEINFO.GET first)")
    if (g._merge, g._out) not in _MERGES:
        raise ReplayUnsupportedError("replay supports the linux-2022, linux and architectural merge rules only")
    if machine.ve_loop_limit > 0xFFFF:
        # Output and log room for a whole #VE loop is reserved before each event.
        raise ReplayUnsupportedError(
            f"replay supports ve_loop_limit up to 65535 (room for a whole #VE loop is reserved per "
            f"event), got {machine.ve_loop_limit}")


def _views(arr: np.ndarray, obj: bytearray) -> bool:
    base: Any = arr.base            # np.frombuffer keeps a memoryview of the exporter
    return isinstance(base, memoryview) and base.obj is obj


class _Plan:
    """The arrays the kernel works on, built from a Machine (internal; see the
    :mod:`tdxve._replay_py` docstring for the layout)."""

    def __init__(self, machine: Machine, unassigned: str) -> None:
        self.machine = machine
        self.unassigned = unassigned
        self.cfg = np.zeros(K.NCFG, dtype=np.int64)
        self.stats = np.zeros(K.NSTAT, dtype=np.uint64)
        self.ports = np.zeros(0x10000 * 4, dtype=np.uint64)
        self.touched = np.zeros(0x10000, dtype=np.uint16)
        self.slots = np.full(0x10000, -1, dtype=np.int32)
        self.ranges = np.zeros((0, 4), dtype=np.int64)
        self.dstate = np.zeros((0, K.NWORDS), dtype=np.uint64)
        self.pcifn = np.zeros((0, 5), dtype=np.int64)
        self.pcifn_dirty = False
        self.bufs: list[np.ndarray] = []
        self._buf_ids: dict[int, int] = {}
        self.outbuf = np.zeros(0, dtype=np.uint32)
        self.logbuf = np.zeros((0, 6), dtype=np.uint64)
        self.filter = np.ones(0x10000, dtype=np.uint8)
        self._filter_of: Any = None
        self.pending: BaseException | None = None
        self.adapters: list[_Adapter] = []
        self.host: Any = None
        self.bus: PortBus | None = None
        self.tdx: TdxModule = machine.tdx
        self.mask = 0

    # ------------------------------------------------------------ build
    def prepare(self, *, embedded: bool = False) -> None:
        """(Re)read the machine's configuration; called at the start of every run.

        :param embedded: prepare for the Unicorn fast path (see :func:`_check_machine`).
        """
        m = self.machine
        _check_machine(m, embedded=embedded)
        g = m.guest
        tdx = self.tdx = m.tdx
        host = tdx.host
        cfg = self.cfg
        cfg[:] = 0
        cfg[K.CFG_MERGE] = _MERGES[(g._merge, g._out)]
        cfg[K.CFG_EARLY] = int(m.path == "early")
        cfg[K.CFG_ADVANCE] = int(bool(g.profile.early_advances_rip))
        cfg[K.CFG_LOOP] = m.ve_loop_limit
        mask = self.mask = g.profile.vmcall_rcx
        forbidden = VMCALL_RCX_FORBIDDEN_GPRS | (VMCALL_RCX_NO_RBP_MOD if tdx.no_rbp_mod else 0)
        mask_ok = not (mask & VMCALL_RCX_RESERVED_MASK or mask & forbidden) and (mask >> 10) & 0x3F == 0x3F
        bus = getattr(host, "bus", None)
        compiled = (mask_ok and isinstance(host, Host) and not _overridden(host, Host, _HOST_METHODS)
                    and isinstance(bus, PortBus) and not _overridden(bus, PortBus, _BUS_METHODS))
        self.host = host
        self.bus = bus if compiled else None
        cfg[K.CFG_HOST] = K.HOST_COMPILED if compiled else K.HOST_PYTHON
        if self.unassigned == "reply":
            cfg[K.CFG_REPLY_MODE] = 1
        else:
            r = bus.unassigned_reply if compiled and bus is not None else None
            v = _U32 if r is None else r
            cfg[K.CFG_REPLY_CONST] = v - (1 << 64) if v >> 63 else v     # the bits, in an int64
        allowed = g._allowed
        if allowed is None:
            cfg[K.CFG_FILTER] = 0
        else:
            cfg[K.CFG_FILTER] = 1
            if allowed is not self._filter_of:
                # Evaluated once per port per Replayer: the filter must be a pure function of the port.
                self.filter = np.fromiter((bool(allowed(p)) for p in range(0x10000)), dtype=np.uint8,
                                          count=0x10000)
                self._filter_of = allowed
        iters = m.ve_loop_limit            # any event may repeat (instr_len 0)
        self.adapters = []
        self.slots.fill(-1)
        ranges: list[tuple[int, int, int, int]] = []
        if compiled and bus is not None:
            regs = bus.ranges()
            by_dev: dict[int, list[tuple[int, int]]] = {}
            for r in regs:
                by_dev.setdefault(id(r.device), []).append((r.first, r.first + r.nports - 1))
            dev_index: dict[int, int] = {}
            for r in regs:
                key = id(r.device)
                if key not in dev_index:
                    dev_index[key] = len(self.adapters)
                    self.adapters.append(_adapter_for(r.device, by_dev[key]))
                ri = len(ranges)
                ranges.append((r.first, r.first + r.nports - 1, sum(1 << s for s in r.sizes), dev_index[key]))
                self.slots[r.first:r.first + r.nports] = ri
        self.ranges = np.array(ranges, dtype=np.int64).reshape(-1, 4)
        self.dstate = np.zeros((len(self.adapters), K.NWORDS), dtype=np.uint64)
        has_out = any(a.outputs for a in self.adapters)
        rows = max(_OUTBUF_ROWS, 4 * iters) if has_out else 0
        if self.outbuf.shape[0] != rows:
            self.outbuf = np.zeros(rows, dtype=np.uint32)
        log = getattr(host, "log", None) if compiled else None
        cfg[K.CFG_LOG] = int(log is not None)
        lrows = max(_LOGBUF_ROWS, iters) if log is not None else 0
        if self.logbuf.shape[0] != lrows:
            self.logbuf = np.zeros((lrows, 6), dtype=np.uint64)
        cfg[K.CFG_OUTCAP] = rows
        cfg[K.CFG_LOGCAP] = lrows
        self.stats[:] = 0
        self.bufs = []
        self._buf_ids = {}
        self.pcifn_dirty = True
        self.load()

    def buf_index(self, obj: bytearray) -> int:
        """Index in :attr:`bufs` of a view of ``obj`` (made once per run)."""
        i = self._buf_ids.get(id(obj))
        if i is None or not _views(self.bufs[i], obj):
            i = len(self.bufs)
            self.bufs = self.bufs + [np.frombuffer(obj, dtype=np.uint8)]    # a new list: the kernel re-binds
            self._buf_ids[id(obj)] = i
        return i

    # ------------------------------------------------------------ sync
    def load(self) -> None:
        """Objects -> arrays (at the start of a run and after every Python call).

        Only devices whose snapshot key changed are re-read."""
        ds = self.dstate
        for i, a in enumerate(self.adapters):
            if a.kind == K.DEV_PY:
                continue
            try:
                k = a.key(a.dev)
                if k == a.cache:
                    continue
                row = a.row(a.dev, self)
            except (AttributeError, TypeError):
                k, row = None, None             # not in a shape the compiled form knows: Python serves it
            ds[i] = row if row is not None else _words(K.DEV_PY)
            a.cache = k
        if self.pcifn_dirty:
            rows: list[tuple[int, int, int, int, int]] = []
            for i, a in enumerate(self.adapters):
                if isinstance(a, _PciAdapter) and ds[i, K.W_KIND] == K.DEV_PCI:
                    ds[i, K.W_PCI_FN0] = len(rows)
                    ds[i, K.W_PCI_NFN] = len(a.rows)
                    ds[i, K.W_PCI_CACHE_ADDR] = U64_MASK
                    ds[i, K.W_PCI_CACHE_ROW] = U64_MASK
                    rows += a.rows
            self.pcifn = np.array(rows, dtype=np.int64).reshape(-1, 5)
            self.pcifn_dirty = False

    def store(self) -> None:
        """Arrays -> objects: buffered output, the scalar state the kernel changed, and
        the host event log (its records must stay in order with any a Python device adds)."""
        st = self.stats
        if st[K.S_LOG_N]:
            host = self.host
            assert isinstance(host, Host)
            self._flush_log(host)
        n = int(st[K.S_OUT_N])
        if n:
            entries = self.outbuf[:n]
            devs = entries >> 8
            data = (entries & 0xFF).astype(np.uint8)
            first = int(devs[0])
            if (devs == first).all():
                self.adapters[first].emit(data)
            else:
                for d in np.unique(devs).tolist():
                    self.adapters[d].emit(data[devs == d])
            st[K.S_OUT_N] = 0
        if st[K.S_DIRTY]:
            ds = self.dstate
            for i in np.flatnonzero(ds[:, K.W_DIRTY]).tolist():
                a = self.adapters[i]
                w = ds[i].tolist()
                if w[K.W_KIND] != K.DEV_PY:
                    a.store(w, a.dev)
                    a.cache = a.key(a.dev)
                ds[i, K.W_DIRTY] = 0
            st[K.S_DIRTY] = 0

    def release(self) -> None:
        """Drop the views on device buffers (they block resizing the bytearrays)."""
        self.bufs = []
        self._buf_ids = {}
        for a in self.adapters:
            a.cache = None

    # ------------------------------------------------------------ the kernel's calls into Python
    def callback(self, op: int, a: int, b: int, c: int, d: int) -> int:
        try:
            if op == K.CB_TDVMCALL:
                return self._tdvmcall(a, b & 1, b >> 1, c & U64_MASK, d)
            bus = self.bus
            assert bus is not None
            self.store()
            errors = bus.error_count
            try:
                if op == K.CB_READ:
                    v = bus._read(b, c)
                else:
                    bus._write(b, c, d)
                    v = 0
            except DeviceError as exc:
                self.pending = exc
                return -2
            finally:
                self.load()             # the Python code may have changed any device
            return v | (K.CB_ERROR if bus.error_count != errors else 0)
        except BaseException as exc:    # noqa: BLE001 - re-raised by the driver after the sync
            self.pending = exc
            return -1

    def _tdvmcall(self, size: int, write: int, port: int, reply: int, r15: int) -> int:
        # The guest's __tdx_hypercall through the Python TDX module and host (ref 2.4, 2.5).
        bus = getattr(self.host, "bus", None)
        if self.cfg[K.CFG_REPLY_MODE] and isinstance(bus, PortBus):
            saved = bus.unassigned_reply
            bus.unassigned_reply = reply
            try:
                return self._tdcall(size, write, port, r15)
            finally:
                bus.unassigned_reply = saved
        return self._tdcall(size, write, port, r15)

    def _tdcall(self, size: int, write: int, port: int, r15: int) -> int:
        t = Regs()
        t.set_gpr(Gpr.RCX, self.mask)
        t.set_gpr(Gpr.R11, int(TdvmcallSubfn.IO))
        t.set_gpr(Gpr.R12, size)
        t.set_gpr(Gpr.R13, write)
        t.set_gpr(Gpr.R14, port)
        t.set_gpr(Gpr.R15, r15)
        t.set_gpr(Gpr.RAX, int(TdcallLeaf.VP_VMCALL))
        if self.tdx.tdcall(t):
            return 1
        self.stats[K.S_CB_R10] = t.r10
        self.stats[K.S_CB_R11] = t.r11
        return 0

    # ------------------------------------------------------------ after a run
    def finish(self, events: np.ndarray) -> None:
        """Counters, log and VE info into the Python objects (``events[S_LAST - 1]`` took the last #VE)."""
        self.store()
        st = self.stats
        tdx = self.tdx
        ves = int(st[K.S_VES])
        if self.cfg[K.CFG_HOST] == K.HOST_COMPILED:
            host = self.host
            assert isinstance(host, Host) and self.bus is not None
            hs = host.stats
            n = int(st[K.S_IO_CALLS])
            if n:
                hs.calls[_IO] = hs.calls.get(_IO, 0) + n
                host.halted = False
            inv = int(st[K.S_INVALID])
            if inv:
                hs.failures[_INVALID_OPERAND] = hs.failures.get(_INVALID_OPERAND, 0) + inv
            counts = self.ports.reshape(-1, 4)
            touched = self.touched[:int(st[K.S_TOUCHED])].astype(np.intp)
            io = hs.io.counts
            for p, row in zip(touched.tolist(), counts[touched].tolist()):
                c = io.get(p)
                if c is None:
                    io[p] = row
                else:
                    for k in range(4):
                        c[k] += row[k]
            counts[touched] = 0
            self.bus.unassigned += int(st[K.S_UNASSIGNED])
            self.bus.splits += int(st[K.S_SPLITS])
            tdx.vmcalls += int(st[K.S_VMCALLS])
            tdx.tdcalls += int(st[K.S_TDCALLS])
        last = int(st[K.S_LAST])
        if ves:
            # Every #VE: injected, fetched with VEINFO.GET (a TDCALL). The last one is
            # replayed through the module itself so its VE info is what it stores.
            tdx.ve_injected += ves - 1
            tdx.veinfo_gets += ves - 1
            tdx.tdcalls += ves - 1
            ev = events[last - 1]
            tdx.inject_ve(Regs(), _IO, int(ev["exit_qual"]), instr_len=int(ev["instr_len"]))
            t = Regs(rax=int(TdcallLeaf.VP_VEINFO_GET))
            tdx.tdcall(t)
        st[:] = 0

    def _flush_log(self, host: Host) -> None:
        n = int(self.stats[K.S_LOG_N])
        log = host.log
        if not n or log is None:
            self.stats[K.S_LOG_N] = 0
            return
        rows = self.logbuf[:n].tolist()
        skip = max(0, n - log.capacity)
        if skip:
            # Records that would be pushed out by later ones: counted, not built.
            log.dropped += skip
            log._seq += skip
            rows = rows[skip:]
        for port, size, write, value, status, flag in rows:
            log.record("tdvmcall", "io", _IO, port, size, write, -1 if value == U64_MASK else value,
                       status, "device_error" if flag else "")
        self.stats[K.S_LOG_N] = 0


# ==========================================================================
# One machine at a time
# ==========================================================================
_BUSY_LOCK = threading.Lock()
_BUSY: set[int] = set()


class _Busy:
    def __init__(self, *objs: Any) -> None:
        self.keys = tuple({id(o) for o in objs})

    def __enter__(self) -> None:
        with _BUSY_LOCK:
            if any(k in _BUSY for k in self.keys):
                raise ReplayError("this machine (or its host) is already being replayed by another thread; "
                                  "replay one machine from one thread at a time")
            _BUSY.update(self.keys)

    def __exit__(self, *exc: Any) -> None:
        with _BUSY_LOCK:
            _BUSY.difference_update(self.keys)


# ==========================================================================
# Public API
# ==========================================================================
class Replayer:
    """Replays event batches through one machine, keeping its state between batches.

    ``Replayer(machine).run(a)`` followed by ``.run(b)`` leaves exactly the
    results and state of ``replay(concatenate(a, b), machine)``: chunking
    never changes anything. Between runs the machine may be used and changed
    freely (devices, ``machine.path``, the bus); each run re-reads it.

    :param machine: the :class:`~tdxve.machine.Machine` (kernel mode, 64-bit).
    :param unassigned: ``"machine"`` (default) or ``"reply"`` (see
        :data:`UNASSIGNED_CHOICES`).
    :raises InvalidArgumentError: a bad argument.
    :raises ReplayUnsupportedError: a machine replay cannot reproduce
        (docs/replay.md, "What replay refuses").

    The port filter, if any, is evaluated once per port (65536 calls) the first
    time it is needed and cached: it must be a pure function of the port.
    """

    def __init__(self, machine: Machine, *, unassigned: str = "machine") -> None:
        if unassigned not in UNASSIGNED_CHOICES:
            raise InvalidArgumentError(f"unassigned must be one of {UNASSIGNED_CHOICES}, got {unassigned!r}")
        _check_machine(machine)
        self.machine = machine
        self.unassigned = unassigned
        self._plan = _Plan(machine, unassigned)
        self._core: Any = _default_core

    def run(self, events: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Replay ``events`` (see :func:`replay`).

        :param events: a 1-D array of :data:`EVENT_DTYPE` (or any structured
            array with its integer fields ``exit_qual``, ``instr_len``,
            ``rax``, ``reply``, converted in pieces).
        :param out: optional :data:`RESULT_DTYPE` array of the same length
            to write into (C-contiguous, writeable).
        :returns: the results (``out`` when given).
        :raises InvalidArgumentError: bad ``events`` or ``out``.
        :raises ReplayUnsupportedError: the machine changed into something replay refuses.
        :raises ReplayError: the machine is being replayed by another thread.
        :raises DeviceError: a device raised and the bus policy is ``"raise"``
            (as ``execute_exit`` would); ``.replay_index`` is the event, whose
            result is not written; everything before it is done, state included.
        """
        ev = _as_events(events)
        n = ev.shape[0]
        res = np.zeros(n, dtype=RESULT_DTYPE) if out is None else _check_out(out, n)
        step = DEFAULT_CHUNK if ev.dtype != EVENT_DTYPE or not ev.flags.c_contiguous else max(n, 1)
        with _Busy(self.machine, self.machine.tdx.host):
            plan = self._plan
            plan.prepare()
            try:
                for lo in range(0, n, step):
                    hi = min(n, lo + step)
                    part = _chunk_events(ev, lo, hi)
                    self._run(plan, part, res[lo:hi], lo)
            finally:
                plan.release()
        return res

    def _run(self, plan: _Plan, events: np.ndarray, res: np.ndarray, offset: int) -> None:
        n = events.shape[0]
        i = 0
        kernel = self._core.replay_kernel
        while i < n:
            nxt = int(kernel(plan, events, res, i, n))
            if nxt < 0:
                failed = int(plan.stats[K.S_NEXT])
                exc = plan.pending
                plan.pending = None
                plan.finish(events)
                assert exc is not None
                if isinstance(exc, DeviceError):
                    exc.replay_index = offset + failed  # type: ignore[attr-defined]
                raise exc
            if nxt < n:
                plan.store()                    # output or log buffer full
            i = nxt
        plan.finish(events)

    def chunks(self, events: np.ndarray, chunk_size: int = DEFAULT_CHUNK,
               out: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Replay ``events`` chunk by chunk; yields ``(start, results)`` per chunk.

        ``results`` is a view of one buffer reused for every chunk (copy what
        you keep), or of ``out`` when given. Between chunks the machine's
        state is synced. When ``events`` is a :class:`numpy.memmap`, the pages
        of each finished chunk are released (``madvise(MADV_DONTNEED)`` on
        shared and read-only maps), so replaying a file far larger than memory
        keeps the resident set at about one chunk.

        :param chunk_size: events per chunk (>= 1).
        :raises InvalidArgumentError: bad arguments.
        """
        if type(chunk_size) is not int or chunk_size < 1:
            raise InvalidArgumentError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        ev = _as_events(events)
        n = ev.shape[0]
        if out is not None:
            _check_out(out, n)
        buf = None if out is not None else np.zeros(min(chunk_size, max(n, 1)), dtype=RESULT_DTYPE)
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            dst = out[lo:hi] if out is not None else buf[:hi - lo]  # type: ignore[index]
            self.run(_chunk_events(ev, lo, hi), out=dst)
            yield lo, dst
            _release_pages(ev, lo, hi)     # after the consumer is done with the chunk


def _release_pages(events: np.ndarray, lo: int, hi: int) -> None:
    # Drop the finished chunk's pages of a file mapping from the resident set.
    base = events
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap) and base.base is not None:
        base = base.base
    mm = getattr(base, "_mmap", None) if isinstance(base, np.memmap) else None
    if mm is None or getattr(base, "mode", "r") == "c" or not hasattr(mm, "madvise"):
        return
    try:
        start_addr = events[lo:hi].ctypes.data
        map_addr = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError):
        return
    page = mmap.PAGESIZE
    a = ((start_addr - map_addr) // page) * page
    b = ((start_addr - map_addr + (hi - lo) * events.itemsize) // page) * page
    if b > a >= 0:
        try:
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)
        except (OSError, ValueError):
            pass


def replay(events: np.ndarray, machine: Machine, *, out: np.ndarray | None = None,
           unassigned: str = "machine") -> np.ndarray:
    """Replay port-I/O events through ``machine``'s whole #VE round trip, at compiled speed.

    Same results and same machine state afterwards as::

        for e in events:
            regs = Regs(rax=e["rax"])
            try:
                machine.execute_exit(regs, 30, exit_qual=e["exit_qual"], instr_len=e["instr_len"])
            except GuestFault: ...   # -> RESULT_DTYPE["fault"]

    in kernel mode (CPL 0), 64-bit. The guest decodes the low 32 bits of
    each qualification as its profile does (Linux: size = bits 2:0 + 1,
    unvalidated; string bit -> failure), applies its port filter, makes the
    TDVMCALL, merges the result into RAX, and advances RIP or fails; the
    linux-5.19-rc early path repeats the #VE ``machine.ve_loop_limit``
    times, then ``VE_LOOP``.

    :param events: a 1-D :data:`EVENT_DTYPE` array (a memory map is fine;
        for more events than fit in memory twice, use :func:`replay_chunks`).
    :param machine: the :class:`~tdxve.machine.Machine`.
    :param out: optional :data:`RESULT_DTYPE` array of the same length to fill.
    :param unassigned: ``"machine"`` (default): bytes no device serves read
        as the bus says (all-ones); ``"reply"``: as the event's ``reply``.
    :returns: a :data:`RESULT_DTYPE` array, one record per event.
    :raises InvalidArgumentError: bad ``events``, ``out`` or ``unassigned``,
        or ``machine`` is not a Machine.
    :raises ReplayUnsupportedError: emulated string I/O, exception-table
        entries, a pending #VE, or overridden #VE-path methods.
    :raises ReplayError: the machine is being replayed by another thread.
    :raises DeviceError: a device raised under the ``"raise"`` policy (see
        :meth:`Replayer.run`).
    """
    return Replayer(machine, unassigned=unassigned).run(events, out=out)


def replay_chunks(events: np.ndarray, machine: Machine, *, chunk_size: int = DEFAULT_CHUNK,
                  unassigned: str = "machine") -> Iterator[tuple[int, np.ndarray]]:
    """Replay ``events`` in chunks of ``chunk_size``; yields ``(start, results)``.

    For event files larger than memory: map them with
    ``np.memmap(path, dtype=EVENT_DTYPE, mode="r")`` (or use
    :func:`replay_file`) and consume the results chunk by chunk. The results
    view is reused between chunks; each finished chunk's file pages are
    released, so the peak resident set stays around ``chunk_size * 80``
    bytes plus the machine. See :meth:`Replayer.chunks`.

    :raises InvalidArgumentError: bad arguments.
    :raises ReplayUnsupportedError: see :func:`replay`.
    """
    return Replayer(machine, unassigned=unassigned).chunks(events, chunk_size)


class PortSummary:
    """Totals for one port (a row of :meth:`ReplaySummary.rows`)."""

    __slots__ = ("port", "device", "events", "ins", "outs", "ves", "tdvmcalls", "faults")

    def __init__(self, port: int, device: str, events: int, ins: int, outs: int, ves: int,
                 tdvmcalls: int, faults: int) -> None:
        self.port = port
        self.device = device
        self.events = events
        self.ins = ins
        self.outs = outs
        self.ves = ves
        self.tdvmcalls = tdvmcalls
        self.faults = faults

    def __repr__(self) -> str:
        return (f"PortSummary(port={self.port:#x}, device={self.device!r}, events={self.events}, "
                f"ves={self.ves}, tdvmcalls={self.tdvmcalls}, faults={self.faults})")


class ReplaySummary:
    """Per-port totals of replayed events: how many #VEs and TDVMCALLs each port cost.

    Feed it ``(events, results)`` pairs with :meth:`add` (any chunking).
    """

    def __init__(self) -> None:
        self.events = np.zeros(0x10000, dtype=np.int64)
        self.ins = np.zeros(0x10000, dtype=np.int64)
        self.ves = np.zeros(0x10000, dtype=np.int64)
        self.tdvmcalls = np.zeros(0x10000, dtype=np.int64)
        self.faulted = np.zeros(0x10000, dtype=np.int64)
        #: Events per :class:`~tdxve.abi.ReplayFault` code.
        self.faults: dict[ReplayFault, int] = {f: 0 for f in ReplayFault}

    def add(self, events: np.ndarray, results: np.ndarray) -> None:
        """Count one chunk.

        :raises InvalidArgumentError: the arrays differ in length or dtype.
        """
        ev = _as_events(events)
        if not isinstance(results, np.ndarray) or results.dtype != RESULT_DTYPE or results.shape != ev.shape:
            raise InvalidArgumentError("results must be a RESULT_DTYPE array as long as events")
        q = ev["exit_qual"].astype(np.uint64)
        port = ((q >> np.uint64(16)) & np.uint64(0xFFFF)).astype(np.intp)
        n = 0x10000
        self.events += np.bincount(port, minlength=n)
        self.ins += np.bincount(port, weights=((q >> np.uint64(3)) & np.uint64(1)).astype(np.float64),
                                minlength=n).astype(np.int64)
        self.ves += np.bincount(port, weights=results["ves"].astype(np.float64), minlength=n).astype(np.int64)
        self.tdvmcalls += np.bincount(port, weights=results["tdvmcalls"].astype(np.float64),
                                      minlength=n).astype(np.int64)
        f = results["fault"]
        self.faulted += np.bincount(port, weights=(f != 0).astype(np.float64), minlength=n).astype(np.int64)
        counts = np.bincount(f, minlength=len(ReplayFault))
        for code in ReplayFault:
            self.faults[code] += int(counts[code])

    @property
    def total_events(self) -> int:
        """Events counted."""
        return int(self.events.sum())

    @property
    def total_ves(self) -> int:
        """#VEs a TDX guest takes for them."""
        return int(self.ves.sum())

    @property
    def total_tdvmcalls(self) -> int:
        """TDG.VP.VMCALLs it makes."""
        return int(self.tdvmcalls.sum())

    def rows(self, bus: PortBus | None = None, *, sort: str = "port") -> list[PortSummary]:
        """One :class:`PortSummary` per port that saw events.

        :param bus: names the device on each port (``bus.name_of``), else ``"-"``.
        :param sort: ``"port"`` or ``"ves"`` (most #VEs first).
        :raises InvalidArgumentError: unknown ``sort``.
        """
        if sort not in ("port", "ves"):
            raise InvalidArgumentError(f"sort must be 'port' or 'ves', got {sort!r}")
        ports = np.flatnonzero(self.events).tolist()
        if sort == "ves":
            ports.sort(key=lambda p: (-int(self.ves[p]), p))
        out = []
        for p in ports:
            name = (bus.name_of(p) if bus is not None else None) or "-"
            ev, ins = int(self.events[p]), int(self.ins[p])
            out.append(PortSummary(p, name, ev, ins, ev - ins, int(self.ves[p]), int(self.tdvmcalls[p]),
                                   int(self.faulted[p])))
        return out


def replay_file(path: str | os.PathLike[str], machine: Machine, *, chunk_size: int = DEFAULT_CHUNK,
                unassigned: str = "machine", results_path: str | os.PathLike[str] | None = None,
                progress: Callable[[int, int], object] | None = None) -> ReplaySummary:
    """Replay a raw :data:`EVENT_DTYPE` file of any size in bounded memory.

    The file (``events.tofile(path)``) is memory-mapped and replayed with
    :meth:`Replayer.chunks`, which releases each finished chunk's pages, so
    the peak resident set is about ``chunk_size * 80`` bytes plus the
    machine, however large the file.

    :param path: the event file (its size must be a multiple of 32 bytes).
    :param chunk_size: events per chunk.
    :param unassigned: as :func:`replay`.
    :param results_path: also write every :data:`RESULT_DTYPE` record to this file.
    :param progress: called as ``progress(events_done, events_total)`` after each chunk.
    :returns: the :class:`ReplaySummary` of the whole file.
    :raises InvalidArgumentError: bad arguments or a file size that is not a
        multiple of the record size.
    :raises OSError: the file cannot be read (or the results written).
    """
    if type(chunk_size) is not int or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    size = os.path.getsize(path)
    rec = EVENT_DTYPE.itemsize
    if size % rec:
        raise InvalidArgumentError(f"{os.fspath(path)!r}: {size} bytes is not a multiple of {rec} (EVENT_DTYPE)")
    n = size // rec
    rp = Replayer(machine, unassigned=unassigned)
    summary = ReplaySummary()
    if n == 0:
        if results_path is not None:
            open(results_path, "wb").close()
        return summary
    events = np.memmap(path, dtype=EVENT_DTYPE, mode="r", shape=(n,))
    sink = open(results_path, "wb") if results_path is not None else None
    try:
        for lo, r in rp.chunks(events, chunk_size):
            summary.add(events[lo:lo + r.shape[0]], r)
            if sink is not None:
                r.tofile(sink)
            if progress is not None:
                progress(lo + r.shape[0], n)
    finally:
        if sink is not None:
            sink.close()
        del events
    return summary
