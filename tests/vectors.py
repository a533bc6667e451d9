"""Readers for the golden vector files in tests/vectors/."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

VECTORS = Path(__file__).parent / "vectors"


class QualVector(NamedTuple):
    code: bytes
    port: int
    exit_qual: int
    instr_len: int
    kind: str
    size: int
    linux: str


def exit_qual_vectors() -> list[QualVector]:
    out = []
    for line in (VECTORS / "exit_quals_6_1.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        code, port, qual, ilen, kind, size, linux = (f.strip() for f in line.split("|"))
        out.append(QualVector(bytes.fromhex(code), int(port, 16), int(qual, 16), int(ilen),
                              kind, int(size), linux))
    return out
