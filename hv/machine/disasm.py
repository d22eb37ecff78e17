"""capstone helpers: decode the faulting instruction for logs and reports."""
import functools


@functools.lru_cache(maxsize=None)
def _cs(mode):
    import capstone
    m = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[mode]
    return capstone.Cs(capstone.CS_ARCH_X86, m)


def disasm_one(code, addr=0, mode=64):
    """'mov byte ptr [rax], 1' (or '(bad: 0f 0b ..)') for the first instruction."""
    try:
        for insn in _cs(mode).disasm(bytes(code), addr, 1):
            return f"{insn.mnemonic} {insn.op_str}".strip()
    except Exception:   # capstone missing or broken: the log still names the bytes
        pass
    return "(bad: " + bytes(code[:8]).hex(" ") + ")"


def disasm_many(code, addr=0, mode=64, count=8):
    out = []
    for insn in _cs(mode).disasm(bytes(code), addr, count):
        out.append((insn.address, insn.bytes.hex(), f"{insn.mnemonic} {insn.op_str}".strip()))
    return out


@functools.lru_cache(maxsize=None)
def _cs_detail(mode):
    import capstone
    m = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[mode]
    md = capstone.Cs(capstone.CS_ARCH_X86, m)
    md.detail = True
    return md


def decode_length(code, addr=0, mode=64):
    """Length of the first instruction in code, or None if it does not
    decode from these bytes (e.g. they stop inside it)."""
    for insn in _cs(mode).disasm(bytes(code), addr, 1):
        return insn.size
    return None


def memory_operands(code, rip, mode, reg):
    """[(linear address, size)] of the explicit memory operands of the
    instruction at rip (code: its bytes).  reg(name) reads a register
    ("rax", "fs_base", ...).  [] if it does not decode."""
    from capstone import x86 as cx
    try:
        insn = next(_cs_detail(mode).disasm(bytes(code), rip, 1))
    except StopIteration:
        return []
    mask = (1 << mode) - 1

    def value(r):
        if not r:
            return 0
        name = insn.reg_name(r)
        if name in ("rip", "eip"):
            return rip + insn.size
        return reg(name)

    out = []
    for op in insn.operands:
        if op.type == cx.X86_OP_MEM:
            m = op.mem
            ea = (value(m.base) + value(m.index) * m.scale + m.disp) & mask
            if m.segment and insn.reg_name(m.segment) in ("fs", "gs"):
                ea = (ea + reg(insn.reg_name(m.segment) + "_base")) & mask
            out.append((ea, op.size or 1))
    return out
