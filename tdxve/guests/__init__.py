"""Guest programs shipped with tdxve: x86-64 assembly sources and their bytes.

* :data:`DEMO` (``demo.S``) -- the demo guest: boots from real mode through
  16- and 32-bit protected mode into 64-bit mode, initialises the 16550 the
  way Linux's earlyprintk does, prints a banner, reads CMOS status A and the
  PCI host bridge's vendor/device dword (RAX preloaded with
  0xDEADBEEF00000000), writes POST codes, prints a line on the debug console
  and halts.
* :data:`STRING_IO` (``string_io.S``) -- the failure-path guest: one
  ``rep outsb`` to the UART.

Each :class:`GuestImage` holds the assembled bytes (``*.bin``, rebuilt and
compared by ``tests/test_embed_guests.py`` when binutils is available), where
to load them, the CPU mode to start in, and the addresses of the data the
demo inspects. :meth:`GuestImage.unicorn` builds a ready Unicorn instance.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["GuestImage", "DEMO", "STRING_IO", "GUESTS", "read_source"]


@dataclass(frozen=True)
class GuestImage:
    """An assembled guest program.

    :ivar name: short name (also the file stem of ``<name>.S`` / ``<name>.bin``).
    :ivar description: one line for humans.
    :ivar load_address: linear (= physical) address of the first byte.
    :ivar start_mode: 16 (real mode, Unicorn ``UC_MODE_16``) or 64 (64-bit
        mode, ``UC_MODE_64``).
    :ivar memory_size: RAM mapped from address 0.
    :ivar symbols: offsets of labels from the load address (as ``nm`` reports
        them for the assembled object).
    :ivar until: the label emulation should stop at (``None``: the guest halts).
    """

    name: str
    description: str
    load_address: int
    start_mode: int
    memory_size: int
    symbols: Mapping[str, int] = field(default_factory=dict)
    until: str | None = None

    @property
    def code(self) -> bytes:
        """The assembled bytes (``<name>.bin``)."""
        return resources.files(__name__).joinpath(f"{self.name}.bin").read_bytes()

    @property
    def entry(self) -> int:
        """Where execution starts (the first byte)."""
        return self.load_address

    @property
    def end(self) -> int:
        """The address emulation should stop at: ``until``'s label, or the end
        of the image (not reached: the guest halts first)."""
        if self.until is not None:
            return self.address(self.until)
        return self.load_address + len(self.code)

    def address(self, symbol: str) -> int:
        """Absolute address of a label.

        :raises KeyError: unknown label.
        """
        return self.load_address + self.symbols[symbol]

    def unicorn(self) -> Any:
        """A new ``unicorn.Uc`` with RAM mapped at 0 and the image loaded.

        16-bit images get a ``UC_MODE_16`` instance in real mode (CS = 0);
        64-bit images a ``UC_MODE_64`` instance, RSP at the top of the first
        page below the image.

        :raises ImportError: unicorn is not installed.
        """
        try:
            unicorn: Any = importlib.import_module("unicorn")
            x86_const: Any = importlib.import_module("unicorn.x86_const")
        except ImportError as exc:
            raise ImportError(f"running a guest needs unicorn (pip install 'tdxve[unicorn]'): {exc}") from exc
        mode = unicorn.UC_MODE_16 if self.start_mode == 16 else unicorn.UC_MODE_64
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, mode)
        uc.mem_map(0, self.memory_size, unicorn.UC_PROT_ALL)
        uc.mem_write(self.load_address, self.code)
        if self.start_mode == 64:
            uc.reg_write(x86_const.UC_X86_REG_RSP, self.load_address - 0x10)
        return uc


def read_source(image: GuestImage) -> str:
    """The assembly source of ``image`` (``<name>.S``)."""
    return resources.files(__name__).joinpath(f"{image.name}.S").read_text(encoding="utf-8")


#: The demo guest (demo.S).
DEMO = GuestImage(
    name="demo",
    description="real mode -> 64-bit mode; 16550 earlyprintk, CMOS, PCI 00:00.0, POST, debugcon, HLT",
    load_address=0x8000,
    start_mode=16,
    memory_size=0x200000,
    symbols=MappingProxyType({
        "_start": 0x0, "pm16": 0x23, "pm32": 0x35, "lm64": 0x88, "gdt": 0x1E0,
        "halt": 0x130, "pci_rax": 0x210, "cmos_a": 0x218,
    }),
)

#: The failure-path guest (string_io.S).
STRING_IO = GuestImage(
    name="string_io",
    description="64-bit mode; one rep outsb of a whole line to the UART",
    load_address=0x8000,
    start_mode=64,
    memory_size=0x200000,
    symbols=MappingProxyType({"_start": 0x0, "done": 0x1B, "msg": 0x1E, "msg_end": 0x53}),
    until="done",
)

#: All shipped guests by name.
GUESTS: Mapping[str, GuestImage] = MappingProxyType({g.name: g for g in (DEMO, STRING_IO)})
