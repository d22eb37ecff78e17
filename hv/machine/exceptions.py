"""Exception delivery through the guest's IDT for an emulated x86 vCPU
(Unicorn raises the exception; the VMM must push the frame and vector, as the
CPU would), with the double- and triple-fault rules, and the exact CR2 of a
page fault (Unicorn gives the page; capstone decodes the instruction's
operands to find the address).

A mixin of the Unicorn vCPU: it uses `self.uc`, `self.pc`, `code_bits()`,
`read_virt()`, `write_virt()` and `self.injected`. A hardware-virtualized
vCPU (KVM) has the CPU do all of this itself.
"""
import struct

from unicorn import x86_const as X

VEC_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
             8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
             17: "#AC", 18: "#MC", 19: "#XM"}
_ERRCODE_VECTORS = {8, 10, 11, 12, 13, 14, 17}
_CONTRIBUTORY = {0, 10, 11, 12, 13}


def vec_name(v):
    return VEC_NAMES.get(v, f"vector {v}")


class _GuestFault(Exception):
    def __init__(self, vector, errcode=None, cr2=None):
        super().__init__(vector)
        self.vector, self.errcode, self.cr2 = vector, errcode, cr2


class _Halt(Exception):
    pass


class _DeliveryError(Exception):
    pass


class ExceptionDelivery:
    """Delivers guest exceptions through the IDT (mixed into UnicornVcpu)."""

    def _deliver(self, vector, errcode=None, cr2=None):
        """Deliver an exception through the guest's IDT (same privilege level,
        interrupt/trap gates).  Returns None, or the triple-fault story."""
        chain = []
        uc = self.uc
        while True:
            chain.append(vec_name(vector))
            try:
                self._deliver_one(vector, errcode, cr2)
                self.injected.append((vector, self.pc))
                return None
            except _Halt:
                raise
            except _GuestFault as f:
                why = f"{vec_name(f.vector)} while delivering it"
            except _DeliveryError as d:
                why = str(d)
            chain[-1] += f" ({why})"
            if vector == 8:
                return " -> ".join(chain) + " -> triple fault (shutdown)"
            vector = 8 if (vector in _CONTRIBUTORY or vector == 14) else 13
            errcode, cr2 = 0, None
            _ = uc

    def _deliver_one(self, vector, errcode, cr2):
        uc = self.uc
        if cr2 is not None:
            uc.reg_write(X.UC_X86_REG_CR2, cr2)
        _sel, base, limit, _fl = uc.reg_read(X.UC_X86_REG_IDTR)
        long_mode = self.code_bits() == 64
        gsz = 16 if long_mode else 8
        if vector * gsz + gsz - 1 > limit:
            raise _DeliveryError(f"IDT limit {limit:#x}" if limit else "no IDT")
        gate = self.read_virt(base + vector * gsz, gsz, fault=True)
        if len(gate) < gsz:
            raise _DeliveryError("IDT not readable")
        off_lo, sel, ist, attr, off_mid = struct.unpack_from("<HHBBH", gate)
        gtype = attr & 0xF
        if not attr & 0x80:
            raise _DeliveryError("gate not present")
        if gtype not in (0xE, 0xF):
            raise _DeliveryError(f"gate type {gtype:#x} not supported")
        if vector in _ERRCODE_VECTORS and errcode is None:
            errcode = 0
        rip = self.pc
        if long_mode:
            (off_hi,) = struct.unpack_from("<I", gate, 8)
            target = off_lo | (off_mid << 16) | (off_hi << 32)
            rsp = uc.reg_read(X.UC_X86_REG_RSP)
            flags = uc.reg_read(X.UC_X86_REG_RFLAGS)
            frame = [uc.reg_read(X.UC_X86_REG_SS), rsp, flags, uc.reg_read(X.UC_X86_REG_CS), rip]
            if vector in _ERRCODE_VECTORS:
                frame.append(errcode)
            new_rsp = (rsp & ~0xF) - 8 * len(frame)
            self.write_virt(new_rsp, struct.pack(f"<{len(frame)}Q", *reversed(frame)))
            uc.reg_write(X.UC_X86_REG_RSP, new_rsp)
            uc.reg_write(X.UC_X86_REG_CS, sel)
            uc.reg_write(X.UC_X86_REG_RFLAGS, flags & ~(0x100 | (0x200 if gtype == 0xE else 0)))
            uc.reg_write(X.UC_X86_REG_RIP, target)
        else:
            target = off_lo | (off_mid << 16)
            esp = uc.reg_read(X.UC_X86_REG_ESP)
            flags = uc.reg_read(X.UC_X86_REG_EFLAGS)
            frame = [flags, uc.reg_read(X.UC_X86_REG_CS), rip]
            if vector in _ERRCODE_VECTORS:
                frame.append(errcode)
            new_esp = (esp - 4 * len(frame)) & 0xFFFFFFFF
            self.write_virt(new_esp, struct.pack(f"<{len(frame)}I", *[v & 0xFFFFFFFF for v in reversed(frame)]))
            uc.reg_write(X.UC_X86_REG_ESP, new_esp)
            uc.reg_write(X.UC_X86_REG_CS, sel)
            uc.reg_write(X.UC_X86_REG_EFLAGS, flags & ~(0x100 | (0x200 if gtype == 0xE else 0)))
            uc.reg_write(X.UC_X86_REG_EIP, target)

    def _exact_cr2(self, page, rip, ecode):
        """The faulting linear address for CR2.  Unicorn hands the TLB-fill
        hook only the page; the exact address comes from decoding the
        instruction at rip (its memory operands, or the implicit stack slot)."""
        if ecode & 0x10:                                     # fetch
            return rip if rip >> 12 == page >> 12 else page
        try:
            from hv.machine.disasm import memory_operands
            bits = self.code_bits()
            uc = self.uc
            mask = (1 << bits) - 1
            cands = memory_operands(self.read_virt(rip, 15), rip, bits,
                                    lambda name: uc.reg_read(getattr(X, "UC_X86_REG_" + name.upper())))
            sp = uc.reg_read(X.UC_X86_REG_RSP if bits == 64 else X.UC_X86_REG_ESP)
            w = bits // 8
            cands += [((sp - w) & mask, w), (sp, w)]
            for ea, size in cands:
                if ea >> 12 == page >> 12:
                    return ea
                if ea < page < ea + size:
                    return page
        except Exception:        # noqa: BLE001 - fall back to the page address
            pass
        return page
