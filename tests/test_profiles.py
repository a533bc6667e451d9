"""The RAX-merge / OUT-R15 profiles against ref 1.4, 6.2 and 6.3, through the whole Machine path.

Expected values are literals from the reference tables (or derived by hand
from the rule quoted next to them), never computed by the code under test.
"""

from __future__ import annotations


import pytest

from tdxve.errors import EarlyPanic, VeFault, VeLoopError
from tdxve.guest import merge_in, out_data
from tdxve.machine import Machine
from tdxve.regs import Regs


import ve_helpers as H  # noqa: E402  (tests/ is on pythonpath)
RIP = 0xFFFFFFFF81234560
A = 0xAAAAAAAAAAAAAAAA
R11 = 0x5555555555555555
FAIL = 0x8000000000000000

IN_CODE = {1: b"\xec", 2: b"\x66\xed", 4: b"\xed"}
OUT_CODE = {1: b"\xee", 2: b"\x66\xef", 4: b"\xef"}


def machine(profile: str, host: object | None = None, **kw: object) -> Machine:
    return Machine(profile=profile, host=host or H.KvmHost(), **kw)  # type: ignore[arg-type]


def run_in(profile: str, size: int, rax: int, reply: tuple[int, int], path: str = "normal") -> Regs:
    m = machine(profile, path=path)
    m.host.replies.append(reply)                  # type: ignore[attr-defined]
    regs = Regs(rip=RIP, rax=rax, rdx=0x80)
    if reply[0] == 0:
        out = m.execute(regs, IN_CODE[size])
        assert out.rip == regs.rip == RIP + len(IN_CODE[size])
    else:
        with pytest.raises(EarlyPanic if path == "early" else VeFault):
            m.execute(regs, IN_CODE[size])
        assert regs.rip == RIP
    return regs


# ---------------------------------------------------------------- ref 6.2 (success)
# Inputs RAX = 0xAAAA..., R11 = 0x5555..., R10 = 0 (ref 6.2 table)
REF_6_2_SUCCESS = {
    "linux-2022": {1: 0xAAAAAAAAAAAAAB55, 2: 0xAAAAAAAAAAAB5555, 4: 0xAAAAAAAB55555555},
    "linux-5.19-rc": {1: 0xAAAAAAAAAAAAAB55, 2: 0xAAAAAAAAAAAB5555, 4: 0xAAAAAAAB55555555},
    "linux": {1: 0xAAAAAAAAAAAAAA55, 2: 0xAAAAAAAAAAAA5555, 4: 0x0000000055555555},
    "architectural": {1: 0xAAAAAAAAAAAAAA55, 2: 0xAAAAAAAAAAAA5555, 4: 0x0000000055555555},
}
# Same inputs, R10 != 0 (ref 6.2 "failure" paragraph; architectural: a
# faulting IN writes nothing)
REF_6_2_FAILURE = {
    "linux-2022": {1: 0xAAAAAAAAAAAAAA00, 2: 0xAAAAAAAAAAAA0000, 4: 0xAAAAAAAA00000000},
    "linux-5.19-rc": {1: 0xAAAAAAAAAAAAAA00, 2: 0xAAAAAAAAAAAA0000, 4: 0xAAAAAAAA00000000},
    "linux": {1: 0xAAAAAAAAAAAAAA00, 2: 0xAAAAAAAAAAAA0000, 4: 0x0},
    "architectural": {1: A, 2: A, 4: A},
}


@pytest.mark.parametrize("profile", list(REF_6_2_SUCCESS))
@pytest.mark.parametrize("size", [1, 2, 4])
def test_ref_6_2_in_merge_success(profile: str, size: int) -> None:
    regs = run_in(profile, size, A, (0, R11))
    assert regs.rax == REF_6_2_SUCCESS[profile][size]
    assert merge_in(profile, A, R11, size, True) == REF_6_2_SUCCESS[profile][size]


@pytest.mark.parametrize("profile", list(REF_6_2_FAILURE))
@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("path", ["normal", "early"])
def test_ref_6_2_in_merge_failure(profile: str, size: int, path: str) -> None:
    regs = run_in(profile, size, A, (FAIL, R11), path)
    assert regs.rax == REF_6_2_FAILURE[profile][size]
    assert merge_in(profile, A, R11, size, False) == REF_6_2_FAILURE[profile][size]


# OUT R15 for RAX = 0x112378086 (ref 6.2): 2022 size 2 -> 0x18086, size 4 ->
# 0x112378086; fixed -> 0x8086, 0x12378086.
@pytest.mark.parametrize("profile,size,r15", [
    ("linux-2022", 2, 0x18086), ("linux-2022", 4, 0x112378086),
    ("linux-5.19-rc", 2, 0x18086), ("linux-5.19-rc", 4, 0x112378086),
    ("linux", 2, 0x8086), ("linux", 4, 0x12378086),
    ("architectural", 2, 0x8086), ("architectural", 4, 0x12378086),
])
def test_ref_6_2_out_r15(profile: str, size: int, r15: int) -> None:
    m = machine(profile)
    regs = Regs(rip=RIP, rax=0x112378086, rdx=0xCF8)
    before = regs.copy()
    m.execute(regs, OUT_CODE[size])
    assert m.host.last.r15 == r15                           # type: ignore[attr-defined]
    assert regs.diff(before) == {"rip": (RIP + len(OUT_CODE[size]), RIP)}
    assert out_data(profile, 0x112378086, size) == r15


# ---------------------------------------------------------------- ref 6.3 live measurements
# GCP c3-standard-4 TDX VM, kernel 6.17 (2022 code); the host zero-extends (ref 6.3).
CMOS_PCI = {0x71: 0x26, 0xCFC: 0x12378086}

REF_6_3_IN = [
    # (id, code, port-in-DX, RAX before, observed (2022 code), correct)
    ("inb-0x71-ax0", b"\xe4\x71", 0, 0x0000, 0x0026, 0x0026),
    ("inb-0x71-ax0100", b"\xe4\x71", 0, 0x0100, 0x0026, 0x0126),
    ("inl-0xcfc-deadbeef", b"\xed", 0xCFC, 0xDEADBEEF00000000, 0xDEADBEEE12378086, 0x12378086),
    ("inl-0xcfc-12345678", b"\xed", 0xCFC, 0x1234567800000000, 0x1234567812378086, 0x12378086),
]


@pytest.mark.parametrize("case", REF_6_3_IN, ids=[c[0] for c in REF_6_3_IN])
@pytest.mark.parametrize("profile", ["linux-2022", "linux", "architectural"])
def test_ref_6_3_in(case: tuple[str, bytes, int, int, int, int], profile: str) -> None:
    _, code, dx, rax, observed, correct = case
    m = machine(profile, H.KvmHost(CMOS_PCI))
    regs = Regs(rip=RIP, rax=rax, rdx=dx)
    out = m.execute(regs, code)
    assert regs.rax == (observed if profile == "linux-2022" else correct)
    assert out.rip == RIP + len(code) and out.tdvmcalls == 1


REF_6_3_OUT = [
    # (code, RAX) -> R15 observed (2022) / correct (ref 6.3 last row)
    (b"\xe6\x80", 0x15A, 0x15A, 0x5A),
    (b"\x66\xef", 0x18086, 0x18086, 0x8086),
    (b"\xef", 0x112378086, 0x112378086, 0x12378086),
]


@pytest.mark.parametrize("code,rax,observed,correct", REF_6_3_OUT, ids=["outb", "outw", "outl"])
@pytest.mark.parametrize("profile", ["linux-2022", "linux", "architectural"])
def test_ref_6_3_out_payload(code: bytes, rax: int, observed: int, correct: int, profile: str) -> None:
    host = H.KvmHost()
    m = machine(profile, host)
    m.execute(Regs(rip=RIP, rax=rax, rdx=0xCF8), code)
    assert host.last.r15 == (observed if profile == "linux-2022" else correct)
    # KVM consumes only the low `size` bytes, so the device never sees the extra bit (ref 1.4)
    assert host.io[-1][3] == correct


# ---------------------------------------------------------------- impossible sizes (ref 1.3, 1.4)
# Exit qualification with size encoding 2, 4..7 -> Linux size 3, 5..8. IN to
# port 0x80 (qual = 0x00800008 | enc), instruction length 1.
# linux-2022: clear GENMASK(8*size, 0), OR r11 on success; size 8 = GENMASK(64, 0),
#   undefined in C; x86 SHR masks the count -1 to 63 -> mask 0x1.
# linux: insn_assign_reg leaves RAX alone for 3/5/6/7, writes 64 bits for 8.
# architectural: extrapolated narrow write of `size` bytes, 8 = whole RAX.
IMPOSSIBLE_SUCCESS = {
    "linux-2022": {3: 0xAAAAAAAAAB555555, 5: 0xAAAAAB5555555555, 6: 0xAAAB555555555555,
                   7: 0xAB55555555555555, 8: 0xAAAAAAAAAAAAAAAB},
    "linux": {3: A, 5: A, 6: A, 7: A, 8: 0x5555555555555555},
    "architectural": {3: 0xAAAAAAAAAA555555, 5: 0xAAAAAA5555555555, 6: 0xAAAA555555555555,
                      7: 0xAA55555555555555, 8: 0x5555555555555555},
}
IMPOSSIBLE_FAILURE = {      # KVM rejects size 3/5..8 with INVALID_OPERAND (ref 5.2)
    "linux-2022": {3: 0xAAAAAAAAAA000000, 5: 0xAAAAAA0000000000, 6: 0xAAAA000000000000,
                   7: 0xAA00000000000000, 8: A},
    "linux": {3: A, 5: A, 6: A, 7: A, 8: 0},
    "architectural": {3: A, 5: A, 6: A, 7: A, 8: A},
}
ENC = {3: 2, 5: 4, 6: 5, 7: 6, 8: 7}


@pytest.mark.parametrize("profile", list(IMPOSSIBLE_SUCCESS))
@pytest.mark.parametrize("size", [3, 5, 6, 7, 8])
def test_impossible_size_in_success(profile: str, size: int) -> None:
    host = H.AnySizeHost()
    host.replies.append((0, R11))
    m = machine(profile, host)
    regs = Regs(rip=RIP, rax=A)
    out = m.execute_exit(regs, 30, exit_qual=0x00800008 | ENC[size], instr_len=1)
    assert host.last.r12 == size                 # forwarded unvalidated (ref 1.3)
    assert regs.rax == IMPOSSIBLE_SUCCESS[profile][size]
    assert out.rip == RIP + 1


@pytest.mark.parametrize("profile", list(IMPOSSIBLE_FAILURE))
@pytest.mark.parametrize("size", [3, 5, 6, 7, 8])
def test_impossible_size_in_rejected_by_kvm(profile: str, size: int) -> None:
    m = machine(profile)
    regs = Regs(rip=RIP, rax=A)
    with pytest.raises(VeFault, match="status 0x8000000000000000"):
        m.execute_exit(regs, 30, exit_qual=0x00800008 | ENC[size], instr_len=1)
    assert regs.rax == IMPOSSIBLE_FAILURE[profile][size] and regs.rip == RIP


def test_linux_2022_size_8_failure_clears_only_bit_0() -> None:
    m = machine("linux-2022")
    regs = Regs(rip=RIP, rax=2**64 - 1)
    with pytest.raises(VeFault):
        m.execute_exit(regs, 30, exit_qual=0x00800008 | 7, instr_len=1)
    assert regs.rax == 0xFFFFFFFFFFFFFFFE


ONES = 2**64 - 1
# OUT R15 for RAX = all ones, every Linux size 1..8
OUT_R15_ALL_ONES = {
    "linux-2022": {1: 0x1FF, 2: 0x1FFFF, 3: 0x1FFFFFF, 4: 0x1FFFFFFFF, 5: 0x1FFFFFFFFFF,
                   6: 0x1FFFFFFFFFFFF, 7: 0x1FFFFFFFFFFFFFF, 8: 0x1},
    "linux": {1: 0xFF, 2: 0xFFFF, 3: 0xFFFFFF, 4: 0xFFFFFFFF, 5: 0xFFFFFFFFFF,
              6: 0xFFFFFFFFFFFF, 7: 0xFFFFFFFFFFFFFF, 8: ONES},
    "architectural": {1: 0xFF, 2: 0xFFFF, 3: 0xFFFFFF, 4: 0xFFFFFFFF, 5: 0xFFFFFFFFFF,
                      6: 0xFFFFFFFFFFFF, 7: 0xFFFFFFFFFFFFFF, 8: ONES},
}


@pytest.mark.parametrize("profile", list(OUT_R15_ALL_ONES))
@pytest.mark.parametrize("size", range(1, 9))
def test_out_r15_every_size(profile: str, size: int) -> None:
    host = H.KvmHost()
    m = machine(profile, host)
    regs = Regs(rip=RIP, rax=ONES)
    qual = 0x00800000 | (size - 1)                 # OUT to 0x80, encoding size-1
    if size in (1, 2, 4):
        m.execute_exit(regs, 30, exit_qual=qual, instr_len=2)
        assert regs.rip == RIP + 2
    else:
        with pytest.raises(VeFault):               # KVM: INVALID_OPERAND; RAX untouched
            m.execute_exit(regs, 30, exit_qual=qual, instr_len=2)
        assert regs.rip == RIP
    assert host.last.r15 == OUT_R15_ALL_ONES[profile][size]
    assert regs.rax == ONES
    assert out_data(profile, ONES, size) == OUT_R15_ALL_ONES[profile][size]


def test_failed_out_leaves_rax_untouched_under_every_profile() -> None:
    for profile in ("linux-2022", "linux", "architectural"):
        m = machine(profile)
        m.host.replies.append((FAIL, 0))           # type: ignore[attr-defined]
        regs = Regs(rip=RIP, rax=A, rdx=0x3F8)
        before = regs.copy()
        with pytest.raises(VeFault, match="OUT 1 byte"):
            m.execute(regs, b"\xee")
        assert regs == before                      # ref 1.10: OUT failure, RAX untouched


# ---------------------------------------------------------------- linux-5.19-rc (ref 1.1, 7.10)
def test_5_19_rc_early_path_endless_loop_is_detected() -> None:
    host = H.KvmHost()
    m = machine("linux-5.19-rc", host, path="early", ve_loop_limit=4)
    regs = Regs(rip=RIP, rax=0x41, rdx=0x3F8)
    with pytest.raises(VeLoopError, match="endless #VE loop") as ei:
        m.execute(regs, b"\xee")
    assert ei.value.regs.rip == RIP and regs.rip == RIP
    # every re-execution exited again and reached the host (the real bug's symptom)
    assert host.io == [("out", 0x3F8, 1, 0x41)] * 4
    assert m.tdx.ve_injected == 4 and not m.tdx.ve_pending


def test_5_19_rc_normal_path_advances_and_uses_the_2022_mask() -> None:
    host = H.KvmHost({0x71: 0x26})
    m = machine("linux-5.19-rc", host)
    regs = Regs(rip=RIP, rax=0x0100, rbx=0x1234, rsi=0x77)
    out = m.execute(regs, b"\xe4\x71")
    assert out.rip == RIP + 2 and out.ve_count == 1
    assert regs.rax == 0x0026                      # 2022 merge: AH bit 0 lost
    # RCX mask 0xFC00: only R10-R15 reach the host (ref 2.4)
    assert host.last.rcx == 0xFC00
    assert (host.last.rbx, host.last.rsi, host.last.rdx) == (0, 0, 0)


def test_5_19_rc_early_failure_still_panics() -> None:
    m = machine("linux-5.19-rc", path="early")
    m.host.replies.append((FAIL, R11))             # type: ignore[attr-defined]
    regs = Regs(rip=RIP, rax=A, rdx=0x80)
    with pytest.raises(EarlyPanic):
        m.execute(regs, b"\xed")
    assert regs.rax == 0xAAAAAAAA00000000


@pytest.mark.parametrize("profile", ["linux-2022", "linux", "architectural"])
def test_fixed_profiles_early_path_advances(profile: str) -> None:
    m = machine(profile, path="early")
    regs = Regs(rip=RIP, rax=0x41, rdx=0x3F8)
    assert m.execute(regs, b"\xee").rip == RIP + 1


# ---------------------------------------------------------------- the real host (contract 1)
def _real_machine(profile: str) -> Machine:
    mod = pytest.importorskip("tdxve.host")
    if not hasattr(mod, "Host"):
        pytest.skip("tdxve.host.Host not written yet")
    return Machine(profile=profile)


@pytest.mark.parametrize("profile,expected", [
    ("linux-2022", 0x0026), ("linux", 0x0126), ("architectural", 0x0126)])
def test_real_host_cmos_status_a(profile: str, expected: int) -> None:
    m = _real_machine(profile)
    regs = Regs(rip=RIP, rax=0x0A)
    m.execute(regs, b"\xe6\x70")                   # OUT 0x70, AL: select register A
    regs.rax = 0x0100
    m.execute(regs, b"\xe4\x71")                   # IN AL, 0x71
    assert regs.rax == expected                    # ref 6.3: status A = 0x26


@pytest.mark.parametrize("profile,rax,expected", [
    ("linux-2022", 0xDEADBEEF00000000, 0xDEADBEEE12378086),
    ("linux-2022", 0x1234567800000000, 0x1234567812378086),
    ("linux", 0xDEADBEEF00000000, 0x12378086),
    ("architectural", 0x1234567800000000, 0x12378086),
])
def test_real_host_pci_config_dword_0(profile: str, rax: int, expected: int) -> None:
    m = _real_machine(profile)
    regs = Regs(rip=RIP, rax=0x80000000, rdx=0xCF8)
    m.execute(regs, b"\xef")                       # OUT DX, EAX: 00:00.0 offset 0
    regs.rdx = 0xCFC
    regs.rax = rax
    m.execute(regs, b"\xed")                       # IN EAX, DX
    assert regs.rax == expected                    # ref 6.3: 0x12378086
