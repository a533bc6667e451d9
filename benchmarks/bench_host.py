#!/usr/bin/env python
"""Host speed benchmark (issue 4): TDG.VP.VMCALL<Instruction.IO> calls per second.

Every workload drives ``Host.tdvmcall`` (or the bus, or a device, for the
reference rows) with a register image exactly like the one Linux's
``handle_in``/``handle_out`` build (R10=0, R11=30, R12 size, R13 direction,
R14 port, R15 data):

* ``io_out_uart_thr``     OUT byte to 0x3F8: Host -> PortBus -> 16550A THR (the headline number)
* ``io_in_uart_lsr``      IN byte from 0x3FD (LSR), the earlyprintk poll
* ``io_out_post``         OUT byte to 0x80
* ``io_in_pci_data``      IN dword from 0xCFC (PCI config of 00:00.0)
* ``io_in_unassigned``    IN dword from a port with no device (all-ones)
* ``io_out_uart_split``   OUT word to 0x3F8: split into two byte accesses
* ``io_rejected_size``    size 3: rejected with INVALID_OPERAND before the bus
* ``io_out_uart_logged``  as the headline, with the event log on
* ``faulty_host_clean``   FaultyHost with an empty plan (the cost of the plan check)
* ``cpuid``               CPUID sub-function (table lookup)
* ``bus_direct_out_uart`` ``bus.write(0x3F8, 1, b)``: the no-#VE path (firmware modes)
* ``uart_write_only``     ``uart.write(0x3F8, 1, b)``: the device alone (ceiling)

An IN overwrites R11 with the data, so IN loops restore R11 = 30 before each
call (one list store, included in the time, as a fresh image would be in a
real TDVMCALL). Every time is the minimum of ``--repeat`` runs with the GC
off after a warm-up; ``ns/call`` and ``calls/s`` are per call. The host is
pure Python and does not use the decoder, so the backend does not matter.

Usage::

    python benchmarks/bench_host.py                  # ~10 s
    python benchmarks/bench_host.py --quick          # smoke run, ~1 s
    python benchmarks/bench_host.py --json out.json  # also write every number
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdxve.devices import ManualClock  # noqa: E402
from tdxve.host import FaultyHost, Host  # noqa: E402
from tdxve.regs import Regs  # noqa: E402

Loop = Callable[[int], None]


def io_image(size: int, direction: int, port: int, value: int = 0) -> Regs:
    return Regs(r10=0, r11=30, r12=size, r13=direction, r14=port, r15=value)


def _out_loop(host: Host, regs: Regs) -> Loop:
    call = host.tdvmcall

    def run(n: int) -> None:
        for _ in range(n):
            call(regs)
    return run


def _in_loop(host: Host, regs: Regs) -> Loop:
    call = host.tdvmcall
    g = regs._g

    def run(n: int) -> None:
        for _ in range(n):
            g[11] = 30
            call(regs)
    return run


def workloads() -> dict[str, tuple[str, Loop, Callable[[], None]]]:
    """name -> (description, loop(n), check) ; check() verifies the workload did what it says."""
    out: dict[str, tuple[str, Loop, Callable[[], None]]] = {}

    h1 = Host(clock=ManualClock())
    r1 = io_image(1, 1, 0x3F8, 0x41)

    def c1() -> None:
        assert h1.uart.tx[-1:] == b"A" and r1.r10 == 0
        h1.uart.clear_output()
    out["io_out_uart_thr"] = ("OUT 0x3F8 (UART THR), 1 byte", _out_loop(h1, r1), c1)

    h2 = Host(clock=ManualClock())
    r2 = io_image(1, 0, 0x3FD)

    def c2() -> None:
        assert r2.r11 == 0x60 and r2.r10 == 0
    out["io_in_uart_lsr"] = ("IN 0x3FD (UART LSR), 1 byte", _in_loop(h2, r2), c2)

    h3 = Host(clock=ManualClock())
    r3 = io_image(1, 1, 0x80, 0x55)

    def c3() -> None:
        assert h3.post.codes[-1] == 0x55
        h3.post.codes.clear()
    out["io_out_post"] = ("OUT 0x80 (POST), 1 byte", _out_loop(h3, r3), c3)

    h4 = Host(clock=ManualClock())
    h4.pci.config_address = 0x8000_0000
    r4 = io_image(4, 0, 0xCFC)

    def c4() -> None:
        assert r4.r11 == 0x12378086
    out["io_in_pci_data"] = ("IN 0xCFC (PCI 00:00.0 dword 0), 4 bytes", _in_loop(h4, r4), c4)

    h5 = Host(clock=ManualClock())
    r5 = io_image(4, 0, 0x1234)

    def c5() -> None:
        assert r5.r11 == 0xFFFFFFFF
    out["io_in_unassigned"] = ("IN 0x1234 (no device), 4 bytes", _in_loop(h5, r5), c5)

    h6 = Host(clock=ManualClock())
    r6 = io_image(2, 1, 0x3F8, 0x4241)

    def c6() -> None:
        assert h6.uart.ier == 0x02 and h6.uart.tx[-1:] == b"A"
        h6.uart.clear_output()
    out["io_out_uart_split"] = ("OUT 0x3F8, 2 bytes -> 2 byte accesses", _out_loop(h6, r6), c6)

    h7 = Host(clock=ManualClock())
    r7 = io_image(3, 1, 0x3F8, 0x41)

    def c7() -> None:
        assert r7.r10 == 0x8000000000000000 and h7.uart.tx == b""
        r7.r10 = 0
    out["io_rejected_size"] = ("size 3: INVALID_OPERAND", _rejected_loop(h7, r7), c7)

    h8 = Host(clock=ManualClock(), log=4096)
    r8 = io_image(1, 1, 0x3F8, 0x41)

    def c8() -> None:
        assert h8.log is not None and len(h8.log) == 4096
        h8.uart.clear_output()
    out["io_out_uart_logged"] = ("OUT 0x3F8 with the event log on", _out_loop(h8, r8), c8)

    h9 = FaultyHost(clock=ManualClock())
    r9 = io_image(1, 1, 0x3F8, 0x41)

    def c9() -> None:
        assert h9.faults == [] and h9.uart.tx[-1:] == b"A"
        h9.uart.clear_output()
    out["faulty_host_clean"] = ("FaultyHost, empty plan, OUT 0x3F8", _out_loop(h9, r9), c9)

    h10 = Host(clock=ManualClock())
    r10 = Regs(r11=10, r12=0x40000000)
    g10 = r10._g

    def cpuid_loop(n: int) -> None:
        call = h10.tdvmcall
        for _ in range(n):
            g10[12] = 0x40000000
            call(r10)

    def c10() -> None:
        assert r10.r12 == 0x40000001
    out["cpuid"] = ("CPUID 0x40000000 (KVM signature)", cpuid_loop, c10)

    h11 = Host(clock=ManualClock())

    def bus_loop(n: int) -> None:
        w = h11.bus.write
        for _ in range(n):
            w(0x3F8, 1, 0x41)

    def c11() -> None:
        assert h11.uart.tx[-1:] == b"A"
        h11.uart.clear_output()
    out["bus_direct_out_uart"] = ("bus.write(0x3F8, 1, b): no #VE path", bus_loop, c11)

    h12 = Host(clock=ManualClock())

    def dev_loop(n: int) -> None:
        w = h12.uart.write
        for _ in range(n):
            w(0x3F8, 1, 0x41)

    def c12() -> None:
        assert h12.uart.tx[-1:] == b"A"
        h12.uart.clear_output()
    out["uart_write_only"] = ("uart.write(0x3F8, 1, b): device alone", dev_loop, c12)
    return out


def _rejected_loop(host: Host, regs: Regs) -> Loop:
    call = host.tdvmcall
    g = regs._g

    def run(n: int) -> None:
        for _ in range(n):
            g[10] = 0
            call(regs)
    return run


def measure(loop: Loop, n: int, repeat: int) -> float:
    loop(min(n, 10_000))                           # warm-up
    best = float("inf")
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            loop(n)
            best = min(best, time.perf_counter() - t0)
    finally:
        if gc_was:
            gc.enable()
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300_000, help="calls per timed run (default 300000)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per workload; the minimum is reported")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20000 calls, 1 repeat")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--only", metavar="NAME", action="append", help="run only this workload (repeatable)")
    args = ap.parse_args(argv)
    n, repeat = (20_000, 1) if args.quick else (args.calls, args.repeat)
    if n < 1 or repeat < 1:
        ap.error("--calls and --repeat must be >= 1")

    wl = workloads()
    names = args.only or list(wl)
    unknown = [x for x in names if x not in wl]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; choose from {list(wl)}")

    import tdxve
    print(f"tdxve {tdxve.__version__} (backend {tdxve.BACKEND}; the host does not use it), "
          f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{n} calls per run, best of {repeat}\n")
    header = f"{'workload':<22} {'what':<42} {'ns/call':>9} {'calls/s':>12}"
    print(header)
    print("-" * len(header))
    results: list[dict[str, Any]] = []
    for name in names:
        what, loop, check = wl[name]
        t = measure(loop, n, repeat)
        check()
        ns = t / n * 1e9
        rate = n / t
        results.append({"workload": name, "what": what, "calls": n, "repeat": repeat,
                        "best_seconds": t, "ns_per_call": ns, "calls_per_second": rate})
        print(f"{name:<22} {what:<42} {ns:>9.0f} {rate:>12,.0f}")

    if args.json:
        doc = {
            "benchmark": "bench_host",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "tdxve": tdxve.__version__,
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "quick": args.quick,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
