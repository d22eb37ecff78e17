"""The VMM's PSP driver: typed wrappers around the mailbox.

No validation happens here: this is the untrusted side and may send any
command with any arguments (`raw`, or the typed methods with any values).
Every method returns a `Reply(status, fields)`; nothing raises on a refusal.
"""
import operator
import struct
from collections import namedtuple

from psp_firmware.commands import _IN, Cmd, decode_out, encode, in_fields
from psp_firmware.status import Status, status_name

_Reply = namedtuple("Reply", "status fields")
_STATUS = {int(s): s for s in Status}          # int -> Status member, without Status(...)
_SUCCESS = Status.SUCCESS                      # (a global: Status.SUCCESS is a slow lookup)
_INVALID_COMMAND, _INVALID_PARAM = Status.INVALID_COMMAND, Status.INVALID_PARAM
_U32_MAX = 0xFFFF_FFFF
# UPDATE_NPT's buffer, packed positionally on the NPF path (update_npt_fast)
_UPDATE_NPT = int(Cmd.UPDATE_NPT)
_UPDATE_NPT_IN = struct.Struct(_IN[Cmd.UPDATE_NPT][0])
assert _IN[Cmd.UPDATE_NPT][1] == ("handle", "level", "gpa", "hpa", "attrs", "npages")


class Reply(_Reply):
    @property
    def ok(self):
        return self.status == Status.SUCCESS

    @property
    def name(self):
        return status_name(self.status)

    def __getattr__(self, key):
        try:
            return self.fields[key]
        except KeyError:
            raise AttributeError(key) from None


class PspClient:
    def __init__(self, transport):
        self.transport = transport
        self.commands = 0
        self.refused = 0
        self.by_status = {}
        self.on_refusal = None      # called with every refused Reply a typed method returns

    def _reply(self, cmd, st, out):
        r = _reply(cmd, st, out)
        if st != _SUCCESS and self.on_refusal is not None:
            self.on_refusal(r)
        return r

    def raw(self, cmd, buf):
        """Send any command id with any bytes. Returns ``(status, out_bytes)``
        and never raises for what it is given: a ``cmd`` that is not an int
        (a str, a float, None, a bool) or outside 0..2^32-1 is answered
        INVALID_COMMAND, a ``buf`` that is not a bytes-like object (None, a
        str, an int) INVALID_PARAM, without reaching the PSP (the mailbox
        carries a 32-bit command word and bytes).  Either counts as a
        refused command."""
        if type(cmd) is not int or type(buf) is not bytes or not 0 <= cmd <= _U32_MAX:
            cmd, buf, bad = _normalize(cmd, buf)
            if bad is not None:
                self.commands += 1
                self.refused += 1
                self.by_status[bad] = self.by_status.get(bad, 0) + 1
                return bad, b""
        self.commands += 1
        st, out = self.transport.call(cmd, buf)
        if st != _SUCCESS:
            self.refused += 1
        self.by_status[st] = self.by_status.get(st, 0) + 1
        return st, out

    def call(self, cmd, **fields):
        try:
            buf = encode(cmd, **fields)
        except struct.error as e:   # a value wider than its field: say which command
            raise ValueError(f"{Cmd(cmd).name}: a field does not fit the command buffer "
                             f"({e}); use raw() to send arbitrary bytes") from None
        st, out = self.raw(cmd, buf)
        return self._reply(cmd, st, out)

    # typed helpers (one per command; all arguments are passed through as is)
    def platform_init(self, host_size, fw_base, fw_size):
        return self.call(Cmd.PLATFORM_INIT, host_size=host_size, fw_base=fw_base, fw_size=fw_size)

    def platform_status(self):
        return self.call(Cmd.PLATFORM_STATUS)

    def pool_add(self, hpa, npages):
        return self.call(Cmd.POOL_ADD, hpa=hpa, npages=npages)

    def launch_start(self, vmsa_hpa, policy=0):
        return self.call(Cmd.LAUNCH_START, vmsa_hpa=vmsa_hpa, policy=policy)

    def set_private_memory(self, handle, hpa, npages):
        return self.call(Cmd.SET_PRIVATE_MEMORY, handle=handle, hpa=hpa, npages=npages)

    def launch_update_data(self, handle, gpa, hpa, npages):
        return self.call(Cmd.LAUNCH_UPDATE_DATA, handle=handle, gpa=gpa, hpa=hpa, npages=npages)

    def launch_finish(self, handle):
        return self.call(Cmd.LAUNCH_FINISH, handle=handle)

    def update_npt(self, handle, gpa, hpa, level=1, attrs=3, npages=1):
        return self.call(Cmd.UPDATE_NPT, handle=handle, level=level, gpa=gpa, hpa=hpa,
                         attrs=attrs, npages=npages)

    def update_npt_fast(self, handle, gpa, hpa, level=1, attrs=3, npages=1):
        """update_npt() for the NPF path: None when the PSP answered
        SUCCESS (no Reply is made), else the Reply update_npt() returns. The
        same buffer, errors, counters (through raw()) and on_refusal."""
        try:
            buf = _UPDATE_NPT_IN.pack(handle, level, gpa, hpa, attrs, npages)
        except struct.error as e:   # as call() says it
            raise ValueError(f"UPDATE_NPT: a field does not fit the command buffer "
                             f"({e}); use raw() to send arbitrary bytes") from None
        st, out = self.raw(_UPDATE_NPT, buf)
        return None if st == _SUCCESS else self._reply(_UPDATE_NPT, st, out)

    def unmap(self, handle, gpa, level=1, npages=1):
        return self.call(Cmd.UNMAP, handle=handle, level=level, gpa=gpa, npages=npages)

    def reclaim(self, handle, hpa, npages=1):
        return self.call(Cmd.RECLAIM, handle=handle, hpa=hpa, npages=npages)

    def verify(self, handle):
        return self.call(Cmd.VERIFY, handle=handle)

    def guest_status(self, handle):
        return self.call(Cmd.GUEST_STATUS, handle=handle)

    def decommission(self, handle):
        return self.call(Cmd.DECOMMISSION, handle=handle)

    def rmp_assign(self, handle, gpa, hpa, level=1, npages=1):
        return self.call(Cmd.RMP_ASSIGN, handle=handle, level=level, gpa=gpa, hpa=hpa,
                         npages=npages)

    def rmp_unassign(self, handle, hpa, level=1, npages=1):
        return self.call(Cmd.RMP_UNASSIGN, handle=handle, level=level, hpa=hpa, npages=npages)

    def check_all(self):
        return self.call(Cmd.CHECK_ALL)

    def nop(self):
        return self.call(Cmd.NOP)


def _normalize(cmd, buf):
    """raw()'s arguments as (int, bytes, None), or (.., .., the refusal)."""
    if isinstance(cmd, (bool, float)):
        return cmd, buf, _INVALID_COMMAND
    try:
        cmd = operator.index(cmd)          # an int, an IntEnum, a numpy integer
    except TypeError:
        return cmd, buf, _INVALID_COMMAND
    if not 0 <= cmd <= _U32_MAX:
        return cmd, buf, _INVALID_COMMAND
    if type(buf) is not bytes:
        try:
            buf = memoryview(buf).tobytes()     # bytearray, memoryview, array ...
        except TypeError:
            return cmd, buf, _INVALID_PARAM
    return int(cmd), buf, None


def _reply(cmd, st, out):
    """The Reply to command cmd answered (st, out)."""
    st = _STATUS.get(st, st)
    return Reply(st, decode_out(cmd, out, st))


__all__ = ["PspClient", "Reply", "Cmd", "Status", "in_fields"]
