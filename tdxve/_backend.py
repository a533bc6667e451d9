"""Binds the decoder backend once, at import.

``TDXVE_PUREPYTHON=1`` selects the pure twin :mod:`tdxve._core_py`; otherwise
the compiled :mod:`tdxve._core` is imported and an import failure is an error:
there is no silent fallback (a broken build must not quietly test the twin).
"""

from __future__ import annotations

import os
from types import ModuleType

PURE_REQUESTED = os.environ.get("TDXVE_PUREPYTHON", "") not in ("", "0")

core: ModuleType
if PURE_REQUESTED:
    from . import _core_py as core
else:
    try:
        from . import _core as core  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        raise ImportError(
            "tdxve's compiled core (tdxve._core) could not be imported: "
            f"{exc}. Reinstall from source with a C compiler (pip install .), "
            "or set TDXVE_PUREPYTHON=1 to use the pure-Python twin explicitly."
        ) from exc

BACKEND: str = core.BACKEND
