"""Differential test of the batch replay (issue 6): replay == a loop of Machine.execute_exit.

Per profile, >= 10^5 random events (every device of the standard PC plus a
latch, a constant, a counting sink, Python devices, a buggy device whose
errors are recorded, a UART with an ``on_tx`` callback, PCI functions with and
without a compiled write path, invalid size encodings, string bits, junk in
the reserved bits, unassigned ports, port 0xFFFF wrap-around) go through
``tdxve.replay.replay`` on the active backend and through the reference loop
on an identical machine; the results and everything the machines hold
afterwards (device registers and output, host statistics and event log, bus
counters and recorded device errors, the TDX module's counters and VE info,
the FaultyHost's fault records and RNG) must be equal. 20 % of each profile's
events run on a :class:`~tdxve.host.FaultyHost` (host faults from the fault
plan: statuses, garbage above the width, clobbered registers).

The other backend is compared with the compiled one directly in
``test_replay.py::test_kernels_agree``, and CI runs this file again with
``TDXVE_PUREPYTHON=1``.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_replay_support import diff_snapshots, first_mismatch, make_machine, random_events, reference, snapshot

from tdxve.guest import INTEL_DEBUG_ALLOWED_PORTS
from tdxve.replay import replay

N_STANDARD = 80_000
N_FAULTY = 20_000

# (profile, path, unassigned, options): all four profiles, both paths, the
# event's reply for unassigned ports on two, the port filter on one, the
# host event log on two; the linux-5.19-rc early loop with a limit of 2 #VEs
# (the default 3 only makes the reference slower).
COMBOS = [
    ("linux-2022", "normal", "reply", dict(log=True)),
    ("linux", "early", "machine", dict(port_filter=INTEL_DEBUG_ALLOWED_PORTS | {0x5000, 0x7000, 0x6000, 0x7100})),
    ("architectural", "normal", "reply", {}),
    ("linux-5.19-rc", "early", "machine", dict(log=True, ve_loop_limit=2)),
]


@pytest.mark.slow
@pytest.mark.parametrize("profile,path,unassigned,opts", COMBOS, ids=[c[0] for c in COMBOS])
def test_replay_equals_execute_exit_loop(profile, path, unassigned, opts):
    seed = sum(map(ord, profile))
    for faulty, n in ((False, N_STANDARD), (True, N_FAULTY)):
        events = random_events(seed + faulty, n)
        m_ref = make_machine(profile, path, faulty=faulty, seed=seed, **opts)
        m_rep = make_machine(profile, path, faulty=faulty, seed=seed, **opts)
        ref = reference(m_ref, events, unassigned)
        got = replay(events, m_rep, unassigned=unassigned)
        assert not first_mismatch(ref, got, events), first_mismatch(ref, got, events)
        problems = diff_snapshots(snapshot(m_ref), snapshot(m_rep))
        assert not problems, "\n".join(problems[:10])
        # The workload really exercised what it claims to.
        faults = np.bincount(got["fault"], minlength=5)
        assert faults[2] > n // 50                                  # string I/O
        assert faults[1] > n // 100                                 # failed TDVMCALLs
        if path == "early" and profile == "linux-5.19-rc":
            assert faults[3] > n // 2 and faults[0] == 0            # the endless #VE loop
        else:
            assert faults[0] > n // 2
        if not faulty:
            h = m_rep.host
            assert h.uart.output and h.post.codes and h.bus.error_count > 0 and h.bus.splits > 0
            assert h.pci.reset_requests > 0 and h.stats.failures
        else:
            assert len(m_rep.host.faults) > n // 20
