"""The toy guest's devices (docs/guest-abi.md).

- COM1 at 0x3F8: each byte written to the data register is serial output;
  the line status register 0x3FD reads 0x60 (THR empty, transmitter idle) so
  polling guests go straight on.  The other UART registers read 0.
- Port 0xF4: writing a byte ends the run with that exit code.
- VGA text buffer at GPA 0xB8000 (80x25, char + attribute): ordinary guest
  RAM, dumped at exit (`hv boot --vga`).
Other ports read 0xFF and ignore writes.
"""
COM1 = 0x3F8
COM1_LSR = 0x3FD
LSR_IDLE = 0x60
EXIT_PORT = 0xF4
VGA_BASE = 0xB8000
VGA_COLS, VGA_ROWS = 80, 25
VGA_BYTES = VGA_COLS * VGA_ROWS * 2


class Serial:
    """COM1 output: collected bytes, plus an optional sink called per write."""

    def __init__(self, sink=None):
        self.data = bytearray()
        self.sink = sink

    def write(self, byte):
        self.data.append(byte & 0xFF)
        if self.sink is not None:
            self.sink(bytes((byte & 0xFF,)))

    def text(self):
        return self.data.decode("latin-1")


class Devices:
    """Port I/O dispatch.  `port_out` returns True when the run must stop."""

    def __init__(self, serial_sink=None):
        self.serial = Serial(serial_sink)
        self.exit_code = None
        self.port_writes = 0

    def port_out(self, port, size, value):
        self.port_writes += 1
        if port == COM1:
            self.serial.write(value)
            return False
        if port == EXIT_PORT:
            self.exit_code = value & 0xFF
            return True
        return False

    def port_in(self, port, size):
        if port == COM1_LSR:
            return LSR_IDLE
        if COM1 <= port <= COM1 + 7:
            return 0
        return (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0xFF


def vga_rows(raw):
    """80x25 text screen (raw char/attr bytes, VGA_BYTES long) -> 25 strings.

    Characters outside printable ASCII show as spaces; trailing spaces are
    stripped from each row."""
    raw = bytes(raw).ljust(VGA_BYTES, b"\0")
    rows = []
    for r in range(VGA_ROWS):
        line = raw[r * VGA_COLS * 2:(r + 1) * VGA_COLS * 2:2]
        rows.append("".join(chr(c) if 32 <= c < 127 else " " for c in line).rstrip())
    return rows
