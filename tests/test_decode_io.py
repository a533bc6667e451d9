"""Port-I/O instruction decode and the VE exit information (issue 2; reference 3.1-3.4, 6.1)."""

from __future__ import annotations

import numpy as np
import pytest
from vectors import exit_qual_vectors

import tdxve
from tdxve import IoKind, Segment
from tdxve.errors import (
    DecodeError,
    InstructionTooLongError,
    InvalidArgumentError,
    LockPrefixError,
    NotPortIoError,
    TruncatedInputError,
    UnsupportedModeError,
)

# Reference 3.3: opcode -> (kind, byte form, imm8 port)
OPCODES = {
    0x6C: (IoKind.INS, True, False), 0x6D: (IoKind.INS, False, False),
    0x6E: (IoKind.OUTS, True, False), 0x6F: (IoKind.OUTS, False, False),
    0xE4: (IoKind.IN, True, True), 0xE5: (IoKind.IN, False, True),
    0xE6: (IoKind.OUT, True, True), 0xE7: (IoKind.OUT, False, True),
    0xEC: (IoKind.IN, True, False), 0xED: (IoKind.IN, False, False),
    0xEE: (IoKind.OUT, True, False), 0xEF: (IoKind.OUT, False, False),
}


def enc(op: int) -> bytes:
    return bytes([op, 0x5A]) if OPCODES[op][2] else bytes([op])


@pytest.mark.parametrize("vec", exit_qual_vectors(), ids=lambda v: v.code.hex(" "))
def test_reference_6_1_exit_info(core, vec):
    """Reference 6.1: bytes -> exit qualification and instruction length (64-bit mode)."""
    insn = core.decode_insn(vec.code, 64)
    assert insn.kind.name == vec.kind and insn.size == vec.size and insn.length == vec.instr_len
    qual, ilen, _info = core.exit_info(insn, dx=vec.port)
    assert (qual, ilen) == (vec.exit_qual, vec.instr_len)


@pytest.mark.parametrize("mode", [16, 32, 64])
@pytest.mark.parametrize("op", sorted(OPCODES))
def test_every_opcode_in_every_mode(core, op, mode):
    kind, byte_form, imm = OPCODES[op]
    i = core.decode_insn(enc(op), mode)
    assert i.kind is kind and isinstance(i, tdxve.IoInsn)
    assert i.size == (1 if byte_form else (2 if mode == 16 else 4))   # ref 3.4 default operand size
    assert i.port == (0x5A if imm else None)
    assert i.length == (2 if imm else 1)
    assert i.addr_size == mode
    assert i.rep is False and i.rep_prefix == 0
    assert i.segment == {IoKind.INS: Segment.ES, IoKind.OUTS: Segment.DS}.get(kind)


@pytest.mark.parametrize("mode,size", [(16, 4), (32, 2), (64, 2)])
def test_66_toggles_operand_size_of_odd_opcodes_only(core, mode, size):
    for op in (0x6D, 0x6F, 0xE5, 0xE7, 0xED, 0xEF):
        assert core.decode_insn(b"\x66" + enc(op), mode).size == size
    for op in (0x6C, 0x6E, 0xE4, 0xE6, 0xEC, 0xEE):
        assert core.decode_insn(b"\x66" + enc(op), mode).size == 1


def test_rex_is_ignored_and_66_rex_w_is_32_bit(core):
    """Ref 3.4 / anchors 1.3: REX.W never makes 64-bit I/O; 66+REX.W is 32-bit (iced, XED, binutils)."""
    for rex in range(0x40, 0x50):
        assert core.decode_insn(bytes([rex, 0xED])).size == 4
        expect = 4 if rex & 8 else 2
        assert core.decode_insn(bytes([0x66, rex, 0xED])).size == expect
        assert core.decode_insn(bytes([0x66, rex, 0x6D])).size == expect
        assert core.decode_insn(bytes([rex, 0xEE])).size == 1


def test_rex_counts_only_directly_before_the_opcode(core):
    assert core.decode_insn(bytes.fromhex("48 66 ED")).size == 2     # REX then 66: REX dropped
    assert core.decode_insn(bytes.fromhex("66 48 ED")).size == 4
    assert core.decode_insn(bytes.fromhex("66 48 40 ED")).size == 2  # last REX has W=0
    assert core.decode_insn(bytes.fromhex("66 40 48 ED")).size == 4
    i = core.decode_insn(bytes.fromhex("40 26 66 ED"))
    assert (i.size, i.length) == (2, 4)


@pytest.mark.parametrize("mode", [16, 32])
def test_40_to_4f_are_not_prefixes_outside_64_bit_mode(core, mode):
    with pytest.raises(NotPortIoError, match="INC/DEC"):
        core.decode_insn(b"\x48\xed", mode)


@pytest.mark.parametrize("mode,plain,with67", [(16, 16, 32), (32, 32, 16), (64, 64, 32)])
def test_67_changes_address_size(core, mode, plain, with67):
    assert core.decode_insn(b"\x6d", mode).addr_size == plain
    assert core.decode_insn(b"\x67\x6d", mode).addr_size == with67
    assert core.decode_insn(b"\x67\x67\x6d", mode).addr_size == with67
    i = core.decode_insn(b"\x67\xed", mode)        # no effect on IN/OUT except the length
    assert (i.size, i.length) == (core.decode_insn(b"\xed", mode).size, 2)


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_ins_always_uses_es(core, mode):
    for p in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65):
        assert core.decode_insn(bytes([p, 0x6C]), mode).segment is Segment.ES


SEGS = {0x26: Segment.ES, 0x2E: Segment.CS, 0x36: Segment.SS, 0x3E: Segment.DS,
        0x64: Segment.FS, 0x65: Segment.GS}


@pytest.mark.parametrize("mode", [16, 32])
def test_outs_last_segment_override_wins_outside_64_bit(core, mode):
    for a in SEGS:
        assert core.decode_insn(bytes([a, 0x6E]), mode).segment is SEGS[a]
        for b in SEGS:
            assert core.decode_insn(bytes([a, b, 0x6E]), mode).segment is SEGS[b]


def test_outs_64_bit_fs_gs_outrank_other_overrides(core):
    """64-bit mode (settled against iced-x86): any FS/GS wins over ES/CS/SS/DS; last FS/GS wins."""
    assert core.decode_insn(bytes.fromhex("64 26 6E")).segment is Segment.FS
    assert core.decode_insn(bytes.fromhex("26 64 6E")).segment is Segment.FS
    assert core.decode_insn(bytes.fromhex("64 65 6E")).segment is Segment.GS
    assert core.decode_insn(bytes.fromhex("65 64 2E 6E")).segment is Segment.FS
    assert core.decode_insn(bytes.fromhex("2E 3E 6E")).segment is Segment.DS
    assert core.decode_insn(bytes.fromhex("3E 2E 6E")).segment is Segment.CS


def test_segment_is_none_for_in_out(core):
    assert core.decode_insn(bytes.fromhex("64 EC")).segment is None


def test_rep_prefixes_last_one_decides_on_any_form(core):
    i = core.decode_insn(bytes.fromhex("F3 F2 6C"))
    assert i.rep and i.rep_prefix == 0xF2
    i = core.decode_insn(bytes.fromhex("F2 F3 6C"))
    assert i.rep and i.rep_prefix == 0xF3
    i = core.decode_insn(bytes.fromhex("F3 EC"))
    assert i.rep and i.rep_prefix == 0xF3 and i.kind is IoKind.IN


def test_length_includes_every_prefix(core):
    code = bytes.fromhex("66 67 F3 2E 26 48 6F")
    assert core.decode_insn(code + b"\x90\x90").length == 7


# ------------------------------------------------------------------ errors

def test_non_io_bytes_name_what_was_found(core):
    with pytest.raises(NotPortIoError, match=r"0x90 \(NOP\)") as exc:
        core.decode_insn(b"\x66\x90")
    assert exc.value.offset == 0 and exc.value.data == b"\x66\x90"
    with pytest.raises(NotPortIoError, match="0x0f"):
        core.decode_insn(b"\x0f\x01\xcc")            # TDCALL is not port I/O


@pytest.mark.parametrize("code", [b"", b"\x66", b"\xe4", b"\x66\x67\xf3", b"\x48"])
def test_truncated_input(core, code):
    with pytest.raises(TruncatedInputError):
        core.decode_insn(code)


@pytest.mark.parametrize("code", ["F0 EC", "F0 66 ED", "66 F0 6E", "F0 E4 71"])
def test_lock_prefix_is_ud(core, code):
    with pytest.raises(LockPrefixError, match="#UD"):
        core.decode_insn(bytes.fromhex(code))


def test_lock_on_non_io_is_reported_as_non_io(core):
    with pytest.raises(NotPortIoError):
        core.decode_insn(b"\xf0\x90")


def test_fifteen_bytes_is_the_limit(core):
    assert core.decode_insn(b"\x66" * 14 + b"\xec").length == 15
    assert core.decode_insn(b"\x66" * 13 + b"\xe4\x71").length == 15
    for code in (b"\x66" * 15 + b"\xec", b"\x66" * 14 + b"\xe4\x71", b"\x66" * 14 + b"\xe4",
                 b"\x66" * 20):
        with pytest.raises(InstructionTooLongError, match="#GP"):
            core.decode_insn(code)


@pytest.mark.parametrize("mode", [0, 8, 128, "64", 64.0, None, True, 2 ** 70])
def test_unsupported_mode(core, mode):
    with pytest.raises(UnsupportedModeError):
        core.decode_insn(b"\xec", mode)
    with pytest.raises(UnsupportedModeError):
        core.decode_insns(b"\xec", mode)


def test_errors_are_value_errors_and_tdxve_errors(core):
    for code in (b"\x90", b"", b"\xf0\xec", b"\x66" * 16):
        with pytest.raises(DecodeError) as exc:
            core.decode_insn(code)
        assert isinstance(exc.value, ValueError) and isinstance(exc.value, tdxve.TdxveError)


# ------------------------------------------------------------------ input types

@pytest.mark.parametrize("make", [
    bytes, bytearray, memoryview,
    lambda b: np.frombuffer(b, dtype=np.uint8),
    lambda b: np.frombuffer(b, dtype=np.int8),
    lambda b: memoryview(bytes(b)).cast("b"),
    lambda b: np.repeat(np.frombuffer(b, dtype=np.uint8), 2)[::2],       # non-contiguous
    lambda b: memoryview(bytes(x for c in b for x in (c, 0)))[::2],       # non-contiguous view
])
def test_buffer_types(core, make):
    i = core.decode_insn(make(bytes.fromhex("66 E5 71")))
    assert (i.kind, i.size, i.port, i.length) == (IoKind.IN, 2, 0x71, 3)


@pytest.mark.parametrize("bad", ["ec", 0xEC, [0xEC], None, np.array([0xEC], dtype=np.uint16),
                                 memoryview(np.array([0xEC], dtype=np.uint16))])
def test_bad_buffer_types(core, bad):
    with pytest.raises(InvalidArgumentError):
        core.decode_insn(bad)


# ------------------------------------------------------------------ streams

STREAM = bytes.fromhex("EE E4 71 66 ED F3 6E 64 6F ED 67 F2 6D")


def test_decode_insns_stream(core):
    out = core.decode_insns(STREAM)
    assert out.dtype == tdxve.INSN_DTYPE
    assert out["offset"].tolist() == [0, 1, 3, 5, 7, 9, 10]
    assert out["length"].tolist() == [1, 2, 2, 2, 2, 1, 3]
    assert out["kind"].tolist() == [IoKind.OUT, IoKind.IN, IoKind.IN, IoKind.OUTS, IoKind.OUTS,
                                    IoKind.IN, IoKind.INS]
    assert out["port"].tolist() == [-1, 0x71, -1, -1, -1, -1, -1]
    assert out["segment"].tolist() == [-1, -1, -1, Segment.DS, Segment.FS, -1, Segment.ES]
    assert out["rep_prefix"].tolist() == [0, 0, 0, 0xF3, 0, 0, 0xF2]
    for rec in out:   # each record equals the single decode at its offset
        single = core.decode_insn(STREAM[rec["offset"]:])
        assert (single.length, single.size, single.addr_size, single.rep) == (
            rec["length"], rec["size"], rec["addr_size"], rec["rep"])


@pytest.mark.parametrize("tail,exc", [(b"\x90", NotPortIoError), (b"\xe4", TruncatedInputError),
                                      (b"\xf0\xec", LockPrefixError),
                                      (b"\x66" * 16, InstructionTooLongError)])
def test_decode_insns_error_policy(core, tail, exc):
    data = STREAM + tail + (b"" if exc is TruncatedInputError else STREAM)
    with pytest.raises(exc) as info:
        core.decode_insns(data)
    assert info.value.offset == len(STREAM)
    assert f"offset {len(STREAM)}" in str(info.value)
    out = core.decode_insns(data, on_error="stop")
    assert len(out) == 7 and out["offset"][-1] + out["length"][-1] == len(STREAM)


def test_decode_insns_empty_and_bad_policy(core):
    assert len(core.decode_insns(b"")) == 0
    assert len(core.decode_insns(b"\x90", on_error="stop")) == 0
    with pytest.raises(InvalidArgumentError):
        core.decode_insns(STREAM, on_error="ignore")


@pytest.mark.parametrize("mode", [16, 32])
def test_decode_insns_modes(core, mode):
    out = core.decode_insns(b"\x66\xed\x67\x6d\xed", mode)
    assert out["size"].tolist() == [4 if mode == 16 else 2, 2 if mode == 16 else 4, 2 if mode == 16 else 4]
    assert out["addr_size"].tolist() == [mode, 48 - mode, mode]


# ------------------------------------------------------------------ exit info

def test_exit_info_instruction_information(core):
    """Ref 3.2: bits 9:7 address size (0/1/2), bits 17:15 segment; 0 for IN/OUT."""
    assert core.exit_info(core.decode_insn(b"\xed"), 0xCFC)[2] == 0
    assert core.exit_info(core.decode_insn(b"\x6e"))[2] == (2 << 7) | (3 << 15)     # 64-bit, DS
    assert core.exit_info(core.decode_insn(b"\x67\x65\x6e"))[2] == (1 << 7) | (5 << 15)
    assert core.exit_info(core.decode_insn(b"\x6c", 16))[2] == (0 << 7) | (0 << 15)  # 16-bit, ES
    assert core.exit_info(core.decode_insn(b"\x67\x6c", 16))[2] == 1 << 7


def test_exit_info_rep_bit_only_on_string_forms(core):
    """Documented choice: bit 5 is set for F2/F3 INS/OUTS, never for IN/OUT (ref 3.4)."""
    assert core.exit_info(core.decode_insn(b"\xf3\xec"), 0x60)[0] == 0x0060_0008
    assert core.exit_info(core.decode_insn(b"\xf2\x6c"), 0x60)[0] == 0x0060_0038
    assert core.exit_info(core.decode_insn(b"\x6c"), 0x60)[0] == 0x0060_0018


def test_exit_info_uses_low_16_bits_of_rdx_and_ignores_it_for_imm(core):
    assert core.exit_info(core.decode_insn(b"\xec"), 0xFFFF_FFFF_0001_03F8)[0] == 0x03F8_0008
    assert core.exit_info(core.decode_insn(b"\xe4\x71"), 0x3F8)[0] == 0x0071_0048


@pytest.mark.parametrize("dx", [-1, 1 << 64, 1.0, None])
def test_exit_info_bad_dx(core, dx):
    with pytest.raises(InvalidArgumentError):
        core.exit_info(core.decode_insn(b"\xec"), dx)


def test_exit_info_bad_insn(core):
    good = core.decode_insn(b"\xe4\x71")
    for bad in (good._replace(size=3), good._replace(kind=7), good._replace(length=16),
                good._replace(port=0x100), good._replace(segment=Segment.DS),
                good._replace(addr_size=8), core.decode_insn(b"\x6c")._replace(segment=None),
                core.decode_insn(b"\x6c")._replace(port=5), "ec", 5, (1, 2)):
        with pytest.raises(InvalidArgumentError):
            core.exit_info(bad)
    # a plain tuple with the same fields is accepted
    assert core.exit_info(tuple(good)) == core.exit_info(good)


def test_exit_infos_batch_matches_single(core):
    recs = core.decode_insns(STREAM)
    dx = np.arange(len(recs), dtype=np.uint64) * np.uint64(0x10001)
    out = core.exit_infos(recs, dx)
    assert out.dtype == tdxve.EXIT_INFO_DTYPE
    for i, rec in enumerate(recs):
        single = core.exit_info(core.decode_insn(STREAM[rec["offset"]:]), int(dx[i]))
        assert tuple(int(x) for x in out[i].tolist()) == single
    scalar = core.exit_infos(recs, 0x3F8)
    assert scalar["exit_qual"][0] == 0x03F8_0000


def test_exit_infos_bad_inputs(core):
    recs = core.decode_insns(STREAM)
    with pytest.raises(InvalidArgumentError):
        core.exit_infos(np.zeros(3, dtype=np.uint64))
    with pytest.raises(InvalidArgumentError):
        core.exit_infos(recs, np.zeros(2, dtype=np.uint64))
    with pytest.raises(InvalidArgumentError):
        core.exit_infos(recs, -1)
    bad = recs.copy()
    bad["size"][3] = 3
    with pytest.raises(InvalidArgumentError, match=r"insns\[3\]"):
        core.exit_infos(bad)
