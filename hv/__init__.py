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

from hv.errors import BadInput, TraceError, VmStopped
from hv.vmm.hostmem import HostMemory, parse_size
from hv.psp_link.client import PspClient, Reply
from hv.vmm.vmm import Vm, Vmm

__all__ = ["Vmm", "Vm", "VmStopped", "HostMemory", "PspClient", "Reply", "Cmd", "Status",
           "status_name", "BadInput", "TraceError", "parse_size", "load_trace", "replay"]


def load_trace(path, fmt=None, **kw):
    """hv.trace.load_trace (keywords: backend, max_bytes)."""
    from hv.trace import load_trace as _lt
    return _lt(path, fmt, **kw)


def replay(vmm, vm, trace, progress=None):
    from hv.trace.replay import replay as _r
    return _r(vmm, vm, trace, progress)
