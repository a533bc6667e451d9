"""Cold-path helpers shared by both decoder backends.

Both ``_core`` and ``_core_py`` decode to a small integer status (mirroring
the C design); this module is the one place that turns a status into an
exception, and the one place that coerces user input into the buffers and
arrays the decoders work on. Sharing it means both backends raise the same
classes with the same messages.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .abi import MAX_INSN_LENGTH, U64_MASK
from .errors import (
    DecodeError,
    ExitQualError,
    InstructionTooLongError,
    InvalidArgumentError,
    LockPrefixError,
    NotPortIoError,
    TruncatedInputError,
    UnsupportedModeError,
)

# Decoder status codes (same values as the ``st_*`` enum in _core.pxd).
ST_OK = 0
ST_NOT_IO = 1
ST_TRUNCATED = 2
ST_LOCK = 3
ST_TOO_LONG = 4

ON_ERROR_CHOICES = ("raise", "stop")

_OPCODE_HINTS = {
    0x0F: "two-byte opcode escape",
    0x62: "EVEX/BOUND",
    0xC4: "VEX3/LES",
    0xC5: "VEX2/LDS",
    0x90: "NOP",
    0xCC: "INT3",
    0xF4: "HLT",
}


def check_mode(mode: Any) -> int:
    if type(mode) is not int or mode not in (16, 32, 64):
        raise UnsupportedModeError(f"mode must be 16, 32 or 64, got {mode!r}")
    return mode


def as_code_buffer(code: Any) -> Any:
    """Return ``code`` as a C-contiguous object exposing unsigned bytes.

    Accepts bytes, bytearray, memoryview (any contiguous, byte-sized format)
    and numpy uint8/int8 arrays (any dimension, flattened).
    """
    if isinstance(code, (bytes, bytearray)):
        return code
    if isinstance(code, np.ndarray):
        if code.dtype not in (np.uint8, np.int8):
            raise InvalidArgumentError(
                f"code must be bytes, bytearray, memoryview or a uint8 array, got an array of {code.dtype}")
        return np.ascontiguousarray(code).reshape(-1).view(np.uint8)
    if isinstance(code, memoryview):
        if code.itemsize != 1:
            raise InvalidArgumentError(
                f"code memoryview must have 1-byte items, got format {code.format!r}")
        if not code.c_contiguous:
            return code.tobytes()
        return code.cast("B") if code.format != "B" or code.ndim != 1 else code
    raise InvalidArgumentError(
        f"code must be bytes, bytearray, memoryview or a uint8 array, got {type(code).__name__}")


def decode_error(st: int, data: Any, start: int, end: int, pos: int, mode: int,
                 base: int = 0) -> DecodeError:
    """Build the exception for decoder status ``st``.

    ``data[start:end]`` is the input window, ``pos`` the byte position at which
    decoding stopped; ``base`` is added to offsets reported to the user
    (for batch decodes).
    """
    head = bytes(data[start:min(end, start + MAX_INSN_LENGTH + 1)])
    shown = head.hex(" ") if head else "(empty)"
    off = start - base
    if st == ST_NOT_IO:
        b = int(data[pos])
        rel = pos - start
        hint = _OPCODE_HINTS.get(b)
        if mode != 64 and 0x40 <= b <= 0x4F:
            hint = "INC/DEC; REX exists only in 64-bit mode"
        what = f"opcode {b:#04x}" + (f" ({hint})" if hint else "")
        return NotPortIoError(
            f"not a port-I/O instruction: {what} at byte {rel} of the instruction at offset {off}; "
            f"expected 6C-6F, E4-E7 or EC-EF after the prefixes (bytes: {shown})",
            offset=off, data=head)
    if st == ST_TRUNCATED:
        return TruncatedInputError(
            f"truncated port-I/O instruction at offset {off}: input ends after {end - start} byte(s) "
            f"(bytes: {shown})", offset=off, data=head)
    if st == ST_LOCK:
        return LockPrefixError(
            f"LOCK prefix (F0) on a port-I/O instruction at offset {off}: #UD before any VM exit "
            f"(bytes: {shown})", offset=off, data=head)
    if st == ST_TOO_LONG:
        return InstructionTooLongError(
            f"instruction at offset {off} is longer than {MAX_INSN_LENGTH} bytes: #GP(0) before any "
            f"VM exit (bytes: {shown})", offset=off, data=head)
    return DecodeError(f"decoder status {st} at offset {off}", offset=off, data=head)  # pragma: no cover


def check_on_error(on_error: Any) -> int:
    if on_error not in ON_ERROR_CHOICES:
        raise InvalidArgumentError(f"on_error must be 'raise' or 'stop', got {on_error!r}")
    return 1 if on_error == "stop" else 0


def check_qual_int(q: Any) -> int:
    if type(q) is not int:
        if isinstance(q, (int, np.integer)) and not isinstance(q, (bool, np.bool_)):
            q = int(q)
        else:
            raise InvalidArgumentError(
                f"exit qualification must be an int, got {type(q).__name__} {q!r}")
    if q < 0 or q > U64_MASK:
        raise ExitQualError(f"exit qualification {q:#x} is not a 64-bit unsigned value", value=q)
    return int(q)


def as_u64_array(values: Any, what: str) -> np.ndarray:
    """Coerce ``values`` into a C-contiguous uint64 array (any shape).

    Integer input only; negative or > 64-bit values raise
    :class:`InvalidArgumentError` naming the first offender.
    """
    if isinstance(values, np.ndarray):
        arr = values
    else:
        if isinstance(values, (list, tuple)):
            # numpy would read True as 1; a bool is never a qualification or RDX
            flag = next((v for v in values if type(v) is bool or isinstance(v, np.bool_)), None)
            if flag is not None:
                raise InvalidArgumentError(f"{what} must be unsigned 64-bit integers, got {flag!r}")
        try:
            arr = np.asarray(values)
            if arr.dtype.kind == "f":
                # numpy turns a list mixing ints below and above 2**63 into
                # float64; re-read it element by element instead.
                arr = np.array(values, dtype=object)
        except (OverflowError, ValueError) as exc:
            raise InvalidArgumentError(f"{what} must be unsigned 64-bit integers: {exc}") from None
    kind = arr.dtype.kind
    if kind == "u":
        return np.ascontiguousarray(arr, dtype=np.uint64)
    if kind == "i":
        if arr.size and arr.min() < 0:
            bad = int(arr.reshape(-1)[np.argmax(arr.reshape(-1) < 0)])
            raise InvalidArgumentError(f"{what} must be unsigned 64-bit integers, got {bad}")
        return np.ascontiguousarray(arr, dtype=np.uint64)
    if kind == "O":
        flat = arr.reshape(-1)
        for v in flat:
            if type(v) is bool or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= U64_MASK:
                raise InvalidArgumentError(f"{what} must be unsigned 64-bit integers, got {v!r}")
        return np.array([int(v) for v in flat], dtype=np.uint64).reshape(arr.shape)
    raise InvalidArgumentError(f"{what} must be an integer array, got dtype {arr.dtype}")


def check_u64(name: str, v: Any) -> int:
    if type(v) is bool or not isinstance(v, (int, np.integer)):
        raise InvalidArgumentError(f"{name} must be an int in [0, 2**64), got {type(v).__name__} {v!r}")
    iv = int(v)
    if not 0 <= iv <= U64_MASK:
        raise InvalidArgumentError(f"{name} must be in [0, 2**64), got {iv}")
    return iv


def check_flag(name: str, v: Any) -> bool:
    if v is True or v is False:
        return v
    if type(v) is int and v in (0, 1):
        return bool(v)
    if isinstance(v, np.bool_):
        return bool(v)
    raise ExitQualError(f"{name} must be a bool, got {v!r}", value=v if isinstance(v, int) else 0)


_KIND_FROM_INT = {0: "IN", 1: "OUT", 2: "INS", 3: "OUTS"}


def insn_fields(insn: Any) -> tuple[int, int, int, bool, int, int, int]:
    """Validate an :class:`~tdxve.abi.IoInsn` (or an equal tuple) for ``exit_info``.

    Returns ``(kind, size, port or -1, rep, addr_size, segment or -1, length)``.
    """
    try:
        kind, size, port, rep, addr_size, segment, length = tuple(insn)[:7]
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"insn must be an IoInsn, got {type(insn).__name__} {insn!r}") from None
    if type(kind) is bool or not isinstance(kind, int) or kind not in _KIND_FROM_INT:
        raise InvalidArgumentError(f"IoInsn.kind must be an IoKind, got {kind!r}")
    if type(size) is bool or size not in (1, 2, 4):
        raise InvalidArgumentError(f"IoInsn.size must be 1, 2 or 4, got {size!r}")
    if port is None:
        p = -1
    elif type(port) is bool or not isinstance(port, int) or not 0 <= port <= 0xFF or kind >= 2:
        raise InvalidArgumentError(
            f"IoInsn.port must be None or an imm8 (0-255) on IN/OUT, got {port!r} for {_KIND_FROM_INT[kind]}")
    else:
        p = int(port)
    if addr_size not in (16, 32, 64) or type(addr_size) is bool:
        raise InvalidArgumentError(f"IoInsn.addr_size must be 16, 32 or 64, got {addr_size!r}")
    if segment is None:
        if kind >= 2:
            raise InvalidArgumentError(f"IoInsn.segment must be a Segment for {_KIND_FROM_INT[kind]}")
        s = -1
    elif type(segment) is bool or not isinstance(segment, int) or not 0 <= segment <= 5 or kind < 2:
        raise InvalidArgumentError(
            f"IoInsn.segment must be a Segment on INS/OUTS and None on IN/OUT, got {segment!r}")
    else:
        s = int(segment)
    if type(length) is bool or not isinstance(length, int) or not 1 <= length <= MAX_INSN_LENGTH:
        raise InvalidArgumentError(f"IoInsn.length must be 1-{MAX_INSN_LENGTH}, got {length!r}")
    return int(kind), int(size), p, bool(rep), int(addr_size), s, int(length)


def check_insn_array(insns: Any) -> np.ndarray:
    from .abi import INSN_DTYPE
    if not isinstance(insns, np.ndarray) or insns.dtype != INSN_DTYPE:
        raise InvalidArgumentError(
            "insns must be a numpy array of dtype tdxve.INSN_DTYPE (from decode_insns), got "
            + (f"dtype {insns.dtype}" if isinstance(insns, np.ndarray) else type(insns).__name__))
    return np.ascontiguousarray(insns).reshape(-1)


def dx_array(dx: Any, n: int) -> np.ndarray:
    """``dx`` as a uint64 array of length ``n`` (a scalar broadcasts)."""
    if isinstance(dx, (int, np.integer)) and not isinstance(dx, (bool, np.bool_)):
        return np.full(n, check_u64("dx", dx), dtype=np.uint64)
    arr = as_u64_array(dx, "dx").reshape(-1)
    if arr.shape[0] != n:
        raise InvalidArgumentError(f"dx has {arr.shape[0]} values for {n} instructions")
    return arr


def bad_insn_record(i: int, r: Any) -> None:
    raise InvalidArgumentError(f"insns[{i}] is not a valid port-I/O record: {r!r}")


# ---------------------------------------------------------------- exit qualifications
from .abi import (  # noqa: E402
    QUAL_IMM,
    QUAL_IN,
    QUAL_PORT_SHIFT,
    QUAL_REP,
    QUAL_RESERVED_MASK,
    QUAL_STRING,
)

SIZE_ENCODING = {1: 0, 2: 1, 4: 3}   # ref 3.1: bits 2:0 = size - 1, only 0, 1, 3 used


def qual_problem(q: int) -> str | None:
    """Why the strict decode rejects ``q`` (None if it accepts it).

    Strict = "some I/O instruction could have produced it" (ref 3.1, 3.3):
    size encoding 0/1/3, reserved bits 15:7 and 63:32 clear, no immediate
    port on a string instruction (INS/OUTS take the port from DX), and an
    immediate port fits in imm8. REP without the string bit is accepted:
    the SDM does not reserve it and hardware behaviour is unverified (ref 8).
    """
    if q & QUAL_RESERVED_MASK:
        return f"reserved bits set (bits 15:7 and 63:32 must be 0): {q & QUAL_RESERVED_MASK:#x}"
    enc = q & 7
    if enc not in (0, 1, 3):
        return f"size encoding {enc} in bits 2:0 (only 0, 1, 3 = 1, 2, 4 bytes exist)"
    if q & QUAL_IMM and q & QUAL_STRING:
        return "immediate-port bit 6 set on a string instruction (INS/OUTS take the port from DX)"
    if q & QUAL_IMM and (q >> QUAL_PORT_SHIFT) & 0xFFFF > 0xFF:
        return f"immediate port {(q >> QUAL_PORT_SHIFT) & 0xFFFF:#x} does not fit an imm8"
    return None


def encode_exit_qual(size: Any, is_in: Any, port: Any, is_string: Any, is_rep: Any,
                     is_imm: Any) -> int:
    """Shared body of both backends' ``encode_exit_qual``."""
    is_in = check_flag("is_in", is_in)
    is_string = check_flag("is_string", is_string)
    is_rep = check_flag("is_rep", is_rep)
    is_imm = check_flag("is_imm", is_imm)
    if type(size) is bool or size not in SIZE_ENCODING:
        raise ExitQualError(f"size must be 1, 2 or 4 bytes, got {size!r}",
                            value=size if isinstance(size, int) else 0)
    if type(port) is bool or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ExitQualError(f"port must be an int in 0-0xFFFF, got {port!r}",
                            value=port if isinstance(port, int) else 0)
    q = (SIZE_ENCODING[size] | (QUAL_IN if is_in else 0) | (QUAL_STRING if is_string else 0)
         | (QUAL_REP if is_rep else 0) | (QUAL_IMM if is_imm else 0) | (port << QUAL_PORT_SHIFT))
    problem = qual_problem(q)
    if problem is not None:
        raise ExitQualError(f"cannot encode {problem}", value=q)
    return q


def check_out(out: Any, like: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Validate a caller-supplied output array for a batch decoder."""
    if not isinstance(out, np.ndarray) or out.dtype != dtype:
        raise InvalidArgumentError(
            f"out must be a numpy array of dtype {dtype}, got "
            + (f"dtype {out.dtype}" if isinstance(out, np.ndarray) else type(out).__name__))
    if out.shape != like.shape:
        raise InvalidArgumentError(f"out has shape {out.shape}, the input has {like.shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidArgumentError("out must be C-contiguous and writeable")
    if np.may_share_memory(out, like):
        raise InvalidArgumentError("out must not overlap the input")
    return out
