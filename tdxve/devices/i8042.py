"""The i8042 keyboard controller, as far as a guest uses it without a keyboard.

Ports: 0x60 data, 0x64 status (read) / command (write). Behaviour follows
QEMU ``hw/input/pckbd.c`` (``kbd_write_command``, ``kbd_write_data``,
``kbd_read_status``) for the controller itself; no PS/2 keyboard or mouse
is attached, so bytes meant for them are collected in
:attr:`I8042.device_bytes` and get no reply.

Reset: a command 0xF0-0xFE with bit 0 clear pulses the CPU reset line (0xFE
is the classic "pulse reset"; Linux ``reboot=kbd`` writes 0xFE to 0x64), and
a write of the output port (command 0xD1, then data) with bit 0 clear holds
it low. Each such request is counted in :attr:`I8042.reset_requests`; a
simulator polls that (or passes ``on_reset``) and resets the machine.

Status register (read 0x64): bit 0 OBF (a byte is waiting at 0x60), bit 1
IBF (always 0: the controller is infinitely fast), bit 2 SYS (set by the
self-test command 0xAA), bit 3 CMD (last write went to 0x64), bit 4 keyboard
not inhibited. Power-on status is 0x18 and the command byte 0x03 (QEMU
``kbd_reset``).

Supported commands: 0x20 read command byte, 0x60 write command byte, 0xA7/0xA8
disable/enable aux, 0xA9 aux test (0x00), 0xAA self-test (0x55, sets SYS),
0xAB keyboard test (0x00), 0xAD/0xAE disable/enable keyboard, 0xD0 read output
port, 0xD1 write output port, 0xD2 write keyboard output buffer, 0xD3/0xD4
write to the aux device, 0xDD/0xDF A20 off/on, 0xF0-0xFF pulse output lines.
Others are ignored, as QEMU does.

State (plain attributes): ``status``, ``command_byte``, ``output_port``
(ints), ``out`` (list of bytes waiting at 0x60), ``last`` (last byte
read from 0x60), ``pending`` (command awaiting its data byte, 0 if none),
``reset_requests`` (int), ``device_bytes`` (list).
"""

from __future__ import annotations

from typing import Callable

from ..errors import InvalidArgumentError

__all__ = ["I8042"]

STAT_OBF, STAT_IBF, STAT_SYS, STAT_CMD, STAT_UNLOCKED = 0x01, 0x02, 0x04, 0x08, 0x10
CMD_BYTE_DISABLE_KBD, CMD_BYTE_DISABLE_AUX = 0x10, 0x20
OUT_RESET, OUT_A20 = 0x01, 0x02
RESET_STATUS = STAT_CMD | STAT_UNLOCKED
RESET_COMMAND_BYTE = 0x03            # keyboard and aux interrupts enabled
RESET_OUTPUT_PORT = 0xCF             # reset line high (inactive), A20 on, bits 2-3/6-7 set (QEMU KBD_OUT_ONES)


class I8042:
    """The PC keyboard controller on ``data_port`` and ``command_port``.

    :param data_port: default 0x60.
    :param command_port: default 0x64.
    :param on_reset: optional callback, called (with the command byte or the
        output-port value that requested it) on each reset request.
    :raises InvalidArgumentError: bad ports.
    """

    def __init__(self, *, data_port: int = 0x60, command_port: int = 0x64,
                 on_reset: Callable[[int], object] | None = None) -> None:
        for name, p in (("data_port", data_port), ("command_port", command_port)):
            if type(p) is not int or not 0 <= p <= 0xFFFF:
                raise InvalidArgumentError(f"{name} must be an int in [0, 0xFFFF], got {p!r}")
        if data_port == command_port:
            raise InvalidArgumentError("data_port and command_port must differ")
        self.data_port = data_port
        self.command_port = command_port
        self.on_reset = on_reset
        self.reset_requests = 0
        self.device_bytes: list[int] = []
        self.out: list[int] = []
        self.status = self.command_byte = self.output_port = self.last = self.pending = 0
        self.reset()

    def reset(self) -> None:
        """Power-on controller state; ``reset_requests`` and ``device_bytes`` are kept."""
        self.status = RESET_STATUS
        self.command_byte = RESET_COMMAND_BYTE
        self.output_port = RESET_OUTPUT_PORT
        self.out.clear()
        self.last = 0
        self.pending = 0

    @property
    def a20(self) -> bool:
        """State of the A20 gate (output port bit 1)."""
        return bool(self.output_port & OUT_A20)

    def _request_reset(self, why: int) -> None:
        self.reset_requests += 1
        cb = self.on_reset
        if cb is not None:
            cb(why)

    def read(self, port: int, size: int) -> int:
        """Status (command port) or the next output byte (data port)."""
        if port == self.command_port:
            return self.status | (STAT_OBF if self.out else 0)
        if self.out:
            self.last = self.out.pop(0)
        return self.last            # an empty buffer re-reads the last byte (QEMU ps2_read_data)

    def write(self, port: int, size: int, value: int) -> None:
        """A command (command port) or a data byte (data port)."""
        v = value & 0xFF
        if port == self.command_port:
            self.status |= STAT_CMD
            self.pending = 0
            self._command(v)
            return
        self.status &= ~STAT_CMD & 0xFF
        p, self.pending = self.pending, 0
        if p == 0x60:
            self.command_byte = v
        elif p == 0xD1:
            self._write_output_port(v)
        elif p == 0xD2:
            self.out.append(v)
        else:                       # 0xD3/0xD4 (aux) or no command: for a device that is not there
            self.device_bytes.append(v)

    def _write_output_port(self, v: int) -> None:
        self.output_port = v
        if not v & OUT_RESET:       # reset line driven low (QEMU outport_write)
            self._request_reset(v)

    def _command(self, c: int) -> None:
        if c == 0x20:
            self.out.append(self.command_byte)
        elif c in (0x60, 0xD1, 0xD2, 0xD3, 0xD4):
            self.pending = c
        elif c == 0xA7:
            self.command_byte |= CMD_BYTE_DISABLE_AUX
        elif c == 0xA8:
            self.command_byte &= ~CMD_BYTE_DISABLE_AUX & 0xFF
        elif c == 0xA9 or c == 0xAB:
            self.out.append(0x00)
        elif c == 0xAA:
            self.status |= STAT_SYS
            self.out.append(0x55)
        elif c == 0xAD:
            self.command_byte |= CMD_BYTE_DISABLE_KBD
        elif c == 0xAE:
            self.command_byte &= ~CMD_BYTE_DISABLE_KBD & 0xFF
        elif c == 0xD0:
            self.out.append(self.output_port)
        elif c == 0xDD:
            self.output_port &= ~OUT_A20 & 0xFF
        elif c == 0xDF:
            self.output_port |= OUT_A20
        elif c >= 0xF0 and not c & 1:
            # Pulse output lines; bit 0 clear pulses CPU reset (QEMU KBD_CCMD_PULSE_BITS_3_0).
            self._request_reset(c)

    def __repr__(self) -> str:
        return f"I8042(status={self.status:#04x}, resets={self.reset_requests})"
