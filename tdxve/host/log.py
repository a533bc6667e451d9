"""A bounded event log of what the host served, with a small text format.

One event per TDVMCALL served by :class:`tdxve.Host` (``source`` =
``"tdvmcall"``) and per direct :class:`tdxve.PortBus` access
(``source`` = ``"direct"``: firmware modes, no #VE). The log keeps the last
``capacity`` events; older ones are dropped and counted.

Event fields (:class:`Event`):

==========  ===============================================================
seq          running number of the event (never reused, survives drops)
source       ``tdvmcall`` or ``direct``
call         ``io``, ``cpuid``, ``hlt``, ``rdmsr``, ``wrmsr``,
             ``get_td_vm_call_info``, ``report_fatal_error``, ``vmm``
             (R10 != 0), ``user`` (a handler registered with
             ``Host.set_handler``) or ``unsupported``
subfn        R11 sub-function of a standard call, R10 of a VMM call, -1 direct
arg          io: port (16-bit when valid, raw R14 when the call was rejected);
             cpuid: leaf; rdmsr/wrmsr: MSR index; hlt: R12 (interrupts
             blocked); get_td_vm_call_info: R12 leaf; report_fatal_error:
             R12; vmm: R11; otherwise R12
size         io: access size (raw R12); -1 otherwise
direction    io: 0 = IN, 1 = OUT (raw R13); -1 otherwise
value        io: byte(s) written or read; cpuid: subleaf; rdmsr: value read;
             wrmsr: value written; -1 when none
status       R10 after the call (-1 for direct accesses)
fault        ``""``, a :class:`tdxve.host.FaultKind` value when
             :class:`tdxve.FaultyHost` injected one, or ``device_error``
==========  ===============================================================

Text format (``save``/``load``/``dumps``/``loads``), UTF-8, one event per
line, fields separated by single spaces in the order above; integers other
than ``seq`` in hexadecimal with ``0x``; ``-`` stands for -1 and for an
empty ``fault``. Lines starting with ``#`` are comments, except the header::

    # tdxve host event log v1
    # capacity=65536 dropped=0 next_seq=3
    # seq source call subfn arg size direction value status fault
    0 tdvmcall io 0x1e 0x3f8 0x1 0x1 0x41 0x0 -
    1 tdvmcall io 0x1e 0x3fd 0x1 0x0 0x60 0x0 -
    2 direct io - 0x80 0x1 0x1 0x12 - -

Saving and loading round-trips every field, the capacity and the drop count.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Iterator, NamedTuple

from ..errors import InvalidArgumentError

__all__ = ["Event", "EventLog", "LOG_FORMAT_HEADER"]

LOG_FORMAT_HEADER = "# tdxve host event log v1"
_COLUMNS = "# seq source call subfn arg size direction value status fault"
DEFAULT_CAPACITY = 65536


class Event(NamedTuple):
    """One logged host event (see the module docstring for the fields)."""

    seq: int
    source: str
    call: str
    subfn: int
    arg: int
    size: int
    direction: int
    value: int
    status: int
    fault: str


def _hex(v: int) -> str:
    return "-" if v == -1 else hex(v)


def _int(tok: str, lineno: int) -> int:
    if tok == "-":
        return -1
    try:
        v = int(tok, 16) if tok.startswith("0x") else int(tok)
    except ValueError:
        raise InvalidArgumentError(f"event log line {lineno}: {tok!r} is not an integer") from None
    if v < 0:
        raise InvalidArgumentError(f"event log line {lineno}: negative value {tok!r}")
    return v


class EventLog:
    """The last ``capacity`` host events.

    :param capacity: maximum number of events kept (>= 1).
    :raises InvalidArgumentError: ``capacity`` is not a positive int.
    """

    __slots__ = ("capacity", "dropped", "_events", "_seq")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if type(capacity) is not int or capacity < 1:
            raise InvalidArgumentError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        #: Events discarded because the log was full.
        self.dropped = 0
        self._events: deque[tuple[int, str, str, int, int, int, int, int, int, str]] = deque(maxlen=capacity)
        self._seq = 0

    def record(self, source: str, call: str, subfn: int, arg: int, size: int, direction: int,
               value: int, status: int, fault: str = "") -> None:
        """Append one event (``-1`` for fields that do not apply)."""
        ev = self._events
        if len(ev) == self.capacity:
            self.dropped += 1
        ev.append((self._seq, source, call, subfn, arg, size, direction, value, status, fault))
        self._seq += 1

    @property
    def next_seq(self) -> int:
        """The sequence number the next event will get."""
        return self._seq

    @property
    def events(self) -> list[Event]:
        """The kept events, oldest first."""
        return [Event(*e) for e in self._events]

    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[Event]:
        return (Event(*e) for e in self._events)

    def clear(self) -> None:
        """Drop every event and reset the counters (sequence numbers restart at 0)."""
        self._events.clear()
        self.dropped = 0
        self._seq = 0

    # ------------------------------------------------------------ text format
    def dumps(self) -> str:
        """The log in the text format (module docstring)."""
        lines = [LOG_FORMAT_HEADER,
                 f"# capacity={self.capacity} dropped={self.dropped} next_seq={self._seq}",
                 _COLUMNS]
        for seq, source, call, subfn, arg, size, direction, value, status, fault in self._events:
            lines.append(f"{seq} {source} {call} {_hex(subfn)} {_hex(arg)} {_hex(size)} "
                         f"{_hex(direction)} {_hex(value)} {_hex(status)} {fault or '-'}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`dumps` to ``path``.

        :raises OSError: the file cannot be written.
        """
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(self.dumps())

    @classmethod
    def loads(cls, text: str) -> EventLog:
        """Parse the text format.

        :raises InvalidArgumentError: missing header, malformed line, or more
            events than the declared capacity.
        """
        if not isinstance(text, str):
            raise InvalidArgumentError(f"loads() needs a str, got {type(text).__name__}")
        lines = text.splitlines()
        if not lines or lines[0].strip() != LOG_FORMAT_HEADER:
            raise InvalidArgumentError(f"not a tdxve event log: first line must be {LOG_FORMAT_HEADER!r}")
        meta: dict[str, int] = {}
        if len(lines) > 1 and lines[1].startswith("# capacity="):
            for item in lines[1][2:].split():
                key, _, val = item.partition("=")
                meta[key] = _int(val, 2)
        log = cls(meta.get("capacity", DEFAULT_CAPACITY))
        last_seq = -1
        for lineno, line in enumerate(lines[1:], start=2):
            if not line.strip() or line.startswith("#"):
                continue
            tok = line.split()
            if len(tok) != 10:
                raise InvalidArgumentError(f"event log line {lineno}: expected 10 fields, got {len(tok)}")
            seq = _int(tok[0], lineno)
            if seq <= last_seq:
                raise InvalidArgumentError(f"event log line {lineno}: sequence {seq} not increasing")
            last_seq = seq
            if len(log._events) == log.capacity:
                raise InvalidArgumentError(f"event log line {lineno}: more events than capacity {log.capacity}")
            log._events.append((seq, tok[1], tok[2], _int(tok[3], lineno), _int(tok[4], lineno),
                                _int(tok[5], lineno), _int(tok[6], lineno), _int(tok[7], lineno),
                                _int(tok[8], lineno), "" if tok[9] == "-" else tok[9]))
        log.dropped = meta.get("dropped", 0)
        log._seq = meta.get("next_seq", last_seq + 1)
        if log._seq <= last_seq:
            raise InvalidArgumentError(f"event log header next_seq={log._seq} is not after the last event {last_seq}")
        return log

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EventLog:
        """Read a log written by :meth:`save`.

        :raises OSError: the file cannot be read.
        :raises InvalidArgumentError: the content is not a valid log.
        """
        with open(path, encoding="utf-8") as f:
            return cls.loads(f.read())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EventLog):
            return NotImplemented
        return (self.capacity == other.capacity and self.dropped == other.dropped
                and self._seq == other._seq and list(self._events) == list(other._events))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"EventLog({len(self._events)}/{self.capacity} events, dropped={self.dropped})"
