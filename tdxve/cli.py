"""Command line: ``python -m tdxve <command>`` (also the ``tdxve`` console script).

Commands:

* ``decode HEX… [--mode 16|32|64] [--dx PORT]`` – decode one port-I/O
  instruction and show the VE info the TDX module would report for it.
* ``qual VALUE`` – explain an I/O exit qualification field by field.
* ``demo [--profile P] [--path early|normal] [--string-io reject|emulate]
  [--trace FILE]`` – run the demo guest under Unicorn (:mod:`tdxve.demo`).

Expected failures (bad bytes, invalid qualifications) print one ``error:``
line and exit with status 2; there is no traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence, TextIO

from . import BACKEND, __version__
from .abi import (
    QUAL_RESERVED_MASK,
    ExitQual,
    ExitReason,
    IoInsn,
    IoKind,
)
from ._backend import core
from .errors import TdxveError

__all__ = ["main", "format_insn", "explain_qual", "parse_hex"]

_ACC = {1: "al", 2: "ax", 4: "eax"}
_SUFFIX = {1: "b", 2: "w", 4: "d"}


def parse_hex(words: Sequence[str]) -> bytes:
    """Instruction bytes from ``"66 ed"``, ``"66ed"``, ``"0x66 0xED"`` or ``"66,ed"``."""
    text = " ".join(words).replace(",", " ")
    parts = [w[2:] if w.lower().startswith("0x") else w for w in text.split()]
    joined = "".join(parts)
    try:
        return bytes.fromhex(joined)
    except ValueError:
        raise TdxveError(f"not hex bytes: {' '.join(words)!r}") from None


def format_insn(insn: IoInsn) -> str:
    """Intel-syntax text of a decoded instruction, e.g. ``rep outsb`` or ``in eax, 0x71``."""
    rep = {0xF3: "rep ", 0xF2: "repne "}.get(insn.rep_prefix, "")
    if insn.kind is IoKind.IN or insn.kind is IoKind.OUT:
        port = f"{insn.port:#04x}" if insn.port is not None else "dx"
        acc = _ACC[insn.size]
        ops = f"{acc}, {port}" if insn.kind is IoKind.IN else f"{port}, {acc}"
        return f"{rep}{insn.kind.name.lower()} {ops}"
    name = ("ins" if insn.kind is IoKind.INS else "outs") + _SUFFIX[insn.size]
    return f"{rep}{name}"


def explain_qual(q: int, out: TextIO) -> bool:
    """Print the field-by-field explanation of ``q``; return whether it is strictly valid."""
    lin: ExitQual = core.decode_exit_qual(q, strict=False)
    try:
        core.decode_exit_qual(q)
        problem = None
    except TdxveError as exc:
        problem = str(exc).split(": ", 1)[-1]
    enc = q & 7
    size_txt = {0: "1 byte", 1: "2 bytes", 3: "4 bytes"}.get(enc, "not used by the SDM")
    rows = [
        ("2:0", f"{enc}", f"size of access: {size_txt}"),
        ("3", f"{int(lin.is_in)}", "direction: IN (read)" if lin.is_in else "direction: OUT (write)"),
        ("4", f"{int(lin.is_string)}", "string instruction (INS/OUTS)" if lin.is_string else "not string"),
        ("5", f"{int(lin.is_rep)}", "REP prefixed" if lin.is_rep else "not REP"),
        ("6", f"{int(lin.is_imm)}", "port is an imm8 operand" if lin.is_imm else "port in DX"),
        ("15:7", f"{(q >> 7) & 0x1FF:#x}", "reserved (0)"),
        ("31:16", f"{lin.port:#06x}", "port number"),
        ("63:32", f"{q >> 32:#x}", "reserved (0)"),
    ]
    out.write(f"exit qualification {q:#018x}  (SDM Vol. 3C Table 27-5)\n")
    out.write(f"  {'bits':>6}  {'value':<8}  meaning\n")
    for bits, val, meaning in rows:
        out.write(f"  {bits:>6}  {val:<8}  {meaning}\n")
    if problem is None:
        out.write("strict decode: valid\n")
    else:
        out.write(f"strict decode: INVALID - {problem}\n")
    if q & QUAL_RESERVED_MASK and problem is None:  # pragma: no cover - strict rejects these
        out.write("  (reserved bits set)\n")
    verdict = "fails with -EIO (string I/O)" if lin.is_string else (
        f"{'IN' if lin.is_in else 'OUT'}, size {lin.size}, port {lin.port:#x}")
    out.write(f"Linux handle_io decode (size = bits 2:0 + 1, port = bits 31:16): {verdict}\n")
    return problem is None


def _cmd_decode(args: argparse.Namespace, out: TextIO) -> int:
    code = parse_hex(args.bytes)
    insn = core.decode_insn(code, args.mode)
    qual, ilen, info = core.exit_info(insn, args.dx)
    used = code[:insn.length]
    out.write(f"instruction  {used.hex(' ').upper()}   {format_insn(insn)}   ({args.mode}-bit mode)\n")
    port = f"imm8 {insn.port:#04x}" if insn.port is not None else f"DX = {args.dx & 0xFFFF:#06x}"
    fields = [
        ("kind", insn.kind.name),
        ("size", f"{insn.size} byte{'s' if insn.size > 1 else ''}"),
        ("port", port),
        ("rep", {0xF3: "F3 (REP)", 0xF2: "F2 (REPNE)"}.get(insn.rep_prefix, "no")),
        ("address size", f"{insn.addr_size}-bit"),
        ("segment", insn.segment.name if insn.segment is not None else "-"),
        ("length", f"{insn.length} byte{'s' if insn.length > 1 else ''} (prefixes included)"),
    ]
    for name, val in fields:
        out.write(f"  {name:<13} {val}\n")
    if len(code) > insn.length:
        out.write(f"  ({len(code) - insn.length} trailing byte(s) ignored)\n")
    out.write("VE info the TDX module reports (TDG.VP.VEINFO.GET)\n")
    reason = ExitReason.IO_INSTRUCTION
    out.write(f"  {'exit reason':<13} {int(reason)} ({reason.name})        RCX\n")
    out.write(f"  {'exit qual':<13} {qual:#018x}          RDX\n")
    out.write(f"  {'GLA / GPA':<13} 0 / 0                       R8 / R9\n")
    out.write(f"  {'instr_len':<13} {ilen:<27} R10[31:0]\n")
    out.write(f"  {'instr_info':<13} {info:#010x}{'':17} R10[63:32]\n")
    out.write("\n")
    explain_qual(qual, out)
    return 0


def _cmd_qual(args: argparse.Namespace, out: TextIO) -> int:
    try:
        q = int(args.value, 0)
    except ValueError:
        raise TdxveError(f"not an integer: {args.value!r}") from None
    core.decode_exit_qual(q, strict=False)      # range check (typed error)
    return 0 if explain_qual(q, out) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tdxve", description="Intel TDX guest port I/O through #VE, modelled bit-exactly.")
    p.add_argument("--version", action="version", version=f"tdxve {__version__} ({BACKEND} core)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("decode", help="decode a port-I/O instruction and show its VE info")
    d.add_argument("bytes", nargs="+", help="instruction bytes in hex, e.g. '66 ed' or 66ed")
    d.add_argument("--mode", type=int, choices=(16, 32, 64), default=64, help="processor mode")
    d.add_argument("--dx", type=lambda s: int(s, 0), default=0, metavar="PORT",
                   help="RDX (the port of the DX forms), e.g. 0x3f8")
    d.set_defaults(func=_cmd_decode)

    q = sub.add_parser("qual", help="explain an I/O exit qualification field by field")
    q.add_argument("value", help="the 64-bit exit qualification, e.g. 0x03fd0008")
    q.set_defaults(func=_cmd_qual)

    # issue 5: the demo (tdxve/demo.py imports unicorn only when it runs).
    from . import demo as _demo

    dm = sub.add_parser("demo", help="run the demo guest under Unicorn through the TDX #VE path")
    _demo.add_arguments(dm)
    dm.set_defaults(func=_demo.command)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    out = out if out is not None else sys.stdout
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args, out)
    except TdxveError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return status
