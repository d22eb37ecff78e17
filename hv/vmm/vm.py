"""One guest as the VMM sees it: its PSP handle, its NPF policy, and the
books of what the PSP has mapped for it (the VMM's view; the PSP's own state
is the table and its frame table).

The books (mapped, small_per_block, hpa_of) are kept as a log of mappings
in the order the PSP made them, and brought up to date from it when one of
them is read (_settle), not at every mapping: on the NPF path nothing reads
them for the common case (fault-around 1 without 2 MiB pages, where
handle_npf and the vCPU's C fast path need none of them), and building a
dict entry, a set entry and a per-block count for each NPF cost about
0.6 us of the ~3.5 us a first-touch NPF costs in all. Read at any point,
they say exactly what they would have said if kept eagerly: the log is
applied in order, so a page mapped twice keeps its last frame. huge_blocks
(a set add per 2 MiB mapping) and the counters are kept eagerly.
"""
from collections import Counter
from dataclasses import dataclass, field
from itertools import repeat

from psp_firmware import Status


@dataclass
class Vm:
    handle: int
    vmsa: int
    ram_size: int = None            # None: any GPA below 2^48 (trace replay)
    fault_around: int = 1
    huge: bool = False
    huge_blocks: set = field(default_factory=set)  # 2 MiB block numbers mapped huge
    npf: int = 0
    pages_mapped: int = 0
    # callbacks (TLB flush) after an NPT change a TLB may have cached. Not
    # called for the mapping an NPF adds: a not-present entry is never
    # cached, so making it present needs no flush (as on x86 hardware)
    on_npt_change: list = field(default_factory=list)
    fatal: Status = None
    rmp: object = None              # rmp design: the RMP view its translations are checked against
    # the books, read through the properties below
    _mapped: set = field(default_factory=set, repr=False)        # 4 KiB GPA page numbers
    _small_per_block: dict = field(default_factory=dict, repr=False)   # 2 MiB block -> 4 KiB pages
    _hpa_of: dict = field(default_factory=dict, repr=False)  # first GPA page -> (hpa, npages, level)
    # mappings not yet in the books, in order: (first_page, npages, hpa, level)
    # from record, or (gpas, hpas) from record_pages (4 KiB pages, one each)
    _unsettled: list = field(default_factory=list, repr=False)

    # -- adding --------------------------------------------------------------
    def record(self, first_page, npages, hpa, level):
        """The PSP mapped GPA pages [first_page, +npages) (level 1) or the
        2 MiB block at first_page (level 2) to frames from hpa."""
        if level == 2:
            self.huge_blocks.add(first_page >> 9)
        self._unsettled.append((first_page, npages, hpa, level))
        self.pages_mapped += npages if level == 1 else 512

    def record_pages(self, gpas, hpas):
        """The PSP mapped each 4 KiB page gpas[i] to the frame hpas[i], in
        this order (the vCPU's fast path: one UPDATE_NPT each)."""
        if len(gpas) != len(hpas):
            raise ValueError(f"{len(gpas)} pages with {len(hpas)} frames")
        self._unsettled.append((gpas, hpas))
        self.pages_mapped += len(gpas)

    # -- reading ---------------------------------------------------------------
    @property
    def mapped(self):
        if self._unsettled:
            self._settle()
        return self._mapped

    @property
    def small_per_block(self):
        if self._unsettled:
            self._settle()
        return self._small_per_block

    @property
    def hpa_of(self):
        if self._unsettled:
            self._settle()
        return self._hpa_of

    def _settle(self):
        todo, self._unsettled = self._unsettled, []
        hpa_of, mapped, spb = self._hpa_of, self._mapped, self._small_per_block
        for item in todo:
            if len(item) == 2:                         # record_pages
                gpas, hpas = item
                pages = [g >> 12 for g in gpas]
                hpa_of.update(zip(pages, zip(hpas, repeat(1), repeat(1))))
                mapped.update(pages)
                for b, k in Counter(p >> 9 for p in pages).items():
                    spb[b] = spb.get(b, 0) + k
                continue
            first_page, npages, hpa, level = item
            hpa_of[first_page] = (hpa, npages, level)
            if level == 2:
                continue
            last = first_page + npages - 1
            mapped.update(range(first_page, last + 1))
            p = first_page
            while p <= last:                 # per 2 MiB block the range touches
                b = p >> 9
                n = min(last + 1, (b + 1) << 9) - p
                spb[b] = spb.get(b, 0) + n
                p += n
