"""The shipped guest programs: the assembled bytes match their sources.

When GNU binutils (``as`` and ``objcopy``, ``nm`` for the labels) are on
PATH, each ``tdxve/guests/*.S`` is re-assembled and must reproduce the
shipped ``*.bin`` byte for byte, and every label :class:`GuestImage` names
must sit where ``nm`` puts it. Without binutils those tests skip; the
checks below that need no assembler always run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tdxve.guests import DEMO, GUESTS, STRING_IO, GuestImage, read_source

TOOLS = [shutil.which(t) for t in ("as", "objcopy", "objdump", "nm")]
needs_binutils = pytest.mark.skipif(not all(TOOLS), reason="GNU binutils (as, objcopy, objdump, nm) not found")


def assemble(image: GuestImage, tmp: Path) -> tuple[bytes, dict[str, int]]:
    src = tmp / f"{image.name}.S"
    src.write_text(read_source(image), encoding="utf-8")
    obj, binf = tmp / f"{image.name}.o", tmp / f"{image.name}.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True, capture_output=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binf)], check=True,
                   capture_output=True)
    reloc = subprocess.run(["objdump", "-r", str(obj)], capture_output=True, text=True)
    assert "R_X86_64" not in reloc.stdout, "the image must not need a linker"
    nm = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
    labels = {parts[2]: int(parts[0], 16) for parts in (ln.split() for ln in nm.splitlines())
              if len(parts) == 3 and parts[1] == "t"}
    return binf.read_bytes(), labels


@needs_binutils
@pytest.mark.parametrize("name", sorted(GUESTS))
def test_bytes_match_the_source(name: str, tmp_path: Path) -> None:
    image = GUESTS[name]
    code, labels = assemble(image, tmp_path)
    assert code == image.code
    for label, offset in image.symbols.items():
        assert labels[label] == offset, label


def test_images_are_consistent() -> None:
    for image in GUESTS.values():
        assert image.code and image.load_address + len(image.code) <= image.memory_size
        assert image.start_mode in (16, 64)
        assert all(0 <= off <= len(image.code) for off in image.symbols.values())
        assert read_source(image).startswith("# tdxve")
    assert DEMO.end == DEMO.load_address + len(DEMO.code)
    assert STRING_IO.end == STRING_IO.address("done")


def test_demo_data_and_string_io_message() -> None:
    code = DEMO.code
    assert code[DEMO.symbols["pci_rax"]:DEMO.symbols["pci_rax"] + 8] == bytes(8)
    assert code[DEMO.symbols["halt"]] == 0xF4                  # HLT
    assert code[:1] == b"\xfa"                                 # cli, real mode entry
    # the 64-bit GDT entry the far jump into lm64 uses: L = 1, D = 0 (SDM Vol. 3A 5.2.1)
    gdt = DEMO.symbols["gdt"]
    desc = int.from_bytes(code[gdt + 0x20:gdt + 0x28], "little")
    assert desc >> 53 & 1 and not desc >> 54 & 1
    s = STRING_IO
    msg = s.code[s.symbols["msg"]:s.symbols["msg_end"]]
    assert msg.endswith(b"\r\n") and b"rep outsb" in msg
    assert s.code[s.symbols["done"] - 6:s.symbols["done"] - 4] == b"\xf3\x6e"   # rep outsb
