"""Incremental integrity: a hash tree over the NPT, kept in PSP private state.

`FullIntegrity` (integrity.py, the patent-literal mode) re-hashes every table
page from host memory before each update: the cost of an UPDATE_NPT grows
linearly with the size of the table, i.e. with guest memory. `MerkleIntegrity`
keeps the same guarantees at a cost that does not depend on the table's size.

The NPT is itself a radix tree, so the hash tree follows it:

    chunk hash  C(p, j) = SHA-256("C" || entries 64j..64j+63 of page p, canonical
                                  (A/D cleared) || node hashes of the child
                                  table pages those entries point to, in order)
    node hash   N(p)    = SHA-256("N" || hpa(p) || level(p) || C(p, 0) .. C(p, 7))
    digest              = SHA-256("R" || root pointer || N(root))

Each table page is split in 8 chunks of 64 entries (512 bytes), so that
changing one entry re-hashes 512 bytes (+ the child hashes of that chunk, at
most 64 x 32 bytes) and a 256-byte node header, not the whole page.

The PSP keeps C and N for every table page (8 x 32 + 32 bytes) next to its
shadow copy of the table (`ShadowNpt`, integrity.py), plus an index for the
update's path check: the line hashes

    line hash   L(p, k) = SHA-256("L" || entries 8k..8k+7 of page p, canonical)

one per 64-byte line (8 entries, one cache line; 2 KiB per table page).

The tree is kept lazily. An update re-hashes only the lines it wrote (from
the shadow) and marks stale the chunks it wrote (a per-frame bit mask
`dirty`, shared with the C fast path in csrc/psp_core.c, which commits
ordinary updates itself). The chunk, node and root hashes are brought up to
date, leaves first, when the digest is next needed: each re-hashed page
marks its parent's chunk stale in turn, up to the root. That happens on
GUEST_STATUS, VERIFY, CHECK_ALL and the periodic
checker. A run of NPFs into one table re-hashes its upper levels once, not
once per fault. The digest is the same as an eager tree's (tests compare
with a rebuild from scratch).

What each mode detects, and when
--------------------------------
full (patent-literal): before every UPDATE_NPT / UNMAP / LAUNCH_UPDATE_DATA the
    PSP recomputes SHA-256 over the root pointer and *every* table page read
    from host memory and compares it with the stored digest. Any change to any
    table page (other than A/D bits) or to the root pointer (nCR3 in the VMSA)
    is refused by the very next update, and found by VERIFY / CHECK_ALL.
    Cost: O(table pages) per update.

merkle (default): before an update the PSP checks the root pointer and
    re-hashes from host memory the line holding every entry the update's walk
    reads or writes: for each page of the update (all `npages` of them), the
    line of its entry at each level from the root down to the leaf (or down to
    the first absent entry, below which the PSP creates fresh, scrubbed tables).
    Each is compared with the stored line hash. A tamper on that path, i.e.
    in any of the 8-entry lines the walk goes through at any level
    (a re-pointed PML4/PDPT/PD entry, a pre-planted or altered leaf, a
    permission flip in the line of the slot being filled), is refused by that
    update and the guest is stopped, exactly as in full mode. A tamper anywhere else
    (another line, another table page) is not looked at by the update; it is
    caught by the next periodic check (CHECK_ALL) or VERIFY, which recompute
    every chunk and node hash bottom-up from host memory and compare the
    resulting root digest, as full mode does. Cost: O(depth) per update,
    independent of guest size; O(table pages) per periodic check.
    A ring (Psp.run_ring, answered in one wake-up under the PSP's lock) is
    checked as one batch, the way one UPDATE_NPT of many pages is: each
    line its entries read is hashed once per ring, and a leaf line the ring
    wrote gets its new line hash once, before the ring returns
    (psp_ring_fast's line cache in csrc/psp_core.c). A tamper already in a
    line when the ring reaches it is refused at the first entry that reads
    it, as one command at a time would; a VMM rewriting a line after the
    ring checked it is in the same place as one rewriting it just after the
    ring: the walk reads the shadow, and the next check of the line finds it.

In both modes the new digest is computed from the PSP's shadow, never from
host memory after the write, so a VMM racing the PSP cannot get its value
folded into the digest; A/D bits are cleared before hashing (hardware sets
them; that is not tampering). A mismatch is reported as the same `Mismatch`
(table page, entry index, expected, found) by comparing against the shadow.
"""
import hashlib
from itertools import chain
import struct
from array import array

from . import core as _core
from .merkle_plan import HBYTES, _slot_mask, _VerifyPlan
from .integrity import ADDR, PS, P, Mismatch, level_size

CHUNK_ENTRIES = 64
CHUNK_BYTES = CHUNK_ENTRIES * 8
NCHUNKS = 512 // CHUNK_ENTRIES
SLOT_BYTES = CHUNK_ENTRIES * HBYTES      # child-hash slots of one chunk
LINE_ENTRIES = 8
LINE_BYTES = LINE_ENTRIES * 8
NLINES = 512 // LINE_ENTRIES
LINES_PER_CHUNK = CHUNK_ENTRIES // LINE_ENTRIES
ALL_CHUNKS = (1 << NCHUNKS) - 1

_Q = struct.Struct("<Q")
_NODE_HDR = struct.Struct("<cQB")
_ROOT_HDR = struct.Struct("<cQ")
_sha = hashlib.sha256
_SHIFT = {1: 12, 2: 21, 3: 30, 4: 39}
_ZERO_LINE_H = _sha(b"L" + bytes(LINE_BYTES)).digest()
_ZERO_LINES = _ZERO_LINE_H * NLINES


def line_hash(line_bytes):
    """L = SHA-256("L" || 64 canonical bytes): the Python twin of psp_line_hash."""
    return _sha(b"L" + line_bytes).digest()


class _NoDirtyArray(dict):
    """pfn -> stale-chunk mask, 0 when absent: the store of an integrity
    object made without the PSP's per-frame array (a standalone rebuild)."""

    def __missing__(self, key):
        return 0


class MerkleIntegrity:
    mode = "merkle"
    mode_id = 1

    def __init__(self, shadow, canon_page, read_u64, vmsa, mem=None, core=None, dirty=None,
                 ptabs=None):
        """dirty: the PSP's per-frame stale-chunk masks (shared with the C
        fast path); ptabs: its psp_firmware.core.PageTables, where this
        object registers its line hashes for the fast path. A standalone
        object (a rebuild to compare with) passes neither."""
        self.shadow = shadow
        self._ptabs = ptabs
        self._canon = canon_page
        self._read_u64 = read_u64
        self.vmsa = vmsa
        # the C core (csrc/psp_core.c) or None (the Python twin); same hashes
        self._c = _core.resolve(core)
        self.dirty = dirty if dirty is not None else _NoDirtyArray()  # pfn -> stale chunks
        self.chunk_h = {}     # hpa -> bytearray(NCHUNKS * 32): the chunk hashes, in order
        self.node_h = {}      # hpa -> node hash
        self.line_h = {}      # hpa -> bytearray(NLINES * 32): the line hashes
        self.kids = {}        # hpa (level > 1) -> list of 512 child table hpas (0: none)
        self.slots = {}       # hpa (level > 1) -> bytearray(512 * 32): child node hashes by index
        self.nkids = {}       # hpa (level > 1) -> list of NCHUNKS child counts
        self.parent = {}      # child table hpa -> (parent hpa, index)
        self._by_level = {1: [], 2: [], 3: [], 4: []}
        self._lvl_arr = {1: array("Q"), 2: array("Q"), 3: array("Q"), 4: array("Q")}  # the same, for C
        self._scan_out = None
        self._epoch = -1        # PageTables.epoch this guest's last full scan saw
        self._digest = None
        self._vplan = None      # verify_all's page order (_VerifyPlan)
        self._memc = None
        if self._c is not None:
            ffi = _core.ffi
            # host memory (read only here: the path check hashes lines in place)
            self._memc = ffi.from_buffer(mem) if mem is not None else None
            self._shadow_c = shadow.c_pages()
            self._slots_c = _core.Ptrs(self.slots)
            self._chunk_c = _core.Ptrs(self.chunk_h)
            self._lines_c = _core.Ptrs(self.line_h)
            self._out = ffi.new("char[32]")
            self._obuf = ffi.buffer(self._out)
            self._null = ffi.NULL
        self._rebuild()

    # ------------------------------------------------------------------
    # the digest: brought up to date on demand
    @property
    def digest(self):
        self._flush()
        return self._digest

    # ------------------------------------------------------------------
    # hashing. A chunk with child tables hashes their node hashes by
    # position (32 bytes per entry, zeros where the entry is not a table).
    def _chunk_hash(self, page_bytes, t, j, slots=None):
        lo = j * CHUNK_BYTES
        if slots is None:
            n = self.nkids.get(t)
            if n is not None and n[j]:
                s = self.slots[t]
                return _sha(b"C" + page_bytes[lo:lo + CHUNK_BYTES]
                            + s[j * SLOT_BYTES:(j + 1) * SLOT_BYTES]).digest()
            return _sha(b"C" + page_bytes[lo:lo + CHUNK_BYTES]).digest()
        if self.nkids[t][j]:
            return _sha(b"C" + page_bytes[lo:lo + CHUNK_BYTES]
                        + slots[j * SLOT_BYTES:(j + 1) * SLOT_BYTES]).digest()
        return _sha(b"C" + page_bytes[lo:lo + CHUNK_BYTES]).digest()

    @staticmethod
    def _node_hash(hpa, level, chunks):
        return _sha(_NODE_HDR.pack(b"N", hpa, level) + bytes(chunks)).digest()

    def _root_digest(self):
        c = self._c
        root = self.shadow.root
        if c is not None:
            c.psp_root_hash(root, self.node_h[root], self._out)
            return self._obuf[:]
        return _sha(_ROOT_HDR.pack(b"R", root) + self.node_h[root]).digest()

    def _rehash_chunks(self, hpa, mask):
        """Chunks in `mask` and the node hash of a page, from the shadow."""
        lvl = self.shadow.levels[hpa]
        c = self._c
        if c is not None:
            n = self.nkids.get(hpa)
            if mask == ALL_CHUNKS:
                c.psp_page_hash(self._shadow_c[hpa], 0,
                                self._slots_c[hpa] if n is not None else self._null,
                                _slot_mask(n), hpa, lvl, self._chunk_c[hpa], self._out)
            else:
                sp, chp = self._shadow_c[hpa], self._chunk_c[hpa]
                for j in range(NCHUNKS):
                    if mask >> j & 1:
                        c.psp_chunk_hash(sp + j * CHUNK_BYTES, 0,
                                         self._slots_c[hpa] + j * SLOT_BYTES
                                         if n is not None and n[j] else self._null,
                                         chp + j * HBYTES)
                c.psp_node_hash(hpa, lvl, chp, self._out)
            self.node_h[hpa] = self._obuf[:]
            return
        page = self.shadow.pages[hpa]
        ch = self.chunk_h[hpa]
        for j in range(NCHUNKS):
            if mask >> j & 1:
                ch[j * HBYTES:(j + 1) * HBYTES] = self._chunk_hash(page, hpa, j)
        self.node_h[hpa] = self._node_hash(hpa, lvl, ch)

    def _rehash_lines(self, hpa, lines):
        """Line hashes of `lines` (None: all) of a page, from the shadow."""
        lh = self.line_h[hpa]
        c = self._c
        if c is not None:
            sp, lp = self._shadow_c[hpa], self._lines_c[hpa]
            if lines is None:
                c.psp_lines_hash(sp, lp)
            else:
                for k in lines:
                    c.psp_line_hash(sp + k * LINE_BYTES, lp + k * HBYTES)
            return
        page = self.shadow.pages[hpa]
        for k in (range(NLINES) if lines is None else lines):
            lh[k * HBYTES:(k + 1) * HBYTES] = _sha(
                b"L" + page[k * LINE_BYTES:(k + 1) * LINE_BYTES]).digest()

    def _new_page(self, hpa):
        """PSP state for a table page (its shadow is all zeros when it is new)."""
        self.chunk_h[hpa] = bytearray(NCHUNKS * HBYTES)
        self.line_h[hpa] = lines = bytearray(_ZERO_LINES)
        if self._ptabs is not None:
            self._ptabs.set_lines(hpa, lines)
        lvl = self.shadow.levels[hpa]
        self._by_level[lvl].append(hpa)
        self._lvl_arr[lvl].append(hpa)
        if lvl > 1:
            self.kids[hpa] = [0] * 512
            self.slots[hpa] = bytearray(512 * HBYTES)
            self.nkids[hpa] = [0] * NCHUNKS

    def _link(self, p, i, c):
        """Record table c as the child of entry i of table p."""
        if self.kids[p][i] == 0:
            self.nkids[p][i // CHUNK_ENTRIES] += 1
        self.kids[p][i] = c
        self.parent[c] = (p, i)

    def _rebuild(self):
        """Hash the whole shadow (construction)."""
        for d in (self.kids, self.slots, self.nkids, self.parent, self.chunk_h, self.node_h,
                  self.line_h):
            d.clear()
        for lst in self._by_level.values():
            lst.clear()
        for lvl in self._lvl_arr:
            self._lvl_arr[lvl] = array("Q")
        if self._c is not None:
            for d in (self._slots_c, self._chunk_c, self._lines_c):
                d.clear()
        levels, pages = self.shadow.levels, self.shadow.pages
        for hpa in levels:
            self._new_page(hpa)
        for hpa, lvl in levels.items():
            if lvl == 1:
                continue
            for i, e in enumerate(struct.unpack_from("<512Q", pages[hpa])):
                if e & P and not e & PS and (e & ADDR) in levels:
                    self._link(hpa, i, e & ADDR)
        dirty = self.dirty
        pending = self._ptabs.pending if self._ptabs is not None else set()
        for hpa in levels:
            self._rehash_lines(hpa, None)
            dirty[hpa >> 12] = ALL_CHUNKS
            pending.add(hpa)
        self._flush(force=True)

    def _flush(self, force=False):
        """Bring stale chunk, node and root hashes up to date, leaves first."""
        dirty = self.dirty
        pending = set()
        if self._ptabs is not None:
            # a set never shrinks its table, and iterating it costs its size:
            # a to-do that once held every page is copied small again
            pending = self._ptabs.pending = set(self._ptabs.pending)
        slots, parent, node_h = self.slots, self.parent, self.node_h
        changed = force
        for lvl in (1, 2, 3, 4):
            for t in self._stale(lvl):
                m = dirty[t >> 12]
                if not m:
                    pending.discard(t)
                    continue
                self._rehash_chunks(t, m)
                dirty[t >> 12] = 0
                pending.discard(t)
                changed = True
                par = parent.get(t)
                if par is not None:
                    p, i = par
                    slots[p][i * HBYTES:(i + 1) * HBYTES] = node_h[t]
                    dirty[p >> 12] |= 1 << (i // CHUNK_ENTRIES)
                    pending.add(p)
        if changed:
            self._digest = self._root_digest()

    def _stale(self, lvl):
        """Level-lvl table pages that may be stale: with the C core, those
        marked since the last flush (PageTables.pending), or after a log
        overflow those with a nonzero mask (psp_dirty_scan); the Python twin
        returns all (the same pages come out: _flush skips a zero mask)."""
        pages = self._by_level[lvl]
        if self._c is None or not pages or isinstance(self.dirty, _NoDirtyArray):
            return pages
        pt = self._ptabs
        if pt is not None and pt._ctx is not None:
            pt.drain_log()
            if pt.epoch == self._epoch:
                levels = self.shadow.levels
                return [t for t in pt.pending if levels.get(t) == lvl]
            if lvl == 4:
                self._epoch = pt.epoch      # this flush scans; the next can trust the log
        ffi = _core.ffi
        arr = self._lvl_arr[lvl]
        if self._scan_out is None or len(self._scan_out) < len(arr):
            self._scan_out = ffi.new("uint32_t[]", max(1024, 2 * len(arr)))
        k = self._c.psp_dirty_scan(ffi.from_buffer(self.dirty), ffi.from_buffer("uint64_t[]", arr),
                                   len(arr), self._scan_out)
        return [pages[i] for i in ffi.unpack(self._scan_out, k)]

    # ------------------------------------------------------------------
    # checks
    def _root_pointer_mismatch(self):
        found = self._read_u64(self.vmsa)
        if (found & ADDR) != self.shadow.root:
            return Mismatch(self.vmsa, 0, self.shadow.root, found, "root pointer")
        return None

    def _locate_in(self, hpa, mem, lo_entry=0, hi_entry=512):
        sh = self.shadow.pages[hpa]
        for i in range(lo_entry, hi_entry):
            a = _Q.unpack_from(sh, i * 8)[0]
            b = _Q.unpack_from(mem, i * 8)[0]
            if a != b:
                return Mismatch(hpa, i, a, b, "table entry")
        return None

    def _path_lines(self, gpa, level, npages):
        """[(table hpa, line)] for every entry the update's walk reads or
        writes, following the (trusted) shadow, root first, no repeats.
        The C fast path (psp_update_fast) checks the same lines."""
        sh = self.shadow
        pages, levels = sh.pages, sh.levels
        out = []
        seen = set()
        size = level_size(level)
        end = gpa + npages * size
        step = size * LINE_ENTRIES       # one leaf line covers this much
        va = gpa
        unpack = _Q.unpack_from
        while va < end:
            t = sh.root
            for lvl in range(4, level - 1, -1):
                i = (va >> _SHIFT[lvl]) & 511
                key = (t, i >> 3)
                if key not in seen:
                    seen.add(key)
                    out.append(key)
                if lvl == level:
                    break
                e = unpack(pages[t], i * 8)[0]
                if not e & P or e & PS or (e & ADDR) not in levels:
                    break
                t = e & ADDR
            va = (va // step + 1) * step
        return out

    def check_before_update(self, gpa=None, level=None, npages=1):
        """Verify the root pointer and every line on the update's walk path:
        re-hash each from host memory and compare with the stored hash."""
        mm = self._root_pointer_mismatch()
        if mm is not None:
            return mm
        if gpa is None or level is None:
            return self.verify_all()
        path = self._path_lines(gpa, level, max(1, npages or 1))
        c = self._c
        if c is not None and self._memc is not None:
            # C: hash each line straight from host memory, A/D masked
            memc, lp, check = self._memc, self._lines_c, c.psp_line_check
            for hpa, k in path:
                if not check(memc + (hpa + k * LINE_BYTES), lp[hpa] + k * HBYTES):
                    return self._line_mismatch(hpa, k)
            return None
        line_h, canon = self.line_h, self._canon
        mem = None
        last = None
        for hpa, k in path:
            if hpa != last:
                mem = canon(hpa)
                last = hpa
            if line_hash(mem[k * LINE_BYTES:(k + 1) * LINE_BYTES]) != \
                    line_h[hpa][k * HBYTES:(k + 1) * HBYTES]:
                return self._line_mismatch(hpa, k, mem)
        return None

    def _line_mismatch(self, hpa, k, mem=None):
        if mem is None:
            mem = self._canon(hpa)
        lo = k * LINE_ENTRIES
        return (self._locate_in(hpa, mem, lo, lo + LINE_ENTRIES)
                or Mismatch(hpa, lo, 0, 0, "line hash"))

    def verify_all(self):
        """Periodic check: recompute the whole tree from host memory, bottom-up,
        and compare the root digest. None if it matches."""
        mm = self._root_pointer_mismatch()
        if mm is not None:
            return mm
        self._flush()
        plan = self._verify_plan()
        if plan.c_args is not None:
            return self._verify_all_c(plan)
        return self._verify_all_py(plan.order)

    def _verify_plan(self):
        """The check's page order (leaves first; within a level, the shadow's
        order), kept until the set of table pages or of parent links
        changes: during a guest's life pages are only ever added (_new_page,
        _link), so their counts say when to rebuild."""
        levels = self.shadow.levels
        key = (self.shadow.root, len(levels), len(self.parent))
        plan = self._vplan
        if plan is None or plan.key != key:
            plan = self._vplan = _VerifyPlan(self, key)
        return plan

    def _verify_all_c(self, plan):
        """The C check (psp_merkle_verify): one call hashes every page in
        place in host memory; Python only names a mismatch."""
        c = self._c
        c.psp_merkle_verify(self._memc, *plan.c_args, self._out)
        if self._obuf[:] == self._digest:
            return None
        nodes, node_h = plan.nodes_buf, self.node_h
        for k, hpa in enumerate(plan.order):
            if nodes[k * HBYTES:(k + 1) * HBYTES] != node_h[hpa]:
                mem = self._canon(hpa)
                return self._locate_in(hpa, mem) or Mismatch(hpa, 0, 0, 0, "node hash")
        return Mismatch(0, 0, 0, 0, "digest")

    def _verify_all_py(self, order):
        """The check in Python, a page at a time from canonical copies (the
        twin of psp_merkle_verify; the C core hashes each copy when it is
        built but has no host memory to read in place)."""
        levels = self.shadow.levels
        mem_node = {}
        mem_slots = {h: bytearray(512 * HBYTES) for h in self.slots}
        bad = None
        node_h = self.node_h
        c = self._c
        if c is not None:
            ffi = _core.ffi
            chunks_c = ffi.new("char[]", NCHUNKS * HBYTES)
            out, obuf, null = self._out, self._obuf, self._null
        for hpa in order:
            mem = self._canon(hpa)
            s = mem_slots.get(hpa)
            if c is not None:
                c.psp_page_hash(mem, 0, ffi.from_buffer(s) if s is not None else null,
                                _slot_mask(self.nkids.get(hpa)), hpa, levels[hpa], chunks_c, out)
                h = mem_node[hpa] = obuf[:]
            else:
                chunks = [self._chunk_hash(mem, hpa, j, s) if s is not None
                          else _sha(b"C" + mem[j * CHUNK_BYTES:(j + 1) * CHUNK_BYTES]).digest()
                          for j in range(NCHUNKS)]
                h = mem_node[hpa] = self._node_hash(hpa, levels[hpa], b"".join(chunks))
            par = self.parent.get(hpa)
            if par is not None:
                p, i = par
                mem_slots[p][i * HBYTES:(i + 1) * HBYTES] = h
            if bad is None and h != node_h[hpa]:
                bad = (hpa, mem)
        root = self.shadow.root
        if c is not None:
            c.psp_root_hash(root, mem_node[root], out)
            ok = obuf[:] == self._digest
        else:
            ok = _sha(_ROOT_HDR.pack(b"R", root) + mem_node[root]).digest() == self._digest
        if ok:
            return None
        if bad is not None:
            hpa, mem = bad
            return self._locate_in(hpa, mem) or Mismatch(hpa, 0, 0, 0, "node hash")
        return Mismatch(0, 0, 0, 0, "digest")

    # ------------------------------------------------------------------
    # update
    def after_update(self, modified):
        """The PSP wrote `modified` (table hpa -> the lines it wrote, from
        the shadow): re-hash those lines now and mark their chunks stale;
        the next _flush re-hashes them and carries the change up the tree."""
        dirty = self.dirty
        new = [t for t in modified if t not in self.line_h]
        for t in new:
            self._new_page(t)
        for t in new:
            self._attach(t, modified)
        for t, lines in modified.items():
            # a new table's shadow was all zeros: its other lines keep the
            # zero-line hash _new_page gave them
            self._rehash_lines(t, lines)
            if t in new:
                m = ALL_CHUNKS
            else:
                m = 0
                for k in lines:
                    m |= 1 << (k // LINES_PER_CHUNK)
            dirty[t >> 12] |= m
            if self._ptabs is not None:
                self._ptabs.pending.add(t)

    def _attach(self, t, modified_pages):
        """Find the new table t's parent entry among the modified pages."""
        if t == self.shadow.root or t in self.parent:
            return
        levels, pages = self.shadow.levels, self.shadow.pages
        want_level = levels[t] + 1
        needle = _Q.pack(t)[1:]          # the address bytes above the flags
        # the modified pages first (the new table's parent is written in the
        # same update), lazily: copying every table page's key per new table
        # made a guest's table-building quadratic
        for p in chain(modified_pages, levels):
            if levels.get(p) != want_level:
                continue
            page = pages[p]
            pos = page.find(needle, 1)
            while pos >= 0:
                if pos % 8 == 1:
                    e = _Q.unpack_from(page, pos - 1)[0]
                    if e & P and not e & PS and (e & ADDR) == t:
                        self._link(p, (pos - 1) // 8, t)
                        return
                pos = page.find(needle, pos + 1)
