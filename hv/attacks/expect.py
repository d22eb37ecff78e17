"""What each scenario expects under each protection design, and why.

Every expectation below is derived from what the design checks
(docs/designs.md), not from running it:

    digest    the PSP validates every command it gets (the HPA: aligned, in
              host memory, not PSP memory, not a table page, not another
              guest's or already mapped; the GPA range) and a digest of the
              table catches any write to it: the next UPDATE_NPT whose walk
              reads the changed line, or the periodic check (CHECK_ALL)
    isolated  the PSP validates every command the same way; the VMM cannot
              write a table page or a control page at all: its store faults
    rmp       the PSP validates RMP_ASSIGN the same way (and refuses a second
              frame at a GPA); the CPU checks every translation's final
              frame against (this guest, this GPA, this page size); nothing
              checks NPT permission bits, nor which frames are NPT pages
    none      nothing checks anything: the VMM writes the table

A scenario states its expectation beside its code, as one of the names here
(or, where it is special, an `expect(...)` of its own with a comment).
"""
from hv.attacks.registry import DETECTED, NOT_FLAGGED, PREVENTED, REFUSED, UNDETECTED


def expect(digest, isolated, rmp, none):
    return {"digest": digest, "isolated": isolated, "rmp": rmp, "none": none}


# A write to the table (an entry, a table page, nCR3) that changes which frame
# a GPA reaches: the digest sees the changed entry; the store faults under
# isolated; under rmp the first access through it fails the RMP check (the
# frame is not this guest's at this GPA), with exposure 0; nothing under none.
REMAP_BY_WRITE = expect(DETECTED, PREVENTED, DETECTED, UNDETECTED)

# A write that only changes permission bits (W set, NX cleared): the RMP has
# no permission field (SEV-SNP leaves NPT permissions to the hypervisor), so
# the translation still passes its check.
PERMISSION_BY_WRITE = expect(DETECTED, PREVENTED, UNDETECTED, UNDETECTED)

# A crafted command with a bad HPA or GPA range (another guest's frame, PSP
# memory, misaligned, out of range, overlapping, overflowing, a frame back
# unscrubbed): the PSP refuses it under digest, isolated (UPDATE_NPT) and rmp
# (RMP_ASSIGN / RMP_UNASSIGN); under none the VMM just writes the entry.
BAD_COMMAND = expect(REFUSED, REFUSED, REFUSED, UNDETECTED)

# Concurrent commands mapping one frame twice: the PSP serializes and refuses
# the second (UPDATE_NPT, RMP_ASSIGN); under none nothing stops the VMM.
CONCURRENT_COMMANDS = BAD_COMMAND

# The VMM's own NPT page handed to the guest by a command: the PSP knows its
# table pages under digest and isolated; the RMP cannot tell the VMM's NPT
# pages from any other hypervisor page, so RMP_ASSIGN accepts one.
TABLE_PAGE_BY_COMMAND = expect(REFUSED, REFUSED, UNDETECTED, UNDETECTED)

# Table pages the VMM pre-filled with crafted entries: digest scrubs donated
# pool frames before use; under isolated the VMM has no frames to donate
# (POOL_ADD is not a command) so nothing it wrote becomes a table; under rmp
# and none the VMM builds its own tables, and a crafted entry is a remap by
# write (caught at the access under rmp).
PREFILLED_TABLES = expect(REFUSED, REFUSED, DETECTED, UNDETECTED)

# Writes racing the PSP between its check and its write: the digest is
# computed from the PSP's shadow, so the racing value is caught; the store
# faults under isolated; under rmp there is no PSP check-to-write window, and
# the written entry fails the RMP check at the access.
RACE_BY_WRITE = REMAP_BY_WRITE

# The hardware's Accessed/Dirty updates: not tampering anywhere (isolated
# writes entries with A/D already set; by-hand flips stand for the hardware's
# and are not made there).
BENIGN = expect(NOT_FLAGGED, NOT_FLAGGED, NOT_FLAGGED, NOT_FLAGGED)
