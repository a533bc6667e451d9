"""Reusable invariant checks: what tdxve guarantees whatever the input and whatever the host does.

The fuzz harnesses in ``fuzz/`` and the property tests call these; a user who
plugs their own host, device or simulator into tdxve can call them too. Every
check returns quietly or raises :class:`~tdxve.errors.InvariantViolation`
(a :class:`~tdxve.errors.TdxveError` and an :class:`AssertionError`) whose
``invariant`` names the broken rule:

==========================  ==============================================================
``invariant``               rule (references "ref N.M": ``shared/reference/tdx-port-io.md``)
==========================  ==============================================================
``registers``               only RAX and RIP change (RSI/RDI/RCX too for emulated INS/OUTS;
                            RAX never for OUT)
``rip``                     RIP advances by exactly the reported length when the instruction
                            retires, and never moves when it faults (ref 1.5, 1.6)
``rax-width``               under ``linux`` and ``architectural`` no bit above the access
                            width reaches RAX, whatever the host replies (ref 1.4, 6.2)
``rax-merge``               RAX is exactly the profile's merge of the host's reply (ref 1.4)
``out-width``               the OUT value shown to the host has no bit above the access width
                            (``linux``, ``architectural``)
``out-value``               the OUT value is exactly the profile's; under ``linux-2022`` the
                            historical one-bit leak ``RAX & GENMASK(8*size, 0)`` (ref 1.4)
``host-image``              the host sees the Instruction.IO arguments and nothing else of
                            the guest (ref 2.4, 2.5)
``device-state``            device state changes only through accesses the host accepted
``ve-info``                 the VE info is consumed by every #VE (no later #DF, ref 2.2)
``fault-regs``              a guest fault carries the registers exactly as left
``outcome``                 the :class:`~tdxve.machine.Outcome` agrees with what happened
``exception-class``         nothing but a :class:`~tdxve.errors.TdxveError` escapes
``batch``                   batch results equal per-event results
==========================  ==============================================================

Building blocks: :func:`check_registers`, :func:`check_rip`,
:func:`check_in_rax`, :func:`check_out_value` (pure functions of values);
:class:`TdvmcallRecorder` (sees every TDG.VP.VMCALL a host serves);
:func:`device_state`, :func:`check_devices_unchanged`,
:func:`check_devices_replay`; the batch checks :func:`check_decode_batch`,
:func:`check_exit_quals_batch`, :func:`check_exit_infos_batch`; and
:class:`ExecuteChecker`, which runs :meth:`Machine.execute
<tdxve.machine.Machine.execute>` (or ``execute_exit`` for I/O exits) and
applies all of them to every call.
"""

from __future__ import annotations

import pickle
from types import ModuleType
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from . import _common
from ._backend import core as _default_core
from .abi import (
    INSN_DTYPE,
    MAX_INSN_LENGTH,
    U64_MASK,
    ExitReason,
    IoInsn,
    IoKind,
    TdvmcallSubfn,
)
from .errors import (
    DecodeError,
    DoubleFault,
    ExitQualError,
    GuestFault,
    HostError,
    InvalidArgumentError,
    InvariantViolation,
    TdxveError,
    TruncatedInputError,
)
from .guest import PROFILES, Profile
from .machine import Machine, Outcome
from .regs import GPR_NAMES, Regs

__all__ = [
    "InvariantViolation",
    "MERGE_RULES",
    "merge_rule", "width_mask", "expected_in_rax", "expected_out_value",
    "allowed_changes", "check_registers", "check_rip", "check_in_rax", "check_out_value",
    "TdvmcallRecord", "TdvmcallRecorder",
    "device_state", "check_devices_unchanged", "check_devices_replay",
    "check_decode_batch", "check_exit_quals_batch", "check_exit_infos_batch",
    "ExecuteChecker",
    "replay_reference", "check_replay",
]

#: The three IN/OUT data rules of ref 1.4 (``Profile.merge``).
MERGE_RULES = ("linux-2022", "linux", "architectural")

_U32 = 0xFFFFFFFF
#: Linux's ``UINT_MAX``: what a port the guest's filter denies reads as (ref 1.11).
_UINT_MAX = 0xFFFFFFFF
_IO = int(TdvmcallSubfn.IO)
_IO_EXIT = int(ExitReason.IO_INSTRUCTION)
_TDCALL_EXIT = int(ExitReason.TDCALL)


def _violation(invariant: str, message: str, **details: Any) -> InvariantViolation:
    return InvariantViolation(f"[{invariant}] {message}", invariant=invariant, details=details)


# ==========================================================================
# Value rules (ref 1.4)
# ==========================================================================
def merge_rule(profile: str | Profile) -> str:
    """The IN/OUT data rule of ``profile``: one of :data:`MERGE_RULES`.

    :param profile: a profile name (``"linux"``, ``"linux-5.19-rc"``...), a
        :class:`~tdxve.guest.Profile`, or a rule name itself.
    :raises InvalidArgumentError: none of those.
    """
    if isinstance(profile, Profile):
        return profile.merge
    if isinstance(profile, str):
        if profile in MERGE_RULES:
            return profile
        if profile in PROFILES:
            return PROFILES[profile].merge
    raise InvalidArgumentError(
        f"profile must be a Profile, a profile name or one of {MERGE_RULES}, got {profile!r}")


def _check_size(size: Any) -> int:
    if type(size) is not int or not 1 <= size <= 8:
        raise InvalidArgumentError(f"size must be an int in 1..8 (exit qualification bits 2:0 + 1), "
                                   f"got {size!r}")
    return size


def _check_u64(name: str, v: Any) -> int:
    if type(v) is bool or not isinstance(v, int) or not 0 <= v <= U64_MASK:
        raise InvalidArgumentError(f"{name} must be an int in [0, 2**64), got {v!r}")
    return int(v)


def width_mask(size: int) -> int:
    """All-ones over an access of ``size`` bytes (1..8).

    :raises InvalidArgumentError: ``size`` is not 1..8.
    """
    return (1 << (8 * _check_size(size))) - 1


def _genmask_2022(size: int) -> int:
    # Linux 2022 GENMASK(8*size, 0) = ~0UL >> (63 - 8*size) (ref 1.4). Size 8
    # (only from a non-conforming qualification) asks for a shift of -1: x86
    # masks the count to 63, giving 0x1 (docs/ve-model.md, "Choices").
    return U64_MASK >> ((63 - 8 * size) & 63)


def expected_in_rax(profile: str | Profile, rax: int, reply: int, size: int, ok: bool) -> int:
    """RAX after an IN #VE, written from ref 1.4's IN table independently of :mod:`tdxve.guest`.

    :param profile: profile or rule (see :func:`merge_rule`).
    :param rax: RAX before the instruction.
    :param reply: R11 as the host returned it (all 64 bits, garbage included).
    :param size: the size the guest decoded (1, 2, 4; 3 and 5-8 only from
        non-conforming qualifications, handled as docs/ve-model.md says).
    :param ok: the TDVMCALL status was 0.
    :returns: the RAX the profile must leave.
    :raises InvalidArgumentError: a bad argument.
    """
    rule = merge_rule(profile)
    rax = _check_u64("rax", rax)
    reply = _check_u64("reply", reply)
    size = _check_size(size)
    if rule == "linux-2022":
        # clear GENMASK(8*size, 0); on success OR in r11 under the same mask
        mask = _genmask_2022(size)
        return (rax & ~mask & U64_MASK) | (reply & mask if ok else 0)
    value = reply if ok else 0
    if rule == "linux":
        # insn_assign_reg(&ax, ok ? r11 : 0, size): narrow 1/2, (u32) for 4,
        # 64 bits for 8, anything else leaves the register alone
        if size in (1, 2):
            m = width_mask(size)
            return (rax & ~m & U64_MASK) | (value & m)
        if size == 4:
            return value & _U32
        if size == 8:
            return value
        return rax
    # architectural: a faulting IN writes nothing; AL/AX merge, EAX zero-extends
    if not ok:
        return rax
    if size == 4:
        return reply & _U32
    if size == 8:
        return reply
    m = width_mask(size)
    return (rax & ~m & U64_MASK) | (reply & m)


def expected_out_value(profile: str | Profile, rax: int, size: int) -> int:
    """The R15 an OUT #VE must show the host (ref 1.4 OUT table).

    ``linux`` and ``architectural``: ``RAX & (2**(8*size) - 1)``;
    ``linux-2022``: ``RAX & GENMASK(8*size, 0)`` -- one bit more, the
    historical leak, reproduced exactly.

    :raises InvalidArgumentError: a bad argument.
    """
    rule = merge_rule(profile)
    rax = _check_u64("rax", rax)
    size = _check_size(size)
    if rule == "linux-2022":
        return rax & _genmask_2022(size)
    return rax & width_mask(size)


def check_in_rax(profile: str | Profile, size: int, rax_before: int, rax_after: int,
                 reply: int, ok: bool) -> None:
    """Check RAX after an IN: the width rule, then the exact merge.

    ``rax-width`` (``linux``, ``architectural``): the bits above the access
    width are those RAX had (sizes other than 4) or all 0 / unchanged (size
    4: the zero-extension, or an untouched RAX on an architectural fault);
    never a bit the host supplied. ``rax-merge``: RAX equals
    :func:`expected_in_rax`.

    :raises InvariantViolation: either rule is broken.
    """
    rule = merge_rule(profile)
    size = _check_size(size)
    if rule != "linux-2022" and size < 8:
        shift = 8 * size
        hi_before, hi_after = rax_before >> shift, rax_after >> shift
        if hi_after != hi_before and not (size == 4 and hi_after == 0):
            raise _violation(
                "rax-width",
                f"{rule}: bits above the {size}-byte access width changed in RAX: "
                f"{rax_before:#x} -> {rax_after:#x} (host reply {reply:#x}, ok={ok})",
                profile=rule, size=size, rax_before=rax_before, rax_after=rax_after, reply=reply)
    want = expected_in_rax(rule, rax_before, reply, size, ok)
    if rax_after != want:
        raise _violation(
            "rax-merge",
            f"{rule}: IN of {size} byte(s) left RAX {rax_after:#x}, expected {want:#x} "
            f"(RAX before {rax_before:#x}, host reply {reply:#x}, ok={ok})",
            profile=rule, size=size, rax_before=rax_before, rax_after=rax_after, reply=reply,
            expected=want)


def check_out_value(profile: str | Profile, size: int, rax: int, sent: int) -> None:
    """Check the R15 an OUT showed the host.

    :raises InvariantViolation: ``out-width`` -- a bit above the access width
        under ``linux``/``architectural``; ``out-value`` -- not exactly
        :func:`expected_out_value` (under ``linux-2022``: the leak is not
        reproduced bit for bit).
    """
    rule = merge_rule(profile)
    size = _check_size(size)
    if rule != "linux-2022" and sent & ~width_mask(size):
        raise _violation(
            "out-width", f"{rule}: OUT of {size} byte(s) showed the host {sent:#x}, which has bits "
                         f"above the access width (RAX {rax:#x})",
            profile=rule, size=size, rax=rax, sent=sent)
    want = expected_out_value(rule, rax, size)
    if sent != want:
        raise _violation(
            "out-value", f"{rule}: OUT of {size} byte(s) with RAX {rax:#x} showed the host "
                         f"{sent:#x}, expected {want:#x}",
            profile=rule, size=size, rax=rax, sent=sent, expected=want)


# ==========================================================================
# Registers and RIP
# ==========================================================================
def allowed_changes(kind: IoKind | int, *, rep: bool = False, emulated: bool = False) -> frozenset[str]:
    """Registers a port-I/O instruction of ``kind`` may change.

    IN: RAX, RIP. OUT: RIP. INS/OUTS emulated by the guest (``string_io=
    "emulate"``): RDI (INS) or RSI (OUTS), RCX when REP, RIP; rejected
    string I/O changes nothing but may not retire either (RIP).

    :raises InvalidArgumentError: ``kind`` is not an :class:`~tdxve.abi.IoKind`.
    """
    if type(kind) is bool or not isinstance(kind, int) or not 0 <= kind <= 3:
        raise InvalidArgumentError(f"kind must be an IoKind, got {kind!r}")
    k = IoKind(kind)
    if k == IoKind.IN:
        return frozenset({"rax", "rip"})
    if k == IoKind.OUT or not emulated:
        return frozenset({"rip"})
    ptr = "rdi" if k == IoKind.INS else "rsi"
    return frozenset({ptr, "rip", "rcx"} if rep else {ptr, "rip"})


def check_registers(before: Regs, after: Regs, allowed: Iterable[str]) -> None:
    """Every register (GPRs, RIP, RFLAGS, FS/GS base, mode, CPL) outside ``allowed`` is unchanged.

    :raises InvariantViolation: ``registers``, naming each register that changed.
    """
    ok = frozenset(allowed)
    bad = {k: v for k, v in before.diff(after).items() if k not in ok}
    if bad:
        shown = ", ".join(f"{k} {a:#x} -> {b:#x}" for k, (a, b) in sorted(bad.items()))
        raise _violation("registers", f"registers outside {sorted(ok)} changed: {shown}",
                         changed=bad, allowed=sorted(ok))


def check_rip(rip_before: int, rip_after: int, *, retired: bool, instr_len: int) -> None:
    """RIP moved by exactly ``instr_len`` (mod 2**64) if the instruction retired, else not at all.

    :raises InvariantViolation: ``rip``.
    """
    want = (rip_before + instr_len) & U64_MASK if retired else rip_before
    if rip_after != want:
        what = f"advance by {instr_len}" if retired else "stay (the instruction faulted)"
        raise _violation("rip", f"RIP {rip_before:#x} -> {rip_after:#x}; it must {what}, to {want:#x}",
                         rip_before=rip_before, rip_after=rip_after, retired=retired,
                         instr_len=instr_len)


# ==========================================================================
# What the host saw
# ==========================================================================
class TdvmcallRecord(NamedTuple):
    """One TDG.VP.VMCALL as a :class:`TdvmcallRecorder` saw it.

    ``image`` is the 16 GPRs the host was handed (VMCALL bitmap order:
    RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15), ``reply`` the same
    registers after the host returned (None when it raised), ``error`` what
    it raised.
    """

    image: tuple[int, ...]
    reply: tuple[int, ...] | None
    error: BaseException | None

    @property
    def is_io(self) -> bool:
        """A standard call (R10 = 0) of sub-function Instruction.IO (R11 = 30)."""
        return self.image[10] == 0 and self.image[11] == _IO

    @property
    def accepted(self) -> bool:
        """The host returned status 0 in R10 (it did not raise)."""
        return self.reply is not None and self.reply[10] == 0


class TdvmcallRecorder:
    """A host wrapper that records every TDG.VP.VMCALL it forwards.

    :param host: any object with ``tdvmcall(regs)``.
    :raises InvalidArgumentError: ``host`` has no callable ``tdvmcall``.

    Other attributes (``uart``, ``bus``, ``stats``...) are forwarded to
    ``host``, so a recorder can stand where the host stood. ``calls`` is the
    list of :class:`TdvmcallRecord`; :meth:`clear` empties it.
    """

    def __init__(self, host: Any) -> None:
        if not callable(getattr(host, "tdvmcall", None)):
            raise InvalidArgumentError(f"host must have a tdvmcall(regs) method, got {type(host).__name__}")
        self.host = host
        self.calls: list[TdvmcallRecord] = []

    def tdvmcall(self, regs: Regs) -> None:
        """Record the image, forward it, record the reply (or the exception, re-raised).

        :raises InvalidArgumentError: ``regs`` is not a :class:`~tdxve.regs.Regs`.
        """
        if not isinstance(regs, Regs):
            raise InvalidArgumentError(f"tdvmcall() needs a tdxve.Regs register image, got "
                                       f"{type(regs).__name__}")
        image = tuple(regs.gpr(i) for i in range(16))
        try:
            self.host.tdvmcall(regs)
        except BaseException as exc:
            self.calls.append(TdvmcallRecord(image, None, exc))
            raise
        self.calls.append(TdvmcallRecord(image, tuple(regs.gpr(i) for i in range(16)), None))

    def clear(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()

    def __getattr__(self, name: str) -> Any:
        if name == "host":          # not yet set (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.host, name)

    def __repr__(self) -> str:
        return f"TdvmcallRecorder({self.host!r}, calls={len(self.calls)})"


def _expected_image(size: int, write: bool, port: int, value: int, rcx: int) -> tuple[int, ...]:
    # __tdx_hypercall builds the arguments from zero (ref 1.4, 2.4); the TDX
    # module shows the host RAX = 77 (TDCALL exit) and RCX = the select mask.
    g = [0] * 16
    g[0] = _TDCALL_EXIT
    g[1] = rcx
    g[11] = _IO
    g[12] = size
    g[13] = 1 if write else 0
    g[14] = port
    g[15] = value
    return tuple(g)


# ==========================================================================
# Device state
# ==========================================================================
_PLAIN = (int, float, str, bool, type(None))


def _snap(obj: Any, seen: set[int], depth: int) -> Any:
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return ("bytes", bytes(obj))
    if isinstance(obj, np.ndarray):
        return ("array", obj.dtype.str, obj.shape, obj.tobytes())
    if depth > 8:
        return ("deep", type(obj).__name__)
    if isinstance(obj, dict):
        items = [(_snap(k, seen, depth + 1), _snap(v, seen, depth + 1)) for k, v in obj.items()]
        return ("dict", tuple(sorted(items, key=repr)))
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "deque":
        return ("seq", tuple(_snap(v, seen, depth + 1) for v in obj))
    if isinstance(obj, (set, frozenset)):
        return ("set", tuple(sorted((repr(_snap(v, seen, depth + 1)) for v in obj))))
    if callable(obj) and not hasattr(obj, "__dict__") or isinstance(obj, type):
        return ("callable", getattr(obj, "__qualname__", type(obj).__name__))
    if id(obj) in seen:
        return ("ref", type(obj).__name__)
    seen.add(id(obj))
    fields: dict[str, Any] = {}
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if isinstance(name, str) and name not in fields and hasattr(obj, name):
                fields[name] = getattr(obj, name)
    fields.update(getattr(obj, "__dict__", {}))
    out = []
    for name in sorted(fields):
        v = fields[name]
        if callable(v) and not hasattr(v, "__dict__") or _is_bound_callable(v):
            continue                                # callbacks are wiring, not state
        out.append((name, _snap(v, seen, depth + 1)))
    return (type(obj).__name__, tuple(out))


def _is_bound_callable(v: Any) -> bool:
    return callable(v) and (hasattr(v, "__self__") or hasattr(v, "__code__"))


def device_state(host: Any, *, exclude: Iterable[str] = ()) -> tuple[Any, ...]:
    """A deep, comparable snapshot of every device on ``host.bus`` and of ``host.clock``.

    Devices are captured with everything they hold (the plain attributes
    docs/host.md says they keep their state in): pickled when they can be
    (fast), else walked attribute by attribute with callables skipped. Two
    snapshots compare equal exactly when no device changed.

    :param host: a :class:`tdxve.host.Host` (anything with ``bus.ranges()``).
    :param exclude: bus registration names to leave out (e.g. a test's
        deliberately broken device).
    :raises InvalidArgumentError: ``host`` has no port bus.
    """
    bus = getattr(host, "bus", None)
    if bus is None or not callable(getattr(bus, "ranges", None)):
        raise InvalidArgumentError(f"host must have a PortBus in .bus, got {type(host).__name__}")
    skip = frozenset(exclude)
    names: list[str] = []
    objs: list[Any] = []
    done: set[int] = set()
    for r in bus.ranges():
        if r.name in skip or id(r.device) in done:
            continue
        done.add(id(r.device))
        names.append(r.name)
        objs.append(r.device)
    clock = getattr(host, "clock", None)
    if clock is not None:
        names.append("clock")
        objs.append(clock)
    try:
        return (("pickled", tuple(names), pickle.dumps(objs, protocol=pickle.HIGHEST_PROTOCOL)),)
    except Exception:  # noqa: BLE001 - an unpicklable callback or attribute: walk instead
        return _walked(names, objs)


def _walked(names: Sequence[str], objs: Sequence[Any]) -> tuple[Any, ...]:
    seen: set[int] = set()
    return tuple((n, _snap(o, seen, 0)) for n, o in zip(names, objs))


def _per_device(state: tuple[Any, ...]) -> dict[str, Any]:
    if len(state) == 1 and state[0][0] == "pickled":
        _, names, blob = state[0]
        return dict(_walked(names, pickle.loads(blob)))
    return dict(state)


def _state_diff(a: tuple[Any, ...], b: tuple[Any, ...]) -> list[str]:
    da, db = _per_device(a), _per_device(b)
    return sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))


def check_devices_unchanged(before: tuple[Any, ...], after: tuple[Any, ...]) -> None:
    """Two :func:`device_state` snapshots are equal.

    :raises InvariantViolation: ``device-state``, naming the devices that changed.
    """
    if before != after:
        names = _state_diff(before, after)
        if not names:
            return      # equal state, different pickle memo layout
        raise _violation("device-state", f"device state changed without an accepted access: {names}",
                         devices=names)


def check_devices_replay(host: Any, records: Iterable[TdvmcallRecord], fresh: Any, *,
                         exclude: Iterable[str] = ()) -> None:
    """Device state changes only through accepted accesses.

    Replays, on ``fresh`` (a host in the state ``host`` started from), every
    Instruction.IO call of ``records`` that ``host`` accepted (status 0),
    with :meth:`tdxve.host.Host.tdvmcall` itself (so a
    :class:`~tdxve.host.FaultyHost` injects nothing during the replay), and
    compares the two hosts' :func:`device_state`. Calls the host refused or
    never performed must have left no trace.

    :param records: what a :class:`TdvmcallRecorder` placed directly in
        front of ``host`` saw, in order.
    :raises InvariantViolation: ``device-state``.
    """
    from .host import Host          # noqa: PLC0415 - the host package imports devices
    for rec in records:
        if rec.is_io and rec.accepted:
            image = Regs()
            for i, v in enumerate(rec.image):
                image.set_gpr(i, v)
            Host.tdvmcall(fresh, image)
    a, b = device_state(host, exclude=exclude), device_state(fresh, exclude=exclude)
    if a != b:
        names = _state_diff(a, b)
        if not names:
            return
        raise _violation("device-state", f"device state differs from a replay of the accepted "
                                         f"accesses: {names}", devices=names)


# ==========================================================================
# Batch == per event
# ==========================================================================
def _core(core: ModuleType | None) -> Any:
    return _default_core if core is None else core


def _insn_tuple(insn: IoInsn) -> tuple[int, ...]:
    return (int(insn.kind), insn.size, -1 if insn.port is None else insn.port, int(insn.rep),
            insn.addr_size, -1 if insn.segment is None else int(insn.segment), insn.length,
            insn.rep_prefix)


def _rec_tuple(r: Any) -> tuple[int, ...]:
    return (int(r["kind"]), int(r["size"]), int(r["port"]), int(bool(r["rep"])), int(r["addr_size"]),
            int(r["segment"]), int(r["length"]), int(r["rep_prefix"]))


def _same_error(a: BaseException, b: BaseException) -> bool:
    return type(a) is type(b)


def check_decode_batch(buffer: Any, mode: int = 64, *, core: ModuleType | None = None) -> np.ndarray:
    """``decode_insns`` equals ``decode_insn`` applied instruction by instruction.

    With ``on_error="stop"`` every record must equal the single decode at
    its offset, the records must tile the buffer from 0, and the first
    offset that does not decode must raise in ``decode_insn``; with
    ``on_error="raise"`` the same records, or the same exception class at
    that offset. A proper prefix of a decoded instruction is truncated.

    :param buffer: anything the decoder accepts.
    :param mode: 16, 32 or 64.
    :param core: the decoder backend module (default: the active one).
    :returns: the ``on_error="stop"`` records.
    :raises InvariantViolation: ``batch``.
    :raises TdxveError: whatever the decoder raises for bad arguments.
    """
    c = _core(core)
    recs: np.ndarray = c.decode_insns(buffer, mode, on_error="stop")
    data = _buffer_bytes(buffer)
    pos = 0
    for i in range(recs.shape[0]):
        r = recs[i]
        if int(r["offset"]) != pos:
            raise _violation("batch", f"decode_insns record {i} at offset {int(r['offset'])}, "
                                      f"expected {pos}", index=i)
        one = c.decode_insn(data[pos:pos + MAX_INSN_LENGTH + 1], mode)
        if _insn_tuple(one) != _rec_tuple(r):
            raise _violation("batch", f"decode_insns record {i} at offset {pos} is {_rec_tuple(r)}, "
                                      f"decode_insn gives {_insn_tuple(one)}", index=i, offset=pos)
        if one.length > 1:
            try:
                c.decode_insn(data[pos:pos + one.length - 1], mode)
            except TruncatedInputError:
                pass
            else:
                raise _violation("batch", f"a proper prefix of the instruction at {pos} decodes",
                                 offset=pos)
        pos += one.length
    single_err: DecodeError | None = None
    if pos < len(data):
        try:
            c.decode_insn(data[pos:pos + MAX_INSN_LENGTH + 1], mode)
        except DecodeError as exc:
            single_err = exc
        else:
            raise _violation("batch", f"decode_insns stopped at {pos} but decode_insn decodes there",
                             offset=pos)
    try:
        full = c.decode_insns(buffer, mode, on_error="raise")
    except DecodeError as exc:
        if single_err is None or not _same_error(exc, single_err) or exc.offset != pos:
            raise _violation("batch", f"decode_insns(on_error='raise') raised {type(exc).__name__} at "
                                      f"{exc.offset}; the per-instruction decode stops at {pos} with "
                                      f"{type(single_err).__name__}", offset=pos) from exc
    else:
        if single_err is not None:
            raise _violation("batch", f"decode_insns(on_error='raise') did not raise; decode_insn "
                                      f"raises {type(single_err).__name__} at {pos}", offset=pos)
        if full.tobytes() != recs.tobytes():
            raise _violation("batch", "decode_insns records differ between on_error='raise' and 'stop'")
    return recs


def _buffer_bytes(buffer: Any) -> bytes:
    # The bytes a decoder sees in ``buffer`` (bytes, bytearray, memoryview, int8/uint8 array).
    if isinstance(buffer, np.ndarray):
        return np.ascontiguousarray(buffer).reshape(-1).view(np.uint8).tobytes()
    return bytes(buffer)


def check_exit_quals_batch(quals: Any, *, core: ModuleType | None = None) -> np.ndarray:
    """``decode_exit_quals`` equals ``decode_exit_qual`` value by value.

    Each record holds the non-strict decode (``strict=False``) and ``valid``
    is True exactly when the strict decode accepts the value; decoding into
    a reused ``out=`` array gives the same bytes.

    :returns: the records.
    :raises InvariantViolation: ``batch``.
    :raises TdxveError: whatever the decoder raises for bad arguments.
    """
    c = _core(core)
    recs: np.ndarray = c.decode_exit_quals(quals)
    flat = recs.reshape(-1)
    for i in range(flat.shape[0]):
        r = flat[i]
        q = int(r["raw"])
        one = c.decode_exit_qual(q, strict=False)
        got = (int(r["size"]), bool(r["is_in"]), bool(r["is_string"]), bool(r["is_rep"]),
               bool(r["is_imm"]), int(r["port"]), q)
        if got != tuple(one):
            raise _violation("batch", f"decode_exit_quals[{i}] = {got}, decode_exit_qual gives "
                                      f"{tuple(one)}", index=i, qual=q)
        try:
            c.decode_exit_qual(q)
            strict_ok = True
        except ExitQualError:
            strict_ok = False
        if bool(r["valid"]) != strict_ok:
            raise _violation("batch", f"decode_exit_quals[{i}].valid = {bool(r['valid'])} for {q:#x}, "
                                      f"but the strict decode {'accepts' if strict_ok else 'rejects'} it",
                             index=i, qual=q)
    out = np.empty(recs.shape, dtype=recs.dtype)
    out.reshape(-1).view(np.uint8)[...] = 0xA5      # stale contents must be overwritten
    again = c.decode_exit_quals(quals, out=out)
    if again is not out or again.tobytes() != recs.tobytes():
        raise _violation("batch", "decode_exit_quals(out=...) differs from a fresh decode")
    return recs


def check_exit_infos_batch(insns: np.ndarray, dx: Any = 0, *,
                           core: ModuleType | None = None) -> np.ndarray | None:
    """``exit_infos`` equals ``exit_info`` record by record.

    Records with impossible fields make ``exit_infos`` raise
    :class:`~tdxve.errors.InvalidArgumentError` naming the first of them;
    ``exit_info`` must then accept every record before it and reject that one.

    :param insns: an array of :data:`~tdxve.abi.INSN_DTYPE`.
    :param dx: one RDX for all records or one per record.
    :returns: the batch result, or None when it (rightly) raised.
    :raises InvariantViolation: ``batch``.
    :raises TdxveError: a bad ``insns`` or ``dx`` (as the batch raises it).
    """
    c = _core(core)
    if not isinstance(insns, np.ndarray) or insns.dtype != INSN_DTYPE:
        return c.exit_infos(insns, dx)      # type: ignore[no-any-return]  # raises the argument error
    flat = np.ascontiguousarray(insns).reshape(-1)
    n = flat.shape[0]
    dxs = _dx_values(dx, n)
    try:
        batch: np.ndarray = c.exit_infos(insns, dx)
    except InvalidArgumentError as exc:
        msg = str(exc)
        if dxs is None:
            # a bad dx is reported before any record is looked at
            if "insns[" in msg:
                raise _violation("batch", f"exit_infos blamed a record ('{msg}') for a bad dx {dx!r:.80}"
                                 ) from exc
            return None
        bad = -1
        for i in range(n):
            try:
                c.exit_info(_record_insn(flat[i]), dxs[i])
            except InvalidArgumentError:
                bad = i
                break
        if bad < 0 or f"insns[{bad}]" not in msg:
            raise _violation("batch", f"exit_infos raised '{msg}', but the first record exit_info "
                                      f"rejects is {bad if bad >= 0 else 'none'}", index=bad) from exc
        return None
    if dxs is None:
        raise _violation("batch", f"exit_infos accepted the bad dx {dx!r:.80}")
    for i in range(n):
        try:
            one = c.exit_info(_record_insn(flat[i]), dxs[i])
        except TdxveError as exc:
            raise _violation("batch", f"exit_infos accepted record {i} but exit_info raises "
                                      f"{type(exc).__name__}: {exc}", index=i) from exc
        b = batch.reshape(-1)[i]
        got = (int(b["exit_qual"]), int(b["instr_len"]), int(b["instr_info"]))
        if got != tuple(one):
            raise _violation("batch", f"exit_infos[{i}] = {got}, exit_info gives {tuple(one)}", index=i)
    return batch


def _dx_values(dx: Any, n: int) -> list[int] | None:
    # dx as the n values the decoder's own argument rule gives (the rule both
    # backends share), or None when exit_infos must reject it.
    try:
        return [int(v) for v in _common.dx_array(dx, n)]
    except InvalidArgumentError:
        return None


def _record_insn(r: Any) -> IoInsn:
    # An INSN_DTYPE record as the IoInsn decode_insn would have returned;
    # impossible field values are passed through as plain ints.
    from .abi import Segment   # noqa: PLC0415
    kind = int(r["kind"])
    seg = int(r["segment"])
    port = int(r["port"])
    return IoInsn(IoKind(kind) if 0 <= kind <= 3 else kind, int(r["size"]),  # type: ignore[arg-type]
                  None if port == -1 else port, bool(r["rep"]), int(r["addr_size"]),
                  None if seg == -1 else (Segment(seg) if 0 <= seg <= 5 else seg),  # type: ignore[arg-type]
                  int(r["length"]), int(r["rep_prefix"]))


# ==========================================================================
# Machine.execute, end to end
# ==========================================================================
class _IoView(NamedTuple):
    # What the guest's handle_io sees (Linux decode of the qualification's
    # low 32 bits, ref 1.3) plus what the CPU reported.
    size: int
    is_in: bool
    is_string: bool
    rep: bool
    port: int
    instr_len: int


def _io_view(qual: int, instr_len: int) -> _IoView:
    q = qual & _U32
    return _IoView((q & 7) + 1, bool(q & 8), bool(q & 16), bool(q & 32), (q >> 16) & 0xFFFF, instr_len)


class ExecuteChecker:
    """Runs a :class:`~tdxve.machine.Machine` and checks every invariant on each instruction.

    :param machine: the machine. Its TDX module's host is wrapped in a
        :class:`TdvmcallRecorder` (``checker.recorder``; ``machine.host`` is
        left as it was) unless it already is one.
    :param device_host: the :class:`tdxve.host.Host` whose devices are
        checked (default: the host at the end of the recorder chain when it
        has a port bus; None there disables the device check).
    :param device_recorder: a recorder placed directly in front of
        ``device_host`` when something else (e.g. a lying wrapper) sits
        between it and the TDX module; "accepted" is judged there. Default:
        :attr:`recorder`.
    :param exclude_devices: bus names left out of the device check.
    :raises InvalidArgumentError: ``machine`` is not a Machine.

    :meth:`execute` and :meth:`execute_exit` return what the machine returns
    and re-raise what it raises (after checking), or raise
    :class:`~tdxve.errors.InvariantViolation`. Counters: ``executions``,
    ``retired``, ``faults``.
    """

    def __init__(self, machine: Machine, *, device_host: Any = None,
                 device_recorder: TdvmcallRecorder | None = None,
                 exclude_devices: Iterable[str] = ()) -> None:
        if not isinstance(machine, Machine):
            raise InvalidArgumentError(f"machine must be a tdxve Machine, got {type(machine).__name__}")
        self.machine = machine
        host = machine.tdx.host
        if not isinstance(host, TdvmcallRecorder):
            host = TdvmcallRecorder(host)
            machine.tdx.host = host
        self.recorder: TdvmcallRecorder = host
        self.device_recorder = device_recorder if device_recorder is not None else host
        if device_host is None:
            inner: Any = host
            while isinstance(inner, TdvmcallRecorder):
                inner = inner.host
            bus = getattr(inner, "bus", None)
            device_host = inner if callable(getattr(bus, "ranges", None)) else None
        self.device_host = device_host
        self.exclude_devices = tuple(exclude_devices)
        self.executions = 0
        self.retired = 0
        self.faults = 0

    # ------------------------------------------------------------ entries
    def execute(self, regs: Regs, code: Any) -> Outcome:
        """``machine.execute(regs, code)``, checked.

        :raises InvariantViolation: an invariant broke.
        :raises TdxveError: whatever ``execute`` raised (checked first).
        """
        m = self.machine
        c = _default_core
        return self._run(regs, lambda: m.execute(regs, code),
                         lambda b: self._view_of_code(c, code, b))

    def execute_exit(self, regs: Regs, reason: int, *, exit_qual: int = 0,
                     instr_len: int | None = None, instr_info: int = 0) -> Outcome:
        """``machine.execute_exit(...)``, checked; full checks for reason 30 (I/O).

        Other reasons get the generic checks only (exception class, RIP,
        VE info consumed, devices untouched when nothing was accepted).

        :raises InvariantViolation: an invariant broke.
        :raises TdxveError: whatever ``execute_exit`` raised.
        """
        m = self.machine

        def call() -> Outcome:
            return m.execute_exit(regs, reason, exit_qual=exit_qual, instr_len=instr_len,
                                  instr_info=instr_info)

        def view(_: Regs) -> _IoView | None:
            if reason != _IO_EXIT or type(exit_qual) is not int or type(instr_len) is not int:
                return None
            if not 0 <= exit_qual <= U64_MASK or not 0 <= instr_len <= _U32:
                return None
            return _io_view(exit_qual, instr_len)

        return self._run(regs, call, view, generic=reason != _IO_EXIT)

    # ------------------------------------------------------------ the checks
    @staticmethod
    def _view_of_code(c: Any, code: Any, before: Regs) -> _IoView | None:
        try:
            insn = c.decode_insn(code, before.mode)
        except TdxveError:
            return None
        qual, length, _ = c.exit_info(insn, before.rdx)
        return _io_view(qual, length)

    def _run(self, regs: Regs, call: Callable[[], Outcome],
             view_of: Callable[[Regs], _IoView | None], generic: bool = False) -> Outcome:
        m = self.machine
        if not isinstance(regs, Regs):
            return call()                   # raises the machine's argument error
        before = regs.copy()
        pending_before = m.tdx.ve_pending
        dev = self.device_host
        state0 = device_state(dev, exclude=self.exclude_devices) if dev is not None else None
        n0 = len(self.recorder.calls)
        d0 = len(self.device_recorder.calls)
        errors0 = getattr(getattr(dev, "bus", None), "error_count", 0)
        out: Outcome | None = None
        exc: TdxveError | None = None
        self.executions += 1
        try:
            out = call()
        except TdxveError as e:
            exc = e
        except Exception as e:  # noqa: BLE001 - the point is to catch what must not escape
            raise _violation("exception-class", f"{type(e).__name__} escaped from the machine: {e}",
                             exception=e) from e
        calls = self.recorder.calls[n0:]
        dcalls = self.device_recorder.calls[d0:]
        try:
            self._check(regs, before, out, exc, calls, view_of, generic, pending_before)
            if state0 is not None and dev is not None:
                # an access a device raised on may have half-happened (docs/host.md 4)
                performed = any(r.is_io and (r.accepted or r.error is not None) for r in dcalls)
                if not performed and getattr(dev.bus, "error_count", 0) == errors0:
                    check_devices_unchanged(state0, device_state(dev, exclude=self.exclude_devices))
        except InvariantViolation as v:
            if exc is not None:
                v.details.setdefault("exception", exc)
            raise
        if exc is not None:
            self.faults += 1
            raise exc
        self.retired += 1
        assert out is not None
        return out

    def _check(self, regs: Regs, before: Regs, out: Outcome | None, exc: TdxveError | None,
               calls: list[TdvmcallRecord], view_of: Callable[[Regs], _IoView | None],
               generic: bool, pending_before: bool) -> None:
        m = self.machine
        if isinstance(exc, DecodeError):
            # #UD/#GP before any VM exit: nothing at all happened (ref 3.5)
            check_registers(before, regs, ())
            if calls:
                raise _violation("host-image", "a TDVMCALL was made for an instruction that never exits")
            if m.tdx.ve_pending != pending_before:
                raise _violation("ve-info", "a #VE was injected for an instruction that never exits")
            return
        if isinstance(exc, InvalidArgumentError) and not isinstance(exc, GuestFault):
            # a bad argument (e.g. an exit field too wide): refused before anything happened
            check_registers(before, regs, ())
            if calls:
                raise _violation("host-image", f"a TDVMCALL was made although the call was refused: {exc}")
            return
        if isinstance(exc, GuestFault) and exc.regs is not None and exc.regs != regs:
            raise _violation("fault-regs", f"{type(exc).__name__} carries registers that differ from "
                                           f"the guest's: {exc.regs.diff(regs)}")
        if not pending_before and m.tdx.ve_pending:
            raise _violation("ve-info", "the VE info is still valid after the #VE was handled: the "
                                        "next #VE would be a #DF")
        if isinstance(exc, DoubleFault):
            check_registers(before, regs, ())
            if calls:
                raise _violation("host-image", "a TDVMCALL was made after a #DF")
            return
        retired = exc is None and out is not None and not out.fixed_up
        if out is not None:
            if out.tdvmcalls != len(calls):
                raise _violation("outcome", f"Outcome.tdvmcalls = {out.tdvmcalls}, the host served "
                                            f"{len(calls)}")
            if out.rip != regs.rip:
                raise _violation("outcome", f"Outcome.rip = {out.rip:#x}, RIP is {regs.rip:#x}")
        if out is None or not out.fixed_up:
            instr_len = out.instr_len if out is not None else 0
            check_rip(before.rip, regs.rip, retired=retired, instr_len=instr_len)
        v = view_of(before)
        if generic or v is None:
            return
        if out is not None and out.instr_len != v.instr_len:
            raise _violation("outcome", f"Outcome.instr_len = {out.instr_len}, the instruction is "
                                        f"{v.instr_len} byte(s)")
        emulate = m.guest.string_io == "emulate"
        kind = (IoKind.INS if v.is_in else IoKind.OUTS) if v.is_string else \
            (IoKind.IN if v.is_in else IoKind.OUT)
        check_registers(before, regs, allowed_changes(kind, rep=v.rep, emulated=emulate))
        if v.is_string:
            self._check_string(before, regs, v, calls)
            return
        profile = m.guest.profile
        rcx = profile.vmcall_rcx
        for rec in calls:
            value = expected_out_value(profile, before.rax, v.size) if not v.is_in else 0
            want = _expected_image(v.size, not v.is_in, v.port, value, rcx)
            if rec.image != want:
                if not v.is_in:
                    check_out_value(profile, v.size, before.rax, rec.image[15])
                diff = {GPR_NAMES[i]: (a, b) for i, (a, b) in enumerate(zip(rec.image, want)) if a != b}
                raise _violation("host-image", f"the host saw {diff} (seen, expected) for "
                                               f"{'IN' if v.is_in else 'OUT'} of {v.size} byte(s) at "
                                               f"port {v.port:#x}", diff=diff)
        if isinstance(exc, HostError):
            # the host raised (e.g. DeviceError): no write-back at all
            check_registers(before, regs, ())
            return
        if v.is_in:
            rax = before.rax
            for rec in calls:
                if rec.reply is None:
                    break
                rax_next = expected_in_rax(profile, rax, rec.reply[11], v.size, rec.reply[10] == 0)
                if rec is calls[-1]:
                    check_in_rax(profile, v.size, rax, regs.rax, rec.reply[11], rec.reply[10] == 0)
                rax = rax_next
            if not calls:
                # No TDVMCALL: either a port the guest's filter denies, which
                # reads UINT_MAX and succeeds (ref 1.11; a handler that does not
                # advance RIP repeats that idempotent merge), or a refusal
                # before any hypercall (user mode, ...) that leaves RAX alone.
                if retired:
                    check_in_rax(profile, v.size, before.rax, regs.rax, _UINT_MAX, True)
                elif regs.rax not in (before.rax,
                                      expected_in_rax(profile, before.rax, _UINT_MAX, v.size, True)):
                    raise _violation("registers", f"RAX changed ({before.rax:#x} -> {regs.rax:#x}) "
                                                  f"although no TDVMCALL was made")
        if retired and calls and not calls[-1].accepted:
            raise _violation("outcome", "the instruction retired although the host refused the access")
        if exc is not None and calls and calls[-1].accepted and len(calls) == 1 \
                and isinstance(exc, GuestFault) and exc.reason == "io-failed":
            raise _violation("outcome", "the instruction faulted although the host accepted the access")

    def _check_string(self, before: Regs, after: Regs, v: _IoView, calls: list[TdvmcallRecord]) -> None:
        # Emulated INS/OUTS: the pointer moved by whole elements in the DF
        # direction at some address size, RCX (REP) counted the same elements
        # down, and never more elements than TDVMCALLs unless ports are
        # filtered. Without REP each #VE moves one element (a handler that
        # does not advance RIP re-executes it: up to ve_loop_limit).
        ptr = "rdi" if v.is_in else "rsi"
        p0, p1 = getattr(before, ptr), getattr(after, ptr)
        if p0 == p1 and before.rcx == after.rcx:
            return
        step = -v.size if before.df else v.size
        io_calls = sum(1 for c in calls if c.is_io)
        for c in calls:
            if c.is_io and c.image[15] & ~width_mask(v.size):
                raise _violation("out-width", f"string element sent {c.image[15]:#x}, wider than "
                                              f"{v.size} byte(s)")
        for abits in (16, 32, 64):
            amask = (1 << abits) - 1
            if v.rep:
                counts = [(before.rcx - after.rcx) & amask]
            else:
                counts = list(range(max(1, io_calls, self.machine.ve_loop_limit) + 1))
            for done in counts:
                moved = (p0 + step * done) & amask
                if abits == 16:
                    want = (p0 & ~0xFFFF & U64_MASK) | moved
                    rcx_want = (before.rcx & ~0xFFFF & U64_MASK) | ((before.rcx - done) & amask)
                else:
                    want = moved
                    rcx_want = (before.rcx - done) & amask
                if p1 == want and (not v.rep or after.rcx == rcx_want):
                    if io_calls and done > io_calls:
                        raise _violation("registers", f"{done} string elements recorded but only "
                                                      f"{io_calls} TDVMCALLs made")
                    return
        raise _violation("registers", f"string I/O left {ptr} {p0:#x} -> {p1:#x}, RCX {before.rcx:#x} -> "
                                      f"{after.rcx:#x}: not a whole number of {v.size}-byte elements "
                                      f"at any address size")


# ---------------------------------------------------------------- batch replay == per-event

class _LastCall:
    """Sits between the TDX module and the host; remembers the last TDVMCALL
    (what it carried in R15 and what came back in R10/R11)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.r15 = self.r10 = self.r11 = 0

    def tdvmcall(self, regs: Regs) -> None:
        self.r15 = regs.r15
        try:
            self.real.tdvmcall(regs)
        finally:
            self.r10 = regs.r10
            self.r11 = regs.r11


def replay_reference(machine: Machine, events: np.ndarray, unassigned: str = "machine") -> np.ndarray:
    """The per-event definition of :func:`tdxve.replay.replay` (issue 6).

    A loop of ``machine.execute_exit(Regs(rax=event.rax), 30, exit_qual=...,
    instr_len=...)`` in kernel mode at RIP 0, each GuestFault mapped to its
    :class:`~tdxve.abi.ReplayFault` code; with ``unassigned="reply"`` the
    bus answers each event's ``reply`` for unassigned bytes. Returns a
    :data:`~tdxve.abi.RESULT_DTYPE` array. Stops (re-raising) at the first
    exception that is not a GuestFault, e.g. a ``DeviceError``.
    """
    from .abi import RESULT_DTYPE, ReplayFault          # noqa: PLC0415
    from .errors import EarlyPanic, GuestPanic, VeFault, VeLoopError  # noqa: PLC0415
    reasons = {"io-failed": ReplayFault.IO_FAILED, "string-io": ReplayFault.STRING_IO}
    tdx = machine.tdx
    real = tdx.host
    spy = _LastCall(real)
    tdx.host = spy
    out = np.zeros(len(events), dtype=RESULT_DTYPE)
    quals = events["exit_qual"].tolist()
    raxs = events["rax"].tolist()
    lens = events["instr_len"].tolist()
    replies = events["reply"].tolist()
    bus = getattr(real, "bus", None)
    try:
        for i in range(len(quals)):
            regs = Regs(rax=raxs[i])
            spy.r15 = spy.r10 = spy.r11 = 0
            if unassigned == "reply" and bus is not None:
                bus.unassigned_reply = replies[i]
            v0, c0 = tdx.ve_injected, tdx.vmcalls
            fault = ReplayFault.NONE
            try:
                machine.execute_exit(regs, 30, exit_qual=quals[i], instr_len=lens[i])
            except VeLoopError:
                fault = ReplayFault.VE_LOOP
            except GuestPanic:
                fault = ReplayFault.GUEST_PANIC
            except (VeFault, EarlyPanic) as f:
                fault = reasons[f.reason]
            out[i] = (regs.rax, spy.r15, spy.r11, spy.r10, regs.rip, tdx.ve_injected - v0,
                      tdx.vmcalls - c0, fault)
    finally:
        tdx.host = real
        if unassigned == "reply" and bus is not None:
            bus.unassigned_reply = None
    return out


def check_replay(events: np.ndarray, make_machine: Callable[[], Machine], *,
                 unassigned: str = "machine", replay_fn: Callable[..., np.ndarray] | None = None,
                 exclude: Iterable[str] = ()) -> np.ndarray:
    """Batch results equal per-event results: replay on one machine, the
    :func:`replay_reference` loop on an identical one, then compare the
    result arrays and every device's state.

    :param make_machine: builds two identical fresh machines (called twice).
    :param replay_fn: the batch function under test (default
        :func:`tdxve.replay.replay`, which uses the active backend).
    :returns: the replay results.
    :raises InvariantViolation: ``batch-results`` or ``device-state``.
    """
    from .replay import replay  # noqa: PLC0415
    batch = replay if replay_fn is None else replay_fn
    m_ref, m_rep = make_machine(), make_machine()
    ref = replay_reference(m_ref, events, unassigned)
    got = batch(events, m_rep, unassigned=unassigned)
    if got.tobytes() != ref.tobytes():
        bad = int(np.argmax(got != ref))
        raise InvariantViolation(
            f"batch-results: event {bad} {events[bad]!r}: replay {got[bad]!r}, per-event {ref[bad]!r}")
    if device_state(m_ref.host, exclude=exclude) != device_state(m_rep.host, exclude=exclude):
        raise InvariantViolation("device-state: replay and the per-event loop left different devices")
    return got
