"""µs per UPDATE_NPT and per full check, full vs merkle, as the mapped span grows.

What is timed: the firmware's own work on one UPDATE_NPT of a fresh 4 KiB page
at a random GPA over the mapped range (in an existing page table: no new
tables). merkle: the C update alone (psp_mailbox_update, the entry the
mailbox calls), with the deferred hash-tree work paid inside the timing: the
integrity object's flush (what GUEST_STATUS, VERIFY and the periodic check
start with: every stale chunk, node and the root brought up to date) after
every update (update_us: no update shares its tree work with another, so
the figure shows what grows with the table), and, beside it, once per round
of updates (update_batched_us: updates that share ancestors share their
re-hashing, which favours small tables). full: the firmware's mailbox entry
(Psp.mailbox; the C fast path declines full-mode guests, so this is the
Python handler over the C helpers, re-hashing the whole table first). No VMM,
no client, no transport in either. The full check (VERIFY: every table page
re-hashed from host memory) is timed apart, as check_us.
"""
import random
import time

from hv.bench.common import HUGE, MiB, PAGE, _best, _fmt_size, gc_off


def _swap_integrity(vmm, vm, mode):
    """Give the guest a fresh integrity object of `mode` over the same table
    (the benchmark builds large tables once, in merkle mode, then measures
    each mode on them; building them in full mode would take quadratic time)."""
    vmm._psp_obj._switch_integrity(vm.handle, mode)


def _update_buffers(vmm, vm, rnd, used, blocks, n):
    """n UPDATE_NPT command buffers, each a fresh frame at a random unused GPA
    (4 KiB, one per 2 MiB block already has a page table)."""
    from psp_firmware.commands import ATTR_RWX, Cmd, encode
    bufs = []
    for _ in range(n):
        while True:
            gpa = rnd.randrange(blocks) * HUGE + rnd.randrange(1, 512) * PAGE
            if gpa not in used:
                used.add(gpa)
                break
        bufs.append(encode(Cmd.UPDATE_NPT, handle=vm.handle, level=1, gpa=gpa,
                           hpa=vmm.alloc.alloc(1), attrs=ATTR_RWX, npages=1))
    return bufs


def _time_round(vmm, vm, mode, bufs, flush_every=None):
    """Seconds per update of one round. merkle: the C update, and the
    deferred tree work (the integrity object's flush, which GUEST_STATUS,
    VERIFY and the periodic check start with) after every `flush_every`
    updates and at the end, all inside the timing; flush_every 0: the C
    update alone (the tree work is done after the timing)."""
    from psp_firmware.commands import Cmd
    psp = vmm._psp_obj
    # as timeit does: the cyclic GC walking the PSP model's Python objects is
    # a cost of the model, not of the design
    with gc_off():
        return _timed(psp, vm, mode, bufs, flush_every, time.perf_counter, Cmd)


def _timed(psp, vm, mode, bufs, flush_every, clock, Cmd):
    if mode == "merkle":
        c, ctx = psp._c, psp._ctx
        integ = psp._guests[vm.handle].integrity
        every = flush_every or len(bufs)
        t0 = clock()
        for i, b in enumerate(bufs, 1):
            done = c.psp_mailbox_update(ctx, b)
            if done != 1:
                raise RuntimeError(f"the C UPDATE_NPT declined a benchmark update ({done})")
            if flush_every != 0 and i % every == 0:
                integ.digest                            # the deferred tree work
        if flush_every != 0:
            integ.digest
        dt = clock() - t0
        integ.digest                 # flush_every 0: the C update alone; the tree work after
    else:
        cmd = int(Cmd.UPDATE_NPT)
        mailbox = psp.mailbox
        t0 = clock()
        for b in bufs:
            st, _ = mailbox(cmd, b)
            if st != 0:
                raise RuntimeError(f"UPDATE_NPT refused in the benchmark: status {st}")
        dt = clock() - t0
    return dt / len(bufs)


def bench_integrity(p, log):
    from hv.vmm.vmm import Vmm
    sizes = p["integ_sizes"]
    largest = sizes[-1]
    host = max(256 * MiB, 4 * (largest // HUGE) * PAGE + 128 * MiB)
    vmm = Vmm(host_mem=host, integrity="merkle")
    rows = {"full": [], "merkle": []}
    try:
        vm = vmm.create_vm()
        built = 0
        rnd = random.Random(2)
        used = set()
        for size in sizes:
            for b in range(built // HUGE, size // HUGE):       # one page per 2 MiB block
                vmm.handle_npf(vm, b * HUGE)
            built = size
            blocks = size // HUGE
            npt_pages = vmm.psp.guest_status(vm.handle).table_pages
            for mode in ("merkle", "full"):
                _swap_integrity(vmm, vm, mode)
                vmm.psp.guest_status(vm.handle)        # nothing stale before the first round
                # merkle: `repeat` rounds plus an untimed warm-up round (cold
                # caches, first touches of PSP pages: not what grows with the
                # table); the figure is the lowest round. full: rounds until
                # the time budget is spent (each update re-hashes the table)
                n = p["integ_updates"]
                if mode == "merkle":
                    rounds, per_round = p.get("repeat", 1) + 1, max(10, n // max(1, p.get("repeat", 1)))
                else:
                    rounds, per_round = 1, max(3, min(n, int(p["integ_full_budget_s"] * 1e6 /
                                                              max(1, 20 * npt_pages))))
                per, batched, c_only = [], [], []
                for i in range(rounds):
                    bufs = _update_buffers(vmm, vm, rnd, used, blocks, per_round)
                    t = _time_round(vmm, vm, mode, bufs, flush_every=1)
                    if mode == "full" or i > 0:
                        per.append(t)
                    if mode == "merkle":
                        bufs = _update_buffers(vmm, vm, rnd, used, blocks, per_round)
                        t = _time_round(vmm, vm, mode, bufs)
                        if i > 0:
                            batched.append(t)
                        bufs = _update_buffers(vmm, vm, rnd, used, blocks, per_round)
                        t = _time_round(vmm, vm, mode, bufs, flush_every=0)
                        if i > 0:
                            c_only.append(t)
                upd = min(per)
                chk = _best(lambda: vmm.psp.verify(vm.handle), p["integ_checks"])
                rows[mode].append({"mapped": size, "table_pages": npt_pages,
                                   "update_us": upd * 1e6, "check_us": chk * 1e6,
                                   "updates_timed": per_round * len(per)})
                if batched:
                    rows[mode][-1]["update_batched_us"] = min(batched) * 1e6
                    rows[mode][-1]["update_c_only_us"] = min(c_only) * 1e6
                log(f"integrity {mode:>6} {_fmt_size(size):>7} ({npt_pages} table pages): "
                    f"UPDATE_NPT {upd * 1e6:.2f} us, check {chk * 1e3:.2f} ms")
            _swap_integrity(vmm, vm, "merkle")
    finally:
        vmm.close()

    def growth(mode):
        r = rows[mode]
        return r[-1]["update_us"] / r[0]["update_us"]
    m = rows["merkle"]
    return {"rows": rows, "merkle_update_growth": growth("merkle"),
            "merkle_update_growth_batched": m[-1]["update_batched_us"] / m[0]["update_batched_us"],
            "merkle_c_update_growth": m[-1]["update_c_only_us"] / m[0]["update_c_only_us"],
            "full_update_growth": growth("full"),
            "mapped_growth": largest / sizes[0]}
