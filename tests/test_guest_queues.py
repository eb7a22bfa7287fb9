"""Small rules of the guest kernel's queues, over a fake cpu: queue_work on
a pending item leaves it where it is and says False (Linux's queue_work);
an icmp read into a bad buffer loses no reply (copied before it is taken);
a packet held for ARP is dropped if its reply comes after ARP_TIMEOUT_NS."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from guestos import inet, workqueue
from guestos.symbols import export
from hypervisor.public.errno import EFAULT
from tests.fakecpu import FakeCpu


@dataclass
class FakeArea:
    base: int

    def va(self, cpu) -> int:
        return self.base


@export
def _work_fn(cpu, t_now):
    pass


def test_queue_work_leaves_a_pending_item_where_it_is(monkeypatch):
    cpu = FakeCpu()
    monkeypatch.setattr(workqueue, "AREAS", {"workqueue": FakeArea(cpu.kva(cpu.alloc_page()))})
    assert workqueue.queue_work(cpu, _work_fn, freezable=True) is True
    cpu.vcpu_id = 1
    assert workqueue.queue_work(cpu, _work_fn, freezable=False) is False
    w = workqueue._slot(cpu, _work_fn)
    assert (w.pending, w.on_cpu) == (1, workqueue.FREEZABLE)
    assert not workqueue.cpu_work_pending(cpu)   # not moved to cpu1's kworker


@pytest.fixture
def net(monkeypatch):
    cpu = FakeCpu()
    ref = inet.INET.at(cpu, cpu.kva(cpu.alloc_page()))
    monkeypatch.setattr(inet, "_inet", lambda c: ref)
    monkeypatch.setattr(inet, "printk", lambda c, msg: cpu.printed.append(msg))
    return cpu, ref


def test_an_icmp_read_into_a_bad_buffer_loses_no_reply(net, monkeypatch):
    cpu, ref = net
    reply = inet.REPLY.pack(0x0A000202, 7, 64, 0, 120, 64)
    cpu.write(ref.va + inet.REPLY_OFF, reply)
    ref.reply_tail = 1
    copied: list[bytes] = []
    monkeypatch.setattr(inet, "copy_to_user", lambda c, ubuf, data: False)
    assert inet.icmp_read(cpu, None, 0x1000, 16) == -EFAULT
    monkeypatch.setattr(inet, "copy_to_user", lambda c, ubuf, data: copied.append(data) or True)
    assert inet.icmp_read(cpu, None, 0x1000, 16) == 16
    assert copied == [reply] and inet.icmp_read(cpu, None, 0x1000, 16) == 0


@pytest.mark.parametrize("waited, sent", [(inet.ARP_TIMEOUT_NS, True),
                                          (inet.ARP_TIMEOUT_NS + 1, False)])
def test_a_packet_held_for_arp_waits_no_longer_than_the_timeout(net, monkeypatch, waited, sent):
    cpu, ref = net
    frames: list[bytes] = []
    monkeypatch.setattr(inet, "_send", lambda c, i, frame: frames.append(frame) or 0)
    monkeypatch.setattr(inet, "now", lambda c: 5_000 + waited)
    cpu.write(ref.va + inet.PENDING_OFF, b"packet")
    ref.pending_ip, ref.pending_len, ref.pending_since = 0x0A000202, 6, 5_000
    inet._send_pending(cpu, ref, b"\x52\x54\x00\x12\x34\x56")
    assert ref.pending_ip == 0
    assert bool(frames) is sent and ref.arp_timeouts == (0 if sent else 1)
    assert not frames or frames[0].endswith(b"packet")
