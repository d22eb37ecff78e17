"""The C UPDATE_NPT fast path (csrc/psp_core.c psp_update_fast / psp_ring_fast)
against the Python handler it short-cuts.

The fast path either commits exactly what cmd_update_npt's full path would
commit, or declines having changed nothing. Here random and duplicate
commands (good, malformed, aliasing, firmware/table/other-guest frames,
misaligned and out-of-range addresses, tampered tables, rings) run through
three firmwares side by side: the pure-Python core, the C core without the
fast path, and the C core with it. Every status, reply, byte of host memory,
frame state and digest must agree.
"""
import hashlib
import mmap
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nptcore.bits import A, D, NX, P, W
from psp_firmware import Psp, Status
from psp_firmware import core as psp_core
from psp_firmware import mailbox_layout as L
from psp_firmware.commands import Cmd, decode_out, encode

PAGE = 4096
MB = 1 << 20
HOST = 32 * MB
FW_BASE, FW_SIZE = 28 * MB, 4 * MB
POOL = 1 * MB                  # 128 pool pages at 1..1.5 MiB
VMSA1, VMSA2 = 2 * MB, 2 * MB + PAGE
PRIV1, PRIV2 = 3 * MB, 3 * MB + 64 * PAGE    # 64 private frames each
needs_c = pytest.mark.skipif(not psp_core.available(), reason="C core not built")
VARIANTS = [("python", False), ("c", False), ("c", True)] if psp_core.available() \
    else [("python", False)]


def _boot(core, fast, scrub="write", backing="anon"):
    """backing "memfd": host memory is a memfd the PSP knows (mem_fd), so its
    scrub skips the holes (psp_scrub_probe's SEEK_DATA probe); "private": a
    private anonymous mapping (the pagemap probe); "anon": shared anonymous
    memory (no probe)."""
    if backing == "memfd":
        import os
        fd = os.memfd_create("hv-test-host", 0)
        os.ftruncate(fd, HOST)
        mem = mmap.mmap(fd, HOST, flags=mmap.MAP_SHARED)
        psp = Psp(mem, core=core, fast=fast, scrub=scrub, mem_fd=fd)
        os.close(fd)
        assert psp.holes == "seek_data"
    elif backing == "private":      # private anonymous: the pagemap probe
        mem = mmap.mmap(-1, HOST, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        psp = Psp(mem, core=core, fast=fast, scrub=scrub)
        assert psp.holes == "pagemap"
    else:
        mem = mmap.mmap(-1, HOST)
        psp = Psp(mem, core=core, fast=fast, scrub=scrub)
        assert psp.holes == "none"
    assert psp.fast == fast

    def call(cmd, **kw):
        st, out = psp.mailbox(int(cmd), encode(cmd, **kw))
        assert st == 0, (cmd, Status(st).name)
        return out
    call(Cmd.PLATFORM_INIT, host_size=HOST, fw_base=FW_BASE, fw_size=FW_SIZE)
    call(Cmd.POOL_ADD, hpa=POOL, npages=128)
    call(Cmd.LAUNCH_START, vmsa_hpa=VMSA1, policy=0)
    call(Cmd.LAUNCH_START, vmsa_hpa=VMSA2, policy=0)
    call(Cmd.SET_PRIVATE_MEMORY, handle=1, hpa=PRIV1, npages=64)
    call(Cmd.SET_PRIVATE_MEMORY, handle=2, hpa=PRIV2, npages=64)
    return psp, mem


def _update_buf(handle, level, gpa, hpa, attrs, npages):
    return struct.pack("<IIQQII", handle, level, gpa, hpa, attrs, npages)


def _platform_status(psp):
    st, out = psp.mailbox(int(Cmd.PLATFORM_STATUS), b"")
    fields = decode_out(Cmd.PLATFORM_STATUS, out)
    fields.pop("commands")          # counts this very command: compared separately
    return st, fields


def _assert_line_hashes_current(psp):
    """Every stored line hash is SHA-256 of its line in the shadow copy: what a
    ring's deferred re-hash (psp_ring_fast's line cache) must leave behind."""
    for g in psp._guests.values():
        integ = g.integrity
        for hpa, lh in getattr(integ, "line_h", {}).items():
            page = integ.shadow.pages[hpa]
            for k in range(64):
                want = hashlib.sha256(b"L" + bytes(page[k * 64:(k + 1) * 64])).digest()
                assert bytes(lh[k * 32:(k + 1) * 32]) == want, (g.handle, hex(hpa), k)


def _outcome(psp, mem):
    """Everything observable: host memory, frames, replies of the status commands."""
    _assert_line_hashes_current(psp)
    out = {"mem": hashlib.sha256(mem).hexdigest(),
           "frames": psp._frames.snapshot(),
           "platform": _platform_status(psp)}
    for h in (1, 2):
        out[h] = psp.mailbox(int(Cmd.GUEST_STATUS), encode(Cmd.GUEST_STATUS, handle=h))
    psp._check_invariants()
    return out


GPAS = [0, PAGE, 7 * PAGE, 8 * PAGE, 0x3F_F000, 0x20_0000, 0x1_0000_0000, (1 << 48) - PAGE,
        1 << 48, 0x123, (1 << 64) - PAGE, 0x7F_FFE0_0000]
HPAS = [4 * MB + i * PAGE for i in range(6)] + [
    6 * MB, 8 * MB, 10 * MB,                  # 2 MiB aligned, free
    PRIV1, PRIV1 + 5 * PAGE, PRIV2, PRIV2 + PAGE,   # private frames of guest 1 / 2
    POOL, POOL + 127 * PAGE, VMSA1, VMSA2,    # pool / table pages and control pages
    FW_BASE, FW_BASE - PAGE, HOST - PAGE, HOST, 0x1001, (1 << 64) - PAGE]

update_op = st.tuples(st.just("update"), st.sampled_from([1, 1, 1, 2, 3, 65]),
                      st.sampled_from([1, 1, 1, 2, 0, 3]), st.sampled_from(GPAS),
                      st.sampled_from(HPAS), st.sampled_from([3, 3, 0, 1, 2, 4]),
                      st.sampled_from([1, 1, 1, 2, 8, 16, 512, 0, 513]))
unmap_op = st.tuples(st.just("unmap"), st.sampled_from([1, 2]), st.sampled_from(GPAS[:7]),
                     st.sampled_from([1, 2]))
tamper_op = st.tuples(st.just("tamper"), st.integers(0, 1 << 16),
                      st.sampled_from([A, D, W, NX, P, PAGE, 1 << 40]))
root_op = st.tuples(st.just("root"), st.sampled_from([VMSA1, VMSA2]))
other_op = st.tuples(st.sampled_from(["verify", "check_all", "finish", "status"]),
                     st.sampled_from([1, 2]))
ring_op = st.tuples(st.just("ring"), st.lists(update_op, min_size=1, max_size=12))
status_op = st.tuples(st.just("status"), st.sampled_from([1, 2]))
ops_strategy = st.lists(st.one_of(update_op, update_op, update_op, unmap_op, tamper_op, root_op,
                                  other_op, status_op, ring_op), max_size=24)


def _ring(psp, updates):
    ring = bytearray(L.RING_ENTRY_SIZE * len(updates))
    for i, (k, *args) in enumerate(updates):
        e = i * L.RING_ENTRY_SIZE
        cmd, buf = (Cmd.NOP, b"") if k == "nop" else (Cmd.UPDATE_NPT, _update_buf(*args))
        L.ENTRY_ALL.pack_into(ring, e, int(cmd), len(buf), 0, 0)
        ring[e + L.RE_IN:e + L.RE_IN + len(buf)] = buf
    progress = memoryview(bytearray(4)).cast("I")
    psp.run_ring(ring, len(updates), progress)
    assert progress[0] == len(updates)
    res = []
    for i in range(len(updates)):
        e = i * L.RING_ENTRY_SIZE
        st, n = L.ENTRY_RESULT.unpack_from(ring, e + L.RE_STATUS)
        assert st & L.DONE
        res.append((st & L.STATUS_MASK, bytes(ring[e + L.RE_OUT:e + L.RE_OUT + n])))
    return res


def _drive(core, fast, ops, backing="anon"):
    psp, mem = _boot(core, fast, backing=backing)
    res = []
    done = set()
    for op in ops:
        kind = op[0]
        if kind == "update":
            res.append(psp.mailbox(int(Cmd.UPDATE_NPT), _update_buf(*op[1:])))
        elif kind == "ring":
            res.append(_ring(psp, op[1]))
        elif kind == "unmap":
            res.append(psp.mailbox(int(Cmd.UNMAP), encode(Cmd.UNMAP, handle=op[1], level=1,
                                                          gpa=op[2], npages=op[3])))
        elif kind == "tamper":
            g = psp._guests[1 + op[1] % 2]
            pages = sorted(g.npt.pages)
            addr = pages[op[1] % len(pages)] + ((op[1] >> 4) % 512) * 8
            if addr in done:
                continue
            done.add(addr)
            v = struct.unpack_from("<Q", mem, addr)[0]
            struct.pack_into("<Q", mem, addr, v ^ op[2])
        elif kind == "root":
            if op[1] in done:
                continue
            done.add(op[1])
            v = struct.unpack_from("<Q", mem, op[1])[0]
            struct.pack_into("<Q", mem, op[1], v ^ PAGE)
        elif kind == "verify":
            res.append(psp.mailbox(int(Cmd.VERIFY), encode(Cmd.VERIFY, handle=op[1])))
        elif kind == "check_all":
            res.append(psp.mailbox(int(Cmd.CHECK_ALL), b""))
        elif kind == "finish":
            res.append(psp.mailbox(int(Cmd.LAUNCH_FINISH), encode(Cmd.LAUNCH_FINISH,
                                                                  handle=op[1])))
        elif kind == "status":
            # GUEST_STATUS between updates: the lazy digest is brought up to date
            res.append(psp.mailbox(int(Cmd.GUEST_STATUS), encode(Cmd.GUEST_STATUS,
                                                                 handle=op[1])))
    res.append(_outcome(psp, mem))
    return res


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy)
def test_fast_path_agrees_with_full_path(ops):
    # the memfd runs: the scrub's hole probe (C and its Python twin) changes nothing seen
    results = [_drive(core, fast, ops) for core, fast in VARIANTS] + \
              [_drive(core, fast, ops, "memfd") for core, fast in VARIANTS[::2]]
    for r in results[1:]:
        assert r == results[0]


@needs_c
def test_fast_path_is_taken_and_declines_leave_no_trace():
    """The C fast path commits ordinary updates itself (the Python path is
    not entered), and a decline changes nothing, whatever the arguments."""
    psp, mem = _boot("c", True)
    calls = []
    real = psp._map_checks
    psp._map_checks = lambda *a: calls.append(a) or real(*a)
    assert psp.mailbox(int(Cmd.UPDATE_NPT), _update_buf(1, 1, 0, 4 * MB, 3, 1))[0] == 0
    assert len(calls) == 1                       # first update: new tables (Python path)
    for i in range(1, 5):
        st, out = psp.mailbox(int(Cmd.UPDATE_NPT), _update_buf(1, 1, i * PAGE, 4 * MB + i * PAGE, 3, 1))
        assert st == 0 and struct.unpack("<II", out) == (1, 0)
    assert len(calls) == 1                       # ... the next ones: C only
    g = psp._guests[1]
    lib = psp_core.lib
    before = _outcome(psp, mem)
    free = 8 * PAGE
    bad = [(0, free, 5 * MB, 3, 1), (3, free, 5 * MB, 3, 1), (1, free, 5 * MB, 4, 1),
           (1, PAGE, 5 * MB, 3, 1),                       # GPA already mapped
           (1, free, 4 * MB, 3, 1),                       # frame already mapped (aliasing)
           (1, free, PRIV2, 3, 1), (1, free, FW_BASE, 3, 1), (1, free, POOL, 3, 1),
           (1, free, VMSA2, 3, 1), (1, free + 1, 5 * MB, 3, 1), (1, free, 5 * MB + 1, 3, 1),
           (1, free, HOST, 3, 1), (1, free, (1 << 64) - PAGE, 3, 1), (1, 1 << 48, 5 * MB, 3, 1),
           (1, free, 5 * MB, 3, 0), (1, free, 5 * MB, 3, (1 << 20) + 1),
           (1, 0x1F_F000, 5 * MB, 3, 2),                  # crosses into another leaf table
           (2, free, 6 * MB, 3, 1),                       # 2 MiB level, misaligned GPA
           (1, 0x4000_0000, 5 * MB, 3, 1)]                # needs new tables
    for args in bad:
        assert lib.psp_update_fast(psp._ctx, g.rec, *args) == 1, args
    assert _outcome(psp, mem) == before
    # a tampered line on the path: declined by C; the Python path stops the guest
    leaf = [h for h, lv in g.npt.levels.items() if lv == 1][0]
    struct.pack_into("<Q", mem, leaf + 8 * 3, struct.unpack_from("<Q", mem, leaf + 8 * 3)[0] ^ W)
    assert lib.psp_update_fast(psp._ctx, g.rec, 1, 6 * PAGE, 5 * MB, 3, 1) == 1
    assert _outcome(psp, mem)["frames"] == before["frames"]
    st, _ = psp.mailbox(int(Cmd.UPDATE_NPT), _update_buf(1, 1, 6 * PAGE, 5 * MB, 3, 1))
    assert st == Status.INTEGRITY_FAILURE
    assert g.rec.accepting == 0                  # the stop reached the C view of the guest
    assert lib.psp_update_fast(psp._ctx, g.rec, 1, 9 * PAGE, 5 * MB, 3, 1) == 1


@needs_c
def test_lazy_digest_follows_fast_updates():
    """The digest after each update (GUEST_STATUS flushes the lazy tree)
    equals the Python twin's, for updates the C path commits on its own."""
    runs = []
    for core, fast in (("python", False), ("c", True)):
        psp, mem = _boot(core, fast)
        digests = []
        for i, (gpa, n) in enumerate([(0, 1), (PAGE, 1), (70 * PAGE, 1), (2 * PAGE, 16),
                                      (0x20_0000, 1), (0x20_0000 + 300 * PAGE, 8)]):
            assert psp.mailbox(int(Cmd.UPDATE_NPT),
                               _update_buf(1, 1, gpa, 4 * MB + 32 * i * PAGE, 3, n))[0] == 0
            st, out = psp.mailbox(int(Cmd.GUEST_STATUS), encode(Cmd.GUEST_STATUS, handle=1))
            digests.append(decode_out(Cmd.GUEST_STATUS, out)["digest"])
        assert len(set(digests)) == len(digests)
        assert psp.mailbox(int(Cmd.VERIFY), encode(Cmd.VERIFY, handle=1))[0] == 0
        runs.append(digests)
    assert runs[0] == runs[1]


@needs_c
def test_ring_runs_in_c_and_falls_back_per_entry():
    psp, mem = _boot("c", True)
    twin, tmem = _boot("python", False)
    ups = [("u", 1, 1, 0, 4 * MB, 3, 1)] + \
          [("u", 1, 1, i * PAGE, 4 * MB + i * PAGE, 3, 1) for i in range(1, 5)] + \
          [("u", 1, 1, PAGE, 5 * MB, 3, 1),          # GPA_MAPPED (declined, Python answers)
           ("u", 2, 1, 0x20_0000, PRIV2, 3, 1),      # guest 2's own private frame
           ("u", 2, 1, 0x20_1000, PRIV1, 3, 1),      # guest 1's: BAD_OWNER
           ("nop",),                                 # answered in C too
           ("u", 1, 1, 16 * PAGE, 6 * MB, 3, 16)]    # fault-around 16
    n0 = psp._commands
    got = _ring(psp, ups)
    want = [twin.mailbox(int(Cmd.NOP), b"") if u[0] == "nop" else
            twin.mailbox(int(Cmd.UPDATE_NPT), _update_buf(*u[1:])) for u in ups]
    assert got == want
    assert [s for s, _ in got] == [0] * 5 + [Status.GPA_MAPPED, 0, Status.BAD_OWNER, 0, 0]
    assert psp._commands - n0 == len(ups)
    assert _outcome(psp, mem) == _outcome(twin, tmem)


def _count_slow_entries(psp):
    """Wrap psp._run_ring_py: how many ring entries the C loop handed back."""
    seen = []
    orig = psp._run_ring_py

    def wrapped(ring, start, n, *a, **kw):
        seen.append(n - start)
        return orig(ring, start, n, *a, **kw)
    psp._run_ring_py = wrapped
    return seen


@needs_c
def test_ring_checks_each_line_once_and_leaves_every_line_hash_current():
    """psp_ring_fast's line cache: 252 leaf lines over 4 leaf tables in one C
    call, more than its 128 slots, so written (pending) lines get evicted and
    re-hashed mid-ring; the rest are re-hashed when the loop returns. A second
    ring then writes the neighbour in each of those lines: it only passes the
    line check (in C, no entry handed back) if every stored hash is current."""
    psp, mem = _boot("c", True)
    twin, tmem = _boot("python", False)
    for p in (psp, twin):        # the 4 leaf tables exist before the ring
        for j in range(4):
            st, _ = p.mailbox(int(Cmd.UPDATE_NPT), _update_buf(1, 1, j * 2 * MB,
                                                               12 * MB + j * PAGE, 3, 1))
            assert st == 0
    slow = _count_slow_entries(psp)
    hpa = [13 * MB]

    def ups(offset):
        out = []
        for j in range(4):
            for k in range(1, 64):
                out.append(("u", 1, 1, j * 2 * MB + (k * 8 + offset) * PAGE, hpa[0], 3, 1))
                hpa[0] += PAGE
        return out
    for offset in (0, 1):
        ring = ups(offset)
        got = _ring(psp, ring)
        want = [twin.mailbox(int(Cmd.UPDATE_NPT), _update_buf(*u[1:])) for u in ring]
        assert got == want
        assert {s for s, _ in got} == {0}
        assert slow == []                  # all 252 answered in C, twice
        assert _outcome(psp, mem) == _outcome(twin, tmem)


@needs_c
def test_ring_finds_a_guest_whose_slot_is_taken():
    """Guest 65 shares slot 65 % 64 with live guest 1: the ring loop still
    finds it (another free slot) and answers its updates in C."""
    psp, mem = _boot("c", True)
    twin, tmem = _boot("python", False)
    for p in (psp, twin):
        for h in range(3, 65):
            st, out = p.mailbox(int(Cmd.LAUNCH_START),
                                encode(Cmd.LAUNCH_START, vmsa_hpa=16 * MB + h * PAGE, policy=0))
            assert st == 0 and decode_out(Cmd.LAUNCH_START, out)["handle"] == h
        assert p.mailbox(int(Cmd.DECOMMISSION), encode(Cmd.DECOMMISSION, handle=3))[0] == 0
        st, out = p.mailbox(int(Cmd.LAUNCH_START),
                            encode(Cmd.LAUNCH_START, vmsa_hpa=16 * MB + 65 * PAGE, policy=0))
        assert st == 0 and decode_out(Cmd.LAUNCH_START, out)["handle"] == 65
        assert p.mailbox(int(Cmd.UPDATE_NPT), _update_buf(65, 1, 0, 12 * MB, 3, 1))[0] == 0
    slow = _count_slow_entries(psp)
    ring = [("u", 65, 1, k * PAGE, 12 * MB + k * PAGE, 3, 1) for k in range(1, 9)] + \
           [("u", 1, 1, k * PAGE, 13 * MB + k * PAGE, 3, 1) for k in range(0, 1)]
    got = _ring(psp, ring)
    assert got == _ring(twin, ring)
    assert [s for s, _ in got] == [0] * 8 + [0]
    assert slow == [1]                 # only guest 1's first update (new tables)
    assert _outcome(psp, mem) == _outcome(twin, tmem)


class _CountingCore:
    """psp._c with its calls counted by name."""
    def __init__(self, lib):
        self._lib, self.calls = lib, {}

    def __getattr__(self, name):
        fn = getattr(self._lib, name)

        def counted(*a):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a)
        return counted if callable(fn) else fn


@needs_c
def test_a_declined_update_asks_c_once_and_a_guest_without_a_record_still_gets_c():
    from psp_firmware import guest as psp_mod
    assert psp_core.lib.PSP_NO_RECORD == psp_mod._NO_RECORD
    psp, mem = _boot("c", True)
    assert psp.mailbox(int(Cmd.UPDATE_NPT), _update_buf(1, 1, 0, 12 * MB, 3, 1))[0] == 0
    psp._c = counting = _CountingCore(psp._c)
    st, _ = psp.mailbox(int(Cmd.UPDATE_NPT), _update_buf(1, 1, 0, 12 * MB + PAGE, 3, 1))
    assert st == Status.GPA_MAPPED
    assert counting.calls.get("psp_mailbox_update") == 1
    assert "psp_update_fast" not in counting.calls          # not asked a second time
    # 64 more guests: the 65th fast-path guest has no ring-table slot
    psp._c = counting._lib
    for h in range(3, 67):
        st, out = psp.mailbox(int(Cmd.LAUNCH_START),
                              encode(Cmd.LAUNCH_START, vmsa_hpa=16 * MB + h * PAGE, policy=0))
        assert st == 0
    assert psp.mailbox(int(Cmd.UPDATE_NPT), _update_buf(66, 1, 0, 13 * MB, 3, 1))[0] == 0
    psp._c = counting = _CountingCore(psp._c)
    st, out = psp.mailbox(int(Cmd.UPDATE_NPT), _update_buf(66, 1, PAGE, 13 * MB + PAGE, 3, 1))
    assert st == 0 and decode_out(Cmd.UPDATE_NPT, out)["done"] == 1
    assert counting.calls == {"psp_mailbox_update": 1, "psp_update_fast": 1}


@needs_c
@pytest.mark.parametrize("where", ["leaf_line", "upper_line"])
def test_ring_catches_a_tamper_in_a_line_it_reaches_later(where):
    """A tamper sitting in a line that only later entries of a ring read: the
    entries before it commit, the first entry that reads it gets
    INTEGRITY_FAILURE and stops the guest, the rest are refused; the same as
    the Python handler one command at a time."""
    res = []
    for core, fast in (("c", True), ("python", False)):
        psp, mem = _boot(core, fast)
        for gpa, h in ((0, 12 * MB), (0x2_0000_0000, 12 * MB + PAGE)):   # two L3 lines
            assert psp.mailbox(int(Cmd.UPDATE_NPT), _update_buf(1, 1, gpa, h, 3, 1))[0] == 0
        g = psp._guests[1]
        if where == "leaf_line":       # the leaf table of GPA 0, line 4, not a slot written
            table = g.npt.leaf(0)[0]
            addr = table + (4 * 8 + 7) * 8
        else:                          # L3 line 1 (over GPA 8 GiB), a slot nobody uses
            l4 = g.npt.root
            l3 = struct.unpack_from("<Q", mem, l4)[0] & 0x000F_FFFF_FFFF_F000
            addr = l3 + 9 * 8
        struct.pack_into("<Q", mem, addr, struct.unpack_from("<Q", mem, addr)[0] ^ W)
        ring = [("u", 1, 1, k * 8 * PAGE, 13 * MB + k * PAGE, 3, 1) for k in range(1, 4)]
        ring += [("u", 1, 1, 0x2_0000_0000 + k * PAGE, 14 * MB + k * PAGE, 3, 1)
                 for k in range(1, 3)] if where == "upper_line" else \
                [("u", 1, 1, (4 * 8 + k) * PAGE, 14 * MB + k * PAGE, 3, 1) for k in range(2)]
        ring += [("u", 1, 1, 5 * 8 * PAGE, 15 * MB, 3, 1)]
        res.append(_ring(psp, ring))
    assert res[0] == res[1]
    sts = [s for s, _ in res[0]]
    assert sts[:3] == [0, 0, 0] and sts[3] == Status.INTEGRITY_FAILURE
    assert all(s != 0 for s in sts[4:])


@needs_c
def test_line_hash_is_sha256():
    ffi, lib = psp_core.ffi, psp_core.lib
    line = bytes(range(64))
    out = ffi.new("char[32]")
    lib.psp_line_hash(line, out)
    canon = b"".join(struct.pack("<Q", v & ~(A | D)) for v in struct.unpack("<8Q", line))
    assert ffi.buffer(out)[:] == hashlib.sha256(b"L" + canon).digest()
    assert lib.psp_line_check(line, ffi.buffer(out)[:]) == 1
    assert lib.psp_line_check(bytes(64), ffi.buffer(out)[:]) == 0


@pytest.mark.parametrize("core", [c for c, _f in VARIANTS[:2]])
@pytest.mark.parametrize("kind", ["private", "memfd", "shared_anon", "private_file", "bytes"])
def test_scrub_zeroes_in_every_mapping(tmp_path, core, kind):
    """auto picks madvise only where the pages then read as zero."""
    import os
    size = 8 * MB
    if kind == "private":
        mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        want = "dontneed"
    elif kind == "memfd":
        fd = os.memfd_create("t", 0)
        os.ftruncate(fd, size)
        mem = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        os.close(fd)
        want = "remove"
    elif kind == "shared_anon":
        mem = mmap.mmap(-1, size)
        want = "remove"
    elif kind == "private_file":
        p = tmp_path / "m"
        p.write_bytes(b"\x5A" * size)          # DONTNEED would bring these back
        with open(p, "r+b") as f:
            mem = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE)
        want = "write"
    else:
        mem = bytearray(size)
        want = "write"
    psp = Psp(mem, core=core)
    assert psp.scrub == want
    for n in (2, 16, 40):                    # written, and madvised (16 pages and up)
        mem[PAGE:(1 + n) * PAGE] = b"\xA5" * (n * PAGE)
        mem[(1 + n) * PAGE] = 0x77
        psp._scrub(PAGE, n * PAGE)
        assert bytes(mem[PAGE:(1 + n) * PAGE]) == bytes(n * PAGE)
        assert mem[(1 + n) * PAGE] == 0x77
    with pytest.raises(ValueError):
        psp._scrub(size - PAGE, 2 * PAGE)
    with pytest.raises(ValueError):
        Psp(mem, core=core, scrub="shred")
