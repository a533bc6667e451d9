"""PortBus: registration, QEMU's unassigned-port rule, splitting, device errors (issue 4).

QEMU dispatch rules are anchors.md 2.3 (``system/ioport.c``: unassigned reads
-1 / writes dropped; ``access_with_adjusted_size`` splitting).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxve.errors import BusConfigError, DeviceError, InvalidArgumentError
from tdxve.host import EventLog, PortBus, PortDevice


class Recorder:
    """A device that records every call and serves reads from a byte array."""

    def __init__(self, first: int, n: int) -> None:
        self.first = first
        self.mem = bytearray(range(0x10, 0x10 + n))
        self.calls: list[tuple[str, int, int, int | None]] = []

    def read(self, port: int, size: int) -> int:
        self.calls.append(("r", port, size, None))
        off = port - self.first
        return int.from_bytes(self.mem[off:off + size], "little")

    def write(self, port: int, size: int, value: int) -> None:
        self.calls.append(("w", port, size, value))
        off = port - self.first
        self.mem[off:off + size] = value.to_bytes(size, "little")


class Boom:
    def __init__(self) -> None:
        self.n = 0

    def read(self, port: int, size: int) -> int:
        self.n += 1
        raise RuntimeError("device bug")

    def write(self, port: int, size: int, value: int) -> None:
        self.n += 1
        raise RuntimeError("device bug")


# ---------------------------------------------------------------- registration
def test_register_and_lookup() -> None:
    bus = PortBus()
    dev = Recorder(0x100, 4)
    bus.register(0x100, 4, dev, sizes=(1, 2), name="rec")
    r = bus.lookup(0x103)
    assert r is not None and (r.first, r.nports, r.device, r.sizes, r.name) == (0x100, 4, dev, (1, 2), "rec")
    assert bus.lookup(0x104) is None and bus.name_of(0x101) == "rec" and bus.name_of(0xFF) is None
    assert [x.first for x in bus.ranges()] == [0x100]
    assert isinstance(dev, PortDevice)


@pytest.mark.parametrize("first,count", [(0x0FE, 3), (0x103, 1), (0x0F0, 0x20), (0x101, 2)])
def test_overlap_is_an_error(first: int, count: int) -> None:
    bus = PortBus()
    bus.register(0x100, 4, Recorder(0x100, 4), name="a")
    with pytest.raises(BusConfigError, match="overlap a"):
        bus.register(first, count, Recorder(first, count))
    # the failed registration left nothing behind
    assert bus.lookup(first if first < 0x100 else 0x104) is None


@pytest.mark.parametrize("args,kw", [
    ((-1, 1), {}), ((0x10000, 1), {}), ((0xFFFF, 2), {}), ((0, 0), {}), ((0, 1), {"sizes": ()}),
    ((0, 1), {"sizes": (3,)}), ((0, 1), {"sizes": (8,)}), ((0, 1), {"sizes": 5}),
    ((0, 1), {"name": "two words"}), (("0x10", 1), {}),
])
def test_bad_registration(args: tuple[object, object], kw: dict[str, object]) -> None:
    with pytest.raises(BusConfigError):
        PortBus().register(*args, Recorder(0, 2), **kw)  # type: ignore[arg-type]


def test_device_without_methods_rejected() -> None:
    with pytest.raises(BusConfigError, match="read"):
        PortBus().register(0x10, 1, object())  # type: ignore[arg-type]


def test_unregister() -> None:
    bus = PortBus()
    dev = Recorder(0x200, 2)
    bus.register(0x200, 2, dev)
    with pytest.raises(BusConfigError):
        bus.unregister(0x201)          # not the start of the range
    assert bus.unregister(0x200) is dev
    assert bus.read(0x200, 1) == 0xFF
    bus.register(0x200, 1, dev)        # the ports are free again


def test_bad_policy() -> None:
    with pytest.raises(InvalidArgumentError):
        PortBus(on_device_error="ignore")


# ---------------------------------------------------------------- unassigned ports (QEMU rule)
@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)])
def test_unassigned_reads_all_ones(size: int, ones: int) -> None:
    bus = PortBus()
    assert bus.read(0x1234, size) == ones
    bus.write(0x1234, size, 0)         # dropped, no error
    assert bus.unassigned == 2


def test_direct_access_argument_checks() -> None:
    bus = PortBus()
    for port in (-1, 0x10000, 1.0, None):
        with pytest.raises(InvalidArgumentError):
            bus.read(port, 1)  # type: ignore[arg-type]
    for size in (0, 3, 8, True):
        with pytest.raises(InvalidArgumentError):
            bus.read(0x80, size)
    for value in (-1, 0x100, "1"):
        with pytest.raises(InvalidArgumentError):
            bus.write(0x80, 1, value)  # type: ignore[arg-type]


# ---------------------------------------------------------------- splitting
def test_accepted_access_is_one_call() -> None:
    bus = PortBus()
    dev = Recorder(0x100, 4)
    bus.register(0x100, 4, dev, sizes=(1, 2, 4))
    assert bus.read(0x100, 4) == 0x13121110
    bus.write(0x101, 2, 0xBEEF)
    assert dev.calls == [("r", 0x100, 4, None), ("w", 0x101, 2, 0xBEEF)]
    assert bus.splits == 0


def test_wide_access_to_byte_device_is_split_little_endian() -> None:
    """A 4-byte IN on a byte-only device = four byte reads, assembled little-endian (QEMU impl.max=1)."""
    bus = PortBus()
    dev = Recorder(0x3F8, 8)
    bus.register(0x3F8, 8, dev, sizes=(1,))
    assert bus.read(0x3F9, 4) == 0x14131211
    assert dev.calls == [("r", 0x3F9, 1, None), ("r", 0x3FA, 1, None), ("r", 0x3FB, 1, None),
                         ("r", 0x3FC, 1, None)]
    dev.calls.clear()
    bus.write(0x3F8, 2, 0xA55A)
    assert dev.calls == [("w", 0x3F8, 1, 0x5A), ("w", 0x3F9, 1, 0xA5)]
    assert bus.splits == 2 and bus.unassigned == 0


def test_split_uses_largest_accepted_size() -> None:
    bus = PortBus()
    dev = Recorder(0x10, 4)
    bus.register(0x10, 4, dev, sizes=(1, 2))
    bus.write(0x10, 4, 0x44332211)
    assert dev.calls == [("w", 0x10, 2, 0x2211), ("w", 0x12, 2, 0x4433)]


def test_straddling_two_devices() -> None:
    bus = PortBus()
    a, b = Recorder(0x10, 2), Recorder(0x12, 2)
    bus.register(0x10, 2, a, sizes=(1, 2))
    bus.register(0x12, 2, b, sizes=(1, 2, 4))
    assert bus.read(0x11, 2) == (b.mem[0] << 8) | a.mem[1]
    assert a.calls == [("r", 0x11, 1, None)] and b.calls == [("r", 0x12, 1, None)]
    bus.write(0x10, 4, 0xDDCCBBAA)
    assert a.calls[-1] == ("w", 0x10, 2, 0xBBAA) and b.calls[-1] == ("w", 0x12, 2, 0xDDCC)


def test_straddling_into_unassigned_space() -> None:
    bus = PortBus()
    dev = Recorder(0xCFC, 4)
    bus.register(0xCFC, 4, dev, sizes=(1, 2, 4))
    assert bus.read(0xCFE, 4) == 0xFFFF0000 | 0x1312
    assert dev.calls == [("r", 0xCFE, 2, None)]
    assert bus.unassigned == 1


def test_size_no_piece_fits_reads_ones() -> None:
    """A byte read of a dword-only register reaches no device (like QEMU's valid.min_access_size)."""
    bus = PortBus()
    dev = Recorder(0x608, 4)
    bus.register(0x608, 4, dev, sizes=(4,))
    assert bus.read(0x608, 1) == 0xFF
    assert bus.read(0x608, 2) == 0xFFFF
    bus.write(0x609, 1, 0x12)
    assert dev.calls == []
    assert bus.read(0x608, 4) == 0x13121110


def test_no_wrap_past_ffff() -> None:
    bus = PortBus()
    low = Recorder(0, 4)
    high = Recorder(0xFFFF, 1)
    bus.register(0, 4, low)
    bus.register(0xFFFF, 1, high, sizes=(1,))
    assert bus.read(0xFFFF, 4) == 0xFFFFFF10       # bytes past 0xFFFF are not port 0
    assert low.calls == []


def test_device_value_masked_to_width_and_type_checked() -> None:
    class Wide:
        def read(self, port: int, size: int) -> object:
            return 0x1234_5678_9ABC if port == 0 else "x"

        def write(self, port: int, size: int, value: int) -> None:
            pass

    bus = PortBus(on_device_error="record")
    bus.register(0, 2, Wide())  # type: ignore[arg-type]
    assert bus.read(0, 2) == 0x9ABC
    assert bus.read(1, 1) == 0xFF
    assert bus.error_count == 1 and isinstance(bus.device_errors[0].exception, TypeError)


@settings(max_examples=200, deadline=None)
@given(port=st.integers(0x0FC, 0x10A), size=st.sampled_from([1, 2, 4]), value=st.integers(0, 0xFFFFFFFF))
def test_split_write_then_read_round_trips_on_memory_devices(port: int, size: int, value: int) -> None:
    """Property: on RAM-like devices every byte lands at its own port; unassigned bytes read 0xFF."""
    bus = PortBus()
    a, b = Recorder(0x100, 3), Recorder(0x104, 2)
    bus.register(0x100, 3, a, sizes=(1,))
    bus.register(0x104, 2, b, sizes=(2,))
    value &= (1 << (8 * size)) - 1
    bus.write(port, size, value)
    got = bus.read(port, size)
    for k in range(size):
        p = port + k
        byte = (got >> (8 * k)) & 0xFF
        if 0x100 <= p < 0x103:
            assert byte == (value >> (8 * k)) & 0xFF
        elif p in (0x104, 0x105) and port <= 0x104 and port + size >= 0x106:
            assert byte == (value >> (8 * k)) & 0xFF       # the 2-byte device got a whole word
        elif not 0x104 <= p <= 0x105:
            assert byte == 0xFF


# ---------------------------------------------------------------- device errors
def test_device_error_raise_policy_keeps_bus_consistent() -> None:
    bus = PortBus()
    boom, ok = Boom(), Recorder(0x11, 1)
    bus.register(0x10, 1, boom, name="boom")
    bus.register(0x11, 1, ok, sizes=(1,))
    with pytest.raises(DeviceError, match="boom raised RuntimeError") as ei:
        bus.read(0x10, 1)
    assert isinstance(ei.value.__cause__, RuntimeError)
    rec = bus.device_errors[-1]
    assert (rec.port, rec.size, rec.is_write, rec.value, rec.name) == (0x10, 1, False, None, "boom")
    # the bus still works, including the neighbour
    assert bus.read(0x11, 1) == 0x10
    with pytest.raises(DeviceError, match="1-byte write of 0x34 at port 0x10"):
        bus.write(0x10, 2, 0x1234)    # split: boom fails first, neighbour not reached
    assert ok.calls == [("r", 0x11, 1, None)]
    assert bus.error_count == 2


def test_device_error_record_policy() -> None:
    bus = PortBus(on_device_error="record")
    boom, ok = Boom(), Recorder(0x11, 1)
    bus.register(0x10, 1, boom)
    bus.register(0x11, 1, ok, sizes=(1,))
    assert bus.read(0x10, 2) == 0x10FF          # failing piece reads as all-ones, the rest proceeds
    bus.write(0x10, 2, 0xAB00)
    assert ok.mem[0] == 0xAB
    assert bus.error_count == 2 and len(bus.device_errors) == 2


def test_keyboard_interrupt_is_not_swallowed() -> None:
    class Stop:
        def read(self, port: int, size: int) -> int:
            raise KeyboardInterrupt

        def write(self, port: int, size: int, value: int) -> None:
            pass

    bus = PortBus(on_device_error="record")
    bus.register(0, 1, Stop())
    with pytest.raises(KeyboardInterrupt):
        bus.read(0, 1)


# ---------------------------------------------------------------- direct-access counters and log
def test_direct_access_stats_and_log() -> None:
    bus = PortBus(on_device_error="record")
    bus.log = EventLog(8)
    bus.register(0x80, 1, Recorder(0x80, 1), sizes=(1,))
    bus.register(0x10, 1, Boom())
    bus.write(0x80, 1, 0x12)
    bus.read(0x80, 2)
    bus.read(0x10, 1)
    assert bus.stats[0x80] == (1, 1, 2, 1)
    assert bus.stats.reads == 2 and bus.stats.writes == 1 and bus.stats.bytes == 4
    ev = bus.log.events
    assert [(e.source, e.arg, e.size, e.direction, e.value, e.status, e.fault) for e in ev] == [
        ("direct", 0x80, 1, 1, 0x12, -1, ""),
        ("direct", 0x80, 2, 0, 0xFF12, -1, ""),
        ("direct", 0x10, 1, 0, 0xFF, -1, "device_error"),
    ]
