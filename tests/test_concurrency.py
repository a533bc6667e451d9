"""Concurrency (issue 7): the batch APIs release the GIL and give the single-threaded results
from several threads on shared inputs; Machine and Host keep the thread-safety their docstrings
promise."""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

import numpy as np
import pytest

from tdxve import invariants as inv
from tdxve.errors import TdxveError
from tdxve.host import FaultPlan, FaultyHost, Host
from tdxve.machine import Machine
from tdxve.regs import Regs

THREADS = 4
POOL = [b"\xec", b"\xee", b"\xe4\x80", b"\x66\xed", b"\xf3\x6c", b"\x67\x66\xf3\x6f", b"\x48\xed",
        b"\x2e\x2e\x65\x6e", b"\xe7\x70"]


def stream(n_insns: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return b"".join(POOL[i] for i in rng.integers(0, len(POOL), n_insns))


def sizes(core: Any) -> tuple[int, int]:
    # (instructions, qualifications): big enough for the compiled core's two-thread split
    # paths (>= 256 KiB streams, >= 1 Mi qualifications); small for the pure twin.
    return (300_000, 1_200_000) if core.BACKEND == "cython" else (3_000, 6_000)


def run_threads(fn: Callable[[], Any], n: int = THREADS) -> list[Any]:
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_batch_apis_from_several_threads_match_single_threaded(core: Any) -> None:
    n_insns, n_quals = sizes(core)
    buf = stream(n_insns, 1)
    quals = np.random.default_rng(2).integers(0, 2**64, n_quals, dtype=np.uint64, endpoint=False)
    quals[::3] &= np.uint64(0xFFFF007B)                # plenty of valid ones too
    recs = core.decode_insns(buf)
    want = (recs.tobytes(), core.decode_exit_quals(quals).tobytes(),
            core.exit_infos(recs, 0x3F8).tobytes())
    dx = np.arange(recs.shape[0], dtype=np.uint64)
    want_dx = core.exit_infos(recs, dx).tobytes()
    got = run_threads(lambda: (core.decode_insns(buf).tobytes(),
                               core.decode_exit_quals(quals).tobytes(),
                               core.exit_infos(recs, 0x3F8).tobytes()))
    assert all(g == want for g in got)
    assert all(g == want_dx for g in run_threads(lambda: core.exit_infos(recs, dx).tobytes()))
    # inputs are shared read-only: untouched
    assert core.decode_insns(buf).tobytes() == want[0]


def test_batch_results_are_the_per_event_results_under_threads(core: Any) -> None:
    buf = stream(400, 3)
    quals = np.random.default_rng(4).integers(0, 2**40, 300, dtype=np.uint64)
    recs = core.decode_insns(buf)
    run_threads(lambda: (inv.check_decode_batch(buf, core=core),
                         inv.check_exit_quals_batch(quals, core=core),
                         inv.check_exit_infos_batch(recs, 0x70, core=core)))


@pytest.mark.parametrize("api", ["decode_insns", "decode_exit_quals", "exit_infos"])
def test_compiled_batch_apis_release_the_gil(api: str) -> None:
    """A helper thread that needs the GIL runs *during* the batch call. The switch interval is
    raised so that the interpreter itself never hands the GIL over: only a nogil section can."""
    from tdxve import _core as core
    buf = stream(3_000_000, 5)
    recs = core.decode_insns(buf)
    quals = np.random.default_rng(6).integers(0, 2**63, 8_000_000, dtype=np.uint64)
    call = {"decode_insns": lambda: core.decode_insns(buf),
            "decode_exit_quals": lambda: core.decode_exit_quals(quals),
            "exit_infos": lambda: core.exit_infos(recs, 0x3F8)}[api]
    in_call = [False]
    seen: list[bool] = []
    go = threading.Lock()
    go.acquire()

    def helper() -> None:
        with go:                      # blocks without the GIL until the main thread releases it
            seen.append(in_call[0])   # needs the GIL

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    t = threading.Thread(target=helper)
    try:
        t.start()
        in_call[0] = True
        go.release()
        call()
        in_call[0] = False
    finally:
        sys.setswitchinterval(old)
        t.join()
    assert seen == [True], f"{api} held the GIL for the whole call"


# ---------------------------------------------------------------- Machine and Host
def workload(machine: Machine) -> list[Any]:
    """A deterministic mix of IN/OUT to every PC device, with faults; returns what it saw."""
    out: list[Any] = []
    regs = Regs(rip=0xFFFFFFFF81000000)
    ports = (0x3F8, 0x3FD, 0x3FF, 0x70, 0x71, 0xCF8, 0xCFC, 0x608, 0x80, 0x60, 0x64, 0x402, 0x1234)
    codes = (b"\xec", b"\xee", b"\x66\xed", b"\xed", b"\xef", b"\xe6\x80", b"\xe4\x71")
    for i in range(600):
        regs.rdx = ports[i % len(ports)]
        regs.rax = (i * 0x9E3779B97F4A7C15) & (2**64 - 1)
        try:
            o = machine.execute(regs, codes[i % len(codes)])
            out.append(("ok", o.exit_qual, o.rip, regs.rax))
        except TdxveError as exc:
            out.append((type(exc).__name__, regs.rax, regs.rip))
    host = machine.host
    return [out, host.uart.output, host.post.codes, host.debugcon.output,  # type: ignore[attr-defined]
            sorted(host.stats.calls.items()), inv.device_state(host)]      # type: ignore[attr-defined]


def fresh_machine(i: int) -> Machine:
    return Machine(profile=("linux", "linux-2022", "architectural")[i % 3],
                   host=FaultyHost(FaultPlan(seed=i, rate=0.2)))


def test_docstrings_state_the_thread_safety() -> None:
    assert "Thread safety" in (Machine.__doc__ or "") and "not thread-safe" in (Machine.__doc__ or "")
    assert "Thread safety" in (Host.__doc__ or "") and "lock" in (Host.__doc__ or "")


def test_separate_machines_in_parallel_threads_match_sequential_runs() -> None:
    """Docstring promise: separate Machines with separate hosts share no mutable state."""
    want = [workload(fresh_machine(i)) for i in range(THREADS)]
    idx = iter(range(THREADS))
    lock = threading.Lock()

    def job() -> tuple[int, list[Any]]:
        with lock:
            i = next(idx)
        m = fresh_machine(i)
        return i, workload(m)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)          # switch threads as often as possible
    try:
        got = run_threads(job)
    finally:
        sys.setswitchinterval(old)
    for i, res in got:
        assert res == want[i]


def test_one_host_shared_by_threads_under_a_lock() -> None:
    """Docstring recipe: several vCPUs (Machines) on one Host, every call under one lock."""
    host = Host()
    lock = threading.Lock()

    class Locked:
        def tdvmcall(self, regs: Regs) -> None:
            with lock:
                host.tdvmcall(regs)

    per_thread = 500

    def vcpu() -> int:
        m = Machine(host=Locked())
        regs = Regs(rdx=0x402)
        ok = 0
        for i in range(per_thread):
            regs.rax = 0x41 + i % 26
            m.execute(regs, b"\xee")
            ok += 1
        return ok

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        done = run_threads(vcpu)
    finally:
        sys.setswitchinterval(old)
    total = THREADS * per_thread
    assert sum(done) == total
    out = host.debugcon.output
    assert len(out) == total and host.stats.calls[30] == total
    assert sorted(out) == sorted(bytes(0x41 + i % 26 for i in range(per_thread)) * THREADS)
