"""Lab virtio-reset: the reviewer's question of 2011, "should reset flush all
interrupt handlers?" The student writes the virtio core's reset (break the
queues, flush the interrupt handlers, then status 0) and the transport's
flush (virtio-mmio's synchronize_irq); the grader runs
the explorer over many schedules of a balloon frozen and thawed while its
interrupt is handled on another cpu, with the device's events thrown at the
steps of the freeze, and tells each failing schedule's story."""

from labs.lab import Lab

LAB = Lab(
    name="virtio-reset",
    order=7,
    title="The reset flushes the interrupt handlers: break, synchronize_cbs, status 0",
    handout="docs/labs/virtio-reset.md",
    todo={
        "guestos.drivers.virtio": {
            "virtio_break_device":
                "Mark every queue of the device broken (vq.broken = 1 for each queue of "
                "dev_vqs(cpu, dev)): vring_interrupt then calls no callback for it "
                "(Linux's virtio_break_device).",
            "virtio_reset_device":
                "Linux's virtio_reset_device under CONFIG_VIRTIO_HARDEN_NOTIFICATION, in "
                "this order: unless the option virtio.nosync=1 is set (dev.nosync), break "
                "the queues (virtio_break_device) and then wait for the handlers in "
                "progress (virtio_synchronize_cbs: the transport's synchronize_cbs); then "
                "write status 0 with the transport's reset (_ops(dev).reset(cpu, dev)). "
                "After it returns no vring callback may run, and the device touches no "
                "ring. With dev.nosync only the status 0 is written.",
        },
        "guestos.drivers.virtio_mmio": {
            "vm_synchronize_cbs":
                "Linux's synchronize_irq for virtio-mmio: no half of the device's "
                "interrupt handler may be left when this returns. The hard half "
                "(vm_interrupt) is one native call, never caught half way; its thread "
                "(vm_interrupt_thread) may have been woken on the irq's cpu (dev.irq_cpu) "
                "and not have run yet. If the device has an irq (dev.irq != NO_IRQ), run "
                "that thread here and now with run_irq_thread(cpu, dev.irq), which says "
                "whether there was one; if there was, count it (dev.flushed += 1) and print "
                "'virtio-mmio at 0x...: reset: finished the interrupt that cpuN had half "
                "handled' (the base in hex as {dev.base:#x}, N = dev.irq_cpu).",
        },
    },
    tests="labs.virtio_reset.grade",
)
