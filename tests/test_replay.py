"""tdxve.replay (issue 6): the semantics, the compiled forms, the chunked API, refusals.

The big random comparison with the reference loop is ``test_replay_diff.py``;
here: reference vectors (ref 6.1-6.3), the promises about Python calls,
both kernels side by side, determinism under chunking and threads, typed
refusals, bounded memory on memory-mapped files.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import threading

import numpy as np
import pytest
from test_replay_support import (
    Scratch,
    diff_snapshots,
    first_mismatch,
    make_machine,
    random_events,
    reference,
    snapshot,
)

import tdxve._core_py as core_py
from tdxve import _replay_py
from tdxve.abi import EVENT_DTYPE, RESULT_DTYPE, ReplayFault
from tdxve.errors import DeviceError, InvalidArgumentError, ReplayError, ReplayUnsupportedError
from tdxve.guest import Profile
from tdxve.host import FaultPlan, FaultyHost, Host
from tdxve.machine import Machine

# The module: once the package binds tdxve.replay to the function, "from tdxve import replay" is that.
R = importlib.import_module("tdxve.replay")

try:
    import tdxve._core as core_c
except ImportError:  # pragma: no cover - the compiled core is required by the suite
    core_c = None

KERNELS = [pytest.param(core_py, id="python")] + ([pytest.param(core_c, id="cython")] if core_c else [])


def run(events, machine, core=None, **kw):
    rp = R.Replayer(machine, **kw)
    if core is not None:
        rp._core = core
    return rp.run(events)


def latch_machine(profile="linux", path="normal", **kw):
    h = Host()
    h.bus.register(0x5000, 4, R.LatchDevice(0x5555555555555555), sizes=(1, 2, 4))
    return Machine(profile=profile, path=path, host=h, **kw)


# ---------------------------------------------------------------- reference vectors

class LyingHost:
    """Answers every IN with R11 = 0x5555555555555555 (no zero extension) and R10 = ``status``."""

    def __init__(self, status: int = 0) -> None:
        self.status = status

    def tdvmcall(self, regs):
        if regs.r13 == 0:
            regs.r11 = 0x5555555555555555
        regs.r10 = self.status


@pytest.mark.parametrize("core", KERNELS)
@pytest.mark.parametrize("profile,size,ok,expect", [
    # ref 6.2: RAX = 0xAAAAAAAAAAAAAAAA, R11 = 0x5555555555555555
    ("linux-2022", 1, True, 0xAAAAAAAAAAAAAB55), ("linux-2022", 2, True, 0xAAAAAAAAAAAB5555),
    ("linux-2022", 4, True, 0xAAAAAAAB55555555),
    ("linux", 1, True, 0xAAAAAAAAAAAAAA55), ("linux", 2, True, 0xAAAAAAAAAAAA5555),
    ("linux", 4, True, 0x0000000055555555),
    ("architectural", 1, True, 0xAAAAAAAAAAAAAA55), ("architectural", 4, True, 0x0000000055555555),
    # same inputs, R10 != 0
    ("linux-2022", 1, False, 0xAAAAAAAAAAAAAA00), ("linux-2022", 2, False, 0xAAAAAAAAAAAA0000),
    ("linux-2022", 4, False, 0xAAAAAAAA00000000),
    ("linux", 1, False, 0xAAAAAAAAAAAAAA00), ("linux", 2, False, 0xAAAAAAAAAAAA0000), ("linux", 4, False, 0),
    ("architectural", 4, False, 0xAAAAAAAAAAAAAAAA),
])
def test_ref_6_2_merge_vectors(core, profile, size, ok, expect):
    m = Machine(profile=profile, host=LyingHost(0 if ok else 1))
    res = run(R.io_events(0x71, size, True, rax=0xAAAAAAAAAAAAAAAA), m, core)
    assert res[0]["rax"] == expect
    assert res[0]["fault"] == (ReplayFault.NONE if ok else ReplayFault.IO_FAILED)
    assert res[0]["rip_delta"] == (1 if ok else 0)


@pytest.mark.parametrize("core", KERNELS)
@pytest.mark.parametrize("profile,expect", [("linux-2022", 0x0026), ("linux", 0x0126), ("architectural", 0x0126)])
def test_ref_6_3_inb_cmos_status_a(core, profile, expect):
    """Ref 6.3: OUT 0x70 = 0x0A, INB 0x71 with AX = 0x0100 reads status A 0x26; the 2022
    mask loses AH bit 0 (0x0026), the fixed code keeps it (0x0126)."""
    m = Machine(profile=profile)
    ev = np.concatenate([R.io_events(0x70, 1, False, rax=0x0A), R.io_events(0x71, 1, True, rax=0x0100)])
    res = run(ev, m, core)
    assert res[1]["rax"] == expect and res[1]["r11"] == 0x26


@pytest.mark.parametrize("core", KERNELS)
@pytest.mark.parametrize("profile,expect", [("linux-2022", 0xDEADBEEE12378086), ("linux", 0x12378086),
                                            ("architectural", 0x12378086)])
def test_ref_6_3_inl_0xcfc(core, profile, expect):
    """Ref 6.3: OUT 0xCF8 = 0x80000000, then INL 0xCFC with RAX = 0xDEADBEEF00000000
    (host bridge 8086:1237) -- through the compiled PCI form."""
    m = Machine(profile=profile)
    ev = np.concatenate([R.io_events(0xCF8, 4, False, rax=0x80000000),
                         R.io_events(0xCFC, 4, True, rax=0xDEADBEEF00000000)])
    res = run(ev, m, core)
    assert res[1]["rax"] == expect and res[1]["r11"] == 0x12378086
    assert m.host.pci.config_address == 0x80000000


@pytest.mark.parametrize("core", KERNELS)
def test_ref_6_2_out_r15(core):
    """Ref 6.2: OUT R15 for RAX = 0x112378086 -- 2022: 0x18086 / 0x112378086; fixed: 0x8086 / 0x12378086."""
    for profile, w, d in (("linux-2022", 0x18086, 0x112378086), ("linux", 0x8086, 0x12378086)):
        res = run(R.io_events(0x5000, np.array([2, 4]), False, rax=0x112378086), latch_machine(profile), core)
        assert res["r15"].tolist() == [w, d]


@pytest.mark.parametrize("core", KERNELS)
def test_fault_codes(core):
    """Each ReplayFault against what execute_exit raises for the same event."""
    m = latch_machine("linux")
    ev = np.zeros(4, dtype=EVENT_DTYPE)
    ev["instr_len"] = 2
    ev["exit_qual"] = [0x50000000,          # OUT 0x5000 byte: fine
                       0x03F80030,          # REP OUTSB (ref 6.1): string -> -EIO
                       0x50000002,          # size encoding 2 = 3 bytes: KVM rejects
                       0x50000008]          # IN 0x5000 byte
    res = run(ev, m, core)
    assert res["fault"].tolist() == [ReplayFault.NONE, ReplayFault.STRING_IO, ReplayFault.IO_FAILED, 0]
    assert res["rip_delta"].tolist() == [2, 0, 0, 2]
    assert res["status"].tolist() == [0, 0, 0x8000000000000000, 0]
    assert res["tdvmcalls"].tolist() == [1, 0, 1, 1]
    early = latch_machine("linux-5.19-rc", "early")
    r2 = run(ev[:1], early, core)
    assert r2[0]["fault"] == ReplayFault.VE_LOOP and r2[0]["ves"] == 3 and r2[0]["tdvmcalls"] == 3
    # the April-2022 bug is in the early handler only: the normal path advances RIP (ref 1.1)
    assert run(ev[:1], latch_machine("linux-5.19-rc", "normal"), core)[0]["fault"] == ReplayFault.NONE
    zero = ev[:1].copy()
    zero["instr_len"] = 0                       # RIP += 0: IRET re-executes, as on the 5.19-rc early path
    m0 = latch_machine("linux")
    r0 = run(zero, m0, core)
    assert r0[0]["fault"] == ReplayFault.VE_LOOP and r0[0]["ves"] == 3 and r0[0]["rip_delta"] == 0
    assert reference(latch_machine("linux"), zero)[0] == r0[0]
    panic = Machine(profile=Profile("bad-mask", "linux", vmcall_rcx=0xFFCF))     # selects RAX: invalid
    r3 = run(ev[:1], panic, core)
    assert r3[0]["fault"] == ReplayFault.GUEST_PANIC and r3[0]["tdvmcalls"] == 0
    assert reference(Machine(profile=Profile("bad-mask", "linux", vmcall_rcx=0xFFCF)), ev[:1])[0] == r3[0]


# ---------------------------------------------------------------- Python devices and hosts

@pytest.mark.parametrize("core", KERNELS)
def test_python_device_called_exactly_once_per_event(core):
    h = Host()
    dev = Scratch()
    h.bus.register(0x7000, 4, dev, sizes=(1, 2, 4))
    h.bus.register(0x5000, 1, R.LatchDevice(7))
    rng = np.random.default_rng(5)
    n = 3000
    on_dev = rng.random(n) < 0.3
    port = np.where(on_dev, 0x7000, rng.choice([0x5000, 0x3F8, 0x3FD, 0x80, 0x1234], n))
    ev = R.io_events(port, 1, rng.random(n) < 0.5, rax=rng.integers(0, 256, n))
    res = run(ev, Machine(host=h), core)
    assert dev.calls == int(on_dev.sum())
    assert (res["fault"] == 0).all()


@pytest.mark.skipif(core_c is None, reason="needs the compiled core")
def test_compiled_events_run_without_python():
    """Events that hit only compiled devices and unassigned ports make no Python call:
    the number of Python-level calls during a replay does not grow with the events."""
    m = Machine()
    m.host.bus.register(0x5000, 1, R.LatchDevice(7))
    m.host.bus.register(0x6000, 2, R.CountingSink(), sizes=(1, 2))
    rng = np.random.default_rng(1)
    n = 100_000
    ports = rng.choice([0x5000, 0x6000, 0x6001, 0x3F8, 0x3F9, 0x3FB, 0x3FD, 0x80, 0x70, 0xCF8, 0xCFC,
                        0xE9, 0x402, 0x1234, 0xFFFF], n)
    sizes = np.where(np.isin(ports, [0xCF8, 0xCFC]), 4, 1)
    ev = R.io_events(ports, sizes, rng.random(n) < 0.5, rax=rng.integers(0, 1 << 31, n))
    run(ev[:10], m, core_c)                     # warm-up (imports, first plan)
    counts = []
    for k in (100, n):
        calls = [0]

        def prof(frame, event, arg):
            if event == "call":
                calls[0] += 1

        sys.setprofile(prof)
        try:
            res = run(ev[:k], m, core_c)
        finally:
            sys.setprofile(None)
        counts.append(calls[0])
    assert counts[0] == counts[1], counts
    assert (res["tdvmcalls"] == 1).all() and m.host.uart.output


@pytest.mark.parametrize("core", KERNELS)
def test_any_host_object_goes_through_python(core):
    """A host that is not a tdxve Host (here the bench's trivial one) is called per TDVMCALL."""
    class Trivial:
        calls = 0

        def tdvmcall(self, regs):
            Trivial.calls += 1
            if regs.r12 not in (1, 2, 4):
                regs.r10 = 0x8000000000000000
            elif regs.r13 == 0:
                regs.r11 = 0xFEDCBA98 & ((1 << (8 * regs.r12)) - 1)

    ev = random_events(9, 2000)
    ref = reference(Machine(host=Trivial()), ev)
    Trivial.calls = 0
    got = run(ev, Machine(host=Trivial()), core)
    assert not first_mismatch(ref, got, ev)
    assert Trivial.calls == int(got["tdvmcalls"].sum()) > 1000


@pytest.mark.parametrize("core", KERNELS)
def test_device_error_raise_policy_stops_like_the_loop(core):
    """on_device_error="raise": execute_exit raises DeviceError; replay stops at the same
    event, raises the same error with .replay_index, and leaves the same state."""
    ev = random_events(11, 4000)
    m_ref = make_machine("linux", "normal", policy="raise")
    with pytest.raises(DeviceError) as e_ref:
        reference(m_ref, ev)
    m_rep = make_machine("linux", "normal", policy="raise")
    out = np.zeros(len(ev), dtype=RESULT_DTYPE)
    rp = R.Replayer(m_rep)
    rp._core = core
    with pytest.raises(DeviceError) as e_rep:
        rp.run(ev, out=out)
    k = e_rep.value.replay_index
    assert str(e_rep.value) == str(e_ref.value)
    ref_ok = reference(make_machine("linux", "normal", policy="raise"), ev[:k])
    assert not first_mismatch(ref_ok, out[:k], ev[:k])
    assert not diff_snapshots(snapshot(m_ref), snapshot(m_rep))


@pytest.mark.parametrize("core", KERNELS)
def test_host_log_smaller_than_the_replay(core):
    """The event log keeps its last `capacity` records and counts the dropped ones."""
    ev = random_events(4, 3000)

    def mk():
        m = make_machine("linux-2022", "normal")
        m.host.enable_log(100)
        return m

    m_ref, m_rep = mk(), mk()
    reference(m_ref, ev)
    run(ev, m_rep, core)
    assert m_rep.host.log.dropped > 1000
    assert not diff_snapshots(snapshot(m_ref), snapshot(m_rep))


@pytest.mark.parametrize("core", KERNELS)
def test_full_output_and_log_buffers_flush_and_continue(core, monkeypatch):
    """The kernel returns early when its UART/POST/debugcon or log buffer fills; nothing changes."""
    ev = random_events(6, 6000)
    ref_m = make_machine("linux", "normal", log=True)
    ref = run(ev, ref_m, core)
    monkeypatch.setattr(R, "_OUTBUF_ROWS", 8)
    monkeypatch.setattr(R, "_LOGBUF_ROWS", 3)
    m = make_machine("linux", "normal", log=True)
    got = run(ev, m, core)
    assert (got == ref).all()
    assert not diff_snapshots(snapshot(ref_m), snapshot(m))


@pytest.mark.skipif(core_c is None, reason="needs the compiled core")
def test_kernels_agree():
    """The compiled kernel and its twin: same results and same machine state."""
    ev = random_events(21, 15_000)
    for profile, path, kw in (("linux-2022", "normal", dict(log=True)), ("linux-5.19-rc", "early", {}),
                              ("architectural", "normal", dict(faulty=True))):
        a, b = make_machine(profile, path, **kw), make_machine(profile, path, **kw)
        ra = run(ev, a, core_c, unassigned="reply")
        rb = run(ev, b, core_py, unassigned="reply")
        assert not first_mismatch(ra, rb, ev)
        assert not diff_snapshots(snapshot(a), snapshot(b))


# ---------------------------------------------------------------- determinism

def test_chunking_never_changes_anything():
    ev = random_events(12, 20_000)
    m_all = make_machine("linux-2022", "normal", log=True)
    whole = R.replay(ev, m_all, unassigned="reply")
    rng = np.random.default_rng(3)
    cuts = np.sort(rng.choice(np.arange(1, len(ev)), 30, replace=False))
    m_parts = make_machine("linux-2022", "normal", log=True)
    rp = R.Replayer(m_parts, unassigned="reply")
    parts = [rp.run(p) for p in np.split(ev, cuts)]
    assert (np.concatenate(parts) == whole).all()
    assert not diff_snapshots(snapshot(m_all), snapshot(m_parts))
    m_chunks = make_machine("linux-2022", "normal", log=True)
    got = np.concatenate([r.copy() for _, r in R.replay_chunks(ev, m_chunks, chunk_size=777,
                                                                 unassigned="reply")])
    assert (got == whole).all()
    assert not diff_snapshots(snapshot(m_all), snapshot(m_chunks))


def test_threads_do_not_change_results():
    """Machines replayed concurrently (the GIL is released) give the sequential results;
    one machine cannot be replayed from two threads at once."""
    ev = random_events(13, 10_000)
    expect = R.replay(ev, make_machine("linux", "normal"))
    machines = [make_machine("linux", "normal") for _ in range(4)]
    results: list[np.ndarray | None] = [None] * 4

    def work(i):
        results[i] = R.replay(ev, machines[i])

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for r in results:
        assert r is not None and (r == expect).all()

    m = latch_machine()
    gate = threading.Event()
    release = threading.Event()

    class Blocking:
        def read(self, port, size):
            gate.set()
            release.wait(10)
            return 0

        def write(self, port, size, value):
            pass

    m.host.bus.register(0x7000, 1, Blocking())
    t = threading.Thread(target=R.replay, args=(R.io_events(0x7000, 1, True), m))
    t.start()
    gate.wait(10)
    try:
        with pytest.raises(ReplayError, match="already being replayed"):
            R.replay(R.io_events(0x5000, 1, True), m)
    finally:
        release.set()
        t.join()
    R.replay(R.io_events(0x5000, 1, True), m)      # free again


# ---------------------------------------------------------------- refusals and bad input

def test_refusals_are_typed():
    with pytest.raises(ReplayUnsupportedError, match="string_io='emulate'"):
        R.replay(R.io_events(0x80, 1, False), Machine(string_io="emulate"))
    m = Machine()
    m.guest.extable[0x1000] = 0x2000
    with pytest.raises(ReplayUnsupportedError, match="exception-table"):
        R.Replayer(m)
    m = Machine()
    from tdxve.regs import Regs
    m.tdx.inject_ve(Regs(), 30, 0x800000, instr_len=1)
    with pytest.raises(ReplayUnsupportedError, match="still valid"):
        R.replay(R.io_events(0x80, 1, False), m)

    class MyGuestMachine(Machine):
        def execute_exit(self, *a, **k):
            return super().execute_exit(*a, **k)

    with pytest.raises(ReplayUnsupportedError, match="Machine.execute_exit"):
        R.replay(R.io_events(0x80, 1, False), MyGuestMachine())
    with pytest.raises(ReplayUnsupportedError, match="ve_loop_limit"):
        R.replay(R.io_events(0x80, 1, False), Machine(ve_loop_limit=70_000))
    R.replay(R.io_events(0x80, 1, False), Machine(ve_loop_limit=65_535))
    assert issubclass(ReplayUnsupportedError, ValueError)


@pytest.mark.parametrize("bad", [
    [1, 2, 3], np.zeros(3, dtype=np.uint64), np.zeros((2, 2), dtype=EVENT_DTYPE),
    np.zeros(2, dtype=[("exit_qual", "<u8"), ("rax", "<u8")]),
    np.zeros(2, dtype=[("exit_qual", "<f8"), ("rax", "<u8"), ("reply", "<u8"), ("instr_len", "<u4")]),
])
def test_bad_events(bad):
    with pytest.raises(InvalidArgumentError):
        R.replay(bad, Machine())


def test_bad_arguments():
    ev = R.io_events(0x80, 1, False)
    with pytest.raises(InvalidArgumentError):
        R.replay(ev, "machine")
    with pytest.raises(InvalidArgumentError):
        R.replay(ev, Machine(), unassigned="zeros")
    with pytest.raises(InvalidArgumentError):
        R.replay(ev, Machine(), out=np.zeros(2, dtype=RESULT_DTYPE))
    with pytest.raises(InvalidArgumentError):
        R.replay(ev, Machine(), out=np.zeros(1, dtype=EVENT_DTYPE))
    with pytest.raises(InvalidArgumentError):
        list(R.replay_chunks(ev, Machine(), chunk_size=0))
    neg = np.zeros(1, dtype=[("exit_qual", "<i8"), ("rax", "<u8"), ("reply", "<u8"), ("instr_len", "<u4")])
    neg["exit_qual"] = -1
    with pytest.raises(InvalidArgumentError, match="negative"):
        R.replay(neg, Machine())


def test_other_structured_layouts_are_converted():
    ev = random_events(14, 500)
    other = np.zeros(len(ev), dtype=[("instr_len", "<u8"), ("reply", "<u8"), ("rax", "<u8"),
                                     ("exit_qual", "<u8"), ("extra", "u1")])
    for f in ("instr_len", "reply", "rax", "exit_qual"):
        other[f] = ev[f]
    a = R.replay(ev, make_machine("linux", "normal"))
    b = R.replay(other, make_machine("linux", "normal"))
    c = R.replay(ev[::-1][::-1].copy(), make_machine("linux", "normal"))
    assert (a == b).all() and (a == c).all()


@pytest.mark.parametrize("core", KERNELS)
def test_kernel_rejects_malformed_plans(core):
    """replay_kernel is public low-level API: a broken plan is a typed error, never a crash."""
    m = latch_machine()
    rp = R.Replayer(m)
    plan = rp._plan
    plan.prepare()
    ev = R.io_events(0x5000, 1, True)
    res = np.zeros(1, dtype=RESULT_DTYPE)
    assert core.replay_kernel(plan, ev, res, 0, 1) == 1
    for attr, value in (("slots", np.full(0x10000, 99, dtype=np.int32)),
                        ("ranges", np.array([[5, 2, 2, 0]], dtype=np.int64)),
                        ("dstate", np.full((1, 16), 99, dtype=np.uint64)),
                        ("cfg", np.zeros(3, dtype=np.int64)),
                        ("bufs", "nope")):
        saved = getattr(plan, attr)
        setattr(plan, attr, value)
        try:
            with pytest.raises(InvalidArgumentError):
                core.replay_kernel(plan, ev, res, 0, 1)
        finally:
            setattr(plan, attr, saved)
    with pytest.raises(InvalidArgumentError):
        core.replay_kernel(plan, ev, res, 0, 2)
    with pytest.raises(InvalidArgumentError):
        core.replay_kernel(plan, np.zeros(1, dtype=[("exit_qual", "<u8")]), res, 0, 1)
    plan.release()


# ---------------------------------------------------------------- devices and events

def test_latch_and_sink_on_the_python_bus():
    """Both devices behave the same through Machine.execute (Python) as in replay."""
    latch, const, sink = R.LatchDevice(0x11), R.LatchDevice(0x22, writable=False), R.CountingSink(0xABCD)
    for dev in (latch, const):
        dev.write(0, 1, 0x99)
    assert latch.read(0, 1) == 0x99 and const.read(0, 4) == 0x22
    sink.write(0, 2, 5)
    assert sink.read(0, 4) == 0xABCD and (sink.reads, sink.writes, sink.bytes_read, sink.bytes_written) == (1, 1, 4, 2)
    latch.reset()
    sink.reset()
    assert latch.value == 0x11 and sink.writes == 0
    for bad in (-1, 1 << 64, "x"):
        with pytest.raises(InvalidArgumentError):
            R.LatchDevice(bad)
        with pytest.raises(InvalidArgumentError):
            R.CountingSink(bad)
    with pytest.raises(InvalidArgumentError):
        R.LatchDevice(1, writable=1)


def test_io_events_encodes_ref_6_1_qualifications():
    ev = R.io_events([0x3F8, 0x3FD, 0x71, 0x80, 0xCFC, 0x1F0], [1, 1, 1, 1, 4, 2],
                     [False, True, True, False, True, True], imm=[False, False, True, True, False, False],
                     instr_len=[1, 1, 2, 2, 1, 2])
    assert ev["exit_qual"].tolist() == [0x03F80000, 0x03FD0008, 0x00710048, 0x00800040, 0x0CFC000B, 0x01F00009]
    rep = R.io_events(0x3F8, 1, False, string=True, rep=True)
    assert rep["exit_qual"][0] == 0x03F80030
    assert ev.dtype == EVENT_DTYPE and ev["reply"][0] == 0xFFFFFFFF
    for kw in (dict(port=0x10000), dict(size=3), dict(port=0x100, imm=True), dict(rax=-1),
               dict(port=1.5)):
        args = dict(port=1, size=1, is_in=True) | kw
        with pytest.raises(InvalidArgumentError):
            R.io_events(args.pop("port"), args.pop("size"), args.pop("is_in"), **args)


def test_summary_counts_per_port():
    m = Machine()
    ev = np.concatenate([R.io_events(0x3F8, 1, False, rax=0x41), R.io_events(0x3FD, 1, True),
                         R.io_events(0x3F8, 1, False, string=True, rep=True)])
    res = R.replay(ev, m)
    s = R.ReplaySummary()
    s.add(ev, res)
    rows = {r.port: r for r in s.rows(m.host.bus)}
    assert rows[0x3F8].events == 2 and rows[0x3F8].ves == 2 and rows[0x3F8].tdvmcalls == 1
    assert rows[0x3F8].faults == 1 and rows[0x3F8].device == "uart" and rows[0x3FD].ins == 1
    assert s.total_ves == 3 and s.total_tdvmcalls == 2 and s.faults[ReplayFault.STRING_IO] == 1
    assert [r.port for r in s.rows(sort="ves")][0] == 0x3F8
    assert m.host.uart.output == b"A"


# ---------------------------------------------------------------- files larger than memory

def test_replay_file_and_memmap_chunks(tmp_path):
    ev = random_events(15, 5000)
    path = tmp_path / "events.bin"
    ev.tofile(path)
    whole = R.replay(ev, make_machine("linux", "normal"))
    m = make_machine("linux", "normal")
    summary = R.replay_file(path, m, chunk_size=1000, results_path=tmp_path / "results.bin")
    back = np.fromfile(tmp_path / "results.bin", dtype=RESULT_DTYPE)
    assert (back == whole).all() and summary.total_events == 5000
    mm = np.memmap(path, dtype=EVENT_DTYPE, mode="r")
    got = np.concatenate([r.copy() for _, r in R.replay_chunks(mm, make_machine("linux", "normal"),
                                                                 chunk_size=333)])
    assert (got == whole).all()
    (tmp_path / "bad.bin").write_bytes(b"\0" * 33)
    with pytest.raises(InvalidArgumentError, match="multiple"):
        R.replay_file(tmp_path / "bad.bin", Machine())


@pytest.mark.skipif(not sys.platform.startswith("linux") or core_c is None,
                    reason="reads /proc/self/status; 4 M events need the compiled core")
def test_chunked_memmap_replay_keeps_the_resident_set_small(tmp_path, run_python):
    """A 128 MiB event file replayed from a memory map in 64 Ki-event chunks: the peak
    resident set grows by far less than the file (the finished chunks' pages are
    released); the 10^8-event / 1 GiB bound is measured by benchmarks/bench_replay.py."""
    script = textwrap.dedent(f"""
        import numpy as np
        from tdxve.abi import EVENT_DTYPE
        from tdxve.machine import Machine
        from tdxve.replay import io_events, replay_chunks, LatchDevice
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        path = {str(tmp_path / "big.bin")!r}
        block = io_events(0x5000, 1, np.arange(1 << 16) % 2 == 0, rax=np.arange(1 << 16))
        with open(path, "wb") as f:
            for _ in range(64):
                block.tofile(f)
        del block
        m = Machine()
        m.host.bus.register(0x5000, 1, LatchDevice(1))
        list(replay_chunks(io_events(0x5000, 1, True), m))     # warm-up
        base = hwm()
        mm = np.memmap(path, dtype=EVENT_DTYPE, mode="r")
        n = 0
        for lo, res in replay_chunks(mm, m, chunk_size=1 << 16):
            n += len(res)
        print(n, hwm() - base)
    """)
    r = run_python("-c", script, env={"TDXVE_PUREPYTHON": "0"}, check=False)
    assert r.returncode == 0, r.stderr
    n, grew = map(int, r.stdout.split())
    assert n == 64 << 16
    assert grew < 48 << 20, f"peak RSS grew by {grew >> 20} MiB for a 128 MiB file"


class Meddler:
    """A Python device that reads and changes compiled devices' state."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def read(self, port, size):
        h = self.host
        h.bus.read(0x80, 1)                             # a direct access: logged now, in order
        return h.cmos.index | h.uart.scr << 8 | (h.pci.config_address & 0xFF) << 16 | len(h.uart.tx) << 24

    def write(self, port, size, value):
        h = self.host
        h.uart.scr = value & 0xFF
        h.cmos.index = (value >> 8) & 0x7F
        h.uart.tx += b"#"                               # output order with the compiled THR bytes
        h.pci.add(2, value & 0x1F, 0, R.PciFunction(0x1234, value & 0xFFFF)) \
            if (2, value & 0x1F, 0) not in h.pci.functions else h.pci.remove(2, value & 0x1F, 0)


@pytest.mark.parametrize("core", KERNELS)
def test_python_devices_see_and_change_compiled_state(core):
    """Device state stays consistent both ways around a Python call: the Python device
    reads what the compiled forms wrote so far and its changes reach them; the event
    log keeps its order when the device makes direct (logged) bus accesses."""
    def mk():
        m = Machine(host=Host(log=True))
        m.host.bus.register(0x7000, 1, Meddler(m.host), sizes=(1, 2, 4))
        return m

    rng = np.random.default_rng(8)
    n = 4000
    ports = rng.choice([0x7000, 0x3F8, 0x3FF, 0x70, 0x71, 0xCF8, 0xCFC, 0xCFD], n)
    sizes = np.where(np.isin(ports, [0xCF8, 0xCFC]), 4, np.where(ports == 0x7000, 2, 1))
    rax = np.where(ports == 0xCF8, 0x80000000 | (rng.integers(0, 32, n) << 11) | (2 << 16) * rng.integers(0, 2, n),
                   rng.integers(0, 1 << 16, n))
    ev = R.io_events(ports, sizes, rng.random(n) < 0.5, rax=rax)
    a, b = mk(), mk()
    ref = reference(a, ev)
    got = run(ev, b, core)
    assert not first_mismatch(ref, got, ev)
    assert not diff_snapshots(snapshot(a), snapshot(b))
    assert b"#" in b.host.uart.output and len(b.host.pci.functions) > 1


@pytest.mark.parametrize("core", KERNELS)
def test_bus_unassigned_reply_is_honoured_in_machine_mode(core):
    ev = random_events(16, 3000)

    def mk():
        m = make_machine("linux", "normal")
        m.host.bus.unassigned_reply = 0x8899AABBCCDDEEFF
        return m

    a, b = mk(), mk()
    ref = reference(a, ev)
    got = run(ev, b, core)
    assert not first_mismatch(ref, got, ev)
    assert not diff_snapshots(snapshot(a), snapshot(b))
    q = ev["exit_qual"] & 0xFFFF001F
    inl = q == 0x1234000B                                   # IN EAX from an unassigned port
    assert inl.sum() > 5 and (got["rax"][inl] == 0xCCDDEEFF).all()


@pytest.mark.skipif(core_c is None, reason="needs the compiled core")
def test_kernels_raise_the_same_messages():
    """Both kernels build their errors with _replay_py.plan_error: same class, same text."""
    m = latch_machine()
    rp = R.Replayer(m)
    plan = rp._plan
    plan.prepare()
    ev = R.io_events(0x5000, 1, True)
    res = np.zeros(1, dtype=RESULT_DTYPE)
    bad_plans = (("slots", np.full(0x10000, 99, dtype=np.int32)), ("ranges", np.array([[5, 2, 2, 0]])),
                 ("ranges", np.array([[5, 2, 2, 0]], dtype=np.int64)), ("dstate", np.full((1, 16), 99, np.uint64)),
                 ("cfg", np.zeros(3, dtype=np.int64)), ("cfg", np.zeros(_replay_py.NCFG, dtype=np.int64)),
                 ("bufs", "nope"), ("bufs", [np.zeros(3, dtype=np.int8)]), ("pcifn", np.zeros((1, 4), np.int64)),
                 ("pcifn", np.array([[0, 7, 0, 0, 0]], dtype=np.int64)), ("touched", np.zeros(5, np.uint16)))

    def outcome(core, *args):
        try:
            core.replay_kernel(*args)
        except Exception as e:  # noqa: BLE001 - the failure itself is compared
            return type(e), str(e)
        return None

    for attr, value in bad_plans:
        saved = getattr(plan, attr)
        setattr(plan, attr, value)
        try:
            a, b = outcome(core_c, plan, ev, res, 0, 1), outcome(core_py, plan, ev, res, 0, 1)
        finally:
            setattr(plan, attr, saved)
        assert a is not None and a == b and a[0] is InvalidArgumentError, (attr, a, b)
    for args in ((plan, ev, res, 1, 0), (plan, ev, res, 0, 5), (plan, ev, res, 0.0, 1),
                 (plan, ev[["exit_qual"]], res, 0, 1), (plan, ev, res[::-1][:0], 0, 0),
                 (plan, ev, np.zeros(1, dtype=EVENT_DTYPE), 0, 1)):
        a, b = outcome(core_c, *args), outcome(core_py, *args)
        assert a == b and (a is None or a[0] is InvalidArgumentError), (a, b)
    plan.release()

