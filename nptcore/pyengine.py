"""Pure-Python NPT engine: the twin of csrc/npt.c.

Same results as the C backend (return values and bytes written), checked by
tests/test_npt_engine.py.  It is the benchmark baseline and the fallback when
the C extension is not built.  Entries are read through a native-order
memoryview cast to 64-bit words (x86 hosts are little-endian, as the format).
"""
from .bits import (
    P, W, U, A, D, PS, NX, ADDR_MASK, GPA_LIMIT, HPA_LIMIT,
    RSVD_HI, RSVD_2M, RSVD_1G, TABLE_FLAGS, LEAF_FLAGS_ALLOWED,
    ACC_W, ACC_X, PF_P, PF_W, PF_U, PF_RSV, PF_ID, PF_FINAL, PF_WALK,
    INST_OK, INST_MAPPED, INST_NEED_TABLES, INST_BAD_ARG, CLR_NOT_MAPPED,
    MODE_32, MODE_PAE, MODE_LONG4, K_OK, K_NPF, K_GUEST_PF,
    GUEST_ADDR_MASK, G_RSVD_LONG, G_RSVD_PAE, G_RSVD_PDPTE, G_RSVD_4M,
    WalkResult, Walk2DResult,
)
from .rmp import rmp_check

_U64 = (1 << 64) - 1
_NP_MASK = P | RSVD_HI
# byte 0 of an entry with A and D cleared (canon_page)
_CANON_BYTE0 = bytes(b & ~(A | D) & 0xFF for b in range(256))
_SIZES = (0, 1 << 12, 1 << 21, 1 << 30)


def _fail(level, entry, bits, access):
    return WalkResult(False, 0, level, entry,
                      PF_U | PF_FINAL | bits
                      | (PF_W if access == ACC_W else 0)
                      | (PF_ID if access == ACC_X else 0))


class PyEngine:
    name = "python"

    def __init__(self, buf):
        mv = memoryview(buf)
        if mv.readonly:
            raise ValueError("nptcore: host memory buffer must be writable")
        mv = mv.cast("B")
        self.mem_size = size = mv.nbytes
        if size < 4096:
            raise ValueError("nptcore: host memory smaller than one page")
        self._mv = mv
        self._q = mv[: size & ~7].cast("Q")
        self._d = mv[: size & ~3].cast("I")
        self._lim = size - 4096

    def close(self):
        """Release the buffer exports (so the mmap can be closed)."""
        for v in (self._q, self._d, self._mv):
            v.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ walk
    def _walk_core(self, root, gpa, access):
        """Walk without A/D.  Returns (WalkResult, slots, andb): slots are
        the word indexes of the traversed entries (None on a miss)."""
        if not 0 <= gpa < GPA_LIMIT or root & 0xFFF or not 0 <= root <= self._lim:
            if gpa < 0 or gpa > _U64 or root < 0 or root > _U64:
                raise OverflowError("address out of range for uint64")
            return _fail(4, 0, PF_RSV, access), None, 0
        q = self._q
        lim = self._lim
        table = root
        andb = _U64
        orb = 0
        slots = []
        level = 4
        while True:
            slot = (table >> 3) + ((gpa >> (3 + 9 * level)) & 511)
            e = q[slot]
            slots.append(slot)
            if e & _NP_MASK != P:
                return _fail(level, e, PF_P | PF_RSV if e & P else 0, access), None, 0
            andb &= e
            orb |= e
            if level == 1:
                size = 4096
                break
            if e & PS:
                if level == 4 or e & (RSVD_1G if level == 3 else RSVD_2M):
                    return _fail(level, e, PF_P | PF_RSV, access), None, 0
                size = _SIZES[level]
                break
            table = e & ADDR_MASK
            if table > lim:
                return _fail(level, e, PF_P | PF_RSV, access), None, 0
            level -= 1
        base = e & ADDR_MASK & ~(size - 1)
        if size > self.mem_size or base > self.mem_size - size:
            return _fail(level, e, PF_P | PF_RSV, access), None, 0
        need = U | W if access == ACC_W else U
        if andb & need != need or (access == ACC_X and orb & NX):
            return _fail(level, e, PF_P, access), None, 0
        return WalkResult(True, base | (gpa & (size - 1)), level, e, 0), slots, andb

    def _apply_ad(self, slots, andb, leaf, dirty):
        if andb & A and (not dirty or leaf & D):
            return
        q = self._q
        for s in slots:
            v = q[s]
            if not v & A:
                q[s] = v | A
        if dirty:
            s = slots[-1]
            v = q[s]
            if not v & D:
                q[s] = v | D

    def walk(self, root, gpa, access, set_ad=True):
        res, slots, andb = self._walk_core(root, gpa, access)
        if set_ad and slots is not None:
            dirty = access == ACC_W
            if not (andb & A and (not dirty or res.entry & D)):
                self._apply_ad(slots, andb, res.entry, dirty)
                # the leaf entry as it is now, with A/D
                res = res._replace(entry=self._q[slots[-1]])
        return res

    def _rmp_core(self, rmp):
        """_walk_core followed by the RMP check of `rmp` (an RmpView): a
        mismatch fails the walk with PF_P | the check's bits."""
        core = self._walk_core
        entries, asid = rmp.entries, rmp.asid

        def chk(root, gpa, access):
            res, slots, andb = core(root, gpa, access)
            if slots is None:
                return res, slots, andb
            bits = rmp_check(entries, asid, res.hpa, gpa, res.level)
            if bits:
                return _fail(res.level, res.entry, PF_P | bits, access), None, 0
            return res, slots, andb
        return chk

    def walk_rmp(self, root, gpa, access, rmp, set_ad=True):
        """walk() with the RMP check (nptcore/rmp.py) on the translation."""
        res, slots, andb = self._rmp_core(rmp)(root, gpa, access)
        if set_ad and slots is not None:
            dirty = access == ACC_W
            if not (andb & A and (not dirty or res.entry & D)):
                self._apply_ad(slots, andb, res.entry, dirty)
                res = res._replace(entry=self._q[slots[-1]])
        return res

    def walk_batch(self, root, gpas, accesses, out_hpas, set_ad=True, rmp=None):
        n = len(gpas)
        if len(accesses) != n or len(out_hpas) < n:
            raise ValueError("walk_batch: accesses must have the length of gpas "
                             "and out_hpas at least that length")
        core = self._walk_core if rmp is None else self._rmp_core(rmp)
        apply_ad = self._apply_ad
        for i in range(n):
            acc = accesses[i]
            res, slots, andb = core(root, gpas[i], acc)
            if slots is None:
                return i, res
            if set_ad:
                apply_ad(slots, andb, res.entry, acc == ACC_W)
            out_hpas[i] = res.hpa
        return n, None

    # --------------------------------------------------------- install/clear
    def _root_ok(self, root):
        return 0 <= root <= self._lim and not root & 0xFFF

    def _gpa_arg_ok(self, root, gpa, level):
        if level != 1 and level != 2:
            return False
        size = 4096 if level == 1 else 1 << 21
        return self._root_ok(root) and 0 <= gpa < GPA_LIMIT and not gpa & (size - 1)

    def _descend(self, root, gpa, level):
        """('slot', word) | ('need', word, miss_level) | ('blocked',)"""
        q = self._q
        lim = self._lim
        table = root
        for L in range(4, level, -1):
            slot = (table >> 3) + ((gpa >> (3 + 9 * L)) & 511)
            e = q[slot]
            if not e & P:
                return ("need", slot, L)
            if e & (PS | RSVD_HI) or e & ADDR_MASK > lim:
                return ("blocked",)
            table = e & ADDR_MASK
        return ("slot", (table >> 3) + ((gpa >> (3 + 9 * level)) & 511))

    def tables_needed(self, root, gpa, level):
        if not self._gpa_arg_ok(root, gpa, level):
            return INST_BAD_ARG, 0
        st = self._descend(root, gpa, level)
        if st[0] == "blocked":
            return INST_MAPPED, 0
        if st[0] == "slot":
            return (INST_MAPPED if self._q[st[1]] & P else INST_OK), 0
        return INST_OK, st[2] - level

    def install(self, root, gpa, hpa, level, leaf_flags, spare_tables):
        if not self._gpa_arg_ok(root, gpa, level):
            return INST_BAD_ARG, 0
        size = 4096 if level == 1 else 1 << 21
        if (hpa < 0 or hpa & (size - 1) or hpa >= HPA_LIMIT
                or size > self.mem_size or hpa > self.mem_size - size):
            return INST_BAD_ARG, 0
        if (leaf_flags < 0 or leaf_flags & ~LEAF_FLAGS_ALLOWED or not leaf_flags & P
                or (level == 2 and not leaf_flags & PS)):
            return INST_BAD_ARG, 0
        q = self._q
        st = self._descend(root, gpa, level)
        if st[0] == "blocked":
            return INST_MAPPED, 0
        if st[0] == "slot":
            if q[st[1]] & P:
                return INST_MAPPED, 0
            q[st[1]] = hpa | leaf_flags
            return INST_OK, 0
        _, slot, miss_level = st
        need = miss_level - level
        if len(spare_tables) < need:
            return INST_NEED_TABLES, need
        spares = list(spare_tables[:need])
        for i, s in enumerate(spares):
            if s < 0 or s & 0xFFF or s > self._lim or s in spares[:i]:
                return INST_BAD_ARG, 0
        mv = self._mv
        zero = bytes(4096)
        for s in spares:
            mv[s:s + 4096] = zero
        for i, s in enumerate(spares):
            L = miss_level - 1 - i
            q[(s >> 3) + ((gpa >> (3 + 9 * L)) & 511)] = (
                spares[i + 1] | TABLE_FLAGS if i + 1 < need else hpa | leaf_flags)
        q[slot] = spares[0] | TABLE_FLAGS
        return INST_OK, need

    def clear(self, root, gpa, level):
        if not self._gpa_arg_ok(root, gpa, level):
            return INST_BAD_ARG, 0
        st = self._descend(root, gpa, level)
        if st[0] != "slot":
            return CLR_NOT_MAPPED, 0
        q = self._q
        e = q[st[1]]
        if not e & P or (level == 2 and not e & PS):
            return CLR_NOT_MAPPED, 0
        q[st[1]] = 0
        return INST_OK, e

    # -------------------------------------------------------------- traversal
    def mappings(self, root):
        out = []
        if not self._root_ok(root):
            return out
        q = self._q
        lim = self._lim
        visited = {root}

        def rec(table, level, gpa_base):
            w = table >> 3
            shift = 3 + 9 * level
            for i, e in enumerate(q[w:w + 512].tolist()):
                if not e & P:
                    continue
                gpa = gpa_base | (i << shift)
                if level == 1 or (level <= 3 and e & PS):
                    size = 1 << shift
                    out.append((gpa, e & ADDR_MASK & ~(size - 1), size, e))
                    continue
                nxt = e & ADDR_MASK
                if nxt > lim or nxt in visited:
                    continue
                visited.add(nxt)
                rec(nxt, level - 1, gpa)

        rec(root, 4, 0)
        return out

    def table_pages(self, root):
        out = []
        if not self._root_ok(root):
            return out
        q = self._q
        lim = self._lim
        visited = {root}

        def rec(table, level):
            out.append((table, level))
            if level == 1:
                return
            w = table >> 3
            for e in q[w:w + 512].tolist():
                if not e & P or (level <= 3 and e & PS):
                    continue
                nxt = e & ADDR_MASK
                if nxt > lim or nxt in visited:
                    continue
                visited.add(nxt)
                rec(nxt, level - 1)

        rec(root, 4)
        return out

    def canon_page(self, hpa):
        if not self._root_ok(hpa):
            raise ValueError("canon_page: hpa %#x misaligned or outside memory" % hpa)
        page = bytearray(self._mv[hpa:hpa + 4096])
        page[0::8] = page[0::8].translate(_CANON_BYTE0)
        return bytes(page)

    # ----------------------------------------------------------------- walk2d
    def walk_batch_rmp(self, root, gpas, accesses, out_hpas, rmp, set_ad=True):
        """walk_batch() with the RMP check on every translation."""
        return self.walk_batch(root, gpas, accesses, out_hpas, set_ad, rmp)

    def walk2d_rmp(self, root, cr3, va, access, mode, rmp, set_ad=True):
        """walk2d() with the RMP check on every nested translation (each
        guest table read and the final address)."""
        return self.walk2d(root, cr3, va, access, mode, set_ad, rmp)

    def walk2d(self, root, cr3, va, access, mode, set_ad=True, rmp=None):
        if not (0 <= root <= _U64 and 0 <= cr3 <= _U64 and 0 <= va <= _U64):
            raise OverflowError("address out of range for uint64")
        write = access == ACC_W
        fetch = access == ACC_X
        nx_on = mode != MODE_32
        gerr = (PF_W if write else 0) | (PF_ID if fetch and nx_on else 0)
        if mode == MODE_LONG4:
            table = cr3 & GUEST_ADDR_MASK
            va &= (1 << 48) - 1
        elif mode == MODE_PAE:
            table = cr3 & 0xFFFFFFE0
            va &= 0xFFFFFFFF
        elif mode == MODE_32:
            table = cr3 & 0xFFFFF000
            va &= 0xFFFFFFFF
        else:
            raise ValueError("walk2d: bad mode %r" % (mode,))
        core = self._walk_core if rmp is None else self._rmp_core(rmp)
        q = self._q
        d = self._d
        andb = _U64
        orb = 0
        pending = []   # (npt slots, npt andb, npt leaf, guest entry hpa, bits)
        size = 4096
        L = mode
        while True:
            pdpte = mode == MODE_PAE and L == 3
            if mode == MODE_32:
                eg = table + (((va >> (2 + 10 * L)) & 1023) << 2)
            elif pdpte:
                eg = table + (((va >> 30) & 3) << 3)
            else:
                eg = table + ((va >> (9 * L)) & 0xFF8)
            r, slots, nandb = core(root, eg, 0)
            if slots is None:
                return Walk2DResult(False, 0, eg, K_NPF,
                                    (r.errcode & ~PF_FINAL) | PF_WALK, r.level)
            e = d[r.hpa >> 2] if mode == MODE_32 else q[r.hpa >> 3]
            if not e & P:
                return Walk2DResult(False, 0, 0, K_GUEST_PF, gerr, L)
            leaf = False
            if mode == MODE_LONG4:
                rsv = e & G_RSVD_LONG
                if L == 4:
                    rsv |= e & PS
                elif L == 1:
                    leaf = True
                    size = 1 << 12
                elif e & PS:
                    leaf = True
                    size = 1 << 30 if L == 3 else 1 << 21
                    rsv |= e & (RSVD_1G if L == 3 else RSVD_2M)
            elif mode == MODE_PAE:
                if pdpte:
                    rsv = e & G_RSVD_PDPTE
                else:
                    rsv = e & G_RSVD_PAE
                    if L == 1:
                        leaf = True
                        size = 1 << 12
                    elif e & PS:
                        leaf = True
                        size = 1 << 21
                        rsv |= e & RSVD_2M
            else:
                rsv = 0
                if L == 1:
                    leaf = True
                    size = 1 << 12
                elif e & PS:
                    leaf = True
                    size = 1 << 22
                    rsv = e & G_RSVD_4M
            if rsv:
                return Walk2DResult(False, 0, 0, K_GUEST_PF, gerr | PF_P | PF_RSV, L)
            if not pdpte:
                andb &= e
                orb |= e
            if leaf and ((write and not andb & W) or (fetch and nx_on and orb & NX)):
                return Walk2DResult(False, 0, 0, K_GUEST_PF, gerr | PF_P, L)
            bits = 0
            if set_ad and not pdpte:
                if not e & A:
                    bits |= A
                if leaf and write and not e & D:
                    bits |= D
                if bits:
                    wr, wslots, _ = core(root, eg, ACC_W)
                    if wslots is None:
                        return Walk2DResult(False, 0, eg, K_NPF,
                                            (wr.errcode & ~PF_FINAL) | PF_WALK, wr.level)
            pending.append((slots, nandb, r.entry, r.hpa, bits))
            if leaf:
                break
            table = e & 0xFFFFF000 if mode == MODE_32 else e & GUEST_ADDR_MASK
            L -= 1

        if mode == MODE_32 and size == 1 << 22:
            gpa = (e & 0xFFC00000) | (((e >> 13) & 0xFF) << 32) | (va & 0x3FFFFF)
        else:
            gpa = (e & GUEST_ADDR_MASK & ~(size - 1)) | (va & (size - 1))

        r, slots, fandb = core(root, gpa, access)
        if slots is None:
            return Walk2DResult(False, 0, gpa, K_NPF, r.errcode, r.level)
        if set_ad:
            apply_ad = self._apply_ad
            for tslots, tandb, tleaf, ehpa, bits in pending:
                apply_ad(tslots, tandb, tleaf, bits != 0)
                if bits:
                    if mode == MODE_32:
                        v = d[ehpa >> 2]
                        if v & bits != bits:
                            d[ehpa >> 2] = v | bits
                    else:
                        v = q[ehpa >> 3]
                        if v & bits != bits:
                            q[ehpa >> 3] = v | bits
            apply_ad(slots, fandb, r.entry, write)
        return Walk2DResult(True, r.hpa, gpa, K_OK, 0, L)
