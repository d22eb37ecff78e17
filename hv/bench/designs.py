"""What each protection design costs (hv compare's `costs`, hv bench --protect).

Per design (`protect`, with `integrity` for digest), each a plain function:

- npf_first_touch_us: µs per page of a guest writing each page of its RAM for
  the first time: hv bench's figure (hv.bench.guest.first_touch: the
  firsttouch guest under `hv boot`, host allocation included), run under the
  design.
- walk_ns: ns per nested walk, C batch, random GPAs over a dense 4 KiB table
  with a distinct frame per page, with the design's per-translation check
  (the RMP check under rmp; the others have none and run the same walk).
- check_ms: ms per periodic check (CHECK_ALL) with `mapped` bytes mapped,
  one 4 KiB page per 2 MiB block (a dense mapping's page-table footprint).
- psp_bytes_per_gib: the PSP's private bytes per GiB mapped with 4 KiB pages
  (psp_firmware.designs.private_bytes), from the firmware's data structures.
- guest_mips: million guest instructions per second of the compute guest.

Timings are best-of-`repeat` wall clock; nothing logs inside a timed part.
"""
import gc
import mmap
import random
import time
from array import array

from hv.bench.common import GiB, HUGE, MiB, PAGE, _LEAF, _NONLEAF, _best

DESIGN_RUNS = (("digest-full", "digest", "full"), ("digest-merkle", "digest", "merkle"),
               ("isolated", "isolated", None), ("rmp", "rmp", None), ("none", "none", None))

# what an NPF runs through under each design with the PSP process (the cost
# figures' fine print: where C does the work and where Python does)
NPF_PATH = {
    "digest-full": "VMM NPF path in Python; UPDATE_NPT in the PSP's Python handler (full "
                   "re-hash in C)",
    "digest-merkle": "VMM NPF path in Python; UPDATE_NPT in the PSP's C fast path",
    "isolated": "VMM NPF path in Python; UPDATE_NPT in the PSP's C fast path (no digest)",
    "rmp": "VMM NPF path in Python; RMP_ASSIGN in the PSP's Python handler; the VMM writes the "
           "entry (C engine)",
    "none": "VMM NPF path in Python; the VMM writes the entry (C engine); no PSP command",
}


def _vmm(protect, integrity, host_mem, psp="process"):
    from hv.vmm.vmm import Vmm
    return Vmm(host_mem=host_mem, protect=protect, integrity=integrity, psp=psp)


def npf_first_touch_us(protect="digest", integrity=None, pages=4096, repeat=2, psp="process"):
    """µs per page of the firsttouch guest's first writes under the design
    (hv bench's npf_first_touch_us, hv.bench.guest.first_touch)."""
    from hv.bench.guest import _guest_images, first_touch
    image = str(_guest_images()["firsttouch"])
    r = first_touch(image, pages * PAGE + 2 * MiB, repeat, protect=protect,
                    integrity=integrity, psp=psp)
    return r["us_per_page"]


class DistinctTable:
    """A dense 4-level table mapping GPA 0..size with 4 KiB leaves, each page
    on a frame of its own (data frames never touched: they cost nothing),
    and an RMP (guest 1) that assigns every frame at its GPA."""

    def __init__(self, size):
        from hv.vmm.hostmem import HostMemory
        from nptcore.rmp import RmpView, rmp_entry
        npages = size // PAGE
        n_pt = max(1, npages // 512)
        n_pd = (n_pt + 511) // 512
        n_pdpt = (n_pd + 511) // 512
        n_tables = 1 + n_pdpt + n_pd + n_pt
        self.size = size
        self.tables_base = 16 * PAGE
        self.data_base = ((self.tables_base + n_tables * PAGE + HUGE - 1) // HUGE) * HUGE
        self.mem = HostMemory(self.data_base + size)
        buf = self.mem.buf
        nxt = iter(range(self.tables_base, self.tables_base + n_tables * PAGE, PAGE))
        self.root = next(nxt)
        pdpts = [next(nxt) for _ in range(n_pdpt)]
        pds = [next(nxt) for _ in range(n_pd)]
        pts = [next(nxt) for _ in range(n_pt)]
        for parents, kids in (([self.root], pdpts), (pdpts, pds), (pds, pts)):
            for j, p in enumerate(parents):
                ks = kids[j * 512:(j + 1) * 512]
                buf[p:p + 8 * len(ks)] = array("Q", [k | _NONLEAF for k in ks]).tobytes()
        per = min(512, npages)
        for k, h in enumerate(pts):
            v = (self.data_base + k * 512 * PAGE) | _LEAF
            buf[h:h + 8 * per] = array("Q", range(v, v + per * PAGE, PAGE)).tobytes()
        nframes = len(buf) // PAGE
        self._rmp_mm = mmap.mmap(-1, nframes * 8)
        first = rmp_entry(1, 0, 1)
        lo = self.data_base // PAGE
        self._rmp_mm[lo * 8:(lo + npages) * 8] = array(
            "Q", range(first, first + npages * PAGE, PAGE)).tobytes()
        self.rmp = RmpView(self._rmp_mm, 1)

    def random_gpas(self, n, seed=1):
        rnd = random.Random(seed)
        gpas = array("Q", (rnd.randrange(self.size) for _ in range(n)))
        accs = bytes(rnd.getrandbits(1) for _ in range(n))
        return gpas, accs

    def close(self):
        self.rmp = None
        self.mem.close()


def walk_ns(size=GiB, n=300_000, repeat=3):
    """{"plain": ns, "rmp": ns}: C batch walks over one table, without and
    with the RMP check (every translation checked)."""
    from nptcore import CEngine
    if CEngine is None:
        return None
    t = DistinctTable(size)
    eng = None
    try:
        eng = CEngine(t.mem.buf)
        gpas, accs = t.random_gpas(n)
        out = array("Q", bytes(8 * n))
        k, miss = eng.walk_batch_rmp(t.root, gpas, accs, out, t.rmp)
        assert k == n, (k, miss)              # every translation passes the check
        plain = _best(lambda: eng.walk_batch(t.root, gpas, accs, out), repeat) / n
        checked = _best(lambda: eng.walk_batch_rmp(t.root, gpas, accs, out, t.rmp), repeat) / n
        eng.close()
    finally:
        eng = None
        gc.collect()
        t.close()
    return {"plain": plain * 1e9, "rmp": checked * 1e9}


def check_ms(protect, integrity, sizes=(GiB, 16 * GiB), repeat=2):
    """{size: ms per CHECK_ALL} with one page per 2 MiB block mapped.

    digest: the table is built once in merkle mode and each mode times its
    check on it (building it in full mode re-hashes the whole table per
    update); in process, as hv bench's integrity section. isolated: the PSP
    process (the design needs it); rmp, none: in process. The designs
    without a digest have nothing to check: their CHECK_ALL is a no-op and
    this is its round trip."""
    largest = max(sizes)
    blocks = largest // HUGE
    psp = "process" if protect == "isolated" else "inprocess"
    host = max(512 * MiB, 4 * blocks * PAGE + 256 * MiB)
    if protect == "isolated":
        host = max(host, 64 * blocks * PAGE)       # the PSP's region is 1/32 of host memory
    vmm = _vmm(protect, "merkle" if protect == "digest" else None, host, psp)
    out = {}
    try:
        vm = vmm.create_vm()
        built = 0
        for size in sorted(sizes):
            for b in range(built // HUGE, size // HUGE):
                vmm.handle_npf(vm, b * HUGE)
            built = size
            if protect == "digest":
                vmm._psp_obj._switch_integrity(vm.handle, integrity)
            r = vmm.psp.check_all()
            if not r.ok:
                raise RuntimeError(f"CHECK_ALL under {protect}: {r.name}")
            out[size] = _best(vmm.psp.check_all, repeat) * 1e3
            if protect == "digest":
                vmm._psp_obj._switch_integrity(vm.handle, "merkle")
    finally:
        vmm.close()
    return out


def psp_bytes_per_gib(protect, integrity, mapped=256 * MiB):
    """The PSP's private bytes per GiB mapped with 4 KiB pages: the firmware
    alone (in this process, driven by its commands: the data structures are
    those of the PSP process), `mapped` bytes mapped 512 pages a command."""
    from psp_firmware import Cmd, encode, make_psp
    from psp_firmware.designs import private_bytes
    fw = 16 * MiB
    host = 2 * mapped + 256 * MiB
    mem = mmap.mmap(-1, host, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    kw = {}
    if protect == "isolated":
        region = max(8 * MiB, (mapped // 256) * 2)       # the table of `mapped` and a margin
        kw["iso"] = (host - fw - region, region)
    if integrity:
        kw["integrity"] = integrity
    p = make_psp(mem, protect=protect, **kw)

    def cmd(c, **f):
        st, out = p.mailbox(int(c), encode(c, **f))
        if st:
            raise RuntimeError(f"{c.name} under {protect}: status {st}")
        return out
    cmd(Cmd.PLATFORM_INIT, host_size=host, fw_base=host - fw, fw_size=fw)
    if protect == "digest":
        cmd(Cmd.POOL_ADD, hpa=MiB, npages=(mapped // (2 * MiB)) + 64)
    vmsa = 0 if protect == "isolated" else 96 * MiB
    h = int.from_bytes(cmd(Cmd.LAUNCH_START, vmsa_hpa=vmsa, policy=0)[:4], "little")
    base = 128 * MiB
    for i in range(mapped // HUGE):
        gpa, hpa = (1 << 30) + i * HUGE, base + i * HUGE
        if protect == "rmp":
            cmd(Cmd.RMP_ASSIGN, handle=h, level=1, gpa=gpa, hpa=hpa, npages=512)
        elif protect in ("digest", "isolated"):
            cmd(Cmd.UPDATE_NPT, handle=h, level=1, gpa=gpa, hpa=hpa, attrs=3, npages=512)
    if protect == "digest":
        cmd(Cmd.VERIFY, handle=h)                # the merkle tree brought up to date
    b = private_bytes(p)
    scale = GiB / mapped
    return {k: v * scale for k, v in b.items()}


def guest_mips(protect, integrity, insns=5_000_000, repeat=2, psp="process"):
    """Million instructions per second of the compute guest under hv boot."""
    from hv.bench.guest import _guest_images
    from hv.machine.boot import Boot
    compute = str(_guest_images()["compute"])
    best = None
    for _ in range(repeat):
        vmm = _vmm(protect, integrity, 256 * MiB, psp)
        try:
            b = Boot(vmm, compute, mem=16 * MiB)
            try:
                r = b.run(max_insns=insns)
            finally:
                b.close()
        finally:
            vmm.close()
        if r.exit_reason not in ("exit_port", "hlt", "insn_limit"):
            raise RuntimeError(f"compute under {protect}: {r.exit_reason}: {r.reason}")
        mips = r.instructions / r.elapsed_s / 1e6
        best = mips if best is None else max(best, mips)
    return best


def design_costs(protect, integrity, quick=True, log=None, tiny=False):
    """Every cost of one design but walk_ns (measured once for all designs:
    walk_ns()), as hv compare reports them. tiny: the test suite's sizes."""
    log = log or (lambda m: None)
    t0 = time.perf_counter()
    pages = 256 if tiny else (2048 if quick else 8192)
    reps = 1 if quick or tiny else 3
    out = {"npf_first_touch_us": npf_first_touch_us(protect, integrity, pages=pages, repeat=reps)}
    # the same in the VMM's process where the design allows it (isolated does
    # not): what the PSP process's round trips add to the figure above
    out["npf_first_touch_us_inprocess"] = (
        None if protect == "isolated" else
        npf_first_touch_us(protect, integrity, pages=pages, repeat=reps, psp="inprocess"))
    checks = check_ms(protect, integrity)
    out["check_ms_1g"] = checks[GiB]
    out["check_ms_16g"] = checks[16 * GiB]
    pb = psp_bytes_per_gib(protect, integrity, mapped=(16 if tiny else 64 if quick else 256) * MiB)
    out["psp_bytes_per_gib"] = pb["total"]
    out["psp_bytes_per_gib_by_kind"] = {k: v for k, v in pb.items() if k != "total" and v}
    out["guest_mips"] = guest_mips(protect, integrity, insns=(500_000 if tiny else 3_000_000
                                                             if quick else 14_000_000),
                                   repeat=1 if quick or tiny else 3)
    out["seconds"] = time.perf_counter() - t0
    log(f"costs {protect}{'-' + integrity if integrity else ''}: "
        f"{out['npf_first_touch_us']:.1f} us/page first touch, check {out['check_ms_1g']:.3f} ms "
        f"at 1 GiB, {out['psp_bytes_per_gib'] / MiB:.2f} MiB PSP per GiB, "
        f"{out['guest_mips']:.1f} M insn/s")
    return out
