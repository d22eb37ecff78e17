"""hv: a hypervisor prototype whose nested page tables are installed by a PSP.

Public API (see README.md, "Python API"):

    from hv import Vmm
    vmm = Vmm(host_mem=1 << 30, backend="c")        # host memory + PSP + driver
    vm = vmm.create_vm(fault_around=1)
    hpa = vmm.touch(vm, 0x1234, access=1)           # walk, NPF -> UPDATE_NPT
    vmm.mem.write_u64(vmm.npt_root(vm), 0)          # the VMM can write anything...
    vmm.psp.update_npt(vm.handle, gpa, hpa)         # ...and send any command
"""
import importlib

# the public names, imported on first use (PEP 562): `import hv` (and the `hv`
# command's own start, which a Ctrl-C may interrupt) costs nothing until
# something is used
_LAZY = {
    "Cmd": "psp_firmware", "Status": "psp_firmware", "status_name": "psp_firmware",
    "BadInput": "hv.errors", "TraceError": "hv.errors", "VmStopped": "hv.errors",
    "HostMemory": "hv.vmm.hostmem", "parse_size": "hv.vmm.hostmem",
    "PspClient": "hv.psp_link.client", "Reply": "hv.psp_link.client",
    "Vm": "hv.vmm.vmm", "Vmm": "hv.vmm.vmm",
}

__version__ = "0.1.0"       # pyproject.toml [project] version

__all__ = ["Vmm", "Vm", "VmStopped", "HostMemory", "PspClient", "Reply", "Cmd", "Status",
           "status_name", "BadInput", "TraceError", "parse_size", "load_trace", "replay",
           "__version__"]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'hv' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def load_trace(path, fmt=None, **kw):
    """hv.trace.load_trace (keywords: backend, max_bytes)."""
    from hv.trace import load_trace as _lt
    return _lt(path, fmt, **kw)


def replay(vmm, vm, trace, progress=None):
    from hv.trace.replay import replay as _r
    return _r(vmm, vm, trace, progress)
