"""The CSV-style command ring, VMM side: packing a batch into ring entries and
reading the PSP's answers back (layout: psp_firmware.mailbox_layout).

Both transports use it: `hv.psp_process.ProcessTransport` over the ring of
its shared-memory mailbox (`Ring(mm, RING_OFF)`), `hv.mailbox.
InProcessTransport` over a private buffer it hands to `Psp.run_ring`
(`Ring(bytearray(RING_ENTRIES * RING_ENTRY_SIZE), 0)`), so that a batch gets
the same answers, and the same ring semantics, through either.

An entry carries in_len (the buffer's real length, clamped to u32) and at
most RE_IN_SIZE bytes of the buffer: the PSP answers INVALID_LENGTH for a
longer one, whatever the command. A command outside u32 becomes 0xFFFFFFFF
(no such command: INVALID_COMMAND).
"""
import struct
import sys
from array import array as _array
from itertools import compress, repeat

from psp_firmware import mailbox_layout as L
from psp_firmware.status import Status

_U32_MAX = 0xFFFF_FFFF
_RING_N, _RE_SIZE = L.RING_ENTRIES, L.RING_ENTRY_SIZE
_RE_IN, _RE_IN_SIZE = L.RE_IN, L.RE_IN_SIZE
_RE_OUT, _RE_OUT_SIZE = L.RE_OUT, L.RE_OUT_SIZE
_RE_OUT_Q = L.RE_OUT // 8                        # u64 index of an entry's out buffer
_RE_WORDS = _RE_SIZE // 4                        # u32 words per ring entry
_RE_ST_IDX, _RE_OL_IDX = L.RE_STATUS // 4, L.RE_OUT_LEN // 4
_RE_QWORDS, _RE_RES_Q = _RE_SIZE // 8, L.RE_STATUS // 8   # u64: status | out_len << 32
_STATUS_MASK, _DONE = L.STATUS_MASK, L.DONE
_INTERNAL_ERROR = int(Status.INTERNAL_ERROR)
RING_BYTES = _RING_N * _RE_SIZE


# -- packing ------------------------------------------------------------------
# One ring entry as a struct: cmd, in_len, status and out_len (zeroed: no
# stale DONE bit), the in buffer ('s': truncated or zero-padded to the in
# area, while in_len keeps the real length so that the PSP answers
# INVALID_LENGTH), the out area (zeroed).
assert (L.RE_CMD, L.RE_IN_LEN) == (0, 4) and L.RE_STATUS % 8 == 0 and \
    L.RE_OUT_LEN == L.RE_STATUS + 4 and L.RE_OUT_LEN + 4 <= _RE_IN and \
    _RE_IN + _RE_IN_SIZE <= _RE_OUT and sys.byteorder == "little" and \
    _RE_OUT % 8 == 0 and _RE_OUT_SIZE % 8 == 0 and _RE_OUT + _RE_OUT_SIZE <= _RE_SIZE and \
    _RE_SIZE % 8 == 0 and L.RING_OFF % 8 == 0
_ENTRY_FMT = "II%dx%ds%dx" % (_RE_IN - 8, _RE_IN_SIZE, _RE_SIZE - _RE_IN - _RE_IN_SIZE)
_STRUCTS = {}                  # precompiled Structs, by (kind, entries[, out_len])


def _cached_struct(key, fmt):
    s = _STRUCTS.get(key)
    if s is None:
        if len(_STRUCTS) >= 32:        # a few common batch sizes stay; bound the rest
            _STRUCTS.clear()
        s = _STRUCTS[key] = struct.Struct(fmt)
    return s


def _ring_struct(k):
    """k whole ring entries (see _ENTRY_FMT)."""
    return _cached_struct(("in", k), "<" + _ENTRY_FMT * k)


def _outs_struct(k, n):
    """The first n bytes of the out buffer of k entries, from entry 0's out buffer."""
    return _cached_struct(("out", k, n), "<" + ("%ds%dx" % (n, _RE_SIZE - n)) * (k - 1) + "%ds" % n)


def _normalize(items):
    """Per-entry clamping of untrusted values (the slow path): a command outside
    u32 becomes 0xFFFFFFFF (no such command), a buffer becomes bytes, in_len is
    clamped to u32 (the in buffer itself is truncated by the struct)."""
    cmds, lens, bufs = [], [], []
    for cmd, buf in items:
        cmd = int(cmd)
        if not 0 <= cmd <= _U32_MAX:
            cmd = _U32_MAX
        if type(buf) is not bytes:
            buf = bytes(buf)
        cmds.append(cmd)
        lens.append(min(len(buf), _U32_MAX))
        bufs.append(buf)
    return cmds, lens, bufs


def _entry_args(cmds, lens, bufs):
    """The arguments of _ring_struct(len(cmds)): cmd, in_len, buffer per entry."""
    args = [None] * (3 * len(cmds))
    args[0::3] = cmds
    args[1::3] = lens
    args[2::3] = bufs
    return args


def _pack_chunks(cmds, lens, bufs):
    """[(entries, packed bytes), ...]: one Struct.pack per RING_ENTRIES chunk."""
    out = []
    for s in range(0, len(cmds), _RING_N):
        e = s + _RING_N
        c = cmds[s:e]
        out.append((len(c), _ring_struct(len(c)).pack(*_entry_args(c, lens[s:e], bufs[s:e]))))
    return out


_STRICT = {"strict": True} if sys.version_info >= (3, 10) else {}


def _pack_ring(items):
    """The ring chunks of a batch, as [(entries, packed bytes), ...].

    Everything is packed before anything is sent, so an item that cannot be
    made a command raises before any command runs (as converting them all
    first did). The fast path is C-level throughout (zip, map, one
    Struct.pack per chunk); a command that is not an int in u32 or a buffer
    that is not bytes/bytearray (struct refuses those) sends the batch
    through _normalize, which clamps as call() does."""
    try:
        cmds, bufs = zip(*items, **_STRICT)
        return _pack_chunks(cmds, list(map(len, bufs)), bufs)
    except (struct.error, TypeError, ValueError, OverflowError):
        pass
    return _pack_chunks(*_normalize(items))


# -- a ring -------------------------------------------------------------------
class Ring:
    """The RING_ENTRIES entries of a ring at `offset` in the writable buffer
    `buf` (a mailbox mmap, or the in-process transport's private mmap).

    `chunks(items)` puts a batch into it a chunk at a time; `pack(items)`
    writes a batch of at most RING_ENTRIES items into it; `load(data)`
    copies in one chunk of _pack_ring; `results(k)` reads back the answers
    of entries 0..k-1. The caller serializes (one batch at a
    time per ring) and calls `release()` before it closes the buffer."""

    __slots__ = ("buf", "off", "_out_off", "r16", "r32", "r64")

    def __init__(self, buf, offset):
        self.buf, self.off = buf, offset
        self._out_off = offset + _RE_OUT
        area = memoryview(buf)[offset:offset + RING_BYTES]
        if len(area) != RING_BYTES:
            area.release()
            raise ValueError(f"a ring of {RING_BYTES} bytes does not fit at offset {offset}")
        # the ring's answers, as native words (the layout is little-endian)
        self.r16, self.r32, self.r64 = area.cast("H"), area.cast("I"), area.cast("Q")
        area.release()

    def views(self):
        return (self.r16, self.r32, self.r64)

    def release(self):
        for v in self.views():
            v.release()

    def pack(self, items):
        """A batch of at most RING_ENTRIES items packed straight into the ring
        (one Struct.pack_into, which zero-fills the entries first: no
        intermediate 64 KiB bytes, no second copy). The same fast path and
        fallback as _pack_ring: it raises (before anything is sent) where
        _pack_ring does."""
        s = _ring_struct(len(items))
        try:
            cmds, bufs = zip(*items, **_STRICT)
            s.pack_into(self.buf, self.off, *_entry_args(cmds, list(map(len, bufs)), bufs))
            return
        except (struct.error, TypeError, ValueError, OverflowError):
            pass
        s.pack_into(self.buf, self.off, *_entry_args(*_normalize(items)))

    def chunks(self, items):
        """Put the list `items` into the ring a chunk (RING_ENTRIES entries at
        most) at a time, yielding each chunk's entry count once it is there
        for the caller to have answered. Every chunk is packed before the
        first is yielded, so a bad item raises before any command runs; a
        batch of one chunk is packed straight into the ring."""
        n = len(items)
        if n <= _RING_N:
            self.pack(items)
            yield n
            return
        for k, data in _pack_ring(items):
            self.load(data)
            yield k

    def load(self, data):
        """One chunk packed by _pack_ring, copied into the ring."""
        off = self.off
        self.buf[off:off + len(data)] = data

    def results(self, k):
        """[(status, out), ...] of ring entries 0..k-1 the PSP has answered."""
        # the usual ring: every entry has the same status word and out_len
        # (NOPs; UPDATE_NPTs that all succeed): one C-level compare of the
        # entries' result words, no per-entry Python
        r64 = self.r64
        words = r64[_RE_RES_Q:k * _RE_QWORDS:_RE_QWORDS]   # status | out_len << 32
        w = words[0]
        if w & _DONE and words == _array("Q", (w,)) * k:
            st, n = w & _STATUS_MASK, w >> 32
            if not n:
                return [(st, b"")] * k
            if n <= _RE_OUT_SIZE:
                # alike outputs too (UPDATE_NPTs that took no new table): compared a
                # column of 8 bytes at a time, answered with one bytes object
                for q in range(_RE_OUT_Q, _RE_OUT_Q + (n + 7) // 8):
                    col = r64[q:k * _RE_QWORDS:_RE_QWORDS]
                    if col != _array("Q", (col[0],)) * k:
                        break
                else:
                    o = self._out_off
                    return [(st, self.buf[o:o + n])] * k
                return list(zip(repeat(st, k), _outs_struct(k, n).unpack_from(self.buf, self._out_off)))
        # general case: mixed statuses or output lengths, or entries not done
        r32 = self.r32
        sts = r32[_RE_ST_IDX:k * _RE_WORDS:_RE_WORDS].tolist()
        ols = r32[_RE_OL_IDX:k * _RE_WORDS:_RE_WORDS].tolist()
        lows = self.r16[_RE_ST_IDX * 2:k * _RE_WORDS * 2:_RE_WORDS * 2].tolist()   # status & MASK
        n = min(max(ols), _RE_OUT_SIZE)
        if n:
            # every entry's first n out bytes in one call; then trim the shorter ones
            outs = list(_outs_struct(k, n).unpack_from(self.buf, self._out_off))
            if min(ols) < n:
                for i in compress(range(k), [m < n for m in ols]):
                    outs[i] = outs[i][:ols[i]]
        else:
            outs = [b""] * k
        if min(sts) < _DONE:                   # some entries were not answered
            for i in compress(range(k), [not s & _DONE for s in sts]):
                lows[i], outs[i] = _INTERNAL_ERROR, b""
        return list(zip(lows, outs))
