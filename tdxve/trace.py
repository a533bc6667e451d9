"""Reading real port-I/O traces: KVM's ``kvm_pio`` tracepoint as trace-cmd / perf print it.

KVM's tracepoint (``arch/x86/kvm/trace.h``, anchors 2.4) prints::

    pio_%s at 0x%x size %d count %d val 0x%x %s
    pio_write at 0x3f8 size 1 count 1 val 0x41
    pio_read at 0x1f0 size 2 count 256 val 0x4a2b (...)

``rw ? "write" : "read"``, the port, the access size, the element count (> 1
for a string instruction KVM emulated, then ``(...)`` follows) and ``val``,
the *first* element's value (what was written, or what the device answered).
Kernels before 2016 print no ``val`` field. Whatever trace-cmd, perf or
ftrace put before the event text (task, CPU, timestamp, ``kvm:kvm_pio:``) is
ignored, and lines of other events are skipped.

Each kvm_pio record becomes :data:`tdxve.abi.EVENT_DTYPE` events: an
exit qualification for the access (size, direction, port; DX form), ``rax``
= ``val`` for a write, ``reply`` = ``val`` for a read (used by
``replay(..., unassigned="reply")`` on ports the model has no device for).
What a trace does not record is documented in ``docs/replay.md``.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Iterator

import numpy as np

from .abi import EVENT_DTYPE
from .errors import InvalidArgumentError, TraceFormatError

__all__ = ["read_kvm_pio", "iter_kvm_pio", "STRING_CHOICES"]

#: How a record with count > 1 (a string instruction) becomes events:
#: ``"unroll"`` -- ``count`` single IN/OUT events, what a Linux TDX guest
#: executes instead of ``rep ins/outs`` (``CC_ATTR_GUEST_UNROLL_STRING_IO``,
#: ref 1.8); ``"string"`` -- one INS/OUTS event with the string and REP bits
#: set, which Linux's #VE handler refuses.
STRING_CHOICES = ("unroll", "string")

_RE = re.compile(
    rb"pio_(read|write) at 0x([0-9a-fA-F]+) size (\d+) count (\d+)"
    rb"(?: val 0x([0-9a-fA-F]+))?[ \t\r]*(\(\.\.\.\))?[ \t\r]*$")
_SIZE_ENC = {1: 0, 2: 1, 4: 3}
_ALL_ONES = 0xFFFFFFFF


def _lines(source: str | os.PathLike[str] | Iterable[str]) -> Iterator[tuple[bytes, int]]:
    # (raw line, bytes consumed so far)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            done = 0
            for raw in f:
                done += len(raw)
                yield raw, done
        return
    if isinstance(source, (bytes, bytearray)):
        raise InvalidArgumentError("read_kvm_pio needs a path or an iterable of str lines, got bytes")
    try:
        it = iter(source)
    except TypeError:
        raise InvalidArgumentError(
            f"read_kvm_pio needs a path or an iterable of str lines, got {type(source).__name__}") from None
    done = 0
    for line in it:
        if not isinstance(line, str):
            raise InvalidArgumentError(f"trace lines must be str, got {type(line).__name__}")
        raw = line.encode("utf-8", "surrogateescape")
        done += len(raw)
        yield raw, done


def _bad(lineno: int, raw: bytes, why: str) -> TraceFormatError:
    text = raw.decode("utf-8", "replace").rstrip("\r\n")
    return TraceFormatError(f"kvm_pio trace line {lineno}: {why}: {text!r}", lineno=lineno, line=text)


def iter_kvm_pio(source: str | os.PathLike[str] | Iterable[str], *, chunk_events: int = 1 << 16,
                 strings: str = "unroll", instr_len: int = 1) -> Iterator[tuple[np.ndarray, int]]:
    """Parse a kvm_pio trace incrementally; yields ``(events, bytes_read)`` per chunk.

    ``bytes_read`` is how much of the input has been consumed (for a progress
    display against the file size). Chunks hold about ``chunk_events`` events
    (an unrolled string record is never split).

    :param source: a path, or an iterable of lines (str).
    :param chunk_events: target events per chunk (>= 1).
    :param strings: ``"unroll"`` (default) or ``"string"``, see :data:`STRING_CHOICES`.
    :param instr_len: the VM-exit instruction length given to every event
        (the trace does not record the instruction; 1 is ``in al, dx`` /
        ``out dx, al``, the form Linux's ``inb``/``outb`` use).
    :raises TraceFormatError: a kvm_pio line that does not parse, or a port,
        size or count outside what KVM prints.
    :raises InvalidArgumentError: bad arguments.
    :raises OSError: the file cannot be read.
    """
    if strings not in STRING_CHOICES:
        raise InvalidArgumentError(f"strings must be one of {STRING_CHOICES}, got {strings!r}")
    if type(chunk_events) is not int or chunk_events < 1:
        raise InvalidArgumentError(f"chunk_events must be an int >= 1, got {chunk_events!r}")
    if type(instr_len) is not int or not 0 <= instr_len <= 0xFFFFFFFF:
        raise InvalidArgumentError(f"instr_len must be an int in [0, 2**32), got {instr_len!r}")
    unroll = strings == "unroll"
    quals: list[int] = []
    vals: list[int] = []
    is_in: list[bool] = []
    reps: list[int] = []
    pending = 0
    done = 0
    yielded = False
    for lineno, (raw, done) in enumerate(_lines(source), start=1):
        if b"pio_" not in raw:
            continue
        m = _RE.search(raw)
        if m is None:
            if b"pio_read" in raw or b"pio_write" in raw or b"kvm_pio" in raw:
                raise _bad(lineno, raw, "not 'pio_read|pio_write at 0xPORT size N count N [val 0xV] [(...)]'")
            continue
        rw, port_s, size_s, count_s, val_s, more = m.groups()
        port = int(port_s, 16)
        size = int(size_s)
        count = int(count_s)
        if port > 0xFFFF:
            raise _bad(lineno, raw, f"port {port:#x} is above 0xFFFF")
        if size not in _SIZE_ENC:
            raise _bad(lineno, raw, f"size {size} is not 1, 2 or 4")
        if count < 1:
            raise _bad(lineno, raw, f"count {count} is not >= 1")
        if (more is not None) != (count > 1):
            raise _bad(lineno, raw, "'(...)' must follow exactly the records with count > 1")
        read = rw == b"read"
        if val_s is None:
            val = -1
        else:
            val = int(val_s, 16)
            if val > 0xFFFFFFFF:
                raise _bad(lineno, raw, f"val {val:#x} is wider than 32 bits")
        q = _SIZE_ENC[size] | (8 if read else 0) | (port << 16)
        n = count if unroll else 1
        if count > 1 and not unroll:
            q |= 0x30                       # INS/OUTS with REP (exit-qualification bits 4, 5)
        quals.append(q)
        vals.append(val)
        is_in.append(read)
        reps.append(n)
        pending += n
        if pending >= chunk_events:
            yield _build(quals, vals, is_in, reps, instr_len), done
            yielded = True
            quals, vals, is_in, reps = [], [], [], []
            pending = 0
    if pending or not yielded:
        yield _build(quals, vals, is_in, reps, instr_len), done


def _build(quals: list[int], vals: list[int], is_in: list[bool], reps: list[int], instr_len: int) -> np.ndarray:
    n = len(quals)
    q = np.array(quals, dtype=np.uint64)
    v = np.array(vals, dtype=np.int64)
    rd = np.array(is_in, dtype=bool)
    has = v >= 0
    rax = np.where(~rd & has, v, 0).astype(np.uint64)
    reply = np.where(rd & has, v, np.where(rd, _ALL_ONES, 0)).astype(np.uint64)
    r = np.array(reps, dtype=np.int64)
    out = np.zeros(int(r.sum()) if n else 0, dtype=EVENT_DTYPE)
    out["exit_qual"] = np.repeat(q, r)
    out["rax"] = np.repeat(rax, r)
    out["reply"] = np.repeat(reply, r)
    out["instr_len"] = instr_len
    return out


def read_kvm_pio(path_or_lines: str | os.PathLike[str] | Iterable[str], *, strings: str = "unroll",
                 instr_len: int = 1) -> np.ndarray:
    """Parse KVM ``kvm_pio`` tracepoint lines into an :data:`~tdxve.abi.EVENT_DTYPE` array.

    Accepts trace-cmd ``report``, ``perf script`` and raw ftrace output, with
    or without the ``val`` field (pre-2016 kernels) and with ``(...)`` after
    records of count > 1. Lines of other events, blank lines and headers are
    skipped.

    Per record: ``exit_qual`` = size encoding | IN bit | port << 16 (the DX
    form: the trace does not say whether an imm8 was used); ``rax`` = ``val``
    for a write (0 without ``val``); ``reply`` = ``val`` for a read
    (all-ones without ``val``: what an absent device answers); ``instr_len``
    as given. ``val`` is only the first element's value, so unrolled string
    records repeat it.

    :param path_or_lines: a path (str or PathLike) or an iterable of str lines.
    :param strings: ``"unroll"`` (default: ``count`` IN/OUT events, what a
        Linux TDX guest executes) or ``"string"`` (one INS/OUTS event).
    :param instr_len: VM-exit instruction length for every event (default 1).
    :returns: a 1-D :data:`~tdxve.abi.EVENT_DTYPE` array in trace order.
    :raises TraceFormatError: a malformed kvm_pio line (``.lineno``, ``.line``).
    :raises InvalidArgumentError: bad arguments.
    :raises OSError: the file cannot be read.
    """
    parts = [ev for ev, _ in iter_kvm_pio(path_or_lines, chunk_events=1 << 20, strings=strings,
                                          instr_len=instr_len)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
