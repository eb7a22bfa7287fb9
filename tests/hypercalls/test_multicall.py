"""multicall: each entry runs as its own hypercall and its result is written
beside it (xen/common/multicall.c)."""

from __future__ import annotations

import struct

from hypervisor.public.errno import EFAULT, EINVAL, ENOSYS
from hypervisor.public.xen import (
    MULTICALL_ENTRY_SIZE,
    Hypercall,
    XENVER_pagesize,
    XENVER_version,
)
from tests.hypercalls.guest import Guest, run_case


def multicall(g: Guest, calls: list[tuple[int, ...]]) -> tuple[int, list[int]]:
    buf = g.scratch + 0x200
    for i, (op, *args) in enumerate(calls):
        args += [0] * (6 - len(args))
        g.cpu.write(buf + i * MULTICALL_ENTRY_SIZE,
                    struct.pack("<QQ6Q", op, 0xDEAD, *[a & (2**64 - 1) for a in args]))
    rc = g.cpu.hypercall(Hypercall.multicall, buf, len(calls))
    results = [g.cpu.read_u64(buf + i * MULTICALL_ENTRY_SIZE + 8) for i in range(len(calls))]
    return rc, [r - (1 << 64) if r >> 63 else r for r in results]


def test_each_entry_gets_its_own_result():
    rc, results = run_case(lambda g: multicall(g, [
        (Hypercall.xen_version, XENVER_version),
        (Hypercall.xen_version, XENVER_pagesize),
        (55,),
    ]))
    assert rc == 0
    assert results == [(4 << 16) | 19, 4096, -ENOSYS]


def test_a_failing_entry_does_not_stop_the_batch():
    def case(g: Guest):
        va = g.va(g.nr_pages - 1)
        return multicall(g, [(Hypercall.update_va_mapping, 1 << 63, 0, 0),
                             (Hypercall.update_va_mapping, va, 0, 0)])
    rc, results = run_case(case)
    assert rc == 0 and results == [-EINVAL, 0]


def test_nested_multicall_is_refused_in_its_entry():
    rc, results = run_case(lambda g: multicall(g, [(Hypercall.multicall, 0, 0)]))
    assert rc == 0 and results == [-EINVAL]


def test_unreadable_call_list_is_efault():
    assert run_case(lambda g: g.cpu.hypercall(Hypercall.multicall, 1 << 63, 1)) == -EFAULT


def test_zero_calls_is_a_no_op():
    assert run_case(lambda g: g.cpu.hypercall(Hypercall.multicall, 0, 0)) == 0
