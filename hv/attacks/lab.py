"""The lab (a VMM with a victim guest and an innocent one, and helpers an
outsider could write with the public API only) and the trace driver."""

import os
import signal

from nptcore.bits import ACC_R, ACC_W, ADDR_MASK, P, PS, index as npt_index
from psp_firmware import Status
from psp_firmware.commands import ATTR_RWX

from hv.errors import VmStopped
from hv.attacks.registry import AttackResult, DETECTED, FALSE_POSITIVE, PAGE, Prevented, Undetected

# ---------------------------------------------------------------------------
# the lab: a VMM with a victim guest and an innocent one, and helpers an
# outsider could write with the public API only

def entry_addr(vmm, vm, gpa, level=1):
    """Host address of the NPT entry for `gpa` at `level`, read the way the
    CPU reads it (from host memory, starting at the VMSA's nCR3)."""
    t = vmm.npt_root(vm)
    for lvl in (4, 3, 2, 1):
        a = t + npt_index(gpa, lvl) * 8
        if lvl == level:
            return a
        e = vmm.mem.read_u64(a)
        if not e & P or e & PS:
            raise LookupError(f"GPA {gpa:#x} has no level-{level} table")
        t = e & ADDR_MASK
    raise AssertionError("unreachable")


def frame_of(vmm, vm, gpa):
    r = vmm.engine.walk(vmm.npt_root(vm), gpa, ACC_R, set_ad=False)
    return (r.hpa & ~0xFFF) if r.ok else None


def store_in_child(mem, hpa, data):
    """Store `data` at host address hpa the way the VMM's code would (through
    its mapping of host memory), in a forked child, because the store may
    kill the process: True if it went through (the child's mapping is the
    shared memfd, so the write is visible here), False if it faulted."""
    pid = os.fork()
    if pid == 0:
        try:
            import faulthandler
            import resource
            faulthandler.disable()
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(signal.SIGSEGV, signal.SIG_DFL)
            signal.signal(signal.SIGBUS, signal.SIG_DFL)
            mem.write(hpa, data)
            os._exit(0)
        except BaseException:
            os._exit(7)
    _, st = os.waitpid(pid, 0)
    if os.WIFSIGNALED(st) and os.WTERMSIG(st) in (signal.SIGSEGV, signal.SIGBUS):
        return False
    if os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0:
        return True
    raise RuntimeError(f"the store probe's child ended oddly (status {st:#x})")


class StoreProbe:
    """Host memory as the malicious VMM writes it under the isolated design:
    a write into the PSP's read-only range is tried as the VMM would make it
    (a store through its mapping, in a child: store_in_child) and a fault is
    Prevented; other writes go straight through. Reads are host memory's."""

    def __init__(self, mem):
        self._mem = mem
        self._lo, self._hi = mem.readonly

    def __getattr__(self, name):
        return getattr(self._mem, name)

    def _to_psp_range(self, hpa, data):
        if hpa < self._hi and hpa + len(data) > self._lo:
            if not store_in_child(self._mem, hpa, data):
                raise Prevented(f"the VMM's store to {hpa:#x} (a table or control page in "
                                f"the PSP's sealed memory) faulted: SIGSEGV (tried in a child "
                                f"of the VMM process)")
            return True
        return False

    def write(self, hpa, data):
        if not self._to_psp_range(hpa, data):
            self._mem.write(hpa, data)

    def write_u64(self, hpa, value):
        data = (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")
        if not self._to_psp_range(hpa, data):
            self._mem.write_u64(hpa, value)

    def zero(self, hpa, n):
        self.write(hpa, bytes(n))


def host_memory_for_attacks(vmm):
    """What the attack's writes go through: vmm.mem, or its StoreProbe when
    part of it is the PSP's read-only range."""
    return StoreProbe(vmm.mem) if vmm.mem.readonly else vmm.mem


class Lab:
    def __init__(self, cfg, pages=16, base=0x100000):
        self.cfg = cfg
        self.vmm = cfg.new_vmm()
        self.design = self.vmm.protect
        self._mem = host_memory_for_attacks(self.vmm)
        self.victim = self.vmm.create_vm()
        self.other = self.vmm.create_vm()
        self.base = base
        self.work = [base + i * PAGE for i in range(pages)]   # the victim's working set
        for g in self.work:
            self.vmm.touch(self.victim, g, ACC_W)
        self.other_gpa = base
        self.other_page = self.vmm.touch(self.other, self.other_gpa, ACC_W) & ~0xFFF
        self.vmm.mem.write(self.other_page, b"OTHER GUEST SECRET")
        self.vmm.touch(self.other, base + PAGE, ACC_W)
        self.last_failure = None        # the last INTEGRITY_FAILURE reply any command got
        self.vmm.psp.on_refusal = self._record_refusal

    def _record_refusal(self, r):
        if r.status == Status.INTEGRITY_FAILURE:
            self.last_failure = r

    def close(self):
        self.vmm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def mem(self):
        return self._mem

    # mappings the design's way (digest, isolated: PSP commands; rmp: the PSP
    # assigns, the VMM writes; none: the VMM writes, whatever is there)
    def map(self, vm, gpa, hpa, level=1, attrs=ATTR_RWX, npages=1):
        return self.vmm.map(vm, gpa, hpa, level, attrs, npages, force=self.design == "none")

    def unmap(self, vm, gpa, level=1, npages=1):
        return self.vmm.unmap(vm, gpa, level, npages)

    def reclaim(self, vm, hpa, npages=1):
        return self.vmm.reclaim(vm, hpa, npages)

    @property
    def psp(self):
        return self.vmm.psp

    def leaf(self, gpa, vm=None):
        return entry_addr(self.vmm, vm or self.victim, gpa, 1)

    def fresh(self, n=1, align=PAGE):
        return self.vmm.alloc.alloc(n, align=align)

    def digest(self, vm=None):
        return self.vmm.guest_digest(vm or self.victim)


def _where(reply):
    f = reply.fields
    if "rmp_entry" in f or ("gpa" in f and "page_hpa" not in f):
        return {k: hex(f[k]) for k in ("gpa", "hpa", "rmp_entry") if k in f}
    if "page_hpa" not in f:
        return None
    return {"page_hpa": hex(f["page_hpa"]), "entry_index": f.get("entry_index"),
            "expected": hex(f.get("expected", 0)), "found": hex(f.get("found", 0))}


def _fmt_where(w):
    if not w:
        return ""
    if "page_hpa" not in w:
        return (f"GPA {w.get('gpa')} reaches frame {w.get('hpa')}, whose RMP entry is "
                f"{w.get('rmp_entry')}")
    return (f"table page {w['page_hpa']} entry {w['entry_index']}: "
            f"expected {w['expected']} found {w['found']}")


def confirm_stopped(lab, vm=None):
    """After a detection: the guest is fatal, the other guest carries on.
    Returns a short note; raises Undetected if the guest is not fatal."""
    vmm = lab.vmm
    vm = vm or lab.victim
    if vmm.protect == "rmp":
        return _confirm_stopped_rmp(lab, vm)
    r = vmm.psp.update_npt(vm.handle, 0x7FF000000, lab.fresh())
    if r.status != Status.GUEST_STOPPED:
        raise Undetected(f"guest not stopped after the detection: UPDATE_NPT answered {r.name}")
    if vmm.psp.verify(vm.handle).status != Status.GUEST_STOPPED:
        raise Undetected("guest not stopped after the detection: VERIFY did not say GUEST_STOPPED")
    others = [v for v in (lab.victim, lab.other) if v is not vm]
    for o in others:
        vmm.touch(o, 0x7FE000000, ACC_W)
        if not vmm.psp.verify(o.handle).ok:
            return "; the other guest was stopped too"
    return "; guest now fatal (GUEST_STOPPED), other guest carries on"


def _confirm_stopped_rmp(lab, vm):
    """rmp: the nested fault stopped the guest (the VMM cannot resume it past
    the access: any later fault of it is refused), the other guest runs on."""
    vmm = lab.vmm
    if vm.fatal != Status.RMP_FAULT:
        raise Undetected(f"guest not stopped after the RMP fault (fatal: {vm.fatal})")
    try:
        vmm.touch(vm, 0x7FF000000, ACC_W)
        raise Undetected("guest not stopped after the RMP fault: it faulted a page in")
    except VmStopped:
        pass
    for o in (lab.victim, lab.other):
        if o is not vm:
            vmm.touch(o, 0x7FE000000, ACC_W)
    return "; guest stopped by the nested fault (the VMM cannot resume it), other guest carries on"


# ---------------------------------------------------------------------------
# the trace driver: a synthetic guest that loops over its working set
# through the NPT walker (A/D set as hardware does), faults through the VMM's
# NPF path, with a periodic CHECK_ALL every `check_every` accesses.

class Detection(Exception):
    def __init__(self, by, reply=None, where=None):
        super().__init__(by)
        self.by = by
        self.where = where if where is not None else (_where(reply) if reply is not None else None)


class AccessLoop:
    def __init__(self, lab, vm, pattern, check_every, bad_hpas=(), stop_event=None):
        self.lab = lab
        self.vmm = lab.vmm
        self.vm = vm
        self.pattern = pattern          # [(gpa, access)]
        self.check_every = check_every
        self.bad = set(bad_hpas)        # frames the attacker wants the victim to reach
        self.count = 0                  # accesses executed
        self.hits = 0                   # accesses that reached a bad frame
        self.pos = 0
        self.stop_event = stop_event

    def run(self, n, check=True):
        """Run n accesses (checks at each multiple of check_every).
        Raises Detection when the PSP stops the guest."""
        vmm, vm = self.vmm, self.vm
        walk = vmm.walk                  # the CPU's walk (with the RMP check under rmp)
        for _ in range(n):
            if self.stop_event is not None and self.stop_event.is_set():
                raise Detection("periodic_wall")
            gpa, acc = self.pattern[self.pos]
            self.pos = (self.pos + 1) % len(self.pattern)
            r = walk(vm, gpa, acc)
            if not r.ok:
                try:
                    vmm.handle_npf(vm, gpa, acc, r.errcode)
                except VmStopped as e:
                    if e.status == Status.RMP_FAULT:
                        raise Detection("rmp", where=_where(e)) from None
                    if e.status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED):
                        lf = self.lab.last_failure
                        raise Detection("update", where=_where(lf) if lf is not None else None) \
                            from None
                    raise
                r = walk(vm, gpa, acc)
                if not r.ok:
                    raise RuntimeError(f"GPA {gpa:#x} unmapped after its NPF")
            self.count += 1
            if (r.hpa & ~0xFFF) in self.bad:
                self.hits += 1
            if check and self.check_every and self.count % self.check_every == 0:
                self.periodic()

    def periodic(self):
        r = self.vmm.psp.check_all()
        if r.status == Status.INTEGRITY_FAILURE:
            raise Detection("periodic", r)
        if not r.ok:
            raise RuntimeError(f"CHECK_ALL answered {r.name}")


def run_tamper(cfg, lab, tamper, pattern=None, bad_hpas=(), warm_slices=2, vm=None,
               name="", what=""):
    """The common shape of a 'detected' scenario.

    Runs `warm_slices` slices with no tamper (the checks must pass: no false
    positive), calls `tamper()` at a slice boundary, then runs until the PSP
    stops the guest or cfg.max_slices slices pass (undetected)."""
    vm = vm or lab.victim
    pattern = pattern or [(g, ACC_W if i % 3 == 0 else ACC_R) for i, g in enumerate(lab.work)]
    loop = AccessLoop(lab, vm, pattern, cfg.check_every, bad_hpas)
    try:
        loop.run(warm_slices * cfg.check_every)
    except Detection as d:
        return AttackResult(name, FALSE_POSITIVE, detail=f"flagged before any tamper ({d.by})")
    t0 = loop.count
    tamper()
    try:
        loop.run(cfg.max_slices * cfg.check_every)
    except Detection as d:
        # exposure: the guest work done on the tampered table before the
        # detection. The digest trusts the whole table until the check that
        # catches it; the RMP check is per translation: only accesses that
        # went through the tampered entry count (none: the first one faults)
        after = loop.count - t0
        # (rmp: every access that completed passed the RMP check, so it used a
        # frame the RMP gives this guest at that GPA: none used the tamper)
        exposure = 0 if d.by == "rmp" else after
        note = confirm_stopped(lab, vm)
        where = d.where
        return AttackResult(
            name, DETECTED, exposure_insns=exposure, detected_by=d.by, tampered_hits=loop.hits,
            where=where,
            detail=f"{what}; detected by the {_by_text(d.by)} after {after} accesses "
                   f"({loop.hits} through the tampered entry): {_fmt_where(where)}{note}")
    raise Undetected(f"{what}; not detected after {loop.count - t0} accesses "
                     f"({loop.hits} through the tampered entry)")


def _by_text(by):
    return {"update": "next UPDATE_NPT (NPF)", "periodic": "periodic check (CHECK_ALL)",
            "periodic_wall": "wall-time periodic checker", "verify": "VERIFY",
            "rmp": "RMP check at the access (nested fault)"}.get(by, by)
