#!/usr/bin/env python
"""Batch replay (issue 6): ``tdxve.replay`` vs a loop of ``Machine.execute`` over the same events.

Workloads (profile ``linux``, normal #VE path, one core; the replay kernel is
single-threaded by design -- device state is sequential):

* ``latch_in_out``: alternating 1-byte IN and OUT on a :class:`LatchDevice`
  (the issue's speed bar: >= 20 M events/s, >= 50x the loop);
* ``pc_mix``: the standard PC's compiled devices as a kernel drives them --
  UART transmit with LSR polling, POST codes, CMOS index/RAM, PCI CF8/CFC;
* ``python_device``: a plain Python device (one Python call per event);
* ``faulty_host``: a FaultyHost (every TDVMCALL through the Python host).

Per workload: ``replay`` (compiled core, warm results buffer via
``Replayer.run(out=...)``), ``replay`` allocating its results, the pure twin
(``TDXVE``'s ``_core_py`` kernel), and the peers -- a loop of
``Machine.execute(regs, code)`` (the instruction decoded from its bytes,
``in al, dx`` / ``out dx, al`` and friends) and a loop of
``Machine.execute_exit`` (the exact reference semantics). Loops and the twin
run on a subset of the events; their rate is per event. The ratio is
replay / execute loop.

Memory: a file of 10^8 events (3.2 GB; ``--quick``: 10^6) is written, then
replayed from ``np.memmap`` with :func:`tdxve.replay.replay_chunks` in a child
process that reports its peak resident set (VmHWM) -- the bar is < 1 GiB.

Times are the minimum of ``--repeat`` runs (``time.perf_counter``, GC off)
after a warm-up. Speed is measured here, never asserted in tests.

Usage::

    python benchmarks/bench_replay.py                  # ~1 min (writes a 3.2 GB temp file)
    python benchmarks/bench_replay.py --quick          # smoke run
    python benchmarks/bench_replay.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Benchmark the tree this script lives in (built in place), unless run from a copy.
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "tdxve").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tdxve import _core_py  # noqa: E402
import _machine  # noqa: E402  (benchmarks/ is sys.path[0])
from tdxve._backend import BACKEND  # noqa: E402
from tdxve._backend import core as _active  # noqa: E402
from tdxve.abi import EVENT_DTYPE, RESULT_DTYPE  # noqa: E402
from tdxve.errors import GuestFault  # noqa: E402
from tdxve.host import FaultPlan, FaultyHost, Host  # noqa: E402
from tdxve.machine import Machine  # noqa: E402
from tdxve.regs import Regs  # noqa: E402
from tdxve.replay import LatchDevice, Replayer, io_events, replay, replay_chunks  # noqa: E402

TARGET_RATE = 20e6          # events/s, latch IN/OUT, single core
TARGET_RATIO = 50.0         # replay / loop of Machine.execute
TARGET_RSS = 1 << 30        # bytes, 10^8 events from a memory map


class Scratch:
    """A plain Python device."""

    def __init__(self) -> None:
        self.value = 0

    def read(self, port: int, size: int) -> int:
        return self.value

    def write(self, port: int, size: int, value: int) -> None:
        self.value = value


# ---------------------------------------------------------------- workloads
def latch_events(n: int) -> np.ndarray:
    i = np.arange(n, dtype=np.uint64)
    return io_events(0x5000, 1, (i & np.uint64(1)) == 0, rax=i)


def pc_mix_events(n: int) -> np.ndarray:
    # 8-event pattern: LSR poll + THR byte, POST code, CMOS index + RAM byte, PCI address + dword read, UART LCR read
    pat = io_events([0x3FD, 0x3F8, 0x80, 0x70, 0x71, 0xCF8, 0xCFC, 0x3FB], [1, 1, 1, 1, 1, 4, 4, 1],
                    [True, False, False, False, True, False, True, True],
                    rax=[0, 0x41, 0x12, 0x20, 0, 0x80000000, 0, 0])
    return np.resize(pat, n)


def python_device_events(n: int) -> np.ndarray:
    i = np.arange(n, dtype=np.uint64)
    return io_events(0x7000, 1, (i & np.uint64(1)) == 0, rax=i)


def make(workload: str) -> Machine:
    if workload == "faulty_host":
        h: Host = FaultyHost(FaultPlan(1, rate=0.01))
    else:
        h = Host()
    h.bus.register(0x5000, 1, LatchDevice(0x5A))
    h.bus.register(0x7000, 1, Scratch())
    return Machine(host=h)


WORKLOADS: dict[str, Callable[[int], np.ndarray]] = {
    "latch_in_out": latch_events,
    "pc_mix": pc_mix_events,
    "python_device": python_device_events,
    "faulty_host": latch_events,
}

# Instruction bytes for Machine.execute: (is_in, size) -> DX form
_CODE = {(True, 1): b"\xec", (False, 1): b"\xee", (True, 2): b"\x66\xed", (False, 2): b"\x66\xef",
         (True, 4): b"\xed", (False, 4): b"\xef"}


def execute_loop(m: Machine, ev: np.ndarray) -> Callable[[], None]:
    q = ev["exit_qual"].tolist()
    rax = ev["rax"].tolist()
    items = [(_CODE[(bool(x >> 3 & 1), (x & 7) + 1)], x >> 16 & 0xFFFF, r) for x, r in zip(q, rax)]
    execute = m.execute

    def run() -> None:
        regs = Regs()
        for code, port, r in items:
            regs.rdx = port
            regs.rax = r
            try:
                execute(regs, code)
            except GuestFault:
                pass                    # the faulty host's failures: RIP stays, next event
    return run


def execute_exit_loop(m: Machine, ev: np.ndarray) -> Callable[[], None]:
    items = list(zip(ev["exit_qual"].tolist(), ev["instr_len"].tolist(), ev["rax"].tolist()))
    execute_exit = m.execute_exit

    def run() -> None:
        for q, ln, r in items:
            try:
                execute_exit(Regs(rax=r), 30, exit_qual=q, instr_len=ln)
            except GuestFault:
                pass
    return run


def timed(fn: Callable[[], Any], repeat: int) -> float:
    was = gc.isenabled()
    gc.disable()
    try:
        fn()
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    finally:
        if was:
            gc.enable()
    return best


def measure(n: int, n_loop: int, repeat: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, gen in WORKLOADS.items():
        ev = gen(n)
        small = ev[:n_loop].copy()
        m = make(name)
        rp = Replayer(m)
        rp._core = _active
        out = np.zeros(n, dtype=RESULT_DTYPE)
        big = n if name in ("latch_in_out", "pc_mix") else min(n, n_loop * 10)
        evb, outb = ev[:big].copy(), out[:big]
        t = timed(lambda: rp.run(evb, out=outb), repeat)
        rows.append(dict(workload=name, impl=f"replay ({BACKEND}, reused out)", events=big, seconds=t))
        t = timed(lambda: replay(evb, m), repeat)
        rows.append(dict(workload=name, impl=f"replay ({BACKEND}, new results)", events=big, seconds=t))
        if BACKEND != "python":
            twin = Replayer(make(name))
            twin._core = _core_py
            t = timed(lambda: twin.run(small), 1)
            rows.append(dict(workload=name, impl="replay (pure twin)", events=n_loop, seconds=t))
        t = timed(execute_loop(make(name), small), max(1, repeat // 2))
        rows.append(dict(workload=name, impl="loop of Machine.execute", events=n_loop, seconds=t))
        t = timed(execute_exit_loop(make(name), small), max(1, repeat // 2))
        rows.append(dict(workload=name, impl="loop of Machine.execute_exit", events=n_loop, seconds=t))
    for r in rows:
        r["events_per_s"] = r["events"] / r["seconds"]
        r["us_per_event"] = r["seconds"] / r["events"] * 1e6
    for name in WORKLOADS:
        base = next(r for r in rows if r["workload"] == name and r["impl"] == "loop of Machine.execute")
        for r in rows:
            if r["workload"] == name:
                r["vs_execute"] = r["events_per_s"] / base["events_per_s"]
    return rows


# ---------------------------------------------------------------- memory-mapped file
def child_memmap(path: str, n: int, chunk: int) -> None:
    """Replay `path` from a memory map in chunks; print JSON with time and peak RSS."""
    def hwm() -> int:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return -1

    m = make("latch_in_out")
    list(replay_chunks(latch_events(16), m))        # warm-up: plan, imports
    base = hwm()
    mm = np.memmap(path, dtype=EVENT_DTYPE, mode="r", shape=(n,))
    faults = 0
    t0 = time.perf_counter()
    for _, res in replay_chunks(mm, m, chunk_size=chunk):
        faults += int(np.count_nonzero(res["fault"]))
    dt = time.perf_counter() - t0
    print(json.dumps({"events": n, "chunk": chunk, "seconds": dt, "peak_rss": hwm(), "rss_before": base,
                      "faults": faults, "latch": m.host.bus.lookup(0x5000).device.value}))


def measure_memmap(n: int, chunk: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "events.bin")
        block = latch_events(min(n, 1 << 20))
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            left = n
            while left:
                k = min(left, len(block))
                block[:k].tofile(f)
                left -= k
        write_s = time.perf_counter() - t0
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(sys.modules["tdxve"].__file__)
                                                                           .resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")])))
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-memmap", path, str(n),
                            str(chunk)], capture_output=True, text=True, env=env, check=False)
        if r.returncode != 0:
            return {"error": r.stderr.strip()[-500:]}
        doc: dict[str, Any] = json.loads(r.stdout)
        doc["file_bytes"] = n * EVENT_DTYPE.itemsize
        doc["write_seconds"] = write_s
        doc["events_per_s"] = n / doc["seconds"]
        return doc


# ---------------------------------------------------------------- report
def machine_info() -> dict[str, Any]:
    return _machine.machine_info(backend=BACKEND)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("workload", "implementation", "events", "best", "us/event", "events/s", "vs execute")
    table = [(r["workload"], r["impl"], f"{r['events']:,}", f"{r['seconds'] * 1e3:.1f} ms",
              f"{r['us_per_event']:.3f}", f"{r['events_per_s']:,.0f}", f"{r['vs_execute']:.1f}x") for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    right = {2, 3, 4, 5, 6}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(fmt(head))
    print(fmt(tuple("-" * w for w in widths)))
    for t in table:
        print(fmt(t))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 10^4 events, 2*10^5-event file, 1 repeat")
    p.add_argument("--events", type=int, default=None, help="events per replay run (default 10^7)")
    p.add_argument("--loop-events", type=int, default=None, help="events per execute loop (default 20000)")
    p.add_argument("--file-events", type=int, default=None, help="events in the memory-mapped file (default 10^8)")
    p.add_argument("--chunk", type=int, default=1 << 20, help="events per chunk for the file (default 2^20)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs, minimum reported (default 5)")
    p.add_argument("--json", metavar="FILE", help="write every number and machine info to FILE")
    p.add_argument("--strict", action="store_true", help="exit status 1 when a target FAILs")
    p.add_argument("--child-memmap", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_memmap:
        path, n, chunk = args.child_memmap
        child_memmap(path, int(n), int(chunk))
        return 0
    n = args.events or (10_000 if args.quick else 10_000_000)
    n_loop = min(n, args.loop_events or (500 if args.quick else 20_000))
    n_file = args.file_events or (200_000 if args.quick else 100_000_000)
    repeat = args.repeat or (1 if args.quick else 5)
    if min(n, n_loop, n_file, repeat, args.chunk) < 1:
        p.error("counts must be >= 1")

    info = machine_info()
    print(f"tdxve batch replay benchmark: profile linux, normal path, {n:,} events per replay, "
          f"{n_loop:,} per loop, best of {repeat}")
    print(f"  {info['cpu_model']}, {info['logical_cpus']} logical CPUs, Python {info['python']}, "
          f"backend {BACKEND}")
    print()
    rows = measure(n, n_loop, repeat)
    print_table(rows)
    mem = measure_memmap(n_file, args.chunk)
    print()
    if "error" in mem:
        print(f"memory-mapped file: FAILED: {mem['error']}")
    else:
        print(f"memory-mapped file: {n_file:,} events ({mem['file_bytes'] / 2**30:.2f} GiB), chunks of "
              f"{args.chunk:,}: {mem['seconds']:.2f} s ({mem['events_per_s']:,.0f} events/s), peak RSS "
              f"{mem['peak_rss'] / 2**20:,.0f} MiB (before replay {mem['rss_before'] / 2**20:,.0f} MiB)")

    latch = next(r for r in rows if r["workload"] == "latch_in_out" and "reused" in r["impl"])
    targets = [
        {"name": f"latch IN/OUT >= {TARGET_RATE / 1e6:.0f} M events/s (single core)", "required": TARGET_RATE,
         "measured": latch["events_per_s"]},
        {"name": f"replay >= {TARGET_RATIO:.0f}x a loop of Machine.execute (latch)", "required": TARGET_RATIO,
         "measured": latch["vs_execute"]},
        {"name": "peak RSS < 1 GiB replaying a memory-mapped file in chunks", "required": TARGET_RSS,
         "measured": mem.get("peak_rss", float("inf"))},
    ]
    print("\ntargets:")
    ok = True
    for t in targets:
        lower = "RSS" in t["name"]
        t["status"] = "PASS" if (t["measured"] < t["required"] if lower else t["measured"] >= t["required"]) \
            else "FAIL"
        ok &= t["status"] == "PASS"
        shown = f"{t['measured'] / 2**20:,.0f} MiB" if lower else f"{t['measured']:,.1f}"
        print(f"  {t['status']:<4}  {t['name']}: {shown}")
    if args.quick:
        print("  (--quick: small sizes; the targets are meant for the full run)")
    if args.json:
        doc = {"benchmark": "bench_replay", "config": {"events": n, "loop_events": n_loop, "file_events": n_file,
                                                      "chunk": args.chunk, "repeat": repeat, "quick": args.quick},
               "machine": info, "results": rows, "memmap": mem, "targets": targets}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
