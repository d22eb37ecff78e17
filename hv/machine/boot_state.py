"""The CPU state a loaded image starts in, written into a Unicorn x86 CPU
(apply_boot_state), and the segment descriptor caches its boot GDT gives
(boot_segments: for the KVM vCPU, which sets them directly).

Shared by the Unicorn vCPU (hv/machine/unicorn_vcpu.py) and the plain-Unicorn baseline
(guests/flat_runner.py), so both start a guest identically. `image.cpu` and
`image.initial_regs` come from hv.loader.
"""
from unicorn import x86_const as X

MSR_EFER = 0xC0000080

_REGS = {"rip": X.UC_X86_REG_RIP, "rdi": X.UC_X86_REG_RDI, "rsp": X.UC_X86_REG_RSP,
         "rflags": X.UC_X86_REG_RFLAGS, "eip": X.UC_X86_REG_EIP, "eax": X.UC_X86_REG_EAX,
         "ebx": X.UC_X86_REG_EBX, "esp": X.UC_X86_REG_ESP, "eflags": X.UC_X86_REG_EFLAGS}
# cs first: long mode is entered with the 64-bit code segment
_SEGS = ("cs", "ds", "es", "fs", "gs", "ss")


def apply_boot_state(uc, image):
    """GDTR, paging registers (64-bit images: CR3, CR4, EFER before CR0.PG),
    segment selectors (loaded from the boot GDT) and the ABI's registers."""
    cpu = image.cpu
    uc.reg_write(X.UC_X86_REG_GDTR, (0, cpu["gdt_base"], cpu["gdt_limit"], 0))
    if image.mode == 64:
        uc.reg_write(X.UC_X86_REG_CR3, cpu["cr3"])
        uc.reg_write(X.UC_X86_REG_CR4, cpu["cr4"])
        uc.msr_write(MSR_EFER, cpu["efer"])
    uc.reg_write(X.UC_X86_REG_CR0, cpu["cr0"])
    for name in _SEGS:
        uc.reg_write(getattr(X, "UC_X86_REG_" + name.upper()), cpu[name])
    for name, value in image.initial_regs.items():
        if name in _REGS:
            uc.reg_write(_REGS[name], value)


def descriptor(image, selector):
    """The descriptor cache a load of `selector` from the image's boot GDT
    gives: dict(base, limit, selector, type, s, dpl, present, db, l, g, avl).

    For a vCPU whose segment state is written directly (KVM: KVM_SET_SREGS)
    rather than loaded by the CPU from the GDT as Unicorn does: both then
    start with the same segments."""
    cpu = image.cpu
    gdt = dict(image.extra_pages)[cpu["gdt_base"]]
    idx = selector >> 3
    if selector & 4 or 8 * idx + 7 > cpu["gdt_limit"]:
        raise ValueError(f"selector {selector:#x} is not in the boot GDT")
    d = int.from_bytes(gdt[8 * idx:8 * idx + 8], "little")
    limit = (d & 0xFFFF) | (((d >> 48) & 0xF) << 16)
    access, flags = (d >> 40) & 0xFF, (d >> 52) & 0xF
    if flags & 8:                       # G: 4 KiB granularity
        limit = (limit << 12) | 0xFFF
    return {"base": ((d >> 16) & 0xFFFFFF) | (((d >> 56) & 0xFF) << 24), "limit": limit,
            "selector": selector, "type": access & 0xF, "s": (access >> 4) & 1,
            "dpl": (access >> 5) & 3, "present": access >> 7, "avl": flags & 1,
            "l": (flags >> 1) & 1, "db": (flags >> 2) & 1, "g": flags >> 3}


def boot_segments(image):
    """{cs, ds, es, fs, gs, ss: descriptor(...)} of the image's entry state."""
    return {name: descriptor(image, image.cpu[name]) for name in _SEGS}
