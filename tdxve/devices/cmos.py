"""MC146818 CMOS/RTC on ports 0x70 (index) and 0x71 (data).

Behaviour follows the Motorola MC146818A datasheet as QEMU implements it
(``hw/rtc/mc146818rtc.c``: ``cmos_ioport_read``/``cmos_ioport_write``,
``update_in_progress``, ``rtc_set_cmos``/``rtc_get_time``):

* Port 0x70 (write): bits 6:0 select one of 128 bytes; bit 7 is the PC's NMI
  mask (kept in :attr:`CmosRtc.nmi_disabled`; no NMI is modelled). Reading
  0x70 returns 0xFF (the index register is write-only).
* Port 0x71: the selected byte. 0x00-0x09 and the century byte 0x32 are the
  clock (seconds, seconds alarm, minutes, minutes alarm, hours, hours alarm,
  day of week 1=Sunday, day of month, month, year), 0x0A-0x0D status A-D,
  everything else battery-backed RAM.
* Time registers are encoded per status B: bit 2 (DM) 1 = binary, 0 = BCD;
  bit 1 (24/12) 1 = 24-hour, 0 = 12-hour with bit 7 of the hours byte = PM.
* Status A: default 0x26 (the value the reference's live GCP measurement read
  through port 0x71, ref 6.3: 32.768 kHz time base, 1024 Hz rate). Bit 7
  (UIP) is read-only; it reads 1 during the last 244 us (8 cycles of
  32.768 kHz) of every second while the clock runs -- QEMU's model, whose
  update itself is instantaneous, so a guest that waits for UIP to drop (as
  Linux's ``mc146818_get_time`` does) reads a stable time afterwards.
* The clock runs unless status B bit 7 (SET) is 1 or the divider bits
  A[6:4] are in reset (0b11x). While stopped the time bytes are plain RAM.
  Setting SET clears B.UIE; clearing SET (or writing a time byte while
  running) restarts the clock from the time bytes, keeping the sub-second
  phase; releasing the divider reset starts the first update half a second
  later (QEMU ``cmos_ioport_write``).
* Status C (interrupt flags) reads 0 and is cleared by reads -- no periodic,
  alarm or update-ended interrupts are generated; status D reads 0x80 (VRT,
  valid RAM and time). Both are read-only.
* Invalid time bytes (say month 0x13) are not rejected: like QEMU
  (``mktimegm``), they are normalised arithmetically when the clock restarts.

State (plain attributes): ``data`` (bytearray(128): the stored bytes; the
time bytes are refreshed from the clock when read while running),
``index`` (0-127), ``nmi_disabled`` (bool), ``offset_ns`` (int: RTC time in
ns since 1970-01-01 UTC = ``clock.now_ns() + offset_ns``).
"""

from __future__ import annotations

from datetime import datetime, timezone

from ..errors import InvalidArgumentError
from .clock import Clock

__all__ = ["CmosRtc"]

NS = 1_000_000_000
#: UIP hold time: 8 cycles of the 32.768 kHz time base (QEMU UIP_HOLD_LENGTH).
UIP_HOLD_NS = 8 * NS // 32768

SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = 0, 1, 2, 3, 4, 5
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR = 6, 7, 8, 9
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32                 # ACPI FADT century index used by QEMU and SeaBIOS
IBM_PS2_CENTURY = 0x37         # alias QEMU redirects to 0x32

A_UIP = 0x80
B_SET, B_PIE, B_AIE, B_UIE, B_SQWE, B_DM, B_24H, B_DSE = 0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01
D_VRT = 0x80

DEFAULT_A = 0x26
DEFAULT_B = B_24H
DEFAULT_D = D_VRT
#: Default power-on wall time: 2000-01-01 00:00:00 UTC.
DEFAULT_START = 946_684_800

_TIME_REGS = frozenset((SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY))


def _days_from_civil(y: int, m: int, d: int) -> int:
    # QEMU util/cutils.c mktimegm(): arithmetic, so out-of-range fields normalise.
    if m < 3:
        m += 12
        y -= 1

    def cdiv(a: int, b: int) -> int:        # C division (truncates toward 0)
        q = abs(a) // b
        return q if a >= 0 else -q

    return d + cdiv(153 * m - 457, 5) + 365 * y + cdiv(y, 4) - cdiv(y, 100) + cdiv(y, 400) - 719469


def _civil_from_days(z: int) -> tuple[int, int, int]:
    # Inverse of the above for any day count (H. Hinnant's civil_from_days).
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m, d


class CmosRtc:
    """CMOS RAM and real-time clock (MC146818A) behind index/data ports.

    :param clock: time source (see :mod:`tdxve.devices.clock`).
    :param base: index port (data port is ``base + 1``; default 0x70).
    :param start: RTC time at clock time 0: a timezone-aware
        :class:`datetime.datetime` or Unix seconds (default 2000-01-01 UTC).
    :param nvram: optional initial contents for bytes 0x0E-0x7F (up to 114
        bytes, copied from offset 0x0E; the century byte 0x32 is then
        overwritten by the clock).
    :raises InvalidArgumentError: bad ``base``, ``start`` or ``nvram``.
    """

    def __init__(self, clock: Clock, *, base: int = 0x70, start: datetime | int | None = None,
                 nvram: bytes | None = None) -> None:
        if not callable(getattr(clock, "now_ns", None)):
            raise InvalidArgumentError(f"clock must have a now_ns() method, got {clock!r}")
        if type(base) is not int or not 0 <= base <= 0xFFFE:
            raise InvalidArgumentError(f"CMOS base must be an int in [0, 0xFFFE], got {base!r}")
        if start is None:
            start_s = DEFAULT_START
        elif isinstance(start, datetime):
            if start.tzinfo is None:
                raise InvalidArgumentError("start datetime must be timezone-aware (e.g. tzinfo=timezone.utc)")
            start_s = int(start.timestamp())
        elif type(start) is int:
            start_s = start
        else:
            raise InvalidArgumentError(f"start must be a datetime or Unix seconds, got {start!r}")
        if nvram is not None:
            if not isinstance(nvram, (bytes, bytearray)) or len(nvram) > 128 - 0x0E:
                raise InvalidArgumentError("nvram must be bytes of length <= 114 (offsets 0x0E-0x7F)")
        self.clock = clock
        self.base = base
        self._start_s = start_s
        self._nvram = bytes(nvram) if nvram is not None else b""
        self.data = bytearray(128)
        self.index = 0
        self.nmi_disabled = False
        self.offset_ns = 0
        self.reset()

    # ------------------------------------------------------------ state
    def reset(self) -> None:
        """Power-on state: status A/B/C/D defaults, RAM from ``nvram``, clock at ``start``."""
        d = self.data
        d[:] = bytes(128)
        d[0x0E:0x0E + len(self._nvram)] = self._nvram
        d[REG_A] = DEFAULT_A
        d[REG_B] = DEFAULT_B
        d[REG_C] = 0
        d[REG_D] = DEFAULT_D
        self.index = 0
        self.nmi_disabled = False
        self.offset_ns = self._start_s * NS - self.clock.now_ns()
        self._store_time(self._start_s)

    @property
    def running(self) -> bool:
        """The clock advances: SET clear and the divider not in reset (QEMU rtc_running)."""
        return not self.data[REG_B] & B_SET and (self.data[REG_A] & 0x70) <= 0x20

    def rtc_ns(self) -> int:
        """Current RTC time, ns since 1970-01-01 UTC (reads the clock)."""
        return self.clock.now_ns() + self.offset_ns

    def now(self) -> datetime:
        """The time the guest would read, as an aware datetime (years 1-9999).

        :raises InvalidArgumentError: the clock is outside what datetime represents.
        """
        s = self._time_from_bytes() if not self.running else self.rtc_ns() // NS
        y, mo, d = _civil_from_days(s // 86400)
        if not 1 <= y <= 9999:
            raise InvalidArgumentError(f"RTC year {y} is outside datetime's range")
        r = s % 86400
        return datetime(y, mo, d, r // 3600, r // 60 % 60, r % 60, tzinfo=timezone.utc)

    # ------------------------------------------------------------ encoding
    def _enc(self, v: int) -> int:
        return v if self.data[REG_B] & B_DM else ((v // 10) << 4 | v % 10) & 0xFF

    def _dec(self, v: int) -> int:
        return v if self.data[REG_B] & B_DM else (v >> 4) * 10 + (v & 0x0F)

    def _store_time(self, s: int) -> None:
        # QEMU rtc_set_cmos.
        d = self.data
        days, r = divmod(s, 86400)
        y, mo, dd = _civil_from_days(days)
        hour, minute, sec = r // 3600, r // 60 % 60, r % 60
        d[SECONDS] = self._enc(sec)
        d[MINUTES] = self._enc(minute)
        if d[REG_B] & B_24H:
            d[HOURS] = self._enc(hour)
        else:
            d[HOURS] = self._enc(hour % 12 or 12) | (0x80 if hour >= 12 else 0)
        d[DAY_OF_WEEK] = self._enc((days + 4) % 7 + 1)        # 1970-01-01 was a Thursday; Sunday = 1
        d[DAY_OF_MONTH] = self._enc(dd)
        d[MONTH] = self._enc(mo)
        d[YEAR] = self._enc(y % 100)
        d[CENTURY] = self._enc(y // 100 % 100)

    def _time_from_bytes(self) -> int:
        # QEMU rtc_get_time + mktimegm (day of week is ignored, as there).
        d = self.data
        hour = self._dec(d[HOURS] & 0x7F)
        if not d[REG_B] & B_24H:
            hour = hour % 12 + (12 if d[HOURS] & 0x80 else 0)
        year = self._dec(d[CENTURY]) * 100 + self._dec(d[YEAR])
        days = _days_from_civil(year, self._dec(d[MONTH]), self._dec(d[DAY_OF_MONTH]))
        return days * 86400 + hour * 3600 + self._dec(d[MINUTES]) * 60 + self._dec(d[SECONDS])

    def _restart(self, phase_ns: int, now_ns: int) -> None:
        # The clock continues from the stored bytes with the given sub-second phase.
        self.offset_ns = self._time_from_bytes() * NS + phase_ns - now_ns

    # ------------------------------------------------------------ bus interface
    def read(self, port: int, size: int) -> int:
        """0x70 reads 0xFF; 0x71 reads the selected byte."""
        if port == self.base:
            return 0xFF
        i = self.index
        if i == IBM_PS2_CENTURY:
            i = self.index = CENTURY
        d = self.data
        if i in _TIME_REGS:
            if self.running:
                self._store_time(self.rtc_ns() // NS)
            return d[i]
        if i == REG_A:
            uip = self.running and self.rtc_ns() % NS >= NS - UIP_HOLD_NS
            d[REG_A] = (d[REG_A] & 0x7F) | (A_UIP if uip else 0)
            return d[REG_A]
        if i == REG_C:
            v = d[REG_C]
            d[REG_C] = 0
            return v
        return d[i]

    def write(self, port: int, size: int, value: int) -> None:
        """0x70 selects the index (bit 7 = NMI mask); 0x71 writes the selected byte."""
        v = value & 0xFF
        if port == self.base:
            self.index = v & 0x7F
            self.nmi_disabled = bool(v & 0x80)
            return
        i = self.index
        if i == IBM_PS2_CENTURY:
            i = self.index = CENTURY
        d = self.data
        if i in _TIME_REGS:
            if self.running:
                now = self.clock.now_ns()
                t = now + self.offset_ns
                self._store_time(t // NS)       # the other fields as the guest would read them
                d[i] = v
                self._restart(t % NS, now)      # QEMU rtc_set_time keeps the divider phase
            else:
                d[i] = v
            return
        if i == REG_A or i == REG_B:
            self._write_control(i, v)
            return
        if i == REG_C or i == REG_D:
            return                                          # read-only
        d[i] = v

    def _write_control(self, reg: int, v: int) -> None:
        # Status A/B writes; the clock stops or restarts when SET or the divider change.
        d = self.data
        old_a = d[REG_A]
        was_running = self.running
        if reg == REG_A:
            new_a, new_b = v & 0x7F, d[REG_B]               # UIP is read-only
        else:
            new_a, new_b = old_a, (v & ~B_UIE & 0xFF) if v & B_SET else v   # SET clears UIE
        now_running = not new_b & B_SET and (new_a & 0x70) <= 0x20
        now = self.clock.now_ns()
        t = now + self.offset_ns
        if was_running and not now_running:
            self._store_time(t // NS)                      # freeze what the guest would have read
        d[REG_A] = new_a
        d[REG_B] = new_b
        if now_running and not was_running:
            # Leaving divider reset: first update half a second later; leaving SET: keep phase.
            phase = NS // 2 if (reg == REG_A and (old_a & 0x60) == 0x60) else t % NS
            self._restart(phase, now)

    def __repr__(self) -> str:
        return f"CmosRtc(index={self.index:#04x}, A={self.data[REG_A]:#04x}, B={self.data[REG_B]:#04x})"
