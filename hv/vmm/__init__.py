"""The VMM: `Vmm` (vmm.py: platform set-up, guests, the NPF path that turns a
walk miss into an UPDATE_NPT), `Vm` (vm.py: one guest and the VMM's books of
what is mapped for it), host memory (hostmem.py: one mmap,
anonymous or a memfd/file, that the PSP shares; under the isolated design
the PSP's table frames are mapped read-only over part of it), the HPA
allocator (alloc.py) and who writes a guest's NPT under each protection
design (tables.py: the PSP under digest and isolated, the VMM under rmp and
none).

Imports nptcore, psp_firmware's public constants and hv.psp_link (its end of
the mailbox); never hv.machine, hv.trace, hv.cli or the tools.
"""
