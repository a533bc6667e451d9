"""Exit-qualification decode/encode (issue 2; SDM Table 27-5 = reference 3.1, Linux decode = 1.3)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vectors import exit_qual_vectors

import tdxve
from tdxve.errors import ExitQualError, InvalidArgumentError, TdxveError

U64 = (1 << 64) - 1


@pytest.mark.parametrize("vec", exit_qual_vectors(), ids=lambda v: v.code.hex(" "))
def test_reference_6_1_vectors_decode(core, vec):
    """Reference 6.1: each exit qualification decodes to the tabulated fields."""
    q = core.decode_exit_qual(vec.exit_qual)
    assert q.raw == vec.exit_qual
    assert q.port == vec.port
    assert q.size == vec.size
    assert q.is_in == vec.kind.startswith("IN")
    assert q.is_string == (vec.kind in ("INS", "OUTS"))
    assert q.is_imm == (vec.code[-2:-1] in (b"\xe4", b"\xe5", b"\xe6", b"\xe7"))
    assert core.encode_exit_qual(size=q.size, is_in=q.is_in, port=q.port, is_string=q.is_string,
                                 is_rep=q.is_rep, is_imm=q.is_imm) == vec.exit_qual


def test_field_layout_bits(core):
    """Ref 3.1: bits 2:0 size-1, 3 IN, 4 string, 5 REP, 6 imm, 31:16 port."""
    q = core.decode_exit_qual(0x1234_0000 | 0b0111011)
    assert (q.size, q.is_in, q.is_string, q.is_rep, q.is_imm, q.port) == (4, True, True, True, False, 0x1234)
    q = core.decode_exit_qual(0x00FF_0000 | 0b1001001)
    assert (q.size, q.is_in, q.is_string, q.is_rep, q.is_imm, q.port) == (2, True, False, False, True, 0xFF)
    assert isinstance(q, tdxve.ExitQual)
    assert type(q.is_in) is bool and type(q.port) is int and type(q.size) is int


@pytest.mark.parametrize("enc,size", [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8)])
def test_linux_decode_size_is_bits_plus_one_without_validation(core, enc, size):
    """Ref 1.3: Linux computes (exit_qual & 7) + 1 with no validation (2 -> 3, 4..7 -> 5..8)."""
    q = core.decode_exit_qual(0x03F8_0000 | enc, strict=False)
    assert q.size == size
    assert q.port == 0x3F8
    if enc in (0, 1, 3):
        assert core.decode_exit_qual(0x03F8_0000 | enc).size == size
    else:
        with pytest.raises(ExitQualError, match="size encoding"):
            core.decode_exit_qual(0x03F8_0000 | enc)


def test_linux_decode_port_uses_only_bits_31_16(core):
    """Ref 1.3: the port is computed on a u32 copy, so bits 63:32 never reach it."""
    q = core.decode_exit_qual(0xFFFF_FFFF_ABCD_0008, strict=False)
    assert q.port == 0xABCD and q.is_in and q.size == 1
    assert q.raw == 0xFFFF_FFFF_ABCD_0008


@pytest.mark.parametrize("bit", list(range(7, 16)) + list(range(32, 64)))
def test_strict_rejects_every_reserved_bit(core, bit):
    """Ref 3.1: bits 15:7 and 63:32 are reserved (0)."""
    q = 0x03F8_0000 | (1 << bit)
    with pytest.raises(ExitQualError) as exc:
        core.decode_exit_qual(q)
    assert hex(q) in str(exc.value) and exc.value.value == q
    assert core.decode_exit_qual(q, strict=False).port == 0x3F8


def test_strict_rejects_impossible_combinations(core):
    """Ref 3.3: INS/OUTS take the port from DX, and an immediate port is an imm8."""
    with pytest.raises(ExitQualError, match="string instruction"):
        core.decode_exit_qual(0x0080_0050)          # string + imm
    with pytest.raises(ExitQualError, match="imm8"):
        core.decode_exit_qual(0x0100_0040)          # imm port 0x100
    assert core.decode_exit_qual(0x0100_0000).port == 0x100   # same port from DX is fine
    # REP without string is accepted: not reserved by the SDM (ref 3.4, 8)
    assert core.decode_exit_qual(0x03F8_0020).is_rep


@pytest.mark.parametrize("bad", [-1, 1 << 64, (1 << 64) + 5])
def test_out_of_range_values_raise_typed_error(core, bad):
    for strict in (True, False):
        with pytest.raises(ExitQualError) as exc:
            core.decode_exit_qual(bad, strict=strict)
        assert isinstance(exc.value, ValueError) and isinstance(exc.value, TdxveError)


@pytest.mark.parametrize("bad", [1.0, "0x3f8", None, b"\x00", True])
def test_non_int_values_raise_typed_error(core, bad):
    with pytest.raises(InvalidArgumentError):
        core.decode_exit_qual(bad)


def test_numpy_integer_scalars_are_accepted(core):
    assert core.decode_exit_qual(np.uint64(0x03FD0008)).port == 0x3FD
    assert core.decode_exit_qual(np.int32(0x03FD0008)).is_in


@pytest.mark.parametrize("kwargs,match", [
    (dict(size=3, is_in=True, port=1), "size"),
    (dict(size=8, is_in=True, port=1), "size"),
    (dict(size=True, is_in=True, port=1), "size"),
    (dict(size=1, is_in=True, port=0x10000), "port"),
    (dict(size=1, is_in=True, port=-1), "port"),
    (dict(size=1, is_in=True, port=0x100, is_imm=True), "imm8"),
    (dict(size=1, is_in=True, port=0x10, is_imm=True, is_string=True), "string"),
    (dict(size=1, is_in=2, port=1), "is_in"),
    (dict(size=1, is_in="yes", port=1), "is_in"),
])
def test_encode_rejects_what_strict_decode_rejects(core, kwargs, match):
    with pytest.raises(ExitQualError, match=match):
        core.encode_exit_qual(**kwargs)


valid_fields = st.fixed_dictionaries({
    "size": st.sampled_from([1, 2, 4]),
    "is_in": st.booleans(),
    "is_string": st.booleans(),
    "is_rep": st.booleans(),
    "is_imm": st.booleans(),
    "port": st.integers(0, 0xFFFF),
}).filter(lambda f: not (f["is_imm"] and (f["is_string"] or f["port"] > 0xFF)))


@settings(max_examples=300, deadline=None)
@given(fields=valid_fields)
def test_encode_then_decode_round_trips(core, fields):
    q = core.encode_exit_qual(**fields)
    d = core.decode_exit_qual(q)
    assert {k: getattr(d, k) for k in fields} == fields
    assert d.raw == q


@settings(max_examples=500, deadline=None)
@given(q=st.integers(0, U64))
def test_encode_is_exact_inverse_of_strict_decode(core, q):
    try:
        d = core.decode_exit_qual(q)
    except ExitQualError:
        return
    assert core.encode_exit_qual(size=d.size, is_in=d.is_in, port=d.port, is_string=d.is_string,
                                 is_rep=d.is_rep, is_imm=d.is_imm) == q


# ------------------------------------------------------------------ batch

def test_batch_matches_single_decodes(core):
    rng = np.random.default_rng(7)
    vals = np.concatenate([
        rng.integers(0, 1 << 63, 3000, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 3000, dtype=np.uint64),
        (rng.integers(0, 0x10000, 3000, dtype=np.uint64) << np.uint64(16)) | rng.integers(0, 0x80, 3000, dtype=np.uint64),
        np.array([v.exit_qual for v in exit_qual_vectors()], dtype=np.uint64),
    ])
    out = core.decode_exit_quals(vals)
    assert out.dtype == tdxve.EXIT_QUAL_DTYPE and out.shape == vals.shape
    for rec, q in zip(out, vals.tolist()):
        lin = core.decode_exit_qual(q, strict=False)
        assert (int(rec["raw"]), int(rec["port"]), int(rec["size"]), bool(rec["is_in"]),
                bool(rec["is_string"]), bool(rec["is_rep"]), bool(rec["is_imm"])) == (
            lin.raw, lin.port, lin.size, lin.is_in, lin.is_string, lin.is_rep, lin.is_imm)
        try:
            core.decode_exit_qual(q)
            assert rec["valid"]
        except ExitQualError:
            assert not rec["valid"]


def test_batch_dtype_layout_is_documented():
    dt = tdxve.EXIT_QUAL_DTYPE
    assert dt.itemsize == 16
    assert dt.names == ("raw", "port", "size", "is_in", "is_string", "is_rep", "is_imm", "valid")
    assert dt["raw"] == np.dtype("<u8") and dt["port"] == np.dtype("<u2")


@pytest.mark.parametrize("values", [
    [0x03FD0008, 0x2, 1 << 63, (1 << 64) - 1],           # list spanning int64 and uint64
    np.array([[0x03FD0008, 2], [3, 4]], dtype=np.uint64),  # 2-D keeps its shape
    np.array([0x03FD0008, 7], dtype=np.int64),
    np.array([0x03FD0008, 7], dtype=">u8"),               # big-endian input
    np.arange(10, dtype=np.uint64)[::3],                   # non-contiguous
    np.array([], dtype=np.uint64),
])
def test_batch_accepts_integer_inputs(core, values):
    out = core.decode_exit_quals(values)
    ref = np.asarray(values, dtype=object) if isinstance(values, list) else values
    assert out.shape == np.shape(ref)
    assert [int(x) for x in out["raw"].reshape(-1)] == [int(x) for x in np.asarray(ref).reshape(-1)]


@pytest.mark.parametrize("values", [
    [1, -1], np.array([1, -5], dtype=np.int64), np.array([1.5]), [1 << 64], ["a"], [True], None,
])
def test_batch_rejects_bad_inputs(core, values):
    with pytest.raises(InvalidArgumentError):
        core.decode_exit_quals(values)


def test_batch_out_parameter_decodes_in_place(core):
    vals = np.array([[0x03FD0008, 2], [0x00710048, 1 << 40]], dtype=np.uint64)
    out = np.zeros(vals.shape, dtype=tdxve.EXIT_QUAL_DTYPE)
    res = core.decode_exit_quals(vals, out=out)
    assert res is out
    assert out.tobytes() == core.decode_exit_quals(vals).tobytes()
    assert out["valid"].tolist() == [[True, False], [True, False]]


@pytest.mark.parametrize("make_out", [
    lambda v: np.zeros(3, dtype=tdxve.EXIT_QUAL_DTYPE),                 # wrong shape
    lambda v: np.zeros(v.shape, dtype=np.uint64),                        # wrong dtype
    lambda v: np.zeros(v.shape[0] * 2, dtype=tdxve.EXIT_QUAL_DTYPE)[::2],  # not contiguous
    lambda v: [0] * v.shape[0],
])
def test_batch_out_parameter_rejects_unsuitable_arrays(core, make_out):
    vals = np.arange(4, dtype=np.uint64)
    with pytest.raises(InvalidArgumentError):
        core.decode_exit_quals(vals, out=make_out(vals))


def test_batch_out_must_not_overlap_input(core):
    buf = np.zeros(4, dtype=tdxve.EXIT_QUAL_DTYPE)
    with pytest.raises(InvalidArgumentError, match="overlap"):
        core.decode_exit_quals(buf.view(np.uint64)[:4], out=buf)
    ro = np.zeros(4, dtype=tdxve.EXIT_QUAL_DTYPE)
    ro.flags.writeable = False
    with pytest.raises(InvalidArgumentError):
        core.decode_exit_quals(np.arange(4, dtype=np.uint64), out=ro)


@pytest.mark.parametrize("values", [[0, True], (False, 5), [np.bool_(True)]])
def test_batch_rejects_bools_inside_sequences(core, values):
    """A bool is rejected as a scalar, so it is rejected inside a list too (docs/bad-input.md)."""
    with pytest.raises(InvalidArgumentError):
        core.decode_exit_quals(values)
