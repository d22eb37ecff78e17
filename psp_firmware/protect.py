"""What the protection designs share (DESIGNS, each design's command set,
the integrity object of a design without a digest); docs and the factory
are in psp_firmware/designs.py."""
from .commands import Cmd

DESIGNS = ("digest", "isolated", "rmp", "none")
DEFAULT_DESIGN = "digest"

_COMMON = frozenset({Cmd.PLATFORM_INIT, Cmd.PLATFORM_STATUS, Cmd.LAUNCH_START,
                     Cmd.LAUNCH_UPDATE_DATA, Cmd.LAUNCH_FINISH, Cmd.VERIFY, Cmd.GUEST_STATUS,
                     Cmd.DECOMMISSION, Cmd.CHECK_ALL, Cmd.NOP})

# the commands each design's firmware answers (the others: INVALID_COMMAND)
COMMANDS = {
    "digest": _COMMON | {Cmd.POOL_ADD, Cmd.SET_PRIVATE_MEMORY, Cmd.UPDATE_NPT, Cmd.UNMAP,
                         Cmd.RECLAIM},
    # the table frames are the PSP's own (no POOL_ADD)
    "isolated": _COMMON | {Cmd.SET_PRIVATE_MEMORY, Cmd.UPDATE_NPT, Cmd.UNMAP, Cmd.RECLAIM},
    # the VMM writes the table: no UPDATE_NPT / UNMAP / POOL_ADD; RMPUPDATE
    "rmp": _COMMON | {Cmd.SET_PRIVATE_MEMORY, Cmd.RECLAIM, Cmd.RMP_ASSIGN, Cmd.RMP_UNASSIGN},
    "none": _COMMON,
}


class NoIntegrity:
    """The integrity object of a design without a digest: nothing to check,
    nothing to keep. (isolated: only the PSP can write the table; rmp and
    none: the PSP does not hold the table at all.)"""
    mode = "none"
    mode_id = 2
    digest = bytes(32)

    def __init__(self, shadow, canon_page, read_u64, vmsa, **_kw):
        self.shadow = shadow

    def verify_all(self):
        return None

    def check_before_update(self, gpa=None, level=None, npages=1):
        return None

    def after_update(self, modified):
        pass


def check_design(protect):
    if protect not in DESIGNS:
        raise ValueError(f"unknown protection design {protect!r} (have {', '.join(DESIGNS)})")
    return protect
