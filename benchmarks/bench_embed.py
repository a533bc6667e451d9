#!/usr/bin/env python
"""Embedding speed (issue 5): an OUT-heavy guest loop under Unicorn.

The guest (64-bit mode, Unicorn ``UC_MODE_64``) is the classic port-0x80
"I/O delay" loop::

    mov ecx, N ; mov dx, 0x80
    L: out dx, al ; dec ecx ; jnz L
    hlt

Rows (events = OUT instructions executed; each on both decoder backends, the
pure twin in a child process with ``TDXVE_PUREPYTHON=1``):

* ``empty_hook``   -- Unicorn with an empty Python IN hook and OUT hook
  (``UC_HOOK_INSN``): the cost of getting into Python at all;
* ``tdxve``        -- ``tdxve.embed.unicorn.attach(uc, Machine())``: every OUT
  goes through the whole path (decode at RIP, #VE, the normal-path handler,
  TDG.VP.VMCALL<Instruction.IO>, ``tdxve.host.Host`` -> POST-code device),
  on the default fast path: compiled hooks that Unicorn calls directly and
  that run the round trip as one replay-kernel event (the pure twin's
  "fast path" is ctypes callbacks doing the same steps in Python).
  Target: at least 0.6x the ``empty_hook`` rate.
* ``tdxve_python`` -- diagnostic: the same with ``attach(..., fast=False)``:
  every OUT through ``Machine.execute`` (the readable model);
* ``adapter_only`` -- diagnostic: tdxve attached to a stub machine whose
  ``execute`` only advances RIP, i.e. the Python adapter's own cost (register
  batch read, code fetch, mode derivation, decode, Regs) without the TDX model;
* ``machine_only`` -- diagnostic: ``Machine.execute`` on the same ``OUT DX, AL``
  with no Unicorn at all.

Every rate is the best of ``--repeat`` runs (``time.perf_counter``, GC off)
after an untimed warm-up. Speed is measured here, never asserted in tests.

Usage::

    python benchmarks/bench_embed.py                  # ~15 s
    python benchmarks/bench_embed.py --quick          # smoke run
    python benchmarks/bench_embed.py --json out.json  # also write every number
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

# Benchmark the tree this script lives in (the package is built in place, not installed).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_RATIO = 0.6
LOAD = 0x1000


def loop_code(n: int) -> bytes:
    """The OUT loop above, ``n`` iterations."""
    return (b"\xb9" + n.to_bytes(4, "little")      # mov ecx, n
            + b"\x66\xba\x80\x00"                   # mov dx, 0x80
            + b"\xee"                               # L: out dx, al
            + b"\xff\xc9"                           # dec ecx
            + b"\x75\xfb"                           # jnz L
            + b"\xf4")                              # hlt


def new_uc(n: int) -> Any:
    import unicorn

    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x10000)
    uc.mem_write(LOAD, loop_code(n))
    return uc


class _StubMachine:
    """Advances RIP past the instruction; no #VE model (adapter cost only)."""

    def __init__(self) -> None:
        from tdxve import decode_insn
        from tdxve.guest import ArrayMemory
        from tdxve.machine import Outcome

        self._decode = decode_insn
        self._outcome = Outcome
        self.guest = type("G", (), {})()
        self.guest.memory = ArrayMemory(16)
        self.path = "normal"

    def execute(self, regs: Any, code: bytes) -> Any:
        n = self._decode(code, 64).length
        regs.rip = regs.rip + n
        return self._outcome(30, 0, n, 0, 0, regs.rip, 1, False)

    def execute_exit(self, regs: Any, reason: int, **kw: Any) -> Any:
        regs.rip += 1
        return self._outcome(reason, 0, 1, 0, 0, regs.rip, 1, False)


def run_loop(kind: str, n: int) -> float:
    """Seconds for one run of ``n`` loop iterations."""
    import unicorn
    from unicorn import x86_const

    uc = new_uc(n)
    att: Any = None
    if kind == "empty_hook":
        uc.hook_add(unicorn.UC_HOOK_INSN, lambda uc, port, size, ud: 0, None, 1, 0,
                    x86_const.UC_X86_INS_IN)
        uc.hook_add(unicorn.UC_HOOK_INSN, lambda uc, port, size, value, ud: None, None, 1, 0,
                    x86_const.UC_X86_INS_OUT)
    elif kind in ("tdxve", "tdxve_python"):
        from tdxve.embed.unicorn import attach
        from tdxve.machine import Machine

        att = attach(uc, Machine(), fast=kind == "tdxve")
    elif kind == "adapter_only":
        from tdxve.embed.unicorn import attach

        attach(uc, _StubMachine())
    else:
        raise ValueError(kind)
    gc.disable()
    try:
        t0 = time.perf_counter()
        uc.emu_start(LOAD, LOAD + len(loop_code(n)))
        t = time.perf_counter() - t0
    finally:
        gc.enable()
    if kind == "tdxve" and att.fast and att.fast_accesses != n:
        raise RuntimeError(f"the fast path served {att.fast_accesses} of {n} OUTs ({att.fast_off})")
    return t


def run_machine_only(n: int) -> float:
    from tdxve.machine import Machine
    from tdxve.regs import Regs

    m = Machine()
    regs = Regs(rax=0x55, rdx=0x80, rip=LOAD)
    code = b"\xee"
    ex = m.execute
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            regs.rip = LOAD
            ex(regs, code)
        return time.perf_counter() - t0
    finally:
        gc.enable()


@dataclass
class Row:
    backend: str
    name: str
    events: int
    seconds: float
    events_per_s: float
    us_per_event: float


def best(fn: Callable[[], float], repeat: int) -> float:
    fn()                                     # warm-up
    return min(fn() for _ in range(repeat))


def measure(backend: str, sizes: dict[str, int], repeat: int) -> list[Row]:
    rows = []
    if backend == "python":
        # The twin's "fast path" is ctypes callbacks running the replay twin: no faster
        # than the Python path, so it gets that row's event count.
        sizes = dict(sizes, tdxve=sizes["tdxve_python"])
    for name in ("empty_hook", "tdxve", "tdxve_python", "adapter_only", "machine_only"):
        n = sizes[name]
        if name == "machine_only":
            t = best(lambda: run_machine_only(n), repeat)
        else:
            t = best(lambda: run_loop(name, n), repeat)
        rows.append(Row(backend, name, n, t, n / t, t / n * 1e6))
    return rows


def child_rows(sizes: dict[str, int], repeat: int) -> list[Row]:
    """The same measurement with the pure twin, in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ, TDXVE_PUREPYTHON="1")
        cmd = [sys.executable, __file__, "--child", str(out), "--repeat", str(repeat),
               "--sizes", json.dumps(sizes)]
        subprocess.run(cmd, check=True, env=env)
        return [Row(**r) for r in json.loads(out.read_text())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small loops, 1 repeat")
    p.add_argument("--repeat", type=int, default=3, help="runs per row; the best is reported (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    p.add_argument("--strict", action="store_true", help="exit status 1 when the target is missed")
    p.add_argument("--no-pure", action="store_true", help="skip the pure-Python twin")
    p.add_argument("--child", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--sizes", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    try:
        import unicorn
    except ImportError:
        sys.stderr.write("bench_embed needs unicorn: pip install 'tdxve[unicorn]'\n")
        return 2
    import tdxve

    if args.child:
        sizes = json.loads(args.sizes)
        rows = measure(tdxve.BACKEND, sizes, args.repeat)
        Path(args.child).write_text(json.dumps([asdict(r) for r in rows]))
        return 0

    if args.quick:
        sizes = {"empty_hook": 20_000, "tdxve": 20_000, "tdxve_python": 2_000, "adapter_only": 5_000,
                 "machine_only": 2_000}
        repeat = 1
    else:
        sizes = {"empty_hook": 500_000, "tdxve": 500_000, "tdxve_python": 20_000, "adapter_only": 50_000,
                 "machine_only": 20_000}
        repeat = args.repeat
    rows = measure(tdxve.BACKEND, sizes, repeat)
    if not args.no_pure and tdxve.BACKEND != "python":
        rows += child_rows(sizes, repeat)

    print(f"bench_embed: OUT DX, AL loop to port 0x80 under Unicorn {unicorn.__version__} "
          f"(Python {platform.python_version()}, {platform.machine()})")
    print(f"{'backend':8} {'row':13} {'events':>8} {'events/s':>12} {'us/event':>9} {'vs empty':>9}")
    results: dict[str, Any] = {"rows": [asdict(r) for r in rows], "targets": []}
    status = 0
    for backend in dict.fromkeys(r.backend for r in rows):
        base = next(r for r in rows if r.backend == backend and r.name == "empty_hook")
        for r in (r for r in rows if r.backend == backend):
            ratio = r.events_per_s / base.events_per_s
            print(f"{r.backend:8} {r.name:13} {r.events:>8} {r.events_per_s:>12,.0f} "
                  f"{r.us_per_event:>9.2f} {ratio:>8.3f}x")
        att = next(r for r in rows if r.backend == backend and r.name == "tdxve")
        ratio = att.events_per_s / base.events_per_s
        ok = ratio >= TARGET_RATIO
        print(f"  target ({backend}): tdxve attached >= {TARGET_RATIO}x the empty-hook rate: "
              f"{'PASS' if ok else 'FAIL'} ({ratio:.3f}x)")
        results["targets"].append({"backend": backend, "ratio": ratio, "target": TARGET_RATIO, "pass": ok})
        if not ok and args.strict:
            status = 1
    if args.json:
        results["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                              "unicorn": unicorn.__version__,
                              "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        Path(args.json).write_text(json.dumps(results, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
