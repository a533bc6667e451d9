"""Build script: one extension, ``tdxve._core``, from ``tdxve/_core.pyx``.

Environment knobs (read here and nowhere else):

* ``TDXVE_DEBUG=1``    – bounds/wraparound/initialized checks forced on in every
  function, the ``TDXVE_DEBUG`` C macro set to 1 (enables invariant blocks in
  the hot loops), no ``-O3``.
* ``TDXVE_ANNOTATE=1`` – also write Cython's HTML annotation next to the .pyx.

A failed compile fails the install: there is no silent pure-Python fallback.
The pure twin is selected at import time with ``TDXVE_PUREPYTHON=1``.
"""

import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("TDXVE_DEBUG", "") not in ("", "0")
ANNOTATE = os.environ.get("TDXVE_ANNOTATE", "") not in ("", "0")

directives = {
    "language_level": 3,
    "embedsignature": True,
    "binding": True,
    "cdivision": True,
    # Safety checks are on by default and switched off per hot function with
    # decorators after explicit length checks; the debug build forces them on.
    "boundscheck": True,
    "wraparound": True,
    "initializedcheck": True,
}
if DEBUG:
    directives["overflowcheck"] = True

macros = [
    ("NPY_NO_DEPRECATED_API", "NPY_1_22_API_VERSION"),
    ("TDXVE_DEBUG", "1" if DEBUG else "0"),
]
cflags = ["-O0", "-g"] if DEBUG else ["-O3"]

ext = Extension(
    "tdxve._core",
    ["tdxve/_core.pyx"],
    include_dirs=[np.get_include()],
    define_macros=macros,
    extra_compile_args=cflags + ["-Wall", "-Wno-unused-function", "-Wno-unreachable-code"],
)

setup(
    ext_modules=cythonize(
        [ext],
        compiler_directives=directives,
        annotate=ANNOTATE,
        # Cython's own "override directives" switch the decorators off globally
        # in the debug build so every bounds check runs.
        **({"compile_time_env": {"TDXVE_DEBUG": 1}} if DEBUG else {"compile_time_env": {"TDXVE_DEBUG": 0}}),
    ),
)
