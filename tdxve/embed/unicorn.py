"""tdxve under Unicorn: real x86 code through the TD's #VE path.

:func:`attach` makes every IN/OUT/INS/OUTS that a Unicorn 2.1 x86 instance
executes go through the path a TD takes (references "ref N.M" are sections of
``shared/reference/tdx-port-io.md``): in 64-bit mode the instruction bytes at
RIP are decoded (exit qualification and length exactly as the TDX module
reports them, which Unicorn's hook does not give), the #VE is injected, the
machine's early or normal handler runs, its TDVMCALLs are served by the host
and its devices, and Unicorn's registers end up as the handler left them. In
real mode and 16/32-bit protected mode the access goes straight to the same
host devices (no #VE; counted separately). HLT in 64-bit mode is delivered
as a #VE too. Unicorn alone reads 0 from every port; attached, it talks to a
standard PC's devices.

How Unicorn's traps are handled (anchors 2.1, verified with unicorn 2.1.4):

* **Only the first IN hook is called.** ``attach`` refuses an instance that
  already has an IN hook; IN hooks added after ``attach`` are never called
  while attached (observe accesses through the host's event log instead).
* **Hooks fire once per element of INS/OUTS**, after Unicorn has computed the
  element's address. A TD exits once, before the first element (ref 2.2), so
  the first element's hook runs the whole instruction through the machine
  and pre-sets rSI/rDI/rCX so that Unicorn's own element update lands on the
  handler's final values and ends the REP loop.
* **Hook address ranges are ignored** for IN/OUT hooks, so tdxve's hooks are
  registered unbounded: every port access at every address is routed.
* **A hook returning None raises** inside ctypes; tdxve's IN hook returns an
  int on every path and never lets an exception escape into Unicorn.
* **An IN/OUT hook runs in the middle of the instruction**: Unicorn still
  writes AL/AX/EAX (EAX zero-extends) and moves RIP afterwards, and then runs
  the rest of the translation block. Outcomes Unicorn can reproduce that
  way (OUT; IN whose result a partial/zero-extending write can express) are
  finished in the hook. Anything else -- a guest fault, or the ``linux-2022``
  profile's 32-bit IN that keeps RAX bits 63:33 -- takes a *barrier*: the CPU
  context is saved, write permission is removed from all memory and
  emulation is asked to stop; the rest of the block can then only touch
  registers, which are discarded when the saved context is restored with the
  handler's registers; emulation then resumes (or the fault is raised).
  ``attach`` therefore wraps ``uc.emu_start`` and ``uc.emu_stop`` on the
  instance; :meth:`UnicornAttachment.detach` removes everything again.
* **Only UC_MODE_64 instances expose the 64-bit registers** through
  ``reg_read``. On UC_MODE_16/32 instances (firmware starting in real mode)
  tdxve reads and writes them through a private CPU context whose mode tag
  is set to 64-bit after checking its header.

**The fast path** (``attach(..., fast=True)``, the default, on UC_MODE_64
instances): IN/OUT hooks written in Cython (:class:`tdxve._core.UcFastPath`)
are registered with ``uc_hook_add`` and called by Unicorn directly, without
ctypes or the GIL. In 64-bit kernel mode they run the round trip as one event
of the replay kernel on a plan of the machine bound per ``emu_start``, with
the same results and state as the path above; everything else (other modes,
user mode, INS/OUTS, device errors, outcomes needing a barrier) is handed to
this module's Python path with the plan synced around it.

See ``docs/embedding.md`` for the whole design and its limits.
"""

from __future__ import annotations

import ctypes
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any, NamedTuple

from .._backend import core
from ..abi import U64_MASK, ExitReason
from .._uc_fast_py import UF_ABORT as _UF_ABORT
from .._uc_fast_py import UF_BARRIER as _UF_BARRIER
from .._uc_fast_py import UF_FLUSH as _UF_FLUSH
from .._uc_fast_py import UF_SLOW as _UF_SLOW
from .._uc_fast_py import _Mmr, _Msr
from ..errors import AttachError, EmbedError, GuestFault, TdxveError
from ..regs import GPR_NAMES, Regs
from .cpu import (
    IoStats,
    cpu_cpl,
    cpu_mode,
    fetch_code,
    mode_label,
    usable_code_descriptor,
)

__all__ = ["attach", "detach", "attachment_of", "UnicornAttachment", "UnicornMemory"]

_U32 = 0xFFFFFFFF
_RFLAGS_DF = 1 << 10
_RFLAGS_VM = 1 << 17
_CR0_PE = 1
_EFER_MSR = 0xC0000080
_HLT = 0xF4
_UC_ARCH_X86 = 4
_UC_MODE_16, _UC_MODE_32, _UC_MODE_64 = 2, 4, 8
_FALLBACK_MODE = {_UC_MODE_16: 16, _UC_MODE_32: 32, _UC_MODE_64: 64}
# Registers of a snapshot, in this order: the 16 GPRs (VMCALL numbering),
# then RIP, RFLAGS, FS base, GS base.
_SNAP_NAMES: tuple[str, ...] = GPR_NAMES + ("rip", "rflags", "fs_base", "gs_base")
_RIP, _RFLAGS, _FSB, _GSB = 16, 17, 18, 19
_IDX = {name: i for i, name in enumerate(_SNAP_NAMES)}
_BLANK = Regs()
_TEMPLATES = tuple(Regs(mode=64, cpl=c) for c in range(4))


def _to_regs(snap: Sequence[int], cpl: int) -> Regs:
    """A 64-bit-mode Regs holding the snapshot (unrolled: this runs per event)."""
    r = _TEMPLATES[cpl].copy()
    (r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi,
     r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) = snap[:16]
    r.rip = snap[16]
    r.rflags = snap[17]
    if snap[18]:
        r.fs_base = snap[18]
    if snap[19]:
        r.gs_base = snap[19]
    return r


def _from_regs(r: Regs) -> list[int]:
    """The snapshot order of :data:`_SNAP_NAMES`."""
    return [r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi,
            r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
            r.rip, r.rflags, r.fs_base, r.gs_base]


# ==========================================================================
# Unicorn access (imported lazily: importing tdxve never needs unicorn)
# ==========================================================================
def _import_unicorn() -> tuple[ModuleType, ModuleType, ModuleType]:
    try:
        import unicorn
        from unicorn import x86_const
        from unicorn.unicorn_py3 import unicorn as binding
    except ImportError as exc:
        raise ImportError(
            f"tdxve.embed.unicorn needs Unicorn 2.1 (pip install 'tdxve[unicorn]'): {exc}") from exc
    return unicorn, x86_const, binding


class _Lib:
    """ctypes entry points into libunicorn, with prototypes of our own.

    The binding's ``reg_read`` costs ~2 us per register; one
    ``uc_reg_read_batch`` with prebuilt arrays reads everything a #VE needs
    in one call. ``uc_vmem_read``/``uc_vmem_write`` (translate through the
    guest's paging) exist in the C library since 2.1 but are not wrapped by
    its Python binding.
    """

    _instance: _Lib | None = None

    def __init__(self) -> None:
        unicorn, x86, binding = _import_unicorn()
        lib = binding.uclib
        vp, i32, u64, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t
        pi32, ppv = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_void_p)

        def fn(name: str, *argtypes: Any) -> Any:
            return ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)((name, lib))

        self.reg_read_batch = fn("uc_reg_read_batch", vp, pi32, ppv, i32)
        self.reg_write_batch = fn("uc_reg_write_batch", vp, pi32, ppv, i32)
        self.context_alloc = fn("uc_context_alloc", vp, ctypes.POINTER(vp))
        self.context_free = fn("uc_context_free", vp)
        self.context_save = fn("uc_context_save", vp, vp)
        self.context_restore = fn("uc_context_restore", vp, vp)
        self.context_reg_read_batch = fn("uc_context_reg_read_batch", vp, pi32, ppv, i32)
        self.context_reg_write_batch = fn("uc_context_reg_write_batch", vp, pi32, ppv, i32)
        self.mem_read = fn("uc_mem_read", vp, u64, vp, u64)
        self.mem_write = fn("uc_mem_write", vp, u64, vp, u64)
        self.emu_stop = fn("uc_emu_stop", vp)
        try:
            self.vmem_read: Any = fn("uc_vmem_read", vp, u64, i32, vp, sz)
            self.vmem_write: Any = fn("uc_vmem_write", vp, u64, i32, vp, sz)
        except AttributeError:      # libunicorn < 2.1: physical access only
            self.vmem_read = self.vmem_write = None
        self.unicorn = unicorn
        self.binding = binding
        self.x86 = x86
        self.UcError = unicorn.UcError
        self.UC_PROT_READ = unicorn.UC_PROT_READ
        self.UC_PROT_WRITE = unicorn.UC_PROT_WRITE
        self.UC_QUERY_TIMEOUT = unicorn.unicorn_const.UC_QUERY_TIMEOUT
        self.gpr_ids = [getattr(x86, f"UC_X86_REG_{n.upper()}") for n in GPR_NAMES]
        self.snap_ids = self.gpr_ids + [x86.UC_X86_REG_RIP, x86.UC_X86_REG_RFLAGS,
                                        x86.UC_X86_REG_FS_BASE, x86.UC_X86_REG_GS_BASE]
        try:
            from unicorn.unicorn_py3.arch.intel import HOOK_INSN_IN_CFUNC
            self.in_cfunc: Any = HOOK_INSN_IN_CFUNC
        except ImportError:         # pragma: no cover - other binding layouts
            self.in_cfunc = None

    @classmethod
    def get(cls) -> _Lib:
        if cls._instance is None:
            cls._instance = _Lib()
        return cls._instance


class _Batch:
    """Prebuilt arrays for one ``uc_*_reg_*_batch`` call."""

    __slots__ = ("ids", "ptrs", "count", "values")

    def __init__(self, ids: list[int], extra: Sequence[tuple[int, Any]] = ()) -> None:
        n = len(ids) + len(extra)
        self.values = (ctypes.c_uint64 * len(ids))()
        base = ctypes.addressof(self.values)
        self.ids = (ctypes.c_int * n)(*ids, *(rid for rid, _ in extra))
        self.ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(len(ids))],
                                          *[ctypes.addressof(obj) for _, obj in extra])
        self.count = ctypes.c_int(n)


class UnicornMemory:
    """Guest memory of a Unicorn instance by linear address (a :class:`tdxve.guest.GuestMemory`).

    Reads and writes go through the guest's paging (``uc_vmem_read`` /
    ``uc_vmem_write``); an address that does not translate or is not mapped
    raises :class:`IndexError`, which the guest turns into
    :class:`~tdxve.errors.GuestMemoryFault`.
    """

    __slots__ = ("_h", "_lib", "_buf")

    def __init__(self, uc: Any) -> None:
        self._lib = _Lib.get()
        self._h = uc._uch
        self._buf = ctypes.create_string_buffer(64)

    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes at linear address ``addr``.

        :raises IndexError: not accessible.
        """
        if type(size) is not int or size < 0:
            raise IndexError(f"read size must be a non-negative int, got {size!r}")
        if size == 0:
            return b""
        buf = self._buf if size <= 64 else ctypes.create_string_buffer(size)
        lib = self._lib
        addr &= U64_MASK
        if lib.vmem_read is not None:
            st = lib.vmem_read(self._h, addr, lib.UC_PROT_READ, buf, size)
        else:
            st = lib.mem_read(self._h, addr, buf, size)
        if st:
            raise IndexError(f"{size}-byte read at linear address {addr:#x}: Unicorn error {st}")
        return buf.raw[:size]

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at linear address ``addr``.

        :raises IndexError: not accessible (nothing is written).
        """
        data = bytes(data)
        if not data:
            return
        lib = self._lib
        addr &= U64_MASK
        buf = ctypes.create_string_buffer(data, len(data))
        if lib.vmem_write is not None:
            st = lib.vmem_write(self._h, addr, lib.UC_PROT_WRITE, buf, len(data))
        else:
            st = lib.mem_write(self._h, addr, buf, len(data))
        if st:
            raise IndexError(f"{len(data)}-byte write at linear address {addr:#x}: Unicorn error {st}")


class _Barrier(NamedTuple):
    context: Any          # ctypes handle of the saved (patched) context
    final: dict[str, int]  # registers to write over the saved context
    error: BaseException | None
    perms: list[tuple[int, int, int]]


_ATTACHED: weakref.WeakKeyDictionary[Any, UnicornAttachment] = weakref.WeakKeyDictionary()


def attachment_of(uc: Any) -> UnicornAttachment | None:
    """The :class:`UnicornAttachment` of ``uc``, or None."""
    try:
        return _ATTACHED.get(uc)
    except TypeError:
        return None


def attach(uc: Any, machine: Any, *, path: str | None = None, fast: bool = True) -> UnicornAttachment:
    """Route every port-I/O instruction ``uc`` executes through ``machine``.

    :param uc: a ``unicorn.Uc`` for ``UC_ARCH_X86`` (any of UC_MODE_16/32/64;
        the guest may switch modes itself).
    :param machine: a :class:`tdxve.machine.Machine` (its host serves the
        TDVMCALLs; ``machine.host.bus`` serves non-64-bit accesses).
    :param path: ``"early"`` or ``"normal"`` sets ``machine.path`` (the #VE
        handler the guest runs) for as long as it is attached; None keeps it.
    :returns: the :class:`UnicornAttachment` (also a context manager that
        detaches on exit).
    :raises AttachError: not an x86 Unicorn instance, already attached, an
        IN hook already registered (it would shadow tdxve's), a machine
        without ``execute``/``execute_exit``/``guest.memory`` or already
        attached to another instance, or a bad ``path`` or ``fast``.
    :raises ImportError: unicorn is not installed.

    :param fast: serve IN/OUT in 64-bit kernel mode with compiled hooks that
        Unicorn calls directly (:class:`tdxve._core.UcFastPath`: the #VE
        round trip as one event of the replay kernel, same results and state
        as the Python path). Device objects, the host's counters and event
        log, the TDX module and :attr:`UnicornAttachment.stats` are brought
        up to date whenever tdxve hands an access to Python and when
        ``emu_start`` returns; a hook of your own that runs *during*
        emulation sees them as of the last such point. ``fast=False`` runs
        every access through ``Machine.execute`` (objects current after each
        instruction). See ``docs/embedding.md``, "The fast path".
    """
    lib = _Lib.get()
    if not isinstance(uc, lib.unicorn.Uc):
        raise AttachError(f"attach needs a unicorn.Uc, got {type(uc).__name__}")
    if uc.ctl_get_arch() != _UC_ARCH_X86:
        raise AttachError(f"attach needs an x86 Unicorn instance, got arch {uc.ctl_get_arch()}")
    if attachment_of(uc) is not None:
        raise AttachError("this Unicorn instance is already attached; detach it first")
    if any(att.machine is machine for att in list(_ATTACHED.values())):
        raise AttachError("this machine is attached to another Unicorn instance: its guest's memory "
                          "and #VE state belong to one vCPU; give each instance its own Machine")
    for name in ("execute", "execute_exit"):
        if not callable(getattr(machine, name, None)):
            raise AttachError(f"machine must have {name}() (a tdxve.Machine), got {type(machine).__name__}")
    if not hasattr(getattr(machine, "guest", None), "memory"):
        raise AttachError(f"machine must have guest.memory (a tdxve.Machine), got {type(machine).__name__}")
    if path is not None and path not in ("early", "normal"):
        raise AttachError(f"path must be 'early', 'normal' or None, got {path!r}")
    if type(fast) is not bool:
        raise AttachError(f"fast must be True or False, got {fast!r}")
    callbacks = getattr(uc, "_callbacks", None)
    if lib.in_cfunc is not None and isinstance(callbacks, dict):
        if any(isinstance(cb, lib.in_cfunc) for cb in callbacks.values()):
            raise AttachError(
                "an IN hook is already registered on this Unicorn instance: Unicorn 2.1 calls only "
                "the first IN hook (anchors 2.1), so tdxve's would never run; attach before adding "
                "IN hooks, or observe port accesses through the host's event log")
    return UnicornAttachment(uc, machine, path, fast)


def detach(uc: Any) -> None:
    """Detach tdxve from ``uc`` (see :meth:`UnicornAttachment.detach`).

    :raises AttachError: ``uc`` is not attached.
    """
    att = attachment_of(uc)
    if att is None:
        raise AttachError("this Unicorn instance is not attached")
    att.detach()


class UnicornAttachment:
    """tdxve attached to one Unicorn instance (created by :func:`attach`).

    :ivar uc: the Unicorn instance.
    :ivar machine: the :class:`tdxve.machine.Machine`.
    :ivar stats: :class:`tdxve.embed.IoStats` -- #VEs and TDVMCALLs per port
        and direction, direct (non-64-bit) accesses, HLT #VEs.
    :ivar modes: port accesses per CPU mode label (``"real"``,
        ``"protected-16"``, ``"protected-32"``, ``"compatibility-32"``,
        ``"64-bit"``, ...), in the order the modes were first seen.
    :ivar halted: True once emulation stopped at a HLT.
    :ivar barriers: how many accesses needed a barrier (see the module doc).
    :ivar fast_accesses: IN/OUT the compiled fast path served (the rest of
        the counts in :attr:`stats` went through ``Machine.execute`` or the bus).
    :ivar fast_off: why the last ``emu_start`` ran without the fast path
        (None when it ran with it, or ``fast=False``).
    """

    def __init__(self, uc: Any, machine: Any, path: str | None, fast: bool = True) -> None:
        lib = self._lib = _Lib.get()
        self.uc = uc
        self.machine = machine
        self.stats = IoStats()
        self.modes: dict[str, int] = {}
        self.halted = False
        self.barriers = 0
        self._h = uc._uch
        self._uc_mode = uc.ctl_get_mode()
        self._fallback = _FALLBACK_MODE.get(self._uc_mode, 64)
        self._api64 = self._uc_mode == _UC_MODE_64
        self._memory = UnicornMemory(uc)
        self._barrier: _Barrier | None = None
        self._fast: Any = None
        self._fast_bound = False
        self._plan: Any = None
        self.fast_accesses = 0
        self.fast_off: str | None = None
        self._draining = False
        self._user_stop = False
        self._attached = True
        self._mode_cache: dict[tuple[int, int, int, int | None], tuple[int, str]] = {}
        x86 = lib.x86
        # One batch for everything a #VE needs: the snapshot registers (64-bit
        # ids, UC_MODE_64 only), then CR0, CS, EFLAGS, EIP, EFER, GDTR.
        self._msr = _Msr(_EFER_MSR, 0)
        self._gdtr = _Mmr()
        mode_ids = [x86.UC_X86_REG_CR0, x86.UC_X86_REG_CS, x86.UC_X86_REG_EFLAGS, x86.UC_X86_REG_EIP]
        extra = [(x86.UC_X86_REG_MSR, self._msr), (x86.UC_X86_REG_GDTR, self._gdtr)]
        if self._api64:
            self._read = _Batch(lib.snap_ids + mode_ids, extra)
            self._mode_off = len(lib.snap_ids)
        else:
            self._read = _Batch(mode_ids, extra)
            self._mode_off = 0
        self._ctx_snap = self._new_context()      # 64-bit registers on non-64 instances
        self._ctx_barrier = self._new_context()
        self._ctx_read = _Batch(lib.snap_ids)
        # Take over the machine: its guest's string I/O uses Unicorn memory.
        guest = machine.guest
        self._saved_memory = (guest.memory, getattr(machine, "memory", None))
        guest.memory = self._memory
        if hasattr(machine, "memory"):
            machine.memory = self._memory
        self._saved_path = getattr(machine, "path", None)
        if path is not None:
            machine.path = path
        self._orig_emu_start = type(uc).emu_start
        self._orig_emu_stop = type(uc).emu_stop
        self._hooks: list[int] = []
        if fast and self._api64 and lib.vmem_read is not None:
            self._fast = self._new_fast_path()
            self._fast.install()
        else:
            if fast:
                self.fast_off = ("the fast path needs a UC_MODE_64 instance" if not self._api64
                                 else "the fast path needs uc_vmem_read (libunicorn 2.1)")
            self._hooks = [
                uc.hook_add(lib.unicorn.UC_HOOK_INSN, self._make_in_hook(), None, 1, 0, x86.UC_X86_INS_IN),
                uc.hook_add(lib.unicorn.UC_HOOK_INSN, self._make_out_hook(), None, 1, 0, x86.UC_X86_INS_OUT),
            ]
        uc.emu_start = self._emu_start
        uc.emu_stop = self._emu_stop
        _ATTACHED[uc] = self

    # ------------------------------------------------------------ lifecycle
    @property
    def path(self) -> str | None:
        """The machine's #VE path (``"early"`` or ``"normal"``)."""
        p = getattr(self.machine, "path", None)
        return p if isinstance(p, str) else None

    @property
    def attached(self) -> bool:
        """False after :meth:`detach`."""
        return self._attached

    def detach(self) -> None:
        """Remove the hooks and the ``emu_start``/``emu_stop`` wrappers from
        the Unicorn instance and give the machine back its memory and path.

        Idempotent.

        :raises AttachError: called from inside a hook while a barrier is pending.
        """
        if not self._attached:
            return
        if self._barrier is not None:
            raise AttachError("cannot detach while a port-I/O barrier is pending (inside emulation)")
        uc = self.uc
        for h in self._hooks:
            uc.hook_del(h)
        self._hooks = []
        if self._fast is not None:
            self._fast_end()        # detached from a hook of the user's during emulation: sync first
            self._fast.remove()
            self._fast = None
        for name in ("emu_start", "emu_stop"):
            if name in vars(uc):
                delattr(uc, name)
        guest = self.machine.guest
        guest.memory = self._saved_memory[0]
        if self._saved_memory[1] is not None:
            self.machine.memory = self._saved_memory[1]
        if self._saved_path is not None and getattr(self.machine, "path", None) != self._saved_path:
            self.machine.path = self._saved_path
        for ctx in (self._ctx_snap, self._ctx_barrier):
            if ctx is not None:
                self._lib.context_free(ctx)
        self._ctx_snap = self._ctx_barrier = None
        self._attached = False
        _ATTACHED.pop(uc, None)

    def __enter__(self) -> UnicornAttachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return f"<UnicornAttachment {state} path={self.path!r} {self.stats!r}>"

    def registers(self) -> dict[str, int]:
        """The 16 GPRs, RIP, RFLAGS and the FS/GS bases as 64-bit values.

        Works on every instance, also UC_MODE_16/32 ones whose ``reg_read``
        refuses the 64-bit registers. Call it while emulation is stopped.

        :raises AttachError: after :meth:`detach`.
        """
        if not self._attached:
            raise AttachError("registers() needs an attached instance; this one was detached")
        self._read_all()
        return dict(zip(_SNAP_NAMES, self._snapshot64()))

    @property
    def fast(self) -> bool:
        """Whether the compiled fast-path hooks are installed (``attach(..., fast=True)``
        on a UC_MODE_64 instance)."""
        return self._fast is not None

    @property
    def _draining(self) -> bool:
        return self._drain

    @_draining.setter
    def _draining(self, value: bool) -> None:
        # A pending barrier silences both the Python hooks and the compiled ones.
        self._drain = value
        if self._fast is not None:
            self._fast.draining = value

    # ------------------------------------------------------------ the fast path
    def _new_fast_path(self) -> Any:
        lib = self._lib
        x86 = lib.x86
        uclib = lib.binding.uclib
        api = {name: ctypes.cast(getattr(uclib, name), ctypes.c_void_p).value
               for name in ("uc_reg_read_batch", "uc_reg_write", "uc_vmem_read", "uc_hook_add", "uc_hook_del")}
        consts = {"rip": x86.UC_X86_REG_RIP, "rax": x86.UC_X86_REG_RAX, "rdx": x86.UC_X86_REG_RDX,
                  "cr0": x86.UC_X86_REG_CR0, "cs": x86.UC_X86_REG_CS, "eflags": x86.UC_X86_REG_EFLAGS,
                  "msr": x86.UC_X86_REG_MSR, "gdtr": x86.UC_X86_REG_GDTR,
                  "hook_insn": lib.unicorn.UC_HOOK_INSN, "insn_in": x86.UC_X86_INS_IN,
                  "insn_out": x86.UC_X86_INS_OUT, "prot_read": lib.UC_PROT_READ}
        return core.UcFastPath(self._h.value, api, consts, self, fallback_mode=self._fallback)

    def _fast_begin(self) -> None:
        """Bind the machine as a replay plan for one ``uc_emu_start`` (or say why not)."""
        if self._fast is None:
            return
        from ..replay import _Plan
        from .._replay_py import CFG_ADVANCE, CFG_EARLY, CFG_HOST, HOST_COMPILED

        from ..machine import Machine

        if not isinstance(self.machine, Machine):
            self.fast_off = f"the machine is a {type(self.machine).__name__}, not a tdxve Machine"
            return
        plan = self._plan
        try:
            if plan is None:
                plan = self._plan = _Plan(self.machine, "machine")
            plan.prepare(embedded=True)
        except TdxveError as exc:
            self.fast_off = f"the replay kernel cannot run this machine: {exc}"
            return
        cfg = plan.cfg
        if cfg[CFG_HOST] != HOST_COMPILED:
            why = "the host is not a plain tdxve Host with a PortBus (every TDVMCALL would call Python)"
        elif cfg[CFG_EARLY] and not cfg[CFG_ADVANCE]:
            why = "this profile's early handler does not advance RIP (a #VE loop is a fault)"
        elif getattr(plan.bus, "on_device_error", None) != "raise":
            why = "the bus records device errors as failed I/O (a guest fault)"
        else:
            why = None
        if why is not None:
            plan.release()
            self.fast_off = why
            return
        self._fast.bind(plan)
        self._fast_bound = True
        self.fast_off = None

    def _fast_sync(self, *, force: bool = False) -> None:
        """The fast path's counts and the plan's state into the Python objects."""
        if not self._fast_bound:
            return
        n, rows = self._fast.take_counts()
        if n:
            self.fast_accesses += n
            self.modes["64-bit"] = self.modes.get("64-bit", 0) + n
            add = self.stats.add_ve
            for port, is_in, ves, calls in rows:
                add(port, is_in, calls, ves)
        if n or force:
            self._plan.finish(self._fast.event)

    def _fast_end(self) -> None:
        if not self._fast_bound:
            return
        try:
            self._fast_sync()
        finally:
            self._fast.unbind()
            self._fast_bound = False
            self._plan.release()

    def _fast_callback(self, op: int, a: int, b: int, c: int, d: int) -> int:
        """What the compiled hooks hand to Python (``tdxve._uc_fast_py`` UF_*); never raises."""
        try:
            if op == _UF_SLOW:
                return self._fast_slow(a, b, c, bool(d))
            if op == _UF_FLUSH:
                self._plan.store()
                return 0
            if op == _UF_ABORT:
                # A device raised (the bus's "raise" policy): as on the Python path,
                # the access counts for its mode, then emulation stops and it is raised.
                self.modes["64-bit"] = self.modes.get("64-bit", 0) + 1
                exc = self._plan.pending
                self._plan.pending = None
                self._fast_sync(force=True)
                self._fail(exc if exc is not None else EmbedError("the replay kernel stopped without an error"))
                return 0
            if op == _UF_BARRIER:
                self._start_barrier({"rax": a, "rip": b}, None, None)
                return 0
            self._fail(EmbedError(
                f"the compiled fast path produced an outcome it never commits (fault {a}, RIP + {b}, "
                f"kernel returned {c}); please report this"))
            return 0
        except BaseException as exc:    # noqa: BLE001 - never into Unicorn
            self._fail(exc)
            return 0

    def _fast_error(self, exc: BaseException) -> None:
        self._fail(exc)

    def _fast_slow(self, port: int, size: int, value: int, is_in: bool) -> int:
        # Declined by the fast path (other modes, user mode, INS/OUTS, ...): the
        # Python path, with the plan synced around it.
        if self._draining:
            return 0
        bound = self._fast_bound
        if bound:
            self._fast_sync()
        try:
            return self._io(port, size, value, is_in)
        except BaseException as exc:    # noqa: BLE001 - raised from emu_start
            self._fail(exc)
            return 0
        finally:
            if bound and self._fast_bound:
                self._plan.load()

    # ------------------------------------------------------------ contexts
    def _new_context(self) -> Any:
        """A CPU context whose mode tag says 64-bit, so that the context
        register API reaches RAX..R15 and RIP whatever mode the instance was
        created in. The tag is only changed after the header was recognised
        (unicorn 2.1 ``struct uc_context``: size_t size, uc_mode, uc_arch)."""
        lib = self._lib
        ctx = ctypes.c_void_p()
        if lib.context_alloc(self._h, ctypes.byref(ctx)) or not ctx.value:
            raise AttachError("uc_context_alloc failed")
        tag = (ctypes.c_uint32 * 2).from_address(ctx.value + ctypes.sizeof(ctypes.c_size_t))
        if tag[0] == _UC_MODE_64 and tag[1] == _UC_ARCH_X86:
            return ctx
        if tag[0] == self._uc_mode and tag[1] == _UC_ARCH_X86:
            tag[0] = _UC_MODE_64
            return ctx
        lib.context_free(ctx)
        return None

    # ------------------------------------------------------------ state
    def _mode_state(self) -> tuple[int, int, int, int, int, int, int]:
        """CR0, CS, EFLAGS, EIP, EFER, GDTR base, GDTR limit (after ``_read_all``)."""
        v, o = self._read.values, self._mode_off
        return (v[o] & _U32, v[o + 1] & 0xFFFF, v[o + 2] & _U32, v[o + 3] & _U32,
                self._msr.value, self._gdtr.base, self._gdtr.limit)

    def _read_all(self) -> None:
        lib = self._lib
        r = self._read
        if lib.reg_read_batch(self._h, r.ids, r.ptrs, r.count):
            raise EmbedError("uc_reg_read_batch failed")

    def _cs_descriptor(self, cr0: int, rflags: int, cs: int, gbase: int, glimit: int) -> int | None:
        if not cr0 & _CR0_PE or rflags & _RFLAGS_VM:
            return None
        index = cs & ~7
        if cs & 4 or index == 0 or index + 7 > glimit:
            return None             # LDT selectors and synthetic states: fall back
        try:
            desc = int.from_bytes(self._memory.read((gbase + index) & U64_MASK, 8), "little")
        except IndexError:
            return None
        return desc if usable_code_descriptor(desc) else None

    def _mode(self) -> tuple[int, int, str, int, int, int]:
        """(mode, cpl, label, cr0, cs, rflags) from the last ``_read_all``."""
        cr0, cs, eflags, _eip, efer, gbase, glimit = self._mode_state()
        rflags = self._read.values[_RFLAGS] if self._api64 else eflags
        desc = self._cs_descriptor(cr0, rflags, cs, gbase, glimit)
        key = (cr0 & _CR0_PE, efer & (1 << 10), rflags & _RFLAGS_VM, desc)
        hit = self._mode_cache.get(key)
        if hit is None:
            hit = self._mode_cache[key] = (
                cpu_mode(cr0=cr0, efer=efer, rflags=rflags, cs_descriptor=desc, fallback=self._fallback),
                mode_label(cr0=cr0, efer=efer, rflags=rflags, cs_descriptor=desc, fallback=self._fallback))
        return hit[0], cpu_cpl(cr0=cr0, rflags=rflags, cs_selector=cs), hit[1], cr0, cs, rflags

    def _snapshot64(self) -> list[int]:
        """The 20 snapshot registers with 64-bit values (after ``_read_all``)."""
        if self._api64:
            return list(self._read.values[:20])
        lib = self._lib
        ctx = self._ctx_snap
        if ctx is None:
            raise EmbedError(
                "the guest does port I/O in 64-bit mode, but this Unicorn instance was created with "
                "UC_MODE_16/32, whose API does not expose RAX..R15, and its CPU context could not be "
                "retagged; create the Unicorn instance with UC_MODE_64")
        if lib.context_save(self._h, ctx):
            raise EmbedError("uc_context_save failed")
        r = self._ctx_read
        if lib.context_reg_read_batch(ctx, r.ids, r.ptrs, r.count):
            raise EmbedError("uc_context_reg_read_batch failed")
        return list(r.values)

    def _write_regs(self, values: dict[str, int]) -> None:
        """Write registers while inside a hook (never RIP)."""
        if not values:
            return
        lib = self._lib
        n = len(values)
        ids = (ctypes.c_int * n)(*[lib.snap_ids[_IDX[k]] for k in values])
        vals = (ctypes.c_uint64 * n)(*values.values())
        base = ctypes.addressof(vals)
        ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
        if self._api64:
            if lib.reg_write_batch(self._h, ids, ptrs, n):
                raise EmbedError("uc_reg_write_batch failed")
            return
        ctx = self._ctx_snap     # saved by _snapshot64 in this same hook
        if lib.context_reg_write_batch(ctx, ids, ptrs, n) or lib.context_restore(self._h, ctx):
            raise EmbedError("writing registers through the CPU context failed")

    # ------------------------------------------------------------ hooks
    def _make_in_hook(self) -> Any:
        def hook_in(uc: Any, port: int, size: int, user_data: Any) -> int:
            if self._draining:
                return 0
            try:
                return self._io(port, size, 0, True)
            except BaseException as exc:    # never into ctypes: Unicorn would read None
                self._fail(exc)
                return 0
        return hook_in

    def _make_out_hook(self) -> Any:
        def hook_out(uc: Any, port: int, size: int, value: int, user_data: Any) -> None:
            if self._draining:
                return
            try:
                self._io(port, size, value, False)
            except BaseException as exc:
                self._fail(exc)
        return hook_out

    def _io(self, port: int, size: int, value: int, is_in: bool) -> int:
        self._read_all()
        mode, cpl, label, cr0, cs, rflags = self._mode()
        modes = self.modes
        modes[label] = modes.get(label, 0) + 1
        if mode != 64:
            # No #VE outside 64-bit mode (TDCALL needs it, ref 2.1): the
            # access goes straight to the host's devices; Unicorn performs the
            # instruction (and each element of INS/OUTS) itself.
            bus = self._bus()
            self.stats.add_direct(port, is_in)
            if is_in:
                return int(bus.read(port, size)) & ((1 << (8 * size)) - 1)
            bus.write(port, size, value)
            return 0
        snap = self._snapshot64()
        rip = snap[_RIP]
        code = fetch_code(self._memory.read, rip)
        insn = core.decode_insn(code, 64)
        dport = insn.port if insn.port is not None else snap[2] & 0xFFFF
        if dport != port or insn.size != size or insn.is_in != is_in:
            raise EmbedError(
                f"Unicorn and tdxve disagree about the instruction at {rip:#x} "
                f"({code[:insn.length].hex(' ')}): Unicorn {'IN' if is_in else 'OUT'} port {port:#x} "
                f"size {size}, decoded port {dport:#x} size {insn.size}")
        regs = _to_regs(snap, cpl)
        c0 = self._counters()
        try:
            out = self.machine.execute(regs, code)
        except GuestFault as fault:
            ves, calls = self._since(c0, 1, 0)
            self.stats.add_ve(port, is_in, calls, ves)
            fregs = fault.regs if isinstance(fault.regs, Regs) else None
            final = _diff(snap, fregs) if fregs is not None else {}
            self._start_barrier(final, fault, snap)
            return 0
        self.stats.add_ve(port, is_in, out.tdvmcalls, out.ve_count)
        after = _from_regs(regs)
        ret = self._realize(insn, snap, after, is_in, size)
        if ret is None:
            self._start_barrier(_diff(snap, regs), None, snap)
            return int(after[0]) & ((1 << (8 * size)) - 1) if is_in else 0
        return ret

    def _realize(self, insn: Any, snap: list[int], after: list[int], is_in: bool,
                 size: int) -> int | None:
        """Finish the instruction inside the hook if Unicorn's own completion
        can reproduce the handler's registers; None means a barrier is needed."""
        rip = snap[_RIP]
        if after[_RIP] != (rip + insn.length) & U64_MASK or after[17:] != snap[17:]:
            return None             # not retired normally (fixup, loop ...)
        mask = (1 << (8 * size)) - 1
        if not insn.is_string:
            if after[1:16] != snap[1:16]:
                return None
            if not is_in:
                return 0 if after[0] == snap[0] else None
            rax = after[0]
            if size == 4:
                # Unicorn zero-extends EAX (SDM Vol. 1 3.4.1.1); a profile that
                # keeps bits 63:32 (linux-2022) needs a barrier.
                return rax if rax >> 32 == 0 else None
            if rax != snap[0]:
                self._write_regs({"rax": rax})     # Unicorn then merges the same low bytes
            return rax & mask
        changed = {i for i in range(16) if after[i] != snap[i]}
        # INS/OUTS: one #VE for the whole instruction (ref 2.2). Unicorn
        # still finishes the element it is in: pointer += +/-size and, with
        # REP, rCX -= 1 at the address size, then tests rCX for another
        # element. Pre-set both so that its update lands on the handler's
        # final values and the loop ends.
        ptr = 7 if is_in else 6
        allowed = {ptr, 1} if insn.rep else {ptr}
        if changed - allowed:
            return None
        abits = insn.addr_size
        amask = (1 << abits) - 1
        final_ptr, final_rcx = after[ptr], after[1]
        if final_ptr & ~amask & U64_MASK and abits != 64:
            return None
        step = -size if snap[_RFLAGS] & _RFLAGS_DF else size
        pre = {_SNAP_NAMES[ptr]: (final_ptr - step) & U64_MASK}
        if abits == 16 and final_ptr >> 16 != snap[ptr] >> 16:
            return None
        if insn.rep:
            if final_rcx & amask:
                return None         # Unicorn would run another element
            if abits != 64 and final_rcx >> abits != (snap[1] >> abits if abits == 16 else 0):
                return None
            pre["rcx"] = (final_rcx & ~amask & U64_MASK) | 1
        self._write_regs(pre)
        if not is_in:
            return 0
        # Unicorn stores the returned value at the address it computed from
        # the original rDI (ES base 0 in 64-bit mode): give it the value the
        # handler already wrote there.
        first = snap[7] & amask
        try:
            return int.from_bytes(self._memory.read(first, size), "little") & mask
        except IndexError:
            return 0

    def _counters(self) -> tuple[int, int] | None:
        # The TDX module's own counters (tdxve.tdx.TdxModule): #VEs injected
        # and VMCALLs that reached the host. A fault carries no Outcome, so
        # its counts come from these.
        tdx = getattr(self.machine, "tdx", None)
        ves, calls = getattr(tdx, "ve_injected", None), getattr(tdx, "vmcalls", None)
        return (ves, calls) if isinstance(ves, int) and isinstance(calls, int) else None

    def _since(self, c0: tuple[int, int] | None, ves: int, calls: int) -> tuple[int, int]:
        c1 = self._counters()
        if c0 is None or c1 is None:
            return ves, calls
        return c1[0] - c0[0], c1[1] - c0[1]

    def _bus(self) -> Any:
        bus = getattr(getattr(self.machine, "host", None), "bus", None)
        if bus is None or not callable(getattr(bus, "read", None)) or not callable(getattr(bus, "write", None)):
            raise EmbedError(
                f"port I/O outside 64-bit mode goes straight to the host's devices, but "
                f"{type(getattr(self.machine, 'host', None)).__name__} has no bus with read/write")
        return bus

    # ------------------------------------------------------------ barriers
    def _start_barrier(self, final: dict[str, int], error: BaseException | None,
                       snap: list[int] | None) -> None:
        if self._barrier is not None:
            return                  # already draining (second event in the same block)
        lib = self._lib
        ctx = self._ctx_barrier
        if ctx is None or lib.context_save(self._h, ctx):
            # Without a context we cannot rewind: stop and report (best effort).
            err = error if error is not None else EmbedError(
                "cannot save the CPU context for a port-I/O barrier")
            self._barrier = _Barrier(None, {}, err, [])
            self._draining = True
            lib.emu_stop(self._h)
            return
        perms: list[tuple[int, int, int]] = []
        prot_w = lib.UC_PROT_WRITE
        for begin, end, p in self.uc.mem_regions():
            if p & prot_w:
                try:
                    self.uc.mem_protect(begin, end - begin + 1, p & ~prot_w)
                except lib.UcError:
                    continue        # e.g. MMIO regions
                perms.append((begin, end - begin + 1, p))
        self._barrier = _Barrier(ctx, final, error, perms)
        self._draining = True
        self.barriers += 1
        lib.emu_stop(self._h)

    def _fail(self, exc: BaseException) -> None:
        # Anything raised inside the hook stops emulation with the CPU as it
        # was before the instruction, and is raised from emu_start.
        if self._barrier is None:
            self._start_barrier({}, exc, None)

    def _finish_barrier(self, b: _Barrier) -> None:
        lib = self._lib
        for begin, size, p in b.perms:
            try:
                self.uc.mem_protect(begin, size, p)
            except lib.UcError:
                pass
        if b.context is None:
            return
        final = {k: v for k, v in b.final.items() if k != "rflags"}
        if final:
            n = len(final)
            ids = (ctypes.c_int * n)(*[lib.snap_ids[_IDX[k]] for k in final])
            vals = (ctypes.c_uint64 * n)(*final.values())
            base = ctypes.addressof(vals)
            ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
            if lib.context_reg_write_batch(b.context, ids, ptrs, n):
                raise EmbedError("cannot write the handler's registers into the saved context")
        if lib.context_restore(self._h, b.context):
            raise EmbedError("uc_context_restore failed after a port-I/O barrier")
        # A context saved inside a hook holds QEMU's in-execution EFLAGS: DF
        # and the arithmetic flags live in env->df and the lazy cc_* fields,
        # not in env->eflags, and the next uc_emu_start rebuilds them from
        # env->eflags. Read the flags (computed from those fields) and write
        # them back so they survive.
        x86 = lib.x86
        flags = b.final.get("rflags", self.uc.reg_read(x86.UC_X86_REG_EFLAGS)) & _U32
        self.uc.reg_write(x86.UC_X86_REG_EFLAGS, flags)

    # ------------------------------------------------------------ run loop
    def _emu_stop(self) -> None:
        self._user_stop = True
        self._orig_emu_stop(self.uc)

    def _emu_start(self, begin: int, until: int, timeout: int = 0, count: int = 0) -> None:
        lib = self._lib
        uc = self.uc
        saved_stop, self._user_stop = self._user_stop, False
        t0 = time.monotonic()
        left = timeout
        try:
            while True:
                err: BaseException | None = None
                try:
                    self._fast_begin()
                    try:
                        self._orig_emu_start(uc, begin, until, left, count)
                    finally:
                        self._fast_end()
                except BaseException as exc:
                    err = exc
                b = self._barrier
                if b is not None:
                    self._barrier = None
                    self._draining = False
                    self._finish_barrier(b)
                    if b.error is not None:
                        raise b.error
                    if err is not None and not isinstance(err, lib.UcError):
                        raise err           # a user hook raised while draining
                    if self._user_stop or count:
                        return              # count cannot be continued exactly: stop here
                    if timeout:
                        left = timeout - int((time.monotonic() - t0) * 1e6)
                        if left <= 0:
                            return
                    begin = self._resume_address()
                    continue
                if err is not None:
                    raise err
                if not (count or self._user_stop or (timeout and uc.query(lib.UC_QUERY_TIMEOUT))):
                    self._after_stop(until)
                return
        finally:
            self._user_stop = saved_stop

    def _resume_address(self) -> int:
        self._read_all()
        cr0, cs, _ef, eip, _efer, _gb, _gl = self._mode_state()
        if self._api64:
            return int(self._read.values[_RIP])
        rip = self._snapshot64()[_RIP]
        # Unicorn's x86_set_pc on UC_MODE_16 instances sets EIP = begin - CS*16
        # whatever the CPU mode is.
        return (rip + (cs << 4)) & U64_MASK if self._uc_mode == _UC_MODE_16 else rip

    def _after_stop(self, until: int) -> None:
        """Emulation stopped on its own: deliver a HLT it stopped at.

        Unicorn stops after executing HLT (RIP past it); in 64-bit mode a TD's
        HLT is a #VE (exit reason 12, ref 1.9) that goes through the machine."""
        self._read_all()
        mode, cpl, _label, cr0, cs, rflags = self._mode()
        if mode == 64:
            snap = self._snapshot64()
            rip = snap[_RIP]
            linear = rip
        else:
            snap = []
            eip = self._mode_state()[3]
            rip = eip
            linear = (self._cs_base(cr0, cs, rflags) + (eip & (0xFFFF if mode == 16 else _U32))) & _U32
        if linear == until & U64_MASK:
            return
        try:
            if self._memory.read((linear - 1) & U64_MASK, 1)[0] != _HLT:
                return
        except IndexError:
            return
        self.halted = True
        if mode != 64:
            return                  # firmware HLT: no #VE outside 64-bit mode
        regs = _to_regs(snap, cpl)
        regs.rip = (rip - 1) & U64_MASK         # the #VE is taken at the HLT
        c0 = self._counters()
        try:
            out = self.machine.execute_exit(regs, ExitReason.HLT, instr_len=1)
        except GuestFault as fault:
            ves, calls = self._since(c0, 1, 0)
            self.stats.add_exit(int(ExitReason.HLT), calls, ves)
            if isinstance(fault.regs, Regs):
                self._write_after_stop(snap, fault.regs)
            raise
        self.stats.add_exit(int(ExitReason.HLT), out.tdvmcalls, out.ve_count)
        self._write_after_stop(snap, regs)

    def _cs_base(self, cr0: int, cs: int, rflags: int) -> int:
        if not cr0 & _CR0_PE or rflags & _RFLAGS_VM:
            return (cs << 4) & 0xFFFFF
        _c, _s, _e, _i, _f, gbase, glimit = self._mode_state()
        desc = self._cs_descriptor(cr0, rflags, cs, gbase, glimit)
        if desc is None:
            return 0
        return ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)

    def _write_after_stop(self, snap: list[int], regs: Regs) -> None:
        final = _diff(snap, regs)
        if not final:
            return
        lib = self._lib
        ctx = self._ctx_barrier
        if ctx is None or lib.context_save(self._h, ctx):
            raise EmbedError("uc_context_save failed")
        b = _Barrier(ctx, final, None, [])
        self._finish_barrier(b)


def _diff(snap: Sequence[int], regs: Regs) -> dict[str, int]:
    return {name: v for name, v, old in zip(_SNAP_NAMES, _from_regs(regs), snap) if v != old}


@contextmanager
def attached(uc: Any, machine: Any, *, path: str | None = None) -> Iterator[UnicornAttachment]:
    """``with attached(uc, machine) as att: ...`` -- :func:`attach`, then detach on exit."""
    att = attach(uc, machine, path=path)
    try:
        yield att
    finally:
        att.detach()


__all__ += ["attached"]
