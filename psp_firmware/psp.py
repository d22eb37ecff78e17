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
from .commands import MAX_NPAGES, Cmd, DecodeError, encode_out, in_fields, unpack_args
from .integrity import PAGE, level_size
from .status import Status
from psp_firmware.handlers.platform import PlatformCommands
from psp_firmware.handlers.npt import NptCommands
from psp_firmware.handlers.launch import LaunchCommands
from .scrub import (HOLE_NONE, HOLE_SEEK, _HOLE_NAMES, _PM_DATA, _SCRUB_ADVICE, _SCRUB_MADVISE_MIN,
                    _buffer_address, _mapping_of, hole_probe_for, scrub_mode_for)
from .guest import (DEFAULT_INTEGRITY, G_LAUNCHING, G_RUNNING, G_STOPPED, INTEGRITY_MODES,
                    PLATFORM_INIT, PLATFORM_UNINIT, _DONE_OUT, _NO_RECORD, _Q, _Refuse, _SUCCESS,
                    _UPDATE_NPT, _UPDATE_NPT_LEN, _UPDATE_NPT_OUT, _oversize_status)
from psp_firmware.handlers.checks import CheckCommands

log = logging.getLogger("psp")


class Psp(PlatformCommands, LaunchCommands, NptCommands, CheckCommands):
    protect = "digest"              # the protection design (psp_firmware/designs.py)
    TABLE_ENTRY = 1 | 2 | 4         # P | W | U: an entry pointing at a table page

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
        self._shared = None     # self._ctx once a C caller on another thread shares it
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
            self._assert_layout(cmd, handler)

    @staticmethod
    def _assert_layout(cmd, handler):
        """Every handler takes the command's fields positionally, in layout order."""
        code = handler.__code__
        assert code.co_varnames[1:code.co_argcount] == in_fields(cmd), cmd

    def shared_regions(self):
        """{name: (fd, size, hpa)}: PSP memory the VMM may map read-only
        (the isolated and rmp designs); none under digest."""
        return {}

    # ------------------------------------------------------------------
    # the mailbox
    def mailbox(self, cmd, buf):
        with self._lock:
            shared = self._shared
            if shared is None:
                return self._dispatch(cmd, buf)
            # a C caller on another thread shares the firmware (share_update_entry):
            # its lock word is taken too, so the two never run at once
            self._c.psp_lock(shared)
            try:
                return self._dispatch(cmd, buf)
            finally:
                self._c.psp_unlock(shared)

    def _dispatch(self, cmd, buf):
        """One command, with the firmware's lock held (mailbox)."""
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
                shared = self._shared
                if shared is not None:
                    self._c.psp_lock(shared)
                try:
                    j = fast(ctx, ringc, i, n, progc)
                finally:
                    if shared is not None:
                        self._c.psp_unlock(shared)
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

    def share_update_entry(self):
        """For a C caller of the in-process firmware on another thread (the
        vCPU's NPF fast path, csrc/vcpu.c): (address of psp_shared_update,
        address of its struct psp_ctx, address of the context's lock word),
        or None without the C core (or before
        PLATFORM_INIT). From then on every entry of the firmware also takes
        the context's lock word (psp_lock), which that caller takes around
        each call: commands stay serialized. psp_shared_update (psp_mailbox_update,
        counted) validates
        every argument itself and declines (changes nothing) what it does not
        take; its caller then sends the command through the mailbox."""
        with self._lock:
            if self._ctx is None:
                return None
            self._shared = self._ctx
            ffi = _core.ffi
            return (int(self._c.psp_shared_update_addr()),
                    int(ffi.cast("uintptr_t", self._ctx)),
                    int(ffi.cast("uintptr_t", ffi.addressof(self._ctx, "busy"))))

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

    def _check_map_args(self, g, gpa, hpa, level, npages):
        """What UPDATE_NPT and RMP_ASSIGN both check of a mapping: the level,
        the page count, both ranges (aligned to the level, inside their
        spaces, no overflow) and that every frame may be given to guest g.
        Returns the size of the mapping in bytes."""
        if level not in (1, 2):
            raise _Refuse(Status.INVALID_PARAM)
        self._check_npages(npages)
        size = level_size(level)
        total = npages * size
        self._check_gpa_range(gpa, total, size)
        self._check_hpa_range(hpa, total, size)
        self._check(self._frames.check_assignable(hpa, total, g.handle))
        return total

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
