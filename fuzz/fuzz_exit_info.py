"""Fuzz harness: ``exit_info`` / ``exit_infos`` on decoded and on arbitrary (often impossible) instructions.

Per input, on both backends: ``exit_info`` of IoInsn values built from the
fuzzer's bytes -- half from ``decode_insn`` of fuzzed code, half with
arbitrary field values (kinds, sizes, ports, segments, lengths out of range,
wrong types) -- with fuzzed RDX (including negative and > 64-bit), and
``exit_infos`` over an INSN_DTYPE array of the same records through
:func:`tdxve.invariants.check_exit_infos_batch`. Invariants: a result is the
SDM encoding of the instruction (the strict decode accepts the qualification
and gives back size, direction, string, REP (strings only), immediate and port
= imm8 or DX[15:0]; the length; address size and segment in the instruction
information for INS/OUTS, 0 otherwise); bad records raise
InvalidArgumentError; backends agree.

Run: ``python fuzz/fuzz_exit_info.py --seconds 60`` (README.md).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

import fuzzlib
from tdxve import invariants as inv
from tdxve.abi import INSN_DTYPE, IoInsn, IoKind, Segment

BACKENDS = fuzzlib.load_backends()
_, REF = BACKENDS[-1]
KINDS: tuple[Any, ...] = tuple(IoKind) + (4, 255, -1, True, "IN", None)
SIZES: tuple[Any, ...] = (1, 2, 4, 1, 2, 4, 0, 3, 8, 255, -1, True, 2.0)
ADDRS: tuple[Any, ...] = (16, 32, 64, 16, 32, 64, 8, 0, 128, True)
SEGS: tuple[Any, ...] = tuple(Segment) + (None, None, None, 6, -1, 7, "DS")
ODD_DX: tuple[Any, ...] = (-1, 1 << 64, 1 << 70, True, 3.0, "0x3f8", None, np.uint16(0x3F8), np.int64(-2))

SEEDS = [bytes.fromhex(h) for h in (
    "00ecf803", "00e480", "0066ed", "00f36c", "0067f36f", "01" + "00" * 12, "01" + "ff" * 12,
    "02ec" + "00" * 20, "03" + "11" * 40)]


def _arbitrary(r: fuzzlib.Reader) -> Any:
    kind = r.pick(KINDS)
    size = r.pick(SIZES)
    port_sel = r.u8() % 8
    port: Any = None if port_sel < 3 else (r.u8() if port_sel < 6 else r.pick((256, 0xFFFF, -1, True, 1.0)))
    rep = r.pick((False, True, 0, 1, np.bool_(True)))
    addr = r.pick(ADDRS)
    seg = r.pick(SEGS)
    length = r.pick((1, 2, 3, 15, 0, 16, -1, 255, True, 1.0))
    rep_prefix = r.pick((0, 0xF2, 0xF3, 7))
    shape = r.u8() % 8
    fields = (kind, size, port, rep, addr, seg, length, rep_prefix)
    if shape == 0:
        return tuple(fields[:7])                 # a plain tuple is accepted like an IoInsn
    if shape == 1:
        return fields[:r.u8() % 8]               # too short
    if shape == 2:
        return r.pick((None, 5, "ec", b"\xec", 3.0))
    return IoInsn(*fields)


def _dx(r: fuzzlib.Reader) -> Any:
    sel = r.u8() % 16
    if sel == 0:
        return r.pick(ODD_DX)
    if sel < 6:
        return r.u16()
    return r.interesting_u64()


def _expect(insn: IoInsn, dx: int, result: tuple[int, int, int], name: str) -> None:
    qual, length, info = result
    d = REF.decode_exit_qual(qual)      # strict: raises ExitQualError -> a finding
    port = insn.port if insn.port is not None else dx & 0xFFFF
    want = (insn.size, insn.kind in (IoKind.IN, IoKind.INS), insn.kind >= IoKind.INS,
            bool(insn.rep) and insn.kind >= IoKind.INS, insn.port is not None, port)
    got = (d.size, d.is_in, d.is_string, d.is_rep, d.is_imm, d.port)
    if got != want or length != insn.length:
        raise fuzzlib.Finding(f"{name}: exit_info({insn}, {dx:#x}) = {result}: fields {got}, want {want}")
    want_info = ({16: 0, 32: 1, 64: 2}[insn.addr_size] << 7 | int(insn.segment) << 15) \
        if insn.kind >= IoKind.INS else 0
    if info != want_info:
        raise fuzzlib.Finding(f"{name}: exit_info({insn}) instruction information {info:#x}, "
                              f"want {want_info:#x}")


def _record(insn: Any) -> tuple[int, ...] | None:
    # INSN_DTYPE row for an IoInsn whose fields fit the dtype (else None)
    try:
        kind, size, port, rep, addr, seg, length, rp = insn
        row = (0, -1 if port is None else int(port), int(length), int(kind), int(size), bool(rep),
               int(addr), -1 if seg is None else int(seg), int(rp))
    except (TypeError, ValueError):
        return None
    limits = ((-2**31, 2**31 - 1), (0, 255), (0, 255), (0, 255), (0, 1), (0, 255), (-128, 127), (0, 255))
    if all(lo <= v <= hi for v, (lo, hi) in zip(row[1:], limits)):
        return row
    return None


@fuzzlib.harness
def check_one(data: bytes) -> None:
    r = fuzzlib.Reader(data)
    n = 1 + r.u8() % 6
    insns: list[Any] = []
    dxs: list[Any] = []
    for _ in range(n):
        if r.flag():
            code = r.take(1 + r.u8() % 6)
            mode = r.pick((64, 32, 16))
            try:
                insns.append(REF.decode_insn(code, mode))
            except Exception:  # noqa: BLE001 - not an instruction: use arbitrary fields instead
                insns.append(_arbitrary(r))
        else:
            insns.append(_arbitrary(r))
        dxs.append(_dx(r))
    rows = [_record(i) for i in insns]
    arr = np.array([x for x in rows if x is not None], dtype=INSN_DTYPE)
    arr_dx = [d for x, d in zip(rows, dxs) if x is not None]
    batch_dx: Any = arr_dx if r.flag() else (arr_dx[0] if arr_dx else 0)
    results = []
    for name, core in BACKENDS:
        singles = []
        for insn, dx in zip(insns, dxs):
            res = fuzzlib.call(core.exit_info, insn, dx)
            if res[0] == "ok" and isinstance(insn, IoInsn):
                _expect(insn, int(dx), core.exit_info(insn, dx), name)
            singles.append(res)
        batch = fuzzlib.call(inv.check_exit_infos_batch, arr, batch_dx, core=core)
        wrong = fuzzlib.call(core.exit_infos, arr.view(np.uint8) if arr.size else [], 0)
        results.append((name, (singles, batch, wrong)))
    fuzzlib.agree(f"exit_info of {insns!r:.200}", results)


if __name__ == "__main__":
    sys.exit(fuzzlib.main(check_one, name="exit_info", seeds=SEEDS, max_len=128))
