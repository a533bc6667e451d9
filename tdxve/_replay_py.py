"""Pure-Python twin of the compiled replay kernel (``tdxve/_replay.pxi``).

:func:`replay_kernel` runs port-I/O events through the whole #VE round trip
the way :meth:`tdxve.machine.Machine.execute_exit` does, but on flat arrays
prepared by :mod:`tdxve.replay` (the *plan*), so that the compiled twin can
run it without the GIL. This module is the readable specification; the
compiled kernel implements the same steps in the same order on the same
arrays (``tests/test_replay_kernel.py`` compares every array they touch).
"ref N.M" are sections of ``shared/reference/tdx-port-io.md``.

One event (exit reason 30, kernel mode, 64-bit):

1. #VE, VEINFO.GET (ref 2.2, 2.3): counted; never fails here.
2. Linux ``handle_io`` on the low 32 bits of the qualification (ref 1.3,
   1.4): size = bits 2:0 + 1 (unvalidated), IN = bit 3, port = bits 31:16;
   string bit -> -EIO.
3. Port filter (Intel's hardened guest, ref 1.11): a denied IN merges
   all-ones, a denied OUT is dropped, no TDVMCALL.
4. TDG.VP.VMCALL<Instruction.IO> (ref 2.5): R15 = the profile's OUT data;
   either the compiled host (KVM ``tdx_emulate_io``, ref 5.2: size/direction
   check, 16-bit port, bus dispatch with QEMU's rules) or a callback to the
   Python host.
5. The profile's RAX merge (ref 1.4), then RIP += instr_len, a fault code, or
   -- when RIP does not move: the linux-5.19-rc early path, or instr_len 0 --
   the same #VE again until ``ve_loop_limit`` (ref 1.1), as Machine does.

The plan (built by :class:`tdxve.replay.Replayer`) carries: ``cfg`` (int64,
``CFG_*``), ``filter`` (uint8[65536]), ``slots`` (int32[65536]: range index
or -1), ``ranges`` (int64[n, 4]: first, last, size mask, device), ``dstate``
(uint64[n, 16]: compiled device state, ``W_*``), ``bufs`` (list of uint8
arrays shared with the device objects), ``pcifn`` (int64[n, 5]: PCI
functions), ``stats`` (uint64, ``S_*``), ``ports`` (uint64[65536 * 4]:
reads, writes, read bytes, write bytes), ``outbuf`` (uint32: device << 8 |
byte, for UART/POST/debugcon output), ``logbuf`` (uint64[n, 6]: one row per
host event log record), ``touched`` (uint16[65536]: ports whose ``ports``
counters became non-zero, ``stats[S_TOUCHED]`` of them) and ``callback(op, a, b, c, d) -> int`` for
everything that needs Python (``CB_*``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .abi import EVENT_DTYPE, RESULT_DTYPE
from .errors import InvalidArgumentError

__all__ = ["replay_kernel"]  # plan_error and the layout constants are shared with _replay.pxi

U64 = (1 << 64) - 1
U32 = 0xFFFFFFFF
_MASK = (0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFF)
INVALID_OPERAND = 0x8000000000000000    # TDVMCALL_STATUS_INVALID_OPERAND (ref 2.6)
IO_SUBFN = 30                           # R11 the guest passes; KVM leaves it on OUT (ref 5.2)

# ---- plan layout (the compiled kernel checks these values at import)
# cfg
CFG_MERGE = 0           # MERGE_*
CFG_EARLY = 1           # 1: do_early_exception path (ref 1.7)
CFG_ADVANCE = 2         # early path advances RIP (0: linux-5.19-rc)
CFG_LOOP = 3            # Machine.ve_loop_limit
CFG_HOST = 4            # HOST_*
CFG_REPLY_MODE = 5      # 0: CFG_REPLY_CONST for every event, 1: the event's reply
CFG_REPLY_CONST = 6     # what unassigned bytes read as (0xFFFFFFFF = QEMU's all-ones)
CFG_FILTER = 7          # 1: plan.filter applies
CFG_LOG = 8             # 1: write host event-log rows into logbuf
CFG_OUTCAP = 9          # rows of outbuf
CFG_LOGCAP = 10         # rows of logbuf
NCFG = 11

MERGE_2022 = 0          # GENMASK(8*size, 0), no 32-bit zero extension (ref 1.4)
MERGE_LINUX = 1         # insn_assign_reg (ref 1.4, July 2026)
MERGE_ARCH = 2          # hardware IN/OUT

HOST_COMPILED = 0       # tdxve.host.Host semantics in the kernel
HOST_PYTHON = 1         # every TDVMCALL through callback(CB_TDVMCALL, ...)

# stats
S_NEXT = 0              # index of the event a callback failed in
S_VES = 1               # #VEs delivered (= VEINFO.GET calls)
S_VMCALLS = 2           # TDG.VP.VMCALLs that reached the host
S_TDCALLS = 3           # of those, the TDCALLs that completed (compiled host)
S_IO_CALLS = 4          # Host.stats.calls[30] (compiled host)
S_INVALID = 5           # Host.stats.failures[INVALID_OPERAND] (compiled host)
S_UNASSIGNED = 6        # PortBus.unassigned
S_SPLITS = 7            # PortBus.splits
S_OUT_N = 8             # rows used in outbuf
S_LOG_N = 9             # rows used in logbuf
S_LAST = 10             # 1 + index of the last event that took a #VE (0: none)
S_CB_R10 = 11           # CB_TDVMCALL results
S_CB_R11 = 12
S_DIRTY = 13            # some device's W_DIRTY is set
S_TOUCHED = 14          # ports listed in plan.touched (their counters went from 0 to non-0)
NSTAT = 15

# device kinds (dstate[d, W_KIND])
DEV_PY = 0
DEV_LATCH = 1
DEV_SINK = 2
DEV_UART = 3
DEV_POST = 4
DEV_DEBUGCON = 5
DEV_CMOS = 6
DEV_PCI = 7
NWORDS = 16
W_KIND = 0
W_DIRTY = 1             # scalar state changed since the last sync to the object
# LATCH: value, writable
W_LATCH_VALUE = 2
W_LATCH_WRITABLE = 3
# SINK: readback, reads, writes, bytes read, bytes written
W_SINK_READBACK = 2
W_SINK_READS = 3
W_SINK_WRITES = 4
W_SINK_RBYTES = 5
W_SINK_WBYTES = 6
# UART (16550A register file)
W_UART_BASE = 2
W_UART_IER = 3
W_UART_LCR = 4
W_UART_MCR = 5
W_UART_FCR = 6
W_UART_SCR = 7
W_UART_DLL = 8
W_UART_DLM = 9
W_UART_RBR = 10
W_UART_THR_IPENDING = 11
W_UART_MSR_DELTA = 12
W_UART_MODEM_LINES = 13
W_UART_RX_LEN = 14
W_UART_ON_TX = 15
# POST / debugcon: a Python callback on output
W_POST_ON_CODE = 2
W_DCON_READBACK = 2
W_DCON_ON_WRITE = 3
# CMOS
W_CMOS_BASE = 2
W_CMOS_INDEX = 3
W_CMOS_NMI = 4
W_CMOS_BUF = 5
# PCI configuration mechanism #1
W_PCI_BASE = 2
W_PCI_ADDR = 3
W_PCI_RCR = 4
W_PCI_RESETS = 5
W_PCI_FN0 = 6           # first row of this host's functions in pcifn (sorted by bdf)
W_PCI_NFN = 7
W_PCI_CACHE_ADDR = 8    # CONFIG_ADDRESS of the cached target (U64: none)
W_PCI_CACHE_ROW = 9     # pcifn row of the cached target (U64: no function)
# pcifn columns
F_BDF = 0
F_CONFIG = 1
F_WMASK = 2
F_W1C = 3
F_COMPILED = 4

# callback ops: callback(op, a, b, c, d) -> int
CB_READ = 1             # (device, port, size, 0) -> value | CB_ERROR, -2 DeviceError, -1 other
CB_WRITE = 2            # (device, port, size, value) -> 0 | CB_ERROR, -2, -1
CB_TDVMCALL = 3         # (size, direction | port << 1, reply, r15) -> 0 (S_CB_R10/R11 set),
#                         1 TDCALL failed, -1 exception
CB_ERROR = 1 << 32      # the bus recorded a device error (on_device_error="record")

# fault codes (tdxve.abi.ReplayFault)
FAULT_NONE = 0
FAULT_IO_FAILED = 1
FAULT_STRING_IO = 2
FAULT_VE_LOOP = 3
FAULT_GUEST_PANIC = 4

# MC146818 registers the compiled CMOS leaves to Python (they read the clock)
_CMOS_TIME = frozenset((0, 2, 4, 6, 7, 8, 9, 0x32))
_CMOS_A, _CMOS_B, _CMOS_C, _CMOS_D, _CMOS_IBM_CENTURY = 0x0A, 0x0B, 0x0C, 0x0D, 0x37


class _Abort(Exception):
    """A callback failed: the kernel stops (internal)."""


class _Py(Exception):
    """A compiled device leaves this access to Python (internal)."""


# ==========================================================================
# Guest: the profile's RAX merge and OUT data (tdxve.guest, ref 1.4, 6.2)
# ==========================================================================
def _genmask(h: int) -> int:
    # GENMASK(h, 0) as compiled x86 code computes it; h = 64 shifts by -1 & 63.
    return U64 >> ((63 - h) & 63)


def _merge(kind: int, rax: int, value: int, size: int, ok: bool) -> int:
    if kind == MERGE_2022:
        mask = _genmask(8 * size)
        rax &= ~mask & U64
        if ok:
            rax |= value & mask
        return rax
    if kind == MERGE_LINUX:
        v = value if ok else 0
        if size == 1:
            return (rax & ~0xFF & U64) | (v & 0xFF)
        if size == 2:
            return (rax & ~0xFFFF & U64) | (v & 0xFFFF)
        if size == 4:
            return v & U32
        if size == 8:
            return v & U64
        return rax
    if not ok:
        return rax
    if size == 4:
        return value & U32
    if size >= 8:
        return value & U64
    mask = (1 << (8 * size)) - 1
    return (rax & ~mask & U64) | (value & mask)


def _out_data(kind: int, rax: int, size: int) -> int:
    if kind == MERGE_2022:
        return rax & _genmask(8 * size)
    return rax & ((1 << (8 * size)) - 1) & U64


# ==========================================================================
# Compiled device forms (tdxve.devices; same state, same rules)
# ==========================================================================
def _dirty(plan: Any, w: Any) -> None:
    # The scalar state changed: the driver writes it back to the object.
    w[W_DIRTY] = 1
    plan.stats[S_DIRTY] = 1


def _uart_lines(w: Any) -> int:
    m = int(w[W_UART_MCR])
    if m & 0x10:                    # loopback wiring: CTS=RTS, DSR=DTR, RI=OUT1, DCD=OUT2
        return ((0x10 if m & 0x02 else 0) | (0x20 if m & 0x01 else 0)
                | (0x40 if m & 0x04 else 0) | (0x80 if m & 0x08 else 0))
    return int(w[W_UART_MODEM_LINES])


def _uart_iir(w: Any) -> int:
    fifo = 0xC0 if int(w[W_UART_FCR]) & 0x01 else 0
    ier = int(w[W_UART_IER])
    if ier & 0x01 and int(w[W_UART_RX_LEN]):
        return fifo | 0x04
    if ier & 0x02 and int(w[W_UART_THR_IPENDING]):
        return fifo | 0x02
    if ier & 0x08 and int(w[W_UART_MSR_DELTA]):
        return fifo
    return fifo | 0x01


def _pci_target(plan: Any, w: Any) -> int:
    # pcifn row addressed by CONFIG_ADDRESS, -1 for none (enable clear or no function).
    a = int(w[W_PCI_ADDR])
    if a == int(w[W_PCI_CACHE_ADDR]):
        row = int(w[W_PCI_CACHE_ROW])
        return -1 if row == U64 else row
    row = -1
    if a & 0x80000000:
        key = (a >> 8) & 0xFFFF     # bus 23:16, device 15:11, function 10:8
        lo = int(w[W_PCI_FN0])
        hi = lo + int(w[W_PCI_NFN])
        fn = plan.pcifn
        while lo < hi:
            mid = (lo + hi) // 2
            k = int(fn[mid, F_BDF])
            if k == key:
                row = mid
                break
            if k < key:
                lo = mid + 1
            else:
                hi = mid
    w[W_PCI_CACHE_ADDR] = a
    w[W_PCI_CACHE_ROW] = U64 if row < 0 else row
    return row


def _out(plan: Any, dev: int, byte: int) -> None:
    n = int(plan.stats[S_OUT_N])
    plan.outbuf[n] = (dev << 8) | byte
    plan.stats[S_OUT_N] = n + 1


def _dev_read(plan: Any, dev: int, port: int, size: int) -> int:
    # Raises _Py when Python must serve this access.
    w = plan.dstate[dev]
    kind = int(w[W_KIND])
    if kind == DEV_LATCH:
        return int(w[W_LATCH_VALUE])
    if kind == DEV_SINK:
        w[W_SINK_READS] += 1
        w[W_SINK_RBYTES] += size
        _dirty(plan, w)
        return int(w[W_SINK_READBACK])
    if kind == DEV_UART:
        off = port - int(w[W_UART_BASE])
        dlab = int(w[W_UART_LCR]) & 0x80
        if off == 0:
            if dlab:
                return int(w[W_UART_DLL])
            if int(w[W_UART_RX_LEN]):
                raise _Py
            return 0 if int(w[W_UART_FCR]) & 0x01 else int(w[W_UART_RBR])
        if off == 1:
            return int(w[W_UART_DLM]) if dlab else int(w[W_UART_IER])
        if off == 2:
            v = _uart_iir(w)
            if v & 0x0F == 0x02:    # reading IIR = THRE clears that source
                w[W_UART_THR_IPENDING] = 0
                _dirty(plan, w)
            return v
        if off == 3:
            return int(w[W_UART_LCR])
        if off == 4:
            return int(w[W_UART_MCR])
        if off == 5:                # LSR: THRE | TEMT, DR while bytes wait
            return 0x60 | (1 if int(w[W_UART_RX_LEN]) else 0)
        if off == 6:
            v = _uart_lines(w) | int(w[W_UART_MSR_DELTA])
            if int(w[W_UART_MSR_DELTA]):
                w[W_UART_MSR_DELTA] = 0
                _dirty(plan, w)
            return v
        return int(w[W_UART_SCR])
    if kind == DEV_POST:
        return 0xFF
    if kind == DEV_DEBUGCON:
        return int(w[W_DCON_READBACK])
    if kind == DEV_CMOS:
        if port == int(w[W_CMOS_BASE]):
            return 0xFF
        i = int(w[W_CMOS_INDEX])
        if i == _CMOS_IBM_CENTURY or i in _CMOS_TIME or i == _CMOS_A:
            raise _Py               # the clock is read
        data = plan.bufs[int(w[W_CMOS_BUF])]
        v = int(data[i])
        if i == _CMOS_C:
            data[i] = 0             # status C is cleared by reads
        return v
    if kind == DEV_PCI:
        off = port - int(w[W_PCI_BASE])
        if off >= 4:
            row = _pci_target(plan, w)
            if row < 0:
                return _MASK[size]  # master abort
            cfg = plan.bufs[int(plan.pcifn[row, F_CONFIG])]
            o = (int(w[W_PCI_ADDR]) & 0xFC) + off - 4
            v = 0
            for k in range(size):
                v |= int(cfg[o + k]) << (8 * k)
            return v
        if off == 0 and size == 4:
            return int(w[W_PCI_ADDR])
        if off == 1 and size == 1:
            return int(w[W_PCI_RCR])
        return _MASK[size]
    raise _Py


def _dev_write(plan: Any, dev: int, port: int, size: int, value: int) -> None:
    w = plan.dstate[dev]
    kind = int(w[W_KIND])
    if kind == DEV_LATCH:
        if int(w[W_LATCH_WRITABLE]):
            w[W_LATCH_VALUE] = value
            _dirty(plan, w)
        return
    if kind == DEV_SINK:
        w[W_SINK_WRITES] += 1
        w[W_SINK_WBYTES] += size
        _dirty(plan, w)
        return
    if kind == DEV_UART:
        off = port - int(w[W_UART_BASE])
        v = value & 0xFF
        dlab = int(w[W_UART_LCR]) & 0x80
        if off == 0:
            if dlab:
                w[W_UART_DLL] = v
            elif int(w[W_UART_MCR]) & 0x10 or int(w[W_UART_ON_TX]):
                raise _Py           # loopback feeds the receiver; on_tx is Python
            else:
                _out(plan, dev, v)
                w[W_UART_THR_IPENDING] = 1
            _dirty(plan, w)
            return
        if off == 1:
            if dlab:
                w[W_UART_DLM] = v
            else:
                old = int(w[W_UART_IER])
                w[W_UART_IER] = v & 0x0F
                if v & 0x02 and not old & 0x02:
                    w[W_UART_THR_IPENDING] = 1
            _dirty(plan, w)
            return
        if off == 2:
            raise _Py               # FCR resets the receiver
        if off == 3:
            w[W_UART_LCR] = v
            _dirty(plan, w)
            return
        if off == 4:
            old = _uart_lines(w)
            w[W_UART_MCR] = v & 0x1F
            new = _uart_lines(w)
            changed = old ^ new
            d = ((0x01 if changed & 0x10 else 0) | (0x02 if changed & 0x20 else 0)
                 | (0x04 if old & 0x40 and not new & 0x40 else 0) | (0x08 if changed & 0x80 else 0))
            w[W_UART_MSR_DELTA] = int(w[W_UART_MSR_DELTA]) | d
            _dirty(plan, w)
            return
        if off == 7:
            w[W_UART_SCR] = v
            _dirty(plan, w)
        return                      # LSR, MSR: ignored
    if kind == DEV_POST:
        if int(w[W_POST_ON_CODE]):
            raise _Py
        _out(plan, dev, value & 0xFF)
        return
    if kind == DEV_DEBUGCON:
        if int(w[W_DCON_ON_WRITE]):
            raise _Py
        _out(plan, dev, value & 0xFF)
        return
    if kind == DEV_CMOS:
        v = value & 0xFF
        if port == int(w[W_CMOS_BASE]):
            w[W_CMOS_INDEX] = v & 0x7F
            w[W_CMOS_NMI] = v >> 7
            _dirty(plan, w)
            return
        i = int(w[W_CMOS_INDEX])
        if i == _CMOS_IBM_CENTURY or i in _CMOS_TIME or i == _CMOS_A or i == _CMOS_B:
            raise _Py               # the clock is read or restarted
        if i == _CMOS_C or i == _CMOS_D:
            return                  # read-only
        plan.bufs[int(w[W_CMOS_BUF])][i] = v
        return
    if kind == DEV_PCI:
        off = port - int(w[W_PCI_BASE])
        if off >= 4:
            row = _pci_target(plan, w)
            if row < 0:
                return
            f = plan.pcifn[row]
            if not int(f[F_COMPILED]):
                raise _Py
            cfg = plan.bufs[int(f[F_CONFIG])]
            wm = plan.bufs[int(f[F_WMASK])]
            w1c = plan.bufs[int(f[F_W1C])]
            o = (int(w[W_PCI_ADDR]) & 0xFC) + off - 4
            for k in range(size):
                b = (value >> (8 * k)) & 0xFF
                m = int(wm[o + k])
                cfg[o + k] = ((int(cfg[o + k]) & ~m) | (b & m)) & ~(b & int(w1c[o + k])) & 0xFF
            return
        if off == 0 and size == 4:
            w[W_PCI_ADDR] = value & 0x80FFFFFC
            _dirty(plan, w)
        elif off == 1 and size == 1:
            if value & 0x04:        # RST_CPU: a reset request, RCR unchanged
                w[W_PCI_RESETS] += 1
            else:
                w[W_PCI_RCR] = value & 0x02
            _dirty(plan, w)
        return
    raise _Py


# ==========================================================================
# The bus (tdxve.host.PortBus: QEMU's rules) and the host (KVM tdx_emulate_io)
# ==========================================================================
def _piece_read(plan: Any, dev: int, port: int, size: int, err: list[int]) -> int:
    try:
        return _dev_read(plan, dev, port, size) & _MASK[size]
    except _Py:
        pass
    r = _callback(plan, CB_READ, dev, port, size, 0)
    if r < 0:
        err[1] = r
        raise _Abort
    if r & CB_ERROR:
        err[0] = 1
    return r & U32


def _piece_write(plan: Any, dev: int, port: int, size: int, value: int, err: list[int]) -> None:
    try:
        _dev_write(plan, dev, port, size, value)
        return
    except _Py:
        pass
    r = _callback(plan, CB_WRITE, dev, port, size, value)
    if r < 0:
        err[1] = r
        raise _Abort
    if r & CB_ERROR:
        err[0] = 1


def _pieces(plan: Any, port: int, size: int) -> list[tuple[int, int, int]]:
    # (offset, length, device or -1) covering the access, lowest port first.
    slots, ranges = plan.slots, plan.ranges
    out = []
    i = 0
    while i < size:
        p = port + i
        r = int(slots[p]) if p <= 0xFFFF else -1
        if r < 0:
            out.append((i, 1, -1))
            i += 1
            continue
        last, mask = int(ranges[r, 1]), int(ranges[r, 2])
        room = min(size - i, last - p + 1)
        n = 4 if room >= 4 and mask & 16 else 2 if room >= 2 and mask & 4 else 1 if mask & 2 else 0
        if n == 0:
            out.append((i, 1, -1))
            i += 1
        else:
            out.append((i, n, int(ranges[r, 3])))
            i += n
    return out


def _all_unassigned(slots: Any, port: int, size: int) -> bool:
    if size == 1:
        return True
    if port + size > 0x10000 or int(slots[port + 1]) >= 0:
        return False
    return size == 2 or (int(slots[port + 2]) < 0 and int(slots[port + 3]) < 0)


def _bus_read(plan: Any, port: int, size: int, reply: int, err: list[int]) -> int:
    slots = plan.slots
    r = int(slots[port])
    if r >= 0:
        rg = plan.ranges[r]
        if port + size - 1 <= int(rg[1]) and int(rg[2]) >> size & 1:
            return _piece_read(plan, int(rg[3]), port, size, err)
    elif _all_unassigned(slots, port, size):
        plan.stats[S_UNASSIGNED] += 1
        return reply & _MASK[size]
    plan.stats[S_SPLITS] += 1
    value = 0
    missed = False
    for off, n, dev in _pieces(plan, port, size):
        if dev < 0:
            v = (reply >> (8 * off)) & 0xFF
            missed = True
        else:
            v = _piece_read(plan, dev, port + off, n, err)
        value |= v << (8 * off)
    if missed:
        plan.stats[S_UNASSIGNED] += 1
    return value


def _bus_write(plan: Any, port: int, size: int, value: int, err: list[int]) -> None:
    slots = plan.slots
    r = int(slots[port])
    if r >= 0:
        rg = plan.ranges[r]
        if port + size - 1 <= int(rg[1]) and int(rg[2]) >> size & 1:
            _piece_write(plan, int(rg[3]), port, size, value, err)
            return
    elif _all_unassigned(slots, port, size):
        plan.stats[S_UNASSIGNED] += 1
        return
    plan.stats[S_SPLITS] += 1
    missed = False
    for off, n, dev in _pieces(plan, port, size):
        if dev < 0:
            missed = True
            continue
        _piece_write(plan, dev, port + off, n, (value >> (8 * off)) & _MASK[n], err)
    if missed:
        plan.stats[S_UNASSIGNED] += 1


def _log(plan: Any, port: int, size: int, write: int, value: int, status: int, flag: int) -> None:
    # One Host event-log record (value -1 = none is stored as all-ones).
    if int(plan.cfg[CFG_LOG]):
        n = int(plan.stats[S_LOG_N])
        plan.logbuf[n] = (port, size, write, value & U64, status, flag)
        plan.stats[S_LOG_N] = n + 1


def _host_io(plan: Any, size: int, write: int, port: int, r15: int, reply: int) -> tuple[int, int]:
    # KVM tdx_emulate_io as tdxve.host.Host.tdvmcall serves it (ref 5.2):
    # returns (R10, R11) as the guest sees them (R10 and R11 are selected).
    stats = plan.stats
    stats[S_IO_CALLS] += 1
    if size != 1 and size != 2 and size != 4:
        stats[S_INVALID] += 1
        _log(plan, port, size, write, -1, INVALID_OPERAND, 0)
        return INVALID_OPERAND, IO_SUBFN
    base = port * 4
    ports = plan.ports
    if not ports[base] and not ports[base + 1]:
        t = int(stats[S_TOUCHED])
        if t < 0x10000:
            plan.touched[t] = port
            stats[S_TOUCHED] = t + 1
    err = [0, 0]
    if write:
        value = r15 & _MASK[size]   # only `size` bytes of R15 reach the device
        ports[base + 1] += 1
        ports[base + 3] += size
        try:
            _bus_write(plan, port, size, value, err)
        except _Abort:
            if err[1] == -2:        # DeviceError: the host answers INVALID_OPERAND, then raises
                stats[S_INVALID] += 1
                _log(plan, port, size, 1, value, INVALID_OPERAND, 1)
            raise
    else:
        ports[base] += 1
        ports[base + 2] += size
        try:
            value = _bus_read(plan, port, size, reply, err)
        except _Abort:
            if err[1] == -2:
                stats[S_INVALID] += 1
                _log(plan, port, size, 0, -1, INVALID_OPERAND, 1)
            raise
    if err[0]:                      # a device error the bus recorded: the guest sees a failure
        stats[S_INVALID] += 1
        _log(plan, port, size, write, value if write else -1, INVALID_OPERAND, 1)
        return INVALID_OPERAND, IO_SUBFN
    _log(plan, port, size, write, value, 0, 0)
    return 0, (IO_SUBFN if write else value)


# ==========================================================================
# Plan checks (the compiled kernel's _rp_bind_static / _rp_bind_dynamic)
# ==========================================================================
_PLAN_ERRORS = {
    "array": "replay plan.{0} must be a writeable C-contiguous {1}-D {2} array",
    "cfg_len": f"replay plan.cfg must have {NCFG} entries",
    "cfg_range": "replay plan.cfg has an out-of-range merge, loop limit or capacity",
    "shapes": "replay plan arrays have the wrong shapes",
    "counts": "replay plan.stats output counts exceed the capacities",
    "slot": "replay plan.slots[{0:#x}] = {1} is not a range",
    "dstate_words": f"replay plan.dstate must have {NWORDS} words per device",
    "pcifn_cols": "replay plan.pcifn must have 5 columns",
    "bufs_list": "replay plan.bufs must be a list of uint8 arrays",
    "buf": "replay plan.bufs[{0}] must be a writeable 1-D uint8 array",
    "range": "replay plan.ranges[{0}] is inconsistent",
    "pcifn_row": "replay plan.pcifn[{0}] names a missing or short buffer",
    "kind": "replay plan.dstate[{0}] has an unknown device kind",
    "cmos": "replay plan.dstate[{0}]: CMOS RAM buffer or index out of range",
    "pci": "replay plan.dstate[{0}]: PCI function rows out of range",
    "events": "events must be a C-contiguous 1-D EVENT_DTYPE array",
    "results": "results must be a writeable C-contiguous 1-D RESULT_DTYPE array",
    "start_type": "start and stop must be ints, got {0!r}, {1!r}",
    "start_range": ("need 0 <= start <= stop <= len(events), len(results); got {0}, {1} for "
                    "{2} events and {3} results"),
}


def plan_error(key: str, *args: Any) -> InvalidArgumentError:
    """The exception for a malformed replay plan or kernel argument (shared by both kernels)."""
    return InvalidArgumentError(_PLAN_ERRORS[key].format(*args))
def _array(plan: Any, name: str, dtype: Any, ndim: int) -> np.ndarray:
    a = getattr(plan, name)
    if (not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != ndim
            or not a.flags.c_contiguous or not a.flags.writeable):
        raise plan_error("array", name, ndim, np.dtype(dtype))
    return a


def _check_static(plan: Any) -> None:
    cfg = _array(plan, "cfg", np.int64, 1)
    if cfg.shape[0] != NCFG:
        raise plan_error("cfg_len")
    if not (MERGE_2022 <= cfg[CFG_MERGE] <= MERGE_ARCH and 1 <= cfg[CFG_LOOP] <= 0xFFFF
            and cfg[CFG_OUTCAP] >= 0 and cfg[CFG_LOGCAP] >= 0):
        raise plan_error("cfg_range")
    flt = _array(plan, "filter", np.uint8, 1)
    slots = _array(plan, "slots", np.int32, 1)
    ranges = _array(plan, "ranges", np.int64, 2)
    stats = _array(plan, "stats", np.uint64, 1)
    ports = _array(plan, "ports", np.uint64, 1)
    outbuf = _array(plan, "outbuf", np.uint32, 1)
    logbuf = _array(plan, "logbuf", np.uint64, 2)
    touched = _array(plan, "touched", np.uint16, 1)
    if (flt.shape[0] != 0x10000 or slots.shape[0] != 0x10000 or ranges.shape[1] != 4
            or stats.shape[0] != NSTAT or ports.shape[0] != 0x10000 * 4
            or outbuf.shape[0] < cfg[CFG_OUTCAP] or logbuf.shape[0] < cfg[CFG_LOGCAP]
            or logbuf.shape[1] != 6 or touched.shape[0] != 0x10000):
        raise plan_error("shapes")
    if int(stats[S_OUT_N]) > int(cfg[CFG_OUTCAP]) or int(stats[S_LOG_N]) > int(cfg[CFG_LOGCAP]):
        raise plan_error("counts")
    bad = np.flatnonzero((slots < -1) | (slots >= ranges.shape[0]))
    if bad.size:
        i = int(bad[0])
        raise plan_error("slot", i, int(slots[i]))


def _check_dynamic(plan: Any) -> None:
    dstate = _array(plan, "dstate", np.uint64, 2)
    if dstate.shape[1] != NWORDS:
        raise plan_error("dstate_words")
    pcifn = _array(plan, "pcifn", np.int64, 2)
    if pcifn.shape[1] != 5:
        raise plan_error("pcifn_cols")
    bufs = plan.bufs
    if type(bufs) is not list:
        raise plan_error("bufs_list")
    for i, b in enumerate(bufs):
        if (not isinstance(b, np.ndarray) or b.dtype != np.uint8 or b.ndim != 1
                or not b.flags.c_contiguous or not b.flags.writeable):
            raise plan_error("buf", i)
    n = len(bufs)
    ndev = dstate.shape[0]
    for i, r in enumerate(plan.ranges.tolist()):
        if not (0 <= r[0] <= r[1] <= 0xFFFF and 0 <= r[3] < ndev and 0 <= r[2] <= 0x16):
            raise plan_error("range", i)
    for i, f in enumerate(pcifn.tolist()):
        if not (0 <= f[F_CONFIG] < n and bufs[f[F_CONFIG]].shape[0] >= 256 and (
                f[F_COMPILED] == 0 or (0 <= f[F_WMASK] < n and 0 <= f[F_W1C] < n
                                       and bufs[f[F_WMASK]].shape[0] >= 256
                                       and bufs[f[F_W1C]].shape[0] >= 256))):
            raise plan_error("pcifn_row", i)
    npcifn = pcifn.shape[0]
    for i, w in enumerate(dstate.tolist()):
        k = w[W_KIND]
        if k > DEV_PCI:
            raise plan_error("kind", i)
        if k == DEV_CMOS and not (w[W_CMOS_BUF] < n and bufs[w[W_CMOS_BUF]].shape[0] >= 128
                                  and w[W_CMOS_INDEX] <= 0x7F):
            raise plan_error("cmos", i)
        if k == DEV_PCI and (w[W_PCI_FN0] > npcifn or w[W_PCI_NFN] > npcifn
                             or w[W_PCI_FN0] + w[W_PCI_NFN] > npcifn
                             or (w[W_PCI_CACHE_ROW] != U64 and w[W_PCI_CACHE_ROW] >= npcifn)):
            raise plan_error("pci", i)


def _callback(plan: Any, op: int, a: int, b: int, c: int, d: int) -> int:
    # plan.callback, then the checks the compiled kernel's re-bind makes.
    try:
        r = int(plan.callback(op, a, b, c, d))
        _check_dynamic(plan)
        return r
    except BaseException as exc:    # noqa: BLE001 - stays in plan.pending, as in C
        plan.pending = exc
        return -1


# ==========================================================================
# The kernel
# ==========================================================================
def replay_kernel(plan: Any, events: np.ndarray, results: np.ndarray, start: int, stop: int) -> int:
    """Replay ``events[start:stop]`` into ``results`` with the prepared ``plan``.

    Low-level mechanism behind :func:`tdxve.replay.replay`, which builds the
    plan from a :class:`~tdxve.machine.Machine`, validates the arrays and
    syncs device state; call that instead.

    :param plan: a :class:`tdxve.replay.Replayer` plan.
    :param events: a C-contiguous array of dtype :data:`tdxve.abi.EVENT_DTYPE`.
    :param results: a C-contiguous, writeable :data:`tdxve.abi.RESULT_DTYPE`
        array at least ``stop`` long.
    :param start: first event.
    :param stop: one past the last event.
    :returns: the index of the next event to replay: ``stop`` when done, less
        when the output or log buffer is full (flush and call again), or -1
        when a callback failed (the exception is in ``plan.pending`` and
        ``plan.stats[S_NEXT]`` is the event it failed in).
    """
    if (not isinstance(events, np.ndarray) or events.dtype != EVENT_DTYPE or events.ndim != 1
            or not events.flags.c_contiguous):
        raise plan_error("events")
    if (not isinstance(results, np.ndarray) or results.dtype != RESULT_DTYPE or results.ndim != 1
            or not results.flags.c_contiguous or not results.flags.writeable):
        raise plan_error("results")
    if type(start) is not int or type(stop) is not int:
        raise plan_error("start_type", start, stop)
    if not 0 <= start <= stop <= min(events.shape[0], results.shape[0]):
        raise plan_error("start_range", start, stop, events.shape[0], results.shape[0])
    _check_static(plan)
    _check_dynamic(plan)
    cfg = [int(x) for x in plan.cfg]
    merge = cfg[CFG_MERGE]
    early = cfg[CFG_EARLY]
    advance = cfg[CFG_ADVANCE]
    loop_limit = cfg[CFG_LOOP]
    host_py = cfg[CFG_HOST] == HOST_PYTHON
    reply_per_event = cfg[CFG_REPLY_MODE]
    reply_const = cfg[CFG_REPLY_CONST] & U64
    has_filter = cfg[CFG_FILTER]
    repeat = early and not advance
    iters_max = loop_limit      # any event may repeat (instr_len 0): reserve room for the whole loop
    out_need = 4 * iters_max if cfg[CFG_OUTCAP] else 0
    log_need = iters_max if cfg[CFG_LOG] else 0
    stats = plan.stats
    allowed = plan.filter
    for i in range(start, stop):
        if (int(stats[S_OUT_N]) + out_need > cfg[CFG_OUTCAP]
                or int(stats[S_LOG_N]) + log_need > cfg[CFG_LOGCAP]):
            return i
        ev = events[i]
        q = int(ev["exit_qual"]) & U32      # handle_io works on a u32 copy (ref 1.3)
        rax = int(ev["rax"])
        reply = int(ev["reply"]) if reply_per_event else reply_const
        size = (q & 7) + 1
        is_in = (q >> 3) & 1
        port = q >> 16
        r15 = r11 = status = 0
        fault = FAULT_NONE
        ves = calls = 0
        delta = 0
        stats[S_LAST] = i + 1
        try:
            while True:
                ves += 1
                stats[S_VES] += 1               # #VE + VEINFO.GET (ref 2.2, 2.3)
                if q & 0x10:                    # string I/O: -EIO (ref 1.8)
                    fault = FAULT_STRING_IO
                    break
                if has_filter and not allowed[port]:
                    # Intel's filter: IN reads all-ones, OUT dropped, success (ref 1.11)
                    if is_in:
                        rax = _merge(merge, rax, U32, size, True)
                    ok = True
                else:
                    r15 = 0 if is_in else _out_data(merge, rax, size)
                    if host_py:
                        rc = _callback(plan, CB_TDVMCALL, size, (1 - is_in) | port << 1, reply, r15)
                        if rc < 0:
                            raise _Abort
                        if rc == 1:             # the TDCALL failed: Linux panics (ref 1.10)
                            fault = FAULT_GUEST_PANIC
                            break
                        calls += 1
                        r10, r11 = int(stats[S_CB_R10]), int(stats[S_CB_R11])
                    else:
                        calls += 1
                        stats[S_VMCALLS] += 1
                        r10, r11 = _host_io(plan, size, 1 - is_in, port, r15, reply)
                        stats[S_TDCALLS] += 1
                    status = r10
                    ok = r10 == 0
                    if is_in:
                        rax = _merge(merge, rax, r11, size, ok)
                if not ok:
                    fault = FAULT_IO_FAILED
                    break
                delta = int(ev["instr_len"])
                if repeat or delta == 0:        # RIP stays: IRET re-executes (ref 1.1)
                    delta = 0
                    if ves >= loop_limit:
                        fault = FAULT_VE_LOOP
                        break
                    continue
                break
        except _Abort:
            stats[S_NEXT] = i
            return -1
        res = results[i]
        res["rax"] = rax
        res["r15"] = r15
        res["r11"] = r11
        res["status"] = status
        res["rip_delta"] = delta
        res["ves"] = ves
        res["tdvmcalls"] = calls
        res["fault"] = fault
    return stop
