"""Transports between the VMM and the PSP.

A transport has `call(cmd, buf) -> (status, out_bytes)`,
`call_batch([(cmd, buf), ...]) -> [(status, out_bytes), ...]` (ring mode:
many commands, typically UPDATE_NPT, answered in one wake-up, each with its
own status) and `close()`. The in-process transport calls the firmware's mailbox directly;
`hv.psp_process` (a child process behind a shared-memory mailbox) has the
same shape, so callers do not change when the PSP moves out of process.
"""


class InProcessTransport:
    name = "inprocess"

    def __init__(self, psp):
        self._mailbox = psp.mailbox    # the only thing of the PSP the VMM holds

    def call(self, cmd, buf):
        return self._mailbox(int(cmd), bytes(buf))

    def call_batch(self, items):
        mailbox = self._mailbox
        return [mailbox(int(cmd), bytes(buf)) for cmd, buf in items]

    def close(self):
        pass
