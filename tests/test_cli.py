"""CLI: python -m tdxve decode / qual (issue 2)."""

from __future__ import annotations

import io

import pytest

import tdxve
from tdxve.cli import format_insn, main, parse_hex


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_decode_shows_instruction_and_ve_info():
    status, text = run("decode", "66", "ed", "--dx", "0x3f8")
    assert status == 0
    assert "in ax, dx" in text
    assert "0x0000000003f80009" in text          # ref 6.1: IN AX,DX port 0x1F0 pattern, here 0x3F8
    assert "30 (IO_INSTRUCTION)" in text and "instr_len     2" in text


def test_decode_string_instruction_reports_instruction_information():
    status, text = run("decode", "f3", "6e", "--dx", "0x3f8")
    assert status == 0 and "rep outsb" in text
    assert "0x0000000003f80030" in text          # ref 6.1 REP OUTSB
    assert f"{(2 << 7) | (3 << 15):#010x}" in text


@pytest.mark.parametrize("words,expect", [(["66ed"], b"\x66\xed"), (["0x66", "0xED"], b"\x66\xed"),
                                          (["66,ed"], b"\x66\xed")])
def test_parse_hex_forms(words, expect):
    assert parse_hex(words) == expect


def test_format_insn():
    assert format_insn(tdxve.decode_insn(b"\xe6\x80")) == "out 0x80, al"
    assert format_insn(tdxve.decode_insn(b"\xe5\x71")) == "in eax, 0x71"
    assert format_insn(tdxve.decode_insn(b"\xf2\x66\x6d")) == "repne insw"


def test_decode_errors_are_one_line_without_traceback(capsys):
    assert run("decode", "90")[0] == 2
    assert "error: not a port-I/O instruction: opcode 0x90" in capsys.readouterr().err
    assert run("decode", "zz")[0] == 2
    assert run("decode", "f0", "ec")[0] == 2
    assert "#UD" in capsys.readouterr().err


def test_qual_explains_fields_and_validity():
    status, text = run("qual", "0x03fd0008")
    assert status == 0 and "direction: IN (read)" in text and "0x03fd" in text
    status, text = run("qual", "0x2")
    assert status == 1 and "INVALID" in text and "OUT, size 3" in text   # ref 1.3: 2 -> size 3


def test_qual_bad_value(capsys):
    assert run("qual", "-5")[0] == 2
    assert run("qual", "nope")[0] == 2


def test_python_dash_m_entry_point(run_python):
    r = run_python("-m", "tdxve", "decode", "e4", "71", check=False)
    assert r.returncode == 0 and "in al, 0x71" in r.stdout and "0x0000000000710048" in r.stdout
