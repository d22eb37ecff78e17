"""Races with a second VMM thread, the PSP's wall-clock periodic check, and
the benign hardware Accessed/Dirty updates."""
import sys
import threading
import time

from nptcore.bits import A, ACC_R, ACC_W, ACC_X, AD_MASK, ADDR_MASK, D, index as npt_index
from psp_firmware import Status

from hv.errors import VmStopped
from hv.attacks.expect import BENIGN, CONCURRENT_COMMANDS, RACE_BY_WRITE, REMAP_BY_WRITE
from hv.attacks.registry import (AttackResult, DETECTED, FALSE_POSITIVE, NOT_FLAGGED, PAGE,
                                 Prevented, REFUSED, SKIPPED, Undetected, scenario)
from hv.attacks.lab import (AccessLoop, Detection, Lab, _by_text, _fmt_where, _where,
                            confirm_stopped, run_tamper)

# ---------------------------------------------------------------------------
# races: a second VMM thread

@scenario("race_check_write", "race", RACE_BY_WRITE)
def sc_race_check_write(cfg):
    """A second thread toggles an entry while UPDATE_NPT commands verify and write."""
    with Lab(cfg) as lab:
        v = lab.victim
        target = lab.work[2]
        slot = lab.leaf(target)
        good = lab.mem.read_u64(slot)
        bad = (good & ~ADDR_MASK) | lab.other_page
        stop = threading.Event()
        writes = [0]
        prevented = []

        def hammer():
            mem = lab.mem
            try:
                while not stop.is_set():
                    mem.write_u64(slot, bad)
                    mem.write_u64(slot, good)
                    writes[0] += 2
                mem.write_u64(slot, bad)       # leave the tamper in place
            except Prevented as e:             # isolated: the first store faults
                prevented.append(e)

        old_si = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        th = threading.Thread(target=hammer, name="attack-hammer", daemon=True)
        statuses = {}
        detected_at = None
        where = None
        try:
            th.start()
            # same leaf table: the PSP writes the page the thread is hammering
            for i in range(200):
                gpa = lab.base + (len(lab.work) + i) * PAGE
                if npt_index(gpa, 2) != npt_index(lab.base, 2):
                    break
                r = lab.map(v, gpa, lab.fresh())     # (rmp, none: the VMM writes the page itself)
                statuses[r.name] = statuses.get(r.name, 0) + 1
                if r.status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED):
                    detected_at = detected_at if detected_at is not None else i
                    if r.status == Status.INTEGRITY_FAILURE:
                        where = _where(r)
                    break
        finally:
            stop.set()
            th.join()
            sys.setswitchinterval(old_si)
        if prevented:
            raise prevented[0]
        if detected_at is None and lab.design in ("rmp", "none"):
            # no PSP check to race: the value the thread left in place meets
            # the RMP check at the access (rmp) or nothing (none)
            return run_tamper(cfg, lab, lambda: None, pattern=[(target, ACC_R)],
                              bad_hpas=[lab.other_page], warm_slices=0, name="race_check_write",
                              what=f"{writes[0]} racing writes to entry {slot:#x} during "
                                   f"{sum(statuses.values())} mappings, the tamper left in place")
        if detected_at is None:
            r = lab.psp.check_all()
            if r.status != Status.INTEGRITY_FAILURE:
                raise Undetected("the hammered entry was folded into the digest: CHECK_ALL passes "
                                 f"with the tampered value in place ({statuses})")
            where, by = _where(r), "periodic"
        else:
            by = "update"
        note = confirm_stopped(lab)
        return AttackResult("", DETECTED, exposure_insns=0, detected_by=by, where=where,
                            statuses=[f"{k}:{n}" for k, n in statuses.items()],
                            detail=f"{writes[0]} racing writes to entry {slot:#x} during "
                                   f"{sum(statuses.values())} UPDATE_NPTs ({statuses}); detected by "
                                   f"the {_by_text(by)}: {_fmt_where(where)}{note}")


@scenario("race_between_check_and_write", "race", RACE_BY_WRITE)
def sc_race_window(cfg):
    """Deterministic race: the VMM writes an entry after the PSP's check, before its write."""
    with Lab(cfg) as lab:
        v = lab.victim
        target = lab.work[3]
        slot = lab.leaf(target)
        good = lab.mem.read_u64(slot)
        bad = (good & ~ADDR_MASK) | lab.other_page
        if lab.design != "digest":
            # isolated: the store faults whenever it comes; rmp, none: the VMM
            # writes the table itself, there is no PSP check-to-write window:
            # the write is a plain remap (the RMP check meets it at the access)
            return run_tamper(cfg, lab, lambda: lab.mem.write_u64(slot, bad),
                              pattern=[(target, ACC_R)] + [(g, ACC_R) for g in lab.work],
                              bad_hpas=[lab.other_page], warm_slices=0,
                              name="race_between_check_and_write",
                              what=f"entry {slot:#x} rewritten onto the other guest's page "
                                   f"(no PSP write to race under {lab.design})")
        psp_obj = getattr(lab.vmm, "_psp_obj", None)
        if psp_obj is None:
            return AttackResult("", SKIPPED, detail="needs the in-process PSP to open the window")
        real_apply = psp_obj._apply_writes
        fired = []
        # the window is opened in the Python handler: keep the C fast path
        # (which has the same check-then-write-from-shadow order, in one C
        # call that cannot be interrupted from here) out of this update
        g = psp_obj._guests[v.handle]
        fast_ok, g.fast_ok = g.fast_ok, False
        g.state = g.state

        def apply_with_race(g, writes, new_tables):
            # the moment between the PSP's integrity check and its write: the
            # untrusted VMM (another core) rewrites an entry of the same page
            lab.mem.write_u64(slot, bad)
            fired.append(1)
            return real_apply(g, writes, new_tables)
        psp_obj._apply_writes = apply_with_race
        try:
            r = lab.psp.update_npt(v.handle, lab.base + len(lab.work) * PAGE, lab.fresh())
        finally:
            psp_obj._apply_writes = real_apply
            g.fast_ok = fast_ok
            g.state = g.state
        if not fired or not r.ok:
            raise RuntimeError(f"race window not exercised ({r.name})")
        loop = AccessLoop(lab, v, [(target, ACC_R)] + [(g, ACC_R) for g in lab.work], cfg.check_every,
                          [lab.other_page])
        try:
            loop.run(cfg.max_slices * cfg.check_every)
        except Detection as d:
            note = confirm_stopped(lab)
            return AttackResult("", DETECTED, exposure_insns=loop.count, detected_by=d.by,
                                tampered_hits=loop.hits, where=d.where,
                                detail=f"write landed inside UPDATE_NPT's check-to-write window; the "
                                       f"PSP's digest came from its shadow, so the "
                                       f"{_by_text(d.by)} caught it after {loop.count} accesses: "
                                       f"{_fmt_where(d.where)}{note}")
        raise Undetected("the racing write was folded into the digest")


@scenario("race_concurrent_commands", "race", CONCURRENT_COMMANDS)
def sc_race_commands(cfg):
    """Several threads map the same frame (and the same GPA) at once."""
    with Lab(cfg) as lab:
        v, o = lab.victim, lab.other
        results = []
        lock = threading.Lock()
        rounds = 20
        for k in range(rounds):
            hpa = lab.fresh()
            gpa = 0x6000000 + k * PAGE
            barrier = threading.Barrier(4)

            def go(vm, g, h=hpa):
                barrier.wait()
                r = lab.map(vm, g, h)
                with lock:
                    results.append((h, vm.handle, g, r.status))
            ths = [threading.Thread(target=go, args=a) for a in
                   ((v, gpa), (v, gpa + 0x100000), (o, gpa), (o, gpa + 0x100000))]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
        ok_by_hpa = {}
        for h, _vm, _g, st in results:
            if st == Status.SUCCESS:
                ok_by_hpa[h] = ok_by_hpa.get(h, 0) + 1
            elif st not in (Status.PAGE_OWNED, Status.GPA_MAPPED):
                raise RuntimeError(f"unexpected status {Status(st).name}")
        doubles = [h for h, n in ok_by_hpa.items() if n > 1]
        if doubles:
            raise Undetected(f"{len(doubles)} frames mapped twice by concurrent commands")
        if len(ok_by_hpa) != rounds:
            raise RuntimeError("a round mapped nothing")
        for vm in (v, o):
            if not lab.psp.verify(vm.handle).ok:
                raise Undetected("concurrent commands left a table failing VERIFY")
        n_ref = sum(1 for r in results if r[3] != Status.SUCCESS)
        return AttackResult("", REFUSED, exposure_insns=0, statuses=[f"refused:{n_ref}"],
                            detail=f"{rounds} rounds of 4 threads mapping one frame: exactly one "
                                   f"success per frame, {n_ref} refused (PAGE_OWNED)")


# ---------------------------------------------------------------------------
# periodic check in wall time (the PSP's own timer thread)

@scenario("periodic_wall_clock", "periodic", REMAP_BY_WRITE)
def sc_periodic_wall(cfg):
    """SEVered remap caught by the PSP's wall-time periodic checker (no VMM help)."""
    with Lab(cfg) as lab:
        if lab.design != "digest":
            # no periodic checker to race against: isolated refuses the store,
            # rmp checks the access itself, none nothing
            gpa = lab.work[3]
            slot = lab.leaf(gpa)

            def tamper():
                v = lab.mem.read_u64(slot)
                lab.mem.write_u64(slot, (v & ~ADDR_MASK) | lab.other_page)
            return run_tamper(cfg, lab, tamper, bad_hpas=[lab.other_page],
                              name="periodic_wall_clock",
                              what=f"victim GPA {gpa:#x} remapped onto the other guest's page "
                                   f"(no periodic checker under {lab.design})")
        psp_obj = getattr(lab.vmm, "_psp_obj", None)
        if psp_obj is None or not hasattr(psp_obj, "start_periodic_check"):
            return AttackResult("", SKIPPED, detail="needs the in-process PSP (start_periodic_check)")
        gpa = lab.work[3]
        slot = lab.leaf(gpa)
        ev = threading.Event()
        stopped = []

        def on_stop(handle, mm):
            stopped.append((handle, mm))
            if handle == lab.victim.handle:
                ev.set()
        pattern = [(g, ACC_R) for g in lab.work]
        loop = AccessLoop(lab, lab.victim, pattern, 0, [lab.other_page], stop_event=ev)
        checker = psp_obj.start_periodic_check(cfg.wall_ms, on_stop=on_stop)
        try:
            loop.run(2000)                        # runs with checks passing: no false positive
            if ev.is_set():
                return AttackResult("", FALSE_POSITIVE, detail="stopped before any tamper")
            t0 = loop.count
            v = lab.mem.read_u64(slot)
            lab.mem.write_u64(slot, (v & ~ADDR_MASK) | lab.other_page)
            deadline = time.monotonic() + max(5.0, cfg.wall_ms / 100)
            try:
                while time.monotonic() < deadline:
                    loop.run(500)
            except Detection:
                exp = loop.count - t0
                h, mm = stopped[0]
                where = {"page_hpa": hex(mm.page_hpa), "entry_index": mm.index,
                         "expected": hex(mm.expected), "found": hex(mm.found)}
                note = confirm_stopped(lab)
                return AttackResult("", DETECTED, exposure_insns=exp, detected_by="periodic_wall",
                                    tampered_hits=loop.hits, where=where,
                                    detail=f"remap of {gpa:#x}; the PSP's {cfg.wall_ms:g} ms checker "
                                           f"stopped the guest after {exp} accesses "
                                           f"({checker.ticks} ticks): {_fmt_where(where)}{note}")
            raise Undetected(f"no stop within {deadline - t0:.1f}s of the tamper")
        finally:
            psp_obj.stop_periodic_check()


# ---------------------------------------------------------------------------
# benign: the hardware's Accessed/Dirty updates

@scenario("benign_accessed_dirty", "benign", BENIGN)
def sc_benign_ad(cfg):
    """Accessed/Dirty bit updates (by the walker and by hand) must not be flagged."""
    with Lab(cfg) as lab:
        vmm, v = lab.vmm, lab.victim
        pattern = [(g, (ACC_W, ACC_R, ACC_X)[i % 3]) for i, g in enumerate(lab.work)]
        loop = AccessLoop(lab, v, pattern, cfg.check_every)
        flips = 0

        def flip_ad(set_bits):
            n = 0
            if lab.design == "isolated":
                # the by-hand flips stand for the hardware's; isolated tables
                # are written with A/D set and only the PSP writes them
                return 0
            for t, _lvl in vmm.engine.table_pages(vmm.npt_root(v)):
                for i in range(512):
                    e = lab.mem.read_u64(t + 8 * i)
                    ne = (e | AD_MASK) if set_bits else (e & ~AD_MASK)
                    if ne != e:
                        lab.mem.write_u64(t + 8 * i, ne)
                        n += 1
            return n
        try:
            for s in range(6):
                loop.run(cfg.check_every)
                flips += flip_ad(s % 2 == 0)
                # new mappings (UPDATE_NPT checks) and explicit checks
                try:
                    vmm.touch(v, 0x3000000 + s * PAGE, ACC_W)
                except VmStopped as e:
                    lf = lab.last_failure
                    raise Detection("update", where=_where(lf) if lf is not None else None) from e
                for r in (lab.psp.verify(v.handle), lab.psp.check_all()):
                    if not r.ok:
                        raise Detection("verify", r)
            a_d = sum(1 for t, _ in vmm.engine.table_pages(vmm.npt_root(v)) for i in range(512)
                      if lab.mem.read_u64(t + 8 * i) & (A | D))
        except Detection as d:
            return AttackResult("", FALSE_POSITIVE, exposure_insns=None, detected_by=d.by,
                                where=d.where, detail=f"A/D updates flagged: {_fmt_where(d.where)}")
        return AttackResult("", NOT_FLAGGED, exposure_insns=None,
                            detail=f"{loop.count} accesses (walker sets A/D), {flips} A/D bit flips "
                                   f"by hand, {a_d} entries with A/D set; every UPDATE_NPT, VERIFY and "
                                   f"periodic check passed")
