"""The PSP firmware: one handler per command, behind one mailbox entry point.

Every handler follows the same shape (as TF-RMM's RMI handlers and the TDX
module's api_calls): it validates every argument against PSP private state
first, returning a status at the first failure with nothing changed; then
the line `# ---- all checks passed: commit ----` marks the point after which
it only writes, and cannot fail.

The VMM reaches the firmware only through `Psp.mailbox(cmd, buf)`: a command
id and a packed command buffer in, a status and an output buffer out. It
never raises. Commands are serialized by a lock, as the real mailbox
serializes them.
"""
import errno
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
import weakref

from nptcore import get_engine
from nptcore.bits import GPA_LIMIT

from . import core as _core
from . import mailbox_layout as _layout
from .commands import (_IN, _OUT, ATTR_VALID, ATTR_W, ATTR_X, MAX_NPAGES, Cmd, DecodeError,
                       encode_out, in_fields, unpack_args)
from .frames import F, FrameTable
from .integrity import (AD, ADDR, NX, PAGE, PS, ShadowNpt, FullIntegrity, P, U, W, index,
                        level_size)
from .status import Status

log = logging.getLogger("psp")

_Q = struct.Struct("<Q")
_UPDATE_NPT_OUT = struct.Struct(_OUT[Cmd.UPDATE_NPT][0])      # done, tables_used
assert _OUT[Cmd.UPDATE_NPT][1] == ("done", "tables_used")
_SUCCESS = int(Status.SUCCESS)
_NO_RECORD = 0xFFFFFFFF          # csrc/psp_core.h PSP_NO_RECORD
_UPDATE_NPT = int(Cmd.UPDATE_NPT)
_UPDATE_NPT_LEN = struct.calcsize(_IN[Cmd.UPDATE_NPT][0])
assert _IN[Cmd.UPDATE_NPT][1] == ("handle", "level", "gpa", "hpa", "attrs", "npages")
_SCRUB_MADVISE_MIN = 16 * PAGE       # as csrc/psp_core.c: smaller ranges are written
_SCRUB_ADVICE = {"auto": None, "write": 0, "dontneed": mmap.MADV_DONTNEED,
                 "remove": mmap.MADV_REMOVE}


HOLE_NONE, HOLE_SEEK, HOLE_PAGEMAP = 0, 1, 2        # struct psp_ctx.hole_kind
_HOLE_NAMES = {HOLE_NONE: "none", HOLE_SEEK: "seek_data", HOLE_PAGEMAP: "pagemap"}
_PM_DATA = (1 << 63) | (1 << 62)          # pagemap: present | swapped


def _buffer_address(membuf):
    import ctypes
    export = ctypes.c_char.from_buffer(membuf)
    try:
        return ctypes.addressof(export)
    finally:
        del export


def _mapping_of(membuf):
    """The /proc/self/maps fields of the mapping that holds `membuf` (an
    mmap object), or None: not an mmap, or /proc/self/maps cannot tell."""
    if not isinstance(membuf, mmap.mmap) or len(membuf) == 0:
        return None
    try:
        addr = _buffer_address(membuf)
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= addr < hi:
                    return parts if len(parts) >= 5 and len(parts[1]) >= 4 else None
    except (OSError, ValueError, TypeError, IndexError):
        pass
    return None


def scrub_mode_for(membuf, mapping=False):
    """How frames of `membuf` can be zeroed: "dontneed" for a private
    anonymous mmap (MADV_DONTNEED makes it demand-zero), "remove" for a
    shared mapping (MADV_REMOVE punches the pages out of the memfd or file),
    "write" for anything else: a private file mapping (DONTNEED would bring
    the file's bytes back), a buffer that is not an mmap object (its pages
    may hold other objects), or when /proc/self/maps cannot tell.
    mapping: _mapping_of(membuf), if the caller has it."""
    parts = _mapping_of(membuf) if mapping is False else mapping
    if parts is None:
        return "write"
    if parts[1][3] == "s":
        return "remove"
    return "dontneed" if int(parts[4]) == 0 else "write"


def hole_probe_for(membuf, mem_fd=None, mapping=False):
    """(hole_kind, fd) for psp_scrub_probe: how the PSP can tell, without
    touching a page of `membuf`, that it still reads as zero.

    HOLE_SEEK with a dup of mem_fd when mem_fd is a memfd that `membuf`
    maps shared from offset 0 (the same inode, per /proc/self/maps: a VMM
    that passes one file and maps another gets no probe); HOLE_PAGEMAP with
    /proc/self/pagemap for a private anonymous mapping; else (HOLE_NONE, -1):
    every page is compared (files: their holes are the filesystem's to
    report, and a private file mapping's are the file's bytes).
    mapping: _mapping_of(membuf), if the caller has it."""
    parts = _mapping_of(membuf) if mapping is False else mapping
    if parts is None:
        return HOLE_NONE, -1
    shared, offset, inode = parts[1][3] == "s", int(parts[2], 16), int(parts[4])
    try:
        if mem_fd is not None:
            st = os.fstat(mem_fd)
            target = os.readlink(f"/proc/self/fd/{mem_fd}")
            if shared and offset == 0 and st.st_ino == inode and target.startswith("/memfd:"):
                fd = os.dup(mem_fd)
                try:
                    os.lseek(fd, 0, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:       # ENXIO: all holes, the probe works
                        os.close(fd)
                        return HOLE_NONE, -1
                return HOLE_SEEK, fd
            return HOLE_NONE, -1
        if not shared and inode == 0 and offset == 0:
            return HOLE_PAGEMAP, os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pass
    return HOLE_NONE, -1


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


class Guest:
    """A guest's PSP-private state. `rec` (a struct psp_guest, or None) is
    what the C fast path knows of it; the handlers keep it in step."""

    def __init__(self, handle, vmsa, root, integrity_cls, canon, read_u64, mem=None, core=None,
                 dirty=None, ptabs=None):
        self.handle = handle
        self.vmsa = vmsa
        self._state = G_LAUNCHING
        self._mapped = 0
        self.rec = None
        self.npt = ShadowNpt(root, ptabs)
        if integrity_cls is MerkleIntegrity and ptabs is not None:
            # the C fast path commits ordinary UPDATE_NPTs of this guest
            self.rec = _core.ffi.new("struct psp_guest *")
            self.rec.handle, self.rec.vmsa, self.rec.root = handle, vmsa, root
        self.set_integrity(integrity_cls, canon, read_u64, mem, core, dirty, ptabs)
        self.measurement = hashlib.sha256()
        self.final_measurement = b""
        self.stop_reason = None

    def set_integrity(self, cls, canon, read_u64, mem, core, dirty, ptabs):
        """A fresh integrity object of `cls` over the guest's current table.
        The C fast path serves the guest only in merkle mode (it keeps
        merkle's line-hash index)."""
        if cls is MerkleIntegrity:
            self.integrity = cls(self.npt, canon, read_u64, self.vmsa, mem=mem, core=core,
                                 dirty=dirty, ptabs=ptabs)
        elif cls in _BUILTIN_MODES:
            self.integrity = cls(self.npt, canon, read_u64, self.vmsa, mem=mem, core=core)
        else:
            self.integrity = cls(self.npt, canon, read_u64, self.vmsa)
        self.fast_ok = cls is MerkleIntegrity
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


class Psp:
    def __init__(self, membuf, backend=None, integrity=DEFAULT_INTEGRITY, core=None,
                 scrub="auto", fast=None, mem_fd=None, holes=None):
        """fast: use the C core's UPDATE_NPT fast path (csrc/psp_core.c) for
        merkle guests; None: yes unless HV_PSP_FAST=0 (for A/B comparisons
        and tests; statuses, bytes and digests are the same either way).
        scrub: how a frame is zeroed. "write" writes zeros (any buffer);
        "dontneed" (a private anonymous mmap) and "remove" (a shared mmap of
        a memfd or file) hand the pages back with madvise(), so they read as
        zero without being faulted in now; if the kernel refuses, zeros are
        written (and always for ranges under 16 pages, where a madvise costs
        more than it saves). "auto" (the default) picks by what /proc/self/maps says the
        buffer is (scrub_mode_for); anything it cannot tell gets "write".
        mem_fd: the memfd `membuf` maps (shared, from offset 0), if it is
        one; the PSP keeps its own dup of it. holes: let a scrub skip pages
        the kernel says already read as zero (never allocated, or given back
        by an earlier scrub) instead of faulting them in to compare: SEEK_DATA
        on mem_fd for a memfd, /proc/self/pagemap for a private anonymous
        mapping (hole_probe_for). None: yes unless HV_PSP_HOLES=0."""
        if integrity not in INTEGRITY_MODES:
            raise ValueError(f"unknown integrity mode {integrity!r} (have {sorted(INTEGRITY_MODES)})")
        if scrub not in _SCRUB_ADVICE:
            raise ValueError(f"unknown scrub mode {scrub!r} (have {sorted(_SCRUB_ADVICE)})")
        if holes is None:
            holes = os.environ.get("HV_PSP_HOLES", "1") != "0"
        mapping = _mapping_of(membuf) if scrub == "auto" or holes else None
        if scrub == "auto":
            scrub = scrub_mode_for(membuf, mapping)
        self.scrub = scrub
        self._scrub_advice = _SCRUB_ADVICE[scrub]
        self._mem = membuf
        self._hole_kind, self._hole_fd = (hole_probe_for(membuf, mem_fd, mapping) if holes
                                          else (HOLE_NONE, -1))
        self.holes = _HOLE_NAMES[self._hole_kind]
        if self._hole_fd >= 0:
            weakref.finalize(self, os.close, self._hole_fd)
        # the C core (csrc/psp_core.c) or None: the Python twin. Same results.
        self._c = _core.resolve(core)
        self.core = "c" if self._c is not None else "python"
        if fast is None:
            fast = os.environ.get("HV_PSP_FAST", "1") != "0"
        self.fast = bool(fast) and self._c is not None
        self._memc = (_core.ffi.from_buffer(membuf, require_writable=True)
                      if self._c is not None else None)
        self._eng = get_engine(membuf, backend)
        self._integrity_cls = INTEGRITY_MODES[integrity]
        self._platform = PLATFORM_UNINIT
        self._frames = None
        self._dirty = None      # per-frame stale merkle chunk masks (PLATFORM_INIT)
        self._ptabs = None      # per-frame shadow / line-hash pointers, C core only
        self._ctx = None        # struct psp_ctx: the C fast path's view of the state
        self._guests = {}
        self._next_handle = 1
        self._pool = []
        self._commands = 0
        self._lock = threading.Lock()
        self._handlers = {
            Cmd.PLATFORM_INIT: self.cmd_platform_init,
            Cmd.PLATFORM_STATUS: self.cmd_platform_status,
            Cmd.POOL_ADD: self.cmd_pool_add,
            Cmd.LAUNCH_START: self.cmd_launch_start,
            Cmd.SET_PRIVATE_MEMORY: self.cmd_set_private_memory,
            Cmd.LAUNCH_UPDATE_DATA: self.cmd_launch_update_data,
            Cmd.LAUNCH_FINISH: self.cmd_launch_finish,
            Cmd.UPDATE_NPT: self.cmd_update_npt,
            Cmd.UNMAP: self.cmd_unmap,
            Cmd.RECLAIM: self.cmd_reclaim,
            Cmd.VERIFY: self.cmd_verify,
            Cmd.GUEST_STATUS: self.cmd_guest_status,
            Cmd.DECOMMISSION: self.cmd_decommission,
            Cmd.CHECK_ALL: self.cmd_check_all,
            Cmd.NOP: self.cmd_nop,
        }
        # every handler takes the command's fields positionally, in layout order
        for cmd, handler in self._handlers.items():
            code = handler.__code__
            assert code.co_varnames[1:code.co_argcount] == in_fields(cmd), cmd

    # ------------------------------------------------------------------
    # the mailbox
    def mailbox(self, cmd, buf):
        with self._lock:
            self._commands += 1
            handler = None
            if cmd == _UPDATE_NPT and self._ctx is not None and type(buf) is bytes \
                    and len(buf) == _UPDATE_NPT_LEN:
                # an ordinary UPDATE_NPT goes straight to the C fast path, the
                # same psp_update_fast cmd_update_npt starts with; if it
                # declines (nothing changed), decode and dispatch as usual
                done = self._c.psp_mailbox_update(self._ctx, buf)
                if done == 0:
                    # declined (nothing changed): straight to the general path,
                    # without cmd_update_npt asking C a second time
                    handler = self._update_npt_general
                elif done != _NO_RECORD:
                    out = _DONE_OUT.get(done)
                    return _SUCCESS, out if out is not None else _UPDATE_NPT_OUT.pack(done, 0)
            try:
                args = unpack_args(cmd, buf)
                if handler is None:
                    handler = self._handlers.get(cmd)
                if handler is None:
                    return int(Status.INVALID_COMMAND), b""
                st, out = handler(*args)
            except DecodeError as e:
                return int(e.status), b""
            except _Refuse as r:
                return int(r.status), r.out
            except Exception:   # a firmware bug: report it, never crash the caller
                log.exception("PSP internal error on command %r", cmd)
                return int(Status.INTERNAL_ERROR), b""
            return int(st), out

    def run_ring(self, ring, n, progress=None, before_entry=None):
        """Answer a CSV-style ring of `n` commands in place (one wake-up).

        `ring` is a writable buffer laid out as psp_firmware.mailbox_layout's
        ring entries (RING_ENTRY_SIZE bytes each: cmd, in_len, status,
        out_len, in buffer, out buffer). Each entry is answered exactly as
        `mailbox(cmd, in buffer)` would: its status word gets DONE set.
        `progress`, if given, is a writable u32 memoryview whose element 0
        is set to the count of entries answered so far (the VMM's timeout
        watches it). `before_entry`, if given, is called before each entry
        is read (the PSP process's test hooks count and crash there); the
        entries then go one by one through the mailbox. Returns the ns spent
        in firmware handlers."""
        from . import mailbox_layout as L
        if not 0 <= n <= len(ring) // L.RING_ENTRY_SIZE:
            raise ValueError(f"ring of {n} entries does not fit the buffer")
        if self._ctx is None or n == 0 or before_entry is not None:
            return self._run_ring_py(ring, 0, n, progress, L, before_entry)
        # C: psp_ring_fast answers the run of ordinary UPDATE_NPTs; any other
        # entry (or one it declines) goes through the mailbox, then C resumes
        ffi = _core.ffi
        ringc = ffi.from_buffer(ring, require_writable=True)
        progc = (ffi.from_buffer("uint32_t[]", progress, require_writable=True)
                 if progress is not None else ffi.NULL)
        fast, ctx, lock = self._c.psp_ring_fast, self._ctx, self._lock
        ns = time.perf_counter_ns
        fw = 0
        i = 0
        while i < n:
            t0 = ns()
            with lock:
                j = fast(ctx, ringc, i, n, progc)
                self._commands += j - i
            fw += ns() - t0
            if j >= n:
                break
            fw += self._run_ring_py(ring, j, j + 1, progress, L)
            i = j + 1
        return fw

    def _run_ring_py(self, ring, start, n, progress, L, before_entry=None):
        ns = time.perf_counter_ns
        mailbox = self.mailbox
        entry_unpack = L.ENTRY_HDR.unpack_from
        result_pack = L.ENTRY_RESULT.pack_into
        size, re_in, re_in_size = L.RING_ENTRY_SIZE, L.RE_IN, L.RE_IN_SIZE
        re_out, re_out_size, re_status = L.RE_OUT, L.RE_OUT_SIZE, L.RE_STATUS
        done, mask = L.DONE, L.STATUS_MASK
        fw = 0
        for i in range(start, n):
            e = i * size
            if before_entry is not None:
                before_entry()
            cmd, in_len = entry_unpack(ring, e)
            if in_len > re_in_size:
                # the entry cannot hold its buffer: answered and counted as the
                # mailbox answers that length (no command takes that much input)
                with self._lock:
                    self._commands += 1
                st, out = _oversize_status(cmd), b""
            else:
                buf = bytes(ring[e + re_in:e + re_in + in_len])   # a copy: the VMM may race us
                t0 = ns()
                st, out = mailbox(cmd, buf)
                fw += ns() - t0
                if len(out) > re_out_size:
                    st, out = int(Status.INTERNAL_ERROR), b""
                elif out:
                    ring[e + re_out:e + re_out + len(out)] = out
            result_pack(ring, e + re_status, (st & mask) | done, len(out))
            if progress is not None:
                progress[0] = i + 1
        return fw

    # ------------------------------------------------------------------
    # memory helpers (host memory is the VMM's: read it, never trust it)
    def _read_u64(self, hpa):
        return _Q.unpack_from(self._mem, hpa)[0]

    def _write_u64(self, hpa, value):
        _Q.pack_into(self._mem, hpa, value)

    def _scrub(self, hpa, nbytes):
        if hpa < 0 or nbytes < 0 or hpa + nbytes > len(self._mem):
            raise ValueError("scrub outside host memory")
        if self._c is not None:
            # C: madvise when the mapping allows (see __init__), else zero a
            # page at a time, skipping holes and pages that already read as zero
            self._c.psp_scrub_probe(self._memc, hpa, nbytes, self._scrub_advice,
                                    self._hole_kind, self._hole_fd)
            return
        if self._scrub_advice and nbytes >= _SCRUB_MADVISE_MIN and not hpa % mmap.PAGESIZE \
                and not nbytes % mmap.PAGESIZE:
            try:
                self._mem.madvise(self._scrub_advice, hpa, nbytes)
                return
            except (AttributeError, OSError, ValueError):
                pass
        for lo, hi in self._data_ranges(hpa, nbytes):
            self._mem[lo:hi] = bytes(hi - lo)

    def _data_ranges(self, hpa, nbytes):
        """Python twin of psp_scrub_probe's hole probe: the [lo, hi) parts of
        [hpa, hpa+nbytes) that may hold data (all of it when there is no probe
        or it fails); holes already read as zero."""
        end = hpa + nbytes
        if not self._hole_kind or hpa % PAGE or nbytes % PAGE:
            return [(hpa, end)] if nbytes else []
        out, pos = [], hpa
        try:
            if self._hole_kind == HOLE_SEEK:
                while pos < end:
                    try:
                        d = os.lseek(self._hole_fd, pos, os.SEEK_DATA)
                    except OSError as e:
                        if e.errno == errno.ENXIO:
                            return out
                        raise
                    if d >= end:
                        return out
                    if d < pos or d % PAGE:
                        break
                    out.append((d, d + PAGE))
                    pos = d + PAGE
            else:
                base = _buffer_address(self._mem) // PAGE
                while pos < end:
                    k = min((end - pos) // PAGE, 64)
                    raw = os.pread(self._hole_fd, 8 * k, (base + pos // PAGE) * 8)
                    if len(raw) != 8 * k:
                        break
                    for i, e in enumerate(struct.unpack("<%dQ" % k, raw)):
                        if e & _PM_DATA:
                            out.append((pos + i * PAGE, pos + (i + 1) * PAGE))
                    pos += k * PAGE
        except OSError:
            pass
        if pos < end:
            out.append((pos, end))
        return out

    # ------------------------------------------------------------------
    # validation helpers: raise _Refuse, change nothing
    def _need_platform(self):
        if self._platform != PLATFORM_INIT:
            raise _Refuse(Status.INVALID_PLATFORM_STATE)

    def _guest(self, handle, states=(G_LAUNCHING, G_RUNNING)):
        self._need_platform()
        g = self._guests.get(handle)
        if g is None:
            raise _Refuse(Status.INVALID_HANDLE)
        if g.state == G_STOPPED and G_STOPPED not in states:
            raise _Refuse(Status.GUEST_STOPPED)
        if g.state not in states:
            raise _Refuse(Status.INVALID_GUEST_STATE)
        return g

    def _check(self, status):
        if status != Status.SUCCESS:
            raise _Refuse(status)

    def _check_npages(self, npages):
        if not 1 <= npages <= MAX_NPAGES:
            raise _Refuse(Status.INVALID_PARAM)

    def _check_gpa_range(self, gpa, nbytes, align):
        if gpa % align:
            raise _Refuse(Status.MISALIGNED)
        if gpa >= GPA_LIMIT:
            raise _Refuse(Status.OUT_OF_RANGE)
        if gpa + nbytes > GPA_LIMIT:
            raise _Refuse(Status.RANGE_OVERFLOW)

    def _check_hpa_range(self, hpa, nbytes, align=PAGE):
        if hpa % align:
            raise _Refuse(Status.MISALIGNED)
        self._check(self._frames.check_range(hpa, nbytes))

    def _verify_or_stop(self, g, gpa=None, level=None, npages=1):
        """Patent step 3; on a mismatch the guest becomes fatal."""
        mm = g.integrity.check_before_update(gpa, level, npages)
        if mm is not None:
            self._stop_guest(g, mm)
            raise _Refuse(Status.INTEGRITY_FAILURE, self._mismatch_out(Cmd.VERIFY, mm))

    def _stop_guest(self, g, mm):
        g.state = G_STOPPED
        g.stop_reason = mm
        log.warning("guest %d stopped: %s at page %#x entry %d expected %#x found %#x",
                    g.handle, mm.what, mm.page_hpa, mm.index, mm.expected, mm.found)

    @staticmethod
    def _mismatch_out(cmd, mm, **extra):
        return encode_out(cmd, ok=0, page_hpa=mm.page_hpa, entry_index=mm.index,
                          expected=mm.expected, found=mm.found, **extra)

    def _take_tables(self, g, levels):
        """Commit-time: move pool frames to TABLE(g) and zero them."""
        hpas = []
        for lvl in levels:
            hpa = self._pool.pop()
            self._scrub(hpa, PAGE)
            self._frames.set(hpa // PAGE, F.TABLE, g.handle)
            g.npt.add_page(hpa, lvl)
            hpas.append(hpa)
        return hpas

    def _apply_writes(self, g, writes, new_tables):
        """Commit-time: write planned entries to host memory and the shadow.

        `writes` is a list of (table, idx, value), or a _Leaves (the plan of a
        range inside one leaf table: its upper writes, then n leaves)."""
        def real(x):
            return new_tables[x[1]] if isinstance(x, tuple) else x
        modified = {}           # table hpa -> the 64-byte lines written
        leaves = None
        if type(writes) is _Leaves:
            leaves = writes
            writes = leaves.upper
        for table, idx, value in writes:
            t = real(table)
            v = (real(value) | P | W | U) if isinstance(value, tuple) else value
            self._write_u64(t + idx * 8, v)
            g.npt.set_entry(t, idx, v)
            modified.setdefault(t, set()).add(idx >> 3)
        if leaves is not None:
            t = real(leaves.table)
            idx, n, v0, step = leaves.idx, leaves.n, leaves.value0, leaves.step
            if self._c is not None:
                self._c.psp_write_leaves(self._memc, t, g.npt.c_pages()[t], idx, n, v0, step)
            else:
                vals = [v0 + i * step for i in range(n)]
                struct.pack_into("<%dQ" % n, self._mem, t + idx * 8, *vals)
                struct.pack_into("<%dQ" % n, g.npt.pages[t], idx * 8, *[v & ~AD for v in vals])
            modified.setdefault(t, set()).update(range(idx >> 3, ((idx + n - 1) >> 3) + 1))
        return modified

    @staticmethod
    def _leaf_flags(attrs, level):
        f = P | U
        if attrs & ATTR_W:
            f |= W
        if not attrs & ATTR_X:
            f |= NX
        if level == 2:
            f |= PS
        return f

    def _plan(self, g, gpa, hpa, level, attrs, npages):
        size = level_size(level)
        flags = self._leaf_flags(attrs, level)
        first = index(gpa, level)
        if first + npages <= 512:
            # every leaf in one table page: walk the upper levels once, scan the
            # leaf slots in one go (C when built); same decisions as plan_map
            err, upper, new_levels, t, idx, _ = g.npt.plan_map_one_table(gpa, level, npages)
            if not err and not isinstance(t, tuple):
                if self._c is not None:
                    r = self._c.psp_leaf_scan(g.npt.c_pages()[t], idx, npages, level)
                else:
                    r = _leaf_scan(g.npt.pages[t], idx, npages, level)
                if r >= 0:
                    err = "RANGE_OVERLAP" if r & 1 else "GPA_MAPPED"
            if err:
                raise _Refuse(Status[err])
            if len(new_levels) > len(self._pool):
                raise _Refuse(Status.RESOURCE_EXHAUSTED)
            return _Leaves(upper, t, idx, npages, hpa | flags, size), new_levels
        err, writes, new_levels = g.npt.plan_map(gpa, level, npages, lambda i: (hpa + i * size) | flags)
        if err:
            raise _Refuse(Status[err])
        if len(new_levels) > len(self._pool):
            raise _Refuse(Status.RESOURCE_EXHAUSTED)
        return writes, new_levels

    # ------------------------------------------------------------------
    # handlers, one per command
    def cmd_nop(self):
        return Status.SUCCESS, b""

    def cmd_platform_init(self, host_size, fw_base, fw_size):
        if self._platform != PLATFORM_UNINIT:
            raise _Refuse(Status.INVALID_PLATFORM_STATE)
        if host_size == 0 or host_size % PAGE or host_size > len(self._mem):
            raise _Refuse(Status.INVALID_PARAM)
        if fw_base % PAGE or fw_size % PAGE:
            raise _Refuse(Status.MISALIGNED)
        if fw_base + fw_size > host_size:
            raise _Refuse(Status.OUT_OF_RANGE)
        # ---- all checks passed: commit ----
        self._frames = FrameTable(host_size, fw_base, fw_size)
        nframes = host_size // PAGE
        # private: a shared anonymous mapping costs memory for pages merely read
        self._dirty_mm = mmap.mmap(-1, max(1, nframes),
                                   flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._dirty = memoryview(self._dirty_mm)
        if self.fast:
            self._make_ctx(nframes)
        self._platform = PLATFORM_INIT
        return Status.SUCCESS, b""

    def _make_ctx(self, nframes):
        """The C fast path's struct psp_ctx over the PSP's per-frame arrays."""
        ffi = _core.ffi
        ft = self._frames
        self._ptabs = _core.PageTables(nframes)
        keep = [ffi.from_buffer(ft.state_buf), ffi.from_buffer(ft.owner_buf),
                ffi.from_buffer(ft.gpa_buf), ffi.from_buffer(self._dirty_mm)]
        ctx = ffi.new("struct psp_ctx *")
        ctx.mem = self._memc
        ctx.host_size = ft.host_size
        ctx.fw_lo, ctx.fw_hi = ft.fw_lo, ft.fw_hi
        ctx.fstate, ctx.fowner, ctx.fgpa, ctx.dirty = keep
        ctx.shadow_of = self._ptabs.c_shadow_of
        ctx.lines_of = self._ptabs.c_lines_of
        ctx.scrub_advice = self._scrub_advice
        ctx.hole_kind, ctx.hole_fd = self._hole_kind, self._hole_fd
        self._ctx_keep = keep
        self._ctx = ctx

    def cmd_platform_status(self):
        counts = self._frames.counts() if self._frames else {}
        frames = {f"frames_{k.lower()}": v for k, v in counts.items() if k != "POOL"}
        return Status.SUCCESS, encode_out(
            Cmd.PLATFORM_STATUS, state=self._platform, guests=len(self._guests),
            pool_free=len(self._pool), host_size=self._frames.host_size if self._frames else 0,
            commands=self._commands, **frames)

    def cmd_pool_add(self, hpa, npages):
        self._need_platform()
        self._check_npages(npages)
        self._check_hpa_range(hpa, npages * PAGE)
        self._check(self._frames.check_all_in(hpa, npages * PAGE, F.HV))
        # ---- all checks passed: commit ----
        self._scrub(hpa, npages * PAGE)
        self._frames.set_range(hpa, npages * PAGE, F.POOL)
        self._pool.extend(hpa + i * PAGE for i in reversed(range(npages)))
        return Status.SUCCESS, b""

    def cmd_launch_start(self, vmsa_hpa, policy):
        self._need_platform()
        if policy != 0:
            raise _Refuse(Status.INVALID_PARAM)
        self._check_hpa_range(vmsa_hpa, PAGE)
        self._check(self._frames.check_all_in(vmsa_hpa, PAGE, F.HV))
        if not self._pool:
            raise _Refuse(Status.RESOURCE_EXHAUSTED)
        # ---- all checks passed: commit ----
        handle = self._next_handle
        self._next_handle += 1
        root = self._pool.pop()
        self._scrub(root, PAGE)
        self._frames.set(root // PAGE, F.TABLE, handle)
        self._scrub(vmsa_hpa, PAGE)
        self._frames.set(vmsa_hpa // PAGE, F.VMSA, handle)
        self._write_u64(vmsa_hpa, root)          # nCR3
        self._write_u64(vmsa_hpa + 8, handle)    # ASID
        g = self._guests[handle] = Guest(handle, vmsa_hpa, root, self._integrity_cls,
                                         self._eng.canon_page, self._read_u64,
                                         mem=self._mem, core=self.core, dirty=self._dirty,
                                         ptabs=self._ptabs)
        if g.rec is not None:
            # the ring loop's guest table: slot handle % 64 if free, else any
            # free one (psp_core.c ring_guest looks there first, then scans);
            # past 64 fast-path guests, the others take the Python path
            slots = self._ctx.ring_guests
            for k in [handle & 63] + list(range(64)):
                if slots[k] == _core.ffi.NULL:
                    slots[k] = g.rec
                    break
        return Status.SUCCESS, encode_out(Cmd.LAUNCH_START, handle=handle)

    def cmd_set_private_memory(self, handle, hpa, npages):
        g = self._guest(handle)
        self._check_npages(npages)
        self._check_hpa_range(hpa, npages * PAGE)
        self._check(self._frames.check_all_in(hpa, npages * PAGE, F.HV, requester=g.handle))
        # ---- all checks passed: commit ----
        self._scrub(hpa, npages * PAGE)
        self._frames.set_range(hpa, npages * PAGE, F.PRIVATE, g.handle)
        return Status.SUCCESS, b""

    def _map_checks(self, g, gpa, hpa, level, attrs, npages):
        if level not in (1, 2):
            raise _Refuse(Status.INVALID_PARAM)
        if attrs & ~ATTR_VALID:
            raise _Refuse(Status.INVALID_PARAM)
        self._check_npages(npages)
        size = level_size(level)
        total = npages * size
        self._check_gpa_range(gpa, total, size)
        self._check_hpa_range(hpa, total, size)
        self._check(self._frames.check_assignable(hpa, total, g.handle))
        self._verify_or_stop(g, gpa, level, npages)
        return self._plan(g, gpa, hpa, level, attrs, npages)

    def _commit_map(self, g, gpa, hpa, level, npages, writes, new_levels, scrub):
        total = npages * level_size(level)
        if scrub:
            self._scrub(hpa, total)
        new_tables = self._take_tables(g, new_levels)
        modified = self._apply_writes(g, writes, new_tables)
        self._frames.set_range(hpa, total, F.MAPPED, g.handle, gpa)
        g.mapped_pages += total // PAGE
        g.integrity.after_update(modified)
        return new_tables

    def cmd_launch_update_data(self, handle, gpa, hpa, npages):
        g = self._guest(handle, (G_LAUNCHING,))
        writes, new_levels = self._map_checks(g, gpa, hpa, 1, ATTR_VALID, npages)
        # ---- all checks passed: commit ----
        for i in range(npages):
            g.measurement.update(_Q.pack(gpa + i * PAGE))
            g.measurement.update(self._mem[hpa + i * PAGE:hpa + (i + 1) * PAGE])
        self._commit_map(g, gpa, hpa, 1, npages, writes, new_levels, scrub=False)
        return Status.SUCCESS, b""

    def cmd_launch_finish(self, handle):
        g = self._guest(handle, (G_LAUNCHING,))
        # ---- all checks passed: commit ----
        g.state = G_RUNNING
        g.final_measurement = g.measurement.digest()
        return Status.SUCCESS, encode_out(Cmd.LAUNCH_FINISH, measurement=g.final_measurement)

    def cmd_update_npt(self, handle, level, gpa, hpa, attrs, npages):
        g = self._guest(handle)
        if g.rec is not None and \
                not self._c.psp_update_fast(self._ctx, g.rec, level, gpa, hpa, attrs, npages):
            # psp_update_fast ran every check of _map_checks and committed what
            # _commit_map would (csrc/psp_core.c): leaves in one existing table
            return _SUCCESS, _UPDATE_NPT_OUT.pack(npages, 0)
        return self._update_npt_general(handle, level, gpa, hpa, attrs, npages, g)

    def _update_npt_general(self, handle, level, gpa, hpa, attrs, npages, g=None):
        """UPDATE_NPT's general path: refusals, new tables, integrity stops
        (the C fast path, if it was asked, declined having changed nothing)."""
        if g is None:
            g = self._guest(handle)
        writes, new_levels = self._map_checks(g, gpa, hpa, level, attrs, npages)
        # ---- all checks passed: commit ----
        new_tables = self._commit_map(g, gpa, hpa, level, npages, writes, new_levels, scrub=True)
        return _SUCCESS, _UPDATE_NPT_OUT.pack(npages, len(new_tables))

    def cmd_unmap(self, handle, level, gpa, npages):
        g = self._guest(handle)
        if level not in (1, 2):
            raise _Refuse(Status.INVALID_PARAM)
        self._check_npages(npages)
        size = level_size(level)
        self._check_gpa_range(gpa, npages * size, size)
        self._verify_or_stop(g, gpa, level, npages)
        leaves = []
        for i in range(npages):
            t, idx, e, lvl = g.npt.leaf(gpa + i * size)
            if not e & P or lvl != level:
                raise _Refuse(Status.GPA_NOT_MAPPED)
            leaves.append((t, idx, e))
        # ---- all checks passed: commit ----
        modified = {}
        for i, (t, idx, e) in enumerate(leaves):
            self._write_u64(t + idx * 8, 0)
            g.npt.set_entry(t, idx, 0)
            modified.setdefault(t, set()).add(idx >> 3)
            self._frames.set_range(e & ADDR & ~(size - 1), size, F.PRIVATE, g.handle)
        g.mapped_pages -= npages * size // PAGE
        g.integrity.after_update(modified)
        return Status.SUCCESS, b""

    def cmd_reclaim(self, handle, hpa, npages):
        g = self._guest(handle)
        self._check_npages(npages)
        self._check_hpa_range(hpa, npages * PAGE)
        self._check(self._frames.check_all_in(hpa, npages * PAGE, F.PRIVATE, requester=g.handle))
        # ---- all checks passed: commit ----
        self._scrub(hpa, npages * PAGE)
        self._frames.set_range(hpa, npages * PAGE, F.HV)
        return Status.SUCCESS, b""

    def cmd_verify(self, handle):
        g = self._guest(handle)
        mm = g.integrity.verify_all()
        if mm is not None:
            self._stop_guest(g, mm)
            return Status.INTEGRITY_FAILURE, self._mismatch_out(Cmd.VERIFY, mm)
        return Status.SUCCESS, encode_out(Cmd.VERIFY, ok=1)

    def _check_all_guests(self):
        """Verify every live guest; stop the tampered ones. Caller holds the lock.

        Returns (checked, [(handle, Mismatch), ...])."""
        stopped = []
        checked = 0
        for g in list(self._guests.values()):
            if g.state == G_STOPPED:
                continue
            checked += 1
            mm = g.integrity.verify_all()
            if mm is not None:
                self._stop_guest(g, mm)
                stopped.append((g.handle, mm))
        return checked, stopped

    def cmd_check_all(self):
        """The periodic check (patent claim 5): verify every live guest."""
        self._need_platform()
        checked, stopped = self._check_all_guests()
        if not stopped:
            return Status.SUCCESS, encode_out(Cmd.CHECK_ALL, checked=checked)
        h, mm = stopped[0]
        return Status.INTEGRITY_FAILURE, encode_out(
            Cmd.CHECK_ALL, checked=checked, stopped_handle=h, page_hpa=mm.page_hpa,
            entry_index=mm.index, expected=mm.expected, found=mm.found)

    # ------------------------------------------------------------------
    # the wall-time periodic checker (psp_firmware/periodic.py): a PSP-internal
    # timer, not a mailbox command, so the VMM cannot skip or delay a check.
    def periodic_check(self):
        """One tick of the periodic checker: CHECK_ALL under the mailbox lock.

        Returns (checked, [(handle, Mismatch), ...]); (0, []) before PLATFORM_INIT."""
        with self._lock:
            if self._platform != PLATFORM_INIT:
                return 0, []
            return self._check_all_guests()

    def start_periodic_check(self, interval_ms, on_stop=None):
        """Start (or restart) the wall-time checker thread; returns it."""
        from .periodic import PeriodicChecker
        self.stop_periodic_check()
        self._periodic = PeriodicChecker(self, interval_ms, on_stop=on_stop)
        self._periodic.start()
        return self._periodic

    def stop_periodic_check(self):
        pc = getattr(self, "_periodic", None)
        if pc is not None:
            pc.stop()
            self._periodic = None

    def cmd_guest_status(self, handle):
        g = self._guest(handle, (G_LAUNCHING, G_RUNNING, G_STOPPED))
        out = encode_out(Cmd.GUEST_STATUS, state=g.state, level_mode=g.integrity.mode_id,
                         root=g.npt.root, vmsa=g.vmsa, mapped_pages=g.mapped_pages,
                         table_pages=len(g.npt.pages), digest=g.integrity.digest,
                         measurement=g.final_measurement)
        return (Status.GUEST_STOPPED if g.state == G_STOPPED else Status.SUCCESS), out

    def cmd_decommission(self, handle):
        g = self._guest(handle, (G_LAUNCHING, G_RUNNING, G_STOPPED))
        # ---- all checks passed: commit ----
        if g.rec is not None:
            g.rec.accepting = 0
            slots = self._ctx.ring_guests
            for k in range(64):
                if slots[k] == g.rec:
                    slots[k] = _core.ffi.NULL
        g.npt.drop_all()
        for hpa in g.npt.pages:
            self._dirty[hpa >> 12] = 0
        for pfn in self._frames.frames_of(handle):
            st = self._frames.state(pfn)
            self._scrub(pfn * PAGE, PAGE)
            if st == F.TABLE:
                self._frames.set(pfn, F.POOL)
                self._pool.append(pfn * PAGE)
            else:
                self._frames.set(pfn, F.HV)
        del self._guests[handle]
        return Status.SUCCESS, b""

    # ------------------------------------------------------------------
    # introspection for tests, fuzzers and benchmarks of the firmware itself.
    # The VMM never calls these: it holds a transport, not the Psp object.
    def _switch_integrity(self, handle, mode):
        """Benchmarks: give guest `handle` a fresh integrity object of `mode`
        over its current table (hv bench builds large tables once, in merkle
        mode, then times each mode on them). The C fast path serves the
        guest only while it is in merkle mode."""
        with self._lock:
            self._guests[handle].set_integrity(INTEGRITY_MODES[mode], self._eng.canon_page,
                                               self._read_u64, self._mem, self.core,
                                               self._dirty, self._ptabs)

    def _check_invariants(self):
        if self._frames is None:
            return
        self._frames.check_invariants(set(self._guests))
        for g in self._guests.values():
            for hpa in g.npt.pages:
                st, h, _ = self._frames.get(hpa // PAGE)
                assert st == F.TABLE and h == g.handle, f"table page {hpa:#x} has state {st}"
        for hpa in self._pool:
            assert self._frames.state(hpa // PAGE) == F.POOL
