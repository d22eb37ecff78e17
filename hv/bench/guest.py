"""KVM's in-kernel demand fault, guest speed under hv boot against plain
Unicorn, and the first-touch NPF cost of a guest writing each page once.

Like with like:
- guest speed: hv boot of `compute`, `memtouch` and `firsttouch` against
  plain Unicorn running the same image with UC_TLB_VIRTUAL and an identity
  TLB fill that grants each access kind's permissions only, as hv's fill does
  (write after a write miss, execute after a fetch miss), in C as hv's fill
  is (csrc/vcpu.c identity_fill: neither side pays a Python call per fill),
  and counting instructions with the same C block hook hv boot runs
  (hv.machine.unicorn_hooks.BlockCounter). Same RAM size, so the same pages
  are allocated by the host kernel on both sides. The ratio isolates the NPT
  walk and the PSP. The headline is the worse of compute and memtouch;
  firsttouch (nothing but first touches) is reported beside it. Beside them:
  the same baseline without instruction counting, and the old all-RWX flat
  baseline (every store then goes through Unicorn's self-modifying-code
  check).
- first touch: the `firsttouch` guest writes one byte to each page of its RAM
  once; every page is an NPF through the PSP, a host page allocated by the
  kernel at the guest's write, and the write itself. KVM's figure is the same
  work in the kernel: a guest writing one byte per page of a fresh memslot.
"""
import os
import sys

from hv.bench.common import MiB, PAGE, gc_off


def bench_kvm(p, log):
    from hv.machine import kvm
    try:
        f = kvm.bench_faults(p["kvm_pages"])
        if f is None:
            return {"skipped": "/dev/kvm absent or not usable", "kvm_fault_us": None}
        for _ in range(p.get("repeat", 1) - 1):     # best of `repeat`, as for our NPF
            f2 = kvm.bench_faults(p["kvm_pages"])
            if f2 is not None and f2["fault_us"] < f["fault_us"]:
                f = f2
        fh = kvm.bench_faults(p["kvm_pages"], huge=True)
        e = kvm.bench_exits(p["kvm_exits"])
    except kvm.KvmError as exc:
        return {"skipped": str(exc), "kvm_fault_us": None}
    log(f"kvm: demand fault {f['fault_us']:.2f} us/page (THP {fh['fault_us']:.2f}), "
        f"exit round trip {e['exit_us']:.2f} us")
    return {"kvm_fault_us": f["fault_us"], "kvm_touch_us": f["touch_us"],
            "kvm_fault_thp_us": fh["fault_us"], "kvm_exit_us": e["exit_us"],
            "pages": f["npages"], "exits": e["nexits"]}


def _guest_images():
    try:
        import guests.build as gb
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if root not in sys.path:
            sys.path.insert(0, root)
        import guests.build as gb
    return gb.build_all()


def _boot(image, mem, fault_around=1, huge=False, max_insns=None, **vmm_kw):
    """vmm_kw: Vmm options (hv compare: protect, integrity, psp)."""
    from hv.machine.boot import Boot
    from hv.vmm.vmm import Vmm
    vmm = Vmm(host_mem=max(256 * MiB, 2 * mem + 64 * MiB), **vmm_kw)
    try:
        b = Boot(vmm, image, mem=mem)
        b.vm.fault_around, b.vm.huge = fault_around, huge
        with gc_off():
            r = b.run(max_insns=max_insns)
        b.close()
    finally:
        vmm.close()
    if r.exit_reason not in ("exit_port", "hlt", "insn_limit") or r.exit_code not in (0, None, 1):
        raise RuntimeError(f"guest {image} ended with {r.exit_reason}: {r.reason}")
    return r


def _fill_hook():
    """The baseline's identity fill: in C where hv boot's own fill is (hv
    boot's default hook), else in Python as hv boot's is then."""
    from hv.machine.unicorn_hooks import available_hooks
    return available_hooks()[0]


def _speed(image, mem, reps, limit):
    """Best-of-`reps` seconds of hv boot, of hv boot --protect none (the same
    VMM and vCPU, the NPF path in C too, but no PSP: the VMM writes the leaf
    itself) and of the three plain-Unicorn runs."""
    from guests.flat_runner import run_flat_unicorn
    best = {}
    r = None
    for _ in range(reps):
        r = _boot(image, mem, max_insns=limit)
        runs = {"hv": r.elapsed_s}
        rn = _boot(image, mem, max_insns=limit, protect="none")
        if rn.npf != r.npf or rn.instructions != r.instructions:
            raise RuntimeError(f"hv boot --protect none of {image} took {rn.npf} NPFs over "
                               f"{rn.instructions} instructions, digest {r.npf} over "
                               f"{r.instructions}: not the same run")
        runs["hv_none"] = rn.elapsed_s
        budget = r.instructions if limit else 0
        fill = _fill_hook()
        for key, kw in (("unicorn", dict(tlb="per_access", block_count=True, fill=fill)),
                        ("unicorn_nocount", dict(tlb="per_access", fill=fill)),
                        ("unicorn_flat", dict(tlb="flat"))):
            with gc_off():
                f = run_flat_unicorn(image, mem, max_insns=budget, count_insns=False, **kw)
            if f.reason not in ("exit", "hlt", "budget"):
                raise RuntimeError(f"plain Unicorn ({key}) run of {image} ended with {f.reason}: "
                                   f"{f.detail}")
            runs[key] = f.seconds
        for k, v in runs.items():
            best[k] = v if k not in best else min(best[k], v)
    return r, best


def bench_guest(p, log):
    imgs = _guest_images()
    reps = p.get("repeat", 1)
    out = {}
    # guest speed, compute-bound and fault-bound
    ft_mem = p["kvm_pages"] * PAGE + 2 * MiB        # as many pages as KVM's touch guest
    for name, image, mem, limit in (("compute", imgs["compute"], 16 * MiB, p["guest_insns"]),
                                    ("memtouch", imgs["memtouch"], ft_mem, None),
                                    ("firsttouch", imgs["firsttouch"], ft_mem, None)):
        r, best = _speed(str(image), mem, reps, limit)
        out[f"speed_{name}"] = {
            "instructions": r.instructions, "npf": r.npf,
            "hv_s": best["hv"], "hv_none_s": best["hv_none"], "unicorn_s": best["unicorn"],
            "unicorn_nocount_s": best["unicorn_nocount"], "unicorn_flat_s": best["unicorn_flat"],
            "hv_insns_per_s": r.instructions / best["hv"],
            "vs_unicorn": best["unicorn"] / best["hv"],
            "none_vs_unicorn": best["unicorn"] / best["hv_none"],
            "vs_unicorn_nocount": best["unicorn_nocount"] / best["hv"],
            "vs_unicorn_flat": best["unicorn_flat"] / best["hv"]}
        s = out[f"speed_{name}"]
        if name != "compute":   # fault-bound: what each NPF costs hv beyond the baseline,
            s["extra_us_per_npf"] = (best["hv"] - best["unicorn"]) * 1e6 / r.npf
            # and of that, what the PSP's UPDATE_NPT costs (digest - none)
            s["psp_us_per_npf"] = (best["hv"] - best["hv_none"]) * 1e6 / r.npf
        log(f"guest {name}: {r.instructions} insns, hv boot {best['hv'] * 1e3:.1f} ms, plain "
            f"Unicorn (per-access fill, counted) {best['unicorn'] * 1e3:.1f} ms: "
            f"{s['vs_unicorn']:.2f}x; --protect none {s['none_vs_unicorn']:.2f}x; uncounted "
            f"{s['vs_unicorn_nocount']:.2f}x; flat RWX {s['vs_unicorn_flat']:.2f}x")
    out["guest_speed_vs_unicorn"] = min(out["speed_compute"]["vs_unicorn"],
                                        out["speed_memtouch"]["vs_unicorn"])
    out["guest_speed_vs_unicorn_none"] = min(out["speed_compute"]["none_vs_unicorn"],
                                             out["speed_memtouch"]["none_vs_unicorn"])
    out["unicorn_fill"] = _fill_hook()
    out["line_hash_ns"] = line_hash_ns()
    out["guest_speed_vs_unicorn_flat"] = out["speed_compute"]["vs_unicorn_flat"]
    # first touch: every page an NPF through the PSP, host allocation and the write included
    for name, fa, huge in (("4k", 1, False), ("fa16", 16, False), ("2m", 1, True)):
        best = first_touch(str(imgs["firsttouch"]), ft_mem, reps, fault_around=fa, huge=huge)
        out[f"first_touch_{name}"] = best
        log(f"first touch {name:>4}: {best['pages']} pages, {best['npf']} NPFs, "
            f"{best['us_per_page']:.2f} us/page")
    out["npf_first_touch_us"] = out["first_touch_4k"]["us_per_page"]
    return out


def line_hash_ns(n=4000):
    """ns per line hash (SHA-256 of "L" and one 64-byte line of entries, the
    C core's psp_line_hash), timed inside C: psp_lines_hash hashes the 64
    lines of a page in one call. An UPDATE_NPT of a 4 KiB page in an existing
    leaf table hashes five (it checks the four lines its walk reads and
    re-hashes the leaf line it wrote). None without the C core."""
    import time
    try:
        from psp_firmware._psp_core_c import ffi, lib
    except ImportError:
        return None
    page, out = ffi.new("char[4096]"), ffi.new("char[2048]")
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            lib.psp_lines_hash(page, out)
        dt = (time.perf_counter() - t0) / (64 * n)
        best = dt if best is None else min(best, dt)
    return best * 1e9


def first_touch(image, mem, reps=1, fault_around=1, huge=False, **vmm_kw):
    """The best of `reps` runs of the firsttouch guest (`image`, RAM `mem`):
    npf_first_touch_us is its us_per_page. vmm_kw: Vmm options (hv compare
    measures every protection design with it)."""
    best = None
    for _ in range(reps):
        r = _boot(image, mem, fault_around=fault_around, huge=huge, **vmm_kw)
        touched = max(1, int(r.serial.split()[1]))
        cur = {"npf": r.npf, "pages": touched, "elapsed_s": r.elapsed_s,
               "us_per_fault": r.elapsed_s * 1e6 / max(1, r.npf),
               "us_per_page": r.elapsed_s * 1e6 / touched}
        if best is None or cur["elapsed_s"] < best["elapsed_s"]:
            best = cur
    return best
