"""NPT engine tests: both backends (c, python), plus differential tests.

Every test taking `engine` runs on each backend; the hypothesis tests run
random operation sequences on the C and the Python engines over two separate
host-memory buffers and require identical results and byte-identical memory.
"""
import mmap
import struct
from array import array

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nptcore import available_backends, get_engine
from nptcore.bits import (
    P, W, U, A, D, PS, NX, ADDR_MASK, GPA_LIMIT, HPA_LIMIT,
    ACC_R, ACC_W, ACC_X, PF_P, PF_W, PF_U, PF_RSV, PF_ID, PF_FINAL, PF_WALK,
    INST_OK, INST_MAPPED, INST_NEED_TABLES, INST_BAD_ARG, CLR_NOT_MAPPED,
    MODE_32, MODE_PAE, MODE_LONG4, K_OK, K_NPF, K_GUEST_PF, WalkResult,
    Walk2DResult, index,
)

MEM = 16 << 20
ROOT = 0x1000
SPARES = 0x100000          # table frames handed to install()
DATA = 0x800000            # data frames (guest RAM)
LEAF = P | U | W           # a writable 4 KiB leaf
LEAF2M = P | U | W | PS

BACKENDS = ["c", "python"]


def _param(name):
    marks = [] if name in available_backends() else [
        pytest.mark.skip(reason="%s backend not built" % name)]
    return pytest.param(name, marks=marks, id=name)


class Env:
    """An engine over a fresh 16 MiB host memory, with a spare-frame pool."""

    def __init__(self, backend, size=MEM):
        self.mem = mmap.mmap(-1, size)
        self.eng = get_engine(self.mem, backend)
        self.next_spare = SPARES

    def spares(self, n=3):
        out = [self.next_spare + 0x1000 * i for i in range(n)]
        self.next_spare += 0x1000 * n
        return out

    def install(self, gpa, hpa, level=1, flags=None, root=ROOT):
        if flags is None:
            flags = LEAF if level == 1 else LEAF2M
        rc, need = self.eng.tables_needed(root, gpa, level)
        assert rc == INST_OK, (rc, need)
        rc, n = self.eng.install(root, gpa, hpa, level, flags, self.spares(need))
        assert rc == INST_OK and n == need, (rc, n)
        return n

    def u64(self, hpa):
        return struct.unpack_from("<Q", self.mem, hpa)[0]

    def put64(self, hpa, v):
        struct.pack_into("<Q", self.mem, hpa, v)

    def u32(self, hpa):
        return struct.unpack_from("<I", self.mem, hpa)[0]

    def put32(self, hpa, v):
        struct.pack_into("<I", self.mem, hpa, v)

    def entry_addr(self, gpa, level, root=ROOT):
        """HPA of gpa's entry at `level` (tables must exist down to it)."""
        table = root
        for L in range(4, level, -1):
            table = self.u64(table + 8 * index(gpa, L)) & ADDR_MASK
        return table + 8 * index(gpa, level)

    def path_addrs(self, gpa, leaf_level=1, root=ROOT):
        return [self.entry_addr(gpa, L, root) for L in range(4, leaf_level - 1, -1)]

    def snapshot(self):
        return self.mem[:]


@pytest.fixture(params=[_param(b) for b in BACKENDS])
def engine(request):
    return request.param


@pytest.fixture
def env(engine):
    e = Env(engine)
    yield e
    e.eng.close()


def base_err(access):
    return PF_U | PF_FINAL | (PF_W if access == ACC_W else 0) | (PF_ID if access == ACC_X else 0)


# ---------------------------------------------------------------------------
# 1D walks

def test_name_and_backends(engine):
    e = Env(engine)
    assert e.eng.name == engine
    assert "python" in available_backends()


def test_get_engine_errors():
    m = mmap.mmap(-1, 1 << 20)
    with pytest.raises(ValueError):
        get_engine(m, "fortran")
    if "c" not in available_backends():
        with pytest.raises(RuntimeError):
            get_engine(m, "c")
    assert get_engine(m).name == available_backends()[0]


def test_hit_4k(env):
    gpa = 0x1234_5678_9000
    assert env.install(gpa, DATA) == 3
    for acc in (ACC_R, ACC_W, ACC_X):
        r = env.eng.walk(ROOT, gpa + 0xABC, acc)
        assert r.ok and r.hpa == DATA + 0xABC and r.level == 1 and r.errcode == 0
        assert r.entry & ADDR_MASK == DATA
    assert isinstance(r, WalkResult)


def test_miss_at_each_level(env):
    r = env.eng.walk(ROOT, 0x5000, ACC_R)
    assert r == WalkResult(False, 0, 4, 0, PF_U | PF_FINAL)
    gpa = (1 << 39) | (1 << 30) | (1 << 21) | (1 << 12)
    env.install(gpa, DATA)
    # differ at the PML4 / PDPT / PD / PT index
    for level, other in ((4, gpa ^ (1 << 39)), (3, gpa ^ (1 << 30)),
                         (2, gpa ^ (1 << 21)), (1, gpa ^ (1 << 12))):
        for acc in (ACC_R, ACC_W, ACC_X):
            r = env.eng.walk(ROOT, other, acc)
            assert r == WalkResult(False, 0, level, 0, base_err(acc)), (level, acc)


def test_error_code_bits(env):
    gpa = 0x40000000
    env.install(gpa, DATA, flags=P | U)          # read-only
    r = env.eng.walk(ROOT, gpa, ACC_W)
    assert r.errcode == PF_P | PF_W | PF_U | PF_FINAL and r.level == 1
    assert r.entry == DATA | P | U
    r = env.eng.walk(ROOT, gpa, ACC_X)
    assert r.ok
    env.put64(env.entry_addr(gpa, 1), DATA | P | U | NX)
    r = env.eng.walk(ROOT, gpa, ACC_X)
    assert r.errcode == PF_P | PF_ID | PF_U | PF_FINAL
    env.put64(env.entry_addr(gpa, 1), DATA | P | U | (1 << 55))
    r = env.eng.walk(ROOT, gpa, ACC_R)
    assert r.errcode == PF_P | PF_RSV | PF_U | PF_FINAL


def test_hit_2m_and_1g(env):
    gpa = 0x8000_0000
    assert env.install(gpa, 0x400000, level=2) == 2
    r = env.eng.walk(ROOT, gpa + 0x12345, ACC_W)
    assert r.ok and r.level == 2 and r.hpa == 0x412345
    # a 1 GiB leaf written by hand (the walker accepts them)
    big = Env(env.eng.name, size=1 << 31)
    big.eng.install(ROOT, 0x4000_0000 * 3, 0x4000_0000, 2, LEAF2M, [0x2000, 0x3000])
    big.put64(big.entry_addr(0x4000_0000, 3), 0x4000_0000 | P | U | W | PS)
    r = big.eng.walk(ROOT, 0x4000_0000 + 0x1234_5678, ACC_R)
    assert r.ok and r.level == 3 and r.hpa == 0x4000_0000 + 0x1234_5678
    # a 1 GiB leaf that does not fit in memory: reserved fault
    big.put64(big.entry_addr(0x4000_0000, 3), 0x8000_0000 | P | U | W | PS)
    r = big.eng.walk(ROOT, 0x4000_0000, ACC_R)
    assert not r.ok and r.level == 3 and r.errcode == PF_P | PF_RSV | PF_U | PF_FINAL


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_reserved_bits_each_level(env, level):
    gpa = 0x0000_1234_5000_0000 | (5 << 12)
    env.install(gpa, DATA)
    addr = env.entry_addr(gpa, level)
    old = env.u64(addr)
    for bit in (52, 58, 62):
        env.put64(addr, old | (1 << bit))
        before = env.snapshot()
        r = env.eng.walk(ROOT, gpa, ACC_R)
        assert r == WalkResult(False, 0, level, old | (1 << bit), PF_P | PF_RSV | PF_U | PF_FINAL)
        assert env.snapshot() == before          # a failed walk sets nothing
    env.put64(addr, old)
    assert env.eng.walk(ROOT, gpa, ACC_R).ok


def test_reserved_ps_and_large_leaf_bits(env):
    gpa = 0x4000_0000
    env.install(gpa, 0x400000, level=2)
    pml4e = env.entry_addr(gpa, 4)
    v = env.u64(pml4e)
    env.put64(pml4e, v | PS)
    r = env.eng.walk(ROOT, gpa, ACC_R)
    assert (r.ok, r.level, r.errcode) == (False, 4, PF_P | PF_RSV | PF_U | PF_FINAL)
    env.put64(pml4e, v)
    pde = env.entry_addr(gpa, 2)
    leaf = env.u64(pde)
    env.put64(pde, leaf | (1 << 13))
    r = env.eng.walk(ROOT, gpa, ACC_R)
    assert (r.ok, r.level, r.errcode) == (False, 2, PF_P | PF_RSV | PF_U | PF_FINAL)
    env.put64(pde, leaf | (1 << 12))           # PAT bit: not reserved
    assert env.eng.walk(ROOT, gpa, ACC_R).ok
    # a 1 GiB leaf with bit 20 set
    pdpte = env.entry_addr(gpa, 3)
    env.put64(pdpte, 0 | P | U | W | PS | (1 << 20))
    r = env.eng.walk(ROOT, gpa, ACC_R)
    assert (r.ok, r.level, r.errcode) == (False, 3, PF_P | PF_RSV | PF_U | PF_FINAL)


def test_entries_outside_memory(env):
    gpa = 0x7000
    env.install(gpa, DATA)
    # a table pointer past the end of memory
    pdpte = env.entry_addr(gpa, 3)
    v = env.u64(pdpte)
    env.put64(pdpte, (v & ~ADDR_MASK) | MEM)
    r = env.eng.walk(ROOT, gpa, ACC_R)
    assert (r.ok, r.level, r.errcode) == (False, 3, PF_P | PF_RSV | PF_U | PF_FINAL)
    env.put64(pdpte, (v & ~ADDR_MASK) | (MEM - 0x1000))   # last page: fine (zeroed)
    r = env.eng.walk(ROOT, gpa, ACC_R)
    assert (r.ok, r.level, r.errcode) == (False, 2, PF_U | PF_FINAL)
    env.put64(pdpte, v)
    # a leaf frame past the end of memory
    pte = env.entry_addr(gpa, 1)
    env.put64(pte, 0xF_0000_0000 | LEAF)
    r = env.eng.walk(ROOT, gpa, ACC_R)
    assert (r.ok, r.level, r.errcode) == (False, 1, PF_P | PF_RSV | PF_U | PF_FINAL)
    # a root outside memory, misaligned root, gpa beyond GPA_LIMIT
    for root, g in ((MEM, gpa), (ROOT + 8, gpa), (ROOT, GPA_LIMIT + gpa)):
        r = env.eng.walk(root, g, ACC_W)
        assert r == WalkResult(False, 0, 4, 0, PF_RSV | PF_W | PF_U | PF_FINAL)


def test_memory_size_not_power_of_two(engine):
    size = MEM - 0x3000
    env = Env(engine, size=size)
    last = size - 0x1000
    env.install(0x1000, DATA)
    pdpte = env.entry_addr(0x1000, 3)
    v = env.u64(pdpte)
    env.put64(pdpte, (v & ~ADDR_MASK) | last)          # the last page: fine
    r = env.eng.walk(ROOT, 0x1000, ACC_R)
    assert (r.ok, r.level, r.errcode) == (False, 2, PF_U | PF_FINAL)
    env.put64(pdpte, (v & ~ADDR_MASK) | size)          # just past the end
    r = env.eng.walk(ROOT, 0x1000, ACC_R)
    assert (r.ok, r.level, r.errcode) == (False, 3, PF_P | PF_RSV | PF_U | PF_FINAL)
    env.put64(pdpte, v)
    pte = env.entry_addr(0x1000, 1)
    env.put64(pte, last | LEAF)
    assert env.eng.walk(ROOT, 0x1000, ACC_R).hpa == last
    env.put64(pte, (last + 0x1000) | LEAF)
    assert env.eng.walk(ROOT, 0x1000, ACC_R).errcode == PF_P | PF_RSV | PF_U | PF_FINAL
    env.install(0x20_0000, 12 << 20, level=2)
    assert env.eng.walk(ROOT, 0x3F_FFFF, ACC_R).hpa == (14 << 20) - 1
    assert env.eng.install(ROOT, 0x40_0000, 14 << 20, 2, LEAF2M, []) == (INST_BAD_ARG, 0)
    env.put64(env.entry_addr(0x20_0000, 2), (14 << 20) | LEAF2M)
    r = env.eng.walk(ROOT, 0x20_0000, ACC_R)
    assert (r.ok, r.level, r.errcode) == (False, 2, PF_P | PF_RSV | PF_U | PF_FINAL)
    assert env.eng.canon_page(last) == bytes(4096)
    with pytest.raises(ValueError):
        env.eng.canon_page(size)


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_permission_faults_on_path(env, level):
    gpa = 0x1_2345_6000
    env.install(gpa, DATA)
    addr = env.entry_addr(gpa, level)
    v = env.u64(addr)
    env.put64(addr, v & ~W)
    assert env.eng.walk(ROOT, gpa, ACC_R).ok
    r = env.eng.walk(ROOT, gpa, ACC_W)
    assert (r.ok, r.level, r.errcode) == (False, 1, PF_P | PF_W | PF_U | PF_FINAL)
    env.put64(addr, v & ~U)
    r = env.eng.walk(ROOT, gpa, ACC_R)
    assert (r.ok, r.level, r.errcode) == (False, 1, PF_P | PF_U | PF_FINAL)
    env.put64(addr, v | NX)
    assert env.eng.walk(ROOT, gpa, ACC_W).ok
    r = env.eng.walk(ROOT, gpa, ACC_X)
    assert (r.ok, r.level, r.errcode) == (False, 1, PF_P | PF_ID | PF_U | PF_FINAL)


def test_accessed_dirty(env):
    gpa = 0x3_0000_0000
    env.install(gpa, DATA)
    path = env.path_addrs(gpa)
    assert all(not env.u64(a) & (A | D) for a in path)
    before = env.snapshot()
    assert env.eng.walk(ROOT, gpa, ACC_W, set_ad=False).ok
    assert env.snapshot() == before
    r = env.eng.walk(ROOT, gpa, ACC_R)
    assert all(env.u64(a) & A for a in path)
    assert not any(env.u64(a) & D for a in path)
    assert r.entry & A and not r.entry & D       # entry as it is after the walk
    r = env.eng.walk(ROOT, gpa, ACC_W)
    assert env.u64(path[-1]) & D and r.entry & D
    assert not any(env.u64(a) & D for a in path[:-1])
    # a failed walk (write to read-only) sets nothing
    gpa2 = 0x3_0000_1000
    env.install(gpa2, DATA + 0x1000, flags=P | U)
    pte = env.entry_addr(gpa2, 1)
    before = env.snapshot()
    assert not env.eng.walk(ROOT, gpa2, ACC_W).ok
    assert env.snapshot() == before
    assert not env.u64(pte) & A


def test_ad_on_2m_leaf(env):
    env.install(0x20_0000, 0x40_0000, level=2)
    env.eng.walk(ROOT, 0x20_1234, ACC_W)
    pde = env.entry_addr(0x20_0000, 2)
    assert env.u64(pde) & (A | D) == A | D


# ---------------------------------------------------------------------------
# install / tables_needed / clear

def test_install_counts_and_structure(env):
    assert env.eng.tables_needed(ROOT, 0x1000, 1) == (INST_OK, 3)
    assert env.install(0x1000, DATA) == 3
    assert env.eng.tables_needed(ROOT, 0x2000, 1) == (INST_OK, 0)
    assert env.install(0x2000, DATA + 0x1000) == 0
    assert env.eng.tables_needed(ROOT, 0x20_0000, 1) == (INST_OK, 1)
    assert env.install(0x20_0000, DATA + 0x2000) == 1
    assert env.eng.tables_needed(ROOT, 0x4000_0000, 2) == (INST_OK, 1)
    assert env.install(0x4000_0000, 0x40_0000, level=2) == 1
    assert env.eng.tables_needed(ROOT, 1 << 39, 2) == (INST_OK, 2)
    # intermediate entries are P|W|U, the leaf is hpa|flags
    for a in env.path_addrs(0x1000)[:-1]:
        assert env.u64(a) & 0xFFF == P | W | U
        assert env.u64(a) & ~(ADDR_MASK | 0xFFF) == 0
    assert env.u64(env.entry_addr(0x1000, 1)) == DATA | LEAF


def test_install_uses_spares_in_order_and_zeroes_them(env):
    spares = [0x200000, 0x300000, 0x250000]
    for s in spares:
        env.mem[s:s + 4096] = b"\xff" * 4096       # junk: the engine zeroes
    rc, n = env.eng.install(ROOT, 0x1000, DATA, 1, LEAF, spares + [0x260000])
    assert (rc, n) == (INST_OK, 3)
    assert env.u64(ROOT) == 0x200000 | P | W | U
    assert env.u64(0x200000) == 0x300000 | P | W | U
    assert env.u64(0x300000) == 0x250000 | P | W | U
    assert env.u64(0x250000 + 8) == DATA | LEAF
    assert env.mem[0x250000 + 16:0x251000] == bytes(4096 - 16)
    assert env.mem[0x260000:0x261000] == bytes(4096)       # unused spare untouched


def test_install_conflicts_leave_memory_identical(env):
    env.install(0x1000, DATA)
    env.install(0x40_0000, 0x60_0000, level=2)
    cases = [
        ((ROOT, 0x1000, DATA + 0x1000, 1, LEAF, env.spares()), (INST_MAPPED, 0)),
        # the 2 MiB slot holds a table
        ((ROOT, 0, 0x40_0000, 2, LEAF2M, env.spares()), (INST_MAPPED, 0)),
        # a 2 MiB leaf covers the path
        ((ROOT, 0x40_1000, DATA, 1, LEAF, env.spares()), (INST_MAPPED, 0)),
        ((ROOT, 0x40_0000, 0x40_0000, 2, LEAF2M, env.spares()), (INST_MAPPED, 0)),
        # not enough spares: n_used = needed
        ((ROOT, 1 << 39, DATA, 1, LEAF, [0x500000, 0x501000]), (INST_NEED_TABLES, 3)),
        ((ROOT, 1 << 39, DATA, 1, LEAF, []), (INST_NEED_TABLES, 3)),
        ((ROOT, 0x20_0000, DATA, 1, LEAF, []), (INST_NEED_TABLES, 1)),
        ((ROOT, 1 << 39, 0x40_0000, 2, LEAF2M, [0x500000]), (INST_NEED_TABLES, 2)),
        # bad arguments
        ((ROOT, 0x1800, DATA, 1, LEAF, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, 0x3000, DATA + 8, 1, LEAF, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, 0x20_0000, 0x40_1000, 2, LEAF2M, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, 0x20_1000, 0x40_0000, 2, LEAF2M, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, 0x3000, DATA, 3, LEAF, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, 0x3000, DATA, 0, LEAF, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, GPA_LIMIT, DATA, 1, LEAF, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, -4096, DATA, 1, LEAF, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, 0x3000, MEM, 1, LEAF, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, 0x3000, HPA_LIMIT, 1, LEAF, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, 0x20_0000, MEM - 0x100000, 2, LEAF2M, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, 0x3000, DATA, 1, LEAF | (1 << 20), env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, 0x3000, DATA, 1, LEAF | (1 << 55), env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, 0x3000, DATA, 1, U | W, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT, 0x20_0000, 0x40_0000, 2, LEAF, env.spares()), (INST_BAD_ARG, 0)),
        ((ROOT + 0x10, 0x3000, DATA, 1, LEAF, env.spares()), (INST_BAD_ARG, 0)),
        ((MEM, 0x3000, DATA, 1, LEAF, env.spares()), (INST_BAD_ARG, 0)),
        # bad spares (only checked when needed)
        ((ROOT, 1 << 39, DATA, 1, LEAF, [0x500000, 0x501008, 0x502000]), (INST_BAD_ARG, 0)),
        ((ROOT, 1 << 39, DATA, 1, LEAF, [0x500000, 0x501000, 0x500000]), (INST_BAD_ARG, 0)),
        ((ROOT, 1 << 39, DATA, 1, LEAF, [0x500000, MEM, 0x502000]), (INST_BAD_ARG, 0)),
        ((ROOT, 1 << 39, DATA, 1, LEAF, [0x500000, -4096, 0x502000]), (INST_BAD_ARG, 0)),
        ((ROOT, 1 << 39, DATA, 1, LEAF, [0x500000, 1 << 64, 0x502000]), (INST_BAD_ARG, 0)),
    ]
    for args, want in cases:
        before = env.snapshot()
        assert env.eng.install(*args) == want, args
        assert env.snapshot() == before, args
        root, gpa, _hpa, level = args[:4]
        if want[0] in (INST_MAPPED,):
            assert env.eng.tables_needed(root, gpa, level) == (INST_MAPPED, 0)
        if want[0] == INST_NEED_TABLES:
            assert env.eng.tables_needed(root, gpa, level) == (INST_OK, want[1])
    # spares beyond the needed ones are not checked
    assert env.eng.install(ROOT, 0x3000, DATA, 1, LEAF, [1, 2, 3]) == (INST_OK, 0)


def test_install_blocked_by_corrupt_entry(env):
    env.install(0x1000, DATA)
    pdpte = env.entry_addr(0x1000, 3)
    v = env.u64(pdpte)
    for bad in (v | (1 << 60), (v & ~ADDR_MASK) | MEM):
        env.put64(pdpte, bad)
        before = env.snapshot()
        assert env.eng.install(ROOT, 0x5000, DATA, 1, LEAF, env.spares()) == (INST_MAPPED, 0)
        assert env.eng.tables_needed(ROOT, 0x5000, 1) == (INST_MAPPED, 0)
        assert env.eng.clear(ROOT, 0x1000, 1) == (CLR_NOT_MAPPED, 0)
        assert env.snapshot() == before


def test_clear(env):
    env.install(0x1000, DATA)
    env.install(0x40_0000, 0x60_0000, level=2)
    pte = env.entry_addr(0x1000, 1)
    env.eng.walk(ROOT, 0x1000, ACC_W)
    old = env.u64(pte)
    assert old & (A | D) == A | D
    assert env.eng.clear(ROOT, 0x1000, 1) == (INST_OK, old)
    assert env.u64(pte) == 0
    assert not env.eng.walk(ROOT, 0x1000, ACC_R).ok
    before = env.snapshot()
    assert env.eng.clear(ROOT, 0x1000, 1) == (CLR_NOT_MAPPED, 0)
    assert env.eng.clear(ROOT, 0x0, 2) == (CLR_NOT_MAPPED, 0)       # a table
    assert env.eng.clear(ROOT, 0x40_1000, 1) == (CLR_NOT_MAPPED, 0)  # under a 2M leaf
    assert env.eng.clear(ROOT, 1 << 40, 1) == (CLR_NOT_MAPPED, 0)
    assert env.eng.clear(ROOT, 0x1800, 1) == (INST_BAD_ARG, 0)
    assert env.eng.clear(ROOT, 0x1000, 3) == (INST_BAD_ARG, 0)
    assert env.eng.clear(ROOT, GPA_LIMIT, 1) == (INST_BAD_ARG, 0)
    assert env.snapshot() == before
    e2 = env.u64(env.entry_addr(0x40_0000, 2))
    assert env.eng.clear(ROOT, 0x40_0000, 2) == (INST_OK, e2)
    assert env.eng.install(ROOT, 0x40_0000, 0x60_0000, 2, LEAF2M, []) == (INST_OK, 0)


# ---------------------------------------------------------------------------
# mappings, table_pages, canon_page

def test_mappings_and_table_pages(env):
    assert env.eng.mappings(ROOT) == []
    assert env.eng.table_pages(ROOT) == [(ROOT, 4)]
    gpas = [0x5000, 0x1000, 1 << 39, 0x40_0000]
    env.install(0x5000, DATA)
    env.install(0x1000, DATA + 0x1000, flags=P | U | NX)
    env.install(1 << 39, DATA + 0x2000)
    env.install(0x40_0000, 0x60_0000, level=2)
    env.eng.walk(ROOT, 0x5000, ACC_W)
    m = env.eng.mappings(ROOT)
    assert [x[0] for x in m] == sorted(gpas)
    assert m[0] == (0x1000, DATA + 0x1000, 4096, DATA + 0x1000 | P | U | NX)
    assert m[1] == (0x5000, DATA, 4096, DATA | LEAF | A | D)
    assert m[2] == (0x40_0000, 0x60_0000, 1 << 21, 0x60_0000 | LEAF2M)
    assert m[3][:3] == (1 << 39, DATA + 0x2000, 4096)
    tp = env.eng.table_pages(ROOT)
    assert tp[0] == (ROOT, 4)
    assert [lv for _, lv in tp] == [4, 3, 2, 1, 3, 2, 1]
    p3 = env.u64(ROOT) & ADDR_MASK
    p2 = env.u64(p3) & ADDR_MASK
    p1 = env.u64(p2) & ADDR_MASK
    assert tp[1:4] == [(p3, 3), (p2, 2), (p1, 1)]
    assert env.eng.table_pages(ROOT + 1) == [] and env.eng.mappings(MEM) == []


def test_traversal_cycles_aliases_and_outside(env):
    env.install(0x1000, DATA)
    p3 = env.u64(ROOT) & ADDR_MASK
    # PML4 entry 1 aliases entry 0's PDPT; entry 2 points at the root itself;
    # entry 3 points outside memory
    env.put64(ROOT + 8, p3 | P | W | U)
    env.put64(ROOT + 16, ROOT | P | W | U)
    env.put64(ROOT + 24, MEM | P | W | U)
    tp = env.eng.table_pages(ROOT)
    assert len(tp) == len(set(h for h, _ in tp)) == 4      # each page once
    m = env.eng.mappings(ROOT)
    assert m == [(0x1000, DATA, 4096, DATA | LEAF)]         # visited once
    # a self-referencing loop at every level terminates
    for a in range(ROOT, ROOT + 4096, 8):
        env.put64(a, ROOT | P | W | U)
    assert env.eng.table_pages(ROOT) == [(ROOT, 4)]
    assert env.eng.mappings(ROOT) == []


def test_canon_page(env):
    page = 0x20000
    vals = [(i * 0x0123_4567_89AB_CDEF) & ((1 << 64) - 1) for i in range(512)]
    struct.pack_into("<512Q", env.mem, page, *vals)
    c = env.eng.canon_page(page)
    assert isinstance(c, bytes) and len(c) == 4096
    assert list(struct.unpack("<512Q", c)) == [v & ~(A | D) for v in vals]
    assert env.mem[page:page + 4096] == struct.pack("<512Q", *vals)   # untouched
    for bad in (page + 8, MEM, MEM - 0x800, -4096):
        with pytest.raises(ValueError):
            env.eng.canon_page(bad)


# ---------------------------------------------------------------------------
# walk_batch

def test_walk_batch(env):
    gpas = [0x1000 * i for i in range(1, 9)]
    for i, g in enumerate(gpas):
        env.install(g, DATA + 0x1000 * i, flags=LEAF if i != 5 else P | U)
    ga = array("Q", [g + 0x10 for g in gpas])
    acc = bytes([ACC_R, ACC_W, ACC_X, ACC_R, ACC_W, ACC_W, ACC_R, ACC_R])
    out = array("Q", [7] * 8)
    n, miss = env.eng.walk_batch(ROOT, ga, acc, out)
    assert n == 5
    assert miss == env.eng.walk(ROOT, ga[5], ACC_W)
    assert miss.errcode == PF_P | PF_W | PF_U | PF_FINAL
    assert list(out) == [DATA + 0x1000 * i + 0x10 for i in range(5)] + [7, 7, 7]
    # A/D of the hits only
    assert env.u64(env.entry_addr(gpas[1], 1)) & D
    assert not env.u64(env.entry_addr(gpas[6], 1)) & A
    n, miss = env.eng.walk_batch(ROOT, ga[:5], acc[:5], out)
    assert (n, miss) == (5, None)
    assert env.eng.walk_batch(ROOT, array("Q"), b"", array("Q")) == (0, None)
    # set_ad=False writes nothing
    before = env.snapshot()
    n, miss = env.eng.walk_batch(ROOT, ga[6:], array("B", [ACC_W, ACC_W]),
                                 array("Q", [0, 0]), set_ad=False)
    assert n == 2 and env.snapshot() == before
    # misses: gpa past the limit, bad root
    n, miss = env.eng.walk_batch(ROOT, array("Q", [0x1000, GPA_LIMIT]), b"\0\1", out)
    assert (n, miss) == (1, WalkResult(False, 0, 4, 0, PF_RSV | PF_W | PF_U | PF_FINAL))
    n, miss = env.eng.walk_batch(MEM, array("Q", [0x1000]), b"\2", out)
    assert (n, miss) == (0, WalkResult(False, 0, 4, 0, PF_RSV | PF_ID | PF_U | PF_FINAL))
    with pytest.raises(ValueError):
        env.eng.walk_batch(ROOT, ga, acc[:3], out)
    with pytest.raises(ValueError):
        env.eng.walk_batch(ROOT, ga, acc, array("Q", [0]))


# ---------------------------------------------------------------------------
# 2D walks: guest page tables in guest memory, translated through the NPT

GRAM = 0x100_0000 >> 2        # guest RAM: GPA [0, 4 MiB) -> HPA DATA + gpa


class Guest:
    """Guest RAM mapped 4 KiB by 4 KiB through the NPT, guest tables in it."""

    def __init__(self, env, ram=GRAM):
        self.env = env
        for gpa in range(0, ram, 0x1000):
            env.install(gpa, DATA + gpa)
        self.next_frame = 0x10_0000

    def frame(self):
        f = self.next_frame
        self.next_frame += 0x1000
        return f

    def hpa(self, gpa):
        r = self.env.eng.walk(ROOT, gpa, ACC_R, set_ad=False)
        assert r.ok
        return r.hpa

    def r64(self, gpa):
        return self.env.u64(self.hpa(gpa))

    def w64(self, gpa, v):
        self.env.put64(self.hpa(gpa), v)

    def r32(self, gpa):
        return self.env.u32(self.hpa(gpa))

    def w32(self, gpa, v):
        self.env.put32(self.hpa(gpa), v)

    # returns the guest-physical addresses of the entries written, top first
    def map_long4(self, cr3, va, gpa, leaf_level=1, flags=P | W, upper=P | W | U):
        table, addrs = cr3, []
        for L in range(4, leaf_level, -1):
            ea = table + 8 * index(va, L)
            e = self.r64(ea)
            if not e & P:
                e = self.frame() | upper
                self.w64(ea, e)
            addrs.append(ea)
            table = e & ADDR_MASK
        ea = table + 8 * index(va, leaf_level)
        self.w64(ea, gpa | flags | (PS if leaf_level > 1 else 0))
        return addrs + [ea]

    def map_pae(self, cr3, va, gpa, leaf_level=1, flags=P | W, upper=P | W | U):
        pdpte = (cr3 & 0xFFFFFFE0) + 8 * ((va >> 30) & 3)
        e = self.r64(pdpte)
        if not e & P:
            e = self.frame() | P
            self.w64(pdpte, e)
        addrs = [pdpte]
        table = e & ADDR_MASK
        if leaf_level == 1:
            ea = table + 8 * index(va, 2)
            e = self.r64(ea)
            if not e & P:
                e = self.frame() | upper
                self.w64(ea, e)
            addrs.append(ea)
            table = e & ADDR_MASK
        ea = table + 8 * index(va, leaf_level)
        self.w64(ea, gpa | flags | (PS if leaf_level > 1 else 0))
        return addrs + [ea]

    def map_32(self, cr3, va, gpa, big=False, flags=P | W, upper=P | W | U):
        pde = cr3 + 4 * (va >> 22)
        if big:
            e = (gpa & 0xFFC00000) | (((gpa >> 32) & 0xFF) << 13) | flags | PS
            self.w32(pde, e)
            return [pde]
        e = self.r32(pde)
        if not e & P:
            e = self.frame() | upper
            self.w32(pde, e)
        pte = (e & 0xFFFFF000) + 4 * ((va >> 12) & 1023)
        self.w32(pte, gpa | flags)
        return [pde, pte]


@pytest.fixture
def guest(env):
    return Guest(env)


def test_walk2d_long4_4k_2m_1g(env, guest):
    cr3 = guest.frame()
    va = 0x7F12_3456_7000
    guest.map_long4(cr3, va, 0x20_5000)
    r = env.eng.walk2d(ROOT, cr3, va + 0x123, ACC_W, MODE_LONG4)
    assert r == Walk2DResult(True, DATA + 0x20_5123, 0x20_5123, K_OK, 0, 1)
    guest.map_long4(cr3, 0x4000_0000, 0x20_0000, leaf_level=2)
    r = env.eng.walk2d(ROOT, cr3, 0x4001_2345, ACC_R, MODE_LONG4)
    assert r == Walk2DResult(True, DATA + 0x21_2345, 0x21_2345, K_OK, 0, 2)
    guest.map_long4(cr3, 0x80_0000_0000, 0, leaf_level=3)
    r = env.eng.walk2d(ROOT, cr3, 0x80_0000_0000 + 0x33_4567, ACC_X, MODE_LONG4)
    assert r == Walk2DResult(True, DATA + 0x33_4567, 0x33_4567, K_OK, 0, 3)
    # bits 48..63 of the va are ignored (canonical checks are the CPU's)
    r2 = env.eng.walk2d(ROOT, cr3, 0xFFFF_0000_0000_0000 | (va + 0x123), ACC_R, MODE_LONG4)
    assert r2.ok and r2.gpa == 0x20_5123


def test_walk2d_guest_faults_long4(env, guest):
    cr3 = guest.frame()
    va = 0x1234_5678_9000
    addrs = guest.map_long4(cr3, va, 0x20_0000)
    # not present at each level
    for level, ea in zip((4, 3, 2, 1), addrs):
        old = guest.r64(ea)
        guest.w64(ea, old & ~P)
        for acc, ec in ((ACC_R, 0), (ACC_W, 2), (ACC_X, 16)):
            before = env.snapshot()
            r = env.eng.walk2d(ROOT, cr3, va, acc, MODE_LONG4)
            assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, ec, level)
            assert env.snapshot() == before
        # reserved bits 48..51
        guest.w64(ea, old | (1 << 50))
        r = env.eng.walk2d(ROOT, cr3, va, ACC_W, MODE_LONG4)
        assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 1 | 2 | 8, level)
        # bits 52..58 are ignored in long mode
        guest.w64(ea, old | (1 << 53))
        assert env.eng.walk2d(ROOT, cr3, va, ACC_R, MODE_LONG4).ok
        # read-only at this level
        guest.w64(ea, old & ~W)
        assert env.eng.walk2d(ROOT, cr3, va, ACC_R, MODE_LONG4).ok
        r = env.eng.walk2d(ROOT, cr3, va, ACC_W, MODE_LONG4)
        assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 1 | 2, 1)
        # NX at this level
        guest.w64(ea, old | NX)
        r = env.eng.walk2d(ROOT, cr3, va, ACC_X, MODE_LONG4)
        assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 1 | 16, 1)
        # U/S is ignored (supervisor accesses)
        guest.w64(ea, old & ~U)
        assert env.eng.walk2d(ROOT, cr3, va, ACC_W, MODE_LONG4).ok
        guest.w64(ea, old)
    # PS at PML4 and reserved bits of large guest pages
    guest.w64(addrs[0], guest.r64(addrs[0]) | PS)
    r = env.eng.walk2d(ROOT, cr3, va, ACC_R, MODE_LONG4)
    assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 1 | 8, 4)
    guest.w64(addrs[0], guest.r64(addrs[0]) & ~PS)
    guest.w64(addrs[2], 0x20_0000 | P | W | PS | (1 << 14))
    r = env.eng.walk2d(ROOT, cr3, va, ACC_R, MODE_LONG4)
    assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 1 | 8, 2)


def test_walk2d_npf_walk_and_final(env, guest):
    cr3 = guest.frame()
    va = 0x40_0000_3000
    addrs = guest.map_long4(cr3, va, 0x20_0000)
    # final GPA not mapped in the NPT
    guest.map_long4(cr3, va + 0x1000, 0x900_0000)
    r = env.eng.walk2d(ROOT, cr3, va + 0x1008, ACC_W, MODE_LONG4)
    assert r == Walk2DResult(False, 0, 0x900_0008, K_NPF, PF_U | PF_W | PF_FINAL, 2)
    r = env.eng.walk2d(ROOT, cr3, va + 0x1008, ACC_X, MODE_LONG4)
    assert r.errcode == PF_U | PF_ID | PF_FINAL
    # a guest table page not mapped in the NPT: PF_WALK on the entry's GPA
    pt_gpa = addrs[3] & ~0xFFF
    old = env.eng.clear(ROOT, pt_gpa, 1)
    assert old[0] == INST_OK
    before = env.snapshot()
    r = env.eng.walk2d(ROOT, cr3, va, ACC_W, MODE_LONG4)
    assert r == Walk2DResult(False, 0, addrs[3], K_NPF, PF_U | PF_WALK, 1)
    assert env.snapshot() == before
    # the guest table page is mapped not user: a read protection fault
    assert env.eng.install(ROOT, pt_gpa, DATA + pt_gpa, 1, P | W, [])[0] == INST_OK
    r = env.eng.walk2d(ROOT, cr3, va, ACC_R, MODE_LONG4)
    assert r == Walk2DResult(False, 0, addrs[3], K_NPF, PF_P | PF_U | PF_WALK, 1)
    # read-only in the NPT: fine while the guest A bit is already set ...
    env.eng.clear(ROOT, pt_gpa, 1)
    env.eng.install(ROOT, pt_gpa, DATA + pt_gpa, 1, P | U, [])
    r = env.eng.walk2d(ROOT, cr3, va, ACC_R, MODE_LONG4, set_ad=False)
    assert r.ok
    # ... but setting it needs NPT write permission: NPF PF_WALK|PF_W
    r = env.eng.walk2d(ROOT, cr3, va, ACC_R, MODE_LONG4)
    assert r == Walk2DResult(False, 0, addrs[3], K_NPF, PF_P | PF_W | PF_U | PF_WALK, 1)
    guest_pte = DATA + addrs[3]
    env.put64(guest_pte, env.u64(guest_pte) | A)
    r = env.eng.walk2d(ROOT, cr3, va, ACC_R, MODE_LONG4)
    assert r.ok
    r = env.eng.walk2d(ROOT, cr3, va, ACC_W, MODE_LONG4)      # needs D
    assert r == Walk2DResult(False, 0, addrs[3], K_NPF, PF_P | PF_W | PF_U | PF_WALK, 1)


def test_walk2d_accessed_dirty(env, guest):
    cr3 = guest.frame()
    va = 0x5000_0000
    addrs = guest.map_long4(cr3, va, 0x30_0000)
    before = env.snapshot()
    assert env.eng.walk2d(ROOT, cr3, va, ACC_W, MODE_LONG4, set_ad=False).ok
    assert env.snapshot() == before
    assert env.eng.walk2d(ROOT, cr3, va, ACC_R, MODE_LONG4).ok
    assert all(guest.r64(a) & A for a in addrs)
    assert not any(guest.r64(a) & D for a in addrs)
    # NPT: A on the path of each guest table page and the final page; D on
    # the NPT leaf of each guest table page the CPU wrote A/D into
    for a in addrs:
        pte = env.entry_addr(a, 1)
        assert env.u64(pte) & (A | D) == A | D
        assert all(env.u64(x) & A for x in env.path_addrs(a))
    fpte = env.entry_addr(0x30_0000, 1)
    assert env.u64(fpte) & (A | D) == A
    assert env.eng.walk2d(ROOT, cr3, va, ACC_W, MODE_LONG4).ok
    assert guest.r64(addrs[-1]) & D
    assert not any(guest.r64(a) & D for a in addrs[:-1])
    assert env.u64(fpte) & (A | D) == A | D
    # the walk sets nothing more once everything is set
    before = env.snapshot()
    assert env.eng.walk2d(ROOT, cr3, va, ACC_W, MODE_LONG4).ok
    assert env.snapshot() == before
    # no D on a guest table page whose entries needed nothing
    va2 = 0x5000_1000
    guest.map_long4(cr3, va2, 0x30_1000)
    e = guest.r64(addrs[-1] + 8)
    guest.w64(addrs[-1] + 8, e | A | D)
    env.eng.clear(ROOT, addrs[-1] & ~0xFFF, 1)
    env.eng.install(ROOT, addrs[-1] & ~0xFFF, DATA + (addrs[-1] & ~0xFFF), 1, LEAF, [])
    assert env.eng.walk2d(ROOT, cr3, va2, ACC_W, MODE_LONG4).ok
    assert env.u64(env.entry_addr(addrs[-1], 1)) & (A | D) == A


def test_walk2d_pae(env, guest):
    cr3 = guest.frame() | 0x40          # 32-byte aligned PDPT inside a page
    va = 0xC012_3000
    addrs = guest.map_pae(cr3, va, 0x20_7000)
    r = env.eng.walk2d(ROOT, cr3, va + 0x45, ACC_W, MODE_PAE)
    assert r == Walk2DResult(True, DATA + 0x20_7045, 0x20_7045, K_OK, 0, 1)
    assert not guest.r64(addrs[0]) & A                  # PDPTE: no A/D
    assert guest.r64(addrs[1]) & A and guest.r64(addrs[2]) & (A | D) == A | D
    # va bits above 31 are ignored
    assert env.eng.walk2d(ROOT, cr3, (1 << 40) | va, ACC_R, MODE_PAE).ok
    guest.map_pae(cr3, 0x4060_0000, 0x20_0000, leaf_level=2)
    r = env.eng.walk2d(ROOT, cr3, 0x406A_BCDE, ACC_X, MODE_PAE)
    assert r == Walk2DResult(True, DATA + 0x2A_BCDE, 0x2A_BCDE, K_OK, 0, 2)
    # PDPTE reserved bits (R/W is reserved there)
    old = guest.r64(addrs[0])
    guest.w64(addrs[0], old | W)
    r = env.eng.walk2d(ROOT, cr3, va, ACC_R, MODE_PAE)
    assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 1 | 8, 3)
    guest.w64(addrs[0], old & ~P)
    r = env.eng.walk2d(ROOT, cr3, va, ACC_X, MODE_PAE)
    assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 16, 3)
    guest.w64(addrs[0], old)
    # PDE/PTE: bits 52..62 reserved in PAE, NX honoured
    guest.w64(addrs[2], guest.r64(addrs[2]) | (1 << 56))
    r = env.eng.walk2d(ROOT, cr3, va, ACC_R, MODE_PAE)
    assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 1 | 8, 1)
    guest.w64(addrs[2], (guest.r64(addrs[2]) & ~(1 << 56)) | NX)
    r = env.eng.walk2d(ROOT, cr3, va, ACC_X, MODE_PAE)
    assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 1 | 16, 1)
    guest.w64(addrs[1], guest.r64(addrs[1]) & ~W)
    r = env.eng.walk2d(ROOT, cr3, va, ACC_W, MODE_PAE)
    assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 1 | 2, 1)


def test_walk2d_32bit(env, guest):
    cr3 = guest.frame()
    va = 0x8040_5000
    addrs = guest.map_32(cr3, va, 0x20_9000)
    r = env.eng.walk2d(ROOT, cr3, va + 0xFFF, ACC_W, MODE_32)
    assert r == Walk2DResult(True, DATA + 0x20_9FFF, 0x20_9FFF, K_OK, 0, 1)
    assert guest.r32(addrs[0]) & (A | D) == A
    assert guest.r32(addrs[1]) & (A | D) == A | D
    # the neighbouring 32-bit entry is untouched
    assert guest.r32(addrs[1] + 4) == 0
    # a 4 MiB page
    guest.map_32(cr3, 0xC000_0000, 0x0, big=True)
    r = env.eng.walk2d(ROOT, cr3, 0xC02A_BCDE, ACC_X, MODE_32)
    assert r == Walk2DResult(True, DATA + 0x2A_BCDE, 0x2A_BCDE, K_OK, 0, 2)
    # PSE-36: a 4 MiB page above 4 GiB (not in the NPT: NPF on the final GPA)
    guest.map_32(cr3, 0x0040_0000, 0x3_0040_0000 & ~0x3FFFFF, big=True)
    r = env.eng.walk2d(ROOT, cr3, 0x0041_2345, ACC_R, MODE_32)
    assert (r.kind, r.gpa, r.errcode) == (K_NPF, 0x3_0041_2345, PF_U | PF_FINAL)
    # bit 21 of a 4 MiB PDE is reserved
    guest.w32(cr3 + 4 * 1, guest.r32(cr3 + 4) | (1 << 21))
    r = env.eng.walk2d(ROOT, cr3, 0x0041_2345, ACC_R, MODE_32)
    assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 1 | 8, 2)
    # no NX in 32-bit paging: a fetch fault has no I/D bit
    r = env.eng.walk2d(ROOT, cr3, 0x1000_0000, ACC_X, MODE_32)
    assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 0, 2)
    guest.w32(addrs[1], guest.r32(addrs[1]) & ~W)
    r = env.eng.walk2d(ROOT, cr3, va, ACC_W, MODE_32)
    assert r == Walk2DResult(False, 0, 0, K_GUEST_PF, 1 | 2, 1)
    # an NPF while reading the PDE
    r = env.eng.walk2d(ROOT, 0x200_0000, va, ACC_R, MODE_32)
    assert r == Walk2DResult(False, 0, 0x200_0000 + 4 * (va >> 22), K_NPF,
                             PF_U | PF_WALK, 2)


def test_walk2d_bad_mode(env):
    with pytest.raises(ValueError):
        env.eng.walk2d(ROOT, 0, 0, ACC_R, 5)


def test_close_releases_buffer(engine):
    m = mmap.mmap(-1, 1 << 20)
    eng = get_engine(m, engine)
    eng.close()
    m.close()


# ---------------------------------------------------------------------------
# differential tests: C vs Python over two buffers

needs_both = pytest.mark.skipif("c" not in available_backends(),
                                reason="C backend not built")

DIFF_MEM = 4 << 20
DIFF_GRAM = 0x4_0000                  # guest RAM: GPA [0, 256 KiB) -> HPA 0x200000+
DIFF_DATA = 0x20_0000
TABLE_POOL = [0x10_0000 + 0x1000 * i for i in range(48)]
GPA_POOL = [0, 0x1000, 0x2000, 0x20_0000, 0x40_0000, 0x4000_0000, 1 << 39,
            (1 << 39) | 0x1000, 0x7FFF_FFFF_F000, 0x3F000, 0x3E000]
HPA_POOL = [DIFF_DATA + 0x1000 * i for i in range(4)] + [0x40_0000 - 0x1000, 0x20_0000,
                                                         0x10_0000, 0x1000, DIFF_MEM]
FLAG_POOL = [LEAF, P | U, P | U | NX, P | W, LEAF | A | D, LEAF2M, P | U | PS, U | W,
             LEAF | (1 << 52)]

u64s = st.one_of(
    st.sampled_from([0, P | W | U, A, D, PS, NX, 1 << 52, DIFF_MEM | P | W | U,
                     0x10_0000 | P | W | U, 0x1000 | P | U | PS, (1 << 64) - 1]),
    st.integers(0, (1 << 64) - 1),
    st.builds(lambda f, b: f | b, st.sampled_from(TABLE_POOL + HPA_POOL[:4]),
              st.sampled_from([P | W | U, P | U, P | W | U | A, P | PS | U | W, P | W | U | NX])),
)

op_install = st.tuples(st.just("install"), st.sampled_from(GPA_POOL), st.sampled_from(HPA_POOL),
                       st.sampled_from([1, 2, 1, 3]), st.sampled_from(FLAG_POOL),
                       st.lists(st.sampled_from(TABLE_POOL + [0x10_0008, DIFF_MEM]), max_size=4))
op_clear = st.tuples(st.just("clear"), st.sampled_from(GPA_POOL), st.sampled_from([1, 2]))
op_walk = st.tuples(st.just("walk"), st.sampled_from(GPA_POOL), st.integers(0, 0xFFF),
                    st.sampled_from([ACC_R, ACC_W, ACC_X]), st.booleans())
op_batch = st.tuples(st.just("batch"),
                     st.lists(st.tuples(st.sampled_from(GPA_POOL), st.sampled_from([0, 1, 2])),
                              max_size=8), st.booleans())
op_poke = st.tuples(st.just("poke"), st.sampled_from([0x1000] + TABLE_POOL[:12]),
                    st.integers(0, 511), u64s)
op_poke_guest = st.tuples(st.just("pokeg"), st.integers(0, DIFF_GRAM // 8 - 1), u64s)
_cr3_mode = st.one_of(
    st.sampled_from([(0x1000, MODE_LONG4), (0x2020, MODE_PAE), (0x3000, MODE_32)]),
    st.tuples(st.sampled_from([0x1000, 0x2000, 0x3000, 0x2020, 0x10_0000]),
              st.sampled_from([MODE_LONG4, MODE_PAE, MODE_32])))
_va = st.one_of(
    st.builds(lambda v, o: v + o,
              st.sampled_from([0, 0x1000, 0x40_0000, 0x3F000, 0x80_0000, 0xC000_0000]),
              st.sampled_from([0, 0x8, 0x123, 0xFFF, 0x1_2345])),
    st.integers(0, (1 << 64) - 1))
op_walk2d = st.builds(lambda cm, va, acc, set_ad: ("walk2d", cm[0], va, acc, cm[1], set_ad),
                      _cr3_mode, _va, st.sampled_from([ACC_R, ACC_W, ACC_X]), st.booleans())
op_query = st.tuples(st.sampled_from(["mappings", "table_pages", "tables_needed", "canon"]),
                     st.sampled_from(GPA_POOL), st.sampled_from([1, 2]),
                     st.sampled_from(TABLE_POOL[:8] + [0x1000, 0x1008]))
ops = st.lists(st.one_of(op_install, op_clear, op_walk, op_batch, op_poke, op_poke_guest,
                         op_walk2d, op_query), max_size=40)


def _apply(eng, mem, op):
    kind = op[0]
    try:
        if kind == "install":
            _, gpa, hpa, level, flags, spares = op
            return eng.install(ROOT, gpa, hpa, level, flags, spares)
        if kind == "clear":
            return eng.clear(ROOT, op[1], op[2])
        if kind == "walk":
            _, gpa, off, acc, set_ad = op
            return eng.walk(ROOT, gpa + off, acc, set_ad)
        if kind == "batch":
            _, items, set_ad = op
            g = array("Q", [x[0] | 0x18 for x in items])
            a = bytes(x[1] for x in items)
            out = array("Q", [0] * len(items))
            n, miss = eng.walk_batch(ROOT, g, a, out, set_ad)
            return n, miss, list(out)
        if kind == "poke":
            _, table, idx, v = op
            struct.pack_into("<Q", mem, table + 8 * idx, v)
            return None
        if kind == "pokeg":
            _, idx, v = op
            struct.pack_into("<Q", mem, DIFF_DATA + 8 * idx, v)
            return None
        if kind == "walk2d":
            _, cr3, va, acc, mode, set_ad = op
            return eng.walk2d(ROOT, cr3, va, acc, mode, set_ad)
        if kind == "mappings":
            return eng.mappings(ROOT)
        if kind == "table_pages":
            return eng.table_pages(ROOT)
        if kind == "tables_needed":
            return eng.tables_needed(ROOT, op[1], op[2])
        if kind == "canon":
            return eng.canon_page(op[3])
    except Exception as exc:               # both must fail the same way
        return ("raised", type(exc).__name__)
    raise AssertionError(op)


def _diff_setup(eng, mem):
    """Guest RAM mapped through the NPT and one guest table tree per mode."""
    spares = iter(0x30_0000 + 0x1000 * i for i in range(200))
    for gpa in range(0, DIFF_GRAM, 0x1000):
        rc, n = eng.install(ROOT, gpa, DIFF_DATA + gpa, 1, LEAF, [next(spares) for _ in range(3)])
        assert rc == INST_OK
    g = DIFF_DATA

    def put(gpa, v, size=8):
        struct.pack_into("<Q" if size == 8 else "<I", mem, g + gpa, v)
    # long mode: cr3 0x1000 -> 0x4000 -> 0x5000 -> 0x6000; va 0 and 0x40_0000
    put(0x1000, 0x4000 | P | W)
    put(0x4000, 0x5000 | P | W)
    put(0x5000, 0x6000 | P | W)
    put(0x5000 + 16, 0x20_0000 | P | W | PS)             # 2 MiB at va 0x40_0000
    put(0x6000, 0x8000 | P | W)
    put(0x6000 + 8, 0x9000 | P)
    put(0x6000 + 8 * 0x3F, 0x3F000 | P | W | NX)
    # PAE: cr3 0x2020 -> PDPT entries at 0x2020..; PD 0x7000; PT 0xA000
    put(0x2020, 0x7000 | P)
    put(0x7000, 0xA000 | P | W)
    put(0x7000 + 16, 0x20_0000 | P | W | PS)
    put(0xA000, 0x8000 | P | W)
    put(0xA000 + 8, 0x9000 | P | NX)
    # 32-bit: cr3 0x3000 -> PT 0xB000; a 4 MiB page at va 0x40_0000
    put(0x3000, 0xB000 | P | W, 4)
    put(0x3004, 0x0 | P | W | PS, 4)
    put(0xB000, 0x8000 | P | W, 4)
    put(0xB004, 0x9000 | P, 4)
    put(0xB000 + 4 * 0x3F, 0x3F000 | P | W, 4)


@needs_both
@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops)
def test_differential_random_sequences(seq):
    mc = mmap.mmap(-1, DIFF_MEM)
    mp = mmap.mmap(-1, DIFF_MEM)
    ec = get_engine(mc, "c")
    ep = get_engine(mp, "python")
    _diff_setup(ec, mc)
    _diff_setup(ep, mp)
    assert mc[:] == mp[:]
    for op in seq:
        rc = _apply(ec, mc, op)
        rp = _apply(ep, mp, op)
        assert rc == rp, op
        assert type(rc) is type(rp)
    assert mc[:] == mp[:]
    assert ec.mappings(ROOT) == ep.mappings(ROOT)
    assert ec.table_pages(ROOT) == ep.table_pages(ROOT)
    ec.close()
    ep.close()


@needs_both
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 511), st.integers(1, 4), u64s), max_size=12),
       st.lists(st.tuples(st.integers(0, (1 << 48) - 1) | st.sampled_from(GPA_POOL),
                          st.sampled_from([0, 1, 2])),
                min_size=1, max_size=30),
       st.booleans(),
       st.sampled_from([DIFF_MEM, DIFF_MEM - 0x3000, DIFF_MEM + 0x5000]))
def test_differential_corrupt_tables(pokes, walks, set_ad, size):
    """Arbitrary entry values in a populated tree: walks, batches, traversals
    (memory sizes that are and are not powers of two)."""
    bufs = [mmap.mmap(-1, size), mmap.mmap(-1, size)]
    engs = [get_engine(bufs[0], "c"), get_engine(bufs[1], "python")]
    res = []
    for eng, mem in zip(engs, bufs):
        tables = iter(range(0x10_0000, 0x20_0000, 0x1000))
        for k, gpa in enumerate([0, 0x1000, 0x20_0000, 0x4000_0000, 1 << 39]):
            _, need = eng.tables_needed(ROOT, gpa, 1)
            rc, _ = eng.install(ROOT, gpa, DIFF_DATA + 0x1000 * k, 1, LEAF,
                                [next(tables) for _ in range(need)])
            assert rc == INST_OK
        pages = [h for h, _ in eng.table_pages(ROOT)]
        for idx, which, v in pokes:
            page = pages[which % len(pages)]
            struct.pack_into("<Q", mem, page + 8 * idx, v)
        out = []
        for gpa, acc in walks:
            out.append(eng.walk(ROOT, gpa, acc, set_ad))
        g = array("Q", [w[0] for w in walks])
        a = bytes(w[1] for w in walks)
        hp = array("Q", [0] * len(walks))
        out.append(eng.walk_batch(ROOT, g, a, hp, set_ad))
        out.append(list(hp))
        out.append(eng.mappings(ROOT))
        out.append(eng.table_pages(ROOT))
        out.append([eng.canon_page(p) for p in pages])
        res.append(out)
    assert res[0] == res[1]
    assert bufs[0][:] == bufs[1][:]


# ---------------------------------------------------------------------------
# differential tests of the batch path (the C batch walks several GPAs at once
# and must still give exactly the result of walking them one by one in order)

BATCH_ROOT = 0x1000
BATCH_TABLES = 0x10_0000              # table frames for install()
BATCH_DATA = 0x20_0000                # data frames
# mapped 4 KiB pages: two PTs under one PD, one under another PDPT entry, one
# under another PML4 entry (several table pages at every level)
BATCH_4K = ([0x1000 * i for i in range(40)]
            + [0x20_0000 + 0x1000 * i for i in range(12)]
            + [0x4000_0000 + 0x1000 * i for i in range(8)]
            + [(1 << 39) + 0x1000 * i for i in range(8)])
BATCH_2M = [0x60_0000, 0x4040_0000]   # 2 MiB leaves
BATCH_1G = 3 << 30                    # a 1 GiB leaf (outside memory: a fault)
BATCH_UNMAPPED = [0x50_000, 0x80_0000, 0x8000_0000, 1 << 40, (1 << 39) + 0x40_0000,
                  0x7FFF_FFFF_F000, GPA_LIMIT, GPA_LIMIT | 0x1000, (1 << 64) - 0x1000]
# what a leaf (or, for "t*", the table entries above it) can be changed to
LEAF_MODS = {
    "ok": lambda e: e,
    "noA": lambda e: e & ~A,
    "noD": lambda e: e & ~D,
    "noAD": lambda e: e & ~(A | D),
    "ro": lambda e: e & ~W,
    "ro_noD": lambda e: e & ~(W | D),
    "sup": lambda e: e & ~U,
    "nx": lambda e: e | NX,
    "nx_noA": lambda e: (e | NX) & ~A,
    "rsv": lambda e: e | (1 << 52),
    "rsv62": lambda e: e | (1 << 62),
    "np": lambda e: e & ~P,
    "zero": lambda e: 0,
    "pat": lambda e: e | PS,                      # bit 7 of a 4 KiB leaf: PAT, allowed
    "outside": lambda e: (e & 0xFFF) | (1 << 40),  # points outside memory
    "hi_addr": lambda e: (e & 0xFFF) | (e & ADDR_MASK) | (1 << 51),
}
TABLE_MODS = {
    "ok": lambda e: e,
    "noA": lambda e: e & ~A,
    "ro": lambda e: e & ~W,
    "sup": lambda e: e & ~U,
    "nx": lambda e: e | NX,
    "ps": lambda e: e | PS,                       # a large leaf (or reserved at level 4)
    "rsv": lambda e: e | (1 << 55),
    "np": lambda e: e & ~P,
    "outside": lambda e: (e & 0xFFF) | (1 << 44),
}


def _batch_tree(eng, mem):
    """A tree over BATCH_4K/BATCH_2M with A (and D on leaves) set everywhere,
    so that walks hit the fast path unless a test changes an entry."""
    tables = iter(range(BATCH_TABLES, BATCH_DATA, 0x1000))
    for k, gpa in enumerate(BATCH_4K):
        _, need = eng.tables_needed(BATCH_ROOT, gpa, 1)
        rc, _ = eng.install(BATCH_ROOT, gpa, BATCH_DATA + 0x1000 * k, 1, LEAF,
                            [next(tables) for _ in range(need)])
        assert rc == INST_OK
    for gpa in BATCH_2M:
        _, need = eng.tables_needed(BATCH_ROOT, gpa, 2)
        rc, _ = eng.install(BATCH_ROOT, gpa, 0, 2, LEAF2M,
                            [next(tables) for _ in range(need)])
        assert rc == INST_OK
    # a 1 GiB leaf in the PDPT of GPA 0
    pdpt = struct.unpack_from("<Q", mem, BATCH_ROOT)[0] & ADDR_MASK
    struct.pack_into("<Q", mem, pdpt + 8 * 3, LEAF | PS)
    for hpa, level in eng.table_pages(BATCH_ROOT):
        for i in range(512):
            e = struct.unpack_from("<Q", mem, hpa + 8 * i)[0]
            if e & P:
                struct.pack_into("<Q", mem, hpa + 8 * i,
                                 e | A | (D if level == 1 or e & PS else 0))


def _entry_hpa(mem, gpa, level):
    """HPA of gpa's entry at `level`, None if a change above cut the path."""
    table = BATCH_ROOT
    for L in range(4, level, -1):
        e = struct.unpack_from("<Q", mem, table + 8 * index(gpa, L))[0]
        table = e & ADDR_MASK
        if not e & P or e & PS or table > len(mem) - 4096:
            return None
    return table + 8 * index(gpa, level)


def _modify(mem, leaf_mods, table_mods):
    for k, mod in leaf_mods:
        gpa = BATCH_4K[k % len(BATCH_4K)]
        h = _entry_hpa(mem, gpa, 1)
        if h is not None:
            struct.pack_into("<Q", mem, h, LEAF_MODS[mod](struct.unpack_from("<Q", mem, h)[0]))
    for k, level, mod in table_mods:
        gpa = BATCH_4K[k % len(BATCH_4K)]
        h = _entry_hpa(mem, gpa, level)
        if h is not None:
            struct.pack_into("<Q", mem, h, TABLE_MODS[mod](struct.unpack_from("<Q", mem, h)[0]))


def _gpa_pool(rnd, miss_rate):
    r = rnd.random()
    if r < miss_rate / 4:
        return BATCH_1G + rnd.randrange(1 << 30)
    if r < miss_rate:
        return BATCH_UNMAPPED[rnd.randrange(len(BATCH_UNMAPPED))] | rnd.randrange(0x1000)
    if r < 0.9:
        return BATCH_4K[rnd.randrange(len(BATCH_4K))] | rnd.randrange(0x1000)
    return BATCH_2M[rnd.randrange(len(BATCH_2M))] + rnd.randrange(1 << 21)


def _batch_inputs(seed, n, hot, inject, miss_rate=0.0):
    """n accesses: a mix of the pools (unmapped GPAs at miss_rate), a small
    hot set (the same GPAs again within a few accesses) and misses injected
    at chosen positions."""
    import random
    rnd = random.Random(seed)
    hot_set = [_gpa_pool(rnd, miss_rate) for _ in range(max(1, hot))]
    g, a = [], []
    for _ in range(n):
        g.append(rnd.choice(hot_set) if hot and rnd.random() < 0.5
                 else _gpa_pool(rnd, miss_rate))
        r = rnd.random()
        a.append(ACC_R if r < 0.45 else ACC_W if r < 0.85 else ACC_X if r < 0.97
                 else rnd.choice([3, 7, 255]))
    for pos, which in inject:
        g[pos % n] = BATCH_UNMAPPED[which % len(BATCH_UNMAPPED)]
    return array("Q", [x & ((1 << 64) - 1) for x in g]), bytes(a)


def _replay_style(eng, gpas, accs, out, set_ad):
    """walk_batch from every restart point, as hv/replay.py does: after a
    miss, go on after it (slices are memoryviews, like the replay's)."""
    gv, av, ov = memoryview(gpas), memoryview(accs), memoryview(out)
    res = []
    i, n = 0, len(gpas)
    while i < n:
        k, miss = eng.walk_batch(BATCH_ROOT, gv[i:], av[i:], ov[i:], set_ad)
        res.append((i, k, miss))
        i += k + 1
    return res


def _run_both(size, fn):
    bufs = [mmap.mmap(-1, size), mmap.mmap(-1, size)]
    engs = [get_engine(bufs[0], "c"), get_engine(bufs[1], "python")]
    try:
        res = [fn(eng, mem) for eng, mem in zip(engs, bufs)]
        assert res[0] == res[1]
        assert bufs[0][:] == bufs[1][:]
        return res[0]
    finally:
        for e in engs:
            e.close()


_AD_MODS = ["noA", "noD", "noAD"]
_leaf_mods = st.builds(
    lambda ad, other: ad + other,
    st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(_AD_MODS)), max_size=30),
    st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(sorted(LEAF_MODS))),
             max_size=4))
_table_mods = st.one_of(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(2, 4), st.just("noA")), max_size=4),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(2, 4),
                       st.sampled_from(sorted(TABLE_MODS))), max_size=2))
_sizes = st.sampled_from([DIFF_MEM, DIFF_MEM - 0x3000, DIFF_MEM + 0x5000, 2 * DIFF_MEM])


@needs_both
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 32), n=st.integers(1, 700), hot=st.integers(0, 6),
       inject=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 100)), max_size=6),
       miss_rate=st.sampled_from([0.0, 0.002, 0.01, 0.05]),
       leaf_mods=_leaf_mods, table_mods=_table_mods, set_ad=st.booleans(), size=_sizes)
def test_differential_long_batches(seed, n, hot, inject, miss_rate, leaf_mods, table_mods,
                                   set_ad, size):
    """Long batches with misses anywhere (also within the C pipeline's window),
    faults of every kind, entries needing A/D mid-batch, repeated GPAs: the
    same return values, the same out_hpas (prefix written, rest untouched)
    and the same memory bytes."""
    gpas, accs = _batch_inputs(seed, n, hot, inject, miss_rate)

    def run(eng, mem):
        _batch_tree(eng, mem)
        _modify(mem, leaf_mods, table_mods)
        out = array("Q", [0xA5A5_A5A5_A5A5_A5A5] * n)
        r1 = eng.walk_batch(BATCH_ROOT, gpas, accs, out, set_ad)
        out1 = list(out)
        # and from every restart point, as the replay does
        out2 = array("Q", [0x5A5A] * n)
        r2 = _replay_style(eng, gpas, accs, out2, set_ad)
        return r1, out1, r2, list(out2)
    r1, out1, r2, out2 = _run_both(size, run)
    # against single walks on a third buffer (in order, A/D as they go)
    mem = mmap.mmap(-1, size)
    eng = get_engine(mem, "python")
    _batch_tree(eng, mem)
    _modify(mem, leaf_mods, table_mods)
    k = 0
    while k < n:
        w = eng.walk(BATCH_ROOT, gpas[k], accs[k], set_ad)
        if not w.ok:
            break
        assert out1[k] == w.hpa
        k += 1
    assert r1[0] == k
    assert r1[1] == (None if k == n else w)
    assert out1[k:] == [0xA5A5_A5A5_A5A5_A5A5] * (n - k)
    eng.close()


@needs_both
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 32), n=st.integers(1, 300),
       leaf_mods=st.lists(st.tuples(st.integers(0, 10_000),
                                    st.sampled_from(["noA", "noD", "noAD", "ro_noD", "ok"])),
                          max_size=40),
       table_noA=st.lists(st.tuples(st.integers(0, 10_000), st.integers(2, 4)), max_size=6),
       set_ad=st.booleans())
def test_differential_batch_ad_updates(seed, n, leaf_mods, table_noA, set_ad):
    """Many entries whose A/D an earlier walk of the same batch sets and a
    later one (often of the same page, a few accesses on) then finds set."""
    import random
    rnd = random.Random(seed)
    pages = [BATCH_4K[rnd.randrange(len(BATCH_4K))] for _ in range(6)]
    gpas = array("Q", [rnd.choice(pages) | rnd.randrange(0x1000) for _ in range(n)])
    accs = bytes(rnd.choice([ACC_R, ACC_W]) for _ in range(n))
    table_mods = [(k, level, "noA") for k, level in table_noA]

    def run(eng, mem):
        _batch_tree(eng, mem)
        _modify(mem, leaf_mods, table_mods)
        out = array("Q", [1] * n)
        return eng.walk_batch(BATCH_ROOT, gpas, accs, out, set_ad), list(out)
    (k, miss), out = _run_both(DIFF_MEM, run)
    if all(m != "ro_noD" for _, m in leaf_mods):     # else a write may fault
        assert (k, miss) == (n, None)


@needs_both
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 32), n=st.integers(24, 200) | st.integers(1, 30),
       where=st.sampled_from(["gpas_in_mem", "gpas_over_tables", "out_over_tables",
                              "out_over_pd", "out_in_place", "out_shifted",
                              "out_over_accesses", "accs_in_mem"]),
       shift=st.integers(-3, 3),
       leaf_mods=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(_AD_MODS)),
                          max_size=20),
       set_ad=st.booleans())
def test_differential_batch_aliased_buffers(seed, n, where, shift, leaf_mods, set_ad):
    """gpas, accesses and out_hpas inside host memory (even over the tables
    being walked, so that a walk's A/D update or store changes a later walk's
    input or tables) or overlapping one another: the C batch must still
    behave as the walks done one by one, in order."""
    gpas0, accs0 = _batch_inputs(seed, n, 2, [])
    scratch = 0x30_0000                       # unused host memory

    def run(eng, mem):
        _batch_tree(eng, mem)
        _modify(mem, leaf_mods, [])
        mv = memoryview(mem)
        gpas, accs, out = array("Q", gpas0), accs0, array("Q", [3] * n)
        pt = _entry_hpa(mem, 0, 1)                # the PT of GPAs 0..0x27000
        if where == "gpas_in_mem":
            struct.pack_into("<%dQ" % n, mem, scratch, *gpas0)
            gpas = mv[scratch:scratch + 8 * n].cast("Q")
        elif where == "gpas_over_tables" and n >= 24:
            # the last 8 gpas are that PT's first 8 entries (without A: as
            # GPAs, offsets 0x47 in the pages at 0x20_0000); the walks just
            # before them, of those pages, set A: the GPAs change to +0x20
            m = n - 8
            g = list(gpas0[:m])
            for i in range(max(0, m - 20), m):
                g[i] = 0x1000 * ((m - i + shift) % 8) + 0x40
            for j in range(8):
                e = struct.unpack_from("<Q", mem, pt + 8 * j)[0] & ~A
                struct.pack_into("<Q", mem, pt + 8 * j, e)
            struct.pack_into("<%dQ" % m, mem, pt - 8 * m, *g)   # the PD's unused tail
            gpas = mv[pt - 8 * m:pt + 64].cast("Q")
        elif where == "out_over_tables":
            # out[i] lands on the entry of page i+shift+3, the page that walk
            # i+5 reads (a valid leaf: offsets 0x67 = P|W|U|A|D)
            gpas = array("Q", [0x1000 * ((i - 2 + shift) % 40) + 0x67 for i in range(n)])
            out = mv[pt + 8 * (shift + 3):pt + 8 * (shift + 3 + n)].cast("Q")
        elif where == "out_over_pd":
            # out[0] replaces the PD entry over the pages at 0x20_0000 (with
            # 0x200067: a "table" at the zeroed data frame 0x200000), so the
            # walks of those pages after it miss
            pd = _entry_hpa(mem, 0, 2)
            gpas = array("Q", [0x067] + [0x20_0000 + 0x1000 * ((i + shift) % 12) + 0x18
                                         for i in range(1, n)])
            out = mv[pd + 8:pd + 8 + 8 * n].cast("Q")
        elif where == "out_in_place":
            out = gpas
        elif where == "out_shifted":
            both = array("Q", list(gpas0) + [0] * 8)
            gpas = memoryview(both)[4:4 + n]
            out = memoryview(both)[4 + shift:4 + shift + n]
        elif where == "out_over_accesses":
            # out[1], out[2] land (low byte first) on accs[8], accs[16]: a
            # read becomes a write (offsets 0x001), which sets D
            both = bytearray(8 * n + 64)
            accs = memoryview(both)[:n]
            out = memoryview(both)[:8 * n].cast("Q")
            gpas = array("Q", [(g & ~0xFFF) | 0x001 for g in gpas0])
            for k in range(len(BATCH_4K)):
                _modify(mem, [(k, "noD")], [])
        else:
            mem[scratch:scratch + n] = accs0
            accs = mv[scratch:scratch + n]
        try:
            r = eng.walk_batch(BATCH_ROOT, gpas, accs, out, set_ad)
        except Exception as exc:
            r = ("raised", type(exc).__name__)
        res = (r, list(out), list(gpas), bytes(accs))
        for v in (gpas, accs, out):
            if isinstance(v, memoryview):
                v.release()
        mv.release()
        return res
    _run_both(DIFF_MEM, run)


@needs_both
def test_batch_dense_table_matches_python():
    """A bench-like dense table (2048 PTs: beyond L1/L2), random GPAs, some
    leaves without A/D: C and Python agree on long batches."""
    import random
    rnd = random.Random(5)
    size = 16 << 20
    npages = 1 << 20                      # 4 GiB mapped
    n_pt = npages // 512

    def run(eng, mem):
        pml4, pdpt, pd0, pt0 = 0x1000, 0x2000, 0x3000, 0x10_0000
        struct.pack_into("<Q", mem, pml4, pdpt | P | W | U | A)
        for i in range(4):
            struct.pack_into("<Q", mem, pdpt + 8 * i, (pd0 + 0x1000 * i) | P | W | U | A)
        for j in range(n_pt):
            struct.pack_into("<Q", mem, pd0 + 8 * j, (pt0 + 0x1000 * j) | P | W | U | A)
        leaf = array("Q", [(0x80_0000 + 0x1000 * (i % 1024)) | LEAF | A | D
                           for i in range(512)])
        for j in range(n_pt):
            mem[pt0 + 0x1000 * j:pt0 + 0x1000 * (j + 1)] = leaf.tobytes()
        r2 = random.Random(9)
        for _ in range(300):                      # some leaves without A or D
            h = pt0 + 8 * r2.randrange(npages)
            struct.pack_into("<Q", mem, h, struct.unpack_from("<Q", mem, h)[0]
                             & ~r2.choice([A, D, A | D]))
        res = []
        for set_ad in (True, False, True):
            g = array("Q", [r2.randrange(npages << 12) for _ in range(5000)])
            a = bytes(r2.randrange(2) for _ in range(5000))
            out = array("Q", bytes(8 * 5000))
            res.append((eng.walk_batch(0x1000, g, a, out, set_ad), list(out)))
        return res
    res = _run_both(size, run)
    assert all(r[0] == (5000, None) for r in res)
    del rnd
