"""Shared pieces of the replay tests (issue 6): the reference loop, random
events, machine factories and a full state snapshot.

The reference is what the issue names: a loop of
``Machine.execute_exit(regs, 30, exit_qual=..., instr_len=...)`` in kernel
mode with ``regs = Regs(rax=event.rax)`` at RIP 0, the GuestFault it raises
mapped to the fault code, and a spy between the TDX module and the host that
records what the last TDVMCALL carried (R15) and returned (R10, R11).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from tdxve.abi import EVENT_DTYPE
from tdxve.devices import PciFunction, Uart16550
from tdxve.host import FaultPlan, FaultyHost, Host
from tdxve.invariants import replay_reference
from tdxve.machine import Machine
from tdxve.regs import Regs
from tdxve.replay import CountingSink, LatchDevice

# The reference loop lives in tdxve.invariants (shared with fuzz/fuzz_replay.py).
reference = replay_reference


# ---------------------------------------------------------------- devices
class Scratch:
    """A plain Python device: a scratch register that also counts its calls."""

    def __init__(self) -> None:
        self.value = 0x5A
        self.calls = 0

    def read(self, port: int, size: int) -> int:
        self.calls += 1
        self.value = (self.value * 33 + port) & 0xFFFFFFFF
        return self.value

    def write(self, port: int, size: int, value: int) -> None:
        self.calls += 1
        self.value = value ^ port


class Flaky:
    """A Python device with a bug: raises on some accesses."""

    def __init__(self) -> None:
        self.calls = 0

    def read(self, port: int, size: int) -> int:
        self.calls += 1
        if self.calls % 7 == 0:
            raise RuntimeError(f"flaky read #{self.calls}")
        if self.calls % 11 == 0:
            return "not an int"  # type: ignore[return-value]
        return self.calls

    def write(self, port: int, size: int, value: int) -> None:
        self.calls += 1
        if value & 0xFF == 0xEE:
            raise ValueError(f"flaky write {value:#x}")


class MaskedFunction(PciFunction):
    """A PciFunction subclass: its writes are Python, its reads are not."""

    def write(self, offset: int, size: int, value: int) -> None:
        super().write(offset, size, value ^ 0x01)


TX_SEEN: list[int] = []


def add_devices(h: Host) -> None:
    """Extra devices on top of the standard PC: every compiled form and Python ones."""
    b = h.bus
    b.register(0x5000, 2, LatchDevice(0x1234), sizes=(1, 2, 4))
    b.register(0x5004, 4, LatchDevice(0xC0FFEE, writable=False), sizes=(4,))
    b.register(0x6000, 4, CountingSink(0xA5A5A5A5), sizes=(1, 2))
    b.register(0x7000, 2, Scratch(), sizes=(1, 2))
    b.register(0x7100, 1, Flaky(), sizes=(1, 2, 4))
    com2 = Uart16550(0x2F8, on_tx=lambda v: None)
    b.register(0x2F8, 8, com2, sizes=(1,), name="com2")
    h.uart.feed(b"tdxve replay " * 40)
    h.pci.add(0, 1, 0, PciFunction(0x8086, 0x7000, class_code=0x060100))
    h.pci.add(0, 2, 0, MaskedFunction(0x1AF4, 0x1000, class_code=0x020000))
    h.pci.add(1, 0, 0, PciFunction(0x10EC, 0x8139))


def make_machine(profile: str, path: str, *, faulty: bool = False, log: bool = False,
                 port_filter: Any = None, policy: str = "record", seed: int = 0,
                 ve_loop_limit: int = 3) -> Machine:
    if faulty:
        h: Host = FaultyHost(FaultPlan(seed, rate=0.2), on_device_error=policy, log=log or None)
    else:
        h = Host(on_device_error=policy, log=log or None)
    add_devices(h)
    return Machine(profile=profile, path=path, host=h, port_filter=port_filter, ve_loop_limit=ve_loop_limit)


# ---------------------------------------------------------------- events
DEVICE_PORTS = ([0x3F8 + i for i in range(8)] + [0x2F8 + i for i in range(8)]
                + [0x80, 0x81, 0x70, 0x71, 0xE9, 0x402, 0x60, 0x64, 0x608, 0x609, 0x60B]
                + [0xCF8 + i for i in range(8)]
                + [0x5000, 0x5001, 0x5002, 0x5004, 0x5006, 0x6000, 0x6003, 0x7000, 0x7001, 0x7100]
                + [0x4FFF, 0x5FFF, 0xFFFC, 0xFFFD, 0xFFFE, 0xFFFF, 0x0000, 0x1234])


def random_events(seed: int, n: int) -> np.ndarray:
    """Events that hit every device, invalid sizes, string bits and junk bits."""
    rng = np.random.default_rng(seed)
    pool = np.array(DEVICE_PORTS, dtype=np.uint64)
    port = np.where(rng.random(n) < 0.9, rng.choice(pool, n), rng.integers(0, 0x10000, n, dtype=np.uint64))
    enc = np.where(rng.random(n) < 0.85, rng.choice(np.array([0, 1, 3], dtype=np.uint64), n),
                   rng.integers(0, 8, n, dtype=np.uint64))
    q = enc | (rng.integers(0, 2, n, dtype=np.uint64) << np.uint64(3)) | (port << np.uint64(16))
    q |= np.where(rng.random(n) < 0.04, np.uint64(0x10), np.uint64(0))            # string
    q |= rng.integers(0, 4, n, dtype=np.uint64) << np.uint64(5)                  # REP / imm: ignored
    junk = rng.random(n) < 0.05
    q |= np.where(junk, rng.integers(0, 1 << 63, n, dtype=np.uint64) & np.uint64(0xFFFFFFFF0000FF80),
                  np.uint64(0))
    # RAX: random, or values that drive the devices (CONFIG_ADDRESS, CMOS index, UART LCR/MCR/IER/FCR)
    pci = (np.uint64(0x80000000) | (rng.choice(np.array([0, 0, 1, 2, 8, 256], dtype=np.uint64), n)
                                    << np.uint64(8)) | (rng.integers(0, 64, n, dtype=np.uint64) << np.uint64(2)))
    small = rng.choice(np.array([0x00, 0x01, 0x03, 0x07, 0x0A, 0x0B, 0x0C, 0x0D, 0x10, 0x13, 0x32, 0x37,
                                 0x41, 0x80, 0x8E, 0xEE, 0x0F, 0x02, 0x06, 0x1B], dtype=np.uint64), n)
    wild = rng.integers(0, 1 << 63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    pick = rng.random(n)
    rax = np.where(pick < 0.3, wild, np.where(pick < 0.5, pci, small | (wild & np.uint64(0xFFFFFFFFFFFF0000))))
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["exit_qual"] = q
    ev["rax"] = rax
    ev["reply"] = np.where(rng.random(n) < 0.5, rng.integers(0, 1 << 32, n, dtype=np.uint64), wild)
    # mostly 1-3; sometimes anything 32-bit; 1 % zero (RIP does not move: the #VE repeats)
    ev["instr_len"] = np.where(rng.random(n) < 0.95, rng.integers(1, 4, n), rng.integers(0, 1 << 32, n))
    ev["instr_len"][rng.random(n) < 0.01] = 0
    return ev


# ---------------------------------------------------------------- state
def _plain(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = getattr(obj, "__dict__", None) or {k: getattr(obj, k) for k in getattr(obj, "__slots__", ())}
    for k, v in sorted(names.items()):
        if k.startswith("_"):
            continue                    # private caches (PciHost._cached_addr ...) are not state
        if isinstance(v, (bytes, bytearray)):
            out[k] = bytes(v)
        elif isinstance(v, (bool, int, str, float, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, str)) for x in v):
            out[k] = list(v)
    return out


def snapshot(m: Machine) -> dict[str, Any]:
    """Everything a replay may touch, in comparable form."""
    tdx = m.tdx
    h = m.host
    snap: dict[str, Any] = {
        "tdx": (tdx.ve_injected, tdx.df_injected, tdx.veinfo_gets, tdx.vmcalls, tdx.tdcalls, tdx.valid,
                tdx.ve_info),
        "guest": (m.guest.fixups,),
    }
    if not isinstance(h, Host):
        return snap
    bus = h.bus
    devices = {}
    for r in bus.ranges():
        d = r.device
        key = f"{r.name}@{r.first:#x}"
        devices[key] = _plain(d)
        if hasattr(d, "functions"):
            devices[key + ".functions"] = {k: (bytes(f.config), bytes(f.wmask), bytes(f.w1cmask))
                                           for k, f in sorted(d.functions.items())}
    snap.update(
        devices=devices,
        clock=_plain(h.clock),
        stats=(dict(h.stats.calls), dict(h.stats.vmm_calls), dict(h.stats.failures),
               {p: list(c) for p, c in sorted(h.stats.io.counts.items())},
               {p: list(c) for p, c in sorted(h.stats.direct.counts.items())}),
        bus=(bus.unassigned, bus.splits, bus.error_count, bus.unassigned_reply,
             [(e.port, e.size, e.is_write, e.value, e.name, type(e.exception).__name__, str(e.exception))
              for e in bus.device_errors]),
        host=(h.halted, h.halt_count, len(h.fatal_reports)),
        log=None if h.log is None else (h.log.events, h.log.dropped, h.log.next_seq, h.log.capacity),
    )
    if isinstance(h, FaultyHost):
        snap["faults"] = (list(h.faults), h.plan.calls, h.plan.rng.getstate())
    return snap


def diff_snapshots(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            va, vb = a.get(k), b.get(k)
            if isinstance(va, dict) and isinstance(vb, dict):
                out += [f"{k}.{kk}: {va.get(kk)!r:.300} != {vb.get(kk)!r:.300}"
                        for kk in sorted(set(va) | set(vb)) if va.get(kk) != vb.get(kk)]
            else:
                out.append(f"{k}: {va!r:.300} != {vb!r:.300}")
    return out


def first_mismatch(ref: np.ndarray, got: np.ndarray, events: np.ndarray) -> str:
    bad = np.flatnonzero(ref != got)
    if not len(bad):
        return ""
    i = int(bad[0])
    return (f"{len(bad)} results differ; first at {i}: qual {int(events[i]['exit_qual']):#x} rax "
            f"{int(events[i]['rax']):#x}: reference {ref[i]} != replay {got[i]}")


def run_both(factory: Callable[[], Machine], events: np.ndarray, replay_fn: Callable[..., np.ndarray],
             unassigned: str = "machine") -> tuple[np.ndarray, np.ndarray, Machine, Machine]:
    m_ref, m_rep = factory(), factory()
    ref = reference(m_ref, events, unassigned)
    got = replay_fn(events, m_rep, unassigned=unassigned)
    return ref, got, m_ref, m_rep


def test_reference_harness_sees_the_tdvmcall():
    """The spy reports R15 / R10 / R11 of the TDVMCALL (ref 6.2: OUT R15 of 0x112378086 under
    the 2022 code at size 4 is the full 33-bit value)."""
    m = Machine(profile="linux-2022")
    ev = np.zeros(1, dtype=EVENT_DTYPE)
    ev[0] = (0x00800003, 0x112378086, 0, 2)     # OUT 0x80, EAX (size 4)
    r = reference(m, ev)
    assert r[0]["r15"] == 0x112378086 and r[0]["status"] == 0 and r[0]["r11"] == 30
    assert r[0]["rip_delta"] == 2 and r[0]["ves"] == 1 and r[0]["tdvmcalls"] == 1
    assert m.host.post.codes == [0x86]
