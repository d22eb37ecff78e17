"""Shared by the benchmark sections: units, profiles, timing helpers."""
import gc
import time
from contextlib import contextmanager


MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
HUGE = 2 * MiB

# flags of a dense table built for the walk benchmark: present, writable,
# user, accessed, dirty (so that steady-state walks write nothing)
_P, _W, _U, _A, _D = 1, 2, 4, 0x20, 0x40
_NONLEAF = _P | _W | _U | _A
_LEAF = _P | _W | _U | _A | _D


def _fmt_size(n):
    return f"{n // GiB} GiB" if n >= GiB else f"{n // MiB} MiB"


@contextmanager
def gc_off():
    """Python's cyclic GC off for a timed run (collected just before), as
    timeit does: a collection walks every object the process holds (an
    earlier section's tables, the PSP model), and it lands on whichever side
    of a ratio happens to allocate when it falls due."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _best(fn, reps=3):
    best = None
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = dt if best is None or dt < best else best
    return best


# ---------------------------------------------------------------------------
# profiles
PROFILES = {
    "full": dict(
        walk_sizes=[16 * MiB, 64 * MiB, 256 * MiB, GiB, 4 * GiB, 16 * GiB],
        walk_n=1_000_000, walk_single=200_000, walk_py=50_000,
        integ_sizes=[16 * MiB, 64 * MiB, 256 * MiB, GiB, 4 * GiB, 16 * GiB],
        integ_updates=300, integ_full_budget_s=2.0, integ_checks=3,
        npf_pages=32768, replay_accesses=4_000_000, kvm_pages=65536, kvm_exits=50_000,
        guest_insns=None, memtouch_pages=16384, rss=True, valgrind=True,
        psp_n=20_000, psp_batch=256, psp_rounds=16, repeat=3),
    "quick": dict(
        walk_sizes=[16 * MiB, 256 * MiB, 4 * GiB, 16 * GiB],
        walk_n=300_000, walk_single=50_000, walk_py=10_000,
        integ_sizes=[16 * MiB, 256 * MiB, 4 * GiB, 16 * GiB],
        integ_updates=100, integ_full_budget_s=0.6, integ_checks=1,
        npf_pages=8192, replay_accesses=1_500_000, kvm_pages=16384, kvm_exits=10_000,
        guest_insns=None, memtouch_pages=4096, rss=True, valgrind=False,
        psp_n=3000, psp_batch=256, psp_rounds=4, repeat=2),
    "tiny": dict(      # for the test suite: every figure, small sizes
        walk_sizes=[16 * MiB, 64 * MiB],
        walk_n=20_000, walk_single=5_000, walk_py=1_000,
        integ_sizes=[16 * MiB, 64 * MiB],
        integ_updates=20, integ_full_budget_s=0.1, integ_checks=1,
        npf_pages=512, replay_accesses=60_000, kvm_pages=1024, kvm_exits=1_000,
        guest_insns=1_000_000, memtouch_pages=256, rss=False, valgrind=False,
        psp_n=300, psp_batch=32, psp_rounds=2, repeat=1,
        kvm_guest=False),    # compute on KVM takes seconds here (kvm_pvm emulates CPL0 code)
}
