"""The Unicorn vCPU's NPF fast path, Python's half: the C fill hook
(csrc/vcpu.c fast_npf) resolves the common NPF itself, without a call into
Python, where the VMM's policy says it is that case (Vmm.npf_fast_entry):
fault-around 1, 4 KiB pages, the PSP in the VMM's process (under digest with
its C core), nothing recorded or logged. It maps each fault with the next
frame the VMM's allocator would have given: under digest through the PSP's
own UPDATE_NPT entry with the firmware's lock held, under none by writing
the leaf itself into an existing leaf table (npt_install, as VmmWrites
does); every other NPF goes to Python as before. After each
emu_start (and before any NPF Python handles) the VMM's books are brought
up to date in order (Vmm.npfs_resolved), so what the VMM, the PSP and the
reports see is what the Python path would have made of the same NPFs; the
suite boots the guests both ways and compares.

A mixin of UnicornVcpu: it uses `_ctx` (the C hook's context), `vmm`, `vm`,
`hook`, `record` and `npf_log`.
"""
import logging
from array import array

try:
    from hv._vcpu_c import ffi as _ffi
except ImportError:          # pragma: no cover - C module not built
    _ffi = None

from hv.machine.npf_log import WORDS

_npflog = logging.getLogger("hv.npf")
_INFO = logging.INFO


class FastNpf:
    def _arm_fast(self):
        """Let the C fill hook resolve the common NPF itself, where the VMM's
        policy says that is the case (Vmm.npf_fast_entry): hand it the next
        frames the VMM's allocator would give, in order. Nothing is recorded
        or logged on that path, so it is off with --record and -v."""
        ctx = self._ctx
        if ctx is None:
            return
        ctx.fast_on = 0
        if self.hook != "c" or self.record is not None or _npflog.isEnabledFor(_INFO):
            return
        entry = self.vmm.npf_fast_entry(self.vm)
        if entry is None:
            return
        frames = self.vmm.alloc.alloc_each(self._fast_batch)
        if not frames:
            return
        if getattr(self, "_fast_arr", None) is None or len(self._fast_arr) < len(frames):
            self._fast_arr = _ffi.new("uint64_t[]", max(len(frames), self._fast_batch))
            self._fast_log = _ffi.new("uint64_t[]", WORDS * len(self._fast_arr))
        _ffi.memmove(self._fast_arr, array("Q", frames), 8 * len(frames))   # (a slice
        # assignment from the list costs ~25 ns a frame; this ~5)
        self._fast_frames = frames
        if entry[0] == "vmm":            # none: the vCPU writes the leaf (npt_install)
            ctx.fast_kind, ctx.fast_leaf_flags = 1, entry[1]
        else:                            # digest: the PSP's UPDATE_NPT entry
            _, fn, pctx, busy = entry
            ctx.fast_kind = 0
            ctx.psp_update = _ffi.cast("void *", fn)
            ctx.psp_ctx = _ffi.cast("void *", pctx)
            ctx.psp_busy = _ffi.cast("int32_t *", busy)
        ctx.fast_handle = self.vm.handle
        ctx.fast_ram = self.vm.ram_size
        ctx.frames = self._fast_arr
        ctx.nframes, ctx.next_frame = len(frames), 0
        ctx.log = self._fast_log
        ctx.log_cap, ctx.log_n = len(frames), 0
        ctx.fast_on = 1

    def _disarm_fast(self):
        """Bring the VMM's books up to date with what the fast path did (in
        order, before anything Python does next) and give back the frames it
        did not use."""
        ctx = self._ctx
        if ctx is None or not ctx.fast_on:
            return
        ctx.fast_on = 0
        n, used = ctx.log_n, ctx.next_frame
        frames, self._fast_frames = self._fast_frames, []
        if n:
            # the i-th NPF logged took frames[i] (one frame per NPF, in order)
            words = array("Q")
            words.frombytes(_ffi.buffer(self._fast_log, 8 * WORDS * n))
            self.npf_log.extend_words(words)
            self.vmm.npfs_resolved(self.vm, words[0::WORDS], frames[:n])
        if used < len(frames):
            self.vmm.alloc.free_each(frames[used:])
        elif frames and self._fast_batch < 1024:
            self._fast_batch *= 2         # used them all: hand over more next time
        ctx.log_n = ctx.next_frame = ctx.nframes = 0
