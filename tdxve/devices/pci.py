"""PCI configuration mechanism #1 (ports 0xCF8-0xCFF) and PCI functions.

PCI Local Bus Specification 3.0, 3.2.2.3.2 ("Software Generation of
Configuration Transactions"):

* CONFIG_ADDRESS is the 32-bit register at 0xCF8: bit 31 enable, bits 23:16
  bus, 15:11 device, 10:8 function, 7:2 register (dword); bits 30:24 and
  1:0 are reserved and read back 0. Only a dword access to 0xCF8 reaches it;
  "anything other than a DWORD access to CONFIG_ADDRESS is passed through as
  a normal I/O" -- here it reaches nothing: reads all-ones, writes dropped --
  except the byte at 0xCF9, the chipset reset-control register (below).
* CONFIG_DATA is 0xCFC-0xCFF: a byte, word or dword access at 0xCFC + k
  reads/writes config-space bytes ``register*4 + k ..`` of the addressed
  function. With the enable bit clear, or for a function that does not
  exist, reads return all-ones and writes are dropped (master abort).
* A function's 256-byte config space has a write mask and a
  write-1-to-clear mask (as QEMU's ``PCIDevice.wmask``/``w1cmask``): bits
  outside the write mask are read-only (vendor/device ID, class code, header
  type ...), W1C bits are cleared by writing 1.

Reset control at 0xCF9 (Intel PIIX/ICH "RST_CNT"; QEMU ``piix3``/``rcr_write``):
a byte write with bit 2 (RST_CPU) set requests a reset and is counted in
:attr:`PciHost.reset_requests`; otherwise bit 1 (SYS_RST, hard/soft reset
type) is kept. Linux's ``reboot=pci`` writes 0x02 then 0x06.

The default host bridge at 00:00.0 is the i440FX PMC QEMU emulates: vendor
0x8086, device 0x1237, revision 0x02, class 0x060000 -- config dword 0 reads
0x12378086, the value the reference's live measurement shows (ref 6.3).
"""

from __future__ import annotations

from ..errors import InvalidArgumentError

__all__ = ["PciFunction", "PciHost", "type0_wmask", "type0_w1cmask"]

CONFIG_ENABLE = 0x8000_0000
#: CONFIG_ADDRESS bits that exist: enable, bus, device, function, register.
CONFIG_ADDRESS_MASK = 0x80FF_FFFC

RCR_SYS_RST = 0x02
RCR_RST_CPU = 0x04


def type0_wmask() -> bytearray:
    """Write mask of a plain type-0 header as QEMU ``pci_init_wmask`` builds it.

    Writable: command bits 0-6 and 8-10 (I/O, memory, bus master, special
    cycles, MWI, VGA snoop, parity response, SERR#, fast back-to-back, INTx
    disable), cache line size, latency timer, interrupt line, and the
    device-specific area 0x40-0xFF. Everything else (IDs, class, header type,
    BARs, capabilities pointer ...) is read-only.
    """
    m = bytearray(256)
    m[0x04] = 0x7F
    m[0x05] = 0x07
    m[0x0C] = 0xFF
    m[0x0D] = 0xFF
    m[0x3C] = 0xFF
    m[0x40:0x100] = b"\xff" * 0xC0
    return m


def type0_w1cmask() -> bytearray:
    """W1C mask: status bits 8 (master data parity error) and 11-15 (PCI 3.0 6.2.3)."""
    m = bytearray(256)
    m[0x07] = 0xF9
    return m


def _bytes256(name: str, value: bytes | bytearray | None, default: bytearray) -> bytearray:
    if value is None:
        return default
    if not isinstance(value, (bytes, bytearray)) or len(value) != 256:
        raise InvalidArgumentError(f"{name} must be 256 bytes, got {type(value).__name__} "
                                   f"of length {len(value) if isinstance(value, (bytes, bytearray)) else '?'}")
    return bytearray(value)


def _in_space(offset: object, size: object) -> bool:
    return (type(offset) is int and type(size) is int
            and 0 <= offset and 1 <= size and offset + size <= 256)


class PciFunction:
    """One PCI function: a 256-byte config space with write and W1C masks.

    :param vendor_id: 16-bit vendor ID.
    :param device_id: 16-bit device ID.
    :param class_code: 24-bit class code (base class, sub-class, prog-if).
    :param revision: 8-bit revision ID.
    :param header_type: header type byte (bit 7 = multi-function).
    :param subsystem_vendor_id: written at 0x2C (type-0 headers).
    :param subsystem_id: written at 0x2E.
    :param config: full initial config space (256 bytes); when given, the ID
        arguments are ignored and the bytes are used as they are.
    :param wmask: write mask (256 bytes; default :func:`type0_wmask`).
    :param w1cmask: write-1-to-clear mask (default :func:`type0_w1cmask`).
    :raises InvalidArgumentError: a field out of range or a mask of the wrong size.

    State: ``config``, ``wmask``, ``w1cmask`` (bytearray(256) each).
    """

    def __init__(self, vendor_id: int, device_id: int, *, class_code: int = 0, revision: int = 0,
                 header_type: int = 0, subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 config: bytes | bytearray | None = None, wmask: bytes | bytearray | None = None,
                 w1cmask: bytes | bytearray | None = None) -> None:
        for name, val, bits in (("vendor_id", vendor_id, 16), ("device_id", device_id, 16),
                                ("class_code", class_code, 24), ("revision", revision, 8),
                                ("header_type", header_type, 8),
                                ("subsystem_vendor_id", subsystem_vendor_id, 16),
                                ("subsystem_id", subsystem_id, 16)):
            if type(val) is not int or not 0 <= val < (1 << bits):
                raise InvalidArgumentError(f"{name} must be a {bits}-bit unsigned int, got {val!r}")
        if config is None:
            c = bytearray(256)
            c[0:2] = vendor_id.to_bytes(2, "little")
            c[2:4] = device_id.to_bytes(2, "little")
            c[0x08] = revision
            c[0x09:0x0C] = class_code.to_bytes(3, "little")
            c[0x0E] = header_type
            c[0x2C:0x2E] = subsystem_vendor_id.to_bytes(2, "little")
            c[0x2E:0x30] = subsystem_id.to_bytes(2, "little")
        else:
            c = _bytes256("config", config, bytearray(256))
        self._initial = bytes(c)
        self.config = c
        self.wmask = _bytes256("wmask", wmask, type0_wmask())
        self.w1cmask = _bytes256("w1cmask", w1cmask, type0_w1cmask())

    def reset(self) -> None:
        """Restore the initial config space."""
        self.config[:] = self._initial

    @property
    def vendor_id(self) -> int:
        """Config bytes 0-1."""
        return int.from_bytes(self.config[0:2], "little")

    @property
    def device_id(self) -> int:
        """Config bytes 2-3."""
        return int.from_bytes(self.config[2:4], "little")

    def read(self, offset: int, size: int) -> int:
        """``size`` bytes of config space at ``offset``, little-endian.

        :raises InvalidArgumentError: the range leaves the 256-byte space.
        """
        if not _in_space(offset, size):
            raise InvalidArgumentError(f"config read at offset {offset!r} size {size!r} leaves the 256-byte space")
        return int.from_bytes(self.config[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Write through the masks: only writable bits change, W1C bits clear on 1.

        :raises InvalidArgumentError: the range leaves the 256-byte space.
        """
        if not _in_space(offset, size):
            raise InvalidArgumentError(f"config write at offset {offset!r} size {size!r} leaves the 256-byte space")
        c, wm, w1c = self.config, self.wmask, self.w1cmask
        for k in range(size):
            b = (value >> (8 * k)) & 0xFF
            o = offset + k
            wmb = wm[o]
            c[o] = ((c[o] & ~wmb) | (b & wmb)) & ~(b & w1c[o]) & 0xFF

    def __repr__(self) -> str:
        return f"PciFunction({self.vendor_id:04x}:{self.device_id:04x})"


class PciHost:
    """Configuration mechanism #1 host bridge on 0xCF8-0xCFF, with bus 0's functions.

    :param base: first port (default 0xCF8); CONFIG_DATA is ``base + 4``.
    :param host_bridge: put the i440FX host bridge (8086:1237) at 00:00.0.
    :raises InvalidArgumentError: bad ``base``.

    State: ``config_address`` (int), ``rcr`` (reset control byte),
    ``reset_requests`` (int), ``functions`` (dict ``(bus, device, function)``
    -> :class:`PciFunction`; change it through :meth:`add`/:meth:`remove`,
    which keep the decoded-target cache right).
    """

    def __init__(self, *, base: int = 0xCF8, host_bridge: bool = True) -> None:
        if type(base) is not int or not 0 <= base <= 0xFFF8:
            raise InvalidArgumentError(f"PCI host base must be an int in [0, 0xFFF8], got {base!r}")
        self.base = base
        self.functions: dict[tuple[int, int, int], PciFunction] = {}
        self.config_address = 0
        self.rcr = 0
        self.reset_requests = 0
        self._cached_addr = -1              # CONFIG_ADDRESS the cached target below belongs to
        self._cached: tuple[PciFunction | None, int] = (None, 0)
        if host_bridge:
            self.add(0, 0, 0, PciFunction(0x8086, 0x1237, class_code=0x060000, revision=0x02))

    def __getstate__(self) -> dict[str, object]:
        # The decoded-address cache is not device state: pickles (and state
        # comparisons, tdxve.invariants.device_state) leave it out.
        state = dict(self.__dict__)
        state["_cached_addr"] = -1
        state["_cached"] = (None, 0)
        return state

    def reset(self) -> None:
        """CONFIG_ADDRESS and RCR to 0 and every function's config space to its initial bytes."""
        self.config_address = 0
        self.rcr = 0
        for f in self.functions.values():
            f.reset()

    # ------------------------------------------------------------ topology
    @staticmethod
    def _check_bdf(bus: int, device: int, function: int) -> tuple[int, int, int]:
        for name, v, hi in (("bus", bus, 255), ("device", device, 31), ("function", function, 7)):
            if type(v) is not int or not 0 <= v <= hi:
                raise InvalidArgumentError(f"PCI {name} must be an int in [0, {hi}], got {v!r}")
        return bus, device, function

    def add(self, bus: int, device: int, function: int, fn: PciFunction) -> None:
        """Install ``fn`` at ``bus:device.function``.

        :raises InvalidArgumentError: bad address, slot taken, or ``fn`` not a PciFunction.
        """
        key = self._check_bdf(bus, device, function)
        if not isinstance(fn, PciFunction):
            raise InvalidArgumentError(f"expected a PciFunction, got {type(fn).__name__}")
        if key in self.functions:
            raise InvalidArgumentError(f"PCI {bus:02x}:{device:02x}.{function} is already populated")
        self.functions[key] = fn
        self._cached_addr = -1

    def remove(self, bus: int, device: int, function: int) -> PciFunction:
        """Take the function at ``bus:device.function`` out and return it.

        :raises InvalidArgumentError: bad address or nothing there.
        """
        key = self._check_bdf(bus, device, function)
        self._cached_addr = -1
        try:
            return self.functions.pop(key)
        except KeyError:
            raise InvalidArgumentError(f"no PCI function at {bus:02x}:{device:02x}.{function}") from None

    def function(self, bus: int, device: int, function: int) -> PciFunction | None:
        """The function at ``bus:device.function`` or None.

        :raises InvalidArgumentError: bad address.
        """
        return self.functions.get(self._check_bdf(bus, device, function))

    @staticmethod
    def address(bus: int, device: int, function: int, register: int, *, enable: bool = True) -> int:
        """The CONFIG_ADDRESS value for a config-space dword (``register`` is a byte offset).

        :raises InvalidArgumentError: a field out of range.
        """
        PciHost._check_bdf(bus, device, function)
        if type(register) is not int or not 0 <= register <= 0xFF:
            raise InvalidArgumentError(f"register must be a byte offset 0-255, got {register!r}")
        return ((CONFIG_ENABLE if enable else 0) | bus << 16 | device << 11 | function << 8
                | (register & 0xFC))

    def _target(self) -> tuple[PciFunction | None, int]:
        a = self.config_address
        if a == self._cached_addr:
            return self._cached
        if not a & CONFIG_ENABLE:
            t: tuple[PciFunction | None, int] = (None, 0)
        else:
            t = (self.functions.get(((a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 7)), a & 0xFC)
        self._cached_addr = a
        self._cached = t
        return t

    # ------------------------------------------------------------ bus interface
    def read(self, port: int, size: int) -> int:
        """CONFIG_ADDRESS (dword at base), RCR (byte at base+1) or CONFIG_DATA."""
        off = port - self.base
        if off >= 4:
            if off + size > 8:
                raise InvalidArgumentError(f"{size}-byte access at {port:#x} runs past CONFIG_DATA")
            fn, reg = self._target()
            if fn is None:
                return (1 << (8 * size)) - 1                # master abort
            o = reg + off - 4
            return int.from_bytes(fn.config[o:o + size], "little")
        if off == 0 and size == 4:
            return self.config_address
        if off == 1 and size == 1:
            return self.rcr
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        """See :meth:`read`; writes to absent functions or with enable clear are dropped."""
        off = port - self.base
        if off >= 4:
            if off + size > 8:
                raise InvalidArgumentError(f"{size}-byte access at {port:#x} runs past CONFIG_DATA")
            fn, reg = self._target()
            if fn is not None:
                fn.write(reg + off - 4, size, value)
            return
        if off == 0 and size == 4:
            self.config_address = value & CONFIG_ADDRESS_MASK
        elif off == 1 and size == 1:
            if value & RCR_RST_CPU:
                self.reset_requests += 1                    # QEMU rcr_write: reset, RCR unchanged
            else:
                self.rcr = value & RCR_SYS_RST

    def __repr__(self) -> str:
        return f"PciHost(config_address={self.config_address:#010x}, functions={sorted(self.functions)})"
