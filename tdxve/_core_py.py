"""Pure-Python twin of :mod:`tdxve._core` — the readable specification.

Same names, signatures, dtypes and exception classes as the compiled core;
``tests/test_parity.py`` checks that mechanically. Selected with
``TDXVE_PUREPYTHON=1``.

The decoder mirrors the C design: :func:`_decode_at` returns a status code
and the decoded fields; :mod:`tdxve._common` turns a status into the
exception. References ("ref N") are sections of
``shared/reference/tdx-port-io.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _common as C
from .abi import (
    EXIT_INFO_DTYPE,
    EXIT_QUAL_DTYPE,
    INSN_DTYPE,
    MAX_INSN_LENGTH,
    QUAL_IMM,
    QUAL_IN,
    QUAL_PORT_SHIFT,
    QUAL_REP,
    QUAL_RESERVED_MASK,
    QUAL_STRING,
    ExitQual,
    IoInsn,
    IoKind,
    Segment,
)
from .errors import ExitQualError
from ._replay_py import replay_kernel  # noqa: F401  batch #VE replay kernel (issue 6)
from ._uc_fast_py import UcFastPath  # noqa: F401  Unicorn IN/OUT hooks (issue 5)

__all__ = [
    "BACKEND",
    "decode_exit_qual", "encode_exit_qual", "decode_exit_quals",
    "decode_insn", "decode_insns", "exit_info", "exit_infos",
    "replay_kernel", "UcFastPath",
]

BACKEND = "python"

# ---------------------------------------------------------------- exit qualifications

_SIZE_ENCODING = C.SIZE_ENCODING


def decode_exit_qual(q: int, *, strict: bool = True) -> ExitQual:
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
    q = C.check_qual_int(q)
    if strict:
        problem = C.qual_problem(q)
        if problem is not None:
            raise ExitQualError(f"invalid I/O exit qualification {q:#x}: {problem}", value=q)
    return ExitQual(
        (q & 7) + 1,
        bool(q & QUAL_IN),
        bool(q & QUAL_STRING),
        bool(q & QUAL_REP),
        bool(q & QUAL_IMM),
        (q >> QUAL_PORT_SHIFT) & 0xFFFF,
        q,
    )


def encode_exit_qual(*, size: int, is_in: bool, port: int, is_string: bool = False,
                     is_rep: bool = False, is_imm: bool = False) -> int:
    """Build an exit qualification; the exact inverse of the strict decode.

    :raises ExitQualError: ``size`` not 1/2/4, ``port`` outside 0-0xFFFF,
        an immediate port above 0xFF or on a string instruction, or a flag
        that is not a bool.
    """
    return C.encode_exit_qual(size, is_in, port, is_string, is_rep, is_imm)


def decode_exit_quals(quals: Any, *, out: np.ndarray | None = None) -> np.ndarray:
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
    res = (np.zeros(flat.shape[0], dtype=EXIT_QUAL_DTYPE) if out is None
           else C.check_out(out, arr, EXIT_QUAL_DTYPE).reshape(-1))
    for i in range(flat.shape[0]):
        q = int(flat[i])
        res[i] = (q, (q >> 16) & 0xFFFF, (q & 7) + 1, bool(q & QUAL_IN), bool(q & QUAL_STRING),
                  bool(q & QUAL_REP), bool(q & QUAL_IMM), C.qual_problem(q) is None)
    return out if out is not None else res.reshape(arr.shape)


# ---------------------------------------------------------------- instructions

# Opcode table (ref 3.3): opcode -> (kind, byte form?, immediate port?)
_OPCODES: dict[int, tuple[int, bool, bool]] = {
    0x6C: (IoKind.INS, True, False), 0x6D: (IoKind.INS, False, False),
    0x6E: (IoKind.OUTS, True, False), 0x6F: (IoKind.OUTS, False, False),
    0xE4: (IoKind.IN, True, True), 0xE5: (IoKind.IN, False, True),
    0xE6: (IoKind.OUT, True, True), 0xE7: (IoKind.OUT, False, True),
    0xEC: (IoKind.IN, True, False), 0xED: (IoKind.IN, False, False),
    0xEE: (IoKind.OUT, True, False), 0xEF: (IoKind.OUT, False, False),
}
_SEGMENT_PREFIX = {0x26: Segment.ES, 0x2E: Segment.CS, 0x36: Segment.SS, 0x3E: Segment.DS,
                   0x64: Segment.FS, 0x65: Segment.GS}

# A decoded record: (kind, size, port or -1, rep_prefix, addr_size, segment or -1, length)
_Rec = tuple[int, int, int, int, int, int, int]


def _decode_at(data: Any, start: int, end: int, mode: int) -> tuple[int, int, _Rec | None]:
    """Decode one instruction from ``data[start:end]``.

    Returns ``(status, pos, record)``: ``status`` is ``C.ST_*``, ``pos`` the
    byte position where decoding stopped (the offending byte on failure).
    Rules (ref 3.3, 3.4; settled against iced-x86, see tests/test_iced_diff.py):

    * legacy prefixes 66 67 F2 F3 F0 and the six segment overrides, repeated
      and in any order; REX 40-4F only in 64-bit mode and only when directly
      before the opcode (a legacy prefix after a REX cancels it);
    * 66 toggles the operand size of the odd opcodes (16 <-> 32); REX.W is
      ignored except that 66 + REX.W is 32-bit (XED ``IMMUNE_REXW``);
    * 67 toggles the address size (64 -> 32, 32 -> 16, 16 -> 32);
    * INS always uses ES; OUTS uses DS unless overridden: the last segment
      prefix wins, except in 64-bit mode, where any FS/GS prefix outranks
      ES/CS/SS/DS (the last FS/GS wins);
    * the last of F2/F3 is the REP prefix; LOCK gives #UD;
    * more than 15 bytes give #GP(0) — even when the input is also short.
    """
    pos = start
    opsize = False
    addrsize = False
    lock = False
    rep = 0
    seg = -1          # last ES/CS/SS/DS (or any segment outside 64-bit mode)
    seg_fsgs = -1     # last FS/GS (64-bit mode priority)
    rex_w = False
    limit = start + MAX_INSN_LENGTH
    while True:
        if pos >= limit:
            return C.ST_TOO_LONG, pos, None
        if pos >= end:
            return C.ST_TRUNCATED, pos, None
        b = data[pos]
        if b == 0x66:
            opsize = True
        elif b == 0x67:
            addrsize = True
        elif b == 0xF2 or b == 0xF3:
            rep = b
        elif b == 0xF0:
            lock = True
        elif b in _SEGMENT_PREFIX:
            if mode == 64 and b >= 0x64:
                seg_fsgs = _SEGMENT_PREFIX[b]
            else:
                seg = _SEGMENT_PREFIX[b]
        elif mode == 64 and 0x40 <= b <= 0x4F:
            rex_w = bool(b & 0x08)
            pos += 1
            continue          # keep the REX: only one directly before the opcode counts
        else:
            break
        rex_w = False         # a legacy prefix after a REX cancels the REX
        pos += 1

    op = _OPCODES.get(b)
    if op is None:
        return C.ST_NOT_IO, pos, None
    if lock:
        return C.ST_LOCK, pos, None
    kind, byte_form, imm = op
    pos += 1
    port = -1
    if imm:
        if pos >= limit:
            return C.ST_TOO_LONG, pos, None
        if pos >= end:
            return C.ST_TRUNCATED, pos, None
        port = data[pos]
        pos += 1

    if byte_form:
        size = 1
    elif rex_w:
        size = 4                                # 66 + REX.W = 32-bit (ref 3.4)
    else:
        size = 2 if (mode == 16) != opsize else 4
    if mode == 64:
        addr = 32 if addrsize else 64
    elif mode == 32:
        addr = 16 if addrsize else 32
    else:
        addr = 32 if addrsize else 16
    segment: int
    if kind == IoKind.INS:
        segment = Segment.ES                    # ES:rDI, not overridable (ref 3.3)
    elif kind == IoKind.OUTS:
        segment = seg_fsgs if seg_fsgs >= 0 else (seg if seg >= 0 else Segment.DS)
    else:
        segment = -1
    return C.ST_OK, pos, (kind, size, port, rep, addr, segment, pos - start)


_KINDS = tuple(IoKind)
_SEGMENTS = tuple(Segment)


def _to_insn(rec: _Rec) -> IoInsn:
    kind, size, port, rep, addr, segment, length = rec
    # int()/bool(): bytes read from a numpy buffer are numpy scalars; IoInsn
    # holds Python ints and bools, as the compiled core returns them.
    return IoInsn(_KINDS[kind], size, None if port < 0 else int(port), bool(rep != 0), addr,
                  None if segment < 0 else _SEGMENTS[segment], length, int(rep))


def decode_insn(code: Any, mode: int = 64) -> IoInsn:
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
    mode = C.check_mode(mode)
    buf = C.as_code_buffer(code)
    n = len(buf)
    st, pos, rec = _decode_at(buf, 0, n, mode)
    if rec is None:
        raise C.decode_error(st, buf, 0, n, pos, mode)
    return _to_insn(rec)


def decode_insns(buffer: Any, mode: int = 64, *, on_error: str = "raise") -> np.ndarray:
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
    mode = C.check_mode(mode)
    stop = C.check_on_error(on_error)
    buf = C.as_code_buffer(buffer)
    n = len(buf)
    recs: list[tuple[Any, ...]] = []
    pos = 0
    while pos < n:
        st, bad, rec = _decode_at(buf, pos, n, mode)
        if rec is None:
            if stop:
                break
            raise C.decode_error(st, buf, pos, n, bad, mode)
        kind, size, port, rep, addr, segment, length = rec
        recs.append((pos, port, length, kind, size, rep != 0, addr, segment, rep))
        pos += length
    out = np.zeros(len(recs), dtype=INSN_DTYPE)
    for i, r in enumerate(recs):
        out[i] = r
    return out


# ---------------------------------------------------------------- exit information

_ADDR_CODE = {16: 0, 32: 1, 64: 2}     # instruction-information bits 9:7 (ref 3.2)


def _exit_info_fields(kind: int, size: int, port: int, rep: bool, addr: int, segment: int,
                      length: int, dx: int) -> tuple[int, int, int]:
    string = kind >= IoKind.INS
    q = (_SIZE_ENCODING[size]
         | (QUAL_IN if kind == IoKind.IN or kind == IoKind.INS else 0)
         | (QUAL_STRING if string else 0)
         # REP bit only on INS/OUTS: the SDM defines bit 5 for repeated string
         # instructions; on IN/OUT a REP prefix is meaningless (ref 3.4, 8).
         | (QUAL_REP if string and rep else 0)
         | (QUAL_IMM if port >= 0 else 0)
         | ((port if port >= 0 else dx & 0xFFFF) << QUAL_PORT_SHIFT))
    info = (_ADDR_CODE[addr] << 7 | segment << 15) if string else 0
    return q, length, info


def exit_info(insn: IoInsn, dx: int = 0) -> tuple[int, int, int]:
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
    kind, size, port, rep, addr, segment, length = C.insn_fields(insn)
    return _exit_info_fields(kind, size, port, rep, addr, segment, length, C.check_u64("dx", dx))


def exit_infos(insns: np.ndarray, dx: Any = 0) -> np.ndarray:
    """Batch :func:`exit_info` over a :data:`tdxve.INSN_DTYPE` array.

    :param insns: records from :func:`decode_insns`.
    :param dx: one RDX value for all records, or one per record.
    :returns: an array of dtype :data:`tdxve.EXIT_INFO_DTYPE`.
    :raises InvalidArgumentError: wrong dtype, a record with impossible
        fields, or a bad ``dx``.
    """
    recs = C.check_insn_array(insns)
    n = recs.shape[0]
    dxs = C.dx_array(dx, n)
    out = np.zeros(n, dtype=EXIT_INFO_DTYPE)
    for i in range(n):
        r = recs[i]
        if not _record_ok(r):
            C.bad_insn_record(i, r)
        out[i] = _exit_info_fields(int(r["kind"]), int(r["size"]), int(r["port"]), bool(r["rep"]),
                                   int(r["addr_size"]), int(r["segment"]), int(r["length"]),
                                   int(dxs[i]))
    return out


def _record_ok(r: Any) -> bool:
    kind = int(r["kind"])
    port = int(r["port"])
    seg = int(r["segment"])
    return (kind < 4 and int(r["size"]) in (1, 2, 4) and int(r["addr_size"]) in (16, 32, 64)
            and 1 <= int(r["length"]) <= MAX_INSN_LENGTH
            and (port == -1 or (0 <= port <= 0xFF and kind < 2))
            and ((seg == -1 and kind < 2) or (0 <= seg <= 5 and kind >= 2)))

