"""Guest RAM of a KVM VM, filled page by page from what the PSP's table says.

One memslot covers guest-physical [0, RAM).  Its host range is reserved
(PROT_NONE, nothing behind it), so KVM sees no memory there: a guest access
exits to the VMM (KVM_EXIT_MMIO on this host; KVM_EXIT_MEMORY_FAULT or an
emulation failure elsewhere).  A page appears in it only where the PSP's
nested page table maps it: :meth:`GuestRam.map_gpa` walks the table (the
NPT engine, C by default) and maps the host-memory file at offset HPA over
that guest page (``mmap(MAP_FIXED | MAP_SHARED)`` of the memfd/file behind
host memory).  What the guest sees is what the table says, never what the
VMM meant to map.

A 2 MiB leaf maps its whole 2 MiB; ``around`` (fault-around) maps every page
of a window the table maps.  Runs of pages with consecutive HPAs go in one
mmap.  When the table changes (UNMAP, RECLAIM, a malicious write),
:meth:`GuestRam.resync` makes the memslot what the table says again (remap,
unmap, map); the kernel's MMU notifiers make KVM drop the stale
translation.  :meth:`resync` on a new VM maps the launch pages.
A page the table maps read-only (W clear) is mapped read-only, so a guest
write to it exits (a protection fault); NX cannot be expressed in a host
mapping and is not enforced here.

Thread-safe (one lock): several vCPU threads may fault at once.
"""
import ctypes
import mmap
import threading

from nptcore.bits import ACC_R, ACC_W, W

PAGE = 4096
HUGE = 2 << 20
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_RESERVE = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long)
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


class GuestRamError(Exception):
    """A host mapping could not be made (e.g. vm.max_map_count reached)."""


def _check(addr, want, what):
    if addr == _MAP_FAILED or addr is None or (want is not None and addr != want):
        err = ctypes.get_errno()
        import os
        raise GuestRamError(f"{what}: {os.strerror(err) if err else 'mmap failed'}"
                            + (" (vm.max_map_count reached?)" if err == 12 else ""))
    return addr


class GuestRam:
    """The memslot over guest RAM [0, ram_size) of ``kvm_vm`` (a KvmVm).

    mem: host memory (``.fd``: a memfd or file, ``.size``); engine: the NPT
    engine over it; root(): the table root the CPU would use now (nCR3 read
    from the control page); rmp: the rmp design's RMP view of the guest
    (every lookup is RMP-checked: a page that fails it is not mapped, and its
    miss carries PF_RMP), or None."""

    def __init__(self, kvm_vm, mem, engine, root, ram_size, rmp=None):
        if mem.fd is None:
            raise GuestRamError("host memory is anonymous: KVM needs it in a memfd or file")
        self.fd = mem.fd
        self.mem_size = mem.size
        self.engine = engine
        self.root = root
        self.rmp = rmp
        self.size = ram_size
        self.pages = {}          # guest page number -> (hpa, writable) as KVM sees it
        self.maps = 0            # mmap calls made
        self.lock = threading.RLock()
        self.base = _check(_mmap(None, ram_size, PROT_NONE, _RESERVE, -1, 0), None,
                           f"reserve {ram_size >> 20} MiB for guest RAM")
        try:
            self.slot = kvm_vm.add_slot(0, ram_size, self.base)
        except BaseException:
            _munmap(self.base, ram_size)
            self.base = None
            raise

    # -- host mappings -------------------------------------------------------
    def _map(self, page, hpa, n, writable):
        addr = self.base + (page << 12)
        prot = PROT_READ | (PROT_WRITE if writable else 0)
        if _mmap(addr, n << 12, prot, MAP_SHARED | MAP_FIXED, self.fd, hpa) != addr:
            _check(_MAP_FAILED, addr, f"map GPA {page << 12:#x} -> HPA {hpa:#x}")
        self.maps += 1
        pages = self.pages
        if n == 1:
            pages[page] = (hpa, writable)
            return
        for i in range(n):
            pages[page + i] = (hpa + (i << 12), writable)

    def _unmap(self, page, n):
        addr = self.base + (page << 12)
        _check(_mmap(addr, n << 12, PROT_NONE, _RESERVE | MAP_FIXED, -1, 0), addr,
               f"unmap GPA {page << 12:#x}")
        self.maps += 1
        for i in range(n):
            self.pages.pop(page + i, None)

    def _map_runs(self, items):
        """items: sorted [(page, hpa, writable)]; one mmap per run of
        consecutive pages with consecutive HPAs and the same permission."""
        i, n = 0, len(items)
        while i < n:
            p0, h0, w0 = items[i]
            j = i + 1
            while j < n and items[j][0] == p0 + (j - i) and items[j][1] == h0 + ((j - i) << 12) \
                    and items[j][2] == w0:
                j += 1
            self._map(p0, h0, j - i, w0)
            i = j

    # -- the table -> the memslot ----------------------------------------------
    def lookup(self, gpa, access=ACC_R, set_ad=True):
        """Walk the table for gpa as an access of that kind: (True, hpa of the
        page, writable, leaf level), or (False, the walk's miss) where it
        maps nothing (or refuses that kind of access)."""
        eng, root, rmp = self.engine, self.root(), self.rmp
        if rmp is not None:
            def walk(g, a, ad):
                return eng.walk_rmp(root, g, a, rmp, ad)
        else:
            def walk(g, a, ad):
                return eng.walk(root, g, a, ad)
        r = walk(gpa, access, set_ad)
        if not r.ok:
            return False, r, None, None
        # writable only if a write would pass the whole walk (every level's W)
        writable = access == ACC_W or (bool(r.entry & W) and walk(gpa, ACC_W, False).ok)
        return True, r.hpa & ~0xFFF, writable, r.level

    def map_gpa(self, gpa, access=ACC_R, around=1):
        """Map the page at gpa as the table says (and, for a 2 MiB leaf, its
        block; with around > 1, every page of the aligned window the table
        maps).  Returns (True, hpa of gpa's page, writable), or (False, the
        walk's miss) if the table does not map it for that access."""
        with self.lock:
            ok, hpa, writable, level = self.lookup(gpa, access)
            if not ok:
                return False, hpa
            page = gpa >> 12
            if level == 1 and around == 1:          # the common case, without lists
                self._map(page, hpa, 1, writable)
                return True, hpa, writable
            limit = self.size >> 12
            if level == 2:
                first = page & ~511
                base = hpa - ((page - first) << 12)
                lo, hi = first, min(first + 512, limit)
                items = [(p, base + ((p - first) << 12), writable) for p in range(lo, hi)
                         if self.pages.get(p) != (base + ((p - first) << 12), writable)]
            else:
                items = [(page, hpa, writable)]
            if around > 1 and level == 1:
                items += self._window(page, around, limit)
                items.sort()
            self._map_runs(items)
            return True, hpa, writable

    def _window(self, page, around, limit):
        lo = page - page % around
        out = []
        for p in range(lo, min(lo + around, limit)):
            if p == page or p in self.pages:
                continue
            ok, hpa, writable, level = self.lookup(p << 12, ACC_R, set_ad=False)
            if ok and level == 1:
                out.append((p, hpa, writable))
        return out

    def table_pages(self):
        """Guest pages [0, RAM) the table maps now (sorted)."""
        out = []
        limit = self.size
        for gpa, _hpa, size, _entry in self.engine.mappings(self.root()):
            if gpa < limit:
                out.extend(range(gpa >> 12, min(gpa + size, limit) >> 12))
        out.sort()
        return out

    def resync(self):
        """Make the memslot what the table says again: remap pages that point
        elsewhere now (or changed permission), unmap what the table no longer
        maps, map what it maps anew.  (KVM reads the guest's own page tables
        itself, without an exit: a table page it cannot reach would be a
        guest #PF, so every page the table maps is mapped.)  Returns the
        number of pages changed."""
        with self.lock:
            change, gone = [], []
            want = self.table_pages()
            for page in sorted(set(want).union(self.pages)):
                ok, h, w, _ = self.lookup(page << 12, ACC_R, set_ad=False)
                if not ok:
                    if page in self.pages:
                        gone.append(page)
                elif self.pages.get(page) != (h, w):
                    change.append((page, h, w))
            i = 0
            while i < len(gone):
                j = i + 1
                while j < len(gone) and gone[j] == gone[i] + (j - i):
                    j += 1
                self._unmap(gone[i], j - i)
                i = j
            self._map_runs(change)
            return len(change) + len(gone)

    def mapped(self, gpa):
        """(hpa, writable) KVM sees at gpa's page, or None."""
        return self.pages.get(gpa >> 12)

    def close(self):
        if self.base is not None:
            _munmap(self.base, self.size)
            self.base = None
            self.pages = {}
