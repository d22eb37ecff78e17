"""The PSP's C core (psp_firmware._psp_core_c) against its Python twin.

Every test here runs with the C core on and off (HV_PSP_CORE), and a
hypothesis differential test drives the two side by side through random
UPDATE_NPT / UNMAP / tamper / VERIFY sequences in both integrity modes:
identical statuses, reply bytes, table bytes, digests and frame states.
"""
import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv import Status, Vmm
from nptcore.bits import A, D, NX, P, W
from psp_firmware import core as psp_core
from psp_firmware.merkle import MerkleIntegrity

PAGE = 4096
MB2 = 2 << 20
CORES = ["c", "python"] if psp_core.available() else ["python"]
needs_c = pytest.mark.skipif(not psp_core.available(), reason="C core not built")


def _vmm(monkeypatch, core, mode="merkle", **kw):
    monkeypatch.setenv("HV_PSP_CORE", core)
    v = Vmm(host_mem=kw.pop("host_mem", 64 << 20), integrity=mode, fw_size=8 << 20, **kw)
    assert v._psp_obj.core == core
    return v


def test_resolve():
    assert psp_core.resolve("python") is None
    with pytest.raises(ValueError):
        psp_core.resolve("fortran")
    if psp_core.available():
        assert psp_core.resolve("c") is psp_core.lib


@needs_c
def test_c_hashes_equal_hashlib():
    ffi, lib = psp_core.ffi, psp_core.lib
    chunk = bytes(range(256)) * 2
    slots = bytes(reversed(range(256))) * 8
    out = ffi.new("char[32]")
    lib.psp_chunk_hash(chunk, 0, ffi.NULL, out)
    assert ffi.buffer(out)[:] == hashlib.sha256(b"C" + chunk).digest()
    lib.psp_chunk_hash(chunk, 0, slots, out)
    assert ffi.buffer(out)[:] == hashlib.sha256(b"C" + chunk + slots).digest()
    # A/D masked when hashing from host memory
    ents = struct.unpack("<64Q", chunk)
    canon = struct.pack("<64Q", *[e & ~0x60 for e in ents])
    lib.psp_chunk_hash(chunk, 1, ffi.NULL, out)
    assert ffi.buffer(out)[:] == hashlib.sha256(b"C" + canon).digest()
    assert lib.psp_chunk_check(chunk, 1, ffi.NULL, hashlib.sha256(b"C" + canon).digest())
    assert not lib.psp_chunk_check(chunk, 0, ffi.NULL, hashlib.sha256(b"C" + canon).digest())
    chunks = bytes(range(256))
    lib.psp_node_hash(0x1234000, 3, chunks, out)
    assert ffi.buffer(out)[:] == hashlib.sha256(struct.pack("<cQB", b"N", 0x1234000, 3)
                                                + chunks).digest()
    lib.psp_root_hash(0x5000, chunks[:32], out)
    assert ffi.buffer(out)[:] == hashlib.sha256(struct.pack("<cQ", b"R", 0x5000)
                                                + chunks[:32]).digest()


@needs_c
def test_c_scrub_and_leaf_scan():
    ffi, lib = psp_core.ffi, psp_core.lib
    buf = bytearray(b"\xAA" * (3 * PAGE))
    buf[PAGE:2 * PAGE] = bytes(PAGE)
    lib.psp_scrub(ffi.from_buffer(buf), 100, 3 * PAGE - 200)
    assert buf[:100] == b"\xAA" * 100 and buf[-100:] == b"\xAA" * 100
    assert buf[100:-100] == bytes(3 * PAGE - 200)
    page = bytearray(PAGE)
    struct.pack_into("<Q", page, 8 * 20, 0x1000 | P)            # a table entry
    struct.pack_into("<Q", page, 8 * 30, 0x200000 | P | 0x80)   # a large leaf
    p = ffi.from_buffer(page)
    assert lib.psp_leaf_scan(p, 0, 20, 1) == -1
    assert lib.psp_leaf_scan(p, 10, 20, 1) == (10 << 1)
    assert lib.psp_leaf_scan(p, 10, 20, 2) == (10 << 1) | 1     # RANGE_OVERLAP
    assert lib.psp_leaf_scan(p, 30, 5, 2) == 0                  # GPA_MAPPED


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("mode", ["merkle", "full"])
def test_npf_paths_and_tamper(monkeypatch, core, mode):
    vmm = _vmm(monkeypatch, core, mode)
    try:
        vm = vmm.create_vm(fault_around=16)
        for gpa in (0, 0x5000, 0x20_0000, 0x7F_0000_0000):
            vmm.touch(vm, gpa)
        assert vmm.psp.update_npt(vm.handle, 0x60_0000, vmm.alloc.alloc(512, align=MB2),
                                  level=2).ok
        r = vmm.psp.update_npt(vm.handle, 0x5000, vmm.alloc.alloc(1))
        assert r.status == Status.GPA_MAPPED
        assert vmm.psp.verify(vm.handle).ok
        integ = vmm._psp_obj._guests[vm.handle].integrity
        if mode == "merkle":
            fresh = MerkleIntegrity(integ.shadow, integ._canon, integ._read_u64, integ.vmsa,
                                    core="python")
            assert fresh.digest == integ.digest and fresh.chunk_h == integ.chunk_h
        # a tamper next to the next slot is refused by the update
        leaf_pt = vmm.engine.walk(vmm.npt_root(vm), 0x5000, 0)
        assert leaf_pt.ok
        t = [h for h, lv in vmm.engine.table_pages(vmm.npt_root(vm)) if lv == 1][0]
        vmm.mem.write_u64(t + 8 * 40, vmm.mem.read_u64(t + 8 * 40) | W | NX | P | 0x1000)
        r = vmm.psp.update_npt(vm.handle, 41 * PAGE, vmm.alloc.alloc(1))
        assert r.status == Status.INTEGRITY_FAILURE
        assert r.entry_index == 40 and r.page_hpa == t
    finally:
        vmm.close()


# --------------------------------------------------------------------------
# differential: C core on and off give identical everything
GPAS = [0x0, 0x1000, 0x3F000, 0x40000, 0x20_0000, 0x3F_F000, 0x60_0000, 1 << 30,
        0x7F_FFFF_F000 & ~0xFFF, 0x1FF000]

op_map = st.tuples(st.just("map"), st.sampled_from(GPAS), st.sampled_from([1, 3, 16, 64]))
op_map2m = st.tuples(st.just("map2m"), st.sampled_from([0, 0x20_0000, 0x60_0000, 1 << 30]),
                     st.sampled_from([1, 2]))
op_unmap = st.tuples(st.just("unmap"), st.sampled_from(GPAS), st.sampled_from([1, 2]))
op_tamper = st.tuples(st.just("tamper"), st.integers(0, 1 << 16),
                      st.sampled_from([A, D, A | D, W, NX, P, PAGE, 1 << 40, 1 << 55]))
op_verify = st.tuples(st.just("verify"), st.just(0), st.just(0))
op_root = st.tuples(st.just("root"), st.just(0), st.just(0))
ops_strategy = st.lists(st.one_of(op_map, op_map, op_map2m, op_unmap, op_tamper, op_verify,
                                  op_root), max_size=16)


def _state(vmm, vm):
    psp = vmm._psp_obj
    g = psp._guests.get(vm.handle)
    tables = sorted(g.npt.pages) if g else []
    return {
        "tables": [(h, vmm.mem.read(h, PAGE)) for h in tables],
        "shadow": [(h, bytes(g.npt.pages[h])) for h in tables],
        "digest": g.integrity.digest if g else None,
        "frames": psp._frames.snapshot(),
        "pool": list(psp._pool),
        "status": vmm.psp.guest_status(vm.handle),
    }


def _drive(monkeypatch, core, mode, ops):
    vmm = _vmm(monkeypatch, core, mode)
    out = []
    try:
        vm = vmm.create_vm()
        touched = set()
        for kind, a, b in ops:
            if kind == "map":
                r = vmm.psp.update_npt(vm.handle, a, vmm.alloc.alloc(b), npages=b)
            elif kind == "map2m":
                r = vmm.psp.update_npt(vm.handle, a, vmm.alloc.alloc(512 * b, align=MB2),
                                       level=2, npages=b)
            elif kind == "unmap":
                r = vmm.psp.unmap(vm.handle, a, npages=b)
            elif kind == "verify":
                r = vmm.psp.verify(vm.handle)
            elif kind == "tamper":
                pages = sorted(vmm._psp_obj._guests[vm.handle].npt.pages)
                addr = pages[a % len(pages)] + ((a >> 4) % 512) * 8
                if addr in touched:
                    continue
                touched.add(addr)
                vmm.mem.write_u64(addr, vmm.mem.read_u64(addr) ^ b)
                r = None
            elif kind == "root":
                if "root" in touched:
                    continue
                touched.add("root")
                vmm.mem.write_u64(vm.vmsa, vmm.mem.read_u64(vm.vmsa) ^ PAGE)
                r = None
            out.append(None if r is None else (int(r.status), r.fields))
        out.append(_state(vmm, vm))
        vmm._psp_obj._check_invariants()
        return out
    finally:
        vmm.close()


@needs_c
@pytest.mark.parametrize("mode", ["merkle", "full"])
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=ops_strategy)
def test_differential_c_vs_python(monkeypatch, mode, ops):
    assert _drive(monkeypatch, "c", mode, ops) == _drive(monkeypatch, "python", mode, ops)
