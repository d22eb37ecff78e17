"""What every vCPU's run() returns (StopInfo), and the words for access kinds."""
from __future__ import annotations

from dataclasses import dataclass, field

from nptcore.bits import ACC_R, ACC_W, ACC_X

from hv.errors import VmStopped

ACCESS_WORDS = {ACC_R: "read", ACC_W: "write", ACC_X: "instruction fetch"}


@dataclass
class StopInfo:
    """Why vcpu.run() returned.

    kind: "exit_port" (exit_code), "hlt", "limit" (instruction budget or
    time slice used), "time_limit" (Boot's wall-time budget), "vm_stopped"
    (the VMM could not resolve an NPF: ``stopped`` is the VmStopped,
    ``fault`` the NPF), "triple_fault", "error"."""
    kind: str
    exit_code: int | None = None
    detail: str = ""
    stopped: VmStopped | None = None
    fault: dict = field(default_factory=dict)
