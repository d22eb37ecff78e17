"""Boot a guest image on the emulated vCPU through the PSP-managed NPT.

    from hv.vmm.vmm import Vmm
    from hv.machine.boot import Boot
    vmm = Vmm(host_mem=256 << 20)
    b = Boot(vmm, "guests/build/hello", mem=16 << 20)
    res = b.run()                 # BootResult
    print(res.exit_reason, res.exit_code, res.serial, res.npf)

Launch: every page of the image (segment data, boot GDT, boot page tables,
multiboot info) goes in through the PSP's launch commands (LAUNCH_UPDATE_DATA
via ``vmm.load_page``: load and measure), then LAUNCH_FINISH returns the
SHA-256 launch measurement.  Those pages are mapped before the first
instruction, so they never fault: ``launch_pages`` counts them, ``npf``
counts the demand faults of the run (one per distinct guest-physical page
the guest touched that was not loaded at launch, its own page-table pages
included).

Integrity checks during the run: ``check_insns=N`` runs the guest in slices
of N instructions and sends the PSP's CHECK_ALL between slices
(deterministic); ``check_ms=N`` checks between short slices whenever N ms
of wall time have passed.  A tamper (CHECK_ALL, or an UPDATE_NPT refused
with INTEGRITY_FAILURE / GUEST_STOPPED) ends the run with exit_reason
``psp_stopped`` (exit code 3) and ``tamper`` saying what differed.

``on_slice(boot, insns_so_far)`` is called between slices (after that
boundary's check), so an attack can change host memory mid-run and the
change stays live until the next check; the emulator's TLB is flushed after
it (the VMM can always do that).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from hv.machine.devices import VGA_BASE, VGA_BYTES, Devices, vga_rows
from hv.errors import BadInput
from hv.machine.loader import load_image
from hv.machine.stop import ACCESS_WORDS, StopInfo
from hv.machine.unicorn_vcpu import UnicornVcpu, available_hooks

__all__ = ["Boot", "BootResult", "EXIT_REASONS", "ACCELS", "exit_code_for", "resolve_accel"]

EXIT_REASONS = ("exit_port", "hlt", "triple_fault", "insn_limit", "time_limit", "psp_stopped",
                "psp_dead", "error")
ACCELS = ("unicorn", "kvm")
DEFAULT_MEM = 256 << 20
CHECK_MS_SLICE = 100_000        # instructions per slice with --check-ms
ON_SLICE_DEFAULT = 100_000      # slice length when only on_slice is given
KVM_SLICE_MS = 10               # KVM: wall-time slice when on_slice or the PSP's timer wants one
_TAMPER_STATUSES = ("INTEGRITY_FAILURE", "GUEST_STOPPED", "RMP_FAULT")   # RMP_FAULT: the rmp design


@dataclass
class BootResult:
    """What `hv boot --json` prints (to_dict())."""
    image: str
    kind: str                    # "elf64" | "multiboot"
    exit_reason: str             # one of EXIT_REASONS
    exit_code: int               # the process exit code hv boot returns
    reason: str                  # one line: why the run ended
    serial: str
    npf: int                     # demand NPFs during the run
    instructions: int | None     # None on KVM (it counts no instructions)
    pages_mapped: int            # 4 KiB pages mapped in the NPT (launch + NPF)
    launch_pages: int            # pages loaded and measured at launch (mapped before the run)
    measurement: str             # SHA-256 launch measurement, hex
    mem: int
    hook: str
    engine: str
    protect: str                 # the protection design (docs/designs.md)
    elapsed_s: float
    insns_per_s: int | None
    checks: int = 0              # CHECK_ALL commands sent
    guest_exit_code: int | None = None   # byte written to port 0xF4 (or 0 for hlt)
    vga: list | None = None
    tamper: dict | None = None
    fault: dict | None = None    # the NPF / exception that ended a failed run
    registers: dict | None = None
    last_insns: list | None = None
    guest_pf: int = 0            # guest #PFs injected (emulator only)
    exceptions: list = field(default_factory=list)
    accel: str = "unicorn"       # "unicorn" | "kvm"
    exits: int | None = None     # KVM: KVM_RUN returns (exits to the VMM)

    def to_dict(self):
        return asdict(self)


def exit_code_for(reason, guest_code=None):
    if reason == "exit_port":
        return guest_code
    if reason == "hlt":
        return 0
    # insn_limit: cut short by --max-insns, not a clean exit (the CLI's
    # --insn-limit-ok makes it 0)
    if reason == "psp_stopped":
        return 3
    return 1


class Boot:
    """Load `image_path` into a new VM of `vmm` and run it.

    mem: guest RAM bytes.  hook (alias backend): vCPU TLB-fill hook, "c"
    (default when built) or "python".  check_insns / check_ms: periodic
    CHECK_ALL (see module doc).  on_slice(boot, insns): called between
    slices.  record: path of a CSV fault trace to write (or a
    CsvTraceWriter).  serial_sink(bytes): called as the guest writes to
    COM1.  vga: dump the text screen into the result.

    accel: "unicorn" (the emulator, default) or "kvm" (hv.kvm_vcpu: needs
    host memory in a memfd or file, Vmm(shared_mem=True)).  On KVM nothing
    counts instructions: check_insns and run(max_insns) are refused, slices
    are wall time (check_ms, or slice_ms for on_slice, which then gets
    None for the instruction count), and run(max_ms=) bounds a run."""

    def __init__(self, vmm, image_path, mem=DEFAULT_MEM, backend=None, hook=None,
                 check_insns=None, check_ms=None, on_slice=None, record=None,
                 serial_sink=None, vga=False, slice_insns=None, accel="unicorn", slice_ms=None):
        if accel not in ACCELS:
            raise BadInput(f"unknown accelerator {accel!r} (unicorn or kvm)")
        self.accel = accel
        if accel == "kvm":
            _check_kvm(vmm, check_insns)
        hook = hook or backend or available_hooks()[0]
        if hook not in ("c", "python"):
            raise BadInput(f"unknown vCPU hook {hook!r} (c or python)")
        if hook not in available_hooks():
            raise BadInput("the C vCPU hook is not built (hv._vcpu_c); use --hook python")
        for name, v in (("--check-insns", check_insns), ("--check-ms", check_ms)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise BadInput(f"{name} must be a positive integer, not {v!r}")
        self.vmm = vmm
        self.hook = hook
        self.mem = mem
        self.check_insns, self.check_ms = check_insns, check_ms
        self.on_slice = on_slice
        self.slice_insns = slice_insns
        self.slice_ms = slice_ms
        self.want_vga = vga
        self.image = load_image(image_path, mem)
        usable = vmm.fw_base - (1 << 20)
        if mem > usable:
            raise BadInput(f"--mem {mem >> 20} MiB does not fit in host memory "
                           f"({vmm.mem.size >> 20} MiB, {usable >> 20} MiB usable); raise --host-mem")
        self._own_record = False
        if isinstance(record, (str, bytes)) or hasattr(record, "__fspath__"):
            from hv.trace import CsvTraceWriter
            try:
                record = CsvTraceWriter(record, columns=("access", "gpa", "rip", "insn"),
                                        comment=f"hv boot {self.image.path} --mem {mem}: one row per NPF")
            except OSError as e:
                raise BadInput(f"cannot write trace {record} (--record): {e.strerror or e}") from None
            self._own_record = True
        self.record = record
        self.vm = vmm.create_vm(ram_size=mem)
        pages = self.image.initial_pages()
        for gpa, data in pages:
            vmm.load_page(self.vm, gpa, data)
        self.launch_pages = {gpa >> 12 for gpa, _ in pages}
        self.measurement = vmm.launch_finish(self.vm).hex()
        self.devices = Devices(serial_sink)
        if accel == "kvm":
            from hv.machine.kvm_vcpu import KvmVcpu
            self.hook = None
            self.vcpu = KvmVcpu(vmm, self.vm, self.image, devices=self.devices, record=record)
        else:
            self.vcpu = UnicornVcpu(vmm, self.vm, self.image, hook=hook, devices=self.devices,
                                    record=record)
        self.checks = 0
        self.result = None

    # ------------------------------------------------------------------
    @property
    def instructions(self):
        return self.vcpu.instructions

    def _check(self):
        """CHECK_ALL; returns the tamper dict if this guest is stopped."""
        psp, h = self.vmm.psp, self.vm.handle
        r = psp.check_all()
        self.checks += 1
        if r.name != "INTEGRITY_FAILURE":
            return None
        f = dict(r.fields)
        if f.get("stopped_handle") != h:
            v = psp.verify(h)
            if v.name not in _TAMPER_STATUSES:
                return None
            f = dict(v.fields)
            return _tamper(v.name, f, "VERIFY after CHECK_ALL")
        return _tamper("INTEGRITY_FAILURE", f, "CHECK_ALL")

    def _stopped_by_psp_timer(self):
        """GUEST_STATUS; the tamper dict if the PSP's own checker stopped this guest."""
        r = self.vmm.psp.guest_status(self.vm.handle)
        if r.name != "GUEST_STOPPED":
            return None
        return _tamper("GUEST_STOPPED", {}, "PSP periodic checker")

    def _vmrun_check(self):
        """What the CPU checks on every VMRUN (as SEV-SNP checks the VMSA's RMP
        entry): the control page it will take nCR3 from is the one the PSP
        made for this guest, and the PSP has not stopped the guest. The VMM
        chooses which page it hands the CPU; it cannot make the CPU use a
        forged one. Returns the tamper dict, or None to run."""
        r = self.vmm.psp.guest_status(self.vm.handle)
        if r.name == "GUEST_STOPPED":
            return _tamper("GUEST_STOPPED", {}, "PSP periodic checker")
        used = self.vcpu.control_page()
        if not r.ok or r.fields.get("vmsa") != used:
            return _tamper("INVALID_VMSA", {"page_hpa": used, "entry_index": 0,
                                            "expected": r.fields.get("vmsa", 0), "found": used},
                           "VMRUN control-page check")
        return None

    def run(self, max_insns=None, max_ms=None):
        """Run to the end (or max_insns instructions, or max_ms ms of wall
        time).  Returns a BootResult."""
        if max_insns is not None and max_insns <= 0:
            raise BadInput(f"--max-insns must be positive, not {max_insns}")
        if max_ms is not None and not max_ms > 0:
            raise BadInput(f"--max-ms must be positive, not {max_ms}")
        if self.accel == "kvm":
            if max_insns is not None:
                raise BadInput("--max-insns: KVM counts no guest instructions (use --max-ms)")
            stop, tamper, t0 = self._run_kvm(max_ms)
        else:
            with self.vcpu.sigint:      # Ctrl-C while the guest runs: hv/machine/sigint.py
                stop, tamper, t0 = self._run_unicorn(max_insns, max_ms)
        psp_timer = bool(getattr(self.vmm, "psp_check_ms", None))
        if tamper is None and stop is not None and not _stopped_by_psp(stop):
            # the guest stopped between two checks (it exited, faulted, or
            # ran out of budget): one last check, so that a tamper made in
            # the last interval is reported rather than a clean guest exit
            if self.check_insns is not None or self.check_ms:
                tamper = self._check()
            if tamper is None and psp_timer:
                tamper = self._stopped_by_psp_timer()
        elapsed = time.perf_counter() - t0
        self.result = self._result(stop, tamper, elapsed)
        if self._own_record:
            self.record.close()
        return self.result

    def _run_kvm(self, max_ms):
        """KVM: wall-time slices; returns (stop, tamper, t0)."""
        vc = self.vcpu
        slice_s = None
        if self.check_ms:
            slice_s = self.check_ms / 1000
        elif self.on_slice is not None or getattr(self.vmm, "psp_check_ms", None):
            slice_s = (self.slice_ms or KVM_SLICE_MS) / 1000
        t0 = time.perf_counter()
        end = t0 + max_ms / 1000 if max_ms else None
        tamper = stop = None
        while True:
            tamper = self._vmrun_check()
            if tamper:
                break
            until = None if slice_s is None else time.perf_counter() + slice_s
            if end is not None:
                until = end if until is None else min(until, end)
            stop = vc.run(until=until)
            if stop.kind != "limit":
                break
            if end is not None and time.perf_counter() >= end:
                stop = StopInfo("time_limit")
                break
            if self.check_ms:
                tamper = self._check()
                if tamper:
                    break
            if self.on_slice is not None:
                self.on_slice(self, None)
                vc.flush_tlb()
        return stop, tamper, t0

    def _run_unicorn(self, max_insns, max_ms):
        """The emulator: instruction-count slices; returns (stop, tamper, t0)."""
        vc = self.vcpu
        slice_n = self.check_insns or (CHECK_MS_SLICE if self.check_ms else None)
        if slice_n is None and self.on_slice is not None:
            slice_n = self.slice_insns or ON_SLICE_DEFAULT
        if self.check_ms and self.check_insns is None:
            slice_n = min(slice_n, max(1000, CHECK_MS_SLICE))
        # the PSP's own wall-time checker may stop the guest at any moment:
        # poll its state between slices and never resume a stopped guest
        psp_timer = bool(getattr(self.vmm, "psp_check_ms", None))
        if (psp_timer or max_ms) and slice_n is None:
            slice_n = CHECK_MS_SLICE
        t0 = time.perf_counter()
        end = t0 + max_ms / 1000 if max_ms else None
        last_check = t0
        tamper = None
        stop = None
        start = vc.instructions
        while True:
            tamper = self._vmrun_check()
            if tamper:
                break
            n = slice_n
            if max_insns is not None:
                left = max_insns - (vc.instructions - start)
                n = left if n is None else min(n, left)
            stop = vc.run(n)
            if stop.kind != "limit":
                break
            if max_insns is not None and vc.instructions - start >= max_insns:
                break
            if end is not None and time.perf_counter() >= end:
                stop = StopInfo("time_limit")
                break
            due = self.check_insns is not None
            if self.check_ms:
                now = time.perf_counter()
                if (now - last_check) * 1000 >= self.check_ms:
                    due, last_check = True, now
            if due:
                tamper = self._check()
                if tamper:
                    break
            if self.on_slice is not None:
                # after the check: a change made here is live for a whole
                # interval, as a real tamper between two periodic checks is
                self.on_slice(self, vc.instructions)
                vc.flush_tlb()
        return stop, tamper, t0

    # ------------------------------------------------------------------
    def _result(self, stop, tamper, elapsed):
        vc, vm = self.vcpu, self.vm
        fault = None
        guest_code = None
        if tamper:
            reason_kind = "psp_stopped"
            if tamper.get("page_hpa") is None:
                reason = f"PSP stopped the VM ({tamper['detected_by']}): {tamper['status']}"
            else:
                reason = (f"PSP stopped the VM ({tamper['detected_by']}): NPT page "
                          f"{tamper['page_hpa']:#x} entry {tamper['entry_index']} expected "
                          f"{tamper['expected']:#x} found {tamper['found']:#x}")
        elif stop.kind == "exit_port":
            reason_kind, guest_code = "exit_port", stop.exit_code
            reason = f"guest wrote {stop.exit_code} to port 0xf4"
        elif stop.kind == "hlt":
            reason_kind, guest_code = "hlt", 0
            reason = "guest executed hlt"
        elif stop.kind == "limit":
            reason_kind = "insn_limit"
            reason = f"instruction budget used up at rip {vc.pc:#x}"
        elif stop.kind == "time_limit":
            reason_kind = "time_limit"
            reason = f"time budget used up at rip {vc.pc:#x}"
        elif stop.kind == "triple_fault":
            reason_kind = "triple_fault"
            reason = f"triple fault: {stop.detail}"
        elif stop.kind == "vm_stopped":
            e = stop.stopped
            f = stop.fault or {}
            fault = _fault_dict(f, e)
            st = getattr(e.status, "name", str(e.status))
            if st in _TAMPER_STATUSES:
                reason_kind = "psp_stopped"
                tamper = _tamper(st, e.fields, "RMP check (nested fault)" if st == "RMP_FAULT"
                                 else "UPDATE_NPT")
                reason = f"PSP stopped the VM: {e}"
                if tamper.get("page_hpa") is not None:
                    reason += (f" (NPT page {tamper['page_hpa']:#x} entry {tamper['entry_index']} "
                               f"expected {tamper['expected']:#x} found {tamper['found']:#x})")
            elif st == "PSP_DEAD":
                reason_kind = "psp_dead"
                reason = f"the PSP process died or stopped answering: {e}"
            else:
                reason_kind = "error"
                where = ""
                if f:
                    where = (f"{ACCESS_WORDS.get(f['access'], '?')} NPF at GPA {f['gpa']:#x} "
                             f"(rip {f['rip']:#x}, error code {f['errcode']:#x}"
                             f"{', during the guest page walk' if f.get('walk') else ''}): ")
                reason = f"{where}{e}"
        else:
            reason_kind = "error"
            reason = stop.detail or "emulator error"
        code = exit_code_for(reason_kind, guest_code)
        res = BootResult(
            image=self.image.path, kind=self.image.kind, exit_reason=reason_kind, exit_code=code,
            reason=reason, serial=self.devices.serial.text(), npf=vm.npf,
            instructions=vc.instructions, pages_mapped=vm.pages_mapped,
            launch_pages=len(self.launch_pages), measurement=self.measurement, mem=self.mem,
            hook=self.hook, engine=self.vmm.backend,
            protect=getattr(self.vmm, "protect", "digest"), elapsed_s=round(elapsed, 6),
            insns_per_s=(int(vc.instructions / elapsed) if elapsed > 0 and vc.instructions
                         is not None else None),
            checks=self.checks, guest_exit_code=guest_code, tamper=tamper, fault=fault,
            guest_pf=vc.gpf_count, exceptions=[[v, r] for v, r in vc.injected],
            accel=self.accel, exits=getattr(vc, "exits", None))
        if self.want_vga:
            res.vga = vga_rows(vc.read_gpa(VGA_BASE, VGA_BYTES))
        if reason_kind in ("triple_fault", "error", "psp_stopped"):
            try:
                res.registers = vc.registers()
                res.last_insns = vc.last_insns()
            except Exception:       # noqa: BLE001 - the report is best effort
                pass
        return res

    def close(self):
        if self._own_record:        # an interrupted run: what was recorded is kept, whole
            self.record.close()
        self.vcpu.close()


def resolve_accel(name):
    """--accel: "unicorn" or "kvm" as given ("kvm" where /dev/kvm refuses:
    BadInput "KVM is not available: ..."), "auto": kvm where it works."""
    if name in (None, "unicorn"):
        return "unicorn"
    from hv.machine.kvm import probe
    why = probe()
    if name == "auto":
        return "unicorn" if why else "kvm"
    if name != "kvm":
        raise BadInput(f"unknown accelerator {name!r} (unicorn, kvm or auto)")
    if why:
        raise BadInput(f"KVM is not available: {why}")
    return "kvm"


def _check_kvm(vmm, check_insns):
    """What --accel kvm needs, or BadInput (exit 2) saying what is missing."""
    from hv.machine.kvm import probe
    why = probe()
    if why is not None:
        raise BadInput(f"KVM is not available: {why}")
    if check_insns is not None:
        raise BadInput("--check-insns: KVM counts no guest instructions (use --check-ms)")
    if vmm.mem.fd is None:
        raise BadInput("KVM maps host-memory frames into the guest: host memory must be a "
                       "memfd or file (Vmm(shared_mem=True), or --host-mem-file)")


def _stopped_by_psp(stop):
    """The run ended on a PSP verdict already (tamper found by UPDATE_NPT, or PSP gone)."""
    if stop is None or stop.kind != "vm_stopped" or stop.stopped is None:
        return False
    st = getattr(stop.stopped.status, "name", str(stop.stopped.status))
    return st in _TAMPER_STATUSES or st == "PSP_DEAD"


def _tamper(status, fields, detected_by):
    fields = fields or {}
    out = {"status": status, "detected_by": detected_by}
    for k in ("page_hpa", "entry_index", "expected", "found"):
        out[k] = fields.get(k)
    if "stopped_handle" in fields:
        out["handle"] = fields["stopped_handle"]
    for k in ("gpa", "hpa", "rmp_entry"):          # an RMP fault (the rmp design)
        if k in fields:
            out[k] = fields[k]
    return out


def _fault_dict(f, e):
    if not f:
        return {"status": getattr(e.status, "name", str(e.status)), "message": str(e)}
    return {"gpa": f["gpa"], "va": f["va"], "rip": f["rip"], "errcode": f["errcode"],
            "access": ACCESS_WORDS.get(f["access"], "?"), "walk": f.get("walk", False),
            "status": getattr(e.status, "name", str(e.status)), "message": str(e)}


def format_report(res):
    """Human-readable report (hv boot without --json)."""
    if res.instructions is None:          # KVM
        ran = f"  {res.elapsed_s:.3f} s on KVM, {res.exits} exits, engine {res.engine}"
    else:
        ran = (f"  {res.instructions} instructions in {res.elapsed_s:.3f} s"
               + (f" ({res.insns_per_s / 1e6:.1f} M/s)" if res.insns_per_s else "")
               + f", hook {res.hook}, engine {res.engine}")
    lines = [f"hv boot {res.image}: {res.exit_reason}, exit code {res.exit_code} ({res.reason})",
             ran,
             f"  {res.npf} NPFs (demand faults during the run); {res.launch_pages} pages loaded and "
             f"measured at launch (mapped before the run, not counted as NPFs); "
             f"{res.pages_mapped} pages mapped",
             f"  launch measurement {res.measurement}"]
    if res.checks:
        lines.append(f"  {res.checks} integrity checks (CHECK_ALL)")
    if res.tamper:
        t = res.tamper
        if t.get("page_hpa") is not None:
            lines.append(f"  TAMPER: NPT table page {t['page_hpa']:#x}, entry {t['entry_index']}: "
                         f"expected {t['expected']:#x}, found {t['found']:#x} "
                         f"(detected by {t['detected_by']})")
        else:
            lines.append(f"  TAMPER: {t['status']} (detected by {t['detected_by']})")
    if res.fault and "gpa" in res.fault:
        f = res.fault
        lines.append(f"  fault: {f['access']} at GPA {f['gpa']:#x} (va {f['va']:#x}, rip {f['rip']:#x}, "
                     f"error code {f['errcode']:#x})")
    if res.last_insns:
        lines.append("  last instructions:")
        for addr, hx, text in res.last_insns:
            lines.append(f"    {addr:#x}: {hx:<24} {text}")
    if res.registers:
        regs = res.registers
        items = [f"{k}={v:#x}" for k, v in regs.items()]
        for i in range(0, len(items), 6):
            lines.append("  " + " ".join(items[i:i + 6]))
    if res.vga is not None:
        lines.append("  --- VGA text (80x25) ---")
        rows = list(res.vga)
        while rows and not rows[-1]:
            rows.pop()
        lines += ["  |" + r for r in rows]
    return "\n".join(lines)
