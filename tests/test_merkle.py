"""Integrity modes: full (patent-literal) and merkle (incremental hash tree).

In both modes: a tamper on an update's walk path is refused by that update;
a tamper anywhere else is caught by the next VERIFY / CHECK_ALL; A/D bits
are not tampering. A differential property test runs random
map/unmap/tamper sequences through both modes and compares the verdicts.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv import Status, Vmm
from nptcore.bits import A, AD_MASK, D, NX, P, W
from psp_firmware import INTEGRITY_MODES, Cmd, Psp, encode
from psp_firmware import core as psp_core
from psp_firmware.merkle import MerkleIntegrity

PAGE = 4096
MB2 = 2 << 20
ADDR = 0x000F_FFFF_FFFF_F000
MODES = ["full", "merkle"]


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture
def vmm(mode):
    v = Vmm(host_mem=128 << 20, integrity=mode)
    yield v
    v.close()


def test_modes_registered_and_merkle_is_default():
    assert set(MODES) <= set(INTEGRITY_MODES)
    assert INTEGRITY_MODES["merkle"] is MerkleIntegrity
    import inspect
    assert inspect.signature(Psp.__init__).parameters["integrity"].default == "merkle"


def _integ(vmm, vm):
    return vmm._psp_obj._guests[vm.handle].integrity


def _tables(vmm, vm, level):
    return [h for h, lv in vmm.engine.table_pages(vmm.npt_root(vm)) if lv == level]


def _entry_addr(vmm, vm, gpa, level):
    """HPA of the entry for gpa at `level` (4 = PML4 .. 1 = PT)."""
    t = vmm.npt_root(vm)
    for lvl in range(4, level, -1):
        t = vmm.mem.read_u64(t + ((gpa >> (12 + 9 * (lvl - 1))) & 511) * 8) & ADDR
    return t + ((gpa >> (12 + 9 * (level - 1))) & 511) * 8


def _mapped_vm(vmm):
    vm = vmm.create_vm()
    for gpa in (0x3000, 0x4000, 0x20_0000 * 5 + 0x7000, 1 << 30, 0x40_0000):
        vmm.touch(vm, gpa)
    return vm


# --------------------------------------------------------------------------
# on-path tamper: refused by the update itself, in both modes
@pytest.mark.parametrize("level,what", [
    (1, "leaf next to the slot"),      # an entry in the same 64-entry chunk of the PT
    (1, "the slot itself"),            # a leaf pre-planted where the PSP will write
    (2, "PD entry"),                   # re-point the PT the walk goes through
    (3, "PDPT entry"),
    (4, "PML4 entry"),
])
def test_on_path_tamper_refused_by_update(vmm, level, what):
    vm = _mapped_vm(vmm)
    target = 0x5000                        # next to 0x3000/0x4000, same PT chunk
    if what == "the slot itself":
        addr = _entry_addr(vmm, vm, target, 1)
        victim = vmm.touch(vmm.create_vm(), 0x1000) & ~0xFFF
        new = victim | P | W | 4
    else:
        addr = _entry_addr(vmm, vm, 0x3000 if level == 1 else target, level)
        old = vmm.mem.read_u64(addr)
        new = old ^ (PAGE if level > 1 else W)
    expected = vmm.mem.read_u64(addr) & ~AD_MASK
    vmm.mem.write_u64(addr, new)
    r = vmm.psp.update_npt(vm.handle, target, vmm.alloc.alloc(1))
    assert r.status == Status.INTEGRITY_FAILURE
    assert r.page_hpa == addr & ~0xFFF and r.entry_index == (addr & 0xFFF) // 8
    assert r.expected == expected and r.found == new & ~AD_MASK
    assert vmm.psp.verify(vm.handle).status == Status.GUEST_STOPPED


def test_on_path_tamper_refused_by_unmap(vmm):
    vm = _mapped_vm(vmm)
    addr = _entry_addr(vmm, vm, 0x3000, 1)
    vmm.mem.write_u64(addr, vmm.mem.read_u64(addr) + PAGE)
    assert vmm.psp.unmap(vm.handle, 0x4000).status == Status.INTEGRITY_FAILURE


def test_root_pointer_swap_refused_by_update(vmm):
    vm = _mapped_vm(vmm)
    fake = vmm.alloc.alloc(1)
    vmm.mem.write(fake, vmm.mem.read(vmm.npt_root(vm), PAGE))
    vmm.mem.write_u64(vm.vmsa, fake)
    r = vmm.psp.update_npt(vm.handle, 0x9000, vmm.alloc.alloc(1))
    assert r.status == Status.INTEGRITY_FAILURE and r.page_hpa == vm.vmsa


def test_fault_around_range_checks_every_page_path(vmm):
    """A multi-page update checks the chunks of all its leaves, not just the first."""
    vm = vmm.create_vm()
    vmm.touch(vm, 0x20_0000)               # PT for the 2..4 MiB block exists
    addr = _entry_addr(vmm, vm, 0x20_0000 + 100 * PAGE, 1)    # chunk 1 of that PT
    vmm.mem.write_u64(addr, 0x1234000 | P)
    r = vmm.psp.update_npt(vm.handle, 0x20_0000 + 64 * PAGE, vmm.alloc.alloc(64), npages=64)
    assert r.status == Status.INTEGRITY_FAILURE and r.entry_index == 100


# --------------------------------------------------------------------------
# off-path tamper: caught by the next periodic check, in both modes
@pytest.mark.parametrize("check", ["verify", "check_all"])
def test_off_path_tamper_caught_by_next_check(vmm, mode, check):
    vm = _mapped_vm(vmm)
    # a leaf in another PT page (the one for 0x40_0000): not on 0x6000's path
    addr = _entry_addr(vmm, vm, 0x40_0000, 1)
    old = vmm.mem.read_u64(addr)
    vmm.mem.write_u64(addr, old + PAGE)          # remap (SEVered)
    r = vmm.psp.update_npt(vm.handle, 0x6000, vmm.alloc.alloc(1))
    if mode == "merkle":
        assert r.ok                               # the update does not look there
    else:
        assert r.status == Status.INTEGRITY_FAILURE   # full re-hashes everything
        return
    # the tamper was not folded into the digest by that update
    r = vmm.psp.verify(vm.handle) if check == "verify" else vmm.psp.check_all()
    assert r.status == Status.INTEGRITY_FAILURE
    assert r.page_hpa == addr & ~0xFFF
    assert r.fields.get("entry_index", r.fields.get("index")) == (addr & 0xFFF) // 8
    assert vmm.psp.update_npt(vm.handle, 0x7000, vmm.alloc.alloc(1)).status == Status.GUEST_STOPPED


def test_off_path_tamper_in_another_chunk_of_the_same_page(vmm, mode):
    vm = _mapped_vm(vmm)
    addr = _entry_addr(vmm, vm, 0x3000, 1) + 8 * 200      # PT entry 203: chunk 3
    vmm.mem.write_u64(addr, 0x5000 | P | W | 4)
    r = vmm.psp.update_npt(vm.handle, 0x6000, vmm.alloc.alloc(1))   # chunk 0
    assert r.ok == (mode == "merkle")
    assert vmm.psp.verify(vm.handle).status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED)


# --------------------------------------------------------------------------
# A/D bits are the walker's: never tampering
def test_accessed_dirty_not_counted(vmm):
    vm = _mapped_vm(vmm)
    for hpa, _lv in vmm.engine.table_pages(vmm.npt_root(vm)):
        for i in range(512):
            v = vmm.mem.read_u64(hpa + 8 * i)
            if v & P:
                vmm.mem.write_u64(hpa + 8 * i, v | A | D)
    assert vmm.psp.update_npt(vm.handle, 0x6000, vmm.alloc.alloc(1)).ok
    assert vmm.psp.update_npt(vm.handle, 0x8000_0000, vmm.alloc.alloc(1)).ok
    assert vmm.psp.unmap(vm.handle, 0x4000).ok
    assert vmm.psp.verify(vm.handle).ok
    assert vmm.psp.check_all().ok


# --------------------------------------------------------------------------
# the incremental tree is the tree: same digest as a rebuild from scratch
def test_merkle_incremental_equals_rebuild():
    vmm = Vmm(host_mem=128 << 20, integrity="merkle")
    try:
        vm = vmm.create_vm()
        for gpa in (0, 0x1000, 0x20_0000, 1 << 30, 0x7F_0000_0000, 0x1234_5000):
            vmm.touch(vm, gpa)
        assert vmm.psp.update_npt(vm.handle, 0x60_0000, vmm.alloc.alloc(512, align=MB2),
                                  level=2).ok
        assert vmm.psp.update_npt(vm.handle, 0x80_0000 + 60 * PAGE, vmm.alloc.alloc(16),
                                  npages=16).ok
        assert vmm.psp.unmap(vm.handle, 0x1000).ok
        integ = _integ(vmm, vm)
        fresh = MerkleIntegrity(integ.shadow, integ._canon, integ._read_u64, integ.vmsa)
        assert fresh.digest == integ.digest
        assert fresh.node_h == integ.node_h and fresh.chunk_h == integ.chunk_h
        assert vmm.guest_digest(vm) == integ.digest
    finally:
        vmm.close()


@pytest.mark.parametrize("core", ["python", "c"])
def test_merkle_update_cost_does_not_scan_the_table(monkeypatch, core):
    """An update re-reads only its path. The pure-Python core: count the
    table pages it canonicalises (at least one, at most the four levels of
    the path). Either core, the C one included (which never calls _canon):
    a line off the path is corrupted first, and the update still succeeds,
    which a scan of the table would refuse; VERIFY then finds it."""
    if core == "c" and not psp_core.available():
        pytest.skip("the PSP's C core is not built")
    monkeypatch.setenv("HV_PSP_CORE", core)
    vmm = Vmm(host_mem=256 << 20, integrity="merkle")
    try:
        vm = vmm.create_vm()
        for i in range(64):
            vmm.touch(vm, i * MB2)              # 64 PT pages
        integ = _integ(vmm, vm)
        calls = []
        orig = integ._canon
        integ._canon = lambda h: calls.append(h) or orig(h)
        # off the path of GPA 0x5000: an entry in the page table of block 40
        from hv.attacks import entry_addr
        path_pt = entry_addr(vmm, vm, 0x5000) & ~0xFFF
        victim = entry_addr(vmm, vm, 40 * MB2) & ~0xFFF
        assert victim != path_pt
        vmm.mem.write_u64(victim + 8 * 300, vmm.mem.read_u64(victim + 8 * 300) ^ (1 << 40))
        r = vmm.psp.update_npt(vm.handle, 0x5000, vmm.alloc.alloc(1))
        assert r.ok, r.name                     # the corrupted line was not read
        if core == "python":
            assert 1 <= len(set(calls)) <= 4
        else:
            assert calls == []                  # served by the C core
        assert vmm.psp.verify(vm.handle).name == "INTEGRITY_FAILURE"    # ... VERIFY reads it all
    finally:
        vmm.close()


def test_merkle_verify_checks_every_table_page():
    vmm = Vmm(host_mem=256 << 20, integrity="merkle")
    try:
        vm = vmm.create_vm()
        for i in range(64):
            vmm.touch(vm, i * MB2)
        integ = _integ(vmm, vm)
        calls = []
        orig = integ._canon
        integ._canon = lambda h: calls.append(h) or orig(h)
        assert vmm.psp.verify(vm.handle).ok
        if integ._c is not None and integ._memc is not None:
            # the C check (psp_merkle_verify) hashes every page in place in
            # host memory: no copies, and its plan covers every table page
            assert calls == []
            assert sorted(integ._vplan.order) == sorted(integ.shadow.pages)
        else:
            assert len(set(calls)) == len(integ.shadow.pages)
    finally:
        vmm.close()


# --------------------------------------------------------------------------
# differential: both modes give the same verdict at VERIFY
GPAS = [0x0, 0x1000, 0x3F000, 0x40000, 0x20_0000, 0x3F_F000, 1 << 30, 0x7F_FFFF_F000 & ~0xFFF]

op_map = st.tuples(st.just("map"), st.sampled_from(GPAS), st.sampled_from([1, 4]))
op_unmap = st.tuples(st.just("unmap"), st.sampled_from(GPAS), st.just(1))
op_tamper = st.tuples(st.just("tamper"), st.integers(0, 1 << 16),
                      st.sampled_from([A, D, A | D, W, NX, P, PAGE, 1 << 40, 1 << 55]))
op_root = st.tuples(st.just("root"), st.just(0), st.just(0))
ops_strategy = st.lists(st.one_of(op_map, op_map, op_unmap, op_tamper, op_root), max_size=14)


def _run(mode, ops):
    vmm = Vmm(host_mem=64 << 20, integrity=mode, fw_size=8 << 20)
    try:
        vm = vmm.create_vm()
        tampered = False
        touched = set()
        for kind, a, b in ops:
            if kind == "map":
                vmm.psp.update_npt(vm.handle, a, vmm.alloc.alloc(b), npages=b)
            elif kind == "unmap":
                vmm.psp.unmap(vm.handle, a)
            elif kind == "tamper":
                pages = sorted(vmm._psp_obj._guests[vm.handle].npt.pages)  # same in both modes
                page = pages[a % len(pages)]
                addr = page + ((a >> 4) % 512) * 8
                if addr in touched:
                    continue
                touched.add(addr)
                vmm.mem.write_u64(addr, vmm.mem.read_u64(addr) ^ b)
                tampered |= bool(b & ~AD_MASK)
            elif kind == "root" and "root" not in touched:
                touched.add("root")
                vmm.mem.write_u64(vm.vmsa, vmm.mem.read_u64(vm.vmsa) ^ PAGE)
                tampered = True
        r = vmm.psp.verify(vm.handle)
        detected = r.status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED)
        assert r.ok or detected
        return tampered, detected
    finally:
        vmm.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops_strategy)
def test_differential_verdicts(ops):
    # tamper ops pick table pages by index into the PSP's page list; the two
    # modes build identical tables until the first tamper is detected, and a
    # detected tamper stops the guest in both: verdicts must agree
    t_full, d_full = _run("full", ops)
    t_merkle, d_merkle = _run("merkle", ops)
    assert t_full == t_merkle
    assert d_full == t_full
    assert d_merkle == t_merkle


@pytest.mark.skipif(not psp_core.available(), reason="the PSP's C core is not built")
@pytest.mark.parametrize("cap", [8192, 3])
def test_merkle_flush_after_c_updates_equals_rebuild(cap):
    """The C update logs the table pages it makes stale (the flush's to-do,
    kept per PSP for every guest); two guests' updates interleave, each
    guest's flush leaves the other's to-do in place, and a log too small
    for the updates (cap 3) makes the next flush of every guest scan all.
    Each digest equals a rebuild from scratch."""
    vmm = Vmm(host_mem=256 << 20, integrity="merkle")
    try:
        psp = vmm._psp_obj
        psp._ptabs.attach_log(psp._ctx, cap=cap)
        a, b = vmm.create_vm(), vmm.create_vm()
        for vm in (a, b):
            for i in range(8):
                vmm.touch(vm, i * MB2)                  # tables exist: updates stay in C
            vmm.guest_digest(vm)
        for k in range(1, 20):
            for vm in (a, b):
                buf = encode(Cmd.UPDATE_NPT, handle=vm.handle, level=1,
                             gpa=(k % 8) * MB2 + k * PAGE, hpa=vmm.alloc.alloc(1),
                             attrs=3, npages=1)
                assert psp._c.psp_mailbox_update(psp._ctx, buf) == 1
            if k % 5 == 0:
                vmm.guest_digest(b)                     # only b flushes here
        for vm in (a, b):
            integ = _integ(vmm, vm)
            fresh = MerkleIntegrity(integ.shadow, integ._canon, integ._read_u64, integ.vmsa)
            assert vmm.guest_digest(vm) == fresh.digest
            assert vmm.psp.verify(vm.handle).ok
    finally:
        vmm.close()
