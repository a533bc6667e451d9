"""Deterministic, seeded fault injection for hardening tests: a host that lies.

A :class:`FaultPlan` decides, call by call, whether the next TDG.VP.VMCALL
gets a fault; :class:`FaultyHost` is a :class:`~tdxve.host.Host` that obeys
the plan and records every fault it injected in :attr:`FaultyHost.faults`.

Fault kinds (:class:`FaultKind`):

* ``retry``, ``invalid_operand``, ``align_error``, ``subfunc_unsupported``:
  the call is **not performed** (no device is touched) and R10 gets
  ``RETRY`` (1), ``INVALID_OPERAND`` (0x8000000000000000), ``ALIGN_ERROR``
  (0x8000000000000002) or ``SUBFUNC_UNSUPPORTED`` (0x8000000000000003)
  (ref 2.6); R11 is left as the guest passed it. Linux treats any non-zero
  status as failure and never retries (ref 2.6).
* ``garbage_high``: an Instruction.IO **IN** is performed, then random bits
  are set above the access width in R11 (at least one), so a guest that does
  not mask the reply (the linux-2022 profile's one-bit-too-wide mask, ref
  1.4) shows it. Applies only to a successful IN.
* ``clobber``: the call is performed, then random values are written into
  registers of the image the guest did not expose: those whose bit is clear
  in the RCX select mask the image carries (ref 2.4: the host sees the mask
  in RCX), or RAX, RCX, RSP, RBP (never selectable under KVM's NO_RBP_MOD)
  when RCX is 0, or the plan's ``clobber_regs``. A correct TDX module copies
  none of them back to the guest.

Decisions: call ``n`` (counting every call the plan saw, from 0) gets the
fault ``at[n]`` if given; otherwise, if the call is eligible (``subfns`` is
None or contains its R11; VMM-specific calls only when ``subfns`` is None),
a random fault with probability ``rate``, chosen uniformly among the kinds in
``kinds`` that apply to the call. Everything comes from one
``random.Random(seed)``, so a plan replays identically; :meth:`FaultPlan.reset`
rewinds it. An ``at`` fault that does not apply (``garbage_high`` on an OUT,
or a call that failed anyway) is recorded with ``applied=False``.
"""

from __future__ import annotations

import random
from enum import Enum
from typing import Any, Iterable, Mapping, NamedTuple

from ..abi import TdvmcallStatus, TdvmcallSubfn
from ..errors import InvalidArgumentError
from ..regs import GPR_NAMES, Regs
from .host import Host
from .log import EventLog

__all__ = ["FaultKind", "FaultPlan", "FaultRecord", "FaultyHost", "STATUS_FAULTS"]


class FaultKind(str, Enum):
    """What a faulty host does to a call (module docstring)."""

    RETRY = "retry"
    INVALID_OPERAND = "invalid_operand"
    ALIGN_ERROR = "align_error"
    SUBFUNC_UNSUPPORTED = "subfunc_unsupported"
    GARBAGE_HIGH = "garbage_high"
    CLOBBER = "clobber"


#: Status-returning faults and the R10 each gives (ref 2.6).
STATUS_FAULTS: dict[FaultKind, int] = {
    FaultKind.RETRY: int(TdvmcallStatus.RETRY),
    FaultKind.INVALID_OPERAND: int(TdvmcallStatus.INVALID_OPERAND),
    FaultKind.ALIGN_ERROR: int(TdvmcallStatus.ALIGN_ERROR),
    FaultKind.SUBFUNC_UNSUPPORTED: int(TdvmcallStatus.SUBFUNC_UNSUPPORTED),
}

_IO = int(TdvmcallSubfn.IO)
_NEVER_SELECTABLE = ("rax", "rcx", "rsp", "rbp")


class FaultRecord(NamedTuple):
    """One fault decision and what the guest was given.

    ``call`` is the plan's call index, ``subfn`` R11 of a standard call (R10
    of a VMM call), ``status``/``value`` the R10/R11 left in the image,
    ``clobbered`` the ``(register, value)`` pairs written by ``clobber``,
    ``garbage`` the bits added above the width by ``garbage_high``.
    """

    call: int
    subfn: int
    kind: FaultKind
    applied: bool
    status: int
    value: int
    clobbered: tuple[tuple[str, int], ...]
    garbage: int


def _kind(k: Any) -> FaultKind:
    try:
        return FaultKind(k)
    except ValueError:
        raise InvalidArgumentError(
            f"unknown fault kind {k!r}; expected one of {[x.value for x in FaultKind]}") from None


def _is_io_in(g: list[int]) -> bool:
    return g[10] == 0 and g[11] == _IO and g[13] == 0 and g[12] in (1, 2, 4)


class FaultPlan:
    """Which calls get which faults; deterministic for a given seed.

    :param seed: seed of the plan's ``random.Random``.
    :param rate: probability (0-1) of a random fault on an eligible call.
    :param kinds: fault kinds random faults are drawn from (default: all).
    :param at: explicit faults by call index (0-based).
    :param subfns: sub-functions (R11) eligible for random faults (None: every call).
    :param clobber_regs: registers ``clobber`` writes (default: the unexposed ones).
    :raises InvalidArgumentError: any bad argument.
    """

    def __init__(self, seed: int = 0, *, rate: float = 0.0,
                 kinds: Iterable[FaultKind | str] = tuple(FaultKind),
                 at: Mapping[int, FaultKind | str] | None = None,
                 subfns: Iterable[int] | None = None,
                 clobber_regs: Iterable[str] | None = None) -> None:
        if type(seed) is not int:
            raise InvalidArgumentError(f"seed must be an int, got {seed!r}")
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
            raise InvalidArgumentError(f"rate must be a number in [0, 1], got {rate!r}")
        ks = tuple(_kind(k) for k in kinds)
        if not ks:
            raise InvalidArgumentError("kinds must not be empty")
        at_map: dict[int, FaultKind] = {}
        for n, k in (at or {}).items():
            if type(n) is not int or n < 0:
                raise InvalidArgumentError(f"call index in at= must be a non-negative int, got {n!r}")
            at_map[n] = _kind(k)
        sf: frozenset[int] | None = None
        if subfns is not None:
            sf = frozenset(subfns)
            if any(type(s) is not int or s < 0 for s in sf):
                raise InvalidArgumentError(f"subfns must be non-negative ints, got {subfns!r}")
        regs: tuple[str, ...] | None = None
        if clobber_regs is not None:
            regs = tuple(clobber_regs)
            bad = [r for r in regs if r not in GPR_NAMES]
            if bad or not regs:
                raise InvalidArgumentError(f"clobber_regs must be GPR names from {GPR_NAMES}, got {bad or regs!r}")
        self.seed = seed
        self.rate = float(rate)
        self.kinds = ks
        self.at = at_map
        self.subfns = sf
        self.clobber_regs = regs
        self.rng = random.Random(seed)
        #: Calls the plan has decided on so far (the next call's index).
        self.calls = 0

    def reset(self) -> None:
        """Rewind: same seed, call index 0."""
        self.rng = random.Random(self.seed)
        self.calls = 0

    def decide(self, g: list[int]) -> tuple[int, FaultKind | None]:
        """Index of this call and the fault it gets (None for none), from the
        image's GPR list ``g`` (Regs order)."""
        n = self.calls
        self.calls = n + 1
        r = self.rng.random()                       # drawn for every call: the stream stays aligned
        explicit = self.at.get(n)
        if explicit is not None:
            return n, explicit
        if r >= self.rate:
            return n, None
        standard = g[10] == 0
        if self.subfns is not None and not (standard and g[11] in self.subfns):
            return n, None
        ok = [k for k in self.kinds if k is not FaultKind.GARBAGE_HIGH or _is_io_in(g)]
        if not ok:
            return n, None
        return n, ok[self.rng.randrange(len(ok))]

    def targets(self, g: list[int]) -> tuple[str, ...]:
        """Registers ``clobber`` writes for this image."""
        if self.clobber_regs is not None:
            return self.clobber_regs
        mask = g[1] & 0xFFFF
        if mask:
            return tuple(name for i, name in enumerate(GPR_NAMES) if not mask >> i & 1)
        return _NEVER_SELECTABLE

    def __repr__(self) -> str:
        return (f"FaultPlan(seed={self.seed}, rate={self.rate}, kinds={[k.value for k in self.kinds]}, "
                f"at={ {n: k.value for n, k in self.at.items()} }, calls={self.calls})")


class FaultyHost(Host):
    """A :class:`~tdxve.host.Host` that injects the faults ``plan`` decides.

    :param plan: the fault plan (default: ``FaultPlan()``, which injects nothing).
    :param kwargs: passed to :class:`~tdxve.host.Host`.
    :raises InvalidArgumentError: ``plan`` is not a FaultPlan, or a bad Host argument.

    ``faults`` lists every fault decision (:class:`FaultRecord`), in call
    order; the event log's ``fault`` field names the kind for the call.
    """

    def __init__(self, plan: FaultPlan | None = None, **kwargs: Any) -> None:
        if plan is not None and not isinstance(plan, FaultPlan):
            raise InvalidArgumentError(f"plan must be a FaultPlan, got {plan!r}")
        super().__init__(**kwargs)
        self.plan = plan if plan is not None else FaultPlan()
        self.faults: list[FaultRecord] = []

    def tdvmcall(self, regs: Regs) -> None:
        """Serve the call, injecting the plan's fault (see :meth:`Host.tdvmcall`).

        :raises InvalidArgumentError: ``regs`` is not a Regs.
        :raises DeviceError: as :meth:`Host.tdvmcall` (no fault is recorded then).
        """
        if not isinstance(regs, Regs):
            raise InvalidArgumentError(f"tdvmcall() needs a tdxve.Regs register image, got {type(regs).__name__}")
        g = regs._g
        n, kind = self.plan.decide(g)
        if kind is None:
            super().tdvmcall(regs)
            return
        subfn = g[10] if g[10] else g[11]
        status = STATUS_FAULTS.get(kind)
        if status is not None:
            self._status_fault(g, kind, status)
            self.faults.append(FaultRecord(n, subfn, kind, True, g[10], g[11], (), 0))
            return
        was_in = _is_io_in(g)
        size = g[12]
        log = self.log
        seq = log.next_seq if log is not None else -1
        super().tdvmcall(regs)
        clobbered: tuple[tuple[str, int], ...] = ()
        garbage = 0
        applied = True
        if kind is FaultKind.GARBAGE_HIGH:
            if was_in and g[10] == 0:
                bits = 64 - 8 * size
                garbage = (self.plan.rng.getrandbits(bits) or 1) << (8 * size)
                g[11] |= garbage
            else:
                applied = False
        else:
            names = self.plan.targets(g)
            rng = self.plan.rng
            clobbered = tuple((name, rng.getrandbits(64)) for name in names)
            for name, v in clobbered:
                g[GPR_NAMES.index(name)] = v
        self.faults.append(FaultRecord(n, subfn, kind, applied, g[10], g[11], clobbered, garbage))
        if applied and log is not None and log.next_seq == seq + 1:
            _amend_last(log, kind.value, g[11] if kind is FaultKind.GARBAGE_HIGH else None)

    def _status_fault(self, g: list[int], kind: FaultKind, status: int) -> None:
        # The call is not performed; count and log it like a served call that failed.
        self.halted = False
        st = self.stats
        if g[10]:
            st.vmm_calls[g[10]] = st.vmm_calls.get(g[10], 0) + 1
            name, subfn, arg = "vmm", g[10], g[11]
        else:
            sub = g[11]
            st.calls[sub] = st.calls.get(sub, 0) + 1
            subfn = sub
            if sub == _IO:
                name, arg = "io", g[14]
            else:
                entry = self._handlers.get(sub)
                name, arg = (entry[0] if entry is not None else "unsupported"), g[12]
        g[10] = status
        st.failures[status] = st.failures.get(status, 0) + 1
        log = self.log
        if log is not None:
            io = name == "io"
            log.record("tdvmcall", name, subfn, arg, g[12] if io else -1, g[13] if io else -1, -1,
                       status, kind.value)


def _amend_last(log: EventLog, fault: str, value: int | None) -> None:
    # Tag the event the call just logged with the fault (and the value the guest really got).
    ev = log._events
    e = ev[-1]
    ev[-1] = (e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7] if value is None else value, e[8], fault)
