"""A VCPU's state is one record, Xen's vcpu_guest_context: taken from a VCPU
mid-run and loaded back, the guest goes on to the same result."""

from __future__ import annotations

import ctypes

from hypervisor.cpu.context import CONTEXT_SIZE, get_context, set_context
from hypervisor.public.arch_x86 import VGCF_online, vcpu_guest_context
from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config
from tests.reference import hashchain_line


def test_context_record_is_xens_size():
    assert CONTEXT_SIZE == ctypes.sizeof(vcpu_guest_context) == 5168


def test_context_round_trip_mid_run(booted):
    hv, dom = booted(make_config("run=hashchain:6:4"))
    hv.run(until_ns=1_000_000)  # stop in the middle of hashchain
    v = dom.vcpus[0]
    ctx = get_context(v)
    raw = bytes(ctx)
    assert ctx.flags & VGCF_online
    assert ctx.ctrlreg[3] == v.guest_table << 12
    # scribble over the registers, then load the record back
    v.write_regs(rax=1, rbx=2, rcx=3, rdx=4, rsi=5, rdi=6, r8=7, r12=8, r13=9, r14=10, r15=11)
    assert set_context(v, raw) == 0
    assert bytes(get_context(v)) == raw
    r = run_domain(hv, dom)
    assert r.reason == "poweroff"
    assert hashchain_line(6, 4).encode() in r.console


def test_the_register_file_is_found_when_other_engines_hold_the_same_markers():
    """Regression: gpr_file used fixed markers and took the first match, so a
    stale copy in another engine (say, a VCPU of a domain destroyed earlier in
    the process) made it fail: 'cannot locate unicorn's register file'."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

    from hypervisor.cpu.ucfast import _GPR_MARKS, _GPR_UC_IDS, gpr_file
    decoys = []
    for _ in range(8):
        d = Uc(UC_ARCH_X86, UC_MODE_64)
        for reg, mark in zip(_GPR_UC_IDS, _GPR_MARKS, strict=True):
            d.reg_write(reg, mark)
        decoys.append(d)
    for _ in range(4):
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        regs = gpr_file(uc, marks=_GPR_MARKS)
        assert regs is not None
        regs[3] = 0xABCD  # rbx
        from unicorn.x86_const import UC_X86_REG_RBX
        assert uc.reg_read(UC_X86_REG_RBX) == 0xABCD
        decoys.append(uc)
    for d in decoys[:8]:  # the decoys kept their values
        assert d.reg_read(_GPR_UC_IDS[0]) == _GPR_MARKS[0]


def test_the_register_file_is_found_when_its_mapping_is_split():
    """Regression: gpr_file searched each mapping on its own, but one heap is
    several mappings once part of it differs in flags (numpy madvises a big array
    in it MADV_HUGEPAGE). The X86CPU that uc->cpu points at then straddled two,
    env->regs in the one no pointer in uc_struct led into, and a full run with
    two xdist workers missed it. Split here with MADV_DONTDUMP, which only keeps
    the registers' page out of core dumps."""
    import ctypes
    import mmap

    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

    from hypervisor.cpu.ucfast import gpr_file
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    regs = gpr_file(uc)
    assert regs is not None
    at = ctypes.addressof(regs)
    lo = at & -mmap.PAGESIZE
    hi = (at + ctypes.sizeof(regs) + mmap.PAGESIZE - 1) & -mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_dontdump, madv_dodump = 16, 17
    assert libc.madvise(lo, hi - lo, madv_dontdump) == 0
    try:
        with open("/proc/self/maps") as maps:
            assert f"{lo:x}-{hi:x} " in maps.read()  # the registers' own mapping now
        again = gpr_file(uc)
    finally:
        libc.madvise(lo, hi - lo, madv_dodump)  # and the kernel joins it back
    assert again is not None and ctypes.addressof(again) == at


def test_the_register_file_is_found_in_a_mapping_bigger_than_the_scan_limit(monkeypatch):
    """Regression: a process that had restored a few images had a heap bigger
    than the 512 MiB gpr_file searched whole, so the mapping holding a new
    engine's registers was skipped: 'cannot locate unicorn's register file'.
    Mappings are searched about the pointers that lead into them, and whole if
    that finds nothing (searching only about the pointers missed the registers
    in long test runs)."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_REG_RCX

    from hypervisor.cpu import ucfast
    monkeypatch.setattr(ucfast, "_WINDOW", 64)  # no window holds the registers
    monkeypatch.setattr(ucfast, "_known_place", None)  # nor a place found before
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    regs = ucfast.gpr_file(uc)
    assert regs is not None
    regs[1] = 0x5151
    assert uc.reg_read(UC_X86_REG_RCX) == 0x5151


def test_the_register_file_is_looked_for_where_the_last_engine_had_it(monkeypatch):
    """The search of the mappings is made once a process: a new engine's
    registers are at the place the last one's were (the same pointer of
    uc_struct, the same distance past it), checked both ways; a place that
    fails its checks (here a made-up one) leads to the search."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_REG_RDX

    from hypervisor.cpu import ucfast
    assert ucfast.gpr_file(Uc(UC_ARCH_X86, UC_MODE_64)) is not None
    place = ucfast._known_place
    assert place is not None
    searched: list[int] = []
    search = ucfast._search
    monkeypatch.setattr(ucfast, "_search", lambda *a: searched.append(1) or search(*a))
    for known in (place, (place[0], place[1] + 4096)):
        monkeypatch.setattr(ucfast, "_known_place", known)
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        regs = ucfast.gpr_file(uc)
        assert regs is not None
        regs[2] = 0x7777
        assert uc.reg_read(UC_X86_REG_RDX) == 0x7777
    assert searched == [1] and ucfast._known_place == place


def test_a_vcpu_whose_register_file_is_not_found_still_runs(monkeypatch, booted):
    """Regression: a failed search for the register file (it happened, rarely, in
    long test runs) raised from Vcpu() and lost the domain being built; the
    VCPU now reaches its registers through the library calls instead."""
    from hypervisor.cpu import vcpu
    from hypervisor.cpu.ucfast import RegFileByCalls
    monkeypatch.setattr(vcpu, "gpr_file", lambda uc: None)
    hv, dom = booted(make_config("run=hashchain:4:4"))
    assert isinstance(dom.vcpus[0].gpr, RegFileByCalls)
    r = run_domain(hv, dom)
    assert r.reason == "poweroff" and hashchain_line(4, 4) in r.console.decode()


def test_a_mode_switch_swaps_the_gs_bases_and_the_record_keeps_each_mode_s(booted):
    """Xen's toggle_guest_mode swaps the kernel and user GS bases (swapgs), so
    guest user mode runs with gs_base_user; the context record names each base
    by its mode whichever mode the VCPU is in (arch_get_info_guest)."""
    from unicorn.x86_const import UC_X86_REG_GS_BASE, UC_X86_REG_MSR

    from hypervisor.public.arch_x86 import MSR_SHADOW_GS_BASE
    hv, dom = booted(make_config("run=hashchain:6:4"))
    hv.run(until_ns=1_000_000)
    v = dom.vcpus[0]
    kernel_gs, user_gs = 0x1000_0000, 0x2000_0000
    ctx = get_context(v)
    ctx.gs_base_kernel, ctx.gs_base_user = kernel_gs, user_gs
    assert set_context(v, bytes(ctx), take_refs=False) == 0
    mode = v.in_kernel
    v.toggle_guest_mode()
    active = v.uc.reg_read(UC_X86_REG_GS_BASE)
    assert active == (user_gs if mode else kernel_gs)
    assert v.uc.reg_read(UC_X86_REG_MSR, MSR_SHADOW_GS_BASE) == (kernel_gs if mode else user_gs)
    again = get_context(v)
    assert (again.gs_base_kernel, again.gs_base_user) == (kernel_gs, user_gs)
    v.toggle_guest_mode()
    assert v.uc.reg_read(UC_X86_REG_GS_BASE) == (kernel_gs if mode else user_gs)
