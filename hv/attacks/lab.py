"""The lab (a VMM with a victim guest and an innocent one, and helpers an
outsider could write with the public API only) and the trace driver."""

from nptcore.bits import ACC_R, ACC_W, ADDR_MASK, P, PS, index as npt_index
from psp_firmware import Status

from hv.errors import VmStopped
from hv.attacks.registry import AttackResult, DETECTED, FALSE_POSITIVE, PAGE, Undetected

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


class Lab:
    def __init__(self, cfg, pages=16, base=0x100000):
        self.cfg = cfg
        self.vmm = cfg.new_vmm()
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
        return self.vmm.mem

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
    if "page_hpa" not in f:
        return None
    return {"page_hpa": hex(f["page_hpa"]), "entry_index": f.get("entry_index"),
            "expected": hex(f.get("expected", 0)), "found": hex(f.get("found", 0))}


def _fmt_where(w):
    if not w:
        return ""
    return (f"table page {w['page_hpa']} entry {w['entry_index']}: "
            f"expected {w['expected']} found {w['found']}")


def confirm_stopped(lab, vm=None):
    """After a detection: the guest is fatal, the other guest carries on.
    Returns a short note; raises Undetected if the guest is not fatal."""
    vmm = lab.vmm
    vm = vm or lab.victim
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
        walk = self.vmm.engine.walk
        vmm, vm = self.vmm, self.vm
        for _ in range(n):
            if self.stop_event is not None and self.stop_event.is_set():
                raise Detection("periodic_wall")
            gpa, acc = self.pattern[self.pos]
            self.pos = (self.pos + 1) % len(self.pattern)
            r = walk(vmm.npt_root(vm), gpa, acc)
            if not r.ok:
                try:
                    vmm.handle_npf(vm, gpa, acc, r.errcode)
                except VmStopped as e:
                    if e.status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED):
                        lf = self.lab.last_failure
                        raise Detection("update", where=_where(lf) if lf is not None else None) \
                            from None
                    raise
                r = walk(vmm.npt_root(vm), gpa, acc)
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
        exposure = loop.count - t0
        note = confirm_stopped(lab, vm)
        where = d.where
        return AttackResult(
            name, DETECTED, exposure_insns=exposure, detected_by=d.by, tampered_hits=loop.hits,
            where=where,
            detail=f"{what}; detected by the {_by_text(d.by)} after {exposure} accesses "
                   f"({loop.hits} through the tampered entry): {_fmt_where(where)}{note}")
    raise Undetected(f"{what}; not detected after {loop.count - t0} accesses "
                     f"({loop.hits} through the tampered entry)")


def _by_text(by):
    return {"update": "next UPDATE_NPT (NPF)", "periodic": "periodic check (CHECK_ALL)",
            "periodic_wall": "wall-time periodic checker", "verify": "VERIFY"}.get(by, by)
