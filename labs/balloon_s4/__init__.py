"""Lab balloon-s4: the virtio balloon across a save. The student writes the
balloon driver's PM callbacks and the discard of its pages at a restore; the
grader checkpoints a ballooned guest under each policy, checks what the
image and the thawed guest show the host, and restores each image in a new
process, where no page may be lost (the leak of Linux e562966)."""

from labs.lab import Lab

LAB = Lab(
    name="balloon-s4",
    order=5,
    title="The balloon across a save: discard, the leak of 2012, deflate-on-freeze",
    handout="docs/labs/balloon-s4.md",
    todo={"guestos.drivers.virtio_balloon": {
        "virtballoon_freeze":
            "The virtio core has already deferred config changes, and the tasks and the "
            "balloon's work are frozen. Under policy deflate "
            "(vb.policy == POLICY_DEFLATE) empty the balloon first, telling the host: "
            "leak_balloon until vb.num_pages is 0 (it takes back at most 256 pages a call; "
            "if a call takes back none, printk why and stop), then write `actual` with "
            "update_balloon_size. Under discard and keep the balloon stays inflated. Then, in "
            "this order: reset the device with virtio_reset_device(cpu, dev) (the core's: the "
            "queues broken, the interrupt handlers flushed, status 0; from then on the device "
            "touches no ring and no callback runs), and only then delete the queues "
            "(_del_vqs frees their ring pages). Print 'virtio_balloon: frozen: device reset, "
            "queues deleted, N pages in the balloon (policy P)' (P is POLICIES[vb.policy]) "
            "and return 0.",
        "virtballoon_thaw":
            "The same domain goes on (a checkpoint, or a suspend that failed): the host "
            "still holds what the freeze left. The core has reset the device and negotiated "
            "its features again; set the driver up again with _restore_common(cpu), which "
            "makes the queues, sets DRIVER_OK and queues the work if the balloon is not at "
            "the host's target. Do not touch the balloon's pages. If it returned 0, print "
            "'virtio_balloon: thawed: N pages in the balloon'. Return what it returned.",
        "virtballoon_restore":
            "A new domain on new frames. The host's target came through the image. Under "
            "policy discard, the driver forgets the balloon first, if it holds pages: "
            "_discard(cpu). Under deflate the balloon is already empty, and under keep its "
            "pages and the device's `actual` came through the image: nothing to do but set "
            "the driver up. Then _restore_common(cpu), as the thaw does; if it returned 0, "
            "print 'virtio_balloon: restored: N pages in the balloon, target T' "
            "(T = vb.num_pages + towards_target(cpu)). Return what it returned.",
        "_discard":
            "Every page in the balloon goes back to the kernel: when this returns, "
            "vb.num_pages is 0, each page is mapped, free in the allocator and counted in "
            "the RAM count again, and the host is told nothing (it forgot the balloon). A "
            "ballooned pfn has no frame: its p2m entry is INVALID_MFN and the linear map "
            "does not map it. Work 256 pages at a time (_ballooned lists them; _populate "
            "and _give_back are the helpers of leak_balloon). Keep in vb.discarded how "
            "many pages were taken back, and print 'virtio_balloon: restore: discarded "
            "the balloon's N pages (fresh frames, back to the allocator)'. Moving only "
            "the counters is the bug of Linux e562966: the pages are lost.",
    }},
    tests="labs.balloon_s4.grade",
)
