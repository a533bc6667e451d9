"""``tdxve demo``: the report a newcomer reads first.

Checks the facts the report must show (issue 5): the guest's console text,
the #VE/TDVMCALL table, RAX after the PCI read per profile (linux-2022
0xDEADBEEE12378086, linux 0x12378086; ref 6.3), timing, the string-I/O
failure path, the trace file, and that expected guest faults never produce a
traceback.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("unicorn")

from tdxve import demo  # noqa: E402
from tdxve.host import EventLog  # noqa: E402


def run_demo(*argv: str) -> str:
    out = io.StringIO()
    assert demo.main(list(argv), out=out) == 0
    text = out.getvalue()
    assert "Traceback" not in text
    return text


def section(text: str, number: int) -> str:
    start = text.index(f"\n{number}. ")
    end = text.find(f"\n{number + 1}. ", start)
    return text[start:end if end >= 0 else None]


@pytest.fixture(scope="module")
def default_report() -> str:
    return run_demo()


def test_console_text_and_post_codes(default_report: str) -> None:
    s1 = section(default_report, 1)
    assert ("  | tdxve demo guest: 16550 up (Linux earlyprintk init, 9600 8n1)\n"
            "  | CMOS status A = 0x26\n"
            "  | PCI 00:00.0 dword 0 -> RAX = 0x0000000012378086\n") in s1
    assert "  | tdxve demo guest: done, halting\n" in s1
    assert "POST codes (port 0x80): 01 02 03 04 10 20 30 40\n" in s1
    assert "result: halted (HLT)" in default_report


def test_port_table_is_aligned_and_counts_exactly(default_report: str) -> None:
    lines = section(default_report, 2).splitlines()
    header = next(ln for ln in lines if ln.strip().startswith("port"))
    rows = [ln for ln in lines if ln.startswith("  0x")]
    assert len(rows) == 13
    col = header.index("dir")
    assert all(r[col:col + 3] in ("IN ", "OUT") for r in rows)
    ends = {len(r) for r in rows}
    assert len(ends) == 1                                   # right-aligned numbers end together
    assert "  0x03fd  COM1 LSR" in "\n".join(rows)
    total = next(ln for ln in lines if "total" in ln).split()
    assert total[-3:] == ["318", "318", "3"]
    assert "plus 1 HLT #VE (1 TDVMCALL: TDG.VP.VMCALL<HLT>)" in default_report
    assert "real (1) -> protected-16 (1) -> protected-32 (1) -> 64-bit (318)" in default_report


def test_pci_rax_per_profile(default_report: str) -> None:
    s3 = section(default_report, 3)
    assert "profile 'linux' leaves RAX = 0x0000000012378086" in s3
    assert "linux-2022     0xdeadbeee12378086" in s3
    assert "*  linux          0x0000000012378086" in s3
    report = run_demo("--profile", "linux-2022")
    assert "profile 'linux-2022' leaves RAX = 0xdeadbeee12378086" in report
    assert "*  linux-2022     0xdeadbeee12378086" in report
    assert "  | PCI 00:00.0 dword 0 -> RAX = 0xdeadbeee12378086\n" in report


def test_timing_line(default_report: str) -> None:
    s4 = section(default_report, 4)
    assert "319 #VEs and 3 direct accesses in" in s4 and "#VE events/s" in s4


def test_string_io_reject_ends_in_the_early_panic(default_report: str) -> None:
    s5 = section(default_report, 5)
    assert "--string-io reject, path early" in s5
    assert "EarlyPanic: PANIC: early exception 0x14 IP 10:8015 error 0 cr2 0x0" in s5
    assert "rep outsb: 1 #VE, 0 TDVMCALL(s) to port 0x3f8" in s5
    assert "    (nothing)" in s5


def test_string_io_emulate_prints_the_line() -> None:
    s5 = section(run_demo("--string-io", "emulate"), 5)
    assert "    | rep outsb: one instruction, one #VE, the whole line\n" in s5
    assert "rep outsb: 1 #VE, 53 TDVMCALL(s) to port 0x3f8" in s5
    assert "PANIC" not in s5


def test_early_path_reports_the_hlt_panic_without_traceback() -> None:
    report = run_demo("--path", "early")
    assert "result: the guest kernel stopped:" in report
    assert "EarlyPanic: PANIC: early exception 0x14 IP 10:8130 error 0 cr2 0x0" in report
    assert "plus 1 HLT #VE (0 TDVMCALLs" in report


def test_trace_file_is_the_hosts_event_log(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    report = run_demo("--trace", str(trace))
    log = EventLog.load(trace)
    # main guest: 318 port #VEs + 1 HLT, one TDVMCALL each, and 3 direct
    # accesses; string-I/O guest: the POST OUT (its rep outsb never reaches the host)
    events = list(log)
    assert len(events) == 318 + 1 + 3 + 1
    assert sum(e.source == "direct" for e in events) == 3
    assert sum(e.call == "hlt" for e in events) == 1
    assert f"{len(events)} events written to {trace}" in report


def test_bad_option_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit) as ei:
        demo.main(["--profile", "linux-2099"], out=io.StringIO())
    assert ei.value.code == 2


def test_without_unicorn_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    real = demo.importlib.import_module

    def fake(name: str, *a: object) -> object:
        if name == "unicorn":
            raise ImportError("No module named 'unicorn'")
        return real(name, *a)                       # type: ignore[arg-type]

    monkeypatch.setattr(demo.importlib, "import_module", fake)
    assert demo.main([], out=io.StringIO()) == 2
    assert "pip install 'tdxve[unicorn]'" in capsys.readouterr().err


def test_python_m_tdxve_demo(run_python: Any) -> None:
    from tdxve import cli

    if "demo" not in cli.build_parser().format_help():
        pytest.skip("the demo subcommand is not wired into tdxve.cli yet")
    r = run_python("-m", "tdxve", "demo", "--profile", "linux-2022")
    assert "profile 'linux-2022' leaves RAX = 0xdeadbeee12378086" in r.stdout
    assert r.stderr == ""
