"""NPT commands: UPDATE_NPT (the NPF path), UNMAP, RECLAIM, and the map
plan they share (checks first, then the writes)."""
import logging
import struct


from ..commands import ATTR_VALID, ATTR_W, ATTR_X
from ..frames import F
from ..integrity import AD, ADDR, NX, PAGE, PS, P, U, W, index, level_size
from ..status import Status
from ..guest import _Leaves, _Refuse, _SUCCESS, _UPDATE_NPT_OUT, _leaf_scan

log = logging.getLogger("psp")


class NptCommands:
    """Handlers of the NPT family and their shared planning (mixed into Psp)."""

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
            v = (real(value) | self.TABLE_ENTRY) if isinstance(value, tuple) else value
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

    def _map_checks(self, g, gpa, hpa, level, attrs, npages):
        if attrs & ~ATTR_VALID:
            raise _Refuse(Status.INVALID_PARAM)
        self._check_map_args(g, gpa, hpa, level, npages)
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
