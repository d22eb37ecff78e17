"""The VMM's end of the PSP mailbox: `PspClient` (client.py: one typed method
per PSP command, any arguments, a Reply and never an exception on refusal)
over a transport: in-process (inprocess.py: the firmware object in this
process) or a child process (process.py: shared memfd, mailbox page, eventfd
doorbells, liveness), and the ring of batched commands both share (ring.py).

Imports psp_firmware (its command encoding and, in-process, the firmware
itself) and hv.errors; never hv.vmm or anything above it.
"""
