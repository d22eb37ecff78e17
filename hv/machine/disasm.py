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
