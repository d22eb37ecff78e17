"""Transports between the VMM and the PSP.

A transport has `call(cmd, buf) -> (status, out_bytes)`,
`call_batch([(cmd, buf), ...]) -> [(status, out_bytes), ...]` (ring mode:
many commands, typically UPDATE_NPT, answered in one wake-up, each with its
own status) and `close()`. The in-process transport's `call` calls the
firmware's mailbox directly; its `call_batch` packs each chunk of up to
RING_ENTRIES commands into a ring buffer of its own (`hv.ring`: the layout
of the mailbox's ring) and hands it to the firmware's `run_ring`, which
answers it in place as one batch. That is the process transport's ring, so
a batch gets the same answers through either, and the same as `call` item
by item (an entry whose buffer is longer than the ring's in area is
answered as the mailbox answers that length). `hv.psp_process` (a child process behind a
shared-memory mailbox) has the same shape, so callers do not change when
the PSP moves out of process.
"""
import mmap
import os
import threading

from hv.psp_link.ring import RING_BYTES, Ring


class InProcessTransport:
    name = "inprocess"

    def __init__(self, psp):
        # the only things of the PSP the VMM holds: its entry points
        self._mailbox = psp.mailbox
        self._run_ring = psp.run_ring
        # for a C caller on the vCPU's thread: psp_shared_update's address and
        # context (Psp.share_update_entry; None without the C core)
        self.share_update_entry = getattr(psp, "share_update_entry", lambda: None)
        # and what the VMM may map read-only of its memory (isolated: the
        # table frames; rmp: the RMP), as the PSP process hands it over
        self._regions = {name: (os.dup(fd), size, hpa)
                         for name, (fd, size, hpa) in getattr(psp, "shared_regions", dict)().items()}
        # the batch ring: a private buffer, allocated once (an anonymous
        # mapping: its slices are bytes, as the shared mailbox's are)
        self._ring_view = memoryview(mmap.mmap(-1, RING_BYTES))
        ring = self._ring = Ring(self._ring_view.obj, 0)
        # its hot methods, bound once (no lookups per call_batch)
        self._ring_chunks, self._ring_results = ring.chunks, ring.results
        self._lock = threading.Lock()       # one batch at a time in the ring buffer
        self.last_fw_ns = 0                 # firmware ns of the last call_batch (all chunks)

    def call(self, cmd, buf):
        # the firmware gets a plain int and immutable bytes (copied only when
        # they are something else: an IntEnum, a bytearray, a memoryview)
        if type(cmd) is not int:
            cmd = int(cmd)
        if type(buf) is not bytes:
            buf = bytes(buf)
        return self._mailbox(cmd, buf)

    def call_batch(self, items):
        """Ring mode, as ProcessTransport.call_batch: every chunk is packed
        before the first runs (a bad item raises before any command runs),
        each chunk is answered by one run_ring, and read back by Ring.results."""
        items = items if type(items) is list else list(items)
        if not items:
            return []
        res = []
        with self._lock:
            fw = 0
            for k in self._ring_chunks(items):
                fw += self._run_ring(self._ring_view, k)
                res.extend(self._ring_results(k))
            self.last_fw_ns = fw
        return res

    def shared_regions(self):
        """{name: (fd, size, hpa)}: the PSP memory the VMM may map read-only;
        the caller owns the fds (given once)."""
        out, self._regions = self._regions, {}
        return out

    def close(self):
        for fd, _size, _hpa in self._regions.values():
            os.close(fd)
        self._regions = {}
