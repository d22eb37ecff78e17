"""The malicious-hypervisor attack suite (`hv attack`).

Each scenario is one function that builds a fresh VMM, runs a victim guest
(and usually a second, innocent guest), and then acts as a malicious VMM
would, using nothing but the public API an outsider has: `vmm.mem` (write
any byte of host memory, NPT pages included), `vmm.psp` (send any PSP
command with any arguments: typed methods or `raw`), `vmm.engine` (walk the
tables as the CPU does) and threads. It reports one outcome:

  refused       the PSP rejected every malicious command, nothing changed
  detected      the tamper was caught: by the next UPDATE_NPT (an NPF) or by
                the periodic check; the guest is then stopped for good
                (every later command GUEST_STOPPED) and the other guest
                carries on
  not_flagged   the benign scenario (hardware Accessed/Dirty bit updates):
                correctly *not* reported as tampering
  undetected    the attack got away with it (a bug)
  false_positive  the benign scenario was reported as tampering (a bug)
  skipped       not applicable in this configuration (e.g. no guest images)
  error         the scenario itself crashed (a bug in it or in the VMM)

`undetected`, `false_positive` and `error` are failures (`hv attack` exits 1).

exposure_insns: how much guest work ran while the tampered mapping was
live: from the tamper to the detection. With the guest driver (a real toy
guest on the emulated CPU, hv.boot) it counts guest instructions; with the
trace driver (a synthetic access loop through the NPT walker, one access
per instruction, as a fault trace replays them) it counts guest memory
accesses. `exposure_unit` says which. `tampered_hits` counts the accesses
that actually went through the tampered entry. Refused attacks have 0;
the benign scenario has null.

Not in the suite, by design: a VMM that tampers and restores the entry
before the next check is not seen by any digest; what it gets is bounded by
the check interval (the exposure the detected scenarios measure), which is
why the interval is counted in guest instructions (--check-insns).

    from hv.attacks.scenarios import run_scenarios, SCENARIOS, AttackConfig
    results = run_scenarios(["severed_remap"], AttackConfig(check_every=256))
"""
import os
import struct
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

from nptcore.bits import (A, ACC_R, ACC_W, ACC_X, AD_MASK, ADDR_MASK, D, NX, P, PS, U, W,
                          index as npt_index)
from psp_firmware import Status
from psp_firmware.commands import ATTR_RWX, ATTR_W, ATTR_X

from hv.errors import VmStopped
from hv.vmm.vmm import Vmm

PAGE = 4096
MB2 = 2 << 20

REFUSED, DETECTED, NOT_FLAGGED = "refused", "detected", "not_flagged"
UNDETECTED, FALSE_POSITIVE, SKIPPED, ERROR = "undetected", "false_positive", "skipped", "error"
OUTCOMES = (REFUSED, DETECTED, NOT_FLAGGED, UNDETECTED, FALSE_POSITIVE, SKIPPED, ERROR)
FAILURES = (UNDETECTED, FALSE_POSITIVE, ERROR)


# ---------------------------------------------------------------------------
# results, config, registry

@dataclass
class AttackResult:
    name: str
    outcome: str
    exposure_insns: int = None
    detail: str = ""
    category: str = ""
    expected: str = ""
    driver: str = "trace"
    exposure_unit: str = "accesses"
    detected_by: str = None          # "update" | "periodic" | "periodic_wall" | "verify"
    tampered_hits: int = None
    statuses: list = field(default_factory=list)   # PSP status names of the malicious commands
    where: dict = None               # what the PSP reported: page, entry index, expected, found
    elapsed_s: float = 0.0

    @property
    def ok(self):
        return self.outcome not in FAILURES

    def to_json(self):
        d = asdict(self)
        d["elapsed_s"] = round(self.elapsed_s, 4)
        return d


@dataclass
class AttackConfig:
    backend: str = None
    host_mem: int = 256 << 20
    host_mem_path: str = None
    integrity: str = None
    psp: str = "inprocess"
    psp_timeout: float = 5.0
    check_every: int = 256           # periodic check interval (guest accesses/instructions)
    guest_check_insns: int = 20000   # same, for the guest driver
    wall_ms: float = 10.0            # interval of the wall-time checker scenarios
    max_slices: int = 64             # give up (undetected) after this many slices
    driver: str = "auto"             # scenarios with two drivers: "trace", "guest", "auto"

    def new_vmm(self):
        return Vmm(host_mem=self.host_mem, host_mem_path=self.host_mem_path, backend=self.backend,
                   integrity=self.integrity, psp=self.psp, psp_timeout=self.psp_timeout)


@dataclass
class Scenario:
    name: str
    func: object
    category: str
    expected: str
    doc: str
    driver: str = "trace"


SCENARIOS = {}

# the attack classes of issue 4 / DESIGN.md "Threat model"; every one is covered
CATEGORIES = (
    "severed_remap", "alias", "replay", "permission_escalation", "table_swap", "root_swap",
    "bad_hpa", "range", "race", "reclaim", "benign", "periodic",
)


def scenario(name, category, expected, driver="trace"):
    def deco(fn):
        SCENARIOS[name] = Scenario(name, fn, category, expected,
                                   (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
                                   driver)
        return fn
    return deco


class Undetected(Exception):
    """Raised inside a scenario when the attack got away with it."""


def run_scenario(name, cfg=None):
    cfg = cfg or AttackConfig()
    sc = SCENARIOS[name]
    t0 = time.perf_counter()
    try:
        res = sc.func(cfg)
    except Undetected as e:
        res = AttackResult(name, UNDETECTED, detail=str(e))
    except VmStopped as e:
        if sc.expected == NOT_FLAGGED and e.status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED):
            res = AttackResult(name, FALSE_POSITIVE, detail=f"flagged with no tamper: {e}")
        else:
            res = AttackResult(name, ERROR, detail=f"VmStopped: {e}")
    except Exception as e:      # a crash is a finding, not a traceback on the terminal
        res = AttackResult(name, ERROR, detail=f"{e.__class__.__name__}: {e}")
        if os.environ.get("HV_DEBUG"):
            traceback.print_exc(file=sys.stderr)
    res.name = name
    res.category = sc.category
    res.expected = sc.expected
    res.elapsed_s = time.perf_counter() - t0
    return res


def run_scenarios(names=None, cfg=None, on_result=None):
    names = list(SCENARIOS) if not names else names
    out = []
    for n in names:
        r = run_scenario(n, cfg)
        out.append(r)
        if on_result:
            on_result(r)
    return out


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


# ---------------------------------------------------------------------------
# detected: direct writes to the NPT in host memory

@scenario("severed_remap", "severed_remap", DETECTED)
def sc_severed_remap(cfg):
    """SEVered: rewrite a victim leaf so its GPA points at another guest's page."""
    with Lab(cfg) as lab:
        gpa = lab.work[3]
        slot = lab.leaf(gpa)

        def tamper():
            v = lab.mem.read_u64(slot)
            lab.mem.write_u64(slot, (v & ~ADDR_MASK) | lab.other_page)
        return run_tamper(cfg, lab, tamper, bad_hpas=[lab.other_page], name="severed_remap",
                          what=f"victim GPA {gpa:#x} remapped onto the other guest's page "
                               f"{lab.other_page:#x}")


@scenario("severed_remap_npf", "severed_remap", DETECTED)
def sc_severed_remap_npf(cfg):
    """SEVered remap next to the slot of the next NPF: caught by that UPDATE_NPT."""
    with Lab(cfg, pages=12) as lab:
        gpa = lab.work[9]
        slot = lab.leaf(gpa)
        # the next fault fills the slot right after the working set (leaf
        # entries 256..267 are mapped, the fault fills 268): the same 64-byte
        # line of the same leaf table, so both integrity modes check it
        fresh_gpa = lab.base + len(lab.work) * PAGE
        pattern = [(g, ACC_R) for g in lab.work] + [(gpa, ACC_R)] * 8 + [(fresh_gpa, ACC_W)]

        def tamper():
            v = lab.mem.read_u64(slot)
            lab.mem.write_u64(slot, (v & ~ADDR_MASK) | lab.other_page)
        return run_tamper(cfg, lab, tamper, pattern=pattern, bad_hpas=[lab.other_page],
                          warm_slices=0, name="severed_remap_npf",
                          what=f"remap of {gpa:#x} onto the other guest's page, then an NPF at "
                               f"{fresh_gpa:#x}")


@scenario("alias_by_write", "alias", DETECTED)
def sc_alias_by_write(cfg):
    """Alias two GPAs onto one HPA by writing an NPT entry directly."""
    with Lab(cfg) as lab:
        a, b = lab.work[1], lab.work[2]
        hpa_a = frame_of(lab.vmm, lab.victim, a)
        slot = lab.leaf(b)

        def tamper():
            v = lab.mem.read_u64(slot)
            lab.mem.write_u64(slot, (v & ~ADDR_MASK) | hpa_a)
        return run_tamper(cfg, lab, tamper, bad_hpas=[hpa_a], name="alias_by_write",
                          what=f"GPA {b:#x} aliased onto {hpa_a:#x} (the frame of GPA {a:#x})")


@scenario("alias_new_gpa_by_write", "alias", DETECTED)
def sc_alias_new_gpa(cfg):
    """Alias by writing a new leaf (an unmapped GPA) that points at a mapped frame."""
    with Lab(cfg) as lab:
        a = lab.work[0]
        hpa_a = frame_of(lab.vmm, lab.victim, a)
        new = lab.base + len(lab.work) * PAGE      # same leaf table, empty slot
        slot = lab.leaf(new)
        pattern = [(g, ACC_R) for g in lab.work] + [(new, ACC_W)]
        return run_tamper(cfg, lab, lambda: lab.mem.write_u64(slot, hpa_a | P | W | U),
                          pattern=pattern, bad_hpas=[hpa_a], warm_slices=0,
                          name="alias_new_gpa_by_write",
                          what=f"new leaf GPA {new:#x} -> {hpa_a:#x} written by the VMM")


@scenario("replay_old_entry", "replay", DETECTED)
def sc_replay_old_entry(cfg):
    """Replay an old entry: the frame was unmapped, reclaimed and given to another
    guest; the VMM writes the victim's old leaf back."""
    with Lab(cfg) as lab:
        gpa = lab.work[7]
        slot = lab.leaf(gpa)
        old = lab.mem.read_u64(slot)
        hpa = old & ADDR_MASK
        steps = [lab.psp.unmap(lab.victim.handle, gpa), lab.psp.reclaim(lab.victim.handle, hpa),
                 lab.psp.update_npt(lab.other.handle, 0x900000, hpa)]
        if not all(r.ok for r in steps):
            raise RuntimeError(f"setup failed: {[r.name for r in steps]}")
        lab.mem.write(hpa, b"now the other guest's data")
        pattern = [(g, ACC_R) for g in lab.work if g != gpa]
        warm = AccessLoop(lab, lab.victim, pattern, cfg.check_every)
        warm.run(cfg.check_every)
        pattern2 = pattern + [(gpa, ACC_R)]
        return run_tamper(cfg, lab, lambda: lab.mem.write_u64(slot, old), pattern=pattern2,
                          bad_hpas=[hpa], warm_slices=0, name="replay_old_entry",
                          what=f"old entry {old:#x} of GPA {gpa:#x} replayed after its frame went "
                               f"to the other guest")


@scenario("replay_old_table_page", "replay", DETECTED)
def sc_replay_old_table_page(cfg):
    """Replay a whole old table page (a snapshot from before an UNMAP)."""
    with Lab(cfg) as lab:
        gpa = lab.work[4]
        slot = lab.leaf(gpa)
        pt = slot & ~0xFFF
        snap = lab.mem.read(pt, PAGE)
        hpa = frame_of(lab.vmm, lab.victim, gpa)
        assert lab.psp.unmap(lab.victim.handle, gpa).ok
        assert lab.psp.reclaim(lab.victim.handle, hpa).ok
        pattern = [(g, ACC_R) for g in lab.work]   # includes gpa: live only if the replay works
        return run_tamper(cfg, lab, lambda: lab.mem.write(pt, snap), pattern=pattern,
                          bad_hpas=[hpa], warm_slices=0, name="replay_old_table_page",
                          what=f"leaf table page {pt:#x} restored from a snapshot taken before "
                               f"GPA {gpa:#x} was unmapped and its frame reclaimed")


@scenario("escalate_writable", "permission_escalation", DETECTED)
def sc_escalate_writable(cfg):
    """Permission escalation: set W on a read-only page."""
    with Lab(cfg) as lab:
        ro = lab.base + 0x40000
        hpa = lab.fresh()
        r = lab.psp.update_npt(lab.victim.handle, ro, hpa, 1, ATTR_X, 1)   # read+exec, no write
        assert r.ok, r
        w = lab.vmm.engine.walk(lab.vmm.npt_root(lab.victim), ro, ACC_W, set_ad=False)
        assert not w.ok, "read-only page writable before the tamper"
        slot = lab.leaf(ro)
        pattern = [(g, ACC_R) for g in lab.work] + [(ro, ACC_W)]
        return run_tamper(cfg, lab, lambda: lab.mem.write_u64(slot, lab.mem.read_u64(slot) | W),
                          pattern=pattern, bad_hpas=[hpa], warm_slices=0,
                          name="escalate_writable",
                          what=f"W set on read-only GPA {ro:#x}")


@scenario("escalate_clear_nx", "permission_escalation", DETECTED)
def sc_escalate_clear_nx(cfg):
    """Permission escalation: clear no-execute on a data page."""
    with Lab(cfg) as lab:
        nxg = lab.base + 0x41000
        hpa = lab.fresh()
        assert lab.psp.update_npt(lab.victim.handle, nxg, hpa, 1, ATTR_W, 1).ok   # RW, NX
        x = lab.vmm.engine.walk(lab.vmm.npt_root(lab.victim), nxg, ACC_X, set_ad=False)
        assert not x.ok, "NX page executable before the tamper"
        slot = lab.leaf(nxg)
        pattern = [(g, ACC_R) for g in lab.work] + [(nxg, ACC_X)]
        return run_tamper(cfg, lab, lambda: lab.mem.write_u64(slot, lab.mem.read_u64(slot) & ~NX),
                          pattern=pattern, bad_hpas=[hpa], warm_slices=0,
                          name="escalate_clear_nx", what=f"NX cleared on data GPA {nxg:#x}")


@scenario("swap_table_page", "table_swap", DETECTED)
def sc_swap_table_page(cfg):
    """Swap a leaf table page for a VMM-made copy with one entry redirected."""
    with Lab(cfg) as lab:
        gpa = lab.work[6]
        pd_slot = entry_addr(lab.vmm, lab.victim, gpa, 2)
        pt = lab.mem.read_u64(pd_slot) & ADDR_MASK
        fake = lab.fresh()
        lab.mem.write(fake, lab.mem.read(pt, PAGE))
        i = npt_index(gpa, 1)
        v = lab.mem.read_u64(fake + 8 * i)
        lab.mem.write_u64(fake + 8 * i, (v & ~ADDR_MASK) | lab.other_page)

        def tamper():
            e = lab.mem.read_u64(pd_slot)
            lab.mem.write_u64(pd_slot, (e & ~ADDR_MASK) | fake)
        return run_tamper(cfg, lab, tamper, bad_hpas=[lab.other_page], name="swap_table_page",
                          what=f"PD entry redirected from table {pt:#x} to a copy at {fake:#x} "
                               f"that maps GPA {gpa:#x} onto the other guest's page")


@scenario("swap_table_contents", "table_swap", DETECTED)
def sc_swap_table_contents(cfg):
    """Swap the contents of two table pages in place (pointers unchanged)."""
    with Lab(cfg) as lab:
        far = 0x40000000
        lab.vmm.touch(lab.victim, far, ACC_W)
        pt1 = lab.leaf(lab.work[0]) & ~0xFFF
        pt2 = lab.leaf(far) & ~0xFFF
        hpa_far = frame_of(lab.vmm, lab.victim, far)

        def tamper():
            a, b = lab.mem.read(pt1, PAGE), lab.mem.read(pt2, PAGE)
            lab.mem.write(pt1, b)
            lab.mem.write(pt2, a)
        pattern = [(g, ACC_R) for g in lab.work] + [(far, ACC_R)]
        return run_tamper(cfg, lab, tamper, pattern=pattern, bad_hpas=[hpa_far],
                          name="swap_table_contents",
                          what=f"contents of leaf tables {pt1:#x} and {pt2:#x} exchanged")


@scenario("swap_root_pointer", "root_swap", DETECTED)
def sc_swap_root_pointer(cfg):
    """Swap nCR3 in the VMSA for a forged copy of the whole table."""
    with Lab(cfg) as lab:
        vmm = lab.vmm
        root = vmm.npt_root(lab.victim)
        # deep-copy the table into VMM frames, redirecting one leaf
        copies = {}

        def clone(t, lvl):
            n = lab.fresh()
            copies[t] = n
            data = bytearray(lab.mem.read(t, PAGE))
            for i in range(512):
                e = struct.unpack_from("<Q", data, 8 * i)[0]
                if e & P and lvl > 1 and not e & PS:
                    struct.pack_into("<Q", data, 8 * i, (e & ~ADDR_MASK) | clone(e & ADDR_MASK, lvl - 1))
            lab.mem.write(n, bytes(data))
            return n
        fake_root = clone(root, 4)
        gpa = lab.work[2]
        t = fake_root
        for lvl in (4, 3, 2):
            t = lab.mem.read_u64(t + 8 * npt_index(gpa, lvl)) & ADDR_MASK
        s = t + 8 * npt_index(gpa, 1)
        lab.mem.write_u64(s, (lab.mem.read_u64(s) & ~ADDR_MASK) | lab.other_page)

        def tamper():
            v = lab.mem.read_u64(lab.victim.vmsa)
            lab.mem.write_u64(lab.victim.vmsa, (v & ~ADDR_MASK) | fake_root)
        return run_tamper(cfg, lab, tamper, bad_hpas=[lab.other_page], name="swap_root_pointer",
                          what=f"nCR3 swapped {root:#x} -> forged table at {fake_root:#x}")


@scenario("swap_root_to_other_guest", "root_swap", DETECTED)
def sc_swap_root_other(cfg):
    """Point the victim's nCR3 at the other guest's (valid, PSP-made) table."""
    with Lab(cfg) as lab:
        other_root = lab.vmm.npt_root(lab.other)

        def tamper():
            lab.mem.write_u64(lab.victim.vmsa, other_root)
        return run_tamper(cfg, lab, tamper, bad_hpas=[lab.other_page],
                          name="swap_root_to_other_guest",
                          what=f"victim nCR3 -> the other guest's root {other_root:#x}")


@scenario("map_table_page_by_write", "bad_hpa", DETECTED)
def sc_map_table_by_write(cfg):
    """Direct write: map the victim's own NPT root page, writable, into the guest."""
    with Lab(cfg) as lab:
        root = lab.vmm.npt_root(lab.victim)
        gpa = lab.work[9]
        slot = lab.leaf(gpa)
        return run_tamper(cfg, lab, lambda: lab.mem.write_u64(slot, root | P | W | U),
                          bad_hpas=[root], name="map_table_page_by_write",
                          what=f"GPA {gpa:#x} -> the NPT root page {root:#x} (RW)")


@scenario("map_psp_memory_by_write", "bad_hpa", DETECTED)
def sc_map_psp_by_write(cfg):
    """Direct write: map PSP/firmware memory into the guest."""
    with Lab(cfg) as lab:
        fw = lab.vmm.fw_base
        gpa = lab.work[10]
        slot = lab.leaf(gpa)
        return run_tamper(cfg, lab, lambda: lab.mem.write_u64(slot, fw | P | W | U),
                          bad_hpas=[fw], name="map_psp_memory_by_write",
                          what=f"GPA {gpa:#x} -> PSP memory {fw:#x}")


@scenario("map_huge_by_write", "bad_hpa", DETECTED)
def sc_map_huge_by_write(cfg):
    """Direct write: turn a PD entry into a 2 MiB leaf over other guests' memory."""
    with Lab(cfg) as lab:
        gpa = lab.work[0]
        pd_slot = entry_addr(lab.vmm, lab.victim, gpa, 2)
        block = lab.other_page & ~(MB2 - 1)
        bad = [block + i * PAGE for i in range(512)]
        return run_tamper(cfg, lab, lambda: lab.mem.write_u64(pd_slot, block | P | W | U | PS),
                          bad_hpas=bad, name="map_huge_by_write",
                          what=f"PD entry of {gpa:#x} -> 2 MiB leaf at {block:#x} (covers the "
                               f"other guest's page)")


# ---------------------------------------------------------------------------
# refused: crafted PSP commands. Each subcase must be refused with the
# expected status and change nothing (digest, host memory of the table,
# translation).

def _refusals(lab, cases, name, what):
    """cases: [(label, expected_status, callable -> Reply, (vm, gpa, bad_hpa) or None)]"""
    statuses = []
    notes = []
    vmm = lab.vmm
    for label, want, send, probe in cases:
        d0 = {v.handle: lab.digest(v) for v in (lab.victim, lab.other)}
        r = send()
        statuses.append(f"{label}:{r.name}")
        if r.ok:
            raise Undetected(f"{label}: the PSP accepted it ({what})")
        if r.status in (Status.INTEGRITY_FAILURE, Status.GUEST_STOPPED, Status.INTERNAL_ERROR):
            raise RuntimeError(f"{label}: unexpected {r.name}")
        if want is not None and r.status != want:
            notes.append(f"{label} refused with {r.name}, expected {Status(want).name}")
        d1 = {v.handle: lab.digest(v) for v in (lab.victim, lab.other)}
        if d0 != d1:
            raise Undetected(f"{label}: refused ({r.name}) but the table digest changed")
        if probe is not None:
            vm, gpa, bad = probe
            f = frame_of(vmm, vm, gpa)
            if f is not None and bad is not None and bad <= f < bad + MB2:
                raise Undetected(f"{label}: refused ({r.name}) but GPA {gpa:#x} maps {f:#x}")
    for v in (lab.victim, lab.other):
        if not vmm.psp.verify(v.handle).ok:
            raise Undetected("a refused command left a table that fails VERIFY")
    detail = f"{what}: " + ", ".join(statuses)
    if notes:
        detail += " (" + "; ".join(notes) + ")"
    return AttackResult(name, REFUSED, exposure_insns=0, statuses=statuses, detail=detail)


def _upd(lab, vm, gpa, hpa, level=1, attrs=ATTR_RWX, npages=1):
    return lambda: lab.psp.update_npt(vm.handle, gpa, hpa, level, attrs, npages)


@scenario("severed_remap_by_command", "severed_remap", REFUSED)
def sc_severed_by_cmd(cfg):
    """SEVered by command: UPDATE_NPT the victim's GPA onto another guest's page."""
    with Lab(cfg) as lab:
        v = lab.victim
        free_gpa = lab.base + 0x80000
        cases = [
            ("other_guest_mapped_page", Status.PAGE_OWNED,
             _upd(lab, v, free_gpa, lab.other_page), (v, free_gpa, lab.other_page)),
        ]
        priv = lab.fresh()
        assert lab.psp.set_private_memory(lab.other.handle, priv, 1).ok
        cases.append(("other_guest_private_page", Status.BAD_OWNER,
                      _upd(lab, v, free_gpa, priv), (v, free_gpa, priv)))
        cases.append(("unmap_then_remap", Status.GPA_MAPPED,
                      _upd(lab, v, lab.work[0], lab.fresh()), None))
        return _refusals(lab, cases, "", "remap onto the other guest's memory by command")


@scenario("alias_by_command", "alias", REFUSED)
def sc_alias_by_command(cfg):
    """Alias two GPAs onto one HPA by UPDATE_NPT (same guest, 4K and 2M)."""
    with Lab(cfg) as lab:
        v = lab.victim
        hpa0 = frame_of(lab.vmm, v, lab.work[0])
        gpa = lab.base + 0x90000
        block = hpa0 & ~(MB2 - 1)
        run = lab.fresh(3)
        assert lab.psp.update_npt(v.handle, lab.base + 0x98000, run + PAGE).ok
        cases = [
            ("same_guest_4k", Status.PAGE_OWNED, _upd(lab, v, gpa, hpa0), (v, gpa, hpa0)),
            ("same_guest_range", Status.PAGE_OWNED,
             _upd(lab, v, gpa, run, npages=3), (v, gpa + PAGE, run + PAGE)),
            ("same_guest_2m_over_frame", None,
             _upd(lab, v, 0x80000000, block, level=2), (v, 0x80000000, block)),
        ]
        return _refusals(lab, cases, "", "alias by command")


@scenario("map_table_page", "bad_hpa", REFUSED)
def sc_map_table_page(cfg):
    """UPDATE_NPT with an HPA that is an NPT page (root, leaf table, free pool page)."""
    with Lab(cfg) as lab:
        v = lab.victim
        gpa = lab.base + 0xA0000
        root = lab.vmm.npt_root(v)
        pt = lab.leaf(lab.work[0]) & ~0xFFF
        other_root = lab.vmm.npt_root(lab.other)
        from hv.vmm.vmm import POOL_CHUNK
        pool_page = lab.vmm.alloc.base + (POOL_CHUNK - 1) * PAGE
        cases = [
            ("own_root", Status.TABLE_PAGE, _upd(lab, v, gpa, root), (v, gpa, root)),
            ("own_leaf_table", Status.TABLE_PAGE, _upd(lab, v, gpa, pt), (v, gpa, pt)),
            ("other_guest_root", Status.TABLE_PAGE, _upd(lab, v, gpa, other_root), (v, gpa, other_root)),
            ("free_pool_page", Status.TABLE_PAGE, _upd(lab, v, gpa, pool_page), (v, gpa, pool_page)),
            ("vmsa_page", Status.BAD_PAGE_STATE, _upd(lab, v, gpa, v.vmsa), (v, gpa, v.vmsa)),
            ("2m_covering_tables", Status.TABLE_PAGE,
             _upd(lab, v, 0x80000000, root & ~(MB2 - 1), level=2), (v, 0x80000000, root & ~(MB2 - 1))),
            ("set_private_on_table", Status.TABLE_PAGE,
             lambda: lab.psp.set_private_memory(v.handle, root, 1), None),
            ("pool_add_table", Status.TABLE_PAGE, lambda: lab.psp.pool_add(pt, 1), None),
        ]
        return _refusals(lab, cases, "", "map an NPT page")


@scenario("map_psp_memory", "bad_hpa", REFUSED)
def sc_map_psp_memory(cfg):
    """UPDATE_NPT / SET_PRIVATE_MEMORY / POOL_ADD with PSP (firmware) memory."""
    with Lab(cfg) as lab:
        v = lab.victim
        fw = lab.vmm.fw_base
        gpa = lab.base + 0xB0000
        cases = [
            ("fw_first_page", Status.FIRMWARE_PAGE, _upd(lab, v, gpa, fw), (v, gpa, fw)),
            ("fw_last_page", Status.FIRMWARE_PAGE,
             _upd(lab, v, gpa, lab.vmm.mem.size - PAGE), (v, gpa, lab.vmm.mem.size - PAGE)),
            ("range_into_fw", Status.FIRMWARE_PAGE,
             _upd(lab, v, gpa, fw - PAGE, npages=2), (v, gpa, fw - PAGE)),
            ("fw_2m", Status.FIRMWARE_PAGE, _upd(lab, v, 0x80000000, fw, level=2), (v, 0x80000000, fw)),
            ("set_private_fw", Status.FIRMWARE_PAGE,
             lambda: lab.psp.set_private_memory(v.handle, fw, 1), None),
            ("pool_add_fw", Status.FIRMWARE_PAGE, lambda: lab.psp.pool_add(fw, 1), None),
            ("launch_start_vmsa_fw", Status.FIRMWARE_PAGE, lambda: lab.psp.launch_start(fw), None),
        ]
        return _refusals(lab, cases, "", "map PSP memory")


@scenario("map_other_guest_page", "bad_hpa", REFUSED)
def sc_map_other_guest(cfg):
    """UPDATE_NPT with another guest's mapped, private, table and VMSA frames."""
    with Lab(cfg) as lab:
        v, o = lab.victim, lab.other
        gpa = lab.base + 0xC0000
        priv = lab.fresh()
        assert lab.psp.set_private_memory(o.handle, priv, 1).ok
        cases = [
            ("mapped", Status.PAGE_OWNED, _upd(lab, v, gpa, lab.other_page), (v, gpa, lab.other_page)),
            ("private", Status.BAD_OWNER, _upd(lab, v, gpa, priv), (v, gpa, priv)),
            ("vmsa", Status.BAD_PAGE_STATE, _upd(lab, v, gpa, o.vmsa), (v, gpa, o.vmsa)),
            ("claim_private", Status.BAD_OWNER,
             lambda: lab.psp.set_private_memory(v.handle, priv, 1), None),
            ("claim_mapped", Status.BAD_OWNER,
             lambda: lab.psp.set_private_memory(v.handle, lab.other_page, 1), None),
            ("reclaim_others", Status.BAD_OWNER, lambda: lab.psp.reclaim(v.handle, priv), None),
            ("unmap_others_gpa_via_own_handle", Status.GPA_NOT_MAPPED,
             lambda: lab.psp.unmap(v.handle, 0x900000), None),
        ]
        return _refusals(lab, cases, "", "take another guest's frames")


@scenario("map_out_of_range", "bad_hpa", REFUSED)
def sc_map_out_of_range(cfg):
    """HPAs and GPAs outside host memory / the GPA space."""
    with Lab(cfg) as lab:
        v = lab.victim
        size = lab.vmm.mem.size
        gpa = lab.base + 0xD0000
        cases = [
            ("hpa_at_end", Status.OUT_OF_RANGE, _upd(lab, v, gpa, size), None),
            ("hpa_far", Status.OUT_OF_RANGE, _upd(lab, v, gpa, 1 << 51), None),
            ("hpa_beyond_52_bits", Status.OUT_OF_RANGE, _upd(lab, v, gpa, 1 << 60), None),
            ("gpa_at_limit", Status.OUT_OF_RANGE, _upd(lab, v, 1 << 48, lab.fresh()), None),
            ("gpa_huge", Status.OUT_OF_RANGE, _upd(lab, v, (1 << 64) - PAGE, lab.fresh()), None),
            ("reclaim_out_of_range", Status.OUT_OF_RANGE, lambda: lab.psp.reclaim(v.handle, size), None),
            ("bad_level", Status.INVALID_PARAM, _upd(lab, v, gpa, lab.fresh(), level=3), None),
            ("bad_attrs", Status.INVALID_PARAM, _upd(lab, v, gpa, lab.fresh(), attrs=0xFF), None),
            ("bad_handle", Status.INVALID_HANDLE,
             lambda: lab.psp.update_npt(0xDEAD, gpa, lab.fresh()), None),
        ]
        return _refusals(lab, cases, "", "out-of-range addresses")


@scenario("map_misaligned", "bad_hpa", REFUSED)
def sc_map_misaligned(cfg):
    """Misaligned HPAs and GPAs (4K and 2M levels)."""
    with Lab(cfg) as lab:
        v = lab.victim
        f = lab.fresh()
        b = lab.fresh(512, align=MB2)
        gpa = lab.base + 0xE0000
        cases = [
            ("hpa_plus_8", Status.MISALIGNED, _upd(lab, v, gpa, f + 8), (v, gpa, f)),
            ("hpa_plus_2048", Status.MISALIGNED, _upd(lab, v, gpa, f + 2048), (v, gpa, f)),
            ("gpa_plus_16", Status.MISALIGNED, _upd(lab, v, gpa + 16, f), None),
            ("2m_hpa_4k_aligned", Status.MISALIGNED,
             _upd(lab, v, 0x80000000, b + PAGE, level=2), (v, 0x80000000, b)),
            ("2m_gpa_4k_aligned", Status.MISALIGNED,
             _upd(lab, v, 0x80000000 + PAGE, b, level=2), None),
            ("reclaim_misaligned", Status.MISALIGNED, lambda: lab.psp.reclaim(v.handle, f + 1), None),
            ("pool_add_misaligned", Status.MISALIGNED, lambda: lab.psp.pool_add(f + 64, 1), None),
        ]
        return _refusals(lab, cases, "", "misaligned addresses")


@scenario("range_overlap", "range", REFUSED)
def sc_range_overlap(cfg):
    """Ranges that overlap mapped GPAs, owned HPAs, or 2M over 4K mappings."""
    with Lab(cfg) as lab:
        v = lab.victim
        run = lab.fresh(4)
        tri = lab.fresh(3)
        assert lab.psp.update_npt(v.handle, lab.base + 0x99000, tri + PAGE).ok
        hpa1 = tri + PAGE
        cases = [
            ("gpa_range_over_mapped", Status.GPA_MAPPED,
             _upd(lab, v, lab.work[-1] - PAGE, run, npages=4), None),
            ("gpa_range_ends_on_mapped", Status.GPA_MAPPED,
             _upd(lab, v, lab.base - 2 * PAGE, run, npages=3), None),
            ("hpa_range_over_owned", Status.PAGE_OWNED,
             _upd(lab, v, lab.base + 0x100000, hpa1 - PAGE, npages=3), (v, lab.base + 0x101000, hpa1)),
            ("huge_over_small", Status.RANGE_OVERLAP,
             _upd(lab, v, lab.base & ~(MB2 - 1), lab.fresh(512, align=MB2), level=2), None),
            ("set_private_over_mapped", Status.BAD_PAGE_STATE,
             lambda: lab.psp.set_private_memory(v.handle, hpa1 - PAGE, 3), None),
            ("pool_add_over_mapped", Status.PAGE_OWNED,
             lambda: lab.psp.pool_add(hpa1 - PAGE, 3), None),
        ]
        # a small page under an existing 2 MiB leaf
        big = lab.fresh(512, align=MB2)
        assert lab.psp.update_npt(v.handle, 0xC0000000, big, 2, ATTR_RWX, 1).ok
        cases.append(("small_under_huge", Status.GPA_MAPPED,
                      _upd(lab, v, 0xC0000000 + 5 * PAGE, lab.fresh()), None))
        return _refusals(lab, cases, "", "overlapping ranges")


@scenario("range_overflow", "range", REFUSED)
def sc_range_overflow(cfg):
    """Ranges whose end wraps or passes the address space; absurd page counts."""
    with Lab(cfg) as lab:
        v = lab.victim
        gpa = lab.base + 0xF0000
        cases = [
            ("hpa_wraps_2^64", Status.RANGE_OVERFLOW, _upd(lab, v, gpa, (1 << 64) - PAGE, npages=2), None),
            ("hpa_end_past_memory", Status.OUT_OF_RANGE,
             _upd(lab, v, gpa, lab.vmm.mem.size - PAGE, npages=2), None),
            ("gpa_end_past_2^48", Status.RANGE_OVERFLOW,
             _upd(lab, v, (1 << 48) - PAGE, lab.fresh(2), npages=2), None),
            ("2m_gpa_end_past_2^48", Status.RANGE_OVERFLOW,
             _upd(lab, v, (1 << 48) - MB2, lab.fresh(1024, align=MB2), level=2, npages=2), None),
            ("npages_zero", Status.INVALID_PARAM, _upd(lab, v, gpa, lab.fresh(), npages=0), None),
            ("npages_2^32-1", Status.INVALID_PARAM, _upd(lab, v, gpa, lab.fresh(), npages=0xFFFFFFFF), None),
            ("pool_add_wraps", Status.RANGE_OVERFLOW, lambda: lab.psp.pool_add((1 << 64) - PAGE, 2), None),
            ("reclaim_wraps", Status.RANGE_OVERFLOW,
             lambda: lab.psp.reclaim(v.handle, (1 << 64) - PAGE, 2), None),
            ("set_private_wraps", Status.RANGE_OVERFLOW,
             lambda: lab.psp.set_private_memory(v.handle, (1 << 64) - PAGE, 2), None),
        ]
        return _refusals(lab, cases, "", "overflowing ranges")


@scenario("reclaim_unscrubbed", "reclaim", REFUSED)
def sc_reclaim_unscrubbed(cfg):
    """Get a guest's frame back unscrubbed: reclaim/re-donate while mapped or private."""
    with Lab(cfg) as lab:
        v, o = lab.victim, lab.other
        gpa = lab.work[11]
        hpa = frame_of(lab.vmm, v, gpa)
        secret = b"VICTIM SECRET KEY MATERIAL"
        lab.mem.write(hpa, secret)
        cases = [
            ("reclaim_mapped", Status.BAD_PAGE_STATE, lambda: lab.psp.reclaim(v.handle, hpa), None),
            ("reclaim_by_other_guest", Status.BAD_OWNER, lambda: lab.psp.reclaim(o.handle, hpa), None),
            ("pool_add_mapped", Status.PAGE_OWNED, lambda: lab.psp.pool_add(hpa, 1), None),
            ("donate_mapped_to_other", Status.BAD_OWNER,
             lambda: lab.psp.set_private_memory(o.handle, hpa, 1), None),
            ("map_into_other", Status.PAGE_OWNED, _upd(lab, o, 0xA00000, hpa), (o, 0xA00000, hpa)),
        ]
        res = _refusals(lab, cases, "", "re-use a mapped frame")
        assert lab.psp.unmap(v.handle, gpa).ok
        cases = [
            ("map_unmapped_into_other", Status.BAD_OWNER, _upd(lab, o, 0xA00000, hpa), (o, 0xA00000, hpa)),
            ("donate_private_to_other", Status.BAD_OWNER,
             lambda: lab.psp.set_private_memory(o.handle, hpa, 1), None),
            ("pool_add_private", Status.BAD_PAGE_STATE, lambda: lab.psp.pool_add(hpa, 1), None),
            ("launch_start_on_private", Status.BAD_PAGE_STATE, lambda: lab.psp.launch_start(hpa), None),
        ]
        res2 = _refusals(lab, cases, "", "re-use an unmapped private frame")
        r = lab.psp.reclaim(v.handle, hpa)
        if not r.ok:
            raise RuntimeError(f"legitimate RECLAIM refused: {r.name}")
        if lab.mem.read(hpa, PAGE) != bytes(PAGE):
            raise Undetected("RECLAIM handed the frame back without scrubbing it")
        again = lab.psp.reclaim(v.handle, hpa)
        if again.ok:
            raise Undetected("a frame was reclaimed twice")
        # decommission scrubs too
        ohpa = lab.other_page
        assert lab.psp.decommission(o.handle).ok
        if lab.mem.read(ohpa, PAGE) != bytes(PAGE):
            raise Undetected("DECOMMISSION handed a frame back without scrubbing it")
        res.statuses += res2.statuses + [f"double_reclaim:{again.name}"]
        res.detail = ("mapped/private frame cannot be reclaimed, re-donated or mapped elsewhere ("
                      + ", ".join(res.statuses) + "); RECLAIM and DECOMMISSION return zeros")
        return res


@scenario("pool_prefill", "reclaim", REFUSED)
def sc_pool_prefill(cfg):
    """Pre-fill donated table-pool frames with crafted entries before the PSP uses them."""
    with Lab(cfg) as lab:
        v = lab.victim
        n = 8
        pool = lab.fresh(n)
        crafted = struct.pack("<Q", lab.other_page | P | W | U) * 512
        for i in range(n):
            lab.mem.write(pool + i * PAGE, crafted)
        assert lab.psp.pool_add(pool, n).ok
        for i in range(n):      # and again after the donation: the VMM can still write them
            lab.mem.write(pool + i * PAGE, crafted)
        base = 0x5000000000
        for k in range(3):       # new GPA regions need new table pages
            lab.vmm.touch(v, base + k * (1 << 30), ACC_W)
        root = lab.vmm.npt_root(v)
        for gpa, hpa, _sz, _e in lab.vmm.engine.mappings(root):
            if hpa == lab.other_page:
                raise Undetected(f"a crafted pool entry became live: GPA {gpa:#x} -> other guest")
        if not lab.psp.verify(v.handle).ok:
            raise RuntimeError("VERIFY failed after legitimate updates")
        used = sorted(h for h, _l in lab.vmm.engine.table_pages(root) if pool <= h < pool + n * PAGE)
        return AttackResult("", REFUSED, exposure_insns=0, statuses=["adopted_scrubbed"],
                            detail=f"{len(used)} pre-filled pool frames became table pages; the PSP "
                                   f"scrubbed each before use, no crafted entry became live")


# ---------------------------------------------------------------------------
# races: a second VMM thread

@scenario("race_check_write", "race", DETECTED)
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

        def hammer():
            mem = lab.mem
            while not stop.is_set():
                mem.write_u64(slot, bad)
                mem.write_u64(slot, good)
                writes[0] += 2
            mem.write_u64(slot, bad)       # leave the tamper in place

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
                r = lab.psp.update_npt(v.handle, gpa, lab.fresh())
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


@scenario("race_between_check_and_write", "race", DETECTED)
def sc_race_window(cfg):
    """Deterministic race: the VMM writes an entry after the PSP's check, before its write."""
    with Lab(cfg) as lab:
        psp_obj = getattr(lab.vmm, "_psp_obj", None)
        if psp_obj is None:
            return AttackResult("", SKIPPED, detail="needs the in-process PSP to open the window")
        v = lab.victim
        target = lab.work[3]
        slot = lab.leaf(target)
        good = lab.mem.read_u64(slot)
        bad = (good & ~ADDR_MASK) | lab.other_page
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


@scenario("race_concurrent_commands", "race", REFUSED)
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
                r = lab.psp.update_npt(vm.handle, g, h)
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

@scenario("periodic_wall_clock", "periodic", DETECTED)
def sc_periodic_wall(cfg):
    """SEVered remap caught by the PSP's wall-time periodic checker (no VMM help)."""
    with Lab(cfg) as lab:
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

@scenario("benign_accessed_dirty", "benign", NOT_FLAGGED)
def sc_benign_ad(cfg):
    """Accessed/Dirty bit updates (by the walker and by hand) must not be flagged."""
    with Lab(cfg) as lab:
        vmm, v = lab.vmm, lab.victim
        pattern = [(g, (ACC_W, ACC_R, ACC_X)[i % 3]) for i, g in enumerate(lab.work)]
        loop = AccessLoop(lab, v, pattern, cfg.check_every)
        flips = 0

        def flip_ad(set_bits):
            n = 0
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


def scenario_names(category=None):
    return [n for n, s in SCENARIOS.items() if category is None or s.category == category]


def summarize(results):
    out = {k: 0 for k in OUTCOMES}
    for r in results:
        out[r.outcome] = out.get(r.outcome, 0) + 1
    out["total"] = len(results)
    out["failed"] = sum(1 for r in results if not r.ok)
    return {k: v for k, v in out.items() if v or k in ("total", "failed", UNDETECTED)}


# ---------------------------------------------------------------------------
# guest-driven variants: a real toy guest on the emulated CPU (hv.boot)

_GUEST_LOADED = False


def load_guest_scenarios(driver="auto"):
    """Register the guest-driven scenarios (driver "auto" or "guest")."""
    global _GUEST_LOADED
    if driver == "trace" or _GUEST_LOADED:
        return
    _GUEST_LOADED = True
    for fn in _GUEST_SCENARIOS:
        fn()


_GUEST_SCENARIOS = []


class _GuestStopped(Exception):
    """Raised from on_slice to end a run the PSP stopped (the PSP halts the VM)."""

    def __init__(self, insns, by, where=None):
        super().__init__(by)
        self.insns, self.by, self.where = insns, by, where


def _guest_tools():
    """(Boot, {name: image path}) or raise _Skip."""
    try:
        from hv.machine.boot import Boot
    except ImportError as e:
        raise _Skip(f"hv.boot not available ({e})") from None
    try:
        from guests.build import build_all
        imgs = build_all()
    except Exception as e:      # no gcc, not run from the source tree, ...
        raise _Skip(f"guest images unavailable ({e.__class__.__name__}: {e})") from None
    return Boot, imgs


class _Skip(Exception):
    pass


class GuestLab:
    """A real toy guest (default `compute`: a sieve over 1 MB of demand-faulted
    bss, ~13.9 M instructions) booted through hv.boot, next to an innocent
    guest holding a secret. `at_npf(k, fn)`: the malicious VMM runs fn(gpa)
    inside its own NPF handler, right after serving the victim's k-th NPF
    (mid-slice: the guest resumes on the tampered table)."""

    def __init__(self, cfg, image="compute", mem=16 << 20, check_insns=None, on_slice=None,
                 slice_insns=None):
        Boot, imgs = _guest_tools()
        self.cfg = cfg
        self.vmm = cfg.new_vmm()
        vmm = self.vmm
        self.other = vmm.create_vm()
        self.other_page = vmm.touch(self.other, 0x100000, ACC_W) & ~0xFFF
        vmm.mem.write(self.other_page, b"OTHER GUEST SECRET")
        self.victim = None
        self.npf_hooks = {}
        self.npf_gpas = []
        self.tamper_insns = None
        real = vmm.handle_npf

        def handle_npf(vm, gpa, *a, **kw):
            st = real(vm, gpa, *a, **kw)
            if vm is self.victim:
                self.npf_gpas.append(gpa & ~0xFFF)
                fn = self.npf_hooks.pop(len(self.npf_gpas), None)
                if fn is not None:
                    fn(gpa & ~0xFFF)
                    self.tamper_insns = self.boot.instructions
                    self.flush()
            return st
        vmm.handle_npf = handle_npf        # the VMM is the attacker: its own NPF path
        self.boot = Boot(vmm, str(imgs[image]), mem=mem, check_insns=check_insns,
                         on_slice=on_slice, slice_insns=slice_insns)
        self.victim = self.boot.vm

    def flush(self):
        """The VMM can always flush the emulated CPU's TLB."""
        for cb in self.victim.on_npt_change:
            cb()

    def at_npf(self, k, fn):
        self.npf_hooks[k] = fn

    def fresh(self, n=1, align=PAGE):
        return self.vmm.alloc.alloc(n, align=align)

    def leaf(self, gpa):
        return entry_addr(self.vmm, self.victim, gpa, 1)

    def close(self):
        try:
            self.boot.close()
        finally:
            self.vmm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _guest_result(lab, res, what, max_insns):
    """Turn a BootResult after a mid-run tamper into an AttackResult."""
    if res.exit_reason == "psp_stopped" and lab.tamper_insns is not None:
        t = res.tamper or {}
        where = None
        if t.get("page_hpa") is not None:
            where = {"page_hpa": hex(t["page_hpa"]), "entry_index": t["entry_index"],
                     "expected": hex(t["expected"]), "found": hex(t["found"])}
        by = "periodic" if t.get("detected_by", "").startswith(("CHECK_ALL", "VERIFY")) else "update"
        exposure = res.instructions - lab.tamper_insns
        note = confirm_stopped(lab, lab.victim)
        return AttackResult(
            "", DETECTED, exposure_insns=exposure, driver="guest", exposure_unit="insns",
            detected_by=by, where=where,
            detail=f"{what}; the guest ran {exposure} instructions on the tampered table before "
                   f"the {_by_text(by)} stopped it (hv boot: exit_reason psp_stopped, exit code "
                   f"{res.exit_code}): {_fmt_where(where)}{note}")
    if lab.tamper_insns is None:
        raise RuntimeError(f"the tamper never ran (run ended: {res.exit_reason}: {res.reason})")
    raise Undetected(f"{what}; the guest ran on to {res.exit_reason} ({res.reason}) "
                     f"{res.instructions - lab.tamper_insns} instructions after the tamper")


def _guest_scenario(name, category, expected):
    def deco(fn):
        def wrapped(cfg):
            try:
                return fn(cfg)
            except _Skip as e:
                return AttackResult("", SKIPPED, driver="guest", exposure_unit="insns",
                                    detail=str(e))
        wrapped.__doc__ = fn.__doc__
        _GUEST_SCENARIOS.append(lambda: scenario(name, category, expected, driver="guest")(wrapped))
        return fn
    return deco


GUEST_NPF = 40          # tamper after the victim's 40th demand fault (inside the sieve's bss)
GUEST_BUDGET = 20_000_000


@_guest_scenario("guest_severed_remap", "severed_remap", DETECTED)
def gsc_severed_remap(cfg):
    """Guest-driven SEVered: mid-run, remap the page the guest is writing onto another guest's page."""
    with GuestLab(cfg, check_insns=cfg.guest_check_insns) as lab:
        def tamper(gpa):
            s = lab.leaf(gpa)
            v = lab.vmm.mem.read_u64(s)
            lab.vmm.mem.write_u64(s, (v & ~ADDR_MASK) | lab.other_page)
        lab.at_npf(GUEST_NPF, tamper)
        res = lab.boot.run(GUEST_BUDGET)
        return _guest_result(lab, res, "compute's bss page remapped onto the other guest's page "
                                       "inside the VMM's NPF handler", GUEST_BUDGET)


@_guest_scenario("guest_alias_by_write", "alias", DETECTED)
def gsc_alias(cfg):
    """Guest-driven alias: mid-run, point the page being written at an earlier page's frame."""
    with GuestLab(cfg, check_insns=cfg.guest_check_insns) as lab:
        def tamper(gpa):
            first = lab.npf_gpas[0]
            hpa = frame_of(lab.vmm, lab.victim, first)
            s = lab.leaf(gpa)
            lab.vmm.mem.write_u64(s, (lab.vmm.mem.read_u64(s) & ~ADDR_MASK) | hpa)
        lab.at_npf(GUEST_NPF, tamper)
        res = lab.boot.run(GUEST_BUDGET)
        return _guest_result(lab, res, "two guest pages aliased onto one frame by a direct write",
                             GUEST_BUDGET)


@_guest_scenario("guest_swap_root_pointer", "root_swap", DETECTED)
def gsc_swap_root(cfg):
    """Guest-driven root swap: mid-run, nCR3 -> a forged copy of the table with one page redirected."""
    with GuestLab(cfg, check_insns=cfg.guest_check_insns) as lab:
        vmm = lab.vmm

        def tamper(gpa):
            def clone(t, lvl):
                n = vmm.alloc.alloc(1)
                data = bytearray(vmm.mem.read(t, PAGE))
                for i in range(512):
                    e = struct.unpack_from("<Q", data, 8 * i)[0]
                    if e & P and lvl > 1 and not e & PS:
                        struct.pack_into("<Q", data, 8 * i, (e & ~ADDR_MASK) | clone(e & ADDR_MASK, lvl - 1))
                vmm.mem.write(n, bytes(data))
                return n
            fake = clone(vmm.npt_root(lab.victim), 4)
            t = fake
            for lvl in (4, 3, 2):
                t = vmm.mem.read_u64(t + 8 * npt_index(gpa, lvl)) & ADDR_MASK
            s = t + 8 * npt_index(gpa, 1)
            vmm.mem.write_u64(s, (vmm.mem.read_u64(s) & ~ADDR_MASK) | lab.other_page)
            vmm.mem.write_u64(lab.victim.vmsa, fake)
        lab.at_npf(GUEST_NPF, tamper)
        res = lab.boot.run(GUEST_BUDGET)
        return _guest_result(lab, res, "nCR3 swapped for a forged table mid-run", GUEST_BUDGET)


@_guest_scenario("guest_severed_periodic", "periodic", DETECTED)
def gsc_periodic(cfg):
    """Guest-driven, no NPF after the tamper: caught by the instruction-count periodic check."""
    every = cfg.guest_check_insns
    slice_n = max(1, every // 10)
    start_at = 2_000_000            # compute is in the sieve by then: no more NPFs
    state = {"last_check": 0, "tampered_at": None, "target": None}
    holder = {}

    def on_slice(boot, insns):
        lab = holder["lab"]
        # the PSP's instruction-count timer: CHECK_ALL every `every` guest instructions
        if insns - state["last_check"] >= every:
            state["last_check"] = insns
            r = lab.vmm.psp.check_all()
            if r.status == Status.INTEGRITY_FAILURE:
                raise _GuestStopped(insns, "periodic", _where(r))
        # the attacker: tamper right after a check, once the guest has faulted in its bss
        if state["tampered_at"] is None and insns >= start_at and state["last_check"] == insns:
            gpa = lab.npf_gpas[-1]
            s = lab.leaf(gpa)
            v = lab.vmm.mem.read_u64(s)
            lab.vmm.mem.write_u64(s, (v & ~ADDR_MASK) | lab.other_page)
            state["tampered_at"] = insns
            state["target"] = gpa
    with GuestLab(cfg, on_slice=on_slice, slice_insns=slice_n) as lab:
        holder["lab"] = lab
        try:
            res = lab.boot.run(GUEST_BUDGET)
        except _GuestStopped as d:
            exp = d.insns - state["tampered_at"]
            note = confirm_stopped(lab, lab.victim)
            return AttackResult(
                "", DETECTED, exposure_insns=exp, driver="guest", exposure_unit="insns",
                detected_by="periodic", where=d.where,
                detail=f"compute's bss page {state['target']:#x} remapped onto the other guest's "
                       f"page right after a check, at instruction {state['tampered_at']}; the next "
                       f"periodic check ({every} instructions later) caught it: "
                       f"{_fmt_where(d.where)}{note}")
        if state["tampered_at"] is None:
            raise RuntimeError(f"the guest ended ({res.exit_reason}) before the tamper")
        raise Undetected(f"the guest ran to {res.exit_reason} after the tamper")


@_guest_scenario("guest_tamper_on_slice", "periodic", DETECTED)
def gsc_on_slice(cfg):
    """Tamper from hv.boot's on_slice hook; Boot's --check-insns check ends the run with exit 3."""
    state = {}

    def on_slice(boot, insns):
        if "t" not in state and insns >= 1_000_000:
            lab = state["lab"]
            gpa = lab.npf_gpas[-1]
            s = lab.leaf(gpa)
            lab.vmm.mem.write_u64(s, lab.vmm.mem.read_u64(s) ^ NX)     # NX toggled
            state["t"] = insns
            lab.tamper_insns = insns
    with GuestLab(cfg, check_insns=cfg.guest_check_insns, on_slice=on_slice) as lab:
        state["lab"] = lab
        res = lab.boot.run(GUEST_BUDGET)
        r = _guest_result(lab, res, "NX toggled on a data page from on_slice (after that "
                                    "boundary's check: live until the next check at the latest)", GUEST_BUDGET)
        if res.exit_code != 3:
            raise Undetected(f"hv boot exit code {res.exit_code}, not 3")
        return r


@_guest_scenario("guest_race_check_write", "race", DETECTED)
def gsc_race(cfg):
    """A VMM thread hammers an entry while the guest faults pages in (UPDATE_NPT)."""
    with GuestLab(cfg, image="memtouch", check_insns=cfg.guest_check_insns) as lab:
        stop = threading.Event()
        armed = threading.Event()
        slot = {}

        def arm(gpa):
            s = lab.leaf(gpa)
            slot["s"], slot["good"] = s, lab.vmm.mem.read_u64(s)
            slot["bad"] = (slot["good"] & ~ADDR_MASK) | lab.other_page
            armed.set()

        def hammer():
            armed.wait()
            mem = lab.vmm.mem
            s, good, bad = slot["s"], slot["good"], slot["bad"]
            while not stop.is_set():
                mem.write_u64(s, bad)
                mem.write_u64(s, good)
            mem.write_u64(s, bad)
        lab.at_npf(GUEST_NPF, arm)
        th = threading.Thread(target=hammer, daemon=True)
        th.start()
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            res = lab.boot.run(GUEST_BUDGET)
        finally:
            stop.set()
            armed.set()
            th.join()
            sys.setswitchinterval(old)
        if res.exit_reason != "psp_stopped":
            r = lab.vmm.psp.check_all()      # the thread left its value: must not be in the digest
            if r.status != Status.INTEGRITY_FAILURE:
                raise Undetected(f"racing writes folded into the digest (run: {res.exit_reason})")
            return AttackResult("", DETECTED, exposure_insns=res.instructions - lab.tamper_insns,
                                driver="guest", exposure_unit="insns", detected_by="periodic",
                                where=_where(r), detail="racing writes caught by CHECK_ALL after "
                                                        "the run" + confirm_stopped(lab, lab.victim))
        return _guest_result(lab, res, "a thread toggled an entry while memtouch faulted pages in",
                             GUEST_BUDGET)


@_guest_scenario("guest_benign_accessed_dirty", "benign", NOT_FLAGGED)
def gsc_benign(cfg):
    """A real guest runs with periodic checks while A/D bits are set by the walker and by hand."""
    flips = [0]

    def on_slice(boot, insns):
        lab = holder["lab"]
        vmm = lab.vmm
        for t, _lvl in vmm.engine.table_pages(vmm.npt_root(lab.victim)):
            for i in range(0, 512):
                e = vmm.mem.read_u64(t + 8 * i)
                if e & P:
                    ne = e ^ AD_MASK
                    vmm.mem.write_u64(t + 8 * i, ne)
                    flips[0] += 1
    holder = {}
    budget = 3_000_000
    with GuestLab(cfg, check_insns=cfg.guest_check_insns, on_slice=on_slice) as lab:
        holder["lab"] = lab
        res = lab.boot.run(budget)
        if res.exit_reason == "psp_stopped":
            t = res.tamper or {}
            return AttackResult("", FALSE_POSITIVE, driver="guest", exposure_unit="insns",
                                detail=f"A/D updates flagged: {res.reason}",
                                where={k: t.get(k) for k in ("page_hpa", "entry_index")})
        if res.exit_reason not in ("insn_limit", "exit_port", "hlt"):
            raise RuntimeError(f"guest failed: {res.exit_reason}: {res.reason}")
        if not lab.vmm.psp.verify(lab.victim.handle).ok:
            return AttackResult("", FALSE_POSITIVE, driver="guest", detail="VERIFY failed")
        return AttackResult("", NOT_FLAGGED, driver="guest", exposure_unit="insns",
                            detail=f"compute ran {res.instructions} instructions, {res.npf} NPFs, "
                                   f"{res.checks} periodic checks, {flips[0]} A/D flips by hand "
                                   f"between slices: nothing flagged")
