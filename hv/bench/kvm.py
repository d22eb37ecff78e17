"""Guests on KVM: the NPF through the PSP against KVM's own demand fault, on
the same guest in the same run, and guest speed on KVM against the emulator.

- bench_kvm_npf: the firsttouch guest (one write to every page of its RAM,
  once) booted twice on /dev/kvm with the same RAM size:
  * through hv (`hv boot --accel kvm`): every first touch exits to the VMM,
    which asks the PSP (UPDATE_NPT) and maps the frame the table names into
    the memslot -- kvm_psp_npf_us = run time / NPFs;
  * flat: all RAM one anonymous memslot, image copied in, nothing else --
    every first touch is KVM's in-kernel demand fault (no exit):
    kvm_fault_us_same_guest = run time / pages touched (the headline
    kvm_fault_us is the hand-assembled touch loop of hv/machine/kvm.py).
  Both runs include the same guest work (its loop, one line of serial
  output), so the difference is the NPF path.  Fault-around 16 and 2 MiB pages through
  hv beside them (µs per page).
- bench_kvm_guest: the compute guest under `hv boot` on KVM and on the
  emulator: kvm_guest_speedup = emulator time / KVM time.

Both return {"skipped": why} where /dev/kvm is not usable.  Nothing logs
inside a timed section.
"""
import mmap
import time

from hv.bench.common import MiB, PAGE


def _kvm_why():
    from hv.machine.kvm import probe
    return probe()


def _images():
    from hv.bench.guest import _guest_images
    return _guest_images()


def _boot(path, mem, accel, fa=1, huge=False):
    """One run of `path` through hv on `accel`: the BootResult."""
    from hv.machine.boot import Boot
    from hv.vmm.vmm import Vmm
    vmm = Vmm(host_mem=max(256 * MiB, 2 * mem + 64 * MiB), shared_mem=accel == "kvm")
    try:
        b = Boot(vmm, path, mem=mem, accel=accel)
        b.vm.fault_around, b.vm.huge = fa, huge
        r = b.run()
        b.close()
    finally:
        vmm.close()
    if r.exit_reason not in ("exit_port", "hlt") or r.exit_code:
        raise RuntimeError(f"{path} on {accel}: {r.exit_reason} ({r.reason})")
    return r


def run_flat_kvm(path, mem):
    """`path` on KVM with all RAM one anonymous memslot (no PSP, no table):
    returns (seconds, serial, exit code).  Every page the guest touches
    beyond its image is an in-kernel demand fault."""
    from hv.machine import kvm as K
    from hv.machine.devices import Devices
    from hv.machine.kvm_vcpu import set_boot_state
    from hv.machine.loader import load_image
    image = load_image(path, mem)
    dev = Devices()
    with K.KvmVm() as vm:
        ram = mmap.mmap(-1, mem, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                        | getattr(mmap, "MAP_NORESERVE", 0))
        vm._maps.append(ram)
        try:
            ram.madvise(K.MADV_NOHUGEPAGE)
        except (OSError, AttributeError, ValueError):
            pass
        for gpa, data in image.initial_pages():
            ram[gpa:gpa + len(data)] = data
        vm.add_slot(0, mem, K._addr(ram))
        cpu = vm.create_vcpu()
        cpu.setup_cpuid()
        set_boot_state(cpu, image)
        t0 = time.perf_counter()
        while True:
            reason = cpu.run()
            if reason == K.KVM_EXIT_IO:
                direction, size, port, count, off = cpu.io()
                rm = cpu.run_map
                for i in range(count):
                    o = off + i * size
                    if direction == K.KVM_EXIT_IO_OUT:
                        if dev.port_out(port, size, int.from_bytes(rm[o:o + size], "little")):
                            return time.perf_counter() - t0, dev.serial.text(), dev.exit_code
                    else:
                        rm[o:o + size] = dev.port_in(port, size).to_bytes(size, "little")
            elif reason == K.KVM_EXIT_HLT:
                return time.perf_counter() - t0, dev.serial.text(), 0
            else:
                raise K.KvmError(f"flat KVM run of {path}: exit {K.EXIT_NAMES.get(reason, reason)}")


def bench_kvm_npf(p, log):
    """firsttouch on KVM through the PSP vs KVM's in-kernel fault, same RAM size."""
    why = _kvm_why()
    if why is not None:
        return {"skipped": f"KVM is not available: {why}", "kvm_psp_npf_us": None}
    path = str(_images()["firsttouch"])
    mem = p.get("kvm_touch_pages", p["memtouch_pages"]) * PAGE + 2 * MiB
    reps = max(1, p.get("repeat", 1))
    best, out = {}, {}
    for _ in range(reps):
        for name, fa, huge in (("4k", 1, False), ("fa16", 16, False), ("2m", 1, True)):
            r = _boot(path, mem, "kvm", fa, huge)
            if name not in best or r.elapsed_s < best[name].elapsed_s:
                best[name] = r
        s, serial, code = run_flat_kvm(path, mem)
        if code != 0 or not serial.startswith("firsttouch: "):
            raise RuntimeError(f"flat KVM firsttouch failed: {serial!r}")
        out["flat_s"] = s if "flat_s" not in out else min(out["flat_s"], s)
    r4 = best["4k"]
    touched = max(1, r4.npf)                    # 4 KiB, no fault-around: one NPF per page
    for name, r in best.items():
        pages = max(1, r.pages_mapped - r.launch_pages)
        out[f"kvm_{name}"] = {"npf": r.npf, "pages": pages, "exits": r.exits,
                              "elapsed_s": r.elapsed_s,
                              "us_per_fault": r.elapsed_s * 1e6 / max(1, r.npf),
                              "us_per_page": r.elapsed_s * 1e6 / pages}
    out.update({
        "mem": mem, "pages": touched,
        "kvm_psp_npf_us": out["kvm_4k"]["us_per_fault"],
        "kvm_fault_us_same_guest": out["flat_s"] * 1e6 / touched,
        "kvm_psp_npf_fa16_us_per_page": out["kvm_fa16"]["us_per_page"],
        "kvm_psp_npf_2m_us_per_page": out["kvm_2m"]["us_per_page"],
    })
    kf = out["kvm_fault_us_same_guest"]
    out["kvm_psp_npf_vs_kvm"] = out["kvm_psp_npf_us"] / kf
    out["kvm_fa16_vs_kvm"] = out["kvm_psp_npf_fa16_us_per_page"] / kf
    out["kvm_2m_vs_kvm"] = out["kvm_psp_npf_2m_us_per_page"] / kf
    log(f"kvm firsttouch {mem // MiB} MiB: {out['kvm_psp_npf_us']:.1f} us per NPF through the PSP, "
        f"{kf:.1f} us per in-kernel fault ({out['kvm_psp_npf_vs_kvm']:.2f}x); fault-around 16 "
        f"{out['kvm_psp_npf_fa16_us_per_page']:.1f}, 2 MiB {out['kvm_psp_npf_2m_us_per_page']:.2f}"
        f" us per page")
    return out


def bench_kvm_guest(p, log):
    """compute under hv boot on KVM vs on the emulator: kvm_guest_speedup."""
    if not p.get("kvm_guest", True):
        return {"skipped": "not in this profile", "kvm_guest_speedup": None}
    why = _kvm_why()
    if why is not None:
        return {"skipped": f"KVM is not available: {why}", "kvm_guest_speedup": None}
    path = str(_images()["compute"])
    mem = 16 * MiB
    t = {}
    for _ in range(max(1, p.get("repeat", 1))):
        for accel in ("unicorn", "kvm"):
            r = _boot(path, mem, accel)
            t[accel] = r.elapsed_s if accel not in t else min(t[accel], r.elapsed_s)
            if accel == "kvm":
                exits = r.exits
    out = {"emulator_s": t["unicorn"], "kvm_s": t["kvm"], "kvm_exits": exits,
           "kvm_guest_speedup": t["unicorn"] / t["kvm"]}
    log(f"kvm compute: {t['kvm']:.3f} s on KVM, {t['unicorn']:.3f} s on the emulator "
        f"({out['kvm_guest_speedup']:.2f}x)")
    return out


def bench_kvm_accel(p, log):
    """The section `kvm_accel` of hv bench: both of the above."""
    out = dict(bench_kvm_npf(p, log))
    g = bench_kvm_guest(p, log)
    out.update({k: v for k, v in g.items() if k != "skipped" or "skipped" not in out})
    return out
