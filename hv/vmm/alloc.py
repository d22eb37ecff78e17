"""The VMM's host-physical frame allocator (untrusted bookkeeping).

A bitmap-free design: a sorted list of free extents, first fit with
alignment. Allocation order is deterministic so runs are reproducible.
"""
import bisect

PAGE = 4096


class OutOfMemory(Exception):
    pass


class FrameAllocator:
    def __init__(self, base, limit):
        if base % PAGE or limit % PAGE or limit <= base:
            raise ValueError("allocator range must be page aligned and non-empty")
        self._starts = [base]       # sorted extent starts
        self._ends = {base: limit}  # start -> end (exclusive)
        self.base, self.limit = base, limit
        self.allocated = 0

    def alloc(self, n=1, align=PAGE):
        size = n * PAGE
        starts, ends = self._starts, self._ends
        if starts and align == PAGE and size > 0:
            # the common case: a page-aligned run from the first extent
            s = starts[0]
            e = ends[s]
            b = s + size
            if b <= e:
                del ends[s]
                if b < e:
                    starts[0] = b       # still the lowest start
                    ends[b] = e
                else:
                    del starts[0]
                self.allocated += n
                return s
        for i, s in enumerate(starts):
            e = ends[s]
            a = (s + align - 1) // align * align
            if a + size <= e:
                self._take(i, s, e, a, a + size)
                self.allocated += n
                return a
        raise OutOfMemory(f"host memory exhausted: no {size // 1024} KiB run free "
                          f"(use a larger --host-mem)")

    def _take(self, i, s, e, a, b):
        """Cut [a, b) out of extent i = [s, e); the pieces left stay in
        order, in place (no re-sort)."""
        starts, ends = self._starts, self._ends
        if b < a:                       # a negative count: re-sort, as it always did
            del starts[i]
            del ends[s]
            if s < a:
                self._insert(s, a)
            if b < e:
                self._insert(b, e)
        elif s < a:
            ends[s] = a                 # the left piece keeps index i
            if b < e:
                starts.insert(i + 1, b)
                ends[b] = e
        else:
            del ends[s]
            if b < e:
                starts[i] = b
                ends[b] = e
            else:
                del starts[i]

    def _insert(self, s, e):
        bisect.insort(self._starts, s)
        self._ends[s] = e

    def reserve(self, hpa, n=1):
        """Take a specific range out of the free list (it must be free)."""
        b = hpa + n * PAGE
        for i, s in enumerate(self._starts):
            e = self._ends[s]
            if s <= hpa and b <= e:
                self._take(i, s, e, hpa, b)
                self.allocated += n
                return hpa
        raise OutOfMemory(f"range {hpa:#x}+{n} pages is not free")

    def alloc_each(self, k):
        """k frames, the ones k calls of alloc(1) would return, in that order
        (fewer when memory runs out: as many as there are)."""
        out = []
        starts, ends = self._starts, self._ends
        while len(out) < k and starts:
            s = starts[0]
            e = ends.pop(s)
            take = min(k - len(out), (e - s) // PAGE)
            out.extend(range(s, s + take * PAGE, PAGE))
            b = s + take * PAGE
            if b < e:
                starts[0] = b
                ends[b] = e
            else:
                del starts[0]
            self.allocated += take
        return out

    def free_each(self, hpas):
        """Give back frames taken one by one (alloc_each): runs merged."""
        n = len(hpas)
        if n > 1 and hpas[-1] - hpas[0] == (n - 1) * PAGE and \
                list(hpas) == list(range(hpas[0], hpas[0] + n * PAGE, PAGE)):
            self.free(hpas[0], n)      # one run (what alloc_each mostly hands out)
            return
        i = 0
        while i < n:
            j = i + 1
            while j < n and hpas[j] == hpas[j - 1] + PAGE:
                j += 1
            self.free(hpas[i], j - i)
            i = j

    def free(self, hpa, n=1):
        s, e = hpa, hpa + n * PAGE
        i = bisect.bisect_left(self._starts, s)
        # merge with the previous and next extents
        if i > 0:
            ps = self._starts[i - 1]
            if self._ends[ps] > s:
                raise ValueError(f"double free of {hpa:#x}")
            if self._ends[ps] == s:
                s = ps
                del self._starts[i - 1]
                del self._ends[ps]
                i -= 1
        if i < len(self._starts):
            ns = self._starts[i]
            if ns < e:
                raise ValueError(f"double free of {hpa:#x}")
            if ns == e:
                e = self._ends.pop(ns)
                del self._starts[i]
        self._insert(s, e)
        self.allocated -= n

    def free_pages(self):
        return sum(self._ends[s] - s for s in self._starts) // PAGE
