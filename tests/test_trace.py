"""tdxve.trace.read_kvm_pio: KVM's kvm_pio tracepoint (anchors 2.4) into EVENT_DTYPE.

The sample ``tests/data/kvm_pio_sample.txt`` is an early-boot-like trace
written for these tests: the 8250 early console init and a banner with LSR
polling (``arch/x86/boot/early_serial_console.c``), an io_delay write to
0x80 from a pre-2016 kernel (no ``val``), RTC reads, a PCI mechanism #1 probe
in ``perf script`` format, the PIT, the i8042 status, and an IDE sector read
by ``rep insw`` (count 256, ``(...)``), among kvm_exit/kvm_entry lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tdxve.abi import EVENT_DTYPE, ReplayFault
from tdxve.errors import InvalidArgumentError, TraceFormatError
from tdxve.machine import Machine
from tdxve.replay import replay
from tdxve.trace import iter_kvm_pio, read_kvm_pio

SAMPLE = Path(__file__).parent / "data" / "kvm_pio_sample.txt"
BANNER = b"Linux version 6.8.0-tdx\r\n"


def test_sample_parses_into_events():
    ev = read_kvm_pio(SAMPLE)
    assert ev.dtype == EVENT_DTYPE
    # 81 kvm_pio records, one of them count 256 -> 336 events
    assert len(ev) == 336
    q = ev["exit_qual"]
    # first record: pio_write at 0x3fb size 1 count 1 val 0x3 (LCR = 8n1)
    assert q[0] == 0x03FB0000 and ev["rax"][0] == 0x03 and ev["instr_len"][0] == 1
    # the unrolled rep insw: 256 IN AX,DX from 0x1F0, each answering the traced first value
    ins = np.flatnonzero(q == 0x01F00009)
    assert len(ins) == 256 and (ev["reply"][ins] == 0x4A2B).all() and (ev["rax"][ins] == 0).all()
    # perf script format: OUT 0xCF8 dword 0x80000000 and the IN of the host bridge's dword 0
    assert 0x0CF80003 in q.tolist() and 0x12378086 in ev["reply"][q == 0x0CFC000B].tolist()
    # pre-2016 format without val: a write sends 0, a read answers all-ones
    assert ev["rax"][q == 0x00800000].tolist() == [0]
    assert 0xFFFFFFFF in ev["reply"][q == 0x00610008].tolist()


def test_sample_replays_to_the_banner_and_counts_one_ve_per_access():
    ev = read_kvm_pio(SAMPLE)
    m = Machine(profile="linux")
    res = replay(ev, m, unassigned="reply")
    assert m.host.uart.output == BANNER
    assert m.host.uart.divisor == 1 and m.host.uart.lcr == 0x03      # 115200 8n1 (early_serial_init)
    assert (res["fault"] == ReplayFault.NONE).all()
    assert int(res["ves"].sum()) == len(ev) and int(res["tdvmcalls"].sum()) == len(ev)
    q = ev["exit_qual"]
    # the model's own devices answer where it has them: RTC status A 0x26 (ref 6.3), the host bridge
    assert res["rax"][q == 0x00710008][0] == 0x26
    assert res["rax"][q == 0x0CFC000B][0] == 0x12378086
    # ports without a device model answer the trace's value (PIT/system control port 0x61)
    assert res["rax"][q == 0x00610008].tolist() == [0x20, 0xFF]
    assert m.host.post.codes == [0]


def test_string_records_as_ins_outs_are_refused_by_linux():
    ev = read_kvm_pio(SAMPLE, strings="string")
    assert len(ev) == 81
    s = ev[(ev["exit_qual"] & 0x10) != 0]
    assert len(s) == 1 and s[0]["exit_qual"] == 0x01F00039          # REP INSW at 0x1F0 (ref 6.1)
    res = replay(ev, Machine(), unassigned="reply")
    assert (res["fault"] == ReplayFault.STRING_IO).sum() == 1


def test_lines_and_path_give_the_same_events():
    lines = SAMPLE.read_text().splitlines()
    assert (read_kvm_pio(lines) == read_kvm_pio(SAMPLE)).all()
    assert (read_kvm_pio(str(SAMPLE), instr_len=2)["instr_len"] == 2).all()


@pytest.mark.parametrize("line,qual,rax,reply", [
    ("pio_write at 0x3f8 size 1 count 1 val 0x41 ", 0x03F80000, 0x41, 0),
    ("  bash-1 [000] 1.0: kvm_pio: pio_read at 0xcfc size 4 count 1 val 0x12378086", 0x0CFC000B, 0, 0x12378086),
    ("x 1 [0] 2.0: kvm:kvm_pio: pio_read at 0x1f0 size 2 count 1 val 0xffff", 0x01F00009, 0, 0xFFFF),
    ("pio_write at 0x80 size 1 count 1", 0x00800000, 0, 0),
    ("pio_read at 0x71 size 1 count 1\r", 0x00710008, 0, 0xFFFFFFFF),
])
def test_formats(line, qual, rax, reply):
    ev = read_kvm_pio([line])
    assert len(ev) == 1 and ev[0]["exit_qual"] == qual and ev[0]["rax"] == rax and ev[0]["reply"] == reply


def test_other_lines_are_skipped():
    ev = read_kvm_pio(["cpus=2", "", "# comment", "  qemu-1 [0] 1.0: kvm_exit: reason IO_INSTRUCTION",
                       "pio_write at 0x80 size 1 count 1 val 0x1"])
    assert len(ev) == 1
    assert len(read_kvm_pio([])) == 0 and read_kvm_pio([]).dtype == EVENT_DTYPE


@pytest.mark.parametrize("line,why", [
    ("pio_write at 0x3f8 size 3 count 1 val 0x1", "size 3"),
    ("pio_write at 0x10000 size 1 count 1 val 0x1", "above 0xFFFF"),
    ("pio_read at 0x1f0 size 2 count 0 val 0x1", "count 0"),
    ("pio_read at 0x1f0 size 2 count 4 val 0x1", "(...)"),
    ("pio_read at 0x1f0 size 2 count 1 val 0x1 (...)", "(...)"),
    ("pio_write at 3f8 size 1 count 1 val 0x41", "not 'pio_read"),
    ("kvm_pio: pio_write at 0x3f8 size one", "not 'pio_read"),
    ("pio_write at 0x3f8 size 4 count 1 val 0x123456789", "wider than 32 bits"),
])
def test_malformed_lines_are_typed_errors_with_the_line_number(line, why):
    with pytest.raises(TraceFormatError, match=None) as exc:
        read_kvm_pio(["pio_write at 0x80 size 1 count 1 val 0x0", line])
    assert exc.value.lineno == 2 and exc.value.line == line and why in str(exc.value)
    assert issubclass(TraceFormatError, ValueError)


def test_iter_reports_progress_in_bytes_and_never_splits_a_record():
    size = SAMPLE.stat().st_size
    chunks = list(iter_kvm_pio(SAMPLE, chunk_events=10))
    done = [d for _, d in chunks]
    assert done == sorted(done) and done[-1] == size
    assert sum(len(e) for e, _ in chunks) == 336
    # the rep insw record stays whole: one chunk holds all 256 of its events
    assert max(int((e["exit_qual"] == 0x01F00009).sum()) for e, _ in chunks) == 256
    assert all(len(e) < 10 + 256 for e, _ in chunks)


@pytest.mark.parametrize("kw", [dict(strings="rep"), dict(chunk_events=0), dict(instr_len=-1),
                                dict(instr_len=1 << 32)])
def test_bad_arguments(kw):
    with pytest.raises(InvalidArgumentError):
        list(iter_kvm_pio([], **kw))


@pytest.mark.parametrize("src", [b"pio_write at 0x80 size 1 count 1", 42, [b"pio_write"]])
def test_bad_sources(src):
    with pytest.raises(InvalidArgumentError):
        read_kvm_pio(src)


def test_missing_file_is_an_oserror(tmp_path):
    with pytest.raises(OSError):
        read_kvm_pio(tmp_path / "nope.txt")
