"""CLI (issue 6): ``tdxve replay FILE`` and ``tdxve bench``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import tdxve
from tdxve.cli import main

SAMPLE = Path(__file__).parent / "data" / "kvm_pio_sample.txt"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_replay_prints_per_port_ves_and_tdvmcalls(capsys):
    status, text = run("replay", str(SAMPLE), "--progress", "never")
    assert status == 0
    assert "336 port-I/O events" in text and "profile linux" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("0x")}
    # port, device, events, in, out, #VEs, TDVMCALLs, faults
    assert rows["0x01f0"][1:] == ["-", "256", "256", "0", "256", "256", "0"]
    assert rows["0x03f8"][1:] == ["uart", "26", "0", "26", "26", "26", "0"]
    assert rows["0x0cfc"][1] == "pci"
    first = [line for line in text.splitlines() if line.startswith("0x")][0]
    assert first.startswith("0x01f0")                       # sorted by #VEs
    assert "takes 336 #VEs and 336 TDVMCALLs" in text
    assert "serial output (COM1): 'Linux version 6.8.0-tdx\\r\\n'" in text
    assert capsys.readouterr().err == ""


def test_replay_progress_bar_and_options(capsys):
    status, text = run("replay", str(SAMPLE), "--progress", "always", "--strings", "string", "--sort", "port",
                       "--top", "3", "--profile", "linux-2022")
    assert status == 0
    err = capsys.readouterr().err
    assert "100.0%" in err and "[" + "#" * 30 + "]" in err
    assert "81 port-I/O events" in text and "faults: string_io 1" in text
    assert [line.split()[0] for line in text.splitlines() if line.startswith("0x")] == ["0x0040", "0x0043", "0x0061"]
    assert "more ports not shown" in text


def test_replay_errors_are_one_line(tmp_path, capsys):
    assert run("replay", str(tmp_path / "missing.txt"))[0] == 2
    assert "error: cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("pio_write at 0x80 size 1 count 1 val 0x1\npio_write at 0x80 size 3 count 1 val 0x1\n")
    assert run("replay", str(bad))[0] == 2
    assert "line 2" in capsys.readouterr().err
    assert run("replay", str(SAMPLE), "--profile", "nope")[0] == 2


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="needs the source tree's benchmarks/")
def test_bench_quick_runs_every_script_and_prints_one_table(tmp_path, run_python):
    js = tmp_path / "bench.json"
    r = run_python("-m", "tdxve", "bench", "--quick", "--dir", str(BENCHMARKS), "--json", str(js), check=False)
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = r.stdout.split("\nbenchmark ", 1)[1]
    for name in scripts:
        assert name in table
    assert "bench_replay" in scripts and "latch_in_out" in table and "targets:" in r.stdout
    doc = json.loads(js.read_text())
    assert sorted(doc["results"]) == scripts and doc["quick"] is True


def test_bench_without_a_directory_is_a_clean_error(tmp_path, capsys):
    assert run("bench", "--dir", str(tmp_path / "nowhere"))[0] == 2
    assert "not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("bench", "--dir", str(empty))[0] == 2


def test_version_still_works():
    with pytest.raises(SystemExit):
        run("--version")
    assert tdxve.__version__
