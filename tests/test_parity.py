"""Mechanical parity of the compiled core and the pure twin (issue 2; house style 5.4).

(a) the same public names with the same signatures and docstrings, (b) identical
results and dtypes on >= 100 000 random exit qualifications and byte strings,
(c) the same exception class and message on every malformed input.
"""

from __future__ import annotations

import inspect
import random

import numpy as np
import pytest

import tdxve
from tdxve import _core, _core_py

PUBLIC = [n for n in _core_py.__all__ if n != "BACKEND"]


def test_same_public_names():
    assert sorted(_core.__all__) == sorted(_core_py.__all__)
    for name in _core_py.__all__:
        assert hasattr(_core, name), name


CLASSES = [n for n in PUBLIC if inspect.isclass(getattr(_core_py, n))]
FUNCTIONS = [n for n in PUBLIC if n not in CLASSES]


def _shape(fn):
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_same_signatures(name):
    assert _shape(getattr(_core, name)) == _shape(getattr(_core_py, name))


def _members(cls):
    return sorted(n for n in dir(cls) if not n.startswith("_"))


@pytest.mark.parametrize("name", CLASSES)
def test_same_classes(name):
    """Public classes: the same methods (signatures, docstrings), properties and constructor."""
    c, py = getattr(_core, name), getattr(_core_py, name)
    assert _members(c) == _members(py)
    for m in _members(py):
        a, b = getattr(c, m), getattr(py, m)
        if isinstance(b, property):
            assert not callable(a) and a.__doc__ == b.__doc__, m
            assert (b.fset is not None) == (m == "draining"), m   # the one writable property
        else:
            assert _shape(a) == _shape(b), m
            assert _doc(a) == _doc(b) and _doc(b), m
    # The compiled constructor's signature is only in its docstring (embedsignature).
    first = inspect.getdoc(c).split("\n", 1)[0]
    params = [p for p in inspect.signature(py.__init__).parameters.values() if p.name != "self"]
    want = [p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in params]
    got = [p.strip() for p in first[len(name) + 1:-1].split(",") if p.strip() not in ("*", "")]
    assert got == want


def _doc(fn) -> str:
    doc = inspect.getdoc(fn) or ""
    # Cython's embedsignature puts "name(args)" on the first line; compare the prose.
    if doc.startswith((fn.__name__ + "(", getattr(fn, "__qualname__", fn.__name__) + "(")):
        doc = doc.split("\n", 1)[1] if "\n" in doc else ""
    return doc.strip()


@pytest.mark.parametrize("name", PUBLIC)
def test_same_docstrings(name):
    """Docstrings are written twice (the .pyx and the twin); this keeps them identical."""
    doc_c, doc_py = _doc(getattr(_core, name)), _doc(getattr(_core_py, name))
    assert doc_py and doc_c == doc_py


def outcome(fn, *args, **kwargs):
    try:
        r = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - parity of the failure itself is under test
        return ("raised", type(e), str(e), getattr(e, "offset", None), getattr(e, "value", None))
    if isinstance(r, np.ndarray):
        return ("array", r.dtype, r.shape, r.tobytes())
    return ("value", type(r), r, [type(x) for x in r] if isinstance(r, tuple) else None)


def random_quals(rnd: random.Random, n: int) -> list[int]:
    out = []
    for _ in range(n):
        r = rnd.random()
        if r < 0.4:     # plausible I/O qualifications
            q = (rnd.randrange(0x10000) << 16) | rnd.choice([0, 1, 3]) | (rnd.getrandbits(4) << 3)
        elif r < 0.7:   # any low 32 bits
            q = rnd.getrandbits(32)
        else:           # anything
            q = rnd.getrandbits(64)
        out.append(q)
    return out


def random_codes(rnd: random.Random, n: int) -> list[bytes]:
    pool = [0x66, 0x67, 0xF2, 0xF3, 0xF0, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65,
            0x6C, 0x6D, 0x6E, 0x6F, 0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF] + list(range(0x40, 0x50))
    return [bytes(rnd.choice(pool) if rnd.random() < 0.8 else rnd.randrange(256)
                  for _ in range(rnd.randrange(0, 18))) for _ in range(n)]


def test_parity_on_100k_exit_qualifications():
    rnd = random.Random(1)
    quals = random_quals(rnd, 100_000)
    for q in quals:
        for strict in (True, False):
            assert outcome(_core.decode_exit_qual, q, strict=strict) == \
                outcome(_core_py.decode_exit_qual, q, strict=strict), hex(q)
    arr = np.array(quals, dtype=np.uint64)
    assert outcome(_core.decode_exit_quals, arr) == outcome(_core_py.decode_exit_quals, arr)


def test_parity_on_100k_byte_strings():
    rnd = random.Random(2)
    codes = random_codes(rnd, 100_000)
    n_ok = 0
    for i, code in enumerate(codes):
        mode = (16, 32, 64)[i % 3]
        a = outcome(_core.decode_insn, code, mode)
        assert a == outcome(_core_py.decode_insn, code, mode), (code.hex(), mode)
        if a[0] == "value":
            n_ok += 1
            dx = rnd.getrandbits(64)
            assert outcome(_core.exit_info, a[2], dx) == outcome(_core_py.exit_info, a[2], dx)
    assert n_ok > 10_000


def test_parity_on_streams():
    rnd = random.Random(3)
    for trial in range(200):
        stream = b"".join(random_codes(rnd, 30))
        for mode in (16, 32, 64):
            for on_error in ("raise", "stop"):
                a = outcome(_core.decode_insns, stream, mode, on_error=on_error)
                assert a == outcome(_core_py.decode_insns, stream, mode, on_error=on_error)
    # a long valid stream, and its exit infos with per-record DX
    ok = b"".join(bytes([p]) + bytes([op]) for p, op in zip(
        rnd.choices([0x66, 0x67, 0xF3, 0x2E, 0x64, 0x48], k=5000),
        rnd.choices([0x6C, 0x6D, 0x6E, 0x6F, 0xEC, 0xED, 0xEE, 0xEF], k=5000)))
    recs_c, recs_p = _core.decode_insns(ok), _core_py.decode_insns(ok)
    assert recs_c.tobytes() == recs_p.tobytes() and len(recs_c) == 5000
    dx = np.array([rnd.getrandbits(64) for _ in range(5000)], dtype=np.uint64)
    assert outcome(_core.exit_infos, recs_c, dx) == outcome(_core_py.exit_infos, recs_p, dx)


BAD_CALLS = [
    ("decode_exit_qual", (-1,), {}), ("decode_exit_qual", (1 << 64,), {}),
    ("decode_exit_qual", ("x",), {}), ("decode_exit_qual", (0x80,), {}),
    ("decode_exit_qual", (2,), {}), ("decode_exit_qual", (0x100_0040,), {}),
    ("encode_exit_qual", (), dict(size=3, is_in=True, port=1)),
    ("encode_exit_qual", (), dict(size=1, is_in=True, port=70000)),
    ("encode_exit_qual", (), dict(size=1, is_in=None, port=1)),
    ("decode_exit_quals", ([-1],), {}), ("decode_exit_quals", ([0.5],), {}),
    ("decode_insn", (b"\x90",), {}), ("decode_insn", (b"",), {}), ("decode_insn", (b"\xf0\xec",), {}),
    ("decode_insn", (b"\x66" * 16,), {}), ("decode_insn", (b"\xec", 48), {}),
    ("decode_insn", ("ec",), {}), ("decode_insn", (np.zeros(2, np.int32),), {}),
    ("decode_insns", (b"\xec\x90",), {}), ("decode_insns", (b"\xec", 64), dict(on_error="x")),
    ("exit_info", ("ec",), {}), ("exit_info", (tdxve.IoInsn(tdxve.IoKind.IN, 3, None, False, 64, None, 1, 0),), {}),
    ("exit_info", (tdxve.IoInsn(tdxve.IoKind.IN, 1, None, False, 64, None, 1, 0), -1), {}),
    ("exit_infos", (np.zeros(2),), {}),
]


@pytest.mark.parametrize("name,args,kwargs", BAD_CALLS, ids=lambda x: str(x)[:30])
def test_same_exception_class_and_message(name, args, kwargs):
    a = outcome(getattr(_core, name), *args, **kwargs)
    b = outcome(getattr(_core_py, name), *args, **kwargs)
    assert a[0] == "raised" and a == b
    assert issubclass(a[1], tdxve.TdxveError) and issubclass(a[1], ValueError)


def _valid_stream(rnd: random.Random, n_insns: int, mode: int, max_prefixes: int) -> bytes:
    legacy = [0x66, 0x67, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65]
    pool = legacy + (list(range(0x40, 0x50)) if mode == 64 else [])
    ops = [0x6C, 0x6D, 0x6E, 0x6F, 0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF]
    out = bytearray()
    for _ in range(n_insns):
        k = min(rnd.choice([0, 0, 1, 1, 2, 3, 4, 5, 6]), max_prefixes)
        out += bytes(rnd.choice(pool) for _ in range(k))
        op = rnd.choice(ops)
        out.append(op)
        if 0xE4 <= op <= 0xE7:
            out.append(rnd.randrange(256))      # imm8: any byte, prefixes and opcodes included
    return bytes(out)


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_stream_kernel_matches_twin_on_long_streams(mode):
    """The compiled stream kernel has a branch-free fast path (<= 3 prefixes) and an
    exact path; long streams cross its 4 KiB blocks at every possible alignment."""
    rnd = random.Random(mode)
    for max_prefixes in (3, 14):
        data = _valid_stream(rnd, 40_000, mode, max_prefixes)
        a, b = _core.decode_insns(data, mode), _core_py.decode_insns(data, mode)
        assert len(a) == 40_000 and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_stream_kernel_errors_match_twin(mode):
    rnd = random.Random(100 + mode)
    base = _valid_stream(rnd, 6_000, mode, 4)
    bad_bytes = [b"\x90", b"\xf0\xec", b"\x66" * 15 + b"\xec", b"\x0f\x01\xcc", b"\xc4"]
    for trial in range(40):
        cut = rnd.randrange(len(base))
        data = base[:cut] + rnd.choice(bad_bytes) + base[cut:]
        if trial % 5 == 0:
            data = base[:cut]           # truncated tail somewhere
        for on_error in ("raise", "stop"):
            assert outcome(_core.decode_insns, data, mode, on_error=on_error) == \
                outcome(_core_py.decode_insns, data, mode, on_error=on_error)


@pytest.fixture
def small_split():
    """Make the compiled decode_insns use its two-thread path on small streams."""
    _core._set_stream_split_min(200)
    yield
    _core._set_stream_split_min(1 << 18)


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_two_thread_stream_split_matches_twin(small_split, mode):
    """The split starts the second thread at n/2, usually inside an instruction;
    records, errors and stop offsets must equal a single-threaded decode."""
    rnd = random.Random(200 + mode)
    for max_prefixes in (3, 14):
        base = _valid_stream(rnd, 2_000, mode, max_prefixes)
        for trial in range(25):
            cut = rnd.randrange(len(base))
            data = base[:cut] + rnd.choice([b"", b"\x90", b"\xe4", b"\xf0\xec", b"\x66" * 15]) + base[cut:]
            for on_error in ("raise", "stop"):
                assert outcome(_core.decode_insns, data, mode, on_error=on_error) == \
                    outcome(_core_py.decode_insns, data, mode, on_error=on_error)
    # a stream whose halves never synchronise is still decoded (first thread finishes alone)
    data = b"\xe4" * 1001 + b"\xec"          # E4 E4 ... : imm8 chain, phase depends on the start
    assert outcome(_core.decode_insns, data, mode) == outcome(_core_py.decode_insns, data, mode)
