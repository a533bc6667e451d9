# Batch #VE replay kernel (issue 6), include'd at the end of _core.pyx.
#
# The readable specification is tdxve/_replay_py.py: the same steps, in the
# same order, on the same plan arrays (tdxve/replay.py builds the plan from a
# Machine and syncs device objects around every Python call). The event loop
# runs without the GIL; it takes the GIL only to call plan.callback -- for a
# device without a compiled form, an access a compiled form leaves to Python,
# or every TDVMCALL of a Python host -- and re-reads the arrays the callback
# may have replaced. Callback failures come back as return codes (the
# exception itself waits in plan.pending); nothing raises through C.
#
# Safety: every index the loop follows (slot -> range -> device -> buffer /
# PCI function) is checked once in _rp_bind_* before the loop uses it; the
# only per-event bounds are the output/log capacities, reserved before each
# event. "ref N.M" are sections of shared/reference/tdx-port-io.md.

from libc.stdlib cimport malloc, free, realloc
from libc.string cimport memset

from . import _replay_py as _RP
from .abi import EVENT_DTYPE as _RP_EVENT_DTYPE, RESULT_DTYPE as _RP_RESULT_DTYPE


# ---------------------------------------------------------------- layout (== _replay_py)
cdef enum:
    RP_CFG_MERGE = 0
    RP_CFG_EARLY = 1
    RP_CFG_ADVANCE = 2
    RP_CFG_LOOP = 3
    RP_CFG_HOST = 4
    RP_CFG_REPLY_MODE = 5
    RP_CFG_REPLY_CONST = 6
    RP_CFG_FILTER = 7
    RP_CFG_LOG = 8
    RP_CFG_OUTCAP = 9
    RP_CFG_LOGCAP = 10
    RP_NCFG = 11

    RP_MERGE_2022 = 0
    RP_MERGE_LINUX = 1
    RP_MERGE_ARCH = 2
    RP_HOST_COMPILED = 0
    RP_HOST_PYTHON = 1

    RP_S_NEXT = 0
    RP_S_VES = 1
    RP_S_VMCALLS = 2
    RP_S_TDCALLS = 3
    RP_S_IO_CALLS = 4
    RP_S_INVALID = 5
    RP_S_UNASSIGNED = 6
    RP_S_SPLITS = 7
    RP_S_OUT_N = 8
    RP_S_LOG_N = 9
    RP_S_LAST = 10
    RP_S_CB_R10 = 11
    RP_S_CB_R11 = 12
    RP_S_DIRTY = 13
    RP_S_TOUCHED = 14
    RP_NSTAT = 15

    RP_DEV_PY = 0
    RP_DEV_LATCH = 1
    RP_DEV_SINK = 2
    RP_DEV_UART = 3
    RP_DEV_POST = 4
    RP_DEV_DEBUGCON = 5
    RP_DEV_CMOS = 6
    RP_DEV_PCI = 7
    RP_NWORDS = 16
    RP_W_KIND = 0
    RP_W_DIRTY = 1
    RP_W_LATCH_VALUE = 2
    RP_W_LATCH_WRITABLE = 3
    RP_W_SINK_READBACK = 2
    RP_W_SINK_READS = 3
    RP_W_SINK_WRITES = 4
    RP_W_SINK_RBYTES = 5
    RP_W_SINK_WBYTES = 6
    RP_W_UART_BASE = 2
    RP_W_UART_IER = 3
    RP_W_UART_LCR = 4
    RP_W_UART_MCR = 5
    RP_W_UART_FCR = 6
    RP_W_UART_SCR = 7
    RP_W_UART_DLL = 8
    RP_W_UART_DLM = 9
    RP_W_UART_RBR = 10
    RP_W_UART_THR_IPENDING = 11
    RP_W_UART_MSR_DELTA = 12
    RP_W_UART_MODEM_LINES = 13
    RP_W_UART_RX_LEN = 14
    RP_W_UART_ON_TX = 15
    RP_W_POST_ON_CODE = 2
    RP_W_DCON_READBACK = 2
    RP_W_DCON_ON_WRITE = 3
    RP_W_CMOS_BASE = 2
    RP_W_CMOS_INDEX = 3
    RP_W_CMOS_NMI = 4
    RP_W_CMOS_BUF = 5
    RP_W_PCI_BASE = 2
    RP_W_PCI_ADDR = 3
    RP_W_PCI_RCR = 4
    RP_W_PCI_RESETS = 5
    RP_W_PCI_FN0 = 6
    RP_W_PCI_NFN = 7
    RP_W_PCI_CACHE_ADDR = 8
    RP_W_PCI_CACHE_ROW = 9
    RP_F_BDF = 0
    RP_F_CONFIG = 1
    RP_F_WMASK = 2
    RP_F_W1C = 3
    RP_F_COMPILED = 4
    RP_NFCOLS = 5

    RP_CB_READ = 1
    RP_CB_WRITE = 2
    RP_CB_TDVMCALL = 3

    RP_FAULT_NONE = 0
    RP_FAULT_IO_FAILED = 1
    RP_FAULT_STRING_IO = 2
    RP_FAULT_VE_LOOP = 3
    RP_FAULT_GUEST_PANIC = 4

cdef uint64_t RP_CB_ERROR = 1ULL << 32
cdef uint64_t RP_U64 = 0xFFFFFFFFFFFFFFFFULL
cdef uint64_t RP_U32 = 0xFFFFFFFFULL
cdef uint64_t RP_INVALID_OPERAND = 0x8000000000000000ULL   # TDVMCALL status (ref 2.6)
cdef uint64_t RP_IO_SUBFN = 30                             # R11 KVM leaves on OUT (ref 5.2)
cdef uint64_t RP_MASK[5]
RP_MASK[0] = 0
RP_MASK[1] = 0xFF
RP_MASK[2] = 0xFFFF
RP_MASK[3] = 0xFFFFFF
RP_MASK[4] = 0xFFFFFFFF


def _rp_check_layout():
    expect = {
        "CFG_MERGE": RP_CFG_MERGE, "CFG_EARLY": RP_CFG_EARLY, "CFG_ADVANCE": RP_CFG_ADVANCE,
        "CFG_LOOP": RP_CFG_LOOP, "CFG_HOST": RP_CFG_HOST, "CFG_REPLY_MODE": RP_CFG_REPLY_MODE,
        "CFG_REPLY_CONST": RP_CFG_REPLY_CONST, "CFG_FILTER": RP_CFG_FILTER, "CFG_LOG": RP_CFG_LOG,
        "CFG_OUTCAP": RP_CFG_OUTCAP, "CFG_LOGCAP": RP_CFG_LOGCAP, "NCFG": RP_NCFG,
        "MERGE_2022": RP_MERGE_2022, "MERGE_LINUX": RP_MERGE_LINUX, "MERGE_ARCH": RP_MERGE_ARCH,
        "HOST_COMPILED": RP_HOST_COMPILED, "HOST_PYTHON": RP_HOST_PYTHON,
        "S_NEXT": RP_S_NEXT, "S_VES": RP_S_VES, "S_VMCALLS": RP_S_VMCALLS, "S_TDCALLS": RP_S_TDCALLS,
        "S_IO_CALLS": RP_S_IO_CALLS, "S_INVALID": RP_S_INVALID, "S_UNASSIGNED": RP_S_UNASSIGNED,
        "S_SPLITS": RP_S_SPLITS, "S_OUT_N": RP_S_OUT_N, "S_LOG_N": RP_S_LOG_N, "S_LAST": RP_S_LAST,
        "S_CB_R10": RP_S_CB_R10, "S_CB_R11": RP_S_CB_R11, "S_DIRTY": RP_S_DIRTY,
        "S_TOUCHED": RP_S_TOUCHED, "NSTAT": RP_NSTAT,
        "DEV_PY": RP_DEV_PY, "DEV_LATCH": RP_DEV_LATCH, "DEV_SINK": RP_DEV_SINK, "DEV_UART": RP_DEV_UART,
        "DEV_POST": RP_DEV_POST, "DEV_DEBUGCON": RP_DEV_DEBUGCON, "DEV_CMOS": RP_DEV_CMOS,
        "DEV_PCI": RP_DEV_PCI, "NWORDS": RP_NWORDS, "W_KIND": RP_W_KIND, "W_DIRTY": RP_W_DIRTY,
        "W_LATCH_VALUE": RP_W_LATCH_VALUE, "W_LATCH_WRITABLE": RP_W_LATCH_WRITABLE,
        "W_SINK_READBACK": RP_W_SINK_READBACK, "W_SINK_READS": RP_W_SINK_READS,
        "W_SINK_WRITES": RP_W_SINK_WRITES, "W_SINK_RBYTES": RP_W_SINK_RBYTES,
        "W_SINK_WBYTES": RP_W_SINK_WBYTES, "W_UART_BASE": RP_W_UART_BASE, "W_UART_IER": RP_W_UART_IER,
        "W_UART_LCR": RP_W_UART_LCR, "W_UART_MCR": RP_W_UART_MCR, "W_UART_FCR": RP_W_UART_FCR,
        "W_UART_SCR": RP_W_UART_SCR, "W_UART_DLL": RP_W_UART_DLL, "W_UART_DLM": RP_W_UART_DLM,
        "W_UART_RBR": RP_W_UART_RBR, "W_UART_THR_IPENDING": RP_W_UART_THR_IPENDING,
        "W_UART_MSR_DELTA": RP_W_UART_MSR_DELTA, "W_UART_MODEM_LINES": RP_W_UART_MODEM_LINES,
        "W_UART_RX_LEN": RP_W_UART_RX_LEN, "W_UART_ON_TX": RP_W_UART_ON_TX,
        "W_POST_ON_CODE": RP_W_POST_ON_CODE, "W_DCON_READBACK": RP_W_DCON_READBACK,
        "W_DCON_ON_WRITE": RP_W_DCON_ON_WRITE, "W_CMOS_BASE": RP_W_CMOS_BASE,
        "W_CMOS_INDEX": RP_W_CMOS_INDEX, "W_CMOS_NMI": RP_W_CMOS_NMI, "W_CMOS_BUF": RP_W_CMOS_BUF,
        "W_PCI_BASE": RP_W_PCI_BASE, "W_PCI_ADDR": RP_W_PCI_ADDR, "W_PCI_RCR": RP_W_PCI_RCR,
        "W_PCI_RESETS": RP_W_PCI_RESETS, "W_PCI_FN0": RP_W_PCI_FN0, "W_PCI_NFN": RP_W_PCI_NFN,
        "W_PCI_CACHE_ADDR": RP_W_PCI_CACHE_ADDR, "W_PCI_CACHE_ROW": RP_W_PCI_CACHE_ROW,
        "F_BDF": RP_F_BDF, "F_CONFIG": RP_F_CONFIG, "F_WMASK": RP_F_WMASK, "F_W1C": RP_F_W1C,
        "F_COMPILED": RP_F_COMPILED,
        "CB_READ": RP_CB_READ, "CB_WRITE": RP_CB_WRITE, "CB_TDVMCALL": RP_CB_TDVMCALL,
        "CB_ERROR": RP_CB_ERROR, "INVALID_OPERAND": RP_INVALID_OPERAND, "IO_SUBFN": RP_IO_SUBFN,
        "FAULT_NONE": RP_FAULT_NONE, "FAULT_IO_FAILED": RP_FAULT_IO_FAILED,
        "FAULT_STRING_IO": RP_FAULT_STRING_IO, "FAULT_VE_LOOP": RP_FAULT_VE_LOOP,
        "FAULT_GUEST_PANIC": RP_FAULT_GUEST_PANIC,
    }
    bad = [k for k, v in expect.items() if getattr(_RP, k) != v]
    if bad:
        raise ImportError(f"tdxve._core replay layout differs from tdxve._replay_py: {bad}")
    if sizeof(rp_event) != _RP_EVENT_DTYPE.itemsize or sizeof(rp_result) != _RP_RESULT_DTYPE.itemsize:
        raise ImportError("tdxve._core replay records do not match tdxve.abi EVENT_DTYPE/RESULT_DTYPE")


# ---------------------------------------------------------------- records and context

# EVENT_DTYPE (32 bytes).
ctypedef struct rp_event:
    uint64_t exit_qual
    uint64_t rax
    uint64_t reply
    uint32_t instr_len
    uint32_t _reserved

# RESULT_DTYPE (48 bytes).
ctypedef struct rp_result:
    uint64_t rax
    uint64_t r15
    uint64_t r11
    uint64_t status
    uint32_t rip_delta
    uint32_t ves
    uint32_t tdvmcalls
    uint8_t fault
    uint8_t _pad[3]

ctypedef struct rp_ctx:
    PyObject* plan              # borrowed: replay_kernel holds the reference
    int64_t cfg[RP_NCFG]
    const uint8_t* filter
    const int32_t* slots
    const int64_t* ranges       # [nranges][4]: first, last, size mask, device
    Py_ssize_t nranges
    uint64_t* dstate            # [ndev][RP_NWORDS]
    Py_ssize_t ndev
    uint8_t** bufs              # malloc'd; device byte buffers (CMOS RAM, PCI config spaces)
    Py_ssize_t* buflen
    Py_ssize_t nbufs
    Py_ssize_t bufcap
    const int64_t* pcifn        # [npcifn][RP_NFCOLS]
    Py_ssize_t npcifn
    uint64_t* stats
    uint64_t* ports             # [65536][4]
    uint16_t* touched           # [65536]: ports whose counters became non-zero
    uint32_t* outbuf
    uint64_t* logbuf            # [logcap][6]
    PyObject* keep              # list [dstate, pcifn, bufs, tuple(bufs)]: the bound objects, kept alive
    int dev_err                 # the bus recorded a device error during this access
    int abort                   # callback code that stops the kernel (-1, -2)


_rp_check_layout()


# ---------------------------------------------------------------- binding (with the GIL)

cdef object _rp_array(object plan, str name, object dtype, int ndim):
    a = getattr(plan, name)
    if (not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != ndim
            or not a.flags.c_contiguous or not a.flags.writeable):
        raise _RP.plan_error("array", name, ndim, np.dtype(dtype))
    return a


cdef int _rp_bind_static(rp_ctx* c, object plan, list hold) except -1:
    # What a callback never changes: cfg, filter, slots, ranges, stats, ports, outbuf, logbuf
    # (kept alive in `hold` for the whole call, whatever the plan does meanwhile).
    cdef Py_ssize_t i
    cfg = _rp_array(plan, "cfg", np.int64, 1)
    if cfg.shape[0] != RP_NCFG:
        raise _RP.plan_error("cfg_len")
    for i in range(RP_NCFG):
        c.cfg[i] = (<const int64_t*>cnp.PyArray_DATA(cfg))[i]
    if not (RP_MERGE_2022 <= c.cfg[RP_CFG_MERGE] <= RP_MERGE_ARCH and 1 <= c.cfg[RP_CFG_LOOP] <= 0xFFFF
            and c.cfg[RP_CFG_OUTCAP] >= 0 and c.cfg[RP_CFG_LOGCAP] >= 0):
        raise _RP.plan_error("cfg_range")
    flt = _rp_array(plan, "filter", np.uint8, 1)
    slots = _rp_array(plan, "slots", np.int32, 1)
    ranges = _rp_array(plan, "ranges", np.int64, 2)
    stats = _rp_array(plan, "stats", np.uint64, 1)
    ports = _rp_array(plan, "ports", np.uint64, 1)
    outbuf = _rp_array(plan, "outbuf", np.uint32, 1)
    logbuf = _rp_array(plan, "logbuf", np.uint64, 2)
    touched = _rp_array(plan, "touched", np.uint16, 1)
    if (flt.shape[0] != 0x10000 or slots.shape[0] != 0x10000 or ranges.shape[1] != 4
            or stats.shape[0] != RP_NSTAT or ports.shape[0] != 0x10000 * 4
            or outbuf.shape[0] < c.cfg[RP_CFG_OUTCAP] or logbuf.shape[0] < c.cfg[RP_CFG_LOGCAP]
            or logbuf.shape[1] != 6 or touched.shape[0] != 0x10000):
        raise _RP.plan_error("shapes")
    hold += [flt, slots, ranges, stats, ports, outbuf, logbuf, touched]
    c.touched = <uint16_t*>cnp.PyArray_DATA(touched)
    c.filter = <const uint8_t*>cnp.PyArray_DATA(flt)
    c.slots = <const int32_t*>cnp.PyArray_DATA(slots)
    c.ranges = <const int64_t*>cnp.PyArray_DATA(ranges)
    c.nranges = ranges.shape[0]
    c.stats = <uint64_t*>cnp.PyArray_DATA(stats)
    c.ports = <uint64_t*>cnp.PyArray_DATA(ports)
    c.outbuf = <uint32_t*>cnp.PyArray_DATA(outbuf)
    c.logbuf = <uint64_t*>cnp.PyArray_DATA(logbuf)
    if c.stats[RP_S_OUT_N] > <uint64_t>c.cfg[RP_CFG_OUTCAP] or c.stats[RP_S_LOG_N] > <uint64_t>c.cfg[RP_CFG_LOGCAP]:
        raise _RP.plan_error("counts")
    for i in range(0x10000):
        if c.slots[i] < -1 or c.slots[i] >= c.nranges:
            raise _RP.plan_error("slot", i, c.slots[i])
    return 0


cdef int _rp_bind_dynamic(rp_ctx* c, object plan) except -1:
    # What plan.load() may replace after a callback: dstate, bufs, pcifn. The
    # bound objects stay referenced in c.keep, so no pointer ever dangles even
    # if the plan drops them; when they are the same objects (the usual case)
    # only their contents are checked again.
    cdef Py_ssize_t i, n
    keep = <list>c.keep
    bufs = plan.bufs
    if (len(keep) == 4 and plan.dstate is keep[0] and plan.pcifn is keep[1] and bufs is keep[2]
            and type(bufs) is list and len(<list>bufs) == c.nbufs):
        n = c.nbufs
        old = <tuple>keep[3]
        for i in range(n):
            if (<list>bufs)[i] is not old[i]:
                break
        else:
            return _rp_check_contents(c)
    dstate = _rp_array(plan, "dstate", np.uint64, 2)
    if dstate.shape[1] != RP_NWORDS:
        raise _RP.plan_error("dstate_words")
    pcifn = _rp_array(plan, "pcifn", np.int64, 2)
    if pcifn.shape[1] != RP_NFCOLS:
        raise _RP.plan_error("pcifn_cols")
    bufs = plan.bufs
    if type(bufs) is not list:
        raise _RP.plan_error("bufs_list")
    n = len(bufs)
    if n > c.bufcap:
        p = <uint8_t**>realloc(c.bufs, n * sizeof(uint8_t*))
        if p == NULL:
            raise MemoryError()
        c.bufs = p
        q = <Py_ssize_t*>realloc(c.buflen, n * sizeof(Py_ssize_t))
        if q == NULL:
            raise MemoryError()
        c.buflen = q
        c.bufcap = n
    for i in range(n):
        b = bufs[i]
        if (not isinstance(b, np.ndarray) or b.dtype != np.uint8 or b.ndim != 1
                or not b.flags.c_contiguous or not b.flags.writeable):
            raise _RP.plan_error("buf", i)
        c.bufs[i] = <uint8_t*>cnp.PyArray_DATA(b)
        c.buflen[i] = b.shape[0]
    c.nbufs = n
    c.dstate = <uint64_t*>cnp.PyArray_DATA(dstate)
    c.ndev = dstate.shape[0]
    c.pcifn = <const int64_t*>cnp.PyArray_DATA(pcifn)
    c.npcifn = pcifn.shape[0]
    keep[:] = [dstate, pcifn, bufs, tuple(bufs)]
    return _rp_check_contents(c)


cdef int _rp_check_contents(rp_ctx* c) except -1:
    # Every index the loop follows from the device rows and PCI functions is in range.
    cdef Py_ssize_t i, k, fn0, nfn, n = c.nbufs
    cdef const int64_t* r
    cdef const int64_t* f
    cdef uint64_t* w
    for i in range(c.nranges):
        r = c.ranges + 4 * i
        if not (0 <= r[0] <= r[1] <= 0xFFFF and 0 <= r[3] < c.ndev and 0 <= r[2] <= 0x16):
            raise _RP.plan_error("range", i)
    for i in range(c.npcifn):
        f = c.pcifn + RP_NFCOLS * i
        if not (0 <= f[RP_F_CONFIG] < n and c.buflen[f[RP_F_CONFIG]] >= 256 and (
                f[RP_F_COMPILED] == 0 or (0 <= f[RP_F_WMASK] < n and 0 <= f[RP_F_W1C] < n
                                          and c.buflen[f[RP_F_WMASK]] >= 256
                                          and c.buflen[f[RP_F_W1C]] >= 256))):
            raise _RP.plan_error("pcifn_row", i)
    for i in range(c.ndev):
        w = c.dstate + RP_NWORDS * i
        k = <Py_ssize_t>w[RP_W_KIND]
        if w[RP_W_KIND] > RP_DEV_PCI:
            raise _RP.plan_error("kind", i)
        if k == RP_DEV_CMOS and not (w[RP_W_CMOS_BUF] < <uint64_t>n and c.buflen[w[RP_W_CMOS_BUF]] >= 128
                                     and w[RP_W_CMOS_INDEX] <= 0x7F):
            raise _RP.plan_error("cmos", i)
        if k == RP_DEV_PCI:
            fn0 = <Py_ssize_t>w[RP_W_PCI_FN0]
            nfn = <Py_ssize_t>w[RP_W_PCI_NFN]
            if (w[RP_W_PCI_FN0] > <uint64_t>c.npcifn or w[RP_W_PCI_NFN] > <uint64_t>c.npcifn
                    or fn0 + nfn > c.npcifn
                    or (w[RP_W_PCI_CACHE_ROW] != RP_U64 and w[RP_W_PCI_CACHE_ROW] >= <uint64_t>c.npcifn)):
                raise _RP.plan_error("pci", i)
    return 0


cdef int64_t _rp_callback_gil(rp_ctx* c, int op, int64_t a, int64_t b, int64_t d3, uint64_t d4) noexcept:
    # With the GIL: plan.callback, then re-read what plan.load() may have replaced.
    cdef int64_t r
    plan = <object>c.plan
    try:
        r = plan.callback(op, a, b, d3, d4)
        _rp_bind_dynamic(c, plan)
        return r
    except BaseException as exc:
        try:
            plan.pending = exc
        except BaseException:
            pass
        return -1


cdef inline int64_t _rp_callback(rp_ctx* c, int op, int64_t a, int64_t b, int64_t d3,
                                 uint64_t d4) noexcept nogil:
    cdef int64_t r
    with gil:
        r = _rp_callback_gil(c, op, a, b, d3, d4)
    return r


# ---------------------------------------------------------------- guest (tdxve.guest, ref 1.4)

cdef inline uint64_t _rp_genmask(uint64_t h) noexcept nogil:
    # GENMASK(h, 0) as compiled x86 code computes it: h = 64 shifts by -1 & 63.
    return RP_U64 >> ((63 - h) & 63)


cdef inline uint64_t _rp_merge(int64_t kind, uint64_t rax, uint64_t value, uint64_t size,
                               bint ok) noexcept nogil:
    cdef uint64_t mask, v
    if kind == RP_MERGE_2022:
        mask = _rp_genmask(8 * size)
        rax &= ~mask
        if ok:
            rax |= value & mask
        return rax
    if kind == RP_MERGE_LINUX:
        # insn_assign_reg(&ax, ok ? r11 : 0, size)
        v = value if ok else 0
        if size == 1:
            return (rax & ~0xFFULL) | (v & 0xFF)
        if size == 2:
            return (rax & ~0xFFFFULL) | (v & 0xFFFF)
        if size == 4:
            return v & RP_U32
        if size == 8:
            return v
        return rax
    if not ok:
        return rax
    if size == 4:
        return value & RP_U32
    if size >= 8:
        return value
    mask = (1ULL << (8 * size)) - 1
    return (rax & ~mask) | (value & mask)


cdef inline uint64_t _rp_out_data(int64_t kind, uint64_t rax, uint64_t size) noexcept nogil:
    if kind == RP_MERGE_2022:
        return rax & _rp_genmask(8 * size)
    if size >= 8:
        return rax
    return rax & ((1ULL << (8 * size)) - 1)


# ---------------------------------------------------------------- compiled device forms

cdef inline uint64_t _rp_uart_lines(const uint64_t* w) noexcept nogil:
    cdef uint64_t m = w[RP_W_UART_MCR]
    if m & 0x10:        # loopback: CTS=RTS, DSR=DTR, RI=OUT1, DCD=OUT2 (PC16550D)
        return (((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4))
    return w[RP_W_UART_MODEM_LINES]


cdef inline uint64_t _rp_uart_iir(const uint64_t* w) noexcept nogil:
    cdef uint64_t fifo = 0xC0 if w[RP_W_UART_FCR] & 0x01 else 0
    cdef uint64_t ier = w[RP_W_UART_IER]
    if ier & 0x01 and w[RP_W_UART_RX_LEN]:
        return fifo | 0x04
    if ier & 0x02 and w[RP_W_UART_THR_IPENDING]:
        return fifo | 0x02
    if ier & 0x08 and w[RP_W_UART_MSR_DELTA]:
        return fifo
    return fifo | 0x01


cdef inline bint _rp_cmos_clock(uint64_t i) noexcept nogil:
    # Registers whose access reads or restarts the clock (left to Python):
    # time bytes 0,2,4,6-9, century 0x32 (and its alias 0x37), status A.
    return (i == 0 or i == 2 or i == 4 or (6 <= i <= 9) or i == 0x32 or i == 0x37 or i == 0x0A)


cdef Py_ssize_t _rp_pci_target(rp_ctx* c, uint64_t* w) noexcept nogil:
    # pcifn row addressed by CONFIG_ADDRESS, -1 for none (enable clear or no function).
    cdef uint64_t a = w[RP_W_PCI_ADDR]
    cdef Py_ssize_t lo, hi, mid, row = -1
    cdef int64_t key, k
    if a == w[RP_W_PCI_CACHE_ADDR]:
        if w[RP_W_PCI_CACHE_ROW] == RP_U64:
            return -1
        return <Py_ssize_t>w[RP_W_PCI_CACHE_ROW]
    if a & 0x80000000ULL:
        key = <int64_t>((a >> 8) & 0xFFFF)      # bus 23:16, device 15:11, function 10:8
        lo = <Py_ssize_t>w[RP_W_PCI_FN0]
        hi = lo + <Py_ssize_t>w[RP_W_PCI_NFN]
        while lo < hi:
            mid = (lo + hi) // 2
            k = c.pcifn[RP_NFCOLS * mid + RP_F_BDF]
            if k == key:
                row = mid
                break
            if k < key:
                lo = mid + 1
            else:
                hi = mid
    w[RP_W_PCI_CACHE_ADDR] = a
    w[RP_W_PCI_CACHE_ROW] = RP_U64 if row < 0 else <uint64_t>row
    return row


cdef inline void _rp_out(rp_ctx* c, Py_ssize_t dev, uint64_t byte) noexcept nogil:
    # The per-event reservation guarantees room (RP_CFG_OUTCAP).
    cdef uint64_t n = c.stats[RP_S_OUT_N]
    c.outbuf[n] = <uint32_t>((<uint64_t>dev << 8) | byte)
    c.stats[RP_S_OUT_N] = n + 1


@cython.boundscheck(TDXVE_DEBUG)
@cython.wraparound(TDXVE_DEBUG)
cdef int _rp_dev_read(rp_ctx* c, Py_ssize_t dev, uint64_t port, uint64_t size,
                      uint64_t* out) noexcept nogil:
    # 0: *out holds the value; 1: Python must serve this access.
    cdef uint64_t* w = c.dstate + RP_NWORDS * dev
    cdef uint64_t kind = w[RP_W_KIND], off, v, i
    cdef Py_ssize_t row
    cdef const uint8_t* cfg
    cdef uint8_t* data
    if kind == RP_DEV_LATCH:
        out[0] = w[RP_W_LATCH_VALUE]
        return 0
    if kind == RP_DEV_SINK:
        w[RP_W_SINK_READS] += 1
        w[RP_W_SINK_RBYTES] += size
        w[RP_W_DIRTY] = 1
        c.stats[RP_S_DIRTY] = 1
        out[0] = w[RP_W_SINK_READBACK]
        return 0
    if kind == RP_DEV_UART:
        off = port - w[RP_W_UART_BASE]
        if off == 0:
            if w[RP_W_UART_LCR] & 0x80:
                out[0] = w[RP_W_UART_DLL]
                return 0
            if w[RP_W_UART_RX_LEN]:
                return 1                        # RBR with data: the receive FIFO is Python's
            out[0] = 0 if w[RP_W_UART_FCR] & 0x01 else w[RP_W_UART_RBR]
            return 0
        if off == 1:
            out[0] = w[RP_W_UART_DLM] if w[RP_W_UART_LCR] & 0x80 else w[RP_W_UART_IER]
            return 0
        if off == 2:
            v = _rp_uart_iir(w)
            if (v & 0x0F) == 0x02:              # reading IIR = THRE clears that source
                w[RP_W_UART_THR_IPENDING] = 0
                w[RP_W_DIRTY] = 1
                c.stats[RP_S_DIRTY] = 1
            out[0] = v
            return 0
        if off == 3:
            out[0] = w[RP_W_UART_LCR]
            return 0
        if off == 4:
            out[0] = w[RP_W_UART_MCR]
            return 0
        if off == 5:                            # LSR: THRE | TEMT, DR while bytes wait
            out[0] = 0x60 | (1 if w[RP_W_UART_RX_LEN] else 0)
            return 0
        if off == 6:
            out[0] = _rp_uart_lines(w) | w[RP_W_UART_MSR_DELTA]
            if w[RP_W_UART_MSR_DELTA]:
                w[RP_W_UART_MSR_DELTA] = 0
                w[RP_W_DIRTY] = 1
                c.stats[RP_S_DIRTY] = 1
            return 0
        if off == 7:
            out[0] = w[RP_W_UART_SCR]
            return 0
        return 1
    if kind == RP_DEV_POST:
        out[0] = 0xFF
        return 0
    if kind == RP_DEV_DEBUGCON:
        out[0] = w[RP_W_DCON_READBACK]
        return 0
    if kind == RP_DEV_CMOS:
        if port == w[RP_W_CMOS_BASE]:
            out[0] = 0xFF
            return 0
        i = w[RP_W_CMOS_INDEX]
        if _rp_cmos_clock(i):
            return 1
        data = c.bufs[w[RP_W_CMOS_BUF]]        # >= 128 bytes, i <= 0x7F (bind)
        out[0] = data[i]
        if i == 0x0C:
            data[i] = 0                         # status C is cleared by reads
        return 0
    if kind == RP_DEV_PCI:
        off = port - w[RP_W_PCI_BASE]
        if off >= 4:
            if off + size > 8:
                return 1                        # PciHost raises for this; let it
            row = _rp_pci_target(c, w)
            if row < 0:
                out[0] = RP_MASK[size]          # master abort
                return 0
            cfg = c.bufs[c.pcifn[RP_NFCOLS * row + RP_F_CONFIG]] + (w[RP_W_PCI_ADDR] & 0xFC) + off - 4
            v = 0
            for i in range(size):
                v |= (<uint64_t>cfg[i]) << (8 * i)
            out[0] = v
            return 0
        if off == 0 and size == 4:
            out[0] = w[RP_W_PCI_ADDR]
        elif off == 1 and size == 1:
            out[0] = w[RP_W_PCI_RCR]
        else:
            out[0] = RP_MASK[size]
        return 0
    return 1


@cython.boundscheck(TDXVE_DEBUG)
@cython.wraparound(TDXVE_DEBUG)
cdef int _rp_dev_write(rp_ctx* c, Py_ssize_t dev, uint64_t port, uint64_t size,
                       uint64_t value) noexcept nogil:
    # 0: done; 1: Python must serve this access.
    cdef uint64_t* w = c.dstate + RP_NWORDS * dev
    cdef uint64_t kind = w[RP_W_KIND], off, v, i, old, new, changed, b, m
    cdef Py_ssize_t row
    cdef const int64_t* f
    cdef uint8_t* cfg
    cdef const uint8_t* wm
    cdef const uint8_t* w1c
    if kind == RP_DEV_LATCH:
        if w[RP_W_LATCH_WRITABLE]:
            w[RP_W_LATCH_VALUE] = value
            w[RP_W_DIRTY] = 1
            c.stats[RP_S_DIRTY] = 1
        return 0
    if kind == RP_DEV_SINK:
        w[RP_W_SINK_WRITES] += 1
        w[RP_W_SINK_WBYTES] += size
        w[RP_W_DIRTY] = 1
        c.stats[RP_S_DIRTY] = 1
        return 0
    if kind == RP_DEV_UART:
        off = port - w[RP_W_UART_BASE]
        v = value & 0xFF
        if off == 0:
            if w[RP_W_UART_LCR] & 0x80:
                w[RP_W_UART_DLL] = v
            elif w[RP_W_UART_MCR] & 0x10 or w[RP_W_UART_ON_TX]:
                return 1                        # loopback feeds the receiver; on_tx is Python
            else:
                _rp_out(c, dev, v)              # the transmitter is instant: THRE re-armed
                w[RP_W_UART_THR_IPENDING] = 1
            w[RP_W_DIRTY] = 1
            c.stats[RP_S_DIRTY] = 1
            return 0
        if off == 1:
            if w[RP_W_UART_LCR] & 0x80:
                w[RP_W_UART_DLM] = v
            else:
                old = w[RP_W_UART_IER]
                w[RP_W_UART_IER] = v & 0x0F
                if v & 0x02 and not old & 0x02:
                    w[RP_W_UART_THR_IPENDING] = 1
            w[RP_W_DIRTY] = 1
            c.stats[RP_S_DIRTY] = 1
            return 0
        if off == 2:
            return 1                            # FCR resets the receiver
        if off == 3:
            w[RP_W_UART_LCR] = v
            w[RP_W_DIRTY] = 1
            c.stats[RP_S_DIRTY] = 1
            return 0
        if off == 4:
            old = _rp_uart_lines(w)
            w[RP_W_UART_MCR] = v & 0x1F
            new = _rp_uart_lines(w)
            changed = old ^ new
            # delta bits: DCTS, DDSR, TERI (trailing edge of RI only), DDCD
            w[RP_W_UART_MSR_DELTA] |= (((changed >> 4) & 0x01) | ((changed >> 4) & 0x02)
                                       | (0x04 if (old & 0x40) and not (new & 0x40) else 0)
                                       | ((changed >> 4) & 0x08))
            w[RP_W_DIRTY] = 1
            c.stats[RP_S_DIRTY] = 1
            return 0
        if off == 7:
            w[RP_W_UART_SCR] = v
            w[RP_W_DIRTY] = 1
            c.stats[RP_S_DIRTY] = 1
            return 0
        if off == 5 or off == 6:
            return 0                            # LSR, MSR writes are ignored
        return 1
    if kind == RP_DEV_POST:
        if w[RP_W_POST_ON_CODE]:
            return 1
        _rp_out(c, dev, value & 0xFF)
        return 0
    if kind == RP_DEV_DEBUGCON:
        if w[RP_W_DCON_ON_WRITE]:
            return 1
        _rp_out(c, dev, value & 0xFF)
        return 0
    if kind == RP_DEV_CMOS:
        v = value & 0xFF
        if port == w[RP_W_CMOS_BASE]:
            w[RP_W_CMOS_INDEX] = v & 0x7F       # bit 7: the PC's NMI mask
            w[RP_W_CMOS_NMI] = v >> 7
            w[RP_W_DIRTY] = 1
            c.stats[RP_S_DIRTY] = 1
            return 0
        i = w[RP_W_CMOS_INDEX]
        if _rp_cmos_clock(i) or i == 0x0B:
            return 1                            # the clock is read or restarted
        if i == 0x0C or i == 0x0D:
            return 0                            # status C and D are read-only
        c.bufs[w[RP_W_CMOS_BUF]][i] = <uint8_t>v
        return 0
    if kind == RP_DEV_PCI:
        off = port - w[RP_W_PCI_BASE]
        if off >= 4:
            if off + size > 8:
                return 1
            row = _rp_pci_target(c, w)
            if row < 0:
                return 0                        # master abort: dropped
            f = c.pcifn + RP_NFCOLS * row
            if not f[RP_F_COMPILED]:
                return 1
            i = (w[RP_W_PCI_ADDR] & 0xFC) + off - 4
            cfg = c.bufs[f[RP_F_CONFIG]] + i
            wm = c.bufs[f[RP_F_WMASK]] + i
            w1c = c.bufs[f[RP_F_W1C]] + i
            for i in range(size):
                # PciFunction.write: writable bits from the value, W1C bits cleared by 1s
                b = (value >> (8 * i)) & 0xFF
                m = wm[i]
                cfg[i] = <uint8_t>(((cfg[i] & ~m) | (b & m)) & ~(b & w1c[i]))
            return 0
        if off == 0 and size == 4:
            w[RP_W_PCI_ADDR] = value & 0x80FFFFFCULL
            w[RP_W_DIRTY] = 1
            c.stats[RP_S_DIRTY] = 1
        elif off == 1 and size == 1:
            if value & 0x04:                    # RST_CPU: a reset request, RCR unchanged
                w[RP_W_PCI_RESETS] += 1
            else:
                w[RP_W_PCI_RCR] = value & 0x02
            w[RP_W_DIRTY] = 1
            c.stats[RP_S_DIRTY] = 1
        return 0
    return 1


# ---------------------------------------------------------------- bus (PortBus) and host (Host)

cdef inline int _rp_piece_read(rp_ctx* c, Py_ssize_t dev, uint64_t port, uint64_t size,
                               uint64_t* out) noexcept nogil:
    # 0 ok, -1 abort
    cdef int64_t r
    if _rp_dev_read(c, dev, port, size, out) == 0:
        out[0] &= RP_MASK[size]
        return 0
    r = _rp_callback(c, RP_CB_READ, dev, <int64_t>port, <int64_t>size, 0)
    if r < 0:
        c.abort = <int>r
        return -1
    if <uint64_t>r & RP_CB_ERROR:
        c.dev_err = 1
    out[0] = <uint64_t>r & RP_U32
    return 0


cdef inline int _rp_piece_write(rp_ctx* c, Py_ssize_t dev, uint64_t port, uint64_t size,
                                uint64_t value) noexcept nogil:
    cdef int64_t r
    if _rp_dev_write(c, dev, port, size, value) == 0:
        return 0
    r = _rp_callback(c, RP_CB_WRITE, dev, <int64_t>port, <int64_t>size, value)
    if r < 0:
        c.abort = <int>r
        return -1
    if <uint64_t>r & RP_CB_ERROR:
        c.dev_err = 1
    return 0


cdef inline bint _rp_all_unassigned(const int32_t* slots, uint64_t port, uint64_t size) noexcept nogil:
    if size == 1:
        return True
    if port + size > 0x10000 or slots[port + 1] >= 0:
        return False
    return size == 2 or (slots[port + 2] < 0 and slots[port + 3] < 0)


cdef inline uint64_t _rp_piece_len(const int64_t* rg, uint64_t p, uint64_t left) noexcept nogil:
    # Largest size the device accepts that fits (QEMU access_with_adjusted_size); 0 = none.
    cdef uint64_t room = <uint64_t>rg[1] - p + 1
    cdef uint64_t mask = <uint64_t>rg[2]
    if left < room:
        room = left
    if room >= 4 and mask & 16:
        return 4
    if room >= 2 and mask & 4:
        return 2
    if mask & 2:
        return 1
    return 0


cdef int _rp_bus_read_split(rp_ctx* c, uint64_t port, uint64_t size, uint64_t reply,
                            uint64_t* out) noexcept nogil:
    cdef uint64_t value = 0, i = 0, p, n, v
    cdef int32_t r
    cdef bint missed = False
    cdef const int64_t* rg = NULL
    c.stats[RP_S_SPLITS] += 1
    while i < size:
        p = port + i
        r = c.slots[p] if p <= 0xFFFF else -1
        n = 0
        if r >= 0:
            rg = c.ranges + 4 * r
            n = _rp_piece_len(rg, p, size - i)
        if n == 0:
            value |= ((reply >> (8 * i)) & 0xFF) << (8 * i)
            missed = True
            i += 1
            continue
        if _rp_piece_read(c, <Py_ssize_t>rg[3], p, n, &v) < 0:
            return -1
        value |= v << (8 * i)
        i += n
    if missed:
        c.stats[RP_S_UNASSIGNED] += 1
    out[0] = value
    return 0


cdef int _rp_bus_write_split(rp_ctx* c, uint64_t port, uint64_t size, uint64_t value) noexcept nogil:
    cdef uint64_t i = 0, p, n
    cdef int32_t r
    cdef bint missed = False
    cdef const int64_t* rg = NULL
    c.stats[RP_S_SPLITS] += 1
    while i < size:
        p = port + i
        r = c.slots[p] if p <= 0xFFFF else -1
        n = 0
        if r >= 0:
            rg = c.ranges + 4 * r
            n = _rp_piece_len(rg, p, size - i)
        if n == 0:
            missed = True
            i += 1
            continue
        if _rp_piece_write(c, <Py_ssize_t>rg[3], p, n, (value >> (8 * i)) & RP_MASK[n]) < 0:
            return -1
        i += n
    if missed:
        c.stats[RP_S_UNASSIGNED] += 1
    return 0


cdef inline void _rp_log(rp_ctx* c, uint64_t port, uint64_t size, uint64_t write, uint64_t value,
                         uint64_t status, uint64_t flag) noexcept nogil:
    # One Host event-log record (value all-ones = none); room reserved per event.
    cdef uint64_t n
    cdef uint64_t* row
    if c.cfg[RP_CFG_LOG]:
        n = c.stats[RP_S_LOG_N]
        row = c.logbuf + 6 * n
        row[0] = port
        row[1] = size
        row[2] = write
        row[3] = value
        row[4] = status
        row[5] = flag
        c.stats[RP_S_LOG_N] = n + 1


@cython.boundscheck(TDXVE_DEBUG)
@cython.wraparound(TDXVE_DEBUG)
cdef int _rp_host_io(rp_ctx* c, uint64_t size, uint64_t write, uint64_t port, uint64_t r15,
                     uint64_t reply, uint64_t* r10, uint64_t* r11) noexcept nogil:
    # KVM tdx_emulate_io as tdxve.host.Host.tdvmcall serves it (ref 5.2); 0 ok, -1 abort.
    cdef uint64_t value = 0
    cdef uint64_t* pc
    cdef int32_t r
    cdef const int64_t* rg = NULL
    cdef int st
    c.stats[RP_S_IO_CALLS] += 1
    if size != 1 and size != 2 and size != 4:
        c.stats[RP_S_INVALID] += 1
        _rp_log(c, port, size, write, RP_U64, RP_INVALID_OPERAND, 0)
        r10[0] = RP_INVALID_OPERAND
        r11[0] = RP_IO_SUBFN
        return 0
    pc = c.ports + 4 * port
    if pc[0] == 0 and pc[1] == 0 and c.stats[RP_S_TOUCHED] < 0x10000:
        c.touched[c.stats[RP_S_TOUCHED]] = <uint16_t>port
        c.stats[RP_S_TOUCHED] += 1
    c.dev_err = 0
    r = c.slots[port]
    if write:
        value = r15 & RP_MASK[size]             # only `size` bytes of R15 reach the device
        pc[1] += 1
        pc[3] += size
        if r >= 0:
            rg = c.ranges + 4 * r
            if port + size - 1 <= <uint64_t>rg[1] and (<uint64_t>rg[2] >> size) & 1:
                st = _rp_piece_write(c, <Py_ssize_t>rg[3], port, size, value)
            else:
                st = _rp_bus_write_split(c, port, size, value)
        elif _rp_all_unassigned(c.slots, port, size):
            c.stats[RP_S_UNASSIGNED] += 1
            st = 0
        else:
            st = _rp_bus_write_split(c, port, size, value)
    else:
        pc[0] += 1
        pc[2] += size
        if r >= 0:
            rg = c.ranges + 4 * r
            if port + size - 1 <= <uint64_t>rg[1] and (<uint64_t>rg[2] >> size) & 1:
                st = _rp_piece_read(c, <Py_ssize_t>rg[3], port, size, &value)
            else:
                st = _rp_bus_read_split(c, port, size, reply, &value)
        elif _rp_all_unassigned(c.slots, port, size):
            c.stats[RP_S_UNASSIGNED] += 1
            value = reply & RP_MASK[size]
            st = 0
        else:
            st = _rp_bus_read_split(c, port, size, reply, &value)
    if st < 0:
        if c.abort == -2:       # DeviceError: the host answers INVALID_OPERAND, then raises
            c.stats[RP_S_INVALID] += 1
            _rp_log(c, port, size, write, value if write else RP_U64, RP_INVALID_OPERAND, 1)
        return -1
    if c.dev_err:               # a device error the bus recorded: the guest sees a failure
        c.stats[RP_S_INVALID] += 1
        _rp_log(c, port, size, write, value if write else RP_U64, RP_INVALID_OPERAND, 1)
        r10[0] = RP_INVALID_OPERAND
        r11[0] = RP_IO_SUBFN
        return 0
    _rp_log(c, port, size, write, value, 0, 0)
    r10[0] = 0                  # KVM leaves R10 as the guest passed it (0)
    r11[0] = RP_IO_SUBFN if write else value
    return 0


# ---------------------------------------------------------------- the event loop

@cython.boundscheck(TDXVE_DEBUG)
@cython.wraparound(TDXVE_DEBUG)
cdef Py_ssize_t _rp_run(rp_ctx* c, const rp_event* events, rp_result* results,
                        Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    # Returns the next event index (< stop: a buffer is full), or -1 after a
    # failed callback (stats[S_NEXT] = the event it failed in).
    cdef int64_t merge = c.cfg[RP_CFG_MERGE]
    cdef bint early = c.cfg[RP_CFG_EARLY] != 0
    cdef bint advance = c.cfg[RP_CFG_ADVANCE] != 0
    cdef uint64_t loop_limit = <uint64_t>c.cfg[RP_CFG_LOOP]
    cdef bint host_py = c.cfg[RP_CFG_HOST] == RP_HOST_PYTHON
    cdef bint reply_per_event = c.cfg[RP_CFG_REPLY_MODE] != 0
    cdef uint64_t reply_const = <uint64_t>c.cfg[RP_CFG_REPLY_CONST]
    cdef bint has_filter = c.cfg[RP_CFG_FILTER] != 0
    cdef bint repeat = early and not advance
    # Any event may repeat (instr_len 0): reserve room for the whole loop.
    cdef uint64_t iters_max = loop_limit
    cdef uint64_t out_cap = <uint64_t>c.cfg[RP_CFG_OUTCAP]
    cdef uint64_t log_cap = <uint64_t>c.cfg[RP_CFG_LOGCAP]
    cdef uint64_t out_need = 4 * iters_max if out_cap else 0
    cdef uint64_t log_need = iters_max if c.cfg[RP_CFG_LOG] else 0
    cdef uint64_t* stats = c.stats
    cdef const rp_event* e
    cdef rp_result* res
    cdef Py_ssize_t i
    cdef uint64_t q, rax, reply, size, is_in, port, r15, r11, r10, status, ves, calls, delta
    cdef uint8_t fault
    cdef bint ok
    cdef int64_t rc
    for i in range(start, stop):
        if stats[RP_S_OUT_N] + out_need > out_cap or stats[RP_S_LOG_N] + log_need > log_cap:
            return i
        e = events + i
        q = e.exit_qual & RP_U32        # handle_io works on a u32 copy (ref 1.3)
        rax = e.rax
        reply = e.reply if reply_per_event else reply_const
        size = (q & 7) + 1
        is_in = (q >> 3) & 1
        port = q >> 16
        r15 = 0
        r11 = 0
        status = 0
        fault = RP_FAULT_NONE
        ves = 0
        calls = 0
        delta = 0
        stats[RP_S_LAST] = <uint64_t>i + 1
        while True:
            ves += 1
            stats[RP_S_VES] += 1                # #VE + VEINFO.GET (ref 2.2, 2.3)
            if q & 0x10:                        # string I/O: -EIO (ref 1.8)
                fault = RP_FAULT_STRING_IO
                break
            if has_filter and not c.filter[port]:
                # Intel's filter: IN reads all-ones, OUT dropped, success (ref 1.11)
                if is_in:
                    rax = _rp_merge(merge, rax, RP_U32, size, True)
                ok = True
            else:
                r15 = 0 if is_in else _rp_out_data(merge, rax, size)
                if host_py:
                    rc = _rp_callback(c, RP_CB_TDVMCALL, <int64_t>size, <int64_t>((1 - is_in) | port << 1),
                                      <int64_t>reply, r15)
                    # the plan's arrays may have moved
                    stats = c.stats
                    if rc < 0:
                        c.abort = -1
                        stats[RP_S_NEXT] = <uint64_t>i
                        return -1
                    if rc == 1:                 # the TDCALL failed: Linux panics (ref 1.10)
                        fault = RP_FAULT_GUEST_PANIC
                        break
                    calls += 1
                    r10 = stats[RP_S_CB_R10]
                    r11 = stats[RP_S_CB_R11]
                else:
                    calls += 1
                    stats[RP_S_VMCALLS] += 1
                    if _rp_host_io(c, size, 1 - is_in, port, r15, reply, &r10, &r11) < 0:
                        stats = c.stats
                        stats[RP_S_NEXT] = <uint64_t>i
                        return -1
                    stats = c.stats
                    stats[RP_S_TDCALLS] += 1
                status = r10
                ok = r10 == 0
                if is_in:
                    rax = _rp_merge(merge, rax, r11, size, ok)
            if not ok:
                fault = RP_FAULT_IO_FAILED
                break
            if repeat or e.instr_len == 0:      # RIP stays: IRET re-executes (ref 1.1)
                if ves >= loop_limit:
                    fault = RP_FAULT_VE_LOOP
                    break
                continue
            delta = e.instr_len
            break
        if TDXVE_DEBUG:
            if ves > iters_max or calls > ves or stats[RP_S_OUT_N] > out_cap or stats[RP_S_LOG_N] > log_cap:
                stats[RP_S_NEXT] = <uint64_t>i
                c.abort = -3
                return -1
        res = results + i
        res.rax = rax
        res.r15 = r15
        res.r11 = r11
        res.status = status
        res.rip_delta = <uint32_t>delta
        res.ves = <uint32_t>ves
        res.tdvmcalls = <uint32_t>calls
        res.fault = fault
        memset(res._pad, 0, 3)
    return stop


def replay_kernel(plan, events, results, start, stop):
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
    cdef rp_ctx c
    cdef Py_ssize_t lo, hi, nxt
    cdef list keep = []
    cdef list hold = []
    if (not isinstance(events, np.ndarray) or events.dtype != _RP_EVENT_DTYPE or events.ndim != 1
            or not events.flags.c_contiguous):
        raise _RP.plan_error("events")
    if (not isinstance(results, np.ndarray) or results.dtype != _RP_RESULT_DTYPE or results.ndim != 1
            or not results.flags.c_contiguous or not results.flags.writeable):
        raise _RP.plan_error("results")
    if type(start) is not int or type(stop) is not int:
        raise _RP.plan_error("start_type", start, stop)
    if not 0 <= start <= stop <= min(events.shape[0], results.shape[0]):
        raise _RP.plan_error("start_range", start, stop, events.shape[0], results.shape[0])
    lo = start
    hi = stop
    cdef const rp_event* ev = <const rp_event*>cnp.PyArray_DATA(events)
    cdef rp_result* res = <rp_result*>cnp.PyArray_DATA(results)
    memset(&c, 0, sizeof(rp_ctx))
    c.plan = <PyObject*>plan
    c.keep = <PyObject*>keep
    try:
        _rp_bind_static(&c, plan, hold)
        _rp_bind_dynamic(&c, plan)
        with nogil:
            nxt = _rp_run(&c, ev, res, lo, hi)
    finally:
        free(c.bufs)
        free(c.buflen)
    if nxt < 0 and c.abort == -3:
        raise AssertionError("tdxve debug build: replay kernel invariant broken")  # TDXVE_DEBUG only
    return nxt
