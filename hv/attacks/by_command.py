"""Crafted commands: the PSP must refuse each and change nothing (digest,
isolated, rmp); under none the VMM just writes the entry (hv/attacks/expect.py)."""
import struct

from nptcore.bits import ACC_R, ACC_W, P, U, W
from psp_firmware import Cmd, Status
from psp_firmware.commands import ATTR_RWX
from psp_firmware.protect import COMMANDS
from hv.attacks.expect import BAD_COMMAND, PREFILLED_TABLES, TABLE_PAGE_BY_COMMAND
from hv.attacks.lab import Lab, frame_of, run_tamper
from hv.attacks.registry import AttackResult, MB2, PAGE, REFUSED, scenario, Undetected


# ---------------------------------------------------------------------------
# refused: crafted PSP commands. Each subcase must be refused with the
# expected status and change nothing (digest, host memory of the table,
# translation).

def _refusals(lab, cases, name, what):
    """cases: [(label, expected_status, callable -> Reply, (vm, gpa, bad_hpa) or None)]

    The mappings go the design's way (lab.map: UPDATE_NPT, or RMP_ASSIGN and
    the VMM's write, or under none just the write). A case that is
    meaningless under the design (_only) is left out there."""
    statuses = []
    notes = []
    vmm = lab.vmm
    for case in cases:
        if len(case) == 5 and lab.design not in case[4]:
            continue
        label, want, send, probe = case[:4]
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
    """A mapping command, the design's way (lab.map)."""
    return lambda: lab.map(vm, gpa, hpa, level, attrs, npages)


def _has(lab, cmd):
    """Is `cmd` a command of the lab's design? (none has no private memory, ...)"""
    return cmd in COMMANDS[lab.design]


class _NoSuchGuest:
    handle = 0xDEAD


_PSP_MAPS = ("digest", "isolated", "rmp")       # designs where the PSP takes a mapping command
_ATTRS_TO_PSP = ("digest", "isolated")          # ... with the permissions in it (UPDATE_NPT)


@scenario("severed_remap_by_command", "severed_remap", BAD_COMMAND)
def sc_severed_by_cmd(cfg):
    """SEVered by command: UPDATE_NPT the victim's GPA onto another guest's page."""
    with Lab(cfg) as lab:
        v = lab.victim
        free_gpa = lab.base + 0x80000
        cases = [
            ("other_guest_mapped_page", Status.PAGE_OWNED,
             _upd(lab, v, free_gpa, lab.other_page), (v, free_gpa, lab.other_page)),
        ]
        if _has(lab, Cmd.SET_PRIVATE_MEMORY):
            priv = lab.fresh()
            assert lab.psp.set_private_memory(lab.other.handle, priv, 1).ok
            cases.append(("other_guest_private_page", Status.BAD_OWNER,
                          _upd(lab, v, free_gpa, priv), (v, free_gpa, priv)))
        cases.append(("unmap_then_remap", Status.GPA_MAPPED,
                      _upd(lab, v, lab.work[0], lab.fresh()), None))
        return _refusals(lab, cases, "", "remap onto the other guest's memory by command")


@scenario("alias_by_command", "alias", BAD_COMMAND)
def sc_alias_by_command(cfg):
    """Alias two GPAs onto one HPA by UPDATE_NPT (same guest, 4K and 2M)."""
    with Lab(cfg) as lab:
        v = lab.victim
        hpa0 = frame_of(lab.vmm, v, lab.work[0])
        gpa = lab.base + 0x90000
        block = hpa0 & ~(MB2 - 1)
        run = lab.fresh(3)
        assert lab.map(v, lab.base + 0x98000, run + PAGE).ok
        cases = [
            ("same_guest_4k", Status.PAGE_OWNED, _upd(lab, v, gpa, hpa0), (v, gpa, hpa0)),
            ("same_guest_range", Status.PAGE_OWNED,
             _upd(lab, v, gpa, run, npages=3), (v, gpa + PAGE, run + PAGE)),
            ("same_guest_2m_over_frame", None,
             _upd(lab, v, 0x80000000, block, level=2), (v, 0x80000000, block)),
        ]
        return _refusals(lab, cases, "", "alias by command")


@scenario("map_table_page", "bad_hpa", TABLE_PAGE_BY_COMMAND)
def sc_map_table_page(cfg):
    """UPDATE_NPT with an HPA that is an NPT page (root, leaf table, free pool page)."""
    with Lab(cfg) as lab:
        v = lab.victim
        gpa = lab.base + 0xA0000
        root = lab.vmm.npt_root(v)
        pt = lab.leaf(lab.work[0]) & ~0xFFF
        other_root = lab.vmm.npt_root(lab.other)
        from hv.vmm.vmm import POOL_CHUNK
        if lab.design == "isolated":        # the PSP's range: its pool is the top of it
            pool_page = lab.vmm.iso_base + lab.vmm.iso_size - PAGE
        else:
            pool_page = lab.vmm.alloc.base + (POOL_CHUNK - 1) * PAGE
        cases = [
            ("own_root", Status.TABLE_PAGE, _upd(lab, v, gpa, root), (v, gpa, root)),
            ("own_leaf_table", Status.TABLE_PAGE, _upd(lab, v, gpa, pt), (v, gpa, pt)),
            ("other_guest_root", Status.TABLE_PAGE, _upd(lab, v, gpa, other_root), (v, gpa, other_root)),
            ("free_pool_page", Status.TABLE_PAGE, _upd(lab, v, gpa, pool_page), (v, gpa, pool_page),
             ("digest", "isolated")),           # (rmp, none: the VMM has no table pool)
            ("vmsa_page", Status.BAD_PAGE_STATE, _upd(lab, v, gpa, v.vmsa), (v, gpa, v.vmsa)),
            ("2m_covering_tables", Status.TABLE_PAGE,
             _upd(lab, v, 0x80000000, root & ~(MB2 - 1), level=2), (v, 0x80000000, root & ~(MB2 - 1))),
            ("set_private_on_table", Status.TABLE_PAGE,
             lambda: lab.psp.set_private_memory(v.handle, root, 1), None),
            ("pool_add_table", Status.TABLE_PAGE, lambda: lab.psp.pool_add(pt, 1), None),
        ]
        return _refusals(lab, cases, "", "map an NPT page")


@scenario("map_psp_memory", "bad_hpa", BAD_COMMAND)
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


@scenario("map_other_guest_page", "bad_hpa", BAD_COMMAND)
def sc_map_other_guest(cfg):
    """UPDATE_NPT with another guest's mapped, private, table and VMSA frames."""
    with Lab(cfg) as lab:
        v, o = lab.victim, lab.other
        gpa = lab.base + 0xC0000
        priv = lab.fresh()
        private = ("digest", "isolated", "rmp")      # none has no private memory
        if _has(lab, Cmd.SET_PRIVATE_MEMORY):
            assert lab.psp.set_private_memory(o.handle, priv, 1).ok
        cases = [
            ("mapped", Status.PAGE_OWNED, _upd(lab, v, gpa, lab.other_page), (v, gpa, lab.other_page)),
            ("private", Status.BAD_OWNER, _upd(lab, v, gpa, priv), (v, gpa, priv), private),
            ("vmsa", Status.BAD_PAGE_STATE, _upd(lab, v, gpa, o.vmsa), (v, gpa, o.vmsa)),
            ("claim_private", Status.BAD_OWNER,
             lambda: lab.psp.set_private_memory(v.handle, priv, 1), None, private),
            ("claim_mapped", Status.BAD_OWNER,
             lambda: lab.psp.set_private_memory(v.handle, lab.other_page, 1), None, private),
            ("reclaim_others", Status.BAD_OWNER, lambda: lab.psp.reclaim(v.handle, priv), None,
             private),
            ("unmap_others_gpa_via_own_handle", Status.GPA_NOT_MAPPED,
             lambda: lab.unmap(v, 0x900000), None),
        ]
        return _refusals(lab, cases, "", "take another guest's frames")


@scenario("map_out_of_range", "bad_hpa", BAD_COMMAND)
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
            ("bad_attrs", Status.INVALID_PARAM, _upd(lab, v, gpa, lab.fresh(), attrs=0xFF), None,
             _ATTRS_TO_PSP),                     # (rmp: the VMM writes the permissions)
            ("bad_handle", Status.INVALID_HANDLE,
             _upd(lab, _NoSuchGuest, gpa, lab.fresh()), None, _PSP_MAPS),
        ]
        return _refusals(lab, cases, "", "out-of-range addresses")


@scenario("map_misaligned", "bad_hpa", BAD_COMMAND)
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


@scenario("range_overlap", "range", BAD_COMMAND)
def sc_range_overlap(cfg):
    """Ranges that overlap mapped GPAs, owned HPAs, or 2M over 4K mappings."""
    with Lab(cfg) as lab:
        v = lab.victim
        run = lab.fresh(4)
        tri = lab.fresh(3)
        assert lab.map(v, lab.base + 0x99000, tri + PAGE).ok
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
        assert lab.map(v, 0xC0000000, big, 2, ATTR_RWX, 1).ok
        cases.append(("small_under_huge", Status.GPA_MAPPED,
                      _upd(lab, v, 0xC0000000 + 5 * PAGE, lab.fresh()), None))
        return _refusals(lab, cases, "", "overlapping ranges")


@scenario("range_overflow", "range", BAD_COMMAND)
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


@scenario("reclaim_unscrubbed", "reclaim", BAD_COMMAND)
def sc_reclaim_unscrubbed(cfg):
    """Get a guest's frame back unscrubbed: reclaim/re-donate while mapped or private."""
    with Lab(cfg) as lab:
        v, o = lab.victim, lab.other
        gpa = lab.work[11]
        hpa = frame_of(lab.vmm, v, gpa)
        secret = b"VICTIM SECRET KEY MATERIAL"
        lab.mem.write(hpa, secret)
        if lab.design == "none":       # no PSP to ask: the VMM takes the frame back as it is
            lab.unmap(v, gpa)
            got = lab.mem.read(hpa, len(secret))
            raise Undetected(f"the VMM unmapped GPA {gpa:#x} and read its frame {hpa:#x} back "
                             f"unscrubbed: {got!r}")
        cases = [
            ("reclaim_mapped", Status.BAD_PAGE_STATE, lambda: lab.psp.reclaim(v.handle, hpa), None),
            ("reclaim_by_other_guest", Status.BAD_OWNER, lambda: lab.psp.reclaim(o.handle, hpa), None),
            ("pool_add_mapped", Status.PAGE_OWNED, lambda: lab.psp.pool_add(hpa, 1), None),
            ("donate_mapped_to_other", Status.BAD_OWNER,
             lambda: lab.psp.set_private_memory(o.handle, hpa, 1), None),
            ("map_into_other", Status.PAGE_OWNED, _upd(lab, o, 0xA00000, hpa), (o, 0xA00000, hpa)),
        ]
        res = _refusals(lab, cases, "", "re-use a mapped frame")
        assert lab.unmap(v, gpa).ok
        cases = [
            ("map_unmapped_into_other", Status.BAD_OWNER, _upd(lab, o, 0xA00000, hpa), (o, 0xA00000, hpa)),
            ("donate_private_to_other", Status.BAD_OWNER,
             lambda: lab.psp.set_private_memory(o.handle, hpa, 1), None),
            ("pool_add_private", Status.BAD_PAGE_STATE, lambda: lab.psp.pool_add(hpa, 1), None),
            ("launch_start_on_private", Status.BAD_PAGE_STATE, lambda: lab.psp.launch_start(hpa), None),
        ]
        res2 = _refusals(lab, cases, "", "re-use an unmapped private frame")
        r = lab.reclaim(v, hpa)           # (rmp: the frame is still assigned: RMP_UNASSIGN)
        if not r.ok:
            raise RuntimeError(f"legitimate RECLAIM refused: {r.name}")
        if lab.mem.read(hpa, PAGE) != bytes(PAGE):
            raise Undetected("RECLAIM handed the frame back without scrubbing it")
        again = lab.reclaim(v, hpa)
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


@scenario("pool_prefill", "reclaim", PREFILLED_TABLES)
def sc_pool_prefill(cfg):
    """Pre-fill frames that become table pages with crafted entries (donated pool frames)."""
    with Lab(cfg) as lab:
        if lab.design in ("rmp", "none"):
            return _prefilled_own_tables(cfg, lab)
        v = lab.victim
        n = 8
        pool = lab.fresh(n)
        crafted = struct.pack("<Q", lab.other_page | P | W | U) * 512
        for i in range(n):
            lab.mem.write(pool + i * PAGE, crafted)
        r = lab.psp.pool_add(pool, n)
        statuses = [f"pool_add:{r.name}"]
        if lab.design == "isolated":
            # the PSP's tables come from its own memory: no VMM frame can become one
            if r.ok:
                raise Undetected("POOL_ADD took VMM frames as table pages under isolated")
        elif not r.ok:
            raise RuntimeError(f"POOL_ADD refused: {r.name}")
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
        if lab.design == "isolated":
            return AttackResult("", REFUSED, exposure_insns=0, statuses=statuses,
                                detail=f"POOL_ADD answered {r.name} (not a command of isolated): "
                                       f"the new table pages came from the PSP's own memory, no "
                                       f"crafted entry became live")
        return AttackResult("", REFUSED, exposure_insns=0, statuses=["adopted_scrubbed"],
                            detail=f"{len(used)} pre-filled pool frames became table pages; the PSP "
                                   f"scrubbed each before use, no crafted entry became live")


def _prefilled_own_tables(cfg, lab):
    """rmp, none: the VMM builds its own tables, so a 'pre-filled' table page
    is one it fills with crafted entries itself: every empty slot of a new
    leaf table points at the other guest's page; the guest then touches GPAs
    under them (caught by the RMP check at the access under rmp)."""
    v = lab.victim
    base = 0x5000000000
    lab.vmm.touch(v, base, ACC_W)                  # a new leaf table
    pt = lab.leaf(base) & ~0xFFF
    crafted = struct.pack("<Q", lab.other_page | P | W | U)

    def tamper():
        for i in range(1, 512):
            lab.mem.write(pt + 8 * i, crafted)
    pattern = [(g, ACC_R) for g in lab.work] + [(base + i * PAGE, ACC_R) for i in (1, 2, 300)]
    return run_tamper(cfg, lab, tamper, pattern=pattern, bad_hpas=[lab.other_page],
                      warm_slices=0, name="pool_prefill",
                      what=f"the VMM filled 511 slots of its new leaf table {pt:#x} with entries "
                           f"onto the other guest's page")
