"""The PortBus hook replay needs: ``unassigned_reply`` (issue 6).

QEMU answers all-ones for bytes no device serves (anchors 2.3); a trace
replay answers what the trace recorded instead. Byte k of an access reads
byte k of the reply, both for an access that touches no device and for the
unserved pieces of a split access.
"""

from __future__ import annotations

import pytest

from tdxve.errors import InvalidArgumentError
from tdxve.host import PortBus
from tdxve.replay import LatchDevice


def test_default_is_qemu_all_ones():
    bus = PortBus()
    assert bus.unassigned_reply is None
    assert bus.read(0x1234, 1) == 0xFF and bus.read(0x1234, 2) == 0xFFFF and bus.read(0x1234, 4) == 0xFFFFFFFF


def test_all_unassigned_access_reads_the_reply_at_the_access_width():
    bus = PortBus()
    bus.unassigned_reply = 0x1122334455
    assert bus.read(0x1234, 1) == 0x55
    assert bus.read(0x1234, 2) == 0x4455
    assert bus.read(0x1234, 4) == 0x22334455
    assert bus.unassigned == 3
    bus.write(0x1234, 4, 0xDEADBEEF)            # still dropped
    assert bus.read(0x1234, 4) == 0x22334455


def test_split_access_takes_unserved_bytes_from_the_reply():
    bus = PortBus()
    bus.register(0x81, 1, LatchDevice(0xAB), sizes=(1,))
    bus.unassigned_reply = 0x44332211
    # bytes 0x80 (none), 0x81 (latch), 0x82, 0x83 (none): offsets 0, 2, 3 from the reply
    assert bus.read(0x80, 4) == 0x4433AB11
    assert bus.splits == 1 and bus.unassigned == 1
    # past port 0xFFFF: the byte beyond the port space is unserved too
    assert bus.read(0xFFFF, 2) == 0x2211
    bus.unassigned_reply = None
    assert bus.read(0x80, 4) == 0xFFFFABFF


@pytest.mark.parametrize("bad", [-1, 1 << 64, 1.0, "0x12", True])
def test_setter_rejects_non_u64(bad):
    bus = PortBus()
    with pytest.raises(InvalidArgumentError):
        bus.unassigned_reply = bad
    assert bus.unassigned_reply is None
