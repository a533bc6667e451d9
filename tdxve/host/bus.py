"""The I/O port bus: 65536 ports, devices on ranges, QEMU's dispatch rules.

Rules (QEMU ``system/ioport.c`` and ``docs/devel/memory.rst``; anchors 2.3):

* A device is registered on ``[first_port, first_port + count)`` with the
  access sizes it accepts (a subset of 1, 2, 4). Ranges may not overlap.
* **Unassigned ports** read as all-ones at the access width
  (``unassigned_io_ops``: -1) and writes to them are dropped.
* **Accepted access**: when the whole access lies inside one device's range
  and the device accepts its size, the device gets exactly that one call.
* **Everything else is split** (QEMU ``access_with_adjusted_size`` and
  ``flatview_read/write_continue``): the access is cut at range boundaries
  and each piece is served, lowest port first, with the largest size the
  device accepts that fits in the piece (so a 2-byte access to a byte-only
  UART register becomes two 1-byte accesses at ``port`` and ``port + 1``).
  Read pieces are assembled little-endian; a write piece gets the matching
  bytes of the value. Bytes of a piece that no accepted size fits (a byte
  read of a dword-only register), bytes on unassigned ports and bytes past
  port 0xFFFF (the port space does not wrap) read as 0xFF and are dropped on
  write. ``bus.splits`` counts accesses served in pieces, ``bus.unassigned``
  accesses that touched at least one byte no device served.
* **Unassigned reply** (for trace replay, issue 6): with
  ``bus.unassigned_reply`` set to an int, every byte no device serves reads
  as the byte of that value at the same offset of the access (byte ``k`` of
  an access is ``(unassigned_reply >> 8*k) & 0xFF``) instead of 0xFF; writes
  are still dropped. ``None`` (default) is QEMU's all-ones.
* **Device values**: a device's ``read`` must return an int; only the low
  ``size`` bytes are used (as KVM's and QEMU's PIO layers copy ``size``
  bytes). Anything that is not an int is a device error.
* **Device errors**: an exception raised by a device (or a non-int read
  value) is recorded in ``bus.device_errors`` (the last 1024, with
  ``bus.error_count`` counting all) and the failing piece reads as all-ones /
  is dropped, so the bus itself is never left half-way. Then, with
  ``on_device_error="raise"`` (default) a :class:`tdxve.errors.DeviceError`
  is raised (the device's exception as ``__cause__``); pieces of a split
  access before the failing one have taken effect, later ones have not run.
  With ``on_device_error="record"`` the access completes and returns.
  :class:`tdxve.Host` turns a device error into TDVMCALL status
  INVALID_OPERAND for the guest (see its docstring).

Devices receive absolute port numbers: ``device.read(port, size)``,
``device.write(port, size, value)``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ..errors import BusConfigError, DeviceError, InvalidArgumentError
from .log import EventLog
from .stats import PortStats

__all__ = ["PortBus", "PortDevice", "PortRange", "DeviceErrorRecord", "DEVICE_ERROR_POLICIES"]

_MASK = (0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFF)
DEVICE_ERROR_POLICIES = ("raise", "record")
MAX_KEPT_DEVICE_ERRORS = 1024


@runtime_checkable
class PortDevice(Protocol):
    """A port-I/O device: any object with these two methods."""

    def read(self, port: int, size: int) -> int:
        """Value read from ``port`` (an access of ``size`` bytes)."""
        ...

    def write(self, port: int, size: int, value: int) -> None:
        """Write ``value`` (``size`` bytes) to ``port``."""
        ...


class PortRange(NamedTuple):
    """One registration on the bus."""

    first: int
    nports: int
    device: PortDevice
    sizes: tuple[int, ...]
    name: str


class DeviceErrorRecord(NamedTuple):
    """A device access that raised (or returned a non-int)."""

    port: int
    size: int
    is_write: bool
    value: int | None
    name: str
    exception: BaseException


class _Slot:
    __slots__ = ("first", "last", "device", "sizes", "sizemask", "read", "write", "name")

    def __init__(self, first: int, count: int, device: Any, sizes: tuple[int, ...], name: str) -> None:
        self.first = first
        self.last = first + count - 1
        self.device = device
        self.sizes = sizes
        self.sizemask = sum(1 << s for s in sizes)
        self.read = device.read
        self.write = device.write
        self.name = name


class PortBus:
    """The 16-bit I/O port space with registered devices (rules in the module docstring).

    :param on_device_error: ``"raise"`` (default) or ``"record"``.
    :raises InvalidArgumentError: unknown policy.
    """

    def __init__(self, *, on_device_error: str = "raise") -> None:
        if on_device_error not in DEVICE_ERROR_POLICIES:
            raise InvalidArgumentError(
                f"on_device_error must be one of {DEVICE_ERROR_POLICIES}, got {on_device_error!r}")
        self.on_device_error = on_device_error
        self._slots: list[_Slot | None] = [None] * 0x10000
        self._ranges: list[_Slot] = []
        #: The most recent device errors (oldest dropped after 1024).
        self.device_errors: deque[DeviceErrorRecord] = deque(maxlen=MAX_KEPT_DEVICE_ERRORS)
        #: Every device error since creation.
        self.error_count = 0
        #: Accesses the bus had to split or partially refuse.
        self.splits = 0
        #: Accesses that touched at least one byte no device served.
        self.unassigned = 0
        #: Counters of direct accesses (:meth:`read`/:meth:`write`).
        self.stats = PortStats()
        #: Event log for direct accesses (shared with the Host when it owns the bus).
        self.log: EventLog | None = None
        self._unassigned_reply: int | None = None

    @property
    def unassigned_reply(self) -> int | None:
        """What bytes no device serves read as: None = all-ones (QEMU), or an
        int in ``[0, 2**64)`` whose byte ``k`` answers byte ``k`` of the
        access (module docstring). Writes to such bytes are dropped either way.

        :raises InvalidArgumentError: (setter) neither None nor such an int.
        """
        return self._unassigned_reply

    @unassigned_reply.setter
    def unassigned_reply(self, value: int | None) -> None:
        if value is not None and (type(value) is not int or not 0 <= value < 1 << 64):
            raise InvalidArgumentError(f"unassigned_reply must be None or an int in [0, 2**64), got {value!r}")
        self._unassigned_reply = value

    # ------------------------------------------------------------ configuration
    def register(self, first_port: int, count: int, device: PortDevice, *,
                 sizes: tuple[int, ...] = (1, 2, 4), name: str | None = None) -> None:
        """Put ``device`` on ports ``first_port`` .. ``first_port + count - 1``.

        :param sizes: access sizes the device accepts (non-empty subset of 1, 2, 4).
        :param name: label for tables and error messages (default: the class name).
        :raises BusConfigError: bad port range, bad sizes, a device without
            ``read``/``write``, or an overlap with an existing range.
        """
        if type(first_port) is not int or not 0 <= first_port <= 0xFFFF:
            raise BusConfigError(f"first_port must be an int in [0, 0xFFFF], got {first_port!r}")
        if type(count) is not int or count < 1 or first_port + count > 0x10000:
            raise BusConfigError(f"count must be an int >= 1 ending at or below port 0xFFFF, "
                                 f"got {count!r} from {first_port:#x}")
        try:
            sz = tuple(sorted(set(sizes)))
        except TypeError:
            raise BusConfigError(f"sizes must be an iterable of 1, 2, 4, got {sizes!r}") from None
        if not sz or any(type(s) is not int or s not in (1, 2, 4) for s in sz):
            raise BusConfigError(f"sizes must be a non-empty subset of (1, 2, 4), got {sizes!r}")
        if not callable(getattr(device, "read", None)) or not callable(getattr(device, "write", None)):
            raise BusConfigError(f"device {device!r} needs callable read(port, size) and write(port, size, value)")
        if name is not None and (not isinstance(name, str) or not name or any(c.isspace() for c in name)):
            raise BusConfigError(f"name must be a non-empty str without whitespace, got {name!r}")
        for p in range(first_port, first_port + count):
            other = self._slots[p]
            if other is not None:
                raise BusConfigError(
                    f"ports {first_port:#x}-{first_port + count - 1:#x} overlap {other.name} at "
                    f"{other.first:#x}-{other.last:#x} (port {p:#x})")
        slot = _Slot(first_port, count, device, sz, name or type(device).__name__)
        for p in range(first_port, first_port + count):
            self._slots[p] = slot
        self._ranges.append(slot)
        self._ranges.sort(key=lambda s: s.first)

    def unregister(self, first_port: int) -> PortDevice:
        """Remove the range that starts at ``first_port`` and return its device.

        :raises BusConfigError: no range starts there.
        """
        slot = self._slots[first_port] if type(first_port) is int and 0 <= first_port <= 0xFFFF else None
        if slot is None or slot.first != first_port:
            raise BusConfigError(f"no device range starts at port {first_port!r}")
        for p in range(slot.first, slot.last + 1):
            self._slots[p] = None
        self._ranges.remove(slot)
        return slot.device  # type: ignore[no-any-return]

    def lookup(self, port: int) -> PortRange | None:
        """The registration covering ``port``, or None when unassigned.

        :raises InvalidArgumentError: ``port`` is not in [0, 0xFFFF].
        """
        _check_port(port)
        s = self._slots[port]
        return None if s is None else PortRange(s.first, s.last - s.first + 1, s.device, s.sizes, s.name)

    def ranges(self) -> list[PortRange]:
        """Every registration, ascending by first port."""
        return [PortRange(s.first, s.last - s.first + 1, s.device, s.sizes, s.name) for s in self._ranges]

    def name_of(self, port: int) -> str | None:
        """Name of the device at ``port`` (None when unassigned).

        :raises InvalidArgumentError: ``port`` is not in [0, 0xFFFF].
        """
        _check_port(port)
        s = self._slots[port]
        return None if s is None else s.name

    # ------------------------------------------------------------ direct access (no #VE)
    def read(self, port: int, size: int) -> int:
        """Read ``size`` bytes at ``port`` (counted in :attr:`stats`, logged as ``direct``).

        :raises InvalidArgumentError: ``port`` not in [0, 0xFFFF] or ``size`` not 1, 2, 4.
        :raises DeviceError: a device raised and the policy is ``"raise"``.
        """
        _check_port(port)
        _check_size(size)
        self.stats.add_read(port, size)
        log = self.log
        n = self.error_count
        v = -1
        try:
            v = self._read(port, size)
            return v
        finally:
            if log is not None:
                log.record("direct", "io", -1, port, size, 0, v, -1,
                           "device_error" if self.error_count != n else "")

    def write(self, port: int, size: int, value: int) -> None:
        """Write ``value`` (``size`` bytes) at ``port`` (counted, logged as ``direct``).

        :raises InvalidArgumentError: bad port or size, or ``value`` is not an
            int in ``[0, 2**(8*size))``.
        :raises DeviceError: a device raised and the policy is ``"raise"``.
        """
        _check_port(port)
        _check_size(size)
        if type(value) is not int or not 0 <= value <= _MASK[size]:
            raise InvalidArgumentError(f"value for a {size}-byte write must be an int in "
                                       f"[0, {_MASK[size]:#x}], got {value!r}")
        self.stats.add_write(port, size)
        log = self.log
        n = self.error_count
        try:
            self._write(port, size, value)
        finally:
            if log is not None:
                log.record("direct", "io", -1, port, size, 1, value, -1,
                           "device_error" if self.error_count != n else "")

    # ------------------------------------------------------------ dispatch (used by Host)
    def _read(self, port: int, size: int) -> int:
        # Caller guarantees 0 <= port <= 0xFFFF and size in (1, 2, 4).
        s = self._slots[port]
        if s is not None and port + size - 1 <= s.last and s.sizemask >> size & 1:
            try:
                v = s.read(port, size)
            except Exception as exc:
                return self._failed(s, port, size, None, exc)
            if type(v) is not int:
                return self._bad_value(s, port, size, v)
            return v & _MASK[size]
        if s is None and self._all_unassigned(port, size):
            self.unassigned += 1
            r = self._unassigned_reply
            return _MASK[size] if r is None else r & _MASK[size]
        return self._read_split(port, size)

    def _write(self, port: int, size: int, value: int) -> None:
        s = self._slots[port]
        if s is not None and port + size - 1 <= s.last and s.sizemask >> size & 1:
            try:
                s.write(port, size, value)
            except Exception as exc:
                self._failed(s, port, size, value, exc)
            return
        if s is None and self._all_unassigned(port, size):
            self.unassigned += 1
            return
        self._write_split(port, size, value)

    def _all_unassigned(self, port: int, size: int) -> bool:
        # The common probe of an absent device: no byte of the access has a device.
        if size == 1:
            return True
        sl = self._slots
        if port + size > 0x10000 or sl[port + 1] is not None:
            return False
        return size == 2 or (sl[port + 2] is None and sl[port + 3] is None)

    def _pieces(self, port: int, size: int) -> list[tuple[int, int, _Slot | None]]:
        # (offset, length, slot or None for "nobody") covering the access, lowest port first.
        out: list[tuple[int, int, _Slot | None]] = []
        i = 0
        while i < size:
            p = port + i
            s = self._slots[p] if p <= 0xFFFF else None
            if s is None:
                out.append((i, 1, None))
                i += 1
                continue
            room = min(size - i, s.last - p + 1)
            n = 4 if room >= 4 and s.sizemask & 16 else 2 if room >= 2 and s.sizemask & 4 else \
                1 if s.sizemask & 2 else 0
            if n == 0:
                out.append((i, 1, None))
                i += 1
            else:
                out.append((i, n, s))
                i += n
        return out

    def _read_split(self, port: int, size: int) -> int:
        self.splits += 1
        value = 0
        missed = False
        reply = self._unassigned_reply
        for off, n, s in self._pieces(port, size):
            if s is None:
                v = 0xFF if reply is None else (reply >> (8 * off)) & 0xFF
                missed = True
            else:
                try:
                    v = s.read(port + off, n)
                except Exception as exc:
                    v = self._failed(s, port + off, n, None, exc)
                else:
                    v = v & _MASK[n] if type(v) is int else self._bad_value(s, port + off, n, v)
            value |= v << (8 * off)
        if missed:
            self.unassigned += 1
        return value

    def _write_split(self, port: int, size: int, value: int) -> None:
        self.splits += 1
        missed = False
        for off, n, s in self._pieces(port, size):
            if s is None:
                missed = True
                continue
            v = (value >> (8 * off)) & _MASK[n]
            try:
                s.write(port + off, n, v)
            except Exception as exc:
                self._failed(s, port + off, n, v, exc)
        if missed:
            self.unassigned += 1

    # ------------------------------------------------------------ device errors
    def _failed(self, s: _Slot, port: int, size: int, value: int | None, exc: BaseException) -> int:
        self.error_count += 1
        self.device_errors.append(DeviceErrorRecord(port, size, value is not None, value, s.name, exc))
        if self.on_device_error == "raise":
            what = f"write of {value:#x}" if value is not None else "read"
            raise DeviceError(f"device {s.name} raised {type(exc).__name__} on a {size}-byte {what} "
                              f"at port {port:#x}: {exc}") from exc
        return _MASK[size]

    def _bad_value(self, s: _Slot, port: int, size: int, v: object) -> int:
        exc = TypeError(f"read() returned {type(v).__name__} {v!r}, expected int")
        return self._failed(s, port, size, None, exc)

    def __repr__(self) -> str:
        return "PortBus(" + ", ".join(f"{s.name}@{s.first:#x}-{s.last:#x}" for s in self._ranges) + ")"


def _check_port(port: object) -> None:
    if type(port) is not int or not 0 <= port <= 0xFFFF:
        raise InvalidArgumentError(f"port must be an int in [0, 0xFFFF], got {port!r}")


def _check_size(size: object) -> None:
    if type(size) is not int or size not in (1, 2, 4):
        raise InvalidArgumentError(f"access size must be 1, 2 or 4, got {size!r}")
