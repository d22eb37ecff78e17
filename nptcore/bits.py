"""Constants and result types of the NPT engine (docs/ARCHITECTURE.md).

Shared by both backends; keep the numeric values in sync with csrc/npt.h.
"""
from collections import namedtuple

# --- NPT entry bits (x86-64 long-mode format, as AMD NPT) -------------------
P = 1 << 0            # present
W = 1 << 1            # writable
U = 1 << 2            # user
A = 1 << 5            # accessed
D = 1 << 6            # dirty
PS = 1 << 7           # page size (2 MiB at level 2, 1 GiB at level 3)
NX = 1 << 63          # no-execute
ADDR_MASK = 0x000F_FFFF_FFFF_F000
AD_MASK = A | D
GPA_LIMIT = 1 << 48
HPA_LIMIT = 1 << 52

# bits 52..62 of a present NPT entry are reserved
RSVD_HI = 0x7FF0_0000_0000_0000
# low reserved bits of large leaves (bit 12 is PAT and allowed)
RSVD_2M = 0x0000_0000_001F_E000      # bits 13..20
RSVD_1G = 0x0000_0000_3FFF_E000      # bits 13..29
# entry written for a new intermediate table
TABLE_FLAGS = P | W | U
# bits a caller may put in leaf_flags for install(): the low 12 bits and NX
LEAF_FLAGS_ALLOWED = 0xFFF | NX

PAGE_SIZE = 4096
LEVEL_SIZE = {1: 1 << 12, 2: 1 << 21, 3: 1 << 30}
SIZE_4K = 1 << 12
SIZE_2M = 1 << 21
SIZE_1G = 1 << 30


def index(gpa, level):
    """Index of `gpa` in a table at `level` (4 = PML4 .. 1 = PT)."""
    return (gpa >> (12 + 9 * (level - 1))) & 511


# --- access kinds ------------------------------------------------------------
ACC_R = 0
ACC_W = 1
ACC_X = 2

# --- NPF error code (AMD EXITINFO1) -------------------------------------------
PF_P = 1
PF_W = 2
PF_U = 4
PF_RSV = 8
PF_ID = 16
PF_FINAL = 1 << 32
PF_WALK = 1 << 33
PF_RMP = 1 << 31      # the translation failed the RMP check (the rmp design)
PF_SIZEM = 1 << 35    # ... and only the page size differed

# --- RMP entries (the rmp protection design; nptcore/rmp.py) ------------------
RMP_ASSIGNED = 1
RMP_SIZE_MASK = 0x6                          # bits 1..2: leaf level (1 4K, 2 2M)
RMP_GPA_MASK = 0x0000_FFFF_FFFF_F000         # bits 12..47: the frame's GPA
RMP_ASID_SHIFT = 48                          # bits 48..63: the guest (ASID)
RMP_ASID_MAX = 0xFFFF

# --- install / clear return codes --------------------------------------------
INST_OK = 0
INST_MAPPED = 1
INST_NEED_TABLES = 2
INST_BAD_ARG = 3
CLR_NOT_MAPPED = 4

# --- guest paging modes for walk2d (value = number of guest levels) ----------
MODE_32 = 2       # 2-level 32-bit paging, PSE 4 MiB pages (CR4.PSE=1)
MODE_PAE = 3      # 3-level PAE paging
MODE_LONG4 = 4    # 4-level long-mode paging
MODES = (MODE_32, MODE_PAE, MODE_LONG4)

# --- walk2d result kinds -------------------------------------------------------
K_OK = 0
K_NPF = 1
K_GUEST_PF = 2

# --- guest paging (walk2d) details --------------------------------------------
# The guest's MAXPHYADDR is 48: guest entry bits 48..51 are reserved.
GUEST_ADDR_MASK = 0x0000_FFFF_FFFF_F000
G_RSVD_LONG = 0x000F_0000_0000_0000          # long mode: bits 48..51
G_RSVD_PAE = 0x7FFF_0000_0000_0000           # PAE PDE/PTE: bits 48..62
G_RSVD_PDPTE = 0xFFFF_0000_0000_01E6         # PAE PDPTE: 1,2,5..8, 48..63
G_RSVD_4M = 1 << 21                          # 32-bit 4 MiB PDE: bit 21

WalkResult = namedtuple("WalkResult", "ok hpa level entry errcode")
Walk2DResult = namedtuple("Walk2DResult", "ok hpa gpa kind errcode level")

__all__ = [n for n in dir() if not n.startswith("_") and n != "namedtuple"]
