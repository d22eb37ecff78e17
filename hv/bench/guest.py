"""KVM's in-kernel demand fault, and guest speed under hv boot vs plain Unicorn."""
import os
import sys
from hv.bench.common import MiB, PAGE


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


# ---------------------------------------------------------------------------
# guest speed and memtouch NPF (hv.boot)
def bench_guest(p, log):
    try:
        from hv.machine import boot as bootmod
    except ImportError as exc:
        return {"skipped": f"hv.boot not available ({exc})"}
    try:
        return _bench_guest(p, log, bootmod)
    except Exception as exc:        # boot is another component: report, do not fail
        return {"skipped": f"hv.boot failed: {exc.__class__.__name__}: {exc}"}


def _guest_images():
    try:
        import guests.build as gb
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if root not in sys.path:
            sys.path.insert(0, root)
        import guests.build as gb
    return gb.build_all()


def _bench_guest(p, log, bootmod):
    from guests.flat_runner import run_flat_unicorn
    from hv.vmm.vmm import Vmm
    imgs = _guest_images()
    out = {}
    compute = str(imgs["compute"])
    mem = 16 * MiB
    limit = p["guest_insns"]
    reps = 1 if limit else 2
    best_hv = best_flat = None
    insns = None
    for _ in range(reps):
        vmm = Vmm(host_mem=256 * MiB)
        try:
            b = bootmod.Boot(vmm, compute, mem=mem)
            r = b.run(max_insns=limit)
            b.close()
        finally:
            vmm.close()
        if r.exit_reason not in ("exit_port", "hlt", "insn_limit"):
            raise RuntimeError(f"compute guest ended with {r.exit_reason}: {r.reason}")
        insns = r.instructions
        best_hv = r.elapsed_s if best_hv is None else min(best_hv, r.elapsed_s)
        f = run_flat_unicorn(compute, mem, max_insns=insns if limit else 0, count_insns=False)
        best_flat = f.seconds if best_flat is None else min(best_flat, f.seconds)
    out.update({"compute_insns": insns, "hv_boot_s": best_hv, "unicorn_flat_s": best_flat,
                "hv_insns_per_s": insns / best_hv, "unicorn_insns_per_s": insns / best_flat,
                "guest_speed_vs_unicorn": best_flat / best_hv})
    log(f"guest: compute {insns} insns, hv boot {insns / best_hv / 1e6:.1f} M insn/s, plain "
        f"Unicorn {insns / best_flat / 1e6:.1f} M insn/s ({best_flat / best_hv:.2f}x)")
    memtouch = str(imgs["memtouch"])
    mt_mem = p["memtouch_pages"] * PAGE + 2 * MiB
    for name, fa, huge in (("4k", 1, False), ("fa16", 16, False), ("2m", 1, True)):
        vmm = Vmm(host_mem=max(256 * MiB, 2 * mt_mem + 64 * MiB))
        try:
            b = bootmod.Boot(vmm, memtouch, mem=mt_mem)
            b.vm.fault_around, b.vm.huge = fa, huge
            r = b.run()
            b.close()
        finally:
            vmm.close()
        if r.exit_reason not in ("exit_port", "hlt"):
            raise RuntimeError(f"memtouch guest ended with {r.exit_reason}: {r.reason}")
        touched = max(1, r.pages_mapped - r.launch_pages)
        out[f"memtouch_{name}"] = {"npf": r.npf, "pages": touched, "elapsed_s": r.elapsed_s,
                                   "us_per_fault": r.elapsed_s * 1e6 / max(1, r.npf),
                                   "us_per_page": r.elapsed_s * 1e6 / touched}
        log(f"memtouch {name:>4}: {r.npf} NPFs, {out[f'memtouch_{name}']['us_per_fault']:.1f} "
            f"us/fault, {out[f'memtouch_{name}']['us_per_page']:.2f} us/page")
    out["memtouch_npf_us_4k"] = out["memtouch_4k"]["us_per_fault"]
    return out
