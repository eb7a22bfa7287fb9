"""Lab postcopy-balloon: the balloon during post-copy (QEMU's "Inhibit
ballooning during postcopy"). The student writes what the balloon device
does with a guest's inflate and deflate while post-copy's destination holds
the inhibit, under QEMU's policy drop and pvlab's reconcile, and the
reconcile at the release; the grader balloons on seeded schedules while the
pages are still arriving and tells any page lost or duplicated: its pfn, its
frame, whose data it holds and at which step."""

from labs.lab import Lab

LAB = Lab(
    name="postcopy-balloon",
    order=6,
    title="The balloon during post-copy: the inhibit, drop, and the reconcile at the release",
    handout="docs/labs/postcopy-balloon.md",
    todo={"hypervisor.devices.balloon.device": {
        "Balloon.inflate_frame":
            "An inflate request names mfn. First the check of every request: if "
            "_unused(mfn) gives a reason, count metrics.refused, log it and return False "
            "(never free a frame that is not the domain's or still in use). Then the "
            "inhibit: while one is held (self.inhibits), the frame may not leave the "
            "domain, since post-copy's pager still holds it for its pfn and would place "
            "that pfn's page on it after the allocator handed it to someone else: give it "
            "to _hold(mfn, inflate=True) and return False. Only with no inhibit: _free it "
            "and return True.",
        "Balloon.deflate_frame":
            "A deflate request names mfn, a frame populate_physmap gave the guest. If it "
            "is not the domain's (_ours), count metrics.refused and return. While "
            "inhibited, _hold(mfn, inflate=False); under policy drop (POSTCOPY_DROP) that "
            "is all: a dropped deflate is not counted as one. Otherwise count "
            "metrics.deflated.",
        "Balloon._hold":
            "A checked request while inhibited. Policy drop (QEMU's: acknowledged, not "
            "acted on): count metrics.dropped for an inflate, metrics.dropped_deflates "
            "for a deflate, and touch nothing else (the frame and its M2P entry stay as "
            "they are). Policy reconcile: append QueuedRequest(inflate, mfn, pfn) to "
            "self.queue, pfn being the frame's M2P entry now (self.host.m2p[mfn]), count "
            "metrics.queued, and for an inflate set the frame's M2P entry to INVALID_MFN "
            "(as guest_remove_page would take it: a pfn found there at the release says "
            "the guest uses the frame again).",
        "Balloon.reconcile":
            "The release: apply self.queue against each frame's final state and empty "
            "it. The last request naming a frame decides: a frame no inflate named (a "
            "fresh frame deflated) needs nothing; a frame inflated then deflated is kept "
            "(the guest took it back). A frame whose last request is an inflate is freed "
            "(_free, count metrics.reconciled) only if _kept(mfn) gives no reason; "
            "otherwise count metrics.kept and log the reason. Each frame is freed at most "
            "once, however many requests named it. If any was freed, flush the domain's "
            "TLBs (self.host.flush_tlbs). Return how many were freed.",
        "Balloon._kept":
            "Why a frame whose last request was an inflate must stay the domain's, or \"\" "
            "to free it: _unused's reason (not the domain's, mapped, typed, pinned); its "
            "pfn back in the M2P (self.host.m2p[mfn] != INVALID_MFN: the guest uses it "
            "again); still absent (self.host.is_absent(mfn): its page has not arrived, "
            "and the pager will place it there).",
    }},
    tests="labs.postcopy_balloon.grade",
)
