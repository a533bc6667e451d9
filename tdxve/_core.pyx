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

__all__ = [
    "BACKEND",
    "decode_exit_qual", "encode_exit_qual", "decode_exit_quals",
    "decode_insn", "decode_insns", "exit_info", "exit_infos",
]

BACKEND = "cython"

if (sizeof(insn_rec) != INSN_DTYPE.itemsize or sizeof(qual_rec) != EXIT_QUAL_DTYPE.itemsize
        or sizeof(info_rec) != EXIT_INFO_DTYPE.itemsize):
    raise ImportError("tdxve._core record layouts do not match tdxve.abi dtypes")

cdef bint LITTLE_ENDIAN = sys.byteorder == "little"

# SDM Table 27-5 (ref 3.1): bits 63:32 and 15:7 reserved.
cdef uint64_t QUAL_RESERVED = 0xFFFFFFFF0000FF80ULL

# ---------------------------------------------------------------- tables

cdef uint8_t BCLS[256]      # byte class for the prefix scan
cdef uint8_t IOINFO[256]    # opcode: bits 1:0 kind, bit 2 byte form, bit 3 imm8 port
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
    # ref 3.3: kind IN=0 OUT=1 INS=2 OUTS=3; | 4 byte form; | 8 imm8 port
    for b, info in ((0x6C, 2 | 4), (0x6D, 2), (0x6E, 3 | 4), (0x6F, 3),
                    (0xE4, 0 | 4 | 8), (0xE5, 0 | 8), (0xE6, 1 | 4 | 8), (0xE7, 1 | 8),
                    (0xEC, 0 | 4), (0xED, 0), (0xEE, 1 | 4), (0xEF, 1)):
        BCLS[b] = BC_IO
        IOINFO[b] = info


_init_tables()

cdef tuple KINDS = tuple(IoKind)
cdef tuple SEGMENTS = tuple(Segment)
_tuple_new = tuple.__new__


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


@cython.boundscheck(TDXVE_DEBUG)
@cython.wraparound(TDXVE_DEBUG)
cdef Py_ssize_t _decode_stream(const uint8_t* p, Py_ssize_t n, int mode, insn_rec* out,
                               int* st, Py_ssize_t* err_start, Py_ssize_t* err_pos) noexcept nogil:
    # out has room for n records (every instruction is >= 1 byte).
    cdef Py_ssize_t pos = 0, count = 0, stop = 0
    cdef int s
    while pos < n:
        s = decode_at(p + pos, n - pos, mode, out + count, &stop)
        if s != ST_OK:
            st[0] = s
            err_start[0] = pos
            err_pos[0] = pos + stop
            return count
        if TDXVE_DEBUG:
            if count >= n or out[count].length < 1 or pos + out[count].length > n:
                st[0] = -1
                return count
        out[count].offset = pos
        pos += out[count].length
        count += 1
    st[0] = ST_OK
    return count


cdef void _quals_kernel(const uint64_t* src, uint64_t* dst, Py_ssize_t n) noexcept nogil:
    # Little-endian: one record = two 64-bit words (raw, then the packed
    # port/size/flags word), so the loop is plain integer arithmetic.
    cdef Py_ssize_t i
    cdef uint64_t q, enc, imm, string, port, valid
    for i in range(n):
        q = src[i]
        enc = q & 7
        imm = (q >> 6) & 1
        string = (q >> 4) & 1
        port = (q >> 16) & 0xFFFF
        valid = ((q & QUAL_RESERVED) == 0) & ((0x0B >> enc) & 1) & ((imm & (string | (port > 0xFF))) ^ 1)
        dst[2 * i] = q
        dst[2 * i + 1] = (port | ((enc + 1) << 16) | (((q >> 3) & 1) << 24) | (string << 32)
                          | (((q >> 5) & 1) << 40) | (imm << 48) | (valid << 56))


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
    return _tuple_new(ExitQual, ((v & 7) + 1, (v & 8) != 0, (v & 16) != 0, (v & 32) != 0,
                                 (v & 64) != 0, (v >> 16) & 0xFFFF, v))


def encode_exit_qual(*, size, is_in, port, is_string=False, is_rep=False, is_imm=False):
    """Build an exit qualification; the exact inverse of the strict decode.

    :raises ExitQualError: ``size`` not 1/2/4, ``port`` outside 0-0xFFFF,
        an immediate port above 0xFF or on a string instruction, or a flag
        that is not a bool.
    """
    return C.encode_exit_qual(size, is_in, port, is_string, is_rep, is_imm)


def decode_exit_quals(quals):
    """Decode many exit qualifications at once.

    :param quals: integers (any shape; numpy uint64 is the fast path).
    :returns: a structured array of dtype :data:`tdxve.EXIT_QUAL_DTYPE`, same
        shape. Each record holds the Linux (non-strict) decode of its value,
        and ``valid`` says whether the strict decode accepts it; records never
        raise.
    :raises InvalidArgumentError: non-integer input, or a negative or
        over-wide value.
    """
    arr = C.as_u64_array(quals, "exit qualifications")
    flat = arr.reshape(-1)
    cdef Py_ssize_t n = flat.shape[0]
    out = np.empty(n, dtype=EXIT_QUAL_DTYPE)
    cdef const uint64_t* src = <const uint64_t*>cnp.PyArray_DATA(flat)
    cdef void* dst = cnp.PyArray_DATA(out)
    with nogil:
        if LITTLE_ENDIAN:
            _quals_kernel(src, <uint64_t*>dst, n)
        else:
            _quals_kernel_fields(src, <qual_rec*>dst, n)
    return out.reshape(arr.shape)


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
    return _tuple_new(IoInsn, (KINDS[r.kind], r.size, None if r.port < 0 else r.port,
                               r.rep != 0, r.addr_size,
                               None if r.segment < 0 else SEGMENTS[r.segment],
                               r.length, r.rep_prefix))


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
    out = np.empty(n, dtype=INSN_DTYPE)
    cdef insn_rec* recs = <insn_rec*>cnp.PyArray_DATA(out)
    cdef const uint8_t* p = &view[0] if n > 0 else NULL
    if n > 0:
        with nogil:
            count = _decode_stream(p, n, m, recs, &st, &err_start, &err_pos)
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
    cdef const uint64_t* dp = &dx_one if scalar else <const uint64_t*>cnp.PyArray_DATA(dxs)
    cdef info_rec* op = <info_rec*>cnp.PyArray_DATA(out)
    with nogil:
        bad = _infos_kernel(rp, dp, scalar, op, n)
    if bad >= 0:
        C.bad_insn_record(bad, recs[bad])
    return out
