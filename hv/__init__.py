"""hv: a hypervisor prototype whose nested page tables are installed by a PSP.

Public API (see README.md, "Python API"):

    from hv import Vmm
    vmm = Vmm(host_mem=1 << 30, backend="c")        # host memory + PSP + driver
    vm = vmm.create_vm(fault_around=1)
    hpa = vmm.touch(vm, 0x1234, access=1)           # walk, NPF -> UPDATE_NPT
    vmm.mem.write_u64(vmm.npt_root(vm), 0)          # the VMM can write anything...
    vmm.psp.update_npt(vm.handle, gpa, hpa)         # ...and send any command
"""
from psp_firmware import Cmd, Status, status_name

from .errors import BadInput, TraceError
from .hostmem import HostMemory, parse_size
from .psp_client import PspClient, Reply
from .vmm import Vm, Vmm, VmStopped

__all__ = ["Vmm", "Vm", "VmStopped", "HostMemory", "PspClient", "Reply", "Cmd", "Status",
           "status_name", "BadInput", "TraceError", "parse_size", "load_trace", "replay"]


def load_trace(path, fmt=None, **kw):
    """hv.trace.load_trace (keywords: backend, max_bytes)."""
    from .trace import load_trace as _lt
    return _lt(path, fmt, **kw)


def replay(vmm, vm, trace, progress=None):
    from .replay import replay as _r
    return _r(vmm, vm, trace, progress)
