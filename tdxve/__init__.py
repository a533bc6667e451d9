"""tdxve — Intel TDX guest port I/O through #VE, modelled bit-exactly.

* Decoder (compiled core or pure twin, see :data:`BACKEND`):
  :func:`decode_exit_qual`, :func:`encode_exit_qual`, :func:`decode_exit_quals`,
  :func:`decode_insn`, :func:`decode_insns`, :func:`exit_info`, :func:`exit_infos`.
* #VE model: :class:`Machine` (host + :class:`TdxModule` + :class:`Guest`),
  :class:`Regs`, guest memory (:class:`GuestMemory`, :class:`ArrayMemory`).
* Host: :class:`Host` (KVM-faithful TDVMCALL service), :class:`PortBus`,
  :class:`FaultyHost` / :class:`FaultPlan`; device models in :mod:`tdxve.devices`.
"""

from __future__ import annotations

from ._backend import BACKEND, core as _core_impl
from ._version import __version__
from .abi import (
    EXIT_INFO_DTYPE,
    EXIT_QUAL_DTYPE,
    INSN_DTYPE,
    ExitQual,
    ExitReason,
    IoInsn,
    IoKind,
    Segment,
    TdcallLeaf,
    TdvmcallStatus,
    TdvmcallSubfn,
    TdxStatus,
)
from .errors import (
    AttachError,
    BusConfigError,
    DecodeError,
    DeviceError,
    DoubleFault,
    EarlyPanic,
    EmbedError,
    ExitQualError,
    GeneralProtectionFault,
    GuestFault,
    GuestMemoryFault,
    GuestPanic,
    HostError,
    InstructionTooLongError,
    InvalidArgumentError,
    InvariantViolation,
    LockPrefixError,
    NotPortIoError,
    RegisterValueError,
    StringIoLimitError,
    TdxveError,
    TruncatedInputError,
    UnsupportedExitError,
    UnsupportedModeError,
    VeFault,
    VeLoopError,
)
from .regs import Regs

# ---- decoder (bound from the selected backend)
decode_exit_qual = _core_impl.decode_exit_qual
encode_exit_qual = _core_impl.encode_exit_qual
decode_exit_quals = _core_impl.decode_exit_quals
decode_insn = _core_impl.decode_insn
decode_insns = _core_impl.decode_insns
exit_info = _core_impl.exit_info
exit_infos = _core_impl.exit_infos

# ---- #VE model and host (pure Python; they use the backend bound above)
from .guest import (  # noqa: E402
    INTEL_ALLOWED_PORTS,
    INTEL_DEBUG_ALLOWED_PORTS,
    PROFILE_NAMES,
    ArrayMemory,
    Guest,
    GuestMemory,
    Profile,
)
from .host import EventLog, FaultPlan, FaultyHost, Host, PortBus  # noqa: E402
from .machine import Machine, Outcome  # noqa: E402
from .tdx import TdxModule, VeInfo  # noqa: E402

# ---- batch replay and traces (the compiled kernel behind replay is in _core)
from .abi import EVENT_DTYPE, RESULT_DTYPE, ReplayFault  # noqa: E402
from .errors import ReplayError, ReplayUnsupportedError, TraceFormatError  # noqa: E402
from .replay import Replayer, ReplaySummary, replay, replay_chunks, replay_file  # noqa: E402
from .trace import iter_kvm_pio, read_kvm_pio  # noqa: E402

__all__ = [
    # backend and version
    "BACKEND", "__version__",
    # decoder
    "decode_exit_qual", "encode_exit_qual", "decode_exit_quals",
    "decode_insn", "decode_insns", "exit_info", "exit_infos",
    # value types, enums, dtypes
    "ExitQual", "IoInsn", "IoKind", "Segment", "ExitReason", "TdcallLeaf",
    "TdvmcallSubfn", "TdvmcallStatus", "TdxStatus",
    "EXIT_QUAL_DTYPE", "INSN_DTYPE", "EXIT_INFO_DTYPE",
    # CPU state, #VE model, host
    "Regs", "Machine", "Outcome", "TdxModule", "VeInfo", "Guest", "Profile", "PROFILE_NAMES",
    "GuestMemory", "ArrayMemory", "INTEL_ALLOWED_PORTS", "INTEL_DEBUG_ALLOWED_PORTS",
    "Host", "PortBus", "FaultyHost", "FaultPlan", "EventLog",
    # batch replay and traces
    "replay", "replay_chunks", "replay_file", "Replayer", "ReplaySummary",
    "EVENT_DTYPE", "RESULT_DTYPE", "ReplayFault", "read_kvm_pio", "iter_kvm_pio",
    # errors
    "TdxveError", "InvalidArgumentError", "RegisterValueError", "UnsupportedModeError",
    "DecodeError", "NotPortIoError", "TruncatedInputError", "LockPrefixError",
    "InstructionTooLongError", "ExitQualError",
    "GuestFault", "EarlyPanic", "VeFault", "DoubleFault", "VeLoopError",
    "GuestMemoryFault", "UnsupportedExitError", "GuestPanic", "GeneralProtectionFault",
    "StringIoLimitError", "InvariantViolation", "ReplayError", "ReplayUnsupportedError",
    "TraceFormatError",
    "HostError", "DeviceError", "BusConfigError", "EmbedError", "AttachError",
]
