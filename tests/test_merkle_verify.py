"""Merkle mode's full check (MerkleIntegrity.verify_all: VERIFY, CHECK_ALL,
the periodic checker) in C (csrc/psp_core.c psp_merkle_verify, hashing every
table page in place in host memory) against its Python twin.

On random tables with random tampers (A/D-only ones included, which are not
tampering), the C check, the Python twin, and the C core without host memory
(a page-at-a-time check over canonical copies) must give the same result:
None, or the same Mismatch (page, entry index, expected, found, what). The
node hashes the C check recomputes, child-hash slots included, are compared
with the documented formula computed here with hashlib.
"""
import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv import Status, Vmm
from nptcore.bits import A, AD_MASK, D, NX, P, W
from psp_firmware import core as psp_core
from psp_firmware.integrity import Mismatch
from psp_firmware.merkle import MerkleIntegrity

PAGE = 4096
MB2 = 2 << 20
needs_c = pytest.mark.skipif(not psp_core.available(), reason="C core not built")
pytestmark = needs_c


def _vmm(monkeypatch, core="c"):
    monkeypatch.setenv("HV_PSP_CORE", core)
    v = Vmm(host_mem=96 << 20, integrity="merkle", fw_size=8 << 20)
    assert v._psp_obj.core == core
    return v


def _integ(vmm, vm):
    return vmm._psp_obj._guests[vm.handle].integrity


def _gpa(pml4, pdpt, pd, pt):
    return (pml4 << 39) | (pdpt << 30) | (pd << 21) | (pt << 12)


def _build(vmm, vm, maps):
    for kind, gpa, n in maps:
        if kind == "4k":
            vmm.psp.update_npt(vm.handle, gpa, vmm.alloc.alloc(n), npages=n)
        else:
            vmm.psp.update_npt(vm.handle, gpa & ~(MB2 - 1), vmm.alloc.alloc(512, align=MB2),
                               level=2)


def _canon(page):
    ents = struct.unpack("<512Q", page)
    return struct.pack("<512Q", *[e & ~AD_MASK for e in ents])


def _reference(integ, read_page):
    """Leaves-first order, node hashes and root digest of host memory by the
    formula in merkle.py's docstring (hashlib), with the tree's shape (which
    entry holds which child table) from the PSP's records."""
    levels = integ.shadow.levels
    order = sorted(levels, key=levels.__getitem__)
    node, slots = {}, {h: bytearray(512 * 32) for h in levels if levels[h] > 1}
    for h in order:
        page = _canon(read_page(h))
        chunks = b""
        for j in range(8):
            data = b"C" + page[j * 512:(j + 1) * 512]
            if h in slots and any(integ.kids[h][j * 64:(j + 1) * 64]):
                data += slots[h][j * 2048:(j + 1) * 2048]
            chunks += hashlib.sha256(data).digest()
        node[h] = hashlib.sha256(struct.pack("<cQB", b"N", h, levels[h]) + chunks).digest()
        if h in integ.parent:
            p, i = integ.parent[h]
            slots[p][i * 32:(i + 1) * 32] = node[h]
    root = integ.shadow.root
    return order, node, hashlib.sha256(struct.pack("<cQ", b"R", root) + node[root]).digest()


def _expected(integ, read_page, read_u64):
    """What verify_all must report, from the shadow alone: the root pointer,
    else the first changed entry of the first changed page, leaves first."""
    sh = integ.shadow
    found = read_u64(integ.vmsa)
    if found & 0x000F_FFFF_FFFF_F000 != sh.root:
        return Mismatch(integ.vmsa, 0, sh.root, found, "root pointer")
    for h in sorted(sh.levels, key=sh.levels.__getitem__):
        mem = _canon(read_page(h))
        if mem != bytes(sh.pages[h]):
            a = struct.unpack("<512Q", sh.pages[h])
            b = struct.unpack("<512Q", mem)
            i = next(i for i in range(512) if a[i] != b[i])
            return Mismatch(h, i, a[i], b[i], "table entry")
    return None


def _all_checks(vmm, vm):
    """verify_all by: the live C object, its Python twin on the same state,
    a standalone Python rebuild, and the C core without host memory."""
    integ = _integ(vmm, vm)
    assert integ._c is not None and integ._memc is not None
    live = integ.verify_all()
    twin = integ._root_pointer_mismatch()
    if twin is None:                                    # the C check ran
        plan = integ._vplan
        assert plan.c_args is not None
        twin = integ._verify_all_py(plan.order)
    args = (integ.shadow, integ._canon, integ._read_u64, integ.vmsa)
    py = MerkleIntegrity(*args, core="python")
    c_nomem = MerkleIntegrity(*args, core="c")
    assert py.digest == c_nomem.digest == integ.digest
    rest = [py.verify_all(), c_nomem.verify_all()]
    assert c_nomem._vplan is None or c_nomem._vplan.c_args is None   # page at a time
    return live, twin, rest


def _read_page(vmm):
    return lambda h: vmm.mem.read(h, PAGE)


# --------------------------------------------------------------------------
IDX = st.sampled_from([0, 1, 63, 64, 200, 511])
op_map = st.tuples(st.sampled_from(["4k", "4k", "2m"]),
                   st.builds(_gpa, st.sampled_from([0, 1, 255]), IDX, IDX, IDX),
                   st.sampled_from([1, 3, 64]))
op_tamper = st.tuples(st.integers(0, 1 << 20), st.integers(0, 511),
                      st.sampled_from([A, D, A | D, W, NX, P, PAGE, 1 << 40, 1 << 55, A | W]))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(maps=st.lists(op_map, min_size=1, max_size=10),
       tampers=st.lists(op_tamper, max_size=4), root=st.booleans())
def test_c_check_equals_python_twin(monkeypatch, maps, tampers, root):
    vmm = _vmm(monkeypatch)
    try:
        vm = vmm.create_vm()
        _build(vmm, vm, maps)
        integ = _integ(vmm, vm)
        assert integ.verify_all() is None
        pages = sorted(integ.shadow.pages)
        real = False
        for pi, idx, bits in tampers:
            addr = pages[pi % len(pages)] + idx * 8
            vmm.mem.write_u64(addr, vmm.mem.read_u64(addr) ^ bits)
            real |= bool(bits & ~AD_MASK)
        if root and tampers:
            vmm.mem.write_u64(vm.vmsa, vmm.mem.read_u64(vm.vmsa) ^ PAGE)
        live, twin, rest = _all_checks(vmm, vm)
        assert live == twin and rest == [live, live]
        assert live == _expected(integ, _read_page(vmm), vmm.mem.read_u64)
        if not real and not (root and tampers):
            assert live is None                         # A/D only: not tampering
        # the node hashes the C check recomputed, by the formula
        if not (root and tampers):
            order, node, digest = _reference(integ, _read_page(vmm))
            assert order == integ._vplan.order
            buf = integ._vplan.nodes_buf
            assert [buf[k * 32:(k + 1) * 32] for k in range(len(order))] == \
                [node[h] for h in order]
            assert (digest == integ.digest) == (live is None)
    finally:
        vmm.close()


def test_child_tamper_changes_parent_slots_and_is_named_in_the_child(monkeypatch):
    """A changed PT makes its PD's (and every ancestor's) recomputed node
    hash differ through the child-hash slots; the leaf is named."""
    vmm = _vmm(monkeypatch)
    try:
        vm = vmm.create_vm()
        _build(vmm, vm, [("4k", _gpa(0, 0, pd, 5), 2) for pd in (0, 1, 70, 300)]
               + [("4k", _gpa(1, 3, 0, 0), 1)])
        integ = _integ(vmm, vm)
        assert integ.verify_all() is None
        before = {h: integ._vplan.nodes_buf[k * 32:(k + 1) * 32]
                  for k, h in enumerate(integ._vplan.order)}
        assert before == integ.node_h
        pt = [h for h, lv in integ.shadow.levels.items() if lv == 1][2]
        vmm.mem.write_u64(pt + 8 * 100, 0x7000 | P | W)
        live, twin, rest = _all_checks(vmm, vm)
        assert live == twin == rest[0] == rest[1] == Mismatch(pt, 100, 0, 0x7000 | P | W,
                                                              "table entry")
        after = {h: integ._vplan.nodes_buf[k * 32:(k + 1) * 32]
                 for k, h in enumerate(integ._vplan.order)}
        changed = {h for h in after if after[h] != before[h]}
        chain, t = {pt}, pt
        while t in integ.parent:
            t = integ.parent[t][0]
            chain.add(t)
        assert changed == chain and integ.shadow.root in chain
        # A/D bits set everywhere do not count
        vmm.mem.write_u64(pt + 8 * 100, 0)
        for h in integ.shadow.levels:
            for i in range(512):
                e = vmm.mem.read_u64(h + 8 * i)
                if e & P:
                    vmm.mem.write_u64(h + 8 * i, e | A | D)
        live, twin, rest = _all_checks(vmm, vm)
        assert live is twin is rest[0] is rest[1] is None
    finally:
        vmm.close()


def test_plan_is_cached_and_follows_new_tables(monkeypatch):
    vmm = _vmm(monkeypatch)
    try:
        vm = vmm.create_vm()
        _build(vmm, vm, [("4k", 0, 1), ("4k", 5 * MB2, 1)])
        integ = _integ(vmm, vm)
        assert vmm.psp.verify(vm.handle).ok
        plan = integ._vplan
        # no new table: the same plan
        assert vmm.psp.update_npt(vm.handle, 0x3000, vmm.alloc.alloc(1)).ok
        assert vmm.psp.check_all().ok
        assert integ._vplan is plan
        # a new PDPT/PD/PT chain: a new plan covering it
        gpa = _gpa(7, 9, 11, 13)
        assert vmm.psp.update_npt(vm.handle, gpa, vmm.alloc.alloc(1)).ok
        assert vmm.psp.verify(vm.handle).ok
        assert integ._vplan is not plan
        assert sorted(integ._vplan.order) == sorted(integ.shadow.pages)
        # and a tamper in the new leaf table is found there
        t = vmm.npt_root(vm)
        for lvl in (4, 3, 2):
            t = vmm.mem.read_u64(t + ((gpa >> (12 + 9 * (lvl - 1))) & 511) * 8) & ~0xFFF \
                & ((1 << 52) - 1)
        vmm.mem.write_u64(t + 8 * 14, 0x9000 | P)
        r = vmm.psp.verify(vm.handle)
        assert r.status == Status.INTEGRITY_FAILURE
        assert r.page_hpa == t and r.fields.get("entry_index", r.fields.get("index")) == 14
    finally:
        vmm.close()
