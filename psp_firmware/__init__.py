"""Trusted side: the secure processor's firmware. Never imports `hv`.

The protection designs (docs/designs.md): digest is psp.py's Psp (handlers/);
isolated.py, rmp.py and none.py are the others' firmware, built by
designs.make_psp; protect.py holds what they share; sealed.py makes the
sealed memfds the VMM may only read."""
from .commands import ATTR_RWX, ATTR_W, ATTR_X, LEVEL_2M, LEVEL_4K, Cmd, decode, encode
from .guest import DEFAULT_INTEGRITY, INTEGRITY_MODES, register_integrity_mode
from .psp import Psp
from .designs import DESIGNS, make_psp
from .status import Status, status_name

__all__ = ["Psp", "Cmd", "Status", "status_name", "encode", "decode", "ATTR_RWX", "ATTR_W",
           "ATTR_X", "LEVEL_4K", "LEVEL_2M", "INTEGRITY_MODES", "DEFAULT_INTEGRITY",
           "register_integrity_mode", "DESIGNS", "make_psp"]
