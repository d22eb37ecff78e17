"""Binary layout of the shared-memory mailbox between the VMM and the PSP process.

Modelled on the SEV/CSV mailbox: a command word, a status word with a done
bit, a command buffer and an output buffer, plus a CSV-style ring of
command entries the PSP answers in one wake-up. It is the only module of
`psp_firmware` the VMM side imports (constants and offsets only: no state).

The region is its own memfd (NOT inside guest host memory), mapped by both
processes. All fields are little-endian. Cache line 0 is written only by the
VMM, cache line 1 only by the PSP, so that each side spins on a line the
other side writes once per command.

    offset size  writer  field
    ------ ----  ------  -----------------------------------------------------
    0      4     VMM     magic 'HVMB'
    4      4     VMM     version
    8      4     VMM     command word: the command id (u32)
    12     4     VMM     in_len: length of the command buffer (may lie)
    16     4     VMM     op: OP_CMD, OP_RING or OP_SHUTDOWN
    20     4     VMM     ring_count: entries queued for OP_RING
    24     8     VMM     req_seq: written LAST; a new value = a new request
    32     4     VMM     vmm_sleeping: 1 while the VMM blocks on the doorbell
    64     4     PSP     status word: status (bits 0..15) | DONE (bit 31)
    68     4     PSP     out_len
    72     8     PSP     done_seq: written LAST; == req_seq when answered
    80     4     PSP     ring_done: ring entries answered so far (progress)
    84     4     PSP     psp_state: STATE_STARTING / STATE_READY / STATE_EXITING
    88     4     PSP     psp_pid
    92     4     PSP     psp_sleeping: 1 while the PSP blocks on the doorbell
    96     8     PSP     commands: commands executed (single + ring entries)
    104    8     PSP     fw_ns: ns spent in firmware handlers for the last request
                         (so that a benchmark can tell transport from firmware time)
    256    4096  VMM     command buffer (in_len bytes of it are used)
    4352   4096  PSP     output buffer (out_len bytes)
    12288  256*N both    ring entries, RING_ENTRIES of RING_ENTRY_SIZE bytes:
                           +0 cmd u32, +4 in_len u32 (VMM)
                           +8 status u32 (status | DONE), +12 out_len u32 (PSP)
                           +16 in buf (112 bytes, VMM), +128 out buf (128 bytes, PSP)

Protocol: the VMM fills the command (or ring entries), then writes req_seq;
if psp_sleeping it rings the request doorbell (an eventfd). The PSP copies
the buffer out of shared memory before it decodes it (the VMM may change it
concurrently), runs the command, writes the output and status word, then
done_seq; if vmm_sleeping it rings the response doorbell. Both sides spin on
the other's sequence word for a bounded time before they block on the
doorbell (as real drivers do), and block with a bounded slice so a doorbell
lost to store/load reordering costs at most one slice, never a hang.

Words the other side reads while they change (the two sequence words, the
sleeping flags, ring_done, commands, fw_ns) are accessed through `views(mm)`, a
native u32/u64 memoryview: one aligned load or store each. `struct.pack_into`
must not be used for them: it zeroes the field before it writes it, so a
spinning reader on the other CPU sees a transient 0 (a phantom request).

Every field the VMM writes is untrusted: an in_len beyond the buffer, a
ring_count beyond the ring or an unknown op only ever produce status codes.
"""
import struct

MAGIC = 0x424D5648          # b"HVMB" little-endian
VERSION = 1

# VMM-written line
OFF_MAGIC = 0
OFF_VERSION = 4
OFF_CMD = 8
OFF_IN_LEN = 12
OFF_OP = 16
OFF_RING_COUNT = 20
OFF_REQ_SEQ = 24
OFF_VMM_SLEEPING = 32
# PSP-written line
OFF_STATUS = 64
OFF_OUT_LEN = 68
OFF_DONE_SEQ = 72
OFF_RING_DONE = 80
OFF_PSP_STATE = 84
OFF_PSP_PID = 88
OFF_PSP_SLEEPING = 92
OFF_COMMANDS = 96
OFF_FW_NS = 104

CMD_BUF = 256
CMD_BUF_SIZE = 4096
OUT_BUF = CMD_BUF + CMD_BUF_SIZE
OUT_BUF_SIZE = 4096

RING_OFF = 12288
RING_ENTRY_SIZE = 256
RING_ENTRIES = 1024
RE_CMD = 0
RE_IN_LEN = 4
RE_STATUS = 8
RE_OUT_LEN = 12
RE_IN = 16
RE_IN_SIZE = 112
RE_OUT = 128
RE_OUT_SIZE = 128

REGION_SIZE = RING_OFF + RING_ENTRY_SIZE * RING_ENTRIES

DONE = 1 << 31
STATUS_MASK = 0xFFFF

OP_CMD = 1
OP_RING = 2
OP_SHUTDOWN = 3

STATE_STARTING = 0
STATE_READY = 1
STATE_EXITING = 2

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
# the request: command word, in_len, op, ring_count (one store, before req_seq)
REQ_HDR = struct.Struct("<IIII")        # at OFF_CMD
CMD_HDR = struct.Struct("<II")          # command word, in_len at OFF_CMD
OP_HDR = struct.Struct("<II")           # op, ring_count at OFF_OP
# status word + out_len (written together by the PSP before done_seq)
STATUS_HDR = struct.Struct("<II")       # at OFF_STATUS
ENTRY_HDR = struct.Struct("<II")        # cmd, in_len at entry + RE_CMD
ENTRY_ALL = struct.Struct("<IIII")      # cmd, in_len, status, out_len at entry + RE_CMD
ENTRY_RESULT = struct.Struct("<II")     # status, out_len at entry + RE_STATUS


# word indices for views(): u64 view
Q_REQ_SEQ = OFF_REQ_SEQ // 8
Q_DONE_SEQ = OFF_DONE_SEQ // 8
Q_COMMANDS = OFF_COMMANDS // 8
Q_FW_NS = OFF_FW_NS // 8
# u32 view
I_VMM_SLEEPING = OFF_VMM_SLEEPING // 4
I_PSP_SLEEPING = OFF_PSP_SLEEPING // 4
I_RING_DONE = OFF_RING_DONE // 4
I_PSP_STATE = OFF_PSP_STATE // 4
I_STATUS = OFF_STATUS // 4


def views(mm):
    """(u32 view, u64 view) of the header (first CMD_BUF bytes), for single-copy
    atomic loads/stores of the words both sides touch concurrently (x86-64: the
    native byte order is the layout's little-endian). Release them before
    closing the mapping."""
    head = memoryview(mm)[:CMD_BUF]
    return head.cast("I"), head.cast("Q")


def entry_off(i):
    return RING_OFF + i * RING_ENTRY_SIZE
