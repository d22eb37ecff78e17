"""Platform commands: NOP, PLATFORM_INIT, PLATFORM_STATUS, POOL_ADD."""
import logging
import mmap


from .. import core as _core
from ..commands import Cmd, encode_out
from ..frames import F, FrameTable
from ..integrity import PAGE
from ..status import Status
from ..guest import PLATFORM_INIT, PLATFORM_UNINIT, _Refuse

log = logging.getLogger("psp")


class PlatformCommands:
    """Handlers of the platform family (mixed into Psp)."""

    def cmd_nop(self):
        return Status.SUCCESS, b""

    def cmd_platform_init(self, host_size, fw_base, fw_size):
        if self._platform != PLATFORM_UNINIT:
            raise _Refuse(Status.INVALID_PLATFORM_STATE)
        if host_size == 0 or host_size % PAGE or host_size > len(self._mem):
            raise _Refuse(Status.INVALID_PARAM)
        if fw_base % PAGE or fw_size % PAGE:
            raise _Refuse(Status.MISALIGNED)
        if fw_base + fw_size > host_size:
            raise _Refuse(Status.OUT_OF_RANGE)
        # ---- all checks passed: commit ----
        self._frames = FrameTable(host_size, fw_base, fw_size)
        nframes = host_size // PAGE
        # private: a shared anonymous mapping costs memory for pages merely read
        self._dirty_mm = mmap.mmap(-1, max(1, nframes),
                                   flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._dirty = memoryview(self._dirty_mm)
        if self.fast:
            self._make_ctx(nframes)
        self._platform = PLATFORM_INIT
        return Status.SUCCESS, b""

    def _make_ctx(self, nframes):
        """The C fast path's struct psp_ctx over the PSP's per-frame arrays."""
        ffi = _core.ffi
        ft = self._frames
        self._ptabs = _core.PageTables(nframes)
        keep = [ffi.from_buffer(ft.state_buf), ffi.from_buffer(ft.owner_buf),
                ffi.from_buffer(ft.gpa_buf), ffi.from_buffer(self._dirty_mm)]
        ctx = ffi.new("struct psp_ctx *")
        ctx.mem = self._memc
        ctx.host_size = ft.host_size
        ctx.fw_lo, ctx.fw_hi = ft.fw_lo, ft.fw_hi
        ctx.fstate, ctx.fowner, ctx.fgpa, ctx.dirty = keep
        ctx.shadow_of = self._ptabs.c_shadow_of
        ctx.lines_of = self._ptabs.c_lines_of
        ctx.scrub_advice = self._scrub_advice
        ctx.hole_kind, ctx.hole_fd = self._hole_kind, self._hole_fd
        self._ptabs.attach_log(ctx)
        self._ctx_keep = keep
        self._ctx = ctx

    def cmd_platform_status(self):
        counts = self._frames.counts() if self._frames else {}
        frames = {f"frames_{k.lower()}": v for k, v in counts.items() if k != "POOL"}
        return Status.SUCCESS, encode_out(
            Cmd.PLATFORM_STATUS, state=self._platform, guests=len(self._guests),
            pool_free=len(self._pool), host_size=self._frames.host_size if self._frames else 0,
            commands=self._commands + (self._ctx.shared_commands if self._ctx is not None else 0),
            **frames)

    def cmd_pool_add(self, hpa, npages):
        self._need_platform()
        self._check_npages(npages)
        self._check_hpa_range(hpa, npages * PAGE)
        self._check(self._frames.check_all_in(hpa, npages * PAGE, F.HV))
        # ---- all checks passed: commit ----
        self._scrub(hpa, npages * PAGE)
        self._frames.set_range(hpa, npages * PAGE, F.POOL)
        self._pool.extend(hpa + i * PAGE for i in reversed(range(npages)))
        return Status.SUCCESS, b""
