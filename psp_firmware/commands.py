"""PSP command ids and the binary layout of their buffers.

Every command buffer is a packed little-endian C struct, as in the SEV/CSV
firmware interface. `encode` builds one from keyword fields (the VMM side uses
it); `decode` parses one and raises `DecodeError` (mapped to a status) on any
malformed buffer. Output buffers use the same scheme (`encode_out` /
`decode_out`).
"""
import re
import struct
from enum import IntEnum

from .status import Status


class Cmd(IntEnum):
    PLATFORM_INIT = 0x01
    PLATFORM_STATUS = 0x02
    POOL_ADD = 0x03
    LAUNCH_START = 0x10
    SET_PRIVATE_MEMORY = 0x11
    LAUNCH_UPDATE_DATA = 0x12
    LAUNCH_FINISH = 0x13
    UPDATE_NPT = 0x20
    UNMAP = 0x21
    RECLAIM = 0x22
    RMP_ASSIGN = 0x24       # the rmp design: RMPUPDATE assigning frames to (guest, GPA, size)
    RMP_UNASSIGN = 0x25     # the rmp design: RMPUPDATE back to hypervisor-owned (scrubbed)
    VERIFY = 0x30
    GUEST_STATUS = 0x31
    DECOMMISSION = 0x32
    CHECK_ALL = 0x33
    NOP = 0x3F


class DecodeError(Exception):
    def __init__(self, status, msg):
        super().__init__(msg)
        self.status = status


# name -> (struct format, field names)
_IN = {
    Cmd.PLATFORM_INIT: ("<QQQ", ("host_size", "fw_base", "fw_size")),
    Cmd.PLATFORM_STATUS: ("<", ()),
    Cmd.POOL_ADD: ("<QI", ("hpa", "npages")),
    Cmd.LAUNCH_START: ("<QI", ("vmsa_hpa", "policy")),
    Cmd.SET_PRIVATE_MEMORY: ("<IQI", ("handle", "hpa", "npages")),
    Cmd.LAUNCH_UPDATE_DATA: ("<IQQI", ("handle", "gpa", "hpa", "npages")),
    Cmd.LAUNCH_FINISH: ("<I", ("handle",)),
    Cmd.UPDATE_NPT: ("<IIQQII", ("handle", "level", "gpa", "hpa", "attrs", "npages")),
    Cmd.UNMAP: ("<IIQI", ("handle", "level", "gpa", "npages")),
    Cmd.RECLAIM: ("<IQI", ("handle", "hpa", "npages")),
    Cmd.RMP_ASSIGN: ("<IIQQI", ("handle", "level", "gpa", "hpa", "npages")),
    Cmd.RMP_UNASSIGN: ("<IIQI", ("handle", "level", "hpa", "npages")),
    Cmd.VERIFY: ("<I", ("handle",)),
    Cmd.GUEST_STATUS: ("<I", ("handle",)),
    Cmd.DECOMMISSION: ("<I", ("handle",)),
    Cmd.CHECK_ALL: ("<", ()),
    Cmd.NOP: ("<", ()),
}

_OUT = {
    Cmd.PLATFORM_STATUS: ("<IIIQQQQQQQQ", ("state", "guests", "pool_free", "host_size", "commands",
                                           "frames_hv", "frames_fw", "frames_table", "frames_vmsa",
                                           "frames_private", "frames_mapped")),
    Cmd.LAUNCH_START: ("<I", ("handle",)),
    Cmd.LAUNCH_FINISH: ("<32s", ("measurement",)),
    Cmd.UPDATE_NPT: ("<II", ("done", "tables_used")),
    # VERIFY / CHECK_ALL report the first difference found (zeros if none)
    Cmd.VERIFY: ("<IQIQQ", ("ok", "page_hpa", "entry_index", "expected", "found")),
    Cmd.CHECK_ALL: ("<IIQIQQ", ("checked", "stopped_handle", "page_hpa", "entry_index", "expected", "found")),
    Cmd.GUEST_STATUS: ("<IIQQII32s32s",
                       ("state", "level_mode", "root", "vmsa", "mapped_pages", "table_pages",
                        "digest", "measurement")),
}

ATTR_W = 1   # UPDATE_NPT attrs bit 0: writable
ATTR_X = 2   # bit 1: executable (clear => NX)
ATTR_RWX = ATTR_W | ATTR_X
ATTR_VALID = ATTR_RWX

LEVEL_4K = 1
LEVEL_2M = 2

MAX_NPAGES = 1 << 20


# precompiled layouts: cmd -> (Struct, field names)
_IN_STRUCT = {c: (struct.Struct(f), n) for c, (f, n) in _IN.items()}
_OUT_STRUCT = {c: (struct.Struct(f), n) for c, (f, n) in _OUT.items()}


def encode(cmd, **fields) -> bytes:
    try:
        s, names = _IN_STRUCT[cmd]
    except KeyError:
        raise ValueError(f"{cmd!r} is not a valid Cmd") from None
    return s.pack(*[fields[n] for n in names])


def unpack_args(cmd, buf) -> tuple:
    """The command's fields, in layout order; DecodeError (with the status to
    return) for an unknown command, a buffer that is not bytes, or a wrong
    length. Any object may come in: this is the firmware's input."""
    try:
        layout = _IN_STRUCT.get(cmd)
    except TypeError:           # unhashable: not a command id
        layout = None
    if layout is None:
        raise DecodeError(Status.INVALID_COMMAND, f"unknown command {cmd!r}")
    s = layout[0]
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise DecodeError(Status.INVALID_PARAM, "command buffer is not bytes")
    if len(buf) != s.size:
        raise DecodeError(Status.INVALID_LENGTH,
                          f"{Cmd(cmd).name} buffer is {len(buf)} bytes, expected {s.size}")
    return s.unpack(buf)


def decode(cmd, buf) -> dict:
    """unpack_args() as a dict of field name -> value."""
    values = unpack_args(cmd, buf)
    return dict(zip(_IN_STRUCT[cmd][1], values))


def encode_out(cmd, **fields) -> bytes:
    fmt, names = _OUT[Cmd(cmd)]
    codes = re.findall(r"\d*[A-Za-z]", fmt)
    return struct.pack(fmt, *(fields.get(n, b"" if c.endswith("s") else 0)
                              for n, c in zip(names, codes)))


def decode_out(cmd, buf, status=0) -> dict:
    """Parse an output buffer. An INTEGRITY_FAILURE from any command that
    checks the table carries the VERIFY layout (where the tamper is)."""
    if status == Status.INTEGRITY_FAILURE and cmd != Cmd.CHECK_ALL:
        cmd = Cmd.VERIFY
    layout = _OUT_STRUCT.get(cmd)
    if layout is None or not buf or len(buf) != layout[0].size:
        return {}
    return dict(zip(layout[1], layout[0].unpack(buf)))


def in_fields(cmd):
    return _IN[Cmd(cmd)][1]
