"""Fuzz harness: ``decode_insn`` / ``decode_insns`` on arbitrary bytes, modes and buffer types.

Per input, on both backends: ``decode_insn``, ``decode_insns`` with
``on_error="stop"`` and ``"raise"``, and :func:`tdxve.invariants.check_decode_batch`
(batch == instruction by instruction, proper prefixes truncated). A decoded
instruction must be at most 15 bytes, decode the same from its own bytes, and
give an exit qualification the strict decode accepts. The backends must agree
on every result or exception class.

Run: ``python fuzz/fuzz_decode.py --seconds 60`` (README.md).
"""

from __future__ import annotations

import sys

import numpy as np

import fuzzlib
from tdxve import invariants as inv
from tdxve.abi import MAX_INSN_LENGTH

BACKENDS = fuzzlib.load_backends()
MODES = (64, 64, 64, 32, 32, 16, 16, None)
BAD_MODES = (0, 8, 63, 65, -64, 128, "64", 64.0, True, None, 2**64 + 64)

SEEDS = [bytes.fromhex(h) for h in (
    "00ec", "00ee", "00e480", "00e6e9", "0066ed", "0066ef", "00f36c", "00f36f", "00486d",
    "00664fed", "0067f36c", "01ec", "0266ed", "02e5ff", "00f0ec", "00" + "66" * 15 + "ec",
    "00" + "2e" * 14 + "e4", "00ecee6c6d6e6fe4", "00640f", "08ec", "10ec", "18ec", "20ed",
    "28ec", "30ec", "38ec", "0040ec", "0140ec")]


def _buffer(form: int, payload: bytes) -> object:
    if form == 0:
        return payload
    if form == 1:
        return bytearray(payload)
    if form == 2:
        return memoryview(payload)
    if form == 3:
        return np.frombuffer(payload, dtype=np.uint8)
    if form == 4:
        return np.frombuffer(payload, dtype=np.int8)
    if form == 5:
        return memoryview(bytes(b for p in payload for b in (p, 0x90)))[::2]   # non-contiguous
    if form == 6:
        return np.frombuffer(payload[:len(payload) & ~1], dtype=np.uint16)      # wrong dtype
    return list(payload)                                                       # not a buffer


@fuzzlib.harness
def check_one(data: bytes) -> None:
    r = fuzzlib.Reader(data)
    sel = r.u8()
    mode = MODES[sel & 7]
    if mode is None:
        mode = BAD_MODES[(sel >> 3) % len(BAD_MODES)]
    form = (sel >> 3) & 7 if sel & 0xC0 else 0
    payload = r.rest()
    buf = _buffer(form, payload)
    results = []
    for name, core in BACKENDS:
        one = fuzzlib.call(core.decode_insn, buf, mode)
        stop = fuzzlib.call(core.decode_insns, buf, mode, on_error="stop")
        whole = fuzzlib.call(core.decode_insns, buf, mode, on_error="raise")
        batch = fuzzlib.call(inv.check_decode_batch, buf, mode, core=core)
        if one[0] == "ok":
            insn = core.decode_insn(buf, mode)
            if not 1 <= insn.length <= min(MAX_INSN_LENGTH, len(payload)):
                raise fuzzlib.Finding(f"{name}: impossible length {insn.length} for {payload.hex()}")
            if core.decode_insn(payload[:insn.length], mode) != insn:
                raise fuzzlib.Finding(f"{name}: trailing bytes changed the decode of {payload.hex()}")
            qual, length, _ = core.exit_info(insn, r.u16())
            core.decode_exit_qual(qual)        # strict: raises ExitQualError -> escapes as a finding
            if length != insn.length:
                raise fuzzlib.Finding(f"{name}: exit_info length {length} != {insn.length}")
        results.append((name, (one, stop, whole, batch)))
    fuzzlib.agree(f"decode of {payload[:32].hex()} (mode {mode!r}, form {form})", results)


if __name__ == "__main__":
    sys.exit(fuzzlib.main(check_one, name="decode", seeds=SEEDS, max_len=64))
