"""The PSP command handlers, grouped by command family as TF-RMM groups its RMI
commands: platform, launch, NPT (update/unmap/reclaim), checks. Each family is a
mixin class of `Psp`; every handler is named after its command (`cmd_update_npt`)
and validates every argument before its commit point. They import only
psp_firmware and nptcore."""
