"""PSP firmware: every command's success path and every refusal cause."""
import struct

import pytest

from hv import Cmd, Status, VmStopped
from nptcore.bits import A, ACC_R, ACC_W, ACC_X, AD_MASK, D, NX, P, PF_P
from psp_firmware import Psp, encode

PAGE = 4096
MB2 = 2 << 20


def refused_without_change(vmm, vm, reply, status):
    assert reply.status == status, reply


def snapshot(vmm):
    """Host memory (table pages, vmsa, pool) and PSP counters: to compare."""
    return (bytes(vmm.mem.buf[:]), vmm.psp.platform_status().fields)


def test_platform_status_counts_frames(vmm):
    st = vmm.psp.platform_status()
    assert st.ok
    assert st.state == 1 and st.host_size == vmm.mem.size
    assert st.frames_fw == vmm.fw_size // PAGE
    assert st.pool_free > 0


def test_platform_init_twice_refused(vmm):
    r = vmm.psp.platform_init(vmm.mem.size, vmm.fw_base, vmm.fw_size)
    assert r.status == Status.INVALID_PLATFORM_STATE


def test_commands_before_platform_init():
    from hv.vmm.hostmem import HostMemory
    mem = HostMemory(64 << 20)
    psp = Psp(mem.buf)
    st, _ = psp.mailbox(Cmd.LAUNCH_START, encode(Cmd.LAUNCH_START, vmsa_hpa=PAGE, policy=0))
    assert st == Status.INVALID_PLATFORM_STATE
    st, _ = psp.mailbox(Cmd.PLATFORM_INIT, encode(Cmd.PLATFORM_INIT, host_size=64 << 20,
                                                  fw_base=63 << 20, fw_size=2 << 20))
    assert st == Status.OUT_OF_RANGE
    st, _ = psp.mailbox(Cmd.PLATFORM_INIT, encode(Cmd.PLATFORM_INIT, host_size=128 << 20,
                                                  fw_base=0, fw_size=0))
    assert st == Status.INVALID_PARAM


def test_touch_maps_through_psp(vmm):
    vm = vmm.create_vm()
    hpa = vmm.touch(vm, 0x5123, ACC_W)
    assert hpa & 0xFFF == 0x123
    r = vmm.engine.walk(vmm.npt_root(vm), 0x5123, ACC_R)
    assert r.ok and r.hpa == hpa
    assert vm.npf == 1 and vm.pages_mapped == 1
    # second touch: no NPF
    assert vmm.touch(vm, 0x5FFF, ACC_X) == (hpa & ~0xFFF) + 0xFFF
    assert vm.npf == 1


def test_update_npt_success_fields_and_digest_changes(vmm):
    vm = vmm.create_vm()
    d0 = vmm.guest_digest(vm)
    hpa = vmm.alloc.alloc(4)
    r = vmm.psp.update_npt(vm.handle, 0x10000, hpa, 1, 3, 4)
    assert r.ok and r.done == 4 and r.tables_used == 3
    d1 = vmm.guest_digest(vm)
    assert d1 != d0 and len(d1) == 32
    for i in range(4):
        w = vmm.engine.walk(vmm.npt_root(vm), 0x10000 + i * PAGE, ACC_W)
        assert w.ok and w.hpa == hpa + i * PAGE
    st = vmm.psp.guest_status(vm.handle)
    assert st.mapped_pages == 4 and st.table_pages == 4


def test_update_npt_2m(vmm):
    vm = vmm.create_vm()
    hpa = vmm.alloc.alloc(512, align=MB2)
    r = vmm.psp.update_npt(vm.handle, 0x40000000, hpa, 2, 3, 1)
    assert r.ok
    w = vmm.engine.walk(vmm.npt_root(vm), 0x40000000 + 0x12345, ACC_R)
    assert w.ok and w.level == 2 and w.hpa == hpa + 0x12345


def test_attrs_become_permissions(vmm):
    vm = vmm.create_vm()
    hpa = vmm.alloc.alloc(1)
    assert vmm.psp.update_npt(vm.handle, 0x7000, hpa, 1, 0, 1).ok   # read-only, NX
    root = vmm.npt_root(vm)
    assert vmm.engine.walk(root, 0x7000, ACC_R).ok
    w = vmm.engine.walk(root, 0x7000, ACC_W)
    assert not w.ok and w.errcode & PF_P
    x = vmm.engine.walk(root, 0x7000, ACC_X)
    assert not x.ok and x.errcode & PF_P


@pytest.mark.parametrize("case,status", [
    ("misaligned_hpa", Status.MISALIGNED),
    ("misaligned_gpa", Status.MISALIGNED),
    ("misaligned_2m", Status.MISALIGNED),
    ("hpa_out_of_range", Status.OUT_OF_RANGE),
    ("hpa_overflow", Status.RANGE_OVERFLOW),
    ("gpa_out_of_range", Status.OUT_OF_RANGE),
    ("gpa_overflow", Status.RANGE_OVERFLOW),
    ("firmware_page", Status.FIRMWARE_PAGE),
    ("table_page", Status.TABLE_PAGE),
    ("pool_page", Status.TABLE_PAGE),
    ("vmsa_page", Status.BAD_PAGE_STATE),
    ("alias_same_guest", Status.PAGE_OWNED),
    ("alias_other_guest", Status.PAGE_OWNED),
    ("private_other_guest", Status.BAD_OWNER),
    ("gpa_mapped", Status.GPA_MAPPED),
    ("huge_over_small", Status.RANGE_OVERLAP),
    ("small_under_huge", Status.GPA_MAPPED),
    ("bad_level", Status.INVALID_PARAM),
    ("bad_attrs", Status.INVALID_PARAM),
    ("zero_pages", Status.INVALID_PARAM),
    ("bad_handle", Status.INVALID_HANDLE),
    ("range_hits_owned", Status.PAGE_OWNED),
])
def test_update_npt_refusals(vmm, case, status):
    vm = vmm.create_vm()
    other = vmm.create_vm()
    mapped_hpa = vmm.touch(vm, 0x1000) & ~0xFFF
    other_hpa = vmm.touch(other, 0x1000) & ~0xFFF
    vmm.touch(vm, 0x200000 * 5)            # 4K page inside 2M block 5
    free = vmm.alloc.alloc(1)
    free2m = vmm.alloc.alloc(512, align=MB2)
    assert vmm.psp.update_npt(vm.handle, 0x200000 * 9, free2m, 2, 3, 1).ok
    free2m_b = vmm.alloc.alloc(512, align=MB2)
    pair = vmm.alloc.alloc(2)
    assert vmm.psp.update_npt(vm.handle, 0x50000, pair + PAGE).ok
    priv = vmm.alloc.alloc(1)
    assert vmm.psp.set_private_memory(other.handle, priv, 1).ok
    root = vmm.npt_root(vm)
    h = vm.handle
    args = dict(handle=h, gpa=0x9000, hpa=free, level=1, attrs=3, npages=1)
    args.update({
        "misaligned_hpa": dict(hpa=free + 8),
        "misaligned_gpa": dict(gpa=0x9010),
        "misaligned_2m": dict(level=2, gpa=0x200000 * 20, hpa=free2m_b + PAGE),
        "hpa_out_of_range": dict(hpa=vmm.mem.size),
        "hpa_overflow": dict(hpa=(1 << 64) - PAGE, npages=2),
        "gpa_out_of_range": dict(gpa=1 << 48),
        "gpa_overflow": dict(gpa=(1 << 48) - PAGE, npages=2, hpa=vmm.alloc.alloc(2)),
        "firmware_page": dict(hpa=vmm.fw_base),
        "table_page": dict(hpa=root),
        "pool_page": dict(hpa=_a_pool_page(vmm)),
        "vmsa_page": dict(hpa=vm.vmsa),
        "alias_same_guest": dict(hpa=mapped_hpa),
        "alias_other_guest": dict(hpa=other_hpa),
        "private_other_guest": dict(hpa=priv),
        "gpa_mapped": dict(gpa=0x1000),
        "huge_over_small": dict(level=2, gpa=0x200000 * 5, hpa=free2m_b),
        "small_under_huge": dict(gpa=0x200000 * 9 + PAGE),
        "bad_level": dict(level=3),
        "bad_attrs": dict(attrs=0x80),
        "zero_pages": dict(npages=0),
        "bad_handle": dict(handle=999),
        "range_hits_owned": dict(hpa=pair, npages=2, gpa=0x30000),
    }[case])
    before = snapshot(vmm)
    r = vmm.psp.update_npt(**args)
    assert r.status == status, (case, r)
    after = snapshot(vmm)
    assert before[0] == after[0], "a refused command changed host memory"
    b, a = dict(before[1]), dict(after[1])
    b.pop("commands"), a.pop("commands")
    assert b == a, "a refused command changed PSP frame counts"


def _a_pool_page(vmm):
    """A frame the VMM donated to the PSP's table pool that is still free.

    The VMM donates its first 64 allocated frames at start; the PSP hands
    pool frames out lowest first, so the highest one is still in the pool."""
    from hv.vmm.vmm import POOL_CHUNK
    assert vmm.psp.platform_status().pool_free > 0
    return vmm.alloc.base + (POOL_CHUNK - 1) * PAGE


def test_two_guests_cannot_share_a_frame(vmm):
    a, b = vmm.create_vm(), vmm.create_vm()
    hpa = vmm.alloc.alloc(1)
    assert vmm.psp.update_npt(a.handle, 0x1000, hpa).ok
    r = vmm.psp.update_npt(b.handle, 0x1000, hpa)
    assert r.status == Status.PAGE_OWNED
    r = vmm.psp.update_npt(a.handle, 0x2000, hpa)
    assert r.status == Status.PAGE_OWNED


def test_tamper_detected_on_next_update_and_guest_fatal(vmm):
    vm = vmm.create_vm()
    other = vmm.create_vm()
    hpa = vmm.touch(vm, 0x3000) & ~0xFFF
    vmm.touch(other, 0x3000)
    # find the leaf entry in host memory and point it elsewhere (SEVered)
    root = vmm.npt_root(vm)
    leaf_table = [h for h, lv in vmm.engine.table_pages(root) if lv == 1][0]
    off = leaf_table + 3 * 8
    val = vmm.mem.read_u64(off)
    assert val & ~0xFFF & ((1 << 52) - 1) == hpa
    vmm.mem.write_u64(off, val + PAGE)
    # 0x4000's slot (entry 4) shares the tampered entry's 64-byte line: on the
    # update's path in both modes (merkle checks the lines the walk reads)
    r = vmm.psp.update_npt(vm.handle, 0x4000, vmm.alloc.alloc(1))
    assert r.status == Status.INTEGRITY_FAILURE
    assert r.page_hpa == leaf_table and r.entry_index == 3
    assert r.found == (val + PAGE) & ~AD_MASK and r.expected == val & ~AD_MASK
    for reply in (vmm.psp.update_npt(vm.handle, 0x9000, vmm.alloc.alloc(1)),
                  vmm.psp.unmap(vm.handle, 0x3000), vmm.psp.verify(vm.handle),
                  vmm.psp.launch_finish(vm.handle), vmm.psp.guest_status(vm.handle)):
        assert reply.status == Status.GUEST_STOPPED
    with pytest.raises(VmStopped):
        vmm.touch(vm, 0xA000)
    # the other guest carries on
    assert vmm.touch(other, 0x4000)
    assert vmm.psp.verify(other.handle).ok


def test_accessed_dirty_bits_are_not_tampering(vmm):
    vm = vmm.create_vm()
    vmm.touch(vm, 0x3000, ACC_W)      # the walker sets A and D
    root = vmm.npt_root(vm)
    leaf_table = [h for h, lv in vmm.engine.table_pages(root) if lv == 1][0]
    assert vmm.mem.read_u64(leaf_table + 24) & (A | D) == A | D
    for hpa, _lv in vmm.engine.table_pages(root):       # and by hand on every entry
        for i in range(512):
            v = vmm.mem.read_u64(hpa + 8 * i)
            vmm.mem.write_u64(hpa + 8 * i, v | AD_MASK if v & P else v)
    assert vmm.psp.verify(vm.handle).ok
    assert vmm.psp.update_npt(vm.handle, 0x8000, vmm.alloc.alloc(1)).ok


def test_other_bits_are_tampering(vmm):
    vm = vmm.create_vm()
    vmm.touch(vm, 0x3000, ACC_W)
    root = vmm.npt_root(vm)
    leaf_table = [h for h, lv in vmm.engine.table_pages(root) if lv == 1][0]
    v = vmm.mem.read_u64(leaf_table + 24)
    vmm.mem.write_u64(leaf_table + 24, v | NX)
    r = vmm.psp.verify(vm.handle)
    assert r.status == Status.INTEGRITY_FAILURE and r.entry_index == 3


def test_root_pointer_swap_detected(vmm):
    vm = vmm.create_vm()
    vmm.touch(vm, 0x3000)
    fake = vmm.alloc.alloc(1)
    vmm.mem.write(fake, vmm.mem.read(vmm.npt_root(vm), PAGE))
    vmm.mem.write_u64(vm.vmsa, fake)
    r = vmm.psp.verify(vm.handle)
    assert r.status == Status.INTEGRITY_FAILURE and r.page_hpa == vm.vmsa


def test_unmap_reclaim_scrubs(vmm):
    vm = vmm.create_vm()
    hpa = vmm.touch(vm, 0x3000, ACC_W) & ~0xFFF
    vmm.mem.write(hpa, b"guest secret")
    assert vmm.psp.reclaim(vm.handle, hpa).status == Status.BAD_PAGE_STATE   # still mapped
    assert vmm.psp.unmap(vm.handle, 0x3000).ok
    assert not vmm.engine.walk(vmm.npt_root(vm), 0x3000, ACC_R).ok
    assert vmm.psp.unmap(vm.handle, 0x3000).status == Status.GPA_NOT_MAPPED
    # unmapped but still the guest's: nobody else may map it
    other = vmm.create_vm()
    assert vmm.psp.update_npt(other.handle, 0x1000, hpa).status == Status.BAD_OWNER
    assert vmm.mem.read(hpa, 12) == b"guest secret"
    assert vmm.psp.reclaim(vm.handle, hpa).ok
    assert vmm.mem.read(hpa, PAGE) == bytes(PAGE)
    assert vmm.psp.reclaim(vm.handle, hpa).status == Status.BAD_PAGE_STATE
    assert vmm.psp.update_npt(other.handle, 0x1000, hpa).ok


def test_private_memory_then_map(vmm):
    vm = vmm.create_vm()
    hpa = vmm.alloc.alloc(8)
    assert vmm.psp.set_private_memory(vm.handle, hpa, 8).ok
    assert vmm.psp.set_private_memory(vm.handle, hpa, 8).status == Status.BAD_PAGE_STATE
    other = vmm.create_vm()
    assert vmm.psp.set_private_memory(other.handle, hpa, 8).status == Status.BAD_OWNER
    assert vmm.psp.update_npt(vm.handle, 0x100000, hpa, 1, 3, 8).ok
    assert vmm.psp.set_private_memory(vm.handle, vmm.fw_base, 1).status == Status.FIRMWARE_PAGE


def test_launch_measurement(vmm):
    def launch(data):
        vm = vmm.create_vm()
        vmm.load_page(vm, 0x100000, data)
        vmm.load_page(vm, 0x101000, b"second page")
        return vm, vmm.launch_finish(vm)
    vm1, m1 = launch(b"image page 1")
    _vm2, m2 = launch(b"image page 1")
    _vm3, m3 = launch(b"image page X")
    assert m1 == m2 and m1 != m3 and len(m1) == 32
    # the definition: SHA-256 over every page loaded, in order, each as its
    # GPA (8 bytes, little-endian) followed by its 4096 bytes (zero-padded)
    import hashlib
    import struct
    want = hashlib.sha256()
    for gpa, data in ((0x100000, b"image page 1"), (0x101000, b"second page")):
        want.update(struct.pack("<Q", gpa) + data.ljust(4096, b"\0"))
    assert m1 == want.digest()
    assert vmm.psp.launch_finish(vm1.handle).status == Status.INVALID_GUEST_STATE
    hpa = vmm.alloc.alloc(1)
    assert vmm.psp.launch_update_data(vm1.handle, 0x200000, hpa, 1).status == Status.INVALID_GUEST_STATE
    assert vmm.psp.guest_status(vm1.handle).measurement == m1


def test_decommission_returns_frames(vmm):
    vm = vmm.create_vm()
    hpa = vmm.touch(vm, 0x3000, ACC_W) & ~0xFFF
    vmm.mem.write(hpa, b"secret")
    before = vmm.psp.platform_status()
    assert vmm.psp.decommission(vm.handle).ok
    after = vmm.psp.platform_status()
    assert vmm.mem.read(hpa, 6) == bytes(6)
    assert after.frames_mapped == before.frames_mapped - 1
    assert after.frames_vmsa == before.frames_vmsa - 1
    assert after.pool_free > before.pool_free
    assert vmm.psp.guest_status(vm.handle).status == Status.INVALID_HANDLE


def test_pool_add_refusals(vmm):
    assert vmm.psp.pool_add(vmm.fw_base, 1).status == Status.FIRMWARE_PAGE
    assert vmm.psp.pool_add(vmm.alloc.alloc(1) + 1, 1).status == Status.MISALIGNED
    assert vmm.psp.pool_add(vmm.mem.size - PAGE, 2).status == Status.OUT_OF_RANGE
    vm = vmm.create_vm()
    hpa = vmm.touch(vm, 0) & ~0xFFF
    assert vmm.psp.pool_add(hpa, 1).status == Status.PAGE_OWNED


def test_pool_exhaustion_is_a_status(backend):
    from hv.vmm.hostmem import HostMemory
    mem = HostMemory(64 << 20)
    psp = Psp(mem.buf, backend=backend)

    def call(cmd, **kw):
        return psp.mailbox(cmd, encode(cmd, **kw))
    assert call(Cmd.PLATFORM_INIT, host_size=64 << 20, fw_base=60 << 20, fw_size=4 << 20)[0] == 0
    assert call(Cmd.POOL_ADD, hpa=0x100000, npages=2)[0] == 0
    st, out = call(Cmd.LAUNCH_START, vmsa_hpa=0x200000, policy=0)
    assert st == 0
    handle = struct.unpack("<I", out)[0]
    # root used one pool page; a mapping needs three more
    st, _ = call(Cmd.UPDATE_NPT, handle=handle, level=1, gpa=0, hpa=0x300000, attrs=3, npages=1)
    assert st == Status.RESOURCE_EXHAUSTED
    assert call(Cmd.POOL_ADD, hpa=0x400000, npages=4)[0] == 0
    st, _ = call(Cmd.UPDATE_NPT, handle=handle, level=1, gpa=0, hpa=0x300000, attrs=3, npages=1)
    assert st == 0
    psp._check_invariants()


@pytest.mark.parametrize("cmd", list(Cmd) + [0, 0x99, 0xFFFFFFFF])
def test_malformed_buffers_give_status(vmm, cmd):
    for buf in (b"", b"\x00", b"\xff" * 7, b"\x01" * 64):
        st, out = vmm.psp.raw(int(cmd), buf)
        assert isinstance(st, int)
    st, _ = vmm.psp.raw(0x99, b"")
    assert st == Status.INVALID_COMMAND
