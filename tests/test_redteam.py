"""Red-team attacks on the PSP-managed NPT, written against the public API only.

Each test is one attack by a malicious VMM (vmm.mem, vmm.psp, vmm.engine,
vmm.alloc, threads, hv.boot.Boot with on_slice) and asserts the SECURE
outcome: refused with nothing changed, or detected (the guest is then fatal
and the other guest carries on), or harmless (translation unchanged).

Not tested, by design (hv/attacks/__init__.py): a tamper that is restored
before the next check is invisible to any digest; merkle mode checks only an
update's walk path and catches an off-path tamper at the next VERIFY /
CHECK_ALL.
"""
import random
import zlib
import struct
import threading

import pytest

from hv import Vmm
from hv.trace.inspect import analyse, load_snapshot, save_snapshot, take_snapshot
from nptcore.bits import A, ACC_R, ACC_W, ACC_X, ADDR_MASK, D, NX, P, PS, U, W
from nptcore.bits import index as npt_index
from psp_firmware import Status
from psp_firmware.commands import _IN, Cmd

PAGE = 4096
MB2 = 2 << 20
MODES = ("full", "merkle")
BASE = 0x100000
NWORK = 16


# ---------------------------------------------------------------------------
# helpers an outsider can write with the public API

def new_vmm(mode, psp="inprocess"):
    return Vmm(host_mem=64 << 20, integrity=mode, psp=psp)


class Lab:
    def __init__(self, mode, psp="inprocess"):
        self.vmm = vmm = new_vmm(mode, psp)
        self.victim = vmm.create_vm()
        self.other = vmm.create_vm()
        self.work = [BASE + i * PAGE for i in range(NWORK)]
        for g in self.work:
            vmm.touch(self.victim, g, ACC_W)
        self.other_page = vmm.touch(self.other, BASE, ACC_W) & ~0xFFF
        vmm.mem.write(self.other_page, b"OTHER GUEST SECRET")

    @property
    def mem(self):
        return self.vmm.mem

    @property
    def psp(self):
        return self.vmm.psp

    def slot(self, gpa, level=1, vm=None):
        vmm = self.vmm
        t = vmm.npt_root(vm or self.victim)
        for lvl in (4, 3, 2, 1):
            a = t + npt_index(gpa, lvl) * 8
            if lvl == level:
                return a
            t = vmm.mem.read_u64(a) & ADDR_MASK
        raise AssertionError

    def table_of(self, gpa, level=1, vm=None):
        return self.slot(gpa, level, vm) & ~0xFFF

    def frame(self, gpa, vm=None):
        r = self.vmm.engine.walk(self.vmm.npt_root(vm or self.victim), gpa, ACC_R, set_ad=False)
        return (r.hpa & ~0xFFF) if r.ok else None

    def close(self):
        self.vmm.close()


@pytest.fixture(params=MODES)
def lab(request):
    lb = Lab(request.param)
    yield lb
    lb.close()


def state(vmm, vms=()):
    """Everything a refused command must leave unchanged."""
    ps = dict(vmm.psp.platform_status().fields)
    ps.pop("commands", None)
    digests = []
    for vm in vms:
        r = vmm.psp.guest_status(vm.handle)
        digests.append((r.name, r.fields.get("digest"), r.fields.get("mapped_pages"),
                        r.fields.get("table_pages")))
    return zlib.crc32(vmm.mem.buf), ps, digests


def assert_stopped(lab, vm=None):
    vm = vm or lab.victim
    r = lab.psp.update_npt(vm.handle, 0x7FF000000, lab.vmm.alloc.alloc(1))
    assert r.status == Status.GUEST_STOPPED, r.name
    assert lab.psp.verify(vm.handle).status == Status.GUEST_STOPPED
    if vm is lab.victim:            # the other guest carries on
        lab.vmm.touch(lab.other, 0x7FE000000, ACC_W)
        assert lab.psp.verify(lab.other.handle).ok


# ---------------------------------------------------------------------------
# 1. direct writes to table entries: every bit pattern is tampering (but A/D)

def _tamper_kinds(lab):
    """name -> (slot address, new value fn(old), gpa of an update on its path)."""
    w3 = lab.work[3]
    near = BASE + 40 * PAGE          # unmapped: leaf entry 296, line 37 (entries 296..303)
    # a mapped leaf in the same 64-byte line as near's slot: merkle's update
    # checks the lines its walk reads (full mode checks everything)
    lone = BASE + 47 * PAGE
    if lab.frame(lone) is None:
        lab.vmm.touch(lab.victim, lone, ACC_W)
    root = lab.vmm.npt_root(lab.victim)
    other_root = lab.vmm.npt_root(lab.other)
    leaf = lab.slot(lone)
    return {
        "leaf_pat_bit7": (leaf, lambda v: v | PS, near),
        "leaf_clear_user": (leaf, lambda v: v & ~U, near),
        "leaf_avl_bits": (leaf, lambda v: v | 0xE00, near),
        "leaf_reserved_hi": (leaf, lambda v: v | (1 << 52), near),
        "leaf_nx_flip": (leaf, lambda v: v ^ NX, near),
        "leaf_ad_plus_frame": (leaf, lambda v: ((v | A | D) & ~ADDR_MASK) | lab.other_page, near),
        "leaf_outside_host": (leaf, lambda v: (v & ~ADDR_MASK) | (1 << 51), near),
        "leaf_at_root_cycle": (leaf, lambda v: (v & ~ADDR_MASK) | root, near),
        "leaf_at_other_root": (leaf, lambda v: (v & ~ADDR_MASK) | other_root, near),
        "pml4_ps": (lab.slot(w3, 4), lambda v: v | PS, near),
        "pdpt_ps_1g": (lab.slot(w3, 3), lambda v: v | PS, near),
        "pd_ps_2m": (lab.slot(w3, 2), lambda v: v | PS, near),
        "pml4_cycle_to_root": (lab.slot(w3, 4), lambda v: (v & ~ADDR_MASK) | root, near),
        "pd_cycle_to_root": (lab.slot(w3, 2), lambda v: (v & ~ADDR_MASK) | root, near),
        "pd_outside_host": (lab.slot(w3, 2), lambda v: (v & ~ADDR_MASK) | (ADDR_MASK & ~0xFFF), near),
        "notpresent_garbage": (lab.slot(near + PAGE), lambda v: 0x7FF0_0000_DEAD_F000, near),
        "notpresent_to_present": (lab.slot(near + PAGE),
                                  lambda v: lab.other_page | P | W | U, near),
        "pml4_other_slot_to_other_guest": (root + 511 * 8,
                                           lambda v: other_root | P | W | U, 511 << 39),
    }


KINDS = ["leaf_pat_bit7", "leaf_clear_user", "leaf_avl_bits", "leaf_reserved_hi", "leaf_nx_flip",
         "leaf_ad_plus_frame", "leaf_outside_host", "leaf_at_root_cycle", "leaf_at_other_root",
         "pml4_ps", "pdpt_ps_1g", "pd_ps_2m", "pml4_cycle_to_root", "pd_cycle_to_root",
         "pd_outside_host", "notpresent_garbage", "notpresent_to_present",
         "pml4_other_slot_to_other_guest"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("by", ["update_on_path", "verify", "check_all"])
def test_entry_tamper_detected(lab, kind, by):
    slot, fn, gpa = _tamper_kinds(lab)[kind]
    old = lab.mem.read_u64(slot)
    lab.mem.write_u64(slot, fn(old))
    # the walker must survive whatever the entry says (cycles, outside memory)
    for g in lab.work + [gpa]:
        lab.vmm.engine.walk(lab.vmm.npt_root(lab.victim), g, ACC_X)
    if by == "update_on_path":
        r = lab.psp.update_npt(lab.victim.handle, gpa, lab.vmm.alloc.alloc(1))
        assert r.status == Status.INTEGRITY_FAILURE, r.name
        assert r.page_hpa == slot & ~0xFFF and r.entry_index == (slot & 0xFFF) // 8
    elif by == "verify":
        assert lab.psp.verify(lab.victim.handle).status == Status.INTEGRITY_FAILURE
    else:
        r = lab.psp.check_all()
        assert r.status == Status.INTEGRITY_FAILURE and r.stopped_handle == lab.victim.handle
    assert_stopped(lab)


def test_accessed_dirty_only_is_harmless(lab):
    """A/D bits are not counted; setting them must not change any translation."""
    before = {g: lab.frame(g) for g in lab.work}
    for lvl in (4, 3, 2, 1):
        for g in lab.work:
            s = lab.slot(g, lvl)
            lab.mem.write_u64(s, lab.mem.read_u64(s) | A | D)
    s = lab.slot(BASE + 41 * PAGE)                       # a not-present entry: A/D only
    lab.mem.write_u64(s, A | D)
    assert lab.psp.verify(lab.victim.handle).ok
    assert {g: lab.frame(g) for g in lab.work} == before
    assert lab.frame(BASE + 41 * PAGE) is None
    lab.vmm.touch(lab.victim, BASE + 41 * PAGE, ACC_W)   # the PSP overwrites the A/D garbage
    assert lab.psp.verify(lab.victim.handle).ok


def test_walkers_and_inspect_terminate_on_cyclic_tables(lab, tmp_path):
    """Every table entry pointing back at the root: walk/mappings/table_pages/
    inspect terminate, VERIFY and CHECK_ALL terminate and detect."""
    root = lab.vmm.npt_root(lab.victim)
    for lvl in (4, 3, 2, 1):
        t = lab.table_of(BASE, lvl)
        for i in range(0, 512, 7):
            lab.mem.write_u64(t + i * 8, root | P | W | U)
    done = {}

    def run():
        eng = lab.vmm.engine
        done["maps"] = len(eng.mappings(root))
        done["pages"] = len(eng.table_pages(root))
        for g in lab.work:
            eng.walk(root, g, ACC_W)
        save_snapshot(tmp_path / "s.json", take_snapshot(lab.vmm, lab.victim))
        done["inspect"] = analyse(load_snapshot(tmp_path / "s.json"))
        done["verify"] = lab.psp.verify(lab.victim.handle).status
    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(20)
    assert not th.is_alive(), "a walker / VERIFY hangs on a cyclic table"
    assert done["verify"] == Status.INTEGRITY_FAILURE


def test_ncr3_noise_bits_are_harmless(lab):
    """Bits of nCR3 outside the address are ignored by the walker and the PSP alike."""
    vmsa = lab.victim.vmsa
    v = lab.mem.read_u64(vmsa)
    before = {g: lab.frame(g) for g in lab.work}
    for noise in (0x8, 0xFF8, 1 << 63, 0xFFF0_0000_0000_0FFF):
        lab.mem.write_u64(vmsa, v | noise)
        assert {g: lab.frame(g) for g in lab.work} == before
    lab.mem.write_u64(vmsa, v + PAGE)                     # but any address change is caught
    assert lab.psp.verify(lab.victim.handle).status == Status.INTEGRITY_FAILURE


def test_ncr3_to_copy_then_edit_copy(lab):
    """Point nCR3 at a byte-identical copy of the table, edit the copy later."""
    root = lab.vmm.npt_root(lab.victim)
    copy = lab.vmm.alloc.alloc(1)
    lab.mem.write(copy, lab.mem.read(root, PAGE))
    lab.mem.write_u64(lab.victim.vmsa, copy)
    r = lab.psp.update_npt(lab.victim.handle, BASE + 40 * PAGE, lab.vmm.alloc.alloc(1))
    assert r.status == Status.INTEGRITY_FAILURE
    assert_stopped(lab)


def test_swap_table_pages_between_guests(lab):
    """Exchange the leaf table pages of two guests (contents), both are caught."""
    a = lab.table_of(BASE, 1, lab.victim)
    b = lab.table_of(BASE, 1, lab.other)
    pa, pb = lab.mem.read(a, PAGE), lab.mem.read(b, PAGE)
    lab.mem.write(a, pb)
    lab.mem.write(b, pa)
    r = lab.psp.check_all()
    assert r.status == Status.INTEGRITY_FAILURE
    for vm in (lab.victim, lab.other):
        assert lab.psp.verify(vm.handle).status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED)


def test_swap_pd_pointers_between_guests(lab):
    """Re-point the victim's PD entry at the other guest's leaf table."""
    s = lab.slot(BASE, 2, lab.victim)
    other_pt = lab.table_of(BASE, 1, lab.other)
    lab.mem.write_u64(s, (lab.mem.read_u64(s) & ~ADDR_MASK) | other_pt)
    assert lab.frame(BASE) == lab.other_page          # the CPU sees it at once...
    r = lab.psp.update_npt(lab.victim.handle, BASE + 40 * PAGE, lab.vmm.alloc.alloc(1))
    assert r.status == Status.INTEGRITY_FAILURE       # ...and the next NPF on the path stops it
    assert_stopped(lab)


# ---------------------------------------------------------------------------
# 2. tamper around frame recycling: pool pages, UNMAP/RECLAIM/DECOMMISSION

def _plant(mem, page, target):
    for i in range(512):
        mem.write_u64(page + i * 8, target | P | W | U)


def test_tampered_pool_pages_never_become_tables(lab):
    """Fill every free pool page (and pages about to be donated) with entries
    pointing at the other guest's page, then make the victim take new tables."""
    vmm = lab.vmm
    st = vmm.psp.platform_status()
    # pool pages are the VMM's donation; the VMM knows them: find them as the
    # frames the PSP refuses with TABLE_PAGE and no guest maps
    in_use = {h for vm in (lab.victim, lab.other)
              for h, _l in vmm.engine.table_pages(vmm.npt_root(vm))}
    pool = []
    for hpa in range(1 << 20, vmm.fw_base, PAGE):
        if len(pool) >= st.pool_free:
            break
        r = vmm.psp.set_private_memory(lab.victim.handle, hpa, 1)
        if r.status == Status.TABLE_PAGE:
            if hpa not in in_use:
                pool.append(hpa)
        elif r.ok:
            assert vmm.psp.reclaim(lab.victim.handle, hpa, 1).ok
    assert pool
    for p in pool:
        _plant(vmm.mem, p, lab.other_page)
    gpas = [(1 << 39) * k + (1 << 30) * k + MB2 * k for k in range(1, 6)]
    for g in gpas:
        vmm.touch(lab.victim, g, ACC_W)
    maps = vmm.engine.mappings(vmm.npt_root(lab.victim))
    frames = {h & ~0xFFF for _g, h, _s, _e in maps}
    assert lab.other_page not in frames
    assert len(maps) == NWORK + len(gpas)
    assert vmm.psp.verify(lab.victim.handle).ok


def test_tamper_then_decommission_does_not_leak_into_next_guest(lab):
    """Tamper the victim's table pages (off-path), decommission it, launch a
    new guest on the recycled table pages: nothing planted survives."""
    vmm = lab.vmm
    pages = [h for h, _l in vmm.engine.table_pages(vmm.npt_root(lab.victim))]
    for t in pages:
        for i in (0, 1, 100, 300, 511):
            vmm.mem.write_u64(t + i * 8, lab.other_page | P | W | U)
    assert vmm.psp.decommission(lab.victim.handle).ok
    for t in pages:
        assert vmm.mem.read(t, PAGE) == bytes(PAGE)      # scrubbed
    # every command for the dead handle: INVALID_HANDLE, nothing changed
    before = state(vmm, [lab.other])
    h = lab.victim.handle
    for r in (vmm.psp.update_npt(h, 0x5000, vmm.alloc.alloc(1)), vmm.psp.verify(h),
              vmm.psp.unmap(h, BASE), vmm.psp.reclaim(h, lab.frame(BASE, lab.other) or 0),
              vmm.psp.decommission(h), vmm.psp.guest_status(h), vmm.psp.launch_finish(h),
              vmm.psp.set_private_memory(h, vmm.alloc.alloc(1), 1)):
        assert r.status == Status.INVALID_HANDLE, r.name
    assert state(vmm, [lab.other]) == before
    new = vmm.create_vm()
    assert new.handle != h
    for g in [BASE + i * PAGE for i in range(NWORK)] + [1 << 40, 3 << 30]:
        vmm.touch(new, g, ACC_W)
    maps = vmm.engine.mappings(vmm.npt_root(new))
    assert len(maps) == NWORK + 2
    assert lab.other_page not in {h & ~0xFFF for _g, h, _s, _e in maps}
    assert vmm.psp.verify(new.handle).ok and vmm.psp.verify(lab.other.handle).ok


def test_tamper_then_unmap(lab):
    """Tamper a leaf, then UNMAP its neighbour (same chunk): refused as
    INTEGRITY_FAILURE, the frame is not handed back, the guest is fatal."""
    s = lab.slot(lab.work[2])
    lab.mem.write_u64(s, (lab.mem.read_u64(s) & ~ADDR_MASK) | lab.other_page)
    f = lab.frame(lab.work[5])
    r = lab.psp.unmap(lab.victim.handle, lab.work[5])
    assert r.status == Status.INTEGRITY_FAILURE
    assert lab.frame(lab.work[5]) == f                  # not unmapped
    assert lab.psp.reclaim(lab.victim.handle, f).status == Status.GUEST_STOPPED
    assert_stopped(lab)


def test_unmapped_frame_cannot_come_back_dirty(lab):
    """UNMAP, write into the (now private) frame, map it into another guest:
    refused (BAD_OWNER); RECLAIM scrubs it first."""
    f = lab.frame(lab.work[4])
    assert lab.psp.unmap(lab.victim.handle, lab.work[4]).ok
    lab.mem.write(f, b"PLANTED")
    before = state(lab.vmm, [lab.victim, lab.other])
    for r in (lab.psp.update_npt(lab.other.handle, 0x900000, f),
              lab.psp.set_private_memory(lab.other.handle, f, 1),
              lab.psp.reclaim(lab.other.handle, f),
              lab.psp.pool_add(f, 1),
              lab.psp.launch_start(f)):
        assert not r.ok
    assert state(lab.vmm, [lab.victim, lab.other]) == before
    assert lab.psp.reclaim(lab.victim.handle, f).ok
    assert lab.mem.read(f, PAGE) == bytes(PAGE)


def test_set_private_memory_of_frame_mapped_elsewhere(lab):
    before = state(lab.vmm, [lab.victim, lab.other])
    for hpa in (lab.other_page, lab.frame(lab.work[0]), lab.table_of(BASE),
                lab.other.vmsa, lab.vmm.npt_root(lab.other)):
        for h in (lab.victim.handle, lab.other.handle):
            r = lab.psp.set_private_memory(h, hpa, 1)
            assert r.status in (Status.BAD_OWNER, Status.PAGE_OWNED, Status.TABLE_PAGE,
                                Status.BAD_PAGE_STATE), r.name
    assert state(lab.vmm, [lab.victim, lab.other]) == before


# ---------------------------------------------------------------------------
# 3. crafted commands: boundary values, overlapping ranges, raw garbage

def _boundary_values(vmm, lab):
    H, fwb, fws = vmm.mem.size, vmm.fw_base, vmm.fw_size
    q = [0, PAGE, 2 ** 64 - PAGE, 2 ** 64 - MB2, 2 ** 63, 2 ** 52, 2 ** 48, 2 ** 48 - PAGE,
         H, H - PAGE, H - MB2, fwb - PAGE, fwb - MB2, fwb, fwb + fws - PAGE, fwb + fws,
         lab.victim.vmsa, vmm.npt_root(lab.victim), vmm.npt_root(lab.other),
         lab.table_of(BASE), lab.table_of(BASE) - PAGE * 256, lab.other_page,
         lab.other_page & ~(MB2 - 1), BASE, BASE + 40 * PAGE]
    i = [0, 1, 2, 3, 511, 512, 513, 2 ** 20, 2 ** 20 + 1, 2 ** 31, 2 ** 32 - 1,
         lab.victim.handle, lab.other.handle]
    return q, i


@pytest.mark.parametrize("cmd", [c for c in _IN if c not in (Cmd.PLATFORM_INIT, Cmd.DECOMMISSION)])
def test_boundary_commands_refused_change_nothing(lab, cmd):
    vmm = lab.vmm
    q, i = _boundary_values(vmm, lab)
    fmt, names = _IN[cmd]
    codes = fmt[1:]
    rnd = random.Random(int(cmd))
    combos = [()] if not codes else [
        tuple(rnd.choice(q if c == "Q" else i) for c in codes) for _ in range(40)]
    before = state(vmm, [lab.victim, lab.other])
    for combo in combos:
        st, _out = vmm.psp.raw(int(cmd), struct.pack(fmt, *combo))
        assert st in set(Status) and st not in (Status.INTERNAL_ERROR, Status.PSP_DEAD), \
            (cmd.name, combo, st)
        after = state(vmm, [lab.victim, lab.other])
        if st != Status.SUCCESS:
            assert after == before, (cmd.name, combo, st)
        before = after
    assert lab.psp.verify(lab.other.handle).status in (Status.SUCCESS, Status.GUEST_STOPPED)


def test_platform_init_again_refused(lab):
    vmm = lab.vmm
    before = state(vmm, [lab.victim])
    for args in ((vmm.mem.size, vmm.fw_base, vmm.fw_size), (vmm.mem.size, 0, 0),
                 (2 ** 64 - PAGE, 2 ** 63, 2 ** 63)):
        assert vmm.psp.platform_init(*args).status == Status.INVALID_PLATFORM_STATE
    assert state(vmm, [lab.victim]) == before


def test_npages_times_size_overflow(lab):
    vmm = lab.vmm
    before = state(vmm, [lab.victim, lab.other])
    h = lab.victim.handle
    for level in (1, 2):
        for n in (2 ** 32 - 1, 2 ** 31, 2 ** 20 + 1, 2 ** 20):
            for hpa in (0, 2 ** 64 - MB2, vmm.fw_base - MB2):
                r = vmm.psp.update_npt(h, 0, hpa, level, 3, n)
                assert not r.ok and r.status != Status.INTERNAL_ERROR
    for n in (2 ** 32 - 1, 2 ** 20 + 1):
        for fn in (lambda: vmm.psp.pool_add(2 ** 20, n),
                   lambda: vmm.psp.set_private_memory(h, 2 ** 20, n),
                   lambda: vmm.psp.reclaim(h, 2 ** 20, n),
                   lambda: vmm.psp.unmap(h, 0, 1, n),
                   lambda: vmm.psp.unmap(h, 0, 2, n)):
            r = fn()
            assert not r.ok and r.status != Status.INTERNAL_ERROR
    assert state(vmm, [lab.victim, lab.other]) == before


def test_ranges_spanning_fw_table_and_hv(lab):
    """Ranges that start in free memory and run into the table pool, a table
    page, another guest, firmware memory or off the end of host memory."""
    vmm = lab.vmm
    before = state(vmm, [lab.victim, lab.other])
    h = lab.victim.handle
    targets = [vmm.fw_base, lab.table_of(BASE), vmm.npt_root(lab.other), lab.other_page,
               lab.other.vmsa, vmm.mem.size]
    for tgt in targets:
        for k in (1, 4, 512):
            s = tgt - PAGE * k
            if s < 0:
                continue
            for n in (k + 1, k + 600):
                for r in (vmm.psp.update_npt(h, 0x40000000, s, 1, 3, n),
                          vmm.psp.set_private_memory(h, s, n),
                          vmm.psp.pool_add(s, n),
                          vmm.psp.launch_update_data(h, 0x40000000, s, n),
                          vmm.psp.reclaim(h, s, n)):
                    assert not r.ok and r.status != Status.INTERNAL_ERROR, (hex(s), n, r.name)
            r = vmm.psp.update_npt(h, 0x40000000, tgt & ~(MB2 - 1), 2, 3, 1)
            assert not r.ok and r.status != Status.INTERNAL_ERROR
    assert state(vmm, [lab.victim, lab.other]) == before


def test_level2_in_middle_of_table_pool(lab):
    vmm = lab.vmm
    before = state(vmm, [lab.victim, lab.other])
    for t in (lab.table_of(BASE), vmm.npt_root(lab.other)):
        blk = t & ~(MB2 - 1)
        for hpa in (blk, t):
            r = vmm.psp.update_npt(lab.victim.handle, 0x40000000, hpa, 2, 3, 1)
            assert r.status in (Status.TABLE_PAGE, Status.MISALIGNED, Status.PAGE_OWNED,
                                Status.BAD_PAGE_STATE, Status.BAD_OWNER), r.name
    assert state(vmm, [lab.victim, lab.other]) == before


def test_launch_update_data_after_finish_and_bad_handles(lab):
    vmm = lab.vmm
    vm = vmm.create_vm()
    vmm.load_page(vm, 0x1000, b"code")
    vmm.launch_finish(vm)
    before = state(vmm, [lab.victim, lab.other, vm])
    hpa = vmm.alloc.alloc(1)
    assert vmm.psp.launch_update_data(vm.handle, 0x2000, hpa, 1).status == \
        Status.INVALID_GUEST_STATE
    assert vmm.psp.launch_finish(vm.handle).status == Status.INVALID_GUEST_STATE
    for h in (0, 2 ** 32 - 1, 2 ** 31, vm.handle + 1000):
        for r in (vmm.psp.update_npt(h, 0x2000, hpa), vmm.psp.verify(h),
                  vmm.psp.launch_update_data(h, 0x2000, hpa, 1), vmm.psp.decommission(h)):
            assert r.status == Status.INVALID_HANDLE
    assert state(vmm, [lab.victim, lab.other, vm]) == before


def test_raw_garbage_every_command_id(lab):
    vmm = lab.vmm
    rnd = random.Random(7)
    before = state(vmm, [lab.victim, lab.other])
    for cmd in list(range(0, 0x42)) + [0xFF, 0x100, 2 ** 31, 2 ** 32 - 1, 2 ** 32 + 0x20]:
        sizes = [0, 5, 4096]
        if cmd in _IN:
            n = struct.calcsize(_IN[cmd][0])
            sizes += [n, n, n, n + 1]
        for n in sizes:
            buf = bytes(rnd.getrandbits(8) for _ in range(n))
            st, out = vmm.psp.raw(cmd, buf)
            assert st in set(Status) and st not in (Status.INTERNAL_ERROR, Status.PSP_DEAD)
            if st in (Status.INVALID_COMMAND, Status.INVALID_LENGTH):
                continue            # decoding failed: nothing can have run
            after = state(vmm, [lab.victim, lab.other])
            if st != Status.SUCCESS:
                assert after == before, (hex(cmd), buf.hex())
            before = after
    for buf in (bytearray(12), memoryview(b"\0" * 4)):
        st, _ = vmm.psp.raw(0x30, buf)
        assert st in set(Status) and st != Status.INTERNAL_ERROR


# ---------------------------------------------------------------------------
# 4. concurrency: commands racing commands and tampers

def _consistent_or_detected(lab, vm, expect):
    """If VERIFY passes, host memory must translate exactly as the PSP mapped."""
    r = lab.psp.verify(vm.handle)
    if r.status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED):
        return "detected"
    assert r.ok, r.name
    maps = {g: h for g, h, _s, _e in lab.vmm.engine.mappings(lab.vmm.npt_root(vm))}
    for g, h in expect.items():
        assert maps.get(g) == h, hex(g)
    assert set(maps) == set(expect)
    return "clean"


def test_threads_race_updates_while_third_tampers(lab):
    vmm = lab.vmm
    vm = lab.victim
    expect = {g: lab.frame(g) for g in lab.work}
    lock = threading.Lock()
    stop = threading.Event()
    slots = [lab.slot(g) for g in lab.work]

    def mapper(k):
        rnd = random.Random(k)
        for i in range(120):
            g = 0x200000 + rnd.randrange(64) * PAGE
            with lock:
                hpa = vmm.alloc.alloc(1)
            r = vmm.psp.update_npt(vm.handle, g, hpa)
            if r.ok:
                with lock:
                    assert g not in expect
                    expect[g] = hpa
            elif r.status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED):
                return
            else:
                assert r.status in (Status.GPA_MAPPED,), r.name

    def tamperer():
        rnd = random.Random(99)
        while not stop.is_set():
            s = rnd.choice(slots)
            v = vmm.mem.read_u64(s)
            vmm.mem.write_u64(s, (v & ~ADDR_MASK) | lab.other_page)
            vmm.mem.write_u64(s, v)          # tamper-and-restore, racing the checks
    ts = [threading.Thread(target=mapper, args=(k,)) for k in range(2)]
    tt = threading.Thread(target=tamperer)
    tt.start()
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    stop.set()
    tt.join(5)
    # whatever interleaving happened: no frame is mapped twice, and either the
    # guest was stopped or the table is exactly what the PSP installed
    frames = list(expect.values())
    assert len(frames) == len(set(frames))
    _consistent_or_detected(lab, vm, expect)
    assert lab.psp.verify(lab.other.handle).ok


def test_tamper_during_512_page_update(lab):
    """A thread rewrites the leaf slots a 512-page UPDATE_NPT is filling."""
    vmm = lab.vmm
    vm = lab.victim
    g0 = 0x40000000
    vmm.touch(vm, g0 + 512 * PAGE, ACC_W)          # creates the tables of g0's neighbourhood
    r = vmm.psp.unmap(vm.handle, g0 + 512 * PAGE)
    assert r.ok
    pt = lab.table_of(g0)
    expect = {g: lab.frame(g) for g in lab.work}
    hpa = vmm.alloc.alloc(512, align=MB2)
    stop = threading.Event()

    def tamperer():
        i = 0
        while not stop.is_set():
            vmm.mem.write_u64(pt + (i % 512) * 8, lab.other_page | P | W | U)
            i += 37
    t = threading.Thread(target=tamperer)
    t.start()
    rr = []
    for _ in range(3):
        rr.append(vmm.psp.update_npt(vm.handle, g0, hpa, 1, 3, 512))
        if rr[-1].ok:
            break
    stop.set()
    t.join(5)
    if any(r.ok for r in rr):
        expect.update({g0 + i * PAGE: hpa + i * PAGE for i in range(512)})
    else:
        assert rr[0].status == Status.INTEGRITY_FAILURE, rr[0].name
    _consistent_or_detected(lab, vm, expect)


# ---------------------------------------------------------------------------
# 5. the other transport

def test_process_psp_detects_and_survives_garbage():
    lb = Lab("merkle", psp="process")
    try:
        vmm = lb.vmm
        for cmd in (0x20, 0x21, 0x30, 0x99):
            for n in (0, 5, 28, 4096, 10000):
                st, _ = vmm.psp.raw(cmd, bytes([0xAB]) * n)
                assert st in set(Status) and st not in (Status.INTERNAL_ERROR, Status.PSP_DEAD)
        s = lb.slot(BASE + 41 * PAGE)        # not present, in the update's line
        vmm.mem.write_u64(s, lb.other_page | P | W | U)
        r = vmm.psp.update_npt(lb.victim.handle, BASE + 40 * PAGE, vmm.alloc.alloc(1))
        assert r.status == Status.INTEGRITY_FAILURE
        assert_stopped(lb)
    finally:
        lb.close()


# ---------------------------------------------------------------------------
# 6. through a running guest

@pytest.fixture(scope="module")
def guests():
    try:
        from guests.build import build_all
        return build_all()
    except Exception as e:      # no compiler
        pytest.skip(f"guest images unavailable: {e}")


def _remap_code_page(vmm, boot, evil):
    """Point the NPT leaf of the page the guest is executing at `evil`,
    found by walking the table in host memory as the VMM can."""
    pc = boot.vcpu.pc
    t = vmm.npt_root(boot.vm)
    for lvl in (4, 3, 2):
        t = vmm.mem.read_u64(t + npt_index(pc, lvl) * 8) & ADDR_MASK
    s = t + npt_index(pc, 1) * 8
    vmm.mem.write_u64(s, (vmm.mem.read_u64(s) & ~ADDR_MASK) | evil)


def _evil_page(vmm, code=42):
    """A page that, entered anywhere, exits the guest with `code`."""
    evil = vmm.alloc.alloc(1)
    vmm.mem.write(evil, b"\x90" * 4092 + bytes([0xB0, code, 0xE6, 0xF4]))
    return evil


@pytest.mark.parametrize("mode", MODES)
def test_guest_code_remap_in_last_interval_is_reported(guests, mode):
    """Remap the page the guest is executing to attacker code that ends the
    run at once with a chosen exit code: the guest executes it (exposure up
    to one check interval, by design), but the run must not end as a clean
    guest exit: the tamper is still in the table when the guest stops."""
    from hv.machine.boot import Boot
    vmm = new_vmm(mode)
    try:
        evil = _evil_page(vmm)
        done = {}

        def cb(boot, insns):
            if done:
                return
            _remap_code_page(vmm, boot, evil)
            done["at"] = insns
        b = Boot(vmm, guests["compute"], mem=16 << 20, check_insns=5000, on_slice=cb)
        res = b.run()
        assert done
        assert res.exit_reason == "psp_stopped", (res.exit_reason, res.exit_code, res.reason)
        assert res.exit_code == 3
    finally:
        vmm.close()


@pytest.mark.parametrize("mode", MODES)
def test_guest_data_remap_detected_within_interval(guests, mode):
    """SEVered on a running guest: remap a guest page to the other guest's
    secret page mid-run; the next check stops the guest, within one interval."""
    from hv.machine.boot import Boot
    vmm = new_vmm(mode)
    try:
        other = vmm.create_vm()
        secret = vmm.touch(other, 0, ACC_W) & ~0xFFF
        done = {}

        def cb(boot, insns):
            if done:
                return
            t = vmm.npt_root(boot.vm)
            maps = vmm.engine.mappings(t)
            g = max(m[0] for m in maps)           # some demand-faulted data page
            tt = t
            for lvl in (4, 3, 2):
                tt = vmm.mem.read_u64(tt + npt_index(g, lvl) * 8) & ADDR_MASK
            s = tt + npt_index(g, 1) * 8
            vmm.mem.write_u64(s, (vmm.mem.read_u64(s) & ~ADDR_MASK) | secret)
            done["at"] = insns
        b = Boot(vmm, guests["compute"], mem=16 << 20, check_insns=20000, on_slice=cb)
        res = b.run()
        assert done
        assert res.exit_reason == "psp_stopped", (res.exit_reason, res.reason)
        assert b.instructions - done["at"] <= 20000
        assert vmm.psp.verify(other.handle).ok
    finally:
        vmm.close()


def test_guest_stopped_by_psp_timer_is_never_resumed(guests):
    """The PSP's own wall-time checker stops a tampered guest; the run loop
    must not resume it (it would run the attacker's code page)."""
    import time
    from hv.machine.boot import Boot
    vmm = Vmm(host_mem=64 << 20, psp_check_ms=2)
    try:
        evil = _evil_page(vmm)
        done = {}

        def cb(boot, insns):
            if done:
                return
            _remap_code_page(vmm, boot, evil)
            done["at"] = insns
            end = time.monotonic() + 5
            while vmm.psp.guest_status(boot.vm.handle).name != "GUEST_STOPPED" \
                    and time.monotonic() < end:
                time.sleep(0.002)
        b = Boot(vmm, guests["compute"], mem=16 << 20, on_slice=cb, slice_insns=5000)
        res = b.run()
        assert done
        assert res.exit_reason == "psp_stopped", (res.exit_reason, res.exit_code, res.reason)
        assert b.instructions == done["at"]          # not one instruction after the stop
    finally:
        vmm.close()


@pytest.mark.parametrize("hook", ["c", "python"])
def test_forged_control_page_refused_at_vmrun(hook):
    """The VMM hands the CPU a forged VMSA whose nCR3 points at a table the
    PSP never saw: the CPU's VMRUN check (against the PSP's record of this
    guest's VMSA) refuses to run the guest at all."""
    from guests.build import build_all
    from hv.machine.boot import Boot
    from hv.machine.unicorn_vcpu import available_hooks
    if hook not in available_hooks():
        pytest.skip(f"{hook} hook not built")
    img = build_all()["hello"]
    vmm = Vmm(host_mem=128 << 20)
    try:
        b = Boot(vmm, str(img), mem=16 << 20, hook=hook)
        real = b.vm.vmsa
        forged = vmm.alloc.alloc(1)
        fake_root = vmm.alloc.alloc(1)
        vmm.mem.write(fake_root, vmm.mem.read(vmm.npt_root(b.vm), 4096))   # a copy, then edited freely
        vmm.mem.write_u64(forged, fake_root)
        b.vcpu._vmsa = forged
        if getattr(b.vcpu, "_ctx", None) is not None:
            b.vcpu._ctx.vmsa = forged
        r = b.run()
        assert r.exit_reason == "psp_stopped" and r.exit_code == 3
        assert r.instructions == 0 and r.serial == ""
        assert r.tamper["detected_by"] == "VMRUN control-page check"
        assert r.tamper["expected"] == real and r.tamper["found"] == forged
        b.close()
    finally:
        vmm.close()
