"""SEV-style status codes returned by every PSP command.

0 is success; every refusal cause has a code of its own so that a caller (and
a test) can tell *why* the firmware said no.
"""
from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01   # platform not initialised / already initialised
    INVALID_GUEST_STATE = 0x02      # command not allowed in the guest's current state
    INVALID_COMMAND = 0x03          # unknown command id
    INVALID_LENGTH = 0x04           # command buffer has the wrong size
    INVALID_PARAM = 0x05            # a field has a value outside its domain
    INVALID_HANDLE = 0x06           # no such guest
    MISALIGNED = 0x07               # address not aligned to the page level
    OUT_OF_RANGE = 0x08             # HPA outside host memory, GPA outside the GPA space
    FIRMWARE_PAGE = 0x09            # HPA is PSP/firmware memory
    TABLE_PAGE = 0x0A               # HPA is an NPT page (or a free table-pool page)
    PAGE_OWNED = 0x0B               # HPA already mapped into a guest (aliasing)
    BAD_OWNER = 0x0C                # HPA is private memory of another guest
    RANGE_OVERFLOW = 0x0D           # base + length wraps or exceeds the address space
    RANGE_OVERLAP = 0x0E            # range overlaps itself or a region of another kind
    GPA_MAPPED = 0x0F               # GPA already has a mapping
    GPA_NOT_MAPPED = 0x10           # unmap of a GPA that has no mapping
    BAD_PAGE_STATE = 0x11           # frame is not in a state the command accepts
    RESOURCE_EXHAUSTED = 0x12       # table pool is empty: donate pages with POOL_ADD
    INTEGRITY_FAILURE = 0x13        # the NPT digest did not match: tamper detected
    GUEST_STOPPED = 0x14            # guest was stopped after a tamper; it is fatal
    INTERNAL_ERROR = 0x15           # firmware bug (never expected); state unchanged
    PSP_DEAD = 0x16                 # transport only: the PSP process is gone / timed out
    RMP_FAULT = 0x17                # CPU only (the rmp design): a translation failed the RMP
                                    # check, a nested fault the guest cannot get past


def status_name(code: int) -> str:
    try:
        return Status(code).name
    except ValueError:
        return f"UNKNOWN_0x{code:x}"
