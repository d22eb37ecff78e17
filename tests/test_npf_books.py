"""What the fast NPF path keeps cheap: the vCPU's compact NPF log
(hv.machine.npf_log), the VMM's books brought up to date when read
(hv.vmm.vm.Vm), and the PSP's scrub probe shared between the vCPU's
UPDATE_NPTs while no other command runs (psp_shared_update)."""
from array import array

import pytest
from hypothesis import given, settings, strategies as st

from hv.machine.npf_log import WORDS, NpfLog
from hv.vmm.vm import Vm

U64 = st.integers(0, (1 << 64) - 1)
RECORD = st.tuples(U64, st.sampled_from([0, 1, 2]), st.integers(0, (1 << 32) - 1),
                   st.one_of(st.none(), U64))


# ---------------------------------------------------------------------------
# NpfLog reads as the list of tuples it was given

@settings(max_examples=60, deadline=None)
@given(st.lists(RECORD, max_size=40), st.integers(-45, 45))
def test_npf_log_is_the_list_it_was_given(records, i):
    log = NpfLog()
    for r in records:
        log.append(r)
    assert len(log) == len(records) and bool(log) == bool(records)
    assert list(log) == records and log == records and log == NpfLog(records)
    assert log[1:7] == records[1:7] and log[::-3] == records[::-3]
    if -len(records) <= i < len(records):
        assert log[i] == records[i]
    else:
        with pytest.raises(IndexError):
            log[i]
    assert list(log.gpas()) == [r[0] for r in records]
    assert (log == records[:-1]) is (not records)
    assert log + NpfLog(records[:2]) == records + records[:2] == records + log[:2]


@settings(max_examples=40, deadline=None)
@given(st.lists(RECORD, max_size=20), st.lists(st.tuples(U64, st.sampled_from([0, 1, 2]),
                                                          st.integers(0, 255), U64), max_size=20))
def test_npf_log_takes_the_c_logs_words(first, fast):
    """extend_words appends records laid out as csrc/vcpu.c writes them:
    gpa, access, errcode, rip (always known there)."""
    log = NpfLog(first)
    words = array("Q", [w for rec in fast for w in rec])
    log.extend_words(words)
    assert list(log) == first + fast


def test_npf_log_refuses_partial_records():
    log = NpfLog([(0x1000, 1, 6, None)])
    with pytest.raises(ValueError, match="whole records"):
        log.extend_words(array("Q", [1] * (WORDS + 1)))
    with pytest.raises(ValueError, match="whole records"):
        log.extend_words(array("L", [1] * WORDS))
    assert list(log) == [(0x1000, 1, 6, None)]


# ---------------------------------------------------------------------------
# Vm's books: read at any point, what keeping them eagerly gives

class EagerBooks:
    """The books by their definition, kept at every mapping."""

    def __init__(self):
        self.mapped, self.spb, self.hpa_of, self.huge, self.pages = set(), {}, {}, set(), 0

    def record(self, first, n, hpa, level):
        self.hpa_of[first] = (hpa, n, level)
        if level == 2:
            self.huge.add(first >> 9)
            self.pages += 512
            return
        for p in range(first, first + n):
            self.mapped.add(p)
            self.spb[p >> 9] = self.spb.get(p >> 9, 0) + 1
        self.pages += n


PAGE_NO = st.integers(0, 3000)
OP = st.one_of(
    st.tuples(st.just("record"), PAGE_NO, st.integers(1, 600), U64, st.just(1)),
    st.tuples(st.just("record"), PAGE_NO.map(lambda p: p & ~511), st.just(1), U64, st.just(2)),
    st.tuples(st.just("pages"), st.lists(st.tuples(PAGE_NO, U64), max_size=30)),
    st.tuples(st.just("read"), st.sampled_from(["mapped", "small_per_block", "hpa_of"])))


@settings(max_examples=80, deadline=None)
@given(st.lists(OP, max_size=25))
def test_vm_books_read_as_kept_eagerly(ops):
    vm, ref = Vm(1, 0, 1 << 30), EagerBooks()
    for op in ops:
        if op[0] == "record":
            _, first, n, hpa, level = op
            vm.record(first, n, hpa, level)
            ref.record(first, n, hpa, level)
        elif op[0] == "pages":
            gpas = array("Q", [(p << 12) | 0x123 for p, _ in op[1]])    # any offset in the page
            hpas = [h for _, h in op[1]]
            vm.record_pages(gpas, hpas)
            for p, h in op[1]:
                ref.record(p, 1, h, 1)
        else:
            getattr(vm, op[1])            # a read in between settles what came before
        assert vm.pages_mapped == ref.pages and vm.huge_blocks == ref.huge
    assert vm.hpa_of == ref.hpa_of        # a page mapped twice keeps its last frame
    assert vm.mapped == ref.mapped and vm.small_per_block == ref.spb


def test_vm_record_pages_needs_a_frame_per_page():
    vm = Vm(1, 0, 1 << 30)
    with pytest.raises(ValueError, match="2 pages with 1 frames"):
        vm.record_pages([0x1000, 0x2000], [0x5000])
    assert vm.pages_mapped == 0 and not vm.mapped


# ---------------------------------------------------------------------------
# psp_shared_update's scrub probe

def _shared(shared_mem):
    """A VMM whose in-process C firmware is shared with a C caller, a guest
    with a leaf table for GPAs 0..2 MiB, and a way to send one UPDATE_NPT as
    the vCPU's fast path does (lock word held, released without psp_unlock)."""
    import struct
    from hv.vmm.vmm import Vmm
    from nptcore.bits import ACC_W
    try:
        from psp_firmware._psp_core_c import ffi, lib
    except ImportError:
        pytest.skip("the PSP's C core is not built")
    vmm = Vmm(host_mem=64 << 20, shared_mem=shared_mem)
    vm = vmm.create_vm(ram_size=16 << 20)
    entry = vmm.npf_fast_entry(vm)            # ("psp", function, context, lock word)
    if entry is None:
        vmm.close()
        pytest.skip("no shared firmware entry here")
    assert entry[0] == "psp"
    vmm.handle_npf(vm, 0, ACC_W)              # the tables, through the Python path
    ctx = ffi.cast("struct psp_ctx *", entry[2])
    assert ffi.addressof(ctx, "busy") == ffi.cast("int32_t *", entry[3])

    def update(gpa, hpa):
        buf = struct.pack("<IIQQII", vm.handle, 1, gpa, hpa, 3, 1)
        lib.psp_lock(ctx)
        try:
            return lib.psp_shared_update(ctx, buf)
        finally:
            ctx.busy = 0                      # as csrc/vcpu.c releases it
    return vmm, vm, update


@pytest.mark.parametrize("shared_mem", [False, True], ids=["pagemap", "seek_data"])
def test_shared_update_scrubs_what_was_written_before_any_other_command(shared_mem):
    """Frames the probe saw as holes may be taken without a scrub while only
    the vCPU's updates run (a VMM write after the probe is the VMM's write
    after the scrub); once any other command has run, the next update probes
    afresh and scrubs a frame that holds data."""
    vmm, vm, update = _shared(shared_mem)
    try:
        f = vmm.alloc.alloc_each(4)
        secret = b"earlier bytes".ljust(64, b"!")
        vmm.mem.write(f[3], secret)           # data before the first probe
        assert update(0x1000, f[0]) == 1      # probes f[0] and the frames after it
        vmm.mem.write(f[1], secret)           # after the probe, no command since
        assert update(0x2000, f[1]) == 1
        assert vmm.mem.read(f[1], 64) == secret       # the shared probe said: hole
        vmm.mem.write(f[2], secret)
        vmm.psp.nop()                          # another command: the probe starts over
        assert update(0x3000, f[2]) == 1
        assert vmm.mem.read(f[2], 4096) == bytes(4096)
        assert update(0x4000, f[3]) == 1      # data when probed: always scrubbed
        assert vmm.mem.read(f[3], 4096) == bytes(4096)
    finally:
        vmm.close()
