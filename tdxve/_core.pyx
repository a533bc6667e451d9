# cython: freethreading_compatible=True
"""Compiled core of tdxve: port-I/O instruction and exit-qualification decode.

The readable specification is the pure twin :mod:`tdxve._core_py`; this
module implements the same names, signatures, dtypes and exceptions
(``tests/test_parity.py`` checks it). Record layouts and prototypes are in
``_core.pxd``. Hot loops work on raw pointers after explicit length checks
and run without the GIL; errors are turned into exceptions in one place,
:func:`tdxve._common.decode_error`, shared with the twin.
"""

cimport cython
cimport numpy as cnp
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memmove

import sys

import numpy as np

from . import _common as C
from .abi import (
    EXIT_INFO_DTYPE,
    EXIT_QUAL_DTYPE,
    INSN_DTYPE,
    ExitQual,
    IoInsn,
    IoKind,
    Segment,
)
from .errors import ExitQualError

cnp.import_array()

from cpython.ref cimport PyObject, Py_INCREF

cdef extern from *:
    """
    /* Build an instance of a tuple subclass (a NamedTuple) from n new
       references without the intermediate tuple of tuple.__new__(cls, t).
       tp_alloc zero-fills and GC-tracks it; tuple traversal skips NULLs. */
    static PyObject *tdxve_tuple_of(PyTypeObject *tp, Py_ssize_t n, PyObject **items) {
        Py_ssize_t i;
        PyObject *t = tp->tp_alloc(tp, n);
        if (t == NULL) {
            for (i = 0; i < n; i++) Py_DECREF(items[i]);
            return NULL;
        }
        for (i = 0; i < n; i++) PyTuple_SET_ITEM(t, i, items[i]);
        return t;
    }
    """
    object tdxve_tuple_of(type tp, Py_ssize_t n, PyObject** items)


cdef inline PyObject* _new_ref(object o) noexcept:
    Py_INCREF(o)
    return <PyObject*>o

__all__ = [
    "BACKEND",
    "decode_exit_qual", "encode_exit_qual", "decode_exit_quals",
    "decode_insn", "decode_insns", "exit_info", "exit_infos",
    "replay_kernel", "UcFastPath",
]

BACKEND = "cython"
#: True in a TDXVE_DEBUG=1 build (bounds/wraparound checks and hot-loop invariants on).
DEBUG_BUILD = TDXVE_DEBUG

if (sizeof(insn_rec) != INSN_DTYPE.itemsize or sizeof(qual_rec) != EXIT_QUAL_DTYPE.itemsize
        or sizeof(info_rec) != EXIT_INFO_DTYPE.itemsize):
    raise ImportError("tdxve._core record layouts do not match tdxve.abi dtypes")

cdef bint LITTLE_ENDIAN = sys.byteorder == "little"

# SDM Table 27-5 (ref 3.1): bits 63:32 and 15:7 reserved.
cdef uint64_t QUAL_RESERVED = 0xFFFFFFFF0000FF80ULL

# ---------------------------------------------------------------- threads

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    int pthread_create(pthread_t* t, const void* attr, void* (*fn)(void*) noexcept nogil,
                       void* arg)
    int pthread_join(pthread_t t, void** ret)

cdef extern from "<unistd.h>" nogil:
    long sysconf(int name)
    int _SC_NPROCESSORS_ONLN

# Element-wise batch kernels over more than this many records run in two
# halves, the second on a short-lived pthread (no OpenMP: nothing persists,
# so a fork() in the user's program is safe). Results do not depend on it.
cdef Py_ssize_t SPLIT_MIN = 1 << 20
cdef bint MULTICORE = sysconf(_SC_NPROCESSORS_ONLN) > 1


# ---------------------------------------------------------------- tables

cdef uint8_t BCLS[256]      # byte class for the prefix scan
cdef uint8_t IOINFO[256]    # opcode: bits 1:0 kind, bit 2 byte form, bit 3 imm8 port, bit 4 valid
cdef int8_t SEGOF[256]      # segment prefix -> Segment


cdef void _init_tables() noexcept:
    cdef int b
    for b in range(256):
        BCLS[b] = BC_OTHER
        IOINFO[b] = 0
        SEGOF[b] = -1
    BCLS[0x66] = BC_OPSIZE
    BCLS[0x67] = BC_ADDRSIZE
    BCLS[0xF2] = BC_REP
    BCLS[0xF3] = BC_REP
    BCLS[0xF0] = BC_LOCK
    for b, s in ((0x26, 0), (0x2E, 1), (0x36, 2), (0x3E, 3)):
        BCLS[b] = BC_SEG
        SEGOF[b] = s
    for b, s in ((0x64, 4), (0x65, 5)):
        BCLS[b] = BC_SEG_FSGS
        SEGOF[b] = s
    for b in range(0x40, 0x50):
        BCLS[b] = BC_REX
    # ref 3.3: kind IN=0 OUT=1 INS=2 OUTS=3; | 4 byte form; | 8 imm8 port;
    # | 16 "is a port-I/O opcode"
    for b, info in ((0x6C, 2 | 4), (0x6D, 2), (0x6E, 3 | 4), (0x6F, 3),
                    (0xE4, 0 | 4 | 8), (0xE5, 0 | 8), (0xE6, 1 | 4 | 8), (0xE7, 1 | 8),
                    (0xEC, 0 | 4), (0xED, 0), (0xEE, 1 | 4), (0xEF, 1)):
        BCLS[b] = BC_IO
        IOINFO[b] = info | 16


_init_tables()

cdef tuple KINDS = tuple(IoKind)
cdef tuple SEGMENTS = tuple(Segment)


# ---------------------------------------------------------------- mechanism

cdef int decode_at(const uint8_t* p, Py_ssize_t n, int mode, insn_rec* out,
                   Py_ssize_t* stop) noexcept nogil:
    # Decode one instruction from p[0:n]; returns ST_*, *stop = position of
    # the byte where decoding stopped. Rules: _core_py._decode_at docstring
    # (ref 3.3, 3.4, settled against iced-x86). Reads p[pos] only after
    # checking pos < n and pos < 15.
    cdef Py_ssize_t pos = 0
    cdef uint8_t b = 0, c, info, size, addr
    cdef bint opsize = False, addrsize = False, lock = False, rex_w = False
    cdef bint m64 = mode == 64
    cdef uint8_t rep = 0
    cdef int8_t seg = -1, seg_fsgs = -1, segment
    cdef int32_t port = -1
    while True:
        if pos >= 15:
            stop[0] = pos
            return ST_TOO_LONG
        if pos >= n:
            stop[0] = pos
            return ST_TRUNCATED
        b = p[pos]
        c = BCLS[b]
        if c == BC_IO:
            break
        elif c == BC_OPSIZE:
            opsize = True
        elif c == BC_ADDRSIZE:
            addrsize = True
        elif c == BC_REP:
            rep = b
        elif c == BC_SEG:
            seg = SEGOF[b]
        elif c == BC_SEG_FSGS:
            # 64-bit mode: FS/GS outrank ES/CS/SS/DS (iced-x86 decoder)
            if m64:
                seg_fsgs = SEGOF[b]
            else:
                seg = SEGOF[b]
        elif c == BC_LOCK:
            lock = True
        elif c == BC_REX and m64:
            # only the REX directly before the opcode counts
            rex_w = (b & 0x08) != 0
            pos += 1
            continue
        else:
            stop[0] = pos
            return ST_NOT_IO
        rex_w = False
        pos += 1

    if lock:
        stop[0] = pos
        return ST_LOCK      # #UD before any VM exit (ref 3.4)
    info = IOINFO[b]
    pos += 1
    if info & 8:
        if pos >= 15:
            stop[0] = pos
            return ST_TOO_LONG
        if pos >= n:
            stop[0] = pos
            return ST_TRUNCATED
        port = p[pos]
        pos += 1

    if info & 4:
        size = 1
    elif rex_w:
        size = 4            # 66 + REX.W = 32-bit (XED IMMUNE_REXW, ref 3.4)
    elif (mode == 16) != opsize:
        size = 2
    else:
        size = 4
    if m64:
        addr = 32 if addrsize else 64
    elif mode == 32:
        addr = 16 if addrsize else 32
    else:
        addr = 32 if addrsize else 16
    c = info & 3
    if c == 2:
        segment = 0         # INS: ES:rDI, never overridden (ref 3.3)
    elif c == 3:
        segment = seg_fsgs if seg_fsgs >= 0 else (seg if seg >= 0 else 3)
    else:
        segment = -1
    out.port = port
    out.length = <uint8_t>pos
    out.kind = c
    out.size = size
    out.rep = rep != 0
    out.addr_size = addr
    out.segment = segment
    out.rep_prefix = rep
    out._pad = 0
    stop[0] = pos
    return ST_OK


cdef bint qual_valid(uint64_t q) noexcept nogil:
    # Strict validity (_common.qual_problem is None), branch-free:
    # size encoding 0/1/3, reserved bits clear, no imm port on INS/OUTS,
    # imm port <= 0xFF (ref 3.1, 3.3).
    cdef uint64_t imm = (q >> 6) & 1
    cdef uint64_t bad_imm = imm & (((q >> 4) & 1) | (((q >> 16) & 0xFFFF) > 0xFF))
    return ((q & QUAL_RESERVED) == 0) & ((0x0B >> (q & 7)) & 1) & (bad_imm ^ 1)


cdef int insn_exit_info(const insn_rec* r, uint64_t dx, info_rec* out) noexcept nogil:
    # VE info for one record (ref 2.2, 3.1, 3.2); -1 if the record is not a
    # possible port-I/O instruction. Same rules as _core_py._exit_info_fields.
    cdef uint64_t enc, acode, q
    cdef uint8_t kind = r.kind
    cdef bint string = kind >= 2
    if kind > 3 or r.length < 1 or r.length > 15:
        return -1
    if r.size == 1:
        enc = 0
    elif r.size == 2:
        enc = 1
    elif r.size == 4:
        enc = 3
    else:
        return -1
    if r.addr_size == 16:
        acode = 0
    elif r.addr_size == 32:
        acode = 1
    elif r.addr_size == 64:
        acode = 2
    else:
        return -1
    if r.port != -1 and (r.port < 0 or r.port > 0xFF or string):
        return -1
    if not ((r.segment == -1 and not string) or (0 <= r.segment <= 5 and string)):
        return -1
    q = (enc | (<uint64_t>(kind == 0 or kind == 2) << 3) | (<uint64_t>string << 4)
         # REP bit only on INS/OUTS (see exit_info docstring)
         | (<uint64_t>(string and r.rep != 0) << 5)
         | (<uint64_t>(r.port >= 0) << 6))
    if r.port >= 0:
        q |= <uint64_t>r.port << 16
    else:
        q |= (dx & 0xFFFF) << 16
    out.exit_qual = q
    out.instr_len = r.length
    out.instr_info = <uint32_t>((acode << 7) | (<uint64_t>r.segment << 15)) if string else 0
    return 0


# ---------------------------------------------------------------- stream kernel
#
# decode_insns walks the stream in blocks. A backward pass over each block
# (plus a 16-byte look-ahead) stores, for every byte position, the length of
# the prefix run starting there and whether the byte after the run is an
# imm8 opcode, so stepping to the next instruction is one load and one add.
# Prefix attributes of up to 3 prefixes come from masked table lookups
# without branches; anything else (4+ prefixes, LOCK, a non-I/O byte, a
# truncated or over-long instruction, the end of a block) goes through the
# exact scalar decode_at. Both paths give identical records (tests compare
# them with the pure twin on long random streams).

# ATTR_<mode>[b]: attribute bits of prefix byte b (0 for anything else).
#   bit 0: 66   bit 1: 67   bit 2: F0   bits 4:3: rep (1 = F2, 2 = F3)
#   bits 7:5: segment + 1 (ES/CS/SS/DS; every segment outside 64-bit mode)
#   bits 10:8: FS/GS + 1 (64-bit mode)   bit 11: REX.W (64-bit mode)
# RUN_<mode>[b]: bit 0 = b is a prefix; bit 1 = b is an imm8 I/O opcode.
cdef uint32_t ATTR64[256]
cdef uint32_t ATTR32[256]
cdef uint8_t RUN64[256]
cdef uint8_t RUN32[256]
cdef uint8_t REP_BYTE[4]
cdef uint8_t SIZE_LUT[8]       # [byte form << 2 | REX.W << 1 | 16-bit operand] -> size
cdef uint8_t SEG_DEFAULT_DS[8] # segment field (seg + 1, 0 = none) -> segment, default DS
cdef int8_t KIND_SEG[4]        # kind -> segment of IN, OUT, INS (OUTS computed)


cdef uint32_t FIELD_NZ[256]    # (attr >> 3) & 0xFF -> all-ones over each non-zero field


cdef void _init_stream_tables() noexcept:
    cdef int b
    for b in range(256):
        ATTR64[b] = 0
        ATTR32[b] = 0
        RUN64[b] = 0
        RUN32[b] = 0
    for b, bits in ((0x66, 1), (0x67, 2), (0xF0, 4), (0xF2, 1 << 3), (0xF3, 2 << 3),
                    (0x26, 1 << 5), (0x2E, 2 << 5), (0x36, 3 << 5), (0x3E, 4 << 5)):
        ATTR64[b] = bits
        ATTR32[b] = bits
        RUN64[b] = 1
        RUN32[b] = 1
    ATTR64[0x64] = 5 << 8
    ATTR64[0x65] = 6 << 8
    ATTR32[0x64] = 5 << 5
    ATTR32[0x65] = 6 << 5
    RUN64[0x64] = RUN64[0x65] = RUN32[0x64] = RUN32[0x65] = 1
    for b in range(0x40, 0x50):
        ATTR64[b] = (1 << 11) if b & 8 else 0
        RUN64[b] = 1
    for b in range(0xE4, 0xE8):
        RUN64[b] = 2
        RUN32[b] = 2
    REP_BYTE[0] = 0
    REP_BYTE[1] = 0xF2
    REP_BYTE[2] = 0xF3
    REP_BYTE[3] = 0
    for b in range(8):
        # byte forms are 1 byte; 66 + REX.W is 32-bit (ref 3.4)
        SIZE_LUT[b] = 1 if b & 4 else (4 if b & 2 else (2 if b & 1 else 4))
        SEG_DEFAULT_DS[b] = 3 if b == 0 else b - 1
    for b in range(256):
        FIELD_NZ[b] = ((3 if b & 3 else 0) | (0x1C if b & 0x1C else 0)
                       | (0xE0 if b & 0xE0 else 0))
    KIND_SEG[0] = -1
    KIND_SEG[1] = -1
    KIND_SEG[2] = 0        # INS: ES, never overridden (ref 3.3)
    KIND_SEG[3] = 3


_init_stream_tables()


@cython.boundscheck(TDXVE_DEBUG)
@cython.wraparound(TDXVE_DEBUG)
cdef Py_ssize_t _decode_stream(const uint8_t* p, Py_ssize_t n, int mode, insn_rec* out,
                               Py_ssize_t limit, Py_ssize_t base, int* st,
                               Py_ssize_t* err_start, Py_ssize_t* err_pos,
                               Py_ssize_t* pos_out) noexcept nogil:
    # Decodes instructions starting in p[0:limit] (reading up to p[n-1]);
    # out has room for limit records (every instruction is >= 1 byte).
    # Records get offset base + position. Returns the number of records;
    # *st = ST_OK or the status of the first failing instruction, which
    # starts at *err_start and failed at *err_pos (both relative to p);
    # *pos_out = where decoding stopped (>= limit on success).
    cdef uint8_t run[STREAM_BLOCK + 32]        # per position: bits 3:0 prefix-run length (15 = too many), bit 4 imm
    cdef const uint32_t* attr = &ATTR64[0] if mode == 64 else &ATTR32[0]
    cdef const uint8_t* rcls = &RUN64[0] if mode == 64 else &RUN32[0]
    cdef uint32_t size_toggle = 1 if mode == 16 else 0
    cdef Py_ssize_t pos = 0, count = 0, stop = 0, a, end, look, i
    cdef uint32_t v, c, m, npfx, imm, a0, a1, a2, flags, rep, seg, fsgs, t, rexw
    cdef uint32_t info, kind, size, outs_seg
    cdef uint8_t op
    cdef uint8_t addr_by_67[2]
    cdef insn_rec check
    cdef int32_t port
    cdef int8_t segment
    cdef int s
    cdef insn_rec* r
    addr_by_67[0] = <uint8_t>mode
    addr_by_67[1] = 32 if mode != 32 else 16
    while pos < limit:
        # ---- backward pass over [pos, end) with look-ahead up to look
        a = pos
        end = a + STREAM_BLOCK if a + STREAM_BLOCK < limit else limit
        look = end + 16 if end + 16 < n else n
        # Past the input: run 15 at the look-ahead edge (forces the exact
        # path for any prefix run that reaches it), run 0 at the true end
        # (a prefix run ending there is caught by the length check).
        v = 0 if look == n else 15
        i = look - 1
        while i >= a:
            c = rcls[p[i]]
            # prefix: run + 1 saturating at 15, keeping the imm bit of the
            # run's opcode; otherwise run 0 and this byte's imm bit. Masks,
            # not branches: the byte classes of a real stream are random.
            t = (v & 15) + 1
            t -= t >> 4
            m = 0u - (c & 1)
            v = ((t | (v & 16)) & m) | (((c & 2) << 3) & ~m)
            run[i - a] = <uint8_t>v
            i -= 1
        # ---- forward walk over instruction starts in [a, end)
        while pos < end:
            v = run[pos - a]
            npfx = v & 15
            imm = (v >> 4) & 1
            r = out + count
            if npfx <= 3 and pos + 3 < n and pos + npfx + 1 + imm <= n:
                a0 = attr[p[pos]] & (0u - <uint32_t>(npfx >= 1))
                a1 = attr[p[pos + 1]] & (0u - <uint32_t>(npfx >= 2))
                a2 = attr[p[pos + 2]] & (0u - <uint32_t>(npfx >= 3))
                flags = a0 | a1 | a2
                # The last prefix of each kind wins (ref 3.4; iced-x86): rep,
                # segment and FS/GS are three fields in bits 10:3, merged at
                # once with a "field is non-zero" mask table.
                t = (a0 >> 3) & 0xFF
                c = (a1 >> 3) & 0xFF
                m = FIELD_NZ[c]
                t = (c & m) | (t & ~m)
                c = (a2 >> 3) & 0xFF
                m = FIELD_NZ[c]
                t = (c & m) | (t & ~m)
                rep = t & 3
                seg = (t >> 2) & 7
                fsgs = (t >> 5) & 7
                # REX counts only directly before the opcode; with no prefix
                # this reads the opcode itself, whose attribute bits are 0.
                rexw = (attr[p[pos + npfx - 1 + (npfx == 0)]] >> 11) & 1
                op = p[pos + npfx]
                info = IOINFO[op]
                if (info & 16) and not (flags & 4):
                    kind = info & 3
                    # port: the imm8, or -1 (port in DX)
                    port = <int32_t>((p[pos + npfx + 1] & (0u - imm)) | (imm - 1u))
                    size = SIZE_LUT[((info >> 2) & 1) << 2 | rexw << 1
                                    | (size_toggle ^ (flags & 1))]
                    # OUTS: FS/GS outrank the other overrides, default DS
                    m = 0u - <uint32_t>(fsgs != 0)
                    outs_seg = ((fsgs - 1u) & m) | (<uint32_t>SEG_DEFAULT_DS[seg] & ~m)
                    m = 0u - <uint32_t>(kind == 3)
                    segment = <int8_t>((outs_seg & m) | (<uint32_t>KIND_SEG[kind] & ~m))
                    r.offset = base + pos
                    r.port = port
                    r.length = <uint8_t>(npfx + 1 + imm)
                    r.kind = <uint8_t>kind
                    r.size = <uint8_t>size
                    r.rep = rep != 0
                    r.addr_size = addr_by_67[(flags >> 1) & 1]
                    r.segment = segment
                    r.rep_prefix = REP_BYTE[rep]
                    r._pad = 0
                    if TDXVE_DEBUG:
                        # the exact decoder must agree with the fast path
                        s = decode_at(p + pos, n - pos, mode, &check, &stop)
                        if (s != ST_OK or check.length != r.length or check.size != r.size
                                or check.segment != r.segment or check.port != r.port
                                or check.rep_prefix != r.rep_prefix
                                or check.addr_size != r.addr_size or check.kind != r.kind):
                            st[0] = -1
                            pos_out[0] = pos
                            return count
                    pos += npfx + 1 + imm
                    count += 1
                    continue
            # exact path
            s = decode_at(p + pos, n - pos, mode, r, &stop)
            if s != ST_OK:
                st[0] = s
                err_start[0] = pos
                err_pos[0] = pos + stop
                pos_out[0] = pos
                return count
            r.offset = base + pos
            pos += r.length
            count += 1
    st[0] = ST_OK
    pos_out[0] = pos
    return count


# Streams of at least this many bytes are decoded by two threads. Decoding
# from the middle resynchronises: the second thread starts at byte n/2 (a few
# bytes later if that lands inside an instruction and fails at once) and the
# first decodes up to n/2, then instruction by instruction until it reaches
# a boundary the second thread also found; from there on both chains are the
# same, so the records are identical to a single-threaded decode (tests
# compare against the twin). If they never meet, the first thread finishes
# alone.
cdef Py_ssize_t STREAM_SPLIT_MIN = 1 << 18
# Records the first thread may write past the second thread's region start
# before it gives up on the second thread's records.
cdef enum:
    SPLIT_GAP = 64


def _set_stream_split_min(Py_ssize_t n):
    """Testing hook: the stream size (bytes) from which decode_insns uses two threads."""
    global STREAM_SPLIT_MIN
    STREAM_SPLIT_MIN = n if n > 2 * SPLIT_GAP else 2 * SPLIT_GAP


ctypedef struct stream_job:
    const uint8_t* p
    Py_ssize_t n
    Py_ssize_t half
    int mode
    insn_rec* out
    Py_ssize_t count
    int st
    Py_ssize_t err_start
    Py_ssize_t err_pos


cdef void* _stream_job_run(void* arg) noexcept nogil:
    # Second half: decode p[start:n] with absolute offsets; restart one byte
    # later while the very first instructions fail (the split landed inside
    # an instruction).
    cdef stream_job* j = <stream_job*>arg
    cdef Py_ssize_t start = j.half, pos = 0, es = 0, ep = 0
    cdef int st = ST_OK
    while True:
        j.count = _decode_stream(j.p + start, j.n - start, j.mode, j.out, j.n - start, start,
                                 &st, &es, &ep, &pos)
        if st == ST_OK or es > SPLIT_GAP or start - j.half >= SPLIT_GAP or start + es + 1 >= j.n:
            break
        start += es + 1
    j.st = st
    j.err_start = start + es
    j.err_pos = start + ep
    return NULL


cdef Py_ssize_t _decode_stream_split(const uint8_t* p, Py_ssize_t n, int mode, insn_rec* out,
                                     int* st, Py_ssize_t* err_start, Py_ssize_t* err_pos) noexcept nogil:
    # out has room for n + SPLIT_GAP records. Same contract as _decode_stream
    # over the whole input (limit n, base 0).
    cdef Py_ssize_t pos = 0, c1, j = 0, stop = 0, tail, es = 0, ep = 0
    cdef stream_job job
    cdef pthread_t t
    cdef insn_rec* t2
    cdef int s
    if n < STREAM_SPLIT_MIN or not MULTICORE:
        return _decode_stream(p, n, mode, out, n, 0, st, err_start, err_pos, &pos)
    job.p = p
    job.n = n
    job.half = n // 2
    job.mode = mode
    job.out = out + job.half + SPLIT_GAP     # room: n - half records
    t2 = job.out
    if pthread_create(&t, NULL, _stream_job_run, &job) != 0:
        return _decode_stream(p, n, mode, out, n, 0, st, err_start, err_pos, &pos)
    c1 = _decode_stream(p, n, mode, out, job.half, 0, st, err_start, err_pos, &pos)
    pthread_join(t, NULL)
    if st[0] != ST_OK:
        return c1                            # an error in the first half ends the stream
    while True:
        if pos >= n:
            st[0] = ST_OK
            return c1
        while j < job.count and t2[j].offset < pos:
            j += 1
        if j < job.count and t2[j].offset == pos:
            # synchronised: the rest is the second thread's chain
            memmove(out + c1, t2 + j, (job.count - j) * sizeof(insn_rec))
            st[0] = job.st
            err_start[0] = job.err_start
            err_pos[0] = job.err_pos
            return c1 + job.count - j
        if j == job.count:
            if job.st != ST_OK and job.err_start == pos:
                st[0] = job.st               # its failing instruction is on our chain
                err_start[0] = job.err_start
                err_pos[0] = job.err_pos
                return c1
            break                            # nothing left to share
        if c1 >= job.half:
            break                            # about to overwrite the second region
        s = decode_at(p + pos, n - pos, mode, out + c1, &stop)
        if s != ST_OK:
            st[0] = s
            err_start[0] = pos
            err_pos[0] = pos + stop
            return c1
        out[c1].offset = pos
        pos += out[c1].length
        c1 += 1
    # no synchronisation: finish single-threaded
    tail = _decode_stream(p + pos, n - pos, mode, out + c1, n - pos, pos, st, &es, &ep, &stop)
    err_start[0] = pos + es
    err_pos[0] = pos + ep
    return c1 + tail


cdef extern from *:
    """
    /* decode_exit_quals kernel, little-endian hosts. One EXIT_QUAL_DTYPE
       record is two 64-bit words: the raw value, then the packed word
       (bytes 0-1 port, 2 size, 3 is_in, 4 is_string, 5 is_rep, 6 is_imm,
       7 valid). Only constant shifts, and/or/xor and subtraction, so the
       compiler vectorises it; GCC builds an AVX2 clone picked at load time.
       valid = strict acceptance (SDM Table 27-5, ref 3.1/3.3): size encoding
       0/1/3, bits 15:7 and 63:32 clear, no imm8 port on INS/OUTS, an imm8
       port below 0x100. */
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    #define TDXVE_CLONES __attribute__((target_clones("avx2", "default")))
    #else
    #define TDXVE_CLONES
    #endif
    static TDXVE_CLONES void tdxve_quals_le(const uint64_t *restrict src,
                                            uint64_t *restrict dst, Py_ssize_t n) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) {
            uint64_t q = src[i];
            uint64_t b0 = q & 1, b1 = (q >> 1) & 1, b2 = (q >> 2) & 1;
            uint64_t is_in = (q >> 3) & 1, str = (q >> 4) & 1;
            uint64_t rep = (q >> 5) & 1, imm = (q >> 6) & 1;
            uint64_t port = (q >> 16) & 0xFFFF;
            uint64_t res = q & 0xFFFFFFFF0000FF80ULL;
            uint64_t res_nz = (res | (0 - res)) >> 63;        /* reserved bit set */
            uint64_t hi = (q >> 24) & 0xFF;
            uint64_t hi_nz = (hi | (0 - hi)) >> 63;           /* port > 0xFF */
            uint64_t size_ok = (b2 ^ 1) & ((b1 & (b0 ^ 1)) ^ 1);  /* enc in {0,1,3} */
            uint64_t valid = (res_nz ^ 1) & size_ok & ((imm & (str | hi_nz)) ^ 1);
            dst[2 * i] = q;
            dst[2 * i + 1] = port | (((q & 7) + 1) << 16) | (is_in << 24) | (str << 32)
                             | (rep << 40) | (imm << 48) | (valid << 56);
        }
    }
    """
    void tdxve_quals_le(const uint64_t* src, uint64_t* dst, Py_ssize_t n) nogil


@cython.boundscheck(TDXVE_DEBUG)
@cython.wraparound(TDXVE_DEBUG)
cdef void _quals_kernel(const uint64_t* src, uint64_t* dst, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    tdxve_quals_le(src, dst, n)
    if TDXVE_DEBUG:
        # cross-check the vector kernel's valid bit against the scalar rule
        for i in range(n):
            if ((dst[2 * i + 1] >> 56) & 1) != qual_valid(src[i]):
                dst[2 * i + 1] = 0xFFFFFFFFFFFFFFFFULL    # size 0xFF: tests fail loudly


cdef void _quals_kernel_fields(const uint64_t* src, qual_rec* dst, Py_ssize_t n) noexcept nogil:
    # Endian-neutral variant (big-endian hosts).
    cdef Py_ssize_t i
    cdef uint64_t q
    for i in range(n):
        q = src[i]
        dst[i].raw = q
        dst[i].port = (q >> 16) & 0xFFFF
        dst[i].size = (q & 7) + 1
        dst[i].is_in = (q >> 3) & 1
        dst[i].is_string = (q >> 4) & 1
        dst[i].is_rep = (q >> 5) & 1
        dst[i].is_imm = (q >> 6) & 1
        dst[i].valid = qual_valid(q)


cdef Py_ssize_t _infos_kernel(const insn_rec* recs, const uint64_t* dx, bint dx_scalar,
                              info_rec* out, Py_ssize_t n) noexcept nogil:
    # Returns the index of the first invalid record, or -1.
    cdef Py_ssize_t i
    for i in range(n):
        if insn_exit_info(recs + i, dx[0] if dx_scalar else dx[i], out + i) != 0:
            return i
    return -1


# ---------------------------------------------------------------- two-way split



ctypedef struct quals_job:
    const uint64_t* src
    uint64_t* dst
    Py_ssize_t n


cdef void* _quals_job_run(void* arg) noexcept nogil:
    cdef quals_job* j = <quals_job*>arg
    _quals_kernel(j.src, j.dst, j.n)
    return NULL


cdef void _quals_parallel(const uint64_t* src, uint64_t* dst, Py_ssize_t n) noexcept nogil:
    cdef quals_job second
    cdef pthread_t t
    cdef Py_ssize_t half
    if n < SPLIT_MIN or not MULTICORE:
        _quals_kernel(src, dst, n)
        return
    half = n // 2
    second.src = src + half
    second.dst = dst + 2 * half
    second.n = n - half
    if pthread_create(&t, NULL, _quals_job_run, &second) != 0:
        _quals_kernel(src, dst, n)      # no thread available: do it all here
        return
    _quals_kernel(src, dst, half)
    pthread_join(t, NULL)


# ---------------------------------------------------------------- Python API

cdef inline int _mode_of(object mode) except -1:
    cdef long m
    if type(mode) is int:
        try:
            m = mode
        except OverflowError:
            m = 0
        if m == 64 or m == 32 or m == 16:
            return <int>m
    C.check_mode(mode)      # raises UnsupportedModeError
    return -1


def decode_exit_qual(q, *, strict=True):
    """Decode a VMX exit qualification for an I/O instruction (SDM Table 27-5).

    :param q: the 64-bit exit qualification (``VEINFO.GET`` RDX).
    :param strict: when True (default) reject values no I/O instruction
        produces: size encodings other than 0/1/3, reserved bits 15:7 or 63:32
        set, an immediate port on INS/OUTS or above 0xFF. When False decode
        exactly as Linux does: size = bits 2:0 + 1 (1..8), port = bits 31:16,
        no validation (ref 1.3).
    :returns: :class:`tdxve.ExitQual`.
    :raises ExitQualError: strict mode and an invalid value, or ``q`` outside
        ``[0, 2**64)``; the value is in the message and in ``.value``.
    :raises InvalidArgumentError: ``q`` is not an int.
    """
    cdef uint64_t v
    if type(q) is int and q >= 0:
        try:
            v = q
        except OverflowError:
            v = C.check_qual_int(q)
    else:
        v = C.check_qual_int(q)
    if strict and not qual_valid(v):
        raise ExitQualError(f"invalid I/O exit qualification {v:#x}: {C.qual_problem(v)}", value=v)
    cdef PyObject* items[7]
    items[0] = _new_ref((v & 7) + 1)
    items[1] = _new_ref((v & 8) != 0)
    items[2] = _new_ref((v & 16) != 0)
    items[3] = _new_ref((v & 32) != 0)
    items[4] = _new_ref((v & 64) != 0)
    items[5] = _new_ref((v >> 16) & 0xFFFF)
    items[6] = _new_ref(q if type(q) is int else v)
    return tdxve_tuple_of(ExitQual, 7, items)


def encode_exit_qual(*, size, is_in, port, is_string=False, is_rep=False, is_imm=False):
    """Build an exit qualification; the exact inverse of the strict decode.

    :raises ExitQualError: ``size`` not 1/2/4, ``port`` outside 0-0xFFFF,
        an immediate port above 0xFF or on a string instruction, or a flag
        that is not a bool.
    """
    return C.encode_exit_qual(size, is_in, port, is_string, is_rep, is_imm)


def decode_exit_quals(quals, *, out=None):
    """Decode many exit qualifications at once.

    :param quals: integers (any shape; numpy uint64 is the fast path).
    :param out: optional array of dtype :data:`tdxve.EXIT_QUAL_DTYPE` with the
        shape of ``quals`` (C-contiguous, writeable, not overlapping it) to
        decode into instead of allocating; reusing one avoids the page faults
        of a fresh output, which dominate large batches.
    :returns: a structured array of dtype :data:`tdxve.EXIT_QUAL_DTYPE`, same
        shape (``out`` itself when given). Each record holds the Linux
        (non-strict) decode of its value, and ``valid`` says whether the
        strict decode accepts it; records never raise.
    :raises InvalidArgumentError: non-integer input, a negative or over-wide
        value, or an unsuitable ``out``.
    """
    arr = C.as_u64_array(quals, "exit qualifications")
    flat = arr.reshape(-1)
    cdef Py_ssize_t n = flat.shape[0]
    if out is None:
        res = np.empty(n, dtype=EXIT_QUAL_DTYPE)
    else:
        res = C.check_out(out, arr, EXIT_QUAL_DTYPE).reshape(-1)
    cdef const uint64_t* src = <const uint64_t*>cnp.PyArray_DATA(flat)
    cdef void* dst = cnp.PyArray_DATA(res)
    with nogil:
        if LITTLE_ENDIAN:
            _quals_parallel(src, <uint64_t*>dst, n)
        else:
            _quals_kernel_fields(src, <qual_rec*>dst, n)
    return out if out is not None else res.reshape(arr.shape)


def decode_insn(code, mode=64):
    """Decode the port-I/O instruction at the start of ``code``.

    :param code: bytes, bytearray, memoryview or uint8 array; only the first
        instruction is decoded, trailing bytes are ignored.
    :param mode: processor mode, 16, 32 or 64.
    :returns: :class:`tdxve.IoInsn`.
    :raises NotPortIoError: the bytes are not IN/OUT/INS/OUTS (the message
        names the byte found).
    :raises TruncatedInputError: the input ends inside the instruction.
    :raises LockPrefixError: a LOCK prefix (#UD).
    :raises InstructionTooLongError: more than 15 bytes (#GP).
    :raises UnsupportedModeError: ``mode`` is not 16, 32 or 64.
    :raises InvalidArgumentError: ``code`` is not a byte buffer.
    """
    cdef int m = _mode_of(mode)
    cdef const uint8_t* p
    cdef Py_ssize_t n, stop = 0
    cdef const uint8_t[::1] view
    cdef insn_rec r
    cdef int st
    buf = code
    if type(code) is bytes:
        p = <const uint8_t*>PyBytes_AS_STRING(code)
        n = PyBytes_GET_SIZE(code)
        st = decode_at(p, n, m, &r, &stop)
    elif type(code) is bytearray:
        p = <const uint8_t*>PyByteArray_AS_STRING(code)
        n = PyByteArray_GET_SIZE(code)
        st = decode_at(p, n, m, &r, &stop)
    else:
        buf = C.as_code_buffer(code)
        view = buf
        n = view.shape[0]
        st = decode_at(&view[0] if n > 0 else NULL, n, m, &r, &stop)
    if st != ST_OK:
        raise C.decode_error(st, buf, 0, n, stop, m)
    cdef PyObject* items[8]
    items[0] = _new_ref(KINDS[r.kind])
    items[1] = _new_ref(r.size)
    items[2] = _new_ref(None if r.port < 0 else r.port)
    items[3] = _new_ref(r.rep != 0)
    items[4] = _new_ref(r.addr_size)
    items[5] = _new_ref(None if r.segment < 0 else SEGMENTS[r.segment])
    items[6] = _new_ref(r.length)
    items[7] = _new_ref(r.rep_prefix)
    return tdxve_tuple_of(IoInsn, 8, items)


def decode_insns(buffer, mode=64, *, on_error="raise"):
    """Decode a stream of back-to-back port-I/O instructions.

    :param buffer: bytes, bytearray, memoryview or uint8 array.
    :param mode: processor mode, 16, 32 or 64 (one mode for the whole stream).
    :param on_error: what happens at the first offset that does not start a
        valid port-I/O instruction (a non-I/O opcode, a truncated tail, LOCK,
        more than 15 bytes): ``"raise"`` (default) raises the same
        :class:`DecodeError` subclass :func:`decode_insn` would, with
        ``.offset`` set to that offset in ``buffer``; ``"stop"`` returns the
        records decoded before it (the stop offset is then
        ``out["offset"][-1] + out["length"][-1]``, or 0 for an empty result).
    :returns: a 1-D array of dtype :data:`tdxve.INSN_DTYPE`, one record per
        instruction, in order.
    """
    cdef int m = _mode_of(mode)
    cdef bint stop_on_error = C.check_on_error(on_error)
    buf = C.as_code_buffer(buffer)
    cdef const uint8_t[::1] view = buf
    cdef Py_ssize_t n = view.shape[0], count = 0, err_start = 0, err_pos = 0
    cdef int st = ST_OK
    out = np.empty(n + SPLIT_GAP, dtype=INSN_DTYPE)
    cdef insn_rec* recs = <insn_rec*>cnp.PyArray_DATA(out)
    cdef const uint8_t* p = &view[0] if n > 0 else NULL
    if n > 0:
        with nogil:
            count = _decode_stream_split(p, n, m, recs, &st, &err_start, &err_pos)
    if st < 0:
        raise AssertionError("tdxve debug build: decoder invariant broken")  # TDXVE_DEBUG only
    if st != ST_OK and not stop_on_error:
        raise C.decode_error(st, buf, err_start, n, err_pos, m)
    del view
    # Shrink in place (realloc); pages past `count` were never touched.
    out.resize(count, refcheck=False)
    return out


def exit_info(insn, dx=0):
    """What the TDX module stores in the VE info for ``insn`` (ref 2.2, 3.1, 3.2).

    :param insn: a decoded :class:`tdxve.IoInsn`.
    :param dx: RDX at the instruction; its low 16 bits are the port of the
        DX forms (ignored for the imm8 forms).
    :returns: ``(exit_qual, instr_len, instr_info)``. The exit qualification
        sets the REP bit only for INS/OUTS (F2 or F3 present). The instruction
        information carries the address size (bits 9:7) and segment (bits
        17:15; ES for INS) for INS/OUTS, and is 0 for IN/OUT, whose field the
        SDM leaves undefined.
    :raises InvalidArgumentError: ``insn`` is not a consistent IoInsn, or
        ``dx`` is not in ``[0, 2**64)``.
    """
    cdef insn_rec r
    cdef info_rec o
    cdef uint64_t d
    cdef bint fast = False
    if type(insn) is IoInsn:
        kind, size, port, rep, addr, seg, length, _ = insn
        if (type(kind) is IoKind and type(size) is int and (port is None or type(port) is int)
                and type(rep) is bool and type(addr) is int
                and (seg is None or type(seg) is Segment) and type(length) is int
                and 0 <= size <= 255 and 0 <= addr <= 255 and 0 <= length <= 255
                and (port is None or 0 <= port <= 255)):
            r.kind = kind
            r.size = size
            r.port = -1 if port is None else port
            r.rep = rep
            r.addr_size = addr
            r.segment = -1 if seg is None else seg
            r.length = length
            fast = True
    if not fast:
        k, s, p, rp, a, sg, ln = C.insn_fields(insn)
        r.kind = k
        r.size = s
        r.port = p
        r.rep = rp
        r.addr_size = a
        r.segment = sg
        r.length = ln
    if type(dx) is int and dx >= 0:
        try:
            d = dx
        except OverflowError:
            d = C.check_u64("dx", dx)
    else:
        d = C.check_u64("dx", dx)
    if insn_exit_info(&r, d, &o) != 0:
        C.insn_fields(insn)     # raises the shared, specific error
        raise AssertionError("unreachable")  # pragma: no cover
    return (o.exit_qual, o.instr_len, o.instr_info)


def exit_infos(insns, dx=0):
    """Batch :func:`exit_info` over a :data:`tdxve.INSN_DTYPE` array.

    :param insns: records from :func:`decode_insns`.
    :param dx: one RDX value for all records, or one per record.
    :returns: an array of dtype :data:`tdxve.EXIT_INFO_DTYPE`.
    :raises InvalidArgumentError: wrong dtype, a record with impossible
        fields, or a bad ``dx``.
    """
    recs = C.check_insn_array(insns)
    cdef Py_ssize_t n = recs.shape[0], bad
    cdef uint64_t dx_one = 0
    cdef bint scalar = False
    if isinstance(dx, (int, np.integer)) and not isinstance(dx, (bool, np.bool_)):
        dx_one = C.check_u64("dx", dx)
        scalar = True
        dxs = None
    else:
        dxs = C.dx_array(dx, n)
    out = np.empty(n, dtype=EXIT_INFO_DTYPE)
    cdef const insn_rec* rp = <const insn_rec*>cnp.PyArray_DATA(recs)
    cdef const uint64_t* dp = &dx_one
    if not scalar:
        dp = <const uint64_t*>cnp.PyArray_DATA(dxs)
    cdef info_rec* op = <info_rec*>cnp.PyArray_DATA(out)
    with nogil:
        bad = _infos_kernel(rp, dp, scalar, op, n)
    if bad >= 0:
        C.bad_insn_record(bad, recs[bad])
    return out

include "_replay.pxi"
include "_uc_fast.pxi"
