"""The PSP's trusted image of a guest's NPT, and its integrity digest.

`ShadowNpt` is what the PSP believes the table is: one canonical copy of each
table page (Accessed/Dirty bits cleared), in PSP private memory. The PSP
plans every change against the shadow, writes it to host memory and to the
shadow, and computes the new digest *from the shadow*, never by re-reading
host memory after its write: a VMM thread that races the PSP between its
check and its write cannot get its own value folded into the digest; its
write shows up as a mismatch on the next check.

`FullIntegrity` is the patent-literal mode: the digest is SHA-256 over the
root pointer and every table page (in HPA order, each with its HPA and
level); every update re-hashes the whole table from host memory and compares
it with the stored digest before it writes, then re-digests. On a mismatch
the page-by-page comparison against the shadow names the first differing
entry (table page, index, expected, found).
"""
import hashlib
import struct
from collections import namedtuple

P, W, U, PS = 1, 2, 4, 0x80
NX = 1 << 63
ADDR = 0x000F_FFFF_FFFF_F000
AD = 0x60
PAGE = 4096
ZERO_PAGE = bytes(PAGE)

Mismatch = namedtuple("Mismatch", "page_hpa index expected found what")

_Q = struct.Struct("<Q")
_HDR = struct.Struct("<QB")


def index(gpa, level):
    return (gpa >> (12 + 9 * (level - 1))) & 511


def level_size(level):
    return PAGE << (9 * (level - 1))


class ShadowNpt:
    def __init__(self, root, ptabs=None):
        self.root = root
        self.pages = {}           # hpa -> canonical content
        self.levels = {}
        self.cptr = None          # hpa -> C pointer into pages[hpa] (psp_firmware.core.Ptrs)
        self.ptabs = ptabs        # psp_firmware.core.PageTables, for the C fast path, or None
        self.add_page(root, 4)

    def c_pages(self):
        """Pointers for the C core into the shadow pages (made once per page)."""
        if self.cptr is None:
            from .core import Ptrs
            self.cptr = Ptrs(self.pages)
        return self.cptr

    def entry(self, table, idx):
        return _Q.unpack_from(self.pages[table], idx * 8)[0]

    def set_entry(self, table, idx, value):
        _Q.pack_into(self.pages[table], idx * 8, value & ~AD)

    def add_page(self, hpa, level):
        self.pages[hpa] = page = bytearray(PAGE)
        self.levels[hpa] = level
        if self.ptabs is not None:
            self.ptabs.set_shadow(hpa, page)

    def drop_all(self):
        """Forget every page (DECOMMISSION): the C fast path loses them too."""
        if self.ptabs is not None:
            for hpa in self.pages:
                self.ptabs.drop(hpa)

    def leaf(self, gpa):
        """(table, idx, entry, level) of the leaf or hole covering gpa."""
        t = self.root
        for lvl in (4, 3, 2, 1):
            i = index(gpa, lvl)
            e = self.entry(t, i)
            if not e & P or lvl == 1 or e & PS:
                return t, i, e, lvl
            t = e & ADDR
        raise AssertionError("unreachable")

    def plan_map(self, gpa, level, count, leaf_of):
        """Plan `count` leaves of `level` from gpa, leaf i = leaf_of(i).

        Returns (status_name or None, writes, new_table_levels). A write is
        (table, idx, value) where table/value may be ("new", k) placeholders
        for the k-th new table page. Nothing is modified."""
        size = level_size(level)
        overlay = {}
        writes = []
        new_levels = []
        for i in range(count):
            va = gpa + i * size
            t = self.root
            for lvl in range(4, level, -1):
                idx = index(va, lvl)
                e = overlay.get((t, idx))
                if e is None:
                    e = 0 if isinstance(t, tuple) else self.entry(t, idx)
                if isinstance(e, tuple):
                    t = e
                    continue
                if not e & P:
                    nt = ("new", len(new_levels))
                    new_levels.append(lvl - 1)
                    overlay[(t, idx)] = nt
                    writes.append((t, idx, nt))
                    t = nt
                elif e & PS:
                    return "GPA_MAPPED", None, None
                else:
                    t = e & ADDR
            idx = index(va, level)
            e = overlay.get((t, idx))
            if e is None:
                e = 0 if isinstance(t, tuple) else self.entry(t, idx)
            if isinstance(e, tuple) or e & P:
                if level == 2 and not isinstance(e, tuple) and not e & PS:
                    return "RANGE_OVERLAP", None, None   # 2 MiB over existing 4 KiB mappings
                return "GPA_MAPPED", None, None
            leaf = leaf_of(i)
            overlay[(t, idx)] = leaf
            writes.append((t, idx, leaf))
        return None, writes, new_levels

    def plan_map_one_table(self, gpa, level, count):
        """plan_map for a range whose leaves all sit in one table page
        (index(gpa, level) + count <= 512): the walk above the leaf level is
        the same for every page, so it is done once. Returns
        (status_name or None, upper_writes, new_table_levels, leaf_table,
        leaf_index, first_present) where leaf_table may be a ("new", k)
        placeholder and first_present is -1 or, for an existing leaf table,
        what psp_leaf_scan returns; the caller turns that into the status
        plan_map would give. Same decisions as plan_map, in the same order."""
        t = self.root
        writes = []
        new_levels = []
        for lvl in range(4, level, -1):
            idx = index(gpa, lvl)
            e = 0 if isinstance(t, tuple) else self.entry(t, idx)
            if not e & P:
                nt = ("new", len(new_levels))
                new_levels.append(lvl - 1)
                writes.append((t, idx, nt))
                t = nt
            elif e & PS:
                return "GPA_MAPPED", None, None, None, 0, -1
            else:
                t = e & ADDR
        return None, writes, new_levels, t, index(gpa, level), -1

    def canon_bytes(self):
        return sorted(self.pages.items())


class FullIntegrity:
    mode = "full"
    mode_id = 0

    def __init__(self, shadow, canon_page, read_u64, vmsa, mem=None, core=None):
        self.shadow = shadow
        self._canon = canon_page      # hpa -> canonical bytes of the host page
        self._read_u64 = read_u64
        self.vmsa = vmsa
        self.digest = self._digest_from_shadow()

    # -- digests -----------------------------------------------------------
    def _digest(self, page_bytes):
        h = hashlib.sha256()
        h.update(_Q.pack(self.shadow.root))
        levels = self.shadow.levels
        for hpa in sorted(levels):
            h.update(_HDR.pack(hpa, levels[hpa]))
            h.update(page_bytes(hpa))
        return h.digest()

    def _digest_from_shadow(self):
        pages = self.shadow.pages
        return self._digest(lambda hpa: pages[hpa])

    def _digest_from_memory(self):
        return self._digest(self._canon)

    # -- checks ------------------------------------------------------------
    def _root_pointer_ok(self):
        return (self._read_u64(self.vmsa) & ADDR) == self.shadow.root

    def locate(self):
        """Name the first difference between host memory and the shadow."""
        if not self._root_pointer_ok():
            return Mismatch(self.vmsa, 0, self.shadow.root, self._read_u64(self.vmsa), "root pointer")
        for hpa in sorted(self.shadow.pages):
            mem = self._canon(hpa)
            sh = self.shadow.pages[hpa]
            if mem != sh:
                for i in range(512):
                    a = _Q.unpack_from(sh, i * 8)[0]
                    b = _Q.unpack_from(mem, i * 8)[0]
                    if a != b:
                        return Mismatch(hpa, i, a, b, "table entry")
        return None

    def verify_all(self):
        """Full check. None if the table matches the stored digest."""
        if self._root_pointer_ok() and self._digest_from_memory() == self.digest:
            return None
        return self.locate() or Mismatch(0, 0, 0, 0, "digest")

    def check_before_update(self, gpa=None, level=None, npages=1):
        """Patent step 3: recompute and compare before touching the table."""
        return self.verify_all()

    def after_update(self, modified):
        """Patent step 4: recompute the digest (from the trusted shadow).
        `modified` (table hpa -> lines written) is not needed: all is re-hashed."""
        self.digest = self._digest_from_shadow()
