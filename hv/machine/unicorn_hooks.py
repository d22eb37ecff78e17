"""The C hooks of the Unicorn vCPU (csrc/vcpu.c, built as hv._vcpu_c) and how
they are attached: registered straight with libunicorn's uc_hook_add (no
Python call per event), with the cffi callbacks that reach Python for an NPF
or a new basic block, found through a registry by the context's handle.
`BlockCounter` puts the instruction counter on any Uc (the benchmark's
plain-Unicorn baseline counts with it too).
"""
import ctypes

from unicorn import UC_HOOK_BLOCK, UcError

try:
    from unicorn.unicorn_py3.unicorn import uclib as _uclib
except ImportError:          # pragma: no cover - other binding layouts
    _uclib = None

try:
    from hv._vcpu_c import ffi as _ffi, lib as _lib
except ImportError:          # pragma: no cover - C module not built
    _ffi = _lib = None


def available_hooks():
    """Hook backends usable here, default first."""
    return (["c"] if _lib is not None and _uclib is not None else []) + ["python"]


_registry = {}

if _ffi is not None:
    @_ffi.def_extern()
    def vcpu_py_npf(ctx):
        v = _registry.get(ctx.handle)
        if v is None:
            return 1
        try:
            return v._npf(ctx.f_va, ctx.f_gpa, ctx.f_access, ctx.f_err, ctx.f_rip, ctx.f_mode)
        except BaseException as e:       # noqa: BLE001 - re-raised after emu_start
            v._exc = e
            return 1

    @_ffi.def_extern()
    def vcpu_py_block(ctx, addr, size):
        v = _registry.get(ctx.handle)
        if v is None:
            return 1
        try:
            return v._block_ninsns(addr, size)
        except BaseException as e:       # noqa: BLE001
            v._exc = e
            return 1


def _add_c_hook(uc, htype, addr, ud):
    """Register a C hook of csrc/vcpu.c straight with libunicorn (no Python
    call per event); returns the hook handle."""
    h = ctypes.c_size_t()
    err = _uclib.uc_hook_add(uc._uch, ctypes.byref(h), htype, ctypes.c_void_p(addr), ud, 1, 0)
    if err:
        raise UcError(err)
    return h


class BlockCounter:
    """The vCPU's C instruction counter (csrc/vcpu.c's block hook) on any Uc:
    what `hv bench` puts into its plain-Unicorn baseline, so that both sides
    of guest_speed_vs_unicorn count instructions the same way. `read_code(addr,
    size)` gives a new block's bytes (decoded once, with capstone, as the
    vCPU decodes them). `instructions`: the instructions of every block
    entered (a block the run stopped inside counts whole)."""

    def __init__(self, uc, read_code, bits):
        if _lib is None or _uclib is None:
            raise RuntimeError("the C vCPU hook (hv._vcpu_c) is not built")
        self._read, self._bits, self._blocks = read_code, bits, {}
        self._ctx = ctx = _ffi.new("vcpu_ctx *")
        self._table = _ffi.new("vcpu_blk[]", 1 << 16)
        ctx.blocks = self._table
        ctx.handle = id(self)
        _registry[id(self)] = self
        self._hook = _add_c_hook(uc, UC_HOOK_BLOCK, _lib.vcpu_block_addr(),
                                 ctypes.c_void_p(int(_ffi.cast("uintptr_t", ctx))))

    def _block_ninsns(self, addr, size):
        from hv.machine.disasm import _cs
        n = self._blocks.get((addr, size))
        if n is None:
            n = self._blocks[(addr, size)] = sum(
                1 for _ in _cs(self._bits).disasm_lite(self._read(addr, size), addr)) or 1
        return n

    @property
    def instructions(self):
        return self._ctx.insns

    def close(self):
        _registry.pop(id(self), None)
