"""Tampers by writing the NPT in host memory: what each design makes of them
(hv/attacks/expect.py: REMAP_BY_WRITE, PERMISSION_BY_WRITE)."""
import struct

from nptcore.bits import ACC_R, ACC_W, ACC_X, ADDR_MASK, NX, P, PS, U, W, index as npt_index
from psp_firmware.commands import ATTR_W, ATTR_X
from hv.attacks.expect import PERMISSION_BY_WRITE, REMAP_BY_WRITE
from hv.attacks.registry import MB2, PAGE, scenario
from hv.attacks.lab import AccessLoop, Lab, entry_addr, frame_of, run_tamper


# ---------------------------------------------------------------------------
# detected: direct writes to the NPT in host memory

@scenario("severed_remap", "severed_remap", REMAP_BY_WRITE)
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


@scenario("severed_remap_npf", "severed_remap", REMAP_BY_WRITE)
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


@scenario("alias_by_write", "alias", REMAP_BY_WRITE)
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


@scenario("alias_new_gpa_by_write", "alias", REMAP_BY_WRITE)
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


@scenario("replay_old_entry", "replay", REMAP_BY_WRITE)
def sc_replay_old_entry(cfg):
    """Replay an old entry: the frame was unmapped, reclaimed and given to another
    guest; the VMM writes the victim's old leaf back."""
    with Lab(cfg) as lab:
        gpa = lab.work[7]
        slot = lab.leaf(gpa)
        old = lab.mem.read_u64(slot)
        hpa = old & ADDR_MASK
        steps = [lab.unmap(lab.victim, gpa), lab.reclaim(lab.victim, hpa),
                 lab.map(lab.other, 0x900000, hpa)]
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


@scenario("replay_old_table_page", "replay", REMAP_BY_WRITE)
def sc_replay_old_table_page(cfg):
    """Replay a whole old table page (a snapshot from before an UNMAP)."""
    with Lab(cfg) as lab:
        gpa = lab.work[4]
        slot = lab.leaf(gpa)
        pt = slot & ~0xFFF
        snap = lab.mem.read(pt, PAGE)
        hpa = frame_of(lab.vmm, lab.victim, gpa)
        assert lab.unmap(lab.victim, gpa).ok
        assert lab.reclaim(lab.victim, hpa).ok
        pattern = [(g, ACC_R) for g in lab.work]   # includes gpa: live only if the replay works
        return run_tamper(cfg, lab, lambda: lab.mem.write(pt, snap), pattern=pattern,
                          bad_hpas=[hpa], warm_slices=0, name="replay_old_table_page",
                          what=f"leaf table page {pt:#x} restored from a snapshot taken before "
                               f"GPA {gpa:#x} was unmapped and its frame reclaimed")


@scenario("escalate_writable", "permission_escalation", PERMISSION_BY_WRITE)
def sc_escalate_writable(cfg):
    """Permission escalation: set W on a read-only page."""
    with Lab(cfg) as lab:
        ro = lab.base + 0x40000
        hpa = lab.fresh()
        r = lab.map(lab.victim, ro, hpa, 1, ATTR_X, 1)   # read+exec, no write
        assert r.ok, r
        w = lab.vmm.engine.walk(lab.vmm.npt_root(lab.victim), ro, ACC_W, set_ad=False)
        assert not w.ok, "read-only page writable before the tamper"
        slot = lab.leaf(ro)
        pattern = [(g, ACC_R) for g in lab.work] + [(ro, ACC_W)]
        return run_tamper(cfg, lab, lambda: lab.mem.write_u64(slot, lab.mem.read_u64(slot) | W),
                          pattern=pattern, bad_hpas=[hpa], warm_slices=0,
                          name="escalate_writable",
                          what=f"W set on read-only GPA {ro:#x}")


@scenario("escalate_clear_nx", "permission_escalation", PERMISSION_BY_WRITE)
def sc_escalate_clear_nx(cfg):
    """Permission escalation: clear no-execute on a data page."""
    with Lab(cfg) as lab:
        nxg = lab.base + 0x41000
        hpa = lab.fresh()
        assert lab.map(lab.victim, nxg, hpa, 1, ATTR_W, 1).ok   # RW, NX
        x = lab.vmm.engine.walk(lab.vmm.npt_root(lab.victim), nxg, ACC_X, set_ad=False)
        assert not x.ok, "NX page executable before the tamper"
        slot = lab.leaf(nxg)
        pattern = [(g, ACC_R) for g in lab.work] + [(nxg, ACC_X)]
        return run_tamper(cfg, lab, lambda: lab.mem.write_u64(slot, lab.mem.read_u64(slot) & ~NX),
                          pattern=pattern, bad_hpas=[hpa], warm_slices=0,
                          name="escalate_clear_nx", what=f"NX cleared on data GPA {nxg:#x}")


@scenario("swap_table_page", "table_swap", REMAP_BY_WRITE)
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


@scenario("swap_table_contents", "table_swap", REMAP_BY_WRITE)
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


@scenario("swap_root_pointer", "root_swap", REMAP_BY_WRITE)
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


@scenario("swap_root_to_other_guest", "root_swap", REMAP_BY_WRITE)
def sc_swap_root_other(cfg):
    """Point the victim's nCR3 at the other guest's (valid, PSP-made) table."""
    with Lab(cfg) as lab:
        other_root = lab.vmm.npt_root(lab.other)

        def tamper():
            lab.mem.write_u64(lab.victim.vmsa, other_root)
        return run_tamper(cfg, lab, tamper, bad_hpas=[lab.other_page],
                          name="swap_root_to_other_guest",
                          what=f"victim nCR3 -> the other guest's root {other_root:#x}")


@scenario("map_table_page_by_write", "bad_hpa", REMAP_BY_WRITE)
def sc_map_table_by_write(cfg):
    """Direct write: map the victim's own NPT root page, writable, into the guest."""
    with Lab(cfg) as lab:
        root = lab.vmm.npt_root(lab.victim)
        gpa = lab.work[9]
        slot = lab.leaf(gpa)
        return run_tamper(cfg, lab, lambda: lab.mem.write_u64(slot, root | P | W | U),
                          bad_hpas=[root], name="map_table_page_by_write",
                          what=f"GPA {gpa:#x} -> the NPT root page {root:#x} (RW)")


@scenario("map_psp_memory_by_write", "bad_hpa", REMAP_BY_WRITE)
def sc_map_psp_by_write(cfg):
    """Direct write: map PSP/firmware memory into the guest."""
    with Lab(cfg) as lab:
        fw = lab.vmm.fw_base
        gpa = lab.work[10]
        slot = lab.leaf(gpa)
        return run_tamper(cfg, lab, lambda: lab.mem.write_u64(slot, fw | P | W | U),
                          bad_hpas=[fw], name="map_psp_memory_by_write",
                          what=f"GPA {gpa:#x} -> PSP memory {fw:#x}")


@scenario("map_huge_by_write", "bad_hpa", REMAP_BY_WRITE)
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
