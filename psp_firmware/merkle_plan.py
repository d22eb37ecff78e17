"""The full check's plan (merkle.py verify_all with the C core): the order
in which psp_merkle_verify hashes a guest's table pages, leaves first, and
the pointers it needs, made once per table set and kept until the set
changes."""
from array import array
from functools import reduce
from operator import or_

from . import core as _core
from .integrity import PAGE

HBYTES = 32         # one SHA-256 hash


def _slot_mask(nkids):
    """Bit j set when chunk j has child tables (its hash covers their slots)."""
    if nkids is None:
        return 0
    m = 0
    for j, n in enumerate(nkids):
        if n:
            m |= 1 << j
    return m



class _VerifyPlan:
    """What MerkleIntegrity.verify_all walks, made once per set of table
    pages: `order` (leaves first, a stable sort by level of the shadow's
    order: the mismatch reported is the first page in it whose node hash
    differs) and, for the C core with host memory, the arguments of
    psp_merkle_verify after `mem` (None: the check runs in Python)."""
    __slots__ = ("key", "order", "c_args", "nodes_buf", "_keep")

    def __init__(self, integ, key):
        self.key = key
        levels = integ.shadow.levels
        self.order = order = sorted(levels, key=levels.__getitem__)
        self.c_args = self.nodes_buf = self._keep = None
        memc = integ._memc if integ._c is not None else None
        if memc is None or not order:
            return
        if reduce(or_, order) & 0xFFF or max(order) + PAGE > len(memc):
            return                 # the Python check raises what canon_page raises
        ffi = _core.ffi
        n = len(order)
        pos = {h: k for k, h in enumerate(order)}
        slots_of = array("i", [-1]) * n         # page k's slot buffer in scratch
        mask = bytearray(n)                     # page k's slot mask
        nslots = 0
        nkids = integ.nkids
        for h in integ.slots:
            k = pos[h]
            slots_of[k] = nslots
            mask[k] = _slot_mask(nkids[h])
            nslots += 1
        parent_at = array("q", [-1]) * n        # where page k's node hash goes
        for h, (p, i) in integ.parent.items():
            parent_at[pos[h]] = slots_of[pos[p]] * (512 * HBYTES) + i * HBYTES
        hpa_c = ffi.new("uint64_t[]", order)
        level_c = ffi.from_buffer("uint8_t[]", bytes(map(levels.__getitem__, order)))
        mask_c = ffi.from_buffer("uint8_t[]", mask)
        slots_c = ffi.from_buffer("int32_t[]", slots_of)
        parent_c = ffi.from_buffer("int64_t[]", parent_at)
        scratch_len = max(1, nslots) * 512 * HBYTES
        scratch_c = ffi.new("char[]", scratch_len)
        nodes_c = ffi.new("char[]", n * HBYTES)
        self.nodes_buf = ffi.buffer(nodes_c)
        self._keep = (mask, slots_of, parent_at)
        root = integ.shadow.root
        self.c_args = (n, hpa_c, level_c, mask_c, slots_c, parent_c, scratch_c, scratch_len,
                       nodes_c, pos[root], root)
