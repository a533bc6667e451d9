"""Sink devices: QEMU's debug console and the POST-code port 0x80."""

from __future__ import annotations

from typing import Callable

from ..errors import InvalidArgumentError

__all__ = ["DebugConsole", "PostCodePort"]


class DebugConsole:
    """QEMU ``isa-debugcon``: every byte written is output; a read returns the
    readback byte (QEMU ``debugcon_ioport_read``, default 0xE9, which is how
    firmware detects the port).

    The standard PC puts it at 0xE9 (QEMU's default ``iobase``) and 0x402
    (OVMF/EDK2's debug port). Byte access.

    State: ``buf`` (bytearray of bytes written), ``readback`` (int).

    :param readback: value returned by reads (0-255).
    :param on_write: optional callback receiving each byte.
    :raises InvalidArgumentError: ``readback`` is not a byte.
    """

    def __init__(self, *, readback: int = 0xE9, on_write: Callable[[int], object] | None = None) -> None:
        if type(readback) is not int or not 0 <= readback <= 0xFF:
            raise InvalidArgumentError(f"readback must be a byte, got {readback!r}")
        self.readback = readback
        self.on_write = on_write
        self.buf = bytearray()

    def reset(self) -> None:
        """No register state to reset; the captured output is kept."""

    @property
    def output(self) -> bytes:
        """Every byte written so far."""
        return bytes(self.buf)

    def clear_output(self) -> None:
        """Forget the captured output."""
        self.buf.clear()

    def read(self, port: int, size: int) -> int:
        """The readback byte."""
        return self.readback

    def write(self, port: int, size: int, value: int) -> None:
        """Append the low byte of ``value`` (QEMU writes exactly one byte)."""
        v = value & 0xFF
        self.buf.append(v)
        cb = self.on_write
        if cb is not None:
            cb(v)

    def __repr__(self) -> str:
        return f"DebugConsole({len(self.buf)} bytes)"


class PostCodePort:
    """The POST-code port (0x80 on the PC): records every byte written.

    Reads return 0xFF, as QEMU's ``ioport80_read`` does (all-ones). Byte
    access; a wider OUT to 0x80 is split by the bus and only its low byte
    lands here, exactly as the byte lanes of a real ISA port.

    State: ``codes`` (list of ints, in write order).

    :param on_code: optional callback receiving each code.
    """

    def __init__(self, *, on_code: Callable[[int], object] | None = None) -> None:
        self.codes: list[int] = []
        self.on_code = on_code

    def reset(self) -> None:
        """No register state to reset; recorded codes are kept."""

    @property
    def last(self) -> int | None:
        """The most recent code, or None."""
        return self.codes[-1] if self.codes else None

    def read(self, port: int, size: int) -> int:
        """All-ones (QEMU ``ioport80_read``)."""
        return 0xFF

    def write(self, port: int, size: int, value: int) -> None:
        """Record the low byte of ``value``."""
        v = value & 0xFF
        self.codes.append(v)
        cb = self.on_code
        if cb is not None:
            cb(v)

    def __repr__(self) -> str:
        return f"PostCodePort(codes={[hex(c) for c in self.codes[-8:]]})"
