"""The public surface: every name in tdxve.__all__ exists and is documented."""

from __future__ import annotations

import inspect

import tdxve


def test_all_names_exist_and_are_documented():
    for name in tdxve.__all__:
        obj = getattr(tdxve, name)
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj) or callable(obj):
            assert inspect.getdoc(obj), f"tdxve.{name} has no docstring"


def test_errors_tree():
    """Architecture: every error is a TdxveError; bad-argument errors are ValueErrors;
    guest faults are GuestFaults."""
    for name in tdxve.errors.__all__:
        cls = getattr(tdxve.errors, name)
        assert issubclass(cls, tdxve.TdxveError), name
    for cls in (tdxve.InvalidArgumentError, tdxve.DecodeError, tdxve.ExitQualError,
                tdxve.RegisterValueError, tdxve.UnsupportedModeError, tdxve.BusConfigError):
        assert issubclass(cls, ValueError)
    for cls in (tdxve.EarlyPanic, tdxve.VeFault, tdxve.DoubleFault, tdxve.VeLoopError,
                tdxve.GuestMemoryFault, tdxve.UnsupportedExitError):
        assert issubclass(cls, tdxve.GuestFault)


def test_headline_vector_through_the_public_api():
    """Ref 6.3: INL 0xCFC with RAX = 0xDEADBEEF00000000 after selecting the host bridge's
    dword 0 leaves 0xDEADBEEE12378086 under the 2022 code and 0x12378086 once fixed."""
    for profile, expect in (("linux-2022", 0xDEADBEEE12378086), ("linux", 0x12378086),
                            ("architectural", 0x12378086)):
        m = tdxve.Machine(profile=profile)
        r = tdxve.Regs(rax=0x8000_0000, rdx=0xCF8)
        m.execute(r, b"\xef")                   # OUT DX, EAX: CONFIG_ADDRESS = enable | 00:00.0 reg 0
        r.update(rax=0xDEADBEEF00000000, rdx=0xCFC)
        out = m.execute(r, b"\xed")             # IN EAX, DX
        assert r.rax == expect and out.exit_qual == 0x0CFC000B and out.tdvmcalls == 1
