"""Fuzz harness: ``replay`` (issue 6) against the per-event loop, with a hostile host.

Per input, on both backends: a batch of up to 24 events built from the
fuzzer's bytes (plausible PC-port qualifications, invalid sizes, string and
reserved bits, any RAX and reply, instruction lengths 0-15), a profile, a
path, the unassigned-port policy and either a plain ``Host`` or a
``FaultyHost`` whose seeded plan injects statuses, garbage above the access
width and clobbered registers. Invariants
(:func:`tdxve.invariants.check_replay`): replay's results equal a loop of
``Machine.execute_exit`` on an identical machine, and so does every device's
state afterwards; only TdxveError subclasses escape; both backends agree.

Run: ``python fuzz/fuzz_replay.py --seconds 60`` (README.md).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

import fuzzlib
from tdxve import invariants as inv
from tdxve.abi import EVENT_DTYPE
from tdxve.guest import PROFILE_NAMES
from tdxve.host import FaultPlan, FaultyHost, Host
from tdxve.machine import Machine

BACKENDS = fuzzlib.load_backends()
U64 = (1 << 64) - 1
# Ports of the standard PC (UART, POST, CMOS, PCI, debugcon, i8042, PM timer)
# and a few unassigned ones.
PORTS = (0x3F8, 0x3F9, 0x3FA, 0x3FB, 0x3FC, 0x3FD, 0x3FE, 0x3FF, 0x80, 0x70, 0x71, 0xCF8, 0xCF9,
         0xCFC, 0xCFD, 0xCFE, 0xCFF, 0x402, 0xE9, 0x60, 0x64, 0x608, 0x1234, 0xFFFF, 0x0)
SEEDS = [bytes(range(i, i + 64)) for i in range(0, 200, 40)] + [b"\x00" * 64, b"\xff" * 64]


def _events(r: fuzzlib.Reader) -> np.ndarray:
    rows: list[tuple[int, int, int, int]] = []
    while r.left >= 4 and len(rows) < 24:
        sel = r.u8() % 8
        if sel < 6:          # a plausible I/O qualification for a PC port
            q = (r.u8() & 0x7B) | PORTS[r.u8() % len(PORTS)] << 16
            if sel == 5:
                q |= r.u8() << (7 + r.u8() % 57) & U64      # a stray reserved bit
        else:
            q = r.u64()
        ilen = r.u8() % 16 if r.flag() else 1 + r.u8() % 3
        rows.append((q & U64, ilen, r.interesting_u64(), r.interesting_u64()))
    ev = np.zeros(len(rows), dtype=EVENT_DTYPE)
    for i, (q, ilen, rax, reply) in enumerate(rows):
        ev[i]["exit_qual"], ev[i]["instr_len"], ev[i]["rax"], ev[i]["reply"] = q, ilen, rax, reply
    return ev


def _factory(profile: str, path: str, faulty: bool, seed: int, rate: float) -> Any:
    def make() -> Machine:
        host: Host = (FaultyHost(FaultPlan(seed=seed, rate=rate), on_device_error="record")
                      if faulty else Host(on_device_error="record"))
        return Machine(profile=profile, path=path, host=host, ve_loop_limit=2)
    return make


@fuzzlib.harness
def check_one(data: bytes) -> None:
    r = fuzzlib.Reader(data)
    profile = PROFILE_NAMES[r.u8() % len(PROFILE_NAMES)]
    path = ("normal", "early")[r.u8() & 1]
    unassigned = ("machine", "reply")[r.u8() & 1]
    faulty = bool(r.u8() & 1)
    seed = r.u16()
    rate = (r.u8() % 5) / 4
    events = _events(r)
    results = []
    for name, core in BACKENDS:
        with fuzzlib.backend_bound(core):
            got = fuzzlib.call(inv.check_replay, events, _factory(profile, path, faulty, seed, rate),
                               unassigned=unassigned)
        results.append((name, got))
    fuzzlib.agree(f"replay of {len(events)} events ({profile}, {path}, {unassigned}, "
                  f"{'faulty' if faulty else 'plain'} host)", results)


if __name__ == "__main__":
    sys.exit(fuzzlib.main(check_one, name="replay", seeds=SEEDS, max_len=256))
