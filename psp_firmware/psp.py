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
import hashlib
import logging
import struct
import threading

from nptcore import get_engine
from nptcore.bits import GPA_LIMIT

from . import core as _core
from .commands import (_OUT, ATTR_VALID, ATTR_W, ATTR_X, MAX_NPAGES, Cmd, DecodeError,
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
    def __init__(self, handle, vmsa, root, integrity_cls, canon, read_u64, mem=None, core=None):
        self.handle = handle
        self.vmsa = vmsa
        self.state = G_LAUNCHING
        self.npt = ShadowNpt(root)
        if integrity_cls in _BUILTIN_MODES:
            self.integrity = integrity_cls(self.npt, canon, read_u64, vmsa, mem=mem, core=core)
        else:
            self.integrity = integrity_cls(self.npt, canon, read_u64, vmsa)
        self.measurement = hashlib.sha256()
        self.final_measurement = b""
        self.mapped_pages = 0
        self.stop_reason = None


class Psp:
    def __init__(self, membuf, backend=None, integrity=DEFAULT_INTEGRITY, core=None):
        if integrity not in INTEGRITY_MODES:
            raise ValueError(f"unknown integrity mode {integrity!r} (have {sorted(INTEGRITY_MODES)})")
        self._mem = membuf
        # the C core (csrc/psp_core.c) or None: the Python twin. Same results.
        self._c = _core.resolve(core)
        self.core = "c" if self._c is not None else "python"
        self._memc = (_core.ffi.from_buffer(membuf, require_writable=True)
                      if self._c is not None else None)
        self._eng = get_engine(membuf, backend)
        self._integrity_cls = INTEGRITY_MODES[integrity]
        self._platform = PLATFORM_UNINIT
        self._frames = None
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
            try:
                args = unpack_args(cmd, buf)
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

    # ------------------------------------------------------------------
    # memory helpers (host memory is the VMM's: read it, never trust it)
    def _read_u64(self, hpa):
        return _Q.unpack_from(self._mem, hpa)[0]

    def _write_u64(self, hpa, value):
        _Q.pack_into(self._mem, hpa, value)

    def _scrub(self, hpa, nbytes):
        if self._c is not None:
            # C: zero a page at a time, leaving pages that already read as zero
            # untouched (same bytes, no dirtying of never-used frames)
            if hpa < 0 or nbytes < 0 or hpa + nbytes > len(self._memc):
                raise ValueError("scrub outside host memory")
            self._c.psp_scrub(self._memc, hpa, nbytes)
            return
        self._mem[hpa:hpa + nbytes] = bytes(nbytes)

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
        modified = set()
        leaves = None
        if type(writes) is _Leaves:
            leaves = writes
            writes = leaves.upper
        for table, idx, value in writes:
            t = real(table)
            v = (real(value) | P | W | U) if isinstance(value, tuple) else value
            self._write_u64(t + idx * 8, v)
            g.npt.set_entry(t, idx, v)
            modified.add(t)
        if leaves is not None:
            t = real(leaves.table)
            idx, n, v0, step = leaves.idx, leaves.n, leaves.value0, leaves.step
            if self._c is not None:
                self._c.psp_write_leaves(self._memc, t, g.npt.c_pages()[t], idx, n, v0, step)
            else:
                vals = [v0 + i * step for i in range(n)]
                struct.pack_into("<%dQ" % n, self._mem, t + idx * 8, *vals)
                struct.pack_into("<%dQ" % n, g.npt.pages[t], idx * 8, *[v & ~AD for v in vals])
            modified.add(t)
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
        self._platform = PLATFORM_INIT
        return Status.SUCCESS, b""

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
        self._guests[handle] = Guest(handle, vmsa_hpa, root, self._integrity_cls,
                                     self._eng.canon_page, self._read_u64,
                                     mem=self._mem, core=self.core)
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
        modified = set()
        for i, (t, idx, e) in enumerate(leaves):
            self._write_u64(t + idx * 8, 0)
            g.npt.set_entry(t, idx, 0)
            modified.add(t)
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
        self._guest(handle, (G_LAUNCHING, G_RUNNING, G_STOPPED))
        # ---- all checks passed: commit ----
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
    # introspection for tests and fuzzers of the firmware itself. The VMM
    # never calls these: it holds a transport, not the Psp object.
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
