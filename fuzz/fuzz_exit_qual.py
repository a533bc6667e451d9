"""Fuzz harness: ``decode_exit_qual`` / ``decode_exit_quals`` / ``encode_exit_qual`` on arbitrary 64-bit values.

Per input, on both backends: the strict and the Linux (non-strict) decode of
each value, the batch decode (also into a reused ``out=``), and
:func:`tdxve.invariants.check_exit_quals_batch`. Invariants: the non-strict
decode never raises for a 64-bit value and is the SDM field split (ref 1.3);
a value the strict decode accepts re-encodes to itself; out-of-range and
non-integer inputs raise TdxveError subclasses only. Backends agree.

Run: ``python fuzz/fuzz_exit_qual.py --seconds 60`` (README.md).
"""

from __future__ import annotations

import sys

import numpy as np

import fuzzlib
from tdxve import invariants as inv

BACKENDS = fuzzlib.load_backends()
U64 = (1 << 64) - 1
ODD_VALUES = (-1, 1 << 64, (1 << 64) + 0x3F80000, -(1 << 63), 1 << 200, True, False, 1.5, "0x3f8", None,
              np.int64(-5), np.uint64(0x3F80008), np.float64(8.0), b"\x08")

SEEDS = [bytes.fromhex(h) for h in (
    "00" + "0800f803" + "00000000", "00" + "0000f803" + "00000000", "00" + "4800e900" + "00000000",
    "00" + "5800f803" + "00000000", "00" + "3000f803" + "00000000", "00" + "0200ffff" + "00000000",
    "00" + "8000f803" + "00000000", "00" + "4800e901" + "00000000", "00" + "0800f803" + "01000000",
    "00" + "5b00ffff" + "ffffffff", "01" + "ff" * 16, "02" + "00" * 24)]


def _quals(r: fuzzlib.Reader) -> list[int]:
    out = []
    while r.left >= 1 and len(out) < 12:
        sel = r.u8() % 4
        if sel == 0:
            out.append(r.interesting_u64())
        elif sel == 1:      # a plausible I/O qualification with one stray field
            out.append(((r.u8() & 0x7F) | r.u16() << 16 | (r.u8() << (7 + r.u8() % 57) if r.flag() else 0)) & U64)
        else:
            out.append(r.u64())
    return out


@fuzzlib.harness
def check_one(data: bytes) -> None:
    r = fuzzlib.Reader(data)
    shape_sel = r.u8()
    quals = _quals(r)
    results = []
    for name, core in BACKENDS:
        per = []
        for q in quals:
            strict = fuzzlib.call(core.decode_exit_qual, q)
            loose = fuzzlib.call(core.decode_exit_qual, q, strict=False)
            if loose[0] != "ok":
                raise fuzzlib.Finding(f"{name}: non-strict decode of {q:#x} raised {loose[1].__name__}")
            d = core.decode_exit_qual(q, strict=False)
            want = ((q & 7) + 1, bool(q & 8), bool(q & 16), bool(q & 32), bool(q & 64),
                    (q >> 16) & 0xFFFF, q)
            if tuple(d) != want:
                raise fuzzlib.Finding(f"{name}: decode_exit_qual({q:#x}, strict=False) = {tuple(d)}")
            if strict[0] == "ok":
                back = core.encode_exit_qual(size=d.size, is_in=d.is_in, port=d.port,
                                             is_string=d.is_string, is_rep=d.is_rep, is_imm=d.is_imm)
                if back != q:
                    raise fuzzlib.Finding(f"{name}: strict-valid {q:#x} re-encodes to {back:#x}")
            per.append((strict, loose))
        arr = np.array(quals, dtype=np.uint64)
        if shape_sel & 1 and arr.size % 2 == 0:
            arr = arr.reshape(2, -1) if arr.size else arr
        batch = fuzzlib.call(inv.check_exit_quals_batch, arr, core=core)
        as_list = fuzzlib.call(core.decode_exit_quals, quals)
        odd = ODD_VALUES[shape_sel % len(ODD_VALUES)]
        odd_single = fuzzlib.call(core.decode_exit_qual, odd)
        odd_batch = fuzzlib.call(core.decode_exit_quals, quals + [odd])
        results.append((name, (per, batch, as_list, odd_single, odd_batch)))
    fuzzlib.agree(f"exit qualifications {[hex(q) for q in quals[:4]]}", results)


if __name__ == "__main__":
    sys.exit(fuzzlib.main(check_one, name="exit_qual", seeds=SEEDS, max_len=128))
