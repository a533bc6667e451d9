"""Fuzz harness: ``Machine.execute`` (and I/O ``execute_exit``) against a hostile host driven by the fuzzer.

Per input the fuzzer's bytes choose:

* the guest: profile (all four), string I/O reject/emulate, normal or early
  path, a port filter (none, Intel's debug allow-list, a callable), ``max_rep``;
* the host: a :class:`~tdxve.host.FaultyHost` whose :class:`~tdxve.host.FaultPlan`
  (seed, rate, kinds, explicit faults by call) comes from the bytes, the
  device-error policy, a deliberately broken device on ports 0x500-0x503
  (raises on read or write, returns a non-int, a huge or a negative value),
  and a *liar* in front of the host that overwrites R10 / R11 / every GPR of
  chosen replies with garbage (a host reply with garbage, a host error status);
* 1-3 steps on the same machine: register files (any 64-bit values, modes
  16/32/64, user mode, DF), port-I/O code (structured prefixes, opcodes and
  imm8 ports, or raw bytes: non-I/O opcodes, LOCK, > 15 bytes, truncation),
  ``execute_exit(30, ...)`` with arbitrary exit qualifications (reserved bits,
  sizes 3/5-8, string with bad instruction information), other exit reasons,
  and a second #VE before VEINFO.GET.

Every step runs on both decoder backends (two identical rigs) through
:class:`tdxve.invariants.ExecuteChecker` -- every invariant of that module
on every instruction -- and the backends must agree on the outcome or
exception class, the registers, what the host saw and replied, and the state
of every device.

Run: ``python fuzz/fuzz_machine.py --seconds 60`` (README.md). Rigs are
reused across inputs (reset between them, rebuilt every 500 inputs) for
speed; ``--fresh`` rebuilds them for every input (exact reproduction).
"""

from __future__ import annotations

import random
import sys
import types
from typing import Any

import fuzzlib
from tdxve.abi import ExitReason
from tdxve.errors import DoubleFault, GuestFault, TdxveError
from tdxve.guest import INTEL_DEBUG_ALLOWED_PORTS, PROFILE_NAMES, ArrayMemory
from tdxve.host import FaultKind, FaultPlan, FaultyHost
from tdxve.invariants import ExecuteChecker, TdvmcallRecorder, device_state
from tdxve.machine import Machine
from tdxve.regs import GPR_NAMES, Regs

BACKENDS = fuzzlib.load_backends()
FRESH = "--fresh" in sys.argv
if FRESH:
    sys.argv.remove("--fresh")
REBUILD_EVERY = 500

IO_OPS = (0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF, 0x6C, 0x6D, 0x6E, 0x6F)
PREFIXES = (0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65, 0x48, 0x40, 0x4F, 0x66, 0xF3, 0xF0)
PORTS = (0x3F8, 0x3F9, 0x3FA, 0x3FB, 0x3FC, 0x3FD, 0x3FE, 0x3FF, 0x80, 0x70, 0x71, 0xCF8, 0xCF9, 0xCFA,
         0xCFB, 0xCFC, 0xCFD, 0xCFE, 0xCFF, 0x608, 0x609, 0x60A, 0x60B, 0x60, 0x64, 0x402, 0xE9,
         0x500, 0x501, 0x502, 0x503, 0x4FF, 0x4FE, 0xFFFF, 0xFFFE, 0xFFFD, 0x1234, 0x0)
OTHER_REASONS = (int(ExitReason.HLT), int(ExitReason.CPUID), int(ExitReason.MSR_READ),
                 int(ExitReason.MSR_WRITE), int(ExitReason.EPT_VIOLATION), int(ExitReason.WBINVD), 0xFFFF)
MEM_BASE, MEM_SIZE = 0x1000, 0x100

SEEDS = [bytes((i + k) % 256 for k in range(64)) for i in range(0, 256, 37)] + [b"\0" * 48, b"\xff" * 96]


class HostileDevice:
    """A device that misbehaves as the input says (on ports 0x500-0x503)."""

    MODES = ("ok", "raise-read", "raise-write", "non-int", "huge", "negative")

    def __init__(self) -> None:
        self.mode = "ok"
        self.latch = 0

    def read(self, port: int, size: int) -> Any:
        if self.mode == "raise-read":
            raise RuntimeError(f"hostile device: read of port {port:#x}")
        if self.mode == "non-int":
            return "not a number"
        if self.mode == "huge":
            return (1 << 200) | self.latch
        if self.mode == "negative":
            return -1 - self.latch
        return self.latch

    def write(self, port: int, size: int, value: int) -> None:
        if self.mode == "raise-write":
            raise ValueError(f"hostile device: write {value:#x} to port {port:#x}")
        self.latch = value


class Liar:
    """Sits between the TDX module and the host; rewrites chosen replies with garbage."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.plan: list[tuple[int, int, int] | None] = []
        self.n = 0

    def tdvmcall(self, regs: Regs) -> None:
        self.inner.tdvmcall(regs)
        act = self.plan[self.n] if self.n < len(self.plan) else None
        self.n += 1
        if act is None:
            return
        kind, a, b = act
        if kind == 0:
            regs.r10 = a                        # an arbitrary status, zero included
        elif kind == 1:
            regs.r11 = b                        # an arbitrary value, all 64 bits
        elif kind == 2:
            regs.r10, regs.r11 = a, b
        else:
            rng = random.Random(a ^ b)          # every GPR of the reply
            for i in range(16):
                regs.set_gpr(i, rng.getrandbits(64))
            if kind == 4:
                regs.r10 = 0                    # ... and still claim success


class Rig:
    """One backend's machine parts, reused across inputs."""

    def __init__(self, name: str, core: types.ModuleType) -> None:
        self.name = name
        self.core = core
        self.hostile = HostileDevice()
        self.host = FaultyHost(FaultPlan(), on_device_error="record")
        self.host.bus.register(0x500, 4, self.hostile, name="hostile")
        self.inner = TdvmcallRecorder(self.host)
        self.liar = Liar(self.inner)
        self.memory = ArrayMemory(MEM_SIZE, base=MEM_BASE)
        self.checker: ExecuteChecker | None = None

    def reset(self, cfg: dict[str, Any]) -> None:
        h = self.host
        h.clock.ns = 0                          # type: ignore[attr-defined]
        h.reset()
        h.uart.tx.clear()
        h.uart.rx.clear()
        h.debugcon.buf.clear()
        h.post.codes.clear()
        h.i8042.device_bytes.clear()
        h.stats.reset()
        h.faults.clear()
        h.fatal_reports.clear()
        h.bus.device_errors.clear()
        h.plan = FaultPlan(cfg["plan_seed"], rate=cfg["rate"], kinds=cfg["kinds"], at=cfg["at"])
        h.bus.on_device_error = cfg["policy"]
        self.hostile.mode = cfg["hostile"]
        self.hostile.latch = 0
        self.liar.plan = cfg["liar"]
        self.liar.n = 0
        self.inner.clear()
        self.memory.data[:] = cfg["fill"]
        m = Machine(profile=cfg["profile"], string_io=cfg["string_io"], path=cfg["path"],
                    host=self.liar, memory=self.memory, port_filter=cfg["filter"],
                    max_rep=cfg["max_rep"], ve_loop_limit=2)
        self.checker = ExecuteChecker(m, device_host=self.host, device_recorder=self.inner,
                                      exclude_devices=("hostile",))

    def state(self) -> tuple[Any, ...]:
        h = self.host
        calls = tuple((c.image, c.reply, type(c.error).__name__) for c in self.inner.calls)
        return (device_state(h), self.hostile.latch, calls, bytes(h.uart.output),
                tuple(h.post.codes), bytes(h.debugcon.output), len(h.faults),
                tuple(sorted(h.stats.calls.items())), tuple(sorted(h.stats.failures.items())),
                h.bus.error_count)


_rigs: list[Rig] = []
_inputs = 0


def rigs() -> list[Rig]:
    global _inputs
    if not _rigs or FRESH or _inputs % REBUILD_EVERY == 0:
        _rigs[:] = [Rig(name, core) for name, core in BACKENDS]
    _inputs += 1
    return _rigs


def _even_ports(port: int) -> bool:
    return port % 2 == 0


def _config(r: fuzzlib.Reader) -> dict[str, Any]:
    kinds_bits = r.u8()
    kinds = [k for i, k in enumerate(FaultKind) if kinds_bits >> i & 1] or list(FaultKind)
    at = {r.u8() % 8: r.pick(list(FaultKind)) for _ in range(r.u8() % 3)}
    liar: list[tuple[int, int, int] | None] = []
    for _ in range(r.u8() % 6):
        sel = r.u8()
        liar.append(None if sel % 3 else (sel % 5, r.interesting_u64(), r.interesting_u64()))
    return {
        "profile": r.pick(PROFILE_NAMES),
        "string_io": r.pick(("reject", "emulate", "emulate")),
        "path": r.pick(("normal", "normal", "normal", "early")),
        "filter": r.pick((None, None, None, INTEL_DEBUG_ALLOWED_PORTS, _even_ports)),
        "max_rep": r.pick((None, 0, 4, 64)),
        "plan_seed": r.u32(),
        "rate": r.pick((0.0, 0.0, 0.05, 0.3, 1.0)),
        "kinds": kinds,
        "at": at,
        "policy": r.pick(("record", "raise")),
        "hostile": r.pick(HostileDevice.MODES),
        "liar": liar,
        "fill": r.u8(),
    }


def _regs(r: fuzzlib.Reader) -> Regs:
    mode = r.pick((64, 64, 64, 64, 32, 16))
    regs = Regs(mode=mode, cpl=3 if r.chance(1, 16) else 0)
    for name in GPR_NAMES:
        regs.set_gpr(GPR_NAMES.index(name), r.interesting_u64() if r.chance(1, 4) else r.u16())
    port = r.pick(PORTS)
    regs.rdx = port | (r.interesting_u64() & ~0xFFFF if r.chance(1, 4) else 0)
    if r.chance(3, 4):
        regs.rsi = MEM_BASE + r.u16() % (MEM_SIZE + 32) - 16
        regs.rdi = MEM_BASE + r.u16() % (MEM_SIZE + 32) - 16
    if r.chance(1, 2):
        regs.rcx = r.u8() % 9
    regs.rip = r.interesting_u64()
    regs.rflags = 0x2 | (0x400 if r.chance(1, 4) else 0) | (0x200 if r.flag() else 0)
    if r.chance(1, 4):
        regs.fs_base = r.interesting_u64()
        regs.gs_base = r.pick((0, MEM_BASE, r.u16()))
    return regs


def _code(r: fuzzlib.Reader, mode: int) -> bytes:
    sel = r.u8()
    if sel % 8 == 0:
        return r.take(r.u8() % 18)               # raw bytes: anything
    n = r.u8() % 4 if sel % 16 else 13 + r.u8() % 4
    pfx = bytes(r.pick(PREFIXES) for _ in range(n))
    op = r.pick(IO_OPS)
    imm = bytes([r.pick(PORTS) & 0xFF if r.flag() else r.u8()]) if 0xE4 <= op <= 0xE7 else b""
    code = pfx + bytes([op]) + imm
    if sel % 32 == 1:
        code = code[:-1]                         # truncated
    return code + r.take(r.u8() % 3)


def _exit_args(r: fuzzlib.Reader) -> dict[str, Any]:
    sel = r.u8() % 4
    if sel == 0:
        qual = r.interesting_u64()
    else:       # an I/O-looking qualification, sometimes with stray bits
        qual = (r.u8() & 0x7F) | r.pick(PORTS) << 16
        if sel == 1:
            qual |= (r.interesting_u64() & 0xFFFFFFFF0000FF80)
    info = r.u32() if r.chance(1, 4) else ((r.u8() % 4) << 7 | (r.u8() % 7) << 15)
    return {"exit_qual": qual, "instr_len": r.pick((1, 2, 3, 15, 0, 16, r.u32())), "instr_info": info}


def _outcome(checker: ExecuteChecker, regs: Regs, step: tuple[str, Any]) -> tuple[Any, ...]:
    kind, arg = step
    try:
        if kind == "code":
            out: Any = checker.execute(regs, arg)
        else:
            reason, kw = arg
            out = checker.execute_exit(regs, reason, **kw)
    except GuestFault as exc:
        return ("fault", type(exc).__name__, exc.reason, exc.vector)
    except TdxveError as exc:
        from tdxve.errors import InvariantViolation  # noqa: PLC0415
        if isinstance(exc, InvariantViolation):
            raise fuzzlib.Finding(f"{exc}") from exc
        return ("error", type(exc).__name__)
    return ("ok", tuple(out))


@fuzzlib.harness
def check_one(data: bytes) -> None:
    r = fuzzlib.Reader(data)
    cfg = _config(r)
    rs = rigs()
    for rig in rs:
        rig.reset(cfg)
    for _ in range(1 + r.u8() % 3):
        regs = _regs(r)
        pre_inject = r.chance(1, 16)
        sel = r.u8() % 16
        if sel < 12:
            step: tuple[str, Any] = ("code", _code(r, regs.mode))
        elif sel < 15:
            step = ("exit", (int(ExitReason.IO_INSTRUCTION), _exit_args(r)))
        else:
            step = ("exit", (r.pick(OTHER_REASONS), {"exit_qual": r.u64() if r.flag() else 0,
                                                     "instr_len": r.pick((1, 2, 3, 0))}))
        pre_code = bytes([r.pick(IO_OPS[4:8])])
        results = []
        for rig in rs:
            assert rig.checker is not None
            m = rig.checker.machine
            with fuzzlib.backend_bound(rig.core):
                if pre_inject:
                    m.tdx.inject_io_ve(regs.copy(), pre_code)     # VE info valid: next #VE is a #DF
                mine = regs.copy()
                outcome = _outcome(rig.checker, mine, step)
                if m.tdx.ve_pending:
                    m.guest.get_ve_info()                         # drain it for the next step
            results.append((rig.name, (outcome, mine.as_dict(), rig.state())))
            if pre_inject and outcome[0] != "error" and outcome[1] != DoubleFault.__name__:
                raise fuzzlib.Finding(f"{rig.name}: #VE with valid VE info gave {outcome}, not #DF")
        fuzzlib.agree(f"step {step!r:.160} with {cfg['profile']}/{cfg['string_io']}/{cfg['path']}",
                      results)


if __name__ == "__main__":
    sys.exit(fuzzlib.main(check_one, name="machine", seeds=SEEDS, max_len=512))
