"""Per-guest PSP state (Guest: handle, root, state, integrity object) and the
integrity modes a guest can use (full, merkle)."""
import hashlib
import logging
import struct


from . import core as _core, mailbox_layout as _layout
from .commands import _IN, _OUT, Cmd, DecodeError, unpack_args
from .integrity import PS, ShadowNpt, FullIntegrity, P
from .status import Status

log = logging.getLogger("psp")

# the mailbox's reply shapes the handlers and the ring share
_Q = struct.Struct("<Q")
_UPDATE_NPT_OUT = struct.Struct(_OUT[Cmd.UPDATE_NPT][0])      # done, tables_used
assert _OUT[Cmd.UPDATE_NPT][1] == ("done", "tables_used")
_SUCCESS = int(Status.SUCCESS)
_NO_RECORD = 0xFFFFFFFF          # csrc/psp_core.h PSP_NO_RECORD
_UPDATE_NPT = int(Cmd.UPDATE_NPT)
_UPDATE_NPT_LEN = struct.calcsize(_IN[Cmd.UPDATE_NPT][0])
assert _IN[Cmd.UPDATE_NPT][1] == ("handle", "level", "gpa", "hpa", "attrs", "npages")


_DONE_OUT = {n: _UPDATE_NPT_OUT.pack(n, 0) for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)}


def _oversize_status(cmd):
    """The mailbox's status for command `cmd` with a buffer longer than a ring
    entry's in area: INVALID_COMMAND for an unknown command, else
    INVALID_LENGTH (every command's input fits a ring entry)."""
    try:
        unpack_args(cmd, bytes(_layout.RE_IN_SIZE + 1))
    except DecodeError as e:
        return int(e.status)
    return int(Status.INVALID_LENGTH)


PLATFORM_UNINIT, PLATFORM_INIT = 0, 1
G_LAUNCHING, G_RUNNING, G_STOPPED = 1, 2, 3
GUEST_STATE_NAMES = {G_LAUNCHING: "launching", G_RUNNING: "running", G_STOPPED: "stopped"}

INTEGRITY_MODES = {"full": FullIntegrity}


def register_integrity_mode(cls):
    INTEGRITY_MODES[cls.mode] = cls
    return cls


from .merkle import MerkleIntegrity  # noqa: E402  (incremental hash tree, the default)

register_integrity_mode(MerkleIntegrity)
DEFAULT_INTEGRITY = "merkle"
_BUILTIN_MODES = (FullIntegrity, MerkleIntegrity)


class _Leaves:
    """The plan of a map whose leaves all sit in one table page: `upper`
    (table, idx, value) writes first (new tables), then leaves value0 +
    i * step at entries idx..idx+n-1 of `table` (maybe a ("new", k) placeholder)."""
    __slots__ = ("upper", "table", "idx", "n", "value0", "step")

    def __init__(self, upper, table, idx, n, value0, step):
        self.upper, self.table, self.idx, self.n, self.value0, self.step = \
            upper, table, idx, n, value0, step


def _leaf_scan(page, idx, n, level):
    """Python twin of psp_leaf_scan: -1, or (i << 1) | overlap for the first
    present entry at idx + i (overlap: level 2 and not a large leaf)."""
    for i, e in enumerate(struct.unpack_from("<%dQ" % n, page, idx * 8)):
        if e & P:
            return (i << 1) | (1 if level == 2 and not e & PS else 0)
    return -1


class _Refuse(Exception):
    """Raised by validation helpers; carries the status to return."""

    def __init__(self, status, out=b""):
        super().__init__(status)
        self.status = status
        self.out = out


def _fast_mode(cls):
    """Does the C fast path serve guests of integrity class `cls`? merkle
    (it checks and keeps the line hashes) and "none" (no digest: isolated)."""
    return cls is MerkleIntegrity or getattr(cls, "mode", None) == "none"


class Guest:
    """A guest's PSP-private state. `rec` (a struct psp_guest, or None) is
    what the C fast path knows of it; the handlers keep it in step."""

    def __init__(self, handle, vmsa, root, integrity_cls, canon, read_u64, mem=None, core=None,
                 dirty=None, ptabs=None, leaf_extra=0):
        self.handle = handle
        self.vmsa = vmsa
        self._state = G_LAUNCHING
        self._mapped = 0
        self.rec = None
        self.npt = ShadowNpt(root, ptabs)
        if _fast_mode(integrity_cls) and ptabs is not None:
            # the C fast path commits ordinary UPDATE_NPTs of this guest
            self.rec = _core.ffi.new("struct psp_guest *")
            self.rec.handle, self.rec.vmsa, self.rec.root = handle, vmsa, root
            self.rec.leaf_extra = leaf_extra     # (isolated: A|D, psp_firmware/isolated.py)
        self.set_integrity(integrity_cls, canon, read_u64, mem, core, dirty, ptabs)
        self.measurement = hashlib.sha256()
        self.final_measurement = b""
        self.stop_reason = None

    def set_integrity(self, cls, canon, read_u64, mem, core, dirty, ptabs):
        """A fresh integrity object of `cls` over the guest's current table.
        The C fast path serves the guest in merkle mode (it keeps merkle's
        line-hash index) and with no digest at all (the isolated design)."""
        if cls is MerkleIntegrity:
            self.integrity = cls(self.npt, canon, read_u64, self.vmsa, mem=mem, core=core,
                                 dirty=dirty, ptabs=ptabs)
        elif cls in _BUILTIN_MODES:
            self.integrity = cls(self.npt, canon, read_u64, self.vmsa, mem=mem, core=core)
        else:
            self.integrity = cls(self.npt, canon, read_u64, self.vmsa)
        self.fast_ok = _fast_mode(cls)
        if self.rec is not None:
            self.rec.digest = 1 if cls is MerkleIntegrity else 0
        self.state = self._state          # the C view follows

    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, value):
        self._state = value
        if self.rec is not None:
            self.rec.accepting = 1 if self.fast_ok and value in (G_LAUNCHING, G_RUNNING) else 0

    @property
    def mapped_pages(self):
        return self.rec.mapped_pages if self.rec is not None else self._mapped

    @mapped_pages.setter
    def mapped_pages(self, value):
        if self.rec is not None:
            self.rec.mapped_pages = value
        else:
            self._mapped = value
