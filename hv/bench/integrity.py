"""µs per UPDATE_NPT and per full check, full vs merkle, as the mapped span grows."""
import random
import time
from hv.bench.common import HUGE, MiB, PAGE, _best, _fmt_size


def _swap_integrity(vmm, vm, mode):
    """Give the guest a fresh integrity object of `mode` over the same table
    (the benchmark builds large tables once, in merkle mode, then measures
    each mode on them; building them in full mode would take quadratic time)."""
    vmm._psp_obj._switch_integrity(vm.handle, mode)


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
                # UPDATE_NPT: a new 4 KiB page in an existing PT (no new tables)
                times = []
                budget = p["integ_full_budget_s"] if mode == "full" else 1e9
                spent = 0.0
                # untimed warm-up updates first: the first ones after a mode
                # switch or a table build pay for cold caches and first
                # touches of PSP pages, which is not what grows with the table
                warm = 20 if mode == "merkle" else 1
                # merkle: `repeat` rounds, each separated by a full check (so a
                # slow spell of a shared machine spoils one round, not all);
                # the figure is the lowest round median
                rounds = p.get("repeat", 1) if mode == "merkle" else 1
                per_round = max(3, p["integ_updates"] // rounds)
                medians = []
                while len(times) < p["integ_updates"] + warm and \
                        (spent < budget or len(times) < 3 + warm):
                    while True:
                        gpa = rnd.randrange(blocks) * HUGE + rnd.randrange(1, 512) * PAGE
                        if gpa not in used:
                            used.add(gpa)
                            break
                    hpa = vmm.alloc.alloc(1)
                    t0 = time.perf_counter()
                    r = vmm.psp.update_npt(vm.handle, gpa, hpa)
                    dt = time.perf_counter() - t0
                    if not r.ok:
                        raise RuntimeError(f"UPDATE_NPT refused in the benchmark: {r.name}")
                    times.append(dt)
                    spent += dt
                    if len(times) > warm and (len(times) - warm) % per_round == 0:
                        r = sorted(times[-per_round:])
                        medians.append(r[len(r) // 2])
                        if mode == "merkle":
                            vmm.psp.verify(vm.handle)
                times = sorted(times[warm:])
                upd = min(medians) if medians else times[len(times) // 2]
                chk = _best(lambda: vmm.psp.verify(vm.handle), p["integ_checks"])
                rows[mode].append({"mapped": size, "table_pages": npt_pages,
                                   "update_us": upd * 1e6, "check_us": chk * 1e6,
                                   "updates_timed": len(times)})
                log(f"integrity {mode:>6} {_fmt_size(size):>7} ({npt_pages} table pages): "
                    f"UPDATE_NPT {upd * 1e6:.1f} us, check {chk * 1e3:.2f} ms")
            _swap_integrity(vmm, vm, "merkle")
    finally:
        vmm.close()

    def growth(mode):
        r = rows[mode]
        return r[-1]["update_us"] / r[0]["update_us"]
    return {"rows": rows, "merkle_update_growth": growth("merkle"),
            "full_update_growth": growth("full"),
            "mapped_growth": largest / sizes[0]}
