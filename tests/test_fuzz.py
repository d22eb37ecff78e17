"""Fuzzing the PSP firmware (issue 4, part 3).

1. A hypothesis state machine drives random sequences of PSP commands (valid
   and invalid; addresses at the boundaries, duplicated, overlapping)
   interleaved with random host-memory writes by the VMM (tampers, benign
   Accessed/Dirty flips, writes to harmless frames), and checks after every
   step:
     - the PSP only ever answers with a status code (never INTERNAL_ERROR);
     - no frame holds two roles (the frame table's invariants);
     - every GPA->HPA mapping in a live table was granted by a successful
       command (with its permissions), unless a tamper was made on that
       guest; no successful command handed out a frame that is a table page,
       PSP memory, a VMSA, or mapped elsewhere;
     - the stored digest matches the table unless a tamper was made (and
       reverted tampers match again); a tampered table never matches;
     - an INTEGRITY_FAILURE is only ever reported for a guest that was
       really tampered with (A/D flips are not tampering), and a stopped
       guest answers GUEST_STOPPED to every later command.
2. A byte-level fuzz of the command decoder: any command id, any bytes in
   (random lengths, and the right length with random fields), a status out,
   never an exception, never INTERNAL_ERROR, invariants intact.

CI runs a bounded number of examples (derandomized). A longer run:
    HV_FUZZ_EXAMPLES=2000 scripts/fuzz_long.sh        (or set it for pytest)
"""
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hv import Vmm
from hv.vmm.alloc import OutOfMemory
from nptcore.bits import ADDR_MASK, AD_MASK, NX, P, PS, U, W
from psp_firmware import INTEGRITY_MODES, Cmd, Status
from psp_firmware.commands import MAX_NPAGES, _IN
from psp_firmware.frames import F

PAGE = 4096
MB2 = 2 << 20
GPA_LIMIT = 1 << 48
STATUSES = {int(s) for s in Status} - {int(Status.INTERNAL_ERROR), int(Status.PSP_DEAD)}

_LONG = os.environ.get("HV_FUZZ_EXAMPLES")
EXAMPLES = int(_LONG) if _LONG else 25
STEPS = int(os.environ.get("HV_FUZZ_STEPS", "40"))
MODES = sorted(INTEGRITY_MODES)
BACKEND = os.environ.get("HV_FUZZ_BACKEND")     # None: c when built

FUZZ_SETTINGS = dict(deadline=None, derandomize=not _LONG, database=None if not _LONG else
                     settings.default.database,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                            HealthCheck.data_too_large])


def _canon(v):
    return v & ~AD_MASK


class PspMachine(RuleBasedStateMachine):
    mode = "full"

    def __init__(self):
        super().__init__()
        self.vmm = Vmm(host_mem=64 << 20, backend=BACKEND, integrity=self.mode, fw_size=8 << 20)
        self.psp_obj = self.vmm._psp_obj
        self.client = self.vmm.psp
        self.guests = {}        # handle -> Vm (live: not decommissioned)
        self.stopped = set()    # handles the PSP stopped (reported)
        self.granted = {}       # handle -> {gpa: (hpa, size, attrs)}
        self.dirty = {}         # handle -> {addr: original canonical value} of our tampers
        self.hpas = [0x10000]   # HPAs used before (to duplicate)
        self.gpas = [0, PAGE]   # GPAs used before
        self._new_guest()

    def teardown(self):
        self.vmm.close()

    # -- helpers ---------------------------------------------------------
    def _new_guest(self):
        vm = self.vmm.create_vm()
        self.guests[vm.handle] = vm
        self.granted[vm.handle] = {}
        self.dirty[vm.handle] = {}
        return vm

    def _fresh(self, n=1, align=PAGE):
        try:
            h = self.vmm.alloc.alloc(n, align=align)
        except OutOfMemory:
            return 0x20000
        self.hpas.append(h)
        return h

    def _shadow(self, h):
        return self.psp_obj._guests[h]

    def _table_pages(self):
        return sorted(hpa for g in self.psp_obj._guests.values() for hpa in g.npt.pages)

    def _vmsas(self):
        return [vm.vmsa for vm in self.guests.values()]

    def _frames_mapped_anywhere(self):
        out = set()
        for m in self.granted.values():
            for hpa, size, _a in m.values():
                out.update(range(hpa, hpa + size, PAGE))
        return out

    def _is_dirty(self, h):
        d = self.dirty.get(h, {})
        vmsa = self.guests[h].vmsa if h in self.guests else None
        for addr in list(d):
            cur = self.vmm.mem.read_u64(addr)
            if addr == vmsa:
                same = (cur & ADDR_MASK) == (d[addr] & ADDR_MASK)
            else:
                same = _canon(cur) == d[addr]
            if same:
                del d[addr]       # reverted: clean again
        return bool(d)

    def _expect(self, st, handle=None):
        assert st in STATUSES, f"PSP answered {st:#x}"
        if handle is not None and handle in self.stopped:
            assert st == Status.GUEST_STOPPED, f"stopped guest {handle} answered {Status(st).name}"
        if st == Status.INTEGRITY_FAILURE:
            assert handle is not None
            assert self._is_dirty(handle), f"INTEGRITY_FAILURE for guest {handle} with no tamper"
            self.stopped.add(handle)

    def _pick_handle(self, data):
        if self.guests and data.draw(st.integers(0, 9)) > 0:
            return data.draw(st.sampled_from(sorted(self.guests)))
        return data.draw(st.sampled_from([0, 999, 0xFFFFFFFF]))

    def _pick_hpa(self, data, level=1):
        kinds = ["fresh", "fresh", "used", "table", "vmsa", "fw", "edge", "misaligned", "low"]
        k = data.draw(st.sampled_from(kinds))
        mem = self.vmm.mem.size
        if k == "fresh":
            return self._fresh(512, align=MB2) if level == 2 else self._fresh(data.draw(st.integers(1, 3)))
        if k == "used":
            return data.draw(st.sampled_from(self.hpas))
        if k == "table":
            t = self._table_pages()
            return data.draw(st.sampled_from(t)) if t else 0
        if k == "vmsa":
            v = self._vmsas()
            return data.draw(st.sampled_from(v)) if v else 0
        if k == "fw":
            return data.draw(st.sampled_from([self.vmm.fw_base, self.vmm.fw_base - PAGE,
                                              self.vmm.fw_base - MB2, mem - PAGE]))
        if k == "edge":
            return data.draw(st.sampled_from([mem, mem - PAGE, (1 << 64) - PAGE, 1 << 52, 0,
                                              (1 << 63)]))
        if k == "misaligned":
            return data.draw(st.sampled_from(self.hpas)) + data.draw(st.sampled_from([8, 0x800, PAGE]))
        return data.draw(st.integers(0, 255)) * PAGE        # the VMM's own low memory

    def _pick_gpa(self, data, level=1):
        k = data.draw(st.sampled_from(["used", "used", "small", "huge", "edge", "misaligned"]))
        if k == "used":
            return data.draw(st.sampled_from(self.gpas))
        if k == "small":
            g = data.draw(st.integers(0, 40)) * PAGE
        elif k == "huge":
            g = data.draw(st.integers(0, 8)) * MB2
        elif k == "edge":
            return data.draw(st.sampled_from([GPA_LIMIT - PAGE, GPA_LIMIT, GPA_LIMIT - MB2,
                                              (1 << 64) - PAGE, 1 << 47, 0x1FF000]))
        else:
            return data.draw(st.sampled_from(self.gpas)) + data.draw(st.sampled_from([1, 8, PAGE]))
        self.gpas.append(g)
        return g

    def _pick_npages(self, data):
        return data.draw(st.sampled_from([1, 1, 1, 2, 3, 4, 0, 512, MAX_NPAGES, MAX_NPAGES + 1,
                                          0xFFFFFFFF]))

    # -- PSP commands ----------------------------------------------------
    @precondition(lambda self: len(self.guests) < 4)
    @rule()
    def create_guest(self):
        try:
            self._new_guest()
        except RuntimeError as e:
            # the fuzz may have handed the PSP frames the VMM's allocator still
            # thinks are free; the PSP refusing LAUNCH_START on them is right
            assert "refused" in str(e), e

    @rule(data=st.data())
    def update_npt(self, data):
        h = self._pick_handle(data)
        level = data.draw(st.sampled_from([1, 1, 1, 2, 0, 3]))
        gpa = self._pick_gpa(data, level)
        hpa = self._pick_hpa(data, level)
        attrs = data.draw(st.sampled_from([0, 1, 2, 3, 3, 4, 0xFF]))
        npages = self._pick_npages(data)
        # what must be refused, whatever else is true
        size = PAGE << (9 * (level - 1)) if level in (1, 2) else PAGE
        forbidden = set(self._table_pages()) | set(self._vmsas()) | self._frames_mapped_anywhere()
        pool = set(self.psp_obj._pool)
        was_stopped = h in self.stopped
        r = self.client.update_npt(h, gpa, hpa, level, attrs, npages)
        self._expect(r.status, h if h in self.guests else None)
        if r.ok:
            assert not was_stopped
            total = npages * size
            frames = set(range(hpa, hpa + total, PAGE))
            assert not frames & forbidden, "UPDATE_NPT handed out a table/VMSA/mapped frame"
            assert not frames & pool, "UPDATE_NPT handed out a pool frame"
            assert hpa + total <= self.vmm.fw_base or hpa >= self.vmm.mem.size, "mapped PSP memory"
            assert hpa % size == 0 and gpa % size == 0 and gpa + total <= GPA_LIMIT
            m = self.granted[h]
            for i in range(npages):
                g = gpa + i * size
                assert g not in m, f"GPA {g:#x} granted twice"
                m[g] = (hpa + i * size, size, attrs)
            self.hpas.append(hpa)

    @rule(data=st.data())
    def unmap(self, data):
        h = self._pick_handle(data)
        m = self.granted.get(h, {})
        if m and data.draw(st.booleans()):
            gpa = data.draw(st.sampled_from(sorted(m)))
            level = 2 if m[gpa][1] == MB2 else 1
        else:
            level = data.draw(st.sampled_from([1, 2, 5]))
            gpa = self._pick_gpa(data, level)
        npages = data.draw(st.sampled_from([1, 1, 2, 0]))
        r = self.client.unmap(h, gpa, level, npages)
        self._expect(r.status, h if h in self.guests else None)
        if r.ok:
            size = PAGE if level == 1 else MB2
            for i in range(npages):
                g = gpa + i * size
                assert g in m and m[g][1] == size, f"UNMAP of ungranted {g:#x} succeeded"
                del m[g]

    @rule(data=st.data())
    def reclaim(self, data):
        h = self._pick_handle(data)
        hpa = self._pick_hpa(data)
        npages = data.draw(st.sampled_from([1, 1, 2, 0]))
        r = self.client.reclaim(h, hpa, npages)
        self._expect(r.status, h if h in self.guests else None)
        if r.ok:
            assert not set(range(hpa, hpa + npages * PAGE, PAGE)) & self._frames_mapped_anywhere()
            assert self.vmm.mem.read(hpa, npages * PAGE) == bytes(npages * PAGE), "RECLAIM did not scrub"

    @rule(data=st.data())
    def set_private(self, data):
        h = self._pick_handle(data)
        hpa = self._pick_hpa(data)
        npages = self._pick_npages(data)
        forbidden = set(self._table_pages()) | set(self._vmsas()) | self._frames_mapped_anywhere()
        r = self.client.set_private_memory(h, hpa, npages)
        self._expect(r.status, h if h in self.guests else None)
        if r.ok:
            assert not set(range(hpa, hpa + npages * PAGE, PAGE)) & forbidden

    @rule(data=st.data())
    def pool_add(self, data):
        hpa = self._pick_hpa(data)
        npages = data.draw(st.sampled_from([1, 2, 0, MAX_NPAGES + 1]))
        forbidden = set(self._table_pages()) | set(self._vmsas()) | self._frames_mapped_anywhere()
        r = self.client.pool_add(hpa, npages)
        self._expect(r.status)
        if r.ok:
            assert not set(range(hpa, hpa + npages * PAGE, PAGE)) & forbidden

    @rule(data=st.data())
    def launch_update_data(self, data):
        h = self._pick_handle(data)
        gpa = self._pick_gpa(data)
        hpa = self._pick_hpa(data)
        npages = data.draw(st.sampled_from([1, 2, 0]))
        forbidden = set(self._table_pages()) | set(self._vmsas()) | self._frames_mapped_anywhere()
        r = self.client.launch_update_data(h, gpa, hpa, npages)
        self._expect(r.status, h if h in self.guests else None)
        if r.ok:
            assert not set(range(hpa, hpa + npages * PAGE, PAGE)) & forbidden
            for i in range(npages):
                assert gpa + i * PAGE not in self.granted[h]
                self.granted[h][gpa + i * PAGE] = (hpa + i * PAGE, PAGE, 3)

    @rule(data=st.data())
    def launch_finish(self, data):
        h = self._pick_handle(data)
        r = self.client.launch_finish(h)
        self._expect(r.status, h if h in self.guests else None)

    @rule(data=st.data())
    def verify(self, data):
        h = self._pick_handle(data)
        dirty = h in self.guests and self._is_dirty(h)
        r = self.client.verify(h)
        self._expect(r.status, h if h in self.guests else None)
        if h in self.guests and h not in self.stopped:
            assert r.ok == (not dirty), f"VERIFY said {r.name} for a {'dirty' if dirty else 'clean'} table"

    @rule()
    def check_all(self):
        dirty = {h for h in self.guests if h not in self.stopped and self._is_dirty(h)}
        r = self.client.check_all()
        assert r.status in STATUSES
        if dirty:
            assert r.status == Status.INTEGRITY_FAILURE and r.stopped_handle in dirty
            self.stopped |= dirty
        else:
            assert r.ok, r

    @rule(data=st.data())
    def decommission(self, data):
        h = self._pick_handle(data)
        r = self.client.decommission(h)
        assert r.status in STATUSES
        if r.ok:
            assert h in self.guests
            del self.guests[h]
            self.granted.pop(h)
            self.dirty.pop(h)
            self.stopped.discard(h)

    @rule(data=st.data())
    def guest_status(self, data):
        h = self._pick_handle(data)
        r = self.client.guest_status(h)
        assert r.status in STATUSES
        if h in self.stopped:
            assert r.status == Status.GUEST_STOPPED

    @rule(cmd=st.sampled_from(list(Cmd)), data=st.data())
    def raw_random_fields(self, cmd, data):
        if cmd in (Cmd.PLATFORM_INIT, Cmd.DECOMMISSION):
            return      # (both are exercised above; random ones would just end the model)
        if cmd == Cmd.CHECK_ALL:
            return self.check_all()     # stops guests: the model must know
        fmt = _IN[cmd][0]
        buf = data.draw(st.binary(min_size=struct.calcsize(fmt), max_size=struct.calcsize(fmt)))
        fields = dict(zip(_IN[cmd][1], struct.unpack(fmt, buf))) if buf else {}
        h = fields.get("handle")
        if h in self.guests and cmd not in (Cmd.GUEST_STATUS,):
            return      # would need the model above; random handles are rarely live anyway
        st_, _out = self.client.raw(int(cmd), buf)
        assert st_ in STATUSES
        if st_ == Status.SUCCESS and cmd in (Cmd.UPDATE_NPT, Cmd.LAUNCH_UPDATE_DATA, Cmd.UNMAP,
                                               Cmd.RECLAIM, Cmd.SET_PRIVATE_MEMORY):
            assert h not in self.guests
        if st_ == Status.SUCCESS and cmd == Cmd.POOL_ADD:
            forbidden = set(self._table_pages()) | set(self._vmsas()) | self._frames_mapped_anywhere()
            assert not set(range(fields["hpa"], fields["hpa"] + fields["npages"] * PAGE, PAGE)) & forbidden
        if st_ == Status.SUCCESS and cmd == Cmd.LAUNCH_START:
            hh = struct.unpack("<I", _out)[0]
            vm_vmsa = fields["vmsa_hpa"]
            from hv.vmm.vm import Vm
            self.guests[hh] = Vm(hh, vm_vmsa)
            self.granted[hh] = {}
            self.dirty[hh] = {}

    # -- the VMM writing host memory -------------------------------------
    @rule(data=st.data())
    def tamper_entry(self, data):
        live = [h for h in sorted(self.guests) if h not in self.stopped]
        if not live:
            return
        h = data.draw(st.sampled_from(live))
        pages = sorted(self._shadow(h).npt.pages)
        page = data.draw(st.sampled_from(pages))
        idx = data.draw(st.one_of(st.integers(0, 511), st.sampled_from([0, 1, 63, 64, 256, 511])))
        addr = page + 8 * idx
        cur = self.vmm.mem.read_u64(addr)
        kind = data.draw(st.sampled_from(["ad_set", "ad_clear", "flip", "remap", "random",
                                          "revert", "present"]))
        if kind == "ad_set":
            new = cur | AD_MASK if data.draw(st.booleans()) else cur | (AD_MASK & (1 << 5))
        elif kind == "ad_clear":
            new = cur & ~AD_MASK
        elif kind == "flip":
            bit = data.draw(st.sampled_from([0, 1, 2, 7, 12, 13, 20, 40, 51, 52, 62, 63]))
            new = cur ^ (1 << bit)
        elif kind == "remap":
            targets = sorted(self._frames_mapped_anywhere()) or [0x30000]
            new = (cur & ~ADDR_MASK) | data.draw(st.sampled_from(targets)) | P
        elif kind == "present":
            new = cur | P | W | U
        elif kind == "revert":
            d = self.dirty[h]
            if not d:
                return
            addr = data.draw(st.sampled_from(sorted(a for a in d if a != self.guests[h].vmsa) or [None]))
            if addr is None:
                return
            new = d[addr]
            cur = self.vmm.mem.read_u64(addr)
        else:
            new = data.draw(st.integers(0, (1 << 64) - 1))
        if _canon(new) != _canon(cur) and addr not in self.dirty[h]:
            self.dirty[h][addr] = _canon(cur)
        self.vmm.mem.write_u64(addr, new)

    @rule(data=st.data())
    def tamper_root_pointer(self, data):
        live = [h for h in sorted(self.guests) if h not in self.stopped]
        if not live:
            return
        h = data.draw(st.sampled_from(live))
        vm = self.guests[h]
        cur = self.vmm.mem.read_u64(vm.vmsa)
        roots = [g.npt.root for g in self.psp_obj._guests.values()]
        kind = data.draw(st.sampled_from(["low_bits", "other_root", "fresh", "revert"]))
        if kind == "low_bits":          # the walker ignores them: not a tamper
            new = (cur & ADDR_MASK) | data.draw(st.integers(0, 0xFFF))
        elif kind == "other_root":
            new = data.draw(st.sampled_from(roots))
        elif kind == "fresh":
            new = self._fresh()
        else:
            if vm.vmsa not in self.dirty[h]:
                return
            new = self.dirty[h][vm.vmsa]
        if (new & ADDR_MASK) != (cur & ADDR_MASK) and vm.vmsa not in self.dirty[h]:
            self.dirty[h][vm.vmsa] = cur & ADDR_MASK
        self.vmm.mem.write_u64(vm.vmsa, new)

    @rule(data=st.data())
    def harmless_write(self, data):
        """Writes to frames that are not table pages or VMSAs: never tampering."""
        kind = data.draw(st.sampled_from(["pool", "mapped", "hv"]))
        if kind == "pool" and self.psp_obj._pool:
            addr = data.draw(st.sampled_from(self.psp_obj._pool))
        elif kind == "mapped" and self._frames_mapped_anywhere():
            addr = data.draw(st.sampled_from(sorted(self._frames_mapped_anywhere())))
        else:
            addr = self._fresh()
        # the allocator may hand out a frame the fuzz donated by a too-long range:
        # writing a live table page or VMSA would be a tamper, not a harmless write
        if self.psp_obj._frames.state(addr // PAGE) in (F.TABLE, F.VMSA):
            return
        self.vmm.mem.write(addr + data.draw(st.integers(0, 4095 - 16)),
                           data.draw(st.binary(min_size=1, max_size=16)))

    @rule(data=st.data())
    def guest_access(self, data):
        """The CPU walks (sets A/D): never tampering."""
        live = [h for h in sorted(self.guests) if h not in self.stopped]
        if not live:
            return
        h = data.draw(st.sampled_from(live))
        m = self.granted[h]
        if not m:
            return
        gpa = data.draw(st.sampled_from(sorted(m)))
        self.vmm.engine.walk(self.vmm.npt_root(self.guests[h]), gpa, data.draw(st.integers(0, 2)))

    # -- invariants ------------------------------------------------------
    @invariant()
    def frame_table_consistent(self):
        self.psp_obj._check_invariants()

    @invariant()
    def digest_matches_unless_tampered(self):
        for h in sorted(self.guests):
            if h in self.stopped:
                assert self._shadow(h) is not None
                continue
            g = self._shadow(h)
            with self.psp_obj._lock:
                mm = g.integrity.verify_all()
            dirty = self._is_dirty(h)
            if dirty:
                assert mm is not None, f"guest {h}: tampered table matches its digest"
            else:
                assert mm is None, f"guest {h}: untampered table fails its digest: {mm}"

    @invariant()
    def mappings_were_granted(self):
        for h, vm in sorted(self.guests.items()):
            if h in self.stopped or self._is_dirty(h):
                continue
            root = self.vmm.npt_root(vm)
            got = {}
            for gpa, hpa, size, entry in self.vmm.engine.mappings(root):
                got[gpa] = (hpa, size, entry)
            want = self.granted[h]
            assert set(got) == set(want), (
                f"guest {h}: mapped {sorted(set(got) - set(want))[:4]} not granted, "
                f"granted {sorted(set(want) - set(got))[:4]} missing")
            for gpa, (hpa, size, attrs) in want.items():
                ghpa, gsize, e = got[gpa]
                assert (ghpa, gsize) == (hpa, size)
                assert bool(e & W) == bool(attrs & 1) and bool(e & NX) == (not attrs & 2)
                assert bool(e & PS) == (size == MB2)
                st_, hh, g = self.psp_obj._frames.get(hpa // PAGE)
                assert st_ == F.MAPPED and hh == h and g == gpa


def _machine_for(mode):
    return type(f"PspMachine_{mode}", (PspMachine,), {"mode": mode})


@pytest.mark.parametrize("mode", MODES)
def test_psp_state_machine(mode):
    m = _machine_for(mode)
    m.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, **FUZZ_SETTINGS)
    m.TestCase().runTest()


# ---------------------------------------------------------------------------
# byte-level decoder fuzz

@pytest.fixture(scope="module")
def fuzz_vmm():
    v = Vmm(host_mem=64 << 20, backend=BACKEND, fw_size=8 << 20)
    vms = [v.create_vm(), v.create_vm()]
    for vm in vms:
        v.touch(vm, 0x1000, 1)
        v.touch(vm, 0x200000, 1)
    yield v
    v.close()


CMD_IDS = st.one_of(st.sampled_from([int(c) for c in Cmd]), st.integers(0, 0xFFFFFFFF),
                    st.sampled_from([0, 0x3F, 0x40, 0x7FFFFFFF, 0xFFFFFFFF]))


def _buf_for(cmd_id):
    try:
        n = struct.calcsize(_IN[Cmd(cmd_id)][0])
    except (ValueError, KeyError):
        n = 0
    return st.one_of(st.binary(max_size=80), st.binary(min_size=n, max_size=n),
                     st.just(b"\xff" * n), st.just(b"\x00" * n))


@settings(max_examples=EXAMPLES * 20, **FUZZ_SETTINGS)
@given(data=st.data())
def test_decoder_bytes_in_status_out(fuzz_vmm, data):
    cmd = data.draw(CMD_IDS)
    if cmd in (Cmd.DECOMMISSION, Cmd.PLATFORM_INIT):
        cmd = data.draw(st.sampled_from([int(Cmd.NOP), int(Cmd.VERIFY), 0x99]))
    buf = data.draw(_buf_for(cmd))
    st_, out = fuzz_vmm.psp.raw(cmd, buf)
    assert isinstance(st_, int) and st_ in STATUSES, f"cmd {cmd:#x} buf {buf.hex()}: {st_}"
    assert isinstance(out, (bytes, bytearray))
    fuzz_vmm._psp_obj._check_invariants()


@settings(max_examples=EXAMPLES * 4, **FUZZ_SETTINGS)
@given(cmd=CMD_IDS, buf=st.one_of(st.binary(max_size=64), st.text(max_size=8), st.none(),
                                  st.integers(), st.lists(st.integers(0, 255), max_size=8)))
def test_mailbox_any_python_object(cmd, buf):
    """The firmware's own entry point, given anything at all: a status, never a raise."""
    from hv.vmm.hostmem import HostMemory
    from psp_firmware import Psp
    psp = _PSP_CACHE.get("psp")
    if psp is None:
        mem = HostMemory(64 << 20)
        psp = _PSP_CACHE["psp"] = Psp(mem.buf)
        _PSP_CACHE["mem"] = mem
    if cmd == Cmd.DECOMMISSION:
        cmd = Cmd.NOP
    st_, out = psp.mailbox(cmd, buf)
    assert st_ in STATUSES
    assert isinstance(out, (bytes, bytearray))


_PSP_CACHE = {}
