"""Build script: one extension, ``tdxve._core``, from ``tdxve/_core.pyx``.

Environment knobs (read here and nowhere else):

* ``TDXVE_DEBUG=1``    – the compile-time constant ``TDXVE_DEBUG`` becomes True:
  the hot functions' ``boundscheck``/``wraparound`` decorators (written as
  ``@cython.boundscheck(TDXVE_DEBUG)``) turn the checks back on, the
  ``if TDXVE_DEBUG:`` invariant blocks in the hot loops are compiled in, and
  the C code is built with ``-O0 -g``.
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
# No overflowcheck even in the debug build: the kernels use deliberate
# modular unsigned arithmetic (0u - flag masks).

macros = [("NPY_NO_DEPRECATED_API", "NPY_1_22_API_VERSION")]
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
        compile_time_env={"TDXVE_DEBUG": DEBUG},
        # Regenerate the C every build: the debug switch changes it without
        # touching the .pyx.
        force=True,
    ),
)
