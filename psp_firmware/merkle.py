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

The PSP keeps C and N for every table page (40 bytes per chunk... 288 bytes
per page) next to its shadow copy of the table (`ShadowNpt`, integrity.py).

What each mode detects, and when
--------------------------------
full (patent-literal): before every UPDATE_NPT / UNMAP / LAUNCH_UPDATE_DATA the
    PSP recomputes SHA-256 over the root pointer and *every* table page read
    from host memory and compares it with the stored digest. Any change to any
    table page (other than A/D bits) or to the root pointer (nCR3 in the VMSA)
    is refused by the very next update, and found by VERIFY / CHECK_ALL.
    Cost: O(table pages) per update.

merkle (default): before an update the PSP checks the root pointer and
    re-hashes from host memory the chunk holding every entry the update's walk
    reads or writes: for each page of the update (all `npages` of them), the
    chunk of its entry at each level from the root down to the leaf (or down to
    the first absent entry, below which the PSP creates fresh, scrubbed tables).
    Each is compared with the stored chunk hash. A tamper on that path, i.e.
    in any of the 64-entry chunks the walk goes through at any level
    (a re-pointed PML4/PDPT/PD entry, a pre-planted or altered leaf, a
    permission flip next to the slot being filled), is refused by that update
    and the guest is stopped, exactly as in full mode. A tamper anywhere else
    (another chunk, another table page) is not looked at by the update; it is
    caught by the next periodic check (CHECK_ALL) or VERIFY, which recompute
    every chunk and node hash bottom-up from host memory and compare the
    resulting root digest, as full mode does. Cost: O(depth) per update,
    independent of guest size; O(table pages) per periodic check.

In both modes the new digest is computed from the PSP's shadow, never from
host memory after the write, so a VMM racing the PSP cannot get its value
folded into the digest; A/D bits are cleared before hashing (hardware sets
them; that is not tampering). A mismatch is reported as the same `Mismatch`
(table page, entry index, expected, found) by comparing against the shadow.
"""
import hashlib
import struct

from . import core as _core
from .integrity import ADDR, PS, P, Mismatch, level_size

CHUNK_ENTRIES = 64
CHUNK_BYTES = CHUNK_ENTRIES * 8
NCHUNKS = 512 // CHUNK_ENTRIES
HBYTES = 32
SLOT_BYTES = CHUNK_ENTRIES * HBYTES      # child-hash slots of one chunk

_Q = struct.Struct("<Q")
_NODE_HDR = struct.Struct("<cQB")
_ROOT_HDR = struct.Struct("<cQ")
_sha = hashlib.sha256
_SHIFT = {1: 12, 2: 21, 3: 30, 4: 39}


def _slot_mask(nkids):
    """Bit j set when chunk j has child tables (its hash covers their slots)."""
    if nkids is None:
        return 0
    m = 0
    for j, n in enumerate(nkids):
        if n:
            m |= 1 << j
    return m


class MerkleIntegrity:
    mode = "merkle"
    mode_id = 1

    def __init__(self, shadow, canon_page, read_u64, vmsa, mem=None, core=None):
        self.shadow = shadow
        self._canon = canon_page
        self._read_u64 = read_u64
        self.vmsa = vmsa
        # the C core (csrc/psp_core.c) or None (the Python twin); same hashes
        self._c = _core.resolve(core)
        self.chunk_h = {}     # hpa -> bytearray(NCHUNKS * 32): the chunk hashes, in order
        self.node_h = {}      # hpa -> node hash
        self.kids = {}        # hpa (level > 1) -> list of 512 child table hpas (0: none)
        self.slots = {}       # hpa (level > 1) -> bytearray(512 * 32): child node hashes by index
        self.nkids = {}       # hpa (level > 1) -> list of NCHUNKS child counts
        self.parent = {}      # child table hpa -> (parent hpa, index)
        self._pending = None  # what check_before_update verified, for after_update
        if self._c is not None:
            ffi = _core.ffi
            # host memory (read only here: the path check hashes chunks in place)
            self._memc = ffi.from_buffer(mem) if mem is not None else None
            self._shadow_c = shadow.c_pages()
            self._slots_c = _core.Ptrs(self.slots)
            self._chunk_c = _core.Ptrs(self.chunk_h)
            self._out = ffi.new("char[32]")
            self._obuf = ffi.buffer(self._out)
            self._null = ffi.NULL
        self._rebuild()

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
        if c is not None:
            root = self.shadow.root
            c.psp_root_hash(root, self.node_h[root], self._out)
            return self._obuf[:]
        return _sha(_ROOT_HDR.pack(b"R", self.shadow.root) + self.node_h[self.shadow.root]).digest()

    def _hash_page_full(self, hpa):
        """All chunks and the node hash of a page, from the shadow."""
        c = self._c
        if c is not None:
            if hpa not in self.chunk_h:
                self.chunk_h[hpa] = bytearray(NCHUNKS * HBYTES)
            n = self.nkids.get(hpa)
            c.psp_page_hash(self._shadow_c[hpa], 0,
                            self._slots_c[hpa] if n is not None else self._null,
                            _slot_mask(n), hpa, self.shadow.levels[hpa],
                            self._chunk_c[hpa], self._out)
            self.node_h[hpa] = self._obuf[:]
            return
        page = self.shadow.pages[hpa]
        chunks = b"".join([self._chunk_hash(page, hpa, j) for j in range(NCHUNKS)])
        ch = self.chunk_h.get(hpa)
        if ch is None:
            self.chunk_h[hpa] = bytearray(chunks)
        else:
            ch[:] = chunks               # in place: the C core may hold a pointer to it
        self.node_h[hpa] = self._node_hash(hpa, self.shadow.levels[hpa], chunks)

    def _new_node(self, hpa):
        if self.shadow.levels[hpa] > 1:
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
        for d in (self.kids, self.slots, self.nkids, self.parent, self.chunk_h, self.node_h):
            d.clear()
        if self._c is not None:
            for d in (self._slots_c, self._chunk_c):
                d.clear()
        levels, pages = self.shadow.levels, self.shadow.pages
        for hpa in levels:
            self._new_node(hpa)
        for hpa, lvl in levels.items():
            if lvl == 1:
                continue
            for i, e in enumerate(struct.unpack_from("<512Q", pages[hpa])):
                if e & P and not e & PS and (e & ADDR) in levels:
                    self._link(hpa, i, e & ADDR)
        for hpa in sorted(levels, key=lambda h: levels[h]):     # leaves first
            self._hash_page_full(hpa)
            par = self.parent.get(hpa)
            if par is not None:
                p, i = par
                self.slots[p][i * HBYTES:(i + 1) * HBYTES] = self.node_h[hpa]
        self.digest = self._root_digest()

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

    def _path_chunks(self, gpa, level, npages):
        """[(table hpa, chunk)] for every entry the update's walk reads or
        writes, following the (trusted) shadow, root first, no repeats."""
        sh = self.shadow
        pages, levels = sh.pages, sh.levels
        out = []
        seen = set()
        size = level_size(level)
        end = gpa + npages * size
        step = size * CHUNK_ENTRIES       # one leaf chunk covers this much
        va = gpa
        unpack = _Q.unpack_from
        while va < end:
            t = sh.root
            for lvl in range(4, level - 1, -1):
                i = (va >> _SHIFT[lvl]) & 511
                key = (t, i >> 6)
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
        """Verify the root pointer and every chunk on the update's walk path:
        re-hash each from host memory and compare with the stored hash."""
        self._pending = None
        mm = self._root_pointer_mismatch()
        if mm is not None:
            return mm
        if gpa is None or level is None:
            return self.verify_all()
        path = self._path_chunks(gpa, level, max(1, npages or 1))
        chunk_h = self.chunk_h
        canon = self._canon
        c = self._c
        if c is not None and self._memc is not None:
            # C: hash each chunk straight from host memory, A/D masked
            memc, chp, slp, nkids, null = (self._memc, self._chunk_c, self._slots_c,
                                           self.nkids, self._null)
            check = c.psp_chunk_check
            for hpa, j in path:
                n = nkids.get(hpa)
                s = slp[hpa] + j * SLOT_BYTES if n is not None and n[j] else null
                if not check(memc + (hpa + j * CHUNK_BYTES), 1, s, chp[hpa] + j * HBYTES):
                    mem = canon(hpa)
                    return (self._locate_in(hpa, mem, j * CHUNK_ENTRIES, (j + 1) * CHUNK_ENTRIES)
                            or Mismatch(hpa, j * CHUNK_ENTRIES, 0, 0, "chunk hash"))
            self._pending = path
            return None
        mem = None
        last = None
        for hpa, j in path:
            if hpa != last:
                mem = canon(hpa)
                last = hpa
            if self._chunk_hash(mem, hpa, j) != chunk_h[hpa][j * HBYTES:(j + 1) * HBYTES]:
                return (self._locate_in(hpa, mem, j * CHUNK_ENTRIES, (j + 1) * CHUNK_ENTRIES)
                        or Mismatch(hpa, j * CHUNK_ENTRIES, 0, 0, "chunk hash"))
        self._pending = path
        return None

    def verify_all(self):
        """Periodic check: recompute the whole tree from host memory, bottom-up,
        and compare the root digest. None if it matches."""
        mm = self._root_pointer_mismatch()
        if mm is not None:
            return mm
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
        for hpa in sorted(levels, key=lambda h: levels[h]):
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
            ok = obuf[:] == self.digest
        else:
            ok = _sha(_ROOT_HDR.pack(b"R", root) + mem_node[root]).digest() == self.digest
        if ok:
            return None
        if bad is not None:
            hpa, mem = bad
            return self._locate_in(hpa, mem) or Mismatch(hpa, 0, 0, 0, "node hash")
        return Mismatch(0, 0, 0, 0, "digest")

    # ------------------------------------------------------------------
    # update
    def after_update(self, modified_pages):
        """Re-hash the modified chunks and their ancestors, from the shadow."""
        pending, self._pending = self._pending, None
        sh = self.shadow
        levels, pages = sh.levels, sh.pages
        node_h, chunk_h = self.node_h, self.chunk_h
        if pending is not None and len(pending) <= 4:
            # fast path: one walk path, no new table, every write in a path chunk
            on_path = {t for t, _ in pending}
            if all(t in on_path for t in modified_pages):
                c = self._c
                if c is not None:
                    sp, slp, chp, nkids = self._shadow_c, self._slots_c, self._chunk_c, self.nkids
                    out, obuf, null, slots, parent = (self._out, self._obuf, self._null,
                                                      self.slots, self.parent)
                    rehash = c.psp_rehash_chunk_node
                    for t, j in reversed(pending):        # leaf first
                        n = nkids.get(t)
                        rehash(sp[t], j, slp[t] if n is not None and n[j] else null,
                               t, levels[t], chp[t], out)
                        h = node_h[t] = obuf[:]
                        par = parent.get(t)
                        if par is not None:
                            p, i = par
                            slots[p][i * HBYTES:(i + 1) * HBYTES] = h
                    self.digest = self._root_digest()
                    return
                for t, j in reversed(pending):        # leaf first
                    ch = chunk_h[t]
                    ch[j * HBYTES:(j + 1) * HBYTES] = self._chunk_hash(pages[t], t, j)
                    h = node_h[t] = self._node_hash(t, levels[t], ch)
                    par = self.parent.get(t)
                    if par is not None:
                        p, i = par
                        self.slots[p][i * HBYTES:(i + 1) * HBYTES] = h
                self.digest = self._root_digest()
                return
        self._after_update_general(modified_pages, pending or ())

    def _after_update_general(self, modified_pages, pending):
        sh = self.shadow
        levels, pages = sh.levels, sh.pages
        dirty = {}                                   # hpa -> set(chunks) or None (all)
        new = [t for t in modified_pages if t not in self.node_h]
        for t in new:
            self._new_node(t)
            dirty[t] = None
        for t in new:
            self._attach(t, modified_pages)
        announced = {}
        for t, j in pending:
            announced.setdefault(t, set()).add(j)
        for t in modified_pages:
            if t in dirty:
                continue
            s = announced.get(t)
            dirty[t] = None if s is None else set(s)
        by_level = {1: [], 2: [], 3: [], 4: []}
        for t in dirty:
            by_level[levels[t]].append(t)
        for lvl in (1, 2, 3, 4):
            for t in by_level[lvl]:
                chunks = dirty[t]
                if chunks is None:
                    self._hash_page_full(t)
                else:
                    ch = self.chunk_h[t]
                    c = self._c
                    if c is not None:
                        n = self.nkids.get(t)
                        for j in chunks:
                            c.psp_chunk_hash(self._shadow_c[t] + j * CHUNK_BYTES, 0,
                                             self._slots_c[t] + j * SLOT_BYTES
                                             if n is not None and n[j] else self._null,
                                             self._chunk_c[t] + j * HBYTES)
                    else:
                        for j in chunks:
                            ch[j * HBYTES:(j + 1) * HBYTES] = self._chunk_hash(pages[t], t, j)
                    self.node_h[t] = self._node_hash(t, lvl, ch)
                par = self.parent.get(t)
                if par is not None:
                    p, i = par
                    self.slots[p][i * HBYTES:(i + 1) * HBYTES] = self.node_h[t]
                    if p not in dirty:
                        dirty[p] = set()
                        by_level[levels[p]].append(p)
                    if dirty[p] is not None:
                        dirty[p].add(i // CHUNK_ENTRIES)
        self.digest = self._root_digest()

    def _attach(self, t, modified_pages):
        """Find the new table t's parent entry among the modified pages."""
        if t == self.shadow.root or t in self.parent:
            return
        levels, pages = self.shadow.levels, self.shadow.pages
        want_level = levels[t] + 1
        needle = _Q.pack(t)[1:]          # the address bytes above the flags
        for p in list(modified_pages) + list(levels):
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
