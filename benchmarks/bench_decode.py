#!/usr/bin/env python
"""Decoder speed benchmark (issue 2): tdxve's compiled core against its peers.

One run measures, over the same seeded workloads:

* ``exit_qual_random_1e7`` -- ``decode_exit_quals`` on 10**7 uint64 exit
  qualifications (90 % valid I/O qualifications built field by field, 5 % of
  them with one random bit flipped, 5 % uniformly random 64-bit values)
  against two numpy-vectorised decodes that build the *same*
  ``EXIT_QUAL_DTYPE`` array (checked for equality once, untimed) and the pure
  twin on a 1 % slice.
* ``io_mixed_stream_1e6`` -- ``decode_insns`` on 10**6 back-to-back 64-bit
  port-I/O instructions (all 12 opcodes, 0-4 random legacy prefixes from
  66/67/F2/F3 and the six segment overrides, a REX byte on a quarter of them,
  imm8 after E4-E7) against iced-x86's Python decoder (bare iteration,
  ``decode_out`` reuse, and iteration extracting the same fields tdxve returns),
  Capstone's ``disasm_lite``, and the pure twin on a 1 % slice.
* ``exit_infos`` over the decoded stream (informational, no target).
* single ``decode_exit_qual`` / ``decode_insn`` calls, both backends.

Every time is the minimum of ``--repeat`` runs (``time.perf_counter``, GC
off) after an untimed run that verifies the output and an untimed warm-up run.
The ``core x`` column is how many times faster ``tdxve._core`` is than that
row, per record. Pure-twin rows run on a slice (their ``n`` column says how
many records) and are compared per record. ``cpu/wall`` is process CPU time
over wall time for the best repeat (about 2 when two threads were busy).
``bytes/s`` counts input bytes: 8 per qualification, the stream bytes for
instructions, 20 per ``INSN_DTYPE`` record for ``exit_infos``.

Targets (issue 2) are printed as PASS/FAIL with the measured ratio; a FAIL is
reported and, with ``--strict``, turns into exit status 1 (default: 0, so a
smoke run never fails on a noisy machine).

Usage::

    python benchmarks/bench_decode.py                  # full size (~30 s)
    python benchmarks/bench_decode.py --quick          # ~100x smaller, 1 repeat
    python benchmarks/bench_decode.py --json out.json  # also write every number
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

# No BLAS is used here; one OpenBLAS thread keeps idle pool threads off the other CPUs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

# Benchmark the tree this script lives in (the package is built in place, not installed).
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "tdxve").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import _machine  # noqa: E402  (benchmarks/ is sys.path[0])
from tdxve import _core, _core_py  # noqa: E402  (direct: the dispatcher is not under test)
from tdxve.abi import EXIT_QUAL_DTYPE, QUAL_RESERVED_MASK  # noqa: E402



def _optional(name: str) -> Any:
    """The module, or None when the peer is not installed (its rows are then skipped)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


iced_x86 = _optional("iced_x86")
capstone = _optional("capstone")

SEED_QUALS = 20_260_702
SEED_INSNS = 20_260_703
CORE = "tdxve._core"
PURE = "tdxve._core_py"

TARGET_QUALS_VS_NUMPY = 10.0
TARGET_INSNS_VS_ICED = 20.0
TARGET_SINGLE_VS_PURE = 3.0


class BenchmarkError(RuntimeError):
    """A peer's output disagrees with tdxve's: the comparison would be meaningless."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise BenchmarkError(msg)


# ---------------------------------------------------------------- workloads

# Ports the DX forms of real guests hit (serial, PCI config, POST, CMOS,
# debugcon, ACPI PM); the rest of the DX ports are uniform.
COMMON_PORTS = np.array([0x3F8, 0x3F9, 0x3FD, 0xCF8, 0xCFC, 0xCFE, 0x80, 0x70, 0x71, 0x402,
                         0xE9, 0x604, 0x608, 0xB2, 0x510, 0x511], dtype=np.uint64)


def make_quals(n: int, seed: int) -> np.ndarray:
    """``exit_qual_random``: realistic I/O exit qualifications plus noise (ref 3.1 layout)."""
    rng = np.random.default_rng(seed)
    string = rng.random(n) < 0.15
    imm = ~string & (rng.random(n) < 0.35)          # imm8 forms are IN/OUT only
    rep = string & (rng.random(n) < 0.8)
    enc = rng.choice(np.array([0, 1, 3], dtype=np.uint64), size=n, p=[0.5, 0.15, 0.35])
    is_in = rng.random(n) < 0.5
    dx_port = np.where(rng.random(n) < 0.75, rng.choice(COMMON_PORTS, size=n),
                       rng.integers(0, 0x10000, size=n, dtype=np.uint64))
    port = np.where(imm, rng.integers(0, 0x100, size=n, dtype=np.uint64), dx_port)
    q = (enc | (is_in.astype(np.uint64) << 3) | (string.astype(np.uint64) << 4)
         | (rep.astype(np.uint64) << 5) | (imm.astype(np.uint64) << 6) | (port << 16))
    cat = rng.random(n)
    flip = cat < 0.05                                 # one random bit flipped
    q[flip] ^= np.uint64(1) << rng.integers(0, 64, size=int(flip.sum()), dtype=np.uint64)
    noise = cat > 0.95                                # uniformly random 64-bit values
    q[noise] = rng.integers(0, 2**64 - 1, size=int(noise.sum()), dtype=np.uint64, endpoint=True)
    return np.asarray(q, dtype=np.uint64)


LEGACY_PREFIXES = np.array([0x66, 0x67, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65],
                           dtype=np.uint8)
IO_OPCODES = np.array([0x6C, 0x6D, 0x6E, 0x6F, 0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF],
                      dtype=np.uint8)


def make_stream(n: int, seed: int) -> tuple[bytes, np.ndarray]:
    """``io_mixed_stream``: ``n`` back-to-back 64-bit port-I/O instructions.

    Each instruction is 0-4 legacy prefixes (66/67/F2/F3/segment overrides,
    repeats allowed; no LOCK, which is #UD), an optional REX directly before
    the opcode (where it counts, ref 3.4), one of the 12 opcodes, and an imm8
    for E4-E7. Returns the bytes and the generated lengths.
    """
    rng = np.random.default_rng(seed)
    slots = np.empty((n, 7), dtype=np.uint8)          # p0 p1 p2 p3 rex opcode imm8
    present = np.zeros((n, 7), dtype=bool)
    npfx = rng.choice(5, size=n, p=[0.40, 0.30, 0.15, 0.10, 0.05])
    slots[:, :4] = LEGACY_PREFIXES[rng.integers(0, LEGACY_PREFIXES.size, size=(n, 4))]
    present[:, :4] = np.arange(4) < npfx[:, None]
    slots[:, 4] = 0x40 + rng.integers(0, 16, size=n)
    present[:, 4] = rng.random(n) < 0.25
    op = IO_OPCODES[rng.integers(0, IO_OPCODES.size, size=n)]
    slots[:, 5] = op
    present[:, 5] = True
    slots[:, 6] = rng.integers(0, 256, size=n)
    present[:, 6] = (op >= 0xE4) & (op <= 0xE7)
    return slots[present].tobytes(), present.sum(axis=1)


# ---------------------------------------------------------------- numpy peers

_RESERVED = np.uint64(QUAL_RESERVED_MASK)


def numpy_quals_u64(q: np.ndarray) -> np.ndarray:
    """Exit-qualification decode in vectorised numpy, every expression on uint64.

    Same output as ``decode_exit_quals``: Linux field decode (size = bits 2:0
    + 1, port = bits 31:16) and ``valid`` = the strict acceptance (ref 3.1).
    """
    out = np.empty(q.shape, dtype=EXIT_QUAL_DTYPE)
    enc = q & np.uint64(7)
    port = (q >> np.uint64(16)) & np.uint64(0xFFFF)
    is_string = (q & np.uint64(0x10)) != 0
    is_imm = (q & np.uint64(0x40)) != 0
    out["raw"] = q
    out["port"] = port
    out["size"] = enc + np.uint64(1)
    out["is_in"] = (q & np.uint64(0x08)) != 0
    out["is_string"] = is_string
    out["is_rep"] = (q & np.uint64(0x20)) != 0
    out["is_imm"] = is_imm
    out["valid"] = (((enc == 0) | (enc == 1) | (enc == 3))
                    & ((q & _RESERVED) == 0)
                    & ~(is_imm & (is_string | (port > 0xFF))))
    return out


def numpy_quals_u8(q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The same decode, tuned: size and flags come from the low byte as uint8.

    Bits 7:0 hold the size and every flag (ref 3.1), so one truncating cast
    makes those expressions work on 1 byte per value instead of 8. With
    ``out`` it writes into a caller's array, like ``decode_exit_quals(out=)``.
    """
    if out is None:
        out = np.empty(q.shape, dtype=EXIT_QUAL_DTYPE)
    lo = q.astype(np.uint8)
    enc = lo & 7
    port = (q >> np.uint64(16)).astype(np.uint16)
    is_string = (lo & 0x10) != 0
    is_imm = (lo & 0x40) != 0
    out["raw"] = q
    out["port"] = port
    out["size"] = enc + 1
    out["is_in"] = (lo & 0x08) != 0
    out["is_string"] = is_string
    out["is_rep"] = (lo & 0x20) != 0
    out["is_imm"] = is_imm
    out["valid"] = (((enc == 0) | (enc == 1) | (enc == 3))
                    & ((q & _RESERVED) == 0)
                    & ~(is_imm & (is_string | (port > 0xFF))))
    return out


def fault_floor(q: np.ndarray) -> np.ndarray:
    """Not a decoder: allocate the output and touch one byte per 4 KiB page (first-touch cost)."""
    out = np.empty(q.shape, dtype=EXIT_QUAL_DTYPE)
    out.view(np.uint8)[::4096] = 0
    return out


def memory_floor(q: np.ndarray) -> np.ndarray:
    """Not a decoder: allocate the output and write all 16 bytes of every record once."""
    out = np.empty(q.shape, dtype=EXIT_QUAL_DTYPE)
    out.view(np.uint64)[:] = 0
    return out


# ---------------------------------------------------------------- iced-x86 / capstone peers

def _iced_tables() -> tuple[dict[Any, tuple[int, int, bool]], dict[Any, int], dict[Any, int]]:
    C = iced_x86.Code
    codes = {  # iced Code -> (IoKind value, size, imm8 port?)
        C.IN_AL_IMM8: (0, 1, True), C.IN_AX_IMM8: (0, 2, True), C.IN_EAX_IMM8: (0, 4, True),
        C.IN_AL_DX: (0, 1, False), C.IN_AX_DX: (0, 2, False), C.IN_EAX_DX: (0, 4, False),
        C.OUT_IMM8_AL: (1, 1, True), C.OUT_IMM8_AX: (1, 2, True), C.OUT_IMM8_EAX: (1, 4, True),
        C.OUT_DX_AL: (1, 1, False), C.OUT_DX_AX: (1, 2, False), C.OUT_DX_EAX: (1, 4, False),
        C.INSB_M8_DX: (2, 1, False), C.INSW_M16_DX: (2, 2, False), C.INSD_M32_DX: (2, 4, False),
        C.OUTSB_DX_M8: (3, 1, False), C.OUTSW_DX_M16: (3, 2, False), C.OUTSD_DX_M32: (3, 4, False),
    }
    K = iced_x86.OpKind
    addr = {K.MEMORY_ESDI: 16, K.MEMORY_ESEDI: 32, K.MEMORY_ESRDI: 64,
            K.MEMORY_SEG_SI: 16, K.MEMORY_SEG_ESI: 32, K.MEMORY_SEG_RSI: 64}
    R = iced_x86.Register
    seg = {R.ES: 0, R.CS: 1, R.SS: 2, R.DS: 3, R.FS: 4, R.GS: 5}
    return codes, addr, seg


def iced_bare(data: bytes) -> int:
    """(a) bare iteration: ``for ins in Decoder(64, data): pass``."""
    n = 0
    for _ in iced_x86.Decoder(64, data):
        n += 1
    return n


def iced_decode_out(data: bytes) -> int:
    """(a') ``decode_out`` into one reused Instruction."""
    d = iced_x86.Decoder(64, data)
    ins = iced_x86.Instruction()
    decode_out = d.decode_out
    n = 0
    while d.can_decode:
        decode_out(ins)
        n += 1
    return n


def iced_fields(data: bytes) -> dict[str, list[int]]:
    """(b) iteration extracting what ``decode_insns`` returns, into Python lists.

    kind and size come from the iced Code; port from the imm8; rep_prefix from
    the REP/REPNE flags (the last of F2/F3 decides in both decoders); address
    size and segment from the memory operand of INS/OUTS (INS is always ES,
    ref 3.3); length from ``len``. Locals are bound outside the loop, as a
    careful user would write it.
    """
    codes, addr_of, seg_of = _iced_tables()
    kinds: list[int] = []
    sizes: list[int] = []
    ports: list[int] = []
    reps: list[int] = []
    addrs: list[int] = []
    segs: list[int] = []
    lens: list[int] = []
    ak, asz, ap, ar, aa, se, al = (kinds.append, sizes.append, ports.append, reps.append,
                                    addrs.append, segs.append, lens.append)
    for ins in iced_x86.Decoder(64, data):
        kind, size, imm = codes[ins.code]
        ak(kind)
        asz(size)
        ap(ins.immediate8 if imm else -1)
        ar(0xF3 if ins.has_rep_prefix else (0xF2 if ins.has_repne_prefix else 0))
        if kind == 2:                       # INS: ES:[rDI], not overridable
            aa(addr_of[ins.op0_kind])
            se(0)
        elif kind == 3:                     # OUTS: seg:[rSI]
            aa(addr_of[ins.op1_kind])
            se(seg_of[ins.memory_segment])
        else:
            aa(-1)
            se(-1)
        al(ins.len)
    return {"kind": kinds, "size": sizes, "port": ports, "rep_prefix": reps,
            "addr_size": addrs, "segment": segs, "length": lens}


def capstone_lite(data: bytes) -> int:
    """``Cs(CS_ARCH_X86, CS_MODE_64).disasm_lite(data, 0)``, counting instructions."""
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    n = 0
    for _ in md.disasm_lite(data, 0):
        n += 1
    return n


# ---------------------------------------------------------------- timing

@dataclass
class Timing:
    """Per timed repeat: wall-clock seconds and process CPU seconds (all threads)."""

    wall: list[float]
    cpu: list[float]


@dataclass
class Row:
    workload: str
    impl: str
    n: int                     # records processed per timed run
    nbytes: int                # input bytes per timed run
    timing: Timing             # every timed repeat
    note: str = ""
    is_core: bool = False
    best: float = 0.0
    ns_per_record: float = 0.0
    records_per_s: float = 0.0
    bytes_per_s: float = 0.0
    core_speedup: float | None = None   # core records/s / this row's records/s
    cpu_per_wall: float = 0.0           # of the best repeat; ~2 = two threads busy

    def __post_init__(self) -> None:
        i = min(range(len(self.timing.wall)), key=self.timing.wall.__getitem__)
        self.best = self.timing.wall[i]
        self.cpu_per_wall = self.timing.cpu[i] / self.best
        self.ns_per_record = self.best / self.n * 1e9
        self.records_per_s = self.n / self.best
        self.bytes_per_s = self.nbytes / self.best


@dataclass
class Target:
    name: str
    peer: str
    required: float
    measured: float | None
    gate: bool = True          # False: reported for information, not a target of the issue
    status: str = field(init=False)

    def __post_init__(self) -> None:
        if self.measured is None:
            self.status = "SKIP"
        else:
            self.status = "PASS" if self.measured >= self.required else "FAIL"


def timed(fn: Callable[[], Any], repeat: int) -> Timing:
    """``repeat`` timings of ``fn()`` after one untimed warm-up run, GC off.

    The warm-up matters for the quick single-repeat run: the first calls of a
    size class pay the allocator's heap growth (page faults) once.
    """
    wall: list[float] = []
    cpu: list[float] = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        fn()
        for _ in range(repeat):
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            cpu.append(time.process_time() - c0)
            wall.append(t1 - t0)
    finally:
        if was_enabled:
            gc.enable()
    return Timing(wall, cpu)


def per_call_times(fn: Callable[[Any], Any], args: Sequence[Any], calls: int,
                   repeat: int) -> tuple[Timing, int]:
    """Times of ``calls`` calls of ``fn`` cycling through ``args`` (timeit-style).

    Includes the Python ``for`` loop overhead, which makes the core/twin ratio
    conservative.
    """
    loops = max(1, calls // len(args))

    def run() -> None:
        for _ in range(loops):
            for a in args:
                fn(a)

    return timed(run, repeat), loops * len(args)


def count_name(n: int) -> str:
    """``10**7`` -> ``"1e7"``; other counts verbatim."""
    k = len(str(n)) - 1
    return f"1e{k}" if n == 10**k else str(n)


def slice_len(n: int) -> int:
    """Records given to the pure twin: 1 % of the workload, at least 1000."""
    return min(n, max(1000, n // 100))


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- benchmarks

def bench_quals(n: int, repeat: int) -> tuple[list[Row], list[Target], dict[str, Any], np.ndarray]:
    wl = f"exit_qual_random_{count_name(n)}"
    q = make_quals(n, SEED_QUALS)
    progress(f"{wl}: {CORE}")
    ref = _core.decode_exit_quals(q)            # untimed reference + warm-up
    rows = [Row(wl, f"{CORE}.decode_exit_quals", n, q.nbytes,
                timed(lambda: _core.decode_exit_quals(q), repeat), is_core=True)]
    for label, fn in (("numpy per-field, low byte as uint8", numpy_quals_u8),
                      ("numpy per-field, uint64 expressions", numpy_quals_u64)):
        progress(f"{wl}: {label}")
        got = fn(q)
        check(got.dtype == EXIT_QUAL_DTYPE and bool(np.all(got == ref)),
              f"{label}: output differs from {CORE}.decode_exit_quals")
        del got
        rows.append(Row(wl, label, n, q.nbytes, timed(partial(fn, q), repeat),
                        note="same EXIT_QUAL_DTYPE array (verified)"))
    # Output reuse: both sides decode into one preallocated array, so neither
    # pays the first-touch page faults of a fresh 16 B/record output.
    reuse_core = np.empty(q.shape, dtype=EXIT_QUAL_DTYPE)
    reuse_np = np.empty(q.shape, dtype=EXIT_QUAL_DTYPE)
    progress(f"{wl}: out= reuse")
    check(bool(np.all(_core.decode_exit_quals(q, out=reuse_core) == ref))
          and bool(np.all(numpy_quals_u8(q, reuse_np) == ref)), "out= reuse output differs")
    rows.append(Row(wl, f"{CORE}.decode_exit_quals(out=reused)", n, q.nbytes,
                    timed(lambda: _core.decode_exit_quals(q, out=reuse_core), repeat),
                    is_core=True, note="writes into a reused output array"))
    rows.append(Row(wl, "numpy low byte as uint8, into reused out", n, q.nbytes,
                    timed(lambda: numpy_quals_u8(q, reuse_np), repeat),
                    note="same reuse; numpy still allocates its temporaries"))
    del reuse_np
    m = slice_len(n)
    qs = q[:m]
    progress(f"{wl}: {PURE} on {m} values")
    check(bool(np.all(_core_py.decode_exit_quals(qs) == ref[:m])),
          f"{PURE}.decode_exit_quals differs from {CORE}")
    rows.append(Row(wl, f"{PURE}.decode_exit_quals", m, qs.nbytes,
                    timed(lambda: _core_py.decode_exit_quals(qs), repeat),
                    note=f"pure twin, first {m} values only"))
    for label, fn, note in (
            ("floor: allocate + write 16 B/record", memory_floor,
             "no decode: the output traffic every decoder pays"),
            ("floor: allocate + touch each page once", fault_floor,
             "no decode: page faults of a fresh output array")):
        fn(q)
        rows.append(Row(wl, label, n, q.nbytes, timed(partial(fn, q), repeat), note=note))
    best_np = min((r for r in rows if r.impl.startswith("numpy per-field")), key=lambda r: r.best)
    core = rows[0]
    core_reuse = next(r for r in rows if r.impl.endswith("(out=reused)"))
    np_reuse = next(r for r in rows if r.impl.endswith("into reused out"))
    targets = [Target("decode_exit_quals >= 10x numpy-vectorised (fresh output)", best_np.impl,
                      TARGET_QUALS_VS_NUMPY, core.records_per_s / best_np.records_per_s),
               Target("decode_exit_quals >= 10x numpy-vectorised (both reuse out)", np_reuse.impl,
                      TARGET_QUALS_VS_NUMPY, core_reuse.records_per_s / np_reuse.records_per_s)]
    info = {"name": wl, "seed": SEED_QUALS, "n": n, "bytes": q.nbytes,
            "valid_fraction": float(ref["valid"].mean()),
            "description": "90% valid I/O exit qualifications (15% string, 35% of the rest imm8, "
                           "75% of DX ports from common devices), 5% of them with one random bit "
                           "flipped, 5% uniformly random 64-bit values"}
    return rows, targets, info, q


def bench_insns(n: int, repeat: int) -> tuple[list[Row], list[Target], dict[str, Any], bytes,
                                             np.ndarray]:
    wl = f"io_mixed_stream_{count_name(n)}"
    data, lengths = make_stream(n, SEED_INSNS)
    nb = len(data)
    progress(f"{wl}: {CORE}")
    recs = _core.decode_insns(data, 64)
    check(recs.shape[0] == n and bool(np.array_equal(recs["length"], lengths)),
          f"{CORE}.decode_insns found {recs.shape[0]} instructions, generated {n}")
    rows = [Row(wl, f"{CORE}.decode_insns", n, nb, timed(lambda: _core.decode_insns(data, 64), repeat),
                is_core=True)]
    targets: list[Target] = []
    iced_rows: dict[str, Row] = {}
    if iced_x86 is not None:
        for key, label, fn in (("a", "iced-x86 (a) bare iteration: for ins in Decoder", iced_bare),
                               ("a'", "iced-x86 (a') decode_out into one Instruction",
                                iced_decode_out)):
            progress(f"{wl}: {label}")
            check(fn(data) == n, f"{label}: instruction count differs from tdxve's {n}")
            iced_rows[key] = Row(wl, label, n, nb, timed(partial(fn, data), repeat),
                                 note="same instruction count (verified)")
        label_b = "iced-x86 (b) iteration + same fields into lists"
        progress(f"{wl}: {label_b}")
        got = iced_fields(data)
        string = recs["kind"] >= 2
        for name, col in got.items():
            ours = np.asarray(recs[name], dtype=np.int64)
            if name == "addr_size":           # iced has no address size on IN/OUT
                ours = np.where(string, ours, -1)
            check(bool(np.array_equal(np.asarray(col, dtype=np.int64), ours)),
                  f"iced-x86 field {name!r} differs from {CORE}.decode_insns")
        del got
        iced_rows["b"] = Row(wl, label_b, n, nb, timed(lambda: iced_fields(data), repeat),
                             note="equivalent output (verified field by field)")
        rows += [iced_rows["b"], iced_rows["a"], iced_rows["a'"]]
    if capstone is not None:
        label = "capstone disasm_lite (mnemonic + operand text)"
        progress(f"{wl}: {label}")
        cs_n = capstone_lite(data)
        rows.append(Row(wl, label, cs_n, nb, timed(lambda: capstone_lite(data), repeat),
                        note=f"{cs_n} instructions" + ("" if cs_n == n else f" (tdxve: {n})")))
    m = slice_len(n)
    end = int(recs["offset"][m - 1]) + int(recs["length"][m - 1])
    sl = data[:end]
    progress(f"{wl}: {PURE} on {m} instructions")
    check(bool(np.array_equal(_core_py.decode_insns(sl, 64), recs[:m])),
          f"{PURE}.decode_insns differs from {CORE}")
    rows.append(Row(wl, f"{PURE}.decode_insns", m, end,
                    timed(lambda: _core_py.decode_insns(sl, 64), repeat),
                    note=f"pure twin, first {m} instructions only"))
    core = rows[0]

    def ratio(key: str) -> float | None:
        r = iced_rows.get(key)
        return None if r is None else core.records_per_s / r.records_per_s

    targets.append(Target("decode_insns >= 20x iced-x86 Python iteration (equivalent output)",
                          iced_rows["b"].impl if "b" in iced_rows else "iced-x86 (not installed)",
                          TARGET_INSNS_VS_ICED, ratio("b")))
    targets.append(Target("decode_insns vs iced-x86 bare iteration (stricter reading)",
                          iced_rows["a"].impl if "a" in iced_rows else "iced-x86 (not installed)",
                          TARGET_INSNS_VS_ICED, ratio("a"), gate=False))
    info = {"name": wl, "seed": SEED_INSNS, "n": n, "bytes": nb,
            "mean_length": nb / n,
            "description": "64-bit mode; per instruction 0-4 legacy prefixes (p = .40/.30/.15/.10/.05) "
                           "drawn from 66 67 F2 F3 26 2E 36 3E 64 65, a REX (40-4F) directly before "
                           "the opcode with p = .25, one of the 12 port-I/O opcodes uniformly, imm8 "
                           "after E4-E7"}
    return rows, targets, info, data, recs


def bench_exit_infos(recs: np.ndarray, repeat: int) -> list[Row]:
    n = recs.shape[0]
    wl = "exit_infos_over_stream"
    rng = np.random.default_rng(SEED_INSNS + 1)
    dx = rng.choice(COMMON_PORTS, size=n)             # one RDX per instruction
    progress(f"{wl}: {CORE}")
    ref = _core.exit_infos(recs, dx)
    rows = [Row(wl, f"{CORE}.exit_infos", n, recs.nbytes,
                timed(lambda: _core.exit_infos(recs, dx), repeat), is_core=True,
                note="per-record RDX array; informational")]
    m = slice_len(n)
    progress(f"{wl}: {PURE} on {m} records")
    check(bool(np.array_equal(_core_py.exit_infos(recs[:m], dx[:m]), ref[:m])),
          f"{PURE}.exit_infos differs from {CORE}")
    rows.append(Row(wl, f"{PURE}.exit_infos", m, recs[:m].nbytes,
                    timed(lambda: _core_py.exit_infos(recs[:m], dx[:m]), repeat),
                    note=f"pure twin, first {m} records only"))
    return rows


def bench_single(q: np.ndarray, data: bytes, recs: np.ndarray, calls: int,
                 repeat: int) -> tuple[list[Row], list[Target]]:
    rows: list[Row] = []
    targets: list[Target] = []
    head = q[:50_000]
    if not _core.decode_exit_quals(head)["valid"].any():      # tiny --n-quals: draw fresh ones
        head = make_quals(50_000, SEED_QUALS)
    quals = [int(v) for v in head[_core.decode_exit_quals(head)["valid"]][:1024]]
    codes = [data[int(o):int(o) + int(ln)] for o, ln in zip(recs["offset"][:1024], recs["length"][:1024])]
    cases: tuple[tuple[str, str, list[Any], int | None], ...] = (
        ("single_decode_exit_qual", "decode_exit_qual", quals, 8),
        ("single_decode_insn", "decode_insn", codes, None))
    for wl, fname, args, nbytes in cases:
        fc = getattr(_core, fname)
        fp = getattr(_core_py, fname)
        check([fc(a) for a in args] == [fp(a) for a in args], f"{fname}: backends disagree")
        pair = []
        for mod, fn in ((CORE, fc), (PURE, fp)):
            progress(f"{wl}: {mod}")
            times, ncalls = per_call_times(fn, args, calls, repeat)
            per_rep_bytes = (ncalls * nbytes if nbytes is not None
                             else (ncalls // len(args)) * sum(len(a) for a in args))
            pair.append(Row(wl, f"{mod}.{fname}(x)", ncalls, per_rep_bytes, times,
                            is_core=mod == CORE,
                            note=f"{len(args)} distinct inputs cycled; incl. loop overhead"))
        rows += pair
        targets.append(Target(f"single {fname} >= 3x pure twin", pair[1].impl,
                              TARGET_SINGLE_VS_PURE, pair[0].records_per_s / pair[1].records_per_s))
    return rows, targets


# ---------------------------------------------------------------- report

def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_state() -> str | None:
    import subprocess
    try:
        r = subprocess.run(["git", "-C", str(_ROOT), "describe", "--always", "--dirty"],
                           capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    from tdxve._version import __version__ as tdxve_version
    core_file = Path(_core.__file__ or "")
    info = _machine.machine_info(
        iced_x86=_dist_version("iced-x86") if iced_x86 is not None else None,
        capstone=_dist_version("capstone") if capstone is not None else None,
        capstone_binding_version=getattr(capstone, "__version__", None),
        tdxve=tdxve_version,
        tdxve_git=_git_state(),
        tdxve_core_file=str(core_file),
        tdxve_core_mtime_utc=(datetime.datetime.fromtimestamp(
            core_file.stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
            if core_file.is_file() else None),
    )
    return info


def _si(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.2f} "


def _time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 10 else f"{s:.2f} s"


def print_report(rows: list[Row], targets: list[Target], machine: dict[str, Any],
                 argv: list[str], quick: bool) -> None:
    print(f"tdxve decoder benchmark: {' '.join(argv)}")
    print(f"  {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, {machine['platform']}")
    print(f"  Python {machine['python']}, numpy {machine['numpy']}, iced-x86 {machine['iced_x86']}, "
          f"capstone {machine['capstone']}; tdxve {machine['tdxve_git']}")
    if "loadavg_at_start" in machine:
        print(f"  load average at start {machine['loadavg_at_start'][0]:.2f}, at end "
              f"{machine['loadavg_at_end'][0]:.2f} (other processes skew the times)")
    headers = ("implementation", "n", "best", "ns/rec", "rec/s", "bytes/s", "cpu/wall", "core x",
               "note")
    by_wl: dict[str, list[Row]] = {}
    for r in rows:
        by_wl.setdefault(r.workload, []).append(r)
    table: list[tuple[str, ...]] = []
    for wl_rows in by_wl.values():
        for r in wl_rows:
            table.append((r.impl, f"{r.n:,}", _time(r.best), f"{r.ns_per_record:,.1f}",
                          _si(r.records_per_s) + "rec/s", _si(r.bytes_per_s) + "B/s",
                          f"{r.cpu_per_wall:.2f}",
                          "1.00" if r.is_core else f"{r.core_speedup:,.1f}", r.note))
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    right = {1, 2, 3, 4, 5, 6, 7}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    i = 0
    for wl, wl_rows in by_wl.items():
        print()
        print(f"[{wl}]")
        print(fmt(headers))
        print(fmt(["-" * w for w in widths]))
        for _ in wl_rows:
            print(fmt(table[i]))
            i += 1
    print()
    print("Targets (issue 2): tdxve._core speed-up over the peer")
    if quick:
        print("  (--quick: ~100x smaller sizes and 1 repeat; a smoke run, not a measurement)")
    for t in targets:
        got = "n/a" if t.measured is None else f"{t.measured:,.1f}x"
        tag = t.status if t.gate else f"({t.status}, informational)"
        print(f"  {tag:24s} {t.name}: {got} (need >= {t.required:g}x) vs {t.peer}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="~100x smaller workloads and 1 repeat (smoke run)")
    p.add_argument("--n-quals", type=int, default=None,
                   help="exit qualifications in the batch workload (default 10**7; quick 10**5)")
    p.add_argument("--n-insns", type=int, default=None,
                   help="instructions in the stream workload (default 10**6; quick 10**4)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed repeats per measurement, the minimum is reported (default 7; quick 1)")
    p.add_argument("--calls", type=int, default=None,
                   help="calls per timed repeat of the single-call benchmarks (default 200000; "
                        "quick 2000)")
    p.add_argument("--json", metavar="FILE", help="write all numbers and machine info to FILE")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if a target FAILs")
    args = p.parse_args(argv)
    n_quals = args.n_quals if args.n_quals is not None else (10**5 if args.quick else 10**7)
    n_insns = args.n_insns if args.n_insns is not None else (10**4 if args.quick else 10**6)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 7)
    calls = args.calls if args.calls is not None else (2_000 if args.quick else 200_000)
    for name, v, lo in (("--n-quals", n_quals, 1), ("--n-insns", n_insns, 1), ("--repeat", repeat, 1),
                        ("--calls", calls, 1)):
        if v < lo:
            p.error(f"{name} must be >= {lo}, got {v}")

    machine = machine_info()
    rows_q, targets_q, wl_q, q = bench_quals(n_quals, repeat)
    rows_i, targets_i, wl_i, data, recs = bench_insns(n_insns, repeat)
    rows_x = bench_exit_infos(recs, repeat)
    rows_s, targets_s = bench_single(q, data, recs, calls, repeat)
    rows = rows_q + rows_i + rows_x + rows_s
    for wl in dict.fromkeys(r.workload for r in rows):
        core = next(r for r in rows if r.workload == wl and r.is_core)
        for r in rows:
            if r.workload == wl:
                r.core_speedup = core.records_per_s / r.records_per_s
    targets = targets_q + targets_i + targets_s
    if hasattr(os, "getloadavg"):
        machine["loadavg_at_end"] = list(os.getloadavg())
    shown_argv = [Path(sys.argv[0]).name if argv is None else "bench_decode.py",
                  *(sys.argv[1:] if argv is None else argv)]
    print_report(rows, targets, machine, shown_argv, args.quick)

    if args.json:
        doc = {
            "benchmark": "bench_decode",
            "argv": shown_argv,
            "config": {"n_quals": n_quals, "n_insns": n_insns, "repeat": repeat, "calls": calls,
                       "quick": args.quick, "timer": "time.perf_counter, min of repeats, GC off"},
            "machine": machine,
            "workloads": {wl_q["name"]: wl_q, wl_i["name"]: wl_i},
            "results": [asdict(r) for r in rows],
            "targets": [asdict(t) for t in targets],
            "all_targets_pass": all(t.status != "FAIL" for t in targets if t.gate),
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    failed = any(t.status == "FAIL" for t in targets if t.gate)
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
