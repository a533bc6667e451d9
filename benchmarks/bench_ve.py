#!/usr/bin/env python
"""Single-event speed of the #VE model (issue 3): ``Machine.execute`` events per second.

One event is one port-I/O instruction through the whole path: decode, VE
info + #VE (TdxModule), the guest's #VE handler (VEINFO.GET, exit
qualification decode, TDG.VP.VMCALL<Instruction.IO> through the TDX module's
register-select logic), the host, the RAX merge and the RIP advance.

Workloads (each on both decoder backends; the pure twin runs in a child
process with ``TDXVE_PUREPYTHON=1``):

* ``in_al_dx`` / ``out_dx_al`` / ``in_eax_dx`` / ``out_imm8_al``: profile
  ``linux``, normal path, a trivial device (a host whose IN returns 0xFF and
  whose OUT is dropped, with KVM's size/direction checks);
* ``in_al_dx_linux2022`` and ``in_al_dx_early``: the same IN under the 2022
  profile and on the early path;
* ``rep_outsb_64``: emulated ``REP OUTSB`` of 64 bytes (``string_io="emulate"``),
  reported per instruction and per element;
* ``out_uart_host``: ``OUT DX, AL`` to the 16550 at 0x3F8 of ``tdxve.host.Host``
  (skipped while that package is not importable).

Every time is the minimum of ``--repeat`` runs of ``--events`` executions
(``time.perf_counter``, GC off) after one untimed warm-up run. Speed is
measured here, never asserted in tests.

Usage::

    python benchmarks/bench_ve.py                  # ~20 s
    python benchmarks/bench_ve.py --quick          # smoke run, 1 repeat, few events
    python benchmarks/bench_ve.py --json out.json  # also write every number
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

# Benchmark the tree this script lives in (the package is built in place, not installed).
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "tdxve").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import _machine  # noqa: E402  (benchmarks/ is sys.path[0])
from tdxve._backend import BACKEND  # noqa: E402
from tdxve.guest import ArrayMemory  # noqa: E402
from tdxve.machine import Machine  # noqa: E402
from tdxve.regs import Regs  # noqa: E402


class TrivialHost:
    """The cheapest honest host: KVM's operand checks, IN reads 0xFF.., OUT is dropped."""

    def tdvmcall(self, regs: Regs) -> None:
        if regs.r11 != 30 or regs.r12 not in (1, 2, 4) or regs.r13 not in (0, 1):
            regs.r10 = 0x8000000000000000
        elif regs.r13 == 0:
            regs.r11 = (1 << (8 * regs.r12)) - 1


@dataclass
class Row:
    workload: str
    backend: str
    events: int
    times: list[float]
    elements_per_event: int = 1
    note: str = ""
    best: float = 0.0
    us_per_event: float = 0.0
    events_per_s: float = 0.0
    elements_per_s: float = 0.0

    def __post_init__(self) -> None:
        self.best = min(self.times)
        self.us_per_event = self.best / self.events * 1e6
        self.events_per_s = self.events / self.best
        self.elements_per_s = self.events_per_s * self.elements_per_event


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    times = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        fn()
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return times


def _loop(m: Machine, regs: Regs, code: bytes, n: int,
          reset: Callable[[Regs], None] | None = None) -> Callable[[], None]:
    execute = m.execute

    def run() -> None:
        for _ in range(n):
            if reset is not None:
                reset(regs)
            execute(regs, code)
    return run


def workloads(n: int) -> list[tuple[str, Callable[[], None], int, str]]:
    """(name, run, elements per event, note) for every workload available here."""
    out: list[tuple[str, Callable[[], None], int, str]] = []
    for name, code, dx, profile, path in (
            ("in_al_dx", b"\xec", 0x3FD, "linux", "normal"),
            ("out_dx_al", b"\xee", 0x3F8, "linux", "normal"),
            ("in_eax_dx", b"\xed", 0xCFC, "linux", "normal"),
            ("out_imm8_al", b"\xe6\x80", 0, "linux", "normal"),
            ("in_al_dx_linux2022", b"\xec", 0x3FD, "linux-2022", "normal"),
            ("in_al_dx_early", b"\xec", 0x3FD, "linux", "early")):
        m = Machine(profile=profile, path=path, host=TrivialHost())
        regs = Regs(rip=0xFFFFFFFF81000000, rdx=dx, rax=0x41)
        out.append((name, _loop(m, regs, code, n), 1, f"profile {profile}, {path} path, trivial device"))

    mem = ArrayMemory(4096)
    mem.write(0x100, bytes(range(64)))
    m = Machine(string_io="emulate", memory=mem, host=TrivialHost())
    regs = Regs(rip=0xFFFFFFFF81000000, rdx=0x3F8)

    def reset(r: Regs) -> None:
        r.rsi = 0x100
        r.rcx = 64

    out.append(("rep_outsb_64", _loop(m, regs, b"\xf3\x6e", max(1, n // 64), reset), 64,
                "string_io=emulate, 64 elements per instruction"))

    try:
        host_cls = importlib.import_module("tdxve.host").Host
    except (ImportError, AttributeError):
        host_cls = None
    if host_cls is not None:
        m = Machine(host=host_cls())
        regs = Regs(rip=0xFFFFFFFF81000000, rdx=0x3F8, rax=0x41)
        out.append(("out_uart_host", _loop(m, regs, b"\xee", n), 1, "tdxve.host.Host 16550A at 0x3F8"))
    return out


def measure(n: int, repeat: int) -> list[Row]:
    rows = []
    for name, run, elems, note in workloads(n):
        events = n if elems == 1 else max(1, n // 64)
        rows.append(Row(name, BACKEND, events, timed(run, repeat), elems, note))
    return rows


def machine_info() -> dict[str, Any]:
    return _machine.machine_info(backend=BACKEND)


def child_rows(args: argparse.Namespace) -> tuple[list[Row], str]:
    """Run this script again on the pure twin; returns its rows (or an error note)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--events", str(args.events),
               "--repeat", str(args.repeat), "--json", str(out)]
        env = dict(os.environ, TDXVE_PUREPYTHON="1")
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0 or not out.is_file():
            return [], f"pure-twin child failed: {r.stderr.strip()[-500:]}"
        doc = json.loads(out.read_text(encoding="utf-8"))
    return [Row(**{k: v for k, v in d.items() if k in ("workload", "backend", "events", "times",
                                                       "elements_per_event", "note")})
            for d in doc["results"]], ""


def print_table(rows: list[Row]) -> None:
    headers = ("workload", "backend", "events", "best", "us/event", "events/s", "elements/s", "note")
    table = [(r.workload, r.backend, f"{r.events:,}", f"{r.best * 1e3:.1f} ms", f"{r.us_per_event:.2f}",
              f"{r.events_per_s:,.0f}", f"{r.elements_per_s:,.0f}", r.note) for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    right = {2, 3, 4, 5, 6}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(fmt(headers))
    print(fmt(tuple("-" * w for w in widths)))
    for t in table:
        print(fmt(t))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2000 events, 1 repeat")
    p.add_argument("--events", type=int, default=None, help="executions per timed run (default 20000)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs, minimum reported (default 5)")
    p.add_argument("--backend", choices=("both", "active"), default="both",
                   help="'both' (default) also runs the pure twin in a child process")
    p.add_argument("--json", metavar="FILE", help="write every number and machine info to FILE")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.events = args.events if args.events is not None else (2_000 if args.quick else 20_000)
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    if args.events < 1 or args.repeat < 1:
        p.error("--events and --repeat must be >= 1")

    rows = measure(args.events, args.repeat)
    note = ""
    if not args.child and args.backend == "both" and BACKEND != "python":
        pure, note = child_rows(args)
        rows += pure
    if not args.child:
        info = machine_info()
        print(f"tdxve #VE model benchmark: Machine.execute, {args.events:,} events x {args.repeat} "
              f"repeat(s), best run")
        print(f"  {info['cpu_model']}, {info['logical_cpus']} logical CPUs, Python {info['python']}")
        print()
        print_table(rows)
        if note:
            print(f"\n{note}")
    if args.json:
        doc = {"benchmark": "bench_ve",
               "config": {"events": args.events, "repeat": args.repeat, "quick": args.quick,
                          "timer": "time.perf_counter, min of repeats, GC off"},
               "machine": machine_info(), "results": [asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        if not args.child:
            print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
