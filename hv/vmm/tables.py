"""Who writes a guest's NPT, per protection design (`--protect`).

    digest, isolated   the PSP: the VMM asks (UPDATE_NPT, UNMAP, RECLAIM)
                       and the PSP validates and writes (PspWrites)
    rmp                the VMM writes its own table, after the PSP has
                       assigned the frames in the RMP (RMP_ASSIGN); giving
                       frames back is RMP_UNASSIGN (VmmWrites)
    none               the VMM writes its own table; nothing is asked (VmmWrites)

Every method returns a Reply (hv.psp_link.client): the PSP's, or for what
the VMM did itself one with the status an honest VMM would give (SUCCESS,
GPA_MAPPED, GPA_NOT_MAPPED). `force=True` is the malicious VMM of the attack
suite under the designs where it writes the table: it writes the leaf
whatever is there (no check of its own), as nothing stops it.
"""
from nptcore.bits import ADDR_MASK, INST_MAPPED, INST_NEED_TABLES, INST_OK, NX, P, PS, U, W
from psp_firmware import Status
from psp_firmware.commands import ATTR_W, ATTR_X

from hv.errors import VmStopped
from hv.psp_link.client import Reply
from hv.vmm.hostmem import PAGE

_OK = Reply(Status.SUCCESS, {})
TABLE_ENTRY = P | W | U


def leaf_flags(attrs, level):
    """The leaf an UPDATE_NPT with `attrs` gets (as the PSP writes it)."""
    f = P | U | (W if attrs & ATTR_W else 0) | (0 if attrs & ATTR_X else NX)
    return f | (PS if level == 2 else 0)


def level_size(level):
    return PAGE << (9 * (level - 1))


class PspWrites:
    """digest and isolated: the PSP installs every entry."""

    writer = "psp"

    def __init__(self, vmm):
        self.vmm = vmm

    def launch(self):
        """LAUNCH_START: (handle, vmsa)."""
        vmm = self.vmm
        if vmm.protect == "isolated":
            r = vmm.psp.launch_start(0)          # the PSP picks the control page
            if not r.ok:
                raise RuntimeError(f"PSP refused LAUNCH_START: {r.name}")
            st = vmm.psp.guest_status(r.handle)
            return r.handle, st.fields["vmsa"]
        vmsa = vmm.alloc.alloc(1)
        r = vmm._psp_retry_pool(vmm.psp.launch_start, vmsa)
        if not r.ok:
            vmm.alloc.free(vmsa)
            raise RuntimeError(f"PSP refused LAUNCH_START: {r.name}")
        return r.handle, vmsa

    def load(self, vm, gpa, hpa):
        return self.vmm._psp_retry_pool(self.vmm.psp.launch_update_data, vm.handle, gpa, hpa, 1)

    def map(self, vm, gpa, hpa, level, attrs, npages, force=False):
        return self.vmm._psp_retry_pool(self.vmm.psp.update_npt, vm.handle, gpa, hpa, level,
                                        attrs, npages)

    def unmap(self, vm, gpa, level=1, npages=1):
        return self.vmm.psp.unmap(vm.handle, gpa, level, npages)

    def reclaim(self, vm, hpa, npages=1, level=1):
        return self.vmm.psp.reclaim(vm.handle, hpa, npages)


class VmmWrites:
    """rmp and none: the VMM writes its own table (rmp: once the PSP has
    assigned the frames)."""

    writer = "vmm"

    def __init__(self, vmm):
        self.vmm = vmm
        self.rmp = vmm.protect == "rmp"

    def launch(self):
        vmm = self.vmm
        vmsa = vmm.alloc.alloc(1)
        r = vmm.psp.launch_start(vmsa)
        if not r.ok:
            vmm.alloc.free(vmsa)
            raise RuntimeError(f"PSP refused LAUNCH_START: {r.name}")
        root = vmm.alloc.alloc(1)
        vmm.mem.zero(root, PAGE)
        vmm.mem.write_u64(vmsa, root)            # nCR3: the VMM's own table
        return r.handle, vmsa

    def load(self, vm, gpa, hpa):
        r = self.vmm.psp.launch_update_data(vm.handle, gpa, hpa, 1)   # measured (rmp: assigned)
        if not r.ok:
            return r
        return self._write(vm, gpa, hpa, 1, ATTR_W | ATTR_X, 1, False)

    def map(self, vm, gpa, hpa, level, attrs, npages, force=False):
        if self.rmp:
            r = self.vmm.psp.rmp_assign(vm.handle, gpa, hpa, level, npages)
            if not r.ok:
                return r
        return self._write(vm, gpa, hpa, level, attrs, npages, force)

    def _write(self, vm, gpa, hpa, level, attrs, npages, force):
        """Write npages leaves (the honest VMM: only into empty slots, all or
        nothing as far as the first refusal; force: overwrite anything)."""
        vmm = self.vmm
        eng, root = vmm.engine, vmm.npt_root(vm)
        size = level_size(level)
        flags = leaf_flags(attrs, level)
        for i in range(npages):
            g, h = gpa + i * size, hpa + i * size
            if force:
                slot = self._slot(root, g, level)
                if slot is None:
                    return Reply(Status.GPA_MAPPED, {})
                vmm.mem.write_u64(slot, (h & ADDR_MASK) | flags)
                continue
            rc, need = eng.tables_needed(root, g, level)
            spares = []
            if rc == INST_OK and need:
                spares = [vmm.alloc.alloc(1) for _ in range(need)]
            if rc == INST_OK:
                rc, _n = eng.install(root, g, h, level, flags, spares)
            if rc != INST_OK:
                for s in spares:
                    vmm.alloc.free(s)
                return Reply(Status.GPA_MAPPED if rc in (INST_MAPPED, INST_NEED_TABLES)
                             else Status.INVALID_PARAM, {})
        return _OK

    def _slot(self, root, gpa, level):
        """Address of gpa's entry at `level`, making tables on the way
        (None: a large leaf is in the way)."""
        mem = self.vmm.mem
        t = root
        for lvl in (4, 3, 2, 1):
            a = t + ((gpa >> (12 + 9 * (lvl - 1))) & 511) * 8
            if lvl == level:
                return a
            e = mem.read_u64(a)
            if not e & P:
                n = self.vmm.alloc.alloc(1)
                mem.zero(n, PAGE)
                mem.write_u64(a, n | TABLE_ENTRY)
                e = n | TABLE_ENTRY
            elif e & PS:
                return None
            t = e & ADDR_MASK
        return None

    def unmap(self, vm, gpa, level=1, npages=1):
        eng, root = self.vmm.engine, self.vmm.npt_root(vm)
        size = level_size(level)
        for i in range(npages):
            rc, _old = eng.clear(root, gpa + i * size, level)
            if rc != INST_OK:
                return Reply(Status.GPA_NOT_MAPPED, {})
        return _OK

    def reclaim(self, vm, hpa, npages=1, level=1):
        if self.rmp:
            return self.vmm.psp.rmp_unassign(vm.handle, hpa, level, npages)
        return _OK


def make_tables(vmm):
    return PspWrites(vmm) if vmm.protect in ("digest", "isolated") else VmmWrites(vmm)


def rmp_fault(vmm, vm, gpa, access, errcode):
    """The VmStopped of a translation that failed the RMP check (rmp design):
    what the entry points at and what the RMP says of that frame."""
    from nptcore.bits import PF_SIZEM
    from nptcore.rmp import decode_entry
    r = vmm.engine.walk(vmm.npt_root(vm), gpa, access, set_ad=False)
    fields = {"gpa": gpa, "errcode": errcode}
    what = ""
    if r.ok:
        e = vm.rmp.entry(r.hpa) if vm.rmp is not None else 0
        d = decode_entry(e)
        fields.update(hpa=r.hpa & ~0xFFF, rmp_entry=e)
        owner = (f"assigned to guest {d['asid']} at GPA {d['gpa']:#x} ({'2M' if d['level'] == 2 else '4K'})"
                 if d["assigned"] else "not assigned to any guest")
        what = f": the NPT maps it to frame {r.hpa & ~0xFFF:#x}, which the RMP says is {owner}"
    size = " (page size mismatch)" if errcode & PF_SIZEM else ""
    return VmStopped(Status.RMP_FAULT, f"RMP check failed for guest {vm.handle} at GPA "
                                       f"{gpa:#x}{what}{size}: nested fault, guest stopped",
                     fields=fields)
