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
        # the firmware gets a plain int and immutable bytes (copied only when
        # they are something else: an IntEnum, a bytearray, a memoryview)
        if type(cmd) is not int:
            cmd = int(cmd)
        if type(buf) is not bytes:
            buf = bytes(buf)
        return self._mailbox(cmd, buf)

    def call_batch(self, items):
        mailbox = self._mailbox
        return [mailbox(cmd if type(cmd) is int else int(cmd),
                        buf if type(buf) is bytes else bytes(buf)) for cmd, buf in items]

    def close(self):
        pass
