"""Decoding port-I/O instruction streams of any length in bounded memory.

:func:`tdxve.decode_insns` works on one buffer and allocates its output for
the worst case (one 20-byte record per input byte), so a 10**8-byte input in
one call reserves about 2 GB. :class:`StreamDecoder` takes the input in
chunks instead and yields each chunk's records: memory stays proportional to
the chunk size (about 21 bytes per chunk byte at the peak, plus what the
caller keeps), whatever the total length.

How it works: each chunk is decoded with ``decode_insns(..., on_error="stop")``;
the few bytes of an instruction that straddles the chunk boundary (at most 14:
an instruction is at most 15 bytes) are carried over and prepended to the
next chunk. Only a truncated instruction can straddle; any other decode
error (non-I/O opcode, LOCK, more than 15 bytes) is final. The result is
exactly what ``decode_insns`` gives for the concatenated input -- the same
records with absolute offsets, and the same exception class, ``offset`` and
message on an error -- however the input is cut::

    from tdxve.stream import StreamDecoder, decode_file

    dec = StreamDecoder(mode=64)
    for chunk in chunks:                 # any iterable of byte buffers
        for rec in dec.feed(chunk):      # INSN_DTYPE records, absolute offsets
            ...
    dec.close()                          # raises if the input ends mid-instruction

    for recs in decode_file("trace.bin", chunk_size=1 << 20):
        ...

Not thread-safe: one decoder per stream (the decoding itself releases the GIL
in the compiled core, so several decoders can run in parallel threads).
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from ._backend import core
from .abi import INSN_DTYPE, MAX_INSN_LENGTH
from .errors import DecodeError, InvalidArgumentError, TruncatedInputError

__all__ = ["StreamDecoder", "decode_stream", "decode_file", "DEFAULT_CHUNK_SIZE"]

#: Bytes read per chunk by :func:`decode_file` (1 MiB: about 22 MiB peak).
DEFAULT_CHUNK_SIZE = 1 << 20

_EMPTY = np.zeros(0, dtype=INSN_DTYPE)
# Bytes an error shows from the failing instruction on (decode_insns: 15 + 1).
_SHOWN = MAX_INSN_LENGTH + 1


def _check_on_error(on_error: Any) -> str:
    if on_error not in ("raise", "stop"):
        raise InvalidArgumentError(f"on_error must be 'raise' or 'stop', got {on_error!r}")
    return str(on_error)


def _rebased(exc: DecodeError, base: int) -> DecodeError:
    # The same error as decode_insns over the whole stream would raise: the
    # offset (attribute and message) counted from the start of the stream.
    if base == 0:
        return exc
    off = exc.offset + base
    msg = str(exc)
    old = f"at offset {exc.offset}"
    msg = msg.replace(old, f"at offset {off}", 1) if old in msg else f"{msg} (stream offset {off})"
    new = type(exc)(msg, offset=off, data=exc.data)
    new.__cause__ = exc.__cause__
    return new


class StreamDecoder:
    """Incremental :func:`~tdxve.decode_insns` over a stream fed in chunks.

    :param mode: processor mode for the whole stream, 16, 32 or 64.
    :param on_error: ``"raise"`` (default): the first offset that does not
        start a port-I/O instruction raises the :class:`DecodeError` subclass
        ``decode_insns`` would raise for the whole stream (``.offset`` from
        the stream's start); a truncated instruction at the very end raises
        from :meth:`close`. ``"stop"``: decoding ends there quietly;
        :attr:`error` keeps the exception (once the bytes it shows were
        seen, at the latest after :meth:`close`) and :attr:`offset` the stop
        offset.
    :raises UnsupportedModeError: ``mode`` is not 16, 32 or 64.
    :raises InvalidArgumentError: ``on_error`` is not ``"raise"`` or ``"stop"``.

    Attributes: ``offset`` -- stream offset of the first byte not yet
    decoded; ``records`` -- records produced so far; ``done`` -- decoding
    ended (an error under ``"stop"``, or :meth:`close`); ``error`` -- the
    error that ended it (``"stop"`` only).
    """

    def __init__(self, mode: int = 64, *, on_error: str = "raise") -> None:
        core.decode_insns(b"", mode)            # validates the mode exactly as decode_insns does
        self.mode = mode
        self.on_error = _check_on_error(on_error)
        self.offset = 0
        self.records = 0
        self.done = False
        self.error: DecodeError | None = None
        self._carry = b""
        self._closed = False
        # After a decode error: the bytes from the failing instruction on,
        # collected until the error can show the same 16 bytes decode_insns
        # over the whole stream would (the error is raised then, or at close).
        self._tail: bytes | None = None

    def feed(self, chunk: Any) -> np.ndarray:
        """Decode the next ``chunk`` of the stream.

        :param chunk: bytes, bytearray, memoryview or uint8/int8 array.
        :returns: the records of every instruction that ends in the input
            seen so far (dtype :data:`~tdxve.abi.INSN_DTYPE`, offsets from
            the stream's start); empty once :attr:`done`.
        :raises DecodeError: under ``"raise"``, for the first instruction the
            CPU would not execute as port I/O -- from this call, or, when it
            lies within 16 bytes of the chunk's end, from a later ``feed``
            or :meth:`close` (so that its ``data`` and message show the same
            bytes as a whole-stream ``decode_insns``).
        :raises InvalidArgumentError: ``chunk`` is not a byte buffer, or the
            decoder was closed.
        """
        if self._closed:
            raise InvalidArgumentError("feed() after close()")
        buf: Any = _as_buffer(chunk)
        if self._tail is not None:
            self._tail += bytes(memoryview(buf)[:_SHOWN - len(self._tail)])
            if len(self._tail) >= _SHOWN:
                self._finish()
            return _EMPTY.copy()
        if self.done:
            return _EMPTY.copy()
        if self._carry:
            buf = self._carry + bytes(memoryview(buf))
        recs: np.ndarray = core.decode_insns(buf, self.mode, on_error="stop")
        n = len(buf)
        stop = int(recs["offset"][-1]) + int(recs["length"][-1]) if recs.shape[0] else 0
        base = self.offset             # the carried bytes start there
        if recs.shape[0]:
            recs["offset"] += base
        self.records += recs.shape[0]
        self._carry = b""
        if stop < n:
            view = memoryview(buf)
            try:
                core.decode_insn(view[stop:stop + _SHOWN], self.mode)
            except TruncatedInputError:
                self._carry = bytes(view[stop:])        # at most 14 bytes: straddles the boundary
            except DecodeError:
                self.offset = base + stop
                self.done = True
                self._tail = bytes(view[stop:stop + _SHOWN])
                if len(self._tail) >= _SHOWN:
                    self._finish()
                return recs
        self.offset = base + n - len(self._carry)
        return recs

    def _finish(self) -> None:
        tail, self._tail = self._tail, None
        assert tail is not None
        try:
            core.decode_insns(tail, self.mode, on_error="raise")
        except DecodeError as exc:
            err = _rebased(exc, self.offset)
        else:   # pragma: no cover - a final decode error does not depend on later bytes
            raise AssertionError(f"decode error at {self.offset} vanished")
        self.error = err
        if self.on_error == "raise":
            raise err

    def close(self) -> None:
        """End of the stream.

        :raises DecodeError: under ``"raise"``: a pending error (see
            :meth:`feed`), or :class:`~tdxve.errors.TruncatedInputError` when
            the stream ends inside an instruction (``.offset`` where it starts).
        """
        if self._closed:
            return
        self._closed = True
        self.done = True
        if self._tail is not None:
            self._finish()
            return
        if self._carry:
            self._tail, self._carry = self._carry, b""
            self._finish()

    def __repr__(self) -> str:
        return (f"StreamDecoder(mode={self.mode}, on_error={self.on_error!r}, offset={self.offset}, "
                f"records={self.records}{', done' if self.done else ''})")


def _as_buffer(chunk: Any) -> Any:
    # A 1-D unsigned-byte view of ``chunk`` (copied only when not contiguous).
    if isinstance(chunk, (bytes, bytearray)):
        return chunk
    if isinstance(chunk, memoryview):
        if chunk.itemsize != 1:
            raise InvalidArgumentError(f"chunk memoryview must have 1-byte items, got format {chunk.format!r}")
        if not chunk.c_contiguous:
            return chunk.tobytes()
        return chunk.cast("B") if chunk.format != "B" or chunk.ndim != 1 else chunk
    if isinstance(chunk, np.ndarray) and chunk.dtype in (np.uint8, np.int8):
        return np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
    raise InvalidArgumentError(
        f"chunk must be bytes, bytearray, memoryview or a uint8 array, got "
        f"{f'an array of {chunk.dtype}' if isinstance(chunk, np.ndarray) else type(chunk).__name__}")


def decode_stream(chunks: Iterable[Any], mode: int = 64, *, on_error: str = "raise"
                  ) -> Iterator[np.ndarray]:
    """Decode a stream given as an iterable of chunks; yields each chunk's records.

    Equivalent to ``decode_insns(b"".join(chunks), mode, on_error=...)``
    split into pieces, in memory bounded by the chunk size (see
    :class:`StreamDecoder`). Empty record arrays are not yielded.

    :raises DecodeError: as :class:`StreamDecoder` (also for a truncated end).
    """
    dec = StreamDecoder(mode, on_error=on_error)
    for chunk in chunks:
        recs = dec.feed(chunk)
        if recs.shape[0]:
            yield recs
        if dec.done and dec._tail is None:
            break                   # ended, and the error (if any) is complete
    dec.close()


def decode_file(file: str | os.PathLike[str] | BinaryIO, mode: int = 64, *,
                chunk_size: int = DEFAULT_CHUNK_SIZE, on_error: str = "raise") -> Iterator[np.ndarray]:
    """Decode a file of back-to-back port-I/O instructions chunk by chunk.

    :param file: a path, or a binary file object open for reading (read
        from its current position; not closed).
    :param chunk_size: bytes read at a time (>= 1).
    :raises InvalidArgumentError: a bad ``chunk_size``.
    :raises DecodeError: as :class:`StreamDecoder`.
    :raises OSError: the file cannot be read.
    """
    if type(chunk_size) is not int or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            yield from decode_stream(iter(lambda: f.read(chunk_size), b""), mode, on_error=on_error)
        return
    if not callable(getattr(file, "read", None)):
        raise InvalidArgumentError(f"file must be a path or a binary file object, got {type(file).__name__}")
    yield from decode_stream(iter(lambda: file.read(chunk_size), b""), mode, on_error=on_error)
