"""Device models against their datasheet behaviour (issue 4).

16550A: National Semiconductor PC16550D datasheet (register table, IIR priority,
loopback wiring); QEMU hw/char/serial.c where the datasheet leaves room.
MC146818A: Motorola datasheet + QEMU hw/rtc/mc146818rtc.c. PCI: PCI Local Bus
3.0 3.2.2.3.2 (mechanism #1). ACPI PM timer: ACPI 4.8.3.3. i8042: QEMU pckbd.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tdxve.devices import (
    PM_TIMER_HZ,
    AcpiPmTimer,
    CmosRtc,
    DebugConsole,
    I8042,
    ManualClock,
    MonotonicClock,
    PciFunction,
    PciHost,
    PostCodePort,
    SteppingClock,
    Uart16550,
)
from tdxve.errors import InvalidArgumentError
from tdxve.host import Host

COM1 = 0x3F8
RBR = THR = DLL = COM1
IER = DLM = COM1 + 1
IIR = FCR = COM1 + 2
LCR, MCR, LSR, MSR, SCR = COM1 + 3, COM1 + 4, COM1 + 5, COM1 + 6, COM1 + 7


# ================================================================ 16550A
def uart() -> Uart16550:
    return Uart16550(COM1)


def test_uart_power_on_registers() -> None:
    """Datasheet reset table: IER 0, IIR 0x01, LCR 0, MCR 0, LSR 0x60, MSR deltas 0."""
    u = uart()
    assert [u.read(p, 1) for p in (IER, IIR, LCR, MCR, LSR)] == [0x00, 0x01, 0x00, 0x00, 0x60]
    assert u.read(MSR, 1) == 0xB0                 # DCD|DSR|CTS with nothing attached (QEMU)


def test_uart_thr_transmits_and_lsr_stays_idle() -> None:
    tx: list[int] = []
    u = Uart16550(COM1, on_tx=tx.append)
    for b in b"hi\n":
        assert u.read(LSR, 1) & 0x60 == 0x60       # THRE|TEMT before each byte
        u.write(THR, 1, b)
    assert u.output == b"hi\n" and tx == list(b"hi\n")
    assert u.read(LSR, 1) == 0x60
    u.clear_output()
    assert u.output == b""


def test_uart_dlab_divisor_latch() -> None:
    u = uart()
    u.write(LCR, 1, 0x83)
    u.write(DLL, 1, 0x01)
    u.write(DLM, 1, 0x00)
    assert (u.read(DLL, 1), u.read(DLM, 1)) == (0x01, 0x00)
    assert u.output == b"" and u.ier == 0          # DLAB writes are not THR/IER
    u.write(LCR, 1, 0x03)
    assert (u.divisor, u.baud) == (1, 115200)
    u.write(IER, 1, 0x05)
    assert u.read(IER, 1) == 0x05 and u.read(DLM, 1) == 0x05   # same offset, DLAB=0 -> IER


def test_uart_ier_keeps_low_four_bits() -> None:
    u = uart()
    u.write(IER, 1, 0xFF)
    assert u.read(IER, 1) == 0x0F


def test_uart_receive_queue_and_dr() -> None:
    u = uart()
    u.feed(b"ab")
    u.feed("c")
    assert u.read(LSR, 1) & 0x01
    assert bytes(u.read(RBR, 1) for _ in range(3)) == b"abc"
    assert not u.read(LSR, 1) & 0x01
    assert u.read(RBR, 1) == ord("c")              # non-FIFO: RBR holds the last byte
    u.write(FCR, 1, 0x01)
    assert u.read(RBR, 1) == 0                     # FIFO mode, empty: 0 (QEMU)
    with pytest.raises(InvalidArgumentError):
        u.feed(123)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        u.feed("\u20ac")


def test_uart_fifo_reset_clears_only_what_the_receiver_holds() -> None:
    u = uart()
    u.write(FCR, 1, 0x01)
    u.feed(bytes(range(20)))
    u.write(FCR, 1, 0x03)                          # FE + clear RX FIFO: 16 bytes lost
    assert u.read(RBR, 1) == 16
    u.write(FCR, 1, 0x00)                          # FE toggled off: both FIFOs reset (16 more, 3 left)
    assert u.rx == b""
    assert u.read(IIR, 1) & 0xC0 == 0x00


def test_uart_iir_priorities_and_thre_clear_on_read() -> None:
    """Datasheet IIR table: RX data (0x04) over THRE (0x02) over modem status (0x00); FIFO bits 7:6."""
    u = uart()
    u.write(IER, 1, 0x02)                          # ETBEI with THR empty -> THRE at once
    assert u.read(IIR, 1) == 0x02
    assert u.read(IIR, 1) == 0x01                  # reading IIR cleared the THRE source
    u.write(THR, 1, 0x41)
    assert u.iir() == 0x02                         # transmitter empty again
    u.write(IER, 1, 0x0B)
    u.feed(b"x")
    assert u.read(IIR, 1) == 0x04
    u.read(RBR, 1)
    assert u.read(IIR, 1) == 0x02
    u.write(FCR, 1, 0x01)
    assert u.iir() & 0xC0 == 0xC0
    u.write(MCR, 1, 0x10)                          # loopback: CTS/DSR/DCD drop -> DCTS|DDSR|DDCD
    assert u.read(IIR, 1) == 0xC0                  # modem status (id 0); THRE was cleared above
    assert u.read(IIR, 1) == 0xC0                  # reading IIR does not clear it ...
    assert u.read(MSR, 1) == 0x0B                  # ... reading MSR does
    assert u.read(IIR, 1) == 0xC1


def test_uart_irq_line_gated_by_out2() -> None:
    u = uart()
    u.write(IER, 1, 0x01)
    u.feed(b"z")
    assert not u.irq                               # OUT2 low: the PC's IRQ4 is not driven
    u.write(MCR, 1, 0x08)
    assert u.irq


def test_uart_loopback() -> None:
    """MCR bit 4: THR -> RBR, nothing on the wire; CTS=RTS, DSR=DTR, RI=OUT1, DCD=OUT2."""
    u = uart()
    u.read(MSR, 1)
    u.write(MCR, 1, 0x10)
    u.write(THR, 1, 0x5A)
    assert u.output == b"" and u.read(LSR, 1) & 1 and u.read(RBR, 1) == 0x5A
    u.read(MSR, 1)
    u.write(MCR, 1, 0x10 | 0x0F)
    assert u.read(MSR, 1) == 0xF0 | 0x0B           # all lines up; DCTS, DDSR, DDCD (no TERI on rise)
    u.write(MCR, 1, 0x10 | 0x0B)                   # OUT1 (RI) falls -> TERI
    assert u.read(MSR, 1) == 0xB0 | 0x04
    assert u.read(MSR, 1) == 0xB0                  # deltas clear on read


def test_uart_scr_lsr_msr_writes() -> None:
    u = uart()
    u.write(SCR, 1, 0xA5)
    assert u.read(SCR, 1) == 0xA5
    u.write(LSR, 1, 0x00)
    u.write(MSR, 1, 0x00)
    assert u.read(LSR, 1) == 0x60 and u.read(MSR, 1) == 0xB0


def test_uart_set_modem_lines_and_reset() -> None:
    u = uart()
    u.set_modem_lines(0x30)
    assert u.read(MSR, 1) == 0x30 | 0x08           # DCD dropped -> DDCD
    with pytest.raises(InvalidArgumentError):
        u.set_modem_lines(0x01)
    u.write(LCR, 1, 0x1B)
    u.write(THR, 1, 0x31)
    u.reset()
    assert u.lcr == 0 and u.output == b"1"
    for bad in (-1, 0xFFF9, "0x3f8"):
        with pytest.raises(InvalidArgumentError):
            Uart16550(bad)  # type: ignore[arg-type]


# ================================================================ debugcon, POST
def test_debugcon_on_both_ports_through_host() -> None:
    host = Host()
    for port, ch in ((0x402, b"A"), (0xE9, b"B")):
        host.bus.write(port, 1, ch[0])
    assert host.debugcon.output == b"AB"
    assert host.bus.read(0xE9, 1) == 0xE9 and host.bus.read(0x402, 1) == 0xE9   # QEMU readback
    host.bus.write(0xE9, 2, 0x4443)               # split: low byte to 0xE9, high to 0xEA (unassigned)
    assert host.debugcon.output == b"ABC"


def test_debugcon_args_and_callback() -> None:
    seen: list[int] = []
    d = DebugConsole(readback=0x00, on_write=seen.append)
    d.write(0xE9, 1, 0x141)
    assert d.read(0xE9, 1) == 0 and seen == [0x41] and d.output == b"A"
    with pytest.raises(InvalidArgumentError):
        DebugConsole(readback=0x100)


def test_post_codes() -> None:
    seen: list[int] = []
    p = PostCodePort(on_code=seen.append)
    assert p.last is None
    for c in (0x10, 0x2A, 0xFF):
        p.write(0x80, 1, c)
    assert p.codes == [0x10, 0x2A, 0xFF] == seen and p.last == 0xFF
    assert p.read(0x80, 1) == 0xFF                 # QEMU ioport80_read


def test_post_word_write_keeps_low_byte() -> None:
    host = Host()
    host.bus.write(0x80, 2, 0xBEEF)
    assert host.post.codes == [0xEF]


# ================================================================ CMOS / RTC
def rtc(start: int | datetime | None = None) -> tuple[CmosRtc, ManualClock]:
    clk = ManualClock()
    return CmosRtc(clk, start=start), clk


def cmos_read(c: CmosRtc, index: int) -> int:
    c.write(0x70, 1, index)
    return c.read(0x71, 1)


def cmos_write(c: CmosRtc, index: int, value: int) -> None:
    c.write(0x70, 1, index)
    c.write(0x71, 1, value)


def test_cmos_defaults() -> None:
    """Status A 0x26 (ref 6.3 live value), B 0x02 (24h, BCD), C 0, D 0x80 (VRT); 0x70 reads 0xFF."""
    c, _ = rtc()
    assert [cmos_read(c, i) for i in (0x0A, 0x0B, 0x0C, 0x0D)] == [0x26, 0x02, 0x00, 0x80]
    assert c.read(0x70, 1) == 0xFF


def test_cmos_time_bcd_and_binary() -> None:
    start = datetime(2026, 3, 30, 21, 7, 59, tzinfo=timezone.utc)     # a Monday
    c, clk = rtc(start)
    regs = (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)
    assert [cmos_read(c, i) for i in regs] == [0x59, 0x07, 0x21, 0x02, 0x30, 0x03, 0x26, 0x20]
    clk.advance(1_000_000_000)
    assert cmos_read(c, 0x00) == 0x00 and cmos_read(c, 0x02) == 0x08
    cmos_write(c, 0x0B, 0x06)                       # binary, 24h
    assert [cmos_read(c, i) for i in regs] == [0, 8, 21, 2, 30, 3, 26, 20]
    cmos_write(c, 0x0B, 0x04)                       # binary, 12h: 21h -> 9 PM
    assert cmos_read(c, 0x04) == 0x80 | 9
    cmos_write(c, 0x0B, 0x00)                       # BCD, 12h
    assert cmos_read(c, 0x04) == 0x80 | 0x09
    assert c.now() == datetime(2026, 3, 30, 21, 8, 0, tzinfo=timezone.utc)


def test_cmos_12h_midnight_and_noon() -> None:
    c, clk = rtc(datetime(2000, 1, 1, 0, 30, tzinfo=timezone.utc))
    cmos_write(c, 0x0B, 0x00)
    assert cmos_read(c, 0x04) == 0x12               # 12 AM
    clk.advance(12 * 3600 * 10**9)
    assert cmos_read(c, 0x04) == 0x80 | 0x12        # 12 PM


def test_cmos_uip_in_last_244us_of_each_second() -> None:
    """UIP (A bit 7) for 8 cycles of 32.768 kHz before each update (QEMU update_in_progress)."""
    c, clk = rtc()
    assert cmos_read(c, 0x0A) == 0x26
    clk.set(1_000_000_000 - 244_141)
    assert cmos_read(c, 0x0A) == 0x26
    clk.set(1_000_000_000 - 244_140)
    assert cmos_read(c, 0x0A) == 0xA6
    clk.set(1_000_000_000 - 1)
    assert cmos_read(c, 0x0A) == 0xA6
    clk.set(1_000_000_000)
    assert cmos_read(c, 0x0A) == 0x26
    cmos_write(c, 0x0A, 0xA6)                       # UIP is read-only
    assert c.data[0x0A] & 0x7F == 0x26


def test_cmos_set_bit_freezes_and_restarts() -> None:
    c, clk = rtc(datetime(2011, 2, 2, 2, 4, 58, tzinfo=timezone.utc))
    clk.set(700_000_001)                            # mid-second: the phase must survive SET
    cmos_write(c, 0x0B, 0x82 | 0x10)                # SET (+UIE, which SET clears)
    assert cmos_read(c, 0x0B) == 0x82
    clk.set(999_999_999)                            # would be UIP, but the clock is stopped
    assert cmos_read(c, 0x0A) == 0x26
    for i, v in ((0x09, 0x80), (0x32, 0x19), (0x08, 0x02), (0x07, 0x02), (0x04, 0x02),
                 (0x02, 0x04), (0x00, 0x58)):
        cmos_write(c, i, v)
    clk.advance(5 * 10**9)
    assert cmos_read(c, 0x00) == 0x58               # frozen
    cmos_write(c, 0x0B, 0x02)                       # clear SET: runs from 1980-02-02 02:04:58
    clk.advance(2 * 10**9)
    assert [cmos_read(c, i) for i in (0x00, 0x02, 0x09, 0x32)] == [0x00, 0x05, 0x80, 0x19]
    assert c.now() == datetime(1980, 2, 2, 2, 5, 0, tzinfo=timezone.utc)


def test_cmos_write_time_while_running_keeps_running() -> None:
    c, clk = rtc()
    cmos_write(c, 0x02, 0x30)                       # minutes := 30
    clk.advance(61 * 10**9)
    assert (cmos_read(c, 0x02), cmos_read(c, 0x00)) == (0x31, 0x01)


def test_cmos_divider_reset_stops_and_releases_half_second_later() -> None:
    c, clk = rtc()
    cmos_write(c, 0x0A, 0x66)                       # divider in reset
    clk.advance(10 * 10**9)
    assert cmos_read(c, 0x00) == 0x00
    cmos_write(c, 0x0A, 0x26)                       # first update 0.5 s later
    clk.advance(499_999_999)
    assert cmos_read(c, 0x00) == 0x00
    clk.advance(1)
    assert cmos_read(c, 0x00) == 0x01


def test_cmos_c_d_read_only_and_nvram() -> None:
    c, _ = rtc()
    cmos_write(c, 0x0C, 0xFF)
    cmos_write(c, 0x0D, 0x00)
    assert cmos_read(c, 0x0C) == 0 and cmos_read(c, 0x0D) == 0x80
    for i in (0x0E, 0x10, 0x31, 0x33, 0x7F):
        cmos_write(c, i, i ^ 0x5A)
    assert [cmos_read(c, i) for i in (0x0E, 0x10, 0x31, 0x33, 0x7F)] == [i ^ 0x5A for i in (0x0E, 0x10, 0x31, 0x33, 0x7F)]
    assert len(c.data) == 128


def test_cmos_index_nmi_bit_and_128_bytes() -> None:
    c, _ = rtc()
    c.write(0x70, 1, 0x8F)                          # NMI disable + index 0x0F
    assert c.nmi_disabled and c.index == 0x0F
    c.write(0x71, 1, 0x42)
    c.write(0x70, 1, 0x0F)
    assert not c.nmi_disabled and c.read(0x71, 1) == 0x42


def test_cmos_ps2_century_alias_and_nvram_init() -> None:
    c = CmosRtc(ManualClock(), nvram=b"\x11\x22")
    assert cmos_read(c, 0x0E) == 0x11 and cmos_read(c, 0x0F) == 0x22
    assert cmos_read(c, 0x37) == 0x20 and c.index == 0x32
    for kw in ({"start": datetime(2000, 1, 1)}, {"start": "now"}, {"nvram": b"x" * 115}, {"base": -1}):
        with pytest.raises(InvalidArgumentError):
            CmosRtc(ManualClock(), **kw)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        CmosRtc(object())  # type: ignore[arg-type]


def test_cmos_invalid_bcd_normalises_like_qemu_mktimegm() -> None:
    c, clk = rtc()
    cmos_write(c, 0x0B, 0x82)
    cmos_write(c, 0x08, 0x13)                       # month 13 of 2000 = January 2001
    cmos_write(c, 0x0B, 0x02)
    assert (cmos_read(c, 0x08), cmos_read(c, 0x09)) == (0x01, 0x01)


def test_cmos_word_access_index_plus_data() -> None:
    """OUT DX,AX to 0x70 = index (low byte) then data (high byte), split by the bus."""
    host = Host(clock=ManualClock())
    host.bus.write(0x70, 2, 0x5A_20)
    assert host.cmos.data[0x20] == 0x5A


# ================================================================ PCI mechanism #1
def test_pci_host_bridge_dword_0() -> None:
    host = Host()
    host.bus.write(0xCF8, 4, PciHost.address(0, 0, 0, 0))
    assert host.bus.read(0xCF8, 4) == 0x8000_0000
    assert host.bus.read(0xCFC, 4) == 0x12378086
    assert host.bus.read(0xCFC, 2) == 0x8086 and host.bus.read(0xCFE, 2) == 0x1237
    assert [host.bus.read(0xCFC + k, 1) for k in range(4)] == [0x86, 0x80, 0x37, 0x12]
    host.bus.write(0xCF8, 4, PciHost.address(0, 0, 0, 8))
    assert host.bus.read(0xCFC, 4) == 0x0600_0002  # class 06/00/00, revision 2


def test_pci_enable_bit_and_absent_functions() -> None:
    p = PciHost()
    p.write(0xCF8, 4, 0x0000_0000)                  # enable clear
    assert p.read(0xCFC, 4) == 0xFFFFFFFF
    p.write(0xCF8, 4, PciHost.address(0, 3, 0, 0))
    assert p.read(0xCFC, 4) == 0xFFFFFFFF and p.read(0xCFE, 2) == 0xFFFF and p.read(0xCFD, 1) == 0xFF
    p.write(0xCFC, 4, 0)                            # dropped, no error
    p.write(0xCF8, 4, PciHost.address(1, 0, 0, 0))
    assert p.read(0xCFC, 4) == 0xFFFFFFFF


def test_pci_config_address_only_dword_and_reserved_bits() -> None:
    p = PciHost()
    p.write(0xCF8, 4, 0xFFFF_FFFF)
    assert p.read(0xCF8, 4) == 0x80FF_FFFC          # bits 30:24 and 1:0 reserved
    p.write(0xCF8, 2, 0)                            # not a dword: passes through, not CONFIG_ADDRESS
    p.write(0xCFA, 1, 0)
    assert p.read(0xCF8, 4) == 0x80FF_FFFC
    assert p.read(0xCF8, 2) == 0xFFFF and p.read(0xCFA, 1) == 0xFF


def test_pci_read_only_registers_stay_read_only() -> None:
    p = PciHost()
    p.write(0xCF8, 4, PciHost.address(0, 0, 0, 0))
    p.write(0xCFC, 4, 0xDEADBEEF)                   # vendor/device ID: read-only
    assert p.read(0xCFC, 4) == 0x12378086
    p.write(0xCFC, 2, 0xFFFF)                       # command: bits 0-6 writable, 7 not
    assert p.read(0xCFC, 2) == 0x8086               # (still vendor: offset 0)
    p.write(0xCF8, 4, PciHost.address(0, 0, 0, 4))
    p.write(0xCFC, 2, 0xFFFF)
    assert p.read(0xCFC, 2) == 0x077F               # command bits 0-6, 8-10
    p.write(0xCF8, 4, PciHost.address(0, 0, 0, 8))
    p.write(0xCFC, 4, 0)
    assert p.read(0xCFC, 4) == 0x0600_0002          # class/revision read-only
    p.write(0xCF8, 4, PciHost.address(0, 0, 0, 0x3C))
    p.write(0xCFC, 1, 0x0B)
    assert p.read(0xCFC, 1) == 0x0B                 # interrupt line writable
    p.write(0xCF8, 4, PciHost.address(0, 0, 0, 0x58))
    p.write(0xCFD, 1, 0x33)                         # device-specific area (i440FX PAM): writable
    assert p.read(0xCFC, 4) == 0x3300


def test_pci_status_w1c() -> None:
    f = PciFunction(0x1AF4, 0x1000, class_code=0x020000)
    f.config[0x07] = 0xF9                           # error bits set by "hardware"
    f.write(0x06, 2, 0x0800 << 0)                   # write 1 to bit 11 only
    assert f.read(0x06, 2) == 0xF100
    f.write(0x06, 2, 0xFFFF)
    assert f.read(0x06, 2) == 0x0000


def test_pci_configurable_functions() -> None:
    p = PciHost(host_bridge=False)
    assert p.function(0, 0, 0) is None
    nic = PciFunction(0x1AF4, 0x1000, class_code=0x020000, revision=1, header_type=0x80,
                      subsystem_vendor_id=0x1AF4, subsystem_id=1)
    p.add(0, 3, 0, nic)
    p.write(0xCF8, 4, PciHost.address(0, 3, 0, 0))
    assert p.read(0xCFC, 4) == 0x10001AF4
    p.write(0xCF8, 4, PciHost.address(0, 3, 0, 0x0C))
    assert p.read(0xCFE, 1) == 0x80                 # header type, multi-function
    p.write(0xCF8, 4, PciHost.address(0, 3, 0, 0x2C))
    assert p.read(0xCFC, 4) == 0x00011AF4
    with pytest.raises(InvalidArgumentError):
        p.add(0, 3, 0, nic)
    raw = bytearray(256)
    raw[0:4] = b"\x86\x80\x00\x29"
    p.add(0, 31, 7, PciFunction(0, 0, config=bytes(raw), wmask=bytes(256)))
    p.write(0xCF8, 4, PciHost.address(0, 31, 7, 0))
    assert p.read(0xCFC, 4) == 0x29008086
    assert p.remove(0, 3, 0) is nic and p.function(0, 3, 0) is None
    nic.config[0x3C] = 9
    nic.reset()
    assert nic.config[0x3C] == 0
    for args in ((0, 32, 0), (0, 0, 8), (256, 0, 0), (-1, 0, 0)):
        with pytest.raises(InvalidArgumentError):
            p.function(*args)
    with pytest.raises(InvalidArgumentError):
        p.remove(0, 9, 0)
    with pytest.raises(InvalidArgumentError):
        PciFunction(0x10000, 0)
    with pytest.raises(InvalidArgumentError):
        PciFunction(0, 0, config=b"short")
    with pytest.raises(InvalidArgumentError):
        nic.read(0xFF, 2)
    with pytest.raises(InvalidArgumentError):
        p.read(0xCFE, 4)                            # direct device use past CONFIG_DATA


def test_pci_reset_control_cf9() -> None:
    """Linux reboot=pci: outb(0x02, 0xCF9); outb(0x06, 0xCF9) -> one reset (QEMU rcr_write)."""
    host = Host()
    host.bus.write(0xCF9, 1, 0x02)
    assert host.pci.reset_requests == 0 and host.bus.read(0xCF9, 1) == 0x02
    host.bus.write(0xCF9, 1, 0x06)
    assert host.pci.reset_requests == 1 and host.reset_requested == 1


# ================================================================ ACPI PM timer
def test_pm_timer_frequency_and_wrap() -> None:
    clk = ManualClock()
    t = AcpiPmTimer(clk)
    assert t.read(0x608, 4) == 0
    clk.set(1_000_000_000)
    assert t.read(0x608, 4) == PM_TIMER_HZ == 3_579_545
    clk = ManualClock()
    t = AcpiPmTimer(clk)
    clk.set(279)                                    # 279 ns * 3.579545 MHz = 0.9987 -> 0
    assert t.read(0x608, 4) == 0
    clk.set(280)
    assert t.read(0x608, 4) == 1
    period = (1 << 24) * 10**9 // PM_TIMER_HZ + 1
    clk.set(period)                                 # 24-bit wrap (~4.687 s)
    assert t.read(0x608, 4) < 10
    t.write(0x608, 4, 0x12345678)                   # read-only
    assert t.read(0x608, 4) < 10
    t.reset()
    assert t.read(0x608, 4) == 0


def test_pm_timer_through_host_and_dword_only() -> None:
    clk = ManualClock()
    host = Host(clock=clk, pm_timer_port=0xB008)
    clk.advance(10**6)
    assert host.bus.read(0xB008, 4) == 3579
    assert host.bus.read(0xB008, 1) == 0xFF         # QEMU: valid access size is 4 only
    assert host.bus.lookup(0x608) is None


def test_pm_timer_stepping_clock_makes_polling_terminate() -> None:
    host = Host()                                   # SteppingClock, 1 us per reading
    first = host.bus.read(0x608, 4)
    n = 0
    while host.bus.read(0x608, 4) - first < 358:    # ~100 us of PM-timer ticks
        n += 1
    assert 95 <= n <= 105


# ================================================================ i8042
def test_i8042_reset_command_fe() -> None:
    seen: list[int] = []
    k = I8042(on_reset=seen.append)
    assert k.read(0x64, 1) & 0x02 == 0              # IBF clear: Linux kb_wait() passes
    k.write(0x64, 1, 0xFE)
    assert k.reset_requests == 1 and seen == [0xFE]
    k.write(0x64, 1, 0xFF)                          # bit 0 set: no reset line pulsed
    k.write(0x64, 1, 0xF0)                          # even 0xF0-0xFE pulse reset too
    assert k.reset_requests == 2


def test_i8042_controller_commands() -> None:
    k = I8042()
    assert k.read(0x64, 1) == 0x18
    k.write(0x64, 1, 0xAA)
    assert k.read(0x64, 1) & 0x05 == 0x05 and k.read(0x60, 1) == 0x55   # self-test sets SYS
    k.write(0x64, 1, 0x20)
    assert k.read(0x60, 1) == 0x03
    k.write(0x64, 1, 0x60)
    k.write(0x60, 1, 0x47)
    assert k.command_byte == 0x47 and k.read(0x64, 1) & 0x08 == 0
    k.write(0x64, 1, 0xAD)
    k.write(0x64, 1, 0xA7)
    assert k.command_byte & 0x30 == 0x30
    k.write(0x64, 1, 0xAE)
    k.write(0x64, 1, 0xA8)
    assert k.command_byte & 0x30 == 0
    k.write(0x64, 1, 0xDD)
    assert not k.a20
    k.write(0x64, 1, 0xDF)
    assert k.a20
    k.write(0x64, 1, 0xD0)
    assert k.read(0x60, 1) == 0xCF
    assert k.read(0x60, 1) == 0xCF                  # empty: last byte again
    k.write(0x64, 1, 0xD1)
    k.write(0x60, 1, 0xCE)                          # output port bit 0 low: reset
    assert k.reset_requests == 1
    k.write(0x64, 1, 0xD2)
    k.write(0x60, 1, 0x1C)
    assert k.read(0x64, 1) & 1 and k.read(0x60, 1) == 0x1C
    k.write(0x60, 1, 0xFF)                          # for the (absent) keyboard
    assert k.device_bytes == [0xFF]
    k.reset()
    assert k.read(0x64, 1) == 0x18 and k.reset_requests == 1
    with pytest.raises(InvalidArgumentError):
        I8042(data_port=0x64)


def test_i8042_reset_through_host_tdvmcall_path() -> None:
    host = Host()
    host.bus.write(0x64, 1, 0xFE)
    assert host.i8042.reset_requests == 1 and host.reset_requested == 1


# ================================================================ clocks
def test_clocks() -> None:
    m = ManualClock(5)
    assert m.now_ns() == 5 == m.now_ns()
    m.advance(10)
    m.set(20)
    assert m.now_ns() == 20
    with pytest.raises(InvalidArgumentError):
        m.set(19)
    with pytest.raises(InvalidArgumentError):
        m.advance(-1)
    s = SteppingClock(step_ns=7, start_ns=3)
    assert [s.now_ns() for _ in range(3)] == [3, 10, 17]
    s.advance(100)
    assert s.now_ns() == 124
    with pytest.raises(InvalidArgumentError):
        SteppingClock(step_ns=0)
    mono = MonotonicClock()
    a = mono.now_ns()
    assert mono.now_ns() >= a >= 0
    assert "ManualClock" in repr(m) and "SteppingClock" in repr(s)


def test_pci_pickled_state_excludes_the_decode_cache():
    """fuzz_replay finding: the compiled replay path does not fill PciHost's decode
    cache, so a cached and an uncached host must compare (and pickle) equal."""
    import pickle

    from tdxve.devices import PciHost
    a, b = PciHost(), PciHost()
    a.write(0xCF8, 4, 0x8000_0000)
    b.write(0xCF8, 4, 0x8000_0000)
    assert a.read(0xCFC, 4) == 0x12378086           # fills a's cache only
    assert a._cached_addr != b._cached_addr
    assert pickle.dumps(a) == pickle.dumps(b)
    c = pickle.loads(pickle.dumps(a))
    assert c.read(0xCFC, 4) == 0x12378086 and c.config_address == 0x8000_0000
