"""Guest-driven variants: a real toy guest on the emulated CPU (hv.machine.boot)."""
import struct
import sys
import threading
import time

from nptcore.bits import ACC_W, AD_MASK, ADDR_MASK, NX, P, PS, index as npt_index
from psp_firmware import Status
from hv.attacks.expect import BENIGN, PERMISSION_BY_WRITE, RACE_BY_WRITE, REMAP_BY_WRITE
from hv.attacks.lab import (_by_text, _fmt_where, _where, confirm_stopped, entry_addr, frame_of,
                            host_memory_for_attacks)
from hv.attacks.registry import (AttackResult, DETECTED, FALSE_POSITIVE, NOT_FLAGGED, PAGE,
                                 Prevented, SKIPPED, Undetected, scenario)


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


OTHER_SECRET = b"OTHER GUEST SECRET"


class GuestLab:
    """A real toy guest (default `compute`: a sieve over 1 MB of demand-faulted
    bss, ~13.9 M instructions) booted through hv.boot, next to an innocent
    guest holding a secret. `at_npf(k, fn)`: the malicious VMM runs fn(gpa)
    inside its own NPF handler, right after serving the victim's k-th NPF
    (mid-slice: the guest resumes on the tampered table).

    cfg.accel "kvm": the guest runs on KVM, whose memslot follows the table
    (flush() remaps, so the guest really uses the page the VMM put there);
    the periodic check is by time (cfg.wall_ms ms: check_insns only says
    whether there is one), and exposure is counted in ms and KVM exits."""

    def __init__(self, cfg, image="compute", mem=16 << 20, check_insns=None, on_slice=None,
                 slice_insns=None):
        Boot, imgs = _guest_tools()
        self.cfg = cfg
        self.kvm = cfg.accel == "kvm"
        self.tampered = False
        self.tamper_exits = self.tamper_t = None
        self.vmm = cfg.new_vmm()
        vmm = self.vmm
        self.design = vmm.protect
        self.mem = host_memory_for_attacks(vmm)     # the attacker's writes (isolated: may fault)
        self.other = vmm.create_vm()
        self.other_page = vmm.touch(self.other, 0x100000, ACC_W) & ~0xFFF
        vmm.mem.write(self.other_page, OTHER_SECRET)
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
                    self.mark()
                    self.flush()
            return st
        vmm.handle_npf = handle_npf        # the VMM is the attacker: its own NPF path
        kw = {}
        if self.kvm:
            ms = max(1, round(cfg.wall_ms))
            kw = {"accel": "kvm", "check_ms": ms if check_insns else None, "slice_ms": ms}
            check_insns = None
        self.boot = Boot(vmm, str(imgs[image]), mem=mem, check_insns=check_insns,
                         on_slice=on_slice, slice_insns=slice_insns, **kw)
        self.victim = self.boot.vm

    def mark(self):
        """The tamper happens now: where exposure starts."""
        self.tampered = True
        self.tamper_insns = self.boot.instructions
        self.tamper_exits = getattr(self.boot.vcpu, "exits", None)
        self.tamper_t = time.perf_counter()

    def exposure(self, res=None):
        """dict(exposure_insns, exposure_ms, exposure_exits, exposure_unit) since mark()."""
        if not self.kvm:
            return {"exposure_insns": (res.instructions if res else self.boot.instructions)
                    - self.tamper_insns, "exposure_unit": "insns"}
        return {"exposure_ms": round((time.perf_counter() - self.tamper_t) * 1000, 3),
                "exposure_exits": self.boot.vcpu.exits - self.tamper_exits, "exposure_unit": "ms"}

    def other_note(self):
        """Whether the victim's accesses really reached the other guest's page."""
        if self.vmm.mem.read(self.other_page, len(OTHER_SECRET)) == OTHER_SECRET:
            return ""
        return "; the victim's writes landed in the other guest's page (its secret is overwritten)"

    def run(self, insns):
        """Run the victim: `insns` instructions at most (on KVM: KVM_BUDGET_MS)."""
        if self.kvm:
            return self.boot.run(max_ms=KVM_BUDGET_MS)
        return self.boot.run(insns)

    def flush(self):
        """The VMM can always flush the emulated CPU's TLB (on KVM: remap the memslot)."""
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
    if res.exit_reason == "psp_stopped" and lab.tampered:
        t = res.tamper or {}
        where = None
        if t.get("page_hpa") is not None:
            where = {"page_hpa": hex(t["page_hpa"]), "entry_index": t["entry_index"],
                     "expected": hex(t["expected"]), "found": hex(t["found"])}
        by = "periodic" if t.get("detected_by", "").startswith(("CHECK_ALL", "VERIFY")) else "update"
        exp = lab.exposure(res)
        if t.get("detected_by", "").startswith("RMP"):
            # the access through the tampered entry faulted: nothing ran on
            # the tampered mapping (docs/designs.md, exposure)
            by = "rmp"
            exp = {k: (0 if v is not None and k != "exposure_unit" else v) for k, v in exp.items()}
            where = {k: hex(t[k]) for k in ("gpa", "hpa", "rmp_entry") if t.get(k) is not None}
        note = confirm_stopped(lab, lab.victim) + lab.other_note()
        return AttackResult(
            "", DETECTED, driver="guest", detected_by=by, where=where, **exp,
            detail=f"{what}; the guest ran {_exposure_text(exp)} on the tampered "
                   f"{'mapping' if by == 'rmp' else 'table'} before the {_by_text(by)} stopped it (hv boot: exit_reason psp_stopped, exit code "
                   f"{res.exit_code}): {_fmt_where(where)}{note}")
    if not lab.tampered:
        raise RuntimeError(f"the tamper never ran (run ended: {res.exit_reason}: {res.reason})")
    raise Undetected(f"{what}; the guest ran on to {res.exit_reason} ({res.reason}) "
                     f"{_exposure_text(lab.exposure(res))} after the tamper")


def _exposure_text(exp):
    if exp.get("exposure_ms") is not None:
        return f"{exp['exposure_ms']} ms ({exp['exposure_exits']} KVM exits)"
    return f"{exp['exposure_insns']} instructions"


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
KVM_BUDGET_MS = 120_000     # the same bound on KVM, which counts no instructions
KVM_BENIGN_MS = 1_000       # the benign scenario's run on KVM
KVM_QUIET_SLICES = 5        # slices without an NPF before the periodic scenario tampers


def _ran(res):
    if res.instructions is None:
        return f"{res.elapsed_s * 1000:.0f} ms on KVM ({res.exits} exits)"
    return f"{res.instructions} instructions"


@_guest_scenario("guest_severed_remap", "severed_remap", REMAP_BY_WRITE)
def gsc_severed_remap(cfg):
    """Guest-driven SEVered: mid-run, remap the page the guest is writing onto another guest's page."""
    with GuestLab(cfg, check_insns=cfg.guest_check_insns) as lab:
        def tamper(gpa):
            s = lab.leaf(gpa)
            v = lab.mem.read_u64(s)
            lab.mem.write_u64(s, (v & ~ADDR_MASK) | lab.other_page)
        lab.at_npf(GUEST_NPF, tamper)
        res = lab.run(GUEST_BUDGET)
        return _guest_result(lab, res, "compute's bss page remapped onto the other guest's page "
                                       "inside the VMM's NPF handler", GUEST_BUDGET)


@_guest_scenario("guest_alias_by_write", "alias", REMAP_BY_WRITE)
def gsc_alias(cfg):
    """Guest-driven alias: mid-run, point the page being written at an earlier page's frame."""
    with GuestLab(cfg, check_insns=cfg.guest_check_insns) as lab:
        def tamper(gpa):
            first = lab.npf_gpas[0]
            hpa = frame_of(lab.vmm, lab.victim, first)
            s = lab.leaf(gpa)
            lab.mem.write_u64(s, (lab.mem.read_u64(s) & ~ADDR_MASK) | hpa)
        lab.at_npf(GUEST_NPF, tamper)
        res = lab.run(GUEST_BUDGET)
        return _guest_result(lab, res, "two guest pages aliased onto one frame by a direct write",
                             GUEST_BUDGET)


@_guest_scenario("guest_swap_root_pointer", "root_swap", REMAP_BY_WRITE)
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
            lab.mem.write_u64(lab.victim.vmsa, fake)
        lab.at_npf(GUEST_NPF, tamper)
        res = lab.run(GUEST_BUDGET)
        return _guest_result(lab, res, "nCR3 swapped for a forged table mid-run", GUEST_BUDGET)


@_guest_scenario("guest_severed_periodic", "periodic", REMAP_BY_WRITE)
def gsc_periodic(cfg):
    """Guest-driven, no NPF after the tamper: caught by the periodic check (instruction count; on KVM, time)."""
    every = cfg.guest_check_insns
    slice_n = max(1, every // 10)
    start_at = 2_000_000            # compute is in the sieve by then: no more NPFs
    state = {"last_check": 0, "tampered_at": None, "target": None, "npf": -1, "quiet": 0}
    holder = {}

    def on_slice(boot, insns):
        lab = holder["lab"]
        if insns is None:           # KVM: every slice is cfg.wall_ms of wall time
            insns = state["last_check"] + every
            # no NPF for KVM_QUIET_SLICES slices: compute is past its bss, in the sieve
            state["quiet"] = state["quiet"] + 1 if lab.victim.npf == state["npf"] else 0
            state["npf"] = lab.victim.npf
            quiet = state["quiet"] >= KVM_QUIET_SLICES
        else:
            quiet = insns >= start_at
        # the PSP's timer: CHECK_ALL every `every` guest instructions (KVM: every slice)
        if insns - state["last_check"] >= every:
            state["last_check"] = insns
            r = lab.vmm.psp.check_all()
            if r.status == Status.INTEGRITY_FAILURE:
                raise _GuestStopped(insns, "periodic", _where(r))
        # the attacker: tamper right after a check, once the guest has faulted in its bss
        if state["tampered_at"] is None and quiet and state["last_check"] == insns:
            gpa = lab.npf_gpas[-1]
            s = lab.leaf(gpa)
            v = lab.mem.read_u64(s)
            lab.mem.write_u64(s, (v & ~ADDR_MASK) | lab.other_page)
            state["tampered_at"] = insns
            state["target"] = gpa
            lab.mark()
    with GuestLab(cfg, on_slice=on_slice, slice_insns=slice_n) as lab:
        holder["lab"] = lab
        try:
            res = lab.run(GUEST_BUDGET)
        except _GuestStopped as d:
            exp = lab.exposure()
            if not lab.kvm:
                exp["exposure_insns"] = d.insns - state["tampered_at"]
            note = confirm_stopped(lab, lab.victim)
            when = (f"{every} instructions later" if not lab.kvm else
                    f"{cfg.wall_ms:g} ms later, after {_exposure_text(exp)}")
            return AttackResult(
                "", DETECTED, driver="guest", detected_by="periodic", where=d.where, **exp,
                detail=f"compute's bss page {state['target']:#x} remapped onto the other guest's "
                       f"page right after a check; the next periodic check ({when}) caught it: "
                       f"{_fmt_where(d.where)}{note}")
        if state["tampered_at"] is None:
            raise RuntimeError(f"the guest ended ({res.exit_reason}) before the tamper")
        if res.exit_reason == "psp_stopped":     # caught all the same (by an NPF; rmp: the access)
            return _guest_result(lab, res, f"compute's bss page {state['target']:#x} remapped "
                                           f"onto the other guest's page after a check",
                                 GUEST_BUDGET)
        raise Undetected(f"the guest ran to {res.exit_reason} after the tamper")


@_guest_scenario("guest_tamper_on_slice", "periodic", PERMISSION_BY_WRITE)
def gsc_on_slice(cfg):
    """Tamper from hv.boot's on_slice hook; Boot's --check-insns (KVM: --check-ms) check ends the run with exit 3."""
    state = {}

    def on_slice(boot, insns):
        lab = state["lab"]
        if "t" not in state and (insns >= 1_000_000 if insns is not None
                                 else lab.victim.npf >= GUEST_NPF):
            gpa = lab.npf_gpas[-1]
            s = lab.leaf(gpa)
            lab.mem.write_u64(s, lab.mem.read_u64(s) ^ NX)     # NX toggled
            state["t"] = insns
            lab.mark()
    with GuestLab(cfg, check_insns=cfg.guest_check_insns, on_slice=on_slice) as lab:
        state["lab"] = lab
        res = lab.run(GUEST_BUDGET)
        r = _guest_result(lab, res, "NX toggled on a data page from on_slice (after that "
                                    "boundary's check: live until the next check at the latest)", GUEST_BUDGET)
        if res.exit_code != 3:
            raise Undetected(f"hv boot exit code {res.exit_code}, not 3")
        return r


@_guest_scenario("guest_race_check_write", "race", RACE_BY_WRITE)
def gsc_race(cfg):
    """A VMM thread hammers an entry while the guest faults pages in (UPDATE_NPT)."""
    with GuestLab(cfg, image="memtouch", check_insns=cfg.guest_check_insns) as lab:
        stop = threading.Event()
        armed = threading.Event()
        slot = {}

        prevented = []

        def arm(gpa):
            s = lab.leaf(gpa)
            slot["gpa"], slot["s"], slot["good"] = gpa, s, lab.vmm.mem.read_u64(s)
            slot["bad"] = (slot["good"] & ~ADDR_MASK) | lab.other_page
            armed.set()

        def hammer():
            armed.wait()
            if "s" not in slot:
                return
            mem = lab.mem
            s, good, bad = slot["s"], slot["good"], slot["bad"]
            try:
                while not stop.is_set():
                    mem.write_u64(s, bad)
                    mem.write_u64(s, good)
                mem.write_u64(s, bad)
            except Prevented as e:          # isolated: the first store faults
                prevented.append(e)
        lab.at_npf(GUEST_NPF, arm)
        th = threading.Thread(target=hammer, daemon=True)
        th.start()
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            res = lab.run(GUEST_BUDGET)
        finally:
            stop.set()
            armed.set()
            th.join()
            sys.setswitchinterval(old)
        if prevented:
            raise prevented[0]
        if res.exit_reason != "psp_stopped" and lab.design in ("rmp", "none"):
            # no PSP check to race: the value the thread left meets the RMP
            # check at the guest's next access to that page (or nothing)
            r = lab.vmm.walk(lab.victim, slot["gpa"], 0)
            if r.ok:
                raise Undetected(f"the tampered entry translates: GPA {slot['gpa']:#x} -> "
                                 f"{r.hpa:#x} (run: {res.exit_reason})")
            return AttackResult("", DETECTED, exposure_insns=0, driver="guest",
                                exposure_unit="insns", detected_by="rmp",
                                detail=f"the entry the thread left onto the other guest's page "
                                       f"fails the RMP check at the access (error code "
                                       f"{r.errcode:#x}); memtouch ran to {res.exit_reason}")
        if res.exit_reason != "psp_stopped":
            r = lab.vmm.psp.check_all()      # the thread left its value: must not be in the digest
            if r.status != Status.INTEGRITY_FAILURE:
                raise Undetected(f"racing writes folded into the digest (run: {res.exit_reason})")
            return AttackResult("", DETECTED, **lab.exposure(res),
                                driver="guest", detected_by="periodic",
                                where=_where(r), detail="racing writes caught by CHECK_ALL after "
                                                        "the run" + confirm_stopped(lab, lab.victim))
        return _guest_result(lab, res, "a thread toggled an entry while memtouch faulted pages in",
                             GUEST_BUDGET)


@_guest_scenario("guest_benign_accessed_dirty", "benign", BENIGN)
def gsc_benign(cfg):
    """A real guest runs with periodic checks while A/D bits are set by the walker and by hand."""
    flips = [0]

    def on_slice(boot, insns):
        lab = holder["lab"]
        vmm = lab.vmm
        if lab.design == "isolated":
            return      # (the flips stand for the hardware's: isolated entries have A/D set)
        for t, _lvl in vmm.engine.table_pages(vmm.npt_root(lab.victim)):
            for i in range(0, 512):
                e = vmm.mem.read_u64(t + 8 * i)
                if e & P:
                    ne = e ^ AD_MASK
                    lab.mem.write_u64(t + 8 * i, ne)
                    flips[0] += 1
    holder = {}
    budget = 3_000_000
    with GuestLab(cfg, check_insns=cfg.guest_check_insns, on_slice=on_slice) as lab:
        holder["lab"] = lab
        res = lab.boot.run(max_ms=KVM_BENIGN_MS) if lab.kvm else lab.boot.run(budget)
        if res.exit_reason == "psp_stopped":
            t = res.tamper or {}
            return AttackResult("", FALSE_POSITIVE, driver="guest", exposure_unit="insns",
                                detail=f"A/D updates flagged: {res.reason}",
                                where={k: t.get(k) for k in ("page_hpa", "entry_index")})
        if res.exit_reason not in ("insn_limit", "time_limit", "exit_port", "hlt"):
            raise RuntimeError(f"guest failed: {res.exit_reason}: {res.reason}")
        if not lab.vmm.psp.verify(lab.victim.handle).ok:
            return AttackResult("", FALSE_POSITIVE, driver="guest", detail="VERIFY failed")
        return AttackResult("", NOT_FLAGGED, driver="guest", exposure_unit="insns",
                            detail=f"compute ran {_ran(res)}, {res.npf} NPFs, "
                                   f"{res.checks} periodic checks, {flips[0]} A/D flips by hand "
                                   f"between slices: nothing flagged")
