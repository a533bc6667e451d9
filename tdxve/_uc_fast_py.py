"""Pure-Python twin of the Unicorn fast path (``tdxve/_uc_fast.pxi``).

:class:`UcFastPath` registers IN/OUT hooks with Unicorn's C API and, for an
IN/OUT in 64-bit kernel mode, runs the #VE round trip as one event of the
replay kernel on a plan bound for the whole ``uc_emu_start`` -- the steps of
``Machine.execute``, without building a :class:`~tdxve.regs.Regs`. Anything
else is declined before any state changes and handed to the handler (the
:class:`tdxve.embed.unicorn.UnicornAttachment`), whose Python path serves it.

This module is the readable specification: the compiled class does the same
steps in the same order; here the hooks are ctypes callbacks, so it is no
faster than the Python path (tests run it to hold both to one behaviour).
Per access (an IN/OUT hook call):

1. Nothing while a barrier is pending (``draining``).
2. Unbound (no plan): the handler serves it (``UF_SLOW``).
3. Read RIP, RAX, RDX, CR0, CS, EFLAGS, IA32_EFER and GDTR in one batch.
4. Decline unless in protected mode without VM (real and virtual-8086 mode
   have no #VE), CPL < 3, and 64-bit: the CS descriptor from the GDT, when
   usable, decides with EFER.LMA and its L bit, else the instance's fallback
   mode (``tdxve.embed.cpu.cpu_mode``).
5. Decline unless the 15 bytes at RIP read, decode to IN or OUT (not
   INS/OUTS) and agree with Unicorn's port, size and direction.
6. One replay event: the exit qualification and length from
   ``exit_info``, RAX, reply 0. A full output/log buffer is flushed by the
   handler (``UF_FLUSH``) and the event run again; a failed callback (a
   device that raised) goes to the handler (``UF_ABORT``); a fault or a RIP
   that did not advance by the length -- which the fast path's conditions
   exclude -- too (``UF_UNEXPECTED``).
7. Count #VEs and TDVMCALLs per (port, direction); for IN, the value to
   return and, when the profile changed RAX bits above the access width,
   RAX written first; a 32-bit IN whose RAX keeps bits 63:32 (linux-2022)
   goes to the handler (``UF_BARRIER``) with RAX and the next RIP.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any

import numpy as np

from .abi import EVENT_DTYPE, RESULT_DTYPE
from .errors import EmbedError, InvalidArgumentError, TdxveError

__all__ = ["UcFastPath"]

UF_SLOW = 1
UF_FLUSH = 2
UF_ABORT = 3
UF_BARRIER = 4
UF_UNEXPECTED = 5

API_NAMES = ("uc_reg_read_batch", "uc_reg_write", "uc_vmem_read", "uc_hook_add", "uc_hook_del")
#: Registers read per access, in this order.
REG_NAMES = ("rip", "rax", "rdx", "cr0", "cs", "eflags", "msr", "gdtr")
CONST_NAMES = REG_NAMES + ("hook_insn", "insn_in", "insn_out", "prot_read")
_EFER = 0xC0000080
_U32 = 0xFFFFFFFF
_MASK = (0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFF)


def _in_range(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


def check_args(handle: Any, api: Any, consts: Any, handler: Any, fallback_mode: Any) -> dict[str, int]:
    """Validate :class:`UcFastPath`'s arguments (shared by both backends); the API addresses."""
    if not _in_range(handle, 1, 1 << 64):
        raise InvalidArgumentError(f"handle must be a non-null uc_engine pointer (int), got {handle!r}")
    if not isinstance(api, Mapping) or not isinstance(consts, Mapping):
        raise InvalidArgumentError(f"api and consts must be mappings, got {type(api).__name__} and "
                                   f"{type(consts).__name__}")
    addrs: dict[str, int] = {}
    for name in API_NAMES:
        a = api.get(name)
        if not isinstance(a, int) or not _in_range(a, 1, 1 << 64):
            raise InvalidArgumentError(f"api[{name!r}] must be a function address (int), got {a!r}")
        addrs[name] = a
    for name in CONST_NAMES:
        c = consts.get(name)
        if not _in_range(c, 0, 1 << 31):
            raise InvalidArgumentError(f"consts[{name!r}] must be a Unicorn constant (int), got {c!r}")
    if not callable(getattr(handler, "_fast_callback", None)) or not callable(getattr(handler, "_fast_error", None)):
        raise InvalidArgumentError(f"handler must have _fast_callback and _fast_error, got {type(handler).__name__}")
    if fallback_mode not in (16, 32, 64) or isinstance(fallback_mode, bool):
        raise InvalidArgumentError(f"fallback_mode must be 16, 32 or 64, got {fallback_mode!r}")
    return addrs


def already_installed() -> EmbedError:
    return EmbedError("the fast-path hooks are already installed")


def hook_error(which: str, err: int) -> EmbedError:
    return EmbedError(f"uc_hook_add refused the {which} hook: Unicorn error {err}")


class _Msr(ctypes.Structure):
    # unicorn/x86.h uc_x86_msr
    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class _Mmr(ctypes.Structure):
    # unicorn/x86.h uc_x86_mmr
    _fields_ = [("selector", ctypes.c_uint16), ("base", ctypes.c_uint64),
                ("limit", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


_vp, _i32, _u32, _u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
_IN_CB = ctypes.CFUNCTYPE(_u32, _vp, _u32, _i32, _vp)
_OUT_CB = ctypes.CFUNCTYPE(None, _vp, _u32, _i32, _u32, _vp)


class UcFastPath:
    """Compiled IN/OUT hooks for one Unicorn instance (mechanism behind
    :func:`tdxve.embed.unicorn.attach`; use that).

    :param handle: the instance's ``uc_engine *`` (``uc._uch``) as an int.
    :param api: addresses of ``uc_reg_read_batch``, ``uc_reg_write``,
        ``uc_vmem_read``, ``uc_hook_add`` and ``uc_hook_del`` (a mapping of
        those names to ints).
    :param consts: Unicorn constants: ``hook_insn``, ``insn_in``, ``insn_out``,
        ``prot_read`` and the register ids ``rip``, ``rax``, ``rdx``, ``cr0``,
        ``cs``, ``eflags``, ``msr``, ``gdtr`` (a mapping of those names to ints).
    :param handler: the object whose ``_fast_callback(op, a, b, c, d) -> int``
        serves what the fast path declines and ``_fast_error(exc)`` stops
        emulation (a :class:`tdxve.embed.unicorn.UnicornAttachment`).
    :param fallback_mode: the decode mode of protected mode without a usable
        CS descriptor (16, 32 or 64: the instance's UC_MODE).
    :raises InvalidArgumentError: a missing or non-int address or constant, a
        bad mode.
    """

    def __init__(self, handle: int, api: Mapping[str, int], consts: Mapping[str, int], handler: Any, *,
                 fallback_mode: int = 64) -> None:
        addrs = check_args(handle, api, consts, handler, fallback_mode)
        self._uc = ctypes.c_void_p(handle)
        self._reg_read_batch = ctypes.CFUNCTYPE(_i32, _vp, ctypes.POINTER(_i32), ctypes.POINTER(_vp), _i32)(
            addrs["uc_reg_read_batch"])
        self._reg_write = ctypes.CFUNCTYPE(_i32, _vp, _i32, _vp)(addrs["uc_reg_write"])
        self._vmem_read = ctypes.CFUNCTYPE(_i32, _vp, _u64, _i32, _vp, ctypes.c_size_t)(addrs["uc_vmem_read"])
        self._hook_add = ctypes.CFUNCTYPE(_i32, _vp, ctypes.POINTER(ctypes.c_size_t), _i32, _vp, _vp, _u64, _u64,
                                          _i32)(addrs["uc_hook_add"])
        self._hook_del = ctypes.CFUNCTYPE(_i32, _vp, ctypes.c_size_t)(addrs["uc_hook_del"])
        self._consts = {k: int(consts[k]) for k in CONST_NAMES}
        self._vals = (ctypes.c_uint64 * 6)()
        self._msr = _Msr(_EFER, 0)
        self._gdtr = _Mmr()
        base = ctypes.addressof(self._vals)
        self._ids = (_i32 * 8)(*[self._consts[n] for n in REG_NAMES])
        self._ptrs = (_vp * 8)(*[base + 8 * i for i in range(6)], ctypes.addressof(self._msr),
                               ctypes.addressof(self._gdtr))
        self._buf = ctypes.create_string_buffer(16)
        self._fallback = fallback_mode
        self._handler = handler
        self._plan: Any = None
        self._hooks: list[int] = []
        self._cbs = (_IN_CB(self._hook_in), _OUT_CB(self._hook_out))
        self._counts: dict[tuple[int, bool], list[int]] = {}
        self._nfast = 0
        self._draining = False
        self._ev = np.zeros(1, dtype=EVENT_DTYPE)
        self._res = np.zeros(1, dtype=RESULT_DTYPE)

    # ------------------------------------------------------------ lifecycle
    def install(self) -> None:
        """Register the IN and OUT hooks with Unicorn (``uc_hook_add``).

        :raises EmbedError: already installed, or Unicorn refused.
        """
        if self._hooks:
            raise already_installed()
        c = self._consts
        for which, cb, insn in (("IN", self._cbs[0], c["insn_in"]), ("OUT", self._cbs[1], c["insn_out"])):
            hh = ctypes.c_size_t(0)
            err = self._hook_add(self._uc, ctypes.byref(hh), c["hook_insn"], ctypes.cast(cb, _vp), None, 1, 0,
                                 insn)
            if err:
                self.remove()
                raise hook_error(which, err)
            self._hooks.append(hh.value)

    def remove(self) -> None:
        """Remove the hooks (``uc_hook_del``); idempotent."""
        for hh in self._hooks:
            self._hook_del(self._uc, hh)
        self._hooks = []
        self.unbind()

    @property
    def installed(self) -> bool:
        """Whether the hooks are registered."""
        return len(self._hooks) == 2

    @property
    def draining(self) -> bool:
        """True while a barrier is pending: the hooks then do nothing."""
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = bool(value)

    @property
    def bound(self) -> bool:
        """Whether a plan is bound (accesses run compiled)."""
        return self._plan is not None

    @property
    def event(self) -> np.ndarray:
        """The one-event :data:`~tdxve.abi.EVENT_DTYPE` array the hooks replay (for ``plan.finish``)."""
        return self._ev

    def bind(self, plan: Any) -> None:
        """Run accesses on ``plan`` (a prepared :mod:`tdxve.replay` plan) until :meth:`unbind`.

        :raises InvalidArgumentError: a malformed plan.
        """
        from . import _replay_py

        self.unbind()
        _replay_py._check_static(plan)
        _replay_py._check_dynamic(plan)
        self._plan = plan

    def rebind(self) -> None:
        """Re-read the plan's device arrays (after Python changed devices).

        :raises InvalidArgumentError: the plan became malformed (unbound then).
        """
        if self._plan is not None:
            from . import _replay_py

            try:
                _replay_py._check_dynamic(self._plan)
            except BaseException:
                self.unbind()
                raise

    def unbind(self) -> None:
        """Stop running accesses compiled (the hooks then call the handler); idempotent."""
        self._plan = None

    def take_counts(self) -> tuple[int, list[tuple[int, bool, int, int]]]:
        """``(accesses, [(port, is_in, ves, tdvmcalls), ...])`` since the last call; resets them."""
        rows = [(p, i, c[0], c[1]) for (p, i), c in self._counts.items()]
        n = self._nfast
        self._counts = {}
        self._nfast = 0
        return n, rows

    # ------------------------------------------------------------ the hooks
    def _hook_in(self, uc: Any, port: int, size: int, ud: Any) -> int:
        return self._access(port, size, 0, 1)

    def _hook_out(self, uc: Any, port: int, size: int, value: int, ud: Any) -> None:
        self._access(port, size, value, 0)

    def _access(self, port: int, size: int, value: int, is_in: int) -> int:
        if self._draining:
            return 0
        try:
            if self._plan is not None:
                v = self._fast(port, size, is_in)
                if v is not None:
                    return v
            return self._call(UF_SLOW, port, size, value, is_in)
        except BaseException as exc:    # noqa: BLE001 - never into ctypes (Unicorn would read garbage)
            self._plan = None
            try:
                self._handler._fast_error(exc)
            except BaseException:       # noqa: BLE001
                pass
            return 0

    def _call(self, op: int, a: int, b: int, c: int, d: int) -> int:
        # As the compiled _uf_call: the handler, then the plan's device arrays again.
        handler = self._handler
        try:
            r = int(handler._fast_callback(op, a, b, c, d))
            self.rebind()
            return r & _U32
        except BaseException as exc:    # noqa: BLE001
            self._plan = None
            try:
                handler._fast_error(exc)
            except BaseException:       # noqa: BLE001
                pass
            return 0

    def _fast(self, port: int, size: int, is_in: int) -> int | None:
        """The access through the replay kernel; None = declined (nothing changed)."""
        from . import _core_py, _replay_py
        from .embed.cpu import cpu_cpl, cpu_mode

        uc = self._uc
        if self._reg_read_batch(uc, self._ids, self._ptrs, 8):
            return None
        rip, rax, rdx, cr0, cs, fl = list(self._vals)
        cr0 &= _U32
        cs &= 0xFFFF
        fl &= _U32
        # Mode and CPL as the Python path derives them (SDM Vol. 3A 5.2.1, 5.5); the
        # compiled class inlines these rules.
        if not cr0 & 1 or fl & (1 << 17):
            return None                 # real / virtual-8086 mode: no #VE
        if cpu_cpl(cr0=cr0, rflags=fl, cs_selector=cs) == 3:
            return None                 # user mode: the Python path raises VeFault
        desc = None
        idx = cs & ~7
        if not cs & 4 and idx != 0 and idx + 7 <= self._gdtr.limit:
            buf = self._buf
            if not self._vmem_read(uc, (self._gdtr.base + idx) & ((1 << 64) - 1), self._consts["prot_read"],
                                   buf, 8):
                desc = int.from_bytes(buf.raw[:8], "little")
        if cpu_mode(cr0=cr0, efer=self._msr.value, rflags=fl, cs_descriptor=desc, fallback=self._fallback) != 64:
            return None                 # 16/32-bit code: the bus, no #VE (ref 2.1)
        buf = self._buf
        if self._vmem_read(uc, rip, self._consts["prot_read"], buf, 15):
            return None                 # near an unmapped page: Python reads byte by byte
        try:
            rec = _core_py.decode_insn(buf.raw[:15], 64)
        except TdxveError:
            return None                 # not an instruction the CPU would execute as I/O
        if rec.kind >= 2:
            return None                 # INS/OUTS (one #VE for all elements) or not I/O
        dport = rec.port if rec.port is not None else rdx & 0xFFFF
        if dport != port or rec.size != size or (rec.kind == 0) != bool(is_in):
            return None                 # Python reports the disagreement
        qual, length, _info = _core_py.exit_info(rec, rdx)
        ev, res = self._ev, self._res
        ev[0] = (qual, rax, 0, length)
        while True:
            nxt = _replay_py.replay_kernel(self._plan, ev, res, 0, 1)
            if nxt != 0 or self._plan is None:
                break
            self._call(UF_FLUSH, 0, 0, 0, 0)    # output or log buffer full: flush, then run it
            if self._plan is None:
                return 0
        r = res[0]
        if nxt < 0:
            self._call(UF_ABORT, 0, 0, 0, 0)
            return 0
        if nxt != 1 or int(r["fault"]) or int(r["rip_delta"]) != length:
            self._call(UF_UNEXPECTED, int(r["fault"]), int(r["rip_delta"]), nxt, 0)
            return 0
        c = self._counts.get((port, bool(is_in)))
        if c is None:
            c = self._counts[(port, bool(is_in))] = [0, 0]
        c[0] += int(r["ves"])
        c[1] += int(r["tdvmcalls"])
        self._nfast += 1
        if not is_in:
            return 0
        merged = int(r["rax"])
        mask = _MASK[size]
        if size == 4 and merged >> 32:
            # Unicorn zero-extends EAX (SDM Vol. 1 3.4.1.1); linux-2022 keeps bits 63:33 (ref 1.4).
            self._call(UF_BARRIER, merged, (rip + length) & ((1 << 64) - 1), 0, 0)
        elif (merged ^ rax) & ~mask:
            # Bits above the width changed (linux-2022's one-bit-too-wide mask, ref 1.4):
            # Unicorn then merges the same low bytes into this RAX.
            self._reg_write(uc, self._consts["rax"], ctypes.byref(ctypes.c_uint64(merged)))
        return merged & mask
