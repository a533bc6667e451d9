"""16550A UART (National Semiconductor PC16550D datasheet; QEMU ``hw/char/serial.c``).

Register map, offset from the base port (LCR bit 7 is DLAB):

=====  ==========================  ===========================
 off    read                        write
=====  ==========================  ===========================
 0      RBR (DLAB=0) / DLL (DLAB=1)  THR (DLAB=0) / DLL (DLAB=1)
 1      IER (DLAB=0) / DLM (DLAB=1)  IER (DLAB=0) / DLM (DLAB=1)
 2      IIR                         FCR
 3      LCR                         LCR
 4      MCR                         MCR
 5      LSR                         (ignored: factory test)
 6      MSR                         (ignored)
 7      SCR                         SCR
=====  ==========================  ===========================

Model choices (where the datasheet leaves room, QEMU's behaviour is used):

* The transmitter is infinitely fast: THR and the shift register are always
  empty, so LSR.THRE (0x20) and LSR.TEMT (0x40) always read 1 and a written
  byte is delivered at once (appended to :attr:`tx`, passed to ``on_tx``).
* In loopback (MCR bit 4) a written byte goes to the receiver instead and
  nothing is transmitted; the modem-status inputs follow MCR (CTS=RTS,
  DSR=DTR, RI=OUT1, DCD=OUT2).
* Receive: :meth:`feed` queues bytes "on the line" in :attr:`rx`; the
  receiver holds the first of them (up to 16 in FIFO mode, 1 otherwise).
  There is no flow loss: no overrun, parity, framing or break is ever
  generated, so LSR bits 1-4 and 7 read 0. LSR.DR is 1 while :attr:`rx` is
  non-empty. Reading RBR with nothing received returns 0 in FIFO mode and
  the last received byte otherwise (QEMU ``serial_ioport_read``).
* Interrupts are computed, not delivered: :meth:`iir` gives the identification
  the guest would read and :attr:`irq` the level of the interrupt line (PC
  wiring: gated by MCR.OUT2). Received data raises "data available" (0x04) as
  soon as a byte is there (no trigger level, no character timeout).

State (plain attributes; :meth:`reset` restores power-on values):
``ier lcr mcr fcr scr dll dlm`` (ints, 8 bits), ``rbr`` (last received
byte), ``thr_ipending`` (bool: THRE interrupt source armed), ``msr_delta``
(MSR bits 3:0), ``modem_lines`` (MSR bits 7:4 when not in loopback),
``tx`` (bytearray of transmitted bytes), ``rx`` (bytearray of received
bytes not yet read). :meth:`reset` keeps ``tx`` and ``rx`` (what already
crossed the wire).
"""

from __future__ import annotations

from typing import Callable

from ..errors import InvalidArgumentError

__all__ = ["Uart16550"]

# Register offsets (datasheet Table II)
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
IER_ERBFI, IER_ETBEI, IER_ELSI, IER_EDSSI = 0x01, 0x02, 0x04, 0x08
IIR_NO_INT, IIR_THRE, IIR_RDA, IIR_RLS, IIR_MSI = 0x01, 0x02, 0x04, 0x06, 0x00
IIR_FIFO_ENABLED = 0xC0
FCR_FE, FCR_RX_RESET, FCR_TX_RESET = 0x01, 0x02, 0x04
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08

#: Divisor-latch clock: 1.8432 MHz / 16 (the PC's BASE_BAUD, Linux boot/early_serial_console.c).
BASE_BAUD = 115200
#: QEMU's default modem inputs with nothing attached: DCD, DSR, CTS asserted.
DEFAULT_MODEM_LINES = MSR_DCD | MSR_DSR | MSR_CTS
FIFO_DEPTH = 16


class Uart16550:
    """A 16550A UART on eight consecutive ports starting at ``base``.

    :param base: first port (default COM1, 0x3F8). The device expects the
        absolute port numbers ``base`` .. ``base + 7`` and byte accesses.
    :param on_tx: optional callback receiving each transmitted byte (an int).
    :param modem_lines: MSR bits 7:4 seen when not in loopback (default
        DCD|DSR|CTS, 0xB0).
    :raises InvalidArgumentError: ``base`` is not a port with room for 8
        registers, or ``modem_lines`` has bits outside 7:4.
    """

    def __init__(self, base: int = 0x3F8, *, on_tx: Callable[[int], object] | None = None,
                 modem_lines: int = DEFAULT_MODEM_LINES) -> None:
        if type(base) is not int or not 0 <= base <= 0xFFF8:
            raise InvalidArgumentError(f"UART base must be an int in [0, 0xFFF8], got {base!r}")
        if type(modem_lines) is not int or modem_lines & ~0xF0:
            raise InvalidArgumentError(f"modem_lines must use only MSR bits 7:4, got {modem_lines!r}")
        self.base = base
        self.on_tx = on_tx
        self.tx = bytearray()
        self.rx = bytearray()
        self.modem_lines = modem_lines
        self.ier = self.lcr = self.mcr = self.fcr = self.scr = 0
        self.dll = self.dlm = self.rbr = self.msr_delta = 0
        self.thr_ipending = False
        self.reset()

    def reset(self) -> None:
        """Power-on register state (datasheet Table IV); ``tx``/``rx`` are kept."""
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.fcr = 0
        self.scr = 0
        self.dll = 0
        self.dlm = 0
        self.rbr = 0
        self.msr_delta = 0
        self.thr_ipending = False

    # ------------------------------------------------------------ user side
    @property
    def output(self) -> bytes:
        """Every byte transmitted so far."""
        return bytes(self.tx)

    def clear_output(self) -> None:
        """Forget the transmitted bytes."""
        self.tx.clear()

    def feed(self, data: bytes | bytearray | str) -> None:
        """Queue bytes for the guest to receive (a ``str`` is encoded as latin-1).

        :raises InvalidArgumentError: ``data`` is not bytes-like or str, or a
            str has characters above U+00FF.
        """
        if isinstance(data, str):
            try:
                data = data.encode("latin-1")
            except UnicodeEncodeError as exc:
                raise InvalidArgumentError(f"feed(): character outside latin-1 in {data!r}") from exc
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(f"feed() needs bytes or str, got {type(data).__name__}")
        self.rx += data

    def set_modem_lines(self, lines: int) -> None:
        """Change the modem inputs (MSR bits 7:4) and latch the delta bits.

        :raises InvalidArgumentError: bits outside 7:4.
        """
        if type(lines) is not int or lines & ~0xF0:
            raise InvalidArgumentError(f"modem lines must use only MSR bits 7:4, got {lines!r}")
        old = self._lines()
        self.modem_lines = lines
        self._latch_deltas(old, self._lines())

    @property
    def divisor(self) -> int:
        """Divisor latch (DLM:DLL)."""
        return self.dlm << 8 | self.dll

    @property
    def baud(self) -> int:
        """Line speed the divisor selects (115200 / divisor; 0 when the divisor is 0)."""
        d = self.dlm << 8 | self.dll
        return BASE_BAUD // d if d else 0

    @property
    def irq(self) -> bool:
        """Level of the PC's IRQ line: an interrupt is pending and MCR.OUT2 gates it through."""
        return (self.iir() & IIR_NO_INT) == 0 and bool(self.mcr & MCR_OUT2)

    def lsr(self) -> int:
        """Line status register value (no side effects)."""
        return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)

    def iir(self) -> int:
        """Interrupt identification the guest would read now (no side effects).

        Priority (datasheet Table V): line status, received data, THR empty,
        modem status. Bits 7:6 are set while FIFOs are enabled.
        """
        fifo = IIR_FIFO_ENABLED if self.fcr & FCR_FE else 0
        ier = self.ier
        # Line-status errors are never generated (see module docstring).
        if ier & IER_ERBFI and self.rx:
            return fifo | IIR_RDA
        if ier & IER_ETBEI and self.thr_ipending:
            return fifo | IIR_THRE
        if ier & IER_EDSSI and self.msr_delta:
            return fifo | IIR_MSI
        return fifo | IIR_NO_INT

    # ------------------------------------------------------------ modem lines
    def _lines(self) -> int:
        m = self.mcr
        if m & MCR_LOOP:
            # Loopback wiring (datasheet "Loopback"): CTS=RTS, DSR=DTR, RI=OUT1, DCD=OUT2.
            return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
        return self.modem_lines

    def _latch_deltas(self, old: int, new: int) -> None:
        changed = old ^ new
        d = 0
        if changed & MSR_CTS:
            d |= MSR_DCTS
        if changed & MSR_DSR:
            d |= MSR_DDSR
        if old & MSR_RI and not new & MSR_RI:      # TERI: trailing edge of RI only
            d |= MSR_TERI
        if changed & MSR_DCD:
            d |= MSR_DDCD
        self.msr_delta |= d

    # ------------------------------------------------------------ bus interface
    def read(self, port: int, size: int) -> int:
        """Read the register at ``port`` (byte access)."""
        off = port - self.base
        if off == RBR:
            if self.lcr & LCR_DLAB:
                return self.dll
            rx = self.rx
            if rx:
                b = rx[0]
                del rx[0]
                self.rbr = b
                return b
            return 0 if self.fcr & FCR_FE else self.rbr
        if off == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        if off == IER:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if off == IIR:
            v = self.iir()
            if v & 0x0F == IIR_THRE:
                # Reading IIR while it reports THRE clears that source (datasheet Table V).
                self.thr_ipending = False
            return v
        if off == LCR:
            return self.lcr
        if off == MCR:
            return self.mcr
        if off == MSR:
            v = self._lines() | self.msr_delta
            self.msr_delta = 0
            return v
        if off == SCR:
            return self.scr
        raise InvalidArgumentError(f"port {port:#x} is not a register of the UART at {self.base:#x}")

    def write(self, port: int, size: int, value: int) -> None:
        """Write the low byte of ``value`` to the register at ``port``."""
        off = port - self.base
        v = value & 0xFF
        if off == THR:
            if self.lcr & LCR_DLAB:
                self.dll = v
                return
            if self.mcr & MCR_LOOP:
                self.rx.append(v)
            else:
                self.tx.append(v)
                cb = self.on_tx
                if cb is not None:
                    cb(v)
            # The write clears the THRE source; the (instant) transmitter re-arms it.
            self.thr_ipending = True
            return
        if off == LCR:
            self.lcr = v
            return
        if off == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = v
                return
            old = self.ier
            self.ier = v & 0x0F
            if v & IER_ETBEI and not old & IER_ETBEI:
                # Enabling ETBEI with THR empty raises THRE at once (QEMU serial_ioport_write).
                self.thr_ipending = True
            return
        if off == FCR:
            if (v ^ self.fcr) & FCR_FE:
                self._clear_receiver()          # toggling FIFO enable resets both FIFOs
            elif v & FCR_RX_RESET:
                self._clear_receiver()
            # Bits 1-2 self-clear; bits 4-5 are reserved.
            self.fcr = v & 0xC9
            return
        if off == MCR:
            old = self._lines()
            self.mcr = v & 0x1F
            self._latch_deltas(old, self._lines())
            return
        if off == SCR:
            self.scr = v
            return
        if off == LSR or off == MSR:
            return
        raise InvalidArgumentError(f"port {port:#x} is not a register of the UART at {self.base:#x}")

    def _clear_receiver(self) -> None:
        # Only what the receiver holds is lost; bytes still "on the line" arrive later.
        depth = FIFO_DEPTH if self.fcr & FCR_FE else 1
        del self.rx[:depth]

    def __repr__(self) -> str:
        return (f"Uart16550(base={self.base:#x}, lcr={self.lcr:#04x}, ier={self.ier:#04x}, "
                f"mcr={self.mcr:#04x}, divisor={self.divisor}, tx={len(self.tx)} bytes, rx={len(self.rx)} bytes)")
