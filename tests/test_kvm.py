"""The minimal /dev/kvm client (hv/machine/kvm.py): skipped where KVM is not usable."""
import pytest

from hv.machine import kvm

pytestmark = pytest.mark.skipif(not kvm.available(), reason="/dev/kvm absent or not usable")


def test_touch_guest_faults_every_page():
    r = kvm.bench_faults(npages=256)
    assert r["npages"] == 256
    assert r["fault_us"] > 0 and r["touch_us"] > 0


def test_guest_writes_land_in_the_memslot():
    with kvm.Kvm() as k:
        code = k.add_memory(0, kvm.CODE_SLOT_SIZE)
        big = k.add_memory(kvm.BIG_GPA, 16 * kvm.PAGE)
        prog = kvm.touch_code(kvm.BIG_GPA + 5, 16)
        code[kvm.CODE_GPA:kvm.CODE_GPA + len(prog)] = prog
        k.create_vcpu()
        k.set_regs(kvm.CODE_GPA, rax=0x5A)
        reason, port = k.run()
        assert (reason, port) == (kvm.KVM_EXIT_IO, kvm.PORT)
        assert [big[i * kvm.PAGE + 5] for i in range(16)] == [0x5A] * 16
        assert big[0] == 0 and big[6] == 0
        assert k.run()[0] == kvm.KVM_EXIT_HLT


def test_exit_loop():
    r = kvm.bench_exits(nexits=200)
    assert r["nexits"] == 200 and r["exit_us"] > 0


def test_unusable_kvm_returns_none(monkeypatch):
    def boom(*a, **k):
        raise OSError(2, "No such file or directory")
    monkeypatch.setattr(kvm.os, "open", boom)
    assert kvm.bench_faults(16) is None
    assert kvm.bench_exits(16) is None
    assert kvm.available() is False
