# Unicorn fast path (issue 5), include'd at the end of _core.pyx after _replay.pxi.
#
# tdxve.embed.unicorn registers _uf_hook_in/_uf_hook_out with Unicorn's C API
# (uc_hook_add, UC_HOOK_INSN), so Unicorn calls them directly -- no ctypes
# callback, no GIL. For an IN/OUT in 64-bit kernel mode each call reads the
# registers it needs (one uc_reg_read_batch), derives the mode exactly as
# tdxve.embed.unicorn does (CR0.PE, RFLAGS.VM, the CS descriptor's L bit with
# EFER.LMA, the instance's fallback mode), fetches the bytes at RIP, decodes
# them (decode_at / insn_exit_info: the qualification and length the TDX module
# reports), and runs the #VE round trip as ONE event of the replay kernel
# (_rp_run) on a plan bound for the whole uc_emu_start -- the same steps
# Machine.execute takes, differential-tested in tests/test_replay_diff.py.
# Everything else is *declined* before any state changes and goes to the
# Python path (handler._fast_callback(UF_SLOW, ...)): other modes, user mode,
# INS/OUTS, bytes that do not decode or disagree with Unicorn. After state
# changed, the rare outcomes Unicorn cannot finish in the hook (a device that
# raised; linux-2022's 32-bit IN keeping RAX bits 63:33) are handed to Python
# as well, which stops emulation with a barrier. The readable twin is
# tdxve/_uc_fast_py.py; "ref N.M" are sections of shared/reference/tdx-port-io.md.

from libc.stdlib cimport calloc

cdef extern from *:
    """
    typedef int (*tdxve_uc_reg_read_batch_t)(void *, int *, void **, int);
    typedef int (*tdxve_uc_reg_write_t)(void *, int, const void *);
    typedef int (*tdxve_uc_vmem_read_t)(void *, uint64_t, int, void *, size_t);
    typedef int (*tdxve_uc_hook_add_t)(void *, size_t *, int, void *, void *, uint64_t, uint64_t, ...);
    typedef int (*tdxve_uc_hook_del_t)(void *, size_t);
    /* uc_hook_add(uc, &hh, UC_HOOK_INSN, cb, ud, begin, end, insn): variadic in C. */
    static int tdxve_uc_hook_insn(void *f, void *uc, size_t *hh, int type, void *cb, void *ud, int insn) {
        return ((tdxve_uc_hook_add_t)f)(uc, hh, type, cb, ud, (uint64_t)1, (uint64_t)0, insn);
    }
    static int tdxve_uc_hook_del(void *f, void *uc, size_t hh) {
        return ((tdxve_uc_hook_del_t)f)(uc, hh);
    }
    """
    ctypedef int (*tdxve_uc_reg_read_batch_t)(void*, int*, void**, int) noexcept nogil
    ctypedef int (*tdxve_uc_reg_write_t)(void*, int, const void*) noexcept nogil
    ctypedef int (*tdxve_uc_vmem_read_t)(void*, uint64_t, int, void*, size_t) noexcept nogil
    int tdxve_uc_hook_insn(void* f, void* uc, size_t* hh, int type, void* cb, void* ud, int insn) nogil
    int tdxve_uc_hook_del(void* f, void* uc, size_t hh) nogil

from . import _uc_fast_py as _UF

cdef enum:
    UF_SLOW = 1         # (port, size, value, is_in): the Python path serves this access
    UF_FLUSH = 2        # the kernel's output/log buffer is full: plan.store()
    UF_ABORT = 3        # a callback failed (device error): sync, stop, raise plan.pending
    UF_BARRIER = 4      # (rax, rip): registers Unicorn cannot produce from the hook
    UF_UNEXPECTED = 5   # (fault, rip_delta): an outcome the fast path never commits
    UF_NREGS = 8        # RIP RAX RDX CR0 CS EFLAGS, IA32_EFER (uc_x86_msr), GDTR (uc_x86_mmr)

# unicorn/x86.h
ctypedef struct uf_msr:
    uint32_t rid
    uint64_t value

ctypedef struct uf_mmr:
    uint16_t selector
    uint64_t base
    uint32_t limit
    uint32_t flags

ctypedef struct uf_state:
    void* uc
    tdxve_uc_reg_read_batch_t reg_read_batch
    tdxve_uc_reg_write_t reg_write
    tdxve_uc_vmem_read_t vmem_read
    int ids[UF_NREGS]
    void* ptrs[UF_NREGS]
    uint64_t vals[6]
    uf_msr msr
    uf_mmr gdtr
    int rid_rax
    int prot_read
    bint fallback64             # protected mode without a usable CS descriptor decodes as 64-bit
    bint bound
    bint draining
    rp_ctx c
    rp_event* ev
    rp_result* res
    uint64_t* counts            # [0x20000][2]: #VEs, TDVMCALLs per (port << 1 | is_in)
    uint32_t* touched           # keys whose counts became non-zero
    uint64_t ntouched
    uint64_t nfast              # accesses committed since the last take_counts()
    PyObject* handler           # borrowed: UcFastPath keeps it


cdef uint64_t _uf_call_gil(uf_state* s, int op, uint64_t a, uint64_t b, uint64_t d3,
                           uint64_t d4) noexcept:
    # handler._fast_callback never raises by contract; anything that escapes
    # (or a plan the callback broke) stops emulation through handler._fast_error.
    handler = <object>s.handler
    try:
        r = handler._fast_callback(op, a, b, d3, d4)
        if s.bound:
            _rp_bind_dynamic(&s.c, <object>s.c.plan)
        return <uint64_t>(r & 0xFFFFFFFF)
    except BaseException as exc:
        s.bound = False
        try:
            handler._fast_error(exc)
        except BaseException:
            pass
        return 0


cdef inline uint64_t _uf_call(uf_state* s, int op, uint64_t a, uint64_t b, uint64_t d3,
                              uint64_t d4) noexcept nogil:
    cdef uint64_t r
    with gil:
        r = _uf_call_gil(s, op, a, b, d3, d4)
    return r


cdef inline uint64_t _uf_le64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v |= (<uint64_t>p[i]) << (8 * i)
    return v


@cython.boundscheck(TDXVE_DEBUG)
@cython.wraparound(TDXVE_DEBUG)
cdef int _uf_fast(uf_state* s, uint32_t port, int size, int is_in, uint64_t* out) noexcept nogil:
    # 0: done, *out = what the IN hook returns; 1: declined, nothing changed.
    cdef uint8_t code[16]
    cdef uint8_t raw[8]
    cdef insn_rec rec
    cdef info_rec info
    cdef Py_ssize_t stop, nxt
    cdef uint64_t rip, rax, rdx, cr0, cs, fl, idx, desc, merged, mask, key
    cdef uint64_t* cnt
    cdef bint is64
    cdef int64_t dport
    if s.reg_read_batch(s.uc, s.ids, s.ptrs, UF_NREGS) != 0:
        return 1
    rip = s.vals[0]
    rax = s.vals[1]
    rdx = s.vals[2]
    cr0 = s.vals[3] & RP_U32
    cs = s.vals[4] & 0xFFFF
    fl = s.vals[5] & RP_U32
    # Mode and CPL exactly as tdxve.embed.cpu.cpu_mode / cpu_cpl (SDM Vol. 3A 5.2.1, 5.5).
    if not (cr0 & 1) or fl & (1 << 17):
        return 1                                # real / virtual-8086 mode: no #VE
    if cs & 3 == 3:
        return 1                                # user mode: the Python path raises VeFault
    is64 = s.fallback64
    idx = cs & ~(<uint64_t>7)
    if not (cs & 4) and idx != 0 and idx + 7 <= s.gdtr.limit:
        if s.vmem_read(s.uc, s.gdtr.base + idx, s.prot_read, raw, 8) == 0:
            desc = _uf_le64(raw)
            # present, code/data, code (tdxve.embed.cpu.usable_code_descriptor)
            if (desc >> 47) & 1 and (desc >> 44) & 1 and (desc >> 43) & 1:
                is64 = (s.msr.value >> 10) & 1 and (desc >> 53) & 1
    if not is64:
        return 1                                # 16/32-bit code: the bus, no #VE (ref 2.1)
    if s.vmem_read(s.uc, rip, s.prot_read, code, 15) != 0:
        return 1                                # near an unmapped page: Python reads byte by byte
    if decode_at(code, 15, 64, &rec, &stop) != ST_OK or rec.kind >= 2:
        return 1                                # INS/OUTS (one #VE for all elements) or not I/O
    dport = rec.port if rec.port >= 0 else <int64_t>(rdx & 0xFFFF)
    if dport != port or rec.size != size or (rec.kind == 0) != (is_in != 0):
        return 1                                # Python reports the disagreement
    if insn_exit_info(&rec, rdx, &info) != 0:
        return 1
    s.ev.exit_qual = info.exit_qual
    s.ev.instr_len = info.instr_len
    s.ev.rax = rax
    s.ev.reply = 0
    while True:
        nxt = _rp_run(&s.c, s.ev, s.res, 0, 1)
        if nxt != 0 or not s.bound:
            break
        _uf_call(s, UF_FLUSH, 0, 0, 0, 0)       # output or log buffer full: flush, then run it
        if not s.bound:
            out[0] = 0
            return 0
    if nxt < 0:
        _uf_call(s, UF_ABORT, 0, 0, 0, 0)
        out[0] = 0
        return 0
    if nxt != 1 or s.res.fault != RP_FAULT_NONE or s.res.rip_delta != info.instr_len:
        _uf_call(s, UF_UNEXPECTED, <uint64_t>s.res.fault, <uint64_t>s.res.rip_delta, <uint64_t>nxt, 0)
        out[0] = 0
        return 0
    key = (<uint64_t>port << 1) | (1 if is_in else 0)
    cnt = s.counts + 2 * key
    if cnt[0] == 0 and cnt[1] == 0:
        s.touched[s.ntouched] = <uint32_t>key
        s.ntouched += 1
    cnt[0] += s.res.ves
    cnt[1] += s.res.tdvmcalls
    s.nfast += 1
    out[0] = 0
    if is_in:
        merged = s.res.rax
        mask = RP_MASK[size]
        if size == 4 and merged >> 32:
            # Unicorn zero-extends EAX (SDM Vol. 1 3.4.1.1); linux-2022 keeps bits 63:33 (ref 1.4).
            _uf_call(s, UF_BARRIER, merged, rip + info.instr_len, 0, 0)
        elif (merged ^ rax) & ~mask:
            # bits above the width changed (linux-2022's one-bit-too-wide mask, ref 1.4):
            # Unicorn then merges the same low bytes into this RAX.
            s.reg_write(s.uc, s.rid_rax, &merged)
        out[0] = merged & mask
    return 0


cdef uint32_t _uf_access(uf_state* s, uint32_t port, int size, uint32_t value, int is_in) noexcept nogil:
    cdef uint64_t v = 0
    if s.draining:
        return 0                                # a barrier is pending: the rest of the block is discarded
    if s.bound and _uf_fast(s, port, size, is_in, &v) == 0:
        return <uint32_t>v
    return <uint32_t>_uf_call(s, UF_SLOW, port, <uint64_t>size, value, <uint64_t>is_in)


cdef uint32_t _uf_hook_in(void* uc, uint32_t port, int size, void* ud) noexcept nogil:
    return _uf_access(<uf_state*>ud, port, size, 0, 1)


cdef void _uf_hook_out(void* uc, uint32_t port, int size, uint32_t value, void* ud) noexcept nogil:
    _uf_access(<uf_state*>ud, port, size, value, 0)


cdef class UcFastPath:
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

    cdef uf_state* s
    cdef object _handler
    cdef object _plan
    cdef list _keep
    cdef list _hold
    cdef object _ev
    cdef object _res
    cdef object _counts
    cdef object _touched
    cdef size_t _hooks[2]
    cdef int _nhooks
    cdef size_t _hook_add
    cdef size_t _hook_del
    cdef dict _consts

    def __cinit__(self):
        self.s = <uf_state*>calloc(1, sizeof(uf_state))
        if self.s == NULL:
            raise MemoryError()

    def __init__(self, handle, api, consts, handler, *, fallback_mode=64):
        cdef uf_state* s = self.s
        cdef int i
        addrs = _UF.check_args(handle, api, consts, handler, fallback_mode)
        s.uc = <void*><size_t>handle
        s.reg_read_batch = <tdxve_uc_reg_read_batch_t><size_t>addrs["uc_reg_read_batch"]
        s.reg_write = <tdxve_uc_reg_write_t><size_t>addrs["uc_reg_write"]
        s.vmem_read = <tdxve_uc_vmem_read_t><size_t>addrs["uc_vmem_read"]
        self._hook_add = <size_t>addrs["uc_hook_add"]
        self._hook_del = <size_t>addrs["uc_hook_del"]
        self._consts = {k: int(consts[k]) for k in _UF.CONST_NAMES}
        for i, name in enumerate(_UF.REG_NAMES):
            s.ids[i] = <int>self._consts[name]
        for i in range(6):
            s.ptrs[i] = &s.vals[i]
        s.msr.rid = 0xC0000080              # IA32_EFER
        s.ptrs[6] = &s.msr
        s.ptrs[7] = &s.gdtr
        s.rid_rax = <int>self._consts["rax"]
        s.prot_read = <int>self._consts["prot_read"]
        s.fallback64 = fallback_mode == 64
        self._handler = handler
        s.handler = <PyObject*>handler
        self._counts = np.zeros(0x20000 * 2, dtype=np.uint64)
        self._touched = np.zeros(0x20000, dtype=np.uint32)
        s.counts = <uint64_t*>cnp.PyArray_DATA(self._counts)
        s.touched = <uint32_t*>cnp.PyArray_DATA(self._touched)
        self._ev = np.zeros(1, dtype=_RP_EVENT_DTYPE)
        self._res = np.zeros(1, dtype=_RP_RESULT_DTYPE)
        s.ev = <rp_event*>cnp.PyArray_DATA(self._ev)
        s.res = <rp_result*>cnp.PyArray_DATA(self._res)

    def __dealloc__(self):
        # Hooks are removed by remove() (detach); the owner keeps this object
        # alive for as long as the Unicorn instance may call it.
        if self.s != NULL:
            free(self.s.c.bufs)
            free(self.s.c.buflen)
            free(self.s)
            self.s = NULL

    def install(self):
        """Register the IN and OUT hooks with Unicorn (``uc_hook_add``).

        :raises EmbedError: already installed, or Unicorn refused.
        """
        cdef size_t hh = 0
        cdef int err
        if self._nhooks:
            raise _UF.already_installed()
        err = tdxve_uc_hook_insn(<void*>self._hook_add, self.s.uc, &hh, <int>self._consts["hook_insn"],
                                 <void*>_uf_hook_in, <void*>self.s, <int>self._consts["insn_in"])
        if err:
            raise _UF.hook_error("IN", err)
        self._hooks[0] = hh
        self._nhooks = 1
        err = tdxve_uc_hook_insn(<void*>self._hook_add, self.s.uc, &hh, <int>self._consts["hook_insn"],
                                 <void*>_uf_hook_out, <void*>self.s, <int>self._consts["insn_out"])
        if err:
            self.remove()
            raise _UF.hook_error("OUT", err)
        self._hooks[1] = hh
        self._nhooks = 2

    def remove(self):
        """Remove the hooks (``uc_hook_del``); idempotent."""
        cdef int i
        for i in range(self._nhooks):
            tdxve_uc_hook_del(<void*>self._hook_del, self.s.uc, self._hooks[i])
        self._nhooks = 0
        self.unbind()

    @property
    def installed(self):
        """Whether the hooks are registered."""
        return self._nhooks == 2

    @property
    def draining(self):
        """True while a barrier is pending: the hooks then do nothing."""
        return bool(self.s.draining)

    @draining.setter
    def draining(self, value):
        self.s.draining = bool(value)

    @property
    def bound(self):
        """Whether a plan is bound (accesses run compiled)."""
        return bool(self.s.bound)

    @property
    def event(self):
        """The one-event :data:`~tdxve.abi.EVENT_DTYPE` array the hooks replay (for ``plan.finish``)."""
        return self._ev

    def bind(self, plan):
        """Run accesses on ``plan`` (a prepared :mod:`tdxve.replay` plan) until :meth:`unbind`.

        :raises InvalidArgumentError: a malformed plan.
        """
        cdef uf_state* s = self.s
        cdef list keep = []
        cdef list hold = []
        self.unbind()
        s.c.plan = <PyObject*>plan
        s.c.keep = <PyObject*>keep
        s.c.abort = 0
        s.c.dev_err = 0
        try:
            _rp_bind_static(&s.c, plan, hold)
            _rp_bind_dynamic(&s.c, plan)
        except BaseException:
            free(s.c.bufs)
            free(s.c.buflen)
            memset(&s.c, 0, sizeof(rp_ctx))
            raise
        self._plan = plan
        self._keep = keep
        self._hold = hold
        s.bound = True

    def rebind(self):
        """Re-read the plan's device arrays (after Python changed devices).

        :raises InvalidArgumentError: the plan became malformed (unbound then).
        """
        if self.s.bound:
            try:
                _rp_bind_dynamic(&self.s.c, self._plan)
            except BaseException:
                self.unbind()
                raise

    def unbind(self):
        """Stop running accesses compiled (the hooks then call the handler); idempotent."""
        cdef uf_state* s = self.s
        s.bound = False
        free(s.c.bufs)
        free(s.c.buflen)
        memset(&s.c, 0, sizeof(rp_ctx))
        self._plan = None
        self._keep = None
        self._hold = None

    def take_counts(self):
        """``(accesses, [(port, is_in, ves, tdvmcalls), ...])`` since the last call; resets them."""
        cdef uf_state* s = self.s
        cdef uint64_t i, key
        rows = []
        for i in range(s.ntouched):
            key = s.touched[i]
            rows.append((<int>(key >> 1), bool(key & 1), <object>s.counts[2 * key], <object>s.counts[2 * key + 1]))
            s.counts[2 * key] = 0
            s.counts[2 * key + 1] = 0
        n = <object>s.nfast
        s.ntouched = 0
        s.nfast = 0
        return n, rows
