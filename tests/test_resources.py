"""Resource safety (issue 7): a million decode and execute calls keep memory flat; a 10**8-byte
instruction stream is decoded in chunks without unbounded allocation (tdxve.stream)."""

from __future__ import annotations

import gc
import os
import tracemalloc
from typing import Any, Iterator

import numpy as np
import pytest

import tdxve
from tdxve.abi import INSN_DTYPE
from tdxve.errors import DecodeError, LockPrefixError, TruncatedInputError
from tdxve.guest import INTEL_ALLOWED_PORTS
from tdxve.host import Host
from tdxve.machine import Machine
from tdxve.regs import Regs
from tdxve.stream import DEFAULT_CHUNK_SIZE, StreamDecoder, decode_file, decode_stream

MIB = 1 << 20


def rss() -> int:
    """Resident set size in bytes (Linux /proc; tracemalloc-free, so C leaks count too)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")


def test_a_million_decodes_keep_memory_flat(core: Any) -> None:
    """10**6 calls per backend: decode_insn (valid, truncated, LOCK, non-I/O: exceptions too),
    decode_exit_qual and exit_info. After a warm-up, RSS may not grow by more than 8 MiB
    (a leak of 8 bytes per call would)."""
    codes = [b"\x66\xed", b"\xf3\x6c", b"\xe4\x80", b"\x66", b"\xf0\xec", b"\x90", b"\xee", b"\x67\x6f"]
    insn = core.decode_insn(b"\xf3\x6c")
    dec, qual, info = core.decode_insn, core.decode_exit_qual, core.exit_info

    def run(n: int) -> None:
        for i in range(n):
            try:
                dec(codes[i & 7], 64)
            except DecodeError:
                pass
            qual(0x3F80008 | (i & 0x40), strict=False)
            info(insn, i & 0xFFFF)

    run(50_000)
    gc.collect()
    before = rss()
    run(1_000_000 // 3)        # three calls per iteration: 10**6 calls
    gc.collect()
    assert rss() - before < 8 * MIB


@pytest.mark.slow
def test_a_million_executes_keep_memory_flat() -> None:
    """10**6 Machine.execute calls (this suite runs once per backend): IN and OUT to devices
    whose state does not accumulate, port-filtered accesses, and failing ones (a KVM-rejected
    size from execute_exit raises VeFault every 16th call). RSS grows by less than 16 MiB."""
    m = Machine(host=Host(), port_filter=INTEL_ALLOWED_PORTS | {0x3FD, 0x3FF})
    regs = Regs(rip=0x1000)
    steps = [(0x3FD, b"\xec"), (0x3FF, b"\xee"), (0xCF8, b"\xef"), (0xCFC, b"\x66\xed"),
             (0x70, b"\xee"), (0x71, b"\xec"), (0x1234, b"\xec"), (0x64, b"\xee")]

    def run(n: int) -> None:
        ex = m.execute
        for i in range(n):
            port, code = steps[i & 7]
            regs.rdx = port
            regs.rax = i
            if i & 15 == 15:
                try:      # size encoding 2 (3 bytes): KVM answers INVALID_OPERAND (ref 4.1)
                    m.execute_exit(regs, 30, exit_qual=0x3F80002, instr_len=1)
                except tdxve.VeFault:
                    pass
            else:
                ex(regs, code)

    run(20_000)
    gc.collect()
    before = rss()
    run(1_000_000)
    gc.collect()
    assert rss() - before < 16 * MIB
    assert m.tdx.ve_injected == 1_020_000 and not m.tdx.ve_pending


# ---------------------------------------------------------------- 10**8 bytes in chunks
PATTERN = b"\xec\xee\xe4\x80\x66\xed\xf3\x6c\x67\xf3\x6f\x2e\x2e\xe6\x70\x48\xed"
PATTERN_INSNS = 8


def chunks(total: int, chunk: int) -> Iterator[bytes]:
    """``total`` bytes of the repeated pattern; the chunk size is coprime with the pattern, so
    instructions straddle chunk boundaries everywhere."""
    reps = chunk // len(PATTERN) + 2
    block = PATTERN * reps
    pos = 0
    while pos < total:
        n = min(chunk, total - pos)
        start = pos % len(PATTERN)
        yield block[start:start + n]
        pos += n


def test_hundred_million_bytes_in_bounded_memory() -> None:
    """tdxve.stream decodes 10**8 bytes (compiled core; the pure twin, about 150 KB/s, gets
    4*10**5) chunk by chunk. Peak traced allocation stays near one chunk's worth of records
    (~21 bytes per chunk byte), far below the 2 GB one decode_insns call would reserve."""
    total = 10**8 if tdxve.BACKEND == "cython" else 4 * 10**5
    total -= total % len(PATTERN)
    chunk = DEFAULT_CHUNK_SIZE + 1 if tdxve.BACKEND == "cython" else 65_537
    tracemalloc.start()
    try:
        count = 0
        last_end = 0
        for recs in decode_stream(chunks(total, chunk), 64):
            count += recs.shape[0]
            assert int(recs["offset"][0]) == last_end          # contiguous across chunks
            last_end = int(recs["offset"][-1]) + int(recs["length"][-1])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert last_end == total and count == total // len(PATTERN) * PATTERN_INSNS
    assert peak < 32 * chunk + 4 * MIB


def test_stream_equals_whole_buffer_decode(core: Any) -> None:
    """Any cut of the input gives decode_insns' records, or its exception class, offset and
    message (errors near a chunk end are raised once the bytes they show were seen)."""
    rng = np.random.default_rng(11)
    good = [b"\xec", b"\x66\xed", b"\xe4\x80", b"\xf3\x6c", b"\x2e" * 13 + b"\xe5\x01"]
    bad = [b"\x90", b"\xf0\xec", b"\x66" * 16 + b"\xec"]
    import tdxve.stream as S
    saved = S.core
    S.core = core
    try:
        for t in range(300):
            parts = [good[i] for i in rng.integers(0, len(good), rng.integers(0, 40))]
            if t % 3 == 0:
                parts.insert(int(rng.integers(0, len(parts) + 1)), bad[t % 3 and 1 or (t // 3) % 3])
            data = b"".join(parts)
            if t % 5 == 0:
                data = data[:int(rng.integers(0, len(data) + 1))]
            cuts = sorted(int(c) for c in rng.integers(0, len(data) + 1, rng.integers(0, 8)))
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
            for on_error in ("raise", "stop"):
                try:
                    want: Any = core.decode_insns(data, 64, on_error=on_error).tobytes()
                except DecodeError as e:
                    want = (type(e), e.offset, str(e), e.data)
                try:
                    got: Any = b"".join(r.tobytes() for r in decode_stream(pieces, 64, on_error=on_error))
                except DecodeError as e:
                    got = (type(e), e.offset, str(e), e.data)
                assert got == want, (data.hex(), pieces)
    finally:
        S.core = saved


def test_stream_decoder_state_and_bad_arguments(tmp_path: Any) -> None:
    dec = StreamDecoder(64, on_error="stop")
    assert dec.feed(b"\xec\x66").shape == (1,) and dec.offset == 1
    assert dec.feed(np.frombuffer(b"\xed\xf0\xec" + b"\0" * 20, dtype=np.uint8)).shape == (1,)
    assert dec.done and dec.offset == 3 and isinstance(dec.error, LockPrefixError)
    assert dec.error.offset == 3 and dec.feed(b"\xec").shape == (0,)
    dec.close()
    with pytest.raises(tdxve.InvalidArgumentError, match="after close"):
        dec.feed(b"\xec")
    dec = StreamDecoder(32)
    dec.feed(b"\xee\x66")
    with pytest.raises(TruncatedInputError) as ei:
        dec.close()
    assert ei.value.offset == 1
    for bad in (dict(mode=8), dict(on_error="skip")):
        with pytest.raises(tdxve.InvalidArgumentError):
            StreamDecoder(**bad)  # type: ignore[arg-type]
    with pytest.raises(tdxve.InvalidArgumentError, match="chunk"):
        StreamDecoder().feed([0xEC])  # type: ignore[arg-type]
    path = tmp_path / "trace.bin"
    path.write_bytes(PATTERN * 1000)
    parts = list(decode_file(path, chunk_size=4099))
    assert all(p.dtype == INSN_DTYPE for p in parts)
    assert b"".join(p.tobytes() for p in parts) == tdxve.decode_insns(PATTERN * 1000).tobytes()
    with open(path, "rb") as f:
        assert sum(r.shape[0] for r in decode_file(f, chunk_size=7)) == 8_000
    with pytest.raises(tdxve.InvalidArgumentError, match="chunk_size"):
        list(decode_file(path, chunk_size=0))
