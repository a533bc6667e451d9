"""``python -m tdxve`` entry point."""

import os
import sys

from .cli import main

try:
    status = main()
    sys.stdout.flush()
except BrokenPipeError:
    # Output piped into e.g. `head`: exit quietly like other Unix tools.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    status = 0
sys.exit(status)
