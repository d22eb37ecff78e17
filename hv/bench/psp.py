"""PSP transports: empty-command round trip in-process and to the PSP process,
and per-command cost of a ring batch of UPDATE_NPT commands."""
import sys
import time

from psp_firmware import mailbox_layout as L


def bench_psp(p, log):
    r = bench_psp_figures(n=p["psp_n"], batch=p["psp_batch"], rounds=p["psp_rounds"])
    log(f"psp: round trip {r['psp_roundtrip_us_inprocess']:.1f} us in-process, "
        f"{r['psp_roundtrip_us_process']:.1f} us to the PSP process; "
        f"ring {r['psp_ring_us_per_cmd']:.1f} us per UPDATE_NPT on fresh frames, "
        f"{r['psp_ring_us_per_cmd_resident']:.1f} us on touched ones")
    return r


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def measure_roundtrip(kind, n=5000, batch=256, rounds=8, backend=None, integrity=None,
                      host_mem=256 << 20):
    """Time the mailbox of one transport kind ("process" or "inprocess").

    Returns a dict (all times in microseconds):
      roundtrip_us_median / _p99 / _mean: one empty command (NOP), `n` times;
      ring_us_per_cmd: median over `rounds` batches of `batch` UPDATE_NPT
        commands through call_batch (one doorbell each), each mapping a fresh
        4 KiB page, per command;
      ring_resident_us_per_cmd: the same, but the VMM has touched each frame
        before (a recycled frame holding old data, or memory the VMM keeps
        resident): no page allocation by the host kernel in the scrub;
      ring_nop_us_per_cmd: the same ring of NOPs;
      ring_nop_awake_us_per_cmd: a ring of NOPs sent right after another one,
        while the PSP process still spins on the mailbox (no wake-up: what a
        PSP that never sleeps, like the real chip, would cost per command);
      update_us_per_cmd: the same UPDATE_NPT commands one call() at a time.
    For "process" also the transport's own share (the total minus the time the
    PSP process spent inside its firmware handlers, which it reports in the
    mailbox's fw_ns word): roundtrip_transport_us_median / _p99,
    ring_transport_us_per_cmd, ring_nop_transport_us_per_cmd. For
    "inprocess" the firmware time is all of it; the transport adds nothing.
    """
    import statistics

    from psp_firmware.commands import ATTR_RWX, Cmd, encode
    from hv.vmm.vmm import Vmm
    vmm = Vmm(host_mem=host_mem, backend=backend, integrity=integrity, psp=kind)
    try:
        t = vmm.transport
        call = t.call
        clock = time.perf_counter_ns
        w64 = getattr(t, "_w64", None)

        def fw_ns():
            return w64[L.Q_FW_NS] if w64 is not None else 0

        def ring_fw_ns():      # all chunks of the last call_batch, not just the last one
            return t.last_fw_ns if w64 is not None else 0
        nop = int(Cmd.NOP)
        for _ in range(min(n, 500)):          # warm up (spin paths, caches)
            call(nop, b"")
        lat, tra = [], []
        for _ in range(n):
            t0 = clock()
            call(nop, b"")
            d = clock() - t0
            lat.append(d / 1000.0)
            tra.append((d - fw_ns()) / 1000.0)

        vm = vmm.create_vm()
        vmm._donate_pool(max(64, rounds * 2 * batch // 256 + 16))
        gpa = [0x1000_0000]

        def updates(resident=False):
            hpa = vmm.alloc.alloc(batch)
            if resident:
                buf = vmm.mem.buf
                for i in range(batch):
                    buf[hpa + i * 4096] = 0x5A     # old data: the PSP must scrub it
            cmds = []
            for i in range(batch):
                cmds.append((int(Cmd.UPDATE_NPT),
                             encode(Cmd.UPDATE_NPT, handle=vm.handle, level=1, gpa=gpa[0],
                                    hpa=hpa + i * 4096, attrs=ATTR_RWX, npages=1)))
                gpa[0] += 4096
            return cmds

        ring, ring_t, single, ring_nop, ring_nop_t = [], [], [], [], []
        ring_res, ring_res_t, ring_awake = [], [], []
        nops = [(nop, b"")] * batch
        for _ in range(rounds):
            cmds = updates()
            t0 = clock()
            out = t.call_batch(cmds)
            d = clock() - t0
            ring.append(d / 1000.0 / batch)
            ring_t.append((d - ring_fw_ns()) / 1000.0 / batch)
            if any(st != 0 for st, _ in out):
                raise RuntimeError(f"ring UPDATE_NPT refused: {sorted({st for st, _ in out})}")
            cmds = updates(resident=True)
            t0 = clock()
            out = t.call_batch(cmds)
            d = clock() - t0
            ring_res.append(d / 1000.0 / batch)
            ring_res_t.append((d - ring_fw_ns()) / 1000.0 / batch)
            if any(st != 0 for st, _ in out):
                raise RuntimeError(f"ring UPDATE_NPT refused: {sorted({st for st, _ in out})}")
            cmds = updates()
            t0 = clock()
            for c, b in cmds:
                call(c, b)
            single.append((clock() - t0) / 1000.0 / batch)
            t0 = clock()
            t.call_batch(nops)
            d = clock() - t0
            ring_nop.append(d / 1000.0 / batch)
            ring_nop_t.append((d - ring_fw_ns()) / 1000.0 / batch)
            t0 = clock()
            t.call_batch(nops)
            ring_awake.append((clock() - t0) / 1000.0 / batch)
        med = statistics.median
        r = {
            "kind": kind,
            "n": n,
            "roundtrip_us_median": round(med(lat), 3),
            "roundtrip_us_p99": round(_pct(lat, 0.99), 3),
            "roundtrip_us_mean": round(statistics.fmean(lat), 3),
            "ring_batch": batch,
            "ring_us_per_cmd": round(med(ring), 3),
            "ring_resident_us_per_cmd": round(med(ring_res), 3),
            "ring_nop_us_per_cmd": round(med(ring_nop), 3),
            "ring_nop_awake_us_per_cmd": round(med(ring_awake), 3),
            "update_us_per_cmd": round(med(single), 3),
            "backend": vmm.backend,
        }
        if w64 is not None:
            r.update({
                "roundtrip_transport_us_median": round(med(tra), 3),
                "roundtrip_transport_us_p99": round(_pct(tra, 0.99), 3),
                "ring_transport_us_per_cmd": round(med(ring_t), 3),
                "ring_resident_transport_us_per_cmd": round(med(ring_res_t), 3),
                "ring_nop_transport_us_per_cmd": round(med(ring_nop_t), 3),
            })
        return r
    finally:
        vmm.close()


def bench_psp_figures(n=3000, batch=256, rounds=8, backend=None, integrity=None):
    """The `hv bench --json` keys of issue 6, plus the detail behind them.

    psp_roundtrip_us_process / psp_roundtrip_us_inprocess: median round trip
    of an empty command (NOP); psp_ring_us_per_cmd: per-command time of a
    batch of `batch` UPDATE_NPT commands through the process transport's ring
    (firmware work included; psp_ring_transport_us_per_cmd is the ring's own
    share), each on a fresh frame the host kernel must allocate on the PSP's
    scrub; psp_ring_us_per_cmd_resident the same on frames the VMM had
    touched. psp_transport_detail holds both measure_roundtrip() dicts."""
    ip = measure_roundtrip("inprocess", n=n, batch=batch, rounds=rounds, backend=backend,
                           integrity=integrity)
    pr = measure_roundtrip("process", n=n, batch=batch, rounds=rounds, backend=backend,
                           integrity=integrity)
    return {
        "psp_roundtrip_us_process": pr["roundtrip_us_median"],
        "psp_roundtrip_us_inprocess": ip["roundtrip_us_median"],
        "psp_ring_us_per_cmd": pr["ring_us_per_cmd"],
        "psp_ring_us_per_cmd_resident": pr["ring_resident_us_per_cmd"],
        "psp_roundtrip_us_process_p99": pr["roundtrip_us_p99"],
        "psp_roundtrip_us_inprocess_p99": ip["roundtrip_us_p99"],
        "psp_roundtrip_transport_us_process": pr["roundtrip_transport_us_median"],
        "psp_ring_transport_us_per_cmd": pr["ring_transport_us_per_cmd"],
        "psp_transport_detail": {"inprocess": ip, "process": pr},
    }


def main(argv=None):
    """`python -m hv.bench.psp [n]`: print the figures as JSON."""
    import json
    n = int(argv[0]) if argv else 3000
    print(json.dumps(bench_psp_figures(n=n), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
