"""Guest memory as the VMM sees it, for any vCPU: linear -> guest-physical ->
host-physical through the guest's own page tables (if it turned paging on) and
the PSP's NPT (the 2D walk of nptcore), reads and writes of guest virtual
memory, and the guest table pages a 2D walk reads.

A mixin: the vCPU provides `eng` (NPT engine), `mem` (host memory), `pc`,
`cpu_mode()` -> (mode, cr3, lma), `_npt_root()`, `_npf(va, gpa, access,
err, rip, mode)` (the NPF path; true when the guest must stop) and `vm` (its
`rmp`, under the rmp design, is what every translation is checked against:
`_walk` / `_walk2d`).
"""
from nptcore.bits import ACC_R, ACC_W, GUEST_ADDR_MASK, K_GUEST_PF, MODE_LONG4, MODE_PAE, MODE_32

from hv.machine.exceptions import _GuestFault, _Halt

MODE_NONE = 0


class GuestMemoryView:
    """translate / read_virt / write_virt / read_gpa over the vCPU's state."""

    def _walk(self, root, gpa, access, set_ad=True):
        """The CPU's nested walk (with the RMP check under the rmp design)."""
        rmp = getattr(self.vm, "rmp", None)
        if rmp is not None:
            return self.eng.walk_rmp(root, gpa, access, rmp, set_ad)
        return self.eng.walk(root, gpa, access, set_ad)

    def _walk2d(self, root, cr3, va, access, mode, set_ad=True):
        rmp = getattr(self.vm, "rmp", None)
        if rmp is not None:
            return self.eng.walk2d_rmp(root, cr3, va, access, mode, rmp, set_ad)
        return self.eng.walk2d(root, cr3, va, access, mode, set_ad)

    def translate(self, va, access=ACC_R, fault=False):
        """HPA of linear address va (None if unmapped and not `fault`).

        With fault=True this is the CPU's own access (exception delivery):
        NPFs are taken (the VMM maps), A/D are set, a guest #PF raises
        _GuestFault(14)."""
        mode, cr3, lma = self.cpu_mode()
        for _ in range(8):
            root = self._npt_root()
            if mode == MODE_NONE:
                gpa = va if lma else va & 0xFFFFFFFF
                r = self._walk(root, gpa, access, set_ad=fault)
                if r.ok:
                    return r.hpa
                err = r.errcode
            else:
                r = self._walk2d(root, cr3, va, access, mode, set_ad=fault)
                if r.ok:
                    return r.hpa
                if r.kind == K_GUEST_PF:
                    if fault:
                        raise _GuestFault(14, r.errcode, va)
                    return None
                gpa, err = r.gpa, r.errcode
            if not fault:
                return None
            if self._npf(va, gpa, access, err, self.pc, mode):
                raise _Halt()
        raise _Halt()

    def read_virt(self, va, n, fault=False):
        out = bytearray()
        while len(out) < n:
            a = va + len(out)
            k = min(n - len(out), 4096 - (a & 0xFFF))
            hpa = self.translate(a, ACC_R, fault)
            if hpa is None:
                break
            out += self.mem.read(hpa, k)
        return bytes(out)

    def write_virt(self, va, data):
        off = 0
        hpas = []
        while off < len(data):      # translate everything first (as a CPU would fault)
            a = va + off
            k = min(len(data) - off, 4096 - (a & 0xFFF))
            hpas.append((self.translate(a, ACC_W, True), off, k))
            off += k
        for hpa, o, k in hpas:
            self.mem.write(hpa, data[o:o + k])

    def read_gpa(self, gpa, n):
        """Bytes at guest-physical gpa as mapped now (zeros where unmapped);
        no NPF, no A/D update."""
        out = bytearray()
        while len(out) < n:
            a = gpa + len(out)
            k = min(n - len(out), 4096 - (a & 0xFFF))
            r = self._walk(self._npt_root(), a, ACC_R, set_ad=False)
            out += self.mem.read(r.hpa, k) if r.ok else bytes(k)
        return bytes(out)

    def insn_bytes(self, rip, n=15):
        return self.read_virt(rip, n)

    def _table_pages(self, root, cr3, va, mode):
        """GPA pages of the guest table entries a 2D walk of va reads (for the
        Python hook's record of touched pages)."""
        pages = []
        if mode == MODE_LONG4:
            table, levels, esz = cr3 & GUEST_ADDR_MASK, 4, 8
        elif mode == MODE_PAE:
            table, levels, esz = cr3 & 0xFFFFFFE0, 3, 8
        else:
            table, levels, esz = cr3 & 0xFFFFF000, 2, 4
        for L in range(levels, 0, -1):
            if mode == MODE_32:
                eg = table + (((va >> (2 + 10 * L)) & 1023) << 2)
            elif mode == MODE_PAE and L == 3:
                eg = table + (((va >> 30) & 3) << 3)
            else:
                eg = table + ((va >> (9 * L)) & 0xFF8)
            pages.append(eg >> 12)
            r = self.eng.walk(root, eg, ACC_R, set_ad=False)
            if not r.ok:
                break
            e = int.from_bytes(self.mem.read(r.hpa, esz), "little")
            if not e & 1:
                break
            if L == 1 or (e & 0x80 and not (mode == MODE_PAE and L == 3) and L != 4):
                break
            table = (e & 0xFFFFF000) if mode == MODE_32 else (e & GUEST_ADDR_MASK)
        return pages
