"""The guest machine: image loaders (loader.py: ELF64 toy guests, Multiboot v1),
the boot-time CPU state (boot_state.py), devices (devices.py: COM1, exit port,
VGA text buffer), disassembly for reports (disasm.py), `Boot` (boot.py: a VM
booted on a vCPU, its exit loop and report), and one module per accelerator:
the emulated CPU (unicorn_vcpu.py, with the IDT exception delivery of
exceptions.py) and KVM (kvm_vcpu.py: the vCPU; kvm_memory.py: the memslot
filled from the PSP's table; kvm.py: the /dev/kvm client and its
yardsticks). guest_memory.py and stop.py are what every vCPU shares: guest
virtual/physical memory as the VMM sees it, through the PSP's table, and
why a run stopped.

Imports hv.vmm (the NPF path), hv.trace (to record NPFs), nptcore; never
hv.cli or the tools (attacks, bench).
"""
