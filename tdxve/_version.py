# This file holds only the version string; setup.py reads it.
__version__ = "0.1.0"
