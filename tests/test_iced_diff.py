"""Differential test of the decoder against iced-x86 (issue 2).

iced-x86 is the strongest independent oracle for x86 prefix rules (anchors.md
1.3: it agrees with XED and binutils on 66+REX.W, unlike Capstone 5.0.9).

Compared fields: kind, size, port, rep (and which of F2/F3 is in force),
address size and segment (for INS/OUTS: iced reports them only through the
memory operand, and IN/OUT have none), and length. ``KNOWN_ICED_DISAGREEMENTS``
lists byte strings where we believe iced is wrong; it is empty: every case
agrees.
"""

from __future__ import annotations

import itertools
import random

import pytest

iced = pytest.importorskip("iced_x86")

from tdxve import IoKind, Segment  # noqa: E402
from tdxve.errors import DecodeError  # noqa: E402

C = iced.Code
CODES = {
    C.IN_AL_IMM8: (IoKind.IN, 1), C.IN_AX_IMM8: (IoKind.IN, 2), C.IN_EAX_IMM8: (IoKind.IN, 4),
    C.IN_AL_DX: (IoKind.IN, 1), C.IN_AX_DX: (IoKind.IN, 2), C.IN_EAX_DX: (IoKind.IN, 4),
    C.OUT_IMM8_AL: (IoKind.OUT, 1), C.OUT_IMM8_AX: (IoKind.OUT, 2), C.OUT_IMM8_EAX: (IoKind.OUT, 4),
    C.OUT_DX_AL: (IoKind.OUT, 1), C.OUT_DX_AX: (IoKind.OUT, 2), C.OUT_DX_EAX: (IoKind.OUT, 4),
    C.INSB_M8_DX: (IoKind.INS, 1), C.INSW_M16_DX: (IoKind.INS, 2), C.INSD_M32_DX: (IoKind.INS, 4),
    C.OUTSB_DX_M8: (IoKind.OUTS, 1), C.OUTSW_DX_M16: (IoKind.OUTS, 2), C.OUTSD_DX_M32: (IoKind.OUTS, 4),
}
K = iced.OpKind
ADDR = {K.MEMORY_ESDI: 16, K.MEMORY_ESEDI: 32, K.MEMORY_ESRDI: 64,
        K.MEMORY_SEG_SI: 16, K.MEMORY_SEG_ESI: 32, K.MEMORY_SEG_RSI: 64}
R = iced.Register
SEG = {R.ES: Segment.ES, R.CS: Segment.CS, R.SS: Segment.SS, R.DS: Segment.DS,
       R.FS: Segment.FS, R.GS: Segment.GS}

PREFIXES = [0x66, 0x67, 0xF2, 0xF3, 0xF0, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65]
OPCODES = [0x6C, 0x6D, 0x6E, 0x6F, 0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF]

#: Byte strings (hex, mode) on which we believe iced-x86 is wrong. None so far.
KNOWN_ICED_DISAGREEMENTS: frozenset[tuple[str, int]] = frozenset()


def iced_view(code: bytes, mode: int) -> tuple[object, ...] | None:
    """iced's answer as our comparable tuple, or None if it is not port I/O."""
    d = iced.Decoder(mode, code)
    ins = d.decode()
    got = CODES.get(ins.code)
    if got is None:
        return None
    kind, size = got
    # IN AL, imm8: imm is operand 1; OUT imm8, AL: operand 0
    port_op = {IoKind.IN: 1, IoKind.OUT: 0}.get(kind)
    port = ins.immediate8 if port_op is not None and ins.op_kind(port_op) == K.IMMEDIATE8 else None
    rep_prefix = 0xF3 if ins.has_rep_prefix else (0xF2 if ins.has_repne_prefix else 0)
    if kind in (IoKind.INS, IoKind.OUTS):
        mem_op = 0 if kind is IoKind.INS else 1
        addr = ADDR[ins.op_kind(mem_op)]
        # INS: iced names ES in the operand kind (MEMORY_ES*DI); OUTS: memory_segment
        seg = Segment.ES if kind is IoKind.INS else SEG[ins.memory_segment]
    else:
        addr = seg = None
    return (kind, size, port, rep_prefix != 0, rep_prefix, addr, seg, ins.len)


def ours_view(core: object, code: bytes, mode: int) -> tuple[object, ...] | None:
    try:
        i = core.decode_insn(code, mode)  # type: ignore[attr-defined]
    except DecodeError:
        return None
    string = i.kind in (IoKind.INS, IoKind.OUTS)
    return (i.kind, i.size, i.port, i.rep, i.rep_prefix, i.addr_size if string else None,
            i.segment if string else None, i.length)


def prefix_sequences(max_len: int = 3):
    for n in range(max_len + 1):
        yield from itertools.product(PREFIXES, repeat=n)


def compare(core, cases):
    mismatches = []
    for code, mode in cases:
        a, b = ours_view(core, code, mode), iced_view(code, mode)
        if a != b and (code.hex(), mode) not in KNOWN_ICED_DISAGREEMENTS:
            mismatches.append((code.hex(" "), mode, a, b))
    return mismatches


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_all_prefix_sequences_up_to_three_agree_with_iced(core, mode):
    """Every sequence of up to 3 prefixes from the issue's set, in front of each of the 12
    opcodes (plus each REX byte 40-4F, or none, before the opcode in 64-bit mode)."""
    rexes = [b""] + [bytes([r]) for r in range(0x40, 0x50)] if mode == 64 else [b""]
    cases = []
    for seq in prefix_sequences():
        pre = bytes(seq)
        for rex in rexes:
            for op in OPCODES:
                cases.append((pre + rex + bytes([op, 0x5A, 0x90]), mode))
    assert len(cases) == 1464 * len(rexes) * 12
    mismatches = compare(core, cases)
    assert not mismatches, f"{len(mismatches)} disagreements, first: {mismatches[:5]}"


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_random_bytes_agree_on_whether_they_start_port_io(core, mode):
    """Random byte strings, biased towards prefixes and I/O opcodes so both answers occur."""
    rnd = random.Random(20261124 + mode)
    pool = PREFIXES + OPCODES + list(range(0x40, 0x50))
    cases = []
    for _ in range(20000):
        n = rnd.randrange(0, 18)
        code = bytes(rnd.choice(pool) if rnd.random() < 0.7 else rnd.randrange(256) for _ in range(n))
        cases.append((code, mode))
    n_io = sum(ours_view(core, c, m) is not None for c, m in cases)
    assert 2000 < n_io < 18000          # both outcomes are well represented
    mismatches = compare(core, cases)
    assert not mismatches, f"{len(mismatches)} disagreements, first: {mismatches[:5]}"


def test_long_prefix_runs_and_the_15_byte_limit_agree_with_iced(core):
    cases = []
    for n in range(10, 18):
        for op in OPCODES:
            for fill in (0x66, 0x2E, 0x48, 0xF3):
                for tail in (b"", b"\x5a"):
                    cases.append((bytes([fill] * n + [op]) + tail, 64))
    assert not compare(core, cases)
