"""Command line: ``python -m tdxve <command>`` (also the ``tdxve`` console script).

Commands:

* ``decode HEX… [--mode 16|32|64] [--dx PORT]`` – decode one port-I/O
  instruction and show the VE info the TDX module would report for it.
* ``qual VALUE`` – explain an I/O exit qualification field by field.
* ``demo [--profile P] [--path early|normal] [--string-io reject|emulate]
  [--trace FILE]`` – run the demo guest under Unicorn (:mod:`tdxve.demo`).
* ``replay FILE [--profile P] [--path early|normal] [--unassigned reply|machine]
  [--strings unroll|string] [--sort ves|port] [--progress auto|always|never]``
  – replay a KVM ``kvm_pio`` trace (:func:`tdxve.trace.read_kvm_pio`) through
  the model and print the #VEs and TDVMCALLs a TDX guest takes, per port.
* ``bench [--quick] [--json FILE] [--dir DIR]`` – run every script in
  ``benchmarks/`` and print one table.

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

    # issue 6: trace replay and the benchmark suite.
    r = sub.add_parser("replay", help="replay a kvm_pio trace: #VEs and TDVMCALLs a TDX guest takes, per port")
    r.add_argument("file", help="trace-cmd / perf / ftrace output with kvm_pio events")
    r.add_argument("--profile", default="linux", help="guest profile (default linux)")
    r.add_argument("--path", choices=("normal", "early"), default="normal", help="#VE path (default normal)")
    r.add_argument("--unassigned", choices=("reply", "machine"), default="reply",
                   help="ports without a device model answer the trace's value (reply, default) "
                        "or all-ones (machine)")
    r.add_argument("--strings", choices=("unroll", "string"), default="unroll",
                   help="count > 1 records: unrolled IN/OUTs as Linux TDX guests do (default), or one INS/OUTS")
    r.add_argument("--instr-len", type=int, default=1, metavar="N", help="instruction length (default 1)")
    r.add_argument("--sort", choices=("ves", "port"), default="ves", help="table order (default: most #VEs first)")
    r.add_argument("--top", type=int, default=0, metavar="N", help="show only the first N ports (0: all)")
    r.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress bar on stderr (auto: files of 8 MiB or more on a terminal)")
    r.set_defaults(func=_cmd_replay)

    b = sub.add_parser("bench", help="run every script in benchmarks/ and print one table")
    b.add_argument("--quick", action="store_true", help="pass --quick to every script (smoke run)")
    b.add_argument("--json", metavar="FILE", help="write every script's results to FILE")
    b.add_argument("--dir", metavar="DIR", help="the benchmarks directory (default: next to the package)")
    b.add_argument("--verbose", action="store_true", help="also show each script's own output")
    b.set_defaults(func=_cmd_bench)
    return p


# ---------------------------------------------------------------- replay (issue 6)
PROGRESS_MIN_BYTES = 8 << 20


def _progress(done: int, total: int, events: int) -> None:
    frac = done / total if total else 1.0
    n = int(frac * 30)
    sys.stderr.write(f"\r[{'#' * n}{'.' * (30 - n)}] {frac * 100:5.1f}%  {events:,} events")
    sys.stderr.flush()


def _cmd_replay(args: argparse.Namespace, out: TextIO) -> int:
    import os

    from .machine import Machine
    from .replay import Replayer, ReplaySummary
    from .trace import iter_kvm_pio

    try:
        size = os.path.getsize(args.file)
    except OSError as exc:
        raise TdxveError(f"cannot read {args.file!r}: {exc.strerror or exc}") from None
    machine = Machine(profile=args.profile, path=args.path)
    rp = Replayer(machine, unassigned=args.unassigned)
    summary = ReplaySummary()
    show = args.progress == "always" or (args.progress == "auto" and size >= PROGRESS_MIN_BYTES
                                          and sys.stderr.isatty())
    try:
        for events, done in iter_kvm_pio(args.file, chunk_events=1 << 18, strings=args.strings,
                                          instr_len=args.instr_len):
            summary.add(events, rp.run(events))
            if show:
                _progress(done, size, summary.total_events)
    except OSError as exc:
        raise TdxveError(f"cannot read {args.file!r}: {exc.strerror or exc}") from None
    finally:
        if show:
            sys.stderr.write("\n")
    bus = machine.host.bus                  # type: ignore[attr-defined]
    rows = summary.rows(bus, sort=args.sort)
    shown = rows[:args.top] if args.top > 0 else rows
    unassigned = ("ports without a device model answer the trace's values" if args.unassigned == "reply"
                  else "ports without a device model read all-ones")
    out.write(f"kvm_pio trace {args.file}: {summary.total_events:,} port-I/O events "
              f"({'string records unrolled' if args.strings == 'unroll' else 'string records as INS/OUTS'})\n")
    out.write(f"model: profile {args.profile}, {args.path} #VE path, {unassigned}\n\n")
    head = ("port", "device", "events", "in", "out", "#VEs", "TDVMCALLs", "faults")
    table = [(f"{r.port:#06x}", r.device, f"{r.events:,}", f"{r.ins:,}", f"{r.outs:,}", f"{r.ves:,}",
              f"{r.tdvmcalls:,}", f"{r.faults:,}") for r in shown]
    table.append(("total", f"{len(rows)} ports", f"{summary.total_events:,}", f"{int(summary.ins.sum()):,}",
                  f"{summary.total_events - int(summary.ins.sum()):,}", f"{summary.total_ves:,}",
                  f"{summary.total_tdvmcalls:,}", f"{int(summary.faulted.sum()):,}"))
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out.write(line(head) + "\n")
    for i, t in enumerate(table):
        if i == len(table) - 1:
            out.write(line(["-" * w for w in widths]) + "\n")
        out.write(line(t) + "\n")
    if args.top > 0 and len(rows) > args.top:
        out.write(f"({len(rows) - args.top} more ports not shown)\n")
    out.write(f"\nA TDX guest (profile {args.profile}) takes {summary.total_ves:,} #VEs and "
              f"{summary.total_tdvmcalls:,} TDVMCALLs for this trace.\n")
    faults = {f.name.lower(): n for f, n in summary.faults.items() if f and n}
    if faults:
        out.write("faults: " + ", ".join(f"{k} {v:,}" for k, v in faults.items())
                  + "  (see docs/replay.md)\n")
    tx = machine.host.uart.output           # type: ignore[attr-defined]
    if tx:
        text = tx[:120].decode("latin-1")
        out.write(f"serial output (COM1): {text!r}{' ...' if len(tx) > 120 else ''}\n")
    return 0


# ---------------------------------------------------------------- bench (issue 6)
_RATE_KEYS = ("events_per_s", "records_per_s", "calls_per_second", "calls_per_s", "elements_per_s")


def _bench_dir(arg: str | None) -> str:
    import os

    if arg:
        if not os.path.isdir(arg):
            raise TdxveError(f"--dir {arg!r} is not a directory")
        return arg
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (os.path.join(here, "benchmarks"), os.path.join(os.getcwd(), "benchmarks")):
        if os.path.isdir(cand):
            return cand
    raise TdxveError("no benchmarks/ directory next to the package or in the current directory; "
                     "run from a source checkout or pass --dir")


def _bench_rows(name: str, doc: dict[str, object]) -> list[tuple[str, str, str, str, str]]:
    # (script, workload, implementation, rate, note) from any script's JSON.
    res = doc.get("results")
    rows_obj = res if isinstance(res, list) else (res.get("rows") if isinstance(res, dict) else doc.get("rows"))
    out: list[tuple[str, str, str, str, str]] = []
    for r in rows_obj if isinstance(rows_obj, list) else []:
        if not isinstance(r, dict):
            continue
        wl = str(r.get("workload", r.get("name", "?")))
        impl = str(r.get("impl", r.get("backend", r.get("implementation", ""))))
        key = next((k for k in _RATE_KEYS if isinstance(r.get(k), (int, float))), None)
        if key is None:
            key = next((k for k, v in r.items() if isinstance(v, (int, float))
                        and (k.endswith("_per_s") or k.endswith("per_second"))), None)
        rate = "-"
        if key is not None:
            v = float(r[key])  # type: ignore[arg-type]
            unit = key.replace("_per_second", "/s").replace("_per_s", "/s")
            rate = (f"{v / 1e6:,.2f} M {unit}" if v >= 1e6 else f"{v / 1e3:,.1f} k {unit}" if v >= 1e3
                    else f"{v:,.1f} {unit}")
        note = str(r.get("note", r.get("what", "")) or "")
        out.append((name, wl, impl, rate, note))
    return out


def _bench_targets(name: str, doc: dict[str, object]) -> list[str]:
    res = doc.get("results")
    targets = doc.get("targets", res.get("targets") if isinstance(res, dict) else None)
    lines = []
    for t in targets if isinstance(targets, list) else []:
        if not isinstance(t, dict):
            continue
        label = t.get("name") or f"{t.get('backend', '')} ratio"
        status = t.get("status") or ("PASS" if t.get("pass") else "FAIL")
        measured, required = t.get("measured", t.get("ratio")), t.get("required", t.get("target"))
        m = f"{measured:.3g}" if isinstance(measured, (int, float)) else str(measured)
        q = f"{required:.3g}" if isinstance(required, (int, float)) else str(required)
        lines.append(f"  {status:<4}  {name}: {label} (measured {m}, required {q})")
    return lines


def _cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    import json
    import os
    import shutil
    import subprocess
    import tempfile

    src = _bench_dir(args.dir)
    scripts = sorted(f for f in os.listdir(src) if f.endswith(".py") and not f.startswith("_"))
    if not scripts:
        raise TdxveError(f"no benchmark scripts in {src}")
    # Scripts put their own checkout first on sys.path. When that checkout is
    # not the tdxve this command runs (e.g. an installed package), they run
    # from a copy in a temporary directory, importing this tdxve instead.
    site = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])))
    rows: list[tuple[str, str, str, str, str]] = []
    targets: list[str] = []
    docs: dict[str, object] = {}
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.abspath(src)
        if not os.path.samefile(os.path.dirname(work), site):
            work = os.path.join(tmp, "benchmarks")
            shutil.copytree(src, work)
        for script in scripts:
            name = script[:-3]
            js = os.path.join(tmp, name + ".json")
            cmd = [sys.executable, os.path.join(work, script), "--json", js] + (["--quick"] if args.quick else [])
            out.write(f"running {script}{' --quick' if args.quick else ''} ...\n")
            out.flush()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, check=False)
            if args.verbose:
                out.write(r.stdout)
                sys.stderr.write(r.stderr)
            if r.returncode != 0 or not os.path.isfile(js):
                failed += 1
                last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
                rows.append((name, "FAILED", f"exit {r.returncode}", "-", last[:80]))
                continue
            with open(js, encoding="utf-8") as f:
                doc = json.load(f)
            docs[name] = doc
            rows += _bench_rows(name, doc) or [(name, "(no rows)", "", "-", "")]
            targets += _bench_targets(name, doc)
    head = ("benchmark", "workload", "implementation", "rate", "note")
    widths = [max(len(h), *(len(t[i]) for t in rows)) for i, h in enumerate(head)]
    widths[4] = min(widths[4], 60)
    out.write("\n" + "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for t in rows:
        cells = [c if i != 4 else c[:60] for i, c in enumerate(t)]
        out.write("  ".join(c.rjust(w) if i == 3 else c.ljust(w)
                            for i, (c, w) in enumerate(zip(cells, widths))).rstrip() + "\n")
    if targets:
        out.write("\ntargets:\n" + "\n".join(targets) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"quick": args.quick, "scripts": scripts, "results": docs,
                       "table": [dict(zip(head, t)) for t in rows]}, f, indent=2)
        out.write(f"\nwrote {args.json}\n")
    if failed:
        out.write(f"\n{failed} benchmark script(s) failed\n")
    return 1 if failed else 0


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
