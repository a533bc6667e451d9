"""The exception tree, shared by both decoder backends and every layer.

Everything tdxve raises on purpose is a :class:`TdxveError`. Errors caused by a
bad argument also subclass :class:`ValueError`. Guest faults (what a simulator
catches to stop the guest) subclass :class:`GuestFault` and carry the guest
register state at the fault.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "TdxveError",
    "InvalidArgumentError", "RegisterValueError", "UnsupportedModeError",
    "DecodeError", "NotPortIoError", "TruncatedInputError", "LockPrefixError",
    "InstructionTooLongError",
    "ExitQualError",
    "GuestFault", "EarlyPanic", "VeFault", "DoubleFault", "VeLoopError",
    "GuestMemoryFault", "UnsupportedExitError",
    "HostError", "DeviceError", "BusConfigError",
]


class TdxveError(Exception):
    """Root of every exception tdxve raises on purpose."""


class InvalidArgumentError(TdxveError, ValueError):
    """An argument is out of range or of the wrong kind."""


class RegisterValueError(InvalidArgumentError):
    """A register (or register-sized) value is negative, wider than 64 bits or not an int."""


class UnsupportedModeError(InvalidArgumentError):
    """The processor mode is not 16, 32 or 64."""


# ---------------------------------------------------------------- decoding
class DecodeError(TdxveError, ValueError):
    """The bytes do not start a port-I/O instruction the CPU would execute.

    ``offset`` is where the offending instruction starts in the caller's
    buffer (0 for :func:`tdxve.decode_insn`); ``data`` holds up to 16 bytes
    from there.
    """

    def __init__(self, message: str, *, offset: int = 0, data: bytes = b"") -> None:
        super().__init__(message)
        self.offset = offset
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_decode_error, (type(self), self.args[0], self.offset, self.data))


def _rebuild_decode_error(cls: type[DecodeError], msg: str, offset: int, data: bytes) -> DecodeError:
    return cls(msg, offset=offset, data=data)


class NotPortIoError(DecodeError):
    """The opcode is not one of IN/OUT/INS/OUTS (6C-6F, E4-E7, EC-EF)."""


class TruncatedInputError(DecodeError):
    """The input ends before the instruction does."""


class LockPrefixError(DecodeError):
    """LOCK (F0) on a port-I/O instruction: #UD, raised before any VM exit (ref 3.4)."""


class InstructionTooLongError(DecodeError):
    """More than 15 bytes: #GP(0), raised before any VM exit (ref 3.4)."""


class ExitQualError(TdxveError, ValueError):
    """An exit qualification (or the fields to encode one) that no I/O instruction produces.

    ``value`` is the offending 64-bit qualification (or field value).
    """

    def __init__(self, message: str, *, value: int = 0) -> None:
        super().__init__(message)
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_qual_error, (type(self), self.args[0], self.value))


def _rebuild_qual_error(cls: type[ExitQualError], msg: str, value: int) -> ExitQualError:
    return cls(msg, value=value)


# ---------------------------------------------------------------- guest faults
class GuestFault(TdxveError):
    """The guest could not complete the instruction; what a simulator catches.

    ``regs`` is a copy of the guest register file at the fault (RIP at the
    faulting instruction), ``vector`` the exception vector that was being
    handled, and ``reason`` a short machine-readable tag.
    """

    def __init__(self, message: str, *, regs: Any = None, vector: int | None = None,
                 reason: str = "") -> None:
        super().__init__(message)
        self.regs = regs
        self.vector = vector
        self.reason = reason


class EarlyPanic(GuestFault):
    """The early exception path had no handler and no fixup: "PANIC: early exception …"."""


class VeFault(GuestFault):
    """The normal #VE handler failed: Linux's ``ve_raise_fault`` (oops in the kernel, SIGSEGV in user mode)."""


class DoubleFault(GuestFault):
    """A #VE arrived while the VE info was still valid: the TDX module injects #DF (ref 2.2)."""


class VeLoopError(GuestFault):
    """The guest re-executes the same faulting instruction forever (e.g. the linux-5.19-rc early handler)."""


class GuestMemoryFault(GuestFault):
    """Emulated string I/O touched an address outside guest memory."""


class UnsupportedExitError(GuestFault):
    """An exit reason the model does not emulate yet (e.g. EPT violation / MMIO)."""


# ---------------------------------------------------------------- host side
class HostError(TdxveError):
    """Errors raised by the host model itself (not statuses returned to the guest)."""


class DeviceError(HostError):
    """A device model raised while serving an access; the original exception is ``__cause__``."""


class BusConfigError(HostError, ValueError):
    """Bad port-bus configuration: overlapping ranges, bad sizes, bad port numbers."""


# ---------------------------------------------------------------- #VE model (issue 3)
class GuestPanic(GuestFault):
    """The guest kernel panicked outside the early-exception path.

    Raised where Linux calls ``panic()``: a TDCALL that returns a non-zero
    status ("TDCALL 3 failed (Buggy TDX module!)", "TDVMCALL failed. TDX
    module bug?"; ref 1.2, 1.10).
    """


class GeneralProtectionFault(GuestFault):
    """#GP(0) injected into the guest, e.g. TDCALL outside 64-bit mode (TDX module td_call; ref 2.1)."""


class StringIoLimitError(GuestFault):
    """An emulated REP INS/OUTS asked for more elements than the configured guard allows.

    Raised before any element is transferred (registers and RIP untouched);
    see ``Guest(max_rep=...)`` and docs/ve-model.md.
    """


__all__ += ["GuestPanic", "GeneralProtectionFault", "StringIoLimitError"]


# ---------------------------------------------------------------- embedding (issue 5)
class EmbedError(TdxveError):
    """The embedding layer (``tdxve.embed``) cannot complete what the simulator asked.

    For example: the instruction bytes at RIP cannot be read, the simulator
    and tdxve disagree about an instruction, or a direct (non-64-bit) port
    access needs a host without a ``bus``.
    """


class AttachError(EmbedError, InvalidArgumentError):
    """``tdxve.embed.unicorn.attach``/``detach`` refused: not an x86 Unicorn
    instance, a machine without the needed parts, already (or not) attached,
    or an IN hook already registered that would shadow tdxve's (Unicorn 2.1
    calls only the first IN hook, anchors 2.1).
    """


__all__ += ["EmbedError", "AttachError"]


# ---------------------------------------------------------------- batch replay (issue 6)
class ReplayError(TdxveError):
    """The batch replay engine (:func:`tdxve.replay.replay`) cannot run or continue,
    e.g. the same machine is already being replayed by another thread."""


class ReplayUnsupportedError(ReplayError, InvalidArgumentError):
    """``replay`` refuses this machine or these events: a configuration whose
    behaviour a batch of port-I/O events cannot reproduce (emulated string I/O,
    an exception-table entry, a pending #VE, a subclass overriding the #VE
    path...); the message names the setting."""


class TraceFormatError(TdxveError, ValueError):
    """A ``kvm_pio`` trace line that cannot be parsed.

    ``lineno`` is the 1-based line number, ``line`` the offending text.
    """

    def __init__(self, message: str, *, lineno: int = 0, line: str = "") -> None:
        super().__init__(message)
        self.lineno = lineno
        self.line = line

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_trace_error, (type(self), self.args[0], self.lineno, self.line))


def _rebuild_trace_error(cls: type[TraceFormatError], msg: str, lineno: int, line: str) -> TraceFormatError:
    return cls(msg, lineno=lineno, line=line)


__all__ += ["ReplayError", "ReplayUnsupportedError", "TraceFormatError"]


# ---------------------------------------------------------------- invariants (issue 7)
class InvariantViolation(TdxveError, AssertionError):
    """A property tdxve guarantees did not hold: a bug in tdxve or in a part plugged into it.

    Raised by the checks in :mod:`tdxve.invariants` (used by the fuzz
    harnesses and property tests); never by the emulation itself.
    ``invariant`` names the broken rule, ``details`` holds the values that
    show it.
    """

    def __init__(self, message: str, *, invariant: str = "", details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.invariant = invariant
        self.details: dict[str, Any] = dict(details or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_invariant_violation, (type(self), self.args[0], self.invariant, self.details))


def _rebuild_invariant_violation(cls: type[InvariantViolation], msg: str, invariant: str,
                                 details: dict[str, Any]) -> InvariantViolation:
    return cls(msg, invariant=invariant, details=details)


__all__ += ["InvariantViolation"]
